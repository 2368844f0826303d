//! `fanout`: one room (or a few), N subscribers, one publisher per room at a
//! fixed rate or at full speed (a window of un-acked sends). Subscribers
//! check seq continuity and stop at the publisher's end marker.
//!
//! In raw mode the publisher numbers its own frames (`seq`) in the same
//! shape as Switchboard's `message`, so the same reader works against any
//! broadcast server; the publisher's own echo stands in for the ack.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use futures_util::{FutureExt, SinkExt, StreamExt};
use protocol::{Body, ClientRequest};
use tokio_tungstenite::tungstenite::Message;

use super::{DRAIN, count_close, open, ramp, start_clock};
use crate::cli::FanoutArgs;
use crate::conn::{Connector, Continuity, Frame, Ws, instant_at, now_us, request};
use crate::metrics::{Clock, Metrics, add};
use crate::nats::{self, NatsReader};

pub async fn run(a: &FanoutArgs, m: Arc<Metrics>) -> anyhow::Result<()> {
    let conn = Arc::new(Connector::new(&a.common)?);
    let rooms = a.rooms.max(1);
    if conn.raw && rooms > 1 {
        bail!("raw mode broadcasts to everyone: use one room");
    }
    let room_name = {
        let prefix = a.room.clone();
        move |r: u32| {
            if rooms == 1 {
                prefix.clone()
            } else {
                format!("{prefix}{r}")
            }
        }
    };
    let subs = ramp(a.clients, &a.common, |i| {
        let (conn, m, room) = (conn.clone(), m.clone(), room_name(i % rooms));
        async move {
            let (ws, seq) = open(&conn, &m, i as usize, &format!("s{i}"), Some(&room)).await?;
            anyhow::Ok((i as usize, ws, seq))
        }
    })
    .await;
    let clock = start_clock(&a.common, &m, true).await;
    let mut tasks = tokio::task::JoinSet::new();
    for (who, ws, seq) in subs {
        let room = room_name(who as u32 % rooms);
        tasks.spawn(subscriber(conn.nats, ws, seq, who, room, m.clone(), clock));
    }
    if a.common.is_leader() {
        for r in 0..rooms {
            let (conn, m, room) = (conn.clone(), m.clone(), room_name(r));
            let (rate, window) = (a.rate, a.window.max(1) as usize);
            tasks.spawn(async move {
                let who = usize::MAX - r as usize;
                let r = publisher(&conn, &m, who, &room, rate, window, clock).await;
                if let Err(e) = &r {
                    m.error(&format!("publisher: {e}"));
                }
                r
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            m.error(&format!("fanout: {}", crate::metrics::short_error(&e)));
        }
    }
    Ok(())
}

/// Reads until the end marker, counting deliveries, latency and continuity.
async fn subscriber(
    nats: bool,
    mut ws: Ws,
    start: u64,
    who: usize,
    room: String,
    m: Arc<Metrics>,
    clock: Clock,
) -> anyhow::Result<()> {
    let mut seen = Continuity::starting_at(start);
    let mut nats = nats.then(NatsReader::default);
    // One timer for the whole read loop, not one per frame.
    let deadline = tokio::time::sleep_until(instant_at(clock.stop) + DRAIN);
    tokio::pin!(deadline);
    let mut ended = false;
    let mut batch = Batch::default();
    let mut now = 0;
    'read: loop {
        let first = tokio::select! {
            biased;
            msg = ws.next() => match msg {
                Some(Ok(msg)) => msg,
                _ => break,
            },
            () = &mut deadline => break,
        };
        // Frames already read off the socket with this one share its
        // arrival time: one clock reading and one histogram lock per batch
        // instead of per delivery. The batch is bounded, so the shared time
        // is never more than a few microseconds old.
        now = now_us();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if let Some(r) = nats.as_mut() {
                let Some(bytes) = nats::bytes_of(&msg) else {
                    count_close(&m, &msg);
                    if matches!(msg, Message::Close(_)) {
                        break 'read;
                    }
                    continue;
                };
                let fed = r.feed(bytes, |text| match delivery_of_text(text) {
                    Delivery::Message { seq, stamp } => {
                        seen.see(seq);
                        batch.push(stamp);
                        false
                    }
                    Delivery::End { seq } => {
                        seen.see(seq);
                        true
                    }
                    _ => false,
                });
                let answered = nats::pong(&mut ws, r).await;
                match (fed, answered) {
                    (Ok(true), _) => {
                        ended = true;
                        break 'read;
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        m.error(&format!("subscriber: {}", crate::metrics::short_error(&e)));
                        break 'read;
                    }
                    (Ok(false), Ok(())) => {}
                }
            } else {
                match delivery(&msg) {
                    Delivery::Message { seq, stamp } => {
                        seen.see(seq);
                        batch.push(stamp);
                    }
                    Delivery::End { seq } => {
                        seen.see(seq);
                        ended = true;
                        break 'read;
                    }
                    Delivery::Closed => {
                        count_close(&m, &msg);
                        break 'read;
                    }
                    Delivery::Other => count_close(&m, &msg),
                }
            }
            if batch.len() < BATCH {
                next = match ws.next().now_or_never() {
                    Some(Some(Ok(msg))) => Some(msg),
                    Some(_) => break 'read,
                    None => None,
                };
            }
        }
        m.delivered_batch(who, &batch.stamps, batch.unstamped, now);
        batch.clear();
    }
    if !batch.is_empty() {
        m.delivered_batch(who, &batch.stamps, batch.unstamped, now);
    }
    add(&m.c.lost, seen.lost);
    add(&m.c.duplicated, seen.duplicated);
    m.disconnected();
    if !ended {
        m.error("subscriber: no end marker before the drain deadline");
        // What the publisher (in this process) had published and this
        // reader never got counts as lost.
        if let Some(last) = m.published_seq(&room) {
            add(&m.c.lost, last.saturating_sub(seen.last));
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// Most deliveries recorded with one clock reading.
const BATCH: usize = 32;

/// Deliveries read together: their publisher stamps, and how many had none.
#[derive(Default)]
struct Batch {
    stamps: Vec<u64>,
    unstamped: u64,
}

impl Batch {
    fn push(&mut self, stamp: Option<u64>) {
        match stamp {
            Some(t) => self.stamps.push(t),
            None => self.unstamped += 1,
        }
    }

    fn len(&self) -> usize {
        self.stamps.len() + self.unstamped as usize
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn clear(&mut self) {
        self.stamps.clear();
        self.unstamped = 0;
    }
}

/// What a frame means to a subscriber.
enum Delivery {
    Message { seq: u64, stamp: Option<u64> },
    End { seq: u64 },
    Closed,
    Other,
}

fn delivery(msg: &Message) -> Delivery {
    match msg {
        Message::Text(t) => delivery_of_text(t.as_str()),
        Message::Close(_) => Delivery::Closed,
        _ => Delivery::Other,
    }
}

fn delivery_of_text(text: &str) -> Delivery {
    let f = Frame::parse(text);
    match (f.kind, f.seq) {
        ("message", Some(seq)) if f.end => Delivery::End { seq },
        ("message", Some(seq)) => Delivery::Message {
            seq,
            stamp: f.stamp,
        },
        _ => Delivery::Other,
    }
}

/// Publishes at `rate` per second (or, at 0, keeping `window` un-acked)
/// from the clock's start to its stop, then an end marker.
async fn publisher(
    conn: &Connector,
    m: &Metrics,
    who: usize,
    room: &str,
    rate: u32,
    window: usize,
    clock: Clock,
) -> anyhow::Result<()> {
    let (mut ws, _) = open(conn, m, who, &format!("publisher-{room}"), Some(room)).await?;
    let raw = conn.raw;
    let mut nats = conn.nats.then(NatsReader::default);
    let mut echoes: Vec<u64> = Vec::new();
    let mut stored: Vec<(u64, u64)> = Vec::new();
    let stop = instant_at(clock.stop);
    let deadline = stop + DRAIN;
    let gap = (rate > 0).then(|| std::time::Duration::from_secs_f64(1.0 / f64::from(rate)));
    let mut next = tokio::time::Instant::now();
    let mut in_flight: VecDeque<(u64, Instant, u64)> = VecDeque::new();
    let mut n = 0u64;
    let mut end_id = None;
    loop {
        let now = tokio::time::Instant::now();
        let sending = now < stop;
        if !sending && end_id.is_none() && in_flight.is_empty() {
            // Everything is acked: send the end marker, wait for its ack.
            n += 1;
            ws.send(frame(raw, nats.is_some(), room, n, None)?).await?;
            in_flight.push_back((n, Instant::now(), 0));
            end_id = Some(n);
            continue;
        }
        if end_id.is_some() && in_flight.is_empty() {
            break;
        }
        let may_send = sending
            && match gap {
                Some(_) => now >= next,
                None => in_flight.len() < window,
            };
        if may_send {
            n += 1;
            let t = now_us();
            ws.send(frame(raw, nats.is_some(), room, n, Some(t))?)
                .await?;
            m.sent_at(1, t);
            in_flight.push_back((n, Instant::now(), t));
            if let Some(g) = gap {
                next += g;
            }
            continue;
        }
        let wake = match gap {
            Some(_) if sending => next,
            _ if sending => stop,
            _ => deadline,
        };
        tokio::select! {
            msg = ws.next() => {
                let Some(msg) = msg else { bail!("publisher connection closed") };
                let msg = msg?;
                count_close(m, &msg);
                // (id, the seq it was stored at)
                echoes.clear();
                if let Some(r) = nats.as_mut() {
                    let Some(bytes) = nats::bytes_of(&msg) else { continue };
                    r.feed(bytes, |text| {
                        if let Some(seq) = Frame::parse(text).seq {
                            echoes.push(seq);
                        }
                        false
                    })?;
                    nats::pong(&mut ws, r).await?;
                } else {
                    let Message::Text(t) = msg else { continue };
                    let f = Frame::parse(t.as_str());
                    let id = match (raw, f.kind) {
                        (false, "ack") => f.id,
                        (true, "message") => f.seq,
                        (false, "error") => {
                            m.error(f.code.unwrap_or("unknown"));
                            f.id
                        }
                        _ => None,
                    };
                    if let Some(id) = id {
                        echoes.push(id);
                        if !raw {
                            stored.push((id, f.seq.unwrap_or(0)));
                        }
                    }
                }
                for &id in &echoes {
                    if let Some(pos) = in_flight.iter().position(|(i, _, _)| *i == id)
                        && let Some((i, at, t)) = in_flight.remove(pos)
                        && Some(i) != end_id
                    {
                        m.acked(who, at.elapsed(), t);
                        let seq = if raw {
                            i
                        } else {
                            stored.iter().find(|(x, _)| *x == i).map_or(0, |(_, s)| *s)
                        };
                        m.published(room, seq);
                    }
                }
                stored.clear();
            }
            () = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= deadline {
                    bail!("{} acks missing at the drain deadline", in_flight.len());
                }
            }
        }
    }
    m.disconnected();
    let _ = ws.close(None).await;
    Ok(())
}

/// A send (Switchboard) or a self-numbered message frame (raw), published
/// to the room's subject with NATS; `stamp` `None` is the end marker.
fn frame(raw: bool, nats: bool, room: &str, n: u64, stamp: Option<u64>) -> anyhow::Result<Message> {
    let body = match stamp {
        Some(t) => format!(r#"{{"t":{t}}}"#),
        None => r#"{"end":1}"#.to_owned(),
    };
    if nats {
        let payload = format!(r#"{{"type":"message","room":"{room}","seq":{n},"body":{body}}}"#);
        return Ok(nats::publish(room, &payload));
    }
    if raw {
        return Ok(Message::Text(
            format!(r#"{{"type":"message","room":"{room}","seq":{n},"body":{body}}}"#).into(),
        ));
    }
    Ok(request(
        Some(n),
        ClientRequest::Send {
            room: room.to_owned(),
            body: Body::from_json(&body)?,
            key: None,
        },
    ))
}
