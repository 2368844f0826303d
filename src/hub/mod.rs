//! Rooms, their members and presence, and fan-out of committed messages.
//!
//! [`Hub`] is the facade the rest of the crate calls: session tasks (join,
//! leave, typing), the presence flusher, one delivering task (every
//! committed message, in seq order per room), the cluster's bus and
//! operators. This file owns the room registry (a `DashMap` from room name
//! to `Room`) and the join and leave paths that keep it; it must not
//! encode or deliver messages, batch events or keep other nodes' users
//! itself. Each other job has its own module, and none of them reaches
//! another's state:
//!
//! - `room.rs`: one room's record: members (a dense array for fan-out, with
//!   a slot map once the room has more than `SCAN_MAX`, so a leave finds
//!   its member without a scan), users' session counts (sorted, so `joined`
//!   lists the first `presence_list_max` and [`Hub::members`] pages from a
//!   name), the latest seq.
//! - `events.rs`: presence and typing batched per room and flushed within
//!   the delivery budget (`event_fanout_per_sec`), and [`HubOptions`].
//! - `remote.rs`: the cluster's side: [`Peers`], and the users other nodes
//!   report in this node's rooms.
//! - `registry.rs`: the live sessions and their running totals (count,
//!   queued bytes), for operators and the scrape.
//! - `deliver.rs`: `Hub::deliver`, the one entry of durable messages.
//!
//! Imports point one way: `deliver` → this file → `remote` → `events` →
//! `room` → `registry`; this file names `deliver` only to re-export it.
//!
//! Invariants:
//! - The hub never awaits. It never holds a map guard across an `.await`,
//!   and it reaches a session only through that session's bounded
//!   [`Outbox`](crate::delivery::Outbox), with a non-blocking push.
//! - A message is encoded once into shared bytes; each recipient gets a
//!   reference-counted handle, never a copy.
//! - A room's members see its messages in commit order, which is seq order,
//!   because one task at a time calls [`Hub::deliver`]: the delivery task,
//!   fed by the store writer in commit order (`handoff`), or in a cluster
//!   the bus's one delivery task, which puts each room's messages from
//!   every node in seq order (`cluster::bus`).
//! - A join or leave costs the same whatever the room's size: members are
//!   found through a map of slots once a room has more than `SCAN_MAX`
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
//! - Lock order: a room's map guard first; under it the hub may take an
//!   event list's mutex (`events.rs`) and call [`Peers`], which only
//!   queues. Never a room's guard under that mutex, and `Peers` never
//!   calls back into the hub. The session registry's guards are taken on
//!   their own, never with a room's.

mod deliver;
mod events;
mod registry;
mod remote;
mod room;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use serde_json::value::RawValue;

use crate::close::CloseReason;
use crate::hub::events::Events;
use crate::hub::room::{Room, Rooms, UNKNOWN};

pub use crate::hub::events::HubOptions;
pub use crate::hub::registry::{Registry, SessionEntry, SessionId, SessionInfo, SessionStats};
pub use crate::hub::remote::Peers;
pub use crate::hub::room::Member;

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

/// The room and session registries.
#[derive(Debug, Default)]
pub struct Hub {
    rooms: Rooms,
    registry: Registry,
    events: Events,
    /// The other nodes of a cluster; unset in single-node mode.
    peers: OnceLock<Arc<dyn Peers>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::with_options(HubOptions::default())
    }

    pub fn with_options(options: HubOptions) -> Hub {
        Hub {
            rooms: DashMap::new(),
            registry: Registry::default(),
            events: Events::new(options),
            peers: OnceLock::new(),
        }
    }

    /// Sets the other nodes the hub tells of its rooms (cluster mode), once;
    /// returns false when they were set already.
    pub fn set_peers(&self, peers: Arc<dyn Peers>) -> bool {
        self.peers.set(peers).is_ok()
    }

    /// Sends every room with presence changes its one batched `presence`
    /// event. Called every `presence_interval_ms` by the server's presence
    /// task; returns how many rooms it flushed.
    /// A room whose last event went to more sessions than the fan-out
    /// budget allows per flush waits out as many flushes, its changes
    /// accumulating meanwhile.
    pub fn flush_presence(&self) -> usize {
        self.events.flush_presence(&self.rooms)
    }

    /// Sends every room where someone typed its one coalesced `typing`
    /// event. Called every `typing_interval_ms` by the server's presence
    /// task; returns how many rooms it flushed.
    /// Big rooms wait out flushes as for presence.
    pub fn flush_typing(&self) -> usize {
        self.events.flush_typing(&self.rooms)
    }

    /// Adds `member` to `room`, creating the room. Joining twice is a no-op
    /// that still reports presence. When the member's user was not in the
    /// room yet, the members get a `presence` event at the next flush.
    pub fn join(&self, room: &str, member: Member) -> JoinOutcome {
        let mut entry = self
            .rooms
            .entry(Arc::from(room))
            .or_insert_with(|| Room::new(room, self.events.options.presence_events(room)));
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
                self.events.presence_changed(r, user);
            }
        }
        let latest = r.latest.load(Ordering::Acquire);
        if latest == UNKNOWN {
            r.unnoted = r.unnoted.saturating_add(1);
        }
        JoinOutcome {
            room: r.name.clone(),
            count: r.user_count(),
            presence: r.presence_json(self.events.options.presence_list_max),
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
            self.events.presence_changed(r, member.user.clone());
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
        if self.events.record_typing(&self.rooms, room, user) {
            if let Some(peers) = self.peers.get() {
                peers.typing(room, user);
            }
        }
    }

    /// Records that `user`, on another node, typed in `room`: as
    /// [`Hub::typing`], but not told to the other nodes again.
    pub fn remote_typing(&self, room: &str, user: &str) {
        self.events
            .record_typing(&self.rooms, room, &Arc::from(user));
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
            remote::add(&self.events, r, node, user);
        } else {
            remote::remove(&self.events, r, node, user);
        }
    }

    /// Sets the users `node` has in `room` to `users`: those not listed
    /// leave, those listed join (see [`Hub::remote_presence`]).
    pub fn remote_members(&self, room: &str, node: &str, users: &[String]) {
        if let Some(mut entry) = self.rooms.get_mut(room) {
            remote::replace(&self.events, entry.value_mut(), node, users);
        }
    }

    /// `node` is gone: its users leave every room.
    pub fn node_gone(&self, node: &str) {
        remote::node_gone(&self.events, &self.rooms, node);
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

    /// The live sessions and their running totals (see [`Registry`]).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Records a live session, so operators can list and kick it.
    pub fn register_session(&self, id: SessionId, entry: SessionEntry) {
        self.registry.register(id, entry);
    }

    pub fn unregister_session(&self, id: SessionId) {
        self.registry.unregister(id);
    }

    /// Closes a session with `reason`. Returns whether it was live.
    pub fn close_session(&self, id: SessionId, reason: CloseReason) -> bool {
        self.registry.close(id, reason)
    }

    /// Closes every session of `user`; returns how many.
    pub fn close_user(&self, user: &str, reason: CloseReason) -> usize {
        self.registry.close_user(user, reason)
    }

    /// How many sessions are live: a running total, whatever their number.
    pub fn session_count(&self) -> usize {
        self.registry.count()
    }

    /// A snapshot of every live session, with the rooms each has joined.
    /// It visits every room and session: for operators' listings, not for
    /// counts or totals (see [`Hub::session_count`] and [`Hub::registry`]).
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
        self.registry.snapshot(rooms_of)
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
