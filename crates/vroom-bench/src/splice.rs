//! `vroom bench splice`: what splicing an l2-firewall in front of a running
//! web VM costs, against baselines measured in the same run.
//!
//! - Latency: `splice` from the command to the first HTTP answer through the
//!   appliance (the appliance's boot included), against `vroom run` of the
//!   same appliance to ready; `unsplice` from the command to the first
//!   answer on the direct path.
//! - A running flow (a client requesting every 20 ms on one kept-alive
//!   connection): failed requests and TCP retransmissions (the client
//!   namespace's `RetransSegs`) across each splice and unsplice, against the
//!   same flow over the same time without splicing.
//! - Throughput: a 16 MB HTTP download through the spliced l2-firewall
//!   against the direct path, interleaved.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_client::Client;
use vroom_types::{
    AccelChoice, ExecRequest, InstanceSpec, Name, NetworkSpec, NicSpec, RunRequest, SpliceRequest,
};

use crate::stats::{median, p90};

const FLOW: (&str, &str) = (
    "flow",
    r#"
import http.client, sys, time, os
host, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
ok = failed = 0
conn = None
while not os.path.exists(stop):
    try:
        if conn is None: conn = http.client.HTTPConnection(host, 80, timeout=1)
        conn.request("GET", "/"); r = conn.getresponse(); r.read()
        ok += 1
    except Exception:
        failed += 1
        try: conn.close()
        except Exception: pass
        conn = None
    time.sleep(0.02)
open(out, "w").write("%d %d" % (ok, failed))
"#,
);

const DOWNLOAD: (&str, &str) = (
    "download",
    r#"
import urllib.request, sys, time
t = time.time(); n = len(urllib.request.urlopen("http://%s/big" % sys.argv[1], timeout=60).read())
print("%d %f" % (n, time.time() - t))
"#,
);

/// One HTTP GET of `/` from the host, answered within 200 ms.
fn http_ok(ip: Ipv4Addr) -> bool {
    http_ok_on(ip, 80)
}

fn http_ok_on(ip: Ipv4Addr, port: u16) -> bool {
    use std::io::{Read, Write};
    let timeout = Duration::from_millis(200);
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&(ip, port).into(), timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    if stream.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head[9..12] == *b"200"
}

struct Bench {
    client: Client,
    ns: String,
    dir: tempfile::TempDir,
    web_ip: Ipv4Addr,
}

