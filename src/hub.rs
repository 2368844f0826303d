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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use protocol::ServerFrame;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::session::{CloseReason, Delivery, Outbox};
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
    users: HashMap<Arc<str>, u32>,
}

impl Room {
    /// Sends an ephemeral event to every member whose user is not `except`.
    fn broadcast_ephemeral(&self, frame: &ServerFrame, except: &str) {
        let text = Utf8Bytes::from(frame.to_json());
        for m in self.members.iter().filter(|m| &*m.user != except) {
            m.outbox.push_ephemeral(&text);
        }
    }

    fn presence(&self) -> Vec<String> {
        let mut users: Vec<String> = self.users.keys().map(|u| u.to_string()).collect();
        users.sort_unstable();
        users
    }
}

/// What a join returns.
#[derive(Debug)]
pub struct JoinOutcome {
    /// The room's shared name, the key that deliveries carry.
    pub room: Arc<str>,
    /// Distinct users in the room, sorted, the joiner included.
    pub presence: Vec<String>,
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
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            rooms: DashMap::new(),
            sessions: DashMap::new(),
        }
    }

    /// Adds `member` to `room`, creating the room. Joining twice is a no-op
    /// that still reports presence. When the member's user was not in the
    /// room yet, the other members get a `presence` event.
    pub fn join(&self, room: &str, member: Member) -> JoinOutcome {
        let mut entry = self.rooms.entry(Arc::from(room)).or_insert_with(|| Room {
            name: Arc::from(room),
            members: Vec::new(),
            users: HashMap::new(),
        });
        let r = entry.value_mut();
        if !r.members.iter().any(|m| m.session == member.session) {
            let count = r.users.entry(member.user.clone()).or_insert(0);
            *count += 1;
            let first = *count == 1;
            let user = member.user.clone();
            r.members.push(member);
            if first {
                let frame = ServerFrame::Presence {
                    room: room.to_owned(),
                    joined: vec![user.to_string()],
                    left: Vec::new(),
                };
                r.broadcast_ephemeral(&frame, &user);
            }
        }
        JoinOutcome {
            room: r.name.clone(),
            presence: r.presence(),
        }
    }

    /// Removes a session from a room. Returns whether it was a member. When
    /// its user has no session left there, the others get a `presence` event.
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
            let frame = ServerFrame::Presence {
                room: room.to_owned(),
                joined: Vec::new(),
                left: vec![member.user.to_string()],
            };
            r.broadcast_ephemeral(&frame, &member.user);
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
    /// Fans a durable message out to the room's members: one encoding, one
    /// shared buffer, one non-blocking push per member.
    fn committed(&self, msg: &Committed<'_>) {
        let Some(r) = self.rooms.get(msg.room) else {
            return;
        };
        let text =
            protocol::MessageRef::new(msg.room, msg.seq, msg.from, msg.ts, msg.body).to_json();
        let delivery = Arc::new(Delivery {
            room: r.name.clone(),
            seq: msg.seq,
            text: Utf8Bytes::from(text),
            created: std::time::Instant::now(),
        });
        for m in &r.members {
            m.outbox.push_message(&delivery);
        }
    }
}
