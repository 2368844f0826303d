//! Server configuration: every limit, with its documented default.
//!
//! Values come from a TOML file, then `SWITCHBOARD_*` environment variables,
//! then command-line flags (see `main.rs`); this module owns only the merged
//! result and its validation. Nothing else in the crate hard-codes a limit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod cluster;
mod error;
mod types;

use crate::store::retention::RetentionRule;
use crate::store::{Durability, StoreOptions};

pub use cluster::ClusterConfig;
pub use error::ConfigError;
pub use types::{ADMIN_TOKEN_MIN_LEN, LogFormat, Rate, Secret};

/// The whole server configuration. Field docs are the configuration reference.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the TLS WebSocket listener (`wss://ADDR/ws`). Default `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// Optional plain `ws://` listener, for deployments behind a TLS-terminating
    /// proxy and for benchmarks. Default: off.
    pub plain_listen: Option<SocketAddr>,
    /// Certificate chain (PEM). Default `certs/server.pem`. When both this and
    /// `tls_key` are missing, a development CA and certificate are generated.
    pub tls_cert: PathBuf,
    /// Private key (PEM). Default `certs/server.key`.
    pub tls_key: PathBuf,
    /// Directory of the redb history file. Default `data`.
    pub data_dir: PathBuf,
    /// Time allowed for the TCP accept to finish the TLS and WebSocket handshakes. Default 10 000 ms.
    pub handshake_timeout_ms: u64,
    /// Most concurrent connections; past it the upgrade is refused with HTTP 503. Default 16 384.
    pub max_connections: usize,
    /// Largest WebSocket message and frame, in bytes; past it the session closes with 1009. Default 65 536.
    pub max_message_bytes: usize,
    /// Per-connection read buffer of the WebSocket codec, in bytes, and the
    /// most read from the socket at once. Default 512: it is held by every
    /// idle connection, while most chat frames are smaller (a larger message
    /// makes the buffer grow to fit it, read in steps of this size, so a
    /// 4 KiB message takes eight reads).
    pub read_buffer_bytes: usize,
    /// Bytes the WebSocket codec buffers before writing to the socket. Default 16 384.
    pub write_buffer_bytes: usize,
    /// Bytes waiting in one session's outbound queue past which it must be
    /// draining: a session over this bound that takes nothing from its
    /// queue for `slow_consumer_grace_ms` is closed as a slow consumer
    /// (4100) at the next message for it. Default 1 MiB.
    pub outbound_queue_bytes: usize,
    /// Hard cap of one session's outbound queue, in bytes: a message that
    /// would take the queue past it closes the session (4100) at once,
    /// draining or not. It bounds a session's memory, and must hold a full
    /// burst of one user's sends (`send_rate_per_user.burst` messages of
    /// `max_message_bytes`) twice over, which `validate` checks, so that a
    /// reader that keeps up is never closed by traffic the limits allow.
    /// Default 16 MiB.
    pub outbound_queue_max_bytes: usize,
    /// How long a session may stay over `outbound_queue_bytes` without
    /// taking anything from its queue before it is a slow consumer. Default 2 000 ms.
    pub slow_consumer_grace_ms: u64,
    /// Most frames waiting in one session's outbound queue. Default 4 096.
    pub outbound_queue_frames: usize,
    /// Most typing/presence events waiting for one session; more are shed. Default 64.
    pub outbound_event_frames: usize,
    /// Most frames written to a socket before one flush (write coalescing). Default 64.
    pub write_batch_frames: usize,
    /// A write to a session's socket that makes no progress for this long
    /// closes the session as a slow consumer. Default 10 000 ms.
    pub write_timeout_ms: u64,
    /// After sending a close frame, how long to wait for the client's reply. Default 1 000 ms.
    pub close_linger_ms: u64,
    /// Most un-acknowledged sends per session; past it the session stops reading. Default 256.
    pub max_inflight_sends: usize,
    /// Server ping interval (the first ping is due at a point of the
    /// interval's second half spread by session, and a due ping waits up to
    /// a tenth of the interval to ride with room traffic); a session that
    /// sends nothing in the interval after a ping is closed with 4102.
    /// Default 25 000 ms.
    pub heartbeat_interval_ms: u64,
    /// How often each room's presence changes go out, batched into one
    /// `presence` event per room. Default 100 ms.
    pub presence_interval_ms: u64,
    /// Most user names in a `joined` reply's `presence` list and in one
    /// `presence` event; the rest are paged with a `presence` request, so
    /// a join costs the same bytes in a room of any size. Default 100.
    pub presence_list_max: usize,
    /// Largest page of a `presence` request, and its size when the request
    /// gives no `limit`. Default 1 000.
    pub presence_page_max: u32,
    /// Room patterns (`*` matches any run of characters, as in grants)
    /// whose rooms send no `presence` events: a livestream's audience, say.
    /// `joined` and the `presence` request still report the room's users.
    /// Default: none.
    pub presence_events_off: Vec<String>,
    /// How often each room's typing notices go out, coalesced into one
    /// `typing` event per room. Default 500 ms.
    pub typing_interval_ms: u64,
    /// Most user names in one `typing` event (its `count` says how many
    /// typed). Default 5.
    pub typing_list_max: usize,
    /// Most deliveries per second of one room's `presence` events, and of
    /// its `typing` events: a room with more sessions than one interval's
    /// share gets its events less often (a room of 20 000 sessions, one
    /// presence event a second by default), so that a big room filling or
    /// typing costs its members a bounded number of events. Default 20 000.
    pub event_fanout_per_sec: u64,
    /// Most messages replayed by a `join` with `since`; a longer gap answers `recovered: false`. Default 1 000.
    pub replay_cap: u64,
    /// `history` page size when the request gives no `limit`. Default 50.
    pub history_default_limit: u32,
    /// Largest `history` page; larger limits are clamped. Default 200.
    pub history_max_limit: u32,
    /// Deepest nesting of arrays and objects in a message body. Default 32.
    pub max_body_depth: usize,
    /// Longest idempotency `key`, in bytes. Default 128.
    pub max_key_bytes: usize,
    /// Most rooms one session may be joined to. Default 256.
    pub max_rooms_per_session: usize,
    /// Commit durability: `immediate` (fsync per commit, the default) or `none`
    /// (commits reach the disk later; a crash may lose acknowledged messages).
    pub durability: Durability,
    /// Most appends grouped into one commit. 1 means a commit per message. Default 1 024.
    pub commit_max_batch: usize,
    /// Messages committed to the store's log before they are also written
    /// to the room and sender indexes, all in one transaction; until then
    /// reads find them in memory. Larger means fewer index pages written per
    /// message, more memory, and a longer replay of the log at start-up.
    /// Default 65 536.
    pub index_batch: u64,
    /// The same bound in bytes of the log (so of the memory the unindexed
    /// messages hold). Default 33 554 432 (32 MiB).
    pub index_batch_bytes: u64,
    /// Appends waiting for the store writer before senders wait. Default 65 536.
    pub store_queue_capacity: usize,
    /// The same bound in bytes of the waiting appends' bodies and keys.
    /// Default 67 108 864 (64 MiB).
    pub store_queue_bytes: usize,
    /// Commits whose messages wait for the fan-out task; past it the
    /// store writer waits for the fan-out before committing more. Default 256.
    pub fanout_queue_commits: usize,
    /// redb's page cache, in bytes: the store's largest use of memory
    /// besides the unindexed log. Default 67 108 864 (64 MiB).
    pub store_cache_bytes: usize,
    /// While the store cannot commit (a full disk), sends are refused with
    /// `unavailable` and the writer tries to commit again this often; it is
    /// also the `retry_after_ms` of the refusals. Default 1 000 ms.
    pub store_retry_ms: u64,
    /// How long an idempotency key is remembered. Default 86 400 s (24 h).
    pub idempotency_ttl_secs: u64,
    /// Retention rules, in TOML `[[retention]]` tables with `rooms` (a
    /// pattern, `*` as in grants), `max_age_secs` and/or `max_count`. The
    /// first rule whose pattern matches a room applies to it; rooms no rule
    /// matches keep their history for ever. Default: none.
    pub retention: Vec<RetentionRule>,
    /// How often retention looks for due messages. Default 60 000 ms.
    pub retention_interval_ms: u64,
    /// Most messages one retention step deletes, in one writer transaction
    /// between the commits of sends (it also looks at most at this many
    /// rooms). Default 1 024.
    pub retention_batch: u64,
    /// Page cache of the fresh redb file a backup (or the rewrite at start
    /// after erasures or retention) writes: the memory a copy takes beyond
    /// the live store's. Default 16 777 216 (16 MiB).
    pub backup_cache_bytes: usize,
    /// After erasures or retention deleted message bodies, rewrite the store
    /// file at the next start (a fresh copy of its live data) so that their
    /// bytes leave the disk: redb frees pages but does not overwrite them.
    /// Costs about a backup's time and space at that start. Default true.
    pub purge_on_start: bool,
    /// Time allowed, at shutdown, for sessions to close and commits to finish. Default 10 000 ms.
    pub shutdown_grace_ms: u64,
    /// A drain (`POST /admin/api/drain`, or SIGTERM in cluster mode) stops
    /// taking connections, fails readiness, and closes the sessions spread
    /// over this window with close code 4200 (reconnect at once,
    /// elsewhere), so the other nodes see no thundering herd. Default 10 000 ms.
    pub drain_window_ms: u64,
    /// Address of the internal HTTP listener (`/healthz`, `/readyz`, `/metrics`,
    /// the admin API and `/dashboard`); never the client port. Plain HTTP: keep
    /// it on loopback or a private interface. Default `127.0.0.1:9090`.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token of the admin API and the dashboard, at least 16 characters.
    /// Default: none, and then both answer 401 to everything (the health
    /// and metrics endpoints stay open). Never logged.
    pub admin_token: Option<Secret>,
    /// Most entries one admin API list returns (connections, rooms, audit
    /// entries); a larger `?limit=` is clamped. Default 1 000.
    pub admin_page_max: usize,
    /// Shared secret of HS256 client tokens (JWT), at least 32 bytes. Setting
    /// any `auth_*` key turns dev mode off. Default: none. Prefer
    /// `SWITCHBOARD_AUTH_HS256_SECRET` or `auth_hs256_secret_file`. Never logged.
    pub auth_hs256_secret: Option<Secret>,
    /// File holding the HS256 secret (surrounding whitespace is trimmed). Default: none.
    pub auth_hs256_secret_file: Option<PathBuf>,
    /// PEM public key (SPKI or PKCS#1) verifying RS256 client tokens. Default: none.
    pub auth_rs256_public_key: Option<PathBuf>,
    /// PEM public key (SPKI, P-256) verifying ES256 client tokens. Default: none.
    pub auth_es256_public_key: Option<PathBuf>,
    /// When set, a token's `iss` must equal it (and be present). Default: not checked.
    pub auth_issuer: Option<String>,
    /// When set, a token's `aud` must contain it (and be present). Default: not checked.
    pub auth_audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds. Default 5.
    pub auth_leeway_secs: u64,
    /// How long before its token expires a session gets `token_expiring`. Default 60 s.
    pub token_expiry_warning_secs: u64,
    /// Origins (`scheme://host[:port]`) whose browsers may open a client
    /// socket. Checked, with auth on, whenever an `Origin` header is present;
    /// an origin not listed gets HTTP 403. Empty (the default) refuses every
    /// browser origin. Off in dev mode.
    pub allowed_origins: Vec<String>,
    /// Most open client connections from one IP address; past it the upgrade
    /// gets HTTP 429. Default 256. Off in dev mode.
    pub max_connections_per_ip: usize,
    /// Most open client connections of one user; past it the upgrade gets
    /// HTTP 429 (or, with first-frame auth, close 1013). Default 32. Off in dev mode.
    pub max_connections_per_user: usize,
    /// The `Retry-After` (seconds) of an upgrade refused for a connection
    /// cap (HTTP 429 and 503): clients wait at least this long before
    /// trying again (PROTOCOL.md §11). Default 1 s.
    pub refusal_retry_after_secs: u64,
    /// TLS handshakes plus upgrades one IP address may start; past it new
    /// connections are dropped before the TLS handshake. Default 20/s, burst 50. Off in dev mode.
    pub handshake_rate_per_ip: Rate,
    /// `send`s per session. Default 20/s, burst 50. Off in dev mode.
    pub send_rate_per_session: Rate,
    /// `send`s per user, across their sessions. Default 50/s, burst 100. Off in dev mode.
    pub send_rate_per_user: Rate,
    /// `join`s per session. Default 5/s, burst 50. Off in dev mode.
    pub join_rate_per_session: Rate,
    /// `join`s per user. Default 10/s, burst 100. Off in dev mode.
    pub join_rate_per_user: Rate,
    /// `history` reads per session. Default 5/s, burst 20. Off in dev mode.
    pub history_rate_per_session: Rate,
    /// `history` reads per user. Default 10/s, burst 40. Off in dev mode.
    pub history_rate_per_user: Rate,
    /// This many `rate_limited` refusals within `rate_limit_window_ms` close
    /// the session with 4101. Default 20.
    pub rate_limit_strikes: u32,
    /// The window of `rate_limit_strikes`. Default 10 000 ms.
    pub rate_limit_window_ms: u64,
    /// Serve the demo chat page (`GET /` on the client listeners, built on
    /// the TypeScript SDK). Default: on in dev mode, off with auth configured.
    pub demo_page: Option<bool>,
    /// Log filter (`tracing` `EnvFilter` syntax, e.g. `info` or
    /// `switchboard=debug,info`). `RUST_LOG`, when set, wins. Default `info`.
    pub log_level: String,
    /// Log format: `pretty` (human) or `json` (one object per line). Default `pretty`.
    pub log_format: LogFormat,
    /// Cluster mode (`[cluster]`, docs/cluster.md): history in NATS
    /// JetStream and fan-out between nodes over NATS. Default: none, and the
    /// server runs alone on its embedded redb store.
    pub cluster: Option<ClusterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            plain_listen: None,
            tls_cert: PathBuf::from("certs/server.pem"),
            tls_key: PathBuf::from("certs/server.key"),
            data_dir: PathBuf::from("data"),
            handshake_timeout_ms: 10_000,
            max_connections: 16_384,
            max_message_bytes: 64 * 1024,
            read_buffer_bytes: 512,
            write_buffer_bytes: 16 * 1024,
            outbound_queue_bytes: 1024 * 1024,
            outbound_queue_max_bytes: 16 * 1024 * 1024,
            slow_consumer_grace_ms: 2000,
            outbound_queue_frames: 4096,
            outbound_event_frames: 64,
            write_batch_frames: 64,
            write_timeout_ms: 10_000,
            close_linger_ms: 1000,
            max_inflight_sends: 256,
            heartbeat_interval_ms: 25_000,
            presence_interval_ms: 100,
            presence_list_max: 100,
            presence_page_max: 1000,
            presence_events_off: Vec::new(),
            typing_interval_ms: 500,
            typing_list_max: 5,
            event_fanout_per_sec: 20_000,
            replay_cap: 1000,
            history_default_limit: 50,
            history_max_limit: 200,
            max_body_depth: 32,
            max_key_bytes: 128,
            max_rooms_per_session: 256,
            durability: Durability::Immediate,
            commit_max_batch: 1024,
            index_batch: 65_536,
            index_batch_bytes: 32 << 20,
            store_queue_capacity: 65_536,
            store_queue_bytes: 64 << 20,
            fanout_queue_commits: 256,
            store_cache_bytes: 64 << 20,
            store_retry_ms: 1000,
            idempotency_ttl_secs: 86_400,
            retention: Vec::new(),
            retention_interval_ms: 60_000,
            retention_batch: 1024,
            backup_cache_bytes: 16 << 20,
            purge_on_start: true,
            shutdown_grace_ms: 10_000,
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            admin_token: None,
            admin_page_max: 1000,
            auth_hs256_secret: None,
            auth_hs256_secret_file: None,
            auth_rs256_public_key: None,
            auth_es256_public_key: None,
            auth_issuer: None,
            auth_audience: None,
            auth_leeway_secs: 5,
            token_expiry_warning_secs: 60,
            allowed_origins: Vec::new(),
            max_connections_per_ip: 256,
            max_connections_per_user: 32,
            refusal_retry_after_secs: 1,
            handshake_rate_per_ip: Rate::new(20, 50),
            send_rate_per_session: Rate::new(20, 50),
            send_rate_per_user: Rate::new(50, 100),
            join_rate_per_session: Rate::new(5, 50),
            join_rate_per_user: Rate::new(10, 100),
            history_rate_per_session: Rate::new(5, 20),
            history_rate_per_user: Rate::new(10, 40),
            rate_limit_strikes: 20,
            rate_limit_window_ms: 10_000,
            demo_page: None,
            drain_window_ms: 10_000,
            log_level: "info".to_owned(),
            log_format: LogFormat::Pretty,
            cluster: None,
        }
    }
}

