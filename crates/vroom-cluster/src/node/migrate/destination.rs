//! The destination's side of a live migration: it checks the migration,
//! receives the VM into its engine, takes the instance over (or gives it
//! back when its guest does not answer here) and says how it ended.

use std::io::{BufRead, Read, Write};
use std::os::fd::OwnedFd;

use tokio::net::TcpStream;
use vroom_core::{Arrival, ArrivalChecks};

use super::*;

impl ClusterNode {
    pub(in crate::node) fn data_arrived(&self, migration: &str, secret: &str, stream: TcpStream) {
        let slot = self
            .incoming
            .lock_unpoisoned()
            .values()
            .find(|(id, s, _)| id == migration && s == secret)
            .map(|(_, _, slot)| slot.clone());
        match (slot, into_blocking(stream)) {
            (Some(slot), Ok(stream)) => {
                let _ = slot.try_send(stream);
            }
            _ => tracing::warn!(%migration, "dropping a data connection no migration waits for"),
        }
    }

    /// The destination's side: checks the migration against etcd, creates
    /// the instance from the stream, switches over.
    pub(in crate::node) async fn receive_migration(
        &self,
        stream: TcpStream,
        name: &str,
        (migration, secret): (&str, &str),
        was_ready: bool,
    ) {
        let mut control = match into_blocking(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot use a control connection");
                return;
            }
        };
        let refuse = |control: &mut std::net::TcpStream, reason: String| {
            tracing::warn!(instance = %name, %reason, "refused an incoming migration");
            let _ = control.write_all(&line(&Control::Refused { reason }));
        };
        let checked = self.check_incoming(name, migration, secret).await;
        let (record, config, from, config_rev) = match checked {
            Ok(checked) => checked,
            Err(reason) => return refuse(&mut control, reason),
        };
        for nic in &record.request.spec.nics {
            if let Err(e) = self.ensure_network(nic.network.as_str()).await {
                return refuse(&mut control, e.message);
            }
        }
        if let Err(e) = self.ensure_image(&record.request.spec.image).await {
            return refuse(&mut control, e.message);
        }
        // The overlay (and the gateway's shared MAC) before the guest runs
        // here: it keeps talking to the gateway it knew.
        if let Ok(view) = self.view().await {
            self.join_networks(&view).await;
        }
        if !self.begin_start(name) {
            return refuse(&mut control, format!("{} is busy with {name}", self.name));
        }
        // Its splices (appliances booted, in the path) before its VMM: the
        // VM's first packet here goes through them.
        let wiring_rev = match self.bring_wiring(name).await {
            Ok(revision) => revision,
            Err(e) => {
                self.end_start(name);
                return refuse(
                    &mut control,
                    format!("cannot bring its splices: {}", e.message),
                );
            }
        };
        let (slot, data) = std::sync::mpsc::sync_channel(1);
        self.incoming.lock_unpoisoned().insert(
            name.to_string(),
            (migration.to_string(), secret.to_string(), slot),
        );
        let (outcome, taken) = self
            .receive_into_engine(
                &control,
                name,
                migration,
                (record, config),
                Seen {
                    config: config_rev,
                    wiring: wiring_rev,
                },
                (&from, was_ready),
                data,
            )
            .await;
        let outcome = match (outcome, taken) {
            (Ok(()), Some(taken)) => {
                let switched = MigrationState::Switched {
                    downtime_ms: taken.downtime_ms,
                    bytes: taken.bytes,
                };
                self.record_migration(name, &taken, switched).await;
                Ok(taken.at.elapsed().as_millis() as u64)
            }
            // The guest did not make it here (the engine killed it and
            // removed the instance): the source's paused copy is the one,
            // given back before anything else here (the splices) takes
            // time. Not to a source that hung up: it stopped waiting, and
            // may have dropped its copy.
            (Err(reason), Some(taken)) => {
                let given = if closed(&control) {
                    Err(format!("node {from} stopped waiting for the answer"))
                } else {
                    self.give_back(name, &from, &taken).await
                };
                match given {
                    Ok(()) => Err(reason),
                    Err(e) => {
                        tracing::error!(instance = %name, %from, error = %e, "cannot give a failed migration back; the instance starts here instead");
                        let reason = format!(
                            "{reason}; cannot give it back to {from} ({e}), so it starts again on {}",
                            self.name
                        );
                        let failed = MigrationState::Failed {
                            reason: reason.clone(),
                        };
                        self.record_migration(name, &taken, failed).await;
                        Err(reason)
                    }
                }
            }
            (outcome, None) => outcome.map(|()| 0),
        };
        if outcome.is_err() {
            self.engine.drop_wiring(name).await;
        }
        // Only now: a pass cannot start it here while it is given back, nor
        // take the migration for one a restart cut short.
        self.incoming.lock_unpoisoned().remove(name);
        self.end_start(name);
        let reply = match outcome {
            Ok(checked_ms) => {
                tracing::info!(instance = %name, %from, checked_ms, "migrated here; the guest answers");
                self.event(
                    NewEvent::new(EventKind::Migration, "arrived", name)
                        .message(format!("from {from}"))
                        .detail("from", from.to_string())
                        .detail("checked_ms", checked_ms),
                );
                Control::Resumed { checked_ms }
            }
            Err(reason) => {
                tracing::warn!(instance = %name, %from, %reason, "an incoming migration failed");
                Control::Failed { reason }
            }
        };
        let _ = control.write_all(&line(&reply));
        if matches!(reply, Control::Resumed { .. }) {
            self.receive_console(control, name, &from).await;
        }
    }

    /// After a migration in: the source's console history, put before what
    /// the guest wrote here. A source that sends none (an older one, or it
    /// failed) leaves the log as the guest wrote it here.
    pub(in crate::node) async fn receive_console(
        &self,
        control: std::net::TcpStream,
        name: &str,
        from: &str,
    ) {
        let read = tokio::task::spawn_blocking(move || read_console(control)).await;
        let history = match read {
            Ok(Ok(Some(history))) => history,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(instance = %name, %from, error = %e, "the console history of a migrated instance did not come; its log starts here");
                return;
            }
            Err(_) => return,
        };
        if let Err(e) = self.engine.adopt_console(name, history) {
            tracing::warn!(instance = %name, error = %e.message, "cannot keep the console history of a migrated instance");
        }
    }

    /// Whether `migration` of `name` is one this node should take: returns
    /// the instance, its config and the source.
    pub(in crate::node) async fn check_incoming(
        &self,
        name: &str,
        migration: &str,
        secret: &str,
    ) -> Result<(InstanceRecord, Option<ConfigValues>, String, i64), String> {
        let read = |e: StoreError| format!("cannot read the cluster: {e}");
        let (record, _) = self
            .store
            .get_json::<MigrationRecord>(&key(MIGRATIONS, name))
            .await
            .map_err(read)?
            .ok_or("no such migration")?;
        if record.id != migration || record.secret != secret {
            return Err("no such migration".into());
        }
        if record.to != self.name || record.state != MigrationState::Requested {
            return Err(format!("the migration is not for {} now", self.name));
        }
        if self.engine.get(name).is_ok() {
            return Err(format!(
                "{} already has an instance named {name}",
                self.name
            ));
        }
        let (instance, _) = self
            .store
            .get_json::<InstanceRecord>(&key(INSTANCES, name))
            .await
            .map_err(read)?
            .ok_or("the instance is gone")?;
        let (config, config_rev) = match self
            .store
            .get_json::<ConfigValues>(&key(CONFIGS, name))
            .await
            .map_err(read)?
        {
            Some((config, kv)) => (Some(config), kv.mod_revision),
            None => (None, 0),
        };
        Ok((instance, config, record.from, config_rev))
    }

    /// The destination's steps once the migration checked out: the
    /// instance arrives (its VMM waits for the stream), this node answers
    /// `ready` and the source streams into the VMM, then the source's
    /// config volume comes and [`Self::hand_over`] follows. Returns how it
    /// ended and the takeover, if there was one. An arrival that fails
    /// before the takeover is abandoned: nothing of it stays here.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::node) async fn receive_into_engine(
        &self,
        control: &std::net::TcpStream,
        name: &str,
        migration: &str,
        (record, config): (InstanceRecord, Option<ConfigValues>),
        seen: Seen,
        (from, was_ready): (&str, bool),
        data: std::sync::mpsc::Receiver<std::net::TcpStream>,
    ) -> (Result<(), String>, Option<Taken>) {
        let connection = || -> std::io::Result<_> {
            let ready = control.try_clone()?;
            let reader = std::io::BufReader::new(control.try_clone()?);
            control.set_read_timeout(Some(STEP_TIMEOUT))?;
            Ok((ready, reader))
        };
        let (ready, reader) = match connection() {
            Ok(halves) => halves,
            Err(e) => return (Err(e.to_string()), None),
        };
        let identity = Identity {
            id: record.id.clone(),
            config,
            cluster: true,
        };
        let label = format!("migration from {from}");
        let arrival = match self.engine.arrive(record.request, identity, label).await {
            Ok(arrival) => arrival,
            Err(e) => return (Err(e.message), None),
        };
        let streamed = async {
            let from_ = from.to_string();
            let stream = tokio::task::spawn_blocking(move || await_data(ready, &data, &from_))
                .await
                .map_err(|e| OpError::internal("the data connection", e))??;
            arrival.receive_state(stream).await?;
            let from_ = from.to_string();
            tokio::task::spawn_blocking(move || read_volume(reader, &from_))
                .await
                .map_err(|e| OpError::internal("the control connection", e))?
        }
        .await;
        let volume = match streamed {
            Ok(volume) => volume,
            Err(e) => {
                arrival.abandon().await;
                return (Err(e.message), None);
            }
        };
        let checks = ArrivalChecks {
            answer_within: ANSWER_WITHIN,
            settle: ANSWER_SETTLE,
            was_ready,
        };
        self.hand_over(arrival, (name, migration), seen, volume, checks)
            .await
    }

    /// The switch-over, once the whole state is in (the VM still paused):
    /// the source's config volume in place, then ownership here
    /// ([`Self::take_over`]), and only then does the VM run, and its guest
    /// must pass `checks`. An arrival this node could not take over is
    /// abandoned: nothing of it stays here, and the source's paused copy
    /// runs on. Returns how it ended and the takeover, if there was one.
    pub(in crate::node) async fn hand_over(
        &self,
        arrival: Arrival,
        (name, migration): (&str, &str),
        seen: Seen,
        volume: ArrivedVolume,
        checks: ArrivalChecks,
    ) -> (Result<(), String>, Option<Taken>) {
        let taken = match arrival.write_volume(&volume.content).await {
            Ok(()) => {
                self.take_over(name, migration, seen, volume.downtime_ms, volume.ram_bytes)
                    .await
            }
            Err(e) => Err(e),
        };
        let taken = match taken {
            Ok(taken) => taken,
            Err(e) => {
                arrival.abandon().await;
                return (Err(e.message), None);
            }
        };
        let resumed = arrival.resume(checks).await;
        (resumed.map(|_| ()).map_err(|e| e.message), Some(taken))
    }

    /// The switch-over: ownership moves here in one transaction that
    /// checks the source still owns the instance under the migration's
    /// token and the migration still stands. The migration record is left
    /// `requested` until the guest answers here ([`Self::record_switch`]).
    pub(in crate::node) async fn take_over(
        &self,
        name: &str,
        migration: &str,
        seen: Seen,
        downtime_ms: u64,
        bytes: u64,
    ) -> Result<Taken, OpError> {
        let read = |e| etcd_error("cannot read the cluster", e);
        let (record, mkv) = self
            .store
            .get_json::<MigrationRecord>(&key(MIGRATIONS, name))
            .await
            .map_err(read)?
            .filter(|(m, _)| m.id == migration && m.state == MigrationState::Requested)
            .ok_or_else(|| OpError::conflict("the migration was called off"))?;
        let (mut instance, ikv) = self
            .store
            .get_json::<InstanceRecord>(&key(INSTANCES, name))
            .await
            .map_err(read)?
            .ok_or_else(|| OpError::conflict("the instance was removed"))?;
        let before = instance.clone();
        // Its replicated volumes' up-to-date replicas here become primary.
        let (volume_compares, volume_ops) = self.takeover_volumes(&instance).await?;
        instance.previous = instance.home.replace(self.name.clone());
        let owner = OwnerRecord {
            node: self.name.clone(),
            since: now_secs(),
        };
        let lease = self.lease();
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key(OWNERS, name), record.token),
                Compare::mod_revision(mkv.key.clone(), mkv.mod_revision),
                Compare::mod_revision(ikv.key.clone(), ikv.mod_revision),
                Compare::lease(key(NODES, &self.name), lease),
                // Its config and splices as this node made them: a change
                // the source took after they were read keeps it there.
                Compare::mod_revision(key(CONFIGS, name), seen.config),
                Compare::mod_revision(key(WIRINGS, name), seen.wiring),
            ])
            .when(volume_compares)
            .and_then([
                Op::put_leased(key(OWNERS, name), json(&owner), lease),
                Op::put(ikv.key.clone(), json(&instance)),
            ])
            .and_then(volume_ops);
        let response = self
            .store
            .txn(txn)
            .await
            .map_err(|e| etcd_error("cannot take the instance over", e))?;
        if !response.succeeded() {
            return Err(OpError::conflict(
                "the instance changed while it migrated; it stays where it was",
            ));
        }
        let revision = response.revision();
        self.note_handover(name, Handover::TookOver(revision));
        // Before its VM runs: no copy it uses is served as a replica.
        self.stop_serving_volumes_of(&instance);
        Ok(Taken {
            revision,
            instance: before,
            migration_rev: mkv.mod_revision,
            downtime_ms,
            bytes,
            at: Instant::now(),
        })
    }

    /// How a migration ended here after the takeover, while this node
    /// still owns the instance: `switched` once the guest answered (so a
    /// requester whose source dies now still learns that the move stands),
    /// or `failed` when it could not be given back. Best effort.
    pub(in crate::node) async fn record_migration(
        &self,
        name: &str,
        taken: &Taken,
        state: MigrationState,
    ) {
        let mkey = key(MIGRATIONS, name);
        let Ok(Some((mut record, kv))) = self.store.get_json::<MigrationRecord>(&mkey).await else {
            return;
        };
        record.state = state;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(mkey.clone(), taken.migration_rev),
                Compare::mod_revision(key(OWNERS, name), taken.revision),
            ])
            .and_then([Op::put_leased(mkey, json(&record), kv.lease)]);
        if !matches!(self.store.txn(txn).await, Ok(r) if r.succeeded()) {
            tracing::warn!(instance = %name, state = ?record.state, "cannot record how the migration ended");
        }
    }

    /// Gives instance `name` back to node `from` after a takeover whose
    /// guest did not answer here (its VM is gone already): the owner key
    /// names `from` again under `from`'s lease, and the instance record is
    /// as it was. Fenced on the takeover (nobody changed the owner key
    /// since) and on `from` still holding its lease; either failing leaves
    /// the instance with this node.
    pub(in crate::node) async fn give_back(
        &self,
        name: &str,
        from: &str,
        taken: &Taken,
    ) -> Result<(), String> {
        let source = self
            .store
            .get_json::<NodeRecord>(&key(NODES, from))
            .await
            .map_err(|e| format!("cannot read the cluster: {e}"))?
            .ok_or_else(|| format!("node {from} is down"))?;
        let lease = source.1.lease;
        let owner = OwnerRecord {
            node: from.to_string(),
            since: now_secs(),
        };
        let (volume_compares, volume_ops) = self.give_back_volumes(&taken.instance, from).await?;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key(OWNERS, name), taken.revision),
                Compare::mod_revision(key(INSTANCES, name), taken.revision),
                Compare::lease(key(NODES, from), lease),
            ])
            .when(volume_compares)
            .and_then([
                Op::put_leased(key(OWNERS, name), json(&owner), lease),
                Op::put(key(INSTANCES, name), json(&taken.instance)),
            ])
            .and_then(volume_ops);
        let response = self
            .store
            .txn(txn)
            .await
            .map_err(|e| format!("cannot write the cluster: {e}"))?;
        if !response.succeeded() {
            return Err("the instance or its source changed meanwhile".into());
        }
        let revision = response.revision();
        self.note_handover(name, Handover::GaveBack(revision));
        tracing::warn!(instance = %name, %from, "gave a migrated instance back: its guest did not answer here");
        Ok(())
    }

    /// A migration to this node that it took over (it owns the instance)
    /// but that no receive here is finishing: the daemon that took it over
    /// died before it said how it ended, and this one starts the instance
    /// afresh. Recorded `failed` (it was no live move), so the source
    /// drops its paused copy and `vroom migrate` says where it runs.
    pub(in crate::node) fn resolve_cut_arrival(
        &self,
        name: &str,
        record: &MigrationRecord,
        kv: &Kv,
        view: &View,
    ) {
        let Some((owner, okv)) = view.owners.get(name) else {
            return;
        };
        let receiving = self.incoming.lock_unpoisoned().contains_key(name);
        if owner.node != self.name || self.token(name).is_none() || receiving {
            return;
        }
        let mut failed = record.clone();
        failed.state = MigrationState::Failed {
            reason: format!(
                "vroomd on {} restarted after it took the instance over, so {name} was restarted there",
                self.name
            ),
        };
        tracing::warn!(instance = %name, from = %record.from, "a migration here was cut short after the takeover; the instance starts here afresh");
        let node = self.arc();
        let txn = Txn::new()
            .when([
                Compare::mod_revision(kv.key.clone(), kv.mod_revision),
                Compare::mod_revision(okv.key.clone(), okv.mod_revision),
            ])
            .and_then([Op::put_leased(kv.key.clone(), json(&failed), kv.lease)]);
        tokio::spawn(async move {
            let _ = node.store.txn(txn).await;
        });
    }
}

