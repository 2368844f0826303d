//! Table definitions and the store record encoding.
//!
//! This module owns the on-disk layout: which tables exist, their key and
//! value types, and the byte encoding of a stored message. Store records are
//! deliberately separate from wire types: the protocol may change without a
//! migration of the file, and the file never holds a serde format.
//! `docs/store-format.md` describes every table and encoding; a change to
//! either is a new format version (`schema.rs`).

use redb::{ReadableTable, TableDefinition};

pub use super::error::RecordError;
use super::error::WriteError;

/// Store-wide metadata, such as the epoch.
pub const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// A room's messages in chunks, keyed by (room, seq of the chunk's last
/// message); the value is a [`Chunk`]: the records of consecutive seqs
/// ending at the key's. An index flush writes one chunk per room (or a few,
/// see [`CHUNK_MAX_RECORDS`]) however many messages it holds, so the pages
/// written per flush grow with the rooms, not the messages. Only retention
/// removes messages, a room's oldest first, and it records what it removed
/// in [`RETAINED_FROM`] (erasure keeps the record without its body), so a
/// room's latest seq is its last key or that mark: seqs continue gap-free
/// after a restart with no second table written per message.
pub const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");

/// Most records in one chunk. A history read decodes whole chunks, so this
/// bounds the extra work of a read that needs one message of a chunk.
pub const CHUNK_MAX_RECORDS: usize = 64;

/// The room's latest seq, read from its last message; 0 when it has none.
pub fn last_seq(
    messages: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    room: &str,
) -> Result<u64, redb::StorageError> {
    let last = messages.range((room, 0u64)..=(room, u64::MAX))?.next_back();
    Ok(match last {
        Some(entry) => entry?.0.value().1,
        None => 0,
    })
}
/// Idempotency keys: (room, user, key) -> (seq, ts, inserted_at_ms).
pub const KEYS: TableDefinition<(&str, &str, &str), (u64, u64, u64)> =
    TableDefinition::new("idempotency_keys");
/// Expiry index of idempotency keys: (inserted_at_ms, room, user, key).
pub const KEY_EXPIRY: TableDefinition<(u64, &str, &str, &str), ()> =
    TableDefinition::new("idempotency_expiry");
/// The sender index of files written before [`ROOMS_BY_USER`]: one entry
/// per message, (user, room, seq): format version 1, which the migration
/// to version 2 (`schema.rs`) moves into [`ROOMS_BY_USER`] and deletes;
/// nothing else reads it.
pub const OLD_BY_USER: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("by_user");

/// The rooms each user has sent to: (user, room), for export and erasure,
/// which then scan those rooms. One entry per pair, not per message, so a
/// flush writes to it only for a pair it has not seen.
pub const ROOMS_BY_USER: TableDefinition<(&str, &str), ()> = TableDefinition::new("rooms_by_user");

/// Committed messages not yet written to [`MESSAGES`] and [`ROOMS_BY_USER`],
/// one value per commit, keyed in increasing order; the value is a
/// [`LogBatch`]. A commit appends one value here, whatever rooms its
/// messages are in, so it writes a few pages and no B-tree leaf per message. An index flush writes every entry to
/// the indexes and deletes this table in the same transaction, so an entry
/// is always in exactly one of the two places; opening the store indexes
/// whatever a previous run left here.
pub const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// The key of the epoch in [`META`].
pub const EPOCH_KEY: &str = "epoch";
/// The key in [`META`] of the value the writer commits, and then removes,
/// to learn whether the store can commit again after a failure.
pub const PROBE_KEY: &str = "probe";
/// Present in [`META`] once an erasure or retention freed a message body
/// since the file was last rewritten: redb does not overwrite freed pages,
/// so the next open rewrites the file (see `backup::on_open`).
pub const SCRUB_KEY: &str = "scrub_pending";
/// Present in [`META`] only in a backup file: the epoch of the store it
/// was taken from. Opening such a file makes a new epoch (see `backup`).
pub const BACKUP_OF_KEY: &str = "backup_of_epoch";
/// In a backup file's [`META`]: when it was taken, ms since the Unix epoch.
pub const BACKUP_AT_KEY: &str = "backup_at_ms";

