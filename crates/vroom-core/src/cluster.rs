//! The seam between the engine (one host) and the cluster layer (etcd).
//!
//! A host that is not in a cluster has no [`Cluster`]; one that is hands the
//! engine its implementation (the `vroom-cluster` crate), which the API asks
//! for cluster-wide operations and the engine asks before it launches a VM
//! or acknowledges a config change.

use serde::{Deserialize, Serialize};
use vroom_types::{
    ConfigValues, DesiredState, DrainReport, Instance, InstanceSpec, Migration, Mirror, NodeInfo,
    RunRequest, Splice,
};

use crate::error::OpError;

/// What the cluster layer does for the engine and the API.
#[async_trait::async_trait]
pub trait Cluster: Send + Sync {
    /// Creates an instance in the cluster: recorded in etcd, placed by the
    /// leader's scheduler, run by the node that claims it. Returns once it
    /// runs there (or failed).
    async fn run(&self, req: RunRequest) -> Result<Instance, OpError>;
    /// Removes an instance wherever it runs. `Ok(false)` when the cluster
    /// does not know it (a local-only instance: the engine removes it).
    async fn remove(&self, name: &str, force: bool) -> Result<bool, OpError>;
    /// Records whether the user wants an instance running, so that a
    /// failover does not start what was stopped.
    async fn set_desired(&self, name: &str, desired: DesiredState) -> Result<(), OpError>;
    /// Refuses a change to `name`'s config, splices or mirrors that the
    /// cluster cannot take now (it is migrating away), before anything is
    /// changed.
    fn may_change(&self, _name: &str) -> Result<(), OpError> {
        Ok(())
    }
    /// Replicates an accepted config change (before it is acknowledged),
    /// under this node's fencing token. Blocking.
    fn replicate_config(&self, name: &str, values: &ConfigValues) -> Result<(), OpError>;
    /// Records a VM's splices and mirrors (`None`: it has none) under this
    /// node's fencing token, so that they move with it. A no-op for a VM
    /// this node does not own.
    async fn replicate_wiring(&self, vm: &str, wiring: Option<Wiring>) -> Result<(), OpError>;
    /// Whether this node may launch `name` now: always for a local-only
    /// instance; for a cluster instance (one the cluster knows, or one it
    /// created here: `cluster_made`) only while this node owns it under a
    /// live lease.
    fn may_launch(&self, name: &str, cluster_made: bool) -> Result<(), OpError>;

    /// A cluster instance as its owner last published it.
    async fn instance(&self, name: &str) -> Result<Option<Instance>, OpError>;
    /// Every cluster instance as its owner last published it.
    async fn instances(&self) -> Result<Vec<Instance>, OpError>;

    /// This node's name.
    fn node_name(&self) -> &str;

    async fn nodes(&self) -> Result<Vec<NodeInfo>, OpError>;
    async fn node(&self, name: &str) -> Result<NodeInfo, OpError>;
    async fn cordon(&self, name: &str, cordoned: bool) -> Result<NodeInfo, OpError>;
    /// Cordons the node and moves every instance it owns elsewhere. Refuses
    /// before changing anything when one has no node to go to, unless
    /// `force`: then it stays running there.
    async fn drain(&self, name: &str, force: bool) -> Result<DrainReport, OpError>;
    /// Moves a running instance to node `to` without stopping it (live
    /// migration). Returns once it runs there, or failed and runs on.
    async fn migrate(&self, name: &str, to: &str) -> Result<Migration, OpError>;
    /// Forgets a node that is down and holds nothing.
    async fn remove_node(&self, name: &str) -> Result<(), OpError>;
}

/// Who an instance is, when the cluster (re)creates it on a node: the same
/// id (so the same MACs and machine id) and the replicated config.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub config: Option<ConfigValues>,
    /// A cluster instance (launched only while this node owns it), or one
    /// that belongs to this node alone (a splice's appliance moved here
    /// with its VM).
    pub cluster: bool,
}

/// A VM's splices and mirrors as the cluster keeps them: enough to make
/// them again on the node the VM moves to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Wiring {
    /// Closest to the network first.
    pub splices: Vec<CarriedSplice>,
    pub mirrors: Vec<Mirror>,
}

/// A splice that moves with its VM: the record, and who its appliance is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedSplice {
    pub splice: Splice,
    /// The appliance's id (so its MACs), its spec (the image pinned by
    /// id) and its config.
    pub id: String,
    pub spec: InstanceSpec,
    pub config: ConfigValues,
}
