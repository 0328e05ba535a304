//! Generated bad input for the peer port of a running cluster replica: random bytes,
//! truncated and oversized frames, envelopes with the wrong identity, and valid
//! frames carrying hostile Raft and raftlb messages (huge vectors, out-of-range
//! indexes and terms, unknown nodes). The process stays alive, answers `/healthz`,
//! and its peak memory stays bounded. A frame with the right cluster_id may depose
//! the leader or write the config: without mTLS such a peer is trusted (README,
//! Threat model), so only survival is checked, not the state.
//!
//! Cases: FUZZ_PEER_CASES, else PROPTEST_CASES, else 256.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::cluster::*;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use std::io::{Read, Write};

fn cases() -> u32 {
    ["FUZZ_PEER_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(256)
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn term() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(i64::MAX as u64 + 1),
        0u64..100,
        any::<u64>(),
    ]
}

fn node() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(1)),
        Just(json!(2)),
        Just(json!(0)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!("1")),
        any::<u64>().prop_map(|n| json!(n)),
    ]
}

fn log_id() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        (term(), node(), term()).prop_map(|(t, n, i)| json!({
            "leader_id": {"term": t, "node_id": n}, "index": i
        })),
        Just(json!({"leader_id": {"term": 1}, "index": "x"})),
    ]
}

fn vote() -> impl Strategy<Value = Value> {
    (term(), node(), any::<bool>()).prop_map(|(t, n, c)| {
        json!({
            "leader_id": {"term": t, "node_id": n}, "committed": c
        })
    })
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        "[ -~]{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map("[a-zA-Z_]{1,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A log id past the replica's log. A leader (committed vote) that contradicts
/// committed entries is lying about the log: outside the model (a peer that knows the
/// cluster_id is trusted; openraft asserts it does not happen).
fn far_log_id() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        (term(), node(), 1_000_000u64..).prop_map(|(t, n, i)| json!({
            "leader_id": {"term": t, "node_id": n}, "index": i
        })),
    ]
}

fn entry() -> impl Strategy<Value = Value> {
    (
        far_log_id(),
        prop_oneof![
            Just(json!("Blank")),
            any_json().prop_map(|v| json!({"Normal": v})),
            any_json().prop_map(|v| json!({"Membership": v})),
            Just(json!({"Normal": {"SetWeight": {"pool": "web", "backend": "b1", "weight": 0}}})),
            Just(json!({"Normal": {"SetPools": {"pools": {}, "if_version": null}}})),
        ],
    )
        .prop_map(|(l, p)| json!({"log_id": l, "payload": p}))
}

fn command() -> impl Strategy<Value = Value> {
    prop_oneof![
        any_json(),
        (any::<u32>(), "[a-z0-9]{0,4}")
            .prop_map(|(w, b)| json!({"SetWeight": {"pool": "web", "backend": b, "weight": w}})),
        any::<bool>()
            .prop_map(|d| json!({"SetDrained": {"pool": "web", "backend": "b1", "drained": d}})),
        Just(json!({"SetPools": {"pools": {}, "if_version": u64::MAX}})),
        Just(json!({"SetPools": {"pools": {"p": {"backends": []}}, "if_version": null}})),
        Just(json!({"AddBackend": {"pool": "nope", "backend": {"name": "", "address": "::::"}}})),
        Just(json!({"RemoveBackend": {"pool": "web", "backend": "b1"}})),
        Just(json!({"Init": {"uuid": "00000000-0000-0000-0000-000000000000", "pools": {}}})),
    ]
}

