//! `soak`: connection churn with sends for a long time, watching whether the
//! server's memory and descriptors level off. Each of N churners loops:
//! connect, join k rooms, send a few keyed messages and wait for their acks,
//! leave, close. Meanwhile a sampler reads the server's
//! `process_resident_memory_bytes`, `process_open_fds` and
//! `process_cpu_seconds_total` from its admin `/metrics` (so a remote server
//! can be soaked), or from `/proc/PID` with `--server-pid` and no URL.
//!
//! The judgement ([`SoakSummary::judge`]) compares the first and last
//! windows of the measured samples (the drift), and the middle with the end
//! (whether it levels off); a drift past `--max-rss-drift-mib` or
//! `--max-fd-drift` fails the run. It owns no load of its own beyond the
//! churn, and it never judges from fewer than two samples.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use protocol::{Body, ClientRequest};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use super::{count_close, open, start_clock};
use crate::cli::SoakArgs;
use crate::conn::{Connector, Frame, STEP_TIMEOUT, Ws, instant_at, now_us, request, send_join};
use crate::metrics::{Clock, Metrics, add, lock};
use crate::procfs;
use crate::summary::{MIB, SoakSample, SoakSummary};

/// Largest `/metrics` answer read (a scrape is a few KiB).
const MAX_SCRAPE_BYTES: u64 = 4 << 20;
/// Pause after a failed cycle before the next, so that a refusing server
/// is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

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
            Source::Proc(pid) => procfs::describe(*pid),
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
                    let rss = procfs::rss_bytes(pid).context("the server process is gone")?;
                    let fds = procfs::open_fds(pid).context("reading the server's descriptors")?;
                    anyhow::Ok(ProcessFigures {
                        rss_bytes: rss,
                        open_fds: fds,
                        cpu_seconds: procfs::cpu_seconds(pid),
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

    #[test]
    fn reads_unlabelled_series() {
        let text = "# TYPE process_open_fds gauge\nprocess_open_fds 17\nprocess_open_fds_other 3\nprocess_cpu_seconds_total 1.25\n# EOF\n";
        assert_eq!(series(text, "process_open_fds"), Some(17.0));
        assert_eq!(series(text, "process_cpu_seconds_total"), Some(1.25));
        assert_eq!(series(text, "process_max_fds"), None);
    }
}
