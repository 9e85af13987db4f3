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

fn volume_file(env: &Env, name: &str) -> std::path::PathBuf {
    let v = volumes(env)
        .into_iter()
        .find(|v| v.name.as_str() == name)
        .unwrap_or_else(|| panic!("no volume {name}"));
    env.dir.join("volumes").join(v.id).join("volume.img")
}

/// `qemu-img compare`: true when the two images hold the same bytes.
fn same_image(a: &str, a_fmt: &str, b: &str, b_fmt: &str) -> bool {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", a_fmt, "-F", b_fmt, a, b])
        .output()
        .expect("qemu-img (qemu-utils) is needed by this test");
    out.status.success()
}

fn poke(file: &std::path::Path, at: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(data, at).unwrap();
}

fn leftovers(env: &Env) -> (Vec<String>, Vec<String>) {
    let names = |dir: std::path::PathBuf| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let staging = names(env.dir.join("volumes"))
        .into_iter()
        .filter(|n| n.starts_with(".new-"))
        .collect();
    (names(env.dir.join("exports")), staging)
}

/// A volume exported and read by a real NBD client, backed up to qcow2 and
/// raw files with their digests, imported back under new names with the
/// same bytes; and what is refused: a taken address, a missing snapshot, a
/// second export, an existing backup file, a digest that does not match, a
/// file that is no image or no ext4, a name that exists. Nothing refused
/// leaves a server, a record or a staging file.
#[test]
fn volumes_export_back_up_and_import() {
    let env = Env::new("volexp");
    env.ok(&["volume", "create", "files", "--size", "64M"]);
    let file = volume_file(&env, "files");
    poke(&file, 40 << 20, b"vroom export test data");
    let file_s = file.display().to_string();

    let e: vroom_types::VolumeExport =
        serde_json::from_str(&env.ok(&["volume", "export", "files", "--json"])).unwrap();
    let socket = env.dir.join("exports/files.sock");
    assert_eq!(
        e.uri,
        format!("nbd+unix:///files?socket={}", socket.display())
    );
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    let group = std::fs::metadata(&env.dir).unwrap().gid();
    assert_eq!(mode, if group == 0 { 0o600 } else { 0o660 }, "socket mode");
    assert!(
        same_image(&file_s, "raw", &e.uri, "raw"),
        "the export reads as the file"
    );
    assert_eq!(volumes(&env)[0].export.as_ref().unwrap().pid, e.pid);
    assert_eq!(env.nbd_pids(), vec![e.pid]);
    let err = env.fail(&["volume", "export", "files"]);
    assert!(err.contains("already exported"), "{err}");
    env.ok(&["volume", "unexport", "files"]);
    assert!(env.nbd_pids().is_empty());

    // Refused, with nothing left.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_at = format!("tcp:{}", taken.local_addr().unwrap());
    for (args, want) in [
        (
            vec!["volume", "export", "files", "--listen", &taken_at],
            "address is in use",
        ),
        (
            vec!["volume", "export", "files", "--snapshot", "nope"],
            "no volume snapshot named",
        ),
        (
            vec!["volume", "export", "files", "--listen", "tcp:host:1"],
            "invalid listen address",
        ),
        (vec!["volume", "export", "nope"], "no volume named"),
    ] {
        let err = env.fail(&args);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.trim().contains('\n'), "one line: {err}");
        assert!(env.nbd_pids().is_empty(), "{args:?}");
        assert_eq!(leftovers(&env), (vec![], vec![]), "{args:?}");
    }
    // Over TCP, on a free port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("tcp:127.0.0.1:{port}");
    let e: vroom_types::VolumeExport = serde_json::from_str(
        &env.ok(&["volume", "export", "files", "--listen", &listen, "--json"]),
    )
    .unwrap();
    assert_eq!(e.uri, format!("nbd://127.0.0.1:{port}/files"));
    assert!(same_image(&file_s, "raw", &e.uri, "raw"));
    // Removing the volume ends its export.
    env.ok(&["volume", "snapshot", "files", "--name", "s1"]);
    env.ok(&["volume", "create", "gone", "--size", "16M"]);
    env.ok(&["volume", "export", "gone"]);
    env.ok(&["volume", "rm", "gone"]);
    assert_eq!(env.nbd_pids(), vec![e.pid]);
    env.ok(&["volume", "unexport", "files"]);

    // Backups: qcow2 (compact) and raw, with digests sha256sum accepts.
    let out = tempfile::tempdir().unwrap();
    let qcow = out.path().join("files.qcow2");
    let raw = out.path().join("files.raw");
    let (qcow_s, raw_s) = (qcow.display().to_string(), raw.display().to_string());
    let started = std::time::Instant::now();
    let said = env.ok(&["volume", "backup", "files", &qcow_s]);
    eprintln!("backup: {said} ({:?})", started.elapsed());
    env.ok(&[
        "volume",
        "backup",
        "files",
        &raw_s,
        "--format",
        "raw",
        "--snapshot",
        "s1",
    ]);
    assert!(
        same_image(&file_s, "raw", &qcow_s, "qcow2"),
        "the qcow2 backup"
    );
    assert!(same_image(&file_s, "raw", &raw_s, "raw"), "the raw backup");
    assert!(
        std::fs::metadata(&qcow).unwrap().len() < 16 << 20,
        "compact"
    );
    let check = std::process::Command::new("sha256sum")
        .args(["-c", "files.qcow2.sha256", "files.raw.sha256"])
        .current_dir(out.path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert!(env.nbd_pids().is_empty());
    assert_eq!(leftovers(&env), (vec![], vec![]));
    let err = env.fail(&["volume", "backup", "files", &qcow_s]);
    assert!(err.contains("exists"), "{err}");
    let names: Vec<String> = volumes(&env)[0]
        .snapshots
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["s1"], "a backup leaves no snapshot");

    // Imports: the same bytes under a new name.
    env.ok(&["volume", "import", "copy", &qcow_s]);
    env.ok(&["volume", "import", "copy2", &raw_s]);
    for name in ["copy", "copy2"] {
        let copy = volume_file(&env, name).display().to_string();
        assert!(same_image(&file_s, "raw", &copy, "raw"), "{name}");
    }
    assert_eq!(
        volumes(&env)
            .iter()
            .find(|v| v.name.as_str() == "copy")
            .unwrap()
            .size_mib,
        64
    );

    let text = out.path().join("notes.txt");
    std::fs::write(&text, "not an image\n").unwrap();
    let junk = out.path().join("junk.img");
    std::fs::write(&junk, vec![0x5a; 32 << 20]).unwrap();
    let bad_digest = out.path().join("bad.qcow2");
    std::fs::copy(&qcow, &bad_digest).unwrap();
    std::fs::write(
        out.path().join("bad.qcow2.sha256"),
        format!("{}  bad.qcow2\n", "0".repeat(64)),
    )
    .unwrap();
    let (text_s, junk_s, bad_s) = (
        text.display().to_string(),
        junk.display().to_string(),
        bad_digest.display().to_string(),
    );
    for (args, want) in [
        (
            vec!["volume", "import", "new", &text_s],
            "a volume is 16 MiB to 16 TiB",
        ),
        (
            vec!["volume", "import", "new", &junk_s],
            "not an ext4 filesystem",
        ),
        (vec!["volume", "import", "new", &bad_s], "does not match"),
        (vec!["volume", "import", "copy", &qcow_s], "already exists"),
        (
            vec!["volume", "import", "new", "/nonexistent.img"],
            "cannot read",
        ),
    ] {
        let err = env.fail(&args);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(env.nbd_pids().is_empty(), "{args:?}");
        assert_eq!(leftovers(&env), (vec![], vec![]), "{args:?}");
    }
    let mut names: Vec<String> = volumes(&env)
        .into_iter()
        .map(|v| v.name.to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["copy", "copy2", "files"]);
}

