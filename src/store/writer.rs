//! The store writer: the one thread that writes to redb.
//!
//! It owns every write transaction. It blocks for the first queued
//! operation, takes every one queued behind it (up to `max_batch`), applies
//! them all in one transaction and commits once (group commit). Only after
//! the commit is durable does it hand new messages to the [`CommitSink`],
//! with the replies, which the sink completes after them
//! ([`CommitSink::committed_then`]). It must never run on an async worker,
//! never panic on stored data, and never deliver or acknowledge anything it
//! has not committed.
//!
//! New messages go to the append-only log, not to the room and sender
//! indexes: a commit of a thousand messages in a thousand rooms then writes
//! one log value rather than a leaf per room in each index. Once
//! `index_batch` messages (or `index_batch_bytes`) are unindexed, the next
//! transaction also writes them all to the indexes, one chunk per room, and
//! empties the log (an index flush). A batch that erases flushes first and
//! writes its own messages to the indexes directly, so that erasure sees
//! every message.
//!
//! A failed commit (a full disk) stores nothing and remembers nothing of
//! its batch (seqs, idempotency keys). The writer then refuses appends
//! with [`AppendError::Unavailable`] without touching the file, re-opens
//! the database when redb latched the failure (so reads work again), and
//! every `retry_interval`, once the file system reports room for it (and
//! for the index flush that is due, if one is), commits a probe value of
//! `probe_bytes`; the first that succeeds makes the store writable again. Re-opening reloads the unindexed copy from the
//! file's log, so the two stay one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{error, info, warn};

use super::error::WriteError;
use super::retention::{self, RetentionRule, Step};
use super::slot::{self, DbSlot};
use super::tables::{
    Chunk, KEY_EXPIRY, KEYS, LOG, LogBatch, LogEntry, MESSAGES, META, PROBE_KEY, RETAINED_FROM,
    ROOMS_BY_USER, Record, RecordError, SCRUB_KEY, insert_chunks,
};
use super::unindexed::{Logged, Unindexed};
use super::{Durability, StoreOptions};
use crate::history::{Append, AppendError, Appended, CommitSink, Committed, Replies, queued_cost};

/// One unit of work for the writer.
pub(super) enum Op {
    Append(Append),
    EraseUser {
        user: String,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    /// One bounded retention step (see [`retention::step`]).
    Retention {
        rules: Arc<[RetentionRule]>,
        from: Option<String>,
        budget: u64,
        reply: oneshot::Sender<Result<Step, AppendError>>,
    },
    /// Commit what is queued, refuse anything later, and exit.
    Shutdown,
}

/// What one operation came to, before the commit.
enum Outcome {
    New(Appended),
    Duplicate(Appended),
    Erased(u64),
    Retained(Step),
}

/// The writer's state that the store's handles read.
pub(super) struct Shared {
    pub commits: Arc<AtomicU64>,
    pub failed_commits: Arc<AtomicU64>,
    pub healthy: Arc<AtomicBool>,
    /// Bytes of queued appends, given back once each batch is dealt with.
    pub queue_bytes: Arc<Semaphore>,
    pub queue_bytes_total: usize,
}

pub(super) struct Writer {
    pub db: Arc<DbSlot>,
    pub opts: StoreOptions,
    pub sink: Arc<dyn CommitSink>,
    pub commits: Arc<AtomicU64>,
    pub failed_commits: Arc<AtomicU64>,
    pub healthy: Arc<AtomicBool>,
    queue_bytes: Arc<Semaphore>,
    queue_bytes_total: usize,
    /// While commits fail: when to try again. Appends are refused until a
    /// retry succeeds.
    retry_at: Option<Instant>,
    /// redb latched an I/O failure: the database must be re-opened before
    /// it can write (or read what is not cached).
    needs_reopen: bool,
    /// Latest seq per room, loaded lazily inside write transactions. Cleared
    /// when a commit fails, since the failed batch may have advanced it, and
    /// at each index flush, which bounds it.
    latest: HashMap<Arc<str>, u64>,
    /// The committed messages not yet indexed; shared with readers.
    unindexed: Arc<Unindexed>,
    /// How many messages the log holds, and its values' total bytes.
    /// Changed only after a commit.
    log_len: u64,
    log_bytes: u64,
}

/// What a transaction did besides its operations' outcomes.
struct Applied {
    outcomes: Vec<Outcome>,
    /// It wrote every unindexed message to the indexes and emptied the log.
    indexed_all: bool,
    /// Its new messages went to the log (not straight to the indexes).
    logged: bool,
    /// The bytes it added to the log.
    log_bytes: u64,
}

impl Writer {
    pub fn new(
        db: Arc<DbSlot>,
        opts: StoreOptions,
        sink: Arc<dyn CommitSink>,
        shared: Shared,
        unindexed: Arc<Unindexed>,
    ) -> Writer {
        Writer {
            db,
            opts,
            sink,
            commits: shared.commits,
            failed_commits: shared.failed_commits,
            healthy: shared.healthy,
            queue_bytes: shared.queue_bytes,
            queue_bytes_total: shared.queue_bytes_total,
            retry_at: None,
            needs_reopen: false,
            latest: HashMap::new(),
            unindexed,
            log_len: 0,
            log_bytes: 0,
        }
    }

