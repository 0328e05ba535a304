//! What the Raft log carries and what the state machine holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Cursor;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::schema;

openraft::declare_raft_types!(
    /// raftlb's Raft types: node ids are the config's `node_id`, a node is its peer address.
    pub TypeConfig:
        D = Command,
        R = Outcome,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;

/// Runs a call on openraft's [`Raft`] in a task of its own and waits for it: the call
/// completes even when the caller stops waiting (a timeout, shutdown, a closed peer
/// connection). openraft 0.10.0-alpha.37 lets the first caller that finds the core
/// stopped wait for the core task on behalf of all; dropped during that wait, it
/// leaves the others to a panic that poisons the core's lock, and every later call
/// (`shutdown` included) panics too.
pub async fn to_completion<T: Send + 'static>(
    call: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match tokio::spawn(call).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down and drops this caller too.
        Err(_) => std::future::pending().await,
    }
}

/// A change to the replicated state. Applied in log order on every replica; the
/// outcome depends only on the state before it, so every replica gets the same one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// Proposed by the first leader of a new cluster: the cluster's UUID and the pools
    /// from its file. Only the first one applied counts.
    Init {
        uuid: Uuid,
        pools: BTreeMap<String, schema::Pool>,
    },
    /// `PUT /api/v1/config`: replaces every pool; with `if_version`, only if the
    /// config_version still is that.
    SetPools {
        pools: BTreeMap<String, schema::Pool>,
        if_version: Option<u64>,
    },
    AddBackend {
        pool: String,
        backend: schema::Backend,
    },
    RemoveBackend {
        pool: String,
        backend: String,
    },
    SetDrained {
        pool: String,
        backend: String,
        drained: bool,
    },
    SetWeight {
        pool: String,
        backend: String,
        weight: u32,
    },
    /// "node N joined": a replica that caught up says so once. A wiped replica that
    /// finds itself here refuses to start (it could vote twice).
    Joined {
        node: NodeId,
    },
    /// A learner added to become a voter: whichever replica leads promotes it once
    /// it has caught up (so a leader change while it catches up does not strand it).
    PromoteLater {
        node: NodeId,
    },
    /// Compare-and-set on the leader-election lease at version `expect`
    /// (DESIGN-lease.md); the outcome is [`Outcome::Lease`].
    Lease {
        expect: u64,
        op: LeaseOp,
    },
    /// Compare-and-set on a generic record. `expect` is the record's version, 0 for
    /// "never written"; `value: None` deletes it (its version keeps growing).
    Cas {
        key: String,
        expect: u64,
        value: Option<serde_json::Value>,
    },
    /// Protocol 2: every voter announced `version`; commands of that protocol may
    /// be proposed from now on. Never lowers the cluster's version.
    ClusterVersion {
        version: u32,
    },
    /// Protocol 2: a replica's name and build, for status (`members[].name`).
    NodeInfo {
        node: NodeId,
        info: NodeInfo,
    },
}

/// What a replica says of itself in the replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// Its raftlb version.
    pub version: String,
    /// The peer protocol it speaks.
    pub protocol: u32,
}

