//! `chat`: a simulation of real use. N users over R rooms with Zipf
//! popularity, k rooms each; Poisson sends per user, typing before some
//! sends; join/leave churn; a share of users that drop their connection and
//! resume with `join {since, epoch}`; a share of slow readers, who only
//! read, pausing after every frame (their latency is kept apart).
//!
//! A connection the server closes with a reconnect code, or whose socket
//! dies (its node was killed), reconnects to the next URL within
//! `--reconnect-attempts` and resumes every room the same way; the time
//! from the loss to the last room re-joined is the `resume` latency.
//!
//! Every user checks per-room seq continuity. A gap filled by a replay
//! (`recovered: true`) or by paging history (`recovered: false`) counts as
//! recovered, not lost. At the stop every user re-joins its rooms (which
//! answers the room's latest seq and changes nothing) and reads until it has
//! seen up to that seq, so a message still in flight is not called lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use protocol::{Body, ClientRequest};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant as TInstant;
use tokio_tungstenite::tungstenite::Message;

use super::{DRAIN, count_close, start_clock};
use crate::cli::ChatArgs;
use crate::conn::{Connector, Frame, STEP_TIMEOUT, Ws, history_seqs, instant_at, now_us, request};
use crate::metrics::{Clock, Metrics, add, get, short_error};
use crate::reconnect::{self, Policy};
use switchboard_client::backoff::Action;

/// Room popularity: P(room r) proportional to 1 / (r + 1)^s.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u32, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (0..n.max(1))
            .map(|r| {
                acc += 1.0 / f64::from(r + 1).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        let u: f64 = rng.random();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1) as u32
    }

    /// `k` distinct rooms (fewer if there are not that many).
    pub fn distinct(&self, k: u32, rng: &mut impl Rng) -> Vec<u32> {
        let k = (k as usize).min(self.cdf.len());
        let mut out: Vec<u32> = Vec::with_capacity(k);
        let mut tries = 0;
        while out.len() < k && tries < 1000 {
            tries += 1;
            let r = self.sample(rng);
            if !out.contains(&r) {
                out.push(r);
            }
        }
        let mut r = 0;
        while out.len() < k {
            if !out.contains(&r) {
                out.push(r);
            }
            r += 1;
        }
        out
    }
}

/// An exponential gap with mean `1 / rate`.
fn exp_gap(rng: &mut impl Rng, rate: f64) -> Duration {
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    Duration::from_secs_f64((-u.ln() / rate).min(3600.0))
}

pub async fn run(a: &ChatArgs, m: Arc<Metrics>) -> anyhow::Result<()> {
    if a.common.foreign() {
        bail!("chat needs a Switchboard server, not --raw");
    }
    let conn = Arc::new(Connector::new(&a.common)?);
    let zipf = Arc::new(Zipf::new(a.rooms, a.zipf));
    let (clock_tx, clock_rx) = watch::channel(None::<Clock>);
    let per_process = f64::from(a.common.ramp_up.max(1)) / f64::from(a.common.worker_count.max(1));
    let gap = Duration::from_secs_f64(1.0 / per_process.max(1.0));
    let mut next = TInstant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut mine = 0u64;
    for i in (0..a.users).filter(|i| a.common.owns(*i)) {
        tokio::time::sleep_until(next).await;
        next += gap;
        mine += 1;
        let user = User::new(
            i,
            a,
            conn.clone(),
            m.clone(),
            zipf.clone(),
            clock_rx.clone(),
        );
        tasks.spawn(async move {
            let m = user.m.clone();
            if let Err(e) = user.run().await {
                m.error(&format!("user: {}", short_error(&e)));
            }
        });
    }
    // Start once every user has connected or failed (bounded).
    let ready_by = TInstant::now() + STEP_TIMEOUT;
    while get(&m.c.established) + get(&m.c.failed) < mine && TInstant::now() < ready_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let clock = start_clock(&a.common, &m, true).await;
    let _ = clock_tx.send(Some(clock));
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `join` sent; `since` when resuming.
    Joining {
        id: u64,
        since: Option<u64>,
    },
    Live,
    Leaving,
    Left,
}

