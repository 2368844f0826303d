//! Chatting, history, resume, idempotency and the answers to bad input.

use protocol::{ClientRequest, ErrorCode, ServerFrame, close};
use switchboard::history::Backend as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

use crate::support::{TestServer, json};

fn join(room: &str, since: Option<u64>) -> ClientRequest {
    ClientRequest::Join {
        room: room.into(),
        since,
        epoch: None,
    }
}

fn message_seq(f: &ServerFrame) -> u64 {
    match f {
        ServerFrame::Message { seq, .. } => *seq,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_chat() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let mut carol = server.connect("carol").await;
    alice.join("general").await;
    bob.join("general").await;
    let joined = carol.join("general").await;
    let ServerFrame::Joined {
        presence, count, ..
    } = joined
    else {
        unreachable!()
    };
    assert_eq!(presence, vec!["alice", "bob", "carol"]);
    assert_eq!(count, 3);

    let s1 = alice.say("general", r#"{"text":"hi from alice"}"#).await;
    let s2 = bob.say("general", r#"{"text":"hi from bob"}"#).await;
    let s3 = carol.say("general", r#""plain string body""#).await;
    assert_eq!((s1, s2, s3), (1, 2, 3));

    for client in [&mut alice, &mut bob, &mut carol] {
        let mut seen = Vec::new();
        for _ in 0..3 {
            match client.next_message("general").await {
                ServerFrame::Message {
                    seq,
                    from,
                    body,
                    replay,
                    ..
                } => {
                    assert!(!replay);
                    seen.push((seq, from, body.get().to_owned()));
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            seen,
            vec![
                (
                    1,
                    "alice".to_owned(),
                    r#"{"text":"hi from alice"}"#.to_owned()
                ),
                (2, "bob".to_owned(), r#"{"text":"hi from bob"}"#.to_owned()),
                (3, "carol".to_owned(), r#""plain string body""#.to_owned()),
            ]
        );
    }
    server.stop().await;
}

/// A client need not wait for `welcome`: requests sent with the upgrade's
/// first bytes are answered after it, in order (PROTOCOL.md §2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_before_welcome_are_answered_after_it_in_order() {
    let server = TestServer::start().await;
    let mut eve = server
        .connect_raw(&server.url("eve"))
        .await
        .expect("connect");
    let join_id = eve.send(join("early", None)).await;
    let send_id = eve
        .send(ClientRequest::Send {
            room: "early".into(),
            body: json(r#""first""#),
            key: None,
        })
        .await;
    assert!(matches!(eve.recv().await, ServerFrame::Welcome { .. }));
    match eve.recv().await {
        ServerFrame::Joined { id, seq, .. } => {
            assert_eq!((id, seq), (Some(join_id), 0));
        }
        other => panic!("expected joined, got {other:?}"),
    }
    let ack = eve.reply_to(send_id).await;
    assert!(matches!(ack, ServerFrame::Ack { seq: 1, .. }), "{ack:?}");
    assert_eq!(message_seq(&eve.next_message("early").await), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_typing_and_second_sessions() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut alice2 = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("room").await;
    bob.join("room").await;
    // Presence is batched per interval: bob's arrival may share an event
    // with alice's own.
    let p = alice
        .recv_where(|f| matches!(f, ServerFrame::Presence { joined, .. } if joined.iter().any(|u| u == "bob")))
        .await;
    let ServerFrame::Presence { room, left, .. } = p else {
        unreachable!("matched a presence event")
    };
    assert_eq!(room, "room");
    assert!(left.is_empty(), "{left:?}");

    // A second session of alice is not a new member: bob sees no presence event.
    alice2.join("room").await;
    bob.send(ClientRequest::Typing {
        room: "room".into(),
    })
    .await;
    // Typing reaches alice's sessions, and never the typer itself.
    for c in [&mut alice, &mut alice2] {
        let t = c
            .recv_where(|f| matches!(f, ServerFrame::Typing { .. }))
            .await;
        assert_eq!(
            t,
            ServerFrame::Typing {
                room: "room".into(),
                count: 1,
                users: vec!["bob".into()]
            }
        );
    }
    // The sender's other session gets its message too.
    let seq = alice.say("room", "1").await;
    assert_eq!(message_seq(&alice2.next_message("room").await), seq);
    assert_eq!(message_seq(&bob.next_message("room").await), seq);

    // Leaving with one of two sessions keeps alice present; the last one leaves.
    let left = alice
        .request(ClientRequest::Leave {
            room: "room".into(),
        })
        .await;
    assert!(matches!(left, ServerFrame::Left { .. }), "{left:?}");
    // Carol arrives after that leave, so a presence change from the leave
    // would reach bob no later than hers: none says alice left.
    let mut carol = server.connect("carol").await;
    carol.join("room").await;
    loop {
        let p = bob
            .recv_where(|f| matches!(f, ServerFrame::Presence { .. }))
            .await;
        let ServerFrame::Presence { joined, left, .. } = p else {
            unreachable!("matched a presence event")
        };
        assert!(!left.iter().any(|u| u == "alice"), "alice is still here");
        if joined.iter().any(|u| u == "carol") {
            break;
        }
    }
    drop(alice2);
    let p = bob
        .recv_where(|f| matches!(f, ServerFrame::Presence { left, .. } if !left.is_empty()))
        .await;
    assert_eq!(
        p,
        ServerFrame::Presence {
            room: "room".into(),
            count: 2,
            joined: vec![],
            left: vec!["alice".into()],
            truncated: false,
        }
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_both_ways() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("h").await;
    for i in 1..=25 {
        assert_eq!(alice.say("h", &i.to_string()).await, i);
    }
    let page = |before, after, limit| ClientRequest::History {
        room: "h".into(),
        before,
        after,
        limit,
    };
    let seqs = |f: ServerFrame| match f {
        ServerFrame::History { messages, more, .. } => {
            (messages.iter().map(|m| m.seq).collect::<Vec<_>>(), more)
        }
        other => panic!("{other:?}"),
    };
    // The latest page, then backwards until the start.
    let (s, more) = seqs(alice.request(page(None, None, Some(10))).await);
    assert_eq!((s.clone(), more), ((16..=25).collect(), true));
    let (s, more) = seqs(alice.request(page(Some(16), None, Some(10))).await);
    assert_eq!((s, more), ((6..=15).collect(), true));
    let (s, more) = seqs(alice.request(page(Some(6), None, Some(10))).await);
    assert_eq!((s, more), ((1..=5).collect(), false));
    // Forwards from a seq.
    let (s, more) = seqs(alice.request(page(None, Some(20), Some(10))).await);
    assert_eq!((s, more), ((21..=25).collect(), false));
    let (s, more) = seqs(alice.request(page(None, Some(0), Some(3))).await);
    assert_eq!((s, more), (vec![1, 2, 3], true));
    // Limits above the maximum are clamped, not refused.
    let (s, _) = seqs(alice.request(page(None, None, Some(100_000))).await);
    assert_eq!(s.len(), 25);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_another_client_sends_has_no_gap_and_no_duplicate() {
    let server = TestServer::start().await;
    let mut reader = server.connect("reader").await;
    reader.join("live").await;
    let mut writer = server.connect("writer").await;
    writer.join("live").await;
    for i in 0..20 {
        writer.say("live", &i.to_string()).await;
    }
    // The reader saw up to 20, then drops.
    let mut last = 0;
    while last < 20 {
        last = message_seq(&reader.next_message("live").await);
    }
    drop(reader);

    // The writer keeps sending without waiting for acks while the reader resumes.
    const TOTAL: u64 = 300;
    let sender = tokio::spawn(async move {
        for i in 0..TOTAL - 20 {
            writer
                .send(ClientRequest::Send {
                    room: "live".into(),
                    body: json(&i.to_string()),
                    key: None,
                })
                .await;
        }
        let mut acked = 0;
        while acked < TOTAL - 20 {
            if let ServerFrame::Ack { .. } = writer.recv().await {
                acked += 1;
            }
        }
        writer
    });
    let mut reader = server.connect("reader").await;
    let epoch = server.state.store.epoch().to_owned();
    let joined = reader
        .request(ClientRequest::Join {
            room: "live".into(),
            since: Some(20),
            epoch: Some(epoch),
        })
        .await;
    let ServerFrame::Joined {
        seq: hwm,
        recovered,
        ..
    } = joined
    else {
        panic!("{joined:?}")
    };
    assert_eq!(recovered, Some(true));
    let mut expected = 21;
    while expected <= TOTAL {
        let f = reader.next_message("live").await;
        let ServerFrame::Message { seq, replay, .. } = f else {
            unreachable!()
        };
        assert_eq!(seq, expected, "gap or duplicate");
        assert_eq!(
            replay,
            seq <= hwm,
            "replay flag marks exactly the replayed part"
        );
        expected += 1;
    }
    sender.await.expect("sender");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_is_all_or_nothing() {
    let server = TestServer::start_with(crate::support::Fixture::new(), |c| c.replay_cap = 5).await;
    let mut alice = server.connect("alice").await;
    alice.join("r").await;
    for i in 0..10 {
        alice.say("r", &i.to_string()).await;
    }
    let mut bob = server.connect("bob").await;
    // A gap of 9 is over the cap of 5: nothing is replayed.
    let f = bob
        .request(ClientRequest::Join {
            room: "r".into(),
            since: Some(1),
            epoch: Some(server.state.store.epoch().to_owned()),
        })
        .await;
    assert!(
        matches!(
            f,
            ServerFrame::Joined {
                recovered: Some(false),
                seq: 10,
                ..
            }
        ),
        "{f:?}"
    );
    // A stale epoch recovers nothing either.
    let mut carol = server.connect("carol").await;
    let f = carol
        .request(ClientRequest::Join {
            room: "r".into(),
            since: Some(8),
            epoch: Some("other".into()),
        })
        .await;
    assert!(
        matches!(
            f,
            ServerFrame::Joined {
                recovered: Some(false),
                ..
            }
        ),
        "{f:?}"
    );
    // Within the cap and the right epoch: recovered, and exactly the gap is replayed.
    let ServerFrame::Joined { epoch, .. } = f else {
        unreachable!()
    };
    let mut dave = server.connect("dave").await;
    let f = dave
        .request(ClientRequest::Join {
            room: "r".into(),
            since: Some(7),
            epoch: Some(epoch),
        })
        .await;
    assert!(
        matches!(
            f,
            ServerFrame::Joined {
                recovered: Some(true),
                ..
            }
        ),
        "{f:?}"
    );
    for seq in 8..=10 {
        let m = dave.next_message("r").await;
        assert!(matches!(m, ServerFrame::Message { replay: true, .. }));
        assert_eq!(message_seq(&m), seq);
    }
    // Bob, not recovered, got no replay: the next message he sees is live.
    let s = alice.say("r", "11").await;
    assert_eq!(message_seq(&bob.next_message("r").await), s);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_resend_stores_once() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("k").await;
    let send = || ClientRequest::Send {
        room: "k".into(),
        body: json(r#"{"n":1}"#),
        key: Some("msg-1".into()),
    };
    let first = alice.request(send()).await;
    let ServerFrame::Ack {
        seq,
        ts,
        duplicate: false,
        ..
    } = first
    else {
        panic!("{first:?}")
    };
    let again = alice.request(send()).await;
    assert_eq!(
        again,
        ServerFrame::Ack {
            id: crate::support::frame_id(&again),
            room: "k".into(),
            seq,
            ts,
            duplicate: true
        }
    );
    // Another user may use the same key.
    let mut bob = server.connect("bob").await;
    bob.join("k").await;
    let other = bob.request(send()).await;
    assert!(
        matches!(
            other,
            ServerFrame::Ack {
                duplicate: false,
                seq: 2,
                ..
            }
        ),
        "{other:?}"
    );
    let h = alice
        .request(ClientRequest::History {
            room: "k".into(),
            before: None,
            after: None,
            limit: None,
        })
        .await;
    let ServerFrame::History { messages, .. } = h else {
        panic!()
    };
    assert_eq!(messages.len(), 2);
    // The key survives a restart.
    let fixture = server.stop().await;
    let server = TestServer::start_with(fixture, |_| {}).await;
    let mut alice = server.connect("alice").await;
    alice.join("k").await;
    let again = alice.request(send()).await;
    assert!(
        matches!(
            again,
            ServerFrame::Ack {
                duplicate: true,
                seq: 1,
                ..
            }
        ),
        "{again:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_continues_seq_and_history() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("p").await;
    for i in 1..=5 {
        assert_eq!(alice.say("p", &i.to_string()).await, i);
    }
    let ServerFrame::Joined { epoch: epoch1, .. } = alice.join("p").await else {
        unreachable!()
    };
    drop(alice);
    let fixture = server.stop().await;
    let server = TestServer::start_with(fixture, |_| {}).await;
    let mut alice = server.connect("alice").await;
    let joined = alice.join("p").await;
    assert!(
        matches!(&joined, ServerFrame::Joined { seq: 5, epoch, .. } if *epoch == epoch1),
        "{joined:?}"
    );
    assert_eq!(alice.say("p", "6").await, 6);
    let h = alice
        .request(ClientRequest::History {
            room: "p".into(),
            before: None,
            after: None,
            limit: None,
        })
        .await;
    let ServerFrame::History { messages, .. } = h else {
        panic!()
    };
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_frames_and_the_session_stays_usable() {
    let server = TestServer::start().await;
    let mut c = server.connect("alice").await;
    let cases: &[(&str, ErrorCode, Option<u64>)] = &[
        ("{not json", ErrorCode::BadRequest, None),
        (
            r#"{"type":"dance","id":11}"#,
            ErrorCode::UnknownType,
            Some(11),
        ),
        (
            r#"{"type":"join","id":12}"#,
            ErrorCode::BadRequest,
            Some(12),
        ),
        (
            r#"{"type":"join","id":13,"room":"bad room!"}"#,
            ErrorCode::InvalidRoom,
            Some(13),
        ),
        (
            r#"{"type":"send","id":14,"room":"nojoin","body":1}"#,
            ErrorCode::NotJoined,
            Some(14),
        ),
        (
            r#"{"type":"leave","id":15,"room":"nojoin"}"#,
            ErrorCode::NotJoined,
            Some(15),
        ),
        (
            r#"{"type":"typing","id":16,"room":"nojoin"}"#,
            ErrorCode::NotJoined,
            Some(16),
        ),
        (r#"[1,2,3]"#, ErrorCode::BadRequest, None),
    ];
    // A room name one byte over the 128-byte limit.
    let long_room = format!(r#"{{"type":"join","id":17,"room":"{}"}}"#, "r".repeat(129));
    let long_case = [(long_room.as_str(), ErrorCode::InvalidRoom, Some(17))];
    for (text, code, id) in cases.iter().chain(long_case.iter()) {
        c.send_text(text).await;
        match c.recv().await {
            ServerFrame::Error {
                code: got,
                id: got_id,
                ..
            } => {
                assert_eq!((got, got_id), (*code, *id), "for {text}");
            }
            other => panic!("for {text}: {other:?}"),
        }
    }
    // Too deep a body and too long a key are refused as too_large.
    c.join("ok").await;
    let deep = format!(
        r#"{{"type":"send","id":20,"room":"ok","body":{}1{}}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    c.send_text(&deep).await;
    // Each limit names itself (defaults: depth 32, key 128 bytes).
    match c.recv().await {
        ServerFrame::Error {
            code: ErrorCode::TooLarge,
            id: Some(20),
            message,
            ..
        } => assert_eq!(message, "body is nested deeper than 32 levels"),
        other => panic!("deep body: {other:?}"),
    }
    let long_key = ClientRequest::Send {
        room: "ok".into(),
        body: json("1"),
        key: Some("k".repeat(200)),
    };
    match c.request(long_key).await {
        ServerFrame::Error {
            code: ErrorCode::TooLarge,
            message,
            ..
        } => assert_eq!(message, "`key` is longer than 128 bytes"),
        other => panic!("long key: {other:?}"),
    }
    // A binary frame gets a documented error and the session continues.
    c.ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .expect("send");
    assert!(matches!(
        c.recv().await,
        ServerFrame::Error {
            code: ErrorCode::BinaryUnsupported,
            ..
        }
    ));
    // Still usable: nothing above was stored.
    assert_eq!(c.say("ok", "1").await, 1);
    server.stop().await;
}

use futures_util::SinkExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_with_1009_and_others_keep_chatting() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    bob.join("x").await;
    let mut alice = server.connect("alice").await;
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "a".repeat(70 * 1024));
    alice.send_text(&big).await;
    let frame = alice.expect_close().await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::from(close::TOO_BIG.code));
    assert_eq!(bob.say("x", r#""still here""#).await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_with_1007() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let frame = Frame::message(vec![b'"', 0xff, 0xfe, b'"'], OpCode::Data(Data::Text), true);
    alice.ws.send(Message::Frame(frame)).await.expect("send");
    let frame = alice.expect_close().await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::from(close::INVALID_UTF8.code));
    server.stop().await;
}
