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
use crate::metrics::{Clock, Metrics, add};
use crate::reconnect::{self, Policy};
use switchboard_client::backoff::Action;

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
/// at the join (0 without one). Connection `who` goes to URL `who mod n`.
pub async fn open(
    conn: &Connector,
    m: &Metrics,
    who: usize,
    user: &str,
    room: Option<&str>,
) -> anyhow::Result<(Ws, u64)> {
    let (ws, joined) = open_at(conn, m, who, conn.target_of(who), user, room, None).await?;
    Ok((ws, joined.seq))
}

/// What a `joined` said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Joined {
    pub seq: u64,
    pub epoch: Option<String>,
    pub recovered: Option<bool>,
}

/// As [`open`], to URL `target` (mod n), resuming `room` after
/// `resume = (since, epoch)` when given.
pub async fn open_at(
    conn: &Connector,
    m: &Metrics,
    who: usize,
    target: usize,
    user: &str,
    room: Option<&str>,
    resume: Option<(u64, &str)>,
) -> anyhow::Result<(Ws, Joined)> {
    let t = Instant::now();
    let r = tokio::time::timeout(STEP_TIMEOUT, async {
        // `?join=` carries no `since`: a resume joins with a frame.
        let in_url = room.filter(|_| conn.join_in_url && resume.is_none());
        let mut ws = conn.connect_joining(target, user, in_url).await?;
        let mut joined = Joined::default();
        if conn.nats {
            crate::nats::handshake(&mut ws, user, room).await?;
        } else if !conn.raw {
            // The join goes out at once, not after `welcome`: the server
            // reads requests only once it has sent `welcome` (PROTOCOL.md
            // §2), and a reconnecting client saves a round trip. Joined in
            // the URL, it needs no frame at all.
            if let (Some(room), None) = (room, in_url) {
                let (since, epoch) = resume.map_or((None, None), |(s, e)| (Some(s), Some(e)));
                send_join(&mut ws, 1, room, since, epoch).await?;
            }
            expect(&mut ws, "welcome").await?;
            if room.is_some() {
                joined = expect(&mut ws, "joined").await?;
            }
        }
        anyhow::Ok((ws, joined))
    })
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("handshake timed out")));
    match r {
        Ok(x) => {
            m.connected(who, t.elapsed());
            if conn.targets() > 1 {
                m.connected_to(conn.url(target));
            }
            Ok(x)
        }
        Err(e) => {
            m.connect_failed(&e);
            Err(e)
        }
    }
}

/// Reconnects a connection that was on URL `from` and ended with close
/// code `code` (`None`: the socket died), re-joining `room` after `since`
/// in `epoch` when both are known: up to `policy.attempts` attempts, each
/// to the next URL, paused as the policy says. Counts the reconnect and
/// the time from `lost_at` to the `joined`. Returns the connection, the
/// `joined` and the URL it is on; `None` when the close says not to
/// reconnect, the attempts ran out, or `deadline` passed.
#[allow(clippy::too_many_arguments)]
pub async fn reconnect_room(
    conn: &Connector,
    m: &Metrics,
    policy: Policy,
    who: usize,
    from: usize,
    code: Option<u16>,
    lost_at: Instant,
    user: &str,
    room: &str,
    resume: Option<(u64, &str)>,
    deadline: tokio::time::Instant,
) -> Option<(Ws, Joined, usize)> {
    let how = reconnect::after(code);
    if !policy.enabled() || how == Action::Stop {
        return None;
    }
    for k in 0..policy.attempts {
        let pause = policy.pause(k, how);
        if tokio::time::Instant::now() + pause >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        let target = policy.target(from, k, conn.targets());
        if let Ok((ws, joined)) = open_at(conn, m, who, target, user, Some(room), resume).await {
            add(&m.c.reconnects, 1);
            m.resumed(who, lost_at.elapsed());
            return Some((ws, joined, target));
        }
    }
    m.error("reconnect: attempts exhausted");
    None
}

/// Reads until a frame of `kind` and returns what it said.
async fn expect(ws: &mut Ws, kind: &str) -> anyhow::Result<Joined> {
    loop {
        let msg = ws.next().await.context("closed during the handshake")??;
        match msg {
            Message::Text(t) => {
                let f = Frame::parse(t.as_str());
                if f.kind == kind {
                    return Ok(Joined {
                        seq: f.seq.unwrap_or(0),
                        epoch: f.epoch.map(str::to_owned),
                        recovered: f.recovered,
                    });
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
