//! Durable message history in redb, behind a narrow interface.
//!
//! The store owns the database file and the writer thread. Its interface is
//! what a future cluster mode must provide too (NATS JetStream behind the
//! same calls): append a message and learn its seq once it is durable; read
//! a range of a room; read a room's latest seq.
//!
//! Invariants:
//! - Writes happen only on the `store-writer` thread, in grouped
//!   transactions; reads happen only in `spawn_blocking`, in read
//!   transactions, and never wait for the writer.
//! - A message is handed to the [`CommitSink`] and acknowledged only after
//!   the commit that holds it returned, with the configured durability.
//! - Seq per room starts at 1 and grows by exactly 1 per stored message,
//!   across restarts.

mod error;
mod tables;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

pub use error::{
    AppendError, NotWritable, OpenError, ReadError, ShutdownError, StoreClosed, TryAppendError,
    WriteError,
};
use tables::{BY_USER, EPOCH_KEY, KEY_EXPIRY, KEYS, MESSAGES, META, Record, last_seq};
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
    /// Operations waiting for the writer before senders wait.
    pub queue_capacity: usize,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
}

/// A message to store.
#[derive(Debug)]
pub struct Append {
    pub room: Arc<str>,
    pub from: Arc<str>,
    pub body: Box<RawValue>,
    /// Idempotency key: the same room, sender and key store one message.
    pub key: Option<String>,
    /// Completed after the commit: the seq, or why it failed.
    pub reply: oneshot::Sender<Result<Appended, AppendError>>,
}

/// The result of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// Server time of the original store, ms since the Unix epoch.
    pub ts: u64,
    /// True when the key matched an earlier message: nothing new was stored.
    pub duplicate: bool,
}

/// A newly committed message, as handed to the [`CommitSink`].
#[derive(Debug, Clone, Copy)]
pub struct Committed<'a> {
    pub room: &'a str,
    pub seq: u64,
    pub ts: u64,
    pub from: &'a str,
    pub body: &'a RawValue,
}

/// Receives what the writer committed, on the writer thread.
pub trait CommitSink: Send + Sync + 'static {
    /// Called once per commit that made new messages (never with a
    /// duplicate), after it is durable, with them in commit order: per room,
    /// in strictly increasing seq. Must not block.
    fn committed(&self, msgs: &[Committed<'_>]);

    /// Called once per successful commit, before `committed` for its
    /// messages, with the number of operations and the time it took.
    fn batch_committed(&self, _operations: usize, _elapsed: Duration) {}
}

/// A stored message, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub from: String,
    pub ts: u64,
    /// `None` when the message was erased; its seq stays in place.
    pub body: Option<String>,
}

