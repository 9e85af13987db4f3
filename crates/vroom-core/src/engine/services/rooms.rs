//! The services of a room: `[[services]]` in room files (planned and
//! checked whole before anything changes, then created, reshaped, updated
//! or removed), their names in the room's DNS (the balancer's address),
//! and their removal with the room.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vroom_types::{
    balancer_name, is_service_name, ChangeOp, ErrorCode, Name, RoomChange, RoomFile,
    ServiceDefinition, ServiceRecord,
};

use super::{check_definition, Engine, BALANCER_IMAGE};
use crate::events::NewEvent;
use crate::OpError;

/// How long `room apply` waits for a service it changed to converge.
const CONVERGE_WITHIN: Duration = Duration::from_secs(300);

/// What `room apply` does to the room's services, once checked.
#[derive(Debug, Default)]
pub(in crate::engine) struct ServiceSteps {
    remove: Vec<Name>,
    create: Vec<ServiceDefinition>,
    /// New bounds, port or target (the image is `update`'s).
    reshape: Vec<ServiceDefinition>,
    /// A rolling update to a new image.
    update: Vec<(Name, String)>,
}

impl ServiceSteps {
    /// The services that go: their forwards go first.
    pub(in crate::engine) fn removed(&self) -> &[Name] {
        &self.remove
    }
}

impl Engine {
    /// The services in room `room`.
    pub(in crate::engine) fn room_services(
        &self,
        room: &Name,
    ) -> Result<Vec<ServiceRecord>, OpError> {
        Ok(self
            .store
            .services()
            .map_err(|e| OpError::internal("failed to read the services", e))?
            .into_iter()
            .filter(|s| s.spec.room.as_ref() == Some(room))
            .collect())
    }

    /// The instances the room's services own (their members and
    /// balancers): a room file's instances are the room's other members.
    pub(in crate::engine) fn room_service_instances(&self, room: &Name) -> BTreeSet<Name> {
        self.room_services(room)
            .unwrap_or_default()
            .iter()
            .flat_map(|s| {
                s.members
                    .iter()
                    .map(|m| m.name.clone())
                    .chain([balancer_name(&s.spec.name)])
            })
            .collect()
    }

