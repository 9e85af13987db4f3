//! Data volumes: persistent disks an appliance mounts (a database's data,
//! a mail spool), which outlive the instances that use them.
//!
//! A volume is created on its own (`vroom volume create`) or by `vroom run`
//! for what the image's recipe declares ([`VolumeDecl`]), and is attached
//! to at most one instance at a time ([`VolumeAttach`]). The guest checks
//! and mounts it before its services start, always `nodev,nosuid`, and
//! `noexec` unless the recipe says otherwise.

use serde::{Deserialize, Serialize};

use crate::{InvalidInputError, Name};

/// The filesystem vroom formats a new volume with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum VolumeFs {
    #[default]
    Ext4,
}

impl VolumeFs {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeFs::Ext4 => "ext4",
        }
    }
}

/// Smallest and largest volume, in MiB: ext4 with a journal needs a few
/// MiB; 16 TiB is ext4's limit with 4 KiB blocks and no 64bit feature
/// (vroom's mkfs leaves that on, but nobody runs such an appliance here).
pub const MIN_VOLUME_MIB: u64 = 16;
pub const MAX_VOLUME_MIB: u64 = 16 * 1024 * 1024;

/// Parses a volume size such as `2G`, `512M`, `1T` or `256` (MiB) into MiB,
/// within [`MIN_VOLUME_MIB`]..=[`MAX_VOLUME_MIB`].
pub fn parse_volume_size_mib(raw: &str) -> Result<u64, InvalidInputError> {
    let invalid = || InvalidInputError::VolumeSize {
        raw: raw.to_string(),
    };
    let s = raw.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let value: u64 = digits.parse().map_err(|_| invalid())?;
    let factor_mib: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return Err(invalid()),
    };
    value
        .checked_mul(factor_mib)
        .filter(|mib| (MIN_VOLUME_MIB..=MAX_VOLUME_MIB).contains(mib))
        .ok_or_else(invalid)
}

pub fn check_volume_mib(mib: u64) -> Result<u64, InvalidInputError> {
    if (MIN_VOLUME_MIB..=MAX_VOLUME_MIB).contains(&mib) {
        Ok(mib)
    } else {
        Err(InvalidInputError::OutOfRange {
            field: "size_mib",
            value: mib.to_string(),
            min: MIN_VOLUME_MIB,
            max: MAX_VOLUME_MIB,
        })
    }
}

/// Directories a volume must not be mounted over or under: the guest's
/// system (its programs, libraries and config come from the read-only
/// image), the kernel's filesystems and the config volume.
const SYSTEM_DIRS: &[&str] = &[
    "/bin", "/boot", "/config", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
    "/run", "/sbin", "/sys", "/usr",
];

/// Directories a volume must not replace whole, though it may go below
/// them (`/var/lib/postgresql` is fine, `/var` is not).
const SYSTEM_PARENTS: &[&str] = &["/", "/var", "/var/lib", "/tmp"];

/// Longest mount path vroom accepts.
pub const MAX_MOUNT_PATH_LEN: usize = 200;

/// Checks a guest mount path: absolute, normalized (no `.`, `..`, `//` or
/// trailing `/`), of plain characters, and not over a system directory.
pub fn check_mount_path(path: &str) -> Result<(), InvalidInputError> {
    let invalid = |reason: &'static str| InvalidInputError::MountPath {
        path: path.to_string(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(invalid("must be absolute"));
    }
    if path.len() > MAX_MOUNT_PATH_LEN {
        return Err(invalid("must be at most 200 characters"));
    }
    if !path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
    {
        return Err(invalid("may hold only letters, digits and / - _ ."));
    }
    if path != "/"
        && (path.ends_with('/')
            || path
                .split('/')
                .skip(1)
                .any(|part| part.is_empty() || part == "." || part == ".."))
    {
        return Err(invalid("must be normalized (no //, ., .. or trailing /)"));
    }
    let under = |dir: &str| path == dir || path.starts_with(&format!("{dir}/"));
    if SYSTEM_DIRS.iter().any(|dir| under(dir)) || SYSTEM_PARENTS.contains(&path) {
        return Err(invalid("is a system directory of the guest"));
    }
    Ok(())
}

/// A volume an appliance declares in its recipe (`[[volumes]]`): `vroom
/// run` creates `INSTANCE-NAME` with this size when the user names none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeDecl {
    /// The volume's role in the appliance, e.g. `data`.
    pub name: Name,
    /// Where the guest mounts it.
    pub path: String,
    /// The size of a volume `vroom run` creates for it.
    pub size_mib: u64,
    #[serde(default)]
    pub fs: VolumeFs,
    /// Programs on it may run (mounted without `noexec`).
    #[serde(default)]
    pub exec: bool,
}

