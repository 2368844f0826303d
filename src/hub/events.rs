//! Presence and typing, batched per room and sent within a delivery budget.
//!
//! It owns the hub's share of the configuration ([`HubOptions`]), the
//! lists of rooms with a pending `presence` or `typing` event, the flush
//! clocks of the fan-out budget, and the encoding of those two events.
//! A join, a leave or a keystroke only records a change here;
//! `Hub::flush_presence` and `Hub::flush_typing` send each listed room one
//! bounded event. It must not change a room's members or users (that is
//! `room.rs` through the hub) and must not tell other nodes anything.
//!
//! Lock order: a dirty list's mutex is taken under a room's map guard
//! (when a room's first change is recorded); a flush takes the list and
//! lets it go before it takes any room's guard, and gives back the rooms
//! it held only after releasing them. Never a room's guard under a list's
//! mutex.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use protocol::ServerFrame;

use crate::config::Config;
use crate::delivery::WireFrame;
use crate::hub::room::{Room, Rooms};

/// The hub's share of the configuration: what bounds presence and typing.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Most names in a `joined` reply and in one `presence` event.
    pub presence_list_max: usize,
    /// Room patterns whose rooms send no `presence` events.
    pub presence_events_off: Vec<String>,
    /// Most names in one `typing` event.
    pub typing_list_max: usize,
    /// Most deliveries of one room's presence events per presence flush,
    /// and of its typing events per typing flush: a room with more
    /// sessions skips flushes in proportion.
    pub presence_fanout_per_flush: usize,
    pub typing_fanout_per_flush: usize,
}

impl HubOptions {
    pub fn from_config(config: &Config) -> HubOptions {
        HubOptions {
            presence_list_max: config.presence_list_max,
            presence_events_off: config.presence_events_off.clone(),
            typing_list_max: config.typing_list_max,
            presence_fanout_per_flush: per_flush(
                config.event_fanout_per_sec,
                config.presence_interval_ms,
            ),
            typing_fanout_per_flush: per_flush(
                config.event_fanout_per_sec,
                config.typing_interval_ms,
            ),
        }
    }

    /// Whether rooms named `room` send `presence` events. Decided once, when
    /// the room is created, so a join pays no pattern match.
    pub(super) fn presence_events(&self, room: &str) -> bool {
        !self
            .presence_events_off
            .iter()
            .any(|p| crate::glob::glob_match(p, room))
    }
}

/// A per-second delivery budget as a per-flush one, at least one session.
fn per_flush(per_sec: u64, interval_ms: u64) -> usize {
    let n = per_sec.saturating_mul(interval_ms) / 1000;
    usize::try_from(n).unwrap_or(usize::MAX).max(1)
}

/// How many flushes an event to `sessions` uses of a `per_flush` budget:
/// the room sends its next event that many flushes later.
fn flushes_for(sessions: usize, per_flush: usize) -> u64 {
    sessions.div_ceil(per_flush.max(1)).max(1) as u64
}

impl Default for HubOptions {
    fn default() -> HubOptions {
        HubOptions::from_config(&Config::default())
    }
}

/// The rooms waiting for their next event of one kind, and the clock of
/// that kind's fan-out budget.
#[derive(Debug, Default)]
struct Listed {
    /// Each room once: it is added when its first change since the last
    /// flush is recorded.
    rooms: Mutex<Vec<Arc<str>>>,
    /// Flushes so far: the clock of the fan-out budget (see
    /// `Room::presence_next`).
    flushes: AtomicU64,
}

impl Listed {
    /// Locks the list; a panic elsewhere cannot leave it inconsistent.
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<str>>> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The rooms waiting for their next `presence` or `typing` event.
#[derive(Debug, Default)]
pub(super) struct Events {
    /// Rooms with presence changes not yet sent.
    presence: Listed,
    /// Rooms where someone typed since the last typing flush.
    typing: Listed,
    pub(super) options: HubOptions,
}

impl Events {
    pub(super) fn new(options: HubOptions) -> Events {
        Events {
            presence: Listed::default(),
            typing: Listed::default(),
            options,
        }
    }

    /// Records that `user`'s presence in `r` changed; lists the room for
    /// the next flush if this is its first change since the last one.
    /// Only the first `presence_list_max` changed users are kept; further
    /// ones mark the batch truncated.
    pub(super) fn presence_changed(&self, r: &mut Room, user: Arc<str>) {
        if !r.presence_events {
            return;
        }
        let changes = r.changes.get_or_insert_with(|| {
            self.presence.lock().push(r.name.clone());
            Box::default()
        });
        if changes.users.len() < self.options.presence_list_max {
            changes.users.insert(user);
        } else if !changes.users.contains(&user) {
            changes.truncated = true;
        }
    }

