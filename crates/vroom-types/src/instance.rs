use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{ConfigValues, InvalidInputError, Name};

/// The accelerator a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM where the CPU advertises vmx or svm and /dev/kvm opens; TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = InvalidInputError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(InvalidInputError::Accel { raw: s.to_string() }),
        }
    }
}

/// The accelerator an instance actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// One NIC of an instance as the user asks for it: `[ROLE=]NET[:IP]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub network: Name,
    /// A fixed address inside the network's subnet; vroom allocates one when absent.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = Ipv4))]
    pub ip: Option<Ipv4Addr>,
    /// The image's NIC role this NIC plays (`wan`, `lan`, ...); NICs without
    /// one take the image's remaining roles in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Name>,
}

impl FromStr for NicSpec {
    type Err = InvalidInputError;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidInputError::NicSpec {
            raw: raw.to_string(),
        };
        let (role, rest) = match raw.split_once('=') {
            Some((role, rest)) => (Some(Name::new(role)?), rest),
            None => (None, raw),
        };
        let (net, ip) = match rest.split_once(':') {
            Some((net, ip)) => (net, Some(ip.parse::<Ipv4Addr>().map_err(|_| invalid())?)),
            None => (rest, None),
        };
        Ok(NicSpec {
            network: Name::new(net)?,
            ip,
            role,
        })
    }
}

/// What a user asks for when creating an instance.
///
/// The numeric ranges are [`crate::limits`]; the host's memory and CPU
/// count, and the image's minimum memory, are checked on create as well.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub name: Name,
    /// An image name (newest of that name) or id.
    #[cfg_attr(feature = "openapi", schema(example = "hello"))]
    pub image: String,
    /// Guest memory in MiB; the image's default when absent. At most the host's memory.
    #[cfg_attr(feature = "openapi", schema(minimum = 64, maximum = 1073741824))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub mem_mib: Option<u64>,
    /// Virtual CPUs; at most the host's CPU count.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 255))]
    #[serde(deserialize_with = "crate::json_int::required")]
    pub cpus: u32,
    /// NICs in order; the default network when empty.
    pub nics: Vec<NicSpec>,
    pub accel: AccelChoice,
    /// Size of the config volume in KiB; 1440 (a floppy) when absent.
    #[cfg_attr(feature = "openapi", schema(minimum = 64, maximum = 65536))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub config_volume_kib: Option<u32>,
    /// Every start is a clean slate: the config volume goes back to the
    /// config the instance was created with.
    #[serde(default)]
    pub ephemeral: bool,
    /// Data volumes, mounted in the guest before its services start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::VolumeAttach>,
}

/// The body of `POST /v1/instances`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub spec: InstanceSpec,
    /// Seconds the guest has to report ready before the instance is marked failed.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3600))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub ready_timeout_secs: Option<u64>,
    /// Start from this snapshot instead of booting: a clone, with its own
    /// identity (name, MACs, addresses) and the snapshot's config. Its NICs
    /// default to the snapshot's networks.
    #[serde(default)]
    pub from_snapshot: Option<Name>,
    /// Boot even when a warm snapshot of the image fits.
    #[serde(default)]
    pub cold: bool,
    /// Cluster placement: HA policy, spread group, node. Refused on a
    /// host that is not in a cluster unless left at its defaults.
    #[serde(default, skip_serializing_if = "crate::Placement::is_default")]
    pub placement: crate::Placement,
    /// An imported image's environment (`vroom run --env`): config keys, or
    /// the environment variables they feed, with values over the image's
    /// defaults (`config reset` goes back to those). Refused for an image
    /// that was not imported, and for a clone (it has its snapshot's config).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::BTreeMap<String, String>))]
    pub env: crate::ConfigValues,
}

/// Whether the user wants the instance running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Stopped,
}

/// The observed lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// QEMU is up; the guest has not reported ready yet.
    Starting,
    /// The guest reported ready.
    Running,
    /// A graceful shutdown is under way.
    Stopping,
    Stopped,
    /// The VM died unexpectedly and waits for its restart backoff.
    Restarting,
    /// Start failed or the guest never became ready; no automatic restart.
    Failed,
}

impl InstanceState {
    /// On its way to running: a wait for ready goes on while it is.
    pub fn is_coming_up(self) -> bool {
        matches!(self, InstanceState::Starting | InstanceState::Restarting)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from));
        f.write_str(s.as_deref().unwrap_or("?"))
    }
}

/// The closed set of lifecycle actions on an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum InstanceAction {
    Start,
    Stop,
    Restart,
}

