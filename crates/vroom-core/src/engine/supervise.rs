//! Supervision: re-adopting VMs after a daemon restart, the monitor that
//! waits for each guest to become ready and then for its VMM to exit, and the
//! restart policy.

use super::*;

impl Engine {
    /// Loads state and re-adopts the VMs that kept running while no daemon was up.
    pub async fn recover(self: &Arc<Self>) -> Result<(), OpError> {
        let networks = self
            .store
            .networks()
            .map_err(|e| OpError::internal("failed to load networks", e))?;
        {
            let mut map = self.networks.lock().unwrap_or_else(|p| p.into_inner());
            for network in networks {
                map.insert(network.name.clone(), network);
            }
        }
        let records = self
            .store
            .instances()
            .map_err(|e| OpError::internal("failed to load instances", e))?;
        for record in records {
            let name = record.instance.spec.name.clone();
            let cell = Cell::new(
                self.instances_dir().join(&record.instance.id),
                record.clone(),
            );
            self.instances
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), cell.clone());
            match record.process.clone() {
                Some(process) if self.driver.is_alive(&process) => {
                    tracing::info!(instance = %name, pid = process.pid, "re-adopted running VM");
                    let generation = cell.generation.fetch_add(1, Ordering::SeqCst) + 1;
                    let waiting = matches!(record.instance.status.state, InstanceState::Starting);
                    let deadline = waiting
                        .then(|| Instant::now() + Duration::from_secs(record.ready_timeout_secs));
                    self.spawn_monitor(cell, generation, process, deadline);
                }
                _ => {
                    // The VM is gone: the same rule as for an exit seen live.
                    let outcome =
                        lifecycle::on_exit(record.instance.status.state, record.instance.desired);
                    self.update(&cell, |r| {
                        r.process = None;
                        r.instance.status.pid = None;
                        if outcome == ExitOutcome::Stopped {
                            r.instance.status.state = InstanceState::Stopped;
                        }
                    })?;
                    if outcome == ExitOutcome::Restart {
                        tracing::warn!(instance = %name, "VM died while no daemon was running; restarting it");
                        self.schedule_restart(cell, 0);
                    }
                }
            }
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
    ) {
        let engine = self.clone();
        tokio::spawn(async move {
            let launched = Instant::now();
            let exit = engine.driver.wait_exit(&process);
            tokio::pin!(exit);
            if let Some(deadline) = ready_deadline {
                loop {
                    tokio::select! {
                        _ = &mut exit => break,
                        _ = tokio::time::sleep(HEALTH_POLL) => {}
                    }
                    if cell.generation.load(Ordering::SeqCst) != generation {
                        return;
                    }
                    if let Ok(report) = cell.agent.health(Duration::from_secs(2)).await {
                        if report.ready {
                            let config = sanitize_config(report.config);
                            let boot_ms = launched.elapsed().as_millis() as u64;
                            let _ = engine.update(&cell, |r| {
                                if r.instance.status.state == InstanceState::Starting {
                                    r.instance.status.state = InstanceState::Running;
                                    r.instance.status.boot_ms = Some(boot_ms);
                                }
                                r.instance.config = config;
                            });
                            tracing::info!(instance = %cell.snapshot().spec.name, boot_ms, "guest ready");
                            break;
                        }
                    }
                    if Instant::now() >= deadline {
                        let tail = tail_of(&cell.console_log(), 20);
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
            exit.await;
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
        let (state, desired) = {
            let r = cell.lock();
            (r.instance.status.state, r.instance.desired)
        };
        let outcome = lifecycle::on_exit(state, desired);
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