impl Command {
    /// The peer protocol a replica needs to decode this command: proposed only
    /// when the cluster's version is at least this.
    pub fn protocol(&self) -> u32 {
        match self {
            Command::NodeInfo { .. } => 2,
            // Its own gate: the leader proposes it only once every voter announced
            // `version`, so every voter decodes it.
            Command::ClusterVersion { .. } => 1,
            _ => 1,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Init { uuid, .. } => write!(f, "init cluster {uuid}"),
            Command::SetPools { if_version, .. } => write!(f, "set pools (if {if_version:?})"),
            Command::AddBackend { pool, backend } => {
                write!(f, "add backend {pool}/{}", backend.name.value)
            }
            Command::RemoveBackend { pool, backend } => {
                write!(f, "remove backend {pool}/{backend}")
            }
            Command::SetDrained {
                pool,
                backend,
                drained,
            } => write!(f, "drained={drained} {pool}/{backend}"),
            Command::SetWeight {
                pool,
                backend,
                weight,
            } => write!(f, "weight={weight} {pool}/{backend}"),
            Command::Joined { node } => write!(f, "node {node} joined"),
            Command::PromoteLater { node } => write!(f, "promote node {node} once caught up"),
            Command::Lease { expect, op } => write!(f, "lease {op} at {expect}"),
            Command::Cas { key, expect, .. } => write!(f, "cas {key} at {expect}"),
            Command::ClusterVersion { version } => write!(f, "cluster version {version}"),
            Command::NodeInfo { node, info } => {
                write!(f, "node {node} is {:?}, raftlb {}", info.name, info.version)
            }
        }
    }
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied; the config_version after it.
    Applied { config_version: u64 },
    /// A record's new version after a successful compare-and-set.
    Record { version: u64 },
    /// Not applied, and why; `status` is the HTTP status the admin API answers with.
    Refused { status: u16, error: String },
    /// A lease compare-and-set: won (the record as written) or lost (the record as it
    /// is, so the loser learns the version and holder in the same round trip).
    Lease { won: bool, lease: Lease },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Applied { config_version } => write!(f, "applied at {config_version}"),
            Outcome::Record { version } => write!(f, "record at {version}"),
            Outcome::Refused { status, error } => write!(f, "refused ({status}): {error}"),
            Outcome::Lease { won, lease } => {
                let verdict = if *won { "won" } else { "lost" };
                write!(f, "lease {verdict}: {lease}")
            }
        }
    }
}

/// A generic versioned record; `value: None` once deleted (the version keeps growing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub version: u64,
    pub value: Option<serde_json::Value>,
}

/// The leader-election lease (DESIGN-lease.md, "Record"). Times are wall-clock
/// milliseconds since the Unix epoch, for display only: no decision reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder's Raft node_id; `None`: free.
    pub holder: Option<NodeId>,
    /// The holder's `node.name`, for people.
    pub holder_name: String,
    /// The holding process's random instance; `None` with a holder: handed over to
    /// that replica, which fills it in when it takes the lease.
    pub instance: Option<String>,
    /// Grows by one on every standby -> active change (the fencing token).
    pub epoch: u64,
    /// Grows by one on every change, never restarts.
    pub version: u64,
    /// The holder's own settings, written on every renew.
    pub lease_duration_ms: u64,
    pub renew_deadline_ms: u64,
    pub acquire_time_ms: u64,
    pub renew_time_ms: u64,
}

impl Lease {
    /// Held by the process `instance` of `node`.
    pub fn held_by(&self, node: NodeId, instance: &str) -> bool {
        self.holder == Some(node) && self.instance.as_deref() == Some(instance)
    }

    /// Handed over to `holder` by a transfer, and not taken yet (the record still
    /// carries the sender's name).
    pub fn handed_over(&self) -> bool {
        self.holder.is_some() && self.instance.is_none()
    }
}

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.holder, &self.instance) {
            (None, _) => write!(f, "free")?,
            (Some(h), None) => write!(f, "handed to node {h}")?,
            (Some(h), Some(_)) => write!(f, "held by node {h} ({})", self.holder_name)?,
        }
        write!(f, ", epoch {}, version {}", self.epoch, self.version)
    }
}

/// A change to the lease, made only by compare-and-set on its version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LeaseOp {
    /// Rules 3 and 4: take a free lease, one handed to the sender, or one that expired
    /// as the sender saw it (held, or handed to a successor that did not take it); the
    /// state machine writes epoch + 1.
    Acquire { claim: Claim },
    /// Rule 1: the holder (same node and instance) keeps it.
    Renew { claim: Claim },
    /// Rules 5 and 6: the holder gives it up, to nobody or to `to`.
    Release {
        node: NodeId,
        instance: String,
        to: Option<NodeId>,
        now_ms: u64,
    },
}

/// Who asks for the lease, and with what settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub node: NodeId,
    pub name: String,
    pub instance: String,
    pub lease_duration_ms: u64,
    pub renew_deadline_ms: u64,
    pub now_ms: u64,
}

impl LeaseOp {
    /// Stamps the wall-clock time (display only) the sender sends it at.
    pub fn stamped(mut self, now_ms: u64) -> Self {
        match &mut self {
            LeaseOp::Acquire { claim } | LeaseOp::Renew { claim } => claim.now_ms = now_ms,
            LeaseOp::Release { now_ms: at, .. } => *at = now_ms,
        }
        self
    }
}

