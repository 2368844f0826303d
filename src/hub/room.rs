//! One room's state: its members, their slots, its users and what the
//! other parts of the hub keep in it.
//!
//! It owns the `Room` record and the operations that keep its member
//! array, slot map and per-user counts consistent (a join or leave costs
//! the same in a room of any size). It must not send anything to a session
//! nor tell other nodes anything: batching events is `events.rs`'s job,
//! other nodes' users are `remote.rs`'s and fan-out is `deliver.rs`'s; this
//! module only holds the fields they keep here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::value::RawValue;

use crate::delivery::Outbox;
use crate::hub::registry::SessionId;

/// The room registry: every room with members, by name.
pub(super) type Rooms = DashMap<Arc<str>, Room>;

/// One session's membership of a room.
#[derive(Debug, Clone)]
pub struct Member {
    pub session: SessionId,
    pub user: Arc<str>,
    pub outbox: Outbox,
}

/// A room: its members and, for presence, how many sessions each user has in it.
#[derive(Debug)]
pub(super) struct Room {
    pub(super) name: Arc<str>,
    /// Dense, so that fan-out walks an array.
    pub(super) members: Vec<Member>,
    /// Each member's index in `members`, so that a leave finds its member
    /// without a scan (it swaps the last member into the gap). Kept only
    /// while the room has more than [`SCAN_MAX`] members, and then for every
    /// member; `None` otherwise (see [`Room::position`]). Boxed: most rooms
    /// are small, and every room carries the field.
    pub(super) slots: Option<Box<FxHashMap<SessionId, usize>>>,
    /// Sorted, so that a join lists the first ones and a `presence` request
    /// pages from a name without sorting. Each user's count is its local
    /// sessions plus the other nodes it is on (see `remote`).
    pub(super) users: BTreeMap<Arc<str>, u32>,
    /// The room's users on other nodes of a cluster; `None` without any.
    pub(super) remote: Option<Box<Remote>>,
    /// Whether this room sends `presence` events (see `presence_events_off`).
    pub(super) presence_events: bool,
    /// The changes for the next presence flush; `Some` exactly while the
    /// room is listed for it. Boxed, and only then: a quiet room holds none.
    pub(super) changes: Option<Box<Changes>>,
    /// Users who typed since the last typing flush; `Some` exactly while
    /// the room is listed for the next one.
    pub(super) typers: Option<Box<FxHashSet<Arc<str>>>>,
    /// The presence flush, and the typing flush, counted by the hub, from
    /// which this room may send its next event: a big room's events are
    /// spaced so that their deliveries stay within the fan-out budget.
    pub(super) presence_next: u64,
    pub(super) typing_next: u64,
    /// The room's latest committed seq, once known ([`UNKNOWN`] before):
    /// set from each commit's fan-out, under the same guard as its pushes,
    /// so a join reads it consistently with what its outbox will get.
    pub(super) latest: AtomicU64,
    /// Joins told the latest was unknown that have not reported the store's
    /// yet, and the lowest seq reported: where a cluster node's delivery
    /// of the room must start (see `Hub::delivery_start`).
    pub(super) unnoted: u32,
    pub(super) noted_min: u64,
}

/// A room's presence changes since its last flush.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// Users who arrived or went, at most `presence_list_max` of them. The
    /// flush reports each as it is then, present or not.
    pub(super) users: FxHashSet<Arc<str>>,
    /// Whether users beyond `users` arrived or went too.
    pub(super) truncated: bool,
}

/// A room's users on other nodes.
#[derive(Debug, Default)]
pub(super) struct Remote {
    /// Each node's users in the room.
    pub(super) nodes: FxHashMap<Arc<str>, FxHashSet<Arc<str>>>,
    /// On how many of those nodes each user is.
    pub(super) users: FxHashMap<Arc<str>, u32>,
}

/// An empty JSON array.
fn empty_list() -> Box<RawValue> {
    serde_json::value::to_raw_value(&[(); 0]).unwrap_or_else(|_| Box::<RawValue>::default())
}

/// `Room::latest` before the hub has seen a commit or a store read for it.
pub(super) const UNKNOWN: u64 = u64::MAX;

/// Rooms of at most this many members find a member by scanning them (a
/// few cache lines); bigger rooms keep a map of slots, so that a leave costs
/// the same in a room of 20,000. Most rooms are small, and a map in each
/// would cost every one of them an allocation.
pub(super) const SCAN_MAX: usize = 16;

impl Room {
    /// A room without members; `presence_events` is decided once, here, so
    /// a join pays no pattern match.
    pub(super) fn new(name: &str, presence_events: bool) -> Room {
        Room {
            name: Arc::from(name),
            members: Vec::new(),
            slots: None,
            users: BTreeMap::new(),
            remote: None,
            presence_events,
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
    pub(super) fn position(&self, session: SessionId) -> Option<usize> {
        match &self.slots {
            None => self.members.iter().position(|m| m.session == session),
            Some(slots) => slots.get(&session).copied(),
        }
    }

    /// Adds a member that is not in the room yet.
    pub(super) fn push_member(&mut self, member: Member) {
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
    pub(super) fn remove_member(&mut self, pos: usize) -> Member {
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
    pub(super) fn remote_of(&self, user: &str) -> u32 {
        self.remote
            .as_ref()
            .and_then(|r| r.users.get(user).copied())
            .unwrap_or(0)
    }

    /// Takes one from `user`'s count; returns whether the user is gone.
    pub(super) fn drop_user(&mut self, user: &str) -> bool {
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
    pub(super) fn user_count(&self) -> u64 {
        self.users.len() as u64
    }

    /// Raises the room's latest seq to `seq`; seqs only grow, so a smaller
    /// value (a store read older than a commit already seen) changes nothing.
    pub(super) fn raise_latest(&self, seq: u64) {
        let _ = self
            .latest
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur == UNKNOWN || cur < seq).then_some(seq)
            });
    }

    pub(super) fn presence(&self) -> Vec<String> {
        self.users.keys().map(|u| u.to_string()).collect()
    }

    /// The first `max` distinct users, sorted, as a JSON array: one
    /// buffer, no allocation per user, for the `joined` reply of a join.
    pub(super) fn presence_json(&self, max: usize) -> Box<RawValue> {
        let names: Vec<&str> = self.users.keys().take(max).map(|u| &**u).collect();
        // Serializing strings into a buffer cannot fail; `[]` is the
        // fallback rather than a panic.
        serde_json::value::to_raw_value(&names).unwrap_or_else(|_| empty_list())
    }
}
