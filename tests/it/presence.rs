//! Presence and typing in rooms of any size: `joined` bounded whatever the
//! room's size, the member list paged by `presence` requests, counts exact
//! under concurrent joins and leaves of many sessions per user, presence
//! events off for rooms matching a pattern, typing coalesced per interval.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use futures_util::StreamExt;
use futures_util::future::join_all;
use protocol::{ClientRequest, ErrorCode, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, DEADLINE, Fixture, TestServer};

/// One page of `room`'s members: the `members` reply (or `error`) to a
/// `presence` request.
async fn page(
    client: &mut Client,
    room: &str,
    after: Option<&str>,
    limit: Option<u32>,
) -> ServerFrame {
    let id = client
        .send(ClientRequest::Presence {
            room: room.into(),
            after: after.map(str::to_owned),
            limit,
        })
        .await;
    client
        .recv_where(|f| match f {
            ServerFrame::Members { id: got, .. } | ServerFrame::Error { id: got, .. } => {
                *got == Some(id)
            }
            _ => false,
        })
        .await
}

/// Connects over the plain listener as `user`, joining `room` in the
/// upgrade URL; returns the socket and the text of its `joined` reply.
async fn plain_join(
    addr: SocketAddr,
    user: &str,
    room: &str,
) -> (WebSocketStream<TcpStream>, String) {
    let url = format!("ws://127.0.0.1:{}/ws?user={user}&join={room}", addr.port());
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp)
        .await
        .expect("upgrade");
    let mut texts = Vec::new();
    while texts.len() < 2 {
        let msg = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a frame within the deadline")
            .expect("stream open")
            .expect("frame");
        if let Message::Text(t) = msg {
            texts.push(t.as_str().to_owned());
        }
    }
    assert!(texts[0].contains(r#""type":"welcome""#), "{}", texts[0]);
    (ws, texts.remove(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_is_bounded_in_a_room_of_500_and_presence_pages_every_member() {
    const MEMBERS: usize = 499;
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.plain_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let plain = server.plain_addr.expect("plain listener");
    let list_max = server.state.config.presence_list_max;
    let mut sockets = Vec::with_capacity(MEMBERS);
    let mut largest = 0;
    for i in 0..MEMBERS {
        let (ws, text) = plain_join(plain, &format!("m{i:03}"), "big").await;
        let ServerFrame::Joined {
            count, presence, ..
        } = ServerFrame::from_json(&text).expect("joined")
        else {
            panic!("expected joined, got {text}");
        };
        // Joins are one at a time: the count is exact.
        assert_eq!(count, i as u64 + 1);
        assert_eq!(presence.len(), (i + 1).min(list_max));
        largest = largest.max(text.len());
        sockets.push(ws);
    }
    // About 7 bytes a name: the 499th joiner would get 3.5 KiB with every
    // name; it gets at most `presence_list_max` of them.
    assert!(largest < 8 * list_max + 200, "joined of {largest} bytes");

    let mut pager = server.connect("zz-pager").await;
    let ServerFrame::Joined {
        count, presence, ..
    } = pager.join("big").await
    else {
        unreachable!("join asserts joined")
    };
    assert_eq!(count, 500);
    let want: Vec<String> = (0..MEMBERS)
        .map(|i| format!("m{i:03}"))
        .chain(["zz-pager".to_owned()])
        .collect();
    assert_eq!(presence, want[..list_max]);

    // Paged by name, 200 at a time: everyone once, in order.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let reply = page(&mut pager, "big", after.as_deref(), Some(200)).await;
        let ServerFrame::Members {
            room,
            count,
            users,
            more,
            ..
        } = reply
        else {
            panic!("expected members, got {reply:?}");
        };
        assert_eq!((room.as_str(), count), ("big", 500));
        assert!(users.len() <= 200);
        pages += 1;
        after = users.last().cloned();
        seen.extend(users);
        if !more {
            break;
        }
    }
    assert_eq!((pages, seen), (3, want.clone()));
    // Without a limit, a page is as large as the server allows.
    let ServerFrame::Members { users, more, .. } = page(&mut pager, "big", None, None).await else {
        panic!("expected members");
    };
    assert_eq!((users, more), (want, false));
    // A room the session has not joined is refused.
    let reply = page(&mut pager, "elsewhere", None, None).await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: ErrorCode::NotJoined,
                ..
            }
        ),
        "{reply:?}"
    );
    drop(sockets);
    server.stop().await;
}

