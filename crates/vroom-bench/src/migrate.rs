//! `vroom bench migrate`: a throwaway two-node cluster on this machine (as
//! `bench failover` builds it) and the hello appliance, moved between the
//! nodes again and again with `vroom migrate`. A client namespace plugged
//! into node 1's bridge opens a TCP connection to the guest every 10 ms;
//! the longest silence around each move is the downtime a client sees,
//! next to QEMU's own measure. After each move the guest must answer on
//! its new node (its agent and its page): a move that reported success but
//! lost the guest counts as a failure, as does a refused one. `--loaded`
//! repeats the moves with busy loops on every CPU (a loaded host is where
//! moves under traffic once lost guests). The baseline is the move without
//! live migration, measured in the same run: remove the instance, run it
//! cold on the other node, until it answers.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_lab::{wait, BusyLoops, Lab, Prober};

use crate::stats::{median, p90};

/// Busy loops per CPU in the loaded case.
const BUSY_PER_CPU: usize = 3;
/// How long a moved guest has to answer on its new node.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// The longest gap between answered probes that overlaps `window`, less
/// one probe interval: how long a client saw nothing. `None`: no probe was
/// answered after the window began.
fn silence(answered: &[Instant], window: (Instant, Instant)) -> Option<f64> {
    answered
        .windows(2)
        .filter(|w| w[1] >= window.0 && w[0] <= window.1)
        .map(|w| (w[1] - w[0]).saturating_sub(Prober::EVERY).as_secs_f64() * 1000.0)
        .reduce(f64::max)
}

pub async fn migrate(runs: usize, mem: Option<u64>, loaded: bool) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::failover::on_lab(|lab| measure(lab, runs, mem, loaded))
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

/// The moves of one case.
#[derive(Default)]
pub(crate) struct Moves {
    pub(crate) totals: Vec<f64>,
    pub(crate) downtimes: Vec<f64>,
    /// Of the moves whose guest answered after them.
    windows: Vec<(Instant, Instant)>,
    pub(crate) failures: Vec<String>,
}

