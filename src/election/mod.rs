pub mod hooks;
pub mod vip;
