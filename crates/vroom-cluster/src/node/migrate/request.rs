//! `vroom migrate`: any node checks the request, records the migration
//! for the owner to pick up, and waits for it to end.

use vroom_types::Migration;

use super::*;

impl ClusterNode {
    /// `vroom migrate`: checks the request, asks the owner, waits for the end.
    pub(in crate::node) async fn request_migration(
        &self,
        name: &str,
        to: &str,
    ) -> Result<Migration, OpError> {
        let started = Instant::now();
        let view = self.view().await?;
        let (record, _) = view.instances.get(name).ok_or_else(|| {
            if self.engine.get(name).is_ok() {
                OpError::conflict(format!(
                    "instance {name} runs on this node only; only a cluster instance migrates"
                ))
            } else {
                OpError::not_found("instance", name)
            }
        })?;
        if record.removing {
            return Err(OpError::conflict(format!(
                "instance {name} is being removed"
            )));
        }
        // With replicated volumes, their replicas move to the destination
        // first (unless they are up to date there), then take over as
        // primary: the wait allows for their copy.
        let volumes: Vec<&VolumeRecord> = Self::volumes_of(&view, record)
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        let fills = volumes::fills_within(volumes.iter().copied(), to);
        if let Some((m, _)) = view.migrations.get(name) {
            return Err(OpError::conflict(format!(
                "instance {name} is being migrated to {} already",
                m.to
            )));
        }
        let (owner, okv) = view.owners.get(name).ok_or_else(|| {
            OpError::conflict(format!(
                "instance {name} runs nowhere now; only a running instance migrates"
            ))
        })?;
        let from = owner.node.clone();
        if from == to {
            return Err(OpError::conflict(format!(
                "instance {name} already runs on {to}"
            )));
        }
        let Some((target, _)) = view.nodes.get(to) else {
            return Err(if view.members.contains_key(to) {
                OpError::conflict(format!("node {to} is down"))
            } else {
                OpError::not_found("node", to)
            });
        };
        if view.cordons.contains_key(to) {
            return Err(OpError::conflict(format!(
                "node {to} is cordoned; `vroom node uncordon {to}` lets instances onto it"
            )));
        }
        let free = target.mem_total_mib.saturating_sub(target.mem_used_mib);
        let need = record.mem_mib + schedule::VMM_OVERHEAD_MIB;
        if free < need {
            return Err(OpError::new(
                ErrorCode::ResourceExhausted,
                format!("node {to} has {free} MiB free; {name} needs {need} MiB"),
            ));
        }
        if target.peer.is_none() {
            return Err(OpError::conflict(format!(
                "node {to} runs a vroom that does not take migrations"
            )));
        }
        self.await_running(name, &from).await?;
        let migration = MigrationRecord {
            id: format!("{:016x}", rand::random::<u64>()),
            from: from.clone(),
            to: to.to_string(),
            token: okv.mod_revision,
            secret: secret(),
            requested_at: now_secs(),
            state: MigrationState::Requested,
        };
        let mkey = key(MIGRATIONS, name);
        let lease = self.lease();
        let txn = Txn::new()
            .when([
                Compare::create_revision(mkey.clone(), 0),
                Compare::mod_revision(key(OWNERS, name), okv.mod_revision),
                Compare::lease(key(NODES, &self.name), lease),
            ])
            .and_then([Op::put_leased(mkey.clone(), json(&migration), lease)]);
        let asked = self
            .store
            .txn(txn)
            .await
            .map_err(|e| etcd_error("cannot ask for the migration", e))?;
        if !asked.succeeded() {
            return Err(OpError::conflict(format!(
                "instance {name} changed hands or is being migrated; try again"
            )));
        }
        self.wake.notify_one();
        let outcome = self.await_migration(name, &migration, started, fills).await;
        // The record goes whatever happened (unless another replaced it).
        if let Ok(Some((m, kv))) = self.store.get_json::<MigrationRecord>(&mkey).await {
            if m.id == migration.id {
                let txn = Txn::new()
                    .when([Compare::mod_revision(mkey, kv.mod_revision)])
                    .and_then([Op::delete(kv.key.clone())]);
                let _ = self.store.txn(txn).await;
            }
        }
        outcome
    }

