//! The peer channel: length-prefixed JSON frames over TCP (mutual TLS optional).
//!
//! Every frame is a 4-byte big-endian length and an [`Envelope`] naming the cluster
//! (cluster_id and UUID) and the sender, requests and replies alike. A frame from
//! another cluster is refused, and so is a request that claims this replica's own
//! node_id and a reply from a node other than the one dialled (one process answering
//! for two ids would count twice towards a quorum); a frame over [`MAX_FRAME`] or
//! one that does not parse closes the connection. One request at a time per
//! connection: openraft keeps one client per peer and stream.
//!
//! Before it knows who is talking, the port spends little on a connection: a frame's
//! memory grows as its bytes arrive (not from the announced length), a new connection
//! must deliver an accepted frame (one that parses and passes the identity checks)
//! within [`FIRST_FRAME`] of accept, and at most [`PENDING_PER_SOURCE`] connections per
//! source address may be waiting for theirs (the oldest is closed first). A connection
//! that has delivered an accepted frame, such as a kept-open connection between
//! replicas, is not cut by these rules.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::types::{
    Command, LogId, Node, NodeId, Outcome, Snapshot, SnapshotMeta, TypeConfig, Vote,
};
use crate::config::schema::{BackendTls, PeerTls, Terminate};
use crate::metrics as m;

/// Largest frame accepted either way: a whole snapshot of the config fits many times.
pub const MAX_FRAME: usize = 16 << 20;

/// How long an accepted connection may take to send a frame before it is closed.
const IDLE: Duration = Duration::from_secs(300);

/// How long a new connection may take to deliver its first accepted frame (TLS
/// handshake included), counted from accept.
pub const FIRST_FRAME: Duration = Duration::from_secs(10);

/// How many connections from one source address may be waiting to deliver their
/// first accepted frame; a new one beyond this closes the oldest.
pub const PENDING_PER_SOURCE: usize = 64;

/// What a frame's buffer starts at; it grows as the bytes arrive.
const FIRST_CHUNK: usize = 4 << 10;

/// A misconfiguration seen on every heartbeat is logged once per this long.
const LOG_AGAIN_AFTER: Duration = Duration::from_secs(10);

/// The peer protocol this build speaks. 1: the commands up to leader election;
/// 2: adds `ClusterVersion` and `NodeInfo`. A command is proposed only once the
/// cluster's version (every voter announced at least that much, etcd's cluster
/// version) covers it, so a replica not yet upgraded never meets one it cannot decode.
pub const PROTOCOL: u32 = 2;

/// Set only by tests: the protocol this replica announces (an older build).
const TEST_PROTOCOL_ENV: &str = "RAFTLB_TEST_PROTOCOL";

/// The protocol this replica announces: [`PROTOCOL`], or the older one a
/// mixed-version test holds it at.
pub fn protocol() -> u32 {
    static ANNOUNCED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ANNOUNCED.get_or_init(|| {
        std::env::var(TEST_PROTOCOL_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|v| (1..=PROTOCOL).contains(v))
            .unwrap_or(PROTOCOL)
    })
}

/// Frames from builds before the protocol was announced.
fn first_protocol() -> u32 {
    1
}

/// Who is talking: sent with every frame, request or reply, and checked on receipt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub cluster_id: String,
    /// None until the cluster's first leader has committed it.
    pub uuid: Option<Uuid>,
    pub from: NodeId,
    /// The node a request is meant for (absent from replies and from older builds):
    /// a replica refuses a request for another node, such as one sent to a removed
    /// member's address where a new member now listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<NodeId>,
    /// The sender's [`protocol`].
    #[serde(default = "first_protocol")]
    pub protocol: u32,
    pub body: T,
}

/// This replica's identity on the peer channel.
pub struct Identity {
    pub cluster_id: String,
    pub node_id: NodeId,
    uuid: RwLock<Option<Uuid>>,
    /// The protocol each peer announced in its last accepted frame.
    heard: Mutex<std::collections::BTreeMap<NodeId, u32>>,
}

impl Identity {
    pub fn new(cluster_id: String, node_id: NodeId, uuid: Option<Uuid>) -> Self {
        Identity {
            cluster_id,
            node_id,
            uuid: RwLock::new(uuid),
            heard: Mutex::default(),
        }
    }

    /// The protocol each peer announced last (this replica's own included).
    pub fn protocols(&self) -> std::collections::BTreeMap<NodeId, u32> {
        let mut heard = self
            .heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        heard.insert(self.node_id, protocol());
        heard
    }

    /// Records the protocol of an accepted frame's sender.
    fn heard<T>(&self, e: &Envelope<T>) {
        self.heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(e.from, e.protocol);
    }

