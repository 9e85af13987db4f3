//! Data volumes end to end: a real guest mounts a volume, its data outlives
//! the instance, a read-only attachment cannot write, a grown volume's
//! filesystem grows at the next boot, bad input changes nothing, and a
//! daemon killed inside a volume's creation leaves it whole or absent.

mod common;

use std::time::Duration;

use common::{kill_during, random_subnet, Env};
use vroom_types::{InstanceState, Volume};

const BOOT: Duration = Duration::from_secs(90);

fn volumes(env: &Env) -> Vec<Volume> {
    serde_json::from_str(&env.ok(&["volume", "ls", "--json"])).unwrap()
}

fn run_hello(env: &Env, name: &str, volume: &str) {
    env.ok(&[
        "run", "hello", "--name", name, "--net", "lan", "--volume", volume,
    ]);
    env.wait_for(name, "running", BOOT, |i| {
        i.status.state == InstanceState::Running
    });
}

fn sh(env: &Env, name: &str, script: &str) -> (bool, String) {
    let out = env.vroom(&["exec", name, "--", "/bin/sh", "-c", script]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The mount line of `path` in the guest's /proc/mounts.
fn mount_line(env: &Env, name: &str, path: &str) -> String {
    let (ok, mounts) = sh(env, name, "cat /proc/mounts");
    assert!(ok, "{mounts}");
    mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(path))
        .unwrap_or_else(|| panic!("{path} is not mounted: {mounts}"))
        .to_string()
}

/// Size in KiB of the filesystem at `path`, as the guest's df says.
fn df_kib(env: &Env, name: &str, path: &str) -> u64 {
    let (ok, out) = sh(env, name, &format!("df -k {path} | tail -n 1"));
    assert!(ok, "{out}");
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_volume_keeps_its_data_across_instances() {
    let env = Env::new("vol");
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&["volume", "create", "files", "--size", "64M"]);

    run_hello(&env, "web", "files:/var/files");
    let line = mount_line(&env, "web", "/var/files");
    let options = line.split_whitespace().nth(3).unwrap();
    for flag in ["rw", "nosuid", "nodev", "noexec"] {
        assert!(options.split(',').any(|o| o == flag), "{flag}: {line}");
    }
    assert!(line.contains(" ext4 "), "{line}");
    let (ok, out) = sh(
        &env,
        "web",
        "echo kept > /var/files/note && sync && cat /var/files/note",
    );
    assert!(ok && out.contains("kept"), "{out}");
    // Programs on it do not run (noexec).
    let (ok, out) = sh(
        &env,
        "web",
        "cp /bin/busybox /var/files/bb && /var/files/bb true",
    );
    assert!(!ok, "ran a program from a noexec volume: {out}");
    assert_eq!(
        volumes(&env)[0].attached_to.as_ref().unwrap().as_str(),
        "web"
    );

    // Attached: it cannot be removed, nor given to another instance.
    let err = env.fail(&["volume", "rm", "files"]);
    assert!(err.contains("attached to instance web"), "{err}");
    let err = env.fail(&[
        "run",
        "hello",
        "--name",
        "other",
        "--net",
        "lan",
        "--volume",
        "files:/var/x",
    ]);
    assert!(err.contains("attached to instance web"), "{err}");

    // The instance goes (stopped first: its guest unmounts the volume, so
    // a read-only disk has no journal left to replay); the volume and what
    // was written stay.
    env.ok(&["stop", "web"]);
    env.ok(&["rm", "web"]);
    assert_eq!(volumes(&env)[0].attached_to, None);
    run_hello(&env, "web2", "files:/var/files:ro");
    let (ok, out) = sh(&env, "web2", "cat /var/files/note");
    assert!(ok && out.contains("kept"), "{out}");
    assert!(mount_line(&env, "web2", "/var/files").contains(" ro,"));
    let (ok, _) = sh(&env, "web2", "echo x > /var/files/other");
    assert!(!ok, "wrote to a read-only volume");

    // Grown while stopped, the filesystem fills the disk at the next boot.
    let before = df_kib(&env, "web2", "/var/files");
    env.ok(&["stop", "web2"]);
    env.ok(&["rm", "web2"]);
    env.ok(&["volume", "resize", "files", "--size", "96M"]);
    run_hello(&env, "web3", "files:/var/files");
    let offline = df_kib(&env, "web3", "/var/files");
    assert!(
        offline > before + 25 * 1024,
        "{before} KiB -> {offline} KiB"
    );
    // Grown while it runs, at once.
    env.ok(&["volume", "resize", "files", "--size", "128M"]);
    let online = df_kib(&env, "web3", "/var/files");
    assert!(
        online > offline + 25 * 1024,
        "{offline} KiB -> {online} KiB"
    );

    // A snapshot of the running guest's volume (frozen for the copy), a
    // later write, then back to the snapshot and a clone of it.
    let snap: vroom_types::VolumeSnapshot = serde_json::from_str(
        &env.ok(&["volume", "snapshot", "files", "--name", "before", "--json"]),
    )
    .unwrap();
    assert_eq!(snap.taken, vroom_types::SnapshotTaken::Frozen, "{snap:?}");
    let (ok, out) = sh(&env, "web3", "echo later > /var/files/note && sync");
    assert!(ok, "{out}");
    let err = env.fail(&["volume", "restore", "files", "before"]);
    assert!(err.contains("stop it first"), "{err}");
    env.ok(&["stop", "web3"]);
    env.ok(&["volume", "restore", "files", "before"]);
    env.ok(&["start", "web3"]);
    env.wait_for("web3", "running", BOOT, |i| {
        i.status.state == InstanceState::Running
    });
    let (ok, out) = sh(&env, "web3", "cat /var/files/note");
    assert!(ok && out.trim() == "kept", "{out}");
    env.ok(&["volume", "clone", "before", "copy"]);
    run_hello(&env, "reader", "copy:/var/copy");
    let (ok, out) = sh(&env, "reader", "cat /var/copy/note");
    assert!(ok && out.trim() == "kept", "{out}");
    env.ok(&["rm", "-f", "--volumes", "reader"]);

    // A snapshot of the instance holds its volume; its clone runs on a
    // copy of its own, mounted as the snapshot's memory has it.
    env.ok(&["snapshot", "web3", "--name", "whole"]);
    env.ok(&["clone", "whole", "twin"]);
    env.wait_for("twin", "running", BOOT, |i| {
        i.status.state == InstanceState::Running
    });
    let (ok, out) = sh(
        &env,
        "twin",
        "cat /var/files/note && echo twin > /var/files/note && sync",
    );
    assert!(ok && out.trim() == "kept", "{out}");
    let twin = env.instance("twin");
    assert_eq!(twin.spec.volumes[0].volume.as_str(), "twin-files");
    let usage = &twin
        .health
        .as_ref()
        .expect("a running guest's health")
        .volumes;
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(
        (usage[0].name.as_str(), usage[0].path.as_str()),
        ("twin-files", "/var/files")
    );
    assert!(
        usage[0].total_bytes > 100 << 20 && !usage[0].full,
        "{usage:?}"
    );
    let (ok, out) = sh(&env, "web3", "cat /var/files/note");
    assert!(
        ok && out.trim() == "kept",
        "the clone's writes stay its own: {out}"
    );
    env.ok(&["rm", "-f", "--volumes", "twin"]);
    env.ok(&["snapshot", "rm", "whole"]);

    // Filled up, the guest gets ENOSPC and its health says so.
    let (ok, out) = sh(&env, "web3", "cat /dev/zero > /var/files/fill");
    assert!(
        !ok && out.contains("No space left"),
        "wrote past a full volume: {out}"
    );
    let web3 = env.instance("web3");
    let usage = &web3.health.as_ref().expect("health").volumes;
    assert!(usage[0].full, "{usage:?}");
    sh(&env, "web3", "rm /var/files/fill && sync");

    // `rm --volumes` takes them with it.
    env.ok(&["rm", "-f", "--volumes", "web3"]);
    assert!(volumes(&env).is_empty());
    let left = std::fs::read_dir(env.dir.join("volumes")).unwrap().count();
    assert_eq!(left, 0);
}

#[test]
fn bad_volume_input_is_one_line_and_changes_nothing() {
    let env = Env::new("volbad");
    env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
    env.ok(&["volume", "create", "v", "--size", "16M"]);
    for (args, want) in [
        (
            vec!["volume", "create", "w", "--size", "2X"],
            "invalid volume size",
        ),
        (
            vec!["volume", "create", "w", "--size", "16T"],
            "MiB are free",
        ),
        (
            vec!["volume", "create", "v", "--size", "16M"],
            "already exists",
        ),
        (
            vec!["volume", "create", "w", "--size", "16M", "--replicas", "2"],
            "needs a cluster",
        ),
        (
            vec!["volume", "resize", "v", "--size", "8M"],
            "invalid volume size",
        ),
        (vec!["volume", "rm", "nope"], "no volume named"),
        (
            vec!["run", "hello", "--name", "a", "--volume", "v:/etc"],
            "system directory",
        ),
        (
            vec![
                "run", "hello", "--name", "a", "--net", "lan", "--volume", "v:/srv/x",
            ],
            "read-only root",
        ),
        (
            vec![
                "run",
                "hello",
                "--name",
                "a",
                "--net",
                "lan",
                "--volume",
                "nope:/var/x",
            ],
            "no volume named",
        ),
    ] {
        let err = env.fail(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let all = volumes(&env);
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].name.as_str(), all[0].size_mib), ("v", 16));
    assert!(env.instances().is_empty());
}

