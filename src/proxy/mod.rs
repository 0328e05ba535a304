//! The data path: listeners accept, pick a backend, and relay bytes untouched.

pub mod gate;
pub mod listener;
pub mod proxy_protocol;
pub mod relay;
