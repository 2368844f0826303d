//! The state every connection shares: config, hub, store handle, metrics,
//! connection permits, token verifier, limits, the drain request and, in
//! cluster mode, this node's cluster handles.
//!
//! It sits below the gateway, the session and the admin listener, which
//! read it; `server` builds it and wires the parts together. It holds
//! handles only and runs nothing.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::sync::Semaphore;

use crate::auth::Verifier;
use crate::backend::History;
use crate::cluster;
use crate::config::Config;
use crate::drain::Drain;
use crate::hub::Hub;
use crate::limits::Limits;
use crate::metrics::Metrics;

/// Everything sessions share.
pub struct ServerState {
    pub config: Config,
    pub hub: Arc<Hub>,
    /// Where history lives: the embedded store or the cluster's.
    pub store: History,
    pub metrics: Arc<Metrics>,
    /// One permit per open connection.
    pub connection_permits: Arc<Semaphore>,
    pub next_session: AtomicU64,
    /// Checks client tokens; `None` in dev mode.
    pub verifier: Option<Arc<Verifier>>,
    /// Per-IP and per-user connection counts and rate limits.
    pub limits: Limits,
    /// Set when the node drains: the accept loops stop, readiness fails.
    pub drain: Drain,
    /// This node of the cluster; `None` when the server runs alone.
    pub cluster: Option<cluster::Node>,
}
