//! `switchboard-loadtest` as a library: every scenario runs from its args
//! struct and returns a [`Report`]; the binary is a thin wrapper, and the
//! integration tests call [`run`] against a real server.
//!
//! Every run is bounded: in connections (the args), in time (warm-up,
//! duration, and a drain deadline after it) and in steps (each wait has
//! [`conn::STEP_TIMEOUT`]).

pub mod cli;
pub mod conn;
pub mod metrics;
pub mod nats;
pub mod plot;
pub mod procfs;
pub mod reconnect;
pub mod report;
pub mod scan;
pub mod scenario;
pub mod summary;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

pub use cli::{
    ChatArgs, Cli, Common, ConnectArgs, FanoutArgs, HistoryArgs, IdleArgs, Scenario, SoakArgs,
};
pub use report::Report;

use conn::{instant_at, now_us};
use metrics::{Clock, Metrics};
use procfs::{cpu_seconds, rss_bytes};
use report::{Collected, ServerUsage};

/// Runs one scenario (in worker processes when `--workers` > 1) and returns
/// its report. Writes the SVG plot when `--plot` is given.
pub async fn run(scenario: &Scenario) -> anyhow::Result<Report> {
    let common = scenario.common();
    if matches!(scenario, Scenario::Soak(_)) && common.workers > 1 {
        anyhow::bail!("soak runs in one process: no --workers");
    }
    let report = if common.workers > 1 && common.worker.is_none() {
        workers::run_parent(scenario).await?
    } else {
        let probe = Probe::new(common.server_pid);
        let bar = progress_bar(common);
        let metrics = Arc::new(Metrics::new());
        let (me, me_task) = own_cpu(&metrics);
        let ticker = spawn_ticker(metrics.clone(), bar.clone(), None);
        let probe_task = {
            let (m1, m2) = (metrics.clone(), metrics.clone());
            probe.watch(move || m1.clock(), move || metrics::get(&m2.c.open))
        };
        let result = scenario::run(scenario, metrics.clone()).await;
        ticker.abort();
        bar.finish_and_clear();
        result?;
        let finished = now_us();
        let own = me.finish(me_task, 0).map_or(0.0, |u| u.cpu_seconds);
        let collected = Collected::from_metrics(&metrics, own);
        let clock = metrics.clock().unwrap_or(Clock::new(finished, 0, 0));
        let server = probe.finish(probe_task, metrics::get(&metrics.c.open));
        Report::build(
            scenario.name(),
            scenario.clients(),
            common,
            &collected,
            measured_seconds(scenario, clock, finished),
            server,
        )
    };
    if let Some(path) = &common.json_out {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &common.plot {
        plot::draw(&report, path)?;
    }
    Ok(report)
}

/// The length of the measured window: the storm's real length for
/// `connect`, which ends when its connections are made.
pub(crate) fn measured_seconds(s: &Scenario, clock: Clock, finished_us: u64) -> f64 {
    let end = clock.stop.min(finished_us.max(clock.measure_from));
    match s {
        Scenario::Connect(_) => (end.saturating_sub(clock.start)) as f64 / 1e6,
        _ => (end.saturating_sub(clock.measure_from)) as f64 / 1e6,
    }
}

/// Runs the scenario in this process and returns what it measured, for a
/// worker to send to its parent.
pub async fn collect(scenario: &Scenario, progress: bool) -> anyhow::Result<Collected> {
    let metrics = Arc::new(Metrics::new());
    let (me, me_task) = own_cpu(&metrics);
    let ticker = spawn_ticker(
        metrics.clone(),
        ProgressBar::hidden(),
        progress.then_some(()),
    );
    let result = scenario::run(scenario, metrics.clone()).await;
    ticker.abort();
    result?;
    let own = me.finish(me_task, 0).map_or(0.0, |u| u.cpu_seconds);
    Ok(Collected::from_metrics(&metrics, own))
}

/// This process's CPU over the measured window.
fn own_cpu(metrics: &Arc<Metrics>) -> (Probe, Option<ProbeTask>) {
    let me = Probe::new(Some(std::process::id()));
    let m = metrics.clone();
    let task = me.watch(move || m.clock(), || 0);
    (me, task)
}

pub(crate) fn progress_bar(common: &Common) -> ProgressBar {
    if common.quiet || common.json || common.worker.is_some() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
        bar.set_style(style);
    }
    bar
}

