//! fio inside a guest, for `vroom bench volume`: the one job file both the
//! baseline and vroom run (as a command line), what the bench reads from
//! fio's JSON report (`--output-format=json`, fio 3.33 as in Debian 12),
//! and the comparison of the two series.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::stats::median;

/// Where the volume under test is mounted in the guest (under `/var`, one
/// of the image's writable directories, so the mount point can be made).
pub(crate) const MOUNT: &str = "/var/bench";

/// The file every job reads and writes, on the mounted filesystem.
const FILE: &str = "/var/bench/fio.dat";

/// The jobs, one after another (`stonewall`), each for `runtime_secs` after
/// a second of ramp, on one file of `file_mib` that fio lays out once (its
/// first run writes it whole, outside the measured time). All but `fsync`
/// bypass the guest's page cache (`direct=1`): what is measured is the disk
/// path, virtio-blk to the host file, not guest memory. vroom's kernel has
/// neither AIO nor io_uring, so every job does synchronous I/O (`psync`)
/// and 32 in flight are 32 threads:
/// - `randwrite-qd1`: 4 KiB random writes, one at a time (latency);
/// - `randwrite-qd32`: the same from 32 threads (IOPS);
/// - `fsync`: 4 KiB buffered writes each followed by an fsync (what a
///   database commit costs: the flush reaches the host's disk);
/// - `seqwrite`, `seqread`: 1 MiB sequential, one at a time (throughput).
pub(crate) fn job_argv(file_mib: u64, runtime_secs: u64) -> Vec<String> {
    let mut argv: Vec<String> = [
        "fio",
        "--output-format=json",
        &format!("--filename={FILE}"),
        &format!("--size={file_mib}M"),
        "--time_based",
        &format!("--runtime={runtime_secs}"),
        "--ramp_time=1",
        "--ioengine=psync",
        "--direct=1",
        "--randrepeat=0",
        // Not fio's own TSC clock, which it calibrates at start: under TCG
        // that calibration can come out wrong and its latencies quantized.
        "--clocksource=clock_gettime",
        "--thread",
        "--group_reporting",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let jobs: [(&str, &[&str]); 5] = [
        ("randwrite-qd1", &["--rw=randwrite", "--bs=4k"]),
        (
            "randwrite-qd32",
            &["--rw=randwrite", "--bs=4k", "--numjobs=32"],
        ),
        (
            "fsync",
            &["--rw=randwrite", "--bs=4k", "--direct=0", "--fsync=1"],
        ),
        ("seqwrite", &["--rw=write", "--bs=1M"]),
        ("seqread", &["--rw=read", "--bs=1M"]),
    ];
    for (name, options) in jobs {
        argv.push(format!("--name={name}"));
        argv.push("--stonewall".into());
        argv.extend(options.iter().map(|s| s.to_string()));
    }
    argv
}

/// What one fio run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FioFigures {
    pub qd1_p50_us: f64,
    pub qd1_p99_us: f64,
    pub qd32_iops: f64,
    pub fsync_p50_us: f64,
    pub fsync_p99_us: f64,
    /// Writes per second, each followed by its fsync.
    pub fsync_iops: f64,
    pub seq_write_mib_s: f64,
    pub seq_read_mib_s: f64,
}

/// Reads the figures of [`job_argv`]'s jobs from fio's output.
pub(crate) fn parse(stdout: &str) -> Result<FioFigures> {
    let report = report(stdout)?;
    let qd1 = job(&report, "randwrite-qd1")?;
    let fsync = job(&report, "fsync")?;
    let figures = FioFigures {
        qd1_p50_us: percentile_us(&qd1["write"]["clat_ns"], "50.000000")?,
        qd1_p99_us: percentile_us(&qd1["write"]["clat_ns"], "99.000000")?,
        qd32_iops: number(&job(&report, "randwrite-qd32")?["write"]["iops"], "iops")?,
        fsync_p50_us: percentile_us(&fsync["sync"]["lat_ns"], "50.000000")?,
        fsync_p99_us: percentile_us(&fsync["sync"]["lat_ns"], "99.000000")?,
        fsync_iops: number(&fsync["write"]["iops"], "iops")?,
        seq_write_mib_s: mib_s(&job(&report, "seqwrite")?["write"])?,
        seq_read_mib_s: mib_s(&job(&report, "seqread")?["read"])?,
    };
    // A median I/O that took no time at all: the clock fio read ticked in
    // jiffies (seen once under TCG on a loaded host), so no latency holds.
    if figures.qd1_p50_us <= 0.0 || figures.fsync_p50_us <= 0.0 {
        bail!("fio measured latencies of 0: the guest's clock is too coarse to time I/O");
    }
    Ok(figures)
}

