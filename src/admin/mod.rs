//! The admin HTTP API (hyper): health, readiness, metrics and the status reads.

mod cluster;
mod conns;
mod guard;
mod page;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, ETAG, IF_MATCH};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::balancer::{Backend, UpdateError};
use crate::state::State;
use http_body_util::BodyExt;

type Reply = Response<Full<Bytes>>;

/// How long a client may take over the TLS handshake of the admin API.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a connection may take to send a whole request head, from accept or from
/// its previous response.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The HTTP/1 settings of every admin connection.
fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    builder
}

/// Serves the admin API on `listener` (HTTPS with `tls`, `admin.tls`) until `stop`
/// is cancelled.
pub async fn serve(
    listener: TcpListener,
    tls: Option<crate::tls::Reloading<tokio_rustls::rustls::ServerConfig>>,
    state: Arc<State>,
    stop: CancellationToken,
) {
    let conns = conns::Conns::default();
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (slot, evicted) = conns.admit();
        if evicted {
            tracing::debug!(
                "{} admin connections open: closed the longest idle one",
                conns::MAX_OPEN
            );
        }
        let Some(slot) = slot else {
            tracing::debug!(
                "{} admin connections busy: closing a new one",
                conns::MAX_OPEN
            );
            drop(stream);
            continue;
        };
        let state = state.clone();
        // The certificate as it is now: a renewed one serves the next connection.
        let tls = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.get()));
        // Reached over loopback (a bind on 127.0.0.1, or 0.0.0.0 dialled locally).
        let local = stream.local_addr().is_ok_and(|a| a.ip().is_loopback());
        tokio::spawn(async move {
            let on_request = slot.clone();
            let service = service_fn(move |req| {
                let state = state.clone();
                let slot = on_request.clone();
                async move {
                    slot.busy();
                    let reply = route(&state, req, local).await;
                    slot.idle();
                    Ok::<_, Infallible>(reply)
                }
            });
            let serve = async {
                match tls {
                    None => {
                        http1_builder()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                    Some(tls) => {
                        let stream =
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "admin TLS handshake failed");
                                    return Ok(());
                                }
                                Err(_) => return Ok(()),
                            };
                        http1_builder()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                }
            };
            let served = tokio::select! {
                () = slot.closed.cancelled() => Ok(()),
                served = serve => served,
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// `local`: the request came over loopback (see [`guard::check`]).
async fn route(state: &State, mut req: Request<Incoming>, local: bool) -> Reply {
    let path = req.uri().path().to_string();
    let path = path.as_str();
    let open = matches!(path, "/healthz" | "/readyz" | "/metrics");
    let token = if open { None } else { state.token() };
    let checked = match open {
        true => Ok(()),
        false => guard::check(token.as_deref().map(String::as_str), &req, local),
    };
    if let Err(refusal) = checked {
        tracing::info!(method = %req.method(), path, error = %refusal, "admin request refused");
        return refusal.reply();
    }
    let allow = allowed(path, state.cluster.is_some());
    if req.method() == Method::OPTIONS {
        return match allow {
            Some(methods) => with_allow(text(StatusCode::NO_CONTENT, ""), methods),
            None => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
        };
    }
    // A path that exists answers another method with 405 and what it allows, the
    // same for every endpoint (not a 404 from whichever handler it reached).
    if let Some(methods) = allow
        && !methods.split(", ").any(|m| m == req.method().as_str())
    {
        return with_allow(
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{} is not allowed on {path}: use {methods}", req.method()),
            ),
            methods,
        );
    }
    // HEAD is GET without the body (RFC 9110 9.3.2): hyper leaves the body out of the
    // answer to the HEAD it read, whatever the method is called here.
    if req.method() == Method::HEAD {
        *req.method_mut() = Method::GET;
    }
    let reply = dispatch(state, req, path).await;
    match allow {
        Some(methods) if reply.status() == StatusCode::METHOD_NOT_ALLOWED => {
            with_allow(reply, methods)
        }
        _ => reply,
    }
}

/// The methods `path` answers (for OPTIONS and a 405's `Allow`); `None` when there is
/// no such endpoint (`cluster`: this replica is in cluster mode).
fn allowed(path: &str, cluster: bool) -> Option<&'static str> {
    const READ: &str = "GET, HEAD, OPTIONS";
    let methods = match path {
        "/" | "/status.js" | "/favicon.ico" | "/healthz" | "/readyz" | "/metrics"
        | "/api/v1/status" | "/api/v1/backends" => READ,
        "/api/v1/config" if cluster => "GET, HEAD, PUT, OPTIONS",
        "/api/v1/snapshot" if cluster => READ,
        "/api/v1/members" if cluster => "GET, HEAD, POST, OPTIONS",
        "/api/v1/leader/transfer" | "/api/v1/raft/move-leader" if cluster => "POST, OPTIONS",
        _ => {
            if let Some(rest) = path.strip_prefix("/api/v1/members/").filter(|_| cluster) {
                return match rest.split('/').collect::<Vec<_>>().as_slice() {
                    [_] => Some("DELETE, OPTIONS"),
                    [_, "promote"] => Some("POST, OPTIONS"),
                    _ => None,
                };
            }
            let rest = path.strip_prefix("/api/v1/pools/")?;
            return match rest.split('/').collect::<Vec<_>>().as_slice() {
                [_, "backends"] => Some("POST, OPTIONS"),
                [_, "backends", _] => Some("PATCH, DELETE, OPTIONS"),
                [_, "backends", _, "drain" | "undrain"] => Some("POST, OPTIONS"),
                _ => None,
            };
        }
    };
    Some(methods)
}

