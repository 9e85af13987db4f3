//! In-memory fakes for every seam the engine drives, so that its rollback,
//! restart policy, fencing and recovery are tested without root, QEMU or a
//! network: [`FakeDriver`], [`FakeNetwork`], [`MemStore`], [`FakeImages`].
//!
//! The fake driver also plays the guest: each "VM" serves the agent protocol
//! on its agent socket (health, shutdown) and behaves as its
//! [`GuestBehavior`] says, so the engine's real agent client and monitor run
//! unchanged against it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use vroom_agent_proto::{
    encode_frame, FrameDecoder, GuestReply, HealthReport, HostCommand, Request, Response,
};
use vroom_base::LockExt;
use vroom_types::{
    Accel, AccelChoice, ApplianceSpec, BuildReport, ConfigLog, FileDigest, ImageManifest,
    ImageSummary, KernelRef, Mirror, Network, Room, Splice, MANIFEST_VERSION,
};

use crate::driver::{
    ControlVmError, LaunchSpec, LaunchVmError, LiveStats, VmDriver, VmProcess, VmRunState,
};
use crate::images::{BootImage, BuildFromRecipeError, ImageSource, ResolveImageError};
use crate::net::{HostAddress, MirrorTarget, NetworkBackend, NetworkBackendError};
use crate::store::{InstanceRecord, StateStore, StateStoreError};

/// A fake guest's boot, as it reports it: the kernel's part, init's part.
pub const FAKE_KERNEL_MS: u64 = 300;
pub const FAKE_INIT_MS: u64 = 500;

/// What the next launched guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestBehavior {
    /// Reports ready at once and runs until stopped or killed.
    Ready,
    /// Runs but never reports ready.
    NeverReady,
    /// Writes a kernel panic to its console and exits after this long.
    PanicAtBoot(Duration),
    /// Runs, but its agent never replies (a hung guest: the VMM takes the
    /// connection, nothing inside answers).
    Hung,
    /// Reports ready, then its VMM exits after this long (a guest whose
    /// memory was corrupted panics moments after it ran).
    ReadyThenExit(Duration),
}

struct FakeVm {
    spec: LaunchSpec,
    alive: watch::Sender<bool>,
    /// Paused by `save_state` (or started `incoming`) until `resume`.
    paused: bool,
    /// The "memory" `save_state` writes: the instance id, repeated; what
    /// `load_state` read, for a VM started `incoming`.
    memory: Vec<u8>,
    /// Replication jobs by data disk: READY at once (the fake has no copy
    /// to make), failed when a test says the replica failed.
    replicas: BTreeMap<usize, crate::driver::ReplicaJob>,
}

/// A `VmDriver` whose VMs are tasks. Pids count up from 1000.
pub struct FakeDriver {
    vms: Mutex<BTreeMap<u32, FakeVm>>,
    next_pid: AtomicU32,
    behavior: Mutex<GuestBehavior>,
    /// Makes the next launches fail, as a missing QEMU would.
    pub fail_launch: AtomicBool,
    /// Makes kills fail and leave the VM running: a daemon that dies just
    /// before it kills a VM.
    pub fail_kill: AtomicBool,
    /// Makes the next migrations out fail with the VM left paused: QEMU
    /// stopped it for the copy, and the call failed (a QMP read timed out)
    /// before anything let it run again.
    pub fail_migrate_paused: AtomicBool,
}

impl Default for FakeDriver {
    fn default() -> Self {
        FakeDriver {
            vms: Mutex::default(),
            next_pid: AtomicU32::new(1000),
            behavior: Mutex::new(GuestBehavior::Ready),
            fail_launch: AtomicBool::new(false),
            fail_kill: AtomicBool::new(false),
            fail_migrate_paused: AtomicBool::new(false),
        }
    }
}

impl FakeDriver {
    pub fn set_behavior(&self, behavior: GuestBehavior) {
        *self.behavior.lock_unpoisoned() = behavior;
    }

