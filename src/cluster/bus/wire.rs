//! What nodes send each other on the bus: the delivery, event and
//! heartbeat payloads (JSON; not client wire types), and how a list is cut
//! into parts under the server's payload limit.
//!
//! A delivery payload carries some of one room's committed messages (the
//! node and each message's seq, sender, time and raw body); an events
//! payload one coalesced typing or presence change, or a part of a node's
//! member list of a room; a heartbeat a node's id, start time and
//! connection count, a few dozen bytes whatever the node holds.
//!
//! Shapes and arithmetic only: it must not publish, subscribe or hold
//! state.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One message on the bus (not a client wire type: nodes only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct BusMessage {
    pub(super) seq: u64,
    pub(super) from: String,
    pub(super) ts: u64,
    pub(super) body: Box<RawValue>,
}

/// A delivery payload: some of one room's committed messages, in seq order.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct DeliveryPayload {
    pub(super) node: String,
    pub(super) msgs: Vec<BusMessage>,
}

/// An events payload.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct EventPayload {
    pub(super) node: String,
    pub(super) event: Event,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Event {
    Typing {
        users: Vec<String>,
    },
    Presence {
        joined: Vec<String>,
        left: Vec<String>,
    },
    /// The sender's users of the room: the `first` part replaces what the
    /// receiver had of the sender, later parts add; `ask` asks every other
    /// node with members in the room to send its own.
    Members {
        users: Vec<String>,
        first: bool,
        ask: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Heartbeat {
    pub(super) node: String,
    pub(super) started_ms: u64,
    pub(super) connections: u64,
}

/// The most bytes one payload may have, given the server's `max_payload`:
/// half the server's limit, so a part's envelope and names never push it
/// over.
pub(super) fn payload_budget(max_payload: usize) -> usize {
    (max_payload / 2).max(1024)
}

/// `items` in consecutive parts of at most `budget` bytes by `size` (at
/// least one item each).
pub(super) fn split<T>(items: &[T], budget: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && bytes + n > budget {
            parts.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < items.len() {
        parts.push(&items[start..]);
    }
    parts
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parts_stay_under_the_budget_and_keep_every_item() {
        let items: Vec<usize> = vec![3, 3, 3, 10, 1, 1];
        let parts = split(&items, 6, |n| *n);
        assert_eq!(parts, vec![&[3, 3][..], &[3][..], &[10][..], &[1, 1][..]]);
        assert!(split(&[] as &[usize], 6, |n| *n).is_empty());
    }
}
