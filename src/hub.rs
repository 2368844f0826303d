//! Rooms, their members and presence, and fan-out of committed messages.
//!
//! The hub owns the room registry (a `DashMap` from room name to [`Room`]).
//! It is called from session tasks (join, leave, typing) and from one
//! delivering task (every committed message, in seq order per room).
//!
//! Invariants:
//! - The hub never awaits. It never holds a map guard across an `.await`,
//!   and it reaches a session only through that session's bounded
//!   [`Outbox`], with a non-blocking push.
//! - A message is encoded once into shared bytes; each recipient gets a
//!   reference-counted handle, never a copy.
//! - A room's members see its messages in commit order, which is seq order,
//!   because one task at a time calls [`Hub::deliver`]: the delivery task,
//!   fed by the store writer in commit order (`handoff`), or in a cluster
//!   the bus's one delivery task, which puts each room's messages from
//!   every node in seq order (`cluster::bus`).
//! - A join or leave costs the same whatever the room's size: members are
//!   found through a map of slots once a room has more than [`SCAN_MAX`]
//!   (below, a scan of a few members), the users' counts are a sorted
//!   map, and the `joined` reply lists at most `presence_list_max` users
//!   (with the count of all of them); [`Hub::members`] pages the rest.
//! - Presence changes are batched: a join or leave only records the change,
//!   and [`Hub::flush_presence`], every `presence_interval_ms`, sends each
//!   changed room one `presence` event with the room's count and at most
//!   `presence_list_max` of its changes. Filling a room of N therefore
//!   costs each member one bounded event per interval, not one per join
//!   (which made filling a room O(N²)). Rooms matching
//!   `presence_events_off` record no changes at all.
//! - Typing is coalesced the same way: [`Hub::typing`] records the typer,
//!   and [`Hub::flush_typing`], every `typing_interval_ms`, sends each room
//!   where someone typed one `typing` event with the typers' count and at
//!   most `typing_list_max` names.
//! - In a cluster, the hub tells the other nodes through [`Peers`] (set
//!   once, never in single-node mode) when a room gets its first local
//!   member or loses its last (`interest`), when a user's first local
//!   session joins or last leaves a room, and when a local user types;
//!   the calls push to a queue and never call back into the hub. What other
//!   nodes report comes in through [`Hub::remote_typing`],
//!   [`Hub::remote_presence`], [`Hub::remote_members`] and
//!   [`Hub::node_gone`]: a room's presence is the union of its local users
//!   and the users other nodes have in it (a user on two nodes counts
//!   once), kept only while the room has local members, with the same
//!   batched events. A remote call costs the same as a local join or leave;
//!   a node's departure costs one pass over the rooms.
//! - A room's events are also bounded in deliveries: after an event to N
//!   sessions, a room waits out N / (`event_fanout_per_sec`'s share of a
//!   flush) flushes, so a 20,000-member room filling up gets one presence
//!   event a second, not ten.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use dashmap::DashMap;
use protocol::ServerFrame;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::value::RawValue;

use crate::close::CloseReason;
use crate::config::Config;
use crate::delivery::{Delivery, EncodedCommit, Outbox, WireFrame};

/// A session's process-unique id.
pub type SessionId = u64;

/// One session's membership of a room.
#[derive(Debug, Clone)]
pub struct Member {
    pub session: SessionId,
    pub user: Arc<str>,
    pub outbox: Outbox,
}

/// What the hub tells the other nodes of a cluster. Calls happen under a
/// room's guard, so an implementation only records or queues them: it
/// must not block and must not call back into the hub.
pub trait Peers: std::fmt::Debug + Send + Sync + 'static {
    /// `room` got its first local member (`on`) or lost its last.
    fn interest(&self, room: &str, on: bool);
    /// A local `user` typed in `room` (at most once per typing flush).
    fn typing(&self, room: &str, user: &str);
    /// `user`'s first local session joined `room`, or its last left.
    fn presence(&self, room: &str, user: &str, joined: bool);
}

