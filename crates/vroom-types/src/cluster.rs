//! Cluster types: what a node shows of itself, and how an instance survives
//! the loss of its host.

use serde::{Deserialize, Serialize};

use crate::Name;

/// What happens to an instance when its host is lost (cluster mode only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum HaPolicy {
    /// It stays with its host: lost while the host is down.
    #[default]
    None,
    /// The leader places it on another node, where it boots cold.
    Restart,
    /// The new node starts it from a warm snapshot of its image, with its
    /// own identity and replicated config.
    Standby,
}

impl HaPolicy {
    pub fn is_none(&self) -> bool {
        *self == HaPolicy::None
    }
}

impl std::fmt::Display for HaPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HaPolicy::None => "none",
            HaPolicy::Restart => "restart",
            HaPolicy::Standby => "standby",
        })
    }
}

impl std::str::FromStr for HaPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(HaPolicy::None),
            "restart" => Ok(HaPolicy::Restart),
            "standby" => Ok(HaPolicy::Standby),
            _ => Err(format!(
                "unknown HA policy {s:?} (none, restart or standby)"
            )),
        }
    }
}

/// Where a cluster instance should run: its HA policy and anti-affinity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default, skip_serializing_if = "HaPolicy::is_none")]
    pub ha: HaPolicy,
    /// Instances of one spread group are placed on different nodes while
    /// there are enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Name>,
    /// Place it on this node (it must be alive and not cordoned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
}

impl Placement {
    pub fn is_default(&self) -> bool {
        *self == Placement::default()
    }
}

/// One host of the cluster, as `vroom node ls|inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeInfo {
    pub name: Name,
    /// Where its API and its peers reach it.
    pub advertise: String,
    /// Its lease is alive.
    pub alive: bool,
    /// New instances are not placed on it.
    pub cordoned: bool,
    /// It runs the scheduler.
    pub leader: bool,
    pub mem_total_mib: u64,
    /// Memory not yet promised to instances.
    pub mem_free_mib: u64,
    pub cpus: u32,
    /// Unix seconds when it joined (its current lease).
    pub joined_at: u64,
    /// Instances it owns, by name.
    pub instances: Vec<String>,
}

/// What `node drain` did: the instances it moved and where, those it gave
/// up (stopped on purpose), and with `force` those it left running on the
/// node because no other node could take them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrainReport {
    /// The node after the drain (cordoned).
    pub node: NodeInfo,
    pub moved: Vec<DrainedInstance>,
    /// Instances stopped on purpose: no longer owned by the node, placed
    /// where the scheduler picks when started.
    pub released: Vec<String>,
    /// Instances left running on the node (only with `force`).
    pub kept: Vec<KeptInstance>,
}

/// An instance a drain moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrainedInstance {
    pub instance: String,
    /// The node that runs it now.
    pub to: String,
}

/// An instance a forced drain left running where it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeptInstance {
    pub instance: String,
    /// Why no node could take it.
    pub reason: String,
}

/// The cluster's identity, written once by `vroom cluster init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterInfo {
    pub id: String,
    pub created_at: u64,
    /// Lease time to live in milliseconds: a node that misses keepalives
    /// this long loses its instances.
    pub lease_ttl_ms: u64,
}

/// `POST /v1/instances/{name}/migrate`: where to move a running instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The node to move it to.
    pub to: Name,
}

/// A finished live migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Migration {
    pub instance: Name,
    pub from: Name,
    pub to: Name,
    /// From the request to the instance running on `to`, in milliseconds.
    pub total_ms: u64,
    /// QEMU's measure of how long the guest was stopped at the switch-over.
    pub downtime_ms: u64,
    /// From the source's QEMU stopping to the destination's running: the
    /// downtime plus the config volume copy and the ownership handover.
    pub switchover_ms: u64,
    /// RAM and device state sent.
    pub bytes: u64,
}
