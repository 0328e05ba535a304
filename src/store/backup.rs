//! Backups of the store, like `etcdctl snapshot save | restore`.
//!
//! A backup file is one header line and a JSON body:
//!
//! ```text
//! raftlb-snapshot 1 bytes=1234 sha256=<hex of the body>
//! {"cluster_id": ..., "last_applied": ..., "membership": ..., "state": ...}
//! ```
//!
//! The header makes a truncated or corrupted file fail loudly before anything is
//! written. `restore` builds the data_dir of a member of a *new* cluster from one
//! file: every member restored from the same file with the same `--cluster-id` and
//! `--initial-cluster` gets the same membership, state and cluster UUID, so they form
//! one cluster without a bootstrap round.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::path::Path;

use openraft::Membership;
use openraft::vote::RaftLeaderIdExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::storage::{self, Applied};
use super::types::{LogId, Node as RaftNode, NodeId, Replicated, StoredMembership};
use crate::config::types::HostPort;
use crate::config::validate::{NAME_RULE, valid_name};

const MAGIC: &str = "raftlb-snapshot";
const FORMAT: u32 = 1;

/// What a backup holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Backup {
    pub cluster_id: String,
    /// The replica the backup was taken from.
    pub node_id: NodeId,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: Replicated,
}

impl Backup {
    pub fn new(cluster_id: &str, node_id: NodeId, applied: Applied) -> Backup {
        Backup {
            cluster_id: cluster_id.to_string(),
            node_id,
            last_applied: applied.last_applied,
            membership: applied.membership,
            state: applied.state,
        }
    }

    /// The file's bytes: header line, then the JSON body.
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        let body = serde_json::to_vec(self).map_err(io::Error::other)?;
        let mut out = format!(
            "{MAGIC} {FORMAT} bytes={} sha256={}\n",
            body.len(),
            hex(&Sha256::digest(&body))
        )
        .into_bytes();
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Checks the header, the length and the checksum, then reads the body.
    pub fn decode(bytes: &[u8]) -> Result<Backup, String> {
        Self::verify(bytes).map(|(backup, _)| backup)
    }

    /// [`Backup::decode`], also giving the body's hex SHA-256 (checked already).
    pub fn verify(bytes: &[u8]) -> Result<(Backup, String), String> {
        let (body, sum) = checked_body(bytes)?;
        let backup = serde_json::from_slice(body)
            .map_err(|e| format!("the body is not a raftlb backup: {e}"))?;
        Ok((backup, sum))
    }

    /// One line for people: what the backup holds.
    pub fn summary(&self) -> String {
        format!(
            "cluster_id {}, config_version {}, {} pools, index {}, {} members",
            self.cluster_id,
            self.state.config_version,
            self.state.pools.len(),
            self.last_applied.map_or(0, |l| l.index()),
            self.membership.membership().nodes().count()
        )
    }
}

/// The body of a backup file and its hex SHA-256, once the header's length and
/// checksum match it.
fn checked_body(bytes: &[u8]) -> Result<(&[u8], String), String> {
    let end = bytes
        .iter()
        .position(|b| *b == b'\n')
        .filter(|n| *n < 256)
        .ok_or("not a raftlb backup: no header line")?;
    let header = std::str::from_utf8(&bytes[..end])
        .map_err(|_| "not a raftlb backup: the header is not text")?;
    let body = &bytes[end + 1..];
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, format, length, sum] = fields.as_slice() else {
        return Err(format!("not a raftlb backup: header {header:?}"));
    };
    if *magic != MAGIC {
        return Err(format!("not a raftlb backup: header {header:?}"));
    }
    if *format != FORMAT.to_string() {
        return Err(format!(
            "backup format {format} is not supported (this build reads {FORMAT})"
        ));
    }
    let length: usize = length
        .strip_prefix("bytes=")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("not a raftlb backup: header {header:?}"))?;
    let sum = sum
        .strip_prefix("sha256=")
        .ok_or_else(|| format!("not a raftlb backup: header {header:?}"))?;
    if body.len() < length {
        return Err(format!(
            "truncated: the header says {length} bytes, the file holds {}",
            body.len()
        ));
    }
    if body.len() > length {
        return Err(format!(
            "corrupt: {} bytes after the {length} the header announces",
            body.len() - length
        ));
    }
    let actual = hex(&Sha256::digest(body));
    if actual != sum {
        return Err(format!(
            "corrupt: the body's sha256 is {actual}, the header says {sum}"
        ));
    }
    Ok((body, actual))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Why `raftlb snapshot save | restore` failed.
