//! Leader election with a VIP, each replica a real `raftlb run` in its own network
//! namespace (tests/common/netns.rs): kill -9 of the active moves the VIP to a standby
//! and the dead replica's namespace loses the address by itself (kernel lifetime); an
//! active cut off by iptables withdraws its VIP within renew_deadline and a majority
//! replica takes it; the same with an IPv6 VIP. Reference timing (lease 2 s, renew
//! 1.5 s, retry 250 ms); bounds get a second of slack.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::eventually;
use common::netns::{Netns, Topology};

const LEASE: Duration = Duration::from_secs(2);
const RENEW: Duration = Duration::from_millis(1500);
const SLACK: Duration = Duration::from_secs(1);
const ADMIN: &str = "127.0.0.1:9090";

struct Replica {
    child: Child,
    dir: tempfile::TempDir,
}

impl Replica {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("raftlb.log")).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    topo: Topology,
    vip: IpAddr,
    replicas: Vec<Option<Replica>>,
}

impl Cluster {
    /// Three replicas with `vip` (`192.0.2.50` or `2001:db8::50`), a backend.
    fn start(vip: &str) -> Cluster {
        let topo = Topology::builder().replicas(3).build();
        let vip: IpAddr = vip.parse().expect("VIP");
        let six = vip.is_ipv6();
        let backend = backend(topo.backends(), six);
        let peer = |n: &Netns| match six {
            false => SocketAddr::new(IpAddr::V4(n.ipv4), 7400),
            true => SocketAddr::new(IpAddr::V6(n.ipv6), 7400),
        };
        let peers: Vec<String> = topo
            .replicas()
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{}: \"{}\"", i + 1, peer(n)))
            .collect();
        let prefix = if six { 64 } else { 24 };
        let listen = SocketAddr::new(vip, 6443);
        let mut replicas = Vec::new();
        for (i, ns) in topo.replicas().iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let yaml = format!(
                "node: {{ name: lb-{id} }}\nadmin: {{ bind: \"{ADMIN}\" }}\n\
                 runtime: {{ shutdown_grace: 1s }}\n\
                 cluster:\n  cluster_id: netns\n  node_id: {id}\n  bind: \"{me}\"\n  data_dir: {data}\n  \
                 peers: {{ {peers} }}\n  heartbeat_interval: 100ms\n  election_timeout: 300ms\n\
                 leader_election:\n  lease_duration: 2s\n  renew_deadline: 1500ms\n  retry_period: 250ms\n  \
                 vip: {{ address: \"{vip}/{prefix}\", interface: eth0 }}\n\
                 listeners:\n  api: {{ bind: \"{listen}\", pool: web }}\n\
                 pools:\n  web:\n    backends:\n      - {{ name: b, address: \"{backend}\" }}\n",
                id = i + 1,
                me = peer(ns),
                data = dir.path().join("data").display(),
                peers = peers.join(", "),
            );
            let config = dir.path().join("raftlb.yaml");
            std::fs::write(&config, yaml).expect("config");
            let log = std::fs::File::create(dir.path().join("raftlb.log")).expect("log");
            let child = ns
                .command(env!("CARGO_BIN_EXE_raftlb"))
                .args(["run", "--config"])
                .arg(&config)
                .args(["--log-level", "info"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn raftlb");
            replicas.push(Some(Replica { child, dir }));
        }
        Cluster {
            topo,
            vip,
            replicas,
        }
    }

    fn role(&self, i: usize) -> String {
        let body = self.topo.replica(i).run_inside(|| {
            common::http_get(ADMIN.parse().expect("admin"), "/api/v1/status")
                .map(|(_, b)| b)
                .unwrap_or_default()
        });
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["role"].as_str().map(str::to_string))
            .unwrap_or_else(|| "down".into())
    }

    /// Waits until exactly one live replica is active and holds the VIP; its index.
    fn one_active(&self, within: Duration) -> usize {
        let mut found = None;
        let ok = eventually(within, || {
            let live: Vec<usize> = (0..3).filter(|i| self.replicas[*i].is_some()).collect();
            let active: Vec<usize> = live
                .iter()
                .copied()
                .filter(|i| self.role(*i) == "active")
                .collect();
            found = active.first().copied();
            active.len() == 1 && self.topo.replica(active[0]).has_addr(self.vip)
        });
        assert!(
            ok,
            "no single active replica holding the VIP within {within:?}\n{}",
            self.logs()
        );
        found.expect("active")
    }

    /// The client reaches the backend through the VIP.
    fn client_reaches_backend(&self) -> bool {
        let vip = SocketAddr::new(self.vip, 6443);
        self.topo.client().run_inside(|| {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            let mut got = String::new();
            s.read_to_string(&mut got).ok()?;
            Some(got.trim() == "backend")
        }) == Some(true)
    }

    fn holders(&self) -> Vec<usize> {
        (0..3)
            .filter(|i| self.topo.replica(*i).has_addr(self.vip))
            .collect()
    }

    fn logs(&self) -> String {
        self.replicas
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.as_ref()
                    .map(|r| format!("--- replica {i}\n{}", tail(&r.log())))
            })
            .collect()
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A backend in its namespace that writes "backend" to each connection.
fn backend(ns: &Netns, six: bool) -> SocketAddr {
    let addr = match six {
        false => SocketAddr::new(IpAddr::V4(ns.ipv4), 8080),
        true => SocketAddr::new(IpAddr::V6(ns.ipv6), 8080),
    };
    let listener = ns.run_inside(|| TcpListener::bind(addr).expect("bind backend"));
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"backend\n");
        }
    });
    addr
}

