//! One room's delivery order: what the application has seen (epoch and last
//! seq), and the rules that turn live, replayed and paged messages into one
//! stream in seq order with no duplicate, and a gap only as a `Gap` event.
//!
//! Pure state, no I/O: it returns what to deliver and which history page to
//! fetch, and the driver does the rest. It must not drop a message with a
//! seq above the last one delivered unless it reports that seq in a gap.

use std::collections::BTreeMap;

use crate::Message;

/// What the driver must do after a room changed.
#[derive(Debug, PartialEq)]
pub(crate) enum Out {
    /// Hand this message to the application.
    Deliver(Message),
    /// Seqs `first..=last` will never be delivered (the gap exceeded the
    /// fill bound, or history no longer holds them).
    Gap { first: u64, last: u64 },
    /// The room's history was recreated under a new epoch.
    EpochChanged { epoch: String },
    /// Fetch the history page after this seq.
    FetchAfter(u64),
}

/// A gap being paged from history, with the live messages that arrived
/// meanwhile.
#[derive(Debug)]
struct Fill {
    /// The last seq the fill must reach.
    target: u64,
    buffered: BTreeMap<u64, Message>,
}

#[derive(Debug, Default)]
pub(crate) struct Room {
    /// The epoch of `last`; `None` until the first `joined`.
    pub epoch: Option<String>,
    /// The last seq delivered (or reported in a gap).
    pub last: u64,
    fill: Option<Fill>,
    /// Whether a history page of the fill is in flight.
    fetching: bool,
}

impl Room {
    /// The `since` and `epoch` to join with: none before the first join.
    pub fn resume_point(&self) -> (Option<u64>, Option<String>) {
        match &self.epoch {
            Some(e) => (Some(self.last), Some(e.clone())),
            None => (None, None),
        }
    }

    /// The connection ended: a fill in flight is abandoned (the next join
    /// resumes from `last`, which covers it).
    pub fn disconnected(&mut self) {
        self.fill = None;
        self.fetching = false;
    }

    /// A `joined` reply: the room's seq when the join took effect, its epoch
    /// and whether the messages after `since` are replayed.
    pub fn joined(
        &mut self,
        seq: u64,
        epoch: &str,
        recovered: Option<bool>,
        max_fill: u64,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        match self.epoch.as_deref() {
            None => {
                // First join: everything after `seq` arrives live.
                self.epoch = Some(epoch.to_owned());
                self.last = seq;
                return out;
            }
            Some(old) if old != epoch => {
                // The seqs seen before belong to a history that is gone.
                self.epoch = Some(epoch.to_owned());
                self.last = 0;
                self.fill = None;
                self.fetching = false;
                out.push(Out::EpochChanged {
                    epoch: epoch.to_owned(),
                });
            }
            Some(_) => {
                if recovered == Some(true) {
                    return out;
                }
            }
        }
        if let Some(fill) = &mut self.fill {
            fill.target = fill.target.max(seq);
            return out;
        }
        self.open_gap(seq, max_fill, &mut out);
        out
    }

    /// Seqs `last+1..=target` are missing: page them, or report them when
    /// there are more than `max_fill`.
    fn open_gap(&mut self, target: u64, max_fill: u64, out: &mut Vec<Out>) {
        if target <= self.last {
            return;
        }
        if target - self.last > max_fill {
            out.push(Out::Gap {
                first: self.last + 1,
                last: target,
            });
            self.last = target;
            return;
        }
        self.fill = Some(Fill {
            target,
            buffered: BTreeMap::new(),
        });
        self.fetching = true;
        out.push(Out::FetchAfter(self.last));
    }

    /// A live or replayed `message`.
    pub fn message(&mut self, m: Message, max_fill: u64) -> Vec<Out> {
        let mut out = Vec::new();
        self.accept(m, max_fill, &mut out);
        out
    }

    fn accept(&mut self, m: Message, max_fill: u64, out: &mut Vec<Out>) {
        if m.seq <= self.last {
            return;
        }
        if let Some(fill) = &mut self.fill {
            fill.buffered.insert(m.seq, m);
            return;
        }
        if m.seq > self.last + 1 {
            // A conforming server never skips a seq; if one arrives anyway,
            // the missing ones are paged like any other gap.
            self.open_gap(m.seq - 1, max_fill, out);
            if let Some(fill) = &mut self.fill {
                fill.buffered.insert(m.seq, m);
                return;
            }
        }
        self.last = m.seq;
        out.push(Out::Deliver(m));
    }

    /// A page of the fill: messages after `last`, oldest first.
    pub fn page(&mut self, messages: Vec<Message>, more: bool, max_fill: u64) -> Vec<Out> {
        let mut out = Vec::new();
        self.fetching = false;
        let Some(target) = self.fill.as_ref().map(|f| f.target) else {
            return out;
        };
        let mut progressed = false;
        for m in messages {
            if m.seq <= self.last {
                continue;
            }
            if m.seq > self.last + 1 {
                // History lost these seqs (an erased message keeps its seq,
                // so this is a deleted range).
                out.push(Out::Gap {
                    first: self.last + 1,
                    last: m.seq - 1,
                });
            }
            self.last = m.seq;
            progressed = true;
            out.push(Out::Deliver(m));
        }
        if more && progressed && self.last < target {
            self.fetching = true;
            out.push(Out::FetchAfter(self.last));
            return out;
        }
        self.finish(max_fill, &mut out);
        out
    }

