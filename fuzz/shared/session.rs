//! One fuzz input played as a client session against a live server, and
//! the check that the server still serves afterwards.
//!
//! Shared, via `#[path]`, by the `session` fuzz target
//! (`fuzz/fuzz_targets/session.rs`) and the corpus replay test
//! (`tests/it/fuzz_corpus.rs`), so the replay splits inputs into frames and
//! judges the server exactly as the fuzzer did.
//!
//! # Input format
//!
//! An input is a list of records separated by `\n` (a trailing `\n` ends the
//! last record; at most [`MAX_FRAMES`] records are played). The first byte
//! of a record picks what is sent:
//!
//! | first byte | sent as |
//! |---|---|
//! | `0x01` | a binary message of the rest |
//! | `0x02` | a text message of the rest, in two fragments (non-final text, then continuation) |
//! | `0x03` | a ping of the rest (cut to 125 bytes) |
//! | `0x04` | a close frame whose raw payload is the rest (cut to 125 bytes) |
//! | `0x05` | a raw frame: the next byte is its header (bit 7 FIN, bits 6..4 RSV1..3, bits 3..0 the opcode), the rest its payload |
//! | anything else | a text message of the whole record, byte for byte (invalid UTF-8 included) |
//!
//! So a hand-written seed is one JSON frame per line.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::ServerFrame;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Most records of one input that are played.
pub const MAX_FRAMES: usize = 64;
/// The id of the `ping` sent after an input's frames. Requests are handled in
/// order, so its `pong` means every frame before it was handled.
pub const SENTINEL_ID: u64 = u64::MAX;
/// How long the server may take to answer the sentinel or close the session;
/// longer is a hang, and fails.
pub const REPLY_BOUND: Duration = Duration::from_secs(10);
/// How long each step of the liveness check may take.
pub const STEP_BOUND: Duration = Duration::from_secs(5);

/// The server configuration the fuzzer and the replay use: a plain listener,
/// no admin listener, no fsync, and small limits so that short inputs reach
/// every limit path (1009 at 1 KiB, `forbidden` at the fifth room).
pub fn configure(config: &mut switchboard::Config) {
    config.plain_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.admin_listen = None;
    config.durability = switchboard::store::Durability::None;
    config.max_message_bytes = 1024;
    config.max_rooms_per_session = 4;
    // One client makes thousands of connections a second: per-IP and
    // per-user admission limits are not what these inputs exercise.
    config.handshake_rate_per_ip = switchboard::config::Rate::OFF;
    config.max_connections_per_ip = 1 << 20;
    config.max_connections_per_user = 1 << 20;
}

/// One WebSocket frame to send.
#[derive(Debug, Clone)]
pub struct FuzzFrame(Frame);

impl FuzzFrame {
    fn new(fin: bool, opcode: OpCode, payload: &[u8]) -> FuzzFrame {
        let header = FrameHeader {
            is_final: fin,
            opcode,
            ..FrameHeader::default()
        };
        FuzzFrame(Frame::from_payload(header, Bytes::copy_from_slice(payload)))
    }

    /// Whether this frame closes (or tries to close) the connection.
    pub fn is_close(&self) -> bool {
        self.0.header().opcode == OpCode::Control(Control::Close)
    }
}

/// Splits an input into the frames to send (see the module docs).
pub fn split_frames(input: &[u8]) -> Vec<FuzzFrame> {
    let input = input.strip_suffix(b"\n").unwrap_or(input);
    if input.is_empty() {
        return Vec::new();
    }
    let mut frames = Vec::new();
    for record in input.split(|&b| b == b'\n').take(MAX_FRAMES) {
        let text = OpCode::Data(Data::Text);
        match record.split_first() {
            Some((0x01, rest)) => {
                frames.push(FuzzFrame::new(true, OpCode::Data(Data::Binary), rest))
            }
            Some((0x02, rest)) => {
                let (a, b) = rest.split_at(rest.len() / 2);
                frames.push(FuzzFrame::new(false, text, a));
                frames.push(FuzzFrame::new(true, OpCode::Data(Data::Continue), b));
            }
            Some((0x03, rest)) => frames.push(FuzzFrame::new(
                true,
                OpCode::Control(Control::Ping),
                &rest[..rest.len().min(125)],
            )),
            Some((0x04, rest)) => frames.push(FuzzFrame::new(
                true,
                OpCode::Control(Control::Close),
                &rest[..rest.len().min(125)],
            )),
            Some((0x05, rest)) => {
                let (bits, payload) = match rest.split_first() {
                    Some((bits, payload)) => (*bits, payload),
                    None => (0x81, &[][..]),
                };
                let header = FrameHeader {
                    is_final: bits & 0x80 != 0,
                    rsv1: bits & 0x40 != 0,
                    rsv2: bits & 0x20 != 0,
                    rsv3: bits & 0x10 != 0,
                    opcode: OpCode::from(bits & 0x0f),
                    mask: None,
                };
                frames.push(FuzzFrame(Frame::from_payload(
                    header,
                    Bytes::copy_from_slice(payload),
                )));
            }
            _ => frames.push(FuzzFrame::new(true, text, record)),
        }
    }
    frames
}

type Ws = WebSocketStream<TcpStream>;

