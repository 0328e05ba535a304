//! Raft log, vote and state machine in one redb file under `data_dir` (openraft's
//! storage v2 traits). The state machine is persisted after every applied batch, so a
//! restarted replica serves its last applied config before it reaches a quorum. The
//! pools are stored under a key of their own and written only when they change: the
//! lease is renewed every retry_period, the pools change when an operator changes them.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use futures_util::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine,
};
use openraft::{EntryPayload, OptionalSend};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::types::{
    Entry, LogId, Replicated, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};
use crate::config::schema;
use crate::metrics as m;

type Pools = Arc<BTreeMap<String, schema::Pool>>;

/// Log entries by index.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Everything else, JSON by key.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const APPLIED: &str = "applied";
/// The applied pools, apart from the rest of the applied state.
const POOLS: &str = "pools";
const SNAPSHOT: &str = "snapshot";
pub const IDENTITY: &str = "identity";
pub const REMOVED: &str = "removed";
/// Set by `raftlb snapshot restore`, cleared once the replica has said "joined":
/// until then it asks its peers whether it joined before (a second restore).
pub const RESTORED: &str = "restored";
/// Written to check that a rebuilt store takes writes.
pub const PROBE: &str = "probe";

/// The file under `data_dir`.
pub const FILE: &str = "raftlb.redb";

/// Opens (or creates) the store file.
pub fn open(data_dir: &Path) -> io::Result<Arc<Database>> {
    std::fs::create_dir_all(data_dir)?;
    let db = Database::create(data_dir.join(FILE)).map_err(io::Error::other)?;
    // Create the tables, so reads never meet a missing one.
    let tx = db.begin_write().map_err(io::Error::other)?;
    tx.open_table(LOG).map_err(io::Error::other)?;
    tx.open_table(META).map_err(io::Error::other)?;
    tx.commit().map_err(io::Error::other)?;
    Ok(Arc::new(db))
}

pub fn get_meta<T: DeserializeOwned>(db: &Database, key: &str) -> io::Result<Option<T>> {
    read_meta(&db.begin_read().map_err(io::Error::other)?, key)
}

/// One meta key as of the read transaction `tx`.
fn read_meta<T: DeserializeOwned>(tx: &redb::ReadTransaction, key: &str) -> io::Result<Option<T>> {
    let table = tx.open_table(META).map_err(io::Error::other)?;
    let Some(bytes) = table.get(key).map_err(io::Error::other)? else {
        return Ok(None);
    };
    serde_json::from_slice(bytes.value())
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{key}: {e}")))
}

/// The applied state stored in `db`: the record under APPLIED with its pools from
/// POOLS (a store written before the pools had a key of their own keeps them in
/// the record).
pub fn load_applied(db: &Database) -> io::Result<Option<Applied>> {
    let tx = db.begin_read().map_err(io::Error::other)?;
    let Some(mut applied) = read_meta::<Applied>(&tx, APPLIED)? else {
        return Ok(None);
    };
    if let Some(pools) = read_meta::<BTreeMap<String, schema::Pool>>(&tx, POOLS)? {
        applied.state.pools = Arc::new(pools);
    }
    Ok(Some(applied))
}

/// Writes `applied` into `meta`, its pools only when they are not `written`
/// already (the same `Arc`: pools are replaced, never changed in place).
fn insert_applied(
    meta: &mut redb::Table<&str, &[u8]>,
    applied: &Applied,
    written: Option<&Pools>,
) -> io::Result<()> {
    let pools = &applied.state.pools;
    if !written.is_some_and(|w| Arc::ptr_eq(w, pools)) {
        meta.insert(POOLS, json(pools.as_ref())?.as_slice())
            .map_err(io::Error::other)?;
    }
    let mut head = applied.clone();
    head.state.pools = Arc::default();
    meta.insert(APPLIED, json(&head)?.as_slice())
        .map_err(io::Error::other)?;
    Ok(())
}

/// Writes one meta key, durably.
pub fn put_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> io::Result<()> {
    put_meta_bytes(db, key, &json(value)?)
}

fn put_meta_bytes(db: &Database, key: &str, bytes: &[u8]) -> io::Result<()> {
    let tx = db.begin_write().map_err(io::Error::other)?;
    {
        let mut table = tx.open_table(META).map_err(io::Error::other)?;
        table.insert(key, bytes).map_err(io::Error::other)?;
    }
    tx.commit().map_err(io::Error::other)
}

