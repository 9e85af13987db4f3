//! Services in a cluster: their records live in etcd (every node reads
//! and changes the same ones, each change a compare-and-swap), and the node
//! that runs a service's balancer keeps the service (runs its passes); the
//! leader does while the cluster has no balancer of that name, and makes
//! one on itself. A balancer fails over like any `--ha standby` instance,
//! and the service's keeping goes with it.

use vroom_core::cluster::RecordChange;
use vroom_types::ServiceRecord;

use super::*;

/// The records of services, by name.
pub const SERVICES: &str = "/vroom/services/";

/// How many times a record's change is tried again when other writers
/// keep coming between.
const EDIT_ATTEMPTS: usize = 20;

impl ClusterNode {
    pub async fn service_records(&self) -> Result<Vec<ServiceRecord>, OpError> {
        let (kvs, _) = self
            .store
            .list(SERVICES)
            .await
            .map_err(|e| etcd_error("cannot read the services", e))?;
        Ok(kvs
            .iter()
            .filter_map(|kv| match kv.decode::<ServiceRecord>() {
                Ok(record) => Some(record),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable service record");
                    None
                }
            })
            .collect())
    }

    pub async fn create_service_record(&self, record: &ServiceRecord) -> Result<(), OpError> {
        let at = key(SERVICES, record.spec.name.as_str());
        let txn = Txn::new()
            .when([Compare::create_revision(at.clone(), 0)])
            .and_then([Op::put(at, json(record))]);
        let done = self
            .store
            .txn(txn)
            .await
            .map_err(|e| etcd_error("cannot record the service", e))?;
        if !done.succeeded() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("service {} already exists", record.spec.name),
            ));
        }
        Ok(())
    }

    pub async fn edit_service_record(
        &self,
        name: &str,
        change: &mut RecordChange<'_>,
    ) -> Result<ServiceRecord, OpError> {
        let at = key(SERVICES, name);
        for _ in 0..EDIT_ATTEMPTS {
            let kv = self
                .store
                .get(&at)
                .await
                .map_err(|e| etcd_error("cannot read the service", e))?
                .ok_or_else(|| OpError::not_found("service", name))?;
            let mut record: ServiceRecord = kv
                .decode()
                .map_err(|e| etcd_error("cannot read the service", e))?;
            change(&mut record)?;
            let txn = Txn::new()
                .when([Compare::mod_revision(at.clone(), kv.mod_revision)])
                .and_then([Op::put(at.clone(), json(&record))]);
            if self
                .store
                .txn(txn)
                .await
                .map_err(|e| etcd_error("cannot save the service", e))?
                .succeeded()
            {
                return Ok(record);
            }
        }
        Err(OpError::conflict(format!(
            "service {name} kept changing; try again"
        )))
    }

    pub async fn delete_service_record(&self, name: &str) -> Result<(), OpError> {
        self.store
            .txn(Txn::new().and_then([Op::delete(key(SERVICES, name))]))
            .await
            .map_err(|e| etcd_error("cannot remove the service's record", e))?;
        Ok(())
    }

    /// Records this node's network `name` in the cluster, if it is not.
    pub async fn share_network(&self, name: &str) -> Result<(), OpError> {
        let view = self.view().await?;
        self.cluster_network(name, &view).await.map(|_| ())
    }

    /// Whether this node keeps the service whose balancer is `balancer`:
    /// it owns the balancer under a live lease, or no instance of that name
    /// is in the cluster and this node leads it.
    pub fn keeps_service(&self, balancer: &str) -> bool {
        if !self.lease_alive() {
            return false;
        }
        if self.owned.lock_unpoisoned().contains_key(balancer) {
            return true;
        }
        !self.known.lock_unpoisoned().contains(balancer) && self.leads.load(Ordering::SeqCst)
    }
}
