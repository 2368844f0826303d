//! How a chat message looks in JetStream, and the raw requests the store
//! makes that async-nats has no call for: an atomic batch publish (ADR-50
//! headers on core publishes, the commit as a request) and a batched
//! direct get (one request, many messages, an end-of-batch sentinel).
//!
//! It knows nothing of rooms' state or of retries: one request, one typed
//! outcome.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::cluster::subjects;
use crate::history::StoredMessage;

/// The room seq of a stored message.
pub const SEQ: &str = "Sb-Seq";
/// Its sender, hex-encoded (a header value holds no line breaks).
pub const FROM: &str = "Sb-From";
/// Its server time, ms since the Unix epoch.
pub const TS: &str = "Sb-Ts";
/// The idempotency key's bucket key, when it was sent with one.
pub const KEY: &str = "Sb-Key";
/// JetStream's de-duplication id. Read back only through async-nats's
/// constant: a header parsed off the wire is its standard variant, which a
/// `&str` key (always a custom name) never finds.
const MSG_ID: async_nats::HeaderName = async_nats::header::NATS_MESSAGE_ID;
const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
const BATCH_ID: &str = "Nats-Batch-Id";
const BATCH_SEQ: &str = "Nats-Batch-Sequence";
const BATCH_COMMIT: &str = "Nats-Batch-Commit";
const NUM_PENDING: &str = "Nats-Num-Pending";

/// JetStream's error codes the writer tells apart (nats-server's
/// `errors.json`).
mod code {
    /// Wrong last sequence (with the current one in the text).
    pub const WRONG_LAST: u64 = 10071;
    /// Wrong last sequence, a batch's constant form: another write of the
    /// same subject is in process.
    pub const WRONG_LAST_CONSTANT: u64 = 10164;
    /// A message of the batch has a `Nats-Msg-Id` already stored.
    pub const BATCH_DUPLICATE: u64 = 10201;
}

/// One message of a publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The `Nats-Msg-Id`: unique per append, kept across retries (and
    /// renumberings), so JetStream stores a retried publish once. It is not
    /// derived from the room seq: JetStream checks the id before the
    /// expected last sequence, so an id of room and seq would make another
    /// node's message with that seq look like our own earlier attempt.
    pub msg_id: String,
    pub seq: u64,
    pub from: String,
    pub ts: u64,
    pub key: Option<String>,
    pub body: Bytes,
}

/// What JetStream answered a publish.
#[derive(Debug)]
pub enum Outcome {
    /// Stored (now, or by an earlier attempt JetStream recognised by its
    /// message id); the stream seq of the last message.
    Stored { stream_seq: u64 },
    /// The room's last message is not the one expected: someone else
    /// wrote, or one of ours is in process.
    WrongLast,
    /// A message of the batch is stored already (an earlier attempt of it).
    Duplicate,
    /// Refused for a reason that a later attempt may not meet (no stream,
    /// too many batches in flight, an incomplete batch): nothing stored.
    Refused(String),
    /// No answer in time, or the connection failed after the publish left:
    /// it may or may not be stored.
    Unknown(String),
    /// The publish never left: nothing stored.
    NotSent(String),
}

#[derive(Deserialize)]
struct PubAckReply {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

fn headers(m: &Outgoing) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(MSG_ID, m.msg_id.as_str());
    h.insert(SEQ, m.seq.to_string().as_str());
    h.insert(FROM, subjects::room_token(&m.from).as_str());
    h.insert(TS, m.ts.to_string().as_str());
    if let Some(k) = &m.key {
        h.insert(KEY, k.as_str());
    }
    h
}

/// Publishes `msgs` (all to `subject`, the first expecting the subject's
/// last stream seq to be `expected_last`) as one atomic unit: a plain
/// publish for one message, an atomic batch for more. `batch_id` names the
/// batch (at most 64 characters).
pub async fn publish(
    client: &async_nats::Client,
    subject: &str,
    msgs: &[Outgoing],
    expected_last: u64,
    batch_id: &str,
    timeout: Duration,
) -> Outcome {
    let Some((last, rest)) = msgs.split_last() else {
        return Outcome::Refused("empty publish".to_owned());
    };
    let batch = !rest.is_empty();
    for (i, m) in rest.iter().enumerate() {
        let mut h = headers(m);
        if i == 0 {
            h.insert(
                EXPECTED_LAST_SUBJECT_SEQ,
                expected_last.to_string().as_str(),
            );
        }
        h.insert(BATCH_ID, batch_id);
        h.insert(BATCH_SEQ, (i + 1).to_string().as_str());
        if let Err(e) = client
            .publish_with_headers(subject.to_owned(), h, m.body.clone())
            .await
        {
            // Earlier messages of the batch may sit staged on the server;
            // without a commit they are never stored.
            return Outcome::NotSent(e.to_string());
        }
    }
    let mut h = headers(last);
    if batch {
        h.insert(BATCH_ID, batch_id);
        h.insert(BATCH_SEQ, msgs.len().to_string().as_str());
        h.insert(BATCH_COMMIT, "1");
    } else {
        h.insert(
            EXPECTED_LAST_SUBJECT_SEQ,
            expected_last.to_string().as_str(),
        );
    }
    let request = client.request_with_headers(subject.to_owned(), h, last.body.clone());
    let reply = match tokio::time::timeout(timeout, request).await {
        Err(_) => return Outcome::Unknown("no publish ack in time".to_owned()),
        Ok(Err(e)) => {
            return match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    Outcome::Refused("no stream answers the subject".to_owned())
                }
                _ => Outcome::Unknown(e.to_string()),
            };
        }
        Ok(Ok(reply)) => reply,
    };
    let ack: PubAckReply = match serde_json::from_slice(&reply.payload) {
        Ok(a) => a,
        Err(e) => return Outcome::Unknown(format!("unreadable publish ack: {e}")),
    };
    match ack.error {
        None => Outcome::Stored {
            stream_seq: ack.seq,
        },
        Some(e) => match e.err_code {
            code::WRONG_LAST | code::WRONG_LAST_CONSTANT => Outcome::WrongLast,
            code::BATCH_DUPLICATE => Outcome::Duplicate,
            _ => Outcome::Refused(format!("{} ({})", e.description, e.err_code)),
        },
    }
}

