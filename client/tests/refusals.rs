//! A join refused with `unavailable` (in cluster mode, a room whose stream
//! cannot be read yet) goes out again after `retry_after_ms`, on the same
//! connection, and the application's `join` resolves (PROTOCOL.md §5). A
//! single server never refuses a join so, so a few lines of
//! tokio-tungstenite play a cluster node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{ClientRequest, ServerFrame, decode_request};
use switchboard_client::{Client, Options, State};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_join_refused_as_unavailable_is_retried_on_the_same_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let welcome = format!(
            r#"{{"type":"welcome","session":"s","user":"alice","heartbeat_ms":25000,"server":"fake","protocol":{}}}"#,
            protocol::PROTOCOL_VERSION
        );
        ws.send(Message::Text(welcome.into()))
            .await
            .expect("welcome");
        let mut joins = 0;
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else { continue };
            let request = decode_request(text.as_str(), 32).expect("a request");
            let ClientRequest::Join { room, .. } = request.body else {
                continue;
            };
            joins += 1;
            let reply = if joins == 1 {
                ServerFrame::Error {
                    id: request.id,
                    code: protocol::ErrorCode::Unavailable,
                    message: "the stream cannot be read now".into(),
                    retry_after_ms: Some(30),
                }
            } else {
                ServerFrame::Joined {
                    id: request.id,
                    room,
                    seq: 0,
                    epoch: "e".into(),
                    count: 1,
                    presence: vec!["alice".into()],
                    recovered: None,
                }
            };
            ws.send(Message::Text(reply.to_json().into()))
                .await
                .expect("reply");
        }
        // Until the client closes: the connection was never given up.
        joins
    });
    let (client, _events) =
        Client::start(Options::new(format!("ws://127.0.0.1:{port}/ws?user=alice")));
    let joined = tokio::time::timeout(DEADLINE, client.join("general"))
        .await
        .expect("the join resolves")
        .expect("joined, not refused");
    assert_eq!(joined.room, "general");
    assert!(matches!(*client.state().borrow(), State::Connected { .. }));
    client.close().await;
    let joins = tokio::time::timeout(DEADLINE, server)
        .await
        .expect("server done")
        .expect("server task");
    assert_eq!(joins, 2, "one refusal, one retry");
}
