//! Store tests on a real redb file in a temp dir.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

use super::*;

/// Records what the writer handed over, and when, relative to commits.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, u64)>>,
    batches: Mutex<Vec<usize>>,
}

impl CommitSink for Recorder {
    fn committed(&self, msgs: &[Committed<'_>]) {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(msgs.iter().map(|m| (m.room.to_owned(), m.seq)));
    }
    fn batch_committed(&self, operations: usize, _elapsed: Duration) {
        self.batches.lock().unwrap().push(operations);
    }
}

fn opts() -> StoreOptions {
    StoreOptions {
        durability: Durability::Immediate,
        max_batch: 1024,
        queue_capacity: 4096,
        idempotency_ttl: Duration::from_secs(3600),
    }
}

fn open(dir: &tempfile::TempDir) -> (Store, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let store = Store::open(&dir.path().join("db.redb"), opts(), rec.clone()).unwrap();
    (store, rec)
}

fn append(
    room: &str,
    from: &str,
    body: &str,
    key: Option<&str>,
) -> (Append, oneshot::Receiver<Result<Appended, AppendError>>) {
    let (reply, rx) = oneshot::channel();
    (
        Append {
            room: Arc::from(room),
            from: Arc::from(from),
            body: RawValue::from_string(body.to_owned()).unwrap(),
            key: key.map(str::to_owned),
            reply,
        },
        rx,
    )
}

async fn send(h: &StoreHandle, room: &str, from: &str, body: &str, key: Option<&str>) -> Appended {
    let (a, rx) = append(room, from, body, key);
    h.append(a).await.unwrap();
    rx.await.unwrap().unwrap()
}

#[tokio::test]
async fn seq_continues_after_reopen_and_epoch_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir);
    let h = store.handle();
    for i in 1..=3 {
        assert_eq!(send(&h, "a", "u", "1", None).await.seq, i);
    }
    assert_eq!(send(&h, "b", "u", "1", None).await.seq, 1);
    let epoch = h.epoch().to_owned();
    drop(h);
    tokio::task::spawn_blocking(move || store.shutdown())
        .await
        .unwrap()
        .unwrap();
    let (store, _) = open(&dir);
    let h = store.handle();
    assert_eq!(h.epoch(), epoch);
    assert_eq!(h.latest_seq("a").await.unwrap(), 3);
    assert_eq!(h.latest_seq("nope").await.unwrap(), 0);
    assert_eq!(send(&h, "a", "u", "1", None).await.seq, 4);
}

#[tokio::test]
async fn group_commit_batches_and_the_sink_sees_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rec) = open(&dir);
    let h = store.handle();
    let mut rxs = Vec::new();
    for i in 0..500 {
        let (a, rx) = append(if i % 2 == 0 { "even" } else { "odd" }, "u", "1", None);
        h.try_append(a).unwrap();
        rxs.push(rx);
    }
    for rx in rxs {
        rx.await.unwrap().unwrap();
    }
    assert!(h.commits() < 500, "{} commits for 500 appends", h.commits());
    let batches = rec.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 500);
    let seen = rec.seen.lock().unwrap().clone();
    for room in ["even", "odd"] {
        let seqs: Vec<u64> = seen
            .iter()
            .filter(|(r, _)| r == room)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(seqs, (1..=250).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn idempotency_keys_dedupe_within_a_batch_and_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rec) = open(&dir);
    let h = store.handle();
    let (a1, r1) = append("r", "alice", "1", Some("k"));
    let (a2, r2) = append("r", "alice", "2", Some("k"));
    h.try_append(a1).unwrap();
    h.try_append(a2).unwrap();
    let first = r1.await.unwrap().unwrap();
    let second = r2.await.unwrap().unwrap();
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!(
        second,
        Appended {
            duplicate: true,
            ..first
        }
    );
    // Another user's key is another key.
    assert_eq!(send(&h, "r", "bob", "3", Some("k")).await.seq, 2);
    assert_eq!(
        rec.seen.lock().unwrap().len(),
        2,
        "duplicates are not delivered"
    );
    drop(h);
    tokio::task::spawn_blocking(move || store.shutdown())
        .await
        .unwrap()
        .unwrap();
    let (store, _) = open(&dir);
    let h = store.handle();
    let again = send(&h, "r", "alice", "4", Some("k")).await;
    assert_eq!(
        again,
        Appended {
            duplicate: true,
            ..first
        }
    );
    assert_eq!(h.latest_seq("r").await.unwrap(), 2);
}