/// Per room whose oldest messages retention deleted: the lowest seq it
/// kept (one past the highest it deleted). A room's latest seq is at least
/// this minus one, so seqs never go back even when retention deleted every
/// message of a room.
pub const RETAINED_FROM: TableDefinition<&str, u64> = TableDefinition::new("retained_from");

/// The current record format.
const RECORD_V1: u8 = 1;
/// The current chunk format.
const CHUNK_V2: u8 = 2;
/// The current log batch format.
const LOG_BATCH_V1: u8 = 1;
const BODY_PRESENT: u8 = 1;
const BODY_ERASED: u8 = 0;

/// A stored message, borrowed from its encoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub ts: u64,
    pub from: &'a str,
    /// `None` when the message was erased.
    pub body: Option<&'a str>,
}

impl<'a> Record<'a> {
    #[cfg(test)]
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the encoding to `out`; on error `out` is unchanged.
    /// Layout: version (1), ts (8, LE), from length (2, LE), from, body flag (1), body.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let from_len = u16::try_from(self.from.len()).map_err(|_| RecordError::FromTooLong)?;
        let body = self.body.unwrap_or("");
        out.push(RECORD_V1);
        out.extend_from_slice(&self.ts.to_le_bytes());
        out.extend_from_slice(&from_len.to_le_bytes());
        out.extend_from_slice(self.from.as_bytes());
        out.push(if self.body.is_some() {
            BODY_PRESENT
        } else {
            BODY_ERASED
        });
        out.extend_from_slice(body.as_bytes());
        Ok(())
    }

    pub fn decode(bytes: &'a [u8]) -> Result<Record<'a>, RecordError> {
        let (&version, rest) = bytes.split_first().ok_or(RecordError::Truncated)?;
        if version != RECORD_V1 {
            return Err(RecordError::Version(version));
        }
        let (ts, rest) = rest
            .split_first_chunk::<8>()
            .ok_or(RecordError::Truncated)?;
        let (from_len, rest) = rest
            .split_first_chunk::<2>()
            .ok_or(RecordError::Truncated)?;
        let from_len = usize::from(u16::from_le_bytes(*from_len));
        if rest.len() < from_len + 1 {
            return Err(RecordError::Truncated);
        }
        let (from, rest) = rest.split_at(from_len);
        let from = std::str::from_utf8(from).map_err(|_| RecordError::Utf8)?;
        let (&flag, body) = rest.split_first().ok_or(RecordError::Truncated)?;
        let body = match flag {
            BODY_PRESENT => Some(std::str::from_utf8(body).map_err(|_| RecordError::Utf8)?),
            _ => None,
        };
        Ok(Record {
            ts: u64::from_le_bytes(*ts),
            from,
            body,
        })
    }
}

/// Builds the value of one [`MESSAGES`] chunk.
/// Layout: version (1), then per record: its length (4, LE) and its bytes.
#[derive(Debug, Default)]
pub struct Chunk {
    buf: Vec<u8>,
}

impl Chunk {
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    pub fn push(&mut self, record: &Record<'_>) -> Result<(), RecordError> {
        push_framed(&mut self.buf, CHUNK_V2, |out| record.encode_into(out))
    }

