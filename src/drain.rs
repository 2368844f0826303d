//! Draining a node without a storm: stop taking connections, fail
//! readiness, and close the sessions spread over `drain_window_ms` with
//! 4200 (reconnect at once, elsewhere), as nats-server's lame-duck mode
//! does, so the nodes that take the clients over see them arrive at a
//! steady rate rather than all at once.
//!
//! It owns the drain request (a flag the admin API and the server's
//! lifetime share) and the spread close. It closes sessions only through
//! the hub's registry, so every close path's guarantees hold (acks of
//! accepted sends are written before the close frame).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::close::CloseReason;
use crate::hub::Hub;

/// How often the spread close wakes: a window is cut into steps this long.
const STEP: Duration = Duration::from_millis(10);

/// The drain request: cheap to clone, set once, never unset.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    requested: CancellationToken,
}

impl Drain {
    /// Asks the node to drain. Returns false when it already was.
    pub fn request(&self) -> bool {
        let first = !self.requested.is_cancelled();
        self.requested.cancel();
        first
    }

    pub fn is_requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    /// Resolves once a drain is requested.
    pub async fn requested(&self) {
        self.requested.cancelled().await;
    }
}

/// Closes every session in `hub` with [`CloseReason::Draining`], spread
/// evenly over `window`, then closes any that arrived meanwhile (a
/// handshake already under way when the drain began). Returns how many it
/// closed; stops early at `stop`.
pub async fn close_spread(hub: Arc<Hub>, window: Duration, stop: CancellationToken) -> usize {
    let sessions = hub.sessions();
    let first: std::collections::HashSet<_> = sessions.iter().map(|s| s.id).collect();
    let total = sessions.len();
    let steps = (window.as_millis() / STEP.as_millis()).max(1) as usize;
    let per_step = total.div_ceil(steps).max(1);
    let mut closed = 0;
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for chunk in sessions.chunks(per_step) {
        tokio::select! {
            () = stop.cancelled() => return closed,
            _ = tick.tick() => {}
        }
        for s in chunk {
            if hub.close_session(s.id, CloseReason::Draining) {
                closed += 1;
            }
        }
    }
    for s in hub
        .sessions()
        .into_iter()
        .filter(|s| !first.contains(&s.id))
    {
        if hub.close_session(s.id, CloseReason::Draining) {
            closed += 1;
        }
    }
    closed
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use crate::delivery::{OutboxReceiver, outbox};
    use crate::hub::{SessionEntry, SessionStats};
    use crate::metrics::Metrics;

    /// Registers `n` sessions; returns their outboxes.
    fn sessions(hub: &Hub, n: u64) -> Vec<OutboxReceiver> {
        (0..n)
            .map(|id| {
                let (tx, rx) = outbox(
                    8,
                    1 << 16,
                    8,
                    CancellationToken::new(),
                    Arc::new(Metrics::default()),
                );
                hub.register_session(
                    id,
                    SessionEntry {
                        user: Arc::from(format!("u{id}")),
                        remote: ([127, 0, 0, 1], 1).into(),
                        connected_at_ms: 0,
                        outbox: tx,
                        stats: Arc::new(SessionStats::default()),
                    },
                );
                rx
            })
            .collect()
    }

    fn closed(boxes: &[OutboxReceiver]) -> usize {
        boxes
            .iter()
            .filter(|b| b.close_reason() == Some(CloseReason::Draining))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_close_spread_over_the_window() {
        let hub = Arc::new(Hub::new());
        let boxes = sessions(&hub, 100);
        let task = tokio::spawn(close_spread(
            hub.clone(),
            Duration::from_secs(1),
            CancellationToken::new(),
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let early = closed(&boxes);
        assert!(
            (10..=40).contains(&early),
            "a quarter in, {early} of 100 closed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let middle = closed(&boxes);
        assert!(
            (40..=70).contains(&middle),
            "half-way, {middle} of 100 closed"
        );
        assert_eq!(task.await.unwrap(), 100);
        assert_eq!(closed(&boxes), 100);
    }

    #[test]
    fn a_drain_is_requested_once() {
        let d = Drain::default();
        assert!(!d.is_requested());
        assert!(d.request());
        assert!(!d.request());
        assert!(d.clone().is_requested());
    }
}
