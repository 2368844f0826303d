//! The TypeScript SDK's own tests (clients/js, node's test runner), run
//! from the Rust test binary so that `cargo test` and `./scripts/test` run
//! them against the binary this build made.
//!
//! They need `node` and `npm` and the SDK's dev dependencies:
//! `./scripts/test` runs `npm ci` in clients/js first. When any is missing
//! the test fails and says so; it never skips. Among them are the reconnect
//! policy's table (`protocol/reconnect-policy.json`, test/policy.test.mjs)
//! and sends made while a full disk answers `unavailable`
//! (test/disk.test.mjs, which mounts a tmpfs: it runs as root, as
//! `disk.rs` does).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// The whole SDK suite starts a dozen servers one after another.
const SUITE_DEADLINE: Duration = Duration::from_secs(300);

/// The SDK's directory.
pub fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// Fails unless `npm ci` has run in clients/js.
pub fn require_node_modules() {
    let modules = sdk_dir().join("node_modules");
    assert!(
        modules.join("typescript").is_dir() && modules.join("ws").is_dir(),
        "{} is missing the SDK's dev dependencies: run ./scripts/test, which runs `npm ci` there",
        modules.display()
    );
}

/// All of a pipe's text (what could be read of it).
async fn drain(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let mut s = String::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_string(&mut s).await;
    }
    s
}

#[tokio::test]
async fn typescript_sdk_passes_its_tests_against_the_real_server() {
    require_node_modules();
    let mut child = Command::new("npm")
        .arg("test")
        .current_dir(sdk_dir())
        .env("SWITCHBOARD_BIN", env!("CARGO_BIN_EXE_switchboard"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `npm test` (are node and npm installed?): {e}"));
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let outcome = tokio::time::timeout(SUITE_DEADLINE, async {
        let (out, err) = tokio::join!(drain(stdout), drain(stderr));
        (child.wait().await, out, err)
    })
    .await;
    let (status, out, err) = outcome.expect("the SDK suite finishes within its deadline");
    let status = status.expect("npm test ran");
    assert!(
        status.success(),
        "the SDK's tests failed ({status}):\n{out}\n{err}"
    );
    // Node's runner ends with `# pass N` / `# fail 0`: at least the suites here ran.
    let passed = out
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(passed >= 30, "only {passed} SDK tests passed:\n{out}");
}