/// A volume attached to an instance: `--volume NAME:/path[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeAttach {
    pub volume: Name,
    /// Where the guest mounts it; must not be a system directory.
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

impl VolumeAttach {
    /// Parses `NAME:/path` or `NAME:/path:ro` (or `:rw`).
    pub fn parse(raw: &str) -> Result<Self, InvalidInputError> {
        let invalid = || InvalidInputError::VolumeAttach {
            raw: raw.to_string(),
        };
        let mut parts = raw.split(':');
        let (Some(name), Some(path)) = (parts.next(), parts.next()) else {
            return Err(invalid());
        };
        let read_only = match parts.next() {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(_) => return Err(invalid()),
        };
        if parts.next().is_some() {
            return Err(invalid());
        }
        let attach = VolumeAttach {
            volume: Name::new(name)?,
            path: path.to_string(),
            read_only,
        };
        attach.validate()?;
        Ok(attach)
    }

    pub fn validate(&self) -> Result<(), InvalidInputError> {
        check_mount_path(&self.path)
    }
}

/// The body of `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeCreateRequest {
    pub name: Name,
    #[cfg_attr(feature = "openapi", schema(minimum = 16, maximum = 16777216))]
    #[serde(deserialize_with = "crate::json_int::required")]
    pub size_mib: u64,
    #[serde(default)]
    pub fs: VolumeFs,
    /// Copies kept on distinct nodes: 1, or 2 in a cluster (synchronous).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2))]
    #[serde(
        default = "one_replica",
        deserialize_with = "crate::json_int::required"
    )]
    pub replicas: u8,
    /// In a cluster: the node that keeps the volume (with 2 replicas, its
    /// primary copy); the node asked when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    /// In a cluster, with 2 replicas: the node that keeps the replica; the
    /// scheduler chooses when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_node: Option<Name>,
}

fn one_replica() -> u8 {
    1
}

impl VolumeCreateRequest {
    pub fn validate(&self) -> Result<(), InvalidInputError> {
        check_volume_mib(self.size_mib)?;
        if !(1..=2).contains(&self.replicas) {
            return Err(InvalidInputError::OutOfRange {
                field: "replicas",
                value: self.replicas.to_string(),
                min: 1,
                max: 2,
            });
        }
        if self.replicas < 2 && self.replica_node.is_some() {
            return Err(InvalidInputError::ReplicaNodeWithOneCopy);
        }
        Ok(())
    }
}

/// The body of `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeResizeRequest {
    /// The new size; volumes only grow.
    #[cfg_attr(feature = "openapi", schema(minimum = 16, maximum = 16777216))]
    #[serde(deserialize_with = "crate::json_int::required")]
    pub size_mib: u64,
}

/// A volume, as listed and inspected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Volume {
    pub id: String,
    pub name: Name,
    pub size_mib: u64,
    pub fs: VolumeFs,
    pub replicas: u8,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The instance it is attached to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<Name>,
    /// Bytes the volume takes on the host's disk (it is sparse).
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Its snapshots, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<VolumeSnapshot>,
    /// Its NBD export, while it has one (`vroom volume export`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<VolumeExport>,
    /// Where its two copies are, for a volume kept on two nodes of a
    /// cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<VolumeReplication>,
    /// The node that keeps it, for a cluster's volume with one copy: its
    /// instance runs there and nowhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A volume kept on two nodes: the primary's copy is the one its instance
/// uses; every write reaches the replica's copy before the guest sees it
/// complete while the replica is up to date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeReplication {
    pub primary: String,
    pub replica: String,
    pub state: ReplicaState,
    /// Rises on every change of primary.
    pub epoch: u64,
    /// Seconds since the Unix epoch the replica is in this state.
    pub since: u64,
    /// Why the replica is not up to date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// While syncing: bytes copied, of `sync_total_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_total_bytes: Option<u64>,
    /// The last copy that made the replica up to date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<SyncReport>,
}

/// A copy from the primary that made the replica up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncReport {
    /// Only what the replica missed (the same replica back after a short
    /// outage), or everything (`false`).
    pub incremental: bool,
    /// Bytes sent to the replica.
    pub bytes: u64,
    pub ms: u64,
    /// When it ended, seconds since the Unix epoch.
    pub at: u64,
}

/// How far a volume's replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// It has every write the guest saw complete: it may become primary.
    UpToDate,
    /// A full copy from the primary is under way: never promoted.
    Syncing,
    /// It misses writes (its node was lost or cut off, or the primary
    /// changed): never promoted; the next sync makes it whole again.
    Outdated,
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaState::UpToDate => "UpToDate",
            ReplicaState::Syncing => "Syncing",
            ReplicaState::Outdated => "Outdated",
        })
    }
}

