//! A session's bounded outbound queue and its slow-consumer policy.
//!
//! The hub pushes into an [`Outbox`] from any thread without awaiting:
//! every push is a few atomic adds (the bounds), a lock-free queue push and
//! a wake. Durable messages and
//! ephemeral events (typing, presence) share one queue, in arrival order,
//! with room for `max_frames` messages plus `max_events` events; events are
//! counted, and may never take more than their share, so they can never
//! crowd out a message. Messages are also bounded in bytes. An event that
//! does not fit is shed and counted; a durable message is never dropped
//! silently: the session is marked a slow consumer and closed, and it
//! resumes by seq.
//!
//! Bytes have two bounds. Past the soft one (`outbound_queue_bytes`) a
//! session must be draining: a message for a session that has been over
//! it for `slow_consumer_grace_ms` without writing anything to its socket
//! closes it. Past the hard cap (`outbound_queue_max_bytes`) a message
//! closes it at once. So a reader that keeps up with its socket rides out
//! any burst the hard cap holds (a group commit hands a room's whole batch
//! to every member at once), while one that stops reading is closed soon
//! and holds at most the hard cap (the nats-server rule: pending bytes plus
//! a write deadline).
//!
//! The queue is a lock-free segmented queue (crossbeam's `SegQueue`) with a
//! waker, bounded by counters here, rather than tokio's bounded channel: the
//! channel's first block and state (about 1 KiB) are allocated up front,
//! while a `SegQueue` allocates its first block only when something is
//! queued, so an idle session holds none.
//!
//! An outbox may count its queued bytes into a [`QueueTally`] shared with
//! other outboxes (the session registry's), so that the total is read
//! without visiting every session. Whether it counts is a flag in the same
//! word as its bytes: each change to the bytes sees, in one atomic step,
//! whether it belongs to the tally, and joining or leaving the tally moves
//! exactly the bytes held at that step. The fan-out of a delivery adds
//! its pushes up in a [`TallyBatch`] and reaches the shared total once per
//! delivery, not once per member; another push adds at once. The receiver
//! adds up what it takes and settles it once per batch, before it waits
//! again.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use crossbeam_queue::SegQueue;
use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

use super::wire::WireFrame;
use crate::close::CloseReason;
use crate::metrics::Metrics;

pub use super::wire::{Delivery, Encoded};

/// What travels through an outbox.
#[derive(Debug)]
pub enum Outgoing {
    /// Durable messages: never shed.
    Message(Arc<Delivery>),
    /// A typing or presence event: shed first under pressure. Behind an
    /// `Arc` so that a queue slot is two words: a queue's blocks hold 31
    /// slots each.
    Ephemeral(Arc<WireFrame>),
}

// A queue that holds anything holds a block of 31 slots: keep a slot two words.
const _: () = assert!(std::mem::size_of::<Outgoing>() == 16);

impl Outgoing {
    fn len(&self) -> usize {
        match self {
            Outgoing::Message(d) => d.bytes,
            Outgoing::Ephemeral(t) => t.len(),
        }
    }
}

/// The flag, in `Shared::queued_bytes`, of an outbox that counts into its
/// tally; the bits below it are the bytes.
const TALLIED: usize = 1 << (usize::BITS - 1);

/// The bytes of a `Shared::queued_bytes` value, without the flag.
fn bytes_of(word: usize) -> usize {
    word & !TALLIED
}

/// Bytes queued in a set of outboxes, kept as they change.
#[derive(Debug, Default)]
pub struct QueueTally {
    /// Signed: an outbox's changes and its joining or leaving reach the
    /// total in any order, so it may dip below zero for a moment.
    bytes: AtomicI64,
}

impl QueueTally {
    /// The bytes queued now (never below zero).
    pub fn bytes(&self) -> u64 {
        u64::try_from(self.bytes.load(Ordering::Relaxed)).unwrap_or(0)
    }

    fn add(&self, delta: i64) {
        self.bytes.fetch_add(delta, Ordering::Relaxed);
    }
}

