//! The Rust client crate (`switchboard-client`) against real servers: the
//! real binary SIGKILLed and restarted on the same port and data dir while
//! two clients keep chatting; a resume with `recovered: false` filled from
//! history (and reported as a gap past the client's bound); a send whose ack
//! was lost, resent with its key across a restart and stored once; token
//! refresh and the 401 stop; sends the store refuses as `unavailable` (a
//! full disk, as in `disk.rs`) resent with their keys and stored once.
//!
//! Connections are cut with a TCP relay on loopback, so the network fault is
//! real; processes are stopped only by the PID this test started.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use protocol::ServerFrame;
use switchboard::auth::now_unix;
use switchboard::config::{Rate, Secret};
use switchboard_client::{
    BackoffPolicy, Client, Disconnect, Error, Event, Events, Message, Options, Source, State,
    tls_with_ca_file,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::support::{DEADLINE, Fixture, Process, TestServer, json, wait_until};

/// Quick retries: the tests wait for reconnects, and loopback is fast.
fn fast_backoff() -> BackoffPolicy {
    BackoffPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        at_once_jitter: Duration::from_millis(20),
        ..BackoffPolicy::default()
    }
}

fn options(fixture: &Fixture, addr: SocketAddr, user: &str) -> Options {
    let mut o = Options::new(format!("wss://localhost:{}/ws?user={user}", addr.port()));
    o.resolve = Some(addr);
    o.tls = Some(tls_with_ca_file(&fixture.ca_path()).expect("ca"));
    o.backoff = fast_backoff();
    o
}