#[derive(Debug)]
pub enum BackupError {
    /// Bad arguments, or a file that is not a usable backup (exit 2).
    Input(String),
    /// The file system or the store failed (exit 1).
    Io(String),
}

impl From<String> for BackupError {
    fn from(message: String) -> Self {
        BackupError::Input(message)
    }
}

impl From<&str> for BackupError {
    fn from(message: &str) -> Self {
        BackupError::Input(message.to_string())
    }
}

impl std::fmt::Display for BackupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackupError::Input(m) | BackupError::Io(m) => f.write_str(m),
        }
    }
}

/// Reads the applied state of a stopped replica's data_dir.
pub fn save_offline(data_dir: &Path) -> Result<Backup, BackupError> {
    let file = data_dir.join(storage::FILE);
    if !file.exists() {
        return Err(BackupError::Input(format!(
            "{}: no store here (expected {})",
            data_dir.display(),
            file.display()
        )));
    }
    // Mostly a replica still running on it (redb's lock): a usage error.
    let db = storage::open(data_dir).map_err(|e| {
        BackupError::Input(format!(
            "{}: cannot open the store ({e}); is raftlb still running on it? \
             Use `raftlb ctl snapshot save` for a running replica",
            file.display()
        ))
    })?;
    let io = |e: io::Error| BackupError::Io(format!("{}: {e}", file.display()));
    let applied: Applied = storage::load_applied(&db)
        .map_err(io)?
        .ok_or_else(|| format!("{}: nothing was ever applied here", file.display()))?;
    let recorded: super::Recorded = storage::get_meta(&db, storage::IDENTITY)
        .map_err(io)?
        .ok_or_else(|| format!("{}: no cluster identity recorded", file.display()))?;
    Ok(Backup::new(&recorded.cluster_id, recorded.node_id, applied))
}

/// `--initial-cluster 1=ADDR,2=ADDR`.
pub fn parse_initial_cluster(text: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut members = BTreeMap::new();
    for item in text.split(',').filter(|s| !s.trim().is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("--initial-cluster: {item:?} is not ID=ADDRESS"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| format!("--initial-cluster: {id:?} is not a node id (1 or more)"))?;
        // The same rule as cluster.peers in the file.
        let addr = addr.trim();
        if let Err(e) = addr.parse::<HostPort>() {
            return Err(format!("--initial-cluster: node {id}: {e}"));
        }
        if members.insert(id, addr.to_string()).is_some() {
            return Err(format!("--initial-cluster: node {id} is listed twice"));
        }
    }
    if members.is_empty() {
        return Err("--initial-cluster: name at least one member, e.g. 1=10.0.0.1:7400".into());
    }
    Ok(members)
}

