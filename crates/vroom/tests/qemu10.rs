//! The QEMU 10 path (Debian 13's QEMU; on Debian 12 from
//! bookworm-backports): `vroom setup --qemu 10` unpacks it into the cache
//! dir beside the machine's QEMU 7.2 (and checks it has every QMP command
//! and device property vroom uses), and vroomd runs it when `VROOM_QEMU`
//! names it. On it, the catalog's web appliance boots to ready, takes a
//! config change, is snapshotted and restored; and hello migrates live
//! between two cluster nodes. The rest of the suite runs on 7.2, which
//! stays the machine's QEMU.

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use common::{init_binary, poll, random_subnet, recipe, vroom_bin, Env};

/// One scenario at a time: the cluster's leases must not starve beside a
/// booting guest on our 2 cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `vroom setup --qemu 10` (fast once installed: `cargo xtask test` runs
/// it first), then the binary it names.
fn qemu10() -> String {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let out = std::process::Command::new(vroom_bin())
            .args(["setup", "--qemu", "10"])
            .env("VROOM_INIT", init_binary())
            .env_remove("VROOM_QEMU")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "vroom setup --qemu 10: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("qemu 10: QEMU 10."))
            .unwrap_or_else(|| panic!("setup names no QEMU 10: {stdout}"));
        assert!(
            line.contains("with microvm and every QMP command and device property vroom uses"),
            "{line}"
        );
        // The machine's own QEMU stays 7.2.
        assert!(
            stdout.contains("qemu: QEMU 7.2."),
            "the system QEMU changed: {stdout}"
        );
        let path = line
            .rsplit_once("VROOM_QEMU=")
            .map(|(_, p)| p.trim().to_string())
            .unwrap();
        assert!(Path::new(&path).is_file(), "{path}");
        path
    })
    .clone()
}

/// Whether the VMM `pid` is a QEMU from the private prefix: the jail shows
/// it the prefix at /vm/qemu and names its module dir.
fn is_private_qemu(pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    exe == Path::new("/vm/qemu/bin/qemu-system-x86_64")
        && String::from_utf8_lossy(&environ).contains("QEMU_MODULE_DIR=/vm/qemu/")
}

fn counter(ip: std::net::Ipv4Addr) -> u64 {
    let out = std::process::Command::new("busybox")
        .args(["wget", "-qO-", &format!("http://{ip}/cgi-bin/counter")])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
    body.parse()
        .unwrap_or_else(|_| panic!("counter answered {body:?}"))
}

