//! splice(2) between TCP sockets through a pipe: the kernel moves references to
//! the received pages from one socket to the other, and the bytes are never
//! copied into the process and back.
//!
//! Pipes come from a bounded pool, and a connection holds one only while bytes
//! flow in bulk (HAProxy's splice-auto); a pipe per connection would cost two
//! descriptors per direction and hold pages while the connection idles.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A pipe's capacity. The default 64 KiB (16 page slots) moves too little per
/// call: on loopback splice through it was no faster than copying, and four
/// times the slots made it about 1.4 times as fast.
pub const PIPE_SIZE: usize = 256 * 1024;

/// At most this many pipes exist: two descriptors each, 128 in all, inside the
/// 256 that the default `max_connections` leaves for everything but proxied
/// connections (config::validate::RESERVED_FILES), so pipes never take a
/// connection's descriptors; and at most 16 MiB of pages in flight. A direction
/// that finds none copies through user space instead.
pub const MAX_PIPES: usize = 64;

/// Empty pipes kept per thread for the next bulk transfer; the rest are closed.
const CACHED_PER_THREAD: usize = 16;

/// Pipes in existence, in use or cached, across all threads.
static PIPES: AtomicUsize = AtomicUsize::new(0);

/// Cleared when the kernel refuses splice on a socket (a seccomp filter, a
/// kernel without it): every relay copies from then on.
static ENABLED: AtomicBool = AtomicBool::new(true);

thread_local! {
    static CACHE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A non-blocking pipe of `PIPE_SIZE` and how many bytes it holds.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// At most `PIPE_SIZE`.
    held: u32,
}

impl Pipe {
    /// An empty pipe from this thread's cache or a new one; None when splice is
    /// off, the pool's bound is reached, or the system refuses a pipe of
    /// `PIPE_SIZE` (descriptors exhausted, or the user's pipe pages are).
    pub fn take() -> Option<Pipe> {
        if !ENABLED.load(Ordering::Relaxed) {
            return None;
        }
        if let Some(pipe) = CACHE.with_borrow_mut(Vec::pop) {
            return Some(pipe);
        }
        if PIPES.fetch_add(1, Ordering::Relaxed) >= MAX_PIPES {
            PIPES.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match Pipe::open() {
            Ok(pipe) => Some(pipe),
            Err(_) => {
                PIPES.fetch_sub(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Returns the pipe to the pool; one still holding bytes (its connection
    /// ended with data in flight) is closed, and its bytes with it.
    pub fn give_back(self) {
        if self.held == 0 {
            CACHE.with_borrow_mut(|cache| {
                if cache.len() < CACHED_PER_THREAD {
                    cache.push(self);
                }
            });
        }
    }

    /// A new pipe; the caller has counted it in `PIPES` (its drop uncounts it).
    fn open() -> io::Result<Pipe> {
        let mut fds = [-1; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are open and nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // PIPE_SIZE is a small constant: the cast is exact.
        let wanted = PIPE_SIZE as libc::c_int;
        // SAFETY: F_SETPIPE_SZ takes an int and changes only the pipe's capacity;
        // the descriptor is open for the call.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, wanted) };
        if size < wanted {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read,
            write,
            held: 0,
        })
    }

    /// Bytes in the pipe, not yet spliced out.
    pub fn held(&self) -> usize {
        self.held as usize
    }

    /// Moves what the socket has received, as much as the pipe takes, into the
    /// (empty) pipe. Ok(0) at EOF; WouldBlock when the socket has nothing.
    pub fn fill(&mut self, from: BorrowedFd<'_>) -> io::Result<usize> {
        let n = splice(from, self.write.as_fd(), PIPE_SIZE - self.held())?;
        // n is at most what was asked, PIPE_SIZE - held: held stays <= PIPE_SIZE.
        self.held += n as u32;
        Ok(n)
    }

    /// Moves bytes from the pipe to the socket, as many as its send buffer takes.
    /// WouldBlock when it takes none.
    pub fn drain(&mut self, to: BorrowedFd<'_>) -> io::Result<usize> {
        let n = splice(self.read.as_fd(), to, self.held())?;
        // n <= held.
        self.held -= n as u32;
        Ok(n)
    }
}

/// Closing a pipe, wherever it is dropped (a connection that ends, a full cache,
/// a thread that exits), makes room for another in the pool.
impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a failed `fill` means this kernel or sandbox does not splice sockets
/// at all (rather than a failing connection). Then splice is turned off for the
/// process; no byte has moved, so the relay goes on copying.
pub fn refused(e: &io::Error) -> bool {
    let refused = matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS | libc::EINVAL | libc::EPERM)
    );
    if refused && ENABLED.swap(false, Ordering::Relaxed) {
        tracing::warn!(
            error = %e,
            "the kernel refuses splice(2) on sockets; relaying through user space from now on"
        );
    }
    refused
}

/// One splice(2), non-blocking on both ends (tokio's sockets are O_NONBLOCK too).
/// Into a socket whose peer is gone it fails with EPIPE and, unlike send with
/// MSG_NOSIGNAL, raises SIGPIPE: Rust's runtime ignores that signal before main.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so open for the call; null offsets
    // are what splice takes for a socket or a pipe; no memory of ours is touched.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Splice on or off, and the pool's count, are the process's: the tests that
/// depend on them take turns.
#[cfg(test)]
pub static TEST_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Turns splice on or off for the process: tests of the copy path (holding
/// `TEST_LOCK`).
#[cfg(test)]
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new pipe has PIPE_SIZE; one that still holds bytes is closed rather
    /// than cached.
    #[test]
    fn a_pipe_has_its_size_and_one_holding_bytes_is_not_reused() {
        // Not Pipe::take: a test of the copy path may have turned splice off.
        PIPES.fetch_add(1, Ordering::Relaxed);
        let mut pipe = Pipe::open().expect("a pipe");
        // SAFETY: the descriptor is open; F_GETPIPE_SZ only reads the capacity.
        let size = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert_eq!(usize::try_from(size).ok(), Some(PIPE_SIZE));
        let mut file = std::fs::File::from(pipe.write.try_clone().expect("dup"));
        std::io::Write::write_all(&mut file, b"held").expect("write");
        pipe.held = 4;
        let cached = CACHE.with_borrow(Vec::len);
        pipe.give_back();
        assert_eq!(
            CACHE.with_borrow(Vec::len),
            cached,
            "a pipe with bytes was cached"
        );
    }

    /// No more than MAX_PIPES pipes exist; closing one makes room for another.
    #[test]
    fn the_pool_is_bounded_and_a_closed_pipe_makes_room() {
        let _turn = TEST_LOCK.blocking_lock();
        let mut taken = Vec::new();
        while let Some(pipe) = Pipe::take() {
            taken.push(pipe);
            assert!(taken.len() <= MAX_PIPES, "more than {MAX_PIPES} pipes");
        }
        assert!(!taken.is_empty(), "no pipe at all");
        drop(taken.pop());
        assert!(Pipe::take().is_some(), "a closed pipe made no room");
    }
}
