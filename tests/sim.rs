//! Simulated clusters: the real Raft store (openraft + the redb storage + the state
//! machine + the peer protocol's messages and RPC code) on an in-memory network
//! ([`net`]) that can be partitioned, delay and reorder messages and freeze paused
//! replicas, with replicas crashed and restarted from their data_dir. Time is
//! tokio's paused clock, so a schedule of minutes runs in a moment.
//!
//! Here: the store's scenarios (no acknowledged write is lost). In [`lease`]: the
//! leader-election lease on top, "never two active replicas".
//!
//! `SIM_SCHEDULES` sets how many randomized schedules each run (default 100); each
//! one's seed is printed on failure and `SIM_SEED=<seed>` replays that schedule
//! alone. The seed fixes the fault schedule; openraft's election timeouts stay
//! random, so a replay follows the same faults, not necessarily the same elections.

#[path = "sim/lease.rs"]
mod lease;
#[path = "sim/net.rs"]
mod net;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use net::{Router, SimFactory, Timing};
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{BasicNode, Instant as _, ServerState};
use raftlb::store::storage::Raft;
use raftlb::store::storage::{self, Applied};
use raftlb::store::types::{Command, NodeId, Outcome};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The store scenarios' Raft timing (`heartbeat_interval: 50ms`, `election_timeout: 150ms`).
const STORE_TIMING: Timing = Timing {
    heartbeat: Duration::from_millis(50),
    election_timeout: Duration::from_millis(150),
};

struct SimNode {
    dir: PathBuf,
    raft: Option<Raft>,
    applied: watch::Receiver<Arc<Applied>>,
}

struct Sim {
    _root: tempfile::TempDir,
    ids: Vec<NodeId>,
    nodes: BTreeMap<NodeId, SimNode>,
    router: Arc<Router>,
    /// The state each applied index led to, as first seen on any replica: two
    /// replicas that applied the same index must hold the same state.
    seen: BTreeMap<u64, String>,
}

