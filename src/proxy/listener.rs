//! A listener: the accept loop and what happens to each client connection.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use metrics::{Counter, Gauge, Histogram};
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::client::TlsStream as ClientTlsStream;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::server::Acceptor;
use tokio_rustls::server::TlsStream as ServerTlsStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake, TlsConnector};

use super::gate::Gate;
use super::proxy_protocol;
use super::relay::{self, Meters, RelayEnd};
use crate::balancer::{Backend, Balancer, Pool};
use crate::config::schema::{self, ProxyProtocol, TlsMode};
use crate::health;
use crate::metrics as m;
use crate::tls::{self, Reloading};

/// A listener's settings that a reload may change without rebinding.
#[derive(Clone)]
pub struct Settings {
    pub pool: String,
    pub max_connections: u32,
    pub idle_timeout: Duration,
    pub proxy_protocol: ProxyProtocol,
    /// `tls: terminate`: the server config, reloaded when its files change.
    pub terminate: Option<Arc<Reloading<ServerConfig>>>,
}

impl Settings {
    /// Fails when `terminate:` names certificate files that do not load.
    pub fn from_config(name: &str, l: &schema::Listener) -> Result<Self, String> {
        let terminate = match (&l.tls.value, &l.terminate) {
            (TlsMode::Terminate, Some(t)) => {
                let t = t.value.clone();
                let files = tls::files_of_terminate(&t);
                let build = move || tls::server_config(&t, &[]);
                let reloading = Reloading::new(format!("listeners.{name}.terminate"), files, build)
                    .map_err(|e| format!("listeners.{name}.terminate: {e}"))?;
                Some(Arc::new(reloading))
            }
            _ => None,
        };
        Ok(Settings {
            pool: l.pool.value.clone(),
            // Filled in by config loading; the fallback is never used.
            max_connections: l.max_connections.as_ref().map_or(u32::MAX, |m| m.value),
            idle_timeout: l.idle_timeout.value.get(),
            proxy_protocol: l.proxy_protocol.value,
            terminate,
        })
    }
}

/// What every listener shares: the pools, the gate, the connection tracker, the hard stop.
#[derive(Clone)]
pub struct Shared {
    pub balancer: Arc<Balancer>,
    /// Whether this replica may accept (its role); checked on every accept.
    pub gate: Gate,
    /// Every connection task, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Cancelled when the shutdown grace is over: open relays end. It is the
    /// balancer's stop token, the parent of every backend's down token, so a relay
    /// waits on its backend's down token alone.
    pub hard_stop: CancellationToken,
}

/// A running listener.
pub struct Listener {
    pub name: Arc<str>,
    pub bind: SocketAddr,
    settings: Arc<ArcSwap<Settings>>,
    stop_accepting: CancellationToken,
    accepting: tokio::task::JoinHandle<()>,
}

impl Listener {
    pub fn update(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
    }

    /// Whether the accept loop has ended by itself: it closes the listening socket
    /// when it finds the lease's gate closed (a term that ran out).
    pub fn closed(&self) -> bool {
        self.accepting.is_finished()
    }

    /// Closes the listening socket and returns once it is closed (so the address
    /// can be bound again at once); established connections carry on.
    pub async fn stop(self) {
        self.stop_accepting.cancel();
        let _ = self.accepting.await;
    }
}

/// Starts accepting on `socket` for the listener `name`. `open` counts its open
/// connections against max_connections: the count of the listener's earlier
/// sockets (a reload that moved it, a standby spell), whose connections carry on.
pub fn spawn(
    name: &str,
    socket: TcpListener,
    settings: Settings,
    shared: Shared,
    open: Arc<AtomicU32>,
) -> io::Result<Listener> {
    let bind = socket.local_addr()?;
    let name: Arc<str> = name.into();
    let settings = Arc::new(ArcSwap::from_pointee(settings));
    let stop_accepting = CancellationToken::new();
    let accept = AcceptLoop {
        ctx: Arc::new(Ctx {
            name: name.clone(),
            bind,
            settings: settings.clone(),
            active: open,
            starved: Notify::new(),
            meters: MeterCache::default(),
            shared,
        }),
        socket,
        stop: stop_accepting.clone(),
    };
    Ok(Listener {
        name,
        bind,
        settings,
        stop_accepting,
        accepting: tokio::spawn(accept.run()),
    })
}

