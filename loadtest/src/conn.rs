//! Opening connections (TCP, optional TLS, WebSocket upgrade) to one of
//! several URLs, from one or several loopback source addresses, and reading
//! the few fields of a server frame the generator needs without building a
//! tree.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::SinkExt;
use protocol::{ClientRequest, Request};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::cli::Common;
use crate::scan::{self, Members};

/// Read buffer per connection: the generator holds many sockets.
pub const READ_BUFFER: usize = 4 * 1024;
/// Longest wait for any single step (connect, join, a reply).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Any stream a client can speak WebSocket over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A client WebSocket over plain TCP or TLS.
pub type Ws = WebSocketStream<Box<dyn Io>>;

/// One server the connections go to.
struct Target {
    url: String,
    addr: SocketAddr,
    host: String,
    tls: bool,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Target> {
        let (scheme, rest) = url.split_once("://").context("URL needs a scheme")?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let (host, port) = hostport.rsplit_once(':').context("URL needs HOST:PORT")?;
        let port: u16 = port.parse().context("bad port")?;
        let ip: IpAddr = match host {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            h => h
                .trim_matches(['[', ']'])
                .parse()
                .with_context(|| format!("`{h}` is neither an IP nor localhost"))?,
        };
        let tls = match scheme {
            "ws" => false,
            "wss" => true,
            other => bail!("unknown scheme {other}"),
        };
        Ok(Target {
            url: url.to_owned(),
            addr: SocketAddr::new(ip, port),
            host: if host.parse::<IpAddr>().is_ok() {
                "localhost".into()
            } else {
                host.into()
            },
            tls,
        })
    }
}

/// Opens connections to the servers named by the URLs: connection `i` to
/// URL `i mod n` ([`Connector::target_of`]).
pub struct Connector {
    targets: Vec<Target>,
    tls: Option<tokio_rustls::TlsConnector>,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
    /// Talking to a plain broadcast server or nats-server: no welcome, no
    /// join; the publisher numbers its own frames.
    pub raw: bool,
    /// Talking to nats-server: the NATS protocol around those frames.
    pub nats: bool,
    /// Join the first room in the upgrade URL rather than with a frame.
    pub join_in_url: bool,
}

