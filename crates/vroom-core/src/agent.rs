//! The host end of the agent channel: one multiplexed connection per
//! instance to the unix socket QEMU serves for the guest's agent port.
//! Everything read from it is untrusted guest output: replies are matched to
//! requests the host made, exec output is checked against the credit the
//! host gave and the size limits of `vroom_agent_proto::exec`.
//!
//! Call sites use the typed methods ([`AgentClient::health`],
//! [`AgentClient::exec`], ...); [`AgentClient::call`] stays for raw requests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use vroom_agent_proto::exec::validate_chunk;
use vroom_agent_proto::{
    encode_frame, from_hex, ExecStatus, ExecStream, FrameDecoder, GuestReply, HealthReport,
    HostCommand, InvalidExecMessage, Request, Response, MAX_EXEC_CHUNK, MAX_EXEC_WINDOW,
    MAX_READ_CHUNK,
};
use vroom_base::LockExt;
use vroom_types::ConfigValues;

use crate::ratelimit::{WarnLimiter, WARN_WINDOW};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the guest agent")]
    Connect(#[source] std::io::Error),
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent connection closed")]
    Closed,
    #[error("the request is too large to send")]
    TooLarge,
    #[error("the guest refused: {message}")]
    Refused { message: String },
    #[error("the guest answered {request} with the wrong reply")]
    WrongReply { request: &'static str },
    #[error("the guest sent a malformed {what}")]
    Malformed { what: &'static str },
    #[error("the guest broke the exec protocol")]
    Protocol(#[source] InvalidExecMessage),
    #[error("the guest sent exec output beyond the credit it was given")]
    Overrun,
}

/// One event of an exec session, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Output { stream: ExecStream, data: Vec<u8> },
    Exit(ExecStatus),
}

/// A chunk of a file read from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChunk {
    pub data: Vec<u8>,
    /// The file's size when the chunk was read.
    pub size: u64,
}

/// How many output chunks the host lets a session have in flight: the most
/// the daemon buffers per session is this many [`MAX_EXEC_CHUNK`]s.
const EXEC_WINDOW: u32 = 8;
const _: () = assert!(EXEC_WINDOW <= MAX_EXEC_WINDOW);

type Pending = Mutex<HashMap<u64, oneshot::Sender<GuestReply>>>;

struct SessionRoute {
    events: mpsc::Sender<Result<ExecEvent, AgentError>>,
    /// Fired by `exec_started`.
    started: Option<oneshot::Sender<()>>,
    /// Output chunks the guest may still send.
    credit: u32,
}

/// One connection to the guest.
struct Link {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    sessions: Mutex<HashMap<u64, SessionRoute>>,
    alive: AtomicBool,
    next_id: Arc<AtomicU64>,
}

impl Link {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn send(&self, id: u64, command: HostCommand) -> Result<(), AgentError> {
        let payload =
            serde_json::to_vec(&Request { id, command }).map_err(|_| AgentError::TooLarge)?;
        let frame = encode_frame(&payload).ok_or(AgentError::TooLarge)?;
        let mut writer = self.writer.lock().await;
        if let Err(e) = writer.write_all(&frame).await {
            self.alive.store(false, Ordering::Relaxed);
            return Err(AgentError::Connect(e));
        }
        Ok(())
    }

    async fn call(
        &self,
        command: HostCommand,
        timeout: Option<Duration>,
    ) -> Result<GuestReply, AgentError> {
        let id = self.id();
        let (tx, rx) = oneshot::channel();
        self.pending.lock_unpoisoned().insert(id, tx);
        if let Err(e) = self.send(id, command).await {
            self.pending.lock_unpoisoned().remove(&id);
            return Err(e);
        }
        let answer = match timeout {
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(answer) => answer,
                Err(_) => {
                    self.pending.lock_unpoisoned().remove(&id);
                    return Err(AgentError::Timeout(t));
                }
            },
            None => rx.await,
        };
        answer.map_err(|_| AgentError::Closed)
    }

    /// Routes one message from the guest.
    fn dispatch(&self, resp: Response) -> Option<u64> {
        let mut sessions = self.sessions.lock_unpoisoned();
        if let Some(route) = sessions.get_mut(&resp.id) {
            let (event, last) = match resp.reply {
                GuestReply::ExecStarted => {
                    if let Some(started) = route.started.take() {
                        let _ = started.send(());
                    }
                    return None;
                }
                GuestReply::ExecData { stream, data } => {
                    if let Err(e) = validate_chunk(&data) {
                        (Err(AgentError::Protocol(e)), true)
                    } else if route.credit == 0 {
                        (Err(AgentError::Overrun), true)
                    } else {
                        route.credit -= 1;
                        (Ok(ExecEvent::Output { stream, data }), false)
                    }
                }
                GuestReply::ExecExit { status } => match status.validate() {
                    Ok(()) => (Ok(ExecEvent::Exit(status)), true),
                    Err(e) => (Err(AgentError::Protocol(e)), true),
                },
                GuestReply::Error { message } => (
                    Err(AgentError::Refused {
                        message: one_line(&message),
                    }),
                    true,
                ),
                _ => (
                    Err(AgentError::WrongReply {
                        request: "exec_start",
                    }),
                    true,
                ),
            };
            // A session that broke the rules (or whose reader is gone) is killed.
            let kill = matches!(
                event,
                Err(AgentError::Protocol(_) | AgentError::Overrun | AgentError::WrongReply { .. })
            );
            // Never blocks: the channel has room for the whole window plus the end.
            let delivered = route.events.try_send(event).is_ok();
            if last || !delivered {
                sessions.remove(&resp.id);
                return (kill || !delivered).then_some(resp.id);
            }
            return None;
        }
        drop(sessions);
        if let Some(waiter) = self.pending.lock_unpoisoned().remove(&resp.id) {
            let _ = waiter.send(resp.reply);
        }
        None
    }

    fn close(&self) {
        self.alive.store(false, Ordering::Relaxed);
        self.pending.lock_unpoisoned().clear();
        for (_, route) in self.sessions.lock_unpoisoned().drain() {
            let _ = route.events.try_send(Err(AgentError::Closed));
        }
    }
}

