//! Splices (an appliance inline in front of a running VM's NIC) and mirrors
//! (a copy of a NIC's traffic to a capture appliance).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{InvalidInputError, Name};

/// The NIC role of a bump-in-the-wire appliance that faces the network.
pub const OUTSIDE_ROLE: &str = "outside";
/// The NIC role of a bump-in-the-wire appliance that faces the VM it guards.
pub const INSIDE_ROLE: &str = "inside";

/// NIC roles that are L2 ports, never addressed: the two sides of a
/// bump in the wire, and a capture appliance's sink.
pub const L2_ROLES: &[&str] = &[OUTSIDE_ROLE, INSIDE_ROLE, crate::MIRROR_ROLE];

/// Whether a NIC of this role gets no IPv4 address.
pub fn is_l2_role(role: Option<&str>) -> bool {
    role.is_some_and(|r| L2_ROLES.contains(&r))
}

/// How many events a splice keeps (the oldest go first).
pub const MAX_SPLICE_EVENTS: usize = 20;

/// What happens to a spliced VM's path when its appliance dies or fails its
/// health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// The VM's NIC goes back onto the network, around the appliance, until
    /// the appliance is healthy again (capture appliances' default).
    Open,
    /// The path stays cut until the appliance is back (firewalls' default).
    Closed,
}

impl FromStr for FailMode {
    type Err = InvalidInputError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(FailMode::Open),
            "closed" => Ok(FailMode::Closed),
            _ => Err(InvalidInputError::Choice {
                what: "fail mode",
                raw: s.to_string(),
                choices: "open, closed",
            }),
        }
    }
}

impl fmt::Display for FailMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

/// Where a splice stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SpliceState {
    /// The appliance is booting; the VM's path does not go through it yet.
    Starting,
    /// The VM's traffic goes through the appliance.
    Active,
    /// Fail-open: the appliance is down or unhealthy, and the VM's NIC is
    /// wired around it until it is healthy again.
    Bypassed,
    /// Fail-closed: the appliance is down or unhealthy, and the VM's path
    /// stays cut until it is back.
    Cut,
    /// Being unspliced: out of the path, its pieces being removed.
    Removing,
}

impl SpliceState {
    /// Whether the VM's path is wired through this splice's appliance.
    pub fn in_path(self) -> bool {
        matches!(self, SpliceState::Active | SpliceState::Cut)
    }
}

impl fmt::Display for SpliceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpliceState::Starting => "starting",
            SpliceState::Active => "active",
            SpliceState::Bypassed => "bypassed",
            SpliceState::Cut => "cut",
            SpliceState::Removing => "removing",
        })
    }
}

/// One thing that happened to a splice (the appliance failed, came back, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpliceEvent {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub message: String,
}

/// A NIC of an instance, as `VM[:NIC]` names it: a role (`lan`), or the
/// NIC's index from 0 (`0` is the guest's first NIC). Absent: the first NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicRef {
    pub instance: Name,
    pub nic: Option<String>,
}

impl FromStr for NicRef {
    type Err = InvalidInputError;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (instance, nic) = match raw.split_once(':') {
            Some((instance, nic)) => {
                if nic.is_empty()
                    || !nic
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                {
                    return Err(InvalidInputError::NicRef {
                        raw: raw.to_string(),
                    });
                }
                (instance, Some(nic.to_string()))
            }
            None => (raw, None),
        };
        Ok(NicRef {
            instance: Name::new(instance)?,
            nic,
        })
    }
}

/// The body of `POST /v1/splices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SpliceRequest {
    /// An image (vroom creates the appliance and removes it on unsplice) or
    /// an existing stopped instance with `outside` and `inside` NICs.
    pub appliance: String,
    /// The running VM to put the appliance in front of.
    pub vm: Name,
    /// The VM's NIC: a role or an index from 0; its first NIC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9-]{1,32}$"))]
    pub nic: Option<String>,
    /// Capture appliances fail open, others closed, when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<FailMode>,
    /// The appliance instance's name when vroom creates it; `VM-IMAGE` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// Seconds the appliance has to become ready; 120 when absent.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3600))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub ready_timeout_secs: Option<u64>,
}

/// A NIC reference in a request: a role or an index, `[a-z0-9-]{1,32}`.
fn check_nic_field(field: &'static str, raw: Option<&str>) -> Result<(), InvalidInputError> {
    match raw {
        Some(raw)
            if raw.is_empty()
                || raw.len() > 32
                || !raw
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
        {
            Err(InvalidInputError::NicField {
                field,
                raw: raw.to_string(),
            })
        }
        _ => Ok(()),
    }
}

impl SpliceRequest {
    /// Checks the request's fields against their documented ranges.
    pub fn validate(&self) -> Result<(), InvalidInputError> {
        if let Some(timeout) = self.ready_timeout_secs {
            crate::limits::READY_TIMEOUT_SECS.check(timeout)?;
        }
        check_nic_field("nic", self.nic.as_deref())
    }
}

