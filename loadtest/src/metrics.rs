//! What a run measures while it runs: lock-free counters, sharded HDR
//! histograms (one uncontended lock per record), a per-second timeline, and
//! the run's clock (start, measured window, stop) in Unix µs so that worker
//! processes share it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::conn::now_us;

/// Histogram bounds: 1 µs to 60 s, 3 significant figures.
pub const HIST_MAX_US: u64 = 60_000_000;

pub fn new_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, HIST_MAX_US, 3) {
        Ok(h) => h,
        // Constant bounds that hdrhistogram accepts: not reachable.
        Err(e) => panic!("histogram bounds rejected: {e}"),
    }
}

/// The run's clock, in Unix µs.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The load starts (publishers, senders, readers).
    pub start: u64,
    /// Figures count from here (after the warm-up).
    pub measure_from: u64,
    /// Load stops here.
    pub stop: u64,
}

impl Clock {
    pub fn new(start: u64, warmup: u64, duration: u64) -> Clock {
        Clock {
            start,
            measure_from: start + warmup,
            stop: start + warmup + duration,
        }
    }

    pub fn measured(&self, t: u64) -> bool {
        t >= self.measure_from && t < self.stop
    }

    pub fn seconds(&self) -> f64 {
        (self.stop - self.measure_from) as f64 / 1e6
    }
}

/// A latency recorder: sharded, each value recorded once. A shard holds
/// what came since the last tick, measured and not apart, and the measured
/// total of the ticks before; a tick folds the measured part into the total.
pub struct Recorder {
    shards: Vec<Mutex<Shard>>,
}

struct Shard {
    measured: Histogram<u64>,
    unmeasured: Histogram<u64>,
    total: Histogram<u64>,
}

