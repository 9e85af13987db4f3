//! vroom as the Debian package installs it, tested without systemd as PID 1
//! (neither our machines nor CI have it): vroomd's readiness notification
//! and socket activation as systemd would drive them, the sysusers file,
//! and the package itself (`cargo xtask deb --debug`) through lintian,
//! `dpkg -i`, a hand-over from a daemon the CLI started, `vroom run hello`
//! with the installed binary and `dpkg --purge`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{init_binary, poll, vroom_bin, Env};

/// A notification socket of the test's own, as systemd's NOTIFY_SOCKET.
fn notify_socket(dir: &Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    (socket, path)
}

/// Waits for the datagram `want`; returns it, or panics with what came.
fn wait_for_notification(socket: &UnixDatagram, want: &str, timeout: Duration, daemon: &mut Child) {
    let deadline = Instant::now() + timeout;
    let mut seen = vec![];
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.lines().any(|l| l == want) {
                return;
            }
            seen.push(text);
        }
        if let Ok(Some(status)) = daemon.try_wait() {
            panic!("vroomd exited ({status}) before {want}; it sent {seen:?}");
        }
        assert!(
            Instant::now() < deadline,
            "no {want} within {timeout:?}; got {seen:?}"
        );
    }
}

/// `vroom info --json` of a data dir, through `vroom` (which starts no daemon).
fn info(vroom: &str, env: &Env) -> serde_json::Value {
    let out = Command::new(vroom)
        .args(["info", "--json"])
        .env("VROOM_DATA_DIR", &env.dir)
        .env_remove("VROOM_INIT")
        .output()
        .unwrap();
    assert!(out.status.success(), "vroom info: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// SIGTERM at once (as systemd may send it right after READY=1), then the
/// exit status.
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "vroomd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_file(env: &Env) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.dir.join("vroomd.log"))
        .unwrap()
}

/// The unit's ExecStart as a `Type=notify` service runs it: READY=1 only
/// once the API answers (and vroomd says systemd started it), STOPPING=1
/// on SIGTERM, then a clean exit.
#[test]
fn vroomd_notifies_ready_once_it_answers_and_stopping_when_it_stops() {
    let env = Env::bare("notify");
    let (notify, path) = notify_socket(&env.dir);
    let log = log_file(&env);
    let mut daemon = env
        .command()
        .arg("daemon")
        .env("NOTIFY_SOCKET", &path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for_notification(&notify, "READY=1", Duration::from_secs(30), &mut daemon);
    // At once: no retry, the API must answer when READY=1 is out.
    let info = info(vroom_bin(), &env);
    let daemon_info = &info["vroomd"]["daemon"];
    assert_eq!(daemon_info["pid"], daemon.id(), "{info}");
    assert_eq!(daemon_info["started_by"], "systemd", "{info}");
    assert_eq!(daemon_info["socket_activated"], false, "{info}");
    // `-v` says which daemon answers, on stderr; the output stays clean.
    let out = env.vroom(&["-v", "ps", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "vroom: talking to vroomd {} (pid {}, started by systemd), data dir {}",
            env!("CARGO_PKG_VERSION"),
            daemon.id(),
            env.dir.display()
        )
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
    // A daemon of a unit is systemctl's to stop, and no takeover's.
    let refused = env.fail(&["daemon", "stop"]);
    assert!(
        refused.contains(&format!(
            "error: vroomd (pid {}) runs under systemd (vroomd.service): stop it with `systemctl stop vroomd.socket vroomd.service`",
            daemon.id()
        )),
        "{refused}"
    );
    assert!(env
        .ok(&["daemon", "stop", "--self-started"])
        .contains("runs under systemd; left alone"));
    assert!(daemon.try_wait().unwrap().is_none(), "vroomd stopped");
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    wait_for_notification(&notify, "STOPPING=1", Duration::from_secs(30), &mut daemon);
    let status = terminate(&mut daemon);
    assert!(status.success(), "{status}: {}", env.daemon_log());

    // Stopped the moment it is ready (systemd stopping a unit it just
    // started): still the graceful way.
    let log = log_file(&env);
    let mut daemon = env
        .command()
        .arg("daemon")
        .env("NOTIFY_SOCKET", &path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for_notification(&notify, "READY=1", Duration::from_secs(30), &mut daemon);
    let status = terminate(&mut daemon);
    assert!(status.success(), "{status}: {}", env.daemon_log());
    wait_for_notification(&notify, "STOPPING=1", Duration::from_secs(1), &mut daemon);
}

/// `vroomd.socket` as `systemd-socket-activate` plays it: vroomd serves the
/// socket it is passed (and says so), and refuses one that is not where
/// the clients of its data dir look.
#[test]
fn vroomd_serves_a_socket_systemd_passes() {
    let env = Env::bare("activate");
    let activate = |socket: &Path, data_dir: &Path| {
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.arg("-l")
            .arg(socket)
            .arg("-E")
            .arg(format!("VROOM_IFACE_PREFIX={}", env.prefix))
            .arg("-E")
            .arg(format!("VROOM_INIT={}", init_binary().display()))
            .arg(vroom_bin())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("daemon")
            .stdin(Stdio::null());
        cmd
    };
    let socket = env.dir.join("vroomd.sock");
    let log = log_file(&env);
    let mut daemon = activate(&socket, &env.dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    poll(Duration::from_secs(10), || socket.exists().then_some(()))
        .expect("systemd-socket-activate listens");
    // The first connection starts vroomd, which answers it.
    let info = info(vroom_bin(), &env);
    let daemon_info = &info["vroomd"]["daemon"];
    assert_eq!(daemon_info["socket_activated"], true, "{info}");
    assert_eq!(daemon_info["started_by"], "systemd", "{info}");
    assert_eq!(daemon_info["pid"], daemon.id(), "{info}");
    let text = env.ok(&["info"]);
    assert!(
        text.contains(&format!(
            "vroomd:     vroomd {} (pid {}, started by systemd, socket-activated), data dir {}",
            env!("CARGO_PKG_VERSION"),
            daemon.id(),
            env.dir.display()
        )),
        "{text}"
    );
    let status = terminate(&mut daemon);
    assert!(status.success(), "{status}: {}", env.daemon_log());
    // With none answering, `info` says so and starts none.
    let text = env.ok(&["info"]);
    assert!(
        text.contains("vroomd:     none answers; the next command starts one"),
        "{text}"
    );
    assert!(env.daemon_pids().is_empty(), "vroom info started a daemon");

    // A socket elsewhere: refused, named, nothing served.
    let other_dir = env.dir.join("other");
    let elsewhere = env.dir.join("elsewhere.sock");
    let misplaced = activate(&elsewhere, &other_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    poll(Duration::from_secs(10), || elsewhere.exists().then_some(()))
        .expect("systemd-socket-activate listens");
    let _ = std::os::unix::net::UnixStream::connect(&elsewhere);
    let mut misplaced = misplaced;
    if poll(Duration::from_secs(30), || misplaced.try_wait().unwrap()).is_none() {
        let _ = misplaced.kill();
        panic!("vroomd served a socket that is not its data dir's");
    }
    let out = misplaced.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: the socket systemd passed is {}, not {}",
            elsewhere.display(),
            other_dir.join("vroomd.sock").display()
        )),
        "{stderr}"
    );
}

/// The package's sysusers file makes the API group.
#[test]
fn the_sysusers_file_creates_the_vroom_group() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/sysusers.d/vroom.conf");
    let out = Command::new("systemd-sysusers")
        .arg("--root")
        .arg(root.path())
        .arg(&conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("vroom:x:")), "{group}");
}

const UNIT_DATA_DIR: &str = "/var/lib/vroom";

/// What the package puts on the host, every one gone after a purge.
const PACKAGE_PATHS: &[&str] = &[
    "/usr/bin/vroom",
    "/usr/lib/vroom",
    "/usr/share/vroom",
    "/usr/lib/systemd/system/vroomd.service",
    "/usr/lib/systemd/system/vroomd.socket",
    "/usr/lib/sysusers.d/vroom.conf",
    "/usr/share/bash-completion/completions/vroom",
    "/usr/share/zsh/vendor-completions/_vroom",
    "/usr/share/fish/vendor_completions.d/vroom.fish",
    "/usr/share/man/man1/vroom.1.gz",
    "/usr/share/man/man1/vroom-run.1.gz",
    "/usr/share/doc/vroom",
];

/// The package is installed for as long as this lives: purged on drop,
/// even when the test fails, and the unit's data dir of a vroom used on
/// this host before is put back.
struct Installed {
    aside: Option<PathBuf>,
}

impl Installed {
    fn install(deb: &Path, env: &Env) -> Installed {
        // A purge removes the unit's data dir: keep one that was here.
        let answered =
            std::os::unix::net::UnixStream::connect(Path::new(UNIT_DATA_DIR).join("vroomd.sock"))
                .is_ok();
        assert!(
            !answered,
            "a vroomd serves {UNIT_DATA_DIR} on this host: the package test would take it over"
        );
        let aside = Path::new(UNIT_DATA_DIR).exists().then(|| {
            let aside = PathBuf::from(format!("{UNIT_DATA_DIR}.before-package-test"));
            std::fs::rename(UNIT_DATA_DIR, &aside).unwrap();
            aside
        });
        let installed = Installed { aside };
        // VROOM_DATA_DIR reaches the postinst: it hands this test's data
        // dir over as it would the unit's.
        let out = Command::new("dpkg")
            .arg("-i")
            .arg(deb)
            .env("VROOM_DATA_DIR", &env.dir)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dpkg -i: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        installed
    }

    fn purge(&mut self) -> std::process::Output {
        let out = Command::new("dpkg")
            .args(["--purge", "vroom"])
            .output()
            .unwrap();
        if let Some(aside) = self.aside.take() {
            let _ = std::fs::remove_dir_all(UNIT_DATA_DIR);
            std::fs::rename(aside, UNIT_DATA_DIR).unwrap();
        }
        out
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.purge();
        }
    }
}