    /// Pids of the VMs that run now.
    pub fn running(&self) -> Vec<u32> {
        self.vms
            .lock_unpoisoned()
            .iter()
            .filter(|(_, vm)| *vm.alive.borrow())
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Whether VM `pid` is paused.
    pub fn is_paused(&self, pid: u32) -> bool {
        self.vms
            .lock_unpoisoned()
            .get(&pid)
            .is_some_and(|vm| vm.paused)
    }

    /// How many VMs were ever launched.
    pub fn launches(&self) -> usize {
        self.vms.lock_unpoisoned().len()
    }

    /// The launch spec of VM `pid`.
    pub fn spec_of(&self, pid: u32) -> Option<LaunchSpec> {
        self.vms
            .lock_unpoisoned()
            .get(&pid)
            .map(|vm| vm.spec.clone())
    }

    /// The VM dies, as a guest crash or an OOM kill would.
    pub fn crash(&self, pid: u32) {
        if let Some(vm) = self.vms.lock_unpoisoned().get(&pid) {
            vm.alive.send_replace(false);
        }
    }

    /// Starts a VM in `run_dir` that no engine launched: what a daemon killed
    /// between the VMM's start and its record leaves behind.
    pub fn spawn_stray(&self, run_dir: &Path) -> VmProcess {
        let spec = LaunchSpec {
            instance_id: "stray".into(),
            name: "stray".into(),
            run_dir: run_dir.to_path_buf(),
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            cmdline: String::new(),
            acpi: true,
            tcg_tb_mib: None,
            mem_mib: 128,
            cpus: 1,
            accel: Accel::Tcg,
            root_disk: PathBuf::new(),
            config_disk: PathBuf::new(),
            data_disks: vec![],
            nics: vec![],
            agent_socket: run_dir.join("agent.sock"),
            console_socket: run_dir.join(crate::console::CONSOLE_SOCKET),
            incoming: false,
        };
        self.start(spec)
    }

    fn start(&self, spec: LaunchSpec) -> VmProcess {
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        let (alive, watch_alive) = watch::channel(true);
        let behavior = *self.behavior.lock_unpoisoned();
        let process = VmProcess {
            pid,
            accel: spec.accel,
            control_socket: spec.run_dir.join("qmp.sock"),
        };
        let _ = std::fs::create_dir_all(&spec.run_dir);
        let _ = std::fs::remove_file(&spec.agent_socket);
        let listener = tokio::net::UnixListener::bind(&spec.agent_socket).ok();
        let _ = std::fs::remove_file(&spec.console_socket);
        let (served_tx, served) = tokio::sync::oneshot::channel();
        if let Ok(console) = tokio::net::UnixListener::bind(&spec.console_socket) {
            let last_words = match behavior {
                GuestBehavior::PanicAtBoot(_) => PANIC_LAST_WORDS,
                _ => "",
            };
            tokio::spawn(serve_console(
                console,
                last_words,
                alive.subscribe(),
                served_tx,
            ));
        }
        let alive_tx = alive.clone();
        // As a real guest does, it puts its config volume's config in force.
        let volume = spec.config_disk.clone();
        let config = vroom_volume::read_config(&volume)
            .ok()
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| [("greeting".to_string(), "hello".to_string())].into());
        let memory = spec.instance_id.as_bytes().repeat(1024);
        let paused = spec.incoming;
        self.vms.lock_unpoisoned().insert(
            pid,
            FakeVm {
                spec,
                alive,
                paused,
                memory,
                replicas: BTreeMap::new(),
            },
        );
        tokio::spawn(async move {
            match behavior {
                GuestBehavior::PanicAtBoot(after) => {
                    // Dies only once the collector is connected, so that
                    // tests do not race its connect.
                    let _ = tokio::time::timeout(Duration::from_secs(5), served).await;
                    tokio::time::sleep(after).await;
                    alive_tx.send_replace(false);
                }
                GuestBehavior::Ready | GuestBehavior::NeverReady => {
                    if let Some(listener) = listener {
                        serve_agent(
                            listener,
                            alive_tx,
                            behavior == GuestBehavior::Ready,
                            config,
                            volume,
                        )
                        .await;
                    }
                }
                GuestBehavior::ReadyThenExit(after) => {
                    let dying = alive_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        dying.send_replace(false);
                    });
                    if let Some(listener) = listener {
                        serve_agent(listener, alive_tx, true, config, volume).await;
                    }
                }
                GuestBehavior::Hung => {
                    let mut connections = vec![];
                    let mut gone = alive_tx.subscribe();
                    while let Some(listener) = &listener {
                        tokio::select! {
                            Ok((stream, _)) = listener.accept() => connections.push(stream),
                            _ = gone.wait_for(|a| !*a) => break,
                        }
                    }
                }
            }
            drop(watch_alive);
        });
        process
    }
}

/// What a fake guest writes to its console.
pub const BOOT_CONSOLE: &str = "[    0.9] Run /init as init process\nvroom-init: fake guest up\n";
/// What a fake guest that panics at boot writes last.
pub const PANIC_LAST_WORDS: &str =
    "[    1.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n";

/// The VMM's console socket: like QEMU's, it drops output while nobody is
/// connected, so the fake writes its boot text to the first client. Its
/// last words go out only once the "VM" is seen dead, as console output
/// still in flight when the VMM's exit is noticed: an exit classified
/// before the collector flushed misses them.
async fn serve_console(
    listener: tokio::net::UnixListener,
    last_words: &'static str,
    mut alive: watch::Receiver<bool>,
    served: tokio::sync::oneshot::Sender<()>,
) {
    let accepted = tokio::select! {
        a = listener.accept() => a,
        _ = alive.wait_for(|a| !*a) => return,
    };
    let Ok((mut stream, _)) = accepted else {
        return;
    };
    let _ = stream.write_all(BOOT_CONSOLE.as_bytes()).await;
    let _ = served.send(());
    let _ = alive.wait_for(|a| !*a).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = stream.write_all(last_words.as_bytes()).await;
}

/// A value the fake guest's "service check" refuses: a config change
/// carrying it is rejected with nothing saved.
pub const REJECTED_VALUE: &str = "REJECT";

/// A value whose config change the fake guest applies, then restarts its
/// services for [`SLOW_RESTART`]: it fails its health check meanwhile.
pub const SLOW_RESTART_VALUE: &str = "RESTART-SLOWLY";
/// How long the fake guest's services take to restart after
/// [`SLOW_RESTART_VALUE`].
pub const SLOW_RESTART: Duration = Duration::from_millis(1500);

/// The data volumes the fake guest "mounted": those its instance file
/// names, as a guest that knows data volumes reports them.
fn mounted_volumes(config_volume: &Path) -> Vec<vroom_agent_proto::VolumeUsage> {
    let Ok(instance) = vroom_volume::read_instance(config_volume) else {
        return vec![];
    };
    instance
        .volumes
        .into_iter()
        .map(|v| vroom_agent_proto::VolumeUsage {
            name: v.name,
            path: v.path,
            total_bytes: 16 << 20,
            used_bytes: 1 << 20,
            available_bytes: 15 << 20,
            inodes_total: 4096,
            inodes_available: 4000,
            read_only: v.read_only,
            frozen: false,
        })
        .collect()
}

