//! Draining a node: `POST /admin/api/drain` turns readiness off, stops
//! new connections and closes every session with 4200 (reconnect at once,
//! elsewhere) after the acks of the sends it had accepted.

use protocol::{ClientRequest, ServerFrame};
use switchboard::history::Backend as _;

use crate::admin::{self, admin_addr, call};
use crate::support::json;

#[tokio::test]
async fn a_drain_closes_every_session_with_4200_after_its_acks_and_refuses_new_ones() {
    let server = admin::start_with(|c| c.drain_window_ms = 300).await;
    let admin = admin_addr(&server);
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut c = server.connect(&format!("u{i}")).await;
        c.join("lobby").await;
        clients.push(c);
    }
    assert_eq!(admin::get(admin, "/readyz").await.status, 200);

    // Each client has a send in flight when the drain begins.
    let mut pending = Vec::new();
    for c in &mut clients {
        pending.push(
            c.send(ClientRequest::Send {
                room: "lobby".into(),
                body: json(r#""last words""#),
                key: None,
            })
            .await,
        );
    }
    let reply = call(admin, "POST", "/admin/api/drain", None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["started"], true);
    assert_eq!(
        call(admin, "POST", "/admin/api/drain", None).await.json()["started"],
        false,
        "a second drain changes nothing"
    );
    assert_eq!(admin::get(admin, "/readyz").await.status, 503);

    for (c, id) in clients.iter_mut().zip(pending) {
        let ack = c
            .recv_where(|f| matches!(f, ServerFrame::Ack { id: i, .. } if *i == Some(id)))
            .await;
        assert!(matches!(ack, ServerFrame::Ack { .. }));
        let close = c.expect_close().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 4200, "{close:?}");
    }
    assert!(
        server.connect_raw(&server.url("late")).await.is_err(),
        "a draining node takes no new connections"
    );
    let page = server
        .state
        .store
        .history("lobby", None, None, 50)
        .await
        .expect("read");
    assert_eq!(page.messages.len(), 10, "every acked send is stored");
}
