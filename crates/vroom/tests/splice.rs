//! Splicing appliances in front of a running VM, and mirroring its traffic:
//! real guests, a real client in a network namespace looping HTTP requests
//! (keep-alive and new connections) through the splice as it happens.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::loop_client::{longest_outage, LoopClient};
use common::{master_of, poll, random_subnet, recipe, Env};
use vroom_types::{Splice, SpliceState};

fn build(env: &Env, name: &str) {
    env.ok(&["image", "build", &recipe(name)]);
}

fn splice_of(env: &Env, appliance: &str) -> Splice {
    let all: Vec<Splice> = serde_json::from_str(&env.ok(&["--json", "splices"])).unwrap();
    all.into_iter()
        .find(|s| s.appliance.as_str() == appliance)
        .unwrap_or_else(|| panic!("{appliance} is spliced"))
}

fn guest_uptime(env: &Env, name: &str) -> f64 {
    env.ok(&["exec", name, "--", "cat", "/proc/uptime"])
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn qemu_kill(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Splices an l2-firewall named fw in front of web1.
const SPLICE_FW_IN_FRONT_OF_WEB1: &[&str] = &[
    "splice",
    "l2-firewall",
    "--in-front-of",
    "web1",
    "--name",
    "fw",
];

/// A client opening new HTTP connections at a steady rate from a namespace
/// for a given time, on a pool of threads: each result goes to `log` as
/// `MILLIS OUTCOME`.
const RATE_CLIENT: &str = r#"
import http.client, socket, sys, time, threading, queue
host, rate, seconds, log_path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
log = open(log_path, "w", buffering=1)
lock = threading.Lock()
t0 = time.time()
jobs = queue.Queue()
def outcome(e):
    if isinstance(e, (ConnectionResetError, BrokenPipeError)): return "reset"
    if isinstance(e, ConnectionRefusedError): return "refused"
    if isinstance(e, (socket.timeout, TimeoutError)): return "timeout"
    return "error:" + type(e).__name__
def work():
    while True:
        if jobs.get() is None: return
        try:
            c = http.client.HTTPConnection(host, 80, timeout=3)
            c.request("GET", "/"); r = c.getresponse(); r.read(); c.close()
            res = "ok" if r.status == 200 else "status:%d" % r.status
        except Exception as e:
            res = outcome(e)
        with lock:
            log.write("%d %s\n" % ((time.time() - t0) * 1000, res))
workers = [threading.Thread(target=work) for _ in range(12)]
for w in workers: w.start()
n = 0
while time.time() - t0 < seconds:
    jobs.put(1); n += 1
    time.sleep(max(0.0, t0 + n / rate - time.time()))
for w in workers: jobs.put(None)
for w in workers: w.join()
"#;

struct RateClient {
    child: Child,
    log: PathBuf,
}

impl RateClient {
    fn start(env: &Env, ns: &str, ip: Ipv4Addr, per_second: u32, seconds: u32) -> Self {
        let script = env.dir.join("rate.py");
        std::fs::write(&script, RATE_CLIENT).unwrap();
        let log = env.dir.join(format!("rate-{ns}-{per_second}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(&script)
            .args([ip.to_string(), per_second.to_string(), seconds.to_string()])
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        RateClient { child, log }
    }

    /// The results so far: (millis, outcome).
    fn results(&self) -> Vec<(u64, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, outcome) = l.split_once(' ')?;
                Some((t.parse().ok()?, outcome.to_string()))
            })
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.results().iter().map(|r| r.0).max().unwrap_or(0)
    }

    /// Waits until the last `n` connections that ended after `since` all
    /// ended as `ok` says; returns when the first of them ended.
    fn wait_for(&self, since: u64, n: usize, ok: bool, timeout: Duration) -> Option<u64> {
        poll(timeout, || {
            let after: Vec<_> = self.results().into_iter().filter(|r| r.0 > since).collect();
            let tail = &after[after.len().saturating_sub(n)..];
            (after.len() >= n && tail.iter().all(|r| (r.1 == "ok") == ok)).then(|| tail[0].0)
        })
    }

    fn finish(mut self) -> Vec<(u64, String)> {
        let _ = self.child.wait();
        self.results()
    }
}

/// The transparent firewall keeps forwarding under a sustained rate of new
/// connections, over twice as many at once as the kernel's default table of
/// 1,024 entries holds, while its config changes: changes that do not
/// concern the traffic drop no connection and never cut the path, each
/// `config set` succeeds, and `block_from` blocks by source address. When
/// the table is made too small, `vroom logs` and `inspect` say it is full.
#[test]
fn a_spliced_firewall_forwards_a_sustained_connection_rate_through_config_changes() {
    const RATE: u32 = 30;
    const SECONDS: u32 = 110;
    let env = Env::new("splct");
    build(&env, "web");
    build(&env, "l2-firewall");
    let lan = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &lan]);
    env.ok(&["run", "web", "--name", "web1", "--net", "lan"]);
    let web_ip = env.instance("web1").nics[0].ip.unwrap();
    let client = env.client_on("cl", "lan", &lan);
    let client_ip = common::host(&lan, 200);
    env.ok(SPLICE_FW_IN_FRONT_OF_WEB1);
    let rate = RateClient::start(&env, &client, web_ip, RATE, SECONDS);
    assert!(
        rate.wait_for(0, 20, true, Duration::from_secs(30))
            .is_some(),
        "connections through fw succeed: {:?}",
        rate.results().last()
    );
    std::thread::sleep(Duration::from_secs(10));

    // Changes that do not concern port 80 from the client.
    for set in [
        "block_tcp=22",
        "block_udp=53,123",
        "block_from=192.0.2.0/24,198.51.100.7/32",
        "ping=false",
        "block_tcp=",
        "block_udp=",
        "block_from=",
        "ping=true",
    ] {
        env.ok(&["config", "fw", "set", set]);
    }
    // Blocking the client's own address blocks it, and unblocking lets it in.
    let block_at = rate.now_ms();
    env.ok(&["config", "fw", "set", &format!("block_from={client_ip}/32")]);
    assert!(
        rate.wait_for(block_at, 10, false, Duration::from_secs(15))
            .is_some(),
        "block_from blocks the client"
    );
    let unblock_at = rate.now_ms();
    env.ok(&["config", "fw", "set", "block_from="]);
    let unblocked = rate.wait_for(unblock_at, 10, true, Duration::from_secs(20));
    assert!(unblocked.is_some(), "unblocked again");
    // Connections started under the block may time out up to 3 s later.
    let blocked = block_at..=unblocked.unwrap() + 3000;

    let results = rate.finish();
    let failed: Vec<_> = results
        .iter()
        .filter(|(t, outcome)| outcome != "ok" && !blocked.contains(t))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed outside the block: {:?}",
        failed.len(),
        results.len(),
        &failed[..failed.len().min(20)]
    );
    // The host sees the table through the guest's health report.
    let table = || env.instance("fw").health.and_then(|h| h.conntrack).unwrap();
    let tracked = table();
    assert!(
        tracked.entries > 2 * 1024 && tracked.dropped == 0,
        "{tracked:?} after {} connections at {RATE}/s",
        results.len()
    );
    assert!(env.ok(&["inspect", "fw"]).contains("connections tracked: "));
    let splice = splice_of(&env, "fw");
    assert_eq!(splice.state, SpliceState::Active);
    assert!(
        splice.events.iter().all(|e| !e.message.contains("failing")),
        "{:?}",
        splice.events
    );
    assert!(!env.ok(&["logs", "fw"]).contains("table full"));

    // The table made as small as the kernel's default while it holds more:
    // the appliance says so in its log, and inspect shows it.
    env.ok(&["config", "fw", "set", "conntrack_max=1024"]);
    let shrunk = table();
    assert!(shrunk.max == 1024 && shrunk.entries > 1024, "{shrunk:?}");
    let said = poll(Duration::from_secs(30), || {
        env.ok(&["logs", "fw"])
            .contains("connection tracking table full")
            .then_some(())
    });
    assert!(said.is_some(), "{}", env.ok(&["logs", "fw"]));
    assert!(env.ok(&["inspect", "fw"]).contains("table full"));
}

