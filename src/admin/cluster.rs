//! Cluster-mode admin API: writes committed through Raft (forwarded to the leader by
//! the replica itself), the replicated config, membership, and the cluster status.

use std::collections::BTreeMap;

use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, StatusCode};
use serde_json::{Value, json};

use super::{Reply, error, json_reply, read_json, versioned, with_etag};
use crate::config::schema;
use crate::state::State;
use crate::store::backup::Backup;
use crate::store::network::Manage;
use crate::store::storage::Applied;
use crate::store::types::{Command, Outcome};
use crate::store::{Node, WriteError};

/// The replicated part of the config: what `PUT /api/v1/config` takes and
/// `GET /api/v1/config` returns. Listeners are node-local, each replica's own file.
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Replicated {
    pools: BTreeMap<String, schema::Pool>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackend {
    name: String,
    address: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    drained: bool,
}

fn one() -> u32 {
    1
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMember {
    id: u64,
    address: String,
    #[serde(default)]
    learner: bool,
}

/// Answers a write's result: 200 (or `created`) with the config_version as ETag, the
/// state machine's refusal with its status, 503 when there is no quorum.
async fn written(state: &State, result: Result<Outcome, WriteError>, created: StatusCode) -> Reply {
    match result {
        Ok(Outcome::Applied { config_version }) => {
            // Read-your-writes on this replica: its status and proxy show the write.
            until_applied(state, config_version).await;
            with_etag(
                json_reply(created, &json!({"config_version": config_version})),
                config_version,
            )
        }
        Ok(Outcome::Record { version }) => json_reply(created, &json!({"version": version})),
        Ok(Outcome::Lease { won, lease }) => json_reply(
            if won { created } else { StatusCode::CONFLICT },
            &json!({"lease": lease}),
        ),
        // With the version the refusal was judged against (what a 412 needs to retry).
        Ok(Outcome::Refused { status, error: e }) => {
            super::refusal(status, &e, state.config_version())
        }
        Err(WriteError::Invalid(e)) => error(StatusCode::BAD_REQUEST, &e),
        Err(WriteError::NotProposed(e)) => json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": e, "outcome": "not_proposed"}),
        ),
        Err(WriteError::Unknown(e)) => json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({
                "error": format!("{e}; the write may still commit: check config_version before retrying (If-Match makes a retry safe)"),
                "outcome": "unknown",
                "config_version": state.config_version(),
            }),
        ),
    }
}

/// `/api/v1/pools/{pool}/backends[/{name}[/drain|/undrain]]` in cluster mode.
pub async fn backend_write(
    state: &State,
    node: &Node,
    req: Request<Incoming>,
    rest: &str,
) -> Reply {
    let parts: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    let if_version = match super::if_match(state, &req) {
        Ok(v) => v,
        Err(reply) => return *reply,
    };
    let (command, created) = match (&method, parts.as_slice()) {
        (&Method::POST, [pool, "backends"]) => {
            let new = match read_json::<NewBackend>(req).await {
                Ok(b) => b,
                Err(reply) => return reply,
            };
            let backend = match backend_from(&new) {
                Ok(b) => b,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            (
                Command::AddBackend {
                    pool: pool.to_string(),
                    backend,
                },
                StatusCode::CREATED,
            )
        }
        (&Method::DELETE, [pool, "backends", name]) => (
            Command::RemoveBackend {
                pool: pool.to_string(),
                backend: name.to_string(),
            },
            StatusCode::OK,
        ),
        (&Method::PATCH, [pool, "backends", name]) => {
            let weight = match super::read_weight(req).await {
                Ok(w) => w,
                Err(reply) => return reply,
            };
            (
                Command::SetWeight {
                    pool: pool.to_string(),
                    backend: name.to_string(),
                    weight,
                },
                StatusCode::OK,
            )
        }
        (&Method::POST, [pool, "backends", name, action @ ("drain" | "undrain")]) => {
            if let Err(reply) = super::no_body(req, action).await {
                return reply;
            }
            (
                Command::SetDrained {
                    pool: pool.to_string(),
                    backend: name.to_string(),
                    drained: *action == "drain",
                },
                StatusCode::OK,
            )
        }
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {method} /api/v1/pools/{rest}"),
            );
        }
    };
    tracing::info!(%command, "admin write");
    let (pool, name) = match &command {
        Command::AddBackend { pool, backend } => (pool.clone(), backend.name.value.clone()),
        Command::RemoveBackend { pool, backend }
        | Command::SetWeight { pool, backend, .. }
        | Command::SetDrained { pool, backend, .. } => (pool.clone(), backend.clone()),
        _ => return written(state, node.write(command).await, created).await,
    };
    let command = match if_version {
        None => command,
        Some(v) => match guarded(node, command, v).await {
            Ok(c) => c,
            Err(reply) => return reply,
        },
    };
    // A removed backend is answered as it was just before (what the write removed).
    let before = backend_now(state, &pool, &name);
    match node.write(command).await {
        Ok(Outcome::Applied { config_version }) => {
            let body = if method == Method::DELETE {
                until_applied(state, config_version).await;
                before
            } else {
                applied_backend(state, config_version, &pool, &name).await
            };
            let body = body.unwrap_or_else(|| json!({"name": name, "pool": pool}));
            with_etag(json_reply(created, &body), config_version)
        }
        other => written(state, other, created).await,
    }
}

