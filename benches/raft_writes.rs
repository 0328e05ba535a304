//! Committed config writes per second and commit latency (p50/p99): a 3-replica raftlb
//! cluster on loopback beside a 3-member etcd cluster, measured in the same run with the
//! same HTTP/1.1 keep-alive client.
//!
//! - raftlb: `PATCH /api/v1/pools/bench/backends/{name}` with `{"weight": N}` on the
//!   admin API; a 2xx answer means the change was committed by a quorum. Sent to the
//!   Raft leader, and separately to a follower (which forwards it over the peer channel).
//! - etcd: `POST /v3/kv/put` on the v3 JSON gateway (`{"key": b64, "value": b64}`), sent
//!   to the etcd leader and separately to a follower.
//!
//! Each target runs a sequential phase (one writer) and a concurrent phase (N writers,
//! each on its own connection); every phase is bounded in count and in time.
//! Both clusters keep their data under one temp dir on the same file system.
//!
//! Run: `cargo build --release && cargo bench --bench raft_writes`.
//! Environment: RAFTLB_BIN (default target/release/raftlb), ETCD_BIN (default `etcd` on
//! PATH), BENCH_WRITES (sequential writes, 1000), BENCH_WARMUP (50),
//! BENCH_CONCURRENT_WRITES (4000), BENCH_WRITERS (16), BENCH_PHASE_TIMEOUT (seconds, 60),
//! BENCH_FOLLOWER (1: also measure writes sent to a follower; 0: leader only).
//! Exits 0 with "skipped etcd: not installed" when there is no etcd binary.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// Pool and backends every raftlb replica is seeded with; writes change their weights.
const POOL: &str = "bench";
const BACKENDS: [&str; 4] = ["b1", "b2", "b3", "b4"];
/// How long a cluster may take to elect a leader and take a first write.
const STARTUP: Duration = Duration::from_secs(30);
/// One request's own limit (inside the phase's limit).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("warning: {name}={v:?} is not a number, using {default}");
            default
        }),
        Err(_) => default,
    }
}

struct Settings {
    writes: usize,
    warmup: usize,
    concurrent_writes: usize,
    writers: usize,
    phase_timeout: Duration,
    follower: bool,
}

impl Settings {
    fn from_env() -> Self {
        Settings {
            writes: env_num("BENCH_WRITES", 1000) as usize,
            warmup: env_num("BENCH_WARMUP", 50) as usize,
            concurrent_writes: env_num("BENCH_CONCURRENT_WRITES", 4000) as usize,
            writers: env_num("BENCH_WRITERS", 16).max(1) as usize,
            phase_timeout: Duration::from_secs(env_num("BENCH_PHASE_TIMEOUT", 60).max(1)),
            follower: env_num("BENCH_FOLLOWER", 1) != 0,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Child processes and temp dirs, cleaned up on every exit path (including a panic).

struct Guard {
    children: Vec<(String, Child)>,
    /// Dropped after the children are killed (fields drop after `Drop::drop`).
    dir: tempfile::TempDir,
}

impl Guard {
    fn new() -> std::io::Result<Self> {
        Ok(Guard {
            children: Vec::new(),
            dir: tempfile::Builder::new().prefix("raft-writes-").tempdir()?,
        })
    }

    fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<u32, Error> {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    /// Errors out naming a child that has exited, with the end of its log.
    fn check_alive(&mut self) -> Result<(), Error> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!(
                    "{name} exited ({status}); its log ends:\n{}",
                    tail.join("\n")
                )
                .into());
            }
        }
        Ok(())
    }

    fn stop_all(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
        }
        for (_, child) in &mut self.children {
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// `n` distinct free loopback ports (all held open until every one is chosen).
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // CLK_TCK is 100 on every Linux this runs on.
    Some((utime + stime) / 100.0)
}

fn cpu_total(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_seconds(p)).sum()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

// ---------------------------------------------------------------------------------------
// The HTTP/1.1 client: one kept-open connection, TCP_NODELAY, used by both systems.

struct Conn {
    addr: SocketAddr,
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Self, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { addr, sender })
    }

    /// Sends one request, reads the whole answer: (status, body).
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), Error> {
        let exchange = async {
            self.sender.ready().await?;
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(HOST, self.addr.to_string());
            if body.is_some() {
                req = req.header(CONTENT_TYPE, "application/json");
            }
            let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
            let resp = self.sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, Error>((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
    }
}

/// One request on a fresh connection (for status polls).
async fn once(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Value), Error> {
    let mut conn = Conn::open(addr).await?;
    let (status, body) = conn.call(method, path, body).await?;
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, value))
}

