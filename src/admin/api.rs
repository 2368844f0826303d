//! The admin API handlers: JSON under `/admin/api`.
//!
//! It owns the API's request and reply shapes (documented in
//! `docs/openapi.yaml`) and the audit entry of each action. It steers the
//! server only through the hub (kicks), the store (publish, export, erase),
//! metrics and, in cluster mode, the control plane (the other nodes'
//! sessions); it must not reach into sessions, and it never logs a
//! message body.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tracing::info;

use super::audit::AuditEntry;
use super::auth::Caller;
use super::error::ApiError;
use super::{AdminState, health, now_ms, rfc3339};
use crate::close::CloseReason;
use crate::cluster::control::{self, NodeSession};
use crate::history::Backend as _;
use crate::history::{Append, StoreClosed};
use crate::hub::SessionInfo;
use crate::limits::{AppendLimit, check_append};

/// The user that system messages come from.
pub const SYSTEM_USER: &str = "system";

type ApiResult<T> = Result<T, ApiError>;

/// A list's `?limit=`, clamped to `admin_page_max`.
#[derive(Debug, Deserialize)]
pub(super) struct Page {
    limit: Option<usize>,
}

fn page_limit(state: &AdminState, asked: Option<usize>) -> usize {
    let max = state.server.config.admin_page_max;
    asked.unwrap_or(max).min(max)
}

/// Writes the audit entry of an action before it runs.
async fn audit(
    state: &AdminState,
    caller: &Caller,
    action: &str,
    params: serde_json::Value,
) -> ApiResult<()> {
    let ts_ms = now_ms();
    let entry = AuditEntry {
        ts: rfc3339(ts_ms),
        ts_ms,
        who: caller.who.clone(),
        remote: caller.remote.map(|r| r.to_string()),
        action: action.to_owned(),
        params,
    };
    info!(who = %entry.who, remote = ?entry.remote, action, params = %entry.params, "admin action");
    state.audit.append(&entry).await.map_err(ApiError::Audit)
}

fn valid_user(user: &str) -> ApiResult<()> {
    protocol::names::validate_user(user)
        .map_err(|e| ApiError::BadRequest(format!("invalid user name: {e}")))
}

fn valid_room(room: &str) -> ApiResult<()> {
    protocol::names::validate_room(room)
        .map_err(|e| ApiError::BadRequest(format!("invalid room name: {e}")))
}

/// Parses a session id as shown in `welcome` (hexadecimal).
fn session_id(id: &str) -> ApiResult<u64> {
    u64::from_str_radix(id, 16)
        .map_err(|_| ApiError::BadRequest(format!("`{id}` is not a session id (hexadecimal)")))
}

/// Unknown paths under `/admin/api` (after authentication).
pub(super) async fn not_found() -> ApiError {
    ApiError::NotFound("no such admin API route; see docs/openapi.yaml".into())
}

/// `GET /admin/api/stats`: counters for the dashboard, as running totals
/// (rates are the difference between two reads).
pub(super) async fn stats(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let s = &state.server;
    let m = &s.metrics;
    let (queued, largest) = health::queue_depth(s);
    let closed: HashMap<&str, u64> = CloseReason::ALL
        .iter()
        .map(|r| (r.as_str(), m.closed_for(*r)))
        .collect();
    Json(json!({
        "ts_ms": now_ms(),
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "ready": !state.draining.is_cancelled(),
        "connections_open": m.connections_open.get(),
        "rooms": s.hub.room_count(),
        "messages_received_total": m.messages_received.get(),
        "messages_delivered_total": m.messages_delivered.get(),
        "messages_dropped_total": m.messages_dropped.get() + m.ephemeral_shed.get(),
        "bytes_in_total": m.bytes_in.get(),
        "bytes_out_total": m.bytes_out.get(),
        "slow_consumers_total": m.slow_consumers.get(),
        "sessions_closed_total": closed,
        "outbound_queue_bytes": queued,
        "outbound_queue_largest_bytes": largest,
        "store_commits_total": s.store.commits(),
        "store_commit_seconds_sum": m.store_commit_latency.sum(),
        "store_commit_seconds_count": m.store_commit_latency.count(),
        "ack_latency_seconds_sum": m.ack_latency.sum(),
        "ack_latency_seconds_count": m.ack_latency.count(),
        "fanout_latency_seconds_sum": m.fanout_latency.sum(),
        "fanout_latency_seconds_count": m.fanout_latency.count(),
    }))
}

