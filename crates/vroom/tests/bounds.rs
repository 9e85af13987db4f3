//! End-to-end tests of the bounds on untrusted input: files named by path
//! (recipes, the files they reference, config imports) are regular files
//! under a cap, refused fast and by name otherwise, and never hang a later
//! build; a guest's output and files reach the host bounded.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_pid, random_subnet, recipe, status_kib, vroom_bin, Env, TestGroup};
use vroom_types::{ExecResult, InstanceState, MAX_EXEC_RESULT_BYTES};

/// vroomd's peak memory must stay under this whatever it is fed.
const MAX_DAEMON_KIB: u64 = 200 * 1024;

/// Runs vroom, killing it (and failing) if it takes longer than `limit`:
/// a hang must fail the test, not stall the suite.
fn vroom_within(env: &Env, limit: Duration, args: &[&str]) -> Output {
    let mut child = env
        .command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vroom");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "vroom {args:?} still ran after {limit:?} (it hangs): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// Runs vroom within `limit`; it must fail, and its error is returned.
fn fails_within(env: &Env, limit: Duration, args: &[&str]) -> String {
    let out = vroom_within(env, limit, args);
    assert!(!out.status.success(), "vroom {args:?} should fail: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// A copy of the shipped hello recipe in `dir`, with `extra` appended.
fn hello_copy(dir: &Path, extra: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let hello = Path::new(&recipe("hello")).to_path_buf();
    let text = std::fs::read_to_string(hello.join("recipe.toml")).unwrap();
    std::fs::write(dir.join("recipe.toml"), format!("{text}\n{extra}")).unwrap();
    std::fs::copy(hello.join("index.html"), dir.join("index.html")).unwrap();
}

/// vroomd's peak resident memory (VmHWM), in KiB.
fn peak_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

const FILES_SOURCE: &str = "[[files]]\npath = \"/etc/extra\"\nsource = \"extra\"\n";

#[test]
fn untrusted_files_fail_fast_and_never_hang_a_later_build() {
    let env = Env::new("bounds-files");
    let daemon = daemon_pid(&env);
    let fast = Duration::from_secs(30);
    let dir = |name: &str| env.dir.join(name);

    // A device as the recipe: refused before a byte is read.
    let err = fails_within(&env, fast, &["image", "build", "/dev/zero"]);
    assert!(err.contains("/dev/zero is a character device"), "{err}");

    // A FIFO as the recipe file.
    std::fs::create_dir_all(dir("fifo-recipe")).unwrap();
    mkfifo(&dir("fifo-recipe/recipe.toml"));
    let err = fails_within(
        &env,
        fast,
        &["image", "build", dir("fifo-recipe").to_str().unwrap()],
    );
    assert!(
        err.contains("recipe.toml is a FIFO, not a regular file"),
        "{err}"
    );

    // A FIFO as a file the recipe copies into the image.
    hello_copy(&dir("fifo-source"), FILES_SOURCE);
    mkfifo(&dir("fifo-source/extra"));
    let err = fails_within(
        &env,
        fast,
        &["image", "build", dir("fifo-source").to_str().unwrap()],
    );
    assert!(
        err.contains("files[0]") && err.contains("extra is a FIFO"),
        "{err}"
    );

    // A hard link to a file outside the recipe's directory (as a link to
    // /etc/shadow would be) never lands in an image.
    hello_copy(&dir("linked"), FILES_SOURCE);
    std::fs::write(dir("secret"), "root:$6$not-for-the-image\n").unwrap();
    std::fs::hard_link(dir("secret"), dir("linked/extra")).unwrap();
    let err = fails_within(
        &env,
        fast,
        &["image", "build", dir("linked").to_str().unwrap()],
    );
    assert!(err.contains("extra has 2 hard links"), "{err}");

    // A FIFO lying in a recipe's directory, named by nothing, is never
    // opened: the build (which used to hang on it holding the build lock)
    // and a second, cached one both finish.
    hello_copy(&dir("stray-fifo"), "");
    mkfifo(&dir("stray-fifo/notes"));
    let build = |limit| {
        let out = vroom_within(
            &env,
            limit,
            &[
                "--json",
                "image",
                "build",
                dir("stray-fifo").to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    build(Duration::from_secs(900));
    assert!(build(Duration::from_secs(120)).contains("\"cached\": true"));

    // config import reads only a regular file under its cap (the file is
    // checked before any instance is looked up).
    let err = fails_within(&env, fast, &["config", "nope", "import", "/dev/zero"]);
    assert!(err.contains("/dev/zero is a character device"), "{err}");
    mkfifo(&dir("import-fifo"));
    let err = fails_within(
        &env,
        fast,
        &[
            "config",
            "nope",
            "import",
            dir("import-fifo").to_str().unwrap(),
        ],
    );
    assert!(err.contains("import-fifo is a FIFO"), "{err}");
    let big = dir("big.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let err = fails_within(
        &env,
        fast,
        &["config", "nope", "import", big.to_str().unwrap()],
    );
    assert!(
        err.contains("is larger than the 1048576 bytes allowed"),
        "{err}"
    );

    let peak = peak_kib(daemon);
    eprintln!("vroomd peaked at {peak} KiB");
    assert!(peak < MAX_DAEMON_KIB, "vroomd peaked at {peak} KiB");
    env.assert_nothing_left("after the refused inputs");
}

#[test]
fn guest_output_and_copies_are_bounded() {
    let env = Env::new("bounds-guest");
    // Debian's kernel: its /proc has the files below (kcore, kallsyms);
    // vroom's, built without them, has no such large files.
    env.ok(&["image", "build", &recipe("hello"), "--kernel", "debian"]);
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&["run", "hello", "--name", "web", "--net", "lan"]);
    env.wait_for("web", "running", Duration::from_secs(90), |i| {
        i.status.state == InstanceState::Running
    });
    let daemon = daemon_pid(&env);
    let print_a_million = "busybox head -c 1000000 /dev/zero | busybox tr '\\000' x";

    // A buffered result keeps the first 256 KiB of each stream and says so.
    let out = env.vroom(&["--json", "exec", "web", "--", "sh", "-c", print_a_million]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let result: ExecResult = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result.stdout.len(), MAX_EXEC_RESULT_BYTES);
    assert!(result.stdout_truncated && !result.stderr_truncated);
    assert!(result.stdout.bytes().all(|b| b == b'x'));
    // The stream passes every byte through, flow-controlled.
    let out = env.vroom(&["exec", "web", "--", "sh", "-c", print_a_million]);
    assert_eq!(out.stdout.len(), 1_000_000);

    // cp refuses what is not a bounded regular file, at once.
    let fast = Duration::from_secs(20);
    let dest = env.dir.join("copy");
    let err = fails_within(
        &env,
        fast,
        &["cp", "web:/proc/kcore", dest.to_str().unwrap()],
    );
    assert!(err.contains("/proc/kcore is larger than"), "{err}");
    env.ok(&["exec", "web", "--", "busybox", "mkfifo", "/run/fifo"]);
    let err = fails_within(&env, fast, &["cp", "web:/run/fifo", dest.to_str().unwrap()]);
    assert!(err.contains("/run/fifo is not a regular file"), "{err}");
    assert!(!dest.exists());
    // A pseudo file (size 0 in fstat) is copied to its end, not cut after
    // the first 384 KiB chunk.
    let counted = env.ok(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "busybox cat /proc/kallsyms | busybox wc -c",
    ]);
    let counted: usize = counted.trim().parse().unwrap();
    assert!(counted > 1 << 20, "kallsyms holds {counted} bytes");
    let out = env.vroom(&["cp", "web:/proc/kallsyms", "-"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout.len(), counted);

    let peak = peak_kib(daemon);
    eprintln!("vroomd peaked at {peak} KiB");
    assert!(peak < MAX_DAEMON_KIB, "vroomd peaked at {peak} KiB");
    env.ok(&["rm", "-f", "web"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after the bounded guest output");
}

/// Stops whatever daemon a command started on a data dir, even on failure.
struct StopDaemon<'a>(&'a Path);

impl Drop for StopDaemon<'_> {
    fn drop(&mut self) {
        let _ = Command::new(vroom_bin())
            .env("VROOM_DATA_DIR", self.0)
            .args(["daemon", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn a_refused_import_starts_no_daemon() {
    let dir = tempfile::Builder::new()
        .prefix("vroom-import-nodaemon")
        .tempdir()
        .unwrap();
    let _stop = StopDaemon(dir.path());
    let out = Command::new(vroom_bin())
        .env("VROOM_DATA_DIR", dir.path())
        .args(["config", "x", "import", "/dev/zero"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/dev/zero is a character device"), "{err}");
    assert!(
        !dir.path().join("vroomd.sock").exists(),
        "a daemon was started for a refused import"
    );
}

/// The descriptors a process holds.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Raises this process's soft open-files limit to its hard one.
fn raise_own_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only `limit`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// `n` connections to `socket` made as `uid` with `gid` as its group, each
/// sent `first` (a request cut short). A thread takes the ids through the
/// raw system calls, which on Linux change only the calling thread, so the
/// kernel records them as the peer's credentials; the descriptors are the
/// process's.
fn connect_as(
    uid: u32,
    gid: u32,
    socket: &Path,
    n: usize,
    first: &'static [u8],
) -> Vec<UnixStream> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let groups = [gid as libc::gid_t];
        // SAFETY: raw credential syscalls on this thread only, with valid
        // arguments; the thread exits after connecting.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        (0..n)
            .map(|_| {
                let mut stream = UnixStream::connect(&socket).expect("connect");
                // A refused connection may be closed already.
                let _ = stream.write_all(first);
                stream
            })
            .collect()
    })
    .join()
    .unwrap()
}

/// Whether the server has closed `stream` (it reads end of file or an
/// error, not "nothing yet").
fn closed_by_server(mut stream: &UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Thousands of idle connections with partial headers, from group members
/// who are not root, neither exhaust vroomd's descriptors nor keep root
/// out: each peer holds a bounded number, a share is kept for root, the
/// headers must arrive in time (and a kept-alive connection is closed when
/// idle as long), and the descriptors come back when the clients leave.
#[test]
fn idle_connections_are_bounded_and_timed_out() {
    raise_own_fd_limit();
    let group = TestGroup::new();
    let gid = group.gid().expect("the group exists");
    let env = Env::with_env(
        "conns",
        vec![
            ("VROOM_GROUP", group.name.clone()),
            ("VROOM_API_MAX_CONNECTIONS", "256".into()),
        ],
    );
    let daemon = daemon_pid(&env);
    let socket = env.dir.join("vroomd.sock");
    let limits = std::fs::read_to_string(format!("/proc/{daemon}/limits")).unwrap();
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        nofile[3], nofile[4],
        "the soft fd limit is raised: {nofile:?}"
    );
    env.ok(&["ps"]);
    let baseline = fd_count(daemon);
    let rss_before = status_kib(daemon, "VmRSS:");

    // 4 members × 800 connections; 256 in all, 64 a peer, 32 kept for root.
    // Three send a request cut short, one sends nothing at all.
    let partial: &[u8] = b"GET /v1/instances HTTP/1.1\r\nHost: vroomd\r\n";
    let started = Instant::now();
    let flood: Vec<(u32, Vec<UnixStream>)> = (0..4)
        .map(|i| {
            let uid = 60_000 + i;
            let first = if i == 3 { &b""[..] } else { partial };
            (uid, connect_as(uid, gid, &socket, 800, first))
        })
        .collect();
    eprintln!("opened 3200 connections in {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let mut held_total = 0;
    for (uid, streams) in &flood {
        let held = streams.iter().filter(|s| !closed_by_server(s)).count();
        eprintln!("uid {uid}: {held} of {} held open", streams.len());
        assert!(held <= 64, "uid {uid} holds {held} connections");
        held_total += held;
    }
    assert!(held_total > 0 && held_total <= 224, "{held_total} held");
    let during = fd_count(daemon);
    assert!(
        during <= baseline + 256 + 8,
        "vroomd holds {during} descriptors, {baseline} before"
    );

    // Root still gets in, quickly.
    let started = Instant::now();
    let out = vroom_within(&env, Duration::from_secs(5), &["ps"]);
    assert!(out.status.success(), "{out:?}");
    eprintln!(
        "vroom ps answered in {:?} during the flood",
        started.elapsed()
    );

    // A kept-alive connection that goes idle after a request is closed too.
    let mut idle = UnixStream::connect(&socket).unwrap();
    idle.write_all(b"GET /v1/version HTTP/1.1\r\nHost: vroomd\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 12];
    idle.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");

    // Headers that never complete are cut off after the timeout.
    let closed = common::poll(Duration::from_secs(20), || {
        let open: usize = flood
            .iter()
            .flat_map(|(_, streams)| streams.iter())
            .filter(|s| !closed_by_server(s))
            .count();
        (open == 0 && closed_by_server(&idle)).then_some(())
    });
    assert!(closed.is_some(), "partial or idle connections stay open");

    drop(flood);
    drop(idle);
    let back = common::poll(Duration::from_secs(10), || {
        (fd_count(daemon) <= baseline + 2).then_some(())
    });
    assert!(
        back.is_some(),
        "vroomd holds {} descriptors after the clients left, {baseline} before",
        fd_count(daemon)
    );
    let rss_after = status_kib(daemon, "VmRSS:");
    eprintln!("vroomd resident {rss_before} KiB before, {rss_after} KiB after");
    assert!(rss_after < rss_before + 64 * 1024, "{rss_after} KiB");
    env.ok(&["ps"]);
}
