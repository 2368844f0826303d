//! `fanout`: one room (or a few), N subscribers, one publisher per room at a
//! fixed rate or at full speed (a window of un-acked sends). Subscribers
//! check seq continuity and stop at the publisher's end marker.
//!
//! Against Switchboard, a connection the server closes with a reconnect
//! code, or whose socket dies, reconnects to the next URL: a subscriber
//! resumes with `since` and `epoch` (what the resume does not fill is lost,
//! what it repeats duplicated), the publisher re-joins and carries on (its
//! un-acked sends are counted, not resent).
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

use super::{DRAIN, Joined, count_close, open_at, ramp, reconnect_room, start_clock};
use crate::cli::FanoutArgs;
use crate::conn::{Connector, Continuity, Frame, Ws, instant_at, now_us, request};
use crate::metrics::{Clock, Metrics, add};
use crate::nats::{self, NatsReader};
use crate::reconnect::{self, Policy};

pub async fn run(a: &FanoutArgs, m: Arc<Metrics>) -> anyhow::Result<()> {
    let conn = Arc::new(Connector::new(&a.common)?);
    let rooms = a.rooms.max(1);
    if conn.raw && rooms > 1 {
        bail!("raw mode broadcasts to everyone: use one room");
    }
    let publishers = a.publishers.max(1);
    if conn.raw && publishers > 1 {
        bail!("raw mode numbers one publisher's frames: use one publisher");
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
    let policy = Policy::of(&a.common);
    let subs = ramp(a.clients, &a.common, |i| {
        let (conn, m, room) = (conn.clone(), m.clone(), room_name(i % rooms));
        async move {
            let who = i as usize;
            let at = conn.target_of(who);
            let (ws, joined) = open_at(&conn, &m, who, at, &sub_name(i), Some(&room), None).await?;
            anyhow::Ok((who, ws, joined))
        }
    })
    .await;
    let clock = start_clock(&a.common, &m, true).await;
    let mut tasks = tokio::task::JoinSet::new();
    for (who, ws, joined) in subs {
        let room = room_name(who as u32 % rooms);
        let sub = Sub {
            conn: conn.clone(),
            policy,
            who,
            room,
            m: m.clone(),
            clock,
            ends: publishers,
        };
        tasks.spawn(sub.run(ws, joined));
    }
    if a.common.is_leader() {
        for (r, p) in (0..rooms).flat_map(|r| (0..publishers).map(move |p| (r, p))) {
            let (conn, m, room) = (conn.clone(), m.clone(), room_name(r));
            let (rate, window) = (a.rate, a.window.max(1) as usize);
            // Numbered after the subscribers, for the URL it goes to.
            let who = (a.clients + r * publishers + p) as usize;
            let user = match p {
                0 => format!("publisher-{room}"),
                p => format!("publisher-{room}-{p}"),
            };
            tasks.spawn(async move {
                let r = publisher(&conn, &m, policy, who, &user, &room, rate, window, clock).await;
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

fn sub_name(i: u32) -> String {
    format!("s{i}")
}

/// A subscriber: what it needs besides its connection.
struct Sub {
    conn: Arc<Connector>,
    policy: Policy,
    who: usize,
    room: String,
    m: Arc<Metrics>,
    clock: Clock,
    /// The room's publishers: a reader stops after this many end markers.
    ends: u32,
}

/// Why a subscriber's read loop ended.
enum End {
    /// The publisher's end marker.
    Marker,
    /// The drain deadline, or an error that is not the connection's loss.
    Stop,
    /// The connection was lost: its close code, `None` when it just died.
    Lost(Option<u16>),
}

impl Sub {
    /// Reads until the end marker, counting deliveries, latency and
    /// continuity; reconnects and resumes a lost connection.
    async fn run(self, mut ws: Ws, joined: Joined) -> anyhow::Result<()> {
        let m = self.m.clone();
        let mut seen = Continuity::starting_at(joined.seq);
        let mut epoch = joined.epoch;
        let mut at = self.conn.target_of(self.who);
        let mut nats = self.conn.nats.then(NatsReader::default);
        let drain_by = instant_at(self.clock.stop) + DRAIN;
        // One timer for the whole read loop, not one per frame.
        let deadline = tokio::time::sleep_until(drain_by);
        tokio::pin!(deadline);
        let mut markers = 0;
        let ended = loop {
            let end = self
                .read(&mut ws, &mut seen, nats.as_mut(), deadline.as_mut())
                .await;
            let code = match end {
                End::Marker => {
                    markers += 1;
                    if markers >= self.ends {
                        break true;
                    }
                    continue;
                }
                End::Stop => break false,
                End::Lost(code) => code,
            };
            if self.conn.raw {
                break false;
            }
            m.disconnected();
            let lost_at = Instant::now();
            let since = seen.last;
            let resume = epoch.as_deref().map(|e| (since, e));
            let Some((next, j, target)) = reconnect_room(
                &self.conn,
                &m,
                self.policy,
                self.who,
                at,
                code,
                lost_at,
                &sub_name(self.who as u32),
                &self.room,
                resume,
                drain_by,
            )
            .await
            else {
                // Gone for good: no connection left to close.
                self.finish(&seen, false);
                return Ok(());
            };
            // Without an epoch there was no `since`: a fresh join.
            seen.resumed(since, j.seq, j.recovered == Some(true));
            if j.epoch.is_some() {
                epoch = j.epoch;
            }
            (ws, at) = (next, target);
        };
        m.disconnected();
        self.finish(&seen, ended);
        let _ = ws.close(None).await;
        Ok(())
    }

    /// The counts at the end; what the publisher (in this process) had
    /// published and this reader never got counts as lost.
    fn finish(&self, seen: &Continuity, ended: bool) {
        let m = &self.m;
        add(&m.c.lost, seen.lost);
        add(&m.c.duplicated, seen.duplicated);
        if !ended {
            m.error("subscriber: no end marker before the drain deadline");
            if let Some(last) = m.published_seq(&self.room) {
                add(&m.c.lost, last.saturating_sub(seen.last));
            }
        }
    }

    /// One connection's read loop.
    async fn read(
        &self,
        ws: &mut Ws,
        seen: &mut Continuity,
        mut nats: Option<&mut NatsReader>,
        mut deadline: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> End {
        let (m, who) = (&self.m, self.who);
        let mut batch = Batch::default();
        let mut now = 0;
        let end = 'read: loop {
            let first = tokio::select! {
                biased;
                msg = ws.next() => match msg {
                    Some(Ok(msg)) => msg,
                    _ => break End::Lost(None),
                },
                () = &mut deadline => break End::Stop,
            };
            // Frames already read off the socket with this one share its
            // arrival time: one clock reading and one histogram lock per batch
            // instead of per delivery. The batch is bounded, so the shared time
            // is never more than a few microseconds old.
            now = now_us();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                if let Some(r) = nats.as_deref_mut() {
                    let Some(bytes) = nats::bytes_of(&msg) else {
                        count_close(m, &msg);
                        if matches!(msg, Message::Close(_)) {
                            break 'read End::Stop;
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
                    let answered = nats::pong(ws, r).await;
                    match (fed, answered) {
                        (Ok(true), _) => break 'read End::Marker,
                        (Err(e), _) | (_, Err(e)) => {
                            m.error(&format!("subscriber: {}", crate::metrics::short_error(&e)));
                            break 'read End::Stop;
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
                            break 'read End::Marker;
                        }
                        Delivery::Closed => {
                            count_close(m, &msg);
                            break 'read End::Lost(reconnect::close_code(&msg));
                        }
                        Delivery::Other => count_close(m, &msg),
                    }
                }
                if batch.len() < BATCH {
                    next = match ws.next().now_or_never() {
                        Some(Some(Ok(msg))) => Some(msg),
                        Some(_) => break 'read End::Lost(None),
                        None => None,
                    };
                }
            }
            m.delivered_batch(who, &batch.stamps, batch.unstamped, now);
            batch.clear();
        };
        if !batch.is_empty() {
            m.delivered_batch(who, &batch.stamps, batch.unstamped, now);
        }
        end
    }
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
/// from the clock's start to its stop, then an end marker. A lost
/// connection (Switchboard only) reconnects to the next URL and carries on:
/// its un-acked sends are counted as such and not resent, an un-acked end
/// marker is sent again.
#[allow(clippy::too_many_arguments)]
async fn publisher(
    conn: &Connector,
    m: &Metrics,
    policy: Policy,
    who: usize,
    user: &str,
    room: &str,
    rate: u32,
    window: usize,
    clock: Clock,
) -> anyhow::Result<()> {
    let mut at = conn.target_of(who);
    let (mut ws, _) = open_at(conn, m, who, at, user, Some(room), None).await?;
    let stop = instant_at(clock.stop);
    let mut p = Publishing {
        raw: conn.raw,
        nats: conn.nats.then(NatsReader::default),
        room,
        window,
        stop,
        deadline: stop + DRAIN,
        gap: (rate > 0).then(|| std::time::Duration::from_secs_f64(1.0 / f64::from(rate))),
        next: tokio::time::Instant::now(),
        in_flight: VecDeque::new(),
        n: 0,
        end_id: None,
        echoes: Vec::new(),
        stored: Vec::new(),
    };
    loop {
        let code = match p.drive(&mut ws, m, who).await? {
            None => break,
            Some(code) => code,
        };
        m.disconnected();
        if p.raw {
            bail!("publisher connection closed");
        }
        add(&m.c.unacked_at_close, p.in_flight.len() as u64);
        if p.end_id
            .is_some_and(|e| p.in_flight.iter().any(|(i, _, _)| *i == e))
        {
            p.end_id = None;
        }
        p.in_flight.clear();
        let lost_at = Instant::now();
        let deadline = p.deadline;
        match reconnect_room(
            conn, m, policy, who, at, code, lost_at, user, room, None, deadline,
        )
        .await
        {
            Some((next, _, target)) => (ws, at) = (next, target),
            None => bail!("publisher connection lost"),
        }
    }
    m.disconnected();
    let _ = ws.close(None).await;
    Ok(())
}

/// A publisher's state, kept across its connections.
struct Publishing<'a> {
    raw: bool,
    nats: Option<NatsReader>,
    room: &'a str,
    window: usize,
    stop: tokio::time::Instant,
    deadline: tokio::time::Instant,
    gap: Option<std::time::Duration>,
    next: tokio::time::Instant,
    /// (id, sent at, publisher stamp)
    in_flight: VecDeque<(u64, Instant, u64)>,
    n: u64,
    end_id: Option<u64>,
    echoes: Vec<u64>,
    /// (id, the seq it was stored at)
    stored: Vec<(u64, u64)>,
}

impl Publishing<'_> {
    /// Publishes on `ws` until the end marker is acked (`None`) or the
    /// connection is lost (`Some` of its close code, `None` inside when it
    /// just died).
    async fn drive(
        &mut self,
        ws: &mut Ws,
        m: &Metrics,
        who: usize,
    ) -> anyhow::Result<Option<Option<u16>>> {
        let room = self.room;
        loop {
            let now = tokio::time::Instant::now();
            let sending = now < self.stop;
            if !sending && self.end_id.is_none() && self.in_flight.is_empty() {
                // Everything is acked: send the end marker, wait for its ack.
                self.n += 1;
                let f = frame(self.raw, self.nats.is_some(), room, self.n, None)?;
                if ws.send(f).await.is_err() {
                    return Ok(Some(None));
                }
                self.in_flight.push_back((self.n, Instant::now(), 0));
                self.end_id = Some(self.n);
                continue;
            }
            if self.end_id.is_some() && self.in_flight.is_empty() {
                return Ok(None);
            }
            let may_send = sending
                && match self.gap {
                    Some(_) => now >= self.next,
                    None => self.in_flight.len() < self.window,
                };
            if may_send {
                self.n += 1;
                let t = now_us();
                let f = frame(self.raw, self.nats.is_some(), room, self.n, Some(t))?;
                if ws.send(f).await.is_err() {
                    return Ok(Some(None));
                }
                m.sent_at(1, t);
                self.in_flight.push_back((self.n, Instant::now(), t));
                if let Some(g) = self.gap {
                    self.next += g;
                }
                continue;
            }
            let wake = match self.gap {
                Some(_) if sending => self.next,
                _ if sending => self.stop,
                _ => self.deadline,
            };
            tokio::select! {
                msg = ws.next() => {
                    let msg = match msg {
                        Some(Ok(msg)) => msg,
                        _ => return Ok(Some(None)),
                    };
                    count_close(m, &msg);
                    if matches!(msg, Message::Close(_)) {
                        return Ok(Some(reconnect::close_code(&msg)));
                    }
                    self.echoes.clear();
                    if let Some(r) = self.nats.as_mut() {
                        let Some(bytes) = nats::bytes_of(&msg) else { continue };
                        let echoes = &mut self.echoes;
                        r.feed(bytes, |text| {
                            if let Some(seq) = Frame::parse(text).seq {
                                echoes.push(seq);
                            }
                            false
                        })?;
                        nats::pong(ws, r).await?;
                    } else {
                        let Message::Text(t) = msg else { continue };
                        let f = Frame::parse(t.as_str());
                        let id = match (self.raw, f.kind) {
                            (false, "ack") => f.id,
                            (true, "message") => f.seq,
                            (false, "error") => {
                                m.error(f.code.unwrap_or("unknown"));
                                f.id
                            }
                            _ => None,
                        };
                        if let Some(id) = id {
                            self.echoes.push(id);
                            if !self.raw {
                                self.stored.push((id, f.seq.unwrap_or(0)));
                            }
                        }
                    }
                    for &id in &self.echoes {
                        if let Some(pos) = self.in_flight.iter().position(|(i, _, _)| *i == id)
                            && let Some((i, at, t)) = self.in_flight.remove(pos)
                            && Some(i) != self.end_id
                        {
                            m.acked(who, at.elapsed(), t);
                            let seq = if self.raw {
                                i
                            } else {
                                self.stored.iter().find(|(x, _)| *x == i).map_or(0, |(_, s)| *s)
                            };
                            m.published(room, seq);
                        }
                    }
                    self.stored.clear();
                }
                () = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= self.deadline {
                        bail!("{} acks missing at the drain deadline", self.in_flight.len());
                    }
                }
            }
        }
    }
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
