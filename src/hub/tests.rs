//! The hub's unit tests: rooms and their slots, presence and typing
//! batching within the delivery budget, other nodes' users, and fan-out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use protocol::ServerFrame;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::delivery::EncodedCommit;
use crate::delivery::{OutboxReceiver, Outgoing, outbox};
use crate::history::Committed;
use crate::hub::room::SCAN_MAX;
use crate::metrics::Metrics;

/// Joins session `id` of `user` to room `r` of `hub`; its queue.
pub(crate) fn member(hub: &Hub, id: SessionId, user: &str) -> OutboxReceiver {
    let (tx, rx) = outbox(
        64,
        1 << 20,
        64,
        CancellationToken::new(),
        Arc::new(Metrics::default()),
    );
    hub.join(
        "r",
        Member {
            session: id,
            user: Arc::from(user),
            outbox: tx,
        },
    );
    rx
}

/// Joins session `id` of `user` to `room` of `hub`.
fn member_in(hub: &Hub, room: &str, id: SessionId, user: &str) -> (JoinOutcome, OutboxReceiver) {
    let (tx, rx) = outbox(
        64,
        1 << 20,
        64,
        CancellationToken::new(),
        Arc::new(Metrics::default()),
    );
    let outcome = hub.join(
        room,
        Member {
            session: id,
            user: Arc::from(user),
            outbox: tx,
        },
    );
    (outcome, rx)
}

fn hub_with(presence_list_max: usize, off: &[&str], typing_list_max: usize) -> Hub {
    Hub::with_options(HubOptions {
        presence_list_max,
        presence_events_off: off.iter().map(|p| p.to_string()).collect(),
        typing_list_max,
        ..HubOptions::default()
    })
}

