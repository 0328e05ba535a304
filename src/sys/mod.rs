//! System calls that std, socket2 and tokio do not wrap. The crate's other
//! modules stay free of `unsafe`; what is here states why each call is sound.
#![allow(unsafe_code)]

pub mod pipe;
pub mod tcp;