/// fio's JSON report in its output: fio may print notes before it
/// (`fio: ...`), so it starts at the first line that opens an object.
fn report(stdout: &str) -> Result<Value> {
    let start = stdout
        .lines()
        .scan(0, |offset, line| {
            let at = *offset;
            *offset += line.len() + 1;
            Some((at, line))
        })
        .find(|(_, line)| line.starts_with('{'))
        .map(|(at, _)| at)
        .context("fio printed no JSON report")?;
    serde_json::from_str(&stdout[start..]).context("fio's JSON report does not parse")
}

/// fio writing `mib` of data to `path` in 1 MiB blocks, flushed at the end
/// (data, not holes: a copy of the volume has to move it).
pub(crate) fn fill_argv(path: &str, mib: u64) -> Vec<String> {
    [
        "fio",
        "--output-format=json",
        "--name=fill",
        &format!("--filename={path}"),
        "--rw=write",
        "--bs=1M",
        &format!("--size={mib}M"),
        "--ioengine=psync",
        "--direct=1",
        "--end_fsync=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The writer of the stall measurement: 4 KiB random writes, one at a
/// time, each followed by an fsync (a database's commits), for
/// `runtime_secs` on a 16 MiB file, every latency kept (`lat_ns.max`).
pub(crate) fn writer_argv(runtime_secs: u64) -> Vec<String> {
    [
        "fio",
        "--output-format=json",
        "--name=writer",
        &format!("--filename={MOUNT}/writer.dat"),
        "--size=16M",
        "--rw=randwrite",
        "--bs=4k",
        "--ioengine=psync",
        "--direct=1",
        "--fsync=1",
        "--time_based",
        &format!("--runtime={runtime_secs}"),
        "--randrepeat=0",
        "--clocksource=clock_gettime",
        "--thread",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// What the writer of [`writer_argv`] saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Writes {
    /// Writes done (each with its fsync).
    pub count: u64,
    pub write_p50_us: f64,
    /// The longest write, and the longest fsync.
    pub write_max_us: f64,
    pub fsync_max_us: f64,
}

impl Writes {
    /// The longest single operation the writer waited for.
    pub fn longest_us(&self) -> f64 {
        self.write_max_us.max(self.fsync_max_us)
    }
}

pub(crate) fn parse_writes(stdout: &str) -> Result<Writes> {
    let report = report(stdout)?;
    let writer = job(&report, "writer")?;
    Ok(Writes {
        count: writer["write"]["total_ios"]
            .as_u64()
            .context("fio's report lacks the writer's total_ios")?,
        write_p50_us: percentile_us(&writer["write"]["clat_ns"], "50.000000")?,
        write_max_us: number(&writer["write"]["clat_ns"]["max"], "the longest write")? / 1000.0,
        fsync_max_us: number(&writer["sync"]["lat_ns"]["max"], "the longest fsync")? / 1000.0,
    })
}

/// The job named `name`, which must have run without error.
fn job<'a>(report: &'a Value, name: &str) -> Result<&'a Value> {
    let job = report["jobs"]
        .as_array()
        .context("fio's report has no jobs")?
        .iter()
        .find(|j| j["jobname"] == name)
        .with_context(|| format!("fio's report has no job {name}"))?;
    match job["error"].as_i64() {
        Some(0) | None => Ok(job),
        Some(errno) => bail!("fio job {name} failed with error {errno}"),
    }
}

fn number(v: &Value, what: &str) -> Result<f64> {
    v.as_f64()
        .with_context(|| format!("fio's report lacks a number for {what}"))
}

/// A latency percentile (`"99.000000"`) in microseconds.
fn percentile_us(lat_ns: &Value, key: &str) -> Result<f64> {
    number(&lat_ns["percentile"][key], &format!("percentile {key}")).map(|ns| ns / 1000.0)
}

fn mib_s(direction: &Value) -> Result<f64> {
    let bytes = number(&direction["bw_bytes"], "bw_bytes")?;
    if direction["io_bytes"].as_u64() == Some(0) {
        bail!("a fio job moved no data");
    }
    Ok(bytes / (1u64 << 20) as f64)
}

/// Which way a figure improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Better {
    Lower,
    Higher,
}

/// One figure of [`FioFigures`], for the comparison table.
pub(crate) struct Metric {
    pub label: &'static str,
    pub unit: &'static str,
    pub better: Better,
    pub value: fn(&FioFigures) -> f64,
}

