//! The cluster bus between two nodes over a real nats-server: two hubs,
//! two buses on two NATS connections, members with real outboxes, and a
//! history both read (a list standing in for the stream: a message is in
//! it before a node's bus hears it was committed, as JetStream acks before
//! the store calls its sink).

use std::sync::{Arc, Mutex};

use protocol::ServerFrame;
use serde_json::value::RawValue;
use switchboard::cluster::bus::{ClusterBus, HistoryReader};
use switchboard::config::ClusterConfig;
use switchboard::delivery::{OutboxReceiver, Outgoing, outbox};
use switchboard::history::{CommitSink, Committed, StoredMessage};
use switchboard::hub::{Hub, Member};
use switchboard::metrics::Metrics;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::natsd::Nats;
use crate::support::{DEADLINE, wait_until};

/// The rooms' stored messages, in commit order.
type History = Arc<Mutex<Vec<(String, StoredMessage)>>>;

fn reader(history: &History) -> HistoryReader {
    let history = history.clone();
    Arc::new(move |room: String, after: u64, limit: usize| {
        let found: Vec<StoredMessage> = (history.lock().unwrap().iter())
            .filter(|(r, m)| *r == room && m.seq > after)
            .take(limit)
            .map(|(_, m)| m.clone())
            .collect();
        Box::pin(async move { Ok(found) })
    })
}

struct Node {
    hub: Arc<Hub>,
    bus: Arc<ClusterBus>,
    token: CancellationToken,
    tracker: TaskTracker,
    history: History,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.token.cancel();
        self.tracker.close();
    }
}

/// Short timings, so that gaps show within a test; a silent node is gone
/// after `node_timeout_ms`.
fn config(nats: &Nats, id: &str, node_timeout_ms: u64) -> ClusterConfig {
    ClusterConfig {
        urls: vec![nats.url()],
        node_id: Some(id.to_owned()),
        heartbeat_interval_ms: 100,
        node_timeout_ms,
        gap_timeout_ms: 100,
        request_timeout_ms: 1_000,
        ..ClusterConfig::default()
    }
}

/// A node that finds others gone only after a long silence, so that a
/// busy test machine does not make one seem gone.
async fn node(nats: &Nats, id: &str, history: &History) -> Node {
    node_with(nats, id, history, 30_000).await
}

async fn node_with(nats: &Nats, id: &str, history: &History, node_timeout_ms: u64) -> Node {
    let config = config(nats, id, node_timeout_ms);
    let client = switchboard::cluster::connect(&config).await.unwrap();
    let hub = Arc::new(Hub::new());
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let bus = ClusterBus::start(
        client,
        &config,
        hub.clone(),
        reader(history),
        Arc::new(|| 7),
        &tracker,
        token.clone(),
    )
    .await
    .unwrap();
    Node {
        hub,
        bus,
        token,
        tracker,
        history: history.clone(),
    }
}

impl Node {
    /// Joins session `id` of `user` to `room` as a session does: when the
    /// hub does not know the room's latest seq, it reads it and reports it.
    fn join(&self, room: &str, id: u64, user: &str) -> OutboxReceiver {
        let (latest, rx) = self.join_unreported(room, id, user);
        if latest.is_none() {
            let latest = (self.history.lock().unwrap().iter())
                .filter(|(r, _)| r == room)
                .map(|(_, m)| m.seq)
                .max()
                .unwrap_or(0);
            self.hub.note_latest(room, latest);
        }
        rx
    }

    /// Joins as [`Node::join`] up to the store read: returns the hub's
    /// latest; the caller reports the read.
    fn join_unreported(&self, room: &str, id: u64, user: &str) -> (Option<u64>, OutboxReceiver) {
        let (tx, rx) = outbox(
            1024,
            1 << 24,
            1024,
            CancellationToken::new(),
            Arc::new(Metrics::default()),
        );
        let outcome = self.hub.join(
            room,
            Member {
                session: id,
                user: Arc::from(user),
                outbox: tx,
            },
        );
        (outcome.latest, rx)
    }

