//! A session's bounded outbound queue and its slow-consumer policy.
//!
//! The hub pushes into an [`Outbox`] from any thread without awaiting:
//! every push is a `try_send` plus one atomic add. Durable messages and
//! ephemeral events (typing, presence) share one queue, in arrival order,
//! with room for `max_frames` messages plus `max_events` events; events are
//! counted, and may never take more than their share, so they can never
//! crowd out a message. Messages are also bounded in bytes. An event that
//! does not fit is shed and counted; a durable message is never dropped
//! silently: the session is marked a slow consumer and closed, and it
//! resumes by seq. One queue rather than two, because every idle session
//! holds its queue's first allocation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::session::CloseReason;
use crate::session::wire::WireFrame;

/// The new messages of one room from one commit, each encoded once, shared
/// by every recipient: one push per member per commit, however many
/// messages the commit holds for the room.
#[derive(Debug)]
pub struct Delivery {
    pub room: Arc<str>,
    /// In strictly increasing seq order.
    pub messages: Vec<Encoded>,
    /// The messages' framed length in all.
    pub bytes: usize,
    /// When the hub encoded them, right after their commit: the start of the
    /// fan-out latency each subscriber's session observes when writing them.
    pub created: Instant,
}

/// One durable message as it goes on the wire.
#[derive(Debug)]
pub struct Encoded {
    pub seq: u64,
    pub frame: WireFrame,
}

impl Delivery {
    /// A delivery of `messages`, encoded now.
    pub fn new(room: Arc<str>, messages: Vec<Encoded>) -> Delivery {
        let bytes = messages.iter().map(|m| m.frame.len()).sum();
        Delivery {
            room,
            messages,
            bytes,
            created: Instant::now(),
        }
    }
}

/// What travels through an outbox.
#[derive(Debug)]
pub enum Outgoing {
    /// Durable messages: never shed.
    Message(Arc<Delivery>),
    /// A typing or presence event: shed first under pressure. Behind an
    /// `Arc` so that a queue slot is two words: every idle session holds a
    /// block of slots.
    Ephemeral(Arc<WireFrame>),
}

// Every idle session holds a block of 32 queue slots: keep a slot two words.
const _: () = assert!(std::mem::size_of::<Outgoing>() == 16);

impl Outgoing {
    fn len(&self) -> usize {
        match self {
            Outgoing::Message(d) => d.bytes,
            Outgoing::Ephemeral(t) => t.len(),
        }
    }
}

/// State shared between the pushing side and the session.
#[derive(Debug)]
struct Shared {
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Events queued now; at most `max_events`.
    queued_events: AtomicUsize,
    max_events: usize,
    /// The first close reason set wins; 0 means none yet.
    close_reason: AtomicU8,
    /// Cancelled when the session must close (slow consumer, kick).
    kill: CancellationToken,
}

/// The pushing half, held by the hub for every room membership.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

/// The receiving half, owned by the session task.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
}

/// Makes an outbox that holds `max_frames` messages of at most `max_bytes`
/// bytes in all, plus `max_events` events. Messages may also use the event
/// slots that are free.
/// `kill` is the session's own token.
pub fn outbox(
    max_frames: usize,
    max_bytes: usize,
    max_events: usize,
    kill: CancellationToken,
    metrics: Arc<Metrics>,
) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(max_frames.saturating_add(max_events).max(1));
    let shared = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        queued_events: AtomicUsize::new(0),
        max_events,
        close_reason: AtomicU8::new(0),
        kill,
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
            metrics,
        },
        OutboxReceiver { rx, shared },
    )
}

impl Outbox {
    /// Queues a frame without waiting. Returns false when it did not fit
    /// (or the session is gone); the caller applies the policy.
    fn try_push(&self, item: Outgoing) -> bool {
        let len = item.len();
        let queued = &self.shared.queued_bytes;
        let before = queued.fetch_add(len, Ordering::Relaxed);
        if before + len <= self.shared.max_bytes && self.tx.try_send(item).is_ok() {
            return true;
        }
        queued.fetch_sub(len, Ordering::Relaxed);
        false
    }

    /// Queues a durable message; on overflow closes the session as a slow
    /// consumer instead of dropping the message silently.
    pub fn push_message(&self, delivery: &Arc<Delivery>) {
        if !self.try_push(Outgoing::Message(delivery.clone())) && !self.tx.is_closed() {
            self.metrics.messages_dropped.inc();
            self.close(CloseReason::SlowConsumer);
        }
    }

