//! Cluster mode with real `raftlb run` processes on loopback: replication of admin
//! writes through any replica, kill -9 of the Raft leader, catch-up after a restart,
//! quorum loss, restart without a quorum, wiped data_dir, and bad input on the peer port.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, json, leader_of, status};
use common::pki;
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What this suite adds to the shared test cluster.
trait Suite {
    fn yaml(&self, i: usize, initial_state: &str) -> String;
    fn spawn(&self, i: usize) -> Raftlb;
    fn spawn_without_last(&self, i: usize) -> Raftlb;
    fn start_without_last(&self) -> (Vec<Raftlb>, usize);
    fn voters_seen_by(&self, i: usize) -> usize;
    fn start_all(&self) -> (Vec<Raftlb>, usize);
    fn agreed_leader(&self, running: usize) -> usize;
    fn initial_cluster(&self) -> String;
}

impl Suite for Cluster {
    /// Replica `i` (0-based; node_id i+1).
    fn yaml(&self, i: usize, initial_state: &str) -> String {
        self.yaml_as(i, initial_state, "")
    }

    fn spawn(&self, i: usize) -> Raftlb {
        Raftlb::spawn(&self.yaml(i, "new"), self.addrs[i].admin)
    }

    /// Replica `i` of a cluster formed without the last replica (which is added later).
    fn spawn_without_last(&self, i: usize) -> Raftlb {
        let last = self.addrs.len();
        let yaml = self
            .yaml(i, "new")
            .replace(&format!(", {last}: {}", self.addrs[last - 1].peer), "");
        Raftlb::spawn(&yaml, self.addrs[i].admin)
    }

    /// Every replica but the last, formed without it (it is added later): the
    /// replicas, ready, and the leader they agree on.
    fn start_without_last(&self) -> (Vec<Raftlb>, usize) {
        let n = self.addrs.len() - 1;
        let mut replicas: Vec<Raftlb> = (0..n).map(|i| self.spawn_without_last(i)).collect();
        blocking(|| replicas.iter_mut().for_each(Raftlb::wait_ready));
        let leader = blocking(|| self.agreed_leader(n));
        (replicas, leader)
    }

    /// How many voters `ctl members` on replica `i` lists.
    fn voters_seen_by(&self, i: usize) -> usize {
        let (_, out, _) = ctl(self.addrs[i].admin, &["-o", "json", "members"]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        v["members"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["voter"] == true).count())
    }

    /// Starts every replica and waits until they serve and agree on a leader; the
    /// leader's index.
    fn start_all(&self) -> (Vec<Raftlb>, usize) {
        let mut replicas: Vec<Raftlb> = (0..self.addrs.len()).map(|i| self.spawn(i)).collect();
        replicas.iter_mut().for_each(Raftlb::wait_ready);
        (replicas, self.agreed_leader(self.addrs.len()))
    }

    /// Waits until the first `running` replicas name the same Raft leader and it has
    /// heard from a quorum (until then a write is refused with 503, correctly); its
    /// index.
    fn agreed_leader(&self, running: usize) -> usize {
        let mut leader = None;
        assert!(
            eventually(Duration::from_secs(10), || {
                leader = leader_of(self.addrs[0].admin);
                leader.is_some_and(|l| {
                    self.addrs[..running]
                        .iter()
                        .all(|a| leader_of(a.admin) == Some(l))
                        && self.addrs.get(l as usize - 1).is_some_and(|a| {
                            status(a.admin)["cluster"]["quorum_reachable"] == Value::Bool(true)
                        })
                })
            }),
            "the replicas do not agree on a Raft leader that has a quorum"
        );
        leader.expect("leader") as usize - 1
    }

    /// `--initial-cluster` for `raftlb snapshot restore`.
    fn initial_cluster(&self) -> String {
        let members: Vec<String> = (0..self.addrs.len())
            .map(|i| format!("{}={}", i + 1, self.addrs[i].peer))
            .collect();
        members.join(",")
    }
}

/// An admin API call that must answer 200; `what` says what it was for.
fn admin_ok(addr: SocketAddr, method: &str, path: &str, body: &str, what: &str) {
    let (code, reply) = blocking(|| json(addr, method, path, body));
    assert_eq!(code, 200, "{what}: {method} {path}: {reply}");
}

fn drained(addr: SocketAddr, backend: &str) -> Option<bool> {
    let (_, body) = json(addr, "GET", "/api/v1/backends", "");
    body["pools"][0]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == backend)?["drained"]
        .as_bool()
}

/// How many members a replica's metrics call reachable.
fn reachable_members(r: &Raftlb) -> usize {
    r.metrics()
        .lines()
        .filter(|l| l.starts_with("raftlb_raft_member_reachable{") && l.ends_with(" 1"))
        .count()
}

/// How many members a replica's metrics call unreachable (0, never NaN: an alert
/// on `== 0` must fire).
fn unreachable_members(r: &Raftlb) -> usize {
    r.metrics()
        .lines()
        .filter(|l| l.starts_with("raftlb_raft_member_reachable{") && l.ends_with(" 0"))
        .count()
}

async fn backend_names(named: &[&str]) -> Vec<(String, SocketAddr)> {
    let mut out = Vec::new();
    for name in named {
        out.push((name.to_string(), named_backend(name).await));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_a_follower_replicate_and_survive_the_leader_being_killed() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1", "b2"]).await);
    let mut replicas: Vec<Option<Raftlb>> = (0..3).map(|i| Some(cluster.spawn(i))).collect();
    blocking(|| {
        for r in replicas.iter_mut().flatten() {
            r.wait_ready();
        }
    });
    let leader = blocking(|| cluster.agreed_leader(3));
    let follower = (leader + 1) % 3;

    // Drain through a follower: forwarded to the leader, applied everywhere.
    admin_ok(
        cluster.addrs[follower].admin,
        "POST",
        "/api/v1/pools/web/backends/b1/drain",
        "",
        "drain on a follower",
    );
    for a in &cluster.addrs {
        assert!(
            blocking(
                || eventually(Duration::from_secs(5), || drained(a.admin, "b1")
                    == Some(true))
            ),
            "replica {} does not show the drain",
            a.admin
        );
    }
    for a in &cluster.addrs {
        for _ in 0..20 {
            let name = which_backend(a.listen, None).await.expect("proxied");
            assert_eq!(name, "b2", "a drained backend got a new connection");
        }
    }

    // The Raft and config metrics say the same on every replica.
    let version = status(cluster.addrs[leader].admin)["config_version"]
        .as_f64()
        .expect("config_version in status");
    for (i, r) in replicas.iter().enumerate() {
        let r = r.as_ref().expect("running");
        let is_leader = if i == leader { 1.0 } else { 0.0 };
        // Every replica, a follower too, knows that every member answers.
        let reachable = 3;
        assert!(
            blocking(|| eventually(Duration::from_secs(5), || {
                r.metric("raftlb_raft_is_leader ") == is_leader
                    && r.metric("raftlb_raft_members ") == 3.0
                    && r.metric("raftlb_raft_quorum ") == 2.0
                    && reachable_members(r) == reachable
                    && r.metric("raftlb_raft_has_leader ") == 1.0
                    && r.metric("raftlb_raft_quorum_reachable ") == 1.0
                    && r.metric("raftlb_raft_term ") >= 1.0
                    && r.metric("raftlb_raft_applied_index ") >= 1.0
                    && r.metric("raftlb_raft_commit_index ") >= 1.0
                    && r.metric("raftlb_config_version ") == version
                    && r.metric(r#"raftlb_backend_drained{pool="web",backend="b1"}"#) == 1.0
            })),
            "replica {} metrics:\n{}",
            i + 1,
            blocking(|| r.metrics())
        );
    }

    // kill -9 the leader: a new one is elected among the survivors, writes work again.
    let killed = replicas[leader].take().expect("leader process");
    blocking(|| {
        let mut killed = killed;
        killed.signal("KILL");
        killed.wait_exit(Duration::from_secs(5));
    });
    let survivor = cluster.addrs[follower].admin;
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || {
            leader_of(survivor).is_some_and(|l| l as usize - 1 != leader)
        })),
        "no new leader after the kill: {}",
        status(survivor)
    );
    admin_ok(
        survivor,
        "POST",
        "/api/v1/pools/web/backends/b1/undrain",
        "",
        "write after the leader died",
    );

    // The killed replica restarts from its data_dir and catches up.
    let mut back = cluster.spawn(leader);
    blocking(|| back.wait_ready());
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || drained(
            cluster.addrs[leader].admin,
            "b1"
        ) == Some(false))),
        "the restarted replica did not catch up:\n{}",
        back.log()
    );
    replicas[leader] = Some(back);

    // Stop two of three: the survivor still answers status, and refuses writes with
    // 503 in bounded time.
    let last = (leader + 2) % 3;
    for (i, r) in replicas.iter_mut().enumerate() {
        if i != last
            && let Some(r) = r.as_mut()
        {
            r.signal("TERM");
            blocking(|| r.wait_exit(Duration::from_secs(10)));
        }
    }
    let lone = cluster.addrs[last].admin;
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || {
            status(lone)["cluster"]["quorum_reachable"] == Value::Bool(false)
        })),
        "the survivor does not say it lost the quorum: {}",
        status(lone)
    );
    let lone_replica = replicas[last].as_ref().expect("survivor");
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || {
            reachable_members(lone_replica) == 1
                && unreachable_members(lone_replica) == 2
                && lone_replica.metric("raftlb_raft_has_leader ") == 0.0
                && lone_replica.metric("raftlb_raft_quorum_reachable ") == 0.0
        })),
        "the survivor's metrics still count the stopped replicas:\n{}",
        blocking(|| lone_replica.metrics())
    );
    let started = Instant::now();
    let (code, body) = blocking(|| json(lone, "POST", "/api/v1/pools/web/backends/b1/drain", ""));
    assert_eq!(code, 503, "write without a quorum: {body}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the refusal took {:?}",
        started.elapsed()
    );
    assert_eq!(drained(lone, "b1"), Some(false), "nothing changed");
}

/// SPEC "Behaviour": a write that finds no quorum before it is proposed fails at
/// once with 503 and changes nothing, on a follower whose leader stopped answering
/// too (SIGSTOP: the leader's port still accepts, so only silence tells); a
/// linearizable read then fails with 503 and no write outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_from_its_leader_refuses_writes_at_once() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1", "b2"]).await);
    let (replicas, leader) = blocking(|| cluster.start_all_with(""));
    let follower = (leader + 1) % 3;
    for (i, r) in replicas.iter().enumerate() {
        if i != follower {
            r.signal("STOP");
        }
    }
    let admin = cluster.addrs[follower].admin;
    let cut_off = blocking(|| {
        eventually(Duration::from_secs(10), || {
            status(admin)["cluster"]["quorum_reachable"] == Value::Bool(false)
        })
    });
    let started = Instant::now();
    let (code, body) = blocking(|| json(admin, "POST", "/api/v1/pools/web/backends/b1/drain", ""));
    let took = started.elapsed();
    let (read_code, read) = blocking(|| json(admin, "GET", "/api/v1/config", ""));
    for (i, r) in replicas.iter().enumerate() {
        if i != follower {
            r.signal("CONT");
        }
    }
    assert!(cut_off, "the follower never said it lost the quorum");
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["outcome"], "not_proposed", "{body}");
    // Bounded by an election timeout, not by the forwarded call's timeout (5 s+).
    assert!(took < Duration::from_secs(4), "the refusal took {took:?}");
    assert_eq!(read_code, 503, "{read}");
    assert!(
        read["error"].is_string() && read["outcome"].is_null(),
        "{read}"
    );
    // Nothing was proposed: once the others are back, b1 is still not drained.
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || {
            status(admin)["cluster"]["quorum_reachable"] == Value::Bool(true)
        })),
        "the cluster did not come back"
    );
    std::thread::sleep(Duration::from_secs(1));
    for a in &cluster.addrs {
        assert_eq!(
            drained(a.admin, "b1"),
            Some(false),
            "the refused write committed"
        );
    }
}

