//! Which nodes are alive: the table of nodes, this node's heartbeats and
//! the others'.
//!
//! Every `cluster.heartbeat_interval_ms` the node publishes a heartbeat on
//! `subjects::node` (presence does not ride on heartbeats, it is per room).
//! A node not heard for `cluster.node_timeout_ms` is gone (noticed at the
//! next heartbeat tick, so within `node_timeout_ms` +
//! `heartbeat_interval_ms`): the hub drops its users from every room,
//! which sends the usual `presence` events. Events from a gone node are
//! ignored (`Shared::admit`); when it is heard again (or a node restarts
//! under the same id) this node asks every room it has for the members
//! again. Each heartbeat tick also queues a share of the rooms' member
//! lists, so that every list is sent again once per `node_timeout_ms`: a
//! lost presence event is repaired, and the bytes per heartbeat stay a
//! share of the node's presence.
//!
//! It must not subscribe to rooms nor touch messages.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::publish::publish;
use super::shared::{Node, Shared, lock, now_ms};
use super::wire::Heartbeat;
use crate::cluster::subjects;

impl Shared {
    /// Whether events from `node` count: not from a node found gone (until
    /// its next heartbeat). A node not heard of yet is noted as alive.
    pub(super) fn admit(&self, node: &str) -> bool {
        let mut nodes = lock(&self.nodes);
        match nodes.get(node) {
            Some(n) => n.alive,
            None => {
                nodes.insert(
                    node.to_owned(),
                    Node {
                        started_ms: 0,
                        last_seen: Instant::now(),
                        last_seen_ms: now_ms(),
                        alive: true,
                        connections: 0,
                    },
                );
                true
            }
        }
    }
}

/// Publishes this node's heartbeats, hears the others', and finds the
/// nodes gone silent.
pub(super) async fn liveness(
    shared: Arc<Shared>,
    heartbeats: async_nats::Subscriber,
    token: CancellationToken,
) {
    let mut heartbeats = heartbeats.fuse();
    let mut tick = tokio::time::interval(shared.timing.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let subject = subjects::node(&shared.stream, &shared.node);
    // Each room's member list is sent again once every `refresh` ticks, a
    // share of the rooms per tick.
    let refresh = (shared.timing.node_timeout.as_millis()
        / shared.timing.heartbeat.as_millis().max(1))
    .max(1);
    let mut ticks: u128 = 0;
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {
                let beat = Heartbeat {
                    node: shared.node.clone(),
                    started_ms: shared.started_ms,
                    connections: (shared.connections)(),
                };
                publish(&shared, &subject, &beat).await;
                ticks += 1;
                refresh_share(&shared, ticks % refresh, refresh);
                let gone: Vec<String> = lock(&shared.nodes)
                    .iter_mut()
                    .filter(|(_, n)| n.alive && n.last_seen.elapsed() >= shared.timing.node_timeout)
                    .map(|(id, n)| {
                        n.alive = false;
                        id.clone()
                    })
                    .collect();
                for node in gone {
                    tracing::warn!(node, "cluster node silent: its members leave");
                    shared.hub.node_gone(&node);
                }
            }
            msg = heartbeats.next() => {
                let Some(msg) = msg else { return };
                match serde_json::from_slice::<Heartbeat>(&msg.payload) {
                    Ok(beat) if beat.node == shared.node => {}
                    Ok(beat) => heard(&shared, beat),
                    Err(error) => tracing::warn!(%error, "undecodable heartbeat on the cluster bus"),
                }
            }
        }
    }
}

/// Queues the member lists of this tick's share of the rooms (those whose
/// name hashes to `share` of `shares`), so that a lost presence event is
/// repaired within `node_timeout_ms` (the first part of a list replaces).
fn refresh_share(shared: &Shared, share: u128, shares: u128) {
    use std::hash::BuildHasher;
    let hasher = rustc_hash::FxBuildHasher;
    let rooms: Vec<String> = lock(&shared.subscribed)
        .keys()
        .filter(|room| u128::from(hasher.hash_one(room)) % shares == share)
        .cloned()
        .collect();
    if rooms.is_empty() {
        return;
    }
    shared.queue.with(|o| {
        for room in rooms {
            o.announce.entry(room).or_insert(false);
        }
    });
}

/// Records a heartbeat. A node heard again after it was found gone, or
/// restarted under its id, has its members asked for again in every room.
fn heard(shared: &Shared, beat: Heartbeat) {
    let (returned, restarted) = {
        let mut nodes = lock(&shared.nodes);
        let node = nodes.entry(beat.node.clone()).or_insert(Node {
            started_ms: beat.started_ms,
            last_seen: Instant::now(),
            last_seen_ms: 0,
            alive: true,
            connections: 0,
        });
        let returned = !node.alive;
        let restarted = node.started_ms != 0 && node.started_ms != beat.started_ms;
        node.started_ms = beat.started_ms;
        node.last_seen = Instant::now();
        node.last_seen_ms = now_ms();
        node.alive = true;
        node.connections = beat.connections;
        (returned, restarted)
    };
    if restarted && !returned {
        shared.hub.node_gone(&beat.node);
    }
    if returned || restarted {
        tracing::info!(
            node = beat.node,
            "cluster node heard again: asking for its members"
        );
        let rooms: Vec<String> = lock(&shared.subscribed).keys().cloned().collect();
        shared.queue.with(|o| {
            for room in rooms {
                o.announce.insert(room, true);
            }
        });
    }
}
