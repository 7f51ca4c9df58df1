//! The fusion engine of `nt`: architectures, checkpoints and Neuron
//! Transplantation. No networking; the server, worker and client are shells
//! around this crate.

pub mod arch;
mod error;
pub mod state;

pub use error::{FusionError, Result};
