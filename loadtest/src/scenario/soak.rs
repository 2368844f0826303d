//! `soak`: connection churn with sends for a long time, watching whether the
//! server's memory and descriptors level off. Each of N churners loops:
//! connect, join k rooms, send a few keyed messages and wait for their acks,
//! leave, close. Meanwhile a sampler reads the server's
//! `process_resident_memory_bytes`, `process_open_fds` and
//! `process_cpu_seconds_total` from its admin `/metrics` (so a remote server
//! can be soaked), or from `/proc/PID` with `--server-pid` and no URL.
//!
//! The judgement compares the first and last windows of the measured
//! samples (the drift), and the middle with the end (whether it levels
//! off); a drift past `--max-rss-drift-mib` or `--max-fd-drift` fails the
//! run. It owns no load of its own beyond the churn, and it never
//! judges from fewer than two samples.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use protocol::{Body, ClientRequest};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use super::{count_close, open, start_clock};
use crate::cli::SoakArgs;
use crate::conn::{Connector, Frame, STEP_TIMEOUT, Ws, instant_at, now_us, request, send_join};
use crate::metrics::{Clock, Metrics, add, lock};
use crate::report::{cpu_seconds, rss_bytes};

/// Largest `/metrics` answer read (a scrape is a few KiB).
const MAX_SCRAPE_BYTES: u64 = 4 << 20;
/// Pause after a failed cycle before the next, so that a refusing server
/// is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Share of the samples in each of the first, middle and last windows.
const WINDOW_SHARE: usize = 10;
/// Growth over the second half still called level: this share of the
/// whole drift.
const PLATEAU_SHARE: f64 = 0.2;
/// ... or this share of the first window's value (noise).
const NOISE_SHARE: f64 = 0.01;

/// One reading of the server's process figures.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SoakSample {
    /// Seconds from the end of the warm-up (negative during it).
    pub t: f64,
    pub rss_bytes: u64,
    pub open_fds: u64,
    pub cpu_seconds: Option<f64>,
    /// Messages acked to the churners so far (whole run).
    pub stored: u64,
}

/// How one series moved over the measured samples.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Drift {
    /// Mean of the first window.
    pub first: f64,
    /// Mean of the window around the middle sample.
    pub middle: f64,
    /// Mean of the last window.
    pub last: f64,
    /// `last - first`.
    pub drift: f64,
    /// `last - middle`: what the second half added.
    pub second_half: f64,
    /// The second half added at most a fifth of the drift (or noise).
    pub plateaued: bool,
}

impl Drift {
    /// The drift of `values` (in time order); `None` with fewer than two.
    pub fn of(values: &[f64]) -> Option<Drift> {
        let n = values.len();
        if n < 2 {
            return None;
        }
        let w = (n / WINDOW_SHARE).max(1);
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
        let first = mean(&values[..w]);
        let last = mean(&values[n - w..]);
        let mid_start = (n / 2).saturating_sub(w / 2).min(n - w);
        let middle = mean(&values[mid_start..mid_start + w]);
        let drift = last - first;
        let second_half = last - middle;
        let tolerance = (PLATEAU_SHARE * drift.max(0.0)).max(NOISE_SHARE * first.abs());
        Some(Drift {
            first,
            middle,
            last,
            drift,
            second_half,
            plateaued: second_half <= tolerance,
        })
    }
}

/// What a soak measured and concluded.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct SoakSummary {
    /// Where the samples came from (`/metrics` URL or `/proc/PID`).
    pub source: String,
    pub samples: Vec<SoakSample>,
    /// Over the measured samples; `None` with fewer than two.
    pub rss: Option<Drift>,
    pub fds: Option<Drift>,
    /// Server CPU seconds between the first and last measured sample.
    pub server_cpu_seconds: Option<f64>,
    pub cycles: u64,
    pub failed_cycles: u64,
    pub max_rss_drift_bytes: f64,
    pub max_fd_drift: f64,
    pub failures: Vec<String>,
}