/// Why a read from the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("direct get failed")]
    Direct(#[source] async_nats::jetstream::stream::DirectGetError),
    #[error("cannot subscribe to the reply inbox")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error("cannot send the request")]
    Publish(#[source] async_nats::PublishError),
    #[error("no answer in time")]
    TimedOut,
    #[error("JetStream answered {0}")]
    Status(String),
    #[error("a stored message lacks its headers")]
    Malformed(#[source] async_nats::jetstream::message::StreamMessageError),
    #[error("the stored message at stream seq {0} is not a chat message")]
    Foreign(u64),
}

/// A message read back, with where it is in the stream.
#[derive(Debug, Clone)]
pub struct Found {
    pub stream_seq: u64,
    pub msg_id: Option<String>,
    pub message: StoredMessage,
}

fn header_u64(m: &StreamMessage, name: &str) -> Option<u64> {
    m.headers.get(name)?.as_str().parse().ok()
}

/// Decodes a stored chat message.
pub fn decode(m: StreamMessage) -> Result<Found, GetError> {
    let (Some(seq), Some(ts)) = (header_u64(&m, SEQ), header_u64(&m, TS)) else {
        return Err(GetError::Foreign(m.sequence));
    };
    let from = m
        .headers
        .get(FROM)
        .and_then(|v| subjects::room_from_token(v.as_str()))
        .ok_or(GetError::Foreign(m.sequence))?;
    let body = String::from_utf8(m.payload.to_vec()).map_err(|_| GetError::Foreign(m.sequence))?;
    Ok(Found {
        stream_seq: m.sequence,
        msg_id: m.headers.get(MSG_ID).map(|v| v.as_str().to_owned()),
        message: StoredMessage {
            seq,
            from,
            ts,
            body: Some(body),
        },
    })
}

/// `Ok(None)` for JetStream's "no message".
pub fn found(
    r: Result<StreamMessage, async_nats::jetstream::stream::DirectGetError>,
) -> Result<Option<StreamMessage>, GetError> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    match r {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(GetError::Direct(e)),
    }
}

#[derive(serde::Serialize)]
struct BatchGet<'a> {
    seq: u64,
    next_by_subj: &'a str,
    batch: usize,
}

/// Up to `batch` messages whose subject matches `filter`, from stream seq
/// `from` on, in stream order, in one request (nats-server ≥ 2.11). The
/// server may stop early (its byte limit): fewer messages than asked with
/// more pending is not the end; callers continue after the last one.
/// Returns the messages and whether more match after them.
pub async fn get_batch(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
    from: u64,
    batch: usize,
    timeout: Duration,
) -> Result<(Vec<StreamMessage>, bool), GetError> {
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(GetError::Subscribe)?;
    let request = BatchGet {
        seq: from.max(1),
        next_by_subj: filter,
        batch: batch.max(1),
    };
    let payload = serde_json::to_vec(&request).map_err(|e| GetError::Status(e.to_string()))?;
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{stream}"),
            inbox,
            Bytes::from(payload),
        )
        .await
        .map_err(GetError::Publish)?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, sub.next()).await;
        let Ok(Some(msg)) = next else {
            return Err(GetError::TimedOut);
        };
        match msg.status {
            None => out.push(StreamMessage::try_from(msg).map_err(GetError::Malformed)?),
            Some(s) if s == async_nats::StatusCode::NOT_FOUND => return Ok((out, false)),
            Some(s) if s.as_u16() == 204 => {
                let pending = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(NUM_PENDING))
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .unwrap_or(0);
                return Ok((out, pending > 0));
            }
            Some(s) => {
                return Err(GetError::Status(format!(
                    "{s} {}",
                    msg.description.unwrap_or_default()
                )));
            }
        }
    }
}
