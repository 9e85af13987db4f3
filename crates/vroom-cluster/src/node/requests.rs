//! What the API and the engine ask of the cluster: create, remove and
//! start or stop an instance anywhere, the listings of instances and nodes
//! (for [`crate::Clustered`], the API's way in), and the engine's hooks
//! ([`ClusterHooks`]): replicate its config and wiring under the fencing
//! token, whether this node may change or launch it.

use super::*;

impl ClusterNode {
    /// Creates an instance in the cluster: recorded in etcd, placed by the
    /// leader's scheduler, run by the node that claims it. Returns once it
    /// runs there (or failed).
    pub async fn run(&self, req: RunRequest) -> Result<Instance, OpError> {
        let name = req.spec.name.to_string();
        let view = self.view().await?;
        if view.instances.contains_key(&name) || self.engine.get(&name).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("an instance named {name:?} already exists"),
            ));
        }
        if let Some(node) = &req.placement.node {
            match view.node_info(node.as_str()) {
                None => return Err(OpError::not_found("node", node.as_str())),
                Some(n) if !n.alive => {
                    return Err(OpError::conflict(format!("node {node} is down")))
                }
                Some(n) if n.cordoned => {
                    return Err(OpError::conflict(format!("node {node} is cordoned")))
                }
                Some(_) => {}
            }
        }
        self.check_volumes(&req, &view)?;
        let mut request = req.clone();
        // Every node runs the same build: the image is pinned by id (and
        // fetched from a peer by a node that lacks it).
        if request.from_snapshot.is_none() {
            // An id built on another node is fetched from it first, rather
            // than called unknown here.
            self.ensure_image(&request.spec.image).await?;
            request.spec.image = self.engine.resolve_image_id(&request.spec.image).await?;
        }
        // The image's declared volumes the user did not attach: kept on two
        // nodes, made now (and removed again if the run fails).
        let made = self.attach_declared_volumes(&mut request, &view).await?;
        let outcome = async {
            if request.spec.nics.is_empty() {
                request.spec.nics.push(NicSpec {
                    network: Name::new(vroom_core::engine::DEFAULT_NETWORK).expect("invariant"),
                    ip: None,
                    role: None,
                });
            }
            let mut networks = vec![];
            for nic in &request.spec.nics {
                networks.push(self.cluster_network(nic.network.as_str(), &view).await?);
            }
            let mut record = InstanceRecord {
                mem_mib: self.mem_of(&request),
                request: request.clone(),
                id: format!("{:016x}", rand::random::<u64>()),
                desired: DesiredState::Running,
                removing: false,
                home: None,
                previous: None,
                created_at: now_secs(),
            };
            // The record and every address in one transaction: a crash leaves
            // all of it or none; a lost race (an address just taken) retries.
            // The instance key's create revision: what later says the record
            // is still this run's.
            let mut created = None;
            for _ in 0..8 {
                let mut compares = vec![Compare::create_revision(key(INSTANCES, &name), 0)];
                let mut puts = vec![];
                for (nic, network) in request.spec.nics.iter().zip(&networks) {
                    let ip = self.free_ip(network, nic.ip, &puts).await?;
                    let k = ip_key(network.spec.name.as_str(), ip);
                    compares.push(Compare::create_revision(k.clone(), 0));
                    puts.push((k, ip));
                }
                for (slot, (_, ip)) in record.request.spec.nics.iter_mut().zip(&puts) {
                    slot.ip = Some(*ip);
                }
                let mut ops = vec![Op::put(key(INSTANCES, &name), json(&record))];
                ops.extend(puts.iter().map(|(k, _)| Op::put(k.clone(), name.clone())));
                let done = self
                    .store
                    .txn(Txn::new().when(compares).and_then(ops))
                    .await
                    .map_err(|e| etcd_error("cannot record the instance", e))?;
                if done.succeeded() {
                    created = Some(done.revision());
                    break;
                }
                if self
                    .store
                    .get(&key(INSTANCES, &name))
                    .await
                    .map_err(|e| etcd_error("cannot read the instance", e))?
                    .is_some()
                {
                    return Err(OpError::new(
                        ErrorCode::AlreadyExists,
                        format!("an instance named {name:?} already exists"),
                    ));
                }
                for (nic, (k, ip)) in request.spec.nics.iter().zip(&puts) {
                    if nic.ip.is_some()
                        && self
                            .store
                            .get(k)
                            .await
                            .map_err(|e| etcd_error("cannot read the addresses", e))?
                            .is_some()
                    {
                        return Err(OpError::conflict(format!(
                            "address {ip} on network {} is taken",
                            nic.network
                        )));
                    }
                }
            }
            let Some(created) = created else {
                return Err(OpError::conflict(format!(
                    "the addresses of {name} kept being taken; try again"
                )));
            };
            let record = record;
            self.wake.notify_one();
            // Wait until a node runs it, or says why it cannot.
            let started = std::time::Instant::now();
            let limit = Duration::from_secs(req.ready_timeout_secs.unwrap_or(120).min(600) + 60);
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let view = self.view().await?;
                let status = view.statuses.get(&name);
                if let Some(s) = status {
                    if let Some(error) = &s.error {
                        self.forget(&name, &record, created).await;
                        return Err(OpError::new(
                            ErrorCode::Conflict,
                            format!("node {} cannot run {name}: {error}", s.node),
                        ));
                    }
                    if let Some(instance) = &s.instance {
                        return Ok(instance.clone());
                    }
                }
                let placed = view.owners.contains_key(&name) || view.assigns.contains_key(&name);
                if !placed && started.elapsed() > PLACE_TIMEOUT {
                    self.forget(&name, &record, created).await;
                    return Err(OpError::new(
                        ErrorCode::ResourceExhausted,
                        format!(
                            "no node can take {name}: it needs {} MiB (and a live, uncordoned node{})",
                            record.mem_mib + schedule::VMM_OVERHEAD_MIB,
                            req.placement
                                .node
                                .as_ref()
                                .map(|n| format!(" {n}"))
                                .unwrap_or_default()
                        ),
                    ));
                }
                if started.elapsed() > limit {
                    return Err(OpError::new(
                        ErrorCode::Timeout,
                        format!(
                            "{name} did not start within {} s; it stays in the cluster",
                            limit.as_secs()
                        ),
                    ));
                }
            }
            }
        .await;
        if outcome.is_err() {
            // Refused (and kept) while an instance record still uses it.
            self.remove_made(&made).await;
        }
        outcome
    }

    pub async fn remove(&self, name: &str, force: bool) -> Result<bool, OpError> {
        let view = self.view().await?;
        let Some((record, kv)) = view.instances.get(name) else {
            return Ok(false);
        };
        match view.owner_of(name) {
            Some(owner) => {
                let running = view.statuses.get(name).is_some_and(|s| {
                    !matches!(s.state, InstanceState::Stopped | InstanceState::Failed)
                });
                if running && !force {
                    return Err(OpError::conflict(format!(
                        "instance {name} is running on node {owner}; stop it first or use --force"
                    )));
                }
                let mut marked = record.clone();
                marked.removing = true;
                let txn = Txn::new()
                    .when([Compare::mod_revision(kv.key.clone(), kv.mod_revision)])
                    .and_then([Op::put(kv.key.clone(), json(&marked))]);
                self.store
                    .txn(txn)
                    .await
                    .map_err(|e| etcd_error("cannot mark the instance", e))?;
                self.wake.notify_one();
                let started = std::time::Instant::now();
                while started.elapsed() < Duration::from_secs(60) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let view = self.view().await?;
                    if !view.instances.contains_key(name) {
                        // A stale copy here (from before a failover) goes too.
                        if self.engine.get(name).is_ok() {
                            let _ = self.engine.remove(name, true).await;
                        }
                        return Ok(true);
                    }
                    if view.owner_of(name).is_none() {
                        // Its owner died meanwhile: finish here.
                        self.forget(name, record, kv.create_revision).await;
                        return Ok(true);
                    }
                }
                Err(OpError::new(
                    ErrorCode::Timeout,
                    format!(
                        "node {owner} did not remove {name} within 60 s; it is marked for removal"
                    ),
                ))
            }
            None => {
                self.forget(name, record, kv.create_revision).await;
                Ok(true)
            }
        }
    }

    pub async fn set_desired(&self, name: &str, desired: DesiredState) -> Result<(), OpError> {
        for _ in 0..5 {
            let Some((mut record, kv)) = self
                .store
                .get_json::<InstanceRecord>(&key(INSTANCES, name))
                .await
                .map_err(|e| etcd_error("cannot read the instance", e))?
            else {
                return Ok(());
            };
            if record.desired == desired {
                return Ok(());
            }
            record.desired = desired;
            let txn = Txn::new()
                .when([Compare::mod_revision(kv.key.clone(), kv.mod_revision)])
                .and_then([Op::put(kv.key.clone(), json(&record))]);
            if self
                .store
                .txn(txn)
                .await
                .map_err(|e| etcd_error("cannot record the desired state", e))?
                .succeeded()
            {
                return Ok(());
            }
        }
        Err(OpError::conflict(format!(
            "instance {name} kept changing; try again"
        )))
    }

    pub async fn instance(&self, name: &str) -> Result<Option<Instance>, OpError> {
        let mut view = self.view().await?;
        let config = view.configs.remove(name);
        let waiting = Self::waiting_reason(&view, name);
        Ok(view
            .statuses
            .remove(name)
            .and_then(|s| placed(s, config))
            .map(|i| with_waiting(i, waiting)))
    }

    pub async fn instances(&self) -> Result<Vec<Instance>, OpError> {
        let mut view = self.view().await?;
        let statuses = std::mem::take(&mut view.statuses);
        Ok(statuses
            .into_iter()
            .filter_map(|(name, s)| {
                let waiting = Self::waiting_reason(&view, &name);
                placed(s, view.configs.remove(&name)).map(|i| with_waiting(i, waiting))
            })
            .collect())
    }

    /// Why instance `name`, which no node owns, is not placed, when the
    /// cluster knows: a volume's only copy is on a node that is gone.
    fn waiting_reason(view: &View, name: &str) -> Option<String> {
        if view.owners.contains_key(name) {
            return None;
        }
        let (record, _) = view.instances.get(name)?;
        if record.desired != DesiredState::Running || record.removing {
            return None;
        }
        let volumes: Vec<&VolumeRecord> = Self::volumes_of(view, record)
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        volumes::waiting_for_volume(view, &volumes)
    }

    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// Node `name`'s event log for `query`, read over its mutual-TLS API
    /// with this node's certificate and passed on through a bounded
    /// channel (a reader that stops reading stops the copy).
    pub async fn peer_events(
        &self,
        name: &str,
        query: &vroom_types::EventQuery,
    ) -> Result<tokio::sync::mpsc::Receiver<vroom_types::EventLine>, OpError> {
        let view = self.view().await?;
        if !view.nodes.contains_key(name) {
            return Err(OpError::not_found("node", name));
        }
        let unreachable = |e: vroom_client::ClientError| {
            OpError::new(
                ErrorCode::Conflict,
                format!("cannot read node {name}'s events: {e}"),
            )
        };
        let client = self.peer_api(&view, name).map_err(unreachable)?;
        let mut lines = client.events(query).await.map_err(unreachable)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(Ok(line)) = lines.next().await {
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }

    /// A client of live node `name`'s mutual-TLS API, as this node.
    pub(super) fn peer_api(
        &self,
        view: &View,
        name: &str,
    ) -> Result<vroom_client::Client, vroom_client::ClientError> {
        let unreachable = |reason: &str| vroom_client::ClientError::Remote {
            host: name.to_string(),
            reason: reason.to_string(),
        };
        let Some((record, _)) = view.nodes.get(name) else {
            return Err(unreachable("the node is not live"));
        };
        let ip = super::advertised_ip(&record.advertise)
            .ok_or_else(|| unreachable("the node advertises no address"))?;
        let addr = std::net::SocketAddr::new(ip.into(), vroom_client::tls::API_PORT);
        vroom_client::Client::remote(&addr.to_string(), &self.tls_dir())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, OpError> {
        let view = self.view().await?;
        Ok(view
            .members
            .keys()
            .chain(view.nodes.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|n| view.node_info(n))
            .collect())
    }

    pub async fn node(&self, name: &str) -> Result<NodeInfo, OpError> {
        self.view()
            .await?
            .node_info(name)
            .ok_or_else(|| OpError::not_found("node", name))
    }

    pub async fn cordon(&self, name: &str, cordoned: bool) -> Result<NodeInfo, OpError> {
        self.node(name).await?;
        self.set_cordon(name, cordoned.then_some(CORDON)).await?;
        let action = if cordoned { "cordoned" } else { "uncordoned" };
        self.event(NewEvent::new(EventKind::Node, action, name));
        self.node(name).await
    }

    pub async fn remove_node(&self, name: &str) -> Result<(), OpError> {
        self.forget_node(name).await
    }

    pub async fn migrate(&self, name: &str, to: &str) -> Result<vroom_types::Migration, OpError> {
        self.request_migration(name, to).await
    }

    pub async fn drain(&self, name: &str, force: bool) -> Result<DrainReport, OpError> {
        let report = self.drain_node(name, force).await?;
        self.event(
            NewEvent::new(EventKind::Node, "drained", name)
                .detail("moved", report.moved.len())
                .detail("kept", report.kept.len()),
        );
        Ok(report)
    }
}

/// The engine's hooks: each gets what it needs as arguments and never calls
/// back into the engine.
#[async_trait::async_trait]
impl ClusterHooks for ClusterNode {
    async fn replicate_wiring(&self, vm: &str, wiring: Option<Wiring>) -> Result<(), OpError> {
        self.put_wiring(vm, wiring.as_ref()).await
    }

    fn may_change(&self, name: &str, spliced_into: Option<&str>) -> Result<(), OpError> {
        self.refuse_while_moving(name)?;
        match spliced_into {
            Some(vm) => self.refuse_while_moving(vm),
            None => Ok(()),
        }
    }

    fn replicate_config(&self, change: ConfigReplica<'_>) -> Result<(), OpError> {
        let (name, values) = match change {
            ConfigReplica::Own { name, values } => (name, values),
            // A change that races a migration out is caught by the
            // destination's takeover, which compares both records.
            ConfigReplica::Carried { vm, wiring } => {
                let handle = tokio::runtime::Handle::current();
                return tokio::task::block_in_place(|| {
                    handle.block_on(self.put_wiring(vm, Some(wiring)))
                });
            }
        };
        if !self.known.lock_unpoisoned().contains(name) && self.token(name).is_none() {
            return Ok(());
        }
        let bytes = json(values);
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "the config of {name} is {} KiB; a cluster instance replicates at most {} KiB",
                    bytes.len() / 1024,
                    MAX_CONFIG_BYTES / 1024
                ),
            ));
        }
        let token = self
            .token(name)
            .ok_or_else(|| OpError::conflict(format!("node {} does not own {name}", self.name)))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key(OWNERS, name), token)])
            .and_then([Op::put(key(CONFIGS, name), bytes)]);
        let etcd = self.store.clone();
        let handle = tokio::runtime::Handle::current();
        let result = tokio::task::block_in_place(|| handle.block_on(etcd.txn(txn)));
        match result {
            Ok(r) if r.succeeded() => Ok(()),
            Ok(_) => Err(OpError::conflict(format!(
                "node {} lost {name} to another node; the change is not saved",
                self.name
            ))),
            Err(e) => Err(etcd_error("cannot replicate the config", e)),
        }
    }

    fn launching_with_volumes(&self, name: &str, volumes: &[String]) -> Result<(), OpError> {
        self.before_launch_with_volumes(name, volumes)
    }

    fn may_launch(&self, name: &str, cluster_made: bool) -> Result<(), OpError> {
        let owned = self.token(name).is_some();
        let known = self.known.lock_unpoisoned().contains(name);
        if !owned && !known && !cluster_made && !self.is_starting(name) {
            return Ok(());
        }
        if owned && self.lease_alive() {
            return Ok(());
        }
        let incoming = self.incoming.lock_unpoisoned().contains_key(name);
        if incoming && self.lease_alive() {
            // The destination of a live migration: its VM runs only after
            // the handover.
            return Ok(());
        }
        Err(OpError::conflict(format!(
            "node {} does not own {name} under a live lease; not starting it",
            self.name
        )))
    }
}

