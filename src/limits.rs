//! Abuse limits: token buckets, per-key rate limits and connection counters.
//!
//! This module owns the arithmetic of the limits configured in `Config`
//! (`*_rate_*`, `max_connections_per_*`, `rate_limit_strikes`) and the
//! shared per-IP and per-user state behind them. It decides only "allowed or
//! not, and when to retry"; it must not send frames, close sockets or log
//! anything a peer sent: the gateway and sessions act on its answers.
//!
//! Memory stays bounded: a keyed bucket that has refilled is the same as no
//! bucket, so full buckets are dropped whenever the map grows past
//! [`PRUNE_AT`]; a connection counter removes a key when its count is zero.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::{Config, Rate};

/// Keyed buckets are pruned of full (idle) entries past this many keys.
pub const PRUNE_AT: usize = 4096;

/// A token bucket: `burst` tokens, refilled at `per_sec`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: f64::from(rate.burst),
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens =
            (self.tokens + elapsed * f64::from(self.rate.per_sec)).min(f64::from(self.rate.burst));
    }

    /// Takes one token. `Err` carries how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err(Duration::from_secs_f64(
                missing / f64::from(self.rate.per_sec),
            ))
        }
    }

    /// Whether the bucket has refilled completely (it then equals a new one).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= f64::from(self.rate.burst)
    }
}

/// One token bucket per key (per user, per IP), shared across tasks.
#[derive(Debug)]
pub struct KeyedBuckets<K: Eq + Hash> {
    rate: Rate,
    buckets: DashMap<K, TokenBucket>,
}

impl<K: Eq + Hash + Clone> KeyedBuckets<K> {
    pub fn new(rate: Rate) -> Self {
        KeyedBuckets {
            rate,
            buckets: DashMap::new(),
        }
    }

    /// Takes one token from `key`'s bucket. `Err` carries the wait.
    pub fn take(&self, key: &K) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        let now = Instant::now();
        // The common case, a known key, locks one shard and clones nothing.
        if let Some(mut bucket) = self.buckets.get_mut(key) {
            return bucket.take(now);
        }
        // A new key: only now is the map's size (every shard) looked at.
        if self.buckets.len() >= PRUNE_AT {
            self.buckets.retain(|_, b| !b.is_full(now));
        }
        let mut bucket = self
            .buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(self.rate));
        bucket.take(now)
    }

    /// How many keys are tracked (for tests and metrics).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Counts open connections per key, up to a maximum.
#[derive(Debug)]
pub struct ConnCounter<K: Eq + Hash> {
    max: usize,
    counts: Arc<DashMap<K, usize>>,
}

impl<K: Eq + Hash + Clone> ConnCounter<K> {
    pub fn new(max: usize) -> Self {
        ConnCounter {
            max,
            counts: Arc::new(DashMap::new()),
        }
    }

    /// Counts one more connection of `key`, or `None` when it already has `max`.
    pub fn acquire(&self, key: K) -> Option<ConnGuard<K>> {
        let mut count = self.counts.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        drop(count);
        Some(ConnGuard {
            key,
            counts: self.counts.clone(),
        })
    }

    /// Open connections of `key`.
    pub fn count(&self, key: &K) -> usize {
        self.counts.get(key).map_or(0, |c| *c)
    }
}

/// What a running session holds of the server's capacity: its slot in
/// the global count and in its IP's and its user's. Dropped with the
/// session, which frees all three.
#[derive(Debug)]
pub struct Slots {
    pub permit: tokio::sync::OwnedSemaphorePermit,
    pub ip: ConnGuard<IpAddr>,
    pub user: ConnGuard<Arc<str>>,
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct ConnGuard<K: Eq + Hash> {
    key: K,
    counts: Arc<DashMap<K, usize>>,
}

impl<K: Eq + Hash> Drop for ConnGuard<K> {
    fn drop(&mut self) {
        if let Some(mut c) = self.counts.get_mut(&self.key) {
            *c = c.saturating_sub(1);
        }
        self.counts.remove_if(&self.key, |_, c| *c == 0);
    }
}

/// Refusals within a sliding window: persistent abuse closes the session.
#[derive(Debug)]
pub struct Strikes {
    max: u32,
    window: Duration,
    recent: std::collections::VecDeque<Instant>,
}

impl Strikes {
    pub fn new(max: u32, window: Duration) -> Strikes {
        Strikes {
            max,
            window,
            recent: std::collections::VecDeque::new(),
        }
    }

    /// Records a refusal; true when `max` fell within the window.
    pub fn strike(&mut self, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        // Bounded: never more than `max` entries are kept.
        while self.recent.len() > self.max as usize {
            self.recent.pop_front();
        }
        self.recent.len() >= self.max as usize
    }
}

/// What is rate limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Send,
    Join,
    History,
}

/// The server-wide limit state: per-IP and per-user counters and buckets.
#[derive(Debug)]
pub struct Limits {
    /// False in dev mode: every check passes.
    pub enabled: bool,
    pub handshakes_per_ip: KeyedBuckets<IpAddr>,
    pub connections_per_ip: ConnCounter<IpAddr>,
    pub connections_per_user: ConnCounter<Arc<str>>,
    sends_per_user: KeyedBuckets<Arc<str>>,
    joins_per_user: KeyedBuckets<Arc<str>>,
    history_per_user: KeyedBuckets<Arc<str>>,
}