/// Moves instance `name` back and forth `runs` times, starting on node
/// `at`; checks the guest after each. Returns where it ends.
fn moves(lab: &Lab, name: &str, ip: &str, runs: usize, at: &mut usize) -> Result<Moves> {
    let mut m = Moves::default();
    for k in 0..runs {
        let to = 1 - *at;
        let started = Instant::now();
        let moved = json(lab, *at, &["migrate", name, "--to", &lab.nodes[to].name]);
        let ended = Instant::now();
        let expected = match &moved {
            Ok(said) => {
                m.totals.push((ended - started).as_secs_f64() * 1000.0);
                m.downtimes
                    .push(said["downtime_ms"].as_f64().unwrap_or(0.0));
                to
            }
            Err(e) => {
                m.failures.push(format!("move {k}: refused: {e:#}"));
                *at
            }
        };
        // The guest answers where the move left it, or the move lost it.
        let answered = wait(ANSWER_WITHIN, || lab.guest_answers(expected, name, ip).ok());
        match (answered, &moved) {
            (Some(()), Ok(_)) => m.windows.push((started, ended)),
            (Some(()), Err(_)) => {}
            (None, _) => {
                let why = lab
                    .guest_answers(expected, name, ip)
                    .err()
                    .unwrap_or_default();
                m.failures.push(format!(
                    "move {k}: {} but the guest did not answer on {} within {ANSWER_WITHIN:?}: {why}",
                    if moved.is_ok() { "reported success" } else { "failed" },
                    lab.nodes[expected].name
                ));
                eprintln!("{}", evidence(lab));
                // Wherever the cluster brings it back, the moves go on from there.
                let back = wait(Duration::from_secs(90), || {
                    (0..2).find(|&i| lab.guest_answers(i, name, ip).is_ok())
                });
                *at = back.context("the guest never answered again on either node")?;
                continue;
            }
        }
        *at = expected;
        // Settle before the next move: the source's copy gone, the status published.
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(m)
}

/// What an operator needs to see about a lost guest: each node's last
/// log lines, and each VM's QEMU log and console tail.
fn evidence(lab: &Lab) -> String {
    let tail = |text: &str, n: usize| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    let mut out = String::new();
    for (i, node) in lab.nodes.iter().enumerate() {
        out += &format!("--- {}'s log:\n{}\n", node.name, tail(&lab.log(i), 20));
        let files = std::process::Command::new("find")
            .arg(&node.dir)
            .args(["-name", "qemu.log", "-o", "-name", "console.log"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for file in files.lines() {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            out += &format!("--- {file}:\n{}\n", tail(&text, 15));
        }
    }
    out
}

fn report(label: &str, mem: u64, m: &Moves, answered: &[Instant], cold: &[f64], cold_seen: &[f64]) {
    let runs = m.totals.len() + m.failures.iter().filter(|f| f.contains("refused")).count();
    println!(
        "{label}: {} of {runs} moves kept the guest answering",
        runs - m.failures.len().min(runs)
    );
    for failure in &m.failures {
        println!("  FAILED {failure}");
    }
    let mut lost = 0;
    let seen: Vec<f64> = m
        .windows
        .iter()
        .filter_map(|w| {
            let s = silence(answered, *w);
            lost += usize::from(s.is_none());
            s
        })
        .collect();
    if lost > 0 {
        println!("  FAILED {lost} moves: the 10 ms client was never answered after them");
    }
    if m.totals.is_empty() || seen.is_empty() {
        return;
    }
    println!(
        "{label} ({mem} MiB guest): total median {:.0} ms, p90 {:.0} ms ({:.2}x the cold move) (n={})",
        median(&m.totals),
        p90(&m.totals),
        median(&m.totals) / median(cold),
        m.totals.len()
    );
    println!(
        "{label} downtime: QEMU median {:.0} ms, p90 {:.0} ms; a client probing every 10 ms saw no answer for median {:.0} ms, p90 {:.0} ms ({:.3}x the cold move's)",
        median(&m.downtimes),
        p90(&m.downtimes),
        median(&seen),
        p90(&seen),
        median(&seen) / median(cold_seen).max(1.0)
    );
}

/// hello built on both nodes and run cold on n1 as `name`: its address
/// and memory.
fn hello_on_n1(lab: &Lab, name: &str, mem_arg: Option<&str>) -> Result<(Ipv4Addr, u64)> {
    for i in 0..2 {
        vroom(lab, i, &["image", "build", "hello"])?;
    }
    let mut run = vec!["run", "hello", "--name", name, "--cold", "--node", "n1"];
    if let Some(m) = mem_arg {
        run.extend(["--mem", m]);
    }
    vroom(lab, 0, &run)?;
    let instance = json(lab, 0, &["inspect", name])?;
    let ip: Ipv4Addr = instance["nics"][0]["ip"]
        .as_str()
        .context("the instance has no address")?
        .parse()?;
    Ok((ip, instance["mem_mib"].as_u64().unwrap_or(0)))
}

/// hello moved back and forth `runs` times between the lab's nodes, with
/// no client probing (`vroom bench qemu`).
pub(crate) fn move_hello(lab: &Lab, runs: usize) -> Result<Moves> {
    let (ip, _) = hello_on_n1(lab, "mig", None)?;
    let ip = ip.to_string();
    wait(Duration::from_secs(60), || lab.page_from(0, &ip)).context("hello never answered")?;
    let mut at = 0;
    moves(lab, "mig", &ip, runs, &mut at)
}

fn measure(lab: &Lab, runs: usize, mem: Option<u64>, loaded: bool) -> Result<()> {
    let name = "mig";
    let mem_arg = mem.map(|m| format!("{m}M"));
    let (ip, mem) = hello_on_n1(lab, name, mem_arg.as_deref())?;
    let net = json(lab, 0, &["net", "inspect", "default"])?;
    let bridge = net["bridge"].as_str().context("no bridge")?;
    let subnet: vroom_types::Ipv4Net = net["subnet"].as_str().context("no subnet")?.parse()?;
    let client_ip = Ipv4Addr::from(u32::from(subnet.network()) + 250);
    let ns = lab
        .plug_client(0, bridge, &format!("{client_ip}/{}", subnet.prefix_len()))
        .map_err(anyhow::Error::msg)?;
    let prober = Prober::start(&ns, SocketAddr::from((ip, 80))).map_err(anyhow::Error::msg)?;
    let ip = ip.to_string();
    let first = wait(Duration::from_secs(60), || lab.page_from(0, &ip));
    first.context("the instance never answered")?;
    std::thread::sleep(Duration::from_millis(500));

    let mut at = 0usize;
    let quiet = moves(lab, name, &ip, runs, &mut at)?;
    let busy = if loaded {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        // Bounded even if this process dies: far beyond the moves' time.
        let _load = BusyLoops::start(
            cpus * BUSY_PER_CPU,
            Duration::from_secs(60 * runs as u64 + 120),
        )
        .map_err(anyhow::Error::msg)?;
        std::thread::sleep(Duration::from_secs(2));
        Some(moves(lab, name, &ip, runs, &mut at)?)
    } else {
        None
    };
    // Baseline: the same move without live migration.
    let mut cold = vec![];
    let mut cold_windows = vec![];
    for _ in 0..runs.clamp(3, 5) {
        let to = 1 - at;
        let started = Instant::now();
        vroom(lab, at, &["rm", "--force", name])?;
        let target = lab.nodes[to].name.clone();
        let mut run = vec!["run", "hello", "--name", name, "--cold", "--node", &target];
        if let Some(m) = &mem_arg {
            run.extend(["--mem", m.as_str()]);
        }
        vroom(lab, at, &run)?;
        let up = wait(Duration::from_secs(60), || {
            lab.page_from(to, &ip).map(|_| Instant::now())
        })
        .context("the cold move never answered")?;
        cold.push((up - started).as_secs_f64() * 1000.0);
        cold_windows.push((started, up));
        at = to;
    }
    let answered = prober.finish();
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
    report("migrate", mem, &quiet, &answered, &cold, &cold_seen);
    if let Some(busy) = &busy {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        report(
            &format!("migrate, host loaded ({} busy loops)", cpus * BUSY_PER_CPU),
            mem,
            busy,
            &answered,
            &cold,
            &cold_seen,
        );
    }
    let failed = quiet.failures.len() + busy.as_ref().map_or(0, |b| b.failures.len());
    if failed > 0 {
        bail!("{failed} moves failed or lost the guest");
    }
    Ok(())
}
