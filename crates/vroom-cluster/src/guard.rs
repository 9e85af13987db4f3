//! The self-fencing guard: a small process per node, apart from vroomd,
//! that kills the node's VMMs once the node's lease may be about to expire.
//!
//! vroomd tells it, for every acknowledged keepalive, when that keepalive
//! was sent (`ack <monotonic ns>` lines on a unix socket). etcd cannot expire
//! the lease earlier than `TTL` after that instant, so the guard kills every
//! process in the node's cgroup scope at `sent + TTL - 0.5 s` unless a later
//! acknowledgement arrives first. A frozen, partitioned or dead vroomd sends
//! none: its VMs are gone before any other node may claim them. A vroomd
//! restarted quickly reconnects and its acknowledgements re-arm the guard.
//!
//! vroomd also says `fence <monotonic ns>` when it learns that its lease is
//! gone before the guard's deadline (etcd 3.4 revokes every lease when a
//! stalled leader comes back, whatever was renewed meanwhile:
//! etcd-io/etcd#15247): the guard fences at once, and acknowledgements of
//! keepalives sent before that instant lift nothing.
//!
//! The guard is never armed before the first acknowledgement. Once the
//! deadline has passed it stays fenced: anything that appears in the scope
//! afterwards (a VMM whose launch began just before the deadline) is killed
//! too, until an acknowledgement of a later keepalive moves the deadline
//! into the future again.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::{fence_deadline_ns, monotonic_ns};
use vroom_base::LockExt;

/// vroomd's side: tells the guard of each acknowledged keepalive, starting
/// the guard when none answers.
pub struct GuardLink {
    socket: PathBuf,
    scope: String,
    log: PathBuf,
    stream: Mutex<Option<UnixStream>>,
}

impl GuardLink {
    pub fn new(data_dir: &Path, scope: &str) -> GuardLink {
        GuardLink {
            socket: data_dir.join("guard.sock"),
            scope: scope.to_string(),
            log: data_dir.join("guard.log"),
            stream: Mutex::new(None),
        }
    }

    /// Connects to the running guard, or starts one and connects.
    pub fn ensure(&self) -> std::io::Result<()> {
        let mut stream = self.stream.lock_unpoisoned();
        if stream.is_none() {
            *stream = Some(self.connect_or_spawn()?);
        }
        Ok(())
    }

    /// Fences now: the node learnt that its lease is gone (etcd revoked it
    /// early, as etcd 3.4 does when a stalled leader comes back). Nothing
    /// runs in the scope until a keepalive sent after now is acknowledged.
    pub fn fence_now(&self) -> std::io::Result<()> {
        self.send(&format!("fence {}\n", monotonic_ns()))
    }

    /// Arms (or re-arms) the guard for a keepalive sent at `sent_ns` and
    /// acknowledged.
    pub fn ack(&self, sent_ns: u64) -> std::io::Result<()> {
        self.send(&format!("ack {sent_ns}\n"))
    }

    fn send(&self, line: &str) -> std::io::Result<()> {
        let mut stream = self.stream.lock_unpoisoned();
        if let Some(s) = stream.as_mut() {
            if s.write_all(line.as_bytes()).is_ok() {
                return Ok(());
            }
        }
        let mut fresh = self.connect_or_spawn()?;
        fresh.write_all(line.as_bytes())?;
        *stream = Some(fresh);
        Ok(())
    }

