//! The test harness: a real server on `127.0.0.1:0` with real TLS and a
//! real redb file in a temp dir, and a real WebSocket client.
//!
//! Readiness needs no sleep: listeners are bound before the server starts.
//! Every wait has a deadline so a broken server fails a test, never hangs it;
//! a wait for something no event announces polls the condition through
//! [`eventually_every`] and its shorthands, never sleeps a fixed time.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{Body, ClientRequest, HistoryMessage, Request, ServerFrame};
use switchboard::{Config, Listeners};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// How often a polled condition is looked at again: short, so that a test
/// goes on soon after the condition holds, without spinning a core.
pub const POLL: Duration = Duration::from_millis(10);

/// Calls `f` every `every` until it returns `Ok`, and returns that value;
/// fails the test with `what` and the last `Err` (what `f` saw) once
/// `within` has passed, a call of `f` that never returns included. This is
/// the one way a test waits for something that no event announces.
pub async fn eventually_every<T>(
    what: &str,
    within: Duration,
    every: Duration,
    mut f: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let mut last = String::from("no answer yet");
    let polling = async {
        loop {
            match f().await {
                Ok(value) => return value,
                Err(seen) => last = seen,
            }
            tokio::time::sleep(every).await;
        }
    };
    let outcome = tokio::time::timeout(within, polling).await;
    match outcome {
        Ok(value) => value,
        Err(_) => panic!("timed out after {within:?} waiting for {what}; last seen: {last}"),
    }
}

/// [`eventually_every`] with the usual bound and pace, for a check that
/// has nothing to tell while it does not hold.
pub async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    eventually_every(what, DEADLINE, POLL, async || {
        f().await.ok_or_else(|| "not yet".to_owned())
    })
    .await
}

/// Waits until `cond` holds, looking every [`POLL`]; fails at the deadline.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    eventually(what, async || cond().then_some(())).await;
}

/// A temp dir with development certificates and room for the data dir.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = switchboard::tls::generate_dev_certs().expect("certs");
        std::fs::write(dir.path().join("ca.pem"), certs.ca_pem).expect("write ca");
        std::fs::write(dir.path().join("server.pem"), certs.cert_pem).expect("write cert");
        std::fs::write(dir.path().join("server.key"), certs.key_pem).expect("write key");
        Fixture { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            tls_cert: self.path().join("server.pem"),
            tls_key: self.path().join("server.key"),
            data_dir: self.path().join("data"),
            admin_listen: Some("127.0.0.1:0".parse().expect("addr")),
            ..Config::default()
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.path().join("ca.pem")
    }

    pub fn tls_connector(&self) -> TlsConnector {
        tls_connector(&self.ca_path())
    }
}

pub fn tls_connector(ca: &Path) -> TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(cert.expect("ca cert")).expect("add ca");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A server running in this test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub plain_addr: Option<SocketAddr>,
    /// The internal HTTP listener (health, metrics, admin API, dashboard).
    pub admin_addr: Option<SocketAddr>,
    pub fixture: Fixture,
    pub state: Arc<switchboard::server::ServerState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), switchboard::ServerError>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(Fixture::new(), |_| {}).await
    }

    /// Starts a server on `fixture`, after `tweak` adjusts its config.
    pub async fn start_with(fixture: Fixture, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = fixture.config();
        tweak(&mut config);
        let tls = TcpListener::bind(config.listen).await.expect("bind tls");
        let addr = tls.local_addr().expect("addr");
        let plain = match config.plain_listen {
            Some(a) => Some(TcpListener::bind(a).await.expect("bind plain")),
            None => None,
        };
        let plain_addr = plain.as_ref().map(|l| l.local_addr().expect("addr"));
        let admin = match config.admin_listen {
            Some(a) => Some(TcpListener::bind(a).await.expect("bind admin")),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = Listeners {
            tls: Some(tls),
            plain,
            admin,
        };
        let server = switchboard::Server::start(config, listeners)
            .await
            .expect("server starts");
        let state = server.state();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            plain_addr,
            admin_addr,
            fixture,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful shutdown; returns the fixture so the same data dir can be reused.
    pub async fn stop(mut self) -> Fixture {
        self.shutdown().await;
        self.fixture
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("server stops within the deadline")
                .expect("server task")
                .expect("server returns Ok");
        }
    }

    /// Waits until `cond` holds on the server's state (metrics, hub),
    /// looking every [`POLL`]; fails at the deadline.
    pub async fn wait_for(
        &self,
        what: &str,
        cond: impl Fn(&switchboard::server::ServerState) -> bool,
    ) {
        wait_until(what, || cond(&self.state)).await;
    }

    pub fn url(&self, user: &str) -> String {
        format!("wss://localhost:{}/ws?user={user}", self.addr.port())
    }

    /// Connects over TLS as `user` and reads the `welcome` frame.
    pub async fn connect(&self, user: &str) -> Client {
        let mut client = self.connect_raw(&self.url(user)).await.expect("connect");
        match client.recv().await {
            ServerFrame::Welcome { user: u, .. } => assert_eq!(u, user),
            other => panic!("expected welcome, got {other:?}"),
        }
        client
    }

    /// Connects over TLS with a prepared request (headers) without reading anything.
    pub async fn connect_request(
        &self,
        request: ClientRequestHttp,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let tcp = TcpStream::connect(self.addr).await?;
        connect_tls_stream(tcp, &self.fixture.tls_connector(), request).await
    }

    /// Connects over TLS to `url` without reading anything.
    pub async fn connect_raw(
        &self,
        url: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        connect_tls(self.addr, &self.fixture.tls_connector(), url).await
    }
}