/// The Raft leader killed with the rest and restarted alone names no leader: openraft
/// takes its own leadership back from the vote it won, but with no quorum no one
/// leads, as etcd would say (status, members, ctl).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_alone_names_no_leader() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1"]).await);
    let mut replicas: Vec<Raftlb> = (0..3).map(|i| cluster.spawn(i)).collect();
    blocking(|| replicas.iter_mut().for_each(Raftlb::wait_ready));
    let mut leader = None;
    assert!(blocking(|| eventually(Duration::from_secs(10), || {
        leader = status(cluster.addrs[0].admin)["cluster"]["leader_id"].as_u64();
        leader.is_some()
    })));
    let leader = leader.expect("a leader") as usize - 1;
    for r in &mut replicas {
        r.signal("KILL");
        blocking(|| r.wait_exit(Duration::from_secs(5)));
    }
    let mut alone = cluster.spawn(leader);
    blocking(|| alone.wait_ready());
    // Sampled over 4 s, two of its longest election timeouts (1-2 s here), for
    // whatever it would claim.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let cluster_status = status(cluster.addrs[leader].admin)["cluster"].clone();
        assert_eq!(
            cluster_status["quorum_reachable"], false,
            "{cluster_status}"
        );
        assert_eq!(
            cluster_status["leader_id"],
            Value::Null,
            "alone, it names a leader: {cluster_status}\n{}",
            alone.log()
        );
        let roles: Vec<&str> = cluster_status["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter_map(|m| m["role"].as_str())
            .collect();
        assert!(!roles.contains(&"leader"), "{roles:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_serves_its_last_config_without_a_quorum_and_a_wiped_one_refuses() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1", "b2"]).await);
    let mut replicas: Vec<Raftlb> = (0..3).map(|i| cluster.spawn(i)).collect();
    blocking(|| replicas.iter_mut().for_each(Raftlb::wait_ready));
    admin_ok(
        cluster.addrs[0].admin,
        "PATCH",
        "/api/v1/pools/web/backends/b2",
        r#"{"weight": 7}"#,
        "set a weight",
    );
    // Every replica says "joined" once it has caught up.
    assert!(blocking(|| eventually(Duration::from_secs(10), || {
        let (_, config) = json(cluster.addrs[0].admin, "GET", "/api/v1/status", "");
        config["cluster"]["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3)
    })));
    std::thread::sleep(Duration::from_secs(1));
    for r in &mut replicas {
        r.signal("KILL");
        blocking(|| r.wait_exit(Duration::from_secs(5)));
    }

    // Alone, with no quorum: it serves the config it applied last, at once.
    let mut alone = cluster.spawn(1);
    blocking(|| alone.wait_ready());
    let (_, backends) = blocking(|| json(cluster.addrs[1].admin, "GET", "/api/v1/backends", ""));
    assert_eq!(
        backends["pools"][0]["backends"][1]["weight"], 7,
        "the last applied config: {backends}"
    );
    // Its file still says weight 1: the log names that difference, field by field.
    let told = |r: &Raftlb| {
        r.log()
            .matches("pools.web.backends[b2].weight: file 1, store 7")
            .count()
    };
    assert!(
        blocking(|| eventually(Duration::from_secs(5), || told(&alone) == 1)),
        "{}",
        alone.log()
    );
    // A reload does not take the file's pools either, and says so.
    alone.signal("HUP");
    assert!(
        blocking(|| eventually(Duration::from_secs(5), || told(&alone) == 2
            && alone.log().contains("reload: the file's pools differ"))),
        "{}",
        alone.log()
    );
    assert_eq!(
        which_backend(cluster.addrs[1].listen, None)
            .await
            .ok()
            .as_deref()
            .map(|n| n.starts_with('b')),
        Some(true)
    );

    // Node 3's data_dir is wiped: the cluster says it joined, so it must not start
    // empty, as new or as existing (it is a voter that joined).
    let mut first = cluster.spawn(0);
    blocking(|| first.wait_ready());
    for initial_state in ["new", "existing"] {
        wipe(cluster.data[2].path());
        let mut wiped = Raftlb::spawn(&cluster.yaml(2, initial_state), cluster.addrs[2].admin);
        let exit = blocking(|| wiped.wait_exit(Duration::from_secs(20)));
        assert_eq!(
            exit.and_then(|s| s.code()),
            Some(2),
            "a wiped replica must refuse to start (initial_state: {initial_state}):\n{}",
            wiped.log()
        );
        assert!(
            wiped.log().contains("ctl member remove 3"),
            "the refusal names the fix:\n{}",
            wiped.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_cluster_with_the_same_name_is_refused_at_start() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1"]).await);
    // Node 3 first bootstraps a cluster of its own (same cluster_id, peers: itself).
    let others: Vec<String> = (0..2)
        .map(|i| format!("{}: {}, ", i + 1, cluster.addrs[i].peer))
        .collect();
    let alone = cluster.yaml(2, "new").replace(&others.concat(), "");
    assert!(alone.contains("peers: { 3: "), "{alone}");
    let mut own = Raftlb::spawn(&alone, cluster.addrs[2].admin);
    blocking(|| own.wait_ready());
    assert!(blocking(|| eventually(Duration::from_secs(10), || {
        leader_of(cluster.addrs[2].admin) == Some(3)
    })));
    own.signal("KILL");
    blocking(|| own.wait_exit(Duration::from_secs(5)));
    // Nodes 1 and 2 form the real one, which node 3 is then started into.
    let (_replicas, _) = cluster.start_without_last();
    let mut third = Raftlb::spawn(&cluster.yaml(2, "existing"), cluster.addrs[2].admin);
    let exit = blocking(|| third.wait_exit(Duration::from_secs(20)));
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(2),
        "a replica whose store is another cluster's must not start (it would lead \
         itself and take a lease of its own):\n{}",
        third.log()
    );
    let log = third.log();
    assert!(
        log.contains("2 of the 2 other peers in the file belong to another cluster"),
        "{log}"
    );
    assert!(log.contains("ctl member add 3"), "the fix is named:\n{log}");
    // The real cluster carries on.
    cluster.agreed_leader(2);
}

fn wipe(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read data_dir").flatten() {
        std::fs::remove_file(entry.path()).expect("wipe");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_peer_port_never_crashes_a_node() {
    raise_nofile();
    let cluster = Cluster::new(1, backend_names(&["b1"]).await);
    let mut node = cluster.spawn(0);
    blocking(|| node.wait_ready());
    let peer = cluster.addrs[0].peer;

    // Random bytes, an oversized length prefix, a frame cut short.
    let mut noise = vec![0u8; 4096];
    for (i, b) in noise.iter_mut().enumerate() {
        *b = (i * 7919 % 251) as u8;
    }
    let oversized = (64u32 << 20).to_be_bytes().to_vec();
    let truncated = [&100u32.to_be_bytes()[..], b"{\"cluster_id\""].concat();
    for input in [noise, oversized, truncated] {
        let mut s = tokio::net::TcpStream::connect(peer).await.expect("connect");
        let _ = s.write_all(&input).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    }

    // A well-formed frame from another cluster is refused with a reason.
    let frame = serde_json::json!({
        "cluster_id": "other", "uuid": null, "from": 9, "body": "Hello"
    })
    .to_string();
    let mut s = tokio::net::TcpStream::connect(peer).await.expect("connect");
    s.write_all(&(frame.len() as u32).to_be_bytes())
        .await
        .expect("write");
    s.write_all(frame.as_bytes()).await.expect("write");
    let len = s.read_u32().await.expect("a reply frame");
    let mut reply = vec![0; len as usize];
    s.read_exact(&mut reply).await.expect("reply");
    let reply: Value = serde_json::from_slice(&reply).expect("json reply");
    assert!(
        reply["body"]["Error"]
            .as_str()
            .is_some_and(|e| e.contains("cluster_id")),
        "{reply}"
    );

    assert!(
        node.child.try_wait().expect("try_wait").is_none(),
        "{}",
        node.log()
    );
    assert!(node.log().contains("peer refused"), "{}", node.log());
    // Well after the start (beyond 2 x election_timeout): a single voter is its own
    // quorum, it has no followers to hear from.
    std::thread::sleep(Duration::from_secs(3));
    admin_ok(
        cluster.addrs[0].admin,
        "POST",
        "/api/v1/pools/web/backends/b1/drain",
        "",
        "the node still commits writes",
    );
}

/// A replica whose peers map puts "node 2" at its own peer port, in a config the
/// static check cannot fault: advertise is peers[1], and 127.0.0.2 is not 127.0.0.1,
/// but the wildcard bind answers there too. Counting itself as node 2 it would have a
/// quorum of 2 out of 3 alone; it must refuse itself and never bootstrap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_reaches_itself_as_another_peer_never_bootstraps() {
    raise_nofile();
    let backends = backend_names(&["b1"]).await;
    let (admin, listen, absent) = (loopback(), loopback(), loopback());
    let port = free_port();
    let data = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "admin: {{ bind: {admin} }}\n\
         cluster:\n  cluster_id: test\n  node_id: 1\n  bind: 0.0.0.0:{port}\n  advertise: 127.0.0.1:{port}\n  \
         data_dir: {data}\n  peers: {{ 1: 127.0.0.1:{port}, 2: 127.0.0.2:{port}, 3: {absent} }}\n  \
         heartbeat_interval: 100ms\n  election_timeout: 1s\n\
         leader_election: {{ enabled: false }}\n\
         listeners:\n  front: {{ bind: {listen}, pool: web }}\n\
         pools:\n  web:\n    backends:\n      - {{ name: b1, address: {b1} }}\n",
        data = data.path().display(),
        b1 = backends[0].1,
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("self.yaml");
    std::fs::write(&file, &yaml).expect("write");
    let (code, _, stderr) = check(&file);
    assert_eq!(
        code, 0,
        "the static check must pass for this test: {stderr}"
    );

    let mut node = Raftlb::spawn(&yaml, admin);
    let refused = format!(
        "peers[2] at 127.0.0.2:{port} answered as node 1: two replicas share node_id 1, or peers is wrong"
    );
    assert!(
        blocking(|| eventually(Duration::from_secs(15), || node.log().contains(&refused))),
        "the client names the problem:\n{}",
        node.log()
    );
    assert!(
        node.log().contains("this replica's own node_id"),
        "the replica refuses a request from itself:\n{}",
        node.log()
    );
    // Several bootstrap rounds (one per election_timeout) later: still nothing.
    std::thread::sleep(Duration::from_secs(4));
    let (code, reply) = blocking(|| json(admin, "POST", "/api/v1/pools/web/backends/b1/drain", ""));
    assert_eq!(
        code,
        503,
        "a write must not commit: {reply}\n{}",
        node.log()
    );
    assert_eq!(status(admin)["cluster"]["leader_id"], Value::Null);
    assert!(
        !node.log().contains("cluster initialised"),
        "{}",
        node.log()
    );
    let refusals: f64 = node
        .metrics()
        .lines()
        .filter(|l| {
            l.starts_with("raftlb_peer_rpc_errors_total{")
                && l.contains("kind=\"refused\"")
                && l.contains("peer=\"2\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(refusals >= 1.0, "{}", node.metrics());
    assert!(
        node.child.try_wait().expect("try_wait").is_none(),
        "a refusal is not fatal:\n{}",
        node.log()
    );
}

fn ctl(admin: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let server = format!("http://{admin}");
    let mut all = vec!["ctl", "--server", &server];
    all.extend_from_slice(args);
    raftlb_cmd(&all)
}

/// `ctl -o json` output listing three members, none of them node `id`.
fn three_members_without(json: &str, id: u64) {
    let v: Value = serde_json::from_str(json).expect("members as JSON");
    assert!(
        v["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["id"] != id)),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_adds_promotes_and_removes_a_member_and_applies_config() {
    raise_nofile();
    let cluster = Cluster::new(4, backend_names(&["b1", "b2"]).await);
    // Nodes 1-3 form the cluster; node 4 joins later with initial_state: existing.
    let (_replicas, _) = cluster.start_without_last();
    let admin = cluster.addrs[1].admin;

    // An address the file would refuse (or id 0) is refused here too, and nothing joins.
    for (id, bad, why) in [
        ("4", "bad host:80", "400 invalid address \"bad host:80\""),
        ("4", "127.0.0.1:0", "400 invalid address \"127.0.0.1:0\""),
        ("0", "127.0.0.1:7999", "400 node id 0 is not allowed"),
    ] {
        let (code, out, err) = blocking(|| ctl(admin, &["member", "add", id, bad]));
        assert_ne!(code, 0, "member add {id} {bad}: {out}{err}");
        assert!(err.contains(why), "member add {id} {bad}: {out}{err}");
    }
    assert_eq!(blocking(|| cluster.voters_seen_by(1)), 3);
    let (_, listed, _) = blocking(|| ctl(admin, &["-o", "json", "members"]));
    assert!(!listed.contains("bad host"), "{listed}");
    let (code, out, err) = blocking(|| ctl(admin, &["backend", "add", "web", "b9", "127.0.0.1:0"]));
    assert_ne!(code, 0, "backend add with port 0: {out}{err}");
    assert!(err.contains("port of 1-65535"), "{err}");
    // ctl refuses a name the config would refuse before sending it; the API too.
    let (code, out, err) =
        blocking(|| ctl(admin, &["backend", "add", "web", "bad name", "127.0.0.1:1"]));
    assert_eq!(code, 2, "backend add with a bad name: {out}{err}");
    let (code, body) = blocking(|| {
        json(
            admin,
            "POST",
            "/api/v1/pools/web/backends",
            r#"{"name": "bad name", "address": "127.0.0.1:1"}"#,
        )
    });
    let error = body["error"].as_str().unwrap_or_default();
    assert_eq!(code, 400, "{body}");
    assert!(
        error.starts_with("name: ") && !error.contains("pools.p"),
        "the error names the field, not a stand-in pool: {body}"
    );
    // A path that exists answers another method with 405 and what it allows.
    for (method, path, allow) in [
        (
            "GET",
            "/api/v1/pools/web/backends/b1/drain",
            "POST, OPTIONS",
        ),
        (
            "PUT",
            "/api/v1/pools/web/backends/b1",
            "PATCH, DELETE, OPTIONS",
        ),
        ("DELETE", "/api/v1/members/2/promote", "POST, OPTIONS"),
    ] {
        let r = blocking(|| http_response(admin, method, path, &[], "")).expect("answer");
        assert_eq!(r.status, 405, "{method} {path}: {r:?}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}: {r:?}");
    }
    // An address a member listens on already, however spelt, is refused: the new
    // id would be that member, and removing the new id would remove it.
    let peer2 = cluster.addrs[1].peer;
    for taken in [
        peer2.to_string(),
        format!("localhost:{}", peer2.port()),
        format!("[::ffff:127.0.0.1]:{}", peer2.port()),
    ] {
        let (code, out, err) = blocking(|| ctl(admin, &["member", "add", "5", &taken]));
        assert_ne!(code, 0, "member add 5 {taken}: {out}{err}");
        assert!(
            err.contains("400") && err.contains("is node 2's address"),
            "member add 5 {taken}: {out}{err}"
        );
    }
    let (_, listed, _) = blocking(|| ctl(admin, &["-o", "json", "members"]));
    three_members_without(&listed, 5);

    let peer4 = cluster.addrs[3].peer.to_string();
    let (code, out, err) = blocking(|| ctl(admin, &["member", "add", "4", &peer4]));
    assert_eq!(code, 0, "member add: {out}{err}");
    let mut fourth = Raftlb::spawn(&cluster.yaml(3, "existing"), cluster.addrs[3].admin);
    blocking(|| fourth.wait_ready());
    assert!(
        blocking(|| eventually(Duration::from_secs(20), || cluster.voters_seen_by(1) == 4)),
        "node 4 was not promoted:\n{}",
        fourth.log()
    );
    let (_, table, _) = blocking(|| ctl(admin, &["members"]));
    assert!(
        table.contains("warning: 4 voters: quorum 3, fault tolerance 1"),
        "{table}"
    );

    // config get / apply, with a stale If-Match refused.
    let (code, yaml, err) = blocking(|| ctl(admin, &["config", "get"]));
    assert_eq!(code, 0, "{err}");
    assert!(yaml.contains("b2"), "{yaml}");
    assert!(
        yaml.starts_with("# config_version: 1 (raftlb ctl config apply FILE --if-version 1)\n"),
        "config get shows the version to apply against: {yaml}"
    );
    let file = cluster.data[0].path().join("new-pools.yaml");
    std::fs::write(&file, yaml.replace("weight: 1", "weight: 5")).expect("write");
    let f = file.to_string_lossy().to_string();
    // config_version 1 is the seed: the first compare-and-set wins, the second is stale.
    let (code, out, err) = blocking(|| ctl(admin, &["config", "apply", &f, "--if-version", "1"]));
    assert_eq!(code, 0, "config apply: {out}{err}");
    let (code, _, err) = blocking(|| ctl(admin, &["config", "apply", &f, "--if-version", "1"]));
    assert_eq!(code, 1, "a stale If-Match must be refused");
    assert!(err.contains("412"), "{err}");
    assert!(blocking(|| eventually(Duration::from_secs(5), || {
        let (_, b) = json(cluster.addrs[3].admin, "GET", "/api/v1/backends", "");
        b["pools"][0]["backends"][0]["weight"] == 5
    })));
    // The 412 carries the current version; `*` matches any; a weak tag never does.
    let put_if = |tag: &str, body: &str| {
        blocking(|| {
            http_response(
                admin,
                "PUT",
                "/api/v1/config",
                &[("Content-Type", "application/yaml"), ("If-Match", tag)],
                body,
            )
        })
        .expect("PUT")
    };
    let before = status(admin)["config_version"].as_u64().expect("version");
    let stale = put_if("\"1\"", &yaml);
    assert_eq!(stale.status, 412, "{stale:?}");
    assert_eq!(stale.header("etag"), Some(format!("\"{before}\"").as_str()));
    let weak = put_if(&format!("W/\"{before}\""), &yaml);
    assert_eq!(weak.status, 412, "{weak:?}");
    assert_eq!(status(admin)["config_version"], before);
    let any = put_if("*", &yaml.replace("weight: 1", "weight: 7"));
    assert_eq!(any.status, 200, "{any:?}");
    assert_eq!(status(admin)["config_version"], before + 1);
    // Asked for JSON, the config comes as JSON, and goes back through PUT as it is.
    let got = blocking(|| {
        http_response(
            admin,
            "GET",
            "/api/v1/config",
            &[("Accept", "application/json")],
            "",
        )
    })
    .expect("GET");
    assert_eq!(got.status, 200, "{got:?}");
    let doc: serde_json::Value = serde_json::from_str(&got.body).expect("JSON");
    assert_eq!(doc["pools"]["web"]["backends"][0]["weight"], 7, "{doc}");
    let tag = got.header("etag").expect("an ETag").to_string();
    assert_eq!(tag, format!("\"{}\"", before + 1));
    let again = blocking(|| {
        http_response(
            admin,
            "PUT",
            "/api/v1/config",
            &[("Content-Type", "application/json"), ("If-Match", &tag)],
            &got.body,
        )
    })
    .expect("PUT");
    assert_eq!(again.status, 200, "{again:?}");
    // A pool named twice is refused, as the file's YAML reader refuses it; serde_json
    // alone would keep the last one.
    let version = status(admin)["config_version"].clone();
    let web = &doc["pools"]["web"];
    let twice = format!(r#"{{"pools": {{"web": {web}, "web": {web}}}}}"#);
    let (code, answer) = blocking(|| {
        http_request(
            admin,
            "PUT",
            "/api/v1/config",
            &[("Content-Type", "application/json")],
            &twice,
        )
    })
    .expect("PUT");
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains(r#"key \"web\" appears twice"#), "{answer}");
    assert_eq!(status(admin)["config_version"], version);

    // A bad file: ctl names its line and column and sends nothing; the replica
    // itself names the line and column of its request body. Nothing changes.
    let version = status(admin)["config_version"].clone();
    let bad_yaml = yaml.replacen("weight: 1", "weight: lots", 1);
    let line = 1 + bad_yaml
        .lines()
        .position(|l| l.contains("weight: lots"))
        .expect("a weight to spoil");
    let column = 1 + bad_yaml
        .lines()
        .nth(line - 1)
        .unwrap_or("")
        .find("lots")
        .unwrap_or(0);
    let bad = cluster.data[0].path().join("bad-pools.yaml");
    std::fs::write(&bad, &bad_yaml).expect("write");
    let b = bad.to_string_lossy().to_string();
    let (code, out, err) = blocking(|| ctl(admin, &["config", "apply", &b]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&format!("{b}:{line}:{column}: ")), "{err}");
    let put_yaml = |body: &str| {
        blocking(|| {
            http_request(
                admin,
                "PUT",
                "/api/v1/config",
                &[("Content-Type", "application/yaml")],
                body,
            )
        })
        .expect("PUT")
    };
    let node_local = format!("listeners: {{}}\n{yaml}");
    // Values every probe would fail on: the pool would go down on every replica.
    let with_check = |check: &str| {
        yaml.replacen(
            "  web:\n",
            &format!("  web:\n    health_check: {check}\n"),
            1,
        )
    };
    let spaced_path = with_check("{ path: \"/ready z\" }");
    let empty_sni = with_check("{ tls: { server_name: \"\" } }");
    // backend_tls behind this replica's passthrough listener `front`.
    let reencrypting = yaml.replacen("  web:\n", "  web:\n    backend_tls: {}\n", 1);
    assert_ne!(spaced_path, yaml, "the pool is there to spoil");
    for (body, says) in [
        (bad_yaml.as_str(), format!("request body:{line}:{column}: ")),
        (
            node_local.as_str(),
            "request body:1:1: listeners: only pools are replicated".to_string(),
        ),
        (
            spaced_path.as_str(),
            r#"pools.web.health_check.path: \"/ready z\" is not a URL path"#.to_string(),
        ),
        (
            empty_sni.as_str(),
            r#"pools.web.health_check.tls.server_name: \"\" is not a valid TLS server name"#
                .to_string(),
        ),
        (
            reencrypting.as_str(),
            "pools.web.backend_tls: backend_tls re-encrypts towards backends, so it needs tls: terminate on every listener of the pool, and listener front passes TLS through here".to_string(),
        ),
    ] {
        let (code, answer) = put_yaml(body);
        assert_eq!(code, 400, "{answer}");
        assert!(answer.contains(&says), "{says:?} not in {answer}");
    }
    assert_eq!(status(admin)["config_version"], version);

    // Remove node 4: it stops with a message and refuses to start on that data_dir.
    let scrape = || {
        http_get(admin, "/metrics")
            .map(|(_, text)| text)
            .unwrap_or_default()
    };
    let of_node_4 = |text: &str| {
        text.lines()
            .filter(|l| l.contains("member=\"4\"") || l.contains("peer=\"4\""))
            .count()
    };
    let before = blocking(scrape);
    assert!(of_node_4(&before) > 0, "{before}");
    // Through node 4 itself, which may never apply its own removal: the answer
    // lists the members without it.
    let (code, out, err) = blocking(|| {
        ctl(
            cluster.addrs[3].admin,
            &["-o", "json", "member", "remove", "4"],
        )
    });
    assert_eq!(code, 0, "member remove: {out}{err}");
    three_members_without(&out, 4);
    // Removed again, through the leader or a follower: not found, as an unknown
    // backend is; promoting it too.
    let leader = blocking(|| leader_of(admin)).expect("a leader") as usize - 1;
    let follower = (leader + 1) % 3;
    for at in [leader, follower] {
        for (method, path) in [
            ("DELETE", "/api/v1/members/4"),
            ("POST", "/api/v1/members/4/promote"),
        ] {
            let (status_code, body) = blocking(|| json(cluster.addrs[at].admin, method, path, ""));
            assert_eq!(
                status_code,
                404,
                "{method} {path} on node {}: {body}",
                at + 1
            );
            assert!(
                body.to_string().contains("node 4 is not a member"),
                "{body}"
            );
        }
    }
    // Its series leave the others' /metrics with it.
    let mut after = String::new();
    assert!(
        blocking(|| eventually(Duration::from_secs(5), || {
            after = scrape();
            of_node_4(&after) == 0
        })),
        "{after}"
    );
    let exit = blocking(|| fourth.wait_exit(Duration::from_secs(20)));
    assert!(
        exit.is_some(),
        "the removed replica did not stop:\n{}",
        fourth.log()
    );
    assert!(
        fourth.log().contains("removed from the cluster"),
        "{}",
        fourth.log()
    );
    // Its shutdown is clean (a fuzz run once met openraft's poisoned-lock panic here).
    assert!(!fourth.log().contains("panicked"), "{}", fourth.log());
    let mut again = Raftlb::spawn(&cluster.yaml(3, "existing"), cluster.addrs[3].admin);
    let exit = blocking(|| again.wait_exit(Duration::from_secs(20)));
    assert_eq!(exit.and_then(|s| s.code()), Some(2), "{}", again.log());
}

/// `member add` given another address than the new replica listens at: the leader
/// dials that one, nothing reaches the replica, and it says where it listens and
/// how to fix the membership; the fix lets it join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_at_the_wrong_address_says_where_it_listens() {
    raise_nofile();
    let cluster = Cluster::new(4, backend_names(&["b1"]).await);
    let (_replicas, _) = cluster.start_without_last();
    let admin = cluster.addrs[0].admin;
    let wrong = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    let (code, out, err) = blocking(|| ctl(admin, &["member", "add", "4", &wrong]));
    assert_eq!(code, 0, "member add: {out}{err}");
    let fourth = Raftlb::spawn(&cluster.yaml(3, "existing"), cluster.addrs[3].admin);
    let peer4 = cluster.addrs[3].peer.to_string();
    assert!(
        blocking(|| eventually(Duration::from_secs(20), || {
            let log = fourth.log();
            log.contains("no leader has reached this replica")
                && log.contains(&format!("listens at {peer4}"))
                && log.contains(&format!("raftlb ctl member add 4 {peer4}"))
        })),
        "{}",
        fourth.log()
    );
    let (code, out, err) = blocking(|| ctl(admin, &["member", "remove", "4"]));
    assert_eq!(code, 0, "member remove: {out}{err}");
    let (code, out, err) = blocking(|| ctl(admin, &["member", "add", "4", &peer4]));
    assert_eq!(code, 0, "member add: {out}{err}");
    assert!(
        blocking(|| eventually(Duration::from_secs(20), || {
            status(cluster.addrs[3].admin)["cluster"]["members"]
                .as_array()
                .is_some_and(|m| m.len() == 4)
        })),
        "{}",
        fourth.log()
    );
}

/// A cluster of three with a fourth member added as a learner, whose host then
/// died: killed, removed with `ctl member remove 4`, its data_dir wiped. The
/// cluster, its running replicas, and node 4's peer address.
async fn a_fourth_member_lost_and_removed() -> (Cluster, Vec<Raftlb>, String) {
    raise_nofile();
    let cluster = Cluster::new(4, backend_names(&["b1"]).await);
    let (replicas, _) = cluster.start_without_last();
    let admin = cluster.addrs[0].admin;
    let peer4 = cluster.addrs[3].peer.to_string();
    let (code, out, err) = blocking(|| ctl(admin, &["member", "add", "4", &peer4, "--learner"]));
    assert_eq!(code, 0, "member add: {out}{err}");
    let mut fourth = Raftlb::spawn(&cluster.yaml(3, "existing"), cluster.addrs[3].admin);
    blocking(|| fourth.wait_ready());
    fourth.signal("KILL");
    blocking(|| fourth.wait_exit(Duration::from_secs(5)));
    let (code, out, err) = blocking(|| ctl(admin, &["member", "remove", "4"]));
    assert_eq!(code, 0, "member remove: {out}{err}");
    let data = cluster.data[3].path();
    std::fs::remove_dir_all(data).expect("wipe");
    std::fs::create_dir(data).expect("data_dir");
    (cluster, replicas, peer4)
}

/// The README's way to rebuild a replica (member remove, wipe, member add, start
/// with `initial_state: existing`), done back to back: the leader still telling
/// the old process it was removed (it was down, so it never said it heard) must
/// not stop the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_removed_wiped_and_added_again_at_once_joins_and_stays() {
    let (cluster, _replicas, peer4) = a_fourth_member_lost_and_removed().await;
    let admin = cluster.addrs[0].admin;
    let (code, out, err) = blocking(|| ctl(admin, &["member", "add", "4", &peer4, "--learner"]));
    assert_eq!(code, 0, "member add again: {out}{err}");
    let mut again = Raftlb::spawn(&cluster.yaml(3, "existing"), cluster.addrs[3].admin);
    blocking(|| again.wait_ready());
    // The leader's notices to the old process came every 0.5-2.5 s.
    let exit = blocking(|| again.wait_exit(Duration::from_secs(6)));
    assert!(
        exit.is_none(),
        "the new node 4 stopped: {exit:?}\n{}",
        again.log()
    );
    assert!(!again.log().contains("was removed"), "{}", again.log());
}

/// etcd's way to replace a dead member: remove it, add a new one at the same
/// address. The leader's notices that the old one was removed reach the new
/// process there, and must not stop it: a request names the node it is for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_at_a_removed_members_address_is_not_told_it_was_removed() {
    let (cluster, _replicas, peer4) = a_fourth_member_lost_and_removed().await;
    let admin = cluster.addrs[0].admin;
    let (code, out, err) = blocking(|| ctl(admin, &["member", "add", "5", &peer4]));
    assert_eq!(code, 0, "member add 5: {out}{err}");
    let yaml = cluster
        .yaml(3, "existing")
        .replace("node_id: 4", "node_id: 5")
        .replace("lb-4", "lb-5")
        .replace(&format!("4: {peer4}"), &format!("5: {peer4}"));
    let mut fifth = Raftlb::spawn(&yaml, cluster.addrs[3].admin);
    blocking(|| fifth.wait_ready());
    // The leader tells the old node 4 every 0.5-2.5 s for about 20 s.
    let exit = blocking(|| fifth.wait_exit(Duration::from_secs(8)));
    assert!(exit.is_none(), "node 5 stopped: {exit:?}\n{}", fifth.log());
    assert!(!fifth.log().contains("was removed"), "{}", fifth.log());
    assert!(
        blocking(|| becomes_reachable_voter(admin, 5, Duration::from_secs(10))),
        "node 5 is not a reachable voter: {}",
        json(admin, "GET", "/api/v1/members", "").1
    );
}

/// Whether the members list through `admin` shows node `id` as a reachable voter
/// within `limit`.
fn becomes_reachable_voter(admin: SocketAddr, id: u64, limit: Duration) -> bool {
    eventually(limit, || {
        let (_, members) = json(admin, "GET", "/api/v1/members", "");
        members["members"].as_array().is_some_and(|m| {
            m.iter()
                .any(|m| m["id"] == id && m["voter"] == true && m["reachable"] == true)
        })
    })
}

/// Weight changes to backend b1 through `admin`, `n` of them, each committed.
fn weight_writes(admin: SocketAddr, n: u32) {
    for w in 0..n {
        let body = format!(r#"{{"weight": {}}}"#, w % 50 + 1);
        admin_ok(
            admin,
            "PATCH",
            "/api/v1/pools/web/backends/b1",
            &body,
            "a weight",
        );
    }
}

/// The README's way to rebuild a voter that had said "joined" (remove, wipe, add
/// again, start with `initial_state: existing`), with more than one append batch
/// (openraft sends 300 entries at a time) before its removal and between its
/// removal and its addition: catching up, it applies its old self's removal a
/// batch before the entry that adds it back, and must not take it for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_added_again_replays_its_old_removal_while_catching_up_and_stays() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1"]).await);
    let (mut replicas, _) = cluster.start_all();
    let admin = cluster.addrs[0].admin;
    assert!(
        blocking(|| eventually(Duration::from_secs(15), || replicas[2]
            .log()
            .contains("joined the cluster"))),
        "node 3 never said it joined:\n{}",
        replicas[2].log()
    );
    blocking(|| weight_writes(admin, 320));
    let (code, out, err) = blocking(|| ctl(admin, &["member", "remove", "3"]));
    assert_eq!(code, 0, "member remove: {out}{err}");
    let stopped = blocking(|| replicas[2].wait_exit(Duration::from_secs(10)));
    assert!(stopped.is_some(), "node 3 did not stop once removed");
    blocking(|| weight_writes(admin, 320));
    std::fs::remove_dir_all(cluster.data[2].path()).expect("wipe");
    std::fs::create_dir(cluster.data[2].path()).expect("data_dir");
    let peer3 = cluster.addrs[2].peer.to_string();
    let (code, out, err) = blocking(|| ctl(admin, &["member", "add", "3", &peer3]));
    assert_eq!(code, 0, "member add again: {out}{err}");
    let mut again = Raftlb::spawn(&cluster.yaml(2, "existing"), cluster.addrs[2].admin);
    blocking(|| again.wait_ready());
    assert!(
        blocking(|| becomes_reachable_voter(admin, 3, Duration::from_secs(20))),
        "node 3 is not a reachable voter again: {}\n{}",
        json(admin, "GET", "/api/v1/members", "").1,
        again.log()
    );
    let exit = blocking(|| again.wait_exit(Duration::from_secs(3)));
    assert!(exit.is_none(), "node 3 stopped: {exit:?}\n{}", again.log());
    assert!(!again.log().contains("was removed"), "{}", again.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_added_before_a_leader_change_is_promoted_by_the_next_leader() {
    raise_nofile();
    let cluster = Cluster::new(4, backend_names(&["b1"]).await);
    let mut replicas: Vec<Option<Raftlb>> = (0..3)
        .map(|i| Some(cluster.spawn_without_last(i)))
        .collect();
    blocking(|| {
        for r in replicas.iter_mut().flatten() {
            r.wait_ready();
        }
    });
    let leader = blocking(|| cluster.agreed_leader(3));

    // Node 4 is added but not started, so it cannot catch up under this leader...
    let peer4 = cluster.addrs[3].peer.to_string();
    let (code, out, err) =
        blocking(|| ctl(cluster.addrs[leader].admin, &["member", "add", "4", &peer4]));
    assert_eq!(code, 0, "member add: {out}{err}");
    // ...which dies first.
    let mut killed = replicas[leader].take().expect("leader process");
    blocking(|| {
        killed.signal("KILL");
        killed.wait_exit(Duration::from_secs(5));
    });
    let survivor = (leader + 1) % 3;
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || {
            leader_of(cluster.addrs[survivor].admin).is_some_and(|l| l as usize - 1 != leader)
        })),
        "no new leader after the kill"
    );
    let mut back = cluster.spawn_without_last(leader);
    blocking(|| back.wait_ready());
    replicas[leader] = Some(back);

    // The next leader promotes node 4 once it has caught up.
    let mut fourth = Raftlb::spawn(&cluster.yaml(3, "existing"), cluster.addrs[3].admin);
    blocking(|| fourth.wait_ready());
    assert!(
        blocking(
            || eventually(Duration::from_secs(20), || cluster.voters_seen_by(survivor)
                == 4)
        ),
        "node 4 was not promoted by the next leader:\n{}",
        fourth.log()
    );
}

/// A replica added as a learner (and kept one) names itself like every replica:
/// `members` shows its name and build, not "-".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_kept_a_learner_shows_its_name() {
    raise_nofile();
    let cluster = Cluster::new(4, backend_names(&["b1"]).await);
    let (_replicas, leader) = cluster.start_without_last();
    let peer4 = cluster.addrs[3].peer.to_string();
    let (code, out, err) = blocking(|| {
        ctl(
            cluster.addrs[leader].admin,
            &["member", "add", "4", &peer4, "--learner"],
        )
    });
    assert_eq!(code, 0, "member add --learner: {out}{err}");
    let mut fourth = Raftlb::spawn(&cluster.yaml(3, "existing"), cluster.addrs[3].admin);
    blocking(|| fourth.wait_ready());
    let mut seen = Value::Null;
    let named = blocking(|| {
        eventually(Duration::from_secs(20), || {
            let (_, members) = json(cluster.addrs[0].admin, "GET", "/api/v1/members", "");
            seen = members["members"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["id"] == 4).cloned())
                .unwrap_or(Value::Null);
            seen["name"] == "lb-4" && seen["version"].is_string()
        })
    });
    assert!(named, "the learner's entry: {seen}\n{}", fourth.log());
    assert_eq!(seen["voter"], false, "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_and_restore_into_a_new_cluster() {
    raise_nofile();
    let old = Cluster::new(3, backend_names(&["b1", "b2"]).await);
    let (mut replicas, leader) = blocking(|| old.start_all());
    let follower = (leader + 1) % 3;
    let admin = old.addrs[follower].admin;
    blocking(|| {
        for args in [
            &["backend", "drain", "web", "b1"][..],
            &["backend", "weight", "web", "b2", "5"][..],
        ] {
            let (code, out, err) = ctl(admin, args);
            assert_eq!(code, 0, "{args:?}: {out}{err}");
        }
    });

    // Online backup through a follower (a linearizable read through the leader).
    let scratch = tempfile::tempdir().expect("tempdir");
    let online = scratch.path().join("online.snap");
    let online_s = online.to_string_lossy().to_string();
    let (code, out, err) = blocking(|| ctl(admin, &["snapshot", "save", &online_s]));
    assert_eq!(code, 0, "ctl snapshot save: {out}{err}");
    assert!(
        out.contains("sha256") && out.contains("config_version 3"),
        "{out}"
    );

    // Offline backup: refused while the replica runs, works once it stopped.
    let offline = scratch.path().join("offline.snap");
    let offline_s = offline.to_string_lossy().to_string();
    // The third replica: neither the leader nor the follower the test talks to.
    let stopped = (leader + 2) % 3;
    let data = old.data[stopped].path().to_string_lossy().to_string();
    let save = || raftlb_cmd(&["snapshot", "save", "--data-dir", &data, &offline_s]);
    let (code, _, err) = blocking(save);
    assert_eq!(code, 2, "offline save of a running replica must fail");
    assert!(err.contains("still running"), "{err}");
    assert!(!offline.exists());
    replicas[stopped].signal("TERM");
    blocking(|| replicas[stopped].wait_exit(Duration::from_secs(10)));
    let (code, out, err) = blocking(save);
    assert_eq!(code, 0, "offline save: {out}{err}");
    assert!(out.contains("config_version 3"), "{out}");
    // A file that cannot be written is a runtime failure (exit 1), not a usage error.
    let unwritable = scratch.path().join("no-such-dir").join("x.snap");
    let (code, _, err) = blocking(|| {
        raftlb_cmd(&[
            "snapshot",
            "save",
            "--data-dir",
            &data,
            &unwritable.to_string_lossy(),
        ])
    });
    assert_eq!(code, 1, "an unwritable file: {err}");
    assert!(err.contains("cannot write"), "{err}");

    // A damaged backup is refused and leaves nothing behind.
    let new = Cluster {
        cluster_id: "restored",
        ..Cluster::new(3, backend_names(&["seed-only"]).await)
    };
    let bytes = std::fs::read(&online).expect("read backup");
    let initial = new.initial_cluster();
    let restore = |file: &str, i: usize| {
        let dir = new.data[i].path().to_string_lossy().to_string();
        let id = (i + 1).to_string();
        raftlb_cmd(&[
            "snapshot",
            "restore",
            file,
            "--data-dir",
            &dir,
            "--node-id",
            &id,
            "--cluster-id",
            "restored",
            "--initial-cluster",
            &initial,
        ])
    };
    let mut flipped = bytes.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x20;
    for (name, damaged, why) in [
        ("truncated", &bytes[..bytes.len() - 10], "truncated"),
        ("flipped", &flipped[..], "corrupt"),
    ] {
        let file = scratch.path().join(name);
        std::fs::write(&file, damaged).expect("write");
        let (code, _, err) = blocking(|| restore(&file.to_string_lossy(), 0));
        assert_eq!(code, 2, "{name} backup must be refused");
        assert!(err.contains(why), "{name}: {err}");
        assert_eq!(
            std::fs::read_dir(new.data[0].path()).expect("dir").count(),
            0,
            "a refused restore wrote something"
        );
    }

    // Restore the offline backup into three new members: they form a new cluster
    // with the old state (not their files' seed), and take writes.
    for i in 0..3 {
        let (code, out, err) = blocking(|| restore(&offline_s, i));
        assert_eq!(code, 0, "restore node {}: {out}{err}", i + 1);
    }
    let missing = scratch.path().join("missing.snap");
    let (code, _, err) = blocking(|| restore(&missing.to_string_lossy(), 0));
    assert_eq!(
        code, 2,
        "a backup file that is not there is a usage error: {err}"
    );
    assert!(err.contains("missing.snap"), "{err}");
    let (code, _, err) = blocking(|| restore(&offline_s, 0));
    assert_eq!(code, 2, "restoring over a used data_dir must fail");
    assert!(err.contains("holds a store already"), "{err}");
    let (mut restored, new_leader) = blocking(|| new.start_all());
    for a in &new.addrs {
        assert_eq!(blocking(|| drained(a.admin, "b1")), Some(true));
        let (_, b) = blocking(|| json(a.admin, "GET", "/api/v1/backends", ""));
        assert_eq!(b["pools"][0]["backends"][1]["weight"], 5, "{b}");
        assert_eq!(b["pools"][0]["backends"].as_array().map(Vec::len), Some(2));
    }
    let new_follower = new.addrs[(new_leader + 1) % 3].admin;
    let (code, out, err) = blocking(|| ctl(new_follower, &["backend", "undrain", "web", "b1"]));
    assert_eq!(code, 0, "write in the restored cluster: {out}{err}");
    for a in &new.addrs {
        assert!(blocking(|| eventually(Duration::from_secs(5), || drained(
            a.admin, "b1"
        )
            == Some(false))));
    }
    let status = blocking(|| status(new.addrs[0].admin));
    assert_eq!(status["cluster"]["cluster_id"], "restored", "{status}");
    assert_eq!(status["config_version"], 4, "{status}");
    // One member restored again from the same backup, once the cluster went on
    // without it, refuses to start: its log lacks what the others know it had.
    let again = (new_leader + 2) % 3;
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || restored[again]
            .log()
            .contains("joined the cluster"))),
        "{}",
        restored[again].log()
    );
    restored[again].signal("TERM");
    blocking(|| restored[again].wait_exit(Duration::from_secs(10)));
    let dir = new.data[again].path();
    std::fs::remove_dir_all(dir).expect("wipe");
    std::fs::create_dir(dir).expect("data_dir");
    let (code, out, err) = blocking(|| restore(&offline_s, again));
    assert_eq!(code, 0, "restore again: {out}{err}");
    let mut second = Raftlb::spawn(&new.yaml(again, "new"), new.addrs[again].admin);
    let exit = blocking(|| second.wait_exit(Duration::from_secs(20)));
    assert_eq!(exit.and_then(|e| e.code()), Some(2), "{}", second.log());
    assert!(
        second
            .log()
            .contains("and this data_dir was restored from the backup again"),
        "{}",
        second.log()
    );
    // The old cluster is untouched by the new one.
    assert_eq!(
        blocking(|| drained(admin, "b1")),
        Some(true),
        "{:?}\n{}",
        blocking(|| http_get(admin, "/api/v1/backends")),
        replicas[follower].log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_speak_mutual_tls_and_refuse_a_stranger() {
    raise_nofile();
    let certs = tempfile::tempdir().expect("tempdir");
    let pki = pki::Pki::new(certs.path(), "cluster");
    let peer = pki.peer("peer");
    let cluster = Cluster {
        cluster_extra: format!(
            "  tls: {{ cert: {}, key: {}, ca: {} }}\n",
            peer.cert.display(),
            peer.key.display(),
            pki.ca.display()
        ),
        ..Cluster::new(3, backend_names(&["b1", "b2"]).await)
    };
    let (replicas, leader) = blocking(|| cluster.start_all());
    let follower = cluster.addrs[(leader + 1) % 3].admin;
    let (code, out, err) = blocking(|| ctl(follower, &["backend", "drain", "web", "b1"]));
    assert_eq!(code, 0, "a write forwarded over mutual TLS: {out}{err}");
    for a in &cluster.addrs {
        assert!(blocking(|| eventually(Duration::from_secs(5), || drained(
            a.admin, "b1"
        )
            == Some(true))));
    }

    // A peer's hello over TLS: the same frame from a member's certificate, from a
    // stranger's (another CA), and without TLS at all. Only the first is answered.
    let target = cluster.addrs[0].peer;
    let hello = br#"{"cluster_id":"test","uuid":null,"from":9,"body":"Hello"}"#;
    let mut frame = (hello.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(hello);
    let answered = |bytes: &[u8]| bytes.windows(7).any(|w| w == b"\"Hello\"");
    let over_tls = |client: &pki::CertFiles| {
        let config = pki.client_config(Some(client), &[]);
        let frame = frame.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(target).await?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1")
                .map_err(std::io::Error::other)?;
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            // TLS 1.3: the server's verdict on the client certificate comes with the
            // first read.
            tls.write_all(&frame).await?;
            let mut len = [0u8; 4];
            tls.read_exact(&mut len).await?;
            let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
            tls.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        }
    };
    let member = pki.peer("member");
    let reply = tokio::time::timeout(Duration::from_secs(5), over_tls(&member)).await;
    assert!(
        matches!(&reply, Ok(Ok(r)) if answered(r)),
        "a member's hello over mutual TLS is answered: {reply:?}"
    );
    let node1 = &replicas[0];
    let refusals = || node1.log().matches("TLS handshake failed").count();
    let before = refusals();
    let other = pki::Pki::new(certs.path(), "other");
    let stranger = other.peer("stranger");
    let outcome = tokio::time::timeout(Duration::from_secs(5), over_tls(&stranger)).await;
    assert!(
        matches!(&outcome, Ok(Err(e)) if e.to_string().contains("alert")),
        "a certificate from another CA must be refused with a TLS alert: {outcome:?}"
    );
    assert!(
        blocking(|| eventually(Duration::from_secs(5), || refusals() > before)),
        "the stranger's refusal is logged:\n{}",
        node1.log()
    );
    let mut plain = tokio::net::TcpStream::connect(target)
        .await
        .expect("connect");
    let _ = plain.write_all(&frame).await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(12), plain.read_to_end(&mut sink)).await;
    assert!(!answered(&sink), "a plain-TCP peer got an answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_and_the_store_is_rebuilt_in_process_once_space_returns() {
    raise_nofile();
    let fs = Tmpfs::mount("6m");
    let cluster = Cluster::new(1, backend_names(&["b1"]).await);
    let data = fs.dir.path().join("data");
    let yaml = cluster.yaml(0, "new").replace(
        &cluster.data[0].path().display().to_string(),
        &data.display().to_string(),
    );
    let mut node = Raftlb::spawn(&yaml, cluster.addrs[0].admin);
    blocking(|| node.wait_ready());
    let admin = cluster.addrs[0].admin;
    let backend = cluster.backends[0].1;
    let put = |weight: u32| {
        json(
            admin,
            "PUT",
            "/api/v1/config",
            &big_pools(100, backend, weight),
        )
        .0
    };
    assert!(blocking(
        || eventually(Duration::from_secs(10), || put(1) == 200)
    ));

    let filler = fill(fs.dir.path());
    let mut refused = None;
    for i in 0..400 {
        let weight = 2 + i % 200;
        let code = blocking(|| put(weight));
        if code != 200 {
            refused = Some((weight, code));
            break;
        }
    }
    let (failed_at, code) = refused.expect("writes kept succeeding on a full disk");
    assert_eq!(code, 503, "a write on a full disk answers 503");
    // Still alive, still answering and proxying with the last applied config.
    assert!(
        node.child.try_wait().expect("try_wait").is_none(),
        "{}",
        node.log()
    );
    let (code, _) = blocking(|| json(admin, "GET", "/api/v1/status", ""));
    assert_eq!(code, 200);
    assert!(which_backend(cluster.addrs[0].listen, None).await.is_ok());
    assert_eq!(blocking(|| put(250)), 503, "still no space, still 503");
    // A little room comes back, not enough: the store is not reopened. One reopened
    // with room for a few small writes fails again at its next growth, and each brief
    // reopening lets writes (a lease's renewals) through.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .expect("filler");
    let len = f.metadata().expect("filler's size").len();
    f.set_len(len.saturating_sub(256 << 10)).expect("shrink");
    drop(f);
    std::thread::sleep(Duration::from_secs(4));
    assert!(!node.log().contains("store was reopened"), "{}", node.log());
    assert_eq!(blocking(|| put(250)), 503, "still no space, still 503");

    // Space returns: the same process reopens its store and takes writes again.
    std::fs::remove_file(&filler).expect("remove filler");
    assert!(
        blocking(|| eventually(Duration::from_secs(30), || put(251) == 200)),
        "writes did not come back once space returned:\n{}",
        node.log()
    );
    assert!(node.log().contains("store was reopened"), "{}", node.log());
    assert!(node.child.try_wait().expect("try_wait").is_none());

    // Nothing was corrupted: a restart from the same data_dir has the last write
    // (killed within milliseconds of it, it replays it from its own log).
    node.signal("KILL");
    blocking(|| node.wait_exit(Duration::from_secs(5)));
    let mut again = Raftlb::spawn(&yaml, admin);
    blocking(|| again.wait_ready());
    let weight = || {
        let (_, b) = json(admin, "GET", "/api/v1/backends", "");
        b["pools"][0]["backends"][0]["weight"].clone()
    };
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || weight() == 251)),
        "after restart: weight {}",
        blocking(weight)
    );
    eprintln!("full disk: the write with weight {failed_at} was the first refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_first_start_catches_up_and_different_timing_is_warned_about() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1", "b2"]).await);
    // Nodes 1 and 2 are a quorum of the three peers: they form the cluster alone.
    let mut replicas: Vec<Raftlb> = (0..2).map(|i| cluster.spawn(i)).collect();
    blocking(|| replicas.iter_mut().for_each(Raftlb::wait_ready));
    admin_ok(
        cluster.addrs[0].admin,
        "POST",
        "/api/v1/pools/web/backends/b1/drain",
        "",
        "drain",
    );

    // Node 3 starts for the first time afterwards, with another election timeout,
    // and a stale address for node 1 in its peers.
    let stale = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    let odd = cluster
        .yaml(2, "new")
        .replace("election_timeout: 1s", "election_timeout: 1200ms")
        .replace(
            &format!("1: {}", cluster.addrs[0].peer),
            &format!("1: {stale}"),
        );
    assert!(odd.contains(&stale), "{odd}");
    let mut late = Raftlb::spawn(&odd, cluster.addrs[2].admin);
    blocking(|| late.wait_ready());
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || drained(
            cluster.addrs[2].admin,
            "b1"
        ) == Some(true))),
        "the late replica did not catch up:\n{}",
        late.log()
    );
    assert!(blocking(|| eventually(Duration::from_secs(10), || {
        status(cluster.addrs[2].admin)["cluster"]["quorum_reachable"] == true
    })));
    assert!(
        !late.log().contains("cluster initialised"),
        "{}",
        late.log()
    );
    assert!(
        blocking(
            || eventually(Duration::from_secs(10), || late.log().contains(&format!(
                "peers[1] in the file is {stale}, but the Raft membership has node 1 at {}",
                cluster.addrs[0].peer
            )))
        ),
        "{}",
        late.log()
    );
    replicas.push(late);
    for r in &replicas {
        assert!(
            blocking(|| eventually(Duration::from_secs(10), || r
                .log()
                .contains("differ between replicas"))),
            "no warning:\n{}",
            r.log()
        );
    }
}