// ---------------------------------------------------------------------------------------
// The write each system takes.

#[derive(Clone, Copy, PartialEq)]
enum System {
    Raftlb,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Raftlb => "raftlb",
            System::Etcd => "etcd",
        }
    }

    /// (method, path, body) of write number `i` by writer `w`.
    fn write(self, w: usize, i: usize) -> (Method, String, Vec<u8>) {
        let backend = BACKENDS[w % BACKENDS.len()];
        let weight = i % 256 + 1;
        match self {
            System::Raftlb => (
                Method::PATCH,
                format!("/api/v1/pools/{POOL}/backends/{backend}"),
                json!({ "weight": weight }).to_string().into_bytes(),
            ),
            System::Etcd => {
                let b64 = base64::engine::general_purpose::STANDARD;
                (
                    Method::POST,
                    "/v3/kv/put".to_string(),
                    json!({
                        "key": b64.encode(format!("bench/{backend}")),
                        "value": b64.encode(weight.to_string()),
                    })
                    .to_string()
                    .into_bytes(),
                )
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Load phases.

struct Phase {
    system: System,
    mode: String,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
    aborted: bool,
    latencies: Vec<Duration>,
    /// CPU seconds all three server processes used during the phase.
    cpu: f64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1].as_secs_f64() * 1000.0
    }
}

/// What one writer saw.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
    aborted: bool,
}

/// Writes until `next` reaches `total` or `deadline` passes; write indices come from
/// `next`, shared between writers.
async fn writer(
    system: System,
    w: usize,
    mut conn: Conn,
    next: Arc<AtomicUsize>,
    total: usize,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            tally.aborted = true;
            break;
        }
        let (method, path, body) = system.write(w, i);
        let started = Instant::now();
        let result =
            tokio::time::timeout(deadline - now, conn.call(method, &path, Some(body))).await;
        let latency = started.elapsed();
        let failure = match result {
            Err(_) => {
                tally.aborted = true;
                break;
            }
            Ok(Ok((status, _))) if (200..300).contains(&status) => None,
            Ok(Ok((status, body))) => Some(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            )),
            Ok(Err(e)) => Some(e.to_string()),
        };
        match failure {
            None => tally.latencies.push(latency),
            Some(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
                // A broken connection stays broken: open a new one.
                if conn.sender.is_closed() {
                    match Conn::open(conn.addr).await {
                        Ok(c) => conn = c,
                        Err(e) => {
                            tally.first_error.get_or_insert(e.to_string());
                            break;
                        }
                    }
                }
            }
        }
    }
    tally
}

/// `total` writes from `writers` concurrent writers, each on its own connection,
/// stopped after `limit`.
async fn phase(
    system: System,
    mode: &str,
    target: SocketAddr,
    writers: usize,
    total: usize,
    limit: Duration,
    pids: &[u32],
) -> Result<Phase, Error> {
    let mut conns = Vec::with_capacity(writers);
    for _ in 0..writers {
        conns.push(Conn::open(target).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu_total(pids);
    let started = Instant::now();
    let deadline = started + limit;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, conn)| tokio::spawn(writer(system, w, conn, next.clone(), total, deadline)))
        .collect();
    let mut result = Phase {
        system,
        mode: mode.to_string(),
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        aborted: false,
        latencies: Vec::with_capacity(total),
        cpu: 0.0,
    };
    for task in tasks {
        let tally = task.await?;
        result.ok += tally.latencies.len();
        result.latencies.extend(tally.latencies);
        result.errors += tally.errors;
        result.aborted |= tally.aborted;
        if result.first_error.is_none() {
            result.first_error = tally.first_error;
        }
    }
    result.elapsed = started.elapsed();
    result.cpu = cpu_total(pids) - cpu_before;
    Ok(result)
}

