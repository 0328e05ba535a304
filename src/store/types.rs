//! What the Raft log carries and what the state machine holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Cursor;

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
pub type Raft = openraft::Raft<TypeConfig, super::storage::StateMachine>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;

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
    /// Compare-and-set on a generic record (the leader-election lease). `expect` is the
    /// record's version, 0 for "absent"; `value: None` deletes it.
    Cas {
        key: String,
        expect: u64,
        value: Option<serde_json::Value>,
    },
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
            Command::Cas { key, expect, .. } => write!(f, "cas {key} at {expect}"),
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
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Applied { config_version } => write!(f, "applied at {config_version}"),
            Outcome::Record { version } => write!(f, "record at {version}"),
            Outcome::Refused { status, error } => write!(f, "refused ({status}): {error}"),
        }
    }
}

/// A generic versioned record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub version: u64,
    pub value: serde_json::Value,
}

/// The replicated state: what every replica applies from the log.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Replicated {
    pub cluster_uuid: Option<Uuid>,
    /// Bumped by every change of the pools.
    pub config_version: u64,
    pub pools: BTreeMap<String, schema::Pool>,
    pub joined: BTreeSet<NodeId>,
    pub records: BTreeMap<String, Record>,
    /// Learners the leader promotes to voters once they have caught up.
    #[serde(default)]
    pub promote: BTreeSet<NodeId>,
}

impl Replicated {
    /// After a membership change: only learners still wait to be promoted.
    pub fn membership_changed(&mut self, voters: &BTreeSet<NodeId>, learners: &BTreeSet<NodeId>) {
        self.promote
            .retain(|id| learners.contains(id) && !voters.contains(id));
    }

    /// Applies one command; deterministic, so every replica ends in the same state.
    pub fn apply(&mut self, command: Command) -> Outcome {
        match command {
            Command::Init { uuid, pools } => {
                if self.cluster_uuid.is_some() {
                    return refused(409, "the cluster is initialised already");
                }
                self.cluster_uuid = Some(uuid);
                self.set_pools(pools)
            }
            Command::SetPools { pools, if_version } => match if_version {
                Some(v) if v != self.config_version => refused(
                    412,
                    format!(
                        "If-Match \"{v}\" no longer matches: the config_version is {}; read it again and retry",
                        self.config_version
                    ),
                ),
                _ => self.set_pools(pools),
            },
            Command::AddBackend { pool, backend } => {
                let Some(p) = self.pools.get_mut(&pool) else {
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
                let Some(p) = self.pools.get_mut(&pool) else {
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
            Command::PromoteLater { node } => {
                self.promote.insert(node);
                Outcome::Applied {
                    config_version: self.config_version,
                }
            }
            Command::Cas { key, expect, value } => {
                let current = self.records.get(&key).map_or(0, |r| r.version);
                if current != expect {
                    return refused(
                        412,
                        format!("record {key} is at version {current}, not {expect}"),
                    );
                }
                match value {
                    Some(value) => {
                        let version = current + 1;
                        self.records.insert(key, Record { version, value });
                        Outcome::Record { version }
                    }
                    None => {
                        self.records.remove(&key);
                        Outcome::Record { version: 0 }
                    }
                }
            }
        }
    }

    fn set_pools(&mut self, pools: BTreeMap<String, schema::Pool>) -> Outcome {
        self.pools = pools;
        self.bump()
    }

    fn change_backend(
        &mut self,
        pool: &str,
        backend: &str,
        change: impl FnOnce(&mut schema::Backend),
    ) -> Outcome {
        let Some(p) = self.pools.get_mut(pool) else {
            return no_pool(pool);
        };
        let Some(b) = p
            .backends
            .value
            .iter_mut()
            .find(|b| b.name.value == backend)
        else {
            return no_backend(pool, backend);
        };
        change(b);
        self.bump()
    }

    fn bump(&mut self) -> Outcome {
        self.config_version += 1;
        Outcome::Applied {
            config_version: self.config_version,
        }
    }
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
        assert!(matches!(
            s.apply(Command::Init {
                uuid: Uuid::new_v4(),
                pools: BTreeMap::new()
            }),
            Outcome::Refused { status: 409, .. }
        ));
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
        assert!(matches!(
            s.apply(stale),
            Outcome::Refused { status: 412, .. }
        ));
        assert_eq!(s.pools.len(), 1);
        assert!(matches!(
            s.apply(Command::RemoveBackend {
                pool: "web".into(),
                backend: "zz".into()
            }),
            Outcome::Refused { status: 404, .. }
        ));
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
        assert_eq!(s.records["lease"].value, serde_json::json!(3));
        assert_eq!(s.config_version, 0, "records are not config");
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
}
