//! The semantic pass that runs after the YAML reader: rules that span fields
//! (renew_deadline < lease_duration, every listener's pool exists, ...) and the
//! warnings SPEC.md asks for. It reads the config and never changes it.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::schema::{
    BackendTls, CheckKind, Cluster, Config, InitialState, LeaderElection, StoreKind, TlsMode, Vip,
};
use super::types::{Dur, HostPort};
use super::vip;
use super::{Issue, Place};

/// Errors and warnings found in one config.
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<Issue>,
    pub warnings: Vec<Issue>,
}

impl Findings {
    fn error(&mut self, at: Place, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Issue {
            at,
            path: path.into(),
            message: message.into(),
        });
    }
    fn warn(&mut self, at: Place, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Issue {
            at,
            path: path.into(),
            message: message.into(),
        });
    }
}

fn at<T>(s: &Spanned<T>) -> Place {
    Place::of(s.referenced)
}

/// Names become metric labels and URL path segments: keep them plain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub const NAME_RULE: &str = "use 1-63 characters from A-Z a-z 0-9 - _ .";
const MAX_WEIGHT: u32 = 256;

/// Checks `config`; `open_files` is the open-files limit the process will run with.
pub fn validate(config: &Config, open_files: u64) -> Findings {
    let mut f = Findings::default();
    let existing = config
        .cluster
        .as_ref()
        .is_some_and(|c| c.initial_state == InitialState::Existing);

    if let Some(name) = &config.node.name {
        if name.trim().is_empty() {
            f.error(
                Place::Unknown,
                "node.name",
                "must not be empty; remove it to use the hostname",
            );
        } else if name.chars().any(char::is_control) {
            f.error(
                Place::Unknown,
                "node.name",
                format!(
                    "{name:?} has a control character (a newline?): the name goes into logs, metrics and the lease record"
                ),
            );
        }
    }
    if config.runtime.shutdown_grace.get() > super::types::LONGEST {
        f.error(
            Place::Unknown,
            "runtime.shutdown_grace",
            "is longer than a year (366d), the longest a setting takes",
        );
    }
    if let Some(threads) = &config.runtime.worker_threads
        && !(1..=1024).contains(&threads.value)
    {
        f.error(
            at(threads),
            "runtime.worker_threads",
            format!("{} is out of range: use 1 to 1024", threads.value),
        );
    }
    if config.admin.token_file.is_some()
        && config.admin.tls.is_none()
        && !config.admin.bind.0.ip().is_loopback()
    {
        f.warn(
            Place::Unknown,
            "admin.token_file",
            format!(
                "the admin token travels in clear text to {}: set admin.tls or bind to loopback",
                config.admin.bind
            ),
        );
    }

    validate_secret_files(config, &mut f);
    validate_cluster(config, &mut f);
    validate_leader_election(config, &mut f);
    validate_listeners(config, existing, open_files, &mut f);
    validate_pools(config, existing, &mut f);
    f
}

/// The token and the private keys: a warning for each one every user may read.
fn validate_secret_files(config: &Config, f: &mut Findings) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut files: Vec<(Place, String, &std::path::Path)> = Vec::new();
    if let Some(t) = &config.admin.token_file {
        files.push((Place::Unknown, "admin.token_file".into(), t));
    }
    if let Some(tls) = &config.admin.tls {
        files.push((at(tls), "admin.tls.key".into(), &tls.value.key));
    }
    if let Some(tls) = config.cluster.as_ref().and_then(|c| c.tls.as_ref()) {
        files.push((Place::Unknown, "cluster.tls.key".into(), &tls.key));
    }
    for (name, l) in &config.listeners {
        if let Some(t) = &l.terminate {
            files.push((
                at(t),
                format!("listeners.{name}.terminate.key"),
                &t.value.key,
            ));
        }
    }
    for (name, p) in &config.pools {
        if let Some(key) = p.backend_tls.as_ref().and_then(|t| t.value.key.as_ref()) {
            files.push((Place::Unknown, format!("pools.{name}.backend_tls.key"), key));
        }
    }
    for (place, path, file) in files {
        if let Ok(meta) = std::fs::metadata(file) {
            let mode = meta.permissions().mode();
            if mode & 0o004 != 0 {
                f.warn(
                    place,
                    path,
                    format!(
                        "{} is readable by every user (mode {:o}): it is a secret, chmod 600 (or 640 for a group)",
                        file.display(),
                        mode & 0o777
                    ),
                );
            }
        }
    }
}

