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

use crate::cli::{
    BackendArgs, BackendCommand, ConfigCommand, CtlArgs, CtlCommand, CtlSnapshotCommand,
    EndpointCommand, LeaderCommand, MemberCommand, Output, RaftCommand,
};
use crate::cli::{EXIT_CONFIG, EXIT_RUNTIME, write_file, write_out};

const TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(args: CtlArgs) -> ExitCode {
    let runtime = match crate::app::runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(ctl(&args)) {
        Ok((text, complete)) => {
            let code = if complete {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_RUNTIME)
            };
            write_out(text.as_bytes(), code)
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

/// How a table cell is coloured on a terminal.
#[derive(Clone, Copy)]
enum Tone {
    Plain,
    Good,
    Warn,
    Bad,
}

/// Whether to colour: stdout is a terminal and NO_COLOR is not set.
fn colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The tone of a state word (role, health, reachability).
fn tone(word: &str) -> Tone {
    match word {
        "active" | "up" | "leader" | "true" | "reachable" => Tone::Good,
        "standby" | "unknown" | "learner" => Tone::Warn,
        "fault" | "down" | "false" | "unreachable" => Tone::Bad,
        _ => Tone::Plain,
    }
}

fn paint(text: &str, tone: Tone, colour: bool) -> String {
    let code = match tone {
        Tone::Plain => return text.to_string(),
        _ if !colour => return text.to_string(),
        Tone::Good => "32",
        Tone::Warn => "33",
        Tone::Bad => "31",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// An aligned table: a header row and rows of (text, tone); columns padded to the
/// widest cell, colour (on a terminal) added after padding so alignment holds.
fn table(header: &[&str], rows: &[Vec<(String, Tone)>], colour: bool) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|(t, _)| t.chars().count())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |cells: Vec<(String, Tone)>| {
        let last = cells.len().saturating_sub(1);
        cells
            .into_iter()
            .enumerate()
            .map(|(i, (t, tone))| {
                let pad = if i == last {
                    0
                } else {
                    widths[i].saturating_sub(t.chars().count())
                };
                format!("{}{}", paint(&t, tone, colour), " ".repeat(pad))
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let _ = writeln!(
        out,
        "{}",
        line(
            header
                .iter()
                .map(|h| (h.to_string(), Tone::Plain))
                .collect()
        )
        .trim_end()
    );
    for row in rows {
        let _ = writeln!(out, "{}", line(row.clone()).trim_end());
    }
    out
}

/// A cell whose tone follows its text.
fn cell(v: &Value) -> (String, Tone) {
    let t = text(v);
    let tone = tone(&t);
    (t, tone)
}

fn plain(v: &Value) -> (String, Tone) {
    (text(v), Tone::Plain)
}

/// What a command printed for people, from the server's JSON.
type Table = Box<dyn Fn(&Value, bool) -> String>;

async fn ctl(args: &CtlArgs) -> Result<(String, bool), CtlError> {
    if let CtlCommand::Endpoint(EndpointCommand::Status) = &args.command {
        return endpoint_status(args).await;
    }
    let server = match args.server.as_slice() {
        [one] => one,
        [] => return Err(CtlError::Usage("--server: give the admin API's URL".into())),
        [_, ..] => {
            return Err(CtlError::Usage(format!(
                "{} servers given ({}): only `ctl endpoint status` talks to several; give one --server",
                args.server.len(),
                args.server.join(", ")
            )));
        }
    };
    let client = Client::new(server, args)?;
    let (reply, table): (Value, Table) = match &args.command {
        CtlCommand::Endpoint(EndpointCommand::Status) => return endpoint_status(args).await,
        CtlCommand::Status => {
            // The SPEC's status includes the backends: the status object with a
            // `backends` field (/api/v1/backends) added.
            let mut status = client.call(Method::GET, "/api/v1/status", None).await?;
            let backends = client.call(Method::GET, "/api/v1/backends", None).await?;
            if let Some(fields) = status.as_object_mut() {
                fields.insert("backends".into(), backends);
            }
            (status, Box::new(status_table))
        }
        CtlCommand::Backends => (
            client.call(Method::GET, "/api/v1/backends", None).await?,
            Box::new(backends_table),
        ),
        CtlCommand::Backend(BackendArgs {
            command: cmd,
            if_version,
        }) => {
            let (method, path, body) = backend_request(cmd);
            let what = backend_change(cmd);
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let if_match = if_version.map(|v| format!("\"{v}\""));
            let reply = client
                .send(method, &path, body, "application/json", if_match)
                .await?;
            (
                reply,
                Box::new(move |v: &Value, _| format!("{what}: {}", backend_line(v))),
            )
        }
        CtlCommand::Members => (
            client.call(Method::GET, "/api/v1/members", None).await?,
            Box::new(members_table),
        ),
        CtlCommand::Member(cmd) => {
            let (method, path, body, what) = match cmd {
                MemberCommand::Add {
                    id,
                    address,
                    learner,
                } => (
                    Method::POST,
                    "/api/v1/members".to_string(),
                    Some(json!({"id": id, "address": address, "learner": learner})),
                    if *learner {
                        format!("added node {id} ({address}) as a learner")
                    } else {
                        format!(
                            "added node {id} ({address}) as a learner; it becomes a voter once caught up"
                        )
                    },
                ),
                MemberCommand::Promote { id } => (
                    Method::POST,
                    format!("/api/v1/members/{id}/promote"),
                    None,
                    format!("promoted node {id} to voter"),
                ),
                MemberCommand::Remove { id } => (
                    Method::DELETE,
                    format!("/api/v1/members/{id}"),
                    None,
                    format!("removed node {id}"),
                ),
            };
            (
                client.call(method, &path, body).await?,
                Box::new(move |v: &Value, c| format!("{what}\n{}", members_table(v, c))),
            )
        }
        CtlCommand::Leader(LeaderCommand::Transfer { id }) => (
            client
                .call(
                    Method::POST,
                    "/api/v1/leader/transfer",
                    Some(json!({ "to": id })),
                )
                .await?,
            Box::new(|v: &Value, _| transfer_line(v)),
        ),
        CtlCommand::Raft(RaftCommand::MoveLeader { id }) => (
            client
                .call(
                    Method::POST,
                    "/api/v1/raft/move-leader",
                    Some(json!({ "to": id })),
                )
                .await?,
            Box::new(|v: &Value, _| format!("Raft leadership moved to node {}\n", text(&v["to"]))),
        ),
        CtlCommand::Config(ConfigCommand::Get { local }) => {
            let path = if *local {
                "/api/v1/config?consistency=local"
            } else {
                "/api/v1/config"
            };
            let reply = client.call(Method::GET, path, None).await?;
            // The YAML as it came for people; as data for -o json|yaml.
            let data = match (&reply, args.output) {
                (Value::String(yaml), Output::Json | Output::Yaml) => {
                    serde_saphyr::from_str::<Value>(yaml).map_err(|e| {
                        CtlError::Failed(format!("the server sent a config that is not YAML: {e}"))
                    })?
                }
                _ => reply,
            };
            (data, Box::new(|v: &Value, _| text_body(v)))
        }
        CtlCommand::Snapshot(CtlSnapshotCommand::Save { file }) => {
            let bytes = client.download("/api/v1/snapshot").await?;
            let (backup, sum) = crate::store::backup::Backup::verify(&bytes)
                .map_err(|e| CtlError::Failed(format!("the server sent a damaged backup: {e}")))?;
            write_file(file, &bytes).map_err(CtlError::Failed)?;
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
                Box::new(|v: &Value, _| saved_line(v)),
            )
        }
        CtlCommand::Config(ConfigCommand::Apply { file, if_version }) => {
            let yaml = std::fs::read_to_string(file)
                .map_err(|e| CtlError::Usage(format!("{}: {e}", file.display())))?;
            // Checked here first, so the errors name the file, line and column, and
            // nothing is sent (the replica checks again, naming its request body).
            crate::config::parse_pools(&yaml, &file.display().to_string())
                .map_err(|e| CtlError::Usage(e.to_string()))?;
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
                Box::new(|v: &Value, _| version_line(v)),
            )
        }
    };
    Ok((render(args.output, &reply, &*table), true))
}

fn render(output: Output, reply: &Value, table: &dyn Fn(&Value, bool) -> String) -> String {
    match output {
        Output::Table => table(reply, colour()),
        Output::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(reply).unwrap_or_default()
        ),
        Output::Yaml => serde_saphyr::to_string(reply).unwrap_or_default(),
    }
}

/// `ctl endpoint status`: every --server's status at once, one row each; the rows
/// that could not be read say why. Complete only when every server answered.
async fn endpoint_status(args: &CtlArgs) -> Result<(String, bool), CtlError> {
    if args.server.is_empty() {
        return Err(CtlError::Usage("--server: give at least one URL".into()));
    }
    let clients = args
        .server
        .iter()
        .map(|s| Client::new(s, args).map(|c| (s.clone(), c)))
        .collect::<Result<Vec<_>, _>>()?;
    let answers = futures_util::future::join_all(clients.iter().map(|(server, client)| async {
        let status = client.call(Method::GET, "/api/v1/status", None).await;
        (server.clone(), status)
    }))
    .await;
    let complete = answers.iter().all(|(_, a)| a.is_ok());
    let rows: Vec<Value> = answers
        .into_iter()
        .map(|(endpoint, answer)| match answer {
            Ok(status) => endpoint_row(&endpoint, &status),
            // `errors` is a list in every row, so a script's `errors | length` finds it.
            Err(CtlError::Failed(e) | CtlError::Usage(e)) => {
                json!({"endpoint": endpoint, "error": e, "errors": [e]})
            }
        })
        .collect();
    let reply = Value::Array(rows);
    Ok((render(args.output, &reply, &endpoint_table), complete))
}

/// One endpoint's row (also its `-o json` object).
fn endpoint_row(endpoint: &str, status: &Value) -> Value {
    let cluster = &status["cluster"];
    let id = status["node"]["id"].clone();
    let raft_role = if cluster.is_null() {
        Value::Null
    } else {
        cluster["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["id"] == id)
            .map_or(Value::Null, |m| m["role"].clone())
    };
    let mut errors: Vec<String> = status["config_apply_errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    if !cluster.is_null() && cluster["quorum_reachable"] != true {
        errors.push("quorum not reachable".into());
    }
    json!({
        "endpoint": endpoint,
        "node_id": id,
        "name": status["node"]["name"],
        "version": status["node"]["version"],
        "role": status["role"],
        "raft_role": raft_role,
        "raft_term": cluster["term"],
        "leader_id": cluster["leader_id"],
        "raft_applied_index": cluster["applied_index"],
        "config_version": status["config_version"],
        "lease_epoch": status["lease"]["epoch"],
        "errors": errors,
    })
}

fn endpoint_table(v: &Value, colour: bool) -> String {
    let rows: Vec<Vec<(String, Tone)>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let errors = match (&r["error"], r["errors"].as_array()) {
                (Value::String(e), _) => (e.clone(), Tone::Bad),
                (_, Some(list)) if !list.is_empty() => (
                    list.iter().map(text).collect::<Vec<_>>().join("; "),
                    Tone::Bad,
                ),
                _ => (String::new(), Tone::Plain),
            };
            vec![
                plain(&r["endpoint"]),
                plain(&r["node_id"]),
                plain(&r["name"]),
                cell(&r["role"]),
                cell(&r["raft_role"]),
                plain(&r["raft_term"]),
                plain(&r["leader_id"]),
                plain(&r["raft_applied_index"]),
                plain(&r["config_version"]),
                errors,
            ]
        })
        .collect();
    table(
        &[
            "ENDPOINT",
            "NODE ID",
            "NAME",
            "ROLE",
            "RAFT ROLE",
            "RAFT TERM",
            "LEADER",
            "APPLIED",
            "CONFIG VERSION",
            "ERRORS",
        ],
        &rows,
        colour,
    )
}

/// What a backend command changed, for the line it prints.
fn backend_change(cmd: &BackendCommand) -> String {
    match cmd {
        BackendCommand::Add { pool, name, .. } => format!("added {pool}/{name}"),
        BackendCommand::Remove { pool, name } => format!("removed {pool}/{name}"),
        BackendCommand::Drain { pool, name } => format!("drained {pool}/{name}"),
        BackendCommand::Undrain { pool, name } => format!("undrained {pool}/{name}"),
        BackendCommand::Weight { pool, name, .. } => {
            let weight = cmd.weight().unwrap_or_default();
            format!("set the weight of {pool}/{name} to {weight}")
        }
    }
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
        BackendCommand::Weight { pool, name, .. } => (
            Method::PATCH,
            path(pool, name),
            Some(json!({"weight": cmd.weight()})),
        ),
    }
}