/// One connection as the API shows it.
#[derive(Debug, Serialize)]
pub(super) struct Connection {
    /// Hexadecimal, as in the client's `welcome`.
    id: String,
    user: String,
    remote: String,
    rooms: Vec<String>,
    /// RFC 3339 UTC.
    connected_since: String,
    connected_since_ms: u64,
    messages_in: u64,
    messages_out: u64,
    queue_bytes: usize,
    /// The cluster node holding it; absent when the server runs alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

impl From<SessionInfo> for Connection {
    fn from(s: SessionInfo) -> Connection {
        Connection::from(NodeSession::from(s))
    }
}

impl From<NodeSession> for Connection {
    fn from(s: NodeSession) -> Connection {
        Connection {
            id: format!("{:016x}", s.id),
            user: s.user,
            remote: s.remote,
            rooms: s.rooms,
            connected_since: rfc3339(s.connected_at_ms),
            connected_since_ms: s.connected_at_ms,
            messages_in: s.messages_in,
            messages_out: s.messages_out,
            queue_bytes: s.queued_bytes,
            node: None,
        }
    }
}

/// This node's sessions, then (in cluster mode) every other live node's,
/// each with its node.
async fn all_sessions(state: &AdminState) -> Vec<Connection> {
    let local = state
        .server
        .hub
        .sessions()
        .into_iter()
        .map(Connection::from);
    let Some(node) = &state.server.cluster else {
        return local.collect();
    };
    let mut out: Vec<Connection> = local
        .map(|c| Connection {
            node: Some(node.id.clone()),
            ..c
        })
        .collect();
    for reply in ask_others(state, &control::Request::Sessions).await {
        out.extend(reply.sessions.into_iter().map(|s| Connection {
            node: Some(reply.node.clone()),
            ..Connection::from(s)
        }));
    }
    out
}

/// Asks every other live node of the cluster; none when alone. A node that
/// cannot be asked (NATS unreachable) is left out and logged.
async fn ask_others(state: &AdminState, request: &control::Request) -> Vec<control::Reply> {
    let Some(node) = &state.server.cluster else {
        return Vec::new();
    };
    let others = node
        .bus
        .nodes()
        .iter()
        .filter(|n| n.alive && !n.this_node)
        .count();
    match node.control.gather(request, others).await {
        Ok(replies) => replies,
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach the other nodes");
            Vec::new()
        }
    }
}

