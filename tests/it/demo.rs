//! The demo chat page in two real headless Chromiums (the dashboard test's
//! WebDriver harness): two users chat through the page served on the
//! gateway's TLS listener while the real server binary is SIGKILLed and
//! restarted, on the same port and data dir, in the middle of it. At the
//! end both pages show the same transcript: every message sent exactly
//! once, in seq order, with no gap. The first screen a newcomer sees is
//! the sign-in card alone; the chat replaces it once connected and stays
//! up through a reconnect.
//!
//! `SWITCHBOARD_UPDATE_SCREENSHOT=1` also writes the final screenshot to
//! `docs/chat.png`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::Value;

use crate::dashboard::Browser;
use crate::support::{DEADLINE, Fixture, Process, TestServer};

/// A page's transcript of the room: (seq, sender, text) per message shown.
async fn transcript(page: &Browser) -> Vec<(u64, String, String)> {
    let v = page
        .script(
            "return [...document.querySelectorAll('#messages li[data-seq]')].map(li => \
             [Number(li.dataset.seq), li.querySelector('.from').textContent, li.querySelector('.text').textContent]);",
        )
        .await;
    v.as_array()
        .expect("an array")
        .iter()
        .map(|m| {
            (
                m[0].as_u64().expect("seq"),
                m[1].as_str().expect("from").to_owned(),
                m[2].as_str().expect("text").to_owned(),
            )
        })
        .collect()
}

async fn enter(page: &Browser, url: &str, name: &str) {
    page.goto(url).await;
    page.wait_for(
        "the login form",
        "return document.readyState === 'complete' && !!document.getElementById('name')",
    )
    .await;
    page.type_into("#name", name).await;
    page.click("#enter").await;
    page.wait_for(
        "connected",
        "return document.getElementById('status').dataset.state === 'connected'",
    )
    .await;
}

async fn say(page: &Browser, text: &str) {
    let js = format!(
        "const t = document.getElementById('text'); t.value = {}; document.getElementById('send').click(); return true;",
        Value::String(text.to_owned())
    );
    page.script(&js).await;
}

#[tokio::test]
async fn two_pages_chat_through_a_server_kill_and_see_every_message_once() {
    let fixture = Fixture::new();
    let server = Process::start(&fixture).await;
    let addr = server.addr;
    let url = format!("https://localhost:{}/", addr.port());
    let alice = Browser::start().await;
    let bob = Browser::start().await;
    enter(&alice, &url, "alice").await;
    enter(&bob, &url, "bob").await;
    for page in [&alice, &bob] {
        page.wait_for(
            "both members shown",
            "return document.getElementById('members').textContent.includes('alice') && document.getElementById('members').textContent.includes('bob')",
        )
        .await;
    }

    let mut sent = BTreeSet::new();
    let mut server = Some(server);
    const ROUNDS: usize = 12;
    for i in 0..ROUNDS {
        let (a, b) = (format!("alice says {i}"), format!("bob says {i}"));
        say(&alice, &a).await;
        say(&bob, &b).await;
        sent.insert(("alice".to_owned(), a));
        sent.insert(("bob".to_owned(), b));
        if i == ROUNDS / 2 {
            // SIGKILL mid-stream; the pages keep sending while it is down.
            server.take().expect("running").kill().await;
            for page in [&alice, &bob] {
                page.wait_for(
                    "the page to notice",
                    "return document.getElementById('status').dataset.state !== 'connected'",
                )
                .await;
            }
            say(&alice, "alice says while down").await;
            say(&bob, "bob says while down").await;
            sent.insert(("alice".to_owned(), "alice says while down".to_owned()));
            sent.insert(("bob".to_owned(), "bob says while down".to_owned()));
            server = Some(Process::start_on(&fixture, addr, |_| {}).await);
        }
    }

    let want = sent.len();
    for page in [&alice, &bob] {
        page.wait_for(
            "every message shown and acked",
            &format!(
                "return document.querySelectorAll('#messages li[data-seq]').length >= {want} \
                 && document.querySelectorAll('#messages li.pending').length === 0 \
                 && document.getElementById('status').dataset.state === 'connected'"
            ),
        )
        .await;
    }
    let (ta, tb) = (transcript(&alice).await, transcript(&bob).await);
    assert_eq!(ta, tb, "both pages show the same transcript");
    let seqs: Vec<u64> = ta.iter().map(|m| m.0).collect();
    assert_eq!(
        seqs,
        (1..=want as u64).collect::<Vec<_>>(),
        "seq order, no gap, nothing twice"
    );
    let shown: BTreeSet<(String, String)> = ta.iter().map(|m| (m.1.clone(), m.2.clone())).collect();
    assert_eq!(shown.len(), ta.len(), "no message shown twice");
    assert_eq!(shown, sent, "every message sent is shown");
    let status = alice.text("status").await;
    assert_eq!(status, "connected (resumed)");

    // Alice starts typing: Bob's page says so in the screenshot.
    alice.type_into("#text", "see you").await;
    bob.wait_for(
        "the typing indicator",
        "return document.getElementById('typing').textContent.includes('alice')",
    )
    .await;
    let png = bob.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let artifact = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo-test.png");
    std::fs::write(&artifact, &png).expect("write screenshot");
    if std::env::var_os("SWITCHBOARD_UPDATE_SCREENSHOT").is_some() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/chat.png");
        std::fs::write(docs, &png).expect("write docs/chat.png");
    }
    drop((alice, bob));
    if let Some(server) = server {
        server.kill().await;
    }
}