/// What a listener's accept loop and all its connections share, behind one `Arc`:
/// a connection costs one reference count, not one per field.
struct Ctx {
    name: Arc<str>,
    /// The listening address; the local address of every accepted connection when
    /// its IP is not a wildcard.
    bind: SocketAddr,
    settings: Arc<ArcSwap<Settings>>,
    /// Open connections, against max_connections (one count per connection).
    active: Arc<AtomicU32>,
    /// Set by a connection that could not open its backend socket for lack of
    /// descriptors or memory: the accept loop backs off as if accept() had failed.
    starved: Notify,
    meters: MeterCache,
    shared: Shared,
}

struct AcceptLoop {
    ctx: Arc<Ctx>,
    socket: TcpListener,
    stop: CancellationToken,
}

/// Connections accepted per wake-up, at most, before the loop looks at `stop` again.
const ACCEPT_BATCH: usize = 64;

impl AcceptLoop {
    async fn run(self) {
        let name = &self.ctx.name;
        let gate = &self.ctx.shared.gate;
        let mut backoff = Duration::ZERO;
        let mut last_starved: Option<Instant> = None;
        'wake: loop {
            let mut next = tokio::select! {
                () = self.stop.cancelled() => break,
                // A connection of this listener found no descriptor for its backend.
                () = self.ctx.starved.notified() => None,
                accepted = self.socket.accept() => Some(accepted),
            };
            let mut starved = next.is_none();
            let mut taken = 0;
            // Several accepts per wake-up, while the backlog has connections.
            while let Some(accepted) = next {
                match accepted {
                    Ok((client, peer)) => {
                        // Checked on every connection: a process resumed past its lease
                        // deadline resets what waited in the backlog, never proxies it.
                        if !gate.is_open() {
                            reset(client);
                            tracing::warn!(listener = %name, "not active (lease deadline passed): closing the listener");
                            break 'wake;
                        }
                        if last_starved.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                            backoff = Duration::ZERO;
                        }
                        self.admit(client, peer);
                    }
                    Err(e) if out_of_resources(&e) => {
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        starved = true;
                        break;
                    }
                    // ECONNABORTED and the like concern one connection only.
                    Err(e) => {
                        tracing::debug!(listener = %name, error = %e, "accept failed");
                    }
                }
                taken += 1;
                if taken == ACCEPT_BATCH {
                    break;
                }
                // The role gate before each further accept: none past the lease deadline.
                if !gate.is_open() {
                    tracing::warn!(listener = %name, "not active (lease deadline passed): closing the listener");
                    break 'wake;
                }
                // Ready now, or back to waiting (readiness is re-armed by the next poll).
                next = self.socket.accept().now_or_never();
            }
            if !starved {
                continue;
            }
            // Back off instead of spinning: pending connections wait in the backlog.
            last_starved = Some(Instant::now());
            backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
            tracing::warn!(listener = %name, ?backoff, "out of file descriptors or memory; backing off");
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep(backoff) => {}
            }
        }
        tracing::info!(listener = %name, "stopped accepting");
    }

    fn admit(&self, client: TcpStream, peer: SocketAddr) {
        let ctx = &self.ctx;
        let settings = ctx.settings.load_full();
        let active = ctx.active.fetch_add(1, Ordering::Relaxed);
        if active >= settings.max_connections {
            ctx.active.fetch_sub(1, Ordering::Relaxed);
            ctx.meters
                .none(&ctx.name, &settings.pool, "rejected")
                .increment(1);
            tracing::debug!(listener = %ctx.name, %peer, max = settings.max_connections, "max_connections reached; closing the new connection");
            drop(client);
            return;
        }
        // From here the connection holds its max_connections slot until it is dropped.
        let conn = Connection {
            ctx: ctx.clone(),
            settings,
        };
        ctx.shared.connections.spawn(conn.serve(client, peer));
    }
}

/// Closes with a reset (SO_LINGER 0) rather than a FIN: the client never mistakes
/// it for a proxied connection.
fn reset(client: TcpStream) {
    let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
    drop(client);
}

fn out_of_resources(e: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

/// Holds one of a backend's active connections (for least_connections) until dropped.
struct BackendSlot<'a>(&'a Backend);

impl<'a> BackendSlot<'a> {
    fn take(backend: &'a Backend) -> Self {
        backend.state.active.fetch_add(1, Ordering::Relaxed);
        BackendSlot(backend)
    }
}