    pub fn uuid(&self) -> Option<Uuid> {
        self.uuid.read().ok().and_then(|u| *u)
    }

    pub fn set_uuid(&self, uuid: Uuid) {
        if let Ok(mut u) = self.uuid.write() {
            *u = Some(uuid);
        }
    }

    fn wrap<T>(&self, body: T, to: Option<NodeId>) -> Envelope<T> {
        Envelope {
            cluster_id: self.cluster_id.clone(),
            uuid: self.uuid(),
            from: self.node_id,
            to,
            protocol: protocol(),
            body,
        }
    }

    /// Why a frame from `e` is refused, if it is.
    pub fn refuse<T>(&self, e: &Envelope<T>) -> Option<String> {
        if e.cluster_id != self.cluster_id {
            return Some(format!(
                "node {} belongs to cluster_id {:?}, this is {:?}",
                e.from, e.cluster_id, self.cluster_id
            ));
        }
        match (e.uuid, self.uuid()) {
            (Some(theirs), Some(ours)) if theirs != ours => Some(format!(
                "node {} belongs to another cluster named {:?} (UUID {theirs}, this is {ours}): \
                 a data_dir from an older cluster?",
                e.from, e.cluster_id
            )),
            _ => None,
        }
    }

    /// Why a request `e` is refused for who it claims to be from (this replica
    /// itself) or to (another node).
    fn refuse_addressing<T>(&self, e: &Envelope<T>) -> Option<String> {
        if e.from == self.node_id {
            return Some(format!(
                "a request claims to come from node {id}, this replica's own node_id: \
                 two replicas share node_id {id}, or a peers entry points at this replica",
                id = e.from
            ));
        }
        match e.to {
            Some(to) if to != self.node_id => Some(format!(
                "node {from} sent a request for node {to} to this replica, node {me}: its \
                 membership has node {to} at this address (a replica replaced at the same \
                 address, or peers entries swapped)",
                from = e.from,
                me = self.node_id
            )),
            _ => None,
        }
    }
}

/// A peer's answer to "hello" during bootstrap and identity checks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelloReply {
    /// Nothing in its log and no vote: it can take part in a bootstrap.
    pub empty: bool,
    /// Its `peers`, to check that every replica bootstraps with the same membership.
    pub peers: Vec<(NodeId, String)>,
    /// The nodes that committed "joined".
    pub joined: Vec<NodeId>,
    /// The voters of its membership (absent from an older peer): a replica that
    /// starts empty under an id both joined and a voter lost its data_dir.
    #[serde(default)]
    pub voters: Option<Vec<NodeId>>,
    /// Its election settings, compared at start (a warning when they differ).
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// Its leader-election settings (absent from an older peer), compared at start
    /// and after a reload that changes them.
    #[serde(default)]
    pub lease: Option<LeaseSettings>,
}

/// A replica's `leader_election` settings as the peers compare them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSettings {
    pub enabled: bool,
    pub lease_duration_ms: u64,
    pub renew_deadline_ms: u64,
    pub retry_period_ms: u64,
    /// `standby: serve` (absent from an older peer).
    #[serde(default)]
    pub standby_serves: Option<bool>,
}

impl LeaseSettings {
    /// The lease's timing, compared between replicas.
    pub fn timing(&self) -> (u64, u64, u64) {
        (
            self.lease_duration_ms,
            self.renew_deadline_ms,
            self.retry_period_ms,
        )
    }
}

/// Membership changes, forwarded to the leader like writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Manage {
    AddMember {
        id: NodeId,
        address: String,
        learner: bool,
    },
    Promote {
        id: NodeId,
    },
    Remove {
        id: NodeId,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Request {
    Hello,
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        data: Vec<u8>,
    },
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// A client write forwarded by a follower to the leader, with how long the
    /// leader may wait for its commit.
    Write {
        command: Command,
        deadline_ms: u64,
    },
    /// "Give the lease to `to` (any standby: `None`)": sent to the lease's holder,
    /// which alone may give it away (rule 6).
    TransferLease {
        to: Option<NodeId>,
    },
    /// "Hand Raft leadership to node `to`": sent to the leader (openraft's transfer
    /// works only there), by the active replica at takeover or by `move-leader`.
    MoveLeader {
        to: NodeId,
    },
    Manage(Manage),
    /// A linearizable read of the replicated state, served by the leader.
    Read,
    /// "You were removed from the cluster": sent by the leader after a removal.
    Removed,
}

