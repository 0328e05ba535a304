//! Leader election: one active replica, on a lease in the Raft store.

pub mod lease;
