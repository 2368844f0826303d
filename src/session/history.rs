//! The `history` request: one page of a room's stored messages.
//!
//! It reads the store only through `state.store.history` and must not
//! touch the session's rooms or floors: history is not delivery.

use protocol::{Body, HistoryMessage, RequestId, ServerFrame};
use tracing::warn;

use super::admission::{Membership, Needs};
use super::{Flow, Session, Transport};
use crate::auth::Access;
use crate::history::Backend as _;
use crate::limits::Action;

/// A page of history needs read access, not a join, and a history token.
const HISTORY: Needs = Needs {
    access: Access::Read,
    membership: Membership::Any,
    action: Some(Action::History),
};

impl<S: Transport> Session<S> {
    pub(super) async fn on_history(
        &mut self,
        id: Option<RequestId>,
        room: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Flow {
        if !self.admit_room(id, &room, HISTORY).await? {
            return Ok(());
        }
        let config = &self.state.config;
        let limit = limit
            .unwrap_or(config.history_default_limit)
            .min(config.history_max_limit) as usize;
        let page = match self.state.store.history(&room, before, after, limit).await {
            Ok(page) => page,
            Err(e) => {
                warn!(session = %self.log_id(), error = %e, "history read failed");
                return self.read_failed(id, &e).await;
            }
        };
        let messages = page
            .messages
            .into_iter()
            .map(|m| {
                let body = m.body.as_deref().and_then(|b| Body::from_json(b).ok());
                HistoryMessage {
                    seq: m.seq,
                    from: m.from,
                    ts: m.ts,
                    erased: body.is_none(),
                    body,
                }
            })
            .collect();
        self.send(&ServerFrame::History {
            id,
            room,
            messages,
            more: page.more,
        })
        .await
    }
}