fn validate_cluster(config: &Config, f: &mut Findings) {
    let Some(c) = &config.cluster else { return };
    at_most_a_year(f, &c.heartbeat_interval, "cluster.heartbeat_interval");
    at_most_a_year(f, &c.election_timeout, "cluster.election_timeout");
    if c.data_dir.as_os_str().is_empty() {
        f.error(
            Place::Unknown,
            "cluster.data_dir",
            "must not be empty: name the Raft store's directory, e.g. /var/lib/raftlb",
        );
    }
    if binds_overlap(config.admin.bind.0, c.bind.value.0) {
        f.error(
            at(&c.bind),
            "cluster.bind",
            format!(
                "{} overlaps admin.bind ({}): each needs its own port or address",
                c.bind.value, config.admin.bind
            ),
        );
    }
    if !valid_name(&c.cluster_id.value) {
        f.error(
            at(&c.cluster_id),
            "cluster.cluster_id",
            format!("{:?} is not a valid id: {NAME_RULE}", c.cluster_id.value),
        );
    }
    if c.node_id.value == 0 {
        f.error(
            at(&c.node_id),
            "cluster.node_id",
            "0 is not a valid node id: use 1 or more",
        );
    }
    let peers = &c.peers.value;
    if c.initial_state == InitialState::New {
        if peers.is_empty() {
            f.error(
                at(&c.peers),
                "cluster.peers",
                "no peers: list every initial replica as `ID: host:port`, this one included",
            );
        } else if !peers.contains_key(&c.node_id.value) {
            let ids: Vec<String> = peers.keys().map(u64::to_string).collect();
            f.error(
                at(&c.node_id),
                "cluster.node_id",
                format!(
                    "node_id {} is not in cluster.peers (ids: {}): add it to peers, or use initial_state: existing to join a running cluster",
                    c.node_id.value,
                    ids.join(", ")
                ),
            );
        }
    }
    if peers.contains_key(&0) {
        f.error(
            at(&c.peers),
            "cluster.peers",
            "peer id 0 is not valid: ids start at 1",
        );
    }
    validate_peer_addresses(c, f);
    let n = peers.len();
    if n > 0 && n % 2 == 0 {
        let quorum = n / 2 + 1;
        f.warn(
            at(&c.peers),
            "cluster.peers",
            format!(
                "{n} peers: quorum is {quorum} and fault tolerance {}, the same as with {} peers; use an odd number",
                n - quorum,
                n - 1
            ),
        );
    }
    let (hb, et) = (
        c.heartbeat_interval.value.get(),
        c.election_timeout.value.get(),
    );
    if hb < Duration::from_millis(1) {
        f.error(
            at(&c.heartbeat_interval),
            "cluster.heartbeat_interval",
            format!(
                "{} is under a millisecond: Raft counts whole milliseconds; 100ms is usual",
                c.heartbeat_interval.value
            ),
        );
    }
    // Compared as Raft will use them: in whole milliseconds.
    if hb.as_millis() >= et.as_millis() {
        f.error(
            at(&c.election_timeout),
            "cluster.election_timeout",
            format!(
                "{} must be longer than heartbeat_interval ({}) in whole milliseconds, which Raft counts; 5x is usual",
                c.election_timeout.value, c.heartbeat_interval.value
            ),
        );
    }
    if c.tls.is_none() && !c.bind.value.0.ip().is_loopback() {
        f.warn(
            at(&c.bind),
            "cluster.bind",
            format!(
                "peer port {} is not loopback and cluster.tls is not set: the peer port carries forwarded writes, so anyone who reaches it can change the config; set cluster.tls",
                c.bind.value
            ),
        );
    }
    match c.store.value {
        StoreKind::Etcd if c.etcd_servers.is_empty() => {
            f.error(
                at(&c.store),
                "cluster.etcd_servers",
                "store: etcd needs etcd_servers: list the etcd client URLs",
            );
        }
        StoreKind::Embedded if !c.etcd_servers.is_empty() => {
            f.error(
                at(&c.store),
                "cluster.etcd_servers",
                "etcd_servers is only used with store: etcd",
            );
        }
        _ => {}
    }
}

