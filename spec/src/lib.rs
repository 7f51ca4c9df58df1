//! Run specs without libtorch: the YAML file a person writes ([`file`]),
//! the plain config types every consumer reads ([`train`], [`data`]), every
//! default in one place ([`defaults`]), the validated [`Plan`] of a run and
//! the [`TaskPlan`] of one task, and the one conversion each way between
//! them and the `nt.v1` wire messages ([`wire`]).
//!
//! The path of a spec: YAML -> [`file::RunSpecFile`] -> `pb::RunSpec` (the
//! client sends it) -> [`Plan::from_wire`] (the coordinator validates and
//! resolves it once) -> [`TaskPlan`] per task -> `pb::Task` (to the worker)
//! -> [`TaskPlan::from_wire`] (the worker's job driver reads it).

pub mod data;
pub mod defaults;
pub mod device;
mod error;
pub mod file;
pub mod joint;
pub mod limits;
pub mod nesting;
pub mod plan;
pub mod task;
pub mod train;
pub mod wire;

pub use data::{Augment, DataFiles, DataSpec, SyntheticSpec};
pub use error::SpecError;
pub use file::RunSpecFile;
pub use joint::JointMode;
pub use limits::Limits;
pub use plan::{Compare, Device, MemberPlan, Plan};
pub use task::{EvalItem, Job, JointPhase, TaskPlan, TaskWork};
pub use train::{Distill, Schedule, TrainConfig};