    /// Pushes a record already encoded.
    pub fn push_raw(&mut self, record: &[u8]) -> Result<(), RecordError> {
        push_framed(&mut self.buf, CHUNK_V2, |out| {
            out.extend_from_slice(record);
            Ok(())
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The records of the chunk stored under `last_seq`, as (seq, record)
    /// in increasing seq. A bare version-1 record is a chunk of one.
    pub fn decode(last_seq: u64, bytes: &[u8]) -> Result<Vec<(u64, Record<'_>)>, RecordError> {
        let (&version, rest) = bytes.split_first().ok_or(RecordError::Truncated)?;
        match version {
            RECORD_V1 => return Ok(vec![(last_seq, Record::decode(bytes)?)]),
            CHUNK_V2 => {}
            v => return Err(RecordError::Version(v)),
        }
        let records = split_framed(rest)?
            .into_iter()
            .map(Record::decode)
            .collect::<Result<Vec<_>, _>>()?;
        let count = u64::try_from(records.len()).map_err(|_| RecordError::ChunkCount)?;
        if count == 0 || count > last_seq {
            return Err(RecordError::ChunkCount);
        }
        let first = last_seq - count + 1;
        Ok((first..).zip(records).collect())
    }
}

/// Writes one room's records, consecutive and in increasing seq, to
/// [`MESSAGES`] as chunks of at most [`CHUNK_MAX_RECORDS`]; `seq` gives an
/// item's seq and `push` adds its record to a chunk.
pub fn insert_chunks<T>(
    messages: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    room: &str,
    items: &[T],
    seq: impl Fn(&T) -> u64,
    mut push: impl FnMut(&mut Chunk, &T) -> Result<(), RecordError>,
) -> Result<(), WriteError> {
    let mut chunk = Chunk::default();
    for run in items.chunks(CHUNK_MAX_RECORDS) {
        chunk.clear();
        for item in run {
            push(&mut chunk, item)?;
        }
        if let Some(last) = run.last() {
            messages.insert((room, seq(last)), chunk.bytes())?;
        }
    }
    Ok(())
}

/// Appends one item to a buffer of length-prefixed items, first writing
/// `version` if the buffer is empty. Layout: version (1), then per item its
/// length (4, LE) and its bytes. On error the buffer is as it was.
fn push_framed(
    buf: &mut Vec<u8>,
    version: u8,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), RecordError>,
) -> Result<(), RecordError> {
    let start = buf.len();
    if buf.is_empty() {
        buf.push(version);
    }
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let len = write(buf)
        .and_then(|()| u32::try_from(buf.len() - at - 4).map_err(|_| RecordError::Truncated));
    match len {
        Ok(len) => {
            if let Some(slot) = buf.get_mut(at..at + 4) {
                slot.copy_from_slice(&len.to_le_bytes());
            }
            Ok(())
        }
        Err(e) => {
            buf.truncate(start);
            Err(e)
        }
    }
}

/// The items of a buffer written by [`push_framed`], after its version byte.
fn split_framed(mut rest: &[u8]) -> Result<Vec<&[u8]>, RecordError> {
    let mut items = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or(RecordError::Truncated)?;
        let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| RecordError::Truncated)?;
        items.push(tail.get(..len).ok_or(RecordError::Truncated)?);
        rest = tail.get(len..).unwrap_or_default();
    }
    Ok(items)
}

/// Builds one [`LOG`] value: a commit's new messages as [`LogEntry`]s.
#[derive(Debug, Default)]
pub struct LogBatch {
    buf: Vec<u8>,
}

impl LogBatch {
    pub fn push(&mut self, entry: &LogEntry<'_>) -> Result<(), RecordError> {
        push_framed(&mut self.buf, LOG_BATCH_V1, |out| entry.encode_into(out))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The encoded entries of a stored batch, in commit order.
    pub fn entries(bytes: &[u8]) -> Result<Vec<&[u8]>, RecordError> {
        let (&version, rest) = bytes.split_first().ok_or(RecordError::Truncated)?;
        if version != LOG_BATCH_V1 {
            return Err(RecordError::Version(version));
        }
        split_framed(rest)
    }
}

/// A message in [`LOG`]: where it belongs in [`MESSAGES`], and its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry<'a> {
    pub room: &'a str,
    pub seq: u64,
    pub record: Record<'a>,
}

impl<'a> LogEntry<'a> {
    /// Layout: room length (2, LE), room, seq (8, LE), then the record.
    #[cfg(test)]
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the encoding to `out`; on error `out` may hold a partial
    /// entry, which [`push_framed`] removes.
    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let room_len = u16::try_from(self.room.len()).map_err(|_| RecordError::RoomTooLong)?;
        out.extend_from_slice(&room_len.to_le_bytes());
        out.extend_from_slice(self.room.as_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        self.record.encode_into(out)
    }

