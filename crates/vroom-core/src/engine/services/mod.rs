//! Services: members of one image behind a balancer (the catalog's `lb`),
//! kept at their number by [`Engine::converge_service`], which the
//! controller runs every second and after every change (see `pass.rs`);
//! the autoscaler moves that number within the service's bounds from what
//! the balancer measures (`scaler.rs`), and a rolling update replaces the
//! members one at a time.
//!
//! Crash safety: the record is written before each step. A member's name
//! is recorded before its instance is made (a daemon killed in between
//! makes it at the next pass); a member leaves the balancer's backends
//! before its instance is removed (its connections finish on the old
//! HAProxy worker), then leaves the record; a service being removed keeps
//! its record, marked, until its members and balancer are gone. Changes
//! (create, scale, update, rm) only write the record, under a short lock;
//! a pass holds its own service's pass lock while it works, and writes its
//! steps back through [`Engine::edit_service`], so a change made meanwhile
//! is kept.

mod pass;
mod rooms;
mod scaler;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use vroom_base::LockExt;
use vroom_types::{
    balancer_name, is_service_name, AccelChoice, ErrorCode, Instance, InstanceSpec, InstanceState,
    Name, NicSpec, RunRequest, ScaleTarget, Segment, Service, ServiceDefinition, ServiceMember,
    ServiceRecord, ServiceScaleRequest, ServiceUpdate, MAX_SERVICE_NAME_LEN, MAX_SERVICE_REPLICAS,
};

use super::{now_secs, Engine};
use crate::cluster::ClusterServices;
use crate::events::NewEvent;
use crate::OpError;

pub use scaler::Scaler;

/// The balancer appliance's image.
pub const BALANCER_IMAGE: &str = "lb";

impl Engine {
    /// The cluster's side of services, when this host is a cluster node.
    fn services_cluster(&self) -> Option<Arc<dyn ClusterServices>> {
        self.services_cluster.get().cloned()
    }

    async fn service_records(&self) -> Result<Vec<ServiceRecord>, OpError> {
        match self.services_cluster() {
            Some(cluster) => cluster.records().await,
            None => self
                .store
                .services()
                .map_err(|e| OpError::internal("failed to read the services", e)),
        }
    }

    async fn service_record(&self, name: &str) -> Result<ServiceRecord, OpError> {
        self.service_records()
            .await?
            .into_iter()
            .find(|s| s.spec.name.as_str() == name)
            .ok_or_else(|| OpError::not_found("service", name))
    }

    fn save_service(&self, record: &ServiceRecord) -> Result<(), OpError> {
        self.store
            .put_service(record)
            .map_err(|e| OpError::internal("failed to save the service", e))
    }

    /// Reads the record afresh, lets `change` edit it (or refuse, changing
    /// nothing) and writes it back, under the record lock (in a cluster:
    /// a compare-and-swap, tried again on a fresh read): what a change
    /// recorded meanwhile (a scale, an update, a removal) is kept. Returns
    /// the record as written.
    async fn try_edit_service(
        &self,
        name: &str,
        mut change: impl FnMut(&mut ServiceRecord) -> Result<(), OpError> + Send,
    ) -> Result<ServiceRecord, OpError> {
        if let Some(cluster) = self.services_cluster() {
            return cluster.edit_record(name, &mut change).await;
        }
        let _op = self.service_op.lock().await;
        let mut record = self.service_record(name).await?;
        change(&mut record)?;
        self.save_service(&record)?;
        Ok(record)
    }

    /// [`Self::try_edit_service`] with a change that cannot refuse.
    async fn edit_service(
        &self,
        name: &str,
        mut change: impl FnMut(&mut ServiceRecord) + Send,
    ) -> Result<ServiceRecord, OpError> {
        self.try_edit_service(name, |r| {
            change(r);
            Ok(())
        })
        .await
    }

    async fn delete_service_record(&self, name: &str) -> Result<(), OpError> {
        match self.services_cluster() {
            Some(cluster) => cluster.delete_record(name).await,
            None => self
                .store
                .delete_service(name)
                .map_err(|e| OpError::internal("failed to remove the service's record", e)),
        }
    }

    /// A service's record for a change: refused while it is being removed.
    fn changeable(record: &ServiceRecord) -> Result<(), OpError> {
        if record.removing {
            return Err(OpError::conflict(format!(
                "service {} is being removed",
                record.spec.name
            )));
        }
        Ok(())
    }

    /// An instance of a service (a member or its balancer), wherever it
    /// runs in a cluster.
    async fn service_instance(&self, name: &str) -> Result<Instance, OpError> {
        match self.services_cluster() {
            Some(cluster) => cluster.instance(name).await,
            None => self.get(name),
        }
    }

