//! Abuse of the exposed ports with real sockets against real `raftlb` processes:
//! floods of half-open peer frames, admin connections that never finish, and the
//! resources they cost. The cases run one at a time (they measure a process's memory
//! and descriptors, and each opens about a thousand sockets), each bounded in time.

mod common;

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
    let backends = vec![("b1".to_string(), named_backend("b1").await)];
    let cluster = Cluster::new(3, backends);
    let (replicas, leader) = blocking(|| cluster.start_all(""));
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
