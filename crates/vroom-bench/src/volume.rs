//! `vroom bench volume`: fio inside a guest on a vroom data volume against
//! the same file attached by hand to a QEMU started without vroom (the
//! baseline), interleaved round by round in one run; then what a volume
//! snapshot costs (offline and with its guest running, against a `cp` of
//! the file by hand) and a clone.
//!
//! Both sides boot the same image (`bench-fio`, built from the recipe this
//! crate carries), memory and kernel, and run the same fio command line
//! ([`crate::fio::job_argv`]) on the volume's ext4 filesystem mounted at
//! [`MOUNT`]: on the filesystem, because that is what an appliance writes
//! through, and the ext4 on it is the one vroom made (a fresh file system on
//! a raw block device would measure something no appliance sees). The
//! baseline mounts it with vroom-init's options (`nodev,nosuid,noexec`).
//!
//! The baseline disk is QEMU's defaults for a raw file, what a user writes
//! by hand: `-drive file=PATH,format=raw,if=none,id=bench` plus
//! `-device virtio-blk-device,drive=bench`, i.e. `cache=writeback` (host
//! page cache, guest flushes passed through), `aio=threads`, `discard=ignore`
//! and image locking on. vroom's adds `discard=unmap` and `file.locking=off`,
//! and passes the file as an fd into its jailed QEMU (own uid, cgroup with a
//! memory limit that the host page cache of the disk is charged to).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vroom_agent_proto::exec::{ExecStatus, ExecStream};
use vroom_agent_proto::volume::{
    InstanceFile, CONFIG_DISK_SERIAL, ROOT_DISK_SERIAL, VOLUME_VERSION,
};
use vroom_agent_proto::PORT_NAME;
use vroom_client::Client;
use vroom_core::agent::{AgentClient, ExecEvent};
use vroom_core::images::{BootImage, ImageSource};
use vroom_types::{
    ExecRequest, InstanceAction, Name, NetworkSpec, VolumeAttach, VolumeCreateRequest, VolumeFs,
};

use crate::fio::{self, FioFigures, GOAL, MOUNT};
use crate::stats::{median, p90};
use vroom::paths;

/// The bench's guest: Debian's fio and busybox.
pub(crate) const RECIPE: &str = include_str!("../recipes/fio/recipe.toml");
pub(crate) const IMAGE: &str = "bench-fio";
/// The serial of the baseline's extra disk, by which its guest finds it.
const BASELINE_SERIAL: &str = "bench-disk";
/// A whole fio run in a guest, at most.
const FIO_TIMEOUT: Duration = Duration::from_secs(600);

/// What `vroom bench volume` is asked for.
pub struct VolumeBench {
    /// Rounds of (baseline, vroom).
    pub runs: usize,
    /// The size of fio's file on the volume.
    pub file_mib: u64,
    /// Seconds each fio job runs (after a second of ramp).
    pub runtime_secs: u64,
    /// Data written to the volume, beside fio's file, before it is snapshotted.
    pub snapshot_mib: u64,
}

pub async fn volume(data_dir: &Path, bench: &VolumeBench) -> Result<()> {
    if bench.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let started = Instant::now();
    let client = crate::vroomd::connect(data_dir).await?;
    let image = build_image(&client).await?;
    let tag = std::process::id() % 10000;
    let prefix = format!("bvol{tag}");
    client
        .create_network(&NetworkSpec::plain(Name::new(&prefix)?))
        .await?;
    let result = measure(&client, data_dir, &image, &prefix, bench).await;
    cleanup(&client, &prefix).await;
    result?;
    println!(
        "the bench took {:.0} s",
        started.elapsed().as_secs_f64().round()
    );
    Ok(())
}

/// Builds the bench's image from the recipe this binary carries (an
/// unchanged recipe is not rebuilt); returns its id.
async fn build_image(client: &Client) -> Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("vroom-bench-fio")
        .tempdir()?;
    std::fs::write(dir.path().join("recipe.toml"), RECIPE)?;
    eprintln!("building {IMAGE} (fio and busybox from Debian)...");
    let report = client
        .build_image(dir.path(), false, None, |_, _| {})
        .await
        .with_context(|| format!("cannot build the {IMAGE} image"))?;
    Ok(report.image.id)
}

