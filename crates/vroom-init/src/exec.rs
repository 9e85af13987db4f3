//! Exec sessions in the guest: the command's pipes stream to the host as
//! they fill, gated by the host's credits, and its stdin is fed chunk by
//! chunk (the protocol is documented in `vroom_agent_proto::exec`).
//!
//! Each session uses the thread of its `ExecStart` request (which waits for
//! the end) and one reader thread per output pipe. A reader without credit
//! stops reading, so the command blocks on a full pipe instead of anything
//! piling up in memory.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vroom_agent_proto::{
    ExecStatus, ExecStream, GuestReply, Response, MAX_EXEC_CHUNK, MAX_EXEC_SESSIONS,
    MAX_EXEC_WINDOW,
};
use vroom_base::LockExt;

use crate::reply::send;
use crate::supervisor::Supervisor;

/// The longest timeout the guest honours, whatever the host asks.
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<u64, Arc<Session>>>,
}

#[derive(Default)]
struct Session {
    /// The command's process group, once spawned (0 before).
    pgid: AtomicI32,
    flow: Mutex<Flow>,
    wake: Condvar,
    stdin: Mutex<Option<ChildStdin>>,
}

#[derive(Default)]
struct Flow {
    credit: u32,
    cancelled: bool,
}

impl Session {
    /// Waits for one output credit; `false` once the session is cancelled.
    fn take_credit(&self) -> bool {
        let mut flow = self.flow.lock_unpoisoned();
        while flow.credit == 0 && !flow.cancelled {
            flow = self.wake.wait(flow).unwrap_or_else(|p| p.into_inner());
        }
        if flow.cancelled {
            return false;
        }
        flow.credit -= 1;
        true
    }

    fn grant(&self, chunks: u32) {
        let mut flow = self.flow.lock_unpoisoned();
        flow.credit = flow.credit.saturating_add(chunks).min(MAX_EXEC_WINDOW);
        self.wake.notify_all();
    }

