//! Services: members of one image behind a balancer (the catalog's `lb`),
//! kept at their number by [`Engine::converge_service`], which the
//! controller runs every second and after every change.
//!
//! Crash safety: the record is written before each step. A member's name
//! is recorded before its instance is made (a daemon killed in between
//! makes it at the next pass); a member leaves the balancer's backends
//! before its instance is removed (its connections finish on the old
//! HAProxy worker), then leaves the record; a service being removed keeps
//! its record, marked, until its members and balancer are gone.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use vroom_types::{
    balancer_name, is_service_name, member_name, AccelChoice, ErrorCode, Instance, InstanceSpec,
    InstanceState, Name, NicSpec, RunRequest, Service, ServiceDefinition, ServiceMember,
    ServiceRecord, MAX_SERVICE_NAME_LEN, MAX_SERVICE_REPLICAS,
};

use super::{now_secs, Engine};
use crate::events::NewEvent;
use crate::OpError;

/// The balancer appliance's image.
pub const BALANCER_IMAGE: &str = "lb";

/// How often the controller looks at every service.
const PASS: Duration = Duration::from_secs(1);

/// How many members one pass starts at once (the next pass starts more).
const MAX_STARTING: usize = 4;

/// The highest member number (names stay within 32 characters).
const MAX_MEMBER_NUMBER: u32 = 9_999_999;

impl Engine {
    fn service_record(&self, name: &str) -> Result<ServiceRecord, OpError> {
        self.store
            .services()
            .map_err(|e| OpError::internal("failed to read the services", e))?
            .into_iter()
            .find(|s| s.spec.name.as_str() == name)
            .ok_or_else(|| OpError::not_found("service", name))
    }

    fn save_service(&self, record: &ServiceRecord) -> Result<(), OpError> {
        self.store
            .put_service(record)
            .map_err(|e| OpError::internal("failed to save the service", e))
    }

    /// Every service, as the API shows them.
    pub fn services(&self) -> Result<Vec<Service>, OpError> {
        let records = self
            .store
            .services()
            .map_err(|e| OpError::internal("failed to read the services", e))?;
        let instances = self.instances_by_name();
        Ok(records.iter().map(|r| shown(r, &instances)).collect())
    }

    pub fn service(&self, name: &str) -> Result<Service, OpError> {
        let record = self.service_record(name)?;
        Ok(shown(&record, &self.instances_by_name()))
    }

    fn instances_by_name(&self) -> BTreeMap<String, Instance> {
        self.list()
            .into_iter()
            .map(|i| (i.spec.name.to_string(), i))
            .collect()
    }