impl SoakSummary {
    /// Computes the drifts from the samples taken at or after the warm-up,
    /// and the failures against the two thresholds.
    pub fn judge(&mut self) {
        let measured: Vec<&SoakSample> = self.samples.iter().filter(|s| s.t >= 0.0).collect();
        let rss: Vec<f64> = measured.iter().map(|s| s.rss_bytes as f64).collect();
        let fds: Vec<f64> = measured.iter().map(|s| s.open_fds as f64).collect();
        self.rss = Drift::of(&rss);
        self.fds = Drift::of(&fds);
        self.server_cpu_seconds = match (measured.first(), measured.last()) {
            (Some(a), Some(b)) => b.cpu_seconds.zip(a.cpu_seconds).map(|(b, a)| b - a),
            _ => None,
        };
        self.failures.clear();
        match (self.rss, self.fds) {
            (Some(rss), Some(fds)) => {
                if rss.drift > self.max_rss_drift_bytes {
                    self.failures.push(format!(
                        "server RSS drifted by {:+.1} MiB ({:.1} -> {:.1} MiB), past the limit of {:.1} MiB",
                        rss.drift / MIB,
                        rss.first / MIB,
                        rss.last / MIB,
                        self.max_rss_drift_bytes / MIB
                    ));
                }
                if fds.drift > self.max_fd_drift {
                    self.failures.push(format!(
                        "server descriptors drifted by {:+.1} ({:.1} -> {:.1}), past the limit of {}",
                        fds.drift, fds.first, fds.last, self.max_fd_drift
                    ));
                }
            }
            _ => self.failures.push(format!(
                "fewer than two samples of the server's memory in the measured window (from {})",
                self.source
            )),
        }
    }
}

pub const MIB: f64 = 1024.0 * 1024.0;

pub async fn run(a: &SoakArgs, m: Arc<Metrics>) -> anyhow::Result<()> {
    if a.common.foreign() {
        bail!("soak speaks the Switchboard protocol: no --raw");
    }
    let conn = Arc::new(Connector::new(&a.common)?);
    let source = Source::new(a)?;
    // The first reading is taken before any load: a server that cannot be
    // read fails the run at once, not after its whole length.
    tokio::time::timeout(STEP_TIMEOUT, source.read())
        .await
        .context("reading the server's process figures: timed out")?
        .context("reading the server's process figures")?;
    let clock = start_clock(&a.common, &m, true).await;
    let mut tasks = tokio::task::JoinSet::new();
    let rooms: Vec<String> = (0..a.rooms.max(1)).map(|r| format!("soak{r}")).collect();
    let rooms = Arc::new(rooms);
    let cycles = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for i in (0..a.clients).filter(|i| a.common.owns(*i)) {
        let churner = Churner {
            who: i as usize,
            user: format!("soak{i}"),
            conn: conn.clone(),
            m: m.clone(),
            rooms: rooms.clone(),
            per_session: a.rooms_per_session.clamp(1, a.rooms.max(1)) as usize,
            messages: a.messages,
            pause: Duration::from_millis(a.pause_ms),
            rng: SmallRng::seed_from_u64(a.common.seed.wrapping_mul(1_000_003) ^ u64::from(i)),
            cycles: cycles.clone(),
            failed: failed.clone(),
        };
        // Connections start spread over a second (at most --ramp-up per
        // second), not all at once.
        let delay = Duration::from_secs_f64(f64::from(i) / f64::from(a.common.ramp_up.max(1)));
        tasks.spawn(churner.run(clock, delay));
    }
    let interval = Duration::from_secs_f64(a.sample_interval.max(0.01));
    let sampler = sample(&source, &m, clock, interval);
    let (samples, ()) = tokio::join!(sampler, async {
        while tasks.join_next().await.is_some() {}
    });
    let mut summary = SoakSummary {
        source: source.describe(),
        samples,
        cycles: cycles.load(std::sync::atomic::Ordering::Relaxed),
        failed_cycles: failed.load(std::sync::atomic::Ordering::Relaxed),
        max_rss_drift_bytes: a.max_rss_drift_mib * MIB,
        max_fd_drift: a.max_fd_drift as f64,
        ..SoakSummary::default()
    };
    summary.judge();
    *lock(&m.soak) = Some(summary);
    Ok(())
}

