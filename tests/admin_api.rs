//! The admin HTTP API (SPEC.md "Admin HTTP API", "Metrics"): endpoints, JSON shapes,
//! ETag, token auth, and a `/metrics` text that `promtool check metrics` accepts.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

fn start(yaml: &str, admin: SocketAddr) -> Raftlb {
    blocking(|| Raftlb::start(yaml, admin))
}

fn get(lb: &Raftlb, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    blocking(|| http_response(lb.admin, "GET", path, headers, ""))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn json(response: &HttpResponse, what: &str) -> Value {
    serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {:?}", response.body))
}

fn keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// Asserts `v` is an object holding at least `required` (fields may be added, never renamed).
fn assert_has_keys(v: &Value, required: &[&str], what: &str) {
    let present = keys(v);
    for key in required {
        assert!(
            present.contains(key),
            "{what}: no {key:?} in {present:?}: {v}"
        );
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// A connection through `listen` to an echo backend, proven by one round trip.
async fn echoing_connection(listen: SocketAddr) -> TcpStream {
    let mut s = connect(listen).await;
    s.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("no echo within 5 s")
        .expect("read echo");
    assert_eq!(&back, b"ping");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_unknown_paths_and_methods() {
    raise_nofile();
    let backend = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let lb = start(
        &Raftlb::standalone_yaml(admin, listen, "", "", &[("echo", backend)]),
        admin,
    );

    assert_eq!(get(&lb, "/healthz", &[]).status, 200);
    assert_eq!(get(&lb, "/readyz", &[]).status, 200);

    let missing = get(&lb, "/no/such/endpoint", &[]);
    assert_eq!(missing.status, 404, "{missing:?}");
    let body = json(&missing, "404 body");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "404 body is not {{\"error\": \"...\"}}: {body}"
    );

    let post = blocking(|| http_response(admin, "POST", "/api/v1/status", &[], "{}"))
        .expect("POST /api/v1/status");
    assert_eq!(post.status, 405, "{post:?}");
    assert!(
        json(&post, "405 body")["error"].is_string(),
        "405 body: {}",
        post.body
    );
    assert_eq!(post.header("allow"), Some("GET, HEAD, OPTIONS"), "{post:?}");
}

/// One raw HTTP/1.1 exchange with `Connection: close`: everything the server sent.
fn raw(addr: SocketAddr, method: &str, path: &str) -> String {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut got = String::new();
    s.read_to_string(&mut got).expect("read");
    got
}

/// HEAD is GET without the body, everywhere GET is (RFC 9110; a front LB or a
/// monitor may probe `/readyz` with it), and OPTIONS (HAProxy's bare `option
/// httpchk`) lists the methods with 204, as every 405 does in `Allow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_options_answer_wherever_get_does() {
    raise_nofile();
    let backend = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let _lb = start(
        &Raftlb::standalone_yaml(admin, listen, "", "", &[("echo", backend)]),
        admin,
    );
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/status",
        "/api/v1/backends",
        "/",
    ] {
        let got = blocking(move || raw(admin, "HEAD", path));
        let (head, body) = got.split_once("\r\n\r\n").expect("a response head");
        assert!(head.starts_with("HTTP/1.1 200"), "HEAD {path}: {head}");
        assert_eq!(body, "", "HEAD {path} sent a body");
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("HEAD {path}: no content-length: {head}"));
        assert_ne!(length, "0", "HEAD {path} announces an empty GET");

        let options = blocking(move || raw(admin, "OPTIONS", path));
        assert!(
            options.starts_with("HTTP/1.1 204"),
            "OPTIONS {path}: {options}"
        );
        assert!(
            options
                .to_ascii_lowercase()
                .contains("\r\nallow: get, head, options\r\n"),
            "OPTIONS {path}: {options}"
        );
    }
    let options = blocking(move || raw(admin, "OPTIONS", "/api/v1/pools/echo/backends/echo/drain"));
    assert!(
        options
            .to_ascii_lowercase()
            .contains("\r\nallow: post, options\r\n"),
        "{options}"
    );
    let missing = blocking(move || raw(admin, "OPTIONS", "/no/such/endpoint"));
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_has_the_documented_shape_and_an_etag() {
    raise_nofile();
    let backend = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let yaml = format!(
        "node:\n  name: lb-test-7\n{}",
        Raftlb::standalone_yaml(admin, listen, "", "", &[("echo", backend)])
    );
    let lb = start(&yaml, admin);

    let response = get(&lb, "/api/v1/status", &[]);
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "content-type: {:?}",
        response.header("content-type")
    );
    let status = json(&response, "/api/v1/status");
    assert_has_keys(
        &status,
        &["node", "role", "config_version", "cluster", "lease"],
        "status",
    );
    assert_has_keys(&status["node"], &["name", "id", "version"], "status.node");
    assert_eq!(status["node"]["name"], "lb-test-7");
    assert!(
        status["node"]["id"].is_null() || status["node"]["id"].is_u64(),
        "node.id: {}",
        status["node"]["id"]
    );
    assert_eq!(status["node"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["role"], "active");
    let version = status["config_version"]
        .as_u64()
        .unwrap_or_else(|| panic!("config_version is not a number: {status}"));
    assert!(version >= 1, "config_version {version}");
    assert!(
        status["cluster"].is_null(),
        "cluster must be null standalone: {status}"
    );
    assert!(
        status["lease"].is_null(),
        "lease must be null standalone: {status}"
    );
    assert_eq!(
        response.header("etag"),
        Some(format!("\"{version}\"").as_str()),
        "ETag of /api/v1/status"
    );

    let backends = get(&lb, "/api/v1/backends", &[]);
    assert_eq!(backends.status, 200);
    assert_eq!(
        backends.header("etag"),
        Some(format!("\"{version}\"").as_str()),
        "ETag of /api/v1/backends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_has_the_documented_shape_and_counts_connections() {
    raise_nofile();
    let a = echo_backend().await;
    let b = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let yaml = format!(
        "admin:\n  bind: {admin}\nlisteners:\n  front:\n    bind: {listen}\n    pool: web\n\
         pools:\n  web:\n    balance: least_connections\n    backends:\n\
         \x20     - {{ name: a, address: \"{a}\", weight: 3 }}\n\
         \x20     - {{ name: b, address: \"{b}\", drained: true }}\n"
    );
    let lb = start(&yaml, admin);

    let held = [
        echoing_connection(listen).await,
        echoing_connection(listen).await,
    ];
    let response = get(&lb, "/api/v1/backends", &[]);
    assert_eq!(response.status, 200, "{response:?}");
    let body = json(&response, "/api/v1/backends");
    assert_has_keys(&body, &["config_version", "pools"], "backends");
    assert!(body["config_version"].is_u64(), "{body}");
    let pools = body["pools"].as_array().expect("pools is an array");
    assert_eq!(pools.len(), 1, "{body}");
    let pool = &pools[0];
    assert_has_keys(pool, &["name", "balance", "backends"], "pool");
    assert_eq!(pool["name"], "web");
    assert_eq!(pool["balance"], "least_connections");
    let list = pool["backends"].as_array().expect("backends is an array");
    assert_eq!(list.len(), 2, "{pool}");
    let required = [
        "name",
        "address",
        "weight",
        "health",
        "drained",
        "active_connections",
    ];
    for backend in list {
        assert_has_keys(backend, &required, "backend");
        assert_eq!(
            backend["health"], "up",
            "no probes: the backend counts as up"
        );
    }
    let (ba, bb) = (&list[0], &list[1]);
    assert_eq!(ba["name"], "a");
    assert_eq!(ba["address"], a.to_string());
    assert_eq!(ba["weight"], 3);
    assert_eq!(ba["drained"], false);
    assert_eq!(
        ba["active_connections"], 2,
        "two connections held open to a: {ba}"
    );
    assert_eq!(bb["name"], "b");
    assert_eq!(bb["address"], b.to_string());
    assert_eq!(bb["weight"], 1, "weight defaults to 1");
    assert_eq!(bb["drained"], true);
    assert_eq!(bb["active_connections"], 0, "b is drained: {bb}");

    drop(held);
    let released = blocking(|| {
        eventually(Duration::from_secs(10), || {
            http_get(admin, "/api/v1/backends")
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .is_some_and(|v| v["pools"][0]["backends"][0]["active_connections"] == 0)
        })
    });
    assert!(
        released,
        "active_connections did not return to 0 after the clients closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_the_api_but_not_health_or_metrics() {
    raise_nofile();
    const TOKEN: &str = "s3cret-T0ken";
    let backend = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let secrets = tempfile::tempdir().expect("tempdir");
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
    let yaml = Raftlb::standalone_yaml(admin, listen, "", "", &[("echo", backend)]).replacen(
        "admin:\n",
        &format!("admin:\n  token_file: {}\n", token_file.display()),
        1,
    );
    let lb = start(&yaml, admin);

    let bearer = format!("Bearer {TOKEN}");
    let basic = |user_password: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    };
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("/api/v1/status", None, 401),
        ("/api/v1/backends", None, 401),
        ("/api/v1/status", Some(bearer.clone()), 200),
        ("/api/v1/backends", Some(bearer), 200),
        ("/api/v1/status", Some("Bearer wrong".into()), 401),
        ("/api/v1/status", Some(format!("Bearer {TOKEN}x")), 401),
        ("/api/v1/status", Some(basic(&format!("x:{TOKEN}"))), 200),
        ("/api/v1/status", Some(basic("x:wrong")), 401),
        ("/api/v1/status", Some(basic(TOKEN)), 401),
        ("/api/v1/status", Some(TOKEN.to_string()), 401),
        ("/metrics", None, 200),
        ("/healthz", None, 200),
        ("/readyz", None, 200),
    ];
    for (path, authorization, want) in cases {
        let headers: Vec<(&str, &str)> = authorization
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let response = get(&lb, path, &headers);
        assert_eq!(
            response.status, want,
            "GET {path} with Authorization {authorization:?}: {response:?}"
        );
        if want == 401 {
            assert!(
                json(&response, "401 body")["error"].is_string(),
                "401 body: {}",
                response.body
            );
        }
    }
    let status = json(
        &get(
            &lb,
            "/api/v1/status",
            &[("Authorization", &format!("Bearer {TOKEN}"))],
        ),
        "status",
    );
    assert_eq!(status["role"], "active");
}

/// Every data-path metric (SPEC.md "Metrics") that traffic below brings into being.
const DATA_PATH_METRICS: &[&str] = &[
    "raftlb_connections_total",
    "raftlb_active_connections",
    "raftlb_bytes_total",
    "raftlb_connect_duration_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_after_traffic_of_every_kind() {
    raise_nofile();
    let good = echo_backend().await;
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (admin, front, limited, empty) = (loopback(), loopback(), loopback(), loopback());
    // front: round robin over a dead and a live backend (connect_failed, then ok);
    // limited: max_connections 1 (rejected); empty: every backend drained (no_backend).
    // `probed` brings the health-check series into being too.
    let yaml = format!(
        "admin:\n  bind: {admin}\nlisteners:\n\
         \x20 front:\n    bind: {front}\n    pool: web\n\
         \x20 limited:\n    bind: {limited}\n    pool: probed\n    max_connections: 1\n\
         \x20 empty:\n    bind: {empty}\n    pool: drained\n\
         pools:\n\
         \x20 web:\n    balance: round_robin\n    retries: 1\n    passive_hold: 1h\n    backends:\n\
         \x20     - {{ name: dead, address: \"{dead}\" }}\n\
         \x20     - {{ name: good, address: \"{good}\" }}\n\
         \x20 probed:\n    health_check: {{ kind: tcp, interval: 100ms, timeout: 1s, rise: 1, fall: 1 }}\n    backends:\n\
         \x20     - {{ name: good, address: \"{good}\" }}\n\
         \x20 drained:\n    backends:\n\
         \x20     - {{ name: parked, address: \"{good}\", drained: true }}\n"
    );
    let lb = start(&yaml, admin);

    // ok and connect_failed: round robin tries the dead backend for one of two clients.
    for _ in 0..2 {
        drop(echoing_connection(front).await);
    }
    // rejected: a second connection while the only slot is held.
    let probed_up = blocking(|| {
        eventually(Duration::from_secs(10), || {
            lb.metrics().lines().any(|l| {
                l.starts_with("raftlb_backend_up{")
                    && l.contains("pool=\"probed\"")
                    && l.ends_with(" 1")
            })
        })
    });
    assert!(probed_up, "pool probed never came up:\n{}", lb.metrics());
    let held = echoing_connection(limited).await;
    let mut extra = connect(limited).await;
    let mut byte = [0u8; 1];
    let closed = timeout(Duration::from_secs(5), extra.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the connection over max_connections was not closed: {closed:?}"
    );
    // no_backend: the only backend is drained.
    let mut none = connect(empty).await;
    let closed = timeout(Duration::from_secs(5), none.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a pool with no backend left the connection open: {closed:?}"
    );

    // A reload of the same file brings config_reloads_total into being.
    blocking(|| lb.signal("HUP"));

    let mut text = String::new();
    let all_there = blocking(|| {
        eventually(Duration::from_secs(10), || {
            text = lb.metrics();
            text.contains("raftlb_config_reloads_total{result=\"ok\"} 1")
                && ["ok", "connect_failed", "no_backend", "rejected"]
                    .iter()
                    .all(|r| text.contains(&format!("result=\"{r}\"")))
        })
    });
    assert!(all_there, "connections_total lacks some results:\n{text}");
    for name in DATA_PATH_METRICS {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} "))),
            "no HELP line for {name}:\n{text}"
        );
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "no series of {name}:\n{text}"
        );
    }
    for series in [
        "raftlb_bytes_total{",
        "raftlb_connect_duration_seconds_bucket{",
        "raftlb_connect_duration_seconds_count{",
        "raftlb_health_checks_total{",
        "raftlb_backend_up{",
    ] {
        assert!(text.contains(series), "no {series}...}} series:\n{text}");
    }
    for direction in ["to_backend", "to_client"] {
        assert!(
            text.contains(&format!("direction=\"{direction}\"")),
            "no bytes_total direction {direction}:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("raftlb_active_connections{")
                && l.contains("pool=\"probed\"")
                && l.ends_with(" 1")),
        "active_connections does not show the held connection:\n{text}"
    );
    drop(held);

    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut promtool = promtool.unwrap_or_else(|e| {
        panic!("cannot run promtool ({e}): install it (Debian/Ubuntu: apt-get install prometheus)")
    });
    promtool
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(lb: &Raftlb, method: &str, path: &str, body: &str) -> HttpResponse {
    blocking(|| {
        http_response(
            lb.admin,
            method,
            path,
            &[("content-type", "application/json")],
            body,
        )
    })
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Standalone runtime API: drain, undrain and weight change the running config until
/// the next reload; adding or removing backends is refused (the file is the truth).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_drain_undrain_and_weight_are_runtime_state_until_reload() {
    raise_nofile();
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let (admin, listen) = (loopback(), loopback());
    let yaml = Raftlb::standalone_yaml(admin, listen, "", "", &[("a", a), ("b", b)]);
    let lb = start(&yaml, admin);
    let version = |lb: &Raftlb| {
        json(&get(lb, "/api/v1/backends", &[]), "backends")["config_version"]
            .as_u64()
            .expect("version")
    };
    let v0 = version(&lb);

    let r = write(&lb, "POST", "/api/v1/pools/web/backends/b/drain", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let drained = json(&r, "drain reply");
    assert_eq!(
        (drained["name"].as_str(), drained["drained"].as_bool()),
        (Some("b"), Some(true)),
        "{drained}"
    );
    assert_eq!(r.header("etag"), Some(format!("\"{}\"", v0 + 1).as_str()));
    // Draining a drained backend changes nothing: the version stays.
    let again = write(&lb, "POST", "/api/v1/pools/web/backends/b/drain", "");
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(version(&lb), v0 + 1, "a no-op drain bumped the version");
    for _ in 0..10 {
        assert_eq!(
            which_backend(listen, None).await.expect("request"),
            "a",
            "a drained backend got a new connection"
        );
    }
    assert_eq!(
        blocking(|| lb.metric("raftlb_backend_drained{pool=\"web\",backend=\"b\"}")),
        1.0
    );

    assert_eq!(
        write(&lb, "POST", "/api/v1/pools/web/backends/b/undrain", "").status,
        200
    );
    let mut seen_b = false;
    for _ in 0..10 {
        seen_b |= which_backend(listen, None).await.expect("request") == "b";
    }
    assert!(seen_b, "an undrained backend gets traffic again");

    let r = write(
        &lb,
        "PATCH",
        "/api/v1/pools/web/backends/a",
        r#"{"weight": 3}"#,
    );
    assert_eq!(
        (r.status, json(&r, "patch")["weight"].as_u64()),
        (200, Some(3)),
        "{}",
        r.body
    );
    assert_eq!(version(&lb), v0 + 3);

    // If-Match: a stale version is 412 with the current one, and changes nothing;
    // the current one or `*` is taken; one that is not a version is 400.
    let with_if = |tag: &str, weight: u32| {
        blocking(|| {
            http_response(
                lb.admin,
                "PATCH",
                "/api/v1/pools/web/backends/a",
                &[("content-type", "application/json"), ("if-match", tag)],
                &format!(r#"{{"weight": {weight}}}"#),
            )
        })
        .expect("PATCH")
    };
    let now = v0 + 3;
    let stale = with_if(&format!("\"{v0}\""), 4);
    assert_eq!(stale.status, 412, "{}", stale.body);
    assert_eq!(stale.header("etag"), Some(format!("\"{now}\"").as_str()));
    assert_eq!(version(&lb), now, "a stale If-Match changed the config");
    assert_eq!(with_if("garbage", 4).status, 400);
    assert_eq!(version(&lb), now);
    let current = with_if(&format!("\"{now}\""), 4);
    assert_eq!(current.status, 200, "{}", current.body);
    assert_eq!(with_if("*", 3).status, 200);
    assert_eq!(version(&lb), now + 2);

    // Bad input: a 4xx with {"error": ...}, and nothing changes.
    for (method, path, body, status) in [
        (
            "PATCH",
            "/api/v1/pools/web/backends/a",
            r#"{"weight": 0}"#,
            400,
        ),
        (
            "PATCH",
            "/api/v1/pools/web/backends/a",
            r#"{"weight": "heavy"}"#,
            400,
        ),
        (
            "PATCH",
            "/api/v1/pools/web/backends/a",
            r#"{"wieght": 2}"#,
            400,
        ),
        ("PATCH", "/api/v1/pools/web/backends/a", "not json", 400),
        // serde would take a list for the struct, and keep a key's last value.
        ("PATCH", "/api/v1/pools/web/backends/a", "[2]", 400),
        (
            "PATCH",
            "/api/v1/pools/web/backends/a",
            r#"{"weight": 3, "weight": 2}"#,
            400,
        ),
        ("POST", "/api/v1/pools/web/backends/b/drain", "{{{", 400),
        (
            "POST",
            "/api/v1/pools/web/backends/b/drain",
            r#"{"foo": 1}"#,
            400,
        ),
        ("POST", "/api/v1/pools/nosuch/backends/a/drain", "", 404),
        ("POST", "/api/v1/pools/web/backends/nosuch/drain", "", 404),
        (
            "POST",
            "/api/v1/pools/web/backends",
            r#"{"name": "c", "address": "127.0.0.1:1"}"#,
            409,
        ),
        ("DELETE", "/api/v1/pools/web/backends/a", "", 409),
        ("PUT", "/api/v1/pools/web/backends/a", "", 405),
    ] {
        let r = write(&lb, method, path, body);
        assert_eq!(r.status, status, "{method} {path} {body}: {}", r.body);
        assert!(json(&r, "error reply")["error"].is_string(), "{}", r.body);
    }
    assert!(
        write(&lb, "DELETE", "/api/v1/pools/web/backends/a", "")
            .body
            .contains("standalone: edit the file and send SIGHUP")
    );
    assert_eq!(version(&lb), v0 + 5, "a refused write changed the config");

    // The file is the source of truth: a reload drops the runtime changes.
    assert_eq!(
        write(&lb, "POST", "/api/v1/pools/web/backends/b/drain", "").status,
        200
    );
    lb.signal("HUP");
    assert!(blocking(|| eventually(
        Duration::from_secs(10),
        || version(&lb) == v0 + 7
    )));
    let after = json(&get(&lb, "/api/v1/backends", &[]), "backends");
    let backends = after["pools"][0]["backends"]
        .as_array()
        .expect("backends")
        .clone();
    assert!(
        backends
            .iter()
            .all(|b| b["drained"] == false && b["weight"] == 1),
        "{after}"
    );
    // The same file again: reloaded (certificates are read again), same version.
    lb.signal("HUP");
    assert!(blocking(|| eventually(Duration::from_secs(10), || lb
        .log()
        .matches("reloaded the config")
        .count()
        == 2)));
    assert_eq!(version(&lb), v0 + 7, "an identical file bumped the version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_https_with_ctl_cacert() {
    raise_nofile();
    let backend = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let secrets = tempfile::tempdir().expect("tempdir");
    let pki = common::pki::Pki::new(secrets.path(), "admin");
    let cert = pki.server("admin", &[]);
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "tls-token\n").expect("write token");
    let yaml = Raftlb::standalone_yaml(admin, listen, "", "", &[("echo", backend)]).replacen(
        "admin:\n",
        &format!(
            "admin:\n  token_file: {}\n  tls: {{ cert: {}, key: {} }}\n",
            token_file.display(),
            cert.cert.display(),
            cert.key.display()
        ),
        1,
    );
    let mut lb = Raftlb::spawn(&yaml, admin);
    let server = format!("https://127.0.0.1:{}", admin.port());
    let ca = pki.ca.to_string_lossy().to_string();
    let token = token_file.to_string_lossy().to_string();
    let ctl = |extra: &[&str]| {
        let mut args = vec!["ctl", "--server", &server, "--token-file", &token];
        args.extend_from_slice(extra);
        raftlb_cmd(&args)
    };
    let ok = blocking(|| {
        eventually(Duration::from_secs(20), || {
            ctl(&["--cacert", &ca, "-o", "json", "status"]).0 == 0
        })
    });
    assert!(ok, "ctl status over https never worked:\n{}", lb.log());
    let (code, out, err) = blocking(|| ctl(&["--cacert", &ca, "backend", "drain", "web", "echo"]));
    assert_eq!(code, 0, "a write over https: {out}{err}");
    assert!(out.contains("drained true"), "{out}");

    // Without the CA the server is not trusted; plain HTTP gets no answer.
    let (code, _, err) = blocking(|| ctl(&["status"]));
    assert_eq!(code, 1, "an unknown CA must fail");
    assert!(
        err.contains("does not trust") && err.contains("--cacert"),
        "{err}"
    );
    assert!(
        !matches!(http_get(admin, "/healthz"), Ok((200, _))),
        "plain HTTP on the HTTPS port must not be answered"
    );
    // ctl with http:// at the HTTPS port says what to try.
    let plain = format!("http://127.0.0.1:{}", admin.port());
    let (code, _, err) = blocking(|| raftlb_cmd(&["ctl", "--server", &plain, "status"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("did not answer HTTP") && err.contains("https://"),
        "{err}"
    );

    // A renewed certificate (here from another CA) is served without a restart.
    let renewed = tempfile::tempdir().expect("tempdir");
    let other = common::pki::Pki::new(renewed.path(), "renewed");
    let fresh = other.server("admin", &[]);
    std::fs::copy(&fresh.key, &cert.key).expect("key");
    std::fs::copy(&fresh.cert, &cert.cert).expect("cert");
    let other_ca = other.ca.to_string_lossy().to_string();
    let ok = blocking(|| {
        eventually(Duration::from_secs(20), || {
            ctl(&["--cacert", &other_ca, "-o", "json", "status"]).0 == 0
        })
    });
    assert!(
        ok,
        "the renewed admin certificate is not served:\n{}",
        lb.log()
    );
    let (code, _, _) = blocking(|| ctl(&["--cacert", &ca, "status"]));
    assert_eq!(
        code, 1,
        "the old CA must no longer verify the new certificate"
    );
    assert!(
        lb.child.try_wait().expect("try_wait").is_none(),
        "{}",
        lb.log()
    );
}

/// Cross-site request forgery: a web page in the operator's browser must not be able
/// to change anything, with or without `admin.token_file`.
mod csrf {
    use super::*;

    const TOKEN: &str = "csrf-T0ken";
    const DRAIN: &str = "/api/v1/pools/web/backends/b/drain";

    /// A standalone raftlb over backends a and b, with `token` in `admin.token_file`.
    async fn start_with_token(token: Option<&str>) -> (Raftlb, tempfile::TempDir) {
        let a = echo_backend().await;
        let b = echo_backend().await;
        let (admin, listen) = (loopback(), loopback());
        let secrets = tempfile::tempdir().expect("tempdir");
        let mut yaml = Raftlb::standalone_yaml(admin, listen, "", "", &[("a", a), ("b", b)]);
        if let Some(token) = token {
            let token_file = secrets.path().join("token");
            std::fs::write(&token_file, format!("{token}\n")).expect("write token");
            yaml = yaml.replacen(
                "admin:\n",
                &format!("admin:\n  token_file: {}\n", token_file.display()),
                1,
            );
        }
        (start(&yaml, admin), secrets)
    }

    fn bearer() -> String {
        format!("Bearer {TOKEN}")
    }

    fn basic() -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("operator:{TOKEN}"))
        )
    }

    fn request(
        lb: &Raftlb,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpResponse {
        blocking(|| http_response(lb.admin, method, path, headers, body))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// (config_version, backend a's weight, whether b is drained), read with the bearer token.
    fn state(lb: &Raftlb) -> (u64, u64, bool) {
        let auth = bearer();
        let r = get(lb, "/api/v1/backends", &[("Authorization", &auth)]);
        assert_eq!(r.status, 200, "{r:?}");
        let v = json(&r, "backends");
        let backend = |name: &str| {
            v["pools"][0]["backends"]
                .as_array()
                .and_then(|list| list.iter().find(|b| b["name"] == name))
                .cloned()
                .unwrap_or_else(|| panic!("no backend {name}: {v}"))
        };
        (
            v["config_version"].as_u64().expect("config_version"),
            backend("a")["weight"].as_u64().expect("weight"),
            backend("b")["drained"].as_bool().expect("drained"),
        )
    }

    /// Asserts a refusal: `status`, and an `{"error": ...}` that mentions `names`.
    fn assert_refused(r: &HttpResponse, status: u16, names: &str, what: &str) {
        assert_eq!(r.status, status, "{what}: {r:?}");
        let error = json(r, what)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.contains(names),
            "{what}: the error does not name {names:?}: {error:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn basic_auth_reads_but_a_write_needs_the_bearer_token() {
        raise_nofile();
        let (lb, _secrets) = start_with_token(Some(TOKEN)).await;
        let before = state(&lb);
        assert!(!before.2, "b starts undrained");

        // The status page login: the token as the basic-auth password still reads.
        let basic = basic();
        let read = get(&lb, "/api/v1/status", &[("Authorization", &basic)]);
        assert_eq!(read.status, 200, "GET with basic auth: {read:?}");

        // What a browser resends by itself on a cross-site form post: refused.
        let r = request(&lb, "POST", DRAIN, &[("Authorization", &basic)], "");
        assert_refused(&r, 401, "Bearer", "POST drain with basic auth");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|c| c.starts_with("Bearer")),
            "a refused write must not ask the browser for a login: {r:?}"
        );
        let r = request(
            &lb,
            "PATCH",
            "/api/v1/pools/web/backends/a",
            &[
                ("Authorization", &basic),
                ("content-type", "application/json"),
            ],
            r#"{"weight": 3}"#,
        );
        assert_refused(&r, 401, "Bearer", "PATCH weight with basic auth");
        assert_eq!(state(&lb), before, "a refused write changed the config");

        let bearer = bearer();
        let r = request(&lb, "POST", DRAIN, &[("Authorization", &bearer)], "");
        assert_eq!(r.status, 200, "POST drain with the bearer token: {r:?}");
        assert_eq!(state(&lb), (before.0 + 1, before.1, true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cross_site_writes_and_form_bodies_are_refused_even_with_the_token() {
        raise_nofile();
        let (lb, _secrets) = start_with_token(Some(TOKEN)).await;
        let before = state(&lb);
        let bearer = bearer();
        let auth = ("Authorization", bearer.as_str());
        let weight = "/api/v1/pools/web/backends/a";
        let form = "application/x-www-form-urlencoded";
        for (method, path, headers, body, status, names) in [
            (
                "POST",
                DRAIN,
                vec![auth, ("Origin", "http://evil.example")],
                "",
                403,
                "Origin",
            ),
            (
                "POST",
                DRAIN,
                vec![auth, ("Origin", "null")],
                "",
                403,
                "Origin",
            ),
            (
                "POST",
                DRAIN,
                vec![auth, ("Sec-Fetch-Site", "cross-site")],
                "",
                403,
                "Sec-Fetch-Site",
            ),
            (
                "POST",
                DRAIN,
                vec![auth, ("Sec-Fetch-Site", "same-site")],
                "",
                403,
                "Sec-Fetch-Site",
            ),
            (
                "POST",
                DRAIN,
                vec![auth, ("content-type", form)],
                "x=1",
                415,
                "JSON",
            ),
            (
                "POST",
                DRAIN,
                vec![auth, ("content-type", "multipart/form-data; boundary=x")],
                "--x--\r\n",
                415,
                "JSON",
            ),
            (
                "PATCH",
                weight,
                vec![auth, ("content-type", "text/plain;charset=UTF-8")],
                r#"{"weight": 3}"#,
                415,
                "JSON",
            ),
        ] {
            let r = request(&lb, method, path, &headers, body);
            assert_refused(&r, status, names, &format!("{method} {path} {headers:?}"));
        }
        assert_eq!(state(&lb), before, "a refused write changed the config");

        // A same-origin write (what a page served by this server would send) passes.
        let origin = format!("http://{}", lb.admin);
        let r = request(
            &lb,
            "PATCH",
            weight,
            &[
                auth,
                ("Origin", &origin),
                ("Sec-Fetch-Site", "same-origin"),
                ("content-type", "application/json"),
            ],
            r#"{"weight": 3}"#,
        );
        assert_eq!(r.status, 200, "a same-origin JSON write: {r:?}");
        assert_eq!(state(&lb), (before.0 + 1, 3, false));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_token_cross_site_form_posts_are_still_refused() {
        raise_nofile();
        let (lb, _secrets) = start_with_token(None).await;
        let before = state(&lb);
        let form = ("content-type", "application/x-www-form-urlencoded");
        // What <form method=POST action="http://127.0.0.1:9090/..."> sends from a web page.
        let r = request(
            &lb,
            "POST",
            DRAIN,
            &[
                ("Origin", "http://evil.example"),
                ("Sec-Fetch-Site", "cross-site"),
                form,
            ],
            "",
        );
        assert_eq!(r.status, 403, "a cross-site form post: {r:?}");
        let r = request(&lb, "POST", DRAIN, &[("Origin", "http://evil.example")], "");
        assert_refused(&r, 403, "Origin", "POST drain with a foreign Origin");
        // An older browser that sends no Origin still cannot send a form body.
        let r = request(&lb, "POST", DRAIN, &[form], "");
        assert_refused(&r, 415, "JSON", "POST drain with a form content type");
        assert_eq!(state(&lb), before, "a refused write changed the config");

        // ctl (Content-Type: application/json, no Origin) and a bare POST still write.
        let server = format!("http://{}", lb.admin);
        let (code, out, err) =
            blocking(|| raftlb_cmd(&["ctl", "--server", &server, "backend", "drain", "web", "b"]));
        assert_eq!(code, 0, "ctl backend drain: {out}{err}");
        assert!(out.contains("drained true"), "{out}");
        let r = request(&lb, "POST", "/api/v1/pools/web/backends/b/undrain", &[], "");
        assert_eq!(
            r.status, 200,
            "a POST with no body and no content type: {r:?}"
        );
        assert_eq!(state(&lb), (before.0 + 2, before.1, false));

        // DNS rebinding: a page at evil.example, its name now resolving to 127.0.0.1,
        // is same-origin to the browser; Host still names the page's site.
        let rebound = [
            ("Host", "evil.example:9090"),
            ("Origin", "http://evil.example:9090"),
            ("Sec-Fetch-Site", "same-origin"),
            ("content-type", "application/json"),
        ];
        let r = request(&lb, "POST", DRAIN, &rebound, "");
        assert_refused(&r, 403, "DNS rebinding", "a write through a rebound name");
        let r = request(&lb, "GET", "/api/v1/status", &rebound[..1], "");
        assert_refused(&r, 403, "DNS rebinding", "a read through a rebound name");
        assert_eq!(state(&lb), (before.0 + 2, before.1, false));
        let local = format!("localhost:{}", lb.admin.port());
        let r = request(&lb, "GET", "/api/v1/status", &[("Host", &local)], "");
        assert_eq!(r.status, 200, "localhost names a loopback server: {r:?}");
        let r = request(&lb, "GET", "/healthz", &rebound[..1], "");
        assert_eq!(r.status, 200, "probes are open: {r:?}");
    }
}
