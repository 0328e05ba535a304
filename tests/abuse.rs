//! Abuse of the exposed ports with real sockets against real `raftlb` processes:
//! floods of half-open peer frames, admin connections that never finish, and the
//! resources they cost. The cases run one at a time (they measure a process's memory
//! and descriptors, and each opens about a thousand sockets), each bounded in time.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Held by every case: they run one at a time whatever `--test-threads` says.
/// (An async lock: a case holds it across its awaits, and a failed case does not
/// poison it for the next.)
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sends one peer frame holding `body` and reads the reply frame, within 5 s.
async fn peer_call(s: &mut TcpStream, body: &Value) -> std::io::Result<Value> {
    let bytes = body.to_string();
    s.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    s.write_all(bytes.as_bytes()).await?;
    let read = async {
        let len = s.read_u32().await?;
        let mut reply = vec![0; len as usize];
        s.read_exact(&mut reply).await?;
        serde_json::from_slice(&reply).map_err(std::io::Error::other)
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::other("no reply within 5 s"))?
}

/// Drains `s` until the other side closes it; when that happened, or None if it did
/// not within `limit`.
async fn closed_within(mut s: TcpStream, limit: Duration) -> Option<Instant> {
    let mut sink = [0u8; 256];
    let read = async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_port_flood_of_announced_frames_costs_little_and_the_cluster_keeps_committing() {
    let _one = ONE_AT_A_TIME.lock().await;
    raise_nofile();
    let backends = vec![
        ("b1".to_string(), named_backend("b1").await),
        ("b2".to_string(), named_backend("b2").await),
    ];
    let cluster = Cluster::new(3, backends);
    let (replicas, leader) = blocking(|| cluster.start_all_with(""));
    let target = &replicas[leader];
    let peer = cluster.addrs[leader].peer;
    let admin = cluster.addrs[leader].admin;
    let pid = target.pid();
    let (hwm_before, rss_before) = memory_kib(pid);
    let fds_before = open_fds(pid);

    // A client that delivers an accepted frame first (as a replica's kept-open
    // connection does) from the same source address as the flood.
    let hello =
        serde_json::json!({"cluster_id": "test", "uuid": null, "from": 99, "body": "Hello"});
    let mut kept = TcpStream::connect(peer).await.expect("connect");
    let reply = peer_call(&mut kept, &hello).await.expect("hello answered");
    assert!(reply["body"]["Hello"].is_object(), "{reply}");

    // 1,000 connections, each announcing a 16 MiB frame and sending nothing more.
    let probe = Probe::start(admin);
    let started = Instant::now();
    let mut watchers = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(peer).await.expect("flood connect");
        s.write_all(&(16u32 << 20).to_be_bytes())
            .await
            .expect("announce");
        watchers.push(tokio::spawn(closed_within(s, Duration::from_secs(20))));
    }
    let flooded = started.elapsed();

    // The cluster keeps committing writes through the flooded replica.
    for i in 0..6 {
        let action = if i % 2 == 0 { "drain" } else { "undrain" };
        let path = format!("/api/v1/pools/web/backends/b1/{action}");
        let (code, body) = blocking(|| json(admin, "POST", &path, ""));
        assert_eq!(code, 200, "write {i} during the flood: {body}");
    }
    // The data path shares the process's descriptors: it still proxies (to b2
    // whenever b1 is drained).
    let listen = cluster.addrs[leader].listen;
    let name = which_backend(listen, None)
        .await
        .expect("the data path during the peer flood");
    assert!(name == "b1" || name == "b2", "{name}");
    let answered = probe.finish("peer flood (1,000 connections announcing 16 MiB)");
    assert_kept_answering("peer flood", answered);
    let (hwm_flood, rss_flood) = memory_kib(pid);
    let fds_flood = open_fds(pid);

    let mut closed = Vec::new();
    for w in watchers {
        closed.push(w.await.expect("watcher"));
    }
    let all_closed = closed.iter().all(Option::is_some);
    let cut_early = closed
        .iter()
        .flatten()
        .filter(|at| at.duration_since(started) < Duration::from_secs(8))
        .count();
    let last_close = closed
        .iter()
        .flatten()
        .map(|at| at.duration_since(started))
        .max();

    // The connection that delivered an accepted frame is still served after 10 s.
    let reply = peer_call(&mut kept, &hello)
        .await
        .expect("the kept connection still answers");
    assert!(reply["body"]["Hello"].is_object(), "{reply}");

    let (hwm_after, _) = memory_kib(pid);
    let fds_after = blocking(|| {
        eventually(Duration::from_secs(5), || open_fds(pid) <= fds_before + 20);
        open_fds(pid)
    });
    println!(
        "peer flood: 1000 connections opened in {flooded:?}; VmHWM {hwm_before} -> {hwm_after} KiB \
         (+{} KiB), VmRSS {rss_before} -> {rss_flood} KiB during; fds {fds_before} -> {fds_flood} \
         during -> {fds_after} after; closed early (pushed out) {cut_early}, last closed at {last_close:?}",
        hwm_after.saturating_sub(hwm_before)
    );
    assert!(
        target.child.id() == pid && blocking(|| http_get(admin, "/healthz")).is_ok(),
        "the replica is alive"
    );
    assert!(
        hwm_after.saturating_sub(hwm_before) <= 64 * 1024,
        "the flood raised the peak RSS by {} KiB (during: {hwm_flood} KiB)",
        hwm_after - hwm_before
    );
    assert!(all_closed, "some flood connections were never closed");
    assert!(
        cut_early >= 1000 - 64,
        "only {cut_early} of 1000 stale connections were pushed out before the 10 s limit"
    );
    assert!(
        fds_after <= fds_before + 20,
        "descriptors {fds_before} before, {fds_after} after"
    );
}

