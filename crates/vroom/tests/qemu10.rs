//! The QEMU 10 path (Debian 13's QEMU; on Debian 12 from
//! bookworm-backports): `vroom setup --qemu 10` unpacks it into the cache
//! dir beside the machine's QEMU 7.2 (and checks it has every QMP command
//! and device property vroom uses), and vroomd runs it when `VROOM_QEMU`
//! names it. On it, in as few boots as cover it: the catalog's web
//! appliance boots to ready, takes a config change, is snapshotted and
//! restored; a server room serves its lan and exposes one port, and a
//! firewall is spliced in front of a running VM under traffic with vroomd
//! SIGKILLed inside the splice; and on two cluster nodes a guest with a
//! replicated volume migrates live, resumes its replication incrementally
//! after a partition and fails over with every acknowledged write. The
//! rest of the suite runs on 7.2, which stays the machine's QEMU
//! (`VROOM_TEST_QEMU` runs it on 10 by hand: docs/install.md).
mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::lab::{
    assert_acknowledged_writes, failed_over, last_sync, replication_of, up_to_date,
    write_until_power_loss, Lab, DATA,
};
use common::loop_client::{longest_outage, LoopClient};
use common::{
    assert_consistent, dhcp_lease, fetch, init_binary, kill_during, master_of, poll, random_subnet,
    recipe, settled_splice, vroom_bin, Env,
};
use vroom_types::{Splice, SpliceState};

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

