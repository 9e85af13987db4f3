//! The engine: owns instances and networks, drives their lifecycle through
//! the backend traits, persists every change before acknowledging it, and
//! supervises running VMs (readiness, unexpected exits, restarts).
//!
//! `Engine` is the one entry point; its methods are spread over one file per
//! concern:
//! - `instances`: create with rollback, start, stop, restart, remove;
//! - `snapshots`: snapshots, restores, clones and warm starts;
//! - `migrate`: live migration's source and destination steps;
//! - `markers`: the files that tell the next daemon what was under way;
//! - `supervise`: recovery after a daemon restart, the per-VM monitor and
//!   the restart policy;
//! - `guest`: exec, file copy and console logs;
//! - `config`: the config volume, read and changed through the guest;
//! - `networks` and `images`: the host networks and the image store;
//! - `rooms`: per-tenant lan and dmz behind a firewall appliance, with DNS
//!   names and port forwards that follow the instances;
//! - `splices`: appliances spliced inline in front of running VMs, mirrors,
//!   and the watchdog that fails a dead appliance open or closed.

mod archive;
mod carry;
mod config;
mod guest;
mod images;
mod instances;
mod logged;
mod markers;
mod migrate;
mod networks;
mod records;
mod rooms;
mod scrape;
pub mod services;
mod snapshots;
mod splices;
mod supervise;
mod volumes;

pub use archive::verify_archive;
pub use guest::{GuestExec, GuestFile, GuestStdin};
pub use migrate::{Arrival, ArrivalChecks, LiveOutgoing};
pub use rooms::room_network_taken;
pub use volumes::VOLUMES_STAY_LOCAL;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use vroom_agent_proto::volume::{
    data_disk_serial, DataVolume, InstanceFile, NicConfig, VOLUME_VERSION,
};
use vroom_agent_proto::{ConntrackUsage, GuestReply, HostCommand};
use vroom_base::LockExt;
use vroom_types::{
    check_config, is_l2_role, validate_config_key, validate_config_value, BuildReport,
    ConfigValues, DesiredState, ErrorCode, EventKind, ExecRequest, ImageSummary, Instance,
    InstanceAction, InstanceSpec, InstanceState, InstanceStatus, InvalidInputError, Name, Network,
    NetworkSpec, NicSpec, NicStatus, RunRequest, MIN_MEM_MIB, MIRROR_ROLE,
};

use crate::agent::AgentClient;
use crate::console::{ConsoleCollector, ConsoleLog, CONSOLE_SOCKET};
use crate::driver::{LaunchNic, LaunchSpec, VmDriver, VmProcess};
use crate::error::OpError;
use crate::events::{EventLog, NewEvent};
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
/// How long one `WaitReady` waits in the guest before the host looks again
/// (at its deadline, at its generation).
const WAIT_READY_SLICE: Duration = Duration::from_secs(1);
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_LOG_CHUNK: u64 = 1 << 20;
pub use crate::console::KEPT_BOOTS;
/// How long a launched VMM may take to serve its console socket.
const CONSOLE_CONNECT_WINDOW: Duration = Duration::from_secs(60);
/// How long, after a VMM exited, its last console output may take to reach the disk.
const CONSOLE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of a console error reports and the failure classification read.
const CONSOLE_TAIL_BYTES: u64 = 64 * 1024;
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
    /// Splices, by appliance.
    splices: Mutex<BTreeMap<Name, vroom_types::Splice>>,
    /// Mirrors, by id.
    mirrors: Mutex<BTreeMap<String, vroom_types::Mirror>>,
    /// Rooms, by name.
    rooms: Mutex<BTreeMap<Name, vroom_types::Room>>,
    /// Serialises creations and network changes, which allocate names and addresses.
    alloc: tokio::sync::Mutex<()>,
    /// Serialises splice and mirror changes (and the watchdog's).
    splice_op: tokio::sync::Mutex<()>,
    /// Serialises room changes.
    room_op: tokio::sync::Mutex<()>,
    /// Serialises service changes and the controller's passes.
    service_op: tokio::sync::Mutex<()>,
    /// A service change starts a pass at once (tests turn it off to run
    /// their passes one at a time).
    service_kicks: std::sync::atomic::AtomicBool,
    /// One pass at a time per service, by name.
    service_passes: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Each service's autoscaler readings and timers, by name.
    service_scalers: Mutex<BTreeMap<String, services::Scaler>>,
    /// Images the service controller has had warmed (or tried to), by id.
    service_warming: Mutex<std::collections::BTreeSet<String>>,
    /// Snapshots being written, by name.
    snapshots_in_progress: Mutex<std::collections::BTreeSet<String>>,
    /// The cluster this host is a node of, if any.
    cluster: std::sync::OnceLock<Arc<dyn crate::cluster::ClusterHooks>>,
    /// Where services keep their records and find their instances, when
    /// this host is a cluster node.
    services_cluster: std::sync::OnceLock<Arc<dyn crate::cluster::ClusterServices>>,
    /// Every change of state, numbered, for history and followers.
    events: Arc<EventLog>,
}

