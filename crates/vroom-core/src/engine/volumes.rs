//! Data volumes: created, listed, grown and removed here; attached when an
//! instance is created (`attach_volumes`), opened by the VMM as files
//! (`data_disks`), mounted by the guest.
//!
//! A volume's record (the store's `volumes` table) is written only after
//! its file is whole ([`vroom_volume::data`]), and removed before its file
//! is: a daemon killed in between leaves a directory no record names, which
//! the next start removes ([`Engine::sweep_volumes`]). A volume is attached
//! to at most one instance: the one whose spec names it. Attaching and
//! removing both hold the allocation lock, so they cannot interleave.

use vroom_types::{Volume, VolumeAttach, VolumeCreateRequest, VolumeDecl, VolumeFs};
use vroom_volume::data::{self as datavol, CreateDataVolumeError};

use super::*;
use crate::driver::DataDisk;

/// Why a cluster refuses instances with data volumes.
pub const VOLUMES_STAY_LOCAL: &str = "in a cluster an instance's volumes must be the cluster's (one made before this host joined is not): make them with `vroom volume create NAME --size SIZE [--replicas 2]` (one copy keeps the instance on its node, two let it fail over) and attach them with `--volume NAME:PATH`";

impl Engine {
    pub(super) fn volumes_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("volumes")
    }

    fn volume_records(&self) -> Result<Vec<Volume>, OpError> {
        self.store
            .volumes()
            .map_err(|e| OpError::internal("failed to load volumes", e))
    }

    fn volume_record(&self, name: &str) -> Result<Volume, OpError> {
        self.volume_records()?
            .into_iter()
            .find(|v| v.name.as_str() == name)
            .ok_or_else(|| OpError::not_found("volume", name))
    }

    /// The instance a volume is attached to, if any.
    fn attached_to(&self, volume: &str) -> Option<Name> {
        self.instances
            .lock_unpoisoned()
            .iter()
            .find(|(_, cell)| {
                cell.lock()
                    .instance
                    .spec
                    .volumes
                    .iter()
                    .any(|a| a.volume.as_str() == volume)
            })
            .map(|(name, _)| name.clone())
    }

    /// The first of `attached` that has a single copy the cluster does not
    /// know, if any.
    pub(super) fn local_volume_of(&self, attached: &[VolumeAttach]) -> Option<Name> {
        // Unreadable records: nothing is known to have two copies.
        let records = self.volume_records().unwrap_or_default();
        attached
            .iter()
            .find(|a| {
                records
                    .iter()
                    .find(|v| v.name == a.volume)
                    // A cluster's volume with one copy is the cluster's
                    // to place (its instance is pinned to its node).
                    .is_none_or(|v| v.replicas < 2 && v.node.is_none())
            })
            .map(|a| a.volume.clone())
    }

    /// A record as the API shows it: with its attachment and disk usage.
    fn volume_view(&self, mut volume: Volume) -> Volume {
        volume.attached_to = self.attached_to(volume.name.as_str());
        volume.export = self.volume_export(volume.name.as_str());
        volume.allocated_bytes =
            datavol::allocated_bytes(&datavol::volume_file(&self.volumes_dir(), &volume.id));
        volume
    }

    pub fn list_volumes(&self) -> Result<Vec<Volume>, OpError> {
        let mut volumes: Vec<Volume> = self
            .volume_records()?
            .into_iter()
            .map(|v| self.volume_view(v))
            .collect();
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }

    pub fn volume(&self, name: &str) -> Result<Volume, OpError> {
        Ok(self.volume_view(self.volume_record(name)?))
    }

    pub(in crate::engine) async fn create_volume_unlogged(
        &self,
        req: VolumeCreateRequest,
    ) -> Result<Volume, OpError> {
        req.validate()?;
        if req.replicas > 1 {
            return Err(OpError::new(
                ErrorCode::HostUnsupported,
                "a volume with 2 replicas needs a cluster with a second node; this host is alone",
            ));
        }
        let _alloc = self.alloc.lock().await;
        self.create_volume_locked(req.name.as_str(), req.size_mib, req.fs)
    }

    /// Makes a volume (the caller holds the allocation lock).
    fn create_volume_locked(
        &self,
        name: &str,
        size_mib: u64,
        fs: VolumeFs,
    ) -> Result<Volume, OpError> {
        self.create_volume_with(name, size_mib, fs, 1, None)
    }

    /// Makes a volume with its number of replicas (the caller holds the
    /// allocation lock); `node`: the cluster node that keeps a cluster's
    /// volume with one copy.
    fn create_volume_with(
        &self,
        name: &str,
        size_mib: u64,
        fs: VolumeFs,
        replicas: u8,
        node: Option<String>,
    ) -> Result<Volume, OpError> {
        let name = Name::new(name)?;
        if self.volume_record(name.as_str()).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a volume named {name} already exists"),
            ));
        }
        let id = random_id();
        let dir = self.volumes_dir();
        blocking(|| datavol::create(&dir, &id, name.as_str(), size_mib, fs)).map_err(
            |e| match e {
                CreateDataVolumeError::NoSpace { .. } => {
                    OpError::new(ErrorCode::HostUnsupported, e.to_string())
                }
                e => OpError::internal("failed to create the volume", e),
            },
        )?;
        let volume = self.record_new_volume(id, name, size_mib, fs, (replicas, node))?;
        tracing::info!(volume = %volume.name, size_mib, replicas, "volume created");
        Ok(self.volume_view(volume))
    }

    /// Records a volume whose files `volumes/<id>/` are whole; removes
    /// them when the record cannot be written.
    fn record_new_volume(
        &self,
        id: String,
        name: Name,
        size_mib: u64,
        fs: VolumeFs,
        (replicas, node): (u8, Option<String>),
    ) -> Result<Volume, OpError> {
        let volume = Volume {
            id,
            name,
            size_mib,
            fs,
            replicas,
            created_at: unix_now(),
            attached_to: None,
            allocated_bytes: 0,
            snapshots: vec![],
            export: None,
            replication: None,
            node,
        };
        if let Err(e) = self.store.put_volume(&volume) {
            let _ = std::fs::remove_dir_all(datavol::volume_dir(&self.volumes_dir(), &volume.id));
            return Err(OpError::internal("failed to record the volume", e));
        }
        Ok(volume)
    }

    /// Removes a volume no instance uses, with its data.
    pub(in crate::engine) async fn remove_volume_unlogged(
        &self,
        name: &str,
    ) -> Result<(), OpError> {
        let _alloc = self.alloc.lock().await;
        self.remove_volume_locked(name)
    }

    fn remove_volume_locked(&self, name: &str) -> Result<(), OpError> {
        let volume = self.volume_record(name)?;
        if let Some(instance) = self.attached_to(name) {
            return Err(OpError::conflict(format!(
                "volume {name} is attached to instance {instance}; remove the instance first (its volumes stay unless `rm --volumes`)"
            )));
        }
        self.stop_export_of_volume(name);
        self.store
            .delete_volume(name)
            .map_err(|e| OpError::internal("failed to remove the volume's record", e))?;
        let dir = datavol::volume_dir(&self.volumes_dir(), &volume.id);
        if let Err(e) = blocking(|| std::fs::remove_dir_all(&dir)) {
            // The record is gone: the next start sweeps the directory.
            tracing::warn!(volume = name, error = %e, "cannot remove the volume's files yet");
        }
        tracing::info!(volume = name, "volume removed");
        Ok(())
    }

    /// At start: removes volume directories no record names (a creation or
    /// removal cut short), snapshot files no record names, the staging file
    /// of a restore cut short, and finishes growths a crash interrupted.
    pub(super) fn sweep_volumes(&self) -> Result<(), OpError> {
        // Exports first: an import cut short stops writing into its staging
        // directory before the directory goes.
        self.sweep_exports();
        let records = self.volume_records()?;
        let dir = self.volumes_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !records.iter().any(|v| v.id == name) {
                tracing::info!(dir = %entry.path().display(), "removing a volume cut short");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        for volume in records {
            let file = datavol::volume_file(&dir, &volume.id);
            // A restore cut short: the volume is still the old one.
            let _ = std::fs::remove_file(datavol::staging_path(&file));
            // Snapshots being taken or removed.
            if let Ok(entries) = std::fs::read_dir(datavol::snapshots_dir(&dir, &volume.id)) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let recorded = volume
                        .snapshots
                        .iter()
                        .any(|s| format!("{}.img", s.name) == name);
                    if !recorded {
                        tracing::info!(file = %entry.path().display(), "removing a volume snapshot cut short");
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
            match std::fs::metadata(&file) {
                Ok(meta) if meta.len() < volume.size_mib << 20 => {
                    if let Err(e) = datavol::grow(&file, volume.name.as_str(), volume.size_mib) {
                        tracing::error!(volume = %volume.name, error = %e, "cannot finish growing the volume");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(volume = %volume.name, file = %file.display(), error = %e, "the volume's file is missing")
                }
            }
        }
        Ok(())
    }

    /// Completes and checks the volumes of an instance being created (the
    /// caller holds the allocation lock): the image's declared volumes the
    /// user did not attach get `INSTANCE-ROLE` volumes, made when missing.
    /// Returns the attachments and the volumes this call made (to remove
    /// if the creation fails).
    pub(super) fn attach_volumes(
        &self,
        spec: &InstanceSpec,
        image: &BootImage,
    ) -> Result<(Vec<VolumeAttach>, Vec<Name>), OpError> {
        let decls = &image.manifest.appliance.volumes;
        let mut attach = spec.volumes.clone();
        for decl in decls {
            if attach.iter().any(|a| a.path == decl.path) {
                continue;
            }
            let name = format!("{}-{}", spec.name, decl.name);
            let volume = Name::new(&name).map_err(|_| {
                OpError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "the name {name:?} for the instance's {} volume is too long; name the instance shorter or attach a volume with --volume NAME:{}",
                        decl.name, decl.path
                    ),
                )
            })?;
            attach.push(VolumeAttach {
                volume,
                path: decl.path.clone(),
                read_only: false,
            });
        }
        if attach.is_empty() {
            return Ok((attach, vec![]));
        }
        if image.manifest.kernel.flavor == vroom_types::KernelFlavor::Debian {
            // Its initramfs loads the modules its recipe names; ext4 is
            // not among the base ones.
            return Err(OpError::new(
                ErrorCode::InvalidVolume,
                format!(
                    "image {} is built for Debian's kernel, which it does not give ext4: data volumes need an image built for vroom's kernel",
                    image.manifest.name
                ),
            ));
        }
        if spec.ephemeral && !spec.volumes.is_empty() {
            return Err(OpError::new(
                ErrorCode::InvalidVolume,
                "an ephemeral instance's volumes are made empty at every start: it takes only its image's declared volumes, not --volume",
            ));
        }
        let writable = &image.manifest.appliance.writable;
        for (i, a) in attach.iter().enumerate() {
            a.validate()?;
            if attach[..i].iter().any(|b| b.volume == a.volume) {
                return Err(OpError::new(
                    ErrorCode::InvalidVolume,
                    format!("volume {} is attached twice", a.volume),
                ));
            }
            if attach[..i].iter().any(|b| b.path == a.path) {
                return Err(OpError::new(
                    ErrorCode::InvalidVolume,
                    format!("two volumes are mounted at {}", a.path),
                ));
            }
            let declared = decls.iter().any(|d| d.path == a.path);
            let under_writable = writable
                .iter()
                .any(|w| a.path.starts_with(&format!("{}/", w.trim_end_matches('/'))));
            if !declared && !under_writable {
                return Err(OpError::new(
                    ErrorCode::InvalidVolume,
                    format!(
                        "cannot mount volume {} at {}: image {} has that path on its read-only root; use a path under {} or one its recipe declares",
                        a.volume,
                        a.path,
                        image.manifest.name,
                        writable.join(", ")
                    ),
                ));
            }
            if let Some(other) = self.attached_to(a.volume.as_str()) {
                return Err(OpError::conflict(format!(
                    "volume {} is attached to instance {other}",
                    a.volume
                )));
            }
        }
        let mut made = vec![];
        for a in &attach {
            if self.volume_record(a.volume.as_str()).is_ok() {
                if spec.ephemeral {
                    // Its first start would wipe what the volume kept.
                    self.remove_made_volumes(&made);
                    return Err(OpError::conflict(format!(
                        "volume {} exists, and an ephemeral instance makes its volumes empty at every start: remove the volume or name the instance otherwise",
                        a.volume
                    )));
                }
                continue;
            }
            let decl: Option<&VolumeDecl> = decls
                .iter()
                .find(|d| d.path == a.path && spec.volumes.iter().all(|s| s.path != d.path));
            let Some(decl) = decl else {
                self.remove_made_volumes(&made);
                return Err(OpError::not_found("volume", a.volume.as_str()));
            };
            match self.create_volume_locked(a.volume.as_str(), decl.size_mib, decl.fs) {
                Ok(_) => made.push(a.volume.clone()),
                Err(e) => {
                    self.remove_made_volumes(&made);
                    return Err(e.context(format!("cannot create volume {}", a.volume)));
                }
            }
        }
        Ok((attach, made))
    }

    /// New volumes for a clone of `snapshot` (whose files are in `dir`),
    /// made while the caller holds the allocation lock: each of the
    /// snapshot's data volumes copied as `CLONE-ROLE`, ROLE being the name
    /// the image declares for its path, or else the volume's own name.
    pub(super) fn clone_snapshot_volumes(
        &self,
        clone: &Name,
        snapshot: &vroom_types::Snapshot,
        dir: &Path,
        image: &BootImage,
    ) -> Result<(Vec<VolumeAttach>, Vec<Name>), OpError> {
        let mut attach = vec![];
        let mut made = vec![];
        for (i, (had, copy)) in snapshot
            .instance
            .spec
            .volumes
            .iter()
            .zip(&snapshot.data_volumes)
            .enumerate()
        {
            let role = image
                .manifest
                .appliance
                .volumes
                .iter()
                .find(|d| d.path == had.path)
                .map(|d| d.name.to_string())
                .unwrap_or_else(|| had.volume.to_string());
            let name = Name::new(&format!("{clone}-{role}")).map_err(|_| {
                OpError::new(
                    ErrorCode::InvalidArgument,
                    format!("the clone's volume name {clone}-{role} is too long; name the clone shorter"),
                )
            });
            let made_one = name.and_then(|name| {
                if self.volume_record(name.as_str()).is_ok() {
                    return Err(OpError::new(
                        ErrorCode::AlreadyExists,
                        format!("the clone's volume {name} exists; remove it or name the clone otherwise"),
                    ));
                }
                let id = random_id();
                let source = super::snapshots::data_volume_file(dir, i);
                let vols = self.volumes_dir();
                blocking(|| datavol::create_from(&vols, &id, name.as_str(), &source)).map_err(
                    |e| match e {
                        CreateDataVolumeError::NoSpace { .. } => {
                            OpError::new(ErrorCode::HostUnsupported, e.to_string())
                        }
                        e => OpError::internal("failed to copy the snapshot's volume", e),
                    },
                )?;
                self.record_new_volume(id, name.clone(), copy.size_mib, VolumeFs::Ext4, (1, None))?;
                Ok(name)
            });
            match made_one {
                Ok(name) => {
                    attach.push(VolumeAttach {
                        volume: name.clone(),
                        path: had.path.clone(),
                        read_only: had.read_only,
                    });
                    made.push(name);
                }
                Err(e) => {
                    self.remove_made_volumes(&made);
                    return Err(e);
                }
            }
        }
        Ok((attach, made))
    }

    /// Removes the volumes a failed creation made (the caller holds the
    /// allocation lock and the instance is gone).
    pub(super) fn remove_made_volumes(&self, made: &[Name]) {
        for name in made {
            if let Err(e) = self.remove_volume_locked(name.as_str()) {
                tracing::warn!(volume = %name, error = %e.message, "cannot remove a volume a failed run made");
            }
        }
    }

    /// Removes the volumes an instance had, after the instance is gone
    /// (`rm --volumes`).
    pub async fn remove_volumes(&self, volumes: &[VolumeAttach]) -> Result<(), OpError> {
        let _alloc = self.alloc.lock().await;
        for a in volumes {
            match self.remove_volume_locked(a.volume.as_str()) {
                Ok(()) => {}
                Err(e) if e.code == ErrorCode::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// An ephemeral instance's clean slate: its volumes formatted afresh.
    pub(super) fn reset_volumes(&self, instance: &Instance) -> Result<(), OpError> {
        let records = self.volume_records()?;
        for a in &instance.spec.volumes {
            let Some(volume) = records.iter().find(|v| v.name == a.volume) else {
                continue;
            };
            let file = datavol::volume_file(&self.volumes_dir(), &volume.id);
            blocking(|| datavol::reset(&file, volume.name.as_str(), volume.size_mib, volume.fs))
                .map_err(|e| OpError::internal("failed to reset a data volume", e))?;
        }
        Ok(())
    }

    /// The files of an instance's data volumes, in attachment order.
    pub(super) fn data_disks(&self, instance: &Instance) -> Result<Vec<DataDisk>, OpError> {
        if instance.spec.volumes.is_empty() {
            return Ok(vec![]);
        }
        let records = self.volume_records()?;
        instance
            .spec
            .volumes
            .iter()
            .map(|a| {
                let volume = records.iter().find(|v| v.name == a.volume).ok_or_else(|| {
                    OpError::conflict(format!(
                        "instance {}'s volume {} is gone",
                        instance.spec.name, a.volume
                    ))
                })?;
                self.refuse_exported(a.volume.as_str())?;
                Ok(DataDisk {
                    path: datavol::volume_file(&self.volumes_dir(), &volume.id),
                    read_only: a.read_only,
                    bytes: volume.size_mib << 20,
                })
            })
            .collect()
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

mod export;
mod replica;
mod snapshot;
#[cfg(test)]
mod tests;
