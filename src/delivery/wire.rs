//! Pre-framed WebSocket frames and the queue that writes them.
//!
//! A server-to-client frame is never masked, so its bytes are the same for
//! every recipient: the hub frames each message and event once, and every
//! session writes those shared bytes itself, bypassing tungstenite's
//! per-frame framing. A session queues whole deliveries, walks their frames
//! in place and copies them end to end into its worker thread's scratch
//! buffer for one write call (see `SCRATCH`); nothing is allocated or
//! reference-counted per frame per recipient.
//!
//! Invariant: bytes of a frame are either all written or the session closes;
//! when a write is cut off mid-frame, [`Unsent::keep_partial`] keeps exactly
//! the rest of that frame, which must reach the socket before any other
//! frame (the close frame included), or the peer would read garbage.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;

use std::time::Instant;

/// The new messages of one room from one commit, each encoded once, shared
/// by every recipient: one push per member per commit, however many
/// messages the commit holds for the room.
#[derive(Debug)]
pub struct Delivery {
    pub room: Arc<str>,
    /// In strictly increasing seq order.
    pub messages: Vec<Encoded>,
    /// The messages' framed length in all.
    pub bytes: usize,
    /// When the hub encoded them, right after their commit: the start of the
    /// fan-out latency each subscriber's session observes when writing them.
    pub created: Instant,
}

/// One durable message as it goes on the wire.
#[derive(Debug)]
pub struct Encoded {
    pub seq: u64,
    pub frame: WireFrame,
}

impl Delivery {
    /// A delivery of `messages`, encoded now.
    pub fn new(room: Arc<str>, messages: Vec<Encoded>) -> Delivery {
        Delivery::encoded_at(room, messages, Instant::now())
    }

    /// A delivery of `messages`, encoded at `created`.
    pub fn encoded_at(room: Arc<str>, messages: Vec<Encoded>, created: Instant) -> Delivery {
        let bytes = messages.iter().map(|m| m.frame.len()).sum();
        Delivery {
            room,
            messages,
            bytes,
            created,
        }
    }
}

/// The FIN bit and the text opcode: a whole, unfragmented text frame.
const FIN_TEXT: u8 = 0x81;
/// Payload lengths up to this fit in the first length byte.
const LEN_7_MAX: usize = 125;
/// Length marker: a 16-bit length follows.
const LEN_16: u8 = 126;
/// Length marker: a 64-bit length follows.
const LEN_64: u8 = 127;
/// The longest header: 2 bytes plus a 64-bit length.
const MAX_HEADER: usize = 10;
/// Bytes handed to one write: enough for a full batch of typical frames,
/// small enough to stay in cache.
const BYTES_PER_WRITE: usize = 64 * 1024;

