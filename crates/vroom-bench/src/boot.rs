//! `vroom bench boot`: boot-to-ready through vroom against the equivalent raw
//! QEMU command line (same kernel, initramfs, root image, memory and devices),
//! measured in the same run. "Ready" is the same event for both: the guest
//! agent reports ready (services up, health check passing).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_agent_proto::volume::{InstanceFile, NicConfig, VOLUME_VERSION};
use vroom_core::agent::AgentClient;
use vroom_core::driver::{LaunchNic, LaunchSpec, VmDriver};
use vroom_core::images::ImageSource;
use vroom_types::{AccelChoice, BootPhases, InstanceSpec, Name, NetworkSpec, NicSpec, RunRequest};

use vroom::paths;

use crate::stats::{median, p90};

pub async fn boot(data_dir: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let client = crate::vroomd::connect(data_dir).await?;
    let net_name = format!("bench{}", std::process::id() % 10000);
    let network = client
        .create_network(&NetworkSpec::plain(Name::new(&net_name)?))
        .await?;
    let result = measure(&client, data_dir, &network.name, runs).await;
    let _ = client.remove_network(&net_name).await;
    let (vroom, raw) = result?;
    println!(
        "boot to guest ready, {runs} runs each (hello image, {} MiB):",
        vroom.mem_mib
    );
    print_comparison(("raw qemu", &raw), ("vroom run", &vroom), "vroom/raw");
    Ok(())
}

/// Both rows, then our figure over the baseline's.
fn print_comparison(baseline: (&str, &Series), ours: (&str, &Series), ratio: &str) {
    let ((base_label, base), (our_label, our)) = (baseline, ours);
    print_row(base_label, base);
    print_row(our_label, our);
    println!(
        "ratio {ratio}: median {:.3}x, p90 {:.3}x; RSS ratio {:.2}x",
        median(&our.ms) / median(&base.ms),
        p90(&our.ms) / p90(&base.ms),
        median(&our.rss_mib) / median(&base.rss_mib)
    );
}

#[derive(Default)]
struct Series {
    ms: Vec<f64>,
    rss_mib: Vec<f64>,
    mem_mib: u64,
    /// The guest's own share of each boot: the kernel's, init's.
    kernel_ms: Vec<f64>,
    init_ms: Vec<f64>,
}

impl Series {
    fn phases(&mut self, phases: Option<BootPhases>) {
        if let Some(p) = phases {
            self.kernel_ms.push(p.kernel_ms as f64);
            self.init_ms.push(p.init_ms as f64);
        }
    }
}