/// The outcome of a forwarded write or membership change, as the leader saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WriteReply {
    Done(Outcome),
    /// Not proposed: nothing changed (no leader, no quorum, not the leader any more).
    NotProposed(String),
    /// Proposed but not known committed in time: it may still commit.
    Unknown(String),
    /// Refused before proposing (bad input for a membership change).
    Invalid(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    Hello(Box<HelloReply>),
    Append(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    Snapshot(SnapshotResponse<TypeConfig>),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    Write(WriteReply),
    Read(Result<serde_json::Value, String>),
    Ok,
    /// The request was refused or failed on the receiver.
    Error(String),
}

/// Why a call failed: `Connect` means nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("{0}")]
    Io(String),
    #[error("refused: {0}")]
    Refused(String),
    /// The peer belongs to another cluster of the same cluster_id (another UUID).
    #[error("refused: {why}")]
    OtherCluster { why: String },
    /// Another node answered at the dialled peer's address.
    #[error(
        "peers[{dialled}] at {addr} answered as node {answered}: two replicas share node_id {answered}, or peers is wrong"
    )]
    WrongNode {
        dialled: NodeId,
        addr: String,
        answered: NodeId,
    },
}

impl CallError {
    fn kind(&self) -> &'static str {
        match self {
            CallError::Connect(_) => "connect",
            CallError::Io(_) => "io",
            CallError::Refused(_)
            | CallError::OtherCluster { .. }
            | CallError::WrongNode { .. } => "refused",
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {
    /// The TCP connection underneath.
    fn tcp(&self) -> &TcpStream;
}

impl Io for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Io for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl Io for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

type Stream = Box<dyn Io>;

/// Whether a kept-open connection, idle between requests, was closed by its peer (a
/// replica that restarted or died): anything to read, or the end, means it is not
/// fit for the next request. A request sent on it would be lost with an outcome
/// nobody can know.
fn closed_while_idle(conn: &Stream) -> bool {
    let mut byte = [std::mem::MaybeUninit::uninit()];
    // The socket is non-blocking (tokio's): an idle, open connection has nothing.
    !matches!(
        socket2::SockRef::from(conn.tcp()).peek(&mut byte),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// TLS for the peer channel: both sides present a certificate signed by `ca`.
pub struct Tls {
    server: TlsAcceptor,
    client: TlsConnector,
}

impl Tls {
    pub fn load(t: &PeerTls) -> Result<Tls, String> {
        let server: ServerConfig = crate::tls::server_config(
            &Terminate {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_ca: Some(t.ca.clone()),
            },
            &[],
        )
        .map_err(|e| format!("cluster.tls: {e}"))?;
        let client: ClientConfig = crate::tls::client_config(
            Some(&BackendTls {
                ca: Some(t.ca.clone()),
                server_name: None,
                cert: Some(t.cert.clone()),
                key: Some(t.key.clone()),
            }),
            true,
        )
        .map_err(|e| format!("cluster.tls: {e}"))?;
        Ok(Tls {
            server: TlsAcceptor::from(Arc::new(server)),
            client: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// What every connection of this replica shares.
pub struct Net {
    pub identity: Arc<Identity>,
    pub tls: Option<Tls>,
    pub connect_timeout: Duration,
    pub logged: LoggedRecently,
    /// When each peer last answered this replica or sent it a request it accepted.
    pub contact: Contact,
}

/// The last exchange with each peer, either way: what `member_reachable` reports.
#[derive(Default)]
pub struct Contact(Mutex<HashMap<NodeId, Instant>>);

impl Contact {
    fn heard(&self, from: NodeId) {
        if let Ok(mut at) = self.0.lock() {
            at.insert(from, Instant::now());
        }
    }

    /// When `peer` was last heard from, if ever.
    pub fn last(&self, peer: NodeId) -> Option<Instant> {
        self.0.lock().ok().and_then(|at| at.get(&peer).copied())
    }
}

/// Log lines that would repeat on every heartbeat, and when each was last written.
#[derive(Default)]
pub struct LoggedRecently(Mutex<HashMap<String, Instant>>);

impl LoggedRecently {
    /// True when `line` was not logged within [`LOG_AGAIN_AFTER`]; notes it as logged.
    fn due(&self, line: &str) -> bool {
        let Ok(mut logged) = self.0.lock() else {
            return true;
        };
        let now = Instant::now();
        logged.retain(|_, at| now.duration_since(*at) < LOG_AGAIN_AFTER);
        if logged.contains_key(line) {
            return false;
        }
        logged.insert(line.to_string(), now);
        true
    }
}

async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
    let len = stream.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit of {MAX_FRAME}"),
        ));
    }
    // Not `vec![0; len]`: a peer that announces 16 MiB and sends nothing costs
    // FIRST_CHUNK, and the buffer grows only with the bytes that arrive.
    let mut buf = Vec::with_capacity(len.min(FIRST_CHUNK));
    (&mut *stream)
        .take(len as u64)
        .read_to_end(&mut buf)
        .await?;
    if buf.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame cut short: {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

/// The connections that have not yet delivered an accepted frame, per source address,
/// oldest first.
#[derive(Default)]
struct Pending {
    next: u64,
    by_source: HashMap<IpAddr, VecDeque<(u64, CancellationToken)>>,
}

/// A connection's place in [`Pending`], given up on its first accepted frame or when
/// it ends.
struct PendingSlot {
    pending: Arc<Mutex<Pending>>,
    source: IpAddr,
    id: u64,
}

impl Pending {
    /// Registers a new connection from `source`; the token is cancelled when newer
    /// ones push it out. Also how many older ones were pushed out.
    fn admit(
        this: &Arc<Mutex<Pending>>,
        source: IpAddr,
    ) -> (PendingSlot, CancellationToken, usize) {
        let token = CancellationToken::new();
        let mut dropped = 0;
        let id = match this.lock() {
            Ok(mut p) => {
                let id = p.next;
                p.next += 1;
                let queue = p.by_source.entry(source).or_default();
                queue.push_back((id, token.clone()));
                while queue.len() > PENDING_PER_SOURCE {
                    if let Some((_, oldest)) = queue.pop_front() {
                        oldest.cancel();
                        dropped += 1;
                    }
                }
                id
            }
            Err(_) => u64::MAX,
        };
        let slot = PendingSlot {
            pending: this.clone(),
            source,
            id,
        };
        (slot, token, dropped)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock()
            && let Some(queue) = p.by_source.get_mut(&self.source)
        {
            queue.retain(|(id, _)| *id != self.id);
            if queue.is_empty() {
                p.by_source.remove(&self.source);
            }
        }
    }
}

async fn write_frame(stream: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "frame of {} bytes is over the limit of {MAX_FRAME}",
                bytes.len()
            ),
        ));
    }
    let len = u32::try_from(bytes.len()).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(bytes);
    stream.write_all(&frame).await?;
    stream.flush().await
}

/// A connection to one peer, opened on first use and again after an error.
pub struct PeerClient {
    net: Arc<Net>,
    pub target: NodeId,
    pub addr: String,
    conn: Option<Stream>,
}

impl PeerClient {
    pub fn new(net: Arc<Net>, target: NodeId, addr: String) -> Self {
        m::zero_peer_errors(&target.to_string());
        PeerClient {
            net,
            target,
            addr,
            conn: None,
        }
    }

    async fn connect(&self) -> Result<Stream, CallError> {
        let connect = async {
            let tcp = TcpStream::connect(&self.addr).await?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &self.net.tls else {
                return Ok::<Stream, io::Error>(Box::new(tcp));
            };
            let host = self
                .addr
                .parse::<SocketAddr>()
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|_| {
                    self.addr
                        .rsplit_once(':')
                        .map_or(self.addr.clone(), |(h, _)| h.to_string())
                });
            let name = ServerName::try_from(host).map_err(io::Error::other)?;
            Ok(Box::new(tls.client.connect(name, tcp).await?))
        };
        match tokio::time::timeout(self.net.connect_timeout, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(CallError::Connect(format!("{}: {e}", self.addr))),
            Err(_) => Err(CallError::Connect(format!("{}: timed out", self.addr))),
        }
    }

    /// Sends one request and waits up to `timeout` for its reply.
    pub async fn call(&mut self, body: Request, timeout: Duration) -> Result<Reply, CallError> {
        let result = self.call_inner(body, timeout).await;
        if result.is_ok() {
            self.net.contact.heard(self.target);
        }
        if let Err(e) = &result {
            self.conn = None;
            if let CallError::WrongNode { .. } = e {
                let line = e.to_string();
                if self.net.logged.due(&line) {
                    tracing::error!("{line}");
                }
            }
            metrics::counter!(m::PEER_RPC_ERRORS_TOTAL, "peer" => self.target.to_string(), "kind" => e.kind())
                .increment(1);
        }
        result
    }

    async fn call_inner(&mut self, body: Request, timeout: Duration) -> Result<Reply, CallError> {
        let bytes = serde_json::to_vec(&self.net.identity.wrap(body, Some(self.target)))
            .map_err(|e| CallError::Connect(format!("cannot encode the request: {e}")))?;
        let mut conn = match self.conn.take() {
            Some(conn) if !closed_while_idle(&conn) => conn,
            _ => self.connect().await?,
        };
        let exchange = async {
            write_frame(&mut conn, &bytes).await?;
            read_frame(&mut conn).await
        };
        let frame = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => return Err(CallError::Io(format!("{}: {e}", self.addr))),
            Err(_) => {
                return Err(CallError::Io(format!(
                    "{}: no answer within {timeout:?}",
                    self.addr
                )));
            }
        };
        let reply: Envelope<Reply> = serde_json::from_slice(&frame)
            .map_err(|e| CallError::Io(format!("{}: malformed reply: {e}", self.addr)))?;
        if let Some(why) = self.net.identity.refuse(&reply) {
            if reply.cluster_id == self.net.identity.cluster_id {
                return Err(CallError::OtherCluster { why });
            }
            return Err(CallError::Refused(why));
        }
        if reply.from != self.target {
            return Err(CallError::WrongNode {
                dialled: self.target,
                addr: self.addr.clone(),
                answered: reply.from,
            });
        }
        self.net.identity.heard(&reply);
        self.conn = Some(conn);
        match reply.body {
            Reply::Error(e) => Err(CallError::Refused(e)),
            body => Ok(body),
        }
    }
}

