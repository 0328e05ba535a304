//! Probe overhead: the release raftlb with one pool of 100 HTTPS backends probed every
//! second (`/readyz`, verified against a test CA), measured for 20 s once every backend
//! is up. Prints raftlb's CPU use (utime + stime from /proc/<pid>/stat) in percent of
//! one core. Run: `cargo build --release && cargo bench --bench probe_overhead`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::Pki;
use common::{eventually, http_get, loopback, raise_nofile};
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const BACKENDS: usize = 100;
const MEASURE: Duration = Duration::from_secs(20);

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .ok_or("/proc/<pid>/stat: no ')'")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let field = |i: usize| -> Result<f64, String> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: field {} unreadable", i + 3))
    };
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the name.
    Ok((field(11)? + field(12)?) / ticks_per_second)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A tiny HTTPS backend answering 200 to everything; counts the requests it serves.
async fn backend(acceptor: TlsAcceptor, served: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, served) = (acceptor.clone(), served.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| {
                    served.fetch_add(1, Ordering::Relaxed);
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok")))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// Every backend of the pool shows `up` in the admin API.
fn all_up(admin: SocketAddr) -> bool {
    let Ok((200, body)) = http_get(admin, "/api/v1/backends") else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        return false;
    };
    v["pools"][0]["backends"]
        .as_array()
        .is_some_and(|bs| bs.len() == BACKENDS && bs.iter().all(|b| b["health"] == "up"))
}

fn main() -> ExitCode {
    // `cargo test --benches` runs this without `--bench`: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/raftlb");
    if !bin.exists() {
        eprintln!(
            "probe_overhead: {} is missing: run `cargo build --release` first",
            bin.display()
        );
        return ExitCode::FAILURE;
    }
    match run(&bin) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe_overhead: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(bin: &Path) -> Result<(), String> {
    raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let pki = Pki::new(dir.path(), "bench");
    let files = pki.server("apiserver", &["kubernetes"]);
    let acceptor = TlsAcceptor::from(pki.server_config(&files, false, &[]));
    let served = Arc::new(AtomicU64::new(0));
    let addrs: Vec<SocketAddr> = runtime.block_on(async {
        let mut v = Vec::with_capacity(BACKENDS);
        for _ in 0..BACKENDS {
            v.push(backend(acceptor.clone(), served.clone()).await);
        }
        v
    });

    let admin = loopback();
    let listen = loopback();
    let mut yaml = format!(
        "admin:\n  bind: {admin}\nlisteners:\n  apiserver:\n    bind: {listen}\n    pool: apiservers\npools:\n  apiservers:\n    health_check:\n      kind: https\n      path: /readyz\n      interval: 1s\n      timeout: 500ms\n      rise: 2\n      fall: 3\n      tls: {{ ca: \"{}\", server_name: kubernetes }}\n    backends:\n",
        pki.ca.display()
    );
    for (i, a) in addrs.iter().enumerate() {
        yaml.push_str(&format!("      - {{ name: b{i}, address: \"{a}\" }}\n"));
    }
    let config = dir.path().join("raftlb.yaml");
    std::fs::write(&config, yaml).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&config)
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start {}: {e}", bin.display()))?;
    let pid = child.id();

    let measured = (|| {
        if !eventually(Duration::from_secs(20), || all_up(admin)) {
            return Err(format!("not all {BACKENDS} backends came up within 20 s"));
        }
        let ticks = clock_ticks();
        let (cpu_before, probes_before, started) = (
            cpu_seconds(pid, ticks)?,
            served.load(Ordering::Relaxed),
            Instant::now(),
        );
        std::thread::sleep(MEASURE);
        let cpu = cpu_seconds(pid, ticks)? - cpu_before;
        let probes = served.load(Ordering::Relaxed) - probes_before;
        Ok((cpu, probes, started.elapsed().as_secs_f64()))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let (cpu, probes, elapsed) = measured?;
    println!(
        "probe_overhead: {BACKENDS} HTTPS backends, interval 1s: {probes} probes in {elapsed:.1} s \
         ({:.1}/s); raftlb used {cpu:.2} CPU s = {:.2}% of one core, {:.3} ms CPU per probe",
        probes as f64 / elapsed,
        100.0 * cpu / elapsed,
        1000.0 * cpu / probes.max(1) as f64
    );
    Ok(())
}
