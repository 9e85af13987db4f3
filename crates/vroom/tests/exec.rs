//! End-to-end tests of `vroom exec` and `vroom cp` against a booted `hello`
//! guest (busybox): bytes round-trip exactly, stdin is forwarded, output
//! streams while the command runs, and every way a command can end says so.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_pid, random_subnet, status_kib, Env};
use sha2::{Digest, Sha256};
use vroom_types::{ExecResult, InstanceState};

const BOOT: Duration = Duration::from_secs(90);

/// The `vroom` command of this test's environment, for stdin and streaming.
fn vroom_cmd(env: &Env, args: &[&str]) -> Command {
    let mut cmd = env.command();
    cmd.args(args);
    cmd
}

/// Runs vroom with `input` on its stdin.
fn vroom_with_stdin(env: &Env, args: &[&str], input: &[u8]) -> Output {
    let mut child = vroom_cmd(env, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vroom");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for vroom");
    feeder.join().unwrap();
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn boot_hello(env: &Env) {
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&["run", "hello", "--name", "web", "--net", "lan"]);
    env.wait_for("web", "running", BOOT, |i| {
        i.status.state == InstanceState::Running
    });
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn random_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

#[test]
fn exec_streams_bytes_forwards_stdin_and_explains_exits() {
    let env = Env::new("exec");
    boot_hello(&env);

    // Binary stdin in, the same bytes out, byte for byte (more than one agent chunk and window).
    let input = random_bytes(300_000);
    let out = vroom_with_stdin(&env, &["exec", "-i", "web", "--", "cat"], &input);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout.len(), input.len(), "cat returns every byte");
    assert!(out.stdout == input, "cat returns the bytes unchanged");

    // Binary output made in the guest: the bytes on stderr hash to what the guest computed.
    let out = env.vroom(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "busybox head -c 300000 /dev/urandom | busybox tee /proc/self/fd/2 | busybox sha256sum",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stderr.len(), 300_000);
    let guest_sum = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        guest_sum.split_whitespace().next(),
        Some(sha256_hex(&out.stderr).as_str()),
        "stderr bytes arrive unchanged"
    );

    // stdin is forwarded with -i, and EOF closes it.
    let out = vroom_with_stdin(&env, &["exec", "-i", "web", "--", "cat"], b"x\n");
    assert_eq!(out.stdout, b"x\n", "{out:?}");
    let out = vroom_with_stdin(
        &env,
        &["exec", "-i", "web", "--", "busybox", "sha256sum"],
        &input,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(sha256_hex(&input).as_str())
    );
    // A command that stops reading early ends normally, however much stdin is left.
    let out = vroom_with_stdin(
        &env,
        &["exec", "-i", "web", "--", "busybox", "head", "-c", "10"],
        &vec![b'z'; 5_000_000],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"zzzzzzzzzz");
    // Without -i the command's stdin is empty (it does not hang waiting for ours).
    let out = vroom_with_stdin(&env, &["exec", "web", "--", "cat"], b"ignored\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");

    // A missing command is the caller's problem: 127 and a message, like a shell.
    let out = env.vroom(&["exec", "web", "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-command: not found"), "{stderr}");

    // A timeout says so and exits 124, as timeout(1).
    let started = Instant::now();
    let out = env.vroom(&[
        "exec",
        "--timeout",
        "1",
        "web",
        "--",
        "busybox",
        "sleep",
        "30",
    ]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("timed out after 1s"), "{stderr}");

    // A signal is named, with 128+n.
    let out = env.vroom(&["exec", "web", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(143), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("killed by signal 15 (SIGTERM)"), "{stderr}");

    // --json keeps the whole result and exits with the command's code.
    let out = env.vroom(&[
        "--json",
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo out; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let result: ExecResult = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((result.exit_code, result.stdout.as_str()), (3, "out\n"));
    let out = env.vroom(&["--json", "exec", "web", "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");

    // Output streams while the command runs: the first line comes long before the end.
    let started = Instant::now();
    let mut child = vroom_cmd(
        &env,
        &[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo first; busybox sleep 6; echo second",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    let first_after = started.elapsed();
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!((first.as_str(), rest.as_str()), ("first\n", "second\n"));
    assert!(
        first_after < Duration::from_secs(5),
        "the first line arrived after {first_after:?}: output is buffered"
    );

    // Numbers out of range are refused before anything runs.
    let err = env.fail(&["exec", "--timeout", "0", "web", "--", "ls"]);
    assert!(err.contains("invalid timeout 0s"), "{err}");

    // A reader that stops reading stalls the command: nothing piles up in the daemon.
    let daemon = daemon_pid(&env);
    let rss_before = rss_kib(daemon);
    let mut child = vroom_cmd(
        &env,
        &[
            "exec",
            "--timeout",
            "120",
            "web",
            "--",
            "busybox",
            "cat",
            "/dev/zero",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let read_some = |stdout: &mut std::process::ChildStdout| {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < 4 << 20 {
            let n = stdout.read(&mut buf).unwrap();
            assert!(n > 0, "the output ended early");
            got += n;
        }
    };
    read_some(&mut stdout);
    std::thread::sleep(Duration::from_secs(4));
    let rss_stalled = rss_kib(daemon);
    read_some(&mut stdout);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        rss_stalled < rss_before + 64 * 1024,
        "vroomd grew from {rss_before} KiB to {rss_stalled} KiB while the reader stalled"
    );

    // A client that goes away takes its command with it.
    let mut child = vroom_cmd(&env, &["exec", "web", "--", "busybox", "sleep", "3007"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let seen = common::poll(Duration::from_secs(10), || {
        env.ok(&["exec", "web", "--", "ps"])
            .contains("sleep 3007")
            .then_some(())
    });
    assert!(seen.is_some(), "the command started");
    child.kill().unwrap();
    child.wait().unwrap();
    let gone = common::poll(Duration::from_secs(10), || {
        (!env.ok(&["exec", "web", "--", "ps"]).contains("sleep 3007")).then_some(())
    });
    assert!(gone.is_some(), "the command outlived its client");

    env.ok(&["rm", "-f", "web"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after exec");
}

#[test]
fn cp_streams_large_files_and_refuses_fifos() {
    let env = Env::new("cp");
    // Room for a 32 MiB file in the guest's tmpfs (64 MiB, the default on
    // vroom's kernel, is not).
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&[
        "run", "hello", "--name", "web", "--net", "lan", "--mem", "128M",
    ]);
    env.wait_for("web", "running", BOOT, |i| {
        i.status.state == InstanceState::Running
    });

    // 3 MB of random bytes: several agent chunks, streamed to a file and to stdout.
    let made = env.ok(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "busybox head -c 3000000 /dev/urandom > /run/big && busybox sha256sum /run/big",
    ]);
    let guest_sum = made.split_whitespace().next().unwrap().to_string();
    let dest = env.dir.join("big");
    env.ok(&["cp", "web:/run/big", dest.to_str().unwrap()]);
    let copied = std::fs::read(&dest).unwrap();
    assert_eq!(copied.len(), 3_000_000);
    assert_eq!(sha256_hex(&copied), guest_sum);
    let out = env.vroom(&["cp", "web:/run/big", "-"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(sha256_hex(&out.stdout), guest_sum, "cp to stdout");

    // A larger file streams through vroomd: its peak memory grows by far less than the file.
    env.ok(&[
        "exec",
        "web",
        "--",
        "busybox",
        "dd",
        "if=/dev/zero",
        "of=/run/zero",
        "bs=1M",
        "count=32",
    ]);
    let daemon = daemon_pid(&env);
    let peak_before = peak_rss_kib(daemon);
    let out = env.vroom(&["cp", "web:/run/zero", "-"]);
    assert!(
        out.status.success(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 32 << 20);
    assert!(out.stdout.iter().all(|b| *b == 0));
    let peak_after = peak_rss_kib(daemon);
    assert!(
        peak_after < peak_before + 16 * 1024,
        "vroomd's peak memory grew from {peak_before} KiB to {peak_after} KiB copying 32 MiB"
    );
    env.ok(&["exec", "web", "--", "busybox", "rm", "/run/zero"]);

    // A FIFO is refused at once (opening it for reading used to block the guest).
    env.ok(&["exec", "web", "--", "busybox", "mkfifo", "/run/fifo"]);
    let started = Instant::now();
    let err = env.fail(&[
        "cp",
        "web:/run/fifo",
        env.dir.join("fifo").to_str().unwrap(),
    ]);
    assert!(err.contains("not a regular file"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused after {:?}",
        started.elapsed()
    );
    assert!(
        !env.dir.join("fifo").exists() && !env.dir.join("fifo.vroom-partial").exists(),
        "a refused copy leaves nothing behind"
    );
    // The agent still answers (no guest thread is stuck on the FIFO).
    assert!(env.ok(&["exec", "web", "--", "ls", "/run"]).contains("big"));
    let err = env.fail(&[
        "cp",
        "web:/run/missing",
        env.dir.join("m").to_str().unwrap(),
    ]);
    assert!(err.contains("No such file"), "{err}");

    env.ok(&["rm", "-f", "web"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after cp");
}
