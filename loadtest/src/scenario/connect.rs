//! `connect`: a connection storm. Each attempt is TCP + TLS (for wss) +
//! upgrade + `join` (sent at once) + `welcome` + `joined`, timed as one
//! handshake; then the connection is closed (or held with `--hold`). At
//! `--rate` attempts per second, or as fast as `--concurrency` attempts in
//! flight allow.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore};

use super::{open, start_clock};
use crate::cli::ConnectArgs;
use crate::conn::{Connector, Ws, instant_at};
use crate::metrics::Metrics;

pub async fn run(a: &ConnectArgs, m: Arc<Metrics>) -> anyhow::Result<()> {
    let conn = Arc::new(Connector::new(&a.common)?);
    let clock = start_clock(&a.common, &m, false).await;
    let stop = instant_at(clock.stop);
    let held: Arc<Mutex<Vec<Ws>>> = Arc::new(Mutex::new(Vec::new()));
    let workers = f64::from(a.common.worker_count.max(1));
    let gap = (a.rate > 0).then(|| Duration::from_secs_f64(workers / f64::from(a.rate)));
    let permits = Arc::new(Semaphore::new(
        (a.concurrency as usize / a.common.worker_count.max(1) as usize).max(1),
    ));
    let mut next = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in (0..a.clients).filter(|i| a.common.owns(*i)) {
        if tokio::time::Instant::now() >= stop {
            break;
        }
        let permit = match gap {
            Some(g) => {
                tokio::time::sleep_until(next).await;
                next += g;
                None
            }
            None => Some(permits.clone().acquire_owned().await?),
        };
        let (conn, m, held, room, hold) = (
            conn.clone(),
            m.clone(),
            held.clone(),
            a.room.clone(),
            a.hold,
        );
        tasks.spawn(async move {
            let r = open(&conn, &m, i as usize, &format!("c{i}"), Some(&room)).await;
            drop(permit);
            if let Ok((mut ws, _)) = r {
                if hold {
                    held.lock().await.push(ws);
                } else {
                    let _ = ws.close(None).await;
                    m.disconnected();
                }
            }
        });
    }
    let _ =
        tokio::time::timeout_at(stop, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    m.stop_now();
    for mut ws in held.lock().await.drain(..) {
        let _ = ws.close(None).await;
        m.disconnected();
    }
    Ok(())
}