/// What answers requests arriving on the peer port.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, from: NodeId, request: Request) -> impl Future<Output = Reply> + Send;
}

/// Accepts peer connections until `stop`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    net: Arc<Net>,
    handler: Arc<H>,
    stop: CancellationToken,
) {
    let pending = Arc::new(Mutex::new(Pending::default()));
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let deadline = tokio::time::Instant::now() + FIRST_FRAME;
        let _ = tcp.set_nodelay(true);
        let (slot, pushed_out, dropped) = Pending::admit(&pending, peer.ip());
        if dropped > 0 {
            let line = format!(
                "over {PENDING_PER_SOURCE} peer connections from {} have not sent a first frame: closing the oldest (peers reconnecting after this replica stalled, or a flood)",
                peer.ip()
            );
            if net.logged.due(&line) {
                tracing::warn!("{line}");
            }
        }
        let net = net.clone();
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let serve = async {
                let stream: Stream = match &net.tls {
                    None => Box::new(tcp),
                    Some(tls) => {
                        match tokio::time::timeout_at(deadline, tls.server.accept(tcp)).await {
                            Ok(Ok(stream)) => Box::new(stream),
                            Ok(Err(e)) => {
                                tracing::warn!(%peer, error = %e, "peer refused: TLS handshake failed (a certificate signed by cluster.tls.ca is required)");
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                };
                connection(stream, peer, &net, &*handler, slot, deadline).await;
            };
            tokio::select! {
                () = stop.cancelled() => {}
                () = pushed_out.cancelled() => {}
                () = serve => {}
            }
        });
    }
}

