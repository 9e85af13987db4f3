//! Volume snapshots, restores and clones: sparse copies on this host, and
//! online growth.
//!
//! A snapshot of a volume whose instance runs holds the guest for the copy:
//! its data volumes are frozen first (`FIFREEZE` through the agent: what is
//! on the disks is a clean filesystem) and its CPUs paused, then resumed
//! and thawed; a guest that cannot freeze is only paused (what a power cut
//! would leave, which the journal replays). The pause lasts as long as the
//! copy of the volume's data: this is what a raw file on ext4 without
//! reflink costs (see docs/volumes.md).
//!
//! Locks: an operation on a volume whose instance may run takes the
//! instance's op lock before the allocation lock, the order instance
//! creation takes them in.

use std::time::Instant;

use vroom_agent_proto::{GuestReply, HostCommand};
use vroom_types::{
    SnapshotTaken, Volume, VolumeCloneRequest, VolumeResizeRequest, VolumeRestoreRequest,
    VolumeSnapshot, VolumeSnapshotRequest,
};
use vroom_volume::data as datavol;

use super::super::*;
use super::unix_now;
use crate::engine::markers::{clear_marker, set_marker, SNAPSHOT_MARKER};

/// How long a guest has to freeze its volumes before it is only paused.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(3);

impl Engine {
    /// The instance `volume` is attached to, if any, with its op lock held.
    pub(super) async fn lock_volume_user(
        &self,
        volume: &str,
    ) -> Option<(Arc<Cell>, tokio::sync::OwnedMutexGuard<()>)> {
        let instance = self.attached_to(volume)?;
        let cell = self.cell(instance.as_str()).ok()?;
        let op = cell.op.clone().lock_owned().await;
        Some((cell, op))
    }

    /// The running VM of a volume's instance.
    pub(super) fn running_vm(&self, cell: &Cell) -> Option<VmProcess> {
        let r = cell.lock();
        r.process.clone().filter(|p| {
            self.driver.is_alive(p) && r.instance.status.state == InstanceState::Running
        })
    }

    pub(super) fn find_volume_snapshot(
        &self,
        snapshot: &str,
    ) -> Result<(Volume, VolumeSnapshot), OpError> {
        self.volume_records()?
            .into_iter()
            .find_map(|v| {
                let s = v
                    .snapshots
                    .iter()
                    .find(|s| s.name.as_str() == snapshot)?
                    .clone();
                Some((v, s))
            })
            .ok_or_else(|| OpError::not_found("volume snapshot", snapshot))
    }

    pub(in crate::engine) async fn snapshot_volume_unlogged(
        &self,
        name: &str,
        req: VolumeSnapshotRequest,
    ) -> Result<VolumeSnapshot, OpError> {
        let user = self.lock_volume_user(name).await;
        let _alloc = self.alloc.lock().await;
        self.snapshot_volume_locked(name, req, user.as_ref().map(|(cell, _)| cell))
            .await
    }