#[derive(Debug)]
struct Room {
    name: String,
    phase: Phase,
    last: u64,
    epoch: Option<String>,
    /// Highest seq seen before a fresh join's reply.
    early: u64,
    /// Gap of a `recovered: false` resume still being paged: (request id,
    /// cursor, upto, still missing).
    paging: Option<(u64, u64, u64, u64)>,
    /// The final re-join: its id, then the room's latest seq at the stop.
    final_id: Option<u64>,
    target: Option<u64>,
}

impl Room {
    fn new(name: String, id: u64) -> Room {
        Room {
            name,
            phase: Phase::Joining { id, since: None },
            last: 0,
            epoch: None,
            early: 0,
            paging: None,
            final_id: None,
            target: None,
        }
    }

    fn caught_up(&self) -> bool {
        match self.phase {
            Phase::Live => self.paging.is_none() && self.target.is_some_and(|t| self.last >= t),
            Phase::Left | Phase::Leaving => true,
            Phase::Joining { .. } => false,
        }
    }
}

struct User {
    who: usize,
    name: String,
    a: ChatArgs,
    conn: Arc<Connector>,
    m: Arc<Metrics>,
    zipf: Arc<Zipf>,
    clock_rx: watch::Receiver<Option<Clock>>,
    rng: SmallRng,
    rooms: Vec<Room>,
    in_flight: VecDeque<(u64, Instant, u64)>,
    next_id: u64,
    slow: bool,
    dropper: bool,
    finishing: bool,
    seqs: Vec<u64>,
    /// The URL this user is connected to.
    target: usize,
    policy: Policy,
    /// When the server lost this user's connection, until every room is
    /// re-joined.
    resume_from: Option<Instant>,
}

