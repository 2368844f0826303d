//! The `typing` request: a notice, coalesced by the hub, with no reply.
//!
//! It must not write anything but a refusal: the hub sends the notice.

use protocol::RequestId;

use super::admission::{Membership, Needs};
use super::{Flow, Session, Transport};
use crate::auth::Access;

/// A typing notice needs write access and a join; the hub coalesces
/// notices, so it takes no rate token.
const TYPING: Needs = Needs {
    access: Access::Write,
    membership: Membership::Joined,
    action: None,
};

impl<S: Transport> Session<S> {
    /// Tells the room the user is typing. It takes no rate-limit token: the
    /// hub sends at most one notice per room and interval.
    pub(super) async fn on_typing(&mut self, id: Option<RequestId>, room: String) -> Flow {
        let admitted = if self.rooms.contains_key(room.as_str())
            && self.identity.principal.may(&room, Access::Write)
        {
            true
        } else {
            // A refusal: cold path.
            let admitting = Box::pin(self.admit_room(id, &room, TYPING));
            admitting.await?
        };
        if admitted {
            self.state.hub.typing(&room, &self.identity.principal.user);
        }
        Ok(())
    }
}