    pub fn decode(bytes: &'a [u8]) -> Result<LogEntry<'a>, RecordError> {
        let (room_len, rest) = bytes
            .split_first_chunk::<2>()
            .ok_or(RecordError::Truncated)?;
        let room_len = usize::from(u16::from_le_bytes(*room_len));
        if rest.len() < room_len {
            return Err(RecordError::Truncated);
        }
        let (room, rest) = rest.split_at(room_len);
        let room = std::str::from_utf8(room).map_err(|_| RecordError::Utf8)?;
        let (seq, rest) = rest
            .split_first_chunk::<8>()
            .ok_or(RecordError::Truncated)?;
        Ok(LogEntry {
            room,
            seq: u64::from_le_bytes(*seq),
            record: Record::decode(rest)?,
        })
    }

    /// The record's own bytes within an encoded entry, as [`MESSAGES`]
    /// stores them.
    pub fn record_bytes(bytes: &[u8]) -> Result<&[u8], RecordError> {
        let (room_len, rest) = bytes
            .split_first_chunk::<2>()
            .ok_or(RecordError::Truncated)?;
        rest.get(usize::from(u16::from_le_bytes(*room_len)) + 8..)
            .ok_or(RecordError::Truncated)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_corruption_is_an_error() {
        let r = Record {
            ts: 42,
            from: "alice",
            body: Some(r#"{"a":1}"#),
        };
        let bytes = r.encode().unwrap();
        assert_eq!(Record::decode(&bytes), Ok(r));
        let erased = Record { body: None, ..r };
        assert_eq!(Record::decode(&erased.encode().unwrap()), Ok(erased));
        for cut in 0..bytes.len() - 7 {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert_eq!(Record::decode(&bad), Err(RecordError::Version(9)));
    }

    #[test]
    fn chunks_round_trip_with_their_seqs_and_a_bare_record_is_a_chunk_of_one() {
        let a = Record {
            ts: 1,
            from: "a",
            body: Some("1"),
        };
        let b = Record {
            ts: 2,
            from: "b",
            body: None,
        };
        let mut chunk = Chunk::default();
        chunk.push(&a).unwrap();
        chunk.push_raw(&b.encode().unwrap()).unwrap();
        let bytes = chunk.bytes().to_vec();
        assert_eq!(Chunk::decode(11, &bytes).unwrap(), vec![(10, a), (11, b)]);
        assert_eq!(Chunk::decode(1, &bytes), Err(RecordError::ChunkCount));
        // Cut at the boundary between the records, it is a valid chunk of one.
        let boundary = 1 + 4 + a.encode().unwrap().len();
        for cut in (1..bytes.len()).filter(|&c| c != boundary) {
            assert!(Chunk::decode(11, &bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(
            Chunk::decode(11, &bytes[..boundary]).unwrap(),
            vec![(11, a)]
        );
        assert_eq!(
            Chunk::decode(5, &a.encode().unwrap()).unwrap(),
            vec![(5, a)]
        );
        chunk.clear();
        assert!(chunk.bytes().is_empty());
    }

    #[test]
    fn log_entries_round_trip_and_hold_the_record_bytes_messages_stores() {
        let record = Record {
            ts: 7,
            from: "bob",
            body: Some("\"hi\""),
        };
        let entry = LogEntry {
            room: "lobby",
            seq: 99,
            record,
        };
        let bytes = entry.encode().unwrap();
        assert_eq!(LogEntry::decode(&bytes), Ok(entry));
        assert_eq!(
            LogEntry::record_bytes(&bytes).unwrap(),
            record.encode().unwrap().as_slice()
        );
        for cut in 0..bytes.len() - 4 {
            assert!(LogEntry::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut batch = LogBatch::default();
        batch.push(&entry).unwrap();
        batch.push(&LogEntry { seq: 100, ..entry }).unwrap();
        let entries = LogBatch::entries(batch.bytes()).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(LogEntry::decode(entries[1]).unwrap().seq, 100);
        assert!(LogBatch::entries(&batch.bytes()[..batch.bytes().len() - 1]).is_err());
    }
}
