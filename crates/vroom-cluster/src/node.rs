//! A cluster node: membership (lease, keepalive, guard), the leader's
//! scheduler, ownership claims under a fencing token, and the reconcile
//! loop that makes the local engine run exactly what this node owns.
//!
//! Every pass reads the whole `/vroom/` prefix in one request (a cluster's
//! state is small) and acts on that one consistent view: level-triggered,
//! so a missed watch event or a crash between two steps is repaired by the
//! next pass. Watch events and a 500 ms tick start passes.
//!
//! This file holds the node itself (its state and tunables); `impl
//! ClusterNode` is spread by concern:
//! - `membership`: the cluster's identity, the lease, what is owned;
//! - `view`: one consistent read of the cluster, as the scheduler sees it;
//! - `reconcile`: the pass (placement, claims, converging the engine,
//!   publishing);
//! - `networks`, `wiring`, `standby`: cluster networks, a VM's
//!   recorded splices and mirrors, warm snapshots for failovers;
//! - `drain`: cordon, drain, release, forgetting a dead node;
//! - `requests`: the [`Cluster`] seam the engine and the API call;
//! - `peers`: the peer port and images between peers;
//! - `migrate`: live migration (request, source, destination, protocol).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vroom_core::cluster::{ClusterHooks, ConfigReplica, Identity, Wiring};
use vroom_core::events::NewEvent;
use vroom_core::{Engine, OpError};
use vroom_types::{
    ConfigValues, DesiredState, DrainReport, DrainedInstance, ErrorCode, EventKind, HaPolicy,
    Instance, InstanceAction, InstanceState, KeptInstance, Name, NetworkSpec, NicSpec, NodeInfo,
    RunRequest,
};

use crate::guard::GuardLink;
use crate::model::*;
use crate::peer_auth::PeerKey;
use crate::schedule::{self, Candidate, NodeState, Pending, Resident};
use crate::store::etcd::Etcd;
use crate::store::{json, Compare, Kv, Op, Store, StoreError, Txn};
use crate::{fence_deadline_ns, monotonic_ns, KEEPALIVE_EVERY, LEASE_TTL_SECS};
use vroom_base::LockExt;

mod drain;
mod membership;
mod migrate;
mod networks;
mod peers;
mod reconcile;
mod requests;
mod services;
mod standby;
mod view;
mod volumes;
mod wiring;

use membership::Handover;
pub use membership::{init, init_store, MEMBERSHIP_FILE};
pub use peers::PEER_PORT;
use peers::{into_blocking, is_image_id, line, Hello, HELLO_MAX};
use view::View;

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
    store: Arc<dyn Store>,
    name: String,
    advertise: String,
    info: ClusterInfo,
    /// Proves this node's hellos to its peers and checks theirs
    /// ([`crate::peer_auth`]).
    peer_key: PeerKey,
    data_dir: PathBuf,
    engine: Arc<Engine>,
    lease: AtomicI64,
    /// When the last acknowledged keepalive was sent (monotonic ns).
    last_ack_ns: AtomicU64,
    /// Instances this node owns under its current lease, with their fencing token.
    owned: Mutex<BTreeMap<String, i64>>,
    /// Every instance the cluster knows, as of the last pass.
    known: Mutex<BTreeSet<String>>,
    /// The live nodes seen in the last pass (`None` before the first): a
    /// node gone from them is lost.
    seen_nodes: Mutex<Option<BTreeSet<String>>>,
    /// Whether the last pass found this node leading the cluster.
    leads: AtomicBool,
    /// Local starts under way.
    starting: Mutex<BTreeSet<String>>,
    /// The overlay applied per network: its VNI and peers.
    overlays: Mutex<BTreeMap<String, (u32, Vec<Ipv4Addr>)>>,
    /// Images being warmed for standby instances.
    warming: Mutex<BTreeSet<String>>,
    /// Images that could not be warmed (not tried again until a restart).
    unwarmable: Mutex<BTreeSet<String>>,
    /// Images of HA instances that could not be fetched, and when: tried
    /// again after [`standby::FETCH_RETRY`].
    unfetched: Mutex<BTreeMap<String, std::time::Instant>>,
    /// What was last published per owned instance.
    published: Mutex<BTreeMap<String, String>>,
    /// The fencing guard (none in unit tests, which launch no VMM).
    guard: Option<GuardLink>,
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
    /// Replicated volumes this node is making (its copy exists, the
    /// record may not yet), since when.
    creating_volumes: Mutex<BTreeMap<String, std::time::Instant>>,
    /// Copies this node began to serve as a replica, and when.
    served_lately: Mutex<BTreeMap<String, std::time::Instant>>,
    /// Replications this node runs, by volume: the replica's node, and
    /// the task.
    replications: Mutex<BTreeMap<String, (String, tokio::task::JoinHandle<()>)>>,
    /// Volumes whose record names another replica than the one their
    /// running replication copies to: that replication lets it go.
    replica_moved: Mutex<BTreeSet<String>>,
    /// Instances migrating out whose volumes' replicas are being moved to
    /// the destination first (their VM runs, and replicates, meanwhile).
    moving_replicas: Mutex<BTreeSet<String>>,
    /// When each volume's last replication ended.
    replication_ended: Mutex<BTreeMap<String, std::time::Instant>>,
    /// Replications whose job was left paused by a replica's fault, with
    /// that replica's node: the same node back resumes them.
    paused_replications: Mutex<BTreeMap<String, String>>,
}

