//! The reconnect policy: what to do after a connection ends, by close code or
//! HTTP refusal (PROTOCOL.md §2 and §9), and how long to wait.
//!
//! This module owns the decision and the delay only. It must not sleep, touch
//! sockets or know about rooms: the driver sleeps for the delay it returns
//! while it keeps serving the application.

use std::time::Duration;

use protocol::close::{self, Reconnect};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Disconnect;

/// The delays of the reconnect policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The first backoff delay, doubled on each consecutive failure. Default 250 ms.
    pub initial: Duration,
    /// The longest backoff delay. Default 30 s.
    pub max: Duration,
    /// The largest random delay before an "at once" reconnect (1001, 1012,
    /// 4200–4299), so that the clients of a restarted server do not all
    /// arrive in the same instant. Default 500 ms.
    pub at_once_jitter: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
            at_once_jitter: Duration::from_millis(500),
        }
    }
}

/// What to do after a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Do not reconnect: the application must fix something first.
    Stop,
    /// Reconnect after this delay.
    Retry(Duration),
}

/// How a disconnect is classed, before any delay is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Never reconnect.
    Stop,
    /// Reconnect with exponential backoff, waiting at least `floor`.
    Backoff { floor: Option<Duration> },
    /// Reconnect at once, with a little jitter.
    AtOnce,
}

/// Classes a disconnect by the rules of PROTOCOL.md: the close-code table,
/// its ranges for codes it does not list, and the HTTP refusals.
pub fn classify(reason: &Disconnect) -> Class {
    match reason {
        Disconnect::Closed { code, reason } => classify_close(*code, reason),
        Disconnect::Refused {
            status,
            retry_after,
            ..
        } => match status {
            429 | 503 => Class::Backoff {
                floor: *retry_after,
            },
            // 400, 401, 403 and 404 will not change by retrying.
            400..=499 => Class::Stop,
            _ => Class::Backoff {
                floor: *retry_after,
            },
        },
        Disconnect::ConnectFailed(_) | Disconnect::Lost(_) | Disconnect::Silent(_) => {
            Class::Backoff { floor: None }
        }
        Disconnect::ClientClosed => Class::Stop,
    }
}

fn classify_close(code: u16, reason: &str) -> Class {
    let floor = retry_after_ms(reason).map(Duration::from_millis);
    let by_table = close::lookup(code).map(|c| c.reconnect);
    let rule = by_table.or(match code {
        4000..=4099 => Some(Reconnect::Never),
        4100..=4199 => Some(Reconnect::Backoff),
        4200..=4299 => Some(Reconnect::AtOnce),
        _ => None,
    });
    match rule {
        Some(Reconnect::Never) => Class::Stop,
        Some(Reconnect::AtOnce) => Class::AtOnce,
        // An unlisted code (1005 no status, 1006 abnormal, ...) is a lost
        // connection: back off, as for a dropped socket.
        Some(Reconnect::Backoff) | None => Class::Backoff { floor },
    }
}

/// The server-advised delay in a close reason: `retry_after_ms=N`.
pub fn retry_after_ms(reason: &str) -> Option<u64> {
    let (_, rest) = reason.split_once("retry_after_ms=")?;
    let digits: &str = rest
        .find(|c: char| !c.is_ascii_digit())
        .map_or(rest, |end| &rest[..end]);
    digits.parse().ok()
}

