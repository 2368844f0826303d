//! The names the cluster uses in NATS, all under the configured stream
//! name, so two clusters can share one NATS by choosing two names.
//!
//! A room name becomes one subject token by hex encoding: room names may
//! hold `.`, `*` or `>`, which NATS reads as separators and wildcards.

use std::fmt::Write;

/// A room name as one subject token (lowercase hex of its bytes).
pub fn room_token(room: &str) -> String {
    let mut out = String::with_capacity(room.len() * 2);
    for b in room.as_bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The room name a token encodes, if it is one.
pub fn room_from_token(token: &str) -> Option<String> {
    if token.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The stream's subjects: `<stream>.m.>`, which takes in each room's
/// messages and its erasure tombstones (`<stream>.m.<token>.e`, named by
/// the cluster store).
pub fn messages_wildcard(stream: &str) -> String {
    format!("{stream}.m.>")
}

/// The subject a room's messages are stored under (in the stream).
pub fn messages(stream: &str, room: &str) -> String {
    format!("{stream}.m.{}", room_token(room))
}

/// The core NATS subject on which a node announces a room's committed
/// messages to the nodes that have members in it (not stored).
pub fn delivery(stream: &str, room: &str) -> String {
    format!("{stream}.d.{}", room_token(room))
}

/// The core NATS subject of a room's ephemeral events (typing, presence).
pub fn events(stream: &str, room: &str) -> String {
    format!("{stream}.e.{}", room_token(room))
}

/// The subject of a node's heartbeats.
pub fn node(stream: &str, node_id: &str) -> String {
    format!("{stream}.node.{node_id}")
}

/// Every node's heartbeats.
pub fn nodes_wildcard(stream: &str) -> String {
    format!("{stream}.node.*")
}

/// The control plane's subject (`cluster::control`): admin requests
/// (list sessions or rooms, kick a user or a session) that every node
/// answers. Its one caller passes `"all"`, so every node subscribes to and
/// asks on `<stream>.ctl.all`; no request is addressed to a single node.
pub fn control(stream: &str, node_id: &str) -> String {
    format!("{stream}.ctl.{node_id}")
}

/// The KV bucket of idempotency keys.
pub fn keys_bucket(stream: &str) -> String {
    format!("{stream}_KEYS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_tokens_round_trip_and_hide_separators() {
        for room in ["general", "a.b", "x*y>z", "ünï"] {
            let t = room_token(room);
            assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
            assert_eq!(room_from_token(&t).as_deref(), Some(room));
        }
        assert_eq!(room_from_token("zz"), None);
        assert_eq!(room_from_token("abc"), None);
    }
}
