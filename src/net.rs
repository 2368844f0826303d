//! The TCP socket under a connection's stream, for its socket options.
//!
//! This module owns one option, `TCP_CORK`, used to send a connection's
//! first replies (the HTTP 101 and `welcome`) in one segment. It must not do
//! any I/O of its own: a failed option only costs a segment, so it is logged
//! and ignored.

use socket2::SockRef;
use tokio::net::TcpStream;
use tracing::debug;

/// A stream with a TCP socket under it (plain or TLS).
pub trait Tcp {
    fn tcp(&self) -> &TcpStream;
}

impl Tcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Tcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Holds partial segments back while `on` (`TCP_CORK`); turning it off
/// sends what was held at once. The kernel sends held data after 200 ms
/// regardless, so a cork left on costs latency, never data.
pub fn cork(stream: &impl Tcp, on: bool) {
    if let Err(e) = SockRef::from(stream.tcp()).set_tcp_cork(on) {
        debug!(error = %e, on, "TCP_CORK not set");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cork_turns_on_and_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let corked = || SockRef::from(&client).tcp_cork().unwrap();
        assert!(!corked());
        cork(&client, true);
        assert!(corked());
        cork(&client, false);
        assert!(!corked());
    }
}
