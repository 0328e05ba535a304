//! Every metric's name, HELP text and buckets in one place (SPEC.md, "Metrics").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_TOTAL: &str = "raftlb_connections_total";
pub const ACTIVE_CONNECTIONS: &str = "raftlb_active_connections";
pub const BYTES_TOTAL: &str = "raftlb_bytes_total";
pub const CONNECT_DURATION: &str = "raftlb_connect_duration_seconds";
pub const BACKEND_UP: &str = "raftlb_backend_up";
pub const BACKEND_DRAINED: &str = "raftlb_backend_drained";
pub const HEALTH_CHECKS_TOTAL: &str = "raftlb_health_checks_total";
pub const CONFIG_VERSION: &str = "raftlb_config_version";
pub const CONFIG_RELOADS_TOTAL: &str = "raftlb_config_reloads_total";
pub const CONFIG_APPLY_FAILURES_TOTAL: &str = "raftlb_config_apply_failures_total";
pub const RAFT_TERM: &str = "raftlb_raft_term";
pub const RAFT_IS_LEADER: &str = "raftlb_raft_is_leader";
pub const RAFT_COMMIT_INDEX: &str = "raftlb_raft_commit_index";
pub const RAFT_APPLIED_INDEX: &str = "raftlb_raft_applied_index";
pub const RAFT_MEMBERS: &str = "raftlb_raft_members";
pub const RAFT_QUORUM: &str = "raftlb_raft_quorum";
pub const RAFT_MEMBER_REACHABLE: &str = "raftlb_raft_member_reachable";
pub const RAFT_HAS_LEADER: &str = "raftlb_raft_has_leader";
pub const RAFT_QUORUM_REACHABLE: &str = "raftlb_raft_quorum_reachable";
pub const BUILD_INFO: &str = "raftlb_build_info";
pub const PEER_RPC_ERRORS_TOTAL: &str = "raftlb_peer_rpc_errors_total";
pub const RAFT_APPLY_DURATION: &str = "raftlb_raft_apply_duration_seconds";
pub const LEADER_ELECTION_IS_ACTIVE: &str = "raftlb_leader_election_is_active";
pub const LEADER_ELECTION_EPOCH: &str = "raftlb_leader_election_epoch";
pub const LEADER_ELECTION_TRANSITIONS_TOTAL: &str = "raftlb_leader_election_transitions_total";
pub const VIP_READDS_TOTAL: &str = "raftlb_leader_election_vip_readds_total";
pub const HOOK_FAILURES_TOTAL: &str = "raftlb_leader_election_hook_failures_total";

/// `connect_duration_seconds` buckets: 0.5 ms .. 2.5 s.
const CONNECT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(CONNECT_DURATION.into()), CONNECT_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(RAFT_APPLY_DURATION.into()),
                        CONNECT_BUCKETS,
                    )
                })
                .map(PrometheusBuilder::build_recorder);
            let handle = match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    if metrics::set_global_recorder(recorder).is_err() {
                        tracing::warn!(
                            "a metrics recorder was already installed; /metrics may be empty"
                        );
                    }
                    handle
                }
                // Only reachable with an empty bucket list, which is a constant above.
                Err(e) => panic!("metrics buckets are invalid: {e}"),
            };
            describe();
            zero_from_start();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// How often recorded histogram samples are folded into their buckets.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Folds the histograms' recorded samples into their buckets every [`UPKEEP_EVERY`].