    /// The fill could not be completed: what is missing is reported as a gap.
    pub fn page_failed(&mut self, max_fill: u64) -> Vec<Out> {
        let mut out = Vec::new();
        self.fetching = false;
        if self.fill.is_some() {
            self.finish(max_fill, &mut out);
        }
        out
    }

    /// The fill for the gap is to be fetched again (after a refused page).
    pub fn refetch(&mut self) -> Option<u64> {
        if self.fill.is_some() && !self.fetching {
            self.fetching = true;
            Some(self.last)
        } else {
            None
        }
    }

    fn finish(&mut self, max_fill: u64, out: &mut Vec<Out>) {
        let Some(fill) = self.fill.take() else { return };
        if self.last < fill.target {
            out.push(Out::Gap {
                first: self.last + 1,
                last: fill.target,
            });
            self.last = fill.target;
        }
        for (_, m) in fill.buffered {
            self.accept(m, max_fill, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Source;

    fn msg(seq: u64) -> Message {
        Message {
            room: "r".into(),
            seq,
            from: "u".into(),
            ts: seq,
            body: None,
            source: Source::Live,
        }
    }

    fn seqs(out: &[Out]) -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o {
                Out::Deliver(m) => Some(m.seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn live_duplicates_are_dropped_and_order_kept() {
        let mut r = Room::default();
        assert!(r.joined(3, "e", None, 100).is_empty());
        assert_eq!(r.resume_point(), (Some(3), Some("e".into())));
        assert_eq!(seqs(&r.message(msg(3), 100)), Vec::<u64>::new());
        assert_eq!(seqs(&r.message(msg(4), 100)), vec![4]);
        assert_eq!(seqs(&r.message(msg(4), 100)), Vec::<u64>::new());
        assert!(r.joined(9, "e", Some(true), 100).is_empty());
        assert_eq!(seqs(&r.message(msg(5), 100)), vec![5]);
    }

    #[test]
    fn unrecovered_gap_is_paged_with_live_messages_held_back() {
        let mut r = Room::default();
        r.joined(2, "e", None, 100);
        let out = r.joined(10, "e", Some(false), 100);
        assert_eq!(out, vec![Out::FetchAfter(2)]);
        assert!(r.message(msg(11), 100).is_empty(), "held during the fill");
        let out = r.page(vec![msg(3), msg(4), msg(5)], true, 100);
        assert_eq!(seqs(&out), vec![3, 4, 5]);
        assert_eq!(out.last(), Some(&Out::FetchAfter(5)));
        // The last page overlaps the held live message: each seq once.
        let out = r.page((6..=11).map(msg).collect(), false, 100);
        assert_eq!(seqs(&out), vec![6, 7, 8, 9, 10, 11]);
        assert_eq!(seqs(&r.message(msg(12), 100)), vec![12]);
    }

    #[test]
    fn gap_past_the_bound_is_reported() {
        let mut r = Room::default();
        r.joined(2, "e", None, 5);
        let out = r.joined(10, "e", Some(false), 5);
        assert_eq!(out, vec![Out::Gap { first: 3, last: 10 }]);
        assert_eq!(seqs(&r.message(msg(11), 5)), vec![11]);
    }

    #[test]
    fn history_short_of_the_target_reports_the_rest() {
        let mut r = Room::default();
        r.joined(2, "e", None, 100);
        r.joined(6, "e", Some(false), 100);
        let out = r.page(vec![msg(3), msg(5)], false, 100);
        assert_eq!(
            out,
            vec![
                Out::Deliver(msg(3)),
                Out::Gap { first: 4, last: 4 },
                Out::Deliver(msg(5)),
                Out::Gap { first: 6, last: 6 },
            ]
        );
    }

    #[test]
    fn new_epoch_restarts_from_zero() {
        let mut r = Room::default();
        r.joined(40, "old", None, 100);
        let out = r.joined(2, "new", Some(false), 100);
        assert_eq!(
            out,
            vec![
                Out::EpochChanged {
                    epoch: "new".into()
                },
                Out::FetchAfter(0)
            ]
        );
        assert_eq!(seqs(&r.page(vec![msg(1), msg(2)], false, 100)), vec![1, 2]);
    }

    #[test]
    fn a_skipped_live_seq_is_paged() {
        let mut r = Room::default();
        r.joined(1, "e", None, 100);
        assert_eq!(r.message(msg(4), 100), vec![Out::FetchAfter(1)]);
        assert_eq!(
            seqs(&r.page(vec![msg(2), msg(3)], false, 100)),
            vec![2, 3, 4]
        );
    }

    #[test]
    fn a_disconnect_abandons_the_fill_and_resumes_from_last() {
        let mut r = Room::default();
        r.joined(1, "e", None, 100);
        r.joined(9, "e", Some(false), 100);
        r.page(vec![msg(2), msg(3)], true, 100);
        r.disconnected();
        assert_eq!(r.resume_point(), (Some(3), Some("e".into())));
        assert_eq!(r.joined(9, "e", Some(true), 100), vec![]);
        assert_eq!(seqs(&r.message(msg(4), 100)), vec![4]);
    }
}
