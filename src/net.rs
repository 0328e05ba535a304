//! Sockets shared by the data path, the admin API and the Raft peer port (below
//! all three, so none reaches into another for them).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Kernel accept backlog; new connections are accepted at once, even past max_connections.
const BACKLOG: i32 = 4096;

/// Binds a listening socket: SO_REUSEADDR, and IP_FREEBIND so a bind on a virtual IP
/// works before the IP is assigned.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    } else {
        socket.set_freebind_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}
