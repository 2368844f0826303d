//! Admission of a request that names a room: the one chain every handler
//! runs before it acts, in this order: the room name is valid, the grants
//! allow the access, the session is joined where the request needs it, and
//! a rate-limit token is taken. Each refusal is answered here, after the
//! acks of earlier sends (replies leave in request order).
//!
//! It must not act on a room: it only decides, and answers refusals.

use protocol::{ErrorCode, RequestId, ServerFrame};

use super::{CloseReason, Flow, Session, Transport};
use crate::auth::Access;
use crate::limits::Action;

/// What a request needs of the session's membership in its room.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Membership {
    /// Nothing: the request joins, or reads without joining.
    Any,
    /// The session must be joined to the room.
    Joined,
    /// Joined, unless the grants allow writing only: a write-only grant
    /// cannot join (joining reads), so it publishes without joining
    /// (SECURITY.md, "Tokens").
    JoinedUnlessWriteOnly,
}

/// What a request family needs to be admitted: each handler names its own.
#[derive(Clone, Copy)]
pub(super) struct Needs {
    pub(super) access: Access,
    pub(super) membership: Membership,
    /// The rate limit it takes a token of, if any.
    pub(super) action: Option<Action>,
}

impl<S: Transport> Session<S> {
    /// Runs the admission chain for a request on `room`. Returns false when
    /// it refused (the refusal is answered); persistent rate-limit refusals
    /// end the session with 4101.
    pub(super) async fn admit_room(
        &mut self,
        id: Option<RequestId>,
        room: &str,
        needs: Needs,
    ) -> Result<bool, CloseReason> {
        let Needs {
            access,
            membership,
            action,
        } = needs;
        // A joined room's name was checked when it was joined.
        let joined = self.rooms.contains_key(room);
        if !joined && !self.valid_room(id, room).await? {
            return Ok(false);
        }
        if !self.identity.principal.may(room, access) {
            self.forbidden(id, room).await?;
            return Ok(false);
        }
        let needs_join = match membership {
            Membership::Any => false,
            Membership::Joined => true,
            Membership::JoinedUnlessWriteOnly => self.identity.principal.may(room, Access::Read),
        };
        if needs_join && !joined {
            self.not_joined(id, room).await?;
            return Ok(false);
        }
        match action {
            Some(action) => self.admit(id, action).await,
            None => Ok(true),
        }
    }

    /// Refuses a request outside the session's grants. The answer is the
    /// same whether or not the room exists or has members, so it leaks nothing.
    async fn forbidden(&mut self, id: Option<RequestId>, room: &str) -> Flow {
        self.settle().await?;
        self.send_error(id, ErrorCode::Forbidden, format!("no access to `{room}`"))
            .await
    }

    pub(super) async fn not_joined(&mut self, id: Option<RequestId>, room: &str) -> Flow {
        self.settle().await?;
        self.send_error(id, ErrorCode::NotJoined, format!("not joined to `{room}`"))
            .await
    }

    /// Checks a room name; on failure answers `invalid_room` and returns false.
    async fn valid_room(&mut self, id: Option<RequestId>, room: &str) -> Result<bool, CloseReason> {
        match protocol::names::validate_room(room) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.settle().await?;
                self.send_error(
                    id,
                    ErrorCode::InvalidRoom,
                    format!("invalid room name: {e}"),
                )
                .await?;
                Ok(false)
            }
        }
    }

    /// Takes a rate-limit token for `action`. On refusal answers
    /// `rate_limited` with the wait and returns false; persistent refusals
    /// end the session with 4101.
    async fn admit(&mut self, id: Option<RequestId>, action: Action) -> Result<bool, CloseReason> {
        let state = self.state.clone();
        let wait = match self
            .limits
            .take(action, &self.identity.principal.user, &state.limits)
        {
            Ok(()) => return Ok(true),
            Err(wait) => wait,
        };
        state.metrics.rate_limited.inc();
        self.settle().await?;
        let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        if self.limits.strikes.strike(std::time::Instant::now()) {
            let window = state.config.rate_limit_window_ms;
            self.close_detail = Some(format!("retry_after_ms={window}"));
            return Err(CloseReason::RateLimited);
        }
        self.send_error_frame(ServerFrame::Error {
            id,
            code: ErrorCode::RateLimited,
            message: "too many requests; retry later".into(),
            retry_after_ms: Some(retry_after_ms),
        })
        .await?;
        Ok(false)
    }
}
