//! The embedded Raft store (openraft + redb): replicated pools, membership, records.
//!
//! [`Node::start`] opens `data_dir`, checks the identity recorded there, starts
//! openraft and the peer channel, and bootstraps a new cluster only once a quorum of
//! the configured peers answers "empty, same cluster_id, same peers". The proxy never
//! reaches in here: it follows [`Node::applied`], a watch of the applied state.

pub mod backup;
pub mod network;
pub mod storage;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, Instant as _, ServerState, SnapshotPolicy};
use redb::Database;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::millis;
use crate::config::schema::{self, InitialState};
use crate::config::types::HostPort;
use crate::metrics as m;
pub use network::LeaseSettings;
use network::{
    CallError, Factory, HelloReply, Identity, Manage, Net, PeerClient, Reply, Request, Tls,
    WriteReply,
};
use storage::{Applied, Raft};
use types::{Command, Node as RaftNode, NodeId, NodeInfo, Outcome, TypeConfig, to_completion};

/// How long a write may wait for its commit before the answer is "outcome unknown".
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many idle connections to the leader a replica keeps for forwarded requests.
const FORWARDERS: usize = 16;
/// A kept connection idle this long is not reused: the leader may have gone away.
const FORWARD_IDLE: Duration = Duration::from_secs(5);
/// Take a snapshot (and compact the log) after this many entries.
const SNAPSHOT_EVERY: u64 = 1000;
/// A member heard from on the peer channel within this long counts as reachable.
const REACHABLE_WITHIN: Duration = Duration::from_secs(3);
/// A member not heard from within this long is sent a hello (a follower hears only
/// its leader otherwise).
const HELLO_AFTER: Duration = Duration::from_secs(1);

/// A removal this replica applied is its own once, for this long (or four election
/// timeouts, if longer), no log entry has arrived, no leader has sent it anything
/// and no later entry adds it back: one added again under the same id replays its
/// old self's removal while it catches up, a batch at a time, and the leader keeps
/// replicating to a member (a removed one hears nothing more).
const REMOVAL_SETTLES: Duration = Duration::from_secs(2);

/// How often a replica waiting to be added says it is still waiting.
const WAITING_REMINDER: Duration = Duration::from_secs(10);

/// What `data_dir` records about the cluster it belongs to.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Recorded {
    cluster_id: String,
    node_id: NodeId,
    uuid: Option<Uuid>,
}

/// Why a replica cannot start (or must stop): its config or data_dir (exit 2), or
/// the system (exit 1), and what to tell the operator.
#[derive(Clone, Debug)]
pub struct Fatal {
    pub kind: FatalKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatalKind {
    Config,
    Runtime,
}

fn config_error(message: impl Into<String>) -> Fatal {
    Fatal {
        kind: FatalKind::Config,
        message: message.into(),
    }
}

fn runtime_error(message: impl Into<String>) -> Fatal {
    Fatal {
        kind: FatalKind::Runtime,
        message: message.into(),
    }
}

/// Why a write failed; every variant is a 503 or a 4xx for the admin API.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Nothing was proposed, nothing changed.
    #[error("{0}")]
    NotProposed(String),
    /// Proposed, but not known committed in time: it may still commit.
    #[error("{0}")]
    Unknown(String),
    /// Bad input, refused before proposing.
    #[error("{0}")]
    Invalid(String),
}

/// A request to give the lease away, handed to whoever serves them here (the
/// election, when it runs).
pub struct LeaseTransfer {
    pub to: Option<NodeId>,
    pub done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// One replica of the Raft group.
pub struct Node {
    pub id: NodeId,
    pub cluster_id: String,
    /// Replaced when the store failed and was rebuilt (see [`Node::rebuild`]).
    raft: RwLock<Raft>,
    /// `None` while the store is being rebuilt.
    db: RwLock<Option<Arc<Database>>>,
    /// The store's flusher (`None` while the store is being rebuilt: the
    /// flusher holds the file).
    flusher: RwLock<Option<storage::Flusher>>,
    data_dir: PathBuf,
    raft_config: Arc<openraft::Config>,
    pub identity: Arc<Identity>,
    net: Arc<Net>,
    publish: watch::Sender<Arc<Applied>>,
    applied: watch::Receiver<Arc<Applied>>,
    peers: BTreeMap<NodeId, String>,
    heartbeat: Duration,
    election_timeout: Duration,
    seed: BTreeMap<String, schema::Pool>,
    /// `node.name`, told to the others (status `members[].name`).
    name: String,
    fatal: watch::Sender<Option<Fatal>>,
    /// Kept-open connections to the leader for forwarded requests, with the time
    /// each went idle.
    forwarders: std::sync::Mutex<Vec<(PeerClient, std::time::Instant)>>,
    /// When the leader's last AppendEntries (heartbeat) arrived here.
    leader_contact: std::sync::Mutex<Option<std::time::Instant>>,
    /// Where lease transfers sent to this replica go (set by the election).
    lease_transfers: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<LeaseTransfer>>>,
    pub stop: CancellationToken,
    /// False while an empty replica with `initial_state: new` has not yet heard
    /// whether the cluster counts it as joined: until then it takes no vote and no
    /// entry (a wiped replica must refuse to start, not be caught up as new).
    vetted: std::sync::atomic::AtomicBool,
    /// The address this replica says the others reach it at: `cluster.advertise`,
    /// else `peers[node_id]`.
    advertised: Option<HostPort>,
    /// This replica's leader-election settings, which the peers compare with theirs.
    lease_settings: std::sync::Mutex<LeaseSettings>,
}

impl Node {
    /// Opens the store and joins (or bootstraps) the cluster. Returns at once (after
    /// at most a second's identity check of a formed store): a restarted replica
    /// serves its last applied state before it reaches a quorum.
    pub async fn start(
        cluster: &schema::Cluster,
        name: &str,
        seed: &BTreeMap<String, schema::Pool>,
        lease: LeaseSettings,
    ) -> Result<Arc<Node>, Fatal> {
        let id = cluster.node_id.value;
        let cluster_id = cluster.cluster_id.value.clone();
        let data_dir = &cluster.data_dir;
        // The peer port first: a port in use fails before data_dir is touched.
        let bind = cluster.bind.value.0;
        let socket = crate::net::listen(bind)
            .map_err(|e| runtime_error(format!("cluster.bind {bind}: cannot listen: {e}")))?;
        let db = storage::open(data_dir).map_err(|e| {
            runtime_error(format!(
                "cluster.data_dir {}: cannot open the store: {e}",
                data_dir.display()
            ))
        })?;
        let read = |e: io::Error| {
            runtime_error(format!(
                "cluster.data_dir {}: cannot read the store: {e}",
                data_dir.display()
            ))
        };
        if let Some(why) = storage::get_meta::<String>(&db, storage::REMOVED).map_err(read)? {
            return Err(config_error(format!(
                "cluster.data_dir {}: this replica was removed from the cluster ({why}); \
                 to bring it back, wipe the data_dir, run `raftlb ctl member add {id} ADDR` \
                 and start it with initial_state: existing",
                data_dir.display()
            )));
        }
        let empty = storage::is_empty(&db).map_err(read)?;
        let restored = storage::get_meta::<bool>(&db, storage::RESTORED)
            .map_err(read)?
            .unwrap_or(false);
        let recorded: Option<Recorded> = storage::get_meta(&db, storage::IDENTITY).map_err(read)?;
        let uuid = match recorded {
            Some(r) if r.cluster_id != cluster_id => {
                return Err(config_error(format!(
                    "cluster.data_dir {}: it belongs to cluster_id {:?}, the file says {:?}: \
                     point data_dir elsewhere or fix cluster_id",
                    data_dir.display(),
                    r.cluster_id,
                    cluster_id
                )));
            }
            Some(r) if r.node_id != id => {
                return Err(config_error(format!(
                    "cluster.data_dir {}: it belongs to node_id {}, the file says {id}",
                    data_dir.display(),
                    r.node_id
                )));
            }
            Some(r) => r.uuid,
            None => {
                let r = Recorded {
                    cluster_id: cluster_id.clone(),
                    node_id: id,
                    uuid: None,
                };
                storage::put_meta(&db, storage::IDENTITY, &r).map_err(read)?;
                None
            }
        };
        let identity = Arc::new(Identity::new(cluster_id.clone(), id, uuid));
        let tls = match &cluster.tls {
            Some(t) => Some(Tls::load(t).map_err(config_error)?),
            None => None,
        };
        let net = Arc::new(Net {
            identity: identity.clone(),
            tls,
            connect_timeout: cluster
                .election_timeout
                .value
                .get()
                .max(Duration::from_millis(500)),
            logged: Default::default(),
            contact: Default::default(),
        });

        let heartbeat = cluster.heartbeat_interval.value.get();
        let election_timeout = cluster.election_timeout.value.get();
        let raft_config = openraft::Config {
            cluster_name: cluster_id.clone(),
            heartbeat_interval: millis(heartbeat),
            election_timeout_min: millis(election_timeout),
            election_timeout_max: millis(election_timeout) * 2,
            install_snapshot_timeout: millis(election_timeout).max(2000),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
            max_in_snapshot_log_to_keep: 100,
            // Like etcd: a replica back from a partition with a stale log first asks
            // whether it could win, instead of deposing a healthy leader (whose
            // commits the active's renewals need) with a higher term.
            enable_pre_vote: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| config_error(format!("cluster: {e}")))?;

        let raft_config = Arc::new(raft_config);
        let (publish, applied) = watch::channel(Arc::default());
        let (raft, flusher) = open_raft(id, &raft_config, &net, &db, &publish)
            .await
            .map_err(runtime_error)?;

        let peers = cluster
            .peers
            .value
            .iter()
            .map(|(id, addr)| (*id, addr.value.to_string()))
            .collect();
        let (fatal, _) = watch::channel(None);
        let node = Arc::new(Node {
            id,
            cluster_id,
            raft: RwLock::new(raft),
            db: RwLock::new(Some(db)),
            flusher: RwLock::new(Some(flusher)),
            data_dir: data_dir.clone(),
            raft_config,
            identity,
            net: net.clone(),
            publish,
            applied,
            peers,
            heartbeat,
            election_timeout,
            seed: seed.clone(),
            name: name.to_string(),
            fatal,
            forwarders: std::sync::Mutex::new(Vec::new()),
            leader_contact: std::sync::Mutex::new(None),
            lease_transfers: std::sync::Mutex::new(None),
            stop: CancellationToken::new(),
            lease_settings: std::sync::Mutex::new(lease),
            // Unvetted: an empty replica (bootstrapping or waiting to be added), or
            // a restored one, until its peers say it has not joined before.
            vetted: std::sync::atomic::AtomicBool::new(!(restored || empty)),
            advertised: cluster
                .advertise
                .as_ref()
                .or_else(|| cluster.peers.value.get(&id))
                .map(|a| a.value.clone()),
        });
        tokio::spawn(network::serve(socket, net, node.clone(), node.stop.clone()));
        tracing::info!(node_id = id, %bind, "Raft peer port listening");
        if !empty
            && !restored
            && let Err(fatal) = node.same_cluster_as_peers().await
        {
            node.stop.cancel();
            return Err(fatal);
        }
        if empty && cluster.initial_state == InitialState::New {
            tokio::spawn(node.clone().bootstrap());
        } else if restored {
            tokio::spawn(node.clone().vet_restored());
        } else if empty {
            tracing::info!(
                "initial_state: existing: waiting to be added (raftlb ctl member add {id} ADDR), then catching up"
            );
            tokio::spawn(node.clone().remind_while_waiting(bind));
            tokio::spawn(node.clone().vet_existing());
        }
        tokio::spawn(node.clone().housekeeping());
        tokio::spawn(node.clone().compare_settings());
        tokio::spawn(node.clone().keep_in_touch());
        Ok(node)
    }

