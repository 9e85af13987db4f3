//! Talking to a running guest: exec sessions, copying files out, console logs.

use super::*;
use crate::agent::{AgentError, ExecEvent as AgentExecEvent, ExecSession, ExecStdin};
use crate::console::ConsoleHistory;
use vroom_agent_proto::{signal_name, ExecStatus, ExecStream, MAX_FILE_COPY};
use vroom_types::{ApiErrorBody, ExecEvent, ExecExit, ExitReason};

impl Engine {
    /// Starts a command in a running guest. Its output, then its exit, come
    /// from [`GuestExec::next`]; dropping the `GuestExec` early kills it.
    pub async fn exec(&self, name: &str, req: ExecRequest) -> Result<GuestExec, OpError> {
        let timeout = req
            .validate()
            .map_err(|e| OpError::new(ErrorCode::InvalidArgument, e.to_string()))?;
        let cell = self.running_cell(name)?;
        let program = req.argv[0].clone();
        tracing::debug!(instance = name, program, stdin = req.stdin, "exec");
        let session = cell
            .agent
            .exec(req.argv, timeout, req.stdin, AGENT_TIMEOUT)
            .await
            .map_err(|e| match e {
                AgentError::Refused { .. } => {
                    OpError::wrap(ErrorCode::ResourceExhausted, "exec refused", e)
                }
                AgentError::Timeout(_) => OpError::wrap(
                    ErrorCode::Timeout,
                    "exec failed: the guest agent did not answer (a hung guest: `vroom logs` shows its console, `vroom restart` reboots it)",
                    e,
                ),
                e => OpError::wrap(ErrorCode::GuestError, "exec failed", e),
            })?;
        let stdin = req.stdin.then(|| GuestStdin(session.stdin()));
        Ok(GuestExec {
            session,
            stdin,
            program,
            timeout,
            // The guest kills the command at its timeout; this only guards
            // against a guest that never reports the end.
            deadline: tokio::time::Instant::now() + timeout + EXEC_GRACE,
            done: false,
        })
    }

    /// Opens a regular file in a running guest for copying out, reading its
    /// first chunk (so that a missing file or a FIFO fails here, not midway).
    pub async fn read_file(&self, name: &str, path: &str) -> Result<GuestFile, OpError> {
        if !path.starts_with('/') {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!("{path:?} is not an absolute path in the guest"),
            ));
        }
        let cell = self.running_cell(name)?;
        let mut file = GuestFile {
            cell,
            path: path.to_string(),
            offset: 0,
            size: 0,
            first: None,
            done: false,
        };
        let first = file.fetch().await?;
        file.first = Some(first);
        Ok(file)
    }

    pub(super) fn running_cell(&self, name: &str) -> Result<Arc<Cell>, OpError> {
        let cell = self.cell(name)?;
        let state = cell.lock().instance.status.state;
        if state != InstanceState::Running {
            return Err(OpError::conflict(format!(
                "instance {name} is {state}, not running"
            )));
        }
        Ok(cell)
    }

    /// A piece of the console log of boot `boot` (0: the current one, -1 the
    /// one before, down to `-KEPT_BOOTS`); offsets as `crate::console` says.
    pub fn logs(&self, name: &str, boot: i32, offset: u64) -> Result<(String, u64), OpError> {
        let cell = self.cell(name)?;
        if !(-KEPT_BOOTS..=0).contains(&boot) {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!("boot {boot} is out of range: 0 is the current boot, -1 to -{KEPT_BOOTS} earlier ones"),
            ));
        }
        let (buf, next) = blocking(|| cell.console.read(boot, offset, MAX_LOG_CHUNK))
            .map_err(|e| OpError::internal("failed to read the console log", e))?;
        Ok((String::from_utf8_lossy(&buf).into_owned(), next))
    }
}

impl Engine {
    /// Instance `name`'s console history, to send with it to another node.
    pub fn console_history(&self, name: &str) -> Result<ConsoleHistory, OpError> {
        let cell = self.cell(name)?;
        blocking(move || cell.console.export())
            .map_err(|e| OpError::internal("failed to read the console log", e))
    }

