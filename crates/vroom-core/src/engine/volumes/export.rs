//! Volume exports over NBD, and imports: the engine's half of `vroom volume
//! export | unexport | backup | import`.
//!
//! **What is served.** A point in time, read-only: a snapshot's file as it
//! is, or the volume's own file when no running instance has it (and then
//! no instance may start with it until it is unexported: see
//! [`Engine::refuse_exported`]). A volume a running instance has is refused
//! with a hint to export a snapshot, except for a backup, which takes a
//! snapshot for the export and removes it with the export: a backup is asked
//! for as one step and should not fail because the service runs, while an
//! export is long-lived and its cost (a copy of the volume's data, the
//! guest held for it) should be asked for by name.
//!
//! **Imports.** vroomd never opens a file a caller names: the CLI converts
//! the caller's image (as the caller, with the caller's permissions) into a
//! writable export of a staging file vroomd made
//! (`volumes/.new-<id>/volume.img`), then asks vroomd to commit it: the
//! server is stopped (it flushes), the file must hold an ext4 superblock,
//! and it is renamed into place and recorded like a new volume.
//!
//! **Records.** `DATA/exports/<volume>.json` (written to a temporary name
//! and renamed: whole or absent), with the server's pid file
//! `<volume>.pid` and the default socket `<volume>.sock` beside it. A
//! record is written before anything it names is made (the temporary
//! snapshot, the staging file, the server) and removed after all of it is
//! gone, so a daemon killed in between leaves a record that says what to
//! clean. At start ([`Engine::sweep_exports`]) a plain export whose server
//! still runs is kept; every other record (a backup's, an import's, a
//! server that is gone) is cleaned; servers under `DATA/exports/` that no
//! kept record names are stopped.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use vroom_types::{
    ExportAddress, ExportKind, Volume, VolumeExport, VolumeExportRequest, VolumeImportRequest,
    VolumeSnapshotRequest,
};
use vroom_volume::{data as datavol, nbd};

use super::super::*;
use super::unix_now;

/// An export as vroomd keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExportRecord {
    export: VolumeExport,
    /// An import's staging id (`volumes/.new-<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    import_id: Option<String>,
}

