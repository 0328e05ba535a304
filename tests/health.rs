//! Health checking end to end, with the real binary on loopback: HTTPS `/readyz`
//! probes with rise/fall, `unknown` at start, tcp and tls probes, passive checks with
//! `passive_hold`, all backends down, `on_down: close`, the kube-apiserver graceful
//! shutdown sequence with zero failed requests, and a silent backend that must not
//! stall the probes of the others.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::pki::Pki;
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

/// An HTTPS backend like kube-apiserver. `/readyz` answers 200 or 500 as told (or
/// never, when `silent`); any other path answers the backend's name. Its listening
/// port can be closed and opened again; connections already accepted keep being served.
struct Apiserver {
    name: String,
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    accepting: watch::Sender<bool>,
    /// When each data-path connection (one whose first request is not `/readyz`) was accepted.
    data: Arc<Mutex<Vec<SystemTime>>>,
}

impl Apiserver {
    async fn start(name: &str, config: Arc<ServerConfig>) -> Apiserver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = Apiserver {
            name: name.to_string(),
            addr,
            ready: Arc::new(AtomicBool::new(true)),
            silent: Arc::new(AtomicBool::new(false)),
            accepting: watch::Sender::new(true),
            data: Arc::new(Mutex::new(Vec::new())),
        };
        let conn = Conn {
            acceptor: TlsAcceptor::from(config),
            name: Bytes::from(name.to_string()),
            ready: server.ready.clone(),
            silent: server.silent.clone(),
            data: server.data.clone(),
        };
        tokio::spawn(accept_loop(listener, server.accepting.subscribe(), conn));
        server
    }

    /// Opens or closes the listening port (closed: connects are refused).
    fn set_accepting(&self, open: bool) {
        self.accepting.send_replace(open);
    }

    fn data_connections(&self) -> Vec<SystemTime> {
        self.data.lock().expect("data lock").clone()
    }
}

/// What every connection of one [`Apiserver`] shares.
#[derive(Clone)]
struct Conn {
    acceptor: TlsAcceptor,
    name: Bytes,
    ready: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    data: Arc<Mutex<Vec<SystemTime>>>,
}

/// Accepts while `accepting` is true; on false it drops the listener, and binds the
/// same address again on true. Ends when the [`Apiserver`] is dropped.
async fn accept_loop(first: TcpListener, mut accepting: watch::Receiver<bool>, conn: Conn) {
    let addr = first.local_addr().expect("addr");
    let mut listener = Some(first);
    loop {
        if accepting.wait_for(|open| *open).await.is_err() {
            return;
        }
        let current = match listener.take() {
            Some(l) => l,
            None => rebind(addr).await,
        };
        loop {
            tokio::select! {
                changed = accepting.changed() => match changed {
                    Err(_) => return,
                    Ok(()) if !*accepting.borrow_and_update() => break,
                    Ok(()) => {}
                },
                accepted = current.accept() => if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_connection(stream, conn.clone()));
                },
            }
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not bind {addr} again");
}

