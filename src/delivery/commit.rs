//! A commit's new messages, encoded: what the hub fans out of one durable
//! commit, in both modes. Encoding is per message, so it is done once, away
//! from the fan-out (on the store writer thread, or the bus's delivery
//! task); the fan-out is then per member only.

use std::time::Instant;

use rustc_hash::FxHashMap;

use super::wire::{Encoded, WireFrame};
use crate::history::Committed;

/// A commit's new messages, each encoded once, grouped by room in commit
/// order.
#[derive(Debug)]
pub struct EncodedCommit {
    /// Per room, its messages in strictly increasing seq.
    pub rooms: Vec<(Box<str>, Vec<Encoded>)>,
    /// When the messages were encoded: the start of the fan-out latency
    /// their deliveries report.
    pub encoded: Instant,
}

impl EncodedCommit {
    /// Encodes `msgs` (one commit's, in commit order) and groups them by room.
    pub fn encode(msgs: &[Committed<'_>]) -> EncodedCommit {
        // Most commits hold few rooms; the map is per commit, never per
        // recipient.
        let mut rooms: Vec<(Box<str>, Vec<Encoded>)> = Vec::new();
        let mut index: FxHashMap<&str, usize> = FxHashMap::default();
        for msg in msgs {
            let message = protocol::MessageRef::new(msg.room, msg.seq, msg.from, msg.ts, msg.body);
            let encoded = Encoded {
                seq: msg.seq,
                frame: WireFrame::json(&message),
            };
            let i = *index.entry(msg.room).or_insert_with(|| {
                rooms.push((Box::from(msg.room), Vec::new()));
                rooms.len() - 1
            });
            if let Some((_, list)) = rooms.get_mut(i) {
                list.push(encoded);
            }
        }
        EncodedCommit {
            rooms,
            encoded: Instant::now(),
        }
    }
}
