//! `vroom bench migrate`: a throwaway two-node cluster on this machine (as
//! `bench failover` builds it) and the hello appliance, moved between the
//! nodes again and again with `vroom migrate`. A client namespace plugged
//! into node 1's bridge opens a TCP connection to the guest every 10 ms;
//! the longest silence around each move is the downtime a client sees,
//! next to QEMU's own measure. The baseline is the move without live
//! migration, measured in the same run: remove the instance, run it cold
//! on the other node, until it answers.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_cluster::lab::{wait, Lab};

use crate::bench::{median, p90};

const PROBE_EVERY: Duration = Duration::from_millis(10);

/// Opens a connection to `addr` every 10 ms from network namespace `ns`,
/// and keeps the times of those that were answered.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Instant>>>,
}

impl Prober {
    fn start(ns: &str, addr: SocketAddr) -> Result<Prober> {
        let netns = std::fs::File::open(format!("/run/netns/{ns}"))
            .with_context(|| format!("no network namespace {ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let (entered, joined) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on this thread alone, with a namespace fd we own.
            let moved = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
            let _ = entered.send(moved);
            let mut answered = vec![];
            while moved && !halt.load(Ordering::SeqCst) {
                let sent = Instant::now();
                if TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok() {
                    answered.push(sent);
                }
                std::thread::sleep(PROBE_EVERY.saturating_sub(sent.elapsed()));
            }
            answered
        });
        if !joined.recv().unwrap_or(false) {
            bail!("cannot enter network namespace {ns}");
        }
        Ok(Prober {
            stop,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Vec<Instant> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// The longest gap between answered probes that overlaps `window`, less
/// one probe interval: how long a client saw nothing.
fn silence(answered: &[Instant], window: (Instant, Instant)) -> Option<f64> {
    answered
        .windows(2)
        .filter(|w| w[1] >= window.0 && w[0] <= window.1)
        .map(|w| (w[1] - w[0]).saturating_sub(PROBE_EVERY).as_secs_f64() * 1000.0)
        .reduce(f64::max)
}

pub async fn migrate(runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::bench_failover::on_lab(|lab| measure(lab, runs))
}

fn vroom(lab: &Lab, i: usize, args: &[&str]) -> Result<String> {
    let out = lab.command(i).args(args).output()?;
    if !out.status.success() {
        bail!(
            "vroom {} on {}: {}",
            args.join(" "),
            lab.nodes[i].name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(lab: &Lab, i: usize, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    Ok(serde_json::from_str(&vroom(lab, i, &all)?)?)
}

fn measure(lab: &Lab, runs: usize) -> Result<()> {
    for i in 0..2 {
        vroom(lab, i, &["image", "build", "hello"])?;
    }
    let name = "mig";
    vroom(
        lab,
        0,
        &["run", "hello", "--name", name, "--cold", "--node", "n1"],
    )?;
    let instance = json(lab, 0, &["inspect", name])?;
    let ip: Ipv4Addr = instance["nics"][0]["ip"]
        .as_str()
        .context("the instance has no address")?
        .parse()?;
    let mem = instance["mem_mib"].as_u64().unwrap_or(0);
    let net = json(lab, 0, &["net", "inspect", "default"])?;
    let bridge = net["bridge"].as_str().context("no bridge")?;
    let subnet: vroom_types::Ipv4Net = net["subnet"].as_str().context("no subnet")?.parse()?;
    let client_ip = Ipv4Addr::from(u32::from(subnet.network()) + 250);
    let ns = lab
        .plug_client(0, bridge, &format!("{client_ip}/{}", subnet.prefix_len()))
        .map_err(anyhow::Error::msg)?;
    let addr = SocketAddr::from((ip, 80));
    let prober = Prober::start(&ns, addr)?;
    let first = wait(Duration::from_secs(60), || {
        lab.page_from(0, &ip.to_string())
    });
    first.context("the instance never answered")?;
    std::thread::sleep(Duration::from_millis(500));

    let mut totals = vec![];
    let mut downtimes = vec![];
    let mut windows = vec![];
    let mut at = 0usize;
    for _ in 0..runs {
        let to = 1 - at;
        let started = Instant::now();
        let m = json(lab, at, &["migrate", name, "--to", &lab.nodes[to].name])?;
        let ended = Instant::now();
        totals.push((ended - started).as_secs_f64() * 1000.0);
        downtimes.push(m["downtime_ms"].as_f64().unwrap_or(0.0));
        windows.push((started, ended));
        at = to;
        // Settle before the next move: the source's copy gone, the status published.
        std::thread::sleep(Duration::from_millis(300));
    }
    // Baseline: the same move without live migration.
    let mut cold = vec![];
    let mut cold_windows = vec![];
    for _ in 0..runs.clamp(3, 5) {
        let to = 1 - at;
        let started = Instant::now();
        vroom(lab, at, &["rm", "--force", name])?;
        vroom(
            lab,
            at,
            &[
                "run",
                "hello",
                "--name",
                name,
                "--cold",
                "--node",
                &lab.nodes[to].name,
            ],
        )?;
        let up = wait(Duration::from_secs(60), || {
            lab.page_from(to, &ip.to_string()).map(|_| Instant::now())
        })
        .context("the cold move never answered")?;
        cold.push((up - started).as_secs_f64() * 1000.0);
        cold_windows.push((started, up));
        at = to;
    }
    let answered = prober.finish();
    let seen: Vec<f64> = windows
        .iter()
        .filter_map(|w| silence(&answered, *w))
        .collect();
    let cold_seen: Vec<f64> = cold_windows
        .iter()
        .filter_map(|w| silence(&answered, *w))
        .collect();
    println!(
        "baseline: stop and cold boot on the other node: median {:.0} ms, p90 {:.0} ms; a client saw no answer for median {:.0} ms (n={})",
        median(&cold),
        p90(&cold),
        median(&cold_seen),
        cold.len()
    );
    println!(
        "migrate ({mem} MiB guest): total median {:.0} ms, p90 {:.0} ms ({:.2}x the cold move) (n={})",
        median(&totals),
        p90(&totals),
        median(&totals) / median(&cold),
        totals.len()
    );
    println!(
        "migrate downtime: QEMU median {:.0} ms, p90 {:.0} ms; a client probing every 10 ms saw no answer for median {:.0} ms, p90 {:.0} ms ({:.3}x the cold move's)",
        median(&downtimes),
        p90(&downtimes),
        median(&seen),
        p90(&seen),
        median(&seen) / median(&cold_seen).max(1.0)
    );
    Ok(())
}
