//! Live migration, the engine's half. The cluster layer carries the
//! streams between nodes and hands ownership over; the engine moves the VM:
//!
//! - the source ([`Engine::send_live`]) streams its running VM into a
//!   socket the cluster connected to the destination's VMM, and returns the
//!   config volume's bytes once the VM has paused for good;
//! - the destination takes it in steps the cluster drives, with an
//!   [`Arrival`] between them:
//!   1. [`Engine::arrive`] creates the instance with its identity and
//!      launches its VMM waiting for the stream;
//!   2. [`Arrival::receive_state`]: the VMM reads the stream; the VM stays
//!      paused;
//!   3. [`Arrival::write_volume`]: the source's config volume, in place;
//!   4. the cluster takes ownership of the instance (no engine part);
//!   5. [`Arrival::resume`] lets the VM run, or [`Arrival::abandon`] (or
//!      dropping the arrival) undoes everything the arrival made;
//! - then the guest must answer here ([`Engine::verify_arrival`]): its
//!   agent replies to a health request and, if it was ready on the source
//!   ([`ArrivalChecks::was_ready`]), reports itself ready (its health check
//!   passes) within [`ArrivalChecks::answer_within`]. A guest that does
//!   not (its VMM died, or it hangs) is killed and the instance removed, so
//!   the resume fails: the cluster then gives the instance back to the
//!   source, whose paused copy runs on. A QEMU that reported a completed
//!   migration is no proof that the guest survived it.
//!
//! From the arrival until the guest answered, the instance is `starting`
//! with the restore marker in its run dir, as for a start from a saved
//! state: a daemon killed meanwhile kills the VM and boots the instance.
//! While a VM streams out, a marker in its run dir tells the next daemon
//! that a pause it finds may be the migration's: a VM whose migration did
//! not hand it over runs again ([`Engine::resume_unmigrated`]).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use super::instances::{Created, Launch, Vmm};
use super::markers::{clear_marker, set_marker, MIGRATE_MARKER};
use super::*;
use crate::cluster::Identity;
use crate::driver::{LiveStats, VmRunState};

/// How a migrated guest must show, once it runs here, that it survived.
#[derive(Debug, Clone, Copy)]
pub struct ArrivalChecks {
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

/// An instance arriving here by live migration, between the steps the
/// cluster drives: made by [`Engine::arrive`], ended by
/// [`Arrival::resume`] or [`Arrival::abandon`]. It holds the instance's op
/// lock throughout. Dropped before it ended, it is abandoned in the
/// background.
pub struct Arrival {
    engine: Arc<Engine>,
    /// Taken by the step that ends the arrival.
    arriving: Option<Arriving>,
}

/// What an arrival made so far.
struct Arriving {
    created: Created,
    vmm: Vmm,
    /// Shown as `status.started_from`.
    label: String,
}

impl std::fmt::Debug for Arrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("Arrival");
        if let Some(a) = &self.arriving {
            out.field("instance", &a.vmm.instance.spec.name)
                .field("pid", &a.vmm.process.pid)
                .field("label", &a.label);
        }
        out.finish_non_exhaustive()
    }
}

impl Arrival {
    fn arriving(&self) -> &Arriving {
        self.arriving
            .as_ref()
            .expect("invariant: only the steps that consume an arrival end it")
    }

    /// The arriving instance's name.
    pub fn name(&self) -> &str {
        self.arriving().vmm.instance.spec.name.as_str()
    }

    /// Blocking inside: the VMM reads the whole migration stream from
    /// `stream` (connected to the source's VMM). The VM stays paused. On
    /// failure the arrival is the caller's to abandon.
    pub async fn receive_state(&self, stream: OwnedFd) -> Result<(), OpError> {
        let process = &self.arriving().vmm.process;
        blocking(|| self.engine.driver.migrate_in(process, stream.as_fd()))
            .map_err(|e| OpError::internal("the migration stream failed", e))
    }

