//! The exec stream of `POST /v1/instances/{name}/exec`.
//!
//! The request body is one JSON line, an [`ExecRequest`](crate::ExecRequest),
//! followed (when it asks for `stdin`) by the raw bytes of the command's
//! stdin up to the end of the body. The answer is a stream of JSON lines
//! (`application/x-ndjson`), one [`ExecEvent`] each: output chunks as they
//! come (base64), then exactly one `exit` or `error` line.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ApiErrorBody;

/// The default and the bounds of `timeout_secs`.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 30;
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 24 * 3600;
/// The most bytes of the first line (the request) of an exec body.
pub const MAX_EXEC_REQUEST_BYTES: usize = 256 * 1024;

/// The most bytes of each stream a buffered exec result keeps
/// ([`crate::ExecResult`]: `vroom exec --json`, the client's `exec`); the
/// exec stream itself passes every byte through, flow-controlled.
pub const MAX_EXEC_RESULT_BYTES: usize = 256 * 1024;

/// One stream of a buffered exec result: keeps the first
/// [`MAX_EXEC_RESULT_BYTES`] and counts the rest.
#[derive(Debug, Default)]
pub struct CappedOutput {
    kept: Vec<u8>,
    dropped: u64,
}

impl CappedOutput {
    pub fn push(&mut self, data: &[u8]) {
        let room = MAX_EXEC_RESULT_BYTES - self.kept.len();
        let (keep, drop) = data.split_at(data.len().min(room));
        self.kept.extend_from_slice(keep);
        self.dropped += drop.len() as u64;
    }

    /// Whether bytes were left out.
    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// The kept bytes as text, invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecRequestError {
    #[error("exec needs a command")]
    NoCommand,
    #[error("invalid timeout {secs}s: must be between 1 and {MAX_EXEC_TIMEOUT_SECS} seconds")]
    Timeout { secs: u64 },
}

impl crate::ExecRequest {
    /// Checks the request; returns its timeout.
    pub fn validate(&self) -> Result<Duration, ExecRequestError> {
        // An empty program name is the guest's to refuse, like any other it
        // cannot find (exit 127), as the document's `minItems: 1` allows it.
        if self.argv.is_empty() {
            return Err(ExecRequestError::NoCommand);
        }
        let secs = self.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS);
        if !(1..=MAX_EXEC_TIMEOUT_SECS).contains(&secs) {
            return Err(ExecRequestError::Timeout { secs });
        }
        Ok(Duration::from_secs(secs))
    }
}

/// One line of the exec answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// Bytes the command wrote to stdout.
    Stdout {
        #[serde(with = "vroom_base::base64_bytes")]
        #[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
        data: Vec<u8>,
    },
    /// Bytes the command wrote to stderr.
    Stderr {
        #[serde(with = "vroom_base::base64_bytes")]
        #[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
        data: Vec<u8>,
    },
    /// The command ended; the last line.
    Exit(ExecExit),
    /// The exec failed (the guest or its agent broke down); the last line.
    Error { error: ApiErrorBody },
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecExit {
    /// What a shell would report: the command's code, 128+n for signal n,
    /// 124 for a timeout, 127 for a missing program, 126 for one that cannot run.
    pub exit_code: i32,
    pub reason: ExitReason,
    /// Why the command did not exit by itself, for the user (e.g. "killed by signal 9 (SIGKILL)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    Exited,
    Signaled,
    TimedOut,
    NotFound,
    CannotRun,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExecRequest;

    #[test]
    fn capped_output_keeps_the_first_bytes_and_says_it_cut() {
        let max = MAX_EXEC_RESULT_BYTES;
        let cases: &[(&[usize], usize, bool)] = &[
            (&[], 0, false),
            (&[10, 20], 30, false),
            (&[max], max, false),
            (&[max - 1, 2], max, true),
            (&[64 * 1024; 16], max, true),
            (&[1_000_000], max, true),
        ];
        for (chunks, kept, truncated) in cases {
            let mut out = CappedOutput::default();
            for len in *chunks {
                out.push(&vec![b'x'; *len]);
            }
            assert_eq!(
                (out.text().len(), out.truncated()),
                (*kept, *truncated),
                "{chunks:?}"
            );
        }
    }

    #[test]
    fn exec_requests_table() {
        let req = |argv: &[&str], timeout_secs: Option<u64>| ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_secs,
            stdin: false,
        };
        let cases = [
            (req(&["ls"], None), Ok(Duration::from_secs(30))),
            (req(&["ls"], Some(1)), Ok(Duration::from_secs(1))),
            (req(&["ls"], Some(86400)), Ok(Duration::from_secs(86400))),
            (
                req(&["ls"], Some(0)),
                Err(ExecRequestError::Timeout { secs: 0 }),
            ),
            (
                req(&["ls"], Some(u64::MAX)),
                Err(ExecRequestError::Timeout { secs: u64::MAX }),
            ),
            (req(&[], None), Err(ExecRequestError::NoCommand)),
            (req(&[""], None), Ok(Duration::from_secs(30))),
        ];
        for (req, want) in cases {
            assert_eq!(req.validate(), want, "{req:?}");
        }
    }

    #[test]
    fn exec_request_json_table() {
        let cases = [
            (r#"{"argv":["ls"]}"#, true),
            (r#"{"argv":["cat"],"timeout_secs":5,"stdin":true}"#, true),
            (r#"{"argv":["ls"],"bogus":1}"#, false),
            (r#"{"argv":"ls"}"#, false),
            (r#"{"timeout_secs":5}"#, false),
        ];
        for (json, ok) in cases {
            assert_eq!(
                serde_json::from_str::<ExecRequest>(json).is_ok(),
                ok,
                "{json}"
            );
        }
    }

    #[test]
    fn events_wire_format() {
        let cases = [
            (
                ExecEvent::Stdout {
                    data: vec![0, 0xff, b'a'],
                },
                r#"{"type":"stdout","data":"AP9h"}"#,
            ),
            (
                ExecEvent::Exit(ExecExit {
                    exit_code: 124,
                    reason: ExitReason::TimedOut,
                    message: Some("timed out".into()),
                }),
                r#"{"type":"exit","exit_code":124,"reason":"timed_out","message":"timed out"}"#,
            ),
            (
                ExecEvent::Exit(ExecExit {
                    exit_code: 0,
                    reason: ExitReason::Exited,
                    message: None,
                }),
                r#"{"type":"exit","exit_code":0,"reason":"exited"}"#,
            ),
        ];
        for (event, json) in cases {
            assert_eq!(serde_json::to_string(&event).unwrap(), json);
            let back = serde_json::from_str::<ExecEvent>(json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        assert!(serde_json::from_str::<ExecEvent>(r#"{"type":"stdout","data":"%%"}"#).is_err());
    }
}
