//! The gateway: TCP accept, TLS, the HTTP upgrade, authentication and
//! connection limits.
//!
//! It is the only module that knows about TCP, TLS and HTTP. It hands a
//! finished WebSocket and an authenticated [`Identity`] to a session and
//! keeps nothing. Its order of checks is cheapest first, so that an abusive
//! peer costs as little as possible:
//! 1. the per-IP handshake rate, before any TLS work (over it: dropped);
//! 2. the per-IP connection cap (HTTP 429), the global cap (HTTP 503);
//! 3. path, `Origin` allow-list (HTTP 403), then the token from
//!    `Authorization: Bearer` or `?token=` (HTTP 401 with the reason);
//! 4. without a token at the upgrade, a first `auth` frame within what is
//!    left of `handshake_timeout_ms` (else close 4001 with the reason).
//!
//! It must never log a token or an unbounded string from the peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use protocol::ClientRequest;
use std::net::IpAddr;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, warn};

use crate::auth::{AuthError, Principal};
use crate::close::{CloseReason, close_and_linger, close_frame};
use crate::demo::Route;
use crate::limits::{ConnGuard, Slots};
use crate::net::Peeked;
use crate::session::{Identity, Session};
use crate::state::ServerState;

/// The only path that upgrades.
const WS_PATH: &str = "/ws";
/// Longest wait after a failed `accept` (for example, out of descriptors).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts connections until `shutdown`, spawning one tracked task each.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<ServerState>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            // A draining node takes no new connections (`drain`).
            () = state.drain.requested() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, remote)) => {
                backoff = Duration::from_millis(1);
                let conn = connection(
                    stream,
                    remote,
                    tls.clone(),
                    state.clone(),
                    tracker.clone(),
                    shutdown.clone(),
                );
                tracker.spawn(conn);
            }
            Err(e) => {
                // Usually EMFILE: wait rather than spin, then try again.
                warn!(error = %e, ?backoff, "accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Why a handshake failed; logged at debug level only.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("handshake timed out")]
    Timeout,
    #[error("too many handshakes from this address")]
    HandshakeRate,
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("WebSocket upgrade failed")]
    Upgrade(#[source] tokio_tungstenite::tungstenite::Error),
    #[error("authentication failed")]
    Auth(#[source] AuthError),
    #[error("the first frame was not `auth`")]
    NoAuthFrame,
    #[error("the user is at its connection limit")]
    UserLimit,
    /// Not a failure: the connection asked for the demo page and got it.
    #[error("served the demo page")]
    ServedPage,
    #[error("reading the request line failed")]
    RequestLine(#[source] std::io::Error),
}

async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<ServerState>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let ip = remote.ip();
    // Cheapest check first: a flood of handshakes costs no TLS work.
    if state.limits.handshakes_per_ip.take(&ip).is_err() {
        state.metrics.rate_limited.inc();
        state.metrics.handshake_failures.inc();
        debug!(%remote, error = %HandshakeError::HandshakeRate, "handshake refused");
        return;
    }
    let _ = stream.set_nodelay(true);
    let admission = Admission {
        permit: state.connection_permits.clone().try_acquire_owned().ok(),
        ip_guard: state.limits.connections_per_ip.acquire(ip),
    };
    let started = tokio::time::Instant::now();
    let deadline = started + state.config.handshake_timeout();
    // The session runs in a task of its own, spawned once the handshake is
    // done, so that the handshake's states (TLS, HTTP upgrade, `auth`
    // frame) are freed rather than kept in every idle connection's task.
    // Each kind of handshake is boxed on its own: a plain one needs about
    // 2 KiB, a TLS one about 12 KiB, and a task sized for both would make
    // every plain connection reserve the TLS size while it upgrades.
    let result = match tls {
        Some(acceptor) => {
            let upgrading = async {
                let stream = acceptor.accept(stream).await.map_err(HandshakeError::Tls)?;
                upgrade(stream, remote, admission, &state).await
            };
            let handshaking = Box::pin(handshake(upgrading, deadline, &state));
            handshaking
                .await
                .map(|ready| spawn_session(ready, &state, &tracker, shutdown))
        }
        None => {
            let upgrading = upgrade(stream, remote, admission, &state);
            let handshaking = Box::pin(handshake(upgrading, deadline, &state));
            handshaking
                .await
                .map(|ready| spawn_session(ready, &state, &tracker, shutdown))
        }
    };
    if let Err(e) = result {
        if matches!(e, HandshakeError::ServedPage) {
            return;
        }
        state.metrics.handshake_failures.inc();
        debug!(%remote, error = %e, "handshake failed");
    }
}

/// Completes `upgrading` (the TLS handshake, where there is TLS, and the
/// HTTP upgrade) and then authentication, all by `deadline`.
///
/// A combinator rather than an `async fn`: an `async fn` would hold
/// `upgrading` twice, as its argument and inside the timeout it awaits.
fn handshake<'a, S>(
    upgrading: impl Future<Output = Result<Upgraded<Peeked<S>>, HandshakeError>> + 'a,
    deadline: tokio::time::Instant,
    state: &'a Arc<ServerState>,
) -> impl Future<Output = Result<Ready<Peeked<S>>, HandshakeError>> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    tokio::time::timeout_at(deadline, upgrading).then(move |upgraded| async move {
        match upgraded {
            Ok(Ok(upgraded)) => authenticate(upgraded, deadline, state).await,
            Ok(Err(e)) => Err(e),
            Err(_) => Err(HandshakeError::Timeout),
        }
    })
}

