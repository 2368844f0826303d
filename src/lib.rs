//! Switchboard: a TLS WebSocket chat gateway with durable history.
//!
//! # Layout
//! - [`config`]: every limit, with defaults; merged from file, env and flags.
//! - [`server`]: [`server::run`], the server's lifetime (start, drain, stop).
//! - [`gateway`]: TCP accept, TLS, HTTP upgrade, connection limits.
//! - [`drain`]: draining a node: readiness off, sessions closed spread over a window.
//! - [`demo`]: the demo chat page on the client port (`GET /`).
//! - [`session`]: one task per client: requests, replies, writes.
//! - [`state`]: [`state::ServerState`], the handles every connection shares.
//! - [`close`]: why a session ended, as a close code and a metrics label.
//! - [`delivery`]: pre-framed frames and the per-session outbox they travel in.
//! - [`hub`]: rooms, presence, the session registry and fan-out of committed messages.
//! - [`handoff`]: the embedded store writer's commits handed to the delivery task on the runtime.
//! - [`history`]: the history contract ([`history::Backend`]) and the types both backends share.
//! - [`store`]: redb history with a group-committing writer thread (a backend).
//! - [`cluster`]: cluster mode: history in NATS JetStream (a backend), fan-out between nodes.
//! - [`backend`]: [`backend::History`], this node's backend, chosen at start.
//! - [`tls`]: rustls configuration and development certificates.
//! - [`net`]: the stream under a session, holding the upgrade's reply until the first frames join it.
//! - [`glob`]: the room-name glob of grants and retention rules.
//! - [`metrics`]: lock-free counters, gauges and histograms, with their Prometheus names.
//! - [`admin`]: the internal HTTP listener: health, `/metrics`, admin API, dashboard.
//!
//! Wire types live in the `protocol` crate, never here. No two modules
//! import each other, directly or through others (`tests/it/module_graph.rs`).

pub mod admin;
pub mod auth;
pub mod backend;
pub mod close;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod drain;
pub mod gateway;
pub mod glob;
pub mod handoff;
pub mod history;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod tls;

pub use config::Config;
pub use server::{Listeners, Server, ServerError, run};
