//! The simulated peer network. Every message between replicas, Raft RPCs and the
//! requests a follower forwards to the Raft leader alike, goes through one
//! [`Router`] as the peer protocol's JSON: links can be cut, messages delayed and
//! reordered (a "storm"), and a paused replica neither sends nor reads while time
//! runs on. The leader's side of a forwarded write mirrors `store::Node`'s
//! (`handle` and `on_leader`), which is bound to the TCP peer channel.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{BasicNode, Instant as _, ServerState, SnapshotPolicy};
use raftlb::store::WRITE_TIMEOUT;
use raftlb::store::network::{self, CallError, Network, Reply, Request, Transport, WriteReply};
use raftlb::store::storage::Raft;
use raftlb::store::types::{Command, NodeId, Outcome, TypeConfig};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Raft's timing, mapped to openraft's config as `store::Node::start` maps
/// `cluster.heartbeat_interval` and `cluster.election_timeout`.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub heartbeat: Duration,
    pub election_timeout: Duration,
}

impl Timing {
    pub fn raft_config(self) -> openraft::Config {
        let et = millis(self.election_timeout);
        openraft::Config {
            cluster_name: "sim".into(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: et,
            election_timeout_max: et * 2,
            install_snapshot_timeout: et.max(2000),
            // Small, so lagging replicas are caught up by snapshot install.
            snapshot_policy: SnapshotPolicy::LogsSinceLast(20),
            max_in_snapshot_log_to_keep: 5,
            enable_pre_vote: Some(true),
            ..Default::default()
        }
    }
}

/// The normal one-way delay of a message, in milliseconds (inclusive range).
const DELAY_MS: (u64, u64) = (1, 3);

struct Up {
    raft: Raft,
    /// Which start of the replica this is: a message sent to an earlier one is lost.
    incarnation: u64,
}

/// Links whose messages are each held back by a random time up to `max`.
struct Storm {
    links: BTreeSet<(NodeId, NodeId)>,
    max: Duration,
    until: Duration,
}

/// When an armed stall begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// The next time the replica's process wakes up, for whatever event.
    WakeUp,
    /// When the answer to one of its lease writes arrives, before it is handled.
    LeaseAnswer,
}

/// A replica frozen since `since`.
struct Pause {
    serial: u64,
    since: Duration,
}

/// Faults as they happened, for the checkers.
#[derive(Default)]
pub struct FaultLog {
    /// Each pause: the replica, when it began and when it ended (resumed or crashed).
    pub pauses: Vec<(NodeId, Duration, Duration)>,
    /// Each storm: when it began and ended.
    pub storms: Vec<(Duration, Duration)>,
    /// When each message a storm held back arrived (or was lost).
    pub late: Vec<Duration>,
}

/// Which replicas are up, which links are cut, which replicas are paused, and how
/// long messages take.
pub struct Router {
    origin: Instant,
    pub timing: Timing,
    up: Mutex<BTreeMap<NodeId, Up>>,
    starts: AtomicU64,
    cut: Mutex<BTreeSet<(NodeId, NodeId)>>,
    paused: watch::Sender<BTreeSet<NodeId>>,
    pauses: Mutex<BTreeMap<NodeId, Pause>>,
    /// Replicas to be paused, for how long, at which moment of their process.
    stalls: Mutex<BTreeMap<NodeId, (Moment, Duration)>>,
    serials: AtomicU64,
    rng: Mutex<fastrand::Rng>,
    storm: Mutex<Option<Storm>>,
    log: Mutex<FaultLog>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("router lock")
}

impl Router {
    pub fn new(timing: Timing, seed: u64) -> Arc<Router> {
        Arc::new(Router {
            origin: Instant::now(),
            timing,
            up: Mutex::default(),
            starts: AtomicU64::new(0),
            cut: Mutex::default(),
            paused: watch::channel(BTreeSet::new()).0,
            pauses: Mutex::default(),
            stalls: Mutex::default(),
            serials: AtomicU64::new(0),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            storm: Mutex::default(),
            log: Mutex::default(),
        })
    }

