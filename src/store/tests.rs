//! Store tests on a real redb file in a temp dir.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

use super::tables::OLD_BY_USER;
use super::*;
use crate::history::{Appended, Committed};
use serde_json::value::RawValue;

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
        index_batch: 16_384,
        index_batch_bytes: 1 << 20,
        queue_capacity: 4096,
        queue_bytes: 1 << 20,
        idempotency_ttl: Duration::from_secs(3600),
        cache_bytes: 4 << 20,
        retry_interval: Duration::from_millis(50),
        probe_bytes: 1024,
        backup_cache_bytes: 1 << 20,
        purge_on_start: true,
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

/// What a room's reads must return, built from every message sent to it.
struct Model {
    room: &'static str,
    /// (from, body) of seq 1, 2, ...
    sent: Vec<(String, Option<String>)>,
}

impl Model {
    fn expect(&self, low: u64, high: u64, limit: usize, forward: bool) -> Page {
        let all: Vec<StoredMessage> = self
            .sent
            .iter()
            .zip(1u64..)
            .filter(|(_, seq)| (low..high).contains(seq))
            .map(|((from, body), seq)| StoredMessage {
                seq,
                from: from.clone(),
                ts: 0,
                body: body.clone(),
            })
            .collect();
        let more = all.len() > limit;
        let messages = if forward {
            all.into_iter().take(limit).collect()
        } else {
            let skip = all.len().saturating_sub(limit);
            all.into_iter().skip(skip).collect()
        };
        Page { messages, more }
    }

    /// Checks latest_seq, history with every kind of bound and read_after
    /// against the model, at many bounds and limits.
    async fn check(&self, h: &StoreHandle) {
        let n = self.sent.len() as u64;
        assert_eq!(h.latest_seq(self.room).await.unwrap(), n);
        let points = [
            0,
            1,
            2,
            37,
            63,
            64,
            65,
            n / 2,
            n.saturating_sub(1),
            n,
            n + 1,
        ];
        let no_ts = |mut p: Page| {
            p.messages.iter_mut().for_each(|m| m.ts = 0);
            p
        };
        for limit in [1usize, 7, 64, 65, 500] {
            let got = no_ts(h.history(self.room, None, None, limit).await.unwrap());
            assert_eq!(
                got,
                self.expect(1, u64::MAX, limit, false),
                "latest {limit} of {n}"
            );
            for p in points {
                let got = no_ts(h.history(self.room, Some(p), None, limit).await.unwrap());
                let want = self.expect(1, p, limit, false);
                assert_eq!(got, want, "before {p}, limit {limit}, of {n}");
                let got = no_ts(h.history(self.room, None, Some(p), limit).await.unwrap());
                let want = self.expect(p + 1, u64::MAX, limit, true);
                assert_eq!(got, want, "after {p}, limit {limit}, of {n}");
                let got = no_ts(
                    h.history(self.room, Some(p + 40), Some(p), limit)
                        .await
                        .unwrap(),
                );
                let want = self.expect(p + 1, p + 40, limit, true);
                assert_eq!(
                    got,
                    want,
                    "between {p} and {}, limit {limit}, of {n}",
                    p + 40
                );
                let got = h.read_after(self.room, p, limit).await.unwrap();
                let want = self.expect(p + 1, u64::MAX, limit, true).messages;
                assert_eq!(
                    no_ts(Page {
                        messages: got,
                        more: false
                    })
                    .messages,
                    want
                );
            }
        }
    }
}

/// Sends `count` messages to the model's room (alternating senders), each
/// committed alone, and another to room "other" after every tenth.
async fn fill(h: &StoreHandle, model: &mut Model, count: usize) {
    for _ in 0..count {
        let from = if model.sent.len() % 3 == 0 {
            "u1"
        } else {
            "u2"
        };
        let body = format!("{}", model.sent.len() + 1);
        let seq = send(h, model.room, from, &body, None).await.seq;
        model.sent.push((from.to_owned(), Some(body)));
        assert_eq!(seq, model.sent.len() as u64);
        if model.sent.len() % 10 == 0 {
            send(h, "other", "u1", "0", None).await;
        }
    }
}