/// One instance in memory.
struct Cell {
    record: Mutex<InstanceRecord>,
    /// Serialises lifecycle operations on this instance (an arriving
    /// migration holds it across its steps).
    op: Arc<tokio::sync::Mutex<()>>,
    /// Bumped on every launch, so a stale monitor never acts.
    generation: AtomicU64,
    crash_streak: AtomicU32,
    agent: AgentClient,
    dir: PathBuf,
    console: Arc<ConsoleLog>,
    /// Copies the running VMM's console into `console`.
    collector: Mutex<Option<ConsoleCollector>>,
    /// A config change is being put in force: the splice watchdog holds.
    config_changing: AtomicBool,
    /// Packets the guest's connection tracking dropped, as last reported.
    conntrack_dropped: AtomicU64,
}

/// Marks a cell's config change for as long as it lives.
struct ConfigChanging<'a>(&'a Cell);

impl Drop for ConfigChanging<'_> {
    fn drop(&mut self) {
        self.0.config_changing.store(false, Ordering::SeqCst);
    }
}

impl Cell {
    fn new(dir: PathBuf, record: InstanceRecord) -> Arc<Self> {
        let name = record.instance.spec.name.to_string();
        Arc::new(Cell {
            agent: AgentClient::new(dir.join("agent.sock")).for_instance(&name),
            console: Arc::new(ConsoleLog::open(&dir)),
            collector: Mutex::default(),
            dir,
            record: Mutex::new(record),
            op: Arc::new(tokio::sync::Mutex::new(())),
            generation: AtomicU64::new(0),
            crash_streak: AtomicU32::new(0),
            config_changing: AtomicBool::new(false),
            conntrack_dropped: AtomicU64::new(0),
        })
    }

