//! This node's history backend, chosen once at start: the embedded redb
//! store, or NATS JetStream in cluster mode. It is the one place that
//! names both; everything above it holds a [`History`] and speaks the
//! contract of `crate::history`.
//!
//! One enum rather than a trait object, so the hot path (an append per
//! message) costs a match, not a boxed future. It must not add behaviour
//! of its own: each call goes to the backend unchanged.

use std::time::Duration;

use crate::cluster::{self, store::JetStreamStore};
use crate::history::{
    Append, AppendError, Backend, NotWritable, Page, ReadError, StoreClosed, StoredMessage,
    TryAppendError, page::Window,
};
use crate::store::{ShutdownError, Store, StoreHandle};

/// This node's history.
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

/// What owns this node's history, for its shutdown: the embedded store
/// (its writer thread), or the cluster node's tasks.
pub enum Opened {
    Local(Store),
    Cluster(cluster::Started),
}

impl Opened {
    /// The handle sessions and the admin API share.
    pub fn history(&self) -> History {
        match self {
            Opened::Local(store) => History::Local(store.handle()),
            Opened::Cluster(started) => History::Cluster(started.store.clone()),
        }
    }

    /// Answers every append already queued, then stops: the embedded store
    /// commits them and joins its writer (on a blocking thread); a cluster
    /// node stops its tasks, waiting at most `grace`.
    pub async fn shutdown(self, grace: Duration) -> Result<(), ShutdownError> {
        match self {
            Opened::Local(store) => tokio::task::spawn_blocking(move || store.shutdown())
                .await
                .map_err(ShutdownError::Join)?,
            Opened::Cluster(started) => {
                started.stop(grace).await;
                Ok(())
            }
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

impl Backend for History {
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
    async fn page(&self, room: &str, window: Window) -> Result<Page, ReadError> {
        each!(self, s => s.page(room, window).await)
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
