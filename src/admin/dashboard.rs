//! The live dashboard's static files, built into the binary.
//!
//! It owns `/dashboard` and its script and style sheet: fixed files
//! compiled in with `include_str!`, so the page works offline and loads
//! nothing from elsewhere. The page holds no data; it reads everything from
//! the admin API with the token the operator types in (see
//! `docs/operators.md`). It must not embed the token or any user data.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Only this origin's script, style and API; no inline code, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /dashboard`.
pub(super) async fn page() -> Response {
    file("text/html; charset=utf-8", PAGE)
}

/// `GET /dashboard/app.js`.
pub(super) async fn script() -> Response {
    file("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /dashboard/app.css`.
pub(super) async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}
