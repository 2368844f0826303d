//! A room's subscriptions: one task per room while the hub has local
//! members in it (fan-out by interest: NATS routes a room's traffic only
//! to the nodes with members in it), on the room's delivery and events
//! subjects.
//!
//! - Other nodes' deliveries go to the deliverer, tagged with the task's
//!   round; the node's own are dropped (the deliverer had them locally).
//! - Other nodes' typing, presence and member lists go to the hub's
//!   `remote_*` methods, unless the node is found gone. When its
//!   subscriptions begin, the task queues the node's users of the room and
//!   an ask for the others'; each node with members answers with its own.
//!   The echo of its own ask tells the task its subscriptions are live
//!   (or `cluster.request_timeout_ms` passes): the room is then counted
//!   as subscribed and the deliverer told it is ready.
//!
//! It must not publish (it queues for the publisher) nor hand messages to
//! the hub.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::shared::{Input, Shared, lock};
use super::wire::{DeliveryPayload, Event, EventPayload};
use crate::cluster::subjects;

/// One room's subscriptions, while the hub has local members in it.
pub(super) async fn room_task(
    shared: Arc<Shared>,
    room: String,
    round: u64,
    token: CancellationToken,
) {
    let client = &shared.client;
    let (deliveries, events) = match (
        client
            .subscribe(subjects::delivery(&shared.stream, &room))
            .await,
        client
            .subscribe(subjects::events(&shared.stream, &room))
            .await,
    ) {
        (Ok(d), Ok(e)) => (d, e),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, room, "cannot subscribe to a room on the cluster bus");
            return;
        }
    };
    let (mut deliveries, mut events) = (deliveries.fuse(), events.fuse());
    // Our users, and a request for everyone else's; its echo says the
    // subscriptions are live.
    shared.queue.with(|o| {
        o.announce.insert(room.clone(), true);
    });
    let mut ready = false;
    let ready_by = tokio::time::sleep(shared.timing.limits.request_timeout);
    tokio::pin!(ready_by);
    let mark_ready = |ready: &mut bool| {
        if !*ready {
            *ready = true;
            lock(&shared.subscribed).insert(room.clone(), round);
            let _ = shared.deliver.send(Input::Ready {
                room: room.clone(),
                round,
            });
        }
    };
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            () = &mut ready_by, if !ready => mark_ready(&mut ready),
            msg = deliveries.next() => {
                let Some(msg) = msg else { break };
                match serde_json::from_slice::<DeliveryPayload>(&msg.payload) {
                    Ok(p) if p.node == shared.node => {}
                    Ok(p) => {
                        shared.counters.deliveries_received.fetch_add(1, Ordering::Relaxed);
                        let _ = shared.deliver.send(Input::Remote { room: room.clone(), round, msgs: p.msgs });
                    }
                    Err(error) => tracing::warn!(%error, room, "undecodable delivery on the cluster bus"),
                }
            }
            msg = events.next() => {
                let Some(msg) = msg else { break };
                match serde_json::from_slice::<EventPayload>(&msg.payload) {
                    Ok(p) if p.node == shared.node => {
                        if matches!(p.event, Event::Members { ask: true, .. }) {
                            mark_ready(&mut ready);
                        }
                    }
                    Ok(p) => {
                        shared.counters.events_received.fetch_add(1, Ordering::Relaxed);
                        apply(&shared, &room, &p.node, p.event);
                    }
                    Err(error) => tracing::warn!(%error, room, "undecodable event on the cluster bus"),
                }
            }
        }
    }
    let mut subscribed = lock(&shared.subscribed);
    if subscribed.get(&room) == Some(&round) {
        subscribed.remove(&room);
    }
}

/// Applies another node's event to the hub.
fn apply(shared: &Shared, room: &str, node: &str, event: Event) {
    if !shared.admit(node) {
        return;
    }
    let hub = &shared.hub;
    match event {
        Event::Typing { users } => {
            for u in &users {
                hub.remote_typing(room, u);
            }
        }
        Event::Presence { joined, left } => {
            for u in &joined {
                hub.remote_presence(room, node, u, true);
            }
            for u in &left {
                hub.remote_presence(room, node, u, false);
            }
        }
        Event::Members { users, first, ask } => {
            if first {
                hub.remote_members(room, node, &users);
            } else {
                for u in &users {
                    hub.remote_presence(room, node, u, true);
                }
            }
            if ask {
                shared.queue.with(|o| {
                    o.announce.entry(room.to_owned()).or_insert(false);
                });
            }
        }
    }
}