/// Samples every `interval` from the start of the load to its stop, and
/// once more at the stop; a reading that fails is counted as an error and
/// skipped.
async fn sample(source: &Source, m: &Metrics, clock: Clock, interval: Duration) -> Vec<SoakSample> {
    let mut out = Vec::new();
    let stop = instant_at(clock.stop);
    let mut next = tokio::time::Instant::now();
    loop {
        let at = now_us();
        match tokio::time::timeout(STEP_TIMEOUT, source.read()).await {
            Ok(Ok(p)) => out.push(SoakSample {
                t: (at as f64 - clock.measure_from as f64) / 1e6,
                rss_bytes: p.rss_bytes,
                open_fds: p.open_fds,
                cpu_seconds: p.cpu_seconds,
                stored: crate::metrics::get(&m.c.acked_all),
            }),
            Ok(Err(e)) => m.error(&format!("soak sample: {}", crate::metrics::short_error(&e))),
            Err(_) => m.error("soak sample: timed out"),
        }
        if tokio::time::Instant::now() >= stop {
            break;
        }
        next += interval;
        tokio::time::sleep_until(next.min(stop)).await;
    }
    out
}

/// One churning client.
struct Churner {
    who: usize,
    user: String,
    conn: Arc<Connector>,
    m: Arc<Metrics>,
    rooms: Arc<Vec<String>>,
    per_session: usize,
    messages: u32,
    pause: Duration,
    rng: SmallRng,
    cycles: Arc<std::sync::atomic::AtomicU64>,
    failed: Arc<std::sync::atomic::AtomicU64>,
}

