//! Wire types of the Switchboard protocol, version 1.
//!
//! This crate is the one home of everything that crosses the socket: client
//! requests ([`ClientRequest`]), server frames ([`ServerFrame`]), error codes
//! ([`ErrorCode`]), close codes ([`close`]) and the naming rules for rooms and
//! users ([`names`]). `PROTOCOL.md` beside this crate is the specification;
//! its examples are this crate's test data, so the two cannot drift.
//!
//! It depends on serde and serde_json only. It must not know about sockets,
//! runtimes or storage: store records are separate types in the server.

pub mod close;
mod decode;
pub mod names;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use decode::{DecodeError, decode_request, nesting_depth};

/// Protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// A client-chosen request id. Every reply to a request echoes it.
pub type RequestId = u64;

/// A JSON value carried verbatim: message bodies are never re-encoded.
///
/// Serialises as the raw JSON text. Deserialises from any JSON value, also
/// inside internally tagged enums (where serde buffers content and a bare
/// `RawValue` cannot be used).
#[derive(Debug, Clone)]
pub struct Body(pub Box<RawValue>);

impl Body {
    /// Wraps JSON text, checking that it is one valid JSON value.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text.to_owned()).map(Body)
    }

    /// The JSON text of the body.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        serde_json::value::to_raw_value(&value)
            .map(Body)
            .map_err(serde::de::Error::custom)
    }
}

/// One client frame: an optional request id and the request itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    #[serde(flatten)]
    pub body: ClientRequest,
}

/// Everything a client may ask of the server.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientRequest {
    /// Join a room; with `since`, replay every message after it first.
    Join {
        room: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// The epoch the client saw with `since`; a different epoch means the
        /// history was recreated and nothing can be recovered.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    /// Leave a room.
    Leave { room: String },
    /// Publish a durable message to a room.
    Send {
        room: String,
        body: Body,
        /// Idempotency key: the same user, room and key store one message.
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// Page a room's history.
    History {
        room: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// An ephemeral typing notice for the other members of a room.
    Typing { room: String },
    /// Page the users present in a joined room, sorted by name: those after
    /// `after` (a user name), at most `limit` of them.
    Presence {
        room: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Application-level ping, for browsers which cannot send WebSocket pings.
    Ping,
    /// Authenticates the session: the first frame after the upgrade, when no
    /// token came with it (header or URL). Valid only then.
    Auth { token: Token },
    /// Replaces the token of a live session; the subject must stay the same.
    Refresh { token: Token },
}

/// A bearer token as it travels in `auth` and `refresh`. Its `Debug` output
/// is redacted, so logging a request never prints a credential.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Token(pub String);

impl Token {
    /// The token text. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([redacted])")
    }
}

impl ClientRequest {
    /// The wire name of this request's `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientRequest::Join { .. } => "join",
            ClientRequest::Leave { .. } => "leave",
            ClientRequest::Send { .. } => "send",
            ClientRequest::History { .. } => "history",
            ClientRequest::Typing { .. } => "typing",
            ClientRequest::Presence { .. } => "presence",
            ClientRequest::Ping => "ping",
            ClientRequest::Auth { .. } => "auth",
            ClientRequest::Refresh { .. } => "refresh",
        }
    }
}

/// One stored message as it appears in `history` replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryMessage {
    pub seq: u64,
    pub from: String,
    pub ts: u64,
    /// `None` when the message was erased; its seq stays in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub erased: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Everything the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The first frame of every session.
    Welcome {
        session: String,
        user: String,
        heartbeat_ms: u64,
        server: String,
        protocol: u32,
    },
    /// Reply to `join`.
    Joined {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        room: String,
        /// The latest seq of the room when the join took effect.
        seq: u64,
        epoch: String,
        /// How many distinct users are in the room, the joiner included.
        count: u64,
        /// The first of them by name, sorted: all of them when `count` is
        /// at most the server's list bound, else a prefix to page on with
        /// a `presence` request.
        presence: Vec<String>,
        /// Present when the join carried `since`: whether every missed
        /// message follows as a replay.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// Reply to `leave`.
    Left {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        room: String,
    },
    /// Reply to `send` once the message is durable.
    Ack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        room: String,
        seq: u64,
        ts: u64,
        /// True when an idempotency key matched an earlier message.
        #[serde(default, skip_serializing_if = "is_false")]
        duplicate: bool,
    },
    /// A durable message in a room, live or replayed.
    Message {
        room: String,
        seq: u64,
        from: String,
        ts: u64,
        body: Body,
        #[serde(default, skip_serializing_if = "is_false")]
        replay: bool,
    },
    /// Reply to `history`, oldest first.
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        room: String,
        messages: Vec<HistoryMessage>,
        /// Whether more messages exist beyond this page in the paging direction.
        more: bool,
    },
    /// Users in the room typed during the last typing interval: `count`
    /// of them, the first few by name in `users`. Never stored, no seq.
    Typing {
        room: String,
        count: u64,
        users: Vec<String>,
    },
    /// Users came or went since the last presence event. A user with
    /// several sessions is one member. `count` is the room's number of
    /// users when the event was made.
    Presence {
        room: String,
        count: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        joined: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        left: Vec<String>,
        /// True when more users came or went than the lists name.
        #[serde(default, skip_serializing_if = "is_false")]
        truncated: bool,
    },
    /// Reply to `presence`: one page of the room's users, sorted by name.
    Members {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        room: String,
        /// How many distinct users are in the room.
        count: u64,
        users: Vec<String>,
        /// Whether users after the last of this page exist.
        more: bool,
    },
    /// The session's token expires at `expires_at` (Unix seconds): send
    /// `refresh` before then, or the session closes with 4001.
    TokenExpiring { expires_at: u64 },
    /// Reply to `refresh`: the new token is in force until `expires_at`
    /// (Unix seconds).
    Refreshed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        expires_at: u64,
    },
    /// Reply to `ping`.
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    /// A request failed. Unless a close follows, the session stays usable.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// The `code` of an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON, or a field is missing or has the wrong type.
    BadRequest,
    /// The `type` is not one this server knows.
    UnknownType,
    /// The request names a room the session has not joined.
    NotJoined,
    /// The room name breaks the naming rules.
    InvalidRoom,
    /// A token was refused (a `refresh` with a bad, expired or other user's token).
    Unauthorized,
    /// The session may not do this.
    Forbidden,
    /// A field is longer than its limit.
    TooLarge,
    /// Too many requests; retry after `retry_after_ms`.
    RateLimited,
    /// A binary frame arrived; the protocol is JSON text frames.
    BinaryUnsupported,
    /// The server failed; the request may be retried.
    Internal,
    /// The server cannot store messages now (its disk is full or failing);
    /// nothing was stored: resend after `retry_after_ms` with the same key.
    Unavailable,
}

