//! Cluster mode: many nodes over NATS JetStream (docs/cluster.md).
//!
//! It owns the connection to NATS and the names of every subject, stream
//! and bucket the cluster uses. History lives in a JetStream stream
//! ([`store`]), committed messages and ephemeral events travel between
//! nodes over core NATS ([`bus`]). Without a `[cluster]` section nothing
//! here runs. It must not reach into sessions: it talks to the rest of the
//! server only through the store's interface and the hub's.

pub mod bus;
pub mod control;
pub mod store;
pub mod subjects;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ClusterConfig;
use crate::history::{Backend as _, CommitSink};
use crate::hub::Hub;

/// What the rest of the server holds of cluster mode: the node's id, its
/// bus (nodes, rooms) and its control plane (operators' requests to the
/// other nodes).
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub bus: Arc<bus::ClusterBus>,
    pub control: control::Control,
}

/// Why the node could not connect to NATS.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the NATS credentials file {path}")]
    Credentials {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid NATS URL in {urls}")]
    Url {
        urls: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {urls}")]
    Connect {
        urls: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Connects to NATS with the cluster's settings: every URL as a seed,
/// reconnecting for ever (a node outlives a NATS outage; its sends are
/// refused as `unavailable` meanwhile).
pub async fn connect(config: &ClusterConfig) -> Result<async_nats::Client, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("switchboard-{}", config.node_id()))
        .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
        .retry_on_initial_connect()
        .max_reconnects(None);
    if let Some(path) = &config.credentials {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.clone(),
                    source,
                })?;
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let urls = config.urls.join(",");
    let addrs = server_addrs(&config.urls).map_err(|source| ConnectError::Url {
        urls: urls.clone(),
        source,
    })?;
    options
        .connect(addrs)
        .await
        .map_err(|source| ConnectError::Connect { urls, source })
}

/// Every server of `urls`, each of which may itself be a comma-separated
/// list (as `--cluster a,b` and `SWITCHBOARD_CLUSTER` give them).
fn server_addrs(urls: &[String]) -> Result<Vec<async_nats::ServerAddr>, std::io::Error> {
    urls.iter()
        .flat_map(|u| u.split(','))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::parse)
        .collect()
}

/// Why the node could not join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot start the cluster bus")]
    Bus(#[from] bus::BusError),
    #[error("cannot open the cluster's history in JetStream")]
    Store(#[from] store::ClusterStoreError),
}

/// A started cluster node: its handles, its history and the tasks behind
/// them (stopped by [`Started::stop`]).
pub struct Started {
    pub node: Node,
    pub store: store::JetStreamStore,
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Started {
    /// Stops the node's cluster tasks: the store's writer answers every
    /// append already queued first. Waits at most `grace`.
    pub async fn stop(self, grace: Duration) {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "cluster tasks did not stop within the grace period");
        }
    }
}

/// Joins the cluster: connects to NATS, starts the bus (set as the hub's
/// peers), opens the history in JetStream with `sink(bus)` as its commit
/// sink, and starts answering the other nodes' requests. `connections`
/// counts this node's clients for its heartbeats.
pub async fn start(
    config: &ClusterConfig,
    store_options: &crate::store::StoreOptions,
    hub: Arc<Hub>,
    connections: bus::ConnectionCount,
    sink: impl FnOnce(Arc<bus::ClusterBus>) -> Arc<dyn CommitSink>,
) -> Result<Started, StartError> {
    let client = connect(config).await?;
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    // The bus reads gaps from the store, and the store hands its commits
    // to the bus: the store opens first (reads work at once), the bus
    // starts reading it, and only then does the store's writer start, with
    // the bus as its sink.
    let (store, writer) =
        store::JetStreamStore::open(client.clone(), config, store_options).await?;
    let reader: bus::HistoryReader = {
        let store = store.clone();
        Arc::new(move |room: String, after: u64, limit: usize| {
            let store = store.clone();
            Box::pin(async move { store.read_after(&room, after, limit).await })
        })
    };
    let bus = bus::ClusterBus::start(
        client.clone(),
        config,
        hub.clone(),
        reader,
        connections,
        &tracker,
        token.clone(),
    )
    .await?;
    writer.start(sink(bus.clone()), &tracker, token.clone());
    let id = config.node_id();
    let control = control::Control::start(
        client,
        &config.stream,
        &id,
        Duration::from_millis(config.request_timeout_ms),
        hub,
        &tracker,
        token.clone(),
    );
    Ok(Started {
        node: Node { id, bus, control },
        store,
        tracker,
        token,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_url_of_a_list_is_a_server() {
        let one = vec!["nats://127.0.0.1:4222,nats://127.0.0.1:4223".to_owned()];
        assert_eq!(server_addrs(&one).unwrap().len(), 2);
        let many = vec![
            "nats://127.0.0.1:4222".to_owned(),
            " nats://127.0.0.1:4223 ".to_owned(),
        ];
        assert_eq!(server_addrs(&many).unwrap().len(), 2);
        assert!(server_addrs(&["nats://x:notaport".to_owned()]).is_err());
    }
}