/// `/healthz` latencies measured in a loop on a thread of its own until stopped.
struct Probe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<Duration>, usize)>,
}

impl Probe {
    fn start(admin: SocketAddr) -> Probe {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (Vec::new(), 0);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let t = Instant::now();
                match http_get(admin, "/healthz") {
                    Ok((200, _)) => ok.push(t.elapsed()),
                    _ => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        });
        Probe { stop, thread }
    }

    /// Stops probing; prints and returns (answered, failed, p99).
    fn finish(self, what: &str) -> (usize, usize, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut ok, failed) = self.thread.join().expect("probe thread");
        ok.sort();
        let p99 = ok
            .get((ok.len() * 99).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or_default();
        println!(
            "{what}: /healthz answered {} times, failed {failed}, p99 {p99:?}",
            ok.len()
        );
        (ok.len(), failed, p99)
    }
}

/// `/healthz` answered nearly every probe (timings are printed, not asserted).
fn assert_kept_answering(what: &str, (answered, failed, _): (usize, usize, Duration)) {
    assert!(
        answered > 0 && failed * 10 <= answered + failed,
        "{what}: /healthz answered {answered}, failed {failed}"
    );
}

/// One round trip through the proxy: the data path still accepts.
async fn data_path_echoes(listen: SocketAddr, what: &str) {
    let mut s = connect_from(None, listen)
        .await
        .unwrap_or_else(|e| panic!("{what}: the data path refused a connection: {e}"));
    let back = echo_once(&mut s, b"still here")
        .await
        .unwrap_or_else(|e| panic!("{what}: no echo through the proxy: {e}"));
    assert_eq!(back, b"still here");
}

