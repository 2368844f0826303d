//! The `[cluster]` section of the configuration: how a node reaches NATS
//! and its peers, with its defaults and validation. It must not connect to
//! anything; `cluster` does.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// The `[cluster]` section: how this node reaches NATS and its peers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`, or `tls://`); at least one.
    /// Default: none (`--cluster` sets them).
    pub urls: Vec<String>,
    /// This node's id: unique in the cluster, shown to operators and in
    /// metrics. Letters, digits, `-` and `_`. Default: `<hostname>-<pid>`.
    pub node_id: Option<String>,
    /// Name of the JetStream stream that holds history (and the prefix of
    /// every subject and bucket Switchboard uses). Default `SWITCHBOARD`.
    pub stream: String,
    /// JetStream replicas of the stream and buckets: 1, or 3 on a
    /// three-server NATS cluster (a message is then acked after quorum). Default 1.
    pub replicas: usize,
    /// NATS credentials file (`.creds`: JWT and NKey seed). Default: none.
    pub credentials: Option<PathBuf>,
    /// PEM CA that signs the NATS servers' certificates; setting it
    /// requires TLS to NATS. Default: none (the system roots for `tls://`).
    pub tls_ca: Option<PathBuf>,
    /// Timeout of one JetStream request (a publish ack, a read). Default 2 000 ms.
    pub request_timeout_ms: u64,
    /// How long a starting node keeps asking for its stream while JetStream
    /// is not ready (NATS still electing its leader) before it gives up and
    /// exits. Default 30 000 ms.
    pub start_timeout_ms: u64,
    /// Most messages of one room one publish to JetStream carries (an
    /// atomic batch). Default 256.
    pub max_batch: usize,
    /// Most atomic batches this node has in flight to JetStream at once
    /// (nats-server allows 50 per stream, for every node together). Default 16.
    pub atomic_batches_in_flight: usize,
    /// How often a node announces itself (and its rooms' members) to the
    /// others. Default 1 000 ms.
    pub heartbeat_interval_ms: u64,
    /// A node silent this long is gone: its members leave every room.
    /// Default 5 000 ms.
    pub node_timeout_ms: u64,
    /// How long a node waits for a missing seq of a room it delivers
    /// before it reads the gap from JetStream. Default 250 ms.
    pub gap_timeout_ms: u64,
    /// Most messages of one room a node holds ahead of a missing seq; past
    /// it, the newest are dropped and read from history with the gap.
    /// Default 4 096.
    pub reorder_max: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            urls: Vec::new(),
            node_id: None,
            stream: "SWITCHBOARD".to_owned(),
            replicas: 1,
            credentials: None,
            tls_ca: None,
            request_timeout_ms: 2_000,
            start_timeout_ms: 30_000,
            max_batch: 256,
            atomic_batches_in_flight: 16,
            heartbeat_interval_ms: 1_000,
            node_timeout_ms: 5_000,
            gap_timeout_ms: 250,
            reorder_max: 4_096,
        }
    }
}

impl ClusterConfig {
    /// Checks what would keep the node from joining its cluster.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(ConfigError::Cluster(
                "`cluster.urls` needs at least one NATS URL",
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(ConfigError::Cluster("`cluster.replicas` must be 1 to 5"));
        }
        let token = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !token(&self.stream) {
            return Err(ConfigError::Cluster(
                "`cluster.stream` must be letters, digits, `-` and `_`",
            ));
        }
        if !token(&self.node_id()) {
            return Err(ConfigError::Cluster(
                "`cluster.node_id` must be letters, digits, `-` and `_`",
            ));
        }
        for (field, value) in [
            ("cluster.request_timeout_ms", self.request_timeout_ms),
            ("cluster.max_batch", self.max_batch as u64),
            (
                "cluster.atomic_batches_in_flight",
                self.atomic_batches_in_flight as u64,
            ),
            ("cluster.heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("cluster.gap_timeout_ms", self.gap_timeout_ms),
            ("cluster.reorder_max", self.reorder_max as u64),
        ] {
            if value < 1 {
                return Err(ConfigError::TooSmall { field, min: 1 });
            }
        }
        if self.node_timeout_ms < self.heartbeat_interval_ms.saturating_mul(2) {
            return Err(ConfigError::Cluster(
                "`cluster.node_timeout_ms` must be at least twice `cluster.heartbeat_interval_ms`",
            ));
        }
        Ok(())
    }

    /// The node id: the configured one, or `<hostname>-<pid>`.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "node".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}
