//! `vroom bench replicated`: what keeping a data volume on two nodes costs,
//! on the failover bench's throwaway two-node lab, in one run:
//!
//! 1. fio in a guest (the jobs of `vroom bench volume`, [`fio::job_argv`])
//!    on a replicated volume whose replica is `UpToDate`, against the same
//!    volume, same guest and same file while the replica's node is down
//!    (the primary writes alone: no mirror job, no relay), interleaved
//!    round by round. Beside it, measured alone before any guest boots:
//!    the round trip between the nodes' namespaces (an NBD-sized 4 KiB
//!    request, a 16-byte reply) and a 4 KiB write plus `fdatasync` on the
//!    replica's filesystem (what its write-through `qemu-nbd` does per
//!    write), so that the issue's goal, "replicated latency within 1.5x of
//!    local plus the measured round trip", is checked against figures of
//!    the same run.
//! 2. The guest's stall on peer loss: a writer (4 KiB write + fsync, one at
//!    a time) while the replica's node is frozen (SIGSTOP of its vroomd and
//!    its `qemu-nbd`): the longest write, against the same writer unfaulted.
//! 3. Full resync: the volume filled in the guest while the replica's node
//!    is down, then the node returns: seconds to `UpToDate` per GiB copied,
//!    against `cp --sparse=always` + sync of the primary's file.
//! 4. Failover of the hello appliance with a replicated volume against the
//!    same appliance without one: the primary's node loses power, until it
//!    answers HTTP from the other node.
//! 5. Durability: each of those power losses cuts a writer logging the
//!    synced writes the guest acknowledged; after each failover every one
//!    must be on the promoted copy.
//!
//! Why "local" is the replicated volume with its replica's node down and not
//! a `--replicas 1` volume: a cluster refuses to attach a volume kept on one
//! node (it would not follow its instance), so a lab node cannot run a guest
//! on one. Without its replica, the primary's QEMU writes the same file
//! through the same drive, only without the mirror: exactly the cost of
//! replication, and nothing else. `vroom bench volume` compares that local
//! path with a QEMU started by hand.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::runtime::Handle;
use vroom_client::Client;
use vroom_lab::{signal, wait};
use vroom_types::{ExecRequest, InstanceAction};

use crate::failover::{ip_of, on_lab, rejoined, Cluster};
use crate::fio::{self, FioFigures, Writes, MOUNT};
use crate::stats::{median, p90};
use crate::volume::{copy_by_hand, with_tsc, Guest, IMAGE, RECIPE};

/// What `vroom bench replicated` is asked for.
pub struct ReplicatedBench {
    /// Rounds of (local, replicated) fio.
    pub runs: usize,
    /// The size of fio's file on the volume.
    pub file_mib: u64,
    /// Seconds each fio job runs (after a second of ramp).
    pub runtime_secs: u64,
    /// Data written to the volume before the full resync is timed.
    pub fill_mib: u64,
    /// Power losses of the primary with a writer running.
    pub rounds: usize,
}

/// The fio guest and its volume (primary on n1, replica on n2).
const FIO_VM: &str = "rf";
const FIO_VOLUME: &str = "rep";
/// The hello appliances of the failover part: with a replicated volume,
/// and without one.
const DURABLE_VM: &str = "fv";
const DURABLE_VOLUME: &str = "dur";
const PLAIN_VM: &str = "fp";
/// Where the durability writer's volume is mounted.
const DATA: &str = "/var/data";
const NAMES: [&str; 2] = ["n1", "n2"];
/// A full copy of the volume takes at most this long.
const SYNC_LIMIT: Duration = Duration::from_secs(600);
/// Boots of the fio guest at most while its clock is not the TSC: more
/// than `bench volume` allows, since a lab of two nodes and three etcd
/// members loads the host more.
const CLOCK_ATTEMPTS: usize = 12;
/// Failover rounds of the appliance without a volume, at most.
const PLAIN_ROUNDS: usize = 5;

