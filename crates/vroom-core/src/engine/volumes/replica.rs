//! This host's copy of a volume kept on two nodes (`--replicas 2`). The
//! cluster decides which copy is the primary; here are the two roles a copy
//! plays on its host:
//!
//! - **primary**: an instance runs on it, and its VMM mirrors every write
//!   synchronously to the other copy ([`Engine::replicate_volume`]);
//! - **replica**: a `qemu-nbd` serves it, writing through, on a unix socket
//!   that the cluster splices to the primary's proven peer connection
//!   ([`Engine::serve_replica`]). A copy is never both: the server
//!   is stopped before an instance may use the copy, and no copy an
//!   instance uses here is served.
//!
//! Serving a copy for a full copy empties it first (after a failover the
//! old primary may hold writes the new one never saw, so nothing is
//! merged); only the primary's paused replication, resuming, finds it as
//! it left it.

use std::os::fd::BorrowedFd;
use std::os::unix::fs::PermissionsExt;

use vroom_types::{ExportAddress, Volume, VolumeCreateRequest};
use vroom_volume::{data as datavol, nbd};

use super::super::*;
use crate::driver::ReplicaJob;

/// The NBD export name of a replica.
pub fn replica_export(volume: &str) -> String {
    format!("replica-{volume}")
}

impl Engine {
    fn replicas_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("replicas")
    }

    fn replica_pid_file(&self, volume: &str) -> PathBuf {
        self.replicas_dir().join(format!("{volume}.pid"))
    }

    /// Makes this host's copy of a cluster's volume (the cluster asked for
    /// it and keeps the volume's record): one of two replicas, or the only
    /// copy, kept for node `req.node`.
    pub async fn create_volume_copy(&self, req: &VolumeCreateRequest) -> Result<Volume, OpError> {
        req.validate()?;
        let _alloc = self.alloc.lock().await;
        let node = (req.replicas < 2)
            .then(|| req.node.as_ref().map(|n| n.to_string()))
            .flatten();
        self.create_volume_with(req.name.as_str(), req.size_mib, req.fs, req.replicas, node)
    }

    /// Where the server of this host's copy of `volume` listens.
    fn replica_socket(&self, volume: &str) -> PathBuf {
        self.replicas_dir().join(format!("{volume}.sock"))
    }

    /// Serves this host's copy of `volume` for the primary's VMM on a unix
    /// socket in the data dir, and returns its path: emptied first for a
    /// full copy (which fills it), or as it is for a replication that
    /// resumes where it stopped.
    ///
    /// **Why a unix socket, not a TCP port.** `qemu-nbd` has no
    /// authentication of its own, and a port on the network would let
    /// whoever reaches it while the primary is not connected write the
    /// copy that a failover promotes. The cluster carries the NBD stream
    /// over the primary's proven peer-port connection instead and splices
    /// it to this socket; only root on this host can connect to it (the
    /// directory is `0700`).
    pub async fn serve_replica(&self, volume: &str, empty: bool) -> Result<PathBuf, OpError> {
        let _alloc = self.alloc.lock().await;
        let record = self.volume_record(volume)?;
        // A cluster's volume with one copy is served while a live migration
        // copies it to this node.
        if record.replicas < 2 && record.node.is_none() {
            return Err(OpError::conflict(format!(
                "volume {volume} has one copy; it is not replicated"
            )));
        }
        if let Some(instance) = self.attached_to(volume) {
            return Err(OpError::conflict(format!(
                "volume {volume} is in use by instance {instance} on this node; it cannot be a replica here"
            )));
        }
        self.stop_replica_server(volume);
        let dir = self.replicas_dir();
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| OpError::internal("cannot make the replicas directory", e))?;
        let socket = self.replica_socket(volume);
        let listen = ExportAddress::parse(&format!("unix:{}", socket.display())).map_err(|e| {
            OpError::internal(
                "cannot name the replica's socket (a data dir path too long?)",
                e,
            )
        })?;
        let file = datavol::volume_file(&self.volumes_dir(), &record.id);
        let bytes = record.size_mib << 20;
        if empty {
            blocking(|| empty_file(&file, bytes))
                .map_err(|e| OpError::internal("cannot empty the replica's copy", e))?;
        }
        let pid_file = self.replica_pid_file(volume);
        let export = replica_export(volume);
        let _ = std::fs::remove_file(&socket);
        let serve = nbd::Serve {
            file: &file,
            export_name: &export,
            listen: &listen,
            pid_file: &pid_file,
            writable: true,
            durable: true,
            clients: 1,
        };
        let pid = blocking(|| nbd::serve(&serve))
            .map_err(|e| OpError::internal("cannot serve the replica", e))?;
        tracing::info!(volume, pid, %listen, "serving this node's copy as the replica");
        Ok(socket)
    }

    /// Whether this host serves its copy of `volume` as a replica.
    pub fn serves_replica(&self, volume: &str) -> bool {
        nbd::server_pid(&self.replica_pid_file(volume)).is_some()
    }

    /// Stops serving this host's copy of `volume` (before an instance may
    /// use it here); waits until the server is gone.
    pub fn stop_replica_server(&self, volume: &str) {
        let pid_file = self.replica_pid_file(volume);
        if let Some(pid) = nbd::server_pid(&pid_file) {
            tracing::info!(
                volume,
                pid,
                "no longer serving this node's copy as a replica"
            );
            if let Err(e) = nbd::stop(pid, &pid_file) {
                tracing::warn!(volume, error = %e, "cannot stop the replica's server");
            }
        }
        let _ = std::fs::remove_file(&pid_file);
        let _ = std::fs::remove_file(self.replica_socket(volume));
    }

    /// The volumes whose copy this host serves.
    pub fn served_replicas(&self) -> Vec<String> {
        nbd::servers_under(&self.replicas_dir())
            .into_iter()
            .filter_map(|(_, pid_file)| {
                pid_file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .collect()
    }

    /// The running VM of `instance` and the data disk index of `volume`.
    fn replicated_disk(&self, instance: &str, volume: &str) -> Result<(VmProcess, usize), OpError> {
        let cell = self.cell(instance)?;
        let index = cell
            .snapshot()
            .spec
            .volumes
            .iter()
            .position(|a| a.volume.as_str() == volume)
            .ok_or_else(|| {
                OpError::conflict(format!("instance {instance} does not use volume {volume}"))
            })?;
        let process = self
            .running_vm(&cell)
            .ok_or_else(|| OpError::conflict(format!("instance {instance} is not running")))?;
        Ok((process, index))
    }

    /// Starts mirroring `instance`'s writes to `volume` into the replica
    /// reached over `conn` (a connected stream; the VMM takes it over): a
    /// full copy, or (`resume`) the paused replication goes on to the same
    /// replica, sending only what it missed.
    pub fn replicate_volume(
        &self,
        instance: &str,
        volume: &str,
        conn: BorrowedFd<'_>,
        resume: bool,
    ) -> Result<(), OpError> {
        let (process, index) = self.replicated_disk(instance, volume)?;
        let export = replica_export(volume);
        let started = if resume {
            self.driver
                .resume_replicating(&process, index, conn, &export)
        } else {
            self.driver.replicate_disk(&process, index, conn, &export)
        };
        started.map_err(|e| OpError::internal("cannot start the replication", e))
    }

    /// The replication of `instance`'s `volume`, if it runs.
    ///
    /// `None` once its VM is gone (not merely stopping: a guest shutting
    /// down still writes, unmounting its volumes, and its replication must
    /// see those writes through). An error says nothing about the job.
    pub fn replica_job(&self, instance: &str, volume: &str) -> Result<Option<ReplicaJob>, OpError> {
        let Ok(cell) = self.cell(instance) else {
            return Ok(None);
        };
        let Some(index) = cell
            .snapshot()
            .spec
            .volumes
            .iter()
            .position(|a| a.volume.as_str() == volume)
        else {
            return Ok(None);
        };
        let process = cell.lock().process.clone();
        let Some(process) = process.filter(|p| self.driver.is_alive(p)) else {
            return Ok(None);
        };
        self.driver
            .replica_job(&process, index)
            .map_err(|e| OpError::internal("cannot read the replication's state", e))
    }

    /// Ends the replication of `instance`'s `volume`; it writes locally.
    pub fn stop_replicating(&self, instance: &str, volume: &str) -> Result<(), OpError> {
        let (process, index) = self.replicated_disk(instance, volume)?;
        self.driver
            .stop_replicating(&process, index)
            .map_err(|e| OpError::internal("cannot stop the replication", e))
    }
}

impl Engine {
    /// Kills `instance`'s VM at once: its replica fell behind and the
    /// cluster could not record it, so it must not write on alone (what
    /// it held was never acknowledged). Its supervisor starts it again
    /// when the cluster lets it.
    pub fn kill_vm(&self, instance: &str) -> Result<(), OpError> {
        let cell = self.cell(instance)?;
        let process = cell.lock().process.clone();
        if let Some(process) = process {
            tracing::warn!(instance, pid = process.pid, "killing the VM");
            self.driver
                .kill(&process)
                .map_err(|e| OpError::internal("cannot kill the VM", e))?;
        }
        Ok(())
    }
}

/// Empties `file` to `bytes` of zeros (holes), durably.
fn empty_file(file: &Path, bytes: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(file)?;
    f.set_len(0)?;
    f.set_len(bytes)?;
    f.sync_all()
}
