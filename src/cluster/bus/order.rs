//! One room's order of delivery on a node: which of the messages that
//! reach it (from any node, in any order, some twice, some never) go to
//! the hub next, and when to read history for the rest.
//!
//! Pure bookkeeping: it does no I/O and reads no clock (callers pass
//! `now`), so the deliverer owns the effects and the tests need neither
//! NATS nor time. It must not hand out a seq twice or out of order.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use super::wire::BusMessage;
use crate::history::StoredMessage;

/// The bounds and timings of every room's order.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    /// How long a hole waits for its message before history is read.
    pub gap_timeout: Duration,
    /// How long a room waits for the hub to know its latest seq before it
    /// starts at the first message held.
    pub request_timeout: Duration,
    /// Most messages one history read asks for.
    pub read_page: usize,
    /// Most messages held ahead of the next seq.
    pub reorder_max: usize,
}

/// What the deliverer does after a step.
#[derive(Debug, Default)]
pub(super) struct Step {
    /// The messages to hand the hub now, in seq order, contiguous but for
    /// erased ones.
    pub run: Vec<BusMessage>,
    /// Read history after this seq now (the reply comes to `read_done`).
    pub read_after: Option<u64>,
}

/// A room's order (see the module).
#[derive(Debug)]
pub(super) struct Order {
    /// The next seq to hand the hub; `None` until the hub knows the room's latest.
    next: Option<u64>,
    /// Messages ahead of `next`; `None` for an erased one (skipped).
    pending: BTreeMap<u64, Option<BusMessage>>,
    /// Since when `next` has been missing while later messages wait.
    gap_since: Option<Instant>,
    began: Instant,
    ready: bool,
    /// Reads of history past `next` still to do once ready, without a gap.
    catch_up: u8,
    reading: bool,
    last_read: Option<Instant>,
    /// The last read filled its page: more may follow, read on at once.
    more: bool,
    /// Reads in a row that found nothing for a gap.
    empty_reads: u8,
}

impl Order {
    /// A room whose interest began at `now`. Once its subscriptions are
    /// live ([`Order::ready`]) it reads history after its next seq twice,
    /// a gap timeout apart, for what was published before they were.
    pub fn new(now: Instant) -> Order {
        Order {
            next: None,
            pending: BTreeMap::new(),
            gap_since: None,
            began: now,
            ready: false,
            catch_up: 2,
            reading: false,
            last_read: None,
            more: false,
            empty_reads: 0,
        }
    }

    /// Whether only a new message can give the room something to do: its
    /// start is known, nothing is held or being read, no read is due.
    pub fn idle(&self) -> bool {
        self.next.is_some()
            && self.pending.is_empty()
            && !self.reading
            && !self.more
            && (self.catch_up == 0 || !self.ready)
    }

    /// Whether the room has waited a request timeout for where to start.
    pub fn waited_out(&self, now: Instant, limits: &Limits) -> bool {
        self.next.is_none() && now.saturating_duration_since(self.began) >= limits.request_timeout
    }

    /// The room's subscriptions are live.
    pub fn ready(&mut self) {
        self.ready = true;
    }

    /// Holds messages that arrived; past `reorder_max` held, the newest go
    /// (history has them).
    pub fn hold(&mut self, msgs: impl IntoIterator<Item = BusMessage>, limits: &Limits) {
        self.hold_some(msgs.into_iter().map(|m| (m.seq, Some(m))), limits);
    }

    fn hold_some(
        &mut self,
        msgs: impl Iterator<Item = (u64, Option<BusMessage>)>,
        limits: &Limits,
    ) {
        for (seq, msg) in msgs {
            if self.next.is_some_and(|next| seq < next) {
                continue;
            }
            self.pending.entry(seq).or_insert(msg);
        }
        while self.pending.len() > limits.reorder_max.max(1) {
            self.pending.pop_last();
        }
    }

    /// Takes a history read's messages (`None`: the read failed; it is
    /// tried again a gap timeout later).
    pub fn read_done(&mut self, msgs: Option<Vec<StoredMessage>>, now: Instant, limits: &Limits) {
        self.reading = false;
        self.last_read = Some(now);
        let Some(msgs) = msgs else { return };
        self.more = msgs.len() >= limits.read_page;
        if let Some(next) = self.next {
            match msgs.first() {
                // History no longer holds `next` (retention): start where it does.
                Some(first) if first.seq > next => self.next = Some(first.seq),
                None if self.pending.keys().next().is_some_and(|&p| p > next) => {
                    self.empty_reads += 1;
                    // Twice nothing for a hole: those seqs are not in
                    // history (deleted); go on after them.
                    if self.empty_reads >= 2 {
                        if let Some(&p) = self.pending.keys().next() {
                            tracing::warn!(
                                from = next,
                                to = p,
                                "seqs missing from history; skipped"
                            );
                            self.next = Some(p);
                        }
                    }
                }
                _ => {}
            }
        }
        let msgs = msgs.into_iter().map(|m| {
            let msg = (m.body)
                .and_then(|b| RawValue::from_string(b).ok())
                .map(|body| BusMessage {
                    seq: m.seq,
                    from: m.from,
                    ts: m.ts,
                    body,
                });
            (m.seq, msg)
        });
        self.hold_some(msgs, limits);
    }

