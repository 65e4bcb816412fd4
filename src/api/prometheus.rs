//! The Prometheus text exposition served at `GET /metrics`: every export's counters,
//! latency quantiles, forwarding state and trackers.
//!
//! Invariant: the exposition follows the Prometheus text format 0.0.4: one `# HELP`/`# TYPE`
//! pair per family, label values escaped (`\\`, `\"`, `\n`), so an export or tracker name can
//! never break the output. Names are validated elsewhere; escaping does not rely on that.
//!
//! Format: <https://prometheus.io/docs/instrumenting/exposition_formats/>

use std::fmt::Write as _;

use super::leases::WitnessCounters;
use super::types::ExportStatus;

/// Quantiles exported by the summary, with their Prometheus label values.
const QUANTILES: [(f64, &str); 4] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (0.999, "0.999")];

/// Media type of the text exposition.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escapes a label value: backslash, double quote and newline (text format 0.0.4).
pub fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Writes one metric text: `# HELP`, `# TYPE`, then one sample per item.
struct Exposition<'a> {
    out: &'a mut String,
}

impl Exposition<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label_value(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A per-export counter or gauge: name, type, help, and how to read it.
type ExportMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ExportStatus) -> u64,
);

const EXPORT_METRICS: [ExportMetric; 12] = [
    (
        "ferry_export_read_bytes_total",
        "counter",
        "Bytes returned by NBD READ.",
        |e| e.stats.counts.read_bytes,
    ),
    (
        "ferry_export_read_ops_total",
        "counter",
        "NBD READ requests completed.",
        |e| e.stats.counts.read_ops,
    ),
    (
        "ferry_export_write_bytes_total",
        "counter",
        "Bytes written by NBD WRITE.",
        |e| e.stats.counts.write_bytes,
    ),
    (
        "ferry_export_write_ops_total",
        "counter",
        "NBD WRITE requests completed.",
        |e| e.stats.counts.write_ops,
    ),
    (
        "ferry_export_flush_ops_total",
        "counter",
        "NBD FLUSH requests completed.",
        |e| e.stats.counts.flush_ops,
    ),
    (
        "ferry_export_trim_ops_total",
        "counter",
        "NBD TRIM requests completed.",
        |e| e.stats.counts.trim_ops,
    ),
    (
        "ferry_export_zero_ops_total",
        "counter",
        "NBD WRITE_ZEROES requests completed.",
        |e| e.stats.counts.zero_ops,
    ),
    (
        "ferry_export_connections",
        "gauge",
        "Live NBD connections.",
        |e| e.connections,
    ),
    (
        "ferry_export_size_bytes",
        "gauge",
        "Size of the exported image.",
        |e| e.size_bytes,
    ),
    (
        "ferry_export_forward_holding",
        "gauge",
        "1 while the export's requests are held because the agent it forwards to is away.",
        |e| u64::from(holding(e).is_some()),
    ),
    (
        "ferry_export_forward_held_requests",
        "gauge",
        "Requests held, across the export's connections, for the agent it forwards to.",
        |e| holding(e).map_or(0, |h| h.requests),
    ),
    (
        "ferry_export_forward_reconnects_total",
        "counter",
        "Connections to the agent the export forwards to, lost and made again.",
        |e| e.stats.forward_reconnects,
    ),
];

/// The export's holding state, if it forwards and holds.
fn holding(export: &ExportStatus) -> Option<crate::api::types::Holding> {
    export.forwarding.as_ref().and_then(|f| f.holding)
}

/// Renders the Prometheus text exposition of every export and tracker.
pub fn render_prometheus(exports: &[ExportStatus]) -> String {
    let mut out = String::new();
    let mut text = Exposition { out: &mut out };
    text.header("ferry_exports", "gauge", "Exports served.");
    text.sample("ferry_exports", &[], exports.len());
    for (name, kind, help, read) in EXPORT_METRICS {
        text.header(name, kind, help);
        for export in exports {
            text.sample(name, &[("export", &export.name)], read(export));
        }
    }
    const FORWARDED: &str = "ferry_export_forwarded";
    text.header(
        FORWARDED,
        "gauge",
        "1 if the export's disk lives at another agent (requests forwarded to `to`), else 0.",
    );
    for export in exports {
        let to = export.forwarding.as_ref().map_or("", |f| f.to.as_str());
        let labels = [("export", export.name.as_str()), ("to", to)];
        text.sample(FORWARDED, &labels, u8::from(export.forwarding.is_some()));
    }
    render_latency(&mut text, exports);
    render_trackers(&mut text, exports);
    out
}

