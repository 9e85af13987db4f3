//! The source's side of a live migration: it streams the VM to the
//! destination, then decides by the owner key whether it keeps the
//! instance (resumes its paused copy) or lets it go, and records the end.

use std::os::fd::OwnedFd;

use tokio::io::AsyncWriteExt;
use vroom_core::LiveOutgoing;

use super::*;

impl ClusterNode {
    /// Keeps an instance after a migration out that did not hand it over:
    /// rewrites the owner key (same owner, this lease) if the token is
    /// still `token`, which voids the token a late takeover would compare.
    /// `Ok(false)`: another node owns it now.
    pub(in crate::node) async fn reclaim(
        &self,
        name: &str,
        token: i64,
    ) -> Result<bool, StoreError> {
        let lease = self.lease();
        let owner = OwnerRecord {
            node: self.name.clone(),
            since: now_secs(),
        };
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key(OWNERS, name), token),
                Compare::lease(key(NODES, &self.name), lease),
            ])
            .and_then([Op::put_leased(key(OWNERS, name), json(&owner), lease)]);
        let response = self.store.txn(txn).await?;
        if !response.succeeded() {
            return Ok(false);
        }
        let revision = response.revision();
        self.owned
            .lock_unpoisoned()
            .insert(name.to_string(), revision);
        Ok(true)
    }

    /// After a migration out: keeps instance `name` if its owner key names
    /// this node (it never moved, or the destination gave it back),
    /// rewriting the key under this node's lease. `Ok(false)`: another
    /// node has it.
    pub(in crate::node) async fn keep(&self, name: &str) -> Result<bool, StoreError> {
        for _ in 0..3 {
            let Some((owner, kv)) = self
                .store
                .get_json::<OwnerRecord>(&key(OWNERS, name))
                .await?
            else {
                return Ok(false);
            };
            if owner.node != self.name {
                return Ok(false);
            }
            if self.reclaim(name, kv.mod_revision).await? {
                return Ok(true);
            }
            // Changed between the read and the rewrite: read it again.
        }
        Ok(false)
    }

    /// The owner's part of its pass: starts the migrations asked of it.
    pub(in crate::node) fn start_migrations(&self, view: &View) {
        for (name, (record, kv)) in &view.migrations {
            if record.to == self.name && record.state == MigrationState::Requested {
                self.resolve_cut_arrival(name, record, kv, view);
            }
            if record.from != self.name || record.state != MigrationState::Requested {
                continue;
            }
            let busy = self.migrating.lock_unpoisoned().contains(name);
            match self.token(name) {
                Some(token) if token == record.token => {}
                // Kept after an attempt a restart cut short: this one is over.
                Some(_) if !busy => {
                    let mut failed = record.clone();
                    failed.state = MigrationState::Failed {
                        reason: format!("vroomd on {} restarted during the migration", self.name),
                    };
                    let node = self.arc();
                    let (k, revision, lease) = (kv.key.clone(), kv.mod_revision, kv.lease);
                    tokio::spawn(async move {
                        let txn = Txn::new()
                            .when([Compare::mod_revision(k.clone(), revision)])
                            .and_then([Op::put_leased(k, json(&failed), lease)]);
                        let _ = node.store.txn(txn).await;
                    });
                    continue;
                }
                _ => continue,
            }
            let Some(peer) = view.nodes.get(&record.to).and_then(|(n, _)| n.peer.clone()) else {
                continue;
            };
            if !self.migrating.lock_unpoisoned().insert(name.clone()) {
                continue;
            }
            let node = self.arc();
            let (name, record, revision) = (name.clone(), record.clone(), kv.mod_revision);
            tokio::spawn(async move {
                node.migrate_out(&name, record, revision, &peer).await;
                node.migrating.lock_unpoisoned().remove(&name);
                node.wake.notify_one();
            });
        }
    }

    pub(in crate::node) async fn migrate_out(
        &self,
        name: &str,
        record: MigrationRecord,
        revision: i64,
        peer: &str,
    ) {
        tracing::info!(instance = %name, to = %record.to, "migrating");
        self.event(
            NewEvent::new(EventKind::Migration, "started", name)
                .message(format!("to {}", record.to))
                .detail("to", record.to.clone()),
        );
        // Its volumes' replicas on the destination first (moved and filled
        // there if they were elsewhere): the takeover swaps the roles.
        if let Err(reason) = self.replicas_to(name, &record, None).await {
            let reason = format!("its volumes' replicas are not on {}: {reason}", record.to);
            self.record_migration_kept(name, &record, revision, reason)
                .await;
            return;
        }
        let outcome = self.send(name, &record, peer).await;
        // Decided by the owner key (a destination whose guest did not
        // answer gave it back) and, when the destination's answer did not
        // come, by the migration record; fenced: a takeover still in flight
        // can no longer succeed once this node has rewritten its owner key.
        // A destination that hung up (its daemon died, or it closed the
        // connection) never gives the instance back: it gives back only over
        // an open control connection. Only a silent one may still decide.
        let unheard = matches!(&outcome, Err(reason) if !reason.contains(WENT_AWAY));
        let still_owner = match self.await_decision(name, &record, unheard).await {
            Ok(mine) => mine,
            // Cannot tell: the VM stays paused until a pass can.
            Err(_) => return,
        };
        if still_owner {
            if let Err(e) = self.engine.resume_unmigrated(name).await {
                tracing::warn!(instance = %name, error = %e.message, "cannot resume an instance whose migration failed");
            }
        } else if self.engine.get(name).is_ok() {
            // Handed over: the paused copy here goes, and its splices.
            self.engine.drop_wiring(name).await;
            let _ = self.engine.remove(name, true).await;
        }
        let mkey = key(MIGRATIONS, name);
        let Ok(Some((mut current, kv))) = self.store.get_json::<MigrationRecord>(&mkey).await
        else {
            return;
        };
        if current.id != record.id {
            return;
        }
        let state = match (&outcome, still_owner) {
            (Ok((stats, switchover_ms)), false) => MigrationState::Done {
                downtime_ms: stats.downtime_ms,
                switchover_ms: *switchover_ms,
                bytes: stats.bytes,
            },
            (Err(reason), true) => MigrationState::Failed {
                reason: reason.clone(),
            },
            (Ok(_), true) => MigrationState::Failed {
                reason: format!("node {} did not take the instance over", record.to),
            },
            // Handed over, but the source did not hear how it ended. The
            // destination decided (the record is `switched`, or `failed`
            // by a destination that restarted after its takeover), or it
            // never said within the wait: a failure, which the requester
            // reports with the node that owns the instance now.
            (Err(reason), false) => match current.state {
                MigrationState::Requested => MigrationState::Failed {
                    reason: format!(
                        "{reason}; node {} took the instance over and did not say whether its guest runs",
                        record.to
                    ),
                },
                _ => return,
            },
        };
        match &state {
            MigrationState::Done {
                downtime_ms,
                switchover_ms,
                ..
            } => {
                tracing::info!(instance = %name, to = %record.to, downtime_ms, switchover_ms, "migrated");
                self.event(
                    NewEvent::new(EventKind::Migration, "completed", name)
                        .message(format!("to {} ({downtime_ms} ms down)", record.to))
                        .detail("to", record.to.clone())
                        .detail("downtime_ms", *downtime_ms)
                        .detail("switchover_ms", *switchover_ms),
                );
            }
            MigrationState::Failed { reason } if still_owner => {
                tracing::warn!(instance = %name, to = %record.to, %reason, "the migration failed; the instance runs here");
                self.event(
                    NewEvent::new(EventKind::Migration, "failed", name)
                        .message(format!("{reason}; it runs here"))
                        .detail("to", record.to.clone()),
                );
            }
            MigrationState::Failed { reason } => {
                tracing::warn!(instance = %name, to = %record.to, %reason, "the migration was cut short after the hand-over; the destination has the instance");
                self.event(
                    NewEvent::new(EventKind::Migration, "cut_short", name)
                        .message(format!("{reason}; {} has it", record.to))
                        .detail("to", record.to.clone()),
                );
            }
            _ => {}
        }
        // A source that kept the instance expects the record as it asked;
        // otherwise as the destination left it.
        let expect = if still_owner {
            revision
        } else {
            kv.mod_revision
        };
        current.state = state;
        let txn = Txn::new()
            .when([Compare::mod_revision(mkey.clone(), expect)])
            .and_then([Op::put_leased(mkey, json(&current), kv.lease)]);
        let _ = self.store.txn(txn).await;
    }

    /// A migration out that failed before its VM was streamed: the
    /// instance runs on here; the record says why.
    async fn record_migration_kept(
        &self,
        name: &str,
        record: &MigrationRecord,
        revision: i64,
        reason: String,
    ) {
        tracing::warn!(instance = %name, to = %record.to, %reason, "the migration failed; the instance runs here");
        self.event(
            NewEvent::new(EventKind::Migration, "failed", name)
                .message(format!("{reason}; it runs here"))
                .detail("to", record.to.clone()),
        );
        let mkey = key(MIGRATIONS, name);
        let Ok(Some((mut current, kv))) = self.store.get_json::<MigrationRecord>(&mkey).await
        else {
            return;
        };
        if current.id != record.id {
            return;
        }
        current.state = MigrationState::Failed { reason };
        let txn = Txn::new()
            .when([Compare::mod_revision(mkey.clone(), revision)])
            .and_then([Op::put_leased(mkey, json(&current), kv.lease)]);
        let _ = self.store.txn(txn).await;
    }

    /// After a migration out: whether this node keeps instance `name`
    /// (see [`keep`](Self::keep)). When the destination's answer did not
    /// come (`unheard`), the destination may still be deciding: while it
    /// owns the instance and the migration is still `requested`, the paused
    /// copy here stays (a give-back may yet come), up to [`DECISION_WAIT`].
    pub(in crate::node) async fn await_decision(
        &self,
        name: &str,
        record: &MigrationRecord,
        unheard: bool,
    ) -> Result<bool, StoreError> {
        let since = Instant::now();
        loop {
            if self.keep(name).await? {
                return Ok(true);
            }
            if !unheard {
                return Ok(false);
            }
            let owner = self
                .store
                .get_json::<OwnerRecord>(&key(OWNERS, name))
                .await?
                .map(|(o, _)| o.node);
            let migration = self
                .store
                .get_json::<MigrationRecord>(&key(MIGRATIONS, name))
                .await?
                .filter(|(m, _)| m.id == record.id)
                .map(|(m, _)| m.state);
            let waiting = since.elapsed() < DECISION_WAIT;
            match source_decision(
                owner.as_deref(),
                &self.name,
                &record.to,
                migration.as_ref(),
                waiting,
            ) {
                // Given back since: `keep` takes it on the next round.
                SourceDecision::Keep if waiting => {}
                SourceDecision::Wait => {}
                SourceDecision::Keep | SourceDecision::Release => return Ok(false),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Streams `name` to the destination; returns QEMU's numbers and the
    /// switch-over time as the source saw it.
    pub(in crate::node) async fn send(
        &self,
        name: &str,
        record: &MigrationRecord,
        peer: &str,
    ) -> Result<(vroom_core::driver::LiveStats, u64), String> {
        let to = &record.to;
        // Its splices and mirrors go too: recorded as they are now, for the
        // destination to make before the VM arrives.
        let wiring = self.engine.wiring_to_carry(name).map_err(|e| e.message)?;
        self.put_wiring(name, wiring.as_ref())
            .await
            .map_err(|e| e.message)?;
        // The destination boots each appliance before it is ready.
        let appliances = wiring.as_ref().map_or(0, |w| w.splices.len()) as u64;
        let ready_within = STEP_TIMEOUT
            + Duration::from_secs(
                appliances * (vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS + 10),
            );
        let hello = Hello::Control {
            instance: name.to_string(),
            migration: record.id.clone(),
            secret: record.secret.clone(),
            ready: self.engine.guest_ready(name).await,
        };
        let control = self.connect_peer(to, peer, &hello).await?;
        let (reader, mut writer) = control.into_split();
        let mut reader = tokio::io::BufReader::new(reader);
        let gone = |e: std::io::Error| format!("node {to} {WENT_AWAY}: {e}");
        match read_control(&mut reader, to, ready_within).await? {
            Control::Ready => {}
            Control::Refused { reason } | Control::Failed { reason } => {
                return Err(format!("node {to} refused it: {reason}"))
            }
            other => return Err(format!("node {to} said {other:?} out of turn")),
        }
        let hello = Hello::Data {
            migration: record.id.clone(),
            secret: record.secret.clone(),
        };
        let data = self.connect_peer(to, peer, &hello).await?;
        let _ = data.set_nodelay(true);
        let data = OwnedFd::from(into_blocking(data).map_err(gone)?);
        let sent: LiveOutgoing = match self.engine.send_live(name, data).await {
            Ok(sent) => sent,
            Err(e) => {
                let abort = Control::Abort {
                    reason: e.message.clone(),
                };
                let _ = writer.write_all(&line(&abort)).await;
                return Err(e.message);
            }
        };
        let paused = Instant::now();
        let header = Control::Volume {
            bytes: sent.volume.len() as u64,
            downtime_ms: sent.stats.downtime_ms,
            ram_bytes: sent.stats.bytes,
        };
        // Bounded: the VM stays paused until this ends.
        let handed = async {
            writer.write_all(&line(&header)).await?;
            writer.write_all(&sent.volume).await
        };
        tokio::time::timeout(STEP_TIMEOUT, handed)
            .await
            .map_err(|_| format!("node {to} did not take the config volume in {STEP_TIMEOUT:?}"))?
            .map_err(gone)?;
        match read_control(&mut reader, to, STEP_TIMEOUT).await? {
            // The switch-over as the guest saw it: to its `cont`, not the
            // check that followed while it ran.
            Control::Resumed { checked_ms } => {
                let switchover_ms = sent.stats.downtime_ms
                    + (paused.elapsed().as_millis() as u64).saturating_sub(checked_ms);
                self.send_console(name, &mut writer, to).await;
                Ok((sent.stats, switchover_ms))
            }
            Control::Failed { reason } => Err(format!("node {to}: {reason}")),
            other => Err(format!("node {to} said {other:?} out of turn")),
        }
    }

    /// After `resumed`: the paused copy's console history, for the
    /// destination's log. Best effort: the move is done either way.
    pub(in crate::node) async fn send_console(
        &self,
        name: &str,
        writer: &mut tokio::net::tcp::OwnedWriteHalf,
        to: &str,
    ) {
        let history = match self.engine.console_history(name) {
            Ok(history) => history,
            Err(e) => {
                tracing::warn!(instance = %name, error = %e.message, "cannot read the console history to send");
                return;
            }
        };
        let header = Control::Console {
            earlier: history.earlier.iter().map(|b| b.len() as u64).collect(),
            current: history.current.len() as u64,
            written: history.written,
        };
        let sent = async {
            writer.write_all(&line(&header)).await?;
            for bytes in history.earlier.iter().chain([&history.current]) {
                writer.write_all(bytes).await?;
            }
            writer.flush().await
        };
        match tokio::time::timeout(CONSOLE_WAIT, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(instance = %name, %to, error = %e, "cannot send the console history")
            }
            Err(_) => {
                tracing::warn!(instance = %name, %to, "sending the console history timed out")
            }
        }
    }
}

/// What a source whose destination's answer did not come does with its
/// paused copy, by the owner key (`owner`), the migration's state (`None`
/// once it is gone or replaced) and whether it may still wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::node) enum SourceDecision {
    /// The owner key names the source (given back): it keeps it.
    Keep,
    /// The destination owns it and has not said how it ended: it may still
    /// give it back, so the paused copy stays.
    Wait,
    /// The destination has it (or nobody does): the paused copy goes.
    Release,
}

