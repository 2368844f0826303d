//! A cluster failing under load, end to end: real nats-server and
//! Switchboard processes on loopback, and real TLS clients that behave as a
//! resilient client must: keyed sends, a few in flight; after `unavailable`
//! or a lost connection, a resend with the same key; after a lost
//! connection, a reconnect to another node and `join {since, epoch}`.
//!
//! The faults: a node killed with SIGKILL, one NATS server of an R3 cluster
//! killed, a node drained. Afterwards every acked message is in history
//! exactly once under its key with the seq its ack gave, each room's seqs
//! are dense, and every client saw every seq of its rooms exactly once and
//! in order (a client that stayed on its node without a replay).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use protocol::{ClientRequest, ErrorCode, ServerFrame};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

use crate::admin::{call, http};
use crate::cluster::Node;
use crate::natsd::Nats;
use crate::support::{Client, DEADLINE, connect_tls, eventually, json};

/// The rooms every client joins and sends to, in turn.
const ROOMS: [&str; 3] = ["r0", "r1", "r2"];
/// Clients on each node.
const PER_NODE: usize = 3;
/// Sends of each client.
const SENDS: usize = 40;
/// Most sends one client has waiting for their ack.
const IN_FLIGHT: usize = 4;
/// A client sends at most one message per tick: the load lasts a while, so
/// the fault strikes in the middle of it.
const PACE: Duration = Duration::from_millis(20);
/// The longest one client's run may take (a resend of a key the dead node
/// reserved waits until the reservation is stale: 4 × the request timeout).
const RUN_BOUND: Duration = Duration::from_secs(90);

/// A client that lost its connection reconnects once the others had this
/// many more acks. More than the sends the others can have in flight, so
/// some of them were sent after the loss: the resume has messages to bring.
const REPLAY_GAP: usize = 2 * PER_NODE * IN_FLIGHT + 6;

/// Where a client may connect: a node's TLS address and its CA.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: TlsConnector,
}

impl Target {
    fn of(node: &Node) -> Target {
        Target {
            addr: node.process.addr,
            tls: node.fixture.tls_connector(),
        }
    }
}

/// What the clients of one run share.
struct Shared {
    /// Acks received by every client together: the fault waits for a share.
    acks: watch::Sender<usize>,
    /// Clients with every send acked.
    done: watch::Sender<usize>,
    /// The highest acked seq of each room.
    top: Mutex<HashMap<String, u64>>,
    clients: usize,
}

impl Shared {
    fn new(clients: usize) -> Shared {
        Shared {
            acks: watch::channel(0).0,
            done: watch::channel(0).0,
            top: Mutex::new(HashMap::new()),
            clients,
        }
    }

    /// Resolves once `share` of all the run's sends are acked.
    async fn acked(&self, share: usize) {
        let mut rx = self.acks.subscribe();
        tokio::time::timeout(RUN_BOUND, rx.wait_for(|n| *n >= share))
            .await
            .expect("the load gets going")
            .expect("acks channel");
    }
}

/// A frame, or the end of the connection with its close code.
enum Got {
    Frame(ServerFrame),
    Closed(Option<u16>),
}

async fn next_frame(c: &mut Client) -> Got {
    loop {
        match c.ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return Got::Frame(
                    ServerFrame::from_json(t.as_str())
                        .unwrap_or_else(|e| panic!("bad server frame {t}: {e}")),
                );
            }
            Some(Ok(Message::Close(f))) => return Got::Closed(f.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Got::Closed(None),
        }
    }
}

/// Connects as `user` and reads the `welcome`; `None` when the node does
/// not take the connection.
async fn open(target: &Target, user: &str) -> Option<Client> {
    let url = format!("wss://localhost:{}/ws?user={user}", target.addr.port());
    let mut c = tokio::time::timeout(DEADLINE, connect_tls(target.addr, &target.tls, &url))
        .await
        .ok()?
        .ok()?;
    match tokio::time::timeout(DEADLINE, next_frame(&mut c))
        .await
        .ok()?
    {
        Got::Frame(ServerFrame::Welcome { .. }) => Some(c),
        Got::Frame(other) => panic!("expected welcome, got {other:?}"),
        Got::Closed(_) => None,
    }
}