/// A volume's content at one point in time: a sparse copy on the same host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeSnapshot {
    /// Unique among every volume's snapshots.
    pub name: Name,
    pub created_at: u64,
    /// The volume's size when it was taken.
    pub size_mib: u64,
    /// Bytes the copy holds (the volume's data; holes stay holes).
    pub bytes: u64,
    /// How it was taken from a running guest: `frozen` (its filesystems
    /// flushed and frozen, then its CPUs paused: consistent), `paused`
    /// (CPUs paused only: what a power cut would leave, which the journal
    /// replays), or `offline` (no guest had it running).
    pub taken: SnapshotTaken,
    /// How long the guest was held for the copy, in milliseconds.
    #[serde(default)]
    pub pause_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SnapshotTaken {
    Frozen,
    Paused,
    Offline,
}

/// The body of `POST /v1/volumes/{name}/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeSnapshotRequest {
    /// `VOLUME-YYYYMMDD-HHMMSS` when absent.
    #[serde(default)]
    pub name: Option<Name>,
}

/// The body of `POST /v1/volumes/{name}/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeRestoreRequest {
    /// One of this volume's snapshots.
    pub snapshot: Name,
}

/// The body of `POST /v1/volume-snapshots/{snapshot}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeCloneRequest {
    /// The new volume's name.
    pub name: Name,
}

/// Where an NBD export listens: `unix:PATH` (an absolute path) or
/// `tcp:ADDR:PORT` (an IP address; IPv6 in brackets: `tcp:[::1]:10809`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportAddress {
    Unix(String),
    Tcp(std::net::SocketAddr),
}

impl ExportAddress {
    pub fn parse(raw: &str) -> Result<Self, InvalidInputError> {
        let invalid = |reason: &'static str| InvalidInputError::ExportAddress {
            raw: raw.to_string(),
            reason,
        };
        if let Some(path) = raw.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(invalid("a unix socket path must be absolute"));
            }
            // sun_path holds 108 bytes with its NUL.
            if path.len() > 107 {
                return Err(invalid("a unix socket path must be at most 107 bytes"));
            }
            if path.ends_with('/')
                || path
                    .split('/')
                    .skip(1)
                    .any(|p| p.is_empty() || p == "." || p == "..")
                || path.chars().any(|c| c.is_control() || c == '?' || c == '#')
            {
                return Err(invalid("a unix socket path must be normalized and plain"));
            }
            return Ok(ExportAddress::Unix(path.to_string()));
        }
        if let Some(addr) = raw.strip_prefix("tcp:") {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| invalid("expected tcp:ADDR:PORT with an IP address"))?;
            if addr.port() == 0 {
                return Err(invalid("the port must not be 0"));
            }
            return Ok(ExportAddress::Tcp(addr));
        }
        Err(invalid("expected unix:PATH or tcp:ADDR:PORT"))
    }

    /// The NBD URI of export `name` at this address, as `qemu-img`,
    /// `nbdinfo` and `nbdcopy` take it.
    pub fn uri(&self, name: &str) -> String {
        match self {
            ExportAddress::Unix(path) => format!("nbd+unix:///{name}?socket={path}"),
            ExportAddress::Tcp(addr) => format!("nbd://{addr}/{name}"),
        }
    }
}

impl std::fmt::Display for ExportAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportAddress::Unix(path) => write!(f, "unix:{path}"),
            ExportAddress::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// The body of `POST /v1/volumes/{name}/export`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeExportRequest {
    /// Export this snapshot of the volume instead of the volume itself.
    #[serde(default)]
    pub snapshot: Option<Name>,
    /// `unix:PATH` or `tcp:ADDR:PORT`; a unix socket under the data dir
    /// when absent. Only root may name a unix path or a port below 1024.
    #[serde(default)]
    pub listen: Option<String>,
    /// For a backup: when a running instance has the volume, export a
    /// snapshot taken now (removed with the export) instead of refusing;
    /// the export ends if vroomd restarts.
    #[serde(default)]
    pub backup: bool,
}

/// The body of `POST /v1/volumes/{name}/import`: the new volume's size. The
/// answer is a writable export the client writes the image into, then
/// `POST /v1/volumes/{name}/import/commit` makes it a volume (or
/// `DELETE /v1/volumes/{name}/export` drops it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeImportRequest {
    #[cfg_attr(feature = "openapi", schema(minimum = 16, maximum = 16777216))]
    #[serde(deserialize_with = "crate::json_int::required")]
    pub size_mib: u64,
}

