//! A full disk: the server refuses sends with `unavailable`, keeps
//! serving reads and pings, says so on `/readyz` and `/metrics`, and
//! recovers by itself once space is back, losing nothing it acked.
//!
//! The disk is a real tmpfs of a few MiB, mounted for the test (CI runs as
//! root); a test that cannot mount fails, it never skips. The client tests
//! (`client.rs`) fill it the same way to make the store answer `unavailable`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::{ClientRequest, ErrorCode, ServerFrame};
use switchboard::Config;

use crate::admin::http;
use crate::support::{Client, DEADLINE, Fixture, TestServer, json};

/// Size of the file system the data dir is on.
const DISK: &str = "size=8m";
/// Free space left beside the store before the sends begin.
pub(crate) const HEADROOM: u64 = 1 << 20;
/// The padding of each body: about the issue's 3 KB messages.
pub(crate) const PAD: usize = 3000;
/// Most sends before the disk must be full (HEADROOM / PAD is ~350).
const MAX_SENDS: u64 = 5000;
/// Retry interval of the store in these tests: long enough that the checks
/// made right after the first refusal see the store not yet retried.
const RETRY_MS: u64 = 2000;

/// A tmpfs mounted on a fresh temp dir, unmounted on drop.
pub(crate) struct Tmpfs {
    dir: tempfile::TempDir,
    /// Filler files written so far.
    fillers: std::cell::Cell<usize>,
}

impl Tmpfs {
    pub(crate) fn mount() -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", DISK, "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {} ({status}); this test needs root",
            dir.path().display()
        );
        Tmpfs {
            dir,
            fillers: std::cell::Cell::new(0),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    fn filler(&self, n: usize) -> PathBuf {
        self.path().join(format!("filler{n}"))
    }

    /// Writes another filler file, so that `left` bytes stay free.
    pub(crate) fn fill_leaving(&self, left: u64) {
        let st = rustix::fs::statvfs(self.path()).expect("statvfs");
        let free = st.f_bavail * st.f_frsize;
        let size = free.saturating_sub(left);
        let n = self.fillers.get();
        std::fs::write(
            self.filler(n),
            vec![0u8; usize::try_from(size).expect("size")],
        )
        .expect("write the filler");
        self.fillers.set(n + 1);
    }

    /// Removes every filler file.
    pub(crate) fn free_filler(&self) {
        for n in 0..self.fillers.replace(0) {
            std::fs::remove_file(self.filler(n)).expect("remove the filler");
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = self.dir.path();
        let ok = std::process::Command::new("umount")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file open: detach it.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(path)
                .status();
        }
    }
}

pub(crate) fn tweak(disk: &Tmpfs) -> impl FnOnce(&mut Config) {
    let data_dir = disk.data_dir();
    move |c: &mut Config| {
        c.data_dir = data_dir;
        c.store_retry_ms = RETRY_MS;
        c.store_cache_bytes = 1 << 20;
    }
}

fn body(i: u64) -> protocol::Body {
    json(&format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(PAD)))
}

async fn send(client: &mut Client, i: u64) -> ServerFrame {
    client
        .request(ClientRequest::Send {
            room: "disk".into(),
            body: body(i),
            key: Some(format!("k{i}")),
        })
        .await
}

/// Every message of the room, paged forward: seq -> the body's `i`.
async fn all_history(client: &mut Client) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for m in client.history_all("disk").await {
        let v: serde_json::Value =
            serde_json::from_str(m.body.as_ref().expect("body").get()).expect("json");
        out.insert(m.seq, v["i"].as_u64().expect("i"));
    }
    out
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

