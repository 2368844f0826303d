//! `switchboard-loadtest`: the Switchboard load generator.
//!
//! It speaks the protocol through the `protocol` crate over TLS or plain
//! WebSocket, drives one scenario, and reports what it measured. Every run
//! is bounded in connections and time. It must stay cheap per delivery:
//! small read buffers, and deliveries are parsed into a borrowed view, never
//! into an owned tree.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use protocol::{Body, ClientRequest, Request};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

mod report;

use report::{Report, cpu_seconds, rss_bytes};

#[derive(Parser, Debug)]
#[command(
    name = "switchboard-loadtest",
    version,
    about = "Load generator for Switchboard."
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Hold N idle connections (each joined to one room) for a while, to
    /// measure the server's memory per connection.
    Idle(IdleArgs),
    /// One room, N subscribers, one publisher at a fixed rate or full speed.
    Fanout(FanoutArgs),
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Server URL, `wss://` or `ws://`.
    #[arg(long, default_value = "wss://127.0.0.1:8443/ws")]
    url: String,
    /// CA certificate (PEM) to trust for `wss://`.
    #[arg(long, default_value = "certs/ca.pem")]
    ca: PathBuf,
    /// Server PID, to report its CPU time and memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 2000)]
    ramp: u32,
}

#[derive(Args, Debug)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to hold.
    #[arg(long, default_value_t = 1000)]
    clients: u32,
    /// Seconds to hold them after the last one connected.
    #[arg(long, default_value_t = 5)]
    hold: u64,
}

#[derive(Args, Debug)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// Subscribers in the room.
    #[arg(long, default_value_t = 100)]
    clients: u32,
    /// Messages per second from the publisher; 0 = as fast as acks allow.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Seconds of measured publishing.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of publishing before measuring starts (left out of the figures).
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Un-acked sends the publisher keeps in flight at full speed.
    #[arg(long, default_value_t = 64)]
    window: u32,
    /// Room name.
    #[arg(long, default_value = "fanout")]
    room: String,
    /// Fail (exit 1) if the p99 delivery latency exceeds this many ms.
    #[arg(long)]
    slo_p99_ms: Option<f64>,
}

/// Small buffers: the generator holds many sockets on the same machine.
const READ_BUFFER: usize = 4 * 1024;
/// Longest wait for any single step before the run is declared failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.scenario {
        Scenario::Idle(args) => idle(args).await?,
        Scenario::Fanout(args) => fanout(args).await?,
    };
    report.print();
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}

/// Any stream a client can speak WebSocket over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

/// Opens connections to the server named by a URL.
struct Connector {
    addr: SocketAddr,
    host: String,
    base: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Connector {
    fn new(common: &Common) -> anyhow::Result<Connector> {
        let (scheme, rest) = common.url.split_once("://").context("URL needs a scheme")?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr: SocketAddr = hostport
            .parse()
            .with_context(|| format!("`{hostport}` is not IP:PORT"))?;
        let tls = match scheme {
            "ws" => None,
            "wss" => Some(tls_connector(&common.ca)?),
            other => bail!("unknown scheme {other}"),
        };
        Ok(Connector {
            addr,
            host: "localhost".into(),
            base: common.url.clone(),
            tls,
        })
    }

    async fn connect(&self, user: &str) -> anyhow::Result<Ws> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Io> = match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())?;
                Box::new(tls.connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        let url = format!("{}?user={user}", self.base);
        let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        Ok(ws)
    }
}

fn tls_connector(ca: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The fields of a server frame the generator looks at, borrowed.
#[derive(Deserialize)]
struct View<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    seq: Option<u64>,
    id: Option<u64>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    code: Option<&'a str>,
}