/// Serves one connection: `slot` is its place among the connections that have not
/// yet delivered an accepted frame, given up on the first, which must arrive by
/// `first_by`.
async fn connection<H: Handler>(
    mut stream: Stream,
    peer: SocketAddr,
    net: &Net,
    handler: &H,
    slot: PendingSlot,
    first_by: tokio::time::Instant,
) {
    let mut slot = Some(slot);
    loop {
        let by = match slot {
            Some(_) => first_by,
            None => tokio::time::Instant::now() + IDLE,
        };
        let frame = match tokio::time::timeout_at(by, read_frame(&mut stream)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return,
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "peer frame refused; closing the connection");
                return;
            }
            Err(_) => {
                if slot.is_some() {
                    tracing::debug!(%peer, "no accepted peer frame within {FIRST_FRAME:?} of accept; closing the connection");
                }
                return;
            }
        };
        let request: Envelope<Request> = match serde_json::from_slice(&frame) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "malformed peer frame; closing the connection");
                return;
            }
        };
        let reply = if let Some(why) = net.identity.refuse(&request) {
            // Once per reason and interval: a peer retries many times a second, each
            // time from another port.
            if net.logged.due(&why) {
                tracing::warn!(%peer, "peer refused: {why}");
            }
            Reply::Error(format!("refused: {why}"))
        } else if let Some(why) = net.identity.refuse_addressing(&request) {
            // Two replicas with one node_id is a misconfiguration; a request for a
            // node no longer here is expected after a replacement at its address.
            if net.logged.due(&why) {
                if request.from == net.identity.node_id {
                    tracing::error!(%peer, "peer refused: {why}");
                } else {
                    tracing::warn!(%peer, "peer refused: {why}");
                }
            }
            Reply::Error(format!("refused: {why}"))
        } else {
            net.identity.heard(&request);
            net.contact.heard(request.from);
            // An accepted frame: from now on the connection is a peer's.
            slot = None;
            handler.handle(request.from, request.body).await
        };
        let bytes = match serde_json::to_vec(&net.identity.wrap(reply, None)) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a peer reply");
                return;
            }
        };
        if write_frame(&mut stream, &bytes).await.is_err() {
            return;
        }
    }
}

