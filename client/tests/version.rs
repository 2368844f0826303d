//! A `welcome` of another protocol version (PROTOCOL.md §11): the client
//! closes the session with 1000 and stops, saying why. The real server
//! speaks only its own version, so a few lines of tokio-tungstenite play
//! a server of the next one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use switchboard_client::{Client, Disconnect, Options, State};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn another_major_version_closes_with_1000_and_stops() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let next = protocol::PROTOCOL_VERSION + 1;
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let welcome = format!(
            r#"{{"type":"welcome","session":"s","user":"alice","heartbeat_ms":25000,"server":"future","protocol":{next}}}"#
        );
        ws.send(Message::Text(welcome.into()))
            .await
            .expect("welcome");
        // The client's close frame, past any request it pipelined.
        while let Some(msg) = ws.next().await {
            if let Message::Close(frame) = msg.expect("frame") {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    });
    let (client, _events) =
        Client::start(Options::new(format!("ws://127.0.0.1:{port}/ws?user=alice")));
    let mut state = client.state();
    let stopped = tokio::time::timeout(
        DEADLINE,
        state.wait_for(|s| matches!(s, State::Disconnected { retry_in: None, .. })),
    )
    .await
    .expect("the client stops")
    .expect("state")
    .clone();
    match stopped {
        State::Disconnected {
            reason: Disconnect::ProtocolMismatch { server, client },
            ..
        } => assert_eq!((server, client), (next, protocol::PROTOCOL_VERSION)),
        other => panic!("stopped for another reason: {other:?}"),
    }
    let code = tokio::time::timeout(DEADLINE, server)
        .await
        .expect("the close reaches the server")
        .expect("server task");
    assert_eq!(code, Some(1000));
    client.close().await;
}
