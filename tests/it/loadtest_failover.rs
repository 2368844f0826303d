//! The load generator's reconnect: two real servers A and B (unrelated, not
//! a cluster), the generator's fan-out spread over both URLs, and A lost
//! mid-run: killed with SIGKILL (real processes, by the PID this test
//! started: the sockets just die), or drained (`POST /admin/api/drain`:
//! every session is closed with 4200 and A takes no new connection). Every
//! connection A held (its subscribers and the publisher; in `chat`, its
//! users) must reconnect to B, and the run must end with a report. Loss across
//! two unrelated histories cannot be exact, so only the mechanism is
//! asserted here; the loss and duplicate accounting around a resume is
//! unit-tested in the crate (`conn::tests`).

use clap::Parser;
use loadtest::{Cli, Report};
use protocol::ServerFrame;

use crate::admin::{self, admin_addr, call};
use crate::support::{Client, DEADLINE, Fixture, Process, TestServer};

/// Subscribers: even ones go to A, odd ones to B; the publisher, numbered
/// after them, goes to A.
const CLIENTS: u32 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reconnects_to_the_other_url_when_a_server_is_killed() {
    let (fa, fb) = (Fixture::new(), Fixture::new());
    let a = Process::start(&fa).await;
    let b = Process::start(&fb).await;
    let (url_a, url_b) = (
        format!("wss://127.0.0.1:{}/ws", a.addr.port()),
        format!("wss://127.0.0.1:{}/ws", b.addr.port()),
    );
    // A watcher on A sees the publisher's messages: the load is running.
    let mut watcher = a.connect(&fa, "watcher").await;
    watcher.join("fanout").await;
    let (report, ()) = tokio::join!(run(fanout_args(&url_a, &url_b)), async {
        publisher_running(&mut watcher, "fanout").await;
        drop(watcher);
        a.kill().await;
    });
    assert_moved_to_b(&report, &url_a, &url_b);
    b.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reconnects_to_the_other_url_when_a_server_drains() {
    let a = admin::start_with(|c| c.drain_window_ms = 200).await;
    let b = TestServer::start().await;
    let (url_a, url_b) = (
        format!("wss://127.0.0.1:{}/ws", a.addr.port()),
        format!("wss://127.0.0.1:{}/ws", b.addr.port()),
    );
    let mut watcher = a.connect("watcher").await;
    watcher.join("fanout").await;
    let (report, ()) = tokio::join!(run(fanout_args(&url_a, &url_b)), async {
        publisher_running(&mut watcher, "fanout").await;
        drop(watcher);
        let reply = call(admin_addr(&a), "POST", "/admin/api/drain", None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    });
    assert_moved_to_b(&report, &url_a, &url_b);
    let on_a = u64::from(CLIENTS / 2 + 1);
    assert_eq!(
        report.close_codes.get("4200"),
        Some(&on_a),
        "{}",
        report.to_table()
    );
    a.stop().await;
    b.stop().await;
}

/// The fan-out over A and B: 4 s of load at 50 msg/s.
fn fanout_args(url_a: &str, url_b: &str) -> Vec<String> {
    let mut argv: Vec<String> = ["fanout", "--url"].map(String::from).to_vec();
    argv.push(format!("{url_a},{url_b}"));
    argv.extend(["--clients".to_owned(), CLIENTS.to_string()]);
    argv.extend(["--rate", "50"].map(String::from));
    argv
}

/// One generator run with `args` (and the options every run here shares),
/// bounded in time.
async fn run(args: Vec<String>) -> Report {
    let mut argv = vec!["switchboard-loadtest".to_owned()];
    argv.extend(args);
    argv.extend(
        [
            "--insecure",
            "--warmup",
            "0.3",
            "--duration",
            "4",
            "--reconnect-backoff-ms",
            "50",
            "--quiet",
        ]
        .map(String::from),
    );
    let cli = Cli::try_parse_from(&argv).expect("arguments parse");
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        loadtest::run(&cli.scenario),
    )
    .await
    .expect("the run ends within its bound")
    .expect("the run ends with a report")
}

/// Returns once the watcher on A has seen the 10th message of `room`: the
/// load is running.
async fn publisher_running(watcher: &mut Client, room: &str) {
    let mut seen = 0;
    for _ in 0..1000 {
        if let ServerFrame::Message { seq, .. } = watcher.next_message(room).await {
            seen = seq;
        }
        if seen >= 10 {
            break;
        }
    }
    assert!(seen >= 10, "the load on A never got going");
}

fn assert_moved_to_b(report: &Report, url_a: &str, url_b: &str) {
    let c = &report.counts;
    // A held 10 subscribers and the publisher: each reconnected once, to B.
    let on_a = u64::from(CLIENTS / 2 + 1);
    assert_eq!(c.reconnects, on_a, "{}", report.to_table());
    assert_eq!(
        report.connections_per_url.get(url_a),
        Some(&on_a),
        "{}",
        report.to_table()
    );
    assert_eq!(
        report.connections_per_url.get(url_b),
        Some(&(u64::from(CLIENTS / 2) + on_a)),
        "{}",
        report.to_table()
    );
    let resume = report
        .latency_ms
        .get("resume")
        .unwrap_or_else(|| panic!("no resume latency: {}", report.to_table()));
    assert_eq!(resume.count, on_a, "{}", report.to_table());
    assert!(resume.p50 <= resume.p99 && resume.p99 < DEADLINE.as_secs_f64() * 1000.0);
    // The publisher carried on at B and every subscriber, moved or not,
    // read on to its end marker there.
    assert!(c.acked > 0 && c.delivered > 0, "{}", report.to_table());
    assert!(
        !report.errors.keys().any(|e| e.contains("no end marker")),
        "{}",
        report.to_table()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_users_resume_on_the_other_url_when_a_server_is_killed() {
    let (fa, fb) = (Fixture::new(), Fixture::new());
    let a = Process::start(&fa).await;
    let b = Process::start(&fb).await;
    let (url_a, url_b) = (
        format!("wss://127.0.0.1:{}/ws", a.addr.port()),
        format!("wss://127.0.0.1:{}/ws", b.addr.port()),
    );
    // Every user is in the one room; half of them (the even ones) on A.
    let mut watcher = a.connect(&fa, "watcher").await;
    watcher.join("r0").await;
    let mut args: Vec<String> = ["chat", "--url"].map(String::from).to_vec();
    args.push(format!("{url_a},{url_b}"));
    args.extend(["--users".to_owned(), CLIENTS.to_string()]);
    args.extend(
        [
            "--rooms",
            "1",
            "--rooms-per-user",
            "1",
            "--rate",
            "5",
            "--churn-interval",
            "0",
            "--drop-share",
            "0",
            "--slow-share",
            "0",
        ]
        .map(String::from),
    );
    let (report, ()) = tokio::join!(run(args), async {
        publisher_running(&mut watcher, "r0").await;
        drop(watcher);
        a.kill().await;
    });
    let on_a = u64::from(CLIENTS / 2);
    let c = &report.counts;
    assert_eq!(c.reconnects, on_a, "{}", report.to_table());
    assert_eq!(
        report.connections_per_url.get(&url_b),
        Some(&(2 * on_a)),
        "{}",
        report.to_table()
    );
    let resume = report
        .latency_ms
        .get("resume")
        .unwrap_or_else(|| panic!("no resume latency: {}", report.to_table()));
    assert_eq!(resume.count, on_a, "{}", report.to_table());
    // The users that moved sent and were acked on B.
    assert!(c.acked > 0, "{}", report.to_table());
    b.kill().await;
}
