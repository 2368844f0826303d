//! Smoke tests of the load generator: every scenario, small and short,
//! against a real server (real TLS or plain ws, real redb), through the same
//! command line a user types. Each asserts real figures: deliveries made,
//! nothing lost or duplicated, connections established.

use clap::Parser;
use loadtest::{Cli, Report};

use crate::support::{Fixture, TestServer};

/// A server with a plain `ws://` listener besides the TLS one.
async fn server() -> TestServer {
    TestServer::start_with(Fixture::new(), |c| {
        c.plain_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await
}

fn plain_url(s: &TestServer) -> String {
    format!("ws://{}/ws", s.plain_addr.expect("plain listener"))
}

fn tls_url(s: &TestServer) -> String {
    format!("wss://{}/ws", s.addr)
}

async fn run(args: &[&str]) -> Report {
    let mut argv = vec!["switchboard-loadtest"];
    argv.extend_from_slice(args);
    argv.push("--quiet");
    let cli = Cli::try_parse_from(&argv).expect("arguments parse");
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        loadtest::run(&cli.scenario),
    )
    .await
    .expect("the run ends")
    .expect("the run succeeds")
}

fn assert_clean(r: &Report) {
    assert_eq!(r.counts.lost, 0, "lost: {}", r.to_table());
    assert_eq!(r.counts.duplicated, 0, "duplicated: {}", r.to_table());
    assert_eq!(r.counts.connections_failed, 0, "{}", r.to_table());
    assert!(r.passed(), "{}", r.to_table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_message_with_latency() {
    let s = server().await;
    let url = plain_url(&s);
    let r = run(&[
        "fanout",
        "--url",
        &url,
        "--clients",
        "20",
        "--rate",
        "200",
        "--warmup",
        "0.2",
        "--duration",
        "1",
    ])
    .await;
    assert_clean(&r);
    assert_eq!(r.counts.connections_established, 21);
    assert!(
        r.counts.sent > 100 && r.counts.acked > 100,
        "{}",
        r.to_table()
    );
    // Every measured send reaches every subscriber.
    assert_eq!(r.counts.delivered, r.counts.sent * 20, "{}", r.to_table());
    let d = r.latency_ms.get("delivery").expect("delivery latency");
    assert!(d.count > 0 && d.p50 > 0.0 && d.p50 <= d.p99 && d.p99 <= d.max);
    assert!(r.latency_ms.contains_key("ack"));
    assert!(!r.timeline.is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_at_full_speed_over_tls_and_fails_an_impossible_slo() {
    let s = server().await;
    let (url, ca) = (tls_url(&s), s.fixture.ca_path());
    let r = run(&[
        "fanout",
        "--url",
        &url,
        "--ca",
        ca.to_str().expect("utf-8"),
        "--clients",
        "10",
        "--rate",
        "0",
        "--window",
        "16",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--slo-p99-ms",
        "0.000001",
    ])
    .await;
    assert_eq!(r.counts.lost, 0);
    assert!(r.counts.delivered > 0);
    assert!(!r.passed(), "an SLO of 1 ns must fail");
    assert!(r.failures.iter().any(|f| f.contains("SLO")));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_churn_drops_and_slow_readers_loses_nothing() {
    let s = server().await;
    let (url, ca) = (tls_url(&s), s.fixture.ca_path());
    let dir = tempfile::tempdir().expect("temp dir");
    let plot = dir.path().join("chat.svg");
    let json = dir.path().join("chat.json");
    let r = run(&[
        "chat",
        "--url",
        &url,
        "--ca",
        ca.to_str().expect("utf-8"),
        "--users",
        "30",
        "--rooms",
        "5",
        "--rooms-per-user",
        "2",
        "--rate",
        "2",
        "--typing",
        "0.5",
        "--churn-interval",
        "1",
        "--drop-share",
        "0.3",
        "--drop-interval",
        "0.7",
        "--slow-share",
        "0.1",
        "--warmup",
        "0.3",
        "--duration",
        "2.5",
        "--plot",
        plot.to_str().expect("utf-8"),
        "--json-out",
        json.to_str().expect("utf-8"),
    ])
    .await;
    assert_clean(&r);
    assert!(
        r.counts.sent > 20 && r.counts.delivered > r.counts.sent,
        "{}",
        r.to_table()
    );
    assert!(r.counts.reconnects > 0, "{}", r.to_table());
    assert!(
        r.counts.typing_received > 0 && r.counts.leaves > 0,
        "{}",
        r.to_table()
    );
    assert!(r.latency_ms.contains_key("delivery") && r.latency_ms.contains_key("ack"));
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.contains("<svg") && svg.contains("delivery latency"));
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    assert_eq!(saved["counts"]["lost"], 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_over_tls_times_every_handshake() {
    let s = server().await;
    let (url, ca) = (tls_url(&s), s.fixture.ca_path());
    let r = run(&[
        "connect",
        "--url",
        &url,
        "--ca",
        ca.to_str().expect("utf-8"),
        "--clients",
        "60",
        "--concurrency",
        "8",
        "--duration",
        "20",
    ])
    .await;
    assert_clean(&r);
    assert_eq!(r.counts.connections_established, 60);
    assert_eq!(
        r.latency_ms.get("handshake").map(|p| p.count),
        Some(60),
        "{}",
        r.to_table()
    );
    assert!(r.measured_seconds > 0.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reads_the_servers_memory_per_connection() {
    let s = server().await;
    let url = plain_url(&s);
    // The server runs in this process: its PID is ours.
    let pid = std::process::id().to_string();
    let r = run(&[
        "idle",
        "--url",
        &url,
        "--clients",
        "50",
        "--warmup",
        "0.2",
        "--duration",
        "0.8",
        "--server-pid",
        &pid,
        // Joined in the upgrade URL: a refused or unanswered join fails the
        // connection, so all 50 established means all 50 joined.
        "--join-in-url",
    ])
    .await;
    assert_clean(&r);
    assert_eq!(r.counts.connections_established, 50);
    let server = r.server.as_ref().expect("server usage");
    assert!(server.rss_before_bytes.is_some() && server.rss_after_bytes.is_some());
    assert!(server.bytes_per_connection.is_some(), "{}", r.to_table());
    assert!(r.close_codes.is_empty(), "{}", r.to_table());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_are_ordered_and_timed() {
    let s = server().await;
    let url = plain_url(&s);
    let r = run(&[
        "history",
        "--url",
        &url,
        "--clients",
        "4",
        "--messages",
        "300",
        "--limit",
        "50",
        "--warmup",
        "0.1",
        "--duration",
        "1",
    ])
    .await;
    assert_clean(&r);
    assert!(r.counts.history_pages > 0 && r.counts.history_messages > 0);
    assert!(r.errors.is_empty(), "{}", r.to_table());
    assert!(r.latency_ms.get("history").is_some_and(|p| p.count > 0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_samples_the_servers_memory_from_metrics_and_judges_its_drift() {
    let s = server().await;
    let url = plain_url(&s);
    let metrics = format!("http://{}/metrics", s.admin_addr.expect("admin listener"));
    let soak = |limit_mib: &'static str| {
        let (url, metrics) = (url.clone(), metrics.clone());
        async move {
            run(&[
                "soak",
                "--url",
                &url,
                "--metrics-url",
                &metrics,
                "--clients",
                "12",
                "--rooms",
                "6",
                "--warmup",
                "0.3",
                "--duration",
                "2",
                "--sample-interval",
                "0.1",
                &format!("--max-rss-drift-mib={limit_mib}"),
                // The server shares this process, and so its RSS and
                // descriptors, with every test running beside it: only the
                // RSS limit is judged here, and only to make it fail.
                "--max-fd-drift=1000000",
            ])
            .await
        }
    };
    let r = soak("256").await;
    assert_clean(&r);
    assert!(r.errors.is_empty(), "{}", r.to_table());
    let summary = r.soak.as_ref().expect("a soak summary");
    assert_eq!(summary.source, metrics);
    let measured: Vec<_> = summary.samples.iter().filter(|x| x.t >= 0.0).collect();
    assert!(measured.len() >= 10, "{}", r.to_table());
    // The server runs in this process: its figures are ours.
    assert!(
        measured
            .iter()
            .all(|x| x.rss_bytes > 1 << 20 && x.open_fds > 3 && x.cpu_seconds.is_some()),
        "{:?}",
        summary.samples
    );
    assert!(summary.rss.is_some() && summary.fds.is_some());
    // Sessions churned and their keyed messages were stored and acked.
    assert!(
        summary.cycles > 12 && summary.failed_cycles == 0,
        "{}",
        r.to_table()
    );
    assert!(measured.last().is_some_and(|x| x.stored > 36));
    assert!(
        r.counts.acked > 0 && r.counts.acked == r.counts.sent,
        "{}",
        r.to_table()
    );
    assert!(r.counts.joins > 0 && r.counts.leaves == r.counts.joins);
    let table = r.to_table();
    assert!(
        table.contains("server RSS") && table.contains("server fds"),
        "{table}"
    );
    // A limit below any possible drift fails the run, with the reason.
    let strict = soak("-100000").await;
    assert!(!strict.passed(), "{}", strict.to_table());
    assert!(
        strict.failures.iter().any(|f| f.contains("RSS drifted")),
        "{:?}",
        strict.failures
    );
    // Without a metrics URL, a local server's /proc/PID is read instead.
    let pid = std::process::id().to_string();
    let local = run(&[
        "soak",
        "--url",
        &url,
        "--server-pid",
        &pid,
        "--clients",
        "4",
        "--warmup",
        "0.1",
        "--duration",
        "1",
        "--sample-interval",
        "0.1",
        "--max-rss-drift-mib=100000",
        "--max-fd-drift=1000000",
    ])
    .await;
    assert_clean(&local);
    let summary = local.soak.as_ref().expect("a soak summary");
    assert_eq!(summary.source, format!("/proc/{pid}"));
    assert!(summary.samples.len() >= 5 && summary.samples.iter().all(|x| x.rss_bytes > 0));
    s.stop().await;
}
