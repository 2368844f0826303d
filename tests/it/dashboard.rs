//! The live dashboard in a real headless Chromium, driven by chromedriver
//! over the WebDriver HTTP protocol.
//!
//! The test opens `/dashboard`, types the admin token, sees the connection
//! count go up when a client connects, kicks that client with the table's
//! button, and checks the client got close 4009. It needs Debian's
//! `chromium` and `chromium-driver`: `./scripts/test` installs them. When
//! they are missing the test fails and says so; it never skips.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::admin::{self, TOKEN, http};
use crate::support::{DEADLINE, eventually_every};

/// How often the browser is asked again: each look is a WebDriver round
/// trip, so less often than the server-side [`crate::support::POLL`].
const BROWSER_POLL: Duration = Duration::from_millis(50);

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Chromium's first start in a fresh profile can be slow on a small machine.
const BROWSER_START: Duration = Duration::from_secs(60);

/// Finds an executable on `PATH` (or at a Debian path).
fn find(name: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        let p = PathBuf::from("/usr/bin").join(name);
        p.is_file().then_some(p)
    })
}

/// A chromedriver process and one browser session, both ended on drop.
pub struct Browser {
    driver: SocketAddr,
    session: String,
    child: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        let missing = "needs Debian's `chromium` and `chromium-driver`; run ./scripts/test, which installs them";
        let chromium = find("chromium")
            .unwrap_or_else(|| panic!("chromium not found: the dashboard test {missing}"));
        let chromedriver = find("chromedriver")
            .unwrap_or_else(|| panic!("chromedriver not found: the dashboard test {missing}"));
        // A free loopback port for chromedriver: bind, read, release.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let what = format!("chromedriver to come up on {driver}");
        eventually_every(&what, DEADLINE, BROWSER_POLL, async || {
            tokio::net::TcpStream::connect(driver)
                .await
                .map_err(|e| e.to_string())?;
            let status = http(driver, "GET", "/status", &[], None).await;
            if status.status == 200 && status.json()["value"]["ready"] == true {
                Ok(())
            } else {
                Err(format!("status {}", status.status))
            }
        })
        .await;
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--window-size=1400,1100".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                // The demo page's test opens https:// with a development certificate.
                "acceptInsecureCerts": true,
                "goog:chromeOptions": { "binary": chromium, "args": args },
            }}
        });
        let body = caps.to_string();
        let created = tokio::time::timeout(
            BROWSER_START,
            http(driver, "POST", "/session", &[], Some(&body)),
        )
        .await
        .expect("chromium starts");
        let value = created.json()["value"].clone();
        let session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {}", created.body))
            .to_owned();
        Browser {
            driver,
            session,
            child,
            _profile: profile,
        }
    }

    /// Runs a WebDriver command; returns its `value` or the error.
    pub async fn try_cmd(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Value> {
        let path = format!("/session/{}{path}", self.session);
        let body = body.map(|b| b.to_string());
        let r = http(self.driver, method, &path, &[], body.as_deref()).await;
        let v = r.json()["value"].clone();
        if r.status == 200 { Ok(v) } else { Err(v) }
    }

    pub async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path} failed: {e}"))
    }

    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await;
    }

    pub async fn find(&self, css: &str) -> Result<String, Value> {
        let v = self
            .try_cmd(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        Ok(v[ELEMENT].as_str().expect("element id").to_owned())
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self
            .find(css)
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Clicks the element `css` selects, finding it again if the page
    /// re-rendered it in between (the tables refresh every two seconds).
    pub async fn click(&self, css: &str) {
        let what = format!("a click on {css}");
        eventually_every(&what, DEADLINE, BROWSER_POLL, async || {
            let el = self.find(css).await.map_err(|e| e.to_string())?;
            self.try_cmd("POST", &format!("/element/{el}/click"), Some(json!({})))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await;
    }

    pub async fn script(&self, js: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": js, "args": [] })),
        )
        .await
    }

    /// The text of the element with this id.
    pub async fn text(&self, id: &str) -> String {
        let js =
            format!("const e = document.getElementById({id:?}); return e ? e.textContent : null;");
        self.script(&js)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the element's text is `want`; fails at the deadline.
    pub async fn wait_text(&self, id: &str, want: &str) {
        let what = format!("#{id} to show {want:?}");
        eventually_every(&what, DEADLINE, BROWSER_POLL, async || {
            let got = self.text(id).await;
            if got == want {
                Ok(())
            } else {
                Err(format!("#{id} shows {got:?}"))
            }
        })
        .await;
    }

    pub async fn wait_for(&self, what: &str, js: &str) {
        eventually_every(what, DEADLINE, BROWSER_POLL, async || {
            match self.script(js).await {
                Value::Bool(true) => Ok(()),
                other => Err(other.to_string()),
            }
        })
        .await;
    }

    pub async fn screenshot(&self) -> Vec<u8> {
        let b64 = self.cmd("GET", "/screenshot", None).await;
        base64_decode(b64.as_str().expect("base64 PNG"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (chromedriver closes Chromium), blocking briefly;
        // chromedriver itself is killed on drop of `child`.
        use std::io::{Read, Write};
        let path = format!("/session/{}", self.session);
        if let Ok(mut s) =
            std::net::TcpStream::connect_timeout(&self.driver, Duration::from_secs(2))
        {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let req = format!(
                "DELETE {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.driver
            );
            if s.write_all(req.as_bytes()).is_ok() {
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.child.start_kill();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().fold(0u32, |acc, c| (acc << 6) | value(*c)) << (6 * (4 - chunk.len()));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[tokio::test]
async fn dashboard_shows_a_connection_and_kicks_it() {
    let server = admin::start().await;
    let admin_addr = admin::admin_addr(&server);
    let browser = Browser::start().await;

    browser
        .goto(&format!("http://{admin_addr}/dashboard"))
        .await;
    browser
        .wait_for(
            "the login form",
            "return !document.getElementById('login-panel').hidden",
        )
        .await;
    browser.type_into("#token", TOKEN).await;
    browser.click("#login").await;
    browser.wait_text("conn-open", "0").await;
    let url = browser.script("return location.href").await;
    assert!(
        !url.as_str().unwrap_or_default().contains(TOKEN),
        "the token never goes into the URL"
    );

    // A client connects: the count goes up and its row appears.
    let (mut client, id) = admin::connect_with_id(&server, "webdriver-alice").await;
    client.join("general").await;
    client
        .say("general", r#"{"text":"hello from the test"}"#)
        .await;
    browser.wait_text("conn-open", "1").await;
    let button = format!("button[data-kick=\"{id}\"]");
    browser
        .wait_for(
            "the client's row",
            &format!("return !!document.querySelector({button:?})"),
        )
        .await;

    // The nodes table: alone, one node, this one.
    browser
        .wait_for(
            "the nodes table",
            "return !!document.querySelector('tr[data-node=\"standalone\"]')",
        )
        .await;

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let artifact = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-test.png");
    std::fs::write(&artifact, &png).expect("write screenshot");

    // Kick it from the table: the client gets 4009 and the count drops.
    browser.click(&button).await;
    let frame = client.expect_close().await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::from(4009));
    assert_eq!(frame.reason.as_str(), "kicked");
    browser.wait_text("conn-open", "0").await;
    browser
        .wait_for(
            "the kick noted",
            "return document.getElementById('action').textContent.includes('kicked session')",
        )
        .await;

    // A wrong token is refused and sends the page back to the login form.
    browser.script("sessionStorage.setItem('switchboard.adminToken', 'wrong-token-0123456789'); return true").await;
    browser.cmd("POST", "/refresh", Some(json!({}))).await;
    browser.wait_for("the login form after a refused token", "return document.readyState === 'complete' && !document.getElementById('login-panel').hidden && document.getElementById('login-error').textContent.length > 0").await;

    let audit = admin::get(admin_addr, "/admin/api/audit").await.json();
    assert_eq!(audit["entries"][0]["action"], "kick_session");
    assert_eq!(audit["entries"][0]["params"]["session"], id.as_str());
    drop(browser);
    server.stop().await;
}

#[test]
fn base64_decodes() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGVsbG8h"), b"hello!");
    assert_eq!(base64_decode("aGk="), b"hi");
}
