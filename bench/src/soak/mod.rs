//! The pieces of the soak (`src/bin/soak.rs`): simulated workers, watchers,
//! and the record of what they saw.

pub mod record;
pub mod watcher;
pub mod worker;

use std::path::Path;

use anyhow::Result;
use nt_proto::v1 as pb;

/// The run the soak submits: the smallest whole pipeline (two members of an
/// 8-wide MLP, NT fusion in the coordinator, one fine-tuning, the
/// evaluation), so each run is four tasks and one fusion.
pub fn soak_spec(index: usize) -> Result<pb::RunSpec> {
    let yaml = format!(
        r#"
name: soak-{index}
data: {{dataset: synthetic}}
architecture: "mlp:hidden=8,depth=2"
members:
  count: 2
  training: {{epochs: 2, batch_size: 64, lr: 0.05}}
fusion: [nt]
fine_tuning:
  training: {{epochs: 2, batch_size: 64}}
max_attempts: 3
labels: {{bench: soak}}
"#
    );
    Ok(nt_spec::RunSpecFile::from_yaml(&yaml)?.to_proto(Path::new("."))?)
}
