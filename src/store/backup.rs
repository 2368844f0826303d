//! Consistent copies of the store: online backups, and the rewrite that
//! takes freed message bodies off the disk.
//!
//! It owns copying one committed snapshot (a single read transaction, so
//! redb's MVCC gives a consistent view while the writer keeps committing)
//! of every table into a fresh redb file, and what opening such a file
//! does. A backup carries the epoch of the store it came from; opening it
//! makes a new epoch, because messages the live store took after the backup
//! are not in it and their seqs will be given again. A file in which an
//! erasure or retention freed message bodies is rewritten when it is opened:
//! redb does not overwrite freed pages, so only a fresh copy is sure to hold
//! no trace of them.
//!
//! It must not run on an async worker (every function here blocks) and
//! writes to the live file only in [`on_open`], before the writer starts.
//! It copies only the tables it knows and refuses a file holding any other,
//! so a table added later cannot be left out of a backup silently.

use std::fs::File;
use std::path::Path;

use redb::{
    Database, Key, MultimapTableHandle, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableHandle, Value, WriteTransaction,
};
use tracing::{info, warn};

use super::tables::{
    BACKUP_AT_KEY, BACKUP_OF_KEY, EPOCH_KEY, KEY_EXPIRY, KEYS, LOG, MESSAGES, META, OLD_BY_USER,
    RETAINED_FROM, ROOMS_BY_USER, SCRUB_KEY,
};
use super::writer::now_ms;

pub use super::error::BackupError;

/// A finished backup: an open, already unlinked file to read it from.
#[derive(Debug)]
pub struct Snapshot {
    pub file: File,
    /// Its size in bytes.
    pub bytes: u64,
    /// The epoch of the store it was taken from.
    pub epoch: String,
    /// Entries copied, over all tables.
    pub entries: u64,
}

/// Whether a copy takes the table named `name`; it refuses any other.
fn known_table(name: &str) -> bool {
    [
        META.name(),
        MESSAGES.name(),
        KEYS.name(),
        KEY_EXPIRY.name(),
        ROOMS_BY_USER.name(),
        LOG.name(),
        RETAINED_FROM.name(),
        OLD_BY_USER.name(),
    ]
    .contains(&name)
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_owned();
    move |source| BackupError::Io { what, path, source }
}

/// Copies every entry of `def` from `src` into `dst`; a table missing in
/// `src` is skipped.
fn copy_table<K: Key + 'static, V: Value + 'static>(
    src: &ReadTransaction,
    dst: &WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<u64, BackupError> {
    let from = match src.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut to = dst.open_table(def)?;
    let mut copied = 0;
    for entry in from.iter()? {
        let (k, v) = entry?;
        to.insert(k.value(), v.value())?;
        copied += 1;
    }
    Ok(copied)
}

/// Writes the snapshot `src` into a new file at `dest` (which must not
/// exist), in one transaction committed with fsync. `mark` adjusts the
/// copy's metadata; the scrub flag never travels, since the copy holds no
/// freed page. Returns the entries copied.
fn copy_snapshot(
    src: &ReadTransaction,
    dest: &Path,
    cache_bytes: usize,
    mark: impl FnOnce(&mut redb::Table<&str, &str>) -> Result<(), redb::StorageError>,
) -> Result<u64, BackupError> {
    for table in src.list_tables()? {
        if !known_table(table.name()) {
            return Err(BackupError::UnknownTable(table.name().to_owned()));
        }
    }
    if let Some(table) = src.list_multimap_tables()?.next() {
        return Err(BackupError::UnknownTable(table.name().to_owned()));
    }
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(dest)
        .map_err(|source| BackupError::Create {
            path: dest.to_owned(),
            source,
        })?;
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)?;
    let mut entries = copy_table(src, &txn, META)?;
    entries += copy_table(src, &txn, MESSAGES)?;
    entries += copy_table(src, &txn, KEYS)?;
    entries += copy_table(src, &txn, KEY_EXPIRY)?;
    entries += copy_table(src, &txn, ROOMS_BY_USER)?;
    entries += copy_table(src, &txn, LOG)?;
    entries += copy_table(src, &txn, RETAINED_FROM)?;
    entries += copy_table(src, &txn, OLD_BY_USER)?;
    {
        let mut meta = txn.open_table(META)?;
        meta.remove(SCRUB_KEY)?;
        mark(&mut meta)?;
    }
    txn.commit()?;
    drop(db);
    File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(io("cannot sync", dest))?;
    Ok(entries)
}

/// Makes the parent directory's entries (a rename, a new file) durable.
fn sync_dir(path: &Path) -> Result<(), BackupError> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot sync the directory of", path)),
        None => Ok(()),
    }
}