/// openraft's view of the peer channel.
pub struct Factory {
    pub net: Arc<Net>,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Network<PeerClient>;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        Network::new(PeerClient::new(self.net.clone(), target, node.addr.clone()))
    }
}

/// Carries one request to a peer and its reply back: the TCP peer channel
/// ([`PeerClient`]), or an in-memory network in the simulation tests.
pub trait Transport: Send + Sync + 'static {
    fn call(
        &mut self,
        body: Request,
        timeout: Duration,
    ) -> impl Future<Output = Result<Reply, CallError>> + Send;
}

impl Transport for PeerClient {
    fn call(
        &mut self,
        body: Request,
        timeout: Duration,
    ) -> impl Future<Output = Result<Reply, CallError>> + Send {
        PeerClient::call(self, body, timeout)
    }
}

/// openraft's RPCs to one peer, over a [`Transport`].
pub struct Network<T> {
    client: T,
}

impl<T: Transport> Network<T> {
    pub fn new(client: T) -> Self {
        Network { client }
    }
}

/// Hands a Raft RPC that arrived from a peer to the local Raft; `Err` gives back a
/// request that is not a Raft RPC.
pub async fn raft_rpc(raft: &super::storage::Raft, request: Request) -> Result<Reply, Request> {
    fn answer<R, E: std::fmt::Display>(r: Result<R, E>, ok: fn(R) -> Reply) -> Reply {
        r.map_or_else(|e| Reply::Error(e.to_string()), ok)
    }
    if let Err(why) = sane(&request) {
        return Ok(Reply::Error(format!("refused: {why}")));
    }
    let raft = raft.clone();
    super::types::to_completion(async move {
        Ok(match request {
            Request::Append(rpc) => answer(raft.append_entries(rpc).await, Reply::Append),
            Request::Vote(rpc) => answer(raft.vote(rpc).await, Reply::Vote),
            Request::PreVote(rpc) => answer(raft.pre_vote(rpc).await, Reply::Vote),
            Request::Snapshot { vote, meta, data } => {
                let snapshot = Snapshot {
                    meta,
                    snapshot: io::Cursor::new(data),
                };
                answer(
                    raft.install_full_snapshot(vote, snapshot).await,
                    Reply::Snapshot,
                )
            }
            Request::TransferLeader(req) => answer(
                raft.handle_transfer_leader(req).await,
                Reply::TransferLeader,
            ),
            other => return Err(other),
        })
    })
    .await
}

/// The largest term and log index a peer may send: far beyond what any cluster
/// reaches (a new term every millisecond for 146 million years), and far enough from
/// `u64::MAX` that openraft's `term + 1` and `index + 1` cannot overflow.
pub const MAX_TERM_OR_INDEX: u64 = 1 << 62;

fn log_id_in_range(what: &str, log_id: Option<&LogId>) -> Result<(), String> {
    match log_id {
        Some(l) if l.leader_id.term > MAX_TERM_OR_INDEX || l.index > MAX_TERM_OR_INDEX => Err(
            format!("{what} {l} is out of range (terms and indexes stop at {MAX_TERM_OR_INDEX})"),
        ),
        _ => Ok(()),
    }
}

fn vote_in_range(vote: &Vote) -> Result<(), String> {
    if vote.leader_id.term > MAX_TERM_OR_INDEX {
        return Err(format!(
            "vote {vote} is out of range (terms stop at {MAX_TERM_OR_INDEX})"
        ));
    }
    Ok(())
}

