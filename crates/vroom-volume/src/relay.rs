//! The NBD relay on a replicated volume's replication connection: it holds
//! a replica's faults until vroomd has recorded them.
//!
//! **Why.** The primary's QEMU mirrors the volume synchronously into an NBD
//! export on the replica node. QEMU 7.2 acknowledges a guest write with only
//! the local copy as soon as that target *errors* (the replica server died,
//! the connection was reset, an NBD error reply), before vroomd can record
//! the replica Outdated; were the primary to die then, an acknowledged write
//! would be lost (docs/design/replication.md, §0 item 9 and §5.2). So QEMU's
//! NBD client talks to one end of a unix socketpair; the relay holds the
//! other end and the TCP connection to the replica, and:
//!
//! - **forwards** every message both ways, byte for byte, while the replica
//!   is healthy;
//! - **holds** on any fault: it forwards nothing more either way and keeps
//!   QEMU's end open, so QEMU's pending writes stay pending (a stall, not an
//!   acknowledgement). Faults: the peer closes or a read or write on it
//!   fails; an error reply (a simple reply with a non-zero error, or an
//!   error chunk), which is *not* delivered; a request (or, during the
//!   handshake, the greeting or an option) unanswered for longer than
//!   `silent` (a frozen or partitioned peer: a stopped process's kernel
//!   still acknowledges TCP, so only this catches it); a malformed stream
//!   from either side;
//! - **releases** when vroomd says so (after it has written the replica
//!   Outdated): it closes QEMU's end and the peer and exits; QEMU then fails
//!   its target writes, the mirror job stops and the guest goes on locally.
//!
//! QEMU closing its end while forwarding is no fault: the relay closes the
//! peer and exits. Once holding, QEMU's end is no longer read, so the hold
//! and its reason stay until `release`; vroomd is the one to end it. A
//! clean end also follows a disconnect (`NBD_CMD_DISC` or
//! `NBD_OPT_ABORT`) after which the peer closes.
//!
//! **Process.** A relay runs as its own process (`vroom __nbd-relay`,
//! started by [`spawn`]) in its own session, so it outlives vroomd on
//! purpose: a restarted vroomd finds it again by its control socket and
//! asks its status. It logs to the control socket's path plus `.log`.
//!
//! **TLS.** A replica's connection is TLS 1.3, whose handshake vroomd made;
//! with `--sealed` the relay reads that connection's record keys from a
//! line on its stdin and seals what it forwards to the peer and opens what
//! it reads ([`sealed`]). What it parses and holds is the NBD inside; a
//! record that fails its check is a read error on the peer, so a fault.
//!
//! **Control protocol** (version 1, a unix socket, JSON lines, one request
//! one answer, several per connection):
//! `{"op":"status"}` → a [`RelayStatus`];
//! `{"op":"release"}` → `{"released":true}`, after which the relay exits;
//! anything else → `{"error":"..."}`. New fields may be added to answers;
//! clients ignore fields they do not know.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vroom_base::LockExt;

pub mod sealed;
mod wire;

use sealed::{RecordKeys, SealedReader, SealedWriter};
use wire::{ClientExpect, ClientMessage, ReadError, Sent, ServerExpect, ServerMessage};

/// How long a request may stay unanswered before the peer counts as gone.
/// 4 KiB writes take about a millisecond, 1 MiB mirror chunks a few.
pub const DEFAULT_SILENT: Duration = Duration::from_secs(1);

/// How long [`spawn`] waits for a new relay to answer, and a
/// [`RelayClient`] for any answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// Each direction reads through a buffer: one read takes in a whole
/// message (or several) most of the time.
const READ_BUFFER: usize = 256 * 1024;

/// The longest control request line read.
const MAX_CONTROL_LINE: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    Forwarding,
    Holding,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub state: RelayState,
    /// Why it holds: one line.
    pub fault: Option<String>,
    /// Requests (and, during the handshake, the greeting and options) the
    /// peer has not answered yet.
    pub outstanding: u64,
    /// The age of the oldest of those, 0 if none.
    pub oldest_ms: u64,
    /// Requests forwarded to the peer.
    pub requests: u64,
    /// Payload bytes of the writes among them.
    pub write_bytes: u64,
    /// Bytes forwarded to the peer, and read from it.
    pub to_peer_bytes: u64,
    pub from_peer_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub released: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRefusal {
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayClientError {
    #[error("failed to connect to the relay at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to talk to the relay")]
    Io {
        #[source]
        source: io::Error,
    },
    #[error("the relay closed the connection without answering")]
    Closed,
    #[error("the relay answered with an unreadable line {line:?}")]
    Decode {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the relay refused the request: {message}")]
    Refused { message: String },
}

/// vroomd's side of a relay's control socket.
pub struct RelayClient {
    stream: BufReader<UnixStream>,
}

impl RelayClient {
    pub fn connect(path: &Path) -> Result<RelayClient, RelayClientError> {
        let connect = |source| RelayClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect)?;
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(ANSWER_TIMEOUT)))
            .map_err(connect)?;
        Ok(RelayClient {
            stream: BufReader::new(stream),
        })
    }

    pub fn status(&mut self) -> Result<RelayStatus, RelayClientError> {
        self.call(&ControlRequest::Status)
    }

    /// Closes QEMU's end and the peer; the relay exits after answering.
    pub fn release(&mut self) -> Result<(), RelayClientError> {
        let _: Released = self.call(&ControlRequest::Release)?;
        Ok(())
    }

    fn call<T: serde::de::DeserializeOwned>(
        &mut self,
        request: &ControlRequest,
    ) -> Result<T, RelayClientError> {
        let io = |source| RelayClientError::Io { source };
        let mut line = serde_json::to_string(request).expect("invariant: a request serializes");
        line.push('\n');
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(io)?;
        let mut answer = String::new();
        if self.stream.read_line(&mut answer).map_err(io)? == 0 {
            return Err(RelayClientError::Closed);
        }
        if let Ok(refusal) = serde_json::from_str::<ControlRefusal>(&answer) {
            return Err(RelayClientError::Refused {
                message: refusal.error,
            });
        }
        serde_json::from_str(&answer).map_err(|source| RelayClientError::Decode {
            line: answer.trim_end().to_string(),
            source,
        })
    }
}