impl fmt::Display for LeaseOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseOp::Acquire { claim } => write!(f, "acquire by node {}", claim.node),
            LeaseOp::Renew { claim } => write!(f, "renew by node {}", claim.node),
            LeaseOp::Release { node, to: None, .. } => write!(f, "release by node {node}"),
            LeaseOp::Release {
                node, to: Some(to), ..
            } => {
                write!(f, "transfer by node {node} to node {to}")
            }
        }
    }
}

impl Lease {
    /// Applies one compare-and-set. The state machine, not the caller, enforces the
    /// rules that do not depend on time: epoch + 1 on every acquire (rule 3), only
    /// the holder's own instance renews or gives it away (rule 6). When a replica may
    /// acquire is the caller's rule (it depends on time); which acquire wins is the
    /// version's.
    pub fn apply(&mut self, expect: u64, op: LeaseOp) -> Outcome {
        let won = expect == self.version
            && match &op {
                // Free; handed over, to the sender (rule 4: at once) or to a
                // successor that did not take it before it expired as the sender
                // saw it (everyone else treats it as held); held and expired as the
                // sender saw it (rule 3); or its own lease taken again after its term
                // ran out. A successor that died must not keep the lease from others.
                LeaseOp::Acquire { .. } => true,
                LeaseOp::Renew { claim } => self.held_by(claim.node, &claim.instance),
                LeaseOp::Release { node, instance, .. } => self.held_by(*node, instance),
            };
        if won {
            self.version += 1;
            match op {
                LeaseOp::Acquire { claim } => {
                    self.epoch += 1;
                    self.acquire_time_ms = claim.now_ms;
                    self.take(claim);
                }
                LeaseOp::Renew { claim } => self.take(claim),
                LeaseOp::Release { to, now_ms, .. } => {
                    self.holder = to;
                    self.instance = None;
                    self.renew_time_ms = now_ms;
                    if to.is_none() {
                        self.holder_name.clear();
                    }
                }
            }
        }
        Outcome::Lease {
            won,
            lease: self.clone(),
        }
    }

    fn take(&mut self, claim: Claim) {
        self.holder = Some(claim.node);
        self.holder_name = claim.name;
        self.instance = Some(claim.instance);
        self.lease_duration_ms = claim.lease_duration_ms;
        self.renew_deadline_ms = claim.renew_deadline_ms;
        self.renew_time_ms = claim.now_ms;
    }
}

/// The replicated state: what every replica applies from the log.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Replicated {
    pub cluster_uuid: Option<Uuid>,
    /// Bumped by every change of the pools.
    pub config_version: u64,
    /// Shared, so the lease's renewals (every retry_period) do not copy the pools.
    pub pools: Arc<BTreeMap<String, schema::Pool>>,
    pub joined: BTreeSet<NodeId>,
    pub records: BTreeMap<String, Record>,
    /// The leader-election lease, apart from the pools.
    #[serde(default)]
    pub lease: Lease,
    /// Learners the leader promotes to voters once they have caught up.
    #[serde(default)]
    pub promote: BTreeSet<NodeId>,
    /// The peer protocol every voter speaks (0: a cluster from before it was
    /// recorded, i.e. 1); see [`Replicated::cluster_version`].
    #[serde(default)]
    pub cluster_version: u32,
    /// What each replica said of itself (protocol 2).
    #[serde(default)]
    pub nodes: BTreeMap<NodeId, NodeInfo>,
}

impl Replicated {
    /// The peer protocol every voter speaks, as committed: commands of a later
    /// protocol wait.
    pub fn cluster_version(&self) -> u32 {
        self.cluster_version.max(1)
    }

    /// After a membership change: only learners still wait to be promoted.
    pub fn membership_changed(&mut self, voters: &BTreeSet<NodeId>, learners: &BTreeSet<NodeId>) {
        self.promote
            .retain(|id| learners.contains(id) && !voters.contains(id));
        self.nodes
            .retain(|id, _| voters.contains(id) || learners.contains(id));
    }

