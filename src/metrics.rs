//! Every metric's name, HELP text and buckets in one place (SPEC.md, "Metrics").

use std::sync::OnceLock;

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
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections by outcome: ok, connect_failed (one per failed backend attempt), no_backend, rejected (max_connections)."
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
        "Epoch of the lease this replica last became active on (the fencing token)."
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
        "1 when the member answered recently (as seen by this replica)."
    );
    describe_counter!(
        PEER_RPC_ERRORS_TOTAL,
        "Failed peer RPCs by peer and kind: connect, io, refused, remote."
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