/// Waits until every stream in `held` is closed by the server (or `limit` passes);
/// how many were.
async fn count_closed(held: Vec<TcpStream>, limit: Duration) -> usize {
    let watchers: Vec<_> = held
        .into_iter()
        .map(|s| tokio::spawn(closed_within(s, limit)))
        .collect();
    let mut closed = 0;
    for w in watchers {
        if matches!(w.await, Ok(Some(_))) {
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_floods_leave_healthz_and_the_data_path_answering() {
    let _one = ONE_AT_A_TIME.lock().await;
    raise_nofile();
    let backend = echo_backend().await;
    let admin = loopback();
    let listen = loopback();
    let yaml = Raftlb::standalone_yaml(admin, listen, "", "", &[("echo", backend)]);
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    let pid = lb.pid();
    let fds_before = open_fds(pid);
    let quiet = Probe::start(admin);
    tokio::time::sleep(Duration::from_secs(1)).await;
    quiet.finish("no abuse");

    // Slowloris: 300 connections (more than the 256 served at once) each sending a
    // request head a byte a second. Closed by the 10 s head timeout, or earlier to
    // make room for newer ones.
    let probe = Probe::start(admin);
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(admin).await.expect("connect");
        let _ = s.write_all(b"G").await;
        slow.push(s);
    }
    let head = b"ET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n";
    let mut open_after = 0;
    for byte in head.iter().take(13) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        open_after = 0;
        for s in &mut slow {
            if s.write_all(&[*byte]).await.is_ok() {
                open_after += 1;
            }
        }
    }
    data_path_echoes(listen, "slowloris").await;
    let closed = count_closed(slow, Duration::from_secs(5)).await;
    let answered = probe.finish("slowloris (300 connections, a byte a second)");
    println!(
        "slowloris: {closed} of 300 closed by the server within {:?}",
        started.elapsed()
    );
    assert_kept_answering("slowloris", answered);
    assert_eq!(
        closed, 300,
        "slow heads are closed (writes still accepted at the end: {open_after})"
    );

    // 1,000 idle connections at once: at most 256 are kept, and those are closed by
    // the head timeout.
    let probe = Probe::start(admin);
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(admin).await.expect("connect"));
    }
    let fds_flood = open_fds(pid);
    data_path_echoes(listen, "1,000 idle admin connections").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds_held = open_fds(pid);
    let closed = count_closed(idle, Duration::from_secs(15)).await;
    let answered = probe.finish("1,000 idle admin connections");
    println!(
        "idle flood: raftlb fds {fds_before} before, {fds_flood} during, {fds_held} after 2 s; {closed} of 1000 closed by the server"
    );
    assert_kept_answering("idle flood", answered);
    assert_eq!(closed, 1000, "idle connections are closed");
    assert!(
        fds_held <= fds_before + 256 + 20,
        "at most 256 admin connections held: {fds_held} descriptors"
    );

    // Oversized heads and bodies, 20 at a time.
    let probe = Probe::start(admin);
    let mut answers = Vec::new();
    for round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..20 {
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(admin).await.ok()?;
                let request = if i % 2 == 0 {
                    let big = "a".repeat(1 << 20);
                    format!("GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {big}\r\n\r\n")
                        .into_bytes()
                } else {
                    let mut r = format!(
                        "PUT /api/v1/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        10 << 20
                    )
                    .into_bytes();
                    r.extend(std::iter::repeat_n(b'[', 10 << 20));
                    r
                };
                let _ = s.write_all(&request).await;
                let mut reply = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply)).await;
                Some(String::from_utf8_lossy(&reply).lines().next()?.to_string())
            }));
        }
        for t in tasks {
            answers.push(t.await.expect("task"));
        }
        data_path_echoes(listen, &format!("oversized requests, round {round}")).await;
    }
    let answered = probe.finish("oversized heads (1 MiB) and bodies (10 MiB)");
    println!("oversized: first lines {:?}", {
        let mut seen: Vec<_> = answers.iter().map(|a| format!("{a:?}")).collect();
        seen.sort();
        seen.dedup();
        seen
    });
    assert_kept_answering("oversized", answered);
    for a in answers.iter().flatten() {
        assert!(a.starts_with("HTTP/1.1 4"), "an oversized request got {a}");
    }

    let fds_after = blocking(|| {
        eventually(Duration::from_secs(5), || open_fds(pid) <= fds_before + 20);
        open_fds(pid)
    });
    println!("admin abuse: raftlb fds {fds_before} before, {fds_after} after");
    assert!(
        fds_after <= fds_before + 20,
        "{fds_after} descriptors after"
    );
    assert!(http_get(admin, "/healthz").is_ok_and(|(c, _)| c == 200));
}

/// A backend that accepts and never reads or answers; keeps its sockets until the
/// runtime ends.
async fn silent_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
            held.retain(|s| s.peer_addr().is_ok());
        }
    });
    addr
}

/// A backend that writes to every connection as fast as it can, for up to 30 s.
async fn firehose_backend() -> SocketAddr {
    serve_each(|mut s| async move {
        let chunk = vec![b'x'; 64 << 10];
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while s.write_all(&chunk).await.is_ok() {}
        })
        .await;
    })
    .await
}

/// One round of data-path abuse; prints what it measured and returns raftlb's VmRSS
/// (KiB) while the 5,000 idle, the stalled and the deaf connections were all open.
async fn data_path_round(
    round: usize,
    pid: u32,
    admin: SocketAddr,
    idle: SocketAddr,
    capped: SocketAddr,
    stall: SocketAddr,
    firehose: SocketAddr,
) -> u64 {
    let probe = Probe::start(admin);
    // 5,000 idle proxied connections (two descriptors each in raftlb).
    let mut held = Vec::new();
    for _ in 0..5000 {
        match connect_from(None, idle).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("round {round}: idle connection {}: {e}", held.len()),
        }
    }
    // raftlb accepts from its backlog and dials the backend at its own pace.
    let fds_idle = blocking(|| {
        eventually(Duration::from_secs(20), || open_fds(pid) >= 10_000);
        open_fds(pid)
    });
    data_path_echoes(idle, "5,000 idle proxied connections").await;

    // 300 connections at a listener capped at 100: the rest are accepted and closed.
    let mut over = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = connect_from(None, capped).await {
            over.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut kept = 0;
    for s in &mut over {
        let mut b = [0u8; 1];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await
            && n == 0
        {
            continue;
        }
        kept += 1;
    }

    // 200 clients whose backend never answers, 50 clients that never read a backend
    // that never stops writing. (A client's FIN is passed on as a half-close, and the
    // silent backend never closes its side: like HAProxy until its server timeout,
    // raftlb holds such a connection until idle_timeout, 5 s on this listener.)
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut s = connect_from(None, stall).await.expect("stall connect");
        let _ = s.write_all(b"hello?").await;
        stalled.push(s);
    }
    let mut deaf = Vec::new();
    for _ in 0..50 {
        deaf.push(
            connect_from(None, firehose)
                .await
                .expect("firehose connect"),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, rss_loaded) = memory_kib(pid);
    data_path_echoes(idle, "stalled and deaf clients").await;
    let answered = probe.finish(&format!("data path round {round}"));
    assert_kept_answering("data path", answered);
    drop((held, over, stalled, deaf));
    println!(
        "data path round {round}: fds with 5,000 idle {fds_idle}; kept at the capped listener {kept} of 300; VmRSS with stalled and deaf clients {rss_loaded} KiB"
    );
    assert!(
        kept <= 100 + 5,
        "{kept} connections kept past max_connections 100"
    );
    assert!(
        fds_idle >= 10_000,
        "5,000 proxied connections hold {fds_idle} descriptors?"
    );
    rss_loaded
}