/// The guest's half of the agent protocol: health, config changes (checked:
/// a value equal to [`REJECTED_VALUE`] is refused) and shutdown. The guest
/// starts with `config`.
async fn serve_agent(
    listener: tokio::net::UnixListener,
    alive: watch::Sender<bool>,
    ready: bool,
    config: BTreeMap<String, String>,
    volume: PathBuf,
) {
    let config = Arc::new(Mutex::new(config));
    let restarting_until: Arc<Mutex<Option<tokio::time::Instant>>> = Arc::default();
    // Frozen by `Freeze` until `Resume`, and says so in its health.
    let frozen: Arc<Mutex<bool>> = Arc::default();
    let mut gone = alive.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = gone.wait_for(|a| !*a) => return,
        };
        let Ok((mut stream, _)) = accepted else {
            return;
        };
        let alive = alive.clone();
        let config = config.clone();
        let restarting_until = restarting_until.clone();
        let frozen = frozen.clone();
        let volume = volume.clone();
        tokio::spawn(async move {
            let mut gone = alive.subscribe();
            let mut decoder = FrameDecoder::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = tokio::select! {
                    n = stream.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    },
                    _ = gone.wait_for(|a| !*a) => return,
                };
                decoder.push(&buf[..n]);
                while let Ok(Some(frame)) = decoder.next_frame() {
                    let Ok(req) = serde_json::from_slice::<Request>(&frame) else {
                        continue;
                    };
                    let waiting = match req.command {
                        HostCommand::WaitReady { within_ms } => Some(within_ms),
                        _ => None,
                    };
                    let reply = match req.command {
                        HostCommand::Health | HostCommand::WaitReady { .. } => {
                            GuestReply::Health(HealthReport {
                                ready: ready
                                    && restarting_until
                                        .lock_unpoisoned()
                                        .is_none_or(|until| tokio::time::Instant::now() >= until),
                                uptime_ms: 1,
                                services: vec![],
                                config: config.lock_unpoisoned().clone(),
                                config_error: None,
                                frozen: *frozen.lock_unpoisoned(),
                                conntrack: None,
                                volumes: mounted_volumes(&volume),
                                boot: Some(vroom_agent_proto::BootTimes {
                                    init_ms: FAKE_KERNEL_MS,
                                    ready_ms: FAKE_KERNEL_MS + FAKE_INIT_MS,
                                }),
                            })
                        }
                        HostCommand::ApplyConfig { values } => {
                            if values.values().any(|v| v == REJECTED_VALUE) {
                                GuestReply::ConfigRejected {
                                    message: "the service's check refused the staged config".into(),
                                    output: format!("bad value {REJECTED_VALUE}"),
                                }
                            } else {
                                if values.values().any(|v| v == SLOW_RESTART_VALUE) {
                                    *restarting_until.lock_unpoisoned() =
                                        Some(tokio::time::Instant::now() + SLOW_RESTART);
                                }
                                *config.lock_unpoisoned() = values.clone();
                                // Saved as vroom-init saves it, on its volume.
                                let _ = vroom_volume::write_config(&volume, &values);
                                GuestReply::ConfigApplied { values }
                            }
                        }
                        HostCommand::Shutdown => GuestReply::ShuttingDown,
                        HostCommand::FreezeVolumes => GuestReply::VolumesFrozen {
                            paths: mounted_volumes(&volume)
                                .into_iter()
                                .map(|v| v.path)
                                .collect(),
                            thaw_after_ms: vroom_agent_proto::VOLUME_FREEZE_BOUND_MS,
                        },
                        HostCommand::ThawVolumes => GuestReply::VolumesThawed {
                            paths: mounted_volumes(&volume)
                                .into_iter()
                                .map(|v| v.path)
                                .collect(),
                        },
                        HostCommand::GrowVolume { .. } => GuestReply::VolumeGrown {
                            before_bytes: 1 << 20,
                            after_bytes: 2 << 20,
                        },
                        HostCommand::Freeze => {
                            *frozen.lock_unpoisoned() = true;
                            GuestReply::Frozen
                        }
                        HostCommand::Resume { reload_volume, .. } => {
                            *frozen.lock_unpoisoned() = false;
                            GuestReply::Resumed {
                                identity_changed: reload_volume,
                            }
                        }
                        _ => GuestReply::Error {
                            message: "not supported by the fake guest".into(),
                        },
                    };
                    if let (Some(within_ms), GuestReply::Health(report)) = (waiting, &reply) {
                        if !report.ready {
                            // A guest not ready yet answers a `WaitReady`
                            // at its end (here at most 100 ms).
                            tokio::time::sleep(Duration::from_millis(within_ms.min(100))).await;
                        }
                    }
                    let shutdown = reply == GuestReply::ShuttingDown;
                    let payload = serde_json::to_vec(&Response { id: req.id, reply })
                        .expect("invariant: replies serialize");
                    let frame = encode_frame(&payload).expect("invariant: small frame");
                    let _ = stream.write_all(&frame).await;
                    if shutdown {
                        alive.send_replace(false);
                        return;
                    }
                }
            }
        });
    }
}