/// A transparent firewall spliced in front of a running web VM while a
/// client loops requests: no reset, a bounded outage, its rules in force,
/// fail-closed when it dies, the path unchanged across a vroomd SIGKILL,
/// and unsplice restores the direct path; the web VM never restarts.
#[test]
fn a_firewall_spliced_in_front_of_a_running_vm() {
    let env = Env::new("splfw");
    build(&env, "web");
    build(&env, "l2-firewall");
    let lan = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &lan]);
    env.ok(&["run", "web", "--name", "web1", "--net", "lan"]);
    let web = env.instance("web1");
    let web_ip = web.nics[0].ip.unwrap();
    let web_pid = web.status.pid.unwrap();
    let web_tap = web.nics[0].tap.clone();
    let bridge = env.network("lan").bridge;
    let client = env.client_on("cl", "lan", &lan);
    let t0 = Instant::now();
    let flow = LoopClient::start(&env, &client, web_ip);
    assert!(flow.wait_ok(Duration::from_secs(20)), "the web VM serves");

    // Bad input: each a one-line error, and nothing changes.
    for (args, says) in [
        (vec!["splice", "web", "--in-front-of", "nope"], "nope"),
        (
            vec!["splice", "nope", "--in-front-of", "web1"],
            "no instance or image",
        ),
        (
            vec!["splice", "web", "--in-front-of", "web1"],
            "no outside and inside",
        ),
        (vec!["splice", "web1", "--in-front-of", "web1"], "itself"),
        (
            vec!["splice", "l2-firewall", "--in-front-of", "web1:eth9"],
            "no NIC",
        ),
        (vec!["unsplice", "web1"], "not spliced"),
    ] {
        let err = env.fail(&args);
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(master_of(&web_tap).as_deref(), Some(bridge.as_str()));

    // The gateway's MAC must not change when taps leave the bridge, or the
    // guests' ARP entries point nowhere (a bridge takes its lowest port's
    // MAC unless it was set).
    let bridge_mac =
        || std::fs::read_to_string(format!("/sys/class/net/{bridge}/address")).unwrap();
    let mac_before = bridge_mac();
    let spliced_at = flow.now_ms();
    env.ok(SPLICE_FW_IN_FRONT_OF_WEB1);
    let splice = splice_of(&env, "fw");
    assert_eq!(splice.state, SpliceState::Active);
    assert_eq!(
        splice.fail,
        vroom_types::FailMode::Closed,
        "firewalls fail closed"
    );
    assert_eq!(
        master_of(&web_tap).as_deref(),
        Some(splice.segment.as_str())
    );
    assert!(
        flow.wait_ok(Duration::from_secs(10)),
        "traffic flows through fw"
    );
    assert_eq!(bridge_mac(), mac_before, "the bridge kept its MAC");
    let err = env.fail(&["splice", "fw", "--in-front-of", "web1"]);
    assert!(err.contains("already spliced"), "{err}");
    let err = env.fail(&["rm", "-f", "fw"]);
    assert!(err.contains("unsplice"), "{err}");

    // A block rule in the spliced firewall takes effect for new connections.
    let block_from = flow.now_ms();
    env.ok(&["config", "fw", "set", "block_tcp=80"]);
    assert!(
        flow.wait_new_blocked(block_from, Duration::from_secs(15)),
        "new connections are blocked"
    );
    env.ok(&["config", "fw", "set", "block_tcp="]);
    assert!(flow.wait_ok(Duration::from_secs(15)), "unblocked again");
    let block_to = flow.now_ms();

    // vroomd SIGKILLed while spliced: the path is unchanged, the splice remains.
    env.kill_daemon();
    assert_eq!(
        master_of(&web_tap).as_deref(),
        Some(splice.segment.as_str())
    );
    assert!(
        flow.wait_ok(Duration::from_secs(10)),
        "traffic flows without vroomd"
    );
    env.start_daemon();
    assert_eq!(splice_of(&env, "fw").state, SpliceState::Active);
    assert_eq!(
        master_of(&web_tap).as_deref(),
        Some(splice.segment.as_str())
    );

    // Fail closed: the firewall's QEMU dies and the path stays cut.
    let kill_from = flow.now_ms();
    qemu_kill(env.instance("fw").status.pid.unwrap());
    let cut = poll(Duration::from_secs(5), || {
        (splice_of(&env, "fw").state == SpliceState::Cut).then_some(())
    });
    assert!(
        cut.is_some(),
        "the splice is cut: {:?}",
        splice_of(&env, "fw")
    );
    assert_eq!(
        master_of(&web_tap).as_deref(),
        Some(splice.segment.as_str())
    );
    // vroomd restarts the firewall; the path comes back with it.
    let back = poll(Duration::from_secs(60), || {
        (splice_of(&env, "fw").state == SpliceState::Active).then_some(())
    });
    assert!(
        back.is_some(),
        "back in the path: {:?}",
        splice_of(&env, "fw")
    );
    assert!(flow.wait_ok(Duration::from_secs(15)), "traffic flows again");
    let kill_to = flow.now_ms();
    let events: Vec<String> = splice_of(&env, "fw")
        .events
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert!(
        events.iter().any(|e| e.contains("failing closed")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.contains("back in the path")),
        "{events:?}"
    );

    let unspliced_at = flow.now_ms();
    env.ok(&["unsplice", "fw"]);
    assert_eq!(master_of(&web_tap).as_deref(), Some(bridge.as_str()));
    assert!(
        flow.wait_ok(Duration::from_secs(10)),
        "the direct path is back"
    );
    let results = flow.stop();

    let windows = [(block_from, block_to), (kill_from, kill_to)];
    let resets: Vec<_> = results
        .iter()
        .filter(|r| r.2 == "reset" && !windows.iter().any(|(a, b)| r.0 >= *a && r.0 <= *b))
        .collect();
    assert!(resets.is_empty(), "no TCP reset from splicing: {resets:?}");
    let outage = longest_outage(&results, &windows);
    assert!(
        outage < 3000,
        "splice {spliced_at} ms, unsplice {unspliced_at} ms: longest outage {outage} ms"
    );
    // The web VM never restarted: same QEMU, and the guest has been up
    // since before the test began.
    assert_eq!(env.instance("web1").status.pid, Some(web_pid));
    assert!(guest_uptime(&env, "web1") > t0.elapsed().as_secs_f64());
    assert!(
        env.instances().iter().all(|i| i.spec.name.as_str() != "fw"),
        "fw removed"
    );
    assert!(
        !Path::new(&format!("/sys/class/net/{}", splice.segment)).exists(),
        "segment removed"
    );
}