impl Connector {
    pub fn new(common: &Common) -> anyhow::Result<Connector> {
        let targets = common
            .url
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(|u| Target::parse(u).with_context(|| format!("URL `{u}`")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if targets.is_empty() {
            bail!("no URL");
        }
        let tls = if targets.iter().any(|t| t.tls) {
            Some(tls_connector(common.ca.as_deref(), common.insecure)?)
        } else {
            None
        };
        let sources = match &common.source_ips {
            Some(spec) => parse_ip_range(spec)?,
            None => Vec::new(),
        };
        Ok(Connector {
            targets,
            tls,
            next_source: AtomicUsize::new(common.worker.map_or(0, |w| w as usize)),
            sources,
            raw: common.foreign(),
            nats: common.nats,
            join_in_url: common.join_in_url,
        })
    }

    /// How many URLs the connections are spread over.
    pub fn targets(&self) -> usize {
        self.targets.len()
    }

    /// The URL connection `i` goes to first: `i mod n`.
    pub fn target_of(&self, i: usize) -> usize {
        i % self.targets.len().max(1)
    }

    /// The URL of target `t` (taken mod n).
    pub fn url(&self, t: usize) -> &str {
        self.targets
            .get(self.target_of(t))
            .map_or("", |x| x.url.as_str())
    }

    /// TCP connect (from the next source address), TLS, WebSocket upgrade,
    /// to target `t` (taken mod n).
    pub async fn connect(&self, t: usize, user: &str) -> anyhow::Result<Ws> {
        self.connect_joining(t, user, None).await
    }

    /// As [`Connector::connect`], asking the server to join `room` as the
    /// session starts (`?join=`).
    pub async fn connect_joining(
        &self,
        t: usize,
        user: &str,
        room: Option<&str>,
    ) -> anyhow::Result<Ws> {
        let target = self.targets.get(self.target_of(t)).context("no URL")?;
        let socket = match target.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if !self.sources.is_empty() {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            socket
                .bind(SocketAddr::new(self.sources[i], 0))
                .with_context(|| format!("binding to {}", self.sources[i]))?;
        }
        let tcp = socket.connect(target.addr).await?;
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Io> = match (&self.tls, target.tls) {
            (Some(tls), true) => {
                let name = ServerName::try_from(target.host.clone())?;
                Box::new(tls.connect(name, tcp).await?)
            }
            _ => Box::new(tcp),
        };
        let mut url = format!("{}?user={user}", target.url);
        if let Some(room) = room {
            url.push_str("&join=");
            url.extend(form_urlencoded::byte_serialize(room.as_bytes()));
        }
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(0);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        Ok(ws)
    }
}

/// `127.0.0.2-127.0.0.60`, `127.0.0.2,127.0.0.3` or one address.
pub fn parse_ip_range(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: Ipv4Addr = a.trim().parse().with_context(|| format!("`{a}`"))?;
                let b: Ipv4Addr = b.trim().parse().with_context(|| format!("`{b}`"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a > 65_535 {
                    bail!("bad address range {part}");
                }
                out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
            }
            None => out.push(part.parse().with_context(|| format!("`{part}`"))?),
        }
    }
    if out.is_empty() {
        bail!("no source address in `{spec}`");
    }
    Ok(out)
}

fn tls_connector(ca: Option<&Path>, insecure: bool) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    let mut provider = rustls::crypto::ring::default_provider();
    // Offered in browsers' order (Chrome, Firefox and Safari put AES-128-GCM
    // first): a server that follows the client's order, as rustls and Go
    // do by default, then runs the handshake's key schedule on SHA-256, as
    // it does for a browser, rather than on SHA-384.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth()
    } else {
        let ca = ca.unwrap_or(Path::new("certs/ca.pem"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            roots.add(cert?)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `--insecure`: any certificate is accepted (signatures are still checked).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Microseconds since the Unix epoch: the clock every process shares.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The tokio instant at a Unix time in µs (now, if it has passed).
pub fn instant_at(us: u64) -> tokio::time::Instant {
    let now = now_us();
    tokio::time::Instant::now() + Duration::from_micros(us.saturating_sub(now))
}

/// A request frame.
pub fn request(id: Option<u64>, body: ClientRequest) -> Message {
    Message::Text(Request { id, body }.to_json().into())
}

/// Sends a `join`, optionally resuming after `since`.
pub async fn send_join(
    ws: &mut Ws,
    id: u64,
    room: &str,
    since: Option<u64>,
    epoch: Option<&str>,
) -> anyhow::Result<()> {
    ws.send(request(
        Some(id),
        ClientRequest::Join {
            room: room.into(),
            since,
            epoch: epoch.map(str::to_owned),
        },
    ))
    .await?;
    Ok(())
}

/// The few fields of a server frame the generator uses, found by scanning
/// the text (the server's field order is fixed, but nothing relies on it).
/// Nothing is allocated.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: &'a str,
    pub room: Option<&'a str>,
    pub seq: Option<u64>,
    pub id: Option<u64>,
    /// `body.t`: the publisher's send time, µs since the epoch.
    pub stamp: Option<u64>,
    /// `body.end`: the publisher's end-of-run marker.
    pub end: bool,
    pub replay: bool,
    /// `recovered` of `joined`.
    pub recovered: Option<bool>,
    pub code: Option<&'a str>,
    pub more: bool,
    /// `epoch` of `joined`.
    pub epoch: Option<&'a str>,
}

impl<'a> Frame<'a> {
    /// One pass over the frame's top-level members (and `body`'s), taking
    /// only the fields its type carries. This runs for every delivery, so it
    /// allocates nothing and searches for no substring.
    pub fn parse(text: &'a str) -> Frame<'a> {
        if let Some(f) = Frame::message_in_server_order(text) {
            return f;
        }
        let mut all = Frame::default();
        for (key, v) in Members::of(text) {
            match key {
                "type" => all.kind = scan::as_str(v).unwrap_or(""),
                "room" => all.room = scan::as_str(v),
                "seq" => all.seq = scan::as_u64(v),
                "id" => all.id = scan::as_u64(v),
                "body" => {
                    for (k, b) in Members::of(v) {
                        match k {
                            "t" => all.stamp = scan::as_u64(b),
                            "end" => all.end = true,
                            _ => {}
                        }
                    }
                }
                "replay" => all.replay = scan::as_bool(v) == Some(true),
                "recovered" => all.recovered = scan::as_bool(v),
                "code" => all.code = scan::as_str(v),
                "more" => all.more = scan::as_bool(v) == Some(true),
                "epoch" => all.epoch = scan::as_str(v),
                _ => {}
            }
        }
        let mut f = Frame {
            kind: all.kind,
            ..Frame::default()
        };
        match all.kind {
            "message" => {
                f.room = all.room;
                f.seq = all.seq;
                f.stamp = all.stamp;
                f.end = all.end;
                f.replay = all.replay;
            }
            "joined" => {
                f.room = all.room;
                f.seq = all.seq;
                f.id = all.id;
                f.recovered = all.recovered;
                f.epoch = all.epoch;
            }
            "ack" => {
                f.room = all.room;
                f.seq = all.seq;
                f.id = all.id;
            }
            "error" => {
                f.id = all.id;
                f.code = all.code;
            }
            "history" => {
                f.id = all.id;
                f.room = all.room;
                f.more = all.more;
            }
            "typing" | "presence" => f.room = all.room,
            _ => f.id = all.id,
        }
        f
    }

    /// A `message` in the order the server writes its members (`type`,
    /// `room`, `seq`, `from`, `ts`, `body`, `replay`; raw mode leaves out
    /// `from` and `ts`) with a body of the generator's own (`{"t":…}` or
    /// `{"end":…}`), read by matching that shape piece by piece. Anything
    /// else (another order, escapes, another body) is `None`, and the
    /// general scan reads it.
    fn message_in_server_order(text: &'a str) -> Option<Frame<'a>> {
        let rest = text.strip_prefix(r#"{"type":"message","room":""#)?;
        let (room, rest) = plain_string(rest)?;
        let (seq, rest) = digits(rest.strip_prefix(r#","seq":"#)?)?;
        let rest = match rest.strip_prefix(r#","from":""#) {
            Some(r) => plain_string(r)?.1,
            None => rest,
        };
        let rest = match rest.strip_prefix(r#","ts":"#) {
            Some(r) => digits(r)?.1,
            None => rest,
        };
        let rest = rest.strip_prefix(r#","body":{""#)?;
        let (stamp, end, rest) = if let Some(r) = rest.strip_prefix(r#"t":"#) {
            let (t, r) = digits(r)?;
            (Some(t), false, r)
        } else {
            (None, true, digits(rest.strip_prefix(r#"end":"#)?)?.1)
        };
        let replay = match rest {
            "}}" | r#"},"replay":false}"# => false,
            r#"},"replay":true}"# => true,
            _ => return None,
        };
        Some(Frame {
            kind: "message",
            room: Some(room),
            seq: Some(seq),
            stamp,
            end,
            replay,
            ..Frame::default()
        })
    }
}

/// A string's content up to its closing quote, when it holds no escape,
/// and what follows the quote.
fn plain_string(s: &str) -> Option<(&str, &str)> {
    let q = s.find('"')?;
    let (content, rest) = (s.get(..q)?, s.get(q + 1..)?);
    (!content.contains('\\')).then_some((content, rest))
}

/// A non-negative integer at the start of `s`, and what follows it. Eight
/// digits at a time where it can: every delivery carries two numbers (its
/// seq and a 16-digit stamp).
fn digits(s: &str) -> Option<(u64, &str)> {
    // 19 digits always fit in a u64; a 20th is left to the general scan.
    const MAX: usize = 19;
    let b = s.as_bytes();
    let mut n: u64 = 0;
    let mut i = 0;
    while i + 8 <= MAX
        && let Some(chunk) = b.get(i..i + 8)
        && let Some(v) = eight_digits(chunk)
    {
        n = n * 100_000_000 + v;
        i += 8;
    }
    while i < MAX {
        match b.get(i) {
            Some(c) if c.is_ascii_digit() => n = n * 10 + u64::from(c - b'0'),
            _ => break,
        }
        i += 1;
    }
    if i == 0 || b.get(i).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    Some((n, s.get(i..)?))
}

/// The value of eight ASCII digits, or `None` if any byte is not one
/// (SWAR: the eight bytes as one little-endian word).
fn eight_digits(chunk: &[u8]) -> Option<u64> {
    let word = u64::from_le_bytes(chunk.try_into().ok()?);
    let d = word.wrapping_sub(0x3030_3030_3030_3030);
    // A byte below '0' borrows into its high bit; one above '9' carries
    // into it when 0x76 is added.
    if (d | d.wrapping_add(0x7676_7676_7676_7676)) & 0x8080_8080_8080_8080 != 0 {
        return None;
    }
    // The first byte is the most significant digit: combine pairs, then
    // fours, then the two halves.
    let v = (d.wrapping_mul(10) + (d >> 8)) & 0x00FF_00FF_00FF_00FF;
    let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    Some((v.wrapping_mul(10_000) + (v >> 32)) & 0xFFFF_FFFF)
}

/// The `seq`s of a `history` reply's messages, in order.
pub fn history_seqs(text: &str, out: &mut Vec<u64>) {
    out.clear();
    let Some(i) = text.find("\"messages\":[") else {
        return;
    };
    let mut rest = &text[i..];
    while let Some(j) = rest.find("{\"seq\":") {
        rest = &rest[j + 7..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if let Ok(seq) = rest[..digits].parse() {
            out.push(seq);
        }
    }
}

/// Per-room seq continuity: gaps are lost, repeats are duplicates.
#[derive(Debug, Default, Clone, Copy)]
pub struct Continuity {
    pub last: u64,
    pub lost: u64,
    pub duplicated: u64,
}

impl Continuity {
    pub fn starting_at(last: u64) -> Continuity {
        Continuity {
            last,
            ..Continuity::default()
        }
    }

    pub fn see(&mut self, seq: u64) {
        if seq <= self.last {
            self.duplicated += 1;
        } else {
            self.lost += seq - self.last - 1;
            self.last = seq;
        }
    }

    /// The `joined` of a resume with `since` (the last seq seen before the
    /// connection was lost) answering the room's `seq`. Recovered, the
    /// replay of `(since, seq]` follows and is counted as it comes: a seq it
    /// skips is lost, one it repeats duplicated. Not recovered, nothing
    /// fills `(since, seq]`: that is lost, and counting goes on after
    /// `seq` (another epoch numbers afresh, so `seq` may be below `since`).
    pub fn resumed(&mut self, since: u64, seq: u64, recovered: bool) {
        if recovered {
            self.last = since;
        } else {
            self.lost += seq.saturating_sub(since);
            self.last = seq;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuity_counts_gaps_and_duplicates() {
        let mut c = Continuity::starting_at(10);
        for seq in [11, 12, 15, 15, 14, 16] {
            c.see(seq);
        }
        assert_eq!((c.last, c.lost, c.duplicated), (16, 2, 2));
    }

    #[test]
    fn a_resume_counts_what_its_replay_does_not_fill() {
        // Live up to 5, the connection dies, the resume replays 6..=8.
        let mut c = Continuity::starting_at(0);
        for seq in 1..=5 {
            c.see(seq);
        }
        c.resumed(5, 8, true);
        for seq in [6, 7, 8, 9, 10] {
            c.see(seq);
        }
        assert_eq!((c.last, c.lost, c.duplicated), (10, 0, 0));
        // A replay that skips 12 and repeats 11, then live again.
        c.resumed(10, 13, true);
        for seq in [11, 11, 13, 14] {
            c.see(seq);
        }
        assert_eq!((c.last, c.lost, c.duplicated), (14, 1, 1));
        // A live message already seen before the loss arrives again.
        c.resumed(14, 14, true);
        for seq in [14, 15] {
            c.see(seq);
        }
        assert_eq!((c.last, c.lost, c.duplicated), (15, 1, 2));
        // Not recovered: (15, 20] is lost, counting goes on after 20.
        c.resumed(15, 20, false);
        for seq in [21, 22] {
            c.see(seq);
        }
        assert_eq!((c.last, c.lost, c.duplicated), (22, 6, 2));
        // Not recovered in another epoch that is behind: nothing to call
        // lost, and its seqs are not duplicates of the old ones.
        c.resumed(22, 3, false);
        for seq in [4, 5] {
            c.see(seq);
        }
        assert_eq!((c.last, c.lost, c.duplicated), (5, 6, 2));
    }

    #[test]
    fn parses_message_frames_without_a_tree() {
        let t = r#"{"type":"message","room":"r1","seq":42,"from":"u7","ts":1764000000123,"body":{"t":1764000000123456,"n":3},"replay":true}"#;
        let f = Frame::parse(t);
        assert_eq!(f.kind, "message");
        assert_eq!(f.room, Some("r1"));
        assert_eq!(f.seq, Some(42));
        assert_eq!(f.stamp, Some(1_764_000_000_123_456));
        assert!(f.replay && !f.end);
        let end = Frame::parse(r#"{"type":"message","room":"r","seq":9,"body":{"end":1}}"#);
        assert!(end.end && end.stamp.is_none() && !end.replay);
    }

    #[test]
    fn the_fast_path_and_the_general_scan_agree() {
        for t in [
            r#"{"type":"message","room":"r1","seq":42,"from":"u7","ts":1764000000123,"body":{"t":1764000000123456},"replay":true}"#,
            r#"{"type":"message","room":"fanout","seq":7,"body":{"t":99}}"#,
            r#"{"type":"message","room":"r","seq":9,"from":"p","ts":1,"body":{"end":1}}"#,
            r#"{"type":"message","room":"r","seq":9,"from":"p","ts":1,"body":{"t":5},"replay":false}"#,
        ] {
            let fast = Frame::message_in_server_order(t);
            assert!(fast.is_some(), "{t}");
            assert_eq!(fast, Some(Frame::parse(&format!(" {t}"))), "{t}");
        }
        // The frames the server encodes take the fast path.
        let body = serde_json::value::RawValue::from_string(r#"{"t":1764000000123456}"#.into());
        let body = body.unwrap_or_else(|e| panic!("{e}"));
        let mut m =
            protocol::MessageRef::new("fanout", 42, "publisher-fanout", 1_764_000_000_123, &body);
        for replay in [false, true] {
            m.replay = replay;
            let text = m.to_json();
            let f = Frame::message_in_server_order(&text);
            assert_eq!(
                f.map(|f| (f.seq, f.stamp, f.replay)),
                Some((Some(42), Some(1_764_000_000_123_456), replay)),
                "{text}"
            );
        }
        // Other shapes fall through to the general scan, which reads them.
        for t in [
            r#"{"type":"message","room":"a\"b","seq":1,"body":{"t":2}}"#,
            r#"{"type":"message","seq":1,"room":"a","body":{"t":2}}"#,
            r#"{"type":"message","room":"a","seq":1,"from":"x\"","body":{"t":2}}"#,
            r#"{"type":"message","room":"a","seq":1,"body":{"text":"hi","t":2}}"#,
            r#"{"type":"message","room":"a","seq":1,"body":{"t":2},"replay":true,"x":1}"#,
        ] {
            assert_eq!(Frame::message_in_server_order(t), None, "{t}");
            let f = Frame::parse(t);
            assert_eq!(
                (f.kind, f.seq, f.stamp),
                ("message", Some(1), Some(2)),
                "{t}"
            );
        }
    }

    #[test]
    fn reads_numbers_as_the_standard_parser_does() {
        let mut cases: Vec<String> = vec![
            "0".into(),
            "7".into(),
            "12345678".into(),
            "123456789".into(),
            "1764000000123456".into(),
            "9999999999999999999".into(),
            "10000000000000000000".into(),
            "18446744073709551615".into(),
            "".into(),
            "x1".into(),
            "12/45678".into(),
            "1234567:".into(),
            "12345678,\"x\"".into(),
            "00000000012".into(),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 20) as u32;
            cases.push(format!("{}}}", x % 10u64.pow(len.max(1))));
        }
        for c in &cases {
            let n = c.bytes().take_while(u8::is_ascii_digit).count();
            let expected = if n == 0 || n > 19 {
                None
            } else {
                c[..n].parse::<u64>().ok().map(|v| (v, &c[n..]))
            };
            assert_eq!(digits(c), expected, "{c}");
        }
    }

    #[test]
    fn parses_replies() {
        let j = Frame::parse(
            r#"{"type":"joined","id":2,"room":"g","seq":41,"epoch":"5f","presence":["a"],"recovered":false}"#,
        );
        assert_eq!((j.id, j.seq, j.recovered), (Some(2), Some(41), Some(false)));
        let e = Frame::parse(r#"{"type":"error","id":9,"code":"not_joined","message":"x"}"#);
        assert_eq!((e.id, e.code), (Some(9), Some("not_joined")));
        let h = r#"{"type":"history","id":6,"room":"g","messages":[{"seq":38,"from":"b","ts":1,"body":{"t":1}},{"seq":39,"from":"c","ts":2,"erased":true}],"more":true}"#;
        let f = Frame::parse(h);
        assert_eq!((f.id, f.more), (Some(6), true));
        let mut seqs = Vec::new();
        history_seqs(h, &mut seqs);
        assert_eq!(seqs, vec![38, 39]);
    }

    #[test]
    fn parses_ranges() {
        let v = parse_ip_range("127.0.0.2-127.0.0.4,127.0.0.9").unwrap_or_default();
        assert_eq!(v.len(), 4);
        assert!(parse_ip_range("127.0.0.9-127.0.0.2").is_err());
    }
}
