use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's malloc: tokio allocates each task and each socket
/// registration 128-byte aligned, and glibc leaves a fragment around every aligned
/// block (an idle proxied connection: 2.2-2.4 KiB of RSS with glibc, see the README's
/// Performance section for the figures with mimalloc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    raftlb::main(raftlb::cli::Cli::parse())
}
