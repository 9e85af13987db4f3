//! Exec sessions: a command in the guest whose stdin, stdout and stderr
//! stream over the agent channel as bytes, multiplexed with every other
//! message by the id of the request that started it.
//!
//! # The exchange
//!
//! ```text
//! host                                             guest
//! Request{id: S, ExecStart{argv, timeout_ms,
//!                          stdin, window}}   ──▶
//!                                            ◀──   Response{id: S, ExecStarted}
//!                                                  (or ExecExit{NotFound|CannotRun} or Error)
//! Request{id: A, ExecStdin{session: S, data}} ──▶  written to the command's stdin pipe, then
//!                                            ◀──   Response{id: A, StdinWritten}
//!                                            ◀──   Response{id: S, ExecData{stream, data}}  (uses one credit)
//! Request{id: B, ExecCredit{session: S, n}}   ──▶  (no answer)
//!                                            ◀──   Response{id: S, ExecExit{status}}        (last)
//! Request{id: C, ExecKill{session: S}}        ──▶  (no answer; the guest kills the process
//!                                                  group and ends the session)
//! ```
//!
//! # Bounds
//!
//! - A data chunk (either direction) holds at most [`MAX_EXEC_CHUNK`] bytes,
//!   base64 in the JSON payload, well under the frame limit.
//! - Output is credit-based: the guest sends an `ExecData` only while it
//!   holds a credit; `ExecStart.window` grants the first ones (at most
//!   [`MAX_EXEC_WINDOW`]) and each `ExecCredit` more. A guest without credit
//!   stops reading the command's pipes, so a slow reader slows the command
//!   down instead of filling memory on either side. The host treats data
//!   beyond the credit it gave as a protocol violation and ends the session.
//! - Stdin is acknowledged chunk by chunk: the host sends the next chunk only
//!   after `StdinWritten`, so at most one chunk per session is in flight.
//!   `eof: true` closes the command's stdin after that chunk's bytes.
//! - The guest runs at most [`MAX_EXEC_SESSIONS`] sessions at once and
//!   refuses more with an `Error` reply.
//! - The guest kills the command's process group at `timeout_ms`
//!   (`ExecExit{TimedOut}`), on `ExecKill`, and when the host end of the
//!   channel disconnects.
//!
//! # Versioning
//!
//! These messages were added to frame version 1 as new `type`s; a guest
//! built before them cannot parse `exec_start` and never answers, which the
//! host reports as a timeout (rebuild the image to update its vroom-init).
//! The buffered `exec` request of the first release is no longer served.

use serde::{Deserialize, Serialize};

/// The most bytes one `ExecData` or `ExecStdin` carries.
pub const MAX_EXEC_CHUNK: usize = 64 * 1024;
/// The most output credits the host may hold out at once, per session.
pub const MAX_EXEC_WINDOW: u32 = 16;
/// The most exec sessions a guest runs at once.
pub const MAX_EXEC_SESSIONS: usize = 16;

/// Which output stream a chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStream {
    Stdout,
    Stderr,
}

/// How an exec session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum ExecStatus {
    /// The command exited by itself with this code (0..=255).
    Exited { code: i32 },
    /// The command was killed by this signal (1..=64).
    Signaled { signal: i32 },
    /// The command ran past its timeout and its process group was killed.
    TimedOut,
    /// The program does not exist in the guest.
    NotFound,
    /// The program exists but could not be started (e.g. not executable).
    CannotRun { message: String },
}

/// A reason to distrust an exec message from the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidExecMessage {
    #[error("an exec chunk of {len} bytes exceeds the {MAX_EXEC_CHUNK} byte limit")]
    ChunkTooLong { len: usize },
    #[error("exit code {code} is outside 0..=255")]
    ExitCode { code: i32 },
    #[error("signal {signal} is outside 1..=64")]
    Signal { signal: i32 },
    #[error("a message of {len} bytes exceeds the {MAX_EXEC_MESSAGE} byte limit")]
    MessageTooLong { len: usize },
}

