//! The cluster's bus: committed messages, typing and presence between the
//! nodes, over core NATS, and which nodes are alive.
//!
//! It owns the subscriptions of this node, the order in which a room's
//! messages reach the hub, and the table of nodes. It must not store
//! anything (history is the JetStream store's) nor reach sessions: it talks
//! to the hub through [`Peers`] (the hub's calls in), [`CommitSink`] (the
//! hub's fan-out out) and the hub's `remote_*` methods.
//!
//! Design:
//! - **Fan-out by interest.** The hub calls [`Peers::interest`] when a room
//!   gets its first local member and when it loses its last; only between
//!   the two is the node subscribed to the room's delivery and events
//!   subjects (one tracked task per room, `room_task`). NATS routes a
//!   room's traffic only to the nodes with members in it.
//! - **Committed messages.** The JetStream store calls this bus as its
//!   [`CommitSink`] with the node's own acked appends. Each room's messages
//!   are published on `subjects::delivery` (a JSON object: the node and the
//!   messages' seq, sender, time and raw body, split under the server's
//!   payload limit) and handed to the local reorder stage at once.
//! - **Seq order on every node.** One task (the deliverer) is the only
//!   caller of `Hub::deliver` on this node. Per room (`order.rs`,
//!   bookkeeping without I/O or clock) it keeps the next seq to deliver
//!   and holds messages ahead of it (at most `cluster.reorder_max`; the
//!   newest beyond are dropped and read back); duplicates (a node's own
//!   message, local and echoed) are dropped by seq.
//!   A hole not filled within `cluster.gap_timeout_ms` is read from history
//!   through the [`HistoryReader`], a page of `cluster.max_batch` at a time
//!   (the next at once after a full one); an erased message (no body) is
//!   skipped, and seqs that history does not hold either (retention) are
//!   passed over after two reads that find nothing.
//! - **Where a room starts.** A session that joins a room new to the hub
//!   reads the room's latest seq from the store and reports it to the hub,
//!   which promises the session every later message. So the deliverer
//!   starts a room after `Hub::delivery_start`: once every such join has
//!   reported, after the lowest report (holding what arrives meanwhile; a
//!   session drops what it has already by its floor). Once the
//!   subscriptions are live it reads history after that twice,
//!   `gap_timeout_ms` apart, so a message committed between the join and
//!   the subscription (or published before the subscription reached every
//!   NATS server) arrives even in a room that stays quiet. A report missing after `cluster.request_timeout_ms`
//!   (the session's read failed, or it ended) holds it back no longer: the
//!   room starts after the hub's latest, or without one at the first
//!   message held.
//! - **Typing and presence** travel on `subjects::events`, coalesced per
//!   room between two publishes (typers as a set, each user's last presence
//!   change). A node ignores its own. When its subscription to a room
//!   begins, a node publishes its users of the room and asks for the
//!   others'; each node with members answers with its own (`Members`, in
//!   parts under the payload limit; the first part replaces what the
//!   receiver had of that node). The echo of its own ask tells the node its
//!   subscriptions are live. The hub counts a user on several nodes once.
//! - **Nodes.** Every `cluster.heartbeat_interval_ms` a node publishes a
//!   heartbeat on `subjects::node`: its id, start time and connection
//!   count, a few dozen bytes whatever the node holds (presence does not
//!   ride on heartbeats, it is per room, above). A node not heard for
//!   `cluster.node_timeout_ms` is gone (noticed at the next heartbeat tick,
//!   so within `node_timeout_ms` + `heartbeat_interval_ms`): the hub drops
//!   its users from every room, which sends the usual `presence` events.
//!   Events from a gone node are ignored; when it is heard again (or a node
//!   restarts under the same id) this node asks every room it has for the
//!   members again. [`ClusterBus::nodes`] lists them for operators.
//! - **Never blocks the hub.** The hub's calls only push to the deliverer's
//!   channel or to the publisher's coalesced queue, whose size is bounded
//!   by the hub's own state (one entry per room and user) plus the commits
//!   not yet published (the store acks nothing while NATS is unreachable,
//!   so that part waits only as long as one publish).
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::subjects;
use order::{Limits, Order};

