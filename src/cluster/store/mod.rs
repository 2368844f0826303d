//! The cluster's history in NATS JetStream: a backend of the history
//! contract (`crate::history::Backend`), a peer of the embedded redb store.
//! Append and learn the seq once JetStream acknowledged it; read a room by
//! seq; erase and export a user. It must not know the hub or sessions: it
//! hands commits to a [`CommitSink`].
//!
//! Layout: one stream (`cluster.stream`, subjects `<stream>.m.>`), one
//! JetStream message per chat message on its room's subject
//! ([`subjects::messages`]), the body JSON as payload, the room seq, sender
//! and time in headers ([`wire`]); idempotency keys in a KV bucket
//! ([`keys`]).
//!
//! Invariants:
//! - Per room, seq is dense: the [`writer`] publishes each room's queued
//!   appends as one atomic batch expecting the room subject's last stream
//!   seq; a node that lost the race re-reads the room's tail and numbers
//!   again. The stream never holds two messages of a room with one seq.
//! - Durable before visible: the [`CommitSink`] and the reply see a message
//!   only after JetStream's ack (after quorum with replicas).
//! - A publish whose outcome is unknown (no ack in time) is never answered
//!   "not stored" without reading the room after the expected position;
//!   until it can, the append stays unanswered (see [`writer`]).
//!
//! Reads, O(log n) round trips and O(limit) messages: every seq from 1 to
//! the room's latest is an entry (an erased one is absent from the stream
//! and read back with its body `None`), so a page is a range of seqs
//! computed from the latest. The first message of the range is found by a
//! binary search over stream seqs with direct gets of "the room's next
//! message from here" (its room seq is a header); the range then comes in
//! batched direct gets (nats-server ≥ 2.11). Direct gets may be answered by
//! a replica that lags the leader by a moment: a read right after an ack on
//! another node may miss the newest messages, never misorder them.
//!
//! Erasure: JetStream cannot edit a message, so erasing deletes it (the
//! server overwrites its bytes) after publishing a tombstone on the room's
//! `<subject>.e` holding only its seq, so a room whose newest messages are
//! erased keeps its latest seq (a new message never reuses an erased seq).
//! A read returns an erased seq with body `None`, an empty sender and time
//! 0: they go with the body. An export lists stored messages only.
//! Erasure and export scan the whole stream: O(stream), in batched direct
//! gets.
//!
//! The epoch is the stream name and its creation time: the same on every
//! node, new when the stream is deleted and made again.

mod keys;
mod wire;
mod writer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::subjects;
use crate::config::ClusterConfig;
use crate::history::{
    Append, AppendError, Backend, CommitSink, NotWritable, Page, ReadError, StoreClosed,
    StoredMessage, TryAppendError, enqueue, page::Window, try_enqueue,
};
use crate::store::StoreOptions;

pub use keys::bucket_key as idempotency_bucket_key;
pub use wire::GetError;

/// JetStream's de-duplication window of the stream: long enough for any
/// retry of a publish whose ack was lost (the writer retries within
/// seconds), short enough to bound the server's memory of message ids.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The most messages nats-server takes in one atomic batch (its default
/// limit): a larger `cluster.max_batch` is cut to it.
const ATOMIC_BATCH_MAX: usize = 1000;

/// Messages one batched direct get asks for while scanning the stream.
const SCAN_BATCH: usize = 256;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ClusterStoreError {
    #[error("cannot create or bind the JetStream stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot create or bind the KV bucket {bucket}")]
    Bucket {
        bucket: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the JetStream stream {0} does not allow atomic batch publish (nats-server 2.12 or newer is needed)"
    )]
    NoAtomicPublish(String),
}

