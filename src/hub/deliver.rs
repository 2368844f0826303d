//! Delivery of committed messages: `Hub::deliver`, the one entry of
//! durable messages into the hub in both modes. A commit arrives encoded
//! once and grouped by room (`delivery::EncodedCommit`) and is fanned out to
//! every member of each room with one shared delivery.
//!
//! It owns the committed-message path through the hub and nothing else: it
//! must not change a room's members, users or events, and it reaches a
//! session only through its outbox's non-blocking push. One caller at a
//! time, in commit order (the hand-off's delivery task, or in a cluster the
//! bus's delivery task), so a room's members see its messages in seq order.

use std::sync::Arc;

use crate::delivery::{Delivery, EncodedCommit, TallyBatch};
use crate::hub::Hub;

impl Hub {
    /// Fans a commit's encoded messages out: per room, one shared delivery
    /// of all of them and one non-blocking push per member. Commits must
    /// come in commit order (one caller at a time), as members see them in
    /// it.
    pub fn deliver(&self, commit: EncodedCommit) {
        // The registry's queued-bytes total is touched once per room, not
        // once per member.
        let mut tally = TallyBatch::default();
        for (room, messages) in commit.rooms {
            let Some(r) = self.rooms.get(&*room) else {
                continue;
            };
            let last = messages.last().map(|m| m.seq);
            let delivery = Arc::new(Delivery::encoded_at(
                r.name.clone(),
                messages,
                commit.encoded,
            ));
            for m in &r.members {
                m.outbox.push_message_batched(&delivery, &mut tally);
            }
            tally.flush();
            if let Some(seq) = last {
                // Still under the guard of the pushes: see `Room::latest`.
                r.raise_latest(seq);
            }
        }
    }
}