    /// Applies one command; deterministic, so every replica ends in the same state.
    pub fn apply(&mut self, command: Command) -> Outcome {
        match command {
            Command::Init { uuid, pools } => {
                if self.cluster_uuid.is_some() {
                    return refused(409, "the cluster is initialised already");
                }
                self.cluster_uuid = Some(uuid);
                self.pools = Arc::new(pools);
                self.bump()
            }
            Command::SetPools { pools, if_version } => match if_version {
                Some(v) if v != self.config_version => {
                    refused(412, stale_version(v, self.config_version))
                }
                _ => self.set_pools(pools),
            },
            Command::AddBackend { pool, backend } => {
                let Some(p) = Arc::make_mut(&mut self.pools).get_mut(&pool) else {
                    return no_pool(&pool);
                };
                if p.backends
                    .value
                    .iter()
                    .any(|b| b.name.value == backend.name.value)
                {
                    return refused(
                        409,
                        format!(
                            "pool {pool} has a backend named {} already: remove it first or pick another name",
                            backend.name.value
                        ),
                    );
                }
                p.backends.value.push(backend);
                self.bump()
            }
            Command::RemoveBackend { pool, backend } => {
                let Some(p) = Arc::make_mut(&mut self.pools).get_mut(&pool) else {
                    return no_pool(&pool);
                };
                let before = p.backends.value.len();
                if before == 1 && p.backends.value[0].name.value == backend {
                    return refused(
                        409,
                        format!(
                            "{backend} is the last backend of pool {pool}: a pool needs one; add another first"
                        ),
                    );
                }
                p.backends.value.retain(|b| b.name.value != backend);
                if p.backends.value.len() == before {
                    return no_backend(&pool, &backend);
                }
                self.bump()
            }
            Command::SetDrained {
                pool,
                backend,
                drained,
            } => self.change_backend(&pool, &backend, |b| b.drained = drained),
            Command::SetWeight {
                pool,
                backend,
                weight,
            } => self.change_backend(&pool, &backend, |b| b.weight.value = weight),
            Command::Joined { node } => {
                self.joined.insert(node);
                Outcome::Applied {
                    config_version: self.config_version,
                }
            }
            Command::ClusterVersion { version } => {
                self.cluster_version = self.cluster_version.max(version);
                Outcome::Applied {
                    config_version: self.config_version,
                }
            }
            Command::NodeInfo { node, info } => {
                self.nodes.insert(node, info);
                Outcome::Applied {
                    config_version: self.config_version,
                }
            }
            Command::PromoteLater { node } => {
                self.promote.insert(node);
                Outcome::Applied {
                    config_version: self.config_version,
                }
            }
            Command::Lease { expect, op } => self.lease.apply(expect, op),
            Command::Cas { key, expect, value } => {
                let current = self.records.get(&key).map_or(0, |r| r.version);
                if current != expect {
                    return refused(
                        412,
                        format!("record {key} is at version {current}, not {expect}"),
                    );
                }
                let version = current + 1;
                self.records.insert(key, Record { version, value });
                Outcome::Record { version }
            }
        }
    }

    /// Replaces the pools; the same pools again change nothing (the version stays).
    fn set_pools(&mut self, pools: BTreeMap<String, schema::Pool>) -> Outcome {
        if crate::config::same(&pools, self.pools.as_ref()) {
            return self.unchanged();
        }
        self.pools = Arc::new(pools);
        self.bump()
    }

    /// Changes one backend; a change to what it is already (draining a drained
    /// backend) changes nothing and keeps the version.
    fn change_backend(
        &mut self,
        pool: &str,
        backend: &str,
        change: impl FnOnce(&mut schema::Backend),
    ) -> Outcome {
        let Some(p) = self.pools.get(pool) else {
            return no_pool(pool);
        };
        let Some(i) = p
            .backends
            .value
            .iter()
            .position(|b| b.name.value == backend)
        else {
            return no_backend(pool, backend);
        };
        let mut changed = p.backends.value[i].clone();
        change(&mut changed);
        if crate::config::same(&changed, &p.backends.value[i]) {
            return self.unchanged();
        }
        if let Some(p) = Arc::make_mut(&mut self.pools).get_mut(pool) {
            p.backends.value[i] = changed;
        }
        self.bump()
    }

    fn unchanged(&self) -> Outcome {
        Outcome::Applied {
            config_version: self.config_version,
        }
    }

    fn bump(&mut self) -> Outcome {
        self.config_version += 1;
        Outcome::Applied {
            config_version: self.config_version,
        }
    }
}