    /// Queues an ephemeral event; on overflow sheds it and counts the shed.
    pub fn push_ephemeral(&self, text: &Arc<WireFrame>) {
        let events = &self.shared.queued_events;
        if events.fetch_add(1, Ordering::Relaxed) < self.shared.max_events
            && self.tx.try_send(Outgoing::Ephemeral(text.clone())).is_ok()
        {
            return;
        }
        events.fetch_sub(1, Ordering::Relaxed);
        if !self.tx.is_closed() {
            self.metrics.ephemeral_shed.inc();
        }
    }

    /// Asks the session to close for `reason`. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        if self
            .shared
            .close_reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            if reason == CloseReason::SlowConsumer {
                self.metrics.slow_consumers.inc();
            }
            self.shared.kill.cancel();
        }
    }

    /// Bytes of durable messages currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Relaxed)
    }
}

impl OutboxReceiver {
    /// Waits for the next frame. Cancel-safe, as the channel's `recv` is.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        let item = self.rx.recv().await?;
        self.taken(&item);
        Some(item)
    }

    /// Takes a frame if one is ready.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        let item = self.rx.try_recv().ok()?;
        self.taken(&item);
        Some(item)
    }

    fn taken(&self, item: &Outgoing) {
        match item {
            Outgoing::Message(d) => {
                self.shared
                    .queued_bytes
                    .fetch_sub(d.bytes, Ordering::Relaxed);
            }
            Outgoing::Ephemeral(_) => {
                self.shared.queued_events.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// The reason set by [`Outbox::close`], if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.shared.close_reason.load(Ordering::Acquire))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn delivery(seq: u64, len: usize) -> Arc<Delivery> {
        let frame = WireFrame::text(&"x".repeat(len));
        Arc::new(Delivery::new(Arc::from("r"), vec![Encoded { seq, frame }]))
    }

    #[test]
    fn ephemeral_events_are_shed_and_messages_close_the_session() {
        let metrics = Arc::new(Metrics::default());
        let kill = CancellationToken::new();
        let (tx, mut rx) = outbox(2, 1024, 2, kill.clone(), metrics.clone());
        let typing = Arc::new(WireFrame::text("typing"));
        for _ in 0..5 {
            tx.push_ephemeral(&typing);
        }
        assert_eq!(metrics.ephemeral_shed.get(), 3);
        assert!(
            !kill.is_cancelled(),
            "shedding ephemeral events keeps the session"
        );
        // Events never crowd out messages.
        tx.push_message(&delivery(1, 10));
        tx.push_message(&delivery(2, 10));
        assert!(!kill.is_cancelled());
        tx.push_message(&delivery(3, 10));
        assert!(
            kill.is_cancelled(),
            "a message that does not fit closes the session"
        );
        assert_eq!(rx.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(metrics.slow_consumers.get(), 1);
        // What was queued is still there, in arrival order.
        assert!(matches!(rx.try_recv(), Some(Outgoing::Ephemeral(_))));
        assert!(matches!(rx.try_recv(), Some(Outgoing::Ephemeral(_))));
        assert!(matches!(rx.try_recv(), Some(Outgoing::Message(d)) if d.messages[0].seq == 1));
        assert!(matches!(rx.try_recv(), Some(Outgoing::Message(d)) if d.messages[0].seq == 2));
        assert!(rx.try_recv().is_none());
        assert_eq!(tx.queued_bytes(), 0);
        // Taking events frees their share: one fits again.
        tx.push_ephemeral(&typing);
        assert_eq!(metrics.ephemeral_shed.get(), 3);
    }

    #[test]
    fn byte_bound_applies_before_the_frame_bound() {
        let metrics = Arc::new(Metrics::default());
        let kill = CancellationToken::new();
        let (tx, mut rx) = outbox(100, 100, 4, kill.clone(), metrics);
        tx.push_message(&delivery(1, 60));
        // 60 bytes of text and a 2-byte frame header.
        assert_eq!(tx.queued_bytes(), 62);
        assert!(!kill.is_cancelled());
        tx.push_message(&delivery(2, 60));
        assert!(kill.is_cancelled());
        assert!(matches!(rx.try_recv(), Some(Outgoing::Message(d)) if d.messages[0].seq == 1));
    }

    #[test]
    fn the_first_close_reason_wins() {
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = outbox(1, 10, 1, CancellationToken::new(), metrics);
        tx.close(CloseReason::Kicked);
        tx.close(CloseReason::SlowConsumer);
        assert_eq!(rx.close_reason(), Some(CloseReason::Kicked));
    }
}
