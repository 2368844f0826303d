//! Unit tests of the session engine in virtual time: a real hub and a real
//! redb store (the server's own, in a temp dir), and a session driven
//! through `tokio::io::duplex` under a paused clock.
//!
//! The store's writer is a thread, and a paused clock jumps to the next
//! timer whenever the runtime is idle, for instance while a commit is on
//! that thread. So the tests never idle: [`spin`] polls what they wait for
//! and yields, which keeps the clock still, and time moves only by
//! [`tokio::time::advance`]. Each spin is bounded by [`DEADLINE`] of real
//! time. The peer is a small hand-written WebSocket client over the duplex
//! (masked frames out, frames parsed in): it answers nothing on its own,
//! so a test decides when it reads, and whether it answers pings.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{CloseReason, Identity, Session};
use crate::auth::Principal;
use crate::config::{Config, Rate};
use crate::history::Backend as _;
use crate::limits::Slots;
use crate::server::Server;
use crate::state::ServerState;

/// The longest real time one wait of a test may take.
const DEADLINE: Duration = Duration::from_secs(15);

/// The token tests' token lifetime and warning: the warning is due 40 s
/// in, the expiry 100 s after the warning (the expiry is counted from the
/// warning on the wall clock, which stands nearly still in these tests).
const TOKEN_SECS: u64 = 100;
const WARNING_SECS: u64 = 60;

/// The duplex's buffer, each way, unless a test needs a small one.
const BUFFER: usize = 64 * 1024;

/// Runs `fut` to completion without letting the paused clock move: polls
/// it, and yields while it is pending, so the runtime is never idle.
async fn spin<F: Future>(fut: F) -> F::Output {
    let started = std::time::Instant::now();
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(v) = futures_util::poll!(&mut fut) {
            return v;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "waited {DEADLINE:?} in real time"
        );
        tokio::task::yield_now().await;
    }
}

/// Lets every runnable task run for a while, the clock still.
async fn settle_tasks() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

/// A server's shared state with its store open in a temp dir.
struct Rig {
    _dir: tempfile::TempDir,
    /// Holds the store open.
    _server: Server,
    state: Arc<ServerState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Rig {
    /// The defaults, with heartbeats out of the way (a test that wants
    /// them sets them), then `tweak`.
    async fn new(tweak: impl FnOnce(&mut Config)) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            heartbeat_interval_ms: 30 * 24 * 3600 * 1000,
            ..Config::default()
        };
        tweak(&mut config);
        let server = Server::open(config, false).await.unwrap();
        let state = server.state();
        Rig {
            _dir: dir,
            _server: server,
            state,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Starts a session of `user` over a duplex of `buffer` bytes each way
    /// and reads its `welcome`.
    async fn connect(&self, user: &str, expires_at: Option<u64>, buffer: usize) -> Conn {
        let (client, server) = tokio::io::duplex(buffer);
        let config = &self.state.config;
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(config.max_message_bytes))
            .max_frame_size(Some(config.max_message_bytes));
        let ws = WebSocketStream::from_raw_socket(server, Role::Server, Some(ws_config)).await;
        let mut principal = Principal::dev(Arc::from(user));
        principal.expires_at = expires_at;
        let remote: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let limits = &self.state.limits;
        let slots = Slots {
            permit: self
                .state
                .connection_permits
                .clone()
                .try_acquire_owned()
                .unwrap(),
            ip: limits.connections_per_ip.acquire(remote.ip()).unwrap(),
            user: limits
                .connections_per_user
                .acquire(principal.user.clone())
                .unwrap(),
        };
        let id = self.state.next_session.fetch_add(1, Ordering::Relaxed);
        self.state.metrics.connections_open.inc();
        let session = Session::new(
            ws,
            id,
            Identity { principal, remote },
            slots,
            self.state.clone(),
            self.shutdown.clone(),
            |_| {},
        );
        let task = self.tracker.spawn(session.run(Vec::new()));
        let mut peer = Peer {
            io: client,
            buf: Vec::new(),
        };
        assert_eq!(peer.json().await["type"], "welcome");
        Conn { peer, task, id }
    }
}

struct Conn {
    peer: Peer,
    task: JoinHandle<CloseReason>,
    id: u64,
}

impl Conn {
    /// Reads up to the close frame, checks its code and why the session
    /// ended; returns the text frames before the close.
    async fn closed_for(mut self, reason: CloseReason) -> Vec<Value> {
        let (texts, code) = self.peer.until_close().await;
        assert_eq!(code, code_of(reason), "{texts:?}");
        assert_eq!(self.ended().await, reason);
        texts
    }