impl Drop for BackendSlot<'_> {
    fn drop(&mut self) {
        self.0.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One client connection; holds one of the listener's max_connections slots.
struct Connection {
    ctx: Arc<Ctx>,
    /// The listener's settings when the connection was accepted.
    settings: Arc<Settings>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.ctx.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backend side of a proxied connection.
enum Upstream {
    Plain(TcpStream),
    Tls(Box<ClientTlsStream<TcpStream>>),
}

/// A connected backend: its slot (for least_connections), stream and meters.
/// It counts in `raftlb_active_connections` while it exists.
struct Connected<'p> {
    slot: BackendSlot<'p>,
    upstream: Upstream,
    meters: Arc<ConnMeters>,
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.meters.active.decrement(1.0);
    }
}

/// Time allowed for a client's TLS handshake on a terminating listener.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Connection {
    /// Not an async fn: an async fn keeps a second copy of its arguments in its
    /// state (rust-lang/rust#62958), which every idle connection would carry.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would store its arguments twice (80 bytes per connection)"
    )]
    fn serve(self, mut client: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send {
        async move {
            // TCP_NODELAY and keepalive came from the listening socket (net::listen_proxied).
            let snapshot = self.ctx.shared.balancer.snapshot();
            let Some(pool) = snapshot.pools.get(&self.settings.pool) else {
                self.ctx
                    .meters
                    .none(&self.ctx.name, &self.settings.pool, "no_backend")
                    .increment(1);
                tracing::warn!(listener = %self.ctx.name, pool = %self.settings.pool, "pool does not exist; closing the connection");
                return;
            };
            let local = self.local_addr(&client, peer);
            let end = match &self.settings.terminate {
                None => {
                    // A let-else, not a match: the matched Option would stay in the
                    // task's state next to the connection taken out of it.
                    let Some(mut conn) = self.connect(pool, peer, local, &[]).await else {
                        return;
                    };
                    self.relay(&mut client, &mut conn).await
                }
                // Boxed: the TLS state is large, and plain connections should not carry its size.
                Some(server) => {
                    match Box::pin(self.terminate(client, pool, peer, local, server)).await {
                        Ok(Some(end)) => end,
                        Ok(None) => return,
                        // A client that closed before its ClientHello (a TCP check, a
                        // scanner) is not worth a line, as with HAProxy's dontlognull.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(listener = %self.ctx.name, %peer, error = %e, "client closed before the TLS handshake");
                            return;
                        }
                        // By client address, not port: repeats fold into one line.
                        Err(e) => {
                            tracing::warn!(listener = %self.ctx.name, client = %peer.ip(), error = %e, "client TLS handshake failed");
                            return;
                        }
                    }
                }
            };
            match end {
                RelayEnd::Closed => {}
                RelayEnd::Idle => {
                    tracing::debug!(listener = %self.ctx.name, %peer, "idle_timeout: closing")
                }
                RelayEnd::Stopped => {
                    tracing::debug!(listener = %self.ctx.name, %peer, "closed by shutdown or on_down: close")
                }
                RelayEnd::Error(e) => {
                    tracing::debug!(listener = %self.ctx.name, %peer, error = %e, "connection ended")
                }
            }
        }
    }

    /// The address the client connected to, for the PROXY header: the bind address,
    /// unless it is a wildcard (then one getsockname). Unused without the header.
    fn local_addr(&self, client: &TcpStream, peer: SocketAddr) -> SocketAddr {
        if self.settings.proxy_protocol == ProxyProtocol::Off
            || !self.ctx.bind.ip().is_unspecified()
        {
            return self.ctx.bind;
        }
        client.local_addr().unwrap_or(peer)
    }

    /// `tls: terminate`. Towards a plain backend the client's handshake (its
    /// certificate, with `client_ca`) completes before any backend connection, so
    /// a refused client costs the backend nothing and is not counted as proxied.
    /// When re-encrypting, the backend is connected after the ClientHello with the
    /// client's ALPN protocols, and the client's handshake finishes with the
    /// protocol the backend chose, so h2 stays h2 end to end.
    async fn terminate(
        &self,
        client: TcpStream,
        pool: &Pool,
        peer: SocketAddr,
        local: SocketAddr,
        server: &Reloading<ServerConfig>,
    ) -> io::Result<Option<RelayEnd>> {
        let accept = LazyConfigAcceptor::new(Acceptor::default(), client);
        let start = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let finish = |start: StartHandshake<TcpStream>, alpn: Vec<Vec<u8>>| {
            let mut config = (*server.get()).clone();
            config.alpn_protocols = alpn;
            async move {
                tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(Arc::new(config)))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })?
                    // After its ClientHello a client that hangs up (say, it distrusts
                    // this certificate and sends no alert) is worth a line: not EOF.
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof => io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            format!("the client closed during the handshake: {e}"),
                        ),
                        _ => e,
                    })
            }
        };
        if pool.backend_tls.is_none() {
            let mut client = finish(start, Vec::new()).await?;
            let Some(mut conn) = self.connect(pool, peer, local, &[]).await else {
                return Ok(None);
            };
            self.send_held_ack(&conn);
            return Ok(Some(self.relay(&mut client, &mut conn).await));
        }
        let offered: Vec<Vec<u8>> = start
            .client_hello()
            .alpn()
            .map(|it| it.map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        let Some(mut conn) = self.connect(pool, peer, local, &offered).await else {
            return Ok(None);
        };
        self.send_held_ack(&conn);
        let chosen = match &conn.upstream {
            Upstream::Tls(tls) => tls
                .get_ref()
                .1
                .alpn_protocol()
                .map(|p| vec![p.to_vec()])
                .unwrap_or_default(),
            Upstream::Plain(_) => Vec::new(),
        };
        let mut client = finish(start, chosen).await?;
        Ok(Some(self.relay(&mut client, &mut conn).await))
    }

    /// A held handshake ACK goes at once: on a terminating listener the client's
    /// first bytes come through the TLS relay, which never looks for it.
    fn send_held_ack(&self, conn: &Connected<'_>) {
        if let Some(backend) = self.held_ack(conn) {
            crate::net::send_ack(backend);
        }
    }

    /// The backend connection whose handshake ACK still waits for the first bytes
    /// sent to it (net::connect holds it back), unless a PROXY header or a backend
    /// TLS handshake has already carried it.
    fn held_ack<'c>(&self, conn: &'c Connected<'_>) -> Option<&'c TcpStream> {
        match &conn.upstream {
            Upstream::Plain(backend) if self.settings.proxy_protocol == ProxyProtocol::Off => {
                Some(backend)
            }
            _ => None,
        }
    }

    /// The streams are borrowed, not moved: an async fn keeps the arguments it is
    /// given by value twice in its state (rust-lang/rust#62958), and this state is
    /// what an idle connection's task holds. Only the backend's down token is kept
    /// beside the relay's own future.
    async fn relay<C>(&self, client: &mut C, conn: &mut Connected<'_>) -> RelayEnd
    where
        C: ClientSide,
    {
        let backend = conn.slot.0;
        let down = backend.state.down_token();
        // The relay's first bytes carry a held ACK, or it sends it (a TLS client's
        // relay never finds one: `terminate` sent it once connected).
        let ack_held = self.held_ack(conn).is_some();
        let io = Meters {
            to_backend: relay::Tally {
                metric: &conn.meters.to_backend,
                total: &backend.state.bytes_to_backend,
            },
            to_client: relay::Tally {
                metric: &conn.meters.to_client,
                total: &backend.state.bytes_to_client,
            },
        };
        let idle = &self.settings.idle_timeout;
        // The relay itself waits for the backend's down token, rather than a select
        // around it (one level less of nested state in the task); it is also
        // cancelled by the hard stop (a child of the balancer's stop token).
        match &mut conn.upstream {
            Upstream::Plain(upstream) => client.relay_to(upstream, idle, &down, io, ack_held).await,
            Upstream::Tls(upstream) => {
                Box::pin(relay::relay_io(client, &mut **upstream, idle, &down, io)).await
            }
        }
    }

    /// Connects to a backend, retrying connect failures on other backends.
    async fn connect<'p>(
        &self,
        pool: &'p Pool,
        peer: SocketAddr,
        local: SocketAddr,
        alpn: &[Vec<u8>],
    ) -> Option<Connected<'p>> {
        // The backends that failed: the first pick, which usually succeeds, needs
        // no list, so a connection allocates none.
        let mut tried = Vec::new();
        while let Some(index) = pool.pick(peer.ip(), &tried) {
            let backend = &pool.backends[index];
            let slot = BackendSlot::take(backend);
            let meters = self
                .ctx
                .meters
                .get(&self.ctx.name, &pool.name, &backend.name);
            let started = Instant::now();
            // Boxed: connecting (timer, PROXY header, backend TLS) is a large state
            // that an established connection's task should not keep the size of.
            match Box::pin(connect_backend(
                pool,
                backend,
                self.settings.proxy_protocol,
                peer,
                local,
                alpn,
            ))
            .await
            {
                Ok(upstream) => {
                    meters
                        .connect_duration
                        .record(started.elapsed().as_secs_f64());
                    meters.ok.increment(1);
                    health::passive_success(backend);
                    meters.active.increment(1.0);
                    return Some(Connected {
                        slot,
                        upstream,
                        meters,
                    });
                }
                // The shortage is ours, not the backend's: no passive failure, no retry.
                Err(e) if out_of_resources(&e) => {
                    self.ctx.starved.notify_one();
                    self.ctx
                        .meters
                        .none(&self.ctx.name, &pool.name, "rejected")
                        .increment(1);
                    tracing::warn!(listener = %self.ctx.name, pool = %pool.name, error = %e, "no descriptor for the backend connection; closing the client");
                    return None;
                }
                Err(e) => {
                    meters.connect_failed.increment(1);
                    tracing::warn!(listener = %self.ctx.name, pool = %pool.name, backend = %backend.name, error = %e, "connect to backend failed");
                    health::passive_failure(pool, index);
                    tried.push(index);
                    if tried.len() > pool.retries as usize {
                        break;
                    }
                }
            }
        }
        if tried.is_empty() {
            self.ctx
                .meters
                .none(&self.ctx.name, &pool.name, "no_backend")
                .increment(1);
            tracing::debug!(listener = %self.ctx.name, pool = %pool.name, "no backend is up; closing the connection");
        }
        None
    }
}