/// The catch-ups of seeds (`ferry seed sync`): for each running one, the time since its
/// latest in-sync point (the replication lag) and the points reached.
pub fn render_replication(jobs: &[crate::api::types::JobStatus], now_unix_ms: u64) -> String {
    let mut out = String::new();
    let mut text = Exposition { out: &mut out };
    const LAG: &str = "ferry_seed_lag_seconds";
    const POINTS: &str = "ferry_seed_in_sync_points";
    let running = jobs
        .iter()
        .filter(|job| job.phase == crate::api::types::JobPhase::Running && job.sync.is_some());
    text.header(
        LAG,
        "gauge",
        "Seconds since the destination was last in sync with the source (running catch-ups \
         that reached an in-sync point).",
    );
    for job in running.clone() {
        let sync = job.sync.as_ref().expect("filtered");
        if let Some(at_ms) = sync.last_in_sync_unix_ms {
            let lag_s = now_unix_ms.saturating_sub(at_ms) as f64 / 1000.0;
            let labels = [
                ("export", job.export.as_str()),
                ("seed", sync.seed_id.as_str()),
            ];
            text.sample(LAG, &labels, lag_s);
        }
    }
    text.header(
        POINTS,
        "counter",
        "In-sync points a running catch-up reached.",
    );
    for job in running {
        let sync = job.sync.as_ref().expect("filtered");
        let labels = [
            ("export", job.export.as_str()),
            ("seed", sync.seed_id.as_str()),
        ];
        text.sample(POINTS, &labels, sync.in_sync_points);
    }
    out
}

/// The highest manager epoch the agent has admitted (`ferry_manager_epoch`, 0 before any
/// manager command): a gauge that only rises, by one step per manager takeover.
pub fn render_manager_epoch(highest: u64) -> String {
    const NAME: &str = "ferry_manager_epoch";
    let mut out = String::new();
    let mut text = Exposition { out: &mut out };
    text.header(
        NAME,
        "gauge",
        "Highest ferry manager epoch this agent has seen; commands of lower epochs are refused.",
    );
    text.sample(NAME, &[], highest);
    out
}

/// The witness's gauge and counter: manager pairs whose lease this agent keeps, and lease
/// record writes that failed or timed out.
pub fn render_witness(counters: &WitnessCounters) -> String {
    const PAIRS: &str = "ferry_witness_pairs";
    const FAILURES: &str = "ferry_witness_write_failures_total";
    let mut out = String::new();
    let mut text = Exposition { out: &mut out };
    text.header(
        PAIRS,
        "gauge",
        "Manager pairs whose lease this agent keeps as witness.",
    );
    text.sample(PAIRS, &[], counters.pairs);
    text.header(
        FAILURES,
        "counter",
        "Lease record writes that failed or timed out (each answered write_failed).",
    );
    text.sample(FAILURES, &[], counters.write_failures);
    out
}

fn render_latency(text: &mut Exposition<'_>, exports: &[ExportStatus]) {
    const NAME: &str = "ferry_request_latency_us";
    text.header(
        NAME,
        "summary",
        "NBD request latency in microseconds, receive to reply.",
    );
    for export in exports {
        let latency = &export.stats.latency_us;
        for (quantile, label) in QUANTILES {
            let labels = [("export", export.name.as_str()), ("quantile", label)];
            text.sample(NAME, &labels, latency.at(quantile));
        }
        let labels = [("export", export.name.as_str())];
        // The histogram keeps no exact sum; mean x count is exact to 3 significant digits.
        let sum = (latency.mean * latency.count as f64).round();
        text.sample("ferry_request_latency_us_sum", &labels, sum);
        text.sample("ferry_request_latency_us_count", &labels, latency.count);
    }
    const MAX: &str = "ferry_request_latency_us_max";
    text.header(
        MAX,
        "gauge",
        "Largest NBD request latency recorded, in microseconds.",
    );
    for export in exports {
        text.sample(
            MAX,
            &[("export", &export.name)],
            export.stats.latency_us.max,
        );
    }
}

