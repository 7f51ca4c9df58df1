//! The fusion math of `nt`: architectures and their coupling, checkpoints,
//! assembly, Neuron Transplantation and the other fusion methods, all on
//! host tensors. No libtorch and no networking: the torch runtime
//! (`nt-runtime`) runs models and plugs its exactness guard in through
//! [`check::StepCheck`]; the server, worker and client are shells around both.

pub mod arch;
pub mod assemble;
pub mod assignment;
pub mod check;
pub mod checkpoint;
pub mod coupling;
mod error;
pub mod heap;
pub mod methods;
pub mod ot;
mod parallel;
pub mod state;
pub mod transplant;

pub use error::{bounded, FusionError, Result};
pub use methods::{fuse, FuseReport, Fused, Method};