fn scratch() -> tempfile::TempDir {
    // tmpfs when there is one: the sim does thousands of fsyncs.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("tempdir")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

async fn start_raft(
    id: NodeId,
    dir: &Path,
    router: &Arc<Router>,
) -> (Raft, watch::Receiver<Arc<Applied>>) {
    // A crashed replica's store may still be held for a moment by its last tasks.
    let mut tries = 0;
    let db = loop {
        match storage::open(dir) {
            Ok(db) => break db,
            Err(_) if tries < 500 => {
                // Its flusher may still be finishing an fsync on the blocking pool.
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("node {id}: cannot reopen its store: {e}"),
        }
    };
    let config = router.timing.raft_config().validate().expect("config");
    let (log, sm) =
        storage::raft_storage(db, watch::channel(Arc::default()).0).expect("state machine");
    let applied = sm.subscribe();
    let factory = SimFactory {
        from: id,
        router: router.clone(),
    };
    let raft = Raft::new(id, Arc::new(config), factory, log, sm)
        .await
        .expect("raft");
    router.register(id, raft.clone());
    (raft, applied)
}

impl Sim {
    async fn new(n: u64, timing: Timing, seed: u64) -> Sim {
        let root = scratch();
        let router = Router::new(timing, seed);
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        for id in &ids {
            let dir = root.path().join(id.to_string());
            let (raft, applied) = start_raft(*id, &dir, &router).await;
            nodes.insert(
                *id,
                SimNode {
                    dir,
                    raft: Some(raft),
                    applied,
                },
            );
        }
        let members: BTreeMap<NodeId, BasicNode> =
            ids.iter().map(|id| (*id, BasicNode::default())).collect();
        nodes[&1]
            .raft
            .as_ref()
            .expect("up")
            .initialize(members)
            .await
            .expect("initialize");
        Sim {
            _root: root,
            ids,
            nodes,
            router,
            seen: BTreeMap::new(),
        }
    }

    fn up(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.raft.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    fn raft(&self, id: NodeId) -> Option<&Raft> {
        self.nodes.get(&id).and_then(|n| n.raft.as_ref())
    }

    /// The leader `via` knows of, if `via` can reach it.
    fn leader_seen_by(&self, via: NodeId) -> Option<NodeId> {
        let leader = self.raft(via)?.metrics().borrow_watched().current_leader?;
        (self.raft(leader).is_some() && self.router.linked(via, leader)).then_some(leader)
    }

    async fn crash(&mut self, id: NodeId) {
        self.router.remove(id);
        if let Some(raft) = self.nodes.get_mut(&id).and_then(|n| n.raft.take()) {
            let _ = raft.shutdown().await;
        }
    }

    async fn restart(&mut self, id: NodeId) {
        let dir = self.nodes[&id].dir.clone();
        let (raft, applied) = start_raft(id, &dir, &self.router).await;
        let node = self.nodes.get_mut(&id).expect("node");
        node.raft = Some(raft);
        node.applied = applied;
    }

    /// State machine safety: the same applied index means the same state everywhere.
    fn check_applied(&mut self) -> Result<(), String> {
        for (id, node) in &self.nodes {
            let applied = node.applied.borrow().clone();
            let Some(index) = applied.last_applied.map(|l| l.index) else {
                continue;
            };
            let state = serde_json::to_string(&applied.state).map_err(|e| e.to_string())?;
            match self.seen.get(&index) {
                Some(before) if *before != state => {
                    return Err(format!(
                        "node {id} applied index {index} to a different state:\n{state}\nvs\n{before}"
                    ));
                }
                Some(_) => {}
                None => {
                    self.seen.insert(index, state);
                }
            }
        }
        Ok(())
    }

    /// Heals everything, restarts every replica, and waits until all agree.
    async fn converge(&mut self) -> Result<Applied, String> {
        self.router.heal();
        for id in self.ids.clone() {
            if self.raft(id).is_none() {
                self.restart(id).await;
            }
        }
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.check_applied()?;
            let states: Vec<Arc<Applied>> = self
                .nodes
                .values()
                .map(|n| n.applied.borrow().clone())
                .collect();
            let leader = self.leader_seen_by(self.ids[0]);
            let same = states.windows(2).all(|w| {
                w[0].last_applied == w[1].last_applied
                    && serde_json::to_value(&w[0].state).ok()
                        == serde_json::to_value(&w[1].state).ok()
            });
            if same && leader.is_some() && states[0].last_applied.is_some() {
                return Ok(states[0].as_ref().clone());
            }
        }
        Err("the replicas did not converge within 60 s after healing".into())
    }

    async fn shutdown(mut self) {
        for id in self.up() {
            self.crash(id).await;
        }
    }
}

fn record(key: &str) -> Command {
    Command::Cas {
        key: key.to_string(),
        expect: 0,
        value: Some(serde_json::json!(key)),
    }
}

/// Proposes a write on `leader`; true when it was acknowledged (committed).
fn propose(raft: Raft, key: String) -> JoinHandle<(String, bool)> {
    tokio::spawn(async move {
        let result =
            tokio::time::timeout(Duration::from_secs(2), raft.client_write(record(&key))).await;
        let acked = matches!(&result, Ok(Ok(r)) if matches!(r.data, Outcome::Record { .. }));
        if !acked {
            // Shown when a test fails on this write.
            eprintln!(
                "write {key} not acknowledged: {:?}",
                result.map(|r| r.map(|r| r.data))
            );
        }
        (key, acked)
    })
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

async fn wait_for_leader(sim: &Sim, among: &[NodeId]) -> Option<NodeId> {
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for id in among {
            let leader = sim.leader_seen_by(*id);
            if let Some(l) = leader
                && among.contains(&l)
                && sim.raft(l).is_some_and(|r| {
                    // A leader takes writes once a quorum acknowledged it (its lease).
                    let m = r.metrics().borrow_watched().clone();
                    m.state == ServerState::Leader
                        && m.last_quorum_acked
                            .is_some_and(|at| at.elapsed() < Duration::from_millis(150))
                })
            {
                return Some(l);
            }
        }
    }
    None
}

#[test]
fn a_minority_cannot_commit_the_majority_can_and_healing_converges() {
    paused_runtime().block_on(async {
        let mut sim = Sim::new(5, STORE_TIMING, 0).await;
        let old = wait_for_leader(&sim, &sim.ids.clone())
            .await
            .expect("a leader");
        let before = propose(sim.raft(old).expect("up").clone(), "before".into());
        assert!(
            before.await.expect("task").1,
            "a write with every replica up"
        );

        // The old leader and one follower on one side, three replicas on the other.
        let buddy = sim
            .ids
            .iter()
            .copied()
            .find(|id| *id != old)
            .expect("buddy");
        let minority = BTreeSet::from([old, buddy]);
        sim.router.partition(&minority, &sim.ids);
        let lost = propose(sim.raft(old).expect("up").clone(), "minority".into());
        let majority: Vec<NodeId> = sim
            .ids
            .iter()
            .copied()
            .filter(|id| !minority.contains(id))
            .collect();
        let new = wait_for_leader(&sim, &majority)
            .await
            .expect("the majority elects a leader");
        let mut acked = Vec::new();
        for i in 0..5 {
            let w = propose(sim.raft(new).expect("up").clone(), format!("majority-{i}"));
            let (key, ok) = w.await.expect("task");
            assert!(ok, "the majority side must commit {key}");
            acked.push(key);
        }
        let (_, minority_acked) = lost.await.expect("task");
        assert!(
            !minority_acked,
            "a leader cut off from the quorum committed"
        );
        sim.check_applied().expect("safety");

        let state = sim.converge().await.expect("converge");
        for key in acked.iter().chain(["before".to_string()].iter()) {
            assert!(state.state.records.contains_key(key), "{key} was lost");
        }
        assert!(
            !state.state.records.contains_key("minority"),
            "the minority's write must not survive the heal"
        );
        sim.shutdown().await;
    });
}

#[test]
fn a_replica_behind_the_purged_log_is_caught_up_by_a_snapshot() {
    paused_runtime().block_on(async {
        let mut sim = Sim::new(3, STORE_TIMING, 0).await;
        let leader = wait_for_leader(&sim, &sim.ids.clone())
            .await
            .expect("a leader");
        let lagging = sim
            .ids
            .iter()
            .copied()
            .find(|id| *id != leader)
            .expect("follower");
        let behind = sim.nodes[&lagging]
            .applied
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        sim.crash(lagging).await;
        for i in 0..60 {
            let w = propose(sim.raft(leader).expect("up").clone(), format!("k{i}"));
            assert!(w.await.expect("task").1, "write {i} with a quorum up");
        }
        // Let the leader snapshot and purge past what the lagging replica holds.
        let mut purged = 0;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let metrics = sim
                .raft(leader)
                .expect("up")
                .metrics()
                .borrow_watched()
                .clone();
            purged = metrics.purged.map_or(0, |l| l.index);
            if purged > behind + 1 {
                break;
            }
        }
        assert!(
            purged > behind + 1,
            "the leader did not purge its log (purged {purged}, the lagging replica has {behind})"
        );
        let state = sim
            .converge()
            .await
            .expect("the lagging replica catches up");
        assert!((0..60).all(|i| state.state.records.contains_key(&format!("k{i}"))));
        let snapshot = sim
            .raft(lagging)
            .expect("up")
            .metrics()
            .borrow_watched()
            .snapshot;
        assert!(snapshot.is_some(), "the lagging replica holds a snapshot");
        sim.shutdown().await;
    });
}

/// One randomized schedule of writes, partitions, crashes and restarts.
async fn schedule(seed: u64) -> Result<usize, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = if seed.is_multiple_of(2) { 3 } else { 5 };
    let mut sim = Sim::new(n, STORE_TIMING, seed).await;
    let mut writes: Vec<JoinHandle<(String, bool)>> = Vec::new();
    for step in 0..40 {
        match rng.u32(0..100) {
            0..40 => {
                let up = sim.up();
                if let Some(via) = (!up.is_empty()).then(|| up[rng.usize(0..up.len())])
                    && let Some(leader) = sim.leader_seen_by(via)
                {
                    let raft = sim.raft(leader).expect("up").clone();
                    writes.push(propose(raft, format!("s{seed}-w{step}")));
                }
            }
            40..55 => {
                let side: BTreeSet<NodeId> =
                    sim.ids.iter().copied().filter(|_| rng.bool()).collect();
                sim.router.partition(&side, &sim.ids);
            }
            55..65 => sim.router.heal(),
            65..80 => {
                let up = sim.up();
                if !up.is_empty() {
                    sim.crash(up[rng.usize(0..up.len())]).await;
                }
            }
            80..90 => {
                let down: Vec<NodeId> = sim
                    .ids
                    .iter()
                    .copied()
                    .filter(|id| sim.raft(*id).is_none())
                    .collect();
                if !down.is_empty() {
                    sim.restart(down[rng.usize(0..down.len())]).await;
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.u64(10..1500))).await,
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(20..300))).await;
        sim.check_applied()?;
    }
    let mut acked = Vec::new();
    for w in writes {
        let (key, ok) = w.await.map_err(|e| e.to_string())?;
        if ok {
            acked.push(key);
        }
    }
    let state = sim.converge().await?;
    for key in &acked {
        if !state.state.records.contains_key(key) {
            return Err(format!("acknowledged write {key} was lost"));
        }
    }
    // Still live: the healed cluster commits (a leader change may cost an attempt).
    let mut committed = false;
    for attempt in 0..5 {
        let ids = sim.ids.clone();
        let Some(leader) = wait_for_leader(&sim, &ids).await else {
            continue;
        };
        let raft = sim.raft(leader).expect("up").clone();
        let (_, ok) = propose(raft, format!("after-{attempt}"))
            .await
            .map_err(|e| e.to_string())?;
        if ok {
            committed = true;
            break;
        }
    }
    if !committed {
        let metrics: Vec<String> = sim
            .up()
            .iter()
            .filter_map(|id| sim.raft(*id))
            .map(|r| format!("{:?}", r.metrics().borrow_watched()))
            .collect();
        return Err(format!(
            "the healed cluster does not commit:\n{}",
            metrics.join("\n")
        ));
    }
    sim.shutdown().await;
    Ok(acked.len())
}

