//! Generated bad input for the admin API, against a running standalone and a running
//! cluster replica (with a token): random methods, paths, query strings, headers and
//! bodies (invalid JSON and YAML, wrong types, huge numbers, deep nesting), plus fixed
//! oversized and hostile cases. Every answer is 2xx, 4xx or 503, the process stays up,
//! and a refused request changes nothing (config_version and the replicated fields of
//! every backend compared before and after).
//!
//! Cases: FUZZ_ADMIN_CASES, else PROPTEST_CASES, else 256 (per target).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::cluster::*;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::Value;

const TOKEN: &str = "fuzz-admin-token-5b1e";

fn cases() -> u32 {
    ["FUZZ_ADMIN_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(256)
}

/// One generated request.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// An answer: the status and body, or None when the server closed the connection
/// without one (hyper does that for some malformed requests).
type Answer = Option<(u16, String)>;

/// Sends `req` with hyper over a new connection; a request hyper's client will not
/// build (an invalid method, header or path) goes as raw bytes instead.
fn send(addr: SocketAddr, req: &Req, auth: Option<&str>) -> Result<Answer, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let exchange = async {
        match build(addr, req, auth) {
            Some(request) => send_built(addr, request).await,
            None => send_raw(addr, req, auth).await,
        }
    };
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .map_err(|_| TIMED_OUT.to_string())?
    })
}

const TIMED_OUT: &str = "no response within 20 s";

/// The admin API's body limit (src/admin/mod.rs).
const MAX_BODY: usize = 1 << 20;

type Body = http_body_util::Full<bytes::Bytes>;

fn build(addr: SocketAddr, req: &Req, auth: Option<&str>) -> Option<hyper::Request<Body>> {
    let method = hyper::Method::from_bytes(req.method.as_bytes()).ok()?;
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(&req.path)
        .header(hyper::header::HOST, addr.to_string());
    if let Some(token) = auth {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    for (k, v) in &req.headers {
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes()).ok()?;
        let value = hyper::header::HeaderValue::from_bytes(v).ok()?;
        builder = builder.header(name, value);
    }
    builder
        .body(Body::new(bytes::Bytes::from(req.body.clone())))
        .ok()
}

async fn send_built(addr: SocketAddr, request: hyper::Request<Body>) -> Result<Answer, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("no response: {e}"))?;
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Ok(Some((status, body)))
}

/// The request's bytes as generated, then a half-close (so a server waiting for more
/// sees the end); the answer's status line and what follows, as far as it came.
async fn send_raw(addr: SocketAddr, req: &Req, auth: Option<&str>) -> Result<Answer, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut bytes =
        format!("{} {} HTTP/1.1\r\nHost: {addr}\r\n", req.method, req.path).into_bytes();
    if let Some(token) = auth {
        bytes.extend_from_slice(format!("Authorization: Bearer {token}\r\n").as_bytes());
    }
    for (k, v) in &req.headers {
        bytes.extend_from_slice(k.as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(v);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("Content-Length: {}\r\n\r\n", req.body.len()).as_bytes());
    bytes.extend_from_slice(&req.body);
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    if text.is_empty() {
        return Ok(None);
    }
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    Ok(Some((status, text)))
}

