//! What the cluster keeps in etcd, and where.
//!
//! Every key is under `/vroom/`:
//! - `cluster`: the [`ClusterInfo`], written once by `vroom cluster init`;
//! - `ca`: the cluster's CA, certificate and key ([`crate::tls`]);
//! - `peer-secret`: the key every peer connection proves its hello with
//!   ([`crate::peer_auth`]);
//! - `nodes/<node>`: a live node's [`NodeRecord`], bound to its lease;
//! - `cordon/<node>`: present while a node is cordoned;
//! - `leader`: the leader's name, bound to its lease;
//! - `instances/<name>`: a cluster instance's [`InstanceRecord`] (desired state);
//! - `owners/<name>`: the owning node, bound to its lease; the key's mod
//!   revision is the fencing token (a claim creates the key, a live
//!   migration's handover rewrites it for the new owner: either way the
//!   old owner's token is void);
//! - `assign/<name>`: the leader's placement, for the named node to claim;
//! - `status/<name>`: the owner's view of the instance ([`StatusRecord`]);
//! - `config/<name>`: the replicated config values;
//! - `networks/<name>`: a network's [`NetworkRecord`], the same on every node;
//! - `ips/<network>/<address>`: who holds an address;
//! - `splices/<name>`: a VM's splices and mirrors
//!   ([`vroom_core::cluster::Wiring`]), written by its owner under the
//!   fencing token, so that they move with it;
//! - `migrations/<name>`: a live migration under way ([`MigrationRecord`]),
//!   bound to the lease of the node that asked for it;
//! - `volumes/<name>`: a cluster's volume ([`VolumeRecord`]): kept on two
//!   nodes, which copy is the primary and how far the replica is; or, with
//!   `one_copy`, the one node that keeps it (`primary`); changed only under
//!   the fencing token of the instance that uses it (or, unused, by its
//!   creation and removal).

use serde::{Deserialize, Serialize};
use vroom_types::{
    DesiredState, Instance, InstanceState, NetworkSpec, ReplicaState, RunRequest, VolumeFs,
};

pub use vroom_types::ClusterInfo;

pub const ROOT: &str = "/vroom/";
pub const CLUSTER: &str = "/vroom/cluster";
pub const LEADER: &str = "/vroom/leader";
pub const NODES: &str = "/vroom/nodes/";
pub const CORDONS: &str = "/vroom/cordon/";
pub const INSTANCES: &str = "/vroom/instances/";
pub const OWNERS: &str = "/vroom/owners/";
pub const ASSIGNS: &str = "/vroom/assign/";
pub const STATUSES: &str = "/vroom/status/";
pub const CONFIGS: &str = "/vroom/config/";
pub const NETWORKS: &str = "/vroom/networks/";
pub const IPS: &str = "/vroom/ips/";
pub const MIGRATIONS: &str = "/vroom/migrations/";
pub const WIRINGS: &str = "/vroom/splices/";
pub const VOLUMES: &str = "/vroom/volumes/";

/// The most config a cluster instance may replicate (its values as JSON):
/// etcd is built for small values.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

pub fn key(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

pub fn ip_key(network: &str, ip: std::net::Ipv4Addr) -> String {
    format!("{IPS}{network}/{ip}")
}

/// A live node, as it publishes itself (bound to its lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub advertise: String,
    pub mem_total_mib: u64,
    /// Memory promised to the instances it runs.
    pub mem_used_mib: u64,
    pub cpus: u32,
    pub joined_at: u64,
    /// Where its peers reach it (`IP:PORT`) to move instances to it.
    #[serde(default)]
    pub peer: Option<String>,
}

/// The record a live node publishes again when what it promised changed
/// (`None` when it did not), keeping the time it joined: a node that
/// starts instances again (after an uncordon) did not join again.
pub fn republished(published: Option<&NodeRecord>, mut fresh: NodeRecord) -> Option<NodeRecord> {
    match published {
        Some(old) if old.mem_used_mib == fresh.mem_used_mib => None,
        Some(old) => {
            fresh.joined_at = old.joined_at;
            Some(fresh)
        }
        None => Some(fresh),
    }
}

/// A cluster instance: what the user asked for, and who it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The request, with every NIC's address filled in.
    pub request: RunRequest,
    /// The instance id: the same on every node it runs on (MACs, machine id).
    pub id: String,
    pub desired: DesiredState,
    /// Being removed: the owner removes it, then deletes every key of it.
    #[serde(default)]
    pub removing: bool,
    /// Guest memory the scheduler reserves.
    pub mem_mib: u64,
    /// The node it last ran on.
    #[serde(default)]
    pub home: Option<String>,
    /// The node it ran on before `home` (set when a node claims it).
    #[serde(default)]
    pub previous: Option<String>,
    pub created_at: u64,
}

