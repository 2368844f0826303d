//! The seam between the server and where history lives: the [`Store`]
//! trait, and [`History`], this node's store (the embedded redb store, or
//! NATS JetStream in cluster mode).
//!
//! Sessions and the admin API reach history only through [`Store`]; only
//! `server` knows which backend runs. The trait is what a backend must
//! give:
//! - appends are queued one by one and committed in groups; each gets its
//!   seq (or why not) on its reply channel, only once it is durable, and
//!   the backend hands new messages to its `CommitSink` (the fan-out)
//!   after that, per room in strictly increasing seq;
//! - a backend that cannot take writes for a while (a full disk, NATS
//!   unreachable) says so through [`Store::writable`] and refuses appends
//!   with the retryable `AppendError::Unavailable`; reads fail alone;
//! - per room, seqs are dense from 1; reads by seq are the same on every
//!   node.
//!
//! Backup and retention are the embedded store's own: they stay on
//! [`crate::store::StoreHandle`] and are offered through
//! [`History::local`].

use std::future::Future;

use crate::cluster::store::JetStreamStore;
use crate::store::{
    Append, AppendError, NotWritable, Page, ReadError, StoreClosed, StoreHandle, StoredMessage,
    TryAppendError,
};

/// Where messages are stored and read back. See the module docs for the
/// promises every backend keeps.
pub trait Store: Send + Sync {
    /// Queues an append, waiting for room in the queue; the result arrives
    /// on `append.reply` once the message is durable (or refused).
    fn append(&self, append: Append) -> impl Future<Output = Result<(), StoreClosed>> + Send;

    /// Queues an append if there is room now.
    fn try_append(&self, append: Append) -> Result<(), TryAppendError>;

    /// Names the lifetime of this history: a resume across epochs cannot
    /// be trusted to be gap-free.
    fn epoch(&self) -> &str;

    /// Whether appends can be stored now.
    fn writable(&self) -> Result<(), NotWritable>;

    /// Successful commits so far (a metric).
    fn commits(&self) -> u64;

    /// Failed commits so far, retries included (a metric).
    fn failed_commits(&self) -> u64;

    /// The room's latest seq; 0 when it has none.
    fn latest_seq(&self, room: &str) -> impl Future<Output = Result<u64, ReadError>> + Send;

    /// One page of history, oldest first. With `before`: the newest
    /// `limit` below it. With `after`: the oldest `limit` above it. With
    /// both: the oldest `limit` between them. With neither: the latest.
    fn history(
        &self,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, ReadError>> + Send;

    /// Messages with seq in `(after, after + limit]`, ascending.
    fn read_after(
        &self,
        room: &str,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredMessage>, ReadError>> + Send {
        async move {
            let page = self.history(room, None, Some(after), limit).await?;
            Ok(page.messages)
        }
    }

    /// Every message `user` sent, as (room, message), by room then seq.
    fn messages_by_user(
        &self,
        user: &str,
    ) -> impl Future<Output = Result<Vec<(String, StoredMessage)>, ReadError>> + Send;

    /// Erases every message `user` sent: the body goes, the seq stays.
    /// Returns how many were erased.
    fn erase_user(&self, user: &str) -> impl Future<Output = Result<u64, AppendError>> + Send;
}

/// Implements [`Store`] for a backend whose inherent methods have the
/// trait's names and signatures (both backends are written so).
macro_rules! backend {
    ($t:ty) => {
        impl Store for $t {
            fn append(
                &self,
                append: Append,
            ) -> impl Future<Output = Result<(), StoreClosed>> + Send {
                <$t>::append(self, append)
            }
            fn try_append(&self, append: Append) -> Result<(), TryAppendError> {
                <$t>::try_append(self, append)
            }
            fn epoch(&self) -> &str {
                <$t>::epoch(self)
            }
            fn writable(&self) -> Result<(), NotWritable> {
                <$t>::writable(self)
            }
            fn commits(&self) -> u64 {
                <$t>::commits(self)
            }
            fn failed_commits(&self) -> u64 {
                <$t>::failed_commits(self)
            }
            fn latest_seq(
                &self,
                room: &str,
            ) -> impl Future<Output = Result<u64, ReadError>> + Send {
                <$t>::latest_seq(self, room)
            }
            fn history(
                &self,
                room: &str,
                before: Option<u64>,
                after: Option<u64>,
                limit: usize,
            ) -> impl Future<Output = Result<Page, ReadError>> + Send {
                <$t>::history(self, room, before, after, limit)
            }
            fn read_after(
                &self,
                room: &str,
                after: u64,
                limit: usize,
            ) -> impl Future<Output = Result<Vec<StoredMessage>, ReadError>> + Send {
                <$t>::read_after(self, room, after, limit)
            }
            fn messages_by_user(
                &self,
                user: &str,
            ) -> impl Future<Output = Result<Vec<(String, StoredMessage)>, ReadError>> + Send {
                <$t>::messages_by_user(self, user)
            }
            fn erase_user(
                &self,
                user: &str,
            ) -> impl Future<Output = Result<u64, AppendError>> + Send {
                <$t>::erase_user(self, user)
            }
        }
    };
}

backend!(StoreHandle);
backend!(JetStreamStore);

/// This node's history: one enum rather than a trait object, so the hot
/// path (an append per message) costs a match, not a boxed future.
#[derive(Debug, Clone)]
pub enum History {
    /// The embedded redb store (single node).
    Local(StoreHandle),
    /// NATS JetStream (cluster mode).
    Cluster(JetStreamStore),
}

impl History {
    /// The embedded store, for what only it offers (backup, retention).
    pub fn local(&self) -> Option<&StoreHandle> {
        match self {
            History::Local(h) => Some(h),
            History::Cluster(_) => None,
        }
    }
}

/// Calls the same method on whichever backend runs.
macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            History::Local($s) => $e,
            History::Cluster($s) => $e,
        }
    };
}

impl Store for History {
    async fn append(&self, append: Append) -> Result<(), StoreClosed> {
        each!(self, s => s.append(append).await)
    }
    fn try_append(&self, append: Append) -> Result<(), TryAppendError> {
        each!(self, s => s.try_append(append))
    }
    fn epoch(&self) -> &str {
        each!(self, s => s.epoch())
    }
    fn writable(&self) -> Result<(), NotWritable> {
        each!(self, s => s.writable())
    }
    fn commits(&self) -> u64 {
        each!(self, s => s.commits())
    }
    fn failed_commits(&self) -> u64 {
        each!(self, s => s.failed_commits())
    }
    async fn latest_seq(&self, room: &str) -> Result<u64, ReadError> {
        each!(self, s => s.latest_seq(room).await)
    }
    async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page, ReadError> {
        each!(self, s => s.history(room, before, after, limit).await)
    }
    async fn read_after(
        &self,
        room: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        each!(self, s => Store::read_after(s, room, after, limit).await)
    }
    async fn messages_by_user(
        &self,
        user: &str,
    ) -> Result<Vec<(String, StoredMessage)>, ReadError> {
        each!(self, s => s.messages_by_user(user).await)
    }
    async fn erase_user(&self, user: &str) -> Result<u64, AppendError> {
        each!(self, s => s.erase_user(user).await)
    }
}