    /// Runs until a [`Op::Shutdown`] arrives or every sender is gone.
    /// `clock` times the retries while commits fail.
    pub fn run(mut self, mut rx: mpsc::Receiver<Op>, clock: &tokio::runtime::Runtime) {
        let mut batch = Vec::with_capacity(self.opts.max_batch);
        let mut stopping = false;
        loop {
            let first = match self.retry_at {
                None => rx.blocking_recv(),
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    // The timer is made inside the clock's runtime, which it needs.
                    match clock.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                        Ok(op) => op,
                        Err(_) => {
                            self.retry();
                            continue;
                        }
                    }
                }
            };
            let Some(first) = first else { break };
            match first {
                Op::Shutdown => stopping = true,
                op => batch.push(op),
            }
            while batch.len() < self.opts.max_batch {
                match rx.try_recv() {
                    Ok(Op::Shutdown) => stopping = true,
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if stopping {
                // Refuse new work; what is already queued still commits.
                rx.close();
            }
            if !batch.is_empty() {
                let queued: usize = batch
                    .iter()
                    .map(|op| match op {
                        Op::Append(a) => queued_cost(a, self.queue_bytes_total) as usize,
                        _ => 0,
                    })
                    .sum();
                match self.retry_at {
                    None => self.process(&mut batch),
                    Some(at) => refuse(&mut batch, at),
                }
                self.queue_bytes.add_permits(queued);
            }
        }
        // Nothing will give bytes back any more: senders waiting for them
        // learn that the store is closed.
        self.queue_bytes.close();
    }

    /// After a failed commit: counts it, refuses appends until the next
    /// retry, and re-opens the database when redb latched the failure
    /// (at once, so that reads work again).
    fn failed(&mut self, e: &WriteError) {
        self.failed_commits.fetch_add(1, Ordering::Relaxed);
        self.healthy.store(false, Ordering::Relaxed);
        // The failed batch may have advanced it.
        self.latest.clear();
        if e.storage().is_some_and(slot::io_failure) || matches!(e, WriteError::Reopening(_)) {
            self.needs_reopen = true;
        }
        if self.needs_reopen {
            if let Err(e) = self.reopen() {
                warn!(error = %e, "cannot re-open the database; retrying");
            }
        }
        self.retry_at = Some(Instant::now() + self.opts.retry_interval);
    }

