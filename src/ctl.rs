//! `raftlb ctl`: the admin API from the command line. Tables for people, `-o json`
//! or `-o yaml` for scripts.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::app::{EXIT_CONFIG, EXIT_RUNTIME};
use crate::cli::{
    BackendCommand, ConfigCommand, CtlArgs, CtlCommand, CtlSnapshotCommand, LeaderCommand,
    MemberCommand, Output, RaftCommand,
};

const TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(args: CtlArgs) -> ExitCode {
    let runtime = match crate::app::runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(ctl(&args)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(CtlError::Usage(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(CtlError::Failed(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

enum CtlError {
    /// The command line is wrong (exit 2).
    Usage(String),
    /// The server could not be reached or refused the request (exit 1).
    Failed(String),
}

async fn ctl(args: &CtlArgs) -> Result<String, CtlError> {
    let client = Client::new(args)?;
    let (reply, table): (Value, fn(&Value) -> String) = match &args.command {
        CtlCommand::Status => (
            client.call(Method::GET, "/api/v1/status", None).await?,
            status_table,
        ),
        CtlCommand::Backends => (
            client.call(Method::GET, "/api/v1/backends", None).await?,
            backends_table,
        ),
        CtlCommand::Backend(cmd) => {
            let (method, path, body) = backend_request(cmd);
            (client.call(method, &path, body).await?, backend_line)
        }
        CtlCommand::Members => (
            client.call(Method::GET, "/api/v1/members", None).await?,
            members_table,
        ),
        CtlCommand::Member(cmd) => {
            let (method, path, body) = match cmd {
                MemberCommand::Add {
                    id,
                    address,
                    learner,
                } => (
                    Method::POST,
                    "/api/v1/members".to_string(),
                    Some(json!({"id": id, "address": address, "learner": learner})),
                ),
                MemberCommand::Promote { id } => {
                    (Method::POST, format!("/api/v1/members/{id}/promote"), None)
                }
                MemberCommand::Remove { id } => {
                    (Method::DELETE, format!("/api/v1/members/{id}"), None)
                }
            };
            (client.call(method, &path, body).await?, members_table)
        }
        CtlCommand::Leader(LeaderCommand::Transfer { id }) => (
            client
                .call(
                    Method::POST,
                    "/api/v1/leader/transfer",
                    Some(json!({ "to": id })),
                )
                .await?,
            transfer_line,
        ),
        CtlCommand::Raft(RaftCommand::MoveLeader { id }) => (
            client
                .call(
                    Method::POST,
                    "/api/v1/raft/move-leader",
                    Some(json!({ "to": id })),
                )
                .await?,
            |v: &Value| format!("Raft leadership moved to node {}\n", text(&v["to"])),
        ),
        CtlCommand::Config(ConfigCommand::Get) => (
            client.call(Method::GET, "/api/v1/config", None).await?,
            text_body,
        ),
        CtlCommand::Snapshot(CtlSnapshotCommand::Save { file }) => {
            let bytes = client.download("/api/v1/snapshot").await?;
            let (backup, sum) = crate::store::backup::Backup::verify(&bytes)
                .map_err(|e| CtlError::Failed(format!("the server sent a damaged backup: {e}")))?;
            crate::write_file(file, &bytes).map_err(CtlError::Failed)?;
            (
                json!({
                    "file": file.display().to_string(),
                    "sha256": sum,
                    "bytes": bytes.len(),
                    "cluster_id": backup.cluster_id,
                    "config_version": backup.state.config_version,
                    "index": backup.last_applied.map_or(0, |l| l.index()),
                    "summary": backup.summary(),
                }),
                saved_line,
            )
        }
        CtlCommand::Config(ConfigCommand::Apply { file, if_version }) => {
            let yaml = std::fs::read_to_string(file)
                .map_err(|e| CtlError::Usage(format!("{}: {e}", file.display())))?;
            let if_match = if_version.map(|v| format!("\"{v}\""));
            (
                client
                    .send(
                        Method::PUT,
                        "/api/v1/config",
                        yaml,
                        "application/yaml",
                        if_match,
                    )
                    .await?,
                version_line,
            )
        }
    };
    Ok(match args.output {
        Output::Table => table(&reply),
        Output::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&reply).unwrap_or_default()
        ),
        Output::Yaml => serde_saphyr::to_string(&reply).unwrap_or_default(),
    })
}

fn backend_request(cmd: &BackendCommand) -> (Method, String, Option<Value>) {
    let path = |pool: &str, name: &str| format!("/api/v1/pools/{pool}/backends/{name}");
    match cmd {
        BackendCommand::Add {
            pool,
            name,
            address,
            weight,
        } => (
            Method::POST,
            format!("/api/v1/pools/{pool}/backends"),
            Some(json!({"name": name, "address": address, "weight": weight})),
        ),
        BackendCommand::Remove { pool, name } => (Method::DELETE, path(pool, name), None),
        BackendCommand::Drain { pool, name } => {
            (Method::POST, format!("{}/drain", path(pool, name)), None)
        }
        BackendCommand::Undrain { pool, name } => {
            (Method::POST, format!("{}/undrain", path(pool, name)), None)
        }
        BackendCommand::Weight { pool, name, weight } => (
            Method::PATCH,
            path(pool, name),
            Some(json!({"weight": weight})),
        ),
    }
}

struct Client {
    authority: String,
    token: Option<String>,
    /// For https:// servers: the TLS client and the name to verify.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
}

impl Client {
    fn new(args: &CtlArgs) -> Result<Client, CtlError> {
        let uri: Uri = args
            .server
            .parse()
            .map_err(|e| CtlError::Usage(format!("--server {:?}: not a URL: {e}", args.server)))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let ca = crate::config::schema::BackendTls {
                    ca: args.cacert.clone(),
                    server_name: None,
                    cert: None,
                    key: None,
                };
                let config = crate::tls::client_config(Some(&ca), true)
                    .map_err(|e| CtlError::Usage(format!("--cacert: {e}")))?;
                let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                let name = crate::tls::server_name(None, host)
                    .map_err(|e| CtlError::Usage(format!("--server: {e}")))?;
                Some((
                    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
                    name,
                ))
            }
            _ => {
                return Err(CtlError::Usage(format!(
                    "--server {:?}: use http://HOST:PORT or https://HOST:PORT",
                    args.server
                )));
            }
        };
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| CtlError::Usage(format!("--server {:?}: no host:port", args.server)))?;
        let token = match &args.token_file {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| CtlError::Usage(format!("--token-file {}: {e}", file.display())))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        Ok(Client {
            authority,
            token,
            tls,
        })
    }

    /// One request; the JSON reply, or the server's `{"error": ...}` as a failure.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.send(method, path, body, "application/json", None)
            .await
    }

    /// One request with a body of `content_type`; the reply as JSON (or as a string
    /// when it is not JSON, like the YAML of `config get`).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: String,
        content_type: &str,
        if_match: Option<String>,
    ) -> Result<Value, CtlError> {
        let bytes = self
            .exchange(method, path, body, content_type, if_match)
            .await?;
        Ok(serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())))
    }

    /// A GET whose successful answer is raw bytes (a backup).
    async fn download(&self, path: &str) -> Result<Bytes, CtlError> {
        self.exchange(Method::GET, path, String::new(), "application/json", None)
            .await
    }

    /// One HTTP/1.1 exchange, bounded by [`TIMEOUT`]: the body of a 2xx answer, the
    /// server's error otherwise.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: String,
        content_type: &str,
        if_match: Option<String>,
    ) -> Result<Bytes, CtlError> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, &self.authority);
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(v) = if_match {
            request = request.header(hyper::header::IF_MATCH, v);
        }
        let request = request
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CtlError::Usage(e.to_string()))?;
        let server = &self.authority;
        let exchange = async {
            let stream = TcpStream::connect(server)
                .await
                .map_err(|e| format!("cannot reach {server}: {e}"))?;
            match &self.tls {
                None => http(stream, request).await,
                Some((connector, name)) => {
                    let stream = connector
                        .connect(name.clone(), stream)
                        .await
                        .map_err(|e| format!("TLS with {server}: {e}"))?;
                    http(stream, request).await
                }
            }
            .map_err(|e| format!("{server}: {e}"))
        };
        let (status, bytes) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| CtlError::Failed(format!("{server} did not answer within {TIMEOUT:?}")))?
            .map_err(CtlError::Failed)?;
        if !status.is_success() {
            return Err(failure(&method, path, status, &bytes));
        }
        Ok(bytes)
    }
}

