//! Rooms, their members and presence, and fan-out of committed messages.
//!
//! The hub owns the room registry (a `DashMap` from room name to [`Room`]).
//! It is called from session tasks (join, leave, typing) and from the store
//! writer thread (every committed message, in seq order per room).
//!
//! Invariants:
//! - The hub never awaits. It never holds a map guard across an `.await`,
//!   and it reaches a session only through that session's bounded
//!   [`Outbox`], with a non-blocking push.
//! - A message is encoded once into shared bytes; each recipient gets a
//!   reference-counted handle, never a copy.
//! - A room's members see its messages in commit order, which is seq order,
//!   because only the single store writer thread calls [`CommitSink::committed`].
//! - Presence changes are batched: a join or leave only records the change,
//!   and [`Hub::flush_presence`], every `presence_interval_ms`, sends each
//!   changed room one `presence` event with all its changes. Filling a room
//!   of N therefore costs each member one event per interval, not one per
//!   join (which made filling a room O(N²)).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use protocol::ServerFrame;
use rustc_hash::FxHashMap;
use serde_json::value::RawValue;

use crate::session::{CloseReason, Delivery, Encoded, Outbox, WireFrame};
use crate::store::{CommitSink, Committed};

/// A session's process-unique id.
pub type SessionId = u64;

/// One session's membership of a room.
#[derive(Debug, Clone)]
pub struct Member {
    pub session: SessionId,
    pub user: Arc<str>,
    pub outbox: Outbox,
}

/// A room: its members and, for presence, how many sessions each user has in it.
#[derive(Debug)]
struct Room {
    name: Arc<str>,
    members: Vec<Member>,
    /// Sorted, so that a join lists them without sorting.
    users: BTreeMap<Arc<str>, u32>,
    /// Users who arrived or went since the last presence flush, in order.
    /// The flush reports each as it is then, present or not.
    changed: Vec<Arc<str>>,
    /// The room's latest committed seq, once known ([`UNKNOWN`] before):
    /// set from each commit's fan-out, under the same guard as its pushes,
    /// so a join reads it consistently with what its outbox will get.
    latest: AtomicU64,
}

/// An empty JSON array.
fn empty_list() -> Box<RawValue> {
    serde_json::value::to_raw_value(&[(); 0]).unwrap_or_else(|_| Box::<RawValue>::default())
}

/// `Room::latest` before the hub has seen a commit or a store read for it.
const UNKNOWN: u64 = u64::MAX;

impl Room {
    /// Sends an ephemeral event to every member whose user is not `except`.
    fn broadcast_ephemeral(&self, frame: &ServerFrame, except: &str) {
        let text = Arc::new(WireFrame::json(frame));
        for m in self.members.iter().filter(|m| &*m.user != except) {
            m.outbox.push_ephemeral(&text);
        }
    }

    /// Sends one `presence` event with the users who arrived or went since
    /// the last flush. A lone change skips that user's own sessions, as an
    /// unbatched event would; in a batch, users may see their own name, and
    /// clients apply the lists as set additions and removals either way.
    fn flush_presence(&mut self) {
        let mut changed = std::mem::take(&mut self.changed);
        changed.sort_unstable();
        changed.dedup();
        let (mut joined, mut left) = (Vec::new(), Vec::new());
        for user in &changed {
            if self.users.contains_key(user) {
                joined.push(user.to_string());
            } else {
                left.push(user.to_string());
            }
        }
        let except = match changed.as_slice() {
            [one] => &**one,
            _ => "",
        };
        let frame = ServerFrame::Presence {
            room: self.name.to_string(),
            joined,
            left,
        };
        self.broadcast_ephemeral(&frame, except);
    }

    /// Raises the room's latest seq to `seq`; seqs only grow, so a smaller
    /// value (a store read older than a commit already seen) changes nothing.
    fn raise_latest(&self, seq: u64) {
        let _ = self
            .latest
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur == UNKNOWN || cur < seq).then_some(seq)
            });
    }

    fn presence(&self) -> Vec<String> {
        self.users.keys().map(|u| u.to_string()).collect()
    }

    /// The distinct users, sorted, as a JSON array: one buffer, no
    /// allocation per user, for the `joined` reply of a join.
    fn presence_json(&self) -> Box<RawValue> {
        let names: Vec<&str> = self.users.keys().map(|u| &**u).collect();
        // Serializing strings into a buffer cannot fail; `[]` is the
        // fallback rather than a panic.
        serde_json::value::to_raw_value(&names).unwrap_or_else(|_| empty_list())
    }
}