    /// Tries to make the store writable again: re-open if needed, then a
    /// probe commit, once the file system has room for it.
    fn retry(&mut self) {
        let attempt = if self.needs_reopen {
            self.reopen()
        } else {
            Ok(())
        };
        // A probe on a disk that is still full fails, and redb then needs a
        // re-open, whose repair scans the whole file while reads wait. When
        // an index flush is due, the next commit writes the log's messages
        // again: wait for about that much room too.
        let flush_due =
            self.log_len >= self.opts.index_batch || self.log_bytes >= self.opts.index_batch_bytes;
        let needed = if flush_due {
            self.log_bytes.max(self.opts.probe_bytes as u64)
        } else {
            self.opts.probe_bytes as u64
        };
        let room = slot::free_bytes(self.db.path());
        if attempt.is_ok() && room.is_some_and(|free| free < needed) {
            self.retry_at = Some(Instant::now() + self.opts.retry_interval);
            return;
        }
        match attempt.and_then(|()| self.probe()) {
            Ok(()) => {
                info!("the store commits again");
                self.retry_at = None;
                self.healthy.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(error = %e, cause = ?e.storage(), "the store still cannot commit");
                self.failed(&e);
            }
        }
    }

    /// Closes and re-opens the database, then reloads the unindexed copy
    /// from its log: what the file holds is what was committed.
    fn reopen(&mut self) -> Result<(), WriteError> {
        let started = Instant::now();
        self.db.reopen()?;
        let (rooms, len, bytes) = self.db.with(read_log)??;
        self.unindexed.replace(rooms);
        self.log_len = len;
        self.log_bytes = bytes;
        self.latest.clear();
        // Only now: a re-open whose reload failed is tried again.
        self.needs_reopen = false;
        info!(elapsed = ?started.elapsed(), "re-opened the database after a failed write");
        Ok(())
    }

    /// Commits a value of `probe_bytes` and then its removal.
    fn probe(&self) -> Result<(), WriteError> {
        let value = "0".repeat(self.opts.probe_bytes);
        self.db.with(|db| -> Result<(), WriteError> {
            for put in [true, false] {
                let mut txn = db.begin_write()?;
                txn.set_durability(self.durability())?;
                {
                    let mut meta = txn.open_table(META)?;
                    if put {
                        meta.insert(PROBE_KEY, value.as_str())?;
                    } else {
                        meta.remove(PROBE_KEY)?;
                    }
                }
                txn.commit()?;
            }
            Ok(())
        })?
    }

    fn durability(&self) -> redb::Durability {
        match self.opts.durability {
            Durability::Immediate => redb::Durability::Immediate,
            Durability::None => redb::Durability::None,
        }
    }