/// [`put_meta`] on tokio's blocking pool: a durable commit (an fsync) never stalls
/// a runtime worker thread, which the proxy shares (a Raft election saves a vote).
pub async fn put_meta_blocking<T: Serialize>(
    db: &Arc<Database>,
    key: &'static str,
    value: &T,
) -> io::Result<()> {
    let bytes = json(value)?;
    let db = db.clone();
    tokio::task::spawn_blocking(move || put_meta_bytes(&db, key, &bytes))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("the store task failed: {e}"))))
}

/// Publishes `applied` unless the watch holds a later state already: a store
/// reopened in-process replays from an older applied state, and the proxy must
/// never go back to it.
fn publish_newer(publish: &watch::Sender<Arc<Applied>>, applied: Arc<Applied>) {
    publish.send_if_modified(|current| {
        let newer = applied.last_applied >= current.last_applied;
        if newer {
            *current = applied;
        }
        newer
    });
}

/// Writes a new store holding `applied` as its snapshot and applied state, with
/// the log purged up to it: what `raftlb snapshot restore` leaves in a data_dir.
pub fn restore<I: Serialize>(data_dir: &Path, identity: &I, applied: &Applied) -> io::Result<()> {
    let db = open(data_dir)?;
    let snapshot = StoredSnapshot {
        meta: SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
        },
        data: serde_json::to_vec(&applied.state).map_err(io::Error::other)?,
    };
    let values = [
        (IDENTITY, serde_json::to_vec(identity)),
        (SNAPSHOT, serde_json::to_vec(&snapshot)),
        (PURGED, serde_json::to_vec(&applied.last_applied)),
        (RESTORED, serde_json::to_vec(&true)),
    ];
    let tx = db.begin_write().map_err(io::Error::other)?;
    {
        let mut table = tx.open_table(META).map_err(io::Error::other)?;
        for (key, value) in values {
            let value = value.map_err(io::Error::other)?;
            table
                .insert(key, value.as_slice())
                .map_err(io::Error::other)?;
        }
        insert_applied(&mut table, applied, None)?;
    }
    tx.commit().map_err(io::Error::other)
}

pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// True when the log holds no entry and no vote was ever saved: a pristine data_dir.
pub fn is_empty(db: &Database) -> io::Result<bool> {
    let tx = db.begin_read().map_err(io::Error::other)?;
    let log = tx.open_table(LOG).map_err(io::Error::other)?;
    let meta = tx.open_table(META).map_err(io::Error::other)?;
    Ok(log.first().map_err(io::Error::other)?.is_none()
        && meta.get(VOTE).map_err(io::Error::other)?.is_none()
        && meta.get(APPLIED).map_err(io::Error::other)?.is_none())
}

type Done = tokio::sync::oneshot::Sender<io::Result<()>>;

/// What the flusher is asked to write, in the order it was asked.
enum Flush {
    /// Appended log entries (readable from the pending view meanwhile): openraft is
    /// told once they are on disk.
    Append(Vec<Entry>, IOFlushed<TypeConfig>),
    /// Deletes the log from this index on (a follower's conflicting suffix).
    Truncate(u64, Done),
    /// Deletes the log up to this id (it is in a snapshot now).
    Purge(LogId, Done),
    /// An applied state, written and made durable soon; told when, if anyone waits.
    Applied(Arc<Applied>, Option<Done>),
}

/// Group commit, write-behind: every change to the store that is on a write's path
/// (log appends, truncation and purge, the applied state, the committed log id) is
/// written by the flusher, many at a time, in one durable (fsynced) redb transaction.
/// Appended entries are readable at once from an in-memory pending view until that
/// transaction has them. openraft counts an entry towards the quorum only once its
/// callback ran, so the leader's fsync overlaps the followers' instead of preceding
/// it. Truncate and purge wait for their transaction, so the log in redb and the
/// pending view never disagree about an index, and changes land in the order made:
/// an applied state is never on disk without the log entries it came from.
///
/// The flusher is a task that gathers a batch and runs its transaction on tokio's
/// blocking pool: while that runs, a paused test clock does not jump ahead, so
/// simulated time still sees a disk write as taking no time.
#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::UnboundedSender<Flush>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Appended entries no transaction has written yet, by index: always a suffix
    /// of the log after the last entry in redb.
    pending: Mutex<BTreeMap<u64, Entry>>,
    /// The last committed log id openraft reported (`None` until it reports one),
    /// written with every durable commit: no write transaction of its own.
    committed: Mutex<Option<Option<LogId>>>,
}

