//! The QEMU jail, seen from the host: each VMM runs under a uid of its own
//! with no capabilities, under seccomp, with a root that holds only the
//! jail's entries, inside a cgroup with its limits; the guest still serves;
//! and `rm` leaves no cgroup or tap behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{page_shows, random_subnet, Env};
use vroom_types::InstanceState;

const BOOT: Duration = Duration::from_secs(180);

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The dirs of the instance's cgroup in the v1 memory and pids hierarchies,
/// or its one dir under v2.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        vec![root.join("vroom").join(id)]
    } else {
        vec![
            root.join("memory/vroom").join(id),
            root.join("pids/vroom").join(id),
        ]
    }
}

fn read_trim(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn qemu_runs_jailed_under_its_own_uid_and_cgroup_and_leaves_nothing() {
    let env = Env::new("jail");
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    env.ok(&["run", "hello", "--name", "web", "--net", "lan"]);
    env.ok(&["run", "hello", "--name", "db", "--net", "lan"]);
    let running = |name: &str| {
        env.wait_for(name, "running", BOOT, |i| {
            i.status.state == InstanceState::Running
        })
    };
    let (web, db) = (running("web"), running("db"));
    let pid = web.status.pid.unwrap();

    // Privileges: an unprivileged uid of its own, no capabilities, seccomp.
    let ids = |pid: u32, field: &str| -> Vec<u32> {
        status_field(pid, field)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let uids = ids(pid, "Uid");
    assert!(
        uids.iter().all(|u| *u == uids[0] && *u != 0),
        "real, effective, saved and fs uid are one non-root uid: {uids:?}"
    );
    assert!(ids(pid, "Gid").iter().all(|g| *g != 0));
    assert_eq!(
        status_field(pid, "Groups"),
        "",
        "no supplementary groups under TCG"
    );
    assert_ne!(
        ids(db.status.pid.unwrap(), "Uid")[0],
        uids[0],
        "each VMM has a uid of its own, so one cannot signal or ptrace another"
    );
    // What a QEMU taken over could try on its neighbour, with its own uid.
    let signal = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            &uids[0].to_string(),
            "--regid",
            &uids[0].to_string(),
        ])
        .args(["--clear-groups", "sh", "-c"])
        .arg(format!(
            "kill -0 {} && kill -0 {pid}",
            db.status.pid.unwrap()
        ))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&signal.stderr).contains("Operation not permitted"),
        "web's uid may signal db's QEMU: {signal:?}"
    );
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "QEMU's -sandbox filter is on"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for caps in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }

    // Its root is the jail: only what QEMU needs, read-only.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let top = entries(&root);
    for name in &top {
        assert!(
            ["bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "sbin", "usr", "vm"]
                .contains(&name.as_str()),
            "unexpected {name} in the jail's root: {top:?}"
        );
    }
    assert_eq!(entries(&root.join("etc")), vec!["ld.so.cache"]);
    assert_eq!(entries(&root.join("dev")), vec!["null", "urandom"]);
    // A QEMU of a private prefix (`VROOM_TEST_QEMU`, e.g. QEMU 10) has
    // the prefix bound at /vm/qemu as well (docs/install.md).
    let mut vm = vec!["initramfs", "kernel"];
    if common::test_qemu()
        .iter()
        .any(|(_, qemu)| !qemu.starts_with("/usr/"))
    {
        vm.push("qemu");
    }
    assert_eq!(entries(&root.join("vm")), vm);
    assert!(!root.join("etc/shadow").exists());
    assert!(
        !root.join(env.dir.strip_prefix("/").unwrap()).exists(),
        "the data dir is out of sight"
    );
    assert!(
        !root.join("proc/1").exists() && !root.join("root").exists() && !root.join("tmp").exists()
    );
    // No host path on its command line: files and sockets came as fds.
    let cmdline =
        String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).unwrap();
    assert!(
        !cmdline.contains(&env.dir.display().to_string()),
        "{cmdline}"
    );
    // Namespaces of its own: no host service is reachable from QEMU itself.
    for ns in ["mnt", "net", "ipc"] {
        let link = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(link(&pid.to_string()), link("self"), "{ns} namespace");
    }
    let devices: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|d| d.trim().to_string()))
        .collect();
    assert_eq!(devices, vec!["lo"], "QEMU's own network namespace is empty");
    // Nothing of the jail is mounted in the host's namespace.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&env.dir.display().to_string()), "{mounts}");

    // Its cgroup, with the limits of its guest's memory.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("/vroom/{}", web.id)),
        "QEMU is in its instance's cgroup: {cgroup}"
    );
    let dirs = cgroup_dirs(&web.id);
    let mem = web.mem_mib;
    let expected_memory = ((mem + mem / 8 + 256) << 20).to_string();
    if dirs.len() == 2 {
        assert_eq!(
            read_trim(&dirs[0].join("memory.limit_in_bytes")),
            expected_memory
        );
        assert_eq!(read_trim(&dirs[1].join("pids.max")), "129");
        let peak: u64 = read_trim(&dirs[0].join("memory.max_usage_in_bytes"))
            .parse()
            .unwrap();
        eprintln!(
            "cgroup memory peak of a booted {mem} MiB TCG guest: {} MiB",
            peak >> 20
        );
    } else {
        assert_eq!(read_trim(&dirs[0].join("memory.max")), expected_memory);
        assert_eq!(read_trim(&dirs[0].join("pids.max")), "129");
    }

    // The guest still serves: exec through the agent, HTTP on its tap.
    let out = env.ok(&["exec", "web", "--", "cat", "/proc/sys/kernel/hostname"]);
    assert_eq!(out.trim(), "web");
    assert!(page_shows(web.nics[0].ip.unwrap(), "Hello from vroom!"));

    // A restart keeps the jail (a new VMM, a new uid check, the same cgroup name).
    env.ok(&["restart", "web"]);
    let web = running("web");
    let pid = web.status.pid.unwrap();
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert!(page_shows(web.nics[0].ip.unwrap(), "Hello from vroom!"));

    env.ok(&["rm", "-f", "web"]);
    env.ok(&["rm", "-f", "db"]);
    for instance in [&web, &db] {
        for dir in cgroup_dirs(&instance.id) {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
    }
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after rm");
}