async fn cleanup(client: &Client, prefix: &str) {
    for instance in client.list().await.unwrap_or_default() {
        if instance.spec.name.as_str().starts_with(prefix) {
            let _ = client.remove(instance.spec.name.as_str(), true).await;
        }
    }
    for volume in client.volumes().await.unwrap_or_default() {
        if volume.name.as_str().starts_with(prefix) {
            for snapshot in &volume.snapshots {
                let _ = client
                    .remove_volume_snapshot(volume.name.as_str(), snapshot.name.as_str())
                    .await;
            }
            let _ = client.remove_volume(volume.name.as_str()).await;
        }
    }
    let _ = client.remove_network(prefix).await;
}

async fn measure(
    client: &Client,
    data_dir: &Path,
    image_id: &str,
    prefix: &str,
    bench: &VolumeBench,
) -> Result<()> {
    let size_mib = (bench.file_mib + bench.snapshot_mib + 256).max(512);
    let volume = client
        .create_volume(&VolumeCreateRequest {
            name: Name::new(prefix)?,
            size_mib,
            fs: VolumeFs::default(),
            replicas: 1,
            node: None,
            replica_node: None,
        })
        .await?;
    let file = vroom_volume::data::volume_file(&data_dir.join("volumes"), &volume.id);
    let image = paths::local_images(data_dir)
        .resolve(image_id)
        .with_context(|| format!("cannot resolve the {IMAGE} image"))?;
    let argv = fio::job_argv(bench.file_mib, bench.runtime_secs);
    eprintln!(
        "{} rounds of fio ({} s per job, {} MiB file, {} MiB volume), baseline then vroom...",
        bench.runs, bench.runtime_secs, bench.file_mib, size_mib
    );
    let (mut baseline, mut ours) = (vec![], vec![]);
    let mut reboots = (0, 0);
    for i in 0..bench.runs {
        let (figures, lost) = with_tsc(CLOCK_ATTEMPTS, || async {
            flush(&file)?;
            baseline_fio(&image, &file, &argv).await
        })
        .await
        .with_context(|| format!("baseline, round {}", i + 1))?;
        eprintln!("  round {} baseline: {figures:?}", i + 1);
        baseline.push(figures);
        reboots.0 += lost;
        let mut attempt = 0;
        let (figures, lost) = with_tsc(CLOCK_ATTEMPTS, || {
            attempt += 1;
            let name = format!("{prefix}-r{i}a{attempt}");
            let (file, argv) = (&file, &argv);
            async move {
                flush(file)?;
                vroom_fio(client, &name, image_id, prefix, argv).await
            }
        })
        .await
        .with_context(|| format!("vroom, round {}", i + 1))?;
        eprintln!("  round {} vroom:    {figures:?}", i + 1);
        ours.push(figures);
        reboots.1 += lost;
    }
    print_fio(&baseline, &ours, &image, bench);
    println!(
        "  guests booted again because their clock lost the TSC: {} baseline, {} vroom",
        reboots.0, reboots.1
    );
    snapshots(client, data_dir, &file, image_id, prefix, bench).await
}

/// Writes the volume file's dirty pages out on the host, so that each run
/// starts clean instead of paying for the writeback of the run before it
/// (the first writes fio's whole file).
fn flush(file: &Path) -> Result<()> {
    std::fs::File::open(file)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {}", file.display()))
}

fn print_fio(baseline: &[FioFigures], ours: &[FioFigures], image: &BootImage, bench: &VolumeBench) {
    println!(
        "fio on the volume's ext4 in the guest ({IMAGE}, {} MiB, {} kernel), medians of {} rounds, {} s per job:",
        image.manifest.default_mem_mib,
        image.manifest.kernel.flavor,
        baseline.len(),
        bench.runtime_secs
    );
    println!(
        "  {:<28} {:>16} {:>16} {:>9} {:>6}",
        "", "baseline (raw)", "vroom volume", "ratio", "cost"
    );
    for row in fio::compare(baseline, ours) {
        println!(
            "  {:<28} {:>16} {:>16} {:>8.2}x {:>5.2}x{}",
            row.label,
            format!("{:.0} {}", row.baseline, row.unit),
            format!("{:.0} {}", row.ours, row.unit),
            row.ratio,
            row.cost,
            if row.cost > GOAL {
                "  (misses the 1.1x goal)"
            } else {
                ""
            }
        );
    }
    println!(
        "  (ratio: vroom over baseline; cost: how much worse vroom is, whichever way the figure improves; goal: cost within {GOAL}x)"
    );
}