impl Config {
    /// Reads a TOML file; missing keys take their defaults.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Checks the limits that would otherwise make the server misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at_least = |field: &'static str, value: u64, min: u64| {
            if value < min {
                Err(ConfigError::TooSmall { field, min })
            } else {
                Ok(())
            }
        };
        at_least("max_connections", self.max_connections as u64, 1)?;
        at_least("max_message_bytes", self.max_message_bytes as u64, 256)?;
        at_least("read_buffer_bytes", self.read_buffer_bytes as u64, 512)?;
        at_least(
            "outbound_queue_bytes",
            self.outbound_queue_bytes as u64,
            1024,
        )?;
        at_least(
            "outbound_queue_frames",
            self.outbound_queue_frames as u64,
            1,
        )?;
        at_least(
            "outbound_event_frames",
            self.outbound_event_frames as u64,
            1,
        )?;
        at_least("write_batch_frames", self.write_batch_frames as u64, 1)?;
        at_least("max_inflight_sends", self.max_inflight_sends as u64, 1)?;
        at_least("heartbeat_interval_ms", self.heartbeat_interval_ms, 10)?;
        at_least("presence_interval_ms", self.presence_interval_ms, 1)?;
        at_least("presence_page_max", u64::from(self.presence_page_max), 1)?;
        at_least("typing_interval_ms", self.typing_interval_ms, 1)?;
        at_least("typing_list_max", self.typing_list_max as u64, 1)?;
        at_least("event_fanout_per_sec", self.event_fanout_per_sec, 1)?;
        for pattern in &self.presence_events_off {
            // A pattern follows the room-name rules, with `*` as a wildcard.
            protocol::names::validate_room(&pattern.replace('*', "x")).map_err(|source| {
                ConfigError::RoomPattern {
                    field: "presence_events_off",
                    pattern: pattern.clone(),
                    source,
                }
            })?;
        }
        at_least("history_max_limit", u64::from(self.history_max_limit), 1)?;
        at_least("commit_max_batch", self.commit_max_batch as u64, 1)?;
        at_least("index_batch", self.index_batch, 1)?;
        at_least("index_batch_bytes", self.index_batch_bytes, 1)?;
        at_least("store_queue_capacity", self.store_queue_capacity as u64, 1)?;
        at_least("store_retry_ms", self.store_retry_ms, 1)?;
        at_least("store_queue_bytes", self.store_queue_bytes as u64, 1)?;
        at_least("fanout_queue_commits", self.fanout_queue_commits as u64, 1)?;
        at_least("admin_page_max", self.admin_page_max as u64, 1)?;
        at_least("retention_interval_ms", self.retention_interval_ms, 1)?;
        at_least("retention_batch", self.retention_batch, 1)?;
        at_least("drain_window_ms", self.drain_window_ms, 1)?;
        at_least(
            "backup_cache_bytes",
            self.backup_cache_bytes as u64,
            1 << 16,
        )?;
        for rule in &self.retention {
            rule.validate()?;
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        let keys = self.auth_keys_set();
        if keys.len() > 1 {
            return Err(ConfigError::SeveralAuthKeys(keys.join(", ")));
        }
        for (field, rate) in [
            ("handshake_rate_per_ip", self.handshake_rate_per_ip),
            ("send_rate_per_session", self.send_rate_per_session),
            ("send_rate_per_user", self.send_rate_per_user),
            ("join_rate_per_session", self.join_rate_per_session),
            ("join_rate_per_user", self.join_rate_per_user),
            ("history_rate_per_session", self.history_rate_per_session),
            ("history_rate_per_user", self.history_rate_per_user),
        ] {
            if !rate.is_off() && rate.burst == 0 {
                return Err(ConfigError::EmptyBurst { field });
            }
        }
        at_least(
            "max_connections_per_ip",
            self.max_connections_per_ip as u64,
            1,
        )?;
        at_least(
            "max_connections_per_user",
            self.max_connections_per_user as u64,
            1,
        )?;
        at_least("rate_limit_strikes", u64::from(self.rate_limit_strikes), 1)?;
        // The hard cap of an outbound queue must hold what one user may
        // send in a burst (twice: framing, and the next burst arriving
        // while the first is written), or a reader that keeps up would be
        // closed by traffic the limits allow.
        let burst = if self.send_rate_per_user.is_off() {
            0
        } else {
            self.send_rate_per_user.burst as usize
        };
        let min_cap = burst
            .saturating_mul(self.max_message_bytes)
            .saturating_mul(2)
            .max(self.outbound_queue_bytes);
        if self.outbound_queue_max_bytes < min_cap {
            return Err(ConfigError::QueueCapBelowBurst {
                max: self.outbound_queue_max_bytes,
                min: min_cap,
            });
        }
        // Dev mode takes the user name from the URL, so anyone who can reach
        // the port can be anyone: it must never face a network.
        if self.dev_mode() {
            for (field, addr) in [
                ("listen", Some(self.listen)),
                ("plain_listen", self.plain_listen),
                ("admin_listen", self.admin_listen),
            ] {
                if let Some(addr) = addr {
                    if !addr.ip().is_loopback() {
                        return Err(ConfigError::DevModeNotLoopback { field, addr });
                    }
                }
            }
        }
        if let Some(admin) = self.admin_listen.filter(|a| a.port() != 0) {
            for (field, addr) in [
                ("listen", Some(self.listen)),
                ("plain_listen", self.plain_listen),
            ] {
                let clash = |a: SocketAddr| {
                    a.port() == admin.port()
                        && (a.ip() == admin.ip()
                            || a.ip().is_unspecified()
                            || admin.ip().is_unspecified())
                };
                if addr.is_some_and(clash) {
                    return Err(ConfigError::AdminOnClientPort { field, addr: admin });
                }
            }
        }
        // Without a token the admin API answers 401, but `/metrics` and the
        // health endpoints are open to whoever reaches the listener, showing
        // the server's load and traffic: a listener that faces a network
        // needs a token, which says the operator chose to expose it.
        if let Some(addr) = self.admin_listen {
            if !addr.ip().is_loopback() && self.admin_token.is_none() {
                return Err(ConfigError::AdminExposed { addr });
            }
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| t.expose().chars().count() < ADMIN_TOKEN_MIN_LEN)
        {
            return Err(ConfigError::AdminTokenTooShort {
                min: ADMIN_TOKEN_MIN_LEN,
            });
        }
        Ok(())
    }

    /// The token keys that are configured, by config key.
    fn auth_keys_set(&self) -> Vec<&'static str> {
        [
            ("auth_hs256_secret", self.auth_hs256_secret.is_some()),
            (
                "auth_hs256_secret_file",
                self.auth_hs256_secret_file.is_some(),
            ),
            (
                "auth_rs256_public_key",
                self.auth_rs256_public_key.is_some(),
            ),
            (
                "auth_es256_public_key",
                self.auth_es256_public_key.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    /// Dev mode: no token key is configured, the user comes from `?user=`,
    /// only loopback addresses are served and the abuse limits are off.
    pub fn dev_mode(&self) -> bool {
        self.auth_keys_set().is_empty()
    }

    /// Whether the demo chat page is served: `demo_page`, else dev mode.
    pub fn demo_page_enabled(&self) -> bool {
        self.demo_page.unwrap_or_else(|| self.dev_mode())
    }

    /// Path of the redb file inside `data_dir`.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("switchboard.redb")
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn presence_interval(&self) -> Duration {
        Duration::from_millis(self.presence_interval_ms)
    }

    pub fn typing_interval(&self) -> Duration {
        Duration::from_millis(self.typing_interval_ms)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    pub fn close_linger(&self) -> Duration {
        Duration::from_millis(self.close_linger_ms)
    }

    pub fn drain_window(&self) -> Duration {
        Duration::from_millis(self.drain_window_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The store's share of the configuration.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            durability: self.durability,
            max_batch: self.commit_max_batch,
            index_batch: self.index_batch,
            index_batch_bytes: self.index_batch_bytes,
            queue_capacity: self.store_queue_capacity,
            queue_bytes: self.store_queue_bytes,
            idempotency_ttl: Duration::from_secs(self.idempotency_ttl_secs),
            cache_bytes: self.store_cache_bytes,
            retry_interval: Duration::from_millis(self.store_retry_ms),
            probe_bytes: self.max_message_bytes,
            backup_cache_bytes: self.backup_cache_bytes,
            purge_on_start: self.purge_on_start,
        }
    }
}

#[cfg(test)]
mod tests;
