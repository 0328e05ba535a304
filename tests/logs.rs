//! Logs an operator reads: a backend flip is one JSON line with the probe detail;
//! a dead peer does not flood the log, and openraft writes nothing below WARN.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A TCP backend on `addr` (port 0: one the kernel picks) that accepts until the
/// task is aborted; its address.
async fn backend_on(addr: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    (addr, task)
}

/// The JSON log lines about backend `name`'s health, in order: (level, message).
fn flips(lb: &Raftlb, name: &str) -> Vec<(String, String, Value)> {
    lb.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["backend"] == name)
        .filter_map(|v| {
            let message = v["fields"]["message"].as_str()?.to_string();
            message.starts_with("backend is ").then(|| {
                (
                    v["level"].as_str().unwrap_or("").to_string(),
                    message,
                    v["fields"].clone(),
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_flip_is_one_json_line_with_the_probe_detail() {
    raise_nofile();
    // The kernel's pick, not a port found free a moment before: another process
    // could take that one in between.
    let (addr, backend) = backend_on(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let (admin, listen) = (loopback(), loopback());
    let probe = "    health_check: { kind: tcp, interval: 100ms, timeout: 1s, rise: 2, fall: 2 }\n";
    let yaml = Raftlb::standalone_yaml(admin, listen, probe, "", &[("b1", addr)]);
    let mut lb = Raftlb::spawn_with(&[], &yaml, admin, &["--log-format", "json"]);
    blocking(|| lb.wait_ready());
    let came_up = blocking(|| eventually(Duration::from_secs(10), || flips(&lb, "b1").len() == 1));
    assert!(came_up, "no line for b1 coming up:\n{}", lb.log());

    backend.abort();
    let _ = backend.await;
    let went_down =
        blocking(|| eventually(Duration::from_secs(10), || flips(&lb, "b1").len() == 2));
    assert!(went_down, "no line for b1 going down:\n{}", lb.log());
    let (_, back) = backend_on(addr).await;
    let came_back =
        blocking(|| eventually(Duration::from_secs(10), || flips(&lb, "b1").len() == 3));
    assert!(came_back, "no line for b1 coming back:\n{}", lb.log());
    // Probes go on; no flip is written twice.
    blocking(|| std::thread::sleep(Duration::from_millis(500)));
    let lines = flips(&lb, "b1");
    assert_eq!(lines.len(), 3, "{lines:#?}");

    let (level, message, fields) = &lines[1];
    assert_eq!(level, "WARN");
    assert_eq!(fields["pool"], "web");
    assert_eq!(fields["from"], "up");
    assert_eq!(fields["to"], "down");
    let detail = message
        .strip_prefix("backend is down: 2 consecutive probes failed, last: ")
        .unwrap_or_else(|| panic!("no probe detail: {message}"));
    assert!(
        detail.contains("refused") || detail.contains(&addr.to_string()),
        "probe detail: {detail}"
    );
    for (level, message, fields) in [&lines[0], &lines[2]] {
        assert_eq!(level, "INFO");
        assert_eq!(message, "backend is up: 2 consecutive probes passed");
        assert_eq!(fields["pool"], "web");
    }
    back.abort();
}

/// The config of replica `i` of a cluster on `peers`, leader election off.
fn replica_yaml(
    peers: &[SocketAddr],
    i: usize,
    admin: SocketAddr,
    data: &std::path::Path,
) -> String {
    let list: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(j, p)| format!("{}: {p}", j + 1))
        .collect();
    format!(
        "node: {{ name: lb-{id} }}\n\
         admin: {{ bind: {admin} }}\n\
         cluster:\n  cluster_id: logs\n  node_id: {id}\n  bind: {peer}\n  data_dir: {data}\n  \
         peers: {{ {list} }}\n  heartbeat_interval: 100ms\n  election_timeout: 500ms\n\
         leader_election: {{ enabled: false }}\n\
         listeners:\n  front: {{ bind: {listen}, pool: web }}\n\
         pools:\n  web:\n    backends:\n      - {{ name: b1, address: 127.0.0.1:9 }}\n",
        id = i + 1,
        peer = peers[i],
        data = data.display(),
        list = list.join(", "),
        listen = loopback(),
    )
}

#[test]
fn a_dead_peer_is_logged_once_per_window_and_openraft_is_quiet() {
    raise_nofile();
    let peers: Vec<SocketAddr> = (0..3).map(|_| loopback()).collect();
    let data: Vec<tempfile::TempDir> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    // Two of three: a quorum forms, and the leader keeps failing to reach node 3.
    let mut running: Vec<Raftlb> = (0..2)
        .map(|i| {
            let admin = loopback();
            Raftlb::spawn(&replica_yaml(&peers, i, admin, data[i].path()), admin)
        })
        .collect();
    running.iter_mut().for_each(Raftlb::wait_ready);
    // About 30 heartbeats to the dead peer from the leader.
    std::thread::sleep(Duration::from_secs(3));
    let mut heartbeats = 0;
    for r in &running {
        let log = r.log();
        let dead = peers[2].to_string();
        let about_dead: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&dead) && (l.contains(" WARN ") || l.contains(" ERROR ")))
            .collect();
        // Unfolded, the leader alone writes one heartbeat warning per 100 ms (about 30
        // here) besides the replication ones; folded, each distinct line once.
        heartbeats += about_dead
            .iter()
            .filter(|l| l.contains("failed to send a heartbeat"))
            .count();
        assert!(
            about_dead.len() <= 12,
            "{} warnings about the dead peer in 3 s:\n{}",
            about_dead.len(),
            about_dead.join("\n")
        );
        let openraft_info: Vec<&str> = log
            .lines()
            .filter(|l| {
                let mut words = l.split_whitespace().skip(1);
                let level = words.next().unwrap_or("");
                let target = words.next().unwrap_or("");
                target.starts_with("openraft") && matches!(level, "INFO" | "DEBUG" | "TRACE")
            })
            .collect();
        assert!(
            openraft_info.is_empty(),
            "openraft below WARN:\n{}",
            openraft_info.join("\n")
        );
    }
    // The leader did warn about the dead peer, and its heartbeat warning, sent every
    // 100 ms, was written once (folded), not 30 times (twice if leadership moved).
    assert!(
        (1..=2).contains(&heartbeats),
        "{heartbeats} heartbeat warnings about the dead peer in 3 s:\n{}",
        running.iter().map(Raftlb::log).collect::<String>()
    );
}
