//! A throwaway cluster on one machine, for `vroom bench failover` and the
//! end-to-end tests: three real etcd members listening on an underlay
//! bridge, and nodes that are network namespaces joined to it by veths,
//! each with its own vroomd (the given `vroom` binary), guard, data dir and
//! QEMUs. Faults are real: SIGKILL of a node's every process (power loss),
//! SIGSTOP of its vroomd (freeze), an nft drop of its etcd traffic
//! (partition), SIGSTOP of an etcd member. Dropping the lab removes all of
//! it: processes, namespaces, links, cgroups and files.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use vroom_base::LockExt;

pub struct LabNode {
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    pub dir: PathBuf,
    /// Its address on the underlay.
    pub ip: String,
    daemon: Mutex<Option<Child>>,
}

pub struct Lab {
    /// Four hex digits in every name the lab creates.
    pub tag: String,
    pub dir: PathBuf,
    /// The underlay's /24, as `a.b.c`; the host side is `.1`.
    pub net: String,
    pub etcd_ports: Vec<u16>,
    etcd: Vec<Child>,
    pub nodes: Vec<LabNode>,
    pub cluster_id: String,
    exe: PathBuf,
    /// Interface prefix (and name prefix): one letter and the tag.
    prefix: String,
    env: Vec<(String, String)>,
    /// Client namespaces plugged into a node's bridge.
    clients: Mutex<Vec<String>>,
}

fn shell(cmd: &str) -> Result<(), String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Polls `check` every 20 ms until it gives a value or `limit` passes.
pub fn wait<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let started = Instant::now();
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall on a pid the lab found.
    unsafe { libc::kill(pid as i32, sig) };
}

