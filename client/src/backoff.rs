//! The reconnect and retry policy: what to do after a connection ends (by
//! close code, HTTP refusal or a lost socket), which refused requests go
//! out again, and how long to wait. It is PROTOCOL.md §5, §9 and §11, and
//! `protocol/reconnect-policy.json` is its table: `tests/policy.rs` checks
//! every entry of that file against the functions here.
//!
//! This module owns the decision and the delay only. It must not sleep, touch
//! sockets or know about rooms: the driver sleeps for the delay it returns
//! while it keeps serving the application.

use std::time::Duration;

use protocol::ErrorCode;
use protocol::close;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Disconnect;

/// The delays of the reconnect policy (PROTOCOL.md §11; the defaults are
/// `delays` in `protocol/reconnect-policy.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffPolicy {
    /// The first backoff step. Default 500 ms.
    pub initial: Duration,
    /// The longest backoff step. Default 30 s.
    pub max: Duration,
    /// Growth of the step per consecutive failure. Default 2.
    pub multiplier: u32,
    /// The random share of each step: a delay is drawn uniformly from
    /// `[step × (1 − jitter), step]`. Default 0.5 ("equal jitter").
    pub jitter: f64,
    /// The largest random delay before an "immediate" reconnect (1001, 1012,
    /// 4200–4299), so that the clients of a restarted server do not all
    /// arrive in the same instant. Default 1 s.
    pub at_once_jitter: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            multiplier: 2,
            jitter: 0.5,
            at_once_jitter: Duration::from_secs(1),
        }
    }
}

impl BackoffPolicy {
    /// The backoff step after `failures` consecutive failures (0 for the
    /// first): `initial × multiplier^failures`, at most `max`.
    pub fn step(&self, failures: u32) -> Duration {
        let growth = self
            .multiplier
            .max(1)
            .checked_pow(failures)
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(growth).min(self.max)
    }

    /// The delay before reconnecting after an end of class `action`, or
    /// `None` to stop. `failures` counts the consecutive backoffs before
    /// this one; `floor` is a server-advised delay (`Retry-After`, or
    /// `retry_after_ms=N` in a 4100–4199 close reason), which a backoff
    /// never undercuts.
    pub fn delay(
        &self,
        action: Action,
        failures: u32,
        floor: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        match action {
            Action::Stop => None,
            Action::Immediate => Some(uniform(rng, Duration::ZERO, self.at_once_jitter)),
            Action::Backoff => {
                let step = self.step(failures);
                let jitter = self.jitter.clamp(0.0, 1.0);
                let low = step.mul_f64(1.0 - jitter);
                let delay = uniform(rng, low, step);
                Some(floor.map_or(delay, |f| delay.max(f)))
            }
        }
    }
}

fn uniform(rng: &mut impl Rng, low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    let nanos = u64::try_from((high - low).as_nanos()).unwrap_or(u64::MAX);
    low + Duration::from_nanos(rng.random_range(0..=nanos))
}

/// What to do after a connection ended, before any delay is drawn: the
/// `action` values of `protocol/reconnect-policy.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Do not reconnect: the application must fix something first.
    Stop,
    /// Reconnect after an exponential backoff, never before a
    /// server-advised delay.
    Backoff,
    /// Reconnect at once, after a little jitter only.
    Immediate,
}

/// What to do after a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Do not reconnect: the application must fix something first.
    Stop,
    /// Reconnect after this delay.
    Retry(Duration),
}

/// What follows a close with `code` (PROTOCOL.md §9): the codes the spec
/// lists, then the ranges for every other code.
pub fn close_action(code: u16) -> Action {
    if let Some(c) = close::lookup(code) {
        return match c.reconnect {
            close::Reconnect::Never => Action::Stop,
            close::Reconnect::Backoff => Action::Backoff,
            close::Reconnect::AtOnce => Action::Immediate,
        };
    }
    match code {
        // 1002 (protocol error), 1003 (unsupported data), 1008 (policy
        // violation) and the rest come from proxies or WebSocket stacks,
        // never from the server's own refusals (4000–4099): a client
        // cannot tell they will repeat, so it keeps trying, slowly.
        4000..=4099 => Action::Stop,
        4200..=4299 => Action::Immediate,
        _ => Action::Backoff,
    }
}

/// What follows an HTTP refusal of the upgrade (PROTOCOL.md §2, §11).
pub fn http_action(status: u16) -> Action {
    match status {
        // A timeout, or a limit that lifts: back off, at least Retry-After.
        408 | 429 => Action::Backoff,
        // 400, 401, 403, 404, ...: the same request is refused again.
        400..=499 => Action::Stop,
        _ => Action::Backoff,
    }
}