/// What a join returns.
#[derive(Debug)]
pub struct JoinOutcome {
    /// The room's shared name, the key that deliveries carry.
    pub room: Arc<str>,
    /// Distinct users in the room, sorted, the joiner included, as a JSON
    /// array.
    pub presence: Box<RawValue>,
    /// The room's latest seq as of the join, when the hub knows it: every
    /// later message reaches the joiner's outbox. `None` for a room the hub
    /// has not seen a commit or a read for; the caller reads the store then
    /// and reports the value with [`Hub::note_latest`].
    pub latest: Option<u64>,
}

/// Summary of a room, for operators.
#[derive(Debug, Clone)]
pub struct RoomInfo {
    pub name: String,
    pub sessions: usize,
    pub users: Vec<String>,
}

/// Per-session counters, shared between the session task and operators.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
}

/// A live session as operators see it.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    pub user: Arc<str>,
    pub remote: SocketAddr,
    /// Milliseconds since the Unix epoch.
    pub connected_at_ms: u64,
    pub outbox: Outbox,
    pub stats: Arc<SessionStats>,
}

/// A snapshot of one session, for operators.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: SessionId,
    pub user: String,
    pub remote: SocketAddr,
    pub connected_at_ms: u64,
    pub rooms: Vec<String>,
    pub messages_in: u64,
    pub messages_out: u64,
    pub queued_bytes: usize,
}

/// The room and session registries.
#[derive(Debug, Default)]
pub struct Hub {
    rooms: DashMap<Arc<str>, Room>,
    sessions: DashMap<SessionId, SessionEntry>,
    /// Rooms with presence changes not yet sent. Each room is listed once:
    /// it is added when its first change since the last flush is recorded.
    presence_dirty: Mutex<Vec<Arc<str>>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            rooms: DashMap::new(),
            sessions: DashMap::new(),
            presence_dirty: Mutex::new(Vec::new()),
        }
    }

    /// Records that `user`'s presence in `r` changed; lists the room for
    /// the next flush if this is its first change since the last one.
    fn presence_changed(&self, r: &mut Room, user: Arc<str>) {
        if r.changed.is_empty() {
            self.presence_dirty
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(r.name.clone());
        }
        r.changed.push(user);
    }

    /// Sends every room with presence changes its one batched `presence`
    /// event. Called every `presence_interval_ms` by the server's presence
    /// task; returns how many rooms it flushed.
    pub fn flush_presence(&self) -> usize {
        let dirty = std::mem::take(
            &mut *self
                .presence_dirty
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut flushed = 0;
        for name in dirty {
            // A room emptied since its change is gone, and nobody is left
            // to tell.
            if let Some(mut r) = self.rooms.get_mut(&name) {
                if !r.changed.is_empty() {
                    r.flush_presence();
                    flushed += 1;
                }
            }
        }
        flushed
    }

    /// Adds `member` to `room`, creating the room. Joining twice is a no-op
    /// that still reports presence. When the member's user was not in the
    /// room yet, the members get a `presence` event at the next flush.
    pub fn join(&self, room: &str, member: Member) -> JoinOutcome {
        let mut entry = self.rooms.entry(Arc::from(room)).or_insert_with(|| Room {
            name: Arc::from(room),
            members: Vec::new(),
            users: BTreeMap::new(),
            changed: Vec::new(),
            latest: AtomicU64::new(UNKNOWN),
        });
        let r = entry.value_mut();
        if !r.members.iter().any(|m| m.session == member.session) {
            let count = r.users.entry(member.user.clone()).or_insert(0);
            *count += 1;
            let first = *count == 1;
            let user = member.user.clone();
            r.members.push(member);
            if first {
                self.presence_changed(r, user);
            }
        }
        let latest = r.latest.load(Ordering::Acquire);
        JoinOutcome {
            room: r.name.clone(),
            presence: r.presence_json(),
            latest: (latest != UNKNOWN).then_some(latest),
        }
    }

    /// Records a room's latest seq as read from the store after a join
    /// registered. Seqs only grow, so the larger of the two stands.
    pub fn note_latest(&self, room: &str, seq: u64) {
        if let Some(r) = self.rooms.get(room) {
            r.raise_latest(seq);
        }
    }

    /// Removes a session from a room. Returns whether it was a member. When
    /// its user has no session left there, the others get a `presence` event
    /// at the next flush.
    pub fn leave(&self, room: &str, session: SessionId) -> bool {
        let Some(mut entry) = self.rooms.get_mut(room) else {
            return false;
        };
        let r = entry.value_mut();
        let Some(pos) = r.members.iter().position(|m| m.session == session) else {
            return false;
        };
        let member = r.members.swap_remove(pos);
        let gone = match r.users.get_mut(&member.user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                r.users.remove(&member.user);
                true
            }
        };
        if gone {
            self.presence_changed(r, member.user.clone());
        }
        let empty = r.members.is_empty();
        drop(entry);
        if empty {
            self.rooms.remove_if(room, |_, r| r.members.is_empty());
        }
        true
    }

    /// Sends `typing` to the room's members of other users.
    pub fn typing(&self, room: &str, user: &str) {
        if let Some(r) = self.rooms.get(room) {
            let frame = ServerFrame::Typing {
                room: room.to_owned(),
                user: user.to_owned(),
            };
            r.broadcast_ephemeral(&frame, user);
        }
    }

    /// Records a live session, so operators can list and kick it.
    pub fn register_session(&self, id: SessionId, entry: SessionEntry) {
        self.sessions.insert(id, entry);
    }

    pub fn unregister_session(&self, id: SessionId) {
        self.sessions.remove(&id);
    }

    /// Closes a session with `reason`. Returns whether it was live.
    pub fn close_session(&self, id: SessionId, reason: CloseReason) -> bool {
        match self.sessions.get(&id) {
            Some(s) => {
                s.outbox.close(reason);
                true
            }
            None => false,
        }
    }

    /// Closes every session of `user`; returns how many.
    pub fn close_user(&self, user: &str, reason: CloseReason) -> usize {
        let mut n = 0;
        for s in self.sessions.iter().filter(|s| &*s.user == user) {
            s.outbox.close(reason);
            n += 1;
        }
        n
    }

    /// A snapshot of every live session, with the rooms each has joined.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut rooms_of: HashMap<SessionId, Vec<String>> = HashMap::new();
        for r in self.rooms.iter() {
            for m in &r.members {
                rooms_of
                    .entry(m.session)
                    .or_default()
                    .push(r.name.to_string());
            }
        }
        let mut out: Vec<SessionInfo> = self
            .sessions
            .iter()
            .map(|e| {
                let mut rooms = rooms_of.remove(e.key()).unwrap_or_default();
                rooms.sort_unstable();
                SessionInfo {
                    id: *e.key(),
                    user: e.user.to_string(),
                    remote: e.remote,
                    connected_at_ms: e.connected_at_ms,
                    rooms,
                    messages_in: e.stats.messages_in.load(Ordering::Relaxed),
                    messages_out: e.stats.messages_out.load(Ordering::Relaxed),
                    queued_bytes: e.outbox.queued_bytes(),
                }
            })
            .collect();
        out.sort_unstable_by_key(|s| s.id);
        out
    }

    /// How many rooms have members.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// A snapshot of every room.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        self.rooms
            .iter()
            .map(|r| RoomInfo {
                name: r.name.to_string(),
                sessions: r.members.len(),
                users: r.presence(),
            })
            .collect()
    }

    /// A snapshot of one room.
    pub fn room(&self, room: &str) -> Option<RoomInfo> {
        self.rooms.get(room).map(|r| RoomInfo {
            name: r.name.to_string(),
            sessions: r.members.len(),
            users: r.presence(),
        })
    }
}

