//! Supervision: re-adopting VMs after a daemon restart, the monitor that
//! waits for each guest to become ready and then for its VMM to exit, and the
//! restart policy.

use vroom_base::LockExt;

use super::*;

impl Engine {
    /// Loads state and brings every instance out of whatever the last daemon
    /// left: re-adopts the VMs that kept running (including one launched but
    /// not yet recorded when the daemon died), finishes interrupted stops,
    /// restarts wanted VMs that are gone, and kills VMs and removes run dirs
    /// that no record owns.
    pub async fn recover(self: &Arc<Self>) -> Result<(), OpError> {
        let networks = self
            .store
            .networks()
            .map_err(|e| OpError::internal("failed to load networks", e))?;
        for network in &networks {
            // Not fatal: the instances must still be recovered. The bridge
            // keeps whatever rules it had, so say loudly that it may be open.
            if let Err(e) = self.net.apply_rules(network).await {
                tracing::error!(network = %network.name, error = %e, "cannot install the network's firewall: its guests may reach the host and other networks until the daemon restarts");
            }
        }
        self.sweep_pending_bridges(&networks).await;
        {
            let mut map = self.networks.lock_unpoisoned();
            for network in networks {
                map.insert(network.name.clone(), network);
            }
        }
        self.load_splices().await?;
        self.load_rooms()?;
        self.sweep_partial_snapshots().await;
        self.sweep_volumes()?;
        let records = self
            .store
            .instances()
            .map_err(|e| OpError::internal("failed to load instances", e))?;
        let root = self.instances_dir();
        let mut found: BTreeMap<PathBuf, VmProcess> =
            self.driver.processes_under(&root).into_iter().collect();
        let owned_dirs: std::collections::BTreeSet<PathBuf> =
            records.iter().map(|r| root.join(&r.instance.id)).collect();
        // Before any VM is launched again: a launch rotates console files.
        sweep_stale_console_files(&owned_dirs);
        for record in records {
            let dir = root.join(&record.instance.id);
            let process = record
                .process
                .clone()
                .filter(|p| self.driver.is_alive(p))
                .or_else(|| found.get(&dir).cloned());
            found.remove(&dir);
            let cell = Cell::new(dir, record);
            let name = cell.snapshot().spec.name;
            self.instances
                .lock_unpoisoned()
                .insert(name.clone(), cell.clone());
            if cell.lock().removing {
                self.finish_removal(&cell, &name, process).await;
                continue;
            }
            let cloning_from = cell.lock().cloning_from.clone();
            if let Some(snapshot) = cloning_from {
                self.fail_interrupted_clone(&cell, process, &snapshot)
                    .await?;
                continue;
            }
            match process {
                Some(process) => self.readopt(cell, process).await?,
                None => self.recover_gone(cell)?,
            }
        }
        for (dir, process) in found {
            tracing::warn!(pid = process.pid, dir = %dir.display(), "killing a VM that no instance owns (left by an interrupted run or rm)");
            let _ = self.driver.kill(&process);
            self.driver.wait_exit(&process).await;
        }
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let path = entry.path();
                if !owned_dirs.contains(&path) {
                    tracing::warn!(dir = %path.display(), "removing a run dir that no instance owns");
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        self.recover_splices().await?;
        self.recover_rooms().await;
        self.spawn_config_settle();
        Ok(())
    }

    /// An `rm` the last daemon acknowledged but did not finish: its VM is
    /// killed and the instance forgotten, as the `rm` would have. A failure
    /// leaves it marked, for `rm -f` to finish.
    async fn finish_removal(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        name: &Name,
        process: Option<VmProcess>,
    ) {
        tracing::warn!(instance = %name, "finishing a removal the last daemon did not complete");
        if let Some(process) = process {
            let _ = self.driver.kill(&process);
            self.driver.wait_exit(&process).await;
        }
        let _ = self.update(cell, |r| {
            r.process = None;
            r.instance.status.pid = None;
            r.instance.status.state = InstanceState::Stopped;
            r.instance.desired = DesiredState::Stopped;
        });
        let wipe = cell.lock().wipe;
        if let Err(e) = self.forget(cell, name.as_str(), wipe).await {
            tracing::error!(instance = %name, error = %e.message, "cannot finish the removal; `vroom rm -f` retries it");
        }
    }

    /// A VM that outlived the last daemon: watch it again, or finish what the
    /// last daemon was doing to it.
    async fn readopt(self: &Arc<Self>, cell: Arc<Cell>, process: VmProcess) -> Result<(), OpError> {
        if self.kill_interrupted_restore(&cell, &process).await {
            return self.recover_gone(cell);
        }
        let (name, state, desired, nics) = {
            let r = cell.lock();
            (
                r.instance.spec.name.clone(),
                r.instance.status.state,
                r.instance.desired,
                r.instance.nics.clone(),
            )
        };
        // A stop (or the stop half of a restart) was under way, or the
        // instance had failed: finish the stop, then start again if a
        // restart was interrupted.
        let stopping = desired == DesiredState::Stopped
            || matches!(state, InstanceState::Stopping | InstanceState::Failed);
        // The console is collected again from where the last daemon left
        // it (output written while no daemon ran is lost).
        cell.collect_console(cell.console.epoch(), Duration::from_secs(10));
        self.update(&cell, |r| {
            r.process = Some(process.clone());
            r.instance.status.pid = Some(process.pid);
            r.instance.status.accel = Some(process.accel);
            if !stopping && state != InstanceState::Running {
                r.instance.status.state = InstanceState::Starting;
            }
        })?;
        if stopping {
            tracing::warn!(instance = %name, pid = process.pid, "finishing a stop the last daemon did not complete");
            let engine = self.clone();
            let failed = state == InstanceState::Failed;
            tokio::spawn(async move {
                let _op = cell.op.lock().await;
                let after = if failed {
                    DesiredState::Stopped
                } else {
                    desired
                };
                let _ = engine.stop_locked(&cell, failed, after).await;
                if failed {
                    let _ =
                        engine.update(&cell, |r| r.instance.status.state = InstanceState::Failed);
                } else if desired == DesiredState::Running {
                    tracing::info!(instance = %name, "finishing an interrupted restart");
                    if let Err(e) = engine.launch(&cell, None).await {
                        let _ = engine.update(&cell, |r| {
                            r.instance.status.state = InstanceState::Failed;
                            r.instance.status.last_error = Some(e.message.clone());
                        });
                    }
                }
            });
            return Ok(());
        }
        // A launch interrupted between the VMM start and the bridge wiring
        // left its taps loose: attaching is idempotent.
        for nic in &nics {
            if let Ok(network) = self.network(nic.network.as_str()) {
                if let Err(e) = self.net.attach_tap(&nic.tap, &network.bridge).await {
                    tracing::warn!(instance = %name, tap = %nic.tap, error = %e, "cannot re-attach a NIC");
                }
            }
        }
        self.recover_paused(&cell, &process).await;
        tracing::info!(instance = %name, pid = process.pid, "re-adopted running VM");
        let generation = cell.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let deadline = (state != InstanceState::Running)
            .then(|| Instant::now() + Duration::from_secs(cell.lock().ready_timeout_secs));
        self.spawn_monitor(cell, generation, process, deadline, Instant::now());
        Ok(())
    }

    /// A VM that is gone: the same rule as for an exit seen live, except that
    /// a VM missing while it was starting is restarted, since it may never
    /// have been launched at all.
    fn recover_gone(self: &Arc<Self>, cell: Arc<Cell>) -> Result<(), OpError> {
        let (name, state, desired) = {
            let r = cell.lock();
            (
                r.instance.spec.name.clone(),
                r.instance.status.state,
                r.instance.desired,
            )
        };
        // An interrupted restart whose VM is already gone only needs its start.
        let outcome = match (state, desired) {
            (InstanceState::Stopping, DesiredState::Running) => ExitOutcome::Restart,
            _ => lifecycle::on_exit(state, desired, true),
        };
        self.update(&cell, |r| {
            r.process = None;
            r.instance.status.pid = None;
            if outcome == ExitOutcome::Stopped {
                r.instance.status.state = InstanceState::Stopped;
            }
        })?;
        if outcome == ExitOutcome::Restart {
            tracing::warn!(instance = %name, "VM gone while no daemon was running; restarting it");
            self.schedule_restart(cell, 0);
        }
        Ok(())
    }

    /// Watches one VMM process: waits for the guest to become ready (or fails
    /// it on the deadline), then for the process to exit, then applies the
    /// restart policy.
    pub(super) fn spawn_monitor(
        self: &Arc<Self>,
        cell: Arc<Cell>,
        generation: u64,
        process: VmProcess,
        ready_deadline: Option<Instant>,
        launched: Instant,
    ) {
        let engine = self.clone();
        tokio::spawn(async move {
            let exit = engine.driver.wait_exit(&process);
            tokio::pin!(exit);
            // A future polled to completion must not be polled again.
            let mut exited = false;
            // A guest resumed from a saved state answers at once; a booting
            // one not before its agent runs.
            // The guest says when it is ready (`WaitReady`); older guests
            // are polled.
            let mut long_poll = true;
            let mut wait = if cell.lock().instance.status.started_from.is_some() {
                Duration::ZERO
            } else {
                HEALTH_POLL
            };
            if let Some(deadline) = ready_deadline {
                loop {
                    tokio::select! {
                        _ = &mut exit => {
                            exited = true;
                            break;
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = HEALTH_POLL;
                    if cell.generation.load(Ordering::SeqCst) != generation {
                        return;
                    }
                    let asked = Instant::now();
                    let polled = if long_poll {
                        match cell.agent.wait_ready(WAIT_READY_SLICE).await {
                            // A guest from before `WaitReady` (refused, or
                            // never answered: older still) is polled.
                            Err(
                                crate::agent::AgentError::Refused { .. }
                                | crate::agent::AgentError::Timeout(_),
                            ) => {
                                long_poll = false;
                                cell.agent.health(Duration::from_secs(2)).await
                            }
                            Ok(report) => {
                                // It answered when ready or after a slice:
                                // ask again at once (unless it answered
                                // early without being ready: then poll).
                                if asked.elapsed() >= WAIT_READY_SLICE / 2 {
                                    wait = Duration::ZERO;
                                }
                                Ok(report)
                            }
                            other => other,
                        }
                    } else {
                        cell.agent.health(Duration::from_secs(2)).await
                    };
                    if let Ok(report) = polled {
                        if let Some(error) = report.config_error {
                            // The guest cannot put its stored config in
                            // force: fail now instead of at the deadline.
                            let error = format!(
                                "the stored config cannot be put in force: {}",
                                truncate(&error)
                            );
                            let _ = engine.update(&cell, |r| {
                                r.instance.status.state = InstanceState::Failed;
                                r.instance.status.last_error = Some(error.clone());
                            });
                            tracing::warn!(instance = %cell.snapshot().spec.name, %error, "guest refused its config at boot");
                            let _ = engine.driver.kill(&process);
                            break;
                        }
                        let unmounted = unmounted_volumes(&cell.snapshot(), &report);
                        if report.ready && !unmounted.is_empty() {
                            // An init from before data volumes boots without
                            // them: its services would write into a tmpfs.
                            let error = format!(
                                "the guest did not mount its data volumes ({}): its image's init predates data volumes; rebuild the image",
                                unmounted.join(", ")
                            );
                            let _ = engine.update(&cell, |r| {
                                r.instance.status.state = InstanceState::Failed;
                                r.instance.status.last_error = Some(error.clone());
                            });
                            tracing::warn!(instance = %cell.snapshot().spec.name, %error, "guest without its volumes");
                            let _ = engine.driver.kill(&process);
                            break;
                        }
                        if report.ready {
                            let config = sanitize_config(report.config);
                            let boot_ms = launched.elapsed().as_millis() as u64;
                            let booted = cell.snapshot().status.started_from.is_none();
                            // A restored guest's times are its snapshot's boot.
                            let phases = report.boot.filter(|_| booted).map(|guest| {
                                vroom_types::BootPhases {
                                    kernel_ms: guest.init_ms,
                                    init_ms: guest.ready_ms.saturating_sub(guest.init_ms),
                                }
                            });
                            let _ = engine.update(&cell, |r| {
                                if r.instance.status.state == InstanceState::Starting {
                                    r.instance.status.state = InstanceState::Running;
                                    r.instance.status.boot_ms = Some(boot_ms);
                                    r.instance.status.boot_phases = phases;
                                }
                                r.instance.config = config;
                                r.ever_ready = true;
                            });
                            let name = cell.snapshot().spec.name;
                            match phases {
                                Some(p) => tracing::info!(instance = %name, boot_ms,
                                    kernel_ms = p.kernel_ms, init_ms = p.init_ms,
                                    "guest ready"),
                                None => tracing::info!(instance = %name, boot_ms, "guest ready"),
                            }
                            break;
                        }
                    }
                    if Instant::now() >= deadline {
                        let tail = cell.console_tail(20);
                        let secs = cell.lock().ready_timeout_secs;
                        let _ = engine.update(&cell, |r| {
                            r.instance.status.state = InstanceState::Failed;
                            r.instance.status.last_error =
                                Some(format!("the guest did not become ready within {secs}s"));
                        });
                        tracing::warn!(instance = %cell.snapshot().spec.name, console = %tail, "guest never became ready");
                        let _ = engine.driver.kill(&process);
                        break;
                    }
                }
            }
            if !exited {
                exit.await;
            }
            // The exit is classified by the console's last words: they
            // must be on disk first.
            if cell.generation.load(Ordering::SeqCst) == generation {
                cell.console_flushed().await;
            }
            engine.on_exit(&cell, generation, launched.elapsed()).await;
        });
    }

    pub(super) async fn on_exit(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        generation: u64,
        uptime: Duration,
    ) {
        if cell.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        cell.agent.reset().await;
        let (state, desired, ever_ready) = {
            let r = cell.lock();
            (r.instance.status.state, r.instance.desired, r.ever_ready)
        };
        let outcome = lifecycle::on_exit(state, desired, ever_ready);
        let name = cell.snapshot().spec.name;
        if uptime >= STABLE_AFTER {
            cell.crash_streak.store(0, Ordering::SeqCst);
        }
        let _ = self.update(cell, |r| {
            r.process = None;
            r.instance.status.pid = None;
            match outcome {
                ExitOutcome::Stopped => r.instance.status.state = InstanceState::Stopped,
                ExitOutcome::Failed => {}
                ExitOutcome::BootFailed => {
                    r.instance.status.state = InstanceState::Failed;
                    r.instance.status.last_error = Some(boot_failure(&cell.console_tail(40)));
                }
                ExitOutcome::Restart => {
                    r.instance.status.state = InstanceState::Restarting;
                    r.instance.status.restarts += 1;
                    r.instance.status.last_error = Some("the VM exited unexpectedly".into());
                }
            }
        });
        if outcome == ExitOutcome::Restart {
            let streak = cell.crash_streak.fetch_add(1, Ordering::SeqCst) + 1;
            tracing::warn!(instance = %name, streak, "VM exited unexpectedly; restarting");
            self.schedule_restart(cell.clone(), lifecycle::restart_backoff_secs(streak));
        }
    }

    pub(super) fn schedule_restart(self: &Arc<Self>, cell: Arc<Cell>, delay_secs: u64) {
        let engine = self.clone();
        let generation = cell.generation.load(Ordering::SeqCst);
        let _ = self.update(&cell, |r| {
            r.instance.status.state = InstanceState::Restarting
        });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(delay_secs)).await;
            let _op = cell.op.lock().await;
            let still_wanted = {
                let r = cell.lock();
                r.instance.desired == DesiredState::Running
                    && r.instance.status.state == InstanceState::Restarting
            };
            if !still_wanted || cell.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            if let Err(e) = engine.launch(&cell, None).await {
                tracing::error!(error = %e, "restart failed");
                let _ = engine.update(&cell, |r| {
                    r.instance.status.state = InstanceState::Failed;
                    r.instance.status.last_error = Some(e.message.clone());
                });
            }
        });
    }
}

