//! The cluster's side of presence: what the hub tells other nodes, and
//! the users other nodes report in this node's rooms.
//!
//! It owns the [`Peers`] hooks and the bookkeeping of a room's `Remote`
//! users (which node has which user, on how many nodes each is), so that
//! a room's presence is its local users ∪ those other nodes report, a user
//! on two nodes counting once. It must not add or remove local members and
//! must not send events itself: a user new to a room or gone from it on
//! every node is recorded as a presence change with `events.rs`, as a local
//! join or leave is. A remote report costs the same as a local join or
//! leave; a node's departure costs one pass over the rooms.

use std::sync::Arc;

use rustc_hash::FxHashSet;

use crate::hub::events::Events;
use crate::hub::room::{Room, Rooms};

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

/// Sets the users `node` has in `r` to `users`: those not listed leave,
/// those listed join.
pub(super) fn replace(events: &Events, r: &mut Room, node: &str, users: &[String]) {
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
        remove(events, r, node, &user);
    }
    for user in listed {
        add(events, r, node, user);
    }
}

/// `node` is gone: its users leave every room.
pub(super) fn node_gone(events: &Events, rooms: &Rooms, node: &str) {
    for mut entry in rooms.iter_mut() {
        let r = entry.value_mut();
        let users: Vec<Arc<str>> = (r.remote.as_ref())
            .and_then(|rem| rem.nodes.get(node))
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        for user in users {
            remove(events, r, node, &user);
        }
    }
}

/// `user` is in `r` on `node`; repeating it changes nothing.
pub(super) fn add(events: &Events, r: &mut Room, node: &str, user: &str) {
    let rem = r.remote.get_or_insert_with(Box::default);
    let user: Arc<str> = Arc::from(user);
    if !(rem.nodes.entry(Arc::from(node)).or_default()).insert(user.clone()) {
        return;
    }
    *rem.users.entry(user.clone()).or_insert(0) += 1;
    let count = r.users.entry(user.clone()).or_insert(0);
    *count += 1;
    if *count == 1 {
        events.presence_changed(r, user);
    }
}

/// `user` is no longer in `r` on `node`; repeating it changes nothing.
pub(super) fn remove(events: &Events, r: &mut Room, node: &str, user: &str) {
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
        events.presence_changed(r, user);
    }
}