pub async fn replicated(bench: &ReplicatedBench) -> Result<()> {
    if bench.runs == 0 || bench.rounds == 0 {
        bail!("--runs and --rounds must be at least 1");
    }
    let started = Instant::now();
    let load = loadavg();
    let recipe = tempfile::Builder::new()
        .prefix("vroom-bench-fio")
        .tempdir()?;
    std::fs::write(recipe.path().join("recipe.toml"), RECIPE)?;
    let rt = Handle::current();
    on_lab(|lab| measure(&Cluster(lab), &rt, recipe.path(), bench))?;
    println!(
        "the bench took {:.0} s; load average (1, 5, 15 min) before: {load}, after: {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn measure(c: &Cluster, rt: &Handle, recipe: &Path, bench: &ReplicatedBench) -> Result<()> {
    eprintln!("building {IMAGE} on n1...");
    c.ok(0, &["image", "build", &recipe.display().to_string()])?;
    // Before any guest, and again before each replicated run: the host's
    // disk is shared, and its sync times move with what else runs.
    let mut link = Link::default();
    link.measure(c)?;
    let volume_mib = (bench.file_mib + bench.fill_mib + 256).next_multiple_of(64);
    c.ok(
        0,
        &[
            "volume",
            "create",
            FIO_VOLUME,
            "--size",
            &format!("{volume_mib}M"),
            "--replicas",
            "2",
        ],
    )?;
    c.ok(
        0,
        &[
            "run",
            IMAGE,
            "--name",
            FIO_VM,
            "--volume",
            &format!("{FIO_VOLUME}:{MOUNT}"),
        ],
    )?;
    up_to_date(c, 0, FIO_VOLUME, SYNC_LIMIT)?;
    let client = Client::new(&vroom::paths::socket(&c.nodes[0].dir));
    let argv = fio::job_argv(bench.file_mib, bench.runtime_secs);
    eprintln!(
        "{} rounds of fio ({} s per job, {} MiB file, {volume_mib} MiB volume), local (n2 down) then replicated...",
        bench.runs, bench.runtime_secs, bench.file_mib
    );
    let (mut local, mut replicated, mut resyncs) = (vec![], vec![], vec![]);
    let mut reboots = (0, 0);
    for round in 1..=bench.runs {
        alone(c)?;
        let (figures, lost) = guest_fio(c, rt, &client, &argv, false)
            .with_context(|| format!("local, round {round}"))?;
        eprintln!("  round {round} local:      {figures:?}");
        local.push(figures);
        reboots.0 += lost;
        let resync = replica_returns(c)?;
        eprintln!("  round {round} resync:     {resync:?}");
        resyncs.push(resync);
        link.measure(c)?;
        let (figures, lost) = guest_fio(c, rt, &client, &argv, true)
            .with_context(|| format!("replicated, round {round}"))?;
        eprintln!("  round {round} replicated: {figures:?}");
        // Figures of a replica cut loose during the run would be partly local.
        let state = replication(c, 0, FIO_VOLUME).map(|r| r["state"].clone());
        if state.as_ref().is_none_or(|s| s != "up_to_date") {
            bail!("replicated, round {round}: the replica fell behind during the run ({state:?})");
        }
        replicated.push(figures);
        reboots.1 += lost;
    }
    print_fio(&local, &replicated, &link, bench);
    println!(
        "  guests booted again because their clock lost the TSC: {} local, {} replicated",
        reboots.0, reboots.1
    );
    stall(c, rt, &client)?;
    full_resync(c, rt, &client, bench.fill_mib, &resyncs)?;
    c.ok(0, &["rm", "--force", FIO_VM])?;
    c.ok(0, &["volume", "rm", FIO_VOLUME])?;
    failovers(c, rt, bench.rounds)
}

/// The link between the nodes, measured with no guest writing.
#[derive(Default)]
struct Link {
    /// Round trips of a 4 KiB request and a 16-byte reply, n1 to n2, in µs.
    rtt_us: Vec<f64>,
    /// 4 KiB pwrite + fdatasync on n2's filesystem, in µs.
    sync_us: Vec<f64>,
}

impl Link {
    fn measure(&mut self, c: &Cluster) -> Result<()> {
        let (from, to) = (&c.nodes[0], &c.nodes[1]);
        self.rtt_us
            .extend(round_trips(&from.ns, &to.ns, &to.ip, 1000)?);
        self.sync_us.extend(synced_writes(&to.dir, 200)?);
        Ok(())
    }
}

/// An NBD write request: a 28-byte header and 4 KiB of data.
const REQUEST: usize = 28 + 4096;
/// An NBD simple reply.
const REPLY: usize = 16;

/// Round trips from namespace `from` to a TCP echo in namespace `to`
/// (listening on `ip`): a request of [`REQUEST`] bytes, a reply of
/// [`REPLY`], one at a time with Nagle off, as the replication's NBD
/// connection carries them. In µs.
fn round_trips(from: &str, to: &str, ip: &str, count: usize) -> Result<Vec<f64>> {
    let ip: std::net::IpAddr = ip.parse().context("the node's address")?;
    let (bound, listening) = std::sync::mpsc::channel();
    let server = in_netns(to, move || {
        let listener = TcpListener::bind((ip, 0))?;
        let _ = bound.send(listener.local_addr()?);
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut request = vec![0u8; REQUEST];
        while stream.read_exact(&mut request).is_ok() {
            stream.write_all(&[0u8; REPLY])?;
        }
        Ok(())
    })?;
    let addr: SocketAddr = listening
        .recv_timeout(Duration::from_secs(5))
        .context("the echo server did not listen")?;
    let client = in_netns(from, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        let (request, mut reply) = (vec![7u8; REQUEST], [0u8; REPLY]);
        let mut times = Vec::with_capacity(count);
        for _ in 0..count {
            let sent = Instant::now();
            stream.write_all(&request)?;
            stream.read_exact(&mut reply)?;
            times.push(sent.elapsed().as_secs_f64() * 1e6);
        }
        Ok(times)
    })?;
    let times = client
        .join()
        .map_err(|_| anyhow::anyhow!("the echo client panicked"))?
        .context("the echo client failed")?;
    let _ = server.join();
    // The first few open the connection's windows.
    Ok(times.into_iter().skip(count / 10).collect())
}

