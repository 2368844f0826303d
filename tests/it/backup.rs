//! Online backup and restore with real parts: a server taking sends from
//! clients in their own tasks, the `switchboard backup` binary against its
//! admin API, and a second server started on the restored file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use switchboard::history::Backend as _;

use protocol::{ClientRequest, ServerFrame};
use switchboard::config::Secret;

use crate::admin::TOKEN;
use crate::support::{DEADLINE, Fixture, TestServer, wait_until};

const ROOMS: [&str; 2] = ["ops", "lobby"];
const SENDERS: usize = 4;
/// Most sends of one sender: the load is bounded in count (it stops well
/// before, once enough sends were acked after the backup).
const MAX_SENDS: usize = 5000;

/// Before the backup was asked for; while it ran; after it returned.
const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

#[derive(Debug, Clone)]
struct Acked {
    room: &'static str,
    seq: u64,
    body: String,
    /// The phase when the send was written to the socket.
    sent: u8,
    /// The phase when its ack arrived.
    acked: u8,
}

async fn backup_cli(admin: SocketAddr, token: &str, to: &Path) -> std::process::Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("backup")
        .arg("--to")
        .arg(to)
        .arg("--admin")
        .arg(admin.to_string())
        .env("SWITCHBOARD_ADMIN_TOKEN", token)
        .env_remove("SWITCHBOARD_CONFIG")
        .env_remove("SWITCHBOARD_ADMIN_LISTEN")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the backup command ends within the deadline")
        .expect("the backup command runs")
}

async fn start(fixture: Fixture) -> TestServer {
    TestServer::start_with(fixture, |c| {
        c.admin_token = Some(Secret::new(TOKEN));
        // Some messages are in the indexes, the newest only in the log.
        c.index_batch = 97;
    })
    .await
}

/// Every stored message of `room` in seq order, paged from the store.
async fn all_messages(server: &TestServer, room: &str) -> Vec<switchboard::history::StoredMessage> {
    let mut out = Vec::new();
    loop {
        let after = out
            .last()
            .map_or(0, |m: &switchboard::history::StoredMessage| m.seq);
        let page = server
            .state
            .store
            .history(room, None, Some(after), 200)
            .await
            .expect("history");
        let more = page.more;
        out.extend(page.messages);
        if !more {
            return out;
        }
    }
}

