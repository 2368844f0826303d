//! Cluster mode end to end: real nats-server processes with JetStream and
//! real Switchboard processes (`--cluster`) on loopback, real TLS clients.
//! Any node serves any room; one history; resume on any node; nothing
//! acked is lost when a node or NATS dies.

use std::collections::BTreeSet;
use std::time::Duration;

use protocol::{ClientRequest, ErrorCode, ServerFrame};

use crate::admin::{TOKEN, http};
use crate::natsd::Nats;
use crate::support::{Client, DEADLINE, Fixture, Process, eventually_every, frame_id, json};

/// One Switchboard node of a cluster, with its own fixture (certificates,
/// data dir) and admin listener.
pub struct Node {
    pub fixture: Fixture,
    pub process: Process,
    pub id: String,
}

impl Node {
    /// Starts node `id` over the NATS `urls`, with `extra` flags.
    pub async fn start(id: &str, urls: &[String], extra: &[&str]) -> Node {
        let fixture = Fixture::new();
        let process = Process::start_with(&fixture, |c| {
            c.args(["--cluster", &urls.join(","), "--node-id", id])
                .args(["--admin-token", TOKEN])
                .args(extra);
        })
        .await;
        Node {
            fixture,
            process,
            id: id.to_owned(),
        }
    }

    pub async fn connect(&self, user: &str) -> Client {
        self.process.connect(&self.fixture, user).await
    }
}

/// Three nodes over one NATS server.
async fn three_nodes(nats: &Nats, extra: &[&str]) -> Vec<Node> {
    let urls = vec![nats.url()];
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(Node::start(&format!("n{i}"), &urls, extra).await);
    }
    nodes
}

/// Every seq of `room` read through `c`'s `history`, paging forward.
async fn all_seqs(c: &mut Client, room: &str) -> Vec<(u64, String)> {
    (c.history_all(room).await.into_iter())
        .map(|m| (m.seq, m.from))
        .collect()
}

fn joined_epoch(f: &ServerFrame) -> (u64, String) {
    match f {
        ServerFrame::Joined { seq, epoch, .. } => (*seq, epoch.clone()),
        other => panic!("expected joined, got {other:?}"),
    }
}

