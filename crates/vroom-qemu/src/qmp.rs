//! A minimal QMP client. [`execute`] opens one connection per command (power
//! down, quit) and keeps no state across daemon restarts; [`Session`] is a
//! blocking connection for the migration steps of a snapshot, which pass a
//! pipe to QEMU (`getfd`, SCM_RIGHTS) and poll until it is done. QMP speaks
//! one JSON object per line; replies are untrusted and length-limited.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const MAX_LINE: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP i/o")]
    Io(#[from] std::io::Error),
    #[error("QMP reply is not valid JSON")]
    Json(#[from] serde_json::Error),
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP reply line exceeds {MAX_LINE} bytes")]
    TooLong,
    #[error("QMP did not answer within {TIMEOUT:?}")]
    Timeout,
    #[error("QMP command {command} failed: {desc}")]
    Command { command: String, desc: String },
}

/// Runs one QMP command and returns its `return` value.
pub async fn execute(socket: &Path, command: &str) -> Result<Value, QmpError> {
    tokio::time::timeout(TIMEOUT, execute_inner(socket, command))
        .await
        .map_err(|_| QmpError::Timeout)?
}

async fn execute_inner(socket: &Path, command: &str) -> Result<Value, QmpError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| QmpError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    read_reply(&mut lines, "greeting", true).await?;
    for cmd in ["qmp_capabilities", command] {
        let mut line = serde_json::to_vec(&json!({ "execute": cmd }))?;
        line.push(b'\n');
        write.write_all(&line).await?;
        let reply = read_reply(&mut lines, cmd, false).await?;
        if cmd == command {
            return Ok(reply);
        }
    }
    Err(QmpError::Closed)
}

/// Reads lines until a greeting, a `return` or an `error`, skipping events.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut R,
    command: &str,
    greeting: bool,
) -> Result<Value, QmpError> {
    loop {
        let mut line = Vec::new();
        let n = (&mut *lines)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if line.len() > MAX_LINE {
            return Err(QmpError::TooLong);
        }
        if let Some(reply) = classify(&line, command, greeting)? {
            return reply;
        }
    }
}

/// What one line of QMP output is: the reply awaited (`Some`), or an event
/// or anything else to skip (`None`).
fn classify(
    line: &[u8],
    command: &str,
    greeting: bool,
) -> Result<Option<Result<Value, QmpError>>, QmpError> {
    let value: Value = serde_json::from_slice(line)?;
    if greeting && value.get("QMP").is_some() {
        return Ok(Some(Ok(value)));
    }
    if let Some(ret) = value.get("return") {
        return Ok(Some(Ok(ret.clone())));
    }
    if let Some(err) = value.get("error") {
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("unknown error")
            .to_string();
        return Ok(Some(Err(QmpError::Command {
            command: command.into(),
            desc,
        })));
    }
    Ok(None)
}