impl CommitSink for Hub {
    /// Fans a commit's messages out: per room, one encoding per message, one
    /// shared delivery of all of them, and one non-blocking push per member.
    fn committed(&self, msgs: &[Committed<'_>]) {
        // Group by room, keeping each room's seq order. Most commits hold
        // few rooms; the map is per commit, never per recipient.
        let mut rooms: FxHashMap<&str, Vec<Encoded>> = FxHashMap::default();
        let mut order: Vec<&str> = Vec::new();
        for msg in msgs {
            let message = protocol::MessageRef::new(msg.room, msg.seq, msg.from, msg.ts, msg.body);
            let encoded = Encoded {
                seq: msg.seq,
                frame: WireFrame::json(&message),
            };
            rooms
                .entry(msg.room)
                .or_insert_with(|| {
                    order.push(msg.room);
                    Vec::new()
                })
                .push(encoded);
        }
        for room in order {
            let (Some(r), Some(messages)) = (self.rooms.get(room), rooms.remove(room)) else {
                continue;
            };
            let last = messages.last().map(|m| m.seq);
            let delivery = Arc::new(Delivery::new(r.name.clone(), messages));
            for m in &r.members {
                m.outbox.push_message(&delivery);
            }
            if let Some(seq) = last {
                // Still under the guard of the pushes: see `Room::latest`.
                r.raise_latest(seq);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::session::{OutboxReceiver, Outgoing, outbox};
    use tokio_util::sync::CancellationToken;

    fn member(hub: &Hub, id: SessionId, user: &str) -> OutboxReceiver {
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

    fn events(rx: &mut OutboxReceiver) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|o| match o {
                Outgoing::Ephemeral(t) => String::from_utf8_lossy(t.payload()).into_owned(),
                Outgoing::Message(_) => panic!("no messages were sent"),
            })
            .collect()
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
            vec![r#"{"type":"presence","room":"r","left":["u2"]}"#]
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
            vec![r#"{"type":"presence","room":"r","left":["late"]}"#]
        );
    }
}