/// Takes a backup of `db` into a temporary file in `dir` and returns it
/// open and already unlinked, so it disappears however its reader ends.
/// Every message committed before this call began is in it, the ones still
/// only in the log included (the log is a table of the same snapshot).
pub(super) fn snapshot(
    db: &Database,
    dir: &Path,
    cache_bytes: usize,
) -> Result<Snapshot, BackupError> {
    let src = db.begin_read()?;
    let epoch = src
        .open_table(META)?
        .get(EPOCH_KEY)?
        .map(|g| g.value().to_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        "{BACKUP_TMP_PREFIX}{:016x}.redb",
        rand::random::<u64>()
    ));
    let at = now_ms().to_string();
    let copied = copy_snapshot(&src, &tmp, cache_bytes, |meta| {
        meta.insert(BACKUP_OF_KEY, epoch.as_str())?;
        meta.insert(BACKUP_AT_KEY, at.as_str())?;
        Ok(())
    });
    drop(src);
    let opened = copied.and_then(|entries| {
        let file = File::open(&tmp).map_err(io("cannot open the backup", &tmp))?;
        let bytes = file
            .metadata()
            .map_err(io("cannot stat the backup", &tmp))?
            .len();
        Ok((file, bytes, entries))
    });
    // Unlinked now: the open file keeps the data until it is read and dropped.
    if let Err(e) = std::fs::remove_file(&tmp) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %tmp.display(), error = %e, "cannot remove a backup's temporary file");
        }
    }
    let (file, bytes, entries) = opened?;
    Ok(Snapshot {
        file,
        bytes,
        epoch,
        entries,
    })
}

/// Reads one metadata value; none when the table or the key is missing.
fn meta_value(db: &Database, key: &str) -> Result<Option<String>, BackupError> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(meta.get(key)?.map(|g| g.value().to_owned()))
}

/// Prepares a file just opened at `path`, before anything else reads it:
/// with `purge` (the copy's cache size), rewrites it when an erasure or
/// retention left freed message bodies in it; gives a restored backup a new
/// epoch. A rewrite that fails (no space for the copy, say) is logged and
/// the file is used as it is; the next open tries again.
pub(super) fn on_open(
    path: &Path,
    db: Database,
    purge: Option<usize>,
) -> Result<Database, BackupError> {
    remove_leftovers(path);
    let db = match purge {
        Some(cache_bytes) if meta_value(&db, SCRUB_KEY)?.is_some() => scrub(path, db, cache_bytes)?,
        _ => db,
    };
    if let Some(old) = meta_value(&db, BACKUP_OF_KEY)? {
        let epoch = format!("{:016x}", rand::random::<u64>());
        let txn = db.begin_write()?;
        let taken = {
            let mut meta = txn.open_table(META)?;
            meta.insert(EPOCH_KEY, epoch.as_str())?;
            meta.remove(BACKUP_OF_KEY)?;
            meta.remove(BACKUP_AT_KEY)?.map(|g| g.value().to_owned())
        };
        txn.commit()?;
        info!(
            backup_of = %old,
            taken_at_ms = taken.as_deref().unwrap_or("unknown"),
            epoch = %epoch,
            "opened a restored backup: new epoch, resumes across the restore answer recovered: false"
        );
    }
    Ok(db)
}

/// Removes the temporary files of backups and rewrites that a crash cut
/// short, next to the store file at `path`.
fn remove_leftovers(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let scrub = path.with_extension("redb.scrub");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let backup = name.starts_with(BACKUP_TMP_PREFIX) && name.ends_with(".redb");
        if backup || entry.path() == scrub {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => info!(file = %entry.path().display(), "removed an unfinished copy"),
                Err(e) => {
                    warn!(file = %entry.path().display(), error = %e, "cannot remove an unfinished copy")
                }
            }
        }
    }
}

/// The name prefix of a backup's temporary file in the data directory.
const BACKUP_TMP_PREFIX: &str = ".backup-";

/// Replaces the file at `path` by a fresh copy of its latest commit.
fn scrub(path: &Path, db: Database, cache_bytes: usize) -> Result<Database, BackupError> {
    let tmp = path.with_extension("redb.scrub");
    let _ = std::fs::remove_file(&tmp);
    let started = std::time::Instant::now();
    let copied = db
        .begin_read()
        .map_err(BackupError::from)
        .and_then(|src| copy_snapshot(&src, &tmp, cache_bytes, |_| Ok(())));
    match copied {
        Ok(entries) => {
            drop(db);
            std::fs::rename(&tmp, path).map_err(io("cannot replace", path))?;
            sync_dir(path)?;
            info!(
                entries,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "rewrote the store so that erased and expired message bodies leave the disk"
            );
            Database::create(path).map_err(|source| BackupError::Create {
                path: path.to_owned(),
                source,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            warn!(error = %e, "cannot rewrite the store to drop freed message bodies; using it as it is until the next start");
            Ok(db)
        }
    }
}

/// Writes exactly `len` bytes from `bytes` to `dest` durably: a sibling
/// temporary file, fsync'd, renamed over `dest`, the directory fsync'd.
/// Fewer bytes leave nothing behind. For the `backup` command.
pub fn write_file_durably(
    dest: &Path,
    bytes: &mut dyn std::io::Read,
    len: u64,
) -> Result<u64, BackupError> {
    let tmp = dest.with_extension("partial");
    let written = (|| {
        let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        let n = std::io::copy(&mut std::io::Read::take(bytes, len), &mut f)
            .map_err(io("cannot write", &tmp))?;
        if n != len {
            return Err(BackupError::Io {
                what: "the download was cut off, nothing kept of",
                path: dest.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{n} of {len} bytes"),
                ),
            });
        }
        f.sync_all().map_err(io("cannot sync", &tmp))?;
        Ok(n)
    })();
    let n = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, dest).map_err(io("cannot rename into", dest))?;
    sync_dir(dest)?;
    Ok(n)
}

