//! The pools the proxy routes to. A config becomes an immutable [`Snapshot`] that
//! is swapped atomically (`ArcSwap`), so the data path never locks. Runtime state
//! that must outlive a swap (health, active connections, resolved addresses) lives
//! in [`BackendState`], shared between the snapshots that name the same backend.

pub mod health;
pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::schema::{self, BackendTls, Balance, HealthCheck, OnDown};
use crate::config::types::HostPort;
use crate::metrics as m;
use crate::tls::{self, Reloading};
use health::Detail;
pub use health::Health;
use tokio_rustls::rustls::ClientConfig;

/// Per-backend state that survives config swaps.
#[derive(Debug)]
pub struct BackendState {
    pub active: AtomicU64,
    /// Bytes relayed to this backend and back to clients (status page, backends API).
    pub bytes_to_backend: AtomicU64,
    pub bytes_to_client: AtomicU64,
    health: AtomicU8,
    /// The backend's addresses; re-resolved every `resolve_interval` for hostnames.
    addrs: ArcSwap<Vec<SocketAddr>>,
    /// Probe counters, last check and last flip, for status.
    pub detail: Mutex<Detail>,
    /// Cancelled when the backend goes down in a pool with `on_down: close`, or
    /// when `stop` is: a child of the balancer's stop token.
    down: ArcSwap<CancellationToken>,
    /// The balancer's stop token, the parent of each `down` token.
    stop: CancellationToken,
}

impl BackendState {
    fn new(health: Health, stop: &CancellationToken) -> Self {
        BackendState {
            active: AtomicU64::new(0),
            bytes_to_backend: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            health: AtomicU8::new(health as u8),
            addrs: ArcSwap::from_pointee(Vec::new()),
            detail: Mutex::new(Detail::default()),
            down: ArcSwap::from_pointee(stop.child_token()),
            stop: stop.clone(),
        }
    }

    /// A token cancelled if this backend goes down with `on_down: close`, or when
    /// the balancer's stop token is cancelled (the end of the shutdown grace).
    pub fn down_token(&self) -> CancellationToken {
        (**self.down.load()).clone()
    }

    /// Closes every connection established to this backend so far.
    pub fn close_connections(&self) {
        self.down.swap(Arc::new(self.stop.child_token())).cancel();
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            0 => Health::Up,
            1 => Health::Down,
            _ => Health::Unknown,
        }
    }

    pub fn set_health(&self, health: Health) {
        self.health.store(health as u8, Ordering::Relaxed);
    }

    pub fn addrs(&self) -> Arc<Vec<SocketAddr>> {
        self.addrs.load_full()
    }

    /// The pool's probes were removed: what they found no longer counts. The backend
    /// is up once it has an address (a hostname's comes when it resolves).
    fn forget_probes(&self, pool: &str, backend: &str) {
        let Ok(mut detail) = self.detail.lock() else {
            return;
        };
        detail.probes.reset();
        detail.last_check = None;
        detail.probe_started = None;
        detail.probe_epoch += 1;
        // A hostname not resolved yet is unknown: its first resolution makes it up.
        let to = if self.addrs.load().is_empty() {
            Health::Unknown
        } else {
            Health::Up
        };
        if self.health() != to {
            detail.flips += 1;
            detail.last_flip = Some(std::time::SystemTime::now());
            self.set_health(to);
            tracing::info!(
                pool,
                backend,
                health = to.as_str(),
                "the pool's health_check was removed: only passive checks apply"
            );
        }
    }
}

/// One backend in a snapshot: its config plus a handle to its runtime state.
#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub address: HostPort,
    pub weight: u32,
    pub drained: bool,
    pub state: Arc<BackendState>,
}

impl Backend {
    pub fn takes_new_connections(&self) -> bool {
        !self.drained && self.state.health() == Health::Up && !self.state.addrs.load().is_empty()
    }

    pub fn active(&self) -> u64 {
        self.state.active.load(Ordering::Relaxed)
    }

    /// The address to connect to: the first resolved one.
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.state.addrs.load().first().copied()
    }
}

