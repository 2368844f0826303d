//! Durable message history in redb: the single node's backend of the
//! history contract (`crate::history::Backend`), a peer of the cluster's
//! JetStream store. Backup and retention are its own.
//!
//! The store owns the database file and the writer thread. It must not
//! know the hub, sessions or the cluster: it hands commits to a
//! [`CommitSink`] and answers on the appends' reply channels.
//!
//! Invariants:
//! - Writes happen only on the `store-writer` thread, in grouped
//!   transactions; reads happen only in `spawn_blocking`, in read
//!   transactions, and never wait for a commit (only, for microseconds,
//!   for the writer to add a commit's messages to the unindexed copy).
//! - Every read sees every message committed before it began: the indexed
//!   ones in the read transaction, the ones still only in the log in the
//!   [`unindexed`] copy, taken before the transaction begins.
//! - A message is handed to the [`CommitSink`] and acknowledged only after
//!   the commit that holds it returned, with the configured durability.
//! - Seq per room starts at 1 and grows by exactly 1 per stored message,
//!   across restarts.
//! - A failed commit loses nothing committed before it and keeps nothing of
//!   its own batch; while commits fail, appends are refused as
//!   [`AppendError::Unavailable`] and reads keep working (see `writer`).
//! - Every part of the store's memory has a bound in [`StoreOptions`]: the
//!   page cache, the queue (count and bytes), the unindexed log.

mod backup;
mod error;
pub mod retention;
mod schema;
mod slot;
mod tables;
mod unindexed;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable};
use serde::Deserialize;
use slot::DbSlot;
use tokio::sync::{Semaphore, mpsc, oneshot};

pub use backup::{BackupError, Snapshot, verify as verify_backup, write_file_durably};
pub use error::{DbReadError, OpenError, ShutdownError, WriteError};

use crate::history::{
    Append, AppendError, Backend, CommitSink, NotWritable, Page, ReadError, StoreClosed,
    StoredMessage, TryAppendError, enqueue, page::Window, try_enqueue,
};
use tables::{
    Chunk, EPOCH_KEY, KEY_EXPIRY, KEYS, LOG, LogBatch, LogEntry, MESSAGES, META, RETAINED_FROM,
    ROOMS_BY_USER, Record, insert_chunks,
};
use unindexed::{Logged, Unindexed};

use writer::{Op, Writer};

/// How commits reach the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every commit is fsync'd before anything in it is acknowledged.
    #[default]
    Immediate,
    /// Commits reach the disk later; a crash may lose acknowledged messages.
    None,
}

/// The store's share of the configuration.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub durability: Durability,
    /// Most operations in one write transaction; 1 commits each alone.
    pub max_batch: usize,
    /// Messages committed to the log before the next transaction also
    /// writes them to the room and sender indexes.
    pub index_batch: u64,
    /// The same bound in bytes of the log, which also bounds the memory the
    /// unindexed copy holds.
    pub index_batch_bytes: u64,
    /// Operations waiting for the writer before senders wait.
    pub queue_capacity: usize,
    /// The same bound in bytes of the appends' bodies and keys.
    pub queue_bytes: usize,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// redb's page cache, in bytes.
    pub cache_bytes: usize,
    /// While commits fail, how long the writer waits between attempts to
    /// commit again (and the `retry_after` it tells refused appends).
    pub retry_interval: Duration,
    /// The size of the value the writer commits to learn whether the store
    /// can commit again: the largest message.
    pub probe_bytes: usize,
    /// Page cache of the fresh file the rewrite at open writes (see `backup`).
    pub backup_cache_bytes: usize,
    /// Whether opening rewrites a file in which erasures or retention freed
    /// message bodies, so that their bytes leave the disk.
    pub purge_on_start: bool,
}