/// What the handle, the writer and the reads share.
struct Shared {
    client: async_nats::Client,
    stream: stream::Stream<()>,
    name: String,
    keys: keys::Keys,
    timeout: Duration,
    retry: Duration,
    max_batch: usize,
    /// Most rooms whose tail the writer remembers while they are idle (the
    /// append queue's capacity).
    max_rooms: usize,
    /// Atomic batches this node has in flight (nats-server bounds them per
    /// stream, for every node together).
    batches: Semaphore,
    healthy: AtomicBool,
    commits: AtomicU64,
    failed_commits: AtomicU64,
    /// Bytes of queued appends: taken by senders, given back by the writer
    /// once it has answered them.
    queue_bytes: Arc<Semaphore>,
    queue_bytes_total: usize,
    /// Makes message and batch ids unique: this handle's random prefix and
    /// a counter.
    id_prefix: String,
    ids: AtomicU64,
}

impl Shared {
    fn next_id(&self) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.id_prefix)
    }

    /// Connected, and no publish failed since the stream last answered.
    fn writable(&self) -> bool {
        self.connected() && self.healthy.load(Ordering::Relaxed)
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn subject(&self, room: &str) -> String {
        subjects::messages(&self.name, room)
    }

    fn tombstones(&self, room: &str) -> String {
        format!("{}.e", self.subject(room))
    }

    async fn direct_next(&self, subject: &str, from: u64) -> Result<Option<wire::Found>, GetError> {
        let get = self
            .stream
            .direct_get_builder()
            .next_by_subject(subject)
            .sequence(from.max(1))
            .send();
        let got = tokio::time::timeout(self.timeout, get)
            .await
            .map_err(|_| GetError::TimedOut)?;
        wire::found(got)?.map(wire::decode).transpose()
    }

    async fn direct_last(&self, subject: &str) -> Result<Option<(u64, u64)>, GetError> {
        let get = self.stream.direct_get_last_for_subject(subject);
        let got = tokio::time::timeout(self.timeout, get)
            .await
            .map_err(|_| GetError::TimedOut)?;
        let Some(m) = wire::found(got)? else {
            return Ok(None);
        };
        // A message without a seq is not ours: never number from it.
        let seq = m
            .headers
            .get(wire::SEQ)
            .and_then(|v| v.as_str().parse().ok())
            .ok_or(GetError::Foreign(m.sequence))?;
        Ok(Some((seq, m.sequence)))
    }

    /// The room's tail: its latest seq (erased ones included) and the stream
    /// seq of its last stored message (0 when none).
    async fn tail(&self, room: &str) -> Result<writer::Tail, GetError> {
        let (subject, tombstones) = (self.subject(room), self.tombstones(room));
        let (main, tomb) = tokio::join!(self.direct_last(&subject), self.direct_last(&tombstones));
        let (main_seq, stream_seq) = main?.unwrap_or((0, 0));
        let tomb_seq = tomb?.map_or(0, |(seq, _)| seq);
        Ok(writer::Tail {
            seq: main_seq.max(tomb_seq),
            stream_seq,
            erased_up_to: tomb_seq,
        })
    }

    /// The stream seq from which the room's messages with seq ≥ `lo` start:
    /// the smallest `x` whose next room message has seq ≥ `lo`. O(log n)
    /// direct gets.
    async fn locate(&self, subject: &str, lo: u64, last_stream: u64) -> Result<u64, GetError> {
        let Some(first) = self.direct_next(subject, 1).await? else {
            return Ok(last_stream.saturating_add(1));
        };
        if first.message.seq >= lo {
            return Ok(first.stream_seq);
        }
        let (mut low, mut high) = (first.stream_seq + 1, last_stream.max(first.stream_seq + 1));
        while low < high {
            let mid = low + (high - low) / 2;
            match self.direct_next(subject, mid).await? {
                Some(m) if m.message.seq < lo => low = m.stream_seq + 1,
                Some(_) => high = mid,
                None => high = mid,
            }
        }
        Ok(low)
    }

    /// Every stored message matching `filter` from stream seq `from` on,
    /// calling `f` with each, in stream order, up to `limit`; stops early
    /// when `f` returns false.
    async fn scan(
        &self,
        filter: &str,
        mut from: u64,
        limit: usize,
        mut f: impl FnMut(async_nats::jetstream::message::StreamMessage) -> bool,
    ) -> Result<(), GetError> {
        let mut left = limit;
        while left > 0 {
            let (msgs, more) = wire::get_batch(
                &self.client,
                &self.name,
                filter,
                from,
                left.min(SCAN_BATCH),
                self.timeout,
            )
            .await?;
            let Some(last) = msgs.last().map(|m| m.sequence) else {
                return Ok(());
            };
            left = left.saturating_sub(msgs.len());
            for m in msgs {
                if !f(m) {
                    return Ok(());
                }
            }
            if !more {
                return Ok(());
            }
            from = last + 1;
        }
        Ok(())
    }

    /// The room's entries with seq in `[lo, hi]` (`hi` at most its latest):
    /// stored ones as stored, erased ones (absent below the newest stored
    /// one, or below the newest tombstone) with body `None`.
    async fn range(
        &self,
        room: &str,
        lo: u64,
        hi: u64,
        tail: writer::Tail,
    ) -> Result<Vec<StoredMessage>, GetError> {
        if lo > hi {
            return Ok(Vec::new());
        }
        let subject = self.subject(room);
        let start = self.locate(&subject, lo, tail.stream_seq).await?;
        let want = usize::try_from(hi - lo + 1).unwrap_or(usize::MAX);
        let mut found: BTreeMap<u64, StoredMessage> = BTreeMap::new();
        let mut bad = None;
        self.scan(&subject, start, want, |m| match wire::decode(m) {
            Ok(f) if f.message.seq > hi => false,
            Ok(f) => {
                found.insert(f.message.seq, f.message);
                true
            }
            Err(e) => {
                bad = Some(e);
                false
            }
        })
        .await?;
        if let Some(e) = bad {
            return Err(e);
        }
        let newest = found
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(tail.erased_up_to.min(hi));
        let mut out = Vec::with_capacity(want.min(found.len() + 16));
        for seq in lo..=newest {
            out.push(found.remove(&seq).unwrap_or(StoredMessage {
                seq,
                from: String::new(),
                ts: 0,
                body: None,
            }));
        }
        Ok(out)
    }
}

