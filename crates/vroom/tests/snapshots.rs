//! Snapshots, restores, clones, warm starts, ephemeral instances and
//! forensic removal, on real guests: the web appliance keeps a counter in
//! guest memory (a CGI over a tmpfs file) and reports its identity
//! (hostname, machine id, the first bytes of /dev/urandom) over HTTP, read
//! by a client in a network namespace.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{fetch, poll, random_subnet, recipe, Env};
use vroom_types::{InstanceState, Snapshot};

fn get(env: &Env, ns: &str, ip: std::net::Ipv4Addr, path: &str) -> String {
    let (rc, body) = fetch(env, ns, &format!("http://{ip}{path}"));
    assert_eq!(rc, 0, "GET {path} from {ip}: {body}");
    body.trim().to_string()
}

fn counter(env: &Env, ns: &str, ip: std::net::Ipv4Addr) -> u64 {
    let body = get(env, ns, ip, "/cgi-bin/counter");
    body.parse()
        .unwrap_or_else(|_| panic!("counter answered {body:?}"))
}

fn ip_of(env: &Env, name: &str) -> std::net::Ipv4Addr {
    env.instance(name).nics[0].ip.unwrap()
}

fn snapshots(env: &Env) -> Vec<Snapshot> {
    serde_json::from_str(&env.ok(&["snapshot", "ls", "--json"])).unwrap()
}

/// No partial snapshot is left behind or listed.
fn no_partial(env: &Env) -> bool {
    std::fs::read_dir(env.dir.join("snapshots"))
        .map(|entries| {
            entries
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with('.'))
        })
        .unwrap_or(true)
}

