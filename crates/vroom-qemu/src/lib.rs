//! The QEMU microvm driver. Each VM is one `qemu-system-x86_64 -M microvm`
//! process, started in a jail of its own (see [`jail`] and [`vroom_jail`]) by the jailer
//! subprocess (`vroom __jail`), which detaches it so that it outlives vroomd.
//! QMP and the agent are unix sockets in the instance's run dir. Liveness is
//! watched through a pidfd, which works for processes that are not our
//! children (re-adopted after a daemon restart).

pub mod accel;
pub mod cmdline;
pub mod compat;
pub mod jail;
pub mod qmp;
pub mod replicate;
pub mod state;
pub mod vmm;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::unix::AsyncFd;
use vroom_core::driver::{
    ControlVmError, LaunchSpec, LaunchVmError, LiveStats, VmDriver, VmProcess, VmRunState,
};
use vroom_jail::cgroup;
use vroom_types::{Accel, AccelChoice};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// The device layout of [`cmdline::qemu_args`]: a saved state loads only
/// into the same layout, so bump this whenever the devices change.
pub const MACHINE_LAYOUT: &str = "microvm-1";

/// Whether VMMs run jailed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailMode {
    /// Own uid, cgroup, mount namespace and seccomp filter per VMM.
    Jailed,
    /// QEMU runs as root with the host's file system (`vroom daemon
    /// --no-jail`): for benchmarks and debugging only.
    Unjailed,
}

pub struct QemuDriver {
    /// An explicit binary (from `VROOM_QEMU`); searched on PATH otherwise.
    binary: Option<PathBuf>,
    mode: JailMode,
    /// The program that runs the jailer: this very binary.
    jailer: PathBuf,
}

impl QemuDriver {
    pub fn new(binary: Option<PathBuf>, mode: JailMode) -> Self {
        QemuDriver {
            binary,
            mode,
            jailer: PathBuf::from("/proc/self/exe"),
        }
    }

    /// The QEMU to launch, refused when it is too old or has no microvm
    /// machine. One that prints no version is let through: its own words
    /// when it exits at start say more.
    fn binary(&self) -> Result<PathBuf, LaunchVmError> {
        let binary = vmm::locate(self.binary.as_deref()).map_err(|e| match e {
            vmm::CheckVmmError::Missing { binary } => LaunchVmError::VmmMissing { binary },
            other => LaunchVmError::VmmUnsupported {
                reason: other.to_string(),
            },
        })?;
        match vmm::probe(&binary).check(&binary) {
            Ok(()) | Err(vmm::CheckVmmError::Unknown { .. }) => Ok(binary),
            Err(e) => Err(LaunchVmError::VmmUnsupported {
                reason: e.to_string(),
            }),
        }
    }
}

pub fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
        // The jail sees /usr by its real path, not through /bin -> usr/bin.
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

/// Removes the cgroups of VMMs that ended while no daemon watched them.
pub fn sweep_cgroups() -> Vec<String> {
    cgroup::Hierarchy::detect(Path::new(cgroup::CGROUP_MOUNT))
        .map(|h| h.sweep())
        .unwrap_or_default()
}

fn proc_args(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The run dir a VMM names in its environment ([`vroom_jail::RUN_DIR_ENV`]).
fn proc_run_dir(pid: u32) -> Option<PathBuf> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{}=", vroom_jail::RUN_DIR_ENV);
    environ
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(prefix.as_bytes()))
        .map(|dir| PathBuf::from(String::from_utf8_lossy(dir).into_owned()))
}

fn is_zombie(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'))
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Jailers still launching a VMM under `root`: a daemon killed inside
/// `launch` leaves one behind, and the VMM it starts must be seen.
fn jailers_under(root: &Path) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|pid| {
            let args = proc_args(*pid);
            args.get(1)
                .is_some_and(|a| a == vroom_jail::JAIL_SUBCOMMAND)
                && args
                    .get(2)
                    .is_some_and(|spec| Path::new(spec).starts_with(root))
                && !is_zombie(*pid)
        })
        .collect()
}

