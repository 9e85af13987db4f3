//! Services: a group of instances of one image behind a load balancer
//! appliance (the catalog's `lb`), kept at a number of members by vroomd:
//! a member that fails is replaced, a scale changes the number, and the
//! balancer lists exactly the members that are up.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{InstanceState, Name};

/// The most members a service may have.
pub const MAX_SERVICE_REPLICAS: u32 = 64;

/// The longest service name: its members (`NAME-N`, N never reused, up to
/// seven digits) and balancer (`NAME-lb`) must be valid names too.
pub const MAX_SERVICE_NAME_LEN: usize = 24;

/// What a service is asked to be (`vroom service create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceDefinition {
    /// At most 24 characters (its members are NAME-N, its balancer NAME-lb).
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z]([a-z0-9-]{0,22}[a-z0-9])?$", min_length = 1, max_length = 24))]
    pub name: Name,
    /// The members' image.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub image: String,
    /// How many members it keeps (1 to 64); with `max_replicas`, the
    /// fewest the autoscaler keeps, and the number it starts with.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    #[serde(deserialize_with = "crate::json_int::required")]
    pub replicas: u32,
    /// The most members the autoscaler may add (`replicas` to 64; absent:
    /// `replicas`, a fixed number).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub max_replicas: Option<u32>,
    /// The network its members and its balancer are on (or `room`).
    #[serde(default)]
    pub network: Option<Name>,
    /// The room whose `lan` its members and balancer are on; the room's
    /// DNS answers the service's name with the balancer's address.
    #[serde(default)]
    pub room: Option<Name>,
    /// The port the members serve and the balancer listens on.
    #[serde(
        default = "default_port",
        deserialize_with = "crate::json_int::required"
    )]
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 65535, default = 80)
    )]
    pub port: u16,
    /// What the autoscaler keeps (needs `max_replicas` above `replicas`).
    #[serde(default)]
    pub scale_on: Option<ScaleTarget>,
    /// Members start from the image's warm snapshot (made once, in the
    /// background, when the image has none); false: every member boots.
    #[serde(default = "yes")]
    #[cfg_attr(feature = "openapi", schema(default = true))]
    pub warm: bool,
}

fn yes() -> bool {
    true
}

pub(crate) fn default_port() -> u16 {
    80
}

impl ServiceDefinition {
    /// Its number for people: `2`, or `2..6 on p95<50ms` when autoscaled.
    pub fn scale(&self) -> String {
        let (min, max) = self.bounds();
        match self.scale_on {
            Some(target) if max > min => format!("{min}..{max} on {target}"),
            _ => min.to_string(),
        }
    }

    /// The fewest and the most members it may have.
    pub fn bounds(&self) -> (u32, u32) {
        (
            self.replicas,
            self.max_replicas
                .unwrap_or(self.replicas)
                .max(self.replicas),
        )
    }
}

/// What a service's autoscaler keeps under its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", try_from = "ScaleTargetFields")]
pub enum ScaleTarget {
    /// The 95th percentile of the time from a request to its response's
    /// headers, through the balancer, in milliseconds (`p95<50ms`).
    P95Ms(u32),
    /// The members' average CPU use, in percent of their cores (`60%`).
    CpuPercent(u32),
}

/// A scaling target as JSON has it: one of two keys, each an integer (`50`
/// or `50.0`: JSON has only numbers).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleTargetFields {
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    p95_ms: Option<u32>,
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    cpu_percent: Option<u32>,
}

impl TryFrom<ScaleTargetFields> for ScaleTarget {
    type Error = String;

    fn try_from(f: ScaleTargetFields) -> Result<Self, String> {
        match (f.p95_ms, f.cpu_percent) {
            (Some(ms), None) => Ok(ScaleTarget::P95Ms(ms)),
            (None, Some(p)) => Ok(ScaleTarget::CpuPercent(p)),
            _ => Err("a scaling target is one of p95_ms or cpu_percent".into()),
        }
    }
}