impl Limits {
    pub fn new(config: &Config) -> Limits {
        let enabled = !config.dev_mode();
        let rate = |r: Rate| if enabled { r } else { Rate::OFF };
        let max = |m: usize| if enabled { m } else { usize::MAX };
        Limits {
            enabled,
            handshakes_per_ip: KeyedBuckets::new(rate(config.handshake_rate_per_ip)),
            connections_per_ip: ConnCounter::new(max(config.max_connections_per_ip)),
            connections_per_user: ConnCounter::new(max(config.max_connections_per_user)),
            sends_per_user: KeyedBuckets::new(rate(config.send_rate_per_user)),
            joins_per_user: KeyedBuckets::new(rate(config.join_rate_per_user)),
            history_per_user: KeyedBuckets::new(rate(config.history_rate_per_user)),
        }
    }

    /// Takes a token of `action` for `user`.
    pub fn take_user(&self, action: Action, user: &Arc<str>) -> Result<(), Duration> {
        match action {
            Action::Send => self.sends_per_user.take(user),
            Action::Join => self.joins_per_user.take(user),
            Action::History => self.history_per_user.take(user),
        }
    }
}

/// One session's own buckets.
#[derive(Debug)]
pub struct SessionLimits {
    sends: TokenBucket,
    joins: TokenBucket,
    history: TokenBucket,
    pub strikes: Strikes,
}

impl SessionLimits {
    pub fn new(config: &Config) -> SessionLimits {
        let enabled = !config.dev_mode();
        let rate = |r: Rate| TokenBucket::new(if enabled { r } else { Rate::OFF });
        SessionLimits {
            sends: rate(config.send_rate_per_session),
            joins: rate(config.join_rate_per_session),
            history: rate(config.history_rate_per_session),
            strikes: Strikes::new(
                config.rate_limit_strikes,
                Duration::from_millis(config.rate_limit_window_ms),
            ),
        }
    }

    /// Takes a token of `action` from the session's bucket, then the user's.
    /// A refusal by the user's bucket leaves the session's token taken: the
    /// session did ask.
    pub fn take(
        &mut self,
        action: Action,
        user: &Arc<str>,
        shared: &Limits,
    ) -> Result<(), Duration> {
        let now = Instant::now();
        let bucket = match action {
            Action::Send => &mut self.sends,
            Action::Join => &mut self.joins,
            Action::History => &mut self.history,
        };
        bucket.take(now)?;
        shared.take_user(action, user)
    }
}

/// An append over one of the limits that apply to every append, whoever
/// makes it (a client's `send`, an operator's publish).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendLimit {
    /// The body nests deeper than `max_body_depth`.
    TooDeep { max: usize },
    /// The idempotency key is longer than `max_key_bytes`.
    KeyTooLong { max: usize },
}

/// Checks an append's idempotency key and, when given, its body against
/// the config; the body's nesting first. A caller whose decoder already
/// measured the body's depth passes `None` rather than scan it again.
pub fn check_append(
    config: &Config,
    key: Option<&str>,
    body: Option<&serde_json::value::RawValue>,
) -> Result<(), AppendLimit> {
    let max = config.max_body_depth;
    if body.is_some_and(|b| protocol::nesting_depth(b.get()) > max) {
        return Err(AppendLimit::TooDeep { max });
    }
    let max = config.max_key_bytes;
    if key.is_some_and(|k| k.len() > max) {
        return Err(AppendLimit::KeyTooLong { max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_tells_the_wait() {
        let mut b = TokenBucket::new(Rate::new(10, 3));
        let now = Instant::now();
        assert!(b.take(now).is_ok());
        assert!(b.take(now).is_ok());
        assert!(b.take(now).is_ok());
        let wait = b.take(now).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        assert!(b.take(now + Duration::from_millis(100)).is_ok());
        let mut off = TokenBucket::new(Rate::OFF);
        assert!((0..1000).all(|_| off.take(now).is_ok()));
    }

    #[test]
    fn counter_caps_and_releases() {
        let c = ConnCounter::new(2);
        let a = c.acquire("x");
        let b = c.acquire("x");
        assert!(a.is_some() && b.is_some());
        assert!(c.acquire("x").is_none());
        assert!(c.acquire("y").is_some());
        drop(a);
        assert_eq!(c.count(&"x"), 1);
        drop(b);
        assert_eq!(c.count(&"x"), 0);
        assert!(c.counts.is_empty());
    }

    #[test]
    fn strikes_need_max_within_the_window() {
        let mut s = Strikes::new(3, Duration::from_secs(1));
        let t = Instant::now();
        assert!(!s.strike(t));
        assert!(!s.strike(t));
        assert!(!s.strike(t + Duration::from_secs(2)));
        assert!(!s.strike(t + Duration::from_secs(2)));
        assert!(s.strike(t + Duration::from_secs(2)));
    }

    #[test]
    fn idle_keys_are_pruned() {
        let k = KeyedBuckets::new(Rate::new(1_000_000, 1));
        for i in 0..(PRUNE_AT as u32 + 10) {
            let _ = k.take(&i);
        }
        assert!(k.len() < PRUNE_AT + 10);
    }

    #[test]
    fn check_append_refuses_a_deep_body_first_then_a_long_key() {
        let config = Config {
            max_body_depth: 2,
            max_key_bytes: 3,
            ..Config::default()
        };
        let body = |json: &str| serde_json::value::RawValue::from_string(json.into()).unwrap();
        let (flat, deep) = (body("[[1]]"), body("[[[1]]]"));
        assert_eq!(check_append(&config, Some("abc"), Some(&flat)), Ok(()));
        assert_eq!(
            check_append(&config, Some("abcd"), Some(&deep)),
            Err(AppendLimit::TooDeep { max: 2 })
        );
        assert_eq!(
            check_append(&config, Some("abcd"), Some(&flat)),
            Err(AppendLimit::KeyTooLong { max: 3 })
        );
        // Without a body, only the key is checked.
        assert_eq!(check_append(&config, None, None), Ok(()));
        assert_eq!(
            check_append(&config, Some("abcd"), None),
            Err(AppendLimit::KeyTooLong { max: 3 })
        );
    }
}
