//! End-to-end tests of what keeps vroom's logs bounded and its privileged
//! calls accounted for: a guest flooding its console leaves the console
//! files under their caps with the newest output kept (across a restart of
//! the VM and of the daemon), exec and cp are audited with the caller's uid
//! (a non-root member of the API group included), `vroom setup` creates
//! that group, and `vroom gc` sweeps stale run dirs.

mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{init_binary, poll, random_subnet, vroom_bin, Env, TestGroup};
use vroom_types::InstanceState;

const BOOT: Duration = Duration::from_secs(120);
/// `vroom_core::console`: the largest console file, and an instance's cap.
const SEGMENT: u64 = 512 * 1024;
const INSTANCE_CAP: u64 = 7 * SEGMENT;

fn boot_hello(env: &Env, name: &str) {
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&["run", "hello", "--name", name, "--net", "lan"]);
    env.wait_for(name, "running", BOOT, |i| {
        i.status.state == InstanceState::Running
    });
}

/// The console files of a run dir, with their sizes.
fn console_files(run_dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(run_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata().map(|m| m.len()).unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn total(files: &[(String, u64)]) -> u64 {
    files.iter().map(|(_, size)| size).sum()
}

fn marker(what: &str) -> String {
    format!("{what}-{:08x}", rand::random::<u32>())
}

/// A command that runs vroom (or wraps it) in this test's environment.
fn vroom_env(mut cmd: Command, env: &Env) -> Command {
    cmd.env("VROOM_DATA_DIR", &env.dir)
        .env("VROOM_IFACE_PREFIX", &env.prefix)
        .env("VROOM_INIT", init_binary())
        .env_remove("VROOM_LOG");
    cmd
}

/// Writes to the guest's serial console (the kernel's `console=ttyS0`).
fn to_console(env: &Env, name: &str, script: &str) {
    env.ok(&[
        "exec",
        "--timeout",
        "900",
        name,
        "--",
        "sh",
        "-c",
        &format!("({script}) > /dev/ttyS0"),
    ]);
}

#[test]
fn a_console_flood_stays_under_the_caps_and_keeps_the_newest_output() {
    // A group that does not exist: the socket stays root-only.
    let env = Env::with_env("logs", vec![("VROOM_GROUP", "vroom-no-such-group".into())]);
    let socket = std::fs::metadata(env.dir.join("vroomd.sock")).unwrap();
    assert_eq!(socket.permissions().mode() & 0o777, 0o600);
    boot_hello(&env, "flood");
    let run_dir = env.dir.join("instances").join(env.instance("flood").id);

    // 4 MiB: four times what the current boot keeps, more than the whole
    // instance may hold. The files are watched while the guest writes.
    let end = marker("flood-end");
    let script = format!(
        "yes 0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdefghijklmnopqrstuvwxyz | head -c 4194304; echo {end}"
    );
    // A follower started before the flood reads all of it: its offsets count
    // the boot's bytes, and rotations stay far enough behind it.
    let mut follower = vroom_env(Command::new(vroom_bin()), &env)
        .args(["logs", "--follow", "flood"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run vroom logs -f");
    let followed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let mut stdout = follower.stdout.take().unwrap();
        let followed = followed.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                followed.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let started = Instant::now();
    let mut largest_total = 0;
    std::thread::scope(|scope| {
        let flood = scope.spawn(|| to_console(&env, "flood", &script));
        while !flood.is_finished() {
            let files = console_files(&run_dir);
            largest_total = largest_total.max(total(&files));
            for (name, size) in &files {
                assert!(*size <= SEGMENT, "{name} is {size} bytes: {files:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        flood.join().unwrap();
    });
    let flood_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "4 MiB through the console in {flood_secs:.1} s ({:.0} KiB/s)",
        4096.0 / flood_secs
    );

    let caught_up = poll(Duration::from_secs(60), || {
        let followed = followed.lock().unwrap();
        String::from_utf8_lossy(&followed)
            .contains(&end)
            .then_some(())
    });
    let _ = follower.kill();
    let _ = follower.wait();
    reader.join().unwrap();
    assert!(caught_up.is_some(), "the follower saw the flood's end");
    let followed = followed.lock().unwrap().clone();
    let flood_bytes = String::from_utf8_lossy(&followed)
        .lines()
        .filter(|l| l.starts_with("0123456789abcdefghijklmnopqrstuvwxyz-"))
        .map(|l| l.len() + 1)
        .sum::<usize>();
    assert!(
        flood_bytes >= 4194304 - 75,
        "the follower lost output across rotations: {flood_bytes} of 4194304 bytes"
    );

    // The newest output is kept and `logs` shows the current boot's end.
    let tail = poll(Duration::from_secs(30), || {
        let tail = env.ok(&["logs", "flood", "--tail", "2"]);
        tail.contains(&end).then_some(tail)
    });
    assert!(
        tail.is_some(),
        "the flood's last line never reached the log"
    );
    let files = console_files(&run_dir);
    assert!(files.iter().all(|(_, size)| *size <= SEGMENT), "{files:?}");
    assert!(
        total(&files) <= 2 * SEGMENT,
        "the current boot holds two files at most: {files:?}"
    );
    assert!(largest_total <= INSTANCE_CAP, "{largest_total} bytes");
    let all = env.ok(&["logs", "flood"]);
    assert!(
        all.len() as u64 > SEGMENT && all.len() as u64 <= 2 * SEGMENT,
        "logs shows what is kept of the boot: {} bytes",
        all.len()
    );
    assert!(all.trim_end().ends_with(&end));
    assert!(
        all.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("0123456789")),
        "the boot's start was rotated away: {:?}",
        &all[..200]
    );

    // A new boot: the flooded one keeps its last segment as boot -1.
    env.ok(&["restart", "flood"]);
    env.wait_for("flood", "running again", BOOT, |i| {
        i.status.state == InstanceState::Running
    });
    let previous = env.ok(&["logs", "flood", "--boot", "-1"]);
    assert!(previous.len() as u64 <= SEGMENT, "{}", previous.len());
    // After the flood come only the guest's shutdown messages.
    assert!(previous.contains(&end), "boot -1 keeps the flood's end");
    let current = env.ok(&["logs", "flood"]);
    assert!(!current.contains(&end), "boot 0 starts empty");

    // A restarted daemon collects the console again.
    env.kill_daemon();
    env.start_daemon();
    let after = marker("after-restart");
    to_console(&env, "flood", &format!("echo {after}"));
    let seen = poll(Duration::from_secs(30), || {
        env.ok(&["logs", "flood"]).contains(&after).then_some(())
    });
    assert!(seen.is_some(), "the re-adopted VM's console is collected");
    assert!(total(&console_files(&run_dir)) <= INSTANCE_CAP);

    env.ok(&["rm", "--force", "flood"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after the console flood");
}

const NOBODY: u32 = 65534;

/// Runs vroom as uid `nobody`, with `group` as its only supplementary group.
fn vroom_as_nobody(env: &Env, group: Option<u32>, args: &[&str]) -> Output {
    let groups = match group {
        Some(gid) => format!("--groups={gid}"),
        None => "--clear-groups".into(),
    };
    let mut setpriv = Command::new("setpriv");
    setpriv.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        &groups,
        vroom_bin(),
    ]);
    vroom_env(setpriv, env)
        .args(args)
        .output()
        .expect("run setpriv")
}

/// Every entry under `dir`, depth first.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// The audit lines of the daemon's log.
fn audit_lines(env: &Env) -> Vec<String> {
    env.daemon_log()
        .lines()
        .filter(|l| l.contains("vroom::audit"))
        .map(str::to_string)
        .collect()
}

#[test]
fn exec_and_cp_are_audited_with_the_callers_uid() {
    let group = TestGroup::new();
    let gid = group.gid().expect("the group exists");
    let env = Env::with_env("audit", vec![("VROOM_GROUP", group.name.clone())]);
    // The group may reach the socket, through a data dir it cannot list.
    let socket = std::fs::metadata(env.dir.join("vroomd.sock")).unwrap();
    assert_eq!(socket.permissions().mode() & 0o777, 0o660);
    assert_eq!(socket.gid(), gid);
    let data_dir = std::fs::metadata(&env.dir).unwrap();
    assert_eq!(data_dir.permissions().mode() & 0o777, 0o710);
    assert_eq!(data_dir.gid(), gid);
    boot_hello(&env, "web");

    env.ok(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo audited > /tmp/audit.txt",
    ]);
    let copy = env.dir.join("audit.txt");
    env.ok(&["cp", "web:/tmp/audit.txt", copy.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "audited\n");

    // A member of the group who is not root.
    let out = vroom_as_nobody(
        &env,
        Some(gid),
        &["exec", "web", "--", "sh", "-c", "echo from-nobody"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-nobody\n");
    // Anyone else is refused by the socket's mode.
    let out = vroom_as_nobody(
        &env,
        None,
        &["exec", "web", "--", "sh", "-c", "echo intruder"],
    );
    assert!(!out.status.success(), "{out:?}");

    let lines = audit_lines(&env);
    let find = |needles: &[&str]| {
        lines
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
    };
    let exec = find(&[
        " exec ",
        "uid=0 ",
        r#"instance="web""#,
        r#"argv=["sh", "-c", "echo audited > /tmp/audit.txt"]"#,
    ]);
    assert!(exec.is_some(), "no audit line for root's exec: {lines:#?}");
    assert!(exec.unwrap().contains("pid="), "the caller's pid is logged");
    let cp = find(&[
        " cp ",
        "uid=0 ",
        r#"instance="web""#,
        r#"path="/tmp/audit.txt""#,
    ]);
    assert!(cp.is_some(), "no audit line for the copy: {lines:#?}");
    let nobody = find(&[
        " exec ",
        &format!("uid={NOBODY} "),
        r#"argv=["sh", "-c", "echo from-nobody"]"#,
    ]);
    assert!(
        nobody.is_some(),
        "no audit line for nobody's exec: {lines:#?}"
    );
    assert!(
        find(&["intruder"]).is_none(),
        "a refused caller never reached the API: {lines:#?}"
    );

    // A member's build reads only the member's own files: not a recipe that
    // root owns (it could be /etc/shadow), not a root-only file it names.
    let recipes = tempfile::Builder::new()
        .prefix("vroom-member-recipe")
        .tempdir()
        .unwrap();
    let dir = recipes.path();
    let hello = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/hello");
    let recipe = std::fs::read_to_string(hello.join("recipe.toml")).unwrap()
        + "\n[[files]]\npath = \"/etc/leak\"\nsource = \"secret\"\n";
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
    std::fs::copy(hello.join("index.html"), dir.join("index.html")).unwrap();
    std::fs::write(dir.join("secret"), "root's secret").unwrap();
    std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    for owned in ["", "recipe.toml", "index.html"] {
        std::os::unix::fs::chown(dir.join(owned), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let build = |what: &str| {
        let out = vroom_as_nobody(&env, Some(gid), &["image", "build", dir.to_str().unwrap()]);
        assert!(!out.status.success(), "{what}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = build("a root-owned source");
    assert!(
        err.contains("secret") && err.contains("only the caller's own files are read"),
        "{err}"
    );
    std::os::unix::fs::chown(dir.join("recipe.toml"), Some(0), Some(0)).unwrap();
    let err = build("a root-owned recipe");
    assert!(
        err.contains("recipe.toml") && err.contains("only the caller's own files are read"),
        "{err}"
    );
    // The catalog is vroomd's own: any member may build it.
    let out = vroom_as_nobody(&env, Some(gid), &["image", "build", "hello"]);
    assert!(out.status.success(), "{out:?}");

    // A member archives only where it could write itself, never through a
    // link, and the archive is its own and private.
    let archive_as_nobody = |target: &std::path::Path| {
        vroom_as_nobody(
            &env,
            Some(gid),
            &["rm", "-f", "--archive", target.to_str().unwrap(), "web"],
        )
    };
    let roots = std::path::PathBuf::from(format!("/root/vroom-archive-{}", std::process::id()));
    let out = archive_as_nobody(&roots);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("may not write there"), "{err}");
    assert!(!roots.exists(), "{} was created", roots.display());
    let foreign = env.dir.join("root-only");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::symlink(&foreign, dir.join("link")).unwrap();
    let out = archive_as_nobody(&dir.join("link"));
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 0);
    let archive = dir.join("archive");
    let out = archive_as_nobody(&archive);
    assert!(out.status.success(), "{out:?}");
    let meta = std::fs::symlink_metadata(&archive).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, NOBODY));
    let mut files = vec![];
    for entry in walk(&archive) {
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid()),
            (want, NOBODY),
            "{}",
            entry.display()
        );
        files.push(entry);
    }
    assert!(files.iter().any(|f| f.ends_with("memory.zst")), "{files:?}");

    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after the audit test");
}

#[test]
fn gc_removes_run_dirs_of_instances_that_no_longer_exist() {
    let env = Env::new("gcfiles");
    let instances = env.dir.join("instances");
    let old = instances.join("00000000deadbeef");
    let fresh = instances.join("00000000feedf00d");
    for dir in [&old, &fresh] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("console.log"), vec![b'x'; 4096]).unwrap();
    }
    let status = Command::new("touch")
        .args(["-d", "10 minutes ago"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(status.success());

    let listed = env.ok(&["gc"]);
    let line = |text: &str, dir: &Path| {
        text.lines()
            .find(|l| l.contains(&*dir.to_string_lossy()))
            .map(str::to_string)
            .unwrap_or_default()
    };
    assert!(line(&listed, &old).contains("idle"), "{listed}");
    assert!(line(&listed, &fresh).contains("left alone"), "{listed}");
    assert!(listed.contains("stale files: 8 KiB"), "{listed}");
    assert!(old.exists(), "listing removes nothing");

    let removed = env.ok(&["gc", "--remove"]);
    assert!(line(&removed, &old).contains("removed"), "{removed}");
    assert!(!old.exists());
    assert!(fresh.exists(), "a run dir changed in the last minute stays");
    std::fs::remove_dir_all(&fresh).unwrap();
    env.assert_nothing_left("after gc");
}

#[test]
fn setup_creates_the_api_group_once() {
    let group = TestGroup::unique();
    let setup = || {
        let out = Command::new(vroom_bin())
            .arg("setup")
            .env("VROOM_GROUP", &group.name)
            .env("VROOM_INIT", init_binary())
            .output()
            .expect("run vroom setup");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = setup();
    assert!(
        first.contains(&format!("api group: created {}", group.name)),
        "{first}"
    );
    assert!(group.gid().is_some(), "the group exists");
    let again = setup();
    assert!(
        again.contains(&format!("api group: {} (members may use", group.name)),
        "{again}"
    );
}
