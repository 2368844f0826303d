//! Retention: deleting a room's oldest messages past a maximum age or count.
//!
//! It owns the rules (`[[retention]]` in the config, first matching rule
//! wins), the bounded deletion step the writer runs inside one of its
//! transactions, and the tracked background task that asks the writer for
//! steps. It never opens a write transaction itself (only the writer thread
//! does) and never deletes more than one step's budget per
//! transaction, so appends queued behind a step wait for a small commit,
//! not for a sweep of the whole store.
//!
//! Deleting the oldest messages keeps what a room's readers rely on: the
//! remaining seqs stay contiguous (a partly expired chunk is rewritten
//! without its oldest records, under the same key), and a room's latest seq
//! never goes back, because [`RETAINED_FROM`] keeps one past the highest
//! deleted seq of each room. A resume from a seq that retention removed
//! cannot be replayed densely, so the session answers `recovered: false`.

use std::sync::Arc;
use std::time::Duration;

use redb::{ReadableTable, Table};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::StoreHandle;
use super::error::WriteError;
use super::tables::{Chunk, last_seq};
use super::unindexed::Unindexed;

/// One `[[retention]]` rule: rooms matching `rooms` keep at most
/// `max_count` messages, none older than `max_age_secs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Room name pattern; `*` matches any run of characters, as in grants.
    pub rooms: String,
    /// Messages older than this many seconds are deleted. Default: no age limit.
    #[serde(default)]
    pub max_age_secs: Option<u64>,
    /// Only the newest this many messages are kept. Default: no count limit.
    #[serde(default)]
    pub max_count: Option<u64>,
}

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("retention rule for `{0}` sets neither max_age_secs nor max_count")]
    NoLimit(String),
    #[error("retention rule for `{0}` has a limit of 0; use at least 1")]
    Zero(String),
    #[error("a retention rule has an empty `rooms` pattern")]
    EmptyPattern,
}

impl RetentionRule {
    pub fn validate(&self) -> Result<(), RuleError> {
        if self.rooms.is_empty() {
            return Err(RuleError::EmptyPattern);
        }
        if self.max_age_secs.is_none() && self.max_count.is_none() {
            return Err(RuleError::NoLimit(self.rooms.clone()));
        }
        if self.max_age_secs == Some(0) || self.max_count == Some(0) {
            return Err(RuleError::Zero(self.rooms.clone()));
        }
        Ok(())
    }
}

/// The first rule whose pattern matches `room`.
pub fn rule_for<'a>(rules: &'a [RetentionRule], room: &str) -> Option<&'a RetentionRule> {
    rules
        .iter()
        .find(|r| crate::glob::glob_match(&r.rooms, room))
}

/// What one step of the writer deleted, and where the next step starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    pub deleted: u64,
    /// The room the next step starts at; `None` when this step reached the
    /// last room.
    pub next: Option<String>,
}

/// The limits of `rule` for a room whose latest seq is `latest`: delete a
/// message when its seq is at most the first, or its ts below the second.
fn limits(rule: &RetentionRule, latest: u64, now_ms: u64) -> (u64, u64) {
    let max_seq = rule.max_count.map_or(0, |n| latest.saturating_sub(n));
    let min_ts = rule
        .max_age_secs
        .map_or(0, |s| now_ms.saturating_sub(s.saturating_mul(1000)));
    (max_seq, min_ts)
}

/// Whether a message of the unindexed copy is due, so that the writer must
/// index the log before a step (a step deletes only indexed messages).
pub(super) fn due_in_log(unindexed: &Unindexed, rules: &[RetentionRule], now_ms: u64) -> bool {
    let mut due = false;
    let _ = unindexed.for_each_room(|room, msgs| -> Result<(), ()> {
        if let (Some(rule), Some(first), Some(last)) =
            (rule_for(rules, room), msgs.first(), msgs.last())
        {
            let (max_seq, min_ts) = limits(rule, last.seq, now_ms);
            if first.seq <= max_seq || first.ts < min_ts {
                due = true;
                return Err(());
            }
        }
        Ok(())
    });
    due
}

