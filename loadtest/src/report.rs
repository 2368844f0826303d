//! The run's report: counters, latency percentiles, pass/fail, and the
//! server's CPU and memory read from /proc.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Default, Clone, Serialize)]
struct Inner {
    scenario: String,
    values: BTreeMap<String, f64>,
    /// name -> (p50, p90, p99, p99.9, max), in milliseconds.
    latency_ms: BTreeMap<String, [f64; 5]>,
    errors: BTreeMap<String, u64>,
    connect_failures: u64,
    failures: Vec<String>,
}

/// What a run measured. Shared between tasks; every method takes `&self`.
#[derive(Debug)]
pub struct Report {
    inner: Mutex<Inner>,
    handshakes: Mutex<Option<Histogram<u64>>>,
    json: bool,
}

impl Report {
    pub fn new(scenario: &str, json: bool) -> Report {
        Report {
            inner: Mutex::new(Inner {
                scenario: scenario.to_owned(),
                ..Inner::default()
            }),
            handshakes: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).ok()),
            json,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    pub fn set(&self, name: &str, value: f64) {
        self.with(|i| i.values.insert(name.to_owned(), value));
    }

    pub fn error(&self, code: &str) {
        self.with(|i| *i.errors.entry(code.to_owned()).or_default() += 1);
    }

    pub fn connect_failed(&self, e: &anyhow::Error) {
        self.with(|i| {
            i.connect_failures += 1;
            *i.errors.entry(format!("connect: {e}")).or_default() += 1;
        });
    }

    pub fn record_handshake(&self, took: Duration) {
        let mut h = self
            .handshakes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(h) = h.as_mut() {
            let _ = h.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
        }
    }

    /// Records percentiles of a histogram of microseconds.
    pub fn latency(&self, name: &str, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let row = [
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0,
        ];
        self.with(|i| i.latency_ms.insert(name.to_owned(), row));
    }

    pub fn fail_if(&self, failed: bool, why: String) {
        if failed {
            self.with(|i| i.failures.push(why));
        }
    }

    pub fn passed(&self) -> bool {
        self.with(|i| i.failures.is_empty())
    }

    pub fn snapshot(&self) -> Report {
        let inner = self.with(|i| i.clone());
        Report {
            inner: Mutex::new(inner),
            handshakes: Mutex::new(None),
            json: self.json,
        }
    }

    pub fn print(&self) {
        if let Some(h) = self
            .handshakes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            self.latency("handshake+join", h);
        }
        let inner = self.with(|i| i.clone());
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&inner).unwrap_or_default()
            );
            return;
        }
        println!("scenario: {}", inner.scenario);
        for (k, v) in &inner.values {
            println!("  {k:<36} {v:>16.1}");
        }
        if !inner.latency_ms.is_empty() {
            println!(
                "  {:<16} {:>9} {:>9} {:>9} {:>9} {:>9}  (ms)",
                "latency", "p50", "p90", "p99", "p99.9", "max"
            );
            for (k, [a, b, c, d, e]) in &inner.latency_ms {
                println!("  {k:<16} {a:>9.3} {b:>9.3} {c:>9.3} {d:>9.3} {e:>9.3}");
            }
        }
        println!("  connect failures: {}", inner.connect_failures);
        for (code, n) in &inner.errors {
            println!("  error {code}: {n}");
        }
        if inner.failures.is_empty() {
            println!("result: PASS");
        } else {
            for f in &inner.failures {
                println!("FAIL: {f}");
            }
        }
    }
}

/// The process's resident memory in bytes, from /proc/PID/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The process's CPU time (user + system) in seconds, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Clock ticks; 100 per second on Linux.
    const TICKS: f64 = 100.0;
    Some((utime + stime) / TICKS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_rss_and_cpu() {
        let me = std::process::id();
        assert!(rss_bytes(me).is_some_and(|b| b > 0));
        assert!(cpu_seconds(me).is_some());
    }
}
