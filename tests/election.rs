//! Leader election with real `raftlb run` processes on loopback (`standby:
//! close_listeners`): exactly one replica accepts; kill -9 of the active, as Raft
//! leader and not; SIGSTOP past the lease then SIGCONT; SIGTERM hand-over; planned
//! transfer; an active cut off from the quorum steps down. Bounds get a second of
//! slack: speed is the failover benchmark's business.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::AsyncReadExt;

const LEASE: Duration = Duration::from_secs(4);
const RENEW: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_millis(500);
const ELECTION_TIMEOUT: Duration = Duration::from_millis(500);
const SLACK: Duration = Duration::from_secs(1);

struct Cluster {
    addrs: Vec<Addrs>,
    data: Vec<tempfile::TempDir>,
    backend: SocketAddr,
    /// `leader_election.standby`.
    standby: &'static str,
    /// More lines of `leader_election:` (indented two spaces), e.g. hooks.
    election_extra: String,
}

impl Cluster {
    async fn new(n: usize) -> Cluster {
        raise_nofile();
        Cluster {
            addrs: Addrs::for_replicas(n),
            data: data_dirs(n),
            backend: named_backend("backend").await,
            standby: "close_listeners",
            election_extra: String::new(),
        }
    }

    fn yaml(&self, i: usize) -> String {
        let a = self.addrs[i];
        format!(
            "node: {{ name: lb-{id} }}\n\
             admin: {{ bind: {admin} }}\n\
             runtime: {{ shutdown_grace: 2s }}\n\
             cluster:\n  cluster_id: election\n  node_id: {id}\n  bind: {peer}\n  data_dir: {data}\n  \
             peers: {{ {peers} }}\n  heartbeat_interval: 100ms\n  election_timeout: {et}ms\n\
             leader_election:\n  lease_duration: {lease}ms\n  renew_deadline: {renew}ms\n  retry_period: {retry}ms\n  standby: {standby}\n{extra}\
             listeners:\n  front: {{ bind: {listen}, pool: web }}\n\
             pools:\n  web:\n    backends:\n      - {{ name: b, address: {backend} }}\n",
            id = i + 1,
            admin = a.admin,
            peer = a.peer,
            listen = a.listen,
            data = self.data[i].path().display(),
            peers = Addrs::peers(&self.addrs),
            et = ELECTION_TIMEOUT.as_millis(),
            lease = LEASE.as_millis(),
            renew = RENEW.as_millis(),
            retry = RETRY.as_millis(),
            backend = self.backend,
            standby = self.standby,
            extra = self.election_extra,
        )
    }

    /// on_active and on_standby append "on_active|on_standby ROLE EPOCH" to the
    /// file this returns, in `dir`.
    fn log_role_hooks(&mut self, dir: &std::path::Path) -> std::path::PathBuf {
        let log = dir.join("hooks.log");
        let hook = hook_script(
            dir,
            &format!(
                "echo \"$1 $RAFTLB_ROLE $RAFTLB_EPOCH\" >> {}",
                log.display()
            ),
        );
        self.election_extra = format!(
            "  on_active: {hook} on_active\n  on_standby: {hook} on_standby\n",
            hook = hook.display()
        );
        log
    }

    fn spawn(&self, i: usize) -> Raftlb {
        Raftlb::spawn(&self.yaml(i), self.addrs[i].admin)
    }

    /// Starts every replica; waits until exactly one is active; its index.
    fn start_all(&self) -> (Vec<Raftlb>, usize) {
        let replicas: Vec<Raftlb> = (0..self.addrs.len()).map(|i| self.spawn(i)).collect();
        let active = self.one_active(&[], Duration::from_secs(20));
        (replicas, active)
    }

    /// Waits until exactly one replica (not among `dead`) says it is active and
    /// holds the lease, and the others, standby, all with election running; its
    /// index. With election off every replica says "active" and shows no lease, so
    /// a replica whose reload has not turned election on yet is not taken for it.
    fn one_active(&self, dead: &[usize], within: Duration) -> usize {
        let mut found = None;
        let ok = eventually(within, || {
            let statuses: Vec<(usize, Value)> = (0..self.addrs.len())
                .filter(|i| !dead.contains(i))
                .map(|i| (i, status(self.addrs[i].admin)))
                .collect();
            let role_of = |s: &Value| s["role"].as_str().unwrap_or("down").to_string();
            let active: Vec<usize> = statuses
                .iter()
                .filter(|(_, s)| role_of(s) == "active")
                .map(|(i, _)| *i)
                .collect();
            found = active.first().copied();
            // Ready: its listeners are open, not only its role.
            active.len() == 1
                && statuses.iter().all(|(i, s)| {
                    let holds = s["lease"]["holder_id"].as_u64() == Some(*i as u64 + 1);
                    match role_of(s).as_str() {
                        "active" => holds,
                        "standby" => !s["lease"].is_null(),
                        _ => false,
                    }
                })
                && ready(self.addrs[active[0]].admin)
        });
        assert!(ok, "no single active replica within {within:?}");
        found.expect("active")
    }

    /// Which replicas proxy a new connection right now.
    async fn accepting(&self, among: &[usize]) -> Vec<usize> {
        let mut yes = Vec::new();
        for &i in among {
            if proxies(self.addrs[i].listen).await {
                yes.push(i);
            }
        }
        yes
    }