fn with_allow(mut reply: Reply, methods: &'static str) -> Reply {
    reply.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(methods),
    );
    reply
}

async fn dispatch(state: &State, req: Request<Incoming>, path: &str) -> Reply {
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => match state.not_ready() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not serving: {why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            if let Some(node) = &state.cluster {
                node.publish_metrics();
            }
            let mut reply = Response::new(Full::new(Bytes::from(crate::metrics::render(
                &state.metrics,
            ))));
            reply.headers_mut().insert(
                CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8"
                    .parse()
                    .expect("static header"),
            );
            reply
        }
        (&Method::GET, "/") => {
            let body = page::render(&status(state), &backends(state));
            let mut reply = with_etag(
                page_reply(body.into(), "text/html; charset=utf-8"),
                state.config_version(),
            );
            if let Ok(csp) = page::csp().parse() {
                reply
                    .headers_mut()
                    .insert(hyper::header::CONTENT_SECURITY_POLICY, csp);
            }
            reply
        }
        (&Method::GET, "/status.js") => page_reply(
            Bytes::from_static(page::SCRIPT.as_bytes()),
            "text/javascript; charset=utf-8",
        ),
        // Browsers ask for it with every page: nothing, rather than a 404 in their console.
        (&Method::GET, "/favicon.ico") => {
            let mut reply = page_reply(Bytes::new(), "image/x-icon");
            *reply.status_mut() = StatusCode::NO_CONTENT;
            reply
        }
        (&Method::GET, "/api/v1/status") => versioned(state, status(state)),
        (&Method::GET, "/api/v1/backends") => versioned(state, backends(state)),
        (
            _,
            "/" | "/status.js" | "/favicon.ico" | "/healthz" | "/readyz" | "/metrics"
            | "/api/v1/status" | "/api/v1/backends",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not allowed on {path}: use GET", req.method()),
        ),
        _ => match (&state.cluster, path) {
            (Some(node), "/api/v1/config") => cluster::config(state, node, req).await,
            (Some(node), "/api/v1/snapshot") => cluster::snapshot(node, req).await,
            (Some(node), "/api/v1/leader/transfer") => {
                cluster::leader_transfer(state, node, req).await
            }
            (Some(node), "/api/v1/raft/move-leader") => {
                cluster::move_leader(state, node, req).await
            }
            (Some(node), _)
                if path == "/api/v1/members" || path.starts_with("/api/v1/members/") =>
            {
                let rest = path.trim_start_matches("/api/v1/members").to_string();
                cluster::members(state, node, req, &rest).await
            }
            (None, _)
                if matches!(
                    path,
                    "/api/v1/config"
                        | "/api/v1/members"
                        | "/api/v1/snapshot"
                        | "/api/v1/leader/transfer"
                        | "/api/v1/raft/move-leader"
                ) || path.starts_with("/api/v1/members/") =>
            {
                error(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "{path} exists in cluster mode only: this replica is standalone (no cluster: section)"
                    ),
                )
            }
            _ => match path.strip_prefix("/api/v1/pools/") {
                Some(rest) => match &state.cluster {
                    Some(node) => cluster::backend_write(state, node, req, rest).await,
                    None => backend_write(state, req, rest).await,
                },
                None => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
            },
        },
    }
}

/// Largest request body the admin API reads.
const MAX_BODY: usize = 1 << 20;

