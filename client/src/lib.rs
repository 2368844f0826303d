//! `switchboard-client`: a Rust client for Switchboard that makes the
//! server's promises the application's. A message the application sends is
//! stored once, and the application sees every room's messages in seq order,
//! each once, whatever the network or the server does; a range it cannot be
//! shown is reported as a [`Event::Gap`], never skipped silently.
//!
//! - [`Client`]: the handle. Requests go to a background task (the driver),
//!   which owns the connection and reconnects by the close-code classes of
//!   PROTOCOL.md §9 ([`backoff`]).
//! - [`Events`]: what arrives (messages, gaps, presence, typing, ...).
//! - [`State`]: connecting, connected, disconnected and why, as a `watch`.
//!
//! Wire types come from the `protocol` crate; this crate defines none. It
//! must not block the runtime, spawn untracked tasks, or panic on anything
//! a server sends.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_client::{Client, Event, Options, tls_with_ca_file};
//! let mut options = Options::new("wss://localhost:8443/ws?user=alice");
//! options.tls = Some(tls_with_ca_file("certs/ca.pem".as_ref())?);
//! let (client, mut events) = Client::start(options);
//! client.join("general").await?;
//! tokio::spawn(async move {
//!     while let Some(event) = events.next().await {
//!         if let Event::Message(m) = event {
//!             println!("{} #{} {}: {:?}", m.room, m.seq, m.from, m.body);
//!         }
//!     }
//! });
//! let ack = client.send_json("general", &serde_json::json!({"text": "hello"})).await?;
//! println!("stored as seq {}", ack.seq);
//! client.close().await;
//! # Ok(()) }
//! ```

pub mod backoff;
mod connect;
mod driver;
mod room;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use backoff::{Action, BackoffPolicy, Decision};
pub use connect::tls_with_ca_file;
pub use protocol::{Body, ErrorCode};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use driver::{Cmd, Driver};

/// Any error a token provider returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future a token provider returns.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

/// Called for a token at every connect and on `token_expiring`.
pub type TokenProvider = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// How a client connects and behaves. Every limit has a documented default.
#[derive(Clone)]
pub struct Options {
    /// The server's WebSocket URL: `wss://host:port/ws` (with `?user=NAME` in
    /// dev mode).
    pub url: String,
    /// Connect to this address instead of resolving the URL's host (which
    /// still names the server for TLS and the `Host` header), like curl's
    /// `--resolve`. Default: none.
    pub resolve: Option<std::net::SocketAddr>,
    /// The TLS configuration for `wss://` (see [`tls_with_ca_file`]).
    /// Required for `wss://`. Default: none.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Called for a token at each connect (sent as `Authorization: Bearer`)
    /// and on `token_expiring` (sent with `refresh`). Default: none (dev
    /// mode; with authentication, a session then ends at its token's expiry
    /// with 4001 and the client stops).
    pub token_provider: Option<TokenProvider>,
    /// The reconnect delays.
    pub backoff: BackoffPolicy,
    /// The longest one connection attempt (TCP, TLS, upgrade, `welcome`)
    /// may take. Default 10 s, the server's handshake timeout.
    pub connect_timeout: Duration,
    /// How long `join`, `leave`, `history` and `ping` wait for their reply,
    /// across reconnects. Default 30 s.
    pub request_timeout: Duration,
    /// How long `send` waits for its ack, across reconnects; past it the
    /// send is withdrawn and fails with [`Error::SendTimeout`]. Default 60 s.
    pub send_timeout: Duration,
    /// The most sends awaiting their ack; past it `send` fails with
    /// [`Error::TooManyPending`]. Default 1024.
    pub max_pending_sends: usize,
    /// The most missing messages paged from history after `recovered: false`;
    /// a longer gap is reported as one [`Event::Gap`]. Default 10 000.
    pub max_fill: u64,
    /// Messages per history page when filling a gap. Default 200 (the
    /// server's maximum).
    pub fill_page: u32,
    /// A connection silent for this many of the server's heartbeat intervals
    /// is taken as dead. Default 3.
    pub silence_heartbeats: u32,
    /// Events buffered for the application. When [`Events`] is not read, the
    /// driver waits, the server's queue fills and it closes the session with
    /// 4100; the client then resumes, so nothing is lost. Default 4096.
    pub event_buffer: usize,
    /// Requests buffered from [`Client`] to the driver. Default 1024.
    pub command_buffer: usize,
}