#[tokio::test]
async fn a_backup_under_load_restores_every_acked_message_with_dense_seqs_and_a_new_epoch() {
    let server = start(Fixture::new()).await;
    let admin = server.admin_addr.expect("admin listener");
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut client = server.connect(&format!("sender{s}")).await;
        for room in ROOMS {
            client.join(room).await;
        }
        let (phase, stop, acked) = (phase.clone(), stop.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            for n in 0..MAX_SENDS {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let room = ROOMS[n % ROOMS.len()];
                let body = format!(r#"{{"s":{s},"n":{n}}}"#);
                let sent = phase.load(Ordering::SeqCst);
                let seq = client.say(room, &body).await;
                let acked_in = phase.load(Ordering::SeqCst);
                acked.lock().unwrap().push(Acked {
                    room,
                    seq,
                    body,
                    sent,
                    acked: acked_in,
                });
            }
        }));
    }
    let count = |acked: &Arc<Mutex<Vec<Acked>>>| acked.lock().unwrap().len();
    wait_until("sends before the backup", || count(&acked) >= 150).await;

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("switchboard-backup.redb");
    phase.store(DURING, Ordering::SeqCst);
    let out = backup_cli(admin, TOKEN, &file).await;
    phase.store(AFTER, Ordering::SeqCst);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "backup failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let old_epoch = server.state.store.epoch().to_owned();
    assert!(
        stdout.contains(&format!("backup of epoch {old_epoch}")),
        "{stdout}"
    );
    assert!(!file.with_extension("partial").exists());

    // Sends go on after the backup; these are not in it.
    let after_backup = count(&acked);
    wait_until("sends after the backup", || {
        count(&acked) >= after_backup + 40
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        tokio::time::timeout(DEADLINE, s)
            .await
            .expect("senders stop")
            .expect("sender task");
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "acked: {} before the backup, {} while it ran, {} after",
        acked.iter().filter(|a| a.acked == BEFORE).count(),
        acked.iter().filter(|a| a.acked == DURING).count(),
        acked.iter().filter(|a| a.acked == AFTER).count()
    );
    let mut live_latest = Vec::new();
    for room in ROOMS {
        live_latest.push(server.state.store.latest_seq(room).await.expect("latest"));
    }
    server.stop().await;

    // Restore: the backup file as data_dir/switchboard.redb.
    let fixture = Fixture::new();
    std::fs::create_dir_all(fixture.path().join("data")).expect("data dir");
    std::fs::copy(&file, fixture.path().join("data/switchboard.redb")).expect("restore");
    let restored = start(fixture).await;
    let new_epoch = restored.state.store.epoch().to_owned();
    assert_ne!(new_epoch, old_epoch, "a restored backup has a new epoch");

    let mut checked = 0;
    for (room, live) in ROOMS.iter().zip(&live_latest) {
        let stored = all_messages(&restored, room).await;
        let latest = restored.state.store.latest_seq(room).await.expect("latest");
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=latest).collect::<Vec<_>>(),
            "{room}: dense from 1"
        );
        for a in acked.iter().filter(|a| a.room == *room) {
            if a.acked == BEFORE {
                let m = stored
                    .get(usize::try_from(a.seq).unwrap() - 1)
                    .unwrap_or_else(|| panic!("{room} seq {} acked before the backup", a.seq));
                assert_eq!(m.body.as_deref(), Some(a.body.as_str()), "{room} {}", a.seq);
                checked += 1;
            }
            if a.sent == AFTER {
                assert!(
                    a.seq > latest,
                    "{room}: seq {} sent after the backup",
                    a.seq
                );
            }
        }
        assert!(latest < *live, "{room}: the restore lost the later sends");
    }
    assert!(
        checked >= 150,
        "only {checked} messages acked before the backup"
    );

    // A client that saw the old server resumes with the old epoch: it is
    // told to page history, whether its seq is above the restored latest
    // (reused seqs) or below it.
    let latest = restored
        .state
        .store
        .latest_seq("ops")
        .await
        .expect("latest");
    let mut client = restored.connect("reader").await;
    for since in [latest + 5, latest - 3] {
        let reply = client
            .request(ClientRequest::Join {
                room: "ops".into(),
                since: Some(since),
                epoch: Some(old_epoch.clone()),
            })
            .await;
        match reply {
            ServerFrame::Joined {
                recovered, epoch, ..
            } => {
                assert_eq!(recovered, Some(false), "since {since}");
                assert_eq!(epoch, new_epoch);
            }
            other => panic!("join: {other:?}"),
        }
        client
            .request(ClientRequest::Leave { room: "ops".into() })
            .await;
    }
    // With the new epoch it resumes as usual, and seqs continue densely.
    let reply = client
        .request(ClientRequest::Join {
            room: "ops".into(),
            since: Some(latest - 2),
            epoch: Some(new_epoch.clone()),
        })
        .await;
    assert!(
        matches!(reply, ServerFrame::Joined { recovered: Some(true), seq, .. } if seq == latest),
        "{reply:?}"
    );
    for seq in [latest - 1, latest] {
        match client.next_message("ops").await {
            ServerFrame::Message { seq: s, replay, .. } => {
                assert_eq!((s, replay), (seq, true));
            }
            other => panic!("replay: {other:?}"),
        }
    }
    assert_eq!(
        client.say("ops", r#"{"after":"restore"}"#).await,
        latest + 1
    );

    // The restored file keeps its new epoch across a restart.
    let fixture = restored.stop().await;
    let again = start(fixture).await;
    assert_eq!(again.state.store.epoch(), new_epoch);
    again.stop().await;
}

#[tokio::test]
async fn a_backup_with_a_wrong_token_is_refused_and_writes_nothing() {
    let server = start(Fixture::new()).await;
    let admin = server.admin_addr.expect("admin listener");
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("b.redb");
    let out = backup_cli(admin, "not-the-admin-token-000", &file).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert!(!file.exists());
    assert!(!file.with_extension("partial").exists());
    server.stop().await;
}

/// A peer that answers the backup request with fewer bytes than its
/// `Content-Length` and hangs up, as a server dying mid-download would.
#[tokio::test]
async fn a_download_cut_off_midway_leaves_no_file() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let peer = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.expect("read");
            assert!(n > 0, "request cut short");
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        socket
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nX-Switchboard-Epoch: 00000000000000aa\r\n\r\nonly a few bytes")
            .await
            .expect("write");
        head
    });
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("b.redb");
    let out = backup_cli(addr, TOKEN, &file).await;
    let head = peer.await.expect("peer");
    assert!(
        head.starts_with("POST /admin/api/backup HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains(&format!("Authorization: Bearer {TOKEN}\r\n")));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cut off"), "{stderr}");
    assert!(!file.exists());
    assert!(!file.with_extension("partial").exists());
}
