//! Network-namespace topologies for tests that need real interfaces (VIP, ARP,
//! partitions): a bridge namespace and, each on the bridge through a veth pair whose
//! inner end is `eth0`, N replica namespaces (192.0.2.11.., 2001:db8::11..), one client
//! (192.0.2.100, 2001:db8::100) and one backends namespace (192.0.2.200,
//! 2001:db8::200). Nothing is created in the host's own namespace, and no address
//! outside 192.0.2.0/24 and 2001:db8::/64 is used.
//!
//! Needs root and iproute2; a missing `ip` fails the test instead of skipping it (CI
//! runs as root with the packages scripts/test installs). Namespace names carry the test
//! process's pid, so parallel tests and binaries never collide; dropping the topology
//! kills what runs inside and deletes every namespace, also when the test panics, and
//! the first topology of a process deletes those left by processes that are gone.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

/// Every namespace name starts with this, then the pid of the process that made it.
const PREFIX: &str = "rlbt";

/// One network namespace with its `eth0` addresses.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The bridge-side end of its veth pair, in the bridge namespace.
    veth: String,
}

/// A bridge with replicas, a client and a backends namespace on it.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    /// Every namespace made so far, for `Drop`, even if `build` stopped half-way.
    created: Vec<String>,
    bridge: String,
    replicas: Vec<Netns>,
    client: Option<Netns>,
    backends: Option<Netns>,
}

pub struct TopologyBuilder {
    replicas: usize,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder { replicas: 3 }
    }

    /// Replica `i`, from 0: 192.0.2.(11 + i), 2001:db8::(11 + i) in hex digits as written.
    pub fn replica(&self, i: usize) -> &Netns {
        &self.replicas[i]
    }

    pub fn replicas(&self) -> &[Netns] {
        &self.replicas
    }

    pub fn client(&self) -> &Netns {
        self.client.as_ref().expect("the topology has a client")
    }

    pub fn backends(&self) -> &Netns {
        self.backends
            .as_ref()
            .expect("the topology has a backends namespace")
    }

    /// The namespace that holds bridge `br0`.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Pulls `node`'s cable: its veth's bridge side goes down, so its `eth0` loses the
    /// carrier (NO-CARRIER, still administratively UP), like a switch port or node death.
    pub fn unplug(&self, node: &Netns) {
        ip_ok(&["-n", &self.bridge, "link", "set", &node.veth, "down"]);
    }

    pub fn plug(&self, node: &Netns) {
        ip_ok(&["-n", &self.bridge, "link", "set", &node.veth, "up"]);
    }
}

impl TopologyBuilder {
    pub fn replicas(mut self, n: usize) -> Self {
        assert!((1..=80).contains(&n), "1 to 80 replicas");
        self.replicas = n;
        self
    }