mod order;
use crate::config::ClusterConfig;
use crate::delivery::EncodedCommit;
use crate::history::{CommitSink, Committed, ReadError, StoredMessage};
use crate::hub::{Hub, Peers};

/// Reads a room's history: the messages with seq in `(after, after +
/// limit]`, ascending (the JetStream store's `read_after`).
pub type HistoryReader = Arc<
    dyn Fn(String, u64, usize) -> BoxFuture<'static, Result<Vec<StoredMessage>, ReadError>>
        + Send
        + Sync,
>;

/// How many client connections this node holds, for its heartbeats.
pub type ConnectionCount = Arc<dyn Fn() -> u64 + Send + Sync>;

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
    /// Messages handed to the hub.
    pub delivered: u64,
}

/// One message on the bus (not a client wire type: nodes only).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BusMessage {
    seq: u64,
    from: String,
    ts: u64,
    body: Box<RawValue>,
}

/// A delivery payload: some of one room's committed messages, in seq order.
#[derive(Debug, Serialize, Deserialize)]
struct DeliveryPayload {
    node: String,
    msgs: Vec<BusMessage>,
}

/// An events payload.
#[derive(Debug, Serialize, Deserialize)]
struct EventPayload {
    node: String,
    event: Event,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    Typing {
        users: Vec<String>,
    },
    Presence {
        joined: Vec<String>,
        left: Vec<String>,
    },
    /// The sender's users of the room: the `first` part replaces what the
    /// receiver had of the sender, later parts add; `ask` asks every other
    /// node with members in the room to send its own.
    Members {
        users: Vec<String>,
        first: bool,
        ask: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    node: String,
    started_ms: u64,
    connections: u64,
}

/// What the deliverer is told.
#[derive(Debug)]
enum Input {
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
struct RoomEvents {
    typing: BTreeSet<String>,
    presence: BTreeMap<String, bool>,
}

/// What the publisher has to send.
#[derive(Debug, Default)]
struct Outgoing {
    commits: Vec<(String, Arc<[BusMessage]>)>,
    events: BTreeMap<String, RoomEvents>,
    /// Rooms whose member lists to send, and whether to ask for others'.
    announce: BTreeMap<String, bool>,
}

/// The publisher's queue, shared with the hub's calls.
#[derive(Debug, Default)]
struct Queue {
    outgoing: Mutex<Outgoing>,
    notify: Notify,
}

impl Queue {
    fn with(&self, f: impl FnOnce(&mut Outgoing)) {
        f(&mut lock(&self.outgoing));
        self.notify.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the hub holds: only queues, so that hub and bus do not keep each
/// other alive.
#[derive(Debug)]
struct Link {
    deliver: mpsc::UnboundedSender<Input>,
    queue: Arc<Queue>,
}

impl Peers for Link {
    fn interest(&self, room: &str, on: bool) {
        let _ = self.deliver.send(Input::Interest {
            room: room.to_owned(),
            on,
        });
    }

    fn typing(&self, room: &str, user: &str) {
        self.queue.with(|o| {
            (o.events.entry(room.to_owned()).or_default())
                .typing
                .insert(user.to_owned());
        });
    }

    fn presence(&self, room: &str, user: &str, joined: bool) {
        self.queue.with(|o| {
            (o.events.entry(room.to_owned()).or_default())
                .presence
                .insert(user.to_owned(), joined);
        });
    }
}

#[derive(Debug)]
struct Node {
    started_ms: u64,
    last_seen: Instant,
    last_seen_ms: u64,
    alive: bool,
    connections: u64,
}

#[derive(Debug, Default)]
struct Counters {
    deliveries_received: AtomicU64,
    events_received: AtomicU64,
    history_reads: AtomicU64,
    delivered: AtomicU64,
}

/// The timing and bounds the bus takes from `[cluster]`.
#[derive(Debug, Clone)]
struct Timing {
    heartbeat: Duration,
    node_timeout: Duration,
    limits: Limits,
}

struct Shared {
    node: String,
    stream: String,
    started_ms: u64,
    timing: Timing,
    client: async_nats::Client,
    hub: Arc<Hub>,
    reader: HistoryReader,
    connections: ConnectionCount,
    queue: Arc<Queue>,
    deliver: mpsc::UnboundedSender<Input>,
    nodes: Mutex<HashMap<String, Node>>,
    /// The rooms whose subscriptions are live, with their task's round.
    subscribed: Mutex<HashMap<String, u64>>,
    counters: Counters,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("node", &self.node).finish()
    }
}

impl Shared {
    /// The most bytes one payload may have: half the server's limit, so
    /// a part's envelope and names never push it over.
    fn payload_budget(&self) -> usize {
        (self.client.server_info().max_payload / 2).max(1024)
    }