/// The publisher's body: its send time in µs since the Unix epoch.
#[derive(Deserialize)]
struct Stamp {
    t: u64,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn request(id: Option<u64>, body: ClientRequest) -> Message {
    Message::Text(Request { id, body }.to_json().into())
}

/// Connects as `user`, reads `welcome`, joins `room`; returns the room's seq at join.
async fn connect_and_join(conn: &Connector, user: &str, room: &str) -> anyhow::Result<(Ws, u64)> {
    let mut ws = tokio::time::timeout(STEP_TIMEOUT, conn.connect(user)).await??;
    ws.send(request(
        Some(1),
        ClientRequest::Join {
            room: room.into(),
            since: None,
            epoch: None,
        },
    ))
    .await?;
    loop {
        let msg = tokio::time::timeout(STEP_TIMEOUT, ws.next())
            .await?
            .context("closed before joining")??;
        if let Message::Text(t) = msg {
            let v: View<'_> = serde_json::from_str(t.as_str())?;
            match v.kind {
                "joined" => return Ok((ws, v.seq.unwrap_or(0))),
                "error" => bail!("join refused: {}", v.code.unwrap_or("?")),
                _ => {}
            }
        }
    }
}

/// Connects `n` clients at `ramp` per second, each joined to `room`.
async fn ramp_up(
    conn: &Arc<Connector>,
    n: u32,
    ramp: u32,
    room: &str,
    report: &Report,
) -> Vec<(Ws, u64)> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let gap = Duration::from_secs_f64(1.0 / f64::from(ramp.max(1)));
    let mut next = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(next).await;
        next += gap;
        let conn = conn.clone();
        let room = room.to_owned();
        tasks.spawn(async move {
            let t = Instant::now();
            let r = connect_and_join(&conn, &format!("u{i}"), &room).await;
            (r, t.elapsed())
        });
    }
    let mut out = Vec::with_capacity(n as usize);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((Ok(ws), took)) => {
                report.record_handshake(took);
                out.push(ws);
            }
            Ok((Err(e), _)) => report.connect_failed(&e),
            Err(e) => report.connect_failed(&anyhow::Error::from(e)),
        }
    }
    report.set("ramp_seconds", started.elapsed().as_secs_f64());
    out
}

async fn idle(args: IdleArgs) -> anyhow::Result<Report> {
    let conn = Arc::new(Connector::new(&args.common)?);
    let report = Report::new("idle", args.common.json);
    let pid = args.common.server_pid;
    let rss_before = pid.and_then(rss_bytes);
    let clients = ramp_up(&conn, args.clients, args.common.ramp, "idle", &report).await;
    // Let the server settle before reading its memory.
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let rss_after = pid.and_then(rss_bytes);
    report.set("connections", clients.len() as f64);
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        report.set("server_rss_before_bytes", before as f64);
        report.set("server_rss_after_bytes", after as f64);
        if !clients.is_empty() {
            let per = (after.saturating_sub(before)) as f64 / clients.len() as f64;
            report.set("server_bytes_per_connection", per);
        }
    }
    drop(clients);
    Ok(report)
}

/// Per-subscriber seq continuity.
#[derive(Default)]
struct Continuity {
    last: u64,
    lost: u64,
    duplicated: u64,
}

impl Continuity {
    fn see(&mut self, seq: u64) {
        if seq <= self.last {
            self.duplicated += 1;
        } else {
            self.lost += seq - self.last - 1;
            self.last = seq;
        }
    }
}

