//! Retention per room pattern, enforced in the background by a real
//! server, and what erasure and retention leave in the redb file on disk.

use std::io::Read;
use switchboard::history::Backend as _;

use protocol::{ClientRequest, ServerFrame};
use switchboard::store::retention::RetentionRule;

use crate::support::{Client, DEADLINE, Fixture, POLL, TestServer, eventually_every};

fn rule(rooms: &str, max_count: u64) -> RetentionRule {
    RetentionRule {
        rooms: rooms.into(),
        max_age_secs: None,
        max_count: Some(max_count),
    }
}

/// Waits, bounded, until the store holds exactly `n` messages of `room`.
async fn wait_for_count(server: &TestServer, room: &str, n: usize) {
    eventually_every(
        &format!("{room} to hold {n} messages"),
        DEADLINE,
        POLL,
        async || {
            let page = server
                .state
                .store
                .history(room, None, None, 1000)
                .await
                .expect("history");
            let held = page.messages.len();
            (held == n).then_some(()).ok_or(format!("{held} messages"))
        },
    )
    .await;
}

async fn history_seqs(client: &mut Client, room: &str, before: Option<u64>) -> (Vec<u64>, bool) {
    let reply = client
        .request(ClientRequest::History {
            room: room.into(),
            before,
            after: None,
            limit: Some(50),
        })
        .await;
    match reply {
        ServerFrame::History { messages, more, .. } => {
            (messages.iter().map(|m| m.seq).collect(), more)
        }
        other => panic!("history: {other:?}"),
    }
}

