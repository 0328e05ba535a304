//! A small cluster of real `raftlb run` replicas on loopback, for the suites that
//! need one without the whole of tests/cluster.rs.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::*;

pub struct Cluster {
    pub cluster_id: &'static str,
    /// Extra lines of the cluster: section (indented two spaces), e.g. tls.
    pub cluster_extra: String,
    pub addrs: Vec<Addrs>,
    pub data: Vec<tempfile::TempDir>,
    pub backends: Vec<(String, SocketAddr)>,
}

impl Cluster {
    pub fn new(n: usize, backends: Vec<(String, SocketAddr)>) -> Cluster {
        Cluster {
            cluster_id: "test",
            cluster_extra: String::new(),
            addrs: Addrs::for_replicas(n),
            data: data_dirs(n),
            backends,
        }
    }

    /// Replica `i` (0-based; node_id i+1) of a new cluster; `extra` goes at the top level.
    pub fn yaml_with(&self, i: usize, extra: &str) -> String {
        self.yaml_as(i, "new", extra)
    }

    /// Replica `i` with `initial_state` (new or existing); `extra` at the top level.
    pub fn yaml_as(&self, i: usize, initial_state: &str, extra: &str) -> String {
        let a = self.addrs[i];
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|(name, addr)| format!("      - {{ name: {name}, address: {addr} }}"))
            .collect();
        format!(
            "node: {{ name: lb-{id} }}\n\
             admin: {{ bind: {admin} }}\n\
             cluster:\n  cluster_id: {cluster_id}\n  node_id: {id}\n  initial_state: {initial_state}\n  bind: {peer}\n  data_dir: {data}\n  \
             peers: {{ {peers} }}\n  heartbeat_interval: 100ms\n  election_timeout: 1s\n{cluster_extra}\
             leader_election: {{ enabled: false }}\n\
             listeners:\n  front: {{ bind: {listen}, pool: web }}\n\
             pools:\n  web:\n    backends:\n{backends}\n{extra}",
            id = i + 1,
            cluster_id = self.cluster_id,
            cluster_extra = self.cluster_extra,
            admin = a.admin,
            peer = a.peer,
            listen = a.listen,
            data = self.data[i].path().display(),
            peers = Addrs::peers(&self.addrs),
            backends = backends.join("\n"),
        )
    }

    /// Starts every replica and waits until they serve and agree on a leader that has
    /// a quorum; the replicas and the leader's index.
    pub fn start_all_with(&self, extra: &str) -> (Vec<Raftlb>, usize) {
        let mut replicas: Vec<Raftlb> = (0..self.addrs.len())
            .map(|i| Raftlb::spawn(&self.yaml_with(i, extra), self.addrs[i].admin))
            .collect();
        replicas.iter_mut().for_each(Raftlb::wait_ready);
        let mut leader = None;
        assert!(
            eventually(Duration::from_secs(15), || {
                leader = leader_of(self.addrs[0].admin);
                leader.is_some_and(|l| {
                    self.addrs.iter().all(|a| leader_of(a.admin) == Some(l))
                        && self.addrs.get(l as usize - 1).is_some_and(|a| {
                            status(a.admin)["cluster"]["quorum_reachable"] == Value::Bool(true)
                        })
                })
            }),
            "the replicas do not agree on a Raft leader that has a quorum"
        );
        (replicas, leader.expect("leader") as usize - 1)
    }
}

/// An admin call: (status, JSON body or Null); status 0 when the request failed.
pub fn json(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    match http_request(addr, method, path, &[], body) {
        Ok((code, text)) => (code, serde_json::from_str(&text).unwrap_or(Value::Null)),
        Err(e) => (0, Value::String(e.to_string())),
    }
}

pub fn status(addr: SocketAddr) -> Value {
    json(addr, "GET", "/api/v1/status", "").1
}

pub fn leader_of(addr: SocketAddr) -> Option<u64> {
    status(addr)["cluster"]["leader_id"].as_u64()
}

/// A process's peak resident set (VmHWM) and current one (VmRSS), in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// How many descriptors a process has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
