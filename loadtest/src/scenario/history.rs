//! `history`: readers paging rooms' stored history, one request in flight
//! each: the latest page, a page before a random seq, or after one. Each
//! page is checked (oldest first, gap-free, on the right side of the
//! cursor). The rooms are first filled to `--messages` by the leader.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use protocol::{Body, ClientRequest};
use rand::{Rng, SeedableRng};
use tokio_tungstenite::tungstenite::Message;

use super::{DRAIN, count_close, open, ramp, start_clock};
use crate::cli::HistoryArgs;
use crate::conn::{Connector, Frame, STEP_TIMEOUT, Ws, history_seqs, instant_at, now_us, request};
use crate::metrics::{Metrics, add};

pub async fn run(a: &HistoryArgs, m: Arc<Metrics>) -> anyhow::Result<()> {
    if a.common.foreign() {
        bail!("history needs a Switchboard server, not --raw");
    }
    let conn = Arc::new(Connector::new(&a.common)?);
    let rooms = a.rooms.max(1);
    let mut latest = Vec::new();
    for r in 0..rooms {
        let room = format!("history{r}");
        let seq = if a.common.is_leader() {
            fill(&conn, &m, &room, a.messages).await?
        } else {
            a.messages
        };
        latest.push(seq);
    }
    let readers = ramp(a.clients, &a.common, |i| {
        let (conn, m) = (conn.clone(), m.clone());
        async move {
            let (ws, _) = open(&conn, &m, i as usize, &format!("h{i}"), None).await?;
            anyhow::Ok((i as usize, ws))
        }
    })
    .await;
    let clock = start_clock(&a.common, &m, true).await;
    let latest = Arc::new(latest);
    let mut tasks = tokio::task::JoinSet::new();
    for (who, ws) in readers {
        let (m, latest, limit) = (m.clone(), latest.clone(), a.limit.max(1));
        let seed = a.common.seed ^ (who as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        tasks.spawn(async move {
            let stop = instant_at(clock.stop);
            let r = reader(ws, who, &m, &latest, limit, seed, stop).await;
            m.disconnected();
            if let Err(e) = r {
                m.error(&format!(
                    "history reader: {}",
                    crate::metrics::short_error(&e)
                ));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Brings `room` to at least `messages` messages; returns its latest seq.
async fn fill(conn: &Connector, m: &Metrics, room: &str, messages: u64) -> anyhow::Result<u64> {
    let (mut ws, mut seq) = open(conn, m, usize::MAX, "history-writer", Some(room)).await?;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT + DRAIN;
    let mut in_flight = VecDeque::new();
    let mut next_id = 10u64;
    let mut to_send = messages.saturating_sub(seq);
    while to_send > 0 || !in_flight.is_empty() {
        if to_send > 0 && in_flight.len() < 128 {
            next_id += 1;
            let body = Body::from_json(&format!(r#"{{"t":{},"n":{next_id}}}"#, now_us()))?;
            ws.send(request(
                Some(next_id),
                ClientRequest::Send {
                    room: room.to_owned(),
                    body,
                    key: None,
                },
            ))
            .await?;
            in_flight.push_back(next_id);
            to_send -= 1;
            continue;
        }
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("filling history timed out")?
            .context("closed while filling history")??;
        if let Message::Text(t) = msg {
            let f = Frame::parse(t.as_str());
            match f.kind {
                "ack" => {
                    in_flight.retain(|i| Some(*i) != f.id);
                    seq = seq.max(f.seq.unwrap_or(0));
                }
                "error" => bail!("filling history: {}", f.code.unwrap_or("?")),
                _ => {}
            }
        }
    }
    m.disconnected();
    let _ = ws.close(None).await;
    Ok(seq)
}

async fn reader(
    mut ws: Ws,
    who: usize,
    m: &Metrics,
    latest: &[u64],
    limit: u32,
    seed: u64,
    stop: tokio::time::Instant,
) -> anyhow::Result<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut seqs = Vec::with_capacity(limit as usize);
    let mut id = 0u64;
    while tokio::time::Instant::now() < stop {
        id += 1;
        let r = rng.random_range(0..latest.len());
        let top = latest[r].max(1);
        let (before, after) = match rng.random_range(0..3) {
            0 => (None, None),
            1 => (Some(rng.random_range(1..=top)), None),
            _ => (None, Some(rng.random_range(0..top))),
        };
        let sent_at = now_us();
        let t = Instant::now();
        ws.send(request(
            Some(id),
            ClientRequest::History {
                room: format!("history{r}"),
                before,
                after,
                limit: Some(limit),
            },
        ))
        .await?;
        m.sent_at(1, sent_at);
        loop {
            let msg = tokio::time::timeout(STEP_TIMEOUT, ws.next())
                .await
                .context("history reply timed out")?
                .context("closed")??;
            count_close(m, &msg);
            let Message::Text(text) = msg else { continue };
            let f = Frame::parse(text.as_str());
            if f.id != Some(id) {
                continue;
            }
            if f.kind == "error" {
                m.error(f.code.unwrap_or("unknown"));
                break;
            }
            // Counted in the window by the request's send time.
            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            m.history.record(who, us, m.measured(sent_at));
            history_seqs(text.as_str(), &mut seqs);
            add(&m.c.history_pages, 1);
            add(&m.c.history_messages, seqs.len() as u64);
            m.acked_count(sent_at);
            let ordered = seqs.windows(2).all(|w| w[1] == w[0] + 1);
            let placed = match (before, after, seqs.first(), seqs.last()) {
                (Some(b), None, _, Some(last)) => *last < b,
                (None, Some(a), Some(first), _) => *first > a,
                _ => true,
            };
            if !ordered || !placed {
                m.error("history: page out of order or out of range");
            }
            break;
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}