/// The hub's share of the configuration: what bounds presence and typing.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Most names in a `joined` reply and in one `presence` event.
    pub presence_list_max: usize,
    /// Room patterns whose rooms send no `presence` events.
    pub presence_events_off: Vec<String>,
    /// Most names in one `typing` event.
    pub typing_list_max: usize,
    /// Most deliveries of one room's presence events per presence flush,
    /// and of its typing events per typing flush: a room with more
    /// sessions skips flushes in proportion.
    pub presence_fanout_per_flush: usize,
    pub typing_fanout_per_flush: usize,
}

impl HubOptions {
    pub fn from_config(config: &Config) -> HubOptions {
        HubOptions {
            presence_list_max: config.presence_list_max,
            presence_events_off: config.presence_events_off.clone(),
            typing_list_max: config.typing_list_max,
            presence_fanout_per_flush: per_flush(
                config.event_fanout_per_sec,
                config.presence_interval_ms,
            ),
            typing_fanout_per_flush: per_flush(
                config.event_fanout_per_sec,
                config.typing_interval_ms,
            ),
        }
    }

    /// Whether rooms named `room` send `presence` events. Decided once, when
    /// the room is created, so a join pays no pattern match.
    fn presence_events(&self, room: &str) -> bool {
        !self
            .presence_events_off
            .iter()
            .any(|p| crate::glob::glob_match(p, room))
    }
}

/// A per-second delivery budget as a per-flush one, at least one session.
fn per_flush(per_sec: u64, interval_ms: u64) -> usize {
    let n = per_sec.saturating_mul(interval_ms) / 1000;
    usize::try_from(n).unwrap_or(usize::MAX).max(1)
}

/// How many flushes an event to `sessions` uses of a `per_flush` budget:
/// the room sends its next event that many flushes later.
fn flushes_for(sessions: usize, per_flush: usize) -> u64 {
    sessions.div_ceil(per_flush.max(1)).max(1) as u64
}

impl Default for HubOptions {
    fn default() -> HubOptions {
        HubOptions::from_config(&Config::default())
    }
}

/// A room: its members and, for presence, how many sessions each user has in it.
#[derive(Debug)]
struct Room {
    name: Arc<str>,
    /// Dense, so that fan-out walks an array.
    members: Vec<Member>,
    /// Each member's index in `members`, so that a leave finds its member
    /// without a scan (it swaps the last member into the gap). Kept only
    /// while the room has more than [`SCAN_MAX`] members, and then for every
    /// member; `None` otherwise (see [`Room::position`]). Boxed: most rooms
    /// are small, and every room carries the field.
    slots: Option<Box<FxHashMap<SessionId, usize>>>,
    /// Sorted, so that a join lists the first ones and a `presence` request
    /// pages from a name without sorting. Each user's count is its local
    /// sessions plus the other nodes it is on (see `remote`).
    users: BTreeMap<Arc<str>, u32>,
    /// The room's users on other nodes of a cluster; `None` without any.
    remote: Option<Box<Remote>>,
    /// Whether this room sends `presence` events (see `presence_events_off`).
    presence_events: bool,
    /// The changes for the next presence flush; `Some` exactly while the
    /// room is listed for it. Boxed, and only then: a quiet room holds none.
    changes: Option<Box<Changes>>,
    /// Users who typed since the last typing flush; `Some` exactly while
    /// the room is listed for the next one.
    typers: Option<Box<FxHashSet<Arc<str>>>>,
    /// The presence flush, and the typing flush, counted by the hub, from
    /// which this room may send its next event: a big room's events are
    /// spaced so that their deliveries stay within the fan-out budget.
    presence_next: u64,
    typing_next: u64,
    /// The room's latest committed seq, once known ([`UNKNOWN`] before):
    /// set from each commit's fan-out, under the same guard as its pushes,
    /// so a join reads it consistently with what its outbox will get.
    latest: AtomicU64,
    /// Joins told the latest was unknown that have not reported the store's
    /// yet, and the lowest seq reported: where a cluster node's delivery
    /// of the room must start (see [`Hub::delivery_start`]).
    unnoted: u32,
    noted_min: u64,
}

/// A room's presence changes since its last flush.
#[derive(Debug, Default)]
struct Changes {
    /// Users who arrived or went, at most `presence_list_max` of them. The
    /// flush reports each as it is then, present or not.
    users: FxHashSet<Arc<str>>,
    /// Whether users beyond `users` arrived or went too.
    truncated: bool,
}

