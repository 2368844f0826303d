//! One client session: its socket, its rooms and its request handling.
//!
//! A session is one task that owns its WebSocket and selects over: frames
//! from the client, frames the hub queued in its [`Outbox`], acks of its
//! sends as commits finish, the heartbeat timer, and its kill and shutdown
//! tokens. Replies to requests are written directly; room traffic arrives
//! only through the outbox.
//!
//! Invariants:
//! - A session never blocks another: everything reaches it through its own
//!   bounded outbox, and every write it makes has a deadline.
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
//!   statement keeps its storage in the caller's state.

use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::Either;
use futures_util::{SinkExt, StreamExt};
use protocol::{Body, ClientRequest, ErrorCode, HistoryMessage, RequestId, ServerFrame};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use crate::close::CloseReason;
pub use crate::delivery::{
    Delivery, Encoded, Outbox, OutboxReceiver, Outgoing, QueueBounds, WireFrame, bounded_outbox,
    outbox,
};

use crate::auth::{Access, AuthError, Principal};
use crate::history::Store as _;
use crate::hub::{Member, SessionEntry, SessionId, SessionStats};
use crate::limits::{Action, SessionLimits, Slots};
use crate::state::ServerState;
use crate::store::{Append, AppendError, Appended, StoredMessage};

/// Who the session is, as established by the handshake.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user and their grants; `refresh` replaces it (same user).
    pub principal: Principal,
    pub remote: SocketAddr,
}

/// An in-flight `send`, resolved when its commit finishes.
struct PendingAck {
    id: Option<RequestId>,
    room: Arc<str>,
    rx: oneshot::Receiver<Result<Appended, AppendError>>,
    /// When the `send` was read off the socket: the start of the ack latency.
    received: Instant,
}

impl Future for PendingAck {
    type Output = (
        Option<RequestId>,
        Arc<str>,
        Option<Result<Appended, AppendError>>,
        Instant,
    );

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| (self.id, self.room.clone(), r.ok(), self.received))
    }
}

/// Waits for the oldest in-flight send to resolve and takes it.
fn oldest_ack(
    pending: &mut VecDeque<PendingAck>,
) -> impl Future<Output = <PendingAck as Future>::Output> + '_ {
    std::future::poll_fn(move |cx| match pending.front_mut() {
        Some(ack) => Pin::new(ack).poll(cx).map(|done| {
            pending.pop_front();
            done
        }),
        None => Poll::Pending,
    })
}

/// Fires when the token timer, if any, does.
fn token_alarm(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match timer {
        Some(t) => t.as_mut().poll(cx),
        None => Poll::Pending,
    })
}

