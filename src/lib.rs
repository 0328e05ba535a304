//! raftlb: a Layer-4 (TCP/TLS) load balancer for API servers.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod store;
pub mod tls;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Runs one command of the CLI.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => app::run(args),
        Command::Check { config } => check(&config),
        Command::Demo(args) => demo::run(args),
        Command::Ctl(args) => ctl::run(args),
    }
}

/// `raftlb check`: print the effective config, or every error with its place.
fn check(file: &std::path::Path) -> ExitCode {
    let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard);
    match config::load(file, open_files) {
        Ok(loaded) => {
            for w in loaded.warning_lines() {
                eprintln!("warning: {w}");
            }
            print!("{}", config::to_yaml(&loaded.config));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(app::EXIT_CONFIG)
        }
    }
}
