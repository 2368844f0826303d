//! The scenarios, and what they share: opening a client (connect, welcome,
//! join, all timed), ramping connections up at a rate, and the shared clock.

pub mod chat;
pub mod connect;
pub mod fanout;
pub mod history;
pub mod idle;
pub mod soak;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{Common, Scenario};
use crate::conn::{Connector, Frame, STEP_TIMEOUT, Ws, instant_at, now_us, send_join};
use crate::metrics::{Clock, Metrics};

/// After the load stops, how long readers may take to drain before the
/// run gives up on them.
pub const DRAIN: Duration = Duration::from_secs(30);

pub async fn run(s: &Scenario, m: Arc<Metrics>) -> anyhow::Result<()> {
    match s {
        Scenario::Chat(a) => chat::run(a, m).await,
        Scenario::Fanout(a) => fanout::run(a, m).await,
        Scenario::Connect(a) => connect::run(a, m).await,
        Scenario::Idle(a) => idle::run(a, m).await,
        Scenario::History(a) => history::run(a, m).await,
        Scenario::Soak(a) => soak::run(a, m).await,
    }
}

/// Connects as `user`, reads `welcome` and joins `room` (neither in raw
/// mode). The whole handshake is timed and counted. Returns the room's seq
/// at the join (0 without one).
pub async fn open(
    conn: &Connector,
    m: &Metrics,
    who: usize,
    user: &str,
    room: Option<&str>,
) -> anyhow::Result<(Ws, u64)> {
    let t = Instant::now();
    let r = tokio::time::timeout(STEP_TIMEOUT, async {
        let in_url = room.filter(|_| conn.join_in_url);
        let mut ws = conn.connect_joining(user, in_url).await?;
        let mut seq = 0;
        if conn.nats {
            crate::nats::handshake(&mut ws, user, room).await?;
        } else if !conn.raw {
            // The join goes out at once, not after `welcome`: the server
            // reads requests only once it has sent `welcome` (PROTOCOL.md
            // §2), and a reconnecting client saves a round trip. Joined in
            // the URL, it needs no frame at all.
            if let (Some(room), None) = (room, in_url) {
                send_join(&mut ws, 1, room, None, None).await?;
            }
            expect(&mut ws, "welcome").await?;
            if room.is_some() {
                seq = expect(&mut ws, "joined").await?;
            }
        }
        anyhow::Ok((ws, seq))
    })
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("handshake timed out")));
    match r {
        Ok(x) => {
            m.connected(who, t.elapsed());
            Ok(x)
        }
        Err(e) => {
            m.connect_failed(&e);
            Err(e)
        }
    }
}

/// Reads until a frame of `kind` and returns its `seq` (0 if none).
async fn expect(ws: &mut Ws, kind: &str) -> anyhow::Result<u64> {
    loop {
        let msg = ws.next().await.context("closed during the handshake")??;
        match msg {
            Message::Text(t) => {
                let f = Frame::parse(t.as_str());
                if f.kind == kind {
                    return Ok(f.seq.unwrap_or(0));
                }
                if f.kind == "error" {
                    bail!("{kind} refused: {}", f.code.unwrap_or("?"));
                }
            }
            Message::Close(c) => bail!(
                "closed during the handshake ({})",
                c.map_or(0, |c| u16::from(c.code))
            ),
            _ => {}
        }
    }
}

/// Runs `open_one(i)` for every connection index this process owns, at
/// `--ramp-up` per second (shared among workers), and returns those that
/// succeeded, in no particular order.
pub async fn ramp<T, F, Fut>(n: u32, common: &Common, open_one: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(u32) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let per_process = f64::from(common.ramp_up.max(1)) / f64::from(common.worker_count.max(1));
    let gap = Duration::from_secs_f64(1.0 / per_process.max(1.0));
    let mut next = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in (0..n).filter(|i| common.owns(*i)) {
        tokio::time::sleep_until(next).await;
        next += gap;
        tasks.spawn(open_one(i));
    }
    let mut out = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        if let Ok(Ok(x)) = done {
            out.push(x);
        }
    }
    out
}

/// Sets the run's clock (shared by workers through `--start-at-us`) and
/// waits for the start.
pub async fn start_clock(common: &Common, m: &Metrics, warmup: bool) -> Clock {
    let start = common.start_at_us.unwrap_or_else(now_us);
    let clock = Clock::new(
        start,
        if warmup { common.warmup_us() } else { 0 },
        common.duration_us(),
    );
    m.set_clock(clock);
    tokio::time::sleep_until(instant_at(start)).await;
    clock
}

/// A close frame's code, counted.
pub fn count_close(m: &Metrics, msg: &Message) {
    if let Message::Close(Some(c)) = msg {
        m.close_code(u16::from(c.code));
    }
}