/// SPEC.md "Cluster identity": this replica is `peers[node_id]` and no other entry,
/// and no two entries share an address; otherwise one process answers for two ids
/// and counts itself twice towards a quorum.
fn validate_peer_addresses(c: &Cluster, f: &mut Findings) {
    let peers = &c.peers.value;
    let mut seen: Vec<(u64, &HostPort)> = Vec::new();
    for (id, addr) in peers {
        if let Some((first, same)) = seen.iter().find(|(_, a)| a.same_as(&addr.value)) {
            f.error(
                at(addr),
                format!("cluster.peers.{id}"),
                format!(
                    "{} is also peers[{first}] ({same}): each replica needs its own address, or the one listening there answers for both ids and counts twice towards the quorum",
                    addr.value
                ),
            );
        }
        seen.push((*id, &addr.value));
    }

    let id = c.node_id.value;
    let Some(mine) = peers.get(&id) else {
        return; // reported above for initial_state: new; a joining replica may be unlisted
    };
    // What this replica says it is: advertise, else a bind that names one address
    // (a hostname in peers may well resolve to the bind address).
    let (field, place, own) = match &c.advertise {
        Some(a) => ("cluster.advertise", at(a), a.value.clone()),
        None if c.bind.value.0.ip().is_unspecified() => {
            // A wildcard bind takes any address, but only its own port.
            let port = c.bind.value.0.port();
            if mine.value.port() != port {
                f.warn(
                    at(&c.bind),
                    "cluster.bind",
                    format!(
                        "listens on port {port}, but peers[{id}], where the others call this replica, is {}: fix the port of one, or set cluster.advertise: {} if a NAT maps it here",
                        mine.value, mine.value
                    ),
                );
            }
            return;
        }
        None if matches!(mine.value, HostPort::Name(..)) => return,
        None => ("cluster.bind", at(&c.bind), HostPort::Ip(c.bind.value.0)),
    };
    if own.same_as(&mine.value) {
        return;
    }
    let taken = peers
        .iter()
        .find(|(other, a)| **other != id && own.same_as(&a.value));
    match taken {
        Some((other, _)) => f.error(
            at(&c.node_id),
            "cluster.node_id",
            format!(
                "node_id is {id}, but {field} {own} is peers[{other}] (peers[{id}] is {}): two replicas would share node_id {id}, and one would count itself twice towards the quorum; set node_id: {other}, or fix {field}",
                mine.value
            ),
        ),
        None => {
            let fix = match field {
                "cluster.advertise" => format!(
                    "make them the same (advertise may be left out: it defaults to peers[{id}])"
                ),
                _ => format!(
                    "fix cluster.bind or peers[{id}], or set cluster.advertise: {} if the peers reach this replica there (NAT)",
                    mine.value
                ),
            };
            f.error(
                place,
                field,
                format!(
                    "{own} is not peers[{id}] ({}), this replica's entry for node_id {id}: {fix}",
                    mine.value
                ),
            );
        }
    }
}