    /// Writes the source's config volume over the arriving one, in place
    /// (the VMM holds the file open), while the VM is still paused. On
    /// failure the arrival is the caller's to abandon.
    pub async fn write_volume(&self, content: &[u8]) -> Result<(), OpError> {
        let volume = self.arriving().created.cell.volume();
        blocking(|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(&volume)
                .map_err(|e| OpError::internal("failed to open the config volume", e))?;
            file.set_len(content.len() as u64)
                .and_then(|()| file.write_all(content))
                .and_then(|()| file.sync_all())
                .map_err(|e| OpError::internal("failed to write the config volume", e))
        })
    }

    /// Once the cluster owns the instance here: the VM runs, and its guest
    /// must pass `checks`. A guest that does not is killed and the
    /// instance removed.
    pub async fn resume(mut self, checks: ArrivalChecks) -> Result<Instance, OpError> {
        let arriving = self.take();
        self.engine.resume_arrival(arriving, checks).await
    }

    /// Undoes the arrival: its VM is killed and the instance removed, as if
    /// it never came.
    pub async fn abandon(mut self) {
        let arriving = self.take();
        self.engine.undo_arrival(arriving).await;
    }

    fn take(&mut self) -> Arriving {
        self.arriving
            .take()
            .expect("invariant: only the steps that consume an arrival end it")
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        let Some(arriving) = self.arriving.take() else {
            return;
        };
        let name = arriving.vmm.instance.spec.name.clone();
        tracing::warn!(instance = %name, "an incoming migration was dropped before it ended; undoing it");
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let engine = self.engine.clone();
                runtime.spawn(async move { engine.undo_arrival(arriving).await });
            }
            // No runtime to undo it on: at least the VM goes (the next
            // daemon removes the instance, whose VM it finds gone).
            Err(_) => {
                let _ = self.engine.driver.kill(&arriving.vmm.process);
            }
        }
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
    /// The first step of a live migration in: creates instance `req` with
    /// `identity` (`label` is shown as `status.started_from`) and launches
    /// its VMM waiting for the stream. Any failure removes everything this
    /// call created; so does abandoning the arrival later.
    pub async fn arrive(
        self: &Arc<Self>,
        req: RunRequest,
        identity: Identity,
        label: String,
    ) -> Result<Arrival, OpError> {
        let created = self.create(req, Some(identity), true).await?;
        let image = Some(created.image.clone());
        let how = Launch::Incoming { clone: false };
        let vmm = match self.start_vmm(&created.cell, image, how).await {
            Ok(vmm) => vmm,
            Err(e) => {
                self.uncreate(&created).await;
                return Err(e);
            }
        };
        Ok(Arrival {
            engine: self.clone(),
            arriving: Some(Arriving {
                created,
                vmm,
                label,
            }),
        })
    }

    /// [`Arrival::resume`]: the VM runs and must answer; it is recorded as
    /// the instance's only then.
    async fn resume_arrival(
        self: &Arc<Self>,
        arriving: Arriving,
        checks: ArrivalChecks,
    ) -> Result<Instance, OpError> {
        let cell = arriving.created.cell.clone();
        let process = arriving.vmm.process.clone();
        let mut resumed = blocking(|| self.driver.resume(&process))
            .map_err(|e| OpError::internal("failed to start the migrated VM", e));
        if resumed.is_ok() {
            let within = (checks.answer_within, checks.settle);
            resumed = self
                .verify_arrival(&cell, &process, within, checks.was_ready)
                .await;
        }
        if let Err(e) = resumed {
            self.undo_arrival(arriving).await;
            return Err(e);
        }
        let Arriving {
            created,
            vmm,
            label,
        } = arriving;
        let launched = self.finish_launch(&cell, vmm, Some(label), true).await;
        self.complete(created, launched).await
    }

    /// Undoes an arrival: its VM is killed, then the instance is removed.
    async fn undo_arrival(&self, arriving: Arriving) {
        let Arriving { created, vmm, .. } = arriving;
        let _ = self.driver.kill(&vmm.process);
        self.driver.wait_exit(&vmm.process).await;
        self.unlaunch(&created.cell, vmm.previous);
        self.uncreate(&created).await;
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
        self.check_movable(name)?;
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
/// checked (the check as a whole has [`ArrivalChecks::answer_within`]).
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
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::testing::{run_request, GuestBehavior, TestEngine};

    fn identity() -> Identity {
        Identity {
            id: "0123456789abcdef".into(),
            config: Some(BTreeMap::from([(
                "k".to_string(),
                "from the source".to_string(),
            )])),
            cluster: true,
        }
    }

    /// The source VMM's stream: a few bytes of "memory".
    fn stream() -> OwnedFd {
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.write_all(b"memory").unwrap();
        OwnedFd::from(theirs)
    }

    fn checks(answer_within: Duration, was_ready: bool) -> ArrivalChecks {
        ArrivalChecks {
            answer_within,
            settle: answer_within / 2,
            was_ready,
        }
    }

    /// The destination's steps as the cluster drives them (its takeover
    /// goes through).
    async fn receive(
        t: &TestEngine,
        nics: &[Option<&str>],
        checks: ArrivalChecks,
    ) -> Result<Instance, OpError> {
        let req = run_request("m", "hello", nics);
        let label = "migration from n1".to_string();
        let arrival = t.engine.arrive(req, identity(), label).await?;
        if let Err(e) = arrival.receive_state(stream()).await {
            arrival.abandon().await;
            return Err(e);
        }
        arrival.resume(checks).await
    }

    /// Nothing of instance `m` is left: no VM, record, run dir, nor the
    /// default network its arrival made.
    fn assert_nothing_left(t: &TestEngine, what: &str) {
        assert!(t.driver.running().is_empty(), "{what}: the VM is killed");
        assert!(t.engine.get("m").is_err(), "{what}: no instance");
        assert!(t.store.instances().unwrap().is_empty(), "{what}: no record");
        let dirs = std::fs::read_dir(t.dir.join("instances")).unwrap().count();
        assert_eq!(dirs, 0, "{what}: no run dir");
        assert!(
            t.engine.network(DEFAULT_NETWORK).is_err(),
            "{what}: no default network"
        );
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
        let within = Duration::from_millis(600);
        let i = receive(&t, &[], checks(within, false)).await.unwrap();
        assert_eq!(i.status.state, InstanceState::Running);
        assert_eq!(t.driver.running().len(), 1);
        // A hung one still fails, ready or not on the source.
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        t.driver.set_behavior(GuestBehavior::Hung);
        let err = receive(&t, &[], checks(within, false)).await.unwrap_err();
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

    /// The steps in order: the VMM waits paused for the stream and reads
    /// it, the source's config volume is written in place, and only the
    /// resume lets the VM run; until then the instance is `starting` with
    /// the restore marker (a daemon killed meanwhile boots it instead). It
    /// runs here with the identity it came with.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_migrated_guest_that_answers_runs_with_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let req = run_request("m", "hello", &[]);
        let arrival = t
            .engine
            .arrive(req, identity(), "migration from n1".into())
            .await
            .unwrap();
        assert_eq!(arrival.name(), "m");
        let [pid] = t.driver.running()[..] else {
            panic!("one VMM waits for the stream");
        };
        let run_dir = t.dir.join("instances").join(identity().id);
        arrival.receive_state(stream()).await.unwrap();
        assert_eq!(t.driver.memory_of(pid).unwrap(), b"memory");
        assert!(t.driver.is_paused(pid), "the VM waits for the takeover");
        arrival.write_volume(b"the source's volume").await.unwrap();
        assert_eq!(
            std::fs::read(run_dir.join("config.img")).unwrap(),
            b"the source's volume"
        );
        let starting = t.engine.get("m").unwrap();
        assert_eq!(starting.status.state, InstanceState::Starting);
        assert!(run_dir.join(super::super::markers::RESTORE_MARKER).exists());

        let i = arrival
            .resume(checks(Duration::from_secs(5), true))
            .await
            .unwrap();
        assert!(!t.driver.is_paused(pid), "the VM runs");
        assert_eq!(i.id, identity().id);
        assert_eq!(Some(i.config), identity().config);
        assert_eq!(i.status.state, InstanceState::Running);
        assert_eq!(i.status.pid, Some(pid));
        assert_eq!(i.status.started_from.as_deref(), Some("migration from n1"));
        assert!(!run_dir.join(super::super::markers::RESTORE_MARKER).exists());
        assert_eq!(t.engine.cluster_instances(), vec!["m".to_string()]);
    }

    /// An arrival given up at any step (the source went away, the takeover
    /// was refused) leaves nothing here: abandoned, or dropped (then in
    /// the background).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_arrival_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let label = || "migration from n1".to_string();
        let arrival = t
            .engine
            .arrive(run_request("m", "hello", &[]), identity(), label())
            .await
            .unwrap();
        arrival.receive_state(stream()).await.unwrap();
        arrival.write_volume(b"volume").await.unwrap();
        arrival.abandon().await;
        assert_nothing_left(&t, "abandoned");

        let arrival = t
            .engine
            .arrive(run_request("m", "hello", &[]), identity(), label())
            .await
            .unwrap();
        assert_eq!(t.driver.running().len(), 1);
        drop(arrival);
        let started = Instant::now();
        let left = || {
            let dirs = std::fs::read_dir(t.dir.join("instances")).unwrap().count();
            t.engine.network(DEFAULT_NETWORK).is_ok() || dirs > 0
        };
        while left() && started.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_nothing_left(&t, "dropped");
    }

    /// A daemon killed between the steps (the VM paused with the whole
    /// state in, the takeover not done): the next one kills that VM and
    /// boots the instance, as after an interrupted start from a saved
    /// state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_daemon_killed_inside_an_arrival_boots_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let arrival = t
            .engine
            .arrive(
                run_request("m", "hello", &[]),
                identity(),
                "migration from n1".into(),
            )
            .await
            .unwrap();
        arrival.receive_state(stream()).await.unwrap();
        let [pid] = t.driver.running()[..] else {
            panic!("one VMM");
        };
        // The daemon dies: nothing of the arrival runs on.
        std::mem::forget(arrival);
        let engine = t.restarted();
        engine.recover().await.unwrap();
        assert!(
            !t.driver.running().contains(&pid),
            "the arriving VM is killed"
        );
        let mut booted = None;
        for _ in 0..400 {
            let i = engine.get("m").unwrap();
            if i.status.state == InstanceState::Running {
                booted = Some(i);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let booted = booted.expect("the instance boots again");
        assert_eq!(booted.id, identity().id);
        assert_eq!(booted.status.started_from, None, "booted, not migrated");
        assert_eq!(t.driver.running().len(), 1, "booted afresh");
    }

    /// Issue 23 #3: QEMU reported the migration completed and the VM ran,
    /// but the guest never answered again; the move was reported a
    /// success. Now a guest that does not answer its agent, or answers but
    /// fails its health check, or whose VMM dies, fails the resume (the
    /// cluster gives the instance back), and leaves no VM or record here
    /// (its taps go with its VMM).
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
            let started = Instant::now();
            let err = receive(&t, &[None], checks(Duration::from_millis(600), true))
                .await
                .unwrap_err();
            assert!(err.message.contains(says), "{behavior:?}: {}", err.message);
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{behavior:?}: the check is bounded"
            );
            assert_nothing_left(&t, &format!("{behavior:?}"));
        }
    }
}
