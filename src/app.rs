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
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balancer::Balancer;
use crate::cli::{LogFormat, RunArgs};
use crate::config::{self, Config, Loaded};
use crate::metrics as m;
use crate::proxy::listener::{self, Listener, Settings, Shared};
use crate::store::Node;

/// Exit codes (SPEC.md): 0 ok, 1 runtime failure, 2 usage or invalid config.
pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;

/// What the admin API reads.
pub struct State {
    pub node_name: String,
    pub balancer: Arc<Balancer>,
    pub metrics: PrometheusHandle,
    /// The Raft replica, in cluster mode.
    pub cluster: Option<Arc<Node>>,
    /// Committed pools this replica could not apply, one line each (shown in status).
    pub apply_errors: std::sync::Mutex<Vec<String>>,
    ready: AtomicBool,
    token: ArcSwapOption<String>,
}

impl State {
    /// Serving traffic on the listeners (standalone: the config is loaded and bound).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn token(&self) -> Option<Arc<String>> {
        self.token.load_full()
    }

    pub fn config_version(&self) -> u64 {
        self.balancer.snapshot().version
    }
}

/// Entry point of `raftlb run`.
pub fn run(args: RunArgs) -> ExitCode {
    if let Err(e) = init_logging(&args.log_level, args.log_format) {
        eprintln!("error: --log-level {:?}: {e}", args.log_level);
        return ExitCode::from(EXIT_CONFIG);
    }
    let open_files = raise_open_files_limit();
    let loaded = match config::load(&args.config, open_files) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for w in loaded.warning_lines() {
        tracing::warn!("{w}");
    }
    if let Err(e) = supported(&loaded.config) {
        eprintln!("error: {}: {e}", args.config.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    let token = match read_token(&loaded.config) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
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
    let code = runtime.block_on(Server::start(loaded, open_files, token));
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
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| e.to_string())
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
    if let Some(cluster) = &config.cluster {
        if config.leader_election.as_ref().is_none_or(|le| le.enabled) {
            missing.push(
                "leader election (on by default in cluster mode); set leader_election.enabled: false \
                 so that every replica serves"
                    .to_string(),
            );
        }
        if cluster.store.value != config::schema::StoreKind::Embedded {
            missing.push("cluster.store: etcd; use store: embedded".to_string());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "not supported by this build yet: {}",
            missing.join("; ")
        ))
    }
}

/// `admin.tls`: the admin API over HTTPS.
fn admin_tls(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let Some(tls) = &config.admin.tls else {
        return Ok(None);
    };
    let terminate = config::schema::Terminate {
        cert: tls.value.cert.clone(),
        key: tls.value.key.clone(),
        client_ca: None,
    };
    let server = crate::tls::server_config(&terminate, &[b"http/1.1".to_vec()])
        .map_err(|e| format!("admin.tls: {e}"))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
}

fn read_token(config: &Config) -> Result<Option<Arc<String>>, String> {
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("admin.token_file {}: cannot read it: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "admin.token_file {}: the file is empty: write the token into it",
            path.display()
        ));
    }
    Ok(Some(Arc::new(token.to_string())))
}

