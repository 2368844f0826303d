//! The token-expiry timer: when a session's token needs attention, the
//! `token_expiring` warning, and the close (4001) at expiry.
//!
//! It owns the timing only: it must not verify tokens (that is
//! `auth.rs`, through `refresh.rs`) and writes nothing but the
//! warning.

use std::pin::Pin;
use std::task::Poll;

use protocol::ServerFrame;

use super::{CloseReason, Flow, Session, Transport};
use crate::auth::AuthError;

/// The token's one timer, on the heap and only while the token expires:
/// most of the time a session has none, and then its state holds only the
/// empty option.
pub(super) type TokenTimer = Option<Pin<Box<tokio::time::Sleep>>>;

/// Fires when the token timer, if any, does.
pub(super) fn token_alarm(timer: &mut TokenTimer) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match timer {
        Some(t) => t.as_mut().poll(cx),
        None => Poll::Pending,
    })
}

impl<S: Transport> Session<S> {
    /// Moves `timer` to the token's next deadline when the token or its
    /// warning state changed; reset rather than replaced, so that the loop
    /// registers no timer per iteration.
    pub(super) fn rearm_token_timer(&mut self, timer: &mut TokenTimer) {
        if !std::mem::take(&mut self.token_changed) {
            return;
        }
        match (self.token_deadline(), timer.as_mut()) {
            (Some(at), Some(t)) => t.as_mut().reset(at),
            (Some(at), None) => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
            (None, _) => *timer = None,
        }
    }

    /// When the token next needs attention: the warning, then the expiry
    /// (plus the verifier's leeway). `None` for a session without a token.
    fn token_deadline(&self) -> Option<tokio::time::Instant> {
        let expires_at = self.identity.principal.expires_at?;
        let leeway = self.state.verifier.as_ref().map_or(0, |v| v.leeway_secs());
        let at = if self.expiry_warned {
            expires_at.saturating_add(leeway)
        } else {
            expires_at.saturating_sub(self.state.config.token_expiry_warning_secs)
        };
        let from_now = at.saturating_sub(crate::auth::now_unix());
        Some(tokio::time::Instant::now() + std::time::Duration::from_secs(from_now))
    }

    /// The timer fired: warn once, then end the session as unauthorized.
    pub(super) async fn on_token_deadline(&mut self) -> Flow {
        self.token_changed = true;
        let Some(expires_at) = self.identity.principal.expires_at else {
            return Ok(());
        };
        if !self.expiry_warned {
            self.expiry_warned = true;
            return self.send(&ServerFrame::TokenExpiring { expires_at }).await;
        }
        self.state.metrics.auth_failed(AuthError::Expired.label());
        self.close_detail = Some(AuthError::Expired.to_string());
        Err(CloseReason::Unauthorized)
    }
}
