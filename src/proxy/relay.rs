//! Copies bytes between client and backend, untouched, both ways at once.
//!
//! No buffer is held while a connection is idle: each direction waits for
//! readability, reads into its thread's scratch buffer and writes on at once; only
//! bytes the writer cannot take yet are copied to a buffer of their own. A FIN is
//! passed on as a half-close of the other side's write direction.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::AsFd;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use metrics::Counter;
use pin_project_lite::pin_project;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::sys::pipe::{self, Pipe};

/// Upper bound of data held per direction.
pub const BUFFER_SIZE: usize = 32 * 1024;

/// Why a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed their write direction.
    Closed,
    /// No byte moved either way for `idle_timeout`.
    Idle,
    /// The process is stopping and the grace period is over, or the backend was dropped.
    Stopped,
    Error(io::Error),
}

/// Byte counters for the two directions.
pub struct Meters<'a> {
    pub to_backend: Tally<'a>,
    pub to_client: Tally<'a>,
}

/// One direction's bytes: the metric and the backend's own total (status).
#[derive(Clone, Copy)]
pub struct Tally<'a> {
    pub metric: &'a Counter,
    pub total: &'a AtomicU64,
}

impl Tally<'_> {
    fn add(self, n: usize) {
        let n = n as u64;
        self.metric.increment(n);
        self.total.fetch_add(n, Ordering::Relaxed);
    }
}

/// Plain TCP both ways, until both sides have closed, the connection idles out,
/// or `stop` is cancelled (the backend's down token, also cancelled by the hard
/// stop at the end of the shutdown grace).
///
/// `ack_held`: the backend's handshake ACK still waits for the first bytes sent
/// to it ([`crate::net::connect`]). The client's first bytes carry it; if the
/// client has sent nothing when the relay first finds nothing to read, the ACK
/// goes on its own, so a backend that speaks first is not kept waiting.
pub fn relay<'a>(
    client: &'a mut TcpStream,
    backend: &'a mut TcpStream,
    idle_timeout: &'a Duration,
    stop: &'a CancellationToken,
    meters: Meters<'a>,
    ack_held: bool,
) -> Relay<'a> {
    let mut to_backend = Pump::new(meters.to_backend);
    to_backend.ack_held = ack_held;
    Relay {
        directions: Directions {
            client,
            backend,
            to_backend,
            to_client: Pump::new(meters.to_client),
        },
        activity: Activity::new(),
        ends: Ends::new(idle_timeout, stop),
    }
}

pin_project! {
    /// The plain relay, one hand-written future. An idle connection's task holds
    /// exactly this: the two sockets, two small direction states, when a byte last
    /// moved, the idle timer and the stop waiter. An async fn with a select would
    /// add its arguments, a second copy of each Copy one, and the branches' states.
    pub struct Relay<'a> {
        directions: Directions<'a>,
        activity: Activity,
        #[pin]
        ends: Ends<'a>,
    }
}

impl Future for Relay<'_> {
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = self.project();
        // Data first.
        match this.directions.poll(this.activity, cx) {
            Poll::Ready(Ok(())) => return Poll::Ready(RelayEnd::Closed),
            Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::Error(e)),
            Poll::Pending => {}
        }
        this.ends.poll_end(this.activity, cx)
    }
}

/// The two sockets, and the state of each direction between them.
struct Directions<'a> {
    client: &'a mut TcpStream,
    backend: &'a mut TcpStream,
    to_backend: Pump<'a>,
    to_client: Pump<'a>,
}

impl Directions<'_> {
    /// Ready once both directions have passed EOF on.
    fn poll(&mut self, activity: &Activity, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (client, backend) = (&mut *self.client, &mut *self.backend);
        let up = self.to_backend.poll_pump(
            client,
            backend,
            self.to_client.fin_passed(),
            activity,
            cx,
        )?;
        let down = self.to_client.poll_pump(
            backend,
            client,
            self.to_backend.fin_passed(),
            activity,
            cx,
        )?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

pin_project! {
    /// The ends of a relay other than both sides closing: no byte moved for
    /// `idle_timeout`, or `stop` was cancelled.
    struct Ends<'a> {
        idle_timeout: &'a Duration,
        #[pin]
        idle: Sleep,
        stop: &'a CancellationToken,
        #[pin]
        stopped: WaitForCancellationFuture<'a>,
        // `stopped` has been polled once: the task's waker is registered.
        waiting: bool,
    }
}

