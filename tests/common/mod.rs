//! Test fixtures: real `raftlb` processes on loopback, real backends, tiny HTTP reads.
#![allow(dead_code)]

pub mod cluster;
pub mod netns;
pub mod pki;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_raftlb");

/// Raises the open-files soft limit to the hard limit (the tests open many sockets).
pub fn raise_nofile() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
}

/// Runs a blocking fixture call (process start, `/metrics`, `eventually`) from an
/// async test without starving the worker that serves the test's own backends.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A 127.0.0.1 address whose port was free a moment ago.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Writes `msg` and reads the same number of bytes back within 5 s.
pub async fn echo_once<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo within 5 s"))??;
    Ok(back)
}

/// A loopback port that was free a moment ago. Taken below the kernel's ephemeral
/// range, so an outgoing connection (a peer dialling, a health check) cannot grab it
/// before the process under test binds it, and never the same one twice in a binary.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral > LOW + 1_000 {
        let span = ephemeral - LOW;
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = (LOW + (start + n) % span) as u16;
            if StdListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A running `raftlb run` process; killed when dropped.
pub struct Raftlb {
    pub child: Child,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Raftlb {
    /// Writes `yaml` (which must bind the admin API to `admin`) and starts raftlb on it,
    /// then waits until `/readyz` answers 200.
    pub fn start(yaml: &str, admin: SocketAddr) -> Raftlb {
        Raftlb::start_wrapped(&[], yaml, admin)
    }

    /// Like [`Raftlb::start`], with raftlb run under `wrapper` (e.g. `prlimit --nofile=128:128 --`).
    pub fn start_wrapped(wrapper: &[&str], yaml: &str, admin: SocketAddr) -> Raftlb {
        let mut lb = Raftlb::spawn_wrapped(wrapper, yaml, admin);
        lb.wait_ready();
        lb
    }

    /// Starts raftlb on `yaml` without waiting for it to be ready (a cluster replica
    /// is ready only once a quorum has formed).
    pub fn spawn(yaml: &str, admin: SocketAddr) -> Raftlb {
        Raftlb::spawn_wrapped(&[], yaml, admin)
    }

    pub fn spawn_wrapped(wrapper: &[&str], yaml: &str, admin: SocketAddr) -> Raftlb {
        Raftlb::spawn_with(wrapper, yaml, admin, &[])
    }

    /// Starts raftlb on `yaml` with `extra` arguments after `run` (e.g. `--log-format json`).
    pub fn spawn_with(wrapper: &[&str], yaml: &str, admin: SocketAddr, extra: &[&str]) -> Raftlb {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("raftlb.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let log = std::fs::File::create(dir.path().join("raftlb.log")).expect("log file");
        let (program, wrapper_args) = match wrapper.split_first() {
            Some((program, rest)) => (*program, rest),
            None => (BIN, &[][..]),
        };
        let mut command = Command::new(program);
        if !wrapper.is_empty() {
            command.args(wrapper_args).arg(BIN);
        }
        let child = command
            .args(["run", "--config"])
            .arg(&config)
            .args(["--log-level", "debug"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn raftlb");
        Raftlb {
            child,
            admin,
            dir,
            config,
        }
    }

    /// A standalone config with one listener in front of `backends` (name, address).
    pub fn standalone_yaml(
        admin: SocketAddr,
        listen: SocketAddr,
        pool_extra: &str,
        listener_extra: &str,
        backends: &[(&str, SocketAddr)],
    ) -> String {
        let weighted: Vec<(&str, SocketAddr, u32)> = backends
            .iter()
            .map(|&(name, addr)| (name, addr, 1))
            .collect();
        Self::standalone_yaml_weighted(admin, listen, pool_extra, listener_extra, &weighted)
    }

    /// The same with a weight per backend (name, address, weight); weight 1 is left implicit.
    pub fn standalone_yaml_weighted(
        admin: SocketAddr,
        listen: SocketAddr,
        pool_extra: &str,
        listener_extra: &str,
        backends: &[(&str, SocketAddr, u32)],
    ) -> String {
        let mut y = format!(
            "admin:\n  bind: {admin}\nruntime:\n  worker_threads: 2\n  shutdown_grace: 10s\nlisteners:\n  front:\n    bind: {listen}\n    pool: web\n{listener_extra}pools:\n  web:\n{pool_extra}    backends:\n"
        );
        for (name, addr, weight) in backends {
            let weight = match weight {
                1 => String::new(),
                w => format!(", weight: {w}"),
            };
            y.push_str(&format!(
                "      - {{ name: {name}, address: \"{addr}\"{weight} }}\n"
            ));
        }
        y
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "raftlb exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if http_get(self.admin, "/readyz").is_ok_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("raftlb did not become ready in 20s:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("raftlb.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`HUP`, `TERM`, `INT`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Replaces the config file (for SIGHUP tests).
    pub fn rewrite_config(&self, yaml: &str) {
        std::fs::write(&self.config, yaml).expect("rewrite config");
    }

    pub fn metrics(&self) -> String {
        let (code, body) = http_get(self.admin, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200);
        body
    }

    /// The value of one metric series, e.g. `raftlb_connections_total{...}`; 0 if absent.
    pub fn metric(&self, series_prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(series_prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Raftlb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over plain HTTP/1.1: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], "")
}

/// A tiny HTTP/1.1 request with `Connection: close` for the admin API: (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    http_response(addr, method, path, headers, body).map(|r| (r.status, r.body))
}

/// A server on loopback that runs `serve` on each connection in a task of its own,
/// until the test's runtime ends.
pub async fn serve_each<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// An echo server on loopback.
pub async fn echo_backend() -> SocketAddr {
    serve_each(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A server that writes `name` and a newline to every connection, then closes it.
pub async fn named_backend(name: &str) -> SocketAddr {
    let reply: std::sync::Arc<str> = format!("{name}\n").into();
    serve_each(move |mut s| {
        let reply = reply.clone();
        async move {
            let _ = s.write_all(reply.as_bytes()).await;
            let _ = s.shutdown().await;
            // Drain until the client closes, so the client never sees a reset.
            let mut sink = [0u8; 64];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await
}

/// A TCP connection to `addr` (IPv4), from the address `source` if given (e.g.
/// 127.0.0.2, to look like another client), within 5 s.
pub async fn connect_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Connects through the proxy at `addr` (from `source` if given) and reads the backend's name.
pub async fn which_backend(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<String> {
    let mut s = connect_from(source, addr).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    Ok(out.trim().to_string())
}

/// Runs `raftlb` with `args` to completion: (exit code, stdout, stderr).
pub fn raftlb_cmd(args: &[&str]) -> (i32, String, String) {
    finished(Command::new(BIN).args(args))
}

/// The same, interrupted (SIGINT) after `seconds`: every run is bounded.
pub fn raftlb_cmd_timeout(args: &[&str], seconds: u32) -> (i32, String, String) {
    finished(
        Command::new("timeout")
            .args(["-s", "INT", &seconds.to_string(), BIN])
            .args(args),
    )
}

fn finished(command: &mut Command) -> (i32, String, String) {
    let out = command.output().expect("run raftlb");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `raftlb check --config path`.
pub fn check(path: &Path) -> (i32, String, String) {
    raftlb_cmd(&["check", "--config", path.to_str().expect("utf-8 path")])
}

/// `raftlb check --syntax-only`: the file alone (for configs whose certificate and
/// token paths exist only on the machine they are written for).
pub fn check_syntax(path: &Path) -> (i32, String, String) {
    raftlb_cmd(&[
        "check",
        "--syntax-only",
        "--config",
        path.to_str().expect("utf-8 path"),
    ])
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}

/// An HTTP response with its headers (names lowercased).
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Like [`http_request`], but keeps the response headers. Speaks HTTP with hyper on
/// a thread of its own, so it works from sync and async tests alike.
pub fn http_response(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpResponse> {
    let mut request = hyper::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request = request.header(hyper::header::HOST, addr.to_string());
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .map_err(std::io::Error::other)?;
    let exchange = async move {
        let stream =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| std::io::Error::other("connect timed out"))??;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let response = sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok(HttpResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime
                    .block_on(async {
                        tokio::time::timeout(Duration::from_secs(10), exchange).await
                    })
                    .map_err(|_| std::io::Error::other("HTTP request timed out"))?
            })
            .join()
            .map_err(|_| std::io::Error::other("HTTP client thread panicked"))?
    })
}

/// The loopback addresses of one replica of a test cluster.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub admin: SocketAddr,
    pub peer: SocketAddr,
    pub listen: SocketAddr,
}

impl Addrs {
    /// Free addresses for `n` replicas.
    pub fn for_replicas(n: usize) -> Vec<Addrs> {
        (0..n)
            .map(|_| Addrs {
                admin: loopback(),
                peer: loopback(),
                listen: loopback(),
            })
            .collect()
    }

    /// The `peers:` map of a cluster whose replica `i` (node_id i+1) has `all[i]`:
    /// `1: ADDR, 2: ADDR, ...`.
    pub fn peers(all: &[Addrs]) -> String {
        all.iter()
            .enumerate()
            .map(|(j, p)| format!("{}: {}", j + 1, p.peer))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A data_dir per replica.
pub fn data_dirs(n: usize) -> Vec<tempfile::TempDir> {
    (0..n)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect()
}

/// Whether process `pid` runs (a zombie has finished); `pid` must be a number.
pub fn running(pid: &str) -> bool {
    let pid: u32 = pid
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("process id {pid:?}: {e}"));
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// A small tmpfs, unmounted on drop.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounting needs root, as CI runs: a test that needs a small disk fails rather
    /// than skips without it.
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(
            out.status.success(),
            "cannot mount a {size} tmpfs (the full-disk tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system holding `dir` until it refuses more.
pub fn fill(dir: &Path) -> PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0xabu8; 64 << 10];
    for _ in 0..100_000 {
        if f.write_all(&chunk).and_then(|()| f.sync_all()).is_err() {
            break;
        }
    }
    path
}

/// A pools document with `n` backends of ~100 bytes each: log entries that make the
/// store grow.
pub fn big_pools(n: usize, backend: SocketAddr, weight: u32) -> String {
    let backends: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"name": "filler-backend-with-a-long-name-{i:04}", "address": "{backend}", "weight": {weight}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"pools": {{"web": {{"backends": [{}]}}}}}}"#,
        backends.join(",")
    )
}