    /// The Raft instance (a new one after the store was rebuilt).
    pub fn raft(&self) -> Raft {
        match self.raft.read() {
            Ok(raft) => raft.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Runs `call` on the Raft instance to completion, even when the caller stops
    /// waiting (see [`to_completion`]).
    async fn call<T, F>(&self, call: impl FnOnce(Raft) -> F) -> T
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        to_completion(call(self.raft())).await
    }

    async fn transfer_leader(&self, to: NodeId) -> Result<(), openraft::error::Fatal<TypeConfig>> {
        self.call(move |raft| async move { raft.trigger().transfer_leader(to).await })
            .await
    }

    /// The store, unless it is being rebuilt.
    fn db(&self) -> Option<Arc<Database>> {
        match self.db.read() {
            Ok(db) => db.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Stops Raft and makes the last applied state durable (the flusher
    /// otherwise takes up to a few milliseconds more).
    pub async fn shutdown(&self) {
        let _ = self.call(|raft| async move { raft.shutdown().await }).await;
        let flusher = self.flusher.read().ok().and_then(|f| f.clone());
        if let Some(flusher) = flusher {
            let applied = self.applied.borrow().clone();
            let flushed = tokio::time::timeout(Duration::from_secs(2), flusher.durably(applied));
            if let Ok(Err(e)) = flushed.await {
                tracing::warn!(error = %e, "cannot make the last applied state durable");
            }
        }
    }

    /// The applied state, and every change of it.
    pub fn applied(&self) -> watch::Receiver<Arc<Applied>> {
        self.applied.clone()
    }

    /// Set when the replica must stop (wiped data_dir found at bootstrap, removed).
    pub fn fatal(&self) -> watch::Receiver<Option<Fatal>> {
        self.fatal.subscribe()
    }

    fn die(&self, fatal: Fatal) {
        tracing::error!("{}", fatal.message);
        self.fatal.send_replace(Some(fatal));
    }

    /// Sets the Raft gauges from the current Raft metrics: called when /metrics is
    /// scraped rather than on each of the several metric changes every write makes.
    pub fn publish_metrics(&self) {
        let raft = self.metrics();
        let voters = raft.membership_config.membership().voter_ids().count();
        metrics::gauge!(m::RAFT_TERM).set(raft.current_term as f64);
        // A leader cut off from its quorum stays leader in openraft until it hears
        // of a newer term, and can commit nothing: not counted, as status names no
        // leader then (a dashboard summing this would see two leaders).
        let leads = raft.state == ServerState::Leader && self.has_leader(&raft);
        metrics::gauge!(m::RAFT_IS_LEADER).set(if leads { 1.0 } else { 0.0 });
        metrics::gauge!(m::RAFT_COMMIT_INDEX)
            .set(raft.local_committed.as_ref().map_or(0, |l| l.index) as f64);
        metrics::gauge!(m::RAFT_APPLIED_INDEX)
            .set(raft.last_applied.as_ref().map_or(0, |l| l.index) as f64);
        metrics::gauge!(m::RAFT_MEMBERS).set(voters as f64);
        metrics::gauge!(m::RAFT_QUORUM).set((voters / 2 + 1) as f64);
        metrics::gauge!(m::RAFT_HAS_LEADER).set(if self.has_leader(&raft) { 1.0 } else { 0.0 });
        metrics::gauge!(m::RAFT_QUORUM_REACHABLE).set(if self.quorum_reachable() {
            1.0
        } else {
            0.0
        });
        for (id, reachable) in self.reachability(&raft) {
            let value = if reachable == Some(true) { 1.0 } else { 0.0 };
            metrics::gauge!(m::RAFT_MEMBER_REACHABLE, "member" => id.to_string()).set(value);
        }
        m::members_now(
            raft.membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect(),
        );
    }

    /// True when this replica is a Raft leader that heard from a quorum recently (one
    /// cut off from it stays leader but can commit nothing), or a follower that heard
    /// from its leader recently (it keeps the name of a leader that went away until
    /// a new one is elected, which takes a quorum).
    pub fn has_leader(&self, metrics: &openraft::RaftMetrics<types::TypeConfig>) -> bool {
        match metrics.current_leader {
            None => false,
            Some(leader) if leader == self.id => {
                metrics.state == ServerState::Leader && self.quorum_reachable()
            }
            Some(_) => {
                self.leader_heard_within(self.election_timeout * 2)
                    && self.heard_majority_of(metrics)
            }
        }
    }

    /// The leader for status and members: the one openraft follows, while it leads
    /// a quorum as far as this replica can tell ([`Node::has_leader`]). Not itself
    /// without a quorum (a leader restarted alone is leader again in openraft, from
    /// the vote it won; with no quorum no one leads), nor a leader gone quiet.
    pub fn known_leader(
        &self,
        metrics: &openraft::RaftMetrics<types::TypeConfig>,
    ) -> Option<NodeId> {
        metrics.current_leader.filter(|_| self.has_leader(metrics))
    }

    /// Whether a leader's append reached this replica within `limit`.
    fn leader_heard_within(&self, limit: Duration) -> bool {
        self.leader_contact
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at.elapsed() < limit)
    }

    /// Whether each member answered recently on the peer channel: the leader hears
    /// every member through its heartbeats, a follower its leader, and every replica
    /// says hello to the members it has not heard from ([`Self::keep_in_touch`]).
    /// Always known (`Some`): a member not heard from is unreachable.
    pub fn reachability(
        &self,
        metrics: &openraft::RaftMetrics<types::TypeConfig>,
    ) -> BTreeMap<NodeId, Option<bool>> {
        metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| {
                let reachable = *id == self.id
                    || self
                        .net
                        .contact
                        .last(*id)
                        .is_some_and(|at| at.elapsed() < REACHABLE_WITHIN);
                (*id, Some(reachable))
            })
            .collect()
    }

    /// The voters other than this replica that it heard from recently.
    fn other_voters_up(&self, metrics: &openraft::RaftMetrics<types::TypeConfig>) -> Vec<NodeId> {
        let reachable = self.reachability(metrics);
        metrics
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.id && reachable.get(v).copied().flatten() == Some(true))
            .collect()
    }

    /// What a write that cannot commit needs, for its error: "this replica heard
    /// from 1 of 3 voters in the last 3 s (itself included); a write needs 2 (a
    /// majority); not heard from: node 2 (ADDR), node 3 (ADDR)". Reachability looks
    /// back 3 s, so a voter lost a moment ago may still count.
    pub fn quorum_note(&self) -> String {
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        let voters = membership.voter_ids().count();
        let unreachable: Vec<String> = self
            .unreachable_voters(&metrics)
            .iter()
            .map(|id| match membership.get_node(id) {
                Some(n) => format!("node {id} ({})", n.addr),
                None => format!("node {id}"),
            })
            .collect();
        let (heard, needed) = (voters - unreachable.len(), voters / 2 + 1);
        let mut note = format!(
            "this replica heard from {heard} of {voters} voters in the last {} s (itself included); a write or a linearizable read needs {needed} (a majority)",
            REACHABLE_WITHIN.as_secs(),
        );
        if !unreachable.is_empty() {
            note.push_str(&format!("; not heard from: {}", unreachable.join(", ")));
        }
        note
    }

    /// Whether this replica heard from a majority of the voters (itself included)
    /// within [`REACHABLE_WITHIN`].
    fn heard_majority(&self) -> bool {
        self.heard_majority_of(&self.metrics())
    }

    fn heard_majority_of(&self, metrics: &openraft::RaftMetrics<types::TypeConfig>) -> bool {
        let voters = metrics.membership_config.membership().voter_ids().count();
        voters - self.unreachable_voters(metrics).len() > voters / 2
    }

    /// The voters this replica knows to be unreachable now (one never heard from is
    /// not counted as unreachable).
    pub fn unreachable_voters(
        &self,
        metrics: &openraft::RaftMetrics<types::TypeConfig>,
    ) -> Vec<NodeId> {
        let reachability = self.reachability(metrics);
        metrics
            .membership_config
            .membership()
            .voter_ids()
            .filter(|id| reachability.get(id).copied().flatten() == Some(false))
            .collect()
    }

    pub fn metrics(&self) -> openraft::RaftMetrics<types::TypeConfig> {
        self.raft().metrics().borrow_watched().clone()
    }

    fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft().metrics();
        let metrics = metrics.borrow_watched();
        let leader = metrics.current_leader?;
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())?;
        Some((leader, addr))
    }

