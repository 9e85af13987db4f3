//! The reconcile loop: each pass reads the cluster once, the leader places
//! what has no node, a node claims what was placed on it, and the local
//! engine is made to run exactly what the node owns; then the node
//! publishes what runs here, under its fencing token.

use super::*;

impl ClusterNode {
    /// Starts the reconcile loop and the watch that wakes it.
    pub fn start(self: &Arc<Self>) {
        let listener = self.peers.lock_unpoisoned().take();
        if let Some(listener) = listener {
            let node = self.clone();
            tokio::spawn(async move { node.serve_peers(listener).await });
        }
        let node = self.clone();
        tokio::spawn(async move { node.watch().await });
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = node.pass().await {
                    tracing::warn!(error = %e, "cluster pass failed");
                    if let StoreError::LeaseNotFound(lease) = e {
                        node.lease_gone(lease);
                    }
                }
                let _ = tokio::time::timeout(TICK, node.wake.notified()).await;
            }
        });
    }

    pub(super) async fn watch(self: Arc<Self>) {
        loop {
            match self.store.watch(ROOT).await {
                Ok(mut stream) => {
                    while stream.changed().await {
                        self.wake.notify_one();
                        self.check_lease_key().await;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cluster watch failed; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One reconcile pass.
    pub(super) async fn pass(&self) -> Result<(), StoreError> {
        if !self.lease_alive() {
            return Ok(());
        }
        let (kvs, revision) = self.store.list(ROOT).await?;
        let mut view = View::parse(kvs);
        view.revision = revision;
        let lease = self.lease();
        // The node's own key, bound to its lease, gone from a fresh read:
        // the lease was revoked, perhaps before its time (a second way to
        // learn it, beside the watch's).
        if view
            .nodes
            .get(&self.name)
            .is_none_or(|(_, kv)| kv.lease != lease)
        {
            tracing::error!(
                lease,
                "this node's key is gone from etcd: its lease was revoked; fencing its VMs now"
            );
            self.lease_gone(lease);
            return Ok(());
        }
        if view.leader.is_none() {
            self.try_lead(lease).await?;
        }
        let leads = view
            .leader
            .as_ref()
            .is_some_and(|(l, ls)| *l == self.name && *ls == lease);
        self.leads.store(leads, Ordering::SeqCst);
        self.notice_lost_nodes(&view, leads);
        if leads {
            self.schedule(&view).await?;
        }
        let mut claimed = false;
        for (name, (node, _)) in &view.assigns {
            if *node == self.name && !view.owners.contains_key(name) {
                claimed |= self.claim(name, &view).await?;
            }
        }
        let view = if claimed {
            let (kvs, revision) = self.store.list(ROOT).await?;
            let mut view = View::parse(kvs);
            view.revision = revision;
            view
        } else {
            view
        };
        if !self.lease_alive() {
            return Ok(());
        }
        self.adopt(&view);
        self.converge(&view).await;
        self.replicate(&view).await;
        self.start_migrations(&view);
        self.join_networks(&view).await;
        self.publish(&view).await;
        self.prepare_standby(&view);
        Ok(())
    }

    /// The event of a node whose lease ended since the last pass (it died,
    /// was cut off, or was removed): every node keeps track, the leader
    /// says it (a node that has just taken over the lead from a dead one
    /// says the dead one's loss).
    fn notice_lost_nodes(&self, view: &View, leads: bool) {
        // A view with no leader is the one a new leader is elected in: what
        // was lost is said at its first pass as the leader.
        if view.leader.is_none() {
            return;
        }
        let live: BTreeSet<String> = view.nodes.keys().cloned().collect();
        let before = self.seen_nodes.lock_unpoisoned().replace(live.clone());
        if !leads {
            return;
        }
        for gone in before.iter().flat_map(|b| b.difference(&live)) {
            tracing::warn!(node = %gone, "a node is gone: its lease ended or it was removed");
            self.event(
                NewEvent::new(EventKind::Node, "lost", gone)
                    .message("its lease ended (it died, was cut off, or was removed)"),
            );
        }
    }

    pub(super) async fn try_lead(&self, lease: i64) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([Compare::create_revision(LEADER, 0)])
            .and_then([Op::put_leased(LEADER, self.name.clone(), lease)]);
        if self.store.txn(txn).await?.succeeded() {
            tracing::info!(node = %self.name, "this node leads the cluster");
        }
        Ok(())
    }

    /// The leader's pass: places what has no owner and no placement.
    pub(super) async fn schedule(&self, view: &View) -> Result<(), StoreError> {
        // Placements for nodes that died before claiming them are void.
        for (name, (node, kv)) in &view.assigns {
            if !view.nodes.contains_key(node) || view.cordons.contains_key(node) {
                let txn = Txn::new()
                    .when([Compare::mod_revision(kv.key.clone(), kv.mod_revision)])
                    .and_then([Op::delete(kv.key.clone())]);
                self.store.txn(txn).await?;
                tracing::info!(instance = %name, %node, "withdrew a placement on a node that is gone or cordoned");
            }
        }
        let candidates = view.candidates();
        let mut pending = vec![];
        for (name, (record, _)) in &view.instances {
            if record.removing
                || record.desired != DesiredState::Running
                || view.owners.contains_key(name)
                || view.assigns.contains_key(name)
            {
                continue;
            }
            let placement = &record.request.placement;
            let node = match (&record.home, placement.ha) {
                // A new instance goes where it was asked to, or anywhere.
                (None, _) => placement.node.as_ref().map(|n| n.to_string()),
                // Without HA an instance only ever comes back to its node.
                // Drained off its node: anywhere else.
                (Some(home), HaPolicy::None) if view.cordons.contains_key(home) => None,
                (Some(home), HaPolicy::None) => {
                    if !view.nodes.contains_key(home) {
                        continue;
                    }
                    Some(home.clone())
                }
                (Some(_), _) => None,
            };
            // An instance with replicated volumes goes where their usable
            // copy is, or waits.
            let volumes: Vec<&VolumeRecord> = Self::volumes_of(view, record)
                .into_iter()
                .map(|(v, _)| v)
                .collect();
            let node = if volumes.is_empty() {
                node
            } else {
                match volumes::volume_home(view, &volumes) {
                    Some(home) => Some(home),
                    None => continue,
                }
            };
            let avoid = view.avoid(name);
            pending.push(Pending {
                name: name.clone(),
                mem_mib: record.mem_mib,
                spread: placement.spread.as_ref().map(|s| s.to_string()),
                node,
                avoid,
            });
        }
        let candidates: Vec<Candidate> = candidates.into_values().collect();
        for (inst, node) in schedule::place(&candidates, &pending) {
            let Some((_, kv)) = view.instances.get(&inst) else {
                continue;
            };
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(kv.key.clone(), kv.mod_revision),
                    Compare::create_revision(key(OWNERS, &inst), 0),
                    Compare::create_revision(key(ASSIGNS, &inst), 0),
                ])
                .and_then([Op::put(key(ASSIGNS, &inst), node.clone())]);
            if self.store.txn(txn).await?.succeeded() {
                tracing::info!(instance = %inst, %node, "placed");
            }
        }
        Ok(())
    }

    /// Claims an instance the leader placed here: the owner key, bound to
    /// this node's lease, is created only if absent. Returns whether it did.
    pub(super) async fn claim(&self, name: &str, view: &View) -> Result<bool, StoreError> {
        let Some((record, kv)) = view.instances.get(name) else {
            return Ok(false);
        };
        // Its replicated volumes as the scheduler saw them; taken over on
        // the replica's node, the replica becomes the primary.
        let Some((volume_compares, volume_ops)) = self.claim_volumes(view, record) else {
            return Ok(false);
        };
        let mut record = record.clone();
        record.previous = record.home.replace(self.name.clone());
        let owner = OwnerRecord {
            node: self.name.clone(),
            since: now_secs(),
        };
        let txn = Txn::new()
            .when([
                Compare::value(key(ASSIGNS, name), self.name.clone()),
                Compare::create_revision(key(OWNERS, name), 0),
                Compare::mod_revision(kv.key.clone(), kv.mod_revision),
                Compare::lease(key(NODES, &self.name), self.lease()),
            ])
            .when(volume_compares)
            .and_then([
                Op::put_leased(key(OWNERS, name), json(&owner), self.lease()),
                Op::put(kv.key.clone(), json(&record)),
                Op::delete(key(ASSIGNS, name)),
                // A failure another claim left is not this one's.
                Op::delete(key(STATUSES, name)),
            ])
            .and_then(volume_ops);
        let claimed = self.store.txn(txn).await?.succeeded();
        if claimed {
            tracing::info!(instance = %name, node = %self.name, "claimed");
            if let Some(previous) = record.previous.as_ref().filter(|p| **p != self.name) {
                self.event(
                    NewEvent::new(EventKind::Migration, "taken_over", name)
                        .message(format!("it was on {previous}"))
                        .detail("from", previous.clone()),
                );
            }
        }
        Ok(claimed)
    }

    /// Makes the local engine match what this node owns.
    pub(super) async fn converge(&self, view: &View) {
        let owned: BTreeMap<String, i64> = self.owned.lock_unpoisoned().clone();
        let local: BTreeMap<String, Instance> = self
            .engine
            .list()
            .into_iter()
            .map(|i| (i.spec.name.to_string(), i))
            .collect();
        // Cluster instances here that this node does not own: another node
        // has them now (or they were removed): the local copy goes.
        let managed = self.engine.cluster_instances();
        for name in local.keys() {
            // Created by the cluster and no longer in it counts as not ours.
            let cluster_instance =
                view.instances.contains_key(name) || managed.iter().any(|m| m == name);
            let ours = owned.contains_key(name);
            // A source keeps its paused copy until its migration has
            // decided (the destination may give the instance back).
            let leaving = self.migrating.lock_unpoisoned().contains(name);
            if cluster_instance && !ours && !self.is_starting(name) && !leaving {
                tracing::info!(instance = %name, owner = ?view.owner_of(name), "removing the local copy of an instance this node does not own");
                self.engine.drop_wiring(name).await;
                if let Err(e) = self.engine.remove(name, true).await {
                    tracing::warn!(instance = %name, error = %e.message, "cannot remove a local copy");
                }
            }
        }
        // Splices and mirrors of a VM that is not here and not coming: it
        // left, or its move here failed.
        for vm in self.engine.wired_elsewhere() {
            if !owned.contains_key(&vm) && !self.is_starting(&vm) {
                tracing::info!(instance = %vm, "taking out the splices of a VM that is not here");
                self.engine.drop_wiring(&vm).await;
            }
        }
        // A migration out that a restarted daemon (or a lost answer) left
        // paused: nobody took the instance over, so it runs here again.
        let migrating = self.migrating.lock_unpoisoned().clone();
        let paused_out = self.engine.migrating_out();
        for name in &paused_out {
            if let (Some(token), false) = (owned.get(name), migrating.contains(name)) {
                // Only once nobody can take it over any more.
                if let Ok(true) = self.reclaim(name, *token).await {
                    let _ = self.engine.resume_unmigrated(name).await;
                }
            }
        }
        // The recorded splices and mirrors of what runs here follow what is
        // here: after a crash between a change and its record, or a change
        // the engine made on its own (a mirror dropped with its capture
        // appliance).
        for (name, token) in &owned {
            let settled =
                !migrating.contains(name) && !paused_out.contains(name) && !self.is_starting(name);
            let same = match (local.get(name), view.instances.get(name)) {
                (Some(i), Some((record, _))) => i.id == record.id && !record.removing,
                _ => false,
            };
            if settled && same {
                self.resync_wiring(name, *token, view.wirings.get(name))
                    .await;
            }
        }
        let drained = view.cordons.get(&self.name) == Some(&true);
        for (name, token) in owned {
            // Drained: each instance moves off, but one no node can take
            // (a forced drain, or nodes cordoned since it was asked) runs on
            // here like any other.
            if drained
                && (self.is_starting(&name)
                    || migrating.contains(&name)
                    || self.drain_one(&name, view, local.get(&name)))
            {
                continue;
            }
            let Some((record, _)) = view.instances.get(&name) else {
                continue;
            };
            if record.removing {
                self.finish_removal(&name, record, token).await;
                continue;
            }
            if view
                .statuses
                .get(&name)
                .is_some_and(|s| s.node == self.name && s.error.is_some())
            {
                continue;
            }
            match local.get(&name) {
                Some(i) if i.id != record.id => {
                    let _ = self.engine.remove(&name, true).await;
                    self.spawn_start(&name, record.clone(), view.configs.get(&name).cloned());
                }
                Some(i) => {
                    let stopped = matches!(
                        i.status.state,
                        InstanceState::Stopped | InstanceState::Failed
                    );
                    if stopped
                        && record.desired == DesiredState::Running
                        && i.desired == DesiredState::Running
                    {
                        let engine = self.engine.clone();
                        let name = name.clone();
                        if self.begin_start(&name) {
                            let node = self.arc();
                            tokio::spawn(async move {
                                let _ = engine.action(&name, InstanceAction::Start).await;
                                node.end_start(&name);
                            });
                        }
                    }
                }
                None if record.desired == DesiredState::Running => {
                    self.spawn_start(&name, record.clone(), view.configs.get(&name).cloned());
                }
                None => {}
            }
        }
    }

    pub(super) fn is_starting(&self, name: &str) -> bool {
        self.starting.lock_unpoisoned().contains(name)
    }

    pub(super) fn begin_start(&self, name: &str) -> bool {
        self.starting.lock_unpoisoned().insert(name.to_string())
    }

    pub(super) fn end_start(&self, name: &str) {
        self.starting.lock_unpoisoned().remove(name);
        self.wake.notify_one();
    }

    /// Starts an owned instance here, with its identity and replicated config.
    pub(super) fn spawn_start(
        &self,
        name: &str,
        record: InstanceRecord,
        config: Option<ConfigValues>,
    ) {
        if !self.begin_start(name) {
            return;
        }
        let node = self.arc();
        let name = name.to_string();
        tokio::spawn(async move {
            let result = node.start_here(&record, config).await;
            if let Err(e) = &result {
                tracing::warn!(instance = %name, error = %e.message, "cannot start an owned instance");
                node.put_status(&name, Some(e.message.clone()), None).await;
                if moved_here(&record, &node.name) {
                    // A failover that cannot start here: another node may.
                    node.release(&name, false).await;
                }
            }
            node.end_start(&name);
        });
    }

    pub(super) async fn start_here(
        &self,
        record: &InstanceRecord,
        config: Option<ConfigValues>,
    ) -> Result<(), OpError> {
        let mut request = record.request.clone();
        for nic in &request.spec.nics {
            self.ensure_network(nic.network.as_str()).await?;
        }
        self.ensure_image(&request.spec.image).await?;
        // Its splices first, so that its first packet goes through them.
        self.bring_wiring(request.spec.name.as_str()).await?;
        // After a failover, `restart` boots cold; `standby` (and a first
        // start) may start from the image's warm snapshot.
        request.cold = moved_here(record, &self.name) && request.placement.ha == HaPolicy::Restart;
        request.cold |= record.request.cold;
        let instance = self
            .engine
            .run_as(
                request,
                Some(Identity {
                    id: record.id.clone(),
                    config,
                    cluster: true,
                }),
            )
            .await?;
        tracing::info!(instance = %instance.spec.name, node = %self.name, "started an owned instance");
        Ok(())
    }

    /// The owner's part of a removal: the local instance, then every key of
    /// it, under the fencing token.
    pub(super) async fn finish_removal(&self, name: &str, record: &InstanceRecord, token: i64) {
        if self.engine.get(name).is_ok() {
            if let Err(e) = self.engine.remove(name, true).await {
                tracing::warn!(instance = %name, error = %e.message, "cannot remove an instance");
                return;
            }
        }
        let mut ops = delete_all(name, record);
        ops.push(Op::delete(key(OWNERS, name)));
        let txn = Txn::new()
            .when([Compare::mod_revision(key(OWNERS, name), token)])
            .and_then(ops);
        match self.store.txn(txn).await {
            Ok(r) if r.succeeded() => {
                self.owned.lock_unpoisoned().remove(name);
                tracing::info!(instance = %name, "removed from the cluster");
            }
            Ok(_) => tracing::warn!(instance = %name, "lost the instance before removing it"),
            Err(e) => tracing::warn!(instance = %name, error = %e, "cannot remove the keys yet"),
        }
    }

    /// Publishes the state of every owned instance that changed, fenced.
    pub(super) async fn publish(&self, view: &View) {
        let owned: Vec<String> = self.owned.lock_unpoisoned().keys().cloned().collect();
        for name in owned {
            if self.is_starting(&name) {
                continue;
            }
            let Ok(instance) = self.engine.get(&name) else {
                continue;
            };
            let fingerprint = format!(
                "{:?}/{:?}/{:?}",
                instance.status.state, instance.status.pid, instance.status.last_error
            );
            let seen = view
                .statuses
                .get(&name)
                .is_some_and(|s| s.node == self.name && s.error.is_none());
            let same = self.published.lock_unpoisoned().get(&name) == Some(&fingerprint);
            if same && seen {
                continue;
            }
            if self.put_status(&name, None, Some(instance)).await {
                self.published.lock_unpoisoned().insert(name, fingerprint);
            }
        }
        let fresh = self.node_record();
        if let Some(used) = republished(view.nodes.get(&self.name).map(|(n, _)| n), fresh) {
            let txn = Txn::new()
                .when([Compare::lease(key(NODES, &self.name), self.lease())])
                .and_then([Op::put_leased(
                    key(NODES, &self.name),
                    json(&used),
                    self.lease(),
                )]);
            let _ = self.store.txn(txn).await;
        }
    }

    /// Writes an instance's status under this node's fencing token.
    pub(super) async fn put_status(
        &self,
        name: &str,
        error: Option<String>,
        instance: Option<Instance>,
    ) -> bool {
        let Some(token) = self.token(name) else {
            return false;
        };
        let status = StatusRecord {
            node: self.name.clone(),
            state: instance
                .as_ref()
                .map(|i| i.status.state)
                .unwrap_or(InstanceState::Failed),
            error,
            instance,
            updated_at: now_secs(),
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(key(OWNERS, name), token)])
            .and_then([Op::put(key(STATUSES, name), json(&status))]);
        matches!(self.store.txn(txn).await, Ok(r) if r.succeeded())
    }
}