type Messages<'t> = Table<'t, (&'static str, u64), &'static [u8]>;

/// The room's latest indexed seq, counting what retention deleted.
pub(super) fn latest_indexed(
    messages: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    retained: &impl ReadableTable<&'static str, u64>,
    room: &str,
) -> Result<u64, redb::StorageError> {
    let kept_from = retained.get(room)?.map_or(0, |g| g.value());
    Ok(last_seq(messages, room)?.max(kept_from.saturating_sub(1)))
}

/// The first room at or after `from` (after `exclusive`, when given).
fn next_room(
    messages: &Messages<'_>,
    from: &str,
    exclusive: bool,
) -> Result<Option<String>, redb::StorageError> {
    // Past every chunk of `from` at once: its keys end at most at u64::MAX.
    let start = (from, if exclusive { u64::MAX } else { 0 });
    for entry in messages.range(start..)? {
        let (k, _) = entry?;
        let room = k.value().0;
        if exclusive && room == from {
            continue;
        }
        return Ok(Some(room.to_owned()));
    }
    Ok(None)
}

/// One bounded step, inside the writer's transaction: from the room
/// `from` on, in name order, deletes the due messages of rooms that a rule
/// matches, until `budget` messages are deleted or `budget` rooms examined.
/// `unindexed_last` gives a room's newest unindexed seq (messages the
/// indexes do not hold yet count for `max_count`). Returns how many it
/// deleted and the room the next step starts at.
pub(super) fn step(
    messages: &mut Messages<'_>,
    retained: &mut Table<'_, &'static str, u64>,
    rules: &[RetentionRule],
    unindexed_last: impl Fn(&str) -> Option<u64>,
    now_ms: u64,
    from: Option<&str>,
    budget: u64,
) -> Result<Step, WriteError> {
    let budget = budget.max(1);
    let mut deleted = 0u64;
    let mut examined = 0u64;
    let mut room = next_room(messages, from.unwrap_or(""), false)?;
    while let Some(name) = room {
        if deleted >= budget || examined >= budget {
            return Ok(Step {
                deleted,
                next: Some(name),
            });
        }
        examined += 1;
        if let Some(rule) = rule_for(rules, &name) {
            let indexed = latest_indexed(messages, retained, &name)?;
            let latest = unindexed_last(&name).map_or(indexed, |u| u.max(indexed));
            let (max_seq, min_ts) = limits(rule, latest, now_ms);
            let (n, finished) =
                trim_room(messages, retained, &name, max_seq, min_ts, budget - deleted)?;
            deleted += n;
            if !finished {
                return Ok(Step {
                    deleted,
                    next: Some(name),
                });
            }
        }
        room = next_room(messages, &name, true)?;
    }
    Ok(Step {
        deleted,
        next: None,
    })
}

/// Deletes the room's oldest messages with seq at most `max_seq` or ts
/// below `min_ts`, at most `budget` of them: whole chunks while it can,
/// else the leading records of a chunk, rewritten under the same key.
/// Returns the count and whether the room has nothing more due.
fn trim_room(
    messages: &mut Messages<'_>,
    retained: &mut Table<'_, &'static str, u64>,
    room: &str,
    max_seq: u64,
    min_ts: u64,
    budget: u64,
) -> Result<(u64, bool), WriteError> {
    let mut deleted = 0u64;
    let mut highest = None;
    let mut finished = false;
    while deleted < budget {
        let first = messages
            .range((room, 0u64)..=(room, u64::MAX))?
            .next()
            .transpose()?
            .map(|(k, v)| (k.value().1, v.value().to_vec()));
        let Some((key, bytes)) = first else {
            finished = true;
            break;
        };
        // A corrupt chunk is left alone: failing the step would fail the
        // sends committed in the same transaction, at every interval.
        let records = match Chunk::decode(key, &bytes) {
            Ok(records) => records,
            Err(e) => {
                warn!(room, seq = key, error = %e, "retention skips a room with a corrupt chunk");
                finished = true;
                break;
            }
        };
        let due = records
            .iter()
            .take_while(|(seq, r)| *seq <= max_seq || r.ts < min_ts)
            .count();
        if due == 0 {
            finished = true;
            break;
        }
        let due = due.min(usize::try_from(budget - deleted).unwrap_or(usize::MAX));
        deleted += due as u64;
        if due == records.len() {
            messages.remove((room, key))?;
            highest = Some(key);
            continue;
        }
        let mut chunk = Chunk::default();
        for (_, r) in records.iter().skip(due) {
            chunk.push(r)?;
        }
        highest = records.get(due - 1).map(|(seq, _)| *seq);
        messages.insert((room, key), chunk.bytes())?;
    }
    if let Some(highest) = highest {
        let kept_from = highest + 1;
        let old = retained.get(room)?.map_or(0, |g| g.value());
        if kept_from > old {
            retained.insert(room, kept_from)?;
        }
    }
    Ok((deleted, finished))
}

/// Runs retention every `interval` until `stop`: steps of at most `budget`
/// deletions, each its own request to the writer, until a sweep reaches the
/// last room. Spawn it on the server's tracker; it returns at once without
/// rules.
pub async fn run(
    store: StoreHandle,
    rules: Arc<[RetentionRule]>,
    interval: Duration,
    budget: u64,
    stop: CancellationToken,
) {
    if rules.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut from = None;
        let mut total = 0u64;
        loop {
            let step = tokio::select! {
                () = stop.cancelled() => return,
                step = store.retain(rules.clone(), from.take(), budget) => step,
            };
            match step {
                Ok(step) => {
                    total += step.deleted;
                    match step.next {
                        Some(next) => from = Some(next),
                        None => break,
                    }
                }
                Err(e) => {
                    warn!(error = %e, "retention step failed; retrying at the next interval");
                    break;
                }
            }
        }
        if total > 0 {
            info!(deleted = total, "retention deleted expired messages");
        } else {
            debug!("retention: nothing due");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use redb::{Database, ReadableDatabase};
    use serde_json::value::RawValue;
    use tokio::sync::oneshot;

    use super::super::tables::{MESSAGES, META, RETAINED_FROM, Record, SCRUB_KEY, insert_chunks};
    use super::super::{Durability, Store, StoreOptions};
    use super::*;
    use crate::history::{Append, Backend as _, CommitSink, Committed};

    struct Nothing;
    impl CommitSink for Nothing {
        fn committed(&self, _: &[Committed<'_>]) {}
    }

    fn opts() -> StoreOptions {
        StoreOptions {
            durability: Durability::Immediate,
            max_batch: 64,
            // Large: the messages stay in the log, which a step must index first.
            index_batch: 1 << 20,
            index_batch_bytes: 1 << 30,
            queue_capacity: 64,
            queue_bytes: 1 << 20,
            idempotency_ttl: Duration::from_secs(60),
            cache_bytes: 4 << 20,
            retry_interval: Duration::from_millis(50),
            probe_bytes: 1024,
            backup_cache_bytes: 1 << 20,
            purge_on_start: true,
        }
    }

    fn rule(rooms: &str, max_age_secs: Option<u64>, max_count: Option<u64>) -> RetentionRule {
        RetentionRule {
            rooms: rooms.into(),
            max_age_secs,
            max_count,
        }
    }

    /// (room, seq) of every indexed message, in key order.
    fn indexed(db: &Database) -> Vec<(String, u64)> {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(MESSAGES).unwrap();
        let mut out = Vec::new();
        for e in t.iter().unwrap() {
            let (k, v) = e.unwrap();
            let (room, last) = k.value();
            for (seq, _) in Chunk::decode(last, v.value()).unwrap() {
                out.push((room.to_owned(), seq));
            }
        }
        out
    }

    fn seqs(all: &[(String, u64)], room: &str) -> Vec<u64> {
        all.iter()
            .filter(|(r, _)| r == room)
            .map(|(_, s)| *s)
            .collect()
    }

    #[test]
    fn steps_delete_by_age_within_their_budget_and_keep_the_latest_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut m = txn.open_table(MESSAGES).unwrap();
            let mut put = |room: &str, items: Vec<(u64, u64)>| {
                insert_chunks(
                    &mut m,
                    room,
                    &items,
                    |(s, _)| *s,
                    |c, (_, ts)| {
                        c.push(&Record {
                            ts: *ts,
                            from: "u",
                            body: Some("1"),
                        })
                    },
                )
                .unwrap();
            };
            // ts = seq seconds, in ms.
            put("chat-a", (1..=100).map(|s| (s, s * 1000)).collect());
            put("chat-b", (1..=3).map(|s| (s, 0)).collect());
            put("keep", (1..=10).map(|s| (s, 0)).collect());
        }
        txn.open_table(RETAINED_FROM).unwrap();
        txn.commit().unwrap();

        let rules = [rule("chat-*", Some(50), None)];
        // Cut-off 60 s: chat-a's seqs 1..=59 and all of chat-b are due.
        let now = 110_000;
        let (mut total, mut steps, mut from) = (0, 0, None);
        loop {
            let txn = db.begin_write().unwrap();
            let step = {
                let mut m = txn.open_table(MESSAGES).unwrap();
                let mut r = txn.open_table(RETAINED_FROM).unwrap();
                step(&mut m, &mut r, &rules, |_| None, now, from.as_deref(), 10).unwrap()
            };
            txn.commit().unwrap();
            assert!(step.deleted <= 10, "a step stays within its budget");
            total += step.deleted;
            steps += 1;
            match step.next {
                Some(n) => from = Some(n),
                None => break,
            }
            assert!(steps < 100);
        }
        assert_eq!(total, 59 + 3);
        assert!(steps >= 7);
        let left = indexed(&db);
        assert_eq!(seqs(&left, "chat-a"), (60..=100).collect::<Vec<_>>());
        assert!(seqs(&left, "chat-b").is_empty());
        assert_eq!(seqs(&left, "keep"), (1..=10).collect::<Vec<_>>());
        let txn = db.begin_read().unwrap();
        let m = txn.open_table(MESSAGES).unwrap();
        let r = txn.open_table(RETAINED_FROM).unwrap();
        assert_eq!(latest_indexed(&m, &r, "chat-a").unwrap(), 100);
        assert_eq!(latest_indexed(&m, &r, "chat-b").unwrap(), 3, "never back");
        assert_eq!(latest_indexed(&m, &r, "keep").unwrap(), 10);
        drop((m, r, txn));
        // A second sweep finds nothing.
        let txn = db.begin_write().unwrap();
        let again = {
            let mut m = txn.open_table(MESSAGES).unwrap();
            let mut r = txn.open_table(RETAINED_FROM).unwrap();
            step(&mut m, &mut r, &rules, |_| None, now, None, 1000).unwrap()
        };
        txn.commit().unwrap();
        assert_eq!(again, Step::default());
        drop(db);

        // The writer continues chat-b after the seqs retention deleted.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Store::open(&path, opts(), Arc::new(Nothing)).unwrap();
        let h = store.handle();
        rt.block_on(async {
            assert_eq!(h.latest_seq("chat-b").await.unwrap(), 3);
            let (reply, rx) = oneshot::channel();
            h.append(Append {
                room: Arc::from("chat-b"),
                from: Arc::from("u"),
                body: RawValue::from_string("2".into()).unwrap(),
                key: None,
                reply,
            })
            .await
            .unwrap();
            assert_eq!(rx.await.unwrap().unwrap().seq, 4);
        });
        drop(h);
        store.shutdown().unwrap();
    }

    #[tokio::test]
    async fn a_count_rule_indexes_the_log_first_and_the_file_is_rewritten_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, opts(), Arc::new(Nothing)).unwrap();
        let h = store.handle();
        let send = |room: &'static str| {
            let h = h.clone();
            async move {
                let (reply, rx) = oneshot::channel();
                h.append(Append {
                    room: Arc::from(room),
                    from: Arc::from("u"),
                    body: RawValue::from_string("\"x\"".into()).unwrap(),
                    key: None,
                    reply,
                })
                .await
                .unwrap();
                rx.await.unwrap().unwrap().seq
            }
        };
        for _ in 0..10 {
            send("chat-a").await;
            send("other").await;
        }
        let rules: Arc<[RetentionRule]> = Arc::from(vec![rule("chat-*", None, Some(3))]);
        let step = h.retain(rules.clone(), None, 100).await.unwrap();
        assert_eq!(
            step,
            Step {
                deleted: 7,
                next: None
            }
        );
        let page = h.history("chat-a", None, None, 100).await.unwrap();
        let left: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(left, [8, 9, 10]);
        assert_eq!(
            h.history("other", None, None, 100)
                .await
                .unwrap()
                .messages
                .len(),
            10
        );
        assert_eq!(h.latest_seq("chat-a").await.unwrap(), 10);
        assert_eq!(send("chat-a").await, 11);
        let epoch = h.epoch().to_owned();
        drop(h);
        tokio::task::spawn_blocking(move || store.shutdown())
            .await
            .unwrap()
            .unwrap();

        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_read().unwrap();
            let meta = txn.open_table(META).unwrap();
            assert!(
                meta.get(SCRUB_KEY).unwrap().is_some(),
                "deletion marks the file"
            );
        }
        let store = Store::open(&path, opts(), Arc::new(Nothing)).unwrap();
        let h = store.handle();
        assert_eq!(h.epoch(), epoch, "a rewrite keeps the epoch");
        let seqs: Vec<u64> = h
            .history("chat-a", None, None, 100)
            .await
            .unwrap()
            .messages
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, [8, 9, 10, 11]);
        drop(h);
        tokio::task::spawn_blocking(move || store.shutdown())
            .await
            .unwrap()
            .unwrap();
        let db = Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert!(
            meta.get(SCRUB_KEY).unwrap().is_none(),
            "the rewrite clears it"
        );
    }

    #[test]
    fn the_operators_guide_example_parses_and_a_rule_without_a_limit_is_refused() {
        let text = r#"
retention_interval_ms = 60000
retention_batch = 1024

[[retention]]
rooms = "chat-*"
max_age_secs = 2592000
max_count = 100000

[[retention]]
rooms = "*"
max_age_secs = 31536000
"#;
        let config: crate::Config = toml::from_str(text).unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.retention,
            [
                rule("chat-*", Some(2_592_000), Some(100_000)),
                rule("*", Some(31_536_000), None)
            ]
        );
        let guide = include_str!("../../docs/operators.md");
        assert!(
            guide.contains(text.trim()),
            "docs/operators.md shows this config"
        );
        let bad: crate::Config = toml::from_str("[[retention]]\nrooms = \"x\"\n").unwrap();
        assert!(matches!(
            bad.validate(),
            Err(crate::config::ConfigError::Retention(RuleError::NoLimit(_)))
        ));
        assert!(
            toml::from_str::<crate::Config>("[[retention]]\nrooms = \"x\"\nmax_days = 1\n")
                .is_err()
        );
    }

    #[test]
    fn a_corrupt_chunk_is_skipped_and_the_other_rooms_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut m = txn.open_table(MESSAGES).unwrap();
            m.insert(("chat-a", 5u64), [9u8, 9, 9].as_slice()).unwrap();
            let items: Vec<u64> = (1..=4).collect();
            insert_chunks(
                &mut m,
                "chat-b",
                &items,
                |s| *s,
                |c, _| {
                    c.push(&Record {
                        ts: 0,
                        from: "u",
                        body: Some("1"),
                    })
                },
            )
            .unwrap();
        }
        let step = {
            let mut m = txn.open_table(MESSAGES).unwrap();
            let mut r = txn.open_table(RETAINED_FROM).unwrap();
            let rules = [rule("chat-*", None, Some(1))];
            step(&mut m, &mut r, &rules, |_| None, 0, None, 100).unwrap()
        };
        txn.commit().unwrap();
        assert_eq!(
            step,
            Step {
                deleted: 3,
                next: None
            }
        );
        let left = indexed_raw(&db);
        assert_eq!(left, [("chat-a".to_owned(), 5), ("chat-b".to_owned(), 4)]);
    }

    /// (room, key) of every chunk, without decoding.
    fn indexed_raw(db: &Database) -> Vec<(String, u64)> {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(MESSAGES).unwrap();
        t.iter()
            .unwrap()
            .map(|e| {
                let (k, _) = e.unwrap();
                (k.value().0.to_owned(), k.value().1)
            })
            .collect()
    }

    #[tokio::test]
    async fn the_background_task_deletes_what_is_due_and_stops_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), opts(), Arc::new(Nothing)).unwrap();
        let h = store.handle();
        for _ in 0..10 {
            let (reply, rx) = oneshot::channel();
            h.append(Append {
                room: Arc::from("chat-a"),
                from: Arc::from("u"),
                body: RawValue::from_string("1".into()).unwrap(),
                key: None,
                reply,
            })
            .await
            .unwrap();
            rx.await.unwrap().unwrap();
        }
        let stop = CancellationToken::new();
        let rules: Arc<[RetentionRule]> = Arc::from(vec![rule("chat-*", None, Some(2))]);
        // A budget of 3 takes several steps per sweep.
        let task = tokio::spawn(run(
            h.clone(),
            rules,
            Duration::from_millis(10),
            3,
            stop.clone(),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let page = h.history("chat-a", None, None, 100).await.unwrap();
            if page.messages.len() == 2 {
                assert_eq!(page.messages[0].seq, 9);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "retention ran");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("the task ends once cancelled")
            .unwrap();
        // Without rules it returns at once.
        run(
            h.clone(),
            Arc::from(Vec::new()),
            Duration::from_millis(10),
            3,
            CancellationToken::new(),
        )
        .await;
        drop(h);
        tokio::task::spawn_blocking(move || store.shutdown())
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn rules_need_a_limit_and_the_first_match_wins() {
        assert!(rule("a", None, None).validate().is_err());
        assert!(rule("a", Some(0), None).validate().is_err());
        assert!(rule("", Some(1), None).validate().is_err());
        assert!(rule("a", None, Some(1)).validate().is_ok());
        let rules = [rule("chat-*", Some(1), None), rule("*", None, Some(5))];
        assert_eq!(rule_for(&rules, "chat-x").unwrap().max_age_secs, Some(1));
        assert_eq!(rule_for(&rules, "lobby").unwrap().max_count, Some(5));
        assert!(rule_for(&rules[..1], "lobby").is_none());
    }
}
