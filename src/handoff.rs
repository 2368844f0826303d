//! The hand-off of the embedded store's commits from its writer thread to
//! the delivery task on the runtime, which gives them to the hub.
//!
//! The writer thread encodes each commit's messages into an
//! `EncodedCommit` (work per message) and
//! queues them with the commit's replies (the acks); one task on a runtime
//! worker takes them in commit order, pushes the messages to the rooms'
//! members through [`Hub::deliver`] (work per member), then completes the
//! replies. Every session wake-up then comes from a runtime worker, which
//! queues the woken task on its own run queue; a wake-up from the writer
//! thread goes through the runtime's shared queue, behind every session
//! the last fan-out woke. Fanning a big room out from the writer thread
//! made the next message wait for the whole of the previous one, and a
//! publisher's ack wait behind all its room's deliveries (BENCHMARKS-HISTORY.md,
//! run K).
//!
//! Invariants:
//! - Commits are delivered in the order the writer committed them: one
//!   queue, one task. A commit's acks are completed after its messages
//!   are pushed, so a sender that is a member has its `message` queued
//!   before its `ack` is sent (PROTOCOL.md allows either order).
//! - A message is queued only after its commit is durable (the writer
//!   calls the sink then), so delivery still follows durability.
//! - The queue is bounded (`fanout_queue_commits`). When the task is that
//!   far behind, the writer waits for it before acknowledging more: the
//!   back-pressure the writer had when it fanned out itself. The task never
//!   waits for the writer, so the two cannot deadlock.
//! - The task lives as long as the store: it ends when the writer's end of
//!   the queue is dropped, having delivered (and acked) everything queued.
//!
//! This module must not touch the store's data or a socket; it only moves
//! commits from one thread to one task.

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::warn;

use crate::delivery::EncodedCommit;
use crate::history::{CommitSink, Committed, Replies};
use crate::hub::Hub;

/// The writer's end: the embedded store's [`CommitSink`].
#[derive(Debug)]
pub struct HandoffQueue {
    tx: mpsc::Sender<(EncodedCommit, Option<Replies>)>,
    bell: Bell,
}

/// The runtime's end: [`DeliveryTask::run`] delivers what the writer queued.
#[derive(Debug)]
pub struct DeliveryTask {
    rx: mpsc::Receiver<(EncodedCommit, Option<Replies>)>,
    bell: UnixStream,
    rung: Arc<AtomicBool>,
    hub: Arc<Hub>,
}

/// How the writer wakes the task: a byte on a socket pair, which the
/// runtime's I/O driver reports on the worker itself. The task then runs
/// next, ahead of the sessions the last fan-out woke; a wake from this
/// thread (the channel's own) would queue it behind all of them, so a big
/// room's next message would wait for the whole of the previous one to be
/// written before any member got it (measured: the p99 of BENCHMARKS-HISTORY.md's
/// figure 8c doubled).
#[derive(Debug)]
struct Bell {
    socket: StdUnixStream,
    /// Set by a ring, cleared by the task before it looks at the queue:
    /// a ring while it is set would wake the task for nothing.
    rung: Arc<AtomicBool>,
}

impl Bell {
    fn ring(&self) {
        if self.rung.swap(true, Ordering::SeqCst) {
            return;
        }
        match (&self.socket).write(&[1]) {
            // A full socket holds rings the task has not heard yet.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // The task has gone: the server is stopping.
            Err(e) => warn!(error = %e, "cannot wake the fan-out task"),
        }
    }
}

/// A queue of at most `capacity` commits from the store writer to a task
/// delivering through `hub`. Needs the runtime (for the task's socket).
pub fn channel(hub: Arc<Hub>, capacity: usize) -> std::io::Result<(HandoffQueue, DeliveryTask)> {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let (ring, hear) = StdUnixStream::pair()?;
    ring.set_nonblocking(true)?;
    hear.set_nonblocking(true)?;
    let rung = Arc::new(AtomicBool::new(false));
    let queue = HandoffQueue {
        tx,
        bell: Bell {
            socket: ring,
            rung: rung.clone(),
        },
    };
    let task = DeliveryTask {
        rx,
        bell: UnixStream::from_std(hear)?,
        rung,
        hub,
    };
    Ok((queue, task))
}

