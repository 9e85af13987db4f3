//! End to end: a cluster on one machine. Three real etcd members listen on
//! an underlay bridge; each node is a network namespace joined to it by a
//! veth, with its own vroomd, guard, data dir and QEMUs. Faults are real:
//! SIGKILL of a node's every process (power loss), SIGSTOP of its vroomd
//! (freeze), an nft drop of its etcd traffic (partition), SIGSTOP of the
//! etcd leader, SIGKILL of one QEMU. A sampler scans every node's cgroup
//! throughout: an instance must never run twice.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{init_binary, poll, vroom_bin};

struct Node {
    name: String,
    ns: String,
    dir: PathBuf,
    ip: String,
    daemon: Mutex<Option<Child>>,
}

struct Lab {
    tag: String,
    dir: PathBuf,
    bridge: String,
    net: String,
    etcd: Vec<Child>,
    etcd_ports: Vec<u16>,
    nodes: Vec<Node>,
    cluster_id: String,
}

fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().unwrap()
}

fn must(cmd: &str) {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    fn new(nodes: usize) -> Lab {
        let tag = format!("{:04x}", rand::random::<u16>());
        let net = format!(
            "10.{}.{}",
            128 + rand::random::<u8>() % 64,
            rand::random::<u8>()
        );
        let base = 20000 + (rand::random::<u16>() % 20000);
        let mut lab = Lab {
            dir: PathBuf::from(format!("/tmp/vrc-{tag}")),
            bridge: format!("k{tag}u"),
            tag,
            net,
            etcd: vec![],
            etcd_ports: (1..=3).map(|i| base + i).collect(),
            nodes: vec![],
            cluster_id: String::new(),
        };
        std::fs::create_dir_all(&lab.dir).unwrap();
        must(&format!(
            "ip link add {b} type bridge && ip addr add {n}.1/24 dev {b} && ip link set {b} up",
            b = lab.bridge,
            n = lab.net
        ));
        let peers: Vec<String> = (1..=3)
            .map(|i| format!("m{i}=http://{}.1:{}", lab.net, base + 10 + i))
            .collect();
        for i in 1..=3u16 {
            let log = std::fs::File::create(lab.dir.join(format!("etcd{i}.log"))).unwrap();
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(lab.dir.join(format!("etcd{i}")))
                .args([
                    "--listen-client-urls",
                    &format!("http://{}.1:{}", lab.net, base + i),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://{}.1:{}", lab.net, base + i),
                ])
                .args([
                    "--listen-peer-urls",
                    &format!("http://{}.1:{}", lab.net, base + 10 + i),
                ])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://{}.1:{}", lab.net, base + 10 + i),
                ])
                .args(["--initial-cluster", &peers.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &format!("vrc-{}", lab.tag)])
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("etcd runs (cargo xtask test installs etcd-server)");
            lab.etcd.push(child);
        }
        let init = poll(Duration::from_secs(20), || {
            let out = Command::new(vroom_bin())
                .args(["--json", "cluster", "init", "--etcd", &lab.endpoints()])
                .output()
                .unwrap();
            out.status.success().then(|| {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                v["id"].as_str().unwrap().to_string()
            })
        });
        lab.cluster_id = init.expect("cluster init against the fresh etcd");
        for i in 1..=nodes {
            let node = Node {
                name: format!("n{i}"),
                ns: format!("k{}n{i}", lab.tag),
                dir: lab.dir.join(format!("n{i}")),
                ip: format!("{}.{}", lab.net, 10 + i),
                daemon: Mutex::new(None),
            };
            std::fs::create_dir_all(&node.dir).unwrap();
            must(&format!(
                "ip netns add {ns} && ip link add k{t}v{i} type veth peer name k{t}w{i} && \
                 ip link set k{t}w{i} netns {ns} && ip link set k{t}v{i} master {b} up && \
                 ip -n {ns} link set k{t}w{i} name eth0 && ip -n {ns} addr add {ip}/24 dev eth0 && \
                 ip -n {ns} link set eth0 up && ip -n {ns} link set lo up",
                ns = node.ns,
                t = lab.tag,
                b = lab.bridge,
                ip = node.ip
            ));
            lab.nodes.push(node);
        }
        for i in 0..nodes {
            lab.start(i);
        }
        lab
    }

    fn endpoints(&self) -> String {
        self.etcd_ports
            .iter()
            .map(|p| format!("http://{}.1:{p}", self.net))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn prefix(&self) -> String {
        format!("k{}", self.tag)
    }

    /// A vroom command for node `i`, run from the host.
    fn command(&self, i: usize) -> Command {
        let mut cmd = Command::new(vroom_bin());
        cmd.env("VROOM_DATA_DIR", &self.nodes[i].dir)
            .env("VROOM_IFACE_PREFIX", self.prefix())
            .env("VROOM_INIT", init_binary())
            .env_remove("VROOM_LOG");
        cmd
    }

    fn daemon_command(&self, i: usize, extra: &[&str]) -> Command {
        let node = &self.nodes[i];
        // nsenter, not `ip netns exec`: that remounts /sys, hiding the
        // cgroup hierarchies the jailer and the guard use.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", node.ns))
            .args(["--", vroom_bin()])
            .env("VROOM_DATA_DIR", &node.dir)
            .env("VROOM_IFACE_PREFIX", self.prefix())
            .env("VROOM_INIT", init_binary())
            .env_remove("VROOM_LOG")
            .args(["daemon", "--cluster", "--etcd", &self.endpoints()])
            .args(["--node", &node.name, "--advertise", &node.ip])
            .args(extra);
        cmd
    }

    fn start(&self, i: usize) {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("vroomd.log"))
            .unwrap();
        let child = self
            .daemon_command(i, &[])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        *node.daemon.lock().unwrap() = Some(child);
        let socket = node.dir.join("vroomd.sock");
        let up = poll(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
        assert!(
            up.is_some(),
            "node {} did not come up: {}",
            node.name,
            self.log(i)
        );
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("vroomd.log")).unwrap_or_default()
    }

    fn vroom(&self, i: usize, args: &[&str]) -> Output {
        self.command(i).args(args).output().unwrap()
    }

    fn ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.vroom(i, args);
        assert!(
            out.status.success(),
            "vroom {args:?} on {}: {}\n--- log:\n{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stderr),
            self.log(i)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fail(&self, i: usize, args: &[&str]) -> String {
        let out = self.vroom(i, args);
        assert!(!out.status.success(), "vroom {args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err
    }

    fn daemon_pid(&self, i: usize) -> u32 {
        // nsenter execs vroom: the child is vroomd itself.
        self.nodes[i].daemon.lock().unwrap().as_ref().unwrap().id()
    }

    fn scope_dirs(&self, i: usize) -> Vec<PathBuf> {
        let scope = format!("{}-{}", &self.cluster_id[..8], self.nodes[i].name);
        ["/sys/fs/cgroup/vroom", "/sys/fs/cgroup/pids/vroom"]
            .iter()
            .map(|root| PathBuf::from(root).join(&scope))
            .filter(|d| d.is_dir())
            .collect()
    }

    /// The QEMUs of node `i`, as (pid, instance name), from its cgroup scope.
    fn qemus(&self, i: usize) -> Vec<(u32, String)> {
        let mut found = vec![];
        for scope in self.scope_dirs(i) {
            for group in std::fs::read_dir(&scope).into_iter().flatten().flatten() {
                let procs =
                    std::fs::read_to_string(group.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let name = cmdline
                        .split(|b| *b == 0)
                        .map(String::from_utf8_lossy)
                        .find_map(|a| {
                            a.strip_prefix("vroom-")
                                .and_then(|r| r.split(',').next())
                                .map(str::to_string)
                        });
                    if let Some(name) = name {
                        if !found.iter().any(|(p, _)| *p == pid) {
                            found.push((pid, name));
                        }
                    }
                }
            }
        }
        found
    }

    fn runs(&self, i: usize, instance: &str) -> Option<u32> {
        self.qemus(i)
            .into_iter()
            .find(|(_, n)| n == instance)
            .map(|(p, _)| p)
    }

    fn guard_pids(&self, i: usize) -> Vec<u32> {
        let needle = format!("{}/guard.sock", self.nodes[i].dir.display());
        pids_with(|cmdline| cmdline.contains("__guard") && cmdline.contains(&needle))
    }

    /// Power loss: vroomd, the guard and every QEMU of the node, SIGKILLed.
    fn power_loss(&self, i: usize) {
        if let Some(mut child) = self.nodes[i].daemon.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in self.guard_pids(i) {
            signal(pid, libc::SIGKILL);
        }
        for (pid, _) in self.qemus(i) {
            signal(pid, libc::SIGKILL);
        }
    }

    /// The page of `ip` as seen from node `i`'s namespace.
    fn page_from(&self, i: usize, ip: &str) -> Option<String> {
        let out = sh(&format!(
            "ip netns exec {} timeout 3 busybox wget -qO- http://{ip}/ 2>/dev/null",
            self.nodes[i].ns
        ));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The keys under `prefix`, through etcd's JSON gateway.
    fn etcd_keys(&self, prefix: &str) -> Vec<String> {
        use base64_lite::encode;
        let end = {
            let mut b = prefix.as_bytes().to_vec();
            *b.last_mut().unwrap() += 1;
            b
        };
        let body = format!(
            r#"{{"key":"{}","range_end":"{}","keys_only":true}}"#,
            encode(prefix.as_bytes()),
            encode(&end)
        );
        let mut stream =
            std::net::TcpStream::connect((format!("{}.1", self.net).as_str(), self.etcd_ports[0]))
                .unwrap();
        write!(
            stream,
            "POST /v3/kv/range HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .filter_map(|kv| kv["key"].as_str())
                    .map(|k| String::from_utf8(base64_lite::decode(k)).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The etcd member that leads, by its index.
    fn etcd_leader(&self) -> Option<usize> {
        for (i, port) in self.etcd_ports.iter().enumerate() {
            let Ok(mut stream) =
                std::net::TcpStream::connect((format!("{}.1", self.net).as_str(), *port))
            else {
                continue;
            };
            stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let body = "{}";
            let req = format!(
                "POST /v3/maintenance/status HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(req.as_bytes()).is_err() {
                continue;
            }
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            let Some((_, json)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
                continue;
            };
            let me = v["header"]["member_id"].as_str().unwrap_or("");
            if !me.is_empty() && v["leader"].as_str() == Some(me) {
                return Some(i);
            }
        }
        None
    }
}

/// Standard base64, enough for etcd's JSON gateway.
mod base64_lite {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(text: &str) -> Vec<u8> {
        let mut bits = 0u32;
        let mut count = 0;
        let mut out = vec![];
        for c in text.bytes().filter(|c| *c != b'=') {
            let v = ABC.iter().position(|a| *a == c).unwrap() as u32;
            bits = (bits << 6) | v;
            count += 6;
            if count >= 8 {
                count -= 8;
                out.push((bits >> count) as u8);
                bits &= (1 << count) - 1;
            }
        }
        out
    }
}

fn pids_with(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            matches(&String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall on a pid this test found.
    unsafe { libc::kill(pid as i32, sig) };
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.power_loss(i);
            for scope in self.scope_dirs(i) {
                let _ = sh(&format!(
                    "find {} -mindepth 1 -depth -type d -exec rmdir {{}} \\; ; rmdir {}",
                    scope.display(),
                    scope.display()
                ));
            }
        }
        for child in &mut self.etcd {
            signal(child.id(), libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
        for node in &self.nodes {
            let _ = sh(&format!("ip netns del {}", node.ns));
        }
        let _ = sh(&format!(
            "for l in $(ip -o link | awk -F': ' '{{print $2}}' | cut -d@ -f1 | grep '^k{}'); do ip link del $l; done",
            self.tag
        ));
        if std::thread::panicking() {
            // The daemons' and etcd's logs, for the failure report.
            for (i, node) in self.nodes.iter().enumerate() {
                eprintln!("--- vroomd log of {}:\n{}", node.name, self.log(i));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Counts, every 20 ms, the QEMUs of `instance` across every node; keeps the most seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    worst: Arc<Mutex<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(lab: &Arc<Lab>, instance: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let worst = Arc::new(Mutex::new(String::new()));
        let (lab, instance) = (lab.clone(), instance.to_string());
        let (s, m, w) = (stop.clone(), most.clone(), worst.clone());
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
                if seen.len() > m.load(Ordering::SeqCst) {
                    m.store(seen.len(), Ordering::SeqCst);
                    *w.lock().unwrap() = format!("{seen:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            stop,
            most,
            worst,
            thread: Some(thread),
        }
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

/// Waits until node `to` runs `instance` and it answers on `ip` from there;
/// returns how long that took.
fn failed_over(lab: &Lab, to: usize, instance: &str, ip: &str, budget: Duration) -> Duration {
    let started = Instant::now();
    let done = poll(budget, || {
        (lab.runs(to, instance).is_some() && lab.page_from(to, ip).is_some()).then_some(())
    });
    assert!(
        done.is_some(),
        "{instance} did not come up on {} within {budget:?}\n--- its log:\n{}",
        lab.nodes[to].name,
        lab.log(to)
    );
    started.elapsed()
}

fn ip_of(lab: &Lab, i: usize, instance: &str) -> String {
    let out = lab.ok(i, &["--json", "inspect", instance]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nics"][0]["ip"].as_str().unwrap().to_string()
}

#[test]
fn an_instance_outlives_its_node_and_never_runs_twice() {
    let lab = Arc::new(Lab::new(2));
    let hello = common::recipe("hello");
    for i in 0..2 {
        lab.ok(i, &["image", "build", &hello]);
    }
    lab.ok(
        0,
        &[
            "run", "hello", "--name", "h1", "--ha", "restart", "--node", "n1",
        ],
    );
    let ip = ip_of(&lab, 0, "h1");
    assert!(lab.runs(0, "h1").is_some(), "h1 runs on n1");
    assert!(lab.page_from(0, &ip).is_some(), "h1 answers on n1");
    // The other node lists it too, where it runs.
    let listed = lab.ok(1, &["--json", "inspect", "h1"]);
    assert!(listed.contains(&ip), "{listed}");
    let nodes = lab.ok(1, &["node", "ls"]);
    assert!(nodes.contains("n1") && nodes.contains("n2"), "{nodes}");
    let sampler = Sampler::start(&lab, "h1");

    // Power loss of n1: n2 boots h1 with its address.
    lab.power_loss(0);
    let took = failed_over(&lab, 1, "h1", &ip, Duration::from_secs(30));
    eprintln!("power loss: h1 answered from n2 after {took:?}");
    assert_eq!(ip_of(&lab, 1, "h1"), ip, "the address moves with it");
    sampler.assert_never_twice("power loss");

    // n1 comes back: it does not restart what n2 owns now.
    lab.start(0);
    let on_n2 = lab.runs(1, "h1").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(lab.runs(0, "h1"), None, "n1 restarted h1: {}", lab.log(0));
    assert_eq!(lab.runs(1, "h1"), Some(on_n2));
    let node = lab.ok(0, &["--json", "node", "inspect", "n1"]);
    assert!(node.contains("\"alive\": true"), "{node}");

    // Freeze n2's vroomd: its guard kills h1 before n1 may claim it.
    signal(lab.daemon_pid(1), libc::SIGSTOP);
    let fenced = poll(Duration::from_secs(4), || {
        lab.runs(1, "h1").is_none().then_some(())
    });
    assert!(fenced.is_some(), "the guard did not fence frozen n2");
    let took = failed_over(&lab, 0, "h1", &ip, Duration::from_secs(30));
    eprintln!("freeze: h1 answered from n1 after {took:?}");
    signal(lab.daemon_pid(1), libc::SIGCONT);
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
    let ports: Vec<String> = lab.etcd_ports.iter().map(|p| p.to_string()).collect();
    must(&format!(
        "ip netns exec {} nft add table inet part && \
         ip netns exec {ns} nft add chain inet part out '{{ type filter hook output priority 0; }}' && \
         ip netns exec {ns} nft add rule inet part out tcp dport {{ {} }} drop",
        lab.nodes[0].ns,
        ports.join(", "),
        ns = lab.nodes[0].ns
    ));
    let took = failed_over(&lab, 1, "h1", &ip, Duration::from_secs(30));
    eprintln!("partition: h1 answered from n2 after {took:?}");
    assert_eq!(lab.runs(0, "h1"), None, "partitioned n1 still runs h1");
    must(&format!(
        "ip netns exec {} nft delete table inet part",
        lab.nodes[0].ns
    ));
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
    signal(lab.etcd[leader].id(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(6));
    let runs: Vec<Option<u32>> = (0..2).map(|i| lab.runs(i, "h1")).collect();
    signal(lab.etcd[leader].id(), libc::SIGCONT);
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
    let at = answering.unwrap();
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
    let lab = Lab::new(1);
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
    let lab = Lab::new(2);
    let hello = common::recipe("hello");
    for i in 0..2 {
        lab.ok(i, &["image", "build", &hello]);
    }
    let kill_n1_after = |args: Vec<String>, delay: Duration| {
        let mut child = lab
            .command(0)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if let Some(mut d) = lab.nodes[0].daemon.lock().unwrap().take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = child.wait();
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
    for (k, ms) in [30u64, 300, 1500].into_iter().enumerate() {
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
}