/// SIGKILLs inside `volume create` (mkfs, rename, record): after a restart
/// the volume is listed whole or not at all, and no directory is left that
/// no volume owns.
#[test]
fn a_daemon_killed_inside_volume_create_leaves_it_whole_or_absent() {
    let env = Env::new("volkill");
    for (i, ms) in [0u64, 3, 8, 15, 30, 60].into_iter().enumerate() {
        let name = format!("k{i}");
        let body = format!(r#"{{"name":"{name}","size_mib":256}}"#);
        kill_during(&env, "POST", "/v1/volumes", body, Duration::from_millis(ms));
        let listed = volumes(&env);
        let mut dirs: Vec<String> = std::fs::read_dir(env.dir.join("volumes"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort();
        let mut ids: Vec<String> = listed.iter().map(|v| v.id.clone()).collect();
        ids.sort();
        assert_eq!(
            dirs, ids,
            "after a kill at {ms} ms: directories and records differ"
        );
        for v in &listed {
            let file = env.dir.join("volumes").join(&v.id).join("volume.img");
            assert_eq!(std::fs::metadata(&file).unwrap().len(), 256 << 20);
            let raw = std::fs::read(&file).unwrap();
            assert_eq!(&raw[1080..1082], &[0x53, 0xef], "{} is formatted", v.name);
        }
        // Whatever happened, the name can be used (again).
        if !listed.iter().any(|v| v.name.as_str() == name) {
            env.ok(&["volume", "create", &name, "--size", "256M"]);
        }
    }
}
