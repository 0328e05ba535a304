//! `raftlb ctl` against running raftlb processes (standalone and a 3-replica cluster):
//! tables, `-o json|yaml`, writes that print what they changed, the token file, errors
//! that say what was reached and what to try, `endpoint status` over several servers,
//! shell completions, and the status page's HTTP side (the browser side is
//! tests/browser/status_page.py).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reads_and_changes_backends_through_the_admin_api() {
    raise_nofile();
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let (admin, listen) = (loopback(), loopback());
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("write token");
    let yaml = Raftlb::standalone_yaml(admin, listen, "", "", &[("a", a), ("b", b)]).replacen(
        "admin:\n",
        &format!("admin:\n  token_file: \"{}\"\n", token.display()),
        1,
    );
    let _lb = blocking(|| Raftlb::start(&yaml, admin));
    let server = format!("http://{admin}");
    let token = token.to_str().expect("utf-8");
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--server", server.as_str(), "--token-file", token];
        all.extend_from_slice(args);
        blocking(|| raftlb_cmd(&all))
    };

    let (code, out, err) = ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("role            active") && out.contains("standalone"),
        "{out}"
    );
    // The SPEC's status lists the backends too: a table, and a field with -o json.
    assert!(out.contains("POOL") && out.contains("BACKEND"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("web") && l.contains(" a "))
            && out
                .lines()
                .any(|l| l.starts_with("web") && l.contains(" b ")),
        "{out}"
    );
    let (code, out, err) = ctl(&["status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("-o json prints JSON");
    assert_eq!(v["role"], "active", "{out}");
    assert_eq!(v["backends"]["pools"][0]["name"], "web", "{out}");

    let (code, out, err) = ctl(&["backend", "drain", "web", "b"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("drained web/b: ") && out.contains("drained true"),
        "{out}"
    );
    let (code, out, _) = ctl(&["backends"]);
    assert_eq!(code, 0);
    let row_b = out
        .lines()
        .find(|l| l.starts_with("web") && l.contains(" b "))
        .expect("a row for b");
    assert!(row_b.contains("true"), "{out}");
    assert_eq!(which_backend(listen, None).await.expect("request"), "a");

    let (code, out, err) = ctl(&["backend", "weight", "web", "a", "7"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("set the weight of web/a to 7: ") && out.contains("weight 7"),
        "{out}"
    );
    // A name the config would refuse never reaches a URL: `a?x` would name `a`.
    for bad in [
        ["web", "a?x"],
        ["web", "a#x"],
        ["we/b", "a"],
        ["web", "a%3Fx"],
    ] {
        let (code, out, err) = ctl(&["backend", "weight", bad[0], bad[1], "3"]);
        assert_eq!(code, 2, "{bad:?}: {out}{err}");
        assert!(
            err.contains("not a pool or backend name: use 1-63 characters"),
            "{err}"
        );
    }
    let (code, out, _) = ctl(&["backend", "undrain", "web", "b", "-o", "yaml"]);
    assert_eq!(code, 0);
    let v: Value = serde_saphyr::from_str(&out).expect("-o yaml prints YAML");
    assert_eq!(v["name"], "b", "{out}");
    assert_eq!(v["drained"], false, "{out}");
    let (code, out, err) = ctl(&["backend", "drain", "web", "b?"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("'b?'") && err.contains("not a pool or backend name"),
        "{err}"
    );
    let (code, out, _) = ctl(&["-o", "json", "backends"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("-o json prints JSON");
    assert_eq!(v["pools"][0]["backends"][0]["weight"], 7, "{v}");
    assert_eq!(v["pools"][0]["backends"][1]["drained"], false, "{v}");

    let (code, _, err) = ctl(&["backend", "remove", "web", "a"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("edit the file"),
        "{err}"
    );
    let (code, _, err) = ctl(&["backend", "weight", "web", "a", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("400") && err.contains("weight 0 is out of range: use 1 to 256"),
        "{err}"
    );
    let (_, out, _) = ctl(&["-o", "json", "backends"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("-o json prints JSON");
    assert_eq!(v["pools"][0]["backends"][0]["weight"], 7, "unchanged: {v}");
    // Cluster-only commands say so on a standalone replica, every one of them.
    for args in [
        &["member", "add", "2", "127.0.0.1:7402"][..],
        &["member", "promote", "2"][..],
        &["member", "remove", "2"][..],
        &["config", "get"][..],
    ] {
        let (code, out, err) = ctl(args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(
            err.contains("exists in cluster mode only: this replica is standalone"),
            "{args:?}: {err}"
        );
    }

    let (code, _, err) = blocking(|| raftlb_cmd(&["ctl", "--server", server.as_str(), "status"]));
    assert_eq!(code, 1, "without the token: {err}");
    assert!(err.contains("401") && err.contains("--token-file"), "{err}");
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").expect("write");
    let empty = empty.to_string_lossy().to_string();
    let (code, _, err) = blocking(|| {
        raftlb_cmd(&[
            "ctl",
            "--server",
            server.as_str(),
            "--token-file",
            &empty,
            "status",
        ])
    });
    assert_eq!(code, 2, "an empty token file: {err}");
    assert!(err.contains("the file is empty"), "{err}");
    let (code, _, err) =
        blocking(|| raftlb_cmd(&["ctl", "--server", "http://127.0.0.1:1", "status"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach http://127.0.0.1:1: connection refused: is raftlb running? set --server or RAFTLB_SERVER"),
        "{err}"
    );
    let (code, _, err) = blocking(|| raftlb_cmd(&["ctl", "--server", "not a url", "status"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--server \"not a url\": not a URL"), "{err}");
    // A path would be dropped from every request: refused, not ignored.
    let with_path = format!("{server}/api");
    let (code, _, err) =
        blocking(|| raftlb_cmd(&["ctl", "--server", with_path.as_str(), "status"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("without a path"), "{err}");
}

/// A plain HTTP server that is not raftlb: an HTML 404 for every request.
async fn html_server() -> SocketAddr {
    serve_each(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        let body = "<html><body><h1>Not Found</h1></body></html>";
        let reply = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(reply.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_errors_say_what_was_reached_and_what_to_try() {
    raise_nofile();
    let a = named_backend("a").await;
    let (admin, listen) = (loopback(), loopback());
    let yaml = Raftlb::standalone_yaml(admin, listen, "", "", &[("a", a)]);
    let _lb = blocking(|| Raftlb::start(&yaml, admin));

    // https:// at the plain admin API: no TLS error, the URL to use instead.
    let https = format!("https://{admin}");
    let (code, out, err) = blocking(|| raftlb_cmd(&["ctl", "--server", &https, "status"]));
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("speaks plain HTTP, not HTTPS")
            && err.contains(&format!("use --server http://{admin}")),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("corrupt"), "{err}");

    // Another HTTP server: what it answered, not its HTML.
    let other = html_server().await;
    let url = format!("http://{other}");
    let (code, _, err) = blocking(|| raftlb_cmd(&["ctl", "--server", &url, "backends"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("answered GET /api/v1/backends with HTTP 404 (text/html), which is not raftlb's admin API")
            && err.contains("set --server or RAFTLB_SERVER"),
        "{err}"
    );
    assert!(!err.contains("<html>"), "{err}");

    // A port that accepts but speaks no HTTP (here: raftlb's own data path, whose
    // backend answers a line of text).
    let data = format!("http://{listen}");
    let (code, _, err) = blocking(|| raftlb_cmd(&["ctl", "--server", &data, "status"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("did not answer HTTP") && err.contains("admin.bind"),
        "{err}"
    );

    // RAFTLB_SERVER is read, and only `endpoint status` takes several servers.
    let server = format!("http://{admin}");
    let out = blocking(|| {
        std::process::Command::new(BIN)
            .args(["ctl", "status"])
            .env("RAFTLB_SERVER", &server)
            .output()
    })
    .expect("run ctl");
    assert!(out.status.success(), "{out:?}");
    let two = format!("{server},{server}");
    let (code, _, err) = blocking(|| raftlb_cmd(&["ctl", "--server", &two, "status"]));
    assert_eq!(code, 2);
    assert!(err.contains("only `ctl endpoint status`"), "{err}");
    // Not a terminal: no colour codes in tables.
    let (code, out, _) = blocking(|| raftlb_cmd(&["ctl", "--server", &server, "backends"]));
    assert_eq!(code, 0);
    assert!(!out.contains('\x1b'), "{out:?}");
    // On a terminal (script(1) gives it one): health in colour, unless NO_COLOR.
    let on_tty = |no_color: &str| {
        let command = format!("{BIN} ctl --server {server} backends");
        blocking(|| {
            std::process::Command::new("script")
                .args(["-qec", &command, "/dev/null"])
                .env("NO_COLOR", no_color)
                .output()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .expect("script(1) from bsdutils")
    };
    let coloured = on_tty("");
    assert!(coloured.contains("\x1b[32mup\x1b[0m"), "{coloured:?}");
    assert!(!on_tty("1").contains('\x1b'), "NO_COLOR");
    let header = out.lines().next().unwrap_or_default();
    let row = out.lines().nth(1).unwrap_or_default();
    assert_eq!(
        header.find("HEALTH"),
        row.find("up"),
        "columns line up:\n{out}"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (shell, marker) in [
        ("bash", "_raftlb()"),
        ("zsh", "#compdef raftlb"),
        ("fish", "complete -c raftlb"),
    ] {
        let (code, out, err) = raftlb_cmd(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains(marker), "{shell}: {out}");
        assert!(out.contains("endpoint") && out.contains("drain"), "{shell}");
        if shell == "bash" {
            // The script is valid bash.
            let file = dir.path().join("raftlb.bash");
            std::fs::write(&file, &out).expect("write");
            let checked = std::process::Command::new("bash")
                .arg("-n")
                .arg(&file)
                .output()
                .expect("bash -n");
            assert!(checked.status.success(), "{checked:?}");
        }
    }
    let (code, _, err) = raftlb_cmd(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");

    // A reader that stops early (`| head -1`): no panic, exit 0. The zsh script is
    // larger than a pipe's buffer, so the write meets the closed pipe.
    let mut child = std::process::Command::new(BIN)
        .args(["completions", "zsh"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut first).expect("read");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_asks_for_the_token_and_lists_everything_escaped() {
    raise_nofile();
    let a = named_backend("a").await;
    let (admin, listen) = (loopback(), loopback());
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "pa55\n").expect("write token");
    let yaml = Raftlb::standalone_yaml(admin, listen, "", "", &[("a", a)]).replacen(
        "admin:\n",
        &format!("admin:\n  token_file: \"{}\"\n", token.display()),
        1,
    );
    let yaml = format!("node: {{ name: \"lb <b>bold</b> & co\" }}\n{yaml}");
    let _lb = blocking(|| Raftlb::start(&yaml, admin));

    let page = blocking(|| http_response(admin, "GET", "/", &[], "")).expect("GET /");
    assert_eq!(page.status, 401, "{page:?}");
    assert!(
        page.header("www-authenticate")
            .is_some_and(|h| h.starts_with("Basic")),
        "{page:?}"
    );
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:pa55")
    );
    let auth = [("authorization", basic.as_str())];
    let page = blocking(|| http_response(admin, "GET", "/", &auth, "")).expect("GET /");
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html"))
    );
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    assert!(page.body.contains("data-backend=\"a\""), "{}", page.body);
    assert!(page.body.contains(&a.to_string()), "{}", page.body);
    assert!(
        page.body.contains("lb &lt;b&gt;bold&lt;/b&gt; &amp; co") && !page.body.contains("<b>bold"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("<script src=\"/status.js\""),
        "{}",
        page.body
    );
    let script = blocking(|| http_response(admin, "GET", "/status.js", &auth, "")).expect("js");
    assert_eq!(script.status, 200);
    assert!(
        script
            .header("content-type")
            .is_some_and(|t| t.contains("javascript"))
    );
    assert!(
        script.body.contains("getElementById(\"status\")"),
        "{}",
        script.body
    );
    // Reads only: the page cannot be posted to.
    let post =
        blocking(|| http_response(admin, "POST", "/", &[("authorization", "Bearer pa55")], ""))
            .expect("POST /");
    assert_eq!(post.status, 405, "{post:?}");
}

/// A 3-replica cluster on loopback (leader election off: roles are not the point).
struct Trio {
    admins: Vec<SocketAddr>,
    peers: Vec<SocketAddr>,
    replicas: Vec<Raftlb>,
    _data: Vec<tempfile::TempDir>,
}

impl Trio {
    fn start(backends: &[(&str, SocketAddr)]) -> Trio {
        let admins: Vec<SocketAddr> = (0..3).map(|_| loopback()).collect();
        let peers: Vec<SocketAddr> = (0..3).map(|_| loopback()).collect();
        let data: Vec<tempfile::TempDir> = (0..3)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let peer_list: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(j, p)| format!("{}: {p}", j + 1))
            .collect();
        let backend_list: Vec<String> = backends
            .iter()
            .map(|(n, a)| format!("      - {{ name: {n}, address: {a} }}"))
            .collect();
        let mut replicas: Vec<Raftlb> = (0..3)
            .map(|i| {
                let yaml = format!(
                    "node: {{ name: lb-{id} }}\nadmin: {{ bind: {admin} }}\n\
                     cluster:\n  cluster_id: ctl\n  node_id: {id}\n  initial_state: new\n  bind: {peer}\n  data_dir: {dir}\n  \
                     peers: {{ {peers} }}\n  heartbeat_interval: 100ms\n  election_timeout: 1s\n\
                     leader_election: {{ enabled: false }}\n\
                     listeners:\n  front: {{ bind: {listen}, pool: web }}\n\
                     pools:\n  web:\n    backends:\n{backends}\n",
                    id = i + 1,
                    admin = admins[i],
                    peer = peers[i],
                    dir = data[i].path().display(),
                    peers = peer_list.join(", "),
                    listen = loopback(),
                    backends = backend_list.join("\n"),
                );
                Raftlb::spawn(&yaml, admins[i])
            })
            .collect();
        replicas.iter_mut().for_each(Raftlb::wait_ready);
        let trio = Trio {
            admins,
            peers,
            replicas,
            _data: data,
        };
        assert!(
            eventually(Duration::from_secs(15), || trio.agreed()),
            "the replicas do not agree on a leader with a quorum"
        );
        trio
    }

    fn status(&self, i: usize) -> Value {
        http_get(self.admins[i], "/api/v1/status")
            .ok()
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or(Value::Null)
    }

    fn agreed(&self) -> bool {
        let statuses: Vec<Value> = (0..3).map(|i| self.status(i)).collect();
        let leader = &statuses[0]["cluster"]["leader_id"];
        !leader.is_null()
            && statuses.iter().all(|s| {
                s["cluster"]["leader_id"] == *leader && s["cluster"]["quorum_reachable"] == true
            })
    }

    /// The index of a replica that is not the Raft leader.
    fn follower(&self) -> usize {
        let leader = self.status(0)["cluster"]["leader_id"].as_u64().unwrap_or(1) as usize;
        (0..3).find(|i| i + 1 != leader).unwrap_or(0)
    }

    fn url(&self, i: usize) -> String {
        format!("http://{}", self.admins[i])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_writes_print_what_they_changed_and_endpoint_status_shows_every_replica() {
    raise_nofile();
    let a = named_backend("a").await;
    let c = named_backend("c").await;
    let trio = blocking(|| Trio::start(&[("a", a)]));
    let f = trio.follower();
    let server = trio.url(f);
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--server", server.as_str()];
        all.extend_from_slice(args);
        blocking(|| raftlb_cmd(&all))
    };
    let c_addr = c.to_string();

    // Added on a follower (forwarded to the leader): the line names what changed.
    let (code, out, err) = ctl(&["backend", "add", "web", "c", &c_addr, "--weight", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("added web/c: {c_addr}: weight 3, health ")),
        "{out}"
    );
    assert!(!out.contains(" -,"), "{out}");
    // The HTTP answer is SPEC.md's: 201 and the backend, as in the backends API.
    let body = format!("{{\"name\": \"d\", \"address\": \"{a}\", \"weight\": 2}}");
    let added = blocking(|| {
        http_response(
            trio.admins[f],
            "POST",
            "/api/v1/pools/web/backends",
            &[("content-type", "application/json")],
            &body,
        )
    })
    .expect("POST backend");
    assert_eq!(added.status, 201, "{added:?}");
    let v: Value = serde_json::from_str(&added.body).expect("JSON");
    assert_eq!(v["name"], "d", "{v}");
    assert_eq!(v["address"], a.to_string(), "{v}");
    assert_eq!(v["weight"], 2, "{v}");
    assert!(v["health"].is_string() && v["drained"] == false, "{v}");
    assert!(added.header("etag").is_some(), "{added:?}");
    let (code, _, err) = ctl(&["backend", "add", "web", "d", &c_addr]);
    assert_eq!(code, 1);
    assert!(err.contains("409"), "{err}");

    let (code, out, err) = ctl(&["-o", "json", "backend", "drain", "web", "c"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("-o json");
    assert_eq!(
        (v["name"].as_str(), v["drained"].as_bool()),
        (Some("c"), Some(true)),
        "{v}"
    );
    let (code, out, err) = ctl(&["backend", "weight", "web", "c", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("set the weight of web/c to 5: ") && out.contains("weight 5"),
        "{out}"
    );
    let (code, out, err) = ctl(&["backend", "remove", "web", "d"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("removed web/d: {a}: weight 2")),
        "{out}"
    );
    let (code, out, _) = ctl(&["-o", "json", "backends"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    let names: Vec<&str> = v["pools"][0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "c"], "{v}");
    // config get as data, not a string of YAML.
    let (code, out, _) = ctl(&["-o", "json", "config", "get"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert!(v["pools"]["web"]["backends"].is_array(), "{v}");

    // endpoint status over all three (comma-separated and repeated --server).
    let all = format!("{},{}", trio.url(0), trio.url(1));
    let third = trio.url(2);
    let (code, out, err) = blocking(|| {
        raftlb_cmd(&[
            "ctl", "--server", &all, "--server", &third, "endpoint", "status",
        ])
    });
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].starts_with("ENDPOINT") && lines[0].contains("RAFT TERM"),
        "{out}"
    );
    let leader = trio.status(0)["cluster"]["leader_id"].to_string();
    for (i, line) in lines[1..].iter().enumerate() {
        assert!(line.starts_with(&trio.url(i)), "{out}");
        assert!(line.contains(&format!("lb-{}", i + 1)), "{out}");
        let col = lines[0].find("LEADER").unwrap_or(0);
        assert!(line[col..].starts_with(&leader), "{out}");
    }
    assert_eq!(out.matches("leader").count(), 1, "one Raft leader:\n{out}");
    // One endpoint down and one that is a peer port: rows that say so, exit 1.
    let dead = format!("http://{}", loopback());
    let peer = format!("http://{}", trio.peers[0]);
    let (code, out, err) = blocking(|| {
        raftlb_cmd(&[
            "ctl",
            "-o",
            "json",
            "--server",
            &trio.url(0),
            "--server",
            &dead,
            "--server",
            &peer,
            "endpoint",
            "status",
        ])
    });
    assert_eq!(code, 1, "{err}");
    let rows: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(3), "{rows}");
    assert_eq!(rows[0]["node_id"], 1, "{rows}");
    assert_eq!(rows[0]["errors"], serde_json::json!([]), "{rows}");
    assert!(
        rows[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("is raftlb running?")),
        "{rows}"
    );
    assert_eq!(rows[1]["errors"][0], rows[1]["error"], "{rows}");
    assert!(
        rows[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cluster.bind") || e.contains("not raftlb's admin API")),
        "{rows}"
    );
    drop(trio.replicas);
}
