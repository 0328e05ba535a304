//! The data path on loopback, on one current-thread runtime:
//! - `relay`: one small message through the plain relay and back (client -> relay
//!   -> echo -> relay -> client), and 1 MiB one way through it;
//! - `accept`: a whole proxied connection through a running listener: connect,
//!   accept, backend connect, 4 bytes echoed, close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use raftlb::balancer::Balancer;
use raftlb::config::schema::ProxyProtocol;
use raftlb::proxy::gate::Gate;
use raftlb::proxy::listener::{self, Settings, Shared};
use raftlb::proxy::relay::{self, Meters, Tally};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// An echo server on loopback, for as long as the runtime runs.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (b, _) = listener.accept().await.expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

/// Runs the relay between `inner_client` and `inner_backend` in a task.
fn spawn_relay(mut inner_client: TcpStream, mut inner_backend: TcpStream) {
    tokio::spawn(async move {
        let metric = metrics::Counter::noop();
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let meters = Meters {
            to_backend: Tally {
                metric: &metric,
                total: &up,
            },
            to_client: Tally {
                metric: &metric,
                total: &down,
            },
        };
        let stop = CancellationToken::new();
        relay::relay(
            &mut inner_client,
            &mut inner_backend,
            &Duration::from_secs(3600),
            &stop,
            meters,
            false,
        )
        .await
    });
}

fn relay_loop(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("relay");

    // client <-> [relay] <-> echo server
    let mut client = rt.block_on(async {
        let (client, inner_client) = pair().await;
        let echo = echo_server().await;
        let backend = TcpStream::connect(echo).await.expect("connect echo");
        backend.set_nodelay(true).expect("nodelay");
        spawn_relay(inner_client, backend);
        client
    });
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    group.throughput(Throughput::Bytes(64));
    group.bench_function("round_trip_64B", |b| {
        b.iter(|| {
            rt.block_on(async {
                client.write_all(&msg).await.expect("write");
                client.read_exact(&mut back).await.expect("read");
            })
        })
    });

    // client -> [relay] -> sink: 1 MiB one way.
    let (mut source, mut sink) = rt.block_on(async {
        let (source, inner_client) = pair().await;
        let (inner_backend, sink) = pair().await;
        spawn_relay(inner_client, inner_backend);
        (source, sink)
    });
    let chunk = vec![1u8; 64 * 1024];
    let mut drain = vec![0u8; 256 * 1024];
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("one_way_1MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let write = async {
                    for _ in 0..16 {
                        source.write_all(&chunk).await.expect("write");
                    }
                };
                let read = async {
                    let mut got = 0;
                    while got < 1 << 20 {
                        got += sink.read(&mut drain).await.expect("read");
                    }
                };
                tokio::join!(write, read);
            })
        })
    });
    group.finish();
}

fn accept_path(c: &mut Criterion) {
    let rt = runtime();
    let (addr, _listener) = rt.block_on(async {
        let echo = echo_server().await;
        let yaml = format!(
            "listeners:\n  a: {{ bind: 127.0.0.1:7001, pool: p }}\npools:\n  p:\n    backends:\n      - {{ name: b, address: '{echo}' }}\n"
        );
        let config = raftlb::config::parse(&yaml, "bench", 20000).expect("valid config");
        let balancer = Arc::new(Balancer::new());
        balancer.apply(&config.pools).await.expect("apply");
        let shared = Shared {
            balancer,
            gate: Gate::always(),
            connections: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
        };
        let settings = Settings {
            pool: "p".into(),
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(60),
            proxy_protocol: ProxyProtocol::Off,
            terminate: None,
        };
        let socket = raftlb::net::listen_proxied("127.0.0.1:0".parse().expect("addr"))
            .expect("listen");
        let running = listener::spawn("a", socket, settings, shared, Default::default()).expect("spawn");
        (running.bind, running)
    });
    let mut group = c.benchmark_group("accept");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));
    group.bench_function("connect_echo_close", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(b"ping").await.expect("write");
                let mut got = [0u8; 4];
                s.read_exact(&mut got).await.expect("echo");
                // A reset: no TIME_WAIT left behind per iteration.
                let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
            })
        })
    });
    group.finish();
}

criterion_group!(benches, relay_loop, accept_path);
criterion_main!(benches);