/// One pool in a snapshot.
pub struct Pool {
    pub name: Arc<str>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub on_down: OnDown,
    pub passive_hold: Duration,
    pub health_check: Option<HealthCheck>,
    /// Client TLS for `tls` and `https` probes.
    pub probe_tls: Option<Arc<Reloading<ClientConfig>>>,
    /// Re-encryption towards backends (`backend_tls`).
    pub backend_tls: Option<BackendTlsContext>,
    pub backends: Vec<Backend>,
    policy: Box<dyn policy::Policy>,
}

/// A pool's `backend_tls`: the settings and the client config built from them.
pub struct BackendTlsContext {
    pub settings: BackendTls,
    pub config: Arc<Reloading<ClientConfig>>,
}

impl Pool {
    /// A backend for a new connection from `client`, other than those in `tried`.
    pub fn pick(&self, client: IpAddr, tried: &[usize]) -> Option<usize> {
        self.policy.pick(&self.backends, client, tried)
    }
}

/// Everything the proxy routes by, at one config version.
#[derive(Default)]
pub struct Snapshot {
    pub version: u64,
    pub pools: HashMap<String, Arc<Pool>>,
}

/// Owns the current snapshot and the state registry behind it.
pub struct Balancer {
    current: ArcSwap<Snapshot>,
    /// Keyed by (pool, backend, address): a backend whose address changes starts afresh.
    states: Mutex<HashMap<(String, String, String), Arc<BackendState>>>,
    resolvers: Mutex<Option<CancellationToken>>,
    /// Counts swapped snapshots: the health checks restart their probes on each.
    swapped: tokio::sync::watch::Sender<u64>,
    /// The PROXY header a health check sends first, by pool: set from the
    /// listeners in front of each pool (node-local), not from the pools.
    probe_headers: ArcSwap<HashMap<String, Arc<[u8]>>>,
    /// The pools config the current snapshot was built from. Every writer (reload,
    /// runtime API) holds this lock from reading the config to swapping the snapshot.
    config: tokio::sync::Mutex<BTreeMap<String, schema::Pool>>,
    /// The parent of every backend's down token (see `stop_token`).
    stop: CancellationToken,
}

/// Why a change to one backend was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("pool {0:?} does not exist")]
    NoPool(String),
    #[error("backend {backend:?} does not exist in pool {pool:?}")]
    NoBackend { pool: String, backend: String },
    /// The write's `If-Match` named another version than the running one.
    #[error("version {if_version} no longer matches: the config_version is {now}")]
    Stale { if_version: u64, now: u64 },
    #[error("{0}")]
    Apply(String),
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new()
    }
}

impl Balancer {
    pub fn new() -> Self {
        Balancer {
            current: ArcSwap::from_pointee(Snapshot::default()),
            states: Mutex::new(HashMap::new()),
            resolvers: Mutex::new(None),
            swapped: tokio::sync::watch::Sender::new(0),
            probe_headers: ArcSwap::default(),
            config: tokio::sync::Mutex::new(BTreeMap::new()),
            stop: CancellationToken::new(),
        }
    }

    /// Cancelling this token closes every connection to every backend: each
    /// backend's down token is its child, so a relay waits on one token, not two.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// What a health check of `pool` sends before anything else: the PROXY header of
    /// a connection the proxy makes itself, when a listener sends PROXY to the pool.
    pub fn probe_header(&self, pool: &str) -> Option<Arc<[u8]>> {
        self.probe_headers.load().get(pool).cloned()
    }

    pub fn set_probe_headers(&self, headers: HashMap<String, Arc<[u8]>>) {
        self.probe_headers.store(Arc::new(headers));
    }

    /// Changes each time a new snapshot is swapped in (a config applied).
    pub fn swapped(&self) -> tokio::sync::watch::Receiver<u64> {
        self.swapped.subscribe()
    }

