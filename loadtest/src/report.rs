//! The run's report: counts, rates, latency percentiles from HDR histograms,
//! errors and close codes, server and generator CPU, the timeline, and
//! pass/fail. [`Collected`] is what one process measured; it crosses a
//! worker's stdout (histograms in hdrhistogram's V2 format) and merges.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::cli::Common;
use crate::metrics::{Interval, Metrics, get, new_histogram};
use crate::summary::{Drift, MIB, SoakSummary};

/// Counts over the run. `sent`, `delivered` and `acked` count the measured
/// window only; loss, duplicates and connections count the whole run.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub delivered: u64,
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub recovered: u64,
    pub connections_established: u64,
    pub connections_failed: u64,
    pub reconnects: u64,
    pub typing_sent: u64,
    pub typing_received: u64,
    pub joins: u64,
    pub leaves: u64,
    pub history_pages: u64,
    pub history_messages: u64,
    pub unacked_at_close: u64,
    pub delivered_all: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.sent += o.sent;
        self.delivered += o.delivered;
        self.acked += o.acked;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.recovered += o.recovered;
        self.connections_established += o.connections_established;
        self.connections_failed += o.connections_failed;
        self.reconnects += o.reconnects;
        self.typing_sent += o.typing_sent;
        self.typing_received += o.typing_received;
        self.joins += o.joins;
        self.leaves += o.leaves;
        self.history_pages += o.history_pages;
        self.history_messages += o.history_messages;
        self.unacked_at_close += o.unacked_at_close;
        self.delivered_all += o.delivered_all;
    }
}

/// What one process measured.
#[derive(Debug, Default, Clone)]
pub struct Collected {
    pub counts: Counts,
    pub hists: BTreeMap<String, Histogram<u64>>,
    pub timeline: BTreeMap<i64, Interval>,
    pub errors: BTreeMap<String, u64>,
    pub closes: BTreeMap<String, u64>,
    /// Connections established per URL, when there are several.
    pub per_url: BTreeMap<String, u64>,
    pub loadgen_cpu_seconds: f64,
    pub extra: BTreeMap<String, f64>,
    /// A soak's samples and judgement (one process only).
    pub soak: Option<SoakSummary>,
}

impl Collected {
    pub fn from_metrics(m: &Metrics, loadgen_cpu_seconds: f64) -> Collected {
        let c = &m.c;
        let counts = Counts {
            sent: get(&c.sent),
            delivered: get(&c.delivered),
            acked: get(&c.acked),
            lost: get(&c.lost),
            duplicated: get(&c.duplicated),
            recovered: get(&c.recovered),
            connections_established: get(&c.established),
            connections_failed: get(&c.failed),
            reconnects: get(&c.reconnects),
            typing_sent: get(&c.typing_sent),
            typing_received: get(&c.typing_received),
            joins: get(&c.joins),
            leaves: get(&c.leaves),
            history_pages: get(&c.history_pages),
            history_messages: get(&c.history_messages),
            unacked_at_close: get(&c.unacked_at_close),
            delivered_all: get(&c.delivered_all),
        };
        let mut hists = BTreeMap::new();
        for (name, r) in [
            ("delivery", &m.delivery),
            ("delivery_slow", &m.delivery_slow),
            ("ack", &m.ack),
            ("handshake", &m.handshake),
            ("history", &m.history),
            ("resume", &m.resume),
        ] {
            let h = r.total();
            if !h.is_empty() {
                hists.insert(name.to_owned(), h);
            }
        }
        Collected {
            counts,
            hists,
            timeline: m.timeline(),
            errors: m.errors(),
            closes: m.closes(),
            per_url: m.per_url(),
            loadgen_cpu_seconds,
            extra: BTreeMap::new(),
            soak: crate::metrics::lock(&m.soak).clone(),
        }
    }