fn print_row(label: &str, s: &Series) {
    println!(
        "  {label:<10} median {:>7.0} ms  p90 {:>7.0} ms  QEMU RSS median {:>5.0} MiB",
        median(&s.ms),
        p90(&s.ms),
        median(&s.rss_mib)
    );
    if s.kernel_ms.len() == s.ms.len() && !s.ms.is_empty() {
        let (kernel, init) = (median(&s.kernel_ms), median(&s.init_ms));
        println!(
            "  {:<10} of which the kernel {kernel:.0} ms, init to ready {init:.0} ms, the rest (QEMU, firmware, loading, the host hearing of it) {:.0} ms",
            "",
            median(&s.ms) - kernel - init
        );
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn measure(
    client: &vroom_client::Client,
    data_dir: &Path,
    net: &Name,
    runs: usize,
) -> Result<(Series, Series)> {
    let mut vroom = Series::default();
    let mut raw = Series::default();
    let images = paths::local_images(data_dir);
    let image = images
        .resolve("hello")
        .context("cannot resolve the hello image")?;
    let driver = qemu_driver(vroom_qemu::JailMode::Unjailed);
    let accel = driver.resolve_accel(AccelChoice::Auto)?;
    // Interleave the two so that machine noise hits both alike.
    for i in 0..runs {
        let name = format!("bench-{}-{i}", std::process::id() % 10000);
        let started = Instant::now();
        client.run(&cold_run(&name, &image.id, net, 120)?).await?;
        let instance = vroom::session::wait_ready(client, &name, Duration::from_secs(130)).await?;
        vroom.ms.push(started.elapsed().as_secs_f64() * 1000.0);
        vroom
            .rss_mib
            .push(rss_mib(instance.status.pid.unwrap_or(0)));
        vroom.mem_mib = instance.mem_mib;
        vroom.phases(instance.status.boot_phases);
        client.remove(&name, true).await?;

        let boot = raw_boot_with(
            &driver,
            &image,
            accel,
            &format!("vrbench{}", i % 100),
            None,
            Duration::ZERO,
        )
        .await?;
        raw.ms.push(boot.ready_ms);
        raw.rss_mib.push(boot.rss_mib);
        raw.phases(boot.phases);
    }
    Ok((vroom, raw))
}

/// A cold `vroom run` of image `image` named `name` with one NIC on `net`.
pub(crate) fn cold_run(
    name: &str,
    image: &str,
    net: &Name,
    ready_timeout_secs: u64,
) -> Result<RunRequest> {
    Ok(RunRequest {
        spec: InstanceSpec {
            name: Name::new(name)?,
            image: image.to_string(),
            mem_mib: None,
            cpus: 1,
            nics: vec![NicSpec {
                network: net.clone(),
                ip: None,
                role: None,
            }],
            accel: AccelChoice::Auto,
            config_volume_kib: None,
            ephemeral: false,
            volumes: Vec::new(),
        },
        ready_timeout_secs: Some(ready_timeout_secs),
        from_snapshot: None,
        cold: true,
        placement: Default::default(),
        env: Default::default(),
    })
}

pub(crate) fn qemu_driver(mode: vroom_qemu::JailMode) -> vroom_qemu::QemuDriver {
    vroom_qemu::QemuDriver::new(std::env::var_os("VROOM_QEMU").map(Into::into), mode)
}

/// `vroom bench jail`: boot-to-ready of the hello image's QEMU, jailed
/// (own uid, cgroup, mount namespace, seccomp) against unjailed, through the
/// same driver and fd passing, interleaved in one run.
pub async fn jail(data_dir: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let image = paths::local_images(data_dir)
        .resolve("hello")
        .context("cannot resolve the hello image (run `vroom run hello` once to build it)")?;
    let jailed = qemu_driver(vroom_qemu::JailMode::Jailed);
    let unjailed = qemu_driver(vroom_qemu::JailMode::Unjailed);
    let accel = jailed.resolve_accel(AccelChoice::Auto)?;
    let empty = || Series {
        mem_mib: image.manifest.default_mem_mib,
        ..Series::default()
    };
    let (mut with, mut without) = (empty(), empty());
    let tag = std::process::id() % 1000;
    // Jailer start to QMP greeting: the jail's own work, without the guest's boot.
    let mut launch_ms: (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    for i in 0..runs {
        for (driver, tap, series, launches) in [
            (&unjailed, "u", &mut without, &mut launch_ms.0),
            (&jailed, "j", &mut with, &mut launch_ms.1),
        ] {
            let tap = format!("vrbj{tap}{tag}x{i}");
            let boot = raw_boot_with(driver, &image, accel, &tap, None, Duration::ZERO).await?;
            launches.push(boot.launch_ms);
            series.ms.push(boot.ready_ms);
            series.rss_mib.push(boot.rss_mib);
            series.phases(boot.phases);
        }
    }
    println!(
        "QEMU start to guest ready, {runs} runs each (hello image, {} MiB, {accel}):",
        with.mem_mib
    );
    print_comparison(("unjailed", &without), ("jailed", &with), "jailed/unjailed");
    println!(
        "launch alone (jailer start to QMP greeting): unjailed median {:.0} ms, jailed median {:.0} ms",
        median(&launch_ms.0),
        median(&launch_ms.1)
    );
    Ok(())
}

/// What [`raw_boot_with`] measured.
pub(crate) struct RawBoot {
    pub ready_ms: f64,
    pub rss_mib: f64,
    /// QEMU's proportional set size, `settle` after ready.
    pub pss_mib: f64,
    pub launch_ms: f64,
    /// The guest's own share of the boot, as it reported it.
    pub phases: Option<BootPhases>,
}

/// A QEMU's proportional set size in MiB (0 when it is gone).
pub(crate) fn pss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// One boot with the QEMU command line vroom would use, without the
/// daemon: a translation cache of `tb_mib` (the driver's choice when
/// `None`), and QEMU's PSS measured `settle` after ready.
pub(crate) async fn raw_boot_with(
    driver: &vroom_qemu::QemuDriver,
    image: &vroom_core::images::BootImage,
    accel: vroom_types::Accel,
    tap: &str,
    tb_mib: Option<u32>,
    settle: Duration,
) -> Result<RawBoot> {
    let dir = tempfile::tempdir()?;
    let mac = "52:54:00:be:4c:01".to_string();
    let identity = InstanceFile {
        version: VOLUME_VERSION,
        hostname: "raw".into(),
        nics: vec![NicConfig {
            mac: mac.clone(),
            role: None,
            address: Some("10.254.0.2".into()),
            prefix_len: 24,
            gateway: None,
        }],
        machine_id: None,
        volumes: Vec::new(),
    };
    vroom_volume::create(
        &dir.path().join("config.img"),
        1440,
        &identity,
        &image.manifest.appliance.seed_config,
    )?;
    // The run dir's name names the VMM's cgroup: the tempdir's is unique.
    let id = dir
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let spec = LaunchSpec {
        instance_id: id.clone(),
        name: "raw".into(),
        run_dir: dir.path().to_path_buf(),
        kernel: image.kernel.clone(),
        initramfs: image.initramfs.clone(),
        cmdline: image.manifest.cmdline.clone(),
        acpi: image.manifest.kernel.flavor.acpi(),
        tcg_tb_mib: tb_mib,
        mem_mib: image.manifest.default_mem_mib,
        cpus: 1,
        accel,
        root_disk: image.rootfs.clone(),
        config_disk: dir.path().join("config.img"),
        data_disks: vec![],
        nics: vec![LaunchNic {
            tap: tap.to_string(),
            mac,
        }],
        agent_socket: dir.path().join("agent.sock"),
        console_socket: dir.path().join("console.sock"),
        incoming: false,
    };
    let started = Instant::now();
    let process = driver.launch(&spec).await?;
    let launched = started.elapsed().as_secs_f64() * 1000.0;
    let agent = AgentClient::new(spec.agent_socket.clone());
    let (ready, phases) = match wait_agent_ready(&agent, started, Duration::from_secs(120)).await {
        Ok(ready) => ready,
        Err(e) => {
            let _ = driver.kill(&process);
            return Err(e);
        }
    };
    let rss = rss_mib(process.pid);
    tokio::time::sleep(settle).await;
    let pss = pss_mib(process.pid);
    driver.kill(&process)?;
    driver.wait_exit(&process).await;
    Ok(RawBoot {
        ready_ms: ready,
        rss_mib: rss,
        pss_mib: pss,
        launch_ms: launched,
        phases,
    })
}

/// Waits until a guest's agent reports ready (it answers a `WaitReady`
/// when it is, as vroomd asks it): milliseconds since `started` and the
/// guest's share of them, or an error after `timeout`.
pub(crate) async fn wait_agent_ready(
    agent: &AgentClient,
    started: Instant,
    timeout: Duration,
) -> Result<(f64, Option<BootPhases>)> {
    let deadline = started + timeout;
    loop {
        let asked = Instant::now();
        if let Ok(h) = agent.wait_ready(Duration::from_secs(1)).await {
            if h.ready {
                let phases = h.boot.map(|b| BootPhases {
                    kernel_ms: b.init_ms,
                    init_ms: b.ready_ms.saturating_sub(b.init_ms),
                });
                return Ok((started.elapsed().as_secs_f64() * 1000.0, phases));
            }
        }
        if Instant::now() > deadline {
            bail!("raw QEMU boot did not become ready");
        }
        // Not connected yet (or an early answer): look again shortly.
        if asked.elapsed() < Duration::from_millis(500) {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}
