//! Instances: create with rollback, start, stop, restart and remove.

use vroom_base::LockExt;

use super::markers::{clear_marker, set_marker, RESTORE_MARKER};
use super::records::{instance_file, new_instance};
use super::*;

/// An instance [`Engine::create`] made, not launched yet, its op lock held.
pub(super) struct Created {
    pub(super) cell: Arc<Cell>,
    pub(super) image: BootImage,
    /// Held until the instance runs, or is removed again.
    pub(super) op: tokio::sync::OwnedMutexGuard<()>,
    /// Its networks, whose rooms learn of it once it runs.
    pub(super) networks: Vec<Name>,
    /// The default network, when this creation made it.
    created_default: Option<Network>,
    volume_kib: u32,
    /// The data volumes this creation made (an image's declared ones).
    made_volumes: Vec<Name>,
    /// Whether it starts from a warm snapshot of its image.
    warm: bool,
    /// The saved state it starts from: a clone's snapshot or a warm one.
    state_source: Option<snapshots::StateSource>,
}

/// How [`Engine::start_vmm`] starts a VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Launch {
    /// It boots the guest.
    Boot,
    /// It waits for the guest's state: a saved one or a live migration's
    /// stream. `clone`: the state is another instance's, whose MACs and
    /// addresses the guest holds until it takes on this one's identity.
    Incoming { clone: bool },
}

/// A VMM [`Engine::start_vmm`] started, not yet the instance's on record.
pub(super) struct Vmm {
    pub(super) process: VmProcess,
    /// The instance as it was launched.
    pub(super) instance: Instance,
    /// The instance's state before the launch, for [`Engine::unlaunch`].
    pub(super) previous: InstanceState,
    ready_timeout: Duration,
    /// When the VMM was up.
    launched: Instant,
    /// Its taps are not wired yet: it starts from a clone's state.
    clone: bool,
}

impl Engine {
    pub fn list(&self) -> Vec<Instance> {
        self.cells().iter().map(|c| c.snapshot()).collect()
    }

    pub fn get(&self, name: &str) -> Result<Instance, OpError> {
        Ok(self.cell(name)?.snapshot())
    }

    /// One instance with what its guest says of itself when it runs: its
    /// health check, services down, its connection tracking table.
    pub async fn inspect(&self, name: &str) -> Result<Instance, OpError> {
        let cell = self.cell(name)?;
        let mut instance = cell.snapshot();
        if instance.status.state == InstanceState::Running {
            if let Ok(report) = cell.agent.health(INSPECT_HEALTH_TIMEOUT).await {
                instance.health = Some(guest_health(&instance, &report));
            }
        }
        Ok(instance)
    }