    fn process(&mut self, batch: &mut Vec<Op>) {
        let started = Instant::now();
        match self.apply(batch) {
            Ok(applied) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Relaxed);
                self.sink.batch_committed(batch.len(), started.elapsed());
                let Applied {
                    outcomes,
                    indexed_all,
                    logged,
                    log_bytes,
                } = applied;
                // Each new message moves into the shared unindexed copy
                // before anyone hears of it; replies wait until after.
                let mut fresh = Vec::new();
                let mut replies = Replies::with_capacity(batch.len());
                for (op, outcome) in batch.drain(..).zip(outcomes) {
                    match (op, outcome) {
                        (Op::Append(a), Outcome::New(done)) => {
                            let msg = Arc::new(Logged {
                                seq: done.seq,
                                ts: done.ts,
                                from: a.from,
                                body: a.body,
                            });
                            fresh.push((a.room, msg));
                            replies.ack(a.reply, done);
                        }
                        (Op::Append(a), Outcome::Duplicate(done)) => {
                            replies.ack(a.reply, done);
                        }
                        (Op::EraseUser { reply, .. }, Outcome::Erased(n)) => {
                            replies.then(move || {
                                let _ = reply.send(Ok(n));
                            });
                        }
                        (Op::Retention { reply, .. }, Outcome::Retained(step)) => {
                            replies.then(move || {
                                let _ = reply.send(Ok(step));
                            });
                        }
                        _ => {}
                    }
                }
                if indexed_all {
                    self.log_len = 0;
                    self.log_bytes = 0;
                    // A cache of rooms' seqs, which the indexes now hold:
                    // emptied here, it holds at most the rooms of one
                    // `index_batch`.
                    self.latest.clear();
                }
                // An erasing batch wrote its messages to the indexes already.
                if logged {
                    self.log_len += fresh.len() as u64;
                    self.log_bytes += log_bytes;
                }
                let logged_now = fresh.iter().filter(|_| logged).map(|(r, m)| (r, m));
                self.unindexed.committed(indexed_all, logged_now);
                if !fresh.is_empty() {
                    let new: Vec<Committed<'_>> = fresh
                        .iter()
                        .map(|(room, m)| Committed {
                            room,
                            seq: m.seq,
                            ts: m.ts,
                            from: &m.from,
                            body: &m.body,
                        })
                        .collect();
                    self.sink.committed_then(&new, replies);
                } else {
                    replies.send();
                }
            }
            Err(e) => {
                error!(error = %e, cause = ?e.storage(), appends = batch.len(), "store commit failed");
                self.failed(&e);
                let err = match e.storage() {
                    Some(s) if slot::io_failure(s) => AppendError::Unavailable {
                        retry_after: self.opts.retry_interval,
                    },
                    _ => AppendError::Failed(Arc::new(e)),
                };
                for op in batch.drain(..) {
                    match op {
                        Op::Append(a) => {
                            let _ = a.reply.send(Err(err.clone()));
                        }
                        Op::EraseUser { reply, .. } => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Op::Retention { reply, .. } => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Op::Shutdown => {}
                    }
                }
            }
        }
    }

    /// Writes every unindexed message to the indexes and empties the log.
    fn index_all(&self, txn: &WriteTransaction) -> Result<(), WriteError> {
        {
            let mut messages = txn.open_table(MESSAGES)?;
            let mut rooms_by_user = txn.open_table(ROOMS_BY_USER)?;
            self.unindexed
                .for_each_room(|room, msgs| -> Result<(), WriteError> {
                    insert_chunks(
                        &mut messages,
                        room,
                        msgs,
                        |m| m.seq,
                        |chunk, m| {
                            chunk.push(&Record {
                                ts: m.ts,
                                from: &m.from,
                                body: Some(m.body.get()),
                            })
                        },
                    )?;
                    // Look before writing: a pair already there would
                    // otherwise dirty its page again.
                    let mut senders: Vec<&str> = msgs.iter().map(|m| &*m.from).collect();
                    senders.sort_unstable();
                    senders.dedup();
                    for from in &senders {
                        if rooms_by_user.get((*from, room))?.is_none() {
                            rooms_by_user.insert((*from, room), ())?;
                        }
                    }
                    Ok(())
                })?;
        }
        txn.delete_table(LOG)?;
        Ok(())
    }

    /// Applies the batch in one write transaction and commits it.
    fn apply(&mut self, batch: &[Op]) -> Result<Applied, WriteError> {
        let slot = self.db.clone();
        slot.with(|db| self.apply_in(db, batch))?
    }

    fn apply_in(&mut self, db: &Database, batch: &[Op]) -> Result<Applied, WriteError> {
        let now = now_ms();
        let ttl_ms = u64::try_from(self.opts.idempotency_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut txn = db.begin_write()?;
        txn.set_durability(self.durability())?;
        let erases = batch.iter().any(|op| matches!(op, Op::EraseUser { .. }));
        // A retention step deletes only indexed messages: the first step of
        // a sweep indexes the log first when some of its messages are due.
        let retention_due = batch.iter().any(|op| {
            matches!(op, Op::Retention { rules, from: None, .. }
                if retention::due_in_log(&self.unindexed, rules, now))
        });
        let indexed_all = self.log_len > 0
            && (erases
                || retention_due
                || self.log_len >= self.opts.index_batch
                || self.log_bytes >= self.opts.index_batch_bytes);
        if indexed_all {
            self.index_all(&txn)?;
        }
        let logged = !erases;
        // The log's key is the count of messages logged before the value.
        let log_key = if indexed_all { 0 } else { self.log_len };
        let mut log_batch = LogBatch::default();
        let log_bytes;
        let mut outcomes = Vec::with_capacity(batch.len());
        // Whether a message body was erased or deleted: the file keeps the
        // freed pages' bytes until it is rewritten at the next open.
        let mut freed = false;
        {
            let mut log = txn.open_table(LOG)?;
            let mut messages = txn.open_table(MESSAGES)?;
            let mut keys = txn.open_table(KEYS)?;
            let mut expiry = txn.open_table(KEY_EXPIRY)?;
            let mut by_user = txn.open_table(ROOMS_BY_USER)?;
            let mut retained = txn.open_table(RETAINED_FROM)?;
            let mut chunk = Chunk::default();
            for op in batch {
                match op {
                    Op::Append(a) => {
                        if let Some(key) = &a.key {
                            let hit = keys
                                .get((&*a.room, &*a.from, key.as_str()))?
                                .map(|g| g.value());
                            if let Some((seq, ts, at)) = hit {
                                if now.saturating_sub(at) < ttl_ms {
                                    outcomes.push(Outcome::Duplicate(Appended {
                                        seq,
                                        ts,
                                        duplicate: true,
                                    }));
                                    continue;
                                }
                            }
                        }
                        // The unindexed copy, when it has the room, holds
                        // its newest seqs.
                        let latest = match self.latest.get(&a.room) {
                            Some(seq) => *seq,
                            None => match self.unindexed.last_seq(&a.room) {
                                Some(seq) => seq,
                                None => retention::latest_indexed(&messages, &retained, &a.room)?,
                            },
                        };
                        let seq = latest + 1;
                        let record = Record {
                            ts: now,
                            from: &a.from,
                            body: Some(a.body.get()),
                        };
                        if logged {
                            log_batch.push(&LogEntry {
                                room: &a.room,
                                seq,
                                record,
                            })?;
                        } else {
                            chunk.clear();
                            chunk.push(&record)?;
                            messages.insert((&*a.room, seq), chunk.bytes())?;
                            by_user.insert((&*a.from, &*a.room), ())?;
                        }
                        if let Some(key) = &a.key {
                            keys.insert((&*a.room, &*a.from, key.as_str()), (seq, now, now))?;
                            expiry.insert((now, &*a.room, &*a.from, key.as_str()), ())?;
                        }
                        self.latest.insert(a.room.clone(), seq);
                        outcomes.push(Outcome::New(Appended {
                            seq,
                            ts: now,
                            duplicate: false,
                        }));
                    }
                    Op::EraseUser { user, .. } => {
                        let mut rooms = Vec::new();
                        for entry in by_user.range((user.as_str(), "")..)? {
                            let (k, _) = entry?;
                            let (u, room) = k.value();
                            if u != user {
                                break;
                            }
                            rooms.push(room.to_owned());
                        }
                        let mut erased = 0;
                        for room in &rooms {
                            let mut rewrites = Vec::new();
                            let all = (room.as_str(), 0u64)..=(room.as_str(), u64::MAX);
                            for entry in messages.range(all)? {
                                let (k, v) = entry?;
                                let last = k.value().1;
                                let records = Chunk::decode(last, v.value())?;
                                let hit = |r: &Record<'_>| r.from == user && r.body.is_some();
                                if !records.iter().any(|(_, r)| hit(r)) {
                                    continue;
                                }
                                chunk.clear();
                                for (_, r) in &records {
                                    if hit(r) {
                                        erased += 1;
                                        chunk.push(&Record { body: None, ..*r })?;
                                    } else {
                                        chunk.push(r)?;
                                    }
                                }
                                rewrites.push((last, chunk.bytes().to_vec()));
                            }
                            for (last, bytes) in rewrites {
                                messages.insert((room.as_str(), last), bytes.as_slice())?;
                            }
                        }
                        freed |= erased > 0;
                        outcomes.push(Outcome::Erased(erased));
                    }
                    Op::Retention {
                        rules,
                        from,
                        budget,
                        ..
                    } => {
                        let step = retention::step(
                            &mut messages,
                            &mut retained,
                            rules,
                            |room| self.unindexed.last_seq(room),
                            now,
                            from.as_deref(),
                            *budget,
                        )?;
                        freed |= step.deleted > 0;
                        outcomes.push(Outcome::Retained(step));
                    }
                    Op::Shutdown => {}
                }
            }
            if !log_batch.bytes().is_empty() {
                log.insert(log_key, log_batch.bytes())?;
            }
            log_bytes = log_batch.bytes().len() as u64;
            // Forget expired idempotency keys, a bounded number per commit.
            let cutoff = now.saturating_sub(ttl_ms);
            let mut expired = Vec::new();
            for entry in expiry
                .range((0u64, "", "", "")..(cutoff, "", "", ""))?
                .take(self.opts.max_batch)
            {
                let (k, _) = entry?;
                let (at, room, user, key) = k.value();
                expired.push((at, room.to_owned(), user.to_owned(), key.to_owned()));
            }
            for (at, room, user, key) in &expired {
                expiry.remove((*at, room.as_str(), user.as_str(), key.as_str()))?;
                // A key re-used after expiry has a newer entry: keep it.
                let current = keys
                    .get((room.as_str(), user.as_str(), key.as_str()))?
                    .map(|g| g.value());
                if current.is_some_and(|(_, _, inserted)| inserted == *at) {
                    keys.remove((room.as_str(), user.as_str(), key.as_str()))?;
                }
            }
            if !expired.is_empty() {
                tracing::debug!(count = expired.len(), "pruned expired idempotency keys");
            }
        }
        if freed {
            txn.open_table(META)?.insert(SCRUB_KEY, "1")?;
        }
        txn.commit()?;
        Ok(Applied {
            outcomes,
            indexed_all,
            logged,
            log_bytes,
        })
    }
}