impl Engine {
    fn exports_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("exports")
    }

    fn export_file(&self, volume: &str) -> PathBuf {
        self.exports_dir().join(format!("{volume}.json"))
    }

    fn export_pid_file(&self, volume: &str) -> PathBuf {
        self.exports_dir().join(format!("{volume}.pid"))
    }

    fn export_record(&self, volume: &str) -> Option<ExportRecord> {
        let raw = std::fs::read(self.export_file(volume)).ok()?;
        serde_json::from_slice(&raw)
            .map_err(|e| tracing::warn!(volume, error = %e, "an unreadable export record"))
            .ok()
    }

    fn export_records(&self) -> Vec<ExportRecord> {
        let Ok(entries) = std::fs::read_dir(self.exports_dir()) else {
            return vec![];
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                self.export_record(name.strip_suffix(".json")?)
            })
            .collect()
    }

    fn put_export_record(&self, record: &ExportRecord) -> Result<(), OpError> {
        let file = self.export_file(record.export.volume.as_str());
        let tmp = file.with_extension("json.tmp");
        let written = serde_json::to_vec(record)
            .map_err(std::io::Error::other)
            .and_then(|raw| {
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, &raw)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &file))
            .and_then(|()| datavol::sync_dir(&self.exports_dir()));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            OpError::internal("failed to record the export", e)
        })
    }

    /// `DATA/exports`, for root and the API group like the API socket: the
    /// data dir's group may search it (0710) and use the sockets in it (0660).
    fn prepare_exports_dir(&self) -> Result<Option<u32>, OpError> {
        let dir = self.exports_dir();
        let gid = std::fs::metadata(&self.cfg.data_dir)
            .map(|m| m.gid())
            .ok()
            .filter(|gid| *gid != 0);
        let made = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                std::fs::set_permissions(
                    &dir,
                    std::fs::Permissions::from_mode(if gid.is_some() { 0o710 } else { 0o700 }),
                )
            })
            .and_then(|()| std::os::unix::fs::chown(&dir, Some(0), gid));
        made.map_err(|e| OpError::internal("cannot make the exports directory", e))?;
        Ok(gid)
    }

    /// The volume's export, as `volume ls` and `inspect` show it.
    pub(super) fn volume_export(&self, volume: &str) -> Option<VolumeExport> {
        self.export_record(volume)
            .filter(|r| r.export.kind != ExportKind::Import)
            .map(|r| r.export)
    }

    /// Refuses to start an instance with a volume whose own file is
    /// exported: the export is a point in time.
    pub(super) fn refuse_exported(&self, volume: &str) -> Result<(), OpError> {
        match self.volume_export(volume) {
            Some(e) if e.snapshot.is_none() => Err(OpError::conflict(format!(
                "volume {volume} is exported at {} as it is; `vroom volume unexport {volume}` first",
                e.listen
            ))),
            _ => Ok(()),
        }
    }

    /// Serves a volume, or one of its snapshots, read-only over NBD.
    /// `caller_uid` is the API caller's uid (`None` for root or a caller
    /// the server trusts as root): only root may name a unix socket path
    /// (vroomd would make it anywhere) or a TCP port below 1024.
    pub(in crate::engine) async fn export_volume_unlogged(
        &self,
        name: &str,
        req: VolumeExportRequest,
        caller_uid: Option<u32>,
    ) -> Result<VolumeExport, OpError> {
        let user = self.lock_volume_user(name).await;
        let _alloc = self.alloc.lock().await;
        let volume = self.volume_record(name)?;
        if let Some(existing) = self.export_record(name) {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "volume {name} is already exported at {}; `vroom volume unexport {name}` first",
                    existing.export.listen
                ),
            ));
        }
        let gid = self.prepare_exports_dir()?;
        let listen = self.listen_address(name, req.listen.as_deref(), caller_uid)?;
        let dir = self.volumes_dir();
        let (snapshot, temporary) = match &req.snapshot {
            Some(s) => {
                if !volume.snapshots.iter().any(|v| &v.name == s) {
                    return Err(match self.find_volume_snapshot(s.as_str()) {
                        Ok((of, _)) => OpError::conflict(format!(
                            "snapshot {s} is of volume {}, not {name}",
                            of.name
                        )),
                        Err(e) => e,
                    });
                }
                (Some(s.clone()), false)
            }
            None => match user.as_ref().filter(|(cell, _)| self.running_vm(cell).is_some()) {
                None => (None, false),
                Some((cell, _)) if !req.backup => {
                    return Err(OpError::conflict(format!(
                        "volume {name} is in use by running instance {}: export a snapshot of it (`vroom volume snapshot {name}`, then --snapshot), or stop the instance",
                        cell.snapshot().spec.name
                    )))
                }
                Some(_) => {
                    let raw = format!("{name}-x{}", &random_id()[..6]);
                    let tmp = Name::new(&raw)
                        .or_else(|_| Name::new(&format!("export-{}", &random_id()[..8])))?;
                    (Some(tmp), true)
                }
            },
        };
        let kind = if req.backup {
            ExportKind::Backup
        } else {
            ExportKind::Export
        };
        let mut record = ExportRecord {
            export: VolumeExport {
                volume: volume.name.clone(),
                snapshot: snapshot.clone(),
                temporary_snapshot: temporary,
                kind,
                listen: listen.to_string(),
                export_name: name.to_string(),
                uri: listen.uri(name),
                size_bytes: 0,
                writable: false,
                pid: 0,
                created_at: unix_now(),
            },
            import_id: None,
        };
        // On record before the snapshot and the server: a daemon killed
        // from here on leaves a record that names what to clean.
        self.put_export_record(&record)?;
        let served = async {
            if let Some(tmp) = snapshot.as_ref().filter(|_| temporary) {
                let req = VolumeSnapshotRequest {
                    name: Some(tmp.clone()),
                };
                self.snapshot_volume_locked(name, req, user.as_ref().map(|(cell, _)| cell))
                    .await
                    .map_err(|e| e.context("cannot snapshot the volume for its backup"))?;
            }
            let file = match &snapshot {
                Some(s) => datavol::snapshot_file(&dir, &volume.id, s.as_str()),
                None => datavol::volume_file(&dir, &volume.id),
            };
            record.export.size_bytes = std::fs::metadata(&file)
                .map_err(|e| OpError::internal("cannot read the volume's file", e))?
                .len();
            record.export.pid = self.start_server(&record, &file, &listen, gid)?;
            self.put_export_record(&record)
        };
        if let Err(e) = served.await {
            self.clean_export(&record);
            return Err(e);
        }
        tracing::info!(volume = name, snapshot = ?snapshot, listen = %listen, pid = record.export.pid, ?kind, "volume exported");
        Ok(record.export)
    }

    /// Where an export listens: the caller's address, checked, or
    /// `DATA/exports/<volume>.sock`.
    fn listen_address(
        &self,
        volume: &str,
        raw: Option<&str>,
        caller_uid: Option<u32>,
    ) -> Result<ExportAddress, OpError> {
        let member = caller_uid.filter(|uid| *uid != 0);
        let listen = match raw {
            None => ExportAddress::Unix(
                self.exports_dir()
                    .join(format!("{volume}.sock"))
                    .display()
                    .to_string(),
            ),
            Some(raw) => ExportAddress::parse(raw)?,
        };
        let refuse = |why: String| OpError::new(ErrorCode::InvalidArgument, why);
        match &listen {
            ExportAddress::Unix(path) => {
                let default = Path::new(path).parent() == Some(self.exports_dir().as_path());
                if let (Some(uid), Some(_), false) = (member, raw, default) {
                    return Err(refuse(format!(
                        "uid {uid} may not name a socket path (vroomd would make it as root); leave --listen out for a socket under the data dir, or use tcp:ADDR:PORT"
                    )));
                }
                // qemu-nbd would unlink whatever is there.
                if Path::new(path).symlink_metadata().is_ok() {
                    return Err(OpError::conflict(format!(
                        "cannot listen on {listen}: the address is in use (the path exists)"
                    )));
                }
            }
            ExportAddress::Tcp(addr) if addr.port() < 1024 => {
                if let Some(uid) = member {
                    return Err(refuse(format!(
                        "uid {uid} may not listen on port {} (below 1024); choose a port from 1024",
                        addr.port()
                    )));
                }
            }
            ExportAddress::Tcp(_) => {}
        }
        Ok(listen)
    }

    /// Starts the record's server on `file`; a unix socket gets the
    /// exports dir's access (root, and the API group when there is one).
    fn start_server(
        &self,
        record: &ExportRecord,
        file: &Path,
        listen: &ExportAddress,
        gid: Option<u32>,
    ) -> Result<u32, OpError> {
        let pid_file = self.export_pid_file(record.export.volume.as_str());
        let serve = nbd::Serve {
            file,
            export_name: &record.export.export_name,
            listen,
            pid_file: &pid_file,
            writable: record.export.writable,
            durable: false,
            clients: nbd::MAX_CLIENTS,
        };
        let pid = blocking(|| nbd::serve(&serve)).map_err(|e| match e {
            nbd::ServeNbdError::AddressTaken { .. } => OpError::conflict(e.to_string()),
            e => OpError::internal("cannot serve the volume", e),
        })?;
        if let ExportAddress::Unix(path) = listen {
            let mode = if gid.is_some() { 0o660 } else { 0o600 };
            let opened = std::os::unix::fs::chown(path, Some(0), gid).and_then(|()| {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            });
            if let Err(e) = opened {
                let _ = nbd::stop(pid, &pid_file);
                return Err(OpError::internal(
                    "cannot open the socket to the API group",
                    e,
                ));
            }
        }
        Ok(pid)
    }

    /// Ends a volume's export (or drops an import in progress).
    pub(in crate::engine) async fn unexport_volume_unlogged(
        &self,
        name: &str,
    ) -> Result<(), OpError> {
        let _alloc = self.alloc.lock().await;
        let record = self
            .export_record(name)
            .ok_or_else(|| OpError::not_found("volume export", name))?;
        self.clean_export(&record);
        tracing::info!(volume = name, "volume unexported");
        Ok(())
    }

    /// Stops a record's server, removes what it made (a temporary
    /// snapshot, an import's staging files, a socket left by a killed
    /// server), then the record: in that order, so a daemon killed in
    /// between still has the record to finish with. The caller holds the
    /// allocation lock (or is the start-up sweep).
    fn clean_export(&self, record: &ExportRecord) {
        let e = &record.export;
        let volume = e.volume.as_str();
        let pid_file = self.export_pid_file(volume);
        let pid = nbd::server_pid(&pid_file).unwrap_or(e.pid);
        if let Err(err) = blocking(|| nbd::stop(pid, &pid_file)) {
            tracing::warn!(volume, pid, error = %err, "cannot stop the export's server");
        }
        if let Ok(ExportAddress::Unix(path)) = ExportAddress::parse(&e.listen) {
            let is_socket = std::fs::symlink_metadata(&path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            if is_socket {
                let _ = std::fs::remove_file(&path);
            }
        }
        if let (Some(snapshot), true) = (&e.snapshot, e.temporary_snapshot) {
            match self.remove_snapshot_only(volume, snapshot.as_str()) {
                Ok(()) => {}
                Err(err) if err.code == ErrorCode::NotFound => {}
                Err(err) => {
                    tracing::warn!(volume, snapshot = %snapshot, error = %err.message, "cannot remove the export's snapshot")
                }
            }
        }
        if let Some(id) = &record.import_id {
            let _ = std::fs::remove_dir_all(datavol::staging_dir(&self.volumes_dir(), id));
        }
        let _ = std::fs::remove_file(self.export_file(volume));
    }

    /// Ends the export of a volume being removed.
    pub(super) fn stop_export_of_volume(&self, volume: &str) {
        if let Some(record) = self
            .export_record(volume)
            .filter(|r| r.export.kind != ExportKind::Import)
        {
            self.clean_export(&record);
        }
    }

    /// Ends the export of a snapshot being removed.
    pub(super) fn stop_exports_of_snapshot(&self, volume: &str, snapshot: &str) {
        if let Some(record) = self.export_record(volume).filter(|r| {
            r.export.kind != ExportKind::Import
                && r.export.snapshot.as_ref().map(|s| s.as_str()) == Some(snapshot)
        }) {
            let mut record = record;
            // The snapshot goes anyway: its removal is the caller's.
            record.export.temporary_snapshot = false;
            self.clean_export(&record);
        }
    }

    /// Starts an import: a staging file of `size_mib` served writable on a
    /// unix socket under the data dir, for the client to write the image
    /// into. No volume exists until [`Engine::commit_import`].
    pub(in crate::engine) async fn import_volume_unlogged(
        &self,
        name: &str,
        req: VolumeImportRequest,
    ) -> Result<VolumeExport, OpError> {
        vroom_types::check_volume_mib(req.size_mib)?;
        let name = Name::new(name)?;
        let _alloc = self.alloc.lock().await;
        if self.volume_record(name.as_str()).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a volume named {name} already exists"),
            ));
        }
        if self.export_record(name.as_str()).is_some() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("volume {name} is being imported; `vroom volume unexport {name}` drops that import"),
            ));
        }
        let gid = self.prepare_exports_dir()?;
        let listen = self.listen_address(name.as_str(), None, None)?;
        let id = random_id();
        let mut record = ExportRecord {
            export: VolumeExport {
                volume: name.clone(),
                snapshot: None,
                temporary_snapshot: false,
                kind: ExportKind::Import,
                listen: listen.to_string(),
                export_name: name.to_string(),
                uri: listen.uri(name.as_str()),
                size_bytes: req.size_mib << 20,
                writable: true,
                pid: 0,
                created_at: unix_now(),
            },
            import_id: Some(id.clone()),
        };
        self.put_export_record(&record)?;
        let dir = self.volumes_dir();
        let served = (|| {
            let file = blocking(|| datavol::stage_import(&dir, &id, name.as_str(), req.size_mib))
                .map_err(|e| match e {
                datavol::CreateDataVolumeError::NoSpace { .. } => {
                    OpError::new(ErrorCode::HostUnsupported, e.to_string())
                }
                e => OpError::internal("failed to stage the import", e),
            })?;
            record.export.pid = self.start_server(&record, &file, &listen, gid)?;
            self.put_export_record(&record)
        })();
        if let Err(e) = served {
            self.clean_export(&record);
            return Err(e);
        }
        tracing::info!(volume = %name, size_mib = req.size_mib, "volume import started");
        Ok(record.export)
    }

    /// Makes the volume an import wrote: its server stopped (and flushed),
    /// an ext4 superblock checked, the file renamed into place, the
    /// volume recorded. On any error the import is dropped whole.
    pub(in crate::engine) async fn commit_import_unlogged(
        &self,
        name: &str,
    ) -> Result<Volume, OpError> {
        let _alloc = self.alloc.lock().await;
        let record = self
            .export_record(name)
            .filter(|r| r.export.kind == ExportKind::Import)
            .ok_or_else(|| OpError::not_found("volume import", name))?;
        let Some(id) = record.import_id.clone() else {
            self.clean_export(&record);
            return Err(OpError::not_found("volume import", name));
        };
        let pid_file = self.export_pid_file(name);
        let pid = nbd::server_pid(&pid_file).unwrap_or(record.export.pid);
        let dir = self.volumes_dir();
        let made = (|| {
            blocking(|| nbd::stop(pid, &pid_file))
                .map_err(|e| OpError::internal("cannot stop the import's server", e))?;
            if self.volume_record(name).is_ok() {
                return Err(OpError::new(
                    ErrorCode::AlreadyExists,
                    format!("a volume named {name} was made meanwhile"),
                ));
            }
            blocking(|| datavol::finish_import(&dir, &id, name)).map_err(|e| match e {
                datavol::FinishImportError::NotExt4 { .. } => {
                    OpError::new(ErrorCode::InvalidVolume, e.to_string())
                }
                e => OpError::internal("failed to make the imported volume", e),
            })?;
            self.record_new_volume(
                id.clone(),
                record.export.volume.clone(),
                record.export.size_bytes >> 20,
                vroom_types::VolumeFs::Ext4,
                (1, None),
            )
        })();
        // The staging directory is gone once renamed; otherwise it goes now.
        self.clean_export(&record);
        let volume = made?;
        tracing::info!(volume = name, size_mib = volume.size_mib, "volume imported");
        Ok(self.volume_view(volume))
    }

    /// At start: keeps plain exports whose server still runs; cleans every
    /// other record (backups and imports end with the daemon that served
    /// them, and a server that is gone leaves only its record); stops
    /// servers under the exports dir that no kept record names, and removes
    /// files no kept record names.
    pub(super) fn sweep_exports(&self) {
        let mut kept = vec![];
        for mut record in self.export_records() {
            let volume = record.export.volume.clone();
            let pid = nbd::server_pid(&self.export_pid_file(volume.as_str()));
            let target = self.volume_record(volume.as_str()).ok().filter(|v| {
                record
                    .export
                    .snapshot
                    .as_ref()
                    .is_none_or(|s| v.snapshots.iter().any(|x| &x.name == s))
            });
            match (record.export.kind, pid, target) {
                (ExportKind::Export, Some(pid), Some(_)) => {
                    if pid != record.export.pid {
                        record.export.pid = pid;
                        let _ = self.put_export_record(&record);
                    }
                    tracing::info!(volume = %volume, pid, "kept a volume export");
                    kept.push(volume.to_string());
                }
                _ => {
                    tracing::info!(volume = %volume, kind = ?record.export.kind, "ending a volume export cut short");
                    self.clean_export(&record);
                }
            }
        }
        let dir = self.exports_dir();
        for (pid, pid_file) in nbd::servers_under(&dir) {
            let owner = pid_file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !kept.contains(&owner) {
                tracing::info!(pid, pid_file = %pid_file.display(), "stopping an NBD server no export owns");
                let _ = nbd::stop(pid, &pid_file);
            }
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let owner = file.split('.').next().unwrap_or_default();
            if !kept.iter().any(|k| k == owner) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}