/// The open store: owns the writer thread.
pub struct Store {
    handle: StoreHandle,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// A cheap, cloneable handle for appends and reads.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Op>,
    db: Arc<DbSlot>,
    epoch: Arc<str>,
    commits: Arc<AtomicU64>,
    /// Commits that failed, the writer's retries included.
    failed_commits: Arc<AtomicU64>,
    /// Bytes of queued appends (see [`queued_cost`]): taken by senders,
    /// given back by the writer once it has dealt with them.
    queue_bytes: Arc<Semaphore>,
    queue_bytes_total: usize,
    /// False after a failed commit, true again once the writer's retry
    /// commits.
    healthy: Arc<AtomicBool>,
    unindexed: Arc<Unindexed>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the database at `path` and starts the writer.
    /// Blocking: call it outside async workers.
    pub fn open(
        path: &Path,
        opts: StoreOptions,
        sink: Arc<dyn CommitSink>,
    ) -> Result<Store, OpenError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let db = slot::open(path, opts.cache_bytes).map_err(|source| match &source {
            redb::DatabaseError::Storage(e) if slot::storage_full(e) => {
                OpenError::no_space(path, Box::new(source))
            }
            _ => OpenError::Database {
                path: path.to_owned(),
                source,
            },
        })?;
        schema::check(path, &db)?;
        let purge = opts.purge_on_start.then_some(opts.backup_cache_bytes);
        let db = backup::on_open(path, db, purge).map_err(OpenError::Prepare)?;
        let epoch = init(&db).map_err(|e| match e.storage() {
            Some(s) if slot::storage_full(s) => OpenError::no_space(path, Box::new(e)),
            _ => OpenError::Init(e),
        })?;
        let db = Arc::new(DbSlot::new(path, opts.cache_bytes, db));
        let (tx, rx) = mpsc::channel(opts.queue_capacity.max(1));
        let commits = Arc::new(AtomicU64::new(0));
        let failed_commits = Arc::new(AtomicU64::new(0));
        let queue_bytes_total = opts.queue_bytes.clamp(1, Semaphore::MAX_PERMITS);
        let queue_bytes = Arc::new(Semaphore::new(queue_bytes_total));
        let healthy = Arc::new(AtomicBool::new(true));
        let unindexed = Arc::new(Unindexed::default());
        // The writer's clock while commits fail: it waits for the queue or
        // the next retry, whichever comes first.
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(OpenError::Thread)?;
        let writer = Writer::new(
            db.clone(),
            opts,
            sink,
            writer::Shared {
                commits: commits.clone(),
                failed_commits: failed_commits.clone(),
                healthy: healthy.clone(),
                queue_bytes: queue_bytes.clone(),
                queue_bytes_total,
            },
            unindexed.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx, &clock))
            .map_err(OpenError::Thread)?;
        Ok(Store {
            handle: StoreHandle {
                tx,
                db,
                epoch: Arc::from(epoch),
                commits,
                failed_commits,
                queue_bytes,
                queue_bytes_total,
                healthy,
                unindexed,
            },
            writer: Some(thread),
        })
    }

    pub fn handle(&self) -> StoreHandle {
        self.handle.clone()
    }

    /// Stops taking appends, commits everything already queued (replying to
    /// each), and joins the writer. Blocking: call it outside async workers.
    pub fn shutdown(mut self) -> Result<(), ShutdownError> {
        let _ = self.handle.tx.blocking_send(Op::Shutdown);
        match self.writer.take() {
            Some(thread) => thread.join().map_err(|_| ShutdownError::WriterPanicked),
            None => Ok(()),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.writer.is_some() {
            // Best effort without blocking: the writer commits what is
            // queued and exits on its own.
            let _ = self.handle.tx.try_send(Op::Shutdown);
        }
    }
}

/// Creates every table and the epoch on first open, and indexes what the
/// last run left in the log; returns the epoch.
fn init(db: &Database) -> Result<String, WriteError> {
    let txn = db.begin_write()?;
    // A file without an epoch is new: marking it with the current format
    // is not a migration worth logging.
    let (epoch, new_file) = {
        let mut meta = txn.open_table(META)?;
        let existing = meta.get(EPOCH_KEY)?.map(|g| g.value().to_owned());
        let new_file = existing.is_none();
        let epoch = match existing {
            Some(e) => e,
            None => {
                let e = format!("{:016x}", rand::random::<u64>());
                meta.insert(EPOCH_KEY, e.as_str())?;
                e
            }
        };
        (epoch, new_file)
    };
    let left = {
        let log = txn.open_table(LOG)?;
        let mut messages = txn.open_table(MESSAGES)?;
        let mut by_user = txn.open_table(ROOMS_BY_USER)?;
        // The log is in commit order, so each room's entries are in
        // increasing seq.
        let mut rooms: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
        let mut left = 0u64;
        for batch in log.iter()? {
            let (_, batch) = batch?;
            for bytes in LogBatch::entries(batch.value())? {
                let e = LogEntry::decode(bytes)?;
                by_user.insert((e.record.from, e.room), ())?;
                let record = LogEntry::record_bytes(bytes)?.to_vec();
                rooms
                    .entry(e.room.to_owned())
                    .or_default()
                    .push((e.seq, record));
                left += 1;
            }
        }
        for (room, records) in &rooms {
            insert_chunks(
                &mut messages,
                room,
                records,
                |(seq, _)| *seq,
                |chunk, (_, r)| chunk.push_raw(r),
            )?;
        }
        left
    };
    txn.delete_table(LOG)?;
    txn.open_table(LOG)?;
    let from = schema::migrate(&txn)?;
    txn.open_table(KEYS)?;
    txn.open_table(KEY_EXPIRY)?;
    txn.open_table(ROOMS_BY_USER)?;
    txn.open_table(RETAINED_FROM)?;
    txn.commit()?;
    if from != schema::SCHEMA_VERSION && !new_file {
        tracing::info!(
            from,
            to = schema::SCHEMA_VERSION,
            "migrated the store's format"
        );
    }
    if left > 0 {
        tracing::info!(
            messages = left,
            "indexed the messages the last run left in the log"
        );
    }
    Ok(epoch)
}