    /// Whether events from `node` count: not from a node found gone (until
    /// its next heartbeat). A node not heard of yet is noted as alive.
    fn admit(&self, node: &str) -> bool {
        let mut nodes = lock(&self.nodes);
        match nodes.get(node) {
            Some(n) => n.alive,
            None => {
                nodes.insert(
                    node.to_owned(),
                    Node {
                        started_ms: 0,
                        last_seen: Instant::now(),
                        last_seen_ms: now_ms(),
                        alive: true,
                        connections: 0,
                    },
                );
                true
            }
        }
    }
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
            delivered: c.delivered.load(Ordering::Relaxed),
        }
    }
}

impl CommitSink for ClusterBus {
    /// This node's acked messages: published to the other nodes and handed
    /// to the local reorder stage, per room.
    fn committed(&self, msgs: &[Committed<'_>]) {
        let mut rooms: Vec<(String, Vec<BusMessage>)> = Vec::new();
        for m in msgs {
            let msg = BusMessage {
                seq: m.seq,
                from: m.from.to_owned(),
                ts: m.ts,
                body: m.body.to_owned(),
            };
            match rooms.iter_mut().find(|(r, _)| r == m.room) {
                Some((_, list)) => list.push(msg),
                None => rooms.push((m.room.to_owned(), vec![msg])),
            }
        }
        let rooms: Vec<(String, Arc<[BusMessage]>)> =
            rooms.into_iter().map(|(r, m)| (r, m.into())).collect();
        for (room, msgs) in &rooms {
            let _ = self.shared.deliver.send(Input::Local {
                room: room.clone(),
                msgs: msgs.clone(),
            });
        }
        self.shared.queue.with(|o| o.commits.extend(rooms));
    }
}

/// Publishes what the queue holds, whenever it holds something.
async fn publisher(shared: Arc<Shared>, token: CancellationToken) {
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = shared.queue.notify.notified() => {}
        }
        let out = std::mem::take(&mut *lock(&shared.queue.outgoing));
        let budget = shared.payload_budget();
        for (room, msgs) in out.commits {
            let subject = subjects::delivery(&shared.stream, &room);
            for part in split(&msgs, budget, |m| m.body.get().len() + m.from.len() + 64) {
                let payload = DeliveryPayload {
                    node: shared.node.clone(),
                    msgs: part.to_vec(),
                };
                publish(&shared, &subject, &payload).await;
            }
        }
        for (room, events) in out.events {
            let subject = subjects::events(&shared.stream, &room);
            let typers: Vec<String> = events.typing.into_iter().collect();
            for part in split(&typers, budget, |u| u.len() + 3) {
                let event = Event::Typing {
                    users: part.to_vec(),
                };
                send_event(&shared, &subject, event).await;
            }
            let changes: Vec<(String, bool)> = events.presence.into_iter().collect();
            for part in split(&changes, budget, |(u, _)| u.len() + 3) {
                let (joined, left): (Vec<_>, Vec<_>) = part.iter().partition(|(_, j)| *j);
                let event = Event::Presence {
                    joined: joined.into_iter().map(|(u, _)| u.clone()).collect(),
                    left: left.into_iter().map(|(u, _)| u.clone()).collect(),
                };
                send_event(&shared, &subject, event).await;
            }
        }
        for (room, ask) in out.announce {
            let subject = subjects::events(&shared.stream, &room);
            let users = shared.hub.local_users(&room);
            let mut first = true;
            for part in split(&users, budget, |u| u.len() + 3) {
                let event = Event::Members {
                    users: part.to_vec(),
                    first,
                    ask: ask && first,
                };
                first = false;
                send_event(&shared, &subject, event).await;
            }
            if first {
                let event = Event::Members {
                    users: Vec::new(),
                    first,
                    ask,
                };
                send_event(&shared, &subject, event).await;
            }
        }
    }
}