pub async fn connect_tls(
    addr: SocketAddr,
    connector: &TlsConnector,
    url: &str,
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    connect_tls_stream(TcpStream::connect(addr).await?, connector, url).await
}

/// The upgrade request for `url` with extra headers (`Authorization`, `Origin`).
pub fn request_with(url: &str, headers: &[(&str, &str)]) -> ClientRequestHttp {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                .expect("header name"),
            value.parse().expect("header value"),
        );
    }
    request
}

/// An HTTP upgrade request as tungstenite's client takes it.
pub type ClientRequestHttp = tokio_tungstenite::tungstenite::handshake::client::Request;

/// Connects with a tiny, fixed receive buffer: a client whose socket fills
/// after a few KiB, for slow-consumer tests.
pub async fn connect_tls_small_rcvbuf(
    addr: SocketAddr,
    connector: &TlsConnector,
    url: &str,
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    const RCVBUF: u32 = 4096;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(RCVBUF)?;
    connect_tls_stream(socket.connect(addr).await?, connector, url).await
}

async fn connect_tls_stream(
    tcp: TcpStream,
    connector: &TlsConnector,
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await?;
    let (ws, _) = tokio_tungstenite::client_async(request, tls).await?;
    Ok(Client {
        ws,
        next_id: 1,
        buffered: VecDeque::new(),
    })
}

/// A protocol client for tests.
pub struct Client {
    pub ws: WebSocketStream<TlsStream<TcpStream>>,
    next_id: u64,
    buffered: VecDeque<ServerFrame>,
}

impl Client {
    /// Sends a request with a fresh id and returns the id.
    pub async fn send(&mut self, body: ClientRequest) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let text = Request { id: Some(id), body }.to_json();
        self.send_text(&text).await;
        id
    }

    /// Like [`Client::send`], but a closed socket is an error, not a panic.
    pub async fn try_send(
        &mut self,
        body: ClientRequest,
    ) -> Result<u64, tokio_tungstenite::tungstenite::Error> {
        let id = self.next_id;
        self.next_id += 1;
        let text = Request { id: Some(id), body }.to_json();
        self.ws.send(Message::Text(text.into())).await?;
        Ok(id)
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send frame");
    }

    /// The next frame, buffered ones first.
    pub async fn recv(&mut self) -> ServerFrame {
        if let Some(f) = self.buffered.pop_front() {
            return f;
        }
        self.recv_wire().await
    }

    async fn recv_wire(&mut self) -> ServerFrame {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("a frame within the deadline")
                .expect("stream open")
                .expect("frame");
            match msg {
                Message::Text(t) => {
                    return ServerFrame::from_json(t.as_str())
                        .unwrap_or_else(|e| panic!("bad server frame {t}: {e}"));
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Sends a request and waits for the reply that echoes its id; other
    /// frames received meanwhile stay buffered in order.
    pub async fn request(&mut self, body: ClientRequest) -> ServerFrame {
        let id = self.send(body).await;
        self.reply_to(id).await
    }

    pub async fn reply_to(&mut self, id: u64) -> ServerFrame {
        if let Some(pos) = self.buffered.iter().position(|f| frame_id(f) == Some(id)) {
            return self.buffered.remove(pos).expect("buffered");
        }
        loop {
            let f = self.recv_wire().await;
            if frame_id(&f) == Some(id) {
                return f;
            }
            self.buffered.push_back(f);
        }
    }

    /// Every message of `room`, paged forward from the start.
    pub async fn history_all(&mut self, room: &str) -> Vec<HistoryMessage> {
        let mut out: Vec<HistoryMessage> = Vec::new();
        loop {
            let after = out.last().map_or(0, |m| m.seq);
            let reply = self
                .request(ClientRequest::History {
                    room: room.into(),
                    before: None,
                    after: Some(after),
                    limit: Some(200),
                })
                .await;
            let ServerFrame::History { messages, more, .. } = reply else {
                panic!("history failed: {reply:?}");
            };
            let empty = messages.is_empty();
            out.extend(messages);
            if !more || empty {
                return out;
            }
        }
    }

    /// The next frame that matches `pred`; others stay buffered.
    pub async fn recv_where(&mut self, pred: impl Fn(&ServerFrame) -> bool) -> ServerFrame {
        if let Some(pos) = self.buffered.iter().position(&pred) {
            return self.buffered.remove(pos).expect("buffered");
        }
        loop {
            let f = self.recv_wire().await;
            if pred(&f) {
                return f;
            }
            self.buffered.push_back(f);
        }
    }

    pub async fn join(&mut self, room: &str) -> ServerFrame {
        let reply = self
            .request(ClientRequest::Join {
                room: room.into(),
                since: None,
                epoch: None,
            })
            .await;
        assert!(
            matches!(reply, ServerFrame::Joined { .. }),
            "join failed: {reply:?}"
        );
        reply
    }

    /// Sends a message and returns its acked seq.
    pub async fn say(&mut self, room: &str, body: &str) -> u64 {
        let reply = self
            .request(ClientRequest::Send {
                room: room.into(),
                body: json(body),
                key: None,
            })
            .await;
        match reply {
            ServerFrame::Ack { seq, .. } => seq,
            other => panic!("send failed: {other:?}"),
        }
    }

    /// The next `message` frame for `room`.
    pub async fn next_message(&mut self, room: &str) -> ServerFrame {
        let room = room.to_owned();
        self.recv_where(move |f| matches!(f, ServerFrame::Message { room: r, .. } if *r == room))
            .await
    }

    /// The next raw WebSocket message, or `None` when the stream ends.
    pub async fn recv_raw(&mut self) -> Option<Message> {
        tokio::time::timeout(DEADLINE, self.ws.next())
            .await
            .expect("a frame within the deadline")
            .and_then(Result::ok)
    }

    /// Reads until the server closes; returns the close frame.
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("close within the deadline");
            match msg {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error before close: {e}"),
                None => return None,
            }
        }
    }
}