/// Starts a relay process (`exe __nbd-relay`) between `qemu` (the other end
/// of the socketpair whose one end QEMU's NBD client has) and `peer` (the
/// connection to the replica, a TLS connection whose record `keys` it is
/// given on its stdin, or plain without), answering on `control`, and
/// returns its pid once the control socket answers. Both fds are closed
/// here: the relay holds them alone. A relay that does not answer is
/// killed.
pub fn spawn(
    exe: &Path,
    qemu: OwnedFd,
    peer: OwnedFd,
    keys: Option<&RecordKeys>,
    control: &Path,
    silent: Duration,
) -> io::Result<u32> {
    if UnixStream::connect(control).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("a relay already answers at {}", control.display()),
        ));
    }
    let log_path = log_path(control);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut command = Command::new(exe);
    command
        .arg("__nbd-relay")
        .args(["--qemu-fd", "3", "--peer-fd", "4", "--control"])
        .arg(control)
        .arg("--silent-ms")
        .arg(silent.as_millis().to_string())
        .args(keys.map(|_| "--sealed"))
        .stdin(if keys.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(log.try_clone()?)
        .stderr(log);
    let (qemu_fd, peer_fd) = (qemu.as_raw_fd(), peer.as_raw_fd());
    // SAFETY: between fork and exec only async-signal-safe calls (fcntl,
    // dup2, setsid) on fds this process owns (`qemu`, `peer`, alive until
    // after spawn returns). Both are first copied above 10, close-on-exec,
    // so that placing one at 3 or 4 cannot close the other; dup2 leaves the
    // placed copies open across exec. setsid takes the relay out of
    // vroomd's session and process group: what stops vroomd must not stop
    // a relay holding a guest's writes.
    unsafe {
        command.pre_exec(move || {
            let q = libc::fcntl(qemu_fd, libc::F_DUPFD_CLOEXEC, 10);
            let p = libc::fcntl(peer_fd, libc::F_DUPFD_CLOEXEC, 10);
            if q < 0 || p < 0 || libc::dup2(q, 3) < 0 || libc::dup2(p, 4) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    drop((qemu, peer));
    if let (Some(keys), Some(mut stdin)) = (keys, child.stdin.take()) {
        let mut line = serde_json::to_vec(keys).expect("invariant: keys serialize");
        line.push(b'\n');
        // A relay that exits before reading is reported below.
        let _ = stdin.write_all(&line);
    }
    let started = Instant::now();
    loop {
        if RelayClient::connect(control)
            .and_then(|mut c| c.status())
            .is_ok()
        {
            // Reaped by a thread of ours if it ends while we run.
            let pid = child.id();
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(pid);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(io::Error::other(format!(
                "the relay exited at start ({status}); see {}",
                log_path.display()
            )));
        }
        if started.elapsed() > ANSWER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "the relay did not answer within {} s; see {}",
                ANSWER_TIMEOUT.as_secs(),
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A line on stderr (the relay's log). A log that cannot be written (a
/// full disk) must not stop the relay, as `eprintln!` would by panicking.
fn log(line: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr(), "relay: {line}");
}

/// Where a relay answering on `control` logs.
pub fn log_path(control: &Path) -> PathBuf {
    let mut name = control.as_os_str().to_owned();
    name.push(".log");
    PathBuf::from(name)
}

/// The relay process (`vroom __nbd-relay`): takes the connections its
/// parent placed at `qemu_fd` and `peer_fd` (with `sealed`, the peer's
/// record keys from a line on stdin), listens on `control` (after removing
/// a socket no relay answers on) and runs until released.
pub fn run_process(
    qemu_fd: RawFd,
    peer_fd: RawFd,
    sealed: bool,
    control: &Path,
    silent: Duration,
) -> io::Result<()> {
    let keys = if sealed {
        let mut line = String::new();
        io::stdin()
            .lock()
            .take(MAX_CONTROL_LINE)
            .read_line(&mut line)?;
        let keys: RecordKeys = serde_json::from_str(&line)
            .map_err(|e| io::Error::other(format!("unreadable record keys on stdin: {e}")))?;
        Some(keys)
    } else {
        None
    };
    for fd in [qemu_fd, peer_fd] {
        // SAFETY: F_GETFD only asks whether `fd` is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::other(format!("fd {fd} is not open")));
        }
    }
    // SAFETY: the parent placed these two fds for us (see `spawn`); nothing
    // else in this process owns them, and each is taken once.
    let (qemu, peer) = unsafe { (OwnedFd::from_raw_fd(qemu_fd), OwnedFd::from_raw_fd(peer_fd)) };
    if UnixStream::connect(control).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("a relay already answers at {}", control.display()),
        ));
    }
    let _ = std::fs::remove_file(control);
    let listener = UnixListener::bind(control)?;
    std::fs::set_permissions(control, std::fs::Permissions::from_mode(0o600))?;
    log(format_args!(
        "forwarding, control at {}, silent after {} ms",
        control.display(),
        silent.as_millis()
    ));
    run(qemu.into(), peer.into(), keys.as_ref(), listener, silent)
}

/// Runs a relay until it is released, QEMU closes its end while it
/// forwards, or the peer closes after a disconnect. With `keys`, the peer
/// connection carries TLS records ([`sealed`]). The control socket's file
/// is removed at the end.
pub fn run(
    qemu: UnixStream,
    peer: TcpStream,
    keys: Option<&RecordKeys>,
    control: UnixListener,
    silent: Duration,
) -> io::Result<()> {
    // One message is one write; Nagle would hold the next behind an ACK.
    let _ = peer.set_nodelay(true);
    let control_path = control.local_addr()?.as_pathname().map(Path::to_path_buf);
    let relay = Arc::new(Relay {
        state: Mutex::new(State::new(Instant::now())),
        ended: Condvar::new(),
        qemu: qemu.try_clone()?,
        peer: peer.try_clone()?,
        silent,
    });
    let (to_peer, from_peer): (Box<dyn Write + Send>, Box<dyn Read + Send>) = match keys {
        Some(keys) => (
            Box::new(SealedWriter::new(peer.try_clone()?, keys)?),
            // Records are read whole through a buffer, not a header and a
            // body by one system call each.
            Box::new(SealedReader::new(
                BufReader::with_capacity(READ_BUFFER, peer),
                keys,
            )?),
        ),
        None => (Box::new(peer.try_clone()?), Box::new(peer)),
    };
    let peer = from_peer;
    let threads = [
        {
            let (relay, peer) = (relay.clone(), to_peer);
            std::thread::Builder::new()
                .name("relay-to-peer".into())
                .spawn(move || relay.client_to_peer(qemu, peer))?
        },
        {
            let (relay, qemu) = (relay.clone(), relay.qemu.try_clone()?);
            std::thread::Builder::new()
                .name("relay-to-qemu".into())
                .spawn(move || relay.peer_to_client(peer, qemu))?
        },
        {
            let relay = relay.clone();
            std::thread::Builder::new()
                .name("relay-watch".into())
                .spawn(move || relay.watch())?
        },
        {
            let relay = relay.clone();
            std::thread::Builder::new()
                .name("relay-control".into())
                .spawn(move || relay.serve_control(control))?
        },
    ];
    let end = {
        let mut state = relay.state.lock_unpoisoned();
        loop {
            if let Some(end) = state.end {
                break end;
            }
            state = relay.ended.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    };
    log(format_args!("{end}"));
    if let Some(path) = control_path {
        // Wakes the control thread out of accept, to see the end.
        let _ = UnixStream::connect(&path);
        let _ = std::fs::remove_file(&path);
    }
    // The forwarding threads end on the sockets' shutdown; a control
    // connection left open is not waited for.
    let [to_peer, to_qemu, watch, _control] = threads;
    for thread in [to_peer, to_qemu, watch] {
        let _ = thread.join();
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Released,
    QemuClosed,
    Disconnected,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            End::Released => "released: closed qemu's end and the peer",
            End::QemuClosed => "qemu closed its end: closed the peer",
            End::Disconnected => "the client disconnected and the peer closed",
        })
    }
}