/// The events queued for a session, decoded.
fn frames(rx: &mut OutboxReceiver) -> Vec<ServerFrame> {
    events(rx)
        .iter()
        .map(|t| ServerFrame::from_json(t).unwrap())
        .collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A room of one member is a connection's share in a one-room-per-
/// connection load (figure 4 of BENCHMARKS.md): this bounds it at its
/// size before the cluster fields were added (144 bytes), with the
/// slots boxed.
#[test]
fn a_room_is_no_bigger_than_before_the_cluster() {
    assert!(
        std::mem::size_of::<Room>() <= 144,
        "Room is {} bytes",
        std::mem::size_of::<Room>()
    );
}

/// Checks that every member's slot points at it and that the users'
/// session counts match the members.
fn assert_consistent(hub: &Hub, room: &str) {
    let r = hub.rooms.get(room).unwrap();
    let mapped = r.members.len() > SCAN_MAX;
    let slots = r.slots.as_ref().map(|s| s.len());
    assert!(
        slots.is_none_or(|n| n == r.members.len()),
        "slots are kept for every member or for none"
    );
    if mapped {
        assert_eq!(slots, Some(r.members.len()), "a big room keeps slots");
    }
    if r.members.len() <= SCAN_MAX / 2 {
        assert!(slots.is_none(), "a small room keeps no slots");
    }
    let mut per_user: BTreeMap<Arc<str>, u32> = BTreeMap::new();
    for (i, m) in r.members.iter().enumerate() {
        assert_eq!(r.position(m.session), Some(i), "slot of {}", m.session);
        *per_user.entry(m.user.clone()).or_default() += 1;
    }
    assert_eq!(per_user, r.users);
}

#[test]
fn a_room_crossing_the_scan_bound_both_ways_finds_every_member() {
    let hub = Hub::new();
    let n = (SCAN_MAX * 3) as u64;
    let mut rxs = Vec::new();
    for id in 0..n {
        rxs.push(member_in(&hub, "r", id, &format!("u{id}")).1);
        assert_consistent(&hub, "r");
    }
    // Down to two members, in a scrambled order, then up again.
    let mut left = Vec::new();
    for k in 0..n - 2 {
        let id = (k * 7) % n;
        assert!(hub.leave("r", id), "{id} was a member");
        assert!(!hub.leave("r", id), "{id} left twice");
        left.push(id);
        assert_consistent(&hub, "r");
    }
    for id in left {
        rxs.push(member_in(&hub, "r", id, &format!("u{id}")).1);
        assert_consistent(&hub, "r");
    }
    let r = hub.rooms.get("r").unwrap();
    assert_eq!(r.members.len() as u64, n);
    assert_eq!(r.user_count(), n);
}

#[test]
fn leaves_find_their_member_by_slot_and_keep_the_room_consistent() {
    let hub = Hub::new();
    let mut rxs = BTreeMap::new();
    for id in 0..300u64 {
        let (_, rx) = member_in(&hub, "r", id, &format!("u{}", id % 100));
        rxs.insert(id, rx);
    }
    assert_consistent(&hub, "r");
    // Leave half, in a scrambled order (a fixed stride through 0..300).
    let mut gone = Vec::new();
    for k in 0..150u64 {
        let id = (k * 7) % 300;
        assert!(hub.leave("r", id), "{id} was a member");
        assert!(!hub.leave("r", id), "{id} left twice");
        gone.push(id);
        assert_consistent(&hub, "r");
    }
    // Every remaining member, and only those, gets a commit's message.
    let body = serde_json::value::to_raw_value(&1).unwrap();
    hub.deliver(EncodedCommit::encode(&[Committed {
        room: "r",
        seq: 1,
        from: "u0",
        ts: 0,
        body: &body,
    }]));
    for (id, rx) in &mut rxs {
        let got = std::iter::from_fn(|| rx.try_recv())
            .filter(|o| matches!(o, Outgoing::Message(_)))
            .count();
        assert_eq!(got, usize::from(!gone.contains(id)), "session {id}");
    }
    // Users with a session left are still there: 1, 2, 3... by stride.
    let page = hub.members("r", None, 1000);
    let r = hub.rooms.get("r").unwrap();
    assert_eq!(page.count, r.users.len() as u64);
    assert_eq!(r.members.len(), 150);
}

#[test]
fn joined_lists_at_most_the_bound_and_counts_every_user() {
    let hub = hub_with(3, &[], 5);
    let mut last = None;
    for i in 0..10 {
        // Two sessions per user: the count is of users.
        member_in(&hub, "r", 2 * i, &format!("u{i}"));
        last = Some(member_in(&hub, "r", 2 * i + 1, &format!("u{i}")).0);
    }
    let outcome = last.unwrap();
    assert_eq!(outcome.count, 10);
    assert_eq!(outcome.presence.get(), r#"["u0","u1","u2"]"#);
}

#[test]
fn presence_events_carry_the_count_and_at_most_the_bound_of_names() {
    let hub = hub_with(3, &[], 5);
    let (_, mut watcher) = member_in(&hub, "r", 100, "watcher");
    assert_eq!(hub.flush_presence(), 1);
    frames(&mut watcher);
    for i in 0..10 {
        member_in(&hub, "r", i, &format!("u{i}"));
    }
    assert_eq!(hub.flush_presence(), 1);
    let got = frames(&mut watcher);
    let [
        ServerFrame::Presence {
            count,
            joined,
            left,
            truncated,
            ..
        },
    ] = got.as_slice()
    else {
        panic!("one presence event: {got:?}")
    };
    assert_eq!(
        (*count, joined.len(), left.len(), *truncated),
        (11, 3, 0, true)
    );
    // A user's later sessions change nothing; their last leave does.
    member_in(&hub, "r", 50, "u1");
    assert_eq!(hub.flush_presence(), 0);
    assert!(hub.leave("r", 1));
    assert_eq!(hub.flush_presence(), 0, "u1 has a session left");
    assert!(hub.leave("r", 50));
    assert!(hub.leave("r", 2));
    assert_eq!(hub.flush_presence(), 1);
    assert_eq!(
        frames(&mut watcher),
        vec![ServerFrame::Presence {
            room: "r".into(),
            count: 9,
            joined: vec![],
            left: names(&["u1", "u2"]),
            truncated: false,
        }]
    );
}

#[test]
fn rooms_matching_presence_events_off_send_no_presence_events() {
    let hub = hub_with(100, &["quiet-*"], 5);
    let (_, mut quiet) = member_in(&hub, "quiet-1", 1, "a");
    let (_, mut loud) = member_in(&hub, "loud", 2, "a");
    let (outcome, _) = member_in(&hub, "quiet-1", 3, "b");
    member_in(&hub, "loud", 4, "b");
    // The count and names still come with `joined` and pages.
    assert_eq!(outcome.count, 2);
    assert_eq!(outcome.presence.get(), r#"["a","b"]"#);
    assert_eq!(hub.members("quiet-1", None, 10).users, names(&["a", "b"]));
    assert_eq!(hub.flush_presence(), 1, "only `loud` has events");
    assert!(frames(&mut quiet).is_empty());
    assert_eq!(frames(&mut loud).len(), 1);
}

#[test]
fn typing_is_coalesced_into_one_event_per_flush() {
    let hub = hub_with(100, &[], 2);
    let (_, mut watcher) = member_in(&hub, "r", 100, "watcher");
    let mut typers: Vec<_> = (0..10)
        .map(|i| member_in(&hub, "r", i, &format!("t{i}")).1)
        .collect();
    hub.flush_presence();
    frames(&mut watcher);
    for rx in &mut typers {
        frames(rx);
    }
    for _ in 0..3 {
        for i in (0..10).rev() {
            hub.typing("r", &Arc::from(format!("t{i}")));
        }
    }
    assert!(frames(&mut watcher).is_empty(), "nothing before the flush");
    assert_eq!(hub.flush_typing(), 1);
    let one = ServerFrame::Typing {
        room: "r".into(),
        count: 10,
        users: names(&["t0", "t1"]),
    };
    assert_eq!(frames(&mut watcher), vec![one.clone()]);
    // With several typers, the typers hear it too.
    assert_eq!(frames(&mut typers[5]), vec![one]);
    assert_eq!(hub.flush_typing(), 0);
    // A lone typer's own sessions are skipped.
    assert_eq!(frames(&mut typers[3]).len(), 1);
    hub.typing("r", &Arc::from("t3"));
    assert_eq!(hub.flush_typing(), 1);
    assert!(frames(&mut typers[3]).is_empty());
    assert_eq!(
        frames(&mut watcher),
        vec![ServerFrame::Typing {
            room: "r".into(),
            count: 1,
            users: names(&["t3"]),
        }]
    );
}

#[test]
fn big_rooms_space_their_events_within_the_fanout_budget() {
    let hub = Hub::with_options(HubOptions {
        presence_fanout_per_flush: 10,
        typing_fanout_per_flush: 10,
        ..HubOptions::default()
    });
    let (_, mut watcher) = member_in(&hub, "big", 1000, "w");
    for i in 0..24 {
        member_in(&hub, "big", i, &format!("u{i}"));
    }
    let (_, mut small) = member_in(&hub, "small", 2000, "s");
    // Flush 0: 25 sessions use three flushes' budget.
    assert_eq!(hub.flush_presence(), 2);
    frames(&mut watcher);
    frames(&mut small);
    member_in(&hub, "big", 500, "late");
    for flush in 1..=2 {
        member_in(&hub, "small", 2000 + flush, &format!("s{flush}"));
        assert_eq!(
            hub.flush_presence(),
            1,
            "only the small room, flush {flush}"
        );
        assert_eq!(frames(&mut small).len(), 1);
    }
    assert!(frames(&mut watcher).is_empty(), "the big room waits");
    assert_eq!(hub.flush_presence(), 1);
    let got = frames(&mut watcher);
    assert!(
        matches!(got.as_slice(), [ServerFrame::Presence { count: 26, joined, .. }] if joined == &names(&["late"])),
        "{got:?}"
    );
    // Typing is spaced the same way: 26 sessions, three flushes.
    hub.typing("big", &Arc::from("u1"));
    assert_eq!(hub.flush_typing(), 1);
    frames(&mut watcher);
    hub.typing("big", &Arc::from("u2"));
    assert_eq!((hub.flush_typing(), hub.flush_typing()), (0, 0));
    assert!(frames(&mut watcher).is_empty());
    assert_eq!(hub.flush_typing(), 1);
    assert_eq!(frames(&mut watcher).len(), 1);
}

#[test]
fn members_are_paged_by_name() {
    let hub = Hub::new();
    for i in 0..25 {
        member_in(&hub, "r", i, &format!("u{i:02}"));
    }
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = hub.members("r", after.as_deref(), 10);
        assert_eq!(page.count, 25);
        assert!(page.users.len() <= 10);
        after = page.users.last().cloned();
        all.extend(page.users);
        if !page.more {
            break;
        }
    }
    let want: Vec<String> = (0..25).map(|i| format!("u{i:02}")).collect();
    assert_eq!(all, want);
    // A cursor need not be a present user.
    assert_eq!(
        hub.members("r", Some("u195"), 2).users,
        names(&["u20", "u21"])
    );
    assert_eq!(hub.members("nowhere", None, 2).count, 0);
}

fn events(rx: &mut OutboxReceiver) -> Vec<String> {
    std::iter::from_fn(|| rx.try_recv())
        .map(|o| match o {
            Outgoing::Ephemeral(t) => String::from_utf8_lossy(t.payload()).into_owned(),
            Outgoing::Message(_) => panic!("no messages were sent"),
        })
        .collect()
}

/// Records what the hub tells its peers, as text.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<String>>);

impl Recorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Peers for Recorder {
    fn interest(&self, room: &str, on: bool) {
        self.0.lock().unwrap().push(format!("interest {room} {on}"));
    }
    fn typing(&self, room: &str, user: &str) {
        self.0.lock().unwrap().push(format!("typing {room} {user}"));
    }
    fn presence(&self, room: &str, user: &str, joined: bool) {
        (self.0.lock().unwrap()).push(format!("presence {room} {user} {joined}"));
    }
}

fn hub_with_peers() -> (Hub, Arc<Recorder>) {
    let hub = Hub::new();
    let peers = Arc::new(Recorder::default());
    assert!(hub.set_peers(peers.clone()));
    assert!(!hub.set_peers(Arc::new(Recorder::default())), "set once");
    (hub, peers)
}

#[test]
fn peers_hear_of_interest_first_and_last_local_sessions_and_typing_once() {
    let (hub, peers) = hub_with_peers();
    let (_, _a1) = member_in(&hub, "r", 1, "a");
    let (_, _a2) = member_in(&hub, "r", 2, "a");
    let (_, _b) = member_in(&hub, "r", 3, "b");
    assert_eq!(
        peers.take(),
        ["interest r true", "presence r a true", "presence r b true"]
    );
    for _ in 0..3 {
        hub.typing("r", &Arc::from("a"));
    }
    assert_eq!(peers.take(), ["typing r a"], "once per flush");
    hub.flush_typing();
    hub.typing("r", &Arc::from("a"));
    assert_eq!(peers.take(), ["typing r a"], "again after a flush");
    assert!(hub.leave("r", 1));
    assert!(peers.take().is_empty(), "a has a session left");
    assert!(hub.leave("r", 2));
    assert!(hub.leave("r", 3));
    assert_eq!(
        peers.take(),
        [
            "presence r a false",
            "presence r b false",
            "interest r false"
        ]
    );
    let (_, _c) = member_in(&hub, "r", 4, "c");
    assert_eq!(peers.take(), ["interest r true", "presence r c true"]);
    // Remote typing reaches the members but not the peers again.
    hub.remote_typing("r", "far");
    assert!(peers.take().is_empty());
}

#[test]
fn users_on_other_nodes_count_once_and_leave_with_their_node() {
    let (hub, peers) = hub_with_peers();
    let (_, mut watcher) = member_in(&hub, "r", 1, "w");
    let (_, _u) = member_in(&hub, "r", 2, "u");
    hub.flush_presence();
    frames(&mut watcher);
    peers.take();
    // u is also on node b; v only there, on two nodes.
    hub.remote_presence("r", "b", "u", true);
    hub.remote_presence("r", "b", "v", true);
    hub.remote_presence("r", "c", "v", true);
    hub.remote_presence("r", "c", "v", true);
    assert_eq!(hub.members("r", None, 10).users, names(&["u", "v", "w"]));
    assert_eq!(hub.local_users("r"), names(&["u", "w"]));
    assert_eq!(hub.flush_presence(), 1);
    assert_eq!(
        frames(&mut watcher),
        vec![ServerFrame::Presence {
            room: "r".into(),
            count: 3,
            joined: names(&["v"]),
            left: vec![],
            truncated: false,
        }]
    );
    // u's last local session leaves: the peers hear it, u stays present.
    assert!(hub.leave("r", 2));
    assert_eq!(peers.take(), ["presence r u false"]);
    assert_eq!(hub.flush_presence(), 0);
    assert_eq!(hub.members("r", None, 10).count, 3);
    assert_eq!(hub.local_users("r"), names(&["w"]));
    // u back on this node: a first local session, no presence change.
    let (_, _u) = member_in(&hub, "r", 3, "u");
    assert_eq!(peers.take(), ["presence r u true"]);
    assert_eq!(hub.flush_presence(), 0);
    // Node b is gone: v stays through c, u through its local session.
    hub.node_gone("b");
    assert_eq!(hub.flush_presence(), 0);
    assert_eq!(hub.members("r", None, 10).count, 3);
    hub.node_gone("c");
    assert_eq!(hub.flush_presence(), 1);
    assert_eq!(
        frames(&mut watcher),
        vec![ServerFrame::Presence {
            room: "r".into(),
            count: 2,
            joined: vec![],
            left: names(&["v"]),
            truncated: false,
        }]
    );
    assert!(hub.leave("r", 3));
    assert_consistent(&hub, "r");
    // Reports for rooms without local members are not kept.
    hub.remote_presence("elsewhere", "b", "x", true);
    assert_eq!(hub.members("elsewhere", None, 10).count, 0);
}

#[test]
fn a_nodes_member_list_replaces_what_it_had() {
    let hub = Hub::new();
    let (_, mut watcher) = member_in(&hub, "r", 1, "w");
    hub.remote_members("r", "b", &names(&["x", "y"]));
    hub.flush_presence();
    frames(&mut watcher);
    hub.remote_members("r", "b", &names(&["y", "z"]));
    assert_eq!(hub.flush_presence(), 1);
    assert_eq!(
        frames(&mut watcher),
        vec![ServerFrame::Presence {
            room: "r".into(),
            count: 3,
            joined: names(&["z"]),
            left: names(&["x"]),
            truncated: false,
        }]
    );
    hub.remote_members("r", "b", &[]);
    assert_eq!(hub.members("r", None, 10).users, names(&["w"]));
    assert!(hub.rooms.get("r").unwrap().remote.is_none(), "freed");
}

#[test]
fn remote_typing_is_coalesced_with_local_typing() {
    let hub = hub_with(100, &[], 5);
    let (_, mut watcher) = member_in(&hub, "r", 1, "w");
    let (_, _t) = member_in(&hub, "r", 2, "t");
    hub.flush_presence();
    frames(&mut watcher);
    hub.typing("r", &Arc::from("t"));
    hub.remote_typing("r", "far");
    hub.remote_typing("r", "far");
    assert_eq!(hub.flush_typing(), 1);
    assert_eq!(
        frames(&mut watcher),
        vec![ServerFrame::Typing {
            room: "r".into(),
            count: 2,
            users: names(&["far", "t"]),
        }]
    );
}

#[test]
fn delivery_starts_after_every_unknown_join_reported_at_the_lowest_report() {
    let hub = Hub::new();
    let (first, _a) = member_in(&hub, "r", 1, "a");
    let (second, _b) = member_in(&hub, "r", 2, "b");
    assert_eq!((first.latest, second.latest), (None, None));
    // b read 12 and reports first; a read 10 and is still on its way.
    hub.note_latest("r", 12);
    assert_eq!(hub.delivery_start("r"), None, "a has not reported");
    let (third, _c) = member_in(&hub, "r", 3, "c");
    assert_eq!(third.latest, Some(12), "known: c reports nothing");
    hub.note_latest("r", 10);
    assert_eq!(hub.delivery_start("r"), Some(10));
    assert_eq!(hub.latest("r"), Some(12));
    assert_eq!(hub.delivery_start("nowhere"), None);
}

#[test]
fn latest_is_known_once_noted() {
    let hub = Hub::new();
    let (_, _m) = member_in(&hub, "r", 1, "u");
    assert_eq!(hub.latest("r"), None);
    hub.note_latest("r", 7);
    assert_eq!(hub.latest("r"), Some(7));
    assert_eq!(hub.latest("nowhere"), None);
}

#[test]
fn presence_changes_are_batched_into_one_event_per_flush() {
    let hub = Hub::new();
    let mut first = member(&hub, 1, "u0");
    let mut rest: Vec<_> = (2..=50)
        .map(|i| member(&hub, i, &format!("u{i}")))
        .collect();
    // Joins send nothing by themselves.
    assert!(events(&mut first).is_empty());
    assert_eq!(hub.flush_presence(), 1);
    // One event for the 50 arrivals, to every member.
    let got = events(&mut first);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].contains("\"u0\"") && got[0].contains("\"u50\""),
        "{}",
        got[0]
    );
    for rx in &mut rest {
        assert_eq!(events(rx).len(), 1);
    }
    // Nothing changed since: nothing is sent.
    assert_eq!(hub.flush_presence(), 0);
    // A lone departure skips the leaver's own sessions, as before.
    assert!(hub.leave("r", 2));
    assert_eq!(hub.flush_presence(), 1);
    assert_eq!(
        events(&mut first),
        vec![r#"{"type":"presence","room":"r","count":49,"left":["u2"]}"#]
    );
    assert!(
        events(&mut rest[0]).is_empty(),
        "u2 left: its outbox gets nothing"
    );
    // Arriving and leaving within one interval reports the user as gone.
    let _late = member(&hub, 99, "late");
    assert!(hub.leave("r", 99));
    assert_eq!(hub.flush_presence(), 1);
    assert_eq!(
        events(&mut first),
        vec![r#"{"type":"presence","room":"r","count":49,"left":["late"]}"#]
    );
}

/// The scrape's totals against the operators' full snapshot, through the
/// hub: sessions registered and joined, a commit fanned out, queues taken
/// and sessions gone with bytes still queued.
#[test]
fn the_hubs_running_totals_agree_with_its_session_snapshot() {
    let hub = Hub::new();
    let agree = |hub: &Hub| {
        let all = hub.sessions();
        let queued: Vec<u64> = all.iter().map(|s| s.queued_bytes as u64).collect();
        assert_eq!(hub.session_count(), all.len());
        assert_eq!(hub.registry().queued_bytes(), queued.iter().sum::<u64>());
        assert_eq!(
            hub.registry().largest_queue(),
            queued.iter().copied().max().unwrap_or(0)
        );
    };
    let mut rxs = Vec::new();
    for id in 0..5 {
        let rx = member(&hub, id, &format!("u{id}"));
        // The entry's outbox is the member's: take it from the room.
        let outbox = hub.rooms.get("r").unwrap().members[id as usize]
            .outbox
            .clone();
        hub.register_session(
            id,
            SessionEntry {
                user: Arc::from(format!("u{id}")),
                remote: ([127, 0, 0, 1], 1).into(),
                connected_at_ms: 0,
                outbox,
                stats: Arc::new(SessionStats::default()),
            },
        );
        rxs.push(rx);
        agree(&hub);
    }
    let body = serde_json::value::to_raw_value(&"hello").unwrap();
    for seq in 1..=3 {
        hub.deliver(EncodedCommit::encode(&[Committed {
            room: "r",
            seq,
            from: "u0",
            ts: 0,
            body: &body,
        }]));
    }
    assert!(hub.registry().queued_bytes() > 0);
    agree(&hub);
    // One session takes its whole queue, another one message of it.
    while rxs[1].try_recv().is_some() {}
    rxs[2].try_recv();
    rxs[2].settle();
    agree(&hub);
    // A session goes with bytes queued; another leaves its room first.
    hub.unregister_session(3);
    agree(&hub);
    assert!(hub.leave("r", 4));
    hub.unregister_session(4);
    agree(&hub);
    assert_eq!(hub.session_count(), 3);
}