/// The seeds to run: `SIM_SEED` alone, else 1..=`SIM_SCHEDULES` (default 100).
fn seeds() -> Vec<u64> {
    match std::env::var("SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("SIM_SCHEDULES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            (1..=n).collect()
        }
    }
}

/// Runs `schedule` for every seed, two at a time (two cores), each on its own
/// paused runtime; a failure names its seed and how to replay it.
fn run_each<T: Send>(
    seeds: &[u64],
    schedule: impl Fn(u64) -> Result<T, String> + Sync,
) -> Vec<Result<T, String>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(seed) = seeds.get(i) else {
                            return out;
                        };
                        out.push(schedule(*seed).map_err(|why| {
                            format!("schedule {seed}: {why}\nreplay it with SIM_SEED={seed}")
                        }));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    })
}

#[test]
fn no_acknowledged_write_is_lost_across_random_crash_and_partition_schedules() {
    let seeds = seeds();
    let results = run_each(&seeds, |seed| paused_runtime().block_on(schedule(seed)));
    let mut acked = 0;
    for result in results {
        match result {
            Ok(n) => acked += n,
            Err(why) => panic!("{why}"),
        }
    }
    // The schedules must actually commit writes through their faults.
    assert!(
        acked >= seeds.len(),
        "only {acked} writes acknowledged in {} schedules",
        seeds.len()
    );
    eprintln!(
        "{} schedules, {acked} acknowledged writes, none lost",
        seeds.len()
    );
}