    /// Every instance services may have, by name: this host's, or the
    /// cluster's.
    async fn service_instances(&self) -> BTreeMap<String, Instance> {
        let list = match self.services_cluster() {
            Some(cluster) => cluster.instances().await,
            None => self.list(),
        };
        list.into_iter()
            .map(|i| (i.spec.name.to_string(), i))
            .collect()
    }

    async fn run_service_instance(self: &Arc<Self>, req: RunRequest) -> Result<Instance, OpError> {
        match self.services_cluster() {
            Some(cluster) => cluster.run(req).await,
            None => self.run(req).await,
        }
    }

    async fn remove_service_instance(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        match self.services_cluster() {
            Some(cluster) => cluster.remove(name, true).await,
            None => self.remove(name, true).await,
        }
    }

    /// Every service, as the API shows them.
    pub async fn services(&self) -> Result<Vec<Service>, OpError> {
        let records = self.service_records().await?;
        let instances = self.service_instances().await;
        Ok(records.iter().map(|r| self.shown(r, &instances)).collect())
    }

    pub async fn service(&self, name: &str) -> Result<Service, OpError> {
        let record = self.service_record(name).await?;
        Ok(self.shown(&record, &self.service_instances().await))
    }

    /// The network a service's members and balancer are on: its room's
    /// lan, or the one it names (in a cluster: recorded there at create,
    /// not necessarily made on this node yet).
    fn service_network(&self, spec: &ServiceDefinition) -> Result<Name, OpError> {
        match (&spec.room, &spec.network) {
            (None, Some(network))
                if self.services_cluster().is_some() && self.network(network.as_str()).is_err() =>
            {
                Ok(network.clone())
            }
            (Some(room), None) => {
                self.get_room(room.as_str())?;
                Ok(Segment::Lan.network(room))
            }
            (None, Some(network)) => {
                self.network(network.as_str())?;
                Ok(network.clone())
            }
            (Some(_), Some(_)) => Err(OpError::new(
                ErrorCode::InvalidService,
                "a service is on a network or in a room, not both",
            )),
            (None, None) => Err(OpError::new(
                ErrorCode::InvalidService,
                "a service needs a network (--net) or a room (--room)",
            )),
        }
    }