/// One NIC as allocated by vroom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NicStatus {
    pub network: Name,
    /// Absent on an L2 port (`outside`, `inside`, `mirror-sink`): the guest
    /// bridges or captures on it and never addresses it.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub ip: Option<Ipv4Addr>,
    pub prefix_len: u8,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub gateway: Ipv4Addr,
    pub mac: String,
    /// The host tap device; present while QEMU runs.
    pub tap: String,
    /// The image's NIC role this NIC plays, when the image declares roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl NicStatus {
    /// The address as people read it: `10.0.0.5`, or `l2` for an L2 port.
    pub fn shown_ip(&self) -> String {
        self.ip
            .map_or_else(|| "l2".to_string(), |ip| ip.to_string())
    }

    /// `10.0.0.5/24`, or `l2 port` for an L2 port.
    pub fn shown_cidr(&self) -> String {
        self.ip.map_or_else(
            || "l2 port".to_string(),
            |ip| format!("{ip}/{}", self.prefix_len),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceStatus {
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub accel: Option<Accel>,
    /// Unix seconds of the last QEMU launch.
    pub started_at: Option<u64>,
    /// Milliseconds from launch to the guest reporting ready.
    pub boot_ms: Option<u64>,
    /// After a boot (not a warm start or a clone), the guest's own share of
    /// `boot_ms`, as its monotonic clock tells it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_phases: Option<BootPhases>,
    /// Unexpected exits that were restarted.
    pub restarts: u32,
    pub last_error: Option<String>,
    /// What the current run started from instead of a boot: `snapshot
    /// NAME`, or `warm IMAGE` for a warm start; absent after a cold boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_from: Option<String>,
    /// In a cluster: why no node runs it now, while it waits for one
    /// (`waiting for node n1 (lost), which holds volume db-data's only
    /// copy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// Where a boot's time went: the kernel's part (its clock's start to init)
/// and init's (to ready: volumes, config, services, the health check).
/// The rest of `boot_ms` is QEMU's start, the firmware, loading the
/// kernel, and the host hearing of ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootPhases {
    pub kernel_ms: u64,
    pub init_ms: u64,
}

impl InstanceStatus {
    pub fn stopped() -> Self {
        InstanceStatus {
            state: InstanceState::Stopped,
            pid: None,
            accel: None,
            started_at: None,
            boot_ms: None,
            boot_phases: None,
            restarts: 0,
            last_error: None,
            started_from: None,
            waiting: None,
        }
    }
}

/// An instance: desired and observed state together, as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Instance {
    /// Random and never reused; names the instance's files and devices.
    pub id: String,
    pub spec: InstanceSpec,
    /// The resolved image id.
    pub image_id: String,
    pub image_name: String,
    pub mem_mib: u64,
    pub created_at: u64,
    pub desired: DesiredState,
    pub nics: Vec<NicStatus>,
    pub status: InstanceStatus,
    /// The config as last acknowledged by the guest or written by the host.
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::BTreeMap<String, String>))]
    pub config: ConfigValues,
    /// The cluster node it runs on (cluster mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What the guest says of itself, asked when one instance is read and
    /// it runs (never stored; absent from listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<GuestHealth>,
}

/// A running guest's own report: whether it passes its health check, which
/// services are down, and how full its connection tracking table is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GuestHealth {
    /// It passes its health check.
    pub ready: bool,
    /// Supervised services that are not running (oneshots that failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services_down: Vec<String>,
    /// Its connection tracking table, when it tracks connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackTable>,
    /// The data volumes it mounted, and how full each is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeUsage>,
}

/// A data volume as the guest sees it: how much of it is in use, from
/// `statvfs` on its mount point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeUsage {
    /// The volume's name.
    pub name: String,
    /// Where the guest mounted it.
    pub path: String,
    /// Its filesystem's size for data, in bytes.
    pub total_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Bytes the appliance's services may still write (root's reserve not counted).
    pub available_bytes: u64,
    /// Writes fail or soon will: less than 1% (or 1 MiB) is left, or no inodes.
    #[serde(default)]
    pub full: bool,
}

impl VolumeUsage {
    /// Below this share of the total, a volume is full: writes are about
    /// to fail, whatever its size.
    pub const FULL_BELOW_PERCENT: u64 = 1;
    /// Below this many bytes, a volume is full however small it is.
    pub const FULL_BELOW_BYTES: u64 = 1 << 20;

    /// A guest's figures, with [`VolumeUsage::full`] worked out.
    pub fn new(
        name: String,
        path: String,
        total_bytes: u64,
        used_bytes: u64,
        available_bytes: u64,
        inodes_total: u64,
        inodes_available: u64,
    ) -> VolumeUsage {
        let threshold = (total_bytes / 100 * Self::FULL_BELOW_PERCENT).max(Self::FULL_BELOW_BYTES);
        let full = available_bytes < threshold || (inodes_total > 0 && inodes_available == 0);
        VolumeUsage {
            name,
            path,
            total_bytes,
            used_bytes,
            available_bytes,
            full,
        }
    }

