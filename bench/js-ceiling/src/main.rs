//! The ceiling of Switchboard's cluster store, for the durable-throughput
//! figure of BENCHMARKS.md (issue 15): the same messages published to
//! JetStream with async-nats alone, into a stream with Switchboard's
//! settings (file storage, `--replicas`, subjects `<stream>.m.>`, direct get
//! and atomic publish allowed, a 2-minute de-duplication window), spread
//! over `--subjects` subjects (one per room) with pipelined asynchronous
//! publishes, and every ack awaited. It prints acked messages per second.
//!
//! It owns nothing of Switchboard's: no room seqs, no expected-last-sequence
//! check, no batching. Each message carries the headers a Switchboard
//! message carries (`Nats-Msg-Id`, `Sb-Seq`, `Sb-From`, `Sb-Ts`) and a body
//! of the load generator's shape (`{"t":…}`), so the bytes match.
//!
//! `js-ceiling --url nats://127.0.0.1:4222,… [--messages N] [--subjects N]
//! [--in-flight N] [--connections N] [--replicas N] [--json-out FILE]`

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage as Publish, stream};
use bytes::Bytes;
use clap::Parser;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

/// JetStream's de-duplication window as Switchboard's store sets it.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Kernel clock ticks per second of `/proc/self/stat` (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

#[derive(Parser, Debug)]
struct Args {
    /// NATS URLs, comma-separated; connections are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "nats://127.0.0.1:4222")]
    url: Vec<String>,
    /// Stream name (recreated: any stream of this name is deleted first).
    #[arg(long, default_value = "CEILING")]
    stream: String,
    /// Replicas of the stream.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Messages to publish in all (after the warm-up).
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Messages published before the measured ones, not counted.
    #[arg(long, default_value_t = 20_000)]
    warmup: u64,
    /// Subjects (rooms) the messages are spread over, round robin.
    #[arg(long, default_value_t = 1000)]
    subjects: u64,
    /// Publishes awaiting their ack at once, over all connections.
    #[arg(long, default_value_t = 16_000)]
    in_flight: usize,
    /// NATS connections (as many as Switchboard nodes), each publishing
    /// its share with its share of the in-flight window.
    #[arg(long, default_value_t = 3)]
    connections: usize,
    /// Write the report as JSON here too.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let first = args.url.first().context("--url needs a NATS URL")?;
    let admin = async_nats::connect(first.as_str())
        .await
        .with_context(|| format!("cannot connect to {first}"))?;
    let js = jetstream::new(admin);
    // A fresh stream: the figure is of an empty stream, as Switchboard's is.
    let _ = js.delete_stream(&args.stream).await;
    js.create_stream(stream::Config {
        name: args.stream.clone(),
        subjects: vec![format!("{}.m.>", args.stream)],
        storage: stream::StorageType::File,
        num_replicas: args.replicas,
        allow_direct: true,
        allow_atomic_publish: true,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    })
    .await
    .context("cannot create the stream")?;

    let connections = args.connections.max(1);
    let window = (args.in_flight / connections).max(1);
    let mut contexts = Vec::with_capacity(connections);
    for i in 0..connections {
        let url = &args.url[i % args.url.len()];
        let client = async_nats::connect(url.as_str())
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        contexts.push(
            jetstream::ContextBuilder::new()
                .max_ack_inflight(window)
                .build(client),
        );
    }

    // Warm-up, then the measured run, each over every connection at once.
    run(&contexts, &args, 0, args.warmup, window).await?;
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    run(&contexts, &args, args.warmup, args.messages, window).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    let rate = args.messages as f64 / elapsed;

    let report = serde_json::json!({
        "messages": args.messages,
        "subjects": args.subjects,
        "in_flight": args.in_flight,
        "connections": connections,
        "replicas": args.replicas,
        "seconds": elapsed,
        "acked_per_s": rate,
        "generator_cpu_s": cpu,
    });
    println!(
        "js-ceiling: {} messages over {} subjects, {} in flight on {} connections, R{}: \
         {:.0} acked msgs/s ({:.2} s, generator {} CPU-s)",
        args.messages,
        args.subjects,
        args.in_flight,
        connections,
        args.replicas,
        rate,
        elapsed,
        cpu.map_or("?".to_owned(), |c| format!("{c:.2}")),
    );
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Publishes messages `from..from + count`, message `n` on connection
/// `n % connections` and subject `n % subjects`, each connection keeping at
/// most `window` acks outstanding; returns once every ack is in.
async fn run(
    contexts: &[jetstream::Context],
    args: &Args,
    from: u64,
    count: u64,
    window: usize,
) -> anyhow::Result<()> {
    let n = contexts.len() as u64;
    let tasks = contexts.iter().enumerate().map(|(i, js)| {
        let i = i as u64;
        async move {
            let mut acks = FuturesUnordered::new();
            let mut seqs = vec![0u64; args.subjects as usize];
            let mut m = from + i;
            while m < from + count {
                while acks.len() >= window {
                    if let Some(ack) = acks.next().await {
                        ack?;
                    }
                }
                let subject = (m % args.subjects) as usize;
                seqs[subject] += 1;
                let publish = message(&args.stream, subject, seqs[subject], m);
                let subject = format!("{}.m.{}", args.stream, room_token(subject));
                let ack = js.send_publish(subject, publish).await.context("publish")?;
                acks.push(ack.into_future());
                m += n;
            }
            while let Some(ack) = acks.next().await {
                ack?;
            }
            anyhow::Ok(())
        }
    });
    for r in futures_util::future::join_all(tasks).await {
        r.context("an ack failed")?;
    }
    Ok(())
}

/// One message shaped as Switchboard stores a chat message.
fn message(stream: &str, subject: usize, seq: u64, n: u64) -> Publish {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut headers = HeaderMap::new();
    headers.insert("Sb-Seq", seq.to_string().as_str());
    headers.insert("Sb-From", "6c6f6164");
    headers.insert("Sb-Ts", now.as_millis().to_string().as_str());
    let body = Bytes::from(format!(r#"{{"t":{}}}"#, now.as_micros()));
    Publish::build()
        .headers(headers)
        .message_id(format!("{stream}-{subject}-{n}"))
        .payload(body)
}

/// The subject token Switchboard would give the load generator's room
/// `fanout-N` (the hex of its name), so subjects have the same length.
fn room_token(subject: usize) -> String {
    format!("fanout-{subject}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// This process's CPU time (user + system) so far, from `/proc/self/stat`.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / USER_HZ)
}
