//! The live sessions of this node, for operators and for the scrape.
//!
//! It owns the session registry (a `DashMap` from session id to
//! [`SessionEntry`]) and two running totals kept as sessions come and go:
//! how many are registered ([`Registry::count`]) and how many bytes wait in
//! their outboxes ([`Registry::queued_bytes`], a [`QueueTally`] every
//! registered outbox adds to as it fills and empties). So a `/metrics`
//! scrape or a session count costs the same with 20,000 sessions as with
//! ten; only the operator views (`Registry::snapshot`) visit every
//! session. It must not know rooms (the hub hands their lists in) and must
//! not touch a session other than through its outbox.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::close::CloseReason;
use crate::delivery::{Outbox, QueueTally};

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

/// The registered sessions and their running totals.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: DashMap<SessionId, SessionEntry>,
    /// How many entries `sessions` holds.
    count: AtomicUsize,
    /// The bytes queued in the registered sessions' outboxes.
    queued: Arc<QueueTally>,
}

impl Registry {
    /// Records a live session; its outbox's queued bytes count from now on.
    /// Registering an id again replaces its entry.
    pub fn register(&self, id: SessionId, entry: SessionEntry) {
        let outbox = entry.outbox.clone();
        match self.sessions.insert(id, entry) {
            Some(old) => old.outbox.untally(),
            None => {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !outbox.tally_into(&self.queued) {
            tracing::warn!(
                session = id,
                "an outbox registered with two hubs: its queued bytes count in the first"
            );
        }
    }

    /// Forgets a session; its outbox's queued bytes no longer count.
    pub fn unregister(&self, id: SessionId) {
        if let Some((_, entry)) = self.sessions.remove(&id) {
            self.count.fetch_sub(1, Ordering::Relaxed);
            entry.outbox.untally();
        }
    }

    /// How many sessions are registered.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Bytes of durable messages queued for every registered session.
    pub fn queued_bytes(&self) -> u64 {
        self.queued.bytes()
    }

    /// Bytes queued for the fullest registered session. With nothing
    /// queued anywhere (the running total says so) it visits no session;
    /// otherwise it reads one counter per session.
    pub fn largest_queue(&self) -> u64 {
        if self.queued_bytes() == 0 {
            return 0;
        }
        (self.sessions.iter())
            .map(|e| e.outbox.queued_bytes() as u64)
            .max()
            .unwrap_or(0)
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::delivery::{Delivery, Encoded, OutboxReceiver, WireFrame, outbox};
    use crate::metrics::Metrics;

    /// A live session of the test: its outbox and its receiving end.
    struct Live {
        outbox: Outbox,
        rx: OutboxReceiver,
    }

    fn session(metrics: &Arc<Metrics>) -> Live {
        let (outbox, rx) = outbox(16, 4096, 4, CancellationToken::new(), metrics.clone());
        Live { outbox, rx }
    }

    fn entry(id: SessionId, outbox: &Outbox) -> SessionEntry {
        SessionEntry {
            user: Arc::from(format!("u{}", id % 7)),
            remote: ([127, 0, 0, 1], 1).into(),
            connected_at_ms: 0,
            outbox: outbox.clone(),
            stats: Arc::new(SessionStats::default()),
        }
    }

    fn message(seq: u64, len: usize) -> Arc<Delivery> {
        let frame = WireFrame::text(&"x".repeat(len));
        Arc::new(Delivery::new(Arc::from("r"), vec![Encoded { seq, frame }]))
    }

    /// The running totals against what a visit of every session finds, once
    /// every receiver has settled what it took (as each does before it waits).
    fn assert_totals(registry: &Registry, live: &mut BTreeMap<SessionId, Live>) {
        for s in live.values_mut() {
            s.rx.settle();
        }
        let snapshot = registry.snapshot(HashMap::new());
        let queued: Vec<u64> = snapshot.iter().map(|s| s.queued_bytes as u64).collect();
        assert_eq!(registry.count(), snapshot.len());
        assert_eq!(registry.queued_bytes(), queued.iter().sum::<u64>());
        assert_eq!(
            registry.largest_queue(),
            queued.iter().copied().max().unwrap_or(0)
        );
    }

    #[test]
    fn running_totals_agree_with_a_full_snapshot_as_sessions_come_and_go() {
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::default();
        let mut live: BTreeMap<SessionId, Live> = BTreeMap::new();
        // Sessions known but not registered: gone ones, and new ones that
        // queue bytes before they register.
        let mut unregistered: Vec<(SessionId, Live)> = Vec::new();
        let mut next_id: SessionId = 0;
        // A fixed pseudo-random walk (xorshift), the same on every run.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut roll = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for step in 0..2000u64 {
            let ids: Vec<SessionId> = live.keys().copied().collect();
            let pick = |k: u64| ids.get((k as usize) % ids.len().max(1)).copied();
            match roll(8) {
                // A new session, with bytes queued before it registers half
                // the time.
                0 => {
                    let s = session(&metrics);
                    if roll(2) == 0 {
                        s.outbox
                            .push_message(&message(step, 30 + roll(200) as usize));
                    }
                    registry.register(next_id, entry(next_id, &s.outbox));
                    live.insert(next_id, s);
                    next_id += 1;
                }
                // A session leaves, often with bytes still queued; its
                // receiver is dropped now or later.
                1 => {
                    if let Some(id) = pick(roll(1000)) {
                        registry.unregister(id);
                        let s = live.remove(&id).unwrap();
                        if roll(2) == 0 {
                            unregistered.push((id, s));
                        }
                    }
                }
                // A gone session's outbox still gets a push (the hub held
                // it in a room), or its receiver goes.
                2 => {
                    if let Some((_, s)) = unregistered.pop() {
                        s.outbox.push_message(&message(step, 40));
                        if roll(2) == 0 {
                            unregistered.insert(0, (next_id, s));
                        }
                    }
                }
                // An id registered again with a new outbox replaces it.
                3 => {
                    if let Some(id) = pick(roll(1000)) {
                        let s = session(&metrics);
                        s.outbox.push_message(&message(step, 20));
                        registry.register(id, entry(id, &s.outbox));
                        live.insert(id, s);
                    }
                }
                // A session takes part of its queue, as one write batch.
                4 => {
                    if let Some(id) = pick(roll(1000)) {
                        let s = live.get_mut(&id).unwrap();
                        for _ in 0..=roll(3) {
                            s.rx.try_recv();
                        }
                    }
                }
                // Messages, some past a queue's bound (its session is then
                // closed as a slow consumer, and its queue kept).
                _ => {
                    for _ in 0..=roll(4) {
                        if let Some(id) = pick(roll(1000)) {
                            let len = 10 + roll(900) as usize;
                            live[&id].outbox.push_message(&message(step, len));
                        }
                    }
                }
            }
            assert_totals(&registry, &mut live);
        }
        assert!(registry.queued_bytes() > 0, "the walk queued something");
        for id in live.keys().copied().collect::<Vec<_>>() {
            registry.unregister(id);
        }
        drop(unregistered);
        assert_totals(&registry, &mut live);
        assert_eq!((registry.count(), registry.queued_bytes()), (0, 0));
    }
}