/// Waits until the client's state satisfies `pred`.
async fn wait_state(client: &Client, what: &str, pred: impl Fn(&State) -> bool) {
    let mut state = client.state();
    tokio::time::timeout(DEADLINE, state.wait_for(|s| pred(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("client alive");
}

fn connected(s: &State) -> bool {
    matches!(s, State::Connected { .. })
}

fn disconnected(s: &State) -> bool {
    matches!(s, State::Disconnected { .. })
}

/// Reads events until `room` has delivered `count` messages; fails on a
/// duplicate, a seq out of order or a gap.
async fn transcript(events: &mut Events, room: &str, count: usize) -> Vec<Message> {
    let mut got: Vec<Message> = Vec::new();
    while got.len() < count {
        let event = tokio::time::timeout(DEADLINE, events.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} messages, then nothing", got.len()))
            .expect("events open");
        match event {
            Event::Message(m) if m.room == room => {
                if let Some(prev) = got.last() {
                    assert_eq!(m.seq, prev.seq + 1, "out of order or duplicate: {m:?}");
                }
                got.push(m);
            }
            Event::Gap { .. } => panic!("unexpected {event:?}"),
            _ => {}
        }
    }
    got
}

fn text(m: &Message) -> String {
    m.body
        .as_ref()
        .map(|b| b.get().to_owned())
        .unwrap_or_default()
}

/// Messages each client sends in the crash test.
const PER_CLIENT: usize = 150;
/// Sends each client keeps in flight.
const WINDOW: usize = 8;

/// Sends `PER_CLIENT` numbered messages, `WINDOW` at a time, counting acks
/// in `acked`; returns body -> ack.
async fn send_many(
    client: Client,
    who: &'static str,
    acked: Arc<AtomicUsize>,
) -> BTreeMap<String, switchboard_client::Ack> {
    let mut out = BTreeMap::new();
    let mut inflight = tokio::task::JoinSet::new();
    for n in 0..PER_CLIENT {
        if inflight.len() >= WINDOW {
            let (body, ack) = inflight.join_next().await.expect("some").expect("task");
            out.insert(body, ack);
        }
        let c = client.clone();
        let acked = Arc::clone(&acked);
        inflight.spawn(async move {
            let body = format!("\"{who}-{n}\"");
            let ack = c.send("lobby", json(&body)).await.expect("acked");
            acked.fetch_add(1, Ordering::Relaxed);
            (body, ack)
        });
    }
    while let Some(r) = inflight.join_next().await {
        let (body, ack) = r.expect("task");
        out.insert(body, ack);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_chat_through_a_sigkill_and_restart_and_agree() {
    let fixture = Fixture::new();
    let server = Process::start(&fixture).await;
    let addr = server.addr;
    let (alice, mut alice_events) = Client::start(options(&fixture, addr, "alice"));
    let (bob, mut bob_events) = Client::start(options(&fixture, addr, "bob"));
    alice.join("lobby").await.expect("alice joins");
    bob.join("lobby").await.expect("bob joins");
    let total = 2 * PER_CLIENT;
    let alice_log =
        tokio::spawn(async move { transcript(&mut alice_events, "lobby", total).await });
    let bob_log = tokio::spawn(async move { transcript(&mut bob_events, "lobby", total).await });
    let acked = Arc::new(AtomicUsize::new(0));
    let alice_sends = tokio::spawn(send_many(alice.clone(), "alice", Arc::clone(&acked)));
    let bob_sends = tokio::spawn(send_many(bob.clone(), "bob", Arc::clone(&acked)));

    // Kill the server mid-conversation.
    wait_until("a third of the sends acked", || {
        acked.load(Ordering::Relaxed) >= total / 3
    })
    .await;
    server.kill().await;
    let at_kill = acked.load(Ordering::Relaxed);
    wait_state(&alice, "alice to see the crash", disconnected).await;
    wait_state(&bob, "bob to see the crash", disconnected).await;
    // Both keep sending while the server is down: the sends wait.
    let restarted = Process::start_on(&fixture, addr, |_| {}).await;
    assert_eq!(restarted.addr, addr);
    wait_state(&alice, "alice back", connected).await;
    wait_state(&bob, "bob back", connected).await;

    let deadline = DEADLINE * 2;
    let alice_acks = tokio::time::timeout(deadline, alice_sends)
        .await
        .expect("alice's sends")
        .expect("task");
    let bob_acks = tokio::time::timeout(deadline, bob_sends)
        .await
        .expect("bob's sends")
        .expect("task");
    assert!(
        at_kill < total,
        "the kill came mid-conversation ({at_kill} acks)"
    );
    let alice_seen = alice_log.await.expect("alice's transcript");
    let bob_seen = bob_log.await.expect("bob's transcript");

    // The same transcript, seqs 1..=total without a gap, each message once.
    let view =
        |log: &[Message]| -> Vec<(u64, String)> { log.iter().map(|m| (m.seq, text(m))).collect() };
    assert_eq!(
        view(&alice_seen),
        view(&bob_seen),
        "the two transcripts differ"
    );
    let seqs: Vec<u64> = alice_seen.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
    let bodies: HashSet<String> = alice_seen.iter().map(text).collect();
    assert_eq!(bodies.len(), total, "a message appears twice");
    // Every send appears, at the seq its ack gave.
    let by_seq: BTreeMap<u64, String> = alice_seen.iter().map(|m| (m.seq, text(m))).collect();
    for (body, ack) in alice_acks.iter().chain(bob_acks.iter()) {
        assert_eq!(
            by_seq.get(&ack.seq),
            Some(body),
            "{body} not at its acked seq {}",
            ack.seq
        );
    }
    assert_eq!(alice_acks.len() + bob_acks.len(), total);
    alice.close().await;
    bob.close().await;
    restarted.kill().await;
}

/// A TCP relay from the client to the server that the test can cut
/// (dropping every connection and refusing new ones) or mute (discarding
/// what the server sends), and that counts the `unavailable` refusals the
/// server writes: what the application never sees, the test still can.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    mute: Arc<AtomicBool>,
    unavailable: Arc<AtomicUsize>,
    conns: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let relay = Relay {
            addr: listener.local_addr().expect("addr"),
            open: Arc::new(AtomicBool::new(true)),
            mute: Arc::new(AtomicBool::new(false)),
            unavailable: Arc::new(AtomicUsize::new(0)),
            conns: Arc::new(std::sync::Mutex::new(CancellationToken::new())),
            stop: CancellationToken::new(),
        };
        let (open, mute, count, conns, stop) = (
            Arc::clone(&relay.open),
            Arc::clone(&relay.mute),
            Arc::clone(&relay.unavailable),
            Arc::clone(&relay.conns),
            relay.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                if !open.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let cut = conns.lock().expect("lock").clone();
                let (mute, count) = (Arc::clone(&mute), Arc::clone(&count));
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = pipe(client, server, mute, count) => {}
                    }
                });
            }
        });
        relay
    }

    /// Drops every connection and refuses new ones until [`Relay::reopen`].
    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        let mut conns = self.conns.lock().expect("lock");
        conns.cancel();
        *conns = CancellationToken::new();
    }

    fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    fn mute(&self, on: bool) {
        self.mute.store(on, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
        self.conns.lock().expect("lock").cancel();
    }
}

