//! Why a session ended: one typed reason per connection.
//!
//! The reason decides the close code the client sees and is counted in
//! metrics by name (the nats-server `ClosedState` policy). The gateway (for
//! a handshake that fails after the upgrade) and the session both close
//! through it: [`close_frame`] and [`close_and_linger`] are the one close
//! handshake of a WebSocket. It imports neither, nor metrics.

use std::time::Duration;

use futures_util::StreamExt;
use protocol::close::{self, CloseCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::debug;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CloseReason {
    /// The client closed the connection or the socket went away.
    ClientClosed = 1,
    /// The server is shutting down.
    ServerShutdown,
    /// The outbound queue overflowed or a write timed out.
    SlowConsumer,
    /// An operator kicked the session.
    Kicked,
    /// Nothing arrived in the heartbeat interval after a ping.
    HeartbeatTimeout,
    /// A frame was larger than `max_message_bytes`.
    TooBig,
    /// A text frame was not valid UTF-8.
    InvalidUtf8,
    /// The WebSocket framing was broken.
    ProtocolViolation,
    /// The socket failed.
    TransportError,
    /// The token was refused, was not sent in time, or expired.
    Unauthorized,
    /// The session kept exceeding its rate limits.
    RateLimited,
    /// The user is at its connection limit (found after a first-frame `auth`).
    TooManyConnections,
    /// The node is draining: reconnect at once, to another node.
    Draining,
}

impl CloseReason {
    /// Every reason, for metrics that list them all.
    pub const ALL: [CloseReason; 13] = [
        CloseReason::ClientClosed,
        CloseReason::ServerShutdown,
        CloseReason::SlowConsumer,
        CloseReason::Kicked,
        CloseReason::HeartbeatTimeout,
        CloseReason::TooBig,
        CloseReason::InvalidUtf8,
        CloseReason::ProtocolViolation,
        CloseReason::TransportError,
        CloseReason::Unauthorized,
        CloseReason::RateLimited,
        CloseReason::TooManyConnections,
        CloseReason::Draining,
    ];

    /// The close code to send, or `None` when the socket is already gone.
    pub fn code(self) -> Option<CloseCode> {
        match self {
            CloseReason::ClientClosed | CloseReason::TransportError => None,
            CloseReason::ServerShutdown => Some(close::GOING_AWAY),
            CloseReason::SlowConsumer => Some(close::SLOW_CONSUMER),
            CloseReason::Kicked => Some(close::KICKED),
            CloseReason::HeartbeatTimeout => Some(close::HEARTBEAT_TIMEOUT),
            CloseReason::TooBig => Some(close::TOO_BIG),
            CloseReason::InvalidUtf8 => Some(close::INVALID_UTF8),
            CloseReason::ProtocolViolation => Some(close::PROTOCOL_VIOLATION),
            CloseReason::Unauthorized => Some(close::UNAUTHORIZED),
            CloseReason::RateLimited => Some(close::RATE_LIMITED),
            CloseReason::TooManyConnections => Some(close::TRY_AGAIN_LATER),
            CloseReason::Draining => Some(close::RECONNECT),
        }
    }

    /// A stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ServerShutdown => "server_shutdown",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Kicked => "kicked",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::TooBig => "too_big",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::ProtocolViolation => "protocol_violation",
            CloseReason::TransportError => "transport_error",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::TooManyConnections => "too_many_connections",
            CloseReason::Draining => "draining",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<CloseReason> {
        CloseReason::ALL.iter().copied().find(|r| *r as u8 == v)
    }
}

/// A close frame's payload holds at most 125 bytes, 2 of them the code.
const CLOSE_REASON_MAX: usize = 123;

/// `name: detail`, cut at a character boundary to fit a close frame.
pub fn close_reason_text(name: &str, detail: &str) -> String {
    let mut text = if detail.is_empty() {
        name.to_owned()
    } else {
        format!("{name}: {detail}")
    };
    if text.len() > CLOSE_REASON_MAX {
        let mut cut = CLOSE_REASON_MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The close frame for `code`: its name, then `detail` when not empty.
pub fn close_frame(code: CloseCode, detail: &str) -> CloseFrame {
    CloseFrame {
        code: code.code.into(),
        reason: Utf8Bytes::from(close_reason_text(code.name, detail)),
    }
}

/// Bytes read at a time when discarding input after a close.
const DRAIN_CHUNK: usize = 1024;

/// Writes `frame` (within `write_timeout`), then waits up to `linger` for
/// the peer's close reply, reading off what it still sends, so that the
/// socket ends with FIN rather than a reset that could destroy the close
/// frame in flight.
pub async fn close_and_linger<S>(
    ws: &mut WebSocketStream<S>,
    frame: CloseFrame,
    write_timeout: Duration,
    linger: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(write_timeout, ws.close(Some(frame))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(error = %e, "close frame not written");
            return;
        }
        Err(_) => {
            debug!("close frame not written in time");
            return;
        }
    }
    let lingering = async {
        loop {
            match ws.next().await {
                Some(Ok(msg)) if msg.is_close() => return,
                Some(Ok(_)) => {}
                // The codec stopped (after an oversized or invalid frame, it
                // reads no further): discard the rest raw.
                Some(Err(_)) | None => break,
            }
        }
        let mut buf = vec![0u8; DRAIN_CHUNK];
        let raw = ws.get_mut();
        while matches!(raw.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(linger, lingering).await;
}