impl Options {
    /// Options with every default, for `url`.
    pub fn new(url: impl Into<String>) -> Options {
        Options {
            url: url.into(),
            resolve: None,
            tls: None,
            token_provider: None,
            backoff: BackoffPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            max_pending_sends: 1024,
            max_fill: 10_000,
            fill_page: 200,
            silence_heartbeats: 3,
            event_buffer: 4096,
            command_buffer: 1024,
        }
    }

    /// Sets the token provider from an async closure.
    pub fn with_token_provider<F, Fut, E>(mut self, f: F) -> Options
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.token_provider = Some(Arc::new(move || {
            let fut = f();
            Box::pin(async move { fut.await.map_err(Into::into) })
        }));
        self
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("url", &self.url)
            .field("resolve", &self.resolve)
            .field("tls", &self.tls.is_some())
            .field("token_provider", &self.token_provider.is_some())
            .field("backoff", &self.backoff)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("max_pending_sends", &self.max_pending_sends)
            .field("max_fill", &self.max_fill)
            .finish_non_exhaustive()
    }
}

/// The connection's state, observable through [`Client::state`].
#[derive(Debug, Clone)]
pub enum State {
    /// Connecting; `attempt` counts the attempts since the last session.
    Connecting { attempt: u32 },
    /// A session is open (the server said `welcome`).
    Connected { session: String },
    /// The connection ended. With `retry_in`, the client reconnects after
    /// that delay; without, it has stopped for good (a close code of
    /// 4000–4099, a refusal such as HTTP 401, another protocol version, or
    /// [`Client::close`]).
    Disconnected {
        reason: Disconnect,
        retry_in: Option<Duration>,
    },
}

