//! Crash safety: vroomd is SIGKILLed at a spread of moments inside the
//! operations that change state (run, restart, stop, rm), a new daemon is
//! started, and then every QEMU of the data dir must belong to exactly one
//! instance record, every record must settle out of its transitional state,
//! and nothing may be left once the instances are removed. Also: a guest
//! whose init dies at boot fails within seconds with its console's words, and
//! a leftover bridge is refused without being touched.

mod common;

use std::time::{Duration, Instant};

use common::{assert_consistent, kill_during, random_subnet, Env};
use vroom_types::InstanceState;

fn run_body(name: &str, net: &str) -> String {
    serde_json::json!({
        "spec": {
            "name": name,
            "image": "hello",
            "mem_mib": null,
            "cpus": 1,
            "nics": [{"network": net, "ip": null}],
            "accel": "auto",
            "config_volume_kib": null
        },
        "ready_timeout_secs": 120
    })
    .to_string()
}

#[test]
fn daemon_killed_inside_run_restart_stop_and_rm_leaves_no_orphan_and_no_limbo() {
    let env = Env::new("crash");
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    // Build hello once, outside the timed windows.
    env.ok(&["run", "hello", "--name", "warm", "--net", "lan"]);
    env.ok(&["rm", "-f", "warm"]);

    let delays = [0u64, 15, 30, 45, 60, 90, 150, 400];
    for (n, delay) in delays.iter().enumerate() {
        let name = format!("r{n}");
        kill_during(
            &env,
            "POST",
            "/v1/instances",
            run_body(&name, "lan"),
            Duration::from_millis(*delay),
        );
        let context = format!("kill {delay} ms into run of {name}");
        assert_consistent(&env, &context);
        // Whatever the kill left is usable: it runs (or is gone) and can be removed.
        if env.instances().iter().any(|i| i.spec.name.as_str() == name) {
            env.wait_for(&name, "running", Duration::from_secs(90), |i| {
                i.status.state == InstanceState::Running
            });
        }
    }

    // Kills inside restart and stop of a running instance.
    env.ok(&["run", "hello", "--name", "web", "--net", "lan"]);
    for (action, delay) in [
        ("restart", 20u64),
        ("restart", 120),
        ("restart", 600),
        ("stop", 20),
        ("start", 40),
        ("stop", 300),
    ] {
        let body = format!(r#"{{"action":"{action}"}}"#);
        kill_during(
            &env,
            "POST",
            "/v1/instances/web/actions",
            body,
            Duration::from_millis(delay),
        );
        assert_consistent(&env, &format!("kill {delay} ms into {action} of web"));
        let web = env.instance("web");
        // An interrupted stop is finished; everything else leaves it wanted.
        let want = if action == "stop" {
            InstanceState::Stopped
        } else {
            InstanceState::Running
        };
        assert_eq!(
            web.status.state, want,
            "after {action} killed at {delay} ms"
        );
        // `start`, `stop` and `restart` work again.
        env.ok(&["start", "web"]);
    }

    // Kills inside rm -f: see the test below.
    for i in env.instances() {
        env.ok(&["rm", "-f", i.spec.name.as_str()]);
    }
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after every kill");

    // The event log went through 14 kills, some inside an event's write:
    // it reads whole, its numbers rise with no repeat, and every instance
    // that ran has its `created` and its `removed`.
    let log = env.ok(&[
        "events",
        "--json",
        "-n",
        "10000",
        "--filter",
        "kind=instance",
    ]);
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "numbers repeat or go back: {seqs:?}"
    );
    for name in ["web", "warm"] {
        for action in ["created", "removed"] {
            assert!(
                events
                    .iter()
                    .any(|e| e["name"] == name && e["action"] == action),
                "no {action} event of {name}: {log}"
            );
        }
    }
}

fn clone_body(name: &str, snapshot: &str) -> String {
    let mut body: serde_json::Value = serde_json::from_str(&run_body(name, "lan")).unwrap();
    body["spec"]["image"] = "".into();
    body["from_snapshot"] = snapshot.into();
    body.to_string()
}

