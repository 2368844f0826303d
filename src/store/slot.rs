//! The open redb `Database`, shared by the writer and the readers, and
//! re-opened in place by the writer after an I/O failure.
//!
//! redb latches the first failed write (a full disk, an I/O error): from
//! then on every operation of that `Database` answers
//! `StorageError::PreviousIo`, reads included, until it is closed and opened
//! again. The file lock forbids opening the second handle before the first
//! is closed, so the handle lives in a lock: a read holds it shared for the
//! whole read transaction, and [`DbSlot::reopen`] takes it exclusively,
//! which waits for the reads in progress, closes the file and opens it again
//! (redb then repairs it back to its last commit).
//!
//! This module owns the handle and its opening; it never decides when to
//! re-open (the writer does) and never writes.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use redb::{Database, DatabaseError, StorageError};

/// The database, or nothing while a re-open failed.
#[derive(Debug)]
pub(super) struct DbSlot {
    path: PathBuf,
    cache_bytes: usize,
    db: RwLock<Option<Database>>,
}

/// The database is closed: a re-open after an I/O failure has not
/// succeeded yet.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the database is being re-opened after an I/O failure")]
pub struct Reopening;

impl DbSlot {
    /// The slot of `db`, opened by [`open`] from `path` with a page cache
    /// of `cache_bytes`, which a re-open uses again.
    pub fn new(path: &Path, cache_bytes: usize, db: Database) -> DbSlot {
        DbSlot {
            path: path.to_owned(),
            cache_bytes,
            db: RwLock::new(Some(db)),
        }
    }

    /// Runs `f` with the database, holding it open until `f` returns.
    pub fn with<T>(&self, f: impl FnOnce(&Database) -> T) -> Result<T, Reopening> {
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(db) => Ok(f(db)),
            None => Err(Reopening),
        }
    }

    /// Closes the database and opens it again. Waits for the reads in
    /// progress; reads that begin meanwhile wait for it. On failure the slot
    /// stays empty (reads answer [`Reopening`]) until a later call succeeds.
    pub fn reopen(&self) -> Result<(), DatabaseError> {
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // The old handle must release the file lock before the new one takes it.
        if let Some(old) = guard.take() {
            if let Err(e) = old.close() {
                tracing::debug!(error = %e, "closing the failed database handle");
            }
        }
        *guard = Some(open(&self.path, self.cache_bytes)?);
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
impl DbSlot {
    /// Holds the slot exclusively: the writer's next transaction waits.
    pub fn hold(&self) -> std::sync::RwLockWriteGuard<'_, Option<Database>> {
        self.db.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Opens (or creates) the file with a page cache of `cache_bytes`.
pub(super) fn open(path: &Path, cache_bytes: usize) -> Result<Database, DatabaseError> {
    Database::builder().set_cache_size(cache_bytes).create(path)
}

/// Whether redb failed because the file system is full.
pub(super) fn storage_full(e: &StorageError) -> bool {
    matches!(e, StorageError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull)
}

/// Whether `e` is an I/O failure (the disk, not the data): the handle may be
/// latched and must be re-opened before it writes again.
pub(super) fn io_failure(e: &StorageError) -> bool {
    matches!(
        e,
        StorageError::Io(_) | StorageError::PreviousIo | StorageError::DatabaseClosed
    )
}

/// The least free space an open asks for, however small the file: a new
/// database takes tens of KiB, and its first writes grow it, so this leaves
/// a margin rather than naming an exact need.
pub(super) const NEW_FILE_BYTES: u64 = 1 << 20;

/// The bytes this process may still write in the file system holding
/// `path` (or its directory, when the file does not exist yet): root may
/// use the blocks reserved for it, others may not.
#[cfg(unix)]
pub(super) fn free_bytes(path: &Path) -> Option<u64> {
    let at = if path.exists() { path } else { path.parent()? };
    let st = rustix::fs::statvfs(at).ok()?;
    let blocks = if rustix::process::geteuid().is_root() {
        st.f_bfree
    } else {
        st.f_bavail
    };
    Some(blocks.saturating_mul(st.f_frsize))
}

#[cfg(not(unix))]
pub(super) fn free_bytes(_path: &Path) -> Option<u64> {
    None
}
