//! The floor the generator is measured against: N plain tokio-tungstenite
//! readers that only count text frames, and one publisher keeping a window
//! of frames in flight by its own echo, against a broadcast server (the
//! references in bench/). It prints deliveries and this process's CPU
//! seconds, so that `switchboard-loadtest fanout --raw`'s CPU per delivery
//! can be compared with the least any tokio-tungstenite client spends.
//!
//! `cargo run --release -p loadtest --example minimal_reader -- URL CLIENTS SECONDS`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const WINDOW: u64 = 64;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(url: &str, config: WebSocketConfig) -> anyhow::Result<Ws> {
    let rest = url.strip_prefix("ws://").unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let tcp = tokio::net::TcpStream::connect(hostport).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
    Ok(ws)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:9001/ws".into());
    let clients: u32 = args.next().map_or(Ok(1000), |a| a.parse())?;
    let seconds: f64 = args.next().map_or(Ok(8.0), |a| a.parse())?;
    let config = WebSocketConfig::default().read_buffer_size(loadtest::conn::READ_BUFFER);
    let count = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..clients {
        let ws = connect(&url, config).await?;
        let count = count.clone();
        readers.push(tokio::spawn(async move {
            let (_, mut rx) = ws.split();
            while let Some(Ok(m)) = rx.next().await {
                if m.is_text() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let ws = connect(&url, config).await?;
    let (mut tx, mut rx) = ws.split();
    let cpu0 = loadtest::procfs::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let (n0, start) = (count.load(Ordering::Relaxed), Instant::now());
    let stop = start + Duration::from_secs_f64(seconds);
    let (mut sent, mut echoed) = (0u64, 0u64);
    while Instant::now() < stop {
        while sent - echoed < WINDOW {
            sent += 1;
            tx.send(Message::text(format!(r#"{{"n":{sent}}}"#))).await?;
        }
        match rx.next().await {
            Some(Ok(m)) if m.is_text() => echoed += 1,
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    let n = count.load(Ordering::Relaxed) - n0;
    let cpu = loadtest::procfs::cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu0;
    let wall = start.elapsed().as_secs_f64();
    println!(
        "{n} deliveries in {wall:.2} s, {cpu:.2} CPU-s: {:.2} M/s, {:.2} M per CPU-second",
        n as f64 / wall / 1e6,
        n as f64 / cpu.max(1e-9) / 1e6
    );
    std::process::exit(0);
}