    /// Answers the close, as a client does, and waits for the session to
    /// end (the session lingers for that answer); returns why it ended.
    async fn ended(mut self) -> CloseReason {
        let answer = [0x88, 0x80, 0, 0, 0, 0];
        // The session may be gone already: then the answer fails.
        let _ = spin(self.peer.io.write_all(&answer)).await;
        spin(self.task).await.unwrap()
    }
}

/// What the peer reads: a frame's opcode and payload.
type Frame = (u8, Vec<u8>);

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// The client's end: writes masked frames, parses the server's.
struct Peer {
    io: DuplexStream,
    buf: Vec<u8>,
}

impl Peer {
    async fn write_frame(&mut self, op: u8, payload: &[u8]) {
        let mask = [0x5a, 0x17, 0xc3, 0x8e];
        let mut frame = vec![0x80 | op];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        spin(self.io.write_all(&frame)).await.unwrap();
    }

    async fn request(&mut self, request: Value) {
        self.write_frame(OP_TEXT, request.to_string().as_bytes())
            .await;
    }

    /// One whole server frame from `buf`, if it holds one.
    fn parse(&mut self) -> Option<Frame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        assert_eq!(b[1] & 0x80, 0, "a server frame is never masked");
        let (len, at) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => (
                usize::try_from(u64::from_be_bytes(b[2..10].try_into().unwrap())).unwrap(),
                10,
            ),
            126 | 127 => return None,
            n => (usize::from(n), 2),
        };
        if b.len() < at + len {
            return None;
        }
        let frame = (b[0] & 0x0f, b[at..at + len].to_vec());
        self.buf.drain(..at + len);
        Some(frame)
    }

    /// The next frame, the clock still. Panics at the end of the stream.
    async fn frame(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.parse() {
                return frame;
            }
            let n = spin(self.io.read_buf(&mut self.buf)).await.unwrap();
            assert!(n > 0, "the stream ended before a frame");
        }
    }

    /// The next text frame, as JSON, passing over pings.
    async fn json(&mut self) -> Value {
        loop {
            match self.frame().await {
                (OP_TEXT, text) => return serde_json::from_slice(&text).unwrap(),
                (OP_PING, _) => {}
                (OP_CLOSE, p) => panic!("closed: {:?}", close_code(&p)),
                (op, _) => panic!("unexpected opcode {op}"),
            }
        }
    }

    /// Whether nothing is there to read, the clock still.
    async fn is_quiet(&mut self) -> bool {
        let read = futures_util::poll!(std::pin::pin!(self.io.read_buf(&mut self.buf)));
        read.is_pending() && self.buf.is_empty()
    }

    /// The text frames up to the close frame, and the close code.
    async fn until_close(&mut self) -> (Vec<Value>, u16) {
        let mut texts = Vec::new();
        loop {
            match self.frame().await {
                (OP_TEXT, text) => texts.push(serde_json::from_slice(&text).unwrap()),
                (OP_CLOSE, p) => return (texts, close_code(&p)),
                _ => {}
            }
        }
    }
}

fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// The close code a reason is documented with.
fn code_of(reason: CloseReason) -> u16 {
    reason.code().unwrap().code
}

/// The acks among `frames`, by request id.
fn acked(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["type"] == "ack")
        .map(|f| f["id"].as_u64().unwrap())
        .collect()
}

async fn join(peer: &mut Peer, room: &str) {
    peer.request(json!({"type": "join", "id": 1, "room": room}))
        .await;
    assert_eq!(peer.json().await["type"], "joined");
}

