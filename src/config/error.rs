//! Why a configuration was refused.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::store::retention::RuleError;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("`{field}` must be at least {min}")]
    TooSmall { field: &'static str, min: u64 },
    #[error(
        "dev mode (no auth configured) serves loopback addresses only, but `{field}` is {addr}"
    )]
    DevModeNotLoopback {
        field: &'static str,
        addr: SocketAddr,
    },
    #[error("`admin_listen` ({addr}) must not be the client port (`{field}`)")]
    AdminOnClientPort {
        field: &'static str,
        addr: SocketAddr,
    },
    #[error("`admin_token` must be at least {min} characters")]
    AdminTokenTooShort { min: usize },
    #[error("configure at most one token key, but {0} are set")]
    SeveralAuthKeys(String),
    #[error(
        "`{field}` with a burst of 0 admits nothing; give a burst of at least 1 or per_sec = 0 (off)"
    )]
    EmptyBurst { field: &'static str },
    #[error("invalid `[[retention]]` rule")]
    Retention(#[from] RuleError),
    #[error(
        "`outbound_queue_max_bytes` ({max}) must be at least `outbound_queue_bytes` and twice \
         a burst of one user's sends (`send_rate_per_user.burst` x `max_message_bytes`): {min}"
    )]
    QueueCapBelowBurst { max: usize, min: usize },
    #[error(
        "`admin_listen` ({addr}) is not a loopback address and no `admin_token` is set: \
         set one (`SWITCHBOARD_ADMIN_TOKEN`) or listen on loopback"
    )]
    AdminExposed { addr: SocketAddr },
    #[error("invalid `[cluster]`: {0}")]
    Cluster(&'static str),
    #[error("`{field}` has an invalid room pattern `{pattern}`")]
    RoomPattern {
        field: &'static str,
        pattern: String,
        #[source]
        source: protocol::names::NameError,
    },
}