    /// Records a service; vroomd then brings it to strength: its balancer,
    /// then its members, each added to the balancer once it runs.
    pub async fn create_service(
        self: &Arc<Self>,
        spec: ServiceDefinition,
    ) -> Result<Service, OpError> {
        {
            let _op = self.service_op.lock().await;
            check_definition(&spec)?;
            if self.service_record(spec.name.as_str()).is_ok() {
                return Err(OpError::new(
                    ErrorCode::AlreadyExists,
                    format!("service {} already exists", spec.name),
                ));
            }
            if let Some(taken) = self
                .list()
                .into_iter()
                .find(|i| is_service_name(spec.name.as_str(), i.spec.name.as_str()))
            {
                return Err(OpError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "instance {} has a name service {} would give its members or balancer",
                        taken.spec.name, spec.name
                    ),
                ));
            }
            self.network(spec.network.as_str())?;
            // The members' image and the balancer's (catalog images are
            // built on first use).
            self.resolve_image(&spec.image).await?;
            self.resolve_image(BALANCER_IMAGE).await?;
            let record = ServiceRecord {
                spec: spec.clone(),
                members: vec![],
                next: 1,
                removing: false,
                created_at: now_secs(),
            };
            self.save_service(&record)?;
            self.emit(
                NewEvent::new(
                    vroom_types::EventKind::Service,
                    "created",
                    spec.name.as_str(),
                )
                .detail("image", spec.image.clone())
                .detail("replicas", spec.replicas),
            );
        }
        self.kick_service(spec.name.as_str());
        self.service(spec.name.as_str())
    }

    /// Sets a service's number of members; vroomd then brings it there.
    pub async fn scale_service(
        self: &Arc<Self>,
        name: &str,
        replicas: u32,
    ) -> Result<Service, OpError> {
        {
            let _op = self.service_op.lock().await;
            let mut record = self.service_record(name)?;
            if record.removing {
                return Err(OpError::conflict(format!(
                    "service {name} is being removed"
                )));
            }
            check_replicas(replicas)?;
            let from = record.spec.replicas;
            record.spec.replicas = replicas;
            self.save_service(&record)?;
            self.emit(
                NewEvent::new(vroom_types::EventKind::Service, "scaled", name)
                    .detail("from", from)
                    .detail("to", replicas),
            );
        }
        self.kick_service(name);
        self.service(name)
    }

    /// Marks a service removed; vroomd then removes its members, its
    /// balancer, then its record.
    pub async fn remove_service(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        {
            let _op = self.service_op.lock().await;
            let mut record = self.service_record(name)?;
            record.removing = true;
            self.save_service(&record)?;
        }
        self.kick_service(name);
        Ok(())
    }

    /// Starts a pass over `name` now, beside the controller's: a change
    /// returns once recorded, and the service converges behind it (`service
    /// inspect` shows how far; the CLI waits for it).
    fn kick_service(self: &Arc<Self>, name: &str) {
        if !self.service_kicks.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let engine = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            if let Err(e) = engine.converge_service(&name).await {
                tracing::warn!(service = %name, error = %e, "service pass failed");
            }
        });
    }

    /// One pass over `name`: finishes a removal, or replaces failed
    /// members, adds or removes members to match the number asked, and
    /// sets the balancer's backends to the running members.
    pub async fn converge_service(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        let _op = self.service_op.lock().await;
        let mut record = match self.service_record(name) {
            Ok(record) => record,
            // Removed meanwhile.
            Err(e) if e.code == ErrorCode::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let balancer = balancer_name(&record.spec.name);
        if record.removing {
            for member in record.members.clone() {
                self.remove_gone_or(&member).await?;
                record.members.retain(|m| m != &member);
                self.save_service(&record)?;
            }
            self.remove_gone_or(&balancer).await?;
            self.store
                .delete_service(name)
                .map_err(|e| OpError::internal("failed to remove the service", e))?;
            self.emit(NewEvent::new(
                vroom_types::EventKind::Service,
                "removed",
                name,
            ));
            return Ok(());
        }
        if self.get(balancer.as_str()).is_err() {
            self.run(member_request(&record.spec, &balancer, BALANCER_IMAGE))
                .await?;
        }
        self.settled(&balancer).await?;
        // Failed members leave the balancer, then go, then are replaced.
        let instances = self.instances_by_name();
        let failed: Vec<Name> = record
            .members
            .iter()
            .filter(|m| {
                instances
                    .get(m.as_str())
                    .is_some_and(|i| i.status.state == InstanceState::Failed)
            })
            .cloned()
            .collect();
        for member in failed {
            let reason = instances[member.as_str()]
                .status
                .last_error
                .clone()
                .unwrap_or_else(|| "it failed".into());
            let keep: Vec<Name> = record
                .members
                .iter()
                .filter(|m| **m != member)
                .cloned()
                .collect();
            self.set_backends(&record.spec, &keep).await?;
            self.remove_gone_or(&member).await?;
            record.members = keep;
            self.save_service(&record)?;
            self.emit(
                NewEvent::new(vroom_types::EventKind::Service, "replacing", name)
                    .message(format!("member {member} failed: {reason}")),
            );
        }
        // Too many: the newest leave the balancer, then go.
        while record.members.len() > record.spec.replicas as usize {
            let member = record
                .members
                .last()
                .cloned()
                .expect("invariant: more than none");
            let keep = record.members[..record.members.len() - 1].to_vec();
            self.set_backends(&record.spec, &keep).await?;
            self.remove_gone_or(&member).await?;
            record.members = keep;
            self.save_service(&record)?;
        }
        // Too few: named first (recorded), then made.
        while record.members.len() < record.spec.replicas as usize {
            if record.next > MAX_MEMBER_NUMBER {
                return Err(OpError::new(
                    ErrorCode::ResourceExhausted,
                    format!("service {name} has used every member number; create it again"),
                ));
            }
            record
                .members
                .push(member_name(&record.spec.name, record.next));
            record.next += 1;
            self.save_service(&record)?;
        }
        // Recorded members without an instance: made now.
        let missing: Vec<Name> = record
            .members
            .iter()
            .filter(|m| self.get(m.as_str()).is_err())
            .cloned()
            .collect();
        // Made side by side: a scale-out takes about one start, not several.
        let mut making = tokio::task::JoinSet::new();
        // A few at a time: a scale to 64 must not start 64 boots at once.
        for member in missing.iter().take(MAX_STARTING) {
            let engine = self.clone();
            let req = member_request(&record.spec, member, &record.spec.image);
            let member = member.clone();
            making.spawn(async move {
                let made = match engine.run(req).await {
                    Ok(_) => engine.settled(&member).await,
                    Err(e) => Err(e),
                };
                (member, made)
            });
        }
        let mut made = vec![];
        while let Some(done) = making.join_next().await {
            made.push(done.map_err(|e| OpError::internal("a member's start failed", e))?);
        }
        let mut first_error = None;
        for (member, made) in made {
            if let Err(e) = made {
                // A member that cannot be made leaves the record: the next
                // pass names another.
                tracing::warn!(service = name, member = %member, error = %e, "a member was not made");
                let _ = self.remove_gone_or(&member).await;
                record.members.retain(|m| m != &member);
                self.save_service(&record)?;
                first_error.get_or_insert(e);
            }
        }
        self.set_backends(&record.spec, &record.members).await?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sets the balancer's backends to those of `members` that run, if they
    /// differ; returns once the balancer uses them.
    async fn set_backends(
        &self,
        spec: &ServiceDefinition,
        members: &[Name],
    ) -> Result<(), OpError> {
        let balancer = balancer_name(&spec.name);
        let instances = self.instances_by_name();
        let backends = members
            .iter()
            .filter_map(|m| instances.get(m.as_str()))
            .filter(|i| i.status.state == InstanceState::Running)
            .filter_map(|i| i.nics.first().and_then(|n| n.ip))
            .map(|ip| format!("{ip}:{}", spec.port))
            .collect::<Vec<_>>()
            .join(",");
        let current = self.config_get(balancer.as_str()).await?;
        let port = spec.port.to_string();
        if current.get("backends") == Some(&backends) && current.get("port") == Some(&port) {
            return Ok(());
        }
        let set = [
            ("backends".to_string(), backends),
            ("port".to_string(), port),
        ]
        .into();
        self.config_update(balancer.as_str(), set).await.map(|_| ())
    }

    /// Waits while instance `name` starts (or stops): its state once it
    /// is running, stopped or failed. Bounded by its own ready timeout,
    /// after which the engine fails it.
    async fn settled(&self, name: &Name) -> Result<Instance, OpError> {
        loop {
            let instance = self.get(name.as_str())?;
            if matches!(
                instance.status.state,
                InstanceState::Running | InstanceState::Stopped | InstanceState::Failed
            ) {
                return Ok(instance);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes instance `name` (stopping it), or nothing if it is gone.
    async fn remove_gone_or(self: &Arc<Self>, name: &Name) -> Result<(), OpError> {
        match self.remove(name.as_str(), true).await {
            Err(e) if e.code == ErrorCode::NotFound => Ok(()),
            other => other,
        }
    }

    /// Runs every service's pass each second, for as long as the engine
    /// lives: failed members are replaced, and interrupted changes finish.
    pub fn spawn_service_controller(self: &Arc<Self>) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PASS).await;
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                let names: Vec<String> = match engine.store.services() {
                    Ok(records) => records
                        .into_iter()
                        .map(|r| r.spec.name.to_string())
                        .collect(),
                    Err(_) => continue,
                };
                for name in names {
                    if let Err(e) = engine.converge_service(&name).await {
                        tracing::warn!(service = %name, error = %e, "service pass failed");
                    }
                }
            }
        });
    }
}