/// A backend write with `If-Match: "v"`, made the compare-and-set that a config PUT
/// is: the pools at config_version `v` with the change made, committed only if the
/// config_version still is `v` then. A replica behind `v` waits for it a bounded time;
/// past it (or a `v` never reached), the answer is 412.
async fn guarded(node: &Node, command: Command, v: u64) -> Result<Command, Reply> {
    let mut applied = node.applied();
    let _ = tokio::time::timeout(
        APPLY_WAIT,
        applied.wait_for(|a| a.state.config_version >= v),
    )
    .await;
    let mut at = applied.borrow().state.clone();
    if at.config_version != v {
        return Err(super::stale(v, at.config_version));
    }
    match at.apply(command) {
        Outcome::Applied { .. } => Ok(Command::SetPools {
            pools: (*at.pools).clone(),
            if_version: Some(v),
        }),
        Outcome::Refused { status, error: e } => Err(super::refusal(status, &e, v)),
        other => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("a backend write came out as {other:?}"),
        )),
    }
}

/// The backend as this replica's balancer has it now (the backends API's shape).
fn backend_now(state: &State, pool: &str, name: &str) -> Option<Value> {
    let snapshot = state.balancer.snapshot();
    snapshot
        .pools
        .get(pool)
        .and_then(|p| p.backends.iter().find(|b| &*b.name == name))
        .map(super::backend_json)
}

/// The backend once this replica has applied `config_version` (the same shape as the
/// standalone answer: SPEC.md's "201 + the backend"); waits a bounded time for the
/// local apply, which follows the commit by a moment.
async fn applied_backend(
    state: &State,
    config_version: u64,
    pool: &str,
    name: &str,
) -> Option<Value> {
    until_applied(state, config_version).await;
    backend_now(state, pool, name)
}

/// Waits, a bounded time, until this replica has applied `config_version`, which
/// follows the commit by a moment (on a follower, the leader's next message).
async fn until_applied(state: &State, config_version: u64) {
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    while state.config_version() < config_version && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// How long a backend write waits for this replica to apply what it committed.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A backend as the config file would have it, checked like the file's.
fn backend_from(new: &NewBackend) -> Result<schema::Backend, String> {
    let doc = json!({"name": new.name, "address": new.address, "weight": new.weight, "drained": new.drained});
    let pools = json!({"p": {"backends": [doc]}});
    // Its errors name the field alone ("name: ..."), not the stand-in pool.
    let checked = check_pools(pools).map_err(|e| e.replace("pools.p.backends[0].", ""))?;
    checked
        .pools
        .into_values()
        .next()
        .and_then(|p| p.backends.value.into_iter().next())
        .ok_or_else(|| "no backend in the request".to_string())
}

/// A JSON `PUT /api/v1/config` body, `{"pools": {...}}`, checked like a YAML one
/// (without places: serde_json names line and column of a syntax error itself).
fn check_json_pools(doc: Value) -> Result<Replicated, String> {
    let Value::Object(mut doc) = doc else {
        return Err("the body must be a map with pools:".into());
    };
    if let Some(key) = doc.keys().find(|k| *k != "pools") {
        return Err(format!("{key}: {}", crate::config::NODE_LOCAL));
    }
    let checked = check_pools(doc.remove("pools").unwrap_or(Value::Null))?;
    if checked.pools.is_empty() {
        return Err("pools: define at least one pool".into());
    }
    Ok(checked)
}

/// Validates pools as `raftlb check` would (no file is read: certificate paths are
/// checked by each replica when it applies them).
fn check_pools(pools: Value) -> Result<Replicated, String> {
    let doc = json!({ "pools": pools });
    // A value of the wrong type is named by its whole path, as in a YAML body.
    let doc: Replicated = serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = crate::config::config_path(e.path());
        format!("invalid config: {path}: {}", e.into_inner())
    })?;
    // The same rules as a YAML body's (`config::parse_pools`).
    let pools = crate::config::check_replicated(doc.pools).map_err(|errors| {
        errors
            .iter()
            .map(|i| format!("{}: {}", i.path, i.message))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(Replicated { pools })
}

/// The applied state: through the leader (linearizable) unless the request says
/// `?consistency=local`; any other query is refused.
async fn read(node: &Node, req: &Request<Incoming>) -> Result<Applied, Reply> {
    let mut local = false;
    for kv in req.uri().query().unwrap_or_default().split('&') {
        match kv {
            "" => {}
            "consistency=local" => local = true,
            "consistency=linearizable" => local = false,
            other => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "unknown query {other:?}: use ?consistency=local (this replica's copy) or ?consistency=linearizable (the default)"
                    ),
                ));
            }
        }
    }
    if local {
        return Ok(node.applied().borrow().as_ref().clone());
    }
    // A read changes nothing: its error has no write outcome.
    node.read().await.map_err(|e| {
        json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": e.to_string()}),
        )
    })
}