    /// Instance `name` once it is neither starting nor restarting, or as
    /// it is when `timeout` runs out: a client waiting for ready hears of
    /// it when the guest reports it, without polling, and without the
    /// guest round trip of [`Engine::inspect`] (its `health` is left out).
    pub async fn wait_settled(&self, name: &str, timeout: Duration) -> Result<Instance, OpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribed before the first look: a change after it is an event.
        let mut changes = self.events.subscribe();
        loop {
            let instance = self.get(name)?;
            let now = tokio::time::Instant::now();
            if !instance.status.state.is_coming_up() || now >= deadline {
                return Ok(instance);
            }
            // A change of state is an event about the instance; a second's
            // look again covers one that is not.
            let look_again = deadline.min(now + SETTLED_LOOK_AGAIN);
            loop {
                match tokio::time::timeout_at(look_again, changes.recv()).await {
                    Ok(Ok(event))
                        if event.kind != vroom_types::EventKind::Instance || event.name != name =>
                    {
                        continue
                    }
                    // Its event, a lag, a closed log or time: look again.
                    _ => break,
                }
            }
        }
    }

    /// The instances the cluster layer created here.
    pub fn cluster_instances(&self) -> Vec<String> {
        self.cells()
            .iter()
            .filter(|c| c.lock().cluster)
            .map(|c| c.lock().instance.spec.name.to_string())
            .collect()
    }

    /// Creates an instance and launches it. Returns once the VMM runs; the
    /// guest becomes ready later (`status.state` turns `running`). Any failure
    /// before that removes everything this call created.
    pub async fn run(self: &Arc<Self>, req: RunRequest) -> Result<Instance, OpError> {
        self.run_as(req, None).await
    }

    /// [`Engine::run`] with a given identity: the cluster recreates an
    /// instance on another node with its own id and replicated config.
    pub async fn run_as(
        self: &Arc<Self>,
        req: RunRequest,
        identity: Option<crate::cluster::Identity>,
    ) -> Result<Instance, OpError> {
        let created = self.create(req, identity, false).await?;
        let cell = created.cell.clone();
        let image = created.image.clone();
        let warm_start = created.warm;
        let mut launched = self
            .launch_from(&cell, Some(image.clone()), created.state_source.clone())
            .await;
        if let (Err(e), true) = (&launched, warm_start) {
            // A warm snapshot that does not load must not cost the run: boot.
            tracing::warn!(instance = %cell.snapshot().spec.name, error = %e.message, "the warm start failed; booting instead");
            let identity = instance_file(&cell.snapshot(), &image);
            let config = cell.snapshot().config;
            let volume_kib = created.volume_kib;
            let recreated = blocking(|| {
                let _ = std::fs::remove_file(cell.volume());
                vroom_volume::create(&cell.volume(), volume_kib, &identity, &config)
            });
            launched = match recreated {
                Ok(()) => self.launch(&cell, Some(image)).await,
                Err(e) => Err(OpError::internal("failed to create the config volume", e)),
            };
        }
        self.complete(created, launched).await
    }

    /// Ends [`Engine::create`] with its launch's outcome: a failed launch
    /// undoes the creation; otherwise the op lock goes and the rooms of
    /// the instance's networks learn of it.
    pub(super) async fn complete(
        &self,
        created: Created,
        launched: Result<(), OpError>,
    ) -> Result<Instance, OpError> {
        if let Err(e) = launched {
            self.uncreate(&created).await;
            return Err(e);
        }
        let Created {
            cell, op, networks, ..
        } = created;
        drop(op);
        self.sync_rooms_on(&networks).await;
        Ok(cell.snapshot())
    }

    /// Creates instance `req` (its record, run dir and config volume) and
    /// takes its op lock, for [`Engine::run_as`] or, `arriving`, for the
    /// destination of a live migration (whose state is the stream: never a
    /// warm one). Any failure removes everything this call created.
    pub(super) async fn create(
        self: &Arc<Self>,
        req: RunRequest,
        identity: Option<crate::cluster::Identity>,
        arriving: bool,
    ) -> Result<Created, OpError> {
        let mut spec = req.spec;
        let ready_timeout_secs = req
            .ready_timeout_secs
            .unwrap_or(DEFAULT_READY_TIMEOUT_SECS)
            .max(1);
        let alloc = self.alloc.lock().await;
        if self.cell(spec.name.as_str()).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("an instance named {:?} already exists", spec.name.as_str()),
            ));
        }
        let clone_of = match &req.from_snapshot {
            Some(name) => Some(self.clone_source(name.as_str())?),
            None => None,
        };
        let image = match &clone_of {
            Some((snapshot, _)) => {
                let saved = &snapshot.instance;
                if spec.mem_mib.is_some_and(|m| m != saved.mem_mib) {
                    return Err(OpError::conflict(format!(
                        "a clone of snapshot {} has its {} MiB of memory",
                        snapshot.name, saved.mem_mib
                    )));
                }
                spec.mem_mib = Some(saved.mem_mib);
                spec.cpus = saved.spec.cpus;
                spec.image = saved.image_name.clone();
                if spec.nics.is_empty() {
                    spec.nics = saved
                        .nics
                        .iter()
                        .map(|n| NicSpec {
                            network: n.network.clone(),
                            ip: None,
                            role: n.role.as_deref().and_then(|r| Name::new(r).ok()),
                        })
                        .collect();
                }
                if spec.nics.len() != saved.nics.len() {
                    return Err(OpError::conflict(format!(
                        "snapshot {} has {} NICs, {} were given",
                        snapshot.name,
                        saved.nics.len(),
                        spec.nics.len()
                    )));
                }
                self.resolve_image(snapshot.image_id()).await.map_err(|e| {
                    if e.code == ErrorCode::NotFound {
                        OpError::conflict(format!(
                            "snapshot {}'s image {} ({}) is gone",
                            snapshot.name,
                            saved.image_name,
                            &saved.image_id[..12.min(saved.image_id.len())]
                        ))
                    } else {
                        e
                    }
                })?
            }
            None => self.resolve_image(&spec.image).await?,
        };
        if clone_of.is_some() && !req.env.is_empty() {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                "a clone has its snapshot's config; set its env with `vroom config` afterwards",
            ));
        }
        let env_config = config::run_env_config(&image, &req.env)?;
        let mem_mib = self.check_resources(&spec, &image)?;
        let accel = self
            .driver
            .resolve_accel(spec.accel)
            .map_err(|e| OpError::wrap(ErrorCode::HostUnsupported, "cannot run here", e))?;
        let volume_kib = spec
            .config_volume_kib
            .unwrap_or(vroom_volume::DEFAULT_SIZE_KIB);
        let (volumes, made_volumes) = if arriving {
            (spec.volumes.clone(), vec![])
        } else if let Some((snapshot, dir)) = &clone_of {
            if !spec.volumes.is_empty() {
                return Err(OpError::conflict(
                    "a clone has copies of its snapshot's volumes; it takes no others",
                ));
            }
            // Its memory has them mounted: each gets its own copy.
            self.clone_snapshot_volumes(&spec.name, snapshot, dir, &image)?
        } else {
            self.attach_volumes(&spec, &image)?
        };
        if identity.as_ref().is_some_and(|i| i.cluster) {
            // Failed over, it would come up elsewhere with empty volumes:
            // only a volume kept on two nodes follows its instance.
            if let Some(local) = self.local_volume_of(&volumes) {
                self.remove_made_volumes(&made_volumes);
                return Err(OpError::new(
                    ErrorCode::HostUnsupported,
                    format!("{VOLUMES_STAY_LOCAL} (volume {local} has one copy)"),
                ));
            }
        }
        spec.volumes = volumes;

        let nic_specs = if spec.nics.is_empty() {
            vec![NicSpec {
                network: Name::new(DEFAULT_NETWORK).expect("invariant: valid name"),
                ip: None,
                role: None,
            }]
        } else {
            spec.nics.clone()
        };
        let mut created_default = None;
        if nic_specs
            .iter()
            .any(|n| n.network.as_str() == DEFAULT_NETWORK)
            && self.network(DEFAULT_NETWORK).is_err()
        {
            let default = NetworkSpec {
                name: Name::new(DEFAULT_NETWORK).expect("invariant: valid name"),
                subnet: None,
                nat: true,
                isolated: false,
                mirror: false,
                allow_host: vec![],
            };
            created_default = Some(self.create_network_locked(default).await?);
        }

        let cluster = identity.as_ref().is_some_and(|i| i.cluster);
        let (id, given_config) = match identity {
            Some(identity) => (identity.id, identity.config),
            None => (random_id(), None),
        };
        let roles = &image.manifest.appliance.nic_roles;
        let nics = match self.allocate_nics(&id, &nic_specs, roles) {
            Ok(nics) => nics,
            Err(e) => {
                self.remove_made_volumes(&made_volumes);
                self.drop_default(created_default.as_ref()).await;
                return Err(e);
            }
        };
        let mut instance = new_instance(&id, spec.clone(), &image, mem_mib, accel, nics);
        if let Some((snapshot, _)) = &clone_of {
            instance.config = snapshot.config().clone();
        }
        if let Some(config) = env_config {
            instance.config = config;
        }
        if let Some(config) = given_config {
            instance.config = config;
        }
        // A warm snapshot's guest has no data volumes mounted.
        let warm = match (&clone_of, req.cold || arriving || !spec.volumes.is_empty()) {
            (None, false) => self.warm_for(&image, &vroom_types::VmShape::of(&instance), accel),
            _ => None,
        };
        // A clone's or a warm start's volume is the snapshot's (the guest's
        // memory holds it mounted) with this instance's identity written in.
        let state_source = clone_of
            .as_ref()
            .map(|(snapshot, dir)| (snapshot, dir, format!("snapshot {}", snapshot.name)))
            .or_else(|| {
                warm.as_ref()
                    .map(|(snapshot, dir)| (snapshot, dir, format!("warm {}", image.manifest.name)))
            })
            .map(|(snapshot, dir, label)| snapshots::StateSource {
                memory: dir.join(snapshots::MEMORY),
                expected: snapshot.memory.clone(),
                reload_volume: true,
                label,
            });
        let state_volume = clone_of
            .as_ref()
            .map(|(s, d)| (s, d))
            .or(warm.as_ref().map(|(s, d)| (s, d)));
        let dir = self.instances_dir().join(&id);
        let record = InstanceRecord {
            instance: instance.clone(),
            process: None,
            ready_timeout_secs,
            ever_ready: false,
            seed_config: spec.ephemeral.then(|| instance.config.clone()),
            cluster,
            removing: false,
            wipe: false,
            cloning_from: clone_of.as_ref().map(|(s, _)| s.name.to_string()),
        };
        let prepared = blocking(|| {
            std::fs::create_dir_all(&dir)
                .map_err(|e| OpError::internal(format!("failed to create {}", dir.display()), e))?;
            let identity = instance_file(&instance, &image);
            if let Some((snapshot, snapshot_dir)) = state_volume {
                let volume = dir.join("config.img");
                let copied = snapshots::copy_hashed(&snapshot_dir.join(snapshots::VOLUME), &volume)
                    .map_err(|e| {
                        OpError::internal("failed to copy the snapshot's config volume", e)
                    })?;
                if copied != snapshot.volume {
                    return Err(OpError::new(
                        ErrorCode::Conflict,
                        format!(
                            "snapshot {} is corrupt: its config volume does not match its sha256",
                            snapshot.name
                        ),
                    ));
                }
                vroom_volume::write_instance(&volume, &identity)
                    .and_then(|()| vroom_volume::write_config(&volume, &instance.config))
                    .map_err(|e| OpError::internal("failed to write the identity", e))?;
                return self.persist(&record);
            }
            vroom_volume::create(
                &dir.join("config.img"),
                volume_kib,
                &identity,
                &instance.config,
            )
            .map_err(|e| match e {
                vroom_volume::VolumeError::NoSpace { .. } => OpError::wrap(
                    ErrorCode::ResourceExhausted,
                    "failed to create the config volume",
                    e,
                ),
                vroom_volume::VolumeError::Size { .. } => {
                    OpError::new(ErrorCode::InvalidArgument, e.to_string())
                }
                e => OpError::internal("failed to create the config volume", e),
            })?;
            self.persist(&record)
        });
        if let Err(e) = prepared {
            let _ = std::fs::remove_dir_all(&dir);
            self.remove_made_volumes(&made_volumes);
            self.drop_default(created_default.as_ref()).await;
            return Err(e);
        }
        let cell = Cell::new(dir.clone(), record);
        self.instances
            .lock_unpoisoned()
            .insert(spec.name.clone(), cell.clone());
        drop(alloc);
        let made = cell.snapshot();
        let event = self
            .instance_event(&made, "created")
            .detail("image", made.image_name.clone())
            .detail("image_id", made.image_id.clone());
        self.emit(match &clone_of {
            Some((snapshot, _)) => event.message(format!("a clone of snapshot {}", snapshot.name)),
            None => event,
        });

        let op = cell.op.clone().lock_owned().await;
        let networks: Vec<Name> = cell
            .snapshot()
            .nics
            .iter()
            .map(|n| n.network.clone())
            .collect();
        Ok(Created {
            cell,
            image,
            op,
            networks,
            created_default,
            volume_kib,
            made_volumes,
            warm: warm.is_some(),
            state_source,
        })
    }

    /// Undoes [`Engine::create`] once its VM is gone (the caller holds its
    /// op lock): the instance's record and run dir go, and the default
    /// network if the creation made it.
    pub(super) async fn uncreate(&self, created: &Created) {
        let instance = created.cell.snapshot();
        let name = instance.spec.name.clone();
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        let _ = self.store.delete_instance(name.as_str());
        self.emit(
            self.instance_event(&instance, "removed")
                .message("its creation did not complete"),
        );
        let _ = std::fs::remove_dir_all(&created.cell.dir);
        let _alloc = self.alloc.lock().await;
        self.remove_made_volumes(&created.made_volumes);
        self.drop_default(created.created_default.as_ref()).await;
    }

    /// Removes the default network a failed creation made (the caller holds
    /// the allocation lock).
    async fn drop_default(&self, created: Option<&Network>) {
        if let Some(net) = created {
            let _ = self.remove_network_locked(net.name.as_str()).await;
        }
    }

    pub(super) fn check_resources(
        &self,
        spec: &InstanceSpec,
        image: &BootImage,
    ) -> Result<u64, OpError> {
        let mem_mib = spec.mem_mib.unwrap_or(image.manifest.default_mem_mib);
        if mem_mib < MIN_MEM_MIB {
            return Err(InvalidInputError::MemTooSmall {
                mem_mib,
                min_mib: MIN_MEM_MIB,
            }
            .into());
        }
        let min_mib = image.manifest.min_mem_mib;
        if mem_mib < min_mib {
            let flavor = image.manifest.kernel.flavor;
            let hint = match flavor {
                vroom_types::KernelFlavor::Debian => {
                    "; built for vroom's kernel (`vroom image build --kernel vroom`) it needs less"
                }
                vroom_types::KernelFlavor::Vroom => "",
            };
            // Well formed, but this image on this kernel cannot boot in it:
            // 422 like memory beyond the host's.
            return Err(OpError::new(
                ErrorCode::HostUnsupported,
                format!(
                    "memory {mem_mib} MiB is below the {min_mib} MiB image {} needs on {flavor}'s kernel{hint}",
                    image.manifest.name
                ),
            ));
        }
        if mem_mib > self.cfg.host_mem_mib {
            return Err(InvalidInputError::MemTooLarge {
                mem_mib,
                host_mib: self.cfg.host_mem_mib,
            }
            .into());
        }
        let max = self.cfg.host_cpus.max(1);
        if spec.cpus == 0 || spec.cpus > max {
            return Err(InvalidInputError::Cpus {
                cpus: spec.cpus,
                max,
            }
            .into());
        }
        Ok(mem_mib)
    }

    /// Roles and addresses for the NICs. On an isolated network, a router's
    /// inside NIC (`lan` or `dmz` of an image that also has a `wan`) takes
    /// the gateway address unless another address is asked for; a router's
    /// `wan` may not be on an isolated network.
    pub(super) fn allocate_nics(
        &self,
        id: &str,
        specs: &[NicSpec],
        roles: &[String],
    ) -> Result<Vec<NicStatus>, OpError> {
        // A well-formed request that does not fit the image it names
        // conflicts with it (409), as a taken name does.
        let requested: Vec<Option<&str>> = specs
            .iter()
            .map(|s| s.role.as_ref().map(Name::as_str))
            .collect();
        let assigned = ipam::assign_roles(&requested, roles).map_err(|e| {
            let code = match e {
                ipam::AssignRolesError::Twice { .. } => ErrorCode::InvalidArgument,
                _ => ErrorCode::Conflict,
            };
            OpError::new(code, e.to_string())
        })?;
        let mut used: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        for instance in self.list() {
            for nic in instance.nics {
                if let Some(ip) = nic.ip {
                    used.entry(nic.network.to_string()).or_default().push(ip);
                }
            }
        }
        let mut nics = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            let network = self.network(spec.network.as_str())?;
            let taken = used.entry(network.name.to_string()).or_default();
            let role = assigned[index].as_deref();
            if role == Some("wan") && network.isolated && roles.iter().any(|r| r != "wan") {
                return Err(OpError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "the router's wan NIC cannot be on isolated network {}: nothing would route it out (use a NAT or host network)",
                        network.name
                    ),
                ));
            }
            if is_l2_role(role) {
                if let Some(ip) = spec.ip {
                    return Err(OpError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "NIC {} ({}) is an L2 port and takes no address, but {ip} was given",
                            index + 1,
                            role.unwrap_or_default()
                        ),
                    ));
                }
                nics.push(NicStatus {
                    network: network.name.clone(),
                    ip: None,
                    prefix_len: 0,
                    gateway: network.gateway,
                    mac: ipam::mac_address(id, index),
                    tap: ipam::tap_name(&self.cfg.iface_prefix, id, index),
                    role: assigned[index].clone(),
                });
                continue;
            }
            let ip = if ipam::takes_gateway(&network, roles, role, spec.ip) {
                if taken.contains(&network.gateway) {
                    return Err(OpError::conflict(format!(
                        "network {} already has its router at {}",
                        network.name, network.gateway
                    )));
                }
                Ok(network.gateway)
            } else {
                ipam::allocate_ip(network.subnet, taken, spec.ip)
            };
            let ip = ip.map_err(|e| {
                OpError::wrap(
                    ErrorCode::Conflict,
                    format!("cannot attach to network {}", network.name),
                    e,
                )
            })?;
            taken.push(ip);
            nics.push(NicStatus {
                network: network.name.clone(),
                ip: Some(ip),
                prefix_len: network.subnet.prefix_len(),
                gateway: network.gateway,
                mac: ipam::mac_address(id, index),
                tap: ipam::tap_name(&self.cfg.iface_prefix, id, index),
                role: assigned[index].clone(),
            });
        }
        Ok(nics)
    }

    /// What the driver needs to start an instance's VMM.
    pub(super) fn launch_spec(
        &self,
        cell: &Cell,
        instance: &Instance,
        image: &BootImage,
        accel: vroom_types::Accel,
        incoming: bool,
    ) -> Result<LaunchSpec, OpError> {
        Ok(LaunchSpec {
            instance_id: instance.id.clone(),
            name: instance.spec.name.to_string(),
            run_dir: cell.dir.clone(),
            kernel: image.kernel.clone(),
            initramfs: image.initramfs.clone(),
            cmdline: image.manifest.cmdline.clone(),
            acpi: image.manifest.kernel.flavor.acpi(),
            tcg_tb_mib: None,
            mem_mib: instance.mem_mib,
            cpus: instance.spec.cpus,
            accel,
            root_disk: image.rootfs.clone(),
            config_disk: cell.volume(),
            data_disks: self.data_disks(instance)?,
            nics: instance
                .nics
                .iter()
                .map(|n| LaunchNic {
                    tap: n.tap.clone(),
                    mac: n.mac.clone(),
                })
                .collect(),
            agent_socket: cell.dir.join("agent.sock"),
            console_socket: cell.console_socket(),
            incoming,
        })
    }

    /// Starts the VMM for a cell (caller holds its op lock) and spawns its monitor.
    pub(super) async fn launch(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        image: Option<BootImage>,
    ) -> Result<(), OpError> {
        self.launch_from(cell, image, None).await
    }

    /// Like [`Engine::launch`], from a saved state instead of a boot when
    /// `source` is given.
    pub(super) async fn launch_from(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        image: Option<BootImage>,
        source: Option<snapshots::StateSource>,
    ) -> Result<(), OpError> {
        let how = match &source {
            Some(source) => Launch::Incoming {
                clone: source.reload_volume,
            },
            None => Launch::Boot,
        };
        let vmm = self.start_vmm(cell, image, how).await?;
        if let Some(source) = &source {
            if let Err(e) = self.start_from_state(cell, &vmm.process, source).await {
                self.unlaunch(cell, vmm.previous);
                return Err(e);
            }
            if vmm.clone {
                if let Err(e) = self.wire_taps(&vmm.instance).await {
                    let _ = self.driver.kill(&vmm.process);
                    self.driver.wait_exit(&vmm.process).await;
                    self.unlaunch(cell, vmm.previous);
                    return Err(e);
                }
            }
        }
        let label = source.map(|s| s.label);
        self.finish_launch(cell, vmm, label, false).await
    }

    /// The first half of a launch: records the instance `starting`, then
    /// starts its VMM, booting or (`incoming`) waiting for its state, and
    /// wires its taps (a clone's only once it took on its own identity: the
    /// caller does). Any failure undoes the record's change.
    pub(super) async fn start_vmm(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        image: Option<BootImage>,
        how: Launch,
    ) -> Result<Vmm, OpError> {
        if let Some(cluster) = self.cluster() {
            let (name, cluster_made) = {
                let record = cell.lock();
                (record.instance.spec.name.to_string(), record.cluster)
            };
            cluster.may_launch(&name, cluster_made)?;
            let volumes: Vec<String> = cell
                .lock()
                .instance
                .spec
                .volumes
                .iter()
                .map(|a| a.volume.to_string())
                .collect();
            if !volumes.is_empty() {
                cluster.launching_with_volumes(&name, &volumes)?;
            }
        }
        let (instance, ready_timeout, seed) = {
            let r = cell.lock();
            (
                r.instance.clone(),
                Duration::from_secs(r.ready_timeout_secs),
                r.seed_config.clone(),
            )
        };
        let image = match image {
            Some(image) => image,
            None => self.resolve_image(&instance.image_id).await?,
        };
        let accel = self
            .driver
            .resolve_accel(instance.spec.accel)
            .map_err(|e| OpError::wrap(ErrorCode::HostUnsupported, "cannot run here", e))?;
        if let (true, Launch::Boot, Some(seed)) = (instance.spec.ephemeral, how, seed) {
            // A clean slate: the volume as the instance was created.
            let kib = instance
                .spec
                .config_volume_kib
                .unwrap_or(vroom_volume::DEFAULT_SIZE_KIB);
            blocking(|| {
                let _ = std::fs::remove_file(cell.volume());
                vroom_volume::create(
                    &cell.volume(),
                    kib,
                    &instance_file(&instance, &image),
                    &seed,
                )
            })
            .map_err(|e| OpError::internal("failed to reset the ephemeral config volume", e))?;
            self.reset_volumes(&instance)?;
            self.config_went_back(cell, &seed, vroom_types::ConfigOrigin::Reset)
                .await?;
        }
        let incoming = how != Launch::Boot;
        let launch = self.launch_spec(cell, &instance, &image, accel, incoming)?;
        let epoch = blocking(|| cell.console.new_boot())
            .map_err(|e| OpError::internal("failed to rotate the console logs", e))?;
        let _ = std::fs::remove_file(cell.console_socket());
        // The intent goes on record before the VMM starts: a daemon killed
        // from here on finds the instance `starting` and, through its run
        // dir, the VMM if one came up.
        let previous = cell.lock().instance.status.state;
        self.update(cell, |r| {
            r.instance.status.state = InstanceState::Starting;
            r.process = None;
        })?;
        let restore = |engine: &Self| engine.unlaunch(cell, previous);
        if incoming {
            if let Err(e) = blocking(|| set_marker(&cell.dir, RESTORE_MARKER)) {
                restore(self);
                return Err(e);
            }
        }
        // Asked again right before the VMM starts: the work above (an image
        // build, a reset) may have outlasted this node's lease, and a VMM
        // started after it would run beside the new owner's.
        if let Some(cluster) = self.cluster() {
            let cluster_made = cell.lock().cluster;
            if let Err(e) = cluster.may_launch(instance.spec.name.as_str(), cluster_made) {
                restore(self);
                return Err(e);
            }
        }
        // The collector connects while the VMM starts, before the guest
        // writes its first line (a socket console drops output nobody reads).
        cell.collect_console(epoch, CONSOLE_CONNECT_WINDOW);
        let process = self.driver.launch(&launch).await.map_err(|e| {
            cell.stop_collecting_console();
            restore(self);
            let code = match e {
                crate::driver::LaunchVmError::VmmMissing { .. }
                | crate::driver::LaunchVmError::VmmUnsupported { .. }
                | crate::driver::LaunchVmError::KernelMissing { .. }
                | crate::driver::LaunchVmError::KvmUnavailable { .. } => ErrorCode::HostUnsupported,
                _ => ErrorCode::Internal,
            };
            OpError::wrap(
                code,
                format!("failed to start instance {}", instance.spec.name),
                e,
            )
        })?;
        // A clone's taps join its networks only once it has taken on its
        // own identity: until then it holds its source's MACs and addresses.
        let clone = how == Launch::Incoming { clone: true };
        if !clone {
            if let Err(e) = self.wire_taps(&instance).await {
                let _ = self.driver.kill(&process);
                self.driver.wait_exit(&process).await;
                restore(self);
                return Err(e);
            }
        }
        cell.agent.reset().await;
        Ok(Vmm {
            process,
            instance,
            previous,
            ready_timeout,
            launched: Instant::now(),
            clone,
        })
    }

    /// Undoes [`Engine::start_vmm`]'s change to the record once its VMM is
    /// gone (or never came): the restore marker goes and the instance is in
    /// the state it was in before.
    pub(super) fn unlaunch(&self, cell: &Cell, previous: InstanceState) {
        clear_marker(&cell.dir, RESTORE_MARKER);
        let _ = self.update(cell, |r| r.instance.status.state = previous);
    }

    /// The second half of a launch, once the VM runs: records the VMM as
    /// the instance's (`started_from` a saved state or a migration, if
    /// given) and watches it. A guest that migrated here `live` never
    /// stopped running: it is ready as it arrives.
    pub(super) async fn finish_launch(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        vmm: Vmm,
        started_from: Option<String>,
        live: bool,
    ) -> Result<(), OpError> {
        let Vmm {
            process,
            instance,
            ready_timeout,
            launched,
            ..
        } = vmm;
        clear_marker(&cell.dir, RESTORE_MARKER);
        let generation = cell.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let saved = self.update(cell, |r| {
            r.process = Some(process.clone());
            r.cloning_from = None;
            r.ever_ready |= live;
            r.instance.status = InstanceStatus {
                state: if live {
                    InstanceState::Running
                } else {
                    InstanceState::Starting
                },
                pid: Some(process.pid),
                accel: Some(process.accel),
                started_at: Some(now_secs()),
                boot_ms: None,
                boot_phases: None,
                restarts: r.instance.status.restarts,
                last_error: None,
                started_from: started_from.clone(),
                waiting: None,
            };
        });
        if let Err(e) = saved {
            let _ = self.driver.kill(&process);
            return Err(e);
        }
        self.spawn_monitor(
            cell.clone(),
            generation,
            process,
            (!live).then_some(launched + ready_timeout),
            launched,
        );
        self.refresh_mirrors_for(&instance.spec.name).await;
        Ok(())
    }

    /// Puts each tap where the wiring says: its network's bridge, a
    /// splice's segment, or (a bump in the wire not spliced, a capture sink
    /// fed by mirrors) no bridge.
    async fn wire_taps(&self, instance: &Instance) -> Result<(), OpError> {
        let wiring = self.current_wiring();
        for nic in &instance.nics {
            match wiring.get(&nic.tap).cloned().flatten() {
                Some(bridge) => self.net.attach_tap(&nic.tap, &bridge).await,
                None => self.net.move_tap(&nic.tap, None).await,
            }
            .map_err(|e| OpError::internal("failed to attach the NIC", e))?;
        }
        // A VM arriving behind splices made before it (it moved here): its
        // appliances' ports join the chain now that it exists.
        let name = &instance.spec.name;
        if self.list_splices().iter().any(|s| &s.vm == name) {
            self.rewire().await;
        }
        Ok(())
    }

    pub async fn action(
        self: &Arc<Self>,
        name: &str,
        action: InstanceAction,
    ) -> Result<Instance, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        self.still_registered(name, &cell)?;
        if cell.lock().removing {
            return Err(OpError::conflict(format!(
                "cannot {} {name}: it is being removed; `vroom rm -f {name}` finishes the removal",
                action_verb(action)
            )));
        }
        let state = cell.lock().instance.status.state;
        match lifecycle::plan_action(state, action) {
            ActionPlan::Refuse(reason) => {
                return Err(OpError::conflict(format!(
                    "cannot {} {name}: {reason}",
                    action_verb(action)
                )))
            }
            ActionPlan::Noop => return Ok(cell.snapshot()),
            ActionPlan::Proceed => {}
        }
        if matches!(action, InstanceAction::Stop | InstanceAction::Restart) {
            // A restart stays wanted throughout: a daemon killed inside it
            // finishes it instead of leaving the instance stopped.
            let desired = match action {
                InstanceAction::Restart => DesiredState::Running,
                _ => DesiredState::Stopped,
            };
            self.stop_locked(&cell, false, desired).await?;
        }
        if matches!(action, InstanceAction::Start | InstanceAction::Restart) {
            self.update(&cell, |r| r.instance.desired = DesiredState::Running)?;
            cell.crash_streak.store(0, Ordering::SeqCst);
            self.launch(&cell, None).await?;
        }
        Ok(cell.snapshot())
    }

    /// Graceful guest shutdown through the agent, ACPI power-down, then a kill.
    pub(super) async fn stop_locked(
        &self,
        cell: &Arc<Cell>,
        force: bool,
        desired: DesiredState,
    ) -> Result<(), OpError> {
        let process = {
            let r = cell.lock();
            r.process.clone()
        };
        self.update(cell, |r| {
            r.instance.desired = desired;
            if r.process.is_some() {
                r.instance.status.state = InstanceState::Stopping;
            }
        })?;
        if let Some(process) = process.filter(|p| self.driver.is_alive(p)) {
            let exited = |timeout| tokio::time::timeout(timeout, self.driver.wait_exit(&process));
            let mut done = false;
            if !force {
                let asked = cell.agent.shutdown(Duration::from_secs(2)).await.is_ok();
                if asked {
                    done = exited(self.cfg.stop_timeout).await.is_ok();
                }
                if !done {
                    let _ = self.driver.power_down(&process).await;
                    done = exited(Duration::from_secs(3)).await.is_ok();
                }
            }
            if !done {
                tracing::warn!(pid = process.pid, "killing the VM");
                self.driver
                    .kill(&process)
                    .map_err(|e| OpError::internal("failed to kill the VM", e))?;
                self.driver.wait_exit(&process).await;
            }
        }
        cell.generation.fetch_add(1, Ordering::SeqCst);
        cell.agent.reset().await;
        self.update(cell, |r| {
            r.process = None;
            r.instance.status.pid = None;
            r.instance.status.state = InstanceState::Stopped;
        })?;
        Ok(())
    }

    pub async fn remove(self: &Arc<Self>, name: &str, force: bool) -> Result<(), OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        if let Err(e) = self.still_registered(name, &cell) {
            // Queued behind another `rm` of the same instance, which removed
            // it meanwhile: what this call asked for is done.
            if cell.lock().removing {
                return Ok(());
            }
            return Err(e);
        }
        let (running, removing) = {
            let r = cell.lock();
            let running = r.process.as_ref().is_some_and(|p| self.driver.is_alive(p));
            (running, r.removing)
        };
        // An interrupted removal is finished whether or not `-f` is given.
        if running && !force && !removing {
            return Err(OpError::conflict(format!(
                "instance {name} is running; stop it first or use `rm -f`"
            )));
        }
        self.check_removable(name)?;
        // The intent goes on record before the VM is killed: a daemon killed
        // from here on finishes the removal instead of leaving the instance
        // stopped with its addresses and networks taken.
        self.update(&cell, |r| r.removing = true)?;
        self.stop_locked(&cell, true, DesiredState::Stopped).await?;
        // Under the op lock: an action queued behind this one must find
        // the instance gone, not launch it from a deleted directory.
        // An interrupted `rm --archive` is finished as it began: wiping.
        let wipe = cell.lock().wipe;
        let (networks, _) = self.forget(&cell, name, wipe).await?;
        drop(_op);
        self.sync_rooms_on(&networks).await;
        Ok(())
    }

    /// Why an instance may not be removed: it is spliced, or a room's firewall.
    pub(super) fn check_removable(&self, name: &str) -> Result<(), OpError> {
        if let Some(reason) = self.splice_blocking_removal(name) {
            return Err(OpError::conflict(format!("cannot remove {name}: {reason}")));
        }
        if let Some(room) = self
            .list_rooms()
            .into_iter()
            .find(|r| r.firewall.as_str() == name && r.state == vroom_types::RoomState::Ready)
        {
            return Err(OpError::conflict(format!(
                "cannot remove {name}: it is room {}'s firewall; `vroom room rm {}` removes the room",
                room.name, room.name
            )));
        }
        Ok(())
    }

    /// Drops a stopped instance (the caller holds its op lock): its mirrors,
    /// record and files. Returns its networks, whose rooms the caller syncs
    /// once the lock is released.
    ///
    /// With `wipe`, every file is zeroed and fsynced before it is unlinked
    /// (returned), and before the record goes: the record is marked
    /// `removing` and `wipe` by then, so a daemon killed while wiping
    /// finishes the wipe at its next start instead of unlinking the rest
    /// unwiped (and never runs a half-wiped instance). Without it the record
    /// goes first: an ownerless run dir is removed by the next daemon.
    pub(super) async fn forget(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        name: &str,
        wipe: bool,
    ) -> Result<(Vec<Name>, Vec<PathBuf>), OpError> {
        self.drop_mirrors_of(name).await;
        cell.stop_collecting_console();
        let wiped = if wipe {
            blocking(|| archive::wipe_dir(&cell.dir))?
        } else {
            vec![]
        };
        blocking(|| self.store.delete_instance(name))
            .map_err(|e| OpError::internal("failed to delete instance state", e))?;
        let event = self.instance_event(&cell.snapshot(), "removed");
        self.instances
            .lock_unpoisoned()
            .retain(|n, _| n.as_str() != name);
        self.emit(if wipe {
            event.detail("wiped", true)
        } else {
            event
        });
        blocking(|| std::fs::remove_dir_all(&cell.dir))
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| {
                OpError::internal(format!("failed to remove {}", cell.dir.display()), e)
            })?;
        let networks: Vec<Name> = cell
            .snapshot()
            .nics
            .iter()
            .map(|n| n.network.clone())
            .collect();
        Ok((networks, wiped))
    }

    /// Not found when a concurrent `remove` took (or a `run` replaced) the
    /// instance while the caller waited for its op lock: acting on the old
    /// cell would launch a VM from a deleted directory.
    pub(super) fn still_registered(&self, name: &str, cell: &Arc<Cell>) -> Result<(), OpError> {
        match self.cell(name) {
            Ok(current) if Arc::ptr_eq(&current, cell) => Ok(()),
            _ => Err(OpError::not_found("instance", name)),
        }
    }
}