/// The recorder keeps each raw sample until an upkeep or a scrape: without this, a
/// process that nobody scrapes keeps every connection's connect time (8 bytes each)
/// for ever.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections by outcome: ok, connect_failed (one per failed backend attempt), no_backend, rejected (max_connections reached, or no descriptor for the backend socket)."
    );
    describe_gauge!(ACTIVE_CONNECTIONS, "Proxied connections open now.");
    describe_counter!(
        BYTES_TOTAL,
        "Bytes relayed, by direction: to_backend or to_client."
    );
    describe_histogram!(
        CONNECT_DURATION,
        "Time to connect to a backend, in seconds."
    );
    describe_gauge!(
        BACKEND_UP,
        "1 when the backend takes new connections by health, 0 when down or not yet probed."
    );
    describe_gauge!(
        BACKEND_DRAINED,
        "1 when the backend is drained by an operator."
    );
    describe_counter!(
        HEALTH_CHECKS_TOTAL,
        "Active health probes by result: ok, fail or timeout."
    );
    describe_gauge!(CONFIG_VERSION, "Version of the config this replica serves.");
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Config reloads (SIGHUP) by result: ok or invalid."
    );
    describe_counter!(
        CONFIG_APPLY_FAILURES_TOTAL,
        "Committed pools this replica could not apply (it keeps the previous version of the pool)."
    );
    describe_gauge!(
        LEADER_ELECTION_IS_ACTIVE,
        "1 while this replica holds the lease and accepts (leader election on)."
    );
    describe_gauge!(
        LEADER_ELECTION_EPOCH,
        "Epoch of the lease (the fencing token) as this replica has applied it: the same on every replica."
    );
    describe_counter!(
        LEADER_ELECTION_TRANSITIONS_TOTAL,
        "Role changes of this replica, by the role it changed to (active, standby, fault)."
    );
    describe_counter!(
        VIP_READDS_TOTAL,
        "Times the VIP had expired while this replica held it and was added again."
    );
    describe_gauge!(RAFT_TERM, "Current Raft term.");
    describe_gauge!(RAFT_IS_LEADER, "1 when this replica is the Raft leader.");
    describe_gauge!(RAFT_COMMIT_INDEX, "Highest Raft log index known committed.");
    describe_gauge!(RAFT_APPLIED_INDEX, "Highest Raft log index applied here.");
    describe_gauge!(RAFT_MEMBERS, "Voting members of the Raft group.");
    describe_gauge!(
        RAFT_QUORUM,
        "Votes needed for a quorum: floor(members/2)+1."
    );
    describe_gauge!(
        RAFT_MEMBER_REACHABLE,
        "1 when the member answered on the peer channel recently (as seen by this replica), 0 when not."
    );
    describe_gauge!(
        RAFT_HAS_LEADER,
        "1 when this replica is a Raft leader that heard from a quorum recently, or a follower that heard from its leader recently."
    );
    describe_gauge!(
        RAFT_QUORUM_REACHABLE,
        "1 when this replica heard from a quorum recently: the leader counts acknowledgements, a follower its leader's heartbeats."
    );
    describe_counter!(
        PEER_RPC_ERRORS_TOTAL,
        "Failed peer RPCs by peer and kind: connect (no connection), io (sent, no valid answer), refused (the peer or this replica refused the exchange)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label is the raftlb version running."
    );
    describe_histogram!(
        RAFT_APPLY_DURATION,
        "Time to apply and persist one batch of committed entries, in seconds."
    );
    describe_counter!(
        HOOK_FAILURES_TOTAL,
        "Role hooks that failed to start, exited non-zero or were killed at the timeout, by hook: on_active, on_standby, on_fault."
    );
}

/// The label values of every series kind that alerts use, at 0 before the first event,
/// so that `increase()` sees the first one.
fn zero_from_start() {
    for result in ["ok", "invalid"] {
        metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => result).increment(0);
    }
    metrics::counter!(CONFIG_APPLY_FAILURES_TOTAL).increment(0);
    for to in ["active", "standby", "fault"] {
        metrics::counter!(LEADER_ELECTION_TRANSITIONS_TOTAL, "to" => to).increment(0);
    }
    metrics::counter!(VIP_READDS_TOTAL).increment(0);
    for hook in ["on_active", "on_standby", "on_fault"] {
        metrics::counter!(HOOK_FAILURES_TOTAL, "hook" => hook).increment(0);
    }
}

/// The kinds `peer_rpc_errors_total` counts.
pub const PEER_RPC_ERROR_KINDS: [&str; 3] = ["connect", "io", "refused"];

/// `peer_rpc_errors_total` of `peer` at 0 for every kind.
pub fn zero_peer_errors(peer: &str) {
    for kind in PEER_RPC_ERROR_KINDS {
        metrics::counter!(PEER_RPC_ERRORS_TOTAL, "peer" => peer.to_string(), "kind" => kind)
            .increment(0);
    }
}

/// The pool of each listener, to export its connection counters at 0 up front.
static LISTENERS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// Listener `listener` sends to `pool`: its counters that have no backend are
/// exported at 0 now, and those of each backend of the pool (see
/// [`zero_connection_series`]).
pub fn listener_serves(listener: &str, pool: &str, backends: impl Iterator<Item = String>) {
    revive(&listener_labels(listener));
    if let Ok(mut listeners) = LISTENERS.lock() {
        listeners.insert(listener.to_string(), pool.to_string());
    }
    for result in ["rejected", "no_backend"] {
        let labels = [
            ("listener", listener.to_string()),
            ("pool", pool.to_string()),
            ("backend", "none".to_string()),
            ("result", result.to_string()),
        ];
        metrics::counter!(CONNECTIONS_TOTAL, &labels).increment(0);
    }
    for backend in backends {
        zero_listener_backend(listener, pool, &backend);
    }
}

/// Listener `listener` was removed from the config: its series leave `/metrics`.
pub fn listener_removed(listener: &str) {
    retire(listener_labels(listener));
    if let Ok(mut listeners) = LISTENERS.lock() {
        listeners.remove(listener);
    }
}

