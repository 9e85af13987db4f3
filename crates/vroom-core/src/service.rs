//! One way in: what the API asks of vroomd, whether this host runs alone
//! ([`Local`]) or is a node of a cluster (the `vroom-cluster` crate's
//! implementation). The API's handlers call a [`Vroomd`] and never decide
//! local-versus-cluster themselves; what only concerns this host (exec,
//! logs, config, networks, images, splices, rooms, snapshots) they ask of
//! its [`Engine`].

use std::sync::Arc;

use vroom_types::{
    DrainReport, ErrorCode, Instance, InstanceAction, Migration, NodeInfo, RunRequest, Volume,
    VolumeCreateRequest,
};

use crate::engine::Engine;
use crate::error::OpError;

/// The instance lifecycle and the nodes, as the API sees them.
#[async_trait::async_trait]
pub trait Vroomd: Send + Sync {
    /// This host's engine.
    fn engine(&self) -> &Arc<Engine>;

    /// Every instance this host can tell of (a cluster node: the cluster's,
    /// as their owners published them; an unreachable etcd leaves the
    /// local ones).
    async fn list(&self) -> Vec<Instance>;
    /// Creates an instance and starts it.
    async fn run(&self, req: RunRequest) -> Result<Instance, OpError>;
    /// One instance, with its guest's health if it runs here.
    async fn inspect(&self, name: &str) -> Result<Instance, OpError>;
    /// Instance `name` once it is neither starting nor restarting, or as
    /// it is after `timeout` (without its guest's health).
    async fn wait_settled(
        &self,
        name: &str,
        timeout: std::time::Duration,
    ) -> Result<Instance, OpError> {
        self.engine().wait_settled(name, timeout).await
    }
    /// Removes an instance wherever it runs.
    async fn remove(&self, name: &str, force: bool) -> Result<(), OpError>;
    /// Starts, stops, restarts… an instance, and records what the user wants.
    async fn act(&self, name: &str, action: InstanceAction) -> Result<Instance, OpError>;
    /// Moves a running instance to node `to` without stopping it.
    async fn migrate(&self, name: &str, to: &str) -> Result<Migration, OpError>;

    async fn nodes(&self) -> Result<Vec<NodeInfo>, OpError>;
    async fn node(&self, name: &str) -> Result<NodeInfo, OpError>;
    async fn cordon(&self, name: &str, cordoned: bool) -> Result<NodeInfo, OpError>;
    /// Cordons the node and moves every instance it owns elsewhere.
    async fn drain(&self, name: &str, force: bool) -> Result<DrainReport, OpError>;
    /// Forgets a node that is down and holds nothing.
    async fn remove_node(&self, name: &str) -> Result<(), OpError>;

    /// Every volume this host can tell of (a cluster node: with where each
    /// replicated volume's copies are).
    async fn list_volumes(&self) -> Result<Vec<Volume>, OpError> {
        self.engine().list_volumes()
    }
    /// Makes a volume (a cluster node: `replicas: 2` keeps it on two nodes).
    async fn create_volume(&self, req: VolumeCreateRequest) -> Result<Volume, OpError> {
        self.engine().create_volume(req).await
    }
    async fn volume(&self, name: &str) -> Result<Volume, OpError> {
        self.engine().volume(name)
    }
    /// Removes a volume (a replicated one: both copies).
    async fn remove_volume(&self, name: &str) -> Result<(), OpError> {
        self.engine().remove_volume(name).await
    }

    /// Another cluster node's event log, read for `query` and passed on
    /// line by line; `None` when `node` is this host (its own log answers).
    async fn peer_events(
        &self,
        _node: &str,
        _query: &vroom_types::EventQuery,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<vroom_types::EventLine>>, OpError> {
        Ok(None)
    }
}

/// A host that is not in a cluster: the engine alone.
pub struct Local {
    engine: Arc<Engine>,
}

impl Local {
    pub fn new(engine: Arc<Engine>) -> Self {
        Local { engine }
    }
}

/// What a host that is not in a cluster answers to a cluster's request.
pub fn not_in_cluster() -> OpError {
    OpError::new(
        ErrorCode::Conflict,
        "this host is not in a cluster (start vroomd with --cluster)",
    )
}

#[async_trait::async_trait]
impl Vroomd for Local {
    fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    async fn list(&self) -> Vec<Instance> {
        self.engine.list()
    }

    async fn run(&self, req: RunRequest) -> Result<Instance, OpError> {
        if !req.placement.is_default() {
            return Err(OpError::new(
                ErrorCode::Conflict,
                "this host is not in a cluster: placement (ha, spread, node) needs one",
            ));
        }
        self.engine.run(req).await
    }

    async fn inspect(&self, name: &str) -> Result<Instance, OpError> {
        self.engine.inspect(name).await
    }

    async fn remove(&self, name: &str, force: bool) -> Result<(), OpError> {
        self.engine.remove(name, force).await
    }

    async fn act(&self, name: &str, action: InstanceAction) -> Result<Instance, OpError> {
        self.engine.action(name, action).await
    }

    async fn migrate(&self, _name: &str, _to: &str) -> Result<Migration, OpError> {
        Err(not_in_cluster())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, OpError> {
        Err(not_in_cluster())
    }

    async fn node(&self, _name: &str) -> Result<NodeInfo, OpError> {
        Err(not_in_cluster())
    }

    async fn cordon(&self, _name: &str, _cordoned: bool) -> Result<NodeInfo, OpError> {
        Err(not_in_cluster())
    }

    async fn drain(&self, _name: &str, _force: bool) -> Result<DrainReport, OpError> {
        Err(not_in_cluster())
    }

    async fn remove_node(&self, _name: &str) -> Result<(), OpError> {
        Err(not_in_cluster())
    }
}
