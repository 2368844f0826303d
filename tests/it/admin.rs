//! The internal HTTP listener: health, readiness, metrics and the admin API,
//! over real HTTP against a real server.
//!
//! `every_documented_route_needs_the_token` reads `docs/openapi.yaml`,
//! checks it lists exactly the server's routes, and calls each one with no
//! token, a wrong token and the right one.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use protocol::{ClientRequest, ServerFrame, close};
use switchboard::config::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{Client, DEADLINE, Fixture, TestServer, eventually};

pub const TOKEN: &str = "test-admin-token-0123456789";

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    tokio::time::timeout(DEADLINE, http_inner(addr, method, path, headers, body))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within the deadline"))
}

async fn http_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    stream.write_all(req.as_bytes()).await.expect("write");
    // Read until the response is complete: by Content-Length, by the last
    // chunk, or else to the end of the stream (some servers keep the
    // connection open despite `Connection: close`).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
            let body_len = raw.len() - head_end - 4;
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| body_len >= n)
                || (head.contains("transfer-encoding: chunked") && raw.ends_with(b"0\r\n\r\n"))
            {
                break;
            }
        }
        let n = stream.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = std::str::from_utf8(&raw[..split]).expect("head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        // Lossy: a backup's body is a binary redb file.
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&data[..eol]).expect("chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        data = &data[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// GET with the admin token.
pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    let auth = bearer(TOKEN);
    http(addr, "GET", path, &[("Authorization", &auth)], None).await
}

/// POST (or another method) with the admin token.
pub async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    let auth = bearer(TOKEN);
    http(addr, method, path, &[("Authorization", &auth)], body).await
}

/// A server with an admin token configured.
pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

pub async fn start_with(tweak: impl FnOnce(&mut switchboard::Config)) -> TestServer {
    TestServer::start_with(Fixture::new(), |c| {
        c.admin_token = Some(Secret::new(TOKEN));
        tweak(c);
    })
    .await
}

pub fn admin_addr(server: &TestServer) -> SocketAddr {
    server
        .admin_addr
        .expect("the test server binds an admin listener")
}

/// Connects as `user` and returns the client with its session id (hex).
pub async fn connect_with_id(server: &TestServer, user: &str) -> (Client, String) {
    let mut client = server
        .connect_raw(&server.url(user))
        .await
        .expect("connect");
    match client.recv().await {
        ServerFrame::Welcome { session, .. } => (client, session),
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// The `(METHOD, path)` pairs of an OpenAPI file's `paths:` section. The
/// file is written with two-space indentation: paths at 2, methods at 4.
fn openapi_routes(text: &str) -> Vec<(String, String)> {
    let mut routes = Vec::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ") {
            let m = m.trim_end();
            let method = m.trim_end_matches(':');
            if !m.starts_with(' ')
                && m.ends_with(':')
                && ["get", "post", "put", "patch", "delete"].contains(&method)
            {
                let p = path.clone().expect("a method under a path");
                routes.push((method.to_uppercase(), p));
            }
        }
    }
    routes
}