fn open_with(dir: &tempfile::TempDir, (index_batch, index_batch_bytes): (u64, u64)) -> Store {
    let opts = StoreOptions {
        durability: Durability::None,
        index_batch,
        index_batch_bytes,
        ..opts()
    };
    Store::open(
        &dir.path().join("db.redb"),
        opts,
        Arc::new(Recorder::default()),
    )
    .unwrap()
}

#[tokio::test]
async fn reads_match_every_message_sent_in_the_log_the_indexes_and_across_chunks() {
    // 37: flushes land at odd points, so a room's messages are split
    // between the indexes and the log in many ways. 150: one flush writes
    // more of a room than one chunk holds. 2,000 bytes: the byte bound
    // starts the flushes.
    for index_batch in [(37, 1 << 20), (150, 1 << 20), (1 << 20, 2_000)] {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with(&dir, index_batch);
        let h = store.handle();
        let mut model = Model {
            room: "m",
            sent: Vec::new(),
        };
        model.check(&h).await;
        // The most messages the bounds let the log hold (about 32 bytes each).
        let most = usize::try_from(index_batch.0.min(index_batch.1 / 30)).unwrap();
        for step in [1, 35, 1, 1, 27, 1, 1, 80, 53] {
            fill(&h, &mut model, step).await;
            model.check(&h).await;
            let held = h.unindexed.len();
            assert!(held <= most, "{held} unindexed with bounds {index_batch:?}");
        }
        // Export and erasure reach messages wherever they are.
        let mine = h.messages_by_user("u1").await.unwrap();
        let in_m = mine.iter().filter(|(r, _)| r == "m").count();
        let sent_by_u1 = model.sent.iter().filter(|(f, _)| f == "u1").count();
        assert_eq!(in_m, sent_by_u1, "index_batch {index_batch:?}");
        assert_eq!(mine.len(), sent_by_u1 + model.sent.len() / 10);
        fill(&h, &mut model, 5).await;
        let erased = h.erase_user("u1").await.unwrap();
        let sent_by_u1 = model.sent.iter().filter(|(f, _)| f == "u1").count();
        assert_eq!(erased as usize, sent_by_u1 + model.sent.len() / 10);
        for (from, body) in &mut model.sent {
            if from == "u1" {
                *body = None;
            }
        }
        model.check(&h).await;
        fill(&h, &mut model, 3).await;
        model.check(&h).await;
    }
}

#[tokio::test]
async fn messages_left_in_the_log_are_indexed_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&dir, (1_000, 1 << 20));
    let h = store.handle();
    let mut model = Model {
        room: "m",
        sent: Vec::new(),
    };
    fill(&h, &mut model, 130).await;
    drop(h);
    tokio::task::spawn_blocking(move || store.shutdown())
        .await
        .unwrap()
        .unwrap();
    let path = dir.path().join("db.redb");
    let logged = |path: &Path| {
        let db = Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let log = txn.open_table(LOG).unwrap();
        let mut n = 0;
        for batch in log.iter().unwrap() {
            n += LogBatch::entries(batch.unwrap().1.value()).unwrap().len();
        }
        n
    };
    assert_eq!(
        logged(&path),
        143,
        "shutdown leaves the log to the next open"
    );
    let store = open_with(&dir, (1_000, 1 << 20));
    let h = store.handle();
    model.check(&h).await;
    fill(&h, &mut model, 2).await;
    model.check(&h).await;
    drop(h);
    tokio::task::spawn_blocking(move || store.shutdown())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(logged(&path), 2, "only what came after the reopen is left");
}

