//! The command line (clap derive): `raftlb run | check | demo | ctl | snapshot`, its
//! exit codes, and how a command writes its output.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit codes (SPEC.md): 0 ok, 1 runtime failure, 2 usage or invalid config.
pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;

/// Writes a command's output, then exits with `code`. A reader that stopped early
/// (`| head`) is no error; another failure to write exits 1. (`print!` would panic.)
pub fn write_out(bytes: &[u8], code: ExitCode) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => code,
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Writes `bytes` to `file` through a temporary file and a rename, so a failed
/// write never leaves a half file under the name.
pub fn write_file(file: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    std::fs::write(&part, bytes)
        .and_then(|()| std::fs::rename(&part, file))
        .map_err(|e| {
            let _ = std::fs::remove_file(&part);
            format!("{}: cannot write: {e}", file.display())
        })
}

#[derive(Debug, Parser)]
#[command(
    name = "raftlb",
    version,
    about = "Layer-4 load balancer for API servers, replicated with Raft"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the load balancer.
    Run(RunArgs),
    /// Validate a config file and print the effective config (exit 0, or 2 when invalid).
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Check the file alone, without reading the files it names (certificates,
        /// keys, token): for a config written for another machine.
        #[arg(long)]
        syntax_only: bool,
    },
    /// A self-contained local showcase: backends, raftlb and a client loop on loopback.
    Demo(DemoArgs),
    /// Operate a running raftlb through its admin API.
    Ctl(CtlArgs),
    /// Offline backup and restore of a replica's data_dir (disaster recovery).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Print a shell completion script: `source <(raftlb completions bash)`, or save it
    /// where the shell loads completions from.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Back up a stopped replica's store (for a running one: `raftlb ctl snapshot save`).
    Save {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        file: PathBuf,
    },
    /// Build the data_dir of one member of a NEW cluster from a backup, like
    /// `etcdctl snapshot restore`; run it for every member with the same arguments
    /// but --node-id and --data-dir.
    Restore {
        file: PathBuf,
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[arg(long)]
        node_id: u64,
        /// The new cluster's cluster_id (the config files must say the same).
        #[arg(long)]
        cluster_id: String,
        /// Every member of the new cluster: 1=ADDR,2=ADDR,...
        #[arg(long, value_name = "ID=ADDR,...")]
        initial_cluster: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The admin API of a replica (admin.bind). Several, comma-separated or repeated,
    /// for `ctl endpoint status`.
    #[arg(
        long,
        global = true,
        env = "RAFTLB_SERVER",
        default_value = "http://127.0.0.1:9090",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub server: Vec<String>,
    /// A file holding the admin token (admin.token_file).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The CA that signed the admin API's certificate (https:// servers, admin.tls);
    /// without it the system roots are used.
    #[arg(long, global = true, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Tables for people; json or yaml (the API's answer) for scripts. Anywhere on the line.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Node, role, config version, cluster and lease.
    Status,
    /// Every pool's backends with health, weight, drain state and connections.
    Backends,
    /// Change one backend.
    Backend(BackendArgs),
    /// The Raft members with their roles and reachability (cluster mode).
    Members,
    /// Add, promote or remove a Raft member (cluster mode).
    #[command(subcommand)]
    Member(MemberCommand),
    /// The replicated config (pools) as YAML (cluster mode).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// A consistent backup of the store (cluster mode), like `etcdctl snapshot save`.
    #[command(subcommand)]
    Snapshot(CtlSnapshotCommand),
    /// The active replica (leader election).
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Raft itself.
    #[command(subcommand)]
    Raft(RaftCommand),
    /// Every --server at once, like `etcdctl endpoint status`.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// One row per --server: node, role, Raft term and leader, config_version, errors.
    /// Exit 1 when any of them cannot be read.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum LeaderCommand {
    /// Planned hand-over of the active role, to node ID or to any standby.
    Transfer { id: Option<u64> },
}

