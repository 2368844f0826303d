//! The committed messages that are in the log but not yet in the indexes.
//!
//! The writer commits new messages to the append-only `log` table and
//! writes them to the room and sender indexes later, many commits at once
//! (see `tables::LOG`). Until then they are here too, so reads see every
//! committed message. This module owns that in-memory copy; it does no I/O
//! and never decides when to flush.
//!
//! Invariants:
//! - Only the writer changes it, and only after the commit it reflects.
//! - A message is here before it is delivered or acknowledged, and leaves
//!   only after the commit that put it in the indexes.
//! - A reader takes its copy of this *before* it begins its read
//!   transaction. Then every message committed before the read began is in
//!   one of the two: if the writer removed it from here first, the commit
//!   that indexed it came before the removal, hence before the transaction.
//!   Per room, what is here is a contiguous run of seqs newer than every
//!   indexed one, so the union of the two is gap-free.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use serde_json::value::RawValue;

/// A committed message waiting to be indexed.
#[derive(Debug)]
pub struct Logged {
    pub seq: u64,
    pub ts: u64,
    pub from: Arc<str>,
    pub body: Box<RawValue>,
}

/// Per room, its unindexed messages in increasing seq.
type Rooms = HashMap<Arc<str>, Vec<Arc<Logged>>>;

#[derive(Debug, Default)]
pub struct Unindexed {
    rooms: RwLock<Rooms>,
}

impl Unindexed {
    /// After a commit: forget everything if that commit indexed it all,
    /// then add the commit's new messages, which must be in commit order.
    /// Readers see both changes at once.
    pub fn committed<'a>(
        &self,
        indexed_all: bool,
        fresh: impl IntoIterator<Item = (&'a Arc<str>, &'a Arc<Logged>)>,
    ) {
        let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
        // The old map is dropped after the lock is released.
        let old = if indexed_all {
            std::mem::take(&mut *rooms)
        } else {
            Rooms::new()
        };
        for (room, msg) in fresh {
            match rooms.get_mut(room) {
                Some(list) => list.push(msg.clone()),
                None => {
                    rooms.insert(room.clone(), vec![msg.clone()]);
                }
            }
        }
        drop(rooms);
        drop(old);
    }

    /// Replaces everything with `msgs`, which must be in commit order: after
    /// the writer re-opened the file, what its log holds.
    pub fn replace(&self, msgs: Vec<(Arc<str>, Arc<Logged>)>) {
        let mut fresh = Rooms::new();
        for (room, msg) in msgs {
            fresh.entry(room).or_default().push(msg);
        }
        let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
        let old = std::mem::replace(&mut *rooms, fresh);
        drop(rooms);
        drop(old);
    }

    /// How many messages it holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        let rooms = self.rooms.read().unwrap_or_else(PoisonError::into_inner);
        rooms.values().map(Vec::len).sum()
    }

    /// The room's newest unindexed seq.
    pub fn last_seq(&self, room: &str) -> Option<u64> {
        let rooms = self.rooms.read().unwrap_or_else(PoisonError::into_inner);
        rooms.get(room).and_then(|l| l.last()).map(|m| m.seq)
    }

    /// Up to `limit` of the room's unindexed messages with seq in
    /// `[low, high)`: the oldest ones when `oldest`, else the newest, in
    /// increasing seq either way.
    pub fn range(
        &self,
        room: &str,
        low: u64,
        high: u64,
        limit: usize,
        oldest: bool,
    ) -> Vec<Arc<Logged>> {
        let rooms = self.rooms.read().unwrap_or_else(PoisonError::into_inner);
        let Some(list) = rooms.get(room) else {
            return Vec::new();
        };
        let start = list.partition_point(|m| m.seq < low);
        let end = list.partition_point(|m| m.seq < high);
        let span = list.get(start..end).unwrap_or_default();
        let take = span.len().min(limit);
        let chosen = if oldest {
            span.get(..take)
        } else {
            span.get(span.len() - take..)
        };
        chosen.unwrap_or_default().to_vec()
    }

    /// Every unindexed message `user` sent, with its room.
    pub fn by_user(&self, user: &str) -> Vec<(Arc<str>, Arc<Logged>)> {
        let rooms = self.rooms.read().unwrap_or_else(PoisonError::into_inner);
        rooms
            .iter()
            .flat_map(|(room, list)| {
                list.iter()
                    .filter(|m| &*m.from == user)
                    .map(move |m| (room.clone(), m.clone()))
            })
            .collect()
    }

    /// Calls `f` with each room and its unindexed messages (in increasing
    /// seq), rooms in name order. For the writer's index flush.
    pub fn for_each_room<E>(
        &self,
        mut f: impl FnMut(&str, &[Arc<Logged>]) -> Result<(), E>,
    ) -> Result<(), E> {
        let rooms = self.rooms.read().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<&Arc<str>> = rooms.keys().collect();
        names.sort_unstable();
        for name in names {
            f(name, rooms.get(name).map(Vec::as_slice).unwrap_or_default())?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn msg(seq: u64, from: &str) -> Arc<Logged> {
        Arc::new(Logged {
            seq,
            ts: seq,
            from: Arc::from(from),
            body: RawValue::from_string("1".into()).unwrap(),
        })
    }

    #[test]
    fn ranges_pick_the_oldest_or_newest_and_a_full_index_clears_it() {
        let u = Unindexed::default();
        let room: Arc<str> = Arc::from("r");
        let msgs: Vec<_> = (5..=9)
            .map(|s| msg(s, if s % 2 == 0 { "a" } else { "b" }))
            .collect();
        u.committed(false, msgs.iter().map(|m| (&room, m)));
        let seqs = |v: Vec<Arc<Logged>>| v.iter().map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!(u.last_seq("r"), Some(9));
        assert_eq!(u.last_seq("other"), None);
        assert_eq!(seqs(u.range("r", 0, u64::MAX, 2, true)), [5, 6]);
        assert_eq!(seqs(u.range("r", 0, u64::MAX, 2, false)), [8, 9]);
        assert_eq!(seqs(u.range("r", 6, 9, 10, true)), [6, 7, 8]);
        assert_eq!(seqs(u.range("r", 10, 20, 10, true)), Vec::<u64>::new());
        assert_eq!(u.by_user("a").len(), 2);
        let later = [msg(10, "a")];
        u.committed(true, later.iter().map(|m| (&room, m)));
        assert_eq!(seqs(u.range("r", 0, u64::MAX, 10, true)), [10]);
    }
}
