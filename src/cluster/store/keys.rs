//! Idempotency keys across the cluster, in a JetStream KV bucket whose
//! entries expire after the idempotency TTL.
//!
//! A key is reserved before its message is published (KV `create`, which
//! exactly one node wins), so two nodes given the same key at once store
//! one message: the loser waits for the winner's seq. The entry is
//! `p <stream seq>` while reserved (the room's last stream seq when it was
//! reserved: the message, if stored, lies after it) and `c <seq> <ts>`
//! once stored. A reservation whose owner is gone (its node died between
//! reserving and recording) is taken over after it is `stale`: the taker
//! first looks for the message in the room after that stream seq. An
//! owner whose publish was in doubt meanwhile (NATS unreachable for longer
//! than `stale`) learns of the taker's message when its publish loses the
//! position: the writer scans what landed before it numbers again.
//!
//! It must not publish messages: the writer does, in the order it chose.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::history::Appended;

/// How a key's entry reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Reserved by a writer; the room's last stream seq at the time.
    Pending { after: u64 },
    /// Stored with this seq and time.
    Committed { seq: u64, ts: u64 },
}

impl Entry {
    fn encode(self) -> Bytes {
        match self {
            Entry::Pending { after } => Bytes::from(format!("p {after}")),
            Entry::Committed { seq, ts } => Bytes::from(format!("c {seq} {ts}")),
        }
    }

    fn decode(b: &[u8]) -> Option<Entry> {
        let s = std::str::from_utf8(b).ok()?;
        let mut parts = s.split(' ');
        match (parts.next()?, parts.next(), parts.next()) {
            ("p", Some(after), None) => Some(Entry::Pending {
                after: after.parse().ok()?,
            }),
            ("c", Some(seq), Some(ts)) => Some(Entry::Committed {
                seq: seq.parse().ok()?,
                ts: ts.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// The result of reserving a key.
#[derive(Debug)]
pub enum Reserve {
    /// This writer owns the key: publish, then [`Keys::commit`].
    Reserved,
    /// The key's message is stored already.
    Done(Appended),
    /// Another writer holds the key and has not finished in time.
    Busy,
    /// A reservation older than `stale`, left by a writer that did not
    /// finish: the message may lie after stream seq `after`. Take it over
    /// with [`Keys::take_over`] if it is not there.
    Stale { after: u64, revision: u64 },
    /// The bucket cannot be reached.
    Failed(String),
}

/// The bucket of keys.
#[derive(Clone)]
pub struct Keys {
    kv: kv::Store,
    /// How long a reservation may stay pending before others take it over.
    stale: Duration,
    /// How long a writer waits for another's reservation to be committed.
    wait: Duration,
    /// Pause between two reads of a pending key.
    poll: Duration,
}

/// A reading of a pending key is taken this many times while waiting.
const POLLS_PER_WAIT: u32 = 20;

/// The bucket key of an idempotency key: SHA-256 of the room, sender and
/// key, each length-prefixed so no two triples collide by concatenation;
/// hex, a valid KV key whatever the client's key holds.
pub fn bucket_key(room: &str, from: &str, key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [room, from, key] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    let mut out = String::with_capacity(64);
    for b in ctx.finish().as_ref() {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl Keys {
    pub fn new(kv: kv::Store, wait: Duration, stale: Duration) -> Keys {
        Keys {
            kv,
            stale,
            wait,
            poll: wait / POLLS_PER_WAIT,
        }
    }

    /// Reserves `key` for a message to be published after stream seq
    /// `after`, or learns what became of it.
    pub async fn reserve(&self, key: &str, after: u64) -> Reserve {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            match self.kv.create(key, Entry::Pending { after }.encode()).await {
                Ok(_) => return Reserve::Reserved,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Reserve::Failed(e.to_string()),
            }
            let entry = match self.kv.entry(key).await {
                Ok(e) => e,
                Err(e) => return Reserve::Failed(e.to_string()),
            };
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                // Deleted or expired since the create: try again.
                continue;
            };
            match Entry::decode(&entry.value) {
                Some(Entry::Committed { seq, ts }) => {
                    return Reserve::Done(Appended {
                        seq,
                        ts,
                        duplicate: true,
                    });
                }
                Some(Entry::Pending { after }) => {
                    let age = age_of(entry.created.unix_timestamp_nanos());
                    if age >= self.stale {
                        return Reserve::Stale {
                            after,
                            revision: entry.revision,
                        };
                    }
                }
                None => return Reserve::Failed(format!("unreadable key entry for {key}")),
            }
            if tokio::time::Instant::now() >= deadline {
                return Reserve::Busy;
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Takes over a stale reservation (if nobody else did meanwhile).
    pub async fn take_over(&self, key: &str, revision: u64, after: u64) -> bool {
        self.kv
            .update(key, Entry::Pending { after }.encode(), revision)
            .await
            .is_ok()
    }

    /// Records that the key's message is stored.
    pub async fn commit(&self, key: &str, seq: u64, ts: u64) -> Result<(), String> {
        self.kv
            .put(key, Entry::Committed { seq, ts }.encode())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Whether JetStream takes writes: a put of `probe` (a key of its own,
    /// expiring with the bucket's TTL). It needs the bucket's quorum, as a
    /// message needs the stream's.
    pub async fn probe(&self, probe: &str) -> bool {
        self.kv
            .put(probe, Bytes::from_static(b"probe"))
            .await
            .is_ok()
    }

    /// Gives a reservation up: its message is certainly not stored.
    pub async fn release(&self, key: &str) {
        if let Err(e) = self.kv.delete(key).await {
            tracing::warn!(error = %e, "cannot release an idempotency key; it is taken over once stale");
        }
    }
}

/// How long ago a time given in ns since the Unix epoch was.
fn age_of(then_ns: i128) -> Duration {
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let then_ns = u128::try_from(then_ns).unwrap_or(0);
    Duration::from_nanos(u64::try_from(now_ns.saturating_sub(then_ns)).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        for e in [
            Entry::Pending { after: 7 },
            Entry::Committed { seq: 3, ts: 1_700 },
        ] {
            assert_eq!(Entry::decode(&e.encode()), Some(e));
        }
        assert_eq!(Entry::decode(b"x 1"), None);
    }

    #[test]
    fn bucket_keys_separate_parts() {
        assert_ne!(bucket_key("ab", "c", "k"), bucket_key("a", "bc", "k"));
        assert_eq!(bucket_key("r", "u", "k").len(), 64);
    }
}