    /// Waits a little for the owner to publish the instance running (it
    /// may have just arrived there).
    pub(in crate::node) async fn await_running(
        &self,
        name: &str,
        owner: &str,
    ) -> Result<(), OpError> {
        let since = Instant::now();
        loop {
            let status = self
                .store
                .get_json::<StatusRecord>(&key(STATUSES, name))
                .await
                .map_err(|e| etcd_error("cannot read the cluster", e))?;
            let state = status
                .filter(|(s, _)| s.node == owner)
                .map(|(s, _)| s.state);
            if state == Some(InstanceState::Running) {
                return Ok(());
            }
            if since.elapsed() > Duration::from_secs(5) {
                let state = state.map(|s| format!("{s:?}").to_lowercase());
                return Err(OpError::conflict(format!(
                    "instance {name} is {} on {owner}; only a running instance migrates",
                    state.as_deref().unwrap_or("not running")
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(in crate::node) async fn await_migration(
        &self,
        name: &str,
        migration: &MigrationRecord,
        started: Instant,
        fills: Duration,
    ) -> Result<Migration, OpError> {
        let (from, to) = (&migration.from, &migration.to);
        let report = |downtime_ms, switchover_ms, bytes| {
            Ok(Migration {
                instance: Name::new(name).expect("invariant: an instance's name is valid"),
                from: Name::new(from).expect("invariant: a node's name is valid"),
                to: Name::new(to).expect("invariant: a node's name is valid"),
                total_ms: started.elapsed().as_millis() as u64,
                downtime_ms,
                switchover_ms,
                bytes,
            })
        };
        // The destination boots the VM's appliances first: each may take
        // its ready timeout (the source waits as long).
        let appliances = match self.store.get_json::<Wiring>(&key(WIRINGS, name)).await {
            Ok(Some((wiring, _))) => wiring.splices.len() as u64,
            _ => 0,
        };
        let limit = MIGRATE_TIMEOUT
            + fills
            + Duration::from_secs(
                appliances * (vroom_core::engine::DEFAULT_READY_TIMEOUT_SECS + 10),
            );
        let mut switched_at = None;
        while started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let current = match self
                .store
                .get_json::<MigrationRecord>(&key(MIGRATIONS, name))
                .await
            {
                Ok(current) => current,
                Err(_) => continue,
            };
            let Some((current, _)) = current.filter(|(m, _)| m.id == migration.id) else {
                return Err(OpError::conflict(format!(
                    "the migration of {name} was called off"
                )));
            };
            match current.state {
                MigrationState::Done {
                    downtime_ms,
                    switchover_ms,
                    bytes,
                } => return report(downtime_ms, switchover_ms, bytes),
                MigrationState::Failed { reason } => {
                    // Where it runs now: the source kept it, or a move cut
                    // short after the hand-over left it on `to`.
                    let runs = match self.store.get_json::<OwnerRecord>(&key(OWNERS, name)).await {
                        Ok(Some((owner, _))) => format!("it runs on {}", owner.node),
                        _ => "it runs nowhere now; the cluster restarts it by its policy".into(),
                    };
                    return Err(OpError::conflict(format!(
                        "cannot migrate {name} to {to}: {reason}; {runs}"
                    )));
                }
                // The source did not confirm (it may have died right after
                // the handover): the move stands.
                MigrationState::Switched { downtime_ms, bytes } => {
                    let since = *switched_at.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(5) {
                        return report(downtime_ms, downtime_ms, bytes);
                    }
                }
                MigrationState::Requested => {
                    // Read after the record: a handover between the two
                    // reads shows as the owner being `to`.
                    let owner = self
                        .store
                        .get_json::<OwnerRecord>(&key(OWNERS, name))
                        .await
                        .ok();
                    let lost = match owner {
                        Some(None) => true,
                        // (A source that kept it rewrites its key: still its.)
                        Some(Some((o, _))) => o.node != *from && o.node != *to,
                        None => false,
                    };
                    if lost {
                        let runs = match self.await_owner(name).await {
                            Some(node) => format!("the cluster restarted it on {node}"),
                            None => "the cluster restarts it by its policy".into(),
                        };
                        return Err(OpError::conflict(format!(
                            "node {from} lost instance {name} during the migration; {runs}"
                        )));
                    }
                }
            }
        }
        Err(OpError::new(
            ErrorCode::Internal,
            format!("the migration of {name} to {to} did not finish in {limit:?}"),
        ))
    }

    /// The node that owns `name` once one does, waiting a little (a lost
    /// instance is claimed again within a few passes).
    pub(in crate::node) async fn await_owner(&self, name: &str) -> Option<String> {
        let since = Instant::now();
        while since.elapsed() < OWNER_WAIT {
            if let Ok(Some((owner, _))) =
                self.store.get_json::<OwnerRecord>(&key(OWNERS, name)).await
            {
                return Some(owner.node);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

/// How long `vroom migrate` waits for a lost instance's new owner, to say
/// where it runs.
pub(in crate::node) const OWNER_WAIT: Duration = Duration::from_secs(20);