impl Bench {
    /// Runs one of the scripts above (by its name) in the client's namespace.
    fn py(&self, (name, script): (&str, &str), args: &[&str]) -> Command {
        let path = self.dir.path().join(format!("{name}.py"));
        let _ = std::fs::write(&path, script);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "python3"])
            .arg(path)
            .args(args);
        cmd
    }

    /// Milliseconds from `from` until the host gets an answer from the web
    /// VM (over the bridge, so through whatever is spliced), polling every
    /// 10 ms with short timeouts.
    fn until_ok(&self, from: Instant) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_ok(self.web_ip) {
                return Ok(from.elapsed().as_secs_f64() * 1000.0);
            }
            if Instant::now() > deadline {
                bail!("no HTTP answer from the web VM for 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn retransmits(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "cat", "/proc/net/snmp"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let tcp: Vec<Vec<&str>> = out
            .lines()
            .filter(|l| l.starts_with("Tcp:"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        if tcp.len() < 2 {
            return 0;
        }
        tcp[0]
            .iter()
            .position(|h| *h == "RetransSegs")
            .and_then(|i| tcp[1].get(i)?.parse().ok())
            .unwrap_or(0)
    }

    fn start_flow(&self, tag: &str) -> Result<(Child, std::path::PathBuf, std::path::PathBuf)> {
        let out = self.dir.path().join(format!("flow-{tag}"));
        let stop = self.dir.path().join(format!("stop-{tag}"));
        let child = self
            .py(
                FLOW,
                &[
                    &self.web_ip.to_string(),
                    out.to_str().unwrap(),
                    stop.to_str().unwrap(),
                ],
            )
            .spawn()?;
        Ok((child, out, stop))
    }

    /// Stops a flow; (requests answered, requests failed).
    fn end_flow(&self, flow: (Child, std::path::PathBuf, std::path::PathBuf)) -> (u64, u64) {
        let (mut child, out, stop) = flow;
        let _ = std::fs::write(&stop, "");
        let _ = child.wait();
        let text = std::fs::read_to_string(out).unwrap_or_default();
        let mut f = text.split_whitespace().map(|n| n.parse().unwrap_or(0));
        (f.next().unwrap_or(0), f.next().unwrap_or(0))
    }

    fn download_mbps(&self) -> Result<f64> {
        let out = self.py(DOWNLOAD, &[&self.web_ip.to_string()]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut f = text.split_whitespace();
        let bytes: f64 = f.next().context("download failed")?.parse()?;
        let secs: f64 = f.next().context("download failed")?.parse()?;
        Ok(bytes * 8.0 / secs / 1e6)
    }
}

pub async fn splice(data_dir: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let client = crate::vroomd::connect(data_dir).await?;
    for image in ["web", "l2-firewall", "firewall"] {
        vroom::session::build_from_catalog_if_missing(&client, image, true).await?;
    }
    let tag = std::process::id() % 10000;
    let net = format!("bsp{tag}");
    let network = client
        .create_network(&NetworkSpec::plain(Name::new(&net)?))
        .await?;
    let web = format!("bsp{tag}-web");
    let ns = format!("vrbsp{tag}");
    let veth = format!("vrbsp{tag}");
    let result = async {
        let on_net = |role: Option<&str>| nic(&network.name, role);
        client.run(&run_request(&web, "web", vec![on_net(None)])?).await?;
        let instance = vroom::session::wait_ready(&client, &web, Duration::from_secs(130)).await?;
        let web_ip = instance.nics[0].ip.context("the web VM has no address")?;
        client
            .exec(
                &web,
                &ExecRequest {
                    argv: ["/bin/busybox", "dd", "if=/dev/zero", "of=/run/www/big", "bs=1M", "count=16"]
                        .map(String::from)
                        .to_vec(),
                    timeout_secs: Some(60),
                    stdin: false,
                },
            )
            .await?;
        let sh = |cmd: &str| -> Result<()> {
            let ok = Command::new("sh").arg("-c").arg(cmd).status()?.success();
            if !ok {
                bail!("{cmd} failed");
            }
            Ok(())
        };
        let client_ip = vroom_types::Ipv4Net::new(
            Ipv4Addr::from(u32::from(network.subnet.network()) + 200),
            network.subnet.prefix_len(),
        )?;
        sh(&format!("ip netns add {ns}"))?;
        sh(&format!("ip link add {veth} type veth peer name eth0 netns {ns}"))?;
        sh(&format!("ip link set {veth} master {} up", network.bridge))?;
        sh(&format!(
            "ip -n {ns} addr add {client_ip} dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up"
        ))?;
        let bench = Bench {
            client: client.clone(),
            ns: ns.clone(),
            dir: tempfile::tempdir()?,
            web_ip,
        };
        bench.until_ok(Instant::now())?;
        run_all(&bench, &web, &network.name, runs).await?;
        rooms(&client, &network.name, runs.min(3)).await
    }
    .await;
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = Command::new("ip")
        .args(["link", "del", &veth])
        .stderr(Stdio::null())
        .status();
    let _ = client.remove(&web, true).await;
    let _ = client.remove_network(&net).await;
    result
}

async fn run_all(bench: &Bench, web: &str, net: &Name, runs: usize) -> Result<()> {
    let client = &bench.client;
    let fw = format!("{web}-fw");
    let (mut splice_ms, mut switch_ms, mut unsplice_ms, mut run_ms) =
        (vec![], vec![], vec![], vec![]);
    let (mut lost, mut retrans) = ((0, 0), (0, 0));
    let (mut base_lost, mut base_retrans) = ((0, 0), 0);
    let (mut direct, mut through) = (vec![], vec![]);
    for i in 0..runs {
        // Baseline: `vroom run` of the same appliance, to ready.
        let probe = format!("{web}-r{i}");
        let started = Instant::now();
        client
            .run(&run_request(
                &probe,
                "l2-firewall",
                vec![nic(net, Some("outside")), nic(net, Some("inside"))],
            )?)
            .await?;
        vroom::session::wait_ready(client, &probe, Duration::from_secs(130)).await?;
        run_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        client.remove(&probe, true).await?;

        direct.push(bench.download_mbps()?);

        // The same flow for as long, without splicing.
        let before = bench.retransmits();
        let flow = bench.start_flow(&format!("base{i}"))?;
        tokio::time::sleep(Duration::from_millis(run_ms[i] as u64 + 1500)).await;
        let (ok, failed) = bench.end_flow(flow);
        base_lost = (base_lost.0 + failed, base_lost.1 + ok + failed);
        base_retrans += bench.retransmits() - before;

        let before = bench.retransmits();
        let flow = bench.start_flow(&format!("splice{i}"))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        client
            .splice(&SpliceRequest {
                appliance: "l2-firewall".into(),
                vm: Name::new(web)?,
                nic: None,
                fail: None,
                name: Some(Name::new(&fw)?),
                ready_timeout_secs: Some(120),
            })
            .await?;
        let returned = started.elapsed().as_secs_f64() * 1000.0;
        let answered = bench.until_ok(started)?;
        splice_ms.push(answered);
        switch_ms.push(answered - returned);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (ok, failed) = bench.end_flow(flow);
        lost = (lost.0 + failed, lost.1 + ok + failed);
        retrans.0 += bench.retransmits() - before;

        through.push(bench.download_mbps()?);

        let before = bench.retransmits();
        let flow = bench.start_flow(&format!("unsplice{i}"))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        client.unsplice(&fw).await?;
        unsplice_ms.push(bench.until_ok(started)?);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (ok, failed) = bench.end_flow(flow);
        lost = (lost.0 + failed, lost.1 + ok + failed);
        retrans.1 += bench.retransmits() - before;
    }
    println!("splice an l2-firewall in front of a running web VM, {runs} runs:");
    println!(
        "  splice, command to traffic through it   median {:>6.0} ms  p90 {:>6.0} ms",
        median(&splice_ms),
        p90(&splice_ms)
    );
    println!(
        "  baseline: vroom run of the appliance    median {:>6.0} ms  p90 {:>6.0} ms  (ratio splice/run {:.2}x)",
        median(&run_ms),
        p90(&run_ms),
        median(&splice_ms) / median(&run_ms)
    );
    println!(
        "  of which after the appliance was ready  median {:>6.0} ms  p90 {:>6.0} ms",
        median(&switch_ms),
        p90(&switch_ms)
    );
    println!(
        "  unsplice, command to the direct path    median {:>6.0} ms  p90 {:>6.0} ms",
        median(&unsplice_ms),
        p90(&unsplice_ms)
    );
    println!(
        "  a running flow (request every 20 ms): {} of {} requests failed across splices and unsplices (baseline without splicing: {} of {}); TCP retransmits {} at splice, {} at unsplice (baseline {})",
        lost.0, lost.1, base_lost.0, base_lost.1, retrans.0, retrans.1, base_retrans
    );
    println!(
        "  16 MB HTTP download: direct median {:.0} Mbit/s, through the spliced l2-firewall median {:.0} Mbit/s (ratio {:.2}x)",
        median(&direct),
        median(&through),
        median(&through) / median(&direct)
    );
    Ok(())
}

pub(crate) fn run_request(name: &str, image: &str, nics: Vec<NicSpec>) -> Result<RunRequest> {
    Ok(RunRequest {
        spec: InstanceSpec {
            name: Name::new(name)?,
            image: image.into(),
            mem_mib: None,
            cpus: 1,
            nics,
            accel: AccelChoice::Auto,
            config_volume_kib: None,
            ephemeral: false,
            volumes: Vec::new(),
        },
        ready_timeout_secs: Some(120),
        from_snapshot: None,
        cold: false,
        placement: Default::default(),
        env: Default::default(),
    })
}

fn nic(network: &Name, role: Option<&str>) -> NicSpec {
    NicSpec {
        network: network.clone(),
        ip: None,
        role: role.map(|r| Name::new(r).expect("invariant: valid role")),
    }
}

/// Room create-to-serving: `room create`, a web server in its dmz and a port
/// exposed, until the host gets the page through the firewall's wan address;
/// against `vroom run` of the web server alone to its first answer.
async fn rooms(client: &Client, wan: &Name, runs: usize) -> Result<()> {
    use vroom_types::{Expose, Protocol, RoomSpec, Segment};
    let (mut room_ms, mut web_ms) = (vec![], vec![]);
    let tag = std::process::id() % 1000;
    for i in 0..runs {
        let web = format!("bsw{tag}x{i}");
        let started = Instant::now();
        let instance = client
            .run(&run_request(&web, "web", vec![nic(wan, None)])?)
            .await?;
        let ip = instance.nics[0].ip.context("the web VM has no address")?;
        wait_http(ip, 80)?;
        web_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        client.remove(&web, true).await?;

        let name = Name::new(&format!("bsr{tag}x{i}"))?;
        let started = Instant::now();
        let room = client
            .create_room(&RoomSpec {
                name: name.clone(),
                wan: Some(wan.clone()),
                networks: Default::default(),
            })
            .await?;
        client
            .run(&run_request(
                &web,
                "web",
                vec![nic(room.network(Segment::Dmz), None)],
            )?)
            .await?;
        client
            .expose(
                name.as_str(),
                &Expose {
                    port: 8080,
                    proto: Protocol::Tcp,
                    to: Name::new(&web)?,
                    to_port: 80,
                },
            )
            .await?;
        let fw = client.get(room.firewall.as_str()).await?;
        let wan_ip = fw.nics[0].ip.context("the firewall has no wan address")?;
        wait_http(wan_ip, 8080)?;
        room_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        client.remove_room(name.as_str(), true).await?;
    }
    println!("room create to serving, {runs} runs (room create, a web server in its dmz, a port exposed, until the host gets the page through the firewall):");
    println!(
        "  room                                     median {:>6.0} ms  p90 {:>6.0} ms",
        median(&room_ms),
        p90(&room_ms)
    );
    println!(
        "  baseline: vroom run web to its page      median {:>6.0} ms  p90 {:>6.0} ms  (ratio {:.2}x)",
        median(&web_ms),
        p90(&web_ms),
        median(&room_ms) / median(&web_ms)
    );
    Ok(())
}

/// Polls `http://ip:port/` from the host until it answers 200 (120 s at most).
fn wait_http(ip: Ipv4Addr, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !http_ok_on(ip, port) {
        if Instant::now() > deadline {
            bail!("no HTTP answer from {ip}:{port} within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
