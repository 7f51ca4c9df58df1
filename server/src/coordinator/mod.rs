//! The coordinator, in rooms with one purpose each:
//!
//! * [`runbook`]: one run's state machine, without I/O: events in, effects out;
//! * [`scheduler`]: the queue, the leases and the workers, without I/O;
//! * [`store`]: run documents in the object store, written with
//!   compare-and-swap; [`document`] is their versioned format (`upgrade`
//!   reads older ones) and [`wire`] converts it to what clients see;
//! * [`service`]: the driver. It implements [`RunApi`] and [`WorkerApi`]
//!   (the gRPC adapters, the tests and the embedded mode call it through
//!   them) with one mutate-then-commit path: a change is applied to a copy
//!   of the run, the copy is stored, and only then kept and its effects
//!   performed, so a failed write leaves memory as it was;
//! * [`lease`]: one coordinator per store: the store lease, renewed with
//!   conditional puts, and the epoch that fences a former holder's writes;
//! * [`fusion_step`]: reads the members, fuses them on a blocking thread and
//!   stores the fused models;
//! * [`checkpoints`]: existing member checkpoints in the store (one file or
//!   sharded): checked at submission from their headers, read for fusion;
//! * [`transfer`]: checkpoints through the service: uploads checked and
//!   stored by content, a run's models and report streamed back.

mod api;
pub mod checkpoints;
pub mod document;
pub mod fusion_step;
pub mod lease;
mod run_api;
pub mod runbook;
pub mod scheduler;
mod service;
pub mod store;
mod task_plans;
pub mod transfer;
mod upgrade;
pub mod wire;
mod worker_api;

#[cfg(test)]
mod tests;

pub use api::{CoordinatorConfig, RunApi, WorkerApi};
pub use service::Coordinator;