/// Opens a backup file read-only enough to check it is a whole store copy:
/// returns the epoch it was taken from and its message chunk count.
pub fn verify(path: &Path) -> Result<(String, u64), BackupError> {
    let db = Database::open(path).map_err(|source| BackupError::Create {
        path: path.to_owned(),
        source,
    })?;
    let txn = db.begin_read()?;
    let of = txn
        .open_table(META)?
        .get(BACKUP_OF_KEY)?
        .map(|g| g.value().to_owned())
        .unwrap_or_default();
    let chunks = match txn.open_table(MESSAGES) {
        Ok(t) => t.len()?,
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => return Err(e.into()),
    };
    Ok((of, chunks))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const CACHE: usize = 1 << 20;

    fn store_file(dir: &Path) -> (PathBuf, Database) {
        let path = dir.join("switchboard.redb");
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(EPOCH_KEY, "00000000000000aa")
            .unwrap();
        txn.commit().unwrap();
        (path, db)
    }

    #[test]
    fn a_table_the_copy_does_not_know_fails_the_backup_rather_than_being_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let (_, db) = store_file(dir.path());
        let snap = snapshot(&db, dir.path(), CACHE).unwrap();
        assert_eq!(snap.epoch, "00000000000000aa");
        assert!(snap.bytes > 0);
        let txn = db.begin_write().unwrap();
        let later: TableDefinition<u64, u64> = TableDefinition::new("added_later");
        txn.open_table(later).unwrap().insert(1, 2).unwrap();
        txn.commit().unwrap();
        let err = snapshot(&db, dir.path(), CACHE).unwrap_err();
        assert!(
            matches!(&err, BackupError::UnknownTable(t) if t == "added_later"),
            "{err}"
        );
        // Neither attempt leaves a file behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["switchboard.redb"]);
    }

    #[test]
    fn a_marked_file_is_rewritten_at_open_only_when_purging() {
        let dir = tempfile::tempdir().unwrap();
        let (path, db) = store_file(dir.path());
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(SCRUB_KEY, "1")
            .unwrap();
        txn.commit().unwrap();
        let db = on_open(&path, db, None).unwrap();
        assert!(
            meta_value(&db, SCRUB_KEY).unwrap().is_some(),
            "kept as it is"
        );
        let db = on_open(&path, db, Some(CACHE)).unwrap();
        assert!(meta_value(&db, SCRUB_KEY).unwrap().is_none(), "rewritten");
        assert_eq!(
            meta_value(&db, EPOCH_KEY).unwrap().as_deref(),
            Some("00000000000000aa")
        );
    }

    #[test]
    fn opening_removes_unfinished_copies_and_renews_a_restored_epoch_once() {
        let dir = tempfile::tempdir().unwrap();
        let (path, db) = store_file(dir.path());
        let mut snap = snapshot(&db, dir.path(), CACHE).unwrap();
        drop(db);
        let restored_dir = tempfile::tempdir().unwrap();
        let restored = restored_dir.path().join("switchboard.redb");
        write_file_durably(&restored, &mut snap.file, snap.bytes).unwrap();
        assert_eq!(verify(&restored).unwrap().0, "00000000000000aa");
        let stale = [
            restored_dir.path().join(".backup-0123456789abcdef.redb"),
            restored.with_extension("redb.scrub"),
        ];
        for f in &stale {
            std::fs::write(f, b"cut short").unwrap();
        }
        let keep = restored_dir.path().join("notes.txt");
        std::fs::write(&keep, b"mine").unwrap();

        let db = on_open(&restored, Database::create(&restored).unwrap(), Some(CACHE)).unwrap();
        for f in &stale {
            assert!(!f.exists(), "{} removed", f.display());
        }
        assert!(keep.exists());
        let epoch = meta_value(&db, EPOCH_KEY).unwrap().unwrap();
        assert_ne!(epoch, "00000000000000aa");
        assert!(meta_value(&db, BACKUP_OF_KEY).unwrap().is_none());
        drop(db);
        let db = on_open(&restored, Database::create(&restored).unwrap(), Some(CACHE)).unwrap();
        assert_eq!(meta_value(&db, EPOCH_KEY).unwrap().unwrap(), epoch);
        // The original store is untouched by all this.
        let db = on_open(&path, Database::create(&path).unwrap(), Some(CACHE)).unwrap();
        assert_eq!(
            meta_value(&db, EPOCH_KEY).unwrap().as_deref(),
            Some("00000000000000aa")
        );
    }
}
