//! The CLI as people use it: catalog images built on first use, NIC roles,
//! human and JSON views, console logs kept across boots, and a daemon that
//! stops without taking its VMs along.

mod common;

use std::time::Duration;

use common::{random_subnet, Env};
use vroom_types::InstanceState;

#[test]
fn catalog_roles_views_boot_logs_and_daemon_stop() {
    let env = Env::new("cli");
    let subnet = random_subnet();
    env.ok(&["net", "create", "office", "--subnet", &subnet]);

    // `web` is in the catalog but not built in this data dir: run builds it.
    assert!(!env.ok(&["image", "ls"]).contains("web"));
    env.ok(&["run", "web", "--name", "w", "--net", "lan=office"]);
    let listing = env.ok(&["image", "ls"]);
    assert!(
        listing.contains("web *"),
        "the current build is marked: {listing}"
    );

    // Roles: in the record, in ps and in the human view.
    let w = env.instance("w");
    assert_eq!(w.nics[0].role.as_deref(), Some("lan"));
    let ps = env.ok(&["ps"]);
    assert!(
        ps.contains(&format!("lan:{}", w.nics[0].ip.unwrap())),
        "{ps}"
    );
    let human = env.ok(&["inspect", "w"]);
    assert!(
        human.contains("state:") && human.contains("running"),
        "{human}"
    );
    assert!(
        human.contains(&format!("lan    {}/", w.nics[0].ip.unwrap())),
        "{human}"
    );
    assert!(serde_json::from_str::<serde_json::Value>(&human).is_err());
    let net = env.ok(&["net", "inspect", "office"]);
    assert!(net.contains("w (") && net.contains(&subnet), "{net}");
    // A role the image does not have is refused before anything is made.
    let stderr = env.fail(&["run", "web", "--name", "x", "--net", "wan=office"]);
    assert!(stderr.contains("no NIC role \"wan\""), "{stderr}");

    // Earlier boots' consoles are kept.
    let first_boot = env.ok(&["logs", "w"]);
    assert!(first_boot.contains("vroom-init"), "{first_boot}");
    // Off a terminal, a long command draws no progress: stderr stays for
    // errors, stdout says what was done.
    let restart = env.vroom(&["restart", "w"]);
    assert!(restart.status.success());
    let said = String::from_utf8_lossy(&restart.stderr);
    assert!(said.is_empty(), "{said:?}");
    assert!(!restart.stdout.is_empty(), "restart says what it did");
    let previous = env.ok(&["logs", "w", "--boot", "-1"]);
    assert_eq!(
        previous.lines().next(),
        first_boot.lines().next(),
        "boot -1 is the first boot's console"
    );
    let tail = env.ok(&["logs", "w", "--tail", "3"]);
    assert!(tail.lines().count() <= 3 && !tail.is_empty(), "{tail:?}");
    let all = env.ok(&["logs", "w"]);
    assert!(all.ends_with(&tail), "the tail is the end of the log");
    env.fail(&["logs", "w", "--boot", "-9"]);

    // `daemon stop` stops vroomd, not the VMs; the next daemon re-adopts them.
    let pid = env.instance("w").status.pid.expect("running");
    let stopped = env.ok(&["daemon", "stop"]);
    assert!(stopped.contains("stopped"), "{stopped}");
    assert!(
        !env.dir.join("vroomd.sock").exists(),
        "the daemon removed its socket"
    );
    assert_eq!(env.qemu_pids(), vec![pid], "the VM kept running");
    env.start_daemon();
    let w = env.wait_for("w", "re-adopted", Duration::from_secs(30), |i| {
        i.status.state == InstanceState::Running
    });
    assert_eq!(w.status.pid, Some(pid));

    env.ok(&["rm", "-f", "w"]);
    env.ok(&["net", "rm", "office"]);
    env.assert_nothing_left("after the CLI tour");
}

