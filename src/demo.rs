//! `raftlb demo`: placeholder until the showcase lands.
use std::process::ExitCode;

pub fn run(_args: crate::cli::DemoArgs) -> ExitCode {
    ExitCode::SUCCESS
}