/// One page of history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub messages: Vec<StoredMessage>,
    /// Whether more messages exist beyond the page in the paging direction.
    pub more: bool,
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
    db: Arc<Database>,
    epoch: Arc<str>,
    commits: Arc<AtomicU64>,
    /// False after a failed commit, true again after the next good one.
    healthy: Arc<AtomicBool>,
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
        let db = Database::create(path).map_err(|source| OpenError::Database {
            path: path.to_owned(),
            source,
        })?;
        let epoch = init(&db).map_err(OpenError::Init)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(opts.queue_capacity.max(1));
        let commits = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = Writer::new(db.clone(), opts, sink, commits.clone(), healthy.clone());
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(OpenError::Thread)?;
        Ok(Store {
            handle: StoreHandle {
                tx,
                db,
                epoch: Arc::from(epoch),
                commits,
                healthy,
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

/// Creates every table and the epoch on first open; returns the epoch.
fn init(db: &Database) -> Result<String, WriteError> {
    let txn = db.begin_write()?;
    let epoch = {
        let mut meta = txn.open_table(META)?;
        let existing = meta.get(EPOCH_KEY)?.map(|g| g.value().to_owned());
        match existing {
            Some(e) => e,
            None => {
                let e = format!("{:016x}", rand::random::<u64>());
                meta.insert(EPOCH_KEY, e.as_str())?;
                e
            }
        }
    };
    txn.open_table(MESSAGES)?;
    txn.open_table(KEYS)?;
    txn.open_table(KEY_EXPIRY)?;
    txn.open_table(BY_USER)?;
    txn.commit()?;
    Ok(epoch)
}

fn stored(seq: u64, bytes: &[u8]) -> Result<StoredMessage, ReadError> {
    let r = Record::decode(bytes)?;
    Ok(StoredMessage {
        seq,
        from: r.from.to_owned(),
        ts: r.ts,
        body: r.body.map(str::to_owned),
    })
}

impl StoreHandle {
    /// Queues an append, waiting for room in the queue; the result arrives
    /// on `append.reply` after the commit.
    pub async fn append(&self, append: Append) -> Result<(), StoreClosed> {
        self.tx
            .send(Op::Append(append))
            .await
            .map_err(|_| StoreClosed)
    }

    /// Queues an append if there is room now.
    pub fn try_append(&self, append: Append) -> Result<(), TryAppendError> {
        self.tx.try_send(Op::Append(append)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TryAppendError::Full,
            mpsc::error::TrySendError::Closed(_) => TryAppendError::Closed,
        })
    }

    /// The store's epoch: made when the file was created, never changed.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Whether appends can be stored now: the writer runs and its last
    /// commit succeeded.
    pub fn writable(&self) -> Result<(), NotWritable> {
        if self.tx.is_closed() {
            Err(NotWritable::WriterStopped)
        } else if !self.healthy.load(Ordering::Relaxed) {
            Err(NotWritable::LastCommitFailed)
        } else {
            Ok(())
        }
    }

    /// How many commits the writer has made.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Erases every message `user` sent: the body goes, the seq stays.
    /// Returns how many were erased.
    pub async fn erase_user(&self, user: &str) -> Result<u64, AppendError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::EraseUser {
            user: user.to_owned(),
            reply,
        };
        self.tx.send(op).await.map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, ReadError> + Send + 'static,
    ) -> Result<T, ReadError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            f(&txn)
        })
        .await?
    }

    /// The room's latest seq; 0 when it has none.
    pub async fn latest_seq(&self, room: &str) -> Result<u64, ReadError> {
        let room = room.to_owned();
        self.read(move |txn| {
            let messages = txn.open_table(MESSAGES)?;
            Ok(last_seq(&messages, &room)?)
        })
        .await
    }

    /// Messages with seq in `(after, after + limit]`, ascending.
    pub async fn read_after(
        &self,
        room: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        let room = room.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(MESSAGES)?;
            let mut out = Vec::with_capacity(limit.min(1024));
            let start = after.saturating_add(1);
            for entry in table
                .range((room.as_str(), start)..=(room.as_str(), u64::MAX))?
                .take(limit)
            {
                let (k, v) = entry?;
                out.push(stored(k.value().1, v.value())?);
            }
            Ok(out)
        })
        .await
    }

    /// One page of history, oldest first. With `before`: the newest `limit`
    /// below it. With `after`: the oldest `limit` above it. With both: the
    /// oldest `limit` between them. With neither: the latest `limit`.
    pub async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page, ReadError> {
        let room = room.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(MESSAGES)?;
            let low = after.map_or(0, |a| a.saturating_add(1));
            let high = before.unwrap_or(u64::MAX);
            let mut out = Vec::with_capacity(limit.min(1024) + 1);
            if low >= high {
                return Ok(Page {
                    messages: out,
                    more: false,
                });
            }
            let range = table.range((room.as_str(), low)..(room.as_str(), high))?;
            // Forward from `after`; otherwise backwards from the newest.
            let forward = after.is_some();
            if forward {
                for entry in range.take(limit + 1) {
                    let (k, v) = entry?;
                    out.push(stored(k.value().1, v.value())?);
                }
            } else {
                for entry in range.rev().take(limit + 1) {
                    let (k, v) = entry?;
                    out.push(stored(k.value().1, v.value())?);
                }
            }
            let more = out.len() > limit;
            out.truncate(limit);
            if !forward {
                out.reverse();
            }
            Ok(Page {
                messages: out,
                more,
            })
        })
        .await
    }

    /// Every message `user` sent, as (room, message), by room then seq.
    pub async fn messages_by_user(
        &self,
        user: &str,
    ) -> Result<Vec<(String, StoredMessage)>, ReadError> {
        let user = user.to_owned();
        self.read(move |txn| {
            let index = txn.open_table(BY_USER)?;
            let table = txn.open_table(MESSAGES)?;
            let mut out = Vec::new();
            for entry in index.range((user.as_str(), "", 0u64)..)? {
                let (k, _) = entry?;
                let (u, room, seq) = k.value();
                if u != user {
                    break;
                }
                if let Some(v) = table.get((room, seq))? {
                    out.push((room.to_owned(), stored(seq, v.value())?));
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