/// `vroom kernel`: a bad fragment is refused with its line before anything
/// is downloaded, and `kernel ls` lists the Debian kernel images use.
#[test]
fn kernel_fragments_are_checked_and_kernels_listed() {
    let env = Env::new("kernel");
    let bad = env.dir.join("bad.config");
    std::fs::write(&bad, "# fine\nCONFIG_PVH=y\nCONFIG_VIRTIO\n").unwrap();
    let err = env.fail(&["kernel", "build", "--config", bad.to_str().unwrap()]);
    assert!(
        err.contains("line 3") && err.contains("CONFIG_NAME=value"),
        "{err}"
    );
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["--json", "kernel", "ls"])).unwrap();
    let debian = listed
        .iter()
        .find(|k| k["kind"] == "debian")
        .unwrap_or_else(|| panic!("no Debian kernel listed: {listed:?}"));
    assert!(
        debian["release"]
            .as_str()
            .unwrap()
            .ends_with("-cloud-amd64"),
        "{debian}"
    );
    // New builds use exactly one: vroom's own once built (`cargo xtask
    // test` builds it first), Debian's until then.
    let current: Vec<&serde_json::Value> = listed.iter().filter(|k| k["current"] == true).collect();
    assert_eq!(current.len(), 1, "{listed:?}");
    assert!(current[0]["path"].as_str().is_some_and(|p| !p.is_empty()));
}

/// `vroom net inspect office | head -0`: a reader that went away ends the
/// CLI the way it ends other Unix tools, by SIGPIPE, with no panic and
/// nothing on stderr; the daemon serving it is not touched.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new("pipe");
    let subnet = random_subnet();
    env.ok(&["net", "create", "office", "--subnet", &subnet]);
    for args in [
        &["net", "inspect", "office"][..],
        &["net", "ls"],
        &["--json", "net", "inspect", "office"],
        &["kernel", "ls"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = env
            .command()
            .args(args)
            .stdout(writer)
            .output()
            .expect("run vroom");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.is_empty(),
            "vroom {args:?} into a closed pipe: {stderr}"
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "vroom {args:?} into a closed pipe: {:?}",
            out.status
        );
    }
    // vroomd lives on.
    assert!(env.ok(&["net", "ls"]).contains("office"));
    let removed = env.ok(&["net", "rm", "office"]);
    assert_eq!(removed, "network office removed\n");
    env.assert_nothing_left("after the closed pipes");
}

/// `topology --format svg` renders through Graphviz (installed by `cargo
/// xtask test`): each label line is its own text, never a literal `\n`,
/// and a room is one box.
#[test]
fn topology_renders_through_graphviz() {
    use std::io::Write;
    use vroom_types::{Name, Network, Room, RoomState, Topology, TopologyInstance, TopologyNic};
    let network = |name: &str, subnet: &str| Network {
        name: Name::new(name).unwrap(),
        subnet: subnet.parse().unwrap(),
        nat: false,
        isolated: true,
        mirror: false,
        allow_host: vec![],
        bridge: format!("br-{name}"),
        gateway: subnet.replace(".0/24", ".1").parse().unwrap(),
        created_at: 0,
    };
    let topology = Topology {
        rooms: vec![Room {
            name: Name::new("acme").unwrap(),
            wan: Name::new("default").unwrap(),
            lan: Name::new("acme-lan").unwrap(),
            dmz: Name::new("acme-dmz").unwrap(),
            firewall: Name::new("acme-fw").unwrap(),
            domain: "acme.lan".into(),
            exposes: vec![],
            state: RoomState::Ready,
            created_at: 0,
        }],
        networks: vec![
            network("acme-lan", "10.61.1.0/24"),
            network("acme-dmz", "10.61.2.0/24"),
        ],
        instances: vec![TopologyInstance {
            name: "web1".into(),
            image: "web".into(),
            state: vroom_types::InstanceState::Running,
            nics: vec![TopologyNic {
                network: "acme-dmz".into(),
                role: Some("lan".into()),
                ip: Some("10.61.2.5".into()),
            }],
        }],
        splices: vec![],
        mirrors: vec![],
    };
    let mut dot = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("Graphviz's dot is installed (cargo xtask test installs graphviz)");
    dot.stdin
        .take()
        .unwrap()
        .write_all(topology.to_dot().as_bytes())
        .unwrap();
    let out = dot.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = String::from_utf8(out.stdout).unwrap().replace("&#45;", "-");
    assert!(!svg.contains("\\n"), "a literal \\n in {svg}");
    for line in [
        "acme-dmz",
        "10.61.2.0/24 isolated",
        "web1",
        "web [running]",
        "dmz 10.61.2.5",
    ] {
        assert!(
            svg.contains(&format!(">{line}</text>")),
            "no text {line:?} in {svg}"
        );
    }
    assert_eq!(svg.matches("class=\"cluster\"").count(), 1, "{svg}");
}