struct Relay {
    state: Mutex<State>,
    /// Signalled when `State::end` is set.
    ended: Condvar,
    /// Clones, to shut the connections down from any thread.
    qemu: UnixStream,
    peer: TcpStream,
    silent: Duration,
}

struct State {
    fault: Option<String>,
    /// Both connections are shut down: nothing is forwarded any more.
    closed: bool,
    /// The relay may return.
    end: Option<End>,
    handshake: Handshake,
    /// Transmission requests the peer owes a reply to, by cookie.
    requests: HashMap<u64, Outstanding>,
    counters: Counters,
}

#[derive(Default)]
struct Handshake {
    greeting_since: Option<Instant>,
    greeted: bool,
    flags_sent: bool,
    /// Options sent and not finally answered yet, in order.
    options: VecDeque<(u32, Instant)>,
    client_no_zeroes: bool,
    server_no_zeroes: bool,
    transmission: bool,
    /// The client asked to end (`NBD_OPT_ABORT`, `NBD_CMD_DISC`): the
    /// peer's closing is expected.
    disconnecting: bool,
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    since: Instant,
    command: u16,
    length: u32,
    offset: u64,
}

#[derive(Default)]
struct Counters {
    requests: u64,
    write_bytes: u64,
    to_peer_bytes: u64,
    from_peer_bytes: u64,
}

impl State {
    fn new(now: Instant) -> State {
        State {
            fault: None,
            closed: false,
            end: None,
            handshake: Handshake {
                greeting_since: Some(now),
                ..Handshake::default()
            },
            requests: HashMap::new(),
            counters: Counters::default(),
        }
    }

    /// Whether nothing may be forwarded any more.
    fn stopped(&self) -> bool {
        self.fault.is_some() || self.closed
    }