    pub fn merge(&mut self, o: Collected) {
        self.counts.add(&o.counts);
        for (k, h) in o.hists {
            let _ = self.hists.entry(k).or_insert_with(new_histogram).add(&h);
        }
        for (k, iv) in o.timeline {
            match self.timeline.get_mut(&k) {
                Some(mine) => {
                    mine.sent += iv.sent;
                    mine.delivered += iv.delivered;
                    mine.acked += iv.acked;
                    mine.open += iv.open;
                    let _ = mine.latency.add(&iv.latency);
                }
                None => {
                    self.timeline.insert(k, iv);
                }
            }
        }
        for (k, n) in o.errors {
            *self.errors.entry(k).or_default() += n;
        }
        for (k, n) in o.closes {
            *self.closes.entry(k).or_default() += n;
        }
        for (k, n) in o.per_url {
            *self.per_url.entry(k).or_default() += n;
        }
        for (k, v) in o.extra {
            *self.extra.entry(k).or_default() += v;
        }
        self.loadgen_cpu_seconds += o.loadgen_cpu_seconds;
        if self.soak.is_none() {
            self.soak = o.soak;
        }
    }

    /// One line of JSON; histograms as hex of hdrhistogram's V2 encoding.
    pub fn to_wire(&self) -> anyhow::Result<String> {
        let mut hists = BTreeMap::new();
        for (k, h) in &self.hists {
            hists.insert(k.clone(), encode(h)?);
        }
        let mut timeline = Vec::new();
        for (k, iv) in &self.timeline {
            timeline.push((
                *k,
                iv.sent,
                iv.delivered,
                iv.acked,
                iv.open,
                encode(&iv.latency)?,
            ));
        }
        let wire = Wire {
            counts: self.counts.clone(),
            hists,
            timeline,
            errors: self.errors.clone(),
            closes: self.closes.clone(),
            per_url: self.per_url.clone(),
            loadgen_cpu_seconds: self.loadgen_cpu_seconds,
            extra: self.extra.clone(),
        };
        Ok(serde_json::to_string(&wire)?)
    }

    pub fn from_wire(line: &str) -> anyhow::Result<Collected> {
        let w: Wire = serde_json::from_str(line).context("worker result")?;
        let mut hists = BTreeMap::new();
        for (k, hex) in w.hists {
            hists.insert(k, decode(&hex)?);
        }
        let mut timeline = BTreeMap::new();
        for (k, sent, delivered, acked, open, hex) in w.timeline {
            timeline.insert(
                k,
                Interval {
                    sent,
                    delivered,
                    acked,
                    open,
                    latency: decode(&hex)?,
                },
            );
        }
        Ok(Collected {
            counts: w.counts,
            hists,
            timeline,
            errors: w.errors,
            closes: w.closes,
            per_url: w.per_url,
            loadgen_cpu_seconds: w.loadgen_cpu_seconds,
            extra: w.extra,
            soak: None,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Wire {
    counts: Counts,
    hists: BTreeMap<String, String>,
    timeline: Vec<(i64, u64, u64, u64, u64, String)>,
    errors: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    #[serde(default)]
    per_url: BTreeMap<String, u64>,
    loadgen_cpu_seconds: f64,
    extra: BTreeMap<String, f64>,
}

fn encode(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
    let mut s = String::with_capacity(buf.len() * 2);
    for b in buf {
        let _ = write!(s, "{b:02x}");
    }
    Ok(s)
}

fn decode(hex: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .context("histogram hex")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("deserializing a histogram: {e:?}"))
}

/// Above this share of its cores the generator is likely the bottleneck.
pub const LOADGEN_BUSY: f64 = 0.9;

/// The CPUs this process may run on (its affinity), at most one per
/// runtime thread; with worker processes, at most one per worker.
fn loadgen_cores(common: &Common) -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = if common.workers > 1 {
        common.workers as usize
    } else {
        common.threads.unwrap_or(cpus)
    };
    cpus.min(threads).max(1) as f64
}

/// Percentiles in milliseconds.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Rates {
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    pub acked_per_s: f64,
    /// Connections established per second (handshake + join for Switchboard).
    pub connections_per_s: f64,
}

/// The server's use of the machine, from /proc/PID.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ServerUsage {
    pub pid: u32,
    /// CPU seconds (user + system) over the measured window.
    pub cpu_seconds: f64,
    /// Measured deliveries per server CPU-second.
    pub deliveries_per_cpu_second: Option<f64>,
    pub rss_before_bytes: Option<u64>,
    pub rss_after_bytes: Option<u64>,
    /// (after - before) / connections held, for `idle`.
    pub bytes_per_connection: Option<f64>,
}