/// The writer of an opened store, not yet running.
pub struct Unstarted {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Append>,
    finished: CancellationToken,
}

impl Unstarted {
    /// Starts the writer on `tracker`, handing commits to `sink`; it stops
    /// at `stop`, after answering every append already queued.
    pub fn start(self, sink: Arc<dyn CommitSink>, tracker: &TaskTracker, stop: CancellationToken) {
        writer::start(self.shared, sink, self.rx, tracker, stop, self.finished);
    }
}

/// A cheap, cloneable handle on the cluster's history.
#[derive(Clone)]
pub struct JetStreamStore {
    tx: mpsc::Sender<Append>,
    shared: Arc<Shared>,
    epoch: Arc<str>,
    /// Cancelled when the writer has answered everything and exited.
    finished: CancellationToken,
}

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// A read that NATS did not answer: it may succeed later.
fn cluster(e: impl std::error::Error + Send + Sync + 'static) -> ReadError {
    ReadError::Unavailable(Box::new(e))
}

impl JetStreamStore {
    /// Creates (or binds) the stream and the key bucket. Reads work at
    /// once; appends wait in the queue until [`Unstarted::start`] starts the
    /// writer with its commit sink (which may itself read this store).
    pub async fn open(
        client: async_nats::Client,
        config: &ClusterConfig,
        opts: &StoreOptions,
    ) -> Result<(JetStreamStore, Unstarted), ClusterStoreError> {
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(timeout);
        let name = config.stream.clone();
        let stream_config = stream::Config {
            name: name.clone(),
            subjects: vec![subjects::messages_wildcard(&name)],
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            allow_direct: true,
            allow_atomic_publish: true,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        // NATS may still be electing its JetStream leader when nodes start
        // (a compose or Kubernetes start): ask again until `start_timeout_ms`.
        let give_up = tokio::time::Instant::now() + Duration::from_millis(config.start_timeout_ms);
        let created = loop {
            match js.get_or_create_stream(stream_config.clone()).await {
                Ok(created) => break created,
                Err(source) if tokio::time::Instant::now() < give_up => {
                    tracing::warn!(error = %source, stream = %name, "JetStream not ready; asking again");
                    tokio::time::sleep(opts.retry_interval).await;
                }
                Err(source) => {
                    return Err(ClusterStoreError::Stream {
                        stream: name.clone(),
                        source,
                    });
                }
            }
        };
        let info = created.cached_info().clone();
        if !info.config.allow_atomic_publish {
            return Err(ClusterStoreError::NoAtomicPublish(name));
        }
        let epoch = format!("{name}-{:x}", info.created.unix_timestamp_nanos());
        let bucket = subjects::keys_bucket(&name);
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    max_age: opts.idempotency_ttl,
                    storage: stream::StorageType::File,
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| ClusterStoreError::Bucket {
                    bucket: bucket.clone(),
                    source: Box::new(e),
                })?,
        };
        let stream = js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| ClusterStoreError::Bucket {
                bucket: name.clone(),
                source: Box::new(e),
            })?;
        // A reservation is stale once its owner had time for a publish and
        // its ack, and for recording the key, several times over.
        let stale = timeout.saturating_mul(4);
        let queue_bytes_total = opts.queue_bytes.clamp(1, Semaphore::MAX_PERMITS);
        let shared = Arc::new(Shared {
            client,
            stream,
            name,
            keys: keys::Keys::new(kv, timeout, stale),
            timeout,
            retry: opts.retry_interval,
            max_batch: config.max_batch.clamp(1, ATOMIC_BATCH_MAX),
            max_rooms: opts.queue_capacity.max(1),
            batches: Semaphore::new(config.atomic_batches_in_flight.max(1)),
            healthy: AtomicBool::new(true),
            commits: AtomicU64::new(0),
            failed_commits: AtomicU64::new(0),
            queue_bytes: Arc::new(Semaphore::new(queue_bytes_total)),
            queue_bytes_total,
            id_prefix: format!("{:016x}", rand::random::<u64>()),
            ids: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(opts.queue_capacity.max(1));
        let finished = CancellationToken::new();
        let unstarted = Unstarted {
            shared: shared.clone(),
            rx,
            finished: finished.clone(),
        };
        let store = JetStreamStore {
            tx,
            shared,
            epoch: Arc::from(epoch),
            finished,
        };
        Ok((store, unstarted))
    }

    /// Waits until the writer has answered every append and exited.
    pub async fn closed(&self) {
        self.finished.cancelled().await;
    }

    async fn by_user(&self, user: &str) -> Result<BTreeMap<(String, u64), wire::Found>, GetError> {
        let prefix = format!("{}.m.", self.shared.name);
        let mut out = BTreeMap::new();
        self.shared
            .scan(
                &subjects::messages_wildcard(&self.shared.name),
                1,
                usize::MAX,
                |m| {
                    // Tombstones (`<subject>.e`) hold no sender.
                    let Some(token) = m.subject.strip_prefix(prefix.as_str()) else {
                        return true;
                    };
                    if token.contains('.') {
                        return true;
                    }
                    let Some(room) = subjects::room_from_token(token) else {
                        return true;
                    };
                    if let Ok(f) = wire::decode(m)
                        && f.message.from == user
                    {
                        out.insert((room, f.message.seq), f);
                    }
                    true
                },
            )
            .await?;
        Ok(out)
    }
}