/// The source's config volume as it sent it after the stream, with
/// QEMU's numbers.
#[derive(Debug)]
pub(in crate::node) struct ArrivedVolume {
    pub(in crate::node) content: Vec<u8>,
    pub(in crate::node) downtime_ms: u64,
    pub(in crate::node) ram_bytes: u64,
}

/// Blocking: answers `ready` on the control connection, then waits for
/// the source's data connection (handed over by [`ClusterNode::data_arrived`]).
fn await_data(
    mut ready: std::net::TcpStream,
    data: &std::sync::mpsc::Receiver<std::net::TcpStream>,
    from: &str,
) -> Result<OwnedFd, OpError> {
    let io = |e: std::io::Error| OpError::internal("the control connection", e);
    ready.write_all(&line(&Control::Ready)).map_err(io)?;
    let waiting = Instant::now();
    loop {
        match data.recv_timeout(Duration::from_millis(100)) {
            Ok(stream) => return Ok(OwnedFd::from(stream)),
            Err(_) if closed(&ready) => {
                return Err(OpError::conflict(format!(
                    "node {from} went away before it streamed"
                )))
            }
            Err(_) if waiting.elapsed() > STEP_TIMEOUT => {
                return Err(OpError::conflict(
                    "the source did not open the data connection in time",
                ))
            }
            Err(_) => {}
        }
    }
}