/// Copies both ways until either side ends; bytes from the server are
/// discarded while `mute` is set. Counts `"code":"unavailable"` in what the
/// server sends (server frames are not masked, and the server compresses
/// none).
async fn pipe(
    client: TcpStream,
    server: TcpStream,
    mute: Arc<AtomicBool>,
    unavailable: Arc<AtomicUsize>,
) {
    const NEEDLE: &[u8] = br#""code":"unavailable""#;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        // The end of the previous read, so a needle split by a read counts.
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut seen = std::mem::take(&mut tail);
            seen.extend_from_slice(&buf[..n]);
            let found = seen.windows(NEEDLE.len()).filter(|w| *w == NEEDLE).count();
            unavailable.fetch_add(found, Ordering::SeqCst);
            tail = seen[seen.len().saturating_sub(NEEDLE.len() - 1)..].to_vec();
            if !mute.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_without_recovery_pages_history_or_reports_the_gap() {
    const CAP: u64 = 5;
    const MISSED: u64 = 30;
    let server = TestServer::start_with(Fixture::new(), |c| c.replay_cap = CAP).await;
    let relay = Relay::start(server.addr).await;
    let mut o = options(&server.fixture, relay.addr, "alice");
    // Small pages, so the fill takes several.
    o.fill_page = 7;
    let (alice, mut alice_events) = Client::start(o);
    let mut o = options(&server.fixture, relay.addr, "carol");
    o.max_fill = 10;
    let (carol, mut carol_events) = Client::start(o);
    alice.join("r").await.expect("join");
    carol.join("r").await.expect("join");
    let mut bob = server.connect("bob").await;
    bob.join("r").await;
    for i in 1..=3 {
        bob.say("r", &format!("{i}")).await;
    }
    assert_eq!(transcript(&mut alice_events, "r", 3).await.len(), 3);
    assert_eq!(transcript(&mut carol_events, "r", 3).await.len(), 3);

    relay.cut();
    wait_state(&alice, "alice cut off", disconnected).await;
    wait_state(&carol, "carol cut off", disconnected).await;
    for i in 4..=3 + MISSED {
        bob.say("r", &format!("{i}")).await;
    }
    relay.reopen();
    let last = 3 + MISSED;
    // Each resumes without recovery, and at once (before anything new is
    // sent) alice pages the gap from history and carol reports it.
    for events in [&mut alice_events, &mut carol_events] {
        let joined = loop {
            let event = tokio::time::timeout(DEADLINE, events.next())
                .await
                .expect("event")
                .expect("open");
            if let Event::Joined(j) = event {
                break j;
            }
        };
        assert_eq!(
            (joined.recovered, joined.seq),
            (Some(false), last),
            "{joined:?}"
        );
    }
    let filled = transcript(&mut alice_events, "r", MISSED as usize).await;
    let seqs: Vec<u64> = filled.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (4..=last).collect::<Vec<_>>());
    for m in &filled {
        assert_eq!(text(m), m.seq.to_string(), "body of {}", m.seq);
        assert_eq!(m.source, Source::History, "source of {}", m.seq);
    }
    let gap = tokio::time::timeout(DEADLINE, carol_events.next())
        .await
        .expect("event")
        .expect("open");
    assert_eq!(
        gap,
        Event::Gap {
            room: "r".into(),
            first: 4,
            last
        }
    );

    // Then both go on live, each message once.
    bob.say("r", &format!("{}", last + 1)).await;
    bob.say("r", &format!("{}", last + 2)).await;
    for events in [&mut alice_events, &mut carol_events] {
        let seen = transcript(events, "r", 2).await;
        let seqs: Vec<(u64, Source)> = seen.iter().map(|m| (m.seq, m.source)).collect();
        assert_eq!(
            seqs,
            vec![(last + 1, Source::Live), (last + 2, Source::Live)]
        );
    }
    alice.close().await;
    carol.close().await;
    drop(relay);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_ack_was_lost_is_resent_across_a_restart_and_stored_once() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let relay = Relay::start(addr).await;
    let (alice, mut alice_events) = Client::start(options(&server.fixture, relay.addr, "alice"));
    alice.join("k").await.expect("join");
    let mut bob = server.connect("bob").await;
    bob.join("k").await;

    // The server stores the message, but its ack never reaches alice.
    relay.mute(true);
    let sender = alice.clone();
    let send = tokio::spawn(async move { sender.send("k", json("\"once\"")).await });
    let ServerFrame::Message { seq, body, .. } = bob.next_message("k").await else {
        unreachable!()
    };
    assert_eq!((seq, body.get()), (1, "\"once\""));
    drop(bob);

    // Restart the server on the same address and data dir.
    let fixture = server.stop().await;
    wait_state(&alice, "alice to lose the session", disconnected).await;
    relay.mute(false);
    let server = TestServer::start_with(fixture, |c| c.listen = addr).await;

    let ack = tokio::time::timeout(DEADLINE, send)
        .await
        .expect("acked within the deadline")
        .expect("task")
        .expect("acked");
    assert_eq!((ack.seq, ack.duplicate), (1, true), "{ack:?}");
    // Stored once; alice sees it once (replayed on resume).
    let seen = transcript(&mut alice_events, "k", 1).await;
    assert_eq!((seen[0].seq, text(&seen[0])), (1, "\"once\"".to_owned()));
    let page = alice
        .history("k", switchboard_client::HistoryQuery::default())
        .await
        .expect("history");
    assert_eq!(page.messages.len(), 1, "{page:?}");
    alice
        .send("k", json("\"twice\""))
        .await
        .expect("a new send");
    assert_eq!(transcript(&mut alice_events, "k", 1).await[0].seq, 2);
    alice.close().await;
    drop(relay);
    server.stop().await;
}

