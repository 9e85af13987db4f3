//! What the metrics read at scrape time: each instance's state, CPU,
//! memory, network, block I/O and health, splices, volumes (see
//! [`crate::metrics`] for what is counted as it happens).

use std::path::Path;

use prometheus::{CounterVec, Gauge, GaugeVec, Opts, Registry, TextEncoder};
use vroom_types::InstanceState;

use super::Engine;

/// A gauge family made for one scrape.
fn gauges(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("invariant: valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("invariant: registered once");
    g
}

/// A counter read from the kernel at scrape time (a gauge family typed as
/// a counter would need a collector of its own; Prometheus's `rate()`
/// works on either, and the name says it only grows).
fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> CounterVec {
    let c = CounterVec::new(Opts::new(name, help), labels).expect("invariant: valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("invariant: registered once");
    c
}

/// A process's user+system CPU seconds, from `/proc/PID/stat`.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// A process's resident and proportional set sizes in bytes, from
/// `/proc/PID/smaps_rollup`.
fn memory_bytes(pid: u32) -> Option<(f64, f64)> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib = |key: &str| {
        rollup.lines().find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    Some((kib("Rss:")? * 1024.0, kib("Pss:")? * 1024.0))
}

/// One statistic of a host interface, from sysfs.
fn link_stat(dir: &Path, name: &str) -> Option<f64> {
    std::fs::read_to_string(dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

const STATES: [InstanceState; 6] = [
    InstanceState::Starting,
    InstanceState::Running,
    InstanceState::Stopping,
    InstanceState::Stopped,
    InstanceState::Restarting,
    InstanceState::Failed,
];

impl Engine {
    /// Every metric as of now, in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let metrics = self.events().metrics();
        metrics.scrapes.inc();
        let now = Registry::new();
        let node = self.events().node().unwrap_or_default();
        let info = gauges(
            &now,
            "vroom_instance_info",
            "One per instance (always 1): its image, room and node.",
            &["vm", "id", "image", "room", "node"],
        );
        let state = gauges(
            &now,
            "vroom_instance_state",
            "1 for an instance's current lifecycle state, 0 for the others.",
            &["vm", "state"],
        );
        let cpu = counters(
            &now,
            "vroom_instance_cpu_seconds_total",
            "CPU time of the instance's VMM (QEMU), user and system.",
            &["vm"],
        );
        let rss = gauges(
            &now,
            "vroom_instance_memory_rss_bytes",
            "Resident memory of the instance's VMM.",
            &["vm"],
        );
        let pss = gauges(
            &now,
            "vroom_instance_memory_pss_bytes",
            "Proportional memory of the instance's VMM (shared pages split among their users).",
            &["vm"],
        );
        let restarts = gauges(
            &now,
            "vroom_instance_restarts",
            "Times the restart policy restarted the instance since it was last started by hand.",
            &["vm"],
        );
        let healthy = gauges(
            &now,
            "vroom_instance_healthy",
            "1 when the guest last reported ready with no service down, 0 when not; absent before its first report.",
            &["vm"],
        );
        let net = [
            (
                "receive_bytes",
                "tx_bytes",
                "Bytes the guest received on a NIC.",
            ),
            (
                "transmit_bytes",
                "rx_bytes",
                "Bytes the guest sent on a NIC.",
            ),
            (
                "receive_packets",
                "tx_packets",
                "Packets the guest received on a NIC.",
            ),
            (
                "transmit_packets",
                "rx_packets",
                "Packets the guest sent on a NIC.",
            ),
            (
                "receive_errors",
                "tx_errors",
                "Errors delivering packets to the guest on a NIC.",
            ),
            (
                "transmit_errors",
                "rx_errors",
                "Errors on packets the guest sent on a NIC.",
            ),
            (
                "receive_drops",
                "tx_dropped",
                "Packets to the guest dropped on a NIC (its queue was full).",
            ),
            (
                "transmit_drops",
                "rx_dropped",
                "Packets from the guest dropped on a NIC.",
            ),
        ]
        .map(|(what, stat, help)| {
            let family = counters(
                &now,
                &format!("vroom_instance_network_{what}_total"),
                help,
                &["vm", "nic", "network"],
            );
            (family, stat)
        });
        let block = [
            ("read_bytes", "Bytes the guest read from a drive."),
            ("written_bytes", "Bytes the guest wrote to a drive."),
            ("reads", "Read operations on a drive."),
            ("writes", "Write operations on a drive."),
            ("flushes", "Flushes of a drive."),
        ]
        .map(|(what, help)| {
            counters(
                &now,
                &format!("vroom_instance_block_{what}_total"),
                help,
                &["vm", "drive"],
            )
        });
        for instance in self.list() {
            let name = instance.spec.name.as_str();
            // The VMM's own counters, over QMP (a VM busy with a migration
            // or a snapshot may not answer: its drives are left out).
            {
                for drive in self.drive_stats(name) {
                    let labels = [name, drive.drive.as_str()];
                    for (family, value) in block.iter().zip([
                        drive.read_bytes,
                        drive.written_bytes,
                        drive.reads,
                        drive.writes,
                        drive.flushes,
                    ]) {
                        family.with_label_values(&labels).inc_by(value as f64);
                    }
                }
            }
            info.with_label_values(&[
                name,
                &instance.id,
                &instance.image_name,
                &self.room_of(&instance).unwrap_or_default(),
                instance.node.as_deref().unwrap_or(&node),
            ])
            .set(1.0);
            for s in STATES {
                let value = if s == instance.status.state { 1.0 } else { 0.0 };
                state.with_label_values(&[name, &s.to_string()]).set(value);
            }
            restarts
                .with_label_values(&[name])
                .set(f64::from(instance.status.restarts));
            if let Some(health) = &instance.health {
                let ok = health.ready && health.services_down.is_empty();
                healthy
                    .with_label_values(&[name])
                    .set(f64::from(u8::from(ok)));
            }
            if let Some(pid) = instance.status.pid {
                if let Some(seconds) = cpu_seconds(pid) {
                    cpu.with_label_values(&[name]).inc_by(seconds);
                }
                if let Some((r, p)) = memory_bytes(pid) {
                    rss.with_label_values(&[name]).set(r);
                    pss.with_label_values(&[name]).set(p);
                }
            }
            if instance.status.pid.is_none() {
                continue;
            }
            for (index, nic) in instance.nics.iter().enumerate() {
                let dir = Path::new("/sys/class/net")
                    .join(&nic.tap)
                    .join("statistics");
                let label = nic.role.clone().unwrap_or_else(|| index.to_string());
                for (family, stat) in &net {
                    if let Some(value) = link_stat(&dir, stat) {
                        family
                            .with_label_values(&[name, &label, nic.network.as_str()])
                            .inc_by(value);
                    }
                }
            }
        }
        let splices = gauges(
            &now,
            "vroom_splice_state",
            "1 for a splice's current state (active, bypassed, cut...), 0 for the others.",
            &["appliance", "vm", "state"],
        );
        for splice in self.list_splices() {
            for s in ["starting", "active", "bypassed", "cut", "removing"] {
                let value = if splice.state.to_string() == s {
                    1.0
                } else {
                    0.0
                };
                splices
                    .with_label_values(&[splice.appliance.as_str(), splice.vm.as_str(), s])
                    .set(value);
            }
        }
        let volume_size = gauges(
            &now,
            "vroom_volume_size_bytes",
            "A data volume's size.",
            &["volume"],
        );
        let replica = gauges(
            &now,
            "vroom_volume_replica_state",
            "1 for a replicated volume's replica state (up_to_date, syncing, outdated), 0 for the others.",
            &["volume", "state"],
        );
        for volume in self.list_volumes().unwrap_or_default() {
            let name = volume.name.as_str();
            volume_size
                .with_label_values(&[name])
                .set(volume.size_mib as f64 * 1024.0 * 1024.0);
            if let Some(replication) = &volume.replication {
                for s in ["up_to_date", "syncing", "outdated"] {
                    let current = serde_json::to_value(replication.state)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from));
                    let value = if current.as_deref() == Some(s) {
                        1.0
                    } else {
                        0.0
                    };
                    replica.with_label_values(&[name, s]).set(value);
                }
            }
        }
        let last_event = Gauge::new("vroom_events_last_seq", "The last event number given out.")
            .expect("invariant: valid metric");
        last_event.set(self.events().last_seq() as f64);
        now.register(Box::new(last_event.clone()))
            .expect("invariant: registered once");

        let mut families = metrics.registry.gather();
        families.extend(now.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut text = String::new();
        TextEncoder::new()
            .encode_utf8(&families, &mut text)
            .expect("invariant: metrics encode");
        text
    }
}