/// What a 2xx answer of raftlb's admin API carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// JSON (or YAML for `GET /api/v1/config`).
    Document,
    /// A backup stream.
    Bytes,
}

struct Client {
    /// The URL as given, for messages.
    url: String,
    authority: String,
    token: Option<String>,
    /// For https:// servers: the TLS client and the name to verify.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
}

impl Client {
    fn new(server: &str, args: &CtlArgs) -> Result<Client, CtlError> {
        let uri: Uri = server
            .parse()
            .map_err(|e| CtlError::Usage(format!("--server {server:?}: not a URL: {e}")))?;
        // Requests go to /api/v1/... on the server: a path here would be dropped.
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(CtlError::Usage(format!(
                "--server {server:?}: give scheme://host:port without a path, e.g. http://127.0.0.1:9090"
            )));
        }
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
                    "--server {server:?}: use http://HOST:PORT or https://HOST:PORT"
                )));
            }
        };
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| CtlError::Usage(format!("--server {server:?}: no host:port")))?;
        let token = match &args.token_file {
            Some(file) => {
                let token = std::fs::read_to_string(file)
                    .map_err(|e| CtlError::Usage(format!("--token-file {}: {e}", file.display())))?
                    .trim()
                    .to_string();
                if token.is_empty() {
                    return Err(CtlError::Usage(format!(
                        "--token-file {}: the file is empty: give the file admin.token_file names",
                        file.display()
                    )));
                }
                Some(token)
            }
            None => None,
        };
        Ok(Client {
            url: format!(
                "{}://{authority}",
                if tls.is_some() { "https" } else { "http" }
            ),
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
    /// when it is YAML, like the answer of `config get`).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: String,
        content_type: &str,
        if_match: Option<String>,
    ) -> Result<Value, CtlError> {
        let bytes = self
            .exchange(method, path, body, content_type, if_match, Expect::Document)
            .await?;
        Ok(serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())))
    }

    /// A GET whose successful answer is raw bytes (a backup).
    async fn download(&self, path: &str) -> Result<Bytes, CtlError> {
        self.exchange(
            Method::GET,
            path,
            String::new(),
            "application/json",
            None,
            Expect::Bytes,
        )
        .await
    }

    /// One HTTP/1.1 exchange, bounded by [`TIMEOUT`]: the body of a 2xx answer, the
    /// server's error otherwise; what was reached and what to try when it is not
    /// raftlb's admin API.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: String,
        content_type: &str,
        if_match: Option<String>,
        expect: Expect,
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
        let url = &self.url;
        let exchange = async {
            let stream = TcpStream::connect(&self.authority).await.map_err(|e| {
                format!(
                    "cannot reach {url}: {}: is raftlb running? set --server or RAFTLB_SERVER to its admin API (admin.bind)",
                    connect_error(&e)
                )
            })?;
            match &self.tls {
                None => http(stream, request).await.map_err(|e| not_http(url, &e)),
                Some((connector, name)) => {
                    let stream = match connector.connect(name.clone(), stream).await {
                        Ok(s) => s,
                        Err(e) => return Err(self.tls_failed(&e).await),
                    };
                    http(stream, request).await.map_err(|e| not_http(url, &e))
                }
            }
        };
        let (status, kind, bytes) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| {
                CtlError::Failed(format!(
                    "{url} did not answer within {TIMEOUT:?}: is it raftlb's admin API (admin.bind)?"
                ))
            })?
            .map_err(CtlError::Failed)?;
        let raftlb = match expect {
            _ if !status.is_success() => kind.starts_with("application/json"),
            Expect::Document => {
                kind.starts_with("application/json") || kind.starts_with("application/yaml")
            }
            Expect::Bytes => kind.starts_with("application/octet-stream"),
        };
        if !raftlb {
            return Err(CtlError::Failed(format!(
                "{url} answered {method} {path} with HTTP {} ({}), which is not raftlb's admin API: set --server or RAFTLB_SERVER to a replica's admin.bind address",
                status.as_u16(),
                if kind.is_empty() {
                    "no content type"
                } else {
                    kind.as_str()
                },
            )));
        }
        if !status.is_success() {
            return Err(self.failure(&method, path, status, &bytes));
        }
        Ok(bytes)
    }

    /// Why the TLS handshake failed, in words: a plain-HTTP admin API (no admin.tls)
    /// is told apart by asking it over plain HTTP.
    async fn tls_failed(&self, e: &std::io::Error) -> String {
        let plain = format!("http://{}", self.authority);
        let probe = async {
            let stream = TcpStream::connect(&self.authority).await.ok()?;
            let request = Request::builder()
                .uri("/healthz")
                .header(HOST, &self.authority)
                .body(Full::new(Bytes::new()))
                .ok()?;
            http(stream, request).await.ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(3), probe).await {
            return format!(
                "{} speaks plain HTTP, not HTTPS (the admin API has no admin.tls): use --server {plain}",
                self.url
            );
        }
        let reason = e.to_string();
        if reason.contains("UnknownIssuer") || reason.contains("certificate") {
            format!(
                "{} presented a certificate this client does not trust ({}): pass the CA that signed admin.tls's certificate with --cacert",
                self.url,
                reason.trim_start_matches("invalid peer certificate: ")
            )
        } else {
            format!(
                "{} did not complete a TLS handshake ({reason}): is it raftlb's admin API with admin.tls? for a plain admin API use {plain}",
                self.url
            )
        }
    }

    /// A refused request: the server's `{"error": ...}`, with a hint for a 401.
    fn failure(&self, method: &Method, path: &str, status: StatusCode, body: &[u8]) -> CtlError {
        CtlError::Failed(refusal(method, path, status, body, self.token.is_some()))
    }
}

