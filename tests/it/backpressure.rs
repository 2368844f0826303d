//! A slow consumer never slows the publisher or anyone else, is closed with
//! 4100 instead of losing messages silently, and resumes by seq.

use protocol::{ClientRequest, ServerFrame, close};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{Fixture, TestServer, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_off_and_resumes_without_loss() {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.outbound_queue_bytes = 4 * 1024 * 1024;
        c.replay_cap = 10_000;
        // The close frame waits behind the unread backlog until the slow
        // reader reads below; on a loaded machine publishing everything can
        // take longer than the default 10 s write deadline, after which the
        // server would rightly drop the socket without a close frame.
        c.write_timeout_ms = 120_000;
    })
    .await;
    let mut slow = crate::support::connect_tls_small_rcvbuf(
        server.addr,
        &server.fixture.tls_connector(),
        &server.url("slow"),
    )
    .await
    .expect("connect");
    assert!(matches!(slow.recv().await, ServerFrame::Welcome { .. }));
    let ServerFrame::Joined { epoch, .. } = slow.join("busy").await else {
        panic!("join answered");
    };
    let mut fast = server.connect("fast").await;
    fast.join("busy").await;
    let mut publisher = server.connect("pub").await;
    publisher.join("busy").await;

    // 24 MiB in 16 KiB messages: more than the slow client's tiny receive
    // buffer, the server's send buffer (at most 4 MiB here) and its 4 MiB
    // outbox hold, so its writes block and its outbox overflows.
    const N: u64 = 1536;
    let body = json(&format!("\"{}\"", "x".repeat(16 * 1024)));
    // The fast reader reads concurrently and gets everything, in order.
    let fast_reader = tokio::spawn(async move {
        for seq in 1..=N {
            let m = fast.next_message("busy").await;
            assert!(matches!(m, ServerFrame::Message { seq: s, .. } if s == seq));
        }
    });
    // The publisher keeps 32 sends in flight and reads its own echoes too.
    // It is never held up: every send is acked.
    let (mut sent, mut acked) = (0, 0);
    while acked < N {
        while sent < N && sent - acked < 32 {
            publisher
                .send(ClientRequest::Send {
                    room: "busy".into(),
                    body: body.clone(),
                    key: None,
                })
                .await;
            sent += 1;
        }
        if let ServerFrame::Ack { .. } = publisher.recv().await {
            acked += 1;
        }
    }
    fast_reader
        .await
        .expect("fast reader got every message in order");
    server
        .wait_for("a slow consumer", |s| s.metrics.slow_consumers.get() >= 1)
        .await;

    // The slow reader now reads what reached it: a gap-free prefix, then 4100.
    let mut last = 0;
    let close_frame = loop {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let msg = tokio::time::timeout(crate::support::DEADLINE, slow.ws.next())
            .await
            .expect("frames within the deadline");
        match msg {
            Some(Ok(Message::Text(t))) => {
                if let Ok(ServerFrame::Message { seq, .. }) = ServerFrame::from_json(t.as_str()) {
                    assert_eq!(seq, last + 1, "gap before the cut-off");
                    last = seq;
                }
            }
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(
        close_frame.expect("close frame").code,
        CloseCode::from(close::SLOW_CONSUMER.code)
    );
    assert!(last < N, "the slow reader was cut off before the end");

    // Resume by seq: everything after `last` is replayed.
    let mut again = server.connect("slow").await;
    let joined = again
        .request(ClientRequest::Join {
            room: "busy".into(),
            since: Some(last),
            epoch: Some(epoch),
        })
        .await;
    assert!(
        matches!(
            joined,
            ServerFrame::Joined {
                recovered: Some(true),
                seq: N,
                ..
            }
        ),
        "{joined:?}"
    );
    for seq in last + 1..=N {
        let m = again.next_message("busy").await;
        assert!(matches!(m, ServerFrame::Message { seq: s, replay: true, .. } if s == seq));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_events_are_shed_before_messages() {
    // A tiny queue: typing floods overflow it, but the session stays open
    // and its messages still arrive.
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.outbound_queue_frames = 4;
    })
    .await;
    let mut watcher = server.connect("watcher").await;
    watcher.join("t").await;
    let mut typist = server.connect("typist").await;
    typist.join("t").await;
    for _ in 0..2000 {
        typist
            .send(ClientRequest::Typing { room: "t".into() })
            .await;
    }
    let seq = typist.say("t", "1").await;
    let m = watcher.next_message("t").await;
    assert!(matches!(m, ServerFrame::Message { seq: s, .. } if s == seq));
    assert_eq!(server.state.metrics.slow_consumers.get(), 0);
    server.stop().await;
}