impl std::fmt::Display for ScaleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScaleTarget::P95Ms(ms) => write!(f, "p95<{ms}ms"),
            ScaleTarget::CpuPercent(p) => write!(f, "cpu<{p}%"),
        }
    }
}

impl std::str::FromStr for ScaleTarget {
    type Err = String;

    /// `p95<50ms` (also `p95<0.05s`), or `60%` / `cpu<60%`.
    fn from_str(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        let bad = |why: &str| format!("bad target {raw:?}: {why} (like p95<50ms or 60%)");
        if let Some(latency) = s.strip_prefix("p95<") {
            let ms = if let Some(ms) = latency.strip_suffix("ms") {
                ms.trim().parse::<f64>().map_err(|_| bad("not a number"))?
            } else if let Some(secs) = latency.strip_suffix('s') {
                secs.trim()
                    .parse::<f64>()
                    .map_err(|_| bad("not a number"))?
                    * 1000.0
            } else {
                return Err(bad("a latency needs a unit, ms or s"));
            };
            if !(1.0..=60_000.0).contains(&ms) || ms.fract() != 0.0 {
                return Err(bad("a latency is 1 to 60000 whole milliseconds"));
            }
            return Ok(ScaleTarget::P95Ms(ms as u32));
        }
        let cpu = s.strip_prefix("cpu<").unwrap_or(s);
        let Some(percent) = cpu.strip_suffix('%') else {
            return Err(bad("not a latency or a CPU percentage"));
        };
        match percent.trim().parse::<u32>() {
            Ok(p) if (1..=100).contains(&p) => Ok(ScaleTarget::CpuPercent(p)),
            _ => Err(bad("a CPU target is 1% to 100%")),
        }
    }
}

/// A member as recorded: its name and the image it was made of (a
/// rolling update tells old members from new by it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RecordedMember")]
pub struct MemberRecord {
    pub name: Name,
    pub image: String,
    /// Leaving: out of the balancer, its instance being removed.
    #[serde(default)]
    pub leaving: bool,
}

/// Members as records of earlier versions wrote them: a bare name.
#[derive(Deserialize)]
#[serde(untagged)]
enum RecordedMember {
    Named(Name),
    Full {
        name: Name,
        image: String,
        #[serde(default)]
        leaving: bool,
    },
}

impl From<RecordedMember> for MemberRecord {
    fn from(m: RecordedMember) -> Self {
        match m {
            // Before updates, every member was of the service's image: an
            // empty image matches no update's source nor target, so the
            // next update replaces it like any old member.
            RecordedMember::Named(name) => MemberRecord {
                name,
                image: String::new(),
                leaving: false,
            },
            RecordedMember::Full {
                name,
                image,
                leaving,
            } => MemberRecord {
                name,
                image,
                leaving,
            },
        }
    }
}

/// What a service's balancer measured over a short window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceLoad {
    /// How long the window is, in seconds.
    pub window_secs: f64,
    /// Responses in the window.
    pub requests: u64,
    pub requests_per_sec: f64,
    /// Answers 500 and up (the members' and the balancer's own).
    pub errors: u64,
    /// Responses slower than the latency target.
    pub slow: u64,
    /// The 95th percentile lies above this (milliseconds), when known.
    pub p95_above_ms: Option<u32>,
    /// ... and at most this (absent: above the highest bucket).
    pub p95_at_most_ms: Option<u32>,
    /// Connections open to the balancer now.
    pub in_flight: u32,
    /// The members' average CPU use over the window, in percent of a core.
    pub cpu_percent: Option<f64>,
}

impl std::fmt::Display for ServiceLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests in {:.0} s ({:.0}/s), {} errors",
            self.requests, self.window_secs, self.requests_per_sec, self.errors
        )?;
        match (self.p95_above_ms, self.p95_at_most_ms) {
            (Some(lo), Some(hi)) => write!(f, ", p95 {lo}-{hi} ms")?,
            (None, Some(hi)) => write!(f, ", p95 <= {hi} ms")?,
            (Some(lo), None) => write!(f, ", p95 > {lo} ms")?,
            (None, None) => {}
        }
        if let Some(cpu) = self.cpu_percent {
            write!(f, ", cpu {cpu:.0}%")?;
        }
        Ok(())
    }
}