/// Bytes read at a time when discarding input after a close.
const DRAIN_CHUNK: usize = 1024;

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
    /// In-flight sends, oldest first. The store commits a session's
    /// appends in the order they were queued, so acks complete in this
    /// order and only the oldest needs polling. (A `VecDeque` allocates
    /// nothing until the first send; `FuturesUnordered` did, per session.)
    pending: VecDeque<PendingAck>,
    last_seen: Instant,
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
    /// (see [`wire`]); kept between batches so that it allocates once.
    unsent: crate::delivery::wire::Unsent,
    /// Held for the session's life: dropping the session frees its slots.
    _slots: Slots,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + crate::net::Tcp,
{
    pub fn new(
        ws: WebSocketStream<S>,
        id: SessionId,
        identity: Identity,
        slots: Slots,
        state: Arc<ServerState>,
        shutdown: CancellationToken,
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
            stats: Arc::new(SessionStats::default()),
            limits,
            expiry_warned: false,
            token_changed: false,
            close_detail: None,
            unflushed: false,
            unsent: crate::delivery::wire::Unsent::default(),
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

    /// Runs the session to its end and returns why it ended, first joining
    /// `joins` (the rooms of the upgrade's `?join=`) as if the client had
    /// sent a `join` for each.
    ///
    /// Not an `async fn`: such a function keeps a second copy of its
    /// by-value arguments in its state, and the session is the largest part
    /// of what every idle connection holds. The block below captures it once.
    #[allow(clippy::manual_async_fn)]
    pub fn run(mut self, joins: Vec<String>) -> impl Future<Output = CloseReason> {
        async move { self.run_to_end(joins).await }
    }

    async fn run_to_end(&mut self, joins: Vec<String>) -> CloseReason {
        let connected_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.state.hub.register_session(
            self.id,
            SessionEntry {
                user: self.identity.principal.user.clone(),
                remote: self.identity.remote,
                connected_at_ms,
                outbox: self.outbox.clone(),
                stats: self.stats.clone(),
            },
        );
        // The welcome lives in its own future, dropped before the main loop
        // starts (a cold path: see the module doc).
        let reason = match self.send_welcome(joins).await {
            Ok(()) => self.main_loop().await,
            Err(reason) => reason,
        };
        // Boxed: a cold path (see the module doc).
        let finishing = Box::pin(self.finish(reason));
        finishing.await;
        reason
    }

    /// Sends `welcome`, then joins the upgrade's rooms; their replies leave
    /// with it, in one write.
    async fn send_welcome(&mut self, joins: Vec<String>) -> Flow {
        let welcome = ServerFrame::Welcome {
            session: format!("{:016x}", self.id),
            user: self.identity.principal.user.to_string(),
            heartbeat_ms: self.state.config.heartbeat_interval_ms,
            server: concat!("switchboard/", env!("CARGO_PKG_VERSION")).to_owned(),
            protocol: protocol::PROTOCOL_VERSION,
        };
        let sending = Box::pin(async {
            self.send(&welcome).await?;
            for room in joins {
                self.on_join(None, room, None, None).await?;
            }
            self.flush().await
        });
        let flow = sending.await;
        // The gateway corked the socket for the upgrade: the 101 and the
        // welcome leave together, in one segment.
        crate::net::cork(self.ws.get_ref(), false);
        flow
    }

    async fn main_loop(&mut self) -> CloseReason {
        let interval = self.state.config.heartbeat_interval();
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_inflight = self.state.config.max_inflight_sends;
        // One timer for the token's warning and expiry, reset only when they
        // change, so that the loop registers no timer per iteration. On the
        // heap, and only while the token expires: most of the time a session
        // has none, and then its state holds only the empty option.
        let mut token_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        self.token_changed = true;
        // Registered once for the whole loop: a fresh wait per iteration
        // would take the token's lock twice per delivery, and the shutdown
        // token is shared by every session.
        let (kill, shutdown) = (self.kill.clone(), self.shutdown.clone());
        let killed = kill.cancelled();
        let stopping = shutdown.cancelled();
        tokio::pin!(killed, stopping);
        loop {
            if std::mem::take(&mut self.token_changed) {
                match (self.token_deadline(), token_timer.as_mut()) {
                    (Some(at), Some(timer)) => timer.as_mut().reset(at),
                    (Some(at), None) => token_timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    (None, _) => token_timer = None,
                }
            }
            let (read, flush) = (self.pending.len() < max_inflight, self.unflushed);
            let flow = tokio::select! {
                biased;
                () = &mut killed => {
                    Err(self.inbox.close_reason().unwrap_or(CloseReason::SlowConsumer))
                }
                () = &mut stopping => Err(CloseReason::ServerShutdown),
                done = oldest_ack(&mut self.pending), if !self.pending.is_empty() => {
                    self.on_ack(done).await
                }
                item = self.inbox.recv() => self.write_outgoing(item).await,
                event = SocketEvent { ws: &mut self.ws, read, flush }, if read || flush => match event {
                    SocketEventOutput::Frame(frame) => {
                        self.last_seen = Instant::now();
                        self.on_frame(frame).await
                    }
                    SocketEventOutput::Flushed(r) => {
                        self.unflushed = false;
                        r.map_err(|e| socket_error(&e))
                    }
                },
                _ = heartbeat.tick() => self.on_heartbeat(interval).await,
                () = token_alarm(&mut token_timer), if token_timer.is_some() => {
                    self.token_changed = true;
                    self.on_token_deadline().await
                }
            };
            if let Err(reason) = flow {
                return reason;
            }
        }
    }

    /// Closes the socket with the reason's code and leaves every room.
    async fn finish(&mut self, reason: CloseReason) {
        let state = self.state.clone();
        if reason.code().is_some() && !self.pending.is_empty() {
            self.write_last_acks(reason).await;
        }
        for room in std::mem::take(&mut self.rooms).into_keys() {
            state.hub.leave(&room, self.id);
        }
        state.hub.unregister_session(self.id);
        if let Some(code) = reason.code() {
            let text = match self.close_detail.take() {
                Some(detail) => crate::close::close_reason_text(code.name, &detail),
                None => code.name.to_owned(),
            };
            let frame = CloseFrame {
                code: CloseCode::from(code.code),
                reason: Utf8Bytes::from(text),
            };
            let Session { ws, unsent, .. } = self;
            let close = async move {
                write_raw(ws, unsent).await.map_err(WsError::Io)?;
                ws.close(Some(frame)).await
            };
            match tokio::time::timeout(state.config.write_timeout(), close).await {
                Ok(Ok(())) => {
                    // Wait briefly for the client's close reply, reading off
                    // what it still sends, so the socket ends with FIN rather
                    // than a reset that could destroy the close frame.
                    let linger = async {
                        loop {
                            match self.ws.next().await {
                                Some(Ok(msg)) if msg.is_close() => return,
                                Some(Ok(_)) => {}
                                // The codec stopped (after an oversized or
                                // invalid frame, it reads no further):
                                // discard the rest raw, so that closing the
                                // socket does not reset the connection and
                                // destroy the close frame in flight.
                                Some(Err(_)) | None => break,
                            }
                        }
                        let mut buf = vec![0u8; DRAIN_CHUNK];
                        let raw = self.ws.get_mut();
                        while matches!(raw.read(&mut buf).await, Ok(n) if n > 0) {}
                    };
                    let _ = tokio::time::timeout(state.config.close_linger(), linger).await;
                }
                Ok(Err(e)) => debug!(error = %e, "close frame not written"),
                Err(_) => debug!("close frame not written in time"),
            }
        } else {
            let _ = tokio::time::timeout(state.config.write_timeout(), self.ws.flush()).await;
        }
        state.metrics.session_closed(reason);
        state.metrics.connections_open.dec();
        debug!(reason = reason.as_str(), "session closed");
    }

    /// Writes the acks (or errors) of the sends accepted before the session
    /// ended, whatever ended it, so that every stored send is acked before
    /// the close frame: commits already queued finish first. Bounded by
    /// `shutdown_grace_ms` at shutdown and by `close_linger_ms` otherwise.
    async fn write_last_acks(&mut self, reason: CloseReason) {
        let config = &self.state.config;
        let bound = if reason == CloseReason::ServerShutdown {
            config.shutdown_grace()
        } else {
            config.close_linger()
        };
        // The kill that ended the session would refuse every write: these
        // few are still owed, each under the write deadline.
        self.kill = CancellationToken::new();
        let drain = async {
            // A frame cut off mid-write leaves the socket mid-frame: nothing
            // may be written through tungstenite until its rest is.
            if self.unsent.mid_frame() {
                let Session { ws, unsent, .. } = &mut *self;
                write_raw(ws, unsent).await?;
            }
            while !self.pending.is_empty() {
                let done = oldest_ack(&mut self.pending).await;
                if self.on_ack(done).await.is_err() {
                    break;
                }
            }
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(bound, drain).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "the rest of a frame was not written"),
            Err(_) => debug!(left = self.pending.len(), "acks not written in time"),
        }
    }

    /// Writes the acks of every send still in flight, oldest first, so that
    /// no reply to a later request overtakes them and a read after a send
    /// sees it (PROTOCOL.md, "Order").
    async fn settle(&mut self) -> Flow {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Boxed: a cold path (see the module doc).
        let settling = Box::pin(async {
            while !self.pending.is_empty() {
                let done = oldest_ack(&mut self.pending).await;
                self.on_ack(done).await?;
            }
            Ok(())
        });
        settling.await
    }

    // The write helpers below are plain functions returning a `Deadline`,
    // not `async fn`s: every request path awaits one of them, and an
    // `async fn` would add a second copy of its arguments and its own state
    // to every idle session's size.

    /// Writes one frame into the codec's buffer, within the write deadline.
    fn send(&mut self, frame: &ServerFrame) -> Deadline<'_, WsWrite<'_, S>> {
        self.send_text(frame.to_json())
    }

    /// Writes one encoded frame into the codec's buffer, within the write
    /// deadline. The main loop flushes once it has nothing else ready, so
    /// replies to requests read together leave in one segment.
    fn send_text(&mut self, text: String) -> Deadline<'_, WsWrite<'_, S>> {
        self.state.metrics.bytes_out.add(text.len() as u64);
        self.write(Message::Text(Utf8Bytes::from(text)), false)
    }

    /// Feeds (and with `flush`, sends) one frame. The write has a deadline
    /// and gives way to a kill, so a peer that stops reading can hold up
    /// only its own session, and only until then.
    fn write(&mut self, msg: Message, flush: bool) -> Deadline<'_, WsWrite<'_, S>> {
        let deadline = self.state.config.write_timeout();
        self.unflushed = !flush;
        let Session {
            ws,
            kill,
            inbox,
            outbox,
            ..
        } = self;
        let io = if flush {
            Either::Left(ws.send(msg))
        } else {
            Either::Right(ws.feed(msg))
        };
        Deadline::new(deadline, kill, inbox, outbox, io)
    }

    fn flush(
        &mut self,
    ) -> Deadline<'_, futures_util::sink::Flush<'_, WebSocketStream<S>, Message>> {
        let deadline = self.state.config.write_timeout();
        self.unflushed = false;
        let Session {
            ws,
            kill,
            inbox,
            outbox,
            ..
        } = self;
        Deadline::new(deadline, kill, inbox, outbox, ws.flush())
    }

    /// Answers with an `error` frame. The write is boxed: a cold path (see
    /// the module doc).
    async fn send_error(
        &mut self,
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
    ) -> Flow {
        self.send_error_frame(ServerFrame::Error {
            id,
            code,
            message,
            retry_after_ms: None,
        })
        .await
    }

    /// Sends an `error` frame, counted, from a heap-allocated future.
    async fn send_error_frame(&mut self, frame: ServerFrame) -> Flow {
        self.state.metrics.error_frames.inc();
        let sending = Box::pin(async move { self.send(&frame).await });
        sending.await
    }

    /// Writes queued frames, coalescing up to `write_batch_frames` into one
    /// write. The whole batch shares one write deadline and one
    /// clock reading: this runs once per delivery, so it registers no timer
    /// and reads no clock per frame, and it takes no reference per frame:
    /// it queues whole deliveries, whose shared frames are copied end to
    /// end into the worker thread's scratch buffer for the write.
    async fn write_outgoing(&mut self, first: Outgoing) -> Flow {
        let batch_max = self.state.config.write_batch_frames;
        let now = Instant::now();
        let before = self.unsent.frames();
        let mut delivered = 0u64;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Outgoing::Ephemeral(frame) => self.unsent.push_event(frame),
                Outgoing::Message(d) => {
                    // None when the room was left meanwhile; messages at or
                    // below the floor were already replayed. Seqs within a
                    // delivery increase, so the new ones are a suffix.
                    if let Some(floor) = self.rooms.get_mut(&d.room) {
                        let from = d.messages.partition_point(|m| m.seq <= *floor);
                        if let Some(last) = d.messages.get(from..).and_then(<[_]>::last) {
                            *floor = last.seq;
                            delivered += (d.messages.len() - from) as u64;
                            // Committed to the write into this socket.
                            self.state
                                .metrics
                                .fanout_latency
                                .observe_duration(now.saturating_duration_since(d.created));
                            self.unsent.push_messages(d, from);
                        }
                    }
                }
            }
            if self.unsent.frames() - before < batch_max {
                next = self.inbox.try_recv();
            }
        }
        let flow = self.write_unsent().await;
        if flow.is_ok() {
            self.state.metrics.messages_delivered.add(delivered);
            self.stats
                .messages_out
                .fetch_add(delivered, Ordering::Relaxed);
        } else {
            self.unsent.keep_partial();
        }
        flow
    }

    /// Writes every unsent frame and flushes; the write deadline bounds each
    /// stretch without progress. Frames go straight to the stream under
    /// tungstenite, so whatever tungstenite still buffers (a pong, say) is
    /// flushed first: the two never interleave.
    async fn write_unsent(&mut self) -> Flow {
        if self.unsent.frames() == 0 {
            return Ok(());
        }
        self.state.metrics.bytes_out.add(self.unsent.bytes() as u64);
        let deadline = self.state.config.write_timeout();
        self.unflushed = false;
        let Session {
            ws,
            kill,
            inbox,
            outbox,
            unsent,
            ..
        } = self;
        let inbox = &*inbox;
        let mut first = true;
        // The deadline is on progress, not on the whole batch: a round
        // writes until the socket takes no more, and a round that moved
        // bytes ends, so the next starts a fresh deadline. A reader that
        // keeps up is never cut off by a batch that is long in all.
        loop {
            let mut done = false;
            let io = async {
                if std::mem::take(&mut first) {
                    ws.flush().await?;
                }
                let stream = ws.get_mut();
                let all = std::future::poll_fn(|cx| {
                    let before = unsent.bytes();
                    let polled = unsent.poll_write(cx, Pin::new(&mut *stream));
                    let moved = unsent.bytes() < before;
                    if moved {
                        // Progress: it keeps a session past its queue's
                        // soft bound from being a slow consumer.
                        inbox.progressed();
                    }
                    match polled {
                        Poll::Ready(r) => Poll::Ready(r.map(|()| true)),
                        Poll::Pending if moved => Poll::Ready(Ok(false)),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await
                .map_err(WsError::Io)?;
                if all {
                    stream.flush().await.map_err(WsError::Io)?;
                    done = true;
                }
                Ok(())
            };
            Deadline::new(deadline, kill, inbox, outbox, io).await?;
            if done {
                return Ok(());
            }
        }
    }

    async fn on_heartbeat(&mut self, interval: std::time::Duration) -> Flow {
        if self.last_seen.elapsed() >= interval * 2 {
            return Err(CloseReason::HeartbeatTimeout);
        }
        self.write(Message::Ping(Default::default()), true).await
    }

    async fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Flow {
        let msg = match frame {
            None => return Err(CloseReason::ClientClosed),
            Some(Err(e)) => return Err(socket_error(&e)),
            Some(Ok(msg)) => msg,
        };
        match msg {
            Message::Text(text) => {
                self.state.metrics.bytes_in.add(text.len() as u64);
                self.on_request(text.as_str()).await
            }
            Message::Binary(data) => {
                self.state.metrics.bytes_in.add(data.len() as u64);
                self.send_error(
                    None,
                    ErrorCode::BinaryUnsupported,
                    "binary frames are not part of the protocol; send JSON text frames".into(),
                )
                .await
            }
            // tungstenite queues the pong (or the close reply); flushing sends it.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => self.flush().await,
            Message::Close(_) => {
                let _ = self.flush().await;
                Err(CloseReason::ClientClosed)
            }
        }
    }

    async fn on_request(&mut self, text: &str) -> Flow {
        let request = match protocol::decode_request(text, self.state.config.max_body_depth) {
            Ok(r) => r,
            Err(e) => {
                self.settle().await?;
                return self.send_error(e.id, e.code, e.message).await;
            }
        };
        // Replies leave in request order: every request but a `send` (whose
        // ack follows its commit, in order with the others) waits until the
        // acks of the sends before it are written, so a read after a send
        // sees it. A `typing` has no reply; its refusals settle first.
        if !matches!(
            request.body,
            ClientRequest::Send { .. } | ClientRequest::Typing { .. }
        ) {
            self.settle().await?;
        }
        let id = request.id;
        match request.body {
            // Joins, history and presence reads and refreshes are boxed:
            // cold paths (see the module doc).
            ClientRequest::Join { room, since, epoch } => {
                let joining = Box::pin(self.on_join(id, room, since, epoch));
                joining.await
            }
            ClientRequest::Leave { room } => {
                if self.rooms.remove(room.as_str()).is_some() {
                    self.state.hub.leave(&room, self.id);
                    self.send(&ServerFrame::Left { id, room }).await
                } else {
                    self.not_joined(id, &room).await
                }
            }
            // Boxed too, though not rare: a send's state (the store queue's
            // permit, the append) is the largest of the request paths, and
            // one small allocation per message read is cheaper than holding
            // it in every idle session.
            ClientRequest::Send { room, body, key } => {
                let sending = Box::pin(self.on_send(id, room, body.0, key));
                sending.await
            }
            ClientRequest::History {
                room,
                before,
                after,
                limit,
            } => {
                let reading = Box::pin(self.on_history(id, room, before, after, limit));
                reading.await
            }
            ClientRequest::Typing { room } => {
                if !self.identity.principal.may(&room, Access::Write) {
                    self.forbidden(id, &room).await
                } else if self.rooms.contains_key(room.as_str()) {
                    self.state.hub.typing(&room, &self.identity.principal.user);
                    Ok(())
                } else {
                    self.not_joined(id, &room).await
                }
            }
            ClientRequest::Presence { room, after, limit } => {
                let paging = Box::pin(self.on_presence(id, room, after, limit));
                paging.await
            }
            ClientRequest::Ping => self.send(&ServerFrame::Pong { id }).await,
            ClientRequest::Auth { .. } => {
                self.send_error(
                    id,
                    ErrorCode::BadRequest,
                    "the session is already authenticated; use `refresh` to replace its token"
                        .into(),
                )
                .await
            }
            ClientRequest::Refresh { token } => {
                let refreshing = Box::pin(self.on_refresh(id, token.expose()));
                refreshing.await
            }
        }
    }

    /// Refuses a request outside the session's grants. The answer is the
    /// same whether or not the room exists or has members, so it leaks nothing.
    async fn forbidden(&mut self, id: Option<RequestId>, room: &str) -> Flow {
        self.settle().await?;
        self.send_error(id, ErrorCode::Forbidden, format!("no access to `{room}`"))
            .await
    }

    /// Takes a rate-limit token for `action`. On refusal answers
    /// `rate_limited` with the wait and returns false; persistent refusals
    /// end the session with 4101.
    async fn admit(&mut self, id: Option<RequestId>, action: Action) -> Result<bool, CloseReason> {
        let state = self.state.clone();
        let wait = match self
            .limits
            .take(action, &self.identity.principal.user, &state.limits)
        {
            Ok(()) => return Ok(true),
            Err(wait) => wait,
        };
        state.metrics.rate_limited.inc();
        self.settle().await?;
        let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        if self.limits.strikes.strike(Instant::now()) {
            let window = state.config.rate_limit_window_ms;
            self.close_detail = Some(format!("retry_after_ms={window}"));
            return Err(CloseReason::RateLimited);
        }
        self.send_error_frame(ServerFrame::Error {
            id,
            code: ErrorCode::RateLimited,
            message: "too many requests; retry later".into(),
            retry_after_ms: Some(retry_after_ms),
        })
        .await?;
        Ok(false)
    }

    /// When the token next needs attention: the warning, then the expiry
    /// (plus the verifier's leeway). `None` for a session without a token.
    fn token_deadline(&self) -> Option<tokio::time::Instant> {
        let expires_at = self.identity.principal.expires_at?;
        let leeway = self.state.verifier.as_ref().map_or(0, |v| v.leeway_secs());
        let at = if self.expiry_warned {
            expires_at.saturating_add(leeway)
        } else {
            expires_at.saturating_sub(self.state.config.token_expiry_warning_secs)
        };
        let from_now = at.saturating_sub(crate::auth::now_unix());
        Some(tokio::time::Instant::now() + std::time::Duration::from_secs(from_now))
    }

    async fn on_token_deadline(&mut self) -> Flow {
        let Some(expires_at) = self.identity.principal.expires_at else {
            return Ok(());
        };
        if !self.expiry_warned {
            self.expiry_warned = true;
            return self.send(&ServerFrame::TokenExpiring { expires_at }).await;
        }
        self.state.metrics.auth_failed(AuthError::Expired.label());
        self.close_detail = Some(AuthError::Expired.to_string());
        Err(CloseReason::Unauthorized)
    }

    /// Replaces the session's token. The new one must name the same user.
    /// Rooms the new grants no longer let it read are left.
    async fn on_refresh(&mut self, id: Option<RequestId>, token: &str) -> Flow {
        let state = self.state.clone();
        let Some(verifier) = &state.verifier else {
            return self
                .send_error(
                    id,
                    ErrorCode::BadRequest,
                    "this server runs without tokens (dev mode)".into(),
                )
                .await;
        };
        let principal = verifier.verify(token).and_then(|p| {
            if p.user == self.identity.principal.user {
                Ok(p)
            } else {
                Err(AuthError::OtherUser)
            }
        });
        let principal = match principal {
            Ok(p) => p,
            Err(e) => {
                state.metrics.auth_failed(e.label());
                return self
                    .send_error(id, ErrorCode::Unauthorized, e.to_string())
                    .await;
            }
        };
        let expires_at = principal.expires_at.unwrap_or(0);
        self.identity.principal = principal;
        self.expiry_warned = false;
        self.token_changed = true;
        let lost: Vec<Arc<str>> = self
            .rooms
            .keys()
            .filter(|r| !self.identity.principal.may(r, Access::Read))
            .cloned()
            .collect();
        for room in lost {
            self.rooms.remove(&room);
            state.hub.leave(&room, self.id);
            self.send(&ServerFrame::Left {
                id: None,
                room: room.to_string(),
            })
            .await?;
        }
        self.send(&ServerFrame::Refreshed { id, expires_at }).await
    }

    async fn not_joined(&mut self, id: Option<RequestId>, room: &str) -> Flow {
        self.settle().await?;
        self.send_error(id, ErrorCode::NotJoined, format!("not joined to `{room}`"))
            .await
    }

    /// Checks a room name; on failure answers `invalid_room` and returns false.
    async fn valid_room(&mut self, id: Option<RequestId>, room: &str) -> Result<bool, CloseReason> {
        match protocol::names::validate_room(room) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.settle().await?;
                self.send_error(
                    id,
                    ErrorCode::InvalidRoom,
                    format!("invalid room name: {e}"),
                )
                .await?;
                Ok(false)
            }
        }
    }

    async fn on_join(
        &mut self,
        id: Option<RequestId>,
        room: String,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Flow {
        if !self.valid_room(id, &room).await? {
            return Ok(());
        }
        if since.is_some() && epoch.is_none() {
            // Seqs mean nothing outside their epoch: replaying from one
            // without it could hand over another history's messages.
            return self
                .send_error(
                    id,
                    ErrorCode::BadRequest,
                    "`since` needs the `epoch` it was seen with".into(),
                )
                .await;
        }
        if !self.identity.principal.may(&room, Access::Read) {
            return self.forbidden(id, &room).await;
        }
        if !self.admit(id, Action::Join).await? {
            return Ok(());
        }
        let state = self.state.clone();
        let already = self.rooms.contains_key(room.as_str());
        if !already && self.rooms.len() >= state.config.max_rooms_per_session {
            let max = state.config.max_rooms_per_session;
            return self
                .send_error(
                    id,
                    ErrorCode::Forbidden,
                    format!("a session may join at most {max} rooms"),
                )
                .await;
        }
        // Register first, then read the high-water mark: every message
        // committed after the read reaches the outbox, every one before is
        // in history.
        let outcome = state.hub.join(
            &room,
            Member {
                session: self.id,
                user: self.identity.principal.user.clone(),
                outbox: self.outbox.clone(),
            },
        );
        // The hub knows the latest seq of a room with members once it has
        // seen a commit or a read for it; otherwise the store is read.
        let read = match outcome.latest {
            Some(seq) => Ok(seq),
            None => state.store.latest_seq(&room).await.inspect(|&seq| {
                state.hub.note_latest(&room, seq);
            }),
        };
        let latest = match read {
            Ok(seq) => seq,
            Err(e) => {
                warn!(session = %self.log_id(), error = %e, "latest seq read failed");
                if !already {
                    state.hub.leave(&room, self.id);
                }
                return self
                    .send_error(id, ErrorCode::Internal, "history is unavailable".into())
                    .await;
            }
        };
        let store_epoch = state.store.epoch().to_owned();
        let (recovered, replay) = match since {
            Some(since) if !already => {
                self.recover(
                    &room,
                    since,
                    latest,
                    epoch.as_deref() == Some(store_epoch.as_str()),
                )
                .await
            }
            _ => (None, Vec::new()),
        };
        if !already {
            self.rooms.insert(outcome.room.clone(), latest);
        }
        let joined = protocol::JoinedRef::new(
            id,
            &room,
            latest,
            &store_epoch,
            outcome.count,
            &outcome.presence,
            recovered,
        )
        .to_json();
        self.send_text(joined).await?;
        for m in &replay {
            let text = replay_frame(&room, m);
            self.write(Message::Text(Utf8Bytes::from(text)), false)
                .await?;
        }
        if !replay.is_empty() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Answers a `presence` request with one page of the room's users.
    /// Like `history`, it needs read access and takes a `history` token.
    async fn on_presence(
        &mut self,
        id: Option<RequestId>,
        room: String,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Flow {
        if !self.identity.principal.may(&room, Access::Read) {
            return self.forbidden(id, &room).await;
        }
        if !self.rooms.contains_key(room.as_str()) {
            return self.not_joined(id, &room).await;
        }
        if !self.admit(id, Action::History).await? {
            return Ok(());
        }
        let max = self.state.config.presence_page_max;
        let limit = limit.unwrap_or(max).clamp(1, max) as usize;
        let page = self.state.hub.members(&room, after.as_deref(), limit);
        self.send(&ServerFrame::Members {
            id,
            room,
            count: page.count,
            users: page.users,
            more: page.more,
        })
        .await
    }

    /// Decides recovery for a join with `since`: all of (since, latest] or nothing.
    async fn recover(
        &mut self,
        room: &str,
        since: u64,
        latest: u64,
        epoch_matches: bool,
    ) -> (Option<bool>, Vec<StoredMessage>) {
        if !epoch_matches {
            return (Some(false), Vec::new());
        }
        if since >= latest {
            return (Some(true), Vec::new());
        }
        let gap = latest - since;
        if gap > self.state.config.replay_cap {
            return (Some(false), Vec::new());
        }
        let limit = usize::try_from(gap).unwrap_or(usize::MAX);
        match self.state.store.read_after(room, since, limit).await {
            Ok(messages)
                if messages.len() == limit
                    && messages
                        .iter()
                        .zip(since + 1..)
                        .all(|(m, seq)| m.seq == seq) =>
            {
                (Some(true), messages)
            }
            Ok(_) => (Some(false), Vec::new()),
            Err(e) => {
                warn!(session = %self.log_id(), error = %e, "replay read failed");
                (Some(false), Vec::new())
            }
        }
    }

    async fn on_send(
        &mut self,
        id: Option<RequestId>,
        room: String,
        body: Box<RawValue>,
        key: Option<String>,
    ) -> Flow {
        if !self.identity.principal.may(&room, Access::Write) {
            return self.forbidden(id, &room).await;
        }
        let room_key = match self.rooms.get_key_value(room.as_str()) {
            Some((key, _)) => key.clone(),
            // A write-only grant cannot join (joining reads), so it
            // publishes without joining (SECURITY.md, "Tokens").
            None if !self.identity.principal.may(&room, Access::Read) => {
                if !self.valid_room(id, &room).await? {
                    return Ok(());
                }
                Arc::from(room.as_str())
            }
            None => return self.not_joined(id, &room).await,
        };
        if !self.admit(id, Action::Send).await? {
            return Ok(());
        }
        let max_key = self.state.config.max_key_bytes;
        if key.as_ref().is_some_and(|k| k.len() > max_key) {
            self.settle().await?;
            return self
                .send_error(
                    id,
                    ErrorCode::TooLarge,
                    format!("`key` is longer than {max_key} bytes"),
                )
                .await;
        }
        let (reply, rx) = oneshot::channel();
        let append = Append {
            room: room_key.clone(),
            from: self.identity.principal.user.clone(),
            body,
            key,
            reply,
        };
        if self.state.store.append(append).await.is_err() {
            self.settle().await?;
            return self
                .send_error(id, ErrorCode::Internal, "the store is closed".into())
                .await;
        }
        self.state.metrics.messages_received.inc();
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        self.pending.push_back(PendingAck {
            id,
            room: room_key,
            rx,
            // The main loop stamps this when it reads a frame: this `send`.
            received: self.last_seen,
        });
        Ok(())
    }

    /// Writes the ack (or error) of one resolved send. A write refused by a
    /// kill takes nothing into the codec, so the send goes back to the
    /// front of `pending`, for `finish` to write before the close frame.
    async fn on_ack(&mut self, done: <PendingAck as Future>::Output) -> Flow {
        let (id, room, result, received) = done;
        let flow = match &result {
            Some(Ok(a)) => {
                let flow = self
                    .send(&ServerFrame::Ack {
                        id,
                        room: room.to_string(),
                        seq: a.seq,
                        ts: a.ts,
                        duplicate: a.duplicate,
                    })
                    .await;
                self.state
                    .metrics
                    .ack_latency
                    .observe_duration(received.elapsed());
                flow
            }
            Some(Err(AppendError::Unavailable { retry_after })) => {
                self.send_error_frame(ServerFrame::Error {
                    id,
                    code: ErrorCode::Unavailable,
                    message: "the message was not stored: the server cannot store messages now; resend with the same key".into(),
                    retry_after_ms: Some(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX).max(1)),
                })
                .await
            }
            Some(Err(e)) => {
                warn!(session = %self.log_id(), error = %e, "append failed");
                self.send_error(
                    id,
                    ErrorCode::Internal,
                    "the message was not stored; retry with the same key".into(),
                )
                .await
            }
            None => {
                self.send_error(
                    id,
                    ErrorCode::Internal,
                    "the store stopped; retry with the same key".into(),
                )
                .await
            }
        };
        if flow.is_err() {
            let (reply, rx) = oneshot::channel();
            if let Some(result) = result {
                let _ = reply.send(result);
            }
            self.pending.push_front(PendingAck {
                id,
                room,
                rx,
                received,
            });
        }
        flow
    }

    async fn on_history(
        &mut self,
        id: Option<RequestId>,
        room: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Flow {
        if !self.valid_room(id, &room).await? {
            return Ok(());
        }
        if !self.identity.principal.may(&room, Access::Read) {
            return self.forbidden(id, &room).await;
        }
        if !self.admit(id, Action::History).await? {
            return Ok(());
        }
        let config = &self.state.config;
        let limit = limit
            .unwrap_or(config.history_default_limit)
            .min(config.history_max_limit) as usize;
        let page = match self.state.store.history(&room, before, after, limit).await {
            Ok(page) => page,
            Err(e) => {
                warn!(session = %self.log_id(), error = %e, "history read failed");
                return self
                    .send_error(id, ErrorCode::Internal, "history is unavailable".into())
                    .await;
            }
        };
        let messages = page
            .messages
            .into_iter()
            .map(|m| {
                let body = m.body.as_deref().and_then(|b| Body::from_json(b).ok());
                HistoryMessage {
                    seq: m.seq,
                    from: m.from,
                    ts: m.ts,
                    erased: body.is_none(),
                    body,
                }
            })
            .collect();
        self.send(&ServerFrame::History {
            id,
            room,
            messages,
            more: page.more,
        })
        .await
    }
}

/// Encodes a replayed message. An erased message keeps its seq, with a
/// `null` body, so that the client's seq continuity holds.
fn replay_frame(room: &str, m: &StoredMessage) -> String {
    let null = RawValue::NULL;
    let body = m
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str::<&RawValue>(b).ok())
        .unwrap_or(null);
    let mut frame = protocol::MessageRef::new(room, m.seq, &m.from, m.ts, body);
    frame.replay = true;
    frame.to_json()
}

/// The socket's side of the main loop: the next frame from the client, or,
/// once none is ready, the flush of replies written meanwhile. Reads come
/// first, so replies to requests that arrived together are flushed together.
struct SocketEvent<'a, S> {
    ws: &'a mut WebSocketStream<S>,
    read: bool,
    flush: bool,
}

enum SocketEventOutput {
    Frame(Option<Result<Message, WsError>>),
    Flushed(Result<(), WsError>),
}

impl<S> Future for SocketEvent<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Output = SocketEventOutput;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.read {
            if let Poll::Ready(frame) = self.ws.poll_next_unpin(cx) {
                return Poll::Ready(SocketEventOutput::Frame(frame));
            }
        }
        if self.flush {
            if let Poll::Ready(r) = self.ws.poll_flush_unpin(cx) {
                return Poll::Ready(SocketEventOutput::Flushed(r));
            }
        }
        Poll::Pending
    }
}