/// The client side of a relay: plain TCP gets the buffer-free relay, TLS the generic one.
trait ClientSide: AsyncRead + AsyncWrite + Unpin + Send {
    /// Not an async fn: it returns the relay's future itself, so the task does not
    /// hold the arguments once more around it. `ack_held`: see [`relay::relay`].
    fn relay_to<'a>(
        &'a mut self,
        upstream: &'a mut TcpStream,
        idle: &'a Duration,
        stop: &'a CancellationToken,
        meters: Meters<'a>,
        ack_held: bool,
    ) -> impl Future<Output = RelayEnd> + Send + 'a;
}

impl ClientSide for TcpStream {
    fn relay_to<'a>(
        &'a mut self,
        upstream: &'a mut TcpStream,
        idle: &'a Duration,
        stop: &'a CancellationToken,
        meters: Meters<'a>,
        ack_held: bool,
    ) -> impl Future<Output = RelayEnd> + Send + 'a {
        relay::relay(self, upstream, idle, stop, meters, ack_held)
    }
}

impl ClientSide for ServerTlsStream<TcpStream> {
    fn relay_to<'a>(
        &'a mut self,
        upstream: &'a mut TcpStream,
        idle: &'a Duration,
        stop: &'a CancellationToken,
        meters: Meters<'a>,
        _ack_held: bool,
    ) -> impl Future<Output = RelayEnd> + Send + 'a {
        // Never held here: `terminate` sent the ACK once connected.
        Box::pin(relay::relay_io(self, upstream, idle, stop, meters))
    }
}