/// One simulated client and what it saw.
struct Sim {
    idx: usize,
    user: String,
    targets: Vec<Target>,
    /// The node it is connected to.
    at: usize,
    ws: Client,
    epoch: String,
    /// The last seq seen of each room: every seq up to it was seen once.
    last: HashMap<String, u64>,
    /// How many of its `SENDS` it has made.
    made: usize,
    /// Sends to make again (after `unavailable` or a lost connection), not
    /// before their instant.
    resend: VecDeque<(Instant, String, String)>,
    /// Request id → (room, key).
    in_flight: HashMap<u64, (String, String)>,
    /// Key → (room, seq).
    acked: HashMap<String, (String, u64)>,
    reconnects: usize,
    closes: Vec<Option<u16>>,
    replayed: usize,
    /// Messages acked before a resume that the client had not seen: what
    /// the resume had to bring (as a replay, or live once the new node
    /// filled its own gap).
    missed: u64,
    unavailable: usize,
    duplicates: usize,
    counted_done: bool,
    last_ack: Option<Instant>,
    max_ack_gap: Duration,
}

impl Sim {
    /// Connects client `idx` as `user` to `targets[at]` and joins every room,
    /// which must be new (seq 0).
    async fn start(idx: usize, user: String, targets: Vec<Target>, at: usize) -> Sim {
        let ws = open(&targets[at], &user).await.expect("connect");
        let mut sim = Sim {
            idx,
            user,
            targets,
            at,
            ws,
            epoch: String::new(),
            last: HashMap::new(),
            made: 0,
            resend: VecDeque::new(),
            in_flight: HashMap::new(),
            acked: HashMap::new(),
            reconnects: 0,
            closes: Vec::new(),
            replayed: 0,
            missed: 0,
            unavailable: 0,
            duplicates: 0,
            counted_done: false,
            last_ack: None,
            max_ack_gap: Duration::ZERO,
        };
        let shared = Shared::new(0);
        for room in ROOMS {
            let (seq, epoch, _) = sim.join(room, false, &shared).await.expect("join");
            assert_eq!(seq, 0, "{room} is new");
            sim.epoch = epoch;
            sim.last.insert(room.to_owned(), 0);
        }
        sim
    }

    /// Joins `room` on the current connection (resuming after the last seq
    /// seen when `resume`); frames that arrive meanwhile are handled.
    /// Returns the `joined` frame's seq, epoch and `recovered`, or `None`
    /// when the connection ends first.
    async fn join(
        &mut self,
        room: &str,
        resume: bool,
        shared: &Shared,
    ) -> Option<(u64, String, Option<bool>)> {
        let (since, epoch) = if resume {
            (self.last.get(room).copied(), Some(self.epoch.clone()))
        } else {
            (None, None)
        };
        let id = self
            .ws
            .try_send(ClientRequest::Join {
                room: room.into(),
                since,
                epoch,
            })
            .await
            .ok()?;
        loop {
            let got = tokio::time::timeout(DEADLINE, next_frame(&mut self.ws))
                .await
                .unwrap_or_else(|_| panic!("{}: no joined for {room}", self.user));
            match got {
                Got::Frame(ServerFrame::Joined {
                    id: Some(i),
                    seq,
                    epoch,
                    recovered,
                    ..
                }) if i == id => return Some((seq, epoch, recovered)),
                Got::Frame(f) => self.handle(f, shared),
                Got::Closed(code) => {
                    self.closes.push(code);
                    return None;
                }
            }
        }
    }

    fn all_acked(&self) -> bool {
        self.made == SENDS && self.resend.is_empty() && self.in_flight.is_empty()
    }