/// The line for a refused request: the server's `{"error": ...}`, with what to do
/// next where the answer says more (a missing token, an unknown outcome, a read
/// that has a local answer).
fn refusal(method: &Method, path: &str, status: StatusCode, body: &[u8], token: bool) -> String {
    let value: Value = serde_json::from_slice(body).unwrap_or_default();
    let mut message = value["error"].as_str().map_or_else(
        || String::from_utf8_lossy(body).into_owned(),
        str::to_string,
    );
    if status == StatusCode::UNAUTHORIZED && !token {
        message.push_str(" (this server has admin.token_file set: pass --token-file FILE)");
    }
    // A write whose fate is not known: what to compare before trying again.
    if let Some(outcome) = value["outcome"].as_str() {
        message.push_str(&format!(" (outcome: {outcome}"));
        if let Some(version) = value["config_version"].as_u64() {
            message.push_str(&format!(", config_version then: {version}"));
        }
        message.push(')');
    }
    // A read refused for want of a quorum has a local answer.
    if status == StatusCode::SERVICE_UNAVAILABLE
        && *method == Method::GET
        && path == "/api/v1/config"
    {
        message.push_str(" (raftlb ctl config get --local reads this replica's copy)");
    }
    format!("{method} {path}: {} {message}", status.as_u16())
}

