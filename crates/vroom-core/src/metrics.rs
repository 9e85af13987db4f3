//! vroomd's metrics, in the Prometheus text format (`GET /metrics`).
//!
//! Two kinds: what is counted as it happens ([`Metrics`]: histograms of
//! boot, restore and snapshot times, migrations, events by kind and
//! action, API requests), kept for the daemon's life; and what is read at
//! scrape time ([`crate::Engine::render_metrics`]: each instance's state, CPU,
//! memory, network and health, splices, volumes), so a removed instance
//! leaves no stale series.

use prometheus::{
    CounterVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use vroom_types::{Event, EventKind};

/// The content type of [`crate::Engine::render_metrics`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Seconds, for start and pause times under emulation (tens of ms to a
/// minute).
const SECONDS_BUCKETS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
];

/// What is counted as it happens.
pub struct Metrics {
    pub(crate) registry: Registry,
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
        prometheus::TextEncoder::new()
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
