//! The store file's format version and the migrations between versions.
//!
//! It owns the version kept in the `meta` table under [`SCHEMA_KEY`], the
//! refusal of a file written by a newer binary (checked before opening
//! writes anything), and one migration per version step, each run inside
//! the transaction that opens the store, so a file is either migrated and
//! marked or left as it was. `docs/store-format.md` describes each version.
//! It must not touch a table outside a migration, and a migration must be
//! safe on a file that never held the old layout (a new file is version 1
//! until its first open marks it).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};

use super::error::{OpenError, WriteError};
use super::tables::{META, OLD_BY_USER, ROOMS_BY_USER};

/// The key of the format version in `meta`: a decimal number.
pub const SCHEMA_KEY: &str = "schema_version";

/// The format this binary writes and the newest it can open.
pub const SCHEMA_VERSION: u32 = 2;

/// The version of a file without [`SCHEMA_KEY`]: one written before
/// versions were kept, or a new file.
const UNVERSIONED: u32 = 1;

/// One step: migrates a file of version `n` (its index plus one) to `n + 1`.
type Migration = fn(&WriteTransaction) -> Result<(), WriteError>;

const MIGRATIONS: [Migration; (SCHEMA_VERSION - UNVERSIONED) as usize] = [v1_to_v2];

/// Refuses a file whose version this binary does not know (newer, or not
/// a number). Reads only, so a refused file is left as it was.
pub(super) fn check(path: &Path, db: &Database) -> Result<(), OpenError> {
    let read = || -> Result<Option<String>, WriteError> {
        let txn = db.begin_read()?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(meta.get(SCHEMA_KEY)?.map(|v| v.value().to_owned()))
    };
    let Some(found) = read().map_err(OpenError::Init)? else {
        return Ok(());
    };
    match found.parse::<u32>() {
        Ok(v) if (UNVERSIONED..=SCHEMA_VERSION).contains(&v) => Ok(()),
        Ok(v) if v > SCHEMA_VERSION => Err(OpenError::NewerFormat {
            path: path.to_owned(),
            found: v,
            known: SCHEMA_VERSION,
        }),
        _ => Err(OpenError::UnknownFormat {
            path: path.to_owned(),
            found,
        }),
    }
}

/// Runs every migration from the file's version to [`SCHEMA_VERSION`] in
/// `txn` and marks the file with it. Returns the version it started from.
/// [`check`] has refused any version outside the known range.
pub(super) fn migrate(txn: &WriteTransaction) -> Result<u32, WriteError> {
    let mut meta = txn.open_table(META)?;
    let from = meta
        .get(SCHEMA_KEY)?
        .and_then(|v| v.value().parse::<u32>().ok())
        .unwrap_or(UNVERSIONED)
        .clamp(UNVERSIONED, SCHEMA_VERSION);
    for step in &MIGRATIONS[(from - UNVERSIONED) as usize..] {
        step(txn)?;
    }
    meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_string().as_str())?;
    Ok(from)
}