impl<'a> Ends<'a> {
    fn new(idle_timeout: &'a Duration, stop: &'a CancellationToken) -> Self {
        Ends {
            idle_timeout,
            idle: tokio::time::sleep(*idle_timeout),
            stop,
            stopped: stop.cancelled(),
            waiting: false,
        }
    }

    /// Ready once the connection has idled out or `stop` is cancelled.
    fn poll_end(self: Pin<&mut Self>, activity: &Activity, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let mut this = self.project();
        // The timer is not moved on every byte: when it fires, it is set again
        // to the last byte's time plus the timeout, unless that has passed.
        while this.idle.as_mut().poll(cx).is_ready() {
            let deadline = activity.last() + **this.idle_timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(RelayEnd::Idle);
            }
            this.idle.as_mut().reset(deadline);
        }
        // A relay's task is woken for every read, and a pending `cancelled()`
        // locks the token's list of waiters on every poll; that token is shared
        // by every connection to the backend. The waker registered on the first
        // poll stays the right one (the task's), so the waiter is polled again
        // only once the token is cancelled.
        if !*this.waiting || this.stop.is_cancelled() {
            *this.waiting = true;
            if this.stopped.poll(cx).is_ready() {
                return Poll::Ready(RelayEnd::Stopped);
            }
        }
        Poll::Pending
    }
}

thread_local! {
    /// Each runtime thread's read buffer: bytes are read into it and written on at
    /// once, so a read costs no allocation; only what the writer cannot take now is
    /// copied to the direction's own (exactly sized) buffer.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BUFFER_SIZE].into_boxed_slice());
}

/// One direction: read until EOF and write everything on, then half-close the
/// writer while the other direction is still open; when it is over too, the close
/// that follows sends the FIN, and a shutdown() would be one more system call.
/// Nothing is allocated unless the writer is full; then the direction keeps a
/// buffer until it has nothing to read. A read that fills the whole scratch
/// buffer means bulk data: the direction then splices through a pipe from the
/// pool, given back whenever it waits for data.
/// The two sockets are the relay's ([`Directions`]), lent to each call.
struct Pump<'a> {
    /// The direction's own buffer, only while data flows and the writer was full
    /// lately; `start..end` is not written yet.
    own: Option<Box<[u8; BUFFER_SIZE]>>,
    start: u32,
    end: u32,
    /// The pipe bulk data is spliced through, only while it flows.
    pipe: Option<Pipe>,
    /// Where the sender's FIN (EOF) is.
    fin: Fin,
    /// The writer's handshake ACK waits for the first bytes written to it.
    ack_held: bool,
    /// The last reads filled what they read into: splice the next ones.
    bulk: bool,
    bytes: Tally<'a>,
}

/// How far a direction is with the sender's FIN (EOF).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fin {
    Open,
    /// Read: passed on once everything read before it is written.
    Read,
    /// Passed on: as a half-close, or by the close that follows when the other
    /// direction is over too.
    Passed,
}

impl<'a> Pump<'a> {
    fn new(bytes: Tally<'a>) -> Self {
        Pump {
            own: None,
            start: 0,
            end: 0,
            pipe: None,
            fin: Fin::Open,
            ack_held: false,
            bulk: false,
            bytes,
        }
    }

    /// The sender's FIN has been passed on: this direction is over.
    fn fin_passed(&self) -> bool {
        self.fin == Fin::Passed
    }

