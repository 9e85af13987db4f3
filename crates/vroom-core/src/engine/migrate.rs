//! Live migration, the engine's half. The cluster layer carries the
//! streams between nodes and hands ownership over; the engine moves the VM:
//!
//! - the source ([`Engine::send_live`]) streams its running VM into a
//!   socket the cluster connected to the destination's VMM, and returns the
//!   config volume's bytes once the VM has paused for good;
//! - the destination ([`Engine::receive_live`]) creates the instance with
//!   its identity, launches its VMM `incoming`, reads the stream, writes the
//!   source's config volume in place, lets the cluster take ownership, and
//!   only then lets the VM run;
//! - then the guest must answer here ([`Engine::verify_arrival`]): its
//!   agent replies to a health request and, if it was ready on the source
//!   ([`LiveIncoming::was_ready`]), reports itself ready (its health check
//!   passes) within [`LiveIncoming::answer_within`]. A guest that does
//!   not (its VMM died, or it hangs) is killed and the instance removed, so
//!   the receive fails: the cluster then gives the instance back to the
//!   source, whose paused copy runs on. A QEMU that reported a completed
//!   migration is no proof that the guest survived it.
//!
//! While a VM streams out, a marker in its run dir tells the next daemon
//! that a pause it finds may be the migration's: a VM whose migration did
//! not hand it over runs again ([`Engine::resume_unmigrated`]).

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

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
    /// How long the guest has, once it runs here, to answer its agent and
    /// report itself ready; the migration fails otherwise.
    pub answer_within: Duration,
    /// How long after that first answer it must still run and answer
    /// again: a guest whose memory did not survive the move may answer
    /// once and panic a moment later.
    pub settle: Duration,
    /// Whether the guest passed its health check on the source: only then
    /// must it pass it here; otherwise an answer of its agent is the proof
    /// (an unhealthy instance still moves, and a drain can evacuate it).
    pub was_ready: bool,
}

