//! The VM driver seam. QEMU microvm is the first driver; Firecracker or Cloud
//! Hypervisor would implement the same trait.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use vroom_types::{Accel, AccelChoice};

/// Everything a driver needs to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub instance_id: String,
    pub name: String,
    /// Holds the driver's sockets and pid file.
    pub run_dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// ACPI tables for the guest. vroom's own kernel has no ACPI: the VMM
    /// then describes the devices on the kernel command line.
    pub acpi: bool,
    /// Under TCG, the translation cache in MiB; `None`: the driver's
    /// choice for the memory size (benchmarks set it).
    pub tcg_tb_mib: Option<u32>,
    pub mem_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    /// Read-only root filesystem image.
    pub root_disk: PathBuf,
    /// The config volume, read-write.
    pub config_disk: PathBuf,
    /// Data volumes, in the order the guest numbers them
    /// ([`vroom_agent_proto::volume::data_disk_serial`]).
    pub data_disks: Vec<DataDisk>,
    pub nics: Vec<LaunchNic>,
    /// The unix socket of the agent port.
    pub agent_socket: PathBuf,
    /// Where the VMM serves the serial console as a listening unix socket;
    /// vroomd connects and writes the console log itself.
    pub console_socket: PathBuf,
    /// Start paused, waiting for a saved state ([`VmDriver::load_state`])
    /// instead of booting.
    pub incoming: bool,
}

/// A data volume's file as the VMM gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDisk {
    pub path: PathBuf,
    pub read_only: bool,
    /// The file's size: the largest offset the VMM writes.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchNic {
    /// The tap device the VMM creates; vroom attaches it to the bridge.
    pub tap: String,
    pub mac: String,
}

/// A running VMM process. Stored with the instance so that a restarted
/// daemon can re-adopt it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    pub pid: u32,
    pub accel: Accel,
    /// Identifies the process as ours when re-adopting (guards against pid reuse).
    pub control_socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchVmError {
    #[error("{binary} not found; run `vroom setup` to install it")]
    VmmMissing { binary: String },
    /// Too old, or without the microvm machine: the reason names the binary
    /// and its version.
    #[error("{reason}")]
    VmmUnsupported { reason: String },
    #[error("kernel {path} not found; run `vroom setup` to fetch it")]
    KernelMissing { path: PathBuf },
    #[error("KVM was requested but is not usable here: {reason}")]
    KvmUnavailable { reason: String },
    #[error("the VMM failed to start: {reason}")]
    Vmm { reason: String },
    #[error("failed to prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlVmError {
    #[error("failed to signal VMM process {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM control channel: {reason}")]
    Control { reason: String },
}

/// One drive's I/O since its VM started, as the VMM counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriveStats {
    /// The drive: `root`, `config`, or a data volume's `volN`.
    pub drive: String,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
}

#[async_trait]
pub trait VmDriver: Send + Sync {
    /// Picks the accelerator for a request, or says why the requested one is unusable.
    fn resolve_accel(&self, choice: AccelChoice) -> Result<Accel, LaunchVmError>;

    /// Starts a VM whose process outlives this daemon.
    async fn launch(&self, spec: &LaunchSpec) -> Result<VmProcess, LaunchVmError>;

    /// Whether a process recorded earlier still runs and is still ours.
    fn is_alive(&self, process: &VmProcess) -> bool;

    /// Every live VMM process whose run dir lies under `root`, with that run
    /// dir: how a restarted daemon finds a VM it launched but never recorded,
    /// and VMs whose record is gone.
    fn processes_under(&self, root: &Path) -> Vec<(PathBuf, VmProcess)>;

    /// Resolves when the process has exited.
    async fn wait_exit(&self, process: &VmProcess);

    /// Asks the VM to power down (ACPI), for guests whose agent does not answer.
    async fn power_down(&self, process: &VmProcess) -> Result<(), ControlVmError>;

    /// Ends the process at once.
    fn kill(&self, process: &VmProcess) -> Result<(), ControlVmError>;

