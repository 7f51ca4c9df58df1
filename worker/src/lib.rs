//! nt's worker: pulls tasks from the coordinator and runs them with the
//! fusion engine. [`Worker::run`] takes a cancellation token, so the
//! embedded mode and tests run workers in-process. The [`link`] talks to the
//! coordinator, the [`lease_loop`] fills the worker's slots, and the
//! [`executor`] hands each task to the runtime's job driver.

pub mod config;
pub mod executor;
pub mod lease_loop;
pub mod link;
pub mod metrics;

pub use config::WorkerArgs;
pub use lease_loop::Worker;