    /// Puts the console history a migrated instance brought before what its
    /// guest wrote here, so `vroom logs` shows the whole boot.
    pub fn adopt_console(&self, name: &str, history: ConsoleHistory) -> Result<(), OpError> {
        let cell = self.cell(name)?;
        blocking(move || cell.console.adopt(&history))
            .map_err(|e| OpError::internal("failed to write the console log", e))
    }
}

/// How long after its timeout the host gives up on a command whose guest
/// never reported its end.
const EXEC_GRACE: Duration = Duration::from_secs(15);

/// A command running in a guest.
pub struct GuestExec {
    session: ExecSession,
    stdin: Option<GuestStdin>,
    program: String,
    timeout: Duration,
    deadline: tokio::time::Instant,
    done: bool,
}

impl GuestExec {
    /// The command's stdin, once, if the request asked for it.
    pub fn take_stdin(&mut self) -> Option<GuestStdin> {
        self.stdin.take()
    }

    /// The next output chunk, then one `exit` or `error` event, then `None`.
    /// Not cancel-safe: a future dropped after it took an event from the
    /// guest loses that event; poll each one to its end.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        if self.done {
            return None;
        }
        let event = match tokio::time::timeout_at(self.deadline, self.session.next()).await {
            Ok(Some(Ok(AgentExecEvent::Output { stream, data }))) => match stream {
                ExecStream::Stdout => ExecEvent::Stdout { data },
                ExecStream::Stderr => ExecEvent::Stderr { data },
            },
            Ok(Some(Ok(AgentExecEvent::Exit(status)))) => {
                ExecEvent::Exit(exec_exit(&status, &self.program, self.timeout))
            }
            Ok(Some(Err(e))) => exec_error(OpError::wrap(ErrorCode::GuestError, "exec failed", e)),
            Ok(None) => return None,
            Err(_) => exec_error(OpError::new(
                ErrorCode::GuestError,
                "exec failed: the guest did not end the command after its timeout",
            )),
        };
        if matches!(event, ExecEvent::Exit(_) | ExecEvent::Error { .. }) {
            self.done = true;
        }
        Some(event)
    }
}

fn exec_error(e: OpError) -> ExecEvent {
    tracing::warn!(error = %e.message, "exec failed");
    ExecEvent::Error {
        error: ApiErrorBody {
            code: e.code,
            message: e.message,
        },
    }
}

/// What the user sees of how a command ended.
fn exec_exit(status: &ExecStatus, program: &str, timeout: Duration) -> ExecExit {
    let (reason, message) = match status {
        ExecStatus::Exited { .. } => (ExitReason::Exited, None),
        ExecStatus::Signaled { signal } => (
            ExitReason::Signaled,
            Some(match signal_name(*signal) {
                Some(name) => format!("killed by signal {signal} ({name})"),
                None => format!("killed by signal {signal}"),
            }),
        ),
        ExecStatus::TimedOut => (
            ExitReason::TimedOut,
            Some(format!(
                "timed out after {}s; the command was killed",
                timeout.as_secs()
            )),
        ),
        ExecStatus::NotFound => (ExitReason::NotFound, Some(format!("{program}: not found"))),
        ExecStatus::CannotRun { message } => (ExitReason::CannotRun, Some(truncate(message))),
    };
    ExecExit {
        exit_code: status.exit_code(),
        reason,
        message,
    }
}

/// Feeds a command's stdin.
pub struct GuestStdin(ExecStdin);

impl GuestStdin {
    /// Writes bytes (waiting until the guest took them); `eof` closes stdin after.
    pub async fn write(&self, data: &[u8], eof: bool) -> Result<(), OpError> {
        self.0.write(data, eof).await.map_err(|e| {
            OpError::wrap(ErrorCode::GuestError, "cannot write the command's stdin", e)
        })
    }
}

/// A file being copied out of a guest, chunk by chunk as the reader asks:
/// the daemon holds at most one chunk.
pub struct GuestFile {
    cell: Arc<Cell>,
    path: String,
    offset: u64,
    size: u64,
    first: Option<Vec<u8>>,
    done: bool,
}

