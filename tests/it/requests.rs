//! Requests on one socket: replies in request order with read-your-writes,
//! and the smaller request rules (history limits, write-only grants,
//! `since` without `epoch`).

use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use protocol::{ClientRequest, ErrorCode, Request, ServerFrame};
use serde_json::json as j;
use switchboard::auth::now_unix;
use switchboard::config::{Rate, Secret};
use switchboard::history::Backend as _;
use tokio_tungstenite::tungstenite::Message;

use crate::closing::{SECRET, connect_bearer};
use crate::support::{Client, Fixture, TestServer, frame_id, json};

/// Writes `requests` with ids 1.. in one go, without waiting for replies.
async fn pipeline(client: &mut Client, requests: Vec<ClientRequest>) {
    for (n, body) in (1u64..).zip(requests) {
        let text = Request { id: Some(n), body }.to_json();
        client
            .ws
            .feed(Message::Text(text.into()))
            .await
            .expect("feed");
    }
    client.ws.flush().await.expect("flush");
}

/// The next `count` replies (frames with an id), with the room traffic
/// read meanwhile.
async fn replies(client: &mut Client, count: usize) -> (Vec<ServerFrame>, Vec<ServerFrame>) {
    let (mut replies, mut traffic) = (Vec::new(), Vec::new());
    while replies.len() < count {
        let f = client.recv().await;
        if frame_id(&f).is_some() {
            replies.push(f);
        } else {
            traffic.push(f);
        }
    }
    (replies, traffic)
}

fn send(room: &str, text: &str) -> ClientRequest {
    ClientRequest::Send {
        room: room.into(),
        body: json(text),
        key: None,
    }
}

fn history(room: &str, limit: Option<u32>) -> ClientRequest {
    ClientRequest::History {
        room: room.into(),
        before: None,
        after: None,
        limit,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_in_request_order_and_reads_see_earlier_sends() {
    let server = TestServer::start().await;
    let mut c = server.connect("alice").await;
    c.join("r").await;
    // The join above took id 1 of the client's own counter; these reuse
    // ids from 1, which the checks below read in order.
    pipeline(
        &mut c,
        vec![
            send("r", "1"),
            send("r", "2"),
            ClientRequest::Ping,
            history("r", None),
            send("r", "3"),
            ClientRequest::Leave { room: "r".into() },
            ClientRequest::Join {
                room: "r".into(),
                since: Some(2),
                epoch: Some(server.state.store.epoch().to_owned()),
            },
        ],
    )
    .await;
    let (replies, _) = replies(&mut c, 7).await;
    let ids: Vec<Option<u64>> = replies.iter().map(frame_id).collect();
    assert_eq!(ids, (1..=7).map(Some).collect::<Vec<_>>(), "{replies:?}");
    assert!(matches!(replies[0], ServerFrame::Ack { seq: 1, .. }));
    assert!(matches!(replies[1], ServerFrame::Ack { seq: 2, .. }));
    assert!(matches!(replies[2], ServerFrame::Pong { .. }));
    match &replies[3] {
        ServerFrame::History { messages, .. } => {
            let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, [1, 2], "history sees the sends before it");
        }
        other => panic!("expected history, got {other:?}"),
    }
    assert!(matches!(replies[4], ServerFrame::Ack { seq: 3, .. }));
    assert!(matches!(replies[5], ServerFrame::Left { .. }));
    assert!(
        matches!(
            replies[6],
            ServerFrame::Joined {
                seq: 3,
                recovered: Some(true),
                ..
            }
        ),
        "the resume sees the send before it: {:?}",
        replies[6]
    );
    let replayed = c.next_message("r").await;
    assert!(
        matches!(
            replayed,
            ServerFrame::Message {
                seq: 3,
                replay: true,
                ..
            }
        ),
        "{replayed:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_waits_for_the_acks_before_it() {
    let server = TestServer::start().await;
    let mut c = server.connect("bob").await;
    c.join("r").await;
    pipeline(
        &mut c,
        vec![
            send("r", "1"),
            send("elsewhere", "2"),
            send("r", "3"),
            ClientRequest::Typing {
                room: "elsewhere".into(),
            },
        ],
    )
    .await;
    let (replies, _) = replies(&mut c, 4).await;
    assert!(matches!(replies[0], ServerFrame::Ack { id: Some(1), .. }));
    assert!(matches!(
        replies[1],
        ServerFrame::Error {
            id: Some(2),
            code: ErrorCode::NotJoined,
            ..
        }
    ));
    assert!(matches!(replies[2], ServerFrame::Ack { id: Some(3), .. }));
    assert!(matches!(
        replies[3],
        ServerFrame::Error {
            id: Some(4),
            code: ErrorCode::NotJoined,
            ..
        }
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_limit_above_the_maximum_is_clamped() {
    let server = TestServer::start_with(Fixture::new(), |c| c.history_max_limit = 2).await;
    let mut c = server.connect("carol").await;
    c.join("h").await;
    for i in 0..3 {
        c.say("h", &i.to_string()).await;
    }
    let text = r#"{"type":"history","id":99,"room":"h","limit":1000000000000}"#;
    c.send_text(text).await;
    match c.reply_to(99).await {
        ServerFrame::History { messages, more, .. } => {
            let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
            assert_eq!((seqs, more), (vec![2, 3], true));
        }
        other => panic!("expected a clamped page, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_with_since_but_no_epoch_is_refused() {
    let server = TestServer::start().await;
    let mut c = server.connect("dave").await;
    let reply = c
        .request(ClientRequest::Join {
            room: "e".into(),
            since: Some(0),
            epoch: None,
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{reply:?}"
    );
    // It joined nothing: a send is not_joined.
    let reply = c.request(send("e", "1")).await;
    assert!(matches!(
        reply,
        ServerFrame::Error {
            code: ErrorCode::NotJoined,
            ..
        }
    ));
    server.stop().await;
}

fn token(user: &str, grants: &[&str]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &j!({"sub": user, "exp": now_unix() + 3600, "grants": grants}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_only_grant_publishes_without_joining() {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.auth_hs256_secret = Some(Secret::new(SECRET));
        c.handshake_rate_per_ip = Rate::OFF;
    })
    .await;
    let mut reader = connect_bearer(&server, &token("reader", &["news:r"])).await;
    reader.join("news").await;
    let mut bot = connect_bearer(&server, &token("bot", &["news:w"])).await;
    // Reading is refused: join and history.
    for request in [
        ClientRequest::Join {
            room: "news".into(),
            since: None,
            epoch: None,
        },
        history("news", None),
    ] {
        let reply = bot.request(request).await;
        assert!(
            matches!(
                reply,
                ServerFrame::Error {
                    code: ErrorCode::Forbidden,
                    ..
                }
            ),
            "{reply:?}"
        );
    }
    // Sending works without a join, and members receive it.
    let seq = bot.say("news", "\"extra\"").await;
    let m = reader.next_message("news").await;
    assert!(
        matches!(m, ServerFrame::Message { seq: s, ref from, .. } if s == seq && from == "bot")
    );
    // Outside its grant, and with a bad room name, it is still refused.
    let reply = bot.request(send("sports", "1")).await;
    assert!(matches!(
        reply,
        ServerFrame::Error {
            code: ErrorCode::Forbidden,
            ..
        }
    ));
    // A read-write grant still needs a join to send.
    let mut rw = connect_bearer(&server, &token("rw", &["news:rw"])).await;
    let reply = rw.request(send("news", "1")).await;
    assert!(matches!(
        reply,
        ServerFrame::Error {
            code: ErrorCode::NotJoined,
            ..
        }
    ));
    server.stop().await;
}