/// Rolling upgrade (etcd's cluster version): while node 3 still speaks peer
/// protocol 1, the cluster runs protocol 1: protocol-2 commands (each replica's
/// name and build, `members[].name`) wait, protocol-1 writes go through. Once node 3
/// is upgraded (restarted on this build) every voter announces 2, the cluster
/// version rises, the waiting commands commit, and nothing written meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_version_cluster_holds_newer_commands_until_the_last_replica_is_upgraded() {
    let c = Cluster::new(3, backend_names(&["b1", "b2"]).await);
    let old = ["env", "RAFTLB_TEST_PROTOCOL=1"];
    let mut replicas = [
        c.spawn(0),
        c.spawn(1),
        Raftlb::spawn_wrapped(&old, &c.yaml(2, "new"), c.addrs[2].admin),
    ];
    blocking(|| replicas.iter_mut().for_each(Raftlb::wait_ready));
    blocking(|| c.agreed_leader(3));
    admin_ok(
        c.addrs[2].admin,
        "POST",
        "/api/v1/pools/web/backends/b1/drain",
        "",
        "a protocol-1 write through the old replica",
    );
    let cluster = |i: usize| status(c.addrs[i].admin)["cluster"].clone();
    let names = |i: usize| -> Vec<Value> {
        cluster(i)["members"]
            .as_array()
            .map(|m| m.iter().map(|m| m["name"].clone()).collect())
            .unwrap_or_default()
    };
    // Several housekeeping rounds: still protocol 1, no names committed.
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..3 {
        let s = cluster(i);
        assert_eq!(s["cluster_version"], 1, "replica {i}: {s}");
        assert!(names(i).iter().all(Value::is_null), "replica {i}: {s}");
    }
    assert_eq!(cluster(2)["protocol"], 1);
    assert!(
        cluster(0)["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["id"] == 3 && m["protocol"] == 1)),
        "the leader's view shows node 3 at protocol 1: {}",
        cluster(0)
    );

    // Upgrade node 3: the same data_dir, this build's protocol.
    replicas[2].signal("TERM");
    assert!(blocking(|| replicas[2].wait_exit(Duration::from_secs(20))).is_some());
    replicas[2] = c.spawn(2);
    let expected: Vec<Value> = (1..=3).map(|i| Value::from(format!("lb-{i}"))).collect();
    assert!(
        blocking(|| eventually(Duration::from_secs(20), || (0..3)
            .all(|i| cluster(i)["cluster_version"] == 2 && names(i) == expected))),
        "after the upgrade: {} / {}",
        cluster(0),
        cluster(2)
    );
    for a in &c.addrs {
        assert_eq!(
            blocking(|| drained(a.admin, "b1")),
            Some(true),
            "the drain made while mixed"
        );
    }
}

