//! Process-wide metrics: their values, their Prometheus names and help.
//!
//! This module owns the numbers and how they are named; it does not serve
//! them (the admin listener encodes them at `/metrics`) and it reads no other
//! module's state (values computed at scrape time, like the room count, are
//! added by the admin module's collector). The process series (RSS,
//! descriptors, CPU) are read from `/proc/self` per scrape by
//! [`ProcessCollector`].
//!
//! Everything here is updated on the hot path without a lock: counters and
//! gauges are `prometheus-client`'s atomic types; [`Histogram`] is a fixed set
//! of atomic buckets (the crate's own histogram takes a mutex per observation,
//! which every session task would contend on). Families are only used for
//! label sets fixed at start (the per-label counters are cloned out once, so
//! an increment is one atomic add) or for rare events (auth failures).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use crate::close::CloseReason;

/// A monotonically increasing count (a Prometheus counter). Clones share the value.
#[derive(Debug, Clone, Default)]
pub struct Counter(prometheus_client::metrics::counter::Counter<u64, AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.inc();
    }
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, encoder: MetricEncoder) -> fmt::Result {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// A value that goes up and down (a Prometheus gauge). Clones share the value.
#[derive(Debug, Clone, Default)]
pub struct Gauge(prometheus_client::metrics::gauge::Gauge<i64, AtomicI64>);

impl Gauge {
    pub fn inc(&self) {
        self.0.inc();
    }
    pub fn dec(&self) {
        self.0.dec();
    }
    pub fn set(&self, v: i64) {
        self.0.set(v);
    }
    pub fn get(&self) -> i64 {
        self.0.get()
    }
}

impl TypedMetric for Gauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for Gauge {
    fn encode(&self, encoder: MetricEncoder) -> fmt::Result {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// Upper bounds, in seconds, of the latency histograms: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Upper bounds of the commit batch size histogram, in messages.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// A Prometheus histogram with fixed buckets and one atomic add per bucket,
/// count and sum: no lock. Values are kept as integers of a unit (nanoseconds
/// for durations, 1 for counts). Clones share the values.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds in the exported unit (seconds, messages).
    bounds: &'static [f64],
    /// The same bounds in integer units.
    unit_bounds: Box<[u64]>,
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_units: AtomicU64,
    /// The exported value of one integer unit.
    scale: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64], scale: f64) -> Histogram {
        let unit_bounds = bounds.iter().map(|b| (b / scale).round() as u64).collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram(Arc::new(HistogramInner {
            bounds,
            unit_bounds,
            counts,
            sum_units: AtomicU64::new(0),
            scale,
        }))
    }

    /// A histogram of durations, exported in seconds.
    pub fn seconds(bounds: &'static [f64]) -> Histogram {
        Histogram::new(bounds, 1e-9)
    }

    /// A histogram of whole numbers (sizes, counts).
    pub fn counts(bounds: &'static [f64]) -> Histogram {
        Histogram::new(bounds, 1.0)
    }

    /// Records a duration (for histograms made with [`Histogram::seconds`]).
    pub fn observe_duration(&self, d: Duration) {
        self.observe_units(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records a whole number (for histograms made with [`Histogram::counts`]).
    pub fn observe(&self, n: u64) {
        self.observe_units(n);
    }

    fn observe_units(&self, units: u64) {
        let inner = &self.0;
        let i = inner.unit_bounds.partition_point(|b| *b < units);
        if let Some(c) = inner.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        inner.sum_units.fetch_add(units, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of the observations, in the exported unit.
    pub fn sum(&self) -> f64 {
        self.0.sum_units.load(Ordering::Relaxed) as f64 * self.0.scale
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let inner = &self.0;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' total, so `_count` always equals the
        // `+Inf` bucket even while observations race with the scrape.
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<NoLabelSet>(self.sum(), count, &buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type ReasonLabel = [(&'static str, &'static str); 1];

/// Every server metric. Field names are the API the rest of the crate uses;
/// [`Metrics::register`] gives each its Prometheus name.
#[derive(Debug)]
pub struct Metrics {
    /// `switchboard_connections_open`: sessions running now.
    pub connections_open: Gauge,
    /// `switchboard_connections_refused_total`: upgrades refused at `max_connections`.
    pub connections_refused: Counter,
    /// `switchboard_handshake_failures_total`: TLS or upgrade failures and timeouts.
    pub handshake_failures: Counter,
    /// `switchboard_sessions_closed_total{reason}`, indexed by `CloseReason as usize - 1`.
    pub sessions_closed: [Counter; CloseReason::ALL.len()],
    /// `switchboard_messages_received_total`: `send`s queued to the store.
    pub messages_received: Counter,
    /// `switchboard_messages_delivered_total`: live messages written to subscribers.
    pub messages_delivered: Counter,
    /// `switchboard_messages_dropped_total{reason="ephemeral_shed"}`: typing
    /// and presence events shed because an outbox was full.
    pub ephemeral_shed: Counter,
    /// `switchboard_messages_dropped_total{reason="queue_full"}`: durable
    /// messages that did not fit a subscriber's outbox. That subscriber is
    /// closed with 4100 and gets them back by resuming from its last seq.
    pub messages_dropped: Counter,
    /// `switchboard_slow_consumers_total`: sessions closed for a full outbox or a late write.
    pub slow_consumers: Counter,
    /// `switchboard_received_bytes_total`: WebSocket payload bytes read.
    pub bytes_in: Counter,
    /// `switchboard_sent_bytes_total`: WebSocket payload bytes written.
    pub bytes_out: Counter,
    /// `switchboard_error_frames_total`: `error` frames sent.
    pub error_frames: Counter,
    /// `switchboard_fanout_latency_seconds`: from a message's commit (when
    /// the hub encodes it) to its write into each subscriber's socket.
    pub fanout_latency: Histogram,
    /// `switchboard_ack_latency_seconds`: from reading a `send` off the
    /// socket to writing its `ack` (queueing, group commit with fsync, write).
    pub ack_latency: Histogram,
    /// `switchboard_store_commit_seconds`: one store write transaction, fsync included.
    pub store_commit_latency: Histogram,
    /// `switchboard_store_commit_batch_size`: operations (appends, erasures) per group commit.
    pub store_commit_batch: Histogram,
    /// `switchboard_rate_limited_total`: requests refused by a rate limit.
    pub rate_limited: Counter,
    /// `switchboard_admin_unauthorized_total`: admin requests refused with 401.
    pub admin_unauthorized: Counter,
    closed_family: Family<ReasonLabel, Counter>,
    dropped_family: Family<ReasonLabel, Counter>,
    auth_failures: Family<[(&'static str, String); 1], Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let closed_family = Family::<ReasonLabel, Counter>::default();
        let sessions_closed =
            CloseReason::ALL.map(|r| closed_family.get_or_create_owned(&[("reason", r.as_str())]));
        let dropped_family = Family::<ReasonLabel, Counter>::default();
        let ephemeral_shed = dropped_family.get_or_create_owned(&[("reason", "ephemeral_shed")]);
        let messages_dropped = dropped_family.get_or_create_owned(&[("reason", "queue_full")]);
        Metrics {
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            handshake_failures: Counter::default(),
            sessions_closed,
            messages_received: Counter::default(),
            messages_delivered: Counter::default(),
            ephemeral_shed,
            messages_dropped,
            slow_consumers: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            error_frames: Counter::default(),
            fanout_latency: Histogram::seconds(LATENCY_BUCKETS),
            ack_latency: Histogram::seconds(LATENCY_BUCKETS),
            store_commit_latency: Histogram::seconds(LATENCY_BUCKETS),
            store_commit_batch: Histogram::counts(BATCH_BUCKETS),
            rate_limited: Counter::default(),
            admin_unauthorized: Counter::default(),
            closed_family,
            dropped_family,
            auth_failures: Family::default(),
        }
    }
}

impl Metrics {
    pub fn session_closed(&self, reason: CloseReason) {
        if let Some(c) = self.sessions_closed.get(reason as usize - 1) {
            c.inc();
        }
    }

    pub fn closed_for(&self, reason: CloseReason) -> u64 {
        self.sessions_closed
            .get(reason as usize - 1)
            .map_or(0, Counter::get)
    }

    /// Counts a refused authentication, by a short stable reason
    /// (`expired`, `bad_signature`, ...). Never pass the credential itself.
    pub fn auth_failed(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&[("reason", reason.to_owned())])
            .inc();
    }

    /// Authentication failures so far for `reason`.
    pub fn auth_failures_for(&self, reason: &str) -> u64 {
        self.auth_failures
            .get(&[("reason", reason.to_owned())])
            .map_or(0, |c| c.get())
    }

    /// Registers every metric under its Prometheus name. The registry holds
    /// clones that share the values, so it may outlive nothing and lock nothing.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "switchboard_connections_open",
            "WebSocket sessions open now",
            self.connections_open.clone(),
        );
        r.register(
            "switchboard_connections_refused",
            "Upgrades refused with HTTP 503 at max_connections",
            self.connections_refused.clone(),
        );
        r.register(
            "switchboard_handshake_failures",
            "TLS or WebSocket handshakes that failed or timed out",
            self.handshake_failures.clone(),
        );
        r.register(
            "switchboard_sessions_closed",
            "Sessions ended, by close reason",
            self.closed_family.clone(),
        );
        r.register(
            "switchboard_messages_received",
            "Messages received from clients and queued to the store",
            self.messages_received.clone(),
        );
        r.register(
            "switchboard_messages_delivered",
            "Live messages written to subscribers' sockets",
            self.messages_delivered.clone(),
        );
        r.register(
            "switchboard_messages_dropped",
            "Frames not queued to a subscriber: ephemeral_shed (typing, presence) or queue_full (durable; the subscriber is closed with 4100 and resumes)",
            self.dropped_family.clone(),
        );
        r.register(
            "switchboard_slow_consumers",
            "Sessions closed as slow consumers (full outbox or late write)",
            self.slow_consumers.clone(),
        );
        r.register_with_unit(
            "switchboard_received",
            "WebSocket payload bytes read from clients",
            Unit::Bytes,
            self.bytes_in.clone(),
        );
        r.register_with_unit(
            "switchboard_sent",
            "WebSocket payload bytes written to clients",
            Unit::Bytes,
            self.bytes_out.clone(),
        );
        r.register(
            "switchboard_error_frames",
            "error frames sent to clients",
            self.error_frames.clone(),
        );
        r.register_with_unit(
            "switchboard_fanout_latency",
            "From a message's commit to its write into each subscriber's socket",
            Unit::Seconds,
            self.fanout_latency.clone(),
        );
        r.register_with_unit(
            "switchboard_ack_latency",
            "From reading a send off the socket to writing its ack",
            Unit::Seconds,
            self.ack_latency.clone(),
        );
        r.register_with_unit(
            "switchboard_store_commit",
            "Duration of one store write transaction, fsync included",
            Unit::Seconds,
            self.store_commit_latency.clone(),
        );
        r.register(
            "switchboard_store_commit_batch_size",
            "Operations (appends, erasures) per group commit",
            self.store_commit_batch.clone(),
        );
        r.register(
            "switchboard_auth_failures",
            "Refused authentications, by reason",
            self.auth_failures.clone(),
        );
        r.register(
            "switchboard_rate_limited",
            "Requests refused by a rate limit",
            self.rate_limited.clone(),
        );
        r.register(
            "switchboard_admin_unauthorized",
            "Admin API requests refused with 401",
            self.admin_unauthorized.clone(),
        );
        r.register_collector(Box::new(ProcessCollector));
    }
}

/// The standard Prometheus process series (`process_resident_memory_bytes`,
/// `process_open_fds`, `process_max_fds`, `process_cpu_seconds_total`),
/// read from `/proc/self` at scrape time, so that a remote observer (the
/// load generator's `soak`) can watch the server's memory and descriptors.
/// A series that cannot be read (not Linux) is left out of the scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessCollector;

/// Clock ticks per second in `/proc/PID/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// What [`ProcessCollector`] reads from `/proc/self`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

impl ProcessSample {
    /// Reads this process's figures. These are reads of procfs (in memory,
    /// no disk), cheap enough for a scrape handler.
    pub fn read() -> ProcessSample {
        let status = std::fs::read_to_string("/proc/self/status").ok();
        let resident_bytes = status.as_deref().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("Max open files"))?;
                line.split_whitespace().nth(3)?.parse().ok()
            });
        let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // The fields after the command name, which may hold spaces.
                let rest = s.rsplit_once(')')?.1;
                let mut fields = rest.split_whitespace().skip(11);
                let utime: f64 = fields.next()?.parse().ok()?;
                let stime: f64 = fields.next()?.parse().ok()?;
                Some((utime + stime) / USER_HZ)
            });
        ProcessSample {
            resident_bytes,
            open_fds,
            max_fds,
            cpu_seconds,
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = ProcessSample::read();
        let mut gauge = |name: &str, help: &str, unit: Option<&Unit>, v: Option<u64>| {
            let Some(v) = v else { return Ok(()) };
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)
        };
        gauge(
            "process_resident_memory",
            "Resident memory size in bytes.",
            Some(&Unit::Bytes),
            s.resident_bytes,
        )?;
        gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            None,
            s.open_fds,
        )?;
        gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            None,
            s.max_fds,
        )?;
        if let Some(cpu) = s.cpu_seconds {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn encode(m: &Metrics) -> String {
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::default();
        m.bytes_in.add(10);
        m.session_closed(CloseReason::Kicked);
        m.auth_failed("expired");
        let text = encode(&m);
        for line in [
            "switchboard_connections_open 0",
            "switchboard_received_bytes_total 10",
            "switchboard_sessions_closed_total{reason=\"kicked\"} 1",
            "switchboard_sessions_closed_total{reason=\"client_closed\"} 0",
            "switchboard_messages_dropped_total{reason=\"ephemeral_shed\"} 0",
            "switchboard_auth_failures_total{reason=\"expired\"} 1",
            "switchboard_fanout_latency_seconds_count 0",
            "switchboard_store_commit_batch_size_count 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(m.closed_for(CloseReason::Kicked), 1);
        assert_eq!(m.auth_failures_for("expired"), 1);
    }

    /// The value of an unlabelled series in a scrape.
    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    #[test]
    fn process_series_are_exported() {
        let text = encode(&Metrics::default());
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"));
        assert!(text.contains("# TYPE process_cpu_seconds counter"));
        assert!(value(&text, "process_resident_memory_bytes") > 1e6);
        let fds = value(&text, "process_open_fds");
        assert!(fds >= 3.0, "{text}");
        assert!(value(&text, "process_max_fds") >= fds);
        assert!(value(&text, "process_cpu_seconds_total") >= 0.0);
        // Descriptors opened here show in the next scrape (by a wide
        // margin: tests running beside this one open and close files too).
        let files: Vec<_> = (0..1000)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let more = value(&encode(&Metrics::default()), "process_open_fds");
        assert!(more >= fds + 900.0, "{fds} -> {more}");
        drop(files);
    }

    #[test]
    fn histogram_buckets_are_cumulative_in_the_export() {
        let m = Metrics::default();
        m.fanout_latency.observe_duration(Duration::from_micros(50));
        m.fanout_latency.observe_duration(Duration::from_millis(3));
        m.fanout_latency.observe_duration(Duration::from_secs(60));
        m.store_commit_batch.observe(3);
        let text = encode(&m);
        assert!(text.contains("switchboard_fanout_latency_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(text.contains("switchboard_fanout_latency_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("switchboard_fanout_latency_seconds_bucket{le=\"10.0\"} 2"));
        assert!(text.contains("switchboard_fanout_latency_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("switchboard_fanout_latency_seconds_count 3"));
        assert!(text.contains("switchboard_store_commit_batch_size_bucket{le=\"4.0\"} 1"));
        assert_eq!(m.fanout_latency.count(), 3);
        assert!((m.fanout_latency.sum() - 60.00305).abs() < 1e-9);
    }
}