#[async_trait]
impl VmDriver for QemuDriver {
    fn resolve_accel(&self, choice: AccelChoice) -> Result<Accel, LaunchVmError> {
        accel::resolve(choice, accel::kvm_status())
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<VmProcess, LaunchVmError> {
        let binary = self.binary()?;
        for path in [&spec.kernel, &spec.initramfs, &spec.root_disk] {
            if !path.is_file() {
                return Err(LaunchVmError::KernelMissing { path: path.clone() });
            }
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LaunchVmError::Io { path, source }
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(io(&spec.run_dir))?;
        let tsc_khz = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| cmdline::host_tsc_khz(&c));
        let isolation = match self.mode {
            JailMode::Jailed => {
                let uid = vroom_jail::pick_uid(
                    vroom_jail::preferred_uid(&spec.instance_id),
                    &vroom_jail::uids_in_use(),
                );
                Some((uid, uid))
            }
            JailMode::Unjailed => None,
        };
        let plan = jail::plan(
            spec,
            &binary,
            vmm::prefix_of(&binary).as_deref(),
            isolation,
            &vroom_jail::HostLayout::probe(),
            tsc_khz,
        );
        let spec_path = spec.run_dir.join("jail.json");
        let json = serde_json::to_vec_pretty(&plan).expect("invariant: a jail spec serializes");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&spec_path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &json))
            .map_err(io(&spec_path))?;
        let output = tokio::process::Command::new(&self.jailer)
            .arg(vroom_jail::JAIL_SUBCOMMAND)
            .arg(&spec_path)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(io(&self.jailer))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let reason = vroom_base::last_line(&stderr)
                .unwrap_or("no error output")
                .trim();
            return Err(LaunchVmError::Vmm {
                reason: reason.trim_start_matches("error: ").to_string(),
            });
        }
        let pid = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse::<u32>()
            .map_err(|_| LaunchVmError::Vmm {
                reason: "the jailer did not report a pid".into(),
            })?;
        tracing::info!(
            instance = %spec.name,
            pid,
            accel = %spec.accel,
            uid = isolation.map(|(uid, _)| uid),
            "qemu started"
        );
        Ok(VmProcess {
            pid,
            accel: spec.accel,
            control_socket: plan.qmp_socket,
        })
    }

    fn is_alive(&self, process: &VmProcess) -> bool {
        // A zombie or a reused pid must not count: the VMM names its run dir
        // in its environment (or, started by an earlier vroom, its socket on
        // its command line).
        if is_zombie(process.pid) {
            return false;
        }
        let run_dir = process.control_socket.parent();
        if run_dir.is_some() && proc_run_dir(process.pid).as_deref() == run_dir {
            return true;
        }
        let needle = process.control_socket.display().to_string();
        proc_args(process.pid).iter().any(|a| a.contains(&needle))
    }

    fn processes_under(&self, root: &Path) -> Vec<(PathBuf, VmProcess)> {
        // Let launches cut short by a killed daemon finish (their jailer
        // gives up after READY_TIMEOUT_SECS) so their VMMs are seen.
        let deadline = Instant::now() + Duration::from_secs(jail::READY_TIMEOUT_SECS + 5);
        while !jailers_under(root).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut found = vec![];
        for pid in pids() {
            let args = proc_args(pid);
            let named = match proc_run_dir(pid) {
                Some(run_dir) => Some((run_dir.join("qmp.sock"), cmdline::vmm_accel(&args))),
                None => cmdline::parse_vmm_args(&args),
            };
            let Some((socket, accel)) = named else {
                continue;
            };
            let Some(run_dir) = socket.parent().filter(|d| d.starts_with(root)) else {
                continue;
            };
            let process = VmProcess {
                pid,
                accel,
                control_socket: socket.clone(),
            };
            if self.is_alive(&process) {
                found.push((run_dir.to_path_buf(), process));
            }
        }
        found
    }

    async fn wait_exit(&self, process: &VmProcess) {
        wait_pid(self, process).await;
        // The VMM is gone: so is everything in its cgroup.
        if let Some(run_dir) = process.control_socket.parent() {
            let name = cgroup::group_name(run_dir);
            let removed = tokio::task::spawn_blocking(move || {
                cgroup::Hierarchy::detect(Path::new(cgroup::CGROUP_MOUNT))
                    .map_or(Ok(()), |h| h.remove(&name))
            })
            .await;
            if let Ok(Err(e)) = removed {
                tracing::warn!(error = %e, "cannot remove a VMM's cgroup; the next daemon start sweeps it");
            }
        }
    }

    async fn power_down(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        qmp::execute(&process.control_socket, "system_powerdown")
            .await
            .map(|_| ())
            .map_err(|e| ControlVmError::Control {
                reason: e.to_string(),
            })
    }

    fn kill(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        if !self.is_alive(process) {
            return Ok(());
        }
        // SAFETY: plain syscall.
        if unsafe { libc::kill(process.pid as libc::pid_t, libc::SIGKILL) } != 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() != Some(libc::ESRCH) {
                return Err(ControlVmError::Signal {
                    pid: process.pid,
                    source,
                });
            }
        }
        Ok(())
    }

    fn save_state(
        &self,
        process: &VmProcess,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, ControlVmError> {
        state::save(&process.control_socket, out).map_err(control)
    }

    fn load_state(
        &self,
        process: &VmProcess,
        input: &mut (dyn std::io::Read + Send),
    ) -> Result<u64, ControlVmError> {
        state::load(&process.control_socket, input).map_err(control)
    }

    fn migrate_out(
        &self,
        process: &VmProcess,
        channel: std::os::fd::BorrowedFd<'_>,
    ) -> Result<LiveStats, ControlVmError> {
        let copy = match process.accel {
            Accel::Tcg => state::Copy::Paused,
            Accel::Kvm => state::Copy::Live,
        };
        let stats = state::migrate_out(&process.control_socket, channel, copy).map_err(control)?;
        Ok(LiveStats {
            total_ms: stats.total_ms,
            downtime_ms: stats.downtime_ms,
            bytes: stats.bytes,
        })
    }

    fn migrate_in(
        &self,
        process: &VmProcess,
        channel: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), ControlVmError> {
        state::migrate_in(&process.control_socket, channel).map_err(control)
    }

    fn cancel_migration(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        state::cancel(&process.control_socket).map_err(control)
    }

    fn resume(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        state::resume(&process.control_socket).map_err(control)
    }

    fn pause(&self, process: &VmProcess) -> Result<(), ControlVmError> {
        state::pause(&process.control_socket).map_err(control)
    }

    fn resize_disk(
        &self,
        process: &VmProcess,
        index: usize,
        bytes: u64,
    ) -> Result<(), ControlVmError> {
        state::resize_disk(
            &process.control_socket,
            &cmdline::data_drive_id(index),
            bytes,
        )
        .map_err(control)
    }

    fn replicate_disk(
        &self,
        process: &VmProcess,
        index: usize,
        conn: std::os::fd::BorrowedFd<'_>,
        export: &str,
    ) -> Result<(), ControlVmError> {
        replicate::start(&process.control_socket, index, conn, export).map_err(control)
    }

    fn resume_replicating(
        &self,
        process: &VmProcess,
        index: usize,
        conn: std::os::fd::BorrowedFd<'_>,
        export: &str,
    ) -> Result<(), ControlVmError> {
        replicate::resume(&process.control_socket, index, conn, export).map_err(control)
    }

    fn block_stats(
        &self,
        process: &VmProcess,
    ) -> Result<Vec<vroom_core::driver::DriveStats>, ControlVmError> {
        let mut qmp = qmp::Session::connect(&process.control_socket).map_err(control)?;
        let stats = qmp
            .execute("query-blockstats", serde_json::Value::Null)
            .map_err(control)?;
        Ok(drive_stats(&stats))
    }

    fn replica_job(
        &self,
        process: &VmProcess,
        index: usize,
    ) -> Result<Option<vroom_core::driver::ReplicaJob>, ControlVmError> {
        let job = replicate::job(&process.control_socket, index).map_err(control)?;
        Ok(job.map(|j| vroom_core::driver::ReplicaJob {
            ready: j.ready,
            failed: j.failed,
            done: j.offset,
            total: j.len,
            dirty: j.dirty,
        }))
    }

    fn stop_replicating(&self, process: &VmProcess, index: usize) -> Result<(), ControlVmError> {
        replicate::stop(&process.control_socket, index).map_err(control)
    }

    fn run_state(&self, process: &VmProcess) -> Result<VmRunState, ControlVmError> {
        let status = state::run_status(&process.control_socket).map_err(control)?;
        Ok(match status.as_str() {
            "running" => VmRunState::Running,
            "paused" | "postmigrate" => VmRunState::Paused,
            "inmigrate" | "prelaunch" => VmRunState::Incoming,
            "finish-migrate" => VmRunState::Saving,
            _ => VmRunState::Other(status),
        })
    }

    fn machine(&self, accel: Accel) -> String {
        let version = vmm::locate(self.binary.as_deref())
            .map(|b| vmm::version_label(&b))
            .unwrap_or_else(|_| "missing".into());
        format!("qemu-{version}/{MACHINE_LAYOUT}/{accel}")
    }
}

