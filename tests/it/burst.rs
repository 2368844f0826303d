//! One user cannot disconnect a room: a burst of large sends that the rate
//! and size limits allow never closes a reader that keeps up with its
//! socket, while a reader that stops reading is still closed with 4100.

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use protocol::{ClientRequest, Request, ServerFrame, close};
use serde_json::json as j;
use switchboard::auth::now_unix;
use switchboard::config::{Rate, Secret};
use tokio_tungstenite::tungstenite::Message;

use crate::closing::{SECRET, connect_bearer};
use crate::support::{Client, DEADLINE, Fixture, TestServer, eventually_every, json};

const ROOM: &str = "burst";
/// Sends per sending session: the default per-session send burst.
const BURST: u64 = 50;
/// Body size: under the default 64 KiB message limit with its envelope.
const BODY: usize = 60_000;
const READERS: usize = 4;

fn token(user: &str, grants: &[&str]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &j!({"sub": user, "exp": now_unix() + 3600, "grants": grants}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// Reads `total` messages of the room, in seq order, as fast as it can.
async fn read_all(mut c: Client, total: u64) {
    for seq in 1..=total {
        match c.next_message(ROOM).await {
            ServerFrame::Message { seq: s, .. } => assert_eq!(s, seq, "gap or duplicate"),
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Pipelines `BURST` large sends while reading concurrently; returns once
/// every send is acked and all `total` messages of the room arrived.
async fn send_burst(c: Client, total: u64) {
    let (mut sink, mut stream) = c.ws.split();
    let writing = tokio::spawn(async move {
        let body = json(&format!("\"{}\"", "x".repeat(BODY)));
        for id in 1..=BURST {
            let text = Request {
                id: Some(id),
                body: ClientRequest::Send {
                    room: ROOM.into(),
                    body: body.clone(),
                    key: None,
                },
            }
            .to_json();
            sink.feed(Message::Text(text.into())).await.expect("feed");
        }
        sink.flush().await.expect("flush");
        sink
    });
    let (mut acks, mut next) = (0, 1);
    while acks < BURST || next <= total {
        let msg = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("a frame within the deadline");
        let Some(Ok(Message::Text(t))) = msg else {
            panic!("a sender was cut off: {msg:?}");
        };
        match ServerFrame::from_json(t.as_str()).expect("frame") {
            ServerFrame::Ack { .. } => acks += 1,
            ServerFrame::Message { seq, .. } => {
                assert_eq!(seq, next, "gap or duplicate");
                next += 1;
            }
            ServerFrame::Error { message, .. } => panic!("a send was refused: {message}"),
            _ => {}
        }
    }
    let _sink = writing.await.expect("writer");
}

async fn burst_keeps_fast_readers(senders: u64) {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.auth_hs256_secret = Some(Secret::new(SECRET));
        c.handshake_rate_per_ip = Rate::OFF;
    })
    .await;
    let total = senders * BURST;
    let mut readers = Vec::new();
    for i in 0..READERS {
        let mut r = connect_bearer(&server, &token(&format!("reader{i}"), &["burst:r"])).await;
        r.join(ROOM).await;
        readers.push(tokio::spawn(read_all(r, total)));
    }
    // A reader that stops reading, with a tiny receive buffer.
    let url = format!(
        "wss://localhost:{}/ws?token={}",
        server.addr.port(),
        token("stalled", &["burst:r"])
    );
    let mut stalled = crate::support::connect_tls_small_rcvbuf(
        server.addr,
        &server.fixture.tls_connector(),
        &url,
    )
    .await
    .expect("connect");
    assert!(matches!(stalled.recv().await, ServerFrame::Welcome { .. }));
    stalled.join(ROOM).await;
    // The sending user's sessions, each one burst.
    let mut sending = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..senders {
        let mut s = connect_bearer(&server, &token("sender", &["burst:rw"])).await;
        s.join(ROOM).await;
        clients.push(s);
    }
    for s in clients {
        sending.push(tokio::spawn(send_burst(s, total)));
    }
    for task in sending.into_iter().chain(readers) {
        task.await
            .expect("a reader that keeps up gets every message");
    }
    // Messages keep coming, a few a second, until the stalled reader is
    // cut off: by its write deadline (default 10 s without progress), or
    // sooner by a message that finds its queue past the soft bound with
    // nothing written for the grace time.
    let mut late = connect_bearer(&server, &token("sender", &["burst:rw"])).await;
    late.join(ROOM).await;
    let mut sent_late = 0;
    // Polled at the pace of the late messages: each look that finds the
    // reader still connected sends one more.
    eventually_every(
        "the stalled reader to be cut off",
        DEADLINE,
        std::time::Duration::from_millis(100),
        async || {
            if server.state.metrics.slow_consumers.get() > 0 {
                return Ok(());
            }
            late.say(ROOM, "\"late\"").await;
            sent_late += 1;
            Err(format!("{sent_late} late messages sent"))
        },
    )
    .await;
    let total = total + sent_late;
    // It reads again: a gap-free prefix, then 4100.
    let mut last = 0;
    let frame = loop {
        let msg = tokio::time::timeout(DEADLINE, stalled.ws.next())
            .await
            .expect("frames within the deadline");
        match msg {
            Some(Ok(Message::Text(t))) => {
                if let Ok(ServerFrame::Message { seq, .. }) = ServerFrame::from_json(t.as_str()) {
                    assert_eq!(seq, last + 1, "gap before the cut-off");
                    last = seq;
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.expect("close frame"),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(frame.code), close::SLOW_CONSUMER.code);
    assert!(
        last < total,
        "the stalled reader was cut off before the end"
    );
    assert_eq!(
        server.state.metrics.slow_consumers.get(),
        1,
        "only the stalled reader is a slow consumer"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_the_limits_allow_closes_only_the_reader_that_stopped() {
    burst_keeps_fast_readers(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_of_one_user_bursting_close_only_the_reader_that_stopped() {
    burst_keeps_fast_readers(2).await;
}
