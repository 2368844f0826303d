//! The bounded queue in front of a store's writer, shared by both
//! backends: appends wait for room in count (the channel) and in bytes (a
//! semaphore of their bodies and keys), so a burst of large messages cannot
//! hold more memory than `store_queue_bytes`.
//!
//! The writer gives an append's bytes back once it has answered it
//! ([`queued_cost`] says how many); this module only takes them.

use tokio::sync::{Semaphore, TryAcquireError, mpsc};

use super::{Append, StoreClosed, TryAppendError};

/// The bytes an append holds while it waits for the writer: its body and
/// key (its room and sender names are shared). At most `total`, so that
/// one append larger than the bound still goes, alone.
pub fn queued_cost(a: &Append, total: usize) -> u32 {
    let bytes = a.body.get().len() + a.key.as_ref().map_or(0, String::len);
    u32::try_from(bytes.min(total)).unwrap_or(u32::MAX)
}

/// Queues `append` (as `wrap` makes it an item of the writer's channel),
/// waiting for room in bytes, then in count.
pub async fn enqueue<T>(
    bytes: &Semaphore,
    total: usize,
    tx: &mpsc::Sender<T>,
    append: Append,
    wrap: impl FnOnce(Append) -> T,
) -> Result<(), StoreClosed> {
    let cost = queued_cost(&append, total);
    let permit = bytes.acquire_many(cost).await.map_err(|_| StoreClosed)?;
    tx.send(wrap(append)).await.map_err(|_| StoreClosed)?;
    // The writer gives the bytes back once it has answered the append.
    permit.forget();
    Ok(())
}

/// Queues `append` if there is room now, in bytes and in count.
pub fn try_enqueue<T>(
    bytes: &Semaphore,
    total: usize,
    tx: &mpsc::Sender<T>,
    append: Append,
    wrap: impl FnOnce(Append) -> T,
) -> Result<(), TryAppendError> {
    let cost = queued_cost(&append, total);
    let permit = bytes.try_acquire_many(cost).map_err(|e| match e {
        TryAcquireError::NoPermits => TryAppendError::Full,
        TryAcquireError::Closed => TryAppendError::Closed,
    })?;
    tx.try_send(wrap(append)).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => TryAppendError::Full,
        mpsc::error::TrySendError::Closed(_) => TryAppendError::Closed,
    })?;
    permit.forget();
    Ok(())
}
