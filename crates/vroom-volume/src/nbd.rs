//! NBD servers for data volumes: one `qemu-nbd` process per export, started
//! by vroomd and found again by its pid file.
//!
//! **Why qemu-nbd.** It is the standard server (`nbdinfo`, `nbdcopy`,
//! `qemu-img` and the kernel's `nbd-client` all speak to it), it serves a
//! raw file as is, and `--fork` returns only once the socket listens (or
//! with the reason it cannot), so a taken address is an error at once and
//! nothing is left running.
//!
//! **Finding a server again.** Each server is started with
//! `--pid-file=<exports dir>/<name>.pid`: that argument, in the process's
//! command line, is how vroomd tells its servers from any other process
//! (a reused pid, another vroom's), after a restart too
//! ([`server_pid`], [`servers_under`]). Signals go only to a process whose
//! command line names the pid file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vroom_types::ExportAddress;

/// Clients one export serves at once.
pub const MAX_CLIENTS: u32 = 8;

/// How long a server has to stop on SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What to serve, and where.
#[derive(Debug)]
pub struct Serve<'a> {
    /// The raw image.
    pub file: &'a Path,
    pub export_name: &'a str,
    pub listen: &'a ExportAddress,
    /// Written by the server; it names the server (see the module docs).
    pub pid_file: &'a Path,
    /// Clients may write (an import); read-only otherwise.
    pub writable: bool,
    /// Each write reaches the disk before the server answers
    /// (`--cache=writethrough`): a replica, whose client never forwards
    /// its guest's flushes.
    pub durable: bool,
    /// Clients served at once.
    pub clients: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeNbdError {
    #[error("cannot listen on {listen}: the address is in use")]
    AddressTaken { listen: String },
    #[error("cannot start qemu-nbd: {reason}")]
    Start { reason: String },
}

/// The command line of [`serve`].
pub fn command(s: &Serve<'_>) -> Vec<String> {
    let mut args = vec![
        "--fork".to_string(),
        format!("--pid-file={}", s.pid_file.display()),
        "--persistent".into(),
        format!("--shared={}", s.clients),
        "--format=raw".into(),
        format!("--export-name={}", s.export_name),
    ];
    if s.durable {
        args.push("--cache=writethrough".into());
    }
    if s.writable {
        // Zeros written become holes: an imported volume stays sparse.
        args.extend(["--discard=unmap".into(), "--detect-zeroes=unmap".into()]);
    } else {
        args.push("--read-only".into());
    }
    match s.listen {
        ExportAddress::Unix(path) => args.push(format!("--socket={path}")),
        ExportAddress::Tcp(addr) => {
            args.push(format!("--bind={}", addr.ip()));
            args.push(format!("--port={}", addr.port()));
        }
    }
    args.push(s.file.display().to_string());
    args
}

/// Starts a server and returns its pid once it listens. Nothing is left
/// running on an error.
pub fn serve(s: &Serve<'_>) -> Result<u32, ServeNbdError> {
    let failed = |reason: String| ServeNbdError::Start { reason };
    let _ = fs::remove_file(s.pid_file);
    let out = Command::new("qemu-nbd")
        .args(command(s))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| failed(format!("{e} (install qemu-utils)")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("Address already in use") {
            return Err(ServeNbdError::AddressTaken {
                listen: s.listen.to_string(),
            });
        }
        return Err(failed(vroom_base::failure_line(&out, "failed")));
    }
    match server_pid(s.pid_file) {
        Some(pid) => Ok(pid),
        None => Err(failed(format!(
            "it started but {} names no server of ours",
            s.pid_file.display()
        ))),
    }
}

/// The pid of the live server whose pid file is `pid_file`, if any.
pub fn server_pid(pid_file: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    names_pid_file(pid, pid_file).then_some(pid)
}