/// A refused request: the server's `{"error": ...}`, or its body as text.
fn failure(method: &Method, path: &str, status: StatusCode, body: &[u8]) -> CtlError {
    let value: Value = serde_json::from_slice(body).unwrap_or_default();
    let message = value["error"].as_str().map_or_else(
        || String::from_utf8_lossy(body).into_owned(),
        str::to_string,
    );
    CtlError::Failed(format!("{method} {path}: {} {message}", status.as_u16()))
}

/// One HTTP/1.1 request and its whole answer over `stream`.
async fn http<S>(stream: S, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}

fn transfer_line(v: &Value) -> String {
    let lease = &v["lease"];
    format!(
        "lease released by the active; now {} (epoch {}, version {})\n",
        match (lease["holder"].as_u64(), lease["instance"].is_null()) {
            (None, _) => "free for any standby".to_string(),
            (Some(h), true) => format!("handed to node {h}"),
            (Some(h), false) => format!("held by node {h}"),
        },
        text(&lease["epoch"]),
        text(&lease["version"])
    )
}

fn status_table(v: &Value) -> String {
    let mut out = String::new();
    let node = &v["node"];
    let _ = writeln!(
        out,
        "node            {} (id {}, version {})",
        text(&node["name"]),
        text(&node["id"]),
        text(&node["version"])
    );
    let _ = writeln!(out, "role            {}", text(&v["role"]));
    let _ = writeln!(out, "config_version  {}", text(&v["config_version"]));
    let cluster = &v["cluster"];
    if cluster.is_null() {
        let _ = writeln!(out, "cluster         none (standalone)");
    } else {
        let _ = writeln!(
            out,
            "cluster         {} leader {} term {} commit {} quorum {} fault tolerance {}",
            text(&cluster["cluster_id"]),
            text(&cluster["leader_id"]),
            text(&cluster["term"]),
            text(&cluster["commit_index"]),
            text(&cluster["quorum"]),
            text(&cluster["fault_tolerance"])
        );
        let _ = writeln!(
            out,
            "quorum          {}",
            if cluster["quorum_reachable"] == true {
                "reachable"
            } else {
                "NOT reachable: writes fail with 503"
            }
        );
        out.push_str(&members_table(cluster));
    }
    let lease = &v["lease"];
    if lease.is_null() {
        let _ = writeln!(out, "lease           none (leader election off)");
    } else {
        let _ = writeln!(
            out,
            "lease           holder {} (node {}) epoch {} renewed {} ms ago, lease {} ms",
            text(&lease["holder"]),
            text(&lease["holder_id"]),
            text(&lease["epoch"]),
            text(&lease["renewed_ms_ago"]),
            text(&lease["lease_duration_ms"])
        );
    }
    out
}