#[tokio::test]
async fn chat_across_nodes_is_one_room_with_one_history() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats, &[]).await;
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut c = node.connect(&format!("u{i}")).await;
        c.join("lobby").await;
        clients.push(c);
    }
    let seq = clients[0].say("lobby", r#""hello from n1""#).await;
    assert_eq!(seq, 1);
    for c in &mut clients[1..] {
        match c.next_message("lobby").await {
            ServerFrame::Message { seq, from, .. } => {
                assert_eq!((seq, from.as_str()), (1, "u0"));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(clients[2].say("lobby", r#""and from n3""#).await, 2);
    for c in &mut clients[..2] {
        let m = c
            .recv_where(|f| matches!(f, ServerFrame::Message { seq: 2, .. }))
            .await;
        match m {
            ServerFrame::Message { from, .. } => assert_eq!(from, "u2"),
            other => panic!("{other:?}"),
        }
    }
    let first = all_seqs(&mut clients[0], "lobby").await;
    assert_eq!(first, vec![(1, "u0".to_owned()), (2, "u2".to_owned())]);
    for c in &mut clients[1..] {
        assert_eq!(
            all_seqs(c, "lobby").await,
            first,
            "one history on every node"
        );
    }
}

#[tokio::test]
async fn concurrent_sends_from_three_nodes_get_dense_seqs() {
    const EACH: u64 = 100;
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats, &[]).await;
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut c = node.connect(&format!("s{i}")).await;
        // Messages stored before the join are history, not live.
        let (joined_at, _) = joined_epoch(&c.join("hot").await);
        tasks.push(tokio::spawn(async move {
            let mut ids = BTreeSet::new();
            for k in 0..EACH {
                ids.insert(
                    c.send(ClientRequest::Send {
                        room: "hot".into(),
                        body: json(&format!("{k}")),
                        key: None,
                    })
                    .await,
                );
            }
            let mut seqs = Vec::new();
            // Every member sees every message of the room, whichever node
            // stored it, in seq order.
            let mut live = Vec::new();
            let until = tokio::time::Instant::now() + DEADLINE;
            let want = (3 * EACH - joined_at) as usize;
            while !ids.is_empty() || live.len() < want {
                let Ok(f) = tokio::time::timeout_at(until, c.recv()).await else {
                    break;
                };
                match f {
                    ServerFrame::Ack { id, seq, .. } => {
                        assert!(ids.remove(&id.expect("id")));
                        seqs.push(seq);
                    }
                    ServerFrame::Message { seq, .. } => live.push(seq),
                    ServerFrame::Presence { .. } | ServerFrame::Typing { .. } => {}
                    other => panic!("send failed: {other:?}"),
                }
            }
            let in_order: Vec<u64> = (joined_at + 1..=3 * EACH).collect();
            assert_eq!(live, in_order, "live delivery in seq order, none missing");
            (c, seqs)
        }));
    }
    let mut all = Vec::new();
    let mut clients = Vec::new();
    for t in tasks {
        let (c, seqs) = tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
        all.extend(seqs);
        clients.push(c);
    }
    all.sort_unstable();
    let expected: Vec<u64> = (1..=3 * EACH).collect();
    assert_eq!(all, expected, "every ack a distinct seq, none missing");
    let read: Vec<u64> = all_seqs(&mut clients[1], "hot")
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(read, expected, "history is dense");
}

#[tokio::test]
async fn a_client_of_a_killed_node_resumes_on_another_without_a_gap() {
    let nats = Nats::start().await;
    let mut nodes = three_nodes(&nats, &[]).await;
    let mut reader = nodes[0].connect("reader").await;
    let (_, epoch) = joined_epoch(&reader.join("news").await);
    let mut writer = nodes[1].connect("writer").await;
    writer.join("news").await;
    for k in 1..=5 {
        assert_eq!(writer.say("news", &format!("{k}")).await, k);
    }
    let mut seen = 0;
    while seen < 5 {
        if let ServerFrame::Message { seq, .. } = reader.next_message("news").await {
            assert_eq!(seq, seen + 1);
            seen = seq;
        }
    }
    // The reader's node dies; the room goes on.
    let dead = nodes.remove(0);
    dead.process.kill().await;
    for k in 6..=9 {
        assert_eq!(writer.say("news", &format!("{k}")).await, k);
    }
    let mut resumed = nodes[1].connect("reader").await;
    let joined = resumed
        .request(ClientRequest::Join {
            room: "news".into(),
            since: Some(seen),
            epoch: Some(epoch.clone()),
        })
        .await;
    match &joined {
        ServerFrame::Joined {
            recovered,
            epoch: e,
            ..
        } => {
            assert_eq!(*recovered, Some(true), "{joined:?}");
            assert_eq!(e, &epoch, "one epoch across nodes");
        }
        other => panic!("{other:?}"),
    }
    for k in 6..=9 {
        match resumed.next_message("news").await {
            ServerFrame::Message { seq, replay, .. } => {
                assert_eq!(seq, k);
                assert!(replay);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(writer.say("news", "10").await, 10);
    match resumed.next_message("news").await {
        ServerFrame::Message { seq, replay, .. } => assert_eq!((seq, replay), (10, false)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_idempotent_resend_on_another_node_returns_the_original_seq() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats, &[]).await;
    let mut a = nodes[0].connect("alice").await;
    a.join("r").await;
    let first = a
        .request(ClientRequest::Send {
            room: "r".into(),
            body: json(r#""once""#),
            key: Some("k-1".into()),
        })
        .await;
    let ServerFrame::Ack { seq, duplicate, .. } = first else {
        panic!("{first:?}")
    };
    assert!(!duplicate);
    let mut again = nodes[2].connect("alice").await;
    again.join("r").await;
    let second = again
        .request(ClientRequest::Send {
            room: "r".into(),
            body: json(r#""once""#),
            key: Some("k-1".into()),
        })
        .await;
    match second {
        ServerFrame::Ack {
            seq: s, duplicate, ..
        } => {
            assert_eq!(s, seq);
            assert!(duplicate);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(all_seqs(&mut again, "r").await.len(), 1, "stored once");
}

#[tokio::test]
async fn with_nats_gone_sends_are_unavailable_and_the_node_recovers_by_itself() {
    let mut nats = Nats::start().await;
    let nodes = three_nodes(&nats, &[]).await;
    let admin = nodes[0].process.admin;
    let mut c = nodes[0].connect("u").await;
    c.join("r").await;
    assert_eq!(c.say("r", "1").await, 1);

    nats.kill().await;
    let refused = c
        .request(ClientRequest::Send {
            room: "r".into(),
            body: json("2"),
            key: Some("retry-me".into()),
        })
        .await;
    match &refused {
        ServerFrame::Error {
            code,
            retry_after_ms,
            ..
        } => {
            assert_eq!(*code, ErrorCode::Unavailable, "{refused:?}");
            assert!(retry_after_ms.is_some());
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(http(admin, "GET", "/readyz", &[], None).await.status, 503);
    // Reads of the stream are refused the same retryable way.
    let read = c
        .request(ClientRequest::History {
            room: "r".into(),
            before: None,
            after: None,
            limit: Some(10),
        })
        .await;
    assert!(
        matches!(
            read,
            ServerFrame::Error {
                code: ErrorCode::Unavailable,
                retry_after_ms: Some(_),
                ..
            }
        ),
        "{read:?}"
    );

    nats.restart().await;
    // The client retries as told until the node is back (bounded).
    let seq = eventually_every(
        "the node to take the resend",
        DEADLINE,
        Duration::from_millis(100),
        async || {
            let reply = c
                .request(ClientRequest::Send {
                    room: "r".into(),
                    body: json("2"),
                    key: Some("retry-me".into()),
                })
                .await;
            match reply {
                ServerFrame::Ack { seq, .. } => Ok(seq),
                ServerFrame::Error {
                    code: ErrorCode::Unavailable,
                    ..
                } => Err("unavailable".to_owned()),
                other => panic!("no recovery: {other:?}"),
            }
        },
    )
    .await;
    assert_eq!(seq, 2, "nothing lost, nothing doubled");
    assert_eq!(http(admin, "GET", "/readyz", &[], None).await.status, 200);
    let _ = frame_id;
}

#[tokio::test]
async fn operators_see_and_act_on_every_node_from_any_node() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats, &[]).await;
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut c = node.connect("mallory").await;
        c.join("r").await;
        c.say("r", &format!("{i}")).await;
        clients.push(c);
    }
    let mut bystander = nodes[1].connect("bob").await;
    bystander.join("r").await;
    let admin = nodes[0].process.admin;

    // Every node, this one first.
    let alive = |listed: &serde_json::Value| -> Vec<String> {
        listed["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["alive"] == true)
            .map(|n| n["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let ids = eventually_every(
        "three live nodes",
        DEADLINE,
        Duration::from_millis(50),
        async || {
            let listed = crate::admin::get(admin, "/admin/api/nodes").await.json();
            let ids = alive(&listed);
            if ids.len() == 3 {
                Ok(ids)
            } else {
                Err(listed.to_string())
            }
        },
    )
    .await;
    assert_eq!(ids[0], nodes[0].id);
    // Connections of every node, each with its node.
    let conns = crate::admin::get(admin, "/admin/api/connections?user=mallory")
        .await
        .json();
    let mut on: Vec<String> = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node"].as_str().unwrap().to_owned())
        .collect();
    on.sort();
    assert_eq!(on, ["n1", "n2", "n3"], "{conns}");
    // Rooms of every node, with their sessions per node.
    let rooms = crate::admin::get(admin, "/admin/api/rooms").await.json();
    let r = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "r")
        .unwrap_or_else(|| panic!("{rooms}"));
    assert_eq!(r["sessions"], 4, "{r}");
    assert_eq!(r["users"], 2, "{r}");
    let per_node: Vec<(String, u64)> = r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_owned(),
                n["sessions"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        per_node,
        [
            ("n1".to_owned(), 1),
            ("n2".to_owned(), 2),
            ("n3".to_owned(), 1)
        ],
        "{r}"
    );
    // One room, from a node with one of its members, and from a node
    // with none.
    let room = crate::admin::get(admin, "/admin/api/rooms/r").await.json();
    assert_eq!(room["sessions"], 4, "{room}");
    assert_eq!(room["presence"], serde_json::json!(["bob", "mallory"]));
    assert_eq!(room["nodes"][1]["sessions"], 2, "{room}");
    bystander.join("only-on-n2").await;
    let room = crate::admin::get(admin, "/admin/api/rooms/only-on-n2")
        .await
        .json();
    assert_eq!(room["sessions"], 1, "{room}");
    assert_eq!(room["presence"], serde_json::json!(["bob"]));
    assert_eq!(room["nodes"][0]["node"], "n2", "{room}");
    // Metrics carry the node.
    let metrics = http(admin, "GET", "/metrics", &[], None).await.body;
    assert!(
        metrics.contains("node=\"n1\""),
        "metrics lack the node label"
    );

    // A kick on n1 closes the user's sessions on all three nodes.
    let kicked = crate::admin::call(admin, "POST", "/admin/api/users/mallory/kick", None)
        .await
        .json();
    assert_eq!(kicked["kicked"], 3, "{kicked}");
    for c in &mut clients {
        let close = c.expect_close().await.expect("close frame");
        assert_eq!(u16::from(close.code), 4009);
    }
    // Erasure from n3 reaches the shared history, read on n2.
    let erased = crate::admin::call(
        nodes[2].process.admin,
        "DELETE",
        "/admin/api/users/mallory/messages",
        None,
    )
    .await
    .json();
    assert_eq!(erased["erased"], 3, "{erased}");
    let page = bystander
        .request(ClientRequest::History {
            room: "r".into(),
            before: None,
            after: None,
            limit: Some(10),
        })
        .await;
    let ServerFrame::History { messages, .. } = page else {
        panic!("{page:?}")
    };
    assert_eq!(messages.len(), 3, "erased seqs stay in place");
    assert!(messages.iter().all(|m| m.body.is_none()), "{messages:?}");
}

#[tokio::test]
async fn presence_is_per_user_across_nodes_and_a_dead_nodes_users_leave() {
    let nats = Nats::start().await;
    let mut nodes = three_nodes(&nats, &[]).await;
    let mut watcher = nodes[2].connect("watcher").await;
    watcher.join("p").await;
    // One user on two nodes is one member.
    let mut a1 = nodes[0].connect("amy").await;
    a1.join("p").await;
    let mut a2 = nodes[1].connect("amy").await;
    a2.join("p").await;
    let count = |f: &ServerFrame| match f {
        ServerFrame::Members { count, users, .. } => (*count, users.clone()),
        other => panic!("{other:?}"),
    };
    let users = eventually_every(
        "amy and the watcher in p",
        DEADLINE,
        Duration::from_millis(50),
        async || {
            let reply = watcher
                .request(ClientRequest::Presence {
                    room: "p".into(),
                    after: None,
                    limit: None,
                })
                .await;
            let (n, users) = count(&reply);
            if n == 2 {
                Ok(users)
            } else {
                Err(format!("{users:?}"))
            }
        },
    )
    .await;
    assert_eq!(users, ["amy", "watcher"]);
    // n1 dies: amy is still on n2, so she stays.
    let dead = nodes.remove(0);
    dead.process.kill().await;
    drop(a1);
    // n2 dies too: amy leaves within the node timeout (5 s default).
    let dead = nodes.remove(0);
    dead.process.kill().await;
    drop(a2);
    let left = watcher
        .recv_where(
            |f| matches!(f, ServerFrame::Presence { left, .. } if left.iter().any(|u| u == "amy")),
        )
        .await;
    match left {
        ServerFrame::Presence { count, .. } => assert_eq!(count, 1),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_node_started_before_nats_is_ready_waits_for_it() {
    let port = crate::natsd::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    // A stand-in holds NATS's port until the node has asked for NATS once
    // and been turned away: NATS comes up only after that, which is the
    // case under test.
    let stand_in = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind NATS's port");
    let fixture = Fixture::new();
    // The node starts first (as in a compose or Kubernetes start) and asks
    // for its stream until JetStream answers.
    let node = tokio::spawn(async move {
        let process = Process::start_with(&fixture, |c| {
            c.args(["--cluster", &url, "--node-id", "early"]);
        })
        .await;
        (fixture, process)
    });
    let (asked, _) = tokio::time::timeout(DEADLINE, stand_in.accept())
        .await
        .expect("the node asks for NATS")
        .expect("accept");
    drop((asked, stand_in));
    let _nats = Nats::start_on(port).await;
    let (fixture, process) = tokio::time::timeout(DEADLINE, node)
        .await
        .expect("the node starts once NATS is up")
        .expect("node task");
    let mut c = process.connect(&fixture, "u").await;
    c.join("r").await;
    assert_eq!(c.say("r", "1").await, 1);
}