fn validate_leader_election(config: &Config, f: &mut Findings) {
    let Some(le) = &config.leader_election else {
        return;
    };
    for (d, path) in [
        (&le.lease_duration, "leader_election.lease_duration"),
        (&le.renew_deadline, "leader_election.renew_deadline"),
        (&le.retry_period, "leader_election.retry_period"),
    ] {
        at_most_a_year(f, d, path);
    }
    let (lease, renew, retry) = (
        le.lease_duration.value.get(),
        le.renew_deadline.value.get(),
        le.retry_period.value.get(),
    );
    if config.cluster.is_none() {
        f.warn(
            Place::Unknown,
            "leader_election",
            "ignored in standalone mode (no cluster section): this replica is always active",
        );
    }
    if retry < Duration::from_millis(1) {
        f.error(
            at(&le.retry_period),
            "leader_election.retry_period",
            format!(
                "{} is under a millisecond: each try is a Raft write; 2s is Kubernetes' default",
                le.retry_period.value
            ),
        );
    }
    if renew >= lease {
        f.error(
            at(&le.renew_deadline),
            "leader_election.renew_deadline",
            format!(
                "renew_deadline ({}) must be less than lease_duration ({}): the active replica must stop before a standby may take over",
                le.renew_deadline.value, le.lease_duration.value
            ),
        );
    } else if (lease - renew).saturating_mul(5) < lease {
        f.warn(
            at(&le.renew_deadline),
            "leader_election.renew_deadline",
            format!(
                "lease margin lease_duration - renew_deadline = {} is under 20% of the lease: it must cover clock drift and the time to stop accepting",
                Dur(lease - renew)
            ),
        );
    }
    if retry >= renew {
        f.error(
            at(&le.retry_period),
            "leader_election.retry_period",
            format!(
                "retry_period ({}) must be less than renew_deadline ({})",
                le.retry_period.value, le.renew_deadline.value
            ),
        );
    }
    if let Some(c) = &config.cluster {
        // openraft campaigns 3-4 election timeouts after the last heartbeat.
        let election_timeout = c.election_timeout.value.get();
        let outage = election_timeout
            .saturating_mul(4)
            .saturating_add(retry.saturating_mul(2));
        if le.enabled && renew < election_timeout {
            f.error(
                at(&le.renew_deadline),
                "leader_election.renew_deadline",
                format!(
                    "renew_deadline ({}) is under cluster.election_timeout ({}): the active would step down whenever a renewal waits for Raft, and the lease would change hands many times a second; use at least 4 x election_timeout + 2 x retry_period ({})",
                    le.renew_deadline.value,
                    c.election_timeout.value,
                    Dur(outage)
                ),
            );
        } else if le.enabled && renew < outage {
            f.warn(
                at(&le.renew_deadline),
                "leader_election.renew_deadline",
                format!(
                    "renew_deadline ({}) is under 4 x election_timeout + 2 x retry_period ({}): a Raft election after a replica dies could make a healthy active step down",
                    le.renew_deadline.value,
                    Dur(outage)
                ),
            );
        }
    }
    for (field, command) in [
        ("on_active", &le.on_active),
        ("on_standby", &le.on_standby),
        ("on_fault", &le.on_fault),
    ] {
        if command.as_deref().is_some_and(|c| c.trim().is_empty()) {
            f.error(
                Place::Unknown,
                format!("leader_election.{field}"),
                "is empty: name a command (split on whitespace, no shell), or remove the key",
            );
        }
    }
    if let Some(v) = &le.vip {
        validate_vip(config, le, v, f);
    }
}

/// The role hooks whose program cannot be run here: warnings, as keepalived's for a
/// missing script (a hook never stops the election, and it may be installed after
/// the config). Not part of [`validate`]: it looks at files the config names, which
/// `check --syntax-only` does not.
pub fn hook_warnings(config: &Config) -> Vec<Issue> {
    let Some(le) = &config.leader_election else {
        return Vec::new();
    };
    [
        ("on_active", &le.on_active),
        ("on_standby", &le.on_standby),
        ("on_fault", &le.on_fault),
    ]
    .into_iter()
    .filter_map(|(field, command)| {
        let program = command.as_deref()?.split_whitespace().next()?;
        let problem = not_runnable(program)?;
        Some(Issue {
            at: Place::Unknown,
            path: format!("leader_election.{field}"),
            message: format!("{program} {problem}: the hook will fail each time it runs"),
        })
    })
    .collect()
}

