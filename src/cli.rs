//! The command line (clap derive): `raftlb run | check | demo`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
    },
    /// A self-contained local showcase: backends, raftlb and a client loop on loopback.
    Demo(DemoArgs),
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
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How many client connections the demo makes, in all.
    #[arg(long, default_value_t = 300)]
    pub requests: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