    /// True when this replica heard from a quorum recently: the leader counts its
    /// acknowledgements, a follower its leader's heartbeats.
    pub fn quorum_reachable(&self) -> bool {
        let metrics = self.raft().metrics();
        let metrics = metrics.borrow_watched();
        let fresh = self.election_timeout * 2;
        let alone = metrics
            .membership_config
            .membership()
            .voter_ids()
            .all(|v| v == self.id);
        match metrics.state {
            // A single voter is its own quorum.
            ServerState::Leader if alone => true,
            ServerState::Leader => metrics
                .last_quorum_acked
                .as_ref()
                .is_some_and(|at| at.elapsed() < fresh),
            // Its leader's heartbeats alone do not say that the leader has a
            // quorum (a leader cut off with one follower keeps sending them): this
            // replica must also have heard from a majority itself.
            _ => {
                metrics.current_leader.is_some()
                    && self.leader_heard_within(fresh)
                    && self.heard_majority_of(&metrics)
            }
        }
    }

    /// Whether [`Node::quorum_reachable`] holds within an election timeout (at most
    /// `deadline`): a leader elected a moment ago hears from its quorum within a
    /// heartbeat, a follower from its new leader.
    async fn quorum_soon(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + self.election_timeout.min(deadline);
        while !self.quorum_reachable() && tokio::time::Instant::now() < until {
            tokio::time::sleep(self.heartbeat / 2).await;
        }
        self.quorum_reachable()
    }

    /// Waits for a quorum of `peers` to answer "empty, same cluster_id, same peers",
    /// then initialises with exactly that membership. Never alone on silence, and
    /// never counting this replica twice: only distinct peers that answered as
    /// themselves count (a reply from another node id is refused by the client).
    async fn bootstrap(self: Arc<Self>) {
        let quorum = self.peers.len() / 2 + 1;
        let mine: Vec<(NodeId, String)> = self.peers.iter().map(|(k, v)| (*k, v.clone())).collect();
        let mut logged_wait = false;
        loop {
            if self.stop.is_cancelled()
                || self
                    .call(|raft| async move { raft.is_initialized().await })
                    .await
                    .unwrap_or(true)
            {
                self.vet();
                return;
            }
            // This replica (empty, same cluster_id, same peers), then each peer that
            // answered as itself.
            let mut ready = BTreeSet::from([self.id]);
            for (peer, addr) in &self.peers {
                if *peer == self.id {
                    continue;
                }
                let hello = match self.say_hello(*peer, addr, Duration::from_secs(1)).await {
                    Ok(Reply::Hello(h)) => h,
                    Ok(_) => continue,
                    Err(CallError::Refused(why)) => {
                        tracing::warn!(peer, "bootstrap: {why}");
                        continue;
                    }
                    // Another node (or this one) answered at its address: the
                    // client logged it; it does not count.
                    Err(CallError::WrongNode { .. }) => continue,
                    Err(_) => continue,
                };
                if hello.joined.contains(&self.id) {
                    return self.die(config_error(format!(
                        "node {id} has joined this cluster before, but its data_dir is empty \
                         (wiped?): it must not rejoin under the same id with an empty log. \
                         Run `raftlb ctl member remove {id}`, then `raftlb ctl member add {id} ADDR`, \
                         then start it with initial_state: existing",
                        id = self.id
                    )));
                }
                if !hello.empty {
                    tracing::info!(
                        peer,
                        "bootstrap: the cluster exists already; waiting for the leader to replicate"
                    );
                    self.vet();
                    return;
                }
                if hello.peers != mine {
                    tracing::warn!(
                        peer,
                        theirs = ?hello.peers,
                        ours = ?mine,
                        "bootstrap: peer has different peers; it does not count towards the quorum"
                    );
                    continue;
                }
                ready.insert(*peer);
            }
            let ready = ready.len();
            if ready >= quorum {
                self.vet();
                let members: BTreeMap<NodeId, RaftNode> = self
                    .peers
                    .iter()
                    .map(|(id, addr)| (*id, RaftNode { addr: addr.clone() }))
                    .collect();
                match self
                    .call(|raft| async move { raft.initialize(members).await })
                    .await
                {
                    Ok(()) => tracing::info!(
                        peers = self.peers.len(),
                        "bootstrap: a quorum of empty peers answered; cluster initialised"
                    ),
                    Err(e) => tracing::info!(error = %e, "bootstrap: initialised by a peer"),
                }
                return;
            }
            if !logged_wait {
                tracing::info!(
                    ready,
                    quorum,
                    "bootstrap: waiting for a quorum of empty peers with the same cluster_id and peers"
                );
                logged_wait = true;
            }
            tokio::time::sleep(self.election_timeout).await;
        }
    }

