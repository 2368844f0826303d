//! Graceful shutdown and crashes: every acknowledged message survives.
//!
//! The process tests start the real `switchboard` binary as a child and
//! signal it by PID; they stop only the processes they started.

use std::collections::{BTreeMap, HashSet};

use protocol::{ClientRequest, ServerFrame, close};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{Client, DEADLINE, Fixture, Process, TestServer, json};

/// What one sender saw acknowledged: body text -> seq.
type Acked = BTreeMap<String, u64>;

/// Sends numbered messages as fast as acks come back, until the connection
/// ends; returns every acknowledged one and the close frame, if any.
async fn send_until_closed(mut c: Client, who: String) -> (Acked, Option<CloseCode>) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut acked = Acked::new();
    let mut pending = BTreeMap::new();
    let mut n = 0u64;
    // Keep a window of sends in flight; bounded by count.
    const MAX: u64 = 200_000;
    loop {
        while pending.len() < WINDOW && n < MAX {
            let body = format!("\"{who}-{n}\"");
            let req = ClientRequest::Send {
                room: "crash".into(),
                body: json(&body),
                key: None,
            };
            let Ok(id) = c.try_send(req).await else {
                return (acked, None);
            };
            pending.insert(id, body);
            n += 1;
        }
        let msg = tokio::time::timeout(DEADLINE, c.ws.next())
            .await
            .expect("progress");
        match msg {
            Some(Ok(Message::Text(t))) => {
                if let Ok(ServerFrame::Ack {
                    id: Some(id), seq, ..
                }) = ServerFrame::from_json(t.as_str())
                {
                    if let Some(body) = pending.remove(&id) {
                        acked.insert(body, seq);
                    }
                }
            }
            Some(Ok(Message::Close(f))) => return (acked, f.map(|f| f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (acked, None),
        }
    }
}

/// Every acked message is in history exactly once with its seq, and the
/// room's seqs run 1..=latest without a gap.
async fn check_history(server: &TestServer, acked: &Acked) {
    let mut reader = server.connect("auditor").await;
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    let mut after = 0;
    for m in reader.history_all("crash").await {
        assert_eq!(m.seq, after + 1, "gap in seqs");
        after = m.seq;
        seen.insert(m.seq, m.body.expect("body").get().to_owned());
    }
    let mut bodies = HashSet::new();
    for body in seen.values() {
        assert!(bodies.insert(body.clone()), "{body} stored twice");
    }
    for (body, seq) in acked {
        assert_eq!(
            seen.get(seq),
            Some(body),
            "acked message {body} at {seq} missing"
        );
    }
}

/// Sends each crash-test sender keeps in flight.
const WINDOW: usize = 16;
/// Senders in a crash test.
const SENDERS: usize = 4;
/// The seq the watcher waits for before the signal.
const WATCHED: u64 = 500;

async fn crash_test(signal: &str) {
    let fixture = Fixture::new();
    let mut process = Process::start(&fixture).await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let mut c = process.connect(&fixture, &format!("sender{i}")).await;
        c.join("crash").await;
        senders.push(tokio::spawn(send_until_closed(c, format!("s{i}"))));
    }
    // Let traffic build up: wait for a watcher to see WATCHED messages.
    let mut watcher = process.connect(&fixture, "watcher").await;
    watcher.join("crash").await;
    loop {
        if let ServerFrame::Message { seq, .. } = watcher.next_message("crash").await {
            if seq >= WATCHED {
                break;
            }
        }
    }
    process.signal(signal);
    let status = tokio::time::timeout(DEADLINE, process.child.wait())
        .await
        .expect("exits within the deadline")
        .expect("wait");
    let mut acked = Acked::new();
    let mut closes = Vec::new();
    for s in senders {
        let (a, code) = s.await.expect("sender");
        acked.extend(a);
        closes.push(code);
    }
    // The watcher saw WATCHED committed messages; a sender may not have
    // read the acks of its last window before the signal.
    let floor = WATCHED as usize - SENDERS * WINDOW;
    assert!(acked.len() >= floor, "traffic flowed: {} acks", acked.len());
    if signal == "-TERM" {
        assert!(status.success(), "graceful exit: {status:?}");
        for code in closes {
            assert_eq!(code, Some(CloseCode::from(close::GOING_AWAY.code)));
        }
    }
    let server = TestServer::start_with(fixture, |_| {}).await;
    check_history(&server, &acked).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_sending_keeps_every_acked_message() {
    crash_test("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_sending_keeps_every_acked_message_exactly_once() {
    crash_test("-KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_sessions_with_1001() {
    let server = TestServer::start().await;
    let mut a = server.connect("a").await;
    a.join("g").await;
    let seq = a.say("g", "1").await;
    let (fixture, frame) = tokio::join!(server.stop(), a.expect_close());
    assert_eq!(
        frame.expect("close frame").code,
        CloseCode::from(close::GOING_AWAY.code)
    );
    let server = TestServer::start_with(fixture, |_| {}).await;
    let mut b = server.connect("b").await;
    let joined = b.join("g").await;
    assert!(matches!(joined, ServerFrame::Joined { seq: s, .. } if s == seq));
    server.stop().await;
}