pub struct AgentClient {
    socket: PathBuf,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    next_id: Arc<AtomicU64>,
    /// What the guest makes us log goes through this.
    warnings: Arc<WarnLimiter>,
}

impl AgentClient {
    pub fn new(socket: PathBuf) -> Self {
        // Ids start from the clock so replies meant for an earlier daemon never match.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        AgentClient {
            socket,
            link: tokio::sync::Mutex::new(None),
            next_id: Arc::new(AtomicU64::new(start)),
            warnings: Arc::new(WarnLimiter::new("?")),
        }
    }

    /// Names the instance in the warnings this channel logs (rate-limited
    /// per instance, see [`crate::ratelimit`]).
    pub fn for_instance(mut self, instance: &str) -> Self {
        self.warnings = Arc::new(WarnLimiter::new(instance));
        self
    }

    /// Drops the connection, e.g. after the VMM exited.
    pub async fn reset(&self) {
        if let Some(link) = self.link.lock().await.take() {
            link.close();
        }
    }

    async fn link(&self) -> Result<Arc<Link>, AgentError> {
        let mut guard = self.link.lock().await;
        if let Some(link) = guard.as_ref().filter(|l| l.alive.load(Ordering::Relaxed)) {
            return Ok(link.clone());
        }
        let link = self.connect().await?;
        *guard = Some(link.clone());
        Ok(link)
    }

    /// Sends a raw request and waits for its reply.
    pub async fn call(
        &self,
        command: HostCommand,
        timeout: Duration,
    ) -> Result<GuestReply, AgentError> {
        self.link().await?.call(command, Some(timeout)).await
    }

    /// The guest's readiness, services and config in force.
    pub async fn health(&self, timeout: Duration) -> Result<HealthReport, AgentError> {
        match self.call(HostCommand::Health, timeout).await? {
            GuestReply::Health(report) => Ok(report),
            other => Err(unexpected(other, "health")),
        }
    }

    /// The health report once the guest is ready, or after `within` (the
    /// guest answers at once when it is ready: no poll interval between its
    /// readiness and the host's knowing). A guest without this request
    /// answers `Refused`.
    pub async fn wait_ready(&self, within: Duration) -> Result<HealthReport, AgentError> {
        let command = HostCommand::WaitReady {
            within_ms: within.as_millis() as u64,
        };
        match self.call(command, within + Duration::from_secs(2)).await? {
            GuestReply::Health(report) => Ok(report),
            other => Err(unexpected(other, "wait_ready")),
        }
    }

    /// Makes `values` the whole config; returns what the guest applied.
    pub async fn apply_config(
        &self,
        values: ConfigValues,
        timeout: Duration,
    ) -> Result<ConfigValues, AgentError> {
        match self
            .call(HostCommand::ApplyConfig { values }, timeout)
            .await?
        {
            GuestReply::ConfigApplied { values } => Ok(values),
            other => Err(unexpected(other, "apply_config")),
        }
    }

    /// Asks the guest to stop its services and power off.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), AgentError> {
        match self.call(HostCommand::Shutdown, timeout).await? {
            GuestReply::ShuttingDown => Ok(()),
            other => Err(unexpected(other, "shutdown")),
        }
    }

    /// Stops the guest's services and flushes its config volume (before a snapshot).
    pub async fn freeze(&self, timeout: Duration) -> Result<(), AgentError> {
        match self.call(HostCommand::Freeze, timeout).await? {
            GuestReply::Frozen => Ok(()),
            other => Err(unexpected(other, "freeze")),
        }
    }

    /// Reseeds the guest's RNG from the host's, sets its clock and lets its
    /// services continue; with `reload_volume`, after taking on the
    /// identity and config of its (replaced) config volume. Returns whether
    /// the identity changed.
    pub async fn resume(&self, reload_volume: bool, timeout: Duration) -> Result<bool, AgentError> {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let command = HostCommand::Resume {
            entropy: (0..64).map(|_| rand::random::<u8>()).collect(),
            unix_ms,
            reload_volume,
        };
        match self.call(command, timeout).await? {
            GuestReply::Resumed { identity_changed } => Ok(identity_changed),
            other => Err(unexpected(other, "resume")),
        }
    }

    /// Up to [`MAX_READ_CHUNK`] bytes of a regular file from `offset`.
    pub async fn read_file(
        &self,
        path: &str,
        offset: u64,
        timeout: Duration,
    ) -> Result<FileChunk, AgentError> {
        let command = HostCommand::ReadFile {
            path: path.to_string(),
            offset,
            len: MAX_READ_CHUNK,
        };
        match self.call(command, timeout).await? {
            GuestReply::FileChunk { hex, size } => match from_hex(&hex) {
                Some(data) if data.len() as u64 <= MAX_READ_CHUNK => Ok(FileChunk { data, size }),
                _ => Err(AgentError::Malformed { what: "file chunk" }),
            },
            other => Err(unexpected(other, "read_file")),
        }
    }

    /// Starts a command in the guest. The session's output arrives through
    /// [`ExecSession::next`]; dropping the session before its exit kills the
    /// command. `start_timeout` bounds the wait for the guest to start it.
    pub async fn exec(
        &self,
        argv: Vec<String>,
        timeout: Duration,
        stdin: bool,
        start_timeout: Duration,
    ) -> Result<ExecSession, AgentError> {
        let link = self.link().await?;
        let id = link.id();
        // Room for every credited chunk plus the final exit or error.
        let (tx, rx) = mpsc::channel(EXEC_WINDOW as usize + 2);
        let (started_tx, started_rx) = oneshot::channel();
        link.sessions.lock_unpoisoned().insert(
            id,
            SessionRoute {
                events: tx,
                started: Some(started_tx),
                credit: EXEC_WINDOW,
            },
        );
        let mut session = ExecSession {
            id,
            link: link.clone(),
            events: rx,
            first: None,
            finished: false,
        };
        let command = HostCommand::ExecStart {
            argv,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            stdin,
            window: EXEC_WINDOW,
        };
        link.send(id, command).await?;
        // The guest answers `exec_started`, an exit (e.g. not found) or an
        // error; a guest too old to know exec sessions never answers.
        let first = tokio::time::timeout(start_timeout, async {
            tokio::select! {
                Ok(()) = started_rx => None,
                event = session.events.recv() => Some(event),
            }
        })
        .await;
        match first {
            Ok(None) => {}
            Ok(Some(Some(Ok(event)))) => session.first = Some(event),
            Ok(Some(Some(Err(e)))) => {
                session.finished = true;
                return Err(e);
            }
            Ok(Some(None)) => {
                session.finished = true;
                return Err(AgentError::Closed);
            }
            Err(_) => return Err(AgentError::Timeout(start_timeout)),
        }
        Ok(session)
    }

    async fn connect(&self) -> Result<Arc<Link>, AgentError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(AgentError::Connect)?;
        let (mut reader, writer) = stream.into_split();
        let link = Arc::new(Link {
            writer: tokio::sync::Mutex::new(writer),
            pending: Mutex::default(),
            sessions: Mutex::default(),
            alive: AtomicBool::new(true),
            next_id: self.next_id.clone(),
        });
        let weak = Arc::downgrade(&link);
        let warnings = self.warnings.clone();
        tokio::spawn(async move {
            let instance = warnings.instance().to_string();
            let mut decoder = FrameDecoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // `read` is cancel-safe: a timeout loses no bytes. It lets
                // the count of a flood that stopped be reported.
                let n = match tokio::time::timeout(WARN_WINDOW, reader.read(&mut buf)).await {
                    Err(_) if weak.strong_count() == 0 => break,
                    Err(_) => {
                        warnings.tick();
                        continue;
                    }
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(n)) => n,
                };
                let Some(link) = weak.upgrade() else { return };
                decoder.push(&buf[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => match serde_json::from_slice::<Response>(&frame) {
                            Ok(resp) => {
                                if let Some(session) = link.dispatch(resp) {
                                    warnings.warn(|| tracing::warn!(%instance, session, "killing an exec session that broke the protocol or lost its reader"));
                                    let link = link.clone();
                                    tokio::spawn(async move {
                                        let id = link.id();
                                        let _ =
                                            link.send(id, HostCommand::ExecKill { session }).await;
                                    });
                                }
                            }
                            Err(e) => warnings.warn(|| {
                                tracing::warn!(%instance, error = %e, "discarding an unparsable agent message")
                            }),
                        },
                        Ok(None) => break,
                        Err(e) => warnings.warn(|| {
                            tracing::warn!(%instance, error = %e, "agent stream out of sync")
                        }),
                    }
                }
            }
            warnings.flush();
            if let Some(link) = weak.upgrade() {
                link.close();
            }
        });
        Ok(link)
    }
}

