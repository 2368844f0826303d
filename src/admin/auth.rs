//! Bearer-token authentication of the admin API.
//!
//! It owns the token check and the caller's identity (a fingerprint of the
//! token, never the token). It must not log, echo or store the token: only
//! its SHA-256 digest is kept in memory, and presented tokens are compared
//! by digest, so the comparison's timing says nothing about the token.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::digest::{SHA256, digest};
use tracing::debug;

use super::AdminState;
use super::error::ApiError;
use crate::config::Secret;

/// The configured token, as its digest.
pub(super) struct TokenCheck {
    digest: Vec<u8>,
    fingerprint: String,
}

impl TokenCheck {
    pub(super) fn new(token: &Secret) -> TokenCheck {
        let d = digest(&SHA256, token.expose().as_bytes());
        let hex: String = d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
        TokenCheck {
            digest: d.as_ref().to_vec(),
            fingerprint: format!("token:{hex}"),
        }
    }

    fn matches(&self, presented: &str) -> bool {
        digest(&SHA256, presented.as_bytes()).as_ref() == self.digest.as_slice()
    }
}

/// Who made an admin request: put into the request by [`require_token`].
#[derive(Debug, Clone)]
pub(super) struct Caller {
    /// `token:` and the first 8 hex digits of the token's SHA-256.
    pub who: String,
    /// The admin client's address.
    pub remote: Option<SocketAddr>,
}

/// Lets a request through only with `Authorization: Bearer <admin_token>`.
pub(super) async fn require_token(
    State(state): State<Arc<AdminState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let remote = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(check) = &state.token else {
        state.server.metrics.admin_unauthorized.inc();
        return ApiError::Unauthorized("no admin_token is configured on this server")
            .into_response();
    };
    match presented {
        Some(t) if check.matches(t) => {
            request.extensions_mut().insert(Caller {
                who: check.fingerprint.clone(),
                remote,
            });
            next.run(request).await
        }
        other => {
            state.server.metrics.admin_unauthorized.inc();
            debug!(?remote, path = ?request.uri().path(), "admin request refused");
            let why = if other.is_some() {
                "wrong admin token"
            } else {
                "missing `Authorization: Bearer <admin_token>`"
            };
            ApiError::Unauthorized(why).into_response()
        }
    }
}
