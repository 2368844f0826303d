//! Opening one connection: TCP, TLS (rustls, with the CA the application
//! gives) for `wss://`, and the WebSocket upgrade with the token as a bearer
//! header. HTTP refusals come back as their status, for the reconnect policy.
//!
//! It must not retry or sleep: one call is one attempt.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};

use crate::ConnectError;

/// The byte stream under a WebSocket: plain TCP or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub(crate) type Ws = WebSocketStream<Pin<Box<dyn Io>>>;

/// The rustls client configuration trusting the CA certificates in a PEM file
/// (the server's `certs/ca.pem` in development).
pub fn tls_with_ca_file(path: &Path) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| ConnectError::Ca {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    for cert in certs {
        let cert = cert.map_err(|e| ConnectError::Ca {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| ConnectError::Ca {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Ca {
            path: path.to_owned(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One connection attempt to `url`.
pub(crate) async fn connect(
    url: &str,
    resolve: Option<SocketAddr>,
    tls: Option<&Arc<rustls::ClientConfig>>,
    token: Option<&str>,
) -> Result<Ws, ConnectError> {
    let mut request = url.into_client_request().map_err(ConnectError::Url)?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ConnectError::BadToken)?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let uri = request.uri().clone();
    let host = uri.host().ok_or(ConnectError::NoHost)?.to_owned();
    let secure = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        other => return Err(ConnectError::Scheme(other.unwrap_or("").to_owned())),
    };
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    // An IPv6 literal comes bracketed in the URI.
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = match resolve {
        Some(addr) => TcpStream::connect(addr).await,
        None => TcpStream::connect((bare.as_str(), port)).await,
    }
    .map_err(ConnectError::Tcp)?;
    // Requests are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    let stream: Pin<Box<dyn Io>> = if secure {
        let config = tls.ok_or(ConnectError::NoTls)?;
        let name = ServerName::try_from(bare).map_err(|_| ConnectError::NoHost)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, tcp)
            .await
            .map_err(ConnectError::Tls)?;
        Box::pin(tls)
    } else {
        Box::pin(tcp)
    };
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err(ConnectError::Refused {
                status: response.status().as_u16(),
                body,
                retry_after,
            })
        }
        Err(e) => Err(ConnectError::Upgrade(e)),
    }
}