/// What a refused request must not change: config_version and, per backend, the
/// replicated fields (health and check times change on their own).
fn replicated(addr: SocketAddr, auth: Option<&str>) -> Value {
    let headers: Vec<(&str, String)> = auth
        .map(|t| vec![("Authorization", format!("Bearer {t}"))])
        .unwrap_or_default();
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Reads that fail would compare equal before and after: they must not.
    let read = |path: &str| match http_request(addr, "GET", path, &headers, "") {
        Ok((200, body)) => serde_json::from_str::<Value>(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {e}: {body}")),
        other => panic!("GET {path}: {other:?}"),
    };
    let backends = read("/api/v1/backends");
    let pools: Vec<Value> = backends["pools"]
        .as_array()
        .map(|pools| {
            pools
                .iter()
                .map(|p| {
                    let list: Vec<Value> = p["backends"]
                        .as_array()
                        .map(|bs| {
                            bs.iter()
                                .map(|b| {
                                    serde_json::json!([b["name"], b["address"], b["weight"], b["drained"]])
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    serde_json::json!({"name": p["name"], "balance": p["balance"], "backends": list})
                })
                .collect()
        })
        .unwrap_or_default();
    let version = read("/api/v1/status")["config_version"].clone();
    assert!(version.is_u64(), "config_version {version}");
    assert!(
        pools.iter().any(|p| p["name"] == "web"
            && p["backends"]
                .as_array()
                .is_some_and(|bs| bs.iter().any(|b| b[0] == "b1"))),
        "pool web with b1 in {backends}"
    );
    serde_json::json!({ "config_version": version, "pools": pools })
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_string()),
        Just("POST".to_string()),
        Just("PUT".to_string()),
        Just("DELETE".to_string()),
        Just("PATCH".to_string()),
        Just("HEAD".to_string()),
        Just("OPTIONS".to_string()),
        Just("TRACE".to_string()),
        "[A-Z]{1,10}",
        "[!-~]{1,6}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    let known = prop_oneof![
        Just("/healthz"),
        Just("/readyz"),
        Just("/metrics"),
        Just("/api/v1/status"),
        Just("/api/v1/backends"),
        Just("/api/v1/config"),
        Just("/api/v1/snapshot"),
        Just("/api/v1/members"),
        Just("/api/v1/members/1"),
        Just("/api/v1/members/99/promote"),
        Just("/api/v1/leader/transfer"),
        Just("/api/v1/raft/move-leader"),
        Just("/api/v1/pools/web/backends/b1/drain"),
        Just("/api/v1/pools/web/backends/b1/undrain"),
        Just("/api/v1/pools/web/backends/b1"),
        Just("/api/v1/pools/web/backends/b1/weight"),
        Just("/api/v1/pools/web/backends/nope/drain"),
        Just("/api/v1/pools/"),
        Just("/api/v1/pools/web/backends"),
        Just("/"),
    ];
    let segment = prop_oneof![
        "[a-z0-9]{0,12}",
        "%[0-9A-F]{2}",
        Just("..".to_string()),
        Just("%00".to_string()),
        Just("18446744073709551616".to_string()),
        "[!-~&&[^?#%]]{0,8}",
    ];
    let query = prop_oneof![
        Just(String::new()),
        "\\?[a-z]{1,5}=[a-z0-9%]{0,10}",
        "\\?[!-~&&[^#]]{0,30}",
    ];
    (
        known,
        proptest::collection::vec(segment, 0..3),
        any::<bool>(),
        query,
    )
        .prop_map(|(base, extra, append, query)| {
            let mut p = base.to_string();
            if append {
                for s in extra {
                    p.push('/');
                    p.push_str(&s);
                }
            }
            p.push_str(&query);
            p
        })
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let header = prop_oneof![
        prop_oneof![
            Just("application/json"),
            Just("application/yaml"),
            Just("text/plain"),
            Just("multipart/form-data"),
            Just("application/x-www-form-urlencoded"),
            Just("application/json; charset=utf-8"),
            Just(""),
        ]
        .prop_map(|v| ("content-type".to_string(), v.as_bytes().to_vec())),
        prop_oneof![
            Just("\"1\""),
            Just("\"18446744073709551616\""),
            Just("*"),
            Just("W/\"3\""),
            Just("-1"),
            Just(""),
        ]
        .prop_map(|v| ("if-match".to_string(), v.as_bytes().to_vec())),
        prop_oneof![
            Just("https://evil.example"),
            Just("null"),
            Just("http://127.0.0.1")
        ]
        .prop_map(|v| ("origin".to_string(), v.as_bytes().to_vec())),
        prop_oneof![Just("cross-site"), Just("same-origin"), Just("none")]
            .prop_map(|v| ("sec-fetch-site".to_string(), v.as_bytes().to_vec())),
        prop_oneof![
            Just("Basic Zm9vOmJhcg=="),
            Just("Bearer wrong"),
            Just("Bearer "),
        ]
        .prop_map(|v| ("authorization".to_string(), v.as_bytes().to_vec())),
        (
            "[a-z-]{1,20}",
            proptest::collection::vec(any::<u8>(), 0..40)
        ),
    ];
    proptest::collection::vec(header, 0..4)
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let nested = (1usize..2_000).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n)));
    let nested_maps =
        (1usize..500).prop_map(|n| format!("{}1{}", "{\"pools\":".repeat(n), "}".repeat(n)));
    prop_oneof![
        Just(String::new()),
        Just("{}".to_string()),
        Just("null".to_string()),
        Just("{\"to\": 18446744073709551616}".to_string()),
        Just("{\"to\": -1}".to_string()),
        Just("{\"to\": \"2\"}".to_string()),
        Just("{\"to\": 1e400}".to_string()),
        Just("{\"weight\": 4294967296}".to_string()),
        Just("{\"weight\": \"heavy\"}".to_string()),
        Just("{\"pools\": {\"web\": {\"backends\": 7}}}".to_string()),
        Just(
            "{\"pools\": {\"web\": {\"backends\": [{\"name\": \"\", \"address\": \"x\"}]}}}"
                .to_string()
        ),
        Just("{\"pools\": {}}".to_string()),
        Just("{\"listeners\": {}}".to_string()),
        Just("pools: {web: {backends: [{name: b9, address: \"256.1.1.1:80\"}]}}".to_string()),
        Just("pools: &a [*a]".to_string()),
        Just("pools:\n  - - - -".to_string()),
        Just("{\"id\": 99, \"address\": \"127.0.0.1:1\", \"learner\": \"yes\"}".to_string()),
        Just("{\"id\": 0, \"address\": \"\"}".to_string()),
        nested,
        nested_maps,
        "[ -~\n]{0,200}",
        "\\{\"[a-z]{1,8}\": [0-9e+\\-.]{1,30}\\}",
    ]
    .prop_map(String::into_bytes)
    .boxed()
    .prop_union(proptest::collection::vec(any::<u8>(), 0..300).boxed())
}

