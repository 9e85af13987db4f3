//! `vroom bench failover`: a throwaway cluster on this machine — three etcd
//! members on an underlay bridge, two nodes in network namespaces, each with
//! its own vroomd, guard and data dir — and the hello appliance with
//! `--ha restart`, then `--ha standby`. Faults are injected in turn (power
//! loss, a frozen vroomd, an etcd partition) and each is timed from the
//! fault to the instance answering HTTP on its own address from the other
//! node. A 20 ms scan of both nodes' cgroups counts double runs. The
//! baseline is a cold `vroom run` to answering on the same machine, in the
//! same run. Last, the etcd load: writes per second per idle instance.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_lab::{wait, Lab};

use crate::stats::{median, p90};

#[derive(Clone, Copy, Debug)]
enum Fault {
    PowerLoss,
    Freeze,
    Partition,
}

const FAULTS: [Fault; 3] = [Fault::PowerLoss, Fault::Freeze, Fault::Partition];

/// The lab plus the bench's own helpers.
pub(crate) struct Cluster<'a>(pub(crate) &'a Lab);

impl std::ops::Deref for Cluster<'_> {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.0
    }
}

impl Cluster<'_> {
    pub(crate) fn ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.command(i).args(args).output()?;
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

    pub(crate) fn answers(&self, i: usize, ip: &str) -> bool {
        self.page_from(i, ip).is_some()
    }

    fn inject(&self, i: usize, fault: Fault) -> Result<()> {
        match fault {
            Fault::PowerLoss => self.power_loss(i),
            Fault::Freeze => self.freeze(i, true),
            Fault::Partition => self.partition(i, true).map_err(anyhow::Error::msg)?,
        }
        Ok(())
    }

    /// Brings a faulted node back as a healthy member.
    fn heal(&self, i: usize, fault: Fault) -> Result<()> {
        match fault {
            Fault::PowerLoss => self.start(i).map_err(anyhow::Error::msg)?,
            Fault::Freeze => self.freeze(i, false),
            Fault::Partition => self.partition(i, false).map_err(anyhow::Error::msg)?,
        }
        Ok(())
    }
}

pub async fn failover(runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    on_lab(|lab| measure(&Cluster(lab), runs))
}

/// Runs `bench` on a throwaway two-node lab (blocking), showing the end of
/// every node's log when it fails.
pub(crate) fn on_lab(bench: impl FnOnce(&Lab) -> Result<()>) -> Result<()> {
    on_lab_with(vec![], bench)
}

/// [`on_lab`] with `env` given to every vroom of the lab (`VROOM_QEMU`).
pub(crate) fn on_lab_with(
    env: Vec<(String, String)>,
    bench: impl FnOnce(&Lab) -> Result<()>,
) -> Result<()> {
    tokio::task::block_in_place(|| {
        let exe = crate::vroomd::vroom_exe()?;
        let lab = Lab::build(&exe, 'b', 2, env).map_err(anyhow::Error::msg)?;
        let result = bench(&lab);
        if result.is_err() {
            for node in &lab.nodes {
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

fn measure(c: &Cluster, runs: usize) -> Result<()> {
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
            let started = Instant::now();
            let up = std::thread::scope(|scope| {
                scope.spawn(|| {
                    while !s.load(Ordering::SeqCst) {
                        let total = (0..2).filter(|i| c.runs(*i, &name).is_some()).count();
                        if total > 1 {
                            d.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                });
                let injected = c.inject(at, fault);
                let up = injected.map(|()| {
                    wait(Duration::from_secs(60), || {
                        (c.runs(other, &name).is_some() && c.answers(other, &ip)).then_some(())
                    })
                });
                s.store(true, Ordering::SeqCst);
                up
            })?;
            let took = started.elapsed().as_secs_f64() * 1000.0;
            c.heal(at, fault)?;
            stop.store(false, Ordering::SeqCst);
            up.with_context(|| format!("{name} did not come back after {fault:?}"))?;
            times.push(took);
            eprintln!("  {ha} {fault:?}: {took:.0} ms");
            // The healed node must be back before the next fault.
            rejoined(c, other, at)?;
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
    let before = c.etcd_revision().context("etcd did not say its revision")?;
    std::thread::sleep(Duration::from_secs(20));
    let after = c.etcd_revision().context("etcd did not say its revision")?;
    println!(
        "etcd load: {:.3} writes/s per idle instance ({} writes in 20 s with {idle} idle instances on 2 nodes; keepalives are not writes)",
        (after - before) as f64 / 20.0 / idle as f64,
        after - before
    );
    Ok(())
}

/// Waits until node `from` sees node `node` alive again.
pub(crate) fn rejoined(c: &Cluster, from: usize, node: usize) -> Result<()> {
    let back = wait(Duration::from_secs(30), || {
        c.ok(from, &["--json", "node", "inspect", &c.nodes[node].name])
            .ok()
            .filter(|s| s.contains("\"alive\": true"))
    });
    back.map(|_| ())
        .with_context(|| format!("node {} did not rejoin", c.nodes[node].name))
}

pub(crate) fn ip_of(c: &Cluster, i: usize, name: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(&c.ok(i, &["--json", "inspect", name])?)?;
    v["nics"][0]["ip"]
        .as_str()
        .map(str::to_string)
        .context("the instance has no address")
}
