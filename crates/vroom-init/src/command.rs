//! Running a program from PID 1 outside the supervisor's services: the
//! environment every program gets, and a run to completion before the
//! reaper runs (boot: e2fsck on data volumes, config checks).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The search path of everything vroom-init starts.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// What a boot-time command may print before the rest is dropped.
const MAX_UNREAPED_OUTPUT: usize = 256 * 1024;
/// How often [`run_unreaped`] looks whether its child exited.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Runs a command and waits for it without the reaper (boot, before it runs).
pub fn run_unreaped(argv: &[String], timeout: Duration) -> (i32, String, String) {
    let Some((program, args)) = argv.split_first() else {
        return (127, String::new(), "empty command".into());
    };
    let spawned = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => return (127, String::new(), format!("run {program}: {err}")),
    };
    let stdout = child.stdout.take().map(read_capped);
    let stderr = child.stderr.take().map(read_capped);
    let deadline = Instant::now() + timeout;
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code().unwrap_or(128),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break 137;
            }
        }
    };
    let join = |h: Option<std::thread::JoinHandle<String>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    (code, join(stdout), join(stderr))
}

pub fn read_capped(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = MAX_UNREAPED_OUTPUT.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}