#[tokio::test]
async fn every_documented_route_needs_the_token() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
        .expect("docs/openapi.yaml");
    let documented = openapi_routes(&text);
    let served: BTreeSet<(String, String)> = switchboard::admin::ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        documented.iter().cloned().collect::<BTreeSet<_>>(),
        served,
        "docs/openapi.yaml and switchboard::admin::ROUTES differ"
    );

    let server = start().await;
    let admin = admin_addr(&server);
    let mut alice = server.connect("alice").await;
    alice.join("general").await;
    alice.say("general", r#"{"text":"hi"}"#).await;
    let (mut carol, carol_id) = connect_with_id(&server, "carol").await;

    for (method, template) in &documented {
        let path = template
            .replace("{id}", &carol_id)
            .replace("{user}", "alice")
            .replace("{room}", "general");
        let body = (method == "POST").then_some(r#"{"text":"from the operators"}"#);
        let open = !path.starts_with("/admin/api/");

        let anonymous = http(admin, method, &path, &[], body).await;
        let wrong = http(
            admin,
            method,
            &path,
            &[("Authorization", "Bearer wrong-token-0123456789")],
            body,
        )
        .await;
        if open {
            assert_eq!(
                anonymous.status, 200,
                "{method} {path} is open: {anonymous:?}"
            );
        } else {
            for r in [&anonymous, &wrong] {
                assert_eq!(r.status, 401, "{method} {path} without the token: {r:?}");
                assert_eq!(r.json()["error"], "unauthorized");
                assert!(
                    r.header("www-authenticate")
                        .is_some_and(|v| v.starts_with("Bearer"))
                );
            }
        }
        let authed = call(admin, method, &path, body).await;
        assert_eq!(
            authed.status, 200,
            "{method} {path} with the token: {authed:?}"
        );
    }

    // The kick route closed carol with 4009; the user kick closed alice.
    for client in [&mut carol, &mut alice] {
        let frame = client.expect_close().await.expect("close frame");
        assert_eq!(frame.code, CloseCode::from(close::KICKED.code));
    }
    server.stop().await;
}

#[tokio::test]
async fn without_a_configured_token_the_api_refuses_everything() {
    let server = TestServer::start().await;
    let admin = admin_addr(&server);
    for token in [TOKEN, ""] {
        let auth = bearer(token);
        let r = http(
            admin,
            "GET",
            "/admin/api/stats",
            &[("Authorization", &auth)],
            None,
        )
        .await;
        assert_eq!(r.status, 401);
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("no admin_token")
        );
    }
    let r = http(admin, "POST", "/admin/api/users/alice/kick", &[], None).await;
    assert_eq!(r.status, 401);
    // Health and metrics stay open.
    assert_eq!(http(admin, "GET", "/healthz", &[], None).await.status, 200);
    assert_eq!(http(admin, "GET", "/readyz", &[], None).await.status, 200);
    let metrics = http(admin, "GET", "/metrics", &[], None).await;
    assert!(
        metrics
            .body
            .contains("switchboard_admin_unauthorized_total 3"),
        "{}",
        metrics.body
    );
    server.stop().await;
}

#[tokio::test]
async fn kick_a_session_or_every_session_of_a_user() {
    let server = start().await;
    let admin = admin_addr(&server);
    let (mut one, one_id) = connect_with_id(&server, "alice").await;
    let (mut two, _) = connect_with_id(&server, "bob").await;
    let (mut three, _) = connect_with_id(&server, "bob").await;

    let r = call(
        admin,
        "POST",
        &format!("/admin/api/connections/{one_id}/kick"),
        None,
    )
    .await;
    assert_eq!((r.status, r.json()["kicked"].as_u64()), (200, Some(1)));
    let frame = one.expect_close().await.expect("close frame");
    assert_eq!(frame.code, CloseCode::from(4009));
    assert_eq!(frame.reason.as_str(), "kicked");

    let r = call(admin, "POST", "/admin/api/users/bob/kick", None).await;
    assert_eq!(r.json()["kicked"], 2);
    for c in [&mut two, &mut three] {
        assert_eq!(
            c.expect_close().await.expect("close").code,
            CloseCode::from(4009)
        );
    }
    server
        .wait_for("three kicked sessions", |s| {
            s.metrics
                .closed_for(switchboard::session::CloseReason::Kicked)
                == 3
        })
        .await;

    // Gone now: 404. Not an id: 400.
    let r = call(
        admin,
        "POST",
        &format!("/admin/api/connections/{one_id}/kick"),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        get(admin, "/admin/api/connections/not-hex").await.status,
        400
    );
    assert_eq!(
        call(admin, "POST", "/admin/api/users/bad%20name/kick", None)
            .await
            .status,
        400
    );

    let audit = get(admin, "/admin/api/audit").await.json();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["kick_session", "kick_user", "kick_session"]);
    let first = &audit["entries"][0];
    assert_eq!(first["params"]["session"], one_id.as_str());
    assert!(first["who"].as_str().unwrap().starts_with("token:"));
    assert!(
        !audit.to_string().contains(TOKEN),
        "the token must never be in the audit log"
    );
    server.stop().await;
}