/// `GET /admin/api/nodes`: the nodes of the cluster, this one first; alone,
/// just this one.
pub(super) async fn nodes(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    match &state.server.cluster {
        Some(node) => Json(json!({ "cluster": true, "nodes": node.bus.nodes() })),
        None => Json(json!({
            "cluster": false,
            "nodes": [{
                "id": "standalone",
                "this_node": true,
                "alive": true,
                "connections": state.server.hub.session_count(),
            }],
        })),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ConnectionFilter {
    user: Option<String>,
    room: Option<String>,
    limit: Option<usize>,
}

/// `GET /admin/api/connections?user=&room=&limit=`.
pub(super) async fn list_connections(
    State(state): State<Arc<AdminState>>,
    Query(filter): Query<ConnectionFilter>,
) -> Json<serde_json::Value> {
    let limit = page_limit(&state, filter.limit);
    let matching: Vec<Connection> = all_sessions(&state)
        .await
        .into_iter()
        .filter(|s| filter.user.as_ref().is_none_or(|u| &s.user == u))
        .filter(|s| filter.room.as_ref().is_none_or(|r| s.rooms.contains(r)))
        .collect();
    let total = matching.len();
    let connections: Vec<Connection> = matching.into_iter().take(limit).collect();
    Json(json!({ "total": total, "connections": connections }))
}

/// `GET /admin/api/connections/{id}`.
pub(super) async fn get_connection(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Connection>> {
    let id = session_id(&id)?;
    let hex = format!("{id:016x}");
    all_sessions(&state)
        .await
        .into_iter()
        .find(|s| s.id == hex)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no live session {hex}")))
}

/// `POST /admin/api/connections/{id}/kick`: closes it with 4009.
pub(super) async fn kick_connection(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let sid = session_id(&id)?;
    let id = format!("{sid:016x}");
    audit(&state, &caller, "kick_session", json!({ "session": id })).await?;
    let mut kicked = usize::from(state.server.hub.close_session(sid, CloseReason::Kicked));
    if kicked == 0 {
        let ask = control::Request::KickSession { session: sid };
        kicked = ask_others(&state, &ask)
            .await
            .iter()
            .map(|r| r.kicked)
            .sum();
    }
    if kicked > 0 {
        Ok(Json(json!({ "kicked": kicked })))
    } else {
        Err(ApiError::NotFound(format!("no live session {id}")))
    }
}

/// `POST /admin/api/users/{user}/kick`: closes every session of the user with 4009.
pub(super) async fn kick_user(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(user): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    valid_user(&user)?;
    audit(&state, &caller, "kick_user", json!({ "user": user })).await?;
    let mut kicked = state.server.hub.close_user(&user, CloseReason::Kicked);
    let ask = control::Request::KickUser { user };
    kicked += ask_others(&state, &ask)
        .await
        .iter()
        .map(|r| r.kicked)
        .sum::<usize>();
    Ok(Json(json!({ "kicked": kicked })))
}

/// `POST /admin/api/drain`: the node stops taking connections, `/readyz`
/// answers 503, and its sessions are closed with 4200 spread over
/// `drain_window_ms` (see `drain`). The process keeps running until it is
/// stopped; a second call changes nothing.
pub(super) async fn drain(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    audit(&state, &caller, "drain", json!({})).await?;
    let started = state.server.drain.request();
    Ok(Json(json!({
        "draining": true,
        "started": started,
        "window_ms": state.server.config.drain_window_ms,
        "sessions": state.server.hub.session_count(),
    })))
}

/// One room in the list.
#[derive(Debug, Serialize)]
pub(super) struct RoomSummary {
    name: String,
    sessions: usize,
    users: usize,
    latest_seq: u64,
    /// In cluster mode, the nodes with members in it and their sessions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    nodes: Vec<RoomOnNode>,
}

/// A room's sessions on one node of the cluster.
#[derive(Debug, Serialize)]
pub(super) struct RoomOnNode {
    node: String,
    sessions: usize,
}

/// `GET /admin/api/rooms?limit=`: rooms with members, busiest (most
/// sessions) first.
pub(super) async fn list_rooms(
    State(state): State<Arc<AdminState>>,
    Query(page): Query<Page>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = page_limit(&state, page.limit);
    let here = state.server.cluster.as_ref().map(|n| n.id.clone());
    let local = state
        .server
        .hub
        .rooms()
        .into_iter()
        .map(|r| control::NodeRoom {
            name: r.name,
            sessions: r.sessions,
            users: r.users.len(),
        });
    // Per room: its sessions on every node, its users as the nodes count
    // them (each counts the whole room), and where it has members.
    let mut merged: HashMap<String, RoomSummary> = HashMap::new();
    let mut add = |node: Option<String>, r: control::NodeRoom| {
        let e = merged.entry(r.name.clone()).or_insert_with(|| RoomSummary {
            name: r.name,
            sessions: 0,
            users: 0,
            latest_seq: 0,
            nodes: Vec::new(),
        });
        e.sessions += r.sessions;
        e.users = e.users.max(r.users);
        if let Some(node) = node {
            e.nodes.push(RoomOnNode {
                node,
                sessions: r.sessions,
            });
        }
    };
    for r in local {
        add(here.clone(), r);
    }
    for reply in ask_others(&state, &control::Request::Rooms).await {
        for r in reply.rooms {
            add(Some(reply.node.clone()), r);
        }
    }
    let mut rooms: Vec<RoomSummary> = merged.into_values().collect();
    let total = rooms.len();
    rooms.sort_unstable_by(|a, b| {
        b.sessions
            .cmp(&a.sessions)
            .then_with(|| a.name.cmp(&b.name))
    });
    rooms.truncate(limit);
    let mut out = Vec::with_capacity(rooms.len());
    for mut r in rooms {
        r.latest_seq = latest_seq(&state, &r.name).await?;
        r.nodes.sort_by(|a, b| a.node.cmp(&b.node));
        out.push(r);
    }
    Ok(Json(json!({ "total": total, "rooms": out })))
}

async fn latest_seq(state: &AdminState, room: &str) -> ApiResult<u64> {
    state
        .server
        .store
        .latest_seq(room)
        .await
        .map_err(ApiError::from)
}

/// `GET /admin/api/rooms/{room}`: members and presence, of every node in
/// cluster mode (with `nodes`, its sessions per node). A room without
/// members but with history answers with `sessions: 0`.
pub(super) async fn get_room(
    State(state): State<Arc<AdminState>>,
    Path(room): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    valid_room(&room)?;
    let here = state.server.cluster.as_ref().map(|n| n.id.clone());
    let mut members: Vec<(Option<String>, control::NodeRoomMembers)> = Vec::new();
    if let Some(r) = state.server.hub.room(&room) {
        let local = control::NodeRoomMembers {
            sessions: r.sessions,
            users: r.users,
        };
        members.push((here, local));
    }
    let ask = control::Request::Room { room: room.clone() };
    for reply in ask_others(&state, &ask).await {
        if let Some(r) = reply.room {
            members.push((Some(reply.node), r));
        }
    }
    let latest_seq = latest_seq(&state, &room).await?;
    if members.is_empty() && latest_seq == 0 {
        return Err(ApiError::NotFound(format!("no room `{room}`")));
    }
    let sessions: usize = members.iter().map(|(_, r)| r.sessions).sum();
    let presence: std::collections::BTreeSet<&str> = (members.iter())
        .flat_map(|(_, r)| r.users.iter().map(String::as_str))
        .collect();
    let mut nodes: Vec<RoomOnNode> = (members.iter())
        .filter_map(|(node, r)| {
            node.clone().map(|node| RoomOnNode {
                node,
                sessions: r.sessions,
            })
        })
        .collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    let mut out = json!({
        "name": room,
        "sessions": sessions,
        "presence": presence,
        "latest_seq": latest_seq,
    });
    if !nodes.is_empty() {
        out["nodes"] = json!(nodes);
    }
    Ok(Json(out))
}

/// `POST /admin/api/rooms/{room}/messages`: the request body (any JSON
/// value) is stored as a message from `system` and delivered live. An
/// `Idempotency-Key` header makes retries safe.
pub(super) async fn publish(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    valid_room(&room)?;
    let config = &state.server.config;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("the body is not UTF-8".into()))?
        .trim();
    let body = RawValue::from_string(text.to_owned())
        .map_err(|e| ApiError::BadRequest(format!("the body is not one JSON value: {e}")))?;
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::BadRequest("Idempotency-Key must be ASCII".into()))?
                .to_owned(),
        ),
        None => None,
    };
    match check_append(config, key.as_deref(), Some(&body)) {
        Ok(()) => {}
        Err(AppendLimit::TooDeep { max }) => {
            return Err(ApiError::BadRequest(format!(
                "the body nests deeper than {max}"
            )));
        }
        Err(AppendLimit::KeyTooLong { max }) => {
            return Err(ApiError::BadRequest(format!(
                "Idempotency-Key is longer than {max} bytes"
            )));
        }
    }
    audit(
        &state,
        &caller,
        "publish",
        json!({ "room": room, "bytes": body.get().len(), "key": key }),
    )
    .await?;
    let (reply, rx) = oneshot::channel();
    let append = Append {
        room: Arc::from(room.as_str()),
        from: Arc::from(SYSTEM_USER),
        body,
        key,
        reply,
    };
    state.server.store.append(append).await?;
    let appended = rx.await.map_err(|_| StoreClosed)??;
    Ok(Json(json!({
        "room": room,
        "seq": appended.seq,
        "ts": appended.ts,
        "duplicate": appended.duplicate,
    })))
}

