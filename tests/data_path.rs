//! The data path end to end (SPEC.md "Behaviour: Data path", "Metrics"): a real
//! `raftlb` process on loopback between real client sockets and real backends.

mod common;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;

const MB: usize = 1024 * 1024;

fn start(yaml: &str, admin: SocketAddr) -> Raftlb {
    blocking(|| Raftlb::start(yaml, admin))
}

/// The sum of the series of `name` that carry every label in `labels`, in any order.
fn series(lb: &Raftlb, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = blocking(|| lb.metrics());
    sum_series(&text, name, labels)
}

fn sum_series(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let open = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&open))
        .filter(|l| {
            let Some((set, _)) = l.split_once('}') else {
                return false;
            };
            labels
                .iter()
                .all(|(k, v)| set.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Waits up to `limit` for the peer to close: Ok(bytes received before the close).
/// A reset counts as a close.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return Err(format!("still open after {limit:?}; got {got:?}")),
            Ok(Ok(0)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(got),
            Ok(Err(e)) => return Err(format!("read failed: {e}")),
        }
    }
}

/// How many of the process's descriptors are pipes (its stdout and stderr
/// included, and the pipes cached for splice).
fn pipe_descriptors(lb: &Raftlb) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", lb.pid())).expect("/proc/PID/fd");
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// xorshift64*: cheap, reproducible bytes that no layer could compress or special-case.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_both_ways_arrive_intact() {
    raise_nofile();
    const TOTAL: usize = 100 * MB;
    let echo = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let lb = start(
        &Raftlb::standalone_yaml(admin, listen, "", "", &[("echo", echo)]),
        admin,
    );
    let pipes_before = pipe_descriptors(&lb);

    let (mut rd, mut wr) = connect(listen).await.into_split();
    let writer = tokio::spawn(async move {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < TOTAL {
            let n = buf.len().min(TOTAL - sent);
            noise.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            wr.write_all(&buf[..n]).await?;
            sent += n;
        }
        wr.shutdown().await?;
        io::Result::Ok((sent, hash.finalize()))
    });
    let reader = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = 0;
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            received += n;
        }
        io::Result::Ok((received, hash.finalize()))
    });
    let (sent, received) = timeout(Duration::from_secs(180), async {
        (writer.await, reader.await)
    })
    .await
    .expect("100 MB each way did not finish in 180 s");
    let (sent, sent_hash) = sent.expect("writer task").expect("send");
    let (received, received_hash) = received.expect("reader task").expect("receive");
    assert_eq!(sent, TOTAL);
    assert_eq!(received, TOTAL, "bytes echoed back");
    assert!(
        sent_hash == received_hash,
        "SHA-256 of the bytes sent and of the bytes echoed back differ"
    );
    // The bulk went through splice: its pipes are back in the pool, still open.
    let pipes_after = pipe_descriptors(&lb);
    assert!(
        pipes_after >= pipes_before + 2,
        "{pipes_before} pipe descriptors before, {pipes_after} after: the relay did not splice"
    );

    for direction in ["to_backend", "to_client"] {
        let labels = [("backend", "echo"), ("direction", direction)];
        let ok = blocking(|| {
            eventually(Duration::from_secs(10), || {
                sum_series(&lb.metrics(), "raftlb_bytes_total", &labels) >= TOTAL as f64
            })
        });
        assert!(
            ok,
            "raftlb_bytes_total{{direction=\"{direction}\"}} = {}, want >= {TOTAL}",
            series(&lb, "raftlb_bytes_total", &labels)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_the_backend_which_can_still_reply() {
    raise_nofile();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        // Read to EOF: only the client's half-close, passed on by the proxy, ends this.
        let mut request = Vec::new();
        let read = timeout(Duration::from_secs(10), s.read_to_end(&mut request)).await;
        let saw_eof = matches!(read, Ok(Ok(_)));
        let _ = seen_tx.send((saw_eof, request));
        if saw_eof {
            let _ = s.write_all(b"reply after your EOF").await;
            let _ = s.shutdown().await;
        }
    });
    let (admin, listen) = (loopback(), loopback());
    let _lb = start(
        &Raftlb::standalone_yaml(admin, listen, "", "", &[("b", backend)]),
        admin,
    );

    let mut client = connect(listen).await;
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let (saw_eof, request) = timeout(Duration::from_secs(15), seen_rx)
        .await
        .expect("backend never reported")
        .expect("backend task ended");
    assert!(saw_eof, "the backend did not see the client's EOF");
    assert_eq!(request, b"request");
    let reply = read_until_closed(&mut client, Duration::from_secs(10))
        .await
        .expect("the client sees the reply, then EOF");
    assert_eq!(reply, b"reply after your EOF");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_reaches_the_client_which_can_still_send() {
    raise_nofile();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (got_tx, got_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let _ = s.write_all(b"greeting").await;
        let _ = s.shutdown().await;
        let mut from_client = Vec::new();
        let read = timeout(Duration::from_secs(10), s.read_to_end(&mut from_client)).await;
        let _ = got_tx.send(read.map(|r| r.map(|_| from_client)));
    });
    let (admin, listen) = (loopback(), loopback());
    let _lb = start(
        &Raftlb::standalone_yaml(admin, listen, "", "", &[("b", backend)]),
        admin,
    );

    let mut client = connect(listen).await;
    let greeting = read_until_closed(&mut client, Duration::from_secs(10))
        .await
        .expect("the client sees the greeting, then EOF");
    assert_eq!(greeting, b"greeting");
    // The backend's direction is closed; the client's must still be open.
    client.write_all(b"sent after your EOF").await.unwrap();
    client.shutdown().await.unwrap();
    let from_client = timeout(Duration::from_secs(15), got_rx)
        .await
        .expect("backend never reported")
        .expect("backend task ended")
        .expect("backend read timed out: the client's EOF never arrived")
        .expect("backend read failed");
    assert_eq!(from_client, b"sent after your EOF");
}

