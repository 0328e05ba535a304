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
        Cluster::start_with(3, vip, |_| {}, |_| &[])
    }

    /// The same, with `prepare` run on the topology before any replica starts and
    /// replica `i` started under the command `wrap(i)` (empty: none).
    fn start_with(
        n: usize,
        vip: &str,
        prepare: impl FnOnce(&Topology),
        wrap: impl Fn(usize) -> &'static [&'static str],
    ) -> Cluster {
        let topo = Topology::builder().replicas(n).build();
        prepare(&topo);
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
            // on_active notes the addresses it finds (the VIP must be there already).
            let hook = dir.path().join("on_active.sh");
            std::fs::write(
                &hook,
                format!(
                    "ip -o addr show dev eth0 >> {}\n",
                    dir.path().join("on_active.log").display()
                ),
            )
            .expect("hook");
            let yaml = format!(
                "node: {{ name: lb-{id} }}\nadmin: {{ bind: \"{ADMIN}\" }}\n\
                 runtime: {{ shutdown_grace: 1s }}\n\
                 cluster:\n  cluster_id: netns\n  node_id: {id}\n  bind: \"{me}\"\n  data_dir: {data}\n  \
                 peers: {{ {peers} }}\n  heartbeat_interval: 100ms\n  election_timeout: 300ms\n\
                 leader_election:\n  lease_duration: 2s\n  renew_deadline: 1500ms\n  retry_period: 250ms\n  \
                 vip: {{ address: \"{vip}/{prefix}\", interface: eth0 }}\n  on_active: /bin/sh {hook}\n\
                 listeners:\n  api: {{ bind: \"{listen}\", pool: web }}\n\
                 pools:\n  web:\n    backends:\n      - {{ name: b, address: \"{backend}\" }}\n",
                id = i + 1,
                me = peer(ns),
                data = dir.path().join("data").display(),
                peers = peers.join(", "),
                hook = hook.display(),
            );
            let config = dir.path().join("raftlb.yaml");
            std::fs::write(&config, yaml).expect("config");
            let log = std::fs::File::create(dir.path().join("raftlb.log")).expect("log");
            let (program, wrapper) = match wrap(i).split_first() {
                Some((program, args)) => (*program, args),
                None => (env!("CARGO_BIN_EXE_raftlb"), &[][..]),
            };
            let mut command = ns.command(program);
            if !wrapper.is_empty() {
                command.args(wrapper).arg(env!("CARGO_BIN_EXE_raftlb"));
            }
            let child = command
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

    /// GET `path` of replica `i`'s admin API, from inside its namespace ("" if it
    /// does not answer).
    fn admin_get(&self, i: usize, path: &str) -> String {
        self.topo.replica(i).run_inside(|| {
            common::http_get(ADMIN.parse().expect("admin"), path)
                .map(|(_, b)| b)
                .unwrap_or_default()
        })
    }

    /// `POST /api/v1/leader/transfer` with `body` to replica `i`: (status, body).
    fn transfer(&self, i: usize, body: &str) -> (u16, String) {
        self.topo.replica(i).run_inside(|| {
            common::http_request(
                ADMIN.parse().expect("admin"),
                "POST",
                "/api/v1/leader/transfer",
                &[("Content-Type", "application/json")],
                body,
            )
            .expect("transfer")
        })
    }

    fn role(&self, i: usize) -> String {
        let body = self.admin_get(i, "/api/v1/status");
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["role"].as_str().map(str::to_string))
            .unwrap_or_else(|| "down".into())
    }

    /// Waits until exactly one live replica is active and holds the VIP; its index.
    fn one_active(&self, within: Duration) -> usize {
        let mut found = None;
        let ok = eventually(within, || {
            let live: Vec<usize> = (0..self.replicas.len())
                .filter(|i| self.replicas[*i].is_some())
                .collect();
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

    /// Replica `i`'s counter of transitions to `role` (0 if it does not answer).
    fn transitions_to(&self, i: usize, role: &str) -> f64 {
        let body = self.admin_get(i, "/metrics");
        let series = format!("raftlb_leader_election_transitions_total{{to=\"{role}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Polls until replica `i` reports `role` in its status; false after `within`.
    fn sees_role(&self, i: usize, role: &str, within: Duration) -> bool {
        eventually(within, || self.role(i) == role)
    }

    /// Asserts that the client reaches the backend through the VIP (within 5 s).
    fn assert_client_served(&self, when: &str) {
        assert!(
            eventually(Duration::from_secs(5), || self.client_reaches_backend()),
            "the client does not reach the backend through the VIP {when}\n{}",
            self.logs()
        );
    }

    fn holders(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|i| self.topo.replica(*i).has_addr(self.vip))
            .collect()
    }

    /// Whether replica `i`'s on_active hook ran and found the VIP on its interface.
    fn on_active_saw_vip(&self, i: usize) -> bool {
        let Some(r) = &self.replicas[i] else {
            return false;
        };
        let log = r.dir.path().join("on_active.log");
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&format!(" {}/", self.vip)))
        })
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
    c.assert_client_served("at first");
    // A standby holds no VIP (removed at start, never added).
    assert_eq!(c.holders(), vec![active]);
    // As keepalived's notify_master: on_active runs with the VIP in place.
    assert!(c.on_active_saw_vip(active), "{}", c.logs());
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
    assert!(c.on_active_saw_vip(new), "{}", c.logs());
    c.assert_client_served("of the new holder");
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
    c.assert_client_served("held by the majority");
    c.topo.replica(active).heal();
    // Healed: it stays a standby, and only one namespace holds the VIP.
    std::thread::sleep(LEASE);
    assert_eq!(c.one_active(LEASE), new);
    assert_eq!(c.holders(), vec![new]);
}