fn pids_matching(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            matches(&String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

/// Removes what labs of killed runs left (a run cut short never drops its
/// lab): their processes, namespaces, links and files. A lab counts as
/// dead when no etcd of it runs and it is over two minutes old (one being
/// built has no etcd yet).
fn sweep_dead_labs() {
    let tmp = std::env::temp_dir();
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(prefix) = name.strip_prefix("vroom-lab-") else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(120));
        let dir = entry.path().display().to_string();
        // Its etcd runs as long as its test does; what else names it (a
        // replica's qemu-nbd, a VM) outlived a killed run and goes with it.
        let etcd = pids_matching(|c| c.contains(&dir) && c.contains("etcd"));
        if !old || prefix.is_empty() || !etcd.is_empty() {
            continue;
        }
        for pid in pids_matching(|c| c.contains(&dir)) {
            signal(pid, libc::SIGKILL);
        }
        let _ = shell(&format!(
            "for n in $(ip netns list | awk '{{print $1}}' | grep '^{prefix}'); do ip netns del $n; done; \
             for l in $(ip -o link | awk -F': ' '{{print $2}}' | cut -d@ -f1 | grep '^{prefix}'); do ip link del $l; done"
        ));
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

impl Lab {
    /// Builds the underlay, etcd, `cluster init` and `nodes` running nodes.
    /// `letter` starts every name (tests and the bench use different ones);
    /// `env` is passed to every vroom the lab runs.
    pub fn build(
        exe: &Path,
        letter: char,
        nodes: usize,
        env: Vec<(String, String)>,
    ) -> Result<Lab, String> {
        sweep_dead_labs();
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
            ^ rand::random::<u64>();
        let tag = format!("{:04x}", seed & 0xffff);
        let net = format!("10.{}.{}", 128 + (seed >> 16) % 64, (seed >> 24) % 256);
        let base = 20000 + ((seed >> 32) % 30000) as u16;
        let mut lab = Lab {
            dir: std::env::temp_dir().join(format!("vroom-lab-{letter}{tag}")),
            prefix: format!("{letter}{tag}"),
            tag,
            net,
            etcd_ports: (1..=3).map(|i| base + i).collect(),
            etcd: vec![],
            nodes: vec![],
            cluster_id: String::new(),
            exe: exe.to_path_buf(),
            env,
            clients: Mutex::default(),
        };
        std::fs::create_dir_all(&lab.dir).map_err(|e| e.to_string())?;
        shell(&format!(
            "ip link add {b} type bridge && ip link set {b} mtu 9000 && ip addr add {n}.1/24 dev {b} && ip link set {b} up",
            b = lab.bridge(),
            n = lab.net
        ))?;
        let peer = |i: u16| format!("http://{}.1:{}", lab.net, base + 10 + i);
        let members: Vec<String> = (1..=3).map(|i| format!("m{i}={}", peer(i))).collect();
        for i in 1..=3u16 {
            let client = format!("http://{}.1:{}", lab.net, base + i);
            let log = std::fs::File::create(lab.dir.join(format!("etcd{i}.log")))
                .map_err(|e| e.to_string())?;
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(lab.dir.join(format!("etcd{i}")))
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer(i),
                    "--initial-advertise-peer-urls",
                    &peer(i),
                ])
                .args(["--initial-cluster", &members.join(",")])
                .args(["--initial-cluster-token", &format!("lab-{}", lab.prefix)])
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start etcd (apt-get install etcd-server): {e}"))?;
            lab.etcd.push(child);
        }
        let endpoints = lab.endpoints();
        let exe = lab.exe.clone();
        lab.cluster_id = wait(Duration::from_secs(20), || {
            let out = Command::new(&exe)
                .args(["--json", "cluster", "init", "--etcd", &endpoints])
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["id"].as_str().map(str::to_string)
        })
        .ok_or("etcd did not come up within 20 s")?;
        for i in 1..=nodes {
            let node = LabNode {
                name: format!("n{i}"),
                ns: format!("{}n{i}", lab.prefix),
                dir: lab.dir.join(format!("n{i}")),
                ip: format!("{}.{}", lab.net, 10 + i),
                daemon: Mutex::new(None),
            };
            std::fs::create_dir_all(&node.dir).map_err(|e| e.to_string())?;
            shell(&format!(
                "ip netns add {ns} && ip link add {p}v{i} type veth peer name {p}w{i} && \
                 ip link set {p}v{i} mtu 9000 && ip link set {p}w{i} mtu 9000 && \
                 ip link set {p}w{i} netns {ns} && ip link set {p}v{i} master {b} up && \
                 ip -n {ns} link set {p}w{i} name eth0 && ip -n {ns} addr add {ip}/24 dev eth0 && \
                 ip -n {ns} link set eth0 up && ip -n {ns} link set lo up",
                ns = node.ns,
                p = lab.prefix,
                b = lab.bridge(),
                ip = node.ip
            ))?;
            lab.nodes.push(node);
        }
        for i in 0..nodes {
            lab.start(i)?;
        }
        Ok(lab)
    }

    fn bridge(&self) -> String {
        format!("{}u", self.prefix)
    }

    pub fn endpoints(&self) -> String {
        let urls: Vec<String> = self
            .etcd_ports
            .iter()
            .map(|p| format!("http://{}.1:{p}", self.net))
            .collect();
        urls.join(",")
    }

    /// The interface prefix every node uses (inside its own namespace).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A vroom command for node `i`, run from the host (its API is a unix socket).
    pub fn command(&self, i: usize) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.env("VROOM_DATA_DIR", &self.nodes[i].dir)
            .env("VROOM_IFACE_PREFIX", &self.prefix)
            .env_remove("VROOM_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// `vroom daemon --cluster ...` inside node `i`'s namespace, with `extra`
    /// arguments. nsenter, not `ip netns exec`: that remounts /sys, hiding
    /// the cgroup hierarchies the jailer and the guard use.
    pub fn daemon_command(&self, i: usize, extra: &[&str]) -> Command {
        let node = &self.nodes[i];
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", node.ns))
            .arg("--")
            .arg(&self.exe)
            .env("VROOM_DATA_DIR", &node.dir)
            .env("VROOM_IFACE_PREFIX", &self.prefix)
            .env_remove("VROOM_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["daemon", "--cluster", "--etcd", &self.endpoints()])
            .args(["--node", &node.name, "--advertise", &node.ip])
            .args(extra);
        cmd
    }

    /// Starts node `i`'s vroomd and waits for its socket.
    pub fn start(&self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("vroomd.log"))
            .map_err(|e| e.to_string())?;
        let child = self
            .daemon_command(i, &[])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        *node.daemon.lock_unpoisoned() = Some(child);
        let socket = node.dir.join("vroomd.sock");
        wait(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        })
        .map(|_| ())
        .ok_or_else(|| format!("node {} did not come up:\n{}", node.name, self.log(i)))
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("vroomd.log")).unwrap_or_default()
    }

    /// Node `i`'s vroomd (nsenter execs it: the child is vroomd itself).
    pub fn daemon_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i]
            .daemon
            .lock_unpoisoned()
            .as_ref()
            .map(Child::id)
    }

    fn scope_dirs(&self, i: usize) -> Vec<PathBuf> {
        let scope = format!(
            "{}-{}",
            &self.cluster_id[..self.cluster_id.len().min(8)],
            self.nodes[i].name
        );
        ["/sys/fs/cgroup/vroom", "/sys/fs/cgroup/pids/vroom"]
            .iter()
            .map(|root| Path::new(root).join(&scope))
            .filter(|d| d.is_dir())
            .collect()
    }

    /// Node `i`'s QEMUs, as (pid, instance name), from its cgroup scope.
    pub fn qemus(&self, i: usize) -> Vec<(u32, String)> {
        let mut found = vec![];
        for scope in self.scope_dirs(i) {
            for group in std::fs::read_dir(&scope).into_iter().flatten().flatten() {
                let procs =
                    std::fs::read_to_string(group.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let name = cmdline.split(|b| *b == 0).find_map(|a| {
                        String::from_utf8_lossy(a)
                            .strip_prefix("vroom-")
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

    /// The pid of `instance`'s QEMU on node `i`, if it runs there.
    pub fn runs(&self, i: usize, instance: &str) -> Option<u32> {
        self.qemus(i)
            .into_iter()
            .find(|(_, n)| n == instance)
            .map(|(p, _)| p)
    }

    fn guard_pids(&self, i: usize) -> Vec<u32> {
        let needle = format!("{}/guard.sock", self.nodes[i].dir.display());
        pids_matching(|cmdline| cmdline.contains("__guard") && cmdline.contains(&needle))
    }

    /// SIGKILL of node `i`'s vroomd alone (its guard and VMs live on).
    pub fn kill_daemon(&self, i: usize) {
        let daemon = self.nodes[i].daemon.lock_unpoisoned().take();
        if let Some(mut child) = daemon {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The NBD servers node `i`'s vroomd started (exports, replicas): their
    /// pid files are in its data dir.
    pub fn nbd_servers(&self, i: usize) -> Vec<u32> {
        let needle = format!("--pid-file={}/", self.nodes[i].dir.display());
        pids_matching(|cmdline| cmdline.contains("qemu-nbd") && cmdline.contains(&needle))
    }

    /// The NBD relays of node `i`'s replications (their control sockets
    /// are in its data dir).
    pub fn nbd_relays(&self, i: usize) -> Vec<u32> {
        let needle = format!("--control {}/", self.nodes[i].dir.display());
        pids_matching(|cmdline| cmdline.contains("__nbd-relay") && cmdline.contains(&needle))
    }

    /// Power loss: vroomd, the guard, every QEMU, NBD server and relay of
    /// the node, SIGKILLed.
    pub fn power_loss(&self, i: usize) {
        self.kill_daemon(i);
        for pid in self.guard_pids(i) {
            signal(pid, libc::SIGKILL);
        }
        for pid in self.nbd_servers(i).into_iter().chain(self.nbd_relays(i)) {
            signal(pid, libc::SIGKILL);
        }
        for (pid, _) in self.qemus(i) {
            signal(pid, libc::SIGKILL);
        }
    }

    /// SIGSTOP (or SIGCONT) of node `i`'s vroomd.
    pub fn freeze(&self, i: usize, frozen: bool) {
        if let Some(pid) = self.daemon_pid(i) {
            signal(pid, if frozen { libc::SIGSTOP } else { libc::SIGCONT });
        }
    }

    /// Drops (or lets through again) node `i`'s traffic to etcd.
    pub fn partition(&self, i: usize, cut: bool) -> Result<(), String> {
        let ns = &self.nodes[i].ns;
        if !cut {
            return shell(&format!("ip netns exec {ns} nft delete table inet part"));
        }
        let ports: Vec<String> = self.etcd_ports.iter().map(|p| p.to_string()).collect();
        shell(&format!(
            "ip netns exec {ns} nft add table inet part && \
             ip netns exec {ns} nft add chain inet part out '{{ type filter hook output priority 0; }}' && \
             ip netns exec {ns} nft add rule inet part out tcp dport {{ {} }} drop",
            ports.join(", ")
        ))
    }

    /// The page at `ip` as seen from node `i`'s namespace.
    pub fn page_from(&self, i: usize, ip: &str) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.nodes[i].ns,
                "timeout",
                "3",
                "busybox",
                "wget",
            ])
            .args(["-qO-", &format!("http://{ip}/")])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// POSTs to etcd's JSON gateway on member `m`.
    fn gateway(&self, m: usize, path: &str, body: &str) -> Option<serde_json::Value> {
        let addr = format!("{}.1", self.net);
        let mut stream = std::net::TcpStream::connect((addr.as_str(), self.etcd_ports[m])).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        write!(
            stream,
            "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let (_, json) = text.split_once("\r\n\r\n")?;
        serde_json::from_str(json).ok()
    }

    /// The keys under `prefix`.
    pub fn etcd_keys(&self, prefix: &str) -> Vec<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = format!(
            r#"{{"key":"{}","range_end":"{}","keys_only":true}}"#,
            b64.encode(prefix),
            b64.encode(&end)
        );
        let Some(v) = (0..3).find_map(|m| self.gateway(m, "/v3/kv/range", &body)) else {
            return vec![];
        };
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .filter_map(|kv| kv["key"].as_str())
                    .filter_map(|k| b64.decode(k).ok())
                    .map(|k| String::from_utf8_lossy(&k).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A client namespace plugged into `bridge` on node `i` (a veth port, as
    /// a guest's tap would be) with address `cidr`: it reaches the
    /// network's guests on every node over the overlay.
    pub fn plug_client(&self, i: usize, bridge: &str, cidr: &str) -> Result<String, String> {
        let mut clients = self.clients.lock_unpoisoned();
        let k = clients.len() + 1;
        let ns = format!("{}c{k}", self.prefix);
        clients.push(ns.clone());
        shell(&format!(
            "ip netns add {ns} && ip link add {p}c{k} type veth peer name {p}d{k} && \
             ip link set {p}c{k} netns {node} && ip -n {node} link set {p}c{k} master {bridge} up && \
             ip link set {p}d{k} netns {ns} && ip -n {ns} addr add {cidr} dev {p}d{k} && \
             ip -n {ns} link set {p}d{k} up && ip -n {ns} link set lo up",
            p = self.prefix,
            node = self.nodes[i].ns,
        ))?;
        Ok(ns)
    }

    /// The value at `key`, as text.
    pub fn etcd_get(&self, key: &str) -> Option<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = format!(r#"{{"key":"{}"}}"#, b64.encode(key));
        let v = (0..3).find_map(|m| self.gateway(m, "/v3/kv/range", &body))?;
        let value = b64.decode(v["kvs"][0]["value"].as_str()?).ok()?;
        Some(String::from_utf8_lossy(&value).into_owned())
    }

    /// Writes `value` at `key` (as another etcd client would).
    pub fn etcd_put(&self, key: &str, value: &str) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            b64.encode(key),
            b64.encode(value)
        );
        (0..3).any(|m| self.gateway(m, "/v3/kv/put", &body).is_some())
    }

    /// Deletes `key`.
    pub fn etcd_delete(&self, key: &str) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = format!(r#"{{"key":"{}"}}"#, b64.encode(key));
        (0..3).any(|m| self.gateway(m, "/v3/kv/deleterange", &body).is_some())
    }

    /// etcd's revision: it grows by one per write.
    pub fn etcd_revision(&self) -> Option<i64> {
        let v = (0..3).find_map(|m| self.gateway(m, "/v3/kv/range", r#"{"key":"AA=="}"#))?;
        v["header"]["revision"].as_str()?.parse().ok()
    }

    /// The pid of the etcd member that leads.
    pub fn etcd_leader(&self) -> Option<u32> {
        (0..3).find_map(|m| {
            let v = self.gateway(m, "/v3/maintenance/status", "{}")?;
            let me = v["header"]["member_id"].as_str()?;
            (v["leader"].as_str() == Some(me)).then(|| self.etcd[m].id())
        })
    }
}

/// A client opening a TCP connection to `addr` every 10 ms from network
/// namespace `ns` (as a busy user of a guest would), keeping the times of
/// those that were answered.
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Instant>>>,
}

impl Prober {
    /// How often it connects.
    pub const EVERY: Duration = Duration::from_millis(10);

    pub fn start(ns: &str, addr: std::net::SocketAddr) -> Result<Prober, String> {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::Ordering;
        let netns = std::fs::File::open(format!("/run/netns/{ns}"))
            .map_err(|e| format!("no network namespace {ns}: {e}"))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let (entered, joined) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on this thread alone, with a namespace fd we own.
            let moved = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
            let _ = entered.send(moved);
            let mut answered = vec![];
            while moved && !halt.load(Ordering::SeqCst) {
                let sent = Instant::now();
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok() {
                    answered.push(sent);
                }
                std::thread::sleep(Self::EVERY.saturating_sub(sent.elapsed()));
            }
            answered
        });
        if !joined.recv().unwrap_or(false) {
            return Err(format!("cannot enter network namespace {ns}"));
        }
        Ok(Prober {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops it: the times of the answered connections.
    pub fn finish(mut self) -> Vec<Instant> {
        self.halt()
    }

    fn halt(&mut self) -> Vec<Instant> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Busy loops that keep the host's CPUs loaded (as other tenants would),
/// each bounded by `timeout` and killed when this is dropped.
pub struct BusyLoops(Vec<Child>);

impl BusyLoops {
    pub fn start(count: usize, limit: Duration) -> Result<BusyLoops, String> {
        let mut loops = BusyLoops(vec![]);
        for _ in 0..count {
            let child = Command::new("timeout")
                .arg(limit.as_secs().max(1).to_string())
                .args(["sh", "-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start a busy loop: {e}"))?;
            loops.0.push(child);
        }
        Ok(loops)
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // `timeout` passes the signal on to its loop.
            signal(child.id(), libc::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Lab {
    /// Whether instance `name` (address `ip`) runs on node `i` and its guest
    /// answers: its agent (an exec) and its service (the page).
    pub fn guest_answers(&self, i: usize, name: &str, ip: &str) -> Result<(), String> {
        let mut exec = self
            .command(i)
            .args(["exec", "--timeout", "5", name, "--", "sh", "-c", "exit 0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        // A guest that hangs may leave the call waiting: bounded here.
        let exited = wait(Duration::from_secs(10), || exec.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = exec.kill();
        }
        let out = exec.wait_with_output().map_err(|e| e.to_string())?;
        if !exited.is_some_and(|status| status.success()) {
            return Err(format!(
                "its agent does not answer on {}: {}",
                self.nodes[i].name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        self.page_from(i, ip)
            .map(|_| ())
            .ok_or_else(|| format!("its page does not answer on {}", self.nodes[i].name))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.freeze(i, false);
            self.power_loss(i);
            for scope in self.scope_dirs(i) {
                let _ = shell(&format!(
                    "for f in $(find {d} -name cgroup.procs); do kill -9 $(cat $f) 2>/dev/null; done; \
                     sleep 0.3; find {d} -mindepth 1 -depth -type d -exec rmdir {{}} \\; ; rmdir {d}",
                    d = scope.display()
                ));
            }
        }
        for child in &mut self.etcd {
            signal(child.id(), libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
        for node in &self.nodes {
            let _ = shell(&format!("ip netns del {}", node.ns));
        }
        for ns in self.clients.lock_unpoisoned().iter() {
            let _ = shell(&format!("ip netns del {ns}"));
        }
        let _ = shell(&format!(
            "for l in $(ip -o link | awk -F': ' '{{print $2}}' | cut -d@ -f1 | grep '^{}'); do ip link del $l; done",
            self.prefix
        ));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