/// `/api/v1/pools/{pool}/backends[/{name}[/drain|/undrain]]`. In standalone mode the
/// file is the source of truth: drain, undrain and weight are runtime state until the
/// next reload (like HAProxy's runtime API); adding or removing backends is refused.
async fn backend_write(state: &State, req: Request<Incoming>, rest: &str) -> Reply {
    let parts: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    let standalone = "standalone: edit the file and send SIGHUP";
    let (pool, name) = match (&method, parts.as_slice()) {
        (&Method::POST, [_, "backends"]) => return error(StatusCode::CONFLICT, standalone),
        (&Method::DELETE, [_, "backends", _]) => return error(StatusCode::CONFLICT, standalone),
        (_, [pool, "backends", name] | [pool, "backends", name, "drain" | "undrain"]) => {
            (*pool, *name)
        }
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: /api/v1/pools/{rest}"),
            );
        }
    };
    let if_version = match if_match(state, &req) {
        Ok(v) => v,
        Err(reply) => return *reply,
    };
    let result = match (&method, parts.get(3).copied()) {
        (&Method::POST, Some(action)) => {
            if let Err(reply) = no_body(req, action).await {
                return reply;
            }
            let drain = action == "drain";
            state
                .balancer
                .update_backend(pool, name, if_version, |b| b.drained = drain)
                .await
        }
        (&Method::PATCH, None) => {
            let weight = match read_weight(req).await {
                Ok(w) => w,
                Err(reply) => return reply,
            };
            state
                .balancer
                .update_backend(pool, name, if_version, |b| b.weight.value = weight)
                .await
        }
        _ => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!(
                    "{method} is not allowed here: use POST .../drain or .../undrain, or PATCH with {{\"weight\": N}}"
                ),
            );
        }
    };
    match result {
        Ok(version) => {
            tracing::info!(
                pool,
                backend = name,
                config_version = version,
                "{method} {rest}: applied (runtime state until the next reload)"
            );
            let snapshot = state.balancer.snapshot();
            let backend = snapshot
                .pools
                .get(pool)
                .and_then(|p| p.backends.iter().find(|b| &*b.name == name));
            versioned(state, backend.map_or(Value::Null, backend_json))
        }
        Err(e @ (UpdateError::NoPool(_) | UpdateError::NoBackend { .. })) => {
            error(StatusCode::NOT_FOUND, &e.to_string())
        }
        Err(UpdateError::Stale { if_version, now }) => stale(if_version, now),
        Err(UpdateError::Apply(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightPatch {
    weight: u32,
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes; a 4xx reply when it is not `T`.
/// The body of `PATCH .../backends/{name}`: `{"weight": N}`, N from 1 to 256.
async fn read_weight(req: Request<Incoming>) -> Result<u32, Reply> {
    let weight = read_json::<WeightPatch>(req).await?.weight;
    if !(1..=256).contains(&weight) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            &format!("weight {weight} is out of range: use 1 to 256"),
        ));
    }
    Ok(weight)
}

/// The request's body, at most [`MAX_BODY`] bytes (413 beyond).
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    Ok(http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("cannot read the body: {e}"),
            )
        })?
        .to_bytes())
}

/// A JSON object body as `T` (a sequence, which serde would also take for a
/// struct, is refused).
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
    let body = read_body(req).await?;
    let invalid = |e: String| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}"));
    let value: Value = from_json(&body).map_err(|e| invalid(e.to_string()))?;
    if !value.is_object() {
        return Err(invalid(format!(
            "{value} is not a JSON object: send {{\"key\": value, ...}}"
        )));
    }
    serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
}

/// POST .../drain and .../undrain take no body: an empty one, or `{}`.
async fn no_body(req: Request<Incoming>, action: &str) -> Result<(), Reply> {
    let body = read_body(req).await?;
    let empty = body.iter().all(u8::is_ascii_whitespace)
        || serde_json::from_slice::<serde_json::Map<String, Value>>(&body)
            .is_ok_and(|m| m.is_empty());
    match empty {
        true => Ok(()),
        false => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("POST .../{action} takes no body (or {{}})"),
        )),
    }
}

/// A JSON body, refused when any object in it has a key twice (serde_json keeps the
/// last one silently, where the config file's YAML reader refuses the duplicate).
fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice::<UniqueKeys>(body)?;
    serde_json::from_slice(body)
}

/// Any JSON value whose objects have no key twice; nothing is kept.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<UniqueKeys>()?;
            if seen.contains(&key) {
                return Err(serde::de::Error::custom(format!(
                    "key {key:?} appears twice in one object"
                )));
            }
            seen.insert(key);
        }
        Ok(UniqueKeys)
    }
}