/// The tally deltas of many pushes, added to their tally once: the fan-out
/// of one delivery to a room's members touches the shared total once, not
/// once per member. Added when dropped, or at [`TallyBatch::flush`].
#[derive(Debug, Default)]
pub struct TallyBatch {
    tally: Option<Arc<QueueTally>>,
    delta: i64,
}

impl TallyBatch {
    fn add(&mut self, tally: &Arc<QueueTally>, delta: i64) {
        match &self.tally {
            Some(t) if Arc::ptr_eq(t, tally) => self.delta += delta,
            _ => {
                self.flush();
                self.tally = Some(tally.clone());
                self.delta = delta;
            }
        }
    }

    /// Adds what was gathered to the tally.
    pub fn flush(&mut self) {
        if let Some(tally) = &self.tally
            && self.delta != 0
        {
            tally.add(self.delta);
        }
        self.delta = 0;
    }
}

impl Drop for TallyBatch {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `bytes` as a tally's delta.
fn delta(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// State shared between the pushing side and the session.
#[derive(Debug)]
struct Shared {
    queue: SegQueue<Outgoing>,
    /// Items queued now, messages and events; at most `max_items`.
    queued: AtomicUsize,
    max_items: usize,
    /// The session task, woken by every push.
    waker: AtomicWaker,
    /// Set when the receiver is gone: nothing more is queued.
    closed: AtomicBool,
    /// Bytes of the messages queued now, and the [`TALLIED`] flag.
    queued_bytes: AtomicUsize,
    /// The tally this outbox counts into while [`TALLIED`] is set; set
    /// once, by the first [`Outbox::tally_into`].
    tally: OnceLock<Arc<QueueTally>>,
    /// The soft bound: past it the session must be draining.
    soft_bytes: usize,
    /// The hard cap: a message past it closes the session at once.
    max_bytes: usize,
    /// How long the session may stay past `soft_bytes` without progress.
    grace_ms: u64,
    /// When the session last wrote to its socket while past `soft_bytes`,
    /// or when the queue went past it ([`Shared::clock_ms`]).
    progress_ms: AtomicU64,
    born: tokio::time::Instant,
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
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

/// The receiving half, owned by the session task.
#[derive(Debug)]
pub struct OutboxReceiver {
    shared: Arc<Shared>,
    /// Bytes taken while counted in the tally, not yet taken off it.
    untallied: usize,
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        self.settle();
        self.shared.closed.store(true, Ordering::Release);
    }
}

impl Shared {
    /// Milliseconds since the outbox was made. Tokio's clock, so that tests
    /// can pause it; outside a paused runtime it is the monotonic clock.
    fn clock_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Adds `delta` to the tally, for a change of the bytes that saw the
    /// [`TALLIED`] flag set.
    fn tally_add(&self, delta: i64) {
        // The flag was read by a relaxed step; this pairs with the release
        // that set it, so the tally set before it is seen.
        std::sync::atomic::fence(Ordering::Acquire);
        if let Some(tally) = self.tally.get() {
            tally.add(delta);
        }
    }

    /// As [`Shared::tally_add`], into `batch` when there is one.
    fn tally_add_to(&self, delta: i64, batch: Option<&mut TallyBatch>) {
        match batch {
            Some(batch) => {
                std::sync::atomic::fence(Ordering::Acquire);
                if let Some(tally) = self.tally.get() {
                    batch.add(tally, delta);
                }
            }
            None => self.tally_add(delta),
        }
    }
}

/// The bounds of one outbox (from `Config`).
#[derive(Debug, Clone, Copy)]
pub struct QueueBounds {
    /// Messages queued at most (`outbound_queue_frames`).
    pub frames: usize,
    /// Events queued at most beyond them (`outbound_event_frames`).
    pub events: usize,
    /// Bytes past which the session must be draining (`outbound_queue_bytes`).
    pub soft_bytes: usize,
    /// Bytes past which a message closes it at once (`outbound_queue_max_bytes`).
    pub max_bytes: usize,
    /// How long it may stay past `soft_bytes` without writing (`slow_consumer_grace_ms`).
    pub grace: Duration,
}

/// Makes an outbox that holds `max_frames` messages of at most `max_bytes`
/// bytes in all, plus `max_events` events, with no grace: the bytes bound
/// is a hard one. Messages may also use the event slots that are free.
/// `kill` is the session's own token.
pub fn outbox(
    max_frames: usize,
    max_bytes: usize,
    max_events: usize,
    kill: CancellationToken,
    metrics: Arc<Metrics>,
) -> (Outbox, OutboxReceiver) {
    let bounds = QueueBounds {
        frames: max_frames,
        events: max_events,
        soft_bytes: max_bytes,
        max_bytes,
        grace: Duration::ZERO,
    };
    bounded_outbox(bounds, kill, metrics)
}

/// Makes an outbox with a soft and a hard bound in bytes (see the module).
pub fn bounded_outbox(
    bounds: QueueBounds,
    kill: CancellationToken,
    metrics: Arc<Metrics>,
) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        queue: SegQueue::new(),
        queued: AtomicUsize::new(0),
        max_items: bounds.frames.saturating_add(bounds.events).max(1),
        waker: AtomicWaker::new(),
        closed: AtomicBool::new(false),
        queued_bytes: AtomicUsize::new(0),
        tally: OnceLock::new(),
        soft_bytes: bounds.soft_bytes.min(bounds.max_bytes),
        max_bytes: bounds.max_bytes,
        grace_ms: u64::try_from(bounds.grace.as_millis()).unwrap_or(u64::MAX),
        progress_ms: AtomicU64::new(0),
        born: tokio::time::Instant::now(),
        queued_events: AtomicUsize::new(0),
        max_events: bounds.events,
        close_reason: AtomicU8::new(0),
        kill,
    });
    (
        Outbox {
            shared: shared.clone(),
            metrics,
        },
        OutboxReceiver {
            shared,
            untallied: 0,
        },
    )
}

