//! The demo chat page, served on the gateway's own listener.
//!
//! It owns `GET /`, `/demo/app.js` and `/demo/app.css` on the client port:
//! fixed files compiled in with `include_str!` (the script is the bundle of
//! `clients/js/demo/app.ts` and the SDK, built by `npm run bundle-demo`),
//! so that `https://localhost:8443/` opens a chat built on the TypeScript
//! SDK. It reads only the request line of a connection, and hands every
//! other request, with the bytes it read, to the WebSocket upgrade
//! untouched. It must not hold any user data or serve anything else.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::net::Peeked;

const PAGE: &str = include_str!("demo/index.html");
const SCRIPT: &str = include_str!("demo/app.js");
const STYLE: &str = include_str!("demo/app.css");

/// The page's files: request path, content type, body.
const FILES: [(&str, &str, &str); 3] = [
    ("/", "text/html; charset=utf-8", PAGE),
    ("/demo/app.js", "text/javascript; charset=utf-8", SCRIPT),
    ("/demo/app.css", "text/css; charset=utf-8", STYLE),
];

/// Only this origin's script, style and socket; no inline code, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What a connection turned out to be.
pub enum Route<S> {
    /// Not a page request: the upgrade goes on, reading first what was read here.
    Upgrade(Peeked<S>),
    /// A page was served and the connection is done.
    Served,
}

/// How much of a request line decides it.
enum Class {
    /// One of the page's files.
    Page(usize),
    /// Anything else (a WebSocket upgrade, another path, another method).
    Other,
    /// The request line is still too short to tell.
    Undecided,
}

fn classify(head: &[u8]) -> Class {
    let mut undecided = false;
    for (i, (path, _, _)) in FILES.iter().enumerate() {
        let want = [b"GET ".as_slice(), path.as_bytes()].concat();
        if head.len() > want.len() && head.starts_with(&want) {
            if matches!(head[want.len()], b' ' | b'?') {
                return Class::Page(i);
            }
        } else if want.starts_with(head) || head == want.as_slice() {
            undecided = true;
        }
    }
    if undecided {
        Class::Undecided
    } else {
        Class::Other
    }
}

/// Reads the start of the request line; serves the page when it asks for
/// one of its files (and `enabled`), else returns the stream for the
/// upgrade. What it reads is at most a few bytes past the longest path
/// served, so it costs an upgrade one extra small read.
pub async fn route<S>(mut stream: S, enabled: bool) -> io::Result<Route<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    if !enabled {
        return Ok(Route::Upgrade(Peeked::new(stream, head)));
    }
    // A read returns at least one byte, and the longest path decides within
    // this many, so the loop ends.
    let mut buf = [0u8; 64];
    loop {
        match classify(&head) {
            Class::Other => return Ok(Route::Upgrade(Peeked::new(stream, head))),
            Class::Page(i) => {
                serve(&mut stream, i).await?;
                return Ok(Route::Served);
            }
            Class::Undecided => {}
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            // Closed mid-line: the upgrade reports it.
            return Ok(Route::Upgrade(Peeked::new(stream, head)));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

/// Writes file `i` and closes the connection. The rest of the request is
/// read and dropped until the client closes (under the handshake's
/// deadline), so the close does not reset the connection before the
/// browser has read the answer.
async fn serve<S>(stream: &mut S, i: usize) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (_, content_type, body) = FILES[i];
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nContent-Security-Policy: {CSP}\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 1024];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_request_line_decides() {
        let page = |h: &[u8]| match classify(h) {
            Class::Page(i) => Some(FILES[i].0),
            _ => None,
        };
        assert_eq!(page(b"GET / HTTP/1.1\r\n"), Some("/"));
        assert_eq!(page(b"GET /?x=1 HTTP/1.1"), Some("/"));
        assert_eq!(page(b"GET /demo/app.js HTTP/1.1"), Some("/demo/app.js"));
        assert_eq!(page(b"GET /demo/app.css HTTP/1.1"), Some("/demo/app.css"));
        for other in [
            b"GET /ws?user=a HTTP/1.1".as_slice(),
            b"GET /ws HTTP/1.1",
            b"GET /demo/app.jsx HTTP/1.1",
            b"POST / HTTP/1.1",
            b"\x16\x03\x01",
        ] {
            assert!(matches!(classify(other), Class::Other), "{other:?}");
        }
        for short in [b"".as_slice(), b"G", b"GET", b"GET /", b"GET /demo/app"] {
            assert!(matches!(classify(short), Class::Undecided), "{short:?}");
        }
    }

    #[tokio::test]
    async fn an_upgrade_reads_what_was_peeked_then_the_rest() {
        const REQUEST: &[u8] = b"GET /ws?user=alice HTTP/1.1\r\nHost: x\r\n\r\n";
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(REQUEST).await.unwrap();
        drop(client);
        let Route::Upgrade(mut peeked) = route(server, true).await.unwrap() else {
            panic!("an upgrade is not a page");
        };
        assert!(peeked.peeked_len() > 0, "the request line was read");
        let mut got = Vec::new();
        peeked.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, REQUEST);
    }

    #[tokio::test]
    async fn a_page_request_is_answered_and_closed() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let reading = async move {
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let (served, answer) = tokio::join!(route(server, true), reading);
        assert!(matches!(served.unwrap(), Route::Served));
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(answer.ends_with(PAGE));
    }

    #[tokio::test]
    async fn disabled_reads_nothing() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let Route::Upgrade(mut peeked) = route(server, false).await.unwrap() else {
            panic!("disabled: no page");
        };
        assert_eq!(peeked.peeked_len(), 0);
        let mut got = vec![0u8; 5];
        peeked.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET /");
    }
}
