//! The torch runtime of `nt`: the model interpreter ([`model`]), training and
//! evaluation ([`train`]), data sets on the device ([`data`]), devices
//! ([`device`]), the exactness guard that plugs into fusion ([`guard`]) and
//! the one job driver ([`job`]) that the worker and `ntctl` both call. The
//! fusion math itself lives in `nt-fusion`, without libtorch.

pub mod data;
pub mod device;
mod error;
pub mod guard;
pub mod job;
pub mod joint;
pub mod model;
pub mod tensor;
pub mod train;

pub use error::{Result, RuntimeError};
pub use guard::{fuse, FuseOptions};
pub use tensor::TchExt;