/// What the connection holds from the moment it is accepted: its slot in
/// the global and per-IP counts. Either missing means the upgrade is refused.
struct Admission {
    permit: Option<OwnedSemaphorePermit>,
    ip_guard: Option<ConnGuard<IpAddr>>,
}

/// Whom the upgrade established, or that the first frame must say.
enum Who {
    Known(Principal, ConnGuard<Arc<str>>),
    /// Authentication is on and no token came with the upgrade.
    AwaitingAuthFrame,
}

struct Upgraded<S> {
    ws: WebSocketStream<S>,
    remote: SocketAddr,
    who: Who,
    /// The rooms of the upgrade's `?join=`, joined as the session starts.
    joins: Vec<String>,
    /// Held for the connection's life: they free its slots on drop.
    _slots: (OwnedSemaphorePermit, ConnGuard<IpAddr>),
}

/// Runs the HTTP upgrade. The callback checks the path, the connection
/// limits, the origin and the token before the upgrade is accepted.
async fn upgrade<S>(
    stream: S,
    remote: SocketAddr,
    admission: Admission,
    state: &ServerState,
) -> Result<Upgraded<Peeked<S>>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = &state.config;
    // `GET /` and the demo page's files are answered here; all else upgrades.
    let stream = match crate::demo::route(stream, config.demo_page_enabled()).await {
        Ok(Route::Upgrade(stream)) => stream,
        Ok(Route::Served) => return Err(HandshakeError::ServedPage),
        Err(e) => return Err(HandshakeError::RequestLine(e)),
    };
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(config.read_buffer_bytes)
        .write_buffer_size(config.write_buffer_bytes)
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes));
    let mut who = None;
    let mut auth_error = None;
    let mut joins = Vec::new();
    let Admission { permit, ip_guard } = admission;
    let (has_permit, has_ip_slot) = (permit.is_some(), ip_guard.is_some());
    // The error type is tungstenite's `Callback` contract, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != WS_PATH {
            return Err(reject(StatusCode::NOT_FOUND, "only /ws upgrades"));
        }
        joins = upgrade_joins(request, config.max_rooms_per_session)?;
        if !has_ip_slot {
            return Err(retry_later(
                reject(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from this address",
                ),
                config.refusal_retry_after_secs,
            ));
        }
        if !has_permit {
            return Err(retry_later(
                reject(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is at its connection limit; retry later",
                ),
                config.refusal_retry_after_secs,
            ));
        }
        let Some(verifier) = &state.verifier else {
            let principal = Principal::dev(dev_user(request)?);
            who = Some(admit_user(state, principal)?);
            return Ok(response);
        };
        if let Some(origin) = request.headers().get("origin") {
            let allowed = origin
                .to_str()
                .is_ok_and(|o| config.allowed_origins.iter().any(|a| a == o));
            if !allowed {
                return Err(reject(
                    StatusCode::FORBIDDEN,
                    "this Origin is not allowed (allowed_origins)",
                ));
            }
        }
        match presented_token(request) {
            None => {
                who = Some(Who::AwaitingAuthFrame);
                Ok(response)
            }
            Some(token) => match verifier.verify(&token) {
                Ok(principal) => {
                    who = Some(admit_user(state, principal)?);
                    Ok(response)
                }
                Err(e) => {
                    // Counted before the refusal is written, so that a
                    // client that sees the 401 also sees it counted.
                    state.metrics.auth_failed(e.label());
                    let refusal = reject(StatusCode::UNAUTHORIZED, &e.to_string());
                    auth_error = Some(e);
                    Err(refusal)
                }
            },
        }
    };
    let upgraded =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config)).await;
    if let Some(e) = auth_error {
        return Err(HandshakeError::Auth(e));
    }
    let ws = upgraded.map_err(HandshakeError::Upgrade)?;
    match (who, permit, ip_guard) {
        (Some(who), Some(permit), Some(ip_guard)) => Ok(Upgraded {
            ws,
            remote,
            who,
            joins,
            _slots: (permit, ip_guard),
        }),
        // The callback accepted only with all three, so this is unreachable
        // in practice; treat it as a failed upgrade rather than panic.
        _ => Err(HandshakeError::Upgrade(
            tokio_tungstenite::tungstenite::Error::ConnectionClosed,
        )),
    }
}