/// Which of the page's elements (by id) a user can see: laid out, not
/// `display: none` or `visibility: hidden` themselves or through an
/// ancestor (`offsetParent` is null then), with a box on screen.
async fn shown(page: &Browser, ids: &[&str]) -> Vec<(String, bool)> {
    let js = format!(
        "return {}.map(id => {{ const e = document.getElementById(id); \
         if (!e) return [id, false]; const s = getComputedStyle(e); \
         return [id, s.display !== 'none' && s.visibility !== 'hidden' && e.offsetParent !== null && e.getClientRects().length > 0]; }});",
        Value::from(ids.to_vec())
    );
    let v = page.script(&js).await;
    v.as_array()
        .expect("an array")
        .iter()
        .map(|p| {
            (
                p[0].as_str().expect("id").to_owned(),
                p[1].as_bool().expect("bool"),
            )
        })
        .collect()
}

/// Asserts that each of `ids` is shown (`want`) or hidden (`!want`).
async fn assert_shown(page: &Browser, when: &str, ids: &[&str], want: bool) {
    let wrong: Vec<String> = shown(page, ids)
        .await
        .into_iter()
        .filter(|(_, s)| *s != want)
        .map(|(id, _)| format!("#{id}"))
        .collect();
    let should = if want { "shown" } else { "hidden" };
    assert!(
        wrong.is_empty(),
        "{when}: {} should be {should}",
        wrong.join(", ")
    );
}

/// The sign-in card and what it holds.
const SIGN_IN: [&str; 3] = ["login-panel", "name", "enter"];
/// The chat layout: rooms, members, messages, history, composer, status.
const CHAT: [&str; 7] = [
    "chat", "rooms", "members", "messages", "older", "composer", "status",
];

#[tokio::test]
async fn the_first_screen_is_the_sign_in_alone_and_the_chat_once_connected() {
    let fixture = Fixture::new();
    let server = Process::start(&fixture).await;
    let url = format!("https://localhost:{}/", server.addr.port());
    let page = Browser::start().await;
    page.goto(&url).await;
    page.wait_for(
        "the page loaded",
        "return document.readyState === 'complete' && !!document.getElementById('name')",
    )
    .await;

    assert_shown(&page, "before signing in", &SIGN_IN, true).await;
    assert_shown(&page, "before signing in", &CHAT, false).await;
    // The card is the screen's one thing: centred across the window.
    let off_centre = page
        .script(
            "const r = document.getElementById('login-panel').getBoundingClientRect(); \
             return Math.abs(r.left + r.width / 2 - window.innerWidth / 2);",
        )
        .await;
    assert!(
        off_centre.as_f64().expect("a number") < 2.0,
        "the sign-in card is centred: {off_centre} px off"
    );
    let png = page.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let artifact = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo-first-screen.png");
    std::fs::write(&artifact, &png).expect("write screenshot");

    page.type_into("#name", "carol").await;
    page.click("#enter").await;
    page.wait_for(
        "connected",
        "return document.getElementById('status').dataset.state === 'connected'",
    )
    .await;
    // The history button hides itself once the empty room has no older
    // messages, so it is not among what must show.
    let chat: Vec<&str> = CHAT.into_iter().filter(|id| *id != "older").collect();
    assert_shown(&page, "once connected", &chat, true).await;
    assert_shown(&page, "once connected", &SIGN_IN, false).await;

    // Losing the server leaves the chat up, saying it reconnects; the SDK
    // resumes the session, so there is nothing to sign in to again.
    server.kill().await;
    page.wait_for(
        "the page to notice",
        "return document.getElementById('status').dataset.state !== 'connected'",
    )
    .await;
    assert_shown(&page, "while reconnecting", &chat, true).await;
    assert_shown(&page, "while reconnecting", &SIGN_IN, false).await;
}

/// The whole answer to a plain `GET /` on `addr` (empty when the server
/// closed without one).
async fn get_root(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut answer))
        .await
        .expect("answered or closed within the deadline")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn the_page_is_on_in_dev_mode_and_off_with_auth_unless_enabled() {
    let plain = |c: &mut switchboard::Config| {
        c.plain_listen = Some("127.0.0.1:0".parse().expect("addr"));
    };
    let auth = |c: &mut switchboard::Config| {
        plain(c);
        c.auth_hs256_secret = Some(switchboard::config::Secret::new(
            "demo-test-secret-0123456789abcdef0123",
        ));
    };

    let dev = TestServer::start_with(Fixture::new(), plain).await;
    let page = get_root(dev.plain_addr.expect("plain")).await;
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.contains("<title>Switchboard demo chat</title>"));
    // The same listener still upgrades (`connect` waits for `welcome`).
    drop(dev.connect("alice").await);
    dev.stop().await;

    let off = TestServer::start_with(Fixture::new(), auth).await;
    let answer = get_root(off.plain_addr.expect("plain")).await;
    assert!(
        !answer.contains("demo chat"),
        "with auth the page is off: {answer}"
    );
    off.stop().await;

    let on = TestServer::start_with(Fixture::new(), |c| {
        auth(c);
        c.demo_page = Some(true);
    })
    .await;
    let page = get_root(on.plain_addr.expect("plain")).await;
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    on.stop().await;
}
