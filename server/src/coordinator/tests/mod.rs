//! In-process tests of the coordinator's rooms: the run state machine and
//! the scheduler on a fake clock, and the driver's mutate-then-commit path
//! against a store whose writes can be made to fail.

mod checkpoints;
mod compare;
mod documents;
mod events;
mod failing_store;
mod joint;
mod joint_phases;
mod joint_service;
mod lease;
mod runbook;
mod service;

use nt_proto::v1 as pb;
use nt_spec::RunSpecFile;

/// A small run spec: `members` MLP members on synthetic data.
pub fn spec(yaml_extra: &str) -> pb::RunSpec {
    let yaml = format!(
        "data: {{dataset: synthetic, synthetic: {{train: 64, test: 32}}}}\n\
         architecture: mlp:hidden=8,depth=1\n{yaml_extra}"
    );
    RunSpecFile::from_yaml(&yaml)
        .and_then(|f| f.to_proto(std::path::Path::new(".")))
        .unwrap_or_else(|e| panic!("{e}"))
}