/// State in guest memory survives snapshot and restore; five clones of one
/// snapshot run at once with their own identity; bad input changes nothing.
#[test]
fn snapshot_restore_and_five_clones() {
    let env = Env::new("snap");
    env.ok(&["image", "build", &recipe("web")]);
    let lan = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &lan]);
    env.ok(&["run", "web", "--name", "web1", "--net", "lan"]);
    let client = env.client_on("cl", "lan", &lan);
    let ip = ip_of(&env, "web1");
    for want in 1..=3 {
        assert_eq!(counter(&env, &client, ip), want);
    }
    env.ok(&["snapshot", "web1", "--name", "s1"]);
    let listed = snapshots(&env);
    assert_eq!(listed.len(), 1);
    assert!(listed[0].memory.bytes > 1_000_000, "{:?}", listed[0].memory);
    assert_eq!(listed[0].instance.config, env.instance("web1").config);
    // The source runs on, and its counter goes on from the snapshot's.
    assert_eq!(counter(&env, &client, ip), 4);
    assert_eq!(counter(&env, &client, ip), 5);
    let pid = env.instance("web1").status.pid;
    env.ok(&["restore", "web1", "s1"]);
    let restored = env.instance("web1");
    assert_ne!(restored.status.pid, pid, "a restore replaces the VM");
    assert_eq!(restored.status.started_from.as_deref(), Some("snapshot s1"));
    assert_eq!(
        counter(&env, &client, ip),
        4,
        "back to the snapshot's state"
    );

    // Bad input: one line naming the cause, nothing changes.
    let before = env.instances().len();
    let qemus = env.qemu_pids().len();
    for (args, says) in [
        (vec!["snapshot", "web1", "--name", "s1"], "already exists"),
        (vec!["snapshot", "nope"], "nope"),
        (vec!["restore", "web1", "nope"], "nope"),
        (vec!["clone", "nope", "x1"], "nope"),
        (vec!["clone", "s1", "web1"], "already exists"),
    ] {
        let err = env.fail(&args);
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    env.ok(&[
        "run", "web", "--name", "big", "--net", "lan", "--mem", "256M", "--cold",
    ]);
    let big_pid = env.instance("big").status.pid;
    let err = env.fail(&["restore", "big", "s1"]);
    assert!(err.contains("MiB of memory"), "{err}");
    assert_eq!(env.instance("big").status.pid, big_pid);
    env.ok(&["rm", "-f", "big"]);
    // A corrupted snapshot is refused, by restore and by clone.
    env.ok(&["snapshot", "web1", "--name", "s2"]);
    let memory = env.dir.join("snapshots/s2/memory.zst");
    let mut bytes = std::fs::read(&memory).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&memory, &bytes).unwrap();
    let pid = env.instance("web1").status.pid;
    let err = env.fail(&["restore", "web1", "s2"]);
    assert!(err.contains("corrupt"), "{err}");
    assert_eq!(env.instance("web1").status.pid, pid);
    let err = env.fail(&["clone", "s2", "bad"]);
    assert!(err.contains("corrupt"), "{err}");
    assert!(env.fail(&["inspect", "bad"]).contains("bad"));
    assert_eq!(env.instances().len(), before);
    assert_eq!(env.qemu_pids().len(), qemus);
    env.ok(&["snapshot", "rm", "s2"]);

    // Five clones at once, each its own machine.
    let names: Vec<String> = (1..=5).map(|i| format!("c{i}")).collect();
    for name in &names {
        let out = env.ok(&["clone", "s1", name]);
        assert!(out.contains("from snapshot s1"), "{out}");
    }
    let mut macs = BTreeSet::new();
    let mut ips = BTreeSet::new();
    let mut identities = BTreeSet::new();
    let mut randoms = BTreeSet::new();
    for name in &names {
        let clone = env.instance(name);
        assert_eq!(clone.status.state, InstanceState::Running);
        macs.insert(clone.nics[0].mac.clone());
        let ip = clone.nics[0].ip.unwrap();
        ips.insert(ip);
        assert_eq!(
            counter(&env, &client, ip),
            4,
            "{name} goes on from the snapshot"
        );
        let identity = get(&env, &client, ip, "/cgi-bin/identity");
        assert!(identity.contains(name.as_str()), "{name}: {identity}");
        let random = identity.lines().last().unwrap_or_default().to_string();
        assert!(random.len() >= 32, "{name}: {identity}");
        randoms.insert(random);
        identities.insert(identity);
        let hook = env.ok(&["exec", name, "--", "cat", "/run/www/cloned"]);
        assert!(!hook.trim().is_empty(), "{name} ran its on_clone hook");
    }
    macs.insert(env.instance("web1").nics[0].mac.clone());
    ips.insert(ip);
    assert_eq!(macs.len(), 6, "MACs: {macs:?}");
    assert_eq!(ips.len(), 6, "IPs: {ips:?}");
    assert_eq!(identities.len(), 5);
    assert_eq!(randoms.len(), 5, "urandom: {randoms:?}");
    // The source was not a clone.
    assert_eq!(
        env.vroom(&["exec", "web1", "--", "cat", "/run/www/cloned"])
            .status
            .code(),
        Some(1)
    );
}