#[tokio::test]
async fn expired_keys_store_again() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let store = Store::open(
        &dir.path().join("db.redb"),
        StoreOptions {
            idempotency_ttl: Duration::ZERO,
            ..opts()
        },
        rec,
    )
    .unwrap();
    let h = store.handle();
    assert_eq!(send(&h, "r", "a", "1", Some("k")).await.seq, 1);
    let again = send(&h, "r", "a", "1", Some("k")).await;
    assert_eq!((again.seq, again.duplicate), (2, false));
}

#[tokio::test]
async fn history_pages_and_read_after() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir);
    let h = store.handle();
    for i in 1..=10 {
        send(&h, "h", "u", &i.to_string(), None).await;
    }
    let seqs = |p: Page| (p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), p.more);
    assert_eq!(
        seqs(h.history("h", None, None, 4).await.unwrap()),
        (vec![7, 8, 9, 10], true)
    );
    assert_eq!(
        seqs(h.history("h", None, None, 10).await.unwrap()),
        ((1..=10).collect(), false)
    );
    assert_eq!(
        seqs(h.history("h", Some(7), None, 4).await.unwrap()),
        (vec![3, 4, 5, 6], true)
    );
    assert_eq!(
        seqs(h.history("h", Some(3), None, 4).await.unwrap()),
        (vec![1, 2], false)
    );
    assert_eq!(
        seqs(h.history("h", None, Some(6), 4).await.unwrap()),
        (vec![7, 8, 9, 10], false)
    );
    assert_eq!(
        seqs(h.history("h", None, Some(5), 4).await.unwrap()),
        (vec![6, 7, 8, 9], true)
    );
    assert_eq!(
        seqs(h.history("h", Some(6), Some(2), 10).await.unwrap()),
        (vec![3, 4, 5], false)
    );
    assert_eq!(
        seqs(h.history("h", Some(1), None, 10).await.unwrap()),
        (vec![], false)
    );
    assert_eq!(
        seqs(h.history("other", None, None, 10).await.unwrap()),
        (vec![], false)
    );
    let after = h.read_after("h", 8, 100).await.unwrap();
    assert_eq!(after.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![9, 10]);
    assert_eq!(after[0].body.as_deref(), Some("9"));
    assert_eq!(after[0].from, "u");
}

#[tokio::test]
async fn erase_keeps_seqs_and_export_lists_a_users_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir);
    let h = store.handle();
    send(&h, "r1", "alice", "1", None).await;
    send(&h, "r1", "bob", "2", None).await;
    send(&h, "r2", "alice", "3", None).await;
    let mine = h.messages_by_user("alice").await.unwrap();
    assert_eq!(
        mine.iter()
            .map(|(r, m)| (r.as_str(), m.seq))
            .collect::<Vec<_>>(),
        vec![("r1", 1), ("r2", 1)]
    );
    assert_eq!(h.erase_user("alice").await.unwrap(), 2);
    assert_eq!(
        h.erase_user("alice").await.unwrap(),
        0,
        "erasing twice finds nothing new"
    );
    let page = h.history("r1", None, None, 10).await.unwrap();
    let view: Vec<_> = page
        .messages
        .iter()
        .map(|m| (m.seq, m.body.clone()))
        .collect();
    assert_eq!(view, vec![(1, None), (2, Some("2".to_owned()))]);
}

#[tokio::test]
async fn shutdown_commits_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir);
    let h = store.handle();
    let mut rxs = Vec::new();
    for _ in 0..300 {
        let (a, rx) = append("s", "u", "1", None);
        h.try_append(a).unwrap();
        rxs.push(rx);
    }
    tokio::task::spawn_blocking(move || store.shutdown())
        .await
        .unwrap()
        .unwrap();
    for rx in rxs {
        assert!(rx.await.unwrap().is_ok());
    }
    let (a, _rx) = append("s", "u", "1", None);
    assert!(
        h.try_append(a).is_err(),
        "appends after shutdown are refused"
    );
    drop(h);
    let (store, _) = open(&dir);
    assert_eq!(store.handle().latest_seq("s").await.unwrap(), 300);
}
