//! End-to-end tests of the bounds on untrusted input: files named by path
//! (recipes, the files they reference, config imports) are regular files
//! under a cap, refused fast and by name otherwise, and never hang a later
//! build; a guest's output and files reach the host bounded.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_pid, random_subnet, recipe, status_kib, vroom_bin, Env};
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