/// Blocking: the [`Control::Volume`] the source sends once its VM paused
/// for good, and the volume's bytes after it.
fn read_volume(
    mut reader: std::io::BufReader<std::net::TcpStream>,
    from: &str,
) -> Result<ArrivedVolume, OpError> {
    let io = |e: std::io::Error| OpError::internal("the control connection", e);
    let mut header = String::new();
    reader.read_line(&mut header).map_err(io)?;
    let message: Control = serde_json::from_str(&header)
        .map_err(|_| OpError::conflict(format!("node {from} went away during the migration")))?;
    let (bytes, downtime_ms, ram_bytes) = match message {
        Control::Volume {
            bytes,
            downtime_ms,
            ram_bytes,
        } => (bytes, downtime_ms, ram_bytes),
        Control::Abort { reason } => {
            return Err(OpError::conflict(format!("node {from}: {reason}")))
        }
        other => {
            return Err(OpError::conflict(format!(
                "node {from} said {other:?} out of turn"
            )))
        }
    };
    if bytes > 64 * 1024 * 1024 {
        return Err(OpError::conflict("the config volume is implausibly large"));
    }
    let mut content = vec![0; bytes as usize];
    reader.read_exact(&mut content).map_err(io)?;
    Ok(ArrivedVolume {
        content,
        downtime_ms,
        ram_bytes,
    })
}