/// A raftlb request body: valid in shape, hostile in content, or anything.
fn body() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("Hello")),
        Just(json!("Read")),
        Just(json!("Removed")),
        (vote(), log_id(), any::<bool>()).prop_map(|(v, l, t)| json!({"Vote": {"vote": v, "last_log_id": l, "leadership_transfer": t}})),
        (vote(), log_id()).prop_map(|(v, l)| json!({"PreVote": {"vote": v, "last_log_id": l, "leadership_transfer": false}})),
        (vote(), far_log_id(), proptest::collection::vec(entry(), 0..20), log_id()).prop_map(|(v, p, e, c)| json!({"Append": {"vote": v, "prev_log_id": p, "entries": e, "leader_commit": c}})),
        // Consecutive entries after a far prev_log_id, from a committed vote.
        (term(), 1_000_000u64..u64::MAX - 100, 0usize..20, log_id()).prop_map(|(t, prev, n, c)| {
            let entries: Vec<Value> = (1..=n as u64)
                .map(|i| json!({"log_id": {"leader_id": {"term": t, "node_id": 99}, "index": prev + i}, "payload": "Blank"}))
                .collect();
            json!({"Append": {
                "vote": {"leader_id": {"term": t, "node_id": 99}, "committed": true},
                "prev_log_id": {"leader_id": {"term": t, "node_id": 99}, "index": prev},
                "entries": entries, "leader_commit": c}})
        }),
        (vote(), log_id(), any_json(), proptest::collection::vec(any::<u8>(), 0..200)).prop_map(|(v, l, m, d)| json!({"Snapshot": {"vote": v, "meta": {"last_log_id": l, "last_membership": m, "snapshot_id": "x"}, "data": d}})),
        // A valid membership (node 1 the one voter), so the data is what gets tested.
        (term(), far_log_id(), proptest::collection::vec(any::<u8>(), 0..200)).prop_map(|(t, l, d)| json!({"Snapshot": {
            "vote": {"leader_id": {"term": t, "node_id": 99}, "committed": true},
            "meta": {"last_log_id": l, "last_membership": {"log_id": null, "membership": {"configs": [[1]], "nodes": {"1": {"addr": "127.0.0.1:1"}}}}, "snapshot_id": "x"},
            "data": d}})),
        (vote(), node(), log_id()).prop_map(|(v, n, l)| json!({"TransferLeader": {"from_leader": v, "to": n, "last_log_id": l}})),
        (command(), term()).prop_map(|(c, d)| json!({"Write": {"command": c, "deadline_ms": d}})),
        node().prop_map(|n| json!({"MoveLeader": {"to": n}})),
        node().prop_map(|n| json!({"TransferLease": {"to": n}})),
        (node(), "[ -~]{0,30}", any::<bool>()).prop_map(|(id, a, l)| json!({"Manage": {"AddMember": {"id": id, "address": a, "learner": l}}})),
        node().prop_map(|id| json!({"Manage": {"Promote": {"id": id}}})),
        node().prop_map(|id| json!({"Manage": {"Remove": {"id": id}}})),
        any_json(),
    ]
}

/// Bytes to send on one connection.
fn input() -> impl Strategy<Value = Vec<u8>> {
    let envelope = (
        prop_oneof![
            4 => Just("test".to_string()),
            1 => "[ -~]{0,10}",
        ],
        prop_oneof![
            4 => Just(Value::Null),
            1 => Just(json!("6f1e0c4e-0000-4000-8000-000000000000")),
            1 => any_json(),
        ],
        prop_oneof![4 => Just(json!(99)), 1 => node()],
        body(),
    )
        .prop_map(|(c, u, f, b)| {
            // A removal sent by the leader the replica follows is obeyed: it stops,
            // as it should, and that would end the campaign (a generated Append
            // from a committed leader makes node 99, or whichever its vote names, the
            // leader). So removals come from node 98, which no generated vote names
            // but by a 2^-64 chance, and are refused.
            let f = if b == json!("Removed") { json!(98) } else { f };
            json!({"cluster_id": c, "uuid": u, "from": f, "body": b})
                .to_string()
                .into_bytes()
        })
        .boxed();
    prop_oneof![
        // A valid frame.
        4 => envelope.clone().prop_map(|b| framed(&b)),
        // Cut short: the length says more than follows.
        1 => (envelope.clone(), 1usize..1000).prop_map(|(b, cut)| {
            let mut f = framed(&b);
            f.truncate(f.len().saturating_sub(cut).max(4));
            f
        }),
        // A frame's bytes flipped here and there.
        1 => (envelope, proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)).prop_map(|(b, flips)| {
            let mut f = framed(&b);
            for (i, byte) in flips {
                let at = 4 + i.index(f.len() - 4);
                f[at] = byte;
            }
            f
        }),
        // Noise, with or without a plausible length.
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| framed(&b)),
    ]
}

/// Sends `bytes` on a new connection, reads whatever comes back for up to 2 s.
fn exchange(peer: SocketAddr, bytes: &[u8]) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect_timeout(&peer, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    Ok(())
}

