//! Reconnecting a lost connection the way the Rust client does: which ends
//! of a connection call for it and how long to wait come from
//! `switchboard_client::backoff` (PROTOCOL.md §9 and §11, the table in
//! `protocol/reconnect-policy.json`); this module adds only what a load
//! generator needs on top: a bound on the attempts and where each attempt
//! goes (the next URL). It decides only; the scenarios keep their own rooms
//! and seqs and do the re-joining, and nothing here retries past its bound.

use std::time::Duration;

use switchboard_client::backoff::{self, Action, BackoffPolicy};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Common;

/// The longest pause between two attempts: a run is minutes long, so the
/// client's 30 s cap would outlast the runs that measure a recovery.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How a scenario reconnects: `--reconnect-attempts`, `--reconnect-backoff-ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub attempts: u32,
    /// The first backoff step (the client's `BackoffPolicy::initial`).
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

    /// The client's delays with this policy's first step and cap; the
    /// multiplier, jitter and "immediate" spread are the client's defaults.
    pub fn delays(&self) -> BackoffPolicy {
        BackoffPolicy {
            initial: self.backoff,
            max: MAX_BACKOFF,
            ..BackoffPolicy::default()
        }
    }

    /// The pause before attempt `k` (0-based) after an end of class `how`,
    /// as the client waits: the delay of `how` before the first attempt,
    /// then a backoff step per failed attempt (a failed connect backs off;
    /// only a backoff counts as a step).
    pub fn pause(&self, k: u32, how: Action) -> Duration {
        let (action, steps) = match (k, how) {
            (0, how) => (how, 0),
            (k, Action::Backoff) => (Action::Backoff, k),
            (k, _) => (Action::Backoff, k - 1),
        };
        self.delays()
            .delay(action, steps, None, &mut rand::rng())
            .unwrap_or(Duration::ZERO)
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
/// is killed, which the client backs off from): the client's rule.
pub fn after(code: Option<u16>) -> Action {
    code.map_or(Action::Backoff, backoff::close_action)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_close_table_decides() {
        assert_eq!(after(None), Action::Backoff);
        assert_eq!(after(Some(4200)), Action::Immediate);
        assert_eq!(after(Some(1001)), Action::Immediate);
        assert_eq!(after(Some(1012)), Action::Immediate);
        assert_eq!(after(Some(4100)), Action::Backoff);
        assert_eq!(after(Some(1011)), Action::Backoff);
        assert_eq!(after(Some(1008)), Action::Backoff);
        assert_eq!(after(Some(1000)), Action::Stop);
        assert_eq!(after(Some(4001)), Action::Stop);
        assert_eq!(after(Some(4009)), Action::Stop);
        assert_eq!(after(Some(4050)), Action::Stop);
        assert_eq!(after(Some(4250)), Action::Immediate);
        assert_eq!(after(Some(4150)), Action::Backoff);
        for code in [1000, 1001, 1006, 1008, 3000, 4001, 4101, 4200, 4300] {
            assert_eq!(after(Some(code)), backoff::close_action(code), "{code}");
        }
    }

    fn within(d: Duration, low_ms: u64, high_ms: u64) -> bool {
        d >= Duration::from_millis(low_ms) && d <= Duration::from_millis(high_ms)
    }

    #[test]
    fn attempts_go_round_the_urls_and_back_off_as_the_client_does() {
        let p = Policy {
            attempts: 10,
            backoff: Duration::from_millis(100),
        };
        assert_eq!(p.target(0, 0, 3), 1);
        assert_eq!(p.target(0, 1, 3), 2);
        assert_eq!(p.target(0, 2, 3), 0);
        assert_eq!(p.target(2, 0, 3), 0);
        assert_eq!(p.target(0, 0, 1), 0);
        let immediate = BackoffPolicy::default().at_once_jitter.as_millis() as u64;
        for _ in 0..20 {
            assert!(within(p.pause(0, Action::Immediate), 0, immediate));
            // Each step drawn from its upper half: 100, 200, 400, ... 2000.
            assert!(within(p.pause(0, Action::Backoff), 50, 100));
            assert!(within(p.pause(1, Action::Backoff), 100, 200));
            assert!(within(p.pause(1, Action::Immediate), 50, 100));
            assert!(within(p.pause(2, Action::Immediate), 100, 200));
            assert!(within(p.pause(3, Action::Immediate), 200, 400));
            assert!(within(p.pause(9, Action::Immediate), 1000, 2000));
            assert!(within(p.pause(40, Action::Backoff), 1000, 2000));
        }
        assert_eq!(p.pause(0, Action::Stop), Duration::ZERO);
        assert!(!Policy { attempts: 0, ..p }.enabled());
    }
}