/// What an export is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    /// `vroom volume export`: read-only, kept across vroomd restarts.
    Export,
    /// `vroom volume backup`: read-only, ends with the backup.
    Backup,
    /// `vroom volume import`: writable, into a volume not made yet.
    Import,
}

/// A volume (or one of its snapshots) served over NBD by a `qemu-nbd`
/// process vroomd started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeExport {
    pub volume: Name,
    /// The snapshot served, when it is not the volume itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Name>,
    /// The snapshot was taken for this export and goes with it.
    #[serde(default)]
    pub temporary_snapshot: bool,
    pub kind: ExportKind,
    /// `unix:PATH` or `tcp:ADDR:PORT`.
    pub listen: String,
    /// The NBD export name.
    pub export_name: String,
    /// The NBD URI, e.g. `nbd+unix:///files?socket=/var/lib/vroom/exports/files.sock`.
    pub uri: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub writable: bool,
    /// The server's pid.
    #[serde(default)]
    pub pid: u32,
    pub created_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_addresses_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("unix:/run/x.sock", Some("unix:/run/x.sock")),
            ("tcp:127.0.0.1:10809", Some("tcp:127.0.0.1:10809")),
            ("tcp:[::1]:10809", Some("tcp:[::1]:10809")),
            ("tcp:0.0.0.0:1", Some("tcp:0.0.0.0:1")),
            ("unix:x.sock", None),
            ("unix:/a/../b", None),
            ("unix:/a//b", None),
            ("unix:/a/", None),
            ("unix:/a?b", None),
            ("tcp:localhost:10809", None),
            ("tcp:127.0.0.1", None),
            ("tcp:127.0.0.1:0", None),
            ("tcp:127.0.0.1:70000", None),
            ("10809", None),
            ("", None),
        ];
        for (raw, want) in cases {
            let got = ExportAddress::parse(raw).map(|a| a.to_string());
            assert_eq!(got.as_deref().ok(), *want, "{raw:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains("listen address"), "{e}");
            }
        }
        let long = format!("unix:/{}", "a".repeat(107));
        assert!(ExportAddress::parse(&long).is_err());
        assert_eq!(
            ExportAddress::parse("unix:/d/v.sock").unwrap().uri("v"),
            "nbd+unix:///v?socket=/d/v.sock"
        );
        assert_eq!(
            ExportAddress::parse("tcp:[::1]:10809").unwrap().uri("v"),
            "nbd://[::1]:10809/v"
        );
    }

    #[test]
    fn sizes_table() {
        let cases: &[(&str, Option<u64>)] = &[
            ("2G", Some(2048)),
            ("512M", Some(512)),
            ("16", Some(16)),
            ("15", None),
            ("1T", Some(1024 * 1024)),
            ("16T", Some(16 * 1024 * 1024)),
            ("17T", None),
            ("2g", Some(2048)),
            ("", None),
            ("G", None),
            ("-1G", None),
            ("1.5G", None),
            ("99999999999999999999T", None),
            ("18446744073709551615T", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_volume_size_mib(raw).ok(), *want, "{raw:?}");
        }
    }

    #[test]
    fn mount_paths_table() {
        let ok = [
            "/data",
            "/var/lib/postgresql",
            "/srv/www",
            "/home/u",
            "/var/spool/mail",
            "/tmp/x",
        ];
        for path in ok {
            assert!(check_mount_path(path).is_ok(), "{path}");
        }
        let bad = [
            "",
            "data",
            "/",
            "/etc",
            "/etc/x",
            "/usr/local",
            "/var",
            "/var/lib",
            "/dev/shm",
            "/proc",
            "/config",
            "/run/x",
            "/data/",
            "/a//b",
            "/a/../etc",
            "/a/./b",
            "/a b",
            "/a:b",
            "/lib64",
            "/tmp",
        ];
        for path in bad {
            let err = check_mount_path(path).unwrap_err().to_string();
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains("mount path"), "{err}");
        }
    }

    #[test]
    fn attachments_parse() {
        let a = VolumeAttach::parse("db:/var/lib/postgresql").unwrap();
        assert_eq!(a.volume.as_str(), "db");
        assert!(!a.read_only);
        assert!(VolumeAttach::parse("db:/data:ro").unwrap().read_only);
        assert!(!VolumeAttach::parse("db:/data:rw").unwrap().read_only);
        for bad in [
            "db",
            "db:",
            "db:/data:x",
            "db:/data:ro:x",
            "Db:/data",
            ":/data",
        ] {
            assert!(VolumeAttach::parse(bad).is_err(), "{bad}");
        }
        assert!(VolumeAttach::parse("db:/etc")
            .unwrap_err()
            .to_string()
            .contains("system directory"));
    }
}