impl MirrorRequest {
    /// Checks the request's fields against their documented ranges.
    pub fn validate(&self) -> Result<(), InvalidInputError> {
        check_nic_field("nic", self.nic.as_deref())?;
        check_nic_field("to_nic", self.to_nic.as_deref())?;
        match &self.filter {
            Some(f) if f.len() > 1024 => Err(InvalidInputError::FilterTooLong { len: f.len() }),
            _ => Ok(()),
        }
    }
}

/// An appliance inline between a VM's NIC and the network that NIC is on.
///
/// On the host, the VM's tap sits on a private bridge (`segment`) with the
/// appliance's `inside` NIC; the appliance's `outside` NIC sits where the
/// VM's tap was. Splices in front of the same NIC stack: the one spliced
/// last is closest to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Splice {
    /// The appliance instance (an appliance is spliced at most once).
    pub appliance: Name,
    pub vm: Name,
    /// Index of the VM's NIC.
    pub nic: usize,
    /// The network the VM's NIC belongs to.
    pub network: Name,
    /// The host bridge between the appliance's `inside` NIC and the VM side.
    pub segment: String,
    pub fail: FailMode,
    /// The appliance was created by the splice and is removed with it.
    pub owned: bool,
    /// Stacking order: among the splices of one NIC, lower is closer to
    /// the network.
    pub seq: u64,
    pub state: SpliceState,
    pub created_at: u64,
    /// What happened to it, oldest first (at most 20).
    #[serde(default)]
    pub events: Vec<SpliceEvent>,
}

impl Splice {
    pub fn record(&mut self, at_ms: u64, message: impl Into<String>) {
        self.events.push(SpliceEvent {
            at_ms,
            message: message.into(),
        });
        let excess = self.events.len().saturating_sub(MAX_SPLICE_EVENTS);
        self.events.drain(..excess);
    }
}

/// The body of `POST /v1/mirrors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MirrorRequest {
    /// The VM whose traffic is copied.
    pub vm: Name,
    /// Its NIC: a role or an index from 0; its first NIC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9-]{1,32}$"))]
    pub nic: Option<String>,
    /// The capture appliance that receives the copy.
    pub to: Name,
    /// Its capture NIC (`mirror-sink`); the appliance's only one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9-]{1,32}$"))]
    pub to_nic: Option<String>,
    /// A pcap-filter expression: only matching frames are copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 1024))]
    pub filter: Option<String>,
}

/// A copy of one NIC's traffic, both directions, to a capture NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Mirror {
    /// `VM:NIC>TO:NIC`, stable; what `unmirror` takes.
    pub id: String,
    pub vm: Name,
    pub nic: usize,
    pub to: Name,
    pub to_nic: usize,
    /// The capture appliance's instance id: the copy goes to that very
    /// instance, never to another of the same name (a mirror that moved
    /// with its VM to a host where the name is someone else's). Absent in
    /// mirrors from before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub created_at: u64,
}

impl Mirror {
    pub fn make_id(vm: &Name, nic: usize, to: &Name, to_nic: usize) -> String {
        format!("{vm}.{nic}-{to}.{to_nic}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_refs() {
        let r: NicRef = "web1".parse().unwrap();
        assert_eq!((r.instance.as_str(), r.nic), ("web1", None));
        let r: NicRef = "fw:lan".parse().unwrap();
        assert_eq!(r.nic.as_deref(), Some("lan"));
        let r: NicRef = "fw:0".parse().unwrap();
        assert_eq!(r.nic.as_deref(), Some("0"));
        for bad in ["fw:", ":lan", "Fw", "fw:l an", "fw:LAN"] {
            assert!(bad.parse::<NicRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn events_are_bounded_oldest_first_out() {
        let mut s = Splice {
            appliance: Name::new("a").unwrap(),
            vm: Name::new("v").unwrap(),
            nic: 0,
            network: Name::new("n").unwrap(),
            segment: "x".into(),
            fail: FailMode::Open,
            owned: true,
            seq: 1,
            state: SpliceState::Active,
            created_at: 0,
            events: vec![],
        };
        for i in 0..30 {
            s.record(i, format!("e{i}"));
        }
        assert_eq!(s.events.len(), MAX_SPLICE_EVENTS);
        assert_eq!(s.events[0].message, "e10");
    }

    #[test]
    fn only_in_path_states_carry_traffic() {
        assert!(SpliceState::Active.in_path());
        assert!(SpliceState::Cut.in_path());
        assert!(!SpliceState::Bypassed.in_path());
        assert!(!SpliceState::Starting.in_path());
        assert!(!SpliceState::Removing.in_path());
    }
}