/// The baseline: QEMU started by hand, without vroom (no jail, no fd
/// passing, no daemon), booting the same image with the volume's file as
/// an extra raw virtio-blk disk on QEMU's defaults; the guest mounts it and
/// runs fio through the agent.
async fn baseline_fio(image: &BootImage, volume: &Path, argv: &[String]) -> Result<FioFigures> {
    let dir = tempfile::Builder::new().prefix("bvol").tempdir()?;
    let identity = InstanceFile {
        version: VOLUME_VERSION,
        hostname: "baseline".into(),
        nics: vec![],
        machine_id: None,
        volumes: Vec::new(),
    };
    let config = dir.path().join("config.img");
    vroom_volume::create(
        &config,
        1440,
        &identity,
        &image.manifest.appliance.seed_config,
    )?;
    let qemu = std::env::var_os("VROOM_QEMU")
        .map(PathBuf::from)
        .or_else(|| vroom_qemu::find_on_path("qemu-system-x86_64"))
        .context("no qemu-system-x86_64 on PATH")?;
    let log = std::fs::File::create(dir.path().join("qemu.log"))?;
    let started = Instant::now();
    let mut command = tokio::process::Command::new(&qemu);
    command
        .args(baseline_args(image, dir.path(), &config, volume))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    // SAFETY: setsid is async-signal-safe. A session of its own, as vroom's
    // jailer gives its QEMU: the scheduler's autogroups are per session, so
    // both QEMUs get the same share of a loaded host.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut qemu = command
        .spawn()
        .with_context(|| format!("cannot start {}", qemu.display()))?;
    let agent = AgentClient::new(dir.path().join("agent.sock"));
    let result = async {
        crate::boot::wait_agent_ready(&agent, started, Duration::from_secs(120)).await?;
        let mount = format!(
            "dev=; for d in /sys/block/vd*; do \
               [ \"$(cat $d/serial 2>/dev/null)\" = {BASELINE_SERIAL} ] && dev=/dev/${{d##*/}}; \
             done; \
             [ -n \"$dev\" ] || {{ echo no disk with serial {BASELINE_SERIAL} >&2; exit 1; }}; \
             mkdir -p {MOUNT} && mount -t ext4 -o nodev,nosuid,noexec $dev {MOUNT}"
        );
        let guest = Guest::Raw(&agent);
        guest.run(&["/bin/sh".into(), "-c".into(), mount]).await?;
        let figures = guest.fio(argv).await?;
        guest.run(&["/bin/umount".into(), MOUNT.into()]).await?;
        anyhow::Ok(figures)
    }
    .await;
    let _ = agent.shutdown(Duration::from_secs(5)).await;
    if tokio::time::timeout(Duration::from_secs(20), qemu.wait())
        .await
        .is_err()
    {
        let _ = qemu.kill().await;
    }
    let log = std::fs::read_to_string(dir.path().join("qemu.log")).unwrap_or_default();
    match result {
        Err(e) if !log.trim().is_empty() => Err(e.context(format!("QEMU's log: {}", log.trim()))),
        other => other,
    }
}