    /// `other_done`: the other direction has passed its FIN on, so this one needs
    /// no half-close: the close that follows sends its FIN.
    fn poll_pump(
        &mut self,
        from: &mut TcpStream,
        to: &mut TcpStream,
        other_done: bool,
        last_activity: &Activity,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(own) = &self.own {
                while self.start < self.end {
                    let waiting = &own[self.start as usize..self.end as usize];
                    let n = ready!(Pin::new(&mut *to).poll_write(cx, waiting))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    // n <= end - start, a u32.
                    self.start += n as u32;
                }
            }
            (self.start, self.end) = (0, 0);
            if let Some(pipe) = &mut self.pipe {
                ready!(drain(pipe, to, cx))?;
            }
            match self.fin {
                Fin::Open => {}
                Fin::Read => {
                    // Everything read has been written: nothing more to hold.
                    self.release();
                    if !other_done {
                        ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                    }
                    self.fin = Fin::Passed;
                    return Poll::Ready(Ok(()));
                }
                Fin::Passed => {
                    self.release();
                    return Poll::Ready(Ok(()));
                }
            }
            // Wait for data.
            if from.poll_read_ready(cx)?.is_pending() {
                self.park(to);
                return Poll::Pending;
            }
            if self.bulk && self.pipe.is_none() {
                self.pipe = Pipe::take();
            }
            let read = if let Some(pipe) = &mut self.pipe {
                self.own = None;
                match fill(pipe, from, cx) {
                    // Nothing moved: copy instead.
                    Poll::Ready(Err(e)) if pipe::refused(&e) => {
                        self.bulk = false;
                        self.release();
                        continue;
                    }
                    // A small read: back to copying after this one.
                    Poll::Ready(Ok(n)) if n < BUFFER_SIZE => {
                        self.bulk = false;
                        Poll::Ready(Ok(n))
                    }
                    read => read,
                }
            } else if let Some(own) = &mut self.own {
                read_own(own, from, &mut self.start, &mut self.end, cx)
            } else {
                SCRATCH.with_borrow_mut(|buf| self.transfer(from, to, other_done, buf, cx))
            };
            let Poll::Ready(n) = read else {
                self.park(to);
                return Poll::Pending;
            };
            let n = n?;
            if n == 0 {
                self.fin = Fin::Read;
                continue;
            }
            // What was read is written (or waits to be): it carries any held ACK.
            self.ack_held = false;
            last_activity.touch();
            self.bytes.add(n);
        }
    }

    /// Nothing to read now (everything read was written): hold no buffer or pipe
    /// while waiting, and let the writer's held handshake ACK go on its own.
    fn park(&mut self, to: &TcpStream) {
        self.release();
        if std::mem::take(&mut self.ack_held) {
            crate::net::send_ack(to);
        }
    }

    /// Frees the buffer and returns the pipe: called when nothing waits to be written.
    fn release(&mut self) {
        self.own = None;
        if let Some(pipe) = self.pipe.take() {
            pipe.give_back();
        }
    }

    /// One read into `buf`, and as much of it written on as the writer takes now;
    /// the rest is kept in the direction's own buffer. Ready(0) at EOF.
    ///
    /// When the sender has closed right after its last bytes (a reply, then a
    /// close), the FIN is read before those bytes are written, and they go with
    /// MSG_MORE: the kernel holds them until the half-close that follows, so the
    /// bytes and the FIN leave in one segment (as HAProxy does), one packet and one
    /// wake-up of the peer fewer. `other_done`: no half-close follows.
    fn transfer(
        &mut self,
        from: &mut TcpStream,
        to: &mut TcpStream,
        other_done: bool,
        buf: &mut [u8],
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut read = ReadBuf::new(buf);
        // poll_read (unlike try_read) clears readiness after a short read, which
        // saves the read() that would only return EAGAIN.
        ready!(Pin::new(&mut *from).poll_read(cx, &mut read))?;
        let mut n = read.filled().len();
        // A full read: the next ones splice, if the pool has a pipe.
        self.bulk = n == buf.len();
        // After a short read the socket is readable again only if the sender has
        // closed (the hang-up stays in the readiness) or more came meanwhile.
        // A failed second read is reported once the first bytes are on their way.
        let mut failed = None;
        if n > 0 && !self.bulk && !other_done && from.poll_read_ready(cx)?.is_ready() {
            let mut more = ReadBuf::new(&mut buf[n..]);
            match Pin::new(&mut *from).poll_read(cx, &mut more) {
                Poll::Ready(Ok(())) => {
                    let m = more.filled().len();
                    if m == 0 {
                        self.fin = Fin::Read;
                    }
                    n += m;
                }
                Poll::Ready(Err(e)) => failed = Some(e),
                Poll::Pending => {}
            }
        }
        let mut sent = 0;
        while sent < n {
            let write = if self.fin == Fin::Read {
                send_more(to, &buf[sent..n], cx)
            } else {
                Pin::new(&mut *to).poll_write(cx, &buf[sent..n])
            };
            match write {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(k)) => sent += k,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // The writer is full: from now on, while data flows, read into
                    // a buffer of this direction's own, so what waits needs no copy.
                    let rest = n - sent;
                    let mut own = Box::new([0u8; BUFFER_SIZE]);
                    own[..rest].copy_from_slice(&buf[sent..n]);
                    // rest <= BUFFER_SIZE.
                    (self.own, self.start, self.end) = (Some(own), 0, rest as u32);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            // The caller counts only what a read that succeeded returns.
            self.bytes.add(n);
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }
}