    fn saw_all(&self, shared: &Shared) -> bool {
        let top = shared.top.lock().unwrap();
        ROOMS
            .iter()
            .all(|r| self.last[*r] >= top.get(*r).copied().unwrap_or(0))
    }

    fn state(&self) -> String {
        format!(
            "{} on node {}: made {}, in flight {}, to resend {}, acked {} ({} duplicate), last {:?}, missed {}, replayed {}, reconnects {}, closes {:?}, unavailable {}, max ack gap {:?}",
            self.user,
            self.at,
            self.made,
            self.in_flight.len(),
            self.resend.len(),
            self.acked.len(),
            self.duplicates,
            self.last,
            self.missed,
            self.replayed,
            self.reconnects,
            self.closes,
            self.unavailable,
            self.max_ack_gap
        )
    }

    /// Sends until every send is acked and every client is done, then reads
    /// on until it has seen every acked seq of its rooms.
    async fn run(mut self, shared: &Shared) -> Sim {
        let until = Instant::now() + RUN_BOUND;
        let mut pace = tokio::time::interval(PACE);
        let mut done = shared.done.subscribe();
        loop {
            if self.all_acked() {
                if !self.counted_done {
                    self.counted_done = true;
                    shared.done.send_modify(|n| *n += 1);
                }
                if *done.borrow_and_update() == shared.clients && self.saw_all(shared) {
                    return self;
                }
            }
            let can_send =
                self.in_flight.len() < IN_FLIGHT && (self.made < SENDS || !self.resend.is_empty());
            tokio::select! {
                () = tokio::time::sleep_until(until) => panic!("run not over: {}", self.state()),
                _ = pace.tick(), if can_send => self.send_one(shared).await,
                got = next_frame(&mut self.ws) => match got {
                    Got::Frame(f) => self.handle(f, shared),
                    Got::Closed(code) => self.lost(code, shared).await,
                },
                _ = done.changed() => {}
            }
        }
    }

    /// Makes one send: a resend that is due, else a new one.
    async fn send_one(&mut self, shared: &Shared) {
        let now = Instant::now();
        let (room, key) = if let Some(pos) = self.resend.iter().position(|(t, ..)| *t <= now) {
            let (_, room, key) = self.resend.remove(pos).expect("position");
            (room, key)
        } else if self.made < SENDS {
            let n = self.made;
            self.made += 1;
            (
                ROOMS[n % ROOMS.len()].to_owned(),
                format!("{}-{n}", self.user),
            )
        } else {
            return;
        };
        let sent = self
            .ws
            .try_send(ClientRequest::Send {
                room: room.clone(),
                body: json(&format!("\"{key}\"")),
                key: Some(key.clone()),
            })
            .await;
        match sent {
            Ok(id) => {
                self.in_flight.insert(id, (room, key));
            }
            Err(_) => {
                self.resend.push_front((now, room, key));
                self.lost(None, shared).await;
            }
        }
    }

