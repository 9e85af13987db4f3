//! The seam between the engine (one host) and the cluster layer (etcd),
//! as the engine sees it: hooks the engine calls before it launches a VM or
//! acknowledges a change, each given what it needs as arguments, so the
//! cluster never calls back into the engine. A host that is not in a
//! cluster has no [`ClusterHooks`]. What the API asks of the cluster
//! (create, remove or move an instance anywhere, the nodes) goes through
//! [`crate::service::Vroomd`] instead.

use serde::{Deserialize, Serialize};
use vroom_types::{ConfigValues, InstanceSpec, Mirror, Splice};

use crate::error::OpError;

/// What the engine asks of the cluster layer.
#[async_trait::async_trait]
pub trait ClusterHooks: Send + Sync {
    /// Refuses a change to `name`'s config, splices or mirrors that the
    /// cluster cannot take now (it, or the VM it is spliced in front of:
    /// `spliced_into`, is migrating away), before anything is changed.
    fn may_change(&self, name: &str, spliced_into: Option<&str>) -> Result<(), OpError>;
    /// Replicates an accepted config change (before it is acknowledged),
    /// under this node's fencing token. Blocking.
    fn replicate_config(&self, change: ConfigReplica<'_>) -> Result<(), OpError>;
    /// Records a VM's splices and mirrors (`None`: it has none) under this
    /// node's fencing token, so that they move with it. A no-op for a VM
    /// this node does not own.
    async fn replicate_wiring(&self, vm: &str, wiring: Option<Wiring>) -> Result<(), OpError>;
    /// Whether this node may launch `name` now: always for a local-only
    /// instance; for a cluster instance (one the cluster knows, or one it
    /// created here: `cluster_made`) only while this node owns it under a
    /// live lease.
    fn may_launch(&self, name: &str, cluster_made: bool) -> Result<(), OpError>;
    /// Before a VM that uses `volumes` launches here (after
    /// [`ClusterHooks::may_launch`]): a cluster refuses it unless this node
    /// holds their primary copies, and records that their replicas miss
    /// what it writes until they are synced again. Blocking.
    fn launching_with_volumes(&self, _name: &str, _volumes: &[String]) -> Result<(), OpError> {
        Ok(())
    }
}

/// An accepted config change, as the cluster keeps it.
#[derive(Debug, Clone, Copy)]
pub enum ConfigReplica<'a> {
    /// An instance's own config (a no-op for an instance the cluster does
    /// not know).
    Own {
        name: &'a str,
        values: &'a ConfigValues,
    },
    /// The config of an appliance a splice made: it moves with its VM's
    /// splices, so the VM's wiring is recorded again, with the new config
    /// in place.
    Carried { vm: &'a str, wiring: &'a Wiring },
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

/// A change to a service's record, which may refuse (and may be tried
/// again on a fresher record).
pub type RecordChange<'a> =
    dyn FnMut(&mut vroom_types::ServiceRecord) -> Result<(), OpError> + Send + 'a;

/// What services need of the cluster: their records (kept in etcd, the
/// same on every node), the cluster's instances wherever they run, and
/// which node keeps each service (the one that runs its balancer; the
/// leader while it has none). A host that is not in a cluster has none:
/// its services are its own.
#[async_trait::async_trait]
pub trait ClusterServices: Send + Sync {
    async fn records(&self) -> Result<Vec<vroom_types::ServiceRecord>, OpError>;
    /// Records a new service: `AlreadyExists` if one has its name.
    async fn create_record(&self, record: &vroom_types::ServiceRecord) -> Result<(), OpError>;
    /// Reads `name`'s record, lets `change` edit it (or refuse: nothing is
    /// written) and writes it back; read and changed again if another
    /// writer came between. Returns the record as written.
    async fn edit_record(
        &self,
        name: &str,
        change: &mut RecordChange<'_>,
    ) -> Result<vroom_types::ServiceRecord, OpError>;
    async fn delete_record(&self, name: &str) -> Result<(), OpError>;
    /// Whether this node keeps the service whose balancer is `balancer`:
    /// it owns the balancer, or the cluster has no balancer of that name
    /// and this node leads.
    fn keeps_service(&self, balancer: &str) -> bool;
    /// Records this node's network `name` in the cluster (a no-op when it
    /// is recorded), so that every node can make the service's instances
    /// on it.
    async fn share_network(&self, name: &str) -> Result<(), OpError>;
    /// This node's name: a balancer is made where its service is kept.
    fn node_name(&self) -> String;
    /// Every instance of the cluster, wherever it runs.
    async fn instances(&self) -> Vec<vroom_types::Instance>;
    async fn instance(&self, name: &str) -> Result<vroom_types::Instance, OpError>;
    /// Creates an instance in the cluster (placed by its placement).
    async fn run(&self, req: vroom_types::RunRequest) -> Result<vroom_types::Instance, OpError>;
    /// Removes an instance from the cluster, wherever it runs.
    async fn remove(&self, name: &str, force: bool) -> Result<(), OpError>;
}