const SECRET: &str = "client-test-secret-at-least-32-bytes-long";

fn token(user: &str, ttl: u64) -> String {
    let claims = serde_json::json!({"sub": user, "exp": now_unix() + ttl, "grants": ["*:rw"]});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_provider_is_called_at_connect_and_on_token_expiring_and_401_stops() {
    // Warn an hour ahead: a first token valid for 10 minutes is warned at
    // once; the refreshed one, valid for two hours, is not.
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.auth_hs256_secret = Some(Secret::new(SECRET));
        c.handshake_rate_per_ip = Rate::OFF;
        c.token_expiry_warning_secs = 3600;
    })
    .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let o = options(&server.fixture, server.addr, "ignored").with_token_provider(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, std::io::Error>(token("alice", if n == 0 { 600 } else { 7200 })) }
    });
    let (alice, mut events) = Client::start(o);
    alice
        .join("general")
        .await
        .expect("join with the first token");
    let refreshed = loop {
        match tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("event")
            .expect("open")
        {
            Event::TokenRefreshed { expires_at } => break expires_at,
            Event::TokenRefreshFailed { reason } => panic!("refresh failed: {reason}"),
            _ => {}
        }
    };
    assert!(
        refreshed > now_unix() + 3600,
        "the second token is in force"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    alice
        .send("general", json("1"))
        .await
        .expect("send after refresh");
    alice.close().await;

    // A refused token is HTTP 401: the client stops and says why.
    let o = options(&server.fixture, server.addr, "ignored")
        .with_token_provider(|| async { Ok::<_, std::io::Error>("not-a-token".to_owned()) });
    let (mallory, _events) = Client::start(o);
    wait_state(&mallory, "mallory refused", |s| {
        matches!(
            s,
            State::Disconnected {
                reason: Disconnect::Refused { status: 401, .. },
                retry_in: None
            }
        )
    })
    .await;
    let err = mallory.join("general").await.expect_err("stopped");
    assert!(
        matches!(err, Error::Stopped(Disconnect::Refused { status: 401, .. })),
        "{err}"
    );
    mallory.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_code_that_forbids_reconnecting_stops_the_client() {
    // 1009: a frame over the server's size limit. The client must not
    // reconnect; what waits fails with the close.
    let server = TestServer::start_with(Fixture::new(), |c| c.max_message_bytes = 1024).await;
    let (alice, _events) = Client::start(options(&server.fixture, server.addr, "alice"));
    alice.join("r").await.expect("join");
    let big = format!("\"{}\"", "x".repeat(4096));
    let err = alice.send("r", json(&big)).await.expect_err("closed");
    assert!(
        matches!(err, Error::Stopped(Disconnect::Closed { code: 1009, .. })),
        "{err}"
    );
    assert!(matches!(
        &*alice.state().borrow(),
        State::Disconnected { retry_in: None, .. }
    ));
    alice.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_that_times_out_names_its_key_and_a_resend_with_it_is_stored_once() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr).await;
    let mut o = options(&server.fixture, relay.addr, "alice");
    o.send_timeout = Duration::from_millis(300);
    o.request_timeout = Duration::from_millis(300);
    let (alice, _events) = Client::start(o);
    alice.join("k").await.expect("join");

    // Offline, a send waits for a connection until its timeout, then is
    // withdrawn; other requests time out the same way.
    relay.cut();
    wait_state(&alice, "alice cut off", disconnected).await;
    let err = tokio::time::timeout(DEADLINE, alice.send("k", json("\"late\"")))
        .await
        .expect("the send's own timeout comes first")
        .expect_err("timeout");
    let Error::SendTimeout { key, .. } = err else {
        panic!("expected a send timeout, got {err}")
    };
    let err = alice
        .history("k", switchboard_client::HistoryQuery::default())
        .await
        .expect_err("timeout");
    assert!(matches!(err, Error::Timeout(_)), "{err}");

    relay.reopen();
    wait_state(&alice, "alice back", connected).await;
    let page = alice
        .history("k", switchboard_client::HistoryQuery::default())
        .await
        .expect("history");
    assert!(
        page.messages.is_empty(),
        "a withdrawn send went out: {page:?}"
    );
    // The application resends with the key the timeout named: stored once.
    let first = alice
        .send_with_key("k", json("\"late\""), key.clone())
        .await
        .expect("acked");
    let again = alice
        .send_with_key("k", json("\"late\""), key)
        .await
        .expect("acked");
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!((again.seq, again.duplicate), (1, true));
    alice.close().await;
    drop(relay);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_is_retried_with_backoff_until_it_has_room() {
    // One connection allowed: the second client is refused with 503 and
    // backs off, then gets in once the first leaves.
    let server = TestServer::start_with(Fixture::new(), |c| c.max_connections = 1).await;
    let (alice, _alice_events) = Client::start(options(&server.fixture, server.addr, "alice"));
    alice.join("r").await.expect("join");
    let (bob, mut bob_events) = Client::start(options(&server.fixture, server.addr, "bob"));
    wait_state(&bob, "bob refused and backing off", |s| {
        matches!(
            s,
            State::Disconnected {
                reason: Disconnect::Refused { status: 503, .. },
                retry_in: Some(_)
            }
        )
    })
    .await;
    // A join made meanwhile waits for the connection.
    let joining = {
        let bob = bob.clone();
        tokio::spawn(async move { bob.join("r").await })
    };
    alice.close().await;
    let joined = tokio::time::timeout(DEADLINE, joining)
        .await
        .expect("bob joins within the deadline")
        .expect("task")
        .expect("joined");
    assert_eq!(joined.presence, vec!["bob".to_owned()]);
    bob.send("r", json("\"in\"")).await.expect("send");
    assert_eq!(
        text(&transcript(&mut bob_events, "r", 1).await[0]),
        "\"in\""
    );
    bob.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_reach_the_application() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = Client::start(options(&server.fixture, server.addr, "alice"));
    let joined = alice.join("r").await.expect("join");
    assert_eq!(joined.presence, vec!["alice".to_owned()]);
    let (bob, _bob_events) = Client::start(options(&server.fixture, server.addr, "bob"));
    bob.join("r").await.expect("join");
    bob.typing("r").await.expect("typing");
    let (mut arrived, mut typed) = (false, false);
    while !(arrived && typed) {
        match tokio::time::timeout(DEADLINE, alice_events.next())
            .await
            .expect("event")
            .expect("open")
        {
            Event::Presence { room, joined, .. }
                if room == "r" && joined.contains(&"bob".to_owned()) =>
            {
                arrived = true
            }
            Event::Typing { room, users, .. } if room == "r" && users == ["bob"] => typed = true,
            _ => {}
        }
    }
    alice.close().await;
    bob.close().await;
    server.stop().await;
}

/// A padded body like the disk tests', so that it needs the space the
/// full disk does not have.
fn padded(who: &str, i: usize) -> protocol::Body {
    json(&format!(
        r#"{{"who":"{who}","i":{i},"pad":"{}"}}"#,
        "x".repeat(crate::disk::PAD)
    ))
}

/// Sends the application makes while the store answers `unavailable`.
const WHILE_FULL: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_refused_as_unavailable_are_stored_once_when_the_store_recovers() {
    let disk = crate::disk::Tmpfs::mount();
    let tweak = crate::disk::tweak(&disk);
    let server = TestServer::start_with(Fixture::new(), |c| {
        tweak(c);
        c.plain_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let relay = Relay::start(server.plain_addr.expect("plain listener")).await;
    let mut o = Options::new(format!(
        "ws://127.0.0.1:{}/ws?user=alice",
        relay.addr.port()
    ));
    o.backoff = fast_backoff();
    let (alice, mut alice_events) = Client::start(o);
    alice.join("disk").await.expect("alice joins");

    // Bob fills the disk: he sends until the store refuses, then the last
    // of the space goes to a second filler.
    let mut bob = server.connect("bob").await;
    bob.join("disk").await;
    disk.fill_leaving(crate::disk::HEADROOM);
    let mut stored_by_bob = 0;
    loop {
        let reply = bob
            .request(protocol::ClientRequest::Send {
                room: "disk".into(),
                body: padded("bob", stored_by_bob),
                key: Some(format!("bob-{stored_by_bob}")),
            })
            .await;
        match reply {
            ServerFrame::Ack { .. } => stored_by_bob += 1,
            ServerFrame::Error {
                code: protocol::ErrorCode::Unavailable,
                ..
            } => break,
            other => panic!("bob's send {stored_by_bob}: {other:?}"),
        }
        assert!(stored_by_bob < 5000, "the disk never filled");
    }
    disk.fill_leaving(0);

    // Alice's sends while the store refuses: each is refused at least once
    // on the wire, and none resolves, with an error or otherwise.
    let sends: Vec<_> = (0..WHILE_FULL)
        .map(|i| {
            let alice = alice.clone();
            tokio::spawn(async move { alice.send("disk", padded("alice", i)).await })
        })
        .collect();
    wait_until("the refusals to reach alice", || {
        relay.unavailable.load(Ordering::SeqCst) >= WHILE_FULL
    })
    .await;
    for (i, s) in sends.iter().enumerate() {
        assert!(
            !s.is_finished(),
            "send {i} resolved while the disk was full"
        );
    }
    assert!(
        matches!(alice.state().borrow().clone(), State::Connected { .. }),
        "a refusal is no reason to reconnect"
    );

    // Space comes back: every send is acked, once, without an error.
    disk.free_filler();
    let mut acks = Vec::new();
    for (i, s) in sends.into_iter().enumerate() {
        let ack = tokio::time::timeout(DEADLINE, s)
            .await
            .unwrap_or_else(|_| panic!("send {i} not acked once the store recovered"))
            .expect("task")
            .unwrap_or_else(|e| panic!("send {i} failed: {e}"));
        assert!(!ack.duplicate, "send {i}: nothing of it was stored before");
        acks.push(ack);
    }
    let refusals = relay.unavailable.load(Ordering::SeqCst);
    assert!(refusals >= WHILE_FULL, "{refusals} refusals");

    // The history holds each of alice's messages once, at its acked seq.
    let history = bob.history_all("disk").await;
    let alice_stored: Vec<(u64, u64)> = history
        .iter()
        .filter_map(|m| {
            let v: serde_json::Value = serde_json::from_str(m.body.as_ref()?.get()).expect("json");
            (v["who"] == "alice").then(|| (v["i"].as_u64().expect("i"), m.seq))
        })
        .collect();
    let mut expected: Vec<(u64, u64)> = acks
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64, a.seq))
        .collect();
    let mut got = alice_stored.clone();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        got, expected,
        "alice's messages in history: {alice_stored:?}"
    );
    assert_eq!(
        history.len(),
        stored_by_bob + WHILE_FULL,
        "bob's refused send was not stored, nothing twice"
    );
    // And alice received each live, once.
    let total = stored_by_bob + WHILE_FULL;
    let seen = transcript(&mut alice_events, "disk", total).await;
    assert_eq!(seen.last().map(|m| m.seq), Some(total as u64));
    alice.close().await;
    drop(relay);
    server.stop().await;
}
