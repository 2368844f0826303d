//! The `typing` request: a notice, coalesced by the hub, with no reply.
//!
//! It must not write anything but a refusal: the hub sends the notice.

use protocol::RequestId;
use tokio::io::{AsyncRead, AsyncWrite};

use super::admission::Membership;
use super::{Flow, Session};
use crate::auth::Access;

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Tells the room the user is typing. It takes no rate-limit token: the
    /// hub sends at most one notice per room and interval.
    pub(super) async fn on_typing(&mut self, id: Option<RequestId>, room: String) -> Flow {
        let admitted = if self.rooms.contains_key(room.as_str())
            && self.identity.principal.may(&room, Access::Write)
        {
            true
        } else {
            // A refusal: cold path.
            let admitting =
                Box::pin(self.admit_room(id, &room, Access::Write, Membership::Joined, None));
            admitting.await?
        };
        if admitted {
            self.state.hub.typing(&room, &self.identity.principal.user);
        }
        Ok(())
    }
}