/// A sniffer spliced inline and another fed by a mirror both capture the
/// client's requests; the inline one fails open when its QEMU dies.
#[test]
fn sniffers_inline_and_mirrored_capture_the_traffic() {
    let env = Env::new("splsn");
    build(&env, "web");
    build(&env, "sniffer");
    let lan = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &lan]);
    env.ok(&["run", "web", "--name", "web1", "--net", "lan"]);
    // A capture sink on a plain network: fed only by `vroom mirror`.
    env.ok(&["run", "sniffer", "--name", "tap", "--net", "lan"]);
    let web_ip = env.instance("web1").nics[0].ip.unwrap();
    let client = env.client_on("cl", "lan", &lan);

    let err = env.fail(&["mirror", "web1", "--to", "lan"]);
    assert!(err.contains("lan"), "{err}");
    let err = env.fail(&["mirror", "web1", "--to", "web1"]);
    assert!(err.contains("itself"), "{err}");
    let err = env.fail(&["mirror", "tap", "--to", "web1"]);
    assert!(err.contains("capture NIC"), "{err}");
    let err = env.fail(&["mirror", "web1", "--to", "tap", "--filter", "tcp port"]);
    assert!(err.contains("filter"), "{err}");
    env.ok(&["mirror", "web1", "--to", "tap", "--filter", "tcp port 80"]);
    env.ok(&[
        "splice",
        "sniffer",
        "--in-front-of",
        "web1",
        "--name",
        "snf",
    ]);
    assert_eq!(splice_of(&env, "snf").fail, vroom_types::FailMode::Open);

    let probe = format!("vroom-probe-{:08x}", rand::random::<u32>());
    let get = || {
        env.run_in(
            &client,
            &format!("python3 -c \"import urllib.request;urllib.request.urlopen('http://{web_ip}/?{probe}',timeout=3)\""),
        )
        .status
        .success()
    };
    for _ in 0..3 {
        assert!(poll(Duration::from_secs(10), || get().then_some(())).is_some());
    }
    for sniffer in ["snf", "tap"] {
        let dir = env.dir.join(format!("captures-{sniffer}"));
        let seen = poll(Duration::from_secs(15), || {
            let _ = std::fs::remove_dir_all(&dir);
            env.ok(&[
                "cp",
                &format!("{sniffer}:/captures/"),
                dir.to_str().unwrap(),
            ]);
            let mut text = String::new();
            for entry in std::fs::read_dir(&dir).ok()?.flatten() {
                let out = Command::new("tcpdump")
                    .args(["-nn", "-A", "-r"])
                    .arg(entry.path())
                    .output()
                    .unwrap();
                text.push_str(&String::from_utf8_lossy(&out.stdout));
            }
            text.contains(&probe).then_some(())
        });
        assert!(seen.is_some(), "{sniffer}'s pcap holds the requests");
    }

    // A live stream of the inline sniffer's capture, read by tcpdump.
    let stream = env.dir.join("live.pcap");
    let mut live = env
        .command()
        // Enough packets for a whole request even when the capture starts
        // in the middle of one (its tail alone is about ten packets).
        .args(["capture", "snf", "--count", "30", "--filter", "tcp port 80"])
        .stdout(std::fs::File::create(&stream).unwrap())
        .spawn()
        .unwrap();
    let streamed = poll(Duration::from_secs(30), || {
        get();
        live.try_wait().unwrap()
    });
    assert!(streamed.is_some_and(|s| s.success()), "vroom capture ended");
    let out = Command::new("tcpdump")
        .args(["-nn", "-A", "-r"])
        .arg(&stream)
        .output()
        .unwrap();
    assert!(out.status.success(), "tcpdump reads the stream: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&probe),
        "the stream holds the requests"
    );
    let err = env.fail(&["capture", "web1"]);
    assert!(err.contains("capture"), "{err}");

    // Fail open: the inline sniffer's QEMU dies; traffic flows around it.
    qemu_kill(env.instance("snf").status.pid.unwrap());
    let killed = Instant::now();
    assert!(
        poll(Duration::from_secs(5), || get().then_some(())).is_some(),
        "traffic flows again"
    );
    eprintln!(
        "fail-open: traffic back {:?} after the kill",
        killed.elapsed()
    );
    let splice = splice_of(&env, "snf");
    assert!(
        splice
            .events
            .iter()
            .any(|e| e.message.contains("failing open")),
        "{:?}",
        splice.events
    );
    env.ok(&["unsplice", "snf"]);
    env.ok(&["unmirror", "web1"]);
    let err = env.fail(&["unmirror", "web1"]);
    assert!(err.contains("not mirrored"), "{err}");
}