/// A body from JSON text.
pub fn json(text: &str) -> Body {
    Body::from_json(text).expect("valid json")
}

/// The request id a reply echoes, if any.
pub fn frame_id(f: &ServerFrame) -> Option<u64> {
    match f {
        ServerFrame::Joined { id, .. }
        | ServerFrame::Left { id, .. }
        | ServerFrame::Ack { id, .. }
        | ServerFrame::History { id, .. }
        | ServerFrame::Members { id, .. }
        | ServerFrame::Pong { id }
        | ServerFrame::Refreshed { id, .. }
        | ServerFrame::Error { id, .. } => *id,
        _ => None,
    }
}

/// The real binary as a child process, in `fixture`'s directory (its
/// certificates and `data`), with warn-level logs to the test's stderr.
/// Stopped only by the PID this test started.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    /// The admin listener (health, metrics, admin API).
    pub admin: SocketAddr,
}

impl Process {
    /// Starts the binary on port 0.
    pub async fn start(fixture: &Fixture) -> Process {
        Self::start_with(fixture, |_| {}).await
    }

    /// Starts the binary on port 0 after `tweak` adds arguments or changes
    /// the environment and pipes of the default command.
    pub async fn start_with(fixture: &Fixture, tweak: impl FnOnce(&mut Command)) -> Process {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(fixture, any, tweak).await
    }

    /// Starts the binary with its TLS listener on `listen`: the address of
    /// an earlier process restarts a server in place (same port, same data).
    pub async fn start_on(
        fixture: &Fixture,
        listen: SocketAddr,
        tweak: impl FnOnce(&mut Command),
    ) -> Process {
        let dir = fixture.path();
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command
            .args(["serve", "--listen"])
            .arg(listen.to_string())
            .args(["--admin-listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(dir.join("server.pem"))
            .arg("--tls-key")
            .arg(dir.join("server.key"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        tweak(&mut command);
        let mut child = command.spawn().expect("spawn switchboard");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        // The server prints its bound addresses once it listens, the
        // admin listener's last.
        let (addr, admin) = tokio::time::timeout(DEADLINE, async {
            let mut addr = None;
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(rest) = line.strip_prefix("listening on wss://") {
                    addr = Some(
                        rest.trim_end_matches("/ws")
                            .parse::<SocketAddr>()
                            .expect("addr"),
                    );
                }
                if let Some(rest) = line.strip_prefix("admin on http://") {
                    let admin = rest
                        .split_whitespace()
                        .next()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .expect("admin addr");
                    return (addr.expect("the TLS listener is printed first"), admin);
                }
            }
            panic!("server exited before listening");
        })
        .await
        .expect("server listens within the deadline");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Process { child, addr, admin }
    }

    /// Waits for the process to exit and returns whether it succeeded.
    pub async fn wait_success(&mut self) -> bool {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("exits within the deadline")
            .expect("wait")
            .success()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("pid").to_string();
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGKILL by the PID this test started, and wait for the exit.
    pub async fn kill(mut self) {
        self.signal("-KILL");
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("exits within the deadline")
            .expect("wait");
    }

    /// A TLS client of `user`, past its `welcome`.
    pub async fn connect(&self, fixture: &Fixture, user: &str) -> Client {
        let url = format!("wss://localhost:{}/ws?user={user}", self.addr.port());
        let mut c = connect_tls(self.addr, &fixture.tls_connector(), &url)
            .await
            .expect("connect");
        assert!(matches!(c.recv().await, ServerFrame::Welcome { .. }));
        c
    }
}
