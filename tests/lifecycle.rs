//! Process lifecycle (SPEC.md "Shutdown", "What is replicated" for standalone SIGHUP):
//! SIGTERM drains, shutdown_grace cuts what is left, a second signal exits at once,
//! SIGHUP applies a new file without dropping connections and keeps the running
//! config when the file is invalid.

mod common;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

const MB: usize = 1024 * 1024;

fn start(yaml: &str, admin: SocketAddr) -> Raftlb {
    blocking(|| Raftlb::start(yaml, admin))
}

/// A standalone config: `listeners` (name, bind) all on pool `web` in front of `backends`.
fn config(
    admin: SocketAddr,
    shutdown_grace: &str,
    listeners: &[(&str, SocketAddr)],
    backends: &[(&str, SocketAddr)],
) -> String {
    let mut y = format!(
        "admin:\n  bind: {admin}\nruntime:\n  worker_threads: 2\n  shutdown_grace: {shutdown_grace}\nlisteners:\n"
    );
    for (name, bind) in listeners {
        y.push_str(&format!("  {name}:\n    bind: {bind}\n    pool: web\n"));
    }
    y.push_str("pools:\n  web:\n    backends:\n");
    for (name, addr) in backends {
        y.push_str(&format!(
            "      - {{ name: {name}, address: \"{addr}\" }}\n"
        ));
    }
    y
}