    /// Adds `user` to the typers of `room`; returns whether it was not there.
    pub(super) fn record_typing(&self, rooms: &Rooms, room: &str, user: &Arc<str>) -> bool {
        let Some(mut entry) = rooms.get_mut(room) else {
            return false;
        };
        let r = entry.value_mut();
        let typers = r.typers.get_or_insert_with(|| {
            self.typing.lock().push(r.name.clone());
            Box::default()
        });
        if typers.contains(user) {
            return false;
        }
        typers.insert(user.clone());
        true
    }

    /// See `Hub::flush_presence`.
    pub(super) fn flush_presence(&self, rooms: &Rooms) -> usize {
        self.flush_listed(
            rooms,
            &self.presence,
            self.options.presence_fanout_per_flush,
            |r| r.changes.is_some(),
            |r| &mut r.presence_next,
            |r| r.flush_presence(),
        )
    }

    /// See `Hub::flush_typing`.
    pub(super) fn flush_typing(&self, rooms: &Rooms) -> usize {
        let list_max = self.options.typing_list_max;
        self.flush_listed(
            rooms,
            &self.typing,
            self.options.typing_fanout_per_flush,
            |r| r.typers.is_some(),
            |r| &mut r.typing_next,
            |r| r.flush_typing(list_max),
        )
    }

    /// One flush of the rooms in `listed`: each room that still has
    /// something `pending` and whose `next` flush has come sends its event;
    /// a room whose last event went to more sessions than `fanout_per_flush`
    /// allows waits out as many flushes (it stays listed). A room emptied
    /// since it was listed is gone, and nobody is left to tell; a room of
    /// that name made since lists itself again and flushes once.
    fn flush_listed(
        &self,
        rooms: &Rooms,
        listed: &Listed,
        fanout_per_flush: usize,
        pending: impl Fn(&Room) -> bool,
        next: impl Fn(&mut Room) -> &mut u64,
        flush: impl Fn(&mut Room),
    ) -> usize {
        let now = listed.flushes.fetch_add(1, Ordering::Relaxed);
        let names = std::mem::take(&mut *listed.lock());
        let mut flushed = 0;
        let mut held = Vec::new();
        for name in names {
            if let Some(mut r) = rooms.get_mut(&name) {
                if !pending(&r) {
                    continue;
                }
                if now < *next(&mut r) {
                    held.push(name);
                    continue;
                }
                *next(&mut r) = now + flushes_for(r.members.len(), fanout_per_flush);
                flush(&mut r);
                flushed += 1;
            }
        }
        listed.lock().extend(held);
        flushed
    }
}

impl Room {
    /// Sends an ephemeral event to every member whose user is not `except`.
    fn broadcast_ephemeral(&self, frame: &ServerFrame, except: &str) {
        let text = Arc::new(WireFrame::json(frame));
        for m in self.members.iter().filter(|m| &*m.user != except) {
            m.outbox.push_ephemeral(&text);
        }
    }

    /// Sends one `presence` event with the room's count and the users who
    /// arrived or went since the last flush. A lone change skips that
    /// user's own sessions, as an unbatched event would; in a batch, users
    /// may see their own name, and clients apply the lists as set additions
    /// and removals either way.
    fn flush_presence(&mut self) {
        let Some(changes) = self.changes.take() else {
            return;
        };
        let truncated = changes.truncated;
        let mut changed: Vec<Arc<str>> = changes.users.into_iter().collect();
        changed.sort_unstable();
        let (mut joined, mut left) = (Vec::new(), Vec::new());
        for user in &changed {
            if self.users.contains_key(user) {
                joined.push(user.to_string());
            } else {
                left.push(user.to_string());
            }
        }
        let except = match changed.as_slice() {
            [one] if !truncated => &**one,
            _ => "",
        };
        let frame = ServerFrame::Presence {
            room: self.name.to_string(),
            count: self.user_count(),
            joined,
            left,
            truncated,
        };
        self.broadcast_ephemeral(&frame, except);
    }

    /// Sends one `typing` event with how many users typed since the last
    /// flush and the first `list_max` of them by name. A lone typer's own
    /// sessions are skipped; several typers see their own names.
    fn flush_typing(&mut self, list_max: usize) {
        let Some(typers) = self.typers.take() else {
            return;
        };
        let mut names: Vec<&Arc<str>> = typers.iter().collect();
        // The first `list_max` by name, without sorting all of them.
        if names.len() > list_max {
            if list_max > 0 {
                names.select_nth_unstable(list_max - 1);
            }
            names.truncate(list_max);
        }
        names.sort_unstable();
        let except = match (typers.len(), names.as_slice()) {
            (1, [one]) => &***one,
            _ => "",
        };
        let frame = ServerFrame::Typing {
            room: self.name.to_string(),
            count: typers.len() as u64,
            users: names.iter().map(|u| u.to_string()).collect(),
        };
        self.broadcast_ephemeral(&frame, except);
    }
}
