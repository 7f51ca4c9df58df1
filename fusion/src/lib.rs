//! The fusion engine of `nt`: architectures, checkpoints and Neuron
//! Transplantation. No networking; the server, worker and client are shells
//! around this crate.

pub mod arch;
pub mod assemble;
pub mod checkpoint;
pub mod coupling;
pub mod data;
pub mod device;
mod error;
pub mod guard;
pub mod methods;
pub mod model;
mod parallel;
pub mod state;
pub mod train;
pub mod transplant;

pub use error::{FusionError, Result};
pub use methods::{fuse, FuseOptions, FuseReport, Fused, Method};