impl ErrorCode {
    /// Every error code, in the order of the spec's table.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::NotJoined,
        ErrorCode::InvalidRoom,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::BinaryUnsupported,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
    ];

    /// The wire name of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BinaryUnsupported => "binary_unsupported",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

impl ServerFrame {
    /// Encodes the frame as JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: every map key is a string and
        // every `Body` is already valid JSON.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// Decodes a server frame (for clients).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// A borrowed `message` frame, for encoding on the hot path without copying
/// the room, sender or body. Encodes exactly like [`ServerFrame::Message`].
#[derive(Debug, Serialize)]
pub struct MessageRef<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    pub room: &'a str,
    pub seq: u64,
    pub from: &'a str,
    pub ts: u64,
    pub body: &'a RawValue,
    #[serde(skip_serializing_if = "is_false")]
    pub replay: bool,
}

impl<'a> MessageRef<'a> {
    pub fn new(room: &'a str, seq: u64, from: &'a str, ts: u64, body: &'a RawValue) -> Self {
        MessageRef {
            kind: "message",
            room,
            seq,
            from,
            ts,
            body,
            replay: false,
        }
    }

    /// Encodes the frame as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// A borrowed `joined` frame whose `presence` list is already encoded, so
/// that a join into a large room costs no allocation per listed user.
/// Encodes exactly like [`ServerFrame::Joined`].
#[derive(Debug, Serialize)]
pub struct JoinedRef<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    pub room: &'a str,
    pub seq: u64,
    pub epoch: &'a str,
    pub count: u64,
    /// A JSON array of strings.
    pub presence: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

impl<'a> JoinedRef<'a> {
    pub fn new(
        id: Option<RequestId>,
        room: &'a str,
        seq: u64,
        epoch: &'a str,
        count: u64,
        presence: &'a RawValue,
        recovered: Option<bool>,
    ) -> Self {
        JoinedRef {
            kind: "joined",
            id,
            room,
            seq,
            epoch,
            count,
            presence,
            recovered,
        }
    }

    /// Encodes the frame as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

impl Request {
    /// Encodes the request as JSON text (for clients).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ref_encodes_like_the_enum() {
        let body = Body::from_json(r#"{"text":"hi"}"#).unwrap_or_else(|e| panic!("{e}"));
        let owned = ServerFrame::Message {
            room: "general".into(),
            seq: 9,
            from: "alice".into(),
            ts: 1_700_000_000_000,
            body: body.clone(),
            replay: true,
        };
        let mut borrowed = MessageRef::new("general", 9, "alice", 1_700_000_000_000, &body.0);
        borrowed.replay = true;
        assert_eq!(owned.to_json(), borrowed.to_json());
        borrowed.replay = false;
        assert!(!borrowed.to_json().contains("replay"));
    }

    #[test]
    fn joined_ref_encodes_like_joined() {
        let presence =
            serde_json::value::to_raw_value(&["alice", "b\"ob"]).unwrap_or_else(|e| panic!("{e}"));
        for (id, recovered) in [(Some(3), Some(true)), (None, None)] {
            let owned = ServerFrame::Joined {
                id,
                room: "general".into(),
                seq: 41,
                epoch: "5f3a".into(),
                count: 7,
                presence: vec!["alice".into(), "b\"ob".into()],
                recovered,
            };
            let borrowed = JoinedRef::new(id, "general", 41, "5f3a", 7, &presence, recovered);
            assert_eq!(owned.to_json(), borrowed.to_json());
        }
    }

    #[test]
    fn request_round_trips_through_decode() {
        let req = Request {
            id: Some(5),
            body: ClientRequest::Send {
                room: "r".into(),
                body: Body::from_json("[1,2]").unwrap_or_else(|e| panic!("{e}")),
                key: Some("k".into()),
            },
        };
        assert_eq!(decode_request(&req.to_json(), 32), Ok(req));
        let ping = Request {
            id: None,
            body: ClientRequest::Ping,
        };
        assert_eq!(ping.to_json(), r#"{"type":"ping"}"#);
    }
}