/// `GET /api/v1/snapshot`: a consistent, checksummed backup (`raftlb ctl snapshot save`).
pub async fn snapshot(node: &Node, req: Request<Incoming>) -> Reply {
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!(
                "{} is not allowed on /api/v1/snapshot: use GET",
                req.method()
            ),
        );
    }
    let applied = match read(node, &req).await {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let version = applied.state.config_version;
    match Backup::new(&node.cluster_id, node.id, applied).encode() {
        Ok(bytes) => {
            let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(bytes)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                "application/octet-stream".parse().expect("static header"),
            );
            with_etag(r, version)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `GET /api/v1/config` (linearizable unless `?consistency=local`) and `PUT`.
pub async fn config(state: &State, node: &Node, req: Request<Incoming>) -> Reply {
    match *req.method() {
        Method::GET => {
            let applied = match read(node, &req).await {
                Ok(a) => a,
                Err(reply) => return reply,
            };
            let version = applied.state.config_version;
            let body = Replicated {
                pools: std::sync::Arc::unwrap_or_clone(applied.state.pools),
            };
            // YAML (what operators edit) unless JSON is asked for; either one goes
            // back through PUT as it is.
            let json = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("application/json") && !a.contains("yaml"));
            if json {
                return match serde_json::to_value(&body) {
                    Ok(v) => with_etag(json_reply(StatusCode::OK, &v), version),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                };
            }
            let reply = match crate::config::to_yaml_value(&body) {
                Ok(yaml) => {
                    // The version on top (a comment: the file still applies as it is).
                    let yaml = format!(
                        "# config_version: {version} (raftlb ctl config apply FILE --if-version {version})\n{yaml}"
                    );
                    let mut r =
                        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(yaml)));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        "application/yaml".parse().expect("static header"),
                    );
                    r
                }
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
            };
            with_etag(reply, applied.state.config_version)
        }
        Method::PUT => {
            let if_match = match super::if_match(state, &req) {
                Ok(v) => v,
                Err(reply) => return *reply,
            };
            let yaml = req
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.contains("yaml"));
            let body = match super::read_body(req).await {
                Ok(b) => b,
                Err(reply) => return reply,
            };
            let checked = if yaml {
                std::str::from_utf8(&body)
                    .map_err(|e| format!("the body is not UTF-8: {e}"))
                    .and_then(|text| {
                        crate::config::parse_pools(text, "request body").map_err(|e| e.to_string())
                    })
                    .map(|pools| Replicated { pools })
            } else {
                super::from_json(&body)
                    .map_err(|e| format!("invalid body: {e}"))
                    .and_then(check_json_pools)
            };
            let checked = match checked {
                Ok(c) => c,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            // What this replica's listeners refuse, the others' most likely do too;
            // each replica checks its own again when it applies the write.
            let mut refused: Vec<String> = checked
                .pools
                .iter()
                .filter_map(|(name, pool)| state.listeners_refuse(name, pool))
                .collect();
            let now = node.applied().borrow().clone();
            refused.extend(state.listeners_left_without(&now.state.pools, &checked.pools));
            if !refused.is_empty() {
                return error(StatusCode::BAD_REQUEST, &refused.join("; "));
            }
            let command = Command::SetPools {
                pools: checked.pools,
                if_version: if_match,
            };
            written(state, node.write(command).await, StatusCode::OK).await
        }
        ref m => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{m} is not allowed on /api/v1/config: use GET or PUT"),
        ),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Target {
    #[serde(default)]
    to: Option<u64>,
}