/// lintian's warnings that docs/install.md explains; any other warning,
/// and any error, fails.
fn lintian(deb: &Path) {
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--no-tag-display-limit"])
        .arg(deb)
        .output()
        .expect("lintian runs (cargo xtask test installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lintian found errors:\n{text}");
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/install.md"),
    )
    .unwrap();
    for line in text.lines().filter(|l| l.starts_with("W: ")) {
        let tag = line.split_whitespace().nth(2).unwrap_or_default();
        assert!(
            docs.contains(&format!("`{tag}`")),
            "lintian warns {tag}, which docs/install.md does not explain: {line}"
        );
    }
}

/// Debian 13 finished the /usr merge (DEP17): a package ships nothing
/// under the aliased directories (/bin, /sbin, /lib*), where dpkg loses
/// track of files that move between packages, and its units are in
/// /usr/lib/systemd/system (where Debian 12's systemd looks too).
fn assert_usr_merged(deb: &Path) {
    let out = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(deb)
        .output()
        .unwrap();
    assert!(out.status.success(), "dpkg-deb --contents: {out:?}");
    let listing = String::from_utf8_lossy(&out.stdout);
    let paths: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    let aliased: Vec<&&str> = paths
        .iter()
        .filter(|p| {
            [
                "./bin/",
                "./sbin/",
                "./lib/",
                "./lib32/",
                "./lib64/",
                "./libx32/",
            ]
            .iter()
            .any(|dir| p.starts_with(dir))
        })
        .collect();
    assert!(
        aliased.is_empty(),
        "files in aliased directories: {aliased:?}"
    );
    for unit in ["vroomd.service", "vroomd.socket"] {
        let want = format!("./usr/lib/systemd/system/{unit}");
        assert!(paths.contains(&want.as_str()), "no {want}:\n{listing}");
    }
}

