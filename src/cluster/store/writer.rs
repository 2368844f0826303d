//! The writer: turns queued appends into atomic publishes, one room at a
//! time per room, rooms in parallel.
//!
//! The dispatcher task owns each room's queue and cached tail (its latest
//! seq and the stream seq of its last message). A room with queued appends
//! and no publish in flight gets one group task: up to `cluster.max_batch`
//! appends, numbered from the tail, published as one atomic batch expecting
//! the tail's stream seq (`Nats-Expected-Last-Subject-Sequence`). When
//! another node wrote first, JetStream refuses it; the task reads the tail
//! again, numbers again and retries. So a room's messages are stored in
//! seq order with no gap on every node, and the sink sees each room's
//! messages in increasing seq (one group of a room at a time).
//!
//! A publish with no ack in time may be stored. The task then reads the
//! room's message right after the expected position: ours (its
//! `Nats-Msg-Id`) means stored, another's means not stored (ours expected a
//! position that is gone, so it can never be stored later), none means not
//! stored yet and the same publish is sent again (JetStream drops it as a
//! duplicate if the first arrives meanwhile). While NATS cannot be reached
//! the task keeps trying, and the appends stay unanswered; a client sees
//! its ack late, never a false "not stored". At `stop` such appends are
//! dropped unanswered (their reply channels close: the outcome is unknown;
//! a resend with the same idempotency key finds the message if it was
//! stored).
//!
//! Appends that certainly did not reach JetStream (NATS disconnected before
//! the publish, JetStream refused it) are answered
//! `AppendError::Unavailable`, retryable; so is every append that arrives
//! while the store is marked down (after a failed or unknown publish, until
//! the health probe gets an answer from the stream again).
//!
//! It must not read or write anything but its rooms' subjects and the key
//! bucket.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::future::join_all;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Shared;
use super::keys::Reserve;
use super::wire::{self, Outcome, Outgoing};
use crate::history::{Append, AppendError, Appended, CommitSink, Committed, queued_cost};

/// A room's tail as the writer and readers see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tail {
    /// The latest seq, an erased one included.
    pub seq: u64,
    /// The stream seq of its last stored message; 0 when none.
    pub stream_seq: u64,
    /// The seq up to which absent messages are erased ones (the newest
    /// tombstone's).
    pub erased_up_to: u64,
}

/// How many times a publish JetStream refused for a passing reason (too
/// many batches in flight, an incomplete batch, a stream between leaders)
/// is tried again, spread over one request timeout, before its appends are
/// answered `Unavailable`.
const REFUSED_RETRIES: u32 = 3;

type Reply = oneshot::Sender<Result<Appended, AppendError>>;

/// Starts the dispatcher (and its health probe) on `tracker`;
/// `finished` is cancelled when it has answered everything and exited.
pub fn start(
    shared: Arc<Shared>,
    sink: Arc<dyn CommitSink>,
    rx: mpsc::Receiver<Append>,
    tracker: &TaskTracker,
    stop: CancellationToken,
    finished: CancellationToken,
) {
    let groups = tracker.clone();
    let probe_stop = stop.clone();
    let probe = shared.clone();
    tracker.spawn(async move {
        Dispatcher {
            shared,
            sink,
            rooms: HashMap::new(),
            tracker: groups,
            stop,
        }
        .run(rx)
        .await;
        finished.cancel();
    });
    tracker.spawn(probe_health(probe, probe_stop));
}

