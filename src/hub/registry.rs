//! The live sessions of this node, for operators and for the scrape.
//!
//! It owns the session registry (a `DashMap` from session id to
//! [`SessionEntry`]) and the operator views of it. It must not know rooms
//! (the hub hands their lists in) and must not touch a session other than
//! through its outbox.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::close::CloseReason;
use crate::delivery::Outbox;

/// A session's process-unique id.
pub type SessionId = u64;

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

/// The registered sessions.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: DashMap<SessionId, SessionEntry>,
}

impl Registry {
    /// Records a live session, so operators can list and kick it.
    pub fn register(&self, id: SessionId, entry: SessionEntry) {
        self.sessions.insert(id, entry);
    }

    pub fn unregister(&self, id: SessionId) {
        self.sessions.remove(&id);
    }

    /// Closes a session with `reason`. Returns whether it was live.
    pub fn close(&self, id: SessionId, reason: CloseReason) -> bool {
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

    /// A snapshot of every live session, sorted by id, each with its rooms
    /// as `rooms_of` lists them.
    pub fn snapshot(&self, mut rooms_of: HashMap<SessionId, Vec<String>>) -> Vec<SessionInfo> {
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
}