fn check_replicas(replicas: u32) -> Result<(), OpError> {
    if !(1..=MAX_SERVICE_REPLICAS).contains(&replicas) {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("replicas must be 1 to {MAX_SERVICE_REPLICAS}, not {replicas}"),
        ));
    }
    Ok(())
}

fn check_definition(spec: &ServiceDefinition) -> Result<(), OpError> {
    if spec.name.as_str().len() > MAX_SERVICE_NAME_LEN {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!(
                "service name {} is longer than {MAX_SERVICE_NAME_LEN} characters (its members are NAME-N)",
                spec.name
            ),
        ));
    }
    if spec.port == 0 {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            "port must be 1 to 65535",
        ));
    }
    check_replicas(spec.replicas)
}

/// An instance of a service: a member of `image`, or its balancer.
fn member_request(spec: &ServiceDefinition, name: &Name, image: &str) -> RunRequest {
    RunRequest {
        spec: InstanceSpec {
            name: name.clone(),
            image: image.to_string(),
            mem_mib: None,
            cpus: 1,
            nics: vec![NicSpec {
                network: spec.network.clone(),
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
    }
}

/// The record as the API shows it, with its instances' states.
fn shown(record: &ServiceRecord, instances: &BTreeMap<String, Instance>) -> Service {
    let balancer = balancer_name(&record.spec.name);
    let lb = instances.get(balancer.as_str());
    let address = lb.and_then(|i| i.nics.first().and_then(|n| n.ip));
    let backends: Vec<Ipv4Addr> = lb
        .and_then(|i| i.config.get("backends"))
        .map(|b| {
            b.split(',')
                .filter_map(|e| e.split_once(':')?.0.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let members: Vec<ServiceMember> = record
        .members
        .iter()
        .map(|m| {
            let instance = instances.get(m.as_str());
            let ip = instance.and_then(|i| i.nics.first().and_then(|n| n.ip));
            ServiceMember {
                name: m.clone(),
                state: instance.map(|i| i.status.state),
                ip,
                balanced: ip.is_some_and(|ip| backends.contains(&ip)),
            }
        })
        .collect();
    Service {
        spec: record.spec.clone(),
        balancer,
        address,
        ready: members
            .iter()
            .filter(|m| m.balanced && m.state == Some(InstanceState::Running))
            .count() as u32,
        members,
        removing: record.removing,
        created_at: record.created_at,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vroom_types::{NetworkSpec, ServiceDefinition};

    use super::*;
    use crate::testing::{GuestBehavior, TestEngine};

    async fn engine_with_lan(dir: &std::path::Path) -> TestEngine {
        let t = TestEngine::new(dir);
        // Passes run when a test says, one at a time.
        t.engine
            .service_kicks
            .store(false, std::sync::atomic::Ordering::SeqCst);
        t.images
            .add("lb", &["lan"], &[("backends", ""), ("port", "80")]);
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
            network: "lan".parse().unwrap(),
            port: 8080,
        }
    }

    /// The service once a pass has run (the one its change started may
    /// still be running: passes take turns).
    async fn settle(t: &TestEngine) -> Service {
        t.engine.converge_service("shop").await.unwrap();
        t.engine.service("shop").unwrap()
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

    fn member_backends(t: &TestEngine) -> Vec<String> {
        let mut b: Vec<String> = t
            .engine
            .service("shop")
            .unwrap()
            .members
            .iter()
            .filter_map(|m| m.ip.map(|ip| format!("{ip}:8080")))
            .collect();
        b.sort();
        b
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
        let names: Vec<&str> = shown.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["shop-1", "shop-2"]);
        assert_eq!(shown.ready, 2, "{shown:?}");
        assert!(shown.address.is_some());
        assert_eq!(backends(&t), member_backends(&t));
        assert_eq!(t.engine.get("shop-lb").unwrap().config["port"], "8080");

        t.engine.scale_service("shop", 3).await.unwrap();
        let up = settle(&t).await;
        assert_eq!(up.ready, 3);
        assert_eq!(backends(&t).len(), 3);
        t.engine.scale_service("shop", 1).await.unwrap();
        let down = settle(&t).await;
        let names: Vec<&str> = down.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["shop-1"]);
        assert!(t.engine.get("shop-3").is_err() && t.engine.get("shop-2").is_err());
        assert_eq!(backends(&t), member_backends(&t));

        t.engine.remove_service("shop").await.unwrap();
        t.engine.converge_service("shop").await.unwrap();
        assert!(t.engine.list().is_empty(), "{:?}", t.engine.list());
        assert!(t.engine.services().unwrap().is_empty());
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
        t.engine.scale_service("shop", 2).await.unwrap();
        t.engine.converge_service("shop").await.unwrap();
        for _ in 0..200 {
            if t.engine
                .get("shop-2")
                .is_ok_and(|i| i.status.state == InstanceState::Failed)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        t.driver.set_behavior(GuestBehavior::Ready);
        t.engine.converge_service("shop").await.unwrap();
        let shown = t.engine.service("shop").unwrap();
        // The pass the scale started may have replaced shop-2 too, while
        // boots still failed: the replacement's number is not known.
        let names: Vec<&str> = shown.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(names[0], "shop-1");
        let number: u32 = names[1].strip_prefix("shop-").unwrap().parse().unwrap();
        assert!(number > 2, "a new number: {names:?}");
        assert!(t.engine.get("shop-2").is_err(), "the failed member is gone");
        assert_eq!(shown.ready, 2);
        assert_eq!(backends(&t), member_backends(&t));
    }

    /// A daemon killed after a member was named, before it was made: the
    /// next pass makes it. A removal cut short finishes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_change_finishes_at_the_next_pass() {
        let dir = tempfile::tempdir().unwrap();
        let t = engine_with_lan(dir.path()).await;
        t.engine.create_service(shop(1)).await.unwrap();
        settle(&t).await;
        // What a kill leaves: the record names shop-2; no instance yet.
        let mut record = t.engine.service_record("shop").unwrap();
        record.spec.replicas = 2;
        record.members.push(member_name(&record.spec.name, 2));
        record.next = 3;
        t.engine.save_service(&record).unwrap();
        let engine = t.restarted();
        engine
            .service_kicks
            .store(false, std::sync::atomic::Ordering::SeqCst);
        engine.recover().await.unwrap();
        engine.converge_service("shop").await.unwrap();
        let shown = engine.service("shop").unwrap();
        assert_eq!(shown.ready, 2, "{shown:?}");
        assert!(engine.get("shop-2").is_ok());

        let mut record = engine.service_record("shop").unwrap();
        record.removing = true;
        engine.save_service(&record).unwrap();
        engine.converge_service("shop").await.unwrap();
        assert!(engine.list().is_empty());
        assert!(engine.services().unwrap().is_empty());
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
        let before = t.engine.list().len();
        let cases: Vec<(ServiceDefinition, &str)> = vec![
            (
                shop(2),
                "instance shop-1 has a name service shop would give",
            ),
            (
                ServiceDefinition {
                    replicas: 0,
                    ..shop(1)
                },
                "replicas must be 1 to 64",
            ),
            (
                ServiceDefinition {
                    replicas: 65,
                    ..shop(1)
                },
                "replicas must be 1 to 64",
            ),
            (ServiceDefinition { port: 0, ..shop(1) }, "port must be"),
            (
                ServiceDefinition {
                    network: "nowhere".parse().unwrap(),
                    name: "web".parse().unwrap(),
                    ..shop(1)
                },
                "nowhere",
            ),
            (
                ServiceDefinition {
                    image: "nope".into(),
                    name: "web".parse().unwrap(),
                    ..shop(1)
                },
                "nope",
            ),
            (
                ServiceDefinition {
                    name: "a-very-long-service-name-xx".parse().unwrap(),
                    ..shop(1)
                },
                "longer than 24",
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
        assert!(t.engine.services().unwrap().is_empty());
        t.engine
            .create_service(ServiceDefinition {
                name: "web".parse().unwrap(),
                ..shop(1)
            })
            .await
            .unwrap();
        let err = t
            .engine
            .scale_service("web", 0)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("replicas must be"), "{err}");
        let err = t
            .engine
            .scale_service("ghost", 2)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("ghost"), "{err}");
    }
}