/// A cluster under test: where to send writes.
struct Cluster {
    system: System,
    leader: SocketAddr,
    follower: SocketAddr,
    pids: Vec<u32>,
}

/// Warm-up, then the sequential and concurrent phases against the leader (and a
/// follower, when asked).
async fn measure(cluster: &Cluster, s: &Settings) -> Result<Vec<Phase>, Error> {
    let mut targets = vec![("leader", cluster.leader)];
    if s.follower {
        targets.push(("follower", cluster.follower));
    }
    let mut phases = Vec::new();
    for (role, addr) in targets {
        let warm = phase(
            cluster.system,
            "warm-up",
            addr,
            1,
            s.warmup,
            s.phase_timeout,
            &[],
        )
        .await?;
        if warm.errors > 0 {
            return Err(format!(
                "{} warm-up via the {role}: {} of {} writes failed, first: {}",
                cluster.system.name(),
                warm.errors,
                s.warmup,
                warm.first_error.unwrap_or_default()
            )
            .into());
        }
        let modes = [
            (format!("{role} seq x1"), 1, s.writes),
            (
                format!("{role} conc x{}", s.writers),
                s.writers,
                s.concurrent_writes,
            ),
        ];
        for (mode, writers, total) in modes {
            let p = phase(
                cluster.system,
                &mode,
                addr,
                writers,
                total,
                s.phase_timeout,
                &cluster.pids,
            )
            .await?;
            eprintln!(
                "  {:<7} {:<22} {:>5} ok {:>3} errors in {:.2} s",
                p.system.name(),
                p.mode,
                p.ok,
                p.errors,
                p.elapsed.as_secs_f64()
            );
            phases.push(p);
        }
    }
    Ok(phases)
}