    /// Simulated time since the router was made.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    pub fn register(&self, id: NodeId, raft: Raft) {
        let incarnation = self.starts.fetch_add(1, Ordering::Relaxed);
        lock(&self.up).insert(id, Up { raft, incarnation });
    }

    /// The replica is down: nothing reaches it, and it is no longer paused.
    pub fn remove(&self, id: NodeId) {
        lock(&self.up).remove(&id);
        lock(&self.stalls).remove(&id);
        self.end_pause(id, None);
    }

    pub fn raft(&self, id: NodeId) -> Option<Raft> {
        lock(&self.up).get(&id).map(|u| u.raft.clone())
    }

    fn incarnation(&self, id: NodeId) -> Option<u64> {
        lock(&self.up).get(&id).map(|u| u.incarnation)
    }

    pub fn linked(&self, a: NodeId, b: NodeId) -> bool {
        !lock(&self.cut).contains(&(a.min(b), a.max(b)))
    }

    /// Cuts every link between `side` and the rest (and heals every other one).
    pub fn partition(&self, side: &BTreeSet<NodeId>, all: &[NodeId]) {
        let mut cut = lock(&self.cut);
        cut.clear();
        for a in side {
            for b in all.iter().filter(|b| !side.contains(b)) {
                cut.insert((*a.min(b), *a.max(b)));
            }
        }
    }

    pub fn heal(&self) {
        lock(&self.cut).clear();
    }

    /// Freezes the replica for `length` (SIGSTOP, then SIGCONT): its process does
    /// nothing, what it would send waits, and so does what reaches it.
    pub fn pause(self: &Arc<Self>, id: NodeId, length: Duration) {
        if self.incarnation(id).is_none() || self.is_paused(id) {
            return;
        }
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let since = self.now();
        lock(&self.pauses).insert(id, Pause { serial, since });
        self.paused.send_modify(|p| {
            p.insert(id);
        });
        let router = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(length).await;
            router.end_pause(id, Some(serial));
        });
    }

    /// Pauses the replica for `length` at `moment`, between an event's arrival and
    /// its handling.
    pub fn stall(&self, id: NodeId, moment: Moment, length: Duration) {
        lock(&self.stalls).insert(id, (moment, length));
    }

    /// The process of `id` woke up for `moment`: a stall armed for it begins now.
    pub fn woke(self: &Arc<Self>, id: NodeId, moment: Moment) {
        let mut stalls = lock(&self.stalls);
        let Some((armed, length)) = stalls.get(&id).copied() else {
            return;
        };
        if armed == Moment::WakeUp || armed == moment {
            stalls.remove(&id);
            drop(stalls);
            self.pause(id, length);
        }
    }

    pub fn is_paused(&self, id: NodeId) -> bool {
        lock(&self.pauses).contains_key(&id)
    }

    /// Resumes every paused replica now, and disarms every stall.
    pub fn resume_all(&self) {
        lock(&self.stalls).clear();
        let ids: Vec<NodeId> = lock(&self.pauses).keys().copied().collect();
        for id in ids {
            self.end_pause(id, None);
        }
    }

    /// Ends the pause of `id` (only pause `serial`, if given).
    fn end_pause(&self, id: NodeId, serial: Option<u64>) {
        let mut pauses = lock(&self.pauses);
        if pauses
            .get(&id)
            .is_none_or(|p| serial.is_some_and(|s| s != p.serial))
        {
            return;
        }
        let pause = pauses.remove(&id).expect("paused");
        drop(pauses);
        lock(&self.log).pauses.push((id, pause.since, self.now()));
        self.paused.send_modify(|p| {
            p.remove(&id);
        });
    }

    /// Returns once the replica is not paused.
    pub async fn thaw(&self, id: NodeId) {
        let mut paused = self.paused.subscribe();
        // The sender lives as long as the router, which the caller holds.
        let _ = paused.wait_for(|p| !p.contains(&id)).await;
    }

    /// For `length`, messages on the directed `links` are each delayed up to `max`.
    pub fn storm(&self, links: BTreeSet<(NodeId, NodeId)>, max: Duration, length: Duration) {
        self.calm();
        let since = self.now();
        let until = since + length;
        *lock(&self.storm) = Some(Storm { links, max, until });
        lock(&self.log).storms.push((since, until));
    }

    /// Ends the storm now, if one blows.
    pub fn calm(&self) {
        let now = self.now();
        if lock(&self.storm).take().is_some_and(|s| now < s.until)
            && let Some((_, end)) = lock(&self.log).storms.last_mut()
        {
            *end = now;
        }
    }

    pub fn storming(&self) -> bool {
        lock(&self.storm)
            .as_ref()
            .is_some_and(|s| self.now() < s.until)
    }

    /// The faults so far (a pause still under way is not in it).
    pub fn fault_log(&self) -> FaultLog {
        let log = lock(&self.log);
        FaultLog {
            pauses: log.pauses.clone(),
            storms: log.storms.clone(),
            late: log.late.clone(),
        }
    }

    /// How long a message from `from` to `to` takes, and whether a storm held it.
    fn delay(&self, from: NodeId, to: NodeId) -> (Duration, bool) {
        let now = self.now();
        let max = lock(&self.storm)
            .as_ref()
            .filter(|s| now < s.until && s.links.contains(&(from, to)))
            .map(|s| s.max);
        let mut rng = lock(&self.rng);
        match max {
            Some(max) => (Duration::from_millis(rng.u64(0..=millis(max))), true),
            None => (
                Duration::from_millis(rng.u64(DELAY_MS.0..=DELAY_MS.1)),
                false,
            ),
        }
    }

    /// Sends `body` from `from` to `to` and waits up to `timeout` for the reply. A
    /// message is carried by a task of its own: one whose caller gave up is still
    /// delivered (a write may commit after its caller's deadline).
    pub async fn call(
        self: &Arc<Self>,
        from: NodeId,
        to: NodeId,
        body: Request,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let sender = self
            .incarnation(from)
            .ok_or_else(|| CallError::Connect(format!("{from} is down")))?;
        let receiver = self
            .incarnation(to)
            .ok_or_else(|| CallError::Connect(format!("{to} is down")))?;
        if !self.linked(from, to) {
            return Err(CallError::Connect(format!("{from} -> {to}: partitioned")));
        }
        let body = wire(&body)?;
        let (tx, rx) = oneshot::channel();
        let router = self.clone();
        tokio::spawn(async move {
            let reply = match router.deliver(from, to, receiver, body).await {
                Some(reply) => wire(&reply).ok(),
                None => None,
            };
            match reply {
                Some(reply) if router.carry(to, from, sender).await => {
                    let _ = tx.send(reply);
                }
                // Lost: the caller sees the connection drop, or hears nothing.
                _ => {
                    if lock(&router.rng).bool() {
                        tokio::time::sleep(timeout).await;
                    }
                }
            }
        });
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => match reply {
                Reply::Error(e) => Err(CallError::Refused(e)),
                reply => Ok(reply),
            },
            Ok(Err(_)) => Err(CallError::Io(format!("{from} -> {to}: connection lost"))),
            Err(_) => Err(CallError::Io(format!("{from} -> {to}: no answer in time"))),
        }
    }

    /// Carries one message from `from` to the start `incarnation` of `to`; false if
    /// it was lost (the link was cut or `to` restarted on the way).
    async fn carry(&self, from: NodeId, to: NodeId, incarnation: u64) -> bool {
        // A paused replica sends nothing...
        self.thaw(from).await;
        let (delay, held) = self.delay(from, to);
        tokio::time::sleep(delay).await;
        // ...and reads nothing.
        self.thaw(to).await;
        if held {
            lock(&self.log).late.push(self.now());
        }
        self.linked(from, to) && self.incarnation(to) == Some(incarnation)
    }

    async fn deliver(
        &self,
        from: NodeId,
        to: NodeId,
        incarnation: u64,
        body: Request,
    ) -> Option<Reply> {
        if !self.carry(from, to, incarnation).await {
            return None;
        }
        let raft = self.raft(to)?;
        Some(match body {
            Request::Write { .. } | Request::MoveLeader { .. } => {
                serve_forwarded(&raft, to, self.timing, body).await
            }
            other => network::raft_rpc(&raft, other)
                .await
                .unwrap_or_else(|r| Reply::Error(format!("not a Raft RPC: {r:?}"))),
        })
    }
}