fn unexpected(reply: GuestReply, request: &'static str) -> AgentError {
    match reply {
        GuestReply::Error { message } => AgentError::Refused {
            message: one_line(&message),
        },
        _ => AgentError::WrongReply { request },
    }
}

/// Guest text shown to users: its first line, at most 200 characters.
fn one_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

/// A running command in the guest.
pub struct ExecSession {
    id: u64,
    link: Arc<Link>,
    events: mpsc::Receiver<Result<ExecEvent, AgentError>>,
    /// The first event, read while waiting for the start.
    first: Option<ExecEvent>,
    finished: bool,
}

impl ExecSession {
    /// The next output chunk or the exit; `None` after the exit. Taking an
    /// output chunk gives the guest a credit for the next one. Not
    /// cancel-safe: dropped while it sends that credit, it loses the chunk.
    pub async fn next(&mut self) -> Option<Result<ExecEvent, AgentError>> {
        if self.finished {
            return None;
        }
        let event = match self.first.take() {
            Some(event) => Ok(event),
            None => self.events.recv().await.unwrap_or(Err(AgentError::Closed)),
        };
        match &event {
            Ok(ExecEvent::Output { .. }) => {
                let granted = match self.link.sessions.lock_unpoisoned().get_mut(&self.id) {
                    Some(route) => {
                        route.credit += 1;
                        true
                    }
                    None => false,
                };
                if granted {
                    let id = self.link.id();
                    let credit = HostCommand::ExecCredit {
                        session: self.id,
                        chunks: 1,
                    };
                    if let Err(e) = self.link.send(id, credit).await {
                        self.finished = true;
                        return Some(Err(e));
                    }
                }
            }
            Ok(ExecEvent::Exit(_)) | Err(_) => self.finished = true,
        }
        Some(event)
    }