#[derive(Debug, Subcommand)]
pub enum RaftCommand {
    /// Move Raft leadership alone to node ID (like `etcdctl move-leader`).
    MoveLeader { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum CtlSnapshotCommand {
    /// Write a checksummed backup of the replicated state to FILE.
    Save { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Add a replica as a learner; it is promoted to voter once caught up unless --learner.
    Add {
        id: u64,
        address: String,
        #[arg(long)]
        learner: bool,
    },
    /// Promote a learner to voter.
    Promote { id: u64 },
    /// Remove a replica (the leader hands leadership over first).
    Remove { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the replicated config (linearizable read).
    Get {
        /// This replica's applied copy, without asking the leader: answers without
        /// a quorum (when recovering), and may lag (etcdctl's --consistency=s).
        #[arg(long)]
        local: bool,
    },
    /// Replace the replicated pools with FILE (YAML with a pools: section).
    Apply {
        file: PathBuf,
        /// Only if the config_version still is this (compare-and-set).
        #[arg(long)]
        if_version: Option<u64>,
    },
}

#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    #[command(subcommand)]
    pub command: BackendCommand,
    /// Only if the config_version still is this (compare-and-set, If-Match).
    #[arg(long, global = true, value_name = "VERSION")]
    pub if_version: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a pool (cluster mode; standalone answers: edit the file).
    Add {
        #[arg(value_parser = plain_name)]
        pool: String,
        #[arg(value_parser = plain_name)]
        name: String,
        address: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Remove a backend (cluster mode; standalone answers: edit the file).
    Remove {
        #[arg(value_parser = plain_name)]
        pool: String,
        #[arg(value_parser = plain_name)]
        name: String,
    },
    /// Stop new connections to a backend; open ones stay.
    Drain {
        #[arg(value_parser = plain_name)]
        pool: String,
        #[arg(value_parser = plain_name)]
        name: String,
    },
    /// Let a drained backend take new connections again.
    Undrain {
        #[arg(value_parser = plain_name)]
        pool: String,
        #[arg(value_parser = plain_name)]
        name: String,
    },
    /// Set a backend's weight (1 to 256): `weight POOL NAME N`, or `--weight N`.
    Weight {
        #[arg(value_parser = plain_name)]
        pool: String,
        #[arg(value_parser = plain_name)]
        name: String,
        #[arg(
            required_unless_present = "weight_flag",
            conflicts_with = "weight_flag"
        )]
        weight: Option<u32>,
        #[arg(long = "weight", id = "weight_flag", value_name = "N")]
        weight_flag: Option<u32>,
    },
}

impl BackendCommand {
    /// The weight that `weight` sets, given as its third argument or as `--weight`.
    pub fn weight(&self) -> Option<u32> {
        match self {
            BackendCommand::Weight {
                weight,
                weight_flag,
                ..
            } => weight.or(*weight_flag),
            _ => None,
        }
    }
}

/// A pool or backend name as the config allows it, checked before it goes into a
/// URL path: `b1?x` would otherwise name backend `b1` and change it.
fn plain_name(s: &str) -> Result<String, String> {
    if crate::config::validate::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "not a pool or backend name: {}",
            crate::config::validate::NAME_RULE
        ))
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "/etc/raftlb/raftlb.yaml"
    )]
    pub config: PathBuf,
    /// Log level (error, warn, info, debug, trace) or a tracing filter directive.
    #[arg(long, default_value = "info", env = "RAFTLB_LOG")]
    pub log_level: String,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Leader election on or off (overrides leader_election.enabled; cluster mode).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: Option<bool>,
    /// How long a standby waits before it may take the lease (leader_election.lease_duration).
    #[arg(long, value_name = "DURATION")]
    pub leader_elect_lease_duration: Option<crate::config::types::Dur>,
    /// How long the active keeps trying to renew before it stops (leader_election.renew_deadline).
    #[arg(long, value_name = "DURATION")]
    pub leader_elect_renew_deadline: Option<crate::config::types::Dur>,
    /// The wait between attempts to acquire or renew (leader_election.retry_period).
    #[arg(long, value_name = "DURATION")]
    pub leader_elect_retry_period: Option<crate::config::types::Dur>,
}

impl RunArgs {
    /// The `--leader-elect*` flags, which override the file.
    pub fn overrides(&self) -> crate::config::Overrides {
        crate::config::Overrides {
            leader_elect: self.leader_elect,
            lease_duration: self.leader_elect_lease_duration,
            renew_deadline: self.leader_elect_renew_deadline,
            retry_period: self.leader_elect_retry_period,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Client connections of the first part before and after a backend leaves (more
    /// are made while its /readyz fails, until raftlb takes it out).
    #[arg(long, default_value_t = 300)]
    pub requests: u32,
    /// Keep the cluster running at the end (its status pages stay up) until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