/// Reads `{"to": N}` (optional unless `required`) from a POST; an empty body is `{}`.
async fn read_target(req: Request<Incoming>, path: &str, required: bool) -> Result<Target, Reply> {
    if req.method() != Method::POST {
        return Err(error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not allowed on {path}: use POST", req.method()),
        ));
    }
    let body = super::read_body(req).await?;
    let target = if body.iter().all(u8::is_ascii_whitespace) {
        Target::default()
    } else {
        super::from_json(&body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))?
    };
    if required && target.to.is_none() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "say which node: {\"to\": ID}",
        ));
    }
    Ok(target)
}

/// `POST /api/v1/leader/transfer {"to": N}`: forwarded to the active, which gives
/// the lease to N (or any standby) in rule 5's order.
pub async fn leader_transfer(state: &State, node: &Node, req: Request<Incoming>) -> Reply {
    let target = match read_target(req, "/api/v1/leader/transfer", false).await {
        Ok(t) => t,
        Err(reply) => return reply,
    };
    tracing::info!(to = ?target.to, "admin: leader transfer");
    match node.transfer_lease(target.to).await {
        Ok(()) => {
            let mut lease = node.applied().borrow().state.lease.clone();
            // Handed over: the name in the record is still the sender's.
            if lease.handed_over() {
                lease.holder_name.clear();
            }
            json_reply(
                StatusCode::OK,
                &json!({"transferred": true, "to": target.to, "lease": lease}),
            )
        }
        Err(e) => written(state, Err(e), StatusCode::OK).await,
    }
}

/// `POST /api/v1/raft/move-leader {"to": N}`: Raft leadership alone (etcdctl's
/// move-leader), e.g. before maintenance.
pub async fn move_leader(state: &State, node: &Node, req: Request<Incoming>) -> Reply {
    let target = match read_target(req, "/api/v1/raft/move-leader", true).await {
        Ok(Target { to: Some(to) }) => to,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "say which node: {\"to\": ID}"),
        Err(reply) => return reply,
    };
    tracing::info!(to = target, "admin: move Raft leadership");
    match node.move_leader(target).await {
        Ok(_) => json_reply(StatusCode::OK, &json!({"moved": true, "to": target})),
        Err(e) => written(state, Err(e), StatusCode::OK).await,
    }
}

/// `/api/v1/members[/{id}[/promote]]`.
pub async fn members(state: &State, node: &Node, req: Request<Incoming>, rest: &str) -> Reply {
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let method = req.method().clone();
    let parse_id = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("{s:?} is not a node id"))
    };
    let op = match (&method, parts.as_slice()) {
        (&Method::GET, []) => return versioned(state, json!({"members": member_list(node)})),
        (&Method::POST, []) => {
            let new = match read_json::<NewMember>(req).await {
                Ok(m) => m,
                Err(reply) => return reply,
            };
            Manage::AddMember {
                id: new.id,
                address: new.address,
                learner: new.learner,
            }
        }
        (&Method::POST, [id, "promote"]) => match parse_id(id) {
            Ok(id) => Manage::Promote { id },
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::DELETE, [id]) => match parse_id(id) {
            Ok(id) => Manage::Remove { id },
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        },
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {method} /api/v1/members/{rest}"),
            );
        }
    };
    // An id that is no member is not found, as an unknown backend is, on every
    // replica. A follower's membership may lag a member added a moment ago, so it
    // first catches up with the leader (a linearizable read) and looks again.
    if let Manage::Promote { id } | Manage::Remove { id } = op {
        let leads = || {
            let metrics = node.metrics();
            metrics.current_leader == Some(node.id) && node.quorum_reachable()
        };
        let unknown = || {
            let metrics = node.metrics();
            let membership = metrics.membership_config.membership();
            membership.get_node(&id).is_none().then(|| {
                membership
                    .nodes()
                    .map(|(id, _)| id.to_string())
                    .collect::<Vec<_>>()
            })
        };
        let confirmed = match unknown() {
            Some(_) if leads() => true,
            Some(_) => node.read().await.is_ok(),
            None => false,
        };
        if let Some(ids) = unknown().filter(|_| confirmed) {
            return error(
                StatusCode::NOT_FOUND,
                &format!("node {id} is not a member (members: {})", ids.join(", ")),
            );
        }
    }
    let accepted = matches!(op, Manage::AddMember { .. });
    // A removal has committed when it answers, but this replica may not have
    // applied it yet (the removed replica itself may never): it is not listed.
    let removed = match op {
        Manage::Remove { id } => Some(id),
        _ => None,
    };
    tracing::info!(?op, "admin membership change");
    match node.manage(op).await {
        Ok(_) if accepted => {
            json_reply(StatusCode::ACCEPTED, &json!({"members": member_list(node)}))
        }
        Ok(_) => {
            let mut members = member_list(node);
            members.retain(|m| removed.is_none_or(|id| m["id"] != id));
            json_reply(StatusCode::OK, &json!({ "members": members }))
        }
        Err(e) => written(state, Err(e), StatusCode::OK).await,
    }
}

