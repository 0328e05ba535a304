//! Health checking end to end: HTTPS `/readyz` probes with rise/fall, `unknown` at
//! start, passive checks with `passive_hold`, all backends down, `on_down: close`,
//! and the kube-apiserver graceful-shutdown sequence with zero failed requests.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::Pki;
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

/// An HTTPS backend like kube-apiserver: `/readyz` answers 200 or 500 as told, any
/// other path answers the backend's name; its port can be closed.
struct Apiserver {
    name: String,
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    served: Arc<AtomicU32>,
    close_port: CancellationToken,
}

impl Apiserver {
    async fn start(name: &str, config: Arc<ServerConfig>) -> Apiserver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let ready = Arc::new(AtomicBool::new(true));
        let served = Arc::new(AtomicU32::new(0));
        let close_port = CancellationToken::new();
        let acceptor = TlsAcceptor::from(config);
        let (r, s, stop, body) = (
            ready.clone(),
            served.clone(),
            close_port.clone(),
            Bytes::from(name.to_string()),
        );
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                };
                let (acceptor, r, s, body) = (acceptor.clone(), r.clone(), s.clone(), body.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (r, s, body) = (r.clone(), s.clone(), body.clone());
                            async move {
                                let mut response = Response::new(Full::new(body));
                                if req.uri().path() == "/readyz" {
                                    if !r.load(Ordering::SeqCst) {
                                        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                                    }
                                } else {
                                    s.fetch_add(1, Ordering::SeqCst);
                                }
                                Ok::<_, Infallible>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Apiserver {
            name: name.to_string(),
            addr,
            ready,
            served,
            close_port,
        }
    }
}