impl HandoffQueue {
    /// Encodes the commit's messages here, on the writer thread (never a
    /// runtime worker: it may wait for room in the queue), and queues them
    /// with the commit's replies.
    fn queue(&self, msgs: &[Committed<'_>], replies: Option<Replies>) {
        let commit = EncodedCommit::encode(msgs);
        match self.tx.blocking_send((commit, replies)) {
            Ok(()) => self.bell.ring(),
            // The task has stopped: the server is shutting down, its
            // sessions are closing, and the messages are in history.
            Err(mpsc::error::SendError((_, replies))) => {
                if let Some(replies) = replies {
                    replies.send();
                }
            }
        }
    }
}

impl CommitSink for HandoffQueue {
    fn committed(&self, msgs: &[Committed<'_>]) {
        self.queue(msgs, None);
    }

    /// The replies go with the messages, and the task completes them after
    /// delivering: completed here, each would wake its session from outside
    /// the runtime, queued behind every session the last fan-out woke, and
    /// a publisher's session would read its next message only after them.
    fn committed_then(&self, msgs: &[Committed<'_>], replies: Replies) {
        self.queue(msgs, Some(replies));
    }
}

impl DeliveryTask {
    fn deliver(&self, commit: EncodedCommit, replies: Option<Replies>) {
        self.hub.deliver(commit);
        if let Some(replies) = replies {
            replies.send();
        }
    }

    /// Delivers queued commits in order until the writer's end is gone
    /// (the store has shut down), having delivered every one of them.
    pub async fn run(mut self) {
        let mut rings = [0u8; 64];
        loop {
            // Cleared before the queue is looked at: a commit queued after
            // the look rings again.
            self.rung.store(false, Ordering::SeqCst);
            loop {
                match self.rx.try_recv() {
                    Ok((commit, replies)) => self.deliver(commit, replies),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
                // A writer that keeps committing must not keep the worker
                // from the sessions this task wakes: now and then, yield.
                tokio::task::consume_budget().await;
            }
            if let Err(e) = self.bell.readable().await {
                // Never seen; the queue's own wake-up still works, later.
                warn!(error = %e, "the fan-out task's wake-up failed");
                while let Some((commit, replies)) = self.rx.recv().await {
                    self.deliver(commit, replies);
                }
                return;
            }
            // Read until the socket is empty, which re-arms it; at its end
            // (the writer has gone) the queue says so.
            while let Ok(n) = self.bell.try_read(&mut rings) {
                if n == 0 {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::delivery::{OutboxReceiver, Outgoing};
    use crate::history::Backend as _;
    use serde_json::value::RawValue;

    fn commit(queue: &HandoffQueue, room: &str, seqs: std::ops::RangeInclusive<u64>) {
        let body = RawValue::from_string("\"hi\"".to_owned()).unwrap();
        let msgs: Vec<Committed<'_>> = seqs
            .map(|seq| Committed {
                room,
                seq,
                ts: 1,
                from: "u",
                body: &body,
            })
            .collect();
        queue.committed(&msgs);
    }

    /// A hub with one member in room `r`, and that member's queue.
    fn hub_with_member() -> (Arc<Hub>, OutboxReceiver) {
        let hub = Arc::new(Hub::new());
        let rx = crate::hub::tests::member(&hub, 1, "a");
        (hub, rx)
    }

    /// The writer thread's commits reach a member in commit order, and the
    /// hub's latest seq follows them.
    #[tokio::test]
    async fn commits_are_delivered_in_order_from_another_thread() {
        let (hub, mut rx) = hub_with_member();
        // A capacity of 2 makes the writer wait for the task now and then.
        let (queue, task) = channel(hub.clone(), 2).unwrap();
        let running = tokio::spawn(task.run());
        let writer = std::thread::spawn(move || {
            for i in 0..50 {
                commit(&queue, "r", i * 3 + 1..=i * 3 + 3);
            }
        });
        let mut seqs = Vec::new();
        while seqs.len() < 150 {
            if let Outgoing::Message(d) = rx.recv().await {
                seqs.extend(d.messages.iter().map(|m| m.seq));
            }
        }
        assert_eq!(seqs, (1..=150).collect::<Vec<_>>());
        assert_eq!(hub.latest("r"), Some(150));
        // The writer's end is dropped with its thread: the task ends.
        writer.join().unwrap();
        running.await.unwrap();
    }

    /// Commits queued before the writer's end goes are all delivered, and
    /// only then does the task end.
    #[tokio::test]
    async fn the_task_delivers_everything_queued_before_the_writer_went() {
        let (hub, mut rx) = hub_with_member();
        let (queue, task) = channel(hub.clone(), 4).unwrap();
        tokio::task::spawn_blocking(move || {
            commit(&queue, "r", 1..=2);
            commit(&queue, "r", 3..=3);
        })
        .await
        .unwrap();
        task.run().await;
        assert_eq!(hub.latest("r"), Some(3));
        let mut seqs = Vec::new();
        while let Some(Outgoing::Message(d)) = rx.try_recv() {
            seqs.extend(d.messages.iter().map(|m| m.seq));
        }
        assert_eq!(seqs, [1, 2, 3]);
    }

    /// An append's ack is completed by the task once it has delivered the
    /// message, with the real store as the writer.
    #[tokio::test]
    async fn an_ack_follows_the_delivery_of_its_message() {
        let (hub, mut rx) = hub_with_member();
        let (queue, task) = channel(hub.clone(), 4).unwrap();
        let running = tokio::spawn(task.run());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let opts = crate::config::Config::default().store_options();
        let store = tokio::task::spawn_blocking(move || {
            crate::store::Store::open(&path, opts, Arc::new(queue))
        })
        .await
        .unwrap()
        .unwrap();
        for expected in 1..=3 {
            let (reply, acked) = tokio::sync::oneshot::channel();
            let append = crate::history::Append {
                room: Arc::from("r"),
                from: Arc::from("u"),
                body: RawValue::from_string("1".to_owned()).unwrap(),
                key: None,
                reply,
            };
            store.handle().append(append).await.unwrap();
            let done = acked.await.unwrap().unwrap();
            assert_eq!(done.seq, expected);
            match rx.try_recv() {
                Some(Outgoing::Message(d)) => assert_eq!(d.messages[0].seq, expected),
                other => panic!("the message was not delivered before its ack: {other:?}"),
            }
        }
        tokio::task::spawn_blocking(move || store.shutdown())
            .await
            .unwrap()
            .unwrap();
        // The store's end of the queue went with it.
        running.await.unwrap();
    }
}