    /// Kills the process group and stops the readers.
    fn cancel(&self) {
        self.flow.lock_unpoisoned().cancelled = true;
        self.wake.notify_all();
        let pgid = self.pgid.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: signalling the command's own process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// What `ExecStart` asks for.
pub struct StartExec {
    pub id: u64,
    pub argv: Vec<String>,
    pub timeout_ms: u64,
    pub stdin: bool,
    pub window: u32,
}

impl Sessions {
    fn get(&self, session: u64) -> Option<Arc<Session>> {
        self.map.lock_unpoisoned().get(&session).cloned()
    }

    /// Runs one session to its end on the calling thread.
    pub fn run(&self, supervisor: &Supervisor, writer: &Arc<Mutex<File>>, start: StartExec) {
        let id = start.id;
        let reply = |reply: GuestReply| send(writer, &Response { id, reply });
        if start.argv.is_empty() {
            return reply(GuestReply::Error {
                message: "exec needs a command".into(),
            });
        }
        let session = Arc::new(Session::default());
        session.grant(start.window);
        {
            let mut map = self.map.lock_unpoisoned();
            if map.len() >= MAX_EXEC_SESSIONS {
                drop(map);
                return reply(GuestReply::Error {
                    message: format!("too many exec sessions (at most {MAX_EXEC_SESSIONS})"),
                });
            }
            if map.contains_key(&id) {
                drop(map);
                return reply(GuestReply::Error {
                    message: format!("exec session {id} already exists"),
                });
            }
            map.insert(id, session.clone());
        }
        let status = run_spawned(supervisor, writer, &session, &start);
        self.map.lock_unpoisoned().remove(&id);
        // Close our end of stdin. A writer still blocked on a pipe that a
        // leftover process keeps open holds the lock; it closes stdin itself
        // when it returns (it owns the last reference to the session).
        if let Ok(mut stdin) = session.stdin.try_lock() {
            drop(stdin.take());
        }
        reply(GuestReply::ExecExit { status });
    }

    /// Writes a stdin chunk into the session's pipe; `eof` closes it after.
    pub fn write_stdin(&self, session: u64, data: &[u8], eof: bool) -> Result<(), String> {
        let session = self
            .get(session)
            .ok_or_else(|| format!("no exec session {session}"))?;
        let mut stdin = session.stdin.lock_unpoisoned();
        let pipe = stdin
            .as_mut()
            .ok_or("the command's stdin is closed or was not requested")?;
        pipe.write_all(&data[..data.len().min(MAX_EXEC_CHUNK)])
            .map_err(|e| format!("write to the command's stdin: {e}"))?;
        if eof {
            drop(stdin.take());
        }
        Ok(())
    }

    pub fn credit(&self, session: u64, chunks: u32) {
        if let Some(session) = self.get(session) {
            session.grant(chunks);
        }
    }

    pub fn kill(&self, session: u64) {
        if let Some(session) = self.get(session) {
            session.cancel();
        }
    }

    /// The host end went away: nobody will read these sessions' output.
    pub fn kill_all(&self) {
        let sessions: Vec<Arc<Session>> = self.map.lock_unpoisoned().values().cloned().collect();
        for session in sessions {
            session.cancel();
        }
    }
}

/// Spawns the command, streams its output and waits for its end (or its timeout).
fn run_spawned(
    supervisor: &Supervisor,
    writer: &Arc<Mutex<File>>,
    session: &Arc<Session>,
    start: &StartExec,
) -> ExecStatus {
    let id = start.id;
    let Some((program, args)) = start.argv.split_first() else {
        return ExecStatus::NotFound;
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if start.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, exited) = match supervisor.spawn_exec(&mut command) {
        Ok(spawned) => spawned,
        Err(e) if e.kind() == ErrorKind::NotFound => return ExecStatus::NotFound,
        Err(e) => {
            return ExecStatus::CannotRun {
                message: format!("{program}: {e}"),
            }
        }
    };
    session.pgid.store(child.id() as i32, Ordering::SeqCst);
    if session.flow.lock_unpoisoned().cancelled {
        session.cancel();
    }
    *session.stdin.lock_unpoisoned() = child.stdin.take();
    send(
        writer,
        &Response {
            id,
            reply: GuestReply::ExecStarted,
        },
    );
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let pipes: [(ExecStream, Option<Box<dyn Read + Send>>); 2] = [
        (
            ExecStream::Stdout,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            ExecStream::Stderr,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ];
    let mut readers = 0;
    for (stream, pipe) in pipes {
        let Some(pipe) = pipe else { continue };
        readers += 1;
        let (session, done, writer) = (session.clone(), done_tx.clone(), writer.clone());
        std::thread::spawn(move || {
            pump(&session, &writer, id, stream, pipe);
            let _ = done.send(());
        });
    }
    let timeout = Duration::from_millis(start.timeout_ms).min(MAX_TIMEOUT);
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut raw = exited.recv_timeout(left()).ok();
    let mut finished = raw.is_some();
    if finished {
        for _ in 0..readers {
            if done_rx.recv_timeout(left()).is_err() {
                finished = false;
                break;
            }
        }
    }
    let timed_out = !finished && !session.flow.lock_unpoisoned().cancelled;
    if !finished {
        session.cancel();
        if raw.is_none() {
            raw = exited.recv().ok();
        }
    }
    if timed_out {
        return ExecStatus::TimedOut;
    }
    let raw = raw.unwrap_or(libc::SIGKILL);
    if libc::WIFEXITED(raw) {
        ExecStatus::Exited {
            code: libc::WEXITSTATUS(raw),
        }
    } else {
        ExecStatus::Signaled {
            signal: libc::WTERMSIG(raw),
        }
    }
}

/// Copies one pipe to the host, one credit per chunk.
fn pump(
    session: &Session,
    writer: &Mutex<File>,
    id: u64,
    stream: ExecStream,
    mut pipe: Box<dyn Read + Send>,
) {
    let mut buf = vec![0u8; MAX_EXEC_CHUNK];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if !session.take_credit() {
            return;
        }
        send(
            writer,
            &Response {
                id,
                reply: GuestReply::ExecData {
                    stream,
                    data: buf[..n].to_vec(),
                },
            },
        );
    }
}
