//! The guest end of the agent channel: a virtio-serial port. Each request is
//! handled on its own thread so a long exec never blocks health checks;
//! exec credits and kills, which never block, are handled in the read loop.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vroom_agent_proto::{
    to_hex, FrameDecoder, GuestReply, HostCommand, Request, Response, MAX_FILE_COPY,
    MAX_READ_CHUNK, PORT_NAME, VOLUME_FREEZE_BOUND_MS,
};

use crate::exec::{Sessions, StartExec};
use crate::log;
use crate::reply::send;
use crate::supervisor::{ApplyConfigError, Supervisor};

pub fn serve(state: Arc<Supervisor>) {
    let port = loop {
        match find_port() {
            Some(path) => break path,
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut reader = match OpenOptions::new().read(true).write(true).open(&port) {
        Ok(file) => file,
        Err(err) => {
            log(&format!("open agent port {port}: {err}"));
            return;
        }
    };
    let writer = match reader.try_clone() {
        Ok(file) => Arc::new(Mutex::new(file)),
        Err(err) => {
            log(&format!("clone agent port: {err}"));
            return;
        }
    };
    log(&format!("agent listening on {port}"));
    let sessions = Arc::new(Sessions::default());
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            // The host end is not connected: nobody reads exec output; wait for it.
            Ok(0) => {
                sessions.kill_all();
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(n) => decoder.push(&buf[..n]),
            Err(err) => {
                log(&format!("read agent port: {err}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => match serde_json::from_slice::<Request>(&frame) {
                    Ok(Request {
                        command: HostCommand::ExecCredit { session, chunks },
                        ..
                    }) => sessions.credit(session, chunks),
                    Ok(Request {
                        command: HostCommand::ExecKill { session },
                        ..
                    }) => sessions.kill(session),
                    Ok(request) => {
                        let (state, writer, sessions) =
                            (state.clone(), writer.clone(), sessions.clone());
                        std::thread::spawn(move || handle(&state, &sessions, request, &writer));
                    }
                    Err(err) => {
                        log(&format!("bad request: {err}"));
                        if let Some(response) = unknown_request(&frame, &err) {
                            send(&writer, &response);
                        }
                    }
                },
                Ok(None) => break,
                Err(err) => log(&format!("agent framing: {err}")),
            }
        }
    }
}

/// The health report once the guest is ready (or cannot be: its config
/// is refused), or after `within_ms`.
fn wait_ready(state: &Supervisor, within_ms: u64) -> vroom_agent_proto::HealthReport {
    let deadline = std::time::Instant::now()
        + Duration::from_millis(within_ms.min(vroom_agent_proto::MAX_WAIT_READY_MS));
    loop {
        let report = state.health();
        if report.ready || report.config_error.is_some() || std::time::Instant::now() >= deadline {
            return report;
        }
        std::thread::sleep(Duration::from_millis(
            vroom_agent_proto::WAIT_READY_CHECK_MS,
        ));
    }
}

fn handle(state: &Supervisor, sessions: &Sessions, request: Request, writer: &Arc<Mutex<File>>) {
    let shutdown = matches!(request.command, HostCommand::Shutdown);
    let reply = match request.command {
        HostCommand::Health => GuestReply::Health(state.health()),
        HostCommand::WaitReady { within_ms } => GuestReply::Health(wait_ready(state, within_ms)),
        HostCommand::Exec { .. } => GuestReply::Error {
            message: "buffered exec was replaced by exec sessions".into(),
        },
        HostCommand::ExecStart {
            argv,
            timeout_ms,
            stdin,
            window,
        } => {
            // The session answers for itself, from start to exit.
            let start = StartExec {
                id: request.id,
                argv,
                timeout_ms,
                stdin,
                window,
            };
            return sessions.run(state, writer, start);
        }
        HostCommand::ExecStdin { session, data, eof } => {
            match sessions.write_stdin(session, &data, eof) {
                Ok(()) => GuestReply::StdinWritten,
                Err(message) => GuestReply::Error { message },
            }
        }
        // Handled in the read loop; never answered.
        HostCommand::ExecCredit { .. } | HostCommand::ExecKill { .. } => return,
        HostCommand::ApplyConfig { values } => match state.apply_config(values) {
            Ok(values) => GuestReply::ConfigApplied { values },
            Err(ApplyConfigError::Rejected { message, output }) => {
                GuestReply::ConfigRejected { message, output }
            }
            Err(ApplyConfigError::Failed(message)) => GuestReply::Error { message },
        },
        HostCommand::Shutdown => GuestReply::ShuttingDown,
        HostCommand::Freeze => match state.freeze() {
            Ok(()) => GuestReply::Frozen,
            Err(message) => GuestReply::Error { message },
        },
        HostCommand::Resume {
            entropy,
            unix_ms,
            reload_volume,
        } => match state.resume(&entropy, unix_ms, reload_volume) {
            Ok(identity_changed) => GuestReply::Resumed { identity_changed },
            Err(message) => GuestReply::Error { message },
        },
        HostCommand::GrowVolume { serial } => match state.volumes.grow(&serial) {
            Ok((before_bytes, after_bytes)) => GuestReply::VolumeGrown {
                before_bytes,
                after_bytes,
            },
            Err(err) => GuestReply::Error {
                message: vroom_base::error_chain(&err),
            },
        },
        HostCommand::FreezeVolumes => match state.volumes.freeze() {
            Ok(paths) => GuestReply::VolumesFrozen {
                paths,
                thaw_after_ms: VOLUME_FREEZE_BOUND_MS,
            },
            Err(err) => GuestReply::Error {
                message: vroom_base::error_chain(&err),
            },
        },
        HostCommand::ThawVolumes => GuestReply::VolumesThawed {
            paths: state.volumes.thaw(),
        },
        HostCommand::ReadFile { path, offset, len } => match read_chunk(&path, offset, len) {
            Ok((bytes, size)) => GuestReply::FileChunk {
                hex: to_hex(&bytes),
                size,
            },
            Err(message) => GuestReply::Error { message },
        },
    };
    send(
        writer,
        &Response {
            id: request.id,
            reply,
        },
    );
    if shutdown {
        state.shutdown();
    }
}

/// Up to `len` bytes of a regular file from `offset`, and the file's size.
/// Opened non-blocking and checked with fstat before any read, so a FIFO or
/// a device never blocks the agent.
fn read_chunk(path: &str, offset: u64, len: u64) -> Result<(Vec<u8>, u64), String> {
    use std::io::{Seek, SeekFrom};
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{path} is not a regular file"));
    }
    // Refused before a byte is read (e.g. /proc/kcore, which claims 128 TiB).
    if meta.len() > MAX_FILE_COPY {
        return Err(format!(
            "{path} is larger than the {MAX_FILE_COPY} bytes cp copies"
        ));
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("{path}: {e}"))?;
    let mut bytes = Vec::new();
    let allowed = MAX_FILE_COPY.saturating_sub(offset);
    let want = len.min(MAX_READ_CHUNK).min(allowed);
    file.take(want)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{path}: {e}"))?;
    let size = reported_size(meta.len(), offset, &bytes, want);
    Ok((bytes, size))
}

/// The size the host is told. A pseudo file (e.g. /proc/kallsyms) has size 0
/// yet content: it is reported as what was read so far, plus one byte while
/// chunks come back full, so the host reads on to its end (or to the cap)
/// instead of stopping after the first chunk.
fn reported_size(st_size: u64, offset: u64, read: &[u8], wanted: u64) -> u64 {
    if st_size > 0 || read.is_empty() {
        return st_size;
    }
    let end = offset + read.len() as u64;
    end + u64::from(read.len() as u64 == wanted)
}

/// The answer to a frame that is not a request this guest knows (one a
/// newer host added): an error at once, instead of the host waiting out its
/// timeout. Nothing when not even the id can be read.
fn unknown_request(frame: &[u8], err: &serde_json::Error) -> Option<Response> {
    #[derive(serde::Deserialize)]
    struct JustId {
        id: u64,
    }
    let JustId { id } = serde_json::from_slice(frame).ok()?;
    Some(Response {
        id,
        reply: GuestReply::Error {
            message: format!("the guest does not understand this request: {err}"),
        },
    })
}

fn find_port() -> Option<String> {
    fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let name = fs::read_to_string(entry.path().join("name")).ok()?;
            (name.trim() == PORT_NAME)
                .then(|| format!("/dev/{}", entry.file_name().to_string_lossy()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_size_table() {
        let chunk = MAX_READ_CHUNK;
        let full = vec![0u8; chunk as usize];
        // (st_size, offset, bytes read, wanted, reported)
        let cases: &[(u64, u64, usize, u64, u64)] = &[
            (5000, 0, 5000, chunk, 5000),
            (5000, 0, 0, chunk, 5000),
            (0, 0, 0, chunk, 0),
            (0, 0, 100, chunk, 100),
            (0, 0, chunk as usize, chunk, chunk + 1),
            (0, chunk, chunk as usize, chunk, 2 * chunk + 1),
            (0, chunk, 7, chunk, chunk + 7),
        ];
        for &(st_size, offset, read, wanted, want) in cases {
            let got = reported_size(st_size, offset, &full[..read], wanted);
            assert_eq!(got, want, "{st_size} {offset} {read} {wanted}");
        }
    }

    #[test]
    fn a_request_the_guest_does_not_know_is_answered() {
        let frame = br#"{"id":42,"command":{"type":"from_the_future","x":1}}"#;
        let err = serde_json::from_slice::<Request>(frame).unwrap_err();
        let response = unknown_request(frame, &err).unwrap();
        assert_eq!(response.id, 42);
        let GuestReply::Error { message } = response.reply else {
            panic!("{:?}", response.reply);
        };
        assert!(message.contains("from_the_future"), "{message}");
        assert!(!message.contains('\n'), "{message}");
        for garbage in [&b"{}"[..], b"not json", br#"{"id":"x"}"#] {
            let err = serde_json::from_slice::<Request>(garbage).unwrap_err();
            assert!(unknown_request(garbage, &err).is_none());
        }
    }

    /// A pseudo file (size 0) says more may follow while its chunks come back full.
    #[test]
    fn a_proc_file_is_read_past_its_first_chunk() {
        let (bytes, _) = read_chunk("/proc/self/status", 0, 16).unwrap();
        assert_eq!(bytes.len(), 16);
        let (_, size) = read_chunk("/proc/self/status", 0, 16).unwrap();
        assert_eq!(
            size, 17,
            "a full chunk of a pseudo file says more may follow"
        );
    }
}
