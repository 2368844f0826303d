//! The reference broadcast server for the benchmarks: every text frame any
//! client sends goes to every connected client (the sender included). No
//! application logic, no storage: the ceiling of Switchboard's library
//! stack (tokio, tokio-tungstenite, rustls) on this machine.
//!
//! `tokio-broadcast [--listen ADDR] [--tls-listen ADDR --cert PEM --key PEM]`
//! prints each listening address on stdout. The WebSocket read buffer is
//! 4 KiB per connection, as issue 5 specifies for this reference
//! (tungstenite's default is 128 KiB; Switchboard's is now 1 KiB).

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames a slow client may fall behind by before it misses some.
const CHANNEL: usize = 8192;
/// Frames written per flush.
const BATCH: usize = 64;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut listen: Option<SocketAddr> = None;
    let mut tls_listen: Option<SocketAddr> = None;
    let (mut cert, mut key) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--listen" => listen = Some(v.parse()?),
            "--tls-listen" => tls_listen = Some(v.parse()?),
            "--cert" => cert = Some(v),
            "--key" => key = Some(v),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if listen.is_none() && tls_listen.is_none() {
        listen = Some("127.0.0.1:9001".parse()?);
    }
    let (tx, _) = broadcast::channel::<Utf8Bytes>(CHANNEL);
    let mut tasks = Vec::new();
    if let Some(addr) = listen {
        let l = TcpListener::bind(addr).await?;
        println!("ws://{}/ws", l.local_addr()?);
        tasks.push(tokio::spawn(accept(l, None, tx.clone())));
    }
    if let Some(addr) = tls_listen {
        let (cert, key) = (
            cert.ok_or("--tls-listen needs --cert")?,
            key.ok_or("--tls-listen needs --key")?,
        );
        let tls = tls_acceptor(&cert, &key)?;
        let l = TcpListener::bind(addr).await?;
        println!("wss://{}/ws", l.local_addr()?);
        tasks.push(tokio::spawn(accept(l, Some(tls), tx.clone())));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

fn tls_acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn accept(
    l: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tx: broadcast::Sender<Utf8Bytes>,
) {
    loop {
        let Ok((tcp, _)) = l.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (tx, tls) = (tx.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                Some(tls) => {
                    if let Ok(s) = tls.accept(tcp).await {
                        serve(s, tx).await;
                    }
                }
                None => serve(tcp, tx).await,
            }
        });
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(stream: S, tx: broadcast::Sender<Utf8Bytes>) {
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let mut rx = tx.subscribe();
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let _ = tx.send(t);
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            got = rx.recv() => {
                let first = match got {
                    Ok(t) => t,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if sink.feed(Message::Text(first)).await.is_err() {
                    break;
                }
                // Coalesce what is already queued into one flush.
                let mut n = 1;
                while n < BATCH {
                    match rx.try_recv() {
                        Ok(t) => {
                            if sink.feed(Message::Text(t)).await.is_err() {
                                return;
                            }
                            n += 1;
                        }
                        Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                        Err(_) => break,
                    }
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
        }
    }
}