    /// Builds a snapshot from `pools` and swaps it in as the next config version, all
    /// or nothing: a certificate file that does not load leaves the running snapshot
    /// as it was. Returns the new version.
    pub async fn apply(&self, pools: &BTreeMap<String, schema::Pool>) -> Result<u64, String> {
        let mut config = self.config.lock().await;
        // The same pools again are rebuilt (certificate files may have changed on
        // disk) at the same version: nothing in the config changed.
        let keep = crate::config::same(pools, &*config).then(|| self.snapshot().version);
        let version = self.build_and_swap(pools, keep).await?;
        *config = pools.clone();
        Ok(version)
    }

    /// Applies a committed config at the store's `version`. A pool this replica cannot
    /// build (a certificate file missing here) or that `refuse` names a reason for
    /// (this replica's listeners) keeps its previous version; the errors are
    /// returned, one line per pool.
    pub async fn apply_replicated(
        &self,
        pools: &BTreeMap<String, schema::Pool>,
        version: u64,
        refuse: impl Fn(&str, &schema::Pool) -> Option<String>,
    ) -> Vec<String> {
        let mut config = self.config.lock().await;
        let mut effective = BTreeMap::new();
        let mut failures = Vec::new();
        for (name, pool) in pools {
            match buildable(name, pool, &refuse) {
                Ok(_) => {
                    effective.insert(name.clone(), pool.clone());
                }
                Err(e) => {
                    failures.push(e);
                    if let Some(old) = config.get(name) {
                        effective.insert(name.clone(), old.clone());
                    }
                }
            }
        }
        match self.build_and_swap(&effective, Some(version)).await {
            Ok(_) => *config = effective,
            Err(e) => failures.push(e),
        }
        failures
    }

    /// What [`Balancer::apply_replicated`] would refuse in `pools`, found without
    /// starting anything: after a failed apply, this is asked again until the answer
    /// changes (a missing certificate file was created), and then the apply is retried.
    pub fn unbuildable(
        pools: &BTreeMap<String, schema::Pool>,
        refuse: impl Fn(&str, &schema::Pool) -> Option<String>,
    ) -> Vec<String> {
        let refused = pools.iter().filter_map(|(name, pool)| refuse(name, pool));
        refused.chain(check_pools(pools)).collect()
    }

    /// Changes one backend of the running config (the standalone runtime API: drain,
    /// undrain, weight), if the running version still is `if_version` when given. The
    /// file is untouched; the next reload replaces the change.
    pub async fn update_backend(
        &self,
        pool: &str,
        backend: &str,
        if_version: Option<u64>,
        change: impl FnOnce(&mut schema::Backend),
    ) -> Result<u64, UpdateError> {
        let mut config = self.config.lock().await;
        let now = self.snapshot().version;
        if let Some(v) = if_version.filter(|v| *v != now) {
            return Err(UpdateError::Stale { if_version: v, now });
        }
        let mut pools = config.clone();
        let p = pools
            .get_mut(pool)
            .ok_or_else(|| UpdateError::NoPool(pool.to_string()))?;
        let b = p
            .backends
            .value
            .iter_mut()
            .find(|b| b.name.value == backend)
            .ok_or_else(|| UpdateError::NoBackend {
                pool: pool.to_string(),
                backend: backend.to_string(),
            })?;
        let before = b.clone();
        change(b);
        if crate::config::same(&before, b) {
            return Ok(self.snapshot().version);
        }
        let version = self
            .build_and_swap(&pools, None)
            .await
            .map_err(UpdateError::Apply)?;
        *config = pools;
        Ok(version)
    }