/// Whether process `pid` is a qemu-nbd started with `pid_file`.
fn names_pid_file(pid: u32, pid_file: &Path) -> bool {
    pid_file_of(pid).is_some_and(|p| p == pid_file)
}

/// The pid file a qemu-nbd process was started with.
fn pid_file_of(pid: u32) -> Option<PathBuf> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    let program = args.next()?;
    if !program.ends_with(b"qemu-nbd") {
        return None;
    }
    args.find_map(|a| {
        let path = a.strip_prefix(b"--pid-file=")?;
        Some(PathBuf::from(String::from_utf8_lossy(path).into_owned()))
    })
}

/// Every live server whose pid file is in `dir`, with its pid file.
pub fn servers_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let pid_file = pid_file_of(pid)?;
            (pid_file.parent() == Some(dir)).then_some((pid, pid_file))
        })
        .collect()
}

/// Stops server `pid` (SIGTERM, then SIGKILL after 5 s) if it is still the
/// one `pid_file` names, and removes the pid file. A writable server
/// flushes what it was given before it exits on SIGTERM.
pub fn stop(pid: u32, pid_file: &Path) -> io::Result<()> {
    let signal = |sig| match rustix::process::Pid::from_raw(pid as i32) {
        Some(p) if names_pid_file(pid, pid_file) => {
            rustix::process::kill_process(p, sig).map_err(io::Error::from)
        }
        _ => Ok(()),
    };
    signal(rustix::process::Signal::TERM)?;
    let started = Instant::now();
    while names_pid_file(pid, pid_file) {
        if started.elapsed() > STOP_TIMEOUT {
            signal(rustix::process::Signal::KILL)?;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    while names_pid_file(pid, pid_file) && started.elapsed() < STOP_TIMEOUT * 2 {
        std::thread::sleep(Duration::from_millis(20));
    }
    match fs::remove_file(pid_file) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_its_pid_file_and_is_read_only_unless_asked() {
        let listen = ExportAddress::parse("tcp:127.0.0.1:10809").unwrap();
        let s = Serve {
            file: Path::new("/d/volumes/ab/volume.img"),
            export_name: "files",
            listen: &listen,
            pid_file: Path::new("/d/exports/files.pid"),
            writable: false,
            durable: false,
            clients: MAX_CLIENTS,
        };
        let args = command(&s);
        for want in [
            "--fork",
            "--pid-file=/d/exports/files.pid",
            "--read-only",
            "--persistent",
            "--shared=8",
            "--format=raw",
            "--export-name=files",
            "--bind=127.0.0.1",
            "--port=10809",
        ] {
            assert!(args.iter().any(|a| a == want), "{want}: {args:?}");
        }
        assert_eq!(args.last().unwrap(), "/d/volumes/ab/volume.img");
        let unix = ExportAddress::parse("unix:/d/exports/files.sock").unwrap();
        let args = command(&Serve {
            listen: &unix,
            writable: true,
            durable: true,
            clients: 1,
            ..s
        });
        assert!(!args.iter().any(|a| a == "--read-only"), "{args:?}");
        assert!(args.iter().any(|a| a == "--socket=/d/exports/files.sock"));
        assert!(args.iter().any(|a| a == "--detect-zeroes=unmap"));
        // A replica writes through, for its one client.
        assert!(args.iter().any(|a| a == "--cache=writethrough"), "{args:?}");
        assert!(args.iter().any(|a| a == "--shared=1"), "{args:?}");
        assert!(!command(&s).iter().any(|a| a.starts_with("--cache")));
    }

    #[test]
    fn a_pid_that_is_not_our_server_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("x.pid");
        // This test's own pid: alive, but not a qemu-nbd naming the file.
        fs::write(&pid_file, std::process::id().to_string()).unwrap();
        assert_eq!(server_pid(&pid_file), None);
        assert!(servers_under(dir.path()).is_empty());
        stop(std::process::id(), &pid_file).unwrap();
        assert!(!pid_file.exists());
    }
}