/// `image warm` makes `run` start from a snapshot, with the instance's own
/// identity; a rebuilt image is booted, never started from the stale
/// snapshot; an ephemeral instance forgets a config change on restart.
#[test]
fn warm_starts_stale_snapshots_and_ephemeral_instances() {
    let env = Env::new("warm");
    env.ok(&["image", "build", &recipe("web")]);
    let lan = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &lan]);
    let client = env.client_on("cl", "lan", &lan);
    env.ok(&["image", "warm", "web"]);
    let warm: Vec<Snapshot> =
        serde_json::from_str(&env.ok(&["snapshot", "ls", "--warm", "--json"])).unwrap();
    assert_eq!(warm.len(), 1);
    assert!(env.qemu_pids().is_empty(), "the warm-up VM is gone");

    let out = env.ok(&["run", "web", "--name", "w1", "--net", "lan"]);
    assert!(out.contains("from warm web"), "{out}");
    let w1 = env.instance("w1");
    let ip = w1.nics[0].ip.unwrap();
    let identity = get(&env, &client, ip, "/cgi-bin/identity");
    assert!(identity.contains("w1"), "{identity}");
    // Its own config, in force and changeable.
    env.ok(&["config", "w1", "set", "title=Warm and mine"]);
    let shown = poll(Duration::from_secs(10), || {
        let (rc, body) = fetch(&env, &client, &format!("http://{ip}/"));
        (rc == 0 && body.contains("Warm and mine")).then_some(())
    });
    assert!(shown.is_some(), "the new title is served");
    let cold = env.ok(&["run", "web", "--name", "k1", "--net", "lan", "--cold"]);
    assert!(!cold.contains("from"), "{cold}");

    // The name `ls --warm` shows is the one `rm` takes, with `--warm`.
    let err = env.fail(&["snapshot", "rm", warm[0].name.as_str()]);
    assert!(err.contains("--warm"), "{err}");
    let removed = env.ok(&["snapshot", "rm", "--warm", warm[0].name.as_str()]);
    assert!(removed.contains("removed warm snapshot web"), "{removed}");
    assert!(env.ok(&["snapshot", "ls", "--warm"]).lines().count() <= 1);
    let booted = env.ok(&["run", "web", "--name", "k2", "--net", "lan"]);
    assert!(!booted.contains("from"), "{booted}");

    // A rebuilt image (another id) is never started from the old snapshot.
    let copy = env.dir.join("web-recipe");
    common::sh(&format!("cp -r {} {}", recipe("web"), copy.display()));
    let page = copy.join("index.html");
    let html = std::fs::read_to_string(&page).unwrap();
    std::fs::write(&page, html.replace("<body>", "<body><!-- rebuilt -->")).unwrap();
    env.ok(&["image", "build", copy.to_str().unwrap()]);
    let out = env.ok(&["run", "web", "--name", "w2", "--net", "lan"]);
    assert!(
        !out.contains("from"),
        "a stale warm snapshot was used: {out}"
    );

    // Ephemeral: a config change does not survive a restart.
    env.ok(&["run", "web", "--name", "e1", "--net", "lan", "--ephemeral"]);
    assert!(env.ok(&["inspect", "e1"]).contains("ephemeral"));
    let seed = env.instance("e1").config;
    env.ok(&["config", "e1", "set", "title=Changed"]);
    assert_ne!(env.instance("e1").config, seed);
    env.ok(&["restart", "e1"]);
    assert_eq!(env.instance("e1").config, seed);
    let ip = ip_of(&env, "e1");
    let served = poll(Duration::from_secs(30), || {
        let (rc, body) = fetch(&env, &client, &format!("http://{ip}/"));
        (rc == 0).then_some(body)
    });
    assert!(!served.unwrap().contains("Changed"));
}