/// While publishes fail, writes a probe key every retry interval, and marks
/// the store writable again once JetStream takes it (a read would be
/// answered by a stream leader that has lost its quorum).
async fn probe_health(shared: Arc<Shared>, stop: CancellationToken) {
    let probe_key = format!("probe-{}", shared.id_prefix);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(shared.retry) => {}
        }
        if shared.healthy.load(Ordering::Relaxed) || !shared.connected() {
            continue;
        }
        let probe = shared.keys.probe(&probe_key);
        if let Ok(true) = tokio::time::timeout(shared.timeout, probe).await {
            shared.healthy.store(true, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Room {
    queue: VecDeque<Append>,
    busy: bool,
    tail: Option<Tail>,
}

struct Dispatcher {
    shared: Arc<Shared>,
    sink: Arc<dyn CommitSink>,
    rooms: HashMap<Arc<str>, Room>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Dispatcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Arc<str>, Option<Tail>)>();
        let mut receiving = true;
        let mut closing = false;
        let mut busy = 0usize;
        loop {
            if !receiving && busy == 0 {
                break;
            }
            tokio::select! {
                biased;
                Some((room, tail)) = done_rx.recv() => {
                    busy -= 1;
                    if let Some(r) = self.rooms.get_mut(&room) {
                        r.busy = false;
                        r.tail = tail;
                    }
                    busy += self.launch(&room, &done_tx);
                    if self.rooms.len() > self.shared.max_rooms {
                        // Idle rooms' tails are read again when they send.
                        self.rooms.retain(|_, r| r.busy || !r.queue.is_empty());
                    }
                }
                append = rx.recv(), if receiving => match append {
                    Some(a) if !self.shared.writable() => {
                        // Refused at once while NATS or JetStream is down
                        // (the health probe says when it is back).
                        let cost = queued_cost(&a, self.shared.queue_bytes_total);
                        let _ = a.reply.send(Err(AppendError::Unavailable {
                            retry_after: self.shared.retry,
                        }));
                        self.shared.queue_bytes.add_permits(cost as usize);
                    }
                    Some(a) => {
                        let room = a.room.clone();
                        self.rooms.entry(room.clone()).or_default().queue.push_back(a);
                        busy += self.launch(&room, &done_tx);
                    }
                    None => receiving = false,
                },
                () = self.stop.cancelled(), if !closing => {
                    // Takes no more appends; answers what is queued.
                    closing = true;
                    rx.close();
                }
            }
        }
    }

    /// Starts a group for `room` if it has queued appends and none in
    /// flight; returns how many it started.
    fn launch(
        &mut self,
        room: &Arc<str>,
        done: &mpsc::UnboundedSender<(Arc<str>, Option<Tail>)>,
    ) -> usize {
        let Some(r) = self.rooms.get_mut(room) else {
            return 0;
        };
        if r.busy || r.queue.is_empty() {
            return 0;
        }
        let n = r.queue.len().min(self.shared.max_batch);
        let group: Vec<Append> = r.queue.drain(..n).collect();
        r.busy = true;
        let tail = r.tail;
        let shared = self.shared.clone();
        let sink = self.sink.clone();
        let stop = self.stop.clone();
        let done = done.clone();
        let room = room.clone();
        self.tracker.spawn(async move {
            let cost: usize = group
                .iter()
                .map(|a| queued_cost(a, shared.queue_bytes_total) as usize)
                .sum();
            let tail = Group::new(&shared, &*sink, &room, group, &stop)
                .run(tail)
                .await;
            shared.queue_bytes.add_permits(cost);
            let _ = done.send((room, tail));
        });
        1
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One append of a group, on its way to JetStream.
struct Item {
    reply: Reply,
    from: Arc<str>,
    body: Box<RawValue>,
    /// The key's bucket key, while this item holds its reservation.
    key: Option<String>,
    msg_id: String,
    ts: u64,
    /// Later appends of the group with the same key: they get this one's
    /// seq, as duplicates.
    same_key: Vec<Reply>,
}

struct Group<'a> {
    shared: &'a Shared,
    sink: &'a dyn CommitSink,
    room: &'a str,
    subject: String,
    items: Vec<Item>,
    stop: &'a CancellationToken,
}

impl<'a> Group<'a> {
    fn new(
        shared: &'a Shared,
        sink: &'a dyn CommitSink,
        room: &'a str,
        appends: Vec<Append>,
        stop: &'a CancellationToken,
    ) -> Group<'a> {
        let ts = now_ms();
        let mut items: Vec<Item> = Vec::with_capacity(appends.len());
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for a in appends {
            let key = a
                .key
                .as_deref()
                .map(|k| super::keys::bucket_key(room, &a.from, k));
            if let Some(k) = &key
                && let Some(&i) = by_key.get(k)
            {
                items[i].same_key.push(a.reply);
                continue;
            }
            if let Some(k) = &key {
                by_key.insert(k.clone(), items.len());
            }
            items.push(Item {
                reply: a.reply,
                from: a.from,
                body: a.body,
                key,
                msg_id: shared.next_id(),
                ts,
                same_key: Vec::new(),
            });
        }
        Group {
            shared,
            sink,
            room,
            subject: shared.subject(room),
            items,
            stop,
        }
    }

    fn unavailable(&self) -> AppendError {
        AppendError::Unavailable {
            retry_after: self.shared.retry,
        }
    }

    /// Answers every item with `err` and gives their keys back (nothing of
    /// them is stored).
    async fn fail(&mut self, err: AppendError) {
        let keys = &self.shared.keys;
        join_all(
            self.items
                .iter()
                .filter_map(|i| i.key.as_deref())
                .map(|k| keys.release(k)),
        )
        .await;
        for item in self.items.drain(..) {
            for r in item.same_key {
                let _ = r.send(Err(err.clone()));
            }
            let _ = item.reply.send(Err(err.clone()));
        }
    }

    fn mark_down(&self) {
        self.shared.failed_commits.fetch_add(1, Ordering::Relaxed);
        self.shared.healthy.store(false, Ordering::Relaxed);
    }

    /// Publishes the group; returns the room's tail after it, if known.
    async fn run(mut self, tail: Option<Tail>) -> Option<Tail> {
        if !self.shared.writable() {
            self.shared.failed_commits.fetch_add(1, Ordering::Relaxed);
            self.fail(self.unavailable()).await;
            return tail;
        }
        let mut tail = match tail {
            Some(t) => t,
            None => match self.shared.tail(self.room).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a room's tail from JetStream");
                    self.mark_down();
                    self.fail(self.unavailable()).await;
                    return None;
                }
            },
        };
        self.reserve_keys(tail).await;
        if self.items.is_empty() {
            return Some(tail);
        }
        let mut uncertain = false;
        let mut refused = 0;
        loop {
            let msgs: Vec<Outgoing> = self
                .items
                .iter()
                .zip(tail.seq + 1..)
                .map(|(i, seq)| Outgoing {
                    msg_id: i.msg_id.clone(),
                    seq,
                    from: i.from.as_ref().to_owned(),
                    ts: i.ts,
                    key: i.key.clone(),
                    body: bytes::Bytes::copy_from_slice(i.body.get().as_bytes()),
                })
                .collect();
            let started = std::time::Instant::now();
            let outcome = if msgs.len() > 1 {
                let Ok(_permit) = self.shared.batches.acquire().await else {
                    self.fail(AppendError::Closed).await;
                    return None;
                };
                self.publish(&msgs, tail).await
            } else {
                self.publish(&msgs, tail).await
            };
            let stored = match outcome {
                Outcome::Stored { stream_seq, .. } => Some(Some(stream_seq)),
                Outcome::WrongLast if !uncertain => None,
                Outcome::Refused(why) if !uncertain => {
                    self.shared.failed_commits.fetch_add(1, Ordering::Relaxed);
                    refused += 1;
                    if refused > REFUSED_RETRIES {
                        tracing::warn!(why, "JetStream refuses a room's publish");
                        self.mark_down();
                        self.fail(self.unavailable()).await;
                        return None;
                    }
                    tokio::time::sleep(self.shared.timeout / (REFUSED_RETRIES + 1)).await;
                    continue;
                }
                Outcome::NotSent(why) if !uncertain => {
                    tracing::warn!(why, "cannot publish to JetStream");
                    self.mark_down();
                    self.fail(self.unavailable()).await;
                    return Some(tail);
                }
                other => {
                    if let Outcome::Unknown(why) = &other {
                        tracing::warn!(why, "a publish's outcome is unknown; reading it back");
                        self.mark_down();
                    }
                    uncertain = true;
                    match self.resolve(&msgs[0].msg_id, tail.stream_seq).await {
                        Resolved::Ours => Some(None),
                        Resolved::Other => {
                            uncertain = false;
                            None
                        }
                        Resolved::NotYet => {
                            // Not stored yet: the same publish again, after
                            // a pause (JetStream may be electing a leader).
                            tokio::select! {
                                () = self.stop.cancelled() => {}
                                () = tokio::time::sleep(self.shared.retry) => {}
                            }
                            continue;
                        }
                        Resolved::Stopped => {
                            // Outcome unknown: the replies are dropped
                            // unanswered ("the store stopped"), never
                            // answered with an error that says "not stored".
                            self.items.clear();
                            return None;
                        }
                    }
                }
            };
            match stored {
                Some(stream_seq) => {
                    let seq = tail.seq + msgs.len() as u64;
                    self.sink.batch_committed(msgs.len(), started.elapsed());
                    self.committed(tail.seq + 1).await;
                    return stream_seq.map(|stream_seq| Tail {
                        seq,
                        stream_seq,
                        erased_up_to: tail.erased_up_to,
                    });
                }
                None => {
                    // Another node wrote first (a lost race, not a
                    // failure): number again from the tail.
                    let landed = tail.stream_seq.saturating_add(1);
                    match self.shared.tail(self.room).await {
                        Ok(t) => tail = t,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read a room's tail from JetStream");
                            self.mark_down();
                            self.fail(self.unavailable()).await;
                            return None;
                        }
                    }
                    if let Err(e) = self.answer_stored_keys(landed).await {
                        tracing::warn!(error = %e, "cannot read what another node stored");
                        self.mark_down();
                        self.fail(self.unavailable()).await;
                        return None;
                    }
                    if self.items.is_empty() {
                        return Some(tail);
                    }
                }
            }
        }
    }

    async fn publish(&self, msgs: &[Outgoing], tail: Tail) -> Outcome {
        let batch_id = self.shared.next_id();
        wire::publish(
            &self.shared.client,
            &self.subject,
            msgs,
            tail.stream_seq,
            &batch_id,
            self.shared.timeout,
        )
        .await
    }

    /// Reserves the group's keys; answers (and drops) the items whose key
    /// is stored already or held by another writer.
    async fn reserve_keys(&mut self, tail: Tail) {
        let keys = &self.shared.keys;
        let outcomes = join_all(self.items.iter().map(|i| async {
            match &i.key {
                Some(k) => Some(keys.reserve(k, tail.stream_seq).await),
                None => None,
            }
        }))
        .await;
        let items = std::mem::take(&mut self.items);
        for (mut item, outcome) in items.into_iter().zip(outcomes) {
            let answer = match outcome {
                None | Some(Reserve::Reserved) => None,
                Some(Reserve::Done(appended)) => Some(Ok(appended)),
                Some(Reserve::Busy) => Some(Err(self.unavailable())),
                Some(Reserve::Failed(why)) => {
                    tracing::warn!(why, "cannot reserve an idempotency key");
                    Some(Err(self.unavailable()))
                }
                Some(Reserve::Stale { after, revision }) => {
                    let key = item.key.clone().unwrap_or_default();
                    self.take_over(&key, after, revision, tail).await
                }
            };
            match answer {
                None => self.items.push(item),
                Some(result) => {
                    // The key is not this item's to release.
                    item.key = None;
                    for r in item.same_key {
                        let _ = r.send(result.clone());
                    }
                    let _ = item.reply.send(result);
                }
            }
        }
    }

    /// A stale reservation: the message is stored (after stream seq
    /// `after`, carrying the key) or this writer takes the key over.
    async fn take_over(
        &self,
        key: &str,
        after: u64,
        revision: u64,
        tail: Tail,
    ) -> Option<Result<Appended, AppendError>> {
        let mut stored = None;
        let scanned = self
            .shared
            .scan(&self.subject, after.saturating_add(1), usize::MAX, |m| {
                if m.headers.get(wire::KEY).map(|v| v.as_str()) == Some(key) {
                    stored = wire::decode(m).ok();
                    return false;
                }
                true
            })
            .await;
        if let Err(e) = scanned {
            tracing::warn!(error = %e, "cannot look for a stale key's message");
            return Some(Err(self.unavailable()));
        }
        if let Some(f) = stored {
            let (seq, ts) = (f.message.seq, f.message.ts);
            if let Err(why) = self.shared.keys.commit(key, seq, ts).await {
                tracing::warn!(why, "cannot record an idempotency key");
            }
            return Some(Ok(Appended {
                seq,
                ts,
                duplicate: true,
            }));
        }
        if self
            .shared
            .keys
            .take_over(key, revision, tail.stream_seq)
            .await
        {
            None
        } else {
            Some(Err(self.unavailable()))
        }
    }

    /// Answers, as duplicates, the items whose key a message stored from
    /// stream seq `from` on carries, and drops them from the group.
    ///
    /// Another writer may have taken such a key's reservation over (it
    /// turned stale while this group's publish was in doubt) and stored
    /// the resend. Every renumbering scans what landed since the position
    /// the lost publish expected, and the next publish expects the tail read
    /// before the scan: so no keyed message is published after one with
    /// its key was stored, whoever stored it.
    async fn answer_stored_keys(&mut self, from: u64) -> Result<(), super::GetError> {
        if self.items.iter().all(|i| i.key.is_none()) {
            return Ok(());
        }
        let mut found: Vec<(String, Appended)> = Vec::new();
        let items = &self.items;
        self.shared
            .scan(&self.subject, from, usize::MAX, |m| {
                let key = m.headers.get(wire::KEY).map(|v| v.as_str().to_owned());
                if let Some(k) = key
                    && items.iter().any(|i| i.key.as_deref() == Some(k.as_str()))
                    && let Ok(f) = wire::decode(m)
                {
                    let (seq, ts) = (f.message.seq, f.message.ts);
                    found.push((
                        k,
                        Appended {
                            seq,
                            ts,
                            duplicate: true,
                        },
                    ));
                }
                true
            })
            .await?;
        for (key, appended) in found {
            let Some(pos) = self
                .items
                .iter()
                .position(|i| i.key.as_deref() == Some(key.as_str()))
            else {
                continue;
            };
            // The key is the other writer's now: this group neither records
            // nor releases it.
            let item = self.items.remove(pos);
            for r in item.same_key {
                let _ = r.send(Ok(appended));
            }
            let _ = item.reply.send(Ok(appended));
        }
        Ok(())
    }

    /// Reads the room's message after `expected_last` until it is known
    /// whether the publish whose first message is `first_id` is stored.
    async fn resolve(&self, first_id: &str, expected_last: u64) -> Resolved {
        loop {
            if self.stop.is_cancelled() {
                return Resolved::Stopped;
            }
            if self.shared.connected() {
                match self
                    .shared
                    .direct_next(&self.subject, expected_last.saturating_add(1))
                    .await
                {
                    Ok(Some(f)) if f.msg_id.as_deref() == Some(first_id) => return Resolved::Ours,
                    Ok(Some(f)) => {
                        tracing::debug!(
                            stream_seq = f.stream_seq,
                            "another message took the position"
                        );
                        return Resolved::Other;
                    }
                    Ok(None) => return Resolved::NotYet,
                    Err(e) => tracing::debug!(error = %e, "cannot read a room back yet"),
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return Resolved::Stopped,
                () = tokio::time::sleep(self.shared.retry) => {}
            }
        }
    }

    /// The group is stored with seqs from `first`: hands it to the sink,
    /// answers it, records its keys.
    async fn committed(&mut self, first: u64) {
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.shared.healthy.store(true, Ordering::Relaxed);
        let msgs: Vec<Committed<'_>> = self
            .items
            .iter()
            .zip(first..)
            .map(|(i, seq)| Committed {
                room: self.room,
                seq,
                ts: i.ts,
                from: &i.from,
                body: &i.body,
            })
            .collect();
        self.sink.committed(&msgs);
        drop(msgs);
        let mut keys = Vec::new();
        for (item, seq) in std::mem::take(&mut self.items).into_iter().zip(first..) {
            let appended = Appended {
                seq,
                ts: item.ts,
                duplicate: false,
            };
            for r in item.same_key {
                let _ = r.send(Ok(Appended {
                    duplicate: true,
                    ..appended
                }));
            }
            let _ = item.reply.send(Ok(appended));
            if let Some(k) = item.key {
                keys.push((k, seq, item.ts));
            }
        }
        let shared = self.shared;
        for result in join_all(
            keys.iter()
                .map(|(k, seq, ts)| shared.keys.commit(k, *seq, *ts)),
        )
        .await
        {
            if let Err(why) = result {
                // The reservation stays pending; a resend takes it over
                // once stale and finds the message by its key.
                tracing::warn!(why, "cannot record an idempotency key");
            }
        }
    }
}

enum Resolved {
    /// Stored.
    Ours,
    /// Another message took the position: not stored, and never will be.
    Other,
    /// Nothing after the position yet: send the same publish again.
    NotYet,
    Stopped,
}
