//! End to end: a cluster on one machine. Three real etcd members listen on
//! an underlay bridge; each node is a network namespace joined to it by a
//! veth, with its own vroomd, guard, data dir and QEMUs. Faults are real:
//! SIGKILL of a node's every process (power loss), SIGSTOP of its vroomd
//! (freeze), an nft drop of its etcd traffic (partition), SIGSTOP of the
//! etcd leader, SIGKILL of one QEMU. A sampler scans every node's cgroup
//! throughout: an instance must never run twice.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::lab::{
    assert_acknowledged_writes, assert_same_copies, copy_of, failed_over, last_sync,
    replication_of, up_to_date, write_until_power_loss, Lab, DATA,
};
use common::{poll, vroom_bin};
use vroom_lab::signal;

/// The cluster tests' lab: names start with k (qemu10.rs uses q, the
/// benches b).
fn new_lab(nodes: usize) -> Lab {
    Lab::new('k', nodes, vec![])
}

/// The loaded-host test runs alone: its busy loops would starve the etcd
/// members and guests of the tests beside it (they failed their leases).
static HOST_LOAD: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by every other test while it runs.
fn quiet_host() -> std::sync::RwLockReadGuard<'static, ()> {
    vroom_base::RwLockExt::read_unpoisoned(&HOST_LOAD)
}

