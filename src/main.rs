use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    raftlb::main(raftlb::cli::Cli::parse())
}