/// How long an applied state may wait for a log append to share its fsync.
const APPLIED_FLUSH_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing leaves these maps half-changed, so a panicked holder left them usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Flusher {
    /// Starts the flusher task of `db`; it ends when the last `Flusher` is dropped.
    pub fn start(db: Arc<Database>) -> Flusher {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::<Shared>::default();
        tokio::spawn(flush_batches(db, rx, Arc::clone(&shared)));
        Flusher { tx, shared }
    }

    /// The committed log id last reported, if one was reported since the start.
    fn committed(&self) -> Option<Option<LogId>> {
        *lock(&self.shared.committed)
    }

    fn set_committed(&self, committed: Option<LogId>) {
        *lock(&self.shared.committed) = Some(committed);
    }

    /// Writes `applied` and returns once it (and everything before it) is on disk.
    pub async fn durably(&self, applied: Arc<Applied>) -> io::Result<()> {
        self.wait(|done| Flush::Applied(applied, Some(done))).await
    }

    /// Sends a change and waits until the transaction that made it is on disk.
    async fn wait(&self, flush: impl FnOnce(Done) -> Flush) -> io::Result<()> {
        let (done, durable) = tokio::sync::oneshot::channel();
        self.send(flush(done))?;
        durable
            .await
            .map_err(|_| io::Error::other("the flusher stopped"))?
    }

    fn send(&self, flush: Flush) -> io::Result<()> {
        self.tx
            .send(flush)
            .map_err(|_| io::Error::other("the flusher stopped"))
    }
}

/// A change as the write transaction makes it.
enum Change {
    Entries(Vec<Entry>),
    Truncate(u64),
    Purge(LogId),
}

async fn flush_batches(
    db: Arc<Database>,
    mut rx: mpsc::UnboundedReceiver<Flush>,
    shared: Arc<Shared>,
) {
    // The pools the store holds: a batch writes them only when they changed.
    let mut pools_written: Option<Pools> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        if matches!(batch[0], Flush::Applied(_, None)) {
            // Nobody waits: give the next append a moment to share the fsync.
            if let Ok(Some(more)) = tokio::time::timeout(APPLIED_FLUSH_DELAY, rx.recv()).await {
                batch.push(more);
            }
        }
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut changes = Vec::new();
        let mut applied = None;
        let mut written = Vec::new();
        let mut waiting = Vec::new();
        let mut callbacks = Vec::new();
        for flush in batch {
            match flush {
                Flush::Append(entries, callback) => {
                    written.extend(entries.iter().map(|e| e.index()));
                    changes.push(Change::Entries(entries));
                    callbacks.push(callback);
                }
                Flush::Truncate(from, done) => {
                    changes.push(Change::Truncate(from));
                    waiting.push(done);
                }
                Flush::Purge(upto, done) => {
                    changes.push(Change::Purge(upto));
                    waiting.push(done);
                }
                Flush::Applied(a, done) => {
                    applied = Some(a);
                    waiting.extend(done);
                }
            }
        }
        let committed = *lock(&shared.committed);
        let db = db.clone();
        let pools = applied.as_ref().map(|a| a.state.pools.clone());
        let known = pools_written.take();
        let on_disk = known.clone();
        let result = tokio::task::spawn_blocking(move || {
            durable_commit(
                &db,
                &changes,
                applied.as_deref(),
                on_disk.as_ref(),
                committed,
            )
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("the fsync task failed: {e}"))));
        match &result {
            Ok(()) => {
                pools_written = pools.or(known);
                let mut pending = lock(&shared.pending);
                for index in written {
                    pending.remove(&index);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot make the Raft store durable"),
        }
        let outcome = || {
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| io::Error::new(e.kind(), e.to_string()))
        };
        for callback in callbacks {
            callback.io_completed(outcome());
        }
        for done in waiting {
            let _ = done.send(outcome());
        }
    }
}

fn json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