    fn hold(&mut self, reason: String) {
        if self.fault.is_none() && !self.closed {
            log(format_args!("holding: {reason}"));
            self.fault = Some(reason);
        }
    }

    /// The oldest thing the peer owes, and what it is.
    fn oldest(&self) -> Option<(Instant, String)> {
        let greeting = self
            .handshake
            .greeting_since
            .map(|since| (since, "the server's greeting".to_string()));
        let option = self
            .handshake
            .options
            .front()
            .map(|(option, since)| (*since, format!("the answer to option {option}")));
        let request = self
            .requests
            .iter()
            .min_by_key(|(_, o)| o.since)
            .map(|(cookie, o)| {
                (
                    o.since,
                    format!(
                        "request {cookie:#x} ({} of {} bytes at {})",
                        wire::command_name(o.command),
                        o.length,
                        o.offset
                    ),
                )
            });
        [greeting, option, request]
            .into_iter()
            .flatten()
            .min_by_key(|(since, _)| *since)
    }

    fn status(&self, now: Instant) -> RelayStatus {
        let outstanding = self.requests.len()
            + self.handshake.options.len()
            + usize::from(self.handshake.greeting_since.is_some());
        RelayStatus {
            state: if self.fault.is_some() {
                RelayState::Holding
            } else {
                RelayState::Forwarding
            },
            fault: self.fault.clone(),
            outstanding: outstanding as u64,
            oldest_ms: self
                .oldest()
                .map_or(0, |(since, _)| now.duration_since(since).as_millis() as u64),
            requests: self.counters.requests,
            write_bytes: self.counters.write_bytes,
            to_peer_bytes: self.counters.to_peer_bytes,
            from_peer_bytes: self.counters.from_peer_bytes,
        }
    }
}