    fn connect_or_spawn(&self) -> std::io::Result<UnixStream> {
        if let Ok(stream) = self.connect() {
            return Ok(stream);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = std::process::Command::new("/proc/self/exe");
        command
            .arg("__guard")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--scope")
            .arg(&self.scope)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe and touches no memory of ours:
        // the guard leaves vroomd's session and process group, so that what
        // stops vroomd does not stop it.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let started = std::time::Instant::now();
        loop {
            if let Ok(stream) = self.connect() {
                // Reaped by a thread of ours when it ends (a guard never
                // ends while vroomd runs, unless killed).
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return Ok(stream);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(std::io::Error::other(format!(
                    "the guard exited at start ({status}); see {}",
                    self.log.display()
                )));
            }
            if started.elapsed() > Duration::from_secs(3) {
                let _ = child.kill();
                return Err(std::io::Error::other("the guard did not start within 3 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn connect(&self) -> std::io::Result<UnixStream> {
        let stream = UnixStream::connect(&self.socket)?;
        stream.set_write_timeout(Some(Duration::from_millis(200)))?;
        Ok(stream)
    }
}

/// The guard's state: when to fence, if armed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Arming {
    deadline_ns: Option<u64>,
    /// When vroomd last said its lease is gone: acknowledgements of
    /// keepalives sent before are for that lease, and lift nothing.
    lost_at_ns: u64,
}

impl Arming {
    /// A keepalive sent at `sent_ns` was acknowledged.
    pub fn ack(&mut self, sent_ns: u64) {
        if sent_ns <= self.lost_at_ns {
            return;
        }
        let deadline = fence_deadline_ns(sent_ns);
        self.deadline_ns = Some(self.deadline_ns.map_or(deadline, |d| d.max(deadline)));
    }

    /// vroomd learnt at `now_ns` that its lease is gone: fenced from now.
    pub fn lost(&mut self, now_ns: u64) {
        self.lost_at_ns = self.lost_at_ns.max(now_ns);
        self.deadline_ns = Some(self.lost_at_ns);
    }

    /// Whether nothing may run in the scope now: armed, and the deadline
    /// of the latest acknowledgement has passed. It stays so until a later
    /// keepalive is acknowledged.
    pub fn fenced(&self, now_ns: u64) -> bool {
        self.deadline_ns.is_some_and(|deadline| now_ns >= deadline)
    }

    pub fn armed(&self) -> bool {
        self.deadline_ns.is_some()
    }
}

/// Runs the guard (the `vroom guard` process) until killed.
pub fn run(socket: &Path, scope: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    let group = format!("{}/{scope}", vroom_jail::cgroup::PARENT);
    eprintln!("guard: watching {} for cgroup {group}", socket.display());
    let mut readers: Vec<BufReader<UnixStream>> = vec![];
    let mut arming = Arming::default();
    let mut was_fenced = false;
    loop {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(true)?;
                    readers.push(BufReader::new(stream));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        readers.retain_mut(|reader| loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => return false,
                Ok(_) => {
                    if let Some(sent) = line.trim().strip_prefix("ack ") {
                        if let Ok(sent) = sent.parse::<u64>() {
                            arming.ack(sent);
                        }
                    } else if let Some(at) = line.trim().strip_prefix("fence ") {
                        if let Ok(at) = at.parse::<u64>() {
                            eprintln!("guard: vroomd says its lease is gone: fencing now");
                            arming.lost(at);
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        });
        let fenced = arming.fenced(monotonic_ns());
        if fenced {
            let killed = fence(&group);
            if !was_fenced {
                eprintln!(
                    "guard: no keepalive acknowledged in time: killed {killed} process(es) of {group}"
                );
            } else if killed > 0 {
                eprintln!("guard: killed {killed} process(es) started in {group} while fenced");
            }
        }
        was_fenced = fenced;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills every process under `group` until none is left (or 2 s pass).
pub fn fence(group: &str) -> usize {
    let Ok(hierarchy) =
        vroom_jail::cgroup::Hierarchy::detect(Path::new(vroom_jail::cgroup::CGROUP_MOUNT))
    else {
        return 0;
    };
    // cgroup v2 kills a whole subtree at once where the kernel has it.
    for dir in hierarchy.dirs(group) {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    }
    let mut killed = std::collections::BTreeSet::new();
    let started = std::time::Instant::now();
    loop {
        let pids = vroom_jail::cgroup::processes_under(&hierarchy, group);
        if pids.is_empty() || started.elapsed() > Duration::from_secs(2) {
            break;
        }
        for pid in pids {
            // SAFETY: plain syscall; the pid was just read from the node's cgroup.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_ttl_minus_margin_after_the_send_until_a_later_ack() {
        let mut arming = Arming::default();
        assert!(!arming.fenced(u64::MAX), "never armed: never fences");
        arming.ack(1_000_000_000);
        assert!(arming.armed());
        assert!(!arming.fenced(2_499_999_999));
        assert!(arming.fenced(2_500_000_000));
        assert!(
            arming.fenced(3_000_000_000),
            "it stays fenced: a VMM started late is killed too"
        );
        arming.ack(500_000_000);
        assert!(arming.fenced(3_000_000_000), "an older ack never lifts it");
        arming.ack(3_000_000_000);
        assert!(!arming.fenced(3_000_000_000), "a later ack lifts it");
        arming.ack(2_000_000_000);
        assert!(
            !arming.fenced(4_499_999_999),
            "an older ack never shortens it"
        );
        assert!(arming.fenced(4_500_000_000));
    }

    #[test]
    fn a_lease_said_lost_fences_at_once_until_a_keepalive_sent_later() {
        let mut arming = Arming::default();
        arming.ack(1_000_000_000);
        assert!(!arming.fenced(1_200_000_000));
        arming.lost(1_200_000_000);
        assert!(arming.fenced(1_200_000_000), "at once, before the deadline");
        arming.ack(1_100_000_000);
        assert!(
            arming.fenced(1_300_000_000),
            "an ack of a keepalive sent before the loss (the lost lease's) lifts nothing"
        );
        arming.ack(1_200_000_000);
        assert!(arming.fenced(1_300_000_000));
        arming.ack(1_250_000_000);
        assert!(
            !arming.fenced(1_300_000_000),
            "the new lease's first ack does"
        );
        let mut fresh = Arming::default();
        fresh.lost(5);
        assert!(fresh.fenced(5), "a guard never armed fences when told");
    }
}