/// A server room and a splice on QEMU 10, on one daemon: room ra's
/// firewall (QEMU 10) serves its lan a lease and routes it to web1 in the
/// dmz, and exposes only the port it was told to the wan; a transparent
/// firewall is spliced in front of web1 while a lan client loops
/// requests through both firewalls, vroomd SIGKILLed inside the splice
/// (whole or nothing afterwards), its rules in force, and unspliced; web1
/// never restarts and nothing is left.
#[test]
fn a_room_and_a_splice_under_traffic_survive_a_crash_on_qemu_10() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::with_env("q10r", vec![("VROOM_QEMU", qemu10())]);
    for image in ["firewall", "web", "l2-firewall"] {
        env.ok(&["image", "build", &recipe(image)]);
    }
    let wan = random_subnet();
    env.ok(&["net", "create", "wan", "--subnet", &wan, "--nat"]);
    env.ok(&["room", "create", "ra", "--wan", "wan"]);
    env.ok(&[
        "run",
        "web",
        "--name",
        "web1",
        "--room",
        "ra",
        "--segment",
        "dmz",
    ]);
    let web = env.instance("web1");
    let (web_ip, web_pid, web_tap) = (
        web.nics[0].ip.unwrap(),
        web.status.pid,
        web.nics[0].tap.clone(),
    );
    let fw = env.instance("ra-fw");
    for pid in [fw.status.pid, web_pid] {
        assert!(is_private_qemu(pid.unwrap()), "not QEMU 10");
    }
    let fw_wan = fw.nics[0].ip.unwrap();
    env.ok(&["room", "expose", "ra", "--port", "8080", "--to", "web1:80"]);
    let outside = env.client_on("out", "wan", &wan);
    let page = poll(Duration::from_secs(20), || {
        let (rc, body) = fetch(&env, &outside, &format!("http://{fw_wan}:8080/"));
        (rc == 0).then_some(body)
    })
    .expect("the exposed port reaches web1");
    assert!(page.contains("It works"), "{page}");
    for url in [
        format!("http://{fw_wan}:8081/"),
        format!("http://{web_ip}/"),
    ] {
        let (rc, body) = fetch(&env, &outside, &url);
        assert_ne!(rc, 0, "{url} is reachable from outside: {body}");
    }
    let lan = env.namespace_on("alan", "ra-lan", None);
    let lease = dhcp_lease(&env, &lan);
    assert_eq!(
        lease["router"],
        fw.nics[1].ip.unwrap().to_string(),
        "the room's firewall routes its lan"
    );

    // A splice under traffic from the lan, with vroomd killed inside it.
    let bridge = env.network("ra-dmz").bridge;
    let flow = LoopClient::start(&env, &lan, web_ip);
    assert!(flow.wait_ok(Duration::from_secs(30)), "web1 serves the lan");
    let body = r#"{"appliance":"l2-firewall","vm":"web1","name":"lf"}"#;
    let splice_from = flow.now_ms();
    // Whole or nothing, never between; QEMUs and records one to one.
    let settled = |context: &str| -> Option<Splice> {
        let splice = settled_splice(&env, "lf", &web_tap, &bridge, context);
        assert_consistent(&env, context);
        splice
    };
    // Kills at moments that fall inside the appliance's boot or the
    // rewiring after it (when one leaves nothing, the next comes later).
    let mut whole = None;
    for delay_ms in [1500, 4000, 8000] {
        kill_during(
            &env,
            "POST",
            "/v1/splices",
            body.to_string(),
            Duration::from_millis(delay_ms),
        );
        let context = format!("killed {delay_ms} ms into a splice");
        whole = settled(&context);
        eprintln!(
            "{context}: {}",
            if whole.is_some() { "whole" } else { "nothing" }
        );
        if whole.is_some() {
            break;
        }
    }
    let splice = whole.unwrap_or_else(|| {
        env.ok(&[
            "splice",
            "l2-firewall",
            "--in-front-of",
            "web1",
            "--name",
            "lf",
        ]);
        settled("spliced after the kills").expect("a splice")
    });
    assert_eq!(splice.state, SpliceState::Active);
    assert_eq!(master_of(&web_tap), Some(splice.segment.clone()));
    assert!(
        is_private_qemu(env.instance("lf").status.pid.unwrap()),
        "not QEMU 10"
    );
    assert!(
        flow.wait_ok(Duration::from_secs(15)),
        "traffic flows through lf"
    );
    let splice_to = flow.now_ms();

    // Its rules are in force for new connections, then lifted.
    let block_from = flow.now_ms();
    env.ok(&["config", "lf", "set", "block_tcp=80"]);
    assert!(
        flow.wait_new_blocked(block_from, Duration::from_secs(15)),
        "lf blocks new connections"
    );
    env.ok(&["config", "lf", "set", "block_tcp="]);
    assert!(flow.wait_ok(Duration::from_secs(15)), "unblocked again");
    let block_to = flow.now_ms();

    env.ok(&["unsplice", "lf"]);
    assert_eq!(master_of(&web_tap), Some(bridge));
    assert!(
        flow.wait_ok(Duration::from_secs(10)),
        "the direct path is back"
    );
    let results = flow.stop();
    let windows = [(splice_from, splice_to), (block_from, block_to)];
    let resets: Vec<_> = results
        .iter()
        .filter(|r| r.2 == "reset" && !windows.iter().any(|(a, b)| r.0 >= *a && r.0 <= *b))
        .collect();
    assert!(
        resets.is_empty(),
        "a TCP reset outside the kill and the block: {resets:?}"
    );
    let outage = longest_outage(&results, &windows);
    assert!(outage < 3000, "longest outage {outage} ms");
    assert_eq!(env.instance("web1").status.pid, web_pid, "web1 restarted");

    env.ok(&["room", "rm", "--force", "ra"]);
    env.ok(&["net", "rm", "wan"]);
    env.remove_namespaces(&["out", "alan"]);
    env.assert_nothing_left("after the room and the splice on QEMU 10");
}