impl Relay {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock_unpoisoned()
    }

    fn hold(&self, reason: String) {
        self.lock().hold(reason);
    }

    /// Shuts both connections down (QEMU sees its end close), once.
    fn close(&self) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        state.closed = true;
        drop(state);
        let _ = self.qemu.shutdown(Shutdown::Both);
        let _ = self.peer.shutdown(Shutdown::Both);
    }

    fn finish(&self, end: End) {
        self.close();
        let mut state = self.lock();
        if state.end.is_none() {
            state.end = Some(end);
        }
        self.ended.notify_all();
    }

    /// QEMU's side closed: the end while forwarding; while holding, the
    /// hold stays for vroomd to see and release.
    fn qemu_closed(&self) {
        if self.lock().fault.is_none() {
            self.finish(End::QemuClosed);
        }
    }

    /// Forwards the client's (QEMU's) messages to the peer.
    fn client_to_peer(&self, qemu: UnixStream, mut peer: Box<dyn Write + Send>) {
        let mut qemu = BufReader::with_capacity(READ_BUFFER, qemu);
        let mut export_name_sent = false;
        loop {
            // What comes next depends on the peer's answers so far, which
            // are known only once the client (answered) sends again.
            match qemu.fill_buf() {
                Ok([]) | Err(_) => return self.qemu_closed(),
                Ok(_) => {}
            }
            let expect = {
                let state = self.lock();
                if !state.handshake.flags_sent {
                    ClientExpect::Flags
                } else if export_name_sent || state.handshake.transmission {
                    ClientExpect::Request
                } else {
                    ClientExpect::Option
                }
            };
            let (message, bytes) = match wire::read_client(&mut qemu, expect) {
                Ok(read) => read,
                Err(ReadError::Closed | ReadError::Io(_)) => return self.qemu_closed(),
                Err(ReadError::Malformed(what)) => {
                    return self.hold(format!("malformed stream from qemu: {what}"));
                }
            };
            {
                let mut state = self.lock();
                if state.stopped() {
                    return;
                }
                let now = Instant::now();
                match message {
                    ClientMessage::Flags { no_zeroes } => {
                        state.handshake.flags_sent = true;
                        state.handshake.client_no_zeroes = no_zeroes;
                    }
                    ClientMessage::Option { option } => {
                        export_name_sent |= option == wire::OPT_EXPORT_NAME;
                        state.handshake.disconnecting |= option == wire::OPT_ABORT;
                        state.handshake.options.push_back((option, now));
                    }
                    ClientMessage::Request {
                        command,
                        cookie,
                        offset,
                        length,
                    } => {
                        if command == wire::CMD_DISC {
                            state.handshake.disconnecting = true;
                        } else {
                            match state.requests.entry(cookie) {
                                Entry::Occupied(_) => {
                                    return state.hold(format!(
                                        "malformed stream from qemu: cookie {cookie:#x} reused while outstanding"
                                    ));
                                }
                                Entry::Vacant(entry) => {
                                    entry.insert(Outstanding {
                                        since: now,
                                        command,
                                        length,
                                        offset,
                                    });
                                }
                            }
                        }
                        state.counters.requests += 1;
                        if command == wire::CMD_WRITE {
                            state.counters.write_bytes += u64::from(length);
                        }
                    }
                }
            }
            if let Err(e) = peer.write_all(&bytes) {
                return self.hold(format!("writing to the peer: {e}"));
            }
            self.lock().counters.to_peer_bytes += bytes.len() as u64;
        }
    }

    /// Forwards the peer's messages to QEMU, holding on the first fault.
    fn peer_to_client(&self, peer: Box<dyn Read + Send>, mut qemu: UnixStream) {
        let mut peer = BufReader::with_capacity(READ_BUFFER, peer);
        loop {
            // What comes next depends on what the client sent, known only
            // once the peer (answering it) sends.
            let first = match peer.fill_buf() {
                Ok([]) => Err(ReadError::Closed),
                Ok(_) => Ok(()),
                Err(e) => Err(ReadError::Io(e)),
            };
            let expect = {
                let state = self.lock();
                let handshake = &state.handshake;
                if !handshake.greeted {
                    ServerExpect::Greeting
                } else if handshake.transmission {
                    ServerExpect::Reply
                } else if handshake.options.front().map(|(o, _)| *o) == Some(wire::OPT_EXPORT_NAME)
                {
                    ServerExpect::ExportInfo {
                        zeroes: !(handshake.client_no_zeroes && handshake.server_no_zeroes),
                    }
                } else {
                    ServerExpect::OptionReply
                }
            };
            let read = first.and_then(|()| {
                wire::read_server(&mut peer, expect, |cookie| {
                    self.lock().requests.get(&cookie).map(|o| Sent {
                        command: o.command,
                        length: o.length,
                    })
                })
            });
            let (message, bytes) = match read {
                Ok(read) => read,
                Err(e) => {
                    let reason = match e {
                        ReadError::Closed => "the peer closed the connection".to_string(),
                        ReadError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            "the peer closed the connection inside a message".to_string()
                        }
                        ReadError::Io(e) => format!("reading from the peer: {e}"),
                        ReadError::Malformed(what) => {
                            format!("malformed stream from the peer: {what}")
                        }
                    };
                    let mut state = self.lock();
                    if state.handshake.disconnecting && state.fault.is_none() {
                        drop(state);
                        return self.finish(End::Disconnected);
                    }
                    return state.hold(reason);
                }
            };
            {
                let mut state = self.lock();
                if state.stopped() {
                    return;
                }
                state.counters.from_peer_bytes += bytes.len() as u64;
                if let Err(reason) = state.take(message) {
                    return state.hold(reason);
                }
            }
            if qemu.write_all(&bytes).is_err() {
                return self.qemu_closed();
            }
        }
    }

    /// Holds once the oldest outstanding request is older than `silent`.
    fn watch(&self) {
        let tick = (self.silent / 10).clamp(Duration::from_millis(5), Duration::from_millis(100));
        loop {
            std::thread::sleep(tick);
            let mut state = self.lock();
            if state.stopped() {
                return;
            }
            if let Some((since, what)) = state.oldest() {
                let age = since.elapsed();
                if age > self.silent {
                    return state.hold(format!(
                        "no answer from the peer to {what} for {} ms",
                        age.as_millis()
                    ));
                }
            }
        }
    }

    fn serve_control(self: Arc<Self>, listener: UnixListener) {
        for stream in listener.incoming() {
            if self.lock().end.is_some() {
                return;
            }
            let Ok(stream) = stream else { continue };
            let relay = self.clone();
            let spawned = std::thread::Builder::new()
                .name("relay-answer".into())
                .spawn(move || relay.answer(stream));
            if let Err(e) = spawned {
                log(format_args!("cannot answer a control connection: {e}"));
            }
        }
    }

    /// Answers one control connection's requests, one line each.
    fn answer(&self, stream: UnixStream) {
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            match (&mut reader).take(MAX_CONTROL_LINE).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let answer = match serde_json::from_str::<ControlRequest>(&line) {
                Ok(ControlRequest::Status) => {
                    serde_json::to_string(&self.lock().status(Instant::now()))
                }
                Ok(ControlRequest::Release) => {
                    log(format_args!("release asked"));
                    self.close();
                    let answer = serde_json::to_string(&Released { released: true })
                        .expect("invariant: an answer serializes");
                    let _ = writer.write_all(format!("{answer}\n").as_bytes());
                    return self.finish(End::Released);
                }
                Err(e) => serde_json::to_string(&ControlRefusal {
                    error: format!("unreadable request: {e}"),
                }),
            };
            let answer = answer.expect("invariant: an answer serializes");
            if writer.write_all(format!("{answer}\n").as_bytes()).is_err() {
                return;
            }
        }
    }
}