    fn handle(&mut self, f: ServerFrame, shared: &Shared) {
        match f {
            ServerFrame::Ack {
                id,
                room,
                seq,
                duplicate,
                ..
            } => {
                let id = id.expect("ack id");
                let (r, key) = self
                    .in_flight
                    .remove(&id)
                    .unwrap_or_else(|| panic!("{}: ack of no send {id}", self.user));
                assert_eq!(r, room);
                if let Some(before) = self.acked.insert(key.clone(), (room.clone(), seq)) {
                    panic!("{}: {key} acked twice: {before:?}, then {seq}", self.user);
                }
                if duplicate {
                    self.duplicates += 1;
                }
                let now = Instant::now();
                if let Some(t) = self.last_ack {
                    self.max_ack_gap = self.max_ack_gap.max(now - t);
                }
                self.last_ack = Some(now);
                {
                    let mut top = shared.top.lock().unwrap();
                    let t = top.entry(room).or_insert(0);
                    *t = (*t).max(seq);
                }
                shared.acks.send_modify(|n| *n += 1);
            }
            ServerFrame::Error {
                id: Some(id),
                code: ErrorCode::Unavailable,
                retry_after_ms,
                ..
            } if self.in_flight.contains_key(&id) => {
                let (room, key) = self.in_flight.remove(&id).expect("in flight");
                let wait = Duration::from_millis(retry_after_ms.unwrap_or(100));
                self.resend.push_back((Instant::now() + wait, room, key));
                self.unavailable += 1;
            }
            ServerFrame::Message {
                room, seq, replay, ..
            } => {
                let last = self
                    .last
                    .get_mut(&room)
                    .unwrap_or_else(|| panic!("a message of {room}, not joined"));
                assert_eq!(
                    seq,
                    *last + 1,
                    "{}: {room} seq {seq} after {last} (replay: {replay})",
                    self.user
                );
                *last = seq;
                if replay {
                    self.replayed += 1;
                }
            }
            ServerFrame::Presence { .. } | ServerFrame::Typing { .. } => {}
            other => panic!("{}: unexpected {other:?}", self.user),
        }
    }

    /// The connection ended: every send in flight is resent with its key
    /// on another node, after joining every room again from the last seq
    /// seen.
    async fn lost(&mut self, code: Option<u16>, shared: &Shared) {
        self.closes.push(code);
        let now = Instant::now();
        for (_, (room, key)) in self.in_flight.drain() {
            self.resend.push_front((now, room, key));
        }
        // A real client's reconnect takes a while; the room goes on
        // meanwhile, so the resume has messages to replay.
        let at_loss = *shared.acks.borrow();
        let mut acks = shared.acks.subscribe();
        let _ = tokio::time::timeout(DEADLINE, acks.wait_for(|n| *n >= at_loss + REPLAY_GAP)).await;
        let others: Vec<usize> = (0..self.targets.len()).filter(|&i| i != self.at).collect();
        let deadline = Instant::now() + DEADLINE;
        let mut attempt = self.idx;
        'retry: loop {
            assert!(
                Instant::now() < deadline,
                "no node takes {} back",
                self.user
            );
            let at = others[attempt % others.len()];
            attempt += 1;
            let Some(ws) = open(&self.targets[at], &self.user).await else {
                // Refused: a dead or draining node. A short backoff once
                // every node was tried.
                if attempt % others.len() == self.idx % others.len() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            };
            self.ws = ws;
            self.at = at;
            self.reconnects += 1;
            {
                let top = shared.top.lock().unwrap();
                self.missed += ROOMS
                    .iter()
                    .map(|r| {
                        top.get(*r)
                            .copied()
                            .unwrap_or(0)
                            .saturating_sub(self.last[*r])
                    })
                    .sum::<u64>();
            }
            for room in ROOMS {
                let Some((_, epoch, recovered)) = self.join(room, true, shared).await else {
                    continue 'retry;
                };
                assert_eq!(epoch, self.epoch, "one epoch on every node");
                assert_eq!(
                    recovered,
                    Some(true),
                    "{} resumes {room} on node {at}",
                    self.user
                );
            }
            return;
        }
    }
}

/// `PER_NODE` clients on each node, every room joined.
async fn sims(nodes: &[Node]) -> Vec<Sim> {
    let targets: Vec<Target> = nodes.iter().map(Target::of).collect();
    let mut out = Vec::new();
    for at in 0..nodes.len() {
        for j in 0..PER_NODE {
            let idx = out.len();
            out.push(Sim::start(idx, format!("n{at}c{j}"), targets.clone(), at).await);
        }
    }
    out
}

/// Runs every client to its end beside `fault`.
async fn under_load(sims: Vec<Sim>, shared: &Shared, fault: impl Future<Output = ()>) -> Vec<Sim> {
    let runs = futures_util::future::join_all(sims.into_iter().map(|s| s.run(shared)));
    let (sims, ()) = tokio::join!(runs, fault);
    sims
}

