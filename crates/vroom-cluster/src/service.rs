//! A cluster node's [`Vroomd`]: the API's way into the cluster. Instances
//! are created, removed and moved through etcd (the node's [`Cluster`]
//! side); an instance this node runs is inspected and acted on here, and
//! the cluster learns what its user wants of it.

use std::sync::Arc;

use vroom_core::cluster::{ClusterServices, RecordChange};
use vroom_core::service::Vroomd;
use vroom_core::{Engine, OpError};
use vroom_types::{
    DrainReport, Instance, InstanceAction, Migration, NodeInfo, RunRequest, ServiceRecord, Volume,
    VolumeCreateRequest,
};

use crate::ClusterNode;

/// How often a wait for another node's instance reads its state.
const REMOTE_LOOK_AGAIN: std::time::Duration = std::time::Duration::from_millis(100);

/// The API of a host that is a cluster node.
pub struct Clustered {
    engine: Arc<Engine>,
    node: Arc<ClusterNode>,
}

impl Clustered {
    pub fn new(engine: Arc<Engine>, node: Arc<ClusterNode>) -> Self {
        Clustered { engine, node }
    }
}

#[async_trait::async_trait]
impl Vroomd for Clustered {
    fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    async fn peer_events(
        &self,
        node: &str,
        query: &vroom_types::EventQuery,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<vroom_types::EventLine>>, OpError> {
        if node == self.node.node_name() {
            return Ok(None);
        }
        self.node.peer_events(node, query).await.map(Some)
    }

    async fn list(&self) -> Vec<Instance> {
        let mut list = self.engine.list();
        for instance in &mut list {
            instance.node = Some(self.node.node_name().to_string());
        }
        if let Ok(remote) = self.node.instances().await {
            for instance in remote {
                if !list.iter().any(|i| i.spec.name == instance.spec.name) {
                    list.push(instance);
                }
            }
        }
        list
    }

    async fn run(&self, req: RunRequest) -> Result<Instance, OpError> {
        self.node.run(req).await
    }

    async fn inspect(&self, name: &str) -> Result<Instance, OpError> {
        match self.engine.inspect(name).await {
            Ok(mut instance) => {
                instance.node = Some(self.node.node_name().to_string());
                Ok(instance)
            }
            Err(e) => self.node.instance(name).await?.ok_or(e),
        }
    }

    async fn wait_settled(
        &self,
        name: &str,
        timeout: std::time::Duration,
    ) -> Result<Instance, OpError> {
        match self.engine.wait_settled(name, timeout).await {
            Ok(mut instance) => {
                instance.node = Some(self.node.node_name().to_string());
                Ok(instance)
            }
            Err(e) if e.code != vroom_types::ErrorCode::NotFound => Err(e),
            Err(_) => {
                // Another node's: its owner publishes its state in etcd.
                let deadline = std::time::Instant::now() + timeout;
                loop {
                    let instance = self
                        .node
                        .instance(name)
                        .await?
                        .ok_or_else(|| OpError::not_found("instance", name))?;
                    if !instance.status.state.is_coming_up()
                        || std::time::Instant::now() >= deadline
                    {
                        return Ok(instance);
                    }
                    tokio::time::sleep(REMOTE_LOOK_AGAIN).await;
                }
            }
        }
    }

    async fn remove(&self, name: &str, force: bool) -> Result<(), OpError> {
        if !self.node.remove(name, force).await? {
            // A local-only instance: the cluster does not know it.
            self.engine.remove(name, force).await?;
        }
        Ok(())
    }

    async fn act(&self, name: &str, action: InstanceAction) -> Result<Instance, OpError> {
        let instance = self.engine.action(name, action).await?;
        self.node.set_desired(name, instance.desired).await?;
        Ok(instance)
    }

    async fn migrate(&self, name: &str, to: &str) -> Result<Migration, OpError> {
        self.node.migrate(name, to).await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, OpError> {
        self.node.nodes().await
    }

    async fn node(&self, name: &str) -> Result<NodeInfo, OpError> {
        self.node.node(name).await
    }

    async fn cordon(&self, name: &str, cordoned: bool) -> Result<NodeInfo, OpError> {
        self.node.cordon(name, cordoned).await
    }

    async fn drain(&self, name: &str, force: bool) -> Result<DrainReport, OpError> {
        self.node.drain(name, force).await
    }

    async fn remove_node(&self, name: &str) -> Result<(), OpError> {
        self.node.remove_node(name).await
    }

    async fn list_volumes(&self) -> Result<Vec<Volume>, OpError> {
        self.node.list_volumes().await
    }

    async fn create_volume(&self, req: VolumeCreateRequest) -> Result<Volume, OpError> {
        self.node.create_volume(req).await
    }

    async fn volume(&self, name: &str) -> Result<Volume, OpError> {
        self.node.volume(name).await
    }

    async fn remove_volume(&self, name: &str) -> Result<(), OpError> {
        self.node.remove_volume(name).await
    }
}

/// Services in a cluster: their records in etcd, instances anywhere.
#[async_trait::async_trait]
impl ClusterServices for Clustered {
    async fn records(&self) -> Result<Vec<ServiceRecord>, OpError> {
        self.node.service_records().await
    }

    async fn create_record(&self, record: &ServiceRecord) -> Result<(), OpError> {
        self.node.create_service_record(record).await
    }

    async fn edit_record(
        &self,
        name: &str,
        change: &mut RecordChange<'_>,
    ) -> Result<ServiceRecord, OpError> {
        self.node.edit_service_record(name, change).await
    }

    async fn delete_record(&self, name: &str) -> Result<(), OpError> {
        self.node.delete_service_record(name).await
    }

    fn keeps_service(&self, balancer: &str) -> bool {
        self.node.keeps_service(balancer)
    }

    async fn share_network(&self, name: &str) -> Result<(), OpError> {
        self.node.share_network(name).await
    }

    fn node_name(&self) -> String {
        self.node.node_name().to_string()
    }

    async fn instances(&self) -> Vec<Instance> {
        Vroomd::list(self).await
    }

    async fn instance(&self, name: &str) -> Result<Instance, OpError> {
        Vroomd::inspect(self, name).await
    }

    async fn run(&self, req: RunRequest) -> Result<Instance, OpError> {
        Vroomd::run(self, req).await
    }

    async fn remove(&self, name: &str, force: bool) -> Result<(), OpError> {
        Vroomd::remove(self, name, force).await
    }
}
