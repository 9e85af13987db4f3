//! Cordon and drain: a drain plans where each instance of the node goes,
//! refuses (or with `--force` keeps them) when one has nowhere to go, moves
//! them live (or cold, by releasing them) and reports where each went; a
//! dead node is forgotten.

use super::*;

impl ClusterNode {
    pub(super) async fn forget_node(&self, name: &str) -> Result<(), OpError> {
        let view = self.view().await?;
        let info = view
            .node_info(name)
            .ok_or_else(|| OpError::not_found("node", name))?;
        if info.alive {
            return Err(OpError::conflict(format!(
                "node {name} is alive; stop its vroomd first"
            )));
        }
        let held: Vec<&str> = view
            .instances
            .iter()
            .filter(|(_, (r, _))| {
                r.home.as_deref() == Some(name) && r.request.placement.ha == HaPolicy::None
            })
            .map(|(n, _)| n.as_str())
            .collect();
        if !held.is_empty() {
            return Err(OpError::conflict(format!(
                "node {name} still holds {} (--ha none, waiting for it); remove them first",
                held.join(", ")
            )));
        }
        // Its copies of replicated volumes: the only up-to-date one of a
        // volume stays the node's to bring back; a primary whose replica
        // is up to date hands over to it (the replica's copy is re-homed
        // on another node when its instance runs).
        let sole: Vec<&str> = view
            .volumes
            .values()
            .filter(|(v, _)| v.primary == name && v.state != vroom_types::ReplicaState::UpToDate)
            .map(|(v, _)| v.name.as_str())
            .collect();
        if !sole.is_empty() {
            return Err(OpError::conflict(format!(
                "node {name} holds the only up-to-date copy of volume {}; bring it back, or remove the volume",
                sole.join(", ")
            )));
        }
        let mut compares = vec![Compare::create_revision(key(NODES, name), 0)];
        let mut ops = vec![
            Op::delete(key(MEMBERS, name)),
            Op::delete(key(CORDONS, name)),
        ];
        for (volume, kv) in view.volumes.values().filter(|(v, _)| v.primary == name) {
            compares.push(Compare::mod_revision(kv.key.clone(), kv.mod_revision));
            ops.push(Op::put(kv.key.clone(), json(&volume.promoted(now_secs()))));
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let done = self
            .store
            .txn(txn)
            .await
            .map_err(|e| etcd_error("cannot remove the node", e))?;
        if !done.succeeded() {
            return Err(OpError::conflict(format!(
                "node {name} came back; nothing changed"
            )));
        }
        Ok(())
    }

    pub(super) async fn set_cordon(&self, name: &str, value: Option<&[u8]>) -> Result<(), OpError> {
        let k = key(CORDONS, name);
        let done = match value {
            Some(v) => self.store.put(&k, v.to_vec()).await,
            None => self.store.delete(&k).await,
        };
        done.map_err(|e| etcd_error("cannot change the node", e))?;
        self.wake.notify_one();
        Ok(())
    }

    /// `node drain`: refuses, before changing anything, when an instance of
    /// the node has no node to go to, unless `force`: then those stay
    /// running there (the node is left cordoned, not draining). Otherwise
    /// cordons the node, waits until every instance moved off, and says
    /// where each went. An error when anything it meant to move did not.
    pub(super) async fn drain_node(&self, name: &str, force: bool) -> Result<DrainReport, OpError> {
        let view = self.view().await?;
        let info = view
            .node_info(name)
            .ok_or_else(|| OpError::not_found("node", name))?;
        if !info.alive {
            self.set_cordon(name, Some(DRAIN)).await?;
            return Err(OpError::conflict(format!(
                "node {name} is down: it is cordoned; its instances with HA move when its lease expires"
            )));
        }
        let (nodes, plan) = view.drain_plan(name);
        if !plan.stuck.is_empty() && !force {
            return Err(OpError::conflict(schedule::refusal(
                name,
                &nodes,
                &plan.stuck,
            )));
        }
        self.set_cordon(name, Some(DRAIN)).await?;
        // An owner key of the node created after this was taken back: a
        // move that no node took.
        let since = self.view().await?.revision;
        let mut stays: BTreeMap<String, String> = plan
            .stuck
            .iter()
            .map(|(i, _, why)| (i.clone(), schedule::explain(name, &nodes, why)))
            .collect();
        let mut waiting: BTreeSet<String> = plan
            .moves
            .iter()
            .map(|(i, _)| i.clone())
            .chain(plan.released.iter().cloned())
            .collect();
        let mut report = DrainReport {
            node: info,
            moved: vec![],
            released: vec![],
            kept: vec![],
        };
        let mut taken_back = vec![];
        let mut stuck_since: BTreeMap<String, std::time::Instant> = BTreeMap::new();
        let started = std::time::Instant::now();
        loop {
            let view = self.view().await?;
            let (nodes, now) = view.drain_plan(name);
            for inst in waiting.clone() {
                let owner = view.owners.get(&inst);
                match owner {
                    Some((o, _)) if o.node != name => {
                        report.moved.push(DrainedInstance {
                            instance: inst.clone(),
                            to: o.node.clone(),
                        });
                    }
                    Some((_, kv)) if kv.create_revision > since => taken_back.push(inst.clone()),
                    None if plan.released.contains(&inst) => report.released.push(inst.clone()),
                    // Removed meanwhile.
                    None if !view.instances.contains_key(&inst) => {}
                    // Released, not yet taken.
                    None => continue,
                    Some(_) => {
                        let why = now
                            .stuck
                            .iter()
                            .find(|(i, _, _)| *i == inst)
                            .filter(|_| !view.migrations.contains_key(&inst));
                        let Some((_, _, why)) = why else {
                            stuck_since.remove(&inst);
                            continue;
                        };
                        let first = *stuck_since
                            .entry(inst.clone())
                            .or_insert_with(std::time::Instant::now);
                        if first.elapsed() < STUCK_GRACE {
                            continue;
                        }
                        stays.insert(inst.clone(), schedule::explain(name, &nodes, why));
                    }
                }
                waiting.remove(&inst);
            }
            if waiting.is_empty() {
                break;
            }
            if started.elapsed() > DRAIN_TIMEOUT {
                let left: Vec<String> = waiting.into_iter().collect();
                return Err(OpError::new(
                    ErrorCode::Timeout,
                    format!(
                        "node {name} still owns {} after {} s",
                        left.join(", "),
                        DRAIN_TIMEOUT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // What stays may have moved after all (a node became ready).
        let view = self.view().await?;
        for (inst, reason) in stays {
            match view.owner_of(&inst) {
                Some(to) if to != name => report.moved.push(DrainedInstance {
                    instance: inst,
                    to: to.to_string(),
                }),
                Some(_) => report.kept.push(KeptInstance {
                    instance: inst,
                    reason,
                }),
                None => {}
            }
        }
        if !report.kept.is_empty() || !taken_back.is_empty() {
            // What is left stays: cordoned, no longer draining.
            self.set_cordon(name, Some(CORDON)).await?;
        }
        report.node = self.node(name).await?;
        let unforced: Vec<&KeptInstance> = report.kept.iter().filter(|_| !force).collect();
        if unforced.is_empty() && taken_back.is_empty() {
            return Ok(report);
        }
        let mut parts: Vec<String> = report
            .moved
            .iter()
            .map(|m| format!("moved {} to {}", m.instance, m.to))
            .collect();
        parts.extend(
            unforced
                .iter()
                .map(|k| format!("{} stays on {name}: {}", k.instance, k.reason)),
        );
        parts.extend(taken_back.iter().map(|i| {
            format!(
                "{i} runs on {name} again: no node took it within {} s",
                TAKE_BACK_AFTER.as_secs()
            )
        }));
        Err(OpError::conflict(format!(
            "node {name} is cordoned but not drained: {}",
            parts.join("; ")
        )))
    }

    /// Moves an owned instance off this drained node: live to the node the
    /// scheduler picks, or (not running, or the migration failed) cold, by
    /// releasing it. Returns whether it is on its way; `false` leaves it
    /// here: no node can take it (it wants to run), or it is being removed.
    pub(super) fn drain_one(&self, name: &str, view: &View, local: Option<&Instance>) -> bool {
        if self.draining.lock_unpoisoned().contains(name) {
            return true;
        }
        let Some((record, _)) = view.instances.get(name) else {
            return false;
        };
        let wants_running = record.desired == DesiredState::Running;
        let target = view.target_for(name, &self.name);
        if record.removing || (target.is_none() && wants_running) {
            return false;
        }
        self.draining.lock_unpoisoned().insert(name.to_string());
        let running = local.is_some_and(|i| i.status.state == InstanceState::Running);
        let target = target.filter(|_| running);
        let node = self.arc();
        let name = name.to_string();
        tokio::spawn(async move {
            let moved = match target {
                Some(to) => match node.request_migration(&name, &to).await {
                    Ok(m) => {
                        tracing::info!(instance = %name, %to, downtime_ms = m.downtime_ms, "drained live");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(instance = %name, %to, error = %e.message, "cannot drain live; moving it cold");
                        false
                    }
                },
                None => false,
            };
            if !moved && node.release(&name, true).await && wants_running {
                node.take_back_unless_taken(&name).await;
            }
            node.draining.lock_unpoisoned().remove(&name);
            node.wake.notify_one();
        });
        true
    }

    /// Stops an owned instance here and gives it up, for the leader to
    /// place elsewhere (a cold move: drain, or a failover that cannot
    /// start here). For a `move`, its status says it is stopped here (not
    /// the `stopping` and the pid it had) until a node takes it; otherwise
    /// the status (the error of a failed start) stays. Returns whether it
    /// was given up.
    pub(super) async fn release(&self, name: &str, moving: bool) -> bool {
        let Some(token) = self.token(name) else {
            return false;
        };
        let mut last = None;
        if let Ok(instance) = self.engine.get(name) {
            let _ = self.engine.action(name, InstanceAction::Stop).await;
            let _ = self.engine.remove(name, true).await;
            last = Some(instance);
        }
        let mut ops = vec![Op::delete(key(OWNERS, name))];
        if moving {
            let status = StatusRecord {
                node: self.name.clone(),
                state: InstanceState::Stopped,
                error: None,
                instance: last.map(|mut i| {
                    i.status = vroom_types::InstanceStatus {
                        restarts: i.status.restarts,
                        ..vroom_types::InstanceStatus::stopped()
                    };
                    i
                }),
                updated_at: now_secs(),
            };
            ops.push(Op::put(key(STATUSES, name), json(&status)));
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(key(OWNERS, name), token)])
            .and_then(ops);
        if matches!(self.store.txn(txn).await, Ok(r) if r.succeeded()) {
            self.owned.lock_unpoisoned().remove(name);
            tracing::info!(instance = %name, "released for a move");
            return true;
        }
        false
    }

    /// After a drain released `name` for a move: if no node took it within
    /// [`TAKE_BACK_AFTER`] (the node picked for it was cordoned, went down
    /// or cannot start it), this node takes it back and runs it again, so a
    /// move never leaves an instance down for longer.
    pub(super) async fn take_back_unless_taken(&self, name: &str) {
        let started = std::time::Instant::now();
        while started.elapsed() < TAKE_BACK_AFTER {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Ok(Some(_)) = self.store.get(&key(OWNERS, name)).await {
                return;
            }
        }
        let owner = OwnerRecord {
            node: self.name.clone(),
            since: now_secs(),
        };
        let txn = Txn::new()
            .when([
                Compare::create_revision(key(OWNERS, name), 0),
                Compare::exists(key(INSTANCES, name)),
                Compare::lease(key(NODES, &self.name), self.lease()),
            ])
            .and_then([
                Op::put_leased(key(OWNERS, name), json(&owner), self.lease()),
                // A placement nobody claimed: void now.
                Op::delete(key(ASSIGNS, name)),
            ]);
        match self.store.txn(txn).await {
            Ok(r) if r.succeeded() => {
                tracing::warn!(instance = %name, node = %self.name, after_s = TAKE_BACK_AFTER.as_secs(), "no node took the instance released for a move; it runs here again");
                self.wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "cannot take back an instance no node took")
            }
        }
    }
}
