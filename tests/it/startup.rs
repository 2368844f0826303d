//! Start-up order: the real binary opens everything that can fail before
//! it binds and announces a listener, so a broken store never shows a
//! listening address to anyone.
//!
//! The test starts the `switchboard` binary as a child and waits for it by
//! PID; it stops only the process it started.

use std::process::Stdio;

use tokio::process::Command;

use crate::support::{DEADLINE, Fixture};

#[tokio::test]
async fn a_garbage_store_exits_with_a_clear_message_before_listening() {
    let fixture = Fixture::new();
    let dir = fixture.path();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let db = data.join("switchboard.redb");
    std::fs::write(&db, "this is not a redb file\n".repeat(512)).expect("garbage");
    let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .arg("--tls-key")
        .arg(dir.join("server.key"))
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn switchboard");
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("the server exits within the deadline")
        .expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exited {}", out.status);
    assert!(
        !stdout.contains("listening") && !stdout.contains("admin on"),
        "announced a listener before failing:\n{stdout}"
    );
    assert!(
        stderr.contains("cannot open the history store")
            && stderr.contains(&db.display().to_string()),
        "no clear message naming the file:\n{stderr}"
    );
}