/// Consecutive-failure state of the policy, with its jitter source.
#[derive(Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
    rng: StdRng,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Backoff {
        Backoff {
            policy,
            failures: 0,
            rng: StdRng::from_os_rng(),
        }
    }

    /// A policy with a fixed jitter sequence, for tests.
    pub fn seeded(policy: BackoffPolicy, seed: u64) -> Backoff {
        Backoff {
            policy,
            failures: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A session started (the server said `welcome`): the next failure
    /// starts the backoff from `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Decides what follows `reason` and draws the delay.
    ///
    /// Backoff delays grow `initial × 2^n` up to `max` over consecutive
    /// failures, with "equal jitter": a uniform draw from the upper half of
    /// that step. A server-advised delay is a floor on top of that.
    pub fn next(&mut self, reason: &Disconnect) -> Decision {
        match classify(reason) {
            Class::Stop => Decision::Stop,
            Class::AtOnce => {
                let jitter = self.policy.at_once_jitter;
                Decision::Retry(self.uniform(Duration::ZERO, jitter))
            }
            Class::Backoff { floor } => {
                let step = self
                    .policy
                    .initial
                    .saturating_mul(1u32.checked_shl(self.failures).unwrap_or(u32::MAX))
                    .min(self.policy.max);
                self.failures = self.failures.saturating_add(1);
                let delay = self.uniform(step / 2, step);
                Decision::Retry(floor.map_or(delay, |f| delay.max(f)))
            }
        }
    }

    fn uniform(&mut self, low: Duration, high: Duration) -> Duration {
        if high <= low {
            return low;
        }
        let nanos = u64::try_from((high - low).as_nanos()).unwrap_or(u64::MAX);
        low + Duration::from_nanos(self.rng.random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::time::Instant;

    fn closed(code: u16, reason: &str) -> Disconnect {
        Disconnect::Closed {
            code,
            reason: reason.into(),
        }
    }

    fn refused(status: u16) -> Disconnect {
        Disconnect::Refused {
            status,
            body: String::new(),
            retry_after: None,
        }
    }

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            at_once_jitter: Duration::from_millis(50),
        }
    }

    /// Follows the policy the way the driver does: sleeps for the delay on
    /// the (paused) clock and returns how long that took, or `None` to stop.
    async fn wait(b: &mut Backoff, reason: &Disconnect) -> Option<Duration> {
        let start = Instant::now();
        match b.next(reason) {
            Decision::Stop => None,
            Decision::Retry(d) => {
                tokio::time::sleep(d).await;
                Some(start.elapsed())
            }
        }
    }

    fn within(d: Option<Duration>, low_ms: u64, high_ms: u64) -> bool {
        d.is_some_and(|d| d >= Duration::from_millis(low_ms) && d <= Duration::from_millis(high_ms))
    }

    #[tokio::test(start_paused = true)]
    async fn never_codes_and_refusals_stop() {
        let mut b = Backoff::seeded(policy(), 1);
        for code in [1000, 1007, 1009, 4001, 4002, 4003, 4009, 4050, 4099] {
            assert_eq!(wait(&mut b, &closed(code, "")).await, None, "close {code}");
        }
        for status in [400, 401, 403, 404] {
            assert_eq!(wait(&mut b, &refused(status)).await, None, "HTTP {status}");
        }
        assert_eq!(wait(&mut b, &Disconnect::ClientClosed).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn at_once_codes_wait_only_the_jitter() {
        let mut b = Backoff::seeded(policy(), 2);
        // Many in a row: at-once never grows into a backoff.
        for _ in 0..5 {
            for code in [1001, 1012, 4200, 4250, 4299] {
                let d = wait(&mut b, &closed(code, "")).await;
                assert!(within(d, 0, 50), "close {code}: {d:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_codes_double_up_to_the_max_and_reset() {
        for code in [1011, 1013, 4100, 4102, 4150, 4199, 1006] {
            let mut b = Backoff::seeded(policy(), u64::from(code));
            // Steps 100, 200, 400, 800, 1600, 2000 (max), 2000: each delay
            // is drawn from the upper half of its step.
            for step in [100, 200, 400, 800, 1600, 2000, 2000] {
                let d = wait(&mut b, &closed(code, "")).await;
                assert!(within(d, step / 2, step), "close {code} step {step}: {d:?}");
            }
            b.reset();
            let d = wait(&mut b, &closed(code, "")).await;
            assert!(within(d, 50, 100), "after reset: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_ms_in_the_reason_is_honoured() {
        let mut b = Backoff::seeded(policy(), 3);
        let d = wait(&mut b, &closed(4101, "rate_limited: retry_after_ms=5000")).await;
        assert!(within(d, 5000, 5000), "{d:?}");
        // A floor below the backoff step leaves the step in force.
        let d = wait(&mut b, &closed(4101, "retry_after_ms=1")).await;
        assert!(within(d, 100, 200), "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn overload_refusals_and_lost_connections_back_off() {
        let mut b = Backoff::seeded(policy(), 4);
        assert!(within(wait(&mut b, &refused(429)).await, 50, 100));
        assert!(within(wait(&mut b, &refused(503)).await, 100, 200));
        let advised = Disconnect::Refused {
            status: 503,
            body: "busy".into(),
            retry_after: Some(Duration::from_secs(3)),
        };
        assert!(within(wait(&mut b, &advised).await, 3000, 3000));
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let failed = Disconnect::ConnectFailed(Arc::new(crate::ConnectError::Tcp(io)));
        assert!(within(wait(&mut b, &failed).await, 400, 800));
        let silent = Disconnect::Silent(Duration::from_secs(75));
        assert!(within(wait(&mut b, &silent).await, 800, 1600));
    }

    #[test]
    fn retry_after_is_parsed_from_the_reason() {
        assert_eq!(retry_after_ms("retry_after_ms=950"), Some(950));
        assert_eq!(retry_after_ms("slow; retry_after_ms=12 more"), Some(12));
        assert_eq!(retry_after_ms("retry_after_ms="), None);
        assert_eq!(retry_after_ms("nothing"), None);
    }
}
