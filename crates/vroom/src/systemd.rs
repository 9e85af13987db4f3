//! vroomd under a service manager, without libsystemd:
//!
//! - **Notifications** (`sd_notify(3)`): one datagram such as `READY=1` to
//!   the unix socket named by `NOTIFY_SOCKET` (a path, or an abstract name
//!   when it starts with `@`). `vroomd.service` is `Type=notify`: systemd
//!   counts the unit started when `READY=1` arrives.
//! - **Socket activation** (`sd_listen_fds(3)`): when `LISTEN_PID` is this
//!   process, `LISTEN_FDS` descriptors from fd 3 on are listening sockets
//!   opened by the manager (`vroomd.socket`, or `systemd-socket-activate`).
//!   vroomd takes exactly one, a unix stream socket, and serves on it
//!   instead of binding its own.
//!
//! Both are read once, in [`Launch::from_env`], before any thread starts:
//! the variables are removed then, so that no child (the jailer, QEMU)
//! inherits them.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;

use vroom_types::{DaemonInfo, DaemonStarter};

use vroom::session::STARTED_BY_ENV;

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// How this vroomd was launched, taken from its environment.
#[derive(Debug)]
pub struct Launch {
    /// The listening socket systemd passed, if any.
    pub listener: Option<UnixListener>,
    pub notify_socket: Option<String>,
    pub started_by: DaemonStarter,
    pub unit: Option<String>,
}

impl Launch {
    /// Reads (and removes) the service manager's variables.
    pub fn from_env() -> anyhow::Result<Launch> {
        let var = |name: &str| std::env::var(name).ok();
        let listen_pid = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok());
        let listen_fds = var("LISTEN_FDS").and_then(|n| n.parse::<usize>().ok());
        let notify_socket = var("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        let invocation = var("INVOCATION_ID").is_some();
        let cli = var(STARTED_BY_ENV).as_deref() == Some("cli");
        for name in [
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
            STARTED_BY_ENV,
        ] {
            std::env::remove_var(name);
        }
        let listener = match (listen_pid, listen_fds) {
            (Some(pid), Some(count)) if pid == std::process::id() && count > 0 => {
                if count != 1 {
                    anyhow::bail!("systemd passed {count} sockets; vroomd serves exactly one (check ListenStream= in vroomd.socket)");
                }
                Some(take_listener(LISTEN_FDS_START)?)
            }
            _ => None,
        };
        let started_by = starter(listener.is_some(), notify_socket.is_some(), invocation, cli);
        let unit = (started_by == DaemonStarter::Systemd)
            .then(own_unit)
            .flatten();
        Ok(Launch {
            listener,
            notify_socket,
            started_by,
            unit,
        })
    }

    /// What `GET /v1/version` says about this daemon.
    pub fn info(&self, vmm: vroom_types::VmmInfo) -> DaemonInfo {
        DaemonInfo {
            vmm: Some(vmm),
            pid: std::process::id(),
            started_by: self.started_by,
            unit: self.unit.clone(),
            socket_activated: self.listener.is_some(),
        }
    }

    /// Tells the service manager `state` (`READY=1`, `STOPPING=1`); a
    /// daemon no manager watches has nothing to tell.
    pub fn notify(&self, state: &str) {
        let Some(socket) = &self.notify_socket else {
            return;
        };
        if let Err(e) = notify(socket, state) {
            tracing::warn!(socket, state, error = %e, "cannot notify the service manager");
        }
    }
}

/// Who started a daemon, from what its environment holds: a socket or a
/// notification socket passed, or systemd's invocation id, mean systemd;
/// the CLI marks the daemons it starts.
pub fn starter(listener: bool, notify: bool, invocation: bool, cli: bool) -> DaemonStarter {
    if listener || notify || invocation {
        DaemonStarter::Systemd
    } else if cli {
        DaemonStarter::Cli
    } else {
        DaemonStarter::Manual
    }
}

/// Sends one notification datagram.
pub fn notify(socket: &str, state: &str) -> std::io::Result<()> {
    let addr = match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None => SocketAddr::from_pathname(socket)?,
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// Takes ownership of a passed descriptor once it is known to be a
/// listening unix stream socket, and keeps it from children.
fn take_listener(fd: RawFd) -> anyhow::Result<UnixListener> {
    let int_opt = |level, name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    let unix_stream = int_opt(libc::SOL_SOCKET, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && int_opt(libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1);
    if !unix_stream {
        anyhow::bail!("the descriptor systemd passed is not a listening unix stream socket");
    }
    // SAFETY: fcntl on a descriptor just checked to be an open socket.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the manager passed this descriptor to this process alone
    // (LISTEN_PID), and nothing else in it owns fd 3.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// The unit this process runs in, from its cgroup (`…/vroomd.service`).
fn own_unit() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_of_cgroup(&cgroup)
}

/// The service unit named by the last component of a `/proc/PID/cgroup`
/// line's path, if it is one.
pub fn unit_of_cgroup(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .filter_map(|line| line.rsplit(':').next())
        .filter_map(|path| path.rsplit('/').next())
        .find(|name| name.ends_with(".service"))
        .map(str::to_string)
}

/// The path a passed listener is bound to.
pub fn listener_path(listener: &UnixListener) -> Option<PathBuf> {
    listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_started_a_daemon() {
        use DaemonStarter::*;
        // (socket passed, notify socket, invocation id, marked by the CLI)
        let cases = [
            ((true, false, false, false), Systemd),
            ((false, true, false, false), Systemd),
            ((false, false, true, false), Systemd),
            ((false, true, true, true), Systemd),
            ((false, false, false, true), Cli),
            ((false, false, false, false), Manual),
        ];
        for ((l, n, i, c), want) in cases {
            assert_eq!(starter(l, n, i, c), want, "{:?}", (l, n, i, c));
        }
    }

    #[test]
    fn unit_from_cgroup() {
        let cases = [
            ("0::/system.slice/vroomd.service\n", Some("vroomd.service")),
            (
                "12:pids:/system.slice/vroomd.service\n0::/system.slice/vroomd.service\n",
                Some("vroomd.service"),
            ),
            ("0::/user.slice/user-0.slice/session-3.scope\n", None),
            ("0::/\n", None),
        ];
        for (cgroup, want) in cases {
            assert_eq!(unit_of_cgroup(cgroup).as_deref(), want, "{cgroup:?}");
        }
    }

    /// A datagram arrives on a path socket and on an abstract one.
    #[test]
    fn notifies_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("vroom-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        notify(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
