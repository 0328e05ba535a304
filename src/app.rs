//! `raftlb run`: load the config, bind the listeners and the admin API, serve until
//! a signal, reload on SIGHUP, drain on SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balancer::Balancer;
use crate::cli::{EXIT_CONFIG, EXIT_RUNTIME, LogFormat, RunArgs};
use crate::config::schema::Standby;
use crate::config::{self, Config, Loaded, Overrides};
use crate::election::Election;
use crate::election::hooks::Hooks;
use crate::election::lease::{self, Role};
use crate::election::vip::Vip;
use crate::metrics as m;
use crate::proxy::gate::Gate;
use crate::proxy::listener::{self, Listener, Settings, Shared};
use crate::state::State;
use crate::store::Node;

/// The exit code of a replica that cannot start or must stop.
fn exit_code(kind: crate::store::FatalKind) -> u8 {
    match kind {
        crate::store::FatalKind::Config => EXIT_CONFIG,
        crate::store::FatalKind::Runtime => EXIT_RUNTIME,
    }
}

/// Entry point of `raftlb run`.
pub fn run(args: RunArgs) -> ExitCode {
    if let Err(e) = init_logging(&args.log_level, args.log_format) {
        eprintln!("error: --log-level {:?}: {e}", args.log_level);
        return ExitCode::from(EXIT_CONFIG);
    }
    let open_files = raise_open_files_limit();
    let overrides = args.overrides();
    let loaded = match config::load_with(&args.config, open_files, overrides) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for w in loaded.warning_lines(true) {
        tracing::warn!("{w}");
    }
    let threads = loaded
        .config
        .runtime
        .worker_threads
        .as_ref()
        .map_or(1, |t| t.value);
    let runtime = match runtime(Some(threads)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // What `raftlb check` refuses, with the same file:line:column (inside the
    // runtime: a TLS config it builds watches its files on a task).
    let refused = {
        let _entered = runtime.enter();
        preflight(&loaded.config)
    };
    if !refused.is_empty() {
        for e in &refused {
            eprintln!("error: {}", loaded.refusal_line(e));
        }
        return ExitCode::from(EXIT_CONFIG);
    }
    let token = match read_token(&loaded.config) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("error: {}", loaded.refusal_line(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Counts of folded repeated warnings are written once they stop repeating.
    runtime.spawn(async {
        loop {
            tokio::time::sleep(crate::logging::FOLD_WINDOW).await;
            crate::logging::flush();
        }
    });
    let code = runtime.block_on(Server::start(loaded, open_files, overrides, token));
    // Connection tasks still draining at a forced exit are dropped, not awaited.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

/// A tokio runtime: multi-threaded with `threads` workers, or current-thread for
/// `None`. A failure is reported and becomes exit code 1.
pub fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = match threads {
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_current_thread(),
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        ExitCode::from(EXIT_RUNTIME)
    })
}

fn init_logging(level: &str, format: LogFormat) -> Result<(), String> {
    crate::logging::init(level, format)
}

/// Raises the open-files soft limit to the hard limit; returns the limit in force.
fn raise_open_files_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::info!(
                open_files = limit,
                "open-files limit raised to the hard limit"
            );
            limit
        }
        Err(e) => {
            let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
            tracing::warn!(error = %e, open_files = soft, "cannot raise the open-files limit");
            soft
        }
    }
}

/// The parts of the schema this build parses and validates but does not run yet.
pub fn supported(config: &Config) -> Result<(), String> {
    let mut missing = Vec::new();
    if let Some(cluster) = &config.cluster
        && cluster.store.value != config::schema::StoreKind::Embedded
    {
        missing.push("cluster.store: etcd is not supported by this build yet; use store: embedded");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

/// Every refusal `raftlb run` makes short of binding ports and opening the store,
/// one line each: `raftlb check` prints them (a config that check passes, run takes).
pub fn preflight(config: &Config) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };
    note(supported(config));
    note(read_token(config).map(drop));
    note(admin_tls(config).map(drop));
    for (name, l) in &config.listeners {
        note(Settings::from_config(name, l).map(drop));
    }
    if let Some(vip) = config
        .leader_election
        .as_ref()
        .and_then(|le| le.vip.as_ref())
    {
        note(
            Vip::from_config(vip)
                .map(drop)
                .map_err(|e| format!("leader_election.vip: {e}")),
        );
    }
    if let Some(t) = config.cluster.as_ref().and_then(|c| c.tls.as_ref()) {
        note(crate::store::network::Tls::load(t).map(drop));
    }
    // In cluster mode the file's pools only seed a new cluster, and a replica
    // refuses at run time only the replicated pools it cannot build.
    if config.cluster.is_none() {
        errors.extend(crate::balancer::check_pools(&config.pools));
    }
    errors
}