/// The package, end to end: built by `cargo xtask deb --debug`, lintian
/// clean, installed with `dpkg -i` over a vroomd the CLI started with a VM
/// running (the postinst stops it; the VM goes on), the units verified,
/// vroomd started as the units start it (socket activation, READY=1) and
/// re-adopting that VM, a second daemon on the data dir refused with the
/// holder named, `vroom run hello` with the installed binary and its
/// guest init from /usr/lib/vroom, then `dpkg --purge` leaving nothing.
#[test]
fn the_package_installs_hands_over_runs_hello_and_purges() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["xtask", "deb", "--debug"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo xtask deb --debug failed");
    let deb = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap(),
    );
    lintian(&deb);
    assert_usr_merged(&deb);

    // A developer's daemon, started by the CLI, with a VM.
    let env = Env::bare("deb");
    env.ok(&["run", "hello", "--name", "kept"]);
    let self_started = info(vroom_bin(), &env);
    assert_eq!(
        self_started["vroomd"]["daemon"]["started_by"], "cli",
        "{self_started}"
    );
    let cli_daemon = self_started["vroomd"]["daemon"]["pid"].as_u64().unwrap() as u32;
    let qemu = env.qemu_pids();
    assert_eq!(qemu.len(), 1, "{qemu:?}");

    let mut installed = Installed::install(&deb, &env);
    // The postinst stopped the CLI's daemon; the VM runs on.
    assert!(
        poll(Duration::from_secs(10), || (!Path::new(&format!(
            "/proc/{cli_daemon}"
        ))
        .exists())
        .then_some(()))
        .is_some(),
        "the postinst left the CLI's vroomd running"
    );
    assert_eq!(env.qemu_pids(), qemu, "the hand-over lost the VM");

    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "/usr/lib/systemd/system/vroomd.socket",
            "/usr/lib/systemd/system/vroomd.service",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // vroomd as the units start it: vroomd.socket's ListenStream and
    // vroomd.service's ExecStart, with this test's data dir for the unit's.
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/vroomd.service").unwrap();
    let exec_start: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .split_whitespace()
        .map(|w| w.replace(UNIT_DATA_DIR, &env.dir.display().to_string()))
        .collect();
    let socket_unit = std::fs::read_to_string("/usr/lib/systemd/system/vroomd.socket").unwrap();
    assert!(socket_unit.contains(&format!("ListenStream={UNIT_DATA_DIR}/vroomd.sock")));
    assert!(exec_start[0] == "/usr/bin/vroom", "{exec_start:?}");
    let (notify, notify_path) = notify_socket(&env.dir);
    let log = log_file(&env);
    let mut unit_daemon = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(env.dir.join("vroomd.sock"))
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
        .arg("-E")
        .arg(format!("VROOM_IFACE_PREFIX={}", env.prefix))
        .args(&exec_start)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    poll(Duration::from_secs(10), || {
        env.dir.join("vroomd.sock").exists().then_some(())
    })
    .expect("systemd-socket-activate listens");
    let installed_info = info("/usr/bin/vroom", &env);
    wait_for_notification(
        &notify,
        "READY=1",
        Duration::from_secs(30),
        &mut unit_daemon,
    );
    let daemon = &installed_info["vroomd"]["daemon"];
    assert_eq!(daemon["started_by"], "systemd", "{installed_info}");
    assert_eq!(daemon["socket_activated"], true, "{installed_info}");
    assert_eq!(daemon["pid"], unit_daemon.id(), "{installed_info}");
    assert_eq!(
        installed_info["guest_init"],
        "/usr/lib/vroom/vroom-guest-init"
    );
    let kept = env.instance("kept");
    assert_eq!(
        kept.status.state,
        vroom_types::InstanceState::Running,
        "{:?}",
        kept.status
    );
    assert_eq!(
        env.qemu_pids(),
        qemu,
        "the unit's vroomd did not re-adopt the VM"
    );

    // A second daemon on the data dir: refused, the holder named.
    let second = Command::new(&exec_start[0])
        .args(&exec_start[1..])
        .env("VROOM_IFACE_PREFIX", &env.prefix)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: another vroomd (pid {}, started by systemd) already serves {}",
            unit_daemon.id(),
            env.dir.display()
        )),
        "{stderr}"
    );

    // The installed binary boots hello with the installed guest init.
    let installed_vroom = |args: &[&str]| {
        let out = Command::new("/usr/bin/vroom")
            .args(args)
            .env("VROOM_DATA_DIR", &env.dir)
            .env("VROOM_IFACE_PREFIX", &env.prefix)
            .env_remove("VROOM_INIT")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "/usr/bin/vroom {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    installed_vroom(&["run", "hello", "--name", "fresh"]);
    let said = installed_vroom(&[
        "exec",
        "fresh",
        "--",
        "/bin/busybox",
        "echo",
        "hello from fresh",
    ]);
    assert_eq!(said.trim(), "hello from fresh");
    installed_vroom(&["rm", "-f", "kept"]);
    installed_vroom(&["rm", "-f", "fresh"]);
    installed_vroom(&["net", "rm", "default"]);
    env.assert_nothing_left("after the package's vroomd removed its VMs");
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(unit_daemon.id() as i32, libc::SIGTERM) };
    wait_for_notification(
        &notify,
        "STOPPING=1",
        Duration::from_secs(30),
        &mut unit_daemon,
    );
    assert!(
        terminate(&mut unit_daemon).success(),
        "{}",
        env.daemon_log()
    );

    let out = installed.purge();
    assert!(out.status.success(), "dpkg --purge: {out:?}");
    let status = Command::new("dpkg").args(["-s", "vroom"]).output().unwrap();
    assert!(
        !status.status.success(),
        "dpkg still knows vroom after the purge"
    );
    let left: Vec<&&str> = PACKAGE_PATHS
        .iter()
        .filter(|p| Path::new(p).exists())
        .collect();
    assert!(left.is_empty(), "left after the purge: {left:?}");
}
