//! The cluster's history in JetStream, at the library level: two
//! `JetStreamStore`s on two NATS connections are two nodes, against real
//! nats-server processes (tests/it/natsd.rs), each with a sink that records
//! what it was handed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use switchboard::cluster::store::JetStreamStore;
use switchboard::config::{ClusterConfig, Config};
use switchboard::history::{
    Append, AppendError, Appended, Backend as _, CommitSink, Committed, ReadError,
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::natsd::Nats;
use crate::support::{DEADLINE, eventually_every, wait_until};

/// What a node's sink was handed: (room, seq, from, body).
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, u64, String, String)>>,
}

impl CommitSink for Recorder {
    fn committed(&self, msgs: &[Committed<'_>]) {
        let mut seen = self.seen.lock().unwrap();
        for m in msgs {
            seen.push((
                m.room.to_owned(),
                m.seq,
                m.from.to_owned(),
                m.body.get().to_owned(),
            ));
        }
    }
}

impl Recorder {
    fn seen(&self) -> Vec<(String, u64, String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

struct Node {
    store: JetStreamStore,
    sink: Arc<Recorder>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

/// The stores' request timeout: the default. Shorter ones fail reads
/// (direct gets) when the machine is busy.
const TIMEOUT_MS: u64 = 2_000;
/// Pause between resends after `Unavailable`, as a client backs off.
const RESEND_PAUSE: Duration = Duration::from_millis(50);

fn cluster_config(url: &str) -> ClusterConfig {
    ClusterConfig {
        urls: vec![url.to_owned()],
        node_id: Some("test".to_owned()),
        stream: "SBTEST".to_owned(),
        request_timeout_ms: TIMEOUT_MS,
        ..ClusterConfig::default()
    }
}

async fn node(url: &str) -> Node {
    node_with(cluster_config(url)).await
}

async fn node_with(config: ClusterConfig) -> Node {
    let client = switchboard::cluster::connect(&config).await.unwrap();
    let mut opts = Config::default().store_options();
    opts.retry_interval = Duration::from_millis(100);
    let sink = Arc::new(Recorder::default());
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let (store, writer) = JetStreamStore::open(client, &config, &opts).await.unwrap();
    writer.start(sink.clone(), &tracker, stop.clone());
    Node {
        store,
        sink,
        tracker,
        stop,
    }
}

impl Node {
    async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        tokio::time::timeout(DEADLINE, self.store.closed())
            .await
            .expect("the writer exits at stop");
        tokio::time::timeout(DEADLINE, self.tracker.wait())
            .await
            .expect("every task exits at stop");
    }
}

fn body(text: &str) -> Box<RawValue> {
    RawValue::from_string(serde_json::to_string(&serde_json::json!({ "text": text })).unwrap())
        .unwrap()
}

/// Queues an append; the receiver gets its result.
async fn queue(
    store: &JetStreamStore,
    room: &str,
    from: &str,
    text: &str,
    key: Option<&str>,
) -> oneshot::Receiver<Result<Appended, AppendError>> {
    let (reply, rx) = oneshot::channel();
    store
        .append(Append {
            room: Arc::from(room),
            from: Arc::from(from),
            body: body(text),
            key: key.map(str::to_owned),
            reply,
        })
        .await
        .unwrap();
    rx
}

async fn send(
    store: &JetStreamStore,
    room: &str,
    from: &str,
    text: &str,
    key: Option<&str>,
) -> Result<Appended, AppendError> {
    let rx = queue(store, room, from, text, key).await;
    tokio::time::timeout(DEADLINE, rx)
        .await
        .expect("an append is answered within the deadline")
        .expect("the writer answers")
}

fn text_of(b: &Option<String>) -> String {
    let v: serde_json::Value = serde_json::from_str(b.as_deref().unwrap()).unwrap();
    v["text"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_on_two_nodes_get_dense_seqs_acked_after_commit() {
    let nats = Nats::start().await;
    let (a, b) = (node(&nats.url()).await, node(&nats.url()).await);
    const EACH: usize = 200;
    let sender = |store: JetStreamStore, who: &'static str| async move {
        let mut rxs = Vec::new();
        for i in 0..EACH {
            rxs.push(queue(&store, "hot", who, &format!("{who}-{i}"), None).await);
        }
        let mut acks = Vec::new();
        for rx in rxs {
            let r = tokio::time::timeout(DEADLINE, rx).await.unwrap().unwrap();
            acks.push(r.expect("every append is stored"));
        }
        acks
    };
    let (acks_a, acks_b) = tokio::join!(
        sender(a.store.clone(), "alice"),
        sender(b.store.clone(), "bob")
    );
    let mut seqs: Vec<u64> = acks_a.iter().chain(&acks_b).map(|a| a.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=2 * EACH as u64).collect::<Vec<_>>());
    assert!(acks_a.iter().chain(&acks_b).all(|a| !a.duplicate));
    // Each sender's own messages are acked in the order sent.
    for acks in [&acks_a, &acks_b] {
        assert!(acks.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    for n in [&a, &b] {
        let all = n.store.read_after("hot", 0, 1000).await.unwrap();
        assert_eq!(all.len(), 2 * EACH);
        assert!(all.iter().zip(1..).all(|(m, s)| m.seq == s));
        for (ack, who, acks) in [("alice", "alice", &acks_a), ("bob", "bob", &acks_b)] {
            for (i, a) in acks.iter().enumerate() {
                let m = &all[(a.seq - 1) as usize];
                assert_eq!(m.from, who, "{ack}");
                assert_eq!(text_of(&m.body), format!("{who}-{i}"));
                assert_eq!(m.ts, a.ts);
            }
        }
        assert_eq!(n.store.latest_seq("hot").await.unwrap(), 2 * EACH as u64);
    }

    // Each sink saw exactly its node's messages, once, in increasing seq,
    // and only what the stream holds.
    for (n, who, acks) in [(&a, "alice", &acks_a), (&b, "bob", &acks_b)] {
        let seen = n.sink.seen();
        assert_eq!(seen.len(), EACH);
        assert!(seen.windows(2).all(|w| w[0].1 < w[1].1));
        assert!(
            seen.iter()
                .all(|(room, _, from, _)| room == "hot" && from == who)
        );
        let mut acked: Vec<u64> = acks.iter().map(|a| a.seq).collect();
        acked.sort_unstable();
        assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), acked);
    }
    assert!(a.store.commits() > 0 && b.store.commits() > 0);
    // Batching: far fewer publishes than messages.
    assert!(
        a.store.commits() < EACH as u64,
        "one publish per message: {}",
        a.store.commits()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_holds_across_nodes() {
    let nats = Nats::start().await;
    let (a, b) = (node(&nats.url()).await, node(&nats.url()).await);
    let first = send(&a.store, "r", "alice", "one", Some("k1"))
        .await
        .unwrap();
    assert_eq!((first.seq, first.duplicate), (1, false));
    let again = send(&b.store, "r", "alice", "one again", Some("k1"))
        .await
        .unwrap();
    assert_eq!((again.seq, again.ts, again.duplicate), (1, first.ts, true));
    // Another sender's same key is another message.
    let other = send(&b.store, "r", "bob", "two", Some("k1")).await.unwrap();
    assert_eq!((other.seq, other.duplicate), (2, false));
    // Both nodes at once with one key: one message.
    let (x, y) = tokio::join!(
        send(&a.store, "r", "carol", "race", Some("k2")),
        send(&b.store, "r", "carol", "race", Some("k2"))
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.seq, y.seq);
    assert_eq!(x.ts, y.ts);
    assert!(
        x.duplicate != y.duplicate,
        "exactly one stored: {x:?} {y:?}"
    );
    // The same key twice in one node's queue: one message.
    let (p, q) = (
        queue(&a.store, "r", "dan", "twice", Some("k3")).await,
        queue(&a.store, "r", "dan", "twice", Some("k3")).await,
    );
    let (p, q) = (p.await.unwrap().unwrap(), q.await.unwrap().unwrap());
    assert_eq!(p.seq, q.seq);
    assert!(!p.duplicate && q.duplicate);

    assert_eq!(a.store.latest_seq("r").await.unwrap(), 4);
    let all = b.store.read_after("r", 0, 100).await.unwrap();
    assert_eq!(all.len(), 4);
    // Sinks never see a duplicate.
    let mut sunk: Vec<u64> = a
        .sink
        .seen()
        .iter()
        .chain(&b.sink.seen())
        .map(|s| s.1)
        .collect();
    sunk.sort_unstable();
    assert_eq!(sunk, vec![1, 2, 3, 4]);
    a.shutdown().await;
    b.shutdown().await;
}

/// A history request and its page: (before, after, limit, seqs, more).
type Case = (Option<u64>, Option<u64>, usize, Vec<u64>, bool);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_the_same_on_every_node() {
    let nats = Nats::start().await;
    let (a, b) = (node(&nats.url()).await, node(&nats.url()).await);
    // Interleave the nodes, and spread the room among another's messages.
    for i in 1..=25u64 {
        let n = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            send(&n.store, "h", "u", &format!("m{i}"), None)
                .await
                .unwrap()
                .seq,
            i
        );
        send(&n.store, "other", "u", "noise", None).await.unwrap();
    }
    let seqs =
        |p: &switchboard::history::Page| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let cases: [Case; 8] = [
        (None, None, 10, (16..=25).collect(), true),
        (None, None, 100, (1..=25).collect(), false),
        (Some(11), None, 5, (6..=10).collect(), true),
        (Some(4), None, 5, (1..=3).collect(), false),
        (None, Some(20), 10, (21..=25).collect(), false),
        (None, Some(3), 5, (4..=8).collect(), true),
        (Some(20), Some(5), 100, (6..=19).collect(), false),
        (Some(20), Some(5), 3, (6..=8).collect(), true),
    ];
    for (before, after, limit, want, more) in cases {
        let pa = a.store.history("h", before, after, limit).await.unwrap();
        let pb = b.store.history("h", before, after, limit).await.unwrap();
        assert_eq!(pa, pb, "{before:?} {after:?} {limit}");
        assert_eq!(seqs(&pa), want, "{before:?} {after:?} {limit}");
        assert_eq!(pa.more, more, "{before:?} {after:?} {limit}");
        for m in &pa.messages {
            assert_eq!(text_of(&m.body), format!("m{}", m.seq));
        }
    }
    assert!(
        a.store
            .history("none", None, None, 10)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert_eq!(b.store.latest_seq("none").await.unwrap(), 0);
    assert!(a.store.read_after("h", 25, 10).await.unwrap().is_empty());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_keeps_seqs_in_place_and_export_finds_a_users_messages() {
    let nats = Nats::start().await;
    let (a, b) = (node(&nats.url()).await, node(&nats.url()).await);
    for (room, from) in [
        ("r1", "eve"),
        ("r1", "sam"),
        ("r1", "eve"),
        ("r2", "sam"),
        ("r2", "eve"),
    ] {
        send(&a.store, room, from, &format!("{from} in {room}"), None)
            .await
            .unwrap();
    }
    let export = b.store.messages_by_user("eve").await.unwrap();
    let got: Vec<(String, u64)> = export.iter().map(|(r, m)| (r.clone(), m.seq)).collect();
    assert_eq!(
        got,
        vec![("r1".into(), 1), ("r1".into(), 3), ("r2".into(), 2)]
    );
    assert!(
        export
            .iter()
            .all(|(_, m)| m.from == "eve" && m.body.is_some())
    );

    assert_eq!(b.store.erase_user("eve").await.unwrap(), 3);
    assert!(a.store.messages_by_user("eve").await.unwrap().is_empty());
    // Erased seqs stay, without body; the erased newest ones keep the
    // rooms' latest seqs.
    for n in [&a, &b] {
        assert_eq!(n.store.latest_seq("r1").await.unwrap(), 3);
        assert_eq!(n.store.latest_seq("r2").await.unwrap(), 2);
        let r1 = n.store.read_after("r1", 0, 10).await.unwrap();
        assert_eq!(r1.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(r1[0].body.is_none() && r1[2].body.is_none());
        assert_eq!(r1[1].from, "sam");
        let r2 = n.store.history("r2", None, None, 10).await.unwrap();
        assert_eq!(r2.messages.len(), 2);
        assert!(r2.messages[1].body.is_none());
    }
    // A new message never reuses an erased seq, on either node.
    assert_eq!(
        send(&b.store, "r2", "sam", "after", None)
            .await
            .unwrap()
            .seq,
        3
    );
    assert_eq!(
        send(&a.store, "r1", "sam", "after", None)
            .await
            .unwrap()
            .seq,
        4
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_names_the_streams_lifetime() {
    let nats = Nats::start().await;
    let (a, b) = (node(&nats.url()).await, node(&nats.url()).await);
    assert_eq!(a.store.epoch(), b.store.epoch());
    let old = a.store.epoch().to_owned();
    a.shutdown().await;
    b.shutdown().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.delete_stream("SBTEST").await.unwrap();
    let c = node(&nats.url()).await;
    assert_ne!(c.store.epoch(), old);
    assert_eq!(node(&nats.url()).await.store.epoch(), c.store.epoch());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_refuses_appends_quickly_and_recovers_by_itself() {
    let mut nats = Nats::start().await;
    let a = node(&nats.url()).await;
    for i in 1..=3 {
        assert_eq!(
            send(&a.store, "r", "u", &format!("m{i}"), None)
                .await
                .unwrap()
                .seq,
            i
        );
    }
    nats.kill().await;
    wait_until("the store to see NATS down", || a.store.writable().is_err()).await;
    // Quickly: refused before any publish is tried, so no request timeout
    // is waited out (a publish tried would count as a failed commit).
    let (commits, failed) = (a.store.commits(), a.store.failed_commits());
    let refused = send(&a.store, "r", "u", "lost?", None).await;
    assert!(
        matches!(refused, Err(AppendError::Unavailable { .. })),
        "{refused:?}"
    );
    assert_eq!(
        (a.store.commits(), a.store.failed_commits()),
        (commits, failed),
        "refused without a publish"
    );
    assert!(matches!(
        a.store.latest_seq("r").await,
        Err(ReadError::Unavailable(_))
    ));
    assert_eq!(a.sink.seen().len(), 3, "nothing refused reaches the sink");

    nats.restart().await;
    wait_until("the store writable again after NATS came back", || {
        a.store.writable().is_ok()
    })
    .await;
    // JetStream may need a moment after the server is back: retry the
    // refused append, as a client would.
    let again = eventually_every("m4 stored", DEADLINE, RESEND_PAUSE, async || {
        match send(&a.store, "r", "u", "m4", None).await {
            Ok(x) => Ok(x),
            Err(AppendError::Unavailable { .. }) => Err("unavailable".to_owned()),
            Err(e) => panic!("{e:?}"),
        }
    })
    .await;
    assert_eq!(again.seq, 4);
    let all = a.store.read_after("r", 0, 10).await.unwrap();
    let texts: BTreeMap<u64, String> = all.iter().map(|m| (m.seq, text_of(&m.body))).collect();
    assert_eq!(
        texts,
        BTreeMap::from([
            (1, "m1".into()),
            (2, "m2".into()),
            (3, "m3".into()),
            (4, "m4".into())
        ])
    );
    a.shutdown().await;
}

/// Sends until stored, resending after `Unavailable` as a client does
/// (without a key: a resend of a message that was in fact stored would
/// show as a duplicate in history).
async fn send_until_stored(store: &JetStreamStore, room: &str, from: &str, text: &str) -> u64 {
    let what = format!("{text} stored");
    // Owned, so that the polling future is `Send` in the senders' tasks:
    // an async closure's future that borrows a borrowed `&str` is not
    // proven `Send` for every lifetime.
    let (store, room, from, text) = (
        store.clone(),
        room.to_owned(),
        from.to_owned(),
        text.to_owned(),
    );
    eventually_every(&what, 2 * DEADLINE, RESEND_PAUSE, async move || {
        let sent = send(&store, &room, &from, &text, None).await;
        match sent {
            Ok(a) => Ok(a.seq),
            Err(AppendError::Unavailable { .. }) => Err("unavailable".to_owned()),
            Err(e) => panic!("{text}: {e:?}"),
        }
    })
    .await
}

/// History holds exactly the acked messages: seqs 1..=n, each text once,
/// each at its acked seq.
async fn assert_history_is(store: &JetStreamStore, room: &str, acked: &BTreeMap<String, u64>) {
    let all = store.read_after(room, 0, 10_000).await.unwrap();
    assert_eq!(
        all.len(),
        acked.len(),
        "history holds exactly the acked messages"
    );
    for (m, seq) in all.iter().zip(1..) {
        assert_eq!(m.seq, seq);
        assert_eq!(acked.get(&text_of(&m.body)), Some(&seq));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_kill_during_sends_loses_and_duplicates_nothing() {
    let mut nats = Nats::start().await;
    let a = node(&nats.url()).await;
    const COUNT: usize = 150;
    let store = a.store.clone();
    let sender = tokio::spawn(async move {
        let mut acked = BTreeMap::new();
        for i in 0..COUNT {
            let text = format!("m{i}");
            let seq = send_until_stored(&store, "r", "u", &text).await;
            acked.insert(text, seq);
        }
        acked
    });
    // Kill while sends are under way, then bring NATS back once the node
    // has seen it gone (the sends meanwhile meet a dead NATS).
    wait_until("sends to progress", || a.sink.seen().len() >= COUNT / 3).await;
    nats.kill().await;
    wait_until("the store to see NATS down", || a.store.writable().is_err()).await;
    nats.restart().await;
    let acked = tokio::time::timeout(3 * DEADLINE, sender)
        .await
        .expect("every send ends")
        .unwrap();
    assert_eq!(acked.len(), COUNT);
    assert_history_is(&a.store, "r", &acked).await;
    let mut sunk: Vec<u64> = a.sink.seen().iter().map(|s| s.1).collect();
    sunk.sort_unstable();
    assert_eq!(sunk, (1..=COUNT as u64).collect::<Vec<_>>());
    a.shutdown().await;
}

/// A publish that JetStream stored but whose ack never came (the server
/// stalled while it was in flight) is read back and answered with the seq
/// it is stored under; it is never numbered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_publish_whose_ack_was_lost_is_answered_with_its_seq() {
    let nats = Nats::start().await;
    let a = node(&nats.url()).await;
    assert_eq!(send(&a.store, "r", "u", "m1", None).await.unwrap().seq, 1);
    nats.pause().await;
    let m2 = queue(&a.store, "r", "u", "m2", None).await;
    // The publish waits in the stalled server's socket until its ack is
    // given up on.
    wait_until("the lost ack to be noticed", || a.store.writable().is_err()).await;
    nats.resume();
    let m2 = tokio::time::timeout(DEADLINE, m2)
        .await
        .expect("answered once the server is back")
        .unwrap()
        .unwrap();
    assert_eq!(m2.seq, 2);
    assert!(!m2.duplicate);
    let m3 = send_until_stored(&a.store, "r", "u", "m3").await;
    assert_eq!(m3, 3);
    let acked = BTreeMap::from([("m1".into(), 1), ("m2".into(), 2), ("m3".into(), 3)]);
    assert_history_is(&a.store, "r", &acked).await;
    a.shutdown().await;
}

/// A node of an R3 stream, connected to the one server at `url`.
async fn r3_node(url: &str) -> Node {
    let mut config = cluster_config(url);
    config.replicas = 3;
    node_with(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nats_servers_r3_keep_seqs_dense_while_one_dies() {
    let mut servers = Nats::cluster(3).await;
    let urls: Vec<String> = servers.iter().map(Nats::url).collect();
    // Two nodes on the two servers that stay up.
    let (a, b) = (r3_node(&urls[0]).await, r3_node(&urls[1]).await);
    const EACH: usize = 100;
    let sender = |store: JetStreamStore, who: &'static str| {
        tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            for i in 0..EACH {
                let text = format!("{who}{i}");
                let seq = send_until_stored(&store, "r", who, &text).await;
                acked.insert(text, seq);
            }
            acked
        })
    };
    let (sa, sb) = (sender(a.store.clone(), "a"), sender(b.store.clone(), "b"));
    wait_until("sends to progress", || {
        a.sink.seen().len() + b.sink.seen().len() >= EACH / 2
    })
    .await;
    servers[2].kill().await;
    let mut acked = tokio::time::timeout(3 * DEADLINE, sa)
        .await
        .unwrap()
        .unwrap();
    acked.extend(
        tokio::time::timeout(3 * DEADLINE, sb)
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(acked.len(), 2 * EACH);
    assert_history_is(&a.store, "r", &acked).await;
    assert_history_is(&b.store, "r", &acked).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_answers_every_queued_append_and_the_writer_exits() {
    let nats = Nats::start().await;
    let a = node(&nats.url()).await;
    let mut rxs = Vec::new();
    for i in 0..50 {
        let room = if i % 2 == 0 { "x" } else { "y" };
        rxs.push(queue(&a.store, room, "u", &format!("m{i}"), None).await);
    }
    let store = a.store.clone();
    a.shutdown().await;
    for rx in rxs {
        let r = rx.await.expect("every queued append is answered");
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(store.latest_seq("x").await.unwrap(), 25);
    assert_eq!(store.latest_seq("y").await.unwrap(), 25);
    let (reply, _rx) = oneshot::channel();
    let late = store
        .append(Append {
            room: Arc::from("x"),
            from: Arc::from("u"),
            body: body("late"),
            key: None,
            reply,
        })
        .await;
    assert!(late.is_err(), "the store takes no append after stop");
}

/// Sends with `key` until the answer is not `Unavailable`.
async fn send_keyed_until_answered(store: &JetStreamStore, text: &str, key: &str) -> Appended {
    let what = format!("{text} answered");
    eventually_every(
        &what,
        DEADLINE,
        Duration::from_millis(100),
        async || match send(store, "r", "u", text, Some(key)).await {
            Ok(a) => Ok(a),
            Err(AppendError::Unavailable { .. }) => Err("unavailable".to_owned()),
            Err(e) => panic!("{e:?}"),
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reserved_by_a_dead_node_is_taken_over_once_stale() {
    use switchboard::cluster::store::idempotency_bucket_key;
    let nats = Nats::start().await;
    let a = node(&nats.url()).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let kv = js.get_key_value("SBTEST_KEYS").await.unwrap();

    // A node reserved k1 and died before publishing: the key is busy, then
    // taken over and stored once.
    kv.put(idempotency_bucket_key("r", "u", "k1"), "p 0".into())
        .await
        .unwrap();
    let busy = send(&a.store, "r", "u", "one", Some("k1")).await;
    assert!(
        matches!(busy, Err(AppendError::Unavailable { .. })),
        "{busy:?}"
    );
    let stored = send_keyed_until_answered(&a.store, "one", "k1").await;
    assert_eq!((stored.seq, stored.duplicate), (1, false));

    // A node published k2's message and died before recording it: the
    // resend finds the message instead of storing it again.
    let first = send(&a.store, "r", "u", "two", Some("k2")).await.unwrap();
    assert_eq!(first.seq, 2);
    kv.put(idempotency_bucket_key("r", "u", "k2"), "p 0".into())
        .await
        .unwrap();
    let again = send_keyed_until_answered(&a.store, "two", "k2").await;
    assert_eq!((again.seq, again.ts, again.duplicate), (2, first.ts, true));
    assert_eq!(a.store.latest_seq("r").await.unwrap(), 2);
    a.shutdown().await;
}

/// The end of the window in which a key's reservation was taken over
/// while its owner's publish was in doubt: the other node stored the
/// resend, and the owner's publish lost the position. Here node A holds the
/// key (its entry was deleted, so A's reservation succeeds) and numbers
/// from a tail it cached before B stored the keyed message: A's publish
/// loses, and A must find B's message rather than store a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_loses_its_position_finds_its_key_stored_by_another_node() {
    use switchboard::cluster::store::idempotency_bucket_key;
    let nats = Nats::start().await;
    let (a, b) = (node(&nats.url()).await, node(&nats.url()).await);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let kv = js.get_key_value("SBTEST_KEYS").await.unwrap();

    // A caches the room's tail.
    assert_eq!(send(&a.store, "r", "u", "zero", None).await.unwrap().seq, 1);
    let stored = send(&b.store, "r", "u", "one", Some("k")).await.unwrap();
    assert_eq!((stored.seq, stored.duplicate), (2, false));
    kv.purge(idempotency_bucket_key("r", "u", "k"))
        .await
        .unwrap();

    let again = send(&a.store, "r", "u", "one", Some("k")).await.unwrap();
    assert_eq!((again.seq, again.ts, again.duplicate), (2, stored.ts, true));
    assert_eq!(b.store.latest_seq("r").await.unwrap(), 2, "stored once");
    // A's group still stores its unkeyed messages.
    let next = send(&a.store, "r", "u", "two", None).await.unwrap();
    assert_eq!(next.seq, 3);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_a_send_in_doubt_waits_and_new_sends_are_refused() {
    let mut servers = Nats::cluster(3).await;
    let a = r3_node(&servers[0].url()).await;
    for i in 1..=3 {
        assert_eq!(
            send(&a.store, "r", "u", &format!("m{i}"), None)
                .await
                .unwrap()
                .seq,
            i
        );
    }
    servers[1].kill().await;
    servers[2].kill().await;
    // The first send after the loss is refused (JetStream answered it) or
    // stays unanswered (its outcome unknown to the node) until quorum is
    // back; it is never answered "not stored" while it might be stored.
    let first = queue(&a.store, "r", "u", "m4", None).await;
    wait_until("the store to see quorum lost", || {
        a.store.writable().is_err()
    })
    .await;
    // Later sends are refused, by the writer while the store is marked
    // down (that no publish is tried then is checked with NATS down, where
    // no send in doubt retries meanwhile).
    let refused = send(&a.store, "r", "u", "refused", None).await;
    assert!(
        matches!(refused, Err(AppendError::Unavailable { .. })),
        "{refused:?}"
    );
    servers[1].restart().await;
    servers[2].restart().await;
    let first = tokio::time::timeout(3 * DEADLINE, first)
        .await
        .expect("the first send is answered once quorum is back")
        .unwrap();
    let mut acked: BTreeMap<String, u64> = (1..=3).map(|i| (format!("m{i}"), i)).collect();
    match first {
        Ok(x) => {
            assert_eq!(x.seq, 4);
            acked.insert("m4".into(), 4);
        }
        Err(AppendError::Unavailable { .. }) => {}
        Err(e) => panic!("{e:?}"),
    }
    let next = acked.len() as u64 + 1;
    assert_eq!(send_until_stored(&a.store, "r", "u", "m5").await, next);
    acked.insert("m5".into(), next);
    assert_history_is(&a.store, "r", &acked).await;
    a.shutdown().await;
}