/// `items` in consecutive parts of at most `budget` bytes by `size` (at
/// least one item each).
fn split<T>(items: &[T], budget: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && bytes + n > budget {
            parts.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < items.len() {
        parts.push(&items[start..]);
    }
    parts
}

async fn send_event(shared: &Shared, subject: &str, event: Event) {
    let payload = EventPayload {
        node: shared.node.clone(),
        event,
    };
    publish(shared, subject, &payload).await;
}

async fn publish(shared: &Shared, subject: &str, payload: &impl Serialize) {
    let bytes = match serde_json::to_vec(payload) {
        Ok(b) => b,
        Err(error) => {
            tracing::warn!(%error, subject, "cannot encode a bus payload");
            return;
        }
    };
    if let Err(error) = shared
        .client
        .publish(subject.to_owned(), bytes.into())
        .await
    {
        tracing::warn!(%error, subject, "cannot publish on the cluster bus");
    }
}

/// A room the deliverer orders, in one interest period.
#[derive(Debug)]
struct Room {
    /// Which interest period of the room this is: inputs of an earlier
    /// one (a task being cancelled, a read in flight) are dropped.
    round: u64,
    token: CancellationToken,
    order: Order,
}

/// The one caller of the hub's fan-out: keeps every room's order (module doc).
async fn deliverer(
    shared: Arc<Shared>,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    token: CancellationToken,
) {
    let limits = &shared.timing.limits;
    let mut rooms: HashMap<String, Room> = HashMap::new();
    let mut round = 0u64;
    let mut tick = tokio::time::interval((limits.gap_timeout / 2).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            input = inputs.recv() => {
                let Some(input) = input else { break };
                let name = match input {
                    Input::Interest { room, on: true } => {
                        round += 1;
                        let child = token.child_token();
                        let fresh = Room { round, token: child.clone(), order: Order::new(Instant::now()) };
                        if let Some(old) = rooms.insert(room.clone(), fresh) {
                            old.token.cancel();
                        }
                        shared.tracker.spawn(room_task(shared.clone(), room.clone(), round, child));
                        room
                    }
                    Input::Interest { room, on: false } => {
                        if let Some(old) = rooms.remove(&room) {
                            old.token.cancel();
                        }
                        continue;
                    }
                    Input::Local { room, msgs } => {
                        let Some(r) = rooms.get_mut(&room) else { continue };
                        r.order.hold(msgs.iter().cloned(), limits);
                        room
                    }
                    Input::Remote { room, round, msgs } => {
                        let Some(r) = rooms.get_mut(&room).filter(|r| r.round == round) else { continue };
                        r.order.hold(msgs, limits);
                        room
                    }
                    Input::Ready { room, round } => {
                        let Some(r) = rooms.get_mut(&room).filter(|r| r.round == round) else { continue };
                        r.order.ready();
                        room
                    }
                    Input::Read { room, round, result } => {
                        let Some(r) = rooms.get_mut(&room).filter(|r| r.round == round) else { continue };
                        let msgs = result
                            .inspect_err(|error| tracing::warn!(%error, room, "cannot read a room's history for its live delivery; retrying"))
                            .ok();
                        r.order.read_done(msgs, Instant::now(), limits);
                        room
                    }
                };
                if let Some(r) = rooms.get_mut(&name) {
                    step(&shared, &name, r);
                }
            }
            _ = tick.tick() => {
                for (name, r) in rooms.iter_mut().filter(|(_, r)| !r.order.idle()) {
                    step(&shared, name, r);
                }
            }
        }
    }
    for r in rooms.values() {
        r.token.cancel();
    }
}

