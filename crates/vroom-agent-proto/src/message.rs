//! Messages, JSON inside frames. Unknown fields are ignored so that either
//! side can add optional fields without a new frame version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The most output an exec returns per stream; the rest is cut.
pub const MAX_EXEC_OUTPUT: usize = 256 * 1024;

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub command: HostCommand,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostCommand {
    /// Report readiness, services and the config in force.
    Health,
    /// Run a command and return its output.
    Exec { argv: Vec<String>, timeout_ms: u64 },
    /// Make these values the whole config: write them durably, re-render, restart what depends on them.
    ApplyConfig { values: BTreeMap<String, String> },
    /// Stop services, sync and unmount, power off.
    Shutdown,
}

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub reply: GuestReply,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestReply {
    Health(HealthReport),
    Exec(ExecOutput),
    /// The config is on disk (fsynced) and applied.
    ConfigApplied {
        values: BTreeMap<String, String>,
    },
    ShuttingDown,
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Boot finished: volumes mounted, config applied, services started, health check passed.
    pub ready: bool,
    pub uptime_ms: u64,
    pub services: Vec<ServiceHealth>,
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHealth {
    pub name: String,
    pub running: bool,
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let req = Request {
            id: 7,
            command: HostCommand::ApplyConfig {
                values: [("a".into(), "b".into())].into(),
            },
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"id":7,"command":{"type":"apply_config","values":{"a":"b"}}}"#
        );
        let resp: Response =
            serde_json::from_str(r#"{"id":1,"reply":{"type":"shutting_down"},"extra":1}"#).unwrap();
        assert_eq!(
            resp,
            Response {
                id: 1,
                reply: GuestReply::ShuttingDown
            }
        );
    }
}