impl Backend for JetStreamStore {
    /// Queues an append, waiting for room in the queue; the result arrives
    /// on `append.reply` after JetStream's ack.
    async fn append(&self, append: Append) -> Result<(), StoreClosed> {
        let (bytes, total) = (&self.shared.queue_bytes, self.shared.queue_bytes_total);
        enqueue(bytes, total, &self.tx, append, |a| a).await
    }

    /// Queues an append if there is room now.
    fn try_append(&self, append: Append) -> Result<(), TryAppendError> {
        let (bytes, total) = (&self.shared.queue_bytes, self.shared.queue_bytes_total);
        try_enqueue(bytes, total, &self.tx, append, |a| a)
    }

    /// The stream's lifetime: its name and creation time.
    fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Whether appends can be stored now: connected to NATS, and the last
    /// publish did not fail for want of NATS or JetStream.
    fn writable(&self) -> Result<(), NotWritable> {
        if self.tx.is_closed() {
            Err(NotWritable::WriterStopped)
        } else if !self.shared.writable() {
            Err(NotWritable::Failing {
                why: "the cluster's message store (NATS JetStream) is unreachable",
            })
        } else {
            Ok(())
        }
    }

    /// Publishes JetStream acknowledged.
    fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Publishes that failed or whose outcome was unknown, retries included.
    fn failed_commits(&self) -> u64 {
        self.shared.failed_commits.load(Ordering::Relaxed)
    }