/// How long a refused request waits before it goes out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDelay {
    /// The error's `retry_after_ms` (a backoff step when it has none).
    RetryAfter,
    /// A backoff step, growing with the request's consecutive refusals.
    Backoff,
}

/// Whether a request refused with `code` goes out again, unchanged (a
/// `send` with the same `key`), and after how long (PROTOCOL.md §5).
/// `None`: the error is the application's.
pub fn error_retry(code: ErrorCode) -> Option<RetryDelay> {
    match code {
        ErrorCode::RateLimited | ErrorCode::Unavailable => Some(RetryDelay::RetryAfter),
        ErrorCode::Internal => Some(RetryDelay::Backoff),
        _ => None,
    }
}

/// Classes a disconnect by the rules of PROTOCOL.md §9 and §11, with the
/// server-advised delay it carries.
pub fn classify(reason: &Disconnect) -> (Action, Option<Duration>) {
    match reason {
        Disconnect::Closed { code, reason } => {
            let floor = match code {
                4100..=4199 => retry_after_ms(reason).map(Duration::from_millis),
                _ => None,
            };
            (close_action(*code), floor)
        }
        Disconnect::Refused {
            status,
            retry_after,
            ..
        } => (http_action(*status), *retry_after),
        Disconnect::ConnectFailed(_) | Disconnect::Lost(_) | Disconnect::Silent(_) => {
            (Action::Backoff, None)
        }
        Disconnect::ProtocolMismatch { .. } | Disconnect::ClientClosed => (Action::Stop, None),
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

    /// Decides what follows `reason` and draws the delay. Only a backoff
    /// counts as a failure: an immediate reconnect leaves the step as is.
    pub fn next(&mut self, reason: &Disconnect) -> Decision {
        let (action, floor) = classify(reason);
        match self
            .policy
            .delay(action, self.failures, floor, &mut self.rng)
        {
            None => Decision::Stop,
            Some(delay) => {
                if action == Action::Backoff {
                    self.failures = self.failures.saturating_add(1);
                }
                Decision::Retry(delay)
            }
        }
    }

    /// The delay before a refused request goes out again, after its
    /// `refusals` consecutive refusals (1 for the first).
    pub fn retry_delay(
        &mut self,
        how: RetryDelay,
        retry_after_ms: Option<u64>,
        refusals: u32,
    ) -> Duration {
        let advised = retry_after_ms.map(Duration::from_millis);
        match (how, advised) {
            (RetryDelay::RetryAfter, Some(advised)) => advised,
            _ => self
                .policy
                .delay(
                    Action::Backoff,
                    refusals.saturating_sub(1),
                    None,
                    &mut self.rng,
                )
                .unwrap_or(self.policy.initial),
        }
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
            multiplier: 2,
            jitter: 0.5,
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
    fn refused_requests_wait_retry_after_ms_or_a_growing_step() {
        let mut b = Backoff::seeded(policy(), 5);
        let d = b.retry_delay(RetryDelay::RetryAfter, Some(1500), 1);
        assert_eq!(d, Duration::from_millis(1500));
        // Without an advised delay, the step of the request's refusals.
        let d = b.retry_delay(RetryDelay::RetryAfter, None, 1);
        assert!(within(Some(d), 50, 100), "{d:?}");
        let d = b.retry_delay(RetryDelay::Backoff, Some(1500), 3);
        assert!(within(Some(d), 200, 400), "{d:?}");
        assert_eq!(
            error_retry(ErrorCode::Unavailable),
            Some(RetryDelay::RetryAfter)
        );
        assert_eq!(error_retry(ErrorCode::Forbidden), None);
    }

    #[test]
    fn a_protocol_mismatch_stops() {
        let mut b = Backoff::seeded(policy(), 6);
        let mismatch = Disconnect::ProtocolMismatch {
            server: 2,
            client: 1,
        };
        assert_eq!(b.next(&mismatch), Decision::Stop);
    }

    #[test]
    fn retry_after_is_parsed_from_the_reason() {
        assert_eq!(retry_after_ms("retry_after_ms=950"), Some(950));
        assert_eq!(retry_after_ms("slow; retry_after_ms=12 more"), Some(12));
        assert_eq!(retry_after_ms("retry_after_ms="), None);
        assert_eq!(retry_after_ms("nothing"), None);
    }
}