/// Answers every operation of `batch` with [`AppendError::Unavailable`].
fn refuse(batch: &mut Vec<Op>, retry_at: Instant) {
    // Never "retry in 0 ms": the retry is due, not done.
    let retry_after = retry_at
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    for op in batch.drain(..) {
        match op {
            Op::Append(a) => {
                let _ = a.reply.send(Err(AppendError::Unavailable { retry_after }));
            }
            Op::EraseUser { reply, .. } => {
                let _ = reply.send(Err(AppendError::Unavailable { retry_after }));
            }
            Op::Retention { reply, .. } => {
                let _ = reply.send(Err(AppendError::Unavailable { retry_after }));
            }
            Op::Shutdown => {}
        }
    }
}

/// The file's log as the unindexed copy holds it: each message with its
/// room, in commit order; how many; and the log values' total bytes.
type ReadLog = (Vec<(Arc<str>, Arc<Logged>)>, u64, u64);

pub(super) fn read_log(db: &Database) -> Result<ReadLog, WriteError> {
    let txn = db.begin_read()?;
    let log = txn.open_table(LOG)?;
    let mut rooms: HashMap<String, Arc<str>> = HashMap::new();
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for value in log.iter()? {
        let (_, value) = value?;
        let value = value.value();
        bytes += value.len() as u64;
        for entry in LogBatch::entries(value)? {
            let e = LogEntry::decode(entry)?;
            let room = match rooms.get(e.room) {
                Some(r) => r.clone(),
                None => {
                    let r: Arc<str> = Arc::from(e.room);
                    rooms.insert(e.room.to_owned(), r.clone());
                    r
                }
            };
            // The log holds bodies; erasure rewrites only the indexes.
            let body = e.record.body.unwrap_or("null").to_owned();
            let body =
                serde_json::value::RawValue::from_string(body).map_err(|_| RecordError::Json)?;
            out.push((
                room,
                Arc::new(Logged {
                    seq: e.seq,
                    ts: e.record.ts,
                    from: Arc::from(e.record.from),
                    body,
                }),
            ));
        }
    }
    let len = out.len() as u64;
    Ok((out, len, bytes))
}

/// Milliseconds since the Unix epoch; 0 if the clock is before it.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