    /// Records a service; vroomd then brings it to strength: its balancer,
    /// then its members, each added to the balancer once it runs.
    pub async fn create_service(
        self: &Arc<Self>,
        spec: ServiceDefinition,
    ) -> Result<Service, OpError> {
        check_definition(&spec)?;
        // The members' image and the balancer's, before the record lock:
        // catalog images are built on first use, which takes minutes.
        self.check_service_image(&spec.image, spec.port).await?;
        self.resolve_image(BALANCER_IMAGE).await?;
        self.check_in_cluster(&spec)?;
        {
            // Locally, the record lock keeps two creates of one name apart;
            // in a cluster, the record's creation does.
            let _op = self.service_op.lock().await;
            if self.service_record(spec.name.as_str()).await.is_ok() {
                return Err(OpError::new(
                    ErrorCode::AlreadyExists,
                    format!("service {} already exists", spec.name),
                ));
            }
            let instances = self.service_instances().await;
            if let Some(taken) = instances
                .values()
                .find(|i| i.spec.name == spec.name)
                .or_else(|| {
                    instances
                        .values()
                        .find(|i| is_service_name(spec.name.as_str(), i.spec.name.as_str()))
                })
            {
                return Err(OpError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "instance {} has the name of service {} or one it would give its members or balancer",
                        taken.spec.name, spec.name
                    ),
                ));
            }
            let network = self.service_network(&spec)?;
            let record = ServiceRecord::new(spec.clone(), now_secs());
            match self.services_cluster() {
                Some(cluster) => {
                    // Made here, perhaps on this node only: the node that
                    // keeps the service needs it too.
                    cluster.share_network(network.as_str()).await?;
                    cluster.create_record(&record).await?
                }
                None => self.save_service(&record)?,
            }
            let (min, max) = spec.bounds();
            let mut event = NewEvent::new(
                vroom_types::EventKind::Service,
                "created",
                spec.name.as_str(),
            )
            .detail("image", spec.image.clone())
            .detail("replicas", spec.replicas);
            if max > min {
                event = event.detail("max_replicas", max);
            }
            if let Some(target) = spec.scale_on {
                event = event.detail("scale_on", target.to_string());
            }
            self.emit(event);
        }
        self.kick_service(spec.name.as_str());
        self.service(spec.name.as_str()).await
    }

    /// What a service in a cluster cannot have (yet): a room (rooms are
    /// one host's), or a CPU target (the balancer's node sees only its own
    /// members' CPU).
    fn check_in_cluster(&self, spec: &ServiceDefinition) -> Result<(), OpError> {
        if self.services_cluster().is_none() {
            return Ok(());
        }
        if spec.room.is_some() {
            return Err(OpError::new(
                ErrorCode::InvalidService,
                "a service in a cluster is on a network (--net), not in a room: rooms are one host's",
            ));
        }
        if let Some(ScaleTarget::CpuPercent(_)) = spec.scale_on {
            return Err(OpError::new(
                ErrorCode::InvalidService,
                "a service in a cluster scales on its latency (--slo), not on CPU: one node sees only its own members' CPU",
            ));
        }
        Ok(())
    }

    /// An image a service's members can be made of: it exists (catalog
    /// images are built on first use) and, when it says what it serves, it
    /// serves the service's port.
    async fn check_service_image(&self, image: &str, port: u16) -> Result<(), OpError> {
        let resolved = self.resolve_image(image).await?;
        if let Some(tcp) = resolved.manifest.appliance.health_tcp_port {
            if tcp != port {
                return Err(OpError::new(
                    ErrorCode::InvalidService,
                    format!(
                        "image {image} serves port {tcp} (its health check), not the service's port {port}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Sets a service's number of members, or its autoscaler's bounds;
    /// vroomd then brings it there.
    pub async fn scale_service(
        self: &Arc<Self>,
        name: &str,
        req: ServiceScaleRequest,
    ) -> Result<Service, OpError> {
        let mut from = 0;
        let record = self
            .try_edit_service(name, |record| {
                Self::changeable(record)?;
                from = record.desired();
                let scaled = scaled(record, &req)?;
                record.spec.replicas = scaled.0;
                record.spec.max_replicas = scaled.1;
                record.desired = Some(scaled.2);
                Ok(())
            })
            .await?;
        let mut event = NewEvent::new(vroom_types::EventKind::Service, "scaled", name)
            .detail("from", from)
            .detail("to", record.desired());
        if record.spec.max_replicas.is_some() {
            let (min, max) = record.spec.bounds();
            event = event.detail("min", min).detail("max", max);
        }
        self.emit(event);
        self.kick_service(name);
        self.service(name).await
    }

    /// Starts a rolling update to `image`: new members come up one at a
    /// time, each into the balancer before an old one drains and goes; a
    /// new member that fails rolls the service back.
    pub async fn update_service(
        self: &Arc<Self>,
        name: &str,
        image: &str,
    ) -> Result<Service, OpError> {
        // The image is checked before the record lock (a catalog image is
        // built on first use); the port it was checked for must still be
        // the service's under the lock.
        let port = self.service_record(name).await?.spec.port;
        self.check_service_image(image, port).await.map_err(|e| {
            OpError::new(
                e.code,
                format!("cannot update service {name}: {}", e.message),
            )
        })?;
        let mut from = String::new();
        self.try_edit_service(name, |record| {
            Self::changeable(record)?;
            if record.spec.port != port {
                return Err(OpError::conflict(format!(
                    "service {name} changed its port meanwhile; update it again"
                )));
            }
            if let Some(update) = &record.update {
                return Err(OpError::conflict(format!(
                    "service {name} is already being updated to {}; wait for it to finish or roll back",
                    update.to
                )));
            }
            if record.spec.image == image && record.members.iter().all(|m| m.image == image) {
                return Err(OpError::new(
                    ErrorCode::InvalidService,
                    format!("service {name} already runs {image}"),
                ));
            }
            from = std::mem::replace(&mut record.spec.image, image.to_string());
            record.update = Some(ServiceUpdate {
                from: from.clone(),
                to: image.to_string(),
                started_at: now_secs(),
                rolling_back: None,
            });
            Ok(())
        })
        .await?;
        self.emit(
            NewEvent::new(vroom_types::EventKind::Service, "updating", name)
                .detail("from", from)
                .detail("to", image),
        );
        self.kick_service(name);
        self.service(name).await
    }

    /// Marks a service removed; vroomd then removes its members, its
    /// balancer, then its record.
    pub async fn remove_service(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        self.edit_service(name, |record| record.removing = true)
            .await?;
        self.kick_service(name);
        Ok(())
    }

    /// The record as the API shows it, with its instances' states.
    fn shown(&self, record: &ServiceRecord, instances: &BTreeMap<String, Instance>) -> Service {
        let balancer = balancer_name(&record.spec.name);
        let lb = instances.get(balancer.as_str());
        let address = lb.and_then(|i| i.nics.first().and_then(|n| n.ip));
        let backends = configured_backends(lb);
        let members: Vec<ServiceMember> = record
            .members
            .iter()
            .map(|m| {
                let instance = instances.get(m.name.as_str());
                let ip = instance.and_then(|i| i.nics.first().and_then(|n| n.ip));
                ServiceMember {
                    name: m.name.clone(),
                    state: instance.map(|i| i.status.state),
                    ip,
                    image: m.image.clone(),
                    balanced: ip.is_some_and(|ip| backends.contains(&ip)),
                }
            })
            .collect();
        let load = self
            .service_scalers
            .lock_unpoisoned()
            .get(record.spec.name.as_str())
            .and_then(|s| s.load(record.spec.scale_on));
        Service {
            spec: record.spec.clone(),
            balancer,
            address,
            ready: members
                .iter()
                .filter(|m| m.balanced && m.state == Some(InstanceState::Running))
                .count() as u32,
            desired: record.desired(),
            members,
            removing: record.removing,
            update: record.update.clone(),
            load,
            decisions: record.decisions.clone(),
            created_at: record.created_at,
        }
    }
}

/// The addresses the balancer's config sends requests to.
fn configured_backends(lb: Option<&Instance>) -> Vec<Ipv4Addr> {
    lb.and_then(|i| i.config.get("backends"))
        .map(|b| {
            b.split(',')
                .filter_map(|e| e.split_once(':')?.0.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What a scale request makes of a service: (min, max, desired).
fn scaled(
    record: &ServiceRecord,
    req: &ServiceScaleRequest,
) -> Result<(u32, Option<u32>, u32), OpError> {
    let name = &record.spec.name;
    let autoscaled = record.spec.max_replicas.is_some();
    let (min, max) = match (req.min, req.max) {
        (Some(min), Some(max)) => (min, Some(max)),
        (None, None) => match (req.replicas, autoscaled) {
            (Some(n), false) => (n, None),
            (Some(_), true) | (None, _) => (record.spec.replicas, record.spec.max_replicas),
        },
        _ => {
            return Err(OpError::new(
                ErrorCode::InvalidService,
                "give both bounds (min and max) or neither",
            ))
        }
    };
    check_bounds(min, max)?;
    let (lo, hi) = (min, max.unwrap_or(min));
    let desired = match req.replicas {
        Some(n) => {
            check_replicas(n)?;
            if !(lo..=hi).contains(&n) {
                return Err(OpError::new(
                    ErrorCode::InvalidService,
                    format!("{n} is outside service {name}'s bounds {lo}..{hi} (scale to MIN..MAX to change them)"),
                ));
            }
            n
        }
        None => record.desired().clamp(lo, hi),
    };
    if req.replicas.is_none() && req.min.is_none() {
        return Err(OpError::new(
            ErrorCode::InvalidService,
            "give a number of members (replicas) or bounds (min and max)",
        ));
    }
    Ok((min, max, desired))
}

fn check_replicas(replicas: u32) -> Result<(), OpError> {
    if !(1..=MAX_SERVICE_REPLICAS).contains(&replicas) {
        return Err(OpError::new(
            ErrorCode::InvalidService,
            format!("replicas must be 1 to {MAX_SERVICE_REPLICAS}, not {replicas}"),
        ));
    }
    Ok(())
}

fn check_bounds(min: u32, max: Option<u32>) -> Result<(), OpError> {
    check_replicas(min)?;
    if let Some(max) = max {
        check_replicas(max)?;
        if max < min {
            return Err(OpError::new(
                ErrorCode::InvalidService,
                format!("replicas {min}..{max}: the minimum is above the maximum"),
            ));
        }
    }
    Ok(())
}

fn check_definition(spec: &ServiceDefinition) -> Result<(), OpError> {
    if spec.name.as_str().len() > MAX_SERVICE_NAME_LEN {
        return Err(OpError::new(
            ErrorCode::InvalidService,
            format!(
                "service name {} is longer than {MAX_SERVICE_NAME_LEN} characters (its members are NAME-N)",
                spec.name
            ),
        ));
    }
    if spec.port == 0 {
        return Err(OpError::new(
            ErrorCode::InvalidService,
            "port must be 1 to 65535",
        ));
    }
    check_bounds(spec.replicas, spec.max_replicas)?;
    let (min, max) = spec.bounds();
    match (spec.scale_on, max > min) {
        (Some(ScaleTarget::P95Ms(0)), _) | (Some(ScaleTarget::CpuPercent(0)), _) => {
            Err(OpError::new(ErrorCode::InvalidService, "a scaling target must be above 0"))
        }
        (Some(ScaleTarget::CpuPercent(p)), _) if p > 100 => Err(OpError::new(
            ErrorCode::InvalidService,
            format!("a CPU target is 1% to 100%, not {p}%"),
        )),
        (Some(ScaleTarget::P95Ms(ms)), _) if ms > 60_000 => Err(OpError::new(
            ErrorCode::InvalidService,
            format!("a latency target is at most 60000 ms, not {ms}"),
        )),
        (Some(target), false) => Err(OpError::new(
            ErrorCode::InvalidService,
            format!("scaling on {target} needs room to scale: give replicas as MIN..MAX"),
        )),
        (None, true) => Err(OpError::new(
            ErrorCode::InvalidService,
            format!("replicas {min}..{max} need a target to scale on (--slo p95<50ms or --target-cpu 60%)"),
        )),
        _ => Ok(()),
    }
}

impl Engine {
    /// Where a service's instance goes in a cluster: its balancer on this
    /// node (which keeps the service from then on), failing over from a
    /// warm standby; its members spread over the nodes, each restarted
    /// elsewhere if its node is lost.
    fn placed(&self, mut req: RunRequest, service: &Name, balancer: bool) -> RunRequest {
        let Some(cluster) = self.services_cluster() else {
            return req;
        };
        req.placement = if balancer {
            vroom_types::Placement {
                ha: vroom_types::HaPolicy::Standby,
                spread: None,
                node: Name::new(&cluster.node_name()).ok(),
            }
        } else {
            vroom_types::Placement {
                ha: vroom_types::HaPolicy::Restart,
                spread: Some(service.clone()),
                node: None,
            }
        };
        req
    }
}

/// An instance of a service: a member of `image`, or its balancer.
fn member_request(network: &Name, name: &Name, image: &str) -> RunRequest {
    RunRequest {
        spec: InstanceSpec {
            name: name.clone(),
            image: image.to_string(),
            mem_mib: None,
            cpus: 1,
            nics: vec![NicSpec {
                network: network.clone(),
                ip: None,
                role: None,
            }],
            accel: AccelChoice::Auto,
            config_volume_kib: None,
            ephemeral: false,
            volumes: Vec::new(),
        },
        ready_timeout_secs: None,
        from_snapshot: None,
        cold: false,
        placement: Default::default(),
        env: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vroom_types::{member_name, MemberRecord, NetworkSpec, ServiceDefinition};

    use super::*;
    use crate::testing::{GuestBehavior, TestEngine};

    async fn engine_with_lan(dir: &std::path::Path) -> TestEngine {
        let t = TestEngine::new(dir);
        // Passes run when a test says, one at a time.
        t.engine
            .service_kicks
            .store(false, std::sync::atomic::Ordering::SeqCst);
        t.images.add(
            "lb",
            &["lan"],
            &[("backends", ""), ("port", "80"), ("slo_ms", "0")],
        );
        t.images.add("hello2", &["lan"], &[]);
        t.engine
            .create_network(NetworkSpec {
                name: "lan".parse().unwrap(),
                subnet: None,
                nat: false,
                isolated: false,
                mirror: false,
                allow_host: vec![],
            })
            .await
            .unwrap();
        t
    }

    fn shop(replicas: u32) -> ServiceDefinition {
        ServiceDefinition {
            name: "shop".parse().unwrap(),
            image: "hello".into(),
            replicas,
            max_replicas: None,
            network: Some("lan".parse().unwrap()),
            room: None,
            port: 8080,
            scale_on: None,
            // The fakes' warm snapshots would add instances to the lists
            // these tests check.
            warm: false,
        }
    }

    fn to(replicas: u32) -> ServiceScaleRequest {
        ServiceScaleRequest {
            replicas: Some(replicas),
            ..Default::default()
        }
    }

    /// The service once a pass has run (the one its change started may
    /// still be running: passes take turns).
    async fn settle(t: &TestEngine) -> Service {
        t.engine.converge_service("shop").await.unwrap();
        t.engine.service("shop").await.unwrap()
    }

    fn backends(t: &TestEngine) -> Vec<String> {
        let lb = t.engine.get("shop-lb").unwrap();
        let mut b: Vec<String> = lb.config["backends"]
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        b.sort();
        b
    }

    async fn member_backends(t: &TestEngine) -> Vec<String> {
        let mut b: Vec<String> = t
            .engine
            .service("shop")
            .await
            .unwrap()
            .members
            .iter()
            .filter_map(|m| m.ip.map(|ip| format!("{ip}:8080")))
            .collect();
        b.sort();
        b
    }

    fn names(s: &Service) -> Vec<String> {
        s.members.iter().map(|m| m.name.to_string()).collect()
    }

    /// A service is its balancer and its members, the balancer listing
    /// exactly the members; scaling adds and removes members (the newest
    /// first, out of the balancer before they go), and removing it leaves
    /// no instance and no record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_service_keeps_its_members_behind_its_balancer() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        let recorded = t.engine.create_service(shop(2)).await.unwrap();
        assert_eq!(recorded.ready, 0, "returns once recorded: {recorded:?}");
        let shown = settle(&t).await;
        assert_eq!(shown.balancer.as_str(), "shop-lb");
        assert_eq!(names(&shown), ["shop-1", "shop-2"]);
        assert_eq!(shown.ready, 2, "{shown:?}");
        assert!(shown.address.is_some());
        assert_eq!(backends(&t), member_backends(&t).await);
        assert_eq!(t.engine.get("shop-lb").unwrap().config["port"], "8080");

        t.engine.scale_service("shop", to(3)).await.unwrap();
        let up = settle(&t).await;
        assert_eq!(up.ready, 3);
        assert_eq!(backends(&t).len(), 3);
        t.engine.scale_service("shop", to(1)).await.unwrap();
        let down = settle(&t).await;
        assert_eq!(names(&down), ["shop-1"]);
        assert!(t.engine.get("shop-3").is_err() && t.engine.get("shop-2").is_err());
        assert_eq!(backends(&t), member_backends(&t).await);

        t.engine.remove_service("shop").await.unwrap();
        t.engine.converge_service("shop").await.unwrap();
        assert!(t.engine.list().is_empty(), "{:?}", t.engine.list());
        assert!(t.engine.services().await.unwrap().is_empty());
    }

    /// A member that fails leaves the balancer and is replaced by a new
    /// one (a new name: numbers are never reused).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_member_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        t.engine.create_service(shop(1)).await.unwrap();
        settle(&t).await;
        t.driver
            .set_behavior(GuestBehavior::PanicAtBoot(Duration::from_millis(20)));
        t.engine.scale_service("shop", to(2)).await.unwrap();
        t.engine.converge_service("shop").await.unwrap();
        t.driver.set_behavior(GuestBehavior::Ready);
        for _ in 0..200 {
            if t.engine
                .get("shop-2")
                .is_ok_and(|i| i.status.state == InstanceState::Failed)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        t.engine.converge_service("shop").await.unwrap();
        let shown = t.engine.service("shop").await.unwrap();
        assert_eq!(names(&shown), ["shop-1", "shop-3"], "{shown:?}");
        assert!(t.engine.get("shop-2").is_err(), "the failed member is gone");
        assert_eq!(shown.ready, 2);
        assert_eq!(backends(&t), member_backends(&t).await);
    }

    /// A failed balancer (here: it died while booting; or its restart
    /// policy gave up on it) is made again, with the members as its
    /// backends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_balancer_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        t.driver
            .set_behavior(GuestBehavior::PanicAtBoot(Duration::from_millis(20)));
        t.engine.create_service(shop(2)).await.unwrap();
        let _ = t.engine.converge_service("shop").await;
        assert_eq!(
            t.engine.get("shop-lb").unwrap().status.state,
            InstanceState::Failed
        );
        t.driver.set_behavior(GuestBehavior::Ready);
        let shown = settle(&t).await;
        let lb = t.engine.get("shop-lb").unwrap();
        assert_eq!(lb.status.state, InstanceState::Running);
        assert_eq!(shown.ready, 2, "{shown:?}");
        assert_eq!(backends(&t), member_backends(&t).await);
    }

    /// A daemon killed after a member was named, before it was made: the
    /// next pass makes it. One killed while a member was leaving: the next
    /// pass finishes its removal (it is not made again). A removal cut
    /// short finishes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_change_finishes_at_the_next_pass() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        t.engine.create_service(shop(2)).await.unwrap();
        settle(&t).await;
        // What a kill leaves: the record names shop-3, with no instance
        // yet; shop-1 was leaving, out of the balancer, and its instance
        // was removed.
        let mut record = t.engine.service_record("shop").await.unwrap();
        record.desired = Some(2);
        record.members.push(MemberRecord {
            name: member_name(&record.spec.name, 3),
            image: "hello".into(),
            leaving: false,
        });
        record.members[0].leaving = true;
        record.next = 4;
        t.engine.save_service(&record).unwrap();
        t.engine.remove("shop-1", true).await.unwrap();
        let engine = t.restarted();
        engine
            .service_kicks
            .store(false, std::sync::atomic::Ordering::SeqCst);
        engine.recover().await.unwrap();
        engine.converge_service("shop").await.unwrap();
        let shown = engine.service("shop").await.unwrap();
        assert_eq!(names(&shown), ["shop-2", "shop-3"], "{shown:?}");
        assert_eq!(shown.ready, 2, "{shown:?}");
        assert!(engine.get("shop-1").is_err());

        let mut record = engine.service_record("shop").await.unwrap();
        record.removing = true;
        engine.save_service(&record).unwrap();
        engine.converge_service("shop").await.unwrap();
        assert!(engine.list().is_empty());
        assert!(engine.services().await.unwrap().is_empty());
    }

    /// A scale recorded while a pass is starting members is kept: the
    /// pass writes its steps into the record as it is then, not as it
    /// read it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_during_a_pass_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        t.engine.create_service(shop(1)).await.unwrap();
        settle(&t).await;
        t.driver.set_behavior(GuestBehavior::NeverReady);
        t.engine.scale_service("shop", to(2)).await.unwrap();
        let pass = {
            let engine = t.engine.clone();
            tokio::spawn(async move { engine.converge_service("shop").await })
        };
        // The pass waits for shop-2 to be ready; a scale meanwhile returns
        // at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let scaled = tokio::time::timeout(
            Duration::from_secs(2),
            t.engine.scale_service("shop", to(3)),
        )
        .await
        .expect("a scale does not wait for a pass")
        .unwrap();
        assert_eq!(scaled.desired, 3);
        t.driver.set_behavior(GuestBehavior::Ready);
        let pid = t.engine.get("shop-2").unwrap().status.pid.unwrap();
        t.driver.crash(pid);
        let _ = pass.await.unwrap();
        let shown = settle(&t).await;
        assert_eq!(shown.desired, 3, "{shown:?}");
        let shown = settle(&t).await;
        assert_eq!(shown.ready, 3, "{shown:?}");
    }

    /// A rolling update brings one new member up and into the balancer
    /// before an old one leaves, until none of the old image is left; the
    /// balancer never lists fewer members than asked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_update_replaces_members_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        t.engine.create_service(shop(2)).await.unwrap();
        settle(&t).await;
        let updating = t.engine.update_service("shop", "hello2").await.unwrap();
        assert_eq!(updating.update.as_ref().unwrap().to, "hello2");
        let mut passes = 0;
        loop {
            let shown = settle(&t).await;
            passes += 1;
            assert!(backends(&t).len() >= 2, "pass {passes}: {shown:?}");
            if shown.update.is_none() {
                assert!(
                    shown.members.iter().all(|m| m.image == "hello2"),
                    "{shown:?}"
                );
                assert_eq!(shown.ready, 2);
                break;
            }
            assert!(passes < 20, "{shown:?}");
        }
        assert!(t.engine.get("shop-1").is_err() && t.engine.get("shop-2").is_err());
        assert_eq!(t.engine.service("shop").await.unwrap().spec.image, "hello2");
        let err = t.engine.update_service("shop", "hello2").await.unwrap_err();
        assert!(err.message.contains("already runs hello2"), "{err}");
        let err = t.engine.update_service("shop", "nope").await.unwrap_err();
        assert!(err.message.contains("nope"), "{err}");
    }

    /// A new member that fails rolls the update back: the new members go,
    /// the old image is the service's again, and the old members stayed
    /// in the balancer throughout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_update_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        t.engine.create_service(shop(2)).await.unwrap();
        settle(&t).await;
        let before = backends(&t);
        t.driver
            .set_behavior(GuestBehavior::PanicAtBoot(Duration::from_millis(20)));
        t.engine.update_service("shop", "hello2").await.unwrap();
        let _ = t.engine.converge_service("shop").await;
        t.driver.set_behavior(GuestBehavior::Ready);
        let mut shown = t.engine.service("shop").await.unwrap();
        for _ in 0..10 {
            if shown.update.is_none() {
                break;
            }
            shown = settle(&t).await;
        }
        assert!(shown.update.is_none(), "{shown:?}");
        assert_eq!(shown.spec.image, "hello");
        assert_eq!(names(&shown), ["shop-1", "shop-2"], "{shown:?}");
        assert_eq!(backends(&t), before);
        let kinds: Vec<String> = t
            .engine
            .events()
            .history(vroom_types::EventQuery::from_pairs(std::iter::empty()).unwrap())
            .into_iter()
            .filter(|e| e.kind == vroom_types::EventKind::Service)
            .map(|e| e.action)
            .collect();
        assert!(kinds.contains(&"rolled_back".to_string()), "{kinds:?}");
    }

    /// Scale requests: a number within the bounds, new bounds, and what
    /// is refused.
    #[tokio::test]
    async fn scale_requests_keep_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        let auto = ServiceDefinition {
            max_replicas: Some(4),
            scale_on: Some(ScaleTarget::P95Ms(50)),
            ..shop(2)
        };
        t.engine.create_service(auto).await.unwrap();
        let s = t.engine.scale_service("shop", to(3)).await.unwrap();
        assert_eq!((s.desired, s.spec.bounds()), (3, (2, 4)));
        let err = t.engine.scale_service("shop", to(5)).await.unwrap_err();
        assert!(
            err.message.contains("outside service shop's bounds 2..4"),
            "{err}"
        );
        let s = t
            .engine
            .scale_service(
                "shop",
                ServiceScaleRequest {
                    min: Some(1),
                    max: Some(2),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!((s.desired, s.spec.bounds()), (2, (1, 2)), "clamped");
        for (req, says) in [
            (
                ServiceScaleRequest {
                    min: Some(3),
                    max: Some(2),
                    replicas: None,
                },
                "minimum is above",
            ),
            (
                ServiceScaleRequest {
                    min: Some(1),
                    max: None,
                    replicas: None,
                },
                "both bounds",
            ),
            (ServiceScaleRequest::default(), "give a number"),
            (to(0), "replicas must be"),
        ] {
            let err = t.engine.scale_service("shop", req).await.unwrap_err();
            assert!(err.message.contains(says), "{says}: {err}");
        }
        assert_eq!(
            t.engine.service("shop").await.unwrap().spec.bounds(),
            (1, 2)
        );
    }

    /// Bad definitions are refused before anything is made.
    #[tokio::test]
    async fn bad_definitions_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        t.engine
            .run(crate::testing::run_request("shop-1", "hello", &[]))
            .await
            .unwrap();
        t.engine
            .run(crate::testing::run_request("cart", "hello", &[]))
            .await
            .unwrap();
        let before = t.engine.list().len();
        let web = |d: ServiceDefinition| ServiceDefinition {
            name: "web".parse().unwrap(),
            ..d
        };
        let cases: Vec<(ServiceDefinition, &str)> = vec![
            (shop(2), "instance shop-1 has the name of service shop"),
            (
                ServiceDefinition {
                    name: "cart".parse().unwrap(),
                    ..shop(1)
                },
                "instance cart has the name",
            ),
            (
                web(ServiceDefinition {
                    replicas: 0,
                    ..shop(1)
                }),
                "replicas must be 1 to 64",
            ),
            (
                web(ServiceDefinition {
                    replicas: 65,
                    ..shop(1)
                }),
                "replicas must be 1 to 64",
            ),
            (
                web(ServiceDefinition { port: 0, ..shop(1) }),
                "port must be",
            ),
            (
                web(ServiceDefinition {
                    network: Some("nowhere".parse().unwrap()),
                    ..shop(1)
                }),
                "nowhere",
            ),
            (
                web(ServiceDefinition {
                    network: None,
                    ..shop(1)
                }),
                "needs a network",
            ),
            (
                web(ServiceDefinition {
                    network: None,
                    room: Some("ghost".parse().unwrap()),
                    ..shop(1)
                }),
                "ghost",
            ),
            (
                web(ServiceDefinition {
                    image: "nope".into(),
                    ..shop(1)
                }),
                "nope",
            ),
            (
                ServiceDefinition {
                    name: "a-very-long-service-name-xx".parse().unwrap(),
                    ..shop(1)
                },
                "longer than 24",
            ),
            (
                web(ServiceDefinition {
                    replicas: 4,
                    max_replicas: Some(2),
                    scale_on: Some(ScaleTarget::P95Ms(50)),
                    ..shop(1)
                }),
                "the minimum is above the maximum",
            ),
            (
                web(ServiceDefinition {
                    max_replicas: Some(3),
                    ..shop(1)
                }),
                "need a target to scale on",
            ),
            (
                web(ServiceDefinition {
                    scale_on: Some(ScaleTarget::CpuPercent(60)),
                    ..shop(1)
                }),
                "needs room to scale",
            ),
        ];
        for (definition, says) in cases {
            let err = t
                .engine
                .create_service(definition)
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{says}: {err}");
        }
        assert_eq!(t.engine.list().len(), before);
        assert!(t.engine.services().await.unwrap().is_empty());
        t.engine.create_service(web(shop(1))).await.unwrap();
        let err = t
            .engine
            .scale_service("ghost", to(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("ghost"), "{err}");
    }
}