/// A blocking QMP connection that stays open across commands.
pub struct Session {
    stream: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Session {
    pub fn connect(socket: &Path) -> Result<Self, QmpError> {
        let stream = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
            QmpError::Connect {
                path: socket.display().to_string(),
                source,
            }
        })?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let mut session = Session {
            reader: std::io::BufReader::new(stream.try_clone()?),
            stream,
        };
        session.reply("greeting", true)?;
        session.execute("qmp_capabilities", Value::Null)?;
        Ok(session)
    }

    /// Runs a command (`args` is `null` for none) and returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, QmpError> {
        let line = Self::line(command, args)?;
        std::io::Write::write_all(&mut self.stream, &line)?;
        self.reply(command, false)
    }

    /// Runs a command with a file descriptor attached (for `getfd`).
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        args: Value,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let line = Self::line(command, args)?;
        let fds = [fd.as_raw_fd()];
        let iov = [std::io::IoSlice::new(&line)];
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from)?;
        if sent < line.len() {
            std::io::Write::write_all(&mut self.stream, &line[sent..])?;
        }
        self.reply(command, false)
    }

    fn line(command: &str, args: Value) -> Result<Vec<u8>, QmpError> {
        let mut message = json!({ "execute": command });
        if !args.is_null() {
            message["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&message)?;
        line.push(b'\n');
        Ok(line)
    }

    fn reply(&mut self, command: &str, greeting: bool) -> Result<Value, QmpError> {
        use std::io::BufRead;
        loop {
            let mut line = Vec::new();
            let n = std::io::Read::take(&mut self.reader, MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        QmpError::Timeout
                    }
                    _ => QmpError::Io(e),
                })?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.len() > MAX_LINE {
                return Err(QmpError::TooLong);
            }
            if let Some(reply) = classify(&line, command, greeting)? {
                return reply;
            }
        }
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn skips_events_and_reports_errors() {
        let input = b"{\"event\":\"STOP\"}\n{\"return\":{}}\n{\"error\":{\"class\":\"GenericError\",\"desc\":\"nope\"}}\n".to_vec();
        let mut reader = BufReader::new(&input[..]);
        assert_eq!(
            read_reply(&mut reader, "stop", false).await.unwrap(),
            json!({})
        );
        match read_reply(&mut reader, "x", false).await {
            Err(QmpError::Command { desc, .. }) => assert_eq!(desc, "nope"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            read_reply(&mut reader, "x", false).await,
            Err(QmpError::Closed)
        ));
    }

    #[tokio::test]
    async fn rejects_garbage() {
        let input = b"not json\n".to_vec();
        let mut reader = BufReader::new(&input[..]);
        assert!(matches!(
            read_reply(&mut reader, "x", false).await,
            Err(QmpError::Json(_))
        ));
    }

    /// Property tests over untrusted QMP output. `PROPTEST_CASES=100000
    /// cargo test -p vroom-qemu qmp::tests::prop` runs them longer.
    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn read_all(input: &[u8]) -> Vec<Result<Value, String>> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut reader = BufReader::new(input);
                let mut out = vec![];
                // Each call consumes at least one line, so this ends.
                for _ in 0..=input.len() {
                    match read_reply(&mut reader, "x", false).await {
                        Err(QmpError::Closed) => break,
                        Err(QmpError::Json(_)) => out.push(Err("json".into())),
                        Err(e) => out.push(Err(e.to_string())),
                        Ok(v) => out.push(Ok(v)),
                    }
                }
                out
            })
        }

        fn event() -> impl Strategy<Value = String> {
            "[A-Z_]{1,12}".prop_map(|e| format!("{{\"event\":\"{e}\",\"data\":{{}}}}\n"))
        }

        proptest! {
            /// Arbitrary bytes never panic the reader, and it gives at most
            /// one answer per line of input.
            #[test]
            fn arbitrary_replies_never_panic(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
                let lines = input.split(|b| *b == b'\n').count();
                prop_assert!(read_all(&input).len() <= lines);
            }

            /// Events before a reply are skipped, and the reply's value comes back whole.
            #[test]
            fn events_are_skipped_and_the_return_value_is_kept(
                events in proptest::collection::vec(event(), 0..8),
                key in "[a-z]{1,10}",
                number in any::<i64>(),
            ) {
                let mut input = events.concat();
                let value = json!({ key: number });
                input.push_str(&format!("{{\"return\":{value}}}\n"));
                let replies = read_all(input.as_bytes());
                prop_assert_eq!(replies, vec![Ok(value)]);
            }

            /// An error reply carries its description, whatever it says.
            #[test]
            fn error_descriptions_survive(desc in "\\PC{0,80}") {
                let line = json!({"error": {"class": "GenericError", "desc": desc}}).to_string() + "\n";
                let replies = read_all(line.as_bytes());
                prop_assert_eq!(replies, vec![Err(format!("QMP command x failed: {desc}"))]);
            }
        }
    }
}