fn action_verb(action: InstanceAction) -> &'static str {
    match action {
        InstanceAction::Start => "start",
        InstanceAction::Stop => "stop",
        InstanceAction::Restart => "restart",
    }
}

/// How long `inspect` waits for a guest's own report.
const INSPECT_HEALTH_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often [`Engine::wait_settled`] looks without an event.
const SETTLED_LOOK_AGAIN: Duration = Duration::from_secs(1);

fn guest_health(
    instance: &Instance,
    report: &vroom_agent_proto::HealthReport,
) -> vroom_types::GuestHealth {
    // Named as the host names them (a clone's guest mounted its volumes
    // under the snapshot's names), matched by mount path.
    let host_name = |path: &str, guest_name: &str| {
        instance
            .spec
            .volumes
            .iter()
            .find(|a| a.path == path)
            .map(|a| a.volume.to_string())
            .unwrap_or_else(|| guest_name.to_string())
    };
    vroom_types::GuestHealth {
        ready: report.ready,
        services_down: report
            .services
            .iter()
            .filter(|s| !s.running && s.last_exit != Some(0))
            .map(|s| s.name.clone())
            .collect(),
        conntrack: report.conntrack.map(|c| vroom_types::ConntrackTable {
            entries: c.entries,
            max: c.max,
            dropped: c.dropped,
        }),
        volumes: report
            .volumes
            .iter()
            .map(|v| {
                vroom_types::VolumeUsage::new(
                    host_name(&v.path, &v.name),
                    v.path.clone(),
                    v.total_bytes,
                    v.used_bytes,
                    v.available_bytes,
                    v.inodes_total,
                    v.inodes_available,
                )
            })
            .collect(),
    }
}
