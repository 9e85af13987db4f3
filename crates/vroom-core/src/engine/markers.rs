//! Marker files in an instance's run dir. Each says that an operation that
//! leaves the VM in a state no record shows is under way, so that the next
//! daemon, finding it, finishes or undoes that operation:
//!
//! - [`SNAPSHOT_MARKER`]: a snapshot froze and paused the VM; it runs
//!   again (`recover_paused`);
//! - [`RESTORE_MARKER`]: the VM starts from a saved state or from a live
//!   migration's stream, and may not hold its own identity yet; it is
//!   killed and booted instead (`kill_interrupted_restore`);
//! - [`MIGRATE_MARKER`]: the VM streams out to another node; a pause found
//!   may be the migration's, and a VM nothing handed over runs again
//!   (`resume_unmigrated`).
//!
//! A marker is written durably (file and directory fsynced) before the
//! operation starts, and removed once the VM is as its record says.

use std::fs::File;
use std::path::Path;

use crate::error::OpError;

/// While a snapshot freezes and pauses the VM.
pub(super) const SNAPSHOT_MARKER: &str = "snapshotting";
/// While the VM starts from a saved state or a live migration's stream.
pub(super) const RESTORE_MARKER: &str = "restoring";
/// While the VM streams out to another node.
pub(super) const MIGRATE_MARKER: &str = "migrating";

/// Writes a marker file durably.
pub(super) fn set_marker(dir: &Path, name: &str) -> Result<(), OpError> {
    File::create(dir.join(name))
        .and_then(|f| f.sync_all())
        .and_then(|()| sync_dir(dir))
        .map_err(|e| OpError::internal(format!("failed to write {name}"), e))
}

pub(super) fn clear_marker(dir: &Path, name: &str) {
    let _ = std::fs::remove_file(dir.join(name));
}

/// Makes the entries of `dir` durable (a created, renamed or removed file).
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