/// Why a guest died during boot, in its own last words: the console's last
/// kernel panic line, or else its last line.
fn boot_failure(tail: &str) -> String {
    let line = tail
        .lines()
        .rev()
        .find(|l| l.contains("Kernel panic"))
        .or_else(|| tail.lines().rev().find(|l| !l.trim().is_empty()));
    match line {
        Some(line) => format!("the guest died during boot: {}", truncate(line.trim())),
        None => "the guest died during boot (its console is empty)".into(),
    }
}

/// At daemon start, before any request or launch: removes the console files
/// that the layout does not name (see [`crate::console`]) from the run dirs
/// of the instances. Says what it removed.
fn sweep_stale_console_files(run_dirs: &std::collections::BTreeSet<PathBuf>) {
    let mut removed = 0u64;
    for dir in run_dirs {
        for file in crate::console::stale_console_files(dir) {
            let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(&file).is_ok() {
                tracing::info!(file = %file.display(), bytes, "removed a stale console file");
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "swept stale console files from the run dirs");
    }
}

/// The instance's data volumes its guest does not report mounted.
fn unmounted_volumes(
    instance: &vroom_types::Instance,
    report: &vroom_agent_proto::HealthReport,
) -> Vec<String> {
    instance
        .spec
        .volumes
        .iter()
        // By path: a clone's guest mounted them under the snapshot's names.
        .filter(|a| !report.volumes.iter().any(|v| v.path == a.path))
        .map(|a| a.volume.to_string())
        .collect()
}