impl GuestFile {
    /// The file's size when it was last read.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk; `None` at the end. A file that grows while it is read
    /// is copied up to its size at the last read, at most [`MAX_FILE_COPY`].
    pub async fn next_chunk(&mut self) -> Option<Result<Vec<u8>, OpError>> {
        if let Some(first) = self.first.take() {
            self.done = first.is_empty() || self.offset >= self.size;
            return Some(Ok(first));
        }
        if self.done {
            return None;
        }
        let chunk = self.fetch().await;
        match &chunk {
            Ok(data) if data.is_empty() => return None,
            Ok(_) => self.done = self.offset >= self.size,
            Err(_) => self.done = true,
        }
        Some(chunk)
    }

    async fn fetch(&mut self) -> Result<Vec<u8>, OpError> {
        let chunk = self
            .cell
            .agent
            .read_file(&self.path, self.offset, AGENT_TIMEOUT)
            .await
            .map_err(|e| match e {
                AgentError::Refused { message } if message.ends_with("bytes cp copies") => {
                    OpError::new(ErrorCode::ResourceExhausted, message)
                }
                // A well-formed path with no regular file behind it (missing,
                // a directory, a FIFO...): what was asked for is not there.
                AgentError::Refused { message } => OpError::new(ErrorCode::NotFound, message),
                e => OpError::wrap(ErrorCode::GuestError, "copy failed", e),
            })?;
        within_copy_cap(&self.path, self.offset, chunk.data.len(), chunk.size)?;
        self.offset += chunk.data.len() as u64;
        self.size = chunk.size;
        Ok(chunk.data)
    }
}

/// The host's own check of what the guest says of a file it copies: the
/// guest is not trusted to stop at the cap, whatever size it claims.
fn within_copy_cap(path: &str, offset: u64, len: usize, size: u64) -> Result<(), OpError> {
    if size > MAX_FILE_COPY || offset.saturating_add(len as u64) > MAX_FILE_COPY {
        return Err(OpError::new(
            ErrorCode::ResourceExhausted,
            format!("{path} is larger than the {MAX_FILE_COPY} bytes cp copies"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_stop_at_the_cap_whatever_the_guest_claims() {
        let cap = MAX_FILE_COPY;
        // (offset, chunk length, claimed size, allowed)
        let cases = [
            (0, 100, 100, true),
            (0, 0, 0, true),
            (cap - 10, 10, cap, true),
            (0, 10, cap + 1, false),
            (cap - 10, 11, 0, false),
            (cap, 1, 0, false),
            (u64::MAX, 1, 0, false),
            (0, 10, u64::MAX, false),
        ];
        for (offset, len, size, allowed) in cases {
            let got = within_copy_cap("/f", offset, len, size);
            assert_eq!(got.is_ok(), allowed, "{offset} {len} {size}");
            if let Err(e) = got {
                assert_eq!(e.code, ErrorCode::ResourceExhausted);
            }
        }
    }

    #[test]
    fn exits_are_explained() {
        let t = Duration::from_secs(5);
        let cases = [
            (ExecStatus::Exited { code: 3 }, 3, ExitReason::Exited, None),
            (
                ExecStatus::Signaled { signal: 9 },
                137,
                ExitReason::Signaled,
                Some("killed by signal 9 (SIGKILL)"),
            ),
            (
                ExecStatus::Signaled { signal: 40 },
                168,
                ExitReason::Signaled,
                Some("killed by signal 40"),
            ),
            (
                ExecStatus::TimedOut,
                124,
                ExitReason::TimedOut,
                Some("timed out after 5s; the command was killed"),
            ),
            (
                ExecStatus::NotFound,
                127,
                ExitReason::NotFound,
                Some("nope: not found"),
            ),
        ];
        for (status, code, reason, message) in cases {
            let exit = exec_exit(&status, "nope", t);
            assert_eq!(
                (exit.exit_code, exit.reason, exit.message.as_deref()),
                (code, reason, message),
                "{status:?}"
            );
        }
    }
}