/// TCP connect within the pool's connect_timeout, the PROXY header, then TLS when
/// the pool re-encrypts. Any failure counts as a connect failure (and is retried).
async fn connect_backend(
    pool: &Pool,
    backend: &Backend,
    proxy_protocol: ProxyProtocol,
    peer: SocketAddr,
    local: SocketAddr,
    alpn: &[Vec<u8>],
) -> io::Result<Upstream> {
    let addr = backend.connect_addr().ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "backend has no resolved address")
    })?;
    let timeout = pool.connect_timeout;
    let connect = async {
        let mut stream = crate::net::connect(addr).await?;
        if let Some(header) = proxy_protocol::header(proxy_protocol, peer, local)? {
            stream.write_all(&header).await?;
        }
        let Some(tls) = &pool.backend_tls else {
            return Ok(Upstream::Plain(stream));
        };
        let host = backend.address.host();
        let name = crate::tls::server_name(Some(&tls.settings), &host).map_err(io::Error::other)?;
        let mut config = (*tls.config.get()).clone();
        config.alpn_protocols = alpn.to_vec();
        let stream = TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await?;
        Ok(Upstream::Tls(Box::new(stream)))
    };
    tokio::time::timeout(timeout, connect).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {timeout:?}"),
        )
    })?
}

/// The metric handles of one (listener, pool, backend), resolved once and reused.
struct ConnMeters {
    ok: Counter,
    connect_failed: Counter,
    active: Gauge,
    to_backend: Counter,
    to_client: Counter,
    connect_duration: Histogram,
}

/// pool -> backend -> handles.
type ByPool = HashMap<Arc<str>, HashMap<Arc<str>, Arc<ConnMeters>>>;

