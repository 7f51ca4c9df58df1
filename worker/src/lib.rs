//! nt's worker: pulls tasks from the coordinator and runs them with the
//! fusion engine. [`Worker::run`] takes a cancellation token, so the
//! embedded mode and tests run workers in-process.

pub mod config;
pub mod executor;
pub mod lease_loop;
pub mod metrics;

pub use config::WorkerArgs;
pub use lease_loop::Worker;