fn member_list(node: &Node) -> Vec<Value> {
    let metrics = node.metrics();
    let membership = metrics.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let reachability = node.reachability(&metrics);
    let leader = node.known_leader(&metrics);
    let protocols = node.identity.protocols();
    let infos = node.applied().borrow().state.nodes.clone();
    membership
        .nodes()
        .map(|(id, n)| {
            let role = if Some(*id) == leader {
                "leader"
            } else if voters.contains(id) {
                "follower"
            } else {
                "learner"
            };
            let reachable = reachability.get(id).copied().flatten();
            // What this replica cannot reach, it cannot say the role of.
            let role = if reachable == Some(false) {
                "unreachable"
            } else {
                role
            };
            let info = infos.get(id);
            json!({
                "id": id,
                "name": info.map(|i| i.name.clone()),
                "address": n.addr,
                "role": role,
                "voter": voters.contains(id),
                "reachable": reachable,
                "version": info.map(|i| i.version.clone()),
                "protocol": protocols.get(id),
            })
        })
        .collect()
}

/// The `cluster` section of `/api/v1/status`, from this replica's own state.
pub fn status(node: &Node) -> Value {
    let metrics = node.metrics();
    let membership = metrics.membership_config.membership();
    let voters = membership.voter_ids().count();
    let reachable = voters - node.unreachable_voters(&metrics).len();
    // Before the cluster exists there is no membership, hence no quorum to speak of.
    let quorum = (voters > 0).then_some(voters / 2 + 1);
    // Reachability looks back 3 s, the quorum's acknowledgements two election
    // timeouts: a voter lost a moment ago may still count, but without a quorum no
    // more may fail.
    let quorum_reachable = node.quorum_reachable();
    json!({
        "cluster_id": node.cluster_id,
        "cluster_uuid": node.identity.uuid(),
        "leader_id": node.known_leader(&metrics),
        "term": metrics.current_term,
        "commit_index": metrics.local_committed.as_ref().map_or(0, |l| l.index),
        "applied_index": metrics.last_applied.as_ref().map_or(0, |l| l.index),
        "voters": voters,
        "voters_reachable": reachable,
        "quorum": quorum,
        // SPEC: N - quorum, the size's tolerance (etcd's); and how many more voters
        // may fail now, counted from those reachable.
        "fault_tolerance": quorum.map(|q| voters - q),
        "fault_tolerance_now": quorum.map(|q| if quorum_reachable { reachable.saturating_sub(q) } else { 0 }),
        "waiting_for_peers": voters == 0,
        "quorum_reachable": quorum_reachable,
        "protocol": crate::store::network::protocol(),
        "cluster_version": node.applied().borrow().state.cluster_version(),
        "members": member_list(node),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_value_of_the_wrong_type_is_named_by_its_whole_path() {
        let pools = json!({"web": {"backends": [
            {"name": "a", "address": "127.0.0.1:1"},
            {"name": "b", "address": "127.0.0.1:2", "weight": "two"}
        ]}});
        let Err(e) = check_pools(pools) else {
            panic!("a string weight was taken");
        };
        assert_eq!(
            e,
            r#"invalid config: pools.web.backends[1].weight: invalid type: string "two", expected u32"#
        );
    }
}