    /// Each service of the room by the address of its balancer, for the
    /// room's DNS and forwards (a service whose balancer has no address
    /// yet has no name yet).
    pub(in crate::engine) fn room_service_addresses(&self, room: &Name) -> Vec<(Name, Ipv4Addr)> {
        self.room_services(room)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| !s.removing)
            .filter_map(|s| {
                let lb = self.get(balancer_name(&s.spec.name).as_str()).ok()?;
                let ip = lb.nics.first()?.ip?;
                Some((s.spec.name, ip))
            })
            .collect()
    }

    /// Checks a room file's services against the file and what exists,
    /// and says what applying it changes: nothing is changed here.
    pub(in crate::engine) async fn plan_room_services(
        &self,
        file: &RoomFile,
    ) -> Result<(Vec<RoomChange>, ServiceSteps), OpError> {
        let room = &file.name;
        let mut changes = vec![];
        let mut steps = ServiceSteps::default();
        let existing = self.room_services(room)?;
        let all = self
            .store
            .services()
            .map_err(|e| OpError::internal("failed to read the services", e))?;
        let instances = self.list();
        let room_owned = self.room_service_instances(room);
        let mut seen: Vec<&Name> = vec![];
        for entry in &file.services {
            let name = &entry.name;
            let context = format!("service {name}");
            let want = entry
                .definition(room)
                .map_err(|e| OpError::new(ErrorCode::InvalidService, e).context(&context))?;
            check_definition(&want).map_err(|e| e.context(&context))?;
            if let Some(other) = seen
                .iter()
                .find(|o| *o == &name || is_service_name(o.as_str(), name.as_str()))
            {
                return Err(OpError::new(
                    ErrorCode::InvalidService,
                    format!("{context}: its name is taken by service {other} of the file"),
                ));
            }
            if let Some(other) = seen
                .iter()
                .find(|o| is_service_name(name.as_str(), o.as_str()))
            {
                return Err(OpError::new(
                    ErrorCode::InvalidService,
                    format!(
                        "{context}: service {other} of the file has a name it gives its members"
                    ),
                ));
            }
            seen.push(name);
            if let Some(iname) = file
                .instances
                .keys()
                .find(|i| *i == name || is_service_name(name.as_str(), i.as_str()))
            {
                return Err(OpError::new(
                    ErrorCode::InvalidService,
                    format!(
                        "{context}: instance {iname} of the file has its name or one it gives its members or balancer"
                    ),
                ));
            }
            if *name == crate::engine::rooms::firewall_name(room) {
                return Err(OpError::new(
                    ErrorCode::InvalidService,
                    format!("{context}: the name is the room's firewall's"),
                ));
            }
            match existing.iter().find(|s| s.spec.name == *name) {
                None => {
                    if let Some(other) = all.iter().find(|s| s.spec.name == *name) {
                        let place = match (&other.spec.room, &other.spec.network) {
                            (Some(r), _) => format!("room {r}"),
                            (None, Some(n)) => format!("network {n}"),
                            (None, None) => "elsewhere".into(),
                        };
                        return Err(OpError::conflict(format!(
                            "{context} exists outside room {room}, on {place}"
                        )));
                    }
                    if let Some(taken) = instances.iter().find(|i| {
                        !room_owned.contains(&i.spec.name)
                            && (i.spec.name == *name
                                || is_service_name(name.as_str(), i.spec.name.as_str()))
                    }) {
                        return Err(OpError::new(
                            ErrorCode::AlreadyExists,
                            format!(
                                "{context}: instance {} has its name or one it would give its members or balancer",
                                taken.spec.name
                            ),
                        ));
                    }
                    self.check_service_image(&want.image, want.port)
                        .await
                        .map_err(|e| e.context(&context))?;
                    self.resolve_image(BALANCER_IMAGE)
                        .await
                        .map_err(|e| e.context(&context))?;
                    changes.push(RoomChange {
                        op: ChangeOp::Add,
                        what: context,
                        detail: shape(&want),
                    });
                    steps.create.push(want);
                }
                Some(have) => {
                    if have.removing {
                        return Err(OpError::conflict(format!(
                            "{context} is being removed; apply again once it is gone"
                        )));
                    }
                    let mut detail = vec![];
                    let image_changes = want.image != have.spec.image;
                    if image_changes {
                        if let Some(update) = &have.update {
                            return Err(OpError::conflict(format!(
                                "{context} is being updated to {}; apply again once it is done",
                                update.to
                            )));
                        }
                        detail.push(format!(
                            "image {} -> {} (rolling update)",
                            have.spec.image, want.image
                        ));
                    }
                    if image_changes || want.port != have.spec.port {
                        self.check_service_image(&want.image, want.port)
                            .await
                            .map_err(|e| e.context(&context))?;
                    }
                    let reshaped = ServiceDefinition {
                        image: have.spec.image.clone(),
                        ..want.clone()
                    };
                    if file_bounds(&want) != file_bounds(&have.spec)
                        || want.scale_on != have.spec.scale_on
                    {
                        detail.push(format!(
                            "replicas {} -> {}",
                            have.spec.scale(),
                            want.scale()
                        ));
                    }
                    if want.port != have.spec.port {
                        detail.push(format!("port {} -> {}", have.spec.port, want.port));
                    }
                    if want.warm != have.spec.warm {
                        detail.push(if want.warm { "warm" } else { "cold" }.to_string());
                    }
                    let reshapes = reshaped != have.spec;
                    if detail.is_empty() {
                        continue;
                    }
                    changes.push(RoomChange {
                        op: ChangeOp::Change,
                        what: context,
                        detail: detail.join(", "),
                    });
                    if reshapes {
                        steps.reshape.push(reshaped);
                    }
                    if image_changes {
                        steps.update.push((name.clone(), want.image.clone()));
                    }
                }
            }
        }
        for have in &existing {
            if !file.services.iter().any(|s| s.name == have.spec.name) {
                changes.push(RoomChange {
                    op: ChangeOp::Remove,
                    what: format!("service {}", have.spec.name),
                    detail: String::new(),
                });
                steps.remove.push(have.spec.name.clone());
            }
        }
        Ok((changes, steps))
    }

    /// Removes, creates, reshapes and updates services as planned, and
    /// returns once each service it touched has converged.
    pub(in crate::engine) async fn apply_room_services(
        self: &Arc<Self>,
        steps: ServiceSteps,
    ) -> Result<(), OpError> {
        for name in &steps.remove {
            self.remove_service(name.as_str()).await?;
            self.converge_service(name.as_str()).await?;
        }
        // Each service touched, with the image it is to run.
        let mut touched = std::collections::BTreeMap::new();
        for spec in steps.create {
            let name = spec.name.clone();
            touched.insert(name.clone(), spec.image.clone());
            self.create_service(spec)
                .await
                .map_err(|e| e.context(format!("service {name}")))?;
        }
        for spec in steps.reshape {
            touched.insert(spec.name.clone(), spec.image.clone());
            self.reshape_service(spec).await?;
        }
        for (name, image) in steps.update {
            self.update_service(name.as_str(), &image)
                .await
                .map_err(|e| e.context(format!("service {name}")))?;
            touched.insert(name, image);
        }
        for (name, image) in touched {
            self.await_service(&name, &image).await?;
        }
        Ok(())
    }

    /// Gives a service new bounds, port or target (its image stays: that
    /// is an update's); vroomd then brings it there.
    async fn reshape_service(self: &Arc<Self>, want: ServiceDefinition) -> Result<(), OpError> {
        let name = want.name.to_string();
        let before = self.service_record(&name).await?;
        let record = self
            .edit_service(&name, |r| {
                let desired = r.desired();
                r.spec.replicas = want.replicas;
                r.spec.max_replicas = want.max_replicas;
                r.spec.port = want.port;
                r.spec.scale_on = want.scale_on;
                r.spec.warm = want.warm;
                let (min, max) = r.spec.bounds();
                r.desired = Some(if max > min {
                    desired.clamp(min, max)
                } else {
                    min
                });
            })
            .await?;
        let (min, max) = record.spec.bounds();
        let mut event = NewEvent::new(vroom_types::EventKind::Service, "changed", &name)
            .detail("from", before.desired())
            .detail("to", record.desired())
            .detail("min", min)
            .detail("max", max)
            .detail("port", record.spec.port);
        if let Some(target) = record.spec.scale_on {
            event = event.detail("scale_on", target.to_string());
        }
        self.emit(event.message(format!("{} by a room file", record.spec.scale())));
        self.kick_service(&name);
        Ok(())
    }

    /// Runs passes over `name` until it has converged (or a pass fails);
    /// an update rolled back meanwhile is an error.
    async fn await_service(self: &Arc<Self>, name: &Name, image: &str) -> Result<(), OpError> {
        let context = format!("service {name}");
        let deadline = Instant::now() + CONVERGE_WITHIN;
        loop {
            self.converge_service(name.as_str())
                .await
                .map_err(|e| e.context(&context))?;
            let service = self.service(name.as_str()).await?;
            if service.converged() {
                if service.spec.image != image {
                    return Err(OpError::conflict(format!(
                        "{context}: the update to {image} was rolled back (`vroom events --filter kind=service` says why)"
                    )));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(OpError::new(
                    ErrorCode::Timeout,
                    format!(
                        "{context} has {} of {} members ready after {}s; vroomd keeps at it",
                        service.ready,
                        service.desired,
                        CONVERGE_WITHIN.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Removes the room's services, each to the end (members, balancer,
    /// record): a room goes with its services.
    pub(in crate::engine) async fn remove_room_services(
        self: &Arc<Self>,
        room: &Name,
    ) -> Result<(), OpError> {
        for service in self.room_services(room)? {
            let name = service.spec.name.as_str();
            match self.remove_service(name).await {
                Err(e) if e.code == ErrorCode::NotFound => continue,
                other => other?,
            }
            self.converge_service(name).await?;
        }
        Ok(())
    }
}

/// A service's bounds as a file gives them (`N`, or `MIN..MAX`).
fn file_bounds(spec: &ServiceDefinition) -> (u32, Option<u32>) {
    let (min, max) = spec.bounds();
    (min, (max > min).then_some(max))
}

/// What a new service is: `web x2 on :80`.
fn shape(spec: &ServiceDefinition) -> String {
    format!("{} x{} on :{}", spec.image, spec.scale(), spec.port)
}
