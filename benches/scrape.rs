//! The cost of one `/metrics` scrape as the number of live sessions grows:
//! 10 against 20,000 idle sessions, each joined to a room of its own. The
//! server is the real one (redb store, admin listener on `127.0.0.1:0`);
//! the sessions are registered with the hub directly, as a session task
//! registers itself, so no client connections are needed. Each iteration
//! is one `GET /metrics` on a kept-alive HTTP/1.1 connection, response read
//! to its end. Run with `cargo bench --bench scrape`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use switchboard::hub::{Member, SessionEntry, SessionStats};
use switchboard::metrics::Metrics;
use switchboard::session::{OutboxReceiver, outbox};
use switchboard::{Config, Server};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const SESSIONS: [u64; 2] = [10, 20_000];

/// A running server with `n` idle sessions and an HTTP connection to its
/// admin listener.
struct Scraped {
    conn: BufReader<TcpStream>,
    _sessions: Vec<OutboxReceiver>,
    _server: Server,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

async fn start(n: u64) -> Scraped {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    let server = Server::open(config, false).await.unwrap();
    let state = server.state();
    let metrics = Arc::new(Metrics::default());
    let mut sessions = Vec::new();
    for id in 1..=n {
        let (tx, rx) = outbox(64, 1 << 20, 64, CancellationToken::new(), metrics.clone());
        let user: Arc<str> = Arc::from(format!("user{id}"));
        state.hub.register_session(
            id,
            SessionEntry {
                user: user.clone(),
                remote: ([127, 0, 0, 1], 40_000).into(),
                connected_at_ms: 0,
                outbox: tx.clone(),
                stats: Arc::new(SessionStats::default()),
            },
        );
        state.hub.join(
            &format!("room{id}"),
            Member {
                session: id,
                user,
                outbox: tx,
            },
        );
        sessions.push(rx);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(switchboard::admin::serve(
        listener,
        state,
        CancellationToken::new(),
        stop.clone(),
    ));
    let conn = BufReader::new(TcpStream::connect(addr).await.unwrap());
    Scraped {
        conn,
        _sessions: sessions,
        _server: server,
        _dir: dir,
        stop,
    }
}

/// One `GET /metrics`, its body read to the end; returns the body's length.
async fn scrape(conn: &mut BufReader<TcpStream>) -> usize {
    conn.get_mut()
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: bench\r\n\r\n")
        .await
        .unwrap();
    let mut length = 0;
    let mut line = String::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await.unwrap();
    assert!(body.starts_with(b"# HELP"), "a metrics body");
    length
}

fn scrapes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("metrics_scrape");
    for n in SESSIONS {
        let mut s = rt.block_on(start(n));
        group.bench_with_input(BenchmarkId::new("idle_sessions", n), &n, |b, _| {
            b.iter(|| rt.block_on(scrape(&mut s.conn)));
        });
        s.stop.cancel();
        rt.block_on(async { drop(s) });
    }
    group.finish();
}

criterion_group!(benches, scrapes);
criterion_main!(benches);