#[async_trait]
impl VmDriver for FakeDriver {
    fn resolve_accel(&self, choice: AccelChoice) -> Result<Accel, LaunchVmError> {
        match choice {
            AccelChoice::Kvm => Err(LaunchVmError::KvmUnavailable {
                reason: "the fake driver has no KVM".into(),
            }),
            _ => Ok(Accel::Tcg),
        }
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<VmProcess, LaunchVmError> {
        if self.fail_launch.load(Ordering::SeqCst) {
            return Err(LaunchVmError::VmmMissing {
                binary: "fake-vmm".into(),
            });
        }
        Ok(self.start(spec.clone()))
    }

    fn is_alive(&self, process: &VmProcess) -> bool {
        self.vms
            .lock_unpoisoned()
            .get(&process.pid)
            .is_some_and(|vm| {
                *vm.alive.borrow() && vm.spec.run_dir.join("qmp.sock") == process.control_socket
            })
    }

    fn processes_under(&self, root: &Path) -> Vec<(PathBuf, VmProcess)> {
        self.vms
            .lock_unpoisoned()
            .iter()
            .filter(|(_, vm)| *vm.alive.borrow() && vm.spec.run_dir.starts_with(root))
            .map(|(pid, vm)| {
                (
                    vm.spec.run_dir.clone(),
                    VmProcess {
                        pid: *pid,
                        accel: vm.spec.accel,
                        control_socket: vm.spec.run_dir.join("qmp.sock"),
                    },
                )
            })
            .collect()
    }

    async fn wait_exit(&self, process: &VmProcess) {
        let rx = self
            .vms
            .lock_unpoisoned()
            .get(&process.pid)
            .map(|vm| vm.alive.subscribe());
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(|alive| !*alive).await;
        }
    }

    async fn power_down(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        self.crash(process.pid);
        Ok(())
    }

    fn kill(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        if self.fail_kill.load(Ordering::SeqCst) {
            return Err(fake_control("the fake driver was told to fail kills"));
        }
        self.crash(process.pid);
        Ok(())
    }

    fn save_state(
        &self,
        process: &VmProcess,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, ControlVmError> {
        let memory = {
            let mut vms = self.vms.lock_unpoisoned();
            let vm = fake_vm(&mut vms, process)?;
            vm.paused = true;
            vm.memory.clone()
        };
        out.write_all(&memory).map_err(fake_control)?;
        Ok(memory.len() as u64)
    }

    fn load_state(
        &self,
        process: &VmProcess,
        input: &mut (dyn std::io::Read + Send),
    ) -> Result<u64, ControlVmError> {
        let mut memory = vec![];
        input.read_to_end(&mut memory).map_err(fake_control)?;
        let mut vms = self.vms.lock_unpoisoned();
        let vm = fake_vm(&mut vms, process)?;
        if !vm.spec.incoming {
            return Err(fake_control("the VM was not started to receive a state"));
        }
        vm.memory = memory;
        Ok(vm.memory.len() as u64)
    }

    fn migrate_out(
        &self,
        process: &VmProcess,
        channel: std::os::fd::BorrowedFd<'_>,
    ) -> Result<LiveStats, ControlVmError> {
        if self.fail_migrate_paused.load(Ordering::SeqCst) {
            fake_vm(&mut self.vms.lock_unpoisoned(), process)?.paused = true;
            return Err(fake_control("the QMP reply timed out"));
        }
        let mut out = std::fs::File::from(channel.try_clone_to_owned().map_err(fake_control)?);
        let memory = self.save_state(process, &mut out)?;
        Ok(LiveStats {
            total_ms: 1,
            downtime_ms: 1,
            bytes: memory,
        })
    }

    fn migrate_in(
        &self,
        process: &VmProcess,
        channel: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), ControlVmError> {
        let mut input = std::fs::File::from(channel.try_clone_to_owned().map_err(fake_control)?);
        self.load_state(process, &mut input).map(|_| ())
    }

    fn cancel_migration(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        fake_vm(&mut self.vms.lock_unpoisoned(), process).map(|_| ())
    }

    fn resume(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        fake_vm(&mut self.vms.lock_unpoisoned(), process)?.paused = false;
        Ok(())
    }

    fn pause(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        fake_vm(&mut self.vms.lock_unpoisoned(), process)?.paused = true;
        Ok(())
    }

    fn resize_disk(
        &self,
        process: &VmProcess,
        index: usize,
        bytes: u64,
    ) -> Result<(), ControlVmError> {
        let mut vms = self.vms.lock_unpoisoned();
        let vm = fake_vm(&mut vms, process)?;
        match vm.spec.data_disks.get_mut(index) {
            Some(disk) => {
                disk.bytes = bytes;
                Ok(())
            }
            None => Err(fake_control(format!("no data disk {index}"))),
        }
    }

    fn replicate_disk(
        &self,
        process: &VmProcess,
        index: usize,
        _conn: std::os::fd::BorrowedFd<'_>,
        _export: &str,
    ) -> Result<(), ControlVmError> {
        let mut vms = self.vms.lock_unpoisoned();
        let vm = fake_vm(&mut vms, process)?;
        let Some(disk) = vm.spec.data_disks.get(index) else {
            return Err(fake_control(format!("no data disk {index}")));
        };
        let job = crate::driver::ReplicaJob {
            ready: true,
            failed: false,
            done: disk.bytes,
            total: disk.bytes,
            dirty: 0,
        };
        vm.replicas.insert(index, job);
        Ok(())
    }

    fn resume_replicating(
        &self,
        process: &VmProcess,
        index: usize,
        _conn: std::os::fd::BorrowedFd<'_>,
        _export: &str,
    ) -> Result<(), ControlVmError> {
        let mut vms = self.vms.lock_unpoisoned();
        match fake_vm(&mut vms, process)?.replicas.get_mut(&index) {
            Some(job) => {
                job.failed = false;
                job.ready = true;
                Ok(())
            }
            None => Err(fake_control(format!("no replication of disk {index}"))),
        }
    }

    fn replica_job(
        &self,
        process: &VmProcess,
        index: usize,
    ) -> Result<Option<crate::driver::ReplicaJob>, ControlVmError> {
        let mut vms = self.vms.lock_unpoisoned();
        Ok(fake_vm(&mut vms, process)?.replicas.get(&index).copied())
    }

    fn stop_replicating(&self, process: &VmProcess, index: usize) -> Result<(), ControlVmError> {
        let mut vms = self.vms.lock_unpoisoned();
        fake_vm(&mut vms, process)?.replicas.remove(&index);
        Ok(())
    }

    fn run_state(&self, process: &VmProcess) -> Result<VmRunState, ControlVmError> {
        let mut vms = self.vms.lock_unpoisoned();
        let vm = fake_vm(&mut vms, process)?;
        Ok(if vm.paused && vm.spec.incoming {
            VmRunState::Incoming
        } else if vm.paused {
            VmRunState::Paused
        } else {
            VmRunState::Running
        })
    }

    fn machine(&self, accel: Accel) -> String {
        format!("fake/{accel}")
    }
}

fn fake_vm<'a>(
    vms: &'a mut BTreeMap<u32, FakeVm>,
    process: &VmProcess,
) -> Result<&'a mut FakeVm, ControlVmError> {
    vms.get_mut(&process.pid)
        .filter(|vm| *vm.alive.borrow())
        .ok_or_else(|| fake_control("the VM is not running"))
}