/// A VIP left on the interfaces by an earlier process (kill -9 and a restart within
/// its lifetime, or an address added by hand) is removed at start by every replica
/// that does not hold the lease: only the active's namespace holds it.
#[test]
fn a_vip_left_by_an_earlier_process_is_removed_at_start() {
    let c = Cluster::start_with(
        3,
        "192.0.2.50",
        |topo| {
            for ns in topo.replicas() {
                ns.exec_ok(&["ip", "addr", "add", "192.0.2.50/24", "dev", "eth0"]);
            }
        },
        |_| &[],
    );
    let active = c.one_active(Duration::from_secs(20));
    assert!(
        eventually(Duration::from_secs(5), || c.holders() == vec![active]),
        "replicas that are not active kept the stale VIP: holders {:?}\n{}",
        c.holders(),
        c.logs()
    );
    for i in (0..c.replicas.len()).filter(|i| *i != active) {
        let log = c.replicas[i].as_ref().expect("live").log();
        assert!(
            log.contains("removing a VIP this replica does not hold"),
            "replica {i} did not say it removed the stale VIP\n{}",
            tail(&log)
        );
    }
    c.assert_client_served("at first");
}

/// Rule 7: an active that cannot add its VIP (here: a replica started without
/// CAP_NET_ADMIN, as a systemd unit missing its ambient capabilities would run it)
/// gives the lease up and sits out as `fault`; another replica takes over with the
/// VIP and serves the client.
#[test]
fn an_active_that_cannot_add_the_vip_goes_to_fault_and_another_takes_over() {
    const NO_NET_ADMIN: &[&str] = &[
        "setpriv",
        "--bounding-set",
        "-net_admin",
        "--inh-caps",
        "-net_admin",
    ];
    let c = Cluster::start_with(
        3,
        "192.0.2.50",
        |_| {},
        |i| if i == 0 { NO_NET_ADMIN } else { &[] },
    );
    // Replica 0 cannot hold the VIP, so the first active holding it is another one.
    let first = c.one_active(Duration::from_secs(20));
    assert_ne!(first, 0);
    // Hand the lease to replica 0 (node_id 1).
    let (status, body) = c.transfer(first, r#"{"to": 1}"#);
    assert_eq!(status, 200, "transfer: {body}");
    assert!(
        c.sees_role(0, "fault", LEASE + SLACK),
        "replica 0 took the lease but never reported fault (role {})\n{}",
        c.role(0),
        c.logs()
    );
    assert_eq!(c.transitions_to(0, "fault"), 1.0, "one fault, counted once");
    let log = c.replicas[0].as_ref().expect("live").log();
    assert!(log.contains("cannot add the VIP"), "{}", tail(&log));
    // Replica 0 gave the lease up: another takes it and the VIP, and serves.
    let new = c.one_active(LEASE * 2 + SLACK);
    assert_ne!(new, 0);
    assert!(!c.topo.replica(0).has_addr(c.vip));
    c.assert_client_served("after the fault");
}

/// An `ip` first in the replicas' PATH that fails `ip addr VERB` while a flag file
/// says so (for every replica, or for one) and runs the real `ip` for everything
/// else: the fault is injected at the command; the address, its lifetime and the
/// kernel's sweep stay real.
struct FaultyIp {
    dir: tempfile::TempDir,
}

impl FaultyIp {
    fn new() -> FaultyIp {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("ip(8) installed");
        let script = format!(
            "#!/bin/sh\n\
             if [ \"$1\" = addr ] && {{ [ -e '{dir}/fail-'\"$2\" ] || [ -e '{dir}/fail-'\"$2-$RAFTLB_TEST_REPLICA\" ]; }}; then\n  \
             echo 'RTNETLINK answers: Operation not permitted (injected by the test)' >&2\n  exit 2\nfi\n\
             exec {real} \"$@\"\n",
            dir = dir.path().display()
        );
        let ip = dir.path().join("ip");
        std::fs::write(&ip, script).expect("ip wrapper");
        std::fs::set_permissions(&ip, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        FaultyIp { dir }
    }

    /// The command that starts replica `i` with this `ip` (see `Cluster::start_with`).
    fn wrap(&self, i: usize) -> &'static [&'static str] {
        let path = format!(
            "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin",
            self.dir.path().display()
        );
        let args = ["env".to_string(), path, format!("RAFTLB_TEST_REPLICA={i}")];
        let args: Vec<&'static str> = args
            .into_iter()
            .map(|a| &*Box::leak(a.into_boxed_str()))
            .collect();
        Box::leak(args.into_boxed_slice())
    }

    /// From now on `ip addr VERB` fails, on replica `i` or on all; the flag's path.
    fn fail(&self, verb: &str, replica: Option<usize>) -> std::path::PathBuf {
        let name = match replica {
            Some(i) => format!("fail-{verb}-{i}"),
            None => format!("fail-{verb}"),
        };
        let flag = self.dir.path().join(name);
        std::fs::write(&flag, "").expect("flag");
        flag
    }
}

/// Rule 5 when the VIP cannot be removed (`ip addr del` fails everywhere, FaultyIp).
/// The active, told to give the lease away, keeps trying, and releases only once the
/// address is gone (here: its kernel lifetime ran out). At no time do two namespaces
/// hold the VIP.
#[test]
fn a_vip_that_cannot_be_removed_is_tried_again_and_never_held_twice() {
    let ip = FaultyIp::new();
    let c = Cluster::start_with(3, "192.0.2.50", |_| {}, |i| ip.wrap(i));
    let first = c.one_active(Duration::from_secs(20));

    let flag = ip.fail("del", None);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (status, body, twice, released) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut twice = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let holders = c.holders();
                if holders.len() > 1 {
                    twice.push(holders);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            twice
        });
        let asked = Instant::now();
        let (status, body) = c.transfer(first, "{}");
        let released = asked.elapsed();
        // The new active takes the VIP; keep watching a while after.
        let new = c.one_active(LEASE * 2 + SLACK);
        std::thread::sleep(LEASE);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_ne!(new, first);
        (status, body, watcher.join().expect("watcher"), released)
    });
    assert_eq!(status, 200, "transfer: {body}");
    assert!(
        twice.is_empty(),
        "two namespaces held the VIP at once: {twice:?}\n{}",
        c.logs()
    );
    // It waited for the address to expire (the term had up to renew_deadline left),
    // rather than releasing while it was still there.
    assert!(
        released >= Duration::from_millis(500),
        "released after {released:?}, with the VIP not removable"
    );
    assert!(!c.topo.replica(first).has_addr(c.vip));
    let log = c.replicas[first].as_ref().expect("live").log();
    assert!(
        log.contains("injected by the test") && log.contains("trying again"),
        "{}",
        tail(&log)
    );
    std::fs::remove_file(&flag).expect("flag");
}

