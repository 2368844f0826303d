//! The errors of the history contract, one enum per operation. They name
//! what a caller can act on (retry, or give up) and never a backend: a
//! backend keeps its own error as the cause.

use std::sync::Arc;
use std::time::Duration;

/// A backend's own error, kept as the cause.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why an append (or another write through a backend's writer) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The write holding it failed; nothing of it was stored or delivered.
    #[error("the commit holding this write failed")]
    Failed(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// The backend cannot store now (a full or failing disk, NATS
    /// unreachable); nothing of this write was stored. Retry after
    /// `retry_after`.
    #[error("the store cannot commit now; retry in {retry_after:?}")]
    Unavailable { retry_after: Duration },
    /// The backend is shutting down or gone.
    #[error("the store is closed")]
    Closed,
}

/// A read of history failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The backend cannot be read now (NATS unreachable, a read timed
    /// out); retrying may succeed.
    #[error("history cannot be read now")]
    Unavailable(#[source] Cause),
    /// The read failed (a storage error, a corrupt record).
    #[error("history cannot be read")]
    Failed(#[source] Cause),
}

/// A backend's append queue is closed.
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

/// Why a backend cannot take appends now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotWritable {
    #[error("the writer thread has stopped")]
    WriterStopped,
    /// Writes fail for a reason the backend names; it retries.
    #[error("{why}; retrying")]
    Failing { why: &'static str },
}
