//! `idle`: hold N connections (each joined to a room unless raw) for the
//! measured window, reading only to answer pings, so the server's memory
//! per connection can be read from /proc (`--server-pid`).

use std::sync::Arc;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::{count_close, open, ramp, start_clock};
use crate::cli::IdleArgs;
use crate::conn::{Connector, instant_at};
use crate::metrics::Metrics;

pub async fn run(a: &IdleArgs, m: Arc<Metrics>) -> anyhow::Result<()> {
    let conn = Arc::new(Connector::new(&a.common)?);
    let rooms = a.rooms.max(1);
    let held = ramp(a.clients, &a.common, |i| {
        let (conn, m) = (conn.clone(), m.clone());
        async move {
            let room = format!("idle{}", i % rooms);
            let (ws, _) = open(&conn, &m, i as usize, &format!("i{i}"), Some(&room)).await?;
            anyhow::Ok(ws)
        }
    })
    .await;
    let clock = start_clock(&a.common, &m, true).await;
    let stop = instant_at(clock.stop);
    let mut tasks = tokio::task::JoinSet::new();
    for mut ws in held {
        let m = m.clone();
        tasks.spawn(async move {
            while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(stop, ws.next()).await {
                count_close(&m, &msg);
                if matches!(msg, Message::Close(_)) {
                    m.error("idle: the server closed a held connection");
                    break;
                }
            }
            m.disconnected();
            let _ = ws.close(None).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