#[tokio::test]
async fn retention_keeps_the_newest_of_matching_rooms_and_a_resume_into_the_gap_is_not_recovered() {
    let server = TestServer::start_with(Fixture::new(), |c| {
        c.retention = vec![rule("chat-*", 5)];
        c.retention_interval_ms = 20;
    })
    .await;
    let mut alice = server.connect("alice").await;
    for room in ["chat-a", "keep"] {
        alice.join(room).await;
    }
    for n in 1..=20 {
        alice.say("chat-a", &format!(r#"{{"n":{n}}}"#)).await;
        alice.say("keep", &format!(r#"{{"n":{n}}}"#)).await;
    }
    wait_for_count(&server, "chat-a", 5).await;

    let mut bob = server.connect("bob").await;
    let epoch = match bob.join("keep").await {
        ServerFrame::Joined { epoch, .. } => epoch,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        history_seqs(&mut bob, "keep", None).await,
        ((1..=20).collect(), false),
        "a room no rule matches keeps everything"
    );
    // Resume from a seq retention removed: not recovered, nothing replayed.
    let reply = bob
        .request(ClientRequest::Join {
            room: "chat-a".into(),
            since: Some(3),
            epoch: Some(epoch.clone()),
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Joined {
                recovered: Some(false),
                seq: 20,
                ..
            }
        ),
        "{reply:?}"
    );
    // History pages what is left.
    assert_eq!(
        history_seqs(&mut bob, "chat-a", None).await,
        ((16..=20).collect(), false)
    );
    assert_eq!(
        history_seqs(&mut bob, "chat-a", Some(16)).await,
        (Vec::new(), false)
    );
    // Paging the gap from `since`, as a client told `recovered: false` does,
    // starts at the oldest message kept.
    let reply = bob
        .request(ClientRequest::History {
            room: "chat-a".into(),
            before: None,
            after: Some(3),
            limit: Some(2),
        })
        .await;
    match reply {
        ServerFrame::History { messages, more, .. } => {
            let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
            assert_eq!((seqs, more), (vec![16, 17], true));
        }
        other => panic!("history: {other:?}"),
    }
    bob.request(ClientRequest::Leave {
        room: "chat-a".into(),
    })
    .await;
    // A resume inside what is kept replays as usual.
    let reply = bob
        .request(ClientRequest::Join {
            room: "chat-a".into(),
            since: Some(17),
            epoch: Some(epoch),
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Joined {
                recovered: Some(true),
                ..
            }
        ),
        "{reply:?}"
    );
    for seq in 18..=20 {
        match bob.next_message("chat-a").await {
            ServerFrame::Message { seq: s, .. } => assert_eq!(s, seq),
            other => panic!("{other:?}"),
        }
    }
    // Seqs continue.
    assert_eq!(alice.say("chat-a", r#"{"n":21}"#).await, 21);
    let fixture = server.stop().await;

    // And they continue after a restart, which also rewrote the file.
    let server = TestServer::start_with(fixture, |c| {
        c.retention = vec![rule("chat-*", 5)];
        c.retention_interval_ms = 20;
    })
    .await;
    assert_eq!(server.state.store.latest_seq("chat-a").await.unwrap(), 21);
    let mut alice = server.connect("alice").await;
    alice.join("chat-a").await;
    assert_eq!(alice.say("chat-a", r#"{"n":22}"#).await, 22);
    server.stop().await;
}

fn file_bytes(path: &std::path::Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    bytes
}

fn holds(bytes: &[u8], marker: &str) -> bool {
    bytes.windows(marker.len()).any(|w| w == marker.as_bytes())
}

/// What this proves: after the erasure and the expiry, the bytes of the
/// store file that a restarted server leaves on disk, and the bytes of a
/// backup taken while it runs, contain neither body, while a message kept
/// beside them is found by the same scan. Between the deletion and the
/// next start, the live file may still hold the bodies in pages redb
/// freed (it does not overwrite them); the test prints whether it did.
#[tokio::test]
async fn erased_and_expired_bodies_leave_the_file_and_backups() {
    let tag = format!("{:016x}", rand::random::<u64>());
    let (kept, erased, expired) = (
        format!("KEPT-{tag}"),
        format!("ERASED-{tag}"),
        format!("EXPIRED-{tag}"),
    );
    let tweak = |c: &mut switchboard::Config| {
        c.retention = vec![rule("gone-*", 1)];
        c.retention_interval_ms = 20;
        // The messages get indexed, so both indexes and log are exercised.
        c.index_batch = 2;
    };
    let server = TestServer::start_with(Fixture::new(), tweak).await;
    let mut alice = server.connect("alice").await;
    let mut mallory = server.connect("mallory").await;
    alice.join("keep").await;
    alice.join("gone-x").await;
    mallory.join("keep").await;
    // Bodies of several pages each: later commits reuse some freed pages,
    // rarely all of them, so a file that is not rewritten keeps copies.
    let big = |marker: &str| format!(r#"{{"text":"{}"}}"#, format!("{marker} ").repeat(1000));
    alice.say("keep", &big(&kept)).await;
    mallory.say("keep", &big(&erased)).await;
    alice.say("gone-x", &big(&expired)).await;
    alice.say("gone-x", r#"{"text":"newer"}"#).await;
    wait_for_count(&server, "gone-x", 1).await;
    assert_eq!(server.state.store.erase_user("mallory").await.unwrap(), 1);

    let db = server.fixture.path().join("data/switchboard.redb");
    let live = file_bytes(&db);
    eprintln!(
        "live file before the restart: erased body present: {}, expired body present: {}",
        holds(&live, &erased),
        holds(&live, &expired)
    );
    assert!(holds(&live, &kept), "the scan finds a stored body");

    let snapshot = server
        .state
        .store
        .local()
        .expect("single-node store")
        .backup(
            &server.fixture.path().join("data"),
            server.state.config.backup_cache_bytes,
        )
        .await
        .expect("backup");
    let mut backup = Vec::new();
    std::io::Read::read_to_end(&mut &snapshot.file, &mut backup).expect("read backup");
    assert_eq!(backup.len() as u64, snapshot.bytes);
    assert!(holds(&backup, &kept));
    assert!(!holds(&backup, &erased), "a backup holds no erased body");
    assert!(!holds(&backup, &expired), "a backup holds no expired body");
    drop((alice, mallory));

    let fixture = server.stop().await;
    let server = TestServer::start_with(fixture, tweak).await;
    let page = server
        .state
        .store
        .history("keep", None, None, 10)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 2);
    assert_eq!(page.messages[1].body, None, "still erased, seq kept");
    let fixture = server.stop().await;
    let bytes = file_bytes(&fixture.path().join("data/switchboard.redb"));
    assert!(holds(&bytes, &kept), "the scan finds a stored body");
    assert!(!holds(&bytes, &erased), "the file holds no erased body");
    assert!(!holds(&bytes, &expired), "the file holds no expired body");
}
