//! Test and benchmark support: a real nt cluster on 127.0.0.1.

pub mod cluster;
pub mod proxy;
