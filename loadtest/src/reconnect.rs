//! Reconnecting a lost connection: which ends of a connection call for it
//! (the protocol's close table, or a socket that just died), how many
//! attempts and how long to wait between them, and where each attempt goes
//! (the next URL). It decides only; the scenarios keep their own rooms and
//! seqs and do the re-joining, and nothing here retries past its bound.

use std::time::Duration;

use protocol::close::{self, Reconnect};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Common;

/// The longest pause between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How a scenario reconnects: `--reconnect-attempts`, `--reconnect-backoff-ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub attempts: u32,
    pub backoff: Duration,
}

impl Policy {
    pub fn of(common: &Common) -> Policy {
        Policy {
            attempts: common.reconnect_attempts,
            backoff: Duration::from_millis(common.reconnect_backoff_ms),
        }
    }

    /// Whether lost connections are reconnected at all.
    pub fn enabled(&self) -> bool {
        self.attempts > 0
    }

    /// The pause before attempt `k` (0-based) after an end of class `how`:
    /// none before the first after "reconnect at once" or a dead socket,
    /// the base before the first after "reconnect with backoff"; then the
    /// base doubling per failed attempt, at most [`MAX_BACKOFF`].
    pub fn pause(&self, k: u32, how: Reconnect) -> Duration {
        if k == 0 {
            return match how {
                Reconnect::Backoff => self.backoff.min(MAX_BACKOFF),
                Reconnect::AtOnce | Reconnect::Never => Duration::ZERO,
            };
        }
        let doubled = self
            .backoff
            .saturating_mul(1u32.checked_shl(k - 1).unwrap_or(u32::MAX));
        doubled.min(MAX_BACKOFF)
    }

    /// The target of attempt `k` (0-based) for a connection that was on
    /// target `from`: the next URL first, then round the list.
    pub fn target(&self, from: usize, k: u32, targets: usize) -> usize {
        (from + 1 + k as usize) % targets.max(1)
    }
}

/// The code of a close frame: `None` for a close without one (and for any
/// other frame).
pub fn close_code(msg: &Message) -> Option<u16> {
    match msg {
        Message::Close(Some(c)) => Some(u16::from(c.code)),
        _ => None,
    }
}

/// What to do after a connection ended with close code `code`, or died
/// without a close frame (`None`: EOF, a reset, as when the server process
/// is killed). Codes outside the table follow its ranges: 4000–4099 never,
/// 4100–4199 with backoff, 4200–4299 at once; any other with backoff.
pub fn after(code: Option<u16>) -> Reconnect {
    let Some(code) = code else {
        return Reconnect::AtOnce;
    };
    if let Some(c) = close::lookup(code) {
        return c.reconnect;
    }
    match code {
        1000 | 4000..=4099 => Reconnect::Never,
        4200..=4299 => Reconnect::AtOnce,
        _ => Reconnect::Backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_close_table_decides() {
        assert_eq!(after(None), Reconnect::AtOnce);
        assert_eq!(after(Some(4200)), Reconnect::AtOnce);
        assert_eq!(after(Some(1001)), Reconnect::AtOnce);
        assert_eq!(after(Some(1012)), Reconnect::AtOnce);
        assert_eq!(after(Some(4100)), Reconnect::Backoff);
        assert_eq!(after(Some(1011)), Reconnect::Backoff);
        assert_eq!(after(Some(1000)), Reconnect::Never);
        assert_eq!(after(Some(4001)), Reconnect::Never);
        assert_eq!(after(Some(4009)), Reconnect::Never);
        assert_eq!(after(Some(4050)), Reconnect::Never);
        assert_eq!(after(Some(4250)), Reconnect::AtOnce);
        assert_eq!(after(Some(4150)), Reconnect::Backoff);
    }

    #[test]
    fn attempts_go_round_the_urls_and_back_off() {
        let p = Policy {
            attempts: 10,
            backoff: Duration::from_millis(100),
        };
        assert_eq!(p.target(0, 0, 3), 1);
        assert_eq!(p.target(0, 1, 3), 2);
        assert_eq!(p.target(0, 2, 3), 0);
        assert_eq!(p.target(2, 0, 3), 0);
        assert_eq!(p.target(0, 0, 1), 0);
        assert_eq!(p.pause(0, Reconnect::AtOnce), Duration::ZERO);
        assert_eq!(p.pause(0, Reconnect::Backoff), Duration::from_millis(100));
        assert_eq!(p.pause(1, Reconnect::AtOnce), Duration::from_millis(100));
        assert_eq!(p.pause(2, Reconnect::AtOnce), Duration::from_millis(200));
        assert_eq!(p.pause(3, Reconnect::AtOnce), Duration::from_millis(400));
        assert_eq!(p.pause(9, Reconnect::AtOnce), MAX_BACKOFF);
        assert_eq!(p.pause(40, Reconnect::AtOnce), MAX_BACKOFF);
        assert!(!Policy { attempts: 0, ..p }.enabled());
    }
}