/// Writes `unsent` into the stream under `ws` and flushes it (TLS buffers).
async fn write_raw<S>(
    ws: &mut WebSocketStream<S>,
    unsent: &mut crate::delivery::wire::Unsent,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stream = ws.get_mut();
    std::future::poll_fn(|cx| unsent.poll_write(cx, Pin::new(&mut *stream))).await?;
    stream.flush().await
}

/// A frame written into the codec: with a flush (`send`) or without (`feed`).
type WsWrite<'a, S> = Either<
    futures_util::sink::Send<'a, WebSocketStream<S>, Message>,
    futures_util::sink::Feed<'a, WebSocketStream<S>, Message>,
>;

pin_project_lite::pin_project! {
    /// Socket I/O with a deadline that gives way to a kill. A write that
    /// misses the deadline marks the session a slow consumer. A struct
    /// rather than an `async fn`, so that it holds `io` once.
    #[must_use = "futures do nothing unless awaited"]
    struct Deadline<'a, F> {
        #[pin]
        io: F,
        #[pin]
        timer: tokio::time::Sleep,
        #[pin]
        killed: tokio_util::sync::WaitForCancellationFuture<'a>,
        inbox: &'a OutboxReceiver,
        outbox: &'a Outbox,
    }
}

impl<'a, F> Deadline<'a, F> {
    fn new(
        deadline: std::time::Duration,
        kill: &'a CancellationToken,
        inbox: &'a OutboxReceiver,
        outbox: &'a Outbox,
        io: F,
    ) -> Self {
        Deadline {
            io,
            timer: tokio::time::sleep(deadline),
            killed: kill.cancelled(),
            inbox,
            outbox,
        }
    }
}