    /// Blocking. Pauses the VM if it runs and writes its memory and device
    /// state to `out`; returns the bytes written. The VM stays paused until
    /// [`VmDriver::resume`].
    fn save_state(
        &self,
        process: &VmProcess,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, ControlVmError>;

    /// Blocking. Feeds a VM launched with `incoming` the state read from
    /// `input`; it stays paused until [`VmDriver::resume`].
    fn load_state(
        &self,
        process: &VmProcess,
        input: &mut (dyn std::io::Read + Send),
    ) -> Result<u64, ControlVmError>;

    /// Blocking. Live migration out: streams the running VM into `channel`
    /// (a socket connected to the destination's VMM), pausing it only for
    /// the last pages. On success the VM stays paused; on failure it runs on.
    fn migrate_out(
        &self,
        process: &VmProcess,
        channel: std::os::fd::BorrowedFd<'_>,
    ) -> Result<LiveStats, ControlVmError>;

    /// Blocking. Live migration in: a VM launched with `incoming` reads its
    /// state from `channel`; it stays paused until [`VmDriver::resume`].
    fn migrate_in(
        &self,
        process: &VmProcess,
        channel: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), ControlVmError>;

    /// Blocking. Ends a migration out that nobody will finish (its
    /// vroomd died mid-way; the stream went on between the VMMs), and waits
    /// until the VMM no longer migrates.
    fn cancel_migration(&self, process: &VmProcess) -> Result<(), ControlVmError>;

    /// Blocking. Lets a paused VM run.
    fn resume(&self, process: &VmProcess) -> Result<(), ControlVmError>;

    /// Blocking. Stops the VM's CPUs (its devices finish what is in flight);
    /// [`VmDriver::resume`] lets it run again.
    fn pause(&self, process: &VmProcess) -> Result<(), ControlVmError>;

    /// Blocking. Tells the VM that data volume `index`
    /// ([`LaunchSpec::data_disks`]) now has `bytes` (its file grew).
    fn resize_disk(
        &self,
        process: &VmProcess,
        index: usize,
        bytes: u64,
    ) -> Result<(), ControlVmError>;

    /// Blocking. Starts mirroring data volume `index` synchronously into
    /// the NBD export `export` reached over `conn` (a connected stream the
    /// VMM takes over): a full copy first, then every write goes to both
    /// before the guest sees it complete.
    fn replicate_disk(
        &self,
        process: &VmProcess,
        index: usize,
        conn: std::os::fd::BorrowedFd<'_>,
        export: &str,
    ) -> Result<(), ControlVmError>;

    /// Blocking. Gives the paused replication of data volume `index` (its
    /// replica failed) a new connection to the same replica and resumes
    /// it: only what the replica missed is sent.
    fn resume_replicating(
        &self,
        process: &VmProcess,
        index: usize,
        conn: std::os::fd::BorrowedFd<'_>,
        export: &str,
    ) -> Result<(), ControlVmError>;

    /// Blocking. The I/O counters of each of the VM's drives (for metrics);
    /// none from a driver that cannot tell.
    fn block_stats(&self, _process: &VmProcess) -> Result<Vec<DriveStats>, ControlVmError> {
        Ok(vec![])
    }

    /// Blocking. The replication of data volume `index`, if it runs.
    fn replica_job(
        &self,
        process: &VmProcess,
        index: usize,
    ) -> Result<Option<ReplicaJob>, ControlVmError>;

    /// Blocking. Ends the replication of data volume `index`: its writes
    /// are local only from now on.
    fn stop_replicating(&self, process: &VmProcess, index: usize) -> Result<(), ControlVmError>;

    /// Blocking. What the VMM is doing.
    fn run_state(&self, process: &VmProcess) -> Result<VmRunState, ControlVmError>;

    /// Names the machine a saved state fits (VMM version, device layout,
    /// accelerator): a state saved on another machine is not loaded.
    fn machine(&self, accel: Accel) -> String;
}

/// A data volume's replication, as the VMM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaJob {
    /// The first copy is done: every write reaches both copies before the
    /// guest sees it complete.
    pub ready: bool,
    /// The replica failed a write: the job stopped and writes are local.
    pub failed: bool,
    /// Bytes copied of `total`.
    pub done: u64,
    pub total: u64,
    /// Bytes the replica does not have yet.
    pub dirty: u64,
}

impl ReplicaJob {
    /// Every write the guest saw complete is on the replica, and every new
    /// one will be before it completes.
    pub fn in_sync(&self) -> bool {
        self.ready && !self.failed && self.dirty == 0 && self.done == self.total
    }
}

/// What a finished live migration measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveStats {
    pub total_ms: u64,
    /// How long the VM was stopped at the switch-over.
    pub downtime_ms: u64,
    pub bytes: u64,
}

/// What a VMM is doing, as far as snapshots care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmRunState {
    Running,
    /// Paused, by a snapshot or after writing its state out.
    Paused,
    /// Waiting for, or reading, a saved state.
    Incoming,
    /// Writing its state out.
    Saving,
    Other(String),
}