/// `/readyz` is 503, and says why, while a listener's pool is missing from the
/// replicated config (replaced through the API by pools that lack it); 200 again
/// once the pool is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_not_serving_while_a_listeners_pool_is_missing() {
    let c = Cluster::new(1, backend_names(&["b1"]).await);
    let mut node = c.spawn(0);
    blocking(|| node.wait_ready());
    let admin = c.addrs[0].admin;
    let backend = c.backends[0].1;
    let put = |pool: &str| {
        let body = format!(
            r#"{{"pools": {{"{pool}": {{"backends": [{{"name": "b1", "address": "{backend}"}}]}}}}}}"#
        );
        blocking(|| json(admin, "PUT", "/api/v1/config", &body))
    };
    let readyz = || blocking(|| http_get(admin, "/readyz")).expect("readyz");
    // A write that would take a listener's pool away is refused by a replica whose
    // listener uses it, and changes nothing.
    let (code, reply) = put("other");
    assert_eq!(code, 400, "{reply}");
    assert!(
        reply
            .to_string()
            .contains("pools.web: listeners.front.pool names it here"),
        "{reply}"
    );
    assert_eq!(readyz().0, 200);
    // A listener reloaded onto a pool the store lacks (the file's pools only seed
    // a new cluster): not ready, and says why.
    let other = c.yaml(0, "new").replace("pool: web }", "pool: other }")
        + &format!("  other:\n    backends:\n      - {{ name: b1, address: {backend} }}\n");
    assert!(other.contains("pool: other }"), "{other}");
    node.rewrite_config(&other);
    node.signal("HUP");
    assert!(
        blocking(|| eventually(Duration::from_secs(5), || readyz().0 == 503)),
        "still ready without pool other: {:?}\n{}",
        readyz(),
        node.log()
    );
    assert!(
        readyz()
            .1
            .contains("listener front: pool other does not exist"),
        "{:?}",
        readyz()
    );
    // A write that leaves that pool missing is not refused for it: it was missing.
    let (code, reply) = put("web");
    assert_eq!(code, 200, "{reply}");
    let (code, reply) = put("other");
    assert_eq!(code, 200, "{reply}");
    assert!(
        blocking(|| eventually(Duration::from_secs(5), || readyz().0 == 200)),
        "not ready again with pool other there: {:?}",
        readyz()
    );
}

