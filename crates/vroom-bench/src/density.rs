//! `vroom bench density`: idle hello appliances, as many as fit a memory
//! budget, booted through vroom on vroom's own kernel and, as the baseline
//! measured in the same run, on Debian's cloud kernel. Per kernel: host
//! memory per appliance (the sum of the QEMUs' PSS, so shared pages count
//! once), boot-to-ready of the first and the last, the CPU an idle appliance
//! costs, and what KSM merges when the host runs it. Then, on vroom's
//! kernel, the translation cache size under TCG (`tb-size`) against boot
//! time and memory, from raw QEMU boots.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vroom_client::Client;
use vroom_types::{AccelChoice, Name, NetworkSpec};

use crate::boot::{cold_run, pss_mib, qemu_driver, raw_boot_with};
use crate::stats::{median, p90};
use vroom::paths;

/// How long the appliances idle before memory and CPU are read.
const SETTLE: Duration = Duration::from_secs(10);
/// The window idle CPU is measured over.
const CPU_WINDOW: Duration = Duration::from_secs(10);
/// QEMU's own memory beside the guest's, to size the count from the budget
/// (measured: about 70 MiB under TCG with a 32 MiB translation cache).
const VMM_OVERHEAD_MIB: u64 = 72;
const KSM: &str = "/sys/kernel/mm/ksm";

struct Row {
    kernel: &'static str,
    count: usize,
    mem_mib: u64,
    boot_ms: Vec<f64>,
    pss_mib: f64,
    /// The drop in the host's available memory from before the first boot
    /// to the appliances idling (everything they cost, vroomd's share too).
    host_used_mib: u64,
    cpu_pct: f64,
    /// PSS per appliance with KSM running, and what it shares (MiB).
    ksm: Option<(f64, f64)>,
}