/// One durable (fsynced) transaction making `changes` in order, with the latest
/// applied state and committed log id if there are. Every batch changes
/// something (each message is a change), so redb always writes a new root.
fn durable_commit(
    db: &Database,
    changes: &[Change],
    applied: Option<&Applied>,
    pools_written: Option<&Pools>,
    committed: Option<Option<LogId>>,
) -> io::Result<()> {
    let tx = db.begin_write().map_err(io::Error::other)?;
    {
        let mut log = tx.open_table(LOG).map_err(io::Error::other)?;
        let mut meta = tx.open_table(META).map_err(io::Error::other)?;
        for change in changes {
            match change {
                Change::Entries(entries) => {
                    for entry in entries {
                        log.insert(entry.index(), json(entry)?.as_slice())
                            .map_err(io::Error::other)?;
                    }
                }
                Change::Truncate(from) => {
                    log.retain_in(*from.., |_, _| false)
                        .map_err(io::Error::other)?;
                }
                Change::Purge(upto) => {
                    meta.insert(PURGED, json(upto)?.as_slice())
                        .map_err(io::Error::other)?;
                    log.retain_in(..=upto.index(), |_, _| false)
                        .map_err(io::Error::other)?;
                }
            }
        }
        if let Some(applied) = applied {
            insert_applied(&mut meta, applied, pools_written)?;
        }
        if let Some(committed) = committed {
            meta.insert(COMMITTED, json(&committed)?.as_slice())
                .map_err(io::Error::other)?;
        }
    }
    tx.commit().map_err(io::Error::other)
}

/// The log store and state machine of one store file, sharing one flusher; the
/// state machine publishes every applied state on `publish`.
pub fn raft_storage(
    db: Arc<Database>,
    publish: watch::Sender<Arc<Applied>>,
) -> io::Result<(LogStore, StateMachine)> {
    let flusher = Flusher::start(db.clone());
    let sm = StateMachine::publishing_to(db.clone(), flusher.clone(), publish)?;
    Ok((LogStore::new(db, flusher), sm))
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    flusher: Flusher,
}

impl LogStore {
    fn new(db: Arc<Database>, flusher: Flusher) -> Self {
        LogStore { db, flusher }
    }