/// `admin.tls`: the admin API over HTTPS.
/// `admin.tls`: the server config, reloaded when its files change (as a
/// terminating listener's).
fn admin_tls(
    config: &Config,
) -> Result<Option<crate::tls::Reloading<tokio_rustls::rustls::ServerConfig>>, String> {
    let Some(tls) = &config.admin.tls else {
        return Ok(None);
    };
    let terminate = config::schema::Terminate {
        cert: tls.value.cert.clone(),
        key: tls.value.key.clone(),
        client_ca: None,
    };
    let files = crate::tls::files_of_terminate(&terminate);
    let build = move || crate::tls::server_config(&terminate, &[b"http/1.1".to_vec()]);
    crate::tls::Reloading::new("admin.tls".to_string(), files, build)
        .map(Some)
        .map_err(|e| format!("admin.tls: {e}"))
}

fn read_token(config: &Config) -> Result<Option<Arc<String>>, String> {
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("admin.token_file: {}: cannot read it: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "admin.token_file: {}: the file is empty: write the token into it",
            path.display()
        ));
    }
    Ok(Some(Arc::new(token.to_string())))
}

fn reload_failed(e: &str) {
    // One line per event: several errors are joined, not put on lines of their own.
    let e = e.trim().replace('\n', "; ");
    tracing::error!(
        reload = "refused",
        "reload: {e}; keeping the running config"
    );
    metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "invalid").increment(1);
}

/// Why a listener did not start: its config (exit 2) or the system (exit 1).
enum StartError {
    Config(String),
    Runtime(String),
}

impl StartError {
    fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) => EXIT_CONFIG,
            StartError::Runtime(_) => EXIT_RUNTIME,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) | StartError::Runtime(e) => f.write_str(e),
        }
    }
}

/// A running replica.
struct Server {
    file: PathBuf,
    open_files: u64,
    overrides: Overrides,
    config: Config,
    state: Arc<State>,
    shared: Shared,
    listeners: BTreeMap<String, (SocketAddr, Listener)>,
    /// Each listener's open connections, by name, kept while it is closed or moves:
    /// its connections carry on and still count against its max_connections.
    open: BTreeMap<String, Arc<std::sync::atomic::AtomicU32>>,
    /// The gate the election opens while active (the listeners' gate unless
    /// standbys serve).
    lease_gate: Gate,
    stop_admin: CancellationToken,
}

/// The election's timing from the config.
fn election_settings(le: &config::schema::LeaderElection) -> lease::Settings {
    lease::Settings {
        lease_duration: le.lease_duration.value.get(),
        renew_deadline: le.renew_deadline.value.get(),
        retry_period: le.retry_period.value.get(),
    }
}

/// The leader-election settings the peers compare (election off: zeros).
fn lease_settings(config: &Config) -> crate::store::LeaseSettings {
    let ms = |d: &config::types::Dur| crate::clock::millis(d.get());
    elected(config).map_or_else(Default::default, |le| crate::store::LeaseSettings {
        enabled: true,
        lease_duration_ms: ms(&le.lease_duration.value),
        renew_deadline_ms: ms(&le.renew_deadline.value),
        retry_period_ms: ms(&le.retry_period.value),
        standby_serves: Some(le.standby == Standby::Serve),
    })
}

/// Whether every replica accepts under `config`, whatever its role: election off,
/// or `standby: serve`.
fn every_replica_serves(config: &Config) -> bool {
    elected(config).is_none_or(|le| le.standby == Standby::Serve)
}

/// `leader_election` when it is in force: cluster mode and `enabled`.
fn elected(config: &Config) -> Option<&config::schema::LeaderElection> {
    config
        .leader_election
        .as_ref()
        .filter(|le| le.enabled && config.cluster.is_some())
}