/// Issue 23 #9 and #10: vroomd killed inside `rm -f` (one, or two sent 44 ms
/// apart) and inside a clone. The next daemon finishes every removal it
/// acknowledged (the instance is gone, `net rm` works, nothing is left), or
/// the kill came before the request and the instance runs on. An
/// interrupted clone is failed with its reason, never booted and shown as
/// the clone.
#[test]
fn daemon_killed_inside_rm_or_clone_finishes_the_rm_and_fails_the_clone() {
    let env = Env::new("crashrm");
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    env.ok(&["run", "hello", "--name", "web", "--net", "lan"]);
    env.wait_for("web", "running", Duration::from_secs(120), |i| {
        i.status.state == InstanceState::Running
    });
    env.ok(&["snapshot", "web", "--name", "s1"]);

    let mut interrupted = 0;
    for (n, delay) in [40u64, 250, 900].iter().enumerate() {
        let name = format!("c{n}");
        kill_during(
            &env,
            "POST",
            "/v1/instances",
            clone_body(&name, "s1"),
            Duration::from_millis(*delay),
        );
        if !env.instances().iter().any(|i| i.spec.name.as_str() == name) {
            continue;
        }
        let clone = env.wait_for(&name, "settled", Duration::from_secs(60), |i| {
            matches!(
                i.status.state,
                InstanceState::Running | InstanceState::Failed
            )
        });
        eprintln!(
            "kill {delay} ms into the clone {name}: {:?} {:?} {:?}",
            clone.status.state, clone.status.started_from, clone.status.last_error
        );
        match clone.status.state {
            InstanceState::Failed => {
                interrupted += 1;
                assert_eq!(
                    clone.status.last_error.as_deref(),
                    Some("interrupted while cloning from snapshot s1; remove it or run it again")
                );
                assert_eq!(clone.status.pid, None);
            }
            _ => assert_eq!(
                clone.status.started_from.as_deref(),
                Some("snapshot s1"),
                "kill {delay} ms into the clone {name}: it runs, but not as a clone"
            ),
        }
    }
    eprintln!("{interrupted} of 3 kills landed inside the clone");
    assert_consistent_or_failed(&env, "after the clone kills");
    // One whole clone: the removals below meet two live QEMUs.
    env.ok(&["clone", "s1", "c3", "--net", "lan"]);
    assert_eq!(
        env.instance("c3").status.started_from.as_deref(),
        Some("snapshot s1")
    );
    env.ok(&["snapshot", "rm", "s1"]);

    // Kills inside rm -f, of web and of the clones that came up.
    let names: Vec<String> = env
        .instances()
        .iter()
        .map(|i| i.spec.name.to_string())
        .collect();
    for (n, name) in names.iter().enumerate() {
        let delay = [5u64, 20, 60, 150][n % 4];
        let path = format!("/v1/instances/{name}?force=true");
        // Every other one gets a second rm 44 ms after the first.
        let first = (n % 2 == 1).then(|| {
            let dir = env.dir.clone();
            let path = path.clone();
            std::thread::spawn(move || common::send(&dir, "DELETE", &path, ""))
        });
        if first.is_some() {
            std::thread::sleep(Duration::from_millis(44));
        }
        kill_during(
            &env,
            "DELETE",
            &path,
            String::new(),
            Duration::from_millis(delay),
        );
        if let Some(first) = first {
            let _ = first.join();
        }
        let context = format!("kill {delay} ms into rm of {name}");
        assert_consistent_or_failed(&env, &context);
        // Gone, or (killed before the daemon took the request) as it was.
        if let Some(left) = env
            .instances()
            .into_iter()
            .find(|i| &i.spec.name.to_string() == name)
        {
            eprintln!("{context}: the rm was not taken: {:?}", left.status.state);
            assert!(
                matches!(
                    left.status.state,
                    InstanceState::Running | InstanceState::Failed
                ),
                "{context}: left {:?}, wanted {:?}",
                left.status.state,
                left.desired
            );
            env.ok(&["rm", "-f", name]);
        }
    }
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after the kills inside rm");
}