/// Hands the hub what is next in the room's order, and starts the history
/// read it asks for.
fn step(shared: &Arc<Shared>, name: &str, r: &mut Room) {
    let limits = &shared.timing.limits;
    let now = Instant::now();
    // A join that never reports its read (it failed, the session ended)
    // holds the start back only for a request timeout.
    let start = shared.hub.delivery_start(name).or_else(|| {
        r.order
            .waited_out(now, limits)
            .then(|| shared.hub.latest(name))
            .flatten()
    });
    let step = r.order.step(start, now, limits);
    if !step.run.is_empty() {
        let committed: Vec<Committed<'_>> = (step.run.iter())
            .map(|m| Committed {
                room: name,
                seq: m.seq,
                ts: m.ts,
                from: &m.from,
                body: &m.body,
            })
            .collect();
        shared.hub.deliver(EncodedCommit::encode(&committed));
        (shared.counters.delivered).fetch_add(step.run.len() as u64, Ordering::Relaxed);
    }
    if let Some(after) = step.read_after {
        shared
            .counters
            .history_reads
            .fetch_add(1, Ordering::Relaxed);
        let read = (shared.reader)(name.to_owned(), after, limits.read_page);
        let (tx, token) = (shared.deliver.clone(), r.token.clone());
        let (room, round) = (name.to_owned(), r.round);
        shared.tracker.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                result = read => {
                    let _ = tx.send(Input::Read { room, round, result });
                }
            }
        });
    }
}

/// One room's subscriptions, while the hub has local members in it.
async fn room_task(shared: Arc<Shared>, room: String, round: u64, token: CancellationToken) {
    let client = &shared.client;
    let (deliveries, events) = match (
        client
            .subscribe(subjects::delivery(&shared.stream, &room))
            .await,
        client
            .subscribe(subjects::events(&shared.stream, &room))
            .await,
    ) {
        (Ok(d), Ok(e)) => (d, e),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, room, "cannot subscribe to a room on the cluster bus");
            return;
        }
    };
    let (mut deliveries, mut events) = (deliveries.fuse(), events.fuse());
    // Our users, and a request for everyone else's; its echo says the
    // subscriptions are live.
    shared.queue.with(|o| {
        o.announce.insert(room.clone(), true);
    });
    let mut ready = false;
    let ready_by = tokio::time::sleep(shared.timing.limits.request_timeout);
    tokio::pin!(ready_by);
    let mark_ready = |ready: &mut bool| {
        if !*ready {
            *ready = true;
            lock(&shared.subscribed).insert(room.clone(), round);
            let _ = shared.deliver.send(Input::Ready {
                room: room.clone(),
                round,
            });
        }
    };
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            () = &mut ready_by, if !ready => mark_ready(&mut ready),
            msg = deliveries.next() => {
                let Some(msg) = msg else { break };
                match serde_json::from_slice::<DeliveryPayload>(&msg.payload) {
                    Ok(p) if p.node == shared.node => {}
                    Ok(p) => {
                        shared.counters.deliveries_received.fetch_add(1, Ordering::Relaxed);
                        let _ = shared.deliver.send(Input::Remote { room: room.clone(), round, msgs: p.msgs });
                    }
                    Err(error) => tracing::warn!(%error, room, "undecodable delivery on the cluster bus"),
                }
            }
            msg = events.next() => {
                let Some(msg) = msg else { break };
                match serde_json::from_slice::<EventPayload>(&msg.payload) {
                    Ok(p) if p.node == shared.node => {
                        if matches!(p.event, Event::Members { ask: true, .. }) {
                            mark_ready(&mut ready);
                        }
                    }
                    Ok(p) => {
                        shared.counters.events_received.fetch_add(1, Ordering::Relaxed);
                        apply(&shared, &room, &p.node, p.event);
                    }
                    Err(error) => tracing::warn!(%error, room, "undecodable event on the cluster bus"),
                }
            }
        }
    }
    let mut subscribed = lock(&shared.subscribed);
    if subscribed.get(&room) == Some(&round) {
        subscribed.remove(&room);
    }
}

/// Applies another node's event to the hub.
fn apply(shared: &Shared, room: &str, node: &str, event: Event) {
    if !shared.admit(node) {
        return;
    }
    let hub = &shared.hub;
    match event {
        Event::Typing { users } => {
            for u in &users {
                hub.remote_typing(room, u);
            }
        }
        Event::Presence { joined, left } => {
            for u in &joined {
                hub.remote_presence(room, node, u, true);
            }
            for u in &left {
                hub.remote_presence(room, node, u, false);
            }
        }
        Event::Members { users, first, ask } => {
            if first {
                hub.remote_members(room, node, &users);
            } else {
                for u in &users {
                    hub.remote_presence(room, node, u, true);
                }
            }
            if ask {
                shared.queue.with(|o| {
                    o.announce.entry(room.to_owned()).or_insert(false);
                });
            }
        }
    }
}