    /// Says hello to every member not heard from within [`HELLO_AFTER`], so that each
    /// replica, the followers too, knows which members answer (`member_reachable`).
    async fn keep_in_touch(self: Arc<Self>) {
        loop {
            let members: Vec<(NodeId, String)> = self
                .metrics()
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect();
            let quiet = members.into_iter().filter(|(id, _)| {
                self.net
                    .contact
                    .last(*id)
                    .is_none_or(|at| at.elapsed() >= HELLO_AFTER)
            });
            let node = &self;
            let hellos = quiet.map(|(id, addr)| async move {
                let _ = node.say_hello(id, &addr, REACHABLE_WITHIN / 2).await;
            });
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = futures_util::future::join_all(hellos) => {}
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(HELLO_AFTER / 2) => {}
            }
        }
    }

    /// A store restored from a backup that has not said "joined" yet: it takes no
    /// vote and no entry until a quorum of its peers (itself included) answered
    /// without counting it as joined. One that a peer counts as joined was restored
    /// a second time into a cluster that went on without it: its log lacks entries
    /// the leader knows it had, and Raft would never catch it up.
    async fn vet_restored(self: Arc<Self>) {
        // Its own log says it joined already (stopped before the marker was
        // cleared): it is past the restore.
        if self.applied.borrow().state.joined.contains(&self.id) {
            self.vet();
            return;
        }
        // A quorum of the file's peers, itself included.
        let needed = self.peers.len() / 2;
        let id = self.id;
        loop {
            let answers = self.file_peer_hellos().await;
            if answers.iter().any(|(_, h)| h.joined.contains(&id)) {
                return self.die(config_error(format!(
                    "node {id} has joined this cluster since it was restored, and this data_dir \
                     was restored from the backup again: its log lacks what it had since, and \
                     it must not rejoin under the same id. Run `raftlb ctl member remove {id}`, \
                     wipe the data_dir, run `raftlb ctl member add {id} ADDR`, then start it \
                     with initial_state: existing"
                )));
            }
            if answers.len() >= needed || self.stop.is_cancelled() {
                self.vet();
                return;
            }
            tokio::time::sleep(self.election_timeout).await;
        }
    }

    /// An empty replica started with `initial_state: existing`: it takes no vote and
    /// no entry until a majority of the cluster's other voters (as the answers of
    /// its file's peers report them) answered without counting it as a voter that
    /// joined. If a majority count it so, it lost its data_dir: with an empty log it
    /// could vote twice (SPEC "Cluster identity"), so it refuses to start. A member
    /// removed and added again is a learner until it has caught up; one peer that
    /// missed a removal does not decide alone.
    async fn vet_existing(self: Arc<Self>) {
        let id = self.id;
        let mut logged_wait = false;
        loop {
            let answers = self.file_peer_hellos().await;
            let voters: BTreeSet<NodeId> = answers
                .iter()
                .flat_map(|(_, h)| h.voters.iter().flatten().copied())
                .filter(|v| *v != id)
                .collect();
            let quorum = voters.len() / 2 + 1;
            let (joined, not): (Vec<_>, Vec<_>) = answers
                .iter()
                .filter(|(peer, _)| voters.contains(peer))
                .partition(|(_, h)| {
                    h.voters.as_ref().is_some_and(|v| v.contains(&id)) && h.joined.contains(&id)
                });
            if joined.len() >= quorum {
                return self.die(config_error(format!(
                    "node {id} is a voter that has joined this cluster, but its data_dir is empty \
                     (wiped?): it must not rejoin under the same id with an empty log. Run \
                     `raftlb ctl member remove {id}`, then `raftlb ctl member add {id} ADDR`, \
                     then start it again with initial_state: existing"
                )));
            }
            // No peer in the file, or only builds that do not say who votes: nothing
            // to check against (as before they said it).
            let unchecked = answers.iter().all(|(_, h)| h.voters.is_none())
                && (!answers.is_empty() || self.peers.keys().all(|p| *p == id));
            if not.len() >= quorum || unchecked || self.stop.is_cancelled() {
                if unchecked {
                    tracing::info!(
                        "initial_state: existing with an empty data_dir: no peer says who votes, \
                         so whether this node_id voted before cannot be checked"
                    );
                }
                self.vet();
                return;
            }
            if !logged_wait {
                logged_wait = true;
                let heard: Vec<NodeId> = answers.iter().map(|(p, _)| *p).collect();
                tracing::info!(
                    answered = ?heard,
                    voters = ?voters,
                    "initial_state: existing with an empty data_dir: waiting for a majority of \
                     the cluster's voters to answer that this node_id has not voted before"
                );
            }
            tokio::time::sleep(self.election_timeout).await;
        }
    }

    /// One round of hellos to the file's other peers, a second each: those that
    /// answered, with their answers.
    async fn file_peer_hellos(&self) -> Vec<(NodeId, Box<HelloReply>)> {
        let mut answers = Vec::new();
        for (peer, addr) in &self.peers {
            if *peer == self.id {
                continue;
            }
            if let Ok(Reply::Hello(hello)) =
                self.say_hello(*peer, addr, Duration::from_secs(1)).await
            {
                answers.push((*peer, hello));
            }
        }
        answers
    }

    /// A formed store among peers of which a majority answer as another cluster with
    /// the same cluster_id, and no voter of its own membership answers as its own:
    /// a data_dir from another cluster, or the peers' cluster was bootstrapped again
    /// since. Left running, it would be a cluster of its own (as its store has it)
    /// and take a lease of its own: a second active. Asks each of the file's other
    /// peers and its membership's other voters once, bounded by a second each; a
    /// peer down counts neither way.
    async fn same_cluster_as_peers(&self) -> Result<(), Fatal> {
        let mut asked: BTreeMap<NodeId, String> = self
            .peers
            .iter()
            .filter(|(peer, _)| **peer != self.id)
            .map(|(peer, addr)| (*peer, addr.clone()))
            .collect();
        let others = asked.len();
        if others == 0 {
            return Ok(());
        }
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != self.id).collect();
        for v in &voters {
            if let Some(node) = membership.get_node(v) {
                asked.entry(*v).or_insert_with(|| node.addr.clone());
            }
        }
        let asks = asked.iter().map(|(peer, addr)| async move {
            (
                *peer,
                self.say_hello(*peer, addr, Duration::from_secs(1)).await,
            )
        });
        let answers = futures_util::future::join_all(asks).await;
        // A voter of its own membership that answers as this cluster: the store is
        // this cluster's, whatever the file's (stale) peers say.
        if answers
            .iter()
            .any(|(peer, a)| voters.contains(peer) && matches!(a, Ok(Reply::Hello(_))))
        {
            return Ok(());
        }
        let foreign: Vec<String> = answers
            .into_iter()
            .filter(|(peer, _)| self.peers.contains_key(peer))
            .filter_map(|(_, a)| match a {
                Err(CallError::OtherCluster { why }) => Some(why),
                _ => None,
            })
            .collect();
        if foreign.len() * 2 <= others {
            return Ok(());
        }
        Err(config_error(format!(
            "cluster.data_dir {}: {} of the {others} other peers in the file belong to another \
             cluster named {:?}, and no voter of this store's membership answered as its own: {}. \
             This data_dir is not their cluster's (from another cluster, or theirs was bootstrapped \
             again since); started, it would lead the cluster its store holds and take a lease \
             there. If the peers' cluster is the right one and this replica belongs to it: \
             `raftlb ctl member remove {id}` (if it is a member), move this data_dir aside, \
             `raftlb ctl member add {id} ADDR`, then start it with initial_state: existing. If \
             this data_dir is the right one, correct the file's peers",
            self.data_dir.display(),
            foreign.len(),
            self.cluster_id,
            foreign.join("; "),
            id = self.id
        )))
    }

    /// A reload: the file's pools, if they differ from the replicated ones, are
    /// logged (the file seeds a new cluster only; a reload does not change pools).
    pub fn compare_file_pools(&self, file: &BTreeMap<String, schema::Pool>) {
        let applied = self.applied.borrow().clone();
        if applied.state.cluster_uuid.is_some() {
            log_seed_difference(file, &applied.state.pools, "reload: ");
        }
    }

    /// A replica waiting to be added that no leader has reached: every 10 s it says
    /// where it listens, since a `member add` given another address makes the
    /// leader dial that one, and nothing else would tell.
    async fn remind_while_waiting(self: Arc<Self>, bind: std::net::SocketAddr) {
        let mut waited = Duration::ZERO;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(WAITING_REMINDER) => waited += WAITING_REMINDER,
            }
            if self
                .metrics()
                .membership_config
                .membership()
                .nodes()
                .next()
                .is_some()
            {
                return;
            }
            let at = self
                .advertised
                .as_ref()
                .map_or_else(|| bind.to_string(), |a| a.to_string());
            tracing::warn!(
                "no leader has reached this replica in {}s: if `raftlb ctl member add {id}` was run, \
                 check the address it was given (`raftlb ctl members`); the leader dials that \
                 one, and this replica listens at {bind} (advertised as {at}). To fix it: \
                 `raftlb ctl member remove {id}`, then `raftlb ctl member add {id} {at}`",
                waited.as_secs(),
                id = self.id
            );
        }
    }

    /// One "hello" to `peer` at `addr`, on a connection of its own: its answer, or
    /// why there is none.
    async fn say_hello(
        &self,
        peer: NodeId,
        addr: &str,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        PeerClient::new(self.net.clone(), peer, addr.to_string())
            .call(Request::Hello, timeout)
            .await
    }

    /// This replica may take votes and entries from now on.
    fn vet(&self) {
        self.vetted
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn lease_settings(&self) -> LeaseSettings {
        *self
            .lease_settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// New leader-election settings (a reload): the peers are asked again.
    pub fn set_lease_settings(self: &Arc<Self>, lease: LeaseSettings) {
        let mut settings = self
            .lease_settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = std::mem::replace(&mut *settings, lease) != lease;
        drop(settings);
        if changed {
            tokio::spawn(self.clone().compare_settings());
        }
    }

    /// Asks every peer once for its Raft timing and leader-election settings and
    /// warns when they differ from ours: mixed election timeouts make elections slow
    /// and lopsided; a replica with election off serves beside the active, and a
    /// longer lease anywhere is what every standby waits out.
    async fn compare_settings(self: Arc<Self>) {
        // The members, as this replica's store has them; before it has any, the
        // file's peers (a member removed since stays out, and out of /metrics).
        let members: Vec<(NodeId, String)> = self
            .metrics()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let asked = if members.is_empty() {
            self.peers.clone().into_iter().collect()
        } else {
            members
        };
        let mut pending: BTreeMap<NodeId, String> =
            asked.into_iter().filter(|(id, _)| *id != self.id).collect();
        let ours = (millis(self.heartbeat), millis(self.election_timeout));
        for _ in 0..60 {
            let mut answered = Vec::new();
            for (peer, addr) in &pending {
                if let Ok(Reply::Hello(h)) =
                    self.say_hello(*peer, addr, Duration::from_secs(1)).await
                {
                    answered.push(*peer);
                    let lease = self.lease_settings();
                    match h.lease {
                        Some(theirs) if theirs.enabled != lease.enabled => tracing::warn!(
                            peer,
                            "leader election is {} on node {peer} and {} here: a replica with it \
                             off serves whatever the lease says, beside the active; set \
                             leader_election.enabled the same everywhere",
                            if theirs.enabled { "on" } else { "off" },
                            if lease.enabled { "on" } else { "off" },
                        ),
                        Some(theirs) if theirs.enabled => {
                            if theirs.timing() != lease.timing() {
                                tracing::warn!(
                                    peer,
                                    peer_lease_duration_ms = theirs.lease_duration_ms,
                                    peer_renew_deadline_ms = theirs.renew_deadline_ms,
                                    peer_retry_period_ms = theirs.retry_period_ms,
                                    lease_duration_ms = lease.lease_duration_ms,
                                    renew_deadline_ms = lease.renew_deadline_ms,
                                    retry_period_ms = lease.retry_period_ms,
                                    "leader_election timing differs between replicas: a standby waits \
                                     out the longer lease, so a failover takes as long as the longest; \
                                     set the same values everywhere (a reload changes them in place)"
                                );
                            }
                            let mode =
                                |serves: bool| if serves { "serve" } else { "close_listeners" };
                            if let (Some(theirs), Some(ours)) =
                                (theirs.standby_serves, lease.standby_serves)
                                && theirs != ours
                            {
                                tracing::warn!(
                                    peer,
                                    "leader_election.standby is {} on node {peer} and {} here: a \
                                     standby with serve accepts beside the active; set the same \
                                     everywhere",
                                    mode(theirs),
                                    mode(ours),
                                );
                            }
                        }
                        _ => {}
                    }
                    if (h.heartbeat_ms, h.election_timeout_ms) != ours {
                        tracing::warn!(
                            peer,
                            peer_heartbeat_ms = h.heartbeat_ms,
                            peer_election_timeout_ms = h.election_timeout_ms,
                            heartbeat_ms = ours.0,
                            election_timeout_ms = ours.1,
                            "cluster.heartbeat_interval / election_timeout differ between replicas: \
                             set the same values everywhere"
                        );
                    }
                }
            }
            for peer in answered {
                pending.remove(&peer);
            }
            if pending.is_empty() {
                return;
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    /// The others dial the address the membership holds for this replica; says so
    /// when that is not the one this replica advertises (its file changed since it
    /// joined, or `ctl member add` was given another address).
    fn compare_address(&self, in_membership: &str) {
        let Some(advertised) = &self.advertised else {
            return;
        };
        if in_membership
            .parse::<HostPort>()
            .is_ok_and(|m| m.same_as(advertised))
        {
            return;
        }
        tracing::warn!(
            node_id = self.id,
            advertised = %advertised,
            membership = in_membership,
            "this replica advertises {advertised} (cluster.advertise, else peers[{id}]), but the Raft \
             membership has it at {in_membership}, where the other replicas dial it. To move a replica: \
             `raftlb ctl member remove {id}`, wipe its data_dir, `raftlb ctl member add {id} {advertised}`, \
             start it with initial_state: existing",
            id = self.id,
        );
    }

    /// The file's `peers` that the membership holds at another address: the file is
    /// used again for a restore's checks and a rebuild, so it should say what is.
    fn compare_peers(&self, membership: &openraft::Membership<NodeId, openraft::BasicNode>) {
        for (id, addr) in &self.peers {
            let Some(member) = membership.get_node(id) else {
                continue;
            };
            let same = match (member.addr.parse::<HostPort>(), addr.parse::<HostPort>()) {
                (Ok(m), Ok(f)) => m.same_as(&f),
                _ => member.addr == *addr,
            };
            if *id != self.id && !same {
                tracing::warn!(
                    peer = id,
                    file = %addr,
                    membership = %member.addr,
                    "peers[{id}] in the file is {addr}, but the Raft membership has node {id} at {}: \
                     the membership is what the replicas dial; correct the file",
                    member.addr
                );
            }
        }
    }

    /// Background duties: the first leader commits the cluster UUID and seed; each
    /// replica records the UUID, says "joined" once, notices its removal, and keeps
    /// the Raft metrics current.
    async fn housekeeping(self: Arc<Self>) {
        let mut applied = self.applied.clone();
        let mut metrics = self.raft().metrics();
        let mut said_joined = false;
        let mut compared_seed = false;
        let mut was_member = false;
        // A removal applied here, with when it was seen and the log's end then.
        let mut removal_seen: Option<(std::time::Instant, Option<u64>)> = None;
        let mut initializing: Option<tokio::task::JoinHandle<()>> = None;
        let mut promoting: Option<(tokio::task::JoinHandle<()>, std::time::Instant)> = None;
        // Raising the cluster's version, or saying who this replica is.
        let mut versioning: Option<tokio::task::JoinHandle<()>> = None;
        let mut warned_names = BTreeSet::new();
        let mut compared_address = false;
        loop {
            let state = applied.borrow_and_update().clone();
            let raft = metrics.borrow_and_update().clone();
            if let Err(fatal) = &raft.running_state {
                if self.stop.is_cancelled() || matches!(fatal, openraft::error::Fatal::Stopped) {
                    return;
                }
                self.rebuild(&fatal.to_string()).await;
                metrics = self.raft().metrics();
                continue;
            }
            if let Some(uuid) = state.state.cluster_uuid
                && self.identity.uuid() != Some(uuid)
            {
                self.identity.set_uuid(uuid);
                let r = Recorded {
                    cluster_id: self.cluster_id.clone(),
                    node_id: self.id,
                    uuid: Some(uuid),
                };
                let recorded = match self.db() {
                    Some(db) => storage::put_meta(&db, storage::IDENTITY, &r),
                    None => Err(io::Error::other("the store is being rebuilt")),
                };
                if let Err(e) = recorded {
                    tracing::error!(error = %e, "cannot record the cluster UUID in data_dir");
                }
            }
            let leader = raft.state == ServerState::Leader;
            let init_in_flight = initializing.as_ref().is_some_and(|t| !t.is_finished());
            if leader
                && state.state.cluster_uuid.is_none()
                && state.last_applied.is_some()
                && !init_in_flight
            {
                // One proposal at a time; only the first one applied counts anyway.
                let this = self.clone();
                initializing = Some(tokio::spawn(async move {
                    let init = Command::Init {
                        uuid: Uuid::new_v4(),
                        pools: this.seed.clone(),
                    };
                    if let Err(e) = this.write(init).await {
                        tracing::warn!(error = %e, "cannot commit the cluster identity yet");
                    }
                }));
            }
            // One promotion at a time, and a second between attempts.
            let promotion_due = promoting.as_ref().is_none_or(|(task, at)| {
                task.is_finished() && at.elapsed() >= Duration::from_secs(1)
            });
            if leader
                && promotion_due
                && let Some(id) = caught_up_learner(&raft, &state.state.promote)
            {
                let raft = self.raft();
                let started = std::time::Instant::now();
                let task = tokio::spawn(async move {
                    let voter = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
                    match tokio::time::timeout(WRITE_TIMEOUT, raft.change_membership(voter, false))
                        .await
                    {
                        Ok(Ok(_)) => {
                            tracing::info!(node_id = id, "learner caught up: promoted to voter")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(node_id = id, error = %e, "cannot promote the learner yet")
                        }
                        Err(_) => tracing::warn!(node_id = id, "promoting the learner timed out"),
                    }
                });
                promoting = Some((task, started));
            }
            let voters: BTreeSet<NodeId> = state.membership.membership().voter_ids().collect();
            let member = state.membership.membership().get_node(&self.id).is_some();
            if !compared_address && let Some(me) = state.membership.membership().get_node(&self.id)
            {
                compared_address = true;
                self.compare_address(&me.addr);
                self.compare_peers(state.membership.membership());
            }
            let in_log = raft
                .membership_config
                .membership()
                .get_node(&self.id)
                .is_some();
            if member || in_log {
                was_member |= member;
                removal_seen = None;
            } else if was_member && state.state.joined.contains(&self.id) {
                let settles = REMOVAL_SETTLES.max(self.election_timeout * 4);
                let leader_heard = self.leader_heard_within(settles);
                match removal_seen {
                    Some((since, end))
                        if end == raft.last_log_index
                            && since.elapsed() >= settles
                            && !leader_heard =>
                    {
                        self.removed("its removal was committed").await;
                        return;
                    }
                    Some((_, end)) if end == raft.last_log_index => {}
                    _ => removal_seen = Some((std::time::Instant::now(), raft.last_log_index)),
                }
            }
            if state.state.cluster_uuid.is_some() && !compared_seed {
                compared_seed = true;
                log_seed_difference(&self.seed, &state.state.pools, "");
            }
            if !said_joined
                && voters.contains(&self.id)
                && state.state.cluster_uuid.is_some()
                && raft.current_leader.is_some()
            {
                if state.state.joined.contains(&self.id) {
                    said_joined = true;
                } else if self.write(Command::Joined { node: self.id }).await.is_ok() {
                    tracing::info!(node_id = self.id, "joined the cluster");
                    said_joined = true;
                }
                // A restored store is an ordinary one once it has said "joined".
                if said_joined && let Some(db) = self.db() {
                    let _ = storage::put_meta_blocking(&db, storage::RESTORED, &false).await;
                }
            }
            let shared = shared_names(&state.state.nodes);
            if shared != warned_names {
                if !shared.is_empty() {
                    tracing::warn!(
                        names = ?shared,
                        "several replicas call themselves the same: set node.name on each"
                    );
                }
                warned_names = shared;
            }
            let upgrading = versioning.as_ref().is_some_and(|t| !t.is_finished());
            if !upgrading && state.state.cluster_uuid.is_some() {
                let info = NodeInfo {
                    name: self.name.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    protocol: network::protocol(),
                };
                let due = if leader {
                    self.cluster_version_due(&state)
                } else {
                    None
                };
                let command = match due {
                    Some(version) => Some(Command::ClusterVersion { version }),
                    // A voter once it said it joined; a learner (never "joined": it
                    // has no vote to cast twice) once it follows a leader.
                    None if (said_joined
                        || (member
                            && !voters.contains(&self.id)
                            && raft.current_leader.is_some()))
                        && state.state.cluster_version() >= 2
                        && state.state.nodes.get(&self.id) != Some(&info) =>
                    {
                        Some(Command::NodeInfo {
                            node: self.id,
                            info,
                        })
                    }
                    None => None,
                };
                if let Some(command) = command {
                    let this = self.clone();
                    versioning = Some(tokio::spawn(async move {
                        match this.write(command.clone()).await {
                            Ok(_) => tracing::info!(%command, "committed"),
                            Err(e) => tracing::debug!(%command, error = %e, "not committed yet"),
                        }
                        // One attempt per second at most.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }));
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = applied.changed() => {}
                _ = metrics.changed() => {}
                () = tokio::time::sleep(self.heartbeat * 5) => {}
            }
        }
    }

    /// openraft stops for good on a storage error (a full disk) and redb must be
    /// reopened after an I/O error: shut both down, then reopen the store and start a
    /// new Raft instance once `data_dir` takes writes again. The proxy keeps serving
    /// the last applied config meanwhile; writes answer 503.
    async fn rebuild(&self, why: &str) {
        tracing::error!(
            "the Raft store failed ({why}); writes answer 503 until data_dir {} is writable again, \
             then the store is reopened in-process",
            self.data_dir.display()
        );
        let _ = self.call(|raft| async move { raft.shutdown().await }).await;
        if let Ok(mut db) = self.db.write() {
            db.take();
        }
        if let Ok(mut flusher) = self.flusher.write() {
            flusher.take();
        }
        let mut logged = false;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            // The old instance's last tasks may hold the file for a moment.
            let attempt = async {
                let dir = self.data_dir.clone();
                tokio::task::spawn_blocking(move || takes_writes(&dir))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("data_dir has no room yet: {e}"))?;
                let db = storage::open(&self.data_dir).map_err(|e| e.to_string())?;
                storage::put_meta(&db, storage::PROBE, &std::process::id())
                    .map_err(|e| format!("data_dir is not writable yet: {e}"))?;
                let opened =
                    open_raft(self.id, &self.raft_config, &self.net, &db, &self.publish).await?;
                Ok::<_, String>((db, opened))
            };
            match attempt.await {
                Ok((db, (raft, flusher))) => {
                    if let Ok(mut slot) = self.raft.write() {
                        *slot = raft;
                    }
                    if let Ok(mut slot) = self.flusher.write() {
                        *slot = Some(flusher);
                    }
                    if let Ok(mut slot) = self.db.write() {
                        *slot = Some(db);
                    }
                    tracing::info!("the Raft store was reopened; this replica rejoins the cluster");
                    return;
                }
                Err(e) if !logged => {
                    tracing::warn!(error = %e, "cannot reopen the Raft store yet; retrying every second");
                    logged = true;
                }
                Err(_) => {}
            }
        }
    }

    /// This replica is no longer a member: record it, so it refuses to start again on
    /// this data_dir, and stop.
    async fn removed(&self, why: &str) {
        if let Some(db) = self.db() {
            let _ = storage::put_meta(&db, storage::REMOVED, &why.to_string());
        }
        self.die(config_error(format!(
            "node {} was removed from the cluster ({why}); stopping. It refuses to start again on this data_dir",
            self.id
        )));
    }

    /// Commits `command` through the Raft leader; a follower forwards it.
    pub async fn write(&self, command: Command) -> Result<Outcome, WriteError> {
        self.write_within(command, WRITE_TIMEOUT).await
    }

    /// [`Node::write`], answering "outcome unknown" once `deadline` has passed: the
    /// whole attempt, forwarding included, takes at most about that long.
    pub async fn write_within(
        &self,
        command: Command,
        deadline: Duration,
    ) -> Result<Outcome, WriteError> {
        let started = tokio::time::Instant::now();
        let request = Request::Write {
            command,
            deadline_ms: millis(deadline),
        };
        match tokio::time::timeout(deadline, self.committed_within(request, deadline)).await {
            Ok(result) => result,
            Err(_) => Err(WriteError::Unknown(format!(
                "not known committed within {:?}",
                started.elapsed()
            ))),
        }
    }

    /// Asks for Raft leadership to move to node `to` (this replica when it becomes
    /// active, so the death of a standby never stalls its renewals; `move-leader`).
    pub async fn move_leader(&self, to: NodeId) -> Result<Outcome, WriteError> {
        if self.leader().is_some_and(|(leader, _)| leader == to) {
            return Ok(Outcome::Applied {
                config_version: self.applied.borrow().state.config_version,
            });
        }
        self.committed(Request::MoveLeader { to }).await
    }

    /// Lease transfers sent to this replica, for the election to serve; `None` if
    /// a running election serves them already (one stopped by a reload does not).
    pub fn serve_lease_transfers(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<LeaseTransfer>> {
        let mut serving = self
            .lease_transfers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if serving.as_ref().is_some_and(|tx| !tx.is_closed()) {
            return None;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *serving = Some(tx);
        Some(rx)
    }

    /// `POST /api/v1/leader/transfer`: asks the lease's holder, wherever it runs,
    /// to give the lease to `to` (any standby: `None`); returns once it did.
    pub async fn transfer_lease(&self, to: Option<NodeId>) -> Result<(), WriteError> {
        let lease = self.applied.borrow().state.lease.clone();
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        let Some(holder) = lease.holder.filter(|_| lease.instance.is_some()) else {
            return Err(WriteError::NotProposed(
                "no replica holds the lease right now; nothing was changed".into(),
            ));
        };
        if let Some(to) = to {
            if !membership.voter_ids().any(|v| v == to) {
                return Err(WriteError::Invalid(format!("node {to} is not a voter")));
            }
            if to == holder {
                return Err(WriteError::Invalid(format!(
                    "node {to} is the active replica already"
                )));
            }
        }
        if holder == self.id {
            return self
                .transfer_here(to)
                .await
                .map_err(WriteError::NotProposed);
        }
        let Some(addr) = membership.get_node(&holder).map(|n| n.addr.clone()) else {
            return Err(WriteError::NotProposed(format!(
                "the lease's holder, node {holder}, is not a member"
            )));
        };
        let mut client = PeerClient::new(self.net.clone(), holder, addr);
        match client
            .call(Request::TransferLease { to }, WRITE_TIMEOUT * 3)
            .await
        {
            Ok(Reply::Ok) => {
                // The holder's release committed; answer once this replica applied
                // it too, so what it reports is the new record, not the old one.
                let mut applied = self.applied.clone();
                let released = applied.wait_for(|a| a.state.lease.instance != lease.instance);
                let _ = tokio::time::timeout(WRITE_TIMEOUT, released).await;
                Ok(())
            }
            Ok(other) => Err(WriteError::Unknown(format!("unexpected reply: {other:?}"))),
            // The active's own refusal (its answer's error) comes back as `Refused`.
            Err(CallError::Refused(why) | CallError::OtherCluster { why }) => Err(
                WriteError::NotProposed(format!("the active, node {holder}, refused: {why}")),
            ),
            Err(e @ CallError::Connect(_)) => Err(WriteError::NotProposed(format!(
                "cannot reach the active, node {holder}: {e}"
            ))),
            Err(e) => Err(WriteError::Unknown(format!("node {holder}: {e}"))),
        }
    }

    async fn transfer_here(&self, to: Option<NodeId>) -> Result<(), String> {
        // A lease given to a replica that is down, or to nobody with no other voter
        // up, is taken by no one until it expires: no active for a lease_duration.
        let up = self.other_voters_up(&self.metrics());
        match to {
            Some(to) if !up.contains(&to) => {
                return Err(format!(
                    "node {to} is not reachable from the active, node {}: the lease stays where it is",
                    self.id
                ));
            }
            None if up.is_empty() => {
                return Err(format!(
                    "no other voter is reachable from the active, node {}, to take the lease: it stays where it is",
                    self.id
                ));
            }
            _ => {}
        }
        let serve = self
            .lease_transfers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .filter(|tx| !tx.is_closed());
        let Some(serve) = serve else {
            return Err(format!("leader election is off on node {}", self.id));
        };
        let (done, result) = tokio::sync::oneshot::channel();
        serve
            .send(LeaseTransfer { to, done })
            .map_err(|_| "the election stopped".to_string())?;
        result
            .await
            .map_err(|_| "the election stopped".to_string())?
    }

    /// Shutdown: a leader hands Raft leadership to another voter and waits (up to
    /// two election timeouts) for it to take over, so the cluster does not wait
    /// for an election. It first waits up to `for_new_holder` for a standby to take
    /// the lease it just released, and hands leadership to that replica: the new
    /// active wants it anyway, and its takeover write is not caught by the move.
    pub async fn hand_off_leadership(&self, for_new_holder: Duration) {
        // Nobody to hand it to (every other voter is down or stopping too), or no
        // quorum to elect one (the lease's release did not commit either): no wait.
        let metrics = self.metrics();
        if metrics.current_leader != Some(self.id) || self.other_voters_up(&metrics).is_empty() {
            return;
        }
        if !self.quorum_reachable() {
            tracing::info!("no quorum: Raft leadership is not handed over");
            return;
        }
        let mut applied = self.applied.clone();
        let taken = applied.wait_for(|a| {
            let lease = &a.state.lease;
            lease.instance.is_some() && lease.holder.is_some_and(|h| h != self.id)
        });
        let holder = match tokio::time::timeout(for_new_holder, taken).await {
            Ok(Ok(a)) => a.state.lease.holder,
            _ => None,
        };
        let metrics = self.metrics();
        if metrics.current_leader != Some(self.id) {
            return;
        }
        let up = self.other_voters_up(&metrics);
        let Some(to) = holder
            .filter(|h| up.contains(h))
            .or_else(|| up.first().copied())
        else {
            return;
        };
        if let Err(e) = self.transfer_leader(to).await {
            tracing::info!(error = %e, "cannot hand Raft leadership over");
            return;
        }
        let until = tokio::time::Instant::now() + self.election_timeout * 2;
        while tokio::time::Instant::now() < until {
            if self.leader().is_some_and(|(leader, _)| leader != self.id) {
                tracing::info!(to, "handed Raft leadership over");
                return;
            }
            tokio::time::sleep(self.heartbeat / 2).await;
        }
    }

    /// On the leader: hands leadership to `to`, which must be a voter.
    async fn move_leader_here(&self, to: NodeId) -> WriteReply {
        let metrics = self.metrics();
        if !metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == to)
        {
            return WriteReply::Invalid(format!("node {to} is not a voter"));
        }
        if to == self.id {
            return WriteReply::Done(Outcome::Applied {
                config_version: self.applied.borrow().state.config_version,
            });
        }
        match self.transfer_leader(to).await {
            Ok(()) => WriteReply::Done(Outcome::Applied {
                config_version: self.applied.borrow().state.config_version,
            }),
            Err(e) => WriteReply::NotProposed(format!("cannot hand leadership to node {to}: {e}")),
        }
    }

    /// Membership changes, on the leader (a follower forwards them).
    pub async fn manage(&self, op: Manage) -> Result<Outcome, WriteError> {
        self.committed(Request::Manage(op)).await
    }

    async fn committed(&self, request: Request) -> Result<Outcome, WriteError> {
        self.committed_within(request, WRITE_TIMEOUT).await
    }

    async fn committed_within(
        &self,
        request: Request,
        deadline: Duration,
    ) -> Result<Outcome, WriteError> {
        match self.forward_or_local(request, deadline).await? {
            Reply::Write(reply) => write_result(reply),
            other => Err(WriteError::Unknown(format!("unexpected reply: {other:?}"))),
        }
    }

    /// A linearizable read of the replicated state (through the leader).
    pub async fn read(&self) -> Result<Applied, WriteError> {
        // The refusals are worded for writes; a read changes nothing anyway.
        let as_read = |e: String| e.replace("; nothing was changed", "");
        let reply = self
            .forward_or_local(Request::Read, WRITE_TIMEOUT)
            .await
            .map_err(|e| match e {
                WriteError::NotProposed(e) => WriteError::NotProposed(as_read(e)),
                other => other,
            })?;
        match reply {
            Reply::Read(Ok(value)) => serde_json::from_value(value)
                .map_err(|e| WriteError::Unknown(format!("malformed read reply: {e}"))),
            Reply::Read(Err(e)) => Err(WriteError::NotProposed(as_read(e))),
            other => Err(WriteError::Unknown(format!("unexpected reply: {other:?}"))),
        }
    }

    async fn forward_or_local(
        &self,
        request: Request,
        deadline: Duration,
    ) -> Result<Reply, WriteError> {
        if let Err(e) = &self.metrics().running_state {
            return Err(WriteError::NotProposed(format!(
                "this replica's Raft store failed ({e}) and is being rebuilt; nothing was changed"
            )));
        }
        let Some((leader, addr)) = self.leader() else {
            // With a majority answering, what is missing is a leader they agree on.
            let hint = if self.heard_majority() {
                "; a majority answers, so a Raft leader election is probably under way: retry in a moment"
            } else {
                ""
            };
            return Err(WriteError::NotProposed(format!(
                "no Raft leader right now ({}){hint}; nothing was changed",
                self.quorum_note()
            )));
        };
        if leader == self.id {
            return Ok(self.on_leader(request, deadline).await);
        }
        // A follower cut off from its leader still knows the leader's name until a
        // new one is elected: it fails here, not after the forwarded call times out
        // with an outcome nobody knows.
        if !self.quorum_soon(deadline).await {
            return Err(WriteError::NotProposed(format!(
                "this replica has not heard from the Raft leader (node {leader} at {addr}) recently; {}; nothing was changed",
                self.quorum_note()
            )));
        }
        let mut client = self.forwarder(leader, addr.clone());
        match client
            .call(request, deadline + Duration::from_secs(1))
            .await
        {
            Ok(reply) => {
                self.keep_forwarder(client);
                Ok(reply)
            }
            Err(
                e
                @ (CallError::Connect(_) | CallError::Refused(_) | CallError::OtherCluster { .. }),
            ) => Err(WriteError::NotProposed(format!(
                "cannot reach the Raft leader (node {leader} at {addr}): {e}; {}; nothing was changed",
                self.quorum_note()
            ))),
            Err(e) => Err(WriteError::Unknown(format!(
                "the Raft leader (node {leader} at {addr}) did not answer: {e}; {}",
                self.quorum_note()
            ))),
        }
    }

    /// A connection to the leader for a forwarded request: a kept-open one when
    /// there is one (each carries one request at a time), else a new one.
    fn forwarder(&self, leader: NodeId, addr: String) -> PeerClient {
        let fresh = || PeerClient::new(self.net.clone(), leader, addr.clone());
        let Ok(mut pool) = self.forwarders.lock() else {
            return fresh();
        };
        let now = std::time::Instant::now();
        pool.retain(|(c, idle)| c.target == leader && c.addr == addr && now - *idle < FORWARD_IDLE);
        pool.pop().map_or_else(fresh, |(c, _)| c)
    }

    fn keep_forwarder(&self, client: PeerClient) {
        if let Ok(mut pool) = self.forwarders.lock()
            && pool.len() < FORWARDERS
        {
            pool.push((client, std::time::Instant::now()));
        }
    }

    /// What the leader does with a write, a membership change or a read.
    async fn on_leader(&self, request: Request, deadline: Duration) -> Reply {
        if !self.quorum_soon(deadline).await {
            let why = format!(
                "the Raft leader (node {}) has not heard from a quorum recently ({}); nothing was changed",
                self.id,
                self.quorum_note()
            );
            return match request {
                Request::Read => Reply::Read(Err(why)),
                _ => Reply::Write(WriteReply::NotProposed(why)),
            };
        }
        match request {
            Request::Write {
                command,
                deadline_ms,
            } => {
                if let Some(why) = self.too_new(&command) {
                    return Reply::Write(WriteReply::NotProposed(why));
                }
                let deadline = Duration::from_millis(deadline_ms);
                let lease = matches!(command, Command::Lease { .. });
                let reply = proposed(
                    tokio::time::timeout(
                        deadline,
                        self.call(|raft| async move { raft.client_write(command).await }),
                    )
                    .await,
                    deadline,
                );
                if lease && matches!(reply, WriteReply::Done(_)) {
                    // Followers learn the commit with the next heartbeat: send it now,
                    // so a standby acts on a release at once, not a heartbeat later.
                    let _ = self
                        .call(|raft| async move { raft.trigger().heartbeat().await })
                        .await;
                }
                Reply::Write(reply)
            }
            Request::MoveLeader { to } => Reply::Write(self.move_leader_here(to).await),
            Request::Manage(op) => Reply::Write(self.change_members(op).await),
            Request::Read => {
                let read = tokio::time::timeout(
                    WRITE_TIMEOUT,
                    self.call(|raft| async move {
                        raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                            .await
                    }),
                )
                .await;
                match read {
                    Ok(Ok(_)) => {
                        let applied = self.applied.borrow().clone();
                        Reply::Read(serde_json::to_value(&*applied).map_err(|e| e.to_string()))
                    }
                    Ok(Err(e)) => Reply::Read(Err(format!("linearizable read failed: {e}"))),
                    Err(_) => Reply::Read(Err("linearizable read timed out".into())),
                }
            }
            other => Reply::Error(format!("not a leader request: {other:?}")),
        }
    }

    /// Why `command` must wait: a replica that has not been upgraded could not
    /// decode it (etcd's cluster version).
    fn too_new(&self, command: &Command) -> Option<String> {
        let cluster = self.applied.borrow().state.cluster_version();
        let needs = command.protocol();
        (needs > cluster).then(|| {
            let behind: Vec<String> = self
                .net
                .identity
                .protocols()
                .into_iter()
                .filter(|(_, p)| *p < needs)
                .map(|(id, p)| format!("node {id} speaks {p}"))
                .collect();
            format!(
                "\"{command}\" needs peer protocol {needs}; the cluster runs protocol {cluster} \
                 until every voter is upgraded ({}); nothing was changed",
                if behind.is_empty() {
                    "waiting to hear from every voter".to_string()
                } else {
                    behind.join(", ")
                }
            )
        })
    }

    /// The leader raises the cluster's version once every voter announced a later
    /// protocol than it records.
    fn cluster_version_due(&self, state: &Applied) -> Option<u32> {
        let heard = self.net.identity.protocols();
        let voters = state.membership.membership().voter_ids();
        let lowest = voters
            .map(|id| heard.get(&id).copied())
            .collect::<Option<Vec<u32>>>()?
            .into_iter()
            .min()?;
        (lowest > state.state.cluster_version()).then_some(lowest)
    }

    async fn change_members(&self, op: Manage) -> WriteReply {
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known = |id: NodeId| membership.get_node(&id).is_some();
        let change = |c| async move {
            proposed(
                tokio::time::timeout(
                    WRITE_TIMEOUT,
                    self.call(|raft| async move { raft.change_membership(c, false).await }),
                )
                .await,
                WRITE_TIMEOUT,
            )
        };
        match op {
            Manage::AddMember {
                id,
                address,
                learner,
            } => {
                // Checked here too, not only by the admin API: the request may come
                // from any peer.
                if id == 0 {
                    return WriteReply::Invalid("node id 0 is not allowed: use 1 or more".into());
                }
                // The same rules as cluster.peers in the file.
                let wanted = match address.parse::<HostPort>() {
                    Ok(wanted) => wanted,
                    Err(e) => return WriteReply::Invalid(e),
                };
                if known(id) {
                    return WriteReply::Invalid(format!(
                        "node {id} is a member already: remove it first"
                    ));
                }
                for (other, node) in membership.nodes() {
                    if same_place(&wanted, &node.addr).await {
                        return WriteReply::Invalid(format!(
                            "{address} is node {other}'s address ({}): each replica needs its own address, or the one listening there answers for both ids (and removing the new id would remove node {other})",
                            node.addr
                        ));
                    }
                }
                let node = RaftNode { addr: address };
                let added = proposed(
                    tokio::time::timeout(
                        WRITE_TIMEOUT,
                        self.call(|raft| async move { raft.add_learner(id, node, false).await }),
                    )
                    .await,
                    WRITE_TIMEOUT,
                );
                if !learner && matches!(added, WriteReply::Done(_)) {
                    let later = tokio::time::timeout(
                        WRITE_TIMEOUT,
                        self.call(move |raft| async move {
                            raft.client_write(Command::PromoteLater { node: id }).await
                        }),
                    )
                    .await;
                    if !matches!(later, Ok(Ok(_))) {
                        tracing::warn!(
                            node_id = id,
                            "added as a learner, but its promotion could not be recorded; promote it with `raftlb ctl member promote {id}`"
                        );
                    }
                }
                added
            }
            Manage::Promote { id } => {
                if !known(id) {
                    return WriteReply::Invalid(format!("node {id} is not a member: add it first"));
                }
                if voters.contains(&id) {
                    return WriteReply::Invalid(format!("node {id} is a voter already"));
                }
                change(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await
            }
            Manage::Remove { id } => {
                if !known(id) {
                    return WriteReply::Invalid(format!("node {id} is not a member"));
                }
                if voters.contains(&id) && voters.len() == 1 {
                    return WriteReply::Invalid(format!(
                        "node {id} is the only voter: a cluster needs one"
                    ));
                }
                if id == self.id {
                    return self.hand_over_then_remove(&voters).await;
                }
                let addr = membership.get_node(&id).map(|n| n.addr.clone());
                let mut removal = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
                if !voters.contains(&id) {
                    removal = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
                }
                let reply = change(removal).await;
                if let (WriteReply::Done(_), Some(addr)) = (&reply, addr) {
                    if voters.contains(&id) {
                        // Joint consensus leaves it a learner: drop it entirely.
                        let _ = change(ChangeMembers::RemoveNodes(BTreeSet::from([id]))).await;
                    }
                    tokio::spawn(tell_removed(self.net.clone(), id, addr, self.raft()));
                }
                reply
            }
        }
    }

    /// Removing the leader: hand leadership to another voter first, then let the new
    /// leader remove this replica.
    async fn hand_over_then_remove(&self, voters: &BTreeSet<NodeId>) -> WriteReply {
        let Some(to) = voters.iter().copied().find(|v| *v != self.id) else {
            return WriteReply::Invalid("no other voter to hand leadership to".into());
        };
        if let Err(e) = self.transfer_leader(to).await {
            return WriteReply::NotProposed(format!("cannot hand leadership over: {e}"));
        }
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(self.heartbeat).await;
            if let Some((leader, addr)) = self.leader()
                && leader != self.id
            {
                let mut client = PeerClient::new(self.net.clone(), leader, addr);
                return match client
                    .call(
                        Request::Manage(Manage::Remove { id: self.id }),
                        WRITE_TIMEOUT + Duration::from_secs(1),
                    )
                    .await
                {
                    Ok(Reply::Write(reply)) => reply,
                    Ok(other) => WriteReply::Unknown(format!("unexpected reply: {other:?}")),
                    Err(e) => WriteReply::Unknown(format!("node {leader}: {e}")),
                };
            }
        }
        WriteReply::NotProposed("leadership was not handed over in time".into())
    }

    fn hello(&self) -> HelloReply {
        let applied = self.applied.borrow().clone();
        let empty = self
            .db()
            .is_some_and(|db| storage::is_empty(&db).unwrap_or(false));
        HelloReply {
            empty,
            peers: self.peers.iter().map(|(k, v)| (*k, v.clone())).collect(),
            joined: applied.state.joined.iter().copied().collect(),
            voters: Some(
                self.metrics()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .collect(),
            ),
            heartbeat_ms: millis(self.heartbeat),
            election_timeout_ms: millis(self.election_timeout),
            lease: Some(self.lease_settings()),
        }
    }
}

impl network::Handler for Node {
    async fn handle(&self, from: NodeId, request: Request) -> Reply {
        match request {
            Request::Hello => Reply::Hello(Box::new(self.hello())),
            Request::Append(_)
            | Request::Vote(_)
            | Request::PreVote(_)
            | Request::Snapshot { .. }
            | Request::TransferLeader(_) => {
                if !self.vetted.load(std::sync::atomic::Ordering::Acquire) {
                    return Reply::Error(format!(
                        "node {} has an empty or restored data_dir and is still asking its peers whether \
                         it joined this cluster before",
                        self.id
                    ));
                }
                let append = matches!(request, Request::Append(_));
                let reply = network::raft_rpc(&self.raft(), request)
                    .await
                    .unwrap_or_else(|r| Reply::Error(format!("not a Raft RPC: {r:?}")));
                if append
                    && matches!(reply, Reply::Append(_))
                    && let Ok(mut at) = self.leader_contact.lock()
                {
                    *at = Some(std::time::Instant::now());
                }
                reply
            }
            Request::TransferLease { to } => match self.transfer_here(to).await {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e),
            },
            Request::Write { .. }
            | Request::Manage(_)
            | Request::Read
            | Request::MoveLeader { .. } => {
                if self.raft().metrics().borrow_watched().current_leader != Some(self.id) {
                    // Never forwarded twice: the caller answers 503 and nothing changed.
                    let why = format!("node {} is not the Raft leader any more", self.id);
                    return match request {
                        Request::Read => Reply::Read(Err(why)),
                        _ => Reply::Write(WriteReply::NotProposed(why)),
                    };
                }
                let deadline = match &request {
                    Request::Write { deadline_ms, .. } => Duration::from_millis(*deadline_ms),
                    _ => WRITE_TIMEOUT,
                };
                self.on_leader(request, deadline).await
            }
            Request::Removed => {
                // The leader stops replicating to a removed replica, so its word (the
                // frame passed the cluster identity check) is what tells it.
                let metrics = self.metrics();
                let membership = metrics.membership_config.membership();
                // A replica with no membership yet has joined nothing: one just
                // added again (after a wipe) must not take its old self's removal.
                let joined = membership.nodes().next().is_some();
                let member = membership.get_node(&self.id).is_some();
                if !joined {
                    Reply::Error(format!(
                        "node {} has not joined a cluster yet: nothing to be removed from",
                        self.id
                    ))
                } else if !member || metrics.current_leader == Some(from) {
                    self.removed(&format!("node {from}, the Raft leader, says so"))
                        .await;
                    Reply::Ok
                } else {
                    Reply::Error(format!(
                        "node {from} is not the leader this replica follows, and it is still a member here"
                    ))
                }
            }
        }
    }
}

/// Room the file system must have before a failed store is reopened.
const REOPEN_ROOM: usize = 1 << 20;

/// Whether `data_dir` has room again: a scratch file of [`REOPEN_ROOM`] bytes is
/// written, synced and removed. A write into the store itself is no test: redb
/// reuses pages its file already holds, so it succeeds on a full disk, and a store
/// reopened on it fails again at the next growth (seen as a reopen every second,
/// each letting a lease renew through).
fn takes_writes(data_dir: &std::path::Path) -> io::Result<()> {
    use std::io::Write as _;
    let path = data_dir.join(".room-probe");
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; REOPEN_ROOM])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    written
}

/// Tells a removed replica so, until it acknowledges (the leader stops replicating
/// to it, so it may never see its removal committed): a few tries over ~20 s. It
/// stops once `id` is a member again: the documented way to move or rebuild a
/// replica is remove, wipe, add again, start, and the new process must not be
/// told what the old one was.
async fn tell_removed(net: Arc<Net>, id: NodeId, addr: String, raft: Raft) {
    for _ in 0..10 {
        let member_again = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some();
        if member_again {
            return;
        }
        let mut client = PeerClient::new(net.clone(), id, addr.clone());
        if let Ok(Reply::Ok) = client.call(Request::Removed, Duration::from_secs(2)).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::warn!(
        node_id = id,
        "could not tell the removed replica it was removed; stop it by hand"
    );
}

/// Starts openraft on the store `db`, publishing applied states on `publish`.
async fn open_raft(
    id: NodeId,
    config: &Arc<openraft::Config>,
    net: &Arc<Net>,
    db: &Arc<Database>,
    publish: &watch::Sender<Arc<Applied>>,
) -> Result<(Raft, storage::Flusher), String> {
    let (log, sm) = storage::raft_storage(db.clone(), publish.clone())
        .map_err(|e| format!("cannot read the store: {e}"))?;
    let flusher = log.flusher();
    let raft = Raft::new(id, config.clone(), Factory { net: net.clone() }, log, sm)
        .await
        .map_err(|e| format!("cannot start Raft: {e}"))?;
    Ok((raft, flusher))
}

/// A learner waiting to be promoted whose log is within a few entries of the
/// leader's (as this leader's replication metrics see it).
fn caught_up_learner(
    raft: &openraft::RaftMetrics<types::TypeConfig>,
    waiting: &BTreeSet<NodeId>,
) -> Option<NodeId> {
    let membership = raft.membership_config.membership();
    let last = raft.last_log_index.unwrap_or(0);
    waiting.iter().copied().find(|id| {
        let learner = membership.learner_ids().any(|l| l == *id);
        let matched = raft
            .replication
            .as_ref()
            .and_then(|r| r.get(id).cloned().flatten())
            .map_or(0, |l| l.index);
        learner && matched > 0 && matched + 10 >= last
    })
}

type Proposal<E> = Result<
    Result<openraft::raft::ClientWriteResponse<types::TypeConfig>, RaftError<types::TypeConfig, E>>,
    tokio::time::error::Elapsed,
>;

/// Whether a new member's address is where a member already listens: the same
/// address however spelt, or a name that resolves to one of its addresses (each
/// lookup bounded by a second; one that fails or times out finds nothing).
async fn same_place(wanted: &HostPort, member: &str) -> bool {
    let Ok(member) = member.parse::<HostPort>() else {
        return false;
    };
    if wanted.same_as(&member) {
        return true;
    }
    if wanted.ip().is_some() && member.ip().is_some() {
        return false;
    }
    let resolve = |h: HostPort| async move {
        let found = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::lookup_host(h.to_string()),
        )
        .await;
        match found {
            Ok(Ok(addrs)) => addrs
                .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                .collect(),
            _ => Vec::new(),
        }
    };
    let (a, b) = (resolve(wanted.clone()).await, resolve(member).await);
    a.iter().any(|x| b.contains(x))
}

/// Maps a proposal's result: not the leader any more means nothing was proposed.
fn proposed(
    result: Proposal<ClientWriteError<types::TypeConfig>>,
    deadline: Duration,
) -> WriteReply {
    match result {
        Ok(Ok(response)) => WriteReply::Done(response.data),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            WriteReply::NotProposed(format!(
                "not the Raft leader any more ({f}); nothing was changed"
            ))
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
            WriteReply::Invalid(e.to_string())
        }
        Ok(Err(e)) => WriteReply::Unknown(e.to_string()),
        Err(_) => WriteReply::Unknown(format!("not committed within {deadline:?}")),
    }
}

fn write_result(reply: WriteReply) -> Result<Outcome, WriteError> {
    match reply {
        WriteReply::Done(outcome) => Ok(outcome),
        WriteReply::NotProposed(e) => Err(WriteError::NotProposed(e)),
        WriteReply::Unknown(e) => Err(WriteError::Unknown(e)),
        WriteReply::Invalid(e) => Err(WriteError::Invalid(e)),
    }
}

/// The names more than one replica goes by.
fn shared_names(nodes: &BTreeMap<NodeId, NodeInfo>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    nodes
        .values()
        .filter(|info| !seen.insert(info.name.as_str()))
        .map(|info| info.name.clone())
        .collect()
}

/// After the first start the store is the source of truth; a file that differs is
/// logged at start and on each reload (`when`: "" or "reload: ", so the two lines
/// are not folded into one), naming the pools.
fn log_seed_difference(
    file: &BTreeMap<String, schema::Pool>,
    store: &BTreeMap<String, schema::Pool>,
    when: &str,
) {
    let differ = seed_difference(file, store);
    if !differ.is_empty() && !file.is_empty() {
        tracing::warn!(
            differences = ?differ,
            "{when}the file's pools differ from the replicated config, the source of truth, \
             and are not applied: change pools with `raftlb ctl` or the admin API (the file \
             only seeds a new cluster)"
        );
    }
}

/// What differs between the file's pools and the store's, one line a field
/// (`pools.web.backends[b1].weight: file 1, store 7`), backends matched by name; at
/// most 20 lines.
fn seed_difference(
    file: &BTreeMap<String, schema::Pool>,
    store: &BTreeMap<String, schema::Pool>,
) -> Vec<String> {
    let json = |pools: &BTreeMap<String, schema::Pool>| serde_json::to_value(pools).ok();
    let mut out = Vec::new();
    diff_values("pools", json(file).as_ref(), json(store).as_ref(), &mut out);
    out.truncate(20);
    out
}

fn diff_values(path: &str, file: Option<&Value>, store: Option<&Value>, out: &mut Vec<String>) {
    if let (Some(Value::Array(a)), Some(Value::Array(b))) = (file, store)
        && let (Some(a), Some(b)) = (by_name(a), by_name(b))
    {
        for name in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
            diff_values(
                &format!("{path}[{name}]"),
                a.get(name).copied(),
                b.get(name).copied(),
                out,
            );
        }
        return;
    }
    match (file, store) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            for key in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
                diff_values(&format!("{path}.{key}"), a.get(key), b.get(key), out);
            }
        }
        (Some(a), Some(b)) if a == b => {}
        (Some(a), Some(b)) => out.push(format!("{path}: file {a}, store {b}")),
        (Some(_), None) => out.push(format!("{path}: only in the file")),
        (None, Some(_)) => out.push(format!("{path}: only in the store")),
        (None, None) => {}
    }
}