const SHARDS: usize = 32;

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        measured: new_histogram(),
                        unmeasured: new_histogram(),
                        total: new_histogram(),
                    })
                })
                .collect(),
        }
    }

    /// Records `us` into shard `who % SHARDS`; it counts in the total only
    /// when `measured`.
    pub fn record(&self, who: usize, us: u64, measured: bool) {
        self.record_many(who, std::iter::once((us, measured)));
    }

    /// Records `(us, measured)` pairs into shard `who % SHARDS` under one lock.
    pub fn record_many(&self, who: usize, values: impl Iterator<Item = (u64, bool)>) {
        let mut g = lock(&self.shards[who % SHARDS]);
        for (us, measured) in values {
            let v = us.clamp(1, HIST_MAX_US);
            if measured {
                g.measured.saturating_record(v);
            } else {
                g.unmeasured.saturating_record(v);
            }
        }
    }

    /// Takes the since-last-tick histogram, merged over shards.
    pub fn take_interval(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for s in &self.shards {
            let mut g = lock(s);
            let g = &mut *g;
            let _ = out.add(&g.measured);
            let _ = out.add(&g.unmeasured);
            let _ = g.total.add(&g.measured);
            g.measured.reset();
            g.unmeasured.reset();
        }
        out
    }

    /// Every measured value so far.
    pub fn total(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for s in &self.shards {
            let g = lock(s);
            let _ = out.add(&g.total);
            let _ = out.add(&g.measured);
        }
        out
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counters. `*_all` count the whole run (for the timeline); the others
/// only the measured window.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub sent_all: AtomicU64,
    pub delivered_all: AtomicU64,
    pub acked_all: AtomicU64,
    pub lost: AtomicU64,
    pub duplicated: AtomicU64,
    pub recovered: AtomicU64,
    pub established: AtomicU64,
    pub failed: AtomicU64,
    pub open: AtomicU64,
    pub reconnects: AtomicU64,
    pub typing_sent: AtomicU64,
    pub typing_received: AtomicU64,
    pub joins: AtomicU64,
    pub leaves: AtomicU64,
    pub history_pages: AtomicU64,
    pub history_messages: AtomicU64,
    pub unacked_at_close: AtomicU64,
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One second of the timeline.
#[derive(Debug, Clone)]
pub struct Interval {
    pub sent: u64,
    pub delivered: u64,
    pub acked: u64,
    pub open: u64,
    pub latency: Histogram<u64>,
}

/// Everything a process measures while running.
pub struct Metrics {
    start: AtomicU64,
    measure_from: AtomicU64,
    stop: AtomicU64,
    pub c: Counters,
    /// Publish to delivery.
    pub delivery: Recorder,
    /// Publish to delivery at deliberately slow readers (chat), apart.
    pub delivery_slow: Recorder,
    /// Send to ack (raw mode: to the publisher's own echo).
    pub ack: Recorder,
    /// TCP + TLS + upgrade + welcome + join.
    pub handshake: Recorder,
    /// History request to reply.
    pub history: Recorder,
    /// A connection lost by the server's doing (a close asking for a
    /// reconnect, or a dead socket) to its rooms re-joined: reconnect and
    /// resume.
    pub resume: Recorder,
    /// Connections established per URL, when there are several.
    per_url: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    closes: Mutex<BTreeMap<String, u64>>,
    /// Per room, the highest seq its publisher got acked (raw: sent), for
    /// readers that never saw the end marker.
    published: Mutex<BTreeMap<String, u64>>,
    timeline: Mutex<BTreeMap<i64, Interval>>,
    /// Counters at the last tick, and its second.
    last_tick: Mutex<(u64, u64, u64, Option<i64>)>,
    /// What a `soak` sampled and concluded.
    pub soak: Mutex<Option<crate::summary::SoakSummary>>,
}

impl Metrics {
    /// Metrics whose clock is not set yet: nothing counts as measured.
    pub fn new() -> Metrics {
        Metrics {
            start: AtomicU64::new(u64::MAX),
            measure_from: AtomicU64::new(u64::MAX),
            stop: AtomicU64::new(u64::MAX),
            c: Counters::default(),
            delivery: Recorder::new(),
            delivery_slow: Recorder::new(),
            ack: Recorder::new(),
            handshake: Recorder::new(),
            history: Recorder::new(),
            resume: Recorder::new(),
            per_url: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            closes: Mutex::new(BTreeMap::new()),
            published: Mutex::new(BTreeMap::new()),
            timeline: Mutex::new(BTreeMap::new()),
            last_tick: Mutex::new((0, 0, 0, None)),
            soak: Mutex::new(None),
        }
    }

    pub fn set_clock(&self, c: Clock) {
        self.stop.store(c.stop, Ordering::Relaxed);
        self.measure_from.store(c.measure_from, Ordering::Relaxed);
        self.start.store(c.start, Ordering::Release);
    }

    /// Ends the measured window now (a storm that finished early).
    pub fn stop_now(&self) {
        self.stop.store(now_us(), Ordering::Relaxed);
    }

    /// The clock, once the load has started.
    pub fn clock(&self) -> Option<Clock> {
        let start = self.start.load(Ordering::Acquire);
        (start != u64::MAX).then(|| Clock {
            start,
            measure_from: self.measure_from.load(Ordering::Relaxed),
            stop: self.stop.load(Ordering::Relaxed),
        })
    }

    /// Whether Unix time `t` (µs) is inside the measured window.
    pub fn measured(&self, t: u64) -> bool {
        t >= self.measure_from.load(Ordering::Relaxed) && t < self.stop.load(Ordering::Relaxed)
    }

    pub fn error(&self, what: &str) {
        *lock(&self.errors).entry(what.to_owned()).or_default() += 1;
    }

    pub fn close_code(&self, code: u16) {
        *lock(&self.closes).entry(code.to_string()).or_default() += 1;
    }

    pub fn published(&self, room: &str, seq: u64) {
        let mut p = lock(&self.published);
        let e = p.entry(room.to_owned()).or_default();
        *e = (*e).max(seq);
    }

    /// The highest seq published to `room` in this process, if any.
    pub fn published_seq(&self, room: &str) -> Option<u64> {
        lock(&self.published).get(room).copied()
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        lock(&self.errors).clone()
    }

    pub fn closes(&self) -> BTreeMap<String, u64> {
        lock(&self.closes).clone()
    }

    pub fn sent(&self, n: u64) {
        self.sent_at(n, now_us());
    }

    /// Sends stamped with Unix time `t` (µs): counted in the window by the
    /// same stamp their deliveries are.
    pub fn sent_at(&self, n: u64, t: u64) {
        add(&self.c.sent_all, n);
        if self.measured(t) {
            add(&self.c.sent, n);
        }
    }

    /// The ack of a send stamped `sent_at` (Unix µs), `took` after it.
    pub fn acked(&self, who: usize, took: Duration, sent_at: u64) {
        add(&self.c.acked_all, 1);
        let measured = self.measured(sent_at);
        if measured {
            add(&self.c.acked, 1);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.ack.record(who, us, measured);
    }

    /// A reply without a latency of its own (history pages), by request time.
    pub fn acked_count(&self, sent_at: u64) {
        add(&self.c.acked_all, 1);
        if self.measured(sent_at) {
            add(&self.c.acked, 1);
        }
    }

    /// A message delivered with the publisher's stamp `stamp` (Unix µs).
    pub fn delivered(&self, who: usize, stamp: Option<u64>) {
        self.delivered_to(&self.delivery, who, stamp);
    }

    /// Messages read together at Unix time `now` (µs): `stamps` are their
    /// publishers' stamps, `unstamped` those without one. Counts as
    /// [`Metrics::delivered`] does for each, with one lock and two atomic
    /// adds for the whole batch.
    pub fn delivered_batch(&self, who: usize, stamps: &[u64], unstamped: u64, now: u64) {
        add(&self.c.delivered_all, stamps.len() as u64 + unstamped);
        if stamps.is_empty() {
            return;
        }
        let from = self.measure_from.load(Ordering::Relaxed);
        let stop = self.stop.load(Ordering::Relaxed);
        let mut measured = 0;
        self.delivery.record_many(
            who,
            stamps.iter().map(|&t| {
                let m = t >= from && t < stop;
                measured += u64::from(m);
                (now.saturating_sub(t), m)
            }),
        );
        add(&self.c.delivered, measured);
    }

    /// The same, at a deliberately slow reader: its latency is kept apart.
    pub fn delivered_slow(&self, who: usize, stamp: Option<u64>) {
        self.delivered_to(&self.delivery_slow, who, stamp);
    }

    fn delivered_to(&self, r: &Recorder, who: usize, stamp: Option<u64>) {
        add(&self.c.delivered_all, 1);
        if let Some(t) = stamp {
            let measured = self.measured(t);
            if measured {
                add(&self.c.delivered, 1);
            }
            r.record(who, now_us().saturating_sub(t), measured);
        }
    }

    pub fn connected(&self, who: usize, took: Duration) {
        add(&self.c.established, 1);
        add(&self.c.open, 1);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.handshake.record(who, us, true);
    }

    /// A connection established to `url` (one of several).
    pub fn connected_to(&self, url: &str) {
        *lock(&self.per_url).entry(url.to_owned()).or_default() += 1;
    }

    pub fn per_url(&self) -> BTreeMap<String, u64> {
        lock(&self.per_url).clone()
    }

    /// A lost connection resumed, `took` after the loss.
    pub fn resumed(&self, who: usize, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.resume.record(who, us, true);
    }

    pub fn disconnected(&self) {
        self.c.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connect_failed(&self, e: &anyhow::Error) {
        add(&self.c.failed, 1);
        self.error(&format!("connect: {}", short_error(e)));
    }

    /// Closes the current second of the timeline; `second` counts from
    /// `measure_from` (negative during the warm-up). A tick that comes late
    /// (a starved runtime) spreads its counts evenly over the seconds it
    /// covers, each with the interval's latency, so rates stay per second.
    /// Returns the per-second counts and the interval's latency.
    pub fn tick(&self, second: i64) -> (u64, u64, u64, u64, Histogram<u64>) {
        let (s, d, a) = (
            get(&self.c.sent_all),
            get(&self.c.delivered_all),
            get(&self.c.acked_all),
        );
        let open = get(&self.c.open);
        let (ps, pd, pa, prev_second) = {
            let mut last = lock(&self.last_tick);
            let prev = *last;
            *last = (s, d, a, Some(second));
            prev
        };
        let first = prev_second.map_or(second, |p| (p + 1).min(second));
        let n = (second - first + 1).max(1) as u64;
        let latency = self.delivery.take_interval();
        let (ds, dd, da) = ((s - ps) / n, (d - pd) / n, (a - pa) / n);
        let mut timeline = lock(&self.timeline);
        for k in first..=second {
            timeline.insert(
                k,
                Interval {
                    sent: ds,
                    delivered: dd,
                    acked: da,
                    open,
                    latency: latency.clone(),
                },
            );
        }
        (ds, dd, da, open, latency)
    }

    pub fn timeline(&self) -> BTreeMap<i64, Interval> {
        lock(&self.timeline).clone()
    }
}

/// The first line of an error, short enough to be a map key.
pub fn short_error(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    if let Some(i) = s.find(['\n', '(']) {
        s.truncate(i);
    }
    s.truncate(80);
    s.trim().to_owned()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_counts_and_times_each_delivery_by_its_stamp() {
        let m = Metrics::new();
        // Measured from 1_000 to 2_000 µs.
        m.set_clock(Clock::new(0, 1_000, 1_000));
        m.delivered_batch(3, &[900, 1_000, 1_500, 1_999, 2_000], 2, 2_500);
        assert_eq!(get(&m.c.delivered_all), 7);
        assert_eq!(get(&m.c.delivered), 3);
        let total = m.delivery.total();
        assert_eq!(total.len(), 3);
        assert_eq!((total.min(), total.max()), (501, 1_500));
        // Every stamped delivery is in the interval histogram.
        assert_eq!(m.delivery.take_interval().len(), 5);
        // A tick empties the interval, not the total.
        assert_eq!(m.delivery.take_interval().len(), 0);
        m.delivered_batch(4, &[1_200], 0, 2_500);
        assert_eq!(m.delivery.total().len(), 4);
        assert_eq!(m.delivery.take_interval().len(), 1);
        assert_eq!(m.delivery.total().len(), 4);
    }
}