/// A failed connect in words.
fn connect_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::TimedOut => "connection timed out".into(),
        _ => e.to_string(),
    }
}

/// Something answered the connection but not with HTTP: a peer port, a TLS port.
fn not_http(url: &str, e: &str) -> String {
    format!(
        "{url} accepted the connection but did not answer HTTP ({e}): it may be a raftlb peer port (cluster.bind) or a TLS port; the admin API is admin.bind, https:// when it has admin.tls"
    )
}

/// One HTTP/1.1 request and its whole answer over `stream`: status, content type, body.
async fn http<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, String, Bytes), String>
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
    let kind = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, kind, bytes))
}

/// The largest answer read (a backup of a big store fits).
const MAX_ANSWER: usize = 1 << 30;

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

fn status_table(v: &Value, colour: bool) -> String {
    let mut out = String::new();
    let node = &v["node"];
    let _ = writeln!(
        out,
        "node            {} (id {}, version {})",
        text(&node["name"]),
        text(&node["id"]),
        text(&node["version"])
    );
    let role = text(&v["role"]);
    let _ = writeln!(out, "role            {}", paint(&role, tone(&role), colour));
    if let Some(why) = v["not_serving_because"].as_str() {
        let _ = writeln!(
            out,
            "serving         {}",
            paint(&format!("no: {why}"), Tone::Bad, colour)
        );
    }
    let _ = writeln!(out, "config_version  {}", text(&v["config_version"]));
    for e in v["config_apply_errors"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "apply error     {}",
            paint(&text(e), Tone::Bad, colour)
        );
    }
    let cluster = &v["cluster"];
    if cluster.is_null() {
        let _ = writeln!(out, "cluster         none (standalone)");
    } else {
        if cluster["waiting_for_peers"] == true {
            let _ = writeln!(
                out,
                "cluster         {} not formed yet: waiting for a quorum of its peers to answer",
                text(&cluster["cluster_id"])
            );
        } else {
            let _ = writeln!(
                out,
                "cluster         {} leader {} term {} commit {} quorum {} of {} voters, fault tolerance {} ({} reachable, {} now)",
                text(&cluster["cluster_id"]),
                text(&cluster["leader_id"]),
                text(&cluster["term"]),
                text(&cluster["commit_index"]),
                text(&cluster["quorum"]),
                text(&cluster["voters"]),
                text(&cluster["fault_tolerance"]),
                text(&cluster["voters_reachable"]),
                text(&cluster["fault_tolerance_now"])
            );
            let _ = writeln!(
                out,
                "quorum          {}",
                if cluster["quorum_reachable"] == true {
                    paint("reachable", Tone::Good, colour)
                } else {
                    paint("NOT reachable: writes fail with 503", Tone::Bad, colour)
                }
            );
        }
        out.push_str(&members_table(cluster, colour));
    }
    let lease = &v["lease"];
    if lease.is_null() {
        let _ = writeln!(out, "lease           none (leader election off)");
    } else if lease["holder_id"].is_null() {
        let _ = writeln!(
            out,
            "lease           free (nobody holds it) epoch {}",
            text(&lease["epoch"])
        );
    } else {
        // As this replica sees it: what it waits out after the last renew it saw.
        // A server older than `waited_out_ms` gives its own lease_duration only.
        let waited = match &lease["waited_out_ms"] {
            Value::Null => &lease["lease_duration_ms"],
            w => w,
        };
        let expiry = match (lease["renewed_ms_ago"].as_u64(), waited.as_u64()) {
            (Some(ago), Some(duration)) if ago < duration => {
                format!("expires in {} ms", duration - ago)
            }
            (Some(ago), Some(duration)) => format!("expired {} ms ago", ago - duration),
            _ => "expiry unknown".into(),
        };
        let holder = if lease["handed_over"] == true {
            format!(
                "handed to node {}, not yet taken (nobody serves until it does):",
                text(&lease["holder_id"])
            )
        } else {
            format!(
                "holder {} (node {})",
                text(&lease["holder"]),
                text(&lease["holder_id"])
            )
        };
        let _ = writeln!(
            out,
            "lease           {holder} epoch {} renewed {} ms ago, lease {} ms, {expiry}",
            text(&lease["epoch"]),
            text(&lease["renewed_ms_ago"]),
            text(waited)
        );
    }
    if !v["backends"].is_null() {
        out.push_str(&backends_table(&v["backends"], colour));
    }
    out
}