impl Churner {
    async fn run(mut self, clock: Clock, delay: Duration) {
        let stop = instant_at(clock.stop);
        tokio::time::sleep(delay).await;
        let mut cycle = 0u64;
        while tokio::time::Instant::now() < stop {
            let rooms = self.pick_rooms();
            let r = tokio::time::timeout(STEP_TIMEOUT, self.cycle(cycle, &rooms)).await;
            let ok = match r {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    self.m
                        .error(&format!("soak: {}", crate::metrics::short_error(&e)));
                    false
                }
                Err(_) => {
                    self.m.error("soak: a cycle timed out");
                    false
                }
            };
            let counter = if ok { &self.cycles } else { &self.failed };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            cycle += 1;
            let pause = if ok { self.pause } else { RETRY_PAUSE };
            if !pause.is_zero() {
                tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(stop)).await;
            }
        }
    }

    /// `per_session` distinct rooms of the pool.
    fn pick_rooms(&mut self) -> Vec<usize> {
        let n = self.rooms.len();
        let mut out: Vec<usize> = Vec::with_capacity(self.per_session);
        while out.len() < self.per_session.min(n) {
            let r = self.rng.random_range(0..n);
            if !out.contains(&r) {
                out.push(r);
            }
        }
        out
    }

    /// Connect, join, send and wait for the acks, leave, close.
    async fn cycle(&self, cycle: u64, rooms: &[usize]) -> anyhow::Result<()> {
        let m = &self.m;
        let (mut ws, _) = open(&self.conn, m, self.who, &self.user, None).await?;
        let r = self.session(&mut ws, cycle, rooms).await;
        let _ = ws.close(None).await;
        m.disconnected();
        r
    }

    async fn session(&self, ws: &mut Ws, cycle: u64, rooms: &[usize]) -> anyhow::Result<()> {
        let m = &self.m;
        let name = |r: usize| self.rooms[r].as_str();
        // Requests are pipelined; replies are matched by id.
        let mut id = 0u64;
        for &r in rooms {
            id += 1;
            send_join(ws, id, name(r), None, None).await?;
        }
        self.replies(ws, 1..=id, "joined", None).await?;
        add(&m.c.joins, rooms.len() as u64);
        let first_send = id + 1;
        let t = now_us();
        let started = Instant::now();
        for j in 0..self.messages {
            id += 1;
            let room = name(rooms[j as usize % rooms.len()]);
            ws.send(request(
                Some(id),
                ClientRequest::Send {
                    room: room.to_owned(),
                    body: Body::from_json(&format!(r#"{{"t":{t}}}"#))?,
                    key: Some(format!("{}-{cycle}-{j}", self.user)),
                },
            ))
            .await?;
        }
        m.sent_at(u64::from(self.messages), t);
        self.replies(ws, first_send..=id, "ack", Some((started, t)))
            .await?;
        let first_leave = id + 1;
        for &r in rooms {
            id += 1;
            ws.send(request(
                Some(id),
                ClientRequest::Leave {
                    room: name(r).to_owned(),
                },
            ))
            .await?;
        }
        self.replies(ws, first_leave..=id, "left", None).await?;
        add(&m.c.leaves, rooms.len() as u64);
        Ok(())
    }

    /// Reads until every id in `ids` has its reply of `kind`, counting the
    /// messages of other members delivered meanwhile; with `sent` (when
    /// and with which stamp the requests went out), each reply is timed as
    /// an ack. An `error` reply fails the cycle.
    async fn replies(
        &self,
        ws: &mut Ws,
        ids: std::ops::RangeInclusive<u64>,
        kind: &str,
        sent: Option<(Instant, u64)>,
    ) -> anyhow::Result<()> {
        let m = &self.m;
        let mut waiting: Vec<u64> = ids.collect();
        while !waiting.is_empty() {
            let msg = ws.next().await.context("closed by the server")??;
            let Message::Text(text) = &msg else {
                count_close(m, &msg);
                if let Message::Close(c) = &msg {
                    bail!(
                        "closed by the server ({})",
                        c.as_ref().map_or(0, |c| u16::from(c.code))
                    );
                }
                continue;
            };
            let f = Frame::parse(text.as_str());
            match f.kind {
                "message" => m.delivered(self.who, f.stamp),
                "error" => {
                    let code = f.code.unwrap_or("unknown");
                    m.error(code);
                    bail!("{kind} refused: {code}");
                }
                k if k == kind => {
                    if let Some(id) = f.id
                        && let Some(pos) = waiting.iter().position(|w| *w == id)
                    {
                        waiting.swap_remove(pos);
                        if let Some((at, t)) = sent {
                            m.acked(self.who, at.elapsed(), t);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Where the server's process figures are read.
enum Source {
    /// `GET` of the admin `/metrics` over plain HTTP/1.0.
    Metrics {
        url: String,
        addr: String,
        path: String,
        token: Option<String>,
    },
    Proc(u32),
}

/// One reading.
struct ProcessFigures {
    rss_bytes: u64,
    open_fds: u64,
    cpu_seconds: Option<f64>,
}

impl Source {
    fn new(a: &SoakArgs) -> anyhow::Result<Source> {
        if let Some(url) = &a.metrics_url {
            let rest = url
                .strip_prefix("http://")
                .context("--metrics-url must be http://HOST:PORT/metrics")?;
            let (addr, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/metrics"),
            };
            return Ok(Source::Metrics {
                url: url.clone(),
                addr: addr.to_owned(),
                path: path.to_owned(),
                token: a.admin_token.clone(),
            });
        }
        match a.common.server_pid {
            Some(pid) => Ok(Source::Proc(pid)),
            None => bail!("soak needs --metrics-url (the admin /metrics) or --server-pid"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Metrics { url, .. } => url.clone(),
            Source::Proc(pid) => format!("/proc/{pid}"),
        }
    }

    async fn read(&self) -> anyhow::Result<ProcessFigures> {
        match self {
            Source::Metrics {
                addr, path, token, ..
            } => {
                let text = http_get(addr, path, token.as_deref()).await?;
                let rss = series(&text, "process_resident_memory_bytes")
                    .context("no process_resident_memory_bytes in /metrics")?;
                let fds =
                    series(&text, "process_open_fds").context("no process_open_fds in /metrics")?;
                Ok(ProcessFigures {
                    rss_bytes: rss as u64,
                    open_fds: fds as u64,
                    cpu_seconds: series(&text, "process_cpu_seconds_total"),
                })
            }
            Source::Proc(pid) => {
                let pid = *pid;
                tokio::task::spawn_blocking(move || {
                    let rss = rss_bytes(pid).context("the server process is gone")?;
                    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                        .context("reading the server's descriptors")?
                        .count() as u64;
                    anyhow::Ok(ProcessFigures {
                        rss_bytes: rss,
                        open_fds: fds,
                        cpu_seconds: cpu_seconds(pid),
                    })
                })
                .await?
            }
        }
    }
}

/// The body of `GET path` from `addr`, over HTTP/1.0 so that the answer
/// is neither chunked nor kept alive.
async fn http_get(addr: &str, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.take(MAX_SCRAPE_BYTES).read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no HTTP header end in the answer")?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET {path}: {status}");
    }
    Ok(body.to_owned())
}

/// The value of an unlabelled series in a Prometheus text scrape.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(rss_mib: &[f64], fds: &[u64], max_mib: f64, max_fds: f64) -> SoakSummary {
        let mut s = SoakSummary {
            source: "test".into(),
            samples: rss_mib
                .iter()
                .zip(fds)
                .enumerate()
                .map(|(i, (r, f))| SoakSample {
                    t: i as f64 - 1.0,
                    rss_bytes: (r * MIB) as u64,
                    open_fds: *f,
                    cpu_seconds: Some(i as f64 * 0.5),
                    stored: i as u64 * 100,
                })
                .collect(),
            max_rss_drift_bytes: max_mib * MIB,
            max_fd_drift: max_fds,
            ..SoakSummary::default()
        };
        s.judge();
        s
    }

    #[test]
    fn linear_growth_drifts_and_does_not_level_off() {
        // The warm-up sample (t < 0) is left out.
        let rss: Vec<f64> = std::iter::once(500.0)
            .chain((0..40).map(|i| 11.0 + 1.5 * f64::from(i)))
            .collect();
        let fds = vec![20; rss.len()];
        let s = summary(&rss, &fds, 16.0, 8.0);
        let d = s.rss.expect("rss drift");
        assert!((d.first - 13.25 * MIB).abs() < 0.01 * MIB, "{d:?}");
        assert!((d.drift - 54.0 * MIB).abs() < 0.01 * MIB, "{d:?}");
        assert!(!d.plateaued, "{d:?}");
        assert_eq!(s.failures.len(), 1, "{:?}", s.failures);
        assert!(s.failures[0].contains("RSS drifted by +54.0 MiB"));
        assert_eq!(s.fds.map(|f| (f.drift, f.plateaued)), Some((0.0, true)));
        assert_eq!(s.server_cpu_seconds, Some(19.5));
    }

    #[test]
    fn growth_that_levels_off_plateaus_and_passes_a_generous_limit() {
        let rss: Vec<f64> = (0..40)
            .map(|i| 60.0 - 40.0 * (-f64::from(i) / 4.0).exp())
            .collect();
        let fds: Vec<u64> = (0..40).map(|i| 30 + i % 3).collect();
        let s = summary(&rss, &fds, 64.0, 8.0);
        let d = s.rss.expect("rss drift");
        assert!(d.drift > 20.0 * MIB && d.plateaued, "{d:?}");
        assert!(s.fds.is_some_and(|f| f.plateaued));
        assert!(s.failures.is_empty(), "{:?}", s.failures);
        // The same run against a limit of 0 bytes fails.
        let strict = summary(&rss, &fds, 0.0, 8.0);
        assert_eq!(strict.failures.len(), 1, "{:?}", strict.failures);
    }

    #[test]
    fn leaking_descriptors_fail() {
        let rss = vec![40.0; 20];
        let fds: Vec<u64> = (0..20).map(|i| 30 + 5 * i).collect();
        let s = summary(&rss, &fds, 64.0, 8.0);
        assert!(s.rss.is_some_and(|d| d.drift == 0.0 && d.plateaued));
        assert_eq!(s.failures.len(), 1, "{:?}", s.failures);
        assert!(s.failures[0].contains("descriptors drifted"));
    }

    #[test]
    fn too_few_samples_fail() {
        let s = summary(&[10.0, 10.0], &[3, 3], 64.0, 8.0);
        assert!(s.rss.is_none());
        assert!(
            s.failures[0].contains("fewer than two samples"),
            "{:?}",
            s.failures
        );
    }

    #[test]
    fn reads_unlabelled_series() {
        let text = "# TYPE process_open_fds gauge\nprocess_open_fds 17\nprocess_open_fds_other 3\nprocess_cpu_seconds_total 1.25\n# EOF\n";
        assert_eq!(series(text, "process_open_fds"), Some(17.0));
        assert_eq!(series(text, "process_cpu_seconds_total"), Some(1.25));
        assert_eq!(series(text, "process_max_fds"), None);
    }
}
