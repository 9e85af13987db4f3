//! The NBD relay with real parts: `qemu-nbd` (writable, writethrough) as the
//! replica's server, QEMU's own NBD client (`qemu-io` on an
//! `nbd+unix://` address) as the primary's, and the relay as its own
//! process (`vroom __nbd-relay`, started by `relay::spawn`) between them.
//! These are the behaviours replication relies on: a write the replica did
//! not take is held (never acknowledged) until vroomd releases it, and
//! then fails.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vroom_volume::relay::{self, RelayClient, RelayState, RelayStatus};

const SIZE: u64 = 16 << 20;
const EXPORT: &str = "vol0";

/// A replica server, a relay and a QEMU NBD client, wired up; all of them
/// are killed on drop.
struct Chain {
    dir: tempfile::TempDir,
    file: PathBuf,
    nbd: Child,
    qemu_io: Child,
    stdin: ChildStdin,
    output: Arc<Mutex<String>>,
    relay: u32,
    control: PathBuf,
}

impl Chain {
    /// `enospc_at`: the replica's disk fails writes at this offset with
    /// ENOSPC (blkdebug's error injection), so qemu-nbd answers them with an
    /// NBD error.
    fn start(silent: Duration, enospc_at: Option<u64>) -> Chain {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("replica.img");
        std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
        let image = match enospc_at {
            None => vec![
                "-f".to_string(),
                "raw".to_string(),
                file.display().to_string(),
            ],
            Some(offset) => vec![
                "--image-opts".to_string(),
                format!(
                    "driver=raw,file.driver=blkdebug,file.image.filename={},\
                     file.inject-error.0.event=pwritev,file.inject-error.0.errno=28,\
                     file.inject-error.0.sector={}",
                    file.display(),
                    offset / 512
                ),
            ],
        };
        let (nbd, peer) = serve(&image);
        let socket = dir.path().join("qemu.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let mut qemu_io = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(format!("nbd+unix:///{EXPORT}?socket={}", socket.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io (from qemu-utils) is needed for this test");
        let output = Arc::new(Mutex::new(String::new()));
        for mut pipe in [
            Box::new(qemu_io.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(qemu_io.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut buf = [0; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let stdin = qemu_io.stdin.take().unwrap();
        let qemu = accept(&listener, &mut qemu_io);
        let control = dir.path().join("relay.ctl");
        let relay = relay::spawn(
            Path::new(env!("CARGO_BIN_EXE_vroom")),
            qemu.into(),
            peer.into(),
            None,
            &control,
            silent,
        )
        .unwrap();
        Chain {
            dir,
            file,
            nbd,
            qemu_io,
            stdin,
            output,
            relay,
            control,
        }
    }

    fn command(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until qemu-io has printed `text`.
    fn wait_for(&self, text: &str, within: Duration) {
        let started = Instant::now();
        while !self.output().contains(text) {
            assert!(
                started.elapsed() < within,
                "qemu-io did not print {text:?} within {within:?}; it printed:\n{}\nrelay log:\n{}",
                self.output(),
                self.relay_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn status(&self) -> RelayStatus {
        RelayClient::connect(&self.control)
            .unwrap()
            .status()
            .unwrap()
    }

    fn relay_log(&self) -> String {
        std::fs::read_to_string(relay::log_path(&self.control)).unwrap_or_default()
    }

    fn replica_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let bytes = std::fs::read(&self.file).unwrap();
        bytes[offset as usize..offset as usize + len].to_vec()
    }

    /// A write goes through the relay to the replica's file.
    fn write_through(&mut self, pattern: u8, offset: u64, len: usize) {
        self.command(&format!("write -P {pattern:#x} {offset} {len}"));
        self.wait_for(
            &format!("wrote {len}/{len} bytes at offset {offset}"),
            Duration::from_secs(10),
        );
        assert!(
            self.replica_bytes(offset, len)
                .iter()
                .all(|b| *b == pattern),
            "the replica's file does not hold the acknowledged write"
        );
    }

    /// A write the replica cannot take is held: not acknowledged within
    /// 2 s, and failed (never acknowledged) once released.
    fn held_then_failed_on_release(&mut self, offset: u64, reasons: &[&str]) {
        let acked = format!("wrote 4096/4096 bytes at offset {offset}");
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            !self.output().contains(&acked),
            "the write was acknowledged while the replica was faulty:\n{}",
            self.output()
        );
        let status = self.status();
        assert_eq!(status.state, RelayState::Holding, "{status:?}");
        let fault = status.fault.unwrap_or_default();
        assert!(
            reasons.iter().any(|r| fault.contains(r)),
            "fault {fault:?}, want one of {reasons:?}"
        );
        RelayClient::connect(&self.control)
            .unwrap()
            .release()
            .unwrap();
        self.wait_for("write failed", Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !self.output().contains(&acked),
            "the held write was acknowledged after the release:\n{}",
            self.output()
        );
        let started = Instant::now();
        while alive(self.relay) {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "the relay did not exit after release"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!self.control.exists(), "the relay left its control socket");
        eprintln!(
            "qemu-io printed:\n{}\nthe relay logged:\n{}",
            self.output(),
            self.relay_log()
        );
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = self.qemu_io.kill();
        let _ = self.qemu_io.wait();
        // SAFETY: plain signals to processes this test started.
        unsafe {
            libc::kill(self.nbd.id() as i32, libc::SIGCONT);
            if alive(self.relay) {
                libc::kill(self.relay as i32, libc::SIGKILL);
            }
        }
        let _ = self.nbd.kill();
        let _ = self.nbd.wait();
        let _ = &self.dir;
    }
}

/// Starts qemu-nbd serving `image` (its image arguments) on a free port of
/// 127.0.0.1, and connects to it.
fn serve(image: &[String]) -> (Child, TcpStream) {
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut nbd = Command::new("qemu-nbd")
            .args(["--cache=writethrough", "-x", EXPORT])
            .args(["-b", "127.0.0.1", "-p", &port.to_string()])
            .args(image)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd (from qemu-utils) is needed for this test");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
                return (nbd, stream);
            }
            if nbd.try_wait().unwrap().is_some() {
                break; // the port was taken meanwhile: another one
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = nbd.kill();
        let _ = nbd.wait();
    }
    panic!("qemu-nbd did not listen");
}

fn accept(listener: &UnixListener, qemu_io: &mut Child) -> std::os::unix::net::UnixStream {
    listener.set_nonblocking(true).unwrap();
    let started = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Some(status) = qemu_io.try_wait().unwrap() {
            panic!("qemu-io exited before connecting: {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "qemu-io did not connect"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: a signal to a process this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

#[test]
fn relay_forwards_writes_and_holds_a_killed_replica_until_released() {
    let mut chain = Chain::start(relay::DEFAULT_SILENT, None);
    chain.write_through(0x5a, 0, 65536);
    chain.command("read -P 0x5a 0 65536");
    chain.wait_for(
        "read 65536/65536 bytes at offset 0",
        Duration::from_secs(10),
    );
    let status = chain.status();
    assert_eq!(status.state, RelayState::Forwarding, "{status:?}");
    assert!(status.write_bytes >= 65536, "{status:?}");
    assert_eq!(status.outstanding, 0, "{status:?}");

    signal(&chain.nbd, libc::SIGKILL);
    chain.nbd.wait().unwrap();
    chain.command("write -P 0x66 65536 4096");
    // A killed server's kernel closes (FIN) or resets (RST) the connection.
    chain.held_then_failed_on_release(
        65536,
        &["the peer closed the connection", "reading from the peer"],
    );
}

#[test]
fn relay_holds_a_frozen_replica_after_silent_until_released() {
    let silent = relay::DEFAULT_SILENT;
    let mut chain = Chain::start(silent, None);
    chain.write_through(0x5a, 0, 4096);
    signal(&chain.nbd, libc::SIGSTOP);
    chain.command("write -P 0x66 8192 4096");
    let sent = Instant::now();
    // The write reaches the relay and waits there, not yet a fault.
    let early = loop {
        let status = chain.status();
        if status.outstanding > 0 || sent.elapsed() > silent / 2 {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(early.state, RelayState::Forwarding, "{early:?}");
    assert_eq!(early.outstanding, 1, "{early:?}");
    while chain.status().state == RelayState::Forwarding {
        assert!(
            sent.elapsed() < silent * 3,
            "the relay did not hold a frozen replica"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let held_after = sent.elapsed();
    assert!(held_after >= silent, "held after only {held_after:?}");
    chain.held_then_failed_on_release(8192, &["no answer from the peer to request"]);
}

/// The protocol-C gap itself: straight to QEMU, the replica's error reply
/// would complete the write at once ("No space left on device"; a mirror
/// would acknowledge the guest's write with only the local copy). Through
/// the relay it is held, and fails only on release.
#[test]
fn relay_holds_an_error_reply_until_released() {
    let mut chain = Chain::start(relay::DEFAULT_SILENT, Some(32768));
    chain.write_through(0x5a, 0, 4096);
    chain.command("write -P 0x66 32768 4096");
    // qemu-nbd 7.2 answers with an error chunk (QEMU negotiates structured
    // replies).
    chain.held_then_failed_on_release(32768, &["error chunk (type 0x8001, error 28 (ENOSPC))"]);
    assert!(
        !chain.output().contains("No space left on device"),
        "the replica's error reached QEMU:\n{}",
        chain.output()
    );
}
