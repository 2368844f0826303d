//! The history contract: what a backend that keeps rooms' messages must
//! give, and the types every backend and caller share. The embedded redb
//! store (`store`) and the cluster's JetStream store
//! (`cluster::store`) are peers that implement [`Backend`];
//! `backend` (above them) picks one at start.
//!
//! This module is a leaf: it must not name a backend, the hub or a
//! session. What it promises for every backend:
//! - appends are queued one by one and committed in groups; each gets its
//!   seq (or why not) on its reply channel, only once it is durable, and
//!   the backend hands new messages to its [`CommitSink`] after that, per
//!   room in strictly increasing seq, and completes the commit's
//!   [`Replies`] after them;
//! - a backend that cannot take writes for a while (a full disk, NATS
//!   unreachable) says so through [`Backend::writable`] and refuses
//!   appends with the retryable [`AppendError::Unavailable`]; reads fail
//!   alone;
//! - per room, seqs are dense from 1 (retention removes the oldest, erasure
//!   only bodies); reads by seq are the same on every node;
//! - a page of history is computed by [`page::Window`], the same for both.

mod error;
pub mod page;
mod queue;
mod sink;

use std::future::Future;
use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::oneshot;

pub use error::{AppendError, Cause, NotWritable, ReadError, StoreClosed, TryAppendError};
pub use queue::{enqueue, queued_cost, try_enqueue};
pub use sink::{AppendReply, CommitSink, Committed, Replies};

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

impl Page {
    /// The page of an empty range.
    pub fn empty() -> Page {
        Page {
            messages: Vec::new(),
            more: false,
        }
    }
}

/// Where messages are stored and read back. See the module docs for the
/// promises every backend keeps.
pub trait Backend: Send + Sync {
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

    /// One page of history, oldest first: the seqs of `window` (see
    /// [`page::Window`]).
    fn page(
        &self,
        room: &str,
        window: page::Window,
    ) -> impl Future<Output = Result<Page, ReadError>> + Send;

    /// One page of history, oldest first. With `before`: the newest
    /// `limit` below it. With `after`: the oldest `limit` above it. With
    /// both: the oldest `limit` between them. With neither: the latest.
    fn history(
        &self,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, ReadError>> + Send {
        async move {
            match page::Window::new(before, after, limit) {
                Some(window) => self.page(room, window).await,
                None => Ok(Page::empty()),
            }
        }
    }

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