fn control(e: impl std::fmt::Display) -> ControlVmError {
    ControlVmError::Control {
        reason: e.to_string(),
    }
}

/// Resolves when the process has exited.
async fn wait_pid(driver: &QemuDriver, process: &VmProcess) {
    // SAFETY: plain syscall; the returned fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, process.pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: pidfd_open returned a fresh fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: `owned` is a valid pidfd that the AsyncFd owns until it is dropped.
        if let Ok(async_fd) = unsafe { AsyncFd::register(owned) } {
            if driver.is_alive(process) {
                let _ = async_fd.readable().await;
            }
            return;
        }
    }
    while driver.is_alive(process) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The drives of a `query-blockstats` reply (drives are `-drive id=...`
/// backends, so each has its name as `device`).
fn drive_stats(reply: &serde_json::Value) -> Vec<vroom_core::driver::DriveStats> {
    reply
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let drive = entry["device"].as_str().filter(|d| !d.is_empty())?;
            let stat = |key: &str| entry["stats"][key].as_u64().unwrap_or(0);
            Some(vroom_core::driver::DriveStats {
                drive: drive.to_string(),
                read_bytes: stat("rd_bytes"),
                written_bytes: stat("wr_bytes"),
                reads: stat("rd_operations"),
                writes: stat("wr_operations"),
                flushes: stat("flush_operations"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn drive_stats_are_read_by_drive_name() {
        let reply = serde_json::json!([
            {"device": "root", "stats": {"rd_bytes": 4096, "wr_bytes": 0, "rd_operations": 1, "wr_operations": 0, "flush_operations": 0}},
            {"device": "vol0", "stats": {"rd_bytes": 0, "wr_bytes": 8192, "rd_operations": 0, "wr_operations": 2, "flush_operations": 1}},
            {"device": "", "node-name": "repl0-nbd-1", "stats": {"wr_bytes": 1}}
        ]);
        let stats = super::drive_stats(&reply);
        assert_eq!(stats.len(), 2);
        assert_eq!(
            (
                stats[1].drive.as_str(),
                stats[1].written_bytes,
                stats[1].writes,
                stats[1].flushes
            ),
            ("vol0", 8192, 2, 1)
        );
    }
    use super::*;

    /// A stand-in VMM: any process with the run dir in its environment.
    fn fake_vmm(run_dir: &Path) -> std::process::Child {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .env_clear()
            .env(vroom_jail::RUN_DIR_ENV, run_dir)
            .spawn()
            .unwrap();
        exec_done(&child);
        child
    }

    /// Waits until `child` runs its program: between fork and exec its
    /// environment is still the parent's.
    fn exec_done(child: &std::process::Child) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read(format!("/proc/{}/cmdline", child.id()))
            .map_or(true, |c| !c.starts_with(b"sleep"))
        {
            assert!(Instant::now() < deadline, "the child never ran sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn vmms_are_known_by_the_run_dir_in_their_environment() {
        let root = tempfile::tempdir().unwrap();
        let run_dir = root.path().join("instances/ab12");
        let mut vmm = fake_vmm(&run_dir);
        let mut stranger = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        exec_done(&stranger);
        let driver = QemuDriver::new(None, JailMode::Jailed);
        let process = |pid: u32, dir: &Path| VmProcess {
            pid,
            accel: Accel::Tcg,
            control_socket: dir.join("qmp.sock"),
        };
        assert!(driver.is_alive(&process(vmm.id(), &run_dir)));
        assert!(
            !driver.is_alive(&process(vmm.id(), &root.path().join("instances/cd34"))),
            "another instance's VMM"
        );
        assert!(
            !driver.is_alive(&process(stranger.id(), &run_dir)),
            "a reused pid lacks the variable"
        );
        assert_eq!(
            driver.processes_under(&root.path().join("instances")),
            vec![(run_dir.clone(), process(vmm.id(), &run_dir))]
        );
        assert!(driver
            .processes_under(&root.path().join("elsewhere"))
            .is_empty());
        vmm.kill().unwrap();
        // Not reaped yet: a zombie is not alive either.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!driver.is_alive(&process(vmm.id(), &run_dir)));
        let _ = vmm.wait();
        let _ = stranger.kill();
        let _ = stranger.wait();
    }
}
