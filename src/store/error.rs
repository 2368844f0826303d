//! The store's errors: one enum per operation, each keeping its cause.

use std::path::PathBuf;

use super::slot::Reopening;

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
    /// Opening writes (redb's recovery, indexing the log the last run
    /// left), and the file system is full.
    #[error(
        "no space left to open the database {path} ({file_bytes} bytes): opening may grow it \
         by up to its size, so free at least {needed_bytes} bytes in its file system \
         ({free})"
    )]
    NoSpace {
        path: PathBuf,
        file_bytes: u64,
        needed_bytes: u64,
        /// What the file system reported free, or that it could not say.
        free: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot initialise the database tables")]
    Init(#[source] WriteError),
    #[error(
        "the database {path} has store format version {found}, newer than this binary's \
         {known}: open it with the switchboard that wrote it, or a newer one"
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("the database {path} has an unknown store format version {found:?}")]
    UnknownFormat { path: PathBuf, found: String },
    #[error("cannot prepare the database (restored backup or rewrite)")]
    Prepare(#[source] BackupError),
    #[error("cannot start the writer thread")]
    Thread(#[source] std::io::Error),
}

impl OpenError {
    /// The error of an open that ran out of space, with the sizes that tell
    /// an operator how much to free.
    pub(super) fn no_space(
        path: &std::path::Path,
        source: Box<dyn std::error::Error + Send + Sync>,
    ) -> OpenError {
        let file_bytes = std::fs::metadata(path).map_or(0, |m| m.len());
        let free = match super::slot::free_bytes(path) {
            Some(n) => format!("{n} bytes are free now"),
            None => "its free space is unknown".to_owned(),
        };
        OpenError::NoSpace {
            path: path.to_owned(),
            file_bytes,
            needed_bytes: file_bytes.max(super::slot::NEW_FILE_BYTES),
            free,
            source,
        }
    }
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
    #[error("the database is closed")]
    Reopening(#[from] Reopening),
    #[error("cannot re-open the database")]
    Reopen(#[from] redb::DatabaseError),
}

impl WriteError {
    /// The storage failure inside, if this is one.
    pub fn storage(&self) -> Option<&redb::StorageError> {
        match self {
            WriteError::Transaction(redb::TransactionError::Storage(e))
            | WriteError::Table(redb::TableError::Storage(e))
            | WriteError::Storage(e)
            | WriteError::Commit(redb::CommitError::Storage(e))
            | WriteError::Reopen(redb::DatabaseError::Storage(e)) => Some(e),
            _ => None,
        }
    }
}

/// A read of the redb file failed (the cause of a
/// [`crate::history::ReadError`]).
#[derive(Debug, thiserror::Error)]
pub enum DbReadError {
    #[error("cannot begin a read transaction")]
    Transaction(#[from] redb::TransactionError),
    #[error("cannot open a table")]
    Table(#[from] redb::TableError),
    #[error("storage failed")]
    Storage(#[from] redb::StorageError),
    #[error("a stored record is corrupt")]
    Record(#[from] RecordError),
    #[error("the database is closed")]
    Reopening(#[from] Reopening),
    #[error("the read task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// The writer thread did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("the writer thread panicked")]
    WriterPanicked,
    #[error("the shutdown's blocking task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// Why a copy of the store could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot create the copy {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("cannot begin a transaction")]
    Transaction(#[from] redb::TransactionError),
    #[error("cannot open a table")]
    Table(#[from] redb::TableError),
    #[error("storage failed")]
    Storage(#[from] redb::StorageError),
    #[error("cannot set durability")]
    Durability(#[from] redb::SetDurabilityError),
    #[error("the copy's commit failed")]
    Commit(#[from] redb::CommitError),
    #[error(
        "the store holds a table `{0}` that the backup does not know; refusing to make an incomplete copy"
    )]
    UnknownTable(String),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the backup task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("the store is being re-opened after an I/O failure")]
    Reopening(#[from] Reopening),
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is truncated")]
    Truncated,
    #[error("record has unknown version {0}")]
    Version(u8),
    #[error("record holds invalid UTF-8")]
    Utf8,
    #[error("sender name is longer than a record can hold")]
    FromTooLong,
    #[error("room name is longer than a log entry can hold")]
    RoomTooLong,
    #[error("chunk holds more records than its key's seq allows")]
    ChunkCount,
    #[error("a logged body is not JSON")]
    Json,
}