/// The connection and byte counters of `backend` at 0 for every listener of `pool`.
pub fn zero_connection_series(pool: &str, backend: &str) {
    let listeners: Vec<String> = LISTENERS
        .lock()
        .map(|l| {
            l.iter()
                .filter(|(_, p)| *p == pool)
                .map(|(l, _)| l.clone())
                .collect()
        })
        .unwrap_or_default();
    for listener in listeners {
        zero_listener_backend(&listener, pool, backend);
    }
}

fn zero_listener_backend(listener: &str, pool: &str, backend: &str) {
    let labels = |k: &'static str, v: &'static str| {
        [
            ("listener", listener.to_string()),
            ("pool", pool.to_string()),
            ("backend", backend.to_string()),
            (k, v.to_string()),
        ]
    };
    for result in ["ok", "connect_failed"] {
        metrics::counter!(CONNECTIONS_TOTAL, &labels("result", result)).increment(0);
    }
    for direction in ["to_backend", "to_client"] {
        metrics::counter!(BYTES_TOTAL, &labels("direction", direction)).increment(0);
    }
    let labels = [
        ("listener", listener.to_string()),
        ("pool", pool.to_string()),
        ("backend", backend.to_string()),
    ];
    // Adds nothing to a gauge that may count open connections already.
    metrics::gauge!(ACTIVE_CONNECTIONS, &labels).increment(0.0);
}

/// Label sets (as rendered, e.g. `pool="web"`) of what was removed from the config:
/// a series that carries every label of one set leaves `/metrics`. The recorder
/// cannot delete a series, so rendering leaves them out.
static RETIRED: Mutex<BTreeSet<Vec<String>>> = Mutex::new(BTreeSet::new());

fn backend_labels(pool: &str, backend: &str) -> Vec<String> {
    vec![format!("pool=\"{pool}\""), format!("backend=\"{backend}\"")]
}

fn listener_labels(listener: &str) -> Vec<String> {
    vec![format!("listener=\"{listener}\"")]
}

fn retire(labels: Vec<String>) {
    if let Ok(mut retired) = RETIRED.lock() {
        retired.insert(labels);
    }
}

fn revive(labels: &Vec<String>) {
    if let Ok(mut retired) = RETIRED.lock() {
        retired.remove(labels);
    }
}

/// Every series of `backend` in `pool` leaves `/metrics` (it was removed).
pub fn retire_backend(pool: &str, backend: &str) {
    retire(backend_labels(pool, backend));
}

/// `backend` in `pool` is in the config (again): its series are rendered.
pub fn revive_backend(pool: &str, backend: &str) {
    revive(&backend_labels(pool, backend));
}

/// The Raft members at the last scrape.
static MEMBERS: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

/// The Raft members now: the series of one that left the cluster (its
/// reachability, the errors calling it) leave `/metrics`, and come back if it is
/// added again.
pub fn members_now(ids: BTreeSet<u64>) {
    let labels = |id: u64| {
        [
            vec![format!("member=\"{id}\"")],
            vec![format!("peer=\"{id}\"")],
        ]
    };
    let Ok(mut known) = MEMBERS.lock() else {
        return;
    };
    for &gone in known.difference(&ids) {
        labels(gone).into_iter().for_each(retire);
    }
    for &id in &ids {
        labels(id).iter().for_each(revive);
    }
    *known = ids;
}

/// Whole metrics left out of `/metrics`: the leader election's gauge once a reload
/// turned election off (a replica started without election never had it).
static RETIRED_NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());

/// `name` leaves `/metrics`, HELP and TYPE lines included.
pub fn retire_metric(name: &'static str) {
    if let Ok(mut retired) = RETIRED_NAMES.lock() {
        retired.insert(name);
    }
}

/// `name` is rendered again.
pub fn revive_metric(name: &'static str) {
    if let Ok(mut retired) = RETIRED_NAMES.lock() {
        retired.remove(name);
    }
}