/// kill -9 of the active: a standby takes over with the VIP, the client reaches the
/// backend through it, and the dead replica's namespace loses the VIP by itself within
/// its lifetime (at most floor(renew_deadline) = 1 s) + 1 s of the kernel's sweep + slack.
fn killed_active_moves_the_vip(vip: &str) {
    let mut c = Cluster::start(vip);
    let active = c.one_active(Duration::from_secs(20));
    assert!(
        eventually(Duration::from_secs(5), || c.client_reaches_backend()),
        "the client does not reach the backend through the VIP\n{}",
        c.logs()
    );
    // A standby holds no VIP (removed at start, never added).
    assert_eq!(c.holders(), vec![active]);
    c.replicas[active].take();
    let killed = Instant::now();
    let mut gone = None;
    let mut taken = None;
    let deadline = killed + LEASE * 3 + SLACK * 2;
    while Instant::now() < deadline && (gone.is_none() || taken.is_none()) {
        let holders = c.holders();
        if gone.is_none() && !holders.contains(&active) {
            gone = Some(killed.elapsed());
        }
        if taken.is_none() && holders.iter().any(|h| *h != active) {
            taken = Some(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let gone = gone.expect("the dead replica's namespace kept the VIP");
    let taken = taken.unwrap_or_else(|| panic!("no standby took the VIP\n{}", c.logs()));
    eprintln!(
        "{vip}: kill -9: VIP gone from the dead replica after {gone:?}, added by a standby after {taken:?} (overlap {:?})",
        gone.saturating_sub(taken)
    );
    // Its last refresh gave it at most floor(renew_deadline) = 1 s to live.
    assert!(
        gone <= Duration::from_secs(1) + Duration::from_secs(1) + SLACK,
        "the dead replica held the VIP for {gone:?}"
    );
    let new = c.one_active(LEASE * 2 + SLACK);
    assert_ne!(new, active);
    assert!(
        eventually(Duration::from_secs(5), || c.client_reaches_backend()),
        "the client does not reach the backend through the new holder\n{}",
        c.logs()
    );
    assert_eq!(c.holders(), vec![new]);
}

#[test]
fn kill_9_of_the_active_moves_the_ipv4_vip_and_the_dead_replica_loses_it() {
    killed_active_moves_the_vip("192.0.2.50");
}

#[test]
fn kill_9_of_the_active_moves_the_ipv6_vip_and_the_dead_replica_loses_it() {
    killed_active_moves_the_vip("2001:db8::50");
}

#[test]
fn an_active_cut_off_withdraws_its_vip_and_a_majority_replica_takes_it() {
    let c = Cluster::start("192.0.2.50");
    let active = c.one_active(Duration::from_secs(20));
    c.topo.replica(active).partition();
    let cut = Instant::now();
    assert!(
        eventually(RENEW + SLACK, || !c.topo.replica(active).has_addr(c.vip)),
        "the cut-off active still holds the VIP after {:?}\n{}",
        cut.elapsed(),
        c.logs()
    );
    let withdrawn = cut.elapsed();
    assert_eq!(c.role(active), "standby");
    let new = c.one_active(LEASE * 2 + SLACK);
    assert_ne!(new, active);
    eprintln!(
        "partition: VIP withdrawn after {withdrawn:?}, replica {new} active after {:?}",
        cut.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(5), || c.client_reaches_backend()),
        "the client does not reach the backend through the majority's VIP\n{}",
        c.logs()
    );
    c.topo.replica(active).heal();
    // Healed: it stays a standby, and only one namespace holds the VIP.
    std::thread::sleep(LEASE);
    assert_eq!(c.one_active(LEASE), new);
    assert_eq!(c.holders(), vec![new]);
}
