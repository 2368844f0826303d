//! Decoding a client's text frame and routing the request to its handler.
//!
//! It owns the order of replies: every request but a `send` waits for the
//! acks of the sends before it. It must not handle a request itself beyond
//! the one-line answers (`ping`, a second `auth`).

use protocol::{ClientRequest, ErrorCode, ServerFrame};

use super::{Flow, Session, Transport};

impl<S: Transport> Session<S> {
    pub(super) async fn on_request(&mut self, text: &str) -> Flow {
        let request = match protocol::decode_request(text, self.state.config.max_body_depth) {
            Ok(r) => r,
            Err(e) => {
                self.settle().await?;
                return self.send_error(e.id, e.code, e.message).await;
            }
        };
        // Replies leave in request order: every request but a `send` (whose
        // ack follows its commit, in order with the others) waits until the
        // acks of the sends before it are written, so a read after a send
        // sees it. A `typing` has no reply; its refusals settle first.
        if !matches!(
            request.body,
            ClientRequest::Send { .. } | ClientRequest::Typing { .. }
        ) {
            self.settle().await?;
        }
        let id = request.id;
        match request.body {
            // Joins, leaves, history and presence reads and refreshes: cold
            // paths.
            ClientRequest::Join { room, since, epoch } => {
                let joining = Box::pin(self.on_join(id, room, since, epoch));
                joining.await
            }
            ClientRequest::Leave { room } => {
                let leaving = Box::pin(self.on_leave(id, room));
                leaving.await
            }
            // Boxed too, though not rare: a send's state (the store queue's
            // permit, the append) is the largest of the request paths, and
            // one small allocation per message read is cheaper than holding
            // it in every idle session.
            ClientRequest::Send { room, body, key } => {
                let sending = Box::pin(self.on_send(id, room, body.0, key));
                sending.await
            }
            ClientRequest::History {
                room,
                before,
                after,
                limit,
            } => {
                let reading = Box::pin(self.on_history(id, room, before, after, limit));
                reading.await
            }
            ClientRequest::Typing { room } => self.on_typing(id, room).await,
            ClientRequest::Presence { room, after, limit } => {
                let paging = Box::pin(self.on_presence(id, room, after, limit));
                paging.await
            }
            ClientRequest::Ping => self.send(&ServerFrame::Pong { id }).await,
            ClientRequest::Auth { .. } => {
                self.send_error(
                    id,
                    ErrorCode::BadRequest,
                    "the session is already authenticated; use `refresh` to replace its token"
                        .into(),
                )
                .await
            }
            ClientRequest::Refresh { token } => {
                let refreshing = Box::pin(self.on_refresh(id, token.expose()));
                refreshing.await
            }
        }
    }
}