/// vroomd SIGKILLed at a spread of moments inside a splice and inside an
/// unsplice: the next daemon leaves either a whole splice (active, the VM
/// behind its segment) or none at all (no appliance, no segment, the VM on
/// its bridge), never something between; the VM never restarts.
#[test]
fn a_daemon_killed_inside_splice_or_unsplice_leaves_all_or_nothing() {
    let env = Env::new("splcr");
    build(&env, "web");
    build(&env, "l2-firewall");
    let lan = random_subnet();
    env.ok(&["net", "create", "lan", "--subnet", &lan]);
    env.ok(&["run", "web", "--name", "web1", "--net", "lan"]);
    let web = env.instance("web1");
    let (web_pid, web_tap) = (web.status.pid, web.nics[0].tap.clone());
    let bridge = env.network("lan").bridge;
    let body = r#"{"appliance":"l2-firewall","vm":"web1","name":"fw"}"#;

    let settled = |context: &str| -> Option<Splice> {
        let splice = common::settled_splice(&env, "fw", &web_tap, &bridge, context);
        assert_eq!(
            env.instance("web1").status.pid,
            web_pid,
            "{context}: the VM never restarted"
        );
        splice
    };

    for delay_ms in [150, 1200, 3000] {
        let context = format!("killed {delay_ms} ms into a splice");
        common::kill_during(
            &env,
            "POST",
            "/v1/splices",
            body.to_string(),
            Duration::from_millis(delay_ms),
        );
        if settled(&context).is_some() {
            let context = format!("killed {delay_ms} ms into an unsplice");
            common::kill_during(
                &env,
                "DELETE",
                "/v1/splices/fw",
                String::new(),
                Duration::from_millis(delay_ms / 10),
            );
            if settled(&context).is_some() {
                env.ok(&["unsplice", "fw"]);
            }
        }
    }
    assert!(settled("at the end").is_none());
}