    /// Hostnames are resolved first (a name that does not resolve has no address until
    /// it does); connections already established are not touched.
    async fn build_and_swap(
        &self,
        pools: &BTreeMap<String, schema::Pool>,
        version: Option<u64>,
    ) -> Result<u64, String> {
        let version = version.unwrap_or(self.snapshot().version + 1);
        let mut snapshot = Snapshot {
            version,
            pools: HashMap::new(),
        };
        let mut keep = HashMap::new();
        let mut to_resolve = Vec::new();
        let before = self.current.load_full();
        // Backends whose probes were removed: what the probes found is forgotten
        // once the new snapshot is in place (a probe of the old round drops its result).
        let mut forget = Vec::new();
        for (pool_name, pool) in pools {
            // A pool whose health_check is removed: its backends count as up again
            // (SPEC: without probes only passive checks apply), whatever the probes
            // had found; nothing else would ever bring one back.
            let unprobed = pool.health_check.is_none()
                && before
                    .pools
                    .get(pool_name.as_str())
                    .is_some_and(|p| p.health_check.is_some());
            let mut backends = Vec::with_capacity(pool.backends.value.len());
            for b in &pool.backends.value {
                let key = (
                    pool_name.clone(),
                    b.name.value.clone(),
                    b.address.to_string(),
                );
                let probed = pool.health_check.is_some();
                let by_name = matches!(b.address, HostPort::Name(..));
                // A hostname is not up before it resolves, probes or not.
                let state = self.state_for(&key, probed || by_name);
                keep.insert(key, state.clone());
                match &b.address {
                    HostPort::Ip(addr) => state.addrs.store(Arc::new(vec![*addr])),
                    HostPort::Name(..) => to_resolve.push(Resolve {
                        address: b.address.clone(),
                        state: state.clone(),
                        every: pool.resolve_interval.value.get(),
                        pool: pool_name.clone(),
                        backend: b.name.value.clone(),
                        probed,
                    }),
                }
                if unprobed {
                    forget.push((state.clone(), pool_name.clone(), b.name.value.clone()));
                }
                backends.push(Backend {
                    name: b.name.value.as_str().into(),
                    address: b.address.clone(),
                    weight: b.weight.value,
                    drained: b.drained,
                    state,
                });
            }
            let policy = policy::for_balance(pool.balance, &backends);
            let health_check = pool.health_check.as_ref().map(|c| c.value.clone());
            snapshot.pools.insert(
                pool_name.clone(),
                Arc::new(Pool {
                    name: pool_name.as_str().into(),
                    balance: pool.balance,
                    connect_timeout: pool.connect_timeout.value.get(),
                    retries: pool.retries,
                    on_down: pool.on_down,
                    passive_hold: pool.passive_hold.value.get(),
                    probe_tls: probe_tls(pool_name, health_check.as_ref())?,
                    backend_tls: backend_tls(pool_name, pool)?,
                    health_check,
                    backends,
                    policy,
                }),
            );
        }
        for r in &to_resolve {
            resolve_into(r).await;
        }
        self.start_resolvers(to_resolve);
        self.current.store(Arc::new(snapshot));
        for (state, pool, backend) in forget {
            state.forget_probes(&pool, &backend);
        }
        publish_backend_gauges(&before, &self.current.load());
        if let Ok(mut states) = self.states.lock() {
            *states = keep;
        }
        self.swapped.send_modify(|n| *n += 1);
        metrics::gauge!(m::CONFIG_VERSION).set(version as f64);
        Ok(version)
    }

    fn state_for(&self, key: &(String, String, String), unknown: bool) -> Arc<BackendState> {
        let existing = self.states.lock().ok().and_then(|s| s.get(key).cloned());
        existing.unwrap_or_else(|| {
            Arc::new(BackendState::new(
                if unknown { Health::Unknown } else { Health::Up },
                &self.stop,
            ))
        })
    }

    /// One task re-resolves the hostname backends of the current snapshot.
    fn start_resolvers(&self, backends: Vec<Resolve>) {
        let Ok(mut slot) = self.resolvers.lock() else {
            return;
        };
        if let Some(old) = slot.take() {
            old.cancel();
        }
        if backends.is_empty() {
            return;
        }
        let stop = CancellationToken::new();
        *slot = Some(stop.clone());
        tokio::spawn(async move {
            let tick = backends
                .iter()
                .map(|r| r.every)
                .min()
                .unwrap_or(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(tick) => {}
                }
                for r in &backends {
                    resolve_into(r).await;
                }
            }
        });
    }
}