/// Dev mode's identity: `?user=NAME`.
#[allow(clippy::result_large_err)]
fn dev_user(request: &Request) -> Result<Arc<str>, ErrorResponse> {
    match query_param(request, "user") {
        None => Err(reject(
            StatusCode::UNAUTHORIZED,
            "dev mode: pass ?user=NAME",
        )),
        Some(name) => match protocol::names::validate_user(&name) {
            Ok(()) => Ok(Arc::from(name)),
            Err(e) => Err(reject(
                StatusCode::BAD_REQUEST,
                &format!("invalid user: {e}"),
            )),
        },
    }
}

/// The rooms of `?join=` (repeatable), in order. A name that breaks the
/// naming rules, or more rooms than a session may join, refuses the upgrade
/// with 400: a client that joins in the URL learns of a bad URL at once.
#[allow(clippy::result_large_err)]
fn upgrade_joins(request: &Request, max_rooms: usize) -> Result<Vec<String>, ErrorResponse> {
    let Some(query) = request.uri().query() else {
        return Ok(Vec::new());
    };
    let mut rooms: Vec<String> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k != "join" {
            continue;
        }
        if let Err(e) = protocol::names::validate_room(&v) {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                &format!("invalid room in join: {e}"),
            ));
        }
        if !rooms.iter().any(|r| *r == v) {
            rooms.push(v.into_owned());
        }
        if rooms.len() > max_rooms {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                &format!("a session may join at most {max_rooms} rooms"),
            ));
        }
    }
    Ok(rooms)
}

fn query_param(request: &Request, key: &str) -> Option<String> {
    request.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    })
}

/// The token of the upgrade request: `Authorization: Bearer`, else `?token=`.
fn presented_token(request: &Request) -> Option<String> {
    let header = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    header.or_else(|| query_param(request, "token"))
}

/// Takes a slot of the user's connection cap, or refuses with HTTP 429.
#[allow(clippy::result_large_err)]
fn admit_user(state: &ServerState, principal: Principal) -> Result<Who, ErrorResponse> {
    match state
        .limits
        .connections_per_user
        .acquire(principal.user.clone())
    {
        Some(guard) => Ok(Who::Known(principal, guard)),
        None => Err(retry_later(
            reject(
                StatusCode::TOO_MANY_REQUESTS,
                "this user is at its connection limit",
            ),
            state.config.refusal_retry_after_secs,
        )),
    }
}

fn reject(status: StatusCode, why: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why.to_owned()));
    *response.status_mut() = status;
    response
}

/// Adds `Retry-After: secs` to a refusal that a client may retry: the
/// clients' policy (PROTOCOL.md §11) waits at least that long.
fn retry_later(mut response: ErrorResponse, secs: u64) -> ErrorResponse {
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from(secs));
    response
}

/// A connection that passed every check: what its session starts from.
struct Ready<S> {
    ws: WebSocketStream<S>,
    joins: Vec<String>,
    identity: Identity,
    slots: Slots,
}