/// One second of the run; `t` counts from the end of the warm-up.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub t: i64,
    pub sent: u64,
    pub delivered: u64,
    pub acked: u64,
    pub open: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The final report.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    /// `switchboard`, or `raw` for a plain broadcast server.
    pub target: String,
    pub url: String,
    pub clients: u32,
    pub processes: u32,
    pub warmup_seconds: f64,
    pub measured_seconds: f64,
    pub counts: Counts,
    pub rates: Rates,
    pub latency_ms: BTreeMap<String, Percentiles>,
    pub errors: BTreeMap<String, u64>,
    pub close_codes: BTreeMap<String, u64>,
    /// Connections established per URL (reconnects included), when the
    /// run was given several.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connections_per_url: BTreeMap<String, u64>,
    pub server: Option<ServerUsage>,
    /// The generator's CPU seconds over the measured window, all processes.
    pub loadgen_cpu_seconds: f64,
    /// CPUs the generator could use: the CPUs its affinity allows, at most
    /// one per runtime thread.
    #[serde(default)]
    pub loadgen_cores: f64,
    /// Measured deliveries per generator CPU-second.
    #[serde(default)]
    pub loadgen_deliveries_per_cpu_second: Option<f64>,
    /// Things that make the figures doubtful without failing the run.
    #[serde(default)]
    pub warnings: Vec<String>,
    pub extra: BTreeMap<String, f64>,
    /// `soak`: the server's memory and descriptors over the run, and their drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<SoakSummary>,
    pub timeline: Vec<Sample>,
    pub failures: Vec<String>,
}

impl Report {
    pub fn build(
        scenario: &str,
        clients: u32,
        common: &Common,
        c: &Collected,
        measured_seconds: f64,
        server: Option<ServerUsage>,
    ) -> Report {
        let per = |n: u64| {
            if measured_seconds > 0.0 {
                n as f64 / measured_seconds
            } else {
                0.0
            }
        };
        let mut server = server;
        if scenario != "idle"
            && let Some(s) = server.as_mut()
        {
            // Only an idle run holds still enough to divide memory by connections.
            s.bytes_per_connection = None;
        }
        if let Some(s) = server.as_mut()
            && s.cpu_seconds > 0.0
            && c.counts.delivered > 0
        {
            s.deliveries_per_cpu_second = Some(c.counts.delivered as f64 / s.cpu_seconds);
        }
        let mut r = Report {
            scenario: scenario.to_owned(),
            target: if common.nats {
                "nats"
            } else if common.raw {
                "raw"
            } else {
                "switchboard"
            }
            .to_owned(),
            url: common.urls(),
            clients,
            processes: common.workers.max(1),
            warmup_seconds: common.warmup,
            measured_seconds,
            counts: c.counts.clone(),
            rates: Rates {
                sent_per_s: per(c.counts.sent),
                delivered_per_s: per(c.counts.delivered),
                acked_per_s: per(c.counts.acked),
                connections_per_s: per(c.counts.connections_established),
            },
            latency_ms: c
                .hists
                .iter()
                .map(|(k, h)| (k.clone(), Percentiles::of(h)))
                .collect(),
            errors: c.errors.clone(),
            close_codes: c.closes.clone(),
            connections_per_url: if common.url.len() > 1 {
                c.per_url.clone()
            } else {
                BTreeMap::new()
            },
            server,
            loadgen_cpu_seconds: c.loadgen_cpu_seconds,
            loadgen_cores: loadgen_cores(common),
            loadgen_deliveries_per_cpu_second: (c.loadgen_cpu_seconds > 0.0
                && c.counts.delivered > 0)
                .then(|| c.counts.delivered as f64 / c.loadgen_cpu_seconds),
            warnings: Vec::new(),
            extra: c.extra.clone(),
            soak: c.soak.clone(),
            timeline: c
                .timeline
                .iter()
                .map(|(t, iv)| {
                    let p = Percentiles::of(&iv.latency);
                    Sample {
                        t: *t,
                        sent: iv.sent,
                        delivered: iv.delivered,
                        acked: iv.acked,
                        open: iv.open,
                        p50_ms: p.p50,
                        p90_ms: p.p90,
                        p99_ms: p.p99,
                        max_ms: p.max,
                    }
                })
                .collect(),
            failures: Vec::new(),
        };
        r.judge(common.slo_p99_ms);
        r.warn();
        r
    }