    pub fn build(self) -> Topology {
        require_ip();
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(delete_stale_namespaces);
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut topo = Topology {
            bridge: format!("{prefix}-br"),
            prefix,
            created: Vec::new(),
            replicas: Vec::new(),
            client: None,
            backends: None,
        };
        let bridge = topo.bridge.clone();
        topo.add_namespace(&bridge);
        ip_ok(&[
            "-n",
            &bridge,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip_ok(&["-n", &bridge, "link", "set", "br0", "up"]);
        for i in 0..self.replicas {
            let host = 11 + i as u8;
            let node = topo.add_node(&format!("r{}", i + 1), host);
            topo.replicas.push(node);
        }
        topo.client = Some(topo.add_node("cl", 100));
        topo.backends = Some(topo.add_node("be", 200));
        topo
    }
}

impl Topology {
    fn add_namespace(&mut self, name: &str) {
        ip_ok(&["netns", "add", name]);
        self.created.push(name.to_string());
    }

    /// A namespace `{prefix}-{short}` on the bridge, `eth0` at 192.0.2.{host} and
    /// 2001:db8::{host} (the host number written as hex digits reads the same).
    fn add_node(&mut self, short: &str, host: u8) -> Netns {
        let name = format!("{}-{short}", self.prefix);
        self.add_namespace(&name);
        let node = Netns {
            ipv4: Ipv4Addr::new(192, 0, 2, host),
            ipv6: format!("2001:db8::{host}")
                .parse()
                .expect("IPv6 literal of a host number"),
            veth: short.to_string(),
            name,
        };
        // No duplicate address detection: addresses are usable at once, so no test waits
        // on a tentative address. Set before eth0 exists, so it inherits "default".
        node.sysctl("net/ipv6/conf/all/accept_dad", "0");
        node.sysctl("net/ipv6/conf/default/accept_dad", "0");
        ip_ok(&["-n", &node.name, "link", "set", "lo", "up"]);
        ip_ok(&[
            "-n",
            &self.bridge,
            "link",
            "add",
            short,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &node.name,
        ]);
        // eth0 was made in the bridge's namespace and moved here, so it came with
        // that namespace's defaults: set it on eth0 itself too, before it is up and
        // gets its link-local address (which would otherwise be tentative a while).
        node.sysctl("net/ipv6/conf/eth0/accept_dad", "0");
        ip_ok(&[
            "-n",
            &self.bridge,
            "link",
            "set",
            short,
            "master",
            "br0",
            "up",
        ]);
        ip_ok(&[
            "-n",
            &node.name,
            "addr",
            "add",
            &format!("{}/24", node.ipv4),
            "dev",
            "eth0",
        ]);
        ip_ok(&[
            "-n",
            &node.name,
            "addr",
            "add",
            &format!("{}/64", node.ipv6),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip_ok(&["-n", &node.name, "link", "set", "eth0", "up"]);
        node
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for name in self.created.iter().rev() {
            delete_namespace(name);
        }
    }
}

impl Netns {
    /// Runs `argv` inside the namespace (`ip netns exec`) and returns what it did.
    pub fn exec(&self, argv: &[&str]) -> Output {
        exec(&self.name, argv)
    }

    /// Like [`Netns::exec`], and panics with its stderr unless it succeeded; its stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "in {}: `{}` failed ({}): {}",
            self.name,
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command that runs `program` inside the namespace, for args, env and stdio.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Starts `argv` inside the namespace; the caller waits for or kills it (dropping the
    /// topology kills it too).
    pub fn spawn(&self, argv: &[&str]) -> Child {
        let (program, args) = argv.split_first().expect("a program to run");
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("in {}: cannot start {program}: {e}", self.name))
    }

    /// Runs `f` on a thread that has entered the namespace (setns), so that sockets it
    /// opens and processes it starts live there; the caller's threads do not move.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let thread = s.spawn(move || {
                enter_namespace(&path);
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs the future made by `f` to completion on a current-thread tokio runtime
    /// inside the namespace (see [`Netns::run_inside`]).
    pub fn block_on<F: Future>(&self, f: impl FnOnce() -> F + Send) -> F::Output
    where
        F::Output: Send,
    {
        self.run_inside(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
    }

    /// Writes a sysctl of this namespace, e.g. `net/ipv6/conf/eth0/accept_dad`.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{key}");
        self.run_inside(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("in {}: {path} = {value}: {e}", self.name));
    }

    /// Whether `eth0` (or any interface here) has `ip`.
    pub fn has_addr(&self, ip: IpAddr) -> bool {
        let out = ip_ok(&["-n", &self.name, "-o", "addr", "show"]);
        out.split_whitespace()
            .filter_map(|word| word.split_once('/'))
            .any(|(addr, _)| addr.parse::<IpAddr>() == Ok(ip))
    }

    /// The MAC address of `eth0`, as `ip` prints it (lowercase, colons).
    pub fn mac(&self) -> String {
        let out = ip_ok(&["-n", &self.name, "-o", "link", "show", "dev", "eth0"]);
        word_after(&out, "link/ether")
            .unwrap_or_else(|| panic!("in {}: no MAC in {out:?}", self.name))
    }

    /// The MAC this namespace's neighbour table has for `ip` on eth0, if any.
    pub fn neighbour(&self, ip: IpAddr) -> Option<String> {
        let out = ip_ok(&[
            "-n",
            &self.name,
            "neigh",
            "show",
            &ip.to_string(),
            "dev",
            "eth0",
        ]);
        word_after(&out, "lladdr")
    }

    /// Sets the neighbour entry for `ip` to `mac` in state STALE, as a previous holder
    /// of an address would have left it: an announcement must override it.
    pub fn set_neighbour(&self, ip: IpAddr, mac: &str) {
        ip_ok(&[
            "-n",
            &self.name,
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            mac,
            "dev",
            "eth0",
            "nud",
            "stale",
        ]);
    }

    /// `eth0` administratively down (an operator's `ip link set eth0 down`).
    pub fn link_down(&self) {
        ip_ok(&["-n", &self.name, "link", "set", "eth0", "down"]);
    }

    pub fn link_up(&self) {
        ip_ok(&["-n", &self.name, "link", "set", "eth0", "up"]);
    }

    /// Drops every packet in and out of `eth0` (IPv4 and IPv6): this namespace is cut
    /// off, while its link stays up. [`Netns::heal`] undoes it.
    pub fn partition(&self) {
        for tool in ["iptables", "ip6tables"] {
            self.exec_ok(&[tool, "-w", "-A", "INPUT", "-i", "eth0", "-j", "DROP"]);
            self.exec_ok(&[tool, "-w", "-A", "OUTPUT", "-o", "eth0", "-j", "DROP"]);
        }
    }

    /// Drops packets to and from `peer` only (one side of an asymmetric partition when
    /// done on one namespace, a full cut between two when done on both).
    pub fn block(&self, peer: IpAddr) {
        let tool = if peer.is_ipv4() {
            "iptables"
        } else {
            "ip6tables"
        };
        let peer = peer.to_string();
        self.exec_ok(&[tool, "-w", "-A", "INPUT", "-s", &peer, "-j", "DROP"]);
        self.exec_ok(&[tool, "-w", "-A", "OUTPUT", "-d", &peer, "-j", "DROP"]);
    }

    /// Removes every rule [`Netns::partition`] and [`Netns::block`] added.
    pub fn heal(&self) {
        for tool in ["iptables", "ip6tables"] {
            self.exec_ok(&[tool, "-w", "-F", "INPUT"]);
            self.exec_ok(&[tool, "-w", "-F", "OUTPUT"]);
        }
    }
}

/// Runs `argv` inside namespace `ns` (`ip netns exec`).
pub fn exec(ns: &str, argv: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} {}: {e}", argv.join(" ")))
}

fn word_after(text: &str, key: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    words.find(|w| *w == key)?;
    words.next().map(str::to_string)
}

/// Runs `ip args` (with C messages) and panics with its stderr unless it succeeded.
fn ip_ok(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test, with the fix, unless `ip` runs and this process may make namespaces.
fn require_ip() {
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("`ip -V` failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!(
            "network-namespace tests need `ip` (Debian iproute2, which scripts/test installs): {e}"
        ),
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid_root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    assert!(
        euid_root,
        "network-namespace tests need root (CI runs them as root)"
    );
}

fn enter_namespace(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns(2) with a descriptor we own for the whole call and a constant flag;
    // it moves only the calling thread, which run_inside made for this purpose.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Kills what runs in `name` and deletes it; problems are printed, never a panic
/// (this runs in `Drop`, maybe while a failed test unwinds).
fn delete_namespace(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<libc::pid_t>() {
                // SAFETY: kill(2) takes integers only; the pid was just listed inside
                // this test's own namespace.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    match Command::new("ip").args(["netns", "del", name]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "cannot delete network namespace {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("cannot delete network namespace {name}: {e}"),
    }
}

/// Deletes namespaces that earlier test processes made and could not delete (killed
/// mid-test): those whose pid no longer runs.
fn delete_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let owner = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        if let Some(pid) = owner
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            delete_namespace(name);
        }
    }
}
