//! vroomd's metrics, in the Prometheus text format (`GET /metrics`).
//!
//! Two kinds: what is counted as it happens ([`Metrics`]: histograms of
//! boot, restore and snapshot times, migrations, events by kind and
//! action, API requests), kept for the daemon's life; and what is read at
//! scrape time ([`Engine::render_metrics`]: each instance's state, CPU,
//! memory, network and health, splices, volumes), so a removed instance
//! leaves no stale series.

use std::path::Path;

use prometheus::{
    CounterVec, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};
use vroom_types::{Event, EventKind, InstanceState};

use crate::engine::Engine;

/// The content type of [`Engine::render_metrics`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Seconds, for start and pause times under emulation (tens of ms to a
/// minute).
const SECONDS_BUCKETS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
];

/// What is counted as it happens.
pub struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    start_seconds: HistogramVec,
    snapshot_pause_seconds: HistogramVec,
    migration_downtime_seconds: HistogramVec,
    api_requests: IntCounterVec,
    api_seconds: HistogramVec,
    /// Lease keepalives of a cluster node, by result.
    pub lease_renewals: IntCounterVec,
    /// Bytes a replicated volume's full copy sent.
    pub resync_bytes: CounterVec,
    pub scrapes: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c =
                IntCounterVec::new(Opts::new(name, help), labels).expect("invariant: valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("invariant: registered once");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()),
                labels,
            )
            .expect("invariant: valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("invariant: registered once");
            h
        };
        let events = counter(
            "vroom_events_total",
            "Events logged, by kind and action (restarts, failures, failovers, migrations...).",
            &["kind", "action"],
        );
        let start_seconds = histogram(
            "vroom_instance_start_seconds",
            "From a VM's launch to its guest's ready, by how it started: cold (boot), warm (a warm snapshot), restore (a snapshot or clone).",
            &["how"],
        );
        let snapshot_pause_seconds = histogram(
            "vroom_snapshot_pause_seconds",
            "How long a snapshot paused its guest.",
            &["kind"],
        );
        let migration_downtime_seconds = histogram(
            "vroom_migration_downtime_seconds",
            "A live migration's downtime (QEMU's), on the source node.",
            &["to"],
        );
        let api_requests = counter(
            "vroom_api_requests_total",
            "API requests answered, by route, method and status.",
            &["route", "method", "status"],
        );
        let api_seconds = histogram(
            "vroom_api_request_seconds",
            "Time to answer an API request's head, by route.",
            &["route", "method"],
        );
        let lease_renewals = counter(
            "vroom_cluster_lease_renewals_total",
            "This node's lease keepalives, by result.",
            &["result"],
        );
        let resync_bytes = CounterVec::new(
            Opts::new(
                "vroom_volume_resync_bytes_total",
                "Bytes the full copies of replicated volumes sent to their replicas.",
            ),
            &["volume"],
        )
        .expect("invariant: valid metric");
        registry
            .register(Box::new(resync_bytes.clone()))
            .expect("invariant: registered once");
        let scrapes = IntCounter::new("vroom_metrics_scrapes_total", "Scrapes of these metrics.")
            .expect("invariant: valid metric");
        registry
            .register(Box::new(scrapes.clone()))
            .expect("invariant: registered once");
        Metrics {
            registry,
            events,
            start_seconds,
            snapshot_pause_seconds,
            migration_downtime_seconds,
            api_requests,
            api_seconds,
            lease_renewals,
            resync_bytes,
            scrapes,
        }
    }

    /// Counts an event, and measures what its details say.
    pub fn observe_event(&self, event: &Event) {
        self.events
            .with_label_values(&[event.kind.as_str(), event.action.as_str()])
            .inc();
        let ms = |key: &str| event.detail.get(key).and_then(|v| v.as_u64());
        match (event.kind, event.action.as_str()) {
            (EventKind::Instance, "ready") => {
                if let Some(boot) = ms("boot_ms") {
                    let how = match event.detail.get("from").and_then(|v| v.as_str()) {
                        None => "cold",
                        Some(from) if from.starts_with("warm") => "warm",
                        Some(_) => "restore",
                    };
                    self.start_seconds
                        .with_label_values(&[how])
                        .observe(boot as f64 / 1000.0);
                }
            }
            (EventKind::Snapshot, "created" | "warmed") => {
                if let Some(pause) = ms("pause_ms") {
                    let kind = if event.action == "warmed" {
                        "warm"
                    } else {
                        "snapshot"
                    };
                    self.snapshot_pause_seconds
                        .with_label_values(&[kind])
                        .observe(pause as f64 / 1000.0);
                }
            }
            (EventKind::Migration, "completed") => {
                if let Some(down) = ms("downtime_ms") {
                    let to = event
                        .detail
                        .get("to")
                        .and_then(|v| v.as_str())
                        .unwrap_or("");
                    self.migration_downtime_seconds
                        .with_label_values(&[to])
                        .observe(down as f64 / 1000.0);
                }
            }
            _ => {}
        }
    }

    /// Counts an answered API request.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.api_requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
        self.api_seconds
            .with_label_values(&[route, method])
            .observe(seconds);
    }
}

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
fn cpu_seconds(pid: u32) -> Option<f64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_feed_the_counters_and_histograms() {
        let metrics = Metrics::new();
        let mut event = Event {
            seq: 1,
            time: String::new(),
            node: None,
            actor: "vroomd".into(),
            kind: EventKind::Instance,
            action: "ready".into(),
            name: "web".into(),
            id: None,
            room: None,
            message: None,
            detail: [("boot_ms".to_string(), 1830.into())].into_iter().collect(),
        };
        metrics.observe_event(&event);
        event.detail.insert("from".into(), "warm web".into());
        event.detail.insert("boot_ms".into(), 400.into());
        metrics.observe_event(&event);
        metrics.observe_request("/v1/instances/{name}", "GET", 404, 0.002);
        let mut text = String::new();
        TextEncoder::new()
            .encode_utf8(&metrics.registry.gather(), &mut text)
            .unwrap();
        assert!(
            text.contains(r#"vroom_events_total{action="ready",kind="instance"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vroom_instance_start_seconds_sum{how="cold"} 1.83"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vroom_instance_start_seconds_bucket{how="warm",le="0.5"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vroom_api_requests_total{method="GET",route="/v1/instances/{name}",status="404"} 1"#
            ),
            "{text}"
        );
    }
}