fn fake_control(e: impl std::fmt::Display) -> ControlVmError {
    ControlVmError::Control {
        reason: e.to_string(),
    }
}

impl FakeDriver {
    /// What a VM holds as its "memory" (see [`VmDriver::save_state`]).
    pub fn memory_of(&self, pid: u32) -> Option<Vec<u8>> {
        self.vms
            .lock_unpoisoned()
            .get(&pid)
            .map(|vm| vm.memory.clone())
    }
}

/// A `NetworkBackend` that keeps bridges and tap attachments in memory.
#[derive(Default)]
pub struct FakeNetwork {
    pub bridges: Mutex<BTreeSet<String>>,
    /// Host interfaces vroom did not create (leftovers, other software).
    pub foreign: Mutex<BTreeSet<String>>,
    pub attached: Mutex<BTreeMap<String, String>>,
    /// Makes tap attachment fail, as a vanished bridge would.
    pub fail_attach: AtomicBool,
    /// The bridges whose rules `apply_rules` replaced, in order.
    pub rules_applied: Mutex<Vec<String>>,
    /// Taps taken off every bridge.
    pub detached: Mutex<BTreeSet<String>>,
    /// Each mirrored tap and where its copies go.
    pub mirrors: Mutex<BTreeMap<String, Vec<MirrorTarget>>>,
    /// Each network joined to other hosts: its VNI and peers.
    pub overlays: Mutex<BTreeMap<String, (u32, Vec<std::net::Ipv4Addr>)>>,
    /// The host's routes (besides those of the bridges made here).
    pub routes: Mutex<Vec<crate::net::HostRoute>>,
    /// The subnet of each bridge made here.
    pub bridge_subnets: Mutex<BTreeMap<String, ipnet::Ipv4Net>>,
}

#[async_trait]
impl NetworkBackend for FakeNetwork {
    async fn create_network(&self, network: &Network) -> Result<(), NetworkBackendError> {
        if self.foreign.lock_unpoisoned().contains(&network.bridge)
            || self.bridges.lock_unpoisoned().contains(&network.bridge)
        {
            return Err(NetworkBackendError::InterfaceExists {
                name: network.bridge.clone(),
            });
        }
        self.bridges
            .lock_unpoisoned()
            .insert(network.bridge.clone());
        self.bridge_subnets
            .lock_unpoisoned()
            .insert(network.bridge.clone(), network.subnet);
        Ok(())
    }

    async fn apply_rules(&self, network: &Network) -> Result<(), NetworkBackendError> {
        self.rules_applied
            .lock_unpoisoned()
            .push(network.bridge.clone());
        Ok(())
    }

    async fn delete_network(&self, network: &Network) -> Result<(), NetworkBackendError> {
        self.bridges.lock_unpoisoned().remove(&network.bridge);
        self.bridge_subnets
            .lock_unpoisoned()
            .remove(&network.bridge);
        self.foreign.lock_unpoisoned().remove(&network.bridge);
        Ok(())
    }

    async fn attach_tap(&self, tap: &str, bridge: &str) -> Result<(), NetworkBackendError> {
        if self.fail_attach.load(Ordering::SeqCst)
            || !self.bridges.lock_unpoisoned().contains(bridge)
        {
            return Err(NetworkBackendError::Failed {
                action: format!("attach {tap} to {bridge}"),
                reason: "no such bridge".into(),
            });
        }
        self.attached
            .lock_unpoisoned()
            .insert(tap.to_string(), bridge.to_string());
        self.detached.lock_unpoisoned().remove(tap);
        Ok(())
    }

    async fn move_tap(&self, tap: &str, bridge: Option<&str>) -> Result<(), NetworkBackendError> {
        match bridge {
            Some(bridge) => self.attach_tap(tap, bridge).await,
            None => {
                self.attached.lock_unpoisoned().remove(tap);
                self.detached.lock_unpoisoned().insert(tap.to_string());
                Ok(())
            }
        }
    }

    async fn create_segment(&self, bridge: &str) -> Result<(), NetworkBackendError> {
        self.bridges.lock_unpoisoned().insert(bridge.to_string());
        Ok(())
    }