/// Every message goes through the peer protocol's JSON, as on the wire.
pub fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> Result<T, CallError> {
    serde_json::to_vec(value)
        .and_then(|b| serde_json::from_slice(&b))
        .map_err(|e| CallError::Io(format!("encoding: {e}")))
}

pub struct SimClient {
    from: NodeId,
    to: NodeId,
    router: Arc<Router>,
}

impl Transport for SimClient {
    fn call(
        &mut self,
        body: Request,
        timeout: Duration,
    ) -> impl Future<Output = Result<Reply, CallError>> + Send {
        let (from, to, router) = (self.from, self.to, self.router.clone());
        async move { router.call(from, to, body, timeout).await }
    }
}

pub struct SimFactory {
    pub from: NodeId,
    pub router: Arc<Router>,
}

impl RaftNetworkFactory<TypeConfig> for SimFactory {
    type Network = Network<SimClient>;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        Network::new(SimClient {
            from: self.from,
            to: target,
            router: self.router.clone(),
        })
    }
}

/// `store::Node::write_within` on replica `me`: proposes on the leader `me` knows,
/// directly when it leads, else forwarded through the router; answers "outcome
/// unknown" (`Err`) once `deadline` has passed, though the write may still commit.
pub async fn write_within(
    router: &Arc<Router>,
    me: NodeId,
    command: Command,
    deadline: Duration,
) -> Result<Outcome, String> {
    let request = Request::Write {
        command,
        deadline_ms: millis(deadline),
    };
    let attempt = async {
        let raft = router.raft(me).ok_or("this replica is down")?;
        let metrics = raft.metrics().borrow_watched().clone();
        if let Err(e) = &metrics.running_state {
            return Err(format!("Raft failed: {e}"));
        }
        let leader = metrics.current_leader.ok_or("no Raft leader")?;
        let reply = if leader == me {
            on_leader(&raft, router.timing, request).await
        } else {
            router
                .call(me, leader, request, deadline + Duration::from_secs(1))
                .await
                .map_err(|e| format!("forwarded to node {leader}: {e}"))?
        };
        match reply {
            Reply::Write(WriteReply::Done(outcome)) => Ok(outcome),
            other => Err(format!("{other:?}")),
        }
    };
    tokio::time::timeout(deadline, attempt)
        .await
        .map_err(|_| format!("not known committed within {deadline:?}"))?
}