/// Why `program` (a hook's first word) cannot be run, if it cannot: a path must be an
/// executable file, a bare name one in a directory of PATH (as execvp finds it).
fn not_runnable(program: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &std::path::Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = std::path::Path::new(program);
        return match std::fs::metadata(path) {
            Err(e) => Some(format!("cannot be run: {e}")),
            Ok(m) if !m.is_file() => Some("is not a file".into()),
            Ok(_) if !executable(path) => Some("is not executable (chmod +x)".into()),
            Ok(_) => None,
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| executable(&dir.join(program)));
    (!found).then(|| "is not found in PATH (name it by its full path)".into())
}

fn validate_vip(config: &Config, le: &LeaderElection, v: &Vip, f: &mut Findings) {
    let place = at(&v.address);
    if let Err(reason) = vip::parse_address(&v.address.value) {
        f.error(
            place,
            "leader_election.vip.address",
            format!("{:?} {reason}", v.address.value),
        );
    }
    if !vip::valid_interface(&v.interface) {
        f.error(
            place,
            "leader_election.vip.interface",
            format!(
                "{:?} is not an interface name: use the name `ip link` shows, e.g. eth0 (1-15 characters, no spaces, '/' or ':')",
                v.interface
            ),
        );
    }
    if config.cluster.is_none() {
        f.error(
            place,
            "leader_election.vip",
            "a VIP follows the active replica, and standalone mode (no cluster section) has no election: remove vip, or add a cluster section",
        );
        return;
    }
    if !le.enabled {
        f.error(
            place,
            "leader_election.vip",
            "a VIP follows the active replica, and with enabled: false every replica serves: remove vip, or set enabled: true",
        );
        return;
    }
    // The VIP's kernel lifetime is at most the whole seconds of renew_deadline, and the
    // kernel deletes a lapsed address up to about a second late.
    let (lease, renew) = (le.lease_duration.value.get(), le.renew_deadline.value.get());
    let gone_by = vip::lifetime(renew) + Duration::from_secs(1);
    if lease < gone_by {
        f.warn(
            at(&le.lease_duration),
            "leader_election.lease_duration",
            format!(
                "lease_duration ({}) is under max(1s, whole seconds of renew_deadline) + 1s = {}: a killed holder's VIP can briefly coexist with the new holder's; use a lease of at least {} to rule that out",
                le.lease_duration.value,
                Dur(gone_by),
                Dur(gone_by)
            ),
        );
    }
}