/// The text of `/metrics`: the recorder's series less those of removed backends
/// and listeners and of retired metrics, then the `process_*` metrics.
pub fn render(handle: &PrometheusHandle) -> String {
    let text = handle.render();
    let retired: Vec<Vec<String>> = RETIRED
        .lock()
        .map(|r| r.iter().cloned().collect())
        .unwrap_or_default();
    let names: Vec<&str> = RETIRED_NAMES
        .lock()
        .map(|r| r.iter().copied().collect())
        .unwrap_or_default();
    let mut out = if retired.is_empty() && names.is_empty() {
        text
    } else {
        let mut kept = String::with_capacity(text.len());
        for line in text.lines() {
            if !is_retired(line, &retired) && !names.contains(&metric_name(line)) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        kept
    };
    process::render(&mut out);
    out
}

/// Whether a sample line carries every label of one retired set. Pool, backend and
/// listener names are `[A-Za-z0-9._-]+` (config validation): they need no escaping
/// and hold no comma, so the labels are the comma-separated parts between the braces.
/// The metric a line of the text format is about: a sample's name, or the name a
/// `# HELP` or `# TYPE` line describes ("" for anything else).
fn metric_name(line: &str) -> &str {
    let line = line
        .strip_prefix("# HELP ")
        .or_else(|| line.strip_prefix("# TYPE "))
        .unwrap_or(line);
    if line.starts_with('#') {
        return "";
    }
    line.split([' ', '{']).next().unwrap_or("")
}

fn is_retired(line: &str, retired: &[Vec<String>]) -> bool {
    let Some(labels) = line
        .split_once('{')
        .and_then(|(_, rest)| rest.rsplit_once('}'))
        .map(|(labels, _)| labels)
    else {
        return false;
    };
    let has = |label: &String| labels.split(',').any(|l| l == label);
    retired.iter().any(|set| set.iter().all(has))
}

/// `process_*` metrics as the Prometheus clients name them, read from /proc at each scrape.
mod process {
    use std::fmt::Write as _;

    /// Appends the process metrics to `out`; one that cannot be read is left out.
    pub fn render(out: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str, value: Option<f64>| {
            if let Some(value) = value {
                let _ = write!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
                );
            }
        };
        let stat = Stat::read();
        metric(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            stat.as_ref().map(|s| s.cpu_seconds),
        );
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as f64),
        );
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors (the soft limit).",
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft as f64),
        );
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            stat.as_ref().map(|s| s.resident_bytes),
        );
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            stat.as_ref().map(|s| s.virtual_bytes),
        );
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            stat.as_ref().and_then(|s| s.start_time_seconds),
        );
    }

    struct Stat {
        cpu_seconds: f64,
        resident_bytes: f64,
        virtual_bytes: f64,
        start_time_seconds: Option<f64>,
    }

    impl Stat {
        /// /proc/self/stat (proc(5)): the fields after the command name, which is in
        /// parentheses and may itself hold spaces and parentheses.
        fn read() -> Option<Stat> {
            let text = std::fs::read_to_string("/proc/self/stat").ok()?;
            let (_, after_comm) = text.rsplit_once(')')?;
            // fields[0] is field 3 (state).
            let fields: Vec<&str> = after_comm.split_whitespace().collect();
            let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
            let ticks = sysconf(libc::_SC_CLK_TCK)?;
            let page = sysconf(libc::_SC_PAGESIZE)?;
            let start_time_seconds = boot_time().and_then(|boot| Some(boot + field(22)? / ticks));
            Some(Stat {
                cpu_seconds: (field(14)? + field(15)?) / ticks,
                virtual_bytes: field(23)?,
                resident_bytes: field(24)? * page,
                start_time_seconds,
            })
        }
    }

    #[allow(unsafe_code)]
    fn sysconf(name: libc::c_int) -> Option<f64> {
        // SAFETY: sysconf only reads a system constant; it takes no pointer.
        let value = unsafe { libc::sysconf(name) };
        (value > 0).then_some(value as f64)
    }

    /// The `btime` line of /proc/stat: when the system booted, in seconds since the epoch.
    fn boot_time() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_a_retired_backend_are_left_out_and_no_others() {
        let retired = vec![backend_labels("web", "b1"), listener_labels("old")];
        let gone = [
            r#"raftlb_backend_up{pool="web",backend="b1"} 0"#,
            r#"raftlb_connections_total{listener="front",pool="web",backend="b1",result="ok"} 3"#,
            r#"raftlb_connect_duration_seconds_bucket{pool="web",backend="b1",le="0.001"} 1"#,
            r#"raftlb_active_connections{listener="old",pool="api",backend="a1"} 0"#,
        ];
        let kept = [
            r#"raftlb_backend_up{pool="web",backend="b10"} 1"#,
            r#"raftlb_backend_up{pool="web2",backend="b1"} 1"#,
            r#"raftlb_backend_up{pool="other",backend="b1"} 1"#,
            r#"raftlb_active_connections{listener="older",pool="api",backend="a1"} 0"#,
            "# HELP raftlb_backend_up 1 when ...",
            "raftlb_raft_term 3",
        ];
        for line in gone {
            assert!(is_retired(line, &retired), "{line}");
        }
        for line in kept {
            assert!(!is_retired(line, &retired), "{line}");
        }
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let mut out = String::new();
        process::render(&mut out);
        for name in [
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_max_fds ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_start_time_seconds ",
        ] {
            let value: f64 = out
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name}missing:\n{out}"));
            assert!(value >= 0.0, "{name}{value}");
        }
        let start = out
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        assert!(
            start > 1.0e9 && start <= now + 1.0,
            "start {start}, now {now}"
        );
    }
}
