//! The config file's schema (SPEC.md, "Config file"). Unknown keys are errors; every
//! field has a default except `listeners` and `pools`. Fields that the validation pass
//! reports on are `Spanned`, so its errors carry file:line:column too.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_saphyr::{Location, Spanned};

use super::types::{BindAddr, Dur, HostPort};

/// A value with no place in the file (a default).
pub fn unplaced<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: Node,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_election: Option<LeaderElection>,
    pub listeners: BTreeMap<String, Listener>,
    /// Required, except with `cluster.initial_state: existing` (the store has them).
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// For people, logs and metrics; defaults to the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "default_admin_bind")]
    pub bind: BindAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Spanned<CertKey>>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            bind: default_admin_bind(),
            token_file: None,
            tls: None,
        }
    }
}

fn default_admin_bind() -> BindAddr {
    BindAddr(([127, 0, 0, 1], 9090).into())
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Defaults to the number of cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<Spanned<usize>>,
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Dur,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            worker_threads: None,
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

fn default_shutdown_grace() -> Dur {
    Dur::secs(30)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InitialState {
    New,
    Existing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    Embedded,
    Etcd,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    #[serde(default = "default_cluster_id")]
    pub cluster_id: Spanned<String>,
    pub node_id: Spanned<u64>,
    #[serde(default = "default_initial_state")]
    pub initial_state: InitialState,
    #[serde(default = "default_peer_bind")]
    pub bind: Spanned<BindAddr>,
    /// Defaults to this node's entry in `peers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<Spanned<HostPort>>,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_peers")]
    pub peers: Spanned<BTreeMap<u64, Spanned<HostPort>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<PeerTls>,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: Spanned<Dur>,
    #[serde(default = "default_election_timeout")]
    pub election_timeout: Spanned<Dur>,
    #[serde(default = "default_store")]
    pub store: Spanned<StoreKind>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd_servers: Vec<String>,
}

fn default_cluster_id() -> Spanned<String> {
    unplaced("raftlb".into())
}
fn default_initial_state() -> InitialState {
    InitialState::New
}
fn default_peer_bind() -> Spanned<BindAddr> {
    unplaced(BindAddr(([0, 0, 0, 0], 7400).into()))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/raftlb")
}
fn default_peers() -> Spanned<BTreeMap<u64, Spanned<HostPort>>> {
    unplaced(BTreeMap::new())
}
fn default_heartbeat() -> Spanned<Dur> {
    unplaced(Dur::ms(100))
}
fn default_election_timeout() -> Spanned<Dur> {
    unplaced(Dur::ms(500))
}
fn default_store() -> Spanned<StoreKind> {
    unplaced(StoreKind::Embedded)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standby {
    CloseListeners,
    Serve,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderElection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_lease_duration")]
    pub lease_duration: Spanned<Dur>,
    #[serde(default = "default_renew_deadline")]
    pub renew_deadline: Spanned<Dur>,
    #[serde(default = "default_retry_period")]
    pub retry_period: Spanned<Dur>,
    #[serde(default = "default_standby")]
    pub standby: Standby,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Vip>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_active: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_standby: Option<String>,
    /// Run when an active replica cannot serve and gives the lease up (keepalived's FAULT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_fault: Option<String>,
}

impl Default for LeaderElection {
    fn default() -> Self {
        LeaderElection {
            enabled: true,
            lease_duration: default_lease_duration(),
            renew_deadline: default_renew_deadline(),
            retry_period: default_retry_period(),
            standby: default_standby(),
            vip: None,
            on_active: None,
            on_standby: None,
            on_fault: None,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_lease_duration() -> Spanned<Dur> {
    unplaced(Dur::secs(15))
}
fn default_renew_deadline() -> Spanned<Dur> {
    unplaced(Dur::secs(10))
}
fn default_retry_period() -> Spanned<Dur> {
    unplaced(Dur::secs(2))
}
fn default_standby() -> Standby {
    Standby::CloseListeners
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    /// `IP/prefix`, e.g. `10.0.0.100/24`.
    pub address: Spanned<String>,
    pub interface: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    Passthrough,
    Terminate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    Off,
    V1,
    V2,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub bind: Spanned<BindAddr>,
    pub pool: Spanned<String>,
    #[serde(default = "default_tls_mode")]
    pub tls: Spanned<TlsMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminate: Option<Spanned<Terminate>>,
    #[serde(default = "default_proxy_protocol")]
    pub proxy_protocol: Spanned<ProxyProtocol>,
    /// Defaults to (open-files limit - 256) / 2: each proxied connection holds two descriptors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<Spanned<u32>>,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Spanned<Dur>,
}

fn default_tls_mode() -> Spanned<TlsMode> {
    unplaced(TlsMode::Passthrough)
}
fn default_proxy_protocol() -> Spanned<ProxyProtocol> {
    unplaced(ProxyProtocol::Off)
}
fn default_idle_timeout() -> Spanned<Dur> {
    unplaced(Dur::secs(3600))
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Terminate {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    RandomTwo,
    SourceHash,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDown {
    None,
    Close,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    #[serde(default = "default_balance")]
    pub balance: Balance,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Spanned<Dur>,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: Spanned<Dur>,
    #[serde(default = "default_on_down")]
    pub on_down: OnDown,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_tls: Option<Spanned<BackendTls>>,
    #[serde(default = "default_passive_hold")]
    pub passive_hold: Spanned<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Spanned<HealthCheck>>,
    pub backends: Spanned<Vec<Backend>>,
}

fn default_balance() -> Balance {
    Balance::RoundRobin
}
fn default_connect_timeout() -> Spanned<Dur> {
    unplaced(Dur::secs(2))
}
fn default_retries() -> u32 {
    3
}
fn default_resolve_interval() -> Spanned<Dur> {
    unplaced(Dur::secs(30))
}
fn default_on_down() -> OnDown {
    OnDown::None
}
fn default_passive_hold() -> Spanned<Dur> {
    unplaced(Dur::secs(10))
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Tcp,
    Tls,
    Https,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// kube-apiserver first: HTTPS `/readyz` unless told otherwise.
    #[serde(default = "default_check_kind")]
    pub kind: CheckKind,
    #[serde(default = "default_check_path")]
    pub path: Spanned<String>,
    #[serde(default = "default_check_interval")]
    pub interval: Spanned<Dur>,
    #[serde(default = "default_check_timeout")]
    pub timeout: Spanned<Dur>,
    #[serde(default = "default_rise")]
    pub rise: Spanned<u32>,
    #[serde(default = "default_fall")]
    pub fall: Spanned<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTls>,
}

fn default_check_kind() -> CheckKind {
    CheckKind::Https
}
fn default_check_path() -> Spanned<String> {
    unplaced("/readyz".into())
}
fn default_check_interval() -> Spanned<Dur> {
    unplaced(Dur::secs(2))
}
fn default_check_timeout() -> Spanned<Dur> {
    unplaced(Dur::secs(1))
}
fn default_rise() -> Spanned<u32> {
    unplaced(2)
}
fn default_fall() -> Spanned<u32> {
    unplaced(3)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: Spanned<String>,
    pub address: HostPort,
    #[serde(default = "default_weight")]
    pub weight: Spanned<u32>,
    #[serde(default)]
    pub drained: bool,
}

fn default_weight() -> Spanned<u32> {
    unplaced(1)
}