async fn fanout(args: FanoutArgs) -> anyhow::Result<Report> {
    let conn = Arc::new(Connector::new(&args.common)?);
    let report = Arc::new(Report::new("fanout", args.common.json));
    let subs = ramp_up(&conn, args.clients, args.common.ramp, &args.room, &report).await;
    if subs.is_empty() {
        bail!("no subscriber connected");
    }
    let (mut publisher, _) = connect_and_join(&conn, "publisher", &args.room).await?;
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
    ));
    let delivered = Arc::new(AtomicU64::new(0));
    let measure_from = now_micros() + args.warmup * 1_000_000;
    let stop_at = Instant::now() + Duration::from_secs(args.warmup + args.duration);
    let deadline = stop_at + STEP_TIMEOUT;

    // Subscribers: read until the publisher's last seq, recording latency.
    let last_seq = Arc::new(AtomicU64::new(u64::MAX));
    let mut readers = tokio::task::JoinSet::new();
    for (mut ws, start) in subs {
        let (latency, delivered, last_seq) = (latency.clone(), delivered.clone(), last_seq.clone());
        readers.spawn(async move {
            let mut seen = Continuity {
                last: start,
                ..Continuity::default()
            };
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            let mut count = 0u64;
            while seen.last < last_seq.load(Ordering::Relaxed) {
                let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline.into(), ws.next()).await
                else {
                    break;
                };
                let Message::Text(t) = msg else { continue };
                let Ok(v) = serde_json::from_str::<View<'_>>(t.as_str()) else {
                    continue;
                };
                if v.kind != "message" {
                    continue;
                }
                if let Some(seq) = v.seq {
                    seen.see(seq);
                }
                let stamp = v
                    .body
                    .and_then(|b| serde_json::from_str::<Stamp>(b.get()).ok());
                if let Some(stamp) = stamp.filter(|s| s.t >= measure_from) {
                    count += 1;
                    if let Some(h) = local.as_mut() {
                        let _ = h.record(now_micros().saturating_sub(stamp.t).max(1));
                    }
                }
            }
            if let Some(h) = local {
                let _ = latency.lock().await.add(&h);
            }
            delivered.fetch_add(count, Ordering::Relaxed);
            (seen.lost, seen.duplicated)
        });
    }

    // Publisher.
    let mut measured_start = None;
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut acks = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let mut in_flight: BTreeMap<u64, Instant> = BTreeMap::new();
    let gap = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    let mut next = tokio::time::Instant::now();
    let mut highest = 0u64;
    while Instant::now() < stop_at || !in_flight.is_empty() {
        let may_send = Instant::now() < stop_at
            && match gap {
                Some(_) => tokio::time::Instant::now() >= next,
                None => in_flight.len() < args.window as usize,
            };
        if may_send {
            let t = now_micros();
            if measured_start.is_none() && t >= measure_from {
                measured_start =
                    Some((Instant::now(), args.common.server_pid.and_then(cpu_seconds)));
            }
            sent += 1;
            let body = Body::from_json(&format!(r#"{{"t":{t}}}"#))?;
            publisher
                .send(request(
                    Some(sent),
                    ClientRequest::Send {
                        room: args.room.clone(),
                        body,
                        key: None,
                    },
                ))
                .await?;
            in_flight.insert(sent, Instant::now());
            if let Some(g) = gap {
                next += g;
            }
            continue;
        }
        let wait = match gap {
            Some(_) if Instant::now() < stop_at => next,
            _ => tokio::time::Instant::now() + STEP_TIMEOUT,
        };
        tokio::select! {
            msg = publisher.next() => {
                let Some(msg) = msg else { bail!("publisher connection closed") };
                if let Message::Text(t) = msg? {
                    let v: View<'_> = serde_json::from_str(t.as_str())?;
                    match v.kind {
                        "ack" => {
                            if let Some(start) = v.id.and_then(|id| in_flight.remove(&id)) {
                                acked += 1;
                                let _ = acks.record(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                                highest = highest.max(v.seq.unwrap_or(0));
                            }
                        }
                        "error" => report.error(v.code.unwrap_or("unknown")),
                        _ => {}
                    }
                }
            }
            () = tokio::time::sleep_until(wait) => {
                if gap.is_none() || Instant::now() >= stop_at {
                    bail!("acks stopped arriving");
                }
            }
        }
    }
    last_seq.store(highest, Ordering::Relaxed);
    let (mut lost, mut dup) = (0, 0);
    while let Some(r) = readers.join_next().await {
        let (l, d) = r?;
        lost += l;
        dup += d;
    }
    let (elapsed, cpu) = match measured_start {
        Some((at, cpu0)) => (
            at.elapsed().as_secs_f64(),
            cpu0.zip(args.common.server_pid.and_then(cpu_seconds))
                .map(|(a, b)| b - a),
        ),
        None => (0.0, None),
    };
    let delivered = delivered.load(Ordering::Relaxed);
    report.set("subscribers", f64::from(args.clients));
    report.set("sent", sent as f64);
    report.set("acked", acked as f64);
    report.set("delivered_measured", delivered as f64);
    report.set("lost", lost as f64);
    report.set("duplicated", dup as f64);
    if elapsed > 0.0 {
        report.set("deliveries_per_second", delivered as f64 / elapsed);
    }
    if let Some(cpu) = cpu.filter(|c| *c > 0.0) {
        report.set("server_cpu_seconds", cpu);
        report.set("deliveries_per_server_cpu_second", delivered as f64 / cpu);
    }
    report.latency("delivery", &*latency.lock().await);
    report.latency("ack", &acks);
    report.fail_if(lost > 0, format!("{lost} messages lost"));
    report.fail_if(dup > 0, format!("{dup} messages duplicated"));
    if let Some(slo) = args.slo_p99_ms {
        let p99 = latency.lock().await.value_at_quantile(0.99) as f64 / 1000.0;
        report.fail_if(
            p99 > slo,
            format!("p99 {p99:.2} ms over the SLO of {slo} ms"),
        );
    }
    Ok(Arc::try_unwrap(report).unwrap_or_else(|r| r.snapshot()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuity_counts_gaps_and_duplicates() {
        let mut c = Continuity {
            last: 10,
            ..Continuity::default()
        };
        for seq in [11, 12, 15, 15, 14, 16] {
            c.see(seq);
        }
        assert_eq!((c.last, c.lost, c.duplicated), (16, 2, 2));
    }
}
