//! What the hub hands to sessions: a durable commit's messages encoded
//! once, pre-framed WebSocket frames, the deliveries that group one
//! commit's frames for a room, and the bounded per-session outbox they
//! travel through.
//!
//! It sits below both the hub (which frames and pushes) and the session
//! (which drains and writes), and imports neither.

pub mod commit;
pub mod outbox;
pub mod wire;

pub use commit::EncodedCommit;
pub use outbox::{
    Outbox, OutboxReceiver, Outgoing, QueueBounds, QueueTally, TallyBatch, bounded_outbox, outbox,
};
pub use wire::{Delivery, Encoded, WireFrame};
