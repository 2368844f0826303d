//! The cluster's bus: committed messages, typing and presence between the
//! nodes, over core NATS, and which nodes are alive.
//!
//! It owns the subscriptions of this node, the order in which a room's
//! messages reach the hub, and the table of nodes. It must not store
//! anything (history is the JetStream store's) nor reach sessions: it talks
//! to the hub through [`Peers`](crate::hub::Peers) (the hub's calls in),
//! [`CommitSink`] (the hub's fan-out out) and the hub's `remote_*` methods.
//!
//! Design (each file's `//!` has the details):
//! - **Fan-out by interest.** The hub calls `Peers::interest` when a room
//!   gets its first local member and when it loses its last; only between
//!   the two is the node subscribed to the room's delivery and events
//!   subjects (one tracked task per room, `room_task`). NATS routes a
//!   room's traffic only to the nodes with members in it.
//! - **Committed messages.** The JetStream store calls this bus as its
//!   [`CommitSink`] with the node's own acked appends. Each room's messages
//!   are published on `subjects::delivery` and handed to the local reorder
//!   stage at once.
//! - **Seq order on every node.** One task (the deliverer) is the only
//!   caller of `Hub::deliver` on this node. It holds messages that
//!   come early, drops duplicates by seq, reads holes from history through
//!   the [`HistoryReader`] after `cluster.gap_timeout_ms`, and starts a
//!   room where the hub's joins promised their sessions.
//! - **Typing and presence** travel on `subjects::events`, coalesced per
//!   room between two publishes. When its subscription to a room begins, a
//!   node publishes its users of the room and asks for the others'. The
//!   hub counts a user on several nodes once.
//! - **Nodes.** Every `cluster.heartbeat_interval_ms` a node publishes a
//!   heartbeat; a node not heard for `cluster.node_timeout_ms` is gone and
//!   its users leave every room. [`ClusterBus::nodes`] lists them for
//!   operators.
//! - **Never blocks the hub.** The hub's calls only push to the deliverer's
//!   channel or to the publisher's coalesced queue, whose size is bounded
//!   by the hub's own state (one entry per room and user) plus the commits
//!   not yet published (the store acks nothing while NATS is unreachable,
//!   so that part waits only as long as one publish).
//!
//! Files, each depending only on those after it: this one (the
//! `ClusterBus` facade and the public types); `deliver.rs` (the deliverer);
//! `subscribe.rs` (a room's subscriptions and the events they bring);
//! `liveness.rs` (heartbeats and the table of nodes); `publish.rs` (the
//! hub's calls in, the node's commits and the publisher task);
//! `shared.rs` (the state the tasks share and the queues between them);
//! `order.rs` (one room's order, without I/O or clock); `wire.rs` (the
//! payloads between nodes).
//!
//! Wiring: [`ClusterBus::start`] sets the bus as the hub's peers; the
//! JetStream store takes it as its `CommitSink`; the reader is that
//! store's `read_after` (the store opens before the bus, and its writer
//! starts after it). Nothing here runs in single-node mode.
//!
//! A lost NATS message (core NATS is at most once) is repaired for
//! messages by the gap reads (so a lost last message of a quiet room
//! arrives with the room's next one); for presence, by each node sending every
//! room's member list again once per `cluster.node_timeout_ms` (a share of
//! its rooms at each heartbeat), so the bytes per heartbeat stay a share
//! of the node's presence.

mod deliver;
mod liveness;
mod order;
mod publish;
mod shared;
mod subscribe;
mod wire;

pub use shared::{ConnectionCount, HistoryReader};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use deliver::deliverer;
use liveness::liveness;
use order::Limits;
use publish::{Link, publisher};
use shared::{Counters, Queue, Shared, Timing, lock, now_ms};

use super::subjects;
use crate::config::ClusterConfig;
use crate::history::{CommitSink, Committed};
use crate::hub::Hub;

/// Why the bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the hub already has peers")]
    PeersSet,
    #[error("cannot subscribe to the nodes' heartbeats")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// A node of the cluster, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub id: String,
    /// Whether this is the node answering.
    pub this_node: bool,
    /// When the node started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When it was last heard, in milliseconds since the Unix epoch.
    pub last_seen_ms: u64,
    /// False once silent for `cluster.node_timeout_ms`.
    pub alive: bool,
    /// Its client connections, as of its last heartbeat.
    pub connections: u64,
}