/// What applying `pools` would refuse (certificate files that do not load), found
/// without starting anything: `raftlb check` runs it.
pub fn check_pools(pools: &BTreeMap<String, schema::Pool>) -> Vec<String> {
    let mut errors = Vec::new();
    for (name, pool) in pools {
        if let Some(check) = pool
            .health_check
            .as_ref()
            .filter(|c| c.value.kind != schema::CheckKind::Tcp)
            && let Err(e) = tls::client_config(check.value.tls.as_ref(), false)
        {
            errors.push(format!("pools.{name}.health_check.tls: {e}"));
        }
        if let Some(t) = &pool.backend_tls
            && let Err(e) = tls::client_config(Some(&t.value), true)
        {
            errors.push(format!("pools.{name}.backend_tls: {e}"));
        }
    }
    errors
}

/// Whether this replica can build a committed pool: `refuse` (its listeners) has no
/// reason against it and its certificate files load.
fn buildable(
    name: &str,
    pool: &schema::Pool,
    refuse: &impl Fn(&str, &schema::Pool) -> Option<String>,
) -> Result<(), String> {
    refuse(name, pool).map_or(Ok(()), Err)?;
    probe_tls(name, pool.health_check.as_ref().map(|c| &c.value))?;
    backend_tls(name, pool).map(|_| ())
}

fn probe_tls(
    pool: &str,
    check: Option<&HealthCheck>,
) -> Result<Option<Arc<Reloading<ClientConfig>>>, String> {
    let Some(check) = check.filter(|c| c.kind != schema::CheckKind::Tcp) else {
        return Ok(None);
    };
    let settings = check.tls.clone();
    let files = settings
        .as_ref()
        .map(tls::files_of_backend)
        .unwrap_or_default();
    let build = move || tls::client_config(settings.as_ref(), false);
    Reloading::new(format!("pools.{pool}.health_check.tls"), files, build)
        .map(|r| Some(Arc::new(r)))
        .map_err(|e| format!("pools.{pool}.health_check.tls: {e}"))
}

fn backend_tls(pool_name: &str, pool: &schema::Pool) -> Result<Option<BackendTlsContext>, String> {
    let Some(settings) = pool.backend_tls.as_ref().map(|t| t.value.clone()) else {
        return Ok(None);
    };
    let for_build = settings.clone();
    let build = move || tls::client_config(Some(&for_build), true);
    let config = Reloading::new(
        format!("pools.{pool_name}.backend_tls"),
        tls::files_of_backend(&settings),
        build,
    )
    .map_err(|e| format!("pools.{pool_name}.backend_tls: {e}"))?;
    Ok(Some(BackendTlsContext {
        settings,
        config: Arc::new(config),
    }))
}

/// A hostname backend to resolve, and where its addresses go.
struct Resolve {
    address: HostPort,
    state: Arc<BackendState>,
    every: Duration,
    pool: String,
    backend: String,
    /// With probes, the probes say when it is up; without, its first resolution does.
    probed: bool,
}

/// Resolves a hostname backend; on failure it keeps its last addresses (logged). An
/// unprobed backend is `unknown` until its name first resolves, then up.
async fn resolve_into(r: &Resolve) {
    let (address, state) = (&r.address, &r.state);
    let HostPort::Name(host, port) = address else {
        return;
    };
    let lookup = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((host.as_str(), *port)),
    )
    .await;
    match lookup {
        Ok(Ok(found)) => {
            let mut addrs: Vec<SocketAddr> = found.collect();
            addrs.sort();
            addrs.dedup();
            if addrs.is_empty() {
                tracing::warn!(backend = %address, "hostname resolved to no address; keeping the last ones");
            } else if **state.addrs.load() != addrs {
                tracing::info!(backend = %address, ?addrs, "hostname resolved");
                state.addrs.store(Arc::new(addrs));
            }
            if !r.probed && state.health() == Health::Unknown && !state.addrs.load().is_empty() {
                state.set_health(Health::Up);
                let labels = [("pool", r.pool.clone()), ("backend", r.backend.clone())];
                metrics::gauge!(m::BACKEND_UP, &labels).set(1.0);
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(backend = %address, error = %e, "hostname does not resolve; keeping the last addresses")
        }
        Err(_) => {
            tracing::warn!(backend = %address, "hostname lookup timed out; keeping the last addresses")
        }
    }
}