/// One decision of the autoscaler, with what it saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScaleDecision {
    /// Unix time, in milliseconds.
    pub at_ms: u64,
    pub from: u32,
    pub to: u32,
    pub reason: String,
    pub load: ServiceLoad,
}

/// A rolling update in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceUpdate {
    /// The image members are moving from (what a rollback returns to).
    pub from: String,
    pub to: String,
    pub started_at: u64,
    /// Set once a new member failed: the new ones are being removed.
    pub rolling_back: Option<String>,
}

/// `POST /v1/services/{name}/update`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceUpdateRequest {
    /// The members' new image.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub image: String,
}

/// The most decisions a service keeps for `service inspect`.
pub const KEPT_DECISIONS: usize = 20;

/// The service as kept in the state store: its spec, its members by name,
/// and whether it is being removed. A member's name is recorded before its
/// instance is made, so a daemon killed in between finds it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub spec: ServiceDefinition,
    pub members: Vec<MemberRecord>,
    /// The number the next member's name gets (`NAME-N`): never reused.
    pub next: u32,
    /// How many members it has now (the autoscaler moves it within the
    /// bounds; absent: `spec.replicas`).
    #[serde(default)]
    pub desired: Option<u32>,
    /// Being removed: members, then the balancer, then this record go.
    #[serde(default)]
    pub removing: bool,
    #[serde(default)]
    pub update: Option<ServiceUpdate>,
    /// The latest scaling decisions, oldest first.
    #[serde(default)]
    pub decisions: Vec<ScaleDecision>,
    pub created_at: u64,
}

impl ServiceRecord {
    /// A new service's record: no members yet.
    pub fn new(spec: ServiceDefinition, created_at: u64) -> ServiceRecord {
        ServiceRecord {
            spec,
            members: vec![],
            next: 1,
            desired: None,
            removing: false,
            update: None,
            decisions: vec![],
            created_at,
        }
    }

    /// How many members it should have now.
    pub fn desired(&self) -> u32 {
        let (min, max) = self.spec.bounds();
        self.desired.unwrap_or(self.spec.replicas).clamp(min, max)
    }

    pub fn has_member(&self, name: &str) -> bool {
        self.members.iter().any(|m| m.name.as_str() == name)
    }
}

/// One member as `service inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceMember {
    pub name: Name,
    /// Its instance's state; absent while it is being made.
    pub state: Option<InstanceState>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = Ipv4))]
    pub ip: Option<Ipv4Addr>,
    /// The image it was made of.
    pub image: String,
    /// The balancer sends it requests.
    pub balanced: bool,
}

/// A service as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Service {
    pub spec: ServiceDefinition,
    /// The balancer's instance (`NAME-lb`).
    pub balancer: Name,
    /// The service's address: its balancer's.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = Ipv4))]
    pub address: Option<Ipv4Addr>,
    pub members: Vec<ServiceMember>,
    /// Members running and balanced.
    pub ready: u32,
    /// How many members it should have now.
    pub desired: u32,
    pub removing: bool,
    /// A rolling update in progress.
    pub update: Option<ServiceUpdate>,
    /// What the balancer measured last (absent until it has two readings).
    pub load: Option<ServiceLoad>,
    /// The latest scaling decisions, oldest first.
    pub decisions: Vec<ScaleDecision>,
    pub created_at: u64,
}

impl Service {
    /// vroomd has brought it to its number: every member running and
    /// balanced, no update under way.
    pub fn converged(&self) -> bool {
        self.ready == self.desired
            && self.members.len() as u32 == self.desired
            && self.update.is_none()
            && !self.removing
    }
}

/// `POST /v1/services/{name}/scale`: a number of members now, or new
/// bounds for the autoscaler, or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceScaleRequest {
    /// How many members now (1 to 64; within the bounds). Alone on a
    /// service without an autoscaler, it is the new fixed number.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub replicas: Option<u32>,
    /// The autoscaler's new bounds (both or neither).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub min: Option<u32>,
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub max: Option<u32>,
}