impl std::fmt::Debug for LiveIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveIncoming")
            .field("label", &self.label)
            .field("answer_within", &self.answer_within)
            .field("settle", &self.settle)
            .field("was_ready", &self.was_ready)
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

    /// After a live migration in: whether the guest answers here. It was
    /// running a moment ago, so it must answer its agent (and report itself
    /// ready, if it was on the source: `ready`) within `within`, and, after
    /// `settle` in which its VMM must not die, answer so again within
    /// `within`; a VMM that dies meanwhile fails it at once.
    pub(super) async fn verify_arrival(
        &self,
        cell: &Cell,
        process: &VmProcess,
        (within, settle): (Duration, Duration),
        ready: bool,
    ) -> Result<(), OpError> {
        self.first_answer(cell, process, within, ready).await?;
        if settle.is_zero() {
            return Ok(());
        }
        let exited = tokio::time::timeout(settle, self.driver.wait_exit(process))
            .await
            .is_ok();
        let again = if exited {
            Err(ArrivalCheck::VmmExited.reason(within))
        } else {
            // Polled, not asked once: on a loaded host one call may well
            // take longer than its cap.
            self.first_answer(cell, process, within, ready)
                .await
                .map_err(|e| e.message)
        };
        again.map_err(|reason| {
            OpError::new(
                ErrorCode::Internal,
                format!(
                    "the migrated guest answered, then failed {:.0}s later: {reason}",
                    settle.as_secs_f32()
                ),
            )
        })
    }

    /// The first answer of a migrated guest within `within`: a ready one if
    /// `ready`, else any.
    async fn first_answer(
        &self,
        cell: &Cell,
        process: &VmProcess,
        within: Duration,
        ready: bool,
    ) -> Result<(), OpError> {
        let started = Instant::now();
        // What it said last, if it ever answered: that says more than a
        // final call cut short by the deadline.
        let mut answered = None;
        loop {
            if !self.driver.is_alive(process) {
                return Err(OpError::new(
                    ErrorCode::Internal,
                    ArrivalCheck::VmmExited.reason(within),
                ));
            }
            let left = within.saturating_sub(started.elapsed());
            match cell
                .agent
                .health(left.clamp(HEALTH_POLL, AGENT_CALL_CAP))
                .await
            {
                Ok(report) if report.ready || !ready => return Ok(()),
                Ok(report) => {
                    answered = Some(ArrivalCheck::NotReady {
                        config_error: report.config_error,
                    })
                }
                Err(e) => {
                    tracing::debug!(instance = %cell.snapshot().spec.name, error = %e, "the migrated guest's agent did not answer yet")
                }
            }
            if started.elapsed() >= within {
                let last = answered.unwrap_or(ArrivalCheck::NoAnswer);
                return Err(OpError::new(ErrorCode::Internal, last.reason(within)));
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// Whether running instance `name`'s guest passes its health check now
    /// (what its destination must show after a migration).
    pub async fn guest_ready(&self, name: &str) -> bool {
        let Ok(cell) = self.cell(name) else {
            return false;
        };
        matches!(cell.agent.health(AGENT_CALL_CAP).await, Ok(report) if report.ready)
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
            // The marker goes only if the VM runs on (QEMU lets a VM whose
            // live copy failed run on; a VM stopped for the copy runs only
            // if the driver's recovery got through): a VM left paused keeps
            // it, so that `resume_unmigrated` lets it run once nothing can
            // hand it over.
            let running = blocking(|| self.driver.run_state(&process));
            if matches!(running, Ok(VmRunState::Running)) {
                clear_marker(&cell.dir, MIGRATE_MARKER);
            }
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

/// The longest a single health request waits while a migrated guest is
/// checked (the check as a whole has [`LiveIncoming::answer_within`]).
const AGENT_CALL_CAP: Duration = Duration::from_secs(2);

/// What the last look at a migrated guest found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ArrivalCheck {
    VmmExited,
    NoAnswer,
    NotReady { config_error: Option<String> },
}

impl ArrivalCheck {
    /// Why the migration fails, for the user.
    fn reason(&self, within: Duration) -> String {
        let secs = within.as_secs_f32();
        match self {
            ArrivalCheck::VmmExited => {
                "the migrated VM's QEMU exited right after it resumed".to_string()
            }
            ArrivalCheck::NoAnswer => {
                format!("the migrated guest did not answer its agent within {secs:.0}s")
            }
            ArrivalCheck::NotReady { config_error: None } => {
                format!("the migrated guest answered but did not pass its health check within {secs:.0}s")
            }
            ArrivalCheck::NotReady {
                config_error: Some(e),
            } => format!("the migrated guest cannot put its config in force: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::testing::{run_request, GuestBehavior, TestEngine};

    /// An incoming migration whose stream is a few bytes of "memory" and
    /// whose switch-over notes that it ran (the cluster's takeover).
    fn incoming(switched: Arc<AtomicBool>, answer_within: Duration) -> LiveIncoming {
        let settle = answer_within / 2;
        LiveIncoming {
            channel: Box::new(|| {
                let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()
                    .map_err(|e| OpError::internal("socketpair", e))?;
                ours.write_all(b"memory")
                    .map_err(|e| OpError::internal("write", e))?;
                Ok(OwnedFd::from(theirs))
            }),
            switch_over: Box::new(move |_| {
                switched.store(true, Ordering::SeqCst);
                Ok(())
            }),
            label: "migration from n1".into(),
            answer_within,
            settle,
            was_ready: true,
        }
    }

    fn identity() -> Identity {
        Identity {
            id: "0123456789abcdef".into(),
            config: None,
            cluster: true,
        }
    }

    /// Review finding (issue 23): a guest that failed its health check on
    /// the source could never move (nor be drained): its destination
    /// required it ready. It must show here what it showed there: its
    /// agent's answer suffices for a guest that was not ready.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guest_that_was_not_ready_on_the_source_moves_if_its_agent_answers() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        t.driver.set_behavior(GuestBehavior::NeverReady);
        let switched = Arc::new(AtomicBool::new(false));
        let mut live = incoming(switched.clone(), Duration::from_millis(600));
        live.was_ready = false;
        let i = t
            .engine
            .receive(run_request("m", "hello", &[]), identity(), live)
            .await
            .unwrap();
        assert_eq!(i.status.state, InstanceState::Running);
        assert_eq!(t.driver.running().len(), 1);
        // A hung one still fails, ready or not on the source.
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        t.driver.set_behavior(GuestBehavior::Hung);
        let mut live = incoming(switched, Duration::from_millis(600));
        live.was_ready = false;
        let err = t
            .engine
            .receive(run_request("m", "hello", &[]), identity(), live)
            .await
            .unwrap_err();
        assert!(
            err.message.contains("did not answer its agent"),
            "{}",
            err.message
        );
        assert!(t.driver.running().is_empty());
    }

    /// Review finding (issue 23): under TCG the VM is stopped for the copy;
    /// a migration out that failed after the stop (a QMP read timed out)
    /// cleared the marker as if QEMU ran the VM on, so the VM stayed paused
    /// for good while shown running. The marker stays while the VM does not
    /// run, and `resume_unmigrated` lets it run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_copy_that_left_the_vm_paused_is_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let i = t.engine.run(run_request("m", "hello", &[])).await.unwrap();
        let pid = i.status.pid.unwrap();
        t.engine
            .wait_running(&i.spec.name, Duration::from_secs(5))
            .await
            .unwrap();
        t.driver.fail_migrate_paused.store(true, Ordering::SeqCst);
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = t
            .engine
            .send_live("m", OwnedFd::from(ours))
            .await
            .unwrap_err();
        assert!(t.driver.is_paused(pid), "the fake left it paused: {err:?}");
        assert_eq!(t.engine.migrating_out(), vec!["m".to_string()]);
        t.engine.resume_unmigrated("m").await.unwrap();
        assert!(!t.driver.is_paused(pid), "the VM runs again");
        assert!(t.engine.migrating_out().is_empty());
    }

    /// A guest that answers after the switch-over: the instance runs here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_migrated_guest_that_answers_is_received() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let switched = Arc::new(AtomicBool::new(false));
        let i = t
            .engine
            .receive(
                run_request("m", "hello", &[]),
                identity(),
                incoming(switched.clone(), Duration::from_secs(5)),
            )
            .await
            .unwrap();
        assert!(switched.load(Ordering::SeqCst));
        assert_eq!(i.status.state, InstanceState::Running);
        assert_eq!(t.driver.running().len(), 1);
    }

    /// Issue 23 #3: QEMU reported the migration completed and the VM ran,
    /// but the guest never answered again; the move was reported a
    /// success. Now a guest that does not answer its agent, or answers but
    /// fails its health check, or whose VMM dies, fails the receive after
    /// the switch-over (the cluster gives the instance back), and leaves no
    /// VM or record here (its taps go with its VMM).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_migrated_guest_that_does_not_answer_fails_the_receive_and_leaves_nothing() {
        for (behavior, says) in [
            (GuestBehavior::Hung, "did not answer its agent"),
            (GuestBehavior::NeverReady, "did not pass its health check"),
            (
                GuestBehavior::PanicAtBoot(Duration::from_millis(10)),
                "QEMU exited",
            ),
            (
                GuestBehavior::ReadyThenExit(Duration::from_millis(100)),
                "answered, then failed",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let t = TestEngine::new(dir.path());
            t.engine
                .create_network(vroom_types::NetworkSpec::plain(Name::new("lan").unwrap()))
                .await
                .unwrap();
            t.driver.set_behavior(behavior);
            let switched = Arc::new(AtomicBool::new(false));
            let started = Instant::now();
            let err = t
                .engine
                .receive(
                    run_request("m", "hello", &[None]),
                    identity(),
                    incoming(switched.clone(), Duration::from_millis(600)),
                )
                .await
                .unwrap_err();
            assert!(err.message.contains(says), "{behavior:?}: {}", err.message);
            assert!(switched.load(Ordering::SeqCst), "{behavior:?}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{behavior:?}: the check is bounded"
            );
            assert!(
                t.driver.running().is_empty(),
                "{behavior:?}: the VM is killed"
            );
            assert!(t.engine.get("m").is_err(), "{behavior:?}: no record");
        }
    }
}