    /// Takes a snapshot; the caller holds the allocation lock and, when
    /// an instance has the volume, its op lock (`user`).
    pub(super) async fn snapshot_volume_locked(
        &self,
        name: &str,
        req: VolumeSnapshotRequest,
        user: Option<&Arc<Cell>>,
    ) -> Result<VolumeSnapshot, OpError> {
        let mut volume = self.volume_record(name)?;
        let snapshot = match req.name {
            Some(s) => s,
            None => default_snapshot_name(name, unix_now())?,
        };
        if let Ok((of, _)) = self.find_volume_snapshot(snapshot.as_str()) {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "a volume snapshot named {snapshot} exists (of volume {})",
                    of.name
                ),
            ));
        }
        let dir = self.volumes_dir();
        let file = datavol::volume_file(&dir, &volume.id);
        let need = datavol::allocated_bytes(&file);
        let free = datavol::free_bytes(&dir)
            .map_err(|e| OpError::internal("cannot read the host's free space", e))?;
        if need > free {
            return Err(OpError::new(
                ErrorCode::HostUnsupported,
                format!(
                    "not enough disk space for a snapshot of volume {name}: it holds {} MiB, {} MiB are free",
                    need.div_ceil(1 << 20),
                    free >> 20
                ),
            ));
        }
        let target = datavol::snapshot_file(&dir, &volume.id, snapshot.as_str());
        let staging = datavol::staging_path(&target);
        std::fs::create_dir_all(datavol::snapshots_dir(&dir, &volume.id))
            .map_err(|e| OpError::internal("cannot make the snapshots directory", e))?;
        let _ = std::fs::remove_file(&staging);
        let copy = || datavol::copy_sparse(&file, &staging);
        let vm = user.and_then(|cell| Some((cell.clone(), self.running_vm(cell)?)));
        let (copied, taken, pause_ms) = match vm {
            None => (blocking(copy), SnapshotTaken::Offline, 0),
            Some((cell, process)) => {
                // A daemon killed while the guest is held finds the marker
                // and lets it run again (`recover_paused`).
                if let Err(e) = blocking(|| set_marker(&cell.dir, SNAPSHOT_MARKER)) {
                    let _ = std::fs::remove_file(&staging);
                    return Err(e);
                }
                let frozen = matches!(
                    cell.agent
                        .call(HostCommand::FreezeVolumes, FREEZE_TIMEOUT)
                        .await,
                    Ok(GuestReply::VolumesFrozen { .. })
                );
                let started = Instant::now();
                let paused = blocking(|| self.driver.pause(&process));
                let copied = match &paused {
                    Ok(()) => blocking(copy),
                    Err(_) => Err(std::io::Error::other("the VM could not be paused")),
                };
                let held_ms = started.elapsed().as_millis() as u64;
                let resumed = blocking(|| self.driver.resume(&process));
                if frozen {
                    if let Err(e) = cell
                        .agent
                        .call(HostCommand::ThawVolumes, AGENT_TIMEOUT)
                        .await
                    {
                        tracing::warn!(volume = name, error = %e, "the guest did not confirm the thaw (it thaws by itself)");
                    }
                }
                match resumed {
                    Ok(()) => clear_marker(&cell.dir, SNAPSHOT_MARKER),
                    Err(e) => {
                        tracing::error!(volume = name, error = %e, "cannot resume the VM after a volume snapshot")
                    }
                }
                paused.map_err(|e| OpError::internal("cannot pause the VM for the snapshot", e))?;
                let taken = match frozen {
                    true => SnapshotTaken::Frozen,
                    false => SnapshotTaken::Paused,
                };
                (copied, taken, held_ms)
            }
        };
        let bytes = copied.map_err(|e| {
            let _ = std::fs::remove_file(&staging);
            OpError::internal("cannot copy the volume", e)
        })?;
        let placed = std::fs::rename(&staging, &target)
            .and_then(|()| datavol::sync_dir(&datavol::snapshots_dir(&dir, &volume.id)));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&staging);
            return Err(OpError::internal("cannot keep the snapshot", e));
        }
        let snap = VolumeSnapshot {
            name: snapshot,
            created_at: unix_now(),
            size_mib: volume.size_mib,
            bytes,
            taken,
            pause_ms,
        };
        volume.snapshots.push(snap.clone());
        if let Err(e) = self.store.put_volume(&volume) {
            let _ = std::fs::remove_file(&target);
            return Err(OpError::internal("failed to record the snapshot", e));
        }
        tracing::info!(volume = name, snapshot = %snap.name, bytes, pause_ms, ?taken, "volume snapshot taken");
        Ok(snap)
    }

    /// Puts a volume back to one of its snapshots; its instance must not run.
    pub(in crate::engine) async fn restore_volume_unlogged(
        &self,
        name: &str,
        req: VolumeRestoreRequest,
    ) -> Result<Volume, OpError> {
        let user = self.lock_volume_user(name).await;
        let _alloc = self.alloc.lock().await;
        let mut volume = self.volume_record(name)?;
        refuse_replicated(&volume, "restore")?;
        let Some(snap) = volume
            .snapshots
            .iter()
            .find(|s| s.name == req.snapshot)
            .cloned()
        else {
            return Err(match self.find_volume_snapshot(req.snapshot.as_str()) {
                Ok((of, _)) => OpError::conflict(format!(
                    "snapshot {} is of volume {}, not {name}; `volume clone {}` makes a new volume of it",
                    req.snapshot, of.name, req.snapshot
                )),
                Err(e) => e,
            });
        };
        if let Some((cell, _)) = &user {
            if self.running_vm(cell).is_some() {
                return Err(OpError::conflict(format!(
                    "volume {name} is in use by running instance {}; stop it first",
                    cell.snapshot().spec.name
                )));
            }
        }
        let dir = self.volumes_dir();
        let source = datavol::snapshot_file(&dir, &volume.id, snap.name.as_str());
        let file = datavol::volume_file(&dir, &volume.id);
        blocking(|| datavol::copy_into_place(&source, &file))
            .map_err(|e| OpError::internal("cannot restore the volume", e))?;
        volume.size_mib = snap.size_mib;
        self.store
            .put_volume(&volume)
            .map_err(|e| OpError::internal("failed to record the restore", e))?;
        tracing::info!(volume = name, snapshot = %snap.name, "volume restored");
        Ok(self.volume_view(volume))
    }

    /// A new volume with a snapshot's content.
    pub(in crate::engine) async fn clone_volume_unlogged(
        &self,
        snapshot: &str,
        req: VolumeCloneRequest,
    ) -> Result<Volume, OpError> {
        let _alloc = self.alloc.lock().await;
        let (of, snap) = self.find_volume_snapshot(snapshot)?;
        if self.volume_record(req.name.as_str()).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a volume named {} already exists", req.name),
            ));
        }
        let dir = self.volumes_dir();
        let source = datavol::snapshot_file(&dir, &of.id, snap.name.as_str());
        let id = random_id();
        blocking(|| datavol::create_from(&dir, &id, req.name.as_str(), &source)).map_err(|e| {
            match e {
                datavol::CreateDataVolumeError::NoSpace { .. } => {
                    OpError::new(ErrorCode::HostUnsupported, e.to_string())
                }
                e => OpError::internal("failed to clone the volume", e),
            }
        })?;
        let volume = self.record_new_volume(id, req.name, snap.size_mib, of.fs, (1, None))?;
        tracing::info!(volume = %volume.name, snapshot, "volume cloned");
        Ok(self.volume_view(volume))
    }

    pub(in crate::engine) async fn remove_volume_snapshot_unlogged(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<(), OpError> {
        let _alloc = self.alloc.lock().await;
        self.stop_exports_of_snapshot(name, snapshot);
        self.remove_snapshot_only(name, snapshot)
    }

    /// Removes a snapshot's record, then its file; not its export (the
    /// caller holds the allocation lock).
    pub(super) fn remove_snapshot_only(&self, name: &str, snapshot: &str) -> Result<(), OpError> {
        let mut volume = self.volume_record(name)?;
        let before = volume.snapshots.len();
        volume.snapshots.retain(|s| s.name.as_str() != snapshot);
        if volume.snapshots.len() == before {
            return Err(OpError::not_found("volume snapshot", snapshot));
        }
        self.store
            .put_volume(&volume)
            .map_err(|e| OpError::internal("failed to remove the snapshot's record", e))?;
        let file = datavol::snapshot_file(&self.volumes_dir(), &volume.id, snapshot);
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(volume = name, snapshot, error = %e, "cannot remove the snapshot's file yet");
        }
        Ok(())
    }

    /// Grows a volume. A running guest sees its disk grow (QEMU's
    /// `block_resize`) and grows the mounted filesystem through its agent;
    /// otherwise it grows it when it next mounts it.
    pub(in crate::engine) async fn resize_volume_unlogged(
        &self,
        name: &str,
        req: VolumeResizeRequest,
    ) -> Result<Volume, OpError> {
        vroom_types::check_volume_mib(req.size_mib)?;
        let user = self.lock_volume_user(name).await;
        let _alloc = self.alloc.lock().await;
        let mut volume = self.volume_record(name)?;
        refuse_replicated(&volume, "grow")?;
        if let Some(node) = &volume.node {
            // The cluster's record keeps its size: a copy made for a move
            // has that size, and a grown source would not fit it.
            return Err(OpError::conflict(format!(
                "volume {name} is the cluster's (its one copy is on node {node}); vroom cannot grow a cluster's volume yet"
            )));
        }
        if req.size_mib < volume.size_mib {
            return Err(OpError::conflict(format!(
                "volume {name} is {} MiB; volumes only grow",
                volume.size_mib
            )));
        }
        let file = datavol::volume_file(&self.volumes_dir(), &volume.id);
        // The record first: a daemon killed before the file grew finds the
        // file smaller than its record and grows it (`sweep_volumes`).
        let old_mib = volume.size_mib;
        volume.size_mib = req.size_mib;
        self.store
            .put_volume(&volume)
            .map_err(|e| OpError::internal("failed to record the volume's size", e))?;
        if let Err(e) = blocking(|| datavol::grow(&file, name, req.size_mib)) {
            volume.size_mib = old_mib;
            let _ = self.store.put_volume(&volume);
            return Err(match e {
                datavol::GrowDataVolumeError::NoSpace { .. } => {
                    OpError::new(ErrorCode::HostUnsupported, e.to_string())
                }
                e => OpError::internal("failed to grow the volume", e),
            });
        }
        tracing::info!(volume = name, size_mib = req.size_mib, "volume grown");
        if let Some((cell, _)) = &user {
            if let Some(process) = self.running_vm(cell) {
                self.grow_in_guest(cell, &process, name, req.size_mib << 20)
                    .await;
            }
        }
        Ok(self.volume_view(volume))
    }

    /// Tells a running guest its volume grew. Not fatal: the guest grows
    /// the filesystem at its next mount anyway.
    async fn grow_in_guest(&self, cell: &Cell, process: &VmProcess, name: &str, bytes: u64) {
        let volumes = cell.snapshot().spec.volumes;
        let Some(index) = volumes.iter().position(|a| a.volume.as_str() == name) else {
            return;
        };
        if let Err(e) = blocking(|| self.driver.resize_disk(process, index, bytes)) {
            tracing::warn!(volume = name, error = %e, "the VM was not told its volume grew; the guest grows it at its next boot");
            return;
        }
        let serial = vroom_agent_proto::volume::data_disk_serial(index);
        match cell
            .agent
            .call(HostCommand::GrowVolume { serial }, Duration::from_secs(60))
            .await
        {
            Ok(GuestReply::VolumeGrown {
                before_bytes,
                after_bytes,
            }) => {
                tracing::info!(
                    volume = name,
                    before_bytes,
                    after_bytes,
                    "the guest grew the volume's filesystem"
                )
            }
            Ok(GuestReply::Error { message }) => {
                tracing::warn!(volume = name, error = %message, "the guest did not grow the volume's filesystem; it does at its next boot")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "the guest did not grow the volume's filesystem; it does at its next boot")
            }
        }
    }
}