impl State {
    /// Takes in a message from the peer: its effect on the handshake and
    /// the outstanding requests, or the fault it is.
    fn take(&mut self, message: ServerMessage) -> Result<(), String> {
        let handshake = &mut self.handshake;
        match message {
            ServerMessage::Greeting { no_zeroes } => {
                handshake.greeted = true;
                handshake.greeting_since = None;
                handshake.server_no_zeroes = no_zeroes;
            }
            ServerMessage::OptionReply { option, reply } => {
                let Some(&(pending, _)) = handshake.options.front() else {
                    return Err(format!(
                        "malformed stream from the peer: a reply to option {option}, which was not sent"
                    ));
                };
                if pending != option {
                    return Err(format!(
                        "malformed stream from the peer: a reply to option {option} while {pending} is pending"
                    ));
                }
                let acked = reply == wire::REP_ACK;
                if acked || reply & wire::REP_FLAG_ERROR != 0 {
                    handshake.options.pop_front();
                }
                match option {
                    wire::OPT_GO if acked => handshake.transmission = true,
                    wire::OPT_STARTTLS | wire::OPT_EXTENDED_HEADERS if acked => {
                        return Err(format!(
                            "the peer accepted option {option}, which the relay cannot follow"
                        ));
                    }
                    _ => {}
                }
            }
            ServerMessage::ExportInfo => {
                handshake.options.pop_front();
                handshake.transmission = true;
            }
            ServerMessage::SimpleReply { cookie, error } => {
                let request = self
                    .requests
                    .remove(&cookie)
                    .expect("invariant: read_server checked the cookie");
                if error != 0 {
                    return Err(format!(
                        "the peer answered request {cookie:#x} ({} of {} bytes at {}) with error {error} ({})",
                        wire::command_name(request.command),
                        request.length,
                        request.offset,
                        wire::error_name(error)
                    ));
                }
            }
            ServerMessage::Chunk {
                cookie,
                flags,
                kind,
                error,
            } => {
                if kind & wire::REPLY_TYPE_ERROR_BIT != 0 {
                    let request = self.requests.get(&cookie).copied();
                    let what = request.map_or_else(String::new, |r| {
                        format!(
                            " ({} of {} bytes at {})",
                            wire::command_name(r.command),
                            r.length,
                            r.offset
                        )
                    });
                    let code = error.map_or_else(
                        || "no code".to_string(),
                        |e| format!("error {e} ({})", wire::error_name(e)),
                    );
                    return Err(format!(
                        "the peer answered request {cookie:#x}{what} with an error chunk (type {kind:#x}, {code})"
                    ));
                }
                if flags & wire::REPLY_FLAG_DONE != 0 {
                    self.requests.remove(&cookie);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::wire::build::*;
    use super::wire::*;
    use super::*;
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// A relay in a thread between a scripted QEMU (`client`) and a
    /// scripted NBD server (`server`), both driven by the test.
    struct Harness {
        client: UnixStream,
        server: TcpStream,
        control: PathBuf,
        done: mpsc::Receiver<io::Result<()>>,
        _dir: tempfile::TempDir,
    }

    const QUIET: Duration = Duration::from_millis(300);

    impl Harness {
        fn start(silent: Duration) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let control = dir.path().join("relay.sock");
            let listener = UnixListener::bind(&control).unwrap();
            let (client, qemu) = UnixStream::pair().unwrap();
            let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
            let peer = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
            let (server, _) = tcp.accept().unwrap();
            client.set_read_timeout(Some(QUIET)).unwrap();
            server.set_read_timeout(Some(QUIET)).unwrap();
            let (tx, done) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(run(qemu, peer, None, listener, silent));
            });
            Harness {
                client,
                server,
                control,
                done,
                _dir: dir,
            }
        }

        /// The server sends `bytes`; the client must get exactly them.
        fn server_sends(&mut self, bytes: &[u8]) {
            passes(&mut self.server, &mut self.client, bytes);
        }

        /// The client sends `bytes`; the server must get exactly them.
        fn client_sends(&mut self, bytes: &[u8]) {
            passes(&mut self.client, &mut self.server, bytes);
        }

        /// QEMU 7.2's handshake: structured replies, a meta context, GO.
        fn handshake(&mut self) {
            self.server_sends(&greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
            self.client_sends(&3u32.to_be_bytes());
            self.client_sends(&option(OPT_STRUCTURED_REPLY, b""));
            self.server_sends(&option_reply(OPT_STRUCTURED_REPLY, REP_ACK, b""));
            let meta = b"\0\0\0\x04vol0\0\0\0\x01\0\0\0\x0fbase:allocation";
            self.client_sends(&option(10, meta));
            self.server_sends(&option_reply(10, 4, b"\0\0\0\x01base:allocation"));
            self.server_sends(&option_reply(10, REP_ACK, b""));
            self.client_sends(&option(OPT_GO, b"\0\0\0\x04vol0\0\0"));
            let mut info = 0u16.to_be_bytes().to_vec();
            info.extend((1u64 << 20).to_be_bytes());
            info.extend(0x4du16.to_be_bytes());
            self.server_sends(&option_reply(OPT_GO, 3, &info));
            self.server_sends(&option_reply(OPT_GO, REP_ACK, b""));
        }

        fn status(&self) -> RelayStatus {
            RelayClient::connect(&self.control)
                .unwrap()
                .status()
                .unwrap()
        }

        /// The client gets nothing (and its end stays open).
        fn client_gets_nothing(&mut self) {
            let mut byte = [0; 1];
            match self.client.read(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("the client's end should stay open and silent, got {other:?}"),
            }
        }

        fn ended(&self) -> io::Result<()> {
            self.done
                .recv_timeout(Duration::from_secs(3))
                .expect("the relay should have ended")
        }
    }

    fn passes(from: &mut impl Write, to: &mut impl Read, bytes: &[u8]) {
        from.write_all(bytes).unwrap();
        let mut got = vec![0; bytes.len()];
        to.read_exact(&mut got).unwrap();
        assert_eq!(got, bytes, "the relay changed the bytes it forwarded");
    }

    fn holding(status: &RelayStatus, reason: &str) {
        assert_eq!(status.state, RelayState::Holding, "{status:?}");
        let fault = status.fault.as_deref().unwrap_or_default();
        assert!(fault.contains(reason), "fault {fault:?}, want {reason:?}");
    }

    #[test]
    fn forwards_the_handshake_writes_reads_and_replies_unchanged() {
        let mut h = Harness::start(DEFAULT_SILENT);
        h.handshake();
        h.client_sends(&request(CMD_WRITE, 1, 4096, 8, b"abcdefgh"));
        h.server_sends(&simple_reply(0, 1, b""));
        h.client_sends(&request(CMD_READ, 2, 0, 4, b""));
        h.server_sends(&chunk(0, 1, 2, b"\0\0\0\0\0\0\0\0wxyz"));
        h.server_sends(&chunk(REPLY_FLAG_DONE, 0, 2, b""));
        // A simple reply to a read carries the data.
        h.client_sends(&request(CMD_READ, 3, 0, 4, b""));
        h.server_sends(&simple_reply(0, 3, b"wxyz"));
        h.client_sends(&request(3, 4, 0, 0, b"")); // flush
        h.server_sends(&simple_reply(0, 4, b""));
        let status = h.status();
        assert_eq!(status.state, RelayState::Forwarding, "{status:?}");
        assert_eq!(status.fault, None);
        assert_eq!(
            (status.outstanding, status.requests, status.write_bytes),
            (0, 4, 8)
        );
        assert_eq!(status.to_peer_bytes, 4 + 16 + 16 + 33 + 16 + 8 + 4 * 28 + 8);
    }

    /// With record keys, the relay seals what it forwards to the peer and
    /// opens what comes back: the messages arrive whole, and what crosses
    /// the network is not the client's bytes.
    #[test]
    fn a_sealed_peer_gets_sealed_messages_and_its_replies_are_opened() {
        let (relay_keys, server_keys) = sealed::tests::pair();
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("relay.sock");
        let listener = UnixListener::bind(&control).unwrap();
        let (mut client, qemu) = UnixStream::pair().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (server, _) = tcp.accept().unwrap();
        client.set_read_timeout(Some(QUIET)).unwrap();
        server.set_read_timeout(Some(QUIET)).unwrap();
        std::thread::spawn(move || run(qemu, peer, Some(&relay_keys), listener, DEFAULT_SILENT));
        let mut to_server = SealedWriter::new(server.try_clone().unwrap(), &server_keys).unwrap();
        let mut raw = server.try_clone().unwrap();
        let mut from_server = SealedReader::new(server, &server_keys).unwrap();
        passes(&mut to_server, &mut client, &greeting(FLAG_FIXED_NEWSTYLE));
        passes(&mut client, &mut from_server, &1u32.to_be_bytes());
        passes(
            &mut client,
            &mut from_server,
            &option(OPT_EXPORT_NAME, b"vol0"),
        );
        let mut export = (1u64 << 20).to_be_bytes().to_vec();
        export.extend(1u16.to_be_bytes());
        export.extend([0; 124]);
        passes(&mut to_server, &mut client, &export);
        let write = request(CMD_WRITE, 9, 0, 12, b"secret bytes");
        client.write_all(&write).unwrap();
        let mut wire = vec![0; write.len() + 22];
        raw.read_exact(&mut wire).unwrap();
        assert!(
            !wire.windows(12).any(|w| w == b"secret bytes"),
            "the write crossed in plaintext"
        );
        passes(&mut to_server, &mut client, &simple_reply(0, 9, b""));
        let status = RelayClient::connect(&control).unwrap().status().unwrap();
        assert_eq!(status.state, RelayState::Forwarding, "{status:?}");
        assert_eq!(status.outstanding, 0);
    }

    #[test]
    fn the_old_export_name_handshake_passes() {
        let mut h = Harness::start(DEFAULT_SILENT);
        h.server_sends(&greeting(FLAG_FIXED_NEWSTYLE));
        h.client_sends(&1u32.to_be_bytes());
        h.client_sends(&option(OPT_EXPORT_NAME, b"vol0"));
        let mut export = (1u64 << 20).to_be_bytes().to_vec();
        export.extend(1u16.to_be_bytes());
        export.extend([0; 124]);
        h.server_sends(&export);
        h.client_sends(&request(CMD_WRITE, 9, 0, 2, b"hi"));
        h.server_sends(&simple_reply(0, 9, b""));
        assert_eq!(h.status().state, RelayState::Forwarding);
    }

    /// After a write, the server's `reply` makes the relay hold, and the
    /// client never gets it.
    fn a_reply_holds(reply: &[u8], reason: &str) -> Harness {
        let mut h = Harness::start(DEFAULT_SILENT);
        h.handshake();
        h.client_sends(&request(CMD_WRITE, 1, 4096, 2, b"hi"));
        h.server.write_all(reply).unwrap();
        h.client_gets_nothing();
        holding(&h.status(), reason);
        h
    }

    #[test]
    fn an_error_reply_holds_and_is_not_delivered() {
        let mut h = a_reply_holds(
            &simple_reply(28, 1, b""),
            "write of 2 bytes at 4096) with error 28 (ENOSPC)",
        );
        // Nothing more goes to the peer either.
        h.client
            .write_all(&request(CMD_WRITE, 2, 0, 2, b"hi"))
            .unwrap();
        let mut byte = [0; 1];
        assert!(
            h.server.read(&mut byte).is_err(),
            "a request went to the peer while holding"
        );
    }

    #[test]
    fn an_error_chunk_holds_and_is_not_delivered() {
        let mut payload = 5u32.to_be_bytes().to_vec();
        payload.extend(0u16.to_be_bytes());
        a_reply_holds(
            &chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT | 1, 1, &payload),
            "error chunk (type 0x8001, error 5 (EIO))",
        );
    }

    #[test]
    fn a_malformed_peer_holds() {
        a_reply_holds(
            &simple_reply(0, 99, b""),
            "malformed stream from the peer: a reply to cookie 0x63",
        );
    }

    #[test]
    fn the_peer_closing_holds_and_release_closes_the_clients_end() {
        let mut h = Harness::start(DEFAULT_SILENT);
        h.handshake();
        h.client_sends(&request(CMD_WRITE, 1, 0, 2, b"hi"));
        h.server.shutdown(Shutdown::Both).unwrap();
        h.client_gets_nothing();
        let status = h.status();
        holding(&status, "the peer closed the connection");
        assert_eq!(status.outstanding, 1);
        // The relay keeps holding until released, however long that is.
        std::thread::sleep(QUIET);
        h.client_gets_nothing();
        RelayClient::connect(&h.control).unwrap().release().unwrap();
        let mut byte = [0; 1];
        assert_eq!(
            h.client.read(&mut byte).unwrap(),
            0,
            "release should close the client's end"
        );
        h.ended().unwrap();
        assert!(!h.control.exists(), "the control socket should be gone");
    }

    #[test]
    fn a_silent_peer_holds_after_silent() {
        let silent = Duration::from_millis(400);
        let mut h = Harness::start(silent);
        h.handshake();
        h.client_sends(&request(CMD_WRITE, 1, 512, 2, b"hi"));
        let sent = Instant::now();
        std::thread::sleep(Duration::from_millis(150));
        let early = h.status();
        assert_eq!(early.state, RelayState::Forwarding, "{early:?}");
        assert_eq!(early.outstanding, 1);
        assert!(early.oldest_ms >= 150, "{early:?}");
        while h.status().state == RelayState::Forwarding {
            assert!(
                sent.elapsed() < silent * 3,
                "still forwarding after {:?}",
                sent.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            sent.elapsed() >= silent,
            "held after only {:?}",
            sent.elapsed()
        );
        holding(
            &h.status(),
            "no answer from the peer to request 0x1 (write of 2 bytes at 512)",
        );
        // A late answer is not delivered.
        h.server.write_all(&simple_reply(0, 1, b"")).unwrap();
        h.client_gets_nothing();
    }

    #[test]
    fn the_client_closing_ends_the_relay_and_closes_the_peer() {
        let mut h = Harness::start(DEFAULT_SILENT);
        h.handshake();
        h.client_sends(&request(CMD_WRITE, 1, 0, 2, b"hi"));
        h.server_sends(&simple_reply(0, 1, b""));
        h.client.shutdown(Shutdown::Both).unwrap();
        h.ended().unwrap();
        let mut byte = [0; 1];
        assert_eq!(
            h.server.read(&mut byte).unwrap(),
            0,
            "the peer should be closed"
        );
        assert!(!h.control.exists());
    }

    #[test]
    fn the_client_closing_while_holding_keeps_the_hold_for_vroomd() {
        let mut h = Harness::start(DEFAULT_SILENT);
        h.handshake();
        h.client_sends(&request(CMD_WRITE, 1, 0, 2, b"hi"));
        h.server.shutdown(Shutdown::Both).unwrap();
        h.client_gets_nothing();
        h.client.shutdown(Shutdown::Both).unwrap();
        assert!(
            h.done.recv_timeout(QUIET).is_err(),
            "the relay ended while holding, before release"
        );
        holding(&h.status(), "the peer closed the connection");
        RelayClient::connect(&h.control).unwrap().release().unwrap();
        h.ended().unwrap();
    }

    #[test]
    fn a_disconnect_then_the_peer_closing_ends_cleanly() {
        let mut h = Harness::start(DEFAULT_SILENT);
        h.handshake();
        h.client_sends(&request(CMD_DISC, 1, 0, 0, b""));
        h.server.shutdown(Shutdown::Both).unwrap();
        h.ended().unwrap();
    }

    fn socket_fds() -> (OwnedFd, OwnedFd) {
        let (a, b) = UnixStream::pair().unwrap();
        (a.into(), b.into())
    }

    #[test]
    fn spawn_refuses_a_control_socket_a_relay_answers_on() {
        let h = Harness::start(DEFAULT_SILENT);
        let (qemu, peer) = socket_fds();
        let err = spawn(
            Path::new("/bin/true"),
            qemu,
            peer,
            None,
            &h.control,
            DEFAULT_SILENT,
        )
        .expect_err("a second relay on the same control socket");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(h.status().state, RelayState::Forwarding);
    }

    #[test]
    fn spawn_reports_a_relay_that_exits_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("relay.sock");
        let (qemu, peer) = socket_fds();
        let err = spawn(
            Path::new("/bin/false"),
            qemu,
            peer,
            None,
            &control,
            DEFAULT_SILENT,
        )
        .expect_err("a relay that exits");
        assert!(err.to_string().contains("exited at start"), "{err}");
    }

    #[test]
    fn control_answers_unknown_requests_with_an_error() {
        let h = Harness::start(DEFAULT_SILENT);
        let mut stream = UnixStream::connect(&h.control).unwrap();
        stream
            .write_all(b"{\"op\":\"explode\"}\n{\"op\":\"status\"}\n")
            .unwrap();
        let mut lines = BufReader::new(stream).lines();
        let refusal: ControlRefusal =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert!(refusal.error.contains("unreadable request"), "{refusal:?}");
        let status: RelayStatus = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(status.state, RelayState::Forwarding);
        // Before the greeting, the server owes it.
        assert_eq!(status.outstanding, 1);
    }
}