/// A room's users on other nodes.
#[derive(Debug, Default)]
struct Remote {
    /// Each node's users in the room.
    nodes: FxHashMap<Arc<str>, FxHashSet<Arc<str>>>,
    /// On how many of those nodes each user is.
    users: FxHashMap<Arc<str>, u32>,
}

/// An empty JSON array.
fn empty_list() -> Box<RawValue> {
    serde_json::value::to_raw_value(&[(); 0]).unwrap_or_else(|_| Box::<RawValue>::default())
}

/// `Room::latest` before the hub has seen a commit or a store read for it.
const UNKNOWN: u64 = u64::MAX;

/// Rooms of at most this many members find a member by scanning them (a
/// few cache lines); bigger rooms keep a map of slots, so that a leave costs
/// the same in a room of 20,000. Most rooms are small, and a map in each
/// would cost every one of them an allocation.
const SCAN_MAX: usize = 16;

impl Room {
    /// Sends an ephemeral event to every member whose user is not `except`.
    fn broadcast_ephemeral(&self, frame: &ServerFrame, except: &str) {
        let text = Arc::new(WireFrame::json(frame));
        for m in self.members.iter().filter(|m| &*m.user != except) {
            m.outbox.push_ephemeral(&text);
        }
    }

    fn new(name: &str, options: &HubOptions) -> Room {
        Room {
            name: Arc::from(name),
            members: Vec::new(),
            slots: None,
            users: BTreeMap::new(),
            remote: None,
            presence_events: options.presence_events(name),
            changes: None,
            typers: None,
            presence_next: 0,
            typing_next: 0,
            latest: AtomicU64::new(UNKNOWN),
            unnoted: 0,
            noted_min: UNKNOWN,
        }
    }

    /// Where `session` is in `members`.
    fn position(&self, session: SessionId) -> Option<usize> {
        match &self.slots {
            None => self.members.iter().position(|m| m.session == session),
            Some(slots) => slots.get(&session).copied(),
        }
    }

    /// Adds a member that is not in the room yet.
    fn push_member(&mut self, member: Member) {
        if let Some(slots) = &mut self.slots {
            slots.insert(member.session, self.members.len());
        }
        self.members.push(member);
        if self.members.len() == SCAN_MAX + 1 && self.slots.is_none() {
            self.slots = Some(Box::new(
                (self.members.iter().enumerate())
                    .map(|(i, m)| (m.session, i))
                    .collect(),
            ));
        }
    }

    /// Removes the member at `pos`; the last member moves into the gap.
    fn remove_member(&mut self, pos: usize) -> Member {
        let member = self.members.swap_remove(pos);
        if let Some(slots) = &mut self.slots {
            slots.remove(&member.session);
            if let Some(moved) = self.members.get(pos) {
                slots.insert(moved.session, pos);
            }
            // Half the threshold, so a room at the edge does not rebuild
            // its map on every join and leave.
            if self.members.len() <= SCAN_MAX / 2 {
                self.slots = None;
            }
        }
        member
    }

    /// On how many other nodes `user` is in this room.
    fn remote_of(&self, user: &str) -> u32 {
        self.remote
            .as_ref()
            .and_then(|r| r.users.get(user).copied())
            .unwrap_or(0)
    }