/// Resends `i` until it is acked, waiting the `retry_after_ms` that each
/// refusal names; returns the ack.
async fn resend_until_acked(client: &mut Client, i: u64) -> ServerFrame {
    let start = tokio::time::Instant::now();
    loop {
        match send(client, i).await {
            ServerFrame::Error {
                code: ErrorCode::Unavailable,
                retry_after_ms: Some(ms),
                ..
            } => {
                assert!(
                    start.elapsed() < DEADLINE,
                    "the store did not recover once space was back"
                );
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            ack @ ServerFrame::Ack { .. } => return ack,
            other => panic!("resend of {i}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_full_disk_refuses_sends_keeps_reads_and_recovers() {
    let disk = Tmpfs::mount();
    let server = TestServer::start_with(Fixture::new(), tweak(&disk)).await;
    let admin = server.admin_addr.expect("admin listener");
    let mut alice = server.connect("alice").await;
    let ServerFrame::Joined { epoch, .. } = alice.join("disk").await else {
        unreachable!()
    };
    // Bob reads history, and joins only once the sends stopped: a member
    // that does not read its socket would be closed as a slow consumer by
    // this many messages.
    let mut bob = server.connect("bob").await;
    disk.fill_leaving(HEADROOM);

    // Send until the disk is full.
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut refused = None;
    for i in 0..MAX_SENDS {
        match send(&mut alice, i).await {
            ServerFrame::Ack { seq, duplicate, .. } => {
                assert!(!duplicate);
                acked.insert(i, seq);
            }
            ServerFrame::Error {
                code: ErrorCode::Unavailable,
                retry_after_ms,
                ..
            } => {
                let ms = retry_after_ms.expect("unavailable carries retry_after_ms");
                assert!(ms > 0 && ms <= RETRY_MS, "retry_after_ms {ms}");
                refused = Some(i);
                break;
            }
            other => panic!("send {i}: {other:?}"),
        }
    }
    let refused = refused.expect("the disk filled up");
    assert!(
        !acked.is_empty(),
        "nothing was stored before the disk filled"
    );

    // The store says it cannot commit, and counts the failure.
    let ready = http(admin, "GET", "/readyz", &[], None).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let metrics = http(admin, "GET", "/metrics", &[], None).await.body;
    assert!(sample(&metrics, "switchboard_store_commit_failures_total") >= 1.0);

    // Reads and pings keep working.
    assert!(matches!(
        alice.request(ClientRequest::Ping).await,
        ServerFrame::Pong { .. }
    ));
    let history = all_history(&mut bob).await;
    for (i, seq) in &acked {
        assert_eq!(history.get(seq), Some(i), "acked {i} missing while full");
    }
    let last_acked = *acked.values().max().expect("acked");
    match bob
        .request(ClientRequest::Join {
            room: "disk".into(),
            since: Some(last_acked - 1),
            epoch: Some(epoch),
        })
        .await
    {
        ServerFrame::Joined { seq, .. } => assert_eq!(seq, last_acked),
        other => panic!("join while full: {other:?}"),
    }
    bob.recv_where(|f| matches!(f, ServerFrame::Message { seq, .. } if *seq == last_acked))
        .await;

    // Space comes back: the refused send goes through once, with its key.
    disk.free_filler();
    let ServerFrame::Ack { seq, duplicate, .. } = resend_until_acked(&mut alice, refused).await
    else {
        unreachable!()
    };
    assert!(!duplicate, "the failed commit must not have kept the key");
    match send(&mut alice, refused).await {
        ServerFrame::Ack {
            seq: again,
            duplicate,
            ..
        } => assert_eq!((again, duplicate), (seq, true)),
        other => panic!("second resend: {other:?}"),
    }
    acked.insert(refused, seq);
    for i in refused + 1..refused + 4 {
        match send(&mut alice, i).await {
            ServerFrame::Ack { seq, .. } => {
                acked.insert(i, seq);
            }
            other => panic!("send {i} after recovery: {other:?}"),
        }
    }
    let ready = http(admin, "GET", "/readyz", &[], None).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let metrics = http(admin, "GET", "/metrics", &[], None).await.body;
    assert_eq!(sample(&metrics, "switchboard_store_writable"), 1.0);

    // Every acked message is stored exactly once, seqs dense from 1.
    let history = all_history(&mut bob).await;
    let expected: BTreeMap<u64, u64> = acked.iter().map(|(i, seq)| (*seq, *i)).collect();
    assert_eq!(history, expected);
    let seqs: Vec<u64> = history.keys().copied().collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // The messages after the recovery were delivered live, too.
    let last = *seqs.last().expect("messages");
    alice
        .recv_where(|f| matches!(f, ServerFrame::Message { seq, .. } if *seq == last))
        .await;
    server.stop().await;
}

#[tokio::test]
async fn a_restart_with_too_little_space_says_how_much_it_needs() {
    let disk = Tmpfs::mount();
    let fixture = Fixture::new();
    // A log of about 2 MiB that the next start must index.
    let server = TestServer::start_with(fixture, tweak(&disk)).await;
    let mut alice = server.connect("alice").await;
    alice.join("disk").await;
    for i in 0..600 {
        assert!(matches!(send(&mut alice, i).await, ServerFrame::Ack { .. }));
    }
    drop(alice);
    let fixture = server.stop().await;
    disk.fill_leaving(64 << 10);

    let mut config = fixture.config();
    tweak(&disk)(&mut config);
    let listeners = switchboard::Listeners::default();
    let err = match switchboard::Server::start(config.clone(), listeners).await {
        Ok(_) => panic!("the store opened with 64 KiB free: this test no longer fills the disk"),
        Err(e) => e,
    };
    let file = std::fs::metadata(config.db_path()).expect("db").len();
    let text = format!("{:#}", anyhow::Error::from(err));
    assert!(
        text.contains("no space left") && text.contains(&format!("free at least {file} bytes")),
        "{text}"
    );

    // With the space back it starts, with every message.
    disk.free_filler();
    let server = TestServer::start_with(fixture, tweak(&disk)).await;
    let mut bob = server.connect("bob").await;
    let history = all_history(&mut bob).await;
    assert_eq!(history.len(), 600);
    assert_eq!(
        history.values().copied().collect::<Vec<_>>(),
        (0..600).collect::<Vec<_>>()
    );
    server.stop().await;
}