    /// The flusher this store hands its writes to.
    pub fn flusher(&self) -> Flusher {
        self.flusher.clone()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let (mut entries, tx) = self.view(|pending| {
            pending
                .range(range.clone())
                .map(|(i, e)| (*i, e.clone()))
                .collect::<BTreeMap<u64, Entry>>()
        })?;
        let table = tx.open_table(LOG).map_err(io::Error::other)?;
        for item in table.range(start..).map_err(io::Error::other)? {
            let (index, bytes) = item.map_err(io::Error::other)?;
            let index = index.value();
            if !range.contains(&index) {
                break;
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = entries.entry(index) {
                slot.insert(decode(bytes.value())?);
            }
        }
        Ok(entries.into_values().collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        get_meta(&self.db, VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let (pending_last, tx) =
            self.view(|pending| pending.values().last().map(|e| e.log_id()))?;
        let last_purged: Option<LogId> = read_meta(&tx, PURGED)?;
        let table = tx.open_table(LOG).map_err(io::Error::other)?;
        let last = match (pending_last, table.last().map_err(io::Error::other)?) {
            (Some(last), _) => Some(last),
            (None, Some((_, bytes))) => Some(decode::<Entry>(bytes.value())?.log_id()),
            (None, None) => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        put_meta_blocking(&self.db, VOTE, vote).await
    }

    /// Rides on the flusher's next durable commit. A durable redb commit persists
    /// the appends before it, so a committed id is never on disk ahead of the log
    /// entries this replica appended before it was reported.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.flusher.set_committed(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        match self.flusher.committed() {
            Some(committed) => Ok(committed),
            None => Ok(get_meta::<Option<LogId>>(&self.db, COMMITTED)?.flatten()),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Readable as soon as append returns; the flusher writes them, makes them
        // durable and then calls back.
        let entries: Vec<Entry> = entries.into_iter().collect();
        lock(&self.flusher.shared.pending).extend(entries.iter().map(|e| (e.index(), e.clone())));
        self.flusher.send(Flush::Append(entries, callback))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        lock(&self.flusher.shared.pending).retain(|i, _| *i < from);
        self.flusher.wait(|done| Flush::Truncate(from, done)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        lock(&self.flusher.shared.pending).retain(|i, _| *i > log_id.index());
        self.flusher.wait(|done| Flush::Purge(log_id, done)).await
    }
}

impl LogStore {
    /// The pending entries `f` picks and a read transaction, taken together: the
    /// flusher drops entries from the pending view only after its transaction
    /// committed, so between them they hold every appended entry.
    fn view<T>(
        &self,
        f: impl FnOnce(&BTreeMap<u64, Entry>) -> T,
    ) -> io::Result<(T, redb::ReadTransaction)> {
        let pending = lock(&self.flusher.shared.pending);
        let picked = f(&pending);
        let tx = self.db.begin_read().map_err(io::Error::other)?;
        drop(pending);
        Ok((picked, tx))
    }
}

/// What the state machine has applied: persisted after every batch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: Replicated,
}

/// A snapshot as stored: its meta and the serialized [`Replicated`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// This replica's Raft node, over the state machine below.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// The replicated state; every change is published on a watch channel for the proxy.
pub struct StateMachine {
    db: Arc<Database>,
    flusher: Flusher,
    applied: Applied,
    publish: watch::Sender<Arc<Applied>>,
}

impl StateMachine {
    /// Loads the last applied state from the store and publishes it on `publish`
    /// (a store rebuilt in-process keeps its followers).
    fn publishing_to(
        db: Arc<Database>,
        flusher: Flusher,
        publish: watch::Sender<Arc<Applied>>,
    ) -> io::Result<Self> {
        let applied = load_applied(&db)?.unwrap_or_default();
        publish_newer(&publish, Arc::new(applied.clone()));
        Ok(StateMachine {
            db,
            flusher,
            applied,
            publish,
        })
    }

    /// Every applied state, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Applied>> {
        self.publish.subscribe()
    }

    /// Handed to the flusher with every applied batch, durable within milliseconds,
    /// so a restarted replica serves what it applied last (and replays the rest
    /// from its log). The entries it came from are durable on a quorum before anyone
    /// hears of the outcome.
    fn persist(&self) -> io::Result<()> {
        let applied = Arc::new(self.applied.clone());
        self.flusher.send(Flush::Applied(applied.clone(), None))?;
        publish_newer(&self.publish, applied);
        Ok(())
    }

    /// The same, waiting until it is on disk (an installed snapshot replaces the log).
    async fn persist_durably(&self) -> io::Result<()> {
        let applied = Arc::new(self.applied.clone());
        self.flusher.durably(applied.clone()).await?;
        publish_newer(&self.publish, applied);
        Ok(())
    }
}

/// Builds a snapshot of the state at one point.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    applied: Applied,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let data = serde_json::to_vec(&self.applied.state).map_err(io::Error::other)?;
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.membership.clone(),
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        put_meta_blocking(&self.db, SNAPSHOT, &stored).await?;
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let started = Instant::now();
        let mut responders = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            self.applied.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Normal(command) => {
                    tracing::debug!(index = entry.log_id.index(), %command, "apply");
                    Some(self.applied.state.apply(command))
                }
                EntryPayload::Membership(membership) => {
                    self.applied.state.membership_changed(
                        &membership.voter_ids().collect(),
                        &membership.learner_ids().collect(),
                    );
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    None
                }
            };
            if let Some(responder) = responder {
                responders.push((responder, outcome));
            }
        }
        // Persisted before anyone hears of the outcome.
        self.persist()?;
        for (responder, outcome) in responders {
            responder.send(outcome.unwrap_or(super::types::Outcome::Applied {
                config_version: self.applied.state.config_version,
            }));
        }
        metrics::histogram!(m::RAFT_APPLY_DURATION).record(started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            applied: self.applied.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let state: Replicated = decode(&data)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        put_meta_blocking(&self.db, SNAPSHOT, &stored).await?;
        self.applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state,
        };
        self.persist_durably().await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let stored: Option<StoredSnapshot> = get_meta(&self.db, SNAPSHOT)?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Cursor::new(s.data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};

    struct RedbBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RedbBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
            let fail = |e: io::Error| {
                StorageError::from_io_error(
                    openraft::ErrorSubject::Store,
                    openraft::ErrorVerb::Read,
                    e,
                )
            };
            let dir = tempfile::tempdir().map_err(fail)?;
            let db = open(dir.path()).map_err(fail)?;
            let (log, sm) = raft_storage(db, watch::channel(Arc::default()).0).map_err(fail)?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage test suite, against the redb store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(RedbBuilder).await.expect("storage suite");
    }
}