    /// Holds the splice watchdog off this appliance while its config
    /// changes: services restarting for it are not a failure.
    fn changing_config(&self) -> ConfigChanging<'_> {
        self.config_changing.store(true, Ordering::SeqCst);
        ConfigChanging(self)
    }

    fn lock(&self) -> MutexGuard<'_, InstanceRecord> {
        self.record.lock_unpoisoned()
    }
    fn snapshot(&self) -> Instance {
        self.lock().instance.clone()
    }
    fn volume(&self) -> PathBuf {
        self.dir.join("config.img")
    }
    fn console_socket(&self) -> PathBuf {
        self.dir.join(CONSOLE_SOCKET)
    }

    /// Starts copying the VMM's console of boot `epoch` (replacing, and so
    /// stopping, the collector of an earlier VMM).
    fn collect_console(&self, epoch: u64, connect_for: Duration) {
        let collector = ConsoleCollector::spawn(
            self.console.clone(),
            epoch,
            self.console_socket(),
            connect_for,
            self.lock().instance.spec.name.to_string(),
        );
        *self.collector.lock_unpoisoned() = Some(collector);
    }

    fn stop_collecting_console(&self) {
        self.collector.lock_unpoisoned().take();
    }

    /// Waits until the console output of a VMM that exited is on disk.
    async fn console_flushed(&self) {
        let collector = self.collector.lock_unpoisoned().take();
        if let Some(collector) = collector {
            collector.flushed(CONSOLE_FLUSH_TIMEOUT).await;
        }
    }

    /// The last `lines` lines of the current boot's console.
    fn console_tail(&self, lines: usize) -> String {
        last_lines(&self.console.tail(CONSOLE_TAIL_BYTES), lines)
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
        let events = EventLog::open(store.clone());
        Arc::new(Engine {
            cfg,
            driver,
            net,
            store,
            images,
            events,
            instances: Mutex::default(),
            networks: Mutex::default(),
            splices: Mutex::default(),
            mirrors: Mutex::default(),
            rooms: Mutex::default(),
            alloc: tokio::sync::Mutex::new(()),
            splice_op: tokio::sync::Mutex::new(()),
            room_op: tokio::sync::Mutex::new(()),
            service_op: tokio::sync::Mutex::new(()),
            service_kicks: std::sync::atomic::AtomicBool::new(true),
            service_passes: Mutex::new(BTreeMap::new()),
            service_scalers: Mutex::new(BTreeMap::new()),
            service_warming: Mutex::new(Default::default()),
            snapshots_in_progress: Mutex::default(),
            cluster: std::sync::OnceLock::new(),
            services_cluster: std::sync::OnceLock::new(),
        })
    }

    /// Makes this engine a cluster node's: set once, at daemon start.
    pub fn set_cluster(&self, cluster: Arc<dyn crate::cluster::ClusterHooks>) {
        let _ = self.cluster.set(cluster);
    }

    /// Makes this engine's services the cluster's: set once, at daemon start.
    pub fn set_services_cluster(&self, cluster: Arc<dyn crate::cluster::ClusterServices>) {
        let _ = self.services_cluster.set(cluster);
    }

    /// The cluster's hooks, when this host is a cluster node.
    pub(crate) fn cluster(&self) -> Option<Arc<dyn crate::cluster::ClusterHooks>> {
        self.cluster.get().cloned()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    fn instances_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("instances")
    }

    /// Every instance's cell, taken out of the map so no lock is held while using them.
    fn cells(&self) -> Vec<Arc<Cell>> {
        self.instances.lock_unpoisoned().values().cloned().collect()
    }

    fn cell(&self, name: &str) -> Result<Arc<Cell>, OpError> {
        let map = self.instances.lock_unpoisoned();
        map.iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| OpError::not_found("instance", name))
    }

    fn persist(&self, record: &InstanceRecord) -> Result<(), OpError> {
        blocking(|| self.store.put_instance(record))
            .map_err(|e| OpError::internal("failed to save instance state", e))
    }

    /// Updates a record in memory and in the store; a change of state is
    /// an event.
    fn update(
        &self,
        cell: &Cell,
        f: impl FnOnce(&mut InstanceRecord),
    ) -> Result<Instance, OpError> {
        let mut record = cell.lock();
        let before = record.instance.status.state;
        f(&mut record);
        self.persist(&record)?;
        let instance = record.instance.clone();
        drop(record);
        if instance.status.state != before {
            self.state_changed(&instance);
        }
        Ok(instance)
    }

    /// The event log.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    fn emit(&self, event: NewEvent) {
        self.events.emit(event);
    }

    /// An event about an instance: its id and room filled in.
    fn instance_event(&self, instance: &Instance, action: &str) -> NewEvent {
        NewEvent::new(EventKind::Instance, action, instance.spec.name.as_str())
            .id(&instance.id)
            .room(self.room_of(instance))
    }

    /// The room an instance is in: the one whose LAN or DMZ it is on.
    pub(crate) fn room_of(&self, instance: &Instance) -> Option<String> {
        let rooms = self.rooms.lock_unpoisoned();
        rooms
            .values()
            .find(|room| {
                instance
                    .nics
                    .iter()
                    .any(|nic| nic.network == room.lan || nic.network == room.dmz)
            })
            .map(|room| room.name.to_string())
    }

    /// Blocking. The I/O counters of an instance's drives, from its VMM;
    /// none when it has no live VMM or the VMM does not answer.
    pub(crate) fn drive_stats(&self, name: &str) -> Vec<crate::driver::DriveStats> {
        let process = self
            .cell(name)
            .ok()
            .and_then(|cell| cell.lock().process.clone());
        match process {
            Some(process) if self.driver.is_alive(&process) => {
                self.driver.block_stats(&process).unwrap_or_default()
            }
            _ => vec![],
        }
    }

    /// The event of an instance's new lifecycle state.
    fn state_changed(&self, instance: &Instance) {
        let status = &instance.status;
        let event = match status.state {
            InstanceState::Starting => {
                let event = self.instance_event(instance, "starting");
                match &status.started_from {
                    Some(from) => event.message(format!("from {from}")),
                    None => event,
                }
            }
            InstanceState::Running => {
                let mut event = self.instance_event(instance, "ready");
                if let Some(ms) = status.boot_ms {
                    event = event.detail("boot_ms", ms);
                }
                if let Some(from) = &status.started_from {
                    event = event.detail("from", from.clone());
                }
                event
            }
            InstanceState::Stopping => self.instance_event(instance, "stopping"),
            InstanceState::Stopped => self.instance_event(instance, "stopped"),
            InstanceState::Restarting => self
                .instance_event(instance, "restarting")
                .message(
                    status
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "its VM exited".into()),
                )
                .detail("restarts", status.restarts),
            InstanceState::Failed => self.instance_event(instance, "failed").message(
                status
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "unknown".into()),
            ),
        };
        self.emit(event);
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
        ResolveImageError::Upstream { .. } => OpError::new(ErrorCode::UpstreamError, e.to_string()),
        ResolveImageError::Other { .. } => OpError::new(ErrorCode::Internal, e.to_string()),
    }
}

fn truncate(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    line.chars().take(200).collect()
}

/// The last `lines` lines of a file (within its last 64 KiB), for error reports.
pub fn tail_of(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL_BYTES)));
        let _ = file.take(CONSOLE_TAIL_BYTES).read_to_end(&mut bytes);
    }
    last_lines(&String::from_utf8_lossy(&bytes), lines)
}

fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Guest output is untrusted: keep only well-formed keys and values, and not too many.
fn sanitize_config(values: ConfigValues) -> ConfigValues {
    values
        .into_iter()
        .filter(|(k, v)| validate_config_key(k).is_ok() && validate_config_value(k, v).is_ok())
        .take(256)
        .collect()
}

#[cfg(test)]
mod tests;

pub(crate) use crate::blocking::blocking;
