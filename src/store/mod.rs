//! The embedded Raft store (openraft + redb): replicated pools, membership, records.

pub mod storage;
pub mod types;