/// `N` or `MIN..MAX`, as `--replicas` and `service scale` take them.
pub fn parse_replicas(raw: &str) -> Result<(u32, Option<u32>), String> {
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("bad replicas {raw:?}: give N or MIN..MAX, like 2..6"))
    };
    match raw.split_once("..") {
        Some((min, max)) => Ok((number(min)?, Some(number(max)?))),
        None => Ok((number(raw)?, None)),
    }
}

/// The name of `service`'s balancer.
pub fn balancer_name(service: &Name) -> Name {
    Name::new(&format!("{service}-lb")).expect("invariant: service names leave room")
}

/// The name of `service`'s member number `n`.
pub fn member_name(service: &Name, n: u32) -> Name {
    Name::new(&format!("{service}-{n}")).expect("invariant: service names leave room")
}

/// Whether an instance named `instance` would take a name a service
/// `service` gives its members or its balancer.
pub fn is_service_name(service: &str, instance: &str) -> bool {
    instance.strip_prefix(service).is_some_and(|rest| {
        rest == "-lb"
            || rest
                .strip_prefix('-')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_and_balancer_names_belong_to_their_service() {
        let shop: Name = "shop".parse().unwrap();
        assert_eq!(member_name(&shop, 3).as_str(), "shop-3");
        assert_eq!(balancer_name(&shop).as_str(), "shop-lb");
        assert!(is_service_name("shop", "shop-3"));
        assert!(is_service_name("shop", "shop-lb"));
        assert!(!is_service_name("shop", "shop-db"));
        assert!(!is_service_name("shop", "shop-"));
        assert!(!is_service_name("shop", "shopping-1"));
        assert!(!is_service_name("shop", "shop"));
        assert_eq!("p95<50ms".parse(), Ok(ScaleTarget::P95Ms(50)));
        assert_eq!("p95<0.2s".parse(), Ok(ScaleTarget::P95Ms(200)));
        assert_eq!("60%".parse(), Ok(ScaleTarget::CpuPercent(60)));
        assert_eq!("cpu<60%".parse(), Ok(ScaleTarget::CpuPercent(60)));
        for bad in [
            "p95<50",
            "p95<0ms",
            "p95<1.5ms",
            "0%",
            "101%",
            "fast",
            "p99<5ms",
        ] {
            assert!(bad.parse::<ScaleTarget>().is_err(), "{bad}");
        }
        for (json, want) in [
            (r#"{"p95_ms":50}"#, Some(ScaleTarget::P95Ms(50))),
            (r#"{"p95_ms":50.0}"#, Some(ScaleTarget::P95Ms(50))),
            (r#"{"cpu_percent":60}"#, Some(ScaleTarget::CpuPercent(60))),
            (r#"{"p95_ms":50,"cpu_percent":60}"#, None),
            (r#"{"x":1}"#, None),
            (r#"{}"#, None),
        ] {
            assert_eq!(
                serde_json::from_str::<ScaleTarget>(json).ok(),
                want,
                "{json}"
            );
        }
        assert_eq!(
            serde_json::to_string(&ScaleTarget::P95Ms(50)).unwrap(),
            r#"{"p95_ms":50}"#
        );
        assert_eq!(parse_replicas("3"), Ok((3, None)));
        assert_eq!(parse_replicas("2..6"), Ok((2, Some(6))));
        assert!(parse_replicas("2..").is_err() && parse_replicas("x").is_err());
        let old: ServiceRecord = serde_json::from_str(
            r#"{"spec":{"name":"shop","image":"web","replicas":2,"network":"lan","port":80},
                "members":["shop-1"],"next":2,"removing":false,"created_at":1}"#,
        )
        .unwrap();
        assert_eq!(old.members[0].name.as_str(), "shop-1");
        assert_eq!(old.desired(), 2);
        let long: Name = "a".repeat(MAX_SERVICE_NAME_LEN).parse().unwrap();
        assert_eq!(member_name(&long, 9_999_999).as_str().len(), 32);
    }
}
