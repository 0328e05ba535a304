pub mod vip;