/// An active whose VIP refreshes keep failing (`ip addr replace` fails on it alone,
/// FaultyIp) would lose the address to its kernel lifetime and serve no one while
/// it renews the lease: it gives the lease up (fault) before the address lapses, and
/// another replica takes the VIP and serves.
#[test]
fn an_active_that_cannot_refresh_its_vip_gives_the_lease_up_before_it_lapses() {
    let ip = FaultyIp::new();
    let c = Cluster::start_with(3, "192.0.2.50", |_| {}, |i| ip.wrap(i));
    let first = c.one_active(Duration::from_secs(20));
    ip.fail("replace", Some(first));
    let broken = Instant::now();
    assert!(
        c.sees_role(first, "fault", RENEW + SLACK),
        "replica {first} kept the lease (role {}) with its VIP refreshes failing\n{}",
        c.role(first),
        c.logs()
    );
    eprintln!(
        "fault {:?} after the refreshes began to fail",
        broken.elapsed()
    );
    assert_eq!(
        c.transitions_to(first, "fault"),
        1.0,
        "one fault, counted once"
    );
    let log = c.replicas[first].as_ref().expect("live").log();
    assert!(
        log.contains("cannot refresh the VIP before its lifetime ends"),
        "{}",
        tail(&log)
    );
    let new = c.one_active(LEASE * 2 + SLACK);
    assert_ne!(new, first);
    assert_eq!(c.holders(), vec![new]);
    c.assert_client_served("after the fault");
}

