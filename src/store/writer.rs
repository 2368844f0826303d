//! The store writer: the one thread that writes to redb.
//!
//! It owns every write transaction. It blocks for the first queued
//! operation, takes every one queued behind it (up to `max_batch`), applies
//! them all in one transaction and commits once (group commit). Only after
//! the commit is durable does it hand new messages to the [`CommitSink`] and
//! complete the replies. It must never run on an async worker, never panic
//! on stored data, and never deliver or acknowledge anything it has not
//! committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

use super::error::{AppendError, WriteError};
use super::tables::{BY_USER, KEY_EXPIRY, KEYS, MESSAGES, Record, last_seq};
use super::{Append, Appended, CommitSink, Committed, Durability, StoreOptions};

/// One unit of work for the writer.
pub(super) enum Op {
    Append(Append),
    EraseUser {
        user: String,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    /// Commit what is queued, refuse anything later, and exit.
    Shutdown,
}

/// What one operation came to, before the commit.
enum Outcome {
    New(Appended),
    Duplicate(Appended),
    Erased(u64),
}

pub(super) struct Writer {
    pub db: Arc<Database>,
    pub opts: StoreOptions,
    pub sink: Arc<dyn CommitSink>,
    pub commits: Arc<AtomicU64>,
    pub healthy: Arc<AtomicBool>,
    /// Latest seq per room, loaded lazily inside write transactions. Cleared
    /// when a commit fails, since the failed batch may have advanced it.
    latest: HashMap<Arc<str>, u64>,
}

impl Writer {
    pub fn new(
        db: Arc<Database>,
        opts: StoreOptions,
        sink: Arc<dyn CommitSink>,
        commits: Arc<AtomicU64>,
        healthy: Arc<AtomicBool>,
    ) -> Writer {
        Writer {
            db,
            opts,
            sink,
            commits,
            healthy,
            latest: HashMap::new(),
        }
    }

    /// Runs until a [`Op::Shutdown`] arrives or every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(self.opts.max_batch);
        let mut stopping = false;
        while let Some(first) = rx.blocking_recv() {
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
                self.process(&mut batch);
            }
        }
    }

    fn process(&mut self, batch: &mut Vec<Op>) {
        let started = Instant::now();
        match self.apply(batch) {
            Ok(outcomes) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Relaxed);
                self.sink.batch_committed(batch.len(), started.elapsed());
                let new: Vec<Committed<'_>> = batch
                    .iter()
                    .zip(&outcomes)
                    .filter_map(|(op, outcome)| match (op, outcome) {
                        (Op::Append(a), Outcome::New(done)) => Some(Committed {
                            room: &a.room,
                            seq: done.seq,
                            ts: done.ts,
                            from: &a.from,
                            body: &a.body,
                        }),
                        _ => None,
                    })
                    .collect();
                if !new.is_empty() {
                    self.sink.committed(&new);
                }
                drop(new);
                for (op, outcome) in batch.drain(..).zip(outcomes) {
                    match (op, outcome) {
                        (Op::Append(a), Outcome::New(done) | Outcome::Duplicate(done)) => {
                            let _ = a.reply.send(Ok(done));
                        }
                        (Op::EraseUser { reply, .. }, Outcome::Erased(n)) => {
                            let _ = reply.send(Ok(n));
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => {
                error!(error = %e, appends = batch.len(), "store commit failed");
                self.latest.clear();
                self.healthy.store(false, Ordering::Relaxed);
                let e = Arc::new(e);
                for op in batch.drain(..) {
                    match op {
                        Op::Append(a) => {
                            let _ = a.reply.send(Err(AppendError::Write(e.clone())));
                        }
                        Op::EraseUser { reply, .. } => {
                            let _ = reply.send(Err(AppendError::Write(e.clone())));
                        }
                        Op::Shutdown => {}
                    }
                }
            }
        }
    }

    /// Applies the batch in one write transaction and commits it.
    fn apply(&mut self, batch: &[Op]) -> Result<Vec<Outcome>, WriteError> {
        let now = now_ms();
        let ttl_ms = u64::try_from(self.opts.idempotency_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut txn = self.db.begin_write()?;
        txn.set_durability(match self.opts.durability {
            Durability::Immediate => redb::Durability::Immediate,
            Durability::None => redb::Durability::None,
        })?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut messages = txn.open_table(MESSAGES)?;
            let mut keys = txn.open_table(KEYS)?;
            let mut expiry = txn.open_table(KEY_EXPIRY)?;
            let mut by_user = txn.open_table(BY_USER)?;
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
                        let latest = match self.latest.get(&a.room) {
                            Some(seq) => *seq,
                            None => last_seq(&messages, &a.room)?,
                        };
                        let seq = latest + 1;
                        let record = Record {
                            ts: now,
                            from: &a.from,
                            body: Some(a.body.get()),
                        }
                        .encode()?;
                        messages.insert((&*a.room, seq), record.as_slice())?;
                        by_user.insert((&*a.from, &*a.room, seq), ())?;
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
                        let mut targets = Vec::new();
                        for entry in by_user.range((user.as_str(), "", 0u64)..)? {
                            let (k, _) = entry?;
                            let (u, room, seq) = k.value();
                            if u != user {
                                break;
                            }
                            targets.push((room.to_owned(), seq));
                        }
                        let mut erased = 0;
                        for (room, seq) in targets {
                            let bytes = match messages.get((room.as_str(), seq))? {
                                Some(g) => {
                                    let r = Record::decode(g.value())?;
                                    if r.body.is_none() {
                                        continue;
                                    }
                                    Record { body: None, ..r }.encode()?
                                }
                                None => continue,
                            };
                            messages.insert((room.as_str(), seq), bytes.as_slice())?;
                            erased += 1;
                        }
                        outcomes.push(Outcome::Erased(erased));
                    }
                    Op::Shutdown => {}
                }
            }
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
        txn.commit()?;
        Ok(outcomes)
    }
}

/// Milliseconds since the Unix epoch; 0 if the clock is before it.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
