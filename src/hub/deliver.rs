//! Delivery of committed messages: a commit's messages encoded once and
//! grouped by room ([`Fanout`]), then fanned out to every member of each
//! room with one shared delivery (`Hub::deliver`), and the hub as a store's
//! `CommitSink`.
//!
//! It owns the committed-message path through the hub and nothing else: it
//! must not change a room's members, users or events, and it reaches a
//! session only through its outbox's non-blocking push. One caller at a
//! time, in commit order (the fan-out task, or in a cluster the bus's
//! delivery task), so a room's members see its messages in seq order.

use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::delivery::{Delivery, Encoded, WireFrame};
use crate::hub::Hub;
use crate::store::{CommitSink, Committed};

/// A commit's new messages, each encoded once, grouped by room in commit
/// order: what [`Hub::deliver`] fans out. Encoding is per message, so it
/// can be done away from the fan-out (on the store writer thread).
#[derive(Debug)]
pub struct Fanout {
    /// Per room, its messages in strictly increasing seq.
    rooms: Vec<(Box<str>, Vec<Encoded>)>,
    /// When the messages were encoded: the start of the fan-out latency
    /// their deliveries report.
    encoded: Instant,
}

impl Fanout {
    /// Encodes `msgs` (one commit's, in commit order) and groups them by room.
    pub fn encode(msgs: &[Committed<'_>]) -> Fanout {
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
        Fanout {
            rooms,
            encoded: Instant::now(),
        }
    }
}

impl Hub {
    /// Fans encoded messages out: per room, one shared delivery of all of
    /// them and one non-blocking push per member. Fan-outs must come in
    /// commit order (one caller at a time), as members see them in it.
    pub fn deliver(&self, fanout: Fanout) {
        for (room, messages) in fanout.rooms {
            let Some(r) = self.rooms.get(&*room) else {
                continue;
            };
            let last = messages.last().map(|m| m.seq);
            let delivery = Arc::new(Delivery::encoded_at(
                r.name.clone(),
                messages,
                fanout.encoded,
            ));
            for m in &r.members {
                m.outbox.push_message(&delivery);
            }
            if let Some(seq) = last {
                // Still under the guard of the pushes: see `Room::latest`.
                r.raise_latest(seq);
            }
        }
    }
}

impl CommitSink for Hub {
    /// Encodes a commit's messages and fans them out at once, on the
    /// caller's thread (in a cluster, the bus's delivery task).
    fn committed(&self, msgs: &[Committed<'_>]) {
        self.deliver(Fanout::encode(msgs));
    }
}
