//! Table definitions and the store record encoding.
//!
//! This module owns the on-disk layout: which tables exist, their key and
//! value types, and the byte encoding of a stored message. Store records are
//! deliberately separate from wire types: the protocol may change without a
//! migration of the file, and the file never holds a serde format.

use redb::{ReadableTable, TableDefinition};

/// Store-wide metadata, such as the epoch.
pub const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Messages keyed by (room, seq); the value is an encoded [`Record`].
/// Messages are never removed (erasure keeps the record without its body),
/// so a room's last key is its latest seq: seqs continue gap-free after a
/// restart with no second table written per message.
pub const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");

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
/// Every message by sender: (user, room, seq), for export and erasure.
pub const BY_USER: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("by_user");

/// The key of the epoch in [`META`].
pub const EPOCH_KEY: &str = "epoch";

/// The current record format.
const RECORD_V1: u8 = 1;
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
}

impl<'a> Record<'a> {
    /// Layout: version (1), ts (8, LE), from length (2, LE), from, body flag (1), body.
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let from_len = u16::try_from(self.from.len()).map_err(|_| RecordError::FromTooLong)?;
        let body = self.body.unwrap_or("");
        let mut out = Vec::with_capacity(12 + self.from.len() + body.len());
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
        Ok(out)
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
}