/// SIGKILLs of vroomd inside an export and an import, and with an export
/// and an import under way: after a restart a listed export is served by
/// the one server it names, nothing else of ours runs, and no import is
/// listed or left half made.
#[test]
fn a_daemon_killed_around_exports_leaves_no_orphan() {
    let env = Env::new("volexpkill");
    env.ok(&["volume", "create", "v", "--size", "64M"]);
    let settled = |when: &str| {
        let listed: Vec<u32> = volumes(&env)
            .iter()
            .filter_map(|v| v.export.as_ref().map(|e| e.pid))
            .collect();
        assert_eq!(env.nbd_pids(), listed, "{when}: servers and listed exports");
        let (_, staging) = leftovers(&env);
        assert!(staging.is_empty(), "{when}: {staging:?}");
        assert!(
            volumes(&env).iter().all(|v| v.name.as_str() == "v"),
            "{when}"
        );
        if !listed.is_empty() {
            env.ok(&["volume", "unexport", "v"]);
        }
    };
    for ms in [0u64, 5, 15, 40] {
        kill_during(
            &env,
            "POST",
            "/v1/volumes/v/export",
            "{}".into(),
            Duration::from_millis(ms),
        );
        settled(&format!("export killed at {ms} ms"));
        let body = r#"{"size_mib":64}"#.to_string();
        kill_during(
            &env,
            "POST",
            "/v1/volumes/imp/import",
            body,
            Duration::from_millis(ms),
        );
        settled(&format!("import killed at {ms} ms"));
    }
    // Killed while they serve: the export is kept, the import dropped.
    let e: vroom_types::VolumeExport =
        serde_json::from_str(&env.ok(&["volume", "export", "v", "--json"])).unwrap();
    // An import's first step, as the CLI takes it.
    common::send(
        &env.dir,
        "POST",
        "/v1/volumes/imp/import",
        r#"{"size_mib":64}"#,
    );
    let imp: Vec<u32> = env.nbd_pids().into_iter().filter(|p| *p != e.pid).collect();
    assert_eq!(imp.len(), 1, "the import's server");
    env.kill_daemon();
    env.start_daemon();
    assert_eq!(env.nbd_pids(), vec![e.pid], "import server {imp:?} stopped");
    assert_eq!(volumes(&env)[0].export.as_ref().unwrap().pid, e.pid);
    settled("killed while serving");
}