    async fn delete_segment(&self, bridge: &str) -> Result<(), NetworkBackendError> {
        self.bridges.lock_unpoisoned().remove(bridge);
        self.attached.lock_unpoisoned().retain(|_, b| b != bridge);
        Ok(())
    }

    async fn set_mirrors(
        &self,
        tap: &str,
        targets: &[MirrorTarget],
    ) -> Result<(), NetworkBackendError> {
        let mut mirrors = self.mirrors.lock_unpoisoned();
        if targets.is_empty() {
            mirrors.remove(tap);
        } else {
            mirrors.insert(tap.to_string(), targets.to_vec());
        }
        Ok(())
    }

    async fn set_overlay(
        &self,
        network: &Network,
        vni: u32,
        _local: std::net::Ipv4Addr,
        peers: &[std::net::Ipv4Addr],
    ) -> Result<(), NetworkBackendError> {
        self.overlays
            .lock()
            .unwrap()
            .insert(network.name.to_string(), (vni, peers.to_vec()));
        Ok(())
    }

    async fn compile_filter(&self, expr: &str) -> Result<String, NetworkBackendError> {
        if expr.contains("bad") {
            return Err(NetworkBackendError::Failed {
                action: "compile the filter".into(),
                reason: "syntax error".into(),
            });
        }
        Ok(format!("bpf({expr})"))
    }

    async fn host_addresses(&self) -> Result<Vec<HostAddress>, NetworkBackendError> {
        Ok(vec![])
    }

    /// The routes set, and the connected route of every bridge made here,
    /// as the kernel would have them.
    async fn host_routes(&self) -> Result<Vec<crate::net::HostRoute>, NetworkBackendError> {
        let mut routes = self.routes.lock_unpoisoned().clone();
        for (bridge, subnet) in self.bridge_subnets.lock_unpoisoned().iter() {
            routes.push(crate::net::HostRoute {
                destination: *subnet,
                gateway: None,
                interface: bridge.clone(),
            });
        }
        Ok(routes)
    }
}

/// A `StateStore` in memory.
#[derive(Default)]
pub struct MemStore {
    instances: Mutex<BTreeMap<String, InstanceRecord>>,
    networks: Mutex<BTreeMap<String, Network>>,
    config_logs: Mutex<BTreeMap<String, ConfigLog>>,
    splices: Mutex<BTreeMap<String, Splice>>,
    mirrors: Mutex<BTreeMap<String, Mirror>>,
    rooms: Mutex<BTreeMap<String, Room>>,
    services: Mutex<BTreeMap<String, vroom_types::ServiceRecord>>,
    volumes: Mutex<BTreeMap<String, vroom_types::Volume>>,
    events: Mutex<std::collections::VecDeque<vroom_types::Event>>,
    /// Makes instance deletions fail: a daemon that dies just before it
    /// deletes a record.
    pub fail_instance_deletes: AtomicBool,
}

impl StateStore for MemStore {
    fn put_instance(&self, record: &InstanceRecord) -> Result<(), StateStoreError> {
        self.instances
            .lock_unpoisoned()
            .insert(record.instance.spec.name.to_string(), record.clone());
        Ok(())
    }
    fn delete_instance(&self, name: &str) -> Result<(), StateStoreError> {
        if self.fail_instance_deletes.load(Ordering::SeqCst) {
            return Err(StateStoreError {
                path: PathBuf::from("memory"),
                reason: "the fake store was told to fail deletions".into(),
            });
        }
        self.instances.lock_unpoisoned().remove(name);
        self.config_logs.lock_unpoisoned().remove(name);
        Ok(())
    }
    fn instances(&self) -> Result<Vec<InstanceRecord>, StateStoreError> {
        Ok(self.instances.lock_unpoisoned().values().cloned().collect())
    }
    fn put_network(&self, network: &Network) -> Result<(), StateStoreError> {
        self.networks
            .lock_unpoisoned()
            .insert(network.name.to_string(), network.clone());
        Ok(())
    }
    fn delete_network(&self, name: &str) -> Result<(), StateStoreError> {
        self.networks.lock_unpoisoned().remove(name);
        Ok(())
    }
    fn networks(&self) -> Result<Vec<Network>, StateStoreError> {
        Ok(self.networks.lock_unpoisoned().values().cloned().collect())
    }
    fn config_log(&self, name: &str) -> Result<Option<ConfigLog>, StateStoreError> {
        Ok(self.config_logs.lock_unpoisoned().get(name).cloned())
    }
    fn put_config_log(&self, name: &str, log: &ConfigLog) -> Result<(), StateStoreError> {
        self.config_logs
            .lock_unpoisoned()
            .insert(name.to_string(), log.clone());
        Ok(())
    }
    fn commit_config(
        &self,
        record: &InstanceRecord,
        log: &ConfigLog,
    ) -> Result<(), StateStoreError> {
        let name = record.instance.spec.name.to_string();
        self.instances
            .lock_unpoisoned()
            .insert(name.clone(), record.clone());
        self.config_logs.lock_unpoisoned().insert(name, log.clone());
        Ok(())
    }
    fn put_splice(&self, splice: &Splice) -> Result<(), StateStoreError> {
        self.splices
            .lock_unpoisoned()
            .insert(splice.appliance.to_string(), splice.clone());
        Ok(())
    }
    fn delete_splice(&self, appliance: &str) -> Result<(), StateStoreError> {
        self.splices.lock_unpoisoned().remove(appliance);
        Ok(())
    }
    fn splices(&self) -> Result<Vec<Splice>, StateStoreError> {
        Ok(self.splices.lock_unpoisoned().values().cloned().collect())
    }
    fn put_mirror(&self, mirror: &Mirror) -> Result<(), StateStoreError> {
        self.mirrors
            .lock_unpoisoned()
            .insert(mirror.id.clone(), mirror.clone());
        Ok(())
    }
    fn delete_mirror(&self, id: &str) -> Result<(), StateStoreError> {
        self.mirrors.lock_unpoisoned().remove(id);
        Ok(())
    }
    fn mirrors(&self) -> Result<Vec<Mirror>, StateStoreError> {
        Ok(self.mirrors.lock_unpoisoned().values().cloned().collect())
    }
    fn put_room(&self, room: &Room) -> Result<(), StateStoreError> {
        self.rooms
            .lock_unpoisoned()
            .insert(room.name.to_string(), room.clone());
        Ok(())
    }
    fn delete_room(&self, name: &str) -> Result<(), StateStoreError> {
        self.rooms.lock_unpoisoned().remove(name);
        Ok(())
    }
    fn rooms(&self) -> Result<Vec<Room>, StateStoreError> {
        Ok(self.rooms.lock_unpoisoned().values().cloned().collect())
    }
    fn put_service(&self, service: &vroom_types::ServiceRecord) -> Result<(), StateStoreError> {
        self.services
            .lock_unpoisoned()
            .insert(service.spec.name.to_string(), service.clone());
        Ok(())
    }
    fn delete_service(&self, name: &str) -> Result<(), StateStoreError> {
        self.services.lock_unpoisoned().remove(name);
        Ok(())
    }
    fn services(&self) -> Result<Vec<vroom_types::ServiceRecord>, StateStoreError> {
        Ok(self.services.lock_unpoisoned().values().cloned().collect())
    }
    fn put_volume(&self, volume: &vroom_types::Volume) -> Result<(), StateStoreError> {
        self.volumes
            .lock_unpoisoned()
            .insert(volume.name.to_string(), volume.clone());
        Ok(())
    }
    fn delete_volume(&self, name: &str) -> Result<(), StateStoreError> {
        self.volumes.lock_unpoisoned().remove(name);
        Ok(())
    }
    fn volumes(&self) -> Result<Vec<vroom_types::Volume>, StateStoreError> {
        Ok(self.volumes.lock_unpoisoned().values().cloned().collect())
    }
    fn append_event(&self, event: &vroom_types::Event, keep: usize) -> Result<(), StateStoreError> {
        let mut events = self.events.lock_unpoisoned();
        events.push_back(event.clone());
        while events.len() > keep {
            events.pop_front();
        }
        Ok(())
    }
    fn events(&self) -> Result<Vec<vroom_types::Event>, StateStoreError> {
        Ok(self.events.lock_unpoisoned().iter().cloned().collect())
    }
}

