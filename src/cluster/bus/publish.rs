//! What this node sends on the bus: the hub's calls in (`Link`, the hub's
//! `Peers`), the node's own commits (the body of the bus's `CommitSink`),
//! and the publisher task that empties the queue they fill.
//!
//! - **Committed messages.** The JetStream store hands the bus the node's
//!   own acked appends. Each room's messages are published on
//!   `subjects::delivery` (split under the server's payload limit) and
//!   handed to the deliverer at once.
//! - **Typing and presence** are published on `subjects::events`,
//!   coalesced per room between two publishes (typers as a set, each
//!   user's last presence change), and so are the member lists a room
//!   task or a peer's ask queues (`Members`, in parts under the payload
//!   limit; the first part replaces what the receiver had of this node).
//! - **Never blocks the hub.** The hub's calls only push to the
//!   deliverer's channel or to the coalesced queue; only the publisher
//!   task waits on NATS.
//!
//! It must not subscribe, order messages or call the hub's fan-out: the
//! deliverer alone hands the hub committed messages.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::shared::{Input, Queue, Shared, lock};
use super::wire::{BusMessage, DeliveryPayload, Event, EventPayload, payload_budget, split};
use crate::cluster::subjects;
use crate::history::Committed;
use crate::hub::Peers;

/// What the hub holds: only queues, so that hub and bus do not keep each
/// other alive.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) deliver: mpsc::UnboundedSender<Input>,
    pub(super) queue: Arc<Queue>,
}

impl Peers for Link {
    fn interest(&self, room: &str, on: bool) {
        let _ = self.deliver.send(Input::Interest {
            room: room.to_owned(),
            on,
        });
    }

    fn typing(&self, room: &str, user: &str) {
        self.queue.with(|o| {
            (o.events.entry(room.to_owned()).or_default())
                .typing
                .insert(user.to_owned());
        });
    }

    fn presence(&self, room: &str, user: &str, joined: bool) {
        self.queue.with(|o| {
            (o.events.entry(room.to_owned()).or_default())
                .presence
                .insert(user.to_owned(), joined);
        });
    }
}

/// This node's acked messages (the bus's `CommitSink::committed`):
/// published to the other nodes and handed to the local reorder stage,
/// per room.
pub(super) fn committed(shared: &Shared, msgs: &[Committed<'_>]) {
    let mut rooms: Vec<(String, Vec<BusMessage>)> = Vec::new();
    for m in msgs {
        let msg = BusMessage {
            seq: m.seq,
            from: m.from.to_owned(),
            ts: m.ts,
            body: m.body.to_owned(),
        };
        match rooms.iter_mut().find(|(r, _)| r == m.room) {
            Some((_, list)) => list.push(msg),
            None => rooms.push((m.room.to_owned(), vec![msg])),
        }
    }
    let rooms: Vec<(String, Arc<[BusMessage]>)> =
        rooms.into_iter().map(|(r, m)| (r, m.into())).collect();
    for (room, msgs) in &rooms {
        let _ = shared.deliver.send(Input::Local {
            room: room.clone(),
            msgs: msgs.clone(),
        });
    }
    shared.queue.with(|o| o.commits.extend(rooms));
}

/// Publishes what the queue holds, whenever it holds something.
pub(super) async fn publisher(shared: Arc<Shared>, token: CancellationToken) {
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = shared.queue.notify.notified() => {}
        }
        let out = std::mem::take(&mut *lock(&shared.queue.outgoing));
        let budget = payload_budget(shared.client.server_info().max_payload);
        for (room, msgs) in out.commits {
            let subject = subjects::delivery(&shared.stream, &room);
            for part in split(&msgs, budget, |m| m.body.get().len() + m.from.len() + 64) {
                let payload = DeliveryPayload {
                    node: shared.node.clone(),
                    msgs: part.to_vec(),
                };
                publish(&shared, &subject, &payload).await;
            }
        }
        for (room, events) in out.events {
            let subject = subjects::events(&shared.stream, &room);
            let typers: Vec<String> = events.typing.into_iter().collect();
            for part in split(&typers, budget, |u| u.len() + 3) {
                let event = Event::Typing {
                    users: part.to_vec(),
                };
                send_event(&shared, &subject, event).await;
            }
            let changes: Vec<(String, bool)> = events.presence.into_iter().collect();
            for part in split(&changes, budget, |(u, _)| u.len() + 3) {
                let (joined, left): (Vec<_>, Vec<_>) = part.iter().partition(|(_, j)| *j);
                let event = Event::Presence {
                    joined: joined.into_iter().map(|(u, _)| u.clone()).collect(),
                    left: left.into_iter().map(|(u, _)| u.clone()).collect(),
                };
                send_event(&shared, &subject, event).await;
            }
        }
        for (room, ask) in out.announce {
            let subject = subjects::events(&shared.stream, &room);
            let users = shared.hub.local_users(&room);
            let mut first = true;
            for part in split(&users, budget, |u| u.len() + 3) {
                let event = Event::Members {
                    users: part.to_vec(),
                    first,
                    ask: ask && first,
                };
                first = false;
                send_event(&shared, &subject, event).await;
            }
            if first {
                let event = Event::Members {
                    users: Vec::new(),
                    first,
                    ask,
                };
                send_event(&shared, &subject, event).await;
            }
        }
    }
}

async fn send_event(shared: &Shared, subject: &str, event: Event) {
    let payload = EventPayload {
        node: shared.node.clone(),
        event,
    };
    publish(shared, subject, &payload).await;
}

pub(super) async fn publish(shared: &Shared, subject: &str, payload: &impl Serialize) {
    let bytes = match serde_json::to_vec(payload) {
        Ok(b) => b,
        Err(error) => {
            tracing::warn!(%error, subject, "cannot encode a bus payload");
            return;
        }
    };
    if let Err(error) = shared
        .client
        .publish(subject.to_owned(), bytes.into())
        .await
    {
        tracing::warn!(%error, subject, "cannot publish on the cluster bus");
    }
}