    /// Every replica is ready (it applied the replicated config, whatever its role),
    /// and every one proxies a new connection: `standby: serve` or election off.
    async fn all_serve(&self, what: &str) {
        let all: Vec<usize> = (0..self.addrs.len()).collect();
        assert!(
            eventually(Duration::from_secs(10), || all
                .iter()
                .all(|i| ready(self.addrs[*i].admin))),
            "{what}: not every replica is ready"
        );
        assert_eq!(self.accepting(&all).await, all, "{what}");
    }
}

fn status(addr: SocketAddr) -> Value {
    match http_get(addr, "/api/v1/status") {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn role(addr: SocketAddr) -> String {
    status(addr)["role"].as_str().unwrap_or("down").to_string()
}

fn epoch(addr: SocketAddr) -> u64 {
    status(addr)["lease"]["epoch"].as_u64().unwrap_or(0)
}

fn ready(addr: SocketAddr) -> bool {
    http_get(addr, "/readyz").is_ok_and(|(code, _)| code == 200)
}

/// A new connection through `listen` reaches the backend.
async fn proxies(listen: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(listen).await.ok()?;
        let mut line = String::new();
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            line.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        Some(line)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .is_some_and(|l| l.trim() == "backend")
}

fn raft_leader(addr: SocketAddr) -> Option<u64> {
    status(addr)["cluster"]["leader_id"].as_u64()
}

fn ctl(admin: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let server = format!("http://{admin}");
    let mut all = vec!["ctl", "--server", server.as_str()];
    all.extend_from_slice(args);
    raftlb_cmd(&all)
}

/// Waits for a failover after the active `dead` went away at `since`: one other
/// replica active with a higher epoch, proxying; the time it took.
async fn failover(c: &Cluster, dead: usize, old_epoch: u64, since: Instant) -> (usize, Duration) {
    let new = c.one_active(&[dead], LEASE + RETRY + ELECTION_TIMEOUT * 4 + SLACK * 3);
    let took = since.elapsed();
    assert_ne!(new, dead);
    assert!(
        epoch(c.addrs[new].admin) > old_epoch,
        "a takeover makes a new epoch"
    );
    assert!(proxies(c.addrs[new].listen).await, "the new active proxies");
    (new, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_active_accepts_and_a_killed_active_is_replaced() {
    let c = Cluster::new(3).await;
    let (replicas, active) = blocking(|| c.start_all());
    let all = [0, 1, 2];
    assert_eq!(
        c.accepting(&all).await,
        vec![active],
        "only the active accepts"
    );
    for i in all {
        assert_eq!(
            ready(c.addrs[i].admin),
            i == active,
            "/readyz of replica {i}"
        );
    }
    // A standby, whose listener is closed, exports its connection series at 0 too,
    // so that increase() after a failover counts the first connections.
    let standby = (active + 1) % 3;
    let mut metrics = String::new();
    for series in [
        r#"raftlb_connections_total{listener="front",pool="web",backend="b",result="ok"} 0"#,
        r#"raftlb_connections_total{listener="front",pool="web",backend="none",result="no_backend"} 0"#,
        r#"raftlb_bytes_total{listener="front",pool="web",backend="b",direction="to_client"} 0"#,
        r#"raftlb_active_connections{listener="front",pool="web",backend="b"} 0"#,
    ] {
        // Once the standby applied the replicated pools.
        let there = eventually(Duration::from_secs(5), || {
            metrics = replicas[standby].metrics();
            metrics.lines().any(|l| l == series)
        });
        assert!(there, "{series} not on the standby:\n{metrics}");
    }
    let s = status(c.addrs[active].admin);
    assert_eq!(s["lease"]["holder_id"], (active + 1) as u64);
    assert_eq!(s["lease"]["holder"], format!("lb-{}", active + 1));
    // The active asks for Raft leadership at takeover.
    assert!(
        eventually(Duration::from_secs(5), || raft_leader(
            c.addrs[active].admin
        ) == Some((active + 1) as u64)),
        "the active did not become the Raft leader"
    );
    let metrics = replicas[active].metrics();
    assert!(
        metrics.contains("raftlb_leader_election_is_active 1"),
        "{metrics}"
    );
    let old_epoch = epoch(c.addrs[active].admin);

    replicas[active].signal("KILL");
    let killed = Instant::now();
    let (new, took) = failover(&c, active, old_epoch, killed).await;
    eprintln!("kill -9 of the active (Raft leader): replica {new} active after {took:?}");
    assert!(
        took >= LEASE - RETRY * 2,
        "a standby waited the lease out ({took:?})"
    );
    let rest: Vec<usize> = all.into_iter().filter(|i| *i != active).collect();
    assert_eq!(c.accepting(&rest).await, vec![new]);
    let log = replicas[new].log();
    assert!(log.contains("became active"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_active_that_is_not_the_raft_leader_is_replaced() {
    let c = Cluster::new(3).await;
    let (replicas, active) = blocking(|| c.start_all());
    assert!(eventually(Duration::from_secs(5), || raft_leader(
        c.addrs[active].admin
    ) == Some(
        (active + 1) as u64
    )));
    // Move Raft leadership to a standby, as an operator before maintenance would.
    let standby = (active + 1) % 3;
    let to = (standby + 1).to_string();
    let (code, out, err) = blocking(|| ctl(c.addrs[active].admin, &["raft", "move-leader", &to]));
    assert_eq!(code, 0, "move-leader: {out}{err}");
    assert!(
        eventually(Duration::from_secs(5), || c
            .addrs
            .iter()
            .all(|a| raft_leader(a.admin) == Some((standby + 1) as u64))),
        "Raft leadership did not move on every replica"
    );
    assert_eq!(role(c.addrs[active].admin), "active", "the lease stays put");
    let old_epoch = epoch(c.addrs[active].admin);
    replicas[active].signal("KILL");
    let (new, took) = failover(&c, active, old_epoch, Instant::now()).await;
    eprintln!("kill -9 of the active (not the Raft leader): replica {new} active after {took:?}");
    // The Raft leader survived, so nothing but the lease holds the standbys back,
    // and they wait it out all the same.
    assert!(
        took >= LEASE - RETRY * 2,
        "a standby took the lease before it ran out ({took:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_paused_past_its_lease_never_accepts_after_it_resumes() {
    let c = Cluster::new(3).await;
    let (replicas, active) = blocking(|| c.start_all());
    let old_epoch = epoch(c.addrs[active].admin);
    replicas[active].signal("STOP");
    let stopped = Instant::now();
    let (new, _) = failover(&c, active, old_epoch, stopped).await;
    // The paused process's kernel still completes handshakes into its backlog.
    let queued = tokio::spawn(proxies(c.addrs[active].listen));
    tokio::time::sleep(Duration::from_millis(300)).await;
    replicas[active].signal("CONT");
    assert!(
        !queued.await.expect("join"),
        "a client queued while the old active was paused must not be proxied"
    );
    assert!(
        !proxies(c.addrs[active].listen).await,
        "the resumed old active accepts"
    );
    assert!(
        eventually(Duration::from_secs(5), || role(c.addrs[active].admin)
            == "standby"),
        "the resumed old active did not turn standby"
    );
    assert_eq!(c.accepting(&[0, 1, 2]).await, vec![new]);
    let log = replicas[active].log();
    assert!(log.contains("stepped down"), "{log}");
}

/// SPEC "Persistence": a full disk never keeps an active replica active. Its store
/// fails, so it cannot renew and steps down within renew_deadline; a standby takes
/// the lease once it has expired; the store is not reopened while the disk is
/// full, and once space returns the replica rejoins, as a standby, without a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_whose_disk_fills_steps_down_and_rejoins_once_space_returns() {
    let c = Cluster::new(3).await;
    let mut disks = Vec::new();
    for _ in 0..3 {
        disks.push(Tmpfs::mount("16m"));
    }
    let yaml = |i: usize| {
        c.yaml(i).replace(
            &c.data[i].path().display().to_string(),
            &disks[i].dir.path().display().to_string(),
        )
    };
    let replicas: Vec<Raftlb> = (0..3)
        .map(|i| Raftlb::spawn(&yaml(i), c.addrs[i].admin))
        .collect();
    let active = blocking(|| c.one_active(&[], Duration::from_secs(20)));
    // Stepped down, as its admin API says (not merely "not active", which a dead
    // process or a failed status call would also be).
    let stepped_down = |i: usize| matches!(role(c.addrs[i].admin).as_str(), "standby" | "fault");

    // Its disk fills; writes through a standby grow every replica's store, and the
    // active's fails (small renewals alone may fit in pages its file holds).
    let filler = fill(disks[active].dir.path());
    let standby = (0..3).find(|i| *i != active).expect("a standby");
    let failed = || replicas[active].log().contains("the Raft store failed");
    for weight in 1..=100 {
        if failed() {
            break;
        }
        let body = big_pools(100, c.backend, weight);
        let _ =
            blocking(|| http_request(c.addrs[standby].admin, "PUT", "/api/v1/config", &[], &body));
    }
    assert!(failed(), "{}", replicas[active].log());
    assert!(
        blocking(|| eventually(RENEW + SLACK, || stepped_down(active))),
        "still active on a full disk:\n{}",
        replicas[active].log()
    );
    let new = blocking(|| c.one_active(&[active], LEASE + RENEW + SLACK));
    assert_ne!(new, active);
    assert_eq!(c.accepting(&[0, 1, 2]).await, vec![new]);
    // Still full: the store stays shut, the replica stays standby.
    std::thread::sleep(RENEW);
    let log = replicas[active].log();
    assert!(!log.contains("store was reopened"), "{log}");
    assert!(stepped_down(active), "{log}");

    std::fs::remove_file(&filler).expect("remove filler");
    assert!(
        blocking(|| eventually(Duration::from_secs(30), || replicas[active]
            .log()
            .contains("store was reopened"))),
        "{}",
        replicas[active].log()
    );
    assert!(
        blocking(
            || eventually(Duration::from_secs(10), || role(c.addrs[active].admin)
                == "standby"
                && status(c.addrs[active].admin)["lease"]["holder_id"].as_u64()
                    == Some(new as u64 + 1))
        ),
        "{}",
        status(c.addrs[active].admin)
    );
    assert_eq!(c.accepting(&[0, 1, 2]).await, vec![new]);
}

/// SIGTERM on an active whose standbys were killed a moment before: its release
/// cannot commit, and it does not then try to hand Raft leadership to voters it
/// heard from a moment ago, since no quorum is left to elect one (that waited for
/// a new lease holder and a new leader, over a second, before draining).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_a_quorum_does_not_try_to_hand_raft_leadership_over() {
    let c = Cluster::new(3).await;
    // A term short enough that the release gives up while the killed standbys still
    // count as heard from (3 s).
    let yaml = |i| {
        c.yaml(i)
            .replace("renew_deadline: 3000ms", "renew_deadline: 1500ms")
    };
    let mut replicas: Vec<Raftlb> = (0..3)
        .map(|i| Raftlb::spawn(&yaml(i), c.addrs[i].admin))
        .collect();
    let active = blocking(|| c.one_active(&[], Duration::from_secs(20)));
    assert!(eventually(Duration::from_secs(5), || raft_leader(
        c.addrs[active].admin
    ) == Some(
        (active + 1) as u64
    )));
    for i in (0..3).filter(|i| *i != active) {
        replicas[i].signal("KILL");
        blocking(|| replicas[i].wait_exit(Duration::from_secs(5)));
    }
    replicas[active].signal("TERM");
    let exit = blocking(|| replicas[active].wait_exit(Duration::from_secs(15)));
    assert!(exit.is_some_and(|s| s.success()), "exit 0 after SIGTERM");
    // (Its release did not commit either, if its term had not ended by the signal.)
    let log = replicas[active].log();
    assert!(
        log.contains("no quorum: Raft leadership is not handed over"),
        "{log}"
    );
    assert!(
        !log.contains("transfer_leader") && !log.contains("hand Raft leadership"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_lease_over_without_waiting_for_it_to_expire() {
    let c = Cluster::new(3).await;
    let (mut replicas, active) = blocking(|| c.start_all());
    // Steady state: the active took Raft leadership after its takeover.
    assert!(eventually(Duration::from_secs(5), || raft_leader(
        c.addrs[active].admin
    ) == Some(
        (active + 1) as u64
    )));
    let old_epoch = epoch(c.addrs[active].admin);
    replicas[active].signal("TERM");
    let sent = Instant::now();
    let new = c.one_active(&[active], LEASE);
    let took = sent.elapsed();
    eprintln!("SIGTERM hand-over: replica {new} active after {took:?}");
    assert!(
        took < RETRY + SLACK,
        "the standby took over after {took:?}: the release was not used"
    );
    let new_epoch = epoch(c.addrs[new].admin);
    assert!(new_epoch > old_epoch);
    // The metric is the lease's epoch, on the standby too (not its own last term).
    let third = (0..3).find(|i| *i != active && *i != new).expect("a third");
    assert!(
        blocking(|| eventually(Duration::from_secs(5), || replicas[third]
            .metric("raftlb_leader_election_epoch")
            == new_epoch as f64)),
        "{}",
        replicas[third].metrics()
    );
    let exit = blocking(|| replicas[active].wait_exit(Duration::from_secs(10)));
    assert!(exit.is_some_and(|s| s.success()), "exit 0 after SIGTERM");
    let log = replicas[active].log();
    assert!(log.contains("released the lease"), "{log}");
    assert!(proxies(c.addrs[new].listen).await);
    // The new active stopped while the last standby is frozen: its release cannot
    // commit, and it says so instead of saying that it released the lease.
    let standby = (0..3).find(|i| *i != active && *i != new).expect("a third");
    replicas[standby].signal("STOP");
    replicas[new].signal("TERM");
    let exit = blocking(|| replicas[new].wait_exit(RENEW + Duration::from_secs(10)));
    replicas[standby].signal("CONT");
    assert!(exit.is_some_and(|s| s.success()), "exit 0 after SIGTERM");
    let log = replicas[new].log();
    assert!(log.contains("release did not commit"), "{log}");
    assert!(!log.contains("released the lease"), "{log}");
    // A standby stopped gives nothing up, and does not say it did.
    replicas[standby].signal("TERM");
    let exit = blocking(|| replicas[standby].wait_exit(Duration::from_secs(10)));
    assert!(exit.is_some_and(|s| s.success()), "exit 0 after SIGTERM");
    let log = replicas[standby].log();
    assert!(!log.contains("released the lease"), "{log}");
}

/// SPEC: a replica whose election settings differ from its peers' is warned about,
/// compared over the peer channel, at start and after a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_settings_that_differ_between_replicas_are_warned_about() {
    let c = Cluster::new(3).await;
    let ours = format!("lease_duration: {}ms", LEASE.as_millis());
    let longer = format!("lease_duration: {}ms", (LEASE + SLACK).as_millis());
    let mut replicas: Vec<Raftlb> = (0..2).map(|i| c.spawn(i)).collect();
    let odd = c.yaml(2).replace(&ours, &longer);
    assert_ne!(odd, c.yaml(2));
    replicas.push(Raftlb::spawn(&odd, c.addrs[2].admin));
    c.one_active(&[], Duration::from_secs(20));
    for r in &replicas {
        assert!(
            blocking(|| eventually(Duration::from_secs(10), || r
                .log()
                .contains("leader_election timing differs between replicas"))),
            "no warning:\n{}",
            r.log()
        );
    }
    assert!(!replicas[0].log().contains("a replica with it off serves"));
    // Node 3 reloaded with the same timing but election off: it would serve beside
    // the active, and says so.
    let off = c
        .yaml(2)
        .replace("leader_election:\n", "leader_election:\n  enabled: false\n");
    assert_ne!(off, c.yaml(2));
    replicas[2].rewrite_config(&off);
    replicas[2].signal("HUP");
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || replicas[2]
            .log()
            .contains("leader election is on on node"))),
        "no warning:\n{}",
        replicas[2].log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_sent_to_any_replica_moves_the_active_role() {
    let c = Cluster::new(3).await;
    let (replicas, active) = blocking(|| c.start_all());
    let old_epoch = epoch(c.addrs[active].admin);
    let target = (active + 2) % 3;
    let via = (active + 1) % 3;
    let to = (target + 1).to_string();
    // Sent to a standby: forwarded to the active, which alone may give it away. The
    // standby may not have applied the lease yet (503, nothing changed): ask again.
    let mut answer = (1, String::new(), String::new());
    blocking(|| {
        eventually(Duration::from_secs(5), || {
            answer = ctl(c.addrs[via].admin, &["leader", "transfer", &to]);
            !answer.2.contains("no replica holds the lease")
        })
    });
    let (code, out, err) = answer;
    assert_eq!(code, 0, "leader transfer: {out}{err}");
    // The record the forwarding replica reports is the new one, not the one it had.
    assert!(
        out.contains(&format!("handed to node {to}"))
            || out.contains(&format!("held by node {to}")),
        "{out}"
    );
    let new = c.one_active(&[], Duration::from_secs(5));
    assert_eq!(new, target, "the chosen replica became active");
    assert!(epoch(c.addrs[new].admin) > old_epoch);
    assert!(proxies(c.addrs[target].listen).await);
    // Handed straight back, and on again: each named successor takes it at once,
    // although it gave the lease away itself less than a lease_duration ago (it
    // holds off the lease then, and once waited that out with nobody active).
    for (to, now_active) in [(active, active), (target, target)] {
        let (code, out, err) = blocking(|| {
            ctl(
                c.addrs[via].admin,
                &["leader", "transfer", &(to + 1).to_string()],
            )
        });
        assert_eq!(code, 0, "leader transfer back: {out}{err}");
        assert_eq!(c.one_active(&[], LEASE / 2), now_active);
    }
    // A transfer to an unknown node is refused and changes nothing.
    let (code, _, err) = blocking(|| ctl(c.addrs[via].admin, &["leader", "transfer", "9"]));
    assert_ne!(code, 0);
    assert!(err.contains("not a voter"), "{err}");
    assert_eq!(c.one_active(&[], Duration::from_secs(2)), target);

    // A transfer to a replica that is down is refused: it would never take the
    // lease, and no replica would be active until the lease expired.
    replicas[via].signal("KILL");
    let down = via as u64 + 1;
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || {
            status(c.addrs[target].admin)["cluster"]["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["id"] == down && m["reachable"] == false))
        })),
        "the active never saw node {down} down"
    );
    let (code, out, err) = blocking(|| {
        ctl(
            c.addrs[target].admin,
            &["leader", "transfer", &down.to_string()],
        )
    });
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("is not reachable"), "{err}");
    // Sent through the standby left, it is the active that refuses, and it says so.
    let standby = (0..3).find(|i| *i != via && *i != target).expect("a third");
    let (code, out, err) = blocking(|| {
        ctl(
            c.addrs[standby].admin,
            &["leader", "transfer", &down.to_string()],
        )
    });
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("refused") && err.contains("is not reachable"),
        "{err}"
    );
    assert!(!err.contains("cannot reach the active"), "{err}");
    assert_eq!(c.one_active(&[via], Duration::from_secs(2)), target);
    assert!(proxies(c.addrs[target].listen).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_cut_off_from_the_quorum_steps_down_within_its_renew_deadline() {
    let c = Cluster::new(3).await;
    let (replicas, active) = blocking(|| c.start_all());
    let others: Vec<usize> = (0..3).filter(|i| *i != active).collect();
    for &i in &others {
        replicas[i].signal("STOP");
    }
    let cut = Instant::now();
    assert!(
        eventually(RENEW + SLACK * 2, || role(c.addrs[active].admin)
            == "standby"),
        "the survivor is still active after {:?}",
        cut.elapsed()
    );
    let took = cut.elapsed();
    eprintln!("survivor stepped down after {took:?}");
    assert!(took <= RENEW + SLACK, "stepped down after {took:?}");
    assert!(
        !proxies(c.addrs[active].listen).await,
        "a minority replica accepts"
    );
    assert!(!ready(c.addrs[active].admin));
    for &i in &others {
        replicas[i].signal("CONT");
    }
    c.one_active(&[], LEASE * 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_that_cannot_bind_its_listener_gives_the_lease_up() {
    let c = Cluster::new(3).await;
    let (replicas, active) = blocking(|| c.start_all());
    // Something else (a kube-apiserver, say) holds the listener's port on replica X.
    let x = (active + 1) % 3;
    let squatter = std::net::TcpListener::bind(c.addrs[x].listen).expect("hold the port");
    let to = (x + 1).to_string();
    let (code, out, err) = blocking(|| ctl(c.addrs[active].admin, &["leader", "transfer", &to]));
    assert_eq!(code, 0, "leader transfer: {out}{err}");
    let mut seen = Value::Null;
    assert!(
        eventually(Duration::from_secs(5), || {
            seen = status(c.addrs[x].admin);
            seen["role"] == "fault"
        }),
        "replica {x} did not go to fault"
    );
    // Status says why (rule 7), and so does readiness.
    assert!(
        seen["fault"]
            .as_str()
            .is_some_and(|f| f.contains("cannot listen")),
        "{seen}"
    );
    assert!(
        seen["not_serving_because"]
            .as_str()
            .is_some_and(|f| f.starts_with("fault: ") && f.contains("cannot listen")),
        "{seen}"
    );
    // It released the lease: another replica takes it (a free lease at once).
    let new = c.one_active(&[x], LEASE + SLACK);
    assert_ne!(new, x);
    assert!(proxies(c.addrs[new].listen).await);
    let metrics = replicas[x].metrics();
    assert!(
        metrics.contains("raftlb_leader_election_transitions_total{to=\"fault\"} 1"),
        "{metrics}"
    );
    assert!(replicas[x].log().contains("giving the lease up"));
    // It sits out lease_duration, then is an ordinary standby again.
    assert!(
        eventually(LEASE + SLACK * 2, || role(c.addrs[x].admin) == "standby"),
        "replica {x} stayed in fault"
    );
    assert!(status(c.addrs[x].admin)["fault"].is_null());
    drop(squatter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_member_cluster_elects_itself_through_the_same_lease() {
    let c = Cluster::new(1).await;
    let (_replicas, active) = blocking(|| c.start_all());
    assert_eq!(active, 0);
    let s = status(c.addrs[0].admin);
    assert_eq!(s["lease"]["holder_id"], 1);
    assert!(s["lease"]["epoch"].as_u64() >= Some(1));
    assert!(proxies(c.addrs[0].listen).await);
    assert!(ready(c.addrs[0].admin));
    let (code, out, err) = blocking(|| ctl(c.addrs[0].admin, &["status"]));
    assert_eq!(code, 0, "{err}");
    let lease_line = out.lines().find(|l| l.starts_with("lease")).unwrap_or("");
    assert!(
        lease_line.contains("holder lb-1 (node 1)")
            && lease_line.contains(&format!(", lease {} ms, expires in ", LEASE.as_millis())),
        "{out}"
    );
    assert_eq!(s["lease"]["waited_out_ms"], LEASE.as_millis() as u64, "{s}");
    // No one could take the lease: a transfer is refused, and the lone replica stays
    // active on the same epoch instead of sitting a lease_duration out.
    let (code, out, err) = blocking(|| ctl(c.addrs[0].admin, &["leader", "transfer"]));
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("no other voter is reachable"), "{err}");
    let after = status(c.addrs[0].admin);
    assert_eq!(after["role"], "active");
    assert_eq!(after["lease"]["holder_id"], 1);
    assert_eq!(after["lease"]["handed_over"], false);
    assert_eq!(after["lease"]["epoch"], s["lease"]["epoch"]);
    assert!(proxies(c.addrs[0].listen).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_standby_serve_every_replica_accepts_and_only_the_hooks_follow_the_role() {
    let mut c = Cluster::new(3).await;
    c.standby = "serve";
    let dir = tempfile::tempdir().expect("tempdir");
    let log = c.log_role_hooks(dir.path());
    let (replicas, active) = blocking(|| c.start_all());
    // Each replica is ready once it applied the replicated config, whatever its role.
    c.all_serve("with standby: serve, standbys serve too").await;
    let first = epoch(c.addrs[active].admin);
    assert!(
        eventually(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains(&format!("on_active active {first}")))),
        "on_active did not run: {:?}",
        std::fs::read_to_string(&log)
    );
    // A SIGTERM hand-over: the old active runs on_standby, the new one on_active.
    replicas[active].signal("TERM");
    let new = c.one_active(&[active], LEASE);
    let new_epoch = epoch(c.addrs[new].admin);
    assert!(
        eventually(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains(&format!("on_standby standby {first}"))
                && l.contains(&format!("on_active active {new_epoch}")))),
        "hooks: {:?}",
        std::fs::read_to_string(&log)
    );
    eprintln!("hooks ran: {:?}", std::fs::read_to_string(&log));
    // Only the hooks followed the role: the two that remain both accept still.
    let rest: Vec<usize> = (0..3).filter(|i| *i != active).collect();
    assert_eq!(
        c.accepting(&rest).await,
        rest,
        "standby: serve keeps every listener open across the hand-over"
    );
}

/// Rule 8: a SIGHUP that changes `standby` on the active releases the lease before
/// the new setting applies (a new epoch follows); every replica then serves with
/// `standby: serve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_standby_releases_the_lease_first() {
    let mut c = Cluster::new(3).await;
    let (replicas, active) = blocking(|| c.start_all());
    let all = [0, 1, 2];
    let standbys: Vec<usize> = all.iter().copied().filter(|i| *i != active).collect();
    assert_eq!(
        c.accepting(&all).await,
        vec![active],
        "close_listeners: only the active accepts"
    );
    let first = epoch(c.addrs[active].admin);
    let log = |i: usize| replicas[i].log();
    c.standby = "serve";
    // The first replica reloaded differs from its peers, and says so.
    let (head, rest) = (standbys[0], &standbys[1..]);
    replicas[head].rewrite_config(&c.yaml(head));
    replicas[head].signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || log(head)
            .contains("leader_election.standby is close_listeners on node")),
        "{}",
        log(head)
    );
    for i in rest.iter().copied().chain([active]) {
        replicas[i].rewrite_config(&c.yaml(i));
        replicas[i].signal("HUP");
    }
    assert!(
        eventually(Duration::from_secs(5), || log(active)
            .contains("reloaded the config")),
        "the active did not reload\n{}",
        log(active)
    );
    let text = log(active);
    let released = text
        .find("leader_election.standby changed; releasing the lease first")
        .unwrap_or_else(|| panic!("the active did not release first\n{text}"));
    let reloaded = text.find("reloaded the config").expect("reloaded");
    assert!(
        released < reloaded,
        "released after the reload applied\n{text}"
    );
    assert!(
        replicas[active].metric("raftlb_leader_election_transitions_total{to=\"standby\"}") >= 1.0
    );
    // A standby takes the freed lease as soon as it applies the release: its own
    // reload a moment before released nothing, so it does not sit out a
    // lease_duration (that left no replica active for up to a lease_duration).
    let new = blocking(|| c.one_active(&[], RETRY + SLACK * 2));
    assert!(epoch(c.addrs[new].admin) > first);
    c.all_serve("standbys serve after the reload").await;

    // And back: under `serve` the active's listeners do not follow the lease, so
    // they stop accepting before the release, not after it.
    c.standby = "close_listeners";
    for i in all.iter().copied().filter(|i| *i != new).chain([new]) {
        replicas[i].rewrite_config(&c.yaml(i));
        replicas[i].signal("HUP");
    }
    let reloads = |i: usize| log(i).matches("reloaded the config").count();
    assert!(
        eventually(Duration::from_secs(5), || all
            .iter()
            .all(|i| reloads(*i) == 2)),
        "not every replica reloaded"
    );
    let last = blocking(|| c.one_active(&[], RETRY + SLACK * 2));
    assert_eq!(c.accepting(&all).await, vec![last]);
    let text = log(new);
    let stopped = text.rfind("stopped accepting");
    let released = text.rfind("released the lease");
    assert!(
        stopped.is_some() && released.is_some() && stopped < released,
        "stop accepting, then release\n{text}"
    );
}

/// A standby's reload to `standby: serve` checks the listener addresses it will
/// open, as the active's does: one that cannot be opened refuses the whole reload,
/// and the standby keeps its mode (it was applied, and counted ok).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_reloaded_to_serve_onto_a_busy_address_refuses_the_reload() {
    let mut c = Cluster::new(3).await;
    let (replicas, active) = blocking(|| c.start_all());
    let standby = (0..3).find(|i| *i != active).expect("a standby");
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = holder.local_addr().expect("address");
    c.standby = "serve";
    let yaml = c.yaml(standby).replace(
        "listeners:\n",
        &format!("listeners:\n  extra: {{ bind: {busy}, pool: web }}\n"),
    );
    replicas[standby].rewrite_config(&yaml);
    replicas[standby].signal("HUP");
    let invalid = || replicas[standby].metric("raftlb_config_reloads_total{result=\"invalid\"}");
    assert!(
        eventually(Duration::from_secs(5), || invalid() == 1.0),
        "{}",
        replicas[standby].log()
    );
    let log = replicas[standby].log();
    assert!(log.contains(&format!("{busy}: cannot listen")), "{log}");
    assert!(!log.contains("standby changed"), "nothing applied\n{log}");
    assert_eq!(role(c.addrs[standby].admin), "standby");
    assert_eq!(c.accepting(&[0, 1, 2]).await, vec![active]);
    drop(holder);
}

/// Rule 8 for `enabled`: a SIGHUP that turns election off releases the lease first
/// and then every replica serves; turning it on again elects one active, and only
/// it accepts (`close_listeners`), with a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_election_off_and_on_again() {
    let mut c = Cluster::new(3).await;
    let (replicas, active) = blocking(|| c.start_all());
    let all = [0, 1, 2];
    assert_eq!(c.accepting(&all).await, vec![active]);
    let first = epoch(c.addrs[active].admin);
    let reload_all = |c: &Cluster| {
        for i in all.iter().copied().filter(|i| *i != active).chain([active]) {
            replicas[i].rewrite_config(&c.yaml(i));
            replicas[i].signal("HUP");
        }
    };

    c.election_extra = "  enabled: false\n".into();
    reload_all(&c);
    assert!(
        eventually(Duration::from_secs(10), || replicas[active]
            .log()
            .contains("leader election off: every replica serves")),
        "the active did not turn election off\n{}",
        replicas[active].log()
    );
    let text = replicas[active].log();
    let released = text
        .find("leader_election turned off; releasing the lease first")
        .unwrap_or_else(|| panic!("no release first\n{text}"));
    assert!(released < text.find("released the lease").expect("released"));
    c.all_serve("with election off every replica serves").await;
    assert!(
        status(c.addrs[active].admin)["lease"].is_null(),
        "no lease shown with election off"
    );
    // Only replicas with election on export the gauge an alert counts actives by.
    for i in all {
        let text = replicas[i].metrics();
        assert!(
            !text.contains("raftlb_leader_election_is_active"),
            "replica {i} with election off:\n{text}"
        );
    }

    c.election_extra = String::new();
    reload_all(&c);
    let new = blocking(|| c.one_active(&[], LEASE * 2 + SLACK));
    for i in all {
        assert!(
            replicas[i]
                .metrics()
                .contains("\nraftlb_leader_election_is_active "),
            "replica {i} with election on again"
        );
    }
    assert!(
        epoch(c.addrs[new].admin) > first,
        "a new epoch after election came back"
    );
    let accepting = c.accepting(&all).await;
    assert_eq!(
        accepting,
        vec![new],
        "only the new active accepts\n{}",
        all.iter()
            .map(|i| format!("--- replica {i}\n{}", replicas[*i].log()))
            .collect::<String>()
    );
}

/// A lone replica paused past its lease steps down when it resumes (its term ran
/// out), then takes its own lease again at once (nobody else can be active on it)
/// and opens its listeners again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_replica_paused_past_its_lease_serves_again_after_it_resumes() {
    let c = Cluster::new(1).await;
    let (replicas, _) = blocking(|| c.start_all());
    let first = epoch(c.addrs[0].admin);
    replicas[0].signal("STOP");
    tokio::time::sleep(LEASE + SLACK).await;
    replicas[0].signal("CONT");
    blocking(|| c.one_active(&[], Duration::from_secs(20)));
    let mut serves = false;
    for _ in 0..100 {
        if proxies(c.addrs[0].listen).await {
            serves = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        serves,
        "not serving after it resumed\n{}",
        replicas[0].log()
    );
    let log = replicas[0].log();
    assert!(epoch(c.addrs[0].admin) > first, "{log}");
    assert!(log.contains("stepped down"), "{log}");
}

/// Every replica starts as a standby and runs on_standby with epoch 0 before it can
/// run on_active, as keepalived runs notify_backup at start: after a kill -9 of the
/// active, its restart undoes what its on_active did before it takes the lease again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_runs_on_standby_when_it_starts_before_on_active() {
    let mut c = Cluster::new(1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = c.log_role_hooks(dir.path());
    let hooks_ran = |want: &str| {
        eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l == want)
        })
    };
    let (mut replicas, _) = blocking(|| c.start_all());
    let first = epoch(c.addrs[0].admin);
    let want = format!("on_standby standby 0\non_active active {first}\n");
    assert!(
        blocking(|| hooks_ran(&want)),
        "want {want:?}, hooks ran: {:?}",
        std::fs::read_to_string(&log)
    );
    replicas[0].signal("KILL");
    blocking(|| replicas[0].wait_exit(Duration::from_secs(5)));
    let restarted = c.spawn(0);
    blocking(|| c.one_active(&[], Duration::from_secs(20)));
    let second = epoch(c.addrs[0].admin);
    assert!(second > first, "epoch {second} after {first}");
    let want = format!("{want}on_standby standby 0\non_active active {second}\n");
    assert!(
        blocking(|| hooks_ran(&want)),
        "want {want:?}, hooks ran: {:?}\n{}",
        std::fs::read_to_string(&log),
        restarted.log()
    );
}