pub(crate) const METRICS: &[Metric] = &[
    Metric {
        label: "4k randwrite QD1 p50",
        unit: "us",
        better: Better::Lower,
        value: |f| f.qd1_p50_us,
    },
    Metric {
        label: "4k randwrite QD1 p99",
        unit: "us",
        better: Better::Lower,
        value: |f| f.qd1_p99_us,
    },
    Metric {
        label: "4k randwrite QD32",
        unit: "IOPS",
        better: Better::Higher,
        value: |f| f.qd32_iops,
    },
    Metric {
        label: "4k write+fsync: fsync p50",
        unit: "us",
        better: Better::Lower,
        value: |f| f.fsync_p50_us,
    },
    Metric {
        label: "4k write+fsync: fsync p99",
        unit: "us",
        better: Better::Lower,
        value: |f| f.fsync_p99_us,
    },
    Metric {
        label: "4k write+fsync",
        unit: "commits/s",
        better: Better::Higher,
        value: |f| f.fsync_iops,
    },
    Metric {
        label: "1M seq write",
        unit: "MiB/s",
        better: Better::Higher,
        value: |f| f.seq_write_mib_s,
    },
    Metric {
        label: "1M seq read",
        unit: "MiB/s",
        better: Better::Higher,
        value: |f| f.seq_read_mib_s,
    },
];

/// One row of the comparison: medians over the rounds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub label: &'static str,
    pub unit: &'static str,
    pub baseline: f64,
    pub ours: f64,
    /// Ours over the baseline's.
    pub ratio: f64,
    /// How much worse ours is, whichever way the figure improves: 1.25
    /// means 25% slower (higher latency, or fewer IOPS); below 1 is better.
    pub cost: f64,
}

/// The goal: a local volume within this factor of the baseline.
pub(crate) const GOAL: f64 = 1.1;

