//! The server's lifetime: start, serve, drain, stop.
//!
//! [`run`] takes listeners that are already bound, so tests can bind
//! `127.0.0.1:0` and need no readiness wait. It owns the task tracker and the
//! shutdown token; every task of the server is spawned on that tracker and
//! watches that token.
//!
//! Start-up order: [`Server::open`] does everything that can fail (config,
//! TLS, token key, the store) before anything listens, so the binary binds
//! and prints its addresses only once the server can serve them.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin;
use crate::auth::{AuthSetupError, Verifier};
use crate::backend::Opened;
use crate::cluster;
use crate::config::{Config, ConfigError};
use crate::drain::{self, Drain};
use crate::gateway;
use crate::handoff;
use crate::history::{CommitSink, Committed, Replies};
use crate::hub::{Hub, HubOptions};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::store::{OpenError, Store};
use crate::tls::{self, TlsError};

pub use crate::state::ServerState;

/// The listeners to serve on, already bound.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Serves `wss://` with the configured certificate.
    pub tls: Option<TcpListener>,
    /// Serves plain `ws://`.
    pub plain: Option<TcpListener>,
    /// Serves the internal HTTP side: health, metrics, admin API, dashboard.
    pub admin: Option<TcpListener>,
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS setup failed")]
    Tls(#[from] TlsError),
    #[error("cannot load the token key")]
    Auth(#[from] AuthSetupError),
    #[error("cannot open the history store")]
    Store(#[from] OpenError),
    #[error("cannot join the cluster")]
    Cluster(#[from] cluster::StartError),
    #[error("the store did not shut down cleanly")]
    StoreShutdown(#[source] crate::store::ShutdownError),
    #[error("cannot set up the fan-out task's wake-up")]
    Fanout(#[source] std::io::Error),
    #[error("a startup task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Serves until `shutdown` resolves, then drains: stops accepting, closes
/// every session with 1001 after its in-flight acks, commits every queued
/// append and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    Server::start(config, listeners)
        .await?
        .serve(shutdown)
        .await
}

/// A started server: its store is open and its listeners are bound, but
/// nothing is accepted until [`Server::serve`].
pub struct Server {
    state: Arc<ServerState>,
    backend: Opened,
    listeners: Listeners,
    tls: Option<Arc<rustls::ServerConfig>>,
    certs: Option<Arc<tls::CertStore>>,
    /// The fan-out task of the embedded store's commits (none in a
    /// cluster, where the bus's delivery task delivers): it runs from the
    /// store's opening to its shutdown, whose end ends it.
    fan_out: TaskTracker,
}

impl Server {
    /// Validates the config, loads TLS and opens the store, for the bound
    /// `listeners`.
    pub async fn start(config: Config, listeners: Listeners) -> Result<Server, ServerError> {
        let with_tls = listeners.tls.is_some();
        Ok(Server::open(config, with_tls).await?.listen_on(listeners))
    }

    /// Validates the config, loads TLS (when `with_tls`) and the token key,
    /// and opens the store: everything that can fail, before any listener
    /// is bound. Then [`Server::listen_on`].
    pub async fn open(config: Config, with_tls: bool) -> Result<Server, ServerError> {
        config.validate()?;
        let (tls, certs) = if with_tls {
            let certs = tls::CertStore::load(&config.tls_cert, &config.tls_key)?;
            (Some(tls::server_config(certs.clone())?), Some(certs))
        } else {
            (None, None)
        };
        let verifier = Verifier::from_config(&config)?.map(Arc::new);
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::with_options(HubOptions::from_config(&config)));
        let permits = Arc::new(Semaphore::new(config.max_connections));
        let fan_out = TaskTracker::new();
        let (backend, node) = match &config.cluster {
            None => {
                let path = config.db_path();
                let opts = config.store_options();
                // Records each commit's duration and size, then hands its
                // messages to the fan-out task, which delivers them through the hub.
                let (queue, task) = handoff::channel(hub.clone(), config.fanout_queue_commits)
                    .map_err(ServerError::Fanout)?;
                fan_out.spawn(task.run());
                let sink = Arc::new(ObservedSink::new(Arc::new(queue), metrics.clone()));
                let store =
                    tokio::task::spawn_blocking(move || Store::open(&path, opts, sink)).await??;
                (Opened::Local(store), None)
            }
            Some(cluster) => {
                let connections: cluster::bus::ConnectionCount = {
                    let permits = permits.clone();
                    let max = config.max_connections;
                    Arc::new(move || (max - permits.available_permits()) as u64)
                };
                let metrics = metrics.clone();
                // The JetStream store's commits go to the bus (to the other
                // nodes, and in seq order to this node's hub), timed on the way.
                let started = cluster::start(
                    cluster,
                    &config.store_options(),
                    hub.clone(),
                    connections,
                    move |bus| Arc::new(ObservedSink::new(bus, metrics)),
                )
                .await?;
                let node = started.node.clone();
                (Opened::Cluster(started), Some(node))
            }
        };
        // Session ids name sessions to operators across the cluster: a
        // node's start at a random high half keeps two nodes' apart.
        let first_session = match node {
            Some(_) => (u64::from(rand::random::<u32>()) << 32) | 1,
            None => 1,
        };
        let state = Arc::new(ServerState {
            connection_permits: permits,
            hub,
            store: backend.history(),
            metrics,
            next_session: AtomicU64::new(first_session),
            verifier,
            limits: Limits::new(&config),
            drain: Drain::default(),
            cluster: node,
            config,
        });
        Ok(Server {
            state,
            backend,
            listeners: Listeners::default(),
            tls,
            certs,
            fan_out,
        })
    }

    /// The listeners to serve on, bound after [`Server::open`]. A TLS
    /// listener needs the server opened `with_tls`.
    pub fn listen_on(mut self, listeners: Listeners) -> Server {
        self.listeners = listeners;
        self
    }

    /// The TLS certificate store, to reload on `SIGHUP`; `None` without TLS.
    pub fn certs(&self) -> Option<Arc<tls::CertStore>> {
        self.certs.clone()
    }

    /// The shared state: hub, store handle, metrics and config.
    pub fn state(&self) -> Arc<ServerState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then drains (see [`run`]).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server {
            state,
            backend,
            listeners,
            tls,
            certs: _,
            fan_out,
        } = self;
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        if let Some(listener) = listeners.tls {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            tracker.spawn(gateway::accept_loop(
                listener,
                acceptor,
                state.clone(),
                tracker.clone(),
                token.clone(),
            ));
        }
        if let Some(listener) = listeners.plain {
            tracker.spawn(gateway::accept_loop(
                listener,
                None,
                state.clone(),
                tracker.clone(),
                token.clone(),
            ));
        }
        tracker.spawn(presence_flusher(state.clone(), token.clone()));
        if let Opened::Local(store) = &backend {
            tracker.spawn(crate::store::retention::run(
                store.handle(),
                state.config.retention.clone().into(),
                std::time::Duration::from_millis(state.config.retention_interval_ms),
                state.config.retention_batch,
                token.clone(),
            ));
        }
        // The admin listener has its own tracker and stop token: it keeps
        // answering while sessions drain (`/readyz` then says 503, because
        // `token` is cancelled) and stops only after them.
        let admin_tracker = TaskTracker::new();
        let admin_stop = CancellationToken::new();
        if let Some(listener) = listeners.admin {
            admin_tracker.spawn(admin::serve(
                listener,
                state.clone(),
                token.clone(),
                admin_stop.clone(),
            ));
        }
        admin_tracker.close();

        // A drain is asked for by the admin API, or (in cluster mode, where
        // other nodes take the clients over) by the shutdown signal itself.
        let mut draining = None;
        let spread = |state: &Arc<ServerState>| {
            let window = state.config.drain_window();
            info!(
                ?window,
                "draining: readiness off, closing sessions spread over the window"
            );
            tracker.spawn(drain::close_spread(
                state.hub.clone(),
                window,
                token.clone(),
            ))
        };
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {}
            () = state.drain.requested() => {
                draining = Some(spread(&state));
                shutdown.await;
            }
        }
        if draining.is_none() && state.config.cluster.is_some() {
            state.drain.request();
            draining = Some(spread(&state));
        }
        if let Some(task) = draining {
            let bound = state.config.drain_window() + state.config.shutdown_grace();
            if tokio::time::timeout(bound, task).await.is_err() {
                warn!(?bound, "the drain did not finish in time");
            }
        }
        info!("shutting down: closing sessions");
        token.cancel();
        tracker.close();
        let grace = state.config.shutdown_grace();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(?grace, "sessions did not close within the grace period");
        }
        admin_stop.cancel();
        if tokio::time::timeout(grace, admin_tracker.wait())
            .await
            .is_err()
        {
            warn!(
                ?grace,
                "admin requests did not finish within the grace period"
            );
        }
        let grace = state.config.shutdown_grace();
        drop(state);
        info!("committing queued appends");
        backend
            .shutdown(grace)
            .await
            .map_err(ServerError::StoreShutdown)?;
        // The store has gone, so the fan-out task has delivered its last.
        fan_out.close();
        if tokio::time::timeout(grace, fan_out.wait()).await.is_err() {
            warn!(
                ?grace,
                "the fan-out task did not finish within the grace period"
            );
        }
        info!("stopped");
        Ok(())
    }
}

/// Sends the hub's batched presence changes every `presence_interval_ms`
/// and its coalesced typing notices every `typing_interval_ms`, until `stop`.
async fn presence_flusher(state: Arc<ServerState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(state.config.presence_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut typing = tokio::time::interval(state.config.typing_interval());
    typing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                state.hub.flush_presence();
            }
            _ = typing.tick() => {
                state.hub.flush_typing();
            }
        }
    }
}

/// A [`CommitSink`] that records each commit's duration and size in
/// [`Metrics`], then hands everything on to `inner` (the fan-out queue, or
/// in a cluster the bus), replies included. It adds two atomic adds per
/// commit to the writer thread and nothing per message.
pub struct ObservedSink<S> {
    inner: Arc<S>,
    metrics: Arc<Metrics>,
}

impl<S> ObservedSink<S> {
    pub fn new(inner: Arc<S>, metrics: Arc<Metrics>) -> ObservedSink<S> {
        ObservedSink { inner, metrics }
    }
}

impl<S: CommitSink> CommitSink for ObservedSink<S> {
    fn committed(&self, msgs: &[Committed<'_>]) {
        self.inner.committed(msgs);
    }

    fn committed_then(&self, msgs: &[Committed<'_>], replies: Replies) {
        self.inner.committed_then(msgs, replies);
    }

    fn batch_committed(&self, operations: usize, elapsed: std::time::Duration) {
        self.metrics.store_commit_latency.observe_duration(elapsed);
        self.metrics.store_commit_batch.observe(operations as u64);
        self.inner.batch_committed(operations, elapsed);
    }
}