/// Rounds of the data-path abuse: `ABUSE_ROUNDS`, 3 unless told (at least 2).
fn data_path_rounds() -> usize {
    std::env::var("ABUSE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(2)
}

/// How far RSS may be above its level after the first round, after each later round
/// and while loaded: the same abuse again must find the memory the first one left.
/// (Before the relay gave its buffers back while waiting, each round added 12-30 MiB.)
const RSS_MARGIN_KIB: u64 = 8 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_path_floods_and_stalls_give_back_descriptors_and_memory() {
    let _one = ONE_AT_A_TIME.lock().await;
    raise_nofile();
    let echo = echo_backend().await;
    let silent = silent_backend().await;
    let hose = firehose_backend().await;
    let admin = loopback();
    let (idle, capped, stall, firehose) = (loopback(), loopback(), loopback(), loopback());
    let yaml = format!(
        "admin: {{ bind: {admin} }}\nruntime: {{ worker_threads: 2 }}\nlisteners:\n  \
         idle: {{ bind: {idle}, pool: echo, max_connections: 6000 }}\n  \
         capped: {{ bind: {capped}, pool: echo, max_connections: 100 }}\n  \
         stall: {{ bind: {stall}, pool: silent, max_connections: 1000, idle_timeout: 5s }}\n  \
         firehose: {{ bind: {firehose}, pool: hose, max_connections: 1000 }}\n\
         pools:\n  echo:\n    backends: [{{ name: e, address: \"{echo}\" }}]\n  \
         silent:\n    backends: [{{ name: s, address: \"{silent}\" }}]\n  \
         hose:\n    backends: [{{ name: h, address: \"{hose}\" }}]\n"
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    let pid = lb.pid();
    let fds_before = open_fds(pid);
    let (_, rss_before) = memory_kib(pid);
    let mut rss_after = Vec::new();
    let mut rss_loaded = Vec::new();
    for round in 1..=data_path_rounds() {
        rss_loaded.push(data_path_round(round, pid, admin, idle, capped, stall, firehose).await);
        let fds = blocking(|| {
            eventually(Duration::from_secs(15), || open_fds(pid) <= fds_before + 20);
            open_fds(pid)
        });
        let (hwm, rss) = memory_kib(pid);
        println!(
            "data path round {round}: fds {fds_before} before, {fds} after; VmRSS {rss} KiB, VmHWM {hwm} KiB"
        );
        assert!(
            fds <= fds_before + 20,
            "round {round}: {fds} descriptors, {fds_before} before"
        );
        rss_after.push(rss);
    }
    println!(
        "data path: VmRSS {rss_before} KiB before, loaded in each round {rss_loaded:?} KiB, after each round {rss_after:?} KiB"
    );
    // Allocators keep freed memory, so RSS is not compared with the baseline: the
    // first round may raise it, a later one only within the margin.
    let first = rss_after[0];
    for (i, (&after, &loaded)) in rss_after.iter().zip(&rss_loaded).enumerate().skip(1) {
        assert!(
            after <= first + RSS_MARGIN_KIB,
            "round {}: VmRSS {after} KiB after it, {first} KiB after round 1 (all: {rss_after:?})",
            i + 1
        );
        assert!(
            loaded <= rss_loaded[0] + RSS_MARGIN_KIB,
            "round {}: VmRSS {loaded} KiB loaded, {} KiB in round 1 (all: {rss_loaded:?})",
            i + 1,
            rss_loaded[0]
        );
    }
    assert!(lb.log().lines().count() > 0);
}