async fn serve_connection(stream: TcpStream, conn: Conn) {
    let accepted = SystemTime::now();
    let Ok(tls) = conn.acceptor.accept(stream).await else {
        return;
    };
    let counted = Arc::new(AtomicBool::new(false));
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (conn, counted) = (conn.clone(), counted.clone());
        async move {
            let mut response = Response::new(Full::new(conn.name.clone()));
            if req.uri().path() == "/readyz" {
                if conn.silent.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                if !conn.ready.load(Ordering::SeqCst) {
                    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                }
            } else if !counted.swap(true, Ordering::SeqCst) {
                conn.data.lock().expect("data lock").push(accepted);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

/// A TLS connection through raftlb (passthrough) with an HTTP/1.1 client on it; the
/// handle ends when the connection does.
async fn connect(
    listen: SocketAddr,
    client: &Arc<ClientConfig>,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let tcp = TcpStream::connect(listen)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(client.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, driver))
}

/// `GET /version` on an open connection: the backend's name.
async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) -> Result<String, String> {
    let req = Request::get("/version")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// One HTTPS request on a new connection through raftlb: the backend's name.
async fn request(listen: SocketAddr, client: &Arc<ClientConfig>) -> Result<String, String> {
    let exchange = async {
        let (mut sender, _driver) = connect(listen, client).await?;
        get(&mut sender).await
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// A CA, one server certificate (names localhost, kubernetes, 127.0.0.1) and configs.
struct Lab {
    dir: tempfile::TempDir,
    pki: Pki,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn lab() -> Lab {
    raise_nofile();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "health");
    let files = pki.server("apiserver", &["kubernetes"]);
    let server = pki.server_config(&files, false, &[]);
    let client = pki.client_config(None, &[]);
    Lab {
        dir,
        pki,
        server,
        client,
    }
}

/// Pool lines (4-space indent) for a `health_check`; `tls` is the inner flow mapping.
fn check_yaml(
    kind: &str,
    interval: &str,
    timeout: &str,
    rise: u32,
    fall: u32,
    tls: &str,
) -> String {
    let mut y = format!(
        "    health_check:\n      kind: {kind}\n      interval: {interval}\n      timeout: {timeout}\n      rise: {rise}\n      fall: {fall}\n"
    );
    if kind == "https" {
        y.push_str("      path: /readyz\n");
    }
    if !tls.is_empty() {
        y.push_str(&format!("      tls: {{ {tls} }}\n"));
    }
    y
}

/// An HTTPS `/readyz` check that verifies the backends against the test CA.
fn https_check(pki: &Pki, interval: &str, timeout: &str, rise: u32, fall: u32) -> String {
    let tls = format!("ca: \"{}\", server_name: kubernetes", pki.ca.display());
    check_yaml("https", interval, timeout, rise, fall, &tls)
}

/// One backend's entry in GET /api/v1/backends.
fn backend_json(lb: &Raftlb, pool: &str, name: &str) -> Value {
    let (code, body) = http_get(lb.admin, "/api/v1/backends").expect("GET /api/v1/backends");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    v["pools"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == pool))
        .and_then(|p| p["backends"].as_array())
        .and_then(|bs| bs.iter().find(|b| b["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no backend {pool}/{name} in {body}"))
}

fn health(lb: &Raftlb, pool: &str, name: &str) -> String {
    backend_json(lb, pool, name)["health"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits (up to `within`) until `pool/name` shows `want`; panics with the log otherwise.
fn wait_health(lb: &Raftlb, pool: &str, name: &str, want: &str, within: Duration) {
    if !eventually(within, || health(lb, pool, name) == want) {
        panic!(
            "{pool}/{name} is not {want} after {within:?}: {}\n{}",
            backend_json(lb, pool, name),
            lb.log()
        );
    }
}

/// Waits until `pool/name` flips to `to` and returns its entry; on the way, fails if one
/// probe (`run` is `consecutive_fail` or `consecutive_ok`) was enough to flip it.
fn wait_flip(lb: &Raftlb, pool: &str, name: &str, to: &str, run: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let d = backend_json(lb, pool, name);
        assert!(
            !(d["health"] == to && d[run] == 1),
            "{pool}/{name} flipped to {to} after a single probe: {d}"
        );
        if d["health"] == to {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "{pool}/{name} is not {to}: {d}\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn error_of(detail: &Value) -> String {
    detail["last_check"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn time_of(value: &Value) -> SystemTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn checks(lb: &Raftlb, pool: &str, backend: &str, result: &str) -> f64 {
    lb.metric(&format!(
        "raftlb_health_checks_total{{pool=\"{pool}\",backend=\"{backend}\",result=\"{result}\"}}"
    ))
}

fn connections(lb: &Raftlb, backend: &str, result: &str) -> f64 {
    lb.metric(&format!(
        "raftlb_connections_total{{listener=\"front\",pool=\"web\",backend=\"{backend}\",result=\"{result}\"}}"
    ))
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_readyz_takes_a_backend_out_and_a_passing_one_brings_it_back() {
    let lab = lab();
    let a = Apiserver::start("a", lab.server.clone()).await;
    let b = Apiserver::start("b", lab.server.clone()).await;
    let (admin, listen) = (loopback(), loopback());
    let check = https_check(&lab.pki, "200ms", "150ms", 2, 2);
    let yaml = Raftlb::standalone_yaml(admin, listen, &check, "", &[("a", a.addr), ("b", b.addr)]);
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    blocking(|| {
        wait_health(&lb, "web", "a", "up", WAIT);
        wait_health(&lb, "web", "b", "up", WAIT);
    });
    assert_eq!(blocking(|| checks(&lb, "web", "b", "fail")), 0.0);

    b.ready.store(false, Ordering::SeqCst);
    let detail = blocking(|| wait_flip(&lb, "web", "b", "down", "consecutive_fail"));
    assert_eq!(detail["last_check"]["ok"], false, "{detail}");
    assert!(error_of(&detail).contains("500"), "{detail}");
    assert!(
        detail["consecutive_fail"].as_u64() >= Some(2),
        "down before `fall` probes failed: {detail}"
    );
    assert!(detail["last_flip"].is_string(), "{detail}");
    assert_eq!(
        blocking(|| lb.metric("raftlb_backend_up{pool=\"web\",backend=\"b\"}")),
        0.0
    );
    assert_eq!(
        blocking(|| lb.metric("raftlb_backend_up{pool=\"web\",backend=\"a\"}")),
        1.0
    );
    let fails = blocking(|| checks(&lb, "web", "b", "fail"));
    assert!(fails >= 2.0, "health_checks_total fail = {fails}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let more = blocking(|| checks(&lb, "web", "b", "fail"));
    assert!(
        more > fails,
        "a down backend is still probed: {fails} -> {more}"
    );

    let before = b.data_connections().len();
    for _ in 0..20 {
        assert_eq!(request(listen, &lab.client).await.as_deref(), Ok("a"));
    }
    assert_eq!(
        b.data_connections().len(),
        before,
        "a backend that is down got new connections"
    );

    b.ready.store(true, Ordering::SeqCst);
    let detail = blocking(|| wait_flip(&lb, "web", "b", "up", "consecutive_ok"));
    assert_eq!(detail["last_check"]["ok"], true, "{detail}");
    assert!(
        detail["consecutive_ok"].as_u64() >= Some(2),
        "up before `rise` probes passed: {detail}"
    );
    assert_eq!(
        blocking(|| lb.metric("raftlb_backend_up{pool=\"web\",backend=\"b\"}")),
        1.0
    );
    let mut names = Vec::new();
    for _ in 0..20 {
        names.push(request(listen, &lab.client).await.expect("request"));
    }
    assert!(
        names.iter().any(|n| n == "b") && b.data_connections().len() > before,
        "b gets traffic again: {names:?}"
    );
    let log = lb.log();
    assert!(
        log.contains("backend is down") && log.contains("backend is up"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_are_unknown_until_probed_and_unused_until_rise_probes_pass() {
    let lab = lab();
    let a = Apiserver::start("a", lab.server.clone()).await;
    let (admin, listen) = (loopback(), loopback());
    // One probe a second, rise 2: after the first good probe there is ~1 s in which
    // the backend has passed a probe but must still be routed as down.
    let check = https_check(&lab.pki, "1s", "500ms", 2, 2);
    let yaml = Raftlb::standalone_yaml(admin, listen, &check, "", &[("a", a.addr)]);
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    // /readyz is up once the config is loaded, long before two probes can have run.
    assert_eq!(blocking(|| health(&lb, "web", "a")), "unknown");
    assert_eq!(
        blocking(|| lb.metric("raftlb_backend_up{pool=\"web\",backend=\"a\"}")),
        0.0
    );
    // After its first probe it is no longer unknown: down (as it was routed) until
    // the second passes.
    let first_passed = blocking(|| {
        eventually(WAIT, || {
            let d = backend_json(&lb, "web", "a");
            d["consecutive_ok"] == 1 && d["health"] == "down"
        })
    });
    assert!(
        first_passed,
        "{}",
        blocking(|| backend_json(&lb, "web", "a"))
    );

    let started = Instant::now();
    let early = request(listen, &lab.client).await;
    let took = started.elapsed();
    assert_eq!(
        blocking(|| health(&lb, "web", "a")),
        "down",
        "the second probe came too soon for this test"
    );
    assert!(
        lb.log()
            .contains("its first probe passed; the backend is up once 2 pass in a row")
            && !lb.log().contains("backend is down"),
        "{}",
        lb.log()
    );
    assert!(
        early.is_err(),
        "a connection reached a backend that had passed 1 of 2 probes: {early:?}"
    );
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    assert!(a.data_connections().is_empty());
    assert!(blocking(|| connections(&lb, "none", "no_backend")) >= 1.0);

    blocking(|| wait_health(&lb, "web", "a", "up", WAIT));
    assert_eq!(
        blocking(|| lb.metric("raftlb_backend_up{pool=\"web\",backend=\"a\"}")),
        1.0
    );
    assert_eq!(request(listen, &lab.client).await.as_deref(), Ok("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_tls_probes_follow_the_port_and_verify_the_certificate() {
    let lab = lab();
    let other_ca = Pki::new(lab.dir.path(), "other");
    let a = Apiserver::start("a", lab.server.clone()).await;
    let plain = named_backend("plain").await;
    let closed = loopback();
    let ca = lab.pki.ca.display().to_string();
    let pools = [
        (
            "web",
            check_yaml("tcp", "200ms", "150ms", 2, 2, ""),
            vec![("open", a.addr), ("closed", closed)],
        ),
        (
            "tls",
            check_yaml(
                "tls",
                "200ms",
                "150ms",
                2,
                2,
                &format!("ca: \"{ca}\", server_name: kubernetes"),
            ),
            vec![("tls", a.addr), ("plain", plain)],
        ),
        (
            "wrong_name",
            check_yaml(
                "tls",
                "200ms",
                "150ms",
                2,
                2,
                &format!("ca: \"{ca}\", server_name: etcd"),
            ),
            vec![("tls", a.addr)],
        ),
        (
            "wrong_ca",
            check_yaml(
                "tls",
                "200ms",
                "150ms",
                2,
                2,
                &format!("ca: \"{}\", server_name: kubernetes", other_ca.ca.display()),
            ),
            vec![("tls", a.addr)],
        ),
    ];
    let (admin, listen) = (loopback(), loopback());
    let mut yaml = format!(
        "admin:\n  bind: {admin}\nlisteners:\n  front:\n    bind: {listen}\n    pool: web\npools:\n"
    );
    for (name, check, backends) in &pools {
        yaml.push_str(&format!("  {name}:\n{check}    backends:\n"));
        for (b, addr) in backends {
            yaml.push_str(&format!("      - {{ name: {b}, address: \"{addr}\" }}\n"));
        }
    }
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    blocking(|| {
        wait_health(&lb, "web", "open", "up", WAIT);
        wait_health(&lb, "web", "closed", "down", WAIT);
        wait_health(&lb, "tls", "tls", "up", WAIT);
        wait_health(&lb, "tls", "plain", "down", WAIT);
        wait_health(&lb, "wrong_name", "tls", "down", WAIT);
        wait_health(&lb, "wrong_ca", "tls", "down", WAIT);
    });
    let closed = blocking(|| backend_json(&lb, "web", "closed"));
    assert!(error_of(&closed).contains("connect"), "{closed}");
    for (pool, backend, why) in [
        ("tls", "plain", "TLS handshake"),
        ("wrong_name", "tls", "certificate"),
        ("wrong_ca", "tls", "certificate"),
    ] {
        let d = blocking(|| backend_json(&lb, pool, backend));
        assert!(error_of(&d).contains(why), "{pool}/{backend}: {d}");
        // Down at its first failed probe: a backend is unknown only until then.
        assert!(blocking(|| checks(&lb, pool, backend, "fail")) >= 1.0);
    }
    let tls_ok = blocking(|| backend_json(&lb, "tls", "tls"));
    assert_eq!(tls_ok["last_check"]["ok"], true, "{tls_ok}");
    assert!(
        a.data_connections().is_empty(),
        "tcp and tls probes send no HTTP request"
    );

    // The port closes: both the tcp and the tls probe see it; it opens: both recover.
    a.set_accepting(false);
    blocking(|| {
        wait_health(&lb, "web", "open", "down", WAIT);
        wait_health(&lb, "tls", "tls", "down", WAIT);
    });
    let open = blocking(|| backend_json(&lb, "web", "open"));
    assert!(error_of(&open).contains("connect"), "{open}");
    a.set_accepting(true);
    blocking(|| {
        wait_health(&lb, "web", "open", "up", WAIT);
        wait_health(&lb, "tls", "tls", "up", WAIT);
    });
    assert_eq!(request(listen, &lab.client).await.as_deref(), Ok("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_checks_take_a_dead_backend_out_and_retry_it_after_passive_hold() {
    raise_nofile();
    let live = named_backend("live").await;
    let dead = loopback();
    let (admin, listen) = (loopback(), loopback());
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        "    passive_hold: 1s\n",
        "",
        &[("dead", dead), ("live", live)],
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    assert_eq!(
        blocking(|| health(&lb, "web", "dead")),
        "up",
        "no probes: up"
    );
    let failed_connects = || connections(&lb, "dead", "connect_failed");

    // Every client connection succeeds: a connect failure is retried on `live`.
    let mut clients = 0;
    while blocking(|| health(&lb, "web", "dead")) != "down" {
        assert!(clients < 30, "dead never went down:\n{}", lb.log());
        assert_eq!(which_backend(listen, None).await.expect("client"), "live");
        clients += 1;
    }
    assert_eq!(
        blocking(failed_connects),
        3.0,
        "down after 3 (the default fall) connect failures"
    );
    let down = blocking(|| backend_json(&lb, "web", "dead"));
    let down_at = time_of(&down["last_flip"]);

    // During passive_hold the dead backend is not tried at all.
    while SystemTime::now() < down_at + Duration::from_millis(700) {
        assert_eq!(which_backend(listen, None).await.expect("client"), "live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(blocking(|| health(&lb, "web", "dead")), "down");
    assert_eq!(blocking(failed_connects), 3.0, "tried during passive_hold");

    // After passive_hold it is tried again...
    blocking(|| wait_health(&lb, "web", "dead", "up", Duration::from_secs(5)));
    let up = blocking(|| backend_json(&lb, "web", "dead"));
    let held = time_of(&up["last_flip"])
        .duration_since(down_at)
        .expect("up after down");
    assert!(
        held >= Duration::from_millis(950) && held < Duration::from_millis(2500),
        "passive_hold 1s, held {held:?}"
    );
    assert!(lb.log().contains("passive_hold is over"));
    // ...and, still dead, fails and goes down again while clients see nothing of it.
    let mut clients = 0;
    while blocking(|| health(&lb, "web", "dead")) != "down" {
        assert!(clients < 30, "dead was not tried again:\n{}", lb.log());
        assert_eq!(which_backend(listen, None).await.expect("client"), "live");
        clients += 1;
    }
    assert_eq!(blocking(failed_connects), 6.0);
    assert_eq!(blocking(|| connections(&lb, "none", "no_backend")), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_down_connections_close_at_once() {
    let lab = lab();
    let a = Apiserver::start("a", lab.server.clone()).await;
    let b = Apiserver::start("b", lab.server.clone()).await;
    a.ready.store(false, Ordering::SeqCst);
    b.ready.store(false, Ordering::SeqCst);
    let (admin, listen) = (loopback(), loopback());
    let pool = format!(
        "    connect_timeout: 5s\n{}",
        https_check(&lab.pki, "200ms", "150ms", 2, 2)
    );
    let yaml = Raftlb::standalone_yaml(admin, listen, &pool, "", &[("a", a.addr), ("b", b.addr)]);
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    blocking(|| {
        wait_health(&lb, "web", "a", "down", WAIT);
        wait_health(&lb, "web", "b", "down", WAIT);
    });
    let before = blocking(|| connections(&lb, "none", "no_backend"));
    for _ in 0..5 {
        let started = Instant::now();
        let outcome = request(listen, &lab.client).await;
        let took = started.elapsed();
        assert!(
            outcome.is_err(),
            "served with every backend down: {outcome:?}"
        );
        assert!(
            took < Duration::from_secs(1),
            "closed after {took:?}, not at once"
        );
    }
    let after = blocking(|| connections(&lb, "none", "no_backend"));
    assert_eq!(
        after - before,
        5.0,
        "no_backend counted {before} -> {after}"
    );
    assert!(a.data_connections().is_empty() && b.data_connections().is_empty());
    assert!(
        lb.log().contains("no backend of the pool is up"),
        "{}",
        lb.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_down_close_cuts_established_connections_and_none_keeps_them() {
    for on_down in ["close", "none"] {
        let lab = lab();
        let a = Apiserver::start("a", lab.server.clone()).await;
        let (admin, listen) = (loopback(), loopback());
        let pool = format!(
            "    on_down: {on_down}\n{}",
            https_check(&lab.pki, "200ms", "150ms", 2, 2)
        );
        let yaml = Raftlb::standalone_yaml(admin, listen, &pool, "", &[("a", a.addr)]);
        let lb = blocking(|| Raftlb::start(&yaml, admin));
        blocking(|| wait_health(&lb, "web", "a", "up", WAIT));
        // A keep-alive HTTPS connection through raftlb, like a watch.
        let (mut sender, mut driver) = connect(listen, &lab.client).await.expect("connect");
        assert_eq!(get(&mut sender).await.as_deref(), Ok("a"));
        assert_eq!(
            blocking(|| backend_json(&lb, "web", "a"))["active_connections"],
            1
        );

        a.ready.store(false, Ordering::SeqCst);
        blocking(|| wait_health(&lb, "web", "a", "down", WAIT));
        if on_down == "close" {
            let ended = tokio::time::timeout(Duration::from_secs(2), &mut driver).await;
            assert!(ended.is_ok(), "on_down: close left the connection open");
            assert!(get(&mut sender).await.is_err());
            assert!(blocking(|| eventually(WAIT, || backend_json(
                &lb, "web", "a"
            )["active_connections"]
                == 0)));
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(!driver.is_finished(), "on_down: none closed the connection");
            assert_eq!(
                get(&mut sender).await.as_deref(),
                Ok("a"),
                "on_down: none: the established connection still works"
            );
            assert_eq!(
                blocking(|| backend_json(&lb, "web", "a"))["active_connections"],
                1
            );
        }
    }
}

/// kube-apiserver on shutdown: /readyz answers 500 for a while
/// (--shutdown-delay-duration) while it still serves, then its port closes. New
/// connections through raftlb during the whole sequence must all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_graceful_shutdown_costs_no_client_request() {
    let lab = lab();
    let mut servers = Vec::new();
    for name in ["m1", "m2", "m3"] {
        servers.push(Apiserver::start(name, lab.server.clone()).await);
    }
    let (admin, listen) = (loopback(), loopback());
    let backends: Vec<(&str, SocketAddr)> =
        servers.iter().map(|s| (s.name.as_str(), s.addr)).collect();
    let check = https_check(&lab.pki, "200ms", "200ms", 2, 2);
    let yaml = Raftlb::standalone_yaml(admin, listen, &check, "", &backends);
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    blocking(|| {
        for s in &servers {
            wait_health(&lb, "web", &s.name, "up", WAIT);
        }
    });

    let client = lab.client.clone();
    let stop = CancellationToken::new();
    let loop_stop = stop.clone();
    let clients = tokio::spawn(async move {
        let (mut ok, mut failed) = (0usize, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !loop_stop.is_cancelled() && ok + failed.len() < 1500 && Instant::now() < deadline {
            match request(listen, &client).await {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (ok, failed)
    });

    tokio::time::sleep(Duration::from_secs(1)).await;
    let m2 = &servers[1];
    m2.ready.store(false, Ordering::SeqCst); // shutdown begins: /readyz 500, still serving
    tokio::time::sleep(Duration::from_millis(1500)).await; // --shutdown-delay-duration
    assert_eq!(
        blocking(|| health(&lb, "web", "m2")),
        "down",
        "m2 was not taken out within the shutdown delay"
    );
    m2.set_accepting(false); // the apiserver exits: its port closes
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    let (ok, failed) = clients.await.expect("client loop");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "the client loop made only {ok} requests");

    let down_at = time_of(&blocking(|| backend_json(&lb, "web", "m2"))["last_flip"]);
    // A connection picked just before the flip may arrive a moment after it.
    let late = down_at + Duration::from_millis(100);
    let m2_conns = m2.data_connections();
    let before_down = m2_conns.iter().filter(|t| **t <= down_at).count();
    let after_down: Vec<_> = m2_conns.iter().filter(|t| **t > late).collect();
    assert!(
        before_down > 5,
        "m2 served only {before_down} before it went down"
    );
    assert!(
        after_down.is_empty(),
        "m2 got {} new connections after it went down",
        after_down.len()
    );
    for other in [&servers[0], &servers[2]] {
        let after = other
            .data_connections()
            .iter()
            .filter(|t| **t > late)
            .count();
        assert!(
            after > 5,
            "{} took only {after} after m2 went down",
            other.name
        );
    }
    assert_eq!(
        blocking(|| connections(&lb, "m2", "connect_failed")),
        0.0,
        "raftlb tried the closed port"
    );
}

/// A backend that accepts connections and never answers its probe must not delay the
/// probes of the others. The timeout is longer than the interval on purpose: probes
/// taken in turn would then reach the good backend about once per timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_backend_does_not_stall_the_probes_of_the_others() {
    let lab = lab();
    let good = Apiserver::start("good", lab.server.clone()).await;
    let slow = Apiserver::start("slow", lab.server.clone()).await;
    slow.silent.store(true, Ordering::SeqCst);
    let (admin, listen) = (loopback(), loopback());
    let check = https_check(&lab.pki, "200ms", "1s", 2, 2);
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        &check,
        "",
        &[("slow", slow.addr), ("good", good.addr)],
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    blocking(|| {
        wait_health(&lb, "web", "good", "up", WAIT);
        wait_health(&lb, "web", "slow", "down", WAIT);
    });
    let slow_detail = blocking(|| backend_json(&lb, "web", "slow"));
    assert!(
        error_of(&slow_detail).contains("no answer within"),
        "{slow_detail}"
    );
    assert!(blocking(|| checks(&lb, "web", "slow", "timeout")) >= 1.0);

    // Over 2 s the good backend is probed about 10 times; in turn it would be twice.
    let ok_before = blocking(|| checks(&lb, "web", "good", "ok"));
    let mut seen = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let d = blocking(|| backend_json(&lb, "web", "good"));
        assert_eq!(d["health"], "up", "{d}");
        let at = d["last_check"]["at"].clone();
        if seen.last() != Some(&at) {
            seen.push(at);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let probed = blocking(|| checks(&lb, "web", "good", "ok")) - ok_before;
    assert!(
        seen.len() >= 6 && probed >= 6.0,
        "the good backend's probes stalled: {probed} probes, last_check.at {seen:?}"
    );
    assert_eq!(request(listen, &lab.client).await.as_deref(), Ok("good"));
}

/// A reload that removes the pool's `health_check` counts its backends as up again,
/// the ones the probes had taken out and the ones they never passed (SPEC: without
/// probes only passive checks apply); they take traffic, with no stale last check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_health_check_brings_probed_out_backends_back() {
    let lab = lab();
    let a = Apiserver::start("a", lab.server.clone()).await;
    let b = Apiserver::start("b", lab.server.clone()).await;
    b.ready.store(false, Ordering::SeqCst);
    let (admin, listen) = (loopback(), loopback());
    let probed = https_check(&lab.pki, "200ms", "150ms", 2, 2);
    let backends = [("a", a.addr), ("b", b.addr)];
    let lb = blocking(|| {
        Raftlb::start(
            &Raftlb::standalone_yaml(admin, listen, &probed, "", &backends),
            admin,
        )
    });
    blocking(|| {
        wait_health(&lb, "web", "a", "up", WAIT);
        wait_health(&lb, "web", "b", "down", WAIT);
    });
    blocking(|| lb.rewrite_config(&Raftlb::standalone_yaml(admin, listen, "", "", &backends)));
    blocking(|| lb.signal("HUP"));
    blocking(|| wait_health(&lb, "web", "b", "up", WAIT));
    let detail = blocking(|| backend_json(&lb, "web", "b"));
    assert!(detail["last_check"].is_null(), "{detail}");
    assert_eq!(
        blocking(|| lb.metric("raftlb_backend_up{pool=\"web\",backend=\"b\"}")),
        1.0
    );
    let mut names = Vec::new();
    for _ in 0..10 {
        names.push(request(listen, &lab.client).await.expect("request"));
    }
    assert!(names.iter().any(|n| n == "b"), "{names:?}");
    assert!(
        lb.log().contains("the pool's health_check was removed"),
        "{}",
        lb.log()
    );
}

/// Config writes start a new round of probes; a backend probed before keeps its
/// pace through them (one probe an interval), instead of starting again at a random
/// point of the interval at every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_keep_their_pace_through_config_writes() {
    let lab = lab();
    let a = Apiserver::start("a", lab.server.clone()).await;
    let b = Apiserver::start("b", lab.server.clone()).await;
    let (admin, listen) = (loopback(), loopback());
    let check = https_check(&lab.pki, "1s", "500ms", 1, 1);
    let yaml = Raftlb::standalone_yaml(admin, listen, &check, "", &[("a", a.addr), ("b", b.addr)]);
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    blocking(|| wait_health(&lb, "web", "a", "up", WAIT));
    // Writes every 100 ms for 6 s; when each probe of `a` started, from its last
    // check (when it ended, less how long it took: a slow probe on a loaded machine
    // moves its end, not its start).
    let mut seen: Vec<SystemTime> = Vec::new();
    let until = Instant::now() + Duration::from_secs(6);
    let mut drain = true;
    while Instant::now() < until {
        let action = if drain { "drain" } else { "undrain" };
        let path = format!("/api/v1/pools/web/backends/b/{action}");
        let (code, body) = blocking(|| http_request(admin, "POST", &path, &[], "")).expect("drain");
        assert_eq!(code, 200, "{body}");
        drain = !drain;
        let check = blocking(|| backend_json(&lb, "web", "a"))["last_check"].clone();
        let took = Duration::from_secs_f64(check["latency_ms"].as_f64().unwrap_or(0.0) / 1000.0);
        let started = time_of(&check["at"]) - took;
        if seen.last() != Some(&started) {
            seen.push(started);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gaps: Vec<Duration> = seen
        .windows(2)
        .filter_map(|w| w[1].duration_since(w[0]).ok())
        .collect();
    assert!(gaps.len() >= 4, "probes at {seen:?}");
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(800)),
        "two probes of a 1 s interval (±10%) started closer than 0.8 s: {gaps:?}"
    );
}

/// A backend that requires a client certificate refuses a probe without one with a
/// TLS alert after the handshake; the probe's error says so, not only "connection
/// error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_refused_for_want_of_a_client_certificate_says_why() {
    let lab = lab();
    let files = lab.pki.server("apiserver", &["kubernetes"]);
    let mtls = Apiserver::start("m", lab.pki.server_config(&files, true, &[])).await;
    // The same certificate without client authentication: the probe's own TLS
    // settings are right, so only the missing client certificate can fail it.
    let open = Apiserver::start("o", lab.pki.server_config(&files, false, &[])).await;
    let (admin, listen) = (loopback(), loopback());
    let check = https_check(&lab.pki, "200ms", "150ms", 1, 1);
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        &check,
        "",
        &[("m", mtls.addr), ("o", open.addr)],
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    blocking(|| wait_health(&lb, "web", "m", "down", WAIT));
    blocking(|| wait_health(&lb, "web", "o", "up", WAIT));
    let detail = blocking(|| backend_json(&lb, "web", "m"));
    let error = error_of(&detail).to_lowercase();
    assert!(
        error.starts_with("http: ") && error.contains("alert: certificaterequired"),
        "{detail}"
    );
}
