//! Security: every attack of the threat model (SECURITY.md) against a real
//! server on loopback. Each test checks the documented refusal, that the
//! server keeps serving an honest client meanwhile, and, where messages
//! were sent, that nothing acknowledged is lost.

use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use protocol::{ClientRequest, ErrorCode, ServerFrame, Token, close};
use serde_json::json as j;
use switchboard::Config;
use switchboard::auth::now_unix;
use switchboard::config::{Rate, Secret};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, Fixture, TestServer, json, request_with};

const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";
const ADMIN: &str = "admin-token-for-the-security-tests";

/// Turns auth on with `SECRET`; the per-IP handshake rate is off, because
/// every test client comes from 127.0.0.1 (the test of that limit sets it).
fn with_auth(c: &mut Config) {
    c.auth_hs256_secret = Some(Secret::new(SECRET));
    c.admin_token = Some(Secret::new(ADMIN));
    c.handshake_rate_per_ip = Rate::OFF;
}

async fn auth_server(tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(Fixture::new(), |c| {
        with_auth(c);
        tweak(c);
    })
    .await
}

/// An HS256 token for `user` with `grants`, valid for an hour.
fn token(user: &str, grants: &[&str]) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        j!({"sub": user, "exp": now_unix() + 3600, "grants": grants}),
    )
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
}

fn ws_url(server: &TestServer, query: &str) -> String {
    format!("wss://localhost:{}/ws{query}", server.addr.port())
}