/// Three named backends with weights 1, 3 and 6 behind one listener.
async fn weighted_pool(balance: &str) -> (Raftlb, SocketAddr) {
    let (a, b, c) = (
        named_backend("a").await,
        named_backend("b").await,
        named_backend("c").await,
    );
    let (admin, listen) = (loopback(), loopback());
    let yaml = Raftlb::standalone_yaml_weighted(
        admin,
        listen,
        &format!("    balance: {balance}\n"),
        "",
        &[("a", a, 1), ("b", b, 3), ("c", c, 6)],
    );
    (start(&yaml, admin), listen)
}

const WEIGHTS: [(&str, f64); 3] = [("a", 0.1), ("b", 0.3), ("c", 0.6)];

fn shares(counts: &HashMap<String, usize>) -> String {
    let total: usize = counts.values().sum();
    let mut names: Vec<_> = counts.keys().collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            format!(
                "{n}: {} ({:.1}%)",
                counts[*n],
                100.0 * counts[*n] as f64 / total as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every share within `tolerance` (a fraction) of its weight's share.
fn assert_follows_weights(counts: &HashMap<String, usize>, tolerance: f64, what: &str) {
    let total: usize = counts.values().sum();
    assert!(
        counts.keys().all(|k| WEIGHTS.iter().any(|(n, _)| n == k)),
        "{what}: unexpected backend in {}",
        shares(counts)
    );
    for (name, want) in WEIGHTS {
        let got = counts.get(name).copied().unwrap_or(0) as f64 / total as f64;
        assert!(
            (got - want).abs() <= tolerance,
            "{what}: backend {name} got {:.1}%, weight share {:.0}% ± {:.0} points; {}",
            100.0 * got,
            100.0 * want,
            100.0 * tolerance,
            shares(counts)
        );
    }
}

/// Opens `n` connections one after the other and keeps them all open, so each
/// pick sees the active connections of the previous ones. The named backend sends
/// its name and half-closes; the client's direction keeps the connection alive.
async fn hold_connections(
    listen: SocketAddr,
    n: usize,
) -> (HashMap<String, usize>, Vec<TcpStream>) {
    let mut counts = HashMap::new();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect(listen).await;
        let name = read_until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("a backend name, then EOF");
        let name = String::from_utf8(name).expect("utf-8 name");
        *counts.entry(name.trim().to_string()).or_default() += 1;
        held.push(s);
    }
    (counts, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights_exactly() {
    raise_nofile();
    let (_lb, listen) = weighted_pool("round_robin").await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..1000 {
        let name = which_backend(listen, None).await.expect("a backend name");
        *counts.entry(name).or_default() += 1;
    }
    // 1000 picks are 100 whole turns of the 1+3+6 schedule, wherever it starts.
    let expected: HashMap<String, usize> = [("a", 100), ("b", 300), ("c", 600)]
        .into_iter()
        .map(|(n, c)| (n.to_string(), c))
        .collect();
    assert_eq!(counts, expected, "{}", shares(&counts));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_fills_backends_by_weight() {
    raise_nofile();
    let (lb, listen) = weighted_pool("least_connections").await;
    let (counts, held) = hold_connections(listen, 1000).await;
    // Each pick goes to the fewest active connections per weight: after 1000 held
    // connections the counts are exactly 1:3:6.
    let expected: HashMap<String, usize> = [("a", 100), ("b", 300), ("c", 600)]
        .into_iter()
        .map(|(n, c)| (n.to_string(), c))
        .collect();
    assert_eq!(counts, expected, "{}", shares(&counts));
    assert_eq!(
        series(&lb, "raftlb_active_connections", &[("pool", "web")]),
        1000.0,
        "active_connections while 1000 connections are held"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_two_follows_weights() {
    raise_nofile();
    let (_lb, listen) = weighted_pool("random_two").await;
    let (counts, held) = hold_connections(listen, 1000).await;
    assert_follows_weights(&counts, 0.05, "random_two over 1000 held connections");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hash_keeps_each_client_on_one_backend() {
    raise_nofile();
    let (_lb, listen) = weighted_pool("source_hash").await;
    // 200 client addresses (127.0.0.2 ..= 127.0.0.201), 5 connections each.
    let mut clients: HashMap<String, usize> = HashMap::new();
    for host in 2..=201u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, host));
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(
                which_backend(listen, Some(ip))
                    .await
                    .expect("a backend name"),
            );
        }
        assert!(
            seen.iter().all(|n| *n == seen[0]),
            "client {ip} moved between backends: {seen:?}"
        );
        *clients.entry(seen[0].clone()).or_default() += 1;
    }
    // The hash is fixed, so this spread is the same on every run.
    assert_follows_weights(&clients, 0.10, "source_hash over 200 client addresses");
}

/// raftlb holds the backend's handshake ACK back for the client's first bytes
/// (one packet and one wake-up less for the backend); a client that has sent
/// nothing must not keep a backend that speaks first (SSH, SMTP, MySQL) waiting
/// for the kernel's delayed-ACK timer, 200 ms. A greeting that took longer than
/// 150 ms in each of three attempts waited for that timer; one slowed by a
/// loaded machine proves nothing, hence the three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_speaks_first_greets_a_client_that_has_sent_nothing() {
    let greeter = named_backend("hello").await;
    let (admin, listen) = (loopback(), loopback());
    let _lb = start(
        &Raftlb::standalone_yaml(admin, listen, "", "", &[("greeter", greeter)]),
        admin,
    );
    let mut took = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let greeting = which_backend(listen, None).await.expect("a greeting");
        assert_eq!(greeting, "hello");
        took.push(started.elapsed());
        if started.elapsed() < Duration::from_millis(150) {
            return;
        }
    }
    panic!("the greeting took {took:?}: the backend waited for its handshake ACK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_on_another_backend() {
    raise_nofile();
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let live = named_backend("live").await;
    let (admin, listen) = (loopback(), loopback());
    let lb = start(
        &Raftlb::standalone_yaml(
            admin,
            listen,
            "    retries: 3\n",
            "",
            &[("dead", dead), ("live", live)],
        ),
        admin,
    );
    for i in 0..200 {
        let name = which_backend(listen, None).await;
        assert_eq!(
            name.as_deref().ok(),
            Some("live"),
            "connection {i}: {name:?}"
        );
    }
    let failed = series(
        &lb,
        "raftlb_connections_total",
        &[("backend", "dead"), ("result", "connect_failed")],
    );
    assert!(
        failed >= 1.0,
        "connect_failed for the dead backend: {failed}"
    );
    let ok = series(
        &lb,
        "raftlb_connections_total",
        &[("backend", "live"), ("result", "ok")],
    );
    assert_eq!(ok, 200.0, "ok for the live backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_backend_reachable_the_client_is_closed_promptly() {
    raise_nofile();
    let dead1 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dead2 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (admin, listen) = (loopback(), loopback());
    let lb = start(
        &Raftlb::standalone_yaml(
            admin,
            listen,
            "    retries: 3\n",
            "",
            &[("dead1", dead1), ("dead2", dead2)],
        ),
        admin,
    );
    // Enough connections that passive checks mark both down: closed either way.
    for i in 0..10 {
        let started = Instant::now();
        let mut s = connect(listen).await;
        let _ = s.write_all(b"anyone there?").await;
        let got = read_until_closed(&mut s, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(got.is_empty(), "connection {i}: bytes arrived: {got:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "connection {i} took {:?} to close",
            started.elapsed()
        );
    }
    let failed = series(
        &lb,
        "raftlb_connections_total",
        &[("result", "connect_failed")],
    );
    assert!(failed >= 2.0, "connect_failed: {failed}");
    let ok = series(&lb, "raftlb_connections_total", &[("result", "ok")]);
    assert_eq!(ok, 0.0, "no connection can have succeeded");
    // `fall` (3) failures in a row mark both down; later connections find no backend.
    let none = series(
        &lb,
        "raftlb_connections_total",
        &[("backend", "none"), ("result", "no_backend")],
    );
    assert!(none >= 1.0, "no_backend with backend=\"none\": {none}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_closes_the_extra_connection_at_once() {
    raise_nofile();
    let echo = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let lb = start(
        &Raftlb::standalone_yaml(
            admin,
            listen,
            "",
            "    max_connections: 5\n",
            &[("echo", echo)],
        ),
        admin,
    );
    let mut held = Vec::new();
    for i in 0..5 {
        let mut s = connect(listen).await;
        let msg = format!("held {i}");
        let back = echo_once(&mut s, msg.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("connection {i} within the limit: {e}"));
        assert_eq!(back, msg.as_bytes());
        held.push(s);
    }

    let started = Instant::now();
    let mut extra = connect(listen).await;
    let _ = extra.write_all(b"sixth").await;
    let got = read_until_closed(&mut extra, Duration::from_secs(2))
        .await
        .expect("the 6th connection is closed within 2 s");
    assert!(got.is_empty(), "the 6th connection got bytes: {got:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let rejected = series(
        &lb,
        "raftlb_connections_total",
        &[("backend", "none"), ("result", "rejected")],
    );
    assert!(
        rejected >= 1.0,
        "rejected with backend=\"none\": {rejected}"
    );
    assert_eq!(
        series(&lb, "raftlb_connections_total", &[("result", "rejected")]),
        rejected,
        "every rejected connection is counted with backend=\"none\""
    );
    for (i, s) in held.iter_mut().enumerate() {
        let back = echo_once(s, b"still here").await;
        assert_eq!(back.ok().as_deref(), Some(&b"still here"[..]), "held {i}");
    }

    // A slot frees up once one of the five closes.
    drop(held.pop());
    let mut works_again = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..50 {
        if Instant::now() > deadline {
            break;
        }
        let mut s = connect(listen).await;
        if echo_once(&mut s, b"again")
            .await
            .is_ok_and(|b| b == b"again")
        {
            works_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        works_again,
        "no new connection worked after one of five closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_idle_connections_only() {
    raise_nofile();
    let echo = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let _lb = start(
        &Raftlb::standalone_yaml(
            admin,
            listen,
            "",
            "    idle_timeout: 1s\n",
            &[("echo", echo)],
        ),
        admin,
    );

    let idle = async {
        let mut s = connect(listen).await;
        assert_eq!(echo_once(&mut s, b"once").await.unwrap(), b"once");
        let quiet_since = Instant::now();
        let got = read_until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("the idle connection is closed within 5 s");
        assert!(got.is_empty());
        quiet_since.elapsed()
    };
    let busy = async {
        let mut s = connect(listen).await;
        let started = Instant::now();
        let mut exchanges = 0;
        // A byte every 300 ms for 3 s keeps the connection up.
        while started.elapsed() < Duration::from_secs(3) && exchanges < 20 {
            let back = echo_once(&mut s, b".").await;
            assert_eq!(
                back.ok().as_deref(),
                Some(&b"."[..]),
                "busy connection failed after {:?}",
                started.elapsed()
            );
            exchanges += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(exchanges >= 5, "only {exchanges} exchanges in 3 s");
        started.elapsed()
    };
    let (idle_for, busy_for) = tokio::join!(idle, busy);
    assert!(
        idle_for >= Duration::from_millis(800) && idle_for <= Duration::from_secs(5),
        "the idle connection was closed after {idle_for:?}, idle_timeout is 1s"
    );
    assert!(busy_for >= Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_connections_all_echo() {
    raise_nofile();
    const N: usize = 2000;
    let echo = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let lb = start(
        &Raftlb::standalone_yaml(
            admin,
            listen,
            "    connect_timeout: 10s\n",
            "",
            &[("echo", echo)],
        ),
        admin,
    );

    let (done_tx, mut done_rx) = mpsc::channel::<Result<(), String>>(N);
    let (release_tx, release_rx) = watch::channel(false);
    let release_tx = Arc::new(release_tx);
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let done = done_tx.clone();
        let mut release = release_rx.clone();
        tasks.push(tokio::spawn(async move {
            let exchange = async {
                let mut s = timeout(Duration::from_secs(30), TcpStream::connect(listen))
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| format!("connect: {e}"))?;
                let msg = format!("connection {i:05} says hello\n");
                let back = echo_once(&mut s, msg.as_bytes())
                    .await
                    .map_err(|e| format!("echo: {e}"))?;
                if back != msg.as_bytes() {
                    return Err(format!(
                        "echo mismatch: {:?}",
                        String::from_utf8_lossy(&back)
                    ));
                }
                Ok(s)
            };
            let mut s = match exchange.await {
                Ok(s) => s,
                Err(e) => {
                    let _ = done.send(Err(format!("connection {i}: {e}"))).await;
                    return;
                }
            };
            let _ = done.send(Ok(())).await;
            // Hold the connection until every one has echoed, then close cleanly.
            let _ = timeout(Duration::from_secs(60), release.wait_for(|go| *go)).await;
            let _ = s.shutdown().await;
            let _ = read_until_closed(&mut s, Duration::from_secs(10)).await;
        }));
    }
    drop(done_tx);

    let mut ok = 0;
    let mut errors = Vec::new();
    let collected = timeout(Duration::from_secs(60), async {
        // Senders live until their connection closes, so count instead of waiting for None.
        while ok + errors.len() < N {
            match done_rx.recv().await {
                Some(Ok(())) => ok += 1,
                Some(Err(e)) => errors.push(e),
                None => break,
            }
        }
    })
    .await;
    let active = series(&lb, "raftlb_active_connections", &[("backend", "echo")]);
    let _ = release_tx.send(true);
    assert!(
        collected.is_ok(),
        "not all connections finished in 60 s: {ok} ok"
    );
    assert!(
        errors.is_empty(),
        "{} of {N} connections failed, first: {}",
        errors.len(),
        errors[0]
    );
    assert_eq!(ok, N);
    assert_eq!(
        active, N as f64,
        "active_connections while all {N} are open"
    );
    for t in tasks {
        timeout(Duration::from_secs(30), t)
            .await
            .expect("a connection did not close")
            .expect("connection task");
    }
}