impl Server {
    async fn start(
        loaded: Loaded,
        open_files: u64,
        overrides: Overrides,
        token: Option<Arc<String>>,
    ) -> ExitCode {
        let metrics = m::install();
        tokio::spawn(m::upkeep(metrics.clone()));
        // The admin port before the store: a port in use fails before data_dir is touched.
        let admin_bind = loaded.config.admin.bind.0;
        let admin = match crate::net::listen(admin_bind) {
            Ok(socket) => socket,
            Err(e) => {
                eprintln!("error: admin.bind {admin_bind}: cannot listen: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let balancer = Arc::new(Balancer::new());
        tokio::spawn(crate::health::follow(balancer.clone()));
        let node_name = loaded
            .config
            .node
            .name
            .clone()
            .unwrap_or_else(config::hostname);
        let cluster = match &loaded.config.cluster {
            Some(c) => match Node::start(
                c,
                &node_name,
                &loaded.config.pools,
                lease_settings(&loaded.config),
            )
            .await
            {
                Ok(node) => Some(node),
                Err(fatal) => {
                    eprintln!("error: {}", fatal.message);
                    return ExitCode::from(exit_code(fatal.kind));
                }
            },
            None => {
                if let Err(e) = balancer.apply(&loaded.config.pools).await {
                    eprintln!("error: {}: {e}", loaded.file.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
                None
            }
        };
        let le = elected(&loaded.config);
        // Without election (or with standbys serving) the gate stays open; with it,
        // it is open only until the active's lease deadline.
        let gate = match le {
            Some(_) => Gate::closed(),
            None => Gate::always(),
        };
        let election = match (le, &cluster) {
            (Some(le), Some(node)) => {
                let vip = match le.vip.as_ref().map(Vip::from_config).transpose() {
                    Ok(vip) => vip,
                    Err(e) => {
                        eprintln!("error: leader_election.vip: {e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
                Some(Election::start(
                    node.clone(),
                    node_name.clone(),
                    election_settings(le),
                    gate.clone(),
                    vip,
                    Hooks::from_config(le),
                ))
            }
            _ => None,
        };
        let standby_serves = every_replica_serves(&loaded.config);
        let lease_gate = gate.clone();
        let gate = if standby_serves { Gate::always() } else { gate };
        let state = Arc::new(State {
            node_name,
            balancer: balancer.clone(),
            metrics,
            cluster: cluster.clone(),
            apply_errors: std::sync::Mutex::new(Vec::new()),
            election: ArcSwapOption::new(election.map(Arc::new)),
            standby_serves: AtomicBool::new(standby_serves),
            ready: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            listener_pools: std::sync::Mutex::default(),
            token: ArcSwapOption::new(token),
            listeners_changed: tokio::sync::Notify::new(),
        });
        state.set_listener_pools(&loaded.config);
        let admin_tls = match admin_tls(&loaded.config) {
            Ok(tls) => tls,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let stop_admin = CancellationToken::new();
        tokio::spawn(crate::admin::serve(
            admin,
            admin_tls,
            state.clone(),
            stop_admin.clone(),
        ));
        tracing::info!(bind = %admin_bind, "admin API listening");

        // The balancer's stop token: cancelling it ends every relay, since each
        // backend's down token is its child.
        let hard_stop = balancer.stop_token();
        let mut server = Server {
            file: loaded.file,
            open_files,
            overrides,
            config: loaded.config,
            state,
            shared: Shared {
                balancer,
                gate,
                connections: TaskTracker::new(),
                hard_stop,
            },
            listeners: BTreeMap::new(),
            open: BTreeMap::new(),
            lease_gate,
            stop_admin,
        };
        if server.accepts_now() {
            let listeners = server.config.listeners.clone();
            for (name, l) in &listeners {
                if let Err(e) = server.start_listener(name, l, None).await {
                    eprintln!("error: {e}");
                    return ExitCode::from(e.exit_code());
                }
            }
        }
        // Handlers first: a SIGHUP or SIGTERM sent as soon as /readyz says 200 must not
        // meet the default action, which kills the process.
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        let (Ok(term), Ok(int), Ok(hup)) = signals else {
            tracing::error!("cannot install signal handlers");
            return ExitCode::from(EXIT_RUNTIME);
        };
        match &cluster {
            None => {
                server.state.ready.store(true, Ordering::Relaxed);
                tracing::info!(node = %server.state.node_name, "raftlb is serving (standalone)");
            }
            Some(node) => {
                tokio::spawn(follow_store(node.clone(), server.state.clone()));
                let mode = match (server.state.election(), standby_serves) {
                    (None, _) => "leader election off: every replica serves",
                    (Some(_), true) => "leader election on, standbys serve",
                    (Some(_), false) => "leader election on, only the active serves",
                };
                tracing::info!(
                    node = %server.state.node_name,
                    node_id = node.id,
                    "raftlb is running (cluster, {mode}); it serves once it has applied the replicated config"
                );
            }
        }
        let fatal = cluster.as_ref().map(|n| n.fatal());
        server.serve_until_signal(term, int, hup, fatal).await
    }

    /// Whether the listeners should be open now: always without election or with
    /// `standby: serve`, else only while active.
    fn accepts_now(&self) -> bool {
        self.state.standby_serves.load(Ordering::Relaxed) || self.state.role() == Role::Active
    }

    /// Whether this replica accepts once `new` is applied, whatever its role: it
    /// does now, or `new` has every replica serve (`standby: serve`, election off).
    fn accepts_after(&self, new: &Config) -> bool {
        self.accepts_now() || every_replica_serves(new)
    }

    /// Opens listener `name` on its address (on `bound`, when the caller listened on
    /// it already), closing the one of that name that runs now, if any.
    async fn start_listener(
        &mut self,
        name: &str,
        l: &config::schema::Listener,
        bound: Option<TcpListener>,
    ) -> Result<(), StartError> {
        let settings = Settings::from_config(name, l).map_err(StartError::Config)?;
        if let Some((_, old)) = self.listeners.remove(name) {
            old.stop().await;
        }
        let socket = match bound {
            Some(socket) => socket,
            None => crate::net::listen_proxied(l.bind.value.0).map_err(|e| {
                StartError::Runtime(format!(
                    "listeners.{name}.bind {}: cannot listen: {e}",
                    l.bind.value
                ))
            })?,
        };
        let open = self.open.entry(name.to_string()).or_default().clone();
        let running = listener::spawn(name, socket, settings, self.shared.clone(), open)
            .map_err(|e| StartError::Runtime(format!("listeners.{name}: {e}")))?;
        tracing::info!(listener = name, bind = %running.bind, pool = %l.pool.value, "listening");
        self.listeners
            .insert(name.to_string(), (l.bind.value.0, running));
        Ok(())
    }

    /// Listener `name` runs now on `addr` (a reload leaves it there).
    fn listens_on(&self, name: &str, addr: SocketAddr) -> bool {
        self.listeners
            .get(name)
            .is_some_and(|(bind, _)| *bind == addr)
    }

    /// The running listeners whose sockets hold `addr` (the same port, and the same
    /// address or a wildcard on either side), which keep another socket off it.
    fn holders_of(&self, addr: SocketAddr) -> Vec<&str> {
        self.listeners
            .iter()
            .filter(|(_, (bind, _))| {
                bind.port() == addr.port()
                    && bind.is_ipv4() == addr.is_ipv4()
                    && (bind.ip() == addr.ip()
                        || bind.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            })
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// A listener that could not open its new address opens its previous one again,
    /// with its previous settings (the running config's). Returns what it listens
    /// with now, if anything: the running config keeps that, so readiness and the
    /// next reload see what is, not what failed.
    async fn listen_as_before(
        &mut self,
        name: &str,
        e: &StartError,
    ) -> Option<config::schema::Listener> {
        let Some(previous) = self.config.listeners.get(name).cloned() else {
            tracing::error!(
                reload = "partly",
                "reload: {e}; the listener is new, so it does not listen"
            );
            return None;
        };
        match self.start_listener(name, &previous, None).await {
            Ok(()) => {
                tracing::error!(
                    "reload: {e}; listener {name} listens on its previous address {} again",
                    previous.bind.value
                );
                Some(previous)
            }
            Err(again) => {
                tracing::error!(
                    "reload: {e}; listener {name} cannot listen on its previous address either: {again}"
                );
                None
            }
        }
    }

    /// Closes every listening socket, returning once they are closed.
    async fn stop_listeners(&mut self) {
        self.state.listening.store(false, Ordering::Relaxed);
        for (_, (_, l)) in std::mem::take(&mut self.listeners) {
            l.stop().await;
        }
    }

    /// Follows the election: an active opens its listeners (rule 7: one that cannot
    /// gives the lease up), a standby with `close_listeners` closes them.
    async fn follow_role(&mut self) {
        let Some(election) = self.state.election() else {
            return;
        };
        if self.state.standby_serves.load(Ordering::Relaxed) {
            return;
        }
        if self.state.role() != Role::Active {
            if !self.listeners.is_empty() {
                self.stop_listeners().await;
                tracing::info!("standby: listeners closed");
            }
            return;
        }
        let listeners = self.config.listeners.clone();
        for (name, l) in &listeners {
            // One whose accept loop closed it (its gate shut at a term's end) opens
            // again: the role may have gone to standby and back in one change.
            if self
                .listeners
                .get(name)
                .is_some_and(|(_, running)| !running.closed())
            {
                continue;
            }
            if let Err(e) = self.start_listener(name, l, None).await {
                tracing::error!("{e}; giving the lease up (fault)");
                self.stop_listeners().await;
                election.fault(e.to_string());
                return;
            }
        }
        self.state.listening.store(true, Ordering::Relaxed);
    }

    async fn serve_until_signal(
        mut self,
        mut term: Signal,
        mut int: Signal,
        mut hup: Signal,
        fatal: Option<tokio::sync::watch::Receiver<Option<crate::store::Fatal>>>,
    ) -> ExitCode {
        let mut fatal = fatal;
        let mut role = self.state.election().map(|e| e.status());
        let code = loop {
            let died = async {
                match &mut fatal {
                    Some(rx) => {
                        let dead = rx
                            .wait_for(Option::is_some)
                            .await
                            .ok()
                            .and_then(|f| f.clone());
                        dead.map_or(EXIT_RUNTIME, |f| exit_code(f.kind))
                    }
                    None => std::future::pending().await,
                }
            };
            let role_changed = async {
                match &mut role {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => break None,
                _ = int.recv() => break None,
                _ = hup.recv() => {
                    let had = role.is_some();
                    self.reload().await;
                    // A reload may have turned election on or off.
                    if self.state.election().is_some() != had {
                        role = self.state.election().map(|e| e.status());
                    }
                }
                () = role_changed => self.follow_role().await,
                code = died => break Some(code),
            }
        };
        let cluster = self.state.cluster.clone();
        let exit = self.shutdown(&mut term, &mut int).await;
        if let Some(node) = cluster {
            node.stop.cancel();
            node.shutdown().await;
        }
        match code {
            Some(code) => ExitCode::from(code),
            None => exit,
        }
    }

    /// SIGTERM/SIGINT, in rule 5's order: stop accepting, release the lease, hand
    /// Raft leadership to another replica, then drain up to shutdown_grace and exit
    /// 0; a second signal exits at once.
    async fn shutdown(mut self, term: &mut Signal, int: &mut Signal) -> ExitCode {
        self.state.ready.store(false, Ordering::Relaxed);
        self.shared.gate.close();
        self.stop_listeners().await;
        // The hooks fired by the release (on_standby) run while connections drain.
        let mut hooks_done: Option<tokio::sync::oneshot::Receiver<()>> = None;
        // A second signal exits at once: nothing after it waits (a hook still
        // running is killed with what it started when the runtime ends).
        let mut hurried = false;
        if let Some(election) = self.state.election() {
            let limit = self.release_limit();
            tokio::select! {
                finished = election.stop(limit) => {
                    hooks_done = Some(finished);
                }
                _ = term.recv() => hurried = true,
                _ = int.recv() => hurried = true,
            }
        }
        if let Some(node) = self.state.cluster.as_ref().filter(|_| !hurried) {
            // A standby takes a released lease within one commit; wait a little
            // longer than a retry for it, then hand Raft leadership to it.
            let wait = elected(&self.config)
                .filter(|_| self.state.election().is_some())
                .map_or(Duration::ZERO, |le| le.retry_period.value.get() * 2);
            node.hand_off_leadership(wait).await;
        }
        let connections = self.shared.connections.clone();
        connections.close();
        if !hurried {
            let grace = self.config.runtime.shutdown_grace.get();
            tracing::info!(
                open = connections.len(),
                ?grace,
                "shutting down: no new connections; draining the open ones"
            );
            tokio::select! {
                () = connections.wait() => tracing::info!("all connections closed"),
                () = tokio::time::sleep(grace) => {
                    tracing::warn!(open = connections.len(), "shutdown_grace is over; closing the remaining connections");
                    self.shared.hard_stop.cancel();
                }
                _ = term.recv() => hurried = true,
                _ = int.recv() => hurried = true,
            }
        }
        // Still running (a value or a closed channel: done, and not awaited again).
        if let Some(mut finished) = hooks_done.filter(|_| !hurried)
            && matches!(
                finished.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            )
        {
            tracing::info!(
                "waiting for the role hooks still queued or running (each is killed after 10 s; a second signal exits now)"
            );
            tokio::select! {
                _ = finished => {}
                _ = term.recv() => hurried = true,
                _ = int.recv() => hurried = true,
            }
        }
        if hurried {
            tracing::warn!("second signal: exiting now, without waiting for connections or hooks");
        }
        self.stop_admin.cancel();
        ExitCode::SUCCESS
    }

    /// How long a release may take: the running renew_deadline.
    fn release_limit(&self) -> Duration {
        elected(&self.config).map_or(Duration::from_secs(10), |le| le.renew_deadline.value.get())
    }

    /// A reload turned election off: release the lease first (rule 8), then every
    /// replica serves, as without election.
    async fn stop_election(&mut self, election: &Election) {
        tracing::info!("reload: leader_election turned off; releasing the lease first");
        // The queued hooks still run; nothing waits for them here.
        drop(election.stop(self.release_limit()).await);
        self.state.election.store(None);
        // Only replicas with election on export it (alerts count them by it).
        m::retire_metric(m::LEADER_ELECTION_IS_ACTIVE);
        self.stop_listeners().await;
        self.state.standby_serves.store(true, Ordering::Relaxed);
        self.lease_gate = Gate::always();
        self.shared.gate = Gate::always();
        tracing::info!("leader election off: every replica serves");
    }

    /// A reload turned election on: this replica starts as a standby (its
    /// listeners close unless standbys serve) and campaigns for the lease.
    async fn start_election(&mut self, le: &config::schema::LeaderElection, vip: Option<Vip>) {
        let Some(node) = self.state.cluster.clone() else {
            return;
        };
        tracing::info!("reload: leader_election turned on; this replica starts as a standby");
        let serves = le.standby == Standby::Serve;
        self.lease_gate = Gate::closed();
        if !serves {
            self.stop_listeners().await;
        }
        self.state.standby_serves.store(serves, Ordering::Relaxed);
        self.shared.gate = if serves {
            Gate::always()
        } else {
            self.lease_gate.clone()
        };
        let election = Election::start(
            node,
            self.state.node_name.clone(),
            election_settings(le),
            self.lease_gate.clone(),
            vip,
            Hooks::from_config(le),
        );
        self.state.election.store(Some(Arc::new(election)));
    }

    /// SIGHUP: re-read the file and apply it without dropping connections; an invalid
    /// file is logged and the running config kept.
    async fn reload(&mut self) {
        let loaded = config::load_with(&self.file, self.open_files, self.overrides);
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => return reload_failed(&format!("the file is invalid: {e}")),
        };
        // What `raftlb check` and a restart would refuse, a reload refuses too, whatever
        // the role: what this build does not support, files named by listeners a
        // standby has not opened, and by the sections that apply at the next restart
        // (admin.tls, cluster.tls).
        let refused = preflight(&loaded.config);
        if !refused.is_empty() {
            let lines: Vec<String> = refused.iter().map(|e| loaded.refusal_line(e)).collect();
            return reload_failed(&format!("the file is invalid: {}", lines.join("; ")));
        }
        let token = match read_token(&loaded.config) {
            Ok(token) => token,
            Err(e) => return reload_failed(&e),
        };
        // Rule 8: turning election on needs a valid VIP before anything changes.
        let enabling = match elected(&loaded.config) {
            Some(le) if self.state.election().is_none() => {
                match le.vip.as_ref().map(Vip::from_config).transpose() {
                    Ok(vip) => Some(vip),
                    Err(e) => return reload_failed(&format!("leader_election.vip: {e}")),
                }
            }
            _ => None,
        };
        for w in loaded.warning_lines(true) {
            tracing::warn!("{w}");
        }
        let new = loaded.config;
        // Listener TLS first: a certificate that does not load rejects the whole reload.
        let mut updates = Vec::new();
        for (name, l) in &new.listeners {
            if self.listens_on(name, l.bind.value.0) {
                match Settings::from_config(name, l) {
                    Ok(settings) => updates.push((name.clone(), settings)),
                    Err(e) => return reload_failed(&e),
                }
            }
        }
        // A listener that moves (or is new) listens on its address before anything
        // changes, so one that cannot refuses the whole reload. One that moves onto an
        // address its own running socket holds (0.0.0.0:443 to 10.0.0.1:443) opens
        // after that socket closes, below.
        let mut opening = BTreeMap::new();
        if self.accepts_after(&new) {
            for (name, l) in &new.listeners {
                let addr = l.bind.value.0;
                if self.listens_on(name, addr) {
                    continue;
                }
                if let Err(e) = Settings::from_config(name, l) {
                    return reload_failed(&e);
                }
                // Held only by sockets this reload closes before it opens this one
                // (the listener's own, or those of listeners it removes): opened then.
                let holders = self.holders_of(addr);
                let closed_first = !holders.is_empty()
                    && holders
                        .iter()
                        .all(|h| *h == name.as_str() || !new.listeners.contains_key(*h));
                match crate::net::listen_proxied(addr) {
                    Ok(socket) => {
                        opening.insert(name.clone(), socket);
                    }
                    Err(_) if closed_first => {}
                    Err(e) => {
                        let others: Vec<&str> = holders
                            .into_iter()
                            .filter(|h| *h != name.as_str())
                            .collect();
                        let hint = if others.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " (listener {} holds it now, and a reload opens new addresses before it closes old ones: free it in one reload, take it in the next)",
                                others.join(", ")
                            )
                        };
                        return reload_failed(&format!(
                            "listeners.{name}.bind {}: cannot listen: {e}{hint}",
                            l.bind.value
                        ));
                    }
                }
            }
        }
        // In cluster mode the pools are the replicated config, not the file's.
        let version = if self.state.cluster.is_some() {
            self.state.config_version()
        } else {
            match self.state.balancer.apply(&new.pools).await {
                Ok(version) => version,
                Err(e) => return reload_failed(&e),
            }
        };
        self.state.token.store(token);
        match (self.state.election(), elected(&new)) {
            (Some(election), None) => self.stop_election(&election).await,
            (None, Some(le)) => {
                let vip = enabling.unwrap_or_default();
                self.start_election(le, vip).await;
            }
            _ => {}
        }
        // Under `serve` the listeners do not follow the lease: leaving it, they stop
        // accepting before any release below (rule 5), not after.
        let leaving_serve = matches!(
            (elected(&self.config), elected(&new)),
            (Some(old), Some(le)) if old.standby == Standby::Serve && le.standby != Standby::Serve
        );
        if leaving_serve && self.state.election().is_some() {
            self.stop_listeners().await;
        }
        if let (Some(election), Some(old), Some(le)) =
            (self.state.election(), elected(&self.config), elected(&new))
        {
            election.set_settings(election_settings(le));
            election.reload_hooks(le);
            let vip_changed =
                serde_json::to_value(&old.vip).ok() != serde_json::to_value(&le.vip).ok();
            if vip_changed {
                match le.vip.as_ref().map(Vip::from_config).transpose() {
                    Ok(vip) => {
                        tracing::info!(
                            "reload: leader_election.vip changed; releasing the lease first"
                        );
                        election.release(None, false).await;
                        election.set_vip(vip);
                    }
                    Err(e) => tracing::error!(
                        reload = "partly",
                        "reload: leader_election.vip: {e}; keeping the VIP"
                    ),
                }
            }
            // Rule 8: a change of what the role owns releases the lease first.
            if old.standby != le.standby {
                tracing::info!(
                    "reload: leader_election.standby changed; releasing the lease first"
                );
                election.release(None, false).await;
                let serves = le.standby == Standby::Serve;
                self.state.standby_serves.store(serves, Ordering::Relaxed);
                self.stop_listeners().await;
                self.shared.gate = if serves {
                    Gate::always()
                } else {
                    self.lease_gate.clone()
                };
            }
        }
        for (name, settings) in updates {
            if let Some((_, running)) = self.listeners.get(&name) {
                running.update(settings);
            }
        }
        let removed: Vec<String> = self
            .listeners
            .keys()
            .filter(|name| !new.listeners.contains_key(*name))
            .cloned()
            .collect();
        for name in removed {
            if let Some((_, running)) = self.listeners.remove(&name) {
                running.stop().await;
                tracing::info!(listener = %name, "listener removed; its open connections carry on");
            }
        }
        // A standby that closes its listeners starts none.
        let mut fell_back = Vec::new();
        if self.accepts_now() {
            for (name, l) in &new.listeners {
                if self.listens_on(name, l.bind.value.0) {
                    continue;
                }
                let bound = opening.remove(name);
                if let Err(e) = self.start_listener(name, l, bound).await {
                    fell_back.push((name.clone(), self.listen_as_before(name, &e).await));
                }
            }
        }
        let mut new = new;
        for (name, now) in fell_back {
            match now {
                Some(previous) => new.listeners.insert(name, previous),
                None => new.listeners.remove(&name),
            };
        }
        for section in restart_only_changes(&self.config, &new) {
            tracing::warn!(
                reload = "ok",
                "reload: {section} changed; it takes effect at the next restart"
            );
        }
        for line in cluster_changes(&self.config, &new) {
            tracing::warn!(reload = "ok", "reload: {line}");
        }
        self.state.set_listener_pools(&new);
        // Committed pools are checked against this replica's listeners again.
        self.state.listeners_changed.notify_one();
        self.config = new;
        if let Some(node) = &self.state.cluster {
            node.set_lease_settings(lease_settings(&self.config));
            node.compare_file_pools(&self.config.pools);
        }
        self.follow_role().await;
        metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "ok").increment(1);
        tracing::info!(config_version = version, "reloaded the config");
    }
}

/// The settings a running process keeps until it restarts, that differ in `new`:
/// the admin server, the worker threads, the node's name and the whole `cluster`
/// section (the Raft store is opened once).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let threads = |c: &Config| c.runtime.worker_threads.as_ref().map(|t| t.value);
    [
        ("admin.bind", old.admin.bind != new.admin.bind),
        (
            "admin.tls",
            !crate::config::same(&old.admin.tls, &new.admin.tls),
        ),
        ("runtime.worker_threads", threads(old) != threads(new)),
        ("node.name", old.node.name != new.node.name),
    ]
    .into_iter()
    .filter_map(|(what, changed)| changed.then_some(what))
    .collect()
}

/// What a reload says about a changed `cluster` section, which applies only at the
/// next start: per key, since some keys there never take effect as edited.
fn cluster_changes(old: &Config, new: &Config) -> Vec<String> {
    use crate::config::same;
    let (Some(o), Some(n)) = (&old.cluster, &new.cluster) else {
        return (!same(&old.cluster, &new.cluster))
            .then(|| {
                "the cluster section was added or removed; it takes effect at the next restart"
                    .to_string()
            })
            .into_iter()
            .collect();
    };
    let mut lines = Vec::new();
    if o.data_dir != n.data_dir {
        lines.push(format!(
            "cluster.data_dir changed; the next start opens {} instead (this one is left as \
             it is)",
            n.data_dir.display()
        ));
    } else {
        let identity = [
            ("cluster_id", same(&o.cluster_id, &n.cluster_id)),
            ("node_id", same(&o.node_id, &n.node_id)),
        ];
        for (key, unchanged) in identity {
            if !unchanged {
                lines.push(format!(
                    "cluster.{key} changed; it takes effect at the next restart, which then \
                     refuses to start (data_dir records the cluster and node it belongs to): \
                     to move a replica, use raftlb ctl member remove and member add"
                ));
            }
        }
    }
    if !same(&o.peers, &n.peers) {
        lines.push(
            "cluster.peers changed; peers are read only to bootstrap a new cluster (and \
             as addresses to ask at start): the membership is what the replicas dial, \
             changed with raftlb ctl member add and member remove"
                .to_string(),
        );
    }
    // The rest (bind, advertise, tls, timing, initial_state) at the next restart.
    let mut rest = o.clone();
    rest.cluster_id = n.cluster_id.clone();
    rest.node_id = n.node_id.clone();
    rest.data_dir = n.data_dir.clone();
    rest.peers = n.peers.clone();
    if !same(&rest, n) {
        lines.push(
            "other cluster settings changed; they take effect at the next restart".to_string(),
        );
    }
    lines
}

/// Cluster mode: applies every committed config to the proxy's pools, without
/// dropping established connections. Ready once a config is applied. A pool this
/// replica cannot build (a certificate file missing here) is tried again once what
/// stops it changes, looked at every [`RETRY_UNBUILT_POOLS`].
async fn follow_store(node: Arc<Node>, state: Arc<State>) {
    let mut applied = node.applied();
    let mut version = 0;
    // A reload changed this replica's listeners, which may now take (or refuse) a
    // committed pool, or what stopped a pool here changed: the same version is
    // applied again.
    let mut again = false;
    // Whether the last apply failed, and what stopped it, as `Balancer::unbuildable`
    // words it (asked just before that apply).
    let mut retrying = false;
    let mut unbuilt = Vec::new();
    let unbuildable = |pools: &BTreeMap<String, config::schema::Pool>| {
        Balancer::unbuildable(pools, |name, pool| state.listeners_refuse(name, pool))
    };
    loop {
        let current = applied.borrow_and_update().clone();
        if current.state.cluster_uuid.is_some()
            && (current.state.config_version != version || std::mem::take(&mut again))
        {
            let retried = current.state.config_version == version;
            version = current.state.config_version;
            // Asked before the apply: a file that appears in between is then seen
            // as a change, and the pool is tried again.
            let seen = unbuildable(&current.state.pools);
            let failures = state
                .balancer
                .apply_replicated(&current.state.pools, version, |name, pool| {
                    state.listeners_refuse(name, pool)
                })
                .await;
            let before = state
                .apply_errors
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default();
            // A new version that fails the same way is logged and counted again.
            for f in failures.iter().filter(|f| !retried || !before.contains(f)) {
                tracing::error!(
                    config_version = version,
                    "cannot apply the committed pool here; keeping the version it had here, if any (tried again when this changes): {f}"
                );
                metrics::counter!(m::CONFIG_APPLY_FAILURES_TOTAL).increment(1);
            }
            if !retried || failures != before {
                tracing::info!(config_version = version, "applied the replicated config");
            }
            retrying = !failures.is_empty();
            unbuilt = seen;
            if let Ok(mut errors) = state.apply_errors.lock() {
                *errors = failures;
            }
            state.ready.store(true, Ordering::Relaxed);
        }
        let look_again = async {
            if !retrying {
                std::future::pending().await
            }
            loop {
                tokio::time::sleep(RETRY_UNBUILT_POOLS).await;
                if unbuildable(&current.state.pools) != unbuilt {
                    return;
                }
            }
        };
        tokio::select! {
            () = node.stop.cancelled() => return,
            changed = applied.changed() => if changed.is_err() { return },
            () = state.listeners_changed.notified() => again = true,
            () = look_again => again = true,
        }
    }
}

/// How often a replica that could not build a committed pool looks whether what
/// stopped it changed (the certificate watcher's period).
const RETRY_UNBUILT_POOLS: Duration = Duration::from_secs(2);