/// Every message of `room` through `c`'s `history`, paging forward.
/// Nothing acked lost, nothing stored twice, seqs dense, every client saw
/// every seq once: checked against the history read on `node`.
/// The first node's clients (its node went away) reconnected once to
/// another and resumed behind the room; the others stayed on a live stream.
fn assert_first_node_moved(sims: &[Sim]) {
    for s in sims {
        if s.idx < PER_NODE {
            assert_eq!(s.reconnects, 1, "moved once: {}", s.state());
            assert_ne!(s.at, 0);
            assert!(s.missed > 0, "resumed behind the room: {}", s.state());
        } else {
            assert_eq!(s.reconnects, 0, "stayed: {}", s.state());
            assert_eq!(s.replayed, 0, "a live stream: {}", s.state());
        }
    }
}

async fn check(sims: &[Sim], node: &Node) {
    let mut want: HashMap<&str, BTreeMap<String, u64>> = HashMap::new();
    for s in sims {
        assert_eq!(s.acked.len(), SENDS, "every send acked: {}", s.state());
        for (key, (room, seq)) in &s.acked {
            want.entry(room.as_str())
                .or_default()
                .insert(key.clone(), *seq);
        }
    }
    for s in sims {
        eprintln!("{}", s.state());
    }
    let mut reader = node.connect("auditor").await;
    for room in ROOMS {
        reader.join(room).await;
        let stored = reader.history_all(room).await;
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        let dense: Vec<u64> = (1..=stored.len() as u64).collect();
        assert_eq!(seqs, dense, "{room}: seqs dense from 1");
        let mut got = BTreeMap::new();
        for m in &stored {
            let body = m.body.as_ref().expect("a body");
            let key: String = serde_json::from_str(body.get()).expect("a string body");
            if let Some(first) = got.insert(key.clone(), m.seq) {
                panic!("{room}: {key} stored twice, at {first} and {}", m.seq);
            }
        }
        assert_eq!(
            got,
            want.remove(room).unwrap_or_default(),
            "{room}: history holds exactly the acked keys, each at its acked seq"
        );
        for s in sims {
            assert_eq!(
                s.last[room],
                stored.len() as u64,
                "{} saw all of {room}",
                s.user
            );
        }
    }
}

