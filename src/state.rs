//! What the running process shares with the admin API: the balancer, the Raft
//! replica, the election and this replica's readiness. Below both, so the admin
//! API reads it without importing the process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};

use arc_swap::ArcSwapOption;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::balancer::Balancer;
use crate::config::schema::TlsMode;
use crate::config::{self, Config};
use crate::election::lease::Role;
use crate::election::{Election, Status};
use crate::metrics as m;
use crate::proxy::proxy_protocol;
use crate::store::Node;

/// What the admin API reads.
pub struct State {
    pub node_name: String,
    pub balancer: Arc<Balancer>,
    pub metrics: PrometheusHandle,
    /// The Raft replica, in cluster mode.
    pub cluster: Option<Arc<Node>>,
    /// Committed pools this replica could not apply, one line each (shown in status).
    pub apply_errors: std::sync::Mutex<Vec<String>>,
    /// Leader election, in cluster mode unless `enabled: false` (a reload may turn
    /// it on or off).
    pub(crate) election: ArcSwapOption<Election>,
    /// `standby: serve`: standbys accept too.
    pub(crate) standby_serves: AtomicBool,
    /// A config is applied and the process is not shutting down.
    pub(crate) ready: AtomicBool,
    /// The active's listeners are open (`standby: close_listeners`).
    pub(crate) listening: AtomicBool,
    /// Each listener of the config and its pool: a missing pool is not ready.
    pub(crate) listener_pools: std::sync::Mutex<Vec<ListenerPool>>,
    pub(crate) token: ArcSwapOption<String>,
    /// A reload changed the listeners: cluster mode applies the committed pools
    /// again, since the listeners decide which of them this replica can take.
    pub(crate) listeners_changed: tokio::sync::Notify,
}

impl State {
    /// Serving traffic on the listeners: a config is applied, and this replica is
    /// active (or election is off, or standbys serve).
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_none()
    }

    /// Why this replica does not serve traffic, if it does not.
    pub fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Some("no config applied yet, or shutting down".into());
        }
        let serving = self.standby_serves.load(Ordering::Relaxed)
            || (self.role() == Role::Active && self.listening.load(Ordering::Relaxed));
        if !serving {
            if let Some(why) = self.election_status().and_then(|s| s.fault) {
                return Some(format!(
                    "fault: {why}; it sits out lease_duration, then campaigns again"
                ));
            }
            return Some(format!("{}: only the active serves", self.role().as_str()));
        }
        let snapshot = self.balancer.snapshot();
        let pools = self
            .listener_pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let unapplied = self
            .apply_errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        let missing: Vec<String> = pools
            .iter()
            .filter(|l| !snapshot.pools.contains_key(&l.pool))
            .map(|l| {
                let prefix = format!("pools.{}.", l.pool);
                match unapplied.iter().find(|e| e.starts_with(&prefix)) {
                    Some(why) => format!(
                        "listener {}: pool {} is not applied here: {why}",
                        l.listener, l.pool
                    ),
                    None => format!("listener {}: pool {} does not exist", l.listener, l.pool),
                }
            })
            .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// The config's listeners, and their counters at 0 for every backend of their
    /// pool, whether this replica serves them now or not (a standby's too, so that
    /// `increase()` sees the first connections after a failover); the series of a
    /// listener the config no longer has leave `/metrics`.
    pub(crate) fn set_listener_pools(&self, config: &Config) {
        let mut listeners = self
            .listener_pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in listeners
            .iter()
            .filter(|l| !config.listeners.contains_key(&l.listener))
        {
            m::listener_removed(&gone.listener);
        }
        *listeners = config
            .listeners
            .iter()
            .map(|(name, l)| ListenerPool {
                listener: name.clone(),
                pool: l.pool.value.clone(),
                terminates: l.tls.value == TlsMode::Terminate,
            })
            .collect();
        // Health checks to a pool that gets PROXY headers send one too (the
        // backend may require it), the one of a connection the proxy makes itself.
        let headers = config
            .listeners
            .values()
            .filter_map(|l| {
                let header = proxy_protocol::local_header(l.proxy_protocol.value).ok()??;
                Some((l.pool.value.clone(), Arc::from(header)))
            })
            .collect();
        self.balancer.set_probe_headers(headers);
        let snapshot = self.balancer.snapshot();
        for l in listeners.iter() {
            let backends: Vec<String> = snapshot
                .pools
                .get(&l.pool)
                .map(|p| p.backends.iter().map(|b| b.name.to_string()).collect())
                .unwrap_or_default();
            m::listener_serves(&l.listener, &l.pool, backends.into_iter());
        }
    }

    /// Why this replica's own listeners refuse `pool` (the file's cross-check, for
    /// replicated pools, which are checked without listeners): `backend_tls` behind
    /// a listener that passes TLS through.
    pub fn listeners_refuse(&self, name: &str, pool: &config::schema::Pool) -> Option<String> {
        pool.backend_tls.as_ref()?;
        let listeners = self
            .listener_pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let through = listeners.iter().find(|l| l.pool == name && !l.terminates)?;
        Some(format!(
            "pools.{name}.backend_tls: {} here",
            config::validate::backend_tls_behind_passthrough(&through.listener)
        ))
    }

    /// Why replacing the pools `now` with `new` would take away the pool of one of
    /// this replica's listeners (it would serve nothing), one line each. A pool
    /// missing already is not this write's doing.
    pub fn listeners_left_without(
        &self,
        now: &std::collections::BTreeMap<String, config::schema::Pool>,
        new: &std::collections::BTreeMap<String, config::schema::Pool>,
    ) -> Vec<String> {
        let listeners = self
            .listener_pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        listeners
            .iter()
            .filter(|l| now.contains_key(&l.pool) && !new.contains_key(&l.pool))
            .map(|l| {
                format!(
                    "pools.{}: listeners.{}.pool names it here, and without it the listener serves nothing: point the listener at another pool first (edit the file, reload)",
                    l.pool, l.listener
                )
            })
            .collect()
    }

    /// This replica's role: election's, or active whenever it serves without one.
    pub fn role(&self) -> Role {
        match &*self.election.load() {
            Some(e) => e.status().borrow().role,
            None if self.ready.load(Ordering::Relaxed) => Role::Active,
            None => Role::Standby,
        }
    }

    /// The election's view, when election is on.
    pub fn election_status(&self) -> Option<Status> {
        self.election().map(|e| e.status().borrow().clone())
    }

    /// The running election, if it is on.
    pub fn election(&self) -> Option<Arc<Election>> {
        self.election.load_full()
    }

    pub fn token(&self) -> Option<Arc<String>> {
        self.token.load_full()
    }

    pub fn config_version(&self) -> u64 {
        self.balancer.snapshot().version
    }
}

/// A listener of this replica and the pool it serves.
pub(crate) struct ListenerPool {
    pub(crate) listener: String,
    pub(crate) pool: String,
    /// `tls: terminate`: the only mode a pool with `backend_tls` may sit behind.
    pub(crate) terminates: bool,
}
