//! `vroom bench failover`: a throwaway cluster on this machine — three etcd
//! members on an underlay bridge, two nodes in network namespaces, each with
//! its own vroomd, guard and data dir — and the hello appliance with
//! `--ha restart`, then `--ha standby`. Faults are injected in turn (power
//! loss, a frozen vroomd, an etcd partition) and each is timed from the
//! fault to the instance answering HTTP on its own address from the other
//! node. A 20 ms scan of both nodes' cgroups counts double runs. The
//! baseline is a cold `vroom run` to answering on the same machine, in the
//! same run. Last, the etcd load: writes per second per idle instance.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::{median, p90};

#[derive(Clone, Copy, Debug)]
enum Fault {
    PowerLoss,
    Freeze,
    Partition,
}

const FAULTS: [Fault; 3] = [Fault::PowerLoss, Fault::Freeze, Fault::Partition];

struct Node {
    name: String,
    ns: String,
    dir: PathBuf,
    ip: String,
    daemon: Option<Child>,
}

struct Cluster {
    tag: String,
    dir: PathBuf,
    net: String,
    ports: Vec<u16>,
    etcd: Vec<Child>,
    nodes: Vec<Node>,
    id: String,
    exe: PathBuf,
}

fn shell(cmd: &str) -> Result<()> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn wait<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
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

impl Cluster {
    fn build(nodes: usize) -> Result<Cluster> {
        // Names, subnet and ports from the pid and the clock: two benches
        // at once do not meet.
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(0);
        let tag = format!("{:04x}", seed & 0xffff);
        let net = format!("10.{}.{}", 192 + (seed >> 16) % 32, (seed >> 24) % 256);
        let base = 30000 + ((seed >> 32) % 20000) as u16;
        let mut c = Cluster {
            dir: std::env::temp_dir().join(format!("vroom-bench-cluster-{tag}")),
            tag,
            net,
            ports: (1..=3).map(|i| base + i).collect(),
            etcd: vec![],
            nodes: vec![],
            id: String::new(),
            exe: std::env::current_exe()?,
        };
        std::fs::create_dir_all(&c.dir)?;
        shell(&format!(
            "ip link add b{t}u type bridge && ip addr add {n}.1/24 dev b{t}u && ip link set b{t}u up",
            t = c.tag,
            n = c.net
        ))?;
        let peer = |i: u16| format!("http://{}.1:{}", c.net, base + 10 + i);
        let members: Vec<String> = (1..=3).map(|i| format!("m{i}={}", peer(i))).collect();
        for i in 1..=3u16 {
            let client = format!("http://{}.1:{}", c.net, base + i);
            let log = std::fs::File::create(c.dir.join(format!("etcd{i}.log")))?;
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(c.dir.join(format!("etcd{i}")))
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
                .args(["--initial-cluster-token", &format!("bench-{}", c.tag)])
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("cannot start etcd (apt-get install etcd-server)")?;
            c.etcd.push(child);
        }
        let endpoints = c.endpoints();
        let exe = c.exe.clone();
        c.id = wait(Duration::from_secs(20), || {
            let out = Command::new(&exe)
                .args(["--json", "cluster", "init", "--etcd", &endpoints])
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["id"].as_str().map(str::to_string)
        })
        .context("etcd did not come up")?;
        for i in 1..=nodes {
            let node = Node {
                name: format!("n{i}"),
                ns: format!("b{}n{i}", c.tag),
                dir: c.dir.join(format!("n{i}")),
                ip: format!("{}.{}", c.net, 10 + i),
                daemon: None,
            };
            std::fs::create_dir_all(&node.dir)?;
            shell(&format!(
                "ip netns add {ns} && ip link add b{t}v{i} type veth peer name b{t}w{i} && \
                 ip link set b{t}w{i} netns {ns} && ip link set b{t}v{i} master b{t}u up && \
                 ip -n {ns} link set b{t}w{i} name eth0 && ip -n {ns} addr add {ip}/24 dev eth0 && \
                 ip -n {ns} link set eth0 up && ip -n {ns} link set lo up",
                ns = node.ns,
                t = c.tag,
                ip = node.ip
            ))?;
            c.nodes.push(node);
        }
        for i in 0..nodes {
            c.start(i)?;
        }
        Ok(c)
    }

