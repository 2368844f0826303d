//! The arithmetic of a page of history, computed once for both backends:
//! which seqs a `history` request asks for, and how the messages found
//! become a [`Page`]. It knows nothing of where messages are kept.

use std::collections::BTreeMap;

use super::{Page, StoredMessage};

/// The seqs a request asks for: `[low, high)`, read from `low` upwards
/// when `forward`, else from `high` downwards, at most `limit` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The lowest seq asked for; never 0 (seqs start at 1).
    pub low: u64,
    /// One past the highest seq asked for.
    pub high: u64,
    /// With `after`, a page is the oldest `limit` above it; otherwise the
    /// newest below `before` (or the latest).
    pub forward: bool,
    pub limit: usize,
}

impl Window {
    /// With `before`: the newest `limit` below it. With `after`: the oldest
    /// `limit` above it. With both: the oldest `limit` between them. With
    /// neither: the latest `limit`. `None` when no seq can be in it.
    pub fn new(before: Option<u64>, after: Option<u64>, limit: usize) -> Option<Window> {
        let low = after.map_or(1, |a| a.saturating_add(1)).max(1);
        let high = before.unwrap_or(u64::MAX);
        (low < high).then_some(Window {
            low,
            high,
            forward: after.is_some(),
            limit,
        })
    }

    /// How many messages, nearest the paging start, a backend must find
    /// for [`Window::page`] to know whether there are more.
    pub fn want(&self) -> usize {
        self.limit.saturating_add(1)
    }

    /// The page of `found`: every message the backend found in the window
    /// (at least the [`Window::want`] nearest the paging start, when there
    /// are that many), by seq.
    pub fn page(&self, found: BTreeMap<u64, StoredMessage>) -> Page {
        let more = found.len() > self.limit;
        let mut messages: Vec<StoredMessage> = found.into_values().collect();
        if self.forward {
            messages.truncate(self.limit);
        } else {
            messages.drain(..messages.len() - messages.len().min(self.limit));
        }
        Page { messages, more }
    }

    /// For a backend whose seqs are dense from 1 to `latest`: the seqs of
    /// the page, inclusive (`None` for an empty page), and whether more lie
    /// beyond it in the paging direction.
    pub fn dense(&self, latest: u64) -> (Option<(u64, u64)>, bool) {
        let top = (self.high - 1).min(latest);
        if self.low > top || self.limit == 0 {
            return (None, self.low <= top);
        }
        let span = u64::try_from(self.limit - 1).unwrap_or(u64::MAX);
        if self.forward {
            let hi = top.min(self.low.saturating_add(span));
            (Some((self.low, hi)), hi < top)
        } else {
            let lo = self.low.max(top.saturating_sub(span));
            (Some((lo, top)), lo > self.low)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> StoredMessage {
        StoredMessage {
            seq,
            from: "u".into(),
            ts: 0,
            body: Some("{}".into()),
        }
    }

    /// The page a sparse backend gives when the room holds `seqs`.
    fn sparse(w: &Window, seqs: &[u64]) -> (Vec<u64>, bool) {
        let inside = seqs.iter().filter(|&&s| s >= w.low && s < w.high);
        let nearest: Vec<u64> = if w.forward {
            inside.take(w.want()).copied().collect()
        } else {
            let all: Vec<u64> = inside.copied().collect();
            all[all.len() - all.len().min(w.want())..].to_vec()
        };
        let page = w.page(nearest.into_iter().map(|s| (s, msg(s))).collect());
        (page.messages.iter().map(|m| m.seq).collect(), page.more)
    }

    /// The page a dense backend gives when the room holds 1..=latest.
    fn dense(w: &Window, latest: u64) -> (Vec<u64>, bool) {
        let (range, more) = w.dense(latest);
        (
            range.map_or(Vec::new(), |(lo, hi)| (lo..=hi).collect()),
            more,
        )
    }

    #[test]
    fn both_kinds_of_backend_page_a_dense_room_alike() {
        let edges = [
            None,
            Some(0),
            Some(1),
            Some(2),
            Some(5),
            Some(9),
            Some(10),
            Some(11),
            Some(50),
        ];
        for latest in [0u64, 1, 3, 10] {
            let seqs: Vec<u64> = (1..=latest).collect();
            for before in edges {
                for after in edges {
                    for limit in [0usize, 1, 2, 3, 20] {
                        let Some(w) = Window::new(before, after, limit) else {
                            continue;
                        };
                        assert_eq!(
                            sparse(&w, &seqs),
                            dense(&w, latest),
                            "latest {latest}, before {before:?}, after {after:?}, limit {limit}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_page_is_the_nearest_to_where_it_starts() {
        let w = Window::new(None, None, 2).unwrap();
        assert_eq!(dense(&w, 5), (vec![4, 5], true));
        let w = Window::new(Some(4), None, 2).unwrap();
        assert_eq!(dense(&w, 5), (vec![2, 3], true));
        let w = Window::new(None, Some(3), 5).unwrap();
        assert_eq!(dense(&w, 5), (vec![4, 5], false));
        let w = Window::new(Some(5), Some(1), 2).unwrap();
        assert_eq!(dense(&w, 9), (vec![2, 3], true));
        assert_eq!(sparse(&w, &[1, 3, 4, 9]), (vec![3, 4], false));
    }

    #[test]
    fn an_empty_range_is_no_window() {
        assert_eq!(Window::new(Some(0), None, 5), None);
        assert_eq!(Window::new(Some(1), None, 5), None);
        assert_eq!(Window::new(Some(4), Some(3), 5), None);
        assert_eq!(Window::new(None, Some(u64::MAX), 5), None);
    }
}