/// An `ImageSource` with images whose files are never read: `hello`,
/// `router` (NIC roles wan, lan, dmz) and `bump` (outside, inside).
pub struct FakeImages {
    image: BootImage,
    router: BootImage,
    bump: BootImage,
    /// Images a test adds ([`FakeImages::add`]).
    extra: Mutex<Vec<BootImage>>,
}

impl FakeImages {
    /// Adds an image like `hello` with these NIC roles and seed config
    /// (no schema: exactly the seed's keys are known).
    pub fn add(&self, name: &str, roles: &[&str], seed: &[(&str, &str)]) {
        let mut appliance = self.image.manifest.appliance.clone();
        appliance.nic_roles = roles.iter().map(|r| r.to_string()).collect();
        appliance.seed_config = seed
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let flavor = self.image.manifest.kernel.flavor;
        self.add_appliance(name, appliance, flavor);
    }

    /// Adds an image like `hello` with this guest part (writable
    /// directories, declared volumes...), built for this kernel.
    pub fn add_appliance(
        &self,
        name: &str,
        appliance: ApplianceSpec,
        flavor: vroom_types::KernelFlavor,
    ) {
        let mut image = self.image.clone();
        image.manifest.kernel.flavor = flavor;
        image.manifest.name = name.into();
        image.id = format!("{:0>64}", hex_name(name));
        image.manifest.appliance = appliance;
        self.extra.lock_unpoisoned().push(image);
    }

    /// Adds an image imported from an OCI image (`vroom image import`)
    /// with this guest part.
    pub fn add_imported(&self, name: &str, appliance: ApplianceSpec) {
        let flavor = self.image.manifest.kernel.flavor;
        self.add_appliance(name, appliance, flavor);
        let mut extra = self.extra.lock_unpoisoned();
        let image = extra.last_mut().expect("invariant: just added");
        image.manifest.oci = Some(vroom_types::OciOrigin {
            reference: format!("oci:/fake:{name}"),
            digest: format!("sha256:{}", "1".repeat(64)),
            config_digest: format!("sha256:{}", "2".repeat(64)),
            layers: vec![],
            exposed_ports: vec![],
            volumes: vec![],
        });
    }

    fn all(&self) -> Vec<BootImage> {
        let mut all = vec![self.image.clone(), self.router.clone(), self.bump.clone()];
        all.extend(self.extra.lock_unpoisoned().clone());
        all
    }
}

