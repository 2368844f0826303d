//! What a backend hands on once a commit is durable: its new messages
//! ([`Committed`], to a [`CommitSink`]) and the replies it owes
//! ([`Replies`]), which must follow the messages.

use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::{AppendError, Appended};

/// A newly committed message, as handed to the [`CommitSink`].
#[derive(Debug, Clone, Copy)]
pub struct Committed<'a> {
    pub room: &'a str,
    pub seq: u64,
    pub ts: u64,
    pub from: &'a str,
    pub body: &'a RawValue,
}

/// Receives what a backend committed, on the backend's writer (a thread
/// or a task).
pub trait CommitSink: Send + Sync + 'static {
    /// Called once per commit that made new messages (never with a
    /// duplicate), after it is durable, with them in commit order: per room,
    /// in strictly increasing seq. Must not block.
    fn committed(&self, msgs: &[Committed<'_>]);

    /// What the writer calls for a commit that made new messages: hands
    /// them over as `committed` does, then completes the commit's `replies`
    /// (acks), which must follow. A sink that delivers elsewhere (another
    /// thread) may carry the replies there and complete them after the
    /// messages; the writer never waits for them.
    fn committed_then(&self, msgs: &[Committed<'_>], replies: Replies) {
        self.committed(msgs);
        replies.send();
    }

    /// Called once per successful commit, before `committed` for its
    /// messages, with the number of operations and the time it took.
    fn batch_committed(&self, _operations: usize, _elapsed: Duration) {}
}

/// Where an append's result goes.
pub type AppendReply = oneshot::Sender<Result<Appended, AppendError>>;

/// A commit's replies (its acks), owed once its messages are handed over.
/// Acks of appends, the common case, cost no allocation of their own; a
/// backend's rarer operations (an erasure, a retention step) add theirs as
/// a closure.
#[derive(Default)]
pub struct Replies {
    acks: Vec<(AppendReply, Appended)>,
    others: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies")
            .field("acks", &self.acks.len())
            .field("others", &self.others.len())
            .finish()
    }
}

impl Replies {
    /// Room for `acks` acks without reallocating.
    pub fn with_capacity(acks: usize) -> Replies {
        Replies {
            acks: Vec::with_capacity(acks),
            others: Vec::new(),
        }
    }

    /// Owes `append` its result.
    pub fn ack(&mut self, reply: AppendReply, done: Appended) {
        self.acks.push((reply, done));
    }

    /// Owes the reply `send` sends.
    pub fn then(&mut self, send: impl FnOnce() + Send + 'static) {
        self.others.push(Box::new(send));
    }

    /// Completes every reply, acks first. One whose requester has gone is
    /// dropped.
    pub fn send(self) {
        for (tx, done) in self.acks {
            let _ = tx.send(Ok(done));
        }
        for send in self.others {
            send();
        }
    }
}