/// Why a write whose `If-Match` names version `v` was refused at version `now`.
pub fn stale_version(v: u64, now: u64) -> String {
    format!(
        "If-Match \"{v}\" no longer matches: the config_version is {now}; read it again and retry"
    )
}

fn refused(status: u16, error: impl Into<String>) -> Outcome {
    Outcome::Refused {
        status,
        error: error.into(),
    }
}

fn no_pool(pool: &str) -> Outcome {
    refused(404, format!("no pool named {pool}"))
}

fn no_backend(pool: &str, backend: &str) -> Outcome {
    refused(404, format!("pool {pool} has no backend named {backend}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> BTreeMap<String, schema::Pool> {
        let yaml = "listeners: {}\npools:\n  web:\n    backends:\n      - { name: a, address: 127.0.0.1:1 }\n      - { name: b, address: 127.0.0.1:2 }\n";
        crate::config::parse(yaml, "test", 10_000)
            .expect("valid")
            .pools
    }

    #[test]
    fn commands_change_the_version_and_refusals_change_nothing() {
        let mut s = Replicated::default();
        let uuid = Uuid::new_v4();
        assert_eq!(
            s.apply(Command::Init {
                uuid,
                pools: pools()
            }),
            Outcome::Applied { config_version: 1 }
        );
        // Every refusal leaves the whole state as it was.
        let refused = |s: &mut Replicated, command: Command, want: u16| {
            let before = serde_json::to_value(&*s).expect("state as JSON");
            let outcome = s.apply(command);
            assert!(
                matches!(outcome, Outcome::Refused { status, .. } if status == want),
                "{outcome:?}"
            );
            assert_eq!(serde_json::to_value(&*s).expect("state as JSON"), before);
        };
        refused(
            &mut s,
            Command::Init {
                uuid: Uuid::new_v4(),
                pools: BTreeMap::new(),
            },
            409,
        );
        assert_eq!(s.cluster_uuid, Some(uuid));
        let drain = Command::SetDrained {
            pool: "web".into(),
            backend: "a".into(),
            drained: true,
        };
        assert_eq!(s.apply(drain), Outcome::Applied { config_version: 2 });
        assert!(s.pools["web"].backends.value[0].drained);
        let stale = Command::SetPools {
            pools: BTreeMap::new(),
            if_version: Some(1),
        };
        refused(&mut s, stale, 412);
        let missing = Command::RemoveBackend {
            pool: "web".into(),
            backend: "zz".into(),
        };
        refused(&mut s, missing, 404);
        assert_eq!(s.config_version, 2);
    }

    #[test]
    fn compare_and_set_records() {
        let mut s = Replicated::default();
        let put = |expect, v: i32| Command::Cas {
            key: "lease".into(),
            expect,
            value: Some(serde_json::json!(v)),
        };
        assert_eq!(s.apply(put(0, 1)), Outcome::Record { version: 1 });
        assert!(matches!(
            s.apply(put(0, 2)),
            Outcome::Refused { status: 412, .. }
        ));
        assert_eq!(s.apply(put(1, 3)), Outcome::Record { version: 2 });
        assert_eq!(s.records["lease"].value, Some(serde_json::json!(3)));
        assert_eq!(s.config_version, 0, "records are not config");
        // A deleted record keeps its version: it never restarts at 0.
        let delete = Command::Cas {
            key: "lease".into(),
            expect: 2,
            value: None,
        };
        assert_eq!(s.apply(delete), Outcome::Record { version: 3 });
        assert!(matches!(
            s.apply(put(0, 4)),
            Outcome::Refused { status: 412, .. }
        ));
        assert_eq!(s.apply(put(3, 5)), Outcome::Record { version: 4 });
    }

    fn claim(node: NodeId, instance: &str) -> Claim {
        Claim {
            node,
            name: format!("lb-{node}"),
            instance: instance.into(),
            lease_duration_ms: 15_000,
            renew_deadline_ms: 10_000,
            now_ms: 1,
        }
    }

    fn lease(s: &mut Replicated, expect: u64, op: LeaseOp) -> (bool, Lease) {
        match s.apply(Command::Lease { expect, op }) {
            Outcome::Lease { won, lease } => (won, lease),
            other => panic!("not a lease outcome: {other}"),
        }
    }

    #[test]
    fn lease_acquire_renew_and_lost_cas() {
        let mut s = Replicated::default();
        let (won, l) = lease(
            &mut s,
            0,
            LeaseOp::Acquire {
                claim: claim(1, "a"),
            },
        );
        assert!(won);
        assert_eq!((l.holder, l.epoch, l.version), (Some(1), 1, 1));
        // B acquires on a stale version: lost, and told the current record.
        let (won, l) = lease(
            &mut s,
            0,
            LeaseOp::Acquire {
                claim: claim(2, "b"),
            },
        );
        assert!(!won);
        assert_eq!((l.holder, l.version), (Some(1), 1));
        // A renews: same epoch, new version.
        let (won, l) = lease(
            &mut s,
            1,
            LeaseOp::Renew {
                claim: claim(1, "a"),
            },
        );
        assert!(won);
        assert_eq!((l.epoch, l.version), (1, 2));
        // B renewing A's lease, or A's previous process: lost (rule 6).
        assert!(
            !lease(
                &mut s,
                2,
                LeaseOp::Renew {
                    claim: claim(2, "b")
                }
            )
            .0
        );
        assert!(
            !lease(
                &mut s,
                2,
                LeaseOp::Renew {
                    claim: claim(1, "old")
                }
            )
            .0
        );
        assert_eq!(s.lease.version, 2, "a lost CAS changes nothing");
        // B takes over after the lease expired as it saw version 2: epoch + 1.
        let (won, l) = lease(
            &mut s,
            2,
            LeaseOp::Acquire {
                claim: claim(2, "b"),
            },
        );
        assert!(won);
        assert_eq!(
            (l.holder, l.instance.as_deref(), l.epoch, l.version),
            (Some(2), Some("b"), 2, 3)
        );
        assert_eq!(s.config_version, 0, "the lease is not config");
    }

    #[test]
    fn a_restarted_holder_is_not_the_holder() {
        let mut s = Replicated::default();
        lease(
            &mut s,
            0,
            LeaseOp::Acquire {
                claim: claim(1, "before"),
            },
        );
        // The restarted process renews with its new instance: lost.
        assert!(
            !lease(
                &mut s,
                1,
                LeaseOp::Renew {
                    claim: claim(1, "after")
                }
            )
            .0
        );
        // It may acquire (after waiting, which the caller does): a new epoch.
        let (won, l) = lease(
            &mut s,
            1,
            LeaseOp::Acquire {
                claim: claim(1, "after"),
            },
        );
        assert!(won);
        assert_eq!((l.epoch, l.instance.as_deref()), (2, Some("after")));
    }

    #[test]
    fn only_the_holder_releases_and_a_transfer_is_taken_by_its_successor_or_once_expired() {
        let mut s = Replicated::default();
        lease(
            &mut s,
            0,
            LeaseOp::Acquire {
                claim: claim(1, "a"),
            },
        );
        let release = |node, instance: &str, to| LeaseOp::Release {
            node,
            instance: instance.into(),
            to,
            now_ms: 2,
        };
        // Rule 6: another replica cannot give A's lease away.
        assert!(!lease(&mut s, 1, release(2, "b", Some(2))).0);
        assert!(!lease(&mut s, 1, release(1, "old", None)).0);
        // A hands it to 3.
        let (won, l) = lease(&mut s, 1, release(1, "a", Some(3)));
        assert!(won);
        assert_eq!((l.holder, l.instance.clone(), l.epoch), (Some(3), None, 1));
        // Rule 4: 3 takes it at once; anyone else treats it as held, and may take it
        // once it expired (the caller waits): if 3 died first, 2 does.
        let mut successor_died = s.clone();
        let (won, l) = lease(
            &mut successor_died,
            2,
            LeaseOp::Acquire {
                claim: claim(2, "b"),
            },
        );
        assert!(won);
        assert_eq!(
            (l.holder, l.instance.as_deref(), l.epoch),
            (Some(2), Some("b"), 2)
        );
        // It is nobody's to renew until taken.
        assert!(
            !lease(
                &mut s,
                2,
                LeaseOp::Renew {
                    claim: claim(3, "c")
                }
            )
            .0
        );
        let (won, l) = lease(
            &mut s,
            2,
            LeaseOp::Acquire {
                claim: claim(3, "c"),
            },
        );
        assert!(won);
        assert_eq!(
            (l.holder, l.instance.as_deref(), l.epoch),
            (Some(3), Some("c"), 2)
        );
        // 3 releases to nobody: anyone may take it at once.
        let (won, l) = lease(&mut s, 3, release(3, "c", None));
        assert!(won);
        assert_eq!((l.holder, l.epoch), (None, 2));
        assert!(
            lease(
                &mut s,
                4,
                LeaseOp::Acquire {
                    claim: claim(2, "b")
                }
            )
            .0
        );
        assert_eq!(s.lease.epoch, 3);
    }

    #[test]
    fn the_instance_survives_json_as_a_string() {
        let instance = u128::MAX.to_string();
        let mut s = Replicated::default();
        lease(
            &mut s,
            0,
            LeaseOp::Acquire {
                claim: claim(1, &instance),
            },
        );
        let json = serde_json::to_string(&s).expect("encode");
        let back: Replicated = serde_json::from_str(&json).expect("decode");
        assert_eq!(back.lease, s.lease);
    }

    #[test]
    fn a_learner_waits_to_be_promoted_until_it_is_a_voter_or_gone() {
        let mut s = Replicated::default();
        s.apply(Command::PromoteLater { node: 4 });
        s.apply(Command::PromoteLater { node: 5 });
        assert_eq!(s.promote, BTreeSet::from([4, 5]));
        assert_eq!(s.config_version, 0, "not a config change");
        // 4 became a voter, 5 is still a learner.
        s.membership_changed(&BTreeSet::from([1, 2, 3, 4]), &BTreeSet::from([5]));
        assert_eq!(s.promote, BTreeSet::from([5]));
        // 5 was removed.
        s.membership_changed(&BTreeSet::from([1, 2, 3, 4]), &BTreeSet::new());
        assert!(s.promote.is_empty());
    }

    #[test]
    fn the_cluster_version_only_rises_and_a_removed_replica_forgets_its_info() {
        let mut s = Replicated::default();
        assert_eq!(s.cluster_version(), 1, "a cluster from before versions: 1");
        assert_eq!(
            Command::NodeInfo {
                node: 1,
                info: NodeInfo::default()
            }
            .protocol(),
            2
        );
        s.apply(Command::ClusterVersion { version: 2 });
        s.apply(Command::ClusterVersion { version: 1 });
        assert_eq!(s.cluster_version(), 2, "never lowered");
        let info = NodeInfo {
            name: "lb-2".into(),
            version: "0.1.0".into(),
            protocol: 2,
        };
        s.apply(Command::NodeInfo {
            node: 2,
            info: info.clone(),
        });
        assert_eq!(s.nodes.get(&2), Some(&info));
        assert_eq!(s.config_version, 0, "not a config change");
        s.membership_changed(&BTreeSet::from([1, 3]), &BTreeSet::new());
        assert!(s.nodes.is_empty());
    }

    #[test]
    fn a_change_to_what_is_there_already_keeps_the_version() {
        let mut s = Replicated::default();
        s.apply(Command::Init {
            uuid: Uuid::nil(),
            pools: BTreeMap::new(),
        });
        assert_eq!(
            s.config_version, 1,
            "init always counts, even with no pools"
        );
        s.apply(Command::SetPools {
            pools: pools(),
            if_version: None,
        });
        assert_eq!(s.config_version, 2);
        let same_again = s.apply(Command::SetPools {
            pools: pools(),
            if_version: None,
        });
        assert_eq!(same_again, Outcome::Applied { config_version: 2 });
        let drain = || Command::SetDrained {
            pool: "web".into(),
            backend: "a".into(),
            drained: true,
        };
        s.apply(drain());
        assert_eq!(s.config_version, 3);
        let before = Arc::clone(&s.pools);
        assert_eq!(s.apply(drain()), Outcome::Applied { config_version: 3 });
        assert!(Arc::ptr_eq(&before, &s.pools), "nothing rewritten");
        let weight = |weight| Command::SetWeight {
            pool: "web".into(),
            backend: "a".into(),
            weight,
        };
        s.apply(weight(1));
        assert_eq!(s.config_version, 3, "weight 1 is the default");
        s.apply(weight(4));
        assert_eq!(s.config_version, 4);
    }
}