/// `VOLUME-YYYYMMDD-HHMMSS`, the volume's part shortened to fit a name.
fn default_snapshot_name(volume: &str, now: u64) -> Result<Name, OpError> {
    let stamp = super::super::snapshots::default_name("", now);
    let room = vroom_types::MAX_NAME_LEN.saturating_sub(stamp.len());
    let prefix = volume[..volume.len().min(room)].trim_end_matches('-');
    Name::new(&format!("{prefix}{stamp}")).map_err(|e| {
        OpError::new(
            ErrorCode::InvalidArgument,
            format!("cannot make a snapshot name for volume {volume}: {e}; give it a --name"),
        )
    })
}

/// Growing or restoring changes one copy of a volume kept on two nodes
/// behind its replica's back: not yet.
fn refuse_replicated(volume: &Volume, what: &str) -> Result<(), OpError> {
    if volume.replicas < 2 {
        return Ok(());
    }
    Err(OpError::conflict(format!(
        "volume {} is kept on two nodes; vroom cannot {what} a replicated volume yet",
        volume.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_fit() {
        assert_eq!(
            default_snapshot_name("db-data", 0).unwrap().as_str(),
            "db-data-19700101-000000"
        );
        let long = format!("a{}", "0".repeat(31));
        let name = default_snapshot_name(&long, 0).unwrap();
        assert_eq!(name.as_str(), "a000000000000000-19700101-000000");
        assert_eq!(
            default_snapshot_name("abcdefghijklmno-rest", 0)
                .unwrap()
                .as_str(),
            "abcdefghijklmno-19700101-000000"
        );
    }
}