/// Two cluster nodes on QEMU 10 and one guest with a replicated data
/// volume: it migrates live (memory, address and volume move; the roles
/// swap), its replication survives a silent partition by resending only
/// what the replica missed (the resume swaps the NBD connection under the
/// paused mirror job with `x-blockdev-change`, which QEMU marks unstable),
/// and when its node loses power it fails over with every write the guest
/// saw complete.
#[test]
fn a_guest_with_a_replicated_volume_migrates_resumes_and_fails_over_on_qemu_10() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Arc::new(Lab::new('q', 2, vec![("VROOM_QEMU".to_string(), qemu10())]));
    for i in 0..2 {
        lab.ok(i, &["image", "build", &recipe("hello")]);
    }
    lab.ok(
        0,
        &[
            "volume",
            "create",
            "data",
            "--size",
            "64M",
            "--replicas",
            "2",
        ],
    );
    let volume = format!("data:{DATA}");
    lab.ok(
        0,
        &[
            "run", "hello", "--name", "m", "--ha", "restart", "--volume", &volume,
        ],
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.ok(0, &["--json", "inspect", "m"])).unwrap();
    let ip = inspect["nics"][0]["ip"].as_str().unwrap().to_string();
    let on_n1 = poll(Duration::from_secs(30), || lab.runs(0, "m")).expect("m runs on n1");
    assert!(is_private_qemu(on_n1), "not QEMU 10 on n1");
    up_to_date(&lab, 0, "data", "n1");
    let sh = |i: usize, script: &str| lab.ok(i, &["exec", "m", "--", "sh", "-c", script]);
    sh(0, "echo only-in-memory > /run/marker");
    // 16 MiB on the volume: what a full copy would send again.
    sh(
        0,
        &format!("dd if=/dev/urandom of={DATA}/big bs=1M count=16 2>/dev/null && echo moved > {DATA}/moved && sync"),
    );
    let memory = "cat /proc/sys/kernel/random/boot_id /run/marker";
    let before = sh(0, memory);

    // A live migration to the replica's node: memory, address and volume.
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
    assert_eq!(sh(1, &format!("cat {DATA}/moved")), "moved\n");
    up_to_date(&lab, 1, "data", "n2");
    let (primary, replica, _, epoch) = replication_of(&lab, 1, "data").unwrap();
    assert_eq!((primary.as_str(), replica.as_str(), epoch), ("n2", "n1", 2));

    // A silent partition of the replication link (n1's peer port dropped):
    // the replica is recorded outdated and the guest goes on; once the
    // link is back only what it missed is sent.
    let nft = |rule: &str| {
        let ns = &lab.nodes[0].ns;
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns exec {ns} nft {rule}"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "nft {rule}");
    };
    nft("add table inet repl");
    nft("add chain inet repl in '{ type filter hook input priority 0; }'");
    nft(&format!(
        "add rule inet repl in tcp dport {} drop",
        vroom_cluster::node::PEER_PORT
    ));
    sh(1, &format!("echo partitioned > {DATA}/partitioned && sync"));
    let (_, _, state, _) = replication_of(&lab, 1, "data").unwrap();
    assert_eq!(state, "outdated", "a replica that missed a write");
    nft("delete table inet repl");
    up_to_date(&lab, 1, "data", "n2");
    let (incremental, bytes) = last_sync(&lab, 1, "data");
    eprintln!("on QEMU 10 the replica caught up with {bytes} bytes (it holds 16 MiB)");
    assert!(
        incremental && bytes < 4 << 20,
        "not resumed incrementally: incremental {incremental}, {bytes} bytes\n{}",
        lab.log(1)
    );

    // n2 loses power under writes: n1 takes over with every one of them.
    let acked = write_until_power_loss(&lab, 1, "m", 0, || {});
    let took = failed_over(&lab, 0, "m", &ip, Duration::from_secs(60));
    eprintln!(
        "m answered from n1 {took:?} after n2's power loss, {} writes acknowledged",
        acked.len()
    );
    assert_acknowledged_writes(&lab, 0, "m", &acked, "after n2's power loss");
    assert_eq!(sh(0, &format!("cat {DATA}/partitioned")), "partitioned\n");
    let on_n1 = lab.runs(0, "m").expect("m runs on n1");
    assert!(is_private_qemu(on_n1), "not QEMU 10 after the failover");
    lab.ok(0, &["rm", "-f", "m"]);
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