/// Why a Raft RPC is refused before openraft sees it: what no correct peer sends, and
/// what openraft takes for granted of its peers (it asserts these, or adds one to a
/// term or an index, and its core stopped in a debug build, or went on with a wrapped
/// term in a release one). Found by the generated-input suite (tests/fuzz_peer.rs).
fn sane(request: &Request) -> Result<(), String> {
    match request {
        Request::Append(rpc) => {
            vote_in_range(&rpc.vote)?;
            log_id_in_range("prev_log_id", rpc.prev_log_id.as_ref())?;
            log_id_in_range("leader_commit", rpc.leader_commit.as_ref())?;
            if !rpc.vote.committed {
                return Err(format!(
                    "an append from {} whose vote is not committed: only a leader appends",
                    rpc.vote
                ));
            }
            let mut expected = match &rpc.prev_log_id {
                Some(prev) => prev.index.checked_add(1),
                None => Some(0),
            };
            let mut term = rpc.prev_log_id.as_ref().map_or(0, |p| p.leader_id.term);
            for entry in &rpc.entries {
                log_id_in_range("entry", Some(&entry.log_id))?;
                if Some(entry.log_id.index) != expected {
                    return Err(format!(
                        "entry {} follows index {:?}: entries must be consecutive",
                        entry.log_id,
                        rpc.prev_log_id.as_ref().map(|p| p.index)
                    ));
                }
                if entry.log_id.leader_id.term < term
                    || entry.log_id.leader_id.term > rpc.vote.leader_id.term
                {
                    return Err(format!(
                        "entry {} has a term out of order or above the leader's {}",
                        entry.log_id, rpc.vote.leader_id.term
                    ));
                }
                term = entry.log_id.leader_id.term;
                expected = entry.log_id.index.checked_add(1);
            }
            Ok(())
        }
        Request::Vote(rpc) | Request::PreVote(rpc) => {
            vote_in_range(&rpc.vote)?;
            log_id_in_range("last_log_id", rpc.last_log_id.as_ref())?;
            if rpc.vote.committed {
                return Err(format!(
                    "a vote request with a committed vote {}: a candidate's vote is not committed",
                    rpc.vote
                ));
            }
            Ok(())
        }
        Request::Snapshot { vote, meta, data } => {
            vote_in_range(vote)?;
            log_id_in_range("snapshot last_log_id", meta.last_log_id.as_ref())?;
            if !vote.committed {
                return Err(format!(
                    "a snapshot from {vote} whose vote is not committed: only a leader sends one"
                ));
            }
            // The state machine would fail to decode it, and openraft stops for good
            // on a state machine error.
            super::storage::decode::<super::types::Replicated>(data)
                .map(drop)
                .map_err(|e| format!("a snapshot whose data is not a raftlb state: {e}"))
        }
        Request::TransferLeader(rpc) => {
            vote_in_range(rpc.from_leader())?;
            log_id_in_range("last_log_id", rpc.last_log_id())
        }
        _ => Ok(()),
    }
}

fn rpc_error(e: CallError) -> RPCError<TypeConfig> {
    match e {
        CallError::Connect(_) => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected(reply: Reply) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(format!(
        "unexpected reply: {reply:?}"
    )))
}

impl<T: Transport> Network<T> {
    /// One RPC: `expect` takes the reply it wants, anything else is a network error.
    async fn rpc<R>(
        &mut self,
        request: Request,
        option: &RPCOption,
        expect: fn(Reply) -> Result<R, Reply>,
    ) -> Result<R, RPCError<TypeConfig>> {
        match self.client.call(request, option.hard_ttl()).await {
            Ok(reply) => expect(reply).map_err(unexpected),
            Err(e) => Err(rpc_error(e)),
        }
    }
}