/// A list whose items all have a `name` (backends), by that name.
fn by_name(items: &[Value]) -> Option<BTreeMap<&str, &Value>> {
    items
        .iter()
        .map(|v| Some((v.get("name")?.as_str()?, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_difference_names_each_field_and_backend() {
        let pools = |yaml: &str| crate::config::parse_pools(yaml, "test").expect("pools");
        let file = pools(
            "pools:\n  web:\n    backends:\n      - { name: b1, address: \"127.0.0.1:1\" }\n",
        );
        let store = pools(
            "pools:\n  web:\n    balance: least_connections\n    backends:\n      - { name: b1, address: \"127.0.0.1:1\", weight: 7 }\n      - { name: b2, address: \"127.0.0.1:2\" }\n  api:\n    backends:\n      - { name: a, address: \"127.0.0.1:3\" }\n",
        );
        assert_eq!(
            seed_difference(&file, &store),
            vec![
                "pools.api: only in the store",
                "pools.web.backends[b1].weight: file 1, store 7",
                "pools.web.backends[b2]: only in the store",
                "pools.web.balance: file \"round_robin\", store \"least_connections\"",
            ]
        );
        assert!(seed_difference(&file, &file).is_empty());
    }

    #[test]
    fn names_shared_by_several_replicas_are_found() {
        let info = |name: &str| NodeInfo {
            name: name.into(),
            ..NodeInfo::default()
        };
        let nodes = BTreeMap::from([(1, info("lb-1")), (2, info("lb-1")), (3, info("lb-3"))]);
        assert_eq!(shared_names(&nodes), BTreeSet::from(["lb-1".to_string()]));
        let nodes = BTreeMap::from([(1, info("lb-1")), (2, info("lb-2"))]);
        assert!(shared_names(&nodes).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_raft_call_completes_when_its_caller_stops_waiting() {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let call = to_completion(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(10), call)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    }
}
