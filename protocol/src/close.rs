//! Close codes: what the server's close frame tells a client to do.
//!
//! 4000–4099 mean "do not reconnect", 4100–4199 "reconnect with backoff"
//! (the close reason may carry `retry_after_ms=N`), 4200–4299 "reconnect at
//! once". Standard codes are used where they fit.

/// What a client should do after a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Do not reconnect without fixing something first.
    Never,
    /// Reconnect after a backoff, at least `retry_after_ms` when given.
    Backoff,
    /// Reconnect at once, resuming with `since`.
    AtOnce,
}

/// A close code with its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode {
    pub code: u16,
    pub name: &'static str,
    pub reconnect: Reconnect,
}

macro_rules! codes {
    ($($(#[$doc:meta])* $konst:ident = $code:literal, $name:literal, $rec:ident;)*) => {
        $( $(#[$doc])* pub const $konst: CloseCode = CloseCode { code: $code, name: $name, reconnect: Reconnect::$rec }; )*
        /// Every close code the server sends, in the order of the spec's table.
        pub const ALL: &[CloseCode] = &[$($konst),*];
    };
}

codes! {
    /// Normal close, after the client's own close.
    NORMAL = 1000, "normal", Never;
    /// The server is shutting down.
    GOING_AWAY = 1001, "going_away", AtOnce;
    /// A text frame was not valid UTF-8.
    INVALID_UTF8 = 1007, "invalid_utf8", Never;
    /// A frame or message was larger than the server's limit.
    TOO_BIG = 1009, "message_too_big", Never;
    /// The server hit an internal error.
    INTERNAL = 1011, "internal_error", Backoff;
    /// The server is restarting.
    SERVICE_RESTART = 1012, "service_restart", AtOnce;
    /// The server is overloaded; try again later.
    TRY_AGAIN_LATER = 1013, "try_again_later", Backoff;
    /// Authentication failed or expired.
    UNAUTHORIZED = 4001, "unauthorized", Never;
    /// The client broke the protocol in a way that cannot be answered with an error frame.
    PROTOCOL_VIOLATION = 4002, "protocol_violation", Never;
    /// The session is not allowed to stay.
    FORBIDDEN = 4003, "forbidden", Never;
    /// An operator kicked the session.
    KICKED = 4009, "kicked", Never;
    /// The session's outbound queue overflowed: resume with `since`.
    SLOW_CONSUMER = 4100, "slow_consumer", Backoff;
    /// The session kept exceeding its rate limits.
    RATE_LIMITED = 4101, "rate_limited", Backoff;
    /// The client sent nothing in the heartbeat interval after a ping.
    HEARTBEAT_TIMEOUT = 4102, "heartbeat_timeout", Backoff;
    /// The server asks the client to reconnect now (possibly elsewhere).
    RECONNECT = 4200, "reconnect", AtOnce;
}

/// Looks a code up by number.
pub fn lookup(code: u16) -> Option<CloseCode> {
    ALL.iter().copied().find(|c| c.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_policy() {
        for c in ALL {
            let expected = match c.code {
                4000..=4099 => Some(Reconnect::Never),
                4100..=4199 => Some(Reconnect::Backoff),
                4200..=4299 => Some(Reconnect::AtOnce),
                _ => None,
            };
            if let Some(r) = expected {
                assert_eq!(c.reconnect, r, "{}", c.name);
            }
        }
    }
}
