//! The store's errors: one enum per operation, each keeping its cause.

use std::path::PathBuf;
use std::sync::Arc;

use super::tables::RecordError;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database {path}")]
    Database {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("cannot initialise the database tables")]
    Init(#[source] WriteError),
    #[error("cannot prepare the database (restored backup or rewrite)")]
    Prepare(#[source] super::backup::BackupError),
    #[error("cannot start the writer thread")]
    Thread(#[source] std::io::Error),
}

/// A failed write transaction.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot begin a write transaction")]
    Transaction(#[from] redb::TransactionError),
    #[error("cannot open a table")]
    Table(#[from] redb::TableError),
    #[error("storage failed")]
    Storage(#[from] redb::StorageError),
    #[error("cannot set durability")]
    Durability(#[from] redb::SetDurabilityError),
    #[error("commit failed")]
    Commit(#[from] redb::CommitError),
    #[error("a stored record is corrupt")]
    Record(#[from] RecordError),
}

/// Why an append (or another write through the writer) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The transaction holding it failed; nothing of it was stored or delivered.
    #[error("the commit holding this write failed")]
    Write(#[source] Arc<WriteError>),
    /// The store is shutting down or gone.
    #[error("the store is closed")]
    Closed,
}

/// A read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot begin a read transaction")]
    Transaction(#[from] redb::TransactionError),
    #[error("cannot open a table")]
    Table(#[from] redb::TableError),
    #[error("storage failed")]
    Storage(#[from] redb::StorageError),
    #[error("a stored record is corrupt")]
    Record(#[from] RecordError),
    #[error("the read task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// The store's append queue is closed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the store is closed")]
pub struct StoreClosed;

/// Why an append could not be queued without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryAppendError {
    #[error("the store's append queue is full")]
    Full,
    #[error("the store is closed")]
    Closed,
}

/// The writer thread did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("the writer thread panicked")]
    WriterPanicked,
}

/// Why the store cannot take appends now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotWritable {
    #[error("the writer thread has stopped")]
    WriterStopped,
    #[error("the last commit failed")]
    LastCommitFailed,
}