fn http_status(e: WsError) -> u16 {
    match e {
        WsError::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// Connects with `Authorization: Bearer TOKEN` and reads `welcome`.
async fn connect_bearer(server: &TestServer, token: &str) -> Client {
    let request = request_with(
        &ws_url(server, ""),
        &[("authorization", &format!("Bearer {token}"))],
    );
    let mut c = server.connect_request(request).await.expect("upgrade");
    assert!(matches!(c.recv().await, ServerFrame::Welcome { .. }));
    c
}

/// The HTTP status the upgrade with `Authorization: Bearer TOKEN` gets.
async fn bearer_status(server: &TestServer, token: &str) -> u16 {
    let request = request_with(
        &ws_url(server, ""),
        &[("authorization", &format!("Bearer {token}"))],
    );
    http_status(
        server
            .connect_request(request)
            .await
            .err()
            .expect("refused"),
    )
}

/// An honest client still chats: join, send, ack.
async fn still_serving(server: &TestServer) {
    let mut c = connect_bearer(server, &token("honest", &["*:rw"])).await;
    c.join("lobby").await;
    c.say("lobby", "\"still here\"").await;
}

fn close_code(
    frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>,
) -> (u16, String) {
    let frame = frame.expect("a close frame");
    (u16::from(frame.code), frame.reason.to_string())
}

fn error_code(frame: &ServerFrame) -> Option<ErrorCode> {
    match frame {
        ServerFrame::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_taken_from_the_header_the_query_or_a_first_frame() {
    let server = auth_server(|_| {}).await;
    let t = token("alice", &["general:rw"]);

    // Authorization: Bearer.
    let mut c = server
        .connect_request(request_with(
            &ws_url(&server, ""),
            &[("authorization", &format!("Bearer {t}"))],
        ))
        .await
        .expect("upgrade");
    match c.recv().await {
        ServerFrame::Welcome { user, .. } => assert_eq!(user, "alice"),
        other => panic!("{other:?}"),
    }
    // ?token= for browsers.
    let mut c = server
        .connect_raw(&ws_url(&server, &format!("?token={t}")))
        .await
        .expect("upgrade");
    assert!(matches!(c.recv().await, ServerFrame::Welcome { user, .. } if user == "alice"));
    // A first `auth` frame, so the token is in no URL or proxy log.
    let mut c = server
        .connect_raw(&ws_url(&server, ""))
        .await
        .expect("upgrade");
    c.send(ClientRequest::Auth {
        token: Token(t.clone()),
    })
    .await;
    assert!(matches!(c.recv().await, ServerFrame::Welcome { user, .. } if user == "alice"));
    c.join("general").await;
    c.say("general", "\"hi\"").await;
    // `?user=` means nothing once auth is on: no token, no identity.
    let mut c = server
        .connect_raw(&ws_url(&server, "?user=mallory"))
        .await
        .expect("upgrade");
    c.send(ClientRequest::Join {
        room: "general".into(),
        since: None,
        epoch: None,
    })
    .await;
    let (code, reason) = close_code(c.expect_close().await);
    assert_eq!(code, close::UNAUTHORIZED.code);
    assert!(reason.contains("first frame must be `auth"), "{reason}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_401_before_the_upgrade() {
    let server = auth_server(|c| {
        c.auth_issuer = Some("switchboard-tests".into());
        c.auth_audience = Some("chat".into());
        c.auth_leeway_secs = 0;
    })
    .await;
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let now = now_unix();
    let good = j!({"sub": "alice", "exp": now + 600, "iss": "switchboard-tests", "aud": "chat", "grants": ["lobby:rw"]});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    // The good token passes.
    let _alice = connect_bearer(&server, &sign(Algorithm::HS256, &key, good.clone())).await;

    let alg_none = {
        use base64_url as b64;
        format!(
            "{}.{}.",
            b64::encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64::encode(good.to_string().as_bytes())
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", alg_none, "malformed"),
        (
            "wrong algorithm (HS384)",
            sign(Algorithm::HS384, &key, good.clone()),
            "bad_algorithm",
        ),
        (
            "bad signature",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!"),
                good.clone(),
            ),
            "bad_signature",
        ),
        (
            "expired",
            sign(Algorithm::HS256, &key, with("exp", j!(now - 60))),
            "expired",
        ),
        (
            "no exp",
            sign(Algorithm::HS256, &key, {
                let mut c = good.clone();
                c.as_object_mut().expect("object").remove("exp");
                c
            }),
            "missing_claim",
        ),
        (
            "not yet valid",
            sign(Algorithm::HS256, &key, with("nbf", j!(now + 600))),
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            sign(Algorithm::HS256, &key, with("iss", j!("elsewhere"))),
            "bad_issuer",
        ),
        (
            "wrong audience",
            sign(Algorithm::HS256, &key, with("aud", j!("billing"))),
            "bad_audience",
        ),
        ("malformed", "not.a.jwt".to_owned(), "malformed"),
        (
            "bad subject",
            sign(Algorithm::HS256, &key, with("sub", j!("no spaces allowed"))),
            "bad_subject",
        ),
    ];
    for (what, token, label) in &cases {
        let before = server.state.metrics.auth_failures_for(label);
        assert_eq!(bearer_status(&server, token).await, 401, "{what}");
        // The same refusal through ?token=.
        let e = server
            .connect_raw(&ws_url(&server, &format!("?token={token}")))
            .await
            .err()
            .expect("refused");
        assert_eq!(http_status(e), 401, "{what} in the query");
        assert_eq!(
            server.state.metrics.auth_failures_for(label),
            before + 2,
            "{what} is counted as {label}"
        );
    }
    // An honest client (with this server's issuer and audience) still chats.
    let mut honest = connect_bearer(
        &server,
        &sign(Algorithm::HS256, &key, with("sub", j!("honest"))),
    )
    .await;
    honest.join("lobby").await;
    honest.say("lobby", "\"still here\"").await;
    server.stop().await;
}

/// A small URL-safe base64 without padding, to hand-craft `alg: none`.
mod base64_url {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn encodes_like_rfc4648() {
        assert_eq!(encode(b"f"), "Zg");
        assert_eq!(encode(b"fo"), "Zm8");
        assert_eq!(encode(b"foo"), "Zm9v");
        assert_eq!(encode(b"\xfb\xff"), "-_8");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_verify_with_a_public_key_file() {
    // RS256: the committed test key pair (tests/fixtures/README.md).
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let rsa_private = std::fs::read(fixtures.join("rs256-test.key")).expect("rsa key");
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.auth_rs256_public_key = Some(fixtures.join("rs256-test.pub"));
        c.handshake_rate_per_ip = Rate::OFF;
    })
    .await;
    let rsa = EncodingKey::from_rsa_pem(&rsa_private).expect("rsa pem");
    let claims = j!({"sub": "rita", "exp": now_unix() + 600});
    let _rita = connect_bearer(&server, &sign(Algorithm::RS256, &rsa, claims.clone())).await;
    // An HS256 token made with the public key as the secret (the classic
    // algorithm-confusion attack) is refused.
    let public = std::fs::read(fixtures.join("rs256-test.pub")).expect("pub");
    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&public), claims);
    assert_eq!(bearer_status(&server, &confused).await, 401);
    server.stop().await;

    // ES256: a fresh P-256 key pair.
    let pair = rcgen::KeyPair::generate().expect("p256");
    let fixture = Fixture::new();
    let public_path = fixture.path().join("es256.pub");
    std::fs::write(&public_path, pair.public_key_pem()).expect("write pub");
    let server = TestServer::start_with(fixture, |c| {
        c.auth_es256_public_key = Some(public_path.clone());
        c.handshake_rate_per_ip = Rate::OFF;
    })
    .await;
    let ec = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("ec pem");
    let claims = j!({"sub": "eve", "exp": now_unix() + 600});
    let _eve = connect_bearer(&server, &sign(Algorithm::ES256, &ec, claims.clone())).await;
    let other = rcgen::KeyPair::generate().expect("p256");
    let forged = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).expect("ec pem");
    assert_eq!(
        bearer_status(&server, &sign(Algorithm::ES256, &forged, claims)).await,
        401
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frame_auth_failures_close_with_4001() {
    let server = auth_server(|c| c.handshake_timeout_ms = 500).await;
    // A bad token in the first frame: 4001 with the reason.
    let mut c = server
        .connect_raw(&ws_url(&server, ""))
        .await
        .expect("upgrade");
    c.send(ClientRequest::Auth {
        token: Token("not.a.jwt".into()),
    })
    .await;
    let (code, reason) = close_code(c.expect_close().await);
    assert_eq!(code, 4001);
    assert!(
        reason.starts_with("unauthorized: token is malformed"),
        "{reason}"
    );
    // Silence after the upgrade: 4001 at the handshake timeout.
    let mut c = server
        .connect_raw(&ws_url(&server, ""))
        .await
        .expect("upgrade");
    let (code, reason) = close_code(c.expect_close().await);
    assert_eq!(code, 4001);
    assert!(reason.contains("handshake timeout"), "{reason}");
    // Garbage as the first frame.
    let mut c = server
        .connect_raw(&ws_url(&server, ""))
        .await
        .expect("upgrade");
    c.send_text("{{{{").await;
    let (code, _) = close_code(c.expect_close().await);
    assert_eq!(code, 4001);
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_replaces_the_token_and_expiry_closes_with_4001() {
    // Warn an hour ahead, so a token valid for 10 minutes is warned at once.
    let server = auth_server(|c| {
        c.token_expiry_warning_secs = 3600;
        c.auth_leeway_secs = 0;
    })
    .await;
    let mut c = connect_bearer(&server, &token("alice", &["general:rw", "team-*:r"])).await;
    match c.recv().await {
        ServerFrame::TokenExpiring { expires_at } => assert!(expires_at > now_unix()),
        other => panic!("expected token_expiring, got {other:?}"),
    }
    c.join("general").await;
    c.join("team-a").await;
    // A token for someone else is refused; the session goes on.
    let reply = c
        .request(ClientRequest::Refresh {
            token: Token(token("bob", &["*:rw"])),
        })
        .await;
    assert_eq!(
        error_code(&reply),
        Some(ErrorCode::Unauthorized),
        "{reply:?}"
    );
    // A good token for alice with fewer grants: team-a is left.
    let id = c
        .send(ClientRequest::Refresh {
            token: Token(token("alice", &["general:rw"])),
        })
        .await;
    let left = c
        .recv_where(|f| matches!(f, ServerFrame::Left { room, .. } if room == "team-a"))
        .await;
    assert!(matches!(left, ServerFrame::Left { id: None, .. }));
    assert!(matches!(
        c.reply_to(id).await,
        ServerFrame::Refreshed { .. }
    ));
    c.say("general", "\"after refresh\"").await;

    // A token that expires in a second closes the session with 4001.
    let short = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        j!({"sub": "brief", "exp": now_unix() + 1}),
    );
    let mut brief = connect_bearer(&server, &short).await;
    let (code, reason) = close_code(brief.expect_close().await);
    assert_eq!(code, 4001);
    assert!(reason.contains("expired"), "{reason}");
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_limit_rooms_and_forbidden_leaks_nothing() {
    let server = auth_server(|_| {}).await;
    let mut alice = connect_bearer(&server, &token("alice", &["general:rw", "team-*:r"])).await;
    let mut boss = connect_bearer(&server, &token("boss", &["*:rw"])).await;
    boss.join("secret").await;
    boss.say("secret", "\"the plan\"").await;

    alice.join("general").await;
    alice.say("general", "\"hello\"").await;
    alice.join("team-a").await;
    // Read-only: no send, no typing.
    for req in [
        ClientRequest::Send {
            room: "team-a".into(),
            body: json("\"x\""),
            key: None,
        },
        ClientRequest::Typing {
            room: "team-a".into(),
        },
    ] {
        let reply = alice.request(req).await;
        assert_eq!(error_code(&reply), Some(ErrorCode::Forbidden), "{reply:?}");
    }
    // No grant: join and history of a busy room and of an empty one get
    // the same answer, so the refusal says nothing about the room.
    let mut answers = Vec::new();
    for room in ["secret", "nobody-here"] {
        let join = alice
            .request(ClientRequest::Join {
                room: room.into(),
                since: None,
                epoch: None,
            })
            .await;
        let history = alice
            .request(ClientRequest::History {
                room: room.into(),
                before: None,
                after: None,
                limit: Some(10),
            })
            .await;
        for reply in [join, history] {
            match reply {
                ServerFrame::Error { code, message, .. } => {
                    assert_eq!(code, ErrorCode::Forbidden);
                    answers.push(message.replace(room, "ROOM"));
                }
                other => panic!("expected forbidden, got {other:?}"),
            }
        }
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert!(!answers[0].contains("boss") && !answers[0].contains("plan"));

    // Direct messages: open to the two users with no grant, to no one else.
    let mut bob = connect_bearer(&server, &token("bob", &[])).await;
    bob.join("dm:alice:bob").await;
    alice.join("dm:alice:bob").await;
    let seq = bob.say("dm:alice:bob", "\"psst\"").await;
    assert!(
        matches!(alice.next_message("dm:alice:bob").await, ServerFrame::Message { seq: s, .. } if s == seq)
    );
    let mut carol = connect_bearer(&server, &token("carol", &["*:rw"])).await;
    for room in ["dm:alice:bob", "dm:bob:alice"] {
        let reply = carol
            .request(ClientRequest::Join {
                room: room.into(),
                since: None,
                epoch: None,
            })
            .await;
        assert_eq!(error_code(&reply), Some(ErrorCode::Forbidden), "{room}");
    }
    // Nothing acknowledged was lost.
    let reply = boss
        .request(ClientRequest::History {
            room: "secret".into(),
            before: None,
            after: None,
            limit: Some(10),
        })
        .await;
    assert!(matches!(reply, ServerFrame::History { messages, .. } if messages.len() == 1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_never_accepted_on_the_client_socket() {
    let server = auth_server(|_| {}).await;
    assert_eq!(bearer_status(&server, ADMIN).await, 401);
    let admin_claim = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        j!({"sub": "root", "exp": now_unix() + 600, "admin": true}),
    );
    assert_eq!(bearer_status(&server, &admin_claim).await, 401);
    // Nor in a first frame.
    let mut c = server
        .connect_raw(&ws_url(&server, ""))
        .await
        .expect("upgrade");
    c.send(ClientRequest::Auth {
        token: Token(ADMIN.into()),
    })
    .await;
    let (code, reason) = close_code(c.expect_close().await);
    assert_eq!(code, 4001);
    assert_eq!(server.state.metrics.auth_failures_for("admin_token"), 3);
    // The answer is the one any other bad token gets, word for word, so
    // the client port cannot confirm a guess of the admin token.
    let mut near = ADMIN.to_owned();
    near.pop();
    near.push('!');
    assert_eq!(
        bearer_refusal(&server, ADMIN).await,
        bearer_refusal(&server, &near).await
    );
    let mut c = server
        .connect_raw(&ws_url(&server, ""))
        .await
        .expect("upgrade");
    c.send(ClientRequest::Auth { token: Token(near) }).await;
    assert_eq!(close_code(c.expect_close().await), (code, reason));
    still_serving(&server).await;
    server.stop().await;
}

/// The status and body of the refusal of an upgrade with `token`.
async fn bearer_refusal(server: &TestServer, token: &str) -> (u16, String) {
    let request = request_with(
        &ws_url(server, ""),
        &[("authorization", &format!("Bearer {token}"))],
    );
    match server.connect_request(request).await.err() {
        Some(WsError::Http(response)) => (
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_gets_rate_limited_then_closed_with_4101_and_nothing_acked_is_lost() {
    let server = auth_server(|c| {
        c.send_rate_per_session = Rate::new(1, 5);
        c.rate_limit_strikes = 5;
    })
    .await;
    let mut flood = connect_bearer(&server, &token("flood", &["*:rw"])).await;
    let mut honest = connect_bearer(&server, &token("honest2", &["*:rw"])).await;
    flood.join("busy").await;
    honest.join("busy").await;
    let mut acked = Vec::new();
    let mut retry_seen = false;
    let close = loop {
        let sent = flood
            .try_send(ClientRequest::Send {
                room: "busy".into(),
                body: json("\"spam\""),
                key: None,
            })
            .await;
        if sent.is_err() {
            break flood.expect_close().await;
        }
        let reply = tokio::time::timeout(crate::support::DEADLINE, flood.ws.next())
            .await
            .expect("reply")
            .and_then(Result::ok);
        match reply {
            Some(Message::Text(t)) => match ServerFrame::from_json(t.as_str()).expect("frame") {
                ServerFrame::Ack { seq, .. } => acked.push(seq),
                ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    retry_after_ms,
                    ..
                } => {
                    assert!(retry_after_ms.is_some_and(|ms| ms > 0));
                    retry_seen = true;
                }
                ServerFrame::Error { code, .. } => panic!("unexpected error {code:?}"),
                // Its own messages and presence come back too.
                _ => {}
            },
            Some(Message::Close(frame)) => break frame,
            Some(_) => {}
            None => break None,
        }
        assert!(acked.len() < 100, "the flood was never limited");
    };
    assert!(retry_seen, "rate_limited came before the close");
    let (code, reason) = close_code(close);
    assert_eq!(code, close::RATE_LIMITED.code);
    assert!(reason.contains("retry_after_ms="), "{reason}");
    // The honest client is still served, and every acked flood message is stored.
    honest.say("busy", "\"fine\"").await;
    let reply = honest
        .request(ClientRequest::History {
            room: "busy".into(),
            before: None,
            after: None,
            limit: Some(200),
        })
        .await;
    let ServerFrame::History { messages, .. } = reply else {
        panic!("history");
    };
    for seq in &acked {
        assert!(
            messages.iter().any(|m| m.seq == *seq),
            "acked {seq} is stored"
        );
    }
    assert!(server.state.metrics.rate_limited.get() >= 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_history_floods_are_limited_too() {
    let server = auth_server(|c| {
        c.join_rate_per_user = Rate::new(1, 2);
        c.history_rate_per_session = Rate::new(1, 2);
    })
    .await;
    // The per-user join bucket is shared by the user's two sessions.
    let t = token("joiner", &["*:rw"]);
    let mut a = connect_bearer(&server, &t).await;
    let mut b = connect_bearer(&server, &t).await;
    a.join("r1").await;
    b.join("r2").await;
    let reply = a
        .request(ClientRequest::Join {
            room: "r3".into(),
            since: None,
            epoch: None,
        })
        .await;
    assert_eq!(error_code(&reply), Some(ErrorCode::RateLimited));
    for i in 0..3 {
        let reply = b
            .request(ClientRequest::History {
                room: "r2".into(),
                before: None,
                after: None,
                limit: Some(1),
            })
            .await;
        let limited = error_code(&reply) == Some(ErrorCode::RateLimited);
        assert_eq!(limited, i == 2, "history #{i}: {reply:?}");
    }
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_per_user_per_ip_and_handshake_rate() {
    let server = auth_server(|c| {
        c.max_connections_per_user = 1;
        c.max_connections_per_ip = 3;
    })
    .await;
    let t = token("solo", &["*:rw"]);
    let _first = connect_bearer(&server, &t).await;
    assert_eq!(bearer_status(&server, &t).await, 429);
    // With first-frame auth the cap shows after the upgrade: close 1013.
    let mut c = server
        .connect_raw(&ws_url(&server, ""))
        .await
        .expect("upgrade");
    c.send(ClientRequest::Auth { token: Token(t) }).await;
    let (code, _) = close_code(c.expect_close().await);
    assert_eq!(code, close::TRY_AGAIN_LATER.code);
    drop(c);
    let ip: std::net::IpAddr = [127, 0, 0, 1].into();
    server
        .wait_for("refused connections to free their slots", |s| {
            s.limits.connections_per_ip.count(&ip) == 1
        })
        .await;
    // Per IP: three slots, one held by `_first`.
    let _two = connect_bearer(&server, &token("u2", &[])).await;
    let _three = connect_bearer(&server, &token("u3", &[])).await;
    assert_eq!(bearer_status(&server, &token("u4", &[])).await, 429);
    server.stop().await;

    // The handshake rate per IP: a burst of 3, then dropped before TLS.
    let server = auth_server(|c| c.handshake_rate_per_ip = Rate::new(1, 3)).await;
    let t = token("storm", &[]);
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let request = request_with(
            &ws_url(&server, ""),
            &[("authorization", &format!("Bearer {t}"))],
        );
        outcomes.push(server.connect_request(request).await.is_ok());
    }
    assert_eq!(outcomes[..3], [true, true, true]);
    assert!(!outcomes[4], "the storm is cut off: {outcomes:?}");
    assert!(server.state.metrics.rate_limited.get() >= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allow_list_stops_cross_site_websocket_hijacking() {
    let server = auth_server(|c| c.allowed_origins = vec!["https://chat.example".into()]).await;
    let t = token("alice", &["*:rw"]);
    let url = ws_url(&server, &format!("?token={t}"));
    let e = server
        .connect_request(request_with(&url, &[("origin", "https://evil.example")]))
        .await
        .err()
        .expect("refused");
    assert_eq!(http_status(e), 403);
    let mut ok = server
        .connect_request(request_with(&url, &[("origin", "https://chat.example")]))
        .await
        .expect("allowed origin");
    assert!(matches!(ok.recv().await, ServerFrame::Welcome { .. }));
    // Non-browser clients send no Origin and are judged by their token alone.
    let _bot = connect_bearer(&server, &t).await;
    server.stop().await;

    // Dev mode has no origin check (and serves loopback only).
    let dev = TestServer::start().await;
    let mut c = dev
        .connect_request(request_with(
            &dev.url("dev"),
            &[("origin", "https://evil.example")],
        ))
        .await
        .expect("dev mode ignores Origin");
    assert!(matches!(c.recv().await, ServerFrame::Welcome { .. }));
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_refuses_to_start_on_a_public_address() {
    let fixture = Fixture::new();
    let mut config = fixture.config();
    config.listen = "0.0.0.0:0".parse().expect("addr");
    let result = switchboard::Server::start(config, switchboard::Listeners::default()).await;
    let err = result.err().expect("refused");
    assert!(err.to_string().contains("loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_upgrade_is_dropped_at_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = auth_server(|c| c.handshake_timeout_ms = 400).await;
    // TLS completes, then the HTTP request trickles in a byte at a time.
    // Measured from before the connect, so the server's clock (which starts
    // at accept) cannot have run longer: an early hang-up fails the test.
    let started = std::time::Instant::now();
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("tcp");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = server
        .fixture
        .tls_connector()
        .connect(name, tcp)
        .await
        .expect("tls");
    let trickle = async {
        for b in b"GET /ws HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if tls.write_all(&[*b]).await.is_err() {
                return;
            }
            // The pace of a slowloris: the server must see bytes keep
            // coming, too slowly to finish, until its timeout.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut buf = [0u8; 16];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(std::time::Duration::from_millis(1), tls.read(&mut buf)).await
            {
                return;
            }
        }
    };
    tokio::time::timeout(crate::support::DEADLINE, trickle)
        .await
        .expect("the server hangs up");
    // Not before the timeout: a lower bound, which a slow machine can only
    // make easier to meet, so it cannot fail a correct server.
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
    // The hang-up is the server giving up on the handshake (counted just
    // after the socket closes).
    server
        .wait_for("the handshake counted as failed", |s| {
            s.metrics.handshake_failures.get() == 1
        })
        .await;
    still_serving(&server).await;
    server.stop().await;
}

/// Runs `switchboard token ...` with the secret in the environment.
fn mint_with_cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("token")
        .args(args)
        .env("SWITCHBOARD_AUTH_HS256_SECRET", SECRET)
        .env_remove("SWITCHBOARD_CONFIG")
        .output()
        .expect("run switchboard token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_without_dropping_live_connections() {
    use crate::support::Process;
    let fixture = Fixture::new();
    let mut process = Process::start_with(&fixture, |c| {
        c.env("SWITCHBOARD_AUTH_HS256_SECRET", SECRET);
    })
    .await;
    // `switchboard token` mints what the server accepts, grants included.
    let t = mint_with_cli(&[
        "--user",
        "alice",
        "--grant",
        "general:rw",
        "--grant",
        "team-*:r",
        "--ttl",
        "1h",
    ]);
    let url = format!("wss://localhost:{}/ws?token={t}", process.addr.port());
    let old_ca = fixture.tls_connector();
    let mut live = crate::support::connect_tls(process.addr, &old_ca, &url)
        .await
        .expect("connect");
    assert!(matches!(live.recv().await, ServerFrame::Welcome { user, .. } if user == "alice"));
    live.join("general").await;
    live.join("team-a").await;
    let reply = live
        .request(ClientRequest::Send {
            room: "team-a".into(),
            body: json("\"x\""),
            key: None,
        })
        .await;
    assert_eq!(error_code(&reply), Some(ErrorCode::Forbidden));
    let before = live.say("general", "\"before the reload\"").await;

    // A new CA and certificate replace the files; SIGHUP loads them.
    let fresh = switchboard::tls::generate_dev_certs().expect("certs");
    let new_ca_path = fixture.path().join("new-ca.pem");
    std::fs::write(&new_ca_path, &fresh.ca_pem).expect("write");
    std::fs::write(fixture.path().join("server.pem"), &fresh.cert_pem).expect("write");
    std::fs::write(fixture.path().join("server.key"), &fresh.key_pem).expect("write");
    process.signal("-HUP");
    let new_ca = crate::support::tls_connector(&new_ca_path);
    let mut fresh_client = crate::support::eventually_every(
        "the new certificate to be served after SIGHUP",
        crate::support::DEADLINE,
        crate::support::POLL,
        async || {
            crate::support::connect_tls(process.addr, &new_ca, &url)
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
    assert!(matches!(
        fresh_client.recv().await,
        ServerFrame::Welcome { .. }
    ));
    // The old certificate is no longer served to a new client (a fresh
    // connector, without a session ticket to resume with)...
    let old_ca_fresh = crate::support::tls_connector(&fixture.ca_path());
    assert!(
        crate::support::connect_tls(process.addr, &old_ca_fresh, &url)
            .await
            .is_err()
    );
    // ...and the connection made before the reload lives on.
    let after = live.say("general", "\"after the reload\"").await;
    assert_eq!(after, before + 1);
    process.signal("-TERM");
    assert!(process.wait_success().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_joins_at_most_max_rooms_per_session() {
    let server = auth_server(|c| c.max_rooms_per_session = 3).await;
    let mut c = connect_bearer(&server, &token("collector", &["*:rw"])).await;
    for room in ["a", "b", "c"] {
        c.join(room).await;
    }
    let reply = c
        .request(ClientRequest::Join {
            room: "d".into(),
            since: None,
            epoch: None,
        })
        .await;
    assert_eq!(error_code(&reply), Some(ErrorCode::Forbidden), "{reply:?}");
    // Rejoining a room already joined is no new room; leaving frees a slot.
    c.join("a").await;
    let left = c.request(ClientRequest::Leave { room: "c".into() }).await;
    assert!(matches!(left, ServerFrame::Left { .. }));
    c.join("d").await;
    c.say("d", "\"fits now\"").await;
    still_serving(&server).await;
    server.stop().await;
}