/// A config file for every node of a test, in a temp dir the caller keeps.
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("config dir");
    let path = dir.path().join("switchboard.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

/// Nodes `n1`.. over `urls` (each node given them rotated, so they start
/// on different servers), with `extra` flags.
async fn nodes(count: usize, urls: &[String], extra: &[&str]) -> Vec<Node> {
    let mut out = Vec::new();
    for i in 0..count {
        let mut mine = urls.to_vec();
        mine.rotate_left(i % urls.len());
        out.push(Node::start(&format!("n{}", i + 1), &mine, extra).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_no_acked_message_and_its_clients_resume() {
    let nats = Nats::start().await;
    let mut nodes = nodes(3, &[nats.url()], &[]).await;
    let sims = sims(&nodes).await;
    let shared = Shared::new(sims.len());
    let total = sims.len() * SENDS;
    let victim = nodes.remove(0);
    let sims = under_load(sims, &shared, async {
        shared.acked(total / 3).await;
        victim.process.kill().await;
    })
    .await;
    assert_first_node_moved(&sims);
    check(&sims, &nodes[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_killed_under_load_at_r3_loses_no_acked_message() {
    let mut servers = Nats::cluster(3).await;
    let urls: Vec<String> = servers.iter().map(Nats::url).collect();
    let (_dir, config) = config_file("[cluster]\nreplicas = 3\n");
    let config = config.to_str().expect("a UTF-8 path");
    let nodes = nodes(3, &urls, &["--config", config]).await;
    // The stream is at R3; the server that leads it is the one to kill,
    // so writes go on only after an election.
    let leader = {
        let js = async_nats::jetstream::new(async_nats::connect(&urls[0]).await.expect("connect"));
        let mut stream = js.get_stream("SWITCHBOARD").await.expect("the stream");
        let info = stream.info().await.expect("stream info");
        assert_eq!(info.config.num_replicas, 3, "the stream is at R3");
        info.cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .expect("a stream leader")
    };
    let victim = servers
        .iter()
        .position(|s| s.name == leader)
        .expect("the leader is one of the test's servers");
    let sims = sims(&nodes).await;
    let shared = Shared::new(sims.len());
    let total = sims.len() * SENDS;
    let sims = under_load(sims, &shared, async {
        shared.acked(total / 3).await;
        servers[victim].kill().await;
    })
    .await;
    for s in &sims {
        assert_eq!(s.reconnects, 0, "no session ends: {}", s.state());
        assert_eq!(s.replayed, 0, "a live stream: {}", s.state());
    }
    check(&sims, &nodes[0]).await;
}

/// The drain window of the drain test: short, so the drained node's
/// clients all move while the others still send.
const DRAIN_WINDOW_MS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_drained_under_load_moves_its_clients_without_a_loss() {
    let nats = Nats::start().await;
    let (_dir, config) = config_file(&format!("drain_window_ms = {DRAIN_WINDOW_MS}\n"));
    let config = config.to_str().expect("a UTF-8 path");
    let nodes = nodes(3, &[nats.url()], &["--config", config]).await;
    let admin: Vec<SocketAddr> = nodes.iter().map(|n| n.process.admin).collect();
    let sims = sims(&nodes).await;
    let shared = Shared::new(sims.len());
    let total = sims.len() * SENDS;
    let sims = under_load(sims, &shared, async {
        shared.acked(total / 6).await;
        let reply = call(admin[0], "POST", "/admin/api/drain", None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            http(admin[0], "GET", "/readyz", &[], None).await.status,
            503
        );
        for a in &admin[1..] {
            assert_eq!(http(*a, "GET", "/readyz", &[], None).await.status, 200);
        }
    })
    .await;
    for s in sims.iter().filter(|s| s.idx < PER_NODE) {
        assert_eq!(s.closes, [Some(4200)], "closed to reconnect: {}", s.state());
    }
    assert_first_node_moved(&sims);
    assert_eq!(
        http(admin[0], "GET", "/readyz", &[], None).await.status,
        503
    );
    assert!(
        open(&Target::of(&nodes[0]), "late").await.is_none(),
        "a drained node takes no new connection"
    );
    check(&sims, &nodes[1]).await;
}

#[tokio::test]
async fn typing_on_one_node_reaches_a_member_on_another() {
    let nats = Nats::start().await;
    let nodes = nodes(2, &[nats.url()], &[]).await;
    let mut bob = nodes[1].connect("bob").await;
    bob.join("t").await;
    let mut alice = nodes[0].connect("alice").await;
    alice.join("t").await;
    // Alice's arrival reaches Bob over the room's events: his node hears them.
    bob.recv_where(
        |f| matches!(f, ServerFrame::Presence { joined, .. } if joined.iter().any(|u| u == "alice")),
    )
    .await;
    alice.send(ClientRequest::Typing { room: "t".into() }).await;
    let typing = bob
        .recv_where(|f| matches!(f, ServerFrame::Typing { .. }))
        .await;
    assert_eq!(
        typing,
        ServerFrame::Typing {
            room: "t".into(),
            count: 1,
            users: vec!["alice".into()],
        }
    );
}

/// A commit sink that tells no one: a node that stores a message and dies
/// before announcing it.
struct Silent;

impl switchboard::history::CommitSink for Silent {
    fn committed(&self, _: &[switchboard::history::Committed<'_>]) {}
}

/// Stores one message in `room` of the cluster over `url` without any
/// node hearing of it, and returns its seq.
async fn store_silently(url: &str, room: &str, body: &str) -> u64 {
    use switchboard::cluster::store::JetStreamStore;
    use switchboard::history::Backend as _;
    let config = switchboard::config::ClusterConfig {
        urls: vec![url.to_owned()],
        node_id: Some("silent".to_owned()),
        ..Default::default()
    };
    let client = switchboard::cluster::connect(&config)
        .await
        .expect("connect");
    let opts = switchboard::Config::default().store_options();
    let tracker = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let (store, writer) = JetStreamStore::open(client, &config, &opts)
        .await
        .expect("open the stream");
    writer.start(std::sync::Arc::new(Silent), &tracker, stop.clone());
    let (reply, rx) = tokio::sync::oneshot::channel();
    store
        .append(switchboard::history::Append {
            room: room.into(),
            from: "ghost".into(),
            body: serde_json::value::RawValue::from_string(body.to_owned()).expect("json"),
            key: None,
            reply,
        })
        .await
        .expect("the store takes the append");
    let seq = tokio::time::timeout(DEADLINE, rx)
        .await
        .expect("an answer")
        .expect("a reply")
        .expect("stored")
        .seq;
    stop.cancel();
    tracker.close();
    tokio::time::timeout(DEADLINE, tracker.wait())
        .await
        .expect("the store stops");
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_past_what_the_node_has_heard_gets_no_message_twice() {
    // The node reads a room's history twice, gap_timeout_ms apart, once
    // it subscribes to the room: short, so that both reads are over before
    // the silent message is stored.
    let nats = Nats::start().await;
    let (_dir, config) = config_file("[cluster]\ngap_timeout_ms = 20\n");
    let config = config.to_str().expect("a UTF-8 path");
    let nodes = nodes(1, &[nats.url()], &["--config", config]).await;
    let mut writer = nodes[0].connect("writer").await;
    let (_, epoch) = match writer.join("q").await {
        ServerFrame::Joined { seq, epoch, .. } => (seq, epoch),
        other => panic!("{other:?}"),
    };
    assert_eq!(writer.say("q", "1").await, 1);
    assert!(matches!(
        writer.next_message("q").await,
        ServerFrame::Message { seq: 1, .. }
    ));
    // The node's two reads must be over before seq 2 is stored: its
    // metrics count the reads whose answer it has taken in.
    let admin = nodes[0].process.admin;
    eventually(
        "the node's two catch-up reads of q are answered",
        async || {
            let text = http(admin, "GET", "/metrics", &[], None).await.body;
            let answered = text
                .lines()
                .find(|l| l.starts_with("switchboard_cluster_history_reads_answered_total"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<u64>().ok())?;
            (answered >= 2).then_some(())
        },
    )
    .await;
    // Seq 2 is stored by a node that dies before announcing it; a client of
    // that node saw it and resumes here.
    assert_eq!(store_silently(&nats.url(), "q", "2").await, 2);
    let mut reader = nodes[0].connect("reader").await;
    let joined = reader
        .request(ClientRequest::Join {
            room: "q".into(),
            since: Some(2),
            epoch: Some(epoch),
        })
        .await;
    match joined {
        ServerFrame::Joined { seq, recovered, .. } => {
            assert_eq!(seq, 1, "the node has not heard of seq 2 (the setup holds)");
            assert_eq!(recovered, Some(true));
        }
        other => panic!("{other:?}"),
    }
    // The next message makes the node read seq 2 to fill its gap: the
    // reader has it already.
    assert_eq!(writer.say("q", "3").await, 3);
    match writer.next_message("q").await {
        ServerFrame::Message { seq, .. } => assert_eq!(seq, 2, "the writer gets the gap"),
        other => panic!("{other:?}"),
    }
    match reader.next_message("q").await {
        ServerFrame::Message { seq, .. } => assert_eq!(seq, 3, "seq 2 again"),
        other => panic!("{other:?}"),
    }
}
