//! The internal HTTP listener: health, readiness, Prometheus metrics, the
//! admin API and the live dashboard.
//!
//! It owns the operators' HTTP routes and nothing else. It reads and steers
//! the server only through the hub's, the store's and the metrics' public
//! interfaces, and it must never serve clients: it is bound to its own
//! address (`admin_listen`), never to the client port.
//!
//! Access:
//! - `/healthz`, `/readyz`, `/metrics` and the dashboard's static files are
//!   open: they carry no user data, and a scraper or a load balancer has no
//!   token. Keep the listener on loopback or a private network.
//! - Everything under `/admin/api` needs `Authorization: Bearer <admin_token>`.
//!   Without a configured token every such request answers 401 (and a
//!   warning is logged at start). The token is never logged; the audit log
//!   names the caller by a fingerprint of it.
//! - Every admin action that changes state or reads user data (kick,
//!   publish, export, erase, backup) is appended to the audit log *before* it runs;
//!   an action that cannot be audited is not performed.
//!
//! Lifetime: [`serve`] runs as a tracked task of the server. axum spawns one
//! task per admin connection itself; its graceful shutdown (on `stop`, after
//! the sessions drained) waits for them, so nothing outlives the server.

mod api;
mod audit;
mod auth;
mod dashboard;
mod error;
mod health;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use api::BACKUP_EPOCH_HEADER;
pub use audit::{AuditEntry, AuditError, AuditLog};

use crate::state::ServerState;

/// Every route of the internal listener, as `(method, path)` with axum's
/// `{param}` syntax. `docs/openapi.yaml` documents exactly these; the
/// integration tests check both directions and call each one.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/dashboard"),
    ("GET", "/dashboard/app.js"),
    ("GET", "/dashboard/app.css"),
    ("GET", "/admin/api/stats"),
    ("GET", "/admin/api/connections"),
    ("GET", "/admin/api/connections/{id}"),
    ("POST", "/admin/api/connections/{id}/kick"),
    ("POST", "/admin/api/users/{user}/kick"),
    ("GET", "/admin/api/users/{user}/messages"),
    ("DELETE", "/admin/api/users/{user}/messages"),
    ("GET", "/admin/api/rooms"),
    ("GET", "/admin/api/rooms/{room}"),
    ("POST", "/admin/api/rooms/{room}/messages"),
    ("GET", "/admin/api/audit"),
    ("POST", "/admin/api/backup"),
    ("POST", "/admin/api/drain"),
];

/// What every admin handler shares.
pub struct AdminState {
    server: Arc<ServerState>,
    /// Cancelled when the server starts draining: `/readyz` answers 503.
    draining: CancellationToken,
    registry: Registry,
    token: Option<auth::TokenCheck>,
    audit: AuditLog,
    started: Instant,
}

/// Serves the internal listener until `stop`. `draining` is the server's
/// shutdown token: once it is cancelled the listener keeps answering, but
/// `/readyz` reports not-ready.
pub async fn serve(
    listener: TcpListener,
    server: Arc<ServerState>,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    if server.config.admin_token.is_none() {
        warn!(
            "no admin_token configured: the admin API and the dashboard answer 401 to everything; set SWITCHBOARD_ADMIN_TOKEN"
        );
    }
    let app = router(state(server, draining));
    info!(addr = ?addr, "admin listener up");
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, service)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        warn!(error = %e, "admin listener failed");
    }
}

fn state(server: Arc<ServerState>, draining: CancellationToken) -> Arc<AdminState> {
    // In a cluster every series carries the node's id, so one Prometheus
    // scraping every node can tell them apart.
    let mut registry = match &server.config.cluster {
        Some(cluster) => Registry::with_labels(
            [(
                std::borrow::Cow::Borrowed("node"),
                std::borrow::Cow::Owned(cluster.node_id()),
            )]
            .into_iter(),
        ),
        None => Registry::default(),
    };
    server.metrics.register(&mut registry);
    registry.register_collector(Box::new(health::ScrapeCollector::new(server.clone())));
    let token = server
        .config
        .admin_token
        .as_ref()
        .map(auth::TokenCheck::new);
    let audit = AuditLog::new(server.config.data_dir.join("audit.log"));
    Arc::new(AdminState {
        server,
        draining,
        registry,
        token,
        audit,
        started: Instant::now(),
    })
}

/// The whole internal HTTP surface (see [`ROUTES`]).
pub fn router(state: Arc<AdminState>) -> Router {
    let body_limit = state.server.config.max_message_bytes;
    let api = Router::new()
        .route("/stats", get(api::stats))
        .route("/connections", get(api::list_connections))
        .route("/connections/{id}", get(api::get_connection))
        .route("/connections/{id}/kick", post(api::kick_connection))
        .route("/users/{user}/kick", post(api::kick_user))
        .route(
            "/users/{user}/messages",
            get(api::export_user).delete(api::erase_user),
        )
        .route("/rooms", get(api::list_rooms))
        .route("/rooms/{room}", get(api::get_room))
        .route("/rooms/{room}/messages", post(api::publish))
        .route("/audit", get(api::audit_log))
        .route("/backup", post(api::backup))
        .route("/drain", post(api::drain))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/app.css", get(dashboard::style))
        .nest("/admin/api", api)
        .with_state(state)
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC
/// (`2024-05-01T12:00:00.123Z`).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_714_564_800_000), "2024-05-01T12:00:00.000Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}
