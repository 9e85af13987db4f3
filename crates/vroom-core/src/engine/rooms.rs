//! Server rooms: per-tenant lan and dmz networks (isolated, no host address)
//! behind a firewall appliance that routes, NATs, serves DHCP and DNS on lan
//! and forwards the room's exposed ports from its wan side.
//!
//! The firewall's `hosts`, `forward` and `domain` config keys are vroom's:
//! they are rendered from the room's members (instances with a NIC on its
//! lan or dmz) and exposes whenever either changes, so DNS names and port
//! forwards follow the instances.

use vroom_base::LockExt;
use vroom_types::{
    check_room_name, AccelChoice, ApplyRoomRequest, ChangeOp, Expose, Protocol, Room, RoomChange,
    RoomFile, RoomInstance, RoomPlan, RoomSpec, RoomState, Segment,
};

use super::*;

/// The firewall config keys a room sets itself.
const ROOM_KEYS: &[&str] = &["hosts", "forward", "domain"];

impl Engine {
    pub fn list_rooms(&self) -> Vec<Room> {
        self.rooms.lock_unpoisoned().values().cloned().collect()
    }

    pub fn get_room(&self, name: &str) -> Result<Room, OpError> {
        self.rooms
            .lock_unpoisoned()
            .values()
            .find(|r| r.name.as_str() == name)
            .cloned()
            .ok_or_else(|| OpError::not_found("room", name))
    }

    fn save_room(&self, room: &Room) -> Result<(), OpError> {
        blocking(|| self.store.put_room(room))
            .map_err(|e| OpError::internal("failed to save the room", e))?;
        self.rooms
            .lock_unpoisoned()
            .insert(room.name.clone(), room.clone());
        Ok(())
    }

    fn forget_room(&self, name: &Name) -> Result<(), OpError> {
        blocking(|| self.store.delete_room(name.as_str()))
            .map_err(|e| OpError::internal("failed to delete the room", e))?;
        self.rooms.lock_unpoisoned().remove(name);
        Ok(())
    }

    /// The instances of a room (a NIC on its lan or dmz), firewall excluded.
    pub fn room_members(&self, room: &Room) -> Vec<Instance> {
        self.list()
            .into_iter()
            .filter(|i| i.spec.name != room.firewall)
            .filter(|i| {
                i.nics
                    .iter()
                    .any(|n| n.network == room.lan || n.network == room.dmz)
            })
            .collect()
    }

    /// Creates a room: its lan and dmz networks and its firewall, ready
    /// and configured. Any failure removes what it made.
    pub(in crate::engine) async fn create_room_unlogged(
        self: &Arc<Self>,
        spec: RoomSpec,
    ) -> Result<Room, OpError> {
        let _op = self.room_op.lock().await;
        self.create_room_locked(spec).await
    }

