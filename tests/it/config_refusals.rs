//! The real binary refuses, before it listens, the configurations that
//! would expose what must stay private: a dev-mode server on a non-loopback
//! admin address, and an admin listener facing a network without a token.

use std::process::Stdio;

use tokio::process::Command;

use crate::support::{DEADLINE, Fixture};

/// Runs `switchboard serve` with `args` in `fixture`'s directory and
/// returns whether it succeeded, its stdout and its stderr.
async fn serve(fixture: &Fixture, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = fixture.path();
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .arg("--tls-key")
        .arg(dir.join("server.key"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn")
        .env_remove("SWITCHBOARD_ADMIN_TOKEN")
        .env_remove("SWITCHBOARD_AUTH_HS256_SECRET")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("a refused server exits within the deadline")
        .expect("run switchboard");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_refuses_a_non_loopback_admin_listener() {
    let fixture = Fixture::new();
    let (ok, stdout, stderr) = serve(
        &fixture,
        &["--admin-listen", "0.0.0.0:0"],
        &[("SWITCHBOARD_ADMIN_TOKEN", "an-admin-token-of-16+")],
    )
    .await;
    assert!(!ok, "it started: {stdout}");
    assert!(!stdout.contains("listening"), "it listened first: {stdout}");
    assert!(
        stderr.contains("dev mode") && stderr.contains("admin_listen"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_facing_admin_listener_needs_a_token() {
    let fixture = Fixture::new();
    let secret = (
        "SWITCHBOARD_AUTH_HS256_SECRET",
        "a-client-token-secret-of-32-bytes-or-more",
    );
    let (ok, stdout, stderr) = serve(&fixture, &["--admin-listen", "0.0.0.0:0"], &[secret]).await;
    assert!(!ok, "it started: {stdout}");
    assert!(!stdout.contains("listening"), "it listened first: {stdout}");
    assert!(stderr.contains("no `admin_token`"), "{stderr}");
}