/// Publishes this node's heartbeats, hears the others', and finds the
/// nodes gone silent.
async fn liveness(
    shared: Arc<Shared>,
    heartbeats: async_nats::Subscriber,
    token: CancellationToken,
) {
    let mut heartbeats = heartbeats.fuse();
    let mut tick = tokio::time::interval(shared.timing.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let subject = subjects::node(&shared.stream, &shared.node);
    // Each room's member list is sent again once every `refresh` ticks, a
    // share of the rooms per tick.
    let refresh = (shared.timing.node_timeout.as_millis()
        / shared.timing.heartbeat.as_millis().max(1))
    .max(1);
    let mut ticks: u128 = 0;
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {
                let beat = Heartbeat {
                    node: shared.node.clone(),
                    started_ms: shared.started_ms,
                    connections: (shared.connections)(),
                };
                publish(&shared, &subject, &beat).await;
                ticks += 1;
                refresh_share(&shared, ticks % refresh, refresh);
                let gone: Vec<String> = lock(&shared.nodes)
                    .iter_mut()
                    .filter(|(_, n)| n.alive && n.last_seen.elapsed() >= shared.timing.node_timeout)
                    .map(|(id, n)| {
                        n.alive = false;
                        id.clone()
                    })
                    .collect();
                for node in gone {
                    tracing::warn!(node, "cluster node silent: its members leave");
                    shared.hub.node_gone(&node);
                }
            }
            msg = heartbeats.next() => {
                let Some(msg) = msg else { return };
                match serde_json::from_slice::<Heartbeat>(&msg.payload) {
                    Ok(beat) if beat.node == shared.node => {}
                    Ok(beat) => heard(&shared, beat),
                    Err(error) => tracing::warn!(%error, "undecodable heartbeat on the cluster bus"),
                }
            }
        }
    }
}

/// Queues the member lists of this tick's share of the rooms (those whose
/// name hashes to `share` of `shares`), so that a lost presence event is
/// repaired within `node_timeout_ms` (the first part of a list replaces).
fn refresh_share(shared: &Shared, share: u128, shares: u128) {
    use std::hash::BuildHasher;
    let hasher = rustc_hash::FxBuildHasher;
    let rooms: Vec<String> = lock(&shared.subscribed)
        .keys()
        .filter(|room| u128::from(hasher.hash_one(room)) % shares == share)
        .cloned()
        .collect();
    if rooms.is_empty() {
        return;
    }
    shared.queue.with(|o| {
        for room in rooms {
            o.announce.entry(room).or_insert(false);
        }
    });
}

/// Records a heartbeat. A node heard again after it was found gone, or
/// restarted under its id, has its members asked for again in every room.
fn heard(shared: &Shared, beat: Heartbeat) {
    let (returned, restarted) = {
        let mut nodes = lock(&shared.nodes);
        let node = nodes.entry(beat.node.clone()).or_insert(Node {
            started_ms: beat.started_ms,
            last_seen: Instant::now(),
            last_seen_ms: 0,
            alive: true,
            connections: 0,
        });
        let returned = !node.alive;
        let restarted = node.started_ms != 0 && node.started_ms != beat.started_ms;
        node.started_ms = beat.started_ms;
        node.last_seen = Instant::now();
        node.last_seen_ms = now_ms();
        node.alive = true;
        node.connections = beat.connections;
        (returned, restarted)
    };
    if restarted && !returned {
        shared.hub.node_gone(&beat.node);
    }
    if returned || restarted {
        tracing::info!(
            node = beat.node,
            "cluster node heard again: asking for its members"
        );
        let rooms: Vec<String> = lock(&shared.subscribed).keys().cloned().collect();
        shared.queue.with(|o| {
            for room in rooms {
                o.announce.insert(room, true);
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parts_stay_under_the_budget_and_keep_every_item() {
        let items: Vec<usize> = vec![3, 3, 3, 10, 1, 1];
        let parts = split(&items, 6, |n| *n);
        assert_eq!(parts, vec![&[3, 3][..], &[3][..], &[10][..], &[1, 1][..]]);
        assert!(split(&[] as &[usize], 6, |n| *n).is_empty());
    }
}
