//! Every send that was stored gets its ack before the close frame, whatever
//! closes the session: rate limit (4101), kick (4009), token expiry (4001),
//! slow consumer (4100). (Shutdown has its own test in `shutdown.rs`.)
//!
//! Each test floods a room with pipelined sends, reading concurrently, until
//! the server closes the socket; then every seq stored in the room (it has
//! no other writer) must have been acked before the close frame.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use switchboard::history::Backend as _;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use protocol::{ClientRequest, Request, ServerFrame};
use serde_json::json as j;
use switchboard::auth::now_unix;
use switchboard::config::{Rate, Secret};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, DEADLINE, Fixture, TestServer, json, request_with};

pub const SECRET: &str = "closing-test-secret-of-at-least-32-bytes";

/// Most sends one flood makes; it stops earlier when the socket closes.
const MAX_SENDS: u64 = 100_000;

fn token(user: &str, exp: u64) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &j!({"sub": user, "exp": exp, "grants": ["*:rw"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

pub async fn connect_bearer(server: &TestServer, token: &str) -> Client {
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let request = request_with(&url, &[("authorization", &format!("Bearer {token}"))]);
    let mut c = server.connect_request(request).await.expect("upgrade");
    assert!(matches!(c.recv().await, ServerFrame::Welcome { .. }));
    c
}

/// What a flood saw: the acked seqs and the close code.
struct Flooded {
    acked: BTreeSet<u64>,
    close: u16,
}

/// Sends to `room` from `client` as fast as the socket takes them while
/// reading every reply, until the server closes. `started` fires once
/// `after` acks have arrived.
async fn flood_until_close(
    client: Client,
    room: &str,
    after: usize,
    started: Option<oneshot::Sender<()>>,
) -> Flooded {
    let (mut sink, mut stream) = client.ws.split();
    let stop = Arc::new(AtomicBool::new(false));
    let sending = {
        let (stop, room) = (stop.clone(), room.to_owned());
        tokio::spawn(async move {
            // Ids from 1000, clear of those the client used before.
            for n in 1000..1000 + MAX_SENDS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let text = Request {
                    id: Some(n),
                    body: ClientRequest::Send {
                        room: room.clone(),
                        body: json(&n.to_string()),
                        key: None,
                    },
                }
                .to_json();
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            sink
        })
    };
    let mut started = started;
    let mut acked = BTreeSet::new();
    let close = loop {
        let msg = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("a frame within the deadline");
        match msg {
            Some(Ok(Message::Text(t))) => match ServerFrame::from_json(t.as_str()) {
                Ok(ServerFrame::Ack { seq, .. }) => {
                    assert!(acked.insert(seq), "seq {seq} acked twice");
                    if acked.len() >= after {
                        if let Some(go) = started.take() {
                            let _ = go.send(());
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("bad server frame {t}: {e}"),
            },
            Some(Ok(Message::Close(frame))) => {
                break u16::from(frame.expect("a close frame with a code").code);
            }
            Some(Ok(_)) => {}
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    };
    stop.store(true, Ordering::Relaxed);
    // The sender may be blocked on a socket the server no longer reads.
    sending.abort();
    let _ = sending.await;
    Flooded { acked, close }
}

/// Checks that every message stored in `room` was acked: the room has no
/// other writer, so its seqs are exactly 1..=latest. `barrier` commits a
/// message after everything the flood queued (the writer is FIFO), so no
/// append of the flood is still on its way.
async fn every_stored_send_was_acked(
    server: &TestServer,
    barrier: &mut Client,
    room: &str,
    f: &Flooded,
) {
    barrier.join("barrier").await;
    barrier.say("barrier", "\"after the flood\"").await;
    let latest = server.state.store.latest_seq(room).await.expect("read");
    assert!(latest > 0, "nothing was stored");
    let stored: BTreeSet<u64> = (1..=latest).collect();
    let missing: Vec<u64> = stored.difference(&f.acked).copied().collect();
    assert!(
        missing.is_empty(),
        "{} of {latest} stored sends got no ack before the close frame (first: {:?})",
        missing.len(),
        missing.first()
    );
    assert_eq!(f.acked, stored, "an ack for a seq that is not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_close_acks_every_stored_send() {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.auth_hs256_secret = Some(Secret::new(SECRET));
        c.handshake_rate_per_ip = Rate::OFF;
        c.send_rate_per_session = Rate::new(1, 50);
        c.rate_limit_strikes = 5;
    })
    .await;
    let mut flood = connect_bearer(&server, &token("flood", now_unix() + 3600)).await;
    flood.join("limited").await;
    let f = flood_until_close(flood, "limited", 0, None).await;
    assert_eq!(f.close, protocol::close::RATE_LIMITED.code);
    let mut barrier = connect_bearer(&server, &token("barrier", now_unix() + 3600)).await;
    every_stored_send_was_acked(&server, &mut barrier, "limited", &f).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_acks_every_stored_send() {
    let server = crate::admin::start_with(|_| {}).await;
    let admin = crate::admin::admin_addr(&server);
    let mut flood = server.connect("kicked").await;
    flood.join("kick").await;
    let (go, started) = oneshot::channel();
    let flooding =
        tokio::spawn(async move { flood_until_close(flood, "kick", 20, Some(go)).await });
    started.await.expect("acks arrive");
    let r = crate::admin::call(admin, "POST", "/admin/api/users/kicked/kick", None).await;
    assert_eq!(r.status, 200);
    let f = flooding.await.expect("flood");
    assert_eq!(f.close, protocol::close::KICKED.code);
    let mut barrier = server.connect("barrier").await;
    every_stored_send_was_acked(&server, &mut barrier, "kick", &f).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_acks_every_stored_send() {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.auth_hs256_secret = Some(Secret::new(SECRET));
        c.handshake_rate_per_ip = Rate::OFF;
        c.send_rate_per_session = Rate::OFF;
        c.send_rate_per_user = Rate::OFF;
        c.auth_leeway_secs = 0;
    })
    .await;
    // Expires within two seconds, while the flood runs.
    let mut flood = connect_bearer(&server, &token("expiring", now_unix() + 2)).await;
    flood.join("expiry").await;
    let f = flood_until_close(flood, "expiry", 0, None).await;
    assert_eq!(f.close, protocol::close::UNAUTHORIZED.code);
    let mut barrier = connect_bearer(&server, &token("barrier", now_unix() + 3600)).await;
    every_stored_send_was_acked(&server, &mut barrier, "expiry", &f).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_close_acks_every_stored_send() {
    // One message larger than the queue's hard cap closes every member of
    // its room as a slow consumer at once, however fast it reads.
    const CAP: usize = 64 * 1024;
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.max_message_bytes = 4 * CAP;
        c.outbound_queue_bytes = CAP / 2;
        c.outbound_queue_max_bytes = CAP;
        c.send_rate_per_user = Rate::OFF;
    })
    .await;
    let mut flood = server.connect("flooder").await;
    flood.join("own").await;
    flood.join("big").await;
    let mut noisy = server.connect("noisy").await;
    noisy.join("big").await;
    let (go, started) = oneshot::channel();
    let flooding = tokio::spawn(async move { flood_until_close(flood, "own", 20, Some(go)).await });
    started.await.expect("acks arrive");
    let big = json(&format!("\"{}\"", "x".repeat(2 * CAP)));
    noisy
        .send(ClientRequest::Send {
            room: "big".into(),
            body: big,
            key: None,
        })
        .await;
    let f = flooding.await.expect("flood");
    assert_eq!(f.close, protocol::close::SLOW_CONSUMER.code);
    let mut barrier = server.connect("barrier").await;
    every_stored_send_was_acked(&server, &mut barrier, "own", &f).await;
    server.stop().await;
}
