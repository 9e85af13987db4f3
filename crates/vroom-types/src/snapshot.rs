//! Snapshots: a VM's memory and device state, its config volume and its
//! record, captured together; restored into the same instance, cloned into
//! new ones, or kept per image as a warm start.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Accel, ConfigValues, Instance, Name};

/// What a snapshot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Taken by `vroom snapshot`.
    User,
    /// Taken by `vroom image warm`: an image booted once with its default
    /// config, which `vroom run` starts from instead of booting.
    Warm,
}

/// A complete snapshot, as listed and as stored (`snapshot.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    pub name: Name,
    pub kind: SnapshotKind,
    /// The instance as it was at the capture (its record, config included).
    pub instance: Instance,
    pub created_at: u64,
    /// The machine the state fits (VMM version, device layout, accelerator).
    pub machine: String,
    pub accel: Accel,
    /// The memory and device state, compressed (`memory.zst`).
    pub memory: SnapshotFile,
    /// The memory and device state before compression.
    pub state_bytes: u64,
    /// The config volume at the capture (`config.img`).
    pub volume: SnapshotFile,
    /// How long the guest was paused for the capture.
    pub pause_ms: u64,
    /// The instance's data volumes at the capture, in its order
    /// (`volumes/N.img`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_volumes: Vec<SnapshotVolume>,
}

/// A data volume in a snapshot of its instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotVolume {
    /// The volume the copy was taken of.
    pub volume: Name,
    /// Where the guest had it mounted.
    pub path: String,
    pub size_mib: u64,
    /// The copy (sparse: `bytes` is its length, the volume's size).
    pub file: SnapshotFile,
}

/// One file of a snapshot and its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotFile {
    pub bytes: u64,
    pub sha256: String,
}

impl Snapshot {
    /// The shape a VM must have to take this state: its memory, CPUs and NICs.
    pub fn shape(&self) -> VmShape {
        VmShape::of(&self.instance)
    }

    pub fn image_id(&self) -> &str {
        &self.instance.image_id
    }

    pub fn config(&self) -> &ConfigValues {
        &self.instance.config
    }
}

/// What a saved state needs of the VM it is loaded into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShape {
    pub image_id: String,
    pub mem_mib: u64,
    pub cpus: u32,
    pub nics: usize,
}

impl VmShape {
    pub fn of(instance: &Instance) -> Self {
        VmShape {
            image_id: instance.image_id.clone(),
            mem_mib: instance.mem_mib,
            cpus: instance.spec.cpus,
            nics: instance.nics.len(),
        }
    }

    /// Why a VM of shape `self` cannot take a state saved from `saved`.
    pub fn mismatch(&self, saved: &VmShape) -> Option<String> {
        if self.image_id != saved.image_id {
            return Some(format!(
                "it runs image {}, the snapshot image {}",
                short(&self.image_id),
                short(&saved.image_id)
            ));
        }
        if self.mem_mib != saved.mem_mib {
            return Some(format!(
                "it has {} MiB of memory, the snapshot {} MiB",
                self.mem_mib, saved.mem_mib
            ));
        }
        if self.cpus != saved.cpus {
            return Some(format!(
                "it has {} CPUs, the snapshot {}",
                self.cpus, saved.cpus
            ));
        }
        if self.nics != saved.nics {
            return Some(format!(
                "it has {} NICs, the snapshot {}",
                self.nics, saved.nics
            ));
        }
        None
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The body of `POST /v1/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The running instance to capture.
    pub instance: Name,
    /// The snapshot's name; `INSTANCE-YYYYMMDD-HHMMSS` when absent.
    #[serde(default)]
    pub name: Option<Name>,
    /// Shut the instance down after the capture instead of resuming it.
    #[serde(default)]
    pub stop: bool,
}

/// The body of `POST /v1/instances/{name}/restore`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub snapshot: Name,
}

/// The body of `POST /v1/images/{name}/warm`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    /// Guest memory in MiB of the instances that will start from it; the
    /// image's default when absent.
    #[cfg_attr(feature = "openapi", schema(minimum = 64, maximum = 1073741824))]
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    pub mem_mib: Option<u64>,
}

/// The body of `POST /v1/instances/{name}/archive`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ArchiveRequest {
    /// An absolute path on the daemon's host: a directory that does not
    /// exist yet (its parent must) or an empty one.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 4096, pattern = "^/")
    )]
    pub dir: String,
}

/// What `rm --archive` kept and wiped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArchiveReport {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub dir: PathBuf,
    /// The archived files, relative to `dir`, as listed in its `SHA256SUMS`.
    pub files: Vec<ArchivedFile>,
    /// The instance's files that were overwritten, then unlinked.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub wiped: Vec<PathBuf>,
    /// Whether the memory image is in the archive (the instance ran).
    pub memory: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArchivedFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The file in an archive that lists every other file's sha256, in
/// `sha256sum` format.
pub const ARCHIVE_MANIFEST: &str = "SHA256SUMS";

/// Parses a `sha256sum` listing: `(sha256, path)` per line.
pub fn parse_sha256sums(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let (hash, path) = line
                .split_once("  ")
                .ok_or_else(|| format!("line {}: not `SHA256  PATH`", i + 1))?;
            let valid = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
            let safe = !path.is_empty()
                && !path.starts_with('/')
                && path.split('/').all(|p| !p.is_empty() && p != "..");
            if !valid || !safe {
                return Err(format!("line {}: not `SHA256  PATH`", i + 1));
            }
            Ok((hash.to_ascii_lowercase(), path.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256sums_parse_and_refuse_paths_out_of_the_archive() {
        let hash = "a".repeat(64);
        assert_eq!(
            parse_sha256sums(&format!("{hash}  memory.zst\n\n{hash}  console/0.log\n")).unwrap(),
            vec![
                (hash.clone(), "memory.zst".into()),
                (hash.clone(), "console/0.log".into())
            ]
        );
        for bad in [
            format!("{hash} x"),
            format!("{hash}  /etc/passwd"),
            format!("{hash}  ../x"),
            format!("{hash}  a//b"),
            "abc  x".to_string(),
        ] {
            assert!(parse_sha256sums(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shapes_name_what_differs() {
        let shape = |mem_mib, nics| VmShape {
            image_id: "abc".into(),
            mem_mib,
            cpus: 1,
            nics,
        };
        assert_eq!(shape(128, 1).mismatch(&shape(128, 1)), None);
        assert_eq!(
            shape(256, 1).mismatch(&shape(128, 1)).unwrap(),
            "it has 256 MiB of memory, the snapshot 128 MiB"
        );
        assert_eq!(
            shape(128, 2).mismatch(&shape(128, 1)).unwrap(),
            "it has 2 NICs, the snapshot 1"
        );
    }
}