fn request() -> impl Strategy<Value = Req> {
    (method(), path(), headers(), body()).prop_map(|(method, path, headers, body)| Req {
        method,
        path,
        headers,
        body,
    })
}

/// Sends `req` and checks the answer class and that a refusal changed nothing.
fn check(
    addr: SocketAddr,
    auth: Option<&str>,
    req: &Req,
    lb: &std::cell::RefCell<&mut Raftlb>,
) -> Result<(), TestCaseError> {
    let mut lb = lb.borrow_mut();
    let before = replicated(addr, auth);
    let status = send(addr, req, auth)
        .map_err(|e| TestCaseError::fail(format!("{req:?}: {e}\n{}", lb.log())))?;
    if let Ok(Some(exit)) = lb.child.try_wait() {
        return Err(TestCaseError::fail(format!(
            "raftlb exited with {exit} after {req:?}:\n{}",
            lb.log()
        )));
    }
    // No answer at all (a malformed request closed) counts as a refusal.
    let status = status.map_or(400, |(status, _)| status);
    prop_assert!(
        (200..300).contains(&status) || (400..500).contains(&status) || status == 503,
        "{status} for {req:?}"
    );
    if !(200..300).contains(&status) {
        let after = replicated(addr, auth);
        prop_assert_eq!(
            &before,
            &after,
            "a refused request ({}) changed the state: {:?}",
            status,
            req
        );
    }
    Ok(())
}