/// QEMU's arguments for the baseline: the guest's machine, kernel, root and
/// config disks and agent port as vroom would give them (so the guest boots
/// the same), but every file by path, and the volume under test on QEMU's
/// defaults for a raw file.
fn baseline_args(image: &BootImage, dir: &Path, config: &Path, volume: &Path) -> Vec<String> {
    use vroom_qemu::cmdline::{host_tsc_khz, tcg_tb_mib, tcg_timer_args};
    let mem = image.manifest.default_mem_mib;
    let p = |path: &Path| path.display().to_string();
    let mut cmdline = String::from("console=ttyS0 quiet panic=-1");
    if let Some(khz) = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| host_tsc_khz(&c))
    {
        cmdline.push(' ');
        cmdline.push_str(&tcg_timer_args(khz));
    }
    if !image.manifest.cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&image.manifest.cmdline);
    }
    let machine = if image.manifest.kernel.flavor.acpi() {
        "microvm"
    } else {
        "microvm,acpi=off"
    };
    let console = dir.join("console.sock");
    let agent = dir.join("agent.sock");
    [
        "-M".into(),
        machine.into(),
        "-accel".into(),
        format!("tcg,tb-size={}", tcg_tb_mib(mem)),
        "-cpu".into(),
        "max".into(),
        "-m".into(),
        format!("{mem}M"),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-chardev".into(),
        format!("socket,id=console,path={},server=on,wait=off", p(&console)),
        "-serial".into(),
        "chardev:console".into(),
        "-kernel".into(),
        p(&image.kernel),
        "-initrd".into(),
        p(&image.initramfs),
        "-append".into(),
        cmdline,
        "-drive".into(),
        format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            p(&image.rootfs)
        ),
        "-device".into(),
        format!("virtio-blk-device,drive=root,serial={ROOT_DISK_SERIAL}"),
        "-drive".into(),
        format!("id=config,file={},format=raw,if=none", p(config)),
        "-device".into(),
        format!("virtio-blk-device,drive=config,serial={CONFIG_DISK_SERIAL}"),
        // The disk under test: QEMU's defaults for a raw file.
        "-drive".into(),
        format!("id=bench,file={},format=raw,if=none", p(volume)),
        "-device".into(),
        format!("virtio-blk-device,drive=bench,serial={BASELINE_SERIAL}"),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!("socket,id=agent,path={},server=on,wait=off", p(&agent)),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={PORT_NAME}"),
    ]
    .into()
}

/// vroom: `vroom run IMAGE --volume VOLUME:/var/bench`, fio through `vroom
/// exec`, then a stop (the guest unmounts the volume) and `rm`.
async fn vroom_fio(
    client: &Client,
    name: &str,
    image_id: &str,
    volume: &str,
    argv: &[String],
) -> Result<FioFigures> {
    run_with_volume(client, name, image_id, volume).await?;
    let result = Guest::Vroom(client, name).fio(argv).await;
    let stopped = stop_and_remove(client, name).await;
    let figures = result?;
    stopped?;
    Ok(figures)
}

/// Runs the bench's image as `name` on network `volume` (named like the
/// volume) with the volume mounted at [`MOUNT`], until ready.
async fn run_with_volume(client: &Client, name: &str, image_id: &str, volume: &str) -> Result<()> {
    let mut req = crate::boot::cold_run(name, image_id, &Name::new(volume)?, 120)?;
    req.spec.volumes = vec![VolumeAttach {
        volume: Name::new(volume)?,
        path: MOUNT.into(),
        read_only: false,
    }];
    client.run(&req).await?;
    vroom::session::wait_ready(client, name, Duration::from_secs(130)).await?;
    Ok(())
}

/// A guest to run commands in: the baseline's, through its agent's socket,
/// or a vroom instance, through `vroom exec`.
pub(crate) enum Guest<'a> {
    Raw(&'a AgentClient),
    Vroom(&'a Client, &'a str),
}

impl Guest<'_> {
    /// Runs `argv`: its stdout, or an error with what it said when it fails.
    pub(crate) async fn run(&self, argv: &[String]) -> Result<String> {
        match self {
            Guest::Raw(agent) => agent_exec(agent, argv).await,
            Guest::Vroom(client, name) => {
                let result = client
                    .exec(
                        name,
                        &ExecRequest {
                            argv: argv.to_vec(),
                            timeout_secs: Some(FIO_TIMEOUT.as_secs()),
                            stdin: false,
                        },
                    )
                    .await?;
                if result.exit_code != 0 {
                    bail!(
                        "{} in {name} exited with {}: {} {}",
                        argv[0],
                        result.exit_code,
                        result.message.unwrap_or_default(),
                        failure_output(&result.stdout, &result.stderr)
                    );
                }
                Ok(result.stdout)
            }
        }
    }

    /// Runs fio's jobs once the guest's clock is the TSC, and checks it
    /// still is afterwards. The kernel switches from `tsc-early` about 1.5 s
    /// into the boot, about when the guest is ready, and fio's latencies
    /// must not straddle that. Under TCG on a loaded host the guest's
    /// clocksource watchdog, comparing the TSC with jiffies that lag, may
    /// declare the TSC unstable and fall back to jiffies (4 ms ticks): fio's
    /// figures then mean nothing, and the caller boots again ([`ClockLost`]).
    pub(crate) async fn fio(&self, argv: &[String]) -> Result<FioFigures> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.clocksource().await?.as_str() {
                "tsc" => break,
                "tsc-early" if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                other => return Err(ClockLost(other.to_string()).into()),
            }
        }
        let report = self.run(argv).await?;
        match self.clocksource().await?.as_str() {
            "tsc" => fio::parse(&report),
            other => Err(ClockLost(other.to_string()).into()),
        }
    }

    pub(crate) async fn clocksource(&self) -> Result<String> {
        let path = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
        let current = self.run(&["/bin/cat".into(), path.into()]).await?;
        Ok(current.trim().to_string())
    }
}