    /// What is next: the run of messages from the next seq on, and whether
    /// to read history now (a hole older than the gap timeout, a catch-up
    /// due, or the rest after a full page). `latest` is the seq the
    /// hub says the room's delivery starts after.
    pub fn step(&mut self, latest: Option<u64>, now: Instant, limits: &Limits) -> Step {
        let mut step = Step::default();
        if self.next.is_none() {
            if let Some(latest) = latest {
                self.next = Some(latest.saturating_add(1));
            } else if self.waited_out(now, limits) {
                self.next = self.pending.keys().next().copied();
            }
            if let Some(next) = self.next {
                self.pending = self.pending.split_off(&next);
            }
        }
        let Some(mut next) = self.next else {
            return step;
        };
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != next {
                break;
            }
            if let Some(m) = entry.remove() {
                step.run.push(m);
            }
            next += 1;
        }
        if Some(next) != self.next {
            self.empty_reads = 0;
        }
        self.next = Some(next);
        if self.reading {
            return step;
        }
        let rested = self
            .last_read
            .is_none_or(|t| now.saturating_duration_since(t) >= limits.gap_timeout);
        let read = if self.more {
            true
        } else if self.pending.is_empty() {
            self.gap_since = None;
            let due = self.ready && self.catch_up > 0 && rested;
            if due {
                self.catch_up -= 1;
            }
            due
        } else {
            let since = *self.gap_since.get_or_insert(now);
            now.saturating_duration_since(since) >= limits.gap_timeout && rested
        };
        if read {
            self.reading = true;
            step.read_after = Some(next.saturating_sub(1));
        }
        step
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        Limits {
            gap_timeout: 100 * MS,
            request_timeout: 1000 * MS,
            read_page: 4,
            reorder_max: 8,
        }
    }

    fn msg(seq: u64) -> BusMessage {
        BusMessage {
            seq,
            from: "u".to_owned(),
            ts: 0,
            body: RawValue::from_string(seq.to_string()).unwrap(),
        }
    }

    fn stored(seq: u64) -> StoredMessage {
        StoredMessage {
            seq,
            from: "u".to_owned(),
            ts: 0,
            body: Some(seq.to_string()),
        }
    }

    fn seqs(step: &Step) -> Vec<u64> {
        step.run.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn messages_wait_for_the_hubs_latest_then_go_in_seq_order_once() {
        let (l, t0) = (limits(), Instant::now());
        let mut o = Order::new(t0);
        o.hold([msg(12), msg(11), msg(10)], &l);
        let step = o.step(None, t0, &l);
        assert!(
            step.run.is_empty() && step.read_after.is_none(),
            "latest unknown"
        );
        // The member read latest 10: 10 was in its history.
        assert_eq!(seqs(&o.step(Some(10), t0, &l)), [11, 12]);
        o.hold([msg(14), msg(12), msg(13)], &l);
        assert_eq!(seqs(&o.step(Some(10), t0, &l)), [13, 14]);
        o.hold([msg(14), msg(13)], &l);
        assert!(o.step(Some(14), t0, &l).run.is_empty(), "nothing twice");
    }

    #[test]
    fn a_hole_is_read_from_history_after_the_gap_timeout_only() {
        let (l, t0) = (limits(), Instant::now());
        let mut o = Order::new(t0);
        assert!(o.step(Some(0), t0, &l).run.is_empty());
        o.hold([msg(3)], &l);
        let step = o.step(Some(0), t0, &l);
        assert!(step.run.is_empty() && step.read_after.is_none());
        assert_eq!(o.step(None, t0 + 99 * MS, &l).read_after, None);
        assert_eq!(o.step(None, t0 + 100 * MS, &l).read_after, Some(0));
        assert_eq!(
            o.step(None, t0 + 200 * MS, &l).read_after,
            None,
            "one read at a time"
        );
        o.read_done(
            Some(vec![stored(1), stored(2), stored(3)]),
            t0 + 210 * MS,
            &l,
        );
        assert_eq!(seqs(&o.step(None, t0 + 210 * MS, &l)), [1, 2, 3]);
        // A failed read is tried again a gap timeout later.
        o.hold([msg(5)], &l);
        assert_eq!(o.step(None, t0 + 210 * MS, &l).read_after, None);
        assert_eq!(o.step(None, t0 + 310 * MS, &l).read_after, Some(3));
        o.read_done(None, t0 + 320 * MS, &l);
        assert_eq!(o.step(None, t0 + 400 * MS, &l).read_after, None);
        assert_eq!(o.step(None, t0 + 420 * MS, &l).read_after, Some(3));
    }

    #[test]
    fn once_live_history_is_read_twice_and_again_while_pages_are_full() {
        let (l, t0) = (limits(), Instant::now());
        let mut o = Order::new(t0);
        assert_eq!(o.step(Some(5), t0, &l).read_after, None, "not live yet");
        o.ready();
        assert_eq!(o.step(Some(5), t0, &l).read_after, Some(5));
        // A full page: read on at once.
        o.read_done(Some((6..=9).map(stored).collect()), t0, &l);
        let step = o.step(None, t0, &l);
        assert_eq!((seqs(&step), step.read_after), (vec![6, 7, 8, 9], Some(9)));
        o.read_done(Some(vec![]), t0, &l);
        assert_eq!(o.step(None, t0 + 50 * MS, &l).read_after, None);
        assert_eq!(o.step(None, t0 + 100 * MS, &l).read_after, Some(9));
        assert!(!o.idle(), "a read is out");
        o.read_done(Some(vec![]), t0 + 100 * MS, &l);
        assert_eq!(o.step(None, t0 + 900 * MS, &l).read_after, None, "done");
        assert!(o.idle(), "nothing to do until a message comes");
        o.hold([msg(11)], &l);
        assert!(!o.idle());
    }

    #[test]
    fn erased_and_deleted_messages_are_skipped() {
        let (l, t0) = (limits(), Instant::now());
        let mut o = Order::new(t0);
        o.step(Some(0), t0, &l);
        o.hold([msg(3)], &l);
        o.step(None, t0, &l);
        assert_eq!(o.step(None, t0 + 100 * MS, &l).read_after, Some(0));
        let mut erased = stored(2);
        erased.body = None;
        o.read_done(Some(vec![stored(1), erased, stored(3)]), t0 + 100 * MS, &l);
        assert_eq!(seqs(&o.step(None, t0 + 100 * MS, &l)), [1, 3]);
        // 4 and 5 are not in history: skipped after two empty reads.
        o.hold([msg(6)], &l);
        o.step(None, t0 + 100 * MS, &l);
        assert_eq!(o.step(None, t0 + 200 * MS, &l).read_after, Some(3));
        o.read_done(Some(vec![]), t0 + 200 * MS, &l);
        assert_eq!(o.step(None, t0 + 300 * MS, &l).read_after, Some(3));
        o.read_done(Some(vec![]), t0 + 300 * MS, &l);
        assert_eq!(seqs(&o.step(None, t0 + 300 * MS, &l)), [6]);
        // History that starts later (retention) moves the start.
        o.hold([msg(20)], &l);
        o.step(None, t0 + 300 * MS, &l);
        assert_eq!(o.step(None, t0 + 400 * MS, &l).read_after, Some(6));
        o.read_done(Some(vec![stored(19), stored(20)]), t0 + 400 * MS, &l);
        assert_eq!(seqs(&o.step(None, t0 + 400 * MS, &l)), [19, 20]);
    }

    #[test]
    fn at_most_reorder_max_wait_and_the_rest_come_from_history() {
        let (l, t0) = (limits(), Instant::now());
        let mut o = Order::new(t0);
        o.step(Some(0), t0, &l);
        o.hold((2..=20).map(msg), &l);
        assert_eq!(o.pending.len(), l.reorder_max);
        assert_eq!(o.pending.keys().last(), Some(&9), "the newest went");
        o.step(None, t0, &l);
        assert_eq!(o.step(None, t0 + 100 * MS, &l).read_after, Some(0));
        // A full page: 9 is dropped to keep the bound, and read next.
        o.read_done(Some((1..=4).map(stored).collect()), t0 + 100 * MS, &l);
        let step = o.step(None, t0 + 100 * MS, &l);
        assert_eq!(seqs(&step), (1..=8).collect::<Vec<_>>());
        assert_eq!(step.read_after, Some(8));
        o.read_done(Some(vec![stored(9)]), t0 + 100 * MS, &l);
        assert_eq!(seqs(&o.step(None, t0 + 100 * MS, &l)), [9]);
    }

    #[test]
    fn without_a_latest_the_room_starts_at_the_first_message_held_after_the_request_timeout() {
        let (l, t0) = (limits(), Instant::now());
        let mut o = Order::new(t0);
        o.hold([msg(8), msg(7)], &l);
        assert!(o.step(None, t0 + 999 * MS, &l).run.is_empty());
        assert_eq!(seqs(&o.step(None, t0 + 1000 * MS, &l)), [7, 8]);
    }
}
