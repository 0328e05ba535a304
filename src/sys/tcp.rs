//! TCP socket options socket2 does not wrap.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// TCP_DEFER_ACCEPT on a socket about to connect: the last ACK of its handshake
/// then waits for the first bytes it sends (Linux's "save one ACK" on SYN-ACK,
/// at most its delayed-ACK timer, 200 ms), and nothing else changes. Unlike
/// TCP_QUICKACK off, which does the same, it leaves the connection's later ACKs
/// prompt: quick-ACK off would delay the ACK of the backend's reply and FIN,
/// and a backend that then resends its FIN is answered with a reset.
pub fn hold_handshake_ack(socket: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is borrowed, so open; `on` is a c_int that outlives
    // the call, and its size is what is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The kernel's TCP_INFO for a socket: what tests read to see how many segments
/// a peer sent (`tcpi_segs_in`) and what waits unsent (`tcpi_notsent_bytes`).
#[cfg(test)]
pub fn info(socket: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers, for which all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is borrowed, so open; `info` and `len` outlive the
    // call, and `len` is `info`'s size, which the kernel does not write past.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    match rc {
        0 => Ok(info),
        _ => Err(io::Error::last_os_error()),
    }
}