async fn connect(addr: SocketAddr) -> TcpStream {
    timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Waits up to `limit` for the peer to close (EOF or reset); Err if it stays open.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return Err(format!("still open after {limit:?}")),
            Ok(Ok(0) | Err(_)) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

/// `GET /readyz`: the status code, or None when the admin port does not answer.
fn readyz(lb: &Raftlb) -> Option<u16> {
    http_get(lb.admin, "/readyz").ok().map(|(code, _)| code)
}

fn get_json(lb: &Raftlb, path: &str) -> Value {
    let (code, body) = blocking(|| http_get(lb.admin, path)).expect("admin request");
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// A backend that greets every connection with `name` and a newline, then echoes.
async fn greeting_echo_backend(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let greeting = format!("{name}\n");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if s.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A connection through `listen` and the greeting of the backend it reached.
async fn greeted(listen: SocketAddr) -> io::Result<(BufReader<TcpStream>, String)> {
    let s = timeout(Duration::from_secs(5), TcpStream::connect(listen))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let mut s = BufReader::new(s);
    let mut line = String::new();
    timeout(Duration::from_secs(5), s.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no greeting within 5 s"))??;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before the greeting",
        ));
    }
    Ok((s, line.trim().to_string()))
}

/// Which backend a new connection through `listen` reaches.
async fn backend_of_new_connection(listen: SocketAddr) -> io::Result<String> {
    greeted(listen).await.map(|(_, name)| name)
}

/// Polls the async `check` every 25 ms until it holds or `limit` passes.
async fn eventually_async<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// True when a new connection to `addr` is refused, or closed without a byte of data.
async fn refused(addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) = timeout(Duration::from_secs(2), TcpStream::connect(addr)).await else {
        return true;
    };
    let mut byte = [0u8; 1];
    matches!(
        timeout(Duration::from_secs(2), s.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn byte_at(i: usize) -> u8 {
    ((i as u64).wrapping_mul(0x9e37_79b9) >> 11) as u8
}

/// A backend that sends `first` bytes at once, waits for `release`, then streams the
/// remaining `total - first` bytes slowly (64 KiB every 5 ms) and closes. Counts accepts.
async fn gated_stream_backend(
    first: usize,
    total: usize,
    release: watch::Receiver<bool>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut release = release.clone();
            tokio::spawn(async move {
                let data: Vec<u8> = (0..total).map(byte_at).collect();
                if s.write_all(&data[..first]).await.is_err() {
                    return;
                }
                if release.wait_for(|go| *go).await.is_err() {
                    return;
                }
                for chunk in data[first..].chunks(64 * 1024) {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let _ = s.shutdown().await;
                let mut sink = [0u8; 64];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, accepted)
}

/// Waits up to `within` for raftlb to exit and asserts it exited with code 0.
fn assert_exits_0(lb: &mut Raftlb, within: Duration, otherwise: &str) {
    let status = blocking(|| lb.wait_exit(within));
    let status = status.unwrap_or_else(|| panic!("raftlb {otherwise}:\n{}", lb.log()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}:\n{}",
        lb.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_drains_the_open_transfer_then_exits_0() {
    raise_nofile();
    const TOTAL: usize = 20 * MB;
    const FIRST: usize = 4 * MB;
    let (release_tx, release_rx) = watch::channel(false);
    let (backend, accepted) = gated_stream_backend(FIRST, TOTAL, release_rx).await;
    let (admin, listen) = (loopback(), loopback());
    let mut lb = start(
        &config(admin, "30s", &[("front", listen)], &[("stream", backend)]),
        admin,
    );

    let received = Arc::new(AtomicUsize::new(0));
    let progress = received.clone();
    let mut client = connect(listen).await;
    let transfer = tokio::spawn(async move {
        let mut got = Vec::with_capacity(TOTAL);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = client.read(&mut buf).await?;
            if n == 0 {
                return io::Result::Ok(got);
            }
            got.extend_from_slice(&buf[..n]);
            progress.store(got.len(), Ordering::SeqCst);
        }
    });
    let midway = eventually_async(Duration::from_secs(20), || async {
        received.load(Ordering::SeqCst) >= FIRST
    })
    .await;
    assert!(midway, "the first {FIRST} bytes did not arrive within 20 s");

    blocking(|| lb.signal("TERM"));

    let not_ready = blocking(|| {
        eventually(Duration::from_secs(5), || {
            matches!(readyz(&lb), None | Some(503))
        })
    });
    assert!(
        not_ready,
        "/readyz still answers {:?} 5 s after SIGTERM",
        blocking(|| readyz(&lb))
    );
    assert!(
        eventually_async(Duration::from_secs(5), || refused(listen)).await,
        "the listener still accepts and proxies new connections 5 s after SIGTERM"
    );
    // Once closed, it stays closed.
    for _ in 0..5 {
        assert!(refused(listen).await, "the listener accepted again");
    }
    let accepts_at_close = accepted.load(Ordering::SeqCst);
    assert!(refused(listen).await);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        accepts_at_close,
        "a connection made after the listener closed reached the backend"
    );

    // The transfer is held at the gate: the process must still be draining it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        lb.child.try_wait().expect("try_wait").is_none(),
        "raftlb exited with an open connection and 30 s of shutdown_grace left:\n{}",
        lb.log()
    );
    assert!(
        !transfer.is_finished(),
        "the in-flight transfer ended at SIGTERM"
    );

    release_tx.send(true).expect("release the backend");
    let got = timeout(Duration::from_secs(60), transfer)
        .await
        .expect("the transfer did not finish within 60 s of the release")
        .expect("transfer task")
        .expect("read the transfer");
    assert_eq!(
        got.len(),
        TOTAL,
        "bytes received through the draining proxy"
    );
    let first_bad = got.iter().enumerate().position(|(i, &b)| b != byte_at(i));
    assert_eq!(first_bad, None, "the transfer arrived corrupted");

    assert_exits_0(
        &mut lb,
        Duration::from_secs(15),
        "did not exit within 15 s of its last connection closing",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_expiry_cuts_idle_connections_and_exits_0() {
    raise_nofile();
    let backend = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let mut lb = start(
        &config(admin, "1s", &[("front", listen)], &[("echo", backend)]),
        admin,
    );
    let mut held = connect(listen).await;
    assert_eq!(echo_once(&mut held, b"before").await.unwrap(), b"before");

    let signalled = Instant::now();
    blocking(|| lb.signal("TERM"));
    let draining = blocking(|| {
        eventually(Duration::from_secs(5), || {
            matches!(readyz(&lb), None | Some(503))
        })
    });
    assert!(draining, "/readyz still 200 after SIGTERM");
    // Within the grace the held connection still works.
    assert_eq!(
        echo_once(&mut held, b"during grace").await.unwrap(),
        b"during grace",
        "the connection stopped relaying right after SIGTERM, before shutdown_grace"
    );

    let cut = closed_within(&mut held, Duration::from_secs(10)).await;
    assert!(
        cut.is_ok(),
        "idle connection not cut after shutdown_grace 1s: {cut:?}"
    );
    assert_exits_0(
        &mut lb,
        Duration::from_secs(10),
        "still running 10 s after shutdown_grace 1s expired",
    );
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "exited {:?} after SIGTERM, before shutdown_grace (1s) was over",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once() {
    raise_nofile();
    let backend = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let mut lb = start(
        &config(admin, "30s", &[("front", listen)], &[("echo", backend)]),
        admin,
    );
    let mut held = connect(listen).await;
    assert_eq!(echo_once(&mut held, b"hold").await.unwrap(), b"hold");

    blocking(|| lb.signal("TERM"));
    let draining = blocking(|| {
        eventually(Duration::from_secs(5), || {
            matches!(readyz(&lb), None | Some(503))
        })
    });
    assert!(draining, "/readyz still 200 after SIGTERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        lb.child.try_wait().expect("try_wait").is_none(),
        "raftlb exited on the first signal with a connection open and 30 s of grace:\n{}",
        lb.log()
    );

    blocking(|| lb.signal("INT"));
    let status = blocking(|| lb.wait_exit(Duration::from_secs(3)));
    let status = status.unwrap_or_else(|| {
        panic!(
            "raftlb still running 3 s after a second signal:\n{}",
            lb.log()
        )
    });
    assert!(
        status.code().is_some(),
        "raftlb was killed by the second signal instead of exiting: {status}"
    );
    assert!(
        closed_within(&mut held, Duration::from_secs(5))
            .await
            .is_ok(),
        "the held connection survived the process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_backends_and_listeners_without_dropping_connections() {
    raise_nofile();
    let a = greeting_echo_backend("A").await;
    let b = greeting_echo_backend("B").await;
    let (admin, listen, extra) = (loopback(), loopback(), loopback());
    let lb = start(
        &config(admin, "10s", &[("front", listen)], &[("a", a)]),
        admin,
    );
    let before = get_json(&lb, "/api/v1/backends")["config_version"]
        .as_u64()
        .expect("config_version");

    let (mut to_a, name) = greeted(listen).await.expect("connect through raftlb");
    assert_eq!(name, "A");
    assert_eq!(echo_once(&mut to_a, b"one").await.unwrap(), b"one");

    // Pool web: A -> B.
    blocking(|| lb.rewrite_config(&config(admin, "10s", &[("front", listen)], &[("b", b)])));
    blocking(|| lb.signal("HUP"));
    let switched = eventually_async(Duration::from_secs(10), || async {
        backend_of_new_connection(listen).await.ok().as_deref() == Some("B")
    })
    .await;
    assert!(
        switched,
        "new connections do not reach B after SIGHUP:\n{}",
        lb.log()
    );
    for _ in 0..10 {
        assert_eq!(
            backend_of_new_connection(listen).await.unwrap(),
            "B",
            "a new connection reached the removed backend A"
        );
    }
    assert_eq!(
        echo_once(&mut to_a, b"still here").await.unwrap(),
        b"still here",
        "the connection to A was dropped by the reload"
    );

    let backends = get_json(&lb, "/api/v1/backends");
    let after = backends["config_version"].as_u64().expect("config_version");
    assert!(
        after > before,
        "config_version {before} -> {after} after a reload"
    );
    let pool = &backends["pools"][0];
    assert_eq!(pool["name"], "web");
    let list = pool["backends"].as_array().expect("backends array");
    assert_eq!(list.len(), 1, "backends after the reload: {backends}");
    assert_eq!(list[0]["name"], "b");
    assert_eq!(list[0]["address"], b.to_string());
    assert_eq!(
        get_json(&lb, "/api/v1/status")["config_version"].as_u64(),
        Some(after)
    );

    // A second listener appears on SIGHUP ...
    assert!(
        refused(extra).await,
        "port {extra} in use before the reload"
    );
    blocking(|| {
        lb.rewrite_config(&config(
            admin,
            "10s",
            &[("front", listen), ("extra", extra)],
            &[("b", b)],
        ))
    });
    blocking(|| lb.signal("HUP"));
    let listening = eventually_async(Duration::from_secs(10), || async {
        backend_of_new_connection(extra).await.ok().as_deref() == Some("B")
    })
    .await;
    assert!(
        listening,
        "the listener added by SIGHUP does not serve:\n{}",
        lb.log()
    );
    assert_eq!(backend_of_new_connection(listen).await.unwrap(), "B");

    // ... and goes away on the next one.
    blocking(|| lb.rewrite_config(&config(admin, "10s", &[("front", listen)], &[("b", b)])));
    blocking(|| lb.signal("HUP"));
    assert!(
        eventually_async(Duration::from_secs(10), || refused(extra)).await,
        "the listener removed by SIGHUP still accepts:\n{}",
        lb.log()
    );
    assert_eq!(backend_of_new_connection(listen).await.unwrap(), "B");
    assert_eq!(echo_once(&mut to_a, b"three").await.unwrap(), b"three");

    // What only a restart applies is named, not silently kept.
    let renamed = format!(
        "node: {{ name: renamed }}\n{}",
        config(admin, "10s", &[("front", listen)], &[("b", b)])
    )
    .replace("worker_threads: 2", "worker_threads: 1");
    blocking(|| lb.rewrite_config(&renamed));
    blocking(|| lb.signal("HUP"));
    for said in ["node.name", "runtime.worker_threads"] {
        let line = format!("reload: {said} changed; it takes effect at the next restart");
        assert!(
            eventually(Duration::from_secs(10), || lb.log().contains(&line)),
            "{line:?} not logged:\n{}",
            lb.log()
        );
    }
    assert!(
        !lb.log().contains("reload: admin.bind changed"),
        "{}",
        lb.log()
    );

    let ok = blocking(|| lb.metric("raftlb_config_reloads_total{result=\"ok\"}"));
    assert_eq!(ok, 4.0, "raftlb_config_reloads_total{{result=\"ok\"}}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_invalid_file_keeps_the_running_config() {
    raise_nofile();
    let a = greeting_echo_backend("A").await;
    let b = greeting_echo_backend("B").await;
    let (admin, listen) = (loopback(), loopback());
    let mut lb = start(
        &config(admin, "10s", &[("front", listen)], &[("a", a)]),
        admin,
    );
    let before = get_json(&lb, "/api/v1/status")["config_version"]
        .as_u64()
        .expect("config_version");
    let (mut held, name) = greeted(listen).await.expect("connect through raftlb");
    assert_eq!(name, "A");

    // Valid apart from one unknown key; applied, it would send everything to B.
    let invalid = format!(
        "bogus_key: 1\n{}",
        config(admin, "10s", &[("front", listen)], &[("b", b)])
    );
    blocking(|| lb.rewrite_config(&invalid));
    blocking(|| lb.signal("HUP"));
    let counted = blocking(|| {
        eventually(Duration::from_secs(10), || {
            lb.metric("raftlb_config_reloads_total{result=\"invalid\"}") >= 1.0
        })
    });
    assert!(
        counted,
        "no raftlb_config_reloads_total{{result=\"invalid\"}} after SIGHUP with an invalid file:\n{}",
        lb.log()
    );
    assert_eq!(
        blocking(|| lb.metric("raftlb_config_reloads_total{result=\"invalid\"}")),
        1.0
    );
    assert_eq!(
        blocking(|| lb.metric("raftlb_config_reloads_total{result=\"ok\"}")),
        0.0
    );

    assert!(
        lb.child.try_wait().expect("try_wait").is_none(),
        "raftlb exited on an invalid reload:\n{}",
        lb.log()
    );
    assert_eq!(blocking(|| readyz(&lb)), Some(200));
    for _ in 0..10 {
        assert_eq!(
            backend_of_new_connection(listen).await.unwrap(),
            "A",
            "the invalid file was applied"
        );
    }
    assert_eq!(echo_once(&mut held, b"still").await.unwrap(), b"still");
    assert_eq!(
        get_json(&lb, "/api/v1/status")["config_version"].as_u64(),
        Some(before),
        "config_version changed on an invalid reload"
    );
    let log = lb.log();
    assert!(
        log.contains("bogus_key"),
        "the log does not name the offending key:\n{log}"
    );
    // One line per event: the error and "keeping the running config" together.
    assert!(
        log.lines()
            .any(|l| l.contains("reload: the file is invalid")
                && l.contains("bogus_key")
                && l.contains("keeping the running config")),
        "{log}"
    );

    // A section that applies at the next restart is checked as a restart would:
    // admin.tls naming files that do not exist is refused now, not at the restart.
    let later = config(admin, "10s", &[("front", listen)], &[("b", b)]).replace(
        &format!("admin:\n  bind: {admin}\n"),
        &format!(
            "admin:\n  bind: {admin}\n  tls: {{ cert: /nonexistent/admin.crt, key: /nonexistent/admin.key }}\n"
        ),
    );
    assert!(later.contains("admin.crt"), "{later}");
    blocking(|| lb.rewrite_config(&later));
    blocking(|| lb.signal("HUP"));
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || {
            lb.metric("raftlb_config_reloads_total{result=\"invalid\"}") >= 2.0
        })),
        "admin.tls with missing files was not refused:\n{}",
        lb.log()
    );
    assert_eq!(
        blocking(|| lb.metric("raftlb_config_reloads_total{result=\"ok\"}")),
        0.0
    );
    assert_eq!(backend_of_new_connection(listen).await.unwrap(), "A");

    // Fixing the file and sending SIGHUP again applies it.
    blocking(|| lb.rewrite_config(&config(admin, "10s", &[("front", listen)], &[("b", b)])));
    blocking(|| lb.signal("HUP"));
    let switched = eventually_async(Duration::from_secs(10), || async {
        backend_of_new_connection(listen).await.ok().as_deref() == Some("B")
    })
    .await;
    assert!(
        switched,
        "the corrected file was not applied:\n{}",
        lb.log()
    );
    assert_eq!(
        get_json(&lb, "/api/v1/status")["config_version"].as_u64(),
        Some(before + 1)
    );
    assert!(lb.child.try_wait().expect("try_wait").is_none());
}

/// max_connections counts a listener's connections across a reload that moves it:
/// those through its old address carry on, and still count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_listener_counts_its_carried_connections_against_max_connections() {
    raise_nofile();
    let a = greeting_echo_backend("A").await;
    let (admin, first, second) = (loopback(), loopback(), loopback());
    let limited = |bind| {
        config(admin, "10s", &[("front", bind)], &[("a", a)])
            .replace("    pool: web\n", "    pool: web\n    max_connections: 2\n")
    };
    let lb = start(&limited(first), admin);
    let (held1, _) = greeted(first).await.expect("first connection");
    let (held2, _) = greeted(first).await.expect("second connection");
    assert!(greeted(first).await.is_err(), "a third is over the limit");

    blocking(|| lb.rewrite_config(&limited(second)));
    blocking(|| lb.signal("HUP"));
    let ok = || lb.metric("raftlb_config_reloads_total{result=\"ok\"}");
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || ok() == 1.0)),
        "{}",
        lb.log()
    );
    assert!(
        greeted(second).await.is_err(),
        "two connections through the old address are open: a new one is over the limit"
    );
    drop(held1);
    let mut admitted = false;
    for _ in 0..50 {
        if greeted(second).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "one old connection closed, a new one fits");
    drop(held2);
}

/// A reload that moves a listener onto an address it cannot listen on (another
/// program holds it) is refused whole: the listener keeps its address and the
/// reload counts as invalid. Two listeners swapping ports are refused the same way,
/// with the advice to move them one reload at a time. A listener moving from its
/// wildcard address to a specific one on the same port (its own socket holds it)
/// opens there once its old socket is closed; so does a listener renamed on the same
/// address (the removed name closes first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_onto_a_busy_address_keeps_the_listener_where_it_was() {
    raise_nofile();
    let a = greeting_echo_backend("A").await;
    let (admin, first, second) = (loopback(), loopback(), loopback());
    let lb = start(
        &config(
            admin,
            "10s",
            &[("front", first), ("side", second)],
            &[("a", a)],
        ),
        admin,
    );
    // Another program listens on `busy`.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = holder.local_addr().expect("address");
    let reloads = |result: &str| {
        lb.metric(&format!(
            "raftlb_config_reloads_total{{result=\"{result}\"}}"
        ))
    };
    // Reloads with these listeners, and waits until `result` has counted `count`.
    let reload = |listeners: &[(&str, SocketAddr)], result: &str, count: f64| {
        blocking(|| lb.rewrite_config(&config(admin, "10s", listeners, &[("a", a)])));
        blocking(|| lb.signal("HUP"));
        assert!(
            blocking(|| eventually(Duration::from_secs(10), || reloads(result) == count)),
            "{}",
            lb.log()
        );
    };

    reload(&[("front", busy), ("side", second)], "invalid", 1.0);
    assert!(
        lb.log()
            .contains(&format!("listeners.front.bind {busy}: cannot listen")),
        "{}",
        lb.log()
    );
    assert_eq!(greeted(first).await.expect("front still listens").1, "A");
    assert_eq!(greeted(second).await.expect("side still listens").1, "A");

    // A swap: each new address is held by the other listener until the reload.
    reload(&[("front", second), ("side", first)], "invalid", 2.0);
    assert!(
        lb.log()
            .contains("free it in one reload, take it in the next"),
        "{}",
        lb.log()
    );
    assert_eq!(greeted(first).await.expect("front still listens").1, "A");
    assert_eq!(greeted(second).await.expect("side still listens").1, "A");
    drop(holder);

    // Its own wildcard socket holds the port: opened after that one closes.
    let wildcard: SocketAddr = format!("0.0.0.0:{}", first.port())
        .parse()
        .expect("address");
    reload(&[("front", wildcard), ("side", second)], "ok", 1.0);
    reload(&[("front", first), ("side", second)], "ok", 2.0);
    assert_eq!(greeted(first).await.expect("front listens").1, "A");
    assert_eq!(reloads("invalid"), 2.0);

    // A listener renamed on the same address: the removed one closes first.
    reload(&[("front", first), ("renamed", second)], "ok", 3.0);
    assert_eq!(greeted(second).await.expect("renamed listens").1, "A");
    assert_eq!(reloads("invalid"), 2.0, "{}", lb.log());
}
