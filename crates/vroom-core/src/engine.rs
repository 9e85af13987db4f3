//! The engine: owns instances and networks, drives their lifecycle through
//! the backend traits, persists every change before acknowledging it, and
//! supervises running VMs (readiness, unexpected exits, restarts).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use vroom_agent_proto::volume::{InstanceFile, NicConfig, VOLUME_VERSION};
use vroom_agent_proto::{from_hex, GuestReply, HostCommand, MAX_READ_CHUNK};
use vroom_types::{
    check_config, validate_config_key, validate_config_value, BuildReport, ConfigValues,
    DesiredState, ErrorCode, ExecRequest, ExecResult, ImageSummary, Instance, InstanceAction,
    InstanceSpec, InstanceState, InstanceStatus, InvalidInputError, Name, Network, NetworkSpec,
    NicSpec, NicStatus, RunRequest, MIN_MEM_MIB, MIRROR_ROLE,
};

use crate::agent::AgentClient;
use crate::driver::{LaunchNic, LaunchSpec, VmDriver, VmProcess};
use crate::error::OpError;
use crate::images::{BootImage, ImageSource, ResolveImageError};
use crate::ipam;
use crate::lifecycle::{self, ActionPlan, ExitOutcome};
use crate::net::NetworkBackend;
use crate::store::{InstanceRecord, StateStore};

pub const DEFAULT_NETWORK: &str = "default";
/// Where automatically chosen subnets come from.
pub const AUTO_SUBNET_POOL: &str = "10.213.0.0/16";
pub const DEFAULT_READY_TIMEOUT_SECS: u64 = 120;
const HEALTH_POLL: Duration = Duration::from_millis(150);
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_LOG_CHUNK: u64 = 1 << 20;
/// The largest file `read_file` copies out of a guest.
const MAX_COPY_BYTES: u64 = 1 << 30;
/// An instance that stayed up this long has its crash streak forgotten.
const STABLE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Prefix of every host interface vroom creates (at most 5 characters).
    pub iface_prefix: String,
    pub stop_timeout: Duration,
    pub host_mem_mib: u64,
    pub host_cpus: u32,
}

pub struct Engine {
    cfg: EngineConfig,
    driver: Arc<dyn VmDriver>,
    net: Arc<dyn NetworkBackend>,
    store: Arc<dyn StateStore>,
    images: Arc<dyn ImageSource>,
    instances: Mutex<BTreeMap<Name, Arc<Cell>>>,
    networks: Mutex<BTreeMap<Name, Network>>,
    /// Serialises creations and network changes, which allocate names and addresses.
    alloc: tokio::sync::Mutex<()>,
}

/// One instance in memory.
struct Cell {
    record: Mutex<InstanceRecord>,
    /// Serialises lifecycle operations on this instance.
    op: tokio::sync::Mutex<()>,
    /// Bumped on every launch, so a stale monitor never acts.
    generation: AtomicU64,
    crash_streak: AtomicU32,
    agent: AgentClient,
    dir: PathBuf,
}

impl Cell {
    fn new(dir: PathBuf, record: InstanceRecord) -> Arc<Self> {
        Arc::new(Cell {
            agent: AgentClient::new(dir.join("agent.sock")),
            dir,
            record: Mutex::new(record),
            op: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            crash_streak: AtomicU32::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, InstanceRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn snapshot(&self) -> Instance {
        self.lock().instance.clone()
    }
    fn volume(&self) -> PathBuf {
        self.dir.join("config.img")
    }
    fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        driver: Arc<dyn VmDriver>,
        net: Arc<dyn NetworkBackend>,
        store: Arc<dyn StateStore>,
        images: Arc<dyn ImageSource>,
    ) -> Arc<Self> {
        Arc::new(Engine {
            cfg,
            driver,
            net,
            store,
            images,
            instances: Mutex::default(),
            networks: Mutex::default(),
            alloc: tokio::sync::Mutex::new(()),
        })
    }

    fn instances_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("instances")
    }

    fn cell(&self, name: &str) -> Result<Arc<Cell>, OpError> {
        let map = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| OpError::not_found("instance", name))
    }

    fn persist(&self, record: &InstanceRecord) -> Result<(), OpError> {
        self.store
            .put_instance(record)
            .map_err(|e| OpError::internal("failed to save instance state", e))
    }

    /// Updates a record in memory and in the store.
    fn update(
        &self,
        cell: &Cell,
        f: impl FnOnce(&mut InstanceRecord),
    ) -> Result<Instance, OpError> {
        let mut record = cell.lock();
        f(&mut record);
        self.persist(&record)?;
        Ok(record.instance.clone())
    }