/// The guest's clock is not the TSC (see [`Guest::fio`]).
#[derive(Debug)]
struct ClockLost(String);

impl std::fmt::Display for ClockLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the guest's clock is {}, not the TSC", self.0)
    }
}

impl std::error::Error for ClockLost {}

/// Boots a guest for fio at most this many times when it loses its TSC.
pub(crate) const CLOCK_ATTEMPTS: usize = 4;

/// `measure()`, booted again while the guest loses its TSC (at most
/// `attempts` times); the figures and how many boots were thrown away.
pub(crate) async fn with_tsc<F, Fut>(attempts: usize, mut measure: F) -> Result<(FioFigures, usize)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<FioFigures>>,
{
    for attempt in 0..attempts {
        match measure().await {
            Ok(figures) => return Ok((figures, attempt)),
            Err(e) if e.downcast_ref::<ClockLost>().is_some() => {
                eprintln!("  {e:#}; booting again")
            }
            Err(e) => return Err(e),
        }
    }
    bail!(
        "guests lost their TSC {attempts} times in a row (a loaded host under TCG): no latency can be measured"
    )
}

/// Runs `argv` in a guest through its agent.
async fn agent_exec(agent: &AgentClient, argv: &[String]) -> Result<String> {
    let mut session = agent
        .exec(argv.to_vec(), FIO_TIMEOUT, false, Duration::from_secs(10))
        .await
        .with_context(|| format!("cannot run {} in the guest", argv[0]))?;
    let (mut stdout, mut stderr) = (vec![], vec![]);
    let status = loop {
        match session.next().await {
            Some(Ok(ExecEvent::Output { stream, data })) => match stream {
                ExecStream::Stdout => stdout.extend(data),
                ExecStream::Stderr => stderr.extend(data),
            },
            Some(Ok(ExecEvent::Exit(status))) => break status,
            Some(Err(e)) => return Err(e).context("the guest's agent failed"),
            None => bail!("the guest's agent ended the exec without an exit"),
        }
    };
    match status {
        ExecStatus::Exited { code: 0 } => Ok(String::from_utf8_lossy(&stdout).into_owned()),
        other => bail!(
            "{} in the guest: {other:?}: {}",
            argv[0],
            failure_output(
                &String::from_utf8_lossy(&stdout),
                &String::from_utf8_lossy(&stderr)
            )
        ),
    }
}

/// What a failed command said: its stderr, or when that is empty (fio
/// reports a job's error in its JSON) the first lines of its stdout.
fn failure_output(stdout: &str, stderr: &str) -> String {
    let said = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    said.lines().take(20).collect::<Vec<_>>().join(" | ")
}

async fn stop_and_remove(client: &Client, name: &str) -> Result<()> {
    client.action(name, InstanceAction::Stop).await?;
    client.remove(name, false).await?;
    Ok(())
}