/// Closes one timeline second per second of the run, aligned to the
/// measured window, and shows the current rates. A worker (`lines`) also
/// prints them for its parent.
fn spawn_ticker(metrics: Arc<Metrics>, bar: ProgressBar, lines: Option<()>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Some(clock) = metrics.clock() else {
                bar.set_message(format!(
                    "connecting: {} open, {} failed",
                    metrics::get(&metrics.c.open),
                    metrics::get(&metrics.c.failed)
                ));
                bar.tick();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            // The next whole second after measure_from (negative during warm-up).
            let now = now_us() as i64;
            let from = clock.measure_from as i64;
            let k = (now - from).div_euclid(1_000_000) + 1;
            tokio::time::sleep_until(instant_at((from + k * 1_000_000).max(0) as u64)).await;
            let (s, d, a, open, lat) = metrics.tick(k - 1);
            let p99 = lat.value_at_quantile(0.99) as f64 / 1000.0;
            let phase = if k <= 0 {
                "warm-up"
            } else if now_us() > clock.stop {
                "draining"
            } else {
                "measuring"
            };
            bar.set_message(format!(
                "{phase} {open} conns | sent {s}/s delivered {d}/s acked {a}/s | p99 {p99:.2} ms | lost {}",
                metrics::get(&metrics.c.lost)
            ));
            bar.tick();
            if lines.is_some() {
                println!("P {s} {d} {a} {open}");
            }
        }
    })
}

/// Reads the server's CPU and memory from /proc: RSS before any client,
/// CPU at the start and end of the measured window (or when the scenario
/// ends, if earlier), RSS just before the end.
pub(crate) struct Probe {
    pid: Option<u32>,
    rss_before: Option<u64>,
}

/// What the probe has read so far.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProbeState {
    cpu0: Option<f64>,
    cpu1: Option<f64>,
    rss: Option<u64>,
    open: u64,
}

pub(crate) type ProbeTask = (JoinHandle<()>, Arc<std::sync::Mutex<ProbeState>>);

impl Probe {
    pub(crate) fn new(pid: Option<u32>) -> Probe {
        Probe {
            pid,
            rss_before: pid.and_then(rss_bytes),
        }
    }

    /// Starts sampling at the marks of `clock` (once `clock` returns one).
    pub(crate) fn watch(
        &self,
        clock: impl Fn() -> Option<Clock> + Send + 'static,
        open: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Option<ProbeTask> {
        let pid = self.pid?;
        let state = Arc::new(std::sync::Mutex::new(ProbeState::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            let clock = loop {
                if let Some(c) = clock() {
                    break c;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            tokio::time::sleep_until(instant_at(clock.measure_from)).await;
            metrics::lock(&st).cpu0 = cpu_seconds(pid);
            let before_stop = clock.stop.saturating_sub(500_000).max(clock.measure_from);
            tokio::time::sleep_until(instant_at(before_stop)).await;
            {
                let mut s = metrics::lock(&st);
                s.rss = rss_bytes(pid);
                s.open = open();
            }
            tokio::time::sleep_until(instant_at(clock.stop)).await;
            metrics::lock(&st).cpu1 = cpu_seconds(pid);
        });
        Some((task, state))
    }

    /// Stops sampling; what was not read yet is read now.
    pub(crate) fn finish(&self, task: Option<ProbeTask>, open_now: u64) -> Option<ServerUsage> {
        let pid = self.pid?;
        let (task, state) = task?;
        task.abort();
        let s = *metrics::lock(&state);
        let cpu1 = s.cpu1.or_else(|| cpu_seconds(pid));
        let (rss, open) = match s.rss {
            Some(r) => (Some(r), s.open),
            None => (rss_bytes(pid), open_now),
        };
        Some(ServerUsage {
            pid,
            cpu_seconds: match (s.cpu0, cpu1) {
                (Some(a), Some(b)) => b - a,
                _ => 0.0,
            },
            deliveries_per_cpu_second: None,
            rss_before_bytes: self.rss_before,
            rss_after_bytes: rss,
            bytes_per_connection: match (self.rss_before, rss) {
                (Some(a), Some(b)) if open > 0 => Some(b.saturating_sub(a) as f64 / open as f64),
                _ => None,
            },
        })
    }
}