/// Medians of each figure over the rounds, baseline against ours.
pub(crate) fn compare(baseline: &[FioFigures], ours: &[FioFigures]) -> Vec<Row> {
    METRICS
        .iter()
        .map(|m| {
            let base = median(&baseline.iter().map(m.value).collect::<Vec<_>>());
            let our = median(&ours.iter().map(m.value).collect::<Vec<_>>());
            let ratio = our / base;
            Row {
                label: m.label,
                unit: m.unit,
                baseline: base,
                ours: our,
                ratio,
                cost: match m.better {
                    Better::Lower => ratio,
                    Better::Higher => 1.0 / ratio,
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of fio 3.33 cut down to what the bench reads, with the
    /// notes fio may print before it.
    fn report(qd1_p50_ns: u64, qd32_iops: f64, read_bw: u64) -> String {
        let job = |name: &str, write: Value, read: Value, sync: Value| {
            serde_json::json!({
                "jobname": name, "groupid": 0, "error": 0,
                "read": read, "write": write, "sync": sync,
            })
        };
        let idle = serde_json::json!({ "io_bytes": 0, "bw_bytes": 0, "iops": 0.0 });
        let no_sync = serde_json::json!({ "total_ios": 0, "lat_ns": { "N": 0 } });
        let lat = |p50: u64, p99: u64| {
            serde_json::json!({
                "min": 1, "max": 9, "mean": 2.0,
                "percentile": { "1.000000": 1, "50.000000": p50, "99.000000": p99, "99.990000": p99 * 2 }
            })
        };
        let report = serde_json::json!({
            "fio version": "fio-3.33",
            "jobs": [
                job("randwrite-qd1",
                    serde_json::json!({ "io_bytes": 4096000, "bw_bytes": 4096000, "iops": 1000.0,
                                        "clat_ns": lat(qd1_p50_ns, 2_500_000) }),
                    idle.clone(), no_sync.clone()),
                job("randwrite-qd32",
                    serde_json::json!({ "io_bytes": 1, "bw_bytes": 1, "iops": qd32_iops,
                                        "clat_ns": lat(1, 2) }),
                    idle.clone(), no_sync.clone()),
                job("fsync",
                    serde_json::json!({ "io_bytes": 1, "bw_bytes": 1, "iops": 250.5,
                                        "clat_ns": lat(10_000, 20_000) }),
                    idle.clone(),
                    serde_json::json!({ "total_ios": 1002, "lat_ns": lat(3_000_000, 7_500_000) })),
                job("seqwrite",
                    serde_json::json!({ "io_bytes": 1, "bw_bytes": 104857600, "iops": 100.0 }),
                    idle.clone(), no_sync.clone()),
                job("seqread", idle.clone(),
                    serde_json::json!({ "io_bytes": 1, "bw_bytes": read_bw, "iops": 200.0 }),
                    no_sync),
            ]
        });
        format!(
            "fio: note: both iodepth >= 1 and synchronous I/O engine are selected\n{}",
            serde_json::to_string_pretty(&report).unwrap()
        )
    }

    #[test]
    fn the_report_gives_each_figure_from_its_job() {
        let figures = parse(&report(800_000, 4321.5, 209715200)).unwrap();
        assert_eq!(
            figures,
            FioFigures {
                qd1_p50_us: 800.0,
                qd1_p99_us: 2500.0,
                qd32_iops: 4321.5,
                fsync_p50_us: 3000.0,
                fsync_p99_us: 7500.0,
                fsync_iops: 250.5,
                seq_write_mib_s: 100.0,
                seq_read_mib_s: 200.0,
            }
        );
    }

    #[test]
    fn broken_reports_are_refused_with_a_reason() {
        let good = report(800_000, 4321.5, 209715200);
        let cases: &[(&str, &str)] = &[
            ("fio: failed to open /var/bench/fio.dat\n", "no JSON report"),
            ("{\"jobs\": [", "does not parse"),
            ("{\"jobs\": []}", "no job randwrite-qd1"),
        ];
        for (input, reason) in cases {
            let err = format!("{:#}", parse(input).unwrap_err());
            assert!(err.contains(reason), "{input:?}: {err}");
        }
        let failed = good.replacen("\"error\": 0", "\"error\": 5", 1);
        let err = format!("{:#}", parse(&failed).unwrap_err());
        assert!(err.contains("failed with error 5"), "{err}");
        let coarse = report(0, 4321.5, 209715200);
        let err = format!("{:#}", parse(&coarse).unwrap_err());
        assert!(err.contains("too coarse"), "{err}");
        let no_percentile = good.replace("\"50.000000\"", "\"50.500000\"");
        let err = format!("{:#}", parse(&no_percentile).unwrap_err());
        assert!(err.contains("percentile 50.000000"), "{err}");
    }

    #[test]
    fn the_comparison_takes_medians_and_costs_each_figure_its_own_way() {
        let run = |p50_ns, iops, read| parse(&report(p50_ns, iops, read)).unwrap();
        let baseline = [
            run(1_000_000, 1000.0, 100 << 20),
            run(3_000_000, 3000.0, 300 << 20),
            run(2_000_000, 2000.0, 200 << 20),
        ];
        let ours = [
            run(2_200_000, 1600.0, 250 << 20),
            run(9_000_000, 900.0, 150 << 20),
            run(1_900_000, 2500.0, 210 << 20),
        ];
        let rows = compare(&baseline, &ours);
        assert_eq!(rows.len(), METRICS.len());
        let row = |label: &str| rows.iter().find(|r| r.label == label).unwrap().clone();
        // Latency: median 2000 against 2200 us, 10% worse.
        let qd1 = row("4k randwrite QD1 p50");
        assert_eq!((qd1.baseline, qd1.ours), (2000.0, 2200.0));
        assert!((qd1.ratio - 1.1).abs() < 1e-9 && (qd1.cost - 1.1).abs() < 1e-9);
        // IOPS: median 2000 against 1600, 0.8x as many, 25% worse.
        let qd32 = row("4k randwrite QD32");
        assert_eq!((qd32.baseline, qd32.ours), (2000.0, 1600.0));
        assert!((qd32.ratio - 0.8).abs() < 1e-9 && (qd32.cost - 1.25).abs() < 1e-9);
        // Throughput: median 200 against 210 MiB/s, better than the baseline.
        let read = row("1M seq read");
        assert_eq!((read.baseline, read.ours), (200.0, 210.0));
        assert!(read.cost < 1.0);
        // Equal runs cost nothing.
        assert!(compare(&baseline, &baseline)
            .iter()
            .all(|r| (r.ratio - 1.0).abs() < 1e-12 && (r.cost - 1.0).abs() < 1e-12));
    }

    #[test]
    fn the_writer_reports_its_longest_write_or_fsync() {
        let report = serde_json::json!({
            "jobs": [{
                "jobname": "writer", "error": 0,
                "write": { "total_ios": 812, "clat_ns": {
                    "max": 1_250_000_000u64, "percentile": { "50.000000": 900_000 } } },
                "sync": { "total_ios": 812, "lat_ns": { "max": 40_000_000 } },
            }]
        });
        let writes = parse_writes(&format!("fio: note\n{report}")).unwrap();
        assert_eq!(writes.count, 812);
        assert_eq!(writes.write_p50_us, 900.0);
        assert_eq!(writes.longest_us(), 1_250_000.0);
        let err = format!("{:#}", parse_writes("{\"jobs\": []}").unwrap_err());
        assert!(err.contains("no job writer"), "{err}");
    }

    #[test]
    fn every_job_the_figures_need_is_on_the_command_line() {
        let argv = job_argv(128, 4);
        assert_eq!(argv[0], "fio");
        assert!(argv.contains(&"--output-format=json".to_string()));
        assert!(argv.contains(&"--size=128M".to_string()));
        for name in [
            "randwrite-qd1",
            "randwrite-qd32",
            "fsync",
            "seqwrite",
            "seqread",
        ] {
            assert!(argv.contains(&format!("--name={name}")), "{name}");
        }
        assert_eq!(argv.iter().filter(|a| *a == "--stonewall").count(), 5);
    }
}