/// Writes a new data_dir for `node_id` of a new cluster `cluster_id` made of
/// `members`, holding the backup's replicated state. Deterministic: every member
/// restored from the same file and arguments gets the same membership, state and UUID.
pub fn restore(
    file_bytes: &[u8],
    data_dir: &Path,
    node_id: NodeId,
    cluster_id: &str,
    members: &BTreeMap<NodeId, String>,
) -> Result<Restored, BackupError> {
    let (backup, sum) = Backup::verify(file_bytes)?;
    // Pools a write would refuse now (a rule newer than the backup, or a file
    // edited by hand) are restored as they are, and named: refusing them would
    // leave a disaster without a way back.
    let warnings: Vec<String> = match crate::config::check_replicated((*backup.state.pools).clone())
    {
        Ok(_) => Vec::new(),
        Err(issues) => issues
            .iter()
            .map(|i| {
                format!(
                    "{}: {} (restored as it is; fix it with a write once the cluster runs)",
                    i.path, i.message
                )
            })
            .collect(),
    };
    if !members.contains_key(&node_id) {
        return Err(BackupError::Input(format!(
            "--node-id {node_id} is not in --initial-cluster ({:?})",
            members.keys().collect::<Vec<_>>()
        )));
    }
    if !valid_name(cluster_id) {
        return Err(BackupError::Input(format!(
            "--cluster-id {cluster_id:?} is not a valid id: {NAME_RULE}"
        )));
    }
    if data_dir.join(storage::FILE).exists() {
        return Err(BackupError::Input(format!(
            "{}: holds a store already; restore into an empty data_dir",
            data_dir.display()
        )));
    }
    // The UUID of the new cluster: the same for every member restored from this file
    // into this cluster, different from the old cluster's.
    let mut seed = Sha256::new();
    seed.update(sum.as_bytes());
    seed.update(cluster_id.as_bytes());
    for (id, addr) in members {
        seed.update(format!("{id}={addr},").as_bytes());
    }
    let digest = seed.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    let uuid = uuid::Builder::from_custom_bytes(bytes).into_uuid();

    // What a freshly initialised cluster has at index 0 (its membership), with the
    // backup's state already applied.
    let first = members.keys().next().copied().unwrap_or(node_id);
    let log_id = LogId::new(
        <openraft::alias::LeaderIdOf<super::types::TypeConfig>>::new_committed(0, first),
        0,
    );
    let voters: BTreeSet<NodeId> = members.keys().copied().collect();
    let nodes: BTreeMap<NodeId, RaftNode> = members
        .iter()
        .map(|(id, addr)| (*id, RaftNode { addr: addr.clone() }))
        .collect();
    let membership =
        Membership::new(vec![voters], nodes).map_err(|e| format!("--initial-cluster: {e}"))?;
    let mut state = backup.state.clone();
    state.cluster_uuid = Some(uuid);
    // The new cluster's members say "joined" themselves; the old cluster's records
    // and lease do not carry over.
    state.joined.clear();
    state.records.clear();
    state.lease = Default::default();
    let applied = Applied {
        last_applied: Some(log_id),
        membership: StoredMembership::new(Some(log_id), membership),
        state,
    };
    let identity = super::Recorded {
        cluster_id: cluster_id.to_string(),
        node_id,
        uuid: Some(uuid),
    };
    storage::restore(data_dir, &identity, &applied).map_err(|e| {
        BackupError::Io(format!(
            "{}: cannot write the store: {e}",
            data_dir.display()
        ))
    })?;
    Ok(Restored {
        backup,
        uuid,
        warnings,
    })
}

/// What [`restore`] did.
#[derive(Debug)]
pub struct Restored {
    pub backup: Backup,
    pub uuid: Uuid,
    /// What a write would refuse in the restored pools, one line each.
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup() -> Backup {
        let mut state = Replicated {
            config_version: 7,
            ..Default::default()
        };
        state.joined.insert(1);
        Backup {
            cluster_id: "old".into(),
            node_id: 1,
            last_applied: None,
            membership: StoredMembership::default(),
            state,
        }
    }

