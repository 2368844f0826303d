//! The gateway's limits: path, identity, connection cap, handshake timeout,
//! heartbeat, and the plain listener.

use protocol::{ServerFrame, close};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{Fixture, TestServer};

fn http_status(e: WsError) -> u16 {
    http_refusal(e).0
}

/// The status of an HTTP refusal and its `Retry-After`, if any.
fn http_refusal(e: WsError) -> (u16, Option<String>) {
    match e {
        WsError::Http(response) => (
            response.status().as_u16(),
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refusals_have_http_statuses() {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.max_connections = 2;
        c.refusal_retry_after_secs = 3;
    })
    .await;
    let port = server.addr.port();
    let e = server
        .connect_raw(&format!("wss://localhost:{port}/other?user=a"))
        .await
        .err()
        .expect("refused");
    assert_eq!(http_status(e), 404);
    let e = server
        .connect_raw(&format!("wss://localhost:{port}/ws"))
        .await
        .err()
        .expect("refused");
    assert_eq!(http_status(e), 401);
    let e = server
        .connect_raw(&format!("wss://localhost:{port}/ws?user=no%20spaces"))
        .await
        .err()
        .expect("refused");
    assert_eq!(http_status(e), 400);

    // Two connections fill the cap; the third gets 503, with the
    // configured Retry-After; after one leaves, room again.
    let a = server.connect("a").await;
    let _b = server.connect("b").await;
    let e = server
        .connect_raw(&server.url("c"))
        .await
        .err()
        .expect("refused");
    assert_eq!(http_refusal(e), (503, Some("3".to_owned())));
    drop(a);
    server
        .wait_for("the closed connection to be released", |s| {
            s.metrics.connections_open.get() == 1
        })
        .await;
    let _c = server.connect("c").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_handshake_is_dropped_at_the_timeout() {
    let server = TestServer::start_with(Fixture::new(), |c| c.handshake_timeout_ms = 300).await;
    // A slowloris: TCP connects, sends half a TLS hello, then nothing.
    let mut tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    tcp.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(
        crate::support::DEADLINE,
        tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
    )
    .await
    .expect("the server hangs up within the deadline");
    assert!(matches!(n, Ok(0) | Err(_)), "connection closed, got {n:?}");
    server
        .wait_for("a counted handshake failure", |s| {
            s.metrics.handshake_failures.get() == 1
        })
        .await;
    // Others are still served.
    let _ok = server.connect("ok").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_after_two_heartbeats() {
    let server = TestServer::start_with(Fixture::new(), |c| c.heartbeat_interval_ms = 100).await;
    let mut quiet = server
        .connect_raw(&server.url("quiet"))
        .await
        .expect("connect");
    // The client library answers pings only while it reads; not reading at
    // all makes it silent. Hold off reading until the server gives up.
    server
        .wait_for("the heartbeat close", |s| {
            s.metrics
                .closed_for(switchboard::session::CloseReason::HeartbeatTimeout)
                == 1
        })
        .await;
    let frame = loop {
        match quiet.recv_raw().await {
            Some(tokio_tungstenite::tungstenite::Message::Close(f)) => break f,
            Some(_) => continue,
            None => panic!("no close frame"),
        }
    };
    assert_eq!(
        frame.expect("frame").code,
        CloseCode::from(close::HEARTBEAT_TIMEOUT.code)
    );
    // Others are unaffected.
    let mut other = server.connect("other").await;
    let pong = other.request(protocol::ClientRequest::Ping).await;
    assert!(matches!(pong, ServerFrame::Pong { .. }));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listener_serves_the_same_protocol() {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.plain_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let addr = server.plain_addr.expect("plain listener");
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/ws?user=plain"),
        tokio::net::TcpStream::connect(addr).await.expect("connect"),
    )
    .await
    .expect("upgrade");
    use futures_util::StreamExt;
    let first = ws.next().await.expect("frame").expect("ok");
    let welcome = ServerFrame::from_json(first.to_text().expect("text")).expect("frame");
    assert!(matches!(welcome, ServerFrame::Welcome { ref user, .. } if user == "plain"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_in_the_upgrade_url_are_joined_as_the_session_starts() {
    let server = TestServer::start_with(Fixture::new(), |c| c.max_rooms_per_session = 3).await;
    let mut bob = server.connect("bob").await;
    bob.join("a").await;
    // A repeated room counts once; another user's direct-message room is
    // refused like a `join` frame would be, without ending the session.
    let url = format!(
        "{}&join=a&join=b&join=a&join=dm:bob:carol",
        server.url("eve")
    );
    let mut eve = server.connect_raw(&url).await.expect("connect");
    assert!(matches!(eve.recv().await, ServerFrame::Welcome { .. }));
    match eve.recv().await {
        ServerFrame::Joined {
            id, room, presence, ..
        } => {
            assert_eq!((id, room.as_str()), (None, "a"));
            assert!(presence.iter().any(|u| u == "bob"), "{presence:?}");
        }
        other => panic!("expected joined a, got {other:?}"),
    }
    match eve.recv().await {
        ServerFrame::Joined { id, room, .. } => assert_eq!((id, room.as_str()), (None, "b")),
        other => panic!("expected joined b, got {other:?}"),
    }
    match eve.recv().await {
        ServerFrame::Error { id, code, .. } => {
            assert_eq!((id, code), (None, protocol::ErrorCode::Forbidden));
        }
        other => panic!("expected a forbidden error, got {other:?}"),
    }
    bob.say("a", r#""hi""#).await;
    let m = eve.next_message("a").await;
    assert!(
        matches!(m, ServerFrame::Message { ref from, .. } if from == "bob"),
        "{m:?}"
    );

    // A bad name, or more rooms than a session may join, refuses the upgrade.
    let bad = format!("{}&join=no%20spaces", server.url("eve"));
    let e = server.connect_raw(&bad).await.err().expect("refused");
    assert_eq!(http_status(e), 400);
    let many = format!("{}&join=a&join=b&join=c&join=d", server.url("eve"));
    let e = server.connect_raw(&many).await.err().expect("refused");
    assert_eq!(http_status(e), 400);
    server.stop().await;
}