impl Outbox {
    /// Queues a frame without waiting. Returns false when it did not fit
    /// (or the session is gone); the caller applies the policy.
    fn try_push(&self, item: Outgoing, batch: Option<&mut TallyBatch>) -> bool {
        let shared = &*self.shared;
        let len = item.len();
        let queued = &shared.queued_bytes;
        let word = queued.fetch_add(len, Ordering::Relaxed);
        let before = bytes_of(word);
        let after = before + len;
        if after <= shared.max_bytes && self.draining(before, after) && self.enqueue(item) {
            if word & TALLIED != 0 {
                shared.tally_add_to(delta(len), batch);
            }
            return true;
        }
        let undone = queued.fetch_sub(len, Ordering::Relaxed);
        // Each step counts in the tally by the flag it saw; both saw the
        // same flag but for a join or leave in between.
        if (word ^ undone) & TALLIED != 0 {
            let added = if word & TALLIED != 0 { 1 } else { -1 };
            shared.tally_add(added * delta(len));
        }
        false
    }

    /// Whether a session whose queue goes from `before` to `after` bytes is
    /// draining: under the soft bound, just past it, or past it but with
    /// socket progress within the grace time. Reads the clock only past it.
    fn draining(&self, before: usize, after: usize) -> bool {
        let shared = &*self.shared;
        if after <= shared.soft_bytes {
            return true;
        }
        let now = shared.clock_ms();
        if before <= shared.soft_bytes {
            // The grace time starts when the queue goes past the bound.
            shared.progress_ms.store(now, Ordering::Relaxed);
            return true;
        }
        now.saturating_sub(shared.progress_ms.load(Ordering::Relaxed)) <= shared.grace_ms
    }