/// The longest `CannotRun` message the host accepts.
pub const MAX_EXEC_MESSAGE: usize = 1024;

impl ExecStatus {
    /// Checks what the guest reported; the host calls it on every status.
    pub fn validate(&self) -> Result<(), InvalidExecMessage> {
        match self {
            ExecStatus::Exited { code } if !(0..=255).contains(code) => {
                Err(InvalidExecMessage::ExitCode { code: *code })
            }
            ExecStatus::Signaled { signal } if !(1..=64).contains(signal) => {
                Err(InvalidExecMessage::Signal { signal: *signal })
            }
            ExecStatus::CannotRun { message } if message.len() > MAX_EXEC_MESSAGE => {
                Err(InvalidExecMessage::MessageTooLong { len: message.len() })
            }
            _ => Ok(()),
        }
    }

    /// The exit code a shell would report: the code itself, 128+n for a
    /// signal, 124 for a timeout (as `timeout(1)`), 127 for a missing
    /// program and 126 for one that cannot run.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExecStatus::Exited { code } => *code,
            ExecStatus::Signaled { signal } => 128 + signal,
            ExecStatus::TimedOut => 124,
            ExecStatus::NotFound => 127,
            ExecStatus::CannotRun { .. } => 126,
        }
    }
}

/// The conventional name of a Linux signal (x86-64 numbering).
pub fn signal_name(signal: i32) -> Option<&'static str> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    usize::try_from(signal)
        .ok()
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| NAMES.get(i).copied())
}

/// Checks a data chunk's size.
pub fn validate_chunk(data: &[u8]) -> Result<(), InvalidExecMessage> {
    if data.len() > MAX_EXEC_CHUNK {
        return Err(InvalidExecMessage::ChunkTooLong { len: data.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_shell_conventions() {
        let cases = [
            (ExecStatus::Exited { code: 0 }, 0),
            (ExecStatus::Exited { code: 7 }, 7),
            (ExecStatus::Signaled { signal: 9 }, 137),
            (ExecStatus::TimedOut, 124),
            (ExecStatus::NotFound, 127),
            (
                ExecStatus::CannotRun {
                    message: "denied".into(),
                },
                126,
            ),
        ];
        for (status, code) in cases {
            assert_eq!(status.exit_code(), code, "{status:?}");
        }
    }

    #[test]
    fn statuses_from_the_guest_are_validated() {
        let cases = [
            (ExecStatus::Exited { code: 255 }, true),
            (ExecStatus::Exited { code: 256 }, false),
            (ExecStatus::Exited { code: -1 }, false),
            (ExecStatus::Signaled { signal: 15 }, true),
            (ExecStatus::Signaled { signal: 0 }, false),
            (ExecStatus::Signaled { signal: 65 }, false),
            (ExecStatus::Signaled { signal: i32::MAX }, false),
            (
                ExecStatus::CannotRun {
                    message: "x".repeat(MAX_EXEC_MESSAGE + 1),
                },
                false,
            ),
            (ExecStatus::TimedOut, true),
        ];
        for (status, ok) in cases {
            assert_eq!(status.validate().is_ok(), ok, "{status:?}");
        }
    }

    #[test]
    fn signal_names_table() {
        let cases = [
            (1, Some("SIGHUP")),
            (9, Some("SIGKILL")),
            (15, Some("SIGTERM")),
            (31, Some("SIGSYS")),
            (0, None),
            (32, None),
            (-9, None),
        ];
        for (signal, name) in cases {
            assert_eq!(signal_name(signal), name, "{signal}");
        }
    }

    #[test]
    fn chunks_are_bounded() {
        assert!(validate_chunk(&vec![0; MAX_EXEC_CHUNK]).is_ok());
        assert_eq!(
            validate_chunk(&vec![0; MAX_EXEC_CHUNK + 1]),
            Err(InvalidExecMessage::ChunkTooLong {
                len: MAX_EXEC_CHUNK + 1
            })
        );
    }
}