fn status(state: &State) -> Value {
    let errors = state
        .apply_errors
        .lock()
        .map(|e| e.clone())
        .unwrap_or_default();
    let election = state.election_status();
    json!({
        "node": {
            "name": state.node_name,
            "id": state.cluster.as_ref().map(|n| n.id),
            "version": env!("CARGO_PKG_VERSION"),
        },
        "role": state.role().as_str(),
        // Whether this replica accepts on its listeners now, and if not, why.
        "serving": state.is_ready(),
        "not_serving_because": state.not_ready(),
        "config_version": state.config_version(),
        "config_apply_errors": errors,
        "cluster": state.cluster.as_ref().map_or(Value::Null, |n| cluster::status(n)),
        "lease": election.as_ref().map_or(Value::Null, lease_json),
        // Rule 7's reason while the role is fault.
        "fault": election.and_then(|s| s.fault),
    })
}

/// SPEC.md's `lease` of `/api/v1/status`, with the record's epoch and version.
fn lease_json(s: &crate::election::Status) -> Value {
    let r = &s.record;
    let ms = crate::clock::millis;
    // What a standby waits out after the last renew it saw (rule 3): the longer
    // of its own lease_duration and the one the holder wrote.
    let waits = s
        .lease_duration
        .max(std::time::Duration::from_millis(r.lease_duration_ms));
    // Handed over: the successor has not written its name yet.
    let handed_over = r.handed_over();
    json!({
        "holder_id": r.holder,
        "holder": if r.holder.is_some() && !handed_over { Value::from(r.holder_name.clone()) } else { Value::Null },
        "handed_over": handed_over,
        "epoch": r.epoch,
        "version": r.version,
        "renewed_ms_ago": ms(s.renewed_ago()),
        "lease_duration_ms": ms(s.lease_duration),
        "holder_lease_duration_ms": r.lease_duration_ms,
        "waited_out_ms": ms(waits),
        "acquired_at": wall_time(r.acquire_time_ms),
        "renewed_at": wall_time(r.renew_time_ms),
        "this_replica_epoch": s.epoch,
    })
}

/// A wall-clock time of the lease record (display only), RFC 3339.
fn wall_time(ms: u64) -> Value {
    if ms == 0 {
        return Value::Null;
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    Value::from(humantime::format_rfc3339_millis(at).to_string())
}

fn backends(state: &State) -> Value {
    let snapshot = state.balancer.snapshot();
    let mut pools: Vec<_> = snapshot.pools.values().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let pools: Vec<Value> = pools
        .iter()
        .map(|p| {
            let backends: Vec<Value> = p.backends.iter().map(backend_json).collect();
            json!({"name": &*p.name, "balance": p.balance, "backends": backends})
        })
        .collect();
    json!({"config_version": snapshot.version, "pools": pools})
}

fn backend_json(b: &Backend) -> Value {
    let detail = b.state.detail.lock().map(|d| d.clone()).unwrap_or_default();
    let last_check = detail.last_check.map(|c| {
        json!({
            "ok": c.ok,
            "latency_ms": (c.latency.as_secs_f64() * 1e4).round() / 10.0,
            "at": humantime::format_rfc3339_millis(c.at).to_string(),
            "error": c.error,
        })
    });
    json!({
        "name": &*b.name,
        "address": b.address.to_string(),
        "resolved": b.state.addrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "weight": b.weight,
        "health": b.state.health().as_str(),
        "drained": b.drained,
        "active_connections": b.active(),
        "bytes": {
            "to_backend": b.state.bytes_to_backend.load(std::sync::atomic::Ordering::Relaxed),
            "to_client": b.state.bytes_to_client.load(std::sync::atomic::Ordering::Relaxed),
        },
        "last_check": last_check,
        "consecutive_ok": detail.probes.ok_run,
        "consecutive_fail": detail.probes.fail_run,
        "passive_failures": detail.passive_failures,
        "last_flip": detail.last_flip.map(|t| humantime::format_rfc3339_millis(t).to_string()),
    })
}

fn versioned(state: &State, body: Value) -> Reply {
    with_etag(json_reply(StatusCode::OK, &body), state.config_version())
}

/// The config_version a write's `If-Match` names (`None`: no header, or `*`, which
/// any version matches: RFC 9110 13.1.1). Every write that answers an ETag takes it.
fn if_match(state: &State, req: &Request<Incoming>) -> Result<Option<u64>, Box<Reply>> {
    match req.headers().get(IF_MATCH).map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(v)) if v.trim() == "*" => Ok(None),
        // If-Match compares strongly: a weak tag never matches.
        Some(Ok(v)) if v.trim().starts_with("W/") => Err(Box::new(with_etag(
            error(
                StatusCode::PRECONDITION_FAILED,
                &format!(
                    "If-Match {v:?} is a weak ETag, which never matches; use the ETag of a read, e.g. \"7\""
                ),
            ),
            state.config_version(),
        ))),
        Some(Ok(v)) => v
            .trim()
            .trim_matches('"')
            .parse::<u64>()
            .map(Some)
            .map_err(|_| {
                Box::new(error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "If-Match {v:?} is not a config_version: use the ETag of a read, e.g. \"7\""
                    ),
                ))
            }),
        Some(Err(_)) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "If-Match is not text",
        ))),
    }
}