impl<T: Transport> RaftNetworkV2<TypeConfig> for Network<T> {
    type SnapshotData = std::io::Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(Request::Append(rpc), &option, |r| match r {
            Reply::Append(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(Request::Vote(rpc), &option, vote_reply).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(Request::PreVote(rpc), &option, vote_reply).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let request = Request::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        let reply = self.rpc(request, &option, |r| match r {
            Reply::Snapshot(r) => Ok(r),
            other => Err(other),
        });
        Ok(reply.await?)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(Request::TransferLeader(req), &option, |r| match r {
            Reply::TransferLeader(r) => Ok(r),
            other => Err(other),
        })
        .await
    }
}

fn vote_reply(reply: Reply) -> Result<VoteResponse<TypeConfig>, Reply> {
    match reply {
        Reply::Vote(r) => Ok(r),
        other => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading_them() {
        let mut data: &[u8] = &(u32::MAX).to_be_bytes();
        let err = read_frame(&mut data).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_an_early_eof_and_its_buffer_follows_the_bytes() {
        let mut data: &[u8] = &[&(16u32 << 20).to_be_bytes()[..], b"{}"].concat();
        let err = read_frame(&mut data).await.expect_err("cut short");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut whole: &[u8] = &[&5u32.to_be_bytes()[..], b"hello", b"next"].concat();
        assert_eq!(read_frame(&mut whole).await.expect("frame"), b"hello");
        assert_eq!(whole, b"next");
    }

    #[test]
    fn a_source_over_its_pending_limit_loses_its_oldest_connections() {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let mut held = Vec::new();
        for _ in 0..PENDING_PER_SOURCE {
            let (slot, token, dropped) = Pending::admit(&pending, a);
            assert_eq!(dropped, 0);
            held.push((slot, token));
        }
        // Another source has its own allowance.
        let (_other, other_token, dropped) = Pending::admit(&pending, b);
        assert_eq!(dropped, 0);
        let (_newest, _, dropped) = Pending::admit(&pending, a);
        assert_eq!(dropped, 1);
        assert!(held[0].1.is_cancelled(), "the oldest is pushed out");
        assert!(!held[1].1.is_cancelled());
        assert!(!other_token.is_cancelled());
        // A slot given up (first accepted frame, or the end) makes room.
        let (slot, token) = held.pop().expect("slot");
        drop(slot);
        let (_again, _, dropped) = Pending::admit(&pending, a);
        assert_eq!(dropped, 0);
        assert!(!token.is_cancelled());
    }

    #[test]
    fn frames_of_another_cluster_are_refused() {
        let ours = Uuid::new_v4();
        let me = Identity::new("prod".into(), 1, Some(ours));
        let mut e = Envelope {
            protocol: PROTOCOL,
            cluster_id: "prod".into(),
            uuid: Some(ours),
            from: 2,
            to: None,
            body: (),
        };
        assert!(me.refuse(&e).is_none());
        e.uuid = None;
        assert!(me.refuse(&e).is_none(), "a replica not yet initialised");
        e.uuid = Some(Uuid::new_v4());
        assert!(me.refuse(&e).is_some());
        e.uuid = Some(ours);
        e.cluster_id = "test".into();
        assert!(me.refuse(&e).is_some());
    }

    #[test]
    fn a_request_for_another_node_or_from_this_one_is_refused() {
        let me = Identity::new("prod".into(), 6, None);
        let request = |from, to| Envelope {
            protocol: PROTOCOL,
            cluster_id: "prod".into(),
            uuid: None,
            from,
            to,
            body: (),
        };
        assert!(me.refuse_addressing(&request(2, Some(6))).is_none());
        assert!(
            me.refuse_addressing(&request(2, None)).is_none(),
            "an older build names no recipient"
        );
        let why = me.refuse_addressing(&request(2, Some(3))).expect("refused");
        assert!(why.contains("for node 3"), "{why}");
        assert!(me.refuse_addressing(&request(6, Some(6))).is_some());
        // Replies name no recipient, and an older build's frame decodes without one.
        let json = serde_json::to_string(&me.wrap((), None)).expect("encode");
        assert!(!json.contains("\"to\""), "{json}");
        let old: Envelope<()> = serde_json::from_str(
            r#"{"cluster_id":"prod","uuid":null,"from":2,"protocol":1,"body":null}"#,
        )
        .expect("decode");
        assert_eq!(old.to, None);
    }

    /// Answers every request that passes the envelope checks with `Ok`.
    struct Answer;

    impl Handler for Answer {
        async fn handle(&self, _from: NodeId, _request: Request) -> Reply {
            Reply::Ok
        }
    }

    fn net(node_id: NodeId) -> Arc<Net> {
        Arc::new(Net {
            identity: Arc::new(Identity::new("prod".into(), node_id, None)),
            tls: None,
            connect_timeout: Duration::from_secs(2),
            logged: LoggedRecently::default(),
            contact: Contact::default(),
        })
    }

    #[tokio::test]
    async fn a_replica_refuses_its_own_node_id_and_a_client_the_wrong_node() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, net(1), Arc::new(Answer), stop.clone()));
        let timeout = Duration::from_secs(5);

        let mut right = PeerClient::new(net(3), 1, addr.clone());
        assert!(matches!(
            right.call(Request::Hello, timeout).await,
            Ok(Reply::Ok)
        ));

        // Node 3's peers say node 2 is at node 1's address.
        let mut wrong = PeerClient::new(net(3), 2, addr.clone());
        let err = wrong
            .call(Request::Hello, timeout)
            .await
            .expect_err("node 1 answered for node 2");
        assert_eq!(
            err.to_string(),
            format!(
                "peers[2] at {addr} answered as node 1: two replicas share node_id 1, or peers is wrong"
            )
        );
        assert_eq!(err.kind(), "refused");

        // Node 1 reaching itself as node 2: its own server refuses the request, and
        // the client the reply.
        let mut itself = PeerClient::new(net(1), 2, addr.clone());
        let err = itself
            .call(Request::Hello, timeout)
            .await
            .expect_err("refused");
        assert!(
            matches!(err, CallError::WrongNode { answered: 1, .. }),
            "{err}"
        );

        // A request claiming the server's own id never reaches the handler.
        let mut impostor = PeerClient::new(net(1), 1, addr.clone());
        match impostor.call(Request::Hello, timeout).await {
            Err(CallError::Refused(why)) => assert!(why.contains("own node_id"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        stop.cancel();
    }

    #[test]
    fn a_repeated_line_is_logged_once_per_interval() {
        let logged = LoggedRecently::default();
        assert!(logged.due("a"));
        assert!(!logged.due("a"));
        assert!(logged.due("b"));
    }
}