    /// Loads state and re-adopts the VMs that kept running while no daemon was up.
    pub async fn recover(self: &Arc<Self>) -> Result<(), OpError> {
        let networks = self
            .store
            .networks()
            .map_err(|e| OpError::internal("failed to load networks", e))?;
        {
            let mut map = self.networks.lock().unwrap_or_else(|p| p.into_inner());
            for network in networks {
                map.insert(network.name.clone(), network);
            }
        }
        let records = self
            .store
            .instances()
            .map_err(|e| OpError::internal("failed to load instances", e))?;
        for record in records {
            let name = record.instance.spec.name.clone();
            let cell = Cell::new(
                self.instances_dir().join(&record.instance.id),
                record.clone(),
            );
            self.instances
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), cell.clone());
            match record.process.clone() {
                Some(process) if self.driver.is_alive(&process) => {
                    tracing::info!(instance = %name, pid = process.pid, "re-adopted running VM");
                    let generation = cell.generation.fetch_add(1, Ordering::SeqCst) + 1;
                    let waiting = matches!(record.instance.status.state, InstanceState::Starting);
                    let deadline = waiting
                        .then(|| Instant::now() + Duration::from_secs(record.ready_timeout_secs));
                    self.spawn_monitor(cell, generation, process, deadline);
                }
                _ => {
                    // The VM is gone: the same rule as for an exit seen live.
                    let outcome =
                        lifecycle::on_exit(record.instance.status.state, record.instance.desired);
                    self.update(&cell, |r| {
                        r.process = None;
                        r.instance.status.pid = None;
                        if outcome == ExitOutcome::Stopped {
                            r.instance.status.state = InstanceState::Stopped;
                        }
                    })?;
                    if outcome == ExitOutcome::Restart {
                        tracing::warn!(instance = %name, "VM died while no daemon was running; restarting it");
                        self.schedule_restart(cell, 0);
                    }
                }
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- instances

    pub fn list(&self) -> Vec<Instance> {
        let cells: Vec<_> = self
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        cells.iter().map(|c| c.snapshot()).collect()
    }

    pub fn get(&self, name: &str) -> Result<Instance, OpError> {
        Ok(self.cell(name)?.snapshot())
    }

    /// Creates an instance and launches it. Returns once the VMM runs; the
    /// guest becomes ready later (`status.state` turns `running`). Any failure
    /// before that removes everything this call created.
    pub async fn run(self: &Arc<Self>, req: RunRequest) -> Result<Instance, OpError> {
        let spec = req.spec;
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
        let image = self.images.resolve(&spec.image).map_err(image_error)?;
        let mem_mib = self.check_resources(&spec, &image)?;
        let accel = self
            .driver
            .resolve_accel(spec.accel)
            .map_err(|e| OpError::wrap(ErrorCode::HostUnsupported, "cannot run here", e))?;
        let volume_kib = spec
            .config_volume_kib
            .unwrap_or(vroom_volume::DEFAULT_SIZE_KIB);

        let nic_specs = if spec.nics.is_empty() {
            vec![NicSpec {
                network: Name::new(DEFAULT_NETWORK).expect("invariant: valid name"),
                ip: None,
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
            };
            created_default = Some(self.create_network_locked(default).await?);
        }
        let rollback_default = |engine: &Arc<Self>| {
            let engine = engine.clone();
            let created = created_default.clone();
            async move {
                if let Some(net) = created {
                    let _ = engine.remove_network_locked(net.name.as_str()).await;
                }
            }
        };

        let id = random_id();
        let roles = &image.manifest.appliance.nic_roles;
        let nics = match self.allocate_nics(&id, &nic_specs, roles) {
            Ok(nics) => nics,
            Err(e) => {
                rollback_default(self).await;
                return Err(e);
            }
        };
        let instance = Instance {
            id: id.clone(),
            spec: spec.clone(),
            image_id: image.id.clone(),
            image_name: image.manifest.name.clone(),
            mem_mib,
            created_at: now_secs(),
            desired: DesiredState::Running,
            nics,
            status: InstanceStatus {
                accel: Some(accel),
                ..InstanceStatus::stopped()
            },
            config: image.manifest.appliance.seed_config.clone(),
        };
        let dir = self.instances_dir().join(&id);
        let record = InstanceRecord {
            instance: instance.clone(),
            process: None,
            ready_timeout_secs,
        };
        let prepared = (|| {
            std::fs::create_dir_all(&dir)
                .map_err(|e| OpError::internal(format!("failed to create {}", dir.display()), e))?;
            let identity = instance_file(&instance, &image);
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
        })();
        if let Err(e) = prepared {
            let _ = std::fs::remove_dir_all(&dir);
            rollback_default(self).await;
            return Err(e);
        }
        let cell = Cell::new(dir.clone(), record);
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.name.clone(), cell.clone());
        drop(alloc);

        let _op = cell.op.lock().await;
        if let Err(e) = self.launch(&cell, Some(image)).await {
            self.instances
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&spec.name);
            let _ = self.store.delete_instance(spec.name.as_str());
            let _ = std::fs::remove_dir_all(&dir);
            let _alloc = self.alloc.lock().await;
            rollback_default(self).await;
            return Err(e);
        }
        Ok(cell.snapshot())
    }