/// Whether two listening sockets would collide: the same port and family, and the
/// same IP or a wildcard on either side (IPv6 sockets are v6-only here, so `[::]`
/// and `0.0.0.0` do not).
fn binds_overlap(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn validate_listeners(config: &Config, existing: bool, open_files: u64, f: &mut Findings) {
    let mut binds = Vec::new();
    let mut total_max: u64 = 0;
    let mut defaulted = false;
    for (name, l) in &config.listeners {
        let path = format!("listeners.{name}");
        if !valid_name(name) {
            f.error(
                at(&l.pool),
                &path,
                format!("listener name {name:?} is not valid: {NAME_RULE}"),
            );
        }
        if let Some((other, addr)) = binds
            .iter()
            .find(|(_, b): &&(&String, std::net::SocketAddr)| binds_overlap(*b, l.bind.value.0))
        {
            f.error(
                at(&l.bind),
                format!("{path}.bind"),
                format!(
                    "{} overlaps listener {other} ({addr}): each listener needs its own port or address (a wildcard takes the port on every address of its family)",
                    l.bind.value
                ),
            );
        }
        binds.push((name, l.bind.value.0));
        // Two listening sockets on one port, the same IP or a wildcard beside another
        // IP of its family: the second bind fails at run time (EADDRINUSE).
        let others = [
            Some(("admin.bind", config.admin.bind.0)),
            config
                .cluster
                .as_ref()
                .map(|c| ("cluster.bind", c.bind.value.0)),
        ];
        if let Some((other, addr)) = others
            .into_iter()
            .flatten()
            .find(|(_, other)| binds_overlap(l.bind.value.0, *other))
        {
            f.error(
                at(&l.bind),
                format!("{path}.bind"),
                format!(
                    "{} overlaps {other} ({addr}): each needs its own port or address",
                    l.bind.value
                ),
            );
        }
        if !existing && !config.pools.contains_key(&l.pool.value) {
            let known: Vec<&str> = config.pools.keys().map(String::as_str).collect();
            f.error(
                at(&l.pool),
                format!("{path}.pool"),
                format!(
                    "pool {:?} does not exist (pools: {})",
                    l.pool.value,
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        match (l.tls.value, &l.terminate) {
            (TlsMode::Passthrough, Some(t)) => f.error(
                at(t),
                format!("{path}.terminate"),
                "terminate: is only allowed with tls: terminate; remove it or set tls: terminate",
            ),
            (TlsMode::Terminate, None) => f.error(
                at(&l.tls),
                format!("{path}.terminate"),
                "tls: terminate needs terminate: {cert, key} (and optionally client_ca)",
            ),
            _ => {}
        }
        if let Some(pool) = config.pools.get(&l.pool.value)
            && let Some(btls) = &pool.backend_tls
            && l.tls.value != TlsMode::Terminate
        {
            f.error(
                at(btls),
                format!("pools.{}.backend_tls", l.pool.value),
                backend_tls_behind_passthrough(name),
            );
        }
        if let Some(max) = &l.max_connections {
            if max.value == 0 {
                f.error(
                    at(max),
                    format!("{path}.max_connections"),
                    "must be 1 or more",
                );
            }
            total_max += u64::from(max.value);
        } else {
            defaulted = true;
        }
        at_most_a_year(f, &l.idle_timeout, &format!("{path}.idle_timeout"));
        if l.idle_timeout.value.get().is_zero() {
            f.error(
                at(&l.idle_timeout),
                format!("{path}.idle_timeout"),
                "must be more than 0",
            );
        }
    }
    // Listeners left at the default count once together: each may take the whole
    // budget, and they share it (two of them alone would always warn).
    if defaulted {
        total_max += default_max_connections(open_files);
    }
    let need = total_max * 2 + RESERVED_FILES;
    if need > open_files {
        f.warn(
            Place::Unknown,
            "listeners.*.max_connections",
            format!(
                "the listeners allow {total_max} connections, which need {need} open files with the reserve, above the limit of {open_files}: lower max_connections or raise LimitNOFILE"
            ),
        );
    }
}

/// Open files kept for everything that is not a proxied connection.
pub const RESERVED_FILES: u64 = 256;

/// SPEC.md: (open-files limit - 256) / 2, since each proxied connection holds two descriptors.
pub fn default_max_connections(open_files: u64) -> u64 {
    (open_files.saturating_sub(RESERVED_FILES) / 2).clamp(1, u64::from(u32::MAX))
}

fn validate_pools(config: &Config, existing: bool, f: &mut Findings) {
    if config.pools.is_empty() && !existing {
        f.error(
            Place::Unknown,
            "pools",
            "no pools: define at least one pool with backends",
        );
    }
    for (name, p) in &config.pools {
        let path = format!("pools.{name}");
        if !valid_name(name) {
            f.error(
                at(&p.backends),
                &path,
                format!("pool name {name:?} is not valid: {NAME_RULE}"),
            );
        }
        if p.backends.value.is_empty() {
            f.error(
                at(&p.backends),
                format!("{path}.backends"),
                "pool has no backends: list at least one",
            );
        }
        positive(f, &p.connect_timeout, &format!("{path}.connect_timeout"));
        positive(f, &p.resolve_interval, &format!("{path}.resolve_interval"));
        positive(f, &p.passive_hold, &format!("{path}.passive_hold"));
        if let Some(tls) = &p.backend_tls {
            cert_pair(
                f,
                at(tls),
                &format!("{path}.backend_tls"),
                tls.value.cert.is_some(),
                tls.value.key.is_some(),
            );
            server_name(
                f,
                at(tls),
                &format!("{path}.backend_tls.server_name"),
                &tls.value,
            );
        }
        if let Some(hc) = &p.health_check {
            let hp = format!("{path}.health_check");
            let hc_v = &hc.value;
            positive(f, &hc_v.interval, &format!("{hp}.interval"));
            positive(f, &hc_v.timeout, &format!("{hp}.timeout"));
            for (field, v) in [("rise", &hc_v.rise), ("fall", &hc_v.fall)] {
                if !(1..=100).contains(&v.value) {
                    f.error(
                        at(v),
                        format!("{hp}.{field}"),
                        format!("{} is out of range: use 1 to 100", v.value),
                    );
                }
            }
            if !hc_v.path.value.starts_with('/') {
                f.error(
                    at(&hc_v.path),
                    format!("{hp}.path"),
                    format!("{:?} must start with /, e.g. /readyz", hc_v.path.value),
                );
            } else if hc_v.kind == CheckKind::Https
                && let Err(e) = hyper::Uri::try_from(hc_v.path.value.as_str())
            {
                // What the probe's request is built from: every probe would fail.
                f.error(
                    at(&hc_v.path),
                    format!("{hp}.path"),
                    format!(
                        "{:?} is not a URL path ({e}): escape spaces and other special characters, e.g. /a%20b",
                        hc_v.path.value
                    ),
                );
            }
            if let Some(tls) = &hc_v.tls {
                cert_pair(
                    f,
                    at(hc),
                    &format!("{hp}.tls"),
                    tls.cert.is_some(),
                    tls.key.is_some(),
                );
                // A tcp check makes no handshake: its tls is ignored (warned below).
                if hc_v.kind != CheckKind::Tcp {
                    server_name(f, at(hc), &format!("{hp}.tls.server_name"), tls);
                }
                if hc_v.kind == CheckKind::Tcp {
                    f.warn(
                        at(hc),
                        format!("{hp}.tls"),
                        "ignored: a tcp check makes no TLS handshake; use kind: tls or https",
                    );
                }
            }
            if hc_v.timeout.value.get() > hc_v.interval.value.get() {
                f.warn(
                    at(&hc_v.timeout),
                    format!("{hp}.timeout"),
                    format!(
                        "{} is longer than interval ({}): a backend that hangs is probed only once per timeout",
                        hc_v.timeout.value, hc_v.interval.value
                    ),
                );
            }
        }
        let mut seen = BTreeSet::new();
        for (i, b) in p.backends.value.iter().enumerate() {
            let bp = format!("{path}.backends[{i}]");
            if !valid_name(&b.name.value) {
                f.error(
                    at(&b.name),
                    format!("{bp}.name"),
                    format!("backend name {:?} is not valid: {NAME_RULE}", b.name.value),
                );
            }
            if !seen.insert(b.name.value.as_str()) {
                f.error(
                    at(&b.name),
                    format!("{bp}.name"),
                    format!(
                        "backend name {:?} appears twice in pool {name}: names must be unique",
                        b.name.value
                    ),
                );
            }
            if !(1..=MAX_WEIGHT).contains(&b.weight.value) {
                f.error(
                    at(&b.weight),
                    format!("{bp}.weight"),
                    format!("{} is out of range: use 1 to {MAX_WEIGHT} (drain a backend to stop new connections)", b.weight.value),
                );
            }
            // The parser takes it as a hostname, so that stored state still decodes.
            if let HostPort::Name(host, _) = &b.address
                && host
                    .rsplit('.')
                    .next()
                    .is_some_and(|label| label.chars().all(|c| c.is_ascii_digit()))
            {
                f.error(
                    at(&b.name),
                    format!("{bp}.address"),
                    format!(
                        "{} is not an IPv4 address (each of its four numbers is 0 to 255) and not a hostname (a hostname's last label is not all digits)",
                        b.address
                    ),
                );
            }
        }
    }
}

fn positive(f: &mut Findings, d: &Spanned<Dur>, path: &str) {
    if d.value.get() == Duration::ZERO {
        f.error(at(d), path, "must be more than 0");
    }
    at_most_a_year(f, d, path);
}

/// Every duration of a config: more than a year is a typo, and the arithmetic on
/// these (a lease times 5, an instant plus a timeout) must not overflow.
fn at_most_a_year(f: &mut Findings, d: &Spanned<Dur>, path: &str) {
    if d.value.get() > super::types::LONGEST {
        f.error(
            at(d),
            path,
            format!(
                "{} is longer than a year (366d), the longest a setting takes",
                d.value
            ),
        );
    }
}

/// Why a pool with `backend_tls` cannot sit behind `listener`, which passes TLS
/// through: the file's check, and a replicated write that a replica's own
/// listeners refuse.
pub fn backend_tls_behind_passthrough(listener: &str) -> String {
    format!(
        "backend_tls re-encrypts towards backends, so it needs tls: terminate on every listener of the pool, and listener {listener} passes TLS through"
    )
}

/// `server_name`, when set, is what every handshake sends and verifies: one the
/// TLS library refuses would fail them all.
fn server_name(f: &mut Findings, place: Place, path: &str, tls: &BackendTls) {
    if let Some(name) = &tls.server_name
        && let Err(e) = rustls_pki_types::ServerName::try_from(name.as_str())
    {
        f.error(
            place,
            path,
            format!(
                "{name:?} is not a valid TLS server name ({e}): use a DNS name or an IP address"
            ),
        );
    }
}

fn cert_pair(f: &mut Findings, place: Place, path: &str, cert: bool, key: bool) {
    if cert != key {
        f.error(place, path, "cert and key go together: set both or neither");
    }
}

impl Place {
    pub fn of(loc: Location) -> Place {
        if loc == Location::UNKNOWN {
            Place::Unknown
        } else {
            Place::At {
                line: loc.line(),
                column: loc.column(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_program_must_be_an_executable_file_by_path_or_in_path() {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(not_runnable("/bin/sh"), None);
        assert_eq!(not_runnable("sh"), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("notify");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let path = script.to_str().expect("utf-8");
        assert!(not_runnable(path).is_some_and(|p| p.contains("is not executable")));
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(not_runnable(path), None);
        let dir_path = dir.path().to_str().expect("utf-8");
        assert_eq!(not_runnable(dir_path).as_deref(), Some("is not a file"));
        assert!(not_runnable("/nonexistent/notify").is_some_and(|p| p.contains("No such file")));
        assert!(
            not_runnable("raftlb-no-such-hook").is_some_and(|p| p.contains("not found in PATH"))
        );
    }

    #[test]
    fn peer_addresses_compare_as_parsed_ips_or_as_written_names() {
        let same = |a: &str, b: &str| {
            HostPort::same_as(&a.parse().expect("address"), &b.parse().expect("address"))
        };
        assert!(same("10.0.0.1:7400", "10.0.0.1:7400"));
        assert!(same("[::ffff:10.0.0.1]:7400", "10.0.0.1:7400"));
        assert!(same("[0:0::1]:7400", "[::1]:7400"));
        assert!(same("LB-1.example:7400", "lb-1.example:7400"));
        assert!(!same("10.0.0.1:7400", "10.0.0.1:7401"));
        assert!(!same("localhost:7400", "127.0.0.1:7400"));
        assert!(!same("lb-1:7400", "lb-1.example:7400"));
    }
}