pub async fn density(
    data_dir: &Path,
    budget_mib: u64,
    count: Option<usize>,
    baseline_count: Option<usize>,
    tb_runs: usize,
) -> Result<()> {
    let client = crate::vroomd::connect(data_dir).await?;
    let mut images = vec![];
    for kernel in ["debian", "vroom"] {
        let report = client
            .build_image(Path::new("hello"), false, Some(kernel), |_, _| {})
            .await
            .with_context(|| format!("cannot build hello for the {kernel} kernel"))?;
        images.push((kernel, report.image));
    }
    let net_name = format!("dens{}", std::process::id() % 10000);
    let network = client
        .create_network(&NetworkSpec::plain(Name::new(&net_name)?))
        .await?;
    let mut rows = vec![];
    let mut failure = None;
    for (kernel, image) in &images {
        let mem = image.manifest.default_mem_mib;
        let fits = |mib: u64| (mib / (mem + VMM_OVERHEAD_MIB)) as usize;
        // vroom's kernel at the count asked; the baseline at its own count
        // (what fits the budget by default), never past what fits the
        // host's available memory.
        let n = match *kernel {
            "debian" => baseline_count
                .unwrap_or(fits(budget_mib))
                .min(fits(mem_available_mib() * 9 / 10)),
            _ => count.unwrap_or(fits(budget_mib)),
        }
        .clamp(1, 250);
        match measure(&client, kernel, image, &network.name, n).await {
            Ok(row) => rows.push(row),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let _ = client.remove_network(&net_name).await;
    if let Some(e) = failure {
        return Err(e);
    }
    println!(
        "density: idle hello appliances booted one after another through vroom (budget {budget_mib} MiB)"
    );
    for row in &rows {
        print_row(row);
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if let [(_, debian), (_, vroom)] = &images[..] {
        println!(
            "image hello: {:.1} MiB for debian's kernel (initramfs {:.1} MiB, with its modules), {:.1} MiB for vroom's (initramfs {:.1} MiB); ratio {:.2}x",
            mib(debian.size),
            mib(debian.manifest.initramfs.size),
            mib(vroom.size),
            mib(vroom.manifest.initramfs.size),
            vroom.size as f64 / debian.size as f64
        );
    }
    if let [debian, vroom] = &rows[..] {
        println!(
            "ratio vroom/debian: PSS per appliance {:.2}x, appliances per GiB {:.2}x, first boot-to-ready {:.2}x",
            vroom.pss_mib / debian.pss_mib,
            debian.pss_mib / vroom.pss_mib,
            vroom.boot_ms[0] / debian.boot_ms[0]
        );
    }
    if tb_runs > 0 {
        tb_study(data_dir, &images[1].1.id, tb_runs).await?;
    }
    Ok(())
}

fn print_row(row: &Row) {
    let per_gib = 1024.0 / row.pss_mib;
    println!(
        "  {:<6} kernel: {} at {} MiB: boot-to-ready first {:.0} ms, last {:.0} ms (median {:.0}, p90 {:.0}); \
         PSS {:.0} MiB each, {:.1} per GiB, {:.0} on a 24 GiB host; host memory used {:.1} GiB in all ({:.0} MiB each); \
         idle CPU {:.2}% of a core each",
        row.kernel,
        row.count,
        row.mem_mib,
        row.boot_ms[0],
        row.boot_ms[row.boot_ms.len() - 1],
        median(&row.boot_ms),
        p90(&row.boot_ms),
        row.pss_mib,
        per_gib,
        per_gib * 24.0,
        row.host_used_mib as f64 / 1024.0,
        row.host_used_mib as f64 / row.count as f64,
        row.cpu_pct,
    );
    match row.ksm {
        Some((pss, shared)) => println!(
            "         with KSM: PSS {:.0} MiB each, {:.1} per GiB, {:.0} on a 24 GiB host ({:.0} MiB of guest memory merged)",
            pss,
            1024.0 / pss,
            1024.0 / pss * 24.0,
            shared
        ),
        None => println!("         KSM: not available on this host"),
    }
}

async fn measure(
    client: &Client,
    kernel: &'static str,
    image: &vroom_types::ImageSummary,
    net: &Name,
    n: usize,
) -> Result<Row> {
    let tag = std::process::id() % 10000;
    let names: Vec<String> = (0..n).map(|i| format!("dn{tag}-{kernel}-{i}")).collect();
    let result = boot_and_measure(client, kernel, image, net, &names).await;
    for name in &names {
        let _ = client.remove(name, true).await;
    }
    result
}

async fn boot_and_measure(
    client: &Client,
    kernel: &'static str,
    image: &vroom_types::ImageSummary,
    net: &Name,
    names: &[String],
) -> Result<Row> {
    let mut boot_ms = vec![];
    let mut pids = vec![];
    let available_before = mem_available_mib();
    for name in names {
        let started = Instant::now();
        client
            .run(&cold_run(name, &image.id, net, 300)?)
            .await
            .with_context(|| format!("cannot run {name} ({} booted)", boot_ms.len()))?;
        let instance = vroom::session::wait_ready(client, name, Duration::from_secs(310)).await?;
        boot_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        pids.push(instance.status.pid.unwrap_or(0));
    }
    tokio::time::sleep(SETTLE).await;
    let host_used_mib = available_before.saturating_sub(mem_available_mib());
    let n = pids.len() as f64;
    let pss = |pids: &[u32]| pids.iter().map(|p| pss_mib(*p)).sum::<f64>() / n;
    let pss_mib = pss(&pids);
    let before: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    tokio::time::sleep(CPU_WINDOW).await;
    let after: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let cpu_pct = (after - before) / CPU_WINDOW.as_secs_f64() / n * 100.0;
    let ksm = match Ksm::start() {
        Some(ksm) => {
            let shared = ksm.settle().await;
            let row = (pss(&pids), shared);
            ksm.stop();
            Some(row)
        }
        None => None,
    };
    Ok(Row {
        kernel,
        count: names.len(),
        mem_mib: image.manifest.default_mem_mib,
        boot_ms,
        pss_mib,
        host_used_mib,
        cpu_pct,
        ksm,
    })
}

/// The host's `MemAvailable`, in MiB (0 when unreadable).
fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// User plus system CPU seconds of a process.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which may hold spaces) in parentheses.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, the 12th and 13th after ')'.
    // SAFETY: plain libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// KSM turned on for a measurement, and back as it was after.
struct Ksm {
    saved: Vec<(&'static str, String)>,
}

impl Ksm {
    fn read(knob: &str) -> Option<String> {
        std::fs::read_to_string(format!("{KSM}/{knob}"))
            .ok()
            .map(|v| v.trim().to_string())
    }

    fn write(knob: &str, value: &str) -> bool {
        std::fs::write(format!("{KSM}/{knob}"), value).is_ok()
    }

    /// Runs ksmd fast (QEMU marks guest memory mergeable); `None` when the
    /// host has no KSM or it cannot be turned on.
    fn start() -> Option<Ksm> {
        let knobs = ["run", "pages_to_scan", "sleep_millisecs"];
        let saved: Vec<(&str, String)> = knobs
            .iter()
            .map(|k| Some((*k, Ksm::read(k)?)))
            .collect::<Option<_>>()?;
        let ksm = Ksm { saved };
        if !(Ksm::write("pages_to_scan", "4000")
            && Ksm::write("sleep_millisecs", "10")
            && Ksm::write("run", "1"))
        {
            ksm.stop();
            return None;
        }
        Some(ksm)
    }

    /// Waits for two full scans (at most a minute); returns the MiB of
    /// guest memory that shares a page with another.
    async fn settle(&self) -> f64 {
        let scans = || {
            Ksm::read("full_scans")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let first = scans();
        let deadline = Instant::now() + Duration::from_secs(60);
        while scans() < first + 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let sharing = Ksm::read("pages_sharing")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        sharing * 4.0 / 1024.0
    }

    /// Unmerges everything and puts the knobs back.
    fn stop(self) {
        Ksm::write("run", "2");
        for (knob, value) in &self.saved {
            Ksm::write(knob, value);
        }
    }
}

/// Raw boots of the hello image on vroom's kernel with each translation
/// cache size: boot-to-ready and QEMU's RSS and PSS.
async fn tb_study(data_dir: &Path, image_id: &str, runs: usize) -> Result<()> {
    use vroom_core::driver::VmDriver;
    use vroom_core::images::ImageSource;
    let image = paths::local_images(data_dir)
        .resolve(image_id)
        .context("cannot resolve the hello image built for vroom's kernel")?;
    let driver = qemu_driver(vroom_qemu::JailMode::Unjailed);
    let accel = driver.resolve_accel(AccelChoice::Auto)?;
    if accel != vroom_types::Accel::Tcg {
        println!(
            "tb-size: not measured (the accelerator is {accel}; only TCG has a translation cache)"
        );
        return Ok(());
    }
    println!(
        "tb-size under TCG, hello on vroom's kernel at {} MiB, {runs} raw boots each (PSS {} s after ready):",
        image.manifest.default_mem_mib,
        SETTLE.as_secs()
    );
    let sizes = [8u32, 16, 32];
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); sizes.len()];
    let tag = std::process::id() % 1000;
    // Interleaved, so that machine noise hits every size alike.
    for i in 0..runs {
        for (k, tb) in sizes.iter().enumerate() {
            let tap = format!("vrtb{tag}x{k}{i}");
            let boot = raw_boot_with(&driver, &image, accel, &tap, Some(*tb), SETTLE).await?;
            results[k].0.push(boot.ready_ms);
            results[k].1.push(boot.rss_mib);
            results[k].2.push(boot.pss_mib);
        }
    }
    let base = &results[sizes.len() - 1];
    for (tb, (ms, rss, pss)) in sizes.iter().zip(&results) {
        println!(
            "  tb-size {tb:>2} MiB: boot-to-ready median {:.0} ms, p90 {:.0} ms; RSS {:.0} MiB; PSS {:.0} MiB; ratio to 32 MiB: boot {:.2}x, PSS {:.2}x",
            median(ms),
            p90(ms),
            median(rss),
            median(pss),
            median(ms) / median(&base.0),
            median(pss) / median(&base.2),
        );
    }
    Ok(())
}
