//! The connection engine: the session's main loop and every write to its
//! socket, with the write deadline ([`Deadline`]), heartbeats, room traffic
//! written around tungstenite, and the end of a session (the last acks,
//! the close frame and its linger).
//!
//! It is the one part of the session that knows the transport, and it
//! knows it only as a byte stream under a WebSocket: it runs over any
//! `AsyncRead + AsyncWrite` (TCP, TLS, or an in-memory duplex in tests).
//! It must not decide what a request means: a text frame goes to
//! `request.rs`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures_util::future::Either;
use futures_util::{SinkExt, StreamExt};
use protocol::{ErrorCode, RequestId, ServerFrame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::pending::oldest_ack;
use super::token::{TokenTimer, token_alarm};
use super::{CloseReason, Flow, Outbox, OutboxReceiver, Outgoing, Ping, Session, Transport};
use crate::delivery::WireFrame;
use crate::history::ReadError;
use crate::hub::{SessionEntry, SessionId};

impl<S: Transport> Session<S> {
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
        // The welcome's future is dropped before the main loop starts.
        let reason = match self.send_welcome(joins).await {
            Ok(()) => self.main_loop().await,
            Err(reason) => reason,
        };
        // Cold path.
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
        // Cold path.
        let sending = Box::pin(async {
            self.send(&welcome).await?;
            for room in joins {
                self.on_join(None, room, None, None).await?;
            }
            Ok(())
        });
        let queued = sending.await;
        // Released after the replies are queued and before the flush, so
        // that the 101, `welcome` and `joined` leave in one write; on a
        // failure too, so that the close that follows is not held.
        (self.welcomed)(self.ws.get_mut());
        queued?;
        self.flush().await
    }

    async fn main_loop(&mut self) -> CloseReason {
        let interval = self.state.config.heartbeat_interval();
        // The first ping comes at a random point of the interval's second
        // half: clients that connected together (all of them, after a
        // restart) would otherwise be pinged together ever after, a burst
        // of pings and pongs every interval on top of the room traffic.
        let first = first_ping(self.id, interval);

        // Boxed, as `Interval` boxes its own: the timer is large, and this
        // future is held by every idle connection.
        let mut heartbeat = Box::pin(tokio::time::sleep_until(Instant::now() + first));
        let max_inflight = self.state.config.max_inflight_sends;
        let mut token_timer: TokenTimer = None;
        self.token_changed = true;
        // Registered once for the whole loop: a fresh wait per iteration
        // would take the token's lock twice per delivery, and the shutdown
        // token is shared by every session.
        let (kill, shutdown) = (self.kill.clone(), self.shutdown.clone());
        let killed = kill.cancelled();
        let stopping = shutdown.cancelled();
        tokio::pin!(killed, stopping);
        loop {
            self.rearm_token_timer(&mut token_timer);
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
                () = &mut heartbeat => {
                    self.on_heartbeat(heartbeat.as_mut(), interval).await
                }
                () = token_alarm(&mut token_timer), if token_timer.is_some() => {
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
        let config = &state.config;
        if let Some(code) = reason.code() {
            let detail = self.close_detail.take().unwrap_or_default();
            let frame = crate::close::close_frame(code, &detail);
            let Session { ws, unsent, .. } = self;
            // Room traffic taken from the outbox leaves before the close.
            match tokio::time::timeout(config.write_timeout(), write_raw(ws, unsent)).await {
                Ok(Ok(())) => {
                    crate::close::close_and_linger(
                        ws,
                        frame,
                        config.write_timeout(),
                        config.close_linger(),
                    )
                    .await;
                }
                Ok(Err(e)) => debug!(error = %e, "close frame not written"),
                Err(_) => debug!("close frame not written in time"),
            }
        } else {
            let _ = tokio::time::timeout(config.write_timeout(), self.ws.flush()).await;
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
    pub(super) async fn settle(&mut self) -> Flow {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Cold path.
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
    pub(super) fn send(&mut self, frame: &ServerFrame) -> Deadline<'_, WsWrite<'_, S>> {
        self.send_text(frame.to_json())
    }

    /// Writes one encoded frame into the codec's buffer, within the write
    /// deadline. The main loop flushes once it has nothing else ready, so
    /// replies to requests read together leave in one segment.
    pub(super) fn send_text(&mut self, text: String) -> Deadline<'_, WsWrite<'_, S>> {
        self.state.metrics.bytes_out.add(text.len() as u64);
        self.write(Message::Text(Utf8Bytes::from(text)), false)
    }

    /// Feeds (and with `flush`, sends) one frame. The write has a deadline
    /// and gives way to a kill, so a peer that stops reading can hold up
    /// only its own session, and only until then.
    pub(super) fn write(&mut self, msg: Message, flush: bool) -> Deadline<'_, WsWrite<'_, S>> {
        self.unflushed = !flush;
        self.with_deadline(|ws| {
            if flush {
                Either::Left(ws.send(msg))
            } else {
                Either::Right(ws.feed(msg))
            }
        })
    }

    pub(super) fn flush(
        &mut self,
    ) -> Deadline<'_, futures_util::sink::Flush<'_, WebSocketStream<S>, Message>> {
        self.unflushed = false;
        self.with_deadline(|ws| ws.flush())
    }

    /// The I/O that `io` makes of the socket, under the write deadline and
    /// the kill.
    fn with_deadline<'a, F>(
        &'a mut self,
        io: impl FnOnce(&'a mut WebSocketStream<S>) -> F,
    ) -> Deadline<'a, F> {
        let deadline = self.state.config.write_timeout();
        let Session {
            ws,
            kill,
            inbox,
            outbox,
            ..
        } = self;
        Deadline::new(deadline, kill, inbox, outbox, io(ws))
    }

    /// Answers with an `error` frame (cold path, see [`Self::send_error_frame`]).
    /// The reply to a read of history that failed: `unavailable` with a
    /// retry time when the cluster's stream cannot be reached now (it
    /// comes back by itself), `internal` otherwise.
    pub(super) async fn read_failed(&mut self, id: Option<RequestId>, e: &ReadError) -> Flow {
        let retry_after_ms = match e {
            ReadError::Unavailable(_) => Some(self.state.config.store_retry_ms.max(1)),
            _ => None,
        };
        self.send_error_frame(ServerFrame::Error {
            id,
            code: retry_after_ms.map_or(ErrorCode::Internal, |_| ErrorCode::Unavailable),
            message: "history is unavailable".into(),
            retry_after_ms,
        })
        .await
    }

    pub(super) async fn send_error(
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
    pub(super) async fn send_error_frame(&mut self, frame: ServerFrame) -> Flow {
        self.state.metrics.error_frames.inc();
        // Cold path.
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
        let now = std::time::Instant::now();
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
        if self.ping == Ping::Owed && self.unsent.frames() > before {
            // Rides with this traffic: see `on_heartbeat`.
            self.ping = Ping::Rode;
            self.unsent.push_event(Arc::new(WireFrame::ping()));
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

    /// The heartbeat's timer fired. At a ping's time: closes the session
    /// if nothing has come from the client since the last ping's time, an
    /// interval ago (so after one to two intervals of silence); otherwise
    /// the ping is owed, and waits a [`PING_WAIT_DIVISOR`]th of the
    /// interval for room traffic to ride with (`write_outgoing` adds it to
    /// the same write), then goes alone. A ping alone costs a write, and
    /// the client's wake-up, on top of each delivery's.
    async fn on_heartbeat(
        &mut self,
        mut timer: Pin<&mut tokio::time::Sleep>,
        interval: std::time::Duration,
    ) -> Flow {
        let fired = timer.deadline();
        let wait = interval / PING_WAIT_DIVISOR;
        match self.ping {
            Ping::Idle => {
                if fired
                    .checked_sub(interval)
                    .is_some_and(|last| self.last_seen < last)
                {
                    return Err(CloseReason::HeartbeatTimeout);
                }
                self.ping = Ping::Owed;
                timer.as_mut().reset(fired + wait);
                Ok(())
            }
            Ping::Rode => {
                self.ping = Ping::Idle;
                timer.as_mut().reset(fired + (interval - wait));
                Ok(())
            }
            Ping::Owed => {
                // The wait is over and no traffic took it.
                self.ping = Ping::Idle;
                timer.as_mut().reset(fired + (interval - wait));
                self.write(Message::Ping(Default::default()), true).await
            }
        }
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
}

/// When a session's first ping is due: at a point of the interval's second
/// half spread by its id (a multiplicative hash, so consecutive ids land
/// far apart), in whole milliseconds as the runtime's timers count.
pub(super) fn first_ping(id: SessionId, interval: std::time::Duration) -> std::time::Duration {
    let half = u64::try_from(interval.as_millis() / 2).unwrap_or(u64::MAX);
    let spread = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // The hash's high bits, scaled to [0, half).
    let offset = (u128::from(spread) * u128::from(half)) >> 64;
    std::time::Duration::from_millis(half.saturating_add(offset as u64))
}

/// An owed ping waits at most this fraction of the heartbeat interval for
/// room traffic to ride with (2.5 s of the default 25 s): a busy session's
/// pings then cost no write of their own, and a quiet one's are late by at
/// most that much.
const PING_WAIT_DIVISOR: u32 = 10;

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
pub(super) type WsWrite<'a, S> = Either<
    futures_util::sink::Send<'a, WebSocketStream<S>, Message>,
    futures_util::sink::Feed<'a, WebSocketStream<S>, Message>,
>;

pin_project_lite::pin_project! {
    /// Socket I/O with a deadline that gives way to a kill. A write that
    /// misses the deadline marks the session a slow consumer. A struct
    /// rather than an `async fn`, so that it holds `io` once.
    #[must_use = "futures do nothing unless awaited"]
    pub(super) struct Deadline<'a, F> {
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