/// Runs `f` on a thread of its own inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<std::io::Result<T>>> {
    use std::os::fd::AsRawFd;
    let netns = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("no network namespace {ns}"))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on this thread alone, with a namespace fd we own.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        f()
    }))
}

/// 4 KiB writes at random places of a 16 MiB file in `dir` (allocated and
/// synced first, as a volume's data is), each followed by an `fdatasync`:
/// what the replica's write-through server does per write. In µs.
fn synced_writes(dir: &Path, count: usize) -> Result<Vec<f64>> {
    const SIZE: u64 = 16 << 20;
    let path = dir.join("bench-sync.dat");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let result = (|| {
        let block = vec![0x5au8; 1 << 20];
        for at in (0..SIZE).step_by(block.len()) {
            file.write_all_at(&block, at)?;
        }
        file.sync_all()?;
        let page = [0xa5u8; 4096];
        let mut seed = u64::from(std::process::id()) | 1;
        let mut times = Vec::with_capacity(count);
        for _ in 0..count {
            // xorshift: any spread of offsets will do.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (seed % (SIZE / 4096)) * 4096;
            let started = Instant::now();
            file.write_all_at(&page, at)?;
            file.sync_data()?;
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
        std::io::Result::Ok(times)
    })();
    let _ = std::fs::remove_file(&path);
    result.context("synced writes on the replica's filesystem")
}

/// The volume's replication as node `i` shows it (`.replication` of
/// `vroom --json volume inspect`).
fn replication(c: &Cluster, i: usize, volume: &str) -> Option<Value> {
    let out = c.ok(i, &["--json", "volume", "inspect", volume]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    Some(v["replication"].clone())
}

/// Waits until node `i`, the volume's primary, records its replica up to
/// date; how long that took.
fn up_to_date(c: &Cluster, i: usize, volume: &str, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    wait(limit, || {
        let r = replication(c, i, volume)?;
        (r["primary"] == NAMES[i] && r["state"] == "up_to_date").then_some(())
    })
    .with_context(|| {
        format!(
            "the replica of {volume} did not come up to date within {limit:?}: {:?}",
            replication(c, i, volume)
        )
    })?;
    Ok(started.elapsed())
}

/// The replica's node (n2) loses power, and the primary goes on alone: its
/// replication ended (no relay left), the replica not up to date.
fn alone(c: &Cluster) -> Result<()> {
    c.power_loss(1);
    wait(Duration::from_secs(30), || {
        let r = replication(c, 0, FIO_VOLUME)?;
        (r["state"] != "up_to_date" && c.nbd_relays(0).is_empty()).then_some(())
    })
    .context("the primary did not go on without its replica within 30 s")?;
    // Its mirror job is cancelled just after the relay goes.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// A full resync: from the replica's node starting again to `UpToDate`.
#[derive(Debug, Clone, Copy)]
struct Resync {
    secs: f64,
    /// Of which the copy: from the mirror job's first progress in `volume
    /// inspect` (none seen: a copy shorter than one look).
    copy_secs: Option<f64>,
    /// What the replica's copy holds afterwards (allocated bytes: holes
    /// are not sent).
    copied: u64,
    /// The mirror job's total, as `volume inspect` last showed it.
    job_total: Option<u64>,
}

impl Resync {
    fn secs_per_gib(&self) -> f64 {
        self.secs / (self.copied as f64 / (1u64 << 30) as f64)
    }
}

/// Starts n2 again and times its copy's full resync.
fn replica_returns(c: &Cluster) -> Result<Resync> {
    let started = Instant::now();
    c.start(1).map_err(anyhow::Error::msg)?;
    let (mut job_total, mut copying) = (None, None);
    wait(SYNC_LIMIT, || {
        let r = replication(c, 0, FIO_VOLUME)?;
        if let Some(total) = r["sync_total_bytes"].as_u64() {
            job_total = Some(total);
            copying.get_or_insert_with(Instant::now);
        }
        (r["state"] == "up_to_date").then_some(())
    })
    .context("the returning replica did not come up to date")?;
    let secs = started.elapsed().as_secs_f64();
    let copied = allocated(&copy_of(c, 1, FIO_VOLUME)?)?;
    Ok(Resync {
        secs,
        copy_secs: copying.map(|t| t.elapsed().as_secs_f64()),
        copied,
        job_total,
    })
}

/// Node `i`'s copy of a volume: its file.
fn copy_of(c: &Cluster, i: usize, volume: &str) -> Result<PathBuf> {
    let v: Value = serde_json::from_str(&c.ok(i, &["--json", "volume", "inspect", volume])?)?;
    let id = v["id"].as_str().filter(|id| !id.is_empty());
    let id = id.with_context(|| format!("{} has no copy of {volume}", NAMES[i]))?;
    Ok(vroom_volume::data::volume_file(
        &c.nodes[i].dir.join("volumes"),
        id,
    ))
}

fn allocated(file: &Path) -> Result<u64> {
    let meta = std::fs::metadata(file).with_context(|| format!("no {}", file.display()))?;
    Ok(meta.blocks() * 512)
}

/// `bench volume`'s fio jobs in the fio guest, booted again (and, when
/// `replicated`, its replica synced again) while its clock is not the TSC.
fn guest_fio(
    c: &Cluster,
    rt: &Handle,
    client: &Client,
    argv: &[String],
    replicated: bool,
) -> Result<(FioFigures, usize)> {
    let mut attempt = 0;
    rt.block_on(with_tsc(CLOCK_ATTEMPTS, || {
        attempt += 1;
        let again = attempt > 1;
        async move {
            if again {
                client.action(FIO_VM, InstanceAction::Restart).await?;
                vroom::session::wait_ready(client, FIO_VM, Duration::from_secs(130)).await?;
                if replicated {
                    up_to_date(c, 0, FIO_VOLUME, SYNC_LIMIT)?;
                }
            }
            Guest::Vroom(client, FIO_VM).fio(argv).await
        }
    }))
}

fn print_fio(
    local: &[FioFigures],
    replicated: &[FioFigures],
    link: &Link,
    bench: &ReplicatedBench,
) {
    let (rtt, sync) = (median(&link.rtt_us), median(&link.sync_us));
    println!(
        "round trip n1 -> n2 (4 KiB request, 16-byte reply over TCP between the node namespaces): median {rtt:.0} us, p90 {:.0} us (n={})",
        p90(&link.rtt_us),
        link.rtt_us.len()
    );
    println!(
        "the replica's 4 KiB write + fdatasync on its filesystem: median {sync:.0} us, p90 {:.0} us (n={})",
        p90(&link.sync_us),
        link.sync_us.len()
    );
    println!(
        "fio on a replicated volume's ext4 in the guest ({IMAGE}), replica up to date, against the same volume with its replica's node down (local), medians of {} rounds, {} s per job:",
        local.len(),
        bench.runtime_secs
    );
    println!(
        "  {:<28} {:>14} {:>14} {:>8} {:>14} {:>20}",
        "", "local", "replicated", "ratio", "goal", "local+RTT+sync"
    );
    for row in fio::compare(local, replicated) {
        // The goal is on latency: 1.5x local plus the round trip.
        let goal = if row.unit == "us" {
            let goal = 1.5 * row.baseline + rtt;
            let verdict = if row.ours <= goal { "meets" } else { "misses" };
            format!("{goal:.0} us {verdict}")
        } else {
            "-".to_string()
        };
        // Each QD1 write is mirrored alone: the local write, then the
        // replica's (sent, written through, answered).
        let expected = if row.label.contains("QD1") {
            format!("{:.0} us", row.baseline + rtt + sync)
        } else {
            "-".to_string()
        };
        println!(
            "  {:<28} {:>14} {:>14} {:>7.2}x {:>14} {:>20}",
            row.label,
            format!("{:.0} {}", row.baseline, row.unit),
            format!("{:.0} {}", row.ours, row.unit),
            row.ratio,
            goal,
            expected
        );
    }
    println!(
        "  (ratio: replicated over local; goal: the issue's 1.5x local + the round trip, for latencies; local+RTT+sync: what a write costs when the mirror writes the local copy, then the replica's, one after the other)"
    );
}

/// The fio writer of [`fio::writer_argv`] for `secs` in the fio guest.
fn writes(rt: &Handle, client: &Client, secs: u64) -> Result<Writes> {
    let out = rt.block_on(Guest::Vroom(client, FIO_VM).run(&fio::writer_argv(secs)))?;
    fio::parse_writes(&out)
}

/// The guest's stall when the replica's node freezes mid-write.
fn stall(c: &Cluster, rt: &Handle, client: &Client) -> Result<()> {
    up_to_date(c, 0, FIO_VOLUME, SYNC_LIMIT)?;
    eprintln!("the writer, unfaulted, then with n2 frozen 3 s into it...");
    let calm = writes(rt, client, 8)?;
    let servers = c.nbd_servers(1);
    if servers.is_empty() {
        bail!("n2 serves no replica to freeze");
    }
    let frozen = std::thread::scope(|s| {
        let writer = s.spawn(|| writes(rt, client, 8));
        std::thread::sleep(Duration::from_secs(3));
        c.freeze(1, true);
        for pid in &servers {
            signal(*pid, libc::SIGSTOP);
        }
        writer.join()
    });
    for pid in &servers {
        signal(*pid, libc::SIGCONT);
    }
    c.freeze(1, false);
    let frozen = frozen.map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let state = replication(c, 0, FIO_VOLUME).map(|r| r["state"].clone());
    println!(
        "guest stall on peer loss (4 KiB write + fsync, one at a time, 8 s; n2's vroomd and qemu-nbd SIGSTOPped 3 s in): longest write or fsync {:.0} ms, against {:.0} ms unfaulted ({:.0}x); median write {:.2} ms against {:.2} ms (once cut loose the guest writes alone); {} writes against {}; the replica afterwards: {}",
        frozen.longest_us() / 1000.0,
        calm.longest_us() / 1000.0,
        frozen.longest_us() / calm.longest_us(),
        frozen.write_p50_us / 1000.0,
        calm.write_p50_us / 1000.0,
        frozen.count,
        calm.count,
        state.unwrap_or_default()
    );
    Ok(())
}

/// Fills the volume with n2 down, then times n2's return to `UpToDate`
/// against a copy of the primary's file by hand.
fn full_resync(
    c: &Cluster,
    rt: &Handle,
    client: &Client,
    fill_mib: u64,
    earlier: &[Resync],
) -> Result<()> {
    alone(c)?;
    eprintln!("filling the volume with {fill_mib} MiB while n2 is down...");
    rt.block_on(
        Guest::Vroom(client, FIO_VM).run(&fio::fill_argv(&format!("{MOUNT}/fill.dat"), fill_mib)),
    )?;
    let primary = copy_of(c, 0, FIO_VOLUME)?;
    let held = allocated(&primary)?;
    let by_hand = rt.block_on(copy_by_hand(&primary, &c.nodes[0].dir.join("copy.img")))?;
    let resync = replica_returns(c)?;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    println!(
        "full resync: {:.0} MiB on the replica afterwards (the primary's file holds {:.0} MiB; the mirror job's total {}): {:.1} s from n2's vroomd starting to UpToDate, {:.2} s per GiB (the copy itself, from its first progress seen: {}); baseline cp --sparse=always + sync of the primary's file: {by_hand:.1} s, {:.2} s per GiB ({:.2}x)",
        gib(resync.copied) * 1024.0,
        gib(held) * 1024.0,
        resync
            .job_total
            .map(|t| format!("{:.0} MiB", gib(t) * 1024.0))
            .unwrap_or_else(|| "not seen".into()),
        resync.secs,
        resync.secs_per_gib(),
        resync
            .copy_secs
            .map(|t| format!("{t:.1} s, {:.2} s per GiB", t / gib(resync.copied)))
            .unwrap_or_else(|| "not seen".into()),
        by_hand / gib(held),
        resync.secs / by_hand
    );
    if !earlier.is_empty() {
        let secs: Vec<f64> = earlier.iter().map(|r| r.secs).collect();
        let copied: Vec<f64> = earlier.iter().map(|r| gib(r.copied) * 1024.0).collect();
        println!(
            "  the returns between fio rounds (fio's file and ext4): median {:.1} s for {:.0} MiB (n={})",
            median(&secs),
            median(&copied),
            secs.len()
        );
    }
    Ok(())
}

/// Node `at` loses power; the time until `instance` runs on the other node
/// and answers HTTP on `ip` from there.
fn fail_over(c: &Cluster, at: usize, instance: &str, ip: &str) -> Result<Duration> {
    let other = 1 - at;
    c.power_loss(at);
    let started = Instant::now();
    wait(Duration::from_secs(90), || {
        (c.runs(other, instance).is_some() && c.answers(other, ip)).then_some(())
    })
    .with_context(|| {
        format!(
            "{instance} did not answer on {} within 90 s of {}'s power loss",
            NAMES[other], NAMES[at]
        )
    })?;
    Ok(started.elapsed())
}

/// Failover of hello without a volume, then with a replicated volume and
/// a writer cut by each power loss, checking every acknowledged write.
fn failovers(c: &Cluster, rt: &Handle, rounds: usize) -> Result<()> {
    for i in 0..2 {
        c.ok(i, &["image", "build", "hello"])?;
    }
    let plain_rounds = rounds.min(PLAIN_ROUNDS);
    eprintln!("{plain_rounds} power losses under hello without a volume...");
    c.ok(
        0,
        &[
            "run", "hello", "--name", PLAIN_VM, "--ha", "restart", "--node", "n1",
        ],
    )?;
    let ip = ip_of(c, 0, PLAIN_VM)?;
    let mut plain = vec![];
    let mut at = 0;
    for _ in 0..plain_rounds {
        let took = fail_over(c, at, PLAIN_VM, &ip)?;
        eprintln!("  {PLAIN_VM}: {took:?}");
        plain.push(took.as_secs_f64() * 1000.0);
        c.start(at).map_err(anyhow::Error::msg)?;
        rejoined(c, 1 - at, at)?;
        at = 1 - at;
    }
    c.ok(at, &["rm", "--force", PLAIN_VM])?;

    eprintln!("{rounds} power losses under hello with a replicated volume and a writer...");
    c.ok(
        0,
        &[
            "volume",
            "create",
            DURABLE_VOLUME,
            "--size",
            "64M",
            "--replicas",
            "2",
        ],
    )?;
    c.ok(
        0,
        &[
            "run",
            "hello",
            "--name",
            DURABLE_VM,
            "--ha",
            "restart",
            "--volume",
            &format!("{DURABLE_VOLUME}:{DATA}"),
        ],
    )?;
    let ip = ip_of(c, 0, DURABLE_VM)?;
    let mut at = 0;
    up_to_date(c, at, DURABLE_VOLUME, SYNC_LIMIT)?;
    let (mut acked, mut lost) = (Vec::<u64>::new(), BTreeSet::<u64>::new());
    let mut times = vec![];
    for round in 1..=rounds {
        let next = acked.last().copied().unwrap_or(0) + 1;
        let (more, took) = write_until_power_loss(c, rt, at, next, &ip)?;
        acked.extend(more);
        times.push(took.as_secs_f64() * 1000.0);
        let on = 1 - at;
        let found = written(c, on)?;
        lost.extend(acked.iter().filter(|n| !found.contains(n)));
        eprintln!(
            "  round {round}: {} answered from {} after {took:?}; lost so far: {} of {}",
            DURABLE_VM,
            NAMES[on],
            lost.len(),
            acked.len()
        );
        c.start(at).map_err(anyhow::Error::msg)?;
        up_to_date(c, on, DURABLE_VOLUME, SYNC_LIMIT)?;
        at = on;
    }
    println!(
        "failover, power loss of the primary's node to answering HTTP on the other: hello without a volume: median {:.0} ms, p90 {:.0} ms (n={}); with a replicated volume and a writer: median {:.0} ms, p90 {:.0} ms (n={}); {:.2}x",
        median(&plain),
        p90(&plain),
        plain.len(),
        median(&times),
        p90(&times),
        times.len(),
        median(&times) / median(&plain)
    );
    println!(
        "durability: lost: {} of {} acknowledged synced writes, over {rounds} power losses of the primary (each checked on the promoted copy){}",
        lost.len(),
        acked.len(),
        if lost.is_empty() {
            String::new()
        } else {
            format!("; lost: {lost:?}")
        }
    );
    Ok(())
}

/// Writes numbered files in the durable VM on node `p` (each synced: the
/// guest saw it complete, and said so), from `first` on, and cuts the
/// node's power after a random number of them, at a random moment. Returns
/// what was acknowledged, and the time from the cut to the VM answering on
/// the other node.
fn write_until_power_loss(
    c: &Cluster,
    rt: &Handle,
    p: usize,
    first: u64,
    ip: &str,
) -> Result<(Vec<u64>, Duration)> {
    // Through the API socket, not the CLI: the CLI starts a vroomd of its
    // own on a data dir whose daemon does not answer, and this one is about
    // to lose its power.
    let client = Client::new(&vroom::paths::socket(&c.nodes[p].dir));
    let acked = Mutex::new(Vec::<u64>::new());
    let stop = AtomicBool::new(false);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let count = 3 + seed % 8;
    std::thread::scope(|s| {
        s.spawn(|| {
            for n in first.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let req = ExecRequest {
                    argv: vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        format!("echo write-{n} > {DATA}/w{n} && sync"),
                    ],
                    timeout_secs: Some(30),
                    stdin: false,
                };
                let done = rt.block_on(client.exec(DURABLE_VM, &req));
                if !done.is_ok_and(|r| r.exit_code == 0) {
                    break;
                }
                acked.lock().unwrap_or_else(|e| e.into_inner()).push(n);
            }
        });
        let enough = wait(Duration::from_secs(60), || {
            let done = acked.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
            (done >= count).then_some(())
        });
        std::thread::sleep(Duration::from_millis(seed / 7 % 300));
        let took = enough
            .context("the guest acknowledged no writes")
            .and_then(|()| fail_over(c, p, DURABLE_VM, ip));
        stop.store(true, Ordering::SeqCst);
        if took.is_err() {
            // The writer must end for the scope to: cut its node anyway.
            c.power_loss(p);
        }
        let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        took.map(|t| (acked, t))
    })
}

/// The numbered writes found on the durable VM's volume on node `i`.
fn written(c: &Cluster, i: usize) -> Result<BTreeSet<u64>> {
    let script = format!("cat {DATA}/w* 2>/dev/null; exit 0");
    let out = wait(Duration::from_secs(20), || {
        c.ok(i, &["exec", DURABLE_VM, "--", "/bin/sh", "-c", &script])
            .ok()
    })
    .with_context(|| format!("{DURABLE_VM} does not answer an exec on {}", NAMES[i]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("write-")?.trim().parse().ok())
        .collect())
}