/// Rule 5 at shutdown: the on_standby hook the release fires runs to its end
/// before the process exits (each hook bounded by its timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_the_on_standby_hook_before_exiting() {
    let mut c = Cluster::new(1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("hooks.log");
    let hook = hook_script(
        dir.path(),
        &format!(
            "[ \"$RAFTLB_EPOCH\" = 0 ] && exit 0\nsleep 3\necho \"done $RAFTLB_ROLE\" >> {}",
            out.display()
        ),
    );
    c.election_extra = format!("  on_standby: {}\n", hook.display());
    let (mut replicas, _) = blocking(|| c.start_all());
    replicas[0].signal("TERM");
    let exit = blocking(|| replicas[0].wait_exit(Duration::from_secs(20)));
    assert!(
        exit.is_some_and(|e| e.success()),
        "exit: {exit:?}\n{}",
        replicas[0].log()
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap_or_default(),
        "done standby\n",
        "the on_standby hook did not finish before the exit"
    );
    // The wait is said, not silent.
    assert!(
        replicas[0].log().contains("waiting for the role hooks"),
        "{}",
        replicas[0].log()
    );
}

/// A second SIGTERM exits without waiting for the hooks, but not without them: a
/// running hook goes with everything it started (its process group), as on its
/// timeout, instead of being left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_takes_a_running_hook_and_what_it_started() {
    let mut c = Cluster::new(1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pid = dir.path().join("sleep.pid");
    let hook = hook_script(
        dir.path(),
        &format!(
            "[ \"$RAFTLB_EPOCH\" = 0 ] && exit 0\ntrap '' TERM\nsleep 300 &\necho $! > {}\nwait",
            pid.display()
        ),
    );
    c.election_extra = format!("  on_standby: {}\n", hook.display());
    let (mut replicas, _) = blocking(|| c.start_all());
    replicas[0].signal("TERM");
    // The shell creates the file before it writes the number into it.
    let written = || {
        std::fs::read_to_string(&pid)
            .ok()
            .filter(|p| p.ends_with('\n') && p.trim().parse::<u32>().is_ok())
    };
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || written().is_some())),
        "the on_standby hook did not start\n{}",
        replicas[0].log()
    );
    let sleeper = written().expect("pid");
    assert!(
        running(&sleeper),
        "the hook's child {sleeper} is not running"
    );
    replicas[0].signal("TERM");
    let exit = blocking(|| replicas[0].wait_exit(Duration::from_secs(5)));
    assert!(
        exit.is_some_and(|e| e.success()),
        "exit: {exit:?}\n{}",
        replicas[0].log()
    );
    let gone = blocking(|| eventually(Duration::from_secs(5), || !running(&sleeper)));
    if !gone {
        let _ = std::process::Command::new("kill")
            .args(["-9", sleeper.trim()])
            .status();
    }
    assert!(
        gone,
        "the hook's child {} outlived raftlb\n{}",
        sleeper.trim(),
        replicas[0].log()
    );
}

/// An executable shell script `dir/hook.sh` running `body`, for the role hooks.
fn hook_script(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let hook = dir.join("hook.sh");
    std::fs::write(&hook, format!("#!/bin/sh\n{body}\n")).expect("hook");
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    hook
}
