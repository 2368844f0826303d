//! The stream the gateway layers over a connection's TCP or TLS stream.
//!
//! [`Peeked`] owns two things about the first bytes of a connection: it
//! yields first what was read before the upgrade (the request line the demo
//! page's router looked at), and it holds the HTTP 101 back until the
//! session releases it, so that the 101 and `welcome` leave in one write
//! (one TLS record, one segment) rather than one each. It must not do any
//! other I/O of its own, and holds nothing once the handshake is over.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How the start of an accepted upgrade's response begins.
const SWITCHING: &[u8] = b"HTTP/1.1 101";

/// A stream that first yields the bytes already read from it, and holds an
/// accepted upgrade's 101 until [`Peeked::release`].
///
/// Only a 101 is held: a refusal (401, 429, …) is written through at once,
/// since the upgrade ends with it. Writes that come while the 101 is held
/// join it; a flush does not send them until the release.
pub struct Peeked<S> {
    inner: S,
    /// What the handshake needs, boxed and dropped once done: every idle
    /// connection keeps this struct for its whole life, so it costs one
    /// pointer then.
    start: Option<Box<Start>>,
}

struct Start {
    /// Bytes read before the upgrade; `at` of them yielded.
    prefix: Vec<u8>,
    at: usize,
    hold: Hold,
}

enum Hold {
    /// No write yet: the first one says whether to hold.
    Watching,
    /// Held, and after the release still being written.
    Held {
        bytes: Vec<u8>,
        written: usize,
        released: bool,
    },
    /// Writes go straight through.
    Off,
}

impl<S> Peeked<S> {
    pub(crate) fn new(inner: S, prefix: Vec<u8>) -> Peeked<S> {
        Peeked {
            inner,
            start: Some(Box::new(Start {
                prefix,
                at: 0,
                hold: Hold::Watching,
            })),
        }
    }

    /// Lets the held 101 (and what joined it) go with the next write or
    /// flush.
    pub fn release(&mut self) {
        if let Some(s) = &mut self.start {
            match &mut s.hold {
                Hold::Held { released, .. } => *released = true,
                Hold::Watching => s.hold = Hold::Off,
                Hold::Off => {}
            }
        }
        self.tidy();
    }

    /// Drops the handshake's state once the prefix is yielded and nothing
    /// is held.
    fn tidy(&mut self) {
        if self
            .start
            .as_ref()
            .is_some_and(|s| s.at >= s.prefix.len() && matches!(s.hold, Hold::Off))
        {
            self.start = None;
        }
    }

    /// Whether writes go straight through.
    fn passing(&self) -> bool {
        self.start
            .as_ref()
            .is_none_or(|s| matches!(s.hold, Hold::Off))
    }

    /// How many bytes read before the upgrade are still to be yielded.
    #[cfg(test)]
    pub(crate) fn peeked_len(&self) -> usize {
        self.start.as_ref().map_or(0, |s| s.prefix.len() - s.at)
    }
}

impl<S: AsyncWrite + Unpin> Peeked<S> {
    /// Writes what is held, once released; then writes go straight
    /// through.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(s) = &mut self.start else {
            return Poll::Ready(Ok(()));
        };
        let Hold::Held {
            bytes,
            written,
            released,
        } = &mut s.hold
        else {
            return Poll::Ready(Ok(()));
        };
        if !*released {
            return Poll::Ready(Ok(()));
        }
        while *written < bytes.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        s.hold = Hold::Off;
        self.tidy();
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Peeked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(s) = &mut this.start
            && s.at < s.prefix.len()
        {
            let n = buf.remaining().min(s.prefix.len() - s.at);
            buf.put_slice(&s.prefix[s.at..s.at + n]);
            s.at += n;
            if s.at == s.prefix.len() {
                // Freed: a long-lived connection keeps nothing of it.
                s.prefix = Vec::new();
                s.at = 0;
                this.tidy();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Peeked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let Some(s) = &mut this.start else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        match &mut s.hold {
            Hold::Off => return Pin::new(&mut this.inner).poll_write(cx, buf),
            Hold::Watching if !buf.starts_with(SWITCHING) => {
                s.hold = Hold::Off;
                this.tidy();
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
            Hold::Watching => {
                s.hold = Hold::Held {
                    bytes: buf.to_vec(),
                    written: 0,
                    released: false,
                };
                return Poll::Ready(Ok(buf.len()));
            }
            Hold::Held { bytes, .. } => bytes.extend_from_slice(buf),
        }
        // Taken whole: once released, as much as the socket takes goes now
        // and the rest with the flush that follows.
        match this.poll_drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(buf.len())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.passing() {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A shutdown ends the hold: what is held is owed to the peer.
        self.release();
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What has arrived at `client` by now: a duplex read is ready at once
    /// when bytes wait, so no check here waits on a clock.
    fn arrived(client: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut got = vec![0u8; 1024];
        match client.read(&mut got).now_or_never() {
            Some(n) => {
                got.truncate(n.unwrap());
                got
            }
            None => Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_101_waits_for_the_release_and_leaves_with_what_joined_it() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut s = Peeked::new(server, Vec::new());
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .await
            .unwrap();
        s.flush().await.unwrap();
        s.write_all(b"welcome").await.unwrap();
        s.flush().await.unwrap();
        assert!(arrived(&mut client).is_empty(), "held until released");
        s.release();
        s.flush().await.unwrap();
        assert_eq!(
            arrived(&mut client),
            b"HTTP/1.1 101 Switching Protocols\r\n\r\nwelcome"
        );
        assert!(s.start.is_none(), "nothing is kept after");
        s.write_all(b"next").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(arrived(&mut client), b"next");
    }

    #[tokio::test]
    async fn a_refusal_is_written_at_once() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut s = Peeked::new(server, Vec::new());
        s.write_all(b"HTTP/1.1 401 Unauthorized\r\n\r\n")
            .await
            .unwrap();
        s.flush().await.unwrap();
        assert_eq!(arrived(&mut client), b"HTTP/1.1 401 Unauthorized\r\n\r\n");
    }

    #[tokio::test]
    async fn a_shutdown_sends_what_is_held() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut s = Peeked::new(server, Vec::new());
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\nbye")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 101 Switching Protocols\r\n\r\nbye");
    }
}
