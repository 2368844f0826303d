//! Process-wide counters, updated with relaxed atomics on the hot path.
//!
//! This module owns the numbers only; exporting them (Prometheus, the admin
//! API) is somebody else's job. No counter takes a lock.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::session::CloseReason;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every server metric.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_open: Gauge,
    pub connections_refused: Counter,
    pub handshake_failures: Counter,
    /// Sessions closed, indexed by `CloseReason as usize - 1`.
    pub sessions_closed: [Counter; CloseReason::ALL.len()],
    pub messages_received: Counter,
    pub messages_delivered: Counter,
    pub ephemeral_shed: Counter,
    pub slow_consumers: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub error_frames: Counter,
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
}