#[cfg(test)]
mod publish_tests {
    use super::*;

    fn at(index: u64) -> Arc<Applied> {
        use openraft::vote::RaftLeaderIdExt as _;
        let mut applied = Applied {
            last_applied: Some(LogId::new(
                <openraft::alias::LeaderIdOf<TypeConfig>>::new_committed(1, 1),
                index,
            )),
            ..Applied::default()
        };
        applied.state.config_version = index;
        Arc::new(applied)
    }

    #[test]
    fn the_applied_watch_never_goes_back_to_an_older_state() {
        let (publish, watch) = watch::channel(Arc::<Applied>::default());
        publish_newer(&publish, at(5));
        assert_eq!(watch.borrow().state.config_version, 5);
        // A store reopened in-process replays from what was on disk: older.
        publish_newer(&publish, at(3));
        assert_eq!(watch.borrow().state.config_version, 5);
        publish_newer(&publish, at(6));
        assert_eq!(watch.borrow().state.config_version, 6);
    }
}

#[cfg(test)]
mod pools_tests {
    use super::*;

    fn pools(address: &str) -> Pools {
        let pool: schema::Pool = serde_json::from_value(
            serde_json::json!({ "backends": [{ "name": "b", "address": address }] }),
        )
        .expect("pool");
        Arc::new(BTreeMap::from([("api".to_string(), pool)]))
    }

    fn address(applied: &Applied) -> String {
        serde_json::to_value(applied.state.pools.as_ref()).expect("json")["api"]["backends"][0]
            ["address"]
            .to_string()
    }

    fn raw(db: &Database, key: &str) -> Option<Vec<u8>> {
        let tx = db.begin_read().expect("read");
        let table = tx.open_table(META).expect("meta");
        table.get(key).expect("get").map(|v| v.value().to_vec())
    }

    fn overwrite(db: &Database, key: &str, bytes: &[u8]) {
        put_meta_bytes(db, key, bytes).expect("write");
    }

    /// Makes `applied` durable through the flusher and reads back what is stored.
    async fn flush_and_load(flusher: &Flusher, db: &Database, applied: &Applied) -> Applied {
        flusher
            .durably(Arc::new(applied.clone()))
            .await
            .expect("flush");
        load_applied(db).expect("load").expect("applied")
    }

    #[tokio::test]
    async fn the_pools_are_written_only_when_they_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open(dir.path()).expect("open");
        let flusher = Flusher::start(db.clone());
        let mut applied = Applied::default();
        applied.state.pools = pools("127.0.0.1:1");
        let loaded = flush_and_load(&flusher, &db, &applied).await;
        assert_eq!(address(&loaded), "\"127.0.0.1:1\"");
        let record = raw(&db, APPLIED).expect("applied record");
        assert!(
            !String::from_utf8_lossy(&record).contains("127.0.0.1:1"),
            "the record carries no pools"
        );

        // A renew-like batch: the same pools, a new lease. The stored pools are not
        // rewritten (the marker stays).
        overwrite(&db, POOLS, b"{}");
        applied.state.lease.version += 1;
        let loaded = flush_and_load(&flusher, &db, &applied).await;
        assert_eq!(raw(&db, POOLS).as_deref(), Some(&b"{}"[..]));
        assert_eq!(loaded.state.lease.version, 1);

        // Changed pools are written with the batch that changed them.
        applied.state.pools = pools("127.0.0.1:2");
        let loaded = flush_and_load(&flusher, &db, &applied).await;
        assert_eq!(address(&loaded), "\"127.0.0.1:2\"");
    }

    #[test]
    fn a_store_written_before_the_pools_had_their_own_key_keeps_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open(dir.path()).expect("open");
        let mut applied = Applied::default();
        applied.state.pools = pools("127.0.0.1:3");
        overwrite(&db, APPLIED, &json(&applied).expect("json"));
        assert_eq!(
            address(&load_applied(&db).expect("load").expect("applied")),
            "\"127.0.0.1:3\""
        );
    }
}