    /// The generator's share of the cores it could use over the measured
    /// window (1.0 = all of them).
    pub fn loadgen_share(&self) -> f64 {
        self.loadgen_cpu_seconds / (self.measured_seconds * self.loadgen_cores).max(1e-9)
    }

    fn warn(&mut self) {
        let share = self.loadgen_share();
        if self.measured_seconds > 0.0 && share > LOADGEN_BUSY {
            self.warnings.push(format!(
                "the load generator used {:.0}% of its {} core{}: the figures may be the generator's limit, not the server's",
                100.0 * share,
                self.loadgen_cores,
                if self.loadgen_cores == 1.0 { "" } else { "s" }
            ));
        }
    }

    /// The latency the SLO applies to, by scenario.
    pub fn main_latency(&self) -> Option<(&'static str, Percentiles)> {
        let name = match self.scenario.as_str() {
            "connect" | "idle" => "handshake",
            "history" => "history",
            _ => "delivery",
        };
        self.latency_ms.get(name).map(|p| (name, *p))
    }

    fn judge(&mut self, slo_p99_ms: Option<f64>) {
        let c = &self.counts;
        if c.lost > 0 {
            self.failures.push(format!("{} messages lost", c.lost));
        }
        if c.duplicated > 0 {
            self.failures
                .push(format!("{} messages duplicated", c.duplicated));
        }
        if c.connections_established == 0 {
            self.failures.push("no connection was established".into());
        }
        if let Some(s) = &self.soak {
            self.failures.extend(s.failures.iter().cloned());
        }
        if let Some(slo) = slo_p99_ms {
            match self.main_latency() {
                Some((name, p)) if p.p99 > slo => self.failures.push(format!(
                    "{name} p99 {:.2} ms misses the SLO of {slo} ms",
                    p.p99
                )),
                Some(_) => {}
                None => self
                    .failures
                    .push(format!("no latency measured for the SLO of {slo} ms")),
            }
        }
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The human-readable table.
    pub fn to_table(&self) -> String {
        let mut o = String::new();
        let c = &self.counts;
        let _ = writeln!(
            o,
            "switchboard-loadtest {} against {} ({}), {} clients, {} process{}",
            self.scenario,
            self.url,
            self.target,
            self.clients,
            self.processes,
            if self.processes == 1 { "" } else { "es" }
        );
        if self.scenario == "connect" {
            let _ = writeln!(o, "  storm lasted {:.2} s", self.measured_seconds);
        } else {
            let _ = writeln!(
                o,
                "  measured {:.1} s after a {:.1} s warm-up",
                self.measured_seconds, self.warmup_seconds
            );
        }
        let _ = write!(
            o,
            "  connections  {} established, {} failed, {} reconnects",
            c.connections_established, c.connections_failed, c.reconnects
        );
        if self.scenario == "connect" {
            let _ = write!(o, "; {:.1} per second", self.rates.connections_per_s);
        }
        let _ = writeln!(o);
        for (url, n) in &self.connections_per_url {
            let _ = writeln!(o, "    {n:>10} established to {url}");
        }
        let _ = writeln!(o, "  {:<22} {:>14} {:>14}", "", "measured", "per second");
        for (name, n, rate) in [
            ("sent", c.sent, self.rates.sent_per_s),
            ("delivered", c.delivered, self.rates.delivered_per_s),
            ("acked", c.acked, self.rates.acked_per_s),
        ] {
            let _ = writeln!(o, "  {name:<22} {n:>14} {rate:>14.1}");
        }
        let _ = writeln!(
            o,
            "  lost {}   duplicated {}   recovered {}   (whole run, {} deliveries)",
            c.lost, c.duplicated, c.recovered, c.delivered_all
        );
        if c.typing_sent + c.joins + c.history_pages > 0 {
            let _ = writeln!(
                o,
                "  typing {} sent / {} received   joins {}   leaves {}   history {} pages, {} messages   un-acked at a drop {}",
                c.typing_sent,
                c.typing_received,
                c.joins,
                c.leaves,
                c.history_pages,
                c.history_messages,
                c.unacked_at_close
            );
        }
        if !self.latency_ms.is_empty() {
            let _ = writeln!(
                o,
                "  {:<12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency ms", "count", "p50", "p90", "p99", "p99.9", "max"
            );
            for (k, p) in &self.latency_ms {
                let _ = writeln!(
                    o,
                    "  {k:<12} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    p.count, p.p50, p.p90, p.p99, p.p999, p.max
                );
            }
        }
        // The server's CPU and the generator's side by side: a generator
        // at its limit makes the server's figures its own.
        match &self.server {
            Some(s) => {
                let _ = write!(
                    o,
                    "  server pid {}:     {:.2} CPU-s ({:.0}% of a core)",
                    s.pid,
                    s.cpu_seconds,
                    100.0 * s.cpu_seconds / self.measured_seconds.max(1e-9)
                );
                if let Some(d) = s.deliveries_per_cpu_second {
                    let _ = write!(o, ", {d:.0} deliveries per CPU-second");
                }
                let _ = writeln!(o);
            }
            None => {
                let _ = writeln!(o, "  server CPU: not measured (give --server-pid)");
            }
        }
        let _ = write!(
            o,
            "  load generator: {:.2} CPU-s ({:.0}% of its {} core{})",
            self.loadgen_cpu_seconds,
            100.0 * self.loadgen_share(),
            self.loadgen_cores,
            if self.loadgen_cores == 1.0 { "" } else { "s" }
        );
        if let Some(d) = self.loadgen_deliveries_per_cpu_second {
            let _ = write!(o, ", {d:.0} deliveries per CPU-second");
        }
        let _ = writeln!(o);
        if let Some(s) = &self.server
            && let (Some(a), Some(b)) = (s.rss_before_bytes, s.rss_after_bytes)
        {
            let _ = write!(o, "  server RSS {} -> {}", mib(a), mib(b));
            if let Some(per) = s.bytes_per_connection {
                let _ = write!(
                    o,
                    " = {:.0} bytes ({:.2} KiB) per connection",
                    per,
                    per / 1024.0
                );
            }
            let _ = writeln!(o);
        }
        for (k, v) in &self.extra {
            let _ = writeln!(o, "  {k:<36} {v:>14.1}");
        }
        for (k, n) in &self.errors {
            let _ = writeln!(o, "  error {k}: {n}");
        }
        for (k, n) in &self.close_codes {
            let _ = writeln!(o, "  close code {k}: {n}");
        }
        if let Some(s) = &self.soak {
            soak_table(&mut o, s);
        }
        for w in &self.warnings {
            let _ = writeln!(o, "WARNING: {w}");
        }
        if self.failures.is_empty() {
            let _ = writeln!(o, "result: PASS");
        } else {
            for f in &self.failures {
                let _ = writeln!(o, "FAIL: {f}");
            }
        }
        o
    }
}

fn soak_table(o: &mut String, s: &SoakSummary) {
    let measured: Vec<_> = s.samples.iter().filter(|x| x.t >= 0.0).collect();
    let stored = s.samples.last().map_or(0, |x| x.stored);
    // Stored between the first and last measured sample: what the drift
    // is divided by.
    let stored_measured = match (measured.first(), measured.last()) {
        (Some(a), Some(b)) => b.stored.saturating_sub(a.stored),
        _ => 0,
    };
    let _ = writeln!(
        o,
        "  soak: {} sessions ({} failed), {} messages stored; {} samples ({} measured) from {}",
        s.cycles,
        s.failed_cycles,
        stored,
        s.samples.len(),
        measured.len(),
        s.source
    );
    if let Some(cpu) = s.server_cpu_seconds {
        let _ = writeln!(o, "  server CPU over the samples: {cpu:.2} CPU-s");
    }
    let line = |o: &mut String, name: &str, d: &Option<Drift>, scale: f64, unit: &str| {
        if let Some(d) = d {
            let _ = writeln!(
                o,
                "  {name:<12} first {:.1}{unit}  middle {:.1}{unit}  last {:.1}{unit}  drift {:+.1}{unit} ({:+.1}{unit} in the second half): {}",
                d.first / scale,
                d.middle / scale,
                d.last / scale,
                d.drift / scale,
                d.second_half / scale,
                if d.plateaued {
                    "levels off"
                } else {
                    "still growing"
                }
            );
        }
    };
    line(o, "server RSS", &s.rss, MIB, " MiB");
    line(o, "server fds", &s.fds, 1.0, "");
    if stored_measured > 0
        && let Some(d) = &s.rss
    {
        let _ = writeln!(
            o,
            "  RSS drift per message stored while measuring: {:.0} bytes ({} messages)",
            d.drift / stored_measured as f64,
            stored_measured
        );
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_with(cpu: f64, cores: f64) -> Report {
        let mut r = Report {
            measured_seconds: 10.0,
            loadgen_cpu_seconds: cpu,
            loadgen_cores: cores,
            ..Report::default()
        };
        r.warn();
        r
    }

    #[test]
    fn warns_when_the_generator_is_near_its_cores() {
        let busy = report_with(9.5, 1.0);
        assert_eq!(busy.warnings.len(), 1, "{:?}", busy.warnings);
        assert!(
            busy.to_table()
                .contains("WARNING: the load generator used 95% of its 1 core")
        );
        assert!(
            busy.to_table()
                .contains("load generator: 9.50 CPU-s (95% of its 1 core)")
        );
        assert!(report_with(9.5, 2.0).warnings.is_empty());
        assert!(report_with(18.5, 2.0).warnings.len() == 1);
        assert!(report_with(8.9, 1.0).warnings.is_empty());
    }

    #[test]
    fn collected_round_trips_and_merges() {
        let mut h = new_histogram();
        for v in [100, 200, 300, 5000] {
            h.record(v).unwrap_or_default();
        }
        let mut a = Collected::default();
        a.counts.delivered = 4;
        a.hists.insert("delivery".into(), h.clone());
        a.timeline.insert(
            0,
            Interval {
                sent: 1,
                delivered: 4,
                acked: 1,
                open: 2,
                latency: h.clone(),
            },
        );
        a.errors.insert("x".into(), 1);
        a.per_url.insert("ws://127.0.0.1:1/ws".into(), 3);
        a.hists.insert("resume".into(), h.clone());
        let wire = a.to_wire().unwrap_or_default();
        let b = Collected::from_wire(&wire).unwrap_or_default();
        assert_eq!(b.counts, a.counts);
        assert_eq!(b.hists.get("delivery").map(Histogram::len), Some(4));
        let mut m = a.clone();
        m.merge(b);
        assert_eq!(m.counts.delivered, 8);
        assert_eq!(m.hists.get("delivery").map(Histogram::len), Some(8));
        assert_eq!(m.timeline.get(&0).map(|i| i.latency.len()), Some(8));
        assert_eq!(m.errors.get("x"), Some(&2));
        assert_eq!(m.per_url.get("ws://127.0.0.1:1/ws"), Some(&6));
        assert_eq!(m.hists.get("resume").map(Histogram::len), Some(8));
        assert_eq!(m.hists.get("delivery").map(Histogram::max), Some(h.max()));
    }
}