#[tokio::test]
async fn a_file_from_before_the_log_and_chunks_reads_and_erases_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    // The old layout: one bare record per message, a sender entry per
    // message.
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut messages = txn.open_table(MESSAGES).unwrap();
            let mut old = txn.open_table(OLD_BY_USER).unwrap();
            for (seq, from) in [(1, "alice"), (2, "bob"), (3, "alice")] {
                let body = seq.to_string();
                let record = Record {
                    ts: seq,
                    from,
                    body: Some(&body),
                };
                messages
                    .insert(("r", seq), record.encode().unwrap().as_slice())
                    .unwrap();
                old.insert((from, "r", seq), ()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let (store, _) = open(&dir);
    let h = store.handle();
    assert_eq!(h.latest_seq("r").await.unwrap(), 3);
    let page = h.history("r", None, None, 10).await.unwrap();
    let view: Vec<_> = page
        .messages
        .iter()
        .map(|m| (m.seq, m.from.as_str()))
        .collect();
    assert_eq!(view, [(1, "alice"), (2, "bob"), (3, "alice")]);
    assert_eq!(send(&h, "r", "alice", "4", None).await.seq, 4);
    let mine = h.messages_by_user("alice").await.unwrap();
    let seqs: Vec<u64> = mine.iter().map(|(_, m)| m.seq).collect();
    assert_eq!(seqs, [1, 3, 4]);
    assert_eq!(h.erase_user("alice").await.unwrap(), 3);
    let page = h.history("r", None, None, 10).await.unwrap();
    let bodies: Vec<_> = page.messages.iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(bodies, [None, Some("2"), None, None]);
}

#[tokio::test]
async fn queued_appends_are_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let opts = StoreOptions {
        queue_bytes: 100,
        ..opts()
    };
    let store = Store::open(&dir.path().join("db.redb"), opts, rec).unwrap();
    let h = store.handle();
    let body = format!("\"{}\"", "x".repeat(58));
    // The writer takes the first append and waits for the database.
    let held = h.db.hold();
    let (first, first_rx) = append("r", "u", &body, None);
    h.try_append(first).unwrap();
    let (second, _) = append("r", "u", &body, None);
    assert_eq!(h.try_append(second).unwrap_err(), TryAppendError::Full);
    // One larger than the whole bound still goes, once the queue is empty.
    drop(held);
    assert_eq!(first_rx.await.unwrap().unwrap().seq, 1);
    let big = format!("\"{}\"", "x".repeat(500));
    assert_eq!(send(&h, "r", "u", &big, None).await.seq, 2);
    // The writer gives the bytes back after the replies: wait for them.
    assert_eq!(send(&h, "r", "u", &body, None).await.seq, 3);
}

#[tokio::test]
async fn the_page_cache_stays_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cache = 256 << 10;
    let opts = StoreOptions {
        cache_bytes: cache,
        index_batch: 64,
        durability: Durability::None,
        ..opts()
    };
    let store = Store::open(
        &dir.path().join("db.redb"),
        opts,
        Arc::new(Recorder::default()),
    )
    .unwrap();
    let h = store.handle();
    let body = format!("\"{}\"", "x".repeat(2000));
    // About 4 MiB written to the log and the indexes, then read back.
    for i in 0..2000u64 {
        send(&h, &format!("r{}", i % 7), "u", &body, None).await;
    }
    for r in 0..7 {
        let page = h
            .history(&format!("r{r}"), None, Some(0), 200)
            .await
            .unwrap();
        assert_eq!(page.messages.len(), 200);
    }
    let used = h.db.with(|db| db.cache_stats().used_bytes()).unwrap();
    assert!(used <= cache, "the cache holds {used} bytes, over {cache}");
}

#[tokio::test]
async fn the_log_read_back_is_the_unindexed_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir);
    let h = store.handle();
    for i in 0..50u64 {
        let room = format!("r{}", i % 3);
        send(
            &h,
            &room,
            &format!("u{}", i % 2),
            &format!("{{\"i\":{i}}}"),
            None,
        )
        .await;
    }
    let (msgs, len, bytes) = h.db.with(writer::read_log).unwrap().unwrap();
    assert_eq!(len, 50);
    assert!(bytes > 0);
    // A re-open's reload gives what the writer built commit by commit.
    let copy = Unindexed::default();
    copy.replace(msgs);
    for r in 0..3 {
        let room = format!("r{r}");
        let key = |v: Vec<Arc<Logged>>| {
            v.iter()
                .map(|m| (m.seq, m.ts, m.from.to_string(), m.body.get().to_owned()))
                .collect::<Vec<_>>()
        };
        let built = key(h.unindexed.range(&room, 0, u64::MAX, 100, true));
        assert_eq!(built.len(), if r == 2 { 16 } else { 17 });
        assert_eq!(key(copy.range(&room, 0, u64::MAX, 100, true)), built);
    }
}