    /// The room's latest seq (an erased one counts); 0 when it has none.
    async fn latest_seq(&self, room: &str) -> Result<u64, ReadError> {
        Ok(self.shared.tail(room).await.map_err(cluster)?.seq)
    }

    async fn page(&self, room: &str, window: Window) -> Result<Page, ReadError> {
        let tail = self.shared.tail(room).await.map_err(cluster)?;
        let (range, more) = window.dense(tail.seq);
        let messages = match range {
            Some((lo, hi)) => self
                .shared
                .range(room, lo, hi, tail)
                .await
                .map_err(cluster)?,
            None => Vec::new(),
        };
        Ok(Page { messages, more })
    }

    /// Every message `user` sent, as (room, message), by room then seq. Scans
    /// the whole stream.
    async fn messages_by_user(
        &self,
        user: &str,
    ) -> Result<Vec<(String, StoredMessage)>, ReadError> {
        let found = self.by_user(user).await.map_err(cluster)?;
        Ok(found
            .into_iter()
            .map(|((room, _), f)| (room, f.message))
            .collect())
    }

    /// Erases every message `user` sent: the body, sender and time go, the
    /// seq stays. Returns how many were erased.
    async fn erase_user(&self, user: &str) -> Result<u64, AppendError> {
        let unavailable = AppendError::Unavailable {
            retry_after: self.shared.retry,
        };
        let found = self.by_user(user).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot scan the cluster's history to erase a user");
            unavailable.clone()
        })?;
        let js = jetstream::new(self.shared.client.clone());
        let mut rooms: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for ((room, _), f) in found {
            rooms.entry(room).or_default().push(f.stream_seq);
        }
        let mut erased = 0;
        for (room, stream_seqs) in rooms {
            // The tombstone first, holding the room's latest seq: it must
            // survive the deletion of the room's newest messages.
            let tombstone = async {
                let tail = self.shared.tail(&room).await.ok()?;
                let mut h = async_nats::HeaderMap::new();
                h.insert(wire::SEQ, tail.seq.to_string().as_str());
                js.publish_with_headers(self.shared.tombstones(&room), h, bytes::Bytes::new())
                    .await
                    .ok()?
                    .await
                    .ok()
            };
            if tokio::time::timeout(self.shared.timeout, tombstone)
                .await
                .ok()
                .flatten()
                .is_none()
            {
                return Err(unavailable);
            }
            for stream_seq in stream_seqs {
                match self.shared.stream.delete_message(stream_seq).await {
                    Ok(_) => erased += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot delete an erased message");
                        return Err(unavailable);
                    }
                }
            }
        }
        Ok(erased)
    }
}