#[tokio::test]
async fn connections_and_rooms_are_listed_and_filtered() {
    let server = start().await;
    let admin = admin_addr(&server);
    let (mut alice, alice_id) = connect_with_id(&server, "alice").await;
    let (mut bob, _) = connect_with_id(&server, "bob").await;
    alice.join("general").await;
    alice.join("ops").await;
    bob.join("general").await;
    alice.say("general", r#"{"text":"one"}"#).await;
    alice.say("general", r#"{"text":"two"}"#).await;
    bob.next_message("general").await;
    bob.next_message("general").await;

    let all = get(admin, "/admin/api/connections").await.json();
    assert_eq!(all["total"], 2);
    let mine = get(admin, "/admin/api/connections?user=alice").await.json();
    assert_eq!(mine["total"], 1);
    let c = &mine["connections"][0];
    assert_eq!(c["id"], alice_id.as_str());
    assert_eq!(c["rooms"], serde_json::json!(["general", "ops"]));
    assert_eq!(c["messages_in"], 2);
    assert!(c["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(c["connected_since"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        get(admin, "/admin/api/connections?room=ops").await.json()["total"],
        1
    );
    assert_eq!(
        get(admin, "/admin/api/connections?limit=1").await.json()["connections"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let one = get(admin, &format!("/admin/api/connections/{alice_id}")).await;
    assert_eq!(one.json()["user"], "alice");
    assert_eq!(
        get(admin, "/admin/api/connections/ffffffff").await.status,
        404
    );

    // Bob's out count includes both live messages.
    server
        .wait_for("bob's deliveries counted", |s| {
            s.hub
                .sessions()
                .iter()
                .any(|x| x.user == "bob" && x.messages_out == 2)
        })
        .await;

    let rooms = get(admin, "/admin/api/rooms").await.json();
    assert_eq!(rooms["total"], 2);
    assert_eq!(rooms["rooms"][0]["name"], "general", "most sessions first");
    assert_eq!(rooms["rooms"][0]["sessions"], 2);
    assert_eq!(rooms["rooms"][0]["latest_seq"], 2);
    let room = get(admin, "/admin/api/rooms/general").await.json();
    assert_eq!(room["presence"], serde_json::json!(["alice", "bob"]));
    assert_eq!(room["latest_seq"], 2);
    assert_eq!(get(admin, "/admin/api/rooms/nowhere").await.status, 404);
    assert_eq!(get(admin, "/admin/api/rooms/bad%20room").await.status, 400);
    assert_eq!(get(admin, "/admin/api/no-such-route").await.status, 404);
    // The scheme is case-insensitive; the token is not.
    let lower = format!("bearer {TOKEN}");
    let r = http(
        admin,
        "GET",
        "/admin/api/stats",
        &[("Authorization", &lower)],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let upper = format!("Bearer {}", TOKEN.to_uppercase());
    let r = http(
        admin,
        "GET",
        "/admin/api/stats",
        &[("Authorization", &upper)],
        None,
    )
    .await;
    assert_eq!(r.status, 401);
    server.stop().await;
}

#[tokio::test]
async fn publish_stores_with_a_seq_and_delivers_live() {
    let server = start().await;
    let admin = admin_addr(&server);
    let mut alice = server.connect("alice").await;
    alice.join("general").await;
    let first = alice.say("general", r#"{"text":"before"}"#).await;

    let r = call(
        admin,
        "POST",
        "/admin/api/rooms/general/messages",
        Some(r#" {"text":"maintenance at 22:00"} "#),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let reply = r.json();
    assert_eq!(reply["seq"], first + 1);
    assert_eq!(reply["duplicate"], false);
    let system = alice
        .recv_where(|f| matches!(f, ServerFrame::Message { from, .. } if from == "system"))
        .await;
    match system {
        ServerFrame::Message {
            seq, from, body, ..
        } => {
            assert_eq!(seq, first + 1);
            assert_eq!(from, "system");
            assert_eq!(body.get(), r#"{"text":"maintenance at 22:00"}"#);
        }
        other => panic!("expected the system message, got {other:?}"),
    }

    // The same Idempotency-Key stores it once.
    let auth = bearer(TOKEN);
    let headers = [
        ("Authorization", auth.as_str()),
        ("Idempotency-Key", "notice-1"),
    ];
    let a = http(
        admin,
        "POST",
        "/admin/api/rooms/general/messages",
        &headers,
        Some("[1,2]"),
    )
    .await
    .json();
    let b = http(
        admin,
        "POST",
        "/admin/api/rooms/general/messages",
        &headers,
        Some("[1,2]"),
    )
    .await
    .json();
    assert_eq!(a["seq"], b["seq"]);
    assert_eq!(b["duplicate"], true);

    // Bad bodies are refused; nothing is stored.
    for bad in ["not json", "{\"a\":1} trailing", ""] {
        let r = call(
            admin,
            "POST",
            "/admin/api/rooms/general/messages",
            Some(bad),
        )
        .await;
        assert_eq!(r.status, 400, "{bad:?}: {r:?}");
    }
    let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
    assert_eq!(
        call(
            admin,
            "POST",
            "/admin/api/rooms/general/messages",
            Some(&deep)
        )
        .await
        .status,
        400
    );
    let huge = format!("\"{}\"", "x".repeat(70_000));
    assert_eq!(
        call(
            admin,
            "POST",
            "/admin/api/rooms/general/messages",
            Some(&huge)
        )
        .await
        .status,
        413
    );

    // A room nobody joined can be published to; it then has history.
    let r = call(
        admin,
        "POST",
        "/admin/api/rooms/empty-room/messages",
        Some("{}"),
    )
    .await
    .json();
    assert_eq!(r["seq"], 1);
    let room = get(admin, "/admin/api/rooms/empty-room").await.json();
    assert_eq!(
        (room["sessions"].as_u64(), room["latest_seq"].as_u64()),
        (Some(0), Some(1))
    );

    let audit = get(admin, "/admin/api/audit").await;
    assert!(
        !audit.body.contains("maintenance"),
        "bodies are not audited"
    );
    assert_eq!(audit.json()["entries"][0]["action"], "publish");
    server.stop().await;
}

#[tokio::test]
async fn export_and_erase_a_users_messages() {
    let server = start().await;
    let admin = admin_addr(&server);
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("general").await;
    alice.join("ops").await;
    bob.join("general").await;
    alice.say("general", r#"{"text":"a1"}"#).await;
    bob.say("general", r#"{"text":"b1"}"#).await;
    alice.say("ops", r#"{"text":"a2"}"#).await;

    let export = get(admin, "/admin/api/users/alice/messages").await;
    assert_eq!(export.status, 200);
    assert_eq!(export.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<serde_json::Value> = export
        .body
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2, "{}", export.body);
    let mut seen: Vec<(String, u64, String)> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["from"], "alice");
            assert_eq!(l["erased"], false);
            (
                l["room"].as_str().unwrap().to_owned(),
                l["seq"].as_u64().unwrap(),
                l["body"]["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("general".into(), 1, "a1".into()),
            ("ops".into(), 1, "a2".into())
        ]
    );

    let erased = call(admin, "DELETE", "/admin/api/users/alice/messages", None)
        .await
        .json();
    assert_eq!(erased["erased"], 2);

    // History keeps the seqs; alice's bodies are gone, bob's stay.
    let reply = bob
        .request(ClientRequest::History {
            room: "general".into(),
            before: None,
            after: None,
            limit: None,
        })
        .await;
    match reply {
        ServerFrame::History { messages, .. } => {
            let view: Vec<(u64, &str, bool)> = messages
                .iter()
                .map(|m| (m.seq, m.from.as_str(), m.erased))
                .collect();
            assert_eq!(view, [(1, "alice", true), (2, "bob", false)]);
            assert!(messages[0].body.is_none());
        }
        other => panic!("expected history, got {other:?}"),
    }
    let export = get(admin, "/admin/api/users/alice/messages").await;
    assert!(
        export
            .body
            .lines()
            .all(|l| l.contains("\"erased\":true") && l.contains("\"body\":null")),
        "{}",
        export.body
    );

    let audit = get(admin, "/admin/api/audit?limit=2").await.json();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["erase_user", "export_user"]);
    // The same entries are on disk, one JSON object per line.
    let file = std::fs::read_to_string(server.fixture.path().join("data").join("audit.log"))
        .expect("audit.log");
    assert_eq!(file.lines().count(), 3);
    assert!(
        file.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
    );
    server.stop().await;
}

/// Parses one sample (`name{labels} value`) out of the OpenMetrics text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let server = start().await;
    let admin = admin_addr(&server);
    let before = http(admin, "GET", "/metrics", &[], None).await;
    assert!(
        before
            .header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert_eq!(
        sample(&before.body, "switchboard_messages_received_total"),
        0.0
    );

    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("general").await;
    bob.join("general").await;
    for i in 0..5 {
        alice.say("general", &format!(r#"{{"n":{i}}}"#)).await;
    }
    for _ in 0..5 {
        bob.next_message("general").await;
    }
    server
        .wait_for("deliveries counted", |s| {
            s.metrics.messages_delivered.get() >= 10
        })
        .await;

    let text = http(admin, "GET", "/metrics", &[], None).await.body;
    assert_eq!(sample(&text, "switchboard_connections_open"), 2.0);
    assert_eq!(sample(&text, "switchboard_rooms"), 1.0);
    assert_eq!(sample(&text, "switchboard_messages_received_total"), 5.0);
    assert_eq!(sample(&text, "switchboard_messages_delivered_total"), 10.0);
    assert!(sample(&text, "switchboard_received_bytes_total") > 0.0);
    assert!(sample(&text, "switchboard_sent_bytes_total") > 0.0);
    assert_eq!(
        sample(&text, "switchboard_fanout_latency_seconds_count"),
        10.0
    );
    assert_eq!(sample(&text, "switchboard_ack_latency_seconds_count"), 5.0);
    assert!(sample(&text, "switchboard_store_commits_total") >= 1.0);
    assert!(sample(&text, "switchboard_store_commit_seconds_count") >= 1.0);
    assert!(sample(&text, "switchboard_store_commit_batch_size_sum") >= 5.0);
    assert!(sample(&text, "switchboard_outbound_queue_bytes") >= 0.0);
    for series in [
        "switchboard_sessions_closed_total{reason=\"kicked\"}",
        "switchboard_messages_dropped_total{reason=\"queue_full\"}",
        "switchboard_messages_dropped_total{reason=\"ephemeral_shed\"}",
        "switchboard_slow_consumers_total",
        "switchboard_rate_limited_total",
        "switchboard_handshake_failures_total",
    ] {
        assert_eq!(sample(&text, series), 0.0, "{series}");
    }
    assert!(text.trim_end().ends_with("# EOF"));
    // Auth failures are a family by reason: a reason shows once it happened.
    assert!(!text.contains("switchboard_auth_failures_total"));
    server.state.metrics.auth_failed("expired");
    let text = http(admin, "GET", "/metrics", &[], None).await.body;
    assert_eq!(
        sample(&text, "switchboard_auth_failures_total{reason=\"expired\"}"),
        1.0
    );

    // Every metric the sample Grafana dashboard queries exists.
    let grafana = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana-dashboard.json"
    ))
    .expect("deploy/grafana-dashboard.json");
    let grafana: serde_json::Value = serde_json::from_str(&grafana).expect("valid JSON");
    let mut queried = BTreeSet::new();
    for panel in grafana["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices("switchboard_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() > 10, "{queried:?}");
    for name in &queried {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{"))),
            "the Grafana dashboard queries {name}, which /metrics does not export"
        );
    }

    drop(alice);
    server
        .wait_for("alice's close counted", |s| {
            s.metrics.connections_open.get() == 1
        })
        .await;
    let text = http(admin, "GET", "/metrics", &[], None).await.body;
    assert_eq!(sample(&text, "switchboard_connections_open"), 1.0);
    let stats = get(admin, "/admin/api/stats").await.json();
    assert_eq!(stats["connections_open"], 1);
    assert_eq!(stats["messages_received_total"], 5);
    assert_eq!(stats["ready"], true);
    server.stop().await;
}

#[tokio::test]
async fn readyz_turns_not_ready_while_draining() {
    // A client that never answers the close keeps its session lingering,
    // so the drain lasts long enough to be seen.
    let server = start_with(|c| c.close_linger_ms = 3000).await;
    let admin = admin_addr(&server);
    let r = http(admin, "GET", "/readyz", &[], None).await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("ready"))
    );
    assert_eq!(http(admin, "GET", "/healthz", &[], None).await.status, 200);

    let _silent = server.connect("silent").await;
    let stopping = tokio::spawn(server.stop());
    let r = eventually("readyz to turn 503", async || {
        let r = http(admin, "GET", "/readyz", &[], None).await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(r.json()["status"], "draining");
    // Liveness still holds while draining.
    assert_eq!(http(admin, "GET", "/healthz", &[], None).await.status, 200);
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("stops")
        .expect("stop task");
    // After the drain the admin listener is gone too.
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "the admin listener stops last"
    );
}

#[test]
fn openapi_parser_reads_paths_and_methods() {
    let text = "openapi: 3.1.0\npaths:\n  /a:\n    get:\n      summary: x\n      parameters:\n    post:\n  /b/{id}:\n    delete:\ncomponents:\n  schemas:\n    get:\n";
    assert_eq!(
        openapi_routes(text),
        [
            ("GET".to_owned(), "/a".to_owned()),
            ("POST".to_owned(), "/a".to_owned()),
            ("DELETE".to_owned(), "/b/{id}".to_owned())
        ]
    );
}