/// The process is running and nothing in it panicked (openraft's core runs as a
/// task: its panic leaves the process up with Raft stopped). Reads the log from
/// `seen` on (the log grows with every case), and moves `seen` to its end.
fn alive(lb: &mut Raftlb, seen: &mut u64) -> Result<(), String> {
    use std::io::Seek;
    match lb.child.try_wait() {
        Ok(None) => {}
        Ok(Some(status)) => return Err(format!("raftlb exited with {status}:\n{}", lb.log())),
        Err(e) => return Err(e.to_string()),
    }
    let mut file =
        std::fs::File::open(lb.dir.path().join("raftlb.log")).map_err(|e| e.to_string())?;
    file.seek(std::io::SeekFrom::Start(*seen))
        .map_err(|e| e.to_string())?;
    let mut new = Vec::new();
    file.read_to_end(&mut new).map_err(|e| e.to_string())?;
    // Keep a little overlap, so a line cut at the end is read whole next time.
    *seen += (new.len() as u64).saturating_sub(200);
    let log = String::from_utf8_lossy(&new);
    // A peer frame must not stop openraft's core either (the store is then rebuilt).
    if let Some(at) = log.find("the Raft store failed") {
        return Err(format!(
            "a frame stopped Raft: {}",
            log.get(at..(at + 600).min(log.len())).unwrap_or(&log)
        ));
    }
    if !log.contains("panicked") {
        return Ok(());
    }
    // The first panic in the whole log: later ones may only follow from it.
    let whole = lb.log();
    let at = whole.find("panicked").unwrap_or(0);
    Err(format!(
        "a panic in raftlb: {}",
        whole
            .get(at.saturating_sub(3000)..(at + 1500).min(whole.len()))
            .unwrap_or(&whole)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_survives_generated_frames_and_hostile_raft_messages() {
    raise_nofile();
    let b1 = named_backend("b1").await;
    let cluster = Cluster::new(1, vec![("b1".to_string(), b1)]);
    let (mut replicas, _) = blocking(|| cluster.start_all_with(""));
    let lb = &mut replicas[0];
    let peer = cluster.addrs[0].peer;
    let admin = cluster.addrs[0].admin;
    let pid = lb.pid();
    let (hwm_before, _) = memory_kib(pid);

    // Fixed cases: oversized announcements, a frame of 16 MiB of one Append with
    // 100,000 entries, a deeply nested body.
    let entries: Vec<Value> = (0..100_000u64)
        .map(|i| json!({"log_id": {"leader_id": {"term": u64::MAX, "node_id": 99}, "index": u64::MAX - i}, "payload": "Blank"}))
        .collect();
    let huge_append = json!({"cluster_id": "test", "uuid": null, "from": 99, "body": {"Append": {
        "vote": {"leader_id": {"term": 1, "node_id": 99}, "committed": false},
        "prev_log_id": {"leader_id": {"term": 1, "node_id": 99}, "index": u64::MAX},
        "entries": entries,
        "leader_commit": {"leader_id": {"term": 1, "node_id": 99}, "index": u64::MAX}}}})
    .to_string();
    // The same shape from a "leader" with a committed vote of a higher term, its
    // entries consecutive after a prev_log_id past the replica's log.
    let entries: Vec<Value> = (1..=100_000u64)
        .map(|i| json!({"log_id": {"leader_id": {"term": 1000, "node_id": 99}, "index": 1_000_000 + i}, "payload": "Blank"}))
        .collect();
    let leaderly_append =
        json!({"cluster_id": "test", "uuid": null, "from": 99, "body": {"Append": {
        "vote": {"leader_id": {"term": 1000, "node_id": 99}, "committed": true},
        "prev_log_id": {"leader_id": {"term": 1000, "node_id": 99}, "index": 1_000_000},
        "entries": entries,
        "leader_commit": {"leader_id": {"term": 1000, "node_id": 99}, "index": 1_100_000}}}})
        .to_string();
    let nested = format!(
        "{{\"cluster_id\": \"test\", \"uuid\": null, \"from\": 99, \"body\": {}{}}}",
        "[".repeat(1 << 20),
        "]".repeat(1 << 20)
    );
    let fixed: Vec<(&str, Vec<u8>)> = vec![
        ("length u32::MAX", u32::MAX.to_be_bytes().to_vec()),
        (
            "length 16 MiB + 1",
            ((16u32 << 20) + 1).to_be_bytes().to_vec(),
        ),
        ("length 16 MiB, 1 MiB sent", {
            let mut f = (16u32 << 20).to_be_bytes().to_vec();
            f.extend(vec![b'{'; 1 << 20]);
            f
        }),
        // Regressions found by the generated cases: an Append whose vote is not
        // committed stopped openraft's core (an assertion), and so did a vote of term
        // u64::MAX at the replica's next election (term + 1 overflowed). Both are
        // refused at the peer port now.
        (
            "Append with 100,000 entries, vote not committed",
            framed(huge_append.as_bytes()),
        ),
        (
            "Append, vote not committed, no entries",
            framed(
                json!({"cluster_id": "test", "uuid": null, "from": 99, "body": {"Append": {
                    "vote": {"leader_id": {"term": 1, "node_id": 99}, "committed": false},
                    "prev_log_id": null, "entries": [], "leader_commit": null}}})
                .to_string()
                .as_bytes(),
            ),
        ),
        (
            "Vote of term u64::MAX",
            framed(
                json!({"cluster_id": "test", "uuid": null, "from": 99, "body": {"Vote": {
                    "vote": {"leader_id": {"term": u64::MAX, "node_id": 99}, "committed": false},
                    "last_log_id": {"leader_id": {"term": u64::MAX, "node_id": 99}, "index": u64::MAX},
                    "leadership_transfer": false}}})
                .to_string()
                .as_bytes(),
            ),
        ),
        ("body nested 1M deep", framed(nested.as_bytes())),
        // A regression: a leader's snapshot with a valid membership (this replica
        // still its one voter) and data that is not a raftlb state passed the checks;
        // the state machine failed to decode it and openraft's core stopped for good
        // (the store was rebuilt in-process). Refused at the peer port now.
        (
            "Snapshot from a committed leader of term 1000 whose data is not a state",
            framed(
                json!({"cluster_id": "test", "uuid": null, "from": 99, "body": {"Snapshot": {
                    "vote": {"leader_id": {"term": 1000, "node_id": 99}, "committed": true},
                    "meta": {
                        "last_log_id": {"leader_id": {"term": 1000, "node_id": 99}, "index": 2_000_000},
                        "last_membership": {"log_id": null, "membership": {
                            "configs": [[1]], "nodes": {"1": {"addr": peer.to_string()}}}},
                        "snapshot_id": "x"},
                    "data": b"not a raftlb state".to_vec()}}})
                .to_string()
                .as_bytes(),
            ),
        ),
        (
            "Append of 100,000 entries from a committed leader of term 1000",
            framed(leaderly_append.as_bytes()),
        ),
    ];
    let mut seen = 0;
    for (what, bytes) in fixed {
        blocking(|| exchange(peer, &bytes)).unwrap_or_else(|e| panic!("{what}: {e}"));
        alive(lb, &mut seen).unwrap_or_else(|e| panic!("{what}: {e}"));
        println!(
            "fixed case {what} ({} bytes): survived; VmHWM now {} KiB",
            bytes.len(),
            memory_kib(pid).0
        );
    }

    let mut runner = TestRunner::new(RunnerConfig {
        cases: cases(),
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let lb = std::cell::RefCell::new((lb, seen));
    blocking(|| {
        runner
            .run(&input(), |bytes| {
                let sent = exchange(peer, &bytes);
                let (lb, seen) = &mut *lb.borrow_mut();
                // A dead process or a panic explains a refused connection: say that first.
                alive(lb, seen).map_err(TestCaseError::fail)?;
                sent.map_err(TestCaseError::fail)
            })
            .unwrap_or_else(|e| panic!("{e}"));
    });
    let (lb, mut seen) = lb.into_inner();
    let (hwm_after, rss_after) = memory_kib(pid);
    println!(
        "peer fuzz: {} cases; VmHWM {hwm_before} -> {hwm_after} KiB, VmRSS now {rss_after} KiB",
        cases()
    );
    assert!(
        blocking(|| http_get(admin, "/healthz")).is_ok_and(|(c, _)| c == 200),
        "{}",
        lb.log()
    );
    // Frames are capped at 16 MiB and read one at a time here: a few times that at most.
    assert!(
        hwm_after.saturating_sub(hwm_before) <= 256 * 1024,
        "peak memory grew by {} KiB",
        hwm_after - hwm_before
    );
    // Hostile votes may have deposed it: once they stop, it leads and commits again
    // (an election runs after the last case: the log is read for a panic again). A
    // frame may also have replaced the pools or added a voter at a valid address (a
    // peer that knows the cluster_id is trusted): the write replaces the pools, and
    // is expected to commit only while the replica is still the one voter.
    // The voters as a status that answered reports them (a failed read is no answer).
    let voters = || {
        status(admin)["cluster"]["members"]
            .as_array()
            .filter(|m| !m.is_empty())
            .map(|m| m.iter().filter(|m| m["voter"] == true).count())
    };
    let pools = "{\"pools\": {\"web\": {\"backends\": [{\"name\": \"b1\", \"address\": \"127.0.0.1:1\"}]}}}";
    let committed = blocking(|| {
        eventually(Duration::from_secs(30), || match voters() {
            Some(1) => json(admin, "PUT", "/api/v1/config", pools).0 == 200,
            // A voter a frame added cannot vote: nothing commits, but the replica
            // still answers for itself.
            Some(_) => http_get(admin, "/readyz").is_ok(),
            None => false,
        })
    });
    alive(lb, &mut seen).unwrap_or_else(|e| panic!("after the cases: {e}"));
    let now = status(admin);
    println!("after the cases: {now}");
    assert!(committed, "no write commits after the cases:\n{now}");
    for m in now["cluster"]["members"].as_array().into_iter().flatten() {
        assert!(
            m["id"].as_u64().is_some_and(|id| id > 0)
                && m["address"].as_str().is_some_and(|a| a.contains(':')),
            "a member with a bad id or address: {m}"
        );
    }
}