fn hex_name(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

impl Default for FakeImages {
    fn default() -> Self {
        let digest = |file: &str| FileDigest {
            file: file.into(),
            sha256: "0".repeat(64),
            size: 1,
        };
        let manifest = ImageManifest {
            manifest_version: MANIFEST_VERSION,
            name: "hello".into(),
            version: "1.0".into(),
            kernel: KernelRef {
                package: "linux-image-fake".into(),
                version: "1".into(),
                release: "6.1.0-fake".into(),
                sha256: "0".repeat(64),
                flavor: Default::default(),
                id: None,
            },
            initramfs: digest("initramfs.cpio"),
            rootfs: digest("rootfs.erofs"),
            cmdline: String::new(),
            default_mem_mib: 128,
            min_mem_mib: 64,
            appliance: ApplianceSpec {
                seed_config: [("greeting".to_string(), "hello".to_string())].into(),
                ..ApplianceSpec::default()
            },
            packages: vec![],
            init_sha256: None,
            oci: None,
        };
        let boot = |id: char, manifest: ImageManifest| BootImage {
            id: id.to_string().repeat(64),
            manifest,
            kernel: PathBuf::from("/fake/vmlinuz"),
            initramfs: PathBuf::from("/fake/initramfs.cpio"),
            rootfs: PathBuf::from("/fake/rootfs.erofs"),
        };
        let mut router = manifest.clone();
        router.name = "router".into();
        router.appliance.nic_roles = vec!["wan".into(), "lan".into(), "dmz".into()];
        let mut bump = manifest.clone();
        bump.name = "bump".into();
        bump.appliance.nic_roles = vec!["outside".into(), "inside".into()];
        // Like an image on Debian's kernel: more than the least vroom boots.
        bump.min_mem_mib = 128;
        FakeImages {
            image: boot('f', manifest),
            router: boot('e', router),
            bump: boot('d', bump),
            extra: Mutex::new(vec![]),
        }
    }
}

impl ImageSource for FakeImages {
    fn build(
        &self,
        _recipe: &Path,
        _update: bool,
        _kernel: Option<&str>,
        _owner: Option<u32>,
        _progress: &mut dyn FnMut(&str, &str),
    ) -> Result<BuildReport, BuildFromRecipeError> {
        Err(BuildFromRecipeError::Build {
            message: "the fake image source does not build".into(),
        })
    }

    fn resolve(&self, reference: &str) -> Result<BootImage, ResolveImageError> {
        if let Some(image) = self
            .all()
            .into_iter()
            .find(|i| reference == i.manifest.name || reference == i.id)
        {
            Ok(image)
        } else {
            Err(ResolveImageError::NotFound {
                reference: reference.into(),
                catalog: "hello".into(),
            })
        }
    }

    fn find(&self, reference: &str) -> Result<ImageSummary, ResolveImageError> {
        self.list()?
            .into_iter()
            .find(|i| i.name == reference || i.id == reference)
            .ok_or_else(|| ResolveImageError::NotFound {
                reference: reference.into(),
                catalog: "hello".into(),
            })
    }

    fn list(&self) -> Result<Vec<ImageSummary>, ResolveImageError> {
        Ok(self
            .all()
            .into_iter()
            .map(|image| ImageSummary {
                id: image.id.clone(),
                name: image.manifest.name.clone(),
                version: image.manifest.version.clone(),
                size: 2,
                manifest: image.manifest.clone(),
                current: true,
            })
            .collect())
    }

    fn remove(&self, _id: &str) -> Result<(), ResolveImageError> {
        Ok(())
    }
}

/// An engine on fakes, with handles to them, in its own temporary data dir.
pub struct TestEngine {
    pub engine: Arc<crate::Engine>,
    pub driver: Arc<FakeDriver>,
    pub net: Arc<FakeNetwork>,
    pub store: Arc<MemStore>,
    pub images: Arc<FakeImages>,
    pub dir: PathBuf,
}

impl TestEngine {
    /// A fresh engine over the same fakes and data dir: a daemon restart.
    pub fn restarted(&self) -> Arc<crate::Engine> {
        crate::Engine::new(
            config(&self.dir),
            self.driver.clone(),
            self.net.clone(),
            self.store.clone(),
            self.images.clone(),
        )
    }
}

fn config(dir: &Path) -> crate::EngineConfig {
    crate::EngineConfig {
        data_dir: dir.to_path_buf(),
        iface_prefix: "tf".into(),
        stop_timeout: Duration::from_secs(2),
        host_mem_mib: 4096,
        host_cpus: 2,
    }
}

impl TestEngine {
    pub fn new(dir: &Path) -> Self {
        let driver = Arc::new(FakeDriver::default());
        let net = Arc::new(FakeNetwork::default());
        let store = Arc::new(MemStore::default());
        let images = Arc::new(FakeImages::default());
        let engine = crate::Engine::new(
            config(dir),
            driver.clone(),
            net.clone(),
            store.clone(),
            images.clone(),
        );
        TestEngine {
            engine,
            driver,
            net,
            store,
            images,
            dir: dir.to_path_buf(),
        }
    }
}

/// A request to run `image` as `name` with one NIC on `lan` per role given
/// (`None` for a NIC without a role), 1 CPU and the image's memory.
pub fn run_request(name: &str, image: &str, nics: &[Option<&str>]) -> vroom_types::RunRequest {
    vroom_types::RunRequest {
        spec: vroom_types::InstanceSpec {
            name: vroom_types::Name::new(name).unwrap(),
            image: image.into(),
            mem_mib: None,
            cpus: 1,
            nics: nics
                .iter()
                .map(|role| vroom_types::NicSpec {
                    network: vroom_types::Name::new("lan").unwrap(),
                    ip: None,
                    role: role.map(|r| vroom_types::Name::new(r).unwrap()),
                })
                .collect(),
            accel: AccelChoice::Auto,
            config_volume_kib: None,
            ephemeral: false,
            volumes: Vec::new(),
        },
        ready_timeout_secs: Some(30),
        from_snapshot: None,
        cold: false,
        placement: Default::default(),
        env: Default::default(),
    }
}