impl ClusterNode {
    pub(super) async fn view(&self) -> Result<View, OpError> {
        let (kvs, revision) = self
            .store
            .list(ROOT)
            .await
            .map_err(|e| etcd_error("cannot read the cluster", e))?;
        let mut view = View::parse(kvs);
        view.revision = revision;
        Ok(view)
    }

    pub(super) fn mem_of(&self, req: &RunRequest) -> u64 {
        req.spec.mem_mib.unwrap_or_else(|| {
            self.engine
                .get_image(&req.spec.image)
                .map(|i| i.manifest.default_mem_mib)
                .unwrap_or(vroom_types::MIN_MEM_MIB)
        })
    }

    /// Forgets an instance nobody runs: every key, its owner key too (a
    /// node that claimed it and failed to start it holds that under its
    /// lease; left, it would block the name until that node restarts), and
    /// a local copy. Only while the record is still the one created at
    /// revision `created`: never another run's of the same name.
    pub(super) async fn forget(&self, name: &str, record: &InstanceRecord, created: i64) {
        let mut ops = delete_all(name, record);
        ops.push(Op::delete(key(OWNERS, name)));
        let txn = Txn::new()
            .when([Compare::create_revision(key(INSTANCES, name), created)])
            .and_then(ops);
        match self.store.txn(txn).await {
            Ok(r) if !r.succeeded() => {
                tracing::info!(instance = %name, "not forgetting an instance whose record changed hands");
            }
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "cannot forget a failed instance");
            }
            Ok(_) => {}
        }
        if self.engine.get(name).is_ok() {
            let _ = self.engine.remove(name, true).await;
        }
    }
}

/// An instance the cluster does not place now, with why (its last
/// published state is not what it is now: nothing runs it).
fn with_waiting(mut instance: Instance, waiting: Option<String>) -> Instance {
    if let Some(why) = waiting {
        instance.status.state = InstanceState::Stopped;
        instance.status.pid = None;
        instance.status.waiting = Some(why);
    }
    instance
}

/// A published instance, with the node that published it.
/// An instance as its node last published it, with the config the
/// cluster holds now (a config change is replicated, not republished).
pub(super) fn placed(status: StatusRecord, config: Option<ConfigValues>) -> Option<Instance> {
    let mut instance = status.instance?;
    instance.node = Some(status.node);
    if let Some(config) = config {
        instance.config = config;
    }
    Some(instance)
}