/// Version 1 kept a sender entry per message in `by_user` (user, room,
/// seq); version 2 keeps one per (user, room) pair in `rooms_by_user`.
/// Version 1's bare message records need no rewrite: they read as chunks
/// of one.
fn v1_to_v2(txn: &WriteTransaction) -> Result<(), WriteError> {
    {
        let old = txn.open_table(OLD_BY_USER)?;
        let mut by_user = txn.open_table(ROOMS_BY_USER)?;
        for entry in old.iter()? {
            let (k, _) = entry?;
            let (user, room, _) = k.value();
            by_user.insert((user, room), ())?;
        }
    }
    txn.delete_table(OLD_BY_USER)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use redb::ReadableTableMetadata;

    use super::super::tables::{MESSAGES, Record};
    use super::super::{Durability, Store, StoreOptions};
    use super::*;
    use crate::history::{CommitSink, Committed};

    struct Nowhere;

    impl CommitSink for Nowhere {
        fn committed(&self, _msgs: &[Committed<'_>]) {}
    }

    fn opts() -> StoreOptions {
        StoreOptions {
            durability: Durability::Immediate,
            max_batch: 64,
            index_batch: 1024,
            index_batch_bytes: 1 << 20,
            queue_capacity: 64,
            queue_bytes: 1 << 20,
            idempotency_ttl: Duration::from_secs(3600),
            cache_bytes: 1 << 20,
            retry_interval: Duration::from_millis(50),
            probe_bytes: 1024,
            backup_cache_bytes: 1 << 20,
            purge_on_start: true,
        }
    }

    fn open(path: &Path) -> Result<Store, OpenError> {
        Store::open(path, opts(), Arc::new(Nowhere))
    }

    fn meta(path: &Path, key: &str) -> Option<String> {
        let db = Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        meta.get(key).unwrap().map(|v| v.value().to_owned())
    }

    /// A file with only `meta`, holding `version`.
    fn file_of_version(path: &Path, version: &str) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(SCHEMA_KEY, version)
            .unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn a_new_file_is_marked_with_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        open(&path).unwrap().shutdown().unwrap();
        assert_eq!(meta(&path, SCHEMA_KEY), Some(SCHEMA_VERSION.to_string()));
        // Opening a current file again keeps it as it is.
        open(&path).unwrap().shutdown().unwrap();
        assert_eq!(meta(&path, SCHEMA_KEY), Some(SCHEMA_VERSION.to_string()));
    }

    #[test]
    fn an_unversioned_file_is_migrated_from_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut messages = txn.open_table(MESSAGES).unwrap();
                let mut old = txn.open_table(OLD_BY_USER).unwrap();
                for (seq, from) in [(1, "alice"), (2, "bob"), (3, "alice")] {
                    let record = Record {
                        ts: seq,
                        from,
                        body: Some("{}"),
                    };
                    let bytes = record.encode().unwrap();
                    messages.insert(("r", seq), bytes.as_slice()).unwrap();
                    old.insert((from, "r", seq), ()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        open(&path).unwrap().shutdown().unwrap();
        assert_eq!(meta(&path, SCHEMA_KEY), Some("2".to_owned()));
        let db = Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(
            matches!(
                txn.open_table(OLD_BY_USER),
                Err(redb::TableError::TableDoesNotExist(_))
            ),
            "version 1's sender index is gone"
        );
        let pairs: Vec<(String, String)> = txn
            .open_table(ROOMS_BY_USER)
            .unwrap()
            .iter()
            .unwrap()
            .map(|e| {
                let (k, _) = e.unwrap();
                let (u, r) = k.value();
                (u.to_owned(), r.to_owned())
            })
            .collect();
        assert_eq!(
            pairs,
            [
                ("alice".to_owned(), "r".to_owned()),
                ("bob".to_owned(), "r".to_owned())
            ]
        );
        assert_eq!(txn.open_table(MESSAGES).unwrap().len().unwrap(), 3);
    }

    #[test]
    fn a_file_of_a_newer_version_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let newer = (SCHEMA_VERSION + 1).to_string();
        file_of_version(&path, &newer);
        let err = open(&path).err().expect("a newer file is refused");
        assert!(
            matches!(err, OpenError::NewerFormat { found, known, .. }
                if found == SCHEMA_VERSION + 1 && known == SCHEMA_VERSION),
            "{err:?}"
        );
        assert!(err.to_string().contains("newer than this binary"), "{err}");
        assert_eq!(meta(&path, SCHEMA_KEY), Some(newer));
        assert_eq!(meta(&path, "epoch"), None, "nothing was written");
    }

    #[test]
    fn a_version_that_is_not_a_known_number_is_refused() {
        for version in ["two", "0", ""] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db.redb");
            file_of_version(&path, version);
            let err = open(&path).err().expect("an unknown version is refused");
            assert!(
                matches!(&err, OpenError::UnknownFormat { found, .. } if found == version),
                "{version:?}: {err:?}"
            );
        }
    }
}