fn backends_table(v: &Value) -> String {
    let mut rows = vec![
        [
            "POOL",
            "BACKEND",
            "ADDRESS",
            "WEIGHT",
            "HEALTH",
            "DRAINED",
            "CONNS",
            "LAST CHECK",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for pool in v["pools"].as_array().into_iter().flatten() {
        for b in pool["backends"].as_array().into_iter().flatten() {
            rows.push(vec![
                text(&pool["name"]),
                text(&b["name"]),
                text(&b["address"]),
                text(&b["weight"]),
                text(&b["health"]),
                text(&b["drained"]),
                text(&b["active_connections"]),
                last_check(&b["last_check"]),
            ]);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

fn backend_line(v: &Value) -> String {
    if v.is_null() {
        return "ok\n".into();
    }
    format!(
        "{} {}: weight {}, health {}, drained {}, {} connections\n",
        text(&v["name"]),
        text(&v["address"]),
        text(&v["weight"]),
        text(&v["health"]),
        text(&v["drained"]),
        text(&v["active_connections"])
    )
}

fn last_check(c: &Value) -> String {
    if c.is_null() {
        return "-".into();
    }
    let ok = if c["ok"] == true { "ok" } else { "fail" };
    format!("{ok} {} ms", text(&c["latency_ms"]))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn members_table(v: &Value) -> String {
    let members = v["members"].as_array().cloned().unwrap_or_default();
    let mut out = String::from("ID  ADDRESS                ROLE      VOTER  REACHABLE\n");
    for m in &members {
        let _ = writeln!(
            out,
            "{:<3} {:<22} {:<9} {:<6} {}",
            text(&m["id"]),
            text(&m["address"]),
            text(&m["role"]),
            text(&m["voter"]),
            text(&m["reachable"])
        );
    }
    let voters = members.iter().filter(|m| m["voter"] == true).count();
    if voters > 0 && voters % 2 == 0 {
        let quorum = voters / 2 + 1;
        let _ = writeln!(
            out,
            "warning: {voters} voters: quorum {quorum}, fault tolerance {}: an even count tolerates no more failures than {} voters",
            voters - quorum,
            voters - 1
        );
    }
    out
}

fn text_body(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => format!("{other}\n"),
    }
}

fn saved_line(v: &Value) -> String {
    format!(
        "saved {} ({} bytes, sha256 {}): {}\n",
        text(&v["file"]),
        text(&v["bytes"]),
        text(&v["sha256"]),
        text(&v["summary"])
    )
}

fn version_line(v: &Value) -> String {
    format!("applied: config_version {}\n", text(&v["config_version"]))
}
