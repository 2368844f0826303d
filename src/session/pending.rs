//! The queue of a session's in-flight sends: one [`PendingAck`] per
//! `send` handed to the store, resolved when its commit finishes.
//!
//! The store commits a session's appends in the order they were queued, so
//! acks complete in queue order and only the oldest needs polling. A
//! `VecDeque` allocates nothing until the first send. This module must not
//! write to the socket: the engine and `send.rs` write the acks.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use protocol::RequestId;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::history::{AppendError, Appended};

/// An in-flight `send`, resolved when its commit finishes.
pub(super) struct PendingAck {
    pub(super) id: Option<RequestId>,
    pub(super) room: Arc<str>,
    pub(super) rx: oneshot::Receiver<Result<Appended, AppendError>>,
    /// When the `send` was read off the socket: the start of the ack latency.
    pub(super) received: Instant,
}

/// A resolved send: its request id, room, the store's answer (`None` when
/// the store dropped the reply) and when the send was read.
pub(super) type Resolved = (
    Option<RequestId>,
    Arc<str>,
    Option<Result<Appended, AppendError>>,
    Instant,
);

impl Future for PendingAck {
    type Output = Resolved;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| (self.id, self.room.clone(), r.ok(), self.received))
    }
}

/// Waits for the oldest in-flight send to resolve and takes it.
pub(super) fn oldest_ack(
    pending: &mut VecDeque<PendingAck>,
) -> impl Future<Output = Resolved> + '_ {
    std::future::poll_fn(move |cx| match pending.front_mut() {
        Some(ack) => Pin::new(ack).poll(cx).map(|done| {
            pending.pop_front();
            done
        }),
        None => Poll::Pending,
    })
}
