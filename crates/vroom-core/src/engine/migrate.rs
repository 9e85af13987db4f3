//! Live migration, the engine's half. The cluster layer carries the
//! streams between nodes and hands ownership over; the engine moves the VM:
//!
//! - the source ([`Engine::send_live`]) streams its running VM into a
//!   socket the cluster connected to the destination's VMM, and returns the
//!   config volume's bytes once the VM has paused for good;
//! - the destination ([`Engine::receive_live`]) creates the instance with
//!   its identity, launches its VMM `incoming`, reads the stream, writes the
//!   source's config volume in place, lets the cluster take ownership, and
//!   only then lets the VM run.
//!
//! While a VM streams out, a marker in its run dir tells the next daemon
//! that a pause it finds may be the migration's: a VM whose migration did
//! not hand it over runs again ([`Engine::resume_unmigrated`]).

use std::os::fd::{AsFd, OwnedFd};

use super::snapshots::{clear_marker, set_marker, StateSource};
use super::*;
use crate::cluster::Identity;
use crate::driver::{LiveStats, VmRunState};

/// In an instance's dir while its VM streams out to another node.
const MIGRATE_MARKER: &str = "migrating";

/// Blocking: hands over the socket the source's VMM streams into.
pub type ChannelFn = Box<dyn FnOnce() -> Result<OwnedFd, OpError> + Send>;
/// Blocking: fills the config volume at the path and takes ownership.
pub type SwitchOverFn = Box<dyn FnOnce(&Path) -> Result<(), OpError> + Send>;

/// The destination's part of a live migration, driven by the cluster.
pub struct LiveIncoming {
    /// Blocking. Called once the VMM waits for its state: returns the
    /// connected socket the source's VMM streams into.
    pub channel: ChannelFn,
    /// Blocking. Called once the whole state is in (the VM still paused)
    /// with the config volume's path: fills it with the source's bytes and
    /// takes ownership of the instance. The VM runs only if this succeeds.
    pub switch_over: SwitchOverFn,
    /// Shown as `status.started_from`.
    pub label: String,
}

impl std::fmt::Debug for LiveIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveIncoming")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// What the source hands the destination at the switch-over.
#[derive(Debug)]
pub struct LiveOutgoing {
    pub stats: LiveStats,
    /// The config volume as the paused VM left it.
    pub volume: Vec<u8>,
}

impl Engine {
    /// Creates instance `req` with `identity` from a live migration instead
    /// of a boot. Any failure removes everything this call created.
    pub async fn receive(
        self: &Arc<Self>,
        req: RunRequest,
        identity: Identity,
        incoming: LiveIncoming,
    ) -> Result<Instance, OpError> {
        let label = incoming.label.clone();
        let source = StateSource {
            memory: PathBuf::new(),
            expected: vroom_types::SnapshotFile {
                bytes: 0,
                sha256: String::new(),
            },
            reload_volume: false,
            label,
            live: Some(Arc::new(Mutex::new(Some(incoming)))),
        };
        self.run_inner(req, Some(identity), Some(source)).await
    }

    /// Blocking: the destination's VMM reads the stream, then the cluster
    /// switches over, then the VM runs.
    pub(super) fn receive_live(
        &self,
        process: &VmProcess,
        volume: &Path,
        live: LiveIncoming,
    ) -> Result<(), OpError> {
        let channel = (live.channel)()?;
        self.driver
            .migrate_in(process, channel.as_fd())
            .map_err(|e| OpError::internal("the migration stream failed", e))?;
        drop(channel);
        (live.switch_over)(volume)?;
        self.driver
            .resume(process)
            .map_err(|e| OpError::internal("failed to start the migrated VM", e))
    }

    /// Streams running instance `name` into `channel` (connected to the
    /// destination's VMM). On success the VM stays paused, and the config
    /// volume's bytes are returned for the destination.
    pub async fn send_live(
        self: &Arc<Self>,
        name: &str,
        channel: OwnedFd,
    ) -> Result<LiveOutgoing, OpError> {
        // Its splices and mirrors go with it (the cluster made them on the
        // destination already); what cannot go keeps it here.
        if let Some(reason) = self.immovable_reason(name) {
            return Err(OpError::conflict(format!(
                "{name} cannot move to another node: {reason}"
            )));
        }
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        self.still_registered(name, &cell)?;
        let (process, state) = {
            let r = cell.lock();
            (r.process.clone(), r.instance.status.state)
        };
        let process = process
            .filter(|p| self.driver.is_alive(p) && state == InstanceState::Running)
            .ok_or_else(|| {
                OpError::conflict(format!(
                    "instance {name} is {}; only a running instance migrates",
                    super::snapshots::state_word(state)
                ))
            })?;
        blocking(|| set_marker(&cell.dir, MIGRATE_MARKER))?;
        let sent = blocking(|| {
            let stats = self
                .driver
                .migrate_out(&process, channel.as_fd())
                .map_err(|e| OpError::internal("the migration stream failed", e))?;
            let volume = std::fs::read(cell.volume())
                .map_err(|e| OpError::internal("failed to read the config volume", e))?;
            Ok(LiveOutgoing { stats, volume })
        });
        drop(channel);
        if sent.is_err() {
            // QEMU lets a VM whose migration failed run on; the marker goes
            // only once nothing can still hand it over.
            clear_marker(&cell.dir, MIGRATE_MARKER);
        }
        sent
    }

    /// After a migration out that did not hand the instance over (or a
    /// daemon restart in the middle of one): the VM runs again.
    pub async fn resume_unmigrated(&self, name: &str) -> Result<(), OpError> {
        let cell = self.cell(name)?;
        if !cell.dir.join(MIGRATE_MARKER).exists() {
            return Ok(());
        }
        let _op = cell.op.lock().await;
        let process = cell.lock().process.clone();
        if let Some(process) = process.filter(|p| self.driver.is_alive(p)) {
            // The stream may go on between the VMMs after the daemon that
            // started it died: nobody can finish that migration now.
            if let Err(e) = blocking(|| self.driver.cancel_migration(&process)) {
                tracing::warn!(instance = %name, error = %e, "cannot cancel an abandoned migration");
            }
            if let Ok(VmRunState::Paused) = blocking(|| self.driver.run_state(&process)) {
                tracing::warn!(instance = %name, "the migration did not hand the instance over; it runs here again");
                blocking(|| self.driver.resume(&process))
                    .map_err(|e| OpError::internal("failed to resume the VM", e))?;
            }
        }
        clear_marker(&cell.dir, MIGRATE_MARKER);
        Ok(())
    }

    /// Instances whose migration out a restarted daemon may have interrupted.
    pub fn migrating_out(&self) -> Vec<String> {
        self.cells()
            .into_iter()
            .filter(|c| c.dir.join(MIGRATE_MARKER).exists())
            .map(|c| c.snapshot().spec.name.to_string())
            .collect()
    }
}
