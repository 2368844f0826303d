//! The `refresh` request: a new token for the same user, replacing the
//! session's grants and restarting the expiry timer (`token.rs`).
//!
//! It must not keep a room the new grants cannot read: those are left.

use std::sync::Arc;

use protocol::{ErrorCode, RequestId, ServerFrame};

use super::{Flow, Session, Transport};
use crate::auth::{Access, AuthError};

impl<S: Transport> Session<S> {
    /// Replaces the session's token. The new one must name the same user.
    /// Rooms the new grants no longer let it read are left.
    pub(super) async fn on_refresh(&mut self, id: Option<RequestId>, token: &str) -> Flow {
        let state = self.state.clone();
        let Some(verifier) = &state.verifier else {
            return self
                .send_error(
                    id,
                    ErrorCode::BadRequest,
                    "this server runs without tokens (dev mode)".into(),
                )
                .await;
        };
        let principal = verifier.verify(token).and_then(|p| {
            if p.user == self.identity.principal.user {
                Ok(p)
            } else {
                Err(AuthError::OtherUser)
            }
        });
        let principal = match principal {
            Ok(p) => p,
            Err(e) => {
                state.metrics.auth_failed(e.label());
                return self
                    .send_error(id, ErrorCode::Unauthorized, e.to_string())
                    .await;
            }
        };
        let expires_at = principal.expires_at.unwrap_or(0);
        self.identity.principal = principal;
        self.expiry_warned = false;
        self.token_changed = true;
        let lost: Vec<Arc<str>> = self
            .rooms
            .keys()
            .filter(|r| !self.identity.principal.may(r, Access::Read))
            .cloned()
            .collect();
        for room in lost {
            self.rooms.remove(&room);
            state.hub.leave(&room, self.id);
            self.send(&ServerFrame::Left {
                id: None,
                room: room.to_string(),
            })
            .await?;
        }
        self.send(&ServerFrame::Refreshed { id, expires_at }).await
    }
}