/// A port in use (peer, admin or listener) exits 1 with one line naming the port,
/// and the peer and admin ports are bound before anything is written to data_dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_exits_1_with_one_line_and_leaves_data_dir_untouched() {
    let c = Cluster::new(1, backend_names(&["b1"]).await);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("raftlb.yaml");
    std::fs::write(&config, c.yaml(0, "new")).expect("config");
    let config = config.to_string_lossy().to_string();
    let a = c.addrs[0];
    for (field, addr, untouched) in [
        ("cluster.bind", a.peer, true),
        ("admin.bind", a.admin, true),
        ("listeners.front.bind", a.listen, false),
    ] {
        let _taken = std::net::TcpListener::bind(addr).expect("take the port");
        let (code, _, err) = blocking(|| raftlb_cmd_timeout(&["run", "--config", &config], 20));
        assert_eq!(code, 1, "{field} in use: {err}");
        let line = format!("error: {field} {addr}: cannot listen: Address already in use");
        assert!(err.contains(&line), "{field}: expected {line:?} in\n{err}");
        if untouched {
            let written = std::fs::read_dir(c.data[0].path()).map_or(0, |d| d.count());
            assert_eq!(written, 0, "{field} in use: data_dir was written");
        }
    }
}

/// Status says what is true at the edges: a replica waiting for its peers says so
/// (no quorum figure, not serving, and why); with two of three replicas gone the
/// survivor shows them unreachable, a fault tolerance of 0 and the quorum lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_a_waiting_replica_and_a_lost_quorum_as_they_are() {
    let c = Cluster::new(3, backend_names(&["b1"]).await);
    let mut first = c.spawn(0);
    let admin = c.addrs[0].admin;
    assert!(blocking(|| eventually(Duration::from_secs(10), || status(
        admin
    )["cluster"]["waiting_for_peers"]
        == true)));
    let s = blocking(|| status(admin));
    assert!(s["cluster"]["quorum"].is_null(), "{s}");
    assert_eq!(s["serving"], false, "{s}");
    assert!(s["not_serving_because"].is_string(), "{s}");
    let (code, out, err) = blocking(|| ctl(admin, &["status"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("not formed yet"), "{out}");
    assert!(out.contains("serving         no:"), "{out}");

    let mut others = vec![c.spawn(1), c.spawn(2)];
    blocking(|| {
        first.wait_ready();
        others.iter_mut().for_each(Raftlb::wait_ready);
    });
    blocking(|| c.agreed_leader(3));
    for r in &mut others {
        r.signal("KILL");
        blocking(|| r.wait_exit(Duration::from_secs(10)));
    }
    assert!(
        blocking(|| eventually(Duration::from_secs(15), || {
            let s = status(admin)["cluster"].clone();
            s["quorum_reachable"] == false
                && s["fault_tolerance"] == 1
                && s["fault_tolerance_now"] == 0
                && s["voters_reachable"] == 1
        })),
        "{}",
        blocking(|| status(admin))
    );
    let s = blocking(|| status(admin))["cluster"].clone();
    let roles: Vec<&str> = s["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["id"] != 1)
        .filter_map(|m| m["role"].as_str())
        .collect();
    assert_eq!(roles, ["unreachable", "unreachable"], "{s}");
    let (_, out, _) = blocking(|| ctl(admin, &["status"]));
    assert!(
        out.contains("fault tolerance 1 (1 reachable, 0 now)"),
        "{out}"
    );
    assert!(out.contains("NOT reachable"), "{out}");

    // A write refused for lack of quorum says what it needs and who is missing.
    let version = blocking(|| status(admin))["config_version"].clone();
    assert!(version.is_u64(), "{version}");
    let (code, out, err) = blocking(|| ctl(admin, &["backend", "drain", "web", "b1"]));
    assert_eq!(code, 1, "{out}{err}");
    for needed in [
        "heard from 1 of 3 voters in the last 3 s (itself included); a write or a linearizable read needs 2 (a majority)",
        &format!("node 2 ({})", c.addrs[1].peer),
        &format!("node 3 ({})", c.addrs[2].peer),
        "nothing was changed",
    ] {
        assert!(err.contains(needed), "missing {needed:?} in {err}");
    }
    assert!(!err.contains("a majority answers"), "{err}");
    assert_eq!(blocking(|| status(admin))["config_version"], version);
    // A linearizable read fails too and names the local one, which answers.
    let (code, out, err) = blocking(|| ctl(admin, &["config", "get"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("config get --local"), "{err}");
    assert!(!err.contains("nothing was changed"), "a read: {err}");
    let (code, out, err) = blocking(|| ctl(admin, &["config", "get", "--local"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pools:") && out.contains("b1"), "{out}");
}

/// Five voters, three of them frozen: the leader and the follower left are a
/// minority. The follower still hears the leader's heartbeats, but neither it nor
/// the leader says there is a quorum or a leader, in status or in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_beside_a_leader_without_quorum_says_there_is_none() {
    raise_nofile();
    let c = Cluster::new(5, backend_names(&["b1"]).await);
    let (replicas, leader) = blocking(|| c.start_all());
    let follower = (leader + 1) % 5;
    let frozen: Vec<usize> = (0..5).filter(|i| *i != leader && *i != follower).collect();
    for i in &frozen {
        replicas[*i].signal("STOP");
    }
    let minority = blocking(|| {
        eventually(Duration::from_secs(15), || {
            let s = status(c.addrs[follower].admin)["cluster"].clone();
            s["quorum_reachable"] == false
                && replicas[follower].metric("raftlb_raft_quorum_reachable") == 0.0
                && replicas[follower].metric("raftlb_raft_has_leader") == 0.0
                && replicas[leader].metric("raftlb_raft_is_leader") == 0.0
        })
    });
    let seen = blocking(|| status(c.addrs[follower].admin))["cluster"].clone();
    for i in &frozen {
        replicas[*i].signal("CONT");
    }
    assert!(minority, "the follower beside a cut-off leader: {seen}");
    // Back to a majority: a leader with a quorum again, seen from the follower too.
    blocking(|| c.agreed_leader(5));
    assert!(blocking(|| eventually(Duration::from_secs(10), || {
        status(c.addrs[follower].admin)["cluster"]["quorum_reachable"] == true
    })));
}

/// A replica restarted with another peer address (its file changed since it joined):
/// the membership still has the old one, where the others dial it, and the replica
/// says so, with the way to move a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_advertising_another_address_than_its_membership_says_so() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1"]).await);
    let (mut replicas, _) = blocking(|| cluster.start_all());
    let old = cluster.addrs[2].peer;
    assert!(
        !replicas[2]
            .log()
            .contains("but the Raft membership has it at"),
        "{}",
        replicas[2].log()
    );
    replicas[2].signal("TERM");
    blocking(|| replicas[2].wait_exit(Duration::from_secs(20)));
    let moved = loopback();
    let yaml = cluster
        .yaml_with(2, "")
        .replace(&old.to_string(), &moved.to_string());
    let again = Raftlb::spawn(&yaml, cluster.addrs[2].admin);
    let said = format!(
        "advertises {moved} (cluster.advertise, else peers[3]), but the Raft membership has it at {old}"
    );
    assert!(
        blocking(|| eventually(Duration::from_secs(15), || again.log().contains(&said))),
        "{}",
        again.log()
    );
    assert!(
        again.log().contains("raftlb ctl member add 3"),
        "{}",
        again.log()
    );
    again.signal("KILL");
}

/// A committed pool that one replica's listeners refuse (`backend_tls` behind a
/// passthrough listener) keeps its old version there, and is applied there once a
/// reload gives that replica a terminating listener: the listeners decide what a
/// replica can take, so a change of them applies the committed pools again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_the_listeners_applies_a_refused_pool_again() {
    raise_nofile();
    let certs = tempfile::tempdir().expect("tempdir");
    let pki = pki::Pki::new(certs.path(), "lb");
    let server = pki.server("lb", &[]);
    let cluster = Cluster::new(3, backend_names(&["b1"]).await);
    let terminating = |i: usize| {
        cluster.yaml(i, "new").replace(
            "pool: web }",
            &format!(
                "pool: web, tls: terminate, terminate: {{ cert: {}, key: {} }} }}",
                server.cert.display(),
                server.key.display()
            ),
        )
    };
    // Replica 1 terminates TLS; replicas 2 and 3 pass it through.
    let mut replicas = vec![Raftlb::spawn(&terminating(0), cluster.addrs[0].admin)];
    replicas.extend((1..3).map(|i| cluster.spawn(i)));
    blocking(|| replicas.iter_mut().for_each(Raftlb::wait_ready));
    blocking(|| cluster.agreed_leader(3));
    let body = "pools:\n  web:\n    backend_tls: {}\n    backends:\n      - { name: b1, address: ADDR, weight: 7 }\n"
        .replace("ADDR", &cluster.backends[0].1.to_string());
    let (code, answer) = blocking(|| {
        http_request(
            cluster.addrs[0].admin,
            "PUT",
            "/api/v1/config",
            &[("Content-Type", "application/yaml")],
            &body,
        )
    })
    .expect("PUT");
    assert_eq!(code, 200, "{answer}");
    let weight = |i: usize| {
        let (_, b) = json(cluster.addrs[i].admin, "GET", "/api/v1/backends", "");
        b["pools"][0]["backends"][0]["weight"].as_u64()
    };
    let refused = |i: usize| {
        status(cluster.addrs[i].admin)["config_apply_errors"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert!(
        blocking(|| eventually(Duration::from_secs(5), || refused(1) == 1)),
        "{}",
        status(cluster.addrs[1].admin)
    );
    assert_eq!(
        blocking(|| weight(1)),
        Some(1),
        "replica 2 kept the old pool"
    );
    // Replica 2 now terminates TLS too: a reload applies the committed pool.
    replicas[1].rewrite_config(&terminating(1));
    replicas[1].signal("HUP");
    assert!(
        blocking(|| eventually(Duration::from_secs(5), || refused(1) == 0
            && weight(1) == Some(7))),
        "{}\n{}",
        status(cluster.addrs[1].admin),
        replicas[1].log()
    );
}

/// A committed pool whose certificate file is missing on this replica is not
/// applied here (its listener serves nothing, and `/readyz` says why); once the file
/// is there, the pool is applied within a few seconds, with no signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_ca_file_appears_later_is_applied_without_a_signal() {
    raise_nofile();
    let certs = tempfile::tempdir().expect("tempdir");
    let pki = pki::Pki::new(certs.path(), "apiservers");
    let ca = certs.path().join("late-ca.pem");
    let cluster = Cluster::new(1, backend_names(&["b1"]).await);
    let yaml = cluster.yaml(0, "new").replace(
        "pools:\n  web:\n",
        &format!(
            "pools:\n  web:\n    health_check: {{ kind: https, path: /readyz, tls: {{ ca: {} }} }}\n",
            ca.display()
        ),
    );
    let lb = Raftlb::spawn(&yaml, cluster.addrs[0].admin);
    let readyz = || {
        http_get(cluster.addrs[0].admin, "/readyz")
            .map_or(String::new(), |(c, b)| format!("{c} {b}"))
    };
    assert!(
        blocking(|| eventually(Duration::from_secs(15), || readyz()
            .contains("pool web is not applied here: pools.web.health_check.tls"))),
        "{}\n{}",
        readyz(),
        lb.log()
    );
    std::fs::copy(&pki.ca, &ca).expect("copy the CA");
    assert!(
        blocking(|| eventually(Duration::from_secs(15), || {
            status(cluster.addrs[0].admin)["config_apply_errors"]
                .as_array()
                .is_some_and(Vec::is_empty)
                && !readyz().contains("not applied")
        })),
        "{}\n{}",
        readyz(),
        lb.log()
    );
    assert_eq!(
        lb.log()
            .matches("cannot apply the committed pool here")
            .count(),
        1,
        "the failure is logged once, not at every look: {}",
        lb.log()
    );
}

/// Every backend write takes `If-Match` as `PUT /api/v1/config` does: a stale
/// version is 412 and changes nothing, on the leader and through a follower; the
/// current one (or `*`) is taken; ctl's `--if-version` sends it; `weight` takes the
/// weight as its third argument or as `--weight` (SPEC's form).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_writes_take_if_match() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1", "b2"]).await);
    let (_replicas, leader) = cluster.start_all_with("");
    let follower = cluster.addrs[(leader + 1) % 3].admin;
    let admin = cluster.addrs[leader].admin;
    let version = || status(admin)["config_version"].as_u64().expect("version");
    let send = |at: SocketAddr, method: &str, path: &str, tag: &str, body: &str| {
        blocking(|| {
            http_response(
                at,
                method,
                path,
                &[("Content-Type", "application/json"), ("If-Match", tag)],
                body,
            )
        })
        .expect("answer")
    };
    let weight_of = |name: &str| {
        let (_, b) = json(admin, "GET", "/api/v1/backends", "");
        b["pools"][0]["backends"]
            .as_array()
            .and_then(|bs| bs.iter().find(|x| x["name"] == name).cloned())
            .map(|x| x["weight"].clone())
    };
    let v = version();
    let tag = |v: u64| format!("\"{v}\"");
    let b1 = "/api/v1/pools/web/backends/b1";

    // Through a follower, the current version is taken.
    let r = send(follower, "PATCH", b1, &tag(v), r#"{"weight": 3}"#);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("etag"), Some(tag(v + 1).as_str()), "{r:?}");
    assert!(blocking(|| eventually(
        Duration::from_secs(5),
        || weight_of("b1") == Some(3.into())
    )));
    // The same version again is stale now, on either replica, for every write.
    for (at, method, path, body) in [
        (follower, "PATCH", b1, r#"{"weight": 9}"#),
        (admin, "PATCH", b1, r#"{"weight": 9}"#),
        (
            admin,
            "POST",
            "/api/v1/pools/web/backends",
            r#"{"name": "b3", "address": "127.0.0.1:9"}"#,
        ),
        (follower, "DELETE", "/api/v1/pools/web/backends/b2", ""),
        (admin, "POST", "/api/v1/pools/web/backends/b2/drain", ""),
    ] {
        let r = send(at, method, path, &tag(v), body);
        assert_eq!(r.status, 412, "{method} {path}: {r:?}");
        assert_eq!(r.header("etag"), Some(tag(v + 1).as_str()), "{r:?}");
        assert!(r.body.contains("no longer matches"), "{r:?}");
    }
    // A version not reached yet, and one that is not a version.
    assert_eq!(
        send(follower, "PATCH", b1, &tag(v + 50), r#"{"weight": 9}"#).status,
        412
    );
    assert_eq!(
        send(admin, "PATCH", b1, "seven", r#"{"weight": 9}"#).status,
        400
    );
    // A refusal of the write itself keeps its own status under If-Match.
    let r = send(
        admin,
        "POST",
        "/api/v1/pools/web/backends/nosuch/drain",
        &tag(v + 1),
        "",
    );
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(version(), v + 1, "a refused write changed the config");
    assert_eq!(weight_of("b1"), Some(3.into()));
    assert_eq!(weight_of("b3"), None);

    // ctl: --if-version on a backend command; SPEC's --weight form.
    let weight_if = |at: SocketAddr, version: u64| {
        let version = version.to_string();
        let args = [
            "backend",
            "weight",
            "web",
            "b1",
            "--weight",
            "5",
            "--if-version",
            &version,
        ];
        blocking(|| ctl(at, &args))
    };
    let (code, out, err) = weight_if(admin, v);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("412"), "{err}");
    let (code, out, err) = weight_if(follower, v + 1);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("set the weight of web/b1 to 5"), "{out}");
    let (code, out, err) = blocking(|| ctl(admin, &["backend", "weight", "web", "b1", "6"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(blocking(|| eventually(
        Duration::from_secs(5),
        || weight_of("b1") == Some(6.into())
    )));
    assert_eq!(version(), v + 3);

    // A read's query is checked too: a misspelt consistency is not a linearizable read.
    for (query, code) in [
        ("?consistency=local", 200),
        ("?consistency=linearizable", 200),
        ("?consistency=locl", 400),
        ("?Consistency=Local", 400),
    ] {
        let path = format!("/api/v1/config{query}");
        let r = blocking(|| http_response(follower, "GET", &path, &[], "")).expect("GET");
        assert_eq!(r.status, code, "{query}: {r:?}");
    }
}

/// A reload names each changed key of the cluster section, which applies only at
/// the next start: those that make that start refuse its data_dir, peers (read
/// only to bootstrap), and the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_says_what_each_changed_cluster_key_will_do() {
    raise_nofile();
    let cluster = Cluster::new(1, backend_names(&["b1"]).await);
    let mut node = Raftlb::spawn(&cluster.yaml(0, "new"), cluster.addrs[0].admin);
    blocking(|| node.wait_ready());
    let peer = cluster.addrs[0].peer;
    let edited = cluster
        .yaml(0, "new")
        .replace("cluster_id: test", "cluster_id: other")
        .replace(
            &format!("1: {peer}"),
            &format!("1: {peer}, 2: 127.0.0.1:1, 3: 127.0.0.1:2"),
        )
        .replace("heartbeat_interval: 100ms", "heartbeat_interval: 150ms");
    node.rewrite_config(&edited);
    node.signal("HUP");
    for said in [
        "reload: cluster.cluster_id changed; it takes effect at the next restart, which then refuses to start",
        "reload: cluster.peers changed; peers are read only to bootstrap a new cluster",
        "reload: other cluster settings changed; they take effect at the next restart",
    ] {
        assert!(
            blocking(|| eventually(Duration::from_secs(10), || node.log().contains(said))),
            "{said:?} not logged:\n{}",
            node.log()
        );
    }
    assert!(
        !node.log().contains("cluster.node_id changed"),
        "{}",
        node.log()
    );
}

/// A cluster grown one replica at a time, every file listing the final peers: the
/// second replica, started before the third exists, is vetted by the voters there
/// are (node 1), not held back waiting for a majority of its file's peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grown_one_replica_at_a_time_lets_each_join() {
    raise_nofile();
    let cluster = Cluster::new(3, backend_names(&["b1"]).await);
    let all = Addrs::peers(&cluster.addrs);
    let alone = format!("1: {}", cluster.addrs[0].peer);
    let yaml = cluster.yaml(0, "new").replace(&all, &alone);
    let mut first = Raftlb::spawn(&yaml, cluster.addrs[0].admin);
    blocking(|| first.wait_ready());
    let admin = cluster.addrs[0].admin;
    let peer2 = cluster.addrs[1].peer.to_string();
    let (code, out, err) = blocking(|| ctl(admin, &["member", "add", "2", &peer2]));
    assert_eq!(code, 0, "member add 2: {out}{err}");
    let mut second = Raftlb::spawn(&cluster.yaml(1, "existing"), cluster.addrs[1].admin);
    blocking(|| second.wait_ready());
    assert!(
        blocking(|| becomes_reachable_voter(admin, 2, Duration::from_secs(20))),
        "node 2 did not become a voter: {}\n{}",
        json(admin, "GET", "/api/v1/members", "").1,
        second.log()
    );
}