thread_local! {
    /// Where a write's frames are laid end to end, one per worker thread:
    /// the kernel copies one contiguous buffer much faster than many small
    /// vectored segments (BENCHMARKS-HISTORY.md), and no session holds a buffer.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };

    /// Where [`WireFrame::json`] serialises, one per thread, so a frame's
    /// buffer is allocated once at its final size instead of grown by
    /// doubling as the serialiser writes.
    static ENCODE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One complete unmasked text frame (header and payload), shared by every
/// recipient; or the server's ping, which rides with room traffic.
#[derive(Debug, Clone)]
pub struct WireFrame {
    bytes: Bytes,
    /// Where the payload starts.
    header: u8,
}

impl WireFrame {
    /// Frames `text` as one unfragmented, unmasked text frame (RFC 6455 §5.2).
    pub fn text(text: &str) -> WireFrame {
        let mut buf = Vec::with_capacity(MAX_HEADER + text.len());
        buf.resize(MAX_HEADER, 0);
        buf.extend_from_slice(text.as_bytes());
        WireFrame::framed(buf)
    }

    /// Serialises `value` as JSON straight behind room for the header and
    /// frames it: one buffer, no second copy of the text. Serialising the
    /// protocol's frames cannot fail (every `Body` is valid JSON already);
    /// were it to, the frame would carry `{}`, as their `to_json` does.
    pub fn json(value: &impl serde::Serialize) -> WireFrame {
        let buf = ENCODE.with_borrow_mut(|scratch| {
            scratch.clear();
            scratch.resize(MAX_HEADER, 0);
            if serde_json::to_writer(&mut *scratch, value).is_err() {
                scratch.truncate(MAX_HEADER);
                scratch.extend_from_slice(b"{}");
            }
            // Exactly its length: `Bytes` then keeps it without another
            // allocation.
            let buf = scratch.as_slice().to_vec();
            if scratch.capacity() > BYTES_PER_WRITE {
                *scratch = Vec::new();
            }
            buf
        });
        WireFrame::framed(buf)
    }

    /// Writes the header into the end of the `MAX_HEADER` bytes reserved at
    /// the start of `buf`, whose payload follows them, and keeps the frame.
    fn framed(mut buf: Vec<u8>) -> WireFrame {
        let len = buf.len() - MAX_HEADER;
        let mut head = [0u8; MAX_HEADER];
        head[0] = FIN_TEXT;
        let n = if len <= LEN_7_MAX {
            // Fits: checked just above.
            head[1] = len as u8;
            2
        } else if let Ok(len) = u16::try_from(len) {
            head[1] = LEN_16;
            head[2..4].copy_from_slice(&len.to_be_bytes());
            4
        } else {
            head[1] = LEN_64;
            head[2..].copy_from_slice(&(len as u64).to_be_bytes());
            MAX_HEADER
        };
        let start = MAX_HEADER - n;
        buf[start..MAX_HEADER].copy_from_slice(&head[..n]);
        WireFrame {
            bytes: Bytes::from(buf).slice(start..),
            // At most MAX_HEADER bytes.
            header: n as u8,
        }
    }

    /// A WebSocket ping with no payload (RFC 6455 §5.5.2).
    pub fn ping() -> WireFrame {
        /// FIN and the ping opcode, then a payload length of 0.
        const PING: [u8; 2] = [0x89, 0x00];
        WireFrame {
            bytes: Bytes::from_static(&PING),
            header: 2,
        }
    }

    /// The frame's length on the wire.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The payload: the text the frame carries.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[usize::from(self.header)..]
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// One queued item: the frames of a delivery from one index on, or an event.
#[derive(Debug)]
enum Queued {
    Messages {
        delivery: Arc<Delivery>,
        next: usize,
    },
    Event(Arc<WireFrame>),
}

impl Queued {
    /// The next frame to write, if any is left.
    fn front(&self) -> Option<&WireFrame> {
        match self {
            Queued::Messages { delivery, next } => delivery.messages.get(*next).map(|m| &m.frame),
            Queued::Event(f) => Some(f),
        }
    }

    /// Steps past the front frame; false when the item has no frame left.
    fn step(&mut self) -> bool {
        match self {
            Queued::Messages { delivery, next } => {
                *next += 1;
                *next < delivery.messages.len()
            }
            Queued::Event(_) => false,
        }
    }
}

/// Frames on their way into the socket, in order.
#[derive(Debug, Default)]
pub struct Unsent {
    items: VecDeque<Queued>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// Frames queued and not yet fully written.
    frames: usize,
    /// Bytes queued and not yet written.
    bytes: usize,
}

impl Unsent {
    /// Queues the messages of `delivery` from index `from` on.
    pub fn push_messages(&mut self, delivery: Arc<Delivery>, from: usize) {
        let rest = delivery.messages.get(from..).unwrap_or_default();
        if rest.is_empty() {
            return;
        }
        self.frames += rest.len();
        self.bytes += rest.iter().map(|m| m.frame.len()).sum::<usize>();
        self.items.push_back(Queued::Messages {
            delivery,
            next: from,
        });
    }

    /// Queues one event frame.
    pub fn push_event(&mut self, frame: Arc<WireFrame>) {
        self.frames += 1;
        self.bytes += frame.len();
        self.items.push_back(Queued::Event(frame));
    }

    /// Frames queued and not yet fully written.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Bytes queued and not yet written.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether a frame has been partly written: its rest must go first.
    pub fn mid_frame(&self) -> bool {
        self.offset > 0
    }

    /// After a write was cut off: forgets every frame except the rest of a
    /// partly written one. The session is closing; its client resumes the
    /// forgotten messages by seq.
    pub fn keep_partial(&mut self) {
        let partial = if self.offset > 0 {
            self.items.front().and_then(Queued::front).cloned()
        } else {
            None
        };
        let offset = self.offset;
        self.clear();
        if let Some(frame) = partial {
            self.offset = offset;
            self.frames = 1;
            self.bytes = frame.len().saturating_sub(offset);
            self.items.push_back(Queued::Event(Arc::new(frame)));
        }
    }

    /// Forgets everything queued.
    pub fn clear(&mut self) {
        self.items.clear();
        self.offset = 0;
        self.frames = 0;
        self.bytes = 0;
    }

    /// Writes everything queued into `w`, laid end to end in the thread's
    /// scratch buffer, up to [`BYTES_PER_WRITE`] a write. Progress lives in
    /// `self`, so it survives a `Pending` or a dropped future.
    pub fn poll_write<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        while !self.items.is_empty() {
            let polled = SCRATCH.with_borrow_mut(|buf| {
                buf.clear();
                self.gather(buf);
                w.as_mut().poll_write(cx, buf)
            });
            match polled {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => self.advance(written),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Copies unwritten frames into `buf`, from the front, until it holds
    /// [`BYTES_PER_WRITE`] bytes or every frame.
    fn gather(&self, buf: &mut Vec<u8>) {
        let mut skip = self.offset;
        for item in &self.items {
            let frames: &mut dyn Iterator<Item = &WireFrame> = match item {
                Queued::Messages { delivery, next } => &mut delivery
                    .messages
                    .get(*next..)
                    .unwrap_or_default()
                    .iter()
                    .map(|m| &m.frame),
                Queued::Event(f) => &mut std::iter::once(&**f),
            };
            for frame in frames {
                let bytes = frame.as_bytes().get(skip..).unwrap_or_default();
                skip = 0;
                let room = BYTES_PER_WRITE.saturating_sub(buf.len());
                buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
                if buf.len() >= BYTES_PER_WRITE {
                    return;
                }
            }
        }
    }

    /// Accounts `written` bytes from the front.
    fn advance(&mut self, mut written: usize) {
        self.bytes = self.bytes.saturating_sub(written);
        while written > 0 {
            let Some(item) = self.items.front_mut() else {
                return;
            };
            let Some(len) = item.front().map(WireFrame::len) else {
                self.items.pop_front();
                continue;
            };
            let rest = len - self.offset;
            if written < rest {
                self.offset += written;
                return;
            }
            written -= rest;
            self.offset = 0;
            self.frames -= 1;
            if !item.step() {
                self.items.pop_front();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
    use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

    /// Reads every text message out of `wire` as a client would.
    fn read_texts(wire: Vec<u8>) -> Vec<String> {
        let mut ws = WebSocket::from_raw_socket(std::io::Cursor::new(wire), Role::Client, None);
        let mut out = Vec::new();
        while let Ok(msg) = ws.read() {
            match msg {
                Message::Text(t) => out.push(t.to_string()),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    /// A writer that takes at most `step` bytes per write and is not ready
    /// every other time, as a busy socket is.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        ready: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.ready = !self.ready;
            if !self.ready {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn delivery(texts: &[String]) -> Arc<Delivery> {
        let messages = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Encoded {
                seq: i as u64 + 1,
                frame: WireFrame::text(t),
            })
            .collect();
        Arc::new(Delivery::new(Arc::from("r"), messages))
    }

    #[test]
    fn frames_of_every_length_class_read_back_as_tungstenite_reads_them() {
        let texts: Vec<String> = [0, 1, 125, 126, 127, 65535, 65536, 70000]
            .iter()
            .map(|&n| "é".repeat(n / 2) + &"x".repeat(n % 2))
            .collect();
        let mut wire = Vec::new();
        for t in &texts {
            let f = WireFrame::text(t);
            assert_eq!(f.payload(), t.as_bytes());
            // Serialised in place, a value frames as its JSON text does.
            let encoded = serde_json::to_string(t).unwrap();
            assert_eq!(
                WireFrame::json(t).as_bytes(),
                WireFrame::text(&encoded).as_bytes()
            );
            wire.extend_from_slice(f.as_bytes());
        }
        // The same bytes tungstenite itself writes for these messages.
        let sink = std::io::Cursor::new(Vec::new());
        let mut server = WebSocket::from_raw_socket(sink, Role::Server, None);
        for t in &texts {
            server
                .write(Message::Text(Utf8Bytes::from(t.clone())))
                .unwrap();
        }
        server.flush().unwrap();
        assert_eq!(&wire, server.get_ref().get_ref());
        assert_eq!(read_texts(wire), texts);
    }

    #[tokio::test]
    async fn unsent_frames_reach_a_trickling_writer_whole_and_in_order() {
        let texts: Vec<String> = (0..200).map(|i| format!("message {i:03}")).collect();
        let mut unsent = Unsent::default();
        unsent.push_messages(delivery(&texts[..100]), 10);
        unsent.push_event(Arc::new(WireFrame::text("event")));
        unsent.push_messages(delivery(&texts[100..]), 0);
        unsent.push_messages(delivery(&texts[..3]), 3); // nothing from 3 on
        assert_eq!(unsent.frames(), 90 + 1 + 100);
        let mut w = Trickle {
            out: Vec::new(),
            step: 37,
            ready: false,
        };
        std::future::poll_fn(|cx| unsent.poll_write(cx, Pin::new(&mut w)))
            .await
            .unwrap();
        assert_eq!((unsent.frames(), unsent.bytes()), (0, 0));
        let mut want: Vec<String> = texts[10..100].to_vec();
        want.push("event".into());
        want.extend_from_slice(&texts[100..]);
        assert_eq!(read_texts(w.out), want);

        // Frames larger than one write's share, and a write that ends
        // inside one of them.
        let big: Vec<String> = (0..4)
            .map(|i| i.to_string().repeat(BYTES_PER_WRITE / 2 + 99))
            .collect();
        unsent.push_messages(delivery(&big), 0);
        let mut w = Trickle {
            out: Vec::new(),
            step: BYTES_PER_WRITE / 3,
            ready: false,
        };
        std::future::poll_fn(|cx| unsent.poll_write(cx, Pin::new(&mut w)))
            .await
            .unwrap();
        assert_eq!(read_texts(w.out), big);
    }

    #[test]
    fn a_write_cut_off_mid_frame_keeps_exactly_the_rest_of_that_frame() {
        let texts: Vec<String> = (0..5).map(|i| format!("message {i}")).collect();
        let mut unsent = Unsent::default();
        unsent.push_messages(delivery(&texts), 0);
        let frame_len = WireFrame::text(&texts[0]).len();
        // One and a half frames written, then the write is abandoned.
        unsent.advance(frame_len + 4);
        assert!(unsent.mid_frame());
        unsent.keep_partial();
        assert_eq!(unsent.frames(), 1);
        assert_eq!(unsent.bytes(), frame_len - 4);
        let mut w = Trickle {
            out: WireFrame::text(&texts[1]).as_bytes()[..4].to_vec(),
            step: 100,
            ready: false,
        };
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        while unsent.poll_write(&mut cx, Pin::new(&mut w)).is_pending() {}
        assert_eq!(read_texts(w.out), vec![texts[1].clone()]);
        // Cut off between frames, nothing is kept.
        unsent.push_messages(delivery(&texts), 0);
        unsent.advance(frame_len);
        assert!(!unsent.mid_frame());
        unsent.keep_partial();
        assert_eq!((unsent.frames(), unsent.bytes()), (0, 0));
    }
}