fn reload_failed(e: &str) {
    tracing::error!("reload: {e}; keeping the running config");
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

/// A running standalone replica.
struct Server {
    file: PathBuf,
    open_files: u64,
    config: Config,
    state: Arc<State>,
    shared: Shared,
    listeners: BTreeMap<String, (SocketAddr, Listener)>,
    stop_admin: CancellationToken,
}

impl Server {
    async fn start(loaded: Loaded, open_files: u64, token: Option<Arc<String>>) -> ExitCode {
        let metrics = m::install();
        let balancer = Arc::new(Balancer::new());
        let cluster = match &loaded.config.cluster {
            Some(c) => match Node::start(c, &loaded.config.pools).await {
                Ok(node) => Some(node),
                Err(fatal) => {
                    eprintln!("error: {}", fatal.message);
                    return ExitCode::from(fatal.code);
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
        let state = Arc::new(State {
            node_name: loaded
                .config
                .node
                .name
                .clone()
                .unwrap_or_else(config::hostname),
            balancer: balancer.clone(),
            metrics,
            cluster: cluster.clone(),
            apply_errors: std::sync::Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            token: ArcSwapOption::new(token),
        });
        let admin_bind = loaded.config.admin.bind.0;
        let admin = match listener::bind(admin_bind) {
            Ok(socket) => socket,
            Err(e) => {
                tracing::error!("admin.bind {admin_bind}: cannot listen: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
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

        let mut server = Server {
            file: loaded.file,
            open_files,
            config: loaded.config,
            state,
            shared: Shared {
                balancer,
                connections: TaskTracker::new(),
                hard_stop: CancellationToken::new(),
            },
            listeners: BTreeMap::new(),
            stop_admin,
        };
        let listeners = server.config.listeners.clone();
        for (name, l) in &listeners {
            if let Err(e) = server.start_listener(name, l) {
                tracing::error!("{e}");
                return ExitCode::from(e.exit_code());
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
                tracing::info!(node = %server.state.node_name, node_id = node.id, "raftlb is serving (cluster, leader election off)");
            }
        }
        let fatal = cluster.as_ref().map(|n| n.fatal());
        server.serve_until_signal(term, int, hup, fatal).await
    }

    fn start_listener(
        &mut self,
        name: &str,
        l: &config::schema::Listener,
    ) -> Result<(), StartError> {
        let settings = Settings::from_config(name, l).map_err(StartError::Config)?;
        let socket = listener::bind(l.bind.0).map_err(|e| {
            StartError::Runtime(format!(
                "listeners.{name}.bind {}: cannot listen: {e}",
                l.bind
            ))
        })?;
        let running = listener::spawn(name, socket, settings, self.shared.clone())
            .map_err(|e| StartError::Runtime(format!("listeners.{name}: {e}")))?;
        tracing::info!(listener = name, bind = %running.bind, pool = %l.pool.value, "listening");
        if let Some((_, old)) = self.listeners.insert(name.to_string(), (l.bind.0, running)) {
            old.stop();
        }
        Ok(())
    }

    async fn serve_until_signal(
        mut self,
        mut term: Signal,
        mut int: Signal,
        mut hup: Signal,
        fatal: Option<tokio::sync::watch::Receiver<Option<crate::store::Fatal>>>,
    ) -> ExitCode {
        let mut fatal = fatal;
        let code = loop {
            let died = async {
                match &mut fatal {
                    Some(rx) => {
                        let dead = rx
                            .wait_for(Option::is_some)
                            .await
                            .ok()
                            .and_then(|f| f.clone());
                        dead.map_or(EXIT_RUNTIME, |f| f.code)
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => break None,
                _ = int.recv() => break None,
                _ = hup.recv() => self.reload().await,
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

    /// SIGTERM/SIGINT: stop accepting, drain up to shutdown_grace, exit 0; a second signal exits at once.
    async fn shutdown(self, term: &mut Signal, int: &mut Signal) -> ExitCode {
        self.state.ready.store(false, Ordering::Relaxed);
        for (_, l) in self.listeners.values() {
            l.stop();
        }
        let connections = self.shared.connections.clone();
        connections.close();
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
            _ = term.recv() => tracing::warn!("second signal: exiting now"),
            _ = int.recv() => tracing::warn!("second signal: exiting now"),
        }
        self.stop_admin.cancel();
        ExitCode::SUCCESS
    }

    /// SIGHUP: re-read the file and apply it without dropping connections; an invalid
    /// file is logged and the running config kept.
    async fn reload(&mut self) {
        let loaded = config::load(&self.file, self.open_files);
        let loaded = match loaded
            .map_err(|e| e.to_string())
            .and_then(|l| supported(&l.config).map(|()| l))
        {
            Ok(l) => l,
            Err(e) => return reload_failed(&format!("the file is invalid:\n{e}")),
        };
        let token = match read_token(&loaded.config) {
            Ok(token) => token,
            Err(e) => return reload_failed(&e),
        };
        for w in loaded.warning_lines() {
            tracing::warn!("{w}");
        }
        let new = loaded.config;
        // Listener TLS first: a certificate that does not load rejects the whole reload.
        let mut updates = Vec::new();
        for (name, l) in &new.listeners {
            if let Some((bind, _)) = self.listeners.get(name)
                && *bind == l.bind.0
            {
                match Settings::from_config(name, l) {
                    Ok(settings) => updates.push((name.clone(), settings)),
                    Err(e) => return reload_failed(&e),
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
        for (name, settings) in updates {
            if let Some((_, running)) = self.listeners.get(&name) {
                running.update(settings);
            }
        }
        for (name, l) in &new.listeners {
            match self.listeners.get(name) {
                Some((bind, _)) if *bind == l.bind.0 => {}
                _ => {
                    if let Err(e) = self.start_listener(name, l) {
                        tracing::error!(
                            "reload: {e}; the listener keeps its previous address, if any"
                        );
                    }
                }
            }
        }
        self.listeners.retain(|name, (_, running)| {
            let keep = new.listeners.contains_key(name);
            if !keep {
                running.stop();
                tracing::info!(listener = %name, "listener removed; its open connections carry on");
            }
            keep
        });
        if new.admin.bind != self.config.admin.bind {
            tracing::warn!("reload: admin.bind changed; it takes effect at the next restart");
        }
        if new.runtime.worker_threads.as_ref().map(|t| t.value)
            != self.config.runtime.worker_threads.as_ref().map(|t| t.value)
        {
            tracing::warn!(
                "reload: runtime.worker_threads changed; it takes effect at the next restart"
            );
        }
        self.config = new;
        metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "ok").increment(1);
        tracing::info!(config_version = version, "reloaded the config");
    }
}

/// Cluster mode: applies every committed config to the proxy's pools, without
/// dropping established connections. Ready once a config is applied.
async fn follow_store(node: Arc<Node>, state: Arc<State>) {
    let mut applied = node.applied();
    let mut version = 0;
    loop {
        let current = applied.borrow_and_update().clone();
        if current.state.cluster_uuid.is_some() && current.state.config_version != version {
            version = current.state.config_version;
            let failures = state
                .balancer
                .apply_replicated(&current.state.pools, version)
                .await;
            for f in &failures {
                tracing::error!(
                    config_version = version,
                    "cannot apply the committed pool here; keeping its previous version: {f}"
                );
                metrics::counter!(m::CONFIG_APPLY_FAILURES_TOTAL).increment(1);
            }
            if let Ok(mut errors) = state.apply_errors.lock() {
                *errors = failures;
            }
            tracing::info!(config_version = version, "applied the replicated config");
            state.ready.store(true, Ordering::Relaxed);
        }
        tokio::select! {
            () = node.stop.cancelled() => return,
            changed = applied.changed() => if changed.is_err() { return },
        }
    }
}