    /// Stores `seqs` of `room` and tells this node's bus they were committed.
    fn commit(&self, room: &str, seqs: impl IntoIterator<Item = u64>) {
        let seqs: Vec<u64> = seqs.into_iter().collect();
        store(&self.history, room, &seqs);
        self.announce(room, &seqs);
    }

    /// Tells this node's bus that `seqs` of `room` were committed.
    fn announce(&self, room: &str, seqs: &[u64]) {
        let body = RawValue::from_string("{\"n\":1}".to_owned()).unwrap();
        let msgs: Vec<Committed<'_>> = seqs
            .iter()
            .map(|&seq| Committed {
                room,
                seq,
                ts: 1,
                from: "sender",
                body: &body,
            })
            .collect();
        self.bus.committed(&msgs);
    }
}

/// Adds `seqs` of `room` to the history.
fn store(history: &History, room: &str, seqs: &[u64]) {
    let mut h = history.lock().unwrap();
    for &seq in seqs {
        h.push((
            room.to_owned(),
            StoredMessage {
                seq,
                from: "sender".to_owned(),
                ts: 1,
                body: Some("{\"n\":1}".to_owned()),
            },
        ));
    }
}

/// The seqs of the messages a member gets until it has `n` of them (events
/// are skipped).
async fn seqs(rx: &mut OutboxReceiver, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while got.len() < n {
            if let Outgoing::Message(d) = rx.recv().await {
                got.extend(d.messages.iter().map(|m| m.seq));
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} messages within the deadline, got {got:?}"));
    got
}

/// The messages and events queued for a member now.
fn queued(rx: &mut OutboxReceiver) -> (Vec<u64>, Vec<ServerFrame>) {
    let (mut msgs, mut events) = (Vec::new(), Vec::new());
    while let Some(item) = rx.try_recv() {
        match item {
            Outgoing::Message(d) => msgs.extend(d.messages.iter().map(|m| m.seq)),
            Outgoing::Ephemeral(f) => {
                let text = std::str::from_utf8(f.payload()).unwrap();
                events.push(ServerFrame::from_json(text).unwrap());
            }
        }
    }
    (msgs, events)
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_commit_reaches_the_other_nodes_members_once_in_order_and_only_where_they_are() {
    let nats = Nats::start().await;
    let history = History::default();
    let (a, b) = (
        node(&nats, "a", &history).await,
        node(&nats, "b", &history).await,
    );
    let mut on_a = a.join("r", 1, "alice");
    let mut on_b = b.join("r", 2, "bob");
    wait_until("b subscribed to r", || b.bus.rooms() == names(&["r"])).await;
    for batch in 0..4 {
        a.commit("r", batch * 5 + 1..=batch * 5 + 5);
    }
    let want: Vec<u64> = (1..=20).collect();
    assert_eq!(seqs(&mut on_b, 20).await, want);
    assert_eq!(seqs(&mut on_a, 20).await, want);
    // A room b has no members in never reaches b.
    a.commit("other", 1..=5);
    a.commit("r", [21]);
    assert_eq!(seqs(&mut on_b, 1).await, vec![21]);
    assert_eq!(seqs(&mut on_a, 1).await, vec![21]);
    assert_eq!(
        b.bus.stats().deliveries_received,
        5,
        "b hears r's five commits and nothing of `other`"
    );
    assert_eq!(b.bus.rooms(), names(&["r"]));
    assert_eq!(queued(&mut on_b).0, Vec::<u64>::new(), "nothing twice");
    // The last member gone, the node leaves the room's subjects.
    assert!(b.hub.leave("r", 2));
    wait_until("b unsubscribed", || b.bus.rooms().is_empty()).await;
}

#[tokio::test]
async fn out_of_order_and_missing_messages_are_delivered_in_seq_order() {
    let nats = Nats::start().await;
    let history = History::default();
    let (a, b) = (
        node(&nats, "a", &history).await,
        node(&nats, "b", &history).await,
    );
    let mut on_b = b.join("r", 1, "bob");
    // b's two catch-up reads after its subscriptions went live are done,
    // so what follows reaches b only through the bus.
    wait_until("b caught up", || b.bus.stats().history_reads >= 2).await;
    store(&history, "r", &[1, 2]);
    a.announce("r", &[2]);
    a.announce("r", &[1]);
    assert_eq!(seqs(&mut on_b, 2).await, vec![1, 2]);
    // 3 is stored but its announcement is lost: b reads it after the gap
    // timeout, before 4.
    let reads = b.bus.stats().history_reads;
    store(&history, "r", &[3, 4]);
    a.announce("r", &[4]);
    assert_eq!(seqs(&mut on_b, 2).await, vec![3, 4]);
    assert!(b.bus.stats().history_reads > reads, "the gap was read");
    a.commit("r", [5]);
    assert_eq!(seqs(&mut on_b, 1).await, vec![5]);
    assert_eq!(queued(&mut on_b).0, Vec::<u64>::new(), "nothing twice");
}

#[tokio::test]
async fn a_message_committed_before_the_subscription_arrives_without_a_later_one() {
    let nats = Nats::start().await;
    let history = History::default();
    let (a, b) = (
        node(&nats, "a", &history).await,
        node(&nats, "b", &history).await,
    );
    store(&history, "r", &[1, 2]);
    // The member read latest 2; 3 is committed before b's bus subscribes.
    let mut on_b = b.join("r", 1, "bob");
    a.commit("r", [3]);
    assert_eq!(seqs(&mut on_b, 1).await, vec![3]);
}

#[tokio::test]
async fn two_first_joins_reporting_out_of_order_each_get_every_message_after_their_read() {
    let nats = Nats::start().await;
    let history = History::default();
    let (a, b) = (
        node(&nats, "a", &history).await,
        node(&nats, "b", &history).await,
    );
    store(&history, "r", &(1..=10).collect::<Vec<_>>());
    // Both join a room b's hub does not know: each reads the latest.
    let (first, mut rx1) = b.join_unreported("r", 1, "one");
    let (second, mut rx2) = b.join_unreported("r", 2, "two");
    assert_eq!((first, second), (None, None));
    // The first read 10; 11 and 12 are committed; the second reads 12 and
    // reports first.
    a.commit("r", [11, 12]);
    b.hub.note_latest("r", 12);
    a.commit("r", [13]);
    b.hub.note_latest("r", 10);
    assert_eq!(seqs(&mut rx1, 3).await, vec![11, 12, 13]);
    // The second session gets them too; its floor (12) drops 11 and 12.
    assert_eq!(seqs(&mut rx2, 3).await, vec![11, 12, 13]);
}

#[tokio::test]
async fn typing_on_one_node_reaches_the_others_members_coalesced() {
    let nats = Nats::start().await;
    let history = History::default();
    let (a, b) = (
        node(&nats, "a", &history).await,
        node(&nats, "b", &history).await,
    );
    let _alice = a.join("r", 1, "alice");
    let mut bob = b.join("r", 2, "bob");
    wait_until("b sees alice", || b.hub.members("r", None, 10).count == 2).await;
    b.hub.flush_presence();
    queued(&mut bob);
    for _ in 0..5 {
        a.hub.typing("r", &Arc::from("alice"));
    }
    let mut events = Vec::new();
    wait_until("bob hears alice type", || {
        b.hub.flush_typing();
        events.extend(queued(&mut bob).1);
        !events.is_empty()
    })
    .await;
    assert_eq!(
        events,
        vec![ServerFrame::Typing {
            room: "r".into(),
            count: 1,
            users: names(&["alice"]),
        }]
    );
    assert_eq!(b.hub.flush_typing(), 0, "one event for five keystrokes");
}

#[tokio::test]
async fn a_user_on_two_nodes_is_one_member_until_it_leaves_both() {
    let nats = Nats::start().await;
    let history = History::default();
    let (a, b) = (
        node(&nats, "a", &history).await,
        node(&nats, "b", &history).await,
    );
    let _u_a = a.join("r", 1, "u");
    let _x = a.join("r", 2, "x");
    let _u_b = b.join("r", 3, "u");
    let mut w = b.join("r", 4, "w");
    let all = names(&["u", "w", "x"]);
    wait_until("both nodes see u, w and x", || {
        a.hub.members("r", None, 10).users == all && b.hub.members("r", None, 10).users == all
    })
    .await;
    assert_eq!(b.hub.members("r", None, 10).count, 3, "u counts once");
    b.hub.flush_presence();
    queued(&mut w);
    // u leaves a, then y joins a: once b sees y, it has seen u leave a.
    assert!(a.hub.leave("r", 1));
    let _y = a.join("r", 5, "y");
    wait_until("b sees y", || b.hub.members("r", None, 10).count == 4).await;
    assert_eq!(
        b.hub.members("r", None, 10).users,
        names(&["u", "w", "x", "y"])
    );
    b.hub.flush_presence();
    let (_, events) = queued(&mut w);
    assert_eq!(
        events,
        vec![ServerFrame::Presence {
            room: "r".into(),
            count: 4,
            joined: names(&["y"]),
            left: vec![],
            truncated: false,
        }],
        "u is still there"
    );
    // u leaves b too: gone on both nodes.
    assert!(b.hub.leave("r", 3));
    let rest = names(&["w", "x", "y"]);
    wait_until("u gone on both nodes", || {
        a.hub.members("r", None, 10).users == rest && b.hub.members("r", None, 10).users == rest
    })
    .await;
}

#[tokio::test]
async fn the_members_of_a_silent_node_leave_within_the_node_timeout() {
    let nats = Nats::start().await;
    let history = History::default();
    let (a, b) = (
        node_with(&nats, "a", &history, 500).await,
        node_with(&nats, "b", &history, 500).await,
    );
    let _alice = a.join("r", 1, "alice");
    let mut w = b.join("r", 2, "w");
    wait_until("b sees alice", || {
        b.hub.members("r", None, 10).users == names(&["alice", "w"])
    })
    .await;
    wait_until("b hears a's heartbeat, with its connection count", || {
        b.bus
            .nodes()
            .iter()
            .any(|n| n.id == "a" && n.connections == 7)
    })
    .await;
    let nodes = b.bus.nodes();
    assert_eq!(
        nodes
            .iter()
            .map(|n| (n.id.as_str(), n.this_node, n.connections))
            .collect::<Vec<_>>(),
        vec![("b", true, 7), ("a", false, 7)]
    );
    b.hub.flush_presence();
    queued(&mut w);
    // a's bus stops without a word; alice is still in a's hub.
    a.token.cancel();
    let mut events = Vec::new();
    wait_until("alice leaves b's room", || {
        b.hub.flush_presence();
        events.extend(queued(&mut w).1);
        !events.is_empty()
    })
    .await;
    assert_eq!(
        events,
        vec![ServerFrame::Presence {
            room: "r".into(),
            count: 1,
            joined: vec![],
            left: names(&["alice"]),
            truncated: false,
        }]
    );
    assert!(b.bus.nodes().iter().any(|n| n.id == "a" && !n.alive));
    assert_eq!(a.hub.members("r", None, 10).users, names(&["alice", "w"]));
}

#[tokio::test]
async fn a_lost_presence_event_is_repaired_by_a_later_member_list() {
    let nats = Nats::start().await;
    let history = History::default();
    let (a, b) = (
        node_with(&nats, "a", &history, 500).await,
        node_with(&nats, "b", &history, 500).await,
    );
    let _alice = a.join("r", 1, "alice");
    let _w = b.join("r", 2, "w");
    wait_until("b sees alice", || {
        b.hub.members("r", None, 10).users == names(&["alice", "w"])
    })
    .await;
    // As if b had missed a's event that `ghost` left.
    b.hub.remote_presence("r", "a", "ghost", true);
    assert_eq!(
        b.hub.members("r", None, 10).users,
        names(&["alice", "ghost", "w"])
    );
    wait_until("a's next member list of r drops ghost", || {
        b.hub.members("r", None, 10).users == names(&["alice", "w"])
    })
    .await;
}