impl<F> Future for Deadline<'_, F>
where
    F: Future<Output = Result<(), WsError>>,
{
    type Output = Flow;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Flow> {
        let this = self.project();
        // I/O first: a write that completes at once (the common case)
        // touches neither the timer wheel nor the kill token's lock.
        if let Poll::Ready(r) = this.io.poll(cx) {
            return Poll::Ready(r.map_err(|e| socket_error(&e)));
        }
        if this.killed.poll(cx).is_ready() {
            return Poll::Ready(Err(this
                .inbox
                .close_reason()
                .unwrap_or(CloseReason::SlowConsumer)));
        }
        if this.timer.poll(cx).is_ready() {
            this.outbox.close(CloseReason::SlowConsumer);
            return Poll::Ready(Err(CloseReason::SlowConsumer));
        }
        Poll::Pending
    }
}

/// Maps a socket error to the reason the session ends.
fn socket_error(e: &WsError) -> CloseReason {
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => CloseReason::TooBig,
        WsError::Capacity(_) => CloseReason::TooBig,
        WsError::Utf8(_) => CloseReason::InvalidUtf8,
        WsError::Protocol(_) => CloseReason::ProtocolViolation,
        WsError::ConnectionClosed | WsError::AlreadyClosed => CloseReason::ClientClosed,
        _ => CloseReason::TransportError,
    }
}
