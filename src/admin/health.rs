//! Liveness, readiness and the Prometheus scrape.
//!
//! It owns `/healthz`, `/readyz`, `/metrics` and the values computed at
//! scrape time (rooms, queued bytes, store commits). It must not change any
//! state: a probe or a scrape only reads.

use std::fmt;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use serde_json::json;
use tracing::warn;

use super::AdminState;
use crate::history::Backend as _;
use crate::state::ServerState;

/// The OpenMetrics text content type that Prometheus negotiates.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /healthz`: the process is up and its runtime answers.
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 while the listeners serve and the store accepts
/// writes; 503 while draining at shutdown or when the store cannot write.
pub(super) async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    if state.draining.is_cancelled() || state.server.drain.is_requested() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining" })),
        )
            .into_response();
    }
    match state.server.store.writable() {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(e) => {
            warn!(error = %e, "not ready: the store cannot write");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "store_unavailable", "message": e.to_string() })),
            )
                .into_response()
        }
    }
}

/// `GET /metrics`: every metric in the OpenMetrics text format.
pub(super) async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(e) => {
            warn!(error = %e, "metrics encoding failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Values that exist only as a view of other state, computed per scrape.
pub(super) struct ScrapeCollector {
    server: Arc<ServerState>,
}

impl ScrapeCollector {
    pub(super) fn new(server: Arc<ServerState>) -> ScrapeCollector {
        ScrapeCollector { server }
    }
}

impl fmt::Debug for ScrapeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScrapeCollector")
    }
}

/// Queued bytes over every session: the total and the largest. The total
/// is the registry's running one; the largest visits no session while
/// nothing is queued (see `Registry::largest_queue`).
pub(super) fn queue_depth(server: &ServerState) -> (u64, u64) {
    let registry = server.hub.registry();
    (registry.queued_bytes(), registry.largest_queue())
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let server = &self.server;
        let gauge = |encoder: &mut DescriptorEncoder,
                     name: &str,
                     help: &str,
                     unit: Option<&Unit>,
                     v: i64|
         -> fmt::Result {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)
        };
        let rooms = i64::try_from(server.hub.room_count()).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "switchboard_rooms",
            "Rooms with at least one member.",
            None,
            rooms,
        )?;
        let (queued, largest) = queue_depth(server);
        gauge(
            &mut encoder,
            "switchboard_outbound_queue",
            "Bytes waiting in every session's outbound queue.",
            Some(&Unit::Bytes),
            i64::try_from(queued).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "switchboard_outbound_queue_largest",
            "Bytes waiting in the fullest session's outbound queue.",
            Some(&Unit::Bytes),
            i64::try_from(largest).unwrap_or(i64::MAX),
        )?;
        let commits = ConstCounter::new(server.store.commits());
        commits.encode(encoder.encode_descriptor(
            "switchboard_store_commits",
            "Store write transactions committed.",
            None,
            commits.metric_type(),
        )?)?;
        let failed = ConstCounter::new(server.store.failed_commits());
        failed.encode(encoder.encode_descriptor(
            "switchboard_store_commit_failures",
            "Store write transactions that failed (a full or failing disk), the writer's retries included.",
            None,
            failed.metric_type(),
        )?)?;
        gauge(
            &mut encoder,
            "switchboard_store_writable",
            "1 while the store can commit, 0 while sends are refused with `unavailable`.",
            None,
            i64::from(server.store.writable().is_ok()),
        )?;
        if let Some(node) = &server.cluster {
            let stats = node.bus.stats();
            for (name, help, v) in [
                (
                    "switchboard_cluster_deliveries_received",
                    "Delivery payloads received from other nodes.",
                    stats.deliveries_received,
                ),
                (
                    "switchboard_cluster_events_received",
                    "Typing and presence payloads received from other nodes.",
                    stats.events_received,
                ),
                (
                    "switchboard_cluster_history_reads",
                    "Reads of history the bus made to fill a gap or catch a room up.",
                    stats.history_reads,
                ),
                (
                    "switchboard_cluster_history_reads_answered",
                    "Those reads whose answer the bus has taken in.",
                    stats.history_reads_answered,
                ),
                (
                    "switchboard_cluster_delivered",
                    "Messages the bus handed to this node's hub.",
                    stats.delivered,
                ),
            ] {
                let c = ConstCounter::new(v);
                c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
            }
        }
        Ok(())
    }
}