/// `GET /admin/api/users/{user}/messages`: every message of the user, as
/// JSON Lines (`application/x-ndjson`), one `{room, seq, from, ts, body,
/// erased}` object per line.
pub(super) async fn export_user(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(user): Path<String>,
) -> ApiResult<Response> {
    valid_user(&user)?;
    audit(&state, &caller, "export_user", json!({ "user": user })).await?;
    let messages = state.server.store.messages_by_user(&user).await?;
    let mut out = String::new();
    for (room, m) in &messages {
        let body = m
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str::<&RawValue>(b).ok());
        let line = json!({
            "room": room,
            "seq": m.seq,
            "from": m.from,
            "ts": m.ts,
            "body": body,
            "erased": body.is_none(),
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
}

/// `DELETE /admin/api/users/{user}/messages`: erases the bodies of every
/// message of the user. The messages keep their seqs; history and replay
/// show them as erased.
pub(super) async fn erase_user(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(user): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    valid_user(&user)?;
    audit(&state, &caller, "erase_user", json!({ "user": user })).await?;
    let erased = state.server.store.erase_user(&user).await?;
    info!(erased, "user messages erased");
    Ok(Json(json!({ "user": user, "erased": erased })))
}

/// `GET /admin/api/audit?limit=`: the latest audit entries, oldest first.
pub(super) async fn audit_log(
    State(state): State<Arc<AdminState>>,
    Query(page): Query<Page>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = page_limit(&state, page.limit.or(Some(100)));
    let entries = state.audit.tail(limit).await.map_err(ApiError::AuditRead)?;
    Ok(Json(json!({ "entries": entries })))
}

/// `POST /admin/api/backup`: a consistent copy of the whole store, as a
/// redb file in the response body (`application/octet-stream`, with its
/// `Content-Length`). It is taken from one read transaction while sends go
/// on: every message acknowledged before the request arrived is in it. The
/// copy is made in a temporary file in `data_dir` (so the server needs as
/// much free space there as the live data takes), unlinked at once and
/// streamed. Audited as `backup`. Restoring it: docs/operators.md.
pub(super) async fn backup(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    audit(&state, &caller, "backup", json!({})).await?;
    let started = std::time::Instant::now();
    let Some(local) = state.server.store.local() else {
        return Err(ApiError::Conflict(
            "cluster mode keeps history in NATS JetStream: back up its stream with NATS's tools \
             (docs/cluster.md)"
                .to_owned(),
        ));
    };
    let snapshot = local
        .backup(
            &state.server.config.data_dir,
            state.server.config.backup_cache_bytes,
        )
        .await?;
    info!(
        bytes = snapshot.bytes,
        entries = snapshot.entries,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "backup taken"
    );
    let name = format!(
        "attachment; filename=\"switchboard-{}-{}.redb\"",
        snapshot.epoch,
        now_ms()
    );
    let file = tokio::fs::File::from_std(snapshot.file);
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::CONTENT_LENGTH, snapshot.bytes.to_string()),
        (header::CONTENT_DISPOSITION, name),
    ];
    let mut response = (headers, body).into_response();
    if let Ok(epoch) = header::HeaderValue::from_str(&snapshot.epoch) {
        response.headers_mut().insert(BACKUP_EPOCH_HEADER, epoch);
    }
    Ok(response)
}

/// The response header of a backup naming the epoch it was taken from.
pub const BACKUP_EPOCH_HEADER: &str = "x-switchboard-epoch";
