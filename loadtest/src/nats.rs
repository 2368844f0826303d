//! `--nats`: the NATS client protocol (the text protocol of `INFO`,
//! `CONNECT`, `SUB`, `PUB`, `MSG`, `PING`/`PONG`) over nats-server's
//! WebSocket listener, as far as a fan-out needs it: a room is a subject,
//! every connection subscribes to its room, the publisher's `PUB` payload is
//! the same self-numbered `message` frame as in raw mode, and its own echo
//! stands in for the ack. This module owns the framing only; the scenarios
//! read the payloads as they read any server's frames.

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::Ws;

/// Longest protocol line accepted (an `INFO` is a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;

/// Splits the byte stream of NATS operations, carried in WebSocket frames
/// that need not align with them, into message payloads.
#[derive(Debug, Default)]
pub struct NatsReader {
    /// Bytes of an operation not complete yet.
    partial: Vec<u8>,
    /// `PING`s the server sent that are not answered yet.
    pub pings: u32,
    /// `PONG`s received.
    pub pongs: u32,
    /// `INFO`s received.
    pub infos: u32,
}

impl NatsReader {
    /// Reads the operations in `data`, calling `on_msg` with each `MSG`
    /// payload (as text) until it returns `true` (stop). Returns whether it
    /// stopped.
    pub fn feed(
        &mut self,
        data: &[u8],
        mut on_msg: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<bool> {
        if self.partial.is_empty() {
            let (used, stop) = self.ops(data, &mut on_msg)?;
            if !stop {
                self.partial.extend_from_slice(&data[used..]);
            }
            return Ok(stop);
        }
        let mut buf = std::mem::take(&mut self.partial);
        buf.extend_from_slice(data);
        let (used, stop) = self.ops(&buf, &mut on_msg)?;
        if !stop {
            buf.drain(..used);
            self.partial = buf;
        }
        Ok(stop)
    }

    /// Reads every complete operation of `b`: returns how many bytes they
    /// took, and whether `on_msg` asked to stop.
    fn ops(
        &mut self,
        b: &[u8],
        on_msg: &mut impl FnMut(&str) -> bool,
    ) -> anyhow::Result<(usize, bool)> {
        let mut at = 0;
        while at < b.len() {
            let Some(nl) = b[at..].iter().position(|c| *c == b'\n') else {
                if b.len() - at > MAX_LINE {
                    bail!("a NATS protocol line longer than {MAX_LINE} bytes");
                }
                break;
            };
            let line = &b[at..at + nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let after = at + nl + 1;
            if let Some(args) = line.strip_prefix(b"MSG ") {
                let len: usize = std::str::from_utf8(args)
                    .ok()
                    .and_then(|a| a.split_ascii_whitespace().last())
                    .and_then(|n| n.parse().ok())
                    .context("a MSG line without a size")?;
                // The payload and its CRLF.
                if b.len() < after + len + 2 {
                    break;
                }
                let payload = std::str::from_utf8(&b[after..after + len])
                    .context("a MSG payload in UTF-8")?;
                at = after + len + 2;
                if on_msg(payload) {
                    return Ok((at, true));
                }
                continue;
            }
            if line == b"PING" {
                self.pings += 1;
            } else if line == b"PONG" {
                self.pongs += 1;
            } else if line.starts_with(b"INFO") {
                self.infos += 1;
            } else if let Some(e) = line.strip_prefix(b"-ERR") {
                bail!("nats-server: {}", String::from_utf8_lossy(e).trim());
            }
            at = after;
        }
        Ok((at, false))
    }
}

/// The bytes a WebSocket message carries (NATS sends binary frames).
pub fn bytes_of(msg: &Message) -> Option<&[u8]> {
    match msg {
        Message::Binary(b) => Some(b),
        Message::Text(t) => Some(t.as_bytes()),
        _ => None,
    }
}

/// One operation (or several) as a binary WebSocket frame.
pub fn op(text: String) -> Message {
    Message::Binary(text.into_bytes().into())
}

/// `PUB subject` with `payload`.
pub fn publish(subject: &str, payload: &str) -> Message {
    op(format!("PUB {subject} {}\r\n{payload}\r\n", payload.len()))
}

/// Answers the server's pings counted in `r`.
pub async fn pong(ws: &mut Ws, r: &mut NatsReader) -> anyhow::Result<()> {
    while r.pings > 0 {
        r.pings -= 1;
        ws.send(op("PONG\r\n".into())).await?;
    }
    Ok(())
}

/// After the upgrade: reads `INFO`, sends `CONNECT` and, with a subject,
/// `SUB`; then `PING`, and waits for the `PONG` that says the subscription
/// is in place (the server answers in order).
pub async fn handshake(ws: &mut Ws, user: &str, subject: Option<&str>) -> anyhow::Result<()> {
    let mut r = NatsReader::default();
    let mut ops = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":true,\"name\":\"{user}\"}}\r\n"
    );
    if let Some(s) = subject {
        ops.push_str(&format!("SUB {s} 1\r\n"));
    }
    ops.push_str("PING\r\n");
    let mut sent = false;
    while r.pongs == 0 {
        let msg = ws
            .next()
            .await
            .context("closed during the NATS handshake")??;
        if let Message::Close(c) = &msg {
            bail!(
                "closed during the NATS handshake ({})",
                c.as_ref().map_or(0, |c| u16::from(c.code))
            );
        }
        if let Some(b) = bytes_of(&msg) {
            r.feed(b, |_| false)?;
        }
        pong(ws, &mut r).await?;
        if r.infos > 0 && !sent {
            ws.send(op(std::mem::take(&mut ops))).await?;
            sent = true;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_operations_across_frames() {
        let stream = b"INFO {\"server_id\":\"x\"}\r\nMSG room 1 11\r\n{\"seq\":1}xy\r\nPING\r\nMSG room 1 reply.to 3\r\nabc\r\nPONG\r\n+OK\r\n";
        // Every split point gives the same payloads and counts.
        for cut in 0..stream.len() {
            let mut r = NatsReader::default();
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                let stop = r
                    .feed(part, |p| {
                        got.push(p.to_owned());
                        false
                    })
                    .unwrap_or(true);
                assert!(!stop);
            }
            assert_eq!(got, vec!["{\"seq\":1}xy", "abc"], "cut at {cut}");
            assert_eq!((r.infos, r.pings, r.pongs), (1, 1, 1), "cut at {cut}");
            assert!(r.partial.is_empty());
        }
    }

    #[test]
    fn stops_when_asked_and_reports_errors() {
        let mut r = NatsReader::default();
        let mut n = 0;
        let stopped = r
            .feed(b"MSG a 1 1\r\nx\r\nMSG a 1 1\r\ny\r\n", |_| {
                n += 1;
                true
            })
            .unwrap_or(false);
        assert!(stopped && n == 1);
        let mut r = NatsReader::default();
        assert!(r.feed(b"-ERR 'Slow Consumer'\r\n", |_| false).is_err());
        assert!(r.feed(b"MSG a 1 x\r\n", |_| false).is_err());
    }

    #[test]
    fn publishes_with_the_payload_size() {
        let m = publish("fanout", "{\"t\":1}");
        assert_eq!(bytes_of(&m), Some(&b"PUB fanout 7\r\n{\"t\":1}\r\n"[..]));
    }
}