    fn check_resources(&self, spec: &InstanceSpec, image: &BootImage) -> Result<u64, OpError> {
        let mem_mib = spec.mem_mib.unwrap_or(image.manifest.default_mem_mib);
        let min_mib = image.manifest.min_mem_mib.max(MIN_MEM_MIB);
        if mem_mib < min_mib {
            return Err(InvalidInputError::MemTooSmall { mem_mib, min_mib }.into());
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

    /// Addresses for the NICs. On an isolated network, a router's inside NIC
    /// (`lan` or `dmz` of an image that also has a `wan`) takes the gateway
    /// address unless another address is asked for.
    fn allocate_nics(
        &self,
        id: &str,
        specs: &[NicSpec],
        roles: &[String],
    ) -> Result<Vec<NicStatus>, OpError> {
        if !roles.is_empty() && specs.len() > roles.len() {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "the image has {} NIC(s) ({}); {} were given",
                    roles.len(),
                    roles.join(", "),
                    specs.len()
                ),
            ));
        }
        let mut used: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        for instance in self.list() {
            for nic in instance.nics {
                used.entry(nic.network.to_string())
                    .or_default()
                    .push(nic.ip);
            }
        }
        let mut nics = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            let network = self.network(spec.network.as_str())?;
            let taken = used.entry(network.name.to_string()).or_default();
            let role = roles.get(index).map(String::as_str);
            if role == Some(MIRROR_ROLE) && !network.mirror {
                return Err(OpError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "NIC {} is a mirror-sink, but network {} does not mirror its traffic (create it with --mirror)",
                        index + 1,
                        network.name
                    ),
                ));
            }
            let ip = if ipam::takes_gateway(&network, roles, index, spec.ip) {
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
                    ErrorCode::InvalidArgument,
                    format!("cannot attach to network {}", network.name),
                    e,
                )
            })?;
            taken.push(ip);
            nics.push(NicStatus {
                network: network.name.clone(),
                ip,
                prefix_len: network.subnet.prefix_len(),
                gateway: network.gateway,
                mac: ipam::mac_address(id, index),
                tap: ipam::tap_name(&self.cfg.iface_prefix, id, index),
            });
        }
        Ok(nics)
    }

    /// Starts the VMM for a cell (caller holds its op lock) and spawns its monitor.
    async fn launch(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        image: Option<BootImage>,
    ) -> Result<(), OpError> {
        let (instance, ready_timeout) = {
            let r = cell.lock();
            (
                r.instance.clone(),
                Duration::from_secs(r.ready_timeout_secs),
            )
        };
        let image = match image {
            Some(image) => image,
            None => self
                .images
                .resolve(&instance.image_id)
                .map_err(image_error)?,
        };
        let accel = self
            .driver
            .resolve_accel(instance.spec.accel)
            .map_err(|e| OpError::wrap(ErrorCode::HostUnsupported, "cannot run here", e))?;
        let launch = LaunchSpec {
            instance_id: instance.id.clone(),
            name: instance.spec.name.to_string(),
            run_dir: cell.dir.clone(),
            kernel: image.kernel.clone(),
            initramfs: image.initramfs.clone(),
            cmdline: image.manifest.cmdline.clone(),
            mem_mib: instance.mem_mib,
            cpus: instance.spec.cpus,
            accel,
            root_disk: image.rootfs.clone(),
            config_disk: cell.volume(),
            nics: instance
                .nics
                .iter()
                .map(|n| LaunchNic {
                    tap: n.tap.clone(),
                    mac: n.mac.clone(),
                })
                .collect(),
            agent_socket: cell.dir.join("agent.sock"),
            console_log: cell.console_log(),
        };
        let process = self.driver.launch(&launch).await.map_err(|e| {
            let code = match e {
                crate::driver::LaunchVmError::VmmMissing { .. }
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
        for nic in &instance.nics {
            let bridge = self.network(nic.network.as_str()).map(|n| n.bridge);
            let attached = match bridge {
                Ok(bridge) => self
                    .net
                    .attach_tap(&nic.tap, &bridge)
                    .await
                    .map_err(|e| OpError::internal("failed to attach the NIC", e)),
                Err(e) => Err(e),
            };
            if let Err(e) = attached {
                let _ = self.driver.kill(&process);
                self.driver.wait_exit(&process).await;
                return Err(e);
            }
        }
        cell.agent.reset().await;
        let generation = cell.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let saved = self.update(cell, |r| {
            r.process = Some(process.clone());
            r.instance.status = InstanceStatus {
                state: InstanceState::Starting,
                pid: Some(process.pid),
                accel: Some(process.accel),
                started_at: Some(now_secs()),
                boot_ms: None,
                restarts: r.instance.status.restarts,
                last_error: None,
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
            Some(Instant::now() + ready_timeout),
        );
        Ok(())
    }

    /// Watches one VMM process: waits for the guest to become ready (or fails
    /// it on the deadline), then for the process to exit, then applies the
    /// restart policy.
    fn spawn_monitor(
        self: &Arc<Self>,
        cell: Arc<Cell>,
        generation: u64,
        process: VmProcess,
        ready_deadline: Option<Instant>,
    ) {
        let engine = self.clone();
        tokio::spawn(async move {
            let launched = Instant::now();
            let exit = engine.driver.wait_exit(&process);
            tokio::pin!(exit);
            if let Some(deadline) = ready_deadline {
                loop {
                    tokio::select! {
                        _ = &mut exit => break,
                        _ = tokio::time::sleep(HEALTH_POLL) => {}
                    }
                    if cell.generation.load(Ordering::SeqCst) != generation {
                        return;
                    }
                    if let Ok(GuestReply::Health(report)) = cell
                        .agent
                        .call(HostCommand::Health, Duration::from_secs(2))
                        .await
                    {
                        if report.ready {
                            let config = sanitize_config(report.config);
                            let boot_ms = launched.elapsed().as_millis() as u64;
                            let _ = engine.update(&cell, |r| {
                                if r.instance.status.state == InstanceState::Starting {
                                    r.instance.status.state = InstanceState::Running;
                                    r.instance.status.boot_ms = Some(boot_ms);
                                }
                                r.instance.config = config;
                            });
                            tracing::info!(instance = %cell.snapshot().spec.name, boot_ms, "guest ready");
                            break;
                        }
                    }
                    if Instant::now() >= deadline {
                        let tail = tail_of(&cell.console_log(), 20);
                        let secs = cell.lock().ready_timeout_secs;
                        let _ = engine.update(&cell, |r| {
                            r.instance.status.state = InstanceState::Failed;
                            r.instance.status.last_error =
                                Some(format!("the guest did not become ready within {secs}s"));
                        });
                        tracing::warn!(instance = %cell.snapshot().spec.name, console = %tail, "guest never became ready");
                        let _ = engine.driver.kill(&process);
                        break;
                    }
                }
            }
            exit.await;
            engine.on_exit(&cell, generation, launched.elapsed()).await;
        });
    }

    async fn on_exit(self: &Arc<Self>, cell: &Arc<Cell>, generation: u64, uptime: Duration) {
        if cell.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        cell.agent.reset().await;
        let (state, desired) = {
            let r = cell.lock();
            (r.instance.status.state, r.instance.desired)
        };
        let outcome = lifecycle::on_exit(state, desired);
        let name = cell.snapshot().spec.name;
        if uptime >= STABLE_AFTER {
            cell.crash_streak.store(0, Ordering::SeqCst);
        }
        let _ = self.update(cell, |r| {
            r.process = None;
            r.instance.status.pid = None;
            match outcome {
                ExitOutcome::Stopped => r.instance.status.state = InstanceState::Stopped,
                ExitOutcome::Failed => {}
                ExitOutcome::Restart => {
                    r.instance.status.state = InstanceState::Restarting;
                    r.instance.status.restarts += 1;
                    r.instance.status.last_error = Some("the VM exited unexpectedly".into());
                }
            }
        });
        if outcome == ExitOutcome::Restart {
            let streak = cell.crash_streak.fetch_add(1, Ordering::SeqCst) + 1;
            tracing::warn!(instance = %name, streak, "VM exited unexpectedly; restarting");
            self.schedule_restart(cell.clone(), lifecycle::restart_backoff_secs(streak));
        }
    }

    fn schedule_restart(self: &Arc<Self>, cell: Arc<Cell>, delay_secs: u64) {
        let engine = self.clone();
        let generation = cell.generation.load(Ordering::SeqCst);
        let _ = self.update(&cell, |r| {
            r.instance.status.state = InstanceState::Restarting
        });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(delay_secs)).await;
            let _op = cell.op.lock().await;
            let still_wanted = {
                let r = cell.lock();
                r.instance.desired == DesiredState::Running
                    && r.instance.status.state == InstanceState::Restarting
            };
            if !still_wanted || cell.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            if let Err(e) = engine.launch(&cell, None).await {
                tracing::error!(error = %e, "restart failed");
                let _ = engine.update(&cell, |r| {
                    r.instance.status.state = InstanceState::Failed;
                    r.instance.status.last_error = Some(e.message.clone());
                });
            }
        });
    }

    pub async fn action(
        self: &Arc<Self>,
        name: &str,
        action: InstanceAction,
    ) -> Result<Instance, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
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
            self.stop_locked(&cell, false).await?;
        }
        if matches!(action, InstanceAction::Start | InstanceAction::Restart) {
            self.update(&cell, |r| r.instance.desired = DesiredState::Running)?;
            cell.crash_streak.store(0, Ordering::SeqCst);
            self.launch(&cell, None).await?;
        }
        Ok(cell.snapshot())
    }

    /// Graceful guest shutdown through the agent, ACPI power-down, then a kill.
    async fn stop_locked(&self, cell: &Arc<Cell>, force: bool) -> Result<(), OpError> {
        let process = {
            let r = cell.lock();
            r.process.clone()
        };
        self.update(cell, |r| {
            r.instance.desired = DesiredState::Stopped;
            if r.process.is_some() {
                r.instance.status.state = InstanceState::Stopping;
            }
        })?;
        if let Some(process) = process.filter(|p| self.driver.is_alive(p)) {
            let exited = |timeout| tokio::time::timeout(timeout, self.driver.wait_exit(&process));
            let mut done = false;
            if !force {
                let asked = cell
                    .agent
                    .call(HostCommand::Shutdown, Duration::from_secs(2))
                    .await
                    .is_ok();
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
        let running = cell
            .lock()
            .process
            .as_ref()
            .is_some_and(|p| self.driver.is_alive(p));
        if running && !force {
            return Err(OpError::conflict(format!(
                "instance {name} is running; stop it first or use `rm -f`"
            )));
        }
        self.stop_locked(&cell, true).await?;
        self.store
            .delete_instance(name)
            .map_err(|e| OpError::internal("failed to delete instance state", e))?;
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n, _| n.as_str() != name);
        std::fs::remove_dir_all(&cell.dir)
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
        Ok(())
    }

    pub async fn exec(&self, name: &str, req: ExecRequest) -> Result<ExecResult, OpError> {
        if req.argv.is_empty() {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                "exec needs a command",
            ));
        }
        let cell = self.running_cell(name)?;
        let timeout = Duration::from_secs(req.timeout_secs.unwrap_or(30).clamp(1, 3600));
        let reply = cell
            .agent
            .call(
                HostCommand::Exec {
                    argv: req.argv,
                    timeout_ms: timeout.as_millis() as u64,
                },
                timeout + Duration::from_secs(5),
            )
            .await
            .map_err(|e| OpError::wrap(ErrorCode::GuestError, "exec failed", e))?;
        match reply {
            GuestReply::Exec(out) => Ok(ExecResult {
                exit_code: out.exit_code,
                stdout: out.stdout,
                stderr: out.stderr,
            }),
            GuestReply::Error { message } => Err(OpError::new(
                ErrorCode::GuestError,
                format!("the guest refused: {}", truncate(&message)),
            )),
            _ => Err(OpError::new(
                ErrorCode::GuestError,
                "the guest answered with the wrong reply",
            )),
        }
    }

    /// Copies a regular file out of a running guest, in agent-sized chunks.
    pub async fn read_file(&self, name: &str, path: &str) -> Result<Vec<u8>, OpError> {
        if !path.starts_with('/') {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!("{path:?} is not an absolute path in the guest"),
            ));
        }
        let cell = self.running_cell(name)?;
        let mut data = Vec::new();
        loop {
            let reply = cell
                .agent
                .call(
                    HostCommand::ReadFile {
                        path: path.to_string(),
                        offset: data.len() as u64,
                        len: MAX_READ_CHUNK,
                    },
                    AGENT_TIMEOUT,
                )
                .await
                .map_err(|e| OpError::wrap(ErrorCode::GuestError, "copy failed", e))?;
            let (chunk, size) = match reply {
                GuestReply::FileChunk { hex, size } => match from_hex(&hex) {
                    Some(chunk) if chunk.len() as u64 <= MAX_READ_CHUNK => (chunk, size),
                    _ => {
                        return Err(OpError::new(
                            ErrorCode::GuestError,
                            "the guest sent a malformed file chunk",
                        ))
                    }
                },
                GuestReply::Error { message } => {
                    return Err(OpError::new(ErrorCode::NotFound, truncate(&message)))
                }
                _ => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        "the guest answered with the wrong reply",
                    ))
                }
            };
            data.extend_from_slice(&chunk);
            if data.len() as u64 > MAX_COPY_BYTES {
                return Err(OpError::new(
                    ErrorCode::ResourceExhausted,
                    format!("{path} is larger than {MAX_COPY_BYTES} bytes"),
                ));
            }
            // A file that grows while it is read is copied up to its size at the last read.
            if chunk.is_empty() || data.len() as u64 >= size {
                return Ok(data);
            }
        }
    }

    fn running_cell(&self, name: &str) -> Result<Arc<Cell>, OpError> {
        let cell = self.cell(name)?;
        let state = cell.lock().instance.status.state;
        if state != InstanceState::Running {
            return Err(OpError::conflict(format!(
                "instance {name} is {state}, not running"
            )));
        }
        Ok(cell)
    }

    pub fn logs(&self, name: &str, offset: u64) -> Result<(String, u64), OpError> {
        use std::io::{Read, Seek, SeekFrom};
        let cell = self.cell(name)?;
        let path = cell.console_log();
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
            Err(e) => return Err(OpError::internal("failed to open the console log", e)),
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        // A log that shrank was recreated by a new boot: start over.
        let start = if offset > len { 0 } else { offset };
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(start))
            .map_err(|e| OpError::internal("failed to read the console log", e))?;
        file.take(MAX_LOG_CHUNK)
            .read_to_end(&mut buf)
            .map_err(|e| OpError::internal("failed to read the console log", e))?;
        let next = start + buf.len() as u64;
        Ok((String::from_utf8_lossy(&buf).into_owned(), next))
    }

    // ------------------------------------------------------------------- config

    pub async fn config_get(&self, name: &str) -> Result<ConfigValues, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        match cell.lock().instance.status.state {
            InstanceState::Running => {}
            InstanceState::Stopped | InstanceState::Failed => {
                return vroom_volume::read_config(&cell.volume())
                    .map_err(|e| OpError::internal("failed to read the config volume", e));
            }
            state => {
                return Err(OpError::conflict(format!(
                    "instance {name} is {state}; try again when it is running or stopped"
                )))
            }
        }
        match cell.agent.call(HostCommand::Health, AGENT_TIMEOUT).await {
            Ok(GuestReply::Health(report)) => Ok(sanitize_config(report.config)),
            Ok(_) => Err(OpError::new(
                ErrorCode::GuestError,
                "the guest answered with the wrong reply",
            )),
            Err(e) => Err(OpError::wrap(
                ErrorCode::GuestError,
                "cannot read the config from the guest",
                e,
            )),
        }
    }

    /// Sets some keys, keeping the others.
    pub async fn config_update(
        &self,
        name: &str,
        set: ConfigValues,
    ) -> Result<ConfigValues, OpError> {
        self.change_config(name, |current, _| {
            let mut values = current;
            values.extend(set);
            values
        })
        .await
    }

    /// Replaces the whole config (import).
    pub async fn config_replace(
        &self,
        name: &str,
        values: ConfigValues,
    ) -> Result<ConfigValues, OpError> {
        self.change_config(name, |_, _| values).await
    }

    /// Back to the image's seed config.
    pub async fn config_reset(&self, name: &str) -> Result<ConfigValues, OpError> {
        self.change_config(name, |_, seed| seed.clone()).await
    }

    async fn change_config(
        &self,
        name: &str,
        change: impl FnOnce(ConfigValues, &ConfigValues) -> ConfigValues,
    ) -> Result<ConfigValues, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        let (state, image_id) = {
            let r = cell.lock();
            (r.instance.status.state, r.instance.image_id.clone())
        };
        let image = self.images.resolve(&image_id).map_err(image_error)?;
        let seed = &image.manifest.appliance.seed_config;
        let live = match state {
            InstanceState::Running => true,
            InstanceState::Stopped | InstanceState::Failed => false,
            state => {
                return Err(OpError::conflict(format!(
                    "instance {name} is {state}; try again when it is running or stopped"
                )))
            }
        };
        let current = if live {
            match cell.agent.call(HostCommand::Health, AGENT_TIMEOUT).await {
                Ok(GuestReply::Health(report)) => sanitize_config(report.config),
                _ => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        "cannot read the config from the guest",
                    ))
                }
            }
        } else {
            vroom_volume::read_config(&cell.volume())
                .map_err(|e| OpError::internal("failed to read the config volume", e))?
        };
        let values = change(current, seed);
        let schema = &image.manifest.appliance.config_schema;
        for (key, value) in &values {
            validate_config_key(key)?;
            validate_config_value(key, value)?;
            if schema.is_empty() && !seed.contains_key(key) {
                let known: Vec<&str> = seed.keys().map(String::as_str).collect();
                return Err(OpError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "unknown config key {key:?} for image {} (known: {})",
                        image.manifest.name,
                        known.join(", ")
                    ),
                ));
            }
        }
        if !schema.is_empty() {
            check_config(schema, &values)?;
        }
        let applied = if live {
            match cell
                .agent
                .call(
                    HostCommand::ApplyConfig {
                        values: values.clone(),
                    },
                    AGENT_TIMEOUT,
                )
                .await
            {
                Ok(GuestReply::ConfigApplied { values }) => sanitize_config(values),
                Ok(GuestReply::Error { message }) => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        format!("the guest reported: {}", truncate(&message)),
                    ))
                }
                Ok(_) => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        "the guest answered with the wrong reply",
                    ))
                }
                Err(e) => {
                    return Err(OpError::wrap(
                        ErrorCode::GuestError,
                        "cannot apply the config in the guest",
                        e,
                    ))
                }
            }
        } else {
            vroom_volume::write_config(&cell.volume(), &values)
                .map_err(|e| OpError::internal("failed to write the config volume", e))?;
            values
        };
        self.update(&cell, |r| r.instance.config = applied.clone())?;
        Ok(applied)
    }

    // ----------------------------------------------------------------- networks

    pub fn list_networks(&self) -> Vec<Network> {
        self.networks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn network(&self, name: &str) -> Result<Network, OpError> {
        let map = self.networks.lock().unwrap_or_else(|p| p.into_inner());
        map.values()
            .find(|n| n.name.as_str() == name)
            .cloned()
            .ok_or_else(|| OpError::not_found("network", name))
    }

    pub async fn create_network(&self, spec: NetworkSpec) -> Result<Network, OpError> {
        let _alloc = self.alloc.lock().await;
        self.create_network_locked(spec).await
    }

    async fn create_network_locked(&self, spec: NetworkSpec) -> Result<Network, OpError> {
        if spec.isolated && spec.nat {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                "an isolated network cannot have NAT: its router appliance does that",
            ));
        }
        if self.network(spec.name.as_str()).is_ok() {
            return Err(OpError::new(
                ErrorCode::AlreadyExists,
                format!("a network named {:?} already exists", spec.name.as_str()),
            ));
        }
        let host = self
            .net
            .host_addresses()
            .await
            .map_err(|e| OpError::internal("failed to read host addresses", e))?;
        let ours = self.list_networks();
        let subnet = match spec.subnet {
            Some(subnet) => {
                if let Some(other) = ours.iter().find(|n| ipam::overlaps(n.subnet, subnet)) {
                    return Err(OpError::conflict(format!(
                        "subnet {subnet} overlaps network {} ({})",
                        other.name, other.subnet
                    )));
                }
                if let Some(addr) = host.iter().find(|a| ipam::overlaps(a.subnet, subnet)) {
                    return Err(OpError::conflict(format!(
                        "subnet {subnet} overlaps {} on host interface {}",
                        addr.subnet, addr.interface
                    )));
                }
                subnet
            }
            None => {
                let taken: Vec<Ipv4Net> = ours
                    .iter()
                    .map(|n| n.subnet)
                    .chain(host.iter().map(|a| a.subnet))
                    .collect();
                let pool: Ipv4Net = AUTO_SUBNET_POOL.parse().expect("invariant: valid pool");
                ipam::choose_subnet(pool, &taken).ok_or_else(|| {
                    OpError::new(
                        ErrorCode::ResourceExhausted,
                        format!("no free /24 left in {AUTO_SUBNET_POOL}"),
                    )
                })?
            }
        };
        let network = Network {
            bridge: ipam::bridge_name(
                &self.cfg.iface_prefix,
                &self.cfg.data_dir.display().to_string(),
                spec.name.as_str(),
            ),
            gateway: ipam::gateway(subnet),
            name: spec.name,
            subnet,
            nat: spec.nat,
            isolated: spec.isolated,
            mirror: spec.mirror,
            created_at: now_secs(),
        };
        if let Err(e) = self.net.create_network(&network).await {
            let _ = self.net.delete_network(&network).await;
            return Err(OpError::internal(
                format!("failed to create network {}", network.name),
                e,
            ));
        }
        if let Err(e) = self.store.put_network(&network) {
            let _ = self.net.delete_network(&network).await;
            return Err(OpError::internal("failed to save the network", e));
        }
        self.networks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(network.name.clone(), network.clone());
        tracing::info!(network = %network.name, subnet = %network.subnet, bridge = %network.bridge, "network created");
        Ok(network)
    }

    pub async fn remove_network(&self, name: &str) -> Result<(), OpError> {
        let _alloc = self.alloc.lock().await;
        self.remove_network_locked(name).await
    }

    async fn remove_network_locked(&self, name: &str) -> Result<(), OpError> {
        let network = self.network(name)?;
        let users: Vec<String> = self
            .list()
            .into_iter()
            .filter(|i| i.nics.iter().any(|n| n.network.as_str() == name))
            .map(|i| i.spec.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(OpError::conflict(format!(
                "network {name} is used by {}",
                users.join(", ")
            )));
        }
        self.net
            .delete_network(&network)
            .await
            .map_err(|e| OpError::internal(format!("failed to remove network {name}"), e))?;
        self.store
            .delete_network(name)
            .map_err(|e| OpError::internal("failed to delete the network", e))?;
        self.networks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&network.name);
        Ok(())
    }

    // ------------------------------------------------------------------- images

    pub fn list_images(&self) -> Result<Vec<ImageSummary>, OpError> {
        self.images.list().map_err(image_error)
    }

    /// Builds an image from a recipe on this host (a blocking job, run off the async workers).
    /// Builds an image from a recipe; `progress` hears of each stage.
    pub async fn build_image(
        &self,
        recipe: PathBuf,
        update: bool,
        mut progress: impl FnMut(&str, &str) + Send + 'static,
    ) -> Result<BuildReport, OpError> {
        let images = self.images.clone();
        let shown = recipe.display().to_string();
        let result = tokio::task::spawn_blocking(move || {
            images.build(&recipe, update, &mut |stage, detail| {
                tracing::info!(recipe = %recipe.display(), "{stage}: {detail}");
                progress(stage, detail);
            })
        })
        .await
        .map_err(|e| OpError::internal("the build task failed", e))?;
        result.map_err(|e| match e {
            crate::images::BuildFromRecipeError::Recipe { .. } => {
                OpError::new(ErrorCode::InvalidArgument, e.to_string())
            }
            crate::images::BuildFromRecipeError::Build { .. } => {
                OpError::wrap(ErrorCode::Internal, format!("cannot build {shown}"), e)
            }
        })
    }

    /// Removes an image no instance uses.
    pub async fn remove_image(&self, reference: &str) -> Result<(), OpError> {
        let _alloc = self.alloc.lock().await;
        let image = self.get_image(reference)?;
        let users: Vec<String> = self
            .list()
            .into_iter()
            .filter(|i| i.image_id == image.id)
            .map(|i| i.spec.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(OpError::conflict(format!(
                "image {} is used by {}",
                image.name,
                users.join(", ")
            )));
        }
        self.images.remove(&image.id).map_err(image_error)
    }

    pub fn get_image(&self, reference: &str) -> Result<ImageSummary, OpError> {
        let image = self.images.resolve(reference).map_err(image_error)?;
        let list = self.list_images()?;
        list.into_iter()
            .find(|i| i.id == image.id)
            .ok_or_else(|| OpError::not_found("image", reference))
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }
}

