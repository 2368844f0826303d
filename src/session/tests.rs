//! Session unit tests (virtual time).

fn returned_size<F, A, B, R>(_: &F) -> usize
where
    F: FnOnce(A, B) -> R,
{
    std::mem::size_of::<R>()
}
#[test]
fn probe() {
    type Plain = crate::demo::Peeked<tokio::net::TcpStream>;
    type Tls = crate::demo::Peeked<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;
    eprintln!("PLAIN {}", returned_size(&super::Session::<Plain>::run));
    eprintln!("TLS {}", returned_size(&super::Session::<Tls>::run));
    eprintln!(
        "SESSION PLAIN {}",
        std::mem::size_of::<super::Session<Plain>>()
    );
}