    #[test]
    fn pools_a_write_would_refuse_are_restored_and_named() {
        let mut bad = backup();
        let pool: crate::config::schema::Pool = serde_json::from_value(serde_json::json!(
            {"backends": [{"name": "a", "address": "127.0.0.1:1", "weight": 9999}]}
        ))
        .expect("a pool");
        bad.state.pools = std::sync::Arc::new(BTreeMap::from([("web".to_string(), pool)]));
        let bytes = bad.encode().expect("encode");
        let members = parse_initial_cluster("1=127.0.0.1:7401").expect("valid");
        let dir = tempfile::tempdir().expect("tempdir");
        let restored = restore(&bytes, dir.path(), 1, "new", &members).expect("restored");
        assert_eq!(restored.warnings.len(), 1, "{:?}", restored.warnings);
        assert!(
            restored.warnings[0].starts_with("pools.web.backends[0].weight: 9999 is out of range"),
            "{:?}",
            restored.warnings
        );
        assert!(dir.path().join(storage::FILE).exists());
    }

    #[test]
    fn round_trip_and_damage_refused() {
        let bytes = backup().encode().expect("encode");
        let back = Backup::decode(&bytes).expect("decode");
        assert_eq!(back.state.config_version, 7);

        let truncated = &bytes[..bytes.len() - 3];
        let e = Backup::decode(truncated).expect_err("truncated");
        assert!(e.contains("truncated"), "{e}");

        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        let e = Backup::decode(&flipped).expect_err("corrupt");
        assert!(e.contains("corrupt"), "{e}");

        let mut longer = bytes.clone();
        longer.extend_from_slice(b"x");
        assert!(Backup::decode(&longer).is_err());
        assert!(Backup::decode(b"hello\n{}").is_err());
        assert!(Backup::decode(b"").is_err());
    }

    #[test]
    fn initial_cluster_parsing() {
        let m = parse_initial_cluster("1=127.0.0.1:7401,2=127.0.0.1:7402").expect("valid");
        assert_eq!(m.len(), 2);
        assert!(parse_initial_cluster("1=a:1,1=b:2").is_err());
        assert!(parse_initial_cluster("x=a:1").is_err());
        assert!(parse_initial_cluster("1").is_err());
        assert!(parse_initial_cluster("").is_err());
        // The file's rules for peers: ids from 1, addresses that parse, no port 0.
        for bad in [
            "0=127.0.0.1:7401",
            "1=host:notaport",
            "1=a b:99",
            "1=127.0.0.1:0",
            "1=no-port",
        ] {
            assert!(parse_initial_cluster(bad).is_err(), "{bad} was accepted");
        }
        let m = parse_initial_cluster("1=lb-1.example:7400, 2=[::1]:7400").expect("names");
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn restore_is_deterministic_and_refuses_a_used_data_dir() {
        let bytes = backup().encode().expect("encode");
        let members = parse_initial_cluster("1=127.0.0.1:7401,2=127.0.0.1:7402").expect("valid");
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let ra = restore(&bytes, a.path(), 1, "new", &members).expect("restore 1");
        let rb = restore(&bytes, b.path(), 2, "new", &members).expect("restore 2");
        assert_eq!(ra.uuid, rb.uuid);
        let sa = save_offline(a.path()).expect("read back 1");
        let sb = save_offline(b.path()).expect("read back 2");
        assert_eq!(
            serde_json::to_value(&sa.state).ok(),
            serde_json::to_value(&sb.state).ok()
        );
        assert_eq!(sa.membership, sb.membership);
        assert_eq!(sa.cluster_id, "new");
        assert!(sa.state.joined.is_empty());
        assert_eq!(sa.state.config_version, 7);

        let fresh = tempfile::tempdir().expect("tempdir");
        let e = restore(&bytes, fresh.path(), 1, "bad id", &members).expect_err("id");
        assert!(e.to_string().contains("--cluster-id"), "{e}");
        assert!(!fresh.path().join(storage::FILE).exists());

        let e = restore(&bytes, a.path(), 1, "new", &members).expect_err("used");
        assert!(e.to_string().contains("holds a store already"), "{e}");
        let c = tempfile::tempdir().expect("tempdir");
        assert!(restore(&bytes, c.path(), 3, "new", &members).is_err());
        assert!(!c.path().join(storage::FILE).exists());
    }
}