/// Counts, every 20 ms, the QEMUs of `instance` across every node; keeps the
/// most seen. While a live migration runs (`migrating`), two are expected:
/// the destination's waits for the state (`-incoming`) until the source's
/// has paused for good.
struct Sampler {
    stop: Arc<AtomicBool>,
    migrating: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    worst: Arc<Mutex<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(lab: &Arc<Lab>, instance: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let migrating = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let worst = Arc::new(Mutex::new(String::new()));
        let (lab, instance) = (lab.clone(), instance.to_string());
        let (s, m, w, g) = (stop.clone(), most.clone(), worst.clone(), migrating.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let seen: Vec<(String, u32)> = (0..lab.nodes.len())
                    .flat_map(|i| {
                        lab.qemus(i)
                            .into_iter()
                            .filter(|(_, n)| *n == instance)
                            .map(move |(p, _)| (format!("n{}", i + 1), p))
                    })
                    .collect();
                if !g.load(Ordering::SeqCst) && seen.len() > m.load(Ordering::SeqCst) {
                    m.store(seen.len(), Ordering::SeqCst);
                    *w.lock().unwrap() = format!("{seen:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            stop,
            migrating,
            most,
            worst,
            thread: Some(thread),
        }
    }

    /// Runs `migrate` as a window in which two QEMUs may exist; the window
    /// closes once the instance runs on one node again.
    fn migration<T>(&self, lab: &Lab, instance: &str, migrate: impl FnOnce() -> T) -> T {
        self.migrating.store(true, Ordering::SeqCst);
        let result = migrate();
        let once = poll(Duration::from_secs(30), || {
            let on = (0..lab.nodes.len())
                .filter(|&i| lab.runs(i, instance).is_some())
                .count();
            (on <= 1).then_some(())
        });
        self.migrating.store(false, Ordering::SeqCst);
        assert!(
            once.is_some(),
            "{instance} still runs twice 30 s after a migration"
        );
        result
    }

    fn assert_never_twice(&self, context: &str) {
        assert!(
            self.most.load(Ordering::SeqCst) <= 1,
            "{context}: two QEMUs of one instance ran at once: {}",
            self.worst.lock().unwrap()
        );
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The node `instance` has settled on: the cluster names it as the owner,
/// it runs there and nowhere else, and it answers; the same for two looks
/// in a row.
fn settled_on(lab: &Lab, instance: &str, ip: &str) -> Option<usize> {
    let owner = |i: usize| -> Option<usize> {
        let out = lab.vroom(i, &["--json", "inspect", instance]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let node = v["node"].as_str()?.to_string();
        lab.nodes.iter().position(|n| n.name == node)
    };
    let mut last = None;
    poll(Duration::from_secs(30), || {
        let at = (0..lab.nodes.len()).find_map(&owner)?;
        let alone = (0..lab.nodes.len()).all(|i| (i == at) == lab.runs(i, instance).is_some());
        let now = (alone && lab.page_from(at, ip).is_some()).then_some(at);
        let steady = now.is_some() && now == last;
        last = now;
        steady.then_some(at)
    })
}

/// A lab of two nodes that both have hello's image.
fn two_nodes_with_hello() -> Arc<Lab> {
    let lab = Arc::new(new_lab(2));
    let hello = common::recipe("hello");
    for i in 0..2 {
        lab.ok(i, &["image", "build", &hello]);
    }
    lab
}

fn ip_of(lab: &Lab, i: usize, instance: &str) -> String {
    let out = lab.ok(i, &["--json", "inspect", instance]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nics"][0]["ip"].as_str().unwrap().to_string()
}

#[test]
fn an_instance_outlives_its_node_and_never_runs_twice() {
    let _quiet = quiet_host();
    let lab = two_nodes_with_hello();
    lab.ok(
        0,
        &[
            "run", "hello", "--name", "h1", "--ha", "restart", "--node", "n1",
        ],
    );
    // An imported image is on n1 only, and no node can build it: n2 fetches
    // it by digest while n1 lives, for a failover.
    let layout = common::oci::build_images(&lab.dir, false);
    let reference = format!("oci:{}:novolume", layout.display());
    lab.ok(0, &["image", "import", &reference, "--name", "web"]);
    lab.ok(
        0,
        &[
            "run", "web", "--name", "o1", "--ha", "restart", "--node", "n1",
        ],
    );
    let web = lab.ok(0, &["--json", "inspect", "o1"]);
    let web: serde_json::Value = serde_json::from_str(&web).unwrap();
    let web_id = web["image_id"].as_str().unwrap().to_string();
    let fetched = poll(Duration::from_secs(60), || {
        lab.ok(1, &["--json", "image", "ls"])
            .contains(&web_id)
            .then_some(())
    });
    assert!(
        fetched.is_some(),
        "n2 did not fetch the image of HA instance o1 from n1\n--- n2:\n{}",
        lab.log(1)
    );
    let web_ip = format!("{}:8080", ip_of(&lab, 0, "o1"));
    let ip = ip_of(&lab, 0, "h1");
    assert!(lab.runs(0, "h1").is_some(), "h1 runs on n1");
    assert!(lab.page_from(0, &ip).is_some(), "h1 answers on n1");
    // The other node lists it too, where it runs.
    let listed = lab.ok(1, &["--json", "inspect", "h1"]);
    assert!(listed.contains(&ip), "{listed}");
    let nodes = lab.ok(1, &["node", "ls"]);
    assert!(nodes.contains("n1") && nodes.contains("n2"), "{nodes}");
    // A config change is replicated before it is acknowledged: it survives
    // the loss of the node.
    lab.ok(
        0,
        &[
            "config",
            "h1",
            "set",
            "greeting=replicated-before-the-crash",
        ],
    );
    let sampler = Sampler::start(&lab, "h1");

    // Power loss of n1: n2 boots h1 with its address.
    lab.power_loss(0);
    let took = failed_over(&lab, 1, "h1", &ip, Duration::from_secs(30));
    eprintln!("power loss: h1 answered from n2 after {took:?}");
    assert_eq!(ip_of(&lab, 1, "h1"), ip, "the address moves with it");
    let page = lab.page_from(1, &ip).unwrap_or_default();
    assert!(
        page.contains("replicated-before-the-crash"),
        "the config did not follow h1: {page}"
    );
    let shown = lab.ok(1, &["ps"]);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("h1 ") && l.contains(" n2 ")),
        "ps shows where it runs: {shown}"
    );
    sampler.assert_never_twice("power loss");
    // As fast as h1: the two failing over together both find n2 without
    // the network, and both start.
    let took = failed_over(&lab, 1, "o1", &web_ip, Duration::from_secs(30));
    eprintln!("power loss: the imported o1 answered from n2 after {took:?}");
    let page = lab.page_from(1, &web_ip).unwrap_or_default();
    assert!(page.contains("hello from an oci image"), "{page}");
    lab.ok(1, &["rm", "--force", "o1"]);

    // n1 comes back: it does not restart what n2 owns now.
    lab.start(0);
    let on_n2 = lab.runs(1, "h1").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(lab.runs(0, "h1"), None, "n1 restarted h1: {}", lab.log(0));
    assert_eq!(lab.runs(1, "h1"), Some(on_n2));
    let node = lab.ok(0, &["--json", "node", "inspect", "n1"]);
    assert!(node.contains("\"alive\": true"), "{node}");

    // Freeze n2's vroomd: its guard kills h1 before n1 may claim it.
    lab.freeze(1, true);
    let fenced = poll(Duration::from_secs(4), || {
        lab.runs(1, "h1").is_none().then_some(())
    });
    assert!(fenced.is_some(), "the guard did not fence frozen n2");
    let took = failed_over(&lab, 0, "h1", &ip, Duration::from_secs(30));
    eprintln!("freeze: h1 answered from n1 after {took:?}");
    lab.freeze(1, false);
    let on_n1 = lab.runs(0, "h1").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        lab.runs(1, "h1"),
        None,
        "thawed n2 restarted h1: {}",
        lab.log(1)
    );
    assert_eq!(lab.runs(0, "h1"), Some(on_n1));
    sampler.assert_never_twice("freeze");

    // Partition n1 from etcd: fenced, and h1 comes back on n2.
    lab.partition(0, true).unwrap();
    let took = failed_over(&lab, 1, "h1", &ip, Duration::from_secs(30));
    eprintln!("partition: h1 answered from n2 after {took:?}");
    assert_eq!(lab.runs(0, "h1"), None, "partitioned n1 still runs h1");
    lab.partition(0, false).unwrap();
    let rejoined = poll(Duration::from_secs(15), || {
        lab.ok(1, &["--json", "node", "inspect", "n1"])
            .contains("\"alive\": true")
            .then_some(())
    });
    assert!(
        rejoined.is_some(),
        "n1 did not rejoin after the partition: {}",
        lab.log(0)
    );
    assert_eq!(
        lab.runs(0, "h1"),
        None,
        "healed n1 restarted h1: {}",
        lab.log(0)
    );
    sampler.assert_never_twice("partition");

    // SIGSTOP of the etcd leader: the cluster elects another; nothing runs twice.
    let leader = lab.etcd_leader().expect("an etcd member leads");
    signal(leader, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(6));
    let runs: Vec<Option<u32>> = (0..2).map(|i| lab.runs(i, "h1")).collect();
    signal(leader, libc::SIGCONT);
    // h1 may have been fenced and restarted while the leases were in doubt,
    // but on one node at a time.
    let answering = poll(Duration::from_secs(30), || {
        (0..2).find(|i| lab.runs(*i, "h1").is_some() && lab.page_from(*i, &ip).is_some())
    });
    assert!(
        answering.is_some(),
        "h1 is gone after the etcd leader stalled: {runs:?}"
    );
    sampler.assert_never_twice("etcd leader stopped");

    // SIGKILL of one QEMU: its node restarts it; it stays where it was.
    // "Where it was" is where the cluster has settled it: the node the
    // stall found it on may be removing a copy it no longer owns.
    let at = settled_on(&lab, "h1", &ip).unwrap_or_else(|| {
        panic!(
            "h1 did not settle after the etcd leader stalled\n--- n1:\n{}\n--- n2:\n{}",
            lab.log(0),
            lab.log(1)
        )
    });
    let pid = lab.runs(at, "h1").unwrap();
    signal(pid, libc::SIGKILL);
    let again = poll(Duration::from_secs(30), || {
        lab.runs(at, "h1")
            .filter(|p| *p != pid && lab.page_from(at, &ip).is_some())
    });
    assert!(
        again.is_some(),
        "h1 did not come back after its QEMU died: {}",
        lab.log(at)
    );
    sampler.assert_never_twice("QEMU killed");

    // Removal from any node removes it everywhere, addresses included.
    lab.ok(1 - at, &["rm", "--force", "h1"]);
    let gone = poll(Duration::from_secs(10), || {
        (0..2).all(|i| lab.runs(i, "h1").is_none()).then_some(())
    });
    assert!(gone.is_some(), "h1 still runs after rm");
    let ps = lab.ok(0, &["--json", "ps"]);
    assert!(!ps.contains("\"h1\""), "{ps}");
    drop(sampler);

    // A node that is gone for good is forgotten once its lease is gone.
    lab.power_loss(1);
    let forgotten = poll(Duration::from_secs(10), || {
        lab.vroom(0, &["node", "rm", "n2"])
            .status
            .success()
            .then_some(())
    });
    assert!(forgotten.is_some(), "cannot remove dead n2");
    let nodes = lab.ok(0, &["node", "ls"]);
    assert!(!nodes.contains("n2"), "{nodes}");
}

#[test]
fn bad_input_is_one_line_and_changes_nothing() {
    let _quiet = quiet_host();
    let lab = new_lab(1);
    // Joining: a wrong cluster id, an unreachable etcd, a name in use.
    let other = lab.dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let join = |node: &str, extra: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.nodes[0].ns))
            .args(["--", vroom_bin()])
            .env("VROOM_DATA_DIR", &other)
            .env("VROOM_IFACE_PREFIX", lab.prefix())
            .args(["daemon", "--cluster", "--etcd", &lab.endpoints()])
            .args(["--node", node, "--advertise", "elsewhere"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "joined {node} {extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = join("n7", &["--cluster-id", "0000000000000000"]);
    assert!(
        err.contains("error:") && err.contains("not 0000000000000000"),
        "{err}"
    );
    let err = join("n1", &[]);
    assert!(err.contains("node n1 is already in the cluster"), "{err}");
    assert!(
        !other.join("cluster.json").exists() && !other.join("guard.sock").exists(),
        "a refused join left state behind"
    );
    let nodes = lab.ok(0, &["--json", "node", "ls"]);
    assert!(
        !nodes.contains("n7") && !nodes.contains("elsewhere"),
        "{nodes}"
    );
    let out = Command::new(vroom_bin())
        .env("VROOM_DATA_DIR", &other)
        .args(["daemon", "--cluster", "--etcd", "http://127.0.0.1:9"])
        .args(["--node", "n9", "--advertise", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unreachable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = lab.fail(0, &["cluster", "init", "--etcd", &lab.endpoints()]);
    assert!(err.contains("already holds cluster"), "{err}");

    // Placement on an unknown or cordoned node.
    lab.ok(0, &["image", "build", &common::recipe("hello")]);
    let err = lab.fail(0, &["run", "hello", "--name", "x1", "--node", "nope"]);
    assert!(err.contains("no node named \"nope\""), "{err}");
    lab.ok(0, &["node", "cordon", "n1"]);
    let err = lab.fail(0, &["run", "hello", "--name", "x1", "--node", "n1"]);
    assert!(err.contains("node n1 is cordoned"), "{err}");
    let err = lab.fail(0, &["run", "hello", "--name", "x1"]);
    assert!(err.contains("no node can take x1"), "{err}");
    lab.ok(0, &["node", "uncordon", "n1"]);
    // Issue 23 #11: a run that fails on the node after it claimed the
    // instance (here: more CPUs than the host has, found by the node's engine)
    // leaves no owner key, and the name can be used again at once.
    let err = lab.fail(0, &["run", "hello", "--name", "x1", "--cpus", "64"]);
    assert!(err.contains("x1"), "{err}");
    assert!(
        lab.etcd_keys("/vroom/owners/").is_empty(),
        "the failed run left its owner key: {:?}",
        lab.etcd_keys("/vroom/")
    );
    lab.ok(0, &["run", "hello", "--name", "x1"]);
    lab.ok(0, &["rm", "-f", "x1"]);
    let err = lab.fail(0, &["node", "inspect", "nope"]);
    assert!(err.contains("no node named"), "{err}");
    let err = lab.fail(0, &["node", "rm", "n1"]);
    assert!(err.contains("node n1 is alive"), "{err}");
    let ps = lab.ok(0, &["--json", "ps"]);
    assert_eq!(ps.trim(), "[]", "nothing was created: {ps}");
    let node = lab.ok(0, &["--json", "node", "inspect", "n1"]);
    assert!(node.contains("\"cordoned\": false"), "{node}");

    // A host outside any cluster refuses placement options.
    let solo = common::Env::new("solo");
    solo.ok(&["image", "build", &common::recipe("hello")]);
    let err = solo.fail(&["run", "hello", "--name", "x", "--ha", "restart"]);
    assert!(err.contains("not in a cluster"), "{err}");
    let err = solo.fail(&["node", "ls"]);
    assert!(err.contains("not in a cluster"), "{err}");
}

/// The receiving node's vroomd killed at several moments inside `run` and
/// inside `rm`: afterwards the instance runs once with one address, or
/// nothing of it is left (no key, no QEMU, no local copy).
#[test]
fn a_daemon_killed_inside_run_or_rm_leaves_all_or_nothing() {
    let _quiet = quiet_host();
    let lab = new_lab(2);
    let hello = common::recipe("hello");
    for i in 0..2 {
        lab.ok(i, &["image", "build", &hello]);
    }
    let kill_n1_after = |args: Vec<String>, delay: Duration| {
        let child = lab
            .command(0)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        lab.kill_daemon(0);
        let out = child.wait_with_output().unwrap();
        eprintln!(
            "{} after {delay:?}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        lab.start(0);
    };
    // All of it, or none of it, once the cluster settled.
    let settled = |name: &str| {
        let check = || {
            let keys = lab.etcd_keys(&format!("/vroom/instances/{name}"));
            let ips: Vec<String> = lab
                .etcd_keys("/vroom/ips/")
                .into_iter()
                .filter(|k| !k.is_empty())
                .collect();
            let qemus: usize = (0..2)
                .map(|i| usize::from(lab.runs(i, name).is_some()))
                .sum();
            let local: usize = (0..2)
                .map(|i| usize::from(lab.vroom(i, &["inspect", name]).status.success()))
                .sum();
            (keys.len(), ips.len(), qemus, local)
        };
        let state = poll(Duration::from_secs(40), || {
            let s = check();
            matches!(s, (0, 0, 0, 0) | (1, 1, 1, _)).then_some(s)
        });
        assert!(
            state.is_some(),
            "{name} half there: (records, addresses, qemus, listed) = {:?}\n{}\n{}",
            check(),
            lab.log(0),
            lab.log(1)
        );
        state.unwrap()
    };
    for (k, ms) in [30u64, 300, 1500, 4000].into_iter().enumerate() {
        let name = format!("c{k}");
        kill_n1_after(
            [
                "run", "hello", "--name", &name, "--ha", "restart", "--node", "n2",
            ]
            .map(String::from)
            .to_vec(),
            Duration::from_millis(ms),
        );
        let (records, ..) = settled(&name);
        eprintln!(
            "run killed after {ms} ms: {}",
            if records == 1 {
                "it runs"
            } else {
                "nothing left"
            }
        );
        if records == 0 {
            continue;
        }
        kill_n1_after(
            ["rm", "--force", &name].map(String::from).to_vec(),
            Duration::from_millis(ms),
        );
        let (records, ..) = settled(&name);
        eprintln!(
            "rm killed after {ms} ms: {}",
            if records == 1 { "it runs" } else { "removed" }
        );
        if records == 1 {
            lab.ok(0, &["rm", "--force", &name]);
            settled(&name);
        }
    }
    // Nothing a kill left stands in the way of the next run (a bridge made
    // just before a kill once blocked every later one).
    lab.ok(
        0,
        &[
            "run", "hello", "--name", "after", "--ha", "restart", "--node", "n1",
        ],
    );
    assert!(lab.runs(0, "after").is_some());
}

/// A network spans the nodes that host its members: a guest on n1 reaches a
/// guest on n2 at its address (VXLAN between the nodes), while each node
/// stays its own guests' gateway.
#[test]
fn a_network_spans_the_nodes() {
    let _quiet = quiet_host();
    let lab = new_lab(2);
    // Built on n1 only: n2 fetches it from n1 by id, and checks it.
    lab.ok(0, &["image", "build", &common::recipe("hello")]);
    lab.ok(0, &["run", "hello", "--name", "g1", "--node", "n1"]);
    let g1: serde_json::Value =
        serde_json::from_str(&lab.ok(0, &["--json", "inspect", "g1"])).unwrap();
    let built = g1["image_id"].as_str().unwrap().to_string();
    // Asked on n2 by the id n1 built: n2 fetches it, not "not built here".
    lab.ok(1, &["run", &built, "--name", "g2", "--node", "n2"]);
    let id = |i: usize| {
        let v: serde_json::Value =
            serde_json::from_str(&lab.ok(i, &["--json", "inspect", "g2"])).unwrap();
        v["image_id"].as_str().unwrap_or_default().to_string()
    };
    let images = lab.ok(1, &["--json", "image", "ls"]);
    assert!(
        !id(1).is_empty() && images.contains(&id(1)),
        "n2 has the image g2 runs: {images}"
    );
    assert!(lab.log(1).contains("fetched an image from a peer"));

    // The API from another host: mutual TLS with the cluster's CA. A
    // node's own certificate works from its host; a workstation gets one
    // from `cluster credentials`; a certificate of another CA is refused.
    let remote = |tls: &Path, args: &[&str]| {
        Command::new(vroom_bin())
            .env("VROOM_DATA_DIR", lab.dir.join("nowhere"))
            .args(["--host", &lab.nodes[0].ip, "--tls-dir"])
            .arg(tls)
            .args(args)
            .output()
            .unwrap()
    };
    let out = remote(&lab.nodes[1].dir.join("tls"), &["ps"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("g1") && listed.contains("g2"),
        "ps over TLS: {listed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mine = lab.dir.join("mine");
    lab.ok(
        0,
        &[
            "cluster",
            "credentials",
            "--etcd",
            &lab.endpoints(),
            "--out",
            mine.to_str().unwrap(),
        ],
    );
    let out = remote(&mine, &["--json", "node", "ls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stranger = lab.dir.join("stranger");
    vroom_cluster::tls::Ca::generate("not-this-one")
        .unwrap()
        .issue("me", &["me".into()], &stranger)
        .unwrap();
    std::fs::copy(mine.join("ca.pem"), stranger.join("ca.pem")).unwrap();
    for (dir, what) in [
        (&stranger, "another CA's certificate"),
        (&lab.dir.join("none"), "no certificate"),
    ] {
        let out = remote(dir, &["ps"]);
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!out.status.success(), "{what} got in");
        assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
        eprintln!("{what}: {err}");
    }
    let ip2 = ip_of(&lab, 1, "g2");
    let url = format!("http://{ip2}/");
    let reached = poll(Duration::from_secs(20), || {
        let out = lab.vroom(
            0,
            &["exec", "--timeout", "5", "g1", "--", "wget", "-qO-", &url],
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert!(
        reached.is_some(),
        "g1 on n1 cannot reach g2 on n2 at {ip2}\n{}\n{}",
        lab.log(0),
        lab.log(1)
    );
    // Each guest's gateway is its own node's bridge, never another's.
    for (i, guest) in [(0, "g1"), (1, "g2")] {
        let net: serde_json::Value =
            serde_json::from_str(&lab.ok(i, &["--json", "net", "inspect", "default"])).unwrap();
        let bridge = net["bridge"].as_str().unwrap();
        let gateway = vroom_core::ipam::gateway(net["subnet"].as_str().unwrap().parse().unwrap());
        let link = Command::new("ip")
            .args(["-n", &lab.nodes[i].ns, "-o", "link", "show", bridge])
            .output()
            .unwrap();
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        let mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap()
            .to_string();
        let vxlan = vroom_core::ipam::vxlan_name(bridge);
        let table = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.nodes[i].ns,
                "nft",
                "list",
                "table",
                "bridge",
            ])
            .arg(format!("vroomvx_{vxlan}"))
            .output()
            .unwrap();
        assert!(
            table.status.success(),
            "no gateway ARP filter on {}: {}\n{}",
            lab.nodes[i].name,
            String::from_utf8_lossy(&table.stderr),
            lab.log(i)
        );
        // The host drops the ping (guests reach the host only on opened
        // ports), but the guest resolves the gateway's address first.
        lab.vroom(
            i,
            &[
                "exec",
                guest,
                "--",
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                &gateway.to_string(),
            ],
        );
        let arp = lab.ok(i, &["exec", guest, "--", "cat", "/proc/net/arp"]);
        let entry = arp
            .lines()
            .find(|l| l.split_whitespace().next() == Some(gateway.to_string().as_str()))
            .unwrap_or_else(|| panic!("{guest} has no ARP entry for {gateway}: {arp}"));
        assert!(
            entry.contains(&mac),
            "{guest}'s gateway is not its own node's bridge ({mac}): {entry}"
        );
    }
}

/// What only the guest's memory holds: its boot id and a file on its tmpfs.
fn memory_of(lab: &Lab, i: usize, instance: &str) -> String {
    lab.ok(
        i,
        &[
            "exec",
            instance,
            "--",
            "sh",
            "-c",
            "cat /proc/sys/kernel/random/boot_id /run/marker",
        ],
    )
}

/// Waits until `instance` runs on node `on` alone and answers there.
fn runs_only_on(lab: &Lab, on: usize, instance: &str, ip: &str) {
    let nodes = lab.nodes.len();
    let alone = poll(Duration::from_secs(20), || {
        let elsewhere = (0..nodes).any(|i| i != on && lab.runs(i, instance).is_some());
        (!elsewhere && lab.runs(on, instance).is_some() && lab.page_from(on, ip).is_some())
            .then_some(())
    });
    if alone.is_none() {
        let ns = &lab.nodes[on].ns;
        let show = |cmd: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("ip netns exec {ns} {cmd}"))
                .output()
                .unwrap();
            format!("$ {cmd}\n{}", String::from_utf8_lossy(&out.stdout))
        };
        panic!(
            "{instance} does not run on {} alone: {:?}\n{}\n{}\n{}\n--- its log:\n{}",
            lab.nodes[on].name,
            (0..nodes)
                .map(|i| lab.runs(i, instance))
                .collect::<Vec<_>>(),
            show("ip neigh"),
            show("bridge fdb show"),
            show("ip -br link"),
            lab.log(on)
        );
    }
}

/// `vroom migrate` moves a running instance between nodes with its memory,
/// config volume, address and MAC: asked from any node, there and back, and
/// by `node drain`, and one that fails its health check too. Bad requests
/// change nothing.
#[test]
fn an_instance_migrates_live_with_its_memory_and_address() {
    let _quiet = quiet_host();
    let lab = Arc::new(new_lab(3));
    let hello = common::recipe("hello");
    for i in 0..3 {
        lab.ok(i, &["image", "build", &hello]);
    }
    lab.ok(0, &["run", "hello", "--name", "client", "--node", "n1"]);
    lab.ok(
        0,
        &[
            "run", "hello", "--name", "m", "--node", "n2", "--ha", "restart",
        ],
    );
    let ip = ip_of(&lab, 1, "m");
    failed_over(&lab, 1, "m", &ip, Duration::from_secs(60));
    lab.ok(
        1,
        &[
            "exec",
            "m",
            "--",
            "sh",
            "-c",
            "echo only-in-memory > /run/marker",
        ],
    );
    lab.ok(1, &["config", "m", "set", "greeting=carried-along"]);
    lab.ok(
        1,
        &[
            "exec",
            "m",
            "--",
            "sh",
            "-c",
            "echo written-on-n2 > /dev/ttyS0",
        ],
    );
    let memory = memory_of(&lab, 1, "m");
    let sampler = Sampler::start(&lab, "m");

    // Asked on n1, which is neither end.
    let said = sampler.migration(&lab, "m", || lab.ok(0, &["migrate", "m", "--to", "n3"]));
    eprintln!("{}", said.trim());
    assert!(said.contains("from n2 to n3"), "{said}");
    runs_only_on(&lab, 2, "m", &ip);
    assert_eq!(memory_of(&lab, 2, "m"), memory, "the guest's memory moved");
    let page = lab.page_from(2, &ip).unwrap_or_default();
    assert!(
        page.contains("carried-along"),
        "the config volume moved: {page}"
    );
    // The client on n1 reaches it at its address on n3 (over VXLAN).
    let reached = poll(Duration::from_secs(10), || {
        lab.vroom(
            0,
            &[
                "exec",
                "--timeout",
                "5",
                "client",
                "--",
                "wget",
                "-qO-",
                &format!("http://{ip}/"),
            ],
        )
        .status
        .success()
        .then_some(())
    });
    assert!(reached.is_some(), "the client lost m after the move");
    let shown = lab.ok(0, &["ps"]);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("m ") && l.contains("n3")),
        "{shown}"
    );
    assert!(lab.etcd_keys("/vroom/migrations/").is_empty());
    // Its console log moved with it (issue 23 #22: `vroom logs` on the
    // destination showed only what the guest wrote there).
    let logs = poll(Duration::from_secs(15), || {
        let logs = lab.ok(2, &["logs", "m"]);
        logs.contains("written-on-n2").then_some(logs)
    });
    assert!(logs.is_some(), "the console log stayed on n2");

    // A guest that fails its health check (its loopback down: the check
    // connects to 127.0.0.1:80) still moves: its destination asks of it
    // what it showed on the source, an answer of its agent (review of
    // issue 23: such an instance could never move, nor be drained). A
    // guest that does not answer once it runs on the destination is given
    // back; the engine's tests cover that (no guest here can fail only
    // after it moved).
    lab.ok(2, &["exec", "m", "--", "ip", "link", "set", "lo", "down"]);
    sampler.migration(&lab, "m", || lab.ok(0, &["migrate", "m", "--to", "n2"]));
    runs_only_on(&lab, 1, "m", &ip);
    assert_eq!(
        memory_of(&lab, 1, "m"),
        memory,
        "the same VM runs on, not a new boot"
    );
    lab.ok(1, &["exec", "m", "--", "ip", "link", "set", "lo", "up"]);
    sampler.migration(&lab, "m", || lab.ok(0, &["migrate", "m", "--to", "n3"]));
    runs_only_on(&lab, 2, "m", &ip);
    let clean = poll(Duration::from_secs(10), || {
        lab.etcd_keys("/vroom/migrations/").is_empty().then_some(())
    });
    assert!(clean.is_some(), "a migration record was left behind");

    // Bad requests: one line, and nothing moves.
    let err = lab.fail(0, &["migrate", "m", "--to", "n3"]);
    assert!(err.contains("already runs on n3"), "{err}");
    let err = lab.fail(0, &["migrate", "m", "--to", "nowhere"]);
    assert!(err.contains("nowhere"), "{err}");
    let err = lab.fail(0, &["migrate", "ghost", "--to", "n1"]);
    assert!(err.contains("ghost"), "{err}");
    lab.ok(0, &["node", "cordon", "n1"]);
    let err = lab.fail(2, &["migrate", "m", "--to", "n1"]);
    assert!(err.contains("cordoned"), "{err}");
    lab.ok(0, &["node", "uncordon", "n1"]);
    // Another migration of it under way (its token is stale, so no node
    // carries it out).
    assert!(lab.etcd_put(
        "/vroom/migrations/m",
        r#"{"id":"x","from":"n3","to":"n1","token":1,"secret":"s","requested_at":0,"state":{"state":"requested"}}"#
    ));
    let err = lab.fail(1, &["migrate", "m", "--to", "n1"]);
    assert!(err.contains("being migrated"), "{err}");
    assert!(lab.etcd_delete("/vroom/migrations/m"));
    runs_only_on(&lab, 2, "m", &ip);
    assert_eq!(memory_of(&lab, 2, "m"), memory);

    // Back to n2, asked there; then n2 drained: it moves live again.
    sampler.migration(&lab, "m", || lab.ok(1, &["migrate", "m", "--to", "n2"]));
    runs_only_on(&lab, 1, "m", &ip);
    sampler.migration(&lab, "m", || lab.ok(0, &["node", "drain", "n2"]));
    let moved_to = poll(Duration::from_secs(20), || {
        [0, 2].into_iter().find(|&i| lab.runs(i, "m").is_some())
    })
    .expect("the drain moved m");
    runs_only_on(&lab, moved_to, "m", &ip);
    assert_eq!(
        memory_of(&lab, moved_to, "m"),
        memory,
        "the drain moved m live"
    );
    lab.ok(0, &["node", "uncordon", "n2"]);
    sampler.assert_never_twice("migrations");

    // Every node's events are readable from any node: n1, which was
    // neither end of the first move, reads n2's (the source's, through
    // n2's API) and n3's (the destination's).
    let events_of = |node: &str| {
        lab.ok(
            0,
            &[
                "events",
                "--json",
                "-n",
                "100",
                "--filter",
                &format!("node={node}"),
                "--filter",
                "kind=migration",
                "--filter",
                "name=m",
            ],
        )
    };
    let from_n2 = events_of("n2");
    assert!(
        from_n2.contains(r#""action":"completed""#)
            && from_n2.contains(r#""node":"n2""#)
            && from_n2.contains("downtime_ms"),
        "{from_n2}"
    );
    let from_n3 = events_of("n3");
    assert!(from_n3.contains(r#""action":"arrived""#), "{from_n3}");
    assert!(!from_n3.contains(r#""node":"n2""#), "{from_n3}");
    let err = lab.fail(0, &["events", "--filter", "node=n9"]);
    assert!(err.contains(r#"no node named "n9""#), "{err}");

    // And as one stream, by time: n2's start of the first move comes
    // before n3's arrival, each line naming its node.
    let merged = lab.ok(
        0,
        &[
            "events",
            "--all-nodes",
            "--json",
            "-n",
            "100",
            "--filter",
            "kind=migration",
            "--filter",
            "name=m",
        ],
    );
    let lines: Vec<serde_json::Value> = merged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = |node: &str, action: &str| {
        lines
            .iter()
            .position(|e| e["node"] == node && e["action"] == action)
            .unwrap_or_else(|| panic!("no {action} from {node} in {merged}"))
    };
    assert!(first("n2", "started") < first("n3", "arrived"), "{merged}");
    let times: Vec<&str> = lines.iter().map(|e| e["time"].as_str().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "not by time: {merged}"
    );
    let err = lab.fail(0, &["events", "--all-nodes", "--since", "7"]);
    assert!(err.contains("resumes from a cursor"), "{err}");

    // The dashboard over the cluster's mutual TLS, from n1 to n2: the
    // overview lists the nodes and every node's recent events.
    let tls = lab.nodes[0].dir.join("tls");
    let url = format!(
        "https://{}:{}/ui/",
        lab.nodes[1].ip,
        vroom_client::tls::API_PORT
    );
    let curl = |url: &str, cert: bool| {
        let mut cmd = std::process::Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &lab.nodes[0].ns,
            "curl",
            "-sS",
            "--max-time",
            "20",
        ]);
        cmd.arg("--cacert").arg(tls.join("ca.pem"));
        if cert {
            cmd.arg("--cert").arg(tls.join("cert.pem"));
            cmd.arg("--key").arg(tls.join("key.pem"));
        }
        cmd.arg(url);
        cmd.output().unwrap()
    };
    let page = curl(&url, true);
    let html = String::from_utf8_lossy(&page.stdout);
    assert!(
        page.status.success(),
        "{}",
        String::from_utf8_lossy(&page.stderr)
    );
    for node in ["n1", "n2", "n3"] {
        assert!(
            html.contains(&format!(r#"data-node="{node}""#)),
            "{node} missing: {html}"
        );
    }
    assert!(
        html.contains("arrived"),
        "n3's events are not on n2's overview: {html}"
    );
    assert!(
        !curl(&url, false).status.success(),
        "served without a client certificate"
    );
}

/// Moves under traffic on a loaded host (issue 23 #3: a client connecting
/// every 10 ms and busy loops on every CPU; some moves reported success
/// while the guest hung or its QEMU died). A handful of moves: each either
/// succeeds and the guest answers on the destination (agent and page), or
/// fails and the guest answers where it was; never a success that lost it.
#[test]
fn moves_under_traffic_on_a_loaded_host_never_lose_the_guest() {
    // Its busy loops would starve the other tests' etcd and guests.
    let _alone = vroom_base::RwLockExt::write_unpoisoned(&HOST_LOAD);
    use vroom_lab::{BusyLoops, Prober};
    let lab = two_nodes_with_hello();
    lab.ok(0, &["run", "hello", "--name", "m", "--node", "n1"]);
    let ip = ip_of(&lab, 0, "m");
    failed_over(&lab, 0, "m", &ip, Duration::from_secs(60));
    let net: serde_json::Value =
        serde_json::from_str(&lab.ok(0, &["--json", "net", "inspect", "default"])).unwrap();
    let subnet = net["subnet"].as_str().unwrap();
    let client = format!("{}.250/24", subnet.rsplit_once('.').unwrap().0);
    let ns = lab
        .plug_client(0, net["bridge"].as_str().unwrap(), &client)
        .unwrap();
    let prober = Prober::start(&ns, format!("{ip}:80").parse().unwrap()).unwrap();
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let load = BusyLoops::start(3 * cpus, Duration::from_secs(300)).unwrap();
    let sampler = Sampler::start(&lab, "m");
    let mut at = 0;
    let mut moved = 0;
    for k in 0..4 {
        let to = 1 - at;
        let out = sampler.migration(&lab, "m", || {
            lab.vroom(0, &["migrate", "m", "--to", &lab.nodes[to].name])
        });
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let expected = if out.status.success() { to } else { at };
        let answered = poll(Duration::from_secs(15), || {
            lab.guest_answers(expected, "m", &ip).ok()
        });
        assert!(
            answered.is_some(),
            "move {k} ({said}) left m not answering on {}: {}\n{}\n{}",
            lab.nodes[expected].name,
            lab.guest_answers(expected, "m", &ip).unwrap_err(),
            lab.log(at),
            lab.log(to)
        );
        runs_only_on(&lab, expected, "m", &ip);
        eprintln!("move {k}: {said}");
        moved += usize::from(out.status.success());
        at = expected;
    }
    drop(load);
    let last = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let answered = prober.finish();
    assert!(
        answered.iter().any(|t| *t > last),
        "the 10 ms client was not answered after the moves"
    );
    assert!(moved > 0, "no move succeeded on the loaded host");
    sampler.assert_never_twice("moves on a loaded host");
}

/// A vroomd killed in the middle of a migration, at either end: afterwards
/// the instance runs exactly once, answers, and no migration is left.
#[test]
fn a_daemon_killed_inside_a_migration_leaves_one_instance() {
    let _quiet = quiet_host();
    let lab = Arc::new(new_lab(3));
    let hello = common::recipe("hello");
    for i in 0..3 {
        lab.ok(i, &["image", "build", &hello]);
    }
    lab.ok(
        0,
        &[
            "run", "hello", "--name", "m", "--node", "n1", "--ha", "restart",
        ],
    );
    let ip = ip_of(&lab, 0, "m");
    failed_over(&lab, 0, "m", &ip, Duration::from_secs(60));
    let sampler = Sampler::start(&lab, "m");
    let mut at = 0;
    for (victim_is_source, ms) in [
        (true, 100u64),
        (false, 100),
        (true, 250),
        (false, 250),
        (true, 400),
        (false, 400),
    ] {
        let to = (at + 1) % 2;
        let victim = if victim_is_source { at } else { to };
        let out = sampler.migration(&lab, "m", || {
            let child = lab
                .command(2)
                .args(["migrate", "m", "--to", &lab.nodes[to].name])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(ms));
            lab.kill_daemon(victim);
            lab.start(victim);
            child.wait_with_output().unwrap()
        });
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // Wherever it ended up, it runs there alone.
        let on = poll(Duration::from_secs(30), || {
            let on: Vec<usize> = (0..3).filter(|&i| lab.runs(i, "m").is_some()).collect();
            (on.len() == 1 && lab.page_from(on[0], &ip).is_some()).then(|| on[0])
        });
        let Some(on) = on else {
            panic!(
                "m does not run once after killing {}'s vroomd {ms} ms into a migration ({said})\n{}\n{}",
                lab.nodes[victim].name,
                lab.log(at),
                lab.log(to)
            );
        };
        eprintln!(
            "killed {} ({}) {ms} ms in: {said}; m runs on {}",
            lab.nodes[victim].name,
            if victim_is_source {
                "source"
            } else {
                "destination"
            },
            lab.nodes[on].name
        );
        // A success is a live move to `to`; a failure (the source kept
        // it, or a move cut short after the hand-over restarted it) names
        // the node where it runs.
        if out.status.success() {
            assert_eq!(
                on, to,
                "a migration that succeeded left m elsewhere: {said}"
            );
        } else {
            let node = &lab.nodes[on].name;
            assert!(
                said.contains(&format!("it runs on {node}"))
                    || said.contains(&format!("restarted it on {node}")),
                "a failed migration must say where m runs ({}): {said}",
                lab.nodes[on].name
            );
        }
        let clean = poll(Duration::from_secs(10), || {
            lab.etcd_keys("/vroom/migrations/").is_empty().then_some(())
        });
        assert!(clean.is_some(), "a migration record was left behind");
        at = on;
    }
    sampler.assert_never_twice("migrations with a daemon killed");
}

/// `--ha standby`: every node keeps a warm snapshot of the image, and a
/// failover starts the instance from it (not a boot), with its address and
/// replicated config, within the 5 s budget. Then drains of its node: with
/// the only other node cordoned one is refused (s1 runs on, untouched),
/// `--force` leaves it running, and with a node to go to it moves.
#[test]
fn a_standby_instance_fails_over_from_a_warm_snapshot() {
    let _quiet = quiet_host();
    let lab = two_nodes_with_hello();
    lab.ok(
        0,
        &[
            "run", "hello", "--name", "s1", "--ha", "standby", "--node", "n1",
        ],
    );
    let ip = ip_of(&lab, 0, "s1");
    failed_over(&lab, 0, "s1", &ip, Duration::from_secs(60));
    lab.ok(0, &["config", "s1", "set", "greeting=warm-and-replicated"]);
    let warm = poll(Duration::from_secs(120), || {
        lab.ok(1, &["--json", "snapshot", "ls", "--warm"])
            .contains("\"hello\"")
            .then_some(())
    });
    assert!(warm.is_some(), "n2 never warmed hello\n{}", lab.log(1));
    let sampler = Sampler::start(&lab, "s1");
    lab.power_loss(0);
    let took = failed_over(&lab, 1, "s1", &ip, Duration::from_secs(30));
    eprintln!("standby: s1 answered from n2 {took:?} after the power loss");
    let shown: serde_json::Value =
        serde_json::from_str(&lab.ok(1, &["--json", "inspect", "s1"])).unwrap();
    let from = shown["status"]["started_from"].as_str().unwrap_or_default();
    assert!(from.starts_with("warm"), "s1 booted instead: {shown}");
    let page = lab.page_from(1, &ip).unwrap_or_default();
    assert!(page.contains("warm-and-replicated"), "{page}");
    sampler.assert_never_twice("standby failover");

    // n1 back, but cordoned: a drain of n2 has nowhere to put s1. It is
    // refused, says why, and changes nothing.
    lab.start(0);
    let back = poll(Duration::from_secs(15), || {
        lab.ok(1, &["--json", "node", "inspect", "n1"])
            .contains("\"alive\": true")
            .then_some(())
    });
    assert!(back.is_some(), "n1 did not come back: {}", lab.log(0));
    lab.ok(1, &["node", "cordon", "n1"]);
    let pid = lab.runs(1, "s1").expect("s1 runs on n2");
    let err = lab.fail(1, &["node", "drain", "n2"]);
    assert!(
        err.contains(
            "cannot drain n2: no other node is ready and uncordoned (n1 cordoned) for s1 \
             (--ha standby); uncordon or add a node, or use --force to leave them running here"
        ),
        "{err}"
    );
    let still_running = |context: &str| {
        // Long enough for a release, a stop or a takeback to show.
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(lab.runs(1, "s1"), Some(pid), "{context}: s1 was restarted");
        let shown: serde_json::Value =
            serde_json::from_str(&lab.ok(0, &["--json", "inspect", "s1"])).unwrap();
        assert_eq!(shown["status"]["state"], "running", "{context}: {shown}");
        assert_eq!(shown["status"]["pid"], pid, "{context}: {shown}");
    };
    still_running("a refused drain");
    let n2: serde_json::Value =
        serde_json::from_str(&lab.ok(0, &["--json", "node", "inspect", "n2"])).unwrap();
    assert_eq!(n2["cordoned"], false, "a refused drain cordoned n2");

    // --force: n2 is cordoned, s1 runs on there, and the drain says so.
    let said = lab.ok(1, &["node", "drain", "n2", "--force"]);
    eprintln!("{}", said.trim());
    assert!(
        said.contains("left s1 running on n2: no other node is ready and uncordoned (n1 cordoned)"),
        "{said}"
    );
    assert!(
        said.contains("cordoned n2: 0 moved, 1 left running"),
        "{said}"
    );
    still_running("a forced drain");
    let n2: serde_json::Value =
        serde_json::from_str(&lab.ok(0, &["--json", "node", "inspect", "n2"])).unwrap();
    assert_eq!(n2["cordoned"], true, "{n2}");

    // A node to go to: the drain moves s1, and says where.
    lab.ok(1, &["node", "uncordon", "n1"]);
    let said = sampler.migration(&lab, "s1", || lab.ok(1, &["node", "drain", "n2"]));
    eprintln!("{}", said.trim());
    assert!(said.contains("moved s1 from n2 to n1"), "{said}");
    assert!(said.contains("drained n2: 1 moved"), "{said}");
    runs_only_on(&lab, 0, "s1", &ip);
    sampler.assert_never_twice("drains");
}

/// A splice moves with its VM: a live migration and a failover each make
/// the firewall again on the VM's new node, with its config, in the path
/// before the VM's first packet there; the node it left keeps nothing.
#[test]
fn a_splice_moves_with_its_vm() {
    let _quiet = quiet_host();
    let lab = Arc::new(new_lab(2));
    lab.ok(0, &["image", "build", &common::recipe("hello")]);
    // Only n1 has the firewall's image: n2 fetches it by id.
    lab.ok(0, &["image", "build", &common::recipe("l2-firewall")]);
    lab.ok(
        0,
        &[
            "run", "hello", "--name", "w", "--node", "n1", "--ha", "restart",
        ],
    );
    let ip = ip_of(&lab, 0, "w");
    failed_over(&lab, 0, "w", &ip, Duration::from_secs(60));
    lab.ok(0, &["splice", "l2-firewall", "--in-front-of", "w"]);
    let fw = "w-l2-firewall";
    // New connections to port 80 are the firewall's to drop: a page that
    // does not come proves the path goes through it.
    let blocked = |i: usize| {
        poll(Duration::from_secs(15), || {
            lab.page_from(i, &ip).is_none().then_some(())
        })
        .is_some()
    };
    let open = |i: usize| poll(Duration::from_secs(15), || lab.page_from(i, &ip)).is_some();
    lab.ok(0, &["config", fw, "set", "block_tcp=80"]);
    assert!(blocked(0), "the firewall on n1 let port 80 through");
    let splice_on = |i: usize| -> Option<serde_json::Value> {
        let all: serde_json::Value =
            serde_json::from_str(&lab.ok(i, &["--json", "splices"])).unwrap();
        all.as_array()?
            .iter()
            .find(|s| s["appliance"] == fw && s["vm"] == "w")
            .cloned()
    };
    let sampler = Sampler::start(&lab, "w");

    // Live: the firewall is up on n2 before w switches over.
    let said = sampler.migration(&lab, "w", || lab.ok(0, &["migrate", "w", "--to", "n2"]));
    eprintln!("{}", said.trim());
    let moved = splice_on(1).expect("the splice is on n2");
    assert_eq!(moved["state"], "active", "{moved}");
    assert!(lab.runs(1, fw).is_some(), "the firewall runs on n2");
    assert!(lab.runs(0, fw).is_none(), "the firewall left n1");
    assert!(splice_on(0).is_none(), "n1 keeps no splice");
    let shown = lab.ok(1, &["config", fw, "get", "block_tcp"]);
    assert!(shown.contains("80"), "its config came: {shown}");
    assert!(lab.runs(1, "w").is_some() && lab.runs(0, "w").is_none());
    assert!(blocked(1), "w is reachable on n2 around its firewall");
    // A record lost between a change and its write (a crash) is written
    // again from what runs on the owner.
    let record = "/vroom/splices/w";
    assert!(lab.etcd_delete(record));
    let rewritten = poll(Duration::from_secs(20), || {
        lab.etcd_keys(record)
            .contains(&record.to_string())
            .then_some(())
    });
    assert!(
        rewritten.is_some(),
        "n2 did not record w's splices again\n{}",
        lab.log(1)
    );
    lab.ok(1, &["config", fw, "set", "block_tcp="]);
    if !open(1) {
        let ns = &lab.nodes[1].ns;
        let links = Command::new("sh")
            .arg("-c")
            .arg(format!("ip -n {ns} -br link; bridge -n {ns} link"))
            .output()
            .unwrap();
        panic!(
            "w does not answer through its firewall on n2\n{}\n{}\n{}\n{}",
            String::from_utf8_lossy(&links.stdout),
            lab.ok(1, &["splices"]),
            lab.ok(1, &["exec", fw, "--", "nft", "list", "ruleset"]),
            lab.ok(1, &["--json", "inspect", "w"]),
        );
    }

    // Power loss: w restarts on n1 behind its firewall, made again there
    // with the config it had (port 80 blocked again just before).
    lab.ok(1, &["config", fw, "set", "block_tcp=80"]);
    assert!(blocked(1));
    lab.power_loss(1);
    let back = poll(Duration::from_secs(60), || {
        (lab.runs(0, "w").is_some() && lab.runs(0, fw).is_some()).then_some(())
    });
    assert!(
        back.is_some(),
        "w and its firewall did not come back on n1\n{}",
        lab.log(0)
    );
    let ready = poll(Duration::from_secs(60), || {
        lab.vroom(0, &["exec", "w", "--", "/bin/busybox", "true"])
            .status
            .success()
            .then_some(())
    });
    assert!(ready.is_some(), "w never became ready on n1");
    let remade = splice_on(0).expect("the splice is on n1 again");
    assert_eq!(remade["state"], "active", "{remade}");
    assert!(
        blocked(0),
        "w came back on n1 without its firewall's config"
    );
    lab.ok(0, &["config", fw, "set", "block_tcp="]);
    assert!(open(0), "w does not answer through its firewall on n1");
    sampler.assert_never_twice("a spliced VM's moves");
}

/// Says `hello` as one raw line, without the handshake's proof, to node
/// `to`'s peer port: from node `from`'s namespace (its own address), or
/// from the host (`None`: the underlay's `.1`, no node's). Returns all
/// that came back before the node closed the connection.
fn unproven_hello(lab: &Lab, from: Option<usize>, to: usize, hello: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf '%s\\n' \"$0\" >&3 && timeout 10 cat <&3",
        lab.nodes[to].ip,
        vroom_cluster::node::PEER_PORT
    );
    let mut cmd = match from {
        Some(i) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &lab.nodes[i].ns, "bash"]);
            cmd
        }
        None => Command::new("bash"),
    };
    let out = cmd.args(["-c", &script, hello]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that node `to` refused an unproven hello (`answer` is what came
/// back): a challenge, then the verdict, and nothing of what was asked.
fn assert_refused(lab: &Lab, to: usize, answer: &str, what: &str) {
    let lines: Vec<&str> = answer.lines().collect();
    assert!(
        lines.len() == 2
            && lines[0].contains(r#""nonce":"#)
            && lines[1] == r#"{"verdict":"refused","reason":"not authenticated"}"#,
        "{what}: node {} answered {answer:?}",
        lab.nodes[to].name
    );
}

/// While node `replica` serves its copy of `volume` to node `primary`, no
/// raw NBD client reaches that copy from the network: its `qemu-nbd` has
/// no TCP listener in the replica's namespace, and `qemu-img info` of the
/// export from the primary's own address (the best placed stranger) fails
/// on every TCP port the replica's namespace listens on.
fn assert_copy_unreachable(lab: &Lab, primary: usize, replica: usize, volume: &str) {
    assert!(
        !lab.nbd_servers(replica).is_empty(),
        "{} serves no copy: nothing to probe",
        lab.nodes[replica].name
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.nodes[replica].ns, "ss", "-Hltnp"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listeners = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !listeners.contains("qemu-nbd"),
        "a replica's server listens on TCP:\n{listeners}"
    );
    let ports: std::collections::BTreeSet<String> = listeners
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter(|local| !local.starts_with("127.") && !local.starts_with("[::1]"))
        .filter_map(|local| local.rsplit_once(':').map(|(_, port)| port.to_string()))
        .collect();
    assert!(
        ports.contains(&vroom_cluster::node::PEER_PORT.to_string()),
        "the peer port is not among {ports:?}:\n{listeners}"
    );
    for port in &ports {
        let url = format!("nbd://{}:{port}/replica-{volume}", lab.nodes[replica].ip);
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.nodes[primary].ns])
            .args(["timeout", "5", "qemu-img", "info", &url])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "a raw NBD client read the replica's copy at {url}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A packet capture of the peer port's traffic in node `i`'s namespace,
/// stopped (and its file read) by [`Capture::stop`] or on drop.
struct Capture {
    tcpdump: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(lab: &Lab, i: usize) -> Capture {
        let file = lab.nodes[i].dir.join("peer-port.pcap");
        let mut tcpdump = Command::new("ip")
            .args(["netns", "exec", &lab.nodes[i].ns])
            // Immediate mode: packets are written as they come, not when
            // a ring block fills (a stopped capture would miss them).
            .args([
                "tcpdump",
                "-i",
                "eth0",
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .args(["tcp", "port", &vroom_cluster::node::PEER_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump is needed for this test");
        // It says so on stderr once it listens.
        let mut err = std::io::BufReader::new(tcpdump.stderr.take().unwrap());
        let mut said = String::new();
        while !said.contains("listening on") {
            let read = std::io::BufRead::read_line(&mut err, &mut said).unwrap();
            assert!(read > 0, "tcpdump did not start: {said}");
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Capture { tcpdump, file }
    }

    /// Stops the capture and returns what it holds (headers and payloads).
    fn stop(mut self) -> Vec<u8> {
        signal(self.tcpdump.id(), libc::SIGINT);
        let _ = self.tcpdump.wait();
        std::fs::read(&self.file).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.tcpdump.kill();
        let _ = self.tcpdump.wait();
    }
}

#[test]
fn a_replicated_volume_fails_over_with_every_acknowledged_write() {
    let _quiet = quiet_host();
    let lab = two_nodes_with_hello();
    // A volume kept on two nodes: this node's copy is the primary.
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
    let (primary, replica, state, epoch) = replication_of(&lab, 1, "data").unwrap();
    assert_eq!((primary.as_str(), replica.as_str(), epoch), ("n1", "n2", 1));
    assert_eq!(
        state, "outdated",
        "a replica is not up to date before its first copy"
    );
    // The peer port acts on no hello without its proof, even one from the
    // primary's own address: n2 makes no copy of `data` and serves none
    // (an outdated replica is emptied and served to its primary), and
    // sends no image to a host that is no node.
    let replica = r#"{"kind":"replica","volume":"data","primary":"n1","empty":true}"#;
    let answer = unproven_hello(&lab, Some(0), 1, replica);
    assert_refused(&lab, 1, &answer, "a replica asked for without a proof");
    let images: serde_json::Value =
        serde_json::from_str(&lab.ok(1, &["--json", "image", "ls"])).unwrap();
    let image = images[0]["id"].as_str().unwrap();
    let answer = unproven_hello(
        &lab,
        None,
        1,
        &format!(r#"{{"kind":"image","id":"{image}"}}"#),
    );
    assert_refused(&lab, 1, &answer, "an image asked for without a proof");
    let out = lab.ok(1, &["--json", "volume", "inspect", "data"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"].as_str(), Some(""), "n2 made a copy of data: {out}");
    assert!(lab.nbd_servers(1).is_empty(), "n2 serves a copy");
    let log = lab.log(1);
    for from in [lab.nodes[0].ip.clone(), format!("{}.1", lab.net)] {
        assert!(
            log.lines()
                .any(|l| l.contains("refused a peer connection") && l.contains(&from)),
            "n2 logged no refusal of {from}:\n{log}"
        );
    }
    lab.ok(
        0,
        &[
            "run",
            "hello",
            "--name",
            "h1",
            "--ha",
            "restart",
            "--volume",
            "data:/var/data",
        ],
    );
    let ip = ip_of(&lab, 0, "h1");
    up_to_date(&lab, 0, "data", "n1");
    // The replication stream is encrypted: what a guest writes is not on
    // the wire between the nodes (a capture on the replica's side of the
    // peer port sees the write's traffic, and not its bytes).
    let capture = Capture::start(&lab, 1);
    let marker = format!("marker-{}-written-in-the-guest", std::process::id());
    let script = format!("for i in $(seq 64); do echo {marker}; done > {DATA}/marker && sync");
    lab.ok(0, &["exec", "h1", "--", "/bin/sh", "-c", &script]);
    let captured = capture.stop();
    assert!(
        captured.len() > 64 * marker.len(),
        "the capture saw no replication: {} bytes",
        captured.len()
    );
    assert!(
        !captured
            .windows(marker.len())
            .any(|w| w == marker.as_bytes()),
        "the guest's write crossed the network in plaintext"
    );
    // Rules that hold while it runs.
    let out = lab.vroom(0, &["volume", "rm", "data"]);
    assert!(!out.status.success(), "removed a volume in use");
    lab.ok(
        0,
        &[
            "exec",
            "h1",
            "--",
            "/bin/sh",
            "-c",
            "echo moved > /var/data/moved && sync",
        ],
    );
    // A live migration to the replica's node swaps the roles: nothing is
    // copied, the replica becomes the primary (a new epoch) and the old
    // primary's copy is filled again. And back.
    for (to, from, epoch) in [(1usize, 0usize, 2u64), (0, 1, 3)] {
        let names = ["n1", "n2"];
        lab.ok(from, &["migrate", "h1", "--to", names[to]]);
        runs_only_on(&lab, to, "h1", &ip);
        let out = lab.ok(to, &["exec", "h1", "--", "cat", "/var/data/moved"]);
        assert_eq!(out, "moved\n");
        up_to_date(&lab, to, "data", names[to]);
        let (primary, replica, _, e) = replication_of(&lab, to, "data").unwrap();
        assert_eq!(
            (primary.as_str(), replica.as_str(), e),
            (names[to], names[from], epoch)
        );
    }

    // Rounds of: writes the guest saw complete (each synced) while the
    // primary's node loses power at a random moment; the replica's node
    // takes over with every one of them; the old primary comes back as the
    // replica and is filled again (never merged). Then the other way.
    let mut acked: Vec<u32> = vec![];
    let names = ["n1", "n2"];
    for round in 0..3usize {
        let (p, r) = (round % 2, 1 - round % 2);
        let more = write_until_power_loss(&lab, p, "h1", acked.last().copied().unwrap_or(0), || {});
        acked.extend(more);
        // The CLI on the dead node's data dir starts no daemon of its own
        // (which would run h1 there, outside the cluster).
        let out = lab.vroom(p, &["ps"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("a cluster node's data dir"),
            "{err}"
        );
        let took = failed_over(&lab, r, "h1", &ip, Duration::from_secs(60));
        eprintln!(
            "round {round}: power loss of {}: h1 answered from {} after {took:?}, {} writes acknowledged so far",
            names[p],
            names[r],
            acked.len()
        );
        assert_acknowledged_writes(&lab, r, "h1", &acked, &format!("round {round}"));
        let (primary, replica, state, epoch) = replication_of(&lab, r, "data").unwrap();
        assert_eq!((primary.as_str(), replica.as_str()), (names[r], names[p]));
        assert_eq!(epoch, round as u64 + 4, "a new primary is a new epoch");
        assert_eq!(state, "outdated");
        lab.start(p);
        up_to_date(&lab, r, "data", names[r]);
        assert_eq!(lab.runs(p, "h1"), None, "the old primary ran h1 again");
    }
    let on = 1; // after three rounds: n2
    lab.ok(on, &["stop", "h1"]);
    let (a, b) = (copy_of(&lab, 0, "data"), copy_of(&lab, 1, "data"));
    assert_same_copies(&a, &b, "after the resync");

    // The replica's copy (n1's) recorded outdated, as after a fault: an
    // unproven hello from the primary's address would have it emptied and
    // served. It is refused, and the copy keeps its bytes.
    let record = lab.etcd_get("/vroom/volumes/data").unwrap();
    let outdated = record.replace(r#""state":"up_to_date""#, r#""state":"outdated""#);
    assert_ne!(record, outdated, "{record}");
    assert!(lab.etcd_put("/vroom/volumes/data", &outdated));
    let servers = lab.nbd_servers(0);
    let replica = r#"{"kind":"replica","volume":"data","primary":"n2","empty":true}"#;
    let answer = unproven_hello(&lab, Some(on), 0, replica);
    assert_refused(
        &lab,
        0,
        &answer,
        "an outdated replica asked for without a proof",
    );
    // (The last replication's server may still be there, or gone.)
    let now = lab.nbd_servers(0);
    assert!(
        now.iter().all(|pid| servers.contains(pid)),
        "n1 serves its copy anew: {servers:?} then {now:?}"
    );
    assert_same_copies(&a, &b, "after an unproven hello");
}

#[test]
fn a_replica_that_stops_answering_is_cut_loose_and_never_promoted() {
    let _quiet = quiet_host();
    let lab = two_nodes_with_hello();
    lab.ok(
        0,
        &[
            "volume",
            "create",
            "files",
            "--size",
            "32M",
            "--replicas",
            "2",
        ],
    );
    lab.ok(
        0,
        &[
            "run",
            "hello",
            "--name",
            "h2",
            "--ha",
            "restart",
            "--volume",
            "files:/var/files",
        ],
    );
    let ip = ip_of(&lab, 0, "h2");
    up_to_date(&lab, 0, "files", "n1");
    let write = |what: &str| {
        let script = format!("echo {what} > /var/files/{what} && sync");
        lab.ok(0, &["exec", "h2", "--", "/bin/sh", "-c", &script]);
    };
    // 16 MiB of data: what a full copy would send again.
    lab.ok(
        0,
        &[
            "exec",
            "h2",
            "--",
            "/bin/sh",
            "-c",
            "dd if=/dev/urandom of=/var/files/big bs=1M count=16 2>/dev/null && sync",
        ],
    );
    // The replica's copy is reached only through the primary's proven
    // peer connection (the copies are compared after the partition below,
    // whose resync sends only what the replica missed: a probe that wrote
    // the copy would show there).
    assert_copy_unreachable(&lab, 0, 1, "files");
    // A silent partition of the replication link (the replica's peer port
    // dropped in its namespace: the replication runs on the connection
    // that asked for it): the write is held, the replica recorded
    // outdated, the guest goes on; once the link is back, the primary
    // fills the replica again.
    let port = vroom_cluster::node::PEER_PORT;
    let ns = &lab.nodes[1].ns;
    let nft = |rule: &str| {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns exec {ns} nft {rule}"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "nft {rule}");
    };
    nft("add table inet repl");
    nft("add chain inet repl in '{ type filter hook input priority 0; }'");
    nft(&format!("add rule inet repl in tcp dport {port} drop"));
    let started = Instant::now();
    write("partitioned");
    eprintln!(
        "a silent partition held the guest's write {:?}",
        started.elapsed()
    );
    let (_, _, state, _) = replication_of(&lab, 0, "files").unwrap();
    assert_eq!(state, "outdated");
    nft("delete table inet repl");
    // Once the link is back, only what the replica missed is sent.
    up_to_date(&lab, 0, "files", "n1");
    let (incremental, bytes) = last_sync(&lab, 0, "files");
    eprintln!("after the partition the replica caught up with {bytes} bytes (it holds 16 MiB)");
    assert!(incremental && bytes < 4 << 20, "{incremental} {bytes}");
    // And the replica is the primary's copy, byte for byte.
    lab.ok(0, &["stop", "h2"]);
    let (a, b) = (copy_of(&lab, 0, "files"), copy_of(&lab, 1, "files"));
    assert_same_copies(&a, &b, "after the resync");
    lab.ok(0, &["start", "h2"]);
    up_to_date(&lab, 0, "files", "n1");
    write("before");

    // The replica's node freezes (its vroomd and its NBD server): the
    // guest's write is held, then the primary records the replica
    // outdated and goes on alone.
    let servers = lab.nbd_servers(1);
    assert_eq!(servers.len(), 1, "n2 serves one replica");
    lab.freeze(1, true);
    signal(servers[0], libc::SIGSTOP);
    let started = Instant::now();
    write("during");
    let stall = started.elapsed();
    eprintln!("the guest's write was held {stall:?} by a frozen replica");
    assert!(stall < Duration::from_secs(8), "held {stall:?}");
    let (_, _, state, _) = replication_of(&lab, 0, "files").unwrap();
    assert_eq!(
        state, "outdated",
        "the replica that missed a write is not up to date"
    );

    // The primary's node is lost while its replica is outdated: the
    // instance waits for it rather than come up on a copy that misses
    // an acknowledged write.
    lab.power_loss(0);
    signal(servers[0], libc::SIGKILL);
    lab.freeze(1, false);
    let wrongly = poll(Duration::from_secs(12), || lab.runs(1, "h2"));
    assert_eq!(
        wrongly,
        None,
        "h2 was promoted onto an outdated replica: {}",
        lab.log(1)
    );

    // The primary's node comes back: h2 runs there again with every write,
    // and its replica is filled again.
    lab.start(0);
    failed_over(&lab, 0, "h2", &ip, Duration::from_secs(60));
    let cat = [
        "exec",
        "h2",
        "--",
        "cat",
        "/var/files/partitioned",
        "/var/files/before",
        "/var/files/during",
    ];
    let out = poll(Duration::from_secs(10), || {
        let out = lab.vroom(0, &cat);
        out.status.success().then_some(out.stdout)
    })
    .unwrap_or_else(|| panic!("h2 does not run on n1:\n{}", lab.log(0)));
    assert_eq!(
        String::from_utf8_lossy(&out),
        "partitioned\nbefore\nduring\n"
    );
    up_to_date(&lab, 0, "files", "n1");

    // vroomd of the primary is killed and starts again: the VM, its relay
    // and the replica's server outlived it; the new daemon takes that
    // replication over (issue 25: it made a new one, a full copy, before)
    // and nothing is left twice.
    let old_relay = lab.nbd_relays(0);
    assert_eq!(old_relay.len(), 1, "one relay on n1");
    lab.kill_daemon(0);
    lab.start(0);
    let settled = poll(Duration::from_secs(60), || {
        let (p, _, state, epoch) = replication_of(&lab, 0, "files")?;
        let kept = lab.nbd_relays(0) == old_relay;
        let one_server = lab.nbd_servers(1).len() == 1;
        let took = lab.log(0).contains("took over the replication");
        (p == "n1" && state == "up_to_date" && kept && one_server && took).then_some(epoch)
    });
    assert!(
        settled.is_some(),
        "after a restart of n1's vroomd: {:?}, relays {:?}, servers {:?}\n{}",
        replication_of(&lab, 0, "files"),
        lab.nbd_relays(0),
        lab.nbd_servers(1),
        lab.log(0)
    );
    write("restarted");

    // vroomd of the replica's node is killed (the splice of the primary's
    // connection to its server ends with it) and starts again: the
    // primary records the replica outdated before the guest goes on, then
    // sends only what it missed once the node answers.
    lab.kill_daemon(1);
    write("replica-restarted");
    let (_, _, state, _) = replication_of(&lab, 0, "files").unwrap();
    assert_eq!(state, "outdated", "a replica whose stream ended");
    lab.start(1);
    up_to_date(&lab, 0, "files", "n1");
    let (incremental, bytes) = last_sync(&lab, 0, "files");
    eprintln!("after a restart of the replica's vroomd it caught up with {bytes} bytes");
    assert!(incremental && bytes < 4 << 20, "{incremental} {bytes}");
}

/// The gap a relay closes: the replica's server is killed (an error, not
/// silence), and the primary's node loses power a few milliseconds later.
/// Whichever copy the cluster runs the instance from afterwards has every
/// write the guest saw complete.
#[test]
fn a_replica_killed_just_before_the_primary_loses_no_acknowledged_write() {
    let _quiet = quiet_host();
    let lab = two_nodes_with_hello();
    lab.ok(
        0,
        &[
            "volume",
            "create",
            "gap",
            "--size",
            "32M",
            "--replicas",
            "2",
        ],
    );
    let volume = format!("gap:{DATA}");
    lab.ok(
        0,
        &[
            "run", "hello", "--name", "h3", "--ha", "restart", "--volume", &volume,
        ],
    );
    let ip = ip_of(&lab, 0, "h3");
    up_to_date(&lab, 0, "gap", "n1");
    let servers = lab.nbd_servers(1);
    assert_eq!(servers.len(), 1, "n2 serves one replica");
    let acked = write_until_power_loss(&lab, 0, "h3", 0, || {
        signal(servers[0], libc::SIGKILL);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        std::thread::sleep(Duration::from_millis(10 + seed % 40));
    });
    // Promoted (the record still said up to date: the held write was never
    // acknowledged) or waiting for n1 (recorded outdated): either way the
    // instance comes back with every acknowledged write.
    let decided = poll(Duration::from_secs(30), || {
        if lab.runs(1, "h3").is_some() {
            return Some(1);
        }
        let (primary, _, state, _) = replication_of(&lab, 1, "gap")?;
        (primary == "n1" && state == "outdated").then_some(0)
    });
    let at = match decided {
        Some(1) => 1,
        Some(_) => {
            // Recorded outdated before the cut: it waits for n1.
            std::thread::sleep(Duration::from_secs(5));
            assert_eq!(lab.runs(1, "h3"), None, "h3 runs on an outdated replica");
            lab.start(0);
            0
        }
        None => panic!(
            "h3 is nowhere and its replica is not outdated:\n{}",
            lab.log(1)
        ),
    };
    eprintln!(
        "after the cut: h3 runs on n{}, {} writes acknowledged",
        at + 1,
        acked.len()
    );
    failed_over(&lab, at, "h3", &ip, Duration::from_secs(60));
    assert_acknowledged_writes(&lab, at, "h3", &acked, "after the cut");
}

/// `psql` from node `i`'s namespace as `app` to database `shop` at `ip`.
fn psql(lab: &Lab, i: usize, ip: &str, sql: &str) -> Result<String, String> {
    common::psql(&lab.nodes[i].ns, ip, "app", "app-pw-1234", "shop", sql)
}

/// The catalog's database on a cluster: `vroom run postgres` keeps its
/// declared data volume on two nodes; rows committed (synchronous commit)
/// while the primary's node loses power are all on the node that takes
/// over, read with real `psql`.
#[test]
fn postgres_fails_over_with_every_committed_row() {
    let _quiet = quiet_host();
    let lab = Arc::new(new_lab(2));
    let postgres = common::recipe("postgres");
    for i in 0..2 {
        lab.ok(i, &["image", "build", &postgres]);
    }
    lab.ok(0, &["run", "postgres", "--name", "db", "--ha", "restart"]);
    up_to_date(&lab, 0, "db-data", "n1");
    lab.ok(
        0,
        &[
            "config",
            "db",
            "set",
            "users=app:app-pw-1234",
            "databases=shop:app",
        ],
    );
    let ip = ip_of(&lab, 0, "db");
    poll(Duration::from_secs(60), || {
        psql(&lab, 0, &ip, "SELECT 1").ok()
    })
    .unwrap_or_else(|| panic!("no login: {:?}", psql(&lab, 0, &ip, "SELECT 1")));
    psql(&lab, 0, &ip, "CREATE TABLE rows (n int PRIMARY KEY)").unwrap();

    let committed = Arc::new(Mutex::new(Vec::<u32>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (lab, committed, stop, ip) = (lab.clone(), committed.clone(), stop.clone(), ip.clone());
        std::thread::spawn(move || {
            for n in 1.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if psql(&lab, 0, &ip, &format!("INSERT INTO rows VALUES ({n})")).is_err() {
                    break;
                }
                committed.lock().unwrap().push(n);
            }
        })
    };
    poll(Duration::from_secs(60), || {
        (committed.lock().unwrap().len() >= 20).then_some(())
    })
    .expect("no row was committed");
    lab.power_loss(0);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let committed = committed.lock().unwrap().clone();

    let took = Instant::now();
    let rows = poll(Duration::from_secs(120), || {
        psql(&lab, 1, &ip, "SELECT n FROM rows ORDER BY n").ok()
    })
    .unwrap_or_else(|| panic!("db did not come back on n2:\n{}", lab.log(1)));
    eprintln!(
        "postgres answered from n2 {:?} after the power loss; {} rows committed before it",
        took.elapsed(),
        committed.len()
    );
    let rows: Vec<u32> = rows.lines().filter_map(|l| l.parse().ok()).collect();
    for n in &committed {
        assert!(
            rows.contains(n),
            "row {n} was committed and is lost: {rows:?}"
        );
    }
}

/// Writes numbered files in `instance` (each synced: the guest saw it
/// complete) from `after + 1` on, through whichever node runs it, until
/// `stop`; returns the numbers acknowledged.
fn write_in_background(
    lab: &Arc<Lab>,
    instance: &str,
    after: u32,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u32>> {
    let (lab, stop, instance) = (lab.clone(), stop.clone(), instance.to_string());
    std::thread::spawn(move || {
        let mut acked = vec![];
        let mut n = after + 1;
        while !stop.load(Ordering::SeqCst) {
            let script = format!("echo write-{n} > {DATA}/w{n} && sync");
            let done = (0..lab.nodes.len()).any(|i| {
                lab.runs(i, &instance).is_some()
                    && lab
                        .vroom(
                            i,
                            &[
                                "exec",
                                "--timeout",
                                "10",
                                &instance,
                                "--",
                                "/bin/sh",
                                "-c",
                                &script,
                            ],
                        )
                        .status
                        .success()
            });
            if done {
                acked.push(n);
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
            // A write whose answer was lost is never asked to be there.
            n += 1;
        }
        acked
    })
}

/// Asserts that every write in `acked` is on `instance`'s volume on node `i`.
fn assert_writes_kept(lab: &Lab, i: usize, instance: &str, acked: &[u32], when: &str) {
    assert!(!acked.is_empty(), "{when}: no write was acknowledged");
    let script = format!(
        "for n in {}; do cat {DATA}/w$n || echo missing-$n; done",
        acked
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = lab.ok(i, &["exec", instance, "--", "/bin/sh", "-c", &script]);
    for n in acked {
        assert!(
            out.contains(&format!("write-{n}\n")),
            "{when}: write {n} was acknowledged and is lost:\n{out}"
        );
    }
}

/// The nodes that hold a copy of `volume`.
fn copies_of(lab: &Lab, volume: &str) -> Vec<usize> {
    (0..lab.nodes.len())
        .filter(|&i| {
            let out = lab.vroom(i, &["--json", "volume", "inspect", volume]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .is_some_and(|v| v["id"].as_str().is_some_and(|id| !id.is_empty()))
        })
        .collect()
}

/// Asks through node `via` for the migration of `instance` (answering on
/// `ip`) to node `to`, and SIGKILLs vroomd on `source` (then starts it
/// again) once `volume`'s record names `to` as its replica: the copy is
/// under way. Returns what the migration said and the node the instance
/// then runs on, once.
fn kill_source_during_copy(
    lab: &Lab,
    (via, instance, ip): (usize, &str, &str),
    volume: &str,
    to: &str,
    source: usize,
) -> (String, usize) {
    let child = lab
        .command(via)
        .args(["migrate", instance, "--to", to])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let moving = poll(Duration::from_secs(30), || {
        lab.etcd_get(&format!("/vroom/volumes/{volume}"))
            .filter(|v| v.contains(&format!(r#""replica":"{to}""#)))
            .map(|_| ())
    });
    assert!(
        moving.is_some(),
        "volume {volume}'s copy never started on {to}"
    );
    lab.kill_daemon(source);
    lab.start(source);
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let nodes = lab.nodes.len();
    let on = poll(Duration::from_secs(60), || {
        let on: Vec<usize> = (0..nodes)
            .filter(|&i| lab.runs(i, instance).is_some())
            .collect();
        (on.len() == 1 && lab.page_from(on[0], ip).is_some()).then(|| on[0])
    })
    .unwrap_or_else(|| {
        panic!("{instance} does not run once after the source's vroomd was killed ({said})")
    });
    (said, on)
}

/// Issue 25: a live migration to a node that holds no copy of the
/// instance's replicated volume moves the replica there first (filled
/// while the guest writes), then swaps the roles; the old replica's copy
/// goes. Every write the guest saw complete is there afterwards, and the
/// two copies compare equal. Then the source's vroomd is killed while the
/// replica moves: the instance runs once, the record names two copies that
/// exist (filled up to date again), and no third copy is left.
#[test]
fn a_replicated_volume_moves_to_a_node_without_a_copy() {
    let _quiet = quiet_host();
    let lab = Arc::new(new_lab(3));
    let hello = common::recipe("hello");
    for i in 0..3 {
        lab.ok(i, &["image", "build", &hello]);
    }
    let names = ["n1", "n2", "n3"];
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
    lab.ok(
        0,
        &[
            "run",
            "hello",
            "--name",
            "h1",
            "--ha",
            "restart",
            "--volume",
            "data:/var/data",
        ],
    );
    let ip = ip_of(&lab, 0, "h1");
    up_to_date(&lab, 0, "data", "n1");
    let (_, replica, _, _) = replication_of(&lab, 0, "data").unwrap();
    let r = names.iter().position(|n| *n == replica).unwrap();
    // The node with no copy.
    let bare = 3 - r;
    assert_eq!(copies_of(&lab, "data"), [0, r]);

    // Under writes, to the node without a copy.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_in_background(&lab, "h1", 0, &stop);
    std::thread::sleep(Duration::from_secs(2));
    let said = lab.ok(0, &["migrate", "h1", "--to", names[bare]]);
    eprintln!("{}", said.trim());
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let acked = writer.join().unwrap();
    runs_only_on(&lab, bare, "h1", &ip);
    let (primary, replica, _, epoch) = replication_of(&lab, bare, "data").unwrap();
    assert_eq!(
        (primary.as_str(), replica.as_str(), epoch),
        (names[bare], "n1", 2),
        "the destination's copy took over, the source's is the replica"
    );
    assert_writes_kept(&lab, bare, "h1", &acked, "after the move");
    up_to_date(&lab, bare, "data", names[bare]);
    let gone = poll(Duration::from_secs(20), || {
        (copies_of(&lab, "data") == [0, bare]).then_some(())
    });
    assert!(
        gone.is_some(),
        "the old replica's copy on {} stays: copies on {:?}",
        names[r],
        copies_of(&lab, "data")
    );
    lab.ok(bare, &["stop", "h1"]);
    assert_same_copies(
        &copy_of(&lab, 0, "data"),
        &copy_of(&lab, bare, "data"),
        "after a move with a copy",
    );

    // The source's vroomd killed while the replica moves (to r, which has
    // no copy now).
    lab.ok(bare, &["start", "h1"]);
    up_to_date(&lab, bare, "data", names[bare]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_in_background(&lab, "h1", acked.last().copied().unwrap_or(0), &stop);
    std::thread::sleep(Duration::from_secs(1));
    let (said, on) = kill_source_during_copy(&lab, (0, "h1", &ip), "data", names[r], bare);
    eprintln!(
        "source killed during the replica's move: {said}; h1 runs on {}",
        names[on]
    );
    stop.store(true, Ordering::SeqCst);
    let more = writer.join().unwrap();
    let (primary, _, _, _) = replication_of(&lab, on, "data").unwrap();
    assert_eq!(
        primary, names[on],
        "h1 runs on a copy that is not the primary"
    );
    up_to_date(&lab, on, "data", names[on]);
    let (primary, replica, _, _) = replication_of(&lab, on, "data").unwrap();
    let mut want: Vec<usize> = [&primary, &replica]
        .iter()
        .map(|n| names.iter().position(|m| m == n).unwrap())
        .collect();
    want.sort();
    let settled = poll(Duration::from_secs(30), || {
        (copies_of(&lab, "data") == want).then_some(())
    });
    assert!(
        settled.is_some(),
        "copies on {:?}, the record names {primary} and {replica}",
        copies_of(&lab, "data")
    );
    assert_writes_kept(&lab, on, "h1", &more, "after the kill");
    lab.ok(on, &["stop", "h1"]);
    let other = want.into_iter().find(|&i| i != on).unwrap();
    assert_same_copies(
        &copy_of(&lab, on, "data"),
        &copy_of(&lab, other, "data"),
        "after a move cut short",
    );

    // A restart of vroomd on the primary under writes: the relay and the
    // QEMU (with its mirror job and dirty bitmap) outlived it, and the new
    // vroomd takes that replication over. The replica stays up to date
    // throughout, nothing is copied again (before: a full copy, the
    // replica emptied and `syncing`), and no acknowledged write is lost.
    lab.ok(on, &["start", "h1"]);
    up_to_date(&lab, on, "data", names[on]);
    let record = || -> serde_json::Value {
        serde_json::from_str(&lab.etcd_get("/vroom/volumes/data").unwrap()).unwrap()
    };
    let before = record();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_in_background(&lab, "h1", more.last().copied().unwrap_or(10_000), &stop);
    std::thread::sleep(Duration::from_secs(1));
    lab.kill_daemon(on);
    lab.start(on);
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        let now = record();
        assert!(
            now["state"] == "up_to_date" && now["since"] == before["since"],
            "the replica was synced again after vroomd restarted on the primary: {now}\n--- log:\n{}",
            lab.log(on)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    let last = writer.join().unwrap();
    let log = lab.log(on);
    let took = log
        .lines()
        .find(|l| l.contains("took over the replication"))
        .unwrap_or_else(|| {
            panic!("the restarted vroomd did not take the replication over:\n{log}")
        });
    eprintln!("after the restart: {took}");
    assert_writes_kept(&lab, on, "h1", &last, "after vroomd restarted");
    lab.ok(on, &["stop", "h1"]);
    assert_same_copies(
        &copy_of(&lab, on, "data"),
        &copy_of(&lab, other, "data"),
        "after vroomd restarted on the primary",
    );

    // `node drain` does the same: with the replica's node cordoned, the
    // drain moves h1 live to the third node, whose copy is filled first.
    lab.ok(on, &["start", "h1"]);
    up_to_date(&lab, on, "data", names[on]);
    lab.ok(
        on,
        &[
            "exec",
            "h1",
            "--",
            "/bin/sh",
            "-c",
            "echo drained > /var/data/drained && sync",
        ],
    );
    let third = 3 - on - other;
    lab.ok(0, &["node", "cordon", names[other]]);
    let said = lab.ok(0, &["node", "drain", names[on]]);
    eprintln!("{}", said.trim());
    runs_only_on(&lab, third, "h1", &ip);
    let out = lab.ok(third, &["exec", "h1", "--", "cat", "/var/data/drained"]);
    assert_eq!(out, "drained\n");
    up_to_date(&lab, third, "data", names[third]);
    let (_, replica, _, _) = replication_of(&lab, third, "data").unwrap();
    assert_eq!(replica, names[on], "the drained node's copy is the replica");
    let mut want = vec![on, third];
    want.sort();
    let settled = poll(Duration::from_secs(20), || {
        (copies_of(&lab, "data") == want).then_some(())
    });
    assert!(
        settled.is_some(),
        "copies on {:?} after the drain",
        copies_of(&lab, "data")
    );
    lab.ok(0, &["node", "uncordon", names[other]]);
    lab.ok(0, &["node", "uncordon", names[on]]);
}

/// The volume's record in etcd, as JSON.
fn volume_record(lab: &Lab, volume: &str) -> serde_json::Value {
    let raw = lab
        .etcd_get(&format!("/vroom/volumes/{volume}"))
        .unwrap_or_else(|| panic!("volume {volume} has no record"));
    serde_json::from_str(&raw).unwrap()
}

/// Issue 25: a volume with one copy in a cluster. Made on n2 through n1
/// (`--node n2`), both nodes list it there, and an instance using it,
/// asked for through n1, runs on n2. A live migration to n1 under writes
/// copies the volume there: every acknowledged write is on n1's copy,
/// which is the volume's only one afterwards (n2's goes). Then n1's
/// vroomd, the source, is killed while the copy is made for a move back:
/// the instance runs once, on the copy the record names as the only one,
/// with every acknowledged write, and no other copy is left. Then that
/// node loses power: the instance is not booted on the other node (an
/// empty disk), `ps` and `inspect` say it waits for its volume's node,
/// which runs it again once back, with its writes.
#[test]
fn a_volume_with_one_copy_pins_its_instance_and_moves_with_it() {
    let _quiet = quiet_host();
    let lab = two_nodes_with_hello();
    let names = ["n1", "n2"];
    let refused = lab.fail(
        0,
        &[
            "volume",
            "create",
            "odd",
            "--size",
            "64M",
            "--replica-node",
            "n2",
        ],
    );
    assert!(refused.contains("--replicas 2"), "{refused}");
    lab.ok(
        0,
        &["volume", "create", "files", "--size", "64M", "--node", "n2"],
    );
    for i in 0..2 {
        let out = lab.ok(i, &["--json", "volume", "inspect", "files"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (&v["node"], &v["replicas"]),
            (&"n2".into(), &1.into()),
            "{v}"
        );
    }
    assert_eq!(copies_of(&lab, "files"), [1]);
    lab.ok(
        0,
        &[
            "run",
            "hello",
            "--name",
            "h1",
            "--ha",
            "restart",
            "--volume",
            "files:/var/data",
        ],
    );
    let ip = ip_of(&lab, 0, "h1");
    runs_only_on(&lab, 1, "h1", &ip);

    // Under writes, to the node without a copy.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_in_background(&lab, "h1", 0, &stop);
    std::thread::sleep(Duration::from_secs(2));
    let took = Instant::now();
    let said = lab.ok(0, &["migrate", "h1", "--to", "n1"]);
    eprintln!("{} ({:?})", said.trim(), took.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let acked = writer.join().unwrap();
    runs_only_on(&lab, 0, "h1", &ip);
    assert_writes_kept(&lab, 0, "h1", &acked, "after the move");
    let record = volume_record(&lab, "files");
    assert_eq!(
        (&record["primary"], &record["replica"], &record["one_copy"]),
        (&"n1".into(), &"".into(), &true.into()),
        "{record}"
    );
    let gone = poll(Duration::from_secs(20), || {
        (copies_of(&lab, "files") == [0]).then_some(())
    });
    assert!(
        gone.is_some(),
        "copies on {:?} after the move",
        copies_of(&lab, "files")
    );

    // The source's vroomd killed while the copy is made for a move back.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_in_background(&lab, "h1", acked.last().copied().unwrap_or(0), &stop);
    std::thread::sleep(Duration::from_secs(1));
    let (said, on) = kill_source_during_copy(&lab, (1, "h1", &ip), "files", "n2", 0);
    eprintln!(
        "source killed during the copy: {said}; h1 runs on {}",
        names[on]
    );
    stop.store(true, Ordering::SeqCst);
    let more = writer.join().unwrap();
    let settled = poll(Duration::from_secs(30), || {
        let record = volume_record(&lab, "files");
        (record["primary"] == names[on]
            && record["replica"] == ""
            && copies_of(&lab, "files") == [on])
        .then_some(())
    });
    assert!(
        settled.is_some(),
        "the record {} and copies on {:?}: not one copy on {}",
        volume_record(&lab, "files"),
        copies_of(&lab, "files"),
        names[on]
    );
    assert_writes_kept(&lab, on, "h1", &more, "after the kill");

    // The volume's node lost (a power loss): h1 is not booted on the
    // other node, where it would get an empty disk; it waits, and says
    // for what. Back, its node runs it again, with its writes.
    lab.power_loss(on);
    let other = 1 - on;
    let waiting = poll(Duration::from_secs(20), || {
        let out = lab.vroom(other, &["--json", "inspect", "h1"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["status"]["waiting"].as_str().map(String::from)
    })
    .expect("inspect never said what h1 waits for");
    assert!(
        waiting.contains(&format!("waiting for node {}", names[on])) && waiting.contains("files"),
        "{waiting}"
    );
    let ps = lab.ok(other, &["ps"]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("h1 ") && l.contains("waiting")),
        "{ps}"
    );
    // Well past the lease (2 s) the waiting began with.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        lab.runs(other, "h1").is_none(),
        "h1 booted on {} without its volume",
        names[other]
    );
    lab.start(on);
    runs_only_on(&lab, on, "h1", &ip);
    assert_writes_kept(&lab, on, "h1", &more, "after its node came back");
    lab.ok(on, &["rm", "-f", "h1"]);
    // Removed through the node without the copy: the volume's node asked.
    lab.ok(1 - on, &["volume", "rm", "files"]);
    let removed = poll(Duration::from_secs(10), || {
        copies_of(&lab, "files").is_empty().then_some(())
    });
    assert!(removed.is_some() && lab.etcd_get("/vroom/volumes/files").is_none());
}

/// What `service inspect` says of `name` on node `i`.
fn service_of(lab: &Lab, i: usize, name: &str) -> serde_json::Value {
    serde_json::from_str(&lab.ok(i, &["--json", "service", "inspect", name])).unwrap()
}

/// The node each of `service`'s members runs on, as node `i` sees them.
fn member_nodes(lab: &Lab, i: usize, service: &serde_json::Value) -> Vec<String> {
    let ps: serde_json::Value = serde_json::from_str(&lab.ok(i, &["--json", "ps"])).unwrap();
    let members: Vec<&str> = service["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    let mut nodes: Vec<String> = ps
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| members.contains(&p["spec"]["name"].as_str().unwrap_or_default()))
        .map(|p| p["node"].as_str().unwrap_or_default().to_string())
        .collect();
    nodes.sort();
    nodes
}

/// A service in a cluster: its record is the cluster's (seen and changed
/// from either node), its members spread over the nodes, and it survives
/// the power loss of the node that runs its balancer and one member: the
/// balancer fails over, the lost member comes back on the other node, and
/// the service serves at strength. Removed from the survivor, nothing of
/// it is left.
#[test]
fn a_service_spreads_over_the_nodes_and_outlives_one() {
    let _quiet = quiet_host();
    let lab = two_nodes_with_hello();
    // The network exists on n2 only; the service is asked of n2, and kept
    // by whichever node leads.
    lab.ok(1, &["net", "create", "lan"]);
    let out = lab.ok(
        1,
        &[
            "service",
            "create",
            "web",
            "--image",
            "hello",
            "--replicas",
            "2",
            "--net",
            "lan",
        ],
    );
    assert!(out.contains("2 of 2 members ready"), "{out}");
    // Asked on n1, the same service.
    let web = service_of(&lab, 0, "web");
    let address = web["address"].as_str().expect("an address").to_string();
    assert_eq!(
        member_nodes(&lab, 0, &web),
        ["n1", "n2"],
        "the members spread: {web}"
    );
    let keeper = (0..2)
        .find(|&i| lab.runs(i, "web-lb").is_some())
        .expect("the balancer runs on a node");
    let survivor = 1 - keeper;
    let page = lab.page_from(keeper, &address).unwrap_or_default();
    assert!(page.contains("Hello from vroom"), "{page}");
    // Refused in a cluster, and nothing made.
    let err = lab.fail(
        survivor,
        &[
            "service",
            "create",
            "cpu",
            "--image",
            "hello",
            "--replicas",
            "1..2",
            "--target-cpu",
            "60%",
            "--net",
            "lan",
        ],
    );
    assert!(err.contains("not on CPU"), "{err}");

    // The balancer's node (with one member) loses power: both come back on
    // the other node.
    lab.power_loss(keeper);
    let took = failed_over(&lab, survivor, "web-lb", &address, Duration::from_secs(90));
    eprintln!("the balancer answered from the other node after {took:?}");
    let there = lab.nodes[survivor].name.clone();
    let back = poll(Duration::from_secs(90), || {
        let web = service_of(&lab, survivor, "web");
        (web["ready"] == 2 && member_nodes(&lab, survivor, &web) == [there.clone(), there.clone()])
            .then_some(web)
    });
    assert!(
        back.is_some(),
        "web is not back at strength on {there}: {}\n--- its log:\n{}",
        service_of(&lab, survivor, "web"),
        lab.log(survivor)
    );
    for _ in 0..4 {
        let page = lab.page_from(survivor, &address).unwrap_or_default();
        assert!(page.contains("Hello from vroom"), "{page}");
    }

    // Scaled and removed from the survivor.
    lab.ok(survivor, &["service", "scale", "web", "3"]);
    let three = poll(Duration::from_secs(90), || {
        (service_of(&lab, survivor, "web")["ready"] == 3).then_some(())
    });
    assert!(three.is_some(), "{}", service_of(&lab, survivor, "web"));
    lab.ok(survivor, &["service", "rm", "web"]);
    let gone = poll(Duration::from_secs(60), || {
        let ps = lab.ok(survivor, &["--json", "ps"]);
        (!ps.contains("\"web-")
            && lab
                .vroom(survivor, &["service", "inspect", "web"])
                .status
                .code()
                != Some(0))
        .then_some(())
    });
    assert!(
        gone.is_some(),
        "web is not gone: {}\n--- its log:\n{}",
        lab.ok(survivor, &["ps"]),
        lab.log(survivor)
    );
}
