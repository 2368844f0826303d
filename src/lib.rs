//! Switchboard: a TLS WebSocket chat gateway with durable history.
//!
//! # Layout
//! - [`config`]: every limit, with defaults; merged from file, env and flags.
//! - [`server`]: [`server::run`], the server's lifetime (start, drain, stop).
//! - [`gateway`]: TCP accept, TLS, HTTP upgrade, connection limits.
//! - [`demo`]: the demo chat page on the client port (`GET /`).
//! - [`session`]: one task per client: requests, replies, its outbox.
//! - [`hub`]: rooms, presence and fan-out of committed messages.
//! - [`store`]: redb history with a group-committing writer thread.
//! - [`tls`]: rustls configuration and development certificates.
//! - [`net`]: the TCP socket under a stream (`TCP_CORK` for the first replies).
//! - [`metrics`]: lock-free counters, gauges and histograms, with their Prometheus names.
//! - [`admin`]: the internal HTTP listener: health, `/metrics`, admin API, dashboard.
//!
//! Wire types live in the `protocol` crate, never here.

pub mod admin;
pub mod auth;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;

pub use config::Config;
pub use server::{Listeners, Server, ServerError, run};
