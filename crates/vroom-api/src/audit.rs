//! Who called: the peer credentials of the unix-socket connection
//! (`SO_PEERCRED`), for the audit log of privileged requests.
//!
//! Exec and file copies run code and read files inside a guest: every one is
//! logged at INFO under the `vroom::audit` target with the caller's uid and
//! pid, the instance and the argv (or path), whether or not it succeeds.

use axum::extract::connect_info::ConnectInfo;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;

/// The longest argv (or path) the audit line repeats; the rest is cut.
const MAX_AUDITED: usize = 1024;

/// The process at the other end of an API connection, as the kernel saw it
/// when it connected. The server puts it in each request's extensions as
/// `ConnectInfo<Caller>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

impl Caller {
    /// A caller the server could not identify (e.g. a router driven
    /// in-process by tests).
    pub const UNKNOWN: Caller = Caller {
        uid: None,
        gid: None,
        pid: None,
    };
}

/// The name in the client certificate of a cluster API connection (a
/// node's or a workstation's), in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(pub String);

/// Extracts the caller of a request; never fails.
pub struct AuditCaller(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for AuditCaller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(AuditCaller(
            parts
                .extensions
                .get::<ConnectInfo<Caller>>()
                .map(|c| c.0)
                .unwrap_or(Caller::UNKNOWN),
        ))
    }
}

fn field(value: Option<impl std::fmt::Display>) -> String {
    value
        .map(|v| v.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Renders untrusted text for a log line: debug-quoted (so control
/// characters cannot forge lines) and cut at [`MAX_AUDITED`] bytes.
fn bounded(text: String) -> String {
    if text.len() <= MAX_AUDITED {
        return text;
    }
    let mut end = MAX_AUDITED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

pub fn exec(caller: Caller, instance: &str, argv: &[String]) {
    tracing::info!(
        target: "vroom::audit",
        uid = %field(caller.uid),
        pid = %field(caller.pid),
        instance = %bounded(format!("{instance:?}")),
        argv = %bounded(format!("{argv:?}")),
        "exec"
    );
}

pub fn copy(caller: Caller, instance: &str, path: &str) {
    tracing::info!(
        target: "vroom::audit",
        uid = %field(caller.uid),
        pid = %field(caller.pid),
        instance = %bounded(format!("{instance:?}")),
        path = %bounded(format!("{path:?}")),
        "cp"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audited_text_is_quoted_and_bounded() {
        let table = [
            ("plain".to_string(), "plain".to_string()),
            ("a".repeat(1024), "a".repeat(1024)),
            (
                "é".repeat(600),
                format!("{}... (1200 bytes)", "é".repeat(512)),
            ),
        ];
        for (input, expected) in table {
            assert_eq!(bounded(input.clone()), expected, "{input:.20}");
        }
        assert_eq!(
            bounded(format!("{:?}", ["sh", "-c", "echo x\nforged"])),
            r#"["sh", "-c", "echo x\nforged"]"#
        );
    }
}