fn image_error(e: ResolveImageError) -> OpError {
    match e {
        ResolveImageError::NotFound { .. } => OpError::new(ErrorCode::NotFound, e.to_string()),
        ResolveImageError::KernelMissing { .. } => {
            OpError::new(ErrorCode::HostUnsupported, e.to_string())
        }
        ResolveImageError::Other { .. } => OpError::new(ErrorCode::Internal, e.to_string()),
    }
}

fn action_verb(action: InstanceAction) -> &'static str {
    match action {
        InstanceAction::Start => "start",
        InstanceAction::Stop => "stop",
        InstanceAction::Restart => "restart",
    }
}

fn instance_file(instance: &Instance, image: &BootImage) -> InstanceFile {
    let roles = &image.manifest.appliance.nic_roles;
    InstanceFile {
        version: VOLUME_VERSION,
        hostname: instance.spec.name.to_string(),
        nics: instance
            .nics
            .iter()
            .enumerate()
            .map(|(i, nic)| NicConfig {
                mac: nic.mac.clone(),
                role: roles.get(i).cloned(),
                address: nic.ip.to_string(),
                prefix_len: nic.prefix_len,
                gateway: Some(nic.gateway.to_string()),
            })
            .collect(),
    }
}

/// Guest output is untrusted: keep only well-formed keys and values, and not too many.
fn sanitize_config(values: ConfigValues) -> ConfigValues {
    values
        .into_iter()
        .filter(|(k, v)| validate_config_key(k).is_ok() && validate_config_value(k, v).is_ok())
        .take(256)
        .collect()
}

fn truncate(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    line.chars().take(200).collect()
}

/// The last `lines` lines of a file, for error reports.
pub fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
