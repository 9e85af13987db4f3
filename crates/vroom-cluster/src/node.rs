//! A cluster node: membership (lease, keepalive, guard), the leader's
//! scheduler, ownership claims under a fencing token, and the reconcile
//! loop that makes the local engine run exactly what this node owns.
//!
//! Every pass reads the whole `/vroom/` prefix in one request (a cluster's
//! state is small) and acts on that one consistent view: level-triggered,
//! so a missed watch event or a crash between two steps is repaired by the
//! next pass. Watch events and a 500 ms tick start passes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use vroom_core::cluster::{Cluster, Identity, Wiring};
use vroom_core::{Engine, OpError};
use vroom_types::{
    ConfigValues, DesiredState, DrainReport, DrainedInstance, ErrorCode, HaPolicy, Instance,
    InstanceAction, InstanceState, KeptInstance, Name, NetworkSpec, NicSpec, NodeInfo, RunRequest,
};

use crate::etcd::{json, Etcd, EtcdError, Kv};
use crate::guard::GuardLink;
use crate::model::*;
use crate::schedule::{self, Candidate, NodeState, Pending, Resident};
use crate::{fence_deadline_ns, monotonic_ns, KEEPALIVE_EVERY, LEASE_TTL_SECS};

mod migrate;
pub use migrate::PEER_PORT;

/// How a host joins: `vroom daemon --cluster --etcd URLS --node NAME --advertise ADDR`.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub endpoints: Vec<String>,
    pub node: Name,
    pub advertise: String,
    pub data_dir: PathBuf,
    /// Refuse to join a cluster with another id.
    pub expect_cluster: Option<String>,
}

/// What a data dir remembers of its cluster: a host never joins another
/// cluster, or under another name, by mistake; a quickly restarted vroomd
/// takes its lease (and so its instances) back.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Membership {
    cluster: String,
    node: String,
    lease: i64,
}

const MEMBERSHIP_FILE: &str = "cluster.json";
/// A persistent record per node that ever joined (`node ls` shows dead ones).
pub const MEMBERS: &str = "/vroom/members/";
/// How long `run` waits for a node to take a new instance.
const PLACE_TIMEOUT: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(500);
/// How long the scheduler keeps an instance off a node where it failed to start.
const RETRY_AFTER_SECS: u64 = 60;
/// How long an instance a drain released waits for another node to take
/// it before its node takes it back and runs it again.
const TAKE_BACK_AFTER: Duration = PLACE_TIMEOUT;
/// The value of a cordon key while the node is drained.
const DRAIN: &[u8] = b"drain";
/// The value of a cordon key of a node that is only cordoned.
const CORDON: &[u8] = b"cordon";
/// How long a drain gives an instance that stays on the drained node with
/// no node to take it before it says so: the owner looks every pass.
const STUCK_GRACE: Duration = Duration::from_secs(3);
/// How long a drain waits for its moves.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

pub struct ClusterNode {
    me: Weak<ClusterNode>,
    etcd: Etcd,
    name: String,
    advertise: String,
    info: ClusterInfo,
    data_dir: PathBuf,
    engine: Arc<Engine>,
    lease: AtomicI64,
    /// When the last acknowledged keepalive was sent (monotonic ns).
    last_ack_ns: AtomicU64,
    /// Instances this node owns under its current lease, with their fencing token.
    owned: Mutex<BTreeMap<String, i64>>,
    /// Every instance the cluster knows, as of the last pass.
    known: Mutex<BTreeSet<String>>,
    /// Local starts under way.
    starting: Mutex<BTreeSet<String>>,
    /// The overlay applied per network: its VNI and peers.
    overlays: Mutex<BTreeMap<String, (u32, Vec<Ipv4Addr>)>>,
    /// Images being warmed for standby instances.
    warming: Mutex<BTreeSet<String>>,
    /// Images that could not be warmed (not tried again until a restart).
    unwarmable: Mutex<BTreeSet<String>>,
    /// What was last published per owned instance.
    published: Mutex<BTreeMap<String, String>>,
    guard: GuardLink,
    wake: tokio::sync::Notify,
    /// Serialises lease renewal after a loss.
    rejoin: tokio::sync::Mutex<()>,
    /// Migrations coming in, by instance: their id, secret, and where their
    /// data connection goes.
    incoming: Mutex<BTreeMap<String, (String, String, migrate::DataSlot)>>,
    /// Instances migrating out.
    migrating: Mutex<BTreeSet<String>>,
    /// Instances this node took over in a migration and gave back (their
    /// guest did not answer here), with the give-back's revision: a view
    /// read before it must not make this node their owner again.
    returned: Mutex<BTreeMap<String, i64>>,
    /// The peer listener, until `start` serves it.
    peers: Mutex<Option<tokio::net::TcpListener>>,
    /// The API's TCP listener, until the daemon serves it.
    api: Mutex<Option<tokio::net::TcpListener>>,
    /// Instances a drain is moving (live, or cold after a failed migration).
    draining: Mutex<BTreeSet<String>>,
}

fn etcd_error(context: &str, e: EtcdError) -> OpError {
    OpError::new(ErrorCode::Internal, format!("{context}: {e}"))
}

/// The cgroup scope of a node's VMMs: unique per cluster and node on a host.
pub fn cgroup_scope(cluster_id: &str, node: &str) -> String {
    format!("{}-{node}", &cluster_id[..cluster_id.len().min(8)])
}

