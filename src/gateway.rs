//! The gateway: TCP accept, TLS, the HTTP upgrade, and connection limits.
//!
//! It is the only module that knows about TCP, TLS and HTTP. It hands a
//! finished WebSocket and an [`Identity`] to a session and keeps nothing.
//! A connection that does not finish its handshakes within
//! `handshake_timeout_ms` is dropped; past `max_connections` the upgrade is
//! refused with HTTP 503.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::server::ServerState;
use crate::session::{Identity, Session};

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
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, remote)) => {
                backoff = Duration::from_millis(1);
                let conn = connection(stream, remote, tls.clone(), state.clone(), shutdown.clone());
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
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("WebSocket upgrade failed")]
    Upgrade(#[source] tokio_tungstenite::tungstenite::Error),
}

async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<ServerState>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let permit = state.connection_permits.clone().try_acquire_owned().ok();
    let timeout = state.config.handshake_timeout();
    let result = match tls {
        Some(acceptor) => {
            let handshake = async {
                let stream = acceptor.accept(stream).await.map_err(HandshakeError::Tls)?;
                upgrade(stream, remote, permit, &state).await
            };
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok((ws, identity, permit))) => {
                    serve(ws, identity, permit, state.clone(), shutdown).await;
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(HandshakeError::Timeout),
            }
        }
        None => {
            match tokio::time::timeout(timeout, upgrade(stream, remote, permit, &state)).await {
                Ok(Ok((ws, identity, permit))) => {
                    serve(ws, identity, permit, state.clone(), shutdown).await;
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(HandshakeError::Timeout),
            }
        }
    };
    if let Err(e) = result {
        state.metrics.handshake_failures.inc();
        debug!(%remote, error = %e, "handshake failed");
    }
}

type Upgraded<S> = (
    tokio_tungstenite::WebSocketStream<S>,
    Identity,
    OwnedSemaphorePermit,
);

/// Runs the HTTP upgrade. The callback checks the path, the connection
/// limit and the identity before the upgrade is accepted.
async fn upgrade<S>(
    stream: S,
    remote: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    state: &ServerState,
) -> Result<Upgraded<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = &state.config;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(config.read_buffer_bytes)
        .write_buffer_size(config.write_buffer_bytes)
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes));
    let mut user = None;
    let has_permit = permit.is_some();
    // The error type is tungstenite's `Callback` contract, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != WS_PATH {
            return Err(reject(StatusCode::NOT_FOUND, "only /ws upgrades"));
        }
        if !has_permit {
            return Err(reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is at its connection limit; retry later",
            ));
        }
        let name = request.uri().query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "user")
                .map(|(_, v)| v.into_owned())
        });
        match name {
            None => Err(reject(
                StatusCode::UNAUTHORIZED,
                "dev mode: pass ?user=NAME",
            )),
            Some(name) => match protocol::names::validate_user(&name) {
                Ok(()) => {
                    user = Some(name);
                    Ok(response)
                }
                Err(e) => Err(reject(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid user: {e}"),
                )),
            },
        }
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config))
        .await
        .map_err(HandshakeError::Upgrade)?;
    match (user, permit) {
        (Some(user), Some(permit)) => Ok((
            ws,
            Identity {
                user: Arc::from(user),
                remote,
            },
            permit,
        )),
        // The callback accepted only with both, so this is unreachable in
        // practice; treat it as a failed upgrade rather than panic.
        _ => Err(HandshakeError::Upgrade(
            tokio_tungstenite::tungstenite::Error::ConnectionClosed,
        )),
    }
}

fn reject(status: StatusCode, why: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why.to_owned()));
    *response.status_mut() = status;
    response
}

async fn serve<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    identity: Identity,
    _permit: OwnedSemaphorePermit,
    state: Arc<ServerState>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", id = format_args!("{id:016x}"), user = %identity.user, remote = %identity.remote);
    state.metrics.connections_open.inc();
    let session = Session::new(ws, id, identity, state.clone(), shutdown);
    let reason = session.run().instrument(span.clone()).await;
    state.metrics.connections_open.dec();
    span.in_scope(|| debug!(reason = reason.as_str(), "session closed"));
}