    /// Queues `item` if there is room and the session is still there, and
    /// wakes the session.
    fn enqueue(&self, item: Outgoing) -> bool {
        let shared = &*self.shared;
        if shared.queued.fetch_add(1, Ordering::AcqRel) >= shared.max_items
            || shared.closed.load(Ordering::Acquire)
        {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        shared.queue.push(item);
        shared.waker.wake();
        true
    }

    /// Whether the session's receiver is gone.
    fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Queues a durable message; on overflow closes the session as a slow
    /// consumer instead of dropping the message silently.
    pub fn push_message(&self, delivery: &Arc<Delivery>) {
        self.push_message_in(delivery, None);
    }

    /// As [`Outbox::push_message`], gathering its tally delta in `batch`
    /// (the fan-out of one delivery to many members).
    pub fn push_message_batched(&self, delivery: &Arc<Delivery>, batch: &mut TallyBatch) {
        self.push_message_in(delivery, Some(batch));
    }

    fn push_message_in(&self, delivery: &Arc<Delivery>, batch: Option<&mut TallyBatch>) {
        if !self.try_push(Outgoing::Message(delivery.clone()), batch) && !self.is_closed() {
            self.metrics.messages_dropped.inc();
            self.close(CloseReason::SlowConsumer);
        }
    }

    /// Queues an ephemeral event; on overflow sheds it and counts the shed.
    pub fn push_ephemeral(&self, text: &Arc<WireFrame>) {
        let events = &self.shared.queued_events;
        if events.fetch_add(1, Ordering::Relaxed) < self.shared.max_events
            && self.enqueue(Outgoing::Ephemeral(text.clone()))
        {
            return;
        }
        events.fetch_sub(1, Ordering::Relaxed);
        if !self.is_closed() {
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
        bytes_of(self.shared.queued_bytes.load(Ordering::Relaxed))
    }

    /// Counts this outbox's queued bytes into `tally`, those queued now
    /// included, until [`Outbox::untally`]. Returns false, and counts
    /// nothing, when the outbox has counted into another tally before.
    /// Counting into the tally it counts into already changes nothing.
    pub fn tally_into(&self, tally: &Arc<QueueTally>) -> bool {
        let shared = &*self.shared;
        if !Arc::ptr_eq(shared.tally.get_or_init(|| tally.clone()), tally) {
            return false;
        }
        let word = shared.queued_bytes.fetch_or(TALLIED, Ordering::AcqRel);
        if word & TALLIED == 0 {
            tally.add(delta(bytes_of(word)));
        }
        true
    }

    /// Stops counting into the tally, taking off it the bytes queued now.
    pub fn untally(&self) {
        let shared = &*self.shared;
        let word = shared.queued_bytes.fetch_and(!TALLIED, Ordering::AcqRel);
        if word & TALLIED != 0 {
            shared.tally_add(-delta(bytes_of(word)));
        }
    }
}

impl OutboxReceiver {
    /// Waits for the next frame. Cancel-safe: nothing is taken until it is
    /// returned. Never ends, as the session holds an [`Outbox`] itself.
    pub async fn recv(&mut self) -> Outgoing {
        // What the last batch took leaves the tally before the next wait.
        self.settle();
        std::future::poll_fn(|cx| {
            if let Some(item) = self.try_recv() {
                return Poll::Ready(item);
            }
            self.shared.waker.register(cx.waker());
            // A push between the first look and the registration woke no
            // one: look again.
            match self.try_recv() {
                Some(item) => Poll::Ready(item),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Takes a frame if one is ready.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        let Some(item) = self.shared.queue.pop() else {
            self.settle();
            return None;
        };
        self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        self.taken(&item);
        Some(item)
    }

    fn taken(&mut self, item: &Outgoing) {
        match item {
            Outgoing::Message(d) => {
                let word = (self.shared.queued_bytes).fetch_sub(d.bytes, Ordering::Relaxed);
                if word & TALLIED != 0 {
                    self.untallied += d.bytes;
                }
            }
            Outgoing::Ephemeral(_) => {
                self.shared.queued_events.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Takes what was taken since the last call off the tally: once per
    /// batch rather than once per message, so that sessions on other
    /// threads do not contend for the tally's counter message by message.
    /// [`OutboxReceiver::recv`] does it before every wait, and
    /// [`OutboxReceiver::try_recv`] when the queue is empty.
    pub fn settle(&mut self) {
        if self.untallied != 0 {
            self.shared
                .tally_add(-delta(std::mem::take(&mut self.untallied)));
        }
    }

    /// Notes that the session wrote to its socket: while its queue is past
    /// the soft bound, this restarts the grace time. Reads the clock only then.
    pub fn progressed(&self) {
        let shared = &*self.shared;
        if bytes_of(shared.queued_bytes.load(Ordering::Relaxed)) > shared.soft_bytes {
            shared
                .progress_ms
                .store(shared.clock_ms(), Ordering::Relaxed);
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_push_wakes_the_waiting_session_and_a_gone_session_takes_nothing() {
        let metrics = Arc::new(Metrics::default());
        let kill = CancellationToken::new();
        let (tx, mut rx) = outbox(4, 1024, 4, kill.clone(), metrics.clone());
        for seq in 1..=3 {
            let waiting = tokio::spawn(async move {
                let item = rx.recv().await;
                (rx, item)
            });
            // From another thread, as the store writer pushes.
            let pusher = tx.clone();
            std::thread::spawn(move || pusher.push_message(&delivery(seq, 10)))
                .join()
                .unwrap();
            let (back, item) = waiting.await.unwrap();
            rx = back;
            assert!(matches!(item, Outgoing::Message(d) if d.messages[0].seq == seq));
        }
        assert_eq!(tx.queued_bytes(), 0);
        drop(rx);
        tx.push_message(&delivery(4, 10));
        assert_eq!(tx.queued_bytes(), 0, "nothing is queued for a gone session");
        assert!(!kill.is_cancelled());
        assert_eq!(metrics.messages_dropped.get(), 0);
    }

    fn bounded(
        soft: usize,
        hard: usize,
        grace_ms: u64,
    ) -> (Outbox, OutboxReceiver, CancellationToken) {
        let kill = CancellationToken::new();
        let bounds = QueueBounds {
            frames: 100,
            events: 4,
            soft_bytes: soft,
            max_bytes: hard,
            grace: Duration::from_millis(grace_ms),
        };
        let (tx, rx) = bounded_outbox(bounds, kill.clone(), Arc::new(Metrics::default()));
        (tx, rx, kill)
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_soft_bound_a_draining_session_stays_and_a_stalled_one_is_closed() {
        // Each delivery is 102 bytes framed: soft bound 200, hard cap 1000.
        let (tx, rx, kill) = bounded(200, 1000, 1000);
        for seq in 1..=3 {
            tx.push_message(&delivery(seq, 100));
        }
        assert!(
            !kill.is_cancelled(),
            "just past the soft bound: grace starts"
        );
        // Writing while past the bound restarts the grace time.
        for seq in 4..=8 {
            tokio::time::advance(Duration::from_millis(900)).await;
            rx.progressed();
            tx.push_message(&delivery(seq, 100));
            assert!(!kill.is_cancelled(), "draining: message {seq} queued");
        }
        // No write for longer than the grace time: the next message closes it.
        tokio::time::advance(Duration::from_millis(1001)).await;
        tx.push_message(&delivery(9, 100));
        assert!(kill.is_cancelled());
        assert_eq!(rx.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[tokio::test(start_paused = true)]
    async fn the_hard_cap_closes_at_once_however_fast_the_session_drains() {
        let (tx, rx, kill) = bounded(200, 500, 60_000);
        for seq in 1..=4 {
            rx.progressed();
            tx.push_message(&delivery(seq, 100));
        }
        assert!(!kill.is_cancelled());
        rx.progressed();
        tx.push_message(&delivery(5, 100));
        assert!(kill.is_cancelled(), "510 bytes is past the 500-byte cap");
        // Under the soft bound again, a session that took its queue is
        // never judged by the grace time.
        let (tx, mut rx, kill) = bounded(200, 500, 10);
        tx.push_message(&delivery(1, 100));
        tx.push_message(&delivery(2, 100));
        tx.push_message(&delivery(3, 100));
        while rx.try_recv().is_some() {}
        tokio::time::advance(Duration::from_secs(60)).await;
        tx.push_message(&delivery(4, 100));
        tx.push_message(&delivery(5, 100));
        tx.push_message(&delivery(6, 100));
        assert!(!kill.is_cancelled());
    }

    #[test]
    fn a_tally_counts_what_its_outboxes_hold_from_join_to_leave() {
        let metrics = Arc::new(Metrics::default());
        let tally = Arc::new(QueueTally::default());
        let (tx, mut rx) = outbox(2, 1024, 2, CancellationToken::new(), metrics.clone());
        // Bytes queued before joining count from the join.
        tx.push_message(&delivery(1, 100));
        assert!(tx.tally_into(&tally));
        assert_eq!(tally.bytes(), 102);
        assert!(tx.tally_into(&tally), "joining again changes nothing");
        assert_eq!(tally.bytes(), 102);
        let other = Arc::new(QueueTally::default());
        assert!(!tx.tally_into(&other), "one tally per outbox");
        assert_eq!(other.bytes(), 0);
        // Events are not bytes of messages.
        tx.push_ephemeral(&Arc::new(WireFrame::text("typing")));
        tx.push_message(&delivery(2, 50));
        assert_eq!(tally.bytes(), 154);
        // A message that does not fit counts nothing.
        tx.push_message(&delivery(3, 1000));
        assert_eq!((tx.queued_bytes(), tally.bytes()), (154, 154));
        // What the receiver takes leaves the tally once it settles.
        assert!(matches!(rx.try_recv(), Some(Outgoing::Message(_))));
        assert_eq!(tx.queued_bytes(), 52);
        rx.settle();
        assert_eq!(tally.bytes(), 52);
        // Leaving takes off what is held; later changes are not counted.
        tx.untally();
        assert_eq!(tally.bytes(), 0);
        while rx.try_recv().is_some() {}
        assert_eq!(tally.bytes(), 0);
        // Back in, emptied: a receiver that goes settles on its way.
        assert!(tx.tally_into(&tally));
        tx.push_message(&delivery(4, 10));
        assert_eq!(tally.bytes(), 12);
        assert!(matches!(rx.try_recv(), Some(Outgoing::Message(_))));
        drop(rx);
        assert_eq!(tally.bytes(), 0);
        tx.push_message(&delivery(5, 10));
        assert_eq!((tx.queued_bytes(), tally.bytes()), (0, 0), "a gone session");
    }

    #[test]
    fn a_batch_reaches_the_tally_once_flushed_with_every_members_bytes() {
        let metrics = Arc::new(Metrics::default());
        let tally = Arc::new(QueueTally::default());
        let members: Vec<_> = (0..3)
            .map(|_| outbox(4, 1024, 2, CancellationToken::new(), metrics.clone()))
            .collect();
        for (tx, _) in &members[..2] {
            assert!(tx.tally_into(&tally));
        }
        let d = delivery(1, 100);
        let mut batch = TallyBatch::default();
        for (tx, _) in &members {
            tx.push_message_batched(&d, &mut batch);
        }
        assert_eq!(
            tally.bytes(),
            0,
            "nothing reaches the total before the flush"
        );
        batch.flush();
        assert_eq!(tally.bytes(), 204, "the two tallied members, not the third");
        batch.flush();
        assert_eq!(tally.bytes(), 204, "a flush adds once");
        // A dropped batch flushes too.
        {
            let mut batch = TallyBatch::default();
            members[0].0.push_message_batched(&d, &mut batch);
        }
        assert_eq!(tally.bytes(), 306);
        // Every member still got the message.
        for (_, mut rx) in members {
            assert!(matches!(rx.try_recv(), Some(Outgoing::Message(_))));
        }
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