/// Metric handles per backend, with their labels resolved once: a connection looks
/// them up without a lock; the first connection to a backend copies the map.
#[derive(Default)]
struct MeterCache {
    by_pool: ArcSwap<ByPool>,
}

impl MeterCache {
    fn get(&self, listener: &str, pool: &Arc<str>, backend: &Arc<str>) -> Arc<ConnMeters> {
        if let Some(found) = self
            .by_pool
            .load()
            .get(&**pool)
            .and_then(|b| b.get(&**backend))
        {
            return found.clone();
        }
        let labels = |extra: Option<(&'static str, &'static str)>| {
            let mut l = vec![
                ("listener", listener.to_string()),
                ("pool", pool.to_string()),
                ("backend", backend.to_string()),
            ];
            if let Some((k, v)) = extra {
                l.push((k, v.to_string()));
            }
            l
        };
        let meters = Arc::new(ConnMeters {
            ok: metrics::counter!(m::CONNECTIONS_TOTAL, &labels(Some(("result", "ok")))),
            connect_failed: metrics::counter!(
                m::CONNECTIONS_TOTAL,
                &labels(Some(("result", "connect_failed")))
            ),
            active: metrics::gauge!(m::ACTIVE_CONNECTIONS, &labels(None)),
            to_backend: metrics::counter!(
                m::BYTES_TOTAL,
                &labels(Some(("direction", "to_backend")))
            ),
            to_client: metrics::counter!(m::BYTES_TOTAL, &labels(Some(("direction", "to_client")))),
            connect_duration: metrics::histogram!(
                m::CONNECT_DURATION,
                &[("pool", pool.to_string()), ("backend", backend.to_string())]
            ),
        });
        self.by_pool.rcu(|map| {
            let mut map = ByPool::clone(map);
            map.entry(pool.clone())
                .or_default()
                .insert(backend.clone(), meters.clone());
            map
        });
        meters
    }

    /// `connections_total{backend="none"}` for connections that reached no backend.
    fn none(&self, listener: &str, pool: &str, result: &'static str) -> Counter {
        metrics::counter!(
            m::CONNECTIONS_TOTAL,
            &[
                ("listener", listener.to_string()),
                ("pool", pool.to_string()),
                ("backend", "none".to_string()),
                ("result", result.to_string()),
            ]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory per idle connection is mostly its task: the future of `serve`, sized by
    /// its largest state. The connect and TLS phases are boxed (allocated only while
    /// they run), so what an established plain connection holds is the relay's state.
    #[tokio::test]
    async fn a_connection_task_is_small() {
        let listener =
            crate::net::listen_proxied("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let bind = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(bind).await.expect("connect");
        let (accepted, peer) = listener.accept().await.expect("accept");
        let settings = Settings {
            pool: "p".into(),
            max_connections: 10,
            idle_timeout: Duration::from_secs(60),
            proxy_protocol: ProxyProtocol::Off,
            terminate: None,
        };
        let ctx = Arc::new(Ctx {
            name: "l".into(),
            bind,
            settings: Arc::new(ArcSwap::from_pointee(settings.clone())),
            active: Arc::new(AtomicU32::new(1)),
            starved: Notify::new(),
            meters: MeterCache::default(),
            shared: Shared {
                balancer: Arc::new(Balancer::new()),
                gate: Gate::always(),
                connections: TaskTracker::new(),
                hard_stop: CancellationToken::new(),
            },
        });
        let conn = Connection {
            ctx: ctx.clone(),
            settings: Arc::new(settings),
        };
        let task = conn.serve(accepted, peer);
        let size = std::mem::size_of_val(&task);
        eprintln!("connection future: {size} bytes");
        // Unoptimised builds (tests) keep more state than release; the bound is for them.
        assert!(size <= BOUND, "a connection's future is {size} bytes");
        drop(task);
        assert_eq!(
            ctx.active.load(Ordering::Relaxed),
            0,
            "the slot is given back"
        );
    }

    // 544 bytes in a debug build (832 before the plain relay became one hand-written
    // future holding the sockets once, 2744 before the pins in relay, 2096 before the
    // hand-written pumps, the borrowed streams and the single stop token, 1056 before
    // serve and relay_to returned their futures instead of being async fns). In
    // release the future is 528 bytes and its task cell 640 (header 32, future,
    // tracker token and stage 568, trailer 48); mimalloc serves a 128-aligned 640 from
    // its 768-byte blocks. At 816 bytes the cell was 1,024.
    const BOUND: usize = 600;
}
