//! raftlb: a Layer-4 (TCP/TLS) load balancer for API servers.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balancer;
pub mod cli;
pub mod clock;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod election;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod state;
pub mod store;
pub mod sys;
pub mod tls;

use std::process::ExitCode;

use cli::{Cli, Command, write_file, write_out};

/// Runs one command of the CLI.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => app::run(args),
        Command::Check {
            config,
            syntax_only,
        } => check(&config, syntax_only),
        Command::Demo(args) => demo::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Snapshot(cmd) => snapshot(cmd),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "raftlb", &mut script);
            write_out(&script, ExitCode::SUCCESS)
        }
    }
}

/// `raftlb snapshot save | restore`: offline, on a stopped replica's data_dir. Bad
/// arguments or a file that is not a backup exit 2; a failing disk exits 1.
fn snapshot(cmd: cli::SnapshotCommand) -> ExitCode {
    use store::backup::{self, BackupError};
    let result: Result<String, BackupError> = match cmd {
        cli::SnapshotCommand::Save { data_dir, file } => {
            backup::save_offline(&data_dir).and_then(|b| {
                let bytes = b.encode().map_err(|e| BackupError::Io(e.to_string()))?;
                write_file(&file, &bytes).map_err(BackupError::Io)?;
                Ok(format!("saved {}: {}", file.display(), b.summary()))
            })
        }
        cli::SnapshotCommand::Restore {
            file,
            data_dir,
            node_id,
            cluster_id,
            initial_cluster,
        } => std::fs::read(&file)
            .map_err(|e| {
                // A file that is not there is the operator's input, as a corrupt one is.
                let message = format!("{}: {e}", file.display());
                if e.kind() == std::io::ErrorKind::NotFound {
                    BackupError::Input(message)
                } else {
                    BackupError::Io(message)
                }
            })
            .and_then(|bytes| {
                let members = backup::parse_initial_cluster(&initial_cluster)?;
                backup::restore(&bytes, &data_dir, node_id, &cluster_id, &members).map_err(|e| {
                    match e {
                        BackupError::Input(m) => {
                            BackupError::Input(format!("{}: {m}", file.display()))
                        }
                        io => io,
                    }
                })
            })
            .map(|r| {
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
                format!(
                    "restored node {node_id} of cluster {cluster_id} (uuid {}) into {}: {}; \
                     start every member with initial_state: new and these peers",
                    r.uuid,
                    data_dir.display(),
                    r.backup.summary()
                )
            }),
    };
    match result {
        Ok(line) => write_out(format!("{line}\n").as_bytes(), ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                BackupError::Input(_) => cli::EXIT_CONFIG,
                BackupError::Io(_) => cli::EXIT_RUNTIME,
            })
        }
    }
}

/// [`app::preflight`] from `check`: what it builds (a TLS config's file watcher)
/// expects a runtime, here one that never runs a task and is dropped after.
fn preflight_outside_run(config: &config::Config) -> Vec<String> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            let _entered = runtime.enter();
            app::preflight(config)
        }
        Err(e) => vec![format!("cannot start the runtime to check the files: {e}")],
    }
}

/// `raftlb check`: print the effective config, or every error with its place.
fn check(file: &std::path::Path, syntax_only: bool) -> ExitCode {
    let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard);
    match config::load(file, open_files) {
        Ok(loaded) => {
            for w in loaded.warning_lines(!syntax_only) {
                eprintln!("warning: {w}");
            }
            // What `run` would refuse beyond the file itself (files it names that
            // do not load, ...).
            let refused = match syntax_only {
                true => Vec::new(),
                false => preflight_outside_run(&loaded.config),
            };
            if !refused.is_empty() {
                for e in &refused {
                    eprintln!("error: {}", loaded.refusal_line(e));
                }
                return ExitCode::from(cli::EXIT_CONFIG);
            }
            write_out(
                config::to_yaml(&loaded.config).as_bytes(),
                ExitCode::SUCCESS,
            )
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(cli::EXIT_CONFIG)
        }
    }
}