/// Fixed hostile cases, each sent as-is: oversized bodies and headers, alias bombs.
fn fixed_cases() -> Vec<Req> {
    let put = |content_type: &str, body: Vec<u8>| Req {
        method: "PUT".into(),
        path: "/api/v1/config".into(),
        headers: vec![("content-type".into(), content_type.as_bytes().to_vec())],
        body,
    };
    let patch = |body: Vec<u8>| Req {
        method: "PATCH".into(),
        path: "/api/v1/pools/web/backends/b1".into(),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body,
    };
    let mut laughs = String::from(
        "pools:\n  a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let mut prev = 'a';
    for name in 'b'..='j' {
        laughs.push_str(&format!(
            "  {name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
        prev = name;
    }
    vec![
        put("application/json", vec![b'['; 10 << 20]),
        put("application/yaml", vec![b'-'; 10 << 20]),
        put(
            "application/json",
            format!(
                "{{\"pools\": {{\"web\": {{\"backends\": [{}]}}}}}}}}",
                vec!["{\"name\": \"b\", \"address\": \"127.0.0.1:1\"}"; 20_000].join(",")
            )
            .into_bytes(),
        ),
        put("application/yaml", laughs.into_bytes()),
        put(
            "application/yaml",
            format!("pools: {}", "[".repeat(900_000)).into_bytes(),
        ),
        put(
            "application/json",
            format!("{{\"pools\": {}}}", "[".repeat(900_000)).into_bytes(),
        ),
        patch(vec![b' '; 10 << 20]),
        patch(b"{\"weight\": 4294967296}".to_vec()),
        patch(b"{\"weight\": \"heavy\"}".to_vec()),
        patch(b"{\"weight\": 0}".to_vec()),
        patch(b"{\"weight\": 257}".to_vec()),
        Req {
            method: "POST".into(),
            path: "/api/v1/members".into(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: b"{\"id\": 0, \"address\": \"127.0.0.1:99999\", \"learner\": true}".to_vec(),
        },
        Req {
            method: "GET".into(),
            path: format!("/api/v1/{}", "a".repeat(60_000)),
            headers: vec![],
            body: vec![],
        },
        Req {
            method: "GET".into(),
            path: "/api/v1/status".into(),
            headers: (0..200)
                .map(|i| (format!("x-h{i}"), vec![b'v'; 4000]))
                .collect(),
            body: vec![],
        },
    ]
}

fn fuzz(addr: SocketAddr, auth: Option<&str>, lb: &mut Raftlb) {
    for req in fixed_cases() {
        let what = format!(
            "{} {} ({} bytes)",
            req.method,
            &req.path[..req.path.len().min(40)],
            req.body.len()
        );
        let before = replicated(addr, auth);
        match send(addr, &req, auth) {
            Ok(Some((status, text))) => {
                println!("fixed case {what}: {status}");
                assert!(
                    (400..500).contains(&status) || status == 503,
                    "{what}: {status} {text}"
                );
                // A weight the API refuses says why.
                if req.method == "PATCH" && req.body.len() < 100 {
                    assert!(
                        status == 400 && (text.contains("weight") || text.contains("u32")),
                        "{what}: {status} {text}"
                    );
                }
            }
            Ok(None) => panic!("{what}: closed without an answer"),
            // Only a body over the limit may be cut short: 413, then a close before
            // the server has read it all. Never a hang.
            Err(e) => assert!(
                req.body.len() > MAX_BODY && e != TIMED_OUT,
                "fixed case {what}: {e}"
            ),
        }
        assert!(
            lb.child.try_wait().ok().flatten().is_none(),
            "{what}: raftlb exited:\n{}",
            lb.log()
        );
        assert!(
            http_get(addr, "/healthz").is_ok_and(|(c, _)| c == 200),
            "{what}: /healthz does not answer after it"
        );
        assert_eq!(before, replicated(addr, auth), "{what} changed the state");
    }
    let mut runner = TestRunner::new(RunnerConfig {
        cases: cases(),
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let lb = std::cell::RefCell::new(lb);
    runner
        .run(&request(), |req| check(addr, auth, &req, &lb))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(http_get(addr, "/healthz").is_ok_and(|(c, _)| c == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_of_a_standalone_answers_generated_requests_with_2xx_4xx_or_503() {
    raise_nofile();
    let b1 = named_backend("b1").await;
    let admin = loopback();
    let yaml = Raftlb::standalone_yaml(admin, loopback(), "", "", &[("b1", b1)]);
    let mut lb = blocking(|| Raftlb::start(&yaml, admin));
    blocking(|| fuzz(admin, None, &mut lb));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_of_a_cluster_replica_answers_generated_requests_with_2xx_4xx_or_503() {
    raise_nofile();
    let b1 = named_backend("b1").await;
    let cluster = Cluster::new(1, vec![("b1".to_string(), b1)]);
    let secrets = tempfile::tempdir().expect("tempdir");
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
    let admin = cluster.addrs[0].admin;
    let yaml = cluster.yaml_with(0, "").replace(
        &format!("admin: {{ bind: {admin} }}"),
        &format!(
            "admin: {{ bind: {admin}, token_file: {} }}",
            token_file.display()
        ),
    );
    let mut lb = blocking(|| {
        let mut lb = Raftlb::spawn(&yaml, admin);
        lb.wait_ready();
        assert!(
            eventually(Duration::from_secs(10), || {
                let (code, body) = http_request(
                    admin,
                    "GET",
                    "/api/v1/status",
                    &[("Authorization", &format!("Bearer {TOKEN}"))],
                    "",
                )
                .unwrap_or_default();
                code == 200 && body.contains("\"quorum_reachable\":true")
            }),
            "the one-replica cluster has no leader:\n{}",
            lb.log()
        );
        lb
    });
    blocking(|| fuzz(admin, Some(TOKEN), &mut lb));
}