/// `vroom cluster init`: writes the cluster's identity, once.
pub async fn init(endpoints: &[String]) -> Result<ClusterInfo, String> {
    let etcd = Etcd::connect(endpoints).await.map_err(|e| e.to_string())?;
    let info = ClusterInfo {
        id: format!("{:016x}", rand::random::<u64>()),
        created_at: now_secs(),
        lease_ttl_ms: LEASE_TTL_SECS as u64 * 1000,
    };
    let ca = crate::tls::Ca::generate(&info.id)?;
    let txn = Txn::new()
        .when([Compare::create_revision(CLUSTER, CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(CLUSTER, json(&info), None),
            TxnOp::put(crate::tls::CA_KEY, json(&ca), None),
        ])
        .or_else([TxnOp::get(CLUSTER, None)]);
    let resp = etcd.txn(txn).await.map_err(|e| e.to_string())?;
    if resp.succeeded() {
        return Ok(info);
    }
    let existing = etcd
        .get_json::<ClusterInfo>(CLUSTER)
        .await
        .map_err(|e| e.to_string())?
        .map(|(info, _)| info.id)
        .unwrap_or_default();
    Err(format!(
        "etcd at {} already holds cluster {existing}; nothing changed",
        etcd.endpoints()
    ))
}

/// One consistent read of the cluster.
#[derive(Default)]
struct View {
    nodes: BTreeMap<String, (NodeRecord, Kv)>,
    members: BTreeMap<String, NodeRecord>,
    /// Cordoned nodes; `true` while draining.
    cordons: BTreeMap<String, bool>,
    leader: Option<(String, i64)>,
    instances: BTreeMap<String, (InstanceRecord, Kv)>,
    owners: BTreeMap<String, (OwnerRecord, Kv)>,
    assigns: BTreeMap<String, (String, Kv)>,
    statuses: BTreeMap<String, StatusRecord>,
    configs: BTreeMap<String, ConfigValues>,
    networks: BTreeMap<String, NetworkRecord>,
    migrations: BTreeMap<String, (MigrationRecord, Kv)>,
    /// Each VM's recorded splices and mirrors.
    wirings: BTreeMap<String, (Wiring, Kv)>,
    /// The etcd revision it was read at (0: unknown).
    revision: i64,
}

impl View {
    fn parse(kvs: Vec<Kv>) -> View {
        let mut view = View::default();
        for kv in kvs {
            let key = kv.key.clone();
            let bad = |e: EtcdError| tracing::warn!(%key, error = %e, "skipping an unreadable cluster key");
            if let Some(name) = key.strip_prefix(NODES) {
                match kv.decode() {
                    Ok(n) => drop(view.nodes.insert(name.into(), (n, kv))),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(MEMBERS) {
                match kv.decode() {
                    Ok(n) => drop(view.members.insert(name.into(), n)),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(CORDONS) {
                view.cordons.insert(name.into(), kv.value == DRAIN);
            } else if key == LEADER {
                view.leader = Some((String::from_utf8_lossy(&kv.value).into_owned(), kv.lease));
            } else if let Some(name) = key.strip_prefix(INSTANCES) {
                match kv.decode() {
                    Ok(r) => drop(view.instances.insert(name.into(), (r, kv))),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(OWNERS) {
                match kv.decode() {
                    Ok(o) => drop(view.owners.insert(name.into(), (o, kv))),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(ASSIGNS) {
                let node = String::from_utf8_lossy(&kv.value).into_owned();
                view.assigns.insert(name.into(), (node, kv));
            } else if let Some(name) = key.strip_prefix(STATUSES) {
                match kv.decode() {
                    Ok(s) => drop(view.statuses.insert(name.into(), s)),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(CONFIGS) {
                match kv.decode() {
                    Ok(c) => drop(view.configs.insert(name.into(), c)),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(MIGRATIONS) {
                match kv.decode() {
                    Ok(m) => drop(view.migrations.insert(name.into(), (m, kv))),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(NETWORKS) {
                match kv.decode() {
                    Ok(n) => drop(view.networks.insert(name.into(), n)),
                    Err(e) => bad(e),
                }
            } else if let Some(name) = key.strip_prefix(WIRINGS) {
                match kv.decode() {
                    Ok(w) => drop(view.wirings.insert(name.into(), (w, kv))),
                    Err(e) => bad(e),
                }
            }
        }
        view
    }

    /// How node `name` stands for placement.
    fn node_state(&self, name: &str) -> NodeState {
        match self.cordons.get(name) {
            _ if !self.nodes.contains_key(name) => NodeState::Lost,
            Some(true) => NodeState::Draining,
            Some(false) => NodeState::Cordoned,
            None => NodeState::Ready,
        }
    }

    /// Every node as the scheduler sees it: its state, free memory (less
    /// what is placed but not yet claimed), spread groups. A lost node (a
    /// member without a lease) has no memory to give.
    fn candidates(&self) -> BTreeMap<String, Candidate> {
        let lost = self
            .members
            .iter()
            .filter(|(name, _)| !self.nodes.contains_key(*name));
        let mut candidates: BTreeMap<String, Candidate> = self
            .nodes
            .iter()
            .map(|(name, (n, _))| (name, n))
            .chain(lost)
            .map(|(name, n)| {
                let state = self.node_state(name);
                let mem_free_mib = match state {
                    NodeState::Lost => 0,
                    _ => n.mem_total_mib.saturating_sub(n.mem_used_mib),
                };
                (
                    name.clone(),
                    Candidate {
                        name: name.clone(),
                        state,
                        mem_free_mib,
                        spread: BTreeMap::new(),
                    },
                )
            })
            .collect();
        let spread_of = |inst: &str| {
            self.instances
                .get(inst)
                .and_then(|(r, _)| r.request.placement.spread.as_ref().map(|s| s.to_string()))
        };
        for (inst, node) in self
            .owners
            .iter()
            .map(|(i, (o, _))| (i, &o.node))
            .chain(self.assigns.iter().map(|(i, (n, _))| (i, n)))
        {
            if let (Some(c), Some(group)) = (candidates.get_mut(node), spread_of(inst)) {
                *c.spread.entry(group).or_default() += 1;
            }
        }
        for (inst, (node, _)) in &self.assigns {
            if let (Some(c), Some((r, _))) = (candidates.get_mut(node), self.instances.get(inst)) {
                c.mem_free_mib = c
                    .mem_free_mib
                    .saturating_sub(r.mem_mib + schedule::VMM_OVERHEAD_MIB);
            }
        }
        candidates
    }

    /// Nodes the scheduler keeps `name` off: the one it moved off while
    /// that is cordoned, or one where it failed to start lately (a node that
    /// failed a minute ago is tried again).
    fn avoid(&self, name: &str) -> Vec<String> {
        match self.statuses.get(name) {
            Some(s)
                if self.cordons.contains_key(&s.node)
                    || (s.error.is_some()
                        && now_secs().saturating_sub(s.updated_at) < RETRY_AFTER_SECS) =>
            {
                vec![s.node.clone()]
            }
            _ => vec![],
        }
    }

    /// What instance `name` needs to move off node `from`.
    fn resident(&self, name: &str, from: &str) -> Option<Resident> {
        let (record, _) = self.instances.get(name)?;
        let placement = &record.request.placement;
        Some(Resident {
            pending: Pending {
                name: name.to_string(),
                mem_mib: record.mem_mib,
                spread: placement.spread.as_ref().map(|s| s.to_string()),
                node: None,
                avoid: self
                    .avoid(name)
                    .into_iter()
                    .chain([from.to_string()])
                    .collect(),
            },
            ha: placement.ha,
            wants_running: record.desired == DesiredState::Running,
        })
    }

    /// Where the scheduler would move `name` off `from`.
    fn target_for(&self, name: &str, from: &str) -> Option<String> {
        let resident = self.resident(name, from)?;
        let candidates: Vec<Candidate> = self.candidates().into_values().collect();
        schedule::place(&candidates, &[resident.pending])
            .into_iter()
            .next()
            .map(|(_, node)| node)
    }

    /// The drain of node `from` as it would go now: the nodes as the
    /// scheduler sees them, and the plan for every instance `from` owns
    /// (but those being removed).
    fn drain_plan(&self, from: &str) -> (Vec<Candidate>, schedule::DrainPlan) {
        let residents: Vec<Resident> = self
            .owners
            .iter()
            .filter(|(_, (o, _))| o.node == from)
            .filter(|(name, _)| self.instances.get(*name).is_some_and(|(r, _)| !r.removing))
            .filter_map(|(name, _)| self.resident(name, from))
            .collect();
        let candidates: Vec<Candidate> = self.candidates().into_values().collect();
        let plan = schedule::plan_drain(&candidates, from, &residents);
        (candidates, plan)
    }

    fn owner_of(&self, name: &str) -> Option<&str> {
        self.owners.get(name).map(|(o, _)| o.node.as_str())
    }

    fn node_info(&self, name: &str) -> Option<NodeInfo> {
        let live = self.nodes.get(name).map(|(n, _)| n);
        let record = live.or_else(|| self.members.get(name))?;
        let instances: Vec<String> = self
            .owners
            .iter()
            .filter(|(_, (o, _))| o.node == name)
            .map(|(i, _)| i.clone())
            .collect();
        Some(NodeInfo {
            name: Name::new(name).ok()?,
            advertise: record.advertise.clone(),
            alive: live.is_some(),
            cordoned: self.cordons.contains_key(name),
            leader: self.leader.as_ref().is_some_and(|(l, _)| l == name),
            mem_total_mib: record.mem_total_mib,
            mem_free_mib: record.mem_total_mib.saturating_sub(record.mem_used_mib),
            cpus: record.cpus,
            joined_at: record.joined_at,
            instances,
        })
    }
}

impl ClusterNode {
    /// Joins the cluster at `opts.endpoints`: checks its identity, takes a
    /// lease (the previous one if it is still alive), registers the node and
    /// starts the keepalive and the guard. The engine must not have launched
    /// anything yet: call before `Engine::recover`.
    pub async fn join(engine: Arc<Engine>, opts: JoinOptions) -> Result<Arc<ClusterNode>, String> {
        let etcd = Etcd::connect(&opts.endpoints)
            .await
            .map_err(|e| format!("cannot join: {e}"))?;
        let info = etcd
            .get_json::<ClusterInfo>(CLUSTER)
            .await
            .map_err(|e| format!("cannot join: {e}"))?
            .map(|(info, _)| info)
            .ok_or_else(|| {
                format!(
                    "no cluster at {}: run `vroom cluster init --etcd {}` first",
                    etcd.endpoints(),
                    etcd.endpoints()
                )
            })?;
        if let Some(expected) = &opts.expect_cluster {
            if *expected != info.id {
                return Err(format!(
                    "etcd at {} holds cluster {}, not {expected}",
                    etcd.endpoints(),
                    info.id
                ));
            }
        }
        let file = opts.data_dir.join(MEMBERSHIP_FILE);
        let remembered: Option<Membership> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(m) = &remembered {
            if m.cluster != info.id {
                return Err(format!(
                    "this data dir belongs to cluster {}; etcd at {} holds cluster {}",
                    m.cluster,
                    etcd.endpoints(),
                    info.id
                ));
            }
            if m.node != opts.node.as_str() {
                return Err(format!(
                    "this data dir is node {}'s, not {}",
                    m.node, opts.node
                ));
            }
        }
        vroom_jail::cgroup::set_scope(&cgroup_scope(&info.id, opts.node.as_str()));
        let node = Arc::new_cyclic(|me| ClusterNode {
            me: me.clone(),
            guard: GuardLink::new(&opts.data_dir, &cgroup_scope(&info.id, opts.node.as_str())),
            etcd,
            name: opts.node.to_string(),
            advertise: opts.advertise.clone(),
            info,
            data_dir: opts.data_dir.clone(),
            engine,
            lease: AtomicI64::new(0),
            last_ack_ns: AtomicU64::new(0),
            owned: Mutex::default(),
            known: Mutex::default(),
            starting: Mutex::default(),
            published: Mutex::default(),
            warming: Mutex::default(),
            overlays: Mutex::default(),
            unwarmable: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            rejoin: tokio::sync::Mutex::new(()),
            incoming: Mutex::default(),
            migrating: Mutex::default(),
            returned: Mutex::default(),
            peers: Mutex::default(),
            api: Mutex::default(),
            draining: Mutex::default(),
        });
        let reuse = remembered.as_ref().map(|m| m.lease);
        // Bound first, reported after the lease: a name in use says so.
        let peers = node.bind_peers().await;
        let api_addr = node.api_addr();
        let api = tokio::net::TcpListener::bind(api_addr)
            .await
            .map_err(|e| format!("cannot listen for the API on {api_addr}: {e}"));
        node.take_lease(reuse).await?;
        // The API's certificate, from the cluster's CA, for its names.
        let issued = match crate::tls::ensure_ca(&node.etcd, &node.info.id).await {
            Ok(ca) => {
                let mut sans = vec![node.name.clone()];
                let host = node
                    .advertise
                    .rsplit_once(':')
                    .map_or(node.advertise.as_str(), |(h, _)| h);
                if !sans.iter().any(|s| s == host) {
                    sans.push(host.to_string());
                }
                ca.issue(&node.name, &sans, &node.tls_dir())
            }
            Err(e) => Err(e),
        };
        let peers = peers.and_then(|p| issued.map(|()| p));
        let bound = peers.and_then(|p| api.map(|a| (p, a)));
        match bound {
            Ok((peers, api)) => {
                *node.peers.lock().unwrap_or_else(|p| p.into_inner()) = Some(peers);
                *node.api.lock().unwrap_or_else(|p| p.into_inner()) = Some(api);
            }
            Err(e) => {
                let _ = node.etcd.client().lease_revoke(node.lease()).await;
                if remembered.is_none() {
                    let _ = std::fs::remove_file(&file);
                }
                return Err(e);
            }
        }
        if let Err(e) = node.guard.ensure() {
            let _ = node.etcd.client().lease_revoke(node.lease()).await;
            return Err(format!("cannot start the fencing guard: {e}"));
        }

        let supervisor = node.clone();
        tokio::spawn(async move { supervisor.renew_forever().await });
        // The first keepalive comes right away: it arms the guard.
        let started = std::time::Instant::now();
        while !node.lease_alive() && started.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !node.lease_alive() {
            return Err("cannot join: the lease's first keepalive got no answer".into());
        }
        // Instances still owned under a lease that survived a quick restart.
        let (kvs, _) = node
            .etcd
            .list(ROOT)
            .await
            .map_err(|e| format!("cannot read the cluster's state: {e}"))?;
        node.adopt(&View::parse(kvs));
        Ok(node)
    }

    /// The node's TLS files: the cluster's CA, its certificate and key.
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    /// The API's TCP listener, bound at join (once).
    pub fn take_api_listener(&self) -> Option<tokio::net::TcpListener> {
        self.api.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Where the node serves its API to other hosts (mutual TLS).
    pub fn api_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.peer_addr().ip(), vroom_client::tls::API_PORT)
    }

    fn arc(&self) -> Arc<ClusterNode> {
        self.me
            .upgrade()
            .expect("invariant: a ClusterNode lives in an Arc")
    }

    pub fn info(&self) -> &ClusterInfo {
        &self.info
    }

    fn lease(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    /// Whether this node's lease is certainly alive now (and the guard armed).
    fn lease_alive(&self) -> bool {
        let sent = self.last_ack_ns.load(Ordering::SeqCst);
        self.lease() != 0 && sent != 0 && monotonic_ns() < fence_deadline_ns(sent)
    }

    /// Takes a lease (`reuse` if it is still alive) and registers the node
    /// under it; starts renewing it.
    async fn take_lease(&self, reuse: Option<i64>) -> Result<(), String> {
        let mut client = self.etcd.client();
        let mut lease = 0;
        if let Some(old) = reuse.filter(|l| *l != 0) {
            if let Ok(Ok(ttl)) =
                tokio::time::timeout(Duration::from_secs(2), client.lease_time_to_live(old, None))
                    .await
            {
                if ttl.ttl() > 0 {
                    lease = old;
                    tracing::info!(lease = old, "took back the lease of the previous vroomd");
                }
            }
        }
        if lease == 0 {
            let granted = tokio::time::timeout(
                Duration::from_secs(3),
                client.lease_grant(LEASE_TTL_SECS, None),
            )
            .await
            .map_err(|_| "cannot join: etcd did not grant a lease within 3 s".to_string())?
            .map_err(|e| format!("cannot join: {e}"))?;
            lease = granted.id();
        }
        let node_key = key(NODES, &self.name);
        let record = self.node_record();
        let txn = Txn::new()
            .when([Compare::create_revision(
                node_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(
                    node_key.clone(),
                    json(&record),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(key(MEMBERS, &self.name), json(&record), None),
            ])
            .or_else([TxnOp::txn(
                Txn::new()
                    .when([Compare::lease(node_key.clone(), CompareOp::Equal, lease)])
                    .and_then([TxnOp::put(
                        node_key.clone(),
                        json(&record),
                        Some(PutOptions::new().with_lease(lease)),
                    )]),
            )]);
        let resp = self
            .etcd
            .txn(txn)
            .await
            .map_err(|e| format!("cannot join: {e}"))?;
        let ours = resp.succeeded()
            || resp
                .op_responses()
                .iter()
                .any(|r| matches!(r, etcd_client::TxnOpResponse::Txn(t) if t.succeeded()));
        if !ours {
            let _ = client.lease_revoke(lease).await;
            let other = self
                .etcd
                .get_json::<NodeRecord>(&node_key)
                .await
                .ok()
                .flatten()
                .map(|(n, _)| n.advertise)
                .unwrap_or_default();
            return Err(format!(
                "node {} is already in the cluster (alive at {other}); nothing changed",
                self.name
            ));
        }
        self.lease.store(lease, Ordering::SeqCst);
        let membership = Membership {
            cluster: self.info.id.clone(),
            node: self.name.clone(),
            lease,
        };
        write_durably(&self.data_dir.join(MEMBERSHIP_FILE), &json(&membership))
            .map_err(|e| format!("cannot record the membership: {e}"))?;
        tracing::info!(node = %self.name, lease, cluster = %self.info.id, "joined the cluster");
        Ok(())
    }

    fn node_record(&self) -> NodeRecord {
        let cfg = self.engine.config();
        NodeRecord {
            name: self.name.clone(),
            advertise: self.advertise.clone(),
            mem_total_mib: cfg.host_mem_mib,
            mem_used_mib: self
                .engine
                .list()
                .iter()
                .filter(|i| i.status.state != InstanceState::Stopped)
                .map(|i| i.mem_mib + schedule::VMM_OVERHEAD_MIB)
                .sum(),
            cpus: cfg.host_cpus,
            joined_at: now_secs(),
            peer: Some(match advertised_ip(&self.advertise) {
                Some(ip) => format!("{ip}:{PEER_PORT}"),
                None => format!("{}:{PEER_PORT}", self.advertise),
            }),
        }
    }

    /// Keeps the node's lease alive on a connection of its own; after a
    /// loss, takes a new one.
    async fn renew_forever(self: Arc<Self>) {
        loop {
            let lease = self.lease();
            match self.etcd.reconnect().await {
                Ok(etcd) => {
                    self.keep_alive(etcd, lease).await;
                    self.lost_lease(lease).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the keepalive connection");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Renews `lease` every 500 ms, and tells the guard of every
    /// acknowledgement. Returns when etcd says the lease expired.
    async fn keep_alive(&self, etcd: Etcd, lease: i64) {
        let mut channel = None;
        let mut failures = 0u32;
        loop {
            let sent = monotonic_ns();
            if channel.is_none() {
                if failures >= 2 {
                    // A connection that lived through a partition may stay
                    // wedged: a new one.
                    etcd.refresh().await;
                }
                let mut client = etcd.client();
                let opened =
                    tokio::time::timeout(Duration::from_secs(1), client.lease_keep_alive(lease))
                        .await;
                // The client refuses to open a stream for a lease etcd no
                // longer has: it expired.
                if let Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) = &opened {
                    if e.contains("not found") {
                        tracing::error!(
                            lease,
                            "the lease expired: this node lost its instances; rejoining"
                        );
                        return;
                    }
                }
                channel = opened.ok().and_then(|r| r.ok());
            }
            let answer = match channel.as_mut() {
                Some((keeper, stream)) => {
                    tokio::time::timeout(Duration::from_millis(900), async {
                        keeper.keep_alive().await?;
                        stream.message().await
                    })
                    .await
                }
                None => Ok(Ok(None)),
            };
            match answer {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                    failures = 0;
                    self.last_ack_ns.store(sent, Ordering::SeqCst);
                    if let Err(e) = self.guard.ack(sent) {
                        tracing::error!(error = %e, "cannot reach the fencing guard");
                    }
                }
                Ok(Ok(Some(_))) => {
                    tracing::error!(
                        lease,
                        "the lease expired: this node lost its instances; rejoining"
                    );
                    return;
                }
                _ => {
                    // A broken or stalled stream: open another (possibly to
                    // another endpoint) at the next beat.
                    channel = None;
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        let why = match &answer {
                            Err(_) => "no answer".to_string(),
                            Ok(Err(e)) => e.to_string(),
                            Ok(Ok(_)) => "the stream closed".to_string(),
                        };
                        tracing::warn!(lease, failures, reason = %why, "a keepalive failed");
                    }
                }
            }
            let next = sent + KEEPALIVE_EVERY.as_nanos() as u64;
            let now = monotonic_ns();
            if next > now {
                tokio::time::sleep(Duration::from_nanos(next - now)).await;
            }
        }
    }

    /// After a lease loss: forget what was owned (the guard has killed it),
    /// then take a new lease. Local copies of instances others now own are
    /// removed by the next passes.
    async fn lost_lease(&self, lease: i64) {
        let _rejoin = self.rejoin.lock().await;
        if self.lease() != lease {
            return;
        }
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.lease.store(0, Ordering::SeqCst);
        loop {
            match self.take_lease(None).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot rejoin yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.wake.notify_one();
    }

    /// Starts the reconcile loop and the watch that wakes it.
    pub fn start(self: &Arc<Self>) {
        let listener = self.peers.lock().unwrap_or_else(|p| p.into_inner()).take();
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
                }
                let _ = tokio::time::timeout(TICK, node.wake.notified()).await;
            }
        });
    }

    async fn watch(self: Arc<Self>) {
        loop {
            let mut client = self.etcd.client();
            match client
                .watch(ROOT, Some(WatchOptions::new().with_prefix()))
                .await
            {
                Ok(mut stream) => {
                    while let Ok(Some(_)) = stream.message().await {
                        self.wake.notify_one();
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cluster watch failed; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Takes the instances the view says this node owns under its lease.
    fn adopt(&self, view: &View) {
        let lease = self.lease();
        let read: BTreeMap<String, i64> = view
            .owners
            .iter()
            .filter(|(_, (o, kv))| o.node == self.name && kv.lease == lease && lease != 0)
            .map(|(name, (_, kv))| (name.clone(), kv.mod_revision))
            .collect();
        let mut current = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        let mut returned = self.returned.lock().unwrap_or_else(|p| p.into_inner());
        *current = owned_after(read, &current, &returned, view.revision);
        // Once a view shows the give-back, the key itself says it.
        returned.retain(|_, revision| view.revision == 0 || *revision > view.revision);
        drop((current, returned));
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) =
            view.instances.keys().cloned().collect();
    }

    /// Notes a migration's takeover or give-back of `name`, under both
    /// locks in [`adopt`](Self::adopt)'s order: a pass in between cannot
    /// see the one without the other.
    fn note_handover(&self, name: &str, handover: Handover) {
        let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        let mut returned = self.returned.lock().unwrap_or_else(|p| p.into_inner());
        note_handover(&mut owned, &mut returned, name, handover);
    }

    fn token(&self, name: &str) -> Option<i64> {
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
    }

    /// One reconcile pass.
    async fn pass(&self) -> Result<(), EtcdError> {
        if !self.lease_alive() {
            return Ok(());
        }
        let (kvs, revision) = self.etcd.list(ROOT).await?;
        let mut view = View::parse(kvs);
        view.revision = revision;
        let lease = self.lease();
        if view.leader.is_none() {
            self.try_lead(lease).await?;
        }
        if view
            .leader
            .as_ref()
            .is_some_and(|(l, ls)| *l == self.name && *ls == lease)
        {
            self.schedule(&view).await?;
        }
        let mut claimed = false;
        for (name, (node, _)) in &view.assigns {
            if *node == self.name && !view.owners.contains_key(name) {
                claimed |= self.claim(name, &view).await?;
            }
        }
        let view = if claimed {
            let (kvs, revision) = self.etcd.list(ROOT).await?;
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
        self.start_migrations(&view);
        self.join_networks(&view).await;
        self.publish(&view).await;
        self.prepare_standby(&view);
        Ok(())
    }

    /// Joins every cluster network this node has to the other live nodes
    /// (VXLAN), when the set of peers changed.
    async fn join_networks(&self, view: &View) {
        let Some(local) = advertised_ip(&self.advertise) else {
            return;
        };
        let peers: Vec<Ipv4Addr> = view
            .nodes
            .iter()
            .filter(|(name, _)| **name != self.name)
            .filter_map(|(_, (n, _))| advertised_ip(&n.advertise))
            .collect();
        for (name, network) in &view.networks {
            if network.vni == 0 || self.engine.network(name).is_err() {
                continue;
            }
            let want = (network.vni, peers.clone());
            let applied = self
                .overlays
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                == Some(&want);
            if applied {
                continue;
            }
            match self
                .engine
                .set_overlay(name, network.vni, local, &peers)
                .await
            {
                Ok(()) => {
                    tracing::info!(network = %name, vni = network.vni, peers = ?peers, "network joined to the other nodes");
                    self.overlays
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), want);
                }
                Err(e) => {
                    tracing::warn!(network = %name, error = %e.message, "cannot join the network to the other nodes")
                }
            }
        }
    }

    /// Keeps a warm snapshot here of every image a `standby` instance runs
    /// (in its memory size), so that a failover to this node starts it from
    /// memory instead of booting. Warms one image at a time, in the background.
    fn prepare_standby(&self, view: &View) {
        if view.cordons.contains_key(&self.name)
            || !self
                .warming
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        {
            return;
        }
        let warm = self.engine.list_warm();
        for (record, _) in view.instances.values() {
            if record.request.placement.ha != HaPolicy::Standby || record.removing {
                continue;
            }
            let reference = record.request.spec.image.to_string();
            let Ok(image) = self.engine.get_image(&reference) else {
                // Not here yet: fetched from a peer, warmed on a later pass.
                let key = format!("fetch/{reference}");
                if self
                    .unwarmable
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&key)
                {
                    continue;
                }
                self.warming
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone());
                let node = self.arc();
                tokio::spawn(async move {
                    if let Err(e) = node.ensure_image(&reference).await {
                        tracing::warn!(image = %reference, error = %e.message, "cannot fetch an image for standby instances");
                        node.unwarmable
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(key.clone());
                    }
                    node.warming
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                });
                return;
            };
            let have = warm
                .iter()
                .any(|s| s.image_id() == image.id && s.instance.mem_mib == record.mem_mib);
            if have {
                continue;
            }
            let key = format!("{}/{}", image.id, record.mem_mib);
            if self
                .unwarmable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&key)
            {
                continue;
            }
            self.warming
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone());
            let node = self.arc();
            let mem = record.mem_mib;
            tokio::spawn(async move {
                match node.engine.warm_image(&image.id, Some(mem)).await {
                    Ok(s) => {
                        tracing::info!(image = %image.name, snapshot = %s.name, "warmed for standby instances")
                    }
                    Err(e) => {
                        tracing::warn!(image = %image.name, error = %e.message, "cannot warm an image for standby instances; they boot cold here");
                        node.unwarmable
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(key.clone());
                    }
                }
                node.warming
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
            });
            return;
        }
    }

    async fn try_lead(&self, lease: i64) -> Result<(), EtcdError> {
        let txn = Txn::new()
            .when([Compare::create_revision(LEADER, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                LEADER,
                self.name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if self.etcd.txn(txn).await?.succeeded() {
            tracing::info!(node = %self.name, "this node leads the cluster");
        }
        Ok(())
    }

    /// The leader's pass: places what has no owner and no placement.
    async fn schedule(&self, view: &View) -> Result<(), EtcdError> {
        // Placements for nodes that died before claiming them are void.
        for (name, (node, kv)) in &view.assigns {
            if !view.nodes.contains_key(node) || view.cordons.contains_key(node) {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        kv.key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision,
                    )])
                    .and_then([TxnOp::delete(kv.key.clone(), None)]);
                self.etcd.txn(txn).await?;
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
                    Compare::mod_revision(kv.key.clone(), CompareOp::Equal, kv.mod_revision),
                    Compare::create_revision(key(OWNERS, &inst), CompareOp::Equal, 0),
                    Compare::create_revision(key(ASSIGNS, &inst), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(key(ASSIGNS, &inst), node.clone(), None)]);
            if self.etcd.txn(txn).await?.succeeded() {
                tracing::info!(instance = %inst, %node, "placed");
            }
        }
        Ok(())
    }

    /// Claims an instance the leader placed here: the owner key, bound to
    /// this node's lease, is created only if absent. Returns whether it did.
    async fn claim(&self, name: &str, view: &View) -> Result<bool, EtcdError> {
        let Some((record, kv)) = view.instances.get(name) else {
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
                Compare::value(key(ASSIGNS, name), CompareOp::Equal, self.name.clone()),
                Compare::create_revision(key(OWNERS, name), CompareOp::Equal, 0),
                Compare::mod_revision(kv.key.clone(), CompareOp::Equal, kv.mod_revision),
                Compare::lease(key(NODES, &self.name), CompareOp::Equal, self.lease()),
            ])
            .and_then([
                TxnOp::put(
                    key(OWNERS, name),
                    json(&owner),
                    Some(PutOptions::new().with_lease(self.lease())),
                ),
                TxnOp::put(kv.key.clone(), json(&record), None),
                TxnOp::delete(key(ASSIGNS, name), None),
                // A failure another claim left is not this one's.
                TxnOp::delete(key(STATUSES, name), None),
            ]);
        let claimed = self.etcd.txn(txn).await?.succeeded();
        if claimed {
            tracing::info!(instance = %name, node = %self.name, "claimed");
        }
        Ok(claimed)
    }

    /// Makes the local engine match what this node owns.
    async fn converge(&self, view: &View) {
        let owned: BTreeMap<String, i64> =
            self.owned.lock().unwrap_or_else(|p| p.into_inner()).clone();
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
            let leaving = self
                .migrating
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(name);
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
        let migrating = self
            .migrating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
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

    fn is_starting(&self, name: &str) -> bool {
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    fn begin_start(&self, name: &str) -> bool {
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string())
    }

    fn end_start(&self, name: &str) {
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.wake.notify_one();
    }

    /// Starts an owned instance here, with its identity and replicated config.
    fn spawn_start(&self, name: &str, record: InstanceRecord, config: Option<ConfigValues>) {
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

    async fn start_here(
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

    /// Makes VM `name`'s recorded splices and mirrors here (each appliance
    /// booted and in the path), fetching the appliances' images first.
    /// Returns the record's revision (0: none).
    async fn bring_wiring(&self, name: &str) -> Result<i64, OpError> {
        let Some((wiring, kv)) = self
            .etcd
            .get_json::<Wiring>(&key(WIRINGS, name))
            .await
            .map_err(|e| etcd_error("cannot read the splices", e))?
        else {
            return Ok(0);
        };
        for carried in &wiring.splices {
            self.ensure_image(&carried.spec.image).await?;
        }
        self.engine.install_wiring(name, &wiring).await?;
        Ok(kv.mod_revision)
    }

    /// Rewrites VM `name`'s recorded wiring if it differs from the one
    /// here, unless the record changed since `recorded` was read.
    async fn resync_wiring(&self, name: &str, token: i64, recorded: Option<&(Wiring, Kv)>) {
        let here = self.engine.wiring_of(name);
        let value = |w: Option<&Wiring>| w.and_then(|w| serde_json::to_value(w).ok());
        if value(here.as_ref()) == value(recorded.map(|(w, _)| w)) {
            return;
        }
        let k = key(WIRINGS, name);
        let op = match &here {
            Some(wiring) if json(wiring).len() > MAX_CONFIG_BYTES => {
                tracing::warn!(instance = %name, "its splices and their config exceed the cluster's cap; not recorded");
                return;
            }
            Some(wiring) => TxnOp::put(k.clone(), json(wiring), None),
            None => TxnOp::delete(k.clone(), None),
        };
        let seen = recorded.map_or(0, |(_, kv)| kv.mod_revision);
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key(OWNERS, name), CompareOp::Equal, token),
                Compare::mod_revision(k, CompareOp::Equal, seen),
            ])
            .and_then([op]);
        match self.etcd.txn(txn).await {
            Ok(r) if r.succeeded() => {
                tracing::info!(instance = %name, "recorded its splices and mirrors as they are here")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "cannot record its splices and mirrors")
            }
        }
    }

    /// Refuses a change to `name` (its config, splices or mirrors) while it
    /// migrates away: the destination has read them already.
    fn refuse_while_moving(&self, name: &str) -> Result<(), OpError> {
        let migrating = self
            .migrating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name);
        if migrating || self.engine.migrating_out().iter().any(|m| m == name) {
            return Err(OpError::conflict(format!(
                "{name} is migrating to another node; change it when the migration is done"
            )));
        }
        Ok(())
    }

    /// Writes (or, with `None`, deletes) VM `name`'s wiring under the
    /// fencing token. Nothing to do for a VM the cluster does not know (a
    /// local one); a conflict for one this node does not own.
    async fn put_wiring(&self, name: &str, wiring: Option<&Wiring>) -> Result<(), OpError> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name);
        let Some(token) = self.token(name) else {
            if !known {
                return Ok(());
            }
            return Err(OpError::conflict(format!(
                "node {} does not own {name}; the change is not saved",
                self.name
            )));
        };
        let k = key(WIRINGS, name);
        let op = match wiring {
            Some(wiring) => {
                let bytes = json(wiring);
                if bytes.len() > MAX_CONFIG_BYTES {
                    return Err(OpError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "the splices of {name} and their appliances' config come to {} KiB; a cluster instance carries at most {} KiB",
                            bytes.len() / 1024,
                            MAX_CONFIG_BYTES / 1024
                        ),
                    ));
                }
                TxnOp::put(k, bytes, None)
            }
            None => TxnOp::delete(k, None),
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key(OWNERS, name),
                CompareOp::Equal,
                token,
            )])
            .and_then([op]);
        match self.etcd.txn(txn).await {
            Ok(r) if r.succeeded() => Ok(()),
            Ok(_) => Err(OpError::conflict(format!(
                "node {} lost {name} to another node; the change is not saved",
                self.name
            ))),
            Err(e) => Err(etcd_error("cannot record the splices", e)),
        }
    }

    /// Creates a cluster network here as etcd describes it.
    async fn ensure_network(&self, name: &str) -> Result<(), OpError> {
        let record = self
            .etcd
            .get_json::<NetworkRecord>(&key(NETWORKS, name))
            .await
            .map_err(|e| etcd_error("cannot read the network", e))?
            .map(|(n, _)| n)
            .ok_or_else(|| OpError::not_found("cluster network", name))?;
        match self.engine.network(name) {
            Ok(local) if local.subnet == record.subnet => Ok(()),
            Ok(local) => Err(OpError::conflict(format!(
                "network {name} is {} on this node but {} in the cluster",
                local.subnet, record.subnet
            ))),
            Err(_) => {
                let mut spec = record.spec.clone();
                spec.subnet = Some(record.subnet);
                self.engine.create_network(spec).await.map(|_| ())
            }
        }
    }

    /// The owner's part of a removal: the local instance, then every key of
    /// it, under the fencing token.
    async fn finish_removal(&self, name: &str, record: &InstanceRecord, token: i64) {
        if self.engine.get(name).is_ok() {
            if let Err(e) = self.engine.remove(name, true).await {
                tracing::warn!(instance = %name, error = %e.message, "cannot remove an instance");
                return;
            }
        }
        let mut ops = delete_all(name, record);
        ops.push(TxnOp::delete(key(OWNERS, name), None));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key(OWNERS, name),
                CompareOp::Equal,
                token,
            )])
            .and_then(ops);
        match self.etcd.txn(txn).await {
            Ok(r) if r.succeeded() => {
                self.owned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                tracing::info!(instance = %name, "removed from the cluster");
            }
            Ok(_) => tracing::warn!(instance = %name, "lost the instance before removing it"),
            Err(e) => tracing::warn!(instance = %name, error = %e, "cannot remove the keys yet"),
        }
    }

    /// Publishes the state of every owned instance that changed, fenced.
    async fn publish(&self, view: &View) {
        let owned: Vec<String> = self
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
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
            let same = self
                .published
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                == Some(&fingerprint);
            if same && seen {
                continue;
            }
            if self.put_status(&name, None, Some(instance)).await {
                self.published
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, fingerprint);
            }
        }
        let fresh = self.node_record();
        if let Some(used) = republished(view.nodes.get(&self.name).map(|(n, _)| n), fresh) {
            let txn = Txn::new()
                .when([Compare::lease(
                    key(NODES, &self.name),
                    CompareOp::Equal,
                    self.lease(),
                )])
                .and_then([TxnOp::put(
                    key(NODES, &self.name),
                    json(&used),
                    Some(PutOptions::new().with_lease(self.lease())),
                )]);
            let _ = self.etcd.txn(txn).await;
        }
    }

    /// Writes an instance's status under this node's fencing token.
    async fn put_status(
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
            .when([Compare::mod_revision(
                key(OWNERS, name),
                CompareOp::Equal,
                token,
            )])
            .and_then([TxnOp::put(key(STATUSES, name), json(&status), None)]);
        matches!(self.etcd.txn(txn).await, Ok(r) if r.succeeded())
    }

    async fn view(&self) -> Result<View, OpError> {
        let (kvs, revision) = self
            .etcd
            .list(ROOT)
            .await
            .map_err(|e| etcd_error("cannot read the cluster", e))?;
        let mut view = View::parse(kvs);
        view.revision = revision;
        Ok(view)
    }

    /// The network a new instance's NIC joins, recorded in the cluster: an
    /// existing cluster network, or this node's (created on first use for
    /// `default`).
    async fn cluster_network(&self, name: &str, view: &View) -> Result<NetworkRecord, OpError> {
        if let Some(n) = view.networks.get(name) {
            return Ok(n.clone());
        }
        let local = match self.engine.network(name) {
            Ok(n) => n,
            Err(_) if name == vroom_core::engine::DEFAULT_NETWORK => {
                self.engine
                    .create_network(NetworkSpec {
                        name: Name::new(name).expect("invariant: valid name"),
                        subnet: None,
                        nat: true,
                        isolated: false,
                        mirror: false,
                        allow_host: vec![],
                    })
                    .await?
            }
            Err(e) => return Err(e),
        };
        let mut record = NetworkRecord {
            spec: NetworkSpec {
                name: local.name.clone(),
                subnet: Some(local.subnet),
                nat: local.nat,
                isolated: local.isolated,
                mirror: local.mirror,
                allow_host: local.allow_host.clone(),
            },
            subnet: local.subnet,
            vni: 0,
        };
        let k = key(NETWORKS, name);
        // The network and its VNI in one transaction; a VNI another network
        // just took means the next one.
        for _ in 0..8 {
            record.vni = view
                .networks
                .values()
                .map(|n| n.vni + 1)
                .max()
                .unwrap_or(FIRST_VNI)
                .max(FIRST_VNI);
            let (taken, _) = self
                .etcd
                .list(VNIS)
                .await
                .map_err(|e| etcd_error("cannot read the VNIs", e))?;
            while taken
                .iter()
                .any(|kv| kv.name(VNIS) == record.vni.to_string())
            {
                record.vni += 1;
            }
            let vni_key = format!("{VNIS}{}", record.vni);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(k.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(vni_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(k.clone(), json(&record), None),
                    TxnOp::put(vni_key, name.to_string(), None),
                ]);
            let done = self
                .etcd
                .txn(txn)
                .await
                .map_err(|e| etcd_error("cannot record the network", e))?;
            if done.succeeded()
                || self
                    .etcd
                    .get(&k)
                    .await
                    .map_err(|e| etcd_error("cannot read the network", e))?
                    .is_some()
            {
                break;
            }
        }
        let (stored, _) = self
            .etcd
            .get_json::<NetworkRecord>(&k)
            .await
            .map_err(|e| etcd_error("cannot read the network", e))?
            .ok_or_else(|| OpError::not_found("cluster network", name))?;
        Ok(stored)
    }

    /// A free address on a network (the requested one, checked), not among
    /// `also_taken` (this request's other NICs). Taken for real by the
    /// transaction that records the instance.
    async fn free_ip(
        &self,
        network: &NetworkRecord,
        requested: Option<Ipv4Addr>,
        also_taken: &[(String, Ipv4Addr)],
    ) -> Result<Ipv4Addr, OpError> {
        let net = network.spec.name.as_str();
        if let Some(ip) = requested {
            vroom_core::ipam::allocate_ip(network.subnet, &[], Some(ip))
                .map_err(|e| OpError::new(ErrorCode::InvalidArgument, e.to_string()))?;
            return Ok(ip);
        }
        let prefix = format!("{IPS}{net}/");
        let (taken, _) = self
            .etcd
            .list(&prefix)
            .await
            .map_err(|e| etcd_error("cannot read the addresses", e))?;
        let mut used: Vec<Ipv4Addr> = taken
            .iter()
            .filter_map(|kv| kv.name(&prefix).parse().ok())
            .collect();
        used.extend(also_taken.iter().map(|(_, ip)| *ip));
        vroom_core::ipam::allocate_ip(network.subnet, &used, None).map_err(|_| {
            OpError::new(
                ErrorCode::ResourceExhausted,
                format!("network {net} has no free address left"),
            )
        })
    }

    fn mem_of(&self, req: &RunRequest) -> u64 {
        req.spec.mem_mib.unwrap_or_else(|| {
            self.engine
                .get_image(&req.spec.image)
                .map(|i| i.manifest.default_mem_mib)
                .unwrap_or(vroom_types::MIN_MEM_MIB)
        })
    }
}

