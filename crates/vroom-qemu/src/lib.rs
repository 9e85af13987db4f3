//! The QEMU microvm driver. Each VM is one `qemu-system-x86_64 -M microvm`
//! process, daemonized so that it outlives vroomd, with QMP on a unix socket.
//! Liveness is watched through a pidfd, which works for processes that are
//! not our children (re-adopted after a daemon restart).

pub mod accel;
pub mod cmdline;
pub mod qmp;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::unix::AsyncFd;
use vroom_core::driver::{ControlVmError, LaunchSpec, LaunchVmError, VmDriver, VmProcess};
use vroom_types::{Accel, AccelChoice};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";

pub struct QemuDriver {
    /// An explicit binary (from `VROOM_QEMU`); searched on PATH otherwise.
    binary: Option<PathBuf>,
}

impl QemuDriver {
    pub fn new(binary: Option<PathBuf>) -> Self {
        QemuDriver { binary }
    }

    fn binary(&self) -> Result<PathBuf, LaunchVmError> {
        let missing = || LaunchVmError::VmmMissing {
            binary: QEMU_BINARY.into(),
        };
        match &self.binary {
            Some(path) if path.is_file() => Ok(path.clone()),
            Some(path) => Err(LaunchVmError::VmmMissing {
                binary: path.display().to_string(),
            }),
            None => find_on_path(QEMU_BINARY).ok_or_else(missing),
        }
    }
}

/// The pid QEMU wrote to `qemu.pid` in its run dir once daemonized, waiting
/// up to two seconds for a launch that is still under way.
fn daemonized_pid(run_dir: &Path) -> Option<u32> {
    let pid_file = run_dir.join("qemu.pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if pid.is_some() || std::time::Instant::now() > deadline {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
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
        let qmp_socket = spec.run_dir.join("qmp.sock");
        let pid_file = spec.run_dir.join("qemu.pid");
        for stale in [&qmp_socket, &pid_file, &spec.agent_socket] {
            let _ = std::fs::remove_file(stale);
        }
        let tsc_khz = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| cmdline::host_tsc_khz(&c));
        let output = tokio::process::Command::new(&binary)
            .args(cmdline::qemu_args(spec, &qmp_socket, &pid_file, tsc_khz))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| LaunchVmError::Io {
                path: binary.clone(),
                source,
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let reason = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no error output")
                .trim();
            return Err(LaunchVmError::Vmm {
                reason: format!("{} ({})", reason, output.status),
            });
        }
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| LaunchVmError::Vmm {
                reason: format!("no pid in {}", pid_file.display()),
            })?;
        tracing::info!(instance = %spec.name, pid, accel = %spec.accel, "qemu started");
        Ok(VmProcess {
            pid,
            accel: spec.accel,
            control_socket: qmp_socket,
        })
    }

    fn is_alive(&self, process: &VmProcess) -> bool {
        // A zombie or a reused pid must not count: check the command line names our socket.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", process.pid)).unwrap_or_default();
        let needle = process.control_socket.display().to_string();
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", process.pid)).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        !zombie && String::from_utf8_lossy(&cmdline).contains(&needle)
    }

    fn processes_under(&self, root: &Path) -> Vec<(PathBuf, VmProcess)> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return vec![];
        };
        let mut found = vec![];
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let Some((socket, accel)) = cmdline::parse_vmm_args(&args) else {
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
        // While `-daemonize` runs, the launching parent and the daemon share
        // one command line; the pid file names the daemon once it is up. A
        // launch caught in that moment (a vroomd killed inside `launch`) is
        // given a little time to finish.
        let mut settled: Vec<(PathBuf, VmProcess)> = vec![];
        for (run_dir, process) in found {
            if settled.iter().any(|(d, _)| *d == run_dir) {
                continue;
            }
            let daemon = daemonized_pid(&run_dir);
            if daemon.is_some_and(|pid| pid == process.pid) || daemon.is_none() {
                settled.push((run_dir, process));
            } else if let Some(pid) = daemon {
                let daemon = VmProcess { pid, ..process };
                if self.is_alive(&daemon) {
                    settled.push((run_dir, daemon));
                }
            }
        }
        settled
    }

    async fn wait_exit(&self, process: &VmProcess) {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, process.pid as libc::pid_t, 0) };
        if fd >= 0 {
            // SAFETY: pidfd_open returned a fresh fd that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            // SAFETY: `owned` is a valid pidfd that the AsyncFd owns until it is dropped.
            if let Ok(async_fd) = unsafe { AsyncFd::register(owned) } {
                if self.is_alive(process) {
                    let _ = async_fd.readable().await;
                }
                return;
            }
        }
        while self.is_alive(process) {
            tokio::time::sleep(Duration::from_millis(250)).await;
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
}
