//! One client session: its rooms, its requests and the task that runs them.
//!
//! This module owns the [`Session`] state and splits its work by job:
//! - [`engine`]: the main loop and every write to the socket, the write
//!   deadline, heartbeats, and the close with its linger. The only part
//!   that knows the transport, and it knows it only as a byte stream
//!   (`AsyncRead + AsyncWrite`);
//! - the request handlers, one module a request family: [`request`]
//!   (decoding and dispatch), [`join`] (join, leave, presence), [`send`],
//!   [`history`], [`typing`], [`refresh`]; they share [`admission`], the
//!   one chain of room-name, grant and rate checks;
//! - [`token`], the token-expiry timer, and [`pending`], the queue of
//!   in-flight sends.
//!
//! A session must not reach another session: everything reaches it through
//! its own bounded outbox, and the hub is the only way out to a room.
//!
//! Invariants:
//! - A session never blocks another: every write it makes has a deadline.
//! - Per room, a session writes messages in strictly increasing seq order
//!   with no duplicate: it keeps the highest seq written (`floor`) and drops
//!   any queued message at or below it. On join the floor is the room's
//!   high-water mark, read *after* the session was registered with the hub,
//!   so every later message reaches the outbox and every earlier one is in
//!   history.
//! - Nothing from the peer is trusted: decode errors become `error` frames
//!   and socket errors a typed [`CloseReason`]; nothing panics.
//! - An idle session's future holds only what every request needs. A path
//!   that runs rarely (welcome, join, history, presence, refresh, waiting
//!   for acks, an error reply, the close) is a boxed future, on the heap only
//!   while it runs; inline, its state would add to every session's size.
//!   Each box is made in a statement of its own: a temporary in the awaiting
//!   statement keeps its storage in the caller's state. The code marks such
//!   a box "cold path"; this is the one place that says why.

mod admission;
mod engine;
mod history;
mod join;
mod pending;
mod refresh;
mod request;
mod send;
mod token;
mod typing;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

pub use crate::close::CloseReason;
pub use crate::delivery::{
    Delivery, Encoded, Outbox, OutboxReceiver, Outgoing, QueueBounds, WireFrame, bounded_outbox,
    outbox,
};

use crate::auth::Principal;
use crate::hub::{SessionId, SessionStats};
use crate::limits::{SessionLimits, Slots};
use crate::state::ServerState;
use pending::PendingAck;

/// The byte stream a session runs over: any that reads and writes.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// Who the session is, as established by the handshake.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user and their grants; `refresh` replaces it (same user).
    pub principal: Principal,
    pub remote: SocketAddr,
}

/// Ends the session's main loop.
type Flow = Result<(), CloseReason>;

/// A live session.
pub struct Session<S> {
    ws: WebSocketStream<S>,
    id: SessionId,
    identity: Identity,
    state: Arc<ServerState>,
    shutdown: CancellationToken,
    kill: CancellationToken,
    outbox: Outbox,
    inbox: OutboxReceiver,
    /// Joined rooms and the highest seq written to the client for each.
    /// Looked up once per delivery, so it uses FxHash rather than SipHash;
    /// a session holds at most `max_rooms_per_session` keys, which bounds
    /// what colliding room names could cost.
    rooms: FxHashMap<Arc<str>, u64>,
    /// In-flight sends, oldest first (see [`pending`]).
    pending: VecDeque<PendingAck>,
    /// When the last frame came from the client. A Tokio instant, so that
    /// the heartbeat runs on the runtime's clock (virtual under test).
    last_seen: Instant,
    /// Where the heartbeat is between two pings.
    ping: Ping,
    stats: Arc<SessionStats>,
    limits: SessionLimits,
    /// Whether `token_expiring` went out for the current token.
    expiry_warned: bool,
    /// Set when the token or its warning state changed: the timer must move.
    token_changed: bool,
    /// Said in the close frame after the reason's name, when set.
    close_detail: Option<String>,
    /// Whether replies wait in the codec's buffer for the next flush.
    unflushed: bool,
    /// Room traffic on its way into the socket, written around tungstenite
    /// (see [`crate::delivery::wire`]); kept between batches so that it
    /// allocates once.
    unsent: crate::delivery::wire::Unsent,
    /// Called once `welcome` is queued, before it is flushed: the gateway's
    /// transport releases the HTTP 101 it held, to leave with it.
    welcomed: fn(&mut S),
    /// Held for the session's life: dropping the session frees its slots.
    _slots: Slots,
}

/// The heartbeat's state: at each ping's time a ping becomes owed, and
/// waits a little for room traffic to ride with (see `engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ping {
    /// Waiting for the next ping's time.
    Idle,
    /// The ping is due, not yet sent.
    Owed,
    /// The ping went out with room traffic during its wait.
    Rode,
}

impl<S: Transport> Session<S> {
    /// A session over `ws`, an upgraded WebSocket on any byte stream.
    /// `welcomed` runs once the welcome is queued (the gateway releases the
    /// held 101 there; pass `|_| {}` for a stream that holds nothing).
    pub fn new(
        ws: WebSocketStream<S>,
        id: SessionId,
        identity: Identity,
        slots: Slots,
        state: Arc<ServerState>,
        shutdown: CancellationToken,
        welcomed: fn(&mut S),
    ) -> Self {
        let kill = CancellationToken::new();
        let config = &state.config;
        let limits = SessionLimits::new(config);
        let bounds = QueueBounds {
            frames: config.outbound_queue_frames,
            events: config.outbound_event_frames,
            soft_bytes: config.outbound_queue_bytes,
            max_bytes: config.outbound_queue_max_bytes,
            grace: std::time::Duration::from_millis(config.slow_consumer_grace_ms),
        };
        let (outbox, inbox) = bounded_outbox(bounds, kill.clone(), state.metrics.clone());
        Session {
            ws,
            id,
            identity,
            state,
            shutdown,
            kill,
            outbox,
            inbox,
            rooms: FxHashMap::default(),
            pending: VecDeque::new(),
            last_seen: Instant::now(),
            ping: Ping::Idle,
            stats: Arc::new(SessionStats::default()),
            limits,
            expiry_warned: false,
            token_changed: false,
            close_detail: None,
            unflushed: false,
            unsent: crate::delivery::wire::Unsent::default(),
            welcomed,
            _slots: slots,
        }
    }

    /// Names the session in a warning: its span is off below debug level.
    fn log_id(&self) -> String {
        format!("{:016x} ({})", self.id, self.identity.principal.user)
    }

    /// A handle that can close this session from elsewhere (kicks).
    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }
}
