//! The `send` request and its ack: the append handed to the store, and the
//! `ack` (or `error`) written when its commit finishes.
//!
//! It must not write the ack before the commit: the ack says the message
//! is durable. In-flight sends wait in `pending.rs`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use protocol::{ErrorCode, RequestId, ServerFrame};
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tracing::warn;

use super::admission::{Membership, Needs};
use super::pending::PendingAck;
use super::{Flow, Session, Transport};
use crate::auth::Access;
use crate::history::Backend as _;
use crate::history::{Append, AppendError};
use crate::limits::{Action, AppendLimit, check_append};

/// A send needs write access, a join unless the grant is write-only, and
/// a send token.
const SEND: Needs = Needs {
    access: Access::Write,
    membership: Membership::JoinedUnlessWriteOnly,
    action: Some(Action::Send),
};

impl<S: Transport> Session<S> {
    pub(super) async fn on_send(
        &mut self,
        id: Option<RequestId>,
        room: String,
        body: Box<RawValue>,
        key: Option<String>,
    ) -> Flow {
        if !self.admit_room(id, &room, SEND).await? {
            return Ok(());
        }
        let room_key = match self.rooms.get_key_value(room.as_str()) {
            Some((key, _)) => key.clone(),
            None => Arc::from(room.as_str()),
        };
        // The decoder measured the body's depth in its one pass (and
        // refused a deep body with its own message), so only the key is
        // checked here; each limit still answers with its own words.
        if let Err(limit) = check_append(&self.state.config, key.as_deref(), None) {
            let message = match limit {
                AppendLimit::KeyTooLong { max } => format!("`key` is longer than {max} bytes"),
                AppendLimit::TooDeep { max } => format!("body is nested deeper than {max} levels"),
            };
            self.settle().await?;
            return self.send_error(id, ErrorCode::TooLarge, message).await;
        }
        let (reply, rx) = oneshot::channel();
        let append = Append {
            room: room_key.clone(),
            from: self.identity.principal.user.clone(),
            body,
            key,
            reply,
        };
        if self.state.store.append(append).await.is_err() {
            self.settle().await?;
            return self
                .send_error(id, ErrorCode::Internal, "the store is closed".into())
                .await;
        }
        self.state.metrics.messages_received.inc();
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        self.pending.push_back(PendingAck {
            id,
            room: room_key,
            rx,
            // The main loop stamps this when it reads a frame: this `send`.
            received: self.last_seen,
        });
        Ok(())
    }

    /// Writes the ack (or error) of one resolved send. A write refused by a
    /// kill takes nothing into the codec, so the send goes back to the
    /// front of `pending`, for the engine to write before the close frame.
    pub(super) async fn on_ack(&mut self, done: <PendingAck as Future>::Output) -> Flow {
        let (id, room, result, received) = done;
        let flow = match &result {
            Some(Ok(a)) => {
                let flow = self
                    .send(&ServerFrame::Ack {
                        id,
                        room: room.to_string(),
                        seq: a.seq,
                        ts: a.ts,
                        duplicate: a.duplicate,
                    })
                    .await;
                self.state
                    .metrics
                    .ack_latency
                    .observe_duration(received.elapsed());
                flow
            }
            Some(Err(AppendError::Unavailable { retry_after })) => {
                self.send_error_frame(ServerFrame::Error {
                    id,
                    code: ErrorCode::Unavailable,
                    message: "the message was not stored: the server cannot store messages now; resend with the same key".into(),
                    retry_after_ms: Some(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX).max(1)),
                })
                .await
            }
            Some(Err(e)) => {
                warn!(session = %self.log_id(), error = %e, "append failed");
                self.send_error(
                    id,
                    ErrorCode::Internal,
                    "the message was not stored; retry with the same key".into(),
                )
                .await
            }
            None => {
                self.send_error(
                    id,
                    ErrorCode::Internal,
                    "the store stopped; retry with the same key".into(),
                )
                .await
            }
        };
        if flow.is_err() {
            let (reply, rx) = oneshot::channel();
            if let Some(result) = result {
                let _ = reply.send(result);
            }
            self.pending.push_front(PendingAck {
                id,
                room,
                rx,
                received,
            });
        }
        flow
    }
}