    /// What a new room needs before anything is built or made: a free
    /// name, no network or firewall of its names, a wan it can route out
    /// of, and free subnets. Returns whether the room makes `default`.
    async fn check_new_room(&self, spec: &RoomSpec) -> Result<bool, OpError> {
        check_room_name(&spec.name)?;
        let name = spec.name.clone();
        if self.get_room(name.as_str()).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a room named {name:?} already exists"),
            ));
        }
        let lan = Segment::Lan.network(&name);
        let dmz = Segment::Dmz.network(&name);
        let firewall = firewall_name(&name);
        for net in [&lan, &dmz] {
            if self.network(net.as_str()).is_ok() {
                return Err(OpError::conflict(room_network_taken(&name, net)));
            }
        }
        if self.get(firewall.as_str()).is_ok() {
            return Err(OpError::conflict(format!(
                "cannot create room {name}: an instance named {firewall} already exists"
            )));
        }
        let wan = spec
            .wan
            .clone()
            .unwrap_or_else(|| Name::new(DEFAULT_NETWORK).expect("invariant: valid name"));
        let make_default = match self.network(wan.as_str()) {
            Ok(net) if net.isolated => {
                return Err(OpError::conflict(format!(
                    "the wan of room {name} cannot be isolated network {wan}: nothing would route it out"
                )))
            }
            Ok(net) => {
                if let Some(want) = spec.networks.wan.filter(|w| *w != net.subnet) {
                    return Err(OpError::conflict(format!(
                        "the wan of room {name} is network {wan}, whose subnet is {}, not {want}",
                        net.subnet
                    )));
                }
                false
            }
            Err(_) if wan.as_str() == DEFAULT_NETWORK => true,
            Err(e) => return Err(e),
        };
        // The subnets asked for: free, and apart from each other.
        let given = spec.networks.given();
        for (i, (role, subnet)) in given.iter().enumerate() {
            if let Some((other, _)) = given[..i].iter().find(|(_, s)| ipam::overlaps(*s, *subnet)) {
                return Err(OpError::conflict(format!(
                    "the {role} subnet {subnet} of room {name} overlaps its {other} subnet"
                )));
            }
            // The firewall's lan DHCP pool is host numbers 100-199 by
            // default, and members are numbered from 2: a /24 holds both.
            if *role != "wan" && subnet.prefix_len() > 24 {
                return Err(OpError::conflict(format!(
                    "the {role} subnet {subnet} of room {name} is too small: a room's lan and dmz need a /24 or larger"
                )));
            }
            if *role != "wan" || make_default {
                self.check_subnet_free(*subnet)
                    .await
                    .map_err(|e| e.context(format!("room {name}'s {role}")))?;
            }
        }
        Ok(make_default)
    }

    async fn create_room_locked(self: &Arc<Self>, spec: RoomSpec) -> Result<Room, OpError> {
        let make_default = self.check_new_room(&spec).await?;
        let name = spec.name.clone();
        let lan = Segment::Lan.network(&name);
        let dmz = Segment::Dmz.network(&name);
        let firewall = firewall_name(&name);
        let wan = spec
            .wan
            .clone()
            .unwrap_or_else(|| Name::new(DEFAULT_NETWORK).expect("invariant: valid name"));
        // The image first: a room without its firewall image fails before
        // anything is made.
        self.resolve_image("firewall").await?;
        let room = Room {
            domain: format!("{name}.lan"),
            name: name.clone(),
            wan: wan.clone(),
            lan: lan.clone(),
            dmz: dmz.clone(),
            firewall: firewall.clone(),
            exposes: vec![],
            state: RoomState::Creating,
            created_at: now_secs(),
        };
        self.save_room(&room)?;
        let mut made_default = false;
        let made = async {
            if make_default && spec.networks.wan.is_some() {
                self.create_network(NetworkSpec {
                    subnet: spec.networks.wan,
                    nat: true,
                    ..NetworkSpec::plain(wan.clone())
                })
                .await?;
                made_default = true;
            }
            for (net, subnet) in [(&lan, spec.networks.lan), (&dmz, spec.networks.dmz)] {
                self.create_network(NetworkSpec {
                    name: net.clone(),
                    subnet,
                    nat: false,
                    isolated: true,
                    mirror: false,
                    allow_host: vec![],
                })
                .await?;
            }
            let nic = |role: &str, network: &Name| NicSpec {
                network: network.clone(),
                ip: None,
                role: Some(Name::new(role).expect("invariant: valid role")),
            };
            self.run(RunRequest {
                spec: InstanceSpec {
                    name: firewall.clone(),
                    image: "firewall".into(),
                    mem_mib: None,
                    cpus: 1,
                    nics: vec![nic("wan", &wan), nic("lan", &lan), nic("dmz", &dmz)],
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
            })
            .await?;
            self.wait_running(
                &firewall,
                Duration::from_secs(DEFAULT_READY_TIMEOUT_SECS + 5),
            )
            .await?;
            let mut ready = room.clone();
            ready.state = RoomState::Ready;
            self.sync_room(&ready).await?;
            self.save_room(&ready)?;
            Ok::<Room, OpError>(ready)
        }
        .await;
        match made {
            Ok(room) => {
                tracing::info!(room = %room.name, "room created");
                Ok(room)
            }
            Err(e) => {
                tracing::warn!(room = %name, error = %e, "room creation failed; removing what it made");
                if let Err(undo) = self.tear_down_room(&room).await {
                    tracing::error!(room = %name, error = %undo, "failed to undo a room");
                }
                if made_default {
                    if let Err(undo) = self.remove_network(wan.as_str()).await {
                        tracing::warn!(room = %name, error = %undo, "cannot remove the wan network the room made");
                    }
                }
                Err(e)
            }
        }
    }

    /// Removes a room: refused while it has instances unless `force`, which
    /// removes them first (unsplicing what is spliced in front of them).
    pub(in crate::engine) async fn remove_room_unlogged(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> Result<(), OpError> {
        let _op = self.room_op.lock().await;
        let room = self.get_room(name)?;
        let members: Vec<String> = self
            .room_members(&room)
            .iter()
            .map(|i| i.spec.name.to_string())
            .collect();
        if !members.is_empty() && !force {
            return Err(OpError::conflict(format!(
                "room {name} still has {}; `vroom room rm --force {name}` removes them too",
                members.join(", ")
            )));
        }
        self.tear_down_room(&room).await
    }

    /// Marks a room removing and removes, in order: splices in front of its
    /// members, its members, its firewall, its networks, its record. Every
    /// step may be repeated, so recovery finishes what a daemon died in.
    async fn tear_down_room(self: &Arc<Self>, room: &Room) -> Result<(), OpError> {
        let mut removing = room.clone();
        removing.state = RoomState::Removing;
        self.save_room(&removing)?;
        // Services first: their controller would make their members again.
        self.remove_room_services(&room.name).await?;
        let members: Vec<Name> = self
            .room_members(room)
            .into_iter()
            .map(|i| i.spec.name)
            .collect();
        for splice in self.list_splices() {
            if members.contains(&splice.vm) || members.contains(&splice.appliance) {
                self.unsplice(splice.appliance.as_str()).await?;
            }
        }
        for member in self.room_members(room) {
            self.remove(member.spec.name.as_str(), true).await?;
        }
        if self.get(room.firewall.as_str()).is_ok() {
            self.remove(room.firewall.as_str(), true).await?;
        }
        for net in [&room.lan, &room.dmz] {
            if self.network(net.as_str()).is_ok() {
                self.remove_network(net.as_str()).await?;
            }
        }
        self.forget_room(&room.name)?;
        tracing::info!(room = %room.name, "room removed");
        Ok(())
    }

    /// Adds a port forward from the room's wan side to one of its instances.
    pub(in crate::engine) async fn expose_unlogged(
        self: &Arc<Self>,
        name: &str,
        expose: Expose,
    ) -> Result<Room, OpError> {
        let _op = self.room_op.lock().await;
        expose.check()?;
        let mut room = self.ready_room(name)?;
        if !self.exposable(&room).contains(&expose.to) {
            return Err(OpError::conflict(format!(
                "room {name} has no instance {} (nor a service of that name)",
                expose.to
            )));
        }
        if let Some(taken) = room
            .exposes
            .iter()
            .find(|e| e.port == expose.port && e.proto == expose.proto)
        {
            return Err(OpError::conflict(format!(
                "{}/{} of room {name} already goes to {}:{}",
                expose.proto.as_str(),
                expose.port,
                taken.to,
                taken.to_port
            )));
        }
        room.exposes.push(expose);
        room.exposes.sort();
        self.sync_room(&room).await?;
        self.save_room(&room)?;
        Ok(room)
    }

    /// Removes a port forward.
    pub(in crate::engine) async fn unexpose_unlogged(
        self: &Arc<Self>,
        name: &str,
        port: u16,
        proto: Protocol,
    ) -> Result<Room, OpError> {
        let _op = self.room_op.lock().await;
        let mut room = self.ready_room(name)?;
        let before = room.exposes.len();
        room.exposes
            .retain(|e| !(e.port == port && e.proto == proto));
        if room.exposes.len() == before {
            return Err(OpError::new(
                ErrorCode::NotFound,
                format!("room {name} does not expose {}/{port}", proto.as_str()),
            ));
        }
        self.sync_room(&room).await?;
        self.save_room(&room)?;
        Ok(room)
    }

    /// What an expose of the room may go to: its members and services.
    fn exposable(&self, room: &Room) -> Vec<Name> {
        self.room_members(room)
            .into_iter()
            .map(|i| i.spec.name)
            .chain(
                self.room_service_addresses(&room.name)
                    .into_iter()
                    .map(|(service, _)| service),
            )
            .collect()
    }

    fn ready_room(&self, name: &str) -> Result<Room, OpError> {
        let room = self.get_room(name)?;
        if room.state != RoomState::Ready {
            return Err(OpError::conflict(format!("room {name} is {}", room.state)));
        }
        Ok(room)
    }

    /// The firewall config a room's members and exposes call for.
    fn room_config(&self, room: &Room) -> ConfigValues {
        let mut hosts = vec![];
        let mut address = BTreeMap::new();
        for member in self.room_members(room) {
            let ip = member
                .nics
                .iter()
                .filter(|n| n.network == room.lan || n.network == room.dmz)
                .find_map(|n| n.ip);
            if let Some(ip) = ip {
                hosts.push(format!("{}={ip}", member.spec.name));
                hosts.push(format!("{}.{}={ip}", member.spec.name, room.domain));
                address.insert(member.spec.name.clone(), ip);
            }
        }
        // A service answers to its name at its balancer's address, and is
        // exposed like an instance.
        for (service, ip) in self.room_service_addresses(&room.name) {
            hosts.push(format!("{service}={ip}"));
            hosts.push(format!("{service}.{}={ip}", room.domain));
            address.insert(service, ip);
        }
        let forward: Vec<String> = room
            .exposes
            .iter()
            .filter_map(|e| {
                let ip = address.get(&e.to)?;
                Some(format!(
                    "{}/{}:{ip}:{}",
                    e.proto.as_str(),
                    e.port,
                    e.to_port
                ))
            })
            .collect();
        [
            ("domain".to_string(), room.domain.clone()),
            ("hosts".to_string(), hosts.join(",")),
            ("forward".to_string(), forward.join(",")),
        ]
        .into()
    }

    /// Puts the room's names and forwards into its firewall's config, if
    /// they differ from what it has (live when it runs).
    async fn sync_room(&self, room: &Room) -> Result<(), OpError> {
        let want = self.room_config(room);
        let have = self.get(room.firewall.as_str())?.config;
        if want.iter().all(|(k, v)| have.get(k) == Some(v)) {
            return Ok(());
        }
        self.config_update(room.firewall.as_str(), want)
            .await
            .map(|_| ())
    }

    /// After an instance came or went: the rooms whose lan or dmz it is on
    /// get their firewall's names and forwards again. Failures are logged:
    /// the instance's own operation succeeded.
    pub(super) async fn sync_rooms_on(&self, networks: &[Name]) {
        let rooms: Vec<Room> = self
            .list_rooms()
            .into_iter()
            .filter(|r| r.state == RoomState::Ready)
            .filter(|r| networks.contains(&r.lan) || networks.contains(&r.dmz))
            .collect();
        for mut room in rooms {
            // A removed member takes its exposes along: the forward is gone,
            // and so is its record.
            let members = self.exposable(&room);
            let before = room.exposes.len();
            room.exposes.retain(|e| members.contains(&e.to));
            if room.exposes.len() != before {
                if let Err(e) = self.save_room(&room) {
                    tracing::warn!(room = %room.name, error = %e, "cannot drop the exposes of a removed instance");
                }
            }
            if let Err(e) = self.sync_room(&room).await {
                tracing::warn!(room = %room.name, error = %e, "cannot update the room's DNS names and forwards");
            }
        }
    }

    /// Converges a room to a file: creates it, sets its firewall's config,
    /// adds, recreates (image, segment or memory changed), reconfigures and
    /// removes instances, and sets its exposes. Returns the changes; with
    /// `dry_run` only lists them.
    pub(in crate::engine) async fn apply_room_unlogged(
        self: &Arc<Self>,
        req: ApplyRoomRequest,
    ) -> Result<RoomPlan, OpError> {
        let _op = self.room_op.lock().await;
        let file = req.room;
        check_room_name(&file.name)?;
        let name = file.name.clone();
        for key in file.firewall.keys() {
            if ROOM_KEYS.contains(&key.as_str()) {
                return Err(OpError::new(
                    ErrorCode::Conflict,
                    format!(
                        "firewall key {key} is set by the room (from its instances and exposes)"
                    ),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for e in &file.expose {
            e.check()?;
            if !file.instances.contains_key(&e.to) && !file.services.iter().any(|s| s.name == e.to)
            {
                return Err(OpError::new(
                    ErrorCode::Conflict,
                    format!(
                        "expose {}/{} goes to {}, which is not an instance or service of the room",
                        e.proto.as_str(),
                        e.port,
                        e.to
                    ),
                ));
            }
            if !seen.insert((e.proto, e.port)) {
                return Err(OpError::new(
                    ErrorCode::Conflict,
                    format!("expose {}/{} is given twice", e.proto.as_str(), e.port),
                ));
            }
        }
        let existing = self.get_room(name.as_str()).ok();
        let wan = file
            .wan
            .clone()
            .unwrap_or_else(|| Name::new(DEFAULT_NETWORK).expect("invariant: valid name"));
        let mut changes = vec![];
        let change = |op, what: String, detail: String| RoomChange { op, what, detail };
        let members: Vec<Instance> = match &existing {
            Some(room) => {
                if room.wan != wan {
                    return Err(OpError::conflict(format!(
                        "room {name} has its wan on {}; a room's wan cannot change (remove the room first)",
                        room.wan
                    )));
                }
                if room.state != RoomState::Ready {
                    return Err(OpError::conflict(format!("room {name} is {}", room.state)));
                }
                for (role, want) in file.networks.given() {
                    let net = match role {
                        "wan" => &room.wan,
                        "lan" => &room.lan,
                        _ => &room.dmz,
                    };
                    let have = self.network(net.as_str())?.subnet;
                    if have != want {
                        return Err(OpError::conflict(format!(
                            "the {role} of room {name} is {have}, not {want}; a room's subnets cannot change (remove the room first)"
                        )));
                    }
                }
                // The services' members and balancers are theirs.
                let owned = self.room_service_instances(&room.name);
                self.room_members(room)
                    .into_iter()
                    .filter(|i| !owned.contains(&i.spec.name))
                    .collect()
            }
            None => {
                self.check_new_room(&RoomSpec {
                    name: name.clone(),
                    wan: file.wan.clone(),
                    networks: file.networks.clone(),
                })
                .await?;
                let subnets: String = file
                    .networks
                    .given()
                    .iter()
                    .map(|(role, subnet)| format!(", {role} {subnet}"))
                    .collect();
                changes.push(change(
                    ChangeOp::Add,
                    format!("room {name}"),
                    format!("wan {wan}{subnets}"),
                ));
                vec![]
            }
        };
        let fw_config = match &existing {
            Some(room) => self.get(room.firewall.as_str())?.config,
            None => ConfigValues::new(),
        };
        for (key, value) in &file.firewall {
            if fw_config.get(key) != Some(value) {
                changes.push(change(
                    ChangeOp::Change,
                    format!("firewall {name}-fw"),
                    format!("config {key}={value}"),
                ));
            }
        }
        let segment_of = |i: &Instance| -> Option<Segment> {
            i.nics.iter().find_map(|n| {
                if n.network == Segment::Lan.network(&name) {
                    Some(Segment::Lan)
                } else if n.network == Segment::Dmz.network(&name) {
                    Some(Segment::Dmz)
                } else {
                    None
                }
            })
        };
        // Instances: what to create, recreate, reconfigure and remove.
        let mut create = vec![];
        let mut recreate = vec![];
        let mut reconfigure = vec![];
        for (iname, want) in &file.instances {
            match members.iter().find(|m| &m.spec.name == iname) {
                None => {
                    if self.get(iname.as_str()).is_ok() {
                        return Err(OpError::conflict(format!(
                            "instance {iname} exists outside room {name}"
                        )));
                    }
                    changes.push(change(
                        ChangeOp::Add,
                        format!("instance {iname}"),
                        format!("{} ({})", want.image, want.segment),
                    ));
                    create.push(iname.clone());
                }
                Some(have) => {
                    let image_same = want.image == have.image_name
                        || want.image == have.spec.image
                        || want.image == have.image_id;
                    let mem_same = want.mem_mib.is_none_or(|m| m == have.mem_mib);
                    if !image_same || segment_of(have) != Some(want.segment) || !mem_same {
                        changes.push(change(
                            ChangeOp::Change,
                            format!("instance {iname}"),
                            format!("recreate as {} ({})", want.image, want.segment),
                        ));
                        recreate.push(iname.clone());
                        continue;
                    }
                    let differs: Vec<String> = want
                        .config
                        .iter()
                        .filter(|(k, v)| have.config.get(*k) != Some(*v))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    if !differs.is_empty() {
                        changes.push(change(
                            ChangeOp::Change,
                            format!("instance {iname}"),
                            format!("config {}", differs.join(" ")),
                        ));
                        reconfigure.push(iname.clone());
                    }
                }
            }
        }
        let remove: Vec<Name> = members
            .iter()
            .map(|m| m.spec.name.clone())
            .filter(|m| !file.instances.contains_key(m))
            .collect();
        for m in &remove {
            changes.push(change(
                ChangeOp::Remove,
                format!("instance {m}"),
                String::new(),
            ));
        }
        let (service_changes, services) = self.plan_room_services(&file).await?;
        changes.extend(service_changes);
        let mut want_exposes = file.expose.clone();
        want_exposes.sort();
        let have_exposes = existing
            .as_ref()
            .map(|r| r.exposes.clone())
            .unwrap_or_default();
        for e in &want_exposes {
            let key = |x: &Expose| (x.proto, x.port);
            match have_exposes.iter().find(|h| key(h) == key(e)) {
                None => changes.push(change(
                    ChangeOp::Add,
                    format!("expose {}/{}", e.proto.as_str(), e.port),
                    format!("-> {}:{}", e.to, e.to_port),
                )),
                Some(h) if h != e => changes.push(change(
                    ChangeOp::Change,
                    format!("expose {}/{}", e.proto.as_str(), e.port),
                    format!("-> {}:{}", e.to, e.to_port),
                )),
                Some(_) => {}
            }
        }
        for h in &have_exposes {
            if !want_exposes
                .iter()
                .any(|e| (e.proto, e.port) == (h.proto, h.port))
            {
                changes.push(change(
                    ChangeOp::Remove,
                    format!("expose {}/{}", h.proto.as_str(), h.port),
                    format!("-> {}:{}", h.to, h.to_port),
                ));
            }
        }
        // The whole file is checked before anything is made, and a dry run
        // refuses what the apply would.
        self.check_room_file(
            &file,
            existing.as_ref(),
            &members,
            &create,
            &recreate,
            &reconfigure,
        )
        .await?;
        let plan = RoomPlan {
            room: name.clone(),
            changes,
            applied: !req.dry_run,
        };
        if req.dry_run || plan.changes.is_empty() {
            return Ok(RoomPlan {
                applied: false,
                ..plan
            });
        }

        let mut room = match existing {
            Some(room) => room,
            None => {
                self.create_room_locked(RoomSpec {
                    name: name.clone(),
                    wan: file.wan.clone(),
                    networks: file.networks.clone(),
                })
                .await?
            }
        };
        if file
            .firewall
            .iter()
            .any(|(k, v)| fw_config.get(k) != Some(v))
        {
            self.config_update(
                room.firewall.as_str(),
                file.firewall.clone().into_iter().collect(),
            )
            .await?;
        }
        // Forwards to instances about to go are dropped first.
        room.exposes.retain(|e| {
            !remove.contains(&e.to)
                && !recreate.contains(&e.to)
                && !services.removed().contains(&e.to)
        });
        self.save_room(&room)?;
        for m in remove.iter().chain(&recreate) {
            for splice in self.list_splices() {
                if &splice.vm == m {
                    self.unsplice(splice.appliance.as_str()).await?;
                }
            }
            self.remove(m.as_str(), true).await?;
        }
        for iname in create.iter().chain(&recreate) {
            self.run(RunRequest {
                spec: room_instance_spec(&name, iname, &file.instances[iname]),
                ready_timeout_secs: None,
                from_snapshot: None,
                cold: false,
                placement: Default::default(),
                env: Default::default(),
            })
            .await?;
        }
        // An apply is done when every member it made serves: each new one
        // has passed its health check, each config change too.
        for iname in create.iter().chain(&recreate).chain(&reconfigure) {
            let want = &file.instances[iname];
            self.wait_running(iname, Duration::from_secs(DEFAULT_READY_TIMEOUT_SECS + 5))
                .await?;
            if !want.config.is_empty() {
                self.config_update(iname.as_str(), want.config.clone().into_iter().collect())
                    .await?;
            }
        }
        self.apply_room_services(services).await?;
        room.exposes = want_exposes;
        self.sync_room(&room).await?;
        self.save_room(&room)?;
        Ok(plan)
    }

    /// Every instance of a room file the apply would make or change, as
    /// `run` and `config set` would take it (its name, image, memory, CPUs
    /// and config against the image's schema), and the firewall's config.
    /// (One NIC without a role fits any image: `run` gives it the first.)
    async fn check_room_file(
        &self,
        file: &RoomFile,
        existing: Option<&Room>,
        members: &[Instance],
        create: &[Name],
        recreate: &[Name],
        reconfigure: &[Name],
    ) -> Result<(), OpError> {
        let room = &file.name;
        let firewall = firewall_name(room);
        match existing.and_then(|r| self.get(r.firewall.as_str()).ok()) {
            Some(fw) => {
                let fw_image = self.resolve_image(&fw.image_id).await?;
                let mut values = fw.config.clone();
                values.extend(file.firewall.clone());
                config::check_on_host(&fw_image, &fw, &values)
            }
            None => {
                let fw_image = self.resolve_image("firewall").await?;
                let mut values = fw_image.manifest.appliance.seed_config.clone();
                values.extend(file.firewall.clone());
                config::check_before_instance(&fw_image, &values)
            }
        }
        .map_err(|e| e.context(format!("firewall {firewall}")))?;
        for iname in create.iter().chain(recreate).chain(reconfigure) {
            let want = &file.instances[iname];
            let context = format!("instance {iname}");
            if *iname == firewall {
                return Err(OpError::conflict(format!(
                    "{context}: the name is the room's firewall's"
                )));
            }
            // Reconfigured in place: the image it runs; made anew: the file's.
            let have = members
                .iter()
                .find(|m| &m.spec.name == iname)
                .filter(|_| reconfigure.contains(iname));
            let image_ref = have.map_or(want.image.as_str(), |h| h.image_id.as_str());
            let image = self
                .resolve_image(image_ref)
                .await
                .map_err(|e| e.context(&context))?;
            let spec = room_instance_spec(room, iname, want);
            self.check_resources(&spec, &image)
                .map_err(|e| e.context(&context))?;
            match have {
                Some(have) => {
                    let mut values = have.config.clone();
                    values.extend(want.config.clone());
                    config::check_on_host(&image, have, &values)
                }
                None => {
                    let mut values = image.manifest.appliance.seed_config.clone();
                    values.extend(want.config.clone());
                    config::check_before_instance(&image, &values)
                }
            }
            .map_err(|e| e.context(&context))?;
        }
        Ok(())
    }

    /// Loads rooms, before instances are recovered.
    pub(super) fn load_rooms(&self) -> Result<(), OpError> {
        let rooms = blocking(|| self.store.rooms())
            .map_err(|e| OpError::internal("failed to load rooms", e))?;
        let mut map = self.rooms.lock_unpoisoned();
        for room in rooms {
            map.insert(room.name.clone(), room);
        }
        Ok(())
    }

    /// After instances are recovered: a room a daemon died creating is
    /// removed (it was never acknowledged), one it died removing is removed.
    pub(super) async fn recover_rooms(self: &Arc<Self>) {
        let _op = self.room_op.lock().await;
        for room in self.list_rooms() {
            if room.state != RoomState::Ready {
                tracing::warn!(room = %room.name, state = %room.state, "finishing an interrupted room change: removing it");
                if let Err(e) = self.tear_down_room(&room).await {
                    tracing::error!(room = %room.name, error = %e, "cannot remove an interrupted room");
                }
            }
        }
    }
}

/// Why a room cannot be made over an existing network of its names.
pub fn room_network_taken(room: &Name, network: &Name) -> String {
    format!(
        "cannot create room {room}: network {network} already exists, and a room makes its own lan and dmz (remove {network}, or name the room otherwise; `--subnet lan=CIDR` or `[networks]` in a room file chooses their subnets)"
    )
}

/// The firewall instance of room `room`.
pub(super) fn firewall_name(room: &Name) -> Name {
    Name::new(&format!("{room}-fw")).expect("invariant: room names leave room")
}

/// What `run` is asked for a room file's instance.
fn room_instance_spec(room: &Name, name: &Name, want: &RoomInstance) -> InstanceSpec {
    InstanceSpec {
        name: name.clone(),
        image: want.image.clone(),
        mem_mib: want.mem_mib,
        cpus: 1,
        nics: vec![NicSpec {
            network: want.segment.network(room),
            ip: None,
            role: None,
        }],
        accel: AccelChoice::Auto,
        config_volume_kib: None,
        ephemeral: false,
        volumes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use vroom_types::{ApplyRoomRequest, ErrorCode, Expose, Name, Protocol, RoomSpec, RoomState};

    use crate::store::StateStore;
    use crate::testing::TestEngine;

    fn spec(name: &str) -> RoomSpec {
        RoomSpec {
            name: Name::new(name).unwrap(),
            wan: None,
            networks: Default::default(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_rooms_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        t.engine.recover().await.unwrap();
        let err = t
            .engine
            .create_room(spec(&"a".repeat(29)))
            .await
            .unwrap_err();
        assert!(err.message.contains("28"), "{}", err.message);
        // The fake image source has no firewall image.
        let err = t.engine.create_room(spec("acme")).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound, "{}", err.message);
        assert!(t.engine.list_rooms().is_empty());
        assert!(t.store.rooms().unwrap().is_empty());
        assert!(t.engine.list_networks().is_empty(), "nothing made");
        let err = t
            .engine
            .expose(
                "acme",
                Expose {
                    port: 80,
                    proto: Protocol::Tcp,
                    to: Name::new("web").unwrap(),
                    to_port: 80,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound, "no such room");
    }

    /// A room firewall on fakes (every fake guest also has `hello`'s key).
    fn firewall(t: &TestEngine) {
        t.images.add(
            "firewall",
            &["wan", "lan", "dmz"],
            &[
                ("domain", ""),
                ("hosts", ""),
                ("forward", ""),
                ("greeting", "hello"),
            ],
        );
    }

    fn room_file(toml_like: serde_json::Value) -> ApplyRoomRequest {
        ApplyRoomRequest {
            room: serde_json::from_value(toml_like).unwrap(),
            dry_run: false,
        }
    }

    /// Each file is refused, dry run or not, with a message starting with
    /// its text, and nothing is made: no room, network, instance or service.
    async fn refused_with_nothing_made(t: &TestEngine, bad: &[(serde_json::Value, &str)]) {
        for (file, want) in bad {
            for dry_run in [true, false] {
                let mut req = room_file(file.clone());
                req.dry_run = dry_run;
                let err = t.engine.apply_room(req).await.unwrap_err();
                assert!(
                    err.message.starts_with(want),
                    "{file} (dry run {dry_run}): {}",
                    err.message
                );
                assert!(t.engine.list_rooms().is_empty(), "{file}");
                assert!(t.engine.list_networks().is_empty(), "{file}: nothing made");
                assert!(t.engine.list().is_empty(), "{file}: nothing made");
                assert!(t.engine.services().await.unwrap().is_empty(), "{file}");
            }
        }
    }

    /// A room file is checked whole before anything is made, as `run` and
    /// `config set` would check its instances; a dry run refuses the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn room_files_are_checked_whole_before_anything_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        t.engine.recover().await.unwrap();
        firewall(&t);
        let bad = [
            (
                json!({"name": "acme", "instances": {"web": {"image": "hello", "segment": "lan", "mem_mib": 0}}}),
                "instance web: memory 0 MiB",
            ),
            (
                json!({"name": "acme", "instances": {"web": {"image": "hello", "segment": "lan", "mem_mib": 32}}}),
                "instance web: memory 32 MiB",
            ),
            (
                json!({"name": "acme", "instances": {"web": {"image": "hello", "segment": "dmz", "config": {"colour": "red"}}}}),
                "instance web: unknown config key \"colour\"",
            ),
            (
                json!({"name": "acme", "instances": {"web": {"image": "nope", "segment": "lan"}}}),
                "instance web: ",
            ),
            (
                json!({"name": "acme", "instances": {"acme-fw": {"image": "hello", "segment": "lan"}}}),
                "instance acme-fw: the name is the room's firewall's",
            ),
            (
                json!({"name": "acme", "firewall": {"colour": "red"}}),
                "firewall acme-fw: unknown config key",
            ),
        ];
        refused_with_nothing_made(&t, &bad).await;
        // The same file with its mistake fixed plans and applies.
        let good = json!({"name": "acme", "instances": {"web": {"image": "hello", "segment": "lan", "config": {"greeting": "hi"}}}});
        let mut dry = room_file(good.clone());
        dry.dry_run = true;
        assert!(!t.engine.apply_room(dry).await.unwrap().applied);
        assert!(t.engine.apply_room(room_file(good)).await.unwrap().applied);
        assert_eq!(t.engine.get("web").unwrap().config["greeting"], "hi");
        // A change to an existing member is checked against what it runs.
        let mut changed = room_file(
            json!({"name": "acme", "instances": {"web": {"image": "hello", "segment": "lan", "config": {"colour": "red"}}}}),
        );
        changed.dry_run = true;
        let err = t.engine.apply_room(changed).await.unwrap_err();
        assert!(
            err.message.starts_with("instance web: unknown config key"),
            "{}",
            err.message
        );
    }

    /// Subnets chosen in a room file are its networks'; a pre-made network
    /// of a room's names, a taken or overlapping subnet, and a change of
    /// subnet are refused before anything is made, dry run or not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn room_subnets_are_chosen_and_checked_first() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        t.engine.recover().await.unwrap();
        firewall(&t);
        let taken = t
            .engine
            .create_network(vroom_types::NetworkSpec {
                subnet: Some("10.77.0.0/24".parse().unwrap()),
                ..vroom_types::NetworkSpec::plain(Name::new("other").unwrap())
            })
            .await
            .unwrap();
        let bad = [
            (
                json!({"name": "acme", "networks": {"lan": "10.77.0.0/24"}}),
                "room acme's lan: subnet 10.77.0.0/24 overlaps network other",
            ),
            (
                json!({"name": "acme", "networks": {"lan": "10.78.0.0/24", "dmz": "10.78.0.0/25"}}),
                "the dmz subnet 10.78.0.0/25 of room acme overlaps its lan subnet",
            ),
            (
                json!({"name": "acme", "wan": "other", "networks": {"wan": "10.79.0.0/24"}}),
                "the wan of room acme is network other, whose subnet is 10.77.0.0/24",
            ),
            (
                json!({"name": "acme", "networks": {"lan": "205.255.127.240/28"}}),
                "the lan subnet 205.255.127.240/28 of room acme is too small",
            ),
            (
                json!({"name": "other-x", "wan": "nowhere"}),
                "no network named \"nowhere\"",
            ),
        ];
        for (file, want) in bad {
            for dry_run in [true, false] {
                let mut req = room_file(file.clone());
                req.dry_run = dry_run;
                let err = t.engine.apply_room(req).await.unwrap_err();
                assert!(err.message.starts_with(want), "{file}: {}", err.message);
                assert!(t.engine.list_rooms().is_empty(), "{file}");
                assert_eq!(t.engine.list_networks(), vec![taken.clone()], "{file}");
            }
        }
        // A pre-made network of the room's names: refused, with the way out.
        let premade = t
            .engine
            .create_network(vroom_types::NetworkSpec::plain(
                Name::new("pre-lan").unwrap(),
            ))
            .await
            .unwrap();
        let mut req = room_file(json!({"name": "pre"}));
        req.dry_run = true;
        let err = t.engine.apply_room(req).await.unwrap_err();
        assert!(
            err.message.contains("network pre-lan already exists"),
            "{}",
            err.message
        );
        assert!(err.message.contains("[networks]"), "{}", err.message);
        t.engine
            .remove_network(premade.name.as_str())
            .await
            .unwrap();

        let file =
            json!({"name": "acme", "networks": {"lan": "10.78.1.0/24", "dmz": "10.78.2.0/24"}});
        let mut dry = room_file(file.clone());
        dry.dry_run = true;
        let plan = t.engine.apply_room(dry).await.unwrap();
        assert!(
            plan.changes[0].detail.contains("lan 10.78.1.0/24"),
            "{plan:?}"
        );
        t.engine.apply_room(room_file(file)).await.unwrap();
        let lan = t.engine.network("acme-lan").unwrap();
        assert_eq!(lan.subnet.to_string(), "10.78.1.0/24");
        assert_eq!(
            t.engine.network("acme-dmz").unwrap().subnet.to_string(),
            "10.78.2.0/24"
        );
        let err = t
            .engine
            .apply_room(room_file(
                json!({"name": "acme", "networks": {"lan": "10.78.3.0/24"}}),
            ))
            .await
            .unwrap_err();
        assert!(
            err.message.contains("subnets cannot change"),
            "{}",
            err.message
        );
        assert_eq!(t.engine.network("acme-lan").unwrap(), lan);
    }

    /// A member removed takes its exposes out of the room's record, as its
    /// forward goes out of the firewall's config.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removed_member_takes_its_exposes_along() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        t.engine.recover().await.unwrap();
        firewall(&t);
        let file = json!({"name": "acme",
            "instances": {"web": {"image": "hello", "segment": "dmz"}, "db": {"image": "hello", "segment": "lan"}},
            "expose": [{"port": 8080, "to": "web", "to_port": 80}, {"port": 5432, "to": "db", "to_port": 5432}]});
        t.engine.apply_room(room_file(file)).await.unwrap();
        assert_eq!(t.engine.get_room("acme").unwrap().exposes.len(), 2);
        t.engine.remove("web", true).await.unwrap();
        let room = t.engine.get_room("acme").unwrap();
        let to: Vec<&str> = room.exposes.iter().map(|e| e.to.as_str()).collect();
        assert_eq!(to, ["db"]);
        assert_eq!(t.store.rooms().unwrap()[0].exposes, room.exposes, "saved");
        let forward = &t.engine.get("acme-fw").unwrap().config["forward"];
        assert!(
            forward.starts_with("tcp/5432:") && !forward.contains("8080"),
            "{forward}"
        );
    }

    /// A room firewall and the balancer and second image services need.
    fn service_images(t: &TestEngine) {
        firewall(t);
        t.images.add(
            "lb",
            &["lan"],
            &[("backends", ""), ("port", "80"), ("slo_ms", "0")],
        );
        t.images.add("hello2", &["lan"], &[]);
    }

    fn changes(plan: &vroom_types::RoomPlan) -> Vec<String> {
        plan.changes
            .iter()
            .map(|c| format!("{}{} {}", c.op.sign(), c.what, c.detail))
            .collect()
    }

    /// `[[services]]` in a room file: bad entries are refused naming the
    /// field with nothing made; a service is created in the room (its name
    /// in the room's DNS at its balancer's address, exposable), scaled,
    /// updated and removed as the file changes, without touching the
    /// room's instances; the room goes with its services.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn room_files_create_scale_update_and_remove_services() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        t.engine.recover().await.unwrap();
        service_images(&t);
        // Members boot: the fakes' warm snapshots would add instances to
        // the lists this test counts.
        let with = |mut services: serde_json::Value| {
            for entry in services.as_array_mut().unwrap() {
                entry["cold"] = json!(true);
            }
            let mut file = json!({"name": "acme",
                "instances": {"web": {"image": "hello", "segment": "lan"}},
                "services": services});
            if file["services"][0]["name"] == "shop" {
                file["expose"] = json!([{"port": 8080, "to": "shop", "to_port": 80}]);
            }
            file
        };
        let bad = [
            (
                with(json!([{"name": "shop", "image": "hello", "replicas": 0}])),
                "service shop: replicas must be 1 to 64",
            ),
            (
                with(
                    json!([{"name": "shop", "image": "hello", "replicas": "3..2", "slo": "p95<50ms"}]),
                ),
                "service shop: replicas 3..2: the minimum is above the maximum",
            ),
            (
                with(json!([{"name": "shop", "image": "hello", "replicas": "1..3"}])),
                "service shop: replicas 1..3 need a target",
            ),
            (
                with(
                    json!([{"name": "shop", "image": "hello", "replicas": "1..3", "slo": "fast"}]),
                ),
                "service shop: slo: bad target",
            ),
            (
                with(json!([{"name": "shop", "image": "nope"}])),
                "service shop: ",
            ),
            (
                with(json!([{"name": "web", "image": "hello"}])),
                "service web: instance web of the file has its name",
            ),
            (
                with(json!([{"name": "we", "image": "hello"}, {"name": "we", "image": "hello"}])),
                "service we: its name is taken by service we",
            ),
            (
                with(
                    json!([{"name": "shop", "image": "hello"}, {"name": "shop-lb", "image": "hello"}]),
                ),
                "service shop-lb: its name is taken by service shop",
            ),
            (
                with(json!([{"name": "acme-fw", "image": "hello"}])),
                "service acme-fw: the name is the room's firewall's",
            ),
            (
                json!({"name": "acme", "services": [{"name": "cart", "image": "hello"}],
                    "expose": [{"port": 8080, "to": "shop", "to_port": 80}]}),
                "expose tcp/8080 goes to shop, which is not an instance or service",
            ),
        ];
        refused_with_nothing_made(&t, &bad).await;

        let file = |services: serde_json::Value| {
            let mut req = room_file(with(services));
            req.dry_run = false;
            req
        };
        let dry = |services: serde_json::Value| {
            let mut req = room_file(with(services));
            req.dry_run = true;
            req
        };
        let plan = t
            .engine
            .apply_room(dry(
                json!([{"name": "shop", "image": "hello", "replicas": 2}]),
            ))
            .await
            .unwrap();
        assert!(
            changes(&plan).contains(&"+service shop hello x2 on :80".to_string()),
            "{plan:?}"
        );
        assert!(
            t.engine.services().await.unwrap().is_empty(),
            "a dry run makes nothing"
        );
        t.engine
            .apply_room(file(
                json!([{"name": "shop", "image": "hello", "replicas": 2}]),
            ))
            .await
            .unwrap();
        let shop = t.engine.service("shop").await.unwrap();
        assert!(
            shop.converged(),
            "an apply returns once it serves: {shop:?}"
        );
        assert_eq!(shop.spec.room.as_ref().map(|r| r.as_str()), Some("acme"));
        let lb = shop.address.unwrap();
        let fw = t.engine.get("acme-fw").unwrap();
        assert!(
            fw.config["hosts"]
                .split(',')
                .any(|h| h == format!("shop={lb}")),
            "{}",
            fw.config["hosts"]
        );
        assert!(
            fw.config["hosts"].contains(&format!("shop.acme.lan={lb}")),
            "{}",
            fw.config["hosts"]
        );
        assert_eq!(fw.config["forward"], format!("tcp/8080:{lb}:80"));
        let web_pid = t.engine.get("web").unwrap().status.pid;

        let again = t
            .engine
            .apply_room(file(
                json!([{"name": "shop", "image": "hello", "replicas": 2}]),
            ))
            .await
            .unwrap();
        assert!(again.changes.is_empty(), "{again:?}");

        let plan = t
            .engine
            .apply_room(file(
                json!([{"name": "shop", "image": "hello", "replicas": 3}]),
            ))
            .await
            .unwrap();
        assert_eq!(changes(&plan), ["~service shop replicas 2 -> 3"]);
        let shop = t.engine.service("shop").await.unwrap();
        assert!(shop.converged() && shop.ready == 3, "{shop:?}");

        let plan = t
            .engine
            .apply_room(file(
                json!([{"name": "shop", "image": "hello2", "replicas": "2..4", "slo": "p95<50ms"}]),
            ))
            .await
            .unwrap();
        assert_eq!(
            changes(&plan),
            ["~service shop image hello -> hello2 (rolling update), replicas 3 -> 2..4 on p95<50ms"]
        );
        let shop = t.engine.service("shop").await.unwrap();
        assert!(shop.converged(), "{shop:?}");
        assert!(shop.members.iter().all(|m| m.image == "hello2"), "{shop:?}");
        assert_eq!(
            (shop.spec.bounds(), shop.spec.scale_on),
            ((2, 4), Some(vroom_types::ScaleTarget::P95Ms(50)))
        );
        assert_eq!(
            t.engine.get("web").unwrap().status.pid,
            web_pid,
            "untouched"
        );

        // A service outside the room keeps its name.
        let err = t
            .engine
            .apply_room(dry(json!([{"name": "shop", "image": "hello2", "replicas": "2..4", "slo": "p95<50ms"}, {"name": "cart", "image": "hello", "port": 0}])))
            .await
            .unwrap_err();
        assert!(
            err.message.starts_with("service cart: port"),
            "{}",
            err.message
        );

        let mut gone = room_file(json!({"name": "acme",
            "instances": {"web": {"image": "hello", "segment": "lan"}}}));
        gone.dry_run = false;
        let plan = t.engine.apply_room(gone).await.unwrap();
        assert_eq!(
            changes(&plan),
            ["-service shop ", "-expose tcp/8080 -> shop:80"]
        );
        assert!(t.engine.services().await.unwrap().is_empty());
        let names: Vec<String> = t
            .engine
            .list()
            .iter()
            .map(|i| i.spec.name.to_string())
            .collect();
        assert_eq!(names.len(), 2, "web and the firewall: {names:?}");
        assert!(!t.engine.get("acme-fw").unwrap().config["hosts"].contains("shop"));

        // The room goes with its services.
        t.engine
            .apply_room(file(json!([{"name": "shop", "image": "hello"}])))
            .await
            .unwrap();
        assert_eq!(t.engine.services().await.unwrap().len(), 1);
        t.engine.remove_room("acme", true).await.unwrap();
        assert!(t.engine.services().await.unwrap().is_empty());
        assert!(t.engine.list().is_empty(), "{:?}", t.engine.list());
    }

    /// A room a daemon died creating or removing is removed by the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery_removes_half_made_rooms() {
        for state in [RoomState::Creating, RoomState::Removing] {
            let dir = tempfile::tempdir().unwrap();
            let t = TestEngine::new(dir.path());
            t.engine.recover().await.unwrap();
            let lan = t
                .engine
                .create_network(vroom_types::NetworkSpec {
                    name: Name::new("acme-lan").unwrap(),
                    subnet: None,
                    nat: false,
                    isolated: true,
                    mirror: false,
                    allow_host: vec![],
                })
                .await
                .unwrap();
            let room = vroom_types::Room {
                name: Name::new("acme").unwrap(),
                wan: Name::new("default").unwrap(),
                lan: lan.name.clone(),
                dmz: Name::new("acme-dmz").unwrap(),
                firewall: Name::new("acme-fw").unwrap(),
                domain: "acme.lan".into(),
                exposes: vec![],
                state,
                created_at: 0,
            };
            t.store.put_room(&room).unwrap();
            let engine = t.restarted();
            engine.recover().await.unwrap();
            assert!(engine.list_rooms().is_empty(), "{state}");
            assert!(t.store.rooms().unwrap().is_empty(), "{state}");
            assert!(engine.network("acme-lan").is_err(), "{state}: its lan went");
        }
    }
}