/// What the bus has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Delivery payloads received from other nodes.
    pub deliveries_received: u64,
    /// Event payloads received from other nodes.
    pub events_received: u64,
    /// Reads of history to fill a gap or catch up.
    pub history_reads: u64,
    /// Those reads whose answer (messages or an error) the deliverer has
    /// taken in.
    pub history_reads_answered: u64,
    /// Messages handed to the hub.
    pub delivered: u64,
}

/// The bus of one node: see the module.
#[derive(Debug)]
pub struct ClusterBus {
    shared: Arc<Shared>,
}

impl ClusterBus {
    /// Starts the bus's tasks on `tracker` (they end with `token`) and sets
    /// it as the hub's peers. `reader` fills gaps from history;
    /// `connections` counts this node's clients for its heartbeats.
    pub async fn start(
        client: async_nats::Client,
        config: &ClusterConfig,
        hub: Arc<Hub>,
        reader: HistoryReader,
        connections: ConnectionCount,
        tracker: &TaskTracker,
        token: CancellationToken,
    ) -> Result<Arc<ClusterBus>, BusError> {
        let heartbeats = client
            .subscribe(subjects::nodes_wildcard(&config.stream))
            .await?;
        let (deliver, inputs) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue::default());
        let link = Arc::new(Link {
            deliver: deliver.clone(),
            queue: queue.clone(),
        });
        if !hub.set_peers(link) {
            return Err(BusError::PeersSet);
        }
        let shared = Arc::new(Shared {
            node: config.node_id(),
            stream: config.stream.clone(),
            started_ms: now_ms(),
            timing: Timing {
                heartbeat: Duration::from_millis(config.heartbeat_interval_ms),
                node_timeout: Duration::from_millis(config.node_timeout_ms),
                limits: Limits {
                    gap_timeout: Duration::from_millis(config.gap_timeout_ms),
                    request_timeout: Duration::from_millis(config.request_timeout_ms),
                    read_page: config.max_batch.max(1),
                    reorder_max: config.reorder_max.max(1),
                },
            },
            client,
            hub,
            reader,
            connections,
            queue,
            deliver,
            nodes: Mutex::new(HashMap::new()),
            subscribed: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            tracker: tracker.clone(),
        });
        tracker.spawn(deliverer(shared.clone(), inputs, token.clone()));
        tracker.spawn(publisher(shared.clone(), token.clone()));
        tracker.spawn(liveness(shared.clone(), heartbeats, token));
        Ok(Arc::new(ClusterBus { shared }))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.node
    }

    /// Every node heard of, this one first, then by id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let s = &self.shared;
        let mut out = vec![NodeInfo {
            id: s.node.clone(),
            this_node: true,
            started_ms: s.started_ms,
            last_seen_ms: now_ms(),
            alive: true,
            connections: (s.connections)(),
        }];
        let mut others: Vec<NodeInfo> = lock(&s.nodes)
            .iter()
            .map(|(id, n)| NodeInfo {
                id: id.clone(),
                this_node: false,
                started_ms: n.started_ms,
                last_seen_ms: n.last_seen_ms,
                alive: n.alive,
                connections: n.connections,
            })
            .collect();
        others.sort_by(|a, b| a.id.cmp(&b.id));
        out.extend(others);
        out
    }

    /// The rooms this node is subscribed to (the subscriptions live:
    /// the node's ask came back, or `request_timeout_ms` passed), sorted.
    pub fn rooms(&self) -> Vec<String> {
        let mut rooms: Vec<String> = lock(&self.shared.subscribed).keys().cloned().collect();
        rooms.sort_unstable();
        rooms
    }

    pub fn stats(&self) -> BusStats {
        let c = &self.shared.counters;
        BusStats {
            deliveries_received: c.deliveries_received.load(Ordering::Relaxed),
            events_received: c.events_received.load(Ordering::Relaxed),
            history_reads: c.history_reads.load(Ordering::Relaxed),
            history_reads_answered: c.history_reads_answered.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
        }
    }
}

impl CommitSink for ClusterBus {
    /// This node's acked messages: published to the other nodes and handed
    /// to the local reorder stage, per room.
    fn committed(&self, msgs: &[Committed<'_>]) {
        publish::committed(&self.shared, msgs);
    }
}