fn unindexed_message(m: &Logged) -> StoredMessage {
    StoredMessage {
        seq: m.seq,
        from: m.from.as_ref().to_owned(),
        ts: m.ts,
        body: Some(m.body.get().to_owned()),
    }
}

fn stored(seq: u64, r: &Record<'_>) -> StoredMessage {
    StoredMessage {
        seq,
        from: r.from.to_owned(),
        ts: r.ts,
        body: r.body.map(str::to_owned),
    }
}

type Messages = redb::ReadOnlyTable<(&'static str, u64), &'static [u8]>;

/// Calls `f` with the room's indexed messages in `[low, high)`, from the
/// oldest when `forward`, else from the newest, until `f` returns false.
fn scan_room(
    table: &Messages,
    room: &str,
    low: u64,
    high: u64,
    forward: bool,
    mut f: impl FnMut(u64, &Record<'_>) -> bool,
) -> Result<(), DbReadError> {
    if forward {
        // The first chunk ending at or after `low` holds it, if anything does.
        for entry in table.range((room, low)..=(room, u64::MAX))? {
            let (k, v) = entry?;
            for (seq, r) in Chunk::decode(k.value().1, v.value())? {
                if seq >= high {
                    return Ok(());
                }
                if seq >= low && !f(seq, &r) {
                    return Ok(());
                }
            }
        }
    } else {
        // Start from the chunk that holds `high - 1`: the first ending at or
        // after it.
        let top = high.saturating_sub(1);
        let end = match table.range((room, top)..=(room, u64::MAX))?.next() {
            Some(entry) => entry?.0.value().1,
            None => u64::MAX,
        };
        for entry in table.range((room, 0u64)..=(room, end))?.rev() {
            let (k, v) = entry?;
            for (seq, r) in Chunk::decode(k.value().1, v.value())?.into_iter().rev() {
                if seq < low {
                    return Ok(());
                }
                if seq < high && !f(seq, &r) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

impl StoreHandle {
    /// Takes a consistent backup of the store into an unlinked temporary
    /// file in `dir` (on a blocking thread, from one read transaction, so
    /// appends go on meanwhile). Every message committed before the call is
    /// in it. The copy's page cache takes at most `cache_bytes`.
    pub async fn backup(&self, dir: &Path, cache_bytes: usize) -> Result<Snapshot, BackupError> {
        let db = self.db.clone();
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || {
            db.with(|db| backup::snapshot(db, &dir, cache_bytes))?
        })
        .await?
    }

    /// Asks the writer for one retention step: from the room `from` on,
    /// delete what `rules` say is due, at most `budget` messages.
    pub async fn retain(
        &self,
        rules: Arc<[retention::RetentionRule]>,
        from: Option<String>,
        budget: u64,
    ) -> Result<retention::Step, AppendError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Retention {
            rules,
            from,
            budget,
            reply,
        };
        self.tx.send(op).await.map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// Runs `f` in a read transaction on a blocking thread. Callers take
    /// what they need of the unindexed copy before calling this, so before
    /// the transaction begins (see the invariants in `unindexed`).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, DbReadError> + Send + 'static,
    ) -> Result<T, ReadError> {
        let db = self.db.clone();
        let read = tokio::task::spawn_blocking(move || {
            // The slot stays held until `f` is done: a re-open waits for it.
            db.with(|db| {
                let txn = db.begin_read()?;
                f(&txn)
            })?
        })
        .await;
        read.map_err(DbReadError::from)
            .and_then(|r| r)
            .map_err(|e| ReadError::Failed(Box::new(e)))
    }
}

impl Backend for StoreHandle {
    /// Queues an append, waiting for room in the queue; the result arrives
    /// on `append.reply` after the commit.
    async fn append(&self, append: Append) -> Result<(), StoreClosed> {
        let (bytes, total) = (&self.queue_bytes, self.queue_bytes_total);
        enqueue(bytes, total, &self.tx, append, Op::Append).await
    }

    fn try_append(&self, append: Append) -> Result<(), TryAppendError> {
        let (bytes, total) = (&self.queue_bytes, self.queue_bytes_total);
        try_enqueue(bytes, total, &self.tx, append, Op::Append)
    }

    /// The store's epoch: made when the file was created, never changed.
    fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Whether appends can be stored now: the writer runs and commits (no
    /// failed commit since its last successful one or retry).
    fn writable(&self) -> Result<(), NotWritable> {
        if self.tx.is_closed() {
            Err(NotWritable::WriterStopped)
        } else if !self.healthy.load(Ordering::Relaxed) {
            Err(NotWritable::Failing {
                why: "the store cannot commit (a full or failing disk)",
            })
        } else {
            Ok(())
        }
    }

    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// How many commits failed, the writer's retries while the store could
    /// not commit included.
    fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::Relaxed)
    }

    async fn latest_seq(&self, room: &str) -> Result<u64, ReadError> {
        let room = room.to_owned();
        // The unindexed copy is read first, then the transaction.
        let unindexed = self.unindexed.last_seq(&room);
        let indexed = self
            .read(move |txn| {
                let messages = txn.open_table(MESSAGES)?;
                let retained = txn.open_table(RETAINED_FROM)?;
                Ok(retention::latest_indexed(&messages, &retained, &room)?)
            })
            .await?;
        Ok(unindexed.map_or(indexed, |u| u.max(indexed)))
    }

    async fn page(&self, room: &str, window: Window) -> Result<Page, ReadError> {
        let room = room.to_owned();
        let Window {
            low, high, forward, ..
        } = window;
        let want = window.want();
        let unindexed = self.unindexed.range(&room, low, high, want, forward);
        self.read(move |txn| {
            let table = txn.open_table(MESSAGES)?;
            // Each side's `want` nearest to the paging start hold the
            // union's `want` nearest. The indexed copy wins a tie: an
            // erasure reaches only the indexes.
            let mut merged: BTreeMap<u64, StoredMessage> = unindexed
                .iter()
                .map(|m| (m.seq, unindexed_message(m)))
                .collect();
            let mut taken = 0;
            scan_room(&table, &room, low, high, forward, |seq, r| {
                merged.insert(seq, stored(seq, r));
                taken += 1;
                taken < want
            })?;
            Ok(window.page(merged))
        })
        .await
    }

    async fn messages_by_user(
        &self,
        user: &str,
    ) -> Result<Vec<(String, StoredMessage)>, ReadError> {
        let user = user.to_owned();
        let unindexed = self.unindexed.by_user(&user);
        self.read(move |txn| {
            let index = txn.open_table(ROOMS_BY_USER)?;
            let table = txn.open_table(MESSAGES)?;
            let mut merged: BTreeMap<(String, u64), StoredMessage> = unindexed
                .iter()
                .map(|(room, m)| ((room.as_ref().to_owned(), m.seq), unindexed_message(m)))
                .collect();
            for entry in index.range((user.as_str(), "")..)? {
                let (k, _) = entry?;
                let (u, room) = k.value();
                if u != user {
                    break;
                }
                scan_room(&table, room, 0, u64::MAX, true, |seq, r| {
                    if r.from == user {
                        merged.insert((room.to_owned(), seq), stored(seq, r));
                    }
                    true
                })?;
            }
            Ok(merged.into_iter().map(|((room, _), m)| (room, m)).collect())
        })
        .await
    }

    async fn erase_user(&self, user: &str) -> Result<u64, AppendError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::EraseUser {
            user: user.to_owned(),
            reply,
        };
        self.tx.send(op).await.map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }
}

#[cfg(test)]
mod tests;
