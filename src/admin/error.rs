//! The admin API's error: one variant per way a request fails, each keeping
//! its cause, and its JSON reply. Shared by the API handlers and the token
//! check in front of them; it imports neither.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::warn;

use super::audit::AuditError;
use crate::history::{AppendError, ReadError, StoreClosed};
use crate::store::BackupError;

/// Why an admin request failed; the reply is `{"error": code, "message": ...}`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The request cannot be served in this server's mode.
    #[error("{0}")]
    Conflict(String),
    #[error("the audit log cannot be written, so the action was not performed")]
    Audit(#[source] AuditError),
    #[error("the audit log cannot be read")]
    AuditRead(#[source] AuditError),
    #[error("the store cannot be read")]
    Read(#[from] ReadError),
    #[error("the store did not store it")]
    Write(#[from] AppendError),
    #[error("the store is closed")]
    Closed(#[from] StoreClosed),
    #[error("the backup could not be made")]
    Backup(#[from] BackupError),
}

impl ApiError {
    fn code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Write(AppendError::Unavailable { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            ApiError::Audit(_)
            | ApiError::AuditRead(_)
            | ApiError::Read(_)
            | ApiError::Write(_)
            | ApiError::Closed(_)
            | ApiError::Backup(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.code();
        if status.is_server_error() {
            let mut causes = String::new();
            let mut source = std::error::Error::source(&self);
            while let Some(e) = source {
                causes.push_str(": ");
                causes.push_str(&e.to_string());
                source = e.source();
            }
            warn!(error = %self, causes, "admin request failed");
        }
        let body = Json(json!({ "error": code, "message": self.to_string() }));
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"switchboard-admin\""),
            );
        }
        response
    }
}