/// Polls `check` every 100 ms until it yields a value or `STARTUP` passes.
async fn wait_for<T, F, Fut>(what: &str, guard: &mut Guard, mut check: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, Error>>,
{
    let deadline = Instant::now() + STARTUP;
    let mut last = String::from("no answer yet");
    loop {
        guard.check_alive()?;
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(format!("{what}: not within {STARTUP:?} (last: {last})").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// raftlb

fn raftlb_config(
    n: usize,
    admin: &[u16],
    peer: &[u16],
    listen: u16,
    backends: &[u16],
    data_dir: &Path,
) -> String {
    let peers: String = peer
        .iter()
        .enumerate()
        .map(|(i, p)| format!("    {}: 127.0.0.1:{p}\n", i + 1))
        .collect();
    let backends: String = BACKENDS
        .iter()
        .zip(backends)
        .map(|(name, port)| format!("      - {{ name: {name}, address: 127.0.0.1:{port} }}\n"))
        .collect();
    format!(
        "node: {{ name: lb-{id} }}
admin: {{ bind: 127.0.0.1:{admin} }}
cluster:
  cluster_id: bench
  node_id: {id}
  initial_state: new
  bind: 127.0.0.1:{peer_port}
  data_dir: {data_dir}
  peers:
{peers}  heartbeat_interval: 100ms
  election_timeout: 500ms
leader_election:
  enabled: false
listeners:
  bench: {{ bind: 127.0.0.1:{listen}, pool: {POOL} }}
pools:
  {POOL}:
    balance: round_robin
    health_check: {{ kind: tcp, interval: 2s, timeout: 200ms }}
    backends:
{backends}",
        id = n + 1,
        admin = admin[n],
        peer_port = peer[n],
        data_dir = data_dir.display(),
    )
}

async fn start_raftlb(bin: &Path, guard: &mut Guard) -> Result<Cluster, Error> {
    let ports = free_ports(3 * 3 + BACKENDS.len())?;
    let (admin, rest) = ports.split_at(3);
    let (peer, rest) = rest.split_at(3);
    let (listen, backends) = rest.split_at(3);
    let admin_addrs: Vec<SocketAddr> = admin
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let mut pids = Vec::new();
    for (n, &listen_port) in listen.iter().enumerate() {
        let data_dir = guard.dir.path().join(format!("raftlb-{}", n + 1));
        let file = guard.dir.path().join(format!("raftlb-{}.yaml", n + 1));
        std::fs::write(
            &file,
            raftlb_config(n, admin, peer, listen_port, backends, &data_dir),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--config").arg(&file);
        pids.push(guard.spawn(&format!("raftlb-{}", n + 1), cmd)?);
    }
    // Every replica must see the same leader.
    let leader_id = wait_for("raftlb: a leader seen by all three replicas", guard, || {
        let addrs = admin_addrs.clone();
        async move {
            let mut seen = Vec::new();
            for addr in addrs {
                let (_, status) = once(addr, Method::GET, "/api/v1/status", None).await?;
                seen.push(status["cluster"]["leader_id"].as_u64());
            }
            Ok(match seen[0] {
                Some(id) if seen.iter().all(|s| *s == Some(id)) => Some(id),
                _ => None,
            })
        }
    })
    .await?;
    let leader_index = usize::try_from(leader_id)?
        .checked_sub(1)
        .filter(|i| *i < 3)
        .ok_or_else(|| format!("raftlb: leader_id {leader_id} is not one of 1..3"))?;
    let leader = admin_addrs[leader_index];
    let follower = admin_addrs[(leader_index + 1) % 3];
    // The first leader commits the seed pools: wait until a write finds the pool.
    wait_for("raftlb: a first committed write", guard, || async move {
        let (method, path, body) = System::Raftlb.write(0, 0);
        let (status, reply) = once(leader, method, &path, Some(body)).await?;
        Ok(if (200..300).contains(&status) {
            Some(())
        } else {
            // 503 before the seed is committed, 404 before the pool exists.
            if ![503, 404].contains(&status) {
                return Err(format!("HTTP {status}: {reply}").into());
            }
            None
        })
    })
    .await?;
    eprintln!("raftlb: leader is node {leader_id} (admin {leader}), follower admin {follower}");
    Ok(Cluster {
        system: System::Raftlb,
        leader,
        follower,
        pids,
    })
}

// ---------------------------------------------------------------------------------------
// etcd

async fn start_etcd(bin: &Path, guard: &mut Guard) -> Result<Cluster, Error> {
    let ports = free_ports(6)?;
    let (client, peer) = ports.split_at(3);
    let initial_cluster: Vec<String> = peer
        .iter()
        .enumerate()
        .map(|(i, p)| format!("e{}=http://127.0.0.1:{p}", i + 1))
        .collect();
    let initial_cluster = initial_cluster.join(",");
    let token = format!("raft-writes-{}", std::process::id());
    let mut pids = Vec::new();
    for n in 0..3 {
        let name = format!("e{}", n + 1);
        let client_url = format!("http://127.0.0.1:{}", client[n]);
        let peer_url = format!("http://127.0.0.1:{}", peer[n]);
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(guard.dir.path().join(format!("etcd-{}", n + 1)))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&token)
            .arg("--logger")
            .arg("zap");
        pids.push(guard.spawn(&format!("etcd-{}", n + 1), cmd)?);
    }
    let client_addrs: Vec<SocketAddr> = client
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    // (member_id, leader) from every member, all naming the same leader.
    let leader_index = wait_for("etcd: a leader seen by all three members", guard, || {
        let addrs = client_addrs.clone();
        async move {
            let mut members = Vec::new();
            for addr in addrs {
                let (status, reply) = once(
                    addr,
                    Method::POST,
                    "/v3/maintenance/status",
                    Some(b"{}".to_vec()),
                )
                .await?;
                if status != 200 {
                    return Err(format!("HTTP {status}: {reply}").into());
                }
                let id = |v: &Value| match v {
                    Value::String(s) => s.parse::<u64>().ok(),
                    v => v.as_u64(),
                };
                members.push((id(&reply["header"]["member_id"]), id(&reply["leader"])));
            }
            let leader = members[0].1.filter(|l| *l != 0);
            if leader.is_none() || members.iter().any(|m| m.1 != leader) {
                return Ok(None);
            }
            Ok(members.iter().position(|m| m.0 == leader))
        }
    })
    .await?;
    let leader = client_addrs[leader_index];
    let follower = client_addrs[(leader_index + 1) % 3];
    wait_for("etcd: a first committed put", guard, || async move {
        let (method, path, body) = System::Etcd.write(0, 0);
        let (status, reply) = once(leader, method, &path, Some(body)).await?;
        if status != 200 {
            return Err(format!("HTTP {status}: {reply}").into());
        }
        Ok(Some(()))
    })
    .await?;
    eprintln!("etcd: leader client URL http://{leader}, follower http://{follower}");
    Ok(Cluster {
        system: System::Etcd,
        leader,
        follower,
        pids,
    })
}

// ---------------------------------------------------------------------------------------
// Report

fn print_table(phases: &[Phase], s: &Settings) {
    println!();
    println!(
        "3 replicas each on loopback; sequential: {} writes after {} warm-up; concurrent: {} writes from {} writers; phase limit {} s",
        s.writes,
        s.warmup,
        s.concurrent_writes,
        s.writers,
        s.phase_timeout.as_secs()
    );
    println!(
        "{:<7} {:<20} {:>6} {:>9} {:>8} {:>8} {:>8} {:>6} {:>12}",
        "system",
        "mode",
        "writes",
        "writes/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "cpu us/write"
    );
    for p in phases {
        let max = p
            .latencies
            .iter()
            .max()
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
        let cpu_per_write = p.cpu / (p.ok + p.errors).max(1) as f64 * 1e6;
        println!(
            "{:<7} {:<20} {:>6} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>12.0}{}",
            p.system.name(),
            p.mode,
            p.ok,
            p.rate(),
            p.percentile_ms(0.50),
            p.percentile_ms(0.99),
            max,
            p.errors,
            cpu_per_write,
            if p.aborted {
                "  (stopped at the phase limit)"
            } else {
                ""
            }
        );
    }
    println!();
    println!(
        "raftlb/etcd ratios (writes/s: above 1 is raftlb faster; p99: above 1 is raftlb slower):"
    );
    for p in phases.iter().filter(|p| p.system == System::Raftlb) {
        if let Some(e) = phases
            .iter()
            .find(|e| e.system == System::Etcd && e.mode == p.mode)
        {
            println!(
                "  {:<20} writes/s {:>6.2}   p99 {:>6.2}",
                p.mode,
                p.rate() / e.rate(),
                p.percentile_ms(0.99) / e.percentile_ms(0.99)
            );
        }
    }
    for p in phases.iter().filter(|p| p.errors > 0) {
        println!(
            "{} {}: {} failed writes, first: {}",
            p.system.name(),
            p.mode,
            p.errors,
            p.first_error.as_deref().unwrap_or("?")
        );
    }
}

async fn run(raftlb: &Path, etcd: &Path, s: &Settings, guard: &mut Guard) -> Result<(), Error> {
    eprintln!("data dirs under {}", guard.dir.path().display());
    let mut phases = Vec::new();
    // One cluster at a time, so the idle one's heartbeats and compaction stay out.
    let cluster = start_raftlb(raftlb, guard).await?;
    phases.extend(measure(&cluster, s).await?);
    guard.check_alive()?;
    guard.stop_all();
    let cluster = start_etcd(etcd, guard).await?;
    phases.extend(measure(&cluster, s).await?);
    guard.check_alive()?;
    guard.stop_all();
    print_table(&phases, s);
    Ok(())
}

fn main() -> ExitCode {
    let Some(etcd) = std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .or_else(|| find_on_path("etcd"))
        .filter(|p| p.is_file())
    else {
        println!(
            "skipped etcd: not installed (no `etcd` on PATH and no ETCD_BIN); \
             install it with `apt-get install -y etcd-server etcd-client` and run again"
        );
        return ExitCode::SUCCESS;
    };
    let raftlb = std::env::var_os("RAFTLB_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/raftlb"),
        PathBuf::from,
    );
    if !raftlb.is_file() {
        eprintln!(
            "error: no raftlb binary at {}: run `cargo build --release` first or set RAFTLB_BIN",
            raftlb.display()
        );
        return ExitCode::FAILURE;
    }
    let settings = Settings::from_env();
    let mut guard = match Guard::new() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: cannot create a temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Ctrl-C or SIGTERM ends the run through the same path, so the children die too.
    let result = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(&raftlb, &etcd, &settings, &mut guard) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted (SIGINT)".into()),
            _ = term.recv() => Err("interrupted (SIGTERM)".into()),
        }
    });
    drop(runtime);
    // Kill the children before the temp dir goes.
    drop(guard);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