/// Sends `count` messages with ids from 100, then waits until the session
/// has handed all of them to the store (not for their acks).
async fn send_unacked(rig: &Rig, peer: &mut Peer, room: &str, count: u64) {
    let before = rig.state.metrics.messages_received.get();
    for i in 0..count {
        peer.request(json!({"type": "send", "id": 100 + i, "room": room, "body": {"n": i}}))
            .await;
    }
    spin(std::future::poll_fn(|cx| {
        if rig.state.metrics.messages_received.get() >= before + count {
            std::task::Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }))
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_gets_a_ping_then_the_heartbeat_close() {
    let rig = Rig::new(|c| c.heartbeat_interval_ms = 1000).await;
    let mut conn = rig.connect("alice", None, BUFFER).await;
    // The ping's time, then its wait for traffic to ride with.
    let due = super::engine::first_ping(conn.id, Duration::from_millis(1000));
    tokio::time::advance(due).await;
    settle_tasks().await;
    assert!(conn.peer.is_quiet().await, "owed, not sent yet");
    tokio::time::advance(Duration::from_millis(100)).await;
    settle_tasks().await;
    assert_eq!(conn.peer.frame().await.0, OP_PING);
    // The peer answers nothing: one more interval is two without a frame.
    tokio::time::advance(Duration::from_millis(1000)).await;
    let texts = conn.closed_for(CloseReason::HeartbeatTimeout).await;
    assert!(texts.is_empty(), "{texts:?}");
}

/// A ping due while room traffic flows goes out with it, in its wait, and
/// not again alone at the wait's end; the next is an interval after.
#[tokio::test(start_paused = true)]
async fn a_ping_rides_with_the_room_traffic_of_its_wait() {
    let rig = Rig::new(|c| c.heartbeat_interval_ms = 1000).await;
    let mut conn = rig.connect("alice", None, BUFFER).await;
    join(&mut conn.peer, "r").await;
    let due = super::engine::first_ping(conn.id, Duration::from_millis(1000));
    tokio::time::advance(due).await;
    settle_tasks().await;
    assert!(conn.peer.is_quiet().await, "owed, not sent yet");
    // Traffic in the wait: the session's own message comes back to it.
    tokio::time::advance(Duration::from_millis(50)).await;
    send_unacked(&rig, &mut conn.peer, "r", 1).await;
    let mut frames = Vec::new();
    while frames.len() < 3 {
        let (op, payload) = conn.peer.frame().await;
        let kind = match op {
            OP_PING => "ping".to_owned(),
            _ => serde_json::from_slice::<Value>(&payload).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned(),
        };
        frames.push(kind);
    }
    frames.sort();
    assert_eq!(frames, ["ack", "message", "ping"]);
    // The wait's end sends nothing more; the next ping is an interval on.
    tokio::time::advance(Duration::from_millis(100)).await;
    settle_tasks().await;
    assert!(conn.peer.is_quiet().await, "a second ping");
    tokio::time::advance(Duration::from_millis(1000)).await;
    settle_tasks().await;
    assert_eq!(conn.peer.frame().await.0, OP_PING);
}

#[tokio::test(start_paused = true)]
async fn an_expiring_token_is_warned_of_then_closes_4001() {
    let rig = Rig::new(|c| c.token_expiry_warning_secs = WARNING_SECS).await;
    let expires_at = crate::auth::now_unix() + TOKEN_SECS;
    let mut conn = rig.connect("alice", Some(expires_at), BUFFER).await;
    // Before the warning time, nothing.
    tokio::time::advance(Duration::from_secs(TOKEN_SECS - WARNING_SECS - 1)).await;
    settle_tasks().await;
    assert!(conn.peer.is_quiet().await);
    tokio::time::advance(Duration::from_secs(2)).await;
    let warning = conn.peer.json().await;
    assert_eq!(warning["type"], "token_expiring");
    assert_eq!(warning["expires_at"], expires_at);
    tokio::time::advance(Duration::from_secs(TOKEN_SECS + 1)).await;
    let texts = conn.closed_for(CloseReason::Unauthorized).await;
    assert!(texts.is_empty(), "{texts:?}");
    assert_eq!(code_of(CloseReason::Unauthorized), 4001);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_is_closed_as_a_slow_consumer() {
    let rig = Rig::new(|_| {}).await;
    let mut conn = rig.connect("alice", None, 4096).await;
    join(&mut conn.peer, "r").await;
    // Room traffic far beyond what the duplex holds; the peer reads none.
    let body = format!("\"{}\"", "x".repeat(1000));
    let mut replies = Vec::new();
    for _ in 0..32 {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let append = crate::history::Append {
            room: Arc::from("r"),
            from: Arc::from("bob"),
            body: serde_json::value::RawValue::from_string(body.clone()).unwrap(),
            key: None,
            reply,
        };
        spin(rig.state.store.append(append)).await.unwrap();
        replies.push(rx);
    }
    for rx in replies {
        spin(rx).await.unwrap().unwrap();
    }
    settle_tasks().await;
    assert!(!conn.task.is_finished());
    // The write that the peer does not take misses its deadline.
    tokio::time::advance(rig.state.config.write_timeout() + Duration::from_millis(1)).await;
    settle_tasks().await;
    // The peer reads again: what was written, then the close.
    let texts = conn.closed_for(CloseReason::SlowConsumer).await;
    assert!(texts.iter().all(|t| t["type"] == "message"), "{texts:?}");
    assert!(texts.len() < 32, "all {} were written", texts.len());
    assert_eq!(code_of(CloseReason::SlowConsumer), 4100);
}

#[tokio::test(start_paused = true)]
async fn replies_leave_in_request_order_and_a_read_sees_the_send_before_it() {
    let rig = Rig::new(|_| {}).await;
    let mut conn = rig.connect("alice", None, BUFFER).await;
    join(&mut conn.peer, "r").await;
    let peer = &mut conn.peer;
    peer.request(json!({"type": "send", "id": 2, "room": "r", "body": {"text": "one"}}))
        .await;
    peer.request(json!({"type": "history", "id": 3, "room": "r"}))
        .await;
    peer.request(json!({"type": "ping", "id": 4})).await;
    let mut frames = Vec::new();
    while frames.len() < 3 {
        let frame = peer.json().await;
        // The session's own message comes back as room traffic too.
        if frame["type"] != "message" {
            frames.push(frame);
        }
    }
    let kinds: Vec<&Value> = frames.iter().map(|f| &f["type"]).collect();
    assert_eq!(kinds, ["ack", "history", "pong"], "{frames:?}");
    assert_eq!(frames[0]["id"], 2);
    let seq = frames[0]["seq"].as_u64().unwrap();
    let messages = frames[1]["messages"].as_array().unwrap();
    assert_eq!(messages.last().unwrap()["seq"], seq, "{frames:?}");
    assert_eq!(messages.last().unwrap()["body"]["text"], "one");
}

#[tokio::test(start_paused = true)]
async fn a_kick_writes_the_acks_of_accepted_sends_before_the_close() {
    let rig = Rig::new(|_| {}).await;
    let mut conn = rig.connect("alice", None, BUFFER).await;
    join(&mut conn.peer, "r").await;
    send_unacked(&rig, &mut conn.peer, "r", 3).await;
    assert!(rig.state.hub.close_session(conn.id, CloseReason::Kicked));
    let texts = conn.closed_for(CloseReason::Kicked).await;
    assert_eq!(acked(&texts), [100, 101, 102], "{texts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_close_writes_the_acks_of_accepted_sends_before_the_close() {
    let rig = Rig::new(|c| {
        // Rate limits are off in dev mode: a token key turns it off.
        c.auth_hs256_secret = Some(crate::config::Secret::new("k".repeat(32)));
        c.send_rate_per_session = Rate::new(1, 2);
        c.rate_limit_strikes = 1;
    })
    .await;
    let mut conn = rig.connect("alice", None, BUFFER).await;
    join(&mut conn.peer, "r").await;
    send_unacked(&rig, &mut conn.peer, "r", 2).await;
    // Over the burst: the first refusal is the last strike.
    conn.peer
        .request(json!({"type": "send", "id": 200, "room": "r", "body": {}}))
        .await;
    let texts = conn.closed_for(CloseReason::RateLimited).await;
    assert_eq!(acked(&texts), [100, 101], "{texts:?}");
    assert!(texts.iter().all(|t| t["type"] != "error"), "{texts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_token_expiry_writes_the_acks_of_accepted_sends_before_the_close() {
    let rig = Rig::new(|c| c.token_expiry_warning_secs = WARNING_SECS).await;
    let expires_at = crate::auth::now_unix() + TOKEN_SECS;
    let mut conn = rig.connect("alice", Some(expires_at), BUFFER).await;
    join(&mut conn.peer, "r").await;
    tokio::time::advance(Duration::from_secs(TOKEN_SECS - WARNING_SECS + 1)).await;
    assert_eq!(conn.peer.json().await["type"], "token_expiring");
    send_unacked(&rig, &mut conn.peer, "r", 3).await;
    tokio::time::advance(Duration::from_secs(TOKEN_SECS + 1)).await;
    let texts = conn.closed_for(CloseReason::Unauthorized).await;
    assert_eq!(acked(&texts), [100, 101, 102], "{texts:?}");
}

/// The size of what `f` returns, without calling it.
fn returned_size<F, A, B, R>(_: &F) -> usize
where
    F: FnOnce(A, B) -> R,
{
    std::mem::size_of::<R>()
}

/// Every idle connection holds one session future for its whole life, so
/// its size is memory per connection, and a few bytes can cost hundreds:
/// the task is allocated in jemalloc's size classes (…, 3072, 3584, 4096),
/// so 16 bytes more can move every idle TLS connection's task up a class
/// (about 620 bytes each, as `bench/idle-rss.sh` shows). The bounds are
/// the sizes on x86_64 (2232 and 3416 bytes); a change that makes the
/// future larger must say why here.
#[test]
fn the_session_future_is_no_larger_than_before() {
    type Plain = crate::net::Peeked<tokio::net::TcpStream>;
    type Tls = crate::net::Peeked<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;
    let plain = returned_size(&Session::<Plain>::run);
    let tls = returned_size(&Session::<Tls>::run);
    assert!(plain <= 2232, "a plain session's future is {plain} bytes");
    assert!(tls <= 3416, "a TLS session's future is {tls} bytes");
}