/// One HTTPS request through raftlb (TLS passthrough): the backend's name.
async fn request(listen: SocketAddr, client: &Arc<ClientConfig>) -> Result<String, String> {
    let exchange = async {
        let tcp = TcpStream::connect(listen)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get("/version")
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

struct Lab {
    _dir: tempfile::TempDir,
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
        _dir: dir,
        pki,
        server,
        client,
    }
}

fn addrs() -> (SocketAddr, SocketAddr) {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    (admin, listen)
}

/// `health_check` YAML (4-space indented pool lines) with the test CA.
fn https_check(pki: &Pki, interval: &str, rise: u32, fall: u32) -> String {
    format!(
        "    health_check:\n      kind: https\n      path: /readyz\n      interval: {interval}\n      timeout: 500ms\n      rise: {rise}\n      fall: {fall}\n      tls: {{ ca: \"{}\", server_name: kubernetes }}\n",
        pki.ca.display()
    )
}

fn backend_health(lb: &Raftlb, name: &str) -> String {
    let (_, body) = http_get(lb.admin, "/api/v1/backends").expect("GET /api/v1/backends");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["pools"][0]["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["name"] == name))
        .map(|b| b["health"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

fn backend_json(lb: &Raftlb, name: &str) -> serde_json::Value {
    let (_, body) = http_get(lb.admin, "/api/v1/backends").expect("GET /api/v1/backends");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["pools"][0]["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["name"] == name).cloned())
        .unwrap_or_default()
}

/// Blocking fixture calls run off the async workers, so in-test backends keep serving.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_readyz_takes_a_backend_out_and_a_passing_one_brings_it_back() {
    let lab = lab();
    let a = Apiserver::start("a", lab.server.clone()).await;
    let b = Apiserver::start("b", lab.server.clone()).await;
    let (admin, listen) = addrs();
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        &https_check(&lab.pki, "200ms", 2, 2),
        "",
        &[("a", a.addr), ("b", b.addr)],
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    assert!(blocking(|| eventually(
        Duration::from_secs(10),
        || backend_health(&lb, "a") == "up" && backend_health(&lb, "b") == "up"
    )));

    b.ready.store(false, Ordering::SeqCst);
    assert!(
        blocking(
            || eventually(Duration::from_secs(10), || backend_health(&lb, "b")
                == "down")
        ),
        "b was not taken out:\n{}",
        lb.log()
    );
    let detail = blocking(|| backend_json(&lb, "b"));
    assert_eq!(detail["last_check"]["ok"], false, "{detail}");
    assert!(
        detail["last_check"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("500"),
        "{detail}"
    );
    assert!(detail["last_flip"].is_string(), "{detail}");
    assert_eq!(
        blocking(|| lb.metric("raftlb_backend_up{pool=\"web\",backend=\"b\"}")),
        0.0
    );
    assert!(
        blocking(
            || lb.metric("raftlb_health_checks_total{pool=\"web\",backend=\"b\",result=\"fail\"}")
        ) >= 2.0
    );
    let before = b.served.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(request(listen, &lab.client).await.as_deref(), Ok("a"));
    }
    assert_eq!(
        b.served.load(Ordering::SeqCst),
        before,
        "a backend that is down got new connections"
    );

    b.ready.store(true, Ordering::SeqCst);
    assert!(blocking(|| eventually(
        Duration::from_secs(10),
        || backend_health(&lb, "b") == "up"
    )));
    let mut names = Vec::new();
    for _ in 0..20 {
        names.push(request(listen, &lab.client).await.expect("request"));
    }
    assert!(
        names.iter().any(|n| n == "b"),
        "b gets traffic again: {names:?}"
    );
    assert!(lb.log().contains("backend is down") && lb.log().contains("backend is up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_are_unknown_and_unused_until_rise_probes_pass() {
    let lab = lab();
    let a = Apiserver::start("a", lab.server.clone()).await;
    let (admin, listen) = addrs();
    // One probe every 1.5 s, rise 2: the backend cannot be up in its first 1.5 s.
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        &https_check(&lab.pki, "1500ms", 2, 2),
        "",
        &[("a", a.addr)],
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    assert_eq!(blocking(|| backend_health(&lb, "a")), "unknown");
    assert_eq!(
        blocking(|| lb.metric("raftlb_backend_up{pool=\"web\",backend=\"a\"}")),
        0.0
    );
    let started = Instant::now();
    let early = request(listen, &lab.client).await;
    assert!(
        early.is_err(),
        "a connection before any probe passed reached the backend: {early:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the early connection was not closed at once"
    );
    assert!(
        blocking(|| eventually(Duration::from_secs(15), || backend_health(&lb, "a") == "up")),
        "{}",
        lb.log()
    );
    assert_eq!(request(listen, &lab.client).await.as_deref(), Ok("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_checks_take_a_dead_backend_out_and_retry_it_after_passive_hold() {
    raise_nofile();
    let live = named_backend("live").await;
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (admin, listen) = addrs();
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        "    passive_hold: 1s\n",
        "",
        &[("dead", dead), ("live", live)],
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    for _ in 0..6 {
        assert_eq!(
            which_backend(listen, None)
                .await
                .expect("a retry covers the dead backend"),
            "live"
        );
    }
    assert_eq!(
        blocking(|| backend_health(&lb, "dead")),
        "down",
        "3 connect failures mark it down:\n{}",
        lb.log()
    );
    let failures = blocking(|| {
        lb.metric("raftlb_connections_total{listener=\"front\",pool=\"web\",backend=\"dead\",result=\"connect_failed\"}")
    });
    assert_eq!(failures, 3.0, "after going down it is not tried any more");
    assert!(
        blocking(
            || eventually(Duration::from_secs(5), || backend_health(&lb, "dead")
                == "up")
        ),
        "passive_hold did not bring it back"
    );
    assert!(lb.log().contains("passive_hold is over"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_down_connections_close_at_once() {
    let lab = lab();
    let a = Apiserver::start("a", lab.server.clone()).await;
    a.ready.store(false, Ordering::SeqCst);
    let (admin, listen) = addrs();
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        &https_check(&lab.pki, "200ms", 2, 2),
        "",
        &[("a", a.addr)],
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    assert!(blocking(|| eventually(
        Duration::from_secs(10),
        || backend_health(&lb, "a") == "down"
    )));
    for _ in 0..5 {
        let started = Instant::now();
        assert!(request(listen, &lab.client).await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "closed after {:?}, not at once",
            started.elapsed()
        );
    }
    let none = blocking(|| {
        lb.metric("raftlb_connections_total{listener=\"front\",pool=\"web\",backend=\"none\",result=\"no_backend\"}")
    });
    assert!(none >= 5.0, "no_backend counted {none}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_down_close_cuts_established_connections_and_none_keeps_them() {
    for (on_down, cut) in [("close", true), ("none", false)] {
        let lab = lab();
        let a = Apiserver::start("a", lab.server.clone()).await;
        let (admin, listen) = addrs();
        let pool = format!(
            "    on_down: {on_down}\n{}",
            https_check(&lab.pki, "200ms", 1, 2)
        );
        let yaml = Raftlb::standalone_yaml(admin, listen, &pool, "", &[("a", a.addr)]);
        let lb = blocking(|| Raftlb::start(&yaml, admin));
        assert!(blocking(|| eventually(
            Duration::from_secs(10),
            || backend_health(&lb, "a") == "up"
        )));
        // A keep-alive HTTPS connection through raftlb.
        let tcp = TcpStream::connect(listen).await.expect("connect");
        let tls = TlsConnector::from(lab.client.clone())
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http");
        tokio::spawn(conn);
        let get = || {
            Request::get("/version")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .expect("request")
        };
        assert!(sender.send_request(get()).await.is_ok());

        a.ready.store(false, Ordering::SeqCst);
        assert!(blocking(|| eventually(
            Duration::from_secs(10),
            || backend_health(&lb, "a") == "down"
        )));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = tokio::time::timeout(Duration::from_secs(5), sender.send_request(get())).await;
        match (cut, after) {
            (true, Ok(Ok(r))) => panic!(
                "on_down: close left the connection open (status {})",
                r.status()
            ),
            (false, Ok(Err(e))) => panic!("on_down: none cut the connection: {e}"),
            (_, Err(_)) => panic!("request hung"),
            _ => {}
        }
    }
}

/// kube-apiserver on shutdown: /readyz answers 500 for a while (shutdown-delay-duration)
/// while it still serves, then the port closes. New connections through raftlb
/// during the whole sequence must all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_graceful_shutdown_costs_no_client_request() {
    let lab = lab();
    let mut servers = Vec::new();
    for name in ["m1", "m2", "m3"] {
        servers.push(Apiserver::start(name, lab.server.clone()).await);
    }
    let (admin, listen) = addrs();
    let backends: Vec<(&str, SocketAddr)> =
        servers.iter().map(|s| (s.name.as_str(), s.addr)).collect();
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        &https_check(&lab.pki, "200ms", 2, 2),
        "",
        &backends,
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    assert!(blocking(|| eventually(Duration::from_secs(10), || [
        "m1", "m2", "m3"
    ]
    .iter()
    .all(|n| backend_health(&lb, n) == "up"))));

    let client = lab.client.clone();
    let stop = CancellationToken::new();
    let loop_stop = stop.clone();
    let clients = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        // Bounded: at most 1500 connections and 30 s.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !loop_stop.is_cancelled()
            && ok + (failed.len() as u32) < 1500
            && Instant::now() < deadline
        {
            match request(listen, &client).await {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (ok, failed)
    });

    tokio::time::sleep(Duration::from_millis(500)).await;
    let m2 = &servers[1];
    m2.ready.store(false, Ordering::SeqCst); // shutdown begins: /readyz 500, still serving
    tokio::time::sleep(Duration::from_millis(1500)).await; // --shutdown-delay-duration
    assert_eq!(
        blocking(|| backend_health(&lb, "m2")),
        "down",
        "m2 was not taken out within the delay"
    );
    let served_when_down = m2.served.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await; // still serving, but down
    assert_eq!(
        m2.served.load(Ordering::SeqCst),
        served_when_down,
        "m2 got new requests after it was taken out"
    );
    m2.close_port.cancel(); // the apiserver stops accepting
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    let (ok, failed) = clients.await.expect("client loop");
    assert!(ok > 50, "the client loop made only {ok} requests");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// A backend that accepts TCP and never answers must not delay the probes of others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_backend_does_not_stall_the_probes_of_the_others() {
    let lab = lab();
    let good = Apiserver::start("good", lab.server.clone()).await;
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            keep.lock().await.push(s); // accepted, never answered
        }
    });
    let (admin, listen) = addrs();
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        &https_check(&lab.pki, "200ms", 2, 2),
        "",
        &[("good", good.addr), ("silent", silent_addr)],
    );
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    assert!(blocking(|| eventually(
        Duration::from_secs(10),
        || backend_health(&lb, "good") == "up"
    )));
    assert!(blocking(|| eventually(
        Duration::from_secs(10),
        || backend_health(&lb, "silent") == "down"
    )));
    let silent_detail = blocking(|| backend_json(&lb, "silent"));
    assert!(
        silent_detail["last_check"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no answer"),
        "{silent_detail}"
    );
    // The good backend keeps being probed every ~200 ms while the silent one times out.
    let first = blocking(|| backend_json(&lb, "good"))["last_check"]["at"].clone();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = blocking(|| backend_json(&lb, "good"));
    assert_ne!(
        later["last_check"]["at"], first,
        "the good backend's probes stalled"
    );
    assert_eq!(later["health"], "up");
    assert_eq!(request(listen, &lab.client).await.as_deref(), Ok("good"));
}