/// Rule 7: the VIP's interface going down on the active is a fault (noticed within a
/// retry_period, before its renew_deadline would end it): it gives the lease up and
/// sits out as `fault`; a majority replica takes the VIP; back up, the replica
/// returns as a standby and the VIP stays with the new active.
#[test]
fn the_vip_interface_going_down_on_the_active_is_a_fault() {
    let c = Cluster::start("192.0.2.50");
    let active = c.one_active(Duration::from_secs(20));
    c.topo.replica(active).link_down();
    let down = Instant::now();
    // Its admin API (on loopback) still answers: the role says fault, not standby.
    assert!(
        c.sees_role(active, "fault", RENEW),
        "the active whose VIP interface went down is {}\n{}",
        c.role(active),
        c.logs()
    );
    assert_eq!(
        c.transitions_to(active, "fault"),
        1.0,
        "one fault, counted once"
    );
    assert!(!c.topo.replica(active).has_addr(c.vip));
    let new = c.one_active(LEASE * 2 + SLACK);
    assert_ne!(new, active);
    eprintln!(
        "interface down: replica {new} active after {:?}",
        down.elapsed()
    );
    c.assert_client_served("of the new active");
    c.topo.replica(active).link_up();
    assert!(
        c.sees_role(active, "standby", LEASE * 2 + SLACK),
        "back up, the faulted replica is {}\n{}",
        c.role(active),
        c.logs()
    );
    assert_eq!(c.one_active(LEASE), new);
    assert_eq!(c.holders(), vec![new]);
}

/// Rule 8: a SIGHUP that changes the VIP releases the lease first: the old address
/// leaves every namespace, and a new epoch's active holds the new one.
#[test]
fn a_reload_that_changes_the_vip_releases_first_and_the_new_address_follows() {
    reload_moves_the_vip(3);
}

/// The same with a lone replica, which has nobody to hand the lease to and takes it
/// back itself: the new VIP follows it all the same.
#[test]
fn a_lone_replica_reloaded_with_a_new_vip_holds_the_new_address() {
    reload_moves_the_vip(1);
}

fn reload_moves_the_vip(n: usize) {
    let c = Cluster::start_with(n, "192.0.2.50", |_| {}, |_| &[]);
    let active = c.one_active(Duration::from_secs(20));
    let epoch = |i: usize| -> u64 {
        let body = c.admin_get(i, "/api/v1/status");
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["lease"]["epoch"].as_u64())
            .unwrap_or(0)
    };
    let first = epoch(active);
    let order = (0..c.replicas.len())
        .filter(|i| *i != active)
        .chain([active]);
    for i in order {
        let replica = c.replicas[i].as_ref().expect("live");
        let path = replica.dir.path().join("raftlb.yaml");
        let yaml = std::fs::read_to_string(&path).expect("config");
        std::fs::write(
            &path,
            yaml.replace("address: \"192.0.2.50/24\"", "address: \"192.0.2.51/24\""),
        )
        .expect("rewrite");
        let pid = replica.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .expect("kill")
                .success()
        );
    }
    let new_vip: IpAddr = "192.0.2.51".parse().expect("ip");
    let holders = |ip: IpAddr| -> Vec<usize> {
        (0..c.replicas.len())
            .filter(|i| c.topo.replica(*i).has_addr(ip))
            .collect()
    };
    let mut new = None;
    assert!(
        eventually(LEASE * 2 + SLACK, || {
            let active: Vec<usize> = (0..c.replicas.len())
                .filter(|i| c.role(*i) == "active")
                .collect();
            new = active.first().copied();
            active.len() == 1 && holders(new_vip) == active && holders(c.vip).is_empty()
        }),
        "after the reload: holders of the old VIP {:?}, of the new {:?}\n{}",
        holders(c.vip),
        holders(new_vip),
        c.logs()
    );
    let new = new.expect("active");
    assert!(
        epoch(new) > first,
        "no new epoch: the lease was not released"
    );
    let log = c.replicas[active].as_ref().expect("live").log();
    assert!(
        log.contains("leader_election.vip changed; releasing the lease first"),
        "{}",
        tail(&log)
    );
    // And it stays that way.
    std::thread::sleep(LEASE);
    assert!(
        holders(c.vip).is_empty(),
        "the old VIP came back: {:?}",
        holders(c.vip)
    );
    assert_eq!(holders(new_vip), vec![new]);
}
