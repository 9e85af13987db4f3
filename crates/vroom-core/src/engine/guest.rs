//! Talking to a running guest: exec, copying files out, console logs.

use super::*;

impl Engine {
    pub async fn exec(&self, name: &str, req: ExecRequest) -> Result<ExecResult, OpError> {
        if req.argv.is_empty() {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                "exec needs a command",
            ));
        }
        let cell = self.running_cell(name)?;
        let timeout = Duration::from_secs(req.timeout_secs.unwrap_or(30).clamp(1, 3600));
        let reply = cell
            .agent
            .call(
                HostCommand::Exec {
                    argv: req.argv,
                    timeout_ms: timeout.as_millis() as u64,
                },
                timeout + Duration::from_secs(5),
            )
            .await
            .map_err(|e| OpError::wrap(ErrorCode::GuestError, "exec failed", e))?;
        match reply {
            GuestReply::Exec(out) => Ok(ExecResult {
                exit_code: out.exit_code,
                stdout: out.stdout,
                stderr: out.stderr,
            }),
            GuestReply::Error { message } => Err(OpError::new(
                ErrorCode::GuestError,
                format!("the guest refused: {}", truncate(&message)),
            )),
            _ => Err(OpError::new(
                ErrorCode::GuestError,
                "the guest answered with the wrong reply",
            )),
        }
    }

    /// Copies a regular file out of a running guest, in agent-sized chunks.
    pub async fn read_file(&self, name: &str, path: &str) -> Result<Vec<u8>, OpError> {
        if !path.starts_with('/') {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!("{path:?} is not an absolute path in the guest"),
            ));
        }
        let cell = self.running_cell(name)?;
        let mut data = Vec::new();
        loop {
            let reply = cell
                .agent
                .call(
                    HostCommand::ReadFile {
                        path: path.to_string(),
                        offset: data.len() as u64,
                        len: MAX_READ_CHUNK,
                    },
                    AGENT_TIMEOUT,
                )
                .await
                .map_err(|e| OpError::wrap(ErrorCode::GuestError, "copy failed", e))?;
            let (chunk, size) = match reply {
                GuestReply::FileChunk { hex, size } => match from_hex(&hex) {
                    Some(chunk) if chunk.len() as u64 <= MAX_READ_CHUNK => (chunk, size),
                    _ => {
                        return Err(OpError::new(
                            ErrorCode::GuestError,
                            "the guest sent a malformed file chunk",
                        ))
                    }
                },
                GuestReply::Error { message } => {
                    return Err(OpError::new(ErrorCode::NotFound, truncate(&message)))
                }
                _ => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        "the guest answered with the wrong reply",
                    ))
                }
            };
            data.extend_from_slice(&chunk);
            if data.len() as u64 > MAX_COPY_BYTES {
                return Err(OpError::new(
                    ErrorCode::ResourceExhausted,
                    format!("{path} is larger than {MAX_COPY_BYTES} bytes"),
                ));
            }
            // A file that grows while it is read is copied up to its size at the last read.
            if chunk.is_empty() || data.len() as u64 >= size {
                return Ok(data);
            }
        }
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
    /// one before, down to `-KEPT_BOOTS`).
    pub fn logs(&self, name: &str, boot: i32, offset: u64) -> Result<(String, u64), OpError> {
        use std::io::{Read, Seek, SeekFrom};
        let cell = self.cell(name)?;
        if !(-KEPT_BOOTS..=0).contains(&boot) {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!("boot {boot} is out of range: 0 is the current boot, -1 to -{KEPT_BOOTS} earlier ones"),
            ));
        }
        let path = cell.boot_log(boot);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
            Err(e) => return Err(OpError::internal("failed to open the console log", e)),
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        // A log that shrank was recreated by a new boot: start over.
        let start = if offset > len { 0 } else { offset };
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(start))
            .map_err(|e| OpError::internal("failed to read the console log", e))?;
        file.take(MAX_LOG_CHUNK)
            .read_to_end(&mut buf)
            .map_err(|e| OpError::internal("failed to read the console log", e))?;
        let next = start + buf.len() as u64;
        Ok((String::from_utf8_lossy(&buf).into_owned(), next))
    }
}