/// `rm --archive` writes an archive that verifies, flipping one byte makes
/// `archive verify` fail, and the instance's files are gone.
#[test]
fn forensic_removal_archives_then_wipes() {
    let env = Env::new("arch");
    env.ok(&["image", "build", &recipe("web")]);
    env.ok(&["run", "web", "--name", "w1", "--cold"]);
    let id = env.instance("w1").id;
    let archive = env.dir.join("archive");
    // Bad input first: a non-empty dir, and a running instance without -f.
    let busy = env.dir.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("x"), b"x").unwrap();
    let err = env.fail(&["rm", "-f", "--archive", busy.to_str().unwrap(), "w1"]);
    assert!(err.contains("not empty"), "{err}");
    let err = env.fail(&["rm", "--archive", archive.to_str().unwrap(), "w1"]);
    assert!(err.contains("running"), "{err}");
    assert!(!archive.exists());
    assert_eq!(env.instance("w1").status.state, InstanceState::Running);

    let out = env.ok(&["rm", "-f", "--archive", archive.to_str().unwrap(), "w1"]);
    assert!(out.contains("memory.zst"), "{out}");
    for file in [
        "memory.zst",
        "config.img",
        "instance.json",
        "config-history.json",
        "SHA256SUMS",
    ] {
        assert!(archive.join(file).is_file(), "{file} missing: {out}");
    }
    assert!(env.fail(&["inspect", "w1"]).contains("w1"));
    assert!(!env.dir.join("instances").join(&id).exists());
    assert!(env.qemu_pids().is_empty());
    // `sha256sum -c` agrees with `archive verify`.
    let sums = std::process::Command::new("sha256sum")
        .args(["-c", "--quiet", "SHA256SUMS"])
        .current_dir(&archive)
        .status()
        .unwrap();
    assert!(sums.success());
    env.ok(&["archive", "verify", archive.to_str().unwrap()]);
    let volume = archive.join("config.img");
    let mut bytes = std::fs::read(&volume).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&volume, &bytes).unwrap();
    let out = env.vroom(&["archive", "verify", archive.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.img"));
}

/// vroomd SIGKILLed, and QEMU killed, at a spread of moments inside
/// `snapshot`: no partial snapshot is ever listed or left on disk, a listed
/// one is complete and clones, and the instance runs on (or is restarted).
#[test]
fn kills_inside_snapshot_leave_no_partial_snapshot() {
    let env = Env::new("snapk");
    env.ok(&["image", "build", &recipe("web")]);
    env.ok(&["run", "web", "--name", "w1", "--cold"]);
    let t0 = Instant::now();
    env.ok(&["snapshot", "w1", "--name", "base"]);
    let took = t0.elapsed();
    env.ok(&["snapshot", "rm", "base"]);
    let body = |name: &str| format!(r#"{{"instance":"w1","name":"{name}"}}"#);
    let check = |context: &str, old_pid: Option<u32>| {
        // What is listed is complete (the on-disk sweep of partial
        // directories is checked after a last restart, below).
        for snapshot in snapshots(&env) {
            let dir = env.dir.join("snapshots").join(snapshot.name.as_str());
            let size = std::fs::metadata(dir.join("memory.zst")).unwrap().len();
            assert_eq!(
                size, snapshot.memory.bytes,
                "{context}: torn {}",
                snapshot.name
            );
        }
        // After a QEMU kill: running again in a new VMM.
        let running = poll(Duration::from_secs(60), || {
            let status = env.instance("w1").status;
            (status.state == InstanceState::Running
                && status.pid.is_some()
                && status.pid != old_pid)
                .then_some(())
        });
        assert!(
            running.is_some(),
            "{context}: w1 is {:?}",
            env.instance("w1").status
        );
        // The guest is not left frozen or paused: it answers an exec.
        assert_eq!(env.ok(&["exec", "w1", "--", "hostname"]).trim(), "w1");
    };
    for (i, fraction) in [0.05, 0.3, 0.6, 0.9].iter().enumerate() {
        let delay = took.mul_f64(*fraction);
        let name = format!("k{i}");
        common::kill_during(&env, "POST", "/v1/snapshots", body(&name), delay);
        check(&format!("vroomd killed at {fraction} of a snapshot"), None);
    }
    for (i, fraction) in [0.2, 0.6].iter().enumerate() {
        let pid = env.instance("w1").status.pid.unwrap();
        let dir = env.dir.clone();
        let name = format!("q{i}");
        let sender = std::thread::spawn({
            let body = body(&name);
            move || common::send(&dir, "POST", "/v1/snapshots", &body)
        });
        std::thread::sleep(took.mul_f64(*fraction));
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        let _ = sender.join();
        check(
            &format!("QEMU killed at {fraction} of a snapshot"),
            Some(pid),
        );
    }
    // A restart sweeps whatever partial directory an interrupted capture left.
    env.kill_daemon();
    env.start_daemon();
    let listing: Vec<String> = std::fs::read_dir(env.dir.join("snapshots"))
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        no_partial(&env),
        "a partial snapshot is left after a restart: {listing:?}\n{}",
        env.daemon_log()
    );
    // Whatever did complete is whole: it clones.
    if let Some(snapshot) = snapshots(&env).first() {
        env.ok(&["clone", snapshot.name.as_str(), "survivor"]);
        assert_eq!(
            env.instance("survivor").status.state,
            InstanceState::Running
        );
    }
}
