//! Sockets shared by the data path, the admin API and the Raft peer port (below
//! all three, so none reaches into another for them).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};

/// Kernel accept backlog; new connections are accepted at once, even past max_connections.
pub const BACKLOG: i32 = 4096;

/// Binds a listening socket: SO_REUSEADDR, and IP_FREEBIND so a bind on a virtual IP
/// works before the IP is assigned.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    bind(addr, false)
}

/// The same for a proxy listener, with [`tune`]'s options set on the listening
/// socket: Linux copies TCP_NODELAY, SO_KEEPALIVE and the TCP_KEEP* values to every
/// socket it accepts, so a connection costs no setsockopt on the client side.
pub fn listen_proxied(addr: SocketAddr) -> io::Result<TcpListener> {
    bind(addr, true)
}

fn bind(addr: SocketAddr, proxied: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    } else {
        socket.set_freebind_v4(true)?;
    }
    if proxied {
        tune(&socket)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Connects to a backend in four system calls: a non-blocking socket, TCP_NODELAY,
/// TCP_DEFER_ACCEPT (see [`crate::sys::tcp::hold_handshake_ack`]), connect; then
/// waits for the socket to become writable and asks for the outcome (SO_ERROR)
/// only when the kernel reported an error or a hang-up, which a refused or failed
/// connect always carries.
///
/// The handshake's last ACK waits for the first bytes sent (as with HAProxy's
/// `option tcp-smart-connect`): the backend gets the connection and the
/// client's first bytes in one packet and one wake-up. The caller that has nothing
/// to send at once calls [`send_ack`], or the backend would see the connection
/// only when the kernel's delayed-ACK timer fires (200 ms).
///
/// No keepalive towards backends, as HAProxy (`option srvtcpka`) and nginx
/// (`proxy_socket_keepalive`) by default: a backend host that vanishes fails its
/// health checks, and `on_down: close` ends its connections; keepalive would cost
/// four more system calls per connection.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    crate::sys::tcp::hold_handshake_ack(socket.as_fd())?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::ConnectionRefused, "connect failed")
        }));
    }
    Ok(stream)
}

/// Sends the handshake's last ACK that [`connect`] held back for the first bytes,
/// now: there are none yet (a client that has not spoken, a backend that may speak
/// first). If it fails the kernel's timer sends the ACK a little later: not an error.
pub fn send_ack(stream: &TcpStream) {
    if let Err(e) = SockRef::from(stream).set_tcp_quickack(true) {
        tracing::debug!(error = %e, "TCP_QUICKACK on a backend connection failed");
    }
}

/// Linux's errno for a non-blocking connect under way.
const EINPROGRESS: i32 = 115;

/// TCP_NODELAY and keepalive (60 s idle, then every 10 s, 6 probes) on a proxy
/// listener's socket, which every client connection inherits.
fn tune(socket: &Socket) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    socket.set_tcp_keepalive(&keepalive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    /// What the data path relies on to skip five setsockopt per accepted connection.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive_from_the_listener() {
        let listener = listen_proxied("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("local addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let sock = SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().expect("TCP_NODELAY"), "TCP_NODELAY");
        assert!(sock.keepalive().expect("SO_KEEPALIVE"), "SO_KEEPALIVE");
        assert_eq!(
            sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            Duration::from_secs(60)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("TCP_KEEPCNT"), 6);
        // The plain listener leaves the kernel defaults (no keepalive).
        let plain = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let _c = tokio::net::TcpStream::connect(plain.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = plain.accept().await.expect("accept");
        assert!(!SockRef::from(&accepted).keepalive().expect("SO_KEEPALIVE"));
        drop(client);
    }

    #[tokio::test]
    async fn a_backend_connection_has_nodelay_and_a_refused_one_fails() {
        let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("local addr");
        let mut stream = connect(addr).await.expect("connect");
        let sock = SockRef::from(&stream);
        assert!(sock.tcp_nodelay().expect("TCP_NODELAY"), "TCP_NODELAY");
        assert!(!sock.keepalive().expect("SO_KEEPALIVE"), "no SO_KEEPALIVE");
        let (mut accepted, _) = listener.accept().await.expect("accept");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");

        // A port nothing listens on: the connect itself fails, not a later read.
        drop(listener);
        let refused = connect(addr).await.expect_err("nothing listens");
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
    }

    /// connect holds the handshake's last ACK back, so the backend has no
    /// connection to accept yet; send_ack sends it at once. (The kernel's timer
    /// would send it after 200 ms: an attempt slowed past that by a loaded machine
    /// proves nothing either way, so up to three are made.)
    #[tokio::test]
    async fn the_handshake_ack_waits_for_the_first_bytes_or_send_ack() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let accept_within = |limit: Duration| {
            let start = std::time::Instant::now();
            loop {
                match listener.accept() {
                    Ok(_) => return Some(start.elapsed()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
                if start.elapsed() > limit {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let mut seen = Vec::new();
        for _ in 0..3 {
            let stream = connect(addr).await.expect("connect");
            let early = accept_within(Duration::ZERO);
            send_ack(&stream);
            let after_ack = accept_within(Duration::from_secs(5));
            match (early, after_ack) {
                (None, Some(t)) if t < Duration::from_millis(150) => return,
                seen_now => seen.push(seen_now),
            }
        }
        panic!(
            "(accepted before send_ack, accepted after it): {seen:?}: \
             the ACK was not held back, or send_ack did not send it"
        );
    }
}