fn backends_table(v: &Value, colour: bool) -> String {
    let mut rows = Vec::new();
    for pool in v["pools"].as_array().into_iter().flatten() {
        for b in pool["backends"].as_array().into_iter().flatten() {
            rows.push(vec![
                plain(&pool["name"]),
                plain(&b["name"]),
                plain(&b["address"]),
                plain(&b["weight"]),
                cell(&b["health"]),
                if b["drained"] == true {
                    ("true".to_string(), Tone::Warn)
                } else {
                    plain(&b["drained"])
                },
                plain(&b["active_connections"]),
                last_check(&b["last_check"]),
            ]);
        }
    }
    table(
        &[
            "POOL",
            "BACKEND",
            "ADDRESS",
            "WEIGHT",
            "HEALTH",
            "DRAINED",
            "CONNS",
            "LAST CHECK",
        ],
        &rows,
        colour,
    )
}

fn backend_line(v: &Value) -> String {
    if v.is_null() || v["address"].is_null() {
        return "ok\n".into();
    }
    format!(
        "{}: weight {}, health {}, drained {}, {} open connections on this replica\n",
        text(&v["address"]),
        text(&v["weight"]),
        text(&v["health"]),
        text(&v["drained"]),
        text(&v["active_connections"])
    )
}

fn last_check(c: &Value) -> (String, Tone) {
    if c.is_null() {
        return ("-".into(), Tone::Plain);
    }
    if c["ok"] == true {
        (format!("ok {} ms", text(&c["latency_ms"])), Tone::Plain)
    } else {
        let error = c["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        (
            format!("fail {} ms{error}", text(&c["latency_ms"])),
            Tone::Bad,
        )
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn members_table(v: &Value, colour: bool) -> String {
    let members = v["members"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<(String, Tone)>> = members
        .iter()
        .map(|m| {
            vec![
                plain(&m["id"]),
                plain(&m["name"]),
                plain(&m["address"]),
                cell(&m["role"]),
                plain(&m["voter"]),
                cell(&m["reachable"]),
            ]
        })
        .collect();
    let mut out = table(
        &["ID", "NAME", "ADDRESS", "ROLE", "VOTER", "REACHABLE"],
        &rows,
        colour,
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lease_line(lease: Value) -> String {
        let out = status_table(&json!({"role": "standby", "lease": lease}), false);
        out.lines()
            .find(|l| l.starts_with("lease"))
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn a_refusal_says_what_to_do_next() {
        let unknown =
            br#"{"error": "not committed within 5s", "outcome": "unknown", "config_version": 90}"#;
        let line = refusal(
            &Method::POST,
            "/api/v1/pools/web/backends/b2/drain",
            StatusCode::SERVICE_UNAVAILABLE,
            unknown,
            true,
        );
        assert_eq!(
            line,
            "POST /api/v1/pools/web/backends/b2/drain: 503 not committed within 5s (outcome: unknown, config_version then: 90)"
        );
        let read = refusal(
            &Method::GET,
            "/api/v1/config",
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error": "no Raft leader right now"}"#,
            true,
        );
        assert!(
            read.ends_with("(raftlb ctl config get --local reads this replica's copy)"),
            "{read}"
        );
        let no_token = refusal(
            &Method::GET,
            "/api/v1/status",
            StatusCode::UNAUTHORIZED,
            br#"{"error": "a token is needed"}"#,
            false,
        );
        assert!(no_token.contains("pass --token-file FILE"), "{no_token}");
        let plain = refusal(&Method::GET, "/x", StatusCode::NOT_FOUND, b"not json", true);
        assert_eq!(plain, "GET /x: 404 not json");
    }

    #[test]
    fn the_lease_line_counts_down_what_a_standby_waits_out() {
        let held = json!({"holder": "lb-2", "holder_id": 2, "epoch": 4, "renewed_ms_ago": 500,
            "lease_duration_ms": 2000, "holder_lease_duration_ms": 3000, "waited_out_ms": 3000});
        assert_eq!(
            lease_line(held.clone()),
            "lease           holder lb-2 (node 2) epoch 4 renewed 500 ms ago, lease 3000 ms, expires in 2500 ms"
        );
        let mut late = held;
        late["renewed_ms_ago"] = json!(3100);
        assert!(lease_line(late).ends_with("expired 100 ms ago"));
        let handed = json!({"holder": null, "holder_id": 3, "handed_over": true, "epoch": 4,
            "renewed_ms_ago": 200, "lease_duration_ms": 2000, "holder_lease_duration_ms": 2000,
            "waited_out_ms": 2000});
        assert_eq!(
            lease_line(handed),
            "lease           handed to node 3, not yet taken (nobody serves until it does): epoch 4 renewed 200 ms ago, lease 2000 ms, expires in 1800 ms"
        );
        let free = json!({"holder": null, "holder_id": null, "epoch": 4, "renewed_ms_ago": 10,
            "lease_duration_ms": 2000, "holder_lease_duration_ms": 2000, "waited_out_ms": 2000});
        assert_eq!(
            lease_line(free),
            "lease           free (nobody holds it) epoch 4"
        );
    }
}