/// The catalog's web appliance on QEMU 10: boot to ready, a config
/// change, snapshot and restore (memory state back), and `vroom info`
/// names the QEMU.
#[test]
fn web_boots_takes_config_and_restores_a_snapshot_on_qemu_10() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let qemu = qemu10();
    let env = Env::with_env("q10", vec![("VROOM_QEMU", qemu.clone())]);
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "info"])).unwrap();
    let vmm = &info["vroomd"]["daemon"]["vmm"];
    assert!(
        vmm["version"]
            .as_str()
            .unwrap_or_default()
            .starts_with("10."),
        "{info}"
    );
    assert!(vmm["problem"].is_null(), "{info}");
    assert!(env.ok(&["info"]).contains("qemu:       QEMU 10."));

    env.ok(&["image", "build", &recipe("web"), "--kernel", "vroom"]);
    let lan = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &lan]);
    env.ok(&["run", "web", "--name", "site", "--net", "lan"]);
    let site = env.instance("site");
    assert!(is_private_qemu(site.status.pid.unwrap()), "not QEMU 10");
    let ip = site.nics[0].ip.unwrap();
    assert!(common::page_shows(ip, "<h1>It works</h1>"));

    env.ok(&["config", "site", "set", "title=Ten"]);
    assert!(common::page_shows(ip, "<h1>Ten</h1>"), "the config applied");

    for want in 1..=2 {
        assert_eq!(counter(ip), want);
    }
    env.ok(&["snapshot", "site", "--name", "s1"]);
    let snapshots: Vec<vroom_types::Snapshot> =
        serde_json::from_str(&env.ok(&["snapshot", "ls", "--json"])).unwrap();
    assert!(
        snapshots[0].machine.starts_with("qemu-10."),
        "the state is QEMU 10's: {}",
        snapshots[0].machine
    );
    assert_eq!(counter(ip), 3);
    env.ok(&["restore", "site", "s1"]);
    let restored = env.instance("site");
    assert!(is_private_qemu(restored.status.pid.unwrap()));
    assert_eq!(counter(ip), 3, "back to the snapshot's memory");
    assert!(common::page_shows(ip, "<h1>Ten</h1>"));

    env.ok(&["rm", "-f", "site"]);
    env.ok(&["snapshot", "rm", "s1"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after the QEMU 10 scenario");
}

/// Live migration between two cluster nodes, both on QEMU 10: the
/// guest's memory and address move with it.
#[test]
fn hello_migrates_between_nodes_on_qemu_10() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = common::lab::Lab::new('q', 2, vec![("VROOM_QEMU".to_string(), qemu10())]);
    for i in 0..2 {
        lab.ok(i, &["image", "build", &recipe("hello")]);
    }
    lab.ok(0, &["run", "hello", "--name", "m", "--node", "n1"]);
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.ok(0, &["--json", "inspect", "m"])).unwrap();
    let ip = inspect["nics"][0]["ip"].as_str().unwrap().to_string();
    let on_n1 = poll(Duration::from_secs(30), || lab.runs(0, "m")).expect("m runs on n1");
    assert!(is_private_qemu(on_n1), "not QEMU 10 on n1");
    let sh = |i: usize, script: &str| lab.ok(i, &["exec", "m", "--", "sh", "-c", script]);
    sh(0, "echo only-in-memory > /run/marker");
    let memory = "cat /proc/sys/kernel/random/boot_id /run/marker";
    let before = sh(0, memory);

    let said = lab.ok(0, &["migrate", "m", "--to", "n2"]);
    assert!(said.contains("from n1 to n2"), "{said}");
    let moved = poll(Duration::from_secs(30), || {
        (lab.runs(0, "m").is_none() && lab.page_from(1, &ip).is_some())
            .then(|| lab.runs(1, "m"))
            .flatten()
    })
    .unwrap_or_else(|| panic!("m does not run on n2 alone\n{}", lab.log(1)));
    assert!(is_private_qemu(moved), "not QEMU 10 on n2");
    assert_eq!(sh(1, memory), before, "the guest's memory moved");
    lab.ok(1, &["rm", "-f", "m"]);
}

/// A QEMU older than 7.2, or one without the microvm machine, is refused
/// by `vroom setup` and by `run`, in one line naming the binary and its
/// version; the failed run leaves nothing behind.
#[test]
fn old_or_microvm_less_qemus_are_refused_by_name_and_version() {
    let dir = tempfile::Builder::new()
        .prefix("vroom-q10-fake")
        .tempdir()
        .unwrap();
    let fake = |name: &str, version: &str, machines: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\ncase \"$1\" in\n-version) echo 'QEMU emulator version {version}';;\n-machine) printf 'Supported machines are:\\n{machines}\\n';;\n*) exit 1;;\nesac\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path.display().to_string()
    };
    let old = fake("qemu-old", "7.1.0", "microvm   microvm (i386)");
    let plain = fake("qemu-plain", "9.2.0", "pc   Standard PC");
    for (binary, said) in [
        (
            &old,
            format!("{old} is QEMU 7.1.0; vroom needs QEMU 7.2 or newer"),
        ),
        (
            &plain,
            format!("{plain} (QEMU 9.2.0) has no microvm machine"),
        ),
    ] {
        let out = std::process::Command::new(vroom_bin())
            .arg("setup")
            .env("VROOM_QEMU", binary)
            .env("VROOM_INIT", init_binary())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!out.status.success());
        assert!(err.contains(&said), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");

        let env = Env::with_env("q10old", vec![("VROOM_QEMU", binary.clone())]);
        env.ok(&["net", "create", "lan", "--subnet", &random_subnet()]);
        let err = env.fail(&["run", "hello", "--name", "h", "--net", "lan"]);
        assert!(err.contains(&said), "{err}");
        assert!(env.ok(&["info"]).contains(&format!("unusable: {said}")));
        env.ok(&["net", "rm", "lan"]);
        env.assert_nothing_left("after a refused QEMU");
    }
}