/// Completes authentication (a first `auth` frame where needed).
async fn authenticate<S>(
    upgraded: Upgraded<Peeked<S>>,
    deadline: tokio::time::Instant,
    state: &Arc<ServerState>,
) -> Result<Ready<Peeked<S>>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Upgraded {
        mut ws,
        remote,
        who,
        joins,
        _slots,
    } = upgraded;
    let (principal, user_guard) = match who {
        Who::Known(principal, guard) => (principal, guard),
        Who::AwaitingAuthFrame => {
            // The client waits for the 101 before it sends `auth`.
            ws.get_mut().release();
            if let Err(e) = futures_util::SinkExt::flush(&mut ws).await {
                return Err(HandshakeError::Upgrade(e));
            }
            let principal = match auth_frame(&mut ws, deadline, state).await {
                Ok(p) => p,
                Err(e) => {
                    if let HandshakeError::Auth(a) = &e {
                        state.metrics.auth_failed(a.label());
                    }
                    let (reason, detail) = match &e {
                        HandshakeError::Auth(a) => (CloseReason::Unauthorized, a.to_string()),
                        HandshakeError::Timeout => (
                            CloseReason::Unauthorized,
                            "no `auth` frame within the handshake timeout".to_owned(),
                        ),
                        _ => (
                            CloseReason::Unauthorized,
                            "the first frame must be `auth {token}`".to_owned(),
                        ),
                    };
                    close_with(&mut ws, reason, &detail, state).await;
                    state.metrics.session_closed(reason);
                    return Err(e);
                }
            };
            match state
                .limits
                .connections_per_user
                .acquire(principal.user.clone())
            {
                Some(guard) => (principal, guard),
                None => {
                    let reason = CloseReason::TooManyConnections;
                    close_with(
                        &mut ws,
                        reason,
                        "this user is at its connection limit",
                        state,
                    )
                    .await;
                    state.metrics.session_closed(reason);
                    return Err(HandshakeError::UserLimit);
                }
            }
        }
    };
    Ok(Ready {
        ws,
        joins,
        identity: Identity { principal, remote },
        slots: Slots {
            permit: _slots.0,
            ip: _slots.1,
            user: user_guard,
        },
    })
}

/// Reads frames until the first request, which must be `auth`, by `deadline`.
async fn auth_frame<S>(
    ws: &mut WebSocketStream<S>,
    deadline: tokio::time::Instant,
    state: &ServerState,
) -> Result<Principal, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(verifier) = &state.verifier else {
        return Err(HandshakeError::NoAuthFrame);
    };
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| HandshakeError::Timeout)?;
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            // Control frames before `auth` are fine; tungstenite answers pings.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(_)) => return Err(HandshakeError::NoAuthFrame),
            Some(Err(e)) => return Err(HandshakeError::Upgrade(e)),
            None => {
                return Err(HandshakeError::Upgrade(
                    tokio_tungstenite::tungstenite::Error::ConnectionClosed,
                ));
            }
        };
        state.metrics.bytes_in.add(text.len() as u64);
        return match protocol::decode_request(text.as_str(), state.config.max_body_depth) {
            Ok(protocol::Request {
                body: ClientRequest::Auth { token },
                ..
            }) => verifier
                .verify(token.expose())
                .map_err(HandshakeError::Auth),
            _ => Err(HandshakeError::NoAuthFrame),
        };
    }
}

/// Sends a close frame with `detail` as its reason and waits briefly for
/// the reply. The reason is cut to what a close frame can carry.
pub(crate) async fn close_with<S>(
    ws: &mut WebSocketStream<S>,
    reason: CloseReason,
    detail: &str,
    state: &ServerState,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(code) = reason.code() else {
        return;
    };
    // The write is bounded by the linger too: a connection that never
    // became a session holds its slots no longer than that per step.
    let linger = state.config.close_linger();
    close_and_linger(ws, close_frame(code, detail), linger, linger).await;
}

/// Lets the held 101 go: the session calls it once `welcome` is queued, so
/// the 101 and `welcome` leave in one write.
fn release<S>(stream: &mut Peeked<S>) {
    stream.release();
}

/// Starts the session of a connection that passed every check, as a
/// tracked task of its own.
fn spawn_session<S>(
    ready: Ready<Peeked<S>>,
    state: &Arc<ServerState>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ready {
        ws,
        joins,
        identity,
        slots,
    } = ready;
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    // At debug level: an enabled span costs every connection its formatted
    // fields and every poll an enter and exit. Warnings from a session name
    // it in their own fields instead.
    let span = debug_span!("session", id = format_args!("{id:016x}"), user = %identity.principal.user, remote = %identity.remote);
    state.metrics.connections_open.inc();
    let session = Session::new(
        ws,
        id,
        identity,
        slots,
        state.clone(),
        shutdown,
        release::<S>,
    );
    tracker.spawn(session.run(joins).instrument(span));
}
