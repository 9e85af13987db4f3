//! `vroom bench qemu`: the machine's QEMU (7.2 on Debian 12, the baseline)
//! against QEMU 10 unpacked by `vroom setup --qemu 10`, in one run: the web
//! appliance's cold boot to ready and warm start to ready (one vroomd per
//! QEMU, each in a data dir and interface prefix of its own, starts
//! interleaved), then live migration of hello between two cluster nodes
//! (one lab per QEMU, as `vroom bench migrate` moves it). Each figure is
//! printed for both with the ratio QEMU 10 / baseline: below 1 is faster.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_client::Client;
use vroom_types::{Name, NetworkSpec, WarmRequest};

use crate::stats::{median, p90};

const IMAGE: &str = "web";

/// One QEMU under test.
struct Qemu {
    label: String,
    binary: PathBuf,
}

impl Qemu {
    fn find(explicit: Option<&Path>, what: &str) -> Result<Qemu> {
        let binary = vroom_qemu::vmm::locate(explicit)
            .with_context(|| format!("no {what} (`vroom setup --qemu 10` unpacks QEMU 10)"))?;
        let probe = vroom_qemu::vmm::probe(&binary);
        probe.check(&binary)?;
        Ok(Qemu {
            label: format!("QEMU {}", probe.version.unwrap_or_default()),
            binary,
        })
    }
}

/// A vroomd of its own for one QEMU: its data dir and interface prefix.
struct Daemon {
    dir: PathBuf,
    child: Child,
    client: Client,
}

impl Daemon {
    async fn start(dir: &Path, prefix: &str, qemu: &Qemu) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("vroomd.log"))?;
        let child = Command::new(crate::vroomd::vroom_exe()?)
            .arg("--data-dir")
            .arg(dir)
            .arg("daemon")
            .env("VROOM_QEMU", &qemu.binary)
            .env("VROOM_IFACE_PREFIX", prefix)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start vroomd")?;
        let mut daemon = Daemon {
            dir: dir.to_path_buf(),
            child,
            client: Client::new(&vroom::paths::socket(dir)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while daemon.client.version().await.is_err() {
            if Instant::now() > deadline || daemon.child.try_wait()?.is_some() {
                bail!(
                    "the vroomd for {} did not come up; see {}",
                    qemu.label,
                    daemon.dir.join("vroomd.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(daemon)
    }

    /// Removes what the bench made, then stops the daemon.
    async fn finish(mut self, net: &str) {
        for instance in self.client.list().await.unwrap_or_default() {
            let _ = self.client.remove(instance.spec.name.as_str(), true).await;
        }
        for snapshot in self.client.snapshots(true).await.unwrap_or_default() {
            let _ = self.client.remove_snapshot(snapshot.name.as_str()).await;
        }
        let _ = self.client.remove_network(net).await;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn qemu(data_dir: &Path, runs: usize, migrations: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let base = Qemu::find(None, "qemu-system-x86_64 on PATH")?;
    let ten_path = vroom::paths::private_qemu("10");
    let ten = Qemu::find(
        Some(&ten_path),
        &format!("QEMU 10 at {}", ten_path.display()),
    )?;
    println!(
        "baseline {} ({}) against {} ({}), TCG, interleaved",
        base.label,
        base.binary.display(),
        ten.label,
        ten.binary.display()
    );
    let tag = std::process::id() % 1000;
    let net = format!("bq{tag}");
    let mut daemons = vec![];
    for (i, qemu) in [&base, &ten].into_iter().enumerate() {
        let dir = data_dir.join(format!("bench-qemu-{i}"));
        daemons.push(Daemon::start(&dir, &format!("bq{i}"), qemu).await?);
    }
    let result = starts(&daemons, &net, runs).await;
    for daemon in daemons {
        daemon.finish(&net).await;
    }
    let (cold, warm) = result?;
    compare("boot to ready (cold)", "s", &cold, &base, &ten);
    compare("warm start to ready", "s", &warm, &base, &ten);
    if migrations > 0 {
        let mut moved = vec![];
        for qemu in [&base, &ten] {
            let env = vec![("VROOM_QEMU".to_string(), qemu.binary.display().to_string())];
            let mut m = None;
            crate::failover::on_lab_with(env, |lab| {
                m = Some(crate::migrate::move_hello(lab, migrations)?);
                Ok(())
            })?;
            let m = m.context("the lab measured nothing")?;
            if !m.failures.is_empty() {
                bail!("{}: {}", qemu.label, m.failures.join("; "));
            }
            moved.push(m);
        }
        compare(
            "live migration, total (hello, 2 nodes)",
            "ms",
            &[moved[0].totals.clone(), moved[1].totals.clone()],
            &base,
            &ten,
        );
        compare(
            "live migration, QEMU's downtime",
            "ms",
            &[moved[0].downtimes.clone(), moved[1].downtimes.clone()],
            &base,
            &ten,
        );
    }
    Ok(())
}

/// Cold and warm starts of the web appliance on each daemon, interleaved:
/// (cold, warm), each [baseline, QEMU 10] in seconds.
async fn starts(
    daemons: &[Daemon],
    net: &str,
    runs: usize,
) -> Result<([Vec<f64>; 2], [Vec<f64>; 2])> {
    for d in daemons {
        vroom::session::build_from_catalog_if_missing(&d.client, IMAGE, true).await?;
        d.client
            .create_network(&NetworkSpec::plain(Name::new(net)?))
            .await?;
        d.client.warm_image(IMAGE, &WarmRequest::default()).await?;
    }
    let mut cold: [Vec<f64>; 2] = Default::default();
    let mut warm: [Vec<f64>; 2] = Default::default();
    for k in 0..runs {
        for (i, d) in daemons.iter().enumerate() {
            for (is_cold, out) in [(true, &mut cold[i]), (false, &mut warm[i])] {
                let name = format!("{net}-{}{k}", if is_cold { "c" } else { "w" });
                let req = crate::warm::one_nic_request(&name, IMAGE, net, is_cold, None)?;
                let (secs, from) = crate::warm::start(&d.client, &req).await?;
                if is_cold != from.is_none() {
                    bail!(
                        "{name} started from {from:?}, expected a {} start",
                        if is_cold { "cold" } else { "warm" }
                    );
                }
                out.push(secs);
                d.client.remove(&name, true).await?;
            }
        }
    }
    Ok((cold, warm))
}

/// One row: each QEMU's median and p90, and the ratio of the medians.
fn compare(what: &str, unit: &str, figures: &[Vec<f64>; 2], base: &Qemu, ten: &Qemu) {
    let shown = |v: &[f64]| {
        if unit == "s" {
            format!("median {:.3} s, p90 {:.3} s", median(v), p90(v))
        } else {
            format!("median {:.0} ms, p90 {:.0} ms", median(v), p90(v))
        }
    };
    println!(
        "{what}: {} {}; {} {} ({:.2}x the baseline, n={})",
        base.label,
        shown(&figures[0]),
        ten.label,
        shown(&figures[1]),
        median(&figures[1]) / median(&figures[0]).max(f64::MIN_POSITIVE),
        figures[0].len()
    );
}
