//! Cluster mode: many nodes over NATS JetStream (docs/cluster.md).
//!
//! It owns the connection to NATS and the names of every subject, stream
//! and bucket the cluster uses. History lives in a JetStream stream
//! ([`store`]), committed messages and ephemeral events travel between
//! nodes over core NATS ([`bus`]). Without a `[cluster]` section nothing
//! here runs. It must not reach into sessions: it talks to the rest of the
//! server only through the store's interface and the hub's.

pub mod control;
pub mod subjects;

use std::time::Duration;

use crate::config::ClusterConfig;

/// Why the node could not connect to NATS.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the NATS credentials file {path}")]
    Credentials {
        path: std::path::PathBuf,
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
    options
        .connect(urls.as_str())
        .await
        .map_err(|source| ConnectError::Connect { urls, source })
}