/// The IPv4 address in a node's `--advertise` (`ADDR` or `ADDR:PORT`).
fn advertised_ip(advertise: &str) -> Option<Ipv4Addr> {
    advertise.parse().ok().or_else(|| {
        advertise
            .rsplit_once(':')
            .and_then(|(ip, _)| ip.parse().ok())
    })
}

/// A published instance, with the node that published it.
fn placed(status: StatusRecord) -> Option<Instance> {
    let mut instance = status.instance?;
    instance.node = Some(status.node);
    Some(instance)
}

/// Whether the instance came to `node` from another node (a failover or a move).
fn moved_here(record: &InstanceRecord, node: &str) -> bool {
    record.previous.as_deref().is_some_and(|p| p != node)
}

/// Deletes every key of an instance but its owner key.
fn delete_all(name: &str, record: &InstanceRecord) -> Vec<TxnOp> {
    let mut ops: Vec<TxnOp> = [INSTANCES, STATUSES, CONFIGS, ASSIGNS, WIRINGS]
        .iter()
        .map(|prefix| TxnOp::delete(key(prefix, name), None))
        .collect();
    for nic in &record.request.spec.nics {
        if let Some(ip) = nic.ip {
            ops.push(TxnOp::delete(ip_key(nic.network.as_str(), ip), None));
        }
    }
    ops
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Cluster for ClusterNode {
    async fn run(&self, req: RunRequest) -> Result<Instance, OpError> {
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
        let mut request = req.clone();
        // Every node runs the same build: the image is pinned by id (and
        // fetched from a peer by a node that lacks it).
        if request.from_snapshot.is_none() {
            // An id built on another node is fetched from it first, rather
            // than called unknown here.
            self.ensure_image(&request.spec.image).await?;
            request.spec.image = self.engine.resolve_image_id(&request.spec.image).await?;
        }
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
            let mut compares = vec![Compare::create_revision(
                key(INSTANCES, &name),
                CompareOp::Equal,
                0,
            )];
            let mut puts = vec![];
            for (nic, network) in request.spec.nics.iter().zip(&networks) {
                let ip = self.free_ip(network, nic.ip, &puts).await?;
                let k = ip_key(network.spec.name.as_str(), ip);
                compares.push(Compare::create_revision(k.clone(), CompareOp::Equal, 0));
                puts.push((k, ip));
            }
            for (slot, (_, ip)) in record.request.spec.nics.iter_mut().zip(&puts) {
                slot.ip = Some(*ip);
            }
            let mut ops = vec![TxnOp::put(key(INSTANCES, &name), json(&record), None)];
            ops.extend(
                puts.iter()
                    .map(|(k, _)| TxnOp::put(k.clone(), name.clone(), None)),
            );
            let done = self
                .etcd
                .txn(Txn::new().when(compares).and_then(ops))
                .await
                .map_err(|e| etcd_error("cannot record the instance", e))?;
            if done.succeeded() {
                created = Some(done.header().map_or(0, |h| h.revision()));
                break;
            }
            if self
                .etcd
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
                        .etcd
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

    async fn remove(&self, name: &str, force: bool) -> Result<bool, OpError> {
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
                    .when([Compare::mod_revision(
                        kv.key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision,
                    )])
                    .and_then([TxnOp::put(kv.key.clone(), json(&marked), None)]);
                self.etcd
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

    async fn set_desired(&self, name: &str, desired: DesiredState) -> Result<(), OpError> {
        for _ in 0..5 {
            let Some((mut record, kv)) = self
                .etcd
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
                .when([Compare::mod_revision(
                    kv.key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision,
                )])
                .and_then([TxnOp::put(kv.key.clone(), json(&record), None)]);
            if self
                .etcd
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

    async fn replicate_wiring(&self, vm: &str, wiring: Option<Wiring>) -> Result<(), OpError> {
        self.put_wiring(vm, wiring.as_ref()).await
    }

    fn may_change(&self, name: &str) -> Result<(), OpError> {
        self.refuse_while_moving(name)?;
        match self.engine.get_splice(name) {
            Ok(splice) => self.refuse_while_moving(splice.vm.as_str()),
            Err(_) => Ok(()),
        }
    }

    fn replicate_config(&self, name: &str, values: &ConfigValues) -> Result<(), OpError> {
        // An appliance a splice made: its config moves with its VM's
        // splices. (One that was an instance of its own is replicated as
        // one.) A change that races a migration out is caught by the
        // destination's takeover, which compares both records.
        if let Some(splice) = self.engine.get_splice(name).ok().filter(|s| s.owned) {
            let Some(mut wiring) = self.engine.wiring_of(splice.vm.as_str()) else {
                return Ok(());
            };
            for carried in &mut wiring.splices {
                if carried.splice.appliance.as_str() == name {
                    carried.config = values.clone();
                }
            }
            let handle = tokio::runtime::Handle::current();
            return tokio::task::block_in_place(|| {
                handle.block_on(self.put_wiring(splice.vm.as_str(), Some(&wiring)))
            });
        }
        if !self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
            && self.token(name).is_none()
        {
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
            .when([Compare::mod_revision(
                key(OWNERS, name),
                CompareOp::Equal,
                token,
            )])
            .and_then([TxnOp::put(key(CONFIGS, name), bytes, None)]);
        let etcd = self.etcd.clone();
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

    fn may_launch(&self, name: &str, cluster_made: bool) -> Result<(), OpError> {
        let owned = self.token(name).is_some();
        let known = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name);
        if !owned && !known && !cluster_made && !self.is_starting(name) {
            return Ok(());
        }
        if owned && self.lease_alive() {
            return Ok(());
        }
        let incoming = self
            .incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name);
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

    async fn instance(&self, name: &str) -> Result<Option<Instance>, OpError> {
        Ok(self.view().await?.statuses.remove(name).and_then(placed))
    }

    async fn instances(&self) -> Result<Vec<Instance>, OpError> {
        Ok(self
            .view()
            .await?
            .statuses
            .into_values()
            .filter_map(placed)
            .collect())
    }

    fn node_name(&self) -> &str {
        &self.name
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, OpError> {
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

    async fn node(&self, name: &str) -> Result<NodeInfo, OpError> {
        self.view()
            .await?
            .node_info(name)
            .ok_or_else(|| OpError::not_found("node", name))
    }

    async fn cordon(&self, name: &str, cordoned: bool) -> Result<NodeInfo, OpError> {
        self.node(name).await?;
        self.set_cordon(name, cordoned.then_some(CORDON)).await?;
        self.node(name).await
    }

    async fn remove_node(&self, name: &str) -> Result<(), OpError> {
        self.forget_node(name).await
    }

    async fn migrate(&self, name: &str, to: &str) -> Result<vroom_types::Migration, OpError> {
        self.request_migration(name, to).await
    }

    async fn drain(&self, name: &str, force: bool) -> Result<DrainReport, OpError> {
        self.drain_node(name, force).await
    }
}

impl ClusterNode {
    async fn forget_node(&self, name: &str) -> Result<(), OpError> {
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
        let txn = Txn::new()
            .when([Compare::create_revision(
                key(NODES, name),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::delete(key(MEMBERS, name), None),
                TxnOp::delete(key(CORDONS, name), None),
            ]);
        let done = self
            .etcd
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

    async fn set_cordon(&self, name: &str, value: Option<&[u8]>) -> Result<(), OpError> {
        let k = key(CORDONS, name);
        let done = match value {
            Some(v) => self.etcd.put(&k, v.to_vec()).await,
            None => self.etcd.delete(&k).await,
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
    async fn drain_node(&self, name: &str, force: bool) -> Result<DrainReport, OpError> {
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
}

impl ClusterNode {
    /// Forgets an instance nobody runs: every key, its owner key too (a
    /// node that claimed it and failed to start it holds that under its
    /// lease; left, it would block the name until that node restarts), and
    /// a local copy. Only while the record is still the one created at
    /// revision `created`: never another run's of the same name.
    async fn forget(&self, name: &str, record: &InstanceRecord, created: i64) {
        let mut ops = delete_all(name, record);
        ops.push(TxnOp::delete(key(OWNERS, name), None));
        let txn = Txn::new()
            .when([Compare::create_revision(
                key(INSTANCES, name),
                CompareOp::Equal,
                created,
            )])
            .and_then(ops);
        match self.etcd.txn(txn).await {
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

    /// Moves an owned instance off this drained node: live to the node the
    /// scheduler picks, or (not running, or the migration failed) cold, by
    /// releasing it. Returns whether it is on its way; `false` leaves it
    /// here: no node can take it (it wants to run), or it is being removed.
    fn drain_one(&self, name: &str, view: &View, local: Option<&Instance>) -> bool {
        if self
            .draining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
        {
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
        self.draining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
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
            node.draining
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
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
    async fn release(&self, name: &str, moving: bool) -> bool {
        let Some(token) = self.token(name) else {
            return false;
        };
        let mut last = None;
        if let Ok(instance) = self.engine.get(name) {
            let _ = self.engine.action(name, InstanceAction::Stop).await;
            let _ = self.engine.remove(name, true).await;
            last = Some(instance);
        }
        let mut ops = vec![TxnOp::delete(key(OWNERS, name), None)];
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
            ops.push(TxnOp::put(key(STATUSES, name), json(&status), None));
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key(OWNERS, name),
                CompareOp::Equal,
                token,
            )])
            .and_then(ops);
        if matches!(self.etcd.txn(txn).await, Ok(r) if r.succeeded()) {
            self.owned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            tracing::info!(instance = %name, "released for a move");
            return true;
        }
        false
    }

    /// After a drain released `name` for a move: if no node took it within
    /// [`TAKE_BACK_AFTER`] (the node picked for it was cordoned, went down
    /// or cannot start it), this node takes it back and runs it again, so a
    /// move never leaves an instance down for longer.
    async fn take_back_unless_taken(&self, name: &str) {
        let started = std::time::Instant::now();
        while started.elapsed() < TAKE_BACK_AFTER {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Ok(Some(_)) = self.etcd.get(&key(OWNERS, name)).await {
                return;
            }
        }
        let owner = OwnerRecord {
            node: self.name.clone(),
            since: now_secs(),
        };
        let txn = Txn::new()
            .when([
                Compare::create_revision(key(OWNERS, name), CompareOp::Equal, 0),
                Compare::create_revision(key(INSTANCES, name), CompareOp::Greater, 0),
                Compare::lease(key(NODES, &self.name), CompareOp::Equal, self.lease()),
            ])
            .and_then([
                TxnOp::put(
                    key(OWNERS, name),
                    json(&owner),
                    Some(PutOptions::new().with_lease(self.lease())),
                ),
                // A placement nobody claimed: void now.
                TxnOp::delete(key(ASSIGNS, name), None),
            ]);
        match self.etcd.txn(txn).await {
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

/// What a node owns after a pass that read `read` (the owner keys naming
/// it under its lease) at `revision`: those, plus an instance it took over
/// in a migration after the read, less one it gave back after the read.
fn owned_after(
    read: BTreeMap<String, i64>,
    current: &BTreeMap<String, i64>,
    returned: &BTreeMap<String, i64>,
    revision: i64,
) -> BTreeMap<String, i64> {
    let after_read = |token: i64| revision > 0 && token > revision;
    let mut owned = read;
    for (name, token) in current {
        if after_read(*token) {
            owned.insert(name.clone(), *token);
        }
    }
    for (name, token) in returned {
        if after_read(*token) || revision == 0 {
            owned.remove(name);
        }
    }
    owned
}

/// A migration's change of ownership, with its revision.
#[derive(Debug, Clone, Copy)]
enum Handover {
    TookOver(i64),
    GaveBack(i64),
}

/// What a takeover or a give-back changes in what a node owns (`owned`)
/// and has given back (`returned`, which [`owned_after`] honours): a
/// takeover clears an earlier give-back of the same instance, which would
/// otherwise void it until a view newer than the give-back.
fn note_handover(
    owned: &mut BTreeMap<String, i64>,
    returned: &mut BTreeMap<String, i64>,
    name: &str,
    handover: Handover,
) {
    match handover {
        Handover::TookOver(revision) => {
            returned.remove(name);
            owned.insert(name.to_string(), revision);
        }
        Handover::GaveBack(revision) => {
            returned.insert(name.to_string(), revision);
            owned.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding (issue 23): an instance given back (at 12) and taken
    /// over again (at 15) before a pass whose view is older than both (10)
    /// must stay owned; the give-back's note used to void the new takeover.
    #[test]
    fn a_takeover_after_a_give_back_stands_in_the_next_pass() {
        let (mut owned, mut returned) = (BTreeMap::new(), BTreeMap::new());
        note_handover(&mut owned, &mut returned, "m", Handover::TookOver(8));
        note_handover(&mut owned, &mut returned, "m", Handover::GaveBack(12));
        assert_eq!(
            owned_after(map(&[("m", 8)]), &owned, &returned, 10),
            map(&[])
        );
        note_handover(&mut owned, &mut returned, "m", Handover::TookOver(15));
        assert_eq!(
            owned_after(map(&[]), &owned, &returned, 10),
            map(&[("m", 15)])
        );
    }

    type Owned<'a> = &'a [(&'a str, i64)];

    fn map(entries: &[(&str, i64)]) -> BTreeMap<String, i64> {
        entries.iter().map(|(n, r)| (n.to_string(), *r)).collect()
    }

    /// What a node owns after a pass: the owner keys it read, a takeover
    /// newer than the read, less a give-back newer than the read (a stale
    /// view must not make a destination that gave an instance back start
    /// it while its source resumes it).
    #[test]
    fn owned_after_a_pass_honours_takeovers_and_give_backs_newer_than_the_view() {
        #[rustfmt::skip]
        let cases: &[(Owned, Owned, Owned, i64, Owned)] = &[
            // read                current              returned        view  owned
            (&[("a", 5)],          &[],                 &[],            10,   &[("a", 5)]),
            // taken over after the read: it stands
            (&[],                  &[("m", 12)],        &[],            10,   &[("m", 12)]),
            // taken over before the read and gone from it: it went
            (&[],                  &[("m", 8)],         &[],            10,   &[]),
            // given back after the read, which still shows the takeover
            (&[("m", 8)],          &[],                 &[("m", 12)],   10,   &[]),
            (&[("m", 8)],          &[("m", 8)],         &[("m", 12)],   10,   &[]),
            // a view newer than the give-back decides by itself
            (&[("m", 20)],         &[],                 &[("m", 12)],   25,   &[("m", 20)]),
            // other instances are untouched
            (&[("a", 5), ("m", 8)], &[],                &[("m", 12)],   10,   &[("a", 5)]),
        ];
        for (read, current, returned, revision, want) in cases {
            assert_eq!(
                owned_after(map(read), &map(current), &map(returned), *revision),
                map(want),
                "read {read:?} current {current:?} returned {returned:?} at {revision}"
            );
        }
    }
}