/// What node `node` answered to a request this node passed on: its own
/// error as it is, or why it could not be asked.
fn peer_error(node: &str, e: vroom_client::ClientError) -> OpError {
    match e {
        vroom_client::ClientError::Api { code, message, .. } => OpError::new(code, message),
        e => OpError::new(ErrorCode::Conflict, format!("cannot ask node {node}: {e}")),
    }
}

fn etcd_error(context: &str, e: StoreError) -> OpError {
    OpError::new(ErrorCode::Internal, format!("{context}: {e}"))
}

/// The cgroup scope of a node's VMMs: unique per cluster and node on a host.
pub fn cgroup_scope(cluster_id: &str, node: &str) -> String {
    format!("{}-{node}", &cluster_id[..cluster_id.len().min(8)])
}

impl ClusterNode {
    /// Logs a cluster event in this node's event log.
    pub(crate) fn event(&self, event: NewEvent) {
        self.engine.events().emit(event);
    }

    /// A node of cluster `info` on `store`, named and advertised as
    /// `(name, advertise)`, with nothing running yet: no lease, no loops.
    fn assemble(
        engine: Arc<Engine>,
        store: Arc<dyn Store>,
        (info, peer_key): (ClusterInfo, PeerKey),
        (name, advertise): (String, String),
        data_dir: PathBuf,
        guard: Option<GuardLink>,
    ) -> Arc<ClusterNode> {
        Arc::new_cyclic(|me| ClusterNode {
            me: me.clone(),
            guard,
            store,
            name,
            advertise,
            info,
            peer_key,
            data_dir,
            engine,
            lease: AtomicI64::new(0),
            last_ack_ns: AtomicU64::new(0),
            owned: Mutex::default(),
            seen_nodes: Mutex::default(),
            leads: AtomicBool::new(false),
            known: Mutex::default(),
            starting: Mutex::default(),
            published: Mutex::default(),
            warming: Mutex::default(),
            overlays: Mutex::default(),
            unwarmable: Mutex::default(),
            unfetched: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            rejoin: tokio::sync::Mutex::new(()),
            incoming: Mutex::default(),
            migrating: Mutex::default(),
            returned: Mutex::default(),
            peers: Mutex::default(),
            api: Mutex::default(),
            draining: Mutex::default(),
            creating_volumes: Mutex::default(),
            served_lately: Mutex::default(),
            replications: Mutex::default(),
            replica_moved: Mutex::default(),
            moving_replicas: Mutex::default(),
            replication_ended: Mutex::default(),
            paused_replications: Mutex::default(),
        })
    }

    /// The node's TLS files: the cluster's CA, its certificate and key.
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    /// The API's TCP listener, bound at join (once).
    pub fn take_api_listener(&self) -> Option<tokio::net::TcpListener> {
        self.api.lock_unpoisoned().take()
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
}

/// The IPv4 address in a node's `--advertise` (`ADDR` or `ADDR:PORT`).
fn advertised_ip(advertise: &str) -> Option<Ipv4Addr> {
    advertise.parse().ok().or_else(|| {
        advertise
            .rsplit_once(':')
            .and_then(|(ip, _)| ip.parse().ok())
    })
}

/// Whether the instance came to `node` from another node (a failover or a move).
fn moved_here(record: &InstanceRecord, node: &str) -> bool {
    record.previous.as_deref().is_some_and(|p| p != node)
}

/// Deletes every key of an instance but its owner key.
fn delete_all(name: &str, record: &InstanceRecord) -> Vec<Op> {
    let mut ops: Vec<Op> = [INSTANCES, STATUSES, CONFIGS, ASSIGNS, WIRINGS]
        .iter()
        .map(|prefix| Op::delete(key(prefix, name)))
        .collect();
    for nic in &record.request.spec.nics {
        if let Some(ip) = nic.ip {
            ops.push(Op::delete(ip_key(nic.network.as_str(), ip)));
        }
    }
    ops
}

#[cfg(test)]
mod tests;