fn render_trackers(text: &mut Exposition<'_>, exports: &[ExportStatus]) {
    type TrackerMetric = (
        &'static str,
        &'static str,
        fn(&crate::api::types::TrackerStatus) -> u64,
    );
    let metrics: [TrackerMetric; 6] = [
        (
            "ferry_tracker_dirty_blocks",
            "Blocks written since the tracker was last cleared.",
            |t| t.dirty_blocks,
        ),
        (
            "ferry_tracker_dirty_bytes",
            "Bytes covered by dirty blocks.",
            |t| t.dirty_bytes,
        ),
        (
            "ferry_tracker_lost",
            "1 if the tracker was restored after an unclean stop.",
            |t| u64::from(t.lost),
        ),
        (
            "ferry_tracker_memory_bytes",
            "Heap bytes of the tracker's bitmap and heat chunks.",
            |t| t.memory_bytes,
        ),
        (
            "ferry_tracker_state_bytes",
            "Bytes of the tracker's state file at its last save.",
            |t| t.state_bytes,
        ),
        (
            "ferry_tracker_durable",
            "1 if every acknowledged write's mark survives a crash (none before the activity log).",
            |t| u64::from(t.durable),
        ),
    ];
    for (name, help, read) in metrics {
        text.header(name, "gauge", help);
        for export in exports {
            for tracker in &export.trackers {
                let labels = [
                    ("export", export.name.as_str()),
                    ("tracker", tracker.name.as_str()),
                ];
                text.sample(name, &labels, read(tracker));
            }
        }
    }
    render_tracker_states(text, exports);
}

