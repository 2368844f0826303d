//! The background task behind a [`crate::Client`]: it owns the connection,
//! the joined rooms and every request still waiting for its reply, and keeps
//! them across reconnects.
//!
//! On each connection it first rejoins every room with `since`/`epoch`,
//! then resends every unacked send with its key and every unanswered
//! request, in the order the application made them. It must not block on
//! the socket's write side while it reads (a writer task per connection
//! does the writing), and must not panic on anything the server sends.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{Body, ClientRequest, ErrorCode, HistoryMessage, Request, ServerFrame, Token};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::backoff::{self, Backoff, Decision};
use crate::connect::{self, Ws};
use crate::room::{Out, Room};
use crate::{
    Ack, ConnectError, Disconnect, Error, Event, HistoryPage, HistoryQuery, Joined, Message,
    Options, Source, State,
};

/// A request from the [`crate::Client`] handle.
pub(crate) enum Cmd {
    Join {
        room: String,
        reply: oneshot::Sender<Result<Joined, Error>>,
    },
    Leave {
        room: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Send {
        room: String,
        body: Body,
        key: String,
        reply: oneshot::Sender<Result<Ack, Error>>,
    },
    History {
        room: String,
        query: HistoryQuery,
        reply: oneshot::Sender<Result<HistoryPage, Error>>,
    },
    Typing {
        room: String,
    },
    Ping {
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// Results of the driver's own tasks.
enum Internal {
    Token(Result<String, crate::BoxError>),
}

/// An application request waiting for its reply, across reconnects.
enum Op {
    Join {
        room: String,
        reply: oneshot::Sender<Result<Joined, Error>>,
    },
    Leave {
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Send {
        room: String,
        body: Body,
        key: String,
        reply: oneshot::Sender<Result<Ack, Error>>,
        /// Sent on the current connection (else it goes out on the next,
        /// or when its retry is due).
        on_wire: bool,
        /// Consecutive refusals (`internal`, `unavailable`, ...), which
        /// lengthen the wait before the next try.
        refusals: u32,
    },
    History {
        room: String,
        query: HistoryQuery,
        reply: oneshot::Sender<Result<HistoryPage, Error>>,
        on_wire: bool,
    },
    Ping {
        reply: oneshot::Sender<Result<(), Error>>,
        on_wire: bool,
    },
}

/// What a request id on the current connection stands for.
enum Wire {
    Op(u64),
    Join(String),
    Fill(String),
    Refresh,
}

/// Something due at an instant.
#[derive(Debug)]
enum Wake {
    /// The op's timeout.
    Deadline(u64),
    /// A refused send (rate limited, unavailable, internal) goes out again.
    Resend(u64),
    /// A refused join goes out again.
    Rejoin(String),
    /// A refused fill page is fetched again.
    Refetch(String),
}

/// The current connection's write side and request ids.
struct Conn {
    out: mpsc::UnboundedSender<WsMessage>,
    wire: HashMap<u64, Wire>,
    next_id: u64,
}

pub(crate) struct Driver {
    options: Options,
    cmds: mpsc::Receiver<Cmd>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    events: mpsc::Sender<Event>,
    state: watch::Sender<State>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    backoff: Backoff,
    rooms: BTreeMap<String, Room>,
    ops: BTreeMap<u64, Op>,
    next_op: u64,
    pending_sends: usize,
    wakes: BTreeMap<(Instant, u64), Wake>,
    next_wake: u64,
    conn: Option<Conn>,
    refreshing: bool,
    /// Consecutive refusals of each room's own join or fill page, which
    /// lengthen the wait before the next try; cleared by an answer.
    room_refusals: HashMap<String, u32>,
    /// The application dropped its handles: finish when nothing is pending.
    handles_gone: bool,
}

impl Driver {
    pub(crate) fn new(
        options: Options,
        cmds: mpsc::Receiver<Cmd>,
        events: mpsc::Sender<Event>,
        state: watch::Sender<State>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Driver {
        let (internal_tx, internal_rx) = mpsc::channel(1);
        let backoff = Backoff::new(options.backoff.clone());
        Driver {
            options,
            cmds,
            internal_tx,
            internal_rx,
            events,
            state,
            cancel,
            tracker,
            backoff,
            rooms: BTreeMap::new(),
            ops: BTreeMap::new(),
            next_op: 1,
            pending_sends: 0,
            wakes: BTreeMap::new(),
            next_wake: 0,
            conn: None,
            refreshing: false,
            room_refusals: HashMap::new(),
            handles_gone: false,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut attempt = 0u32;
        let reason = loop {
            self.state.send_replace(State::Connecting { attempt });
            attempt = attempt.saturating_add(1);
            let reason = match self.connect().await {
                Ok(ws) => self.serve(ws, &mut attempt).await,
                Err(reason) => reason,
            };
            if matches!(reason, Disconnect::ClientClosed) || self.cancel.is_cancelled() {
                break Disconnect::ClientClosed;
            }
            match self.backoff.next(&reason) {
                Decision::Stop => break reason,
                Decision::Retry(delay) => {
                    debug!(%reason, ?delay, "reconnecting");
                    self.state.send_replace(State::Disconnected {
                        reason,
                        retry_in: Some(delay),
                    });
                    if !self.idle_until(Instant::now() + delay).await {
                        break Disconnect::ClientClosed;
                    }
                }
            }
        };
        self.stop(reason);
    }

    /// Everything still waiting fails; the state says why, for good.
    fn stop(&mut self, reason: Disconnect) {
        if matches!(reason, Disconnect::ClientClosed) {
            debug!("client closed");
        } else {
            warn!(%reason, "client stopped");
        }
        // The state first: a caller woken by its failed request sees it.
        self.state.send_replace(State::Disconnected {
            reason: reason.clone(),
            retry_in: None,
        });
        for (_, op) in std::mem::take(&mut self.ops) {
            fail(op, || Error::Stopped(reason.clone()));
        }
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            reject(cmd, Error::Stopped(reason.clone()));
        }
    }

    /// Serves the application while offline until `until`; false when the
    /// client is to stop.
    async fn idle_until(&mut self, until: Instant) -> bool {
        loop {
            let wake_at = self.next_wake_at();
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => return true,
                cmd = self.cmds.recv(), if !self.handles_gone => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    None => self.handles_gone = true,
                },
                _ = sleep_until_opt(wake_at) => self.on_wakes(),
            }
            if self.handles_gone && self.ops.is_empty() {
                return false;
            }
        }
    }

    /// One connection attempt, serving the application meanwhile.
    async fn connect(&mut self) -> Result<Ws, Disconnect> {
        let timeout = self.options.connect_timeout;
        let url = self.options.url.clone();
        let resolve = self.options.resolve;
        let tls = self.options.tls.clone();
        let provider = self.options.token_provider.clone();
        let attempt = async move {
            let token = match provider {
                Some(p) => Some(p().await.map_err(ConnectError::Token)?),
                None => None,
            };
            connect::connect(&url, resolve, tls.as_ref(), token.as_deref()).await
        };
        let attempt = tokio::time::timeout(timeout, attempt);
        tokio::pin!(attempt);
        loop {
            let wake_at = self.next_wake_at();
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(Disconnect::ClientClosed),
                r = &mut attempt => {
                    return match r {
                        Ok(Ok(ws)) => Ok(ws),
                        Ok(Err(ConnectError::Refused { status, body, retry_after })) => {
                            Err(Disconnect::Refused { status, body, retry_after })
                        }
                        Ok(Err(e)) => Err(Disconnect::ConnectFailed(e.into())),
                        Err(_) => Err(Disconnect::ConnectFailed(ConnectError::Timeout(timeout).into())),
                    };
                }
                cmd = self.cmds.recv(), if !self.handles_gone => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    None => self.handles_gone = true,
                },
                _ = sleep_until_opt(wake_at) => self.on_wakes(),
            }
            if self.handles_gone && self.ops.is_empty() {
                return Err(Disconnect::ClientClosed);
            }
        }
    }

    /// Runs one connection until it ends.
    async fn serve(&mut self, ws: Ws, attempt: &mut u32) -> Disconnect {
        let (mut sink, mut stream) = ws.split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<WsMessage>();
        let abandon = CancellationToken::new();
        let writer_abandon = abandon.clone();
        let closing = self.cancel.clone();
        let grace = self.options.connect_timeout;
        // The writer sends what is queued, in order, then closes. It stops
        // at once when the connection is abandoned, and when the client
        // closes it gets `grace` to flush the close frame.
        self.tracker.spawn(async move {
            let write_all = async {
                while let Some(msg) = out_rx.recv().await {
                    // Whatever is queued goes out in one flush (a resume's
                    // joins and resends, a burst of sends).
                    if sink.feed(msg).await.is_err() {
                        return;
                    }
                    while let Ok(more) = out_rx.try_recv() {
                        if sink.feed(more).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
                let _ = sink.close().await;
            };
            tokio::select! {
                _ = writer_abandon.cancelled() => {}
                _ = async { closing.cancelled().await; tokio::time::sleep(grace).await } => {}
                _ = write_all => {}
            }
        });
        self.conn = Some(Conn {
            out: out_tx,
            wire: HashMap::new(),
            next_id: 1,
        });
        self.resume();
        // Until `welcome` tells the heartbeat, the connect timeout bounds
        // the silence.
        let mut silence = self.options.connect_timeout;
        let mut last_rx = Instant::now();
        let reason = loop {
            let wake_at = self.next_wake_at();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    self.close_conn();
                    break Disconnect::ClientClosed;
                }
                msg = stream.next() => {
                    last_rx = Instant::now();
                    match msg {
                        Some(Ok(WsMessage::Text(text))) => match ServerFrame::from_json(text.as_str()) {
                            Ok(frame) => {
                                if let ServerFrame::Welcome { protocol: version, .. } = &frame {
                                    if *version != protocol::PROTOCOL_VERSION {
                                        self.close_conn();
                                        break Disconnect::ProtocolMismatch {
                                            server: *version,
                                            client: protocol::PROTOCOL_VERSION,
                                        };
                                    }
                                }
                                if let ServerFrame::Welcome { heartbeat_ms, .. } = &frame {
                                    silence = Duration::from_millis(*heartbeat_ms)
                                        .saturating_mul(self.options.silence_heartbeats.max(1));
                                    *attempt = 0;
                                }
                                self.on_frame(frame).await;
                            }
                            Err(e) => warn!(error = %e, "undecodable server frame ignored"),
                        },
                        Some(Ok(WsMessage::Close(frame))) => {
                            let (code, reason) = match frame {
                                Some(f) => (u16::from(f.code), f.reason.as_str().to_owned()),
                                None => (u16::from(CloseCode::Status), String::new()),
                            };
                            break Disconnect::Closed { code, reason };
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break Disconnect::Lost(e.into()),
                        None => break Disconnect::Lost(tungstenite::Error::ConnectionClosed.into()),
                    }
                }
                cmd = self.cmds.recv(), if !self.handles_gone => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    None => self.handles_gone = true,
                },
                Some(internal) = self.internal_rx.recv() => self.on_internal(internal),
                _ = sleep_until_opt(wake_at) => self.on_wakes(),
                _ = tokio::time::sleep_until(last_rx + silence) => break Disconnect::Silent(silence),
            }
            if self.handles_gone && self.ops.is_empty() {
                self.close_conn();
                break Disconnect::ClientClosed;
            }
        };
        // A close this side queued is flushed before the writer ends.
        if !matches!(
            reason,
            Disconnect::ClientClosed | Disconnect::ProtocolMismatch { .. }
        ) {
            abandon.cancel();
        }
        self.disconnected();
        reason
    }

    /// Queues a normal close; the writer sends it and ends.
    fn close_conn(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.out.send(WsMessage::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })));
        }
    }

    /// The connection is gone: what was in flight goes out again on the next.
    fn disconnected(&mut self) {
        self.conn = None;
        self.refreshing = false;
        for room in self.rooms.values_mut() {
            room.disconnected();
        }
        let mut left = Vec::new();
        for (id, op) in self.ops.iter_mut() {
            match op {
                Op::Send { on_wire, .. }
                | Op::History { on_wire, .. }
                | Op::Ping { on_wire, .. } => *on_wire = false,
                // The room was already forgotten: the next session never
                // joins it.
                Op::Leave { .. } => left.push(*id),
                Op::Join { .. } => {}
            }
        }
        for id in left {
            if let Some(Op::Leave { reply }) = self.ops.remove(&id) {
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// A fresh connection: rejoin every room, then resend what waits, in
    /// the application's order. The server reads these after `welcome`, in
    /// order, so the joins take effect before the sends.
    fn resume(&mut self) {
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            self.send_join(&room);
        }
        let waiting: Vec<u64> = self.ops.keys().copied().collect();
        for id in waiting {
            self.put_on_wire(id);
        }
    }

    fn send_join(&mut self, room: &str) {
        let (since, epoch) = match self.rooms.get(room) {
            Some(r) => r.resume_point(),
            None => return,
        };
        let req = ClientRequest::Join {
            room: room.to_owned(),
            since,
            epoch,
        };
        self.request(req, Wire::Join(room.to_owned()));
    }

    /// Sends op `id` if it is not on the wire already.
    fn put_on_wire(&mut self, id: u64) {
        if self.conn.is_none() {
            return;
        }
        let req = match self.ops.get_mut(&id) {
            Some(Op::Send {
                room,
                body,
                key,
                on_wire,
                ..
            }) if !*on_wire => {
                *on_wire = true;
                ClientRequest::Send {
                    room: room.clone(),
                    body: body.clone(),
                    key: Some(key.clone()),
                }
            }
            Some(Op::History {
                room,
                query,
                on_wire,
                ..
            }) if !*on_wire => {
                *on_wire = true;
                ClientRequest::History {
                    room: room.clone(),
                    before: query.before,
                    after: query.after,
                    limit: query.limit,
                }
            }
            Some(Op::Ping { on_wire, .. }) if !*on_wire => {
                *on_wire = true;
                ClientRequest::Ping
            }
            _ => return,
        };
        self.request(req, Wire::Op(id));
    }

    /// Writes a request with a fresh id standing for `wire`; false when
    /// there is no connection.
    fn request(&mut self, body: ClientRequest, wire: Wire) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let id = conn.next_id;
        conn.next_id += 1;
        conn.wire.insert(id, wire);
        let text = Request { id: Some(id), body }.to_json();
        conn.out.send(WsMessage::Text(text.into())).is_ok()
    }

    fn add_op(&mut self, op: Op, timeout: Duration) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, op);
        self.wake_at(Instant::now() + timeout, Wake::Deadline(id));
        id
    }

    fn wake_at(&mut self, at: Instant, wake: Wake) {
        self.next_wake += 1;
        self.wakes.insert((at, self.next_wake), wake);
    }

    fn next_wake_at(&self) -> Option<Instant> {
        self.wakes.keys().next().map(|(at, _)| *at)
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        let timeout = self.options.request_timeout;
        match cmd {
            Cmd::Join { room, reply } => {
                self.rooms.entry(room.clone()).or_default();
                self.add_op(
                    Op::Join {
                        room: room.clone(),
                        reply,
                    },
                    timeout,
                );
                self.send_join(&room);
            }
            Cmd::Leave { room, reply } => {
                let was_joined = self.rooms.remove(&room).is_some();
                self.room_refusals.remove(&room);
                self.fail_joins(&room, || Error::Server {
                    code: ErrorCode::NotJoined,
                    message: format!("left `{room}` before the join completed"),
                    retry_after_ms: None,
                });
                if was_joined && self.conn.is_some() {
                    let id = self.add_op(Op::Leave { reply }, timeout);
                    self.request(ClientRequest::Leave { room }, Wire::Op(id));
                } else {
                    let _ = reply.send(Ok(()));
                }
            }
            Cmd::Send {
                room,
                body,
                key,
                reply,
            } => {
                if self.pending_sends >= self.options.max_pending_sends {
                    let _ = reply.send(Err(Error::TooManyPending(self.pending_sends)));
                    return;
                }
                self.pending_sends += 1;
                let op = Op::Send {
                    room,
                    body,
                    key,
                    reply,
                    on_wire: false,
                    refusals: 0,
                };
                let id = self.add_op(op, self.options.send_timeout);
                self.put_on_wire(id);
            }
            Cmd::History { room, query, reply } => {
                let op = Op::History {
                    room,
                    query,
                    reply,
                    on_wire: false,
                };
                let id = self.add_op(op, timeout);
                self.put_on_wire(id);
            }
            Cmd::Typing { room } => {
                if let Some(conn) = self.conn.as_mut() {
                    let text = Request {
                        id: None,
                        body: ClientRequest::Typing { room },
                    }
                    .to_json();
                    let _ = conn.out.send(WsMessage::Text(text.into()));
                }
            }
            Cmd::Ping { reply } => {
                let id = self.add_op(
                    Op::Ping {
                        reply,
                        on_wire: false,
                    },
                    timeout,
                );
                self.put_on_wire(id);
            }
        }
    }

    fn fail_joins(&mut self, room: &str, err: impl Fn() -> Error) {
        let ids: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, op)| matches!(op, Op::Join { room: r, .. } if r == room))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(op) = self.ops.remove(&id) {
                fail(op, &err);
            }
        }
    }

    fn remove_op(&mut self, id: u64) -> Option<Op> {
        let op = self.ops.remove(&id)?;
        if matches!(op, Op::Send { .. }) {
            self.pending_sends = self.pending_sends.saturating_sub(1);
        }
        Some(op)
    }

    fn on_wakes(&mut self) {
        let now = Instant::now();
        while let Some(entry) = self.wakes.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                Wake::Deadline(id) => {
                    if let Some(op) = self.remove_op(id) {
                        let send_timeout = self.options.send_timeout;
                        let timeout = self.options.request_timeout;
                        match op {
                            Op::Send { key, reply, .. } => {
                                let _ = reply.send(Err(Error::SendTimeout {
                                    key,
                                    after: send_timeout,
                                }));
                            }
                            other => fail(other, || Error::Timeout(timeout)),
                        }
                    }
                }
                Wake::Resend(id) => self.put_on_wire(id),
                Wake::Rejoin(room) => {
                    if self.conn.is_some() {
                        self.send_join(&room);
                    }
                }
                Wake::Refetch(room) => {
                    let after = self.rooms.get_mut(&room).and_then(Room::refetch);
                    if let Some(after) = after {
                        self.fetch(&room, after);
                    }
                }
            }
        }
    }

    fn fetch(&mut self, room: &str, after: u64) {
        let req = ClientRequest::History {
            room: room.to_owned(),
            before: None,
            after: Some(after),
            limit: Some(self.options.fill_page),
        };
        self.request(req, Wire::Fill(room.to_owned()));
    }

    fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Token(Ok(token)) => {
                if !self.request(
                    ClientRequest::Refresh {
                        token: Token(token),
                    },
                    Wire::Refresh,
                ) {
                    self.refreshing = false;
                }
            }
            Internal::Token(Err(e)) => {
                self.refreshing = false;
                let reason = format!("token provider: {e}");
                self.emit_now(Event::TokenRefreshFailed { reason });
            }
        }
    }

    /// An event that must not wait: dropped when the application's buffer
    /// is full (token notices only; messages always wait for room).
    fn emit_now(&mut self, event: Event) {
        if self.events.try_send(event).is_err() {
            debug!("event buffer full; token notice dropped");
        }
    }

    /// Hands an event to the application, waiting for room in its buffer
    /// (but not past [`crate::Client::close`]).
    async fn emit(&mut self, event: Event) {
        // A dropped `Events` means the application does not listen.
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.events.send(event) => {}
        }
    }

    fn take_wire(&mut self, id: Option<u64>) -> Option<Wire> {
        let id = id?;
        self.conn.as_mut()?.wire.remove(&id)
    }

    async fn on_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Welcome { session, .. } => {
                self.backoff.reset();
                self.state.send_replace(State::Connected { session });
            }
            ServerFrame::Joined {
                id,
                room,
                seq,
                epoch,
                count,
                presence,
                recovered,
            } => {
                self.take_wire(id);
                if id.is_none() {
                    // Joined in the upgrade URL (`?join=`): kept like any
                    // other room from here on.
                    self.rooms.entry(room.clone()).or_default();
                }
                let max_fill = self.options.max_fill;
                let Some(r) = self.rooms.get_mut(&room) else {
                    return;
                };
                let outs = r.joined(seq, &epoch, recovered, max_fill);
                self.room_refusals.remove(&room);
                let joined = Joined {
                    room: room.clone(),
                    seq,
                    epoch,
                    count,
                    presence,
                    recovered,
                };
                let ids: Vec<u64> = self
                    .ops
                    .iter()
                    .filter(|(_, op)| matches!(op, Op::Join { room: r, .. } if *r == room))
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    if let Some(Op::Join { reply, .. }) = self.ops.remove(&id) {
                        let _ = reply.send(Ok(joined.clone()));
                    }
                }
                self.emit(Event::Joined(joined)).await;
                self.apply(&room, outs).await;
            }
            ServerFrame::Left { id, room } => match self.take_wire(id) {
                Some(Wire::Op(op)) => {
                    if let Some(Op::Leave { reply }) = self.remove_op(op) {
                        let _ = reply.send(Ok(()));
                    }
                }
                _ => {
                    if id.is_none() && self.rooms.remove(&room).is_some() {
                        self.emit(Event::Left { room }).await;
                    }
                }
            },
            ServerFrame::Ack {
                id,
                room,
                seq,
                ts,
                duplicate,
            } => {
                if let Some(Wire::Op(op)) = self.take_wire(id) {
                    if let Some(Op::Send { key, reply, .. }) = self.remove_op(op) {
                        let _ = reply.send(Ok(Ack {
                            room,
                            seq,
                            ts,
                            duplicate,
                            key,
                        }));
                    }
                }
            }
            ServerFrame::Message {
                room,
                seq,
                from,
                ts,
                body,
                replay,
            } => {
                let max_fill = self.options.max_fill;
                let Some(r) = self.rooms.get_mut(&room) else {
                    return;
                };
                let m = Message {
                    room: room.clone(),
                    seq,
                    from,
                    ts,
                    body: Some(body),
                    source: if replay { Source::Replay } else { Source::Live },
                };
                let outs = r.message(m, max_fill);
                self.apply(&room, outs).await;
            }
            ServerFrame::History {
                id,
                room,
                messages,
                more,
            } => match self.take_wire(id) {
                Some(Wire::Fill(fill_room)) => {
                    let max_fill = self.options.max_fill;
                    let Some(r) = self.rooms.get_mut(&fill_room) else {
                        return;
                    };
                    let page = messages
                        .into_iter()
                        .map(|m| from_history(&fill_room, m))
                        .collect();
                    let outs = r.page(page, more, max_fill);
                    self.room_refusals.remove(&fill_room);
                    self.apply(&fill_room, outs).await;
                }
                Some(Wire::Op(op)) => {
                    if let Some(Op::History { reply, .. }) = self.remove_op(op) {
                        let messages = messages
                            .into_iter()
                            .map(|m| from_history(&room, m))
                            .collect();
                        let _ = reply.send(Ok(HistoryPage { messages, more }));
                    }
                }
                _ => {}
            },
            ServerFrame::Typing { room, count, users } => {
                if self.rooms.contains_key(&room) {
                    self.emit(Event::Typing { room, count, users }).await;
                }
            }
            ServerFrame::Presence {
                room,
                count,
                joined,
                left,
                truncated,
            } => {
                if self.rooms.contains_key(&room) {
                    let event = Event::Presence {
                        room,
                        count,
                        joined,
                        left,
                        truncated,
                    };
                    self.emit(event).await;
                }
            }
            // This client sends no `presence` request, so no page is awaited.
            ServerFrame::Members { .. } => {}
            ServerFrame::TokenExpiring { .. } => self.refresh_token(),
            ServerFrame::Refreshed { id, expires_at } => {
                self.take_wire(id);
                self.refreshing = false;
                self.emit(Event::TokenRefreshed { expires_at }).await;
            }
            ServerFrame::Pong { id } => {
                if let Some(Wire::Op(op)) = self.take_wire(id) {
                    if let Some(Op::Ping { reply, .. }) = self.remove_op(op) {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            ServerFrame::Error {
                id,
                code,
                message,
                retry_after_ms,
            } => {
                let wire = self.take_wire(id);
                self.on_error(wire, code, message, retry_after_ms).await;
            }
        }
    }

    /// Asks the token provider for a new token, off the driver's loop.
    fn refresh_token(&mut self) {
        let Some(provider) = self.options.token_provider.clone() else {
            return;
        };
        if self.refreshing {
            return;
        }
        self.refreshing = true;
        let tx = self.internal_tx.clone();
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                token = provider() => {
                    let _ = tx.send(Internal::Token(token)).await;
                }
            }
        });
    }

    async fn on_error(
        &mut self,
        wire: Option<Wire>,
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u64>,
    ) {
        // PROTOCOL.md §5: which refusals are retried, and after how long.
        let retry = backoff::error_retry(code);
        let error = || Error::Server {
            code,
            message: message.clone(),
            retry_after_ms,
        };
        match wire {
            Some(Wire::Op(id)) => {
                if let Some(how) = retry {
                    if let Some(Op::Send {
                        on_wire, refusals, ..
                    }) = self.ops.get_mut(&id)
                    {
                        // The same key makes the retry safe even if the
                        // first attempt was stored after all.
                        *on_wire = false;
                        *refusals = refusals.saturating_add(1);
                        let n = *refusals;
                        let delay = self.backoff.retry_delay(how, retry_after_ms, n);
                        debug!(
                            ?code,
                            ?delay,
                            refusals = n,
                            "send refused; resending with its key"
                        );
                        self.wake_at(Instant::now() + delay, Wake::Resend(id));
                        return;
                    }
                }
                if let Some(op) = self.remove_op(id) {
                    fail(op, error);
                }
            }
            Some(Wire::Join(room)) => {
                if let Some(how) = retry {
                    let delay = self.room_retry_delay(&room, how, retry_after_ms);
                    self.wake_at(Instant::now() + delay, Wake::Rejoin(room));
                    return;
                }
                warn!(%room, ?code, %message, "join refused");
                self.rooms.remove(&room);
                self.fail_joins(&room, error);
            }
            Some(Wire::Fill(room)) => {
                if let Some(how) = retry {
                    let delay = self.room_retry_delay(&room, how, retry_after_ms);
                    self.wake_at(Instant::now() + delay, Wake::Refetch(room));
                    return;
                }
                let max_fill = self.options.max_fill;
                if let Some(r) = self.rooms.get_mut(&room) {
                    let outs = r.page_failed(max_fill);
                    self.apply(&room, outs).await;
                }
            }
            Some(Wire::Refresh) => {
                self.refreshing = false;
                self.emit(Event::TokenRefreshFailed { reason: message })
                    .await;
            }
            None => warn!(?code, %message, "server error without a request"),
        }
    }

    /// The wait before a room's refused join or fill page goes out again.
    fn room_retry_delay(
        &mut self,
        room: &str,
        how: backoff::RetryDelay,
        retry_after_ms: Option<u64>,
    ) -> Duration {
        let refusals = self.room_refusals.entry(room.to_owned()).or_default();
        *refusals = refusals.saturating_add(1);
        let n = *refusals;
        self.backoff.retry_delay(how, retry_after_ms, n)
    }

    async fn apply(&mut self, room: &str, outs: Vec<Out>) {
        for out in outs {
            match out {
                Out::Deliver(m) => self.emit(Event::Message(m)).await,
                Out::Gap { first, last } => {
                    let room = room.to_owned();
                    self.emit(Event::Gap { room, first, last }).await;
                }
                Out::EpochChanged { epoch } => {
                    let room = room.to_owned();
                    self.emit(Event::EpochChanged { room, epoch }).await;
                }
                Out::FetchAfter(after) => self.fetch(room, after),
            }
        }
    }
}

fn from_history(room: &str, m: HistoryMessage) -> Message {
    Message {
        room: room.to_owned(),
        seq: m.seq,
        from: m.from,
        ts: m.ts,
        body: if m.erased { None } else { m.body },
        source: Source::History,
    }
}

fn fail(op: Op, err: impl Fn() -> Error) {
    match op {
        Op::Join { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        Op::Leave { reply } => {
            let _ = reply.send(Err(err()));
        }
        Op::Send { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        Op::History { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        Op::Ping { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
    }
}

fn reject(cmd: Cmd, err: Error) {
    match cmd {
        Cmd::Join { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Cmd::Leave { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Cmd::Send { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Cmd::History { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Cmd::Ping { reply } => {
            let _ = reply.send(Err(err));
        }
        Cmd::Typing { .. } => {}
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
