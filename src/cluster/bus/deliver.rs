//! The deliverer: the one task that gives the hub (`Hub::deliver`) the
//! cluster's committed messages, so that every node hands its sessions
//! each room's messages in seq order.
//!
//! - **Seq order on every node.** Per room (`order.rs`, bookkeeping
//!   without I/O or clock) it keeps the next seq to deliver and holds
//!   messages ahead of it (at most `cluster.reorder_max`; the newest
//!   beyond are dropped and read back); duplicates (a node's own message,
//!   local and echoed) are dropped by seq. A hole not filled within
//!   `cluster.gap_timeout_ms` is read from history through the
//!   `HistoryReader`, a page of `cluster.max_batch` at a time (the next at
//!   once after a full one); an erased message (no body) is skipped, and
//!   seqs that history does not hold either (retention) are passed over
//!   after two reads that find nothing.
//! - **Where a room starts.** A session that joins a room new to the hub
//!   reads the room's latest seq from the store and reports it to the hub,
//!   which promises the session every later message. So the deliverer
//!   starts a room after `Hub::delivery_start`: once every such join has
//!   reported, after the lowest report (holding what arrives meanwhile; a
//!   session drops what it has already by its floor). Once the
//!   subscriptions are live it reads history after that twice,
//!   `gap_timeout_ms` apart, so a message committed between the join and
//!   the subscription (or published before the subscription reached
//!   every NATS server) arrives even in a room that stays quiet. A report
//!   missing after `cluster.request_timeout_ms` (the session's read
//!   failed, or it ended) holds it back no longer: the room starts after
//!   the hub's latest, or without one at the first message held.
//! - **Interest.** It starts a room's subscriptions (`room_task`) when the
//!   hub reports the room's first local member and cancels them at its
//!   last; inputs of an earlier interest period are dropped by round.
//!
//! It must not publish, nor wait on anything but its channel and its
//! tick: history reads run in their own tasks and answer on the channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::order::Order;
use super::shared::{Input, Shared};
use super::subscribe::room_task;
use crate::delivery::EncodedCommit;
use crate::history::Committed;

/// A room the deliverer orders, in one interest period.
#[derive(Debug)]
struct Room {
    /// Which interest period of the room this is: inputs of an earlier
    /// one (a task being cancelled, a read in flight) are dropped.
    round: u64,
    token: CancellationToken,
    order: Order,
}

/// The one caller of the hub's fan-out: keeps every room's order (module doc).
pub(super) async fn deliverer(
    shared: Arc<Shared>,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    token: CancellationToken,
) {
    let limits = &shared.timing.limits;
    let mut rooms: HashMap<String, Room> = HashMap::new();
    let mut round = 0u64;
    let mut tick = tokio::time::interval((limits.gap_timeout / 2).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            input = inputs.recv() => {
                let Some(input) = input else { break };
                let name = match input {
                    Input::Interest { room, on: true } => {
                        round += 1;
                        let child = token.child_token();
                        let fresh = Room { round, token: child.clone(), order: Order::new(Instant::now()) };
                        if let Some(old) = rooms.insert(room.clone(), fresh) {
                            old.token.cancel();
                        }
                        shared.tracker.spawn(room_task(shared.clone(), room.clone(), round, child));
                        room
                    }
                    Input::Interest { room, on: false } => {
                        if let Some(old) = rooms.remove(&room) {
                            old.token.cancel();
                        }
                        continue;
                    }
                    Input::Local { room, msgs } => {
                        let Some(r) = rooms.get_mut(&room) else { continue };
                        r.order.hold(msgs.iter().cloned(), limits);
                        room
                    }
                    Input::Remote { room, round, msgs } => {
                        let Some(r) = rooms.get_mut(&room).filter(|r| r.round == round) else { continue };
                        r.order.hold(msgs, limits);
                        room
                    }
                    Input::Ready { room, round } => {
                        let Some(r) = rooms.get_mut(&room).filter(|r| r.round == round) else { continue };
                        r.order.ready();
                        room
                    }
                    Input::Read { room, round, result } => {
                        shared.counters.history_reads_answered.fetch_add(1, Ordering::Relaxed);
                        let Some(r) = rooms.get_mut(&room).filter(|r| r.round == round) else { continue };
                        let msgs = result
                            .inspect_err(|error| tracing::warn!(%error, room, "cannot read a room's history for its live delivery; retrying"))
                            .ok();
                        r.order.read_done(msgs, Instant::now(), limits);
                        room
                    }
                };
                if let Some(r) = rooms.get_mut(&name) {
                    step(&shared, &name, r);
                }
            }
            _ = tick.tick() => {
                for (name, r) in rooms.iter_mut().filter(|(_, r)| !r.order.idle()) {
                    step(&shared, name, r);
                }
            }
        }
    }
    for r in rooms.values() {
        r.token.cancel();
    }
}

/// Hands the hub what is next in the room's order, and starts the history
/// read it asks for.
fn step(shared: &Arc<Shared>, name: &str, r: &mut Room) {
    let limits = &shared.timing.limits;
    let now = Instant::now();
    // A join that never reports its read (it failed, the session ended)
    // holds the start back only for a request timeout.
    let start = shared.hub.delivery_start(name).or_else(|| {
        r.order
            .waited_out(now, limits)
            .then(|| shared.hub.latest(name))
            .flatten()
    });
    let step = r.order.step(start, now, limits);
    if !step.run.is_empty() {
        let committed: Vec<Committed<'_>> = (step.run.iter())
            .map(|m| Committed {
                room: name,
                seq: m.seq,
                ts: m.ts,
                from: &m.from,
                body: &m.body,
            })
            .collect();
        shared.hub.deliver(EncodedCommit::encode(&committed));
        (shared.counters.delivered).fetch_add(step.run.len() as u64, Ordering::Relaxed);
    }
    if let Some(after) = step.read_after {
        shared
            .counters
            .history_reads
            .fetch_add(1, Ordering::Relaxed);
        let read = (shared.reader)(name.to_owned(), after, limits.read_page);
        let (tx, token) = (shared.deliver.clone(), r.token.clone());
        let (room, round) = (name.to_owned(), r.round);
        shared.tracker.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                result = read => {
                    let _ = tx.send(Input::Read { room, round, result });
                }
            }
        });
    }
}