    /// A handle that feeds the command's stdin (if the session has one).
    pub fn stdin(&self) -> ExecStdin {
        ExecStdin {
            session: self.id,
            link: self.link.clone(),
        }
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The caller went away before the exit: kill the command.
        self.link.sessions.lock_unpoisoned().remove(&self.id);
        let (link, session) = (self.link.clone(), self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let id = link.id();
                let _ = link.send(id, HostCommand::ExecKill { session }).await;
            });
        }
    }
}

/// Writes a session's stdin, one acknowledged chunk at a time.
#[derive(Clone)]
pub struct ExecStdin {
    session: u64,
    link: Arc<Link>,
}

impl ExecStdin {
    /// Sends `data` (in chunks of at most [`MAX_EXEC_CHUNK`]), waiting for
    /// the guest to put each into the pipe; `eof` closes stdin afterwards.
    pub async fn write(&self, data: &[u8], eof: bool) -> Result<(), AgentError> {
        let mut chunks: Vec<&[u8]> = data.chunks(MAX_EXEC_CHUNK).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let command = HostCommand::ExecStdin {
                session: self.session,
                data: chunk.to_vec(),
                eof: eof && i == last,
            };
            // No timeout: a command that does not read its stdin holds the
            // writer back (backpressure); the session's end answers it.
            match self.link.call(command, None).await? {
                GuestReply::StdinWritten => {}
                other => return Err(unexpected(other, "exec_stdin")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// The guest side of a socket pair, driven by the test.
    struct FakeGuest {
        stream: UnixStream,
        decoder: FrameDecoder,
    }

    impl FakeGuest {
        async fn recv(&mut self) -> Request {
            let mut buf = [0u8; 4096];
            loop {
                if let Some(frame) = self.decoder.next_frame().unwrap() {
                    return serde_json::from_slice(&frame).unwrap();
                }
                let n = self.stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the host closed the channel");
                self.decoder.push(&buf[..n]);
            }
        }

        async fn reply(&mut self, id: u64, reply: GuestReply) {
            let payload = serde_json::to_vec(&Response { id, reply }).unwrap();
            self.stream
                .write_all(&encode_frame(&payload).unwrap())
                .await
                .unwrap();
        }

        /// Waits for the next request that is not a credit.
        async fn recv_not_credit(&mut self) -> Request {
            loop {
                let req = self.recv().await;
                if !matches!(req.command, HostCommand::ExecCredit { .. }) {
                    return req;
                }
            }
        }
    }

    async fn pair() -> (
        AgentClient,
        tokio::task::JoinHandle<FakeGuest>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let guest = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            FakeGuest {
                stream,
                decoder: FrameDecoder::new(),
            }
        });
        (AgentClient::new(socket), guest, dir)
    }

    fn data(n: u8) -> GuestReply {
        GuestReply::ExecData {
            stream: ExecStream::Stdout,
            data: vec![n; 3],
        }
    }

    const T: Duration = Duration::from_secs(5);

    /// Starts a session against the fake guest and answers `exec_started`.
    async fn started(
        client: &AgentClient,
        guest: tokio::task::JoinHandle<FakeGuest>,
    ) -> (ExecSession, FakeGuest, u64) {
        let start = client.exec(vec!["cat".into()], T, true, T);
        let accept = async {
            let mut guest = guest.await.unwrap();
            let req = guest.recv().await;
            assert!(
                matches!(req.command, HostCommand::ExecStart { window, .. } if window == EXEC_WINDOW)
            );
            guest.reply(req.id, GuestReply::ExecStarted).await;
            (guest, req.id)
        };
        let (session, (guest, id)) = tokio::join!(start, accept);
        (session.unwrap(), guest, id)
    }

    /// A guest that floods its agent port with garbage (every 4 bytes a
    /// frame header of an unknown version) makes vroomd log a burst of
    /// warnings and one count of the rest, not one line per bad header.
    #[tokio::test]
    async fn garbage_on_the_agent_channel_logs_a_bounded_number_of_warnings() {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock_unpoisoned().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // The test runtime is single-threaded: the reader task logs here.
        let _guard = tracing::subscriber::set_default(subscriber);

        let (client, guest, _dir) = pair().await;
        let client = client.for_instance("flood");
        let flood = async {
            let mut guest = guest.await.unwrap();
            let garbage: Vec<u8> = b"VRM\x09".repeat(64 * 1024);
            for _ in 0..4 {
                guest.stream.write_all(&garbage).await.unwrap();
            }
            // Closing ends the reader, which reports what it suppressed.
            drop(guest);
        };
        let (health, ()) = tokio::join!(client.health(Duration::from_secs(30)), flood);
        assert!(health.is_err());
        for _ in 0..100 {
            if String::from_utf8_lossy(&captured.0.lock_unpoisoned()).contains("suppressed") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let text = String::from_utf8_lossy(&captured.0.lock_unpoisoned()).into_owned();
        let warnings = text.lines().filter(|l| l.contains("WARN")).count();
        assert!(
            warnings <= crate::ratelimit::WARN_BURST as usize + 1,
            "{warnings} warning lines for 256 Ki bad headers:\n{}",
            &text[..text.len().min(2000)]
        );
        let suppressed: u64 = text
            .split("suppressed ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count of what was suppressed: {text}"));
        assert!(suppressed > 256 * 1024, "{suppressed}");
        assert!(
            text.contains("similar warnings from instance flood in the last 10 s"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn exec_output_flows_under_credit_and_stdin_is_acknowledged() {
        let (client, guest, _dir) = pair().await;
        let (mut session, mut guest, id) = started(&client, guest).await;
        // Twice the window: the guest may only send more after the host took some.
        for n in 0..EXEC_WINDOW as u8 {
            guest.reply(id, data(n)).await;
        }
        let mut got = vec![];
        for n in EXEC_WINDOW as u8..2 * EXEC_WINDOW as u8 {
            let event = session.next().await.unwrap().unwrap();
            got.push(event);
            match guest.recv().await.command {
                HostCommand::ExecCredit { session, chunks } => {
                    assert_eq!((session, chunks), (id, 1))
                }
                other => panic!("expected a credit, got {other:?}"),
            }
            guest.reply(id, data(n)).await;
        }
        guest
            .reply(
                id,
                GuestReply::ExecExit {
                    status: ExecStatus::Exited { code: 3 },
                },
            )
            .await;
        while let Some(event) = session.next().await {
            got.push(event.unwrap());
        }
        let outputs = got
            .iter()
            .filter(|e| matches!(e, ExecEvent::Output { .. }))
            .count();
        assert_eq!(outputs, 2 * EXEC_WINDOW as usize);
        assert_eq!(
            got.last(),
            Some(&ExecEvent::Exit(ExecStatus::Exited { code: 3 }))
        );

        // Stdin: one chunk in flight, acknowledged before the next goes.
        let (client2, guest2, _dir2) = pair().await;
        let (session2, mut guest2, id2) = started(&client2, guest2).await;
        let stdin = session2.stdin();
        let big = vec![7u8; MAX_EXEC_CHUNK + 10];
        let write = stdin.write(&big, true);
        let ack = async {
            let mut sizes = vec![];
            for _ in 0..2 {
                let req = guest2.recv_not_credit().await;
                let HostCommand::ExecStdin { session, data, eof } = req.command else {
                    panic!("expected stdin");
                };
                assert_eq!(session, id2);
                sizes.push((data.len(), eof));
                guest2.reply(req.id, GuestReply::StdinWritten).await;
            }
            sizes
        };
        let (written, sizes) = tokio::join!(write, ack);
        written.unwrap();
        assert_eq!(sizes, vec![(MAX_EXEC_CHUNK, false), (10, true)]);
    }

    #[tokio::test]
    async fn output_beyond_the_credit_ends_and_kills_the_session() {
        let (client, guest, _dir) = pair().await;
        let (mut session, mut guest, id) = started(&client, guest).await;
        for n in 0..=EXEC_WINDOW as u8 {
            guest.reply(id, data(n)).await;
        }
        match guest.recv().await.command {
            HostCommand::ExecKill { session } => assert_eq!(session, id),
            other => panic!("expected a kill, got {other:?}"),
        }
        let mut outputs = 0;
        let end = loop {
            match session.next().await {
                Some(Ok(ExecEvent::Output { .. })) => outputs += 1,
                other => break other,
            }
        };
        assert_eq!(outputs, EXEC_WINDOW);
        assert!(matches!(end, Some(Err(AgentError::Overrun))), "{end:?}");
        assert!(session.next().await.is_none());
    }

    #[tokio::test]
    async fn untrusted_statuses_and_chunks_are_refused() {
        let cases = [
            GuestReply::ExecExit {
                status: ExecStatus::Exited { code: 300 },
            },
            GuestReply::ExecData {
                stream: ExecStream::Stderr,
                data: vec![0; MAX_EXEC_CHUNK + 1],
            },
            GuestReply::FileChunk {
                hex: String::new(),
                size: 0,
            },
        ];
        for reply in cases {
            let (client, guest, _dir) = pair().await;
            let (mut session, mut guest, id) = started(&client, guest).await;
            guest.reply(id, reply.clone()).await;
            let event = session.next().await;
            assert!(
                matches!(
                    event,
                    Some(Err(AgentError::Protocol(_) | AgentError::WrongReply { .. }))
                ),
                "{reply:?} gave {event:?}"
            );
            assert!(matches!(
                guest.recv_not_credit().await.command,
                HostCommand::ExecKill { .. }
            ));
        }
    }

    #[tokio::test]
    async fn dropping_a_running_session_kills_the_command() {
        let (client, guest, _dir) = pair().await;
        let (session, mut guest, id) = started(&client, guest).await;
        drop(session);
        match guest.recv().await.command {
            HostCommand::ExecKill { session } => assert_eq!(session, id),
            other => panic!("expected a kill, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_missing_command_and_a_refusal_answer_the_start() {
        let (client, guest, _dir) = pair().await;
        let start = client.exec(vec!["nope".into()], T, false, T);
        let answer = async {
            let mut guest = guest.await.unwrap();
            let req = guest.recv().await;
            guest
                .reply(
                    req.id,
                    GuestReply::ExecExit {
                        status: ExecStatus::NotFound,
                    },
                )
                .await;
            let req = guest.recv().await;
            guest
                .reply(
                    req.id,
                    GuestReply::Error {
                        message: "too many exec sessions\nmore".into(),
                    },
                )
                .await;
        };
        let (session, ()) = tokio::join!(
            async {
                let mut session = start.await.unwrap();
                let first = session.next().await;
                let refused = client.exec(vec!["x".into()], T, false, T).await;
                (first, refused.err())
            },
            answer
        );
        let (first, refused) = session;
        assert_eq!(
            first.unwrap().unwrap(),
            ExecEvent::Exit(ExecStatus::NotFound)
        );
        assert!(
            matches!(&refused, Some(AgentError::Refused { message }) if message == "too many exec sessions"),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn typed_calls_reject_the_wrong_reply() {
        let (client, guest, _dir) = pair().await;
        let call = client.health(T);
        let answer = async {
            let mut guest = guest.await.unwrap();
            let req = guest.recv().await;
            assert_eq!(req.command, HostCommand::Health);
            guest.reply(req.id, GuestReply::ShuttingDown).await;
            guest
        };
        let (health, mut guest) = tokio::join!(call, answer);
        assert!(matches!(
            health,
            Err(AgentError::WrongReply { request: "health" })
        ));
        let call = client.read_file("/x", 0, T);
        let answer = async {
            let req = guest.recv().await;
            guest
                .reply(
                    req.id,
                    GuestReply::FileChunk {
                        hex: "zz".into(),
                        size: 1,
                    },
                )
                .await;
        };
        let (chunk, ()) = tokio::join!(call, answer);
        assert!(
            matches!(chunk, Err(AgentError::Malformed { .. })),
            "{chunk:?}"
        );
    }
}