#[test]
fn empty_vroom_cgroups_are_swept_when_a_daemon_starts() {
    let env = Env::new("jailsweep");
    // What a VMM that died while no daemon watched it leaves behind.
    let leftover = format!("{}-leftover", env.prefix);
    for dir in cgroup_dirs(&leftover) {
        std::fs::create_dir_all(&dir).unwrap();
    }
    env.kill_daemon();
    env.start_daemon();
    for dir in cgroup_dirs(&leftover) {
        assert!(
            !dir.exists(),
            "{} is left after a daemon start",
            dir.display()
        );
    }
}

#[test]
fn a_vmm_that_exits_at_start_is_reported_with_its_words_and_rolled_back() {
    // /bin/false in QEMU's place: it runs in the jail and exits at once.
    let env = Env::with_env("jailfail", vec![("VROOM_QEMU", "/bin/false".into())]);
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    let err = env.fail(&["run", "hello", "--name", "web", "--net", "lan"]);
    assert!(
        err.contains("QEMU exited at start (exit status 1)"),
        "{err}"
    );
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after a failed run");
}

#[test]
fn a_vmm_cannot_grow_its_log_past_the_file_size_cap() {
    // A "QEMU" that floods its stderr, as a QEMU made to log without end would.
    // Removed in Drop, even when the test fails.
    let dir = tempfile::Builder::new()
        .prefix("vroom-jail-flood")
        .tempdir()
        .unwrap();
    let flood = dir.path().join("qemu-system-x86_64");
    // It ends with status 42 only if yes stops, which it does once a write fails.
    std::fs::write(&flood, "#!/bin/sh\nyes flood >&2\nexit 42\n").unwrap();
    std::fs::set_permissions(&flood, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = Env::with_env(
        "jailflood",
        vec![("VROOM_QEMU", flood.display().to_string())],
    );
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    let err = env.fail(&["run", "hello", "--name", "web", "--net", "lan"]);
    // yes stops at the cap (128 MiB) with EFBIG instead of filling the disk.
    assert!(
        err.contains("QEMU exited at start (exit status 42)"),
        "{err}"
    );
    assert!(err.contains("cut at the 128 MiB file size cap"), "{err}");
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after a failed run");
}

#[test]
fn bench_jail_boots_the_same_guest_jailed_and_unjailed() {
    let env = Env::new("jailbench");
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    // The bench boots the hello image of the data dir: build it.
    env.ok(&["run", "hello", "--name", "warm", "--net", "lan"]);
    env.ok(&["rm", "-f", "warm"]);
    let out = env.ok(&["bench", "jail", "-n", "1"]);
    for row in ["unjailed", "jailed", "ratio jailed/unjailed"] {
        assert!(out.contains(row), "{out}");
    }
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after the bench");
}