impl User {
    fn new(
        i: u32,
        a: &ChatArgs,
        conn: Arc<Connector>,
        m: Arc<Metrics>,
        zipf: Arc<Zipf>,
        clock_rx: watch::Receiver<Option<Clock>>,
    ) -> User {
        let mut rng = SmallRng::seed_from_u64(
            a.common.seed ^ u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let slow = rng.random_bool(a.slow_share.clamp(0.0, 1.0));
        let dropper = !slow && rng.random_bool(a.drop_share.clamp(0.0, 1.0));
        User {
            who: i as usize,
            name: format!("u{i}"),
            a: a.clone(),
            conn,
            m,
            zipf,
            clock_rx,
            rng,
            rooms: Vec::new(),
            in_flight: VecDeque::new(),
            next_id: 0,
            slow,
            dropper,
            finishing: false,
            seqs: Vec::new(),
            target: i as usize,
            policy: Policy::of(&a.common),
            resume_from: None,
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    async fn connect(&mut self, target: usize) -> anyhow::Result<Ws> {
        let t = Instant::now();
        let r = tokio::time::timeout(STEP_TIMEOUT, async {
            let mut ws = self.conn.connect(target, &self.name).await?;
            // The first frame is `welcome`.
            match ws.next().await {
                Some(Ok(Message::Text(_))) => anyhow::Ok(ws),
                _ => bail!("no welcome"),
            }
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("handshake timed out")));
        match r {
            Ok(ws) => {
                self.m.connected(self.who, t.elapsed());
                if self.conn.targets() > 1 {
                    self.m.connected_to(self.conn.url(target));
                }
                self.target = target;
                Ok(ws)
            }
            Err(e) => {
                self.m.connect_failed(&e);
                Err(e)
            }
        }
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let mut ws = self.connect(self.target).await?;
        let k = self.a.rooms_per_user;
        for r in self.zipf.distinct(k, &mut self.rng) {
            let id = self.id();
            let name = format!("r{r}");
            ws.send(join(&name, id, None, None)).await?;
            add(&self.m.c.joins, 1);
            self.rooms.push(Room::new(name, id));
        }
        // Wait for the clock while reading the join replies.
        let clock = loop {
            if let Some(c) = *self.clock_rx.borrow_and_update() {
                break c;
            }
            tokio::select! {
                changed = self.clock_rx.changed() => if changed.is_err() { return Ok(()) },
                msg = ws.next() => match msg {
                    Some(Ok(msg)) => self.on_message(&mut ws, msg, None).await?,
                    _ => bail!("closed before the start"),
                },
            }
        };
        tokio::time::sleep_until(instant_at(clock.start)).await;
        let stop = instant_at(clock.stop);
        let deadline = stop + DRAIN;
        let far = deadline + Duration::from_secs(3600);
        let rate = self.a.rate.max(0.0);
        let mut next_send = if rate > 0.0 {
            TInstant::now() + exp_gap(&mut self.rng, rate)
        } else {
            far
        };
        let churn = self.a.churn_interval;
        let mut next_churn = if churn > 0.0 {
            TInstant::now() + exp_gap(&mut self.rng, 1.0 / churn)
        } else {
            far
        };
        let drop_rate = 1.0 / self.a.drop_interval.max(0.1);
        let mut next_drop = if self.dropper {
            TInstant::now() + exp_gap(&mut self.rng, drop_rate)
        } else {
            far
        };
        loop {
            // Checked here too: a reader that always has a frame waiting
            // must still stop on time.
            let now = TInstant::now();
            if now >= deadline {
                self.give_up();
                break;
            }
            if !self.finishing && now >= stop {
                self.finishing = true;
                if self.final_sync(&mut ws).await.is_err() {
                    ws = self.lost(ws, None, deadline).await?;
                }
            }
            if self.finishing && self.rooms.iter().all(Room::caught_up) && self.in_flight.is_empty()
            {
                break;
            }
            let running = !self.finishing;
            // Every write goes to the socket: one that fails means the
            // connection is gone (its server was killed) as surely as a read
            // that ends.
            let written: anyhow::Result<()> = tokio::select! {
                msg = ws.next() => {
                    match msg {
                        Some(Ok(msg)) => {
                            let closing = matches!(msg, Message::Close(_));
                            let code = reconnect::close_code(&msg);
                            let r = self.on_message(&mut ws, msg, Some(clock)).await;
                            if closing {
                                ws = self.lost(ws, code, deadline).await?;
                                Ok(())
                            } else {
                                if r.is_ok() && self.slow && running {
                                    tokio::time::sleep(Duration::from_millis(self.a.slow_delay_ms)).await;
                                }
                                r
                            }
                        }
                        _ => {
                            ws = self.lost(ws, None, deadline).await?;
                            Ok(())
                        }
                    }
                }
                () = tokio::time::sleep_until(stop), if running => {
                    self.finishing = true;
                    self.final_sync(&mut ws).await
                }
                () = tokio::time::sleep_until(deadline) => {
                    self.give_up();
                    break;
                }
                () = tokio::time::sleep_until(next_send), if running => {
                    next_send += exp_gap(&mut self.rng, rate);
                    self.send(&mut ws).await
                }
                () = tokio::time::sleep_until(next_churn), if running => {
                    next_churn += exp_gap(&mut self.rng, 1.0 / churn);
                    self.churn(&mut ws).await
                }
                () = tokio::time::sleep_until(next_drop), if running => {
                    next_drop = TInstant::now() + exp_gap(&mut self.rng, drop_rate);
                    let pause = Duration::from_millis(self.rng.random_range(100..600));
                    ws = self.reconnect(ws, pause, Action::Immediate, deadline).await?;
                    Ok(())
                }
            };
            if written.is_err() {
                ws = self.lost(ws, None, deadline).await?;
            }
        }
        self.m.disconnected();
        let _ = ws.close(None).await;
        Ok(())
    }

    /// The server closed the connection with `code`, or it died (`None`):
    /// reconnect and resume if the close table says so, else end this user.
    async fn lost(&mut self, ws: Ws, code: Option<u16>, deadline: TInstant) -> anyhow::Result<Ws> {
        let how = reconnect::after(code);
        if how == Action::Stop || !self.policy.enabled() {
            drop(ws);
            self.m.disconnected();
            add(&self.m.c.unacked_at_close, self.in_flight.len() as u64);
            self.in_flight.clear();
            self.give_up();
            bail!("closed ({}) with no reconnect", code.unwrap_or(0));
        }
        self.resume_from = Some(Instant::now());
        self.reconnect(ws, Duration::ZERO, how, deadline).await
    }

    /// Drops the connection, waits `pause`, reconnects (to the next URL,
    /// within the policy's attempts) and resumes every room.
    async fn reconnect(
        &mut self,
        ws: Ws,
        pause: Duration,
        how: Action,
        deadline: TInstant,
    ) -> anyhow::Result<Ws> {
        drop(ws);
        self.m.disconnected();
        add(&self.m.c.unacked_at_close, self.in_flight.len() as u64);
        self.in_flight.clear();
        tokio::time::sleep(pause).await;
        let from = self.target;
        let mut connected = None;
        // A deliberate drop reconnects even with `--reconnect-attempts 0`.
        for k in 0..self.policy.attempts.max(1) {
            let wait = self.policy.pause(k, how);
            if TInstant::now() + wait >= deadline {
                break;
            }
            tokio::time::sleep(wait).await;
            let target = self.policy.target(from, k, self.conn.targets());
            if let Ok(ws) = self.connect(target).await {
                connected = Some(ws);
                break;
            }
        }
        let Some(mut ws) = connected else {
            self.give_up();
            bail!("reconnect: attempts exhausted");
        };
        add(&self.m.c.reconnects, 1);
        for i in 0..self.rooms.len() {
            let resume = match self.rooms[i].phase {
                // Where a live room was (or where a resume had got to).
                Phase::Live => Some(self.rooms[i].last),
                Phase::Joining { since, .. } => since,
                Phase::Leaving | Phase::Left => {
                    self.rooms[i].phase = Phase::Left;
                    continue;
                }
            };
            if let Some((_, _, _, missing)) = self.rooms[i].paging.take() {
                // The page in flight is gone with the connection.
                add(&self.m.c.lost, missing);
            }
            let id = self.id();
            let room = &mut self.rooms[i];
            ws.send(join(&room.name, id, resume, room.epoch.as_deref()))
                .await?;
            add(&self.m.c.joins, 1);
            room.phase = Phase::Joining { id, since: resume };
            room.final_id = None;
            room.target = None;
        }
        if self.finishing {
            self.final_sync(&mut ws).await?;
        }
        self.check_resumed();
        Ok(ws)
    }

    /// Once no room is still being re-joined after a loss, the resume is
    /// done: its time is recorded.
    fn check_resumed(&mut self) {
        if let Some(at) = self.resume_from
            && !self
                .rooms
                .iter()
                .any(|r| matches!(r.phase, Phase::Joining { .. }))
        {
            self.m.resumed(self.who, at.elapsed());
            self.resume_from = None;
        }
    }

    /// Re-joins every room: the reply's seq is the latest at the stop.
    async fn final_sync(&mut self, ws: &mut Ws) -> anyhow::Result<()> {
        for i in 0..self.rooms.len() {
            if matches!(self.rooms[i].phase, Phase::Leaving | Phase::Left) {
                continue;
            }
            let id = self.id();
            ws.send(join(&self.rooms[i].name, id, None, None)).await?;
            self.rooms[i].final_id = Some(id);
        }
        Ok(())
    }

    /// At the drain deadline: whatever was not seen is lost.
    fn give_up(&mut self) {
        for r in &self.rooms {
            if let (Phase::Live, Some(t)) = (r.phase, r.target)
                && t > r.last
            {
                add(&self.m.c.lost, t - r.last);
                self.m.error("chat: messages missing at the drain deadline");
            }
            if let Some((_, _, _, missing)) = r.paging {
                add(&self.m.c.lost, missing);
            }
        }
        add(&self.m.c.unacked_at_close, self.in_flight.len() as u64);
    }

    async fn send(&mut self, ws: &mut Ws) -> anyhow::Result<()> {
        // Slow readers only read (their acks would wait behind their backlog).
        if self.slow || self.in_flight.len() >= self.a.window as usize {
            return Ok(());
        }
        let live: Vec<usize> = (0..self.rooms.len())
            .filter(|i| self.rooms[*i].phase == Phase::Live)
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let room = self.rooms[live[self.rng.random_range(0..live.len())]]
            .name
            .clone();
        if self.rng.random_bool(self.a.typing.clamp(0.0, 1.0)) {
            ws.send(request(None, ClientRequest::Typing { room: room.clone() }))
                .await?;
            add(&self.m.c.typing_sent, 1);
        }
        let id = self.id();
        let t = now_us();
        let body = Body::from_json(&format!(r#"{{"t":{t}}}"#))?;
        ws.send(request(
            Some(id),
            ClientRequest::Send {
                room,
                body,
                key: None,
            },
        ))
        .await?;
        self.m.sent_at(1, t);
        self.in_flight.push_back((id, Instant::now(), t));
        Ok(())
    }

    /// Leaves one live room and joins another (fresh).
    async fn churn(&mut self, ws: &mut Ws) -> anyhow::Result<()> {
        let live: Vec<usize> = (0..self.rooms.len())
            .filter(|i| self.rooms[*i].phase == Phase::Live)
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let i = live[self.rng.random_range(0..live.len())];
        let id = self.id();
        ws.send(request(
            Some(id),
            ClientRequest::Leave {
                room: self.rooms[i].name.clone(),
            },
        ))
        .await?;
        add(&self.m.c.leaves, 1);
        self.rooms[i].phase = Phase::Leaving;
        self.rooms[i].paging = None;
        // A room this user is not in now.
        for _ in 0..20 {
            let name = format!("r{}", self.zipf.sample(&mut self.rng));
            let pos = self.rooms.iter().position(|r| r.name == name);
            if pos.is_some_and(|p| self.rooms[p].phase != Phase::Left) {
                continue;
            }
            let id = self.id();
            ws.send(join(&name, id, None, None)).await?;
            add(&self.m.c.joins, 1);
            match pos {
                Some(p) => self.rooms[p] = Room::new(name, id),
                None => self.rooms.push(Room::new(name, id)),
            }
            break;
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        ws: &mut Ws,
        msg: Message,
        clock: Option<Clock>,
    ) -> anyhow::Result<()> {
        let _ = clock;
        count_close(&self.m, &msg);
        let Message::Text(text) = msg else {
            return Ok(());
        };
        let f = Frame::parse(text.as_str());
        match f.kind {
            "message" => self.on_delivery(&f),
            "joined" => self.on_joined(ws, &f).await?,
            "left" => {
                if let Some(r) = self.room_mut(f.room) {
                    r.phase = Phase::Left;
                }
            }
            "ack" => {
                if let Some(pos) = self.in_flight.iter().position(|(i, _, _)| Some(*i) == f.id)
                    && let Some((_, at, t)) = self.in_flight.remove(pos)
                {
                    self.m.acked(self.who, at.elapsed(), t);
                }
            }
            "history" => self.on_history(ws, &f, text.as_str()).await?,
            "typing" => add(&self.m.c.typing_received, 1),
            "error" => {
                self.m.error(f.code.unwrap_or("unknown"));
                if let Some(pos) = self.in_flight.iter().position(|(i, _, _)| Some(*i) == f.id) {
                    self.in_flight.remove(pos);
                }
                for r in &mut self.rooms {
                    if matches!(r.phase, Phase::Joining { id, .. } if Some(id) == f.id) {
                        r.phase = Phase::Left;
                    }
                }
                self.check_resumed();
            }
            _ => {}
        }
        Ok(())
    }

    fn room_mut(&mut self, name: Option<&str>) -> Option<&mut Room> {
        let name = name?;
        self.rooms.iter_mut().find(|r| r.name == name)
    }

    fn on_delivery(&mut self, f: &Frame<'_>) {
        let (who, m) = (self.who, self.m.clone());
        // Replays are recovered messages: delivered, but their latency
        // includes the time away, so it is left out.
        let stamp = if f.replay { None } else { f.stamp };
        if self.slow {
            m.delivered_slow(who, stamp);
        } else {
            m.delivered(who, stamp);
        }
        let Some(seq) = f.seq else { return };
        let Some(r) = self.room_mut(f.room) else {
            return;
        };
        match r.phase {
            Phase::Live => {
                if seq <= r.last {
                    add(&m.c.duplicated, 1);
                } else {
                    if seq > r.last + 1 {
                        add(&m.c.lost, seq - r.last - 1);
                    }
                    r.last = seq;
                    if f.replay {
                        add(&m.c.recovered, 1);
                    }
                }
            }
            Phase::Joining { since: None, .. } => r.early = r.early.max(seq),
            _ => {}
        }
    }

    async fn on_joined(&mut self, ws: &mut Ws, f: &Frame<'_>) -> anyhow::Result<()> {
        let seq = f.seq.unwrap_or(0);
        let m = self.m.clone();
        let paging_id = self.next_id + 1;
        let Some(r) = self.room_mut(f.room) else {
            return Ok(());
        };
        if r.final_id.is_some() && r.final_id == f.id {
            r.target = Some(seq);
            return Ok(());
        }
        let Phase::Joining { id, since } = r.phase else {
            return Ok(());
        };
        if Some(id) != f.id {
            return Ok(());
        }
        if let Some(e) = f.epoch {
            r.epoch = Some(e.to_owned());
        }
        r.phase = Phase::Live;
        match (since, f.recovered) {
            (None, _) => r.last = seq.max(r.early),
            // The replay follows: continuity counts it.
            (Some(s), Some(true)) => r.last = s,
            (Some(s), _) => {
                // Nothing replayed: page the gap (s, seq] from history.
                r.last = seq;
                if seq > s {
                    r.paging = Some((paging_id, s, seq, seq - s));
                    let room = r.name.clone();
                    self.next_id += 1;
                    ws.send(history_after(&room, paging_id, s)).await?;
                    m.error("chat: resume not recovered, paging history");
                }
            }
        }
        self.check_resumed();
        Ok(())
    }

    async fn on_history(&mut self, ws: &mut Ws, f: &Frame<'_>, text: &str) -> anyhow::Result<()> {
        let mut seqs = std::mem::take(&mut self.seqs);
        history_seqs(text, &mut seqs);
        let m = self.m.clone();
        let next = self.next_id + 1;
        let mut again = None;
        if let Some(r) = self.room_mut(f.room)
            && let Some((id, cursor, upto, missing)) = r.paging
            && Some(id) == f.id
        {
            let got = seqs.iter().filter(|s| **s > cursor && **s <= upto).count() as u64;
            add(&m.c.history_pages, 1);
            add(&m.c.history_messages, seqs.len() as u64);
            add(&m.c.recovered, got);
            let missing = missing.saturating_sub(got);
            let cursor = seqs.last().copied().unwrap_or(upto).max(cursor);
            if f.more && cursor < upto && missing > 0 && !seqs.is_empty() {
                r.paging = Some((next, cursor, upto, missing));
                again = Some((r.name.clone(), cursor));
            } else {
                add(&m.c.lost, missing);
                r.paging = None;
            }
        }
        self.seqs = seqs;
        if let Some((room, cursor)) = again {
            self.next_id += 1;
            ws.send(history_after(&room, next, cursor)).await?;
        }
        Ok(())
    }
}

fn join(room: &str, id: u64, since: Option<u64>, epoch: Option<&str>) -> Message {
    request(
        Some(id),
        ClientRequest::Join {
            room: room.to_owned(),
            since,
            epoch: epoch.map(str::to_owned),
        },
    )
}

fn history_after(room: &str, id: u64, after: u64) -> Message {
    request(
        Some(id),
        ClientRequest::History {
            room: room.to_owned(),
            before: None,
            after: Some(after),
            limit: Some(200),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_the_first_rooms_and_picks_distinct() {
        let z = Zipf::new(100, 1.0);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = [0u32; 100];
        for _ in 0..10_000 {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        assert!(counts[0] > counts[9] && counts[9] > counts[99]);
        let d = z.distinct(5, &mut rng);
        let mut s = d.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), 5);
        assert_eq!(z.distinct(500, &mut rng).len(), 100);
    }
}