/// What snapshots and clones of the volume cost, with `snapshot_mib` of
/// data written to it beside fio's file.
async fn snapshots(
    client: &Client,
    data_dir: &Path,
    file: &Path,
    image_id: &str,
    volume: &str,
    bench: &VolumeBench,
) -> Result<()> {
    let reps = bench.runs.clamp(1, 3);
    let name = format!("{volume}-snap");
    run_with_volume(client, &name, image_id, volume).await?;
    let fill = fio::fill_argv(&format!("{MOUNT}/fill.dat"), bench.snapshot_mib);
    Guest::Vroom(client, &name).run(&fill).await?;
    eprintln!(
        "snapshots of the volume with {} MiB written to it, {reps} of each kind...",
        bench.snapshot_mib + bench.file_mib
    );
    let snapshot_name = |kind: &str, i: usize| format!("{volume}-{kind}{i}");
    // With its guest running: the guest is frozen and paused for the copy.
    let mut online = Series::default();
    for i in 0..reps {
        let snap = snapshot_name("on", i);
        online.take(client, volume, &snap).await?;
        client.remove_volume_snapshot(volume, &snap).await?;
    }
    stop_and_remove(client, &name).await?;
    // Offline, interleaved with the baseline: the file copied by hand.
    let mut offline = Series::default();
    let mut copy_secs = vec![];
    for i in 0..reps {
        let snap = snapshot_name("off", i);
        offline.take(client, volume, &snap).await?;
        if i + 1 < reps {
            client.remove_volume_snapshot(volume, &snap).await?;
        }
        copy_secs.push(copy_by_hand(file, &data_dir.join(format!("{volume}-copy.img"))).await?);
    }
    let mut clone_secs = vec![];
    for i in 0..reps {
        let clone = format!("{volume}-clone{i}");
        let t0 = Instant::now();
        client
            .clone_volume(&snapshot_name("off", reps - 1), Name::new(&clone)?)
            .await?;
        clone_secs.push(t0.elapsed().as_secs_f64());
        client.remove_volume(&clone).await?;
    }
    let gib = median(&offline.bytes) / (1u64 << 30) as f64;
    println!(
        "volume snapshots, {:.0} MiB of data (what the copies hold), medians of {reps}:",
        median(&offline.bytes) / (1u64 << 20) as f64
    );
    println!(
        "  by hand (baseline): cp --sparse=always of the file and an fsync: {:.2} s, {:.2} s per GiB",
        median(&copy_secs),
        median(&copy_secs) / gib
    );
    println!(
        "  offline snapshot:   {:.2} s, {:.2} s per GiB ({:.2}x the copy by hand)",
        median(&offline.secs),
        median(&offline.secs) / gib,
        median(&offline.secs) / median(&copy_secs)
    );
    println!(
        "  running guest:      {:.2} s ({:.2}x the copy by hand), the guest held {:.0} ms (p90 {:.0}), taken {}",
        median(&online.secs),
        median(&online.secs) / median(&copy_secs),
        median(&online.pause_ms),
        p90(&online.pause_ms),
        online.taken.join(", ")
    );
    println!(
        "  clone of a snapshot: {:.2} s, {:.2} s per GiB ({:.2}x the copy by hand)",
        median(&clone_secs),
        median(&clone_secs) / gib,
        median(&clone_secs) / median(&copy_secs)
    );
    Ok(())
}

/// Snapshots taken of one kind.
#[derive(Default)]
struct Series {
    secs: Vec<f64>,
    pause_ms: Vec<f64>,
    bytes: Vec<f64>,
    taken: Vec<String>,
}

impl Series {
    /// `vroom volume snapshot VOLUME --name SNAP`, timed.
    async fn take(&mut self, client: &Client, volume: &str, snap: &str) -> Result<()> {
        let t0 = Instant::now();
        let snapshot = client
            .snapshot_volume(volume, Some(Name::new(snap)?))
            .await?;
        self.secs.push(t0.elapsed().as_secs_f64());
        self.pause_ms.push(snapshot.pause_ms as f64);
        self.bytes.push(snapshot.bytes as f64);
        self.taken
            .push(format!("{:?}", snapshot.taken).to_ascii_lowercase());
        Ok(())
    }
}

/// The copy a user makes by hand: `cp --sparse=always` to `copy` (on the
/// same filesystem), then `sync` of the copy (an fsync, as vroom's snapshot
/// makes); seconds.
pub(crate) async fn copy_by_hand(file: &Path, copy: &Path) -> Result<f64> {
    let t0 = Instant::now();
    let cp = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(file)
        .arg(copy)
        .status()
        .await?;
    let sync = tokio::process::Command::new("sync")
        .arg(copy)
        .status()
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(copy);
    if !cp.success() || !sync.success() {
        bail!("cp or sync of {} failed", file.display());
    }
    Ok(secs)
}