/// `backend_up` and `backend_drained` for every backend, every counter of a backend
/// at 0 from the start; every series of a removed backend leaves `/metrics`.
fn publish_backend_gauges(old: &Snapshot, new: &Snapshot) {
    for (pool, p) in &old.pools {
        for b in &p.backends {
            let gone = new
                .pools
                .get(pool)
                .is_none_or(|np| np.backends.iter().all(|nb| nb.name != b.name));
            if gone {
                m::retire_backend(pool, &b.name);
            }
        }
    }
    for (pool, p) in &new.pools {
        for b in &p.backends {
            m::revive_backend(pool, &b.name);
            m::zero_connection_series(pool, &b.name);
            if p.health_check.is_some() {
                for result in ["ok", "fail", "timeout"] {
                    metrics::counter!(m::HEALTH_CHECKS_TOTAL, "pool" => pool.clone(), "backend" => b.name.to_string(), "result" => result).increment(0);
                }
            }
            let labels = [("pool", pool.clone()), ("backend", b.name.to_string())];
            let up = b.state.health() == Health::Up;
            metrics::gauge!(m::BACKEND_UP, &labels).set(if up { 1.0 } else { 0.0 });
            metrics::gauge!(m::BACKEND_DRAINED, &labels).set(if b.drained { 1.0 } else { 0.0 });
        }
    }
}

/// Backends with the given weights, all up, on made-up addresses (unit tests).
#[cfg(test)]
pub fn test_backends(weights: &[u32]) -> Vec<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            let addr = SocketAddr::from(([10, 0, 0, i as u8 + 1], 6443));
            let state = Arc::new(BackendState::new(Health::Up, &CancellationToken::new()));
            state.addrs.store(Arc::new(vec![addr]));
            Backend {
                name: format!("b{i}").into(),
                address: HostPort::Ip(addr),
                weight,
                drained: false,
                state,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hard stop (the balancer's stop token) ends every relay through the
    /// backend's down token alone, also after `close_connections` replaced it; and
    /// closing one backend's connections leaves the stop token and the others alone.
    #[test]
    fn the_stop_token_cancels_every_down_token() {
        let balancer = Balancer::new();
        let a = BackendState::new(Health::Up, &balancer.stop);
        let b = BackendState::new(Health::Up, &balancer.stop);
        let first = a.down_token();
        a.close_connections();
        assert!(
            first.is_cancelled(),
            "close_connections cancels the old token"
        );
        let second = a.down_token();
        let other = b.down_token();
        assert!(!second.is_cancelled() && !other.is_cancelled());
        assert!(!balancer.stop_token().is_cancelled());
        balancer.stop_token().cancel();
        assert!(
            second.is_cancelled(),
            "the replacement token is a child too"
        );
        assert!(other.is_cancelled());
    }

    /// A pool the replica refuses (its listeners) keeps its previous version, and
    /// the others apply at the store's version.
    #[tokio::test]
    async fn a_refused_pool_keeps_its_previous_version() {
        let pools = |weight: u32| {
            crate::config::parse_pools(
                &format!(
                    "pools:\n  a: {{ backends: [{{ name: a1, address: 127.0.0.1:1, weight: {weight} }}] }}\n  \
                     b: {{ backends: [{{ name: b1, address: 127.0.0.1:2, weight: {weight} }}] }}\n"
                ),
                "test",
            )
            .expect("pools")
        };
        let weight = |b: &Balancer, pool: &str| b.snapshot().pools[pool].backends[0].weight;
        let balancer = Balancer::new();
        assert!(
            balancer
                .apply_replicated(&pools(1), 1, |_, _| None)
                .await
                .is_empty()
        );
        let failures = balancer
            .apply_replicated(&pools(5), 2, |name, _| {
                (name == "a").then(|| format!("pools.{name}: refused here"))
            })
            .await;
        assert_eq!(failures, vec!["pools.a: refused here".to_string()]);
        assert_eq!(balancer.snapshot().version, 2);
        assert_eq!(
            weight(&balancer, "a"),
            1,
            "the refused pool stays as it was"
        );
        assert_eq!(weight(&balancer, "b"), 5);
    }
}
