//! Logs: `--log-format json` writes one JSON object per line, the level
//! comes from config (`--log-level`) unless `RUST_LOG` is set, and session
//! events carry the session span (id, user, remote address) but never a
//! token or a message body.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::Process;
use crate::support::{DEADLINE, Fixture, connect_tls};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_session_span_and_no_secrets() {
    let fixture = Fixture::new();
    let mut process = Process::start_with(&fixture, |c| {
        c.args([
            "--log-format",
            "json",
            "--log-level",
            "switchboard=debug,warn",
        ])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped());
    })
    .await;
    let addr = process.addr;

    let secret_body = "a-very-private-message-body";
    let url = format!("wss://localhost:{}/ws?user=logan", addr.port());
    let mut c = connect_tls(addr, &fixture.tls_connector(), &url)
        .await
        .expect("connect");
    c.recv().await;
    c.join("general").await;
    c.say("general", &format!("\"{secret_body}\"")).await;
    drop(c);

    // Read stderr until the session's close is logged inside its span.
    let mut err = BufReader::new(process.child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = err.next_line().await.expect("stderr") {
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            assert!(!line.contains(secret_body), "a body was logged: {line}");
            seen.push(line.clone());
            if v["fields"]["message"] == "session closed" {
                return v;
            }
        }
        panic!("no session-closed line in {seen:?}");
    })
    .await
    .expect("the close is logged");
    assert_eq!(closed["level"], "DEBUG");
    assert_eq!(closed["span"]["name"], "session");
    assert_eq!(closed["span"]["user"], "logan");
    assert!(
        closed["span"]["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.1:"))
    );
    assert!(
        closed["span"]["id"]
            .as_str()
            .is_some_and(|id| id.len() == 16)
    );
    // The dev-mode warning came first, as JSON, at the configured level.
    assert!(
        seen.iter()
            .any(|l| l.contains("dev mode") && l.contains("\"WARN\"")),
        "{seen:?}"
    );
    process.signal("-TERM");
    assert!(process.wait_success().await);
}
