//! `vroom-bench` (and `vroom bench`, which hands over to it): vroom's
//! benchmarks. Each prints a baseline and our figure from the same run, and
//! the ratio between them. They drive the `vroom` beside this executable
//! (its daemon, its CLI, the cluster lab) and never ship in it; `cargo xtask
//! bench` builds both and runs them.

mod boot;
mod density;
mod events;
mod failover;
mod fio;
mod images;
mod import;
mod migrate;
mod qemu;
mod replicated;
mod service;
mod splice;
mod stats;
mod volume;
mod vroomd;
mod warm;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vroom::process::{die_quietly_on_closed_stdout, ensure_sbin_on_path, init_tracing, runtime};
use vroom_types::{parse_mem_mib, parse_volume_size_mib};

/// Benchmarks.
#[derive(Parser)]
#[command(name = "vroom bench", bin_name = "vroom bench")]
struct Cli {
    /// Where vroomd keeps its state, images and instances.
    #[arg(long, global = true, env = "VROOM_DATA_DIR", default_value = vroom::paths::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Boot the hello appliance N times through vroom and N times with the raw QEMU command.
    Boot {
        /// Boots of each kind.
        #[arg(short = 'n', long, default_value_t = 5)]
        runs: usize,
    },
    /// Boot the hello appliance's QEMU N times jailed and N times unjailed
    /// (no daemon needed; run as root).
    Jail {
        /// Boots of each kind.
        #[arg(short = 'n', long, default_value_t = 5)]
        runs: usize,
    },
    /// Splice an l2-firewall in front of a running web VM N times: latency
    /// against `vroom run` of the appliance, a running flow's failed
    /// requests and retransmits, throughput against the direct path.
    Splice {
        /// Splices and unsplices (room timings: at most 3).
        #[arg(short = 'n', long, default_value_t = 5)]
        runs: usize,
    },
    /// A service of the web appliance: the balancer's overhead (wrk through
    /// it against straight at one member), scale-out 1 -> 3 with cold boots
    /// against warm starts, requests failed under wrk during a scale-in and
    /// a rolling update; then SLO breach to SLO restored, cold against warm.
    Service {
        /// Rounds of each measurement.
        #[arg(short = 'n', long, default_value_t = 3)]
        runs: usize,
        /// Seconds of each wrk run of the overhead measurement.
        #[arg(long, default_value_t = 5)]
        secs: u32,
        /// Only the SLO breach to SLO restored.
        #[arg(long)]
        breach_only: bool,
    },
    /// Cold boot-to-ready against warm-start-to-ready of the web appliance,
    /// snapshot time and size against guest memory, and clones per minute.
    Warm {
        /// Starts of each kind.
        #[arg(short = 'n', long, default_value_t = 5)]
        runs: usize,
    },
    /// OCI images (umoci, skopeo, docker-registry on loopback): import
    /// cold against with cached layers, boot-to-ready of an imported busybox
    /// httpd against the hello recipe image, image size against the
    /// compressed layers.
    Import {
        /// Imports and boots of each kind.
        #[arg(short = 'n', long, default_value_t = 5)]
        runs: usize,
    },
    /// A throwaway two-node cluster on this machine (three etcd members,
    /// nodes in network namespaces): fault to ready on another node for
    /// `--ha restart` and `--ha standby`, double runs, and the etcd load.
    Failover {
        /// Faults per HA policy (power loss, frozen vroomd, etcd partition in turn).
        #[arg(short = 'n', long, default_value_t = 50)]
        runs: usize,
    },
    /// A throwaway two-node cluster on this machine: live migrations back
    /// and forth (total time, QEMU's downtime, and the silence a client
    /// probing every 10 ms sees) against stop-and-cold-boot moves.
    Migrate {
        /// Migrations (per case).
        #[arg(short = 'n', long, default_value_t = 20)]
        runs: usize,
        /// Guest memory, e.g. 128M (the image's default when absent).
        #[arg(long, value_parser = parse_mem_mib)]
        mem: Option<u64>,
        /// Repeat the moves with busy loops on every CPU.
        #[arg(long)]
        loaded: bool,
    },
    /// The machine's QEMU (the baseline) against QEMU 10 from `vroom setup
    /// --qemu 10`, in one run: the web appliance's boot to ready and warm
    /// start to ready (interleaved), and live migration of hello between
    /// two nodes; ratios QEMU 10 / baseline.
    Qemu {
        /// Starts of each kind per QEMU.
        #[arg(short = 'n', long, default_value_t = 5)]
        runs: usize,
        /// Migrations per QEMU (0: skip the cluster part).
        #[arg(long, default_value_t = 6)]
        migrations: usize,
    },
    /// Idle hello appliances, as many as fit a memory budget, on vroom's
    /// kernel and on Debian's (the baseline): host memory (PSS) per
    /// appliance, boot-to-ready of the first and the last, idle CPU, what
    /// KSM merges; then the TCG translation cache size against boot time
    /// and memory.
    Density {
        /// Host memory the appliances of each kernel may take.
        #[arg(long, default_value = "2G", value_parser = parse_mem_mib)]
        budget: u64,
        /// Appliances on vroom's kernel instead of what fits the budget.
        #[arg(short = 'n', long)]
        count: Option<usize>,
        /// Appliances on Debian's kernel (the baseline) instead of what fits
        /// the budget; never more than fit the host's available memory.
        #[arg(long)]
        baseline_count: Option<usize>,
        /// Raw boots per translation cache size (0: skip that part).
        #[arg(long, default_value_t = 3)]
        tb_runs: usize,
    },
    /// fio in a guest on a vroom data volume against the same file on a
    /// QEMU started by hand (4k random writes at QD1 and QD32, write+fsync,
    /// 1 MiB sequential), interleaved; then volume snapshots (offline and
    /// with the guest running) against a copy by hand, and clones.
    Volume {
        /// Rounds of (baseline, vroom).
        #[arg(short = 'n', long, default_value_t = 3)]
        runs: usize,
        /// The size of fio's file on the volume, e.g. 128M.
        #[arg(long, default_value = "128M", value_parser = parse_volume_size_mib)]
        file: u64,
        /// Seconds each of the five fio jobs runs (after a second of ramp).
        #[arg(long, default_value_t = 4)]
        runtime: u64,
        /// Data written to the volume beside fio's file before it is snapshotted.
        #[arg(long, default_value = "256M", value_parser = parse_volume_size_mib)]
        snapshot_data: u64,
    },
    /// A throwaway two-node cluster on this machine: fio in a guest on a
    /// replicated volume against the same volume with its replica's node
    /// down (interleaved), the round trip and the replica's synced write
    /// alone; the guest's stall when the replica freezes; full resync per
    /// GiB; failover with and without a volume; acknowledged writes lost
    /// over power losses of the primary.
    Replicated {
        /// Rounds of (local, replicated) fio.
        #[arg(short = 'n', long, default_value_t = 3)]
        runs: usize,
        /// The size of fio's file on the volume, e.g. 128M.
        #[arg(long, default_value = "128M", value_parser = parse_volume_size_mib)]
        file: u64,
        /// Seconds each of the five fio jobs runs (after a second of ramp).
        #[arg(long, default_value_t = 3)]
        runtime: u64,
        /// Data written to the volume before its full resync is timed.
        #[arg(long, default_value = "768M", value_parser = parse_volume_size_mib)]
        fill: u64,
        /// Power losses of the primary with a writer (the issue asks for 100).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// What the event log costs vroomd (CPU per change with live followers
    /// against none) and how soon a follower hears of a change.
    Events {
        /// Changes (a network created and removed) per case.
        #[arg(short = 'n', long, default_value_t = 200)]
        changes: usize,
        /// Live followers of the event log.
        #[arg(long, default_value_t = 10)]
        followers: usize,
        /// Idle hello appliances to run while vroomd's CPU is measured with
        /// and without followers and a scrape every 5 s (0: skip).
        #[arg(long, default_value_t = 20)]
        instances: usize,
        /// Seconds of each CPU measurement.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Build every recipe in a directory cold and cached, boot each, and
    /// compare the firewall with a debootstrap minbase root.
    Images {
        /// A directory of recipe directories.
        #[arg(long, default_value = "recipes")]
        recipes: PathBuf,
        /// Boots of each appliance.
        #[arg(short = 'n', long, default_value_t = 3)]
        runs: usize,
        /// Skip the debootstrap comparison (it downloads a full minbase).
        #[arg(long)]
        no_debootstrap: bool,
    },
}

fn main() {
    ensure_sbin_on_path();
    let mut args = std::env::args_os().skip(1);
    // `vroom-bench __jail SPEC`: the jailer of the QEMUs that the jail and
    // density benches launch themselves (`vroom_qemu` runs this very
    // executable for it). Before any runtime starts: it forks and must be
    // single-threaded.
    let result = if args
        .next()
        .is_some_and(|a| a == vroom_jail::JAIL_SUBCOMMAND)
    {
        match args.next() {
            Some(spec) => vroom::jail::run(std::path::Path::new(&spec)),
            None => Err(anyhow::anyhow!(
                "{} needs a jail spec",
                vroom_jail::JAIL_SUBCOMMAND
            )),
        }
    } else {
        let cli = Cli::parse();
        die_quietly_on_closed_stdout();
        init_tracing(false);
        runtime()
            .block_on(run(&cli.bench, &cli.data_dir))
            .map(|()| 0)
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    }
}

async fn run(bench: &Bench, data_dir: &std::path::Path) -> anyhow::Result<()> {
    match bench {
        Bench::Boot { runs } => boot::boot(data_dir, *runs).await,
        Bench::Jail { runs } => boot::jail(data_dir, *runs).await,
        Bench::Density {
            budget,
            count,
            baseline_count,
            tb_runs,
        } => density::density(data_dir, *budget, *count, *baseline_count, *tb_runs).await,
        Bench::Splice { runs } => splice::splice(data_dir, *runs).await,
        Bench::Events {
            changes,
            followers,
            instances,
            seconds,
        } => {
            events::events(
                data_dir,
                *changes,
                *followers,
                *instances,
                std::time::Duration::from_secs(*seconds),
            )
            .await
        }
        Bench::Warm { runs } => warm::warm(data_dir, *runs).await,
        Bench::Service {
            runs,
            secs,
            breach_only,
        } => service::service(data_dir, *runs, *secs, *breach_only).await,
        Bench::Import { runs } => import::import(data_dir, *runs).await,
        Bench::Qemu { runs, migrations } => qemu::qemu(data_dir, *runs, *migrations).await,
        Bench::Failover { runs } => failover::failover(*runs).await,
        Bench::Migrate { runs, mem, loaded } => migrate::migrate(*runs, *mem, *loaded).await,
        Bench::Volume {
            runs,
            file,
            runtime,
            snapshot_data,
        } => {
            let bench = volume::VolumeBench {
                runs: *runs,
                file_mib: *file,
                runtime_secs: *runtime,
                snapshot_mib: *snapshot_data,
            };
            volume::volume(data_dir, &bench).await
        }
        Bench::Replicated {
            runs,
            file,
            runtime,
            fill,
            rounds,
        } => {
            let bench = replicated::ReplicatedBench {
                runs: *runs,
                file_mib: *file,
                runtime_secs: *runtime,
                fill_mib: *fill,
                rounds: *rounds,
            };
            replicated::replicated(&bench).await
        }
        Bench::Images {
            recipes,
            runs,
            no_debootstrap,
        } => images::images(data_dir, recipes, *runs, !*no_debootstrap).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