    /// Takes one from `user`'s count; returns whether the user is gone.
    fn drop_user(&mut self, user: &str) -> bool {
        match self.users.get_mut(user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.users.remove(user);
                true
            }
        }
    }

    /// The number of distinct users, as the wire counts them.
    fn user_count(&self) -> u64 {
        self.users.len() as u64
    }

    /// Sends one `presence` event with the room's count and the users who
    /// arrived or went since the last flush. A lone change skips that
    /// user's own sessions, as an unbatched event would; in a batch, users
    /// may see their own name, and clients apply the lists as set additions
    /// and removals either way.
    fn flush_presence(&mut self) {
        let Some(changes) = self.changes.take() else {
            return;
        };
        let truncated = changes.truncated;
        let mut changed: Vec<Arc<str>> = changes.users.into_iter().collect();
        changed.sort_unstable();
        let (mut joined, mut left) = (Vec::new(), Vec::new());
        for user in &changed {
            if self.users.contains_key(user) {
                joined.push(user.to_string());
            } else {
                left.push(user.to_string());
            }
        }
        let except = match changed.as_slice() {
            [one] if !truncated => &**one,
            _ => "",
        };
        let frame = ServerFrame::Presence {
            room: self.name.to_string(),
            count: self.user_count(),
            joined,
            left,
            truncated,
        };
        self.broadcast_ephemeral(&frame, except);
    }

    /// Sends one `typing` event with how many users typed since the last
    /// flush and the first `list_max` of them by name. A lone typer's own
    /// sessions are skipped; several typers see their own names.
    fn flush_typing(&mut self, list_max: usize) {
        let Some(typers) = self.typers.take() else {
            return;
        };
        let mut names: Vec<&Arc<str>> = typers.iter().collect();
        // The first `list_max` by name, without sorting all of them.
        if names.len() > list_max {
            if list_max > 0 {
                names.select_nth_unstable(list_max - 1);
            }
            names.truncate(list_max);
        }
        names.sort_unstable();
        let except = match (typers.len(), names.as_slice()) {
            (1, [one]) => &***one,
            _ => "",
        };
        let frame = ServerFrame::Typing {
            room: self.name.to_string(),
            count: typers.len() as u64,
            users: names.iter().map(|u| u.to_string()).collect(),
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

    /// The first `max` distinct users, sorted, as a JSON array: one
    /// buffer, no allocation per user, for the `joined` reply of a join.
    fn presence_json(&self, max: usize) -> Box<RawValue> {
        let names: Vec<&str> = self.users.keys().take(max).map(|u| &**u).collect();
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
    /// How many distinct users are in the room, the joiner included.
    pub count: u64,
    /// The first `presence_list_max` of them, sorted, as a JSON array.
    pub presence: Box<RawValue>,
    /// The room's latest seq as of the join, when the hub knows it: every
    /// later message reaches the joiner's outbox. `None` for a room the hub
    /// has not seen a commit or a read for; the caller reads the store then
    /// and reports the value with [`Hub::note_latest`].
    pub latest: Option<u64>,
}

/// One page of a room's users, for a `presence` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersPage {
    /// How many distinct users the room has.
    pub count: u64,
    /// Users sorted after the cursor, at most the page's limit.
    pub users: Vec<String>,
    /// Whether users after the last of `users` exist.
    pub more: bool,
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
    /// Rooms where someone typed since the last typing flush, each once.
    typing_dirty: Mutex<Vec<Arc<str>>>,
    /// Presence flushes and typing flushes so far: the clock of the
    /// fan-out budget (see `Room::presence_next`).
    presence_flushes: AtomicU64,
    typing_flushes: AtomicU64,
    options: HubOptions,
    /// The other nodes of a cluster; unset in single-node mode.
    peers: OnceLock<Arc<dyn Peers>>,
}

/// Locks a dirty list; a panic elsewhere cannot leave it inconsistent.
fn lock(list: &Mutex<Vec<Arc<str>>>) -> std::sync::MutexGuard<'_, Vec<Arc<str>>> {
    list.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    pub fn new() -> Hub {
        Hub::with_options(HubOptions::default())
    }

    pub fn with_options(options: HubOptions) -> Hub {
        Hub {
            rooms: DashMap::new(),
            sessions: DashMap::new(),
            presence_dirty: Mutex::new(Vec::new()),
            typing_dirty: Mutex::new(Vec::new()),
            presence_flushes: AtomicU64::new(0),
            typing_flushes: AtomicU64::new(0),
            options,
            peers: OnceLock::new(),
        }
    }

    /// Sets the other nodes the hub tells of its rooms (cluster mode), once;
    /// returns false when they were set already.
    pub fn set_peers(&self, peers: Arc<dyn Peers>) -> bool {
        self.peers.set(peers).is_ok()
    }

    /// Records that `user`'s presence in `r` changed; lists the room for
    /// the next flush if this is its first change since the last one.
    /// Only the first `presence_list_max` changed users are kept; further
    /// ones mark the batch truncated.
    fn presence_changed(&self, r: &mut Room, user: Arc<str>) {
        if !r.presence_events {
            return;
        }
        let changes = r.changes.get_or_insert_with(|| {
            lock(&self.presence_dirty).push(r.name.clone());
            Box::default()
        });
        if changes.users.len() < self.options.presence_list_max {
            changes.users.insert(user);
        } else if !changes.users.contains(&user) {
            changes.truncated = true;
        }
    }

    /// Sends every room with presence changes its one batched `presence`
    /// event. Called every `presence_interval_ms` by the server's presence
    /// task; returns how many rooms it flushed.
    /// A room whose last event went to more sessions than the fan-out
    /// budget allows per flush waits out as many flushes, its changes
    /// accumulating meanwhile.
    pub fn flush_presence(&self) -> usize {
        self.flush_listed(
            &self.presence_dirty,
            &self.presence_flushes,
            self.options.presence_fanout_per_flush,
            |r| r.changes.is_some(),
            |r| &mut r.presence_next,
            |r| r.flush_presence(),
        )
    }

    /// Sends every room where someone typed its one coalesced `typing`
    /// event. Called every `typing_interval_ms` by the server's presence
    /// task; returns how many rooms it flushed.
    /// Big rooms wait out flushes as for presence.
    pub fn flush_typing(&self) -> usize {
        let list_max = self.options.typing_list_max;
        self.flush_listed(
            &self.typing_dirty,
            &self.typing_flushes,
            self.options.typing_fanout_per_flush,
            |r| r.typers.is_some(),
            |r| &mut r.typing_next,
            |r| r.flush_typing(list_max),
        )
    }

    /// One flush of the rooms listed in `dirty`: each room that still has
    /// something `pending` and whose `next` flush has come sends its event;
    /// a room whose last event went to more sessions than `fanout_per_flush`
    /// allows waits out as many flushes (it stays listed). A room emptied
    /// since it was listed is gone, and nobody is left to tell; a room of
    /// that name made since lists itself again and flushes once.
    fn flush_listed(
        &self,
        dirty: &Mutex<Vec<Arc<str>>>,
        flushes: &AtomicU64,
        fanout_per_flush: usize,
        pending: impl Fn(&Room) -> bool,
        next: impl Fn(&mut Room) -> &mut u64,
        flush: impl Fn(&mut Room),
    ) -> usize {
        let now = flushes.fetch_add(1, Ordering::Relaxed);
        let listed = std::mem::take(&mut *lock(dirty));
        let mut flushed = 0;
        let mut held = Vec::new();
        for name in listed {
            if let Some(mut r) = self.rooms.get_mut(&name) {
                if !pending(&r) {
                    continue;
                }
                if now < *next(&mut r) {
                    held.push(name);
                    continue;
                }
                *next(&mut r) = now + flushes_for(r.members.len(), fanout_per_flush);
                flush(&mut r);
                flushed += 1;
            }
        }
        lock(dirty).extend(held);
        flushed
    }

    /// Adds `member` to `room`, creating the room. Joining twice is a no-op
    /// that still reports presence. When the member's user was not in the
    /// room yet, the members get a `presence` event at the next flush.
    pub fn join(&self, room: &str, member: Member) -> JoinOutcome {
        let mut entry = self
            .rooms
            .entry(Arc::from(room))
            .or_insert_with(|| Room::new(room, &self.options));
        let r = entry.value_mut();
        if r.position(member.session).is_none() {
            let remote = r.remote_of(&member.user);
            let count = r.users.entry(member.user.clone()).or_insert(0);
            *count += 1;
            let first = *count == 1;
            let first_local = *count == remote + 1;
            let was_empty = r.members.is_empty();
            let user = member.user.clone();
            r.push_member(member);
            if let Some(peers) = self.peers.get() {
                if was_empty {
                    peers.interest(room, true);
                }
                if first_local {
                    peers.presence(room, &user, true);
                }
            }
            if first {
                self.presence_changed(r, user);
            }
        }
        let latest = r.latest.load(Ordering::Acquire);
        if latest == UNKNOWN {
            r.unnoted = r.unnoted.saturating_add(1);
        }
        JoinOutcome {
            room: r.name.clone(),
            count: r.user_count(),
            presence: r.presence_json(self.options.presence_list_max),
            latest: (latest != UNKNOWN).then_some(latest),
        }
    }

    /// Records a room's latest seq as read from the store after a join
    /// registered. Seqs only grow, so the larger of the two stands.
    pub fn note_latest(&self, room: &str, seq: u64) {
        if let Some(mut r) = self.rooms.get_mut(room) {
            r.unnoted = r.unnoted.saturating_sub(1);
            r.noted_min = r.noted_min.min(seq);
            r.raise_latest(seq);
        }
    }

    /// Where a cluster node's delivery of `room` may start (after the
    /// returned seq): once every join told the latest was unknown has
    /// reported the store's, the lowest of those reports (or the latest
    /// seq, if lower), so that each of those sessions gets every message
    /// after what it read. `None` while a report is missing.
    pub fn delivery_start(&self, room: &str) -> Option<u64> {
        let r = self.rooms.get(room)?;
        let latest = r.latest.load(Ordering::Acquire);
        (r.unnoted == 0 && latest != UNKNOWN).then(|| latest.min(r.noted_min))
    }

    /// Removes a session from a room. Returns whether it was a member. When
    /// its user has no session left there, the others get a `presence` event
    /// at the next flush.
    pub fn leave(&self, room: &str, session: SessionId) -> bool {
        let Some(mut entry) = self.rooms.get_mut(room) else {
            return false;
        };
        let r = entry.value_mut();
        let Some(pos) = r.position(session) else {
            return false;
        };
        let member = r.remove_member(pos);
        let remote = r.remote_of(&member.user);
        let gone = r.drop_user(&member.user);
        let empty = r.members.is_empty();
        if let Some(peers) = self.peers.get() {
            if gone || r.users.get(&member.user) == Some(&remote) {
                peers.presence(room, &member.user, false);
            }
            if empty {
                // Under the guard, so a join that refills the room is
                // queued after it.
                peers.interest(room, false);
            }
        }
        if gone {
            self.presence_changed(r, member.user.clone());
        }
        drop(entry);
        if empty {
            self.rooms.remove_if(room, |_, r| r.members.is_empty());
        }
        true
    }

    /// Records that `user` typed in `room`; the room's members hear of it
    /// in its next coalesced `typing` event, and so do the other nodes' (once
    /// per user and flush).
    pub fn typing(&self, room: &str, user: &Arc<str>) {
        if self.record_typing(room, user) {
            if let Some(peers) = self.peers.get() {
                peers.typing(room, user);
            }
        }
    }

    /// Records that `user`, on another node, typed in `room`: as
    /// [`Hub::typing`], but not told to the other nodes again.
    pub fn remote_typing(&self, room: &str, user: &str) {
        self.record_typing(room, &Arc::from(user));
    }

    /// Adds `user` to the room's typers; returns whether it was not there.
    fn record_typing(&self, room: &str, user: &Arc<str>) -> bool {
        let Some(mut entry) = self.rooms.get_mut(room) else {
            return false;
        };
        let r = entry.value_mut();
        let typers = r.typers.get_or_insert_with(|| {
            lock(&self.typing_dirty).push(r.name.clone());
            Box::default()
        });
        if typers.contains(user) {
            return false;
        }
        typers.insert(user.clone());
        true
    }

    /// Records that `user` is (`joined`) or is no longer in `room` on
    /// another node, `node`. Only rooms with local members keep other
    /// nodes' users (the cluster's bus sends a room's users when its first
    /// local member joins); a user new to the room, or gone from it on
    /// every node, makes a `presence` change as a local one does.
    /// Repeating a report changes nothing.
    pub fn remote_presence(&self, room: &str, node: &str, user: &str, joined: bool) {
        let Some(mut entry) = self.rooms.get_mut(room) else {
            return;
        };
        let r = entry.value_mut();
        if joined {
            self.remote_add(r, node, user);
        } else {
            self.remote_remove(r, node, user);
        }
    }

    /// Sets the users `node` has in `room` to `users`: those not listed
    /// leave, those listed join (see [`Hub::remote_presence`]).
    pub fn remote_members(&self, room: &str, node: &str, users: &[String]) {
        let Some(mut entry) = self.rooms.get_mut(room) else {
            return;
        };
        let r = entry.value_mut();
        let listed: FxHashSet<&str> = users.iter().map(|u| u.as_str()).collect();
        let stale: Vec<Arc<str>> = (r.remote.as_ref())
            .and_then(|rem| rem.nodes.get(node))
            .map(|set| {
                set.iter()
                    .filter(|u| !listed.contains(&***u))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for user in stale {
            self.remote_remove(r, node, &user);
        }
        for user in listed {
            self.remote_add(r, node, user);
        }
    }

    /// `node` is gone: its users leave every room.
    pub fn node_gone(&self, node: &str) {
        for mut entry in self.rooms.iter_mut() {
            let r = entry.value_mut();
            let users: Vec<Arc<str>> = (r.remote.as_ref())
                .and_then(|rem| rem.nodes.get(node))
                .map(|set| set.iter().cloned().collect())
                .unwrap_or_default();
            for user in users {
                self.remote_remove(r, node, &user);
            }
        }
    }

    fn remote_add(&self, r: &mut Room, node: &str, user: &str) {
        let rem = r.remote.get_or_insert_with(Box::default);
        let user: Arc<str> = Arc::from(user);
        if !(rem.nodes.entry(Arc::from(node)).or_default()).insert(user.clone()) {
            return;
        }
        *rem.users.entry(user.clone()).or_insert(0) += 1;
        let count = r.users.entry(user.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.presence_changed(r, user);
        }
    }

    fn remote_remove(&self, r: &mut Room, node: &str, user: &str) {
        let Some(rem) = r.remote.as_mut() else {
            return;
        };
        let Some(set) = rem.nodes.get_mut(node) else {
            return;
        };
        let Some(user) = set.take(user) else {
            return;
        };
        if set.is_empty() {
            rem.nodes.remove(node);
        }
        match rem.users.get_mut(&user) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                rem.users.remove(&user);
            }
        }
        if rem.nodes.is_empty() {
            r.remote = None;
        }
        if r.drop_user(&user) {
            self.presence_changed(r, user);
        }
    }

    /// The room's latest seq as the hub knows it (from its fan-out or a
    /// join's store read); `None` for a room without members or not seen.
    pub fn latest(&self, room: &str) -> Option<u64> {
        let r = self.rooms.get(room)?;
        let latest = r.latest.load(Ordering::Acquire);
        (latest != UNKNOWN).then_some(latest)
    }

    /// The users with a session of this node in `room`, sorted.
    pub fn local_users(&self, room: &str) -> Vec<String> {
        let Some(r) = self.rooms.get(room) else {
            return Vec::new();
        };
        (r.users.iter())
            .filter(|(u, n)| **n > r.remote_of(u))
            .map(|(u, _)| u.to_string())
            .collect()
    }

    /// One page of `room`'s users, sorted by name: those after `after`, at
    /// most `limit`. A room without members has none.
    pub fn members(&self, room: &str, after: Option<&str>, limit: usize) -> MembersPage {
        let Some(r) = self.rooms.get(room) else {
            return MembersPage {
                count: 0,
                users: Vec::new(),
                more: false,
            };
        };
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut range = r.users.range::<str, _>((from, Bound::Unbounded));
        let users = range
            .by_ref()
            .take(limit)
            .map(|(u, _)| u.to_string())
            .collect();
        MembersPage {
            count: r.user_count(),
            users,
            more: range.next().is_some(),
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

impl Hub {
    /// The one entry of durable messages into the hub, in both modes:
    /// per room, one shared delivery of all of the commit's messages and
    /// one non-blocking push per member. Commits must come in commit order
    /// (one caller at a time), as members see them in it.
    pub fn deliver(&self, commit: EncodedCommit) {
        for (room, messages) in commit.rooms {
            let Some(r) = self.rooms.get(&*room) else {
                continue;
            };
            let last = messages.last().map(|m| m.seq);
            let delivery = Arc::new(Delivery::encoded_at(
                r.name.clone(),
                messages,
                commit.encoded,
            ));
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
pub(crate) mod tests {
    use super::*;
    use crate::delivery::{OutboxReceiver, Outgoing, outbox};
    use crate::metrics::Metrics;
    use tokio_util::sync::CancellationToken;

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
    fn member_in(
        hub: &Hub,
        room: &str,
        id: SessionId,
        user: &str,
    ) -> (JoinOutcome, OutboxReceiver) {
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
        hub.deliver(EncodedCommit::encode(&[crate::history::Committed {
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
}