    /// What a user should hear about it: `volume data at /var/lib/x is
    /// full`, or nothing.
    pub fn issue(&self) -> Option<String> {
        self.full
            .then(|| format!("volume {} at {} is full", self.name, self.path))
    }
}

/// A guest's connection tracking table: when full, new connections through
/// it are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConntrackTable {
    /// Connections tracked now.
    pub entries: u64,
    /// The most it holds (the appliance's `conntrack_max`, or its default).
    pub max: u64,
    /// Packets dropped since the guest booted because the table was full.
    pub dropped: u64,
}

/// The first line of the body of `POST /v1/instances/{name}/exec` (see [`crate::ExecEvent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program (looked up in the guest's PATH) and its arguments.
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub argv: Vec<String>,
    /// Seconds before the command is killed (exit code 124); 30 when absent.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub timeout_secs: Option<u64>,
    /// The rest of the request body is the command's stdin; without it stdin is empty.
    #[serde(default)]
    pub stdin: bool,
}

/// A whole exec, as `vroom exec --json` prints it. Output is text with
/// invalid UTF-8 replaced, at most [`crate::MAX_EXEC_RESULT_BYTES`]
/// of each stream (the `*_truncated` flags say when more was left out); the
/// exec stream carries the exact bytes, all of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// `stdout` holds only the first 256 KiB the command wrote.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// `stderr` holds only the first 256 KiB the command wrote.
    #[serde(default)]
    pub stderr_truncated: bool,
    /// Why the command did not exit by itself (timeout, signal, not found).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_a_volume_is_full() {
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        // (total, available, inodes total, inodes available, full)
        let cases = [
            (10 * GIB, 5 * GIB, 2000, 1000, false),
            (10 * GIB, 110 * MIB, 2000, 1000, false),
            // 1% of 10 GiB is 102.4 MiB.
            (10 * GIB, 100 * MIB, 2000, 1000, true),
            (10 * GIB, 0, 2000, 1000, true),
            // Small volumes: 1 MiB is the floor.
            (16 * MIB, MIB, 2000, 1000, false),
            (16 * MIB, MIB - 1, 2000, 1000, true),
            // Out of inodes with space left.
            (10 * GIB, 5 * GIB, 2000, 0, true),
            // A filesystem without inode counts (f_files 0).
            (10 * GIB, 5 * GIB, 0, 0, false),
        ];
        for (total, available, inodes_total, inodes_available, full) in cases {
            let usage = VolumeUsage::new(
                "data".into(),
                "/var/lib/x".into(),
                total,
                total - available,
                available,
                inodes_total,
                inodes_available,
            );
            assert_eq!(usage.full, full, "{total} {available} {inodes_available}");
            assert_eq!(
                usage.issue(),
                full.then(|| "volume data at /var/lib/x is full".to_string())
            );
        }
    }

    /// Health from a vroomd before volumes reads, and without volumes the
    /// JSON is what it was.
    #[test]
    fn guest_health_without_volumes_is_unchanged() {
        let json = r#"{"ready":true}"#;
        let health: GuestHealth = serde_json::from_str(json).unwrap();
        assert!(health.volumes.is_empty());
        assert_eq!(serde_json::to_string(&health).unwrap(), json);
    }

    #[test]
    fn nic_specs_table() {
        let ok = |net: &str, ip: Option<[u8; 4]>| NicSpec {
            network: Name::new(net).unwrap(),
            ip: ip.map(Ipv4Addr::from),
            role: None,
        };
        let with_role = |role: &str, spec: NicSpec| NicSpec {
            role: Some(Name::new(role).unwrap()),
            ..spec
        };
        let cases: &[(&str, Option<NicSpec>)] = &[
            ("lan", Some(ok("lan", None))),
            ("wan=uplink", Some(with_role("wan", ok("uplink", None)))),
            (
                "lan=office:10.0.0.5",
                Some(with_role("lan", ok("office", Some([10, 0, 0, 5])))),
            ),
            ("=office", None),
            ("lan=", None),
            ("a=b=c", None),
            ("lan:10.0.0.5", Some(ok("lan", Some([10, 0, 0, 5])))),
            ("lan:", None),
            ("lan:10.0.0", None),
            ("Lan", None),
            (":10.0.0.1", None),
        ];
        for (raw, want) in cases {
            assert_eq!(raw.parse::<NicSpec>().ok(), *want, "nic {raw:?}");
        }
    }
}