/// Applies presence events to the observer's list of `room`'s users and
/// checks, after each, that the list has exactly `count` users; returns
/// once an event lists `until` as arrived, with that event's count.
async fn follow(
    observer: &mut Client,
    room: &str,
    users: &mut BTreeSet<String>,
    never_left: &BTreeSet<String>,
    until: &str,
) -> u64 {
    loop {
        let f = observer
            .recv_where(|f| matches!(f, ServerFrame::Presence { room: r, .. } if r == room))
            .await;
        let ServerFrame::Presence {
            count,
            joined,
            left,
            truncated,
            ..
        } = f
        else {
            unreachable!("matched a presence event")
        };
        assert!(!truncated, "fewer changes than the list bound");
        for u in &left {
            assert!(
                !never_left.contains(u),
                "{u} kept a session but was reported gone"
            );
            users.remove(u);
        }
        users.extend(joined.iter().cloned());
        assert_eq!(
            users.len() as u64,
            count,
            "list {users:?} against count {count}"
        );
        if joined.iter().any(|u| u == until) {
            return count;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_under_concurrent_joins_and_leaves_of_many_sessions_per_user() {
    let server = TestServer::start().await;
    let mut observer = server.connect("obs").await;
    let ServerFrame::Joined {
        count, presence, ..
    } = observer.join("c").await
    else {
        unreachable!("join asserts joined")
    };
    assert_eq!(
        (count, presence.as_slice()),
        (1, ["obs".to_owned()].as_slice())
    );
    let mut users: BTreeSet<String> = ["obs".to_owned()].into();

    // Ten users with four sessions each, all joining at once.
    let mut clients = Vec::new();
    for u in 0..10 {
        for _ in 0..4 {
            clients.push((u, server.connect(&format!("u{u}")).await));
        }
    }
    let counts = join_all(clients.iter_mut().map(|(_, c)| async move {
        match c.join("c").await {
            ServerFrame::Joined { count, .. } => count,
            _ => unreachable!("join asserts joined"),
        }
    }))
    .await;
    assert!(counts.iter().all(|c| (2..=11).contains(c)), "{counts:?}");
    assert!(
        counts.contains(&11),
        "the last join sees everyone: {counts:?}"
    );

    // At once: u0..u4 lose every session (two leave, two disconnect),
    // u5..u9 lose three of four (their users stay), and five new users
    // arrive with two sessions each.
    let mut arriving = Vec::new();
    for v in 0..5 {
        for _ in 0..2 {
            arriving.push(server.connect(&format!("v{v}")).await);
        }
    }
    let mut leaving = Vec::new();
    let mut dropping = Vec::new();
    let mut staying = Vec::new();
    let mut seen_sessions = [0; 10];
    for (u, c) in clients {
        seen_sessions[u] += 1;
        let k = seen_sessions[u];
        if u < 5 {
            if k <= 2 {
                leaving.push(c)
            } else {
                dropping.push(c)
            }
        } else if k <= 3 {
            leaving.push(c);
        } else {
            staying.push(c);
        }
    }
    let leaves = join_all(
        leaving
            .iter_mut()
            .map(|c| async move { c.request(ClientRequest::Leave { room: "c".into() }).await }),
    );
    let joins = join_all(arriving.iter_mut().map(|c| c.join("c")));
    drop(dropping);
    let (left, _) = tokio::join!(leaves, joins);
    assert!(
        left.iter().all(|f| matches!(f, ServerFrame::Left { .. })),
        "{left:?}"
    );
    // The disconnected sessions leave when the server sees them close.
    let sessions = 1 + staying.len() + arriving.len();
    server
        .wait_for("the dropped sessions to leave", |s| {
            s.hub.room("c").map(|r| r.sessions) == Some(sessions)
        })
        .await;

    // Every change so far precedes the marker's arrival, so the event that
    // lists the marker carries the final count.
    let never_left: BTreeSet<String> = (5..10).map(|u| format!("u{u}")).collect();
    let mut marker = server.connect("marker").await;
    marker.join("c").await;
    let count = follow(&mut observer, "c", &mut users, &never_left, "marker").await;
    let want: BTreeSet<String> = ["obs", "marker"]
        .iter()
        .map(|s| s.to_string())
        .chain((5..10).map(|u| format!("u{u}")))
        .chain((0..5).map(|v| format!("v{v}")))
        .collect();
    assert_eq!(count, want.len() as u64);
    assert_eq!(users, want);
    let ServerFrame::Members {
        count,
        users: paged,
        ..
    } = page(&mut observer, "c", None, None).await
    else {
        panic!("expected members");
    };
    assert_eq!(count, want.len() as u64);
    assert_eq!(paged, want.into_iter().collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_matching_presence_events_off_send_no_presence_events() {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.presence_events_off = vec!["quiet-*".into()];
    })
    .await;
    let mut obs = server.connect("obs").await;
    obs.join("quiet-1").await;
    obs.join("loud").await;
    let mut bob = server.connect("bob").await;
    let ServerFrame::Joined {
        count, presence, ..
    } = bob.join("quiet-1").await
    else {
        unreachable!("join asserts joined")
    };
    // `joined` still counts and names the room's users.
    assert_eq!(
        (count, presence),
        (2, vec!["bob".to_owned(), "obs".to_owned()])
    );
    bob.join("loud").await;
    // Bob's arrival in quiet-1 came first: had it made an event, that
    // event would reach obs before the one for loud.
    loop {
        match obs.recv().await {
            ServerFrame::Presence { room, joined, .. }
                if room == "loud" && joined.iter().any(|u| u == "bob") =>
            {
                break;
            }
            ServerFrame::Presence { room, .. } if room == "loud" => {}
            ServerFrame::Presence { room, .. } => panic!("a presence event for {room}"),
            _ => {}
        }
    }
    // The member list is still there to page.
    let ServerFrame::Members { count, users, .. } = page(&mut obs, "quiet-1", None, None).await
    else {
        panic!("expected members");
    };
    assert_eq!(
        (count, users),
        (2, vec!["bob".to_owned(), "obs".to_owned()])
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_coalesced_into_one_event_per_interval() {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.typing_interval_ms = 1000;
        c.typing_list_max = 2;
    })
    .await;
    let mut obs = server.connect("obs").await;
    obs.join("t").await;
    let mut typers = Vec::new();
    for i in 0..6 {
        let mut c = server.connect(&format!("t{i}")).await;
        c.join("t").await;
        typers.push(c);
    }
    for c in &mut typers {
        c.send(ClientRequest::Typing { room: "t".into() }).await;
    }
    // A session handles requests in order: once each pong is back, every
    // typing notice is recorded, within one interval or across one boundary.
    for c in &mut typers {
        let pong = c.request(ClientRequest::Ping).await;
        assert!(matches!(pong, ServerFrame::Pong { .. }), "{pong:?}");
    }
    let mut events = Vec::new();
    let mut typed = 0;
    while typed < 6 {
        let f = obs
            .recv_where(|f| matches!(f, ServerFrame::Typing { .. }))
            .await;
        let ServerFrame::Typing { count, users, .. } = f else {
            unreachable!("matched a typing event")
        };
        assert!(
            users.len() <= 2 && count >= users.len() as u64,
            "{users:?} of {count}"
        );
        typed += count;
        events.push(count);
    }
    assert_eq!(typed, 6, "{events:?}");
    assert!(
        events.len() <= 2,
        "six typers in one or two events: {events:?}"
    );
    assert!(events.iter().any(|&c| c >= 3), "{events:?}");
    server.stop().await;
}

/// A client of an auth-mode server, as `user` with `grants`.
async fn connect_with_grants(
    server: &TestServer,
    secret: &str,
    user: &str,
    grants: &[&str],
) -> Client {
    let claims = serde_json::json!({
        "sub": user,
        "exp": switchboard::auth::now_unix() + 3600,
        "grants": grants,
    });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign");
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let request =
        crate::support::request_with(&url, &[("authorization", &format!("Bearer {token}"))]);
    let mut c = server.connect_request(request).await.expect("upgrade");
    assert!(matches!(c.recv().await, ServerFrame::Welcome { .. }));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_requests_need_read_access_and_share_the_history_rate() {
    const SECRET: &str = "presence-test-secret-of-at-least-32-bytes";
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.auth_hs256_secret = Some(switchboard::config::Secret::new(SECRET));
        c.handshake_rate_per_ip = switchboard::config::Rate::OFF;
        c.history_rate_per_session = switchboard::config::Rate::new(1, 2);
    })
    .await;
    let mut alice = connect_with_grants(&server, SECRET, "alice", &["open:r"]).await;
    alice.join("open").await;
    // Outside the grants: `forbidden`, whether or not the room has members.
    let mut bob = connect_with_grants(&server, SECRET, "bob", &["*:rw"]).await;
    bob.join("closed").await;
    for room in ["closed", "empty"] {
        let reply = page(&mut alice, room, None, None).await;
        assert!(
            matches!(
                reply,
                ServerFrame::Error {
                    code: ErrorCode::Forbidden,
                    ..
                }
            ),
            "{room}: {reply:?}"
        );
    }
    // Two pages fit the history burst; the third is limited.
    for i in 0..3 {
        let reply = page(&mut alice, "open", None, Some(1)).await;
        match reply {
            ServerFrame::Members { count, users, .. } if i < 2 => {
                assert_eq!((count, users), (1, vec!["alice".to_owned()]));
            }
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                retry_after_ms: Some(_),
                ..
            } if i == 2 => {}
            other => panic!("page #{i}: {other:?}"),
        }
    }
    server.stop().await;
}