/// Why a connection ended or could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Disconnect {
    /// The server refused the upgrade with an HTTP status.
    #[error("refused with HTTP {status}: {body}")]
    Refused {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    /// The connection could not be opened.
    #[error("could not connect: {0}")]
    ConnectFailed(#[source] Arc<ConnectError>),
    /// The server closed the session with this code and reason.
    #[error("closed by the server with {code}: {reason}")]
    Closed { code: u16, reason: String },
    /// The connection broke without a close frame.
    #[error("connection lost: {0}")]
    Lost(#[source] Arc<tungstenite::Error>),
    /// Nothing arrived for this long (a dead peer or path).
    #[error("nothing received for {0:?}")]
    Silent(Duration),
    /// The server speaks another major version of the protocol (its
    /// `welcome.protocol`): the client closed the session and stopped, as
    /// PROTOCOL.md §11 asks; this client must be upgraded to talk to it.
    #[error("the server speaks protocol {server}; this client speaks {client}")]
    ProtocolMismatch { server: u32, client: u32 },
    /// The application closed the client.
    #[error("closed by the application")]
    ClientClosed,
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad url: {0}")]
    Url(#[source] tungstenite::Error),
    #[error("the url has no host")]
    NoHost,
    #[error("the url's scheme `{0}` is not ws or wss")]
    Scheme(String),
    #[error("wss:// needs Options::tls")]
    NoTls,
    #[error("the token is not a valid header value")]
    BadToken,
    #[error("CA file {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("tcp connect: {0}")]
    Tcp(#[source] std::io::Error),
    #[error("tls handshake: {0}")]
    Tls(#[source] std::io::Error),
    #[error("websocket upgrade: {0}")]
    Upgrade(#[source] tungstenite::Error),
    #[error("refused with HTTP {status}: {body}")]
    Refused {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("no welcome within {0:?}")]
    Timeout(Duration),
    #[error("token provider: {0}")]
    Token(#[source] BoxError),
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an `error` frame.
    #[error("{code:?}: {message}")]
    Server {
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u64>,
    },
    /// No reply within [`Options::request_timeout`].
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// No ack within [`Options::send_timeout`]. The message may have been
    /// stored: [`Client::send_with_key`] with the same key answers which
    /// seq it got, and stores it if it was not.
    #[error("no ack within {after:?}; resend with key {key} to learn whether it was stored")]
    SendTimeout { key: String, after: Duration },
    /// [`Options::max_pending_sends`] sends already await their ack.
    #[error("{0} sends already await their ack")]
    TooManyPending(usize),
    /// The body is not valid JSON.
    #[error("the body is not valid JSON: {0}")]
    Body(#[source] serde_json::Error),
    /// The client has stopped (closed, or a close code that forbids
    /// reconnecting); nothing more will be sent.
    #[error("the client has stopped: {0}")]
    Stopped(Disconnect),
}

/// Where a delivered message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Live, as it was sent.
    Live,
    /// Replayed by a resuming `join` (`recovered: true`).
    Replay,
    /// Paged from history to fill a gap (`recovered: false`).
    History,
}

/// One message of a room, delivered once and in seq order.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub room: String,
    pub seq: u64,
    pub from: String,
    /// Milliseconds since the Unix epoch, as stored.
    pub ts: u64,
    /// `None` when a page of history shows the message erased (its seq
    /// stays). A replay carries an erased message's body as JSON `null`
    /// (PROTOCOL.md §3, history).
    pub body: Option<Body>,
    pub source: Source,
}

/// What the application receives, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next message of a room.
    Message(Message),
    /// Seqs `first..=last` of `room` will not be delivered: more were missing
    /// than [`Options::max_fill`], or history no longer holds them.
    Gap { room: String, first: u64, last: u64 },
    /// A join (or a resume after a reconnect) took effect; `count` is
    /// authoritative, and `presence` names at most the server's
    /// `presence_list_max` of the room's users.
    Joined(Joined),
    /// The room's history was recreated (a new epoch): seqs start over, and
    /// the earlier ones mean nothing in it.
    EpochChanged { room: String, epoch: String },
    /// The server removed the session from a room (its token no longer
    /// allows reading it).
    Left { room: String },
    /// Users came or went; `count` is the room's number of users after
    /// them. `truncated`: more came or went than the lists name.
    Presence {
        room: String,
        count: u64,
        joined: Vec<String>,
        left: Vec<String>,
        truncated: bool,
    },
    /// Users typed in the last interval: `count` of them, the first few
    /// named.
    Typing {
        room: String,
        count: u64,
        users: Vec<String>,
    },
    /// A new token is in force until `expires_at` (Unix seconds).
    TokenRefreshed { expires_at: u64 },
    /// A refresh failed; the old token stays in force until it expires.
    TokenRefreshFailed { reason: String },
}

/// The reply to a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub room: String,
    pub seq: u64,
    pub epoch: String,
    /// Distinct users in the room, the joiner included.
    pub count: u64,
    pub presence: Vec<String>,
    pub recovered: Option<bool>,
}

/// A durable message's place, from its `ack`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub room: String,
    pub seq: u64,
    pub ts: u64,
    /// The key matched an earlier send: this is that send's seq.
    pub duplicate: bool,
    /// The idempotency key the send carried.
    pub key: String,
}

/// Which page of history to read (PROTOCOL.md §3, `history`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub limit: Option<u32>,
}

/// One page of history, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    pub more: bool,
}

/// The application's events; read them continuously (see
/// [`Options::event_buffer`]).
#[derive(Debug)]
pub struct Events(mpsc::Receiver<Event>);

impl Events {
    /// The next event; `None` once the client has stopped and every event
    /// was read.
    pub async fn next(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}

/// A handle to a running client. Cloning is cheap; every clone drives the
/// same connection. When every clone is dropped and no request waits, the
/// client closes as with [`Client::close`].
#[derive(Debug, Clone)]
pub struct Client {
    cmds: mpsc::Sender<Cmd>,
    state: watch::Receiver<State>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    keys: Arc<KeyGen>,
}

/// Idempotency keys: a random prefix per client and a counter, so keys from
/// two clients of one user never collide.
#[derive(Debug)]
struct KeyGen {
    prefix: String,
    next: AtomicU64,
}

impl Client {
    /// Starts a client: it connects at once and keeps reconnecting until
    /// [`Client::close`] or a close code that forbids it. Must be called
    /// within a tokio runtime.
    pub fn start(options: Options) -> (Client, Events) {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (cmd_tx, cmd_rx) = mpsc::channel(options.command_buffer.max(1));
        let (event_tx, event_rx) = mpsc::channel(options.event_buffer.max(1));
        let (state_tx, state_rx) = watch::channel(State::Connecting { attempt: 0 });
        let driver = Driver::new(
            options,
            cmd_rx,
            event_tx,
            state_tx,
            cancel.clone(),
            tracker.clone(),
        );
        tracker.spawn(driver.run());
        let prefix = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let client = Client {
            cmds: cmd_tx,
            state: state_rx,
            cancel,
            tracker,
            keys: Arc::new(KeyGen {
                prefix,
                next: AtomicU64::new(1),
            }),
        };
        (client, Events(event_rx))
    }

    /// The connection state; `changed().await` on it to follow transitions.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// A fresh idempotency key, unique to this client.
    pub fn new_key(&self) -> String {
        let n = self.keys.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.keys.prefix)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Cmd,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(make(tx)).await.is_err() {
            return Err(Error::Stopped(self.stop_reason()));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(Error::Stopped(self.stop_reason())),
        }
    }

    fn stop_reason(&self) -> Disconnect {
        match &*self.state.borrow() {
            State::Disconnected { reason, .. } => reason.clone(),
            _ => Disconnect::ClientClosed,
        }
    }

    /// Joins a room, and rejoins it after every reconnect, resuming from the
    /// last message delivered.
    pub async fn join(&self, room: &str) -> Result<Joined, Error> {
        let room = room.to_owned();
        self.call(|reply| Cmd::Join { room, reply }).await
    }

    /// Leaves a room; its messages stop.
    pub async fn leave(&self, room: &str) -> Result<(), Error> {
        let room = room.to_owned();
        self.call(|reply| Cmd::Leave { room, reply }).await
    }

    /// Sends a message with a fresh idempotency key; resolves with its ack
    /// once it is durable. Until then it is resent with the same key after
    /// every reconnect, so it is stored once.
    pub async fn send(&self, room: &str, body: Body) -> Result<Ack, Error> {
        let key = self.new_key();
        self.send_with_key(room, body, key).await
    }

    /// [`Client::send`] with a JSON-serialisable body.
    pub async fn send_json<T: serde::Serialize + ?Sized>(
        &self,
        room: &str,
        body: &T,
    ) -> Result<Ack, Error> {
        let raw = serde_json::value::to_raw_value(body).map_err(Error::Body)?;
        self.send(room, Body(raw)).await
    }

    /// Sends with the application's own idempotency key (to resend after
    /// [`Error::SendTimeout`], or across restarts of the application).
    pub async fn send_with_key(&self, room: &str, body: Body, key: String) -> Result<Ack, Error> {
        let room = room.to_owned();
        self.call(|reply| Cmd::Send {
            room,
            body,
            key,
            reply,
        })
        .await
    }

    /// Reads a page of a room's history.
    pub async fn history(&self, room: &str, query: HistoryQuery) -> Result<HistoryPage, Error> {
        let room = room.to_owned();
        self.call(|reply| Cmd::History { room, query, reply }).await
    }

    /// Tells the room's other members this user is typing. Ephemeral: it is
    /// dropped while disconnected.
    pub async fn typing(&self, room: &str) -> Result<(), Error> {
        let room = room.to_owned();
        self.cmds
            .send(Cmd::Typing { room })
            .await
            .map_err(|_| Error::Stopped(self.stop_reason()))
    }

    /// A round trip to the server.
    pub async fn ping(&self) -> Result<(), Error> {
        self.call(|reply| Cmd::Ping { reply }).await
    }

    /// Closes the connection (with 1000) and stops the client; requests
    /// still waiting fail with [`Error::Stopped`].
    pub async fn close(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