/// One read into the direction's own buffer (data is flowing and the writer was
/// full lately); `poll_pump` writes it on. Ready(0) at EOF. Pending when readiness
/// was stale: `poll_pump` then parks, freeing the buffer.
fn read_own(
    own: &mut [u8; BUFFER_SIZE],
    from: &mut TcpStream,
    start: &mut u32,
    end: &mut u32,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut read = ReadBuf::new(own);
    ready!(Pin::new(from).poll_read(cx, &mut read))?;
    let n = read.filled().len();
    // n <= BUFFER_SIZE.
    (*start, *end) = (0, n as u32);
    Poll::Ready(Ok(n))
}

/// Writes with MSG_MORE: the bytes wait in the socket for the FIN that follows.
fn send_more(to: &TcpStream, buf: &[u8], cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    loop {
        ready!(to.poll_write_ready(cx))?;
        match to.try_io(Interest::WRITABLE, || {
            SockRef::from(to).send_with_flags(buf, libc::MSG_MORE)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            sent => return Poll::Ready(sent),
        }
    }
}

/// Splices what `from` has received into the pipe (which is empty). Ready(0) at EOF.
fn fill(pipe: &mut Pipe, from: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    loop {
        ready!(from.poll_read_ready(cx))?;
        match from.try_io(Interest::READABLE, || pipe.fill(from.as_fd())) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

/// Splices everything the pipe holds into `to`.
fn drain(pipe: &mut Pipe, to: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    while pipe.held() > 0 {
        ready!(to.poll_write_ready(cx))?;
        match to.try_io(Interest::WRITABLE, || pipe.drain(to.as_fd())) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

/// The same for streams that are not plain TCP (TLS on either side): each direction
/// owns a buffer, since TLS keeps its own record buffers anyway.
pub async fn relay_io<A, B>(
    client: A,
    backend: B,
    idle_timeout: &Duration,
    stop: &CancellationToken,
    meters: Meters<'_>,
) -> RelayEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last_activity = Activity::new();
    let (client_read, client_write) = tokio::io::split(client);
    let (backend_read, backend_write) = tokio::io::split(backend);
    let mut both = pin!(async {
        tokio::try_join!(
            pump_io(
                client_read,
                backend_write,
                &last_activity,
                meters.to_backend
            ),
            pump_io(backend_read, client_write, &last_activity, meters.to_client),
        )
    });
    let mut ends = pin!(Ends::new(idle_timeout, stop));
    poll_fn(|cx| {
        // Data first.
        if let Poll::Ready(result) = both.as_mut().poll(cx) {
            return Poll::Ready(match result {
                Ok(_) => RelayEnd::Closed,
                Err(e) => RelayEnd::Error(e),
            });
        }
        ends.as_mut().poll_end(&last_activity, cx)
    })
    .await
}

async fn pump_io<R, W>(
    mut from: R,
    mut to: W,
    last_activity: &Activity,
    bytes: Tally<'_>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE / 2];
    loop {
        let n = match from.read(&mut buf).await {
            // A TLS peer that closed its TCP side without close_notify: an end of
            // data like any FIN, passed on as a half-close (nginx and HAProxy do the
            // same); the application's own framing tells a cut-off message.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            read => read?,
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        last_activity.touch();
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        bytes.add(n);
    }
}

/// When a byte last moved, in milliseconds since the relay started. Both
/// directions run in one task, so the atomic is never contended; it only lets the
/// TLS relay's two directions share it by reference.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = crate::clock::millis(self.start.elapsed());
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    /// Splice off until dropped, even when the test fails.
    struct CopyOnly;

    impl CopyOnly {
        fn new() -> Self {
            pipe::set_enabled(false);
            CopyOnly
        }
    }

    impl Drop for CopyOnly {
        fn drop(&mut self) {
            pipe::set_enabled(true);
        }
    }

    /// Sends 8 MiB through a pump whose writer nobody reads until the pump keeps
    /// bytes back (`kept` > 0, called after every poll), and polls it for 200 ms
    /// more; then the sink reads everything, which must arrive in order, and the
    /// pump must end holding no buffer and no pipe. Returns the most the pump kept
    /// at any poll.
    async fn through_a_full_writer(kept: &mut dyn FnMut(&Pump<'_>) -> usize) -> usize {
        const TOTAL: usize = 8 * 1024 * 1024;
        let (mut source, mut a) = pair().await;
        let (mut b, mut sink) = pair().await;
        let metric = Counter::noop();
        let total = AtomicU64::new(0);
        let activity = Activity::new();
        let mut pump = Pump::new(Tally {
            metric: &metric,
            total: &total,
        });
        let sent: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            source.write_all(&sent).await?;
            source.shutdown().await
        });

        // Nobody reads `sink`: the pump fills the kernel's buffers, then keeps the rest.
        let mut most = 0;
        tokio::time::timeout(
            Duration::from_secs(30),
            poll_fn(|cx| {
                if pump
                    .poll_pump(&mut a, &mut b, false, &activity, cx)
                    .is_ready()
                {
                    panic!("the pump finished while its writer was full");
                }
                most = most.max(kept(&pump));
                match kept(&pump) {
                    0 => Poll::Pending,
                    _ => Poll::Ready(()),
                }
            }),
        )
        .await
        .expect("the writer never filled up");
        // Polled on for 200 ms with the sink still unread, what it keeps is sampled
        // at every poll (the kernel's buffers may grow meanwhile and take the rest).
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let done = poll_fn(|cx| {
                let done = pump.poll_pump(&mut a, &mut b, false, &activity, cx);
                most = most.max(kept(&pump));
                Poll::Ready(done.is_ready())
            })
            .await;
            if done {
                break;
            }
        }

        // Now the sink reads: everything arrives, and the pump ends holding nothing.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            sink.read_to_end(&mut got).await.map(|_| got)
        });
        tokio::time::timeout(
            Duration::from_secs(30),
            poll_fn(|cx| {
                let done = pump.poll_pump(&mut a, &mut b, false, &activity, cx);
                most = most.max(kept(&pump));
                done
            }),
        )
        .await
        .expect("the pump did not finish")
        .expect("pump");
        assert!(pump.own.is_none(), "the buffer is freed");
        assert!(pump.pipe.is_none(), "the pipe is given back");
        drop(pump);
        drop(b);
        writer.await.expect("writer task").expect("write");
        let got = reader.await.expect("reader task").expect("read");
        assert_eq!(got.len(), TOTAL);
        assert!(got == expected, "bytes differ");
        assert_eq!(total.load(Ordering::Relaxed), TOTAL as u64);
        most
    }

    const TEN_SECONDS: Duration = Duration::from_secs(10);

    async fn poll_end(ends: &mut Pin<&mut Ends<'_>>, activity: &Activity) -> Poll<RelayEnd> {
        poll_fn(|cx| Poll::Ready(ends.as_mut().poll_end(activity, cx))).await
    }

    /// Idle means no byte for the whole timeout since the last one, however long
    /// the connection was busy before; a cancelled stop token ends it at once.
    #[tokio::test(start_paused = true)]
    async fn a_relay_ends_a_full_timeout_after_the_last_byte_or_on_stop() {
        let stop = CancellationToken::new();
        let activity = Activity::new();
        let mut ends = pin!(Ends::new(&TEN_SECONDS, &stop));
        assert!(poll_end(&mut ends, &activity).await.is_pending());
        tokio::time::advance(Duration::from_secs(6)).await;
        activity.touch();
        // The timer fires at 10 s and is set again to 16 s.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            poll_end(&mut ends, &activity).await.is_pending(),
            "idle 5 s after a byte"
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(
            poll_end(&mut ends, &activity).await.is_pending(),
            "idle 9 s after a byte"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(
            poll_end(&mut ends, &activity).await,
            Poll::Ready(RelayEnd::Idle)
        ));

        let mut ends = pin!(Ends::new(&TEN_SECONDS, &stop));
        assert!(poll_end(&mut ends, &activity).await.is_pending());
        stop.cancel();
        assert!(matches!(
            poll_end(&mut ends, &activity).await,
            Poll::Ready(RelayEnd::Stopped)
        ));
    }

    /// Bytes with the sender's FIN right behind them (a reply, then a close) reach
    /// the other side in one segment, the FIN riding on the bytes. Bytes with no FIN
    /// behind them are not held back for one: they leave at once, and the FIN that
    /// comes later takes a segment of its own.
    #[tokio::test]
    async fn bytes_and_the_fin_right_behind_them_leave_in_one_segment() {
        use crate::sys::tcp::info;
        use std::io::Write;
        use std::net::Shutdown;
        let metric = Counter::noop();
        let total = AtomicU64::new(0);
        let activity = Activity::new();
        for fin_behind in [true, false] {
            let (backend, mut from) = pair().await;
            let (mut to, mut client) = pair().await;
            let mut pump = Pump::new(Tally {
                metric: &metric,
                total: &total,
            });
            let segments = |s: &TcpStream| info(s.as_fd()).expect("TCP_INFO").tcpi_segs_in;
            let before = segments(&client);
            // tokio reports a fresh socket readable with nothing to read; a read
            // that finds nothing clears that, so the pump waits for the one event
            // that reports the bytes and the FIN together.
            let nothing = from.try_read(&mut [0u8; 8]).expect_err("nothing sent yet");
            assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
            // A blocking socket: nothing in between lets the runtime look at `from`.
            let backend = backend.into_std().expect("std");
            backend.set_nonblocking(false).expect("blocking");
            (&backend).write_all(b"reply").expect("write");
            if !fin_behind {
                // The pump passes the bytes on while the backend's write side is
                // open, and the kernel holds none of them back.
                let start = total.load(Ordering::Relaxed);
                tokio::time::timeout(
                    Duration::from_secs(10),
                    poll_fn(|cx| {
                        let _ = pump.poll_pump(&mut from, &mut to, false, &activity, cx);
                        match total.load(Ordering::Relaxed) - start {
                            5 => Poll::Ready(()),
                            _ => Poll::Pending,
                        }
                    }),
                )
                .await
                .expect("the pump did not pass the bytes on");
                let unsent = info(to.as_fd()).expect("TCP_INFO").tcpi_notsent_bytes;
                assert_eq!(unsent, 0, "bytes held back, waiting for a FIN");
            }
            // On loopback the FIN is queued on `from` when this returns.
            backend.shutdown(Shutdown::Write).expect("shutdown");
            tokio::time::timeout(
                Duration::from_secs(10),
                poll_fn(|cx| pump.poll_pump(&mut from, &mut to, false, &activity, cx)),
            )
            .await
            .expect("the pump did not reach EOF")
            .expect("pump");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, b"reply");
            assert_eq!(
                segments(&client) - before,
                if fin_behind { 1 } else { 2 },
                "segments the client received, FIN right behind the bytes: {fin_behind}"
            );
        }
    }

    /// Copying, a full writer makes the pump keep the unsent bytes (at most one
    /// read's worth) in a buffer of its own, freed once the data is over.
    #[tokio::test]
    async fn a_full_writer_holds_only_the_unsent_bytes_and_frees_them() {
        let _turn = pipe::TEST_LOCK.lock().await;
        let _copy = CopyOnly::new();
        let most = through_a_full_writer(&mut |pump| (pump.end - pump.start) as usize).await;
        assert!(most <= BUFFER_SIZE, "{most} bytes kept, more than one read");
    }

    /// Bulk data goes through a pipe from the pool: what the writer cannot take
    /// waits in the pipe (at most its size) with no buffer beside it, and the pipe
    /// goes back to the pool at EOF.
    #[tokio::test]
    async fn bulk_data_is_spliced_through_a_pipe_that_goes_back_to_the_pool() {
        let _turn = pipe::TEST_LOCK.lock().await;
        let mut in_pipe = 0;
        through_a_full_writer(&mut |pump| {
            let held = pump.pipe.as_ref().map_or(0, Pipe::held);
            if held > 0 {
                assert!(pump.own.is_none(), "a buffer beside a full pipe");
            }
            in_pipe = in_pipe.max(held);
            held + (pump.end - pump.start) as usize
        })
        .await;
        assert!(
            in_pipe > 0,
            "no byte waited in a pipe: the pump did not splice"
        );
        assert!(
            in_pipe <= pipe::PIPE_SIZE,
            "{in_pipe} bytes in a pipe of {}",
            pipe::PIPE_SIZE
        );
    }
}