/// `store::Node::move_leader`: asks the Raft leader to hand leadership to `me`.
pub async fn move_leader_here(router: &Arc<Router>, me: NodeId) -> Result<(), String> {
    let raft = router.raft(me).ok_or("this replica is down")?;
    let leader = raft
        .metrics()
        .borrow_watched()
        .current_leader
        .ok_or("no Raft leader")?;
    if leader == me {
        return Ok(());
    }
    match router
        .call(me, leader, Request::MoveLeader { to: me }, WRITE_TIMEOUT)
        .await
    {
        Ok(Reply::Write(WriteReply::Done(_))) => Ok(()),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// `store::Node::handle` for a forwarded request: never forwarded twice.
async fn serve_forwarded(raft: &Raft, me: NodeId, timing: Timing, request: Request) -> Reply {
    if raft.metrics().borrow_watched().current_leader != Some(me) {
        let why = format!("node {me} is not the Raft leader any more");
        return Reply::Write(WriteReply::NotProposed(why));
    }
    on_leader(raft, timing, request).await
}

/// `store::Node::quorum_reachable` on a leader.
fn quorum_reachable(raft: &Raft, timing: Timing) -> bool {
    let metrics = raft.metrics().borrow_watched().clone();
    metrics.state == ServerState::Leader
        && metrics
            .last_quorum_acked
            .is_some_and(|at| at.elapsed() < timing.election_timeout * 2)
}

/// `store::Node::on_leader` for writes and leadership moves.
async fn on_leader(raft: &Raft, timing: Timing, request: Request) -> Reply {
    let deadline = match &request {
        Request::Write { deadline_ms, .. } => Duration::from_millis(*deadline_ms),
        _ => WRITE_TIMEOUT,
    };
    // A leader elected a moment ago hears from its quorum within a heartbeat.
    let until = Instant::now() + timing.election_timeout.min(deadline);
    while !quorum_reachable(raft, timing) && Instant::now() < until {
        tokio::time::sleep(timing.heartbeat / 2).await;
    }
    if !quorum_reachable(raft, timing) {
        return Reply::Write(WriteReply::NotProposed(
            "this replica leads but has not heard from a quorum recently".into(),
        ));
    }
    match request {
        Request::Write { command, .. } => {
            let result = tokio::time::timeout(deadline, raft.client_write(command)).await;
            Reply::Write(match result {
                Ok(Ok(response)) => WriteReply::Done(response.data),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    WriteReply::NotProposed(format!("not the Raft leader any more ({f})"))
                }
                Ok(Err(e)) => WriteReply::Unknown(e.to_string()),
                Err(_) => WriteReply::Unknown(format!("not committed within {deadline:?}")),
            })
        }
        Request::MoveLeader { to } => {
            let here = raft.metrics().borrow_watched().id;
            Reply::Write(if to == here {
                WriteReply::Done(Outcome::Applied { config_version: 0 })
            } else {
                match raft.trigger().transfer_leader(to).await {
                    Ok(()) => WriteReply::Done(Outcome::Applied { config_version: 0 }),
                    Err(e) => {
                        WriteReply::NotProposed(format!("cannot hand leadership to {to}: {e}"))
                    }
                }
            })
        }
        other => Reply::Error(format!("not a leader request: {other:?}")),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
