//! What the bus's tasks share, and the channels between them: `Shared`
//! (the node's identity and timing, the NATS client, the hub, the table
//! of nodes, the live subscriptions, the counters), the deliverer's
//! `Input`, and the publisher's coalesced `Queue`, which the hub's calls,
//! the room tasks and liveness push to without waiting (its size is
//! bounded by the hub's own state plus the commits not yet published).
//!
//! Data and the lock only: it must not start tasks, do I/O or decide
//! anything; the files beside it own what is done with each part.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use tokio::sync::{Notify, mpsc};
use tokio_util::task::TaskTracker;

use super::order::Limits;
use super::wire::BusMessage;
use crate::history::{ReadError, StoredMessage};
use crate::hub::Hub;

/// Reads a room's history: the messages with seq in `(after, after +
/// limit]`, ascending (the JetStream store's `read_after`).
pub type HistoryReader = Arc<
    dyn Fn(String, u64, usize) -> BoxFuture<'static, Result<Vec<StoredMessage>, ReadError>>
        + Send
        + Sync,
>;

/// How many client connections this node holds, for its heartbeats.
pub type ConnectionCount = Arc<dyn Fn() -> u64 + Send + Sync>;

/// What the deliverer is told.
#[derive(Debug)]
pub(super) enum Input {
    Interest {
        room: String,
        on: bool,
    },
    Local {
        room: String,
        msgs: Arc<[BusMessage]>,
    },
    Remote {
        room: String,
        round: u64,
        msgs: Vec<BusMessage>,
    },
    /// The room task's subscriptions are live.
    Ready {
        room: String,
        round: u64,
    },
    Read {
        room: String,
        round: u64,
        result: Result<Vec<StoredMessage>, ReadError>,
    },
}

/// A room's events waiting to be published, coalesced.
#[derive(Debug, Default)]
pub(super) struct RoomEvents {
    pub(super) typing: BTreeSet<String>,
    pub(super) presence: BTreeMap<String, bool>,
}

/// What the publisher has to send.
#[derive(Debug, Default)]
pub(super) struct Outgoing {
    pub(super) commits: Vec<(String, Arc<[BusMessage]>)>,
    pub(super) events: BTreeMap<String, RoomEvents>,
    /// Rooms whose member lists to send, and whether to ask for others'.
    pub(super) announce: BTreeMap<String, bool>,
}

/// The publisher's queue, shared with the hub's calls.
#[derive(Debug, Default)]
pub(super) struct Queue {
    pub(super) outgoing: Mutex<Outgoing>,
    pub(super) notify: Notify,
}

impl Queue {
    pub(super) fn with(&self, f: impl FnOnce(&mut Outgoing)) {
        f(&mut lock(&self.outgoing));
        self.notify.notify_one();
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A node heard of, in the table of nodes.
#[derive(Debug)]
pub(super) struct Node {
    pub(super) started_ms: u64,
    pub(super) last_seen: Instant,
    pub(super) last_seen_ms: u64,
    pub(super) alive: bool,
    pub(super) connections: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) deliveries_received: AtomicU64,
    pub(super) events_received: AtomicU64,
    pub(super) history_reads: AtomicU64,
    pub(super) history_reads_answered: AtomicU64,
    pub(super) delivered: AtomicU64,
}

/// The timing and bounds the bus takes from `[cluster]`.
#[derive(Debug, Clone)]
pub(super) struct Timing {
    pub(super) heartbeat: Duration,
    pub(super) node_timeout: Duration,
    pub(super) limits: Limits,
}

/// What the bus's tasks share.
pub(super) struct Shared {
    pub(super) node: String,
    pub(super) stream: String,
    pub(super) started_ms: u64,
    pub(super) timing: Timing,
    pub(super) client: async_nats::Client,
    pub(super) hub: Arc<Hub>,
    pub(super) reader: HistoryReader,
    pub(super) connections: ConnectionCount,
    pub(super) queue: Arc<Queue>,
    pub(super) deliver: mpsc::UnboundedSender<Input>,
    pub(super) nodes: Mutex<HashMap<String, Node>>,
    /// The rooms whose subscriptions are live, with their task's round.
    pub(super) subscribed: Mutex<HashMap<String, u64>>,
    pub(super) counters: Counters,
    pub(super) tracker: TaskTracker,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("node", &self.node).finish()
    }
}