/// 412 for an `If-Match` that names another config_version than `now`.
fn stale(if_version: u64, now: u64) -> Reply {
    refusal(
        412,
        &crate::store::types::stale_version(if_version, now),
        now,
    )
}

/// A write refused with `status` (the state machine's, or this replica's), with the
/// config_version it was judged against as `ETag`, so a client can retry on it.
fn refusal(status: u16, message: &str, config_version: u64) -> Reply {
    with_etag(
        error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::CONFLICT),
            message,
        ),
        config_version,
    )
}

/// `ETag: "<config_version>"`.
fn with_etag(mut reply: Reply, config_version: u64) -> Reply {
    if let Ok(etag) = format!("\"{config_version}\"").parse() {
        reply.headers_mut().insert(ETAG, etag);
    }
    reply
}

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    reply
}

fn error(status: StatusCode, message: &str) -> Reply {
    json_reply(status, &json!({ "error": message }))
}

/// The status page or its script: never cached, never sniffed, never framed.
fn page_reply(body: Bytes, content_type: &'static str) -> Reply {
    let mut reply = Response::new(Full::new(body));
    let headers = reply.headers_mut();
    headers.insert(CONTENT_TYPE, content_type.parse().expect("static header"));
    headers.insert(
        hyper::header::CACHE_CONTROL,
        "no-store".parse().expect("static header"),
    );
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().expect("static header"),
    );
    headers.insert(
        hyper::header::X_FRAME_OPTIONS,
        "DENY".parse().expect("static header"),
    );
    reply
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut reply = Response::new(Full::new(body.into()));
    *reply.status_mut() = status;
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::election::Status;
    use crate::election::hooks::Role;
    use crate::store::types::Lease;
    use std::time::Duration;

    fn status(own: Duration, holders_ms: u64) -> Status {
        Status {
            role: Role::Standby,
            epoch: 0,
            record: Lease {
                holder: Some(2),
                lease_duration_ms: holders_ms,
                ..Lease::default()
            },
            observed_at: crate::clock::now(),
            lease_duration: own,
            fault: None,
        }
    }

    #[test]
    fn a_json_body_with_a_key_twice_in_one_object_is_refused() {
        let parse = |body: &str| from_json::<Value>(body.as_bytes()).map_err(|e| e.to_string());
        let twice = parse(r#"{"pools": {"p1": {"backends": []}, "p1": {"backends": []}}}"#);
        assert_eq!(
            twice.err().as_deref(),
            Some(r#"key "p1" appears twice in one object at line 1 column 58"#)
        );
        let nested = parse(r#"[{"a": 1}, {"b": {"c": 1, "c": 2}}]"#);
        assert!(nested.is_err_and(|e| e.contains(r#"key "c""#)));
        // The same key in different objects, and every kind of value, are fine.
        let fine = parse(r#"{"a": {"x": 1}, "b": {"x": [true, null, -1, 2.5, "s", {"x": 0}]}}"#);
        assert_eq!(fine.expect("valid")["b"]["x"][5]["x"], 0);
    }

    #[test]
    fn a_standby_waits_out_the_longer_of_its_own_lease_and_the_holders() {
        let holder_longer = lease_json(&status(Duration::from_secs(2), 3000));
        assert_eq!(holder_longer["lease_duration_ms"], 2000);
        assert_eq!(holder_longer["holder_lease_duration_ms"], 3000);
        assert_eq!(holder_longer["waited_out_ms"], 3000);
        let own_longer = lease_json(&status(Duration::from_secs(5), 3000));
        assert_eq!(own_longer["waited_out_ms"], 5000);
    }
}