/// Who owns an instance (bound to the owner's lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub node: String,
    pub since: u64,
}

/// The owner's view of an instance, written under its fencing token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusRecord {
    pub node: String,
    pub state: InstanceState,
    /// Why the last start on `node` failed.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub instance: Option<Instance>,
    pub updated_at: u64,
}

/// A network every node creates alike (same subnet, same gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub spec: NetworkSpec,
    pub subnet: ipnet::Ipv4Net,
    /// The VXLAN network identifier that joins its bridges across nodes.
    #[serde(default)]
    pub vni: u32,
}

/// Where VNIs are handed out: `vnis/<vni>` holds the network's name.
pub const VNIS: &str = "/vroom/vnis/";
/// The first VNI vroom hands out.
pub const FIRST_VNI: u32 = 4096;

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A live migration: asked for by any node, carried out by `from` (the
/// owner) and `to`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// Names this migration among others of the same instance.
    pub id: String,
    pub from: String,
    pub to: String,
    /// The owner's fencing token when it was asked for: the migration is
    /// void once the owner changed.
    pub token: i64,
    /// Proves a peer connection belongs to this migration.
    pub secret: String,
    pub requested_at: u64,
    pub state: MigrationState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MigrationState {
    Requested,
    /// Ownership went to `to`, in the same transaction.
    Switched {
        downtime_ms: u64,
        bytes: u64,
    },
    /// The source saw the destination run it.
    Done {
        downtime_ms: u64,
        switchover_ms: u64,
        bytes: u64,
    },
    Failed {
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node republishes when its promised memory changes, never with a
    /// new join time.
    #[test]
    fn a_republished_node_keeps_its_join_time() {
        let record = |used: u64, joined_at: u64| NodeRecord {
            name: "n1".into(),
            advertise: "n1".into(),
            mem_total_mib: 4096,
            mem_used_mib: used,
            cpus: 2,
            joined_at,
            peer: None,
        };
        for (published, fresh, want) in [
            (None, record(0, 50), Some(record(0, 50))),
            (Some(record(0, 10)), record(0, 50), None),
            (Some(record(0, 10)), record(192, 50), Some(record(192, 10))),
        ] {
            assert_eq!(
                republished(published.as_ref(), fresh.clone()),
                want,
                "{published:?} {fresh:?}"
            );
        }
    }
}

/// A cluster's volume. Each node that keeps a copy keeps it as a local
/// volume of the same name; this record says which copy is the primary
/// (the one an instance may use) and whether the other has every
/// acknowledged write.
///
/// A volume with one copy (`one_copy`) is kept by `primary` alone and has
/// no replica (`replica` is empty, `state` `Outdated`: never promoted), so
/// its instance runs on that node and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub size_mib: u64,
    pub fs: VolumeFs,
    pub primary: String,
    pub replica: String,
    /// One copy, on `primary`'s node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_copy: bool,
    pub state: ReplicaState,
    /// Rises on every change of primary.
    pub epoch: u64,
    /// When the replica entered `state` (seconds since the Unix epoch).
    pub since: u64,
    /// Why the replica is not up to date.
    #[serde(default)]
    pub reason: Option<String>,
    pub created_at: u64,
    /// The last copy that made the replica up to date.
    #[serde(default)]
    pub last_sync: Option<vroom_types::SyncReport>,
}

impl VolumeRecord {
    /// Whether a second copy is kept: a volume with one copy has none.
    pub fn replicated(&self) -> bool {
        !self.replica.is_empty()
    }

    /// The record with the replica in `state`, for `reason`.
    pub fn with_state(&self, state: ReplicaState, reason: Option<String>, now: u64) -> Self {
        VolumeRecord {
            state,
            reason,
            since: now,
            ..self.clone()
        }
    }

    /// The record after the replica's node took over: it is the primary
    /// (a new epoch), and the old primary's copy misses what comes next.
    /// A volume with one copy, whose replica was made for a live
    /// migration, is the new primary's alone: the old copy goes.
    pub fn promoted(&self, now: u64) -> Self {
        if self.one_copy {
            return VolumeRecord {
                primary: self.replica.clone(),
                replica: String::new(),
                epoch: self.epoch + 1,
                state: ReplicaState::Outdated,
                reason: None,
                since: now,
                ..self.clone()
            };
        }
        VolumeRecord {
            primary: self.replica.clone(),
            replica: self.primary.clone(),
            epoch: self.epoch + 1,
            state: ReplicaState::Outdated,
            reason: Some(format!(
                "node {} took over from {}, whose copy is synced again from it",
                self.replica, self.primary
            )),
            since: now,
            ..self.clone()
        }
    }
}
