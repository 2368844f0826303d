//! The room membership requests: `join` (with its recovery of missed
//! messages), `leave` and `presence`.
//!
//! It owns the session's side of membership: the room's entry in the
//! session's floors, set from the high-water mark read after the hub
//! registered the session. It must not deliver live traffic: that comes
//! through the outbox, written by the engine.

use protocol::{ErrorCode, RequestId, ServerFrame};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::warn;

use super::admission::{Membership, Needs};
use super::{Flow, Session, Transport};
use crate::auth::Access;
use crate::history::Backend as _;
use crate::history::StoredMessage;
use crate::hub::Member;
use crate::limits::Action;

/// A join needs read access and a join token.
const JOIN: Needs = Needs {
    access: Access::Read,
    membership: Membership::Any,
    action: Some(Action::Join),
};

/// A page of presence needs read access, a join, and a history token.
const PRESENCE: Needs = Needs {
    access: Access::Read,
    membership: Membership::Joined,
    action: Some(Action::History),
};

impl<S: Transport> Session<S> {
    pub(super) async fn on_join(
        &mut self,
        id: Option<RequestId>,
        room: String,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Flow {
        if since.is_some() && epoch.is_none() {
            // Seqs mean nothing outside their epoch: replaying from one
            // without it could hand over another history's messages.
            return self
                .send_error(
                    id,
                    ErrorCode::BadRequest,
                    "`since` needs the `epoch` it was seen with".into(),
                )
                .await;
        }
        if !self.admit_room(id, &room, JOIN).await? {
            return Ok(());
        }
        let state = self.state.clone();
        let already = self.rooms.contains_key(room.as_str());
        if !already && self.rooms.len() >= state.config.max_rooms_per_session {
            let max = state.config.max_rooms_per_session;
            return self
                .send_error(
                    id,
                    ErrorCode::Forbidden,
                    format!("a session may join at most {max} rooms"),
                )
                .await;
        }
        // Register first, then read the high-water mark: every message
        // committed after the read reaches the outbox, every one before is
        // in history.
        let outcome = state.hub.join(
            &room,
            Member {
                session: self.id,
                user: self.identity.principal.user.clone(),
                outbox: self.outbox.clone(),
            },
        );
        // The hub knows the latest seq of a room with members once it has
        // seen a commit or a read for it; otherwise the store is read.
        let read = match outcome.latest {
            Some(seq) => Ok(seq),
            None => state.store.latest_seq(&room).await.inspect(|&seq| {
                state.hub.note_latest(&room, seq);
            }),
        };
        let latest = match read {
            Ok(seq) => seq,
            Err(e) => {
                warn!(session = %self.log_id(), error = %e, "latest seq read failed");
                if !already {
                    state.hub.leave(&room, self.id);
                }
                return self.read_failed(id, &e).await;
            }
        };
        let store_epoch = state.store.epoch().to_owned();
        let (recovered, replay) = match since {
            Some(since) if !already => {
                self.recover(
                    &room,
                    since,
                    latest,
                    epoch.as_deref() == Some(store_epoch.as_str()),
                )
                .await
            }
            _ => (None, Vec::new()),
        };
        if !already {
            // A resumed client has every seq up to `since`. This node may
            // not have heard of the newest of them yet (stored by a node
            // that died before announcing them); when it reads them to fill
            // its gap they must not reach the client again.
            let floor = match (since, recovered) {
                (Some(since), Some(true)) => latest.max(since),
                _ => latest,
            };
            self.rooms.insert(outcome.room.clone(), floor);
        }
        let joined = protocol::JoinedRef::new(
            id,
            &room,
            latest,
            &store_epoch,
            outcome.count,
            &outcome.presence,
            recovered,
        )
        .to_json();
        self.send_text(joined).await?;
        for m in &replay {
            let text = replay_frame(&room, m);
            self.write(Message::Text(Utf8Bytes::from(text)), false)
                .await?;
        }
        if !replay.is_empty() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Answers a `presence` request with one page of the room's users.
    /// Like `history`, it needs read access and takes a `history` token.
    pub(super) async fn on_presence(
        &mut self,
        id: Option<RequestId>,
        room: String,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Flow {
        if !self.admit_room(id, &room, PRESENCE).await? {
            return Ok(());
        }
        let max = self.state.config.presence_page_max;
        let limit = limit.unwrap_or(max).clamp(1, max) as usize;
        let page = self.state.hub.members(&room, after.as_deref(), limit);
        self.send(&ServerFrame::Members {
            id,
            room,
            count: page.count,
            users: page.users,
            more: page.more,
        })
        .await
    }

    /// Decides recovery for a join with `since`: all of (since, latest] or nothing.
    async fn recover(
        &mut self,
        room: &str,
        since: u64,
        latest: u64,
        epoch_matches: bool,
    ) -> (Option<bool>, Vec<StoredMessage>) {
        if !epoch_matches {
            return (Some(false), Vec::new());
        }
        if since >= latest {
            return (Some(true), Vec::new());
        }
        let gap = latest - since;
        if gap > self.state.config.replay_cap {
            return (Some(false), Vec::new());
        }
        let limit = usize::try_from(gap).unwrap_or(usize::MAX);
        match self.state.store.read_after(room, since, limit).await {
            Ok(messages)
                if messages.len() == limit
                    && messages
                        .iter()
                        .zip(since + 1..)
                        .all(|(m, seq)| m.seq == seq) =>
            {
                (Some(true), messages)
            }
            Ok(_) => (Some(false), Vec::new()),
            Err(e) => {
                warn!(session = %self.log_id(), error = %e, "replay read failed");
                (Some(false), Vec::new())
            }
        }
    }

    pub(super) async fn on_leave(&mut self, id: Option<RequestId>, room: String) -> Flow {
        if self.rooms.remove(room.as_str()).is_some() {
            self.state.hub.leave(&room, self.id);
            self.send(&ServerFrame::Left { id, room }).await
        } else {
            self.not_joined(id, &room).await
        }
    }
}

/// Encodes a replayed message. An erased message keeps its seq, with a
/// `null` body, so that the client's seq continuity holds.
fn replay_frame(room: &str, m: &StoredMessage) -> String {
    let null = RawValue::NULL;
    let body = m
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str::<&RawValue>(b).ok())
        .unwrap_or(null);
    let mut frame = protocol::MessageRef::new(room, m.seq, &m.from, m.ts, body);
    frame.replay = true;
    frame.to_json()
}