pub(in crate::node) fn source_decision(
    owner: Option<&str>,
    me: &str,
    to: &str,
    migration: Option<&MigrationState>,
    waiting: bool,
) -> SourceDecision {
    match owner {
        Some(o) if o == me => SourceDecision::Keep,
        Some(o) if o == to && waiting && migration == Some(&MigrationState::Requested) => {
            SourceDecision::Wait
        }
        _ => SourceDecision::Release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding (issue 23): a source that did not hear the answer
    /// dropped its paused copy as soon as the destination owned the
    /// instance, although the destination could still give it back. It
    /// waits while the destination owns it and the migration is still
    /// `requested`, and only within its bound.
    #[test]
    fn a_source_keeps_its_paused_copy_while_the_destination_decides() {
        use SourceDecision::*;
        let requested = MigrationState::Requested;
        let switched = MigrationState::Switched {
            downtime_ms: 1,
            bytes: 1,
        };
        let failed = MigrationState::Failed {
            reason: "restarted".into(),
        };
        #[rustfmt::skip]
        let cases: &[(Option<&str>, Option<&MigrationState>, bool, SourceDecision)] = &[
            // owner    migration         waiting  decision
            (Some("n1"), Some(&requested), true,  Keep),
            (Some("n1"), Some(&switched),  true,  Keep),
            (Some("n2"), Some(&requested), true,  Wait),
            (Some("n2"), Some(&requested), false, Release),
            (Some("n2"), Some(&switched),  true,  Release),
            (Some("n2"), Some(&failed),    true,  Release),
            (Some("n2"), None,             true,  Release),
            (Some("n3"), Some(&requested), true,  Release),
            (None,       Some(&requested), true,  Release),
        ];
        for (owner, migration, waiting, want) in cases {
            assert_eq!(
                source_decision(*owner, "n1", "n2", *migration, *waiting),
                *want,
                "owner {owner:?} migration {migration:?} waiting {waiting}"
            );
        }
    }
}