    fn endpoints(&self) -> String {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("http://{}.1:{p}", self.net))
            .collect();
        urls.join(",")
    }

    fn vroom(&self, i: usize) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.env("VROOM_DATA_DIR", &self.nodes[i].dir)
            .env("VROOM_IFACE_PREFIX", format!("b{}", self.tag));
        cmd
    }

    fn ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.vroom(i).args(args).output()?;
        if !out.status.success() {
            bail!(
                "vroom {} on {}: {}",
                args.join(" "),
                self.nodes[i].name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("vroomd.log"))?;
        // nsenter, not `ip netns exec`, which remounts /sys and hides the cgroups.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.ns))
            .arg("--")
            .arg(&self.exe)
            .env("VROOM_DATA_DIR", &node.dir)
            .env("VROOM_IFACE_PREFIX", format!("b{}", self.tag))
            .args(["daemon", "--cluster", "--etcd", &self.endpoints()])
            .args(["--node", &node.name, "--advertise", &node.ip])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let socket = node.dir.join("vroomd.sock");
        self.nodes[i].daemon = Some(child);
        wait(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        })
        .with_context(|| format!("node {} did not come up", self.nodes[i].name))?;
        Ok(())
    }

    /// Node `i`'s QEMUs of `instance`, from its cgroup scope.
    fn qemus(&self, i: usize, instance: &str) -> Vec<u32> {
        let scope = format!("{}-{}", &self.id[..8], self.nodes[i].name);
        let mut pids = vec![];
        for root in ["/sys/fs/cgroup/vroom", "/sys/fs/cgroup/pids/vroom"] {
            let dir = Path::new(root).join(&scope);
            for group in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let procs =
                    std::fs::read_to_string(group.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let wanted = format!("vroom-{instance},");
                    if String::from_utf8_lossy(&cmdline).contains(&wanted) && !pids.contains(&pid) {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }

    fn answers(&self, i: usize, ip: &str) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.nodes[i].ns,
                "timeout",
                "2",
                "busybox",
                "wget",
            ])
            .args(["-qO-", &format!("http://{ip}/")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn guard_pids(&self, i: usize) -> Vec<u32> {
        let needle = format!("{}/guard.sock", self.nodes[i].dir.display());
        pids_matching(|cmdline| cmdline.contains("__guard") && cmdline.contains(&needle))
    }

    fn inject(&mut self, i: usize, fault: Fault, instance: &str) -> Result<()> {
        match fault {
            Fault::PowerLoss => {
                if let Some(mut child) = self.nodes[i].daemon.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                for pid in self
                    .guard_pids(i)
                    .into_iter()
                    .chain(self.qemus(i, instance))
                {
                    kill(pid, libc::SIGKILL);
                }
            }
            Fault::Freeze => {
                let pid = self.nodes[i].daemon.as_ref().context("no daemon")?.id();
                kill(pid, libc::SIGSTOP);
            }
            Fault::Partition => {
                let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
                let ns = &self.nodes[i].ns;
                shell(&format!(
                    "ip netns exec {ns} nft add table inet part && \
                     ip netns exec {ns} nft add chain inet part out '{{ type filter hook output priority 0; }}' && \
                     ip netns exec {ns} nft add rule inet part out tcp dport {{ {} }} drop",
                    ports.join(", ")
                ))?;
            }
        }
        Ok(())
    }

    /// Brings a faulted node back as a healthy, empty member.
    fn heal(&mut self, i: usize, fault: Fault) -> Result<()> {
        match fault {
            Fault::PowerLoss => self.start(i)?,
            Fault::Freeze => {
                let pid = self.nodes[i].daemon.as_ref().context("no daemon")?.id();
                kill(pid, libc::SIGCONT);
            }
            Fault::Partition => shell(&format!(
                "ip netns exec {} nft delete table inet part",
                self.nodes[i].ns
            ))?,
        }
        Ok(())
    }
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

fn kill(pid: u32, sig: i32) {
    // SAFETY: plain syscall on a pid this bench found.
    unsafe { libc::kill(pid as i32, sig) };
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(child) = &self.nodes[i].daemon {
                kill(child.id(), libc::SIGCONT);
            }
            let _ = self.inject(i, Fault::PowerLoss, "");
        }
        // Every QEMU of the throwaway nodes, by their scopes.
        for i in 0..self.nodes.len() {
            let scope = format!(
                "{}-{}",
                &self.id[..self.id.len().min(8)],
                self.nodes[i].name
            );
            for root in ["/sys/fs/cgroup/vroom", "/sys/fs/cgroup/pids/vroom"] {
                let dir = Path::new(root).join(&scope);
                let _ = Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "for f in $(find {d} -name cgroup.procs 2>/dev/null); do kill -9 $(cat $f) 2>/dev/null; done; \
                         sleep 0.3; find {d} -mindepth 1 -depth -type d -exec rmdir {{}} \\; 2>/dev/null; rmdir {d} 2>/dev/null",
                        d = dir.display()
                    ))
                    .status();
            }
        }
        for child in &mut self.etcd {
            let _ = child.kill();
            let _ = child.wait();
        }
        for node in &self.nodes {
            let _ = shell(&format!("ip netns del {}", node.ns));
        }
        let _ = shell(&format!(
            "for l in $(ip -o link | awk -F': ' '{{print $2}}' | cut -d@ -f1 | grep '^b{}'); do ip link del $l; done",
            self.tag
        ));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn failover(runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    tokio::task::block_in_place(|| {
        let mut c = Cluster::build(2)?;
        let result = measure(&mut c, runs);
        if result.is_err() {
            for node in &c.nodes {
                let log = std::fs::read_to_string(node.dir.join("vroomd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                eprintln!("--- the last lines of {}'s log:", node.name);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        result
    })
}

fn measure(c: &mut Cluster, runs: usize) -> Result<()> {
    for i in 0..2 {
        c.ok(i, &["image", "build", "hello"])?;
    }
    // Baseline: a cold boot to answering, on node 1.
    let mut cold = vec![];
    for k in 0..runs.clamp(3, 10) {
        let name = format!("base{k}");
        let started = Instant::now();
        c.ok(
            0,
            &[
                "--json", "run", "hello", "--name", &name, "--cold", "--node", "n1",
            ],
        )?;
        let ip = ip_of(c, 0, &name)?;
        wait(Duration::from_secs(30), || c.answers(0, &ip).then_some(()))
            .context("the baseline instance never answered")?;
        cold.push(started.elapsed().as_secs_f64() * 1000.0);
        c.ok(0, &["rm", "--force", &name])?;
    }
    println!(
        "baseline: cold run to answering: median {:.0} ms, p90 {:.0} ms (n={})",
        median(&cold),
        p90(&cold),
        cold.len()
    );
    for ha in ["restart", "standby"] {
        let name = format!("f{ha}");
        c.ok(
            0,
            &["run", "hello", "--name", &name, "--ha", ha, "--node", "n1"],
        )?;
        let ip = ip_of(c, 0, &name)?;
        if ha == "standby" {
            // Both nodes keep a warm snapshot for it.
            let warm = wait(Duration::from_secs(120), || {
                let ready = (0..2).all(|i| {
                    c.ok(i, &["--json", "snapshot", "ls", "--warm"])
                        .is_ok_and(|s| s.contains("\"hello\""))
                });
                ready.then_some(())
            });
            warm.context("the nodes did not warm the image for standby")?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let doubles = Arc::new(AtomicUsize::new(0));
        let mut times = vec![];
        let mut at = 0usize;
        for k in 0..runs {
            let fault = FAULTS[k % FAULTS.len()];
            let other = 1 - at;
            let (s, d) = (stop.clone(), doubles.clone());
            let scan = {
                let (nodes, id, inst) = (
                    c.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>(),
                    c.id.clone(),
                    name.clone(),
                );
                std::thread::spawn(move || {
                    while !s.load(Ordering::SeqCst) {
                        let total: usize = nodes
                            .iter()
                            .map(|n| scope_qemus(&format!("{}-{n}", &id[..8]), &inst))
                            .sum();
                        if total > 1 {
                            d.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            };
            let started = Instant::now();
            c.inject(at, fault, &name)?;
            let up = wait(Duration::from_secs(60), || {
                (!c.qemus(other, &name).is_empty() && c.answers(other, &ip)).then_some(())
            });
            let took = started.elapsed().as_secs_f64() * 1000.0;
            c.heal(at, fault)?;
            stop.store(true, Ordering::SeqCst);
            let _ = scan.join();
            stop.store(false, Ordering::SeqCst);
            up.with_context(|| format!("{name} did not come back after {fault:?}"))?;
            times.push(took);
            eprintln!("  {ha} {fault:?}: {took:.0} ms");
            // The healed node must be back before the next fault.
            let back = wait(Duration::from_secs(30), || {
                c.ok(other, &["--json", "node", "inspect", &c.nodes[at].name])
                    .ok()
                    .filter(|s| s.contains("\"alive\": true"))
            });
            back.context("the faulted node did not rejoin")?;
            at = other;
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let p99 = sorted[((sorted.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)];
        println!(
            "failover --ha {ha}: fault to answering on another node: p50 {:.0} ms, p99 {:.0} ms, {:.2}x the cold run (n={}, faults: power loss, frozen vroomd, etcd partition); double runs seen: {}",
            median(&times),
            p99,
            median(&times) / median(&cold),
            times.len(),
            doubles.load(Ordering::SeqCst)
        );
        c.ok(at, &["rm", "--force", &name])?;
    }
    // Etcd load: revisions (writes) over 20 s with idle instances.
    let idle = 4;
    for k in 0..idle {
        c.ok(
            0,
            &[
                "run",
                "hello",
                "--name",
                &format!("idle{k}"),
                "--ha",
                "restart",
            ],
        )?;
    }
    std::thread::sleep(Duration::from_secs(3));
    let before = etcd_revision(c)?;
    std::thread::sleep(Duration::from_secs(20));
    let after = etcd_revision(c)?;
    println!(
        "etcd load: {:.3} writes/s per idle instance ({} writes in 20 s with {idle} idle instances on 2 nodes; keepalives are not writes)",
        (after - before) as f64 / 20.0 / idle as f64,
        after - before
    );
    Ok(())
}

fn scope_qemus(scope: &str, instance: &str) -> usize {
    let mut n = 0;
    for root in ["/sys/fs/cgroup/vroom", "/sys/fs/cgroup/pids/vroom"] {
        for group in std::fs::read_dir(Path::new(root).join(scope))
            .into_iter()
            .flatten()
            .flatten()
        {
            let procs =
                std::fs::read_to_string(group.path().join("cgroup.procs")).unwrap_or_default();
            n += procs
                .lines()
                .filter(|pid| {
                    std::fs::read(format!("/proc/{}/cmdline", pid.trim())).is_ok_and(|c| {
                        String::from_utf8_lossy(&c).contains(&format!("vroom-{instance},"))
                    })
                })
                .count();
        }
        if n > 0 {
            break;
        }
    }
    n
}

fn ip_of(c: &Cluster, i: usize, name: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(&c.ok(i, &["--json", "inspect", name])?)?;
    v["nics"][0]["ip"]
        .as_str()
        .map(str::to_string)
        .context("the instance has no address")
}

/// etcd's revision: it grows by one per write.
fn etcd_revision(c: &Cluster) -> Result<i64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((format!("{}.1", c.net).as_str(), c.ports[0]))?;
    let body = r#"{"key":"L3Zyb29tL2NsdXN0ZXI="}"#;
    write!(
        stream,
        "POST /v3/kv/range HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(json)?;
    v["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .context("etcd did not say its revision")
}
