//! Config changes as transactions, with history: the firewall appliance
//! (recipes/firewall) refuses values that would break it, keeps serving
//! while it does, records every accepted change as a version, fails a boot
//! with a config it cannot put in force at once, and keeps a change the
//! guest acknowledged even when the daemon dies before recording it.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{host, poll, random_subnet, recipe, resolve, Env};
use vroom_types::{ConfigDocument, ConfigHistory, ConfigOrigin};

fn build_firewall(env: &Env) {
    env.ok(&["--json", "image", "build", &recipe("firewall")]);
}

/// A firewall `fw` with wan and lan; returns the lan subnet.
fn run_firewall(env: &Env) -> String {
    build_firewall(env);
    let (wan, lan) = (random_subnet(), random_subnet());
    env.ok(&["net", "create", "wan", "--subnet", &wan, "--nat"]);
    env.ok(&["net", "create", "lan", "--subnet", &lan, "--isolated"]);
    env.ok(&[
        "run", "firewall", "--name", "fw", "--net", "wan", "--net", "lan",
    ]);
    lan
}

/// Runs vroom with `input` on stdin.
fn vroom_with_stdin(env: &Env, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(common::vroom_bin())
        .env("VROOM_DATA_DIR", &env.dir)
        .env("VROOM_IFACE_PREFIX", &env.prefix)
        .env("VROOM_INIT", common::init_binary())
        .env_remove("VROOM_LOG")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The CLI may refuse before reading everything: a broken pipe is fine.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

/// Removes the firewall, its networks and the given namespaces, then checks
/// that nothing is left.
fn teardown(env: &Env, namespaces: &[&str], context: &str) {
    env.ok(&["rm", "-f", "fw"]);
    for ns in namespaces {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    env.ok(&["net", "rm", "lan"]);
    env.ok(&["net", "rm", "wan"]);
    // A deleted namespace's veth goes away a moment later.
    poll(Duration::from_secs(10), || {
        env.links().is_empty().then_some(())
    });
    env.assert_nothing_left(context);
}

fn config_of(env: &Env) -> vroom_types::ConfigValues {
    serde_json::from_str::<ConfigDocument>(&env.ok(&["--json", "config", "fw", "get"]))
        .unwrap()
        .values
}

fn history(env: &Env) -> ConfigHistory {
    serde_json::from_str(&env.ok(&["--json", "config", "fw", "history"])).unwrap()
}

/// `inspect` and `config get` show the same config.
fn assert_one_truth(env: &Env) {
    assert_eq!(
        env.instance("fw").config,
        config_of(env),
        "inspect and config get agree"
    );
}

/// Defect 3: a value the schema's types allow but the appliance cannot use
/// is refused (by the host's rules, or by the guest's checks), nothing is
/// saved, and the firewall keeps serving; accepted changes are versions
/// that can be listed, compared and rolled back; a whole-config import must
/// name every key.
#[test]
fn bad_changes_are_refused_and_good_ones_are_versions() {
    let env = Env::new("cfg");
    let lan = run_firewall(&env);
    let fw_lan = host(&lan, 1);
    let client = env.namespace_on(
        "cli",
        "lan",
        Some((&format!("{}/24", host(&lan, 20)), &fw_lan.to_string())),
    );
    env.ok(&["config", "fw", "set", "hosts=nas.lan=10.9.9.9"]);
    assert_eq!(
        resolve(&env, &client, "nas.lan", fw_lan).as_deref(),
        Some("10.9.9.9"),
        "the firewall serves DNS for its lan"
    );
    let before = config_of(&env);
    let console_before = env.ok(&["logs", "fw"]);

    // Outside the /24 lan: refused on the host, the guest is not asked.
    let err = env.fail(&["config", "fw", "set", "dhcp_first=300"]);
    assert!(
        err.contains("dhcp_first") && err.contains("host number of lan's subnet"),
        "{err}"
    );
    let err = env.fail(&["config", "fw", "set", "dhcp_first=150", "dhcp_last=120"]);
    assert!(err.contains("must be at most dhcp_last (120)"), "{err}");
    // What the guest logs when it renders, checks or applies a config.
    let guest_markers = ["render ", "the check of service", "config applied"];
    let console = env.ok(&["logs", "fw"]);
    let since = &console[console_before.len()..];
    assert!(
        !guest_markers.iter().any(|m| since.contains(m)),
        "the guest was not asked: {since}"
    );

    // A lease time dnsmasq cannot read: the host's checks pass it, the
    // guest's check of the staged dnsmasq.conf refuses it.
    let err = env.fail(&["config", "fw", "set", "lease_time=bogus"]);
    assert!(
        err.contains("the check of service dnsmasq failed"),
        "the refusal names the failing check: {err}"
    );
    assert!(err.contains("dhcp-range"), "and shows its output: {err}");
    let console = env.ok(&["logs", "fw"]);
    assert!(
        console[console_before.len()..].contains("the check of service dnsmasq failed"),
        "the guest's refusal is what the markers above look for"
    );
    assert_eq!(config_of(&env), before, "nothing was saved");
    assert_one_truth(&env);
    assert_eq!(
        resolve(&env, &client, "nas.lan", fw_lan).as_deref(),
        Some("10.9.9.9"),
        "dnsmasq still answers"
    );
    assert_eq!(history(&env).current, 2, "refusals are no versions");

    // A whole config must name every key.
    let out = vroom_with_stdin(&env, &["config", "fw", "import", "-"], br#"{"values":{}}"#);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an empty import is refused");
    assert!(
        stderr.contains("lacks keys") && stderr.contains("dhcp_first"),
        "{stderr}"
    );
    assert_eq!(config_of(&env), before);

    // Export to stdout, import from stdin.
    let exported = env.ok(&["config", "fw", "export", "-"]);
    let mut doc: ConfigDocument = serde_json::from_str(&exported).unwrap();
    assert_eq!(doc.values, before);
    doc.values.insert("ping".into(), "false".into());
    let out = vroom_with_stdin(
        &env,
        &["config", "fw", "import", "-"],
        &serde_json::to_vec(&doc).unwrap(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(config_of(&env)["ping"], "false");
    let huge = vec![b' '; 2 << 20];
    let out = vroom_with_stdin(&env, &["config", "fw", "import", "-"], &huge);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("exceeds 1024 KiB"),
        "{stderr}"
    );

    // History: 1 create, 2 hosts, 3 import (ping).
    let h = history(&env);
    let summary: Vec<(u64, ConfigOrigin, Vec<String>)> = h
        .versions
        .iter()
        .map(|v| (v.version, v.origin, v.changed.clone()))
        .collect();
    assert_eq!(
        summary[1..],
        [
            (2, ConfigOrigin::Set, vec!["hosts".to_string()]),
            (3, ConfigOrigin::Import, vec!["ping".to_string()]),
        ]
    );
    assert_eq!(summary[0].0, 1);
    assert_eq!(h.current, 3);

    // Diff: by default the previous version against the current one.
    let diff = env.ok(&["config", "fw", "diff"]);
    assert_eq!(
        diff,
        "--- version 2\n+++ version 3\n-ping=true\n+ping=false\n",
    );
    let diff = env.ok(&["config", "fw", "diff", "1", "3"]);
    assert!(
        diff.contains("+hosts=nas.lan=10.9.9.9") && diff.contains("+ping=false"),
        "{diff}"
    );

    // Rollback: by default to the previous version, itself a new version.
    env.ok(&["config", "fw", "rollback"]);
    assert_eq!(config_of(&env)["ping"], "true");
    env.ok(&["config", "fw", "rollback", "1"]);
    assert_eq!(config_of(&env)["hosts"], "");
    let h = history(&env);
    let last: Vec<(u64, Option<u64>)> = h.versions[3..]
        .iter()
        .map(|v| (v.version, v.rollback_to))
        .collect();
    assert_eq!(last, vec![(4, Some(2)), (5, Some(1))]);
    assert!(
        resolve(&env, &client, "nas.lan", fw_lan).is_none(),
        "the rollback is in force: nas.lan is gone"
    );
    let err = env.fail(&["config", "fw", "rollback", "99"]);
    assert!(err.contains("no config version 99"), "{err}");
    assert_one_truth(&env);

    // The history survives a daemon kill, and goes away with the instance.
    env.kill_daemon();
    env.start_daemon();
    assert_eq!(history(&env), h);
    env.ok(&["rm", "-f", "fw"]);
    env.ok(&[
        "run", "firewall", "--name", "fw", "--net", "wan", "--net", "lan",
    ]);
    assert_eq!(
        history(&env).versions.len(),
        1,
        "a new fw starts a new history"
    );
    teardown(&env, &[&client], "after the config test");
}

/// A stored config that the guest's checks refuse (accepted while stopped,
/// where only the host's checks run) fails `start` within seconds with the
/// check's error, instead of the 120 s readiness timeout; a rollback while
/// it is failed brings it back.
#[test]
fn a_config_that_cannot_be_put_in_force_fails_the_start_at_once() {
    let env = Env::new("cfgboot");
    run_firewall(&env);
    env.ok(&["stop", "fw"]);
    let err = env.fail(&["config", "fw", "set", "dhcp_first=300"]);
    assert!(
        err.contains("host number"),
        "the host's rules apply while stopped: {err}"
    );
    env.ok(&["config", "fw", "set", "lease_time=bogus"]);
    assert_one_truth(&env);

    let started = Instant::now();
    let err = env.fail(&["start", "fw"]);
    let took = started.elapsed();
    assert!(
        err.contains("the stored config cannot be put in force")
            && err.contains("the check of service dnsmasq failed"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(60),
        "start failed fast: {took:?}"
    );
    assert_eq!(
        env.instance("fw").status.state,
        vroom_types::InstanceState::Failed
    );

    env.ok(&["config", "fw", "rollback"]);
    assert_eq!(config_of(&env)["lease_time"], "12h");
    env.ok(&["start", "fw"]);
    assert_eq!(
        env.instance("fw").status.state,
        vroom_types::InstanceState::Running
    );
    teardown(&env, &[], "after the boot config test");
}

/// The daemon dies after the guest acknowledged a change and before it was
/// recorded: the restarted daemon finds the pending version, sees that the
/// guest has it and records it, so `config get`, `inspect` and the history
/// tell the truth.
#[test]
fn a_change_acknowledged_before_a_daemon_crash_is_recorded() {
    let env = Env::new("cfgkill");
    run_firewall(&env);
    env.kill_daemon();
    // A daemon that exits right after the guest's acknowledgement.
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(env.dir.join("vroomd.log"))
        .unwrap();
    let mut daemon = Command::new(common::vroom_bin())
        .env("VROOM_DATA_DIR", &env.dir)
        .env("VROOM_IFACE_PREFIX", &env.prefix)
        .env("VROOM_INIT", common::init_binary())
        .env("VROOM_TEST_FAILPOINT", "config-applied")
        .arg("daemon")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let socket = env.dir.join("vroomd.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "{}", env.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = env.vroom(&["config", "fw", "set", "ping=false"]);
    assert!(!out.status.success(), "the daemon died mid-change");
    let status = daemon.wait().unwrap();
    assert_eq!(status.code(), Some(86), "it died at the failpoint");

    env.start_daemon();
    assert_eq!(
        config_of(&env)["ping"],
        "false",
        "the guest's change is recorded"
    );
    assert!(
        env.daemon_log()
            .contains("recorded an interrupted config change the guest had applied"),
        "through the pending version"
    );
    assert_one_truth(&env);
    let h = history(&env);
    assert_eq!(h.current, 2);
    assert_eq!(h.versions[1].changed, vec!["ping".to_string()]);
    teardown(&env, &[], "after the crash test");
}