/// [`assert_consistent`], where a failed instance is allowed (an
/// interrupted clone is failed on purpose).
fn assert_consistent_or_failed(env: &Env, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let instances = loop {
        let instances = env.instances();
        if instances.iter().all(|i| {
            matches!(
                i.status.state,
                InstanceState::Running | InstanceState::Failed
            )
        }) {
            break instances;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: instances never settled: {:?}\n{}",
            instances
                .iter()
                .map(|i| (i.spec.name.to_string(), i.status.state, i.desired))
                .collect::<Vec<_>>(),
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut recorded: Vec<u32> = instances.iter().filter_map(|i| i.status.pid).collect();
    recorded.sort();
    assert_eq!(
        env.qemu_pids(),
        recorded,
        "{context}: QEMUs do not match the records"
    );
}

/// Defect 1: a guest whose init dies at boot (here a static init that just
/// exits: the kernel panics) fails within seconds with the panic as its
/// cause, instead of staying `starting` for the whole ready timeout.
#[test]
fn a_guest_that_panics_at_boot_fails_fast_with_its_last_words() {
    let tmp = std::env::temp_dir().join(format!("vroom-badinit-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let source = tmp.join("init.c");
    std::fs::write(&source, "int main(void) { return 3; }\n").unwrap();
    let init = tmp.join("init");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&init)
        .arg(&source)
        .status()
        .unwrap();
    assert!(built.success(), "gcc -static failed");
    let env = Env::with_env(
        "bootpanic",
        vec![("VROOM_INIT", init.display().to_string())],
    );
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    let started = Instant::now();
    let stderr = env.fail(&[
        "run",
        "hello",
        "--name",
        "dead",
        "--net",
        "lan",
        "--timeout",
        "120",
    ]);
    let took = started.elapsed();
    assert!(stderr.contains("Kernel panic"), "{stderr}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let dead = env.instance("dead");
    assert_eq!(dead.status.state, InstanceState::Failed);
    assert!(
        dead.status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("died during boot"),
        "{:?}",
        dead.status.last_error
    );
    // Not restarted in a loop: it has never been ready.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(env.instance("dead").status.restarts, 0);
    assert!(env.qemu_pids().is_empty());
    assert!(
        !env.daemon_log().contains("panicked"),
        "{}",
        env.daemon_log()
    );
    env.ok(&["rm", "dead"]);
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after the failed boot");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Defect 4: a bridge of the same name left on the host (here: made by hand
/// before the daemon) is refused with how to remove it, and a failed call
/// does not delete it as if it had made it.
#[test]
fn a_leftover_bridge_is_refused_and_left_alone() {
    let env = Env::new("leftover");
    let subnet = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    let bridge = env.network("lan").bridge;
    env.ok(&["net", "rm", "lan"]);
    let made = std::process::Command::new("ip")
        .args(["link", "add", &bridge, "type", "bridge"])
        .status()
        .unwrap();
    assert!(made.success());
    for _ in 0..2 {
        let stderr = env.fail(&["net", "create", "lan", "--subnet", &subnet]);
        assert!(stderr.contains(&bridge), "{stderr}");
        assert!(stderr.contains("ip link delete"), "{stderr}");
        assert!(
            env.links().contains(&bridge),
            "the failed call removed a bridge it did not make"
        );
    }
    assert!(env.ok(&["net", "ls", "--json"]).trim() == "[]");
    // `vroom gc` finds it, and removes it because it is idle (no ports).
    let listed = env.ok(&["gc"]);
    assert!(
        listed.contains(&bridge) && listed.contains("idle"),
        "{listed}"
    );
    let removed = env.ok(&["gc", "--remove"]);
    assert!(removed.contains("removed"), "{removed}");
    assert!(!env.links().contains(&bridge));
    env.ok(&["net", "create", "lan", "--subnet", &subnet]);
    // A bridge of this data dir is never a leftover.
    assert!(!env.ok(&["gc"]).contains(&bridge));
    env.ok(&["net", "rm", "lan"]);
    env.assert_nothing_left("after gc");
}