/// `ferry_tracker_state{export,tracker,state}`: 1 on the tracker's current state, one sample
/// per tracker (the info-metric pattern, so `state` can gain values without new metrics).
fn render_tracker_states(text: &mut Exposition<'_>, exports: &[ExportStatus]) {
    const STATE: &str = "ferry_tracker_state";
    text.header(
        STATE,
        "gauge",
        "1 on the tracker's state: ok, lost, or recovered (activity log, not yet).",
    );
    for export in exports {
        for tracker in &export.trackers {
            let labels = [
                ("export", export.name.as_str()),
                ("tracker", tracker.name.as_str()),
                ("state", tracker.state.name()),
            ];
            text.sample(STATE, &labels, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::api::types::{CounterSnapshot, ExportStats, TrackerStatus};
    use crate::metrics::LatencyRecorder;

    #[test]
    fn manager_epoch_is_one_gauge() {
        // Goal: the epoch is one unlabelled gauge with its HELP and TYPE. Method: render 7.
        let text = render_manager_epoch(7);
        assert!(
            text.contains("# TYPE ferry_manager_epoch gauge\n"),
            "{text}"
        );
        assert!(text.ends_with("\nferry_manager_epoch 7\n"), "{text}");
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn witness_metrics() {
        // Goal: the witness's gauge and counter are exposed with their types. Method: render.
        let text = render_witness(&WitnessCounters {
            pairs: 2,
            write_failures: 5,
        });
        assert!(
            text.contains("# TYPE ferry_witness_pairs gauge\n"),
            "{text}"
        );
        assert!(text.contains("\nferry_witness_pairs 2\n"), "{text}");
        assert!(
            text.contains("# TYPE ferry_witness_write_failures_total counter\n"),
            "{text}"
        );
        assert!(
            text.ends_with("\nferry_witness_write_failures_total 5\n"),
            "{text}"
        );
    }

    fn export(name: &str) -> ExportStatus {
        let mut latency = LatencyRecorder::new();
        for us in [10, 20, 30, 40, 1000] {
            latency.record_us(us);
        }
        ExportStatus {
            name: name.to_string(),
            path: PathBuf::from("/images/vm.raw"),
            read_only: false,
            size_bytes: 1 << 30,
            granularity_bytes: 65536,
            connections: 2,
            trackers: vec![TrackerStatus {
                name: "backup".into(),
                granularity_bytes: 65536,
                block_count: 16384,
                dirty_blocks: 3,
                dirty_bytes: 3 * 65536,
                lost: true,
                half_life_ms: 30_000,
                memory_bytes: 6144,
                state_bytes: 93,
                durable: false,
                state: crate::api::types::TrackerState::Lost,
            }],
            forwarding: None,
            forward_hold_ms: None,
            stats: ExportStats {
                counts: CounterSnapshot {
                    read_ops: 7,
                    read_bytes: 7 * 4096,
                    write_ops: 5,
                    write_bytes: 5 * 4096,
                    flush_ops: 1,
                    trim_ops: 2,
                    zero_ops: 3,
                },
                latency_us: latency.summary(),
                forward_reconnects: 0,
            },
        }
    }

    #[test]
    fn label_values_are_escaped() {
        // Goal: any name yields valid exposition text. Method: escape each special character.
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("line\nbreak"), "line\\nbreak");
        assert_eq!(escape_label_value("plain-name_1.x"), "plain-name_1.x");
    }

    #[test]
    fn prometheus_text_has_every_family() {
        // Goal: each documented metric appears once per export (tracker) with the right value.
        // Method: render two exports, one with a hostile name, and look for exact lines.
        let hostile = "x\"y\\z";
        let mut moved = export("vm2");
        moved.forwarding = Some(crate::api::types::Forwarding {
            to: "10.0.0.2:10809".into(),
            since_unix_ms: Some(1),
            holding: Some(crate::api::types::Holding {
                since_unix_ms: 2,
                requests: 6,
            }),
        });
        moved.stats.forward_reconnects = 4;
        let text = render_prometheus(&[export("vm1"), export(hostile), moved]);
        for line in [
            "ferry_export_forwarded{export=\"vm1\",to=\"\"} 0",
            "ferry_export_forwarded{export=\"vm2\",to=\"10.0.0.2:10809\"} 1",
            "ferry_export_forward_holding{export=\"vm1\"} 0",
            "ferry_export_forward_holding{export=\"vm2\"} 1",
            "ferry_export_forward_held_requests{export=\"vm1\"} 0",
            "ferry_export_forward_held_requests{export=\"vm2\"} 6",
            "ferry_export_forward_reconnects_total{export=\"vm2\"} 4",
            "ferry_exports 3",
            "ferry_export_read_bytes_total{export=\"vm1\"} 28672",
            "ferry_export_read_ops_total{export=\"vm1\"} 7",
            "ferry_export_write_bytes_total{export=\"vm1\"} 20480",
            "ferry_export_write_ops_total{export=\"vm1\"} 5",
            "ferry_export_flush_ops_total{export=\"vm1\"} 1",
            "ferry_export_trim_ops_total{export=\"vm1\"} 2",
            "ferry_export_zero_ops_total{export=\"vm1\"} 3",
            "ferry_export_connections{export=\"vm1\"} 2",
            "ferry_export_size_bytes{export=\"vm1\"} 1073741824",
            "ferry_request_latency_us{export=\"vm1\",quantile=\"0.5\"} 30",
            "ferry_request_latency_us{export=\"vm1\",quantile=\"0.999\"} 1000",
            "ferry_request_latency_us_count{export=\"vm1\"} 5",
            "ferry_request_latency_us_max{export=\"vm1\"} 1000",
            "ferry_tracker_dirty_blocks{export=\"vm1\",tracker=\"backup\"} 3",
            "ferry_tracker_dirty_bytes{export=\"vm1\",tracker=\"backup\"} 196608",
            "ferry_tracker_lost{export=\"vm1\",tracker=\"backup\"} 1",
            "ferry_tracker_memory_bytes{export=\"vm1\",tracker=\"backup\"} 6144",
            "ferry_tracker_state_bytes{export=\"vm1\",tracker=\"backup\"} 93",
            "ferry_tracker_durable{export=\"vm1\",tracker=\"backup\"} 0",
            "ferry_tracker_state{export=\"vm1\",tracker=\"backup\",state=\"lost\"} 1",
            "ferry_export_connections{export=\"x\\\"y\\\\z\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert_eq!(
            text.matches("# TYPE ferry_request_latency_us summary")
                .count(),
            1
        );
        assert_eq!(
            text.matches("# TYPE ferry_export_read_bytes_total counter")
                .count(),
            1
        );
        // Every sample line is `name{labels} value` with a numeric value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().expect("value");
            assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        }
    }

    #[test]
    fn prometheus_text_without_exports() {
        // Goal: an idle agent still renders valid text. Method: render an empty list.
        let text = render_prometheus(&[]);
        assert!(text.contains("ferry_exports 0\n"));
        assert!(!text.contains("export=\""));
    }
}