/// Connects to the plain listener as `user` and reads the `welcome`.
async fn connect(addr: SocketAddr, user: &str) -> Result<Ws, String> {
    let handshake = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        // Small frames one after another: do not let Nagle hold them back.
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let url = format!("ws://{addr}/ws?user={user}");
        let (ws, _) = tokio_tungstenite::client_async(url, tcp)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(ws)
    };
    let mut ws = timeout(STEP_BOUND, handshake)
        .await
        .map_err(|_| format!("no upgrade within {STEP_BOUND:?}"))?
        .map_err(|e| format!("cannot connect: {e}"))?;
    match next_frame(&mut ws).await? {
        ServerFrame::Welcome { user: u, .. } if u == user => Ok(ws),
        other => Err(format!("expected welcome for {user}, got {other:?}")),
    }
}

/// The next server frame (skipping WebSocket pings and pongs); every text
/// frame must be one of the protocol's server frames.
async fn next_frame(ws: &mut Ws) -> Result<ServerFrame, String> {
    loop {
        let msg = timeout(STEP_BOUND, ws.next())
            .await
            .map_err(|_| format!("no frame within {STEP_BOUND:?}"))?
            .ok_or("the server closed the connection")?
            .map_err(|e| format!("socket error: {e}"))?;
        match msg {
            Message::Text(t) => return parse(t.as_str()),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return Err(format!("unexpected frame {other:?}")),
        }
    }
}

/// A server text frame as the protocol's client decoder reads it.
fn parse(text: &str) -> Result<ServerFrame, String> {
    ServerFrame::from_json(text)
        .map_err(|e| format!("server sent a frame clients cannot read: {e}: {text}"))
}

/// What one session did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Frames written before the session ended (or all of them).
    pub frames_sent: usize,
    /// Server frames read, the `pong` to the sentinel included.
    pub replies: usize,
    /// Whether the sentinel `ping` was answered (else the session was closed).
    pub answered: bool,
    /// The server's close code, if it closed the session.
    pub close_code: Option<u16>,
}

/// Plays `input` as one session of user `fuzz`: connects, sends its frames,
/// then a `ping` with [`SENTINEL_ID`], and reads until its `pong` or the end
/// of the connection. Fails if the server hangs, sends something that is not
/// a protocol frame, closes with a code the spec does not list (when the
/// client did not send a close itself), or drops the connection without a
/// close frame the client did not ask for.
pub async fn drive(addr: SocketAddr, input: &[u8]) -> Result<Outcome, String> {
    let frames = split_frames(input);
    let mut ws = connect(addr, "fuzz").await?;
    let mut out = Outcome::default();
    let mut sent_close = false;
    for frame in frames {
        sent_close |= frame.is_close();
        if ws.feed(Message::Frame(frame.0)).await.is_err() {
            break;
        }
        out.frames_sent += 1;
    }
    let sentinel = format!(r#"{{"type":"ping","id":{SENTINEL_ID}}}"#);
    // Either may fail once the session is closing; reading tells how it ended.
    let _ = ws.feed(Message::text(sentinel)).await;
    let _ = ws.flush().await;

    let deadline = Instant::now() + REPLY_BOUND;
    loop {
        let msg = timeout_at(deadline, ws.next()).await.map_err(|_| {
            format!("after {REPLY_BOUND:?} the sentinel ping has no pong and the session is still open ({out:?})")
        })?;
        match msg {
            Some(Ok(Message::Text(t))) => {
                out.replies += 1;
                if let ServerFrame::Pong {
                    id: Some(SENTINEL_ID),
                } = parse(t.as_str())?
                {
                    out.answered = true;
                    return Ok(out);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                out.close_code = code;
                if !sent_close {
                    match code {
                        Some(c) if protocol::close::lookup(c).is_some() => {}
                        other => {
                            return Err(format!(
                                "closed with an undocumented code {other:?}: {frame:?}"
                            ));
                        }
                    }
                }
                // The session is over. Send the close reply tungstenite has
                // queued and hang up: the server, lingering for the reply or
                // draining raw bytes after a codec error, sees the end now
                // rather than at `close_linger_ms`.
                let _ = ws.flush().await;
                return Ok(out);
            }
            Some(Ok(Message::Binary(b))) => {
                return Err(format!("server sent a binary frame: {b:?}"));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                if out.close_code.is_none() && !sent_close {
                    return Err(format!(
                        "the server dropped the connection without a close frame ({out:?})"
                    ));
                }
                return Ok(out);
            }
        }
    }
}

/// Checks the server still serves a fresh client: `welcome`, `ping`→`pong`,
/// and a `send` that is acknowledged (so the store writer is alive too).
pub async fn check_alive(addr: SocketAddr) -> Result<(), String> {
    let mut ws = connect(addr, "alive").await?;
    let requests = [
        (r#"{"type":"ping","id":1}"#, "pong"),
        (r#"{"type":"join","id":2,"room":"fuzz-alive"}"#, "joined"),
        (
            r#"{"type":"send","id":3,"room":"fuzz-alive","body":{"alive":true}}"#,
            "ack",
        ),
    ];
    for (id, (request, want)) in (1u64..).zip(requests) {
        ws.send(Message::text(request))
            .await
            .map_err(|e| format!("cannot send {request}: {e}"))?;
        loop {
            let frame = next_frame(&mut ws).await?;
            let ok = match &frame {
                ServerFrame::Pong { id: Some(i) } => *i == id && want == "pong",
                ServerFrame::Joined { id: Some(i), .. } => *i == id && want == "joined",
                ServerFrame::Ack { id: Some(i), .. } => *i == id && want == "ack",
                ServerFrame::Error { .. } => {
                    return Err(format!("{request} failed: {frame:?}"));
                }
                // Presence, typing and messages of the room may come first.
                _ => false,
            };
            if ok {
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}
