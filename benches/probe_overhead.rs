//! Probe overhead: a release raftlb with one pool of 100 HTTPS backends probed every
//! second (`/readyz`), measured for 20 s. Prints raftlb's CPU use in percent of one
//! core, from /proc/<pid>/stat. Run: `cargo build --release && cargo bench --bench probe_overhead`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const BACKENDS: usize = 100;
const MEASURE: Duration = Duration::from_secs(20);

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/pid/stat");
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime")) / 100.0
}

async fn backend(acceptor: TlsAcceptor) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

fn main() {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/raftlb");
    if !bin.exists() {
        eprintln!(
            "{} is missing: run `cargo build --release` first",
            bin.display()
        );
        std::process::exit(1);
    }
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we need. Only run under bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let config = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let addrs: Vec<SocketAddr> = runtime.block_on(async {
        let mut v = Vec::new();
        for _ in 0..BACKENDS {
            v.push(backend(acceptor.clone()).await);
        }
        v
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let mut yaml = format!(
        "admin: {{ bind: \"{admin}\" }}\nruntime: {{ worker_threads: 1 }}\nlisteners:\n  a: {{ bind: \"{listen}\", pool: p }}\npools:\n  p:\n    health_check: {{ kind: https, path: /readyz, interval: 1s, timeout: 500ms }}\n    backends:\n"
    );
    for (i, a) in addrs.iter().enumerate() {
        yaml.push_str(&format!("      - {{ name: b{i}, address: \"{a}\" }}\n"));
    }
    let config_path = dir.path().join("raftlb.yaml");
    std::fs::write(&config_path, yaml).expect("write config");
    let mut child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config_path)
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start raftlb");
    // Let every backend pass `rise` probes before measuring the steady state.
    std::thread::sleep(Duration::from_secs(4));
    let (before, started) = (cpu_seconds(child.id()), Instant::now());
    std::thread::sleep(MEASURE);
    let used = cpu_seconds(child.id()) - before;
    let elapsed = started.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "probe_overhead: {BACKENDS} https backends, interval 1s: raftlb used {used:.2} CPU s in {elapsed:.1} s = {:.2}% of one core ({:.2} ms CPU per probe)",
        100.0 * used / elapsed,
        1000.0 * used / (elapsed * BACKENDS as f64)
    );
}
