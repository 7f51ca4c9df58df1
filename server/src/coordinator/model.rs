//! The durable run document (`runs/<run>/run.json`): what clients see of a
//! run (`pb::Run`) plus what the coordinator needs to carry on after a
//! restart (accepted outputs, resume checkpoints, curves).

use nt_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use fusion::Method;

pub use nt_spec::TaskWork;

/// The coordinator's side of a task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRecord {
    pub work: TaskWork,
    /// The last epoch state written by any attempt, to resume from.
    #[serde(default)]
    pub checkpoint_epoch: u32,
    /// The learning curve of the current attempt.
    #[serde(default)]
    pub curve: Vec<pb::CurvePoint>,
    /// The accepted result.
    #[serde(default)]
    pub result: Option<pb::TaskResult>,
    /// Compute seconds of every attempt that ended (accepted or not).
    #[serde(default)]
    pub compute_seconds: f64,
}

/// One fusion method's output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FusedRecord {
    pub method: Method,
    pub key: String,
    pub seconds: f64,
    pub parameters: u64,
    pub groups: Vec<pb::GroupKept>,
}

/// The persisted document of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// Format of this document.
    pub format: u32,
    /// Increases with every change; a stale write is never stored over a newer one.
    pub revision: u64,
    /// What clients see.
    pub run: pb::Run,
    /// Parallel to `run.tasks`.
    pub tasks: Vec<TaskRecord>,
    /// The last event sequence number given out.
    pub event_sequence: u64,
    /// Accepted member checkpoints, in member order.
    #[serde(default)]
    pub member_keys: Vec<String>,
    /// Fused models, in the spec's method order.
    #[serde(default)]
    pub fused: Vec<FusedRecord>,
    /// When the run reached its final state.
    #[serde(default)]
    pub finished_ms: Option<i64>,
}

/// 2: synthetic `noise` became optional (format 1 stored 0 for "default").
pub const FORMAT: u32 = 2;

/// Brings a document written by an older coordinator up to [`FORMAT`]; one
/// written by a newer coordinator is refused rather than misread.
pub fn upgrade(record: &mut RunRecord) -> Result<(), String> {
    if record.format > FORMAT {
        return Err(format!(
            "written in format {} by a newer coordinator (this one reads up to {FORMAT})",
            record.format
        ));
    }
    if record.format < 2 {
        let synthetic = record
            .run
            .spec
            .as_mut()
            .and_then(|s| s.data.as_mut())
            .and_then(|d| d.synthetic.as_mut());
        if let Some(s) = synthetic {
            if s.noise == Some(0.0) {
                s.noise = None;
            }
        }
    }
    record.format = FORMAT;
    Ok(())
}

impl RunRecord {
    pub fn state(&self) -> pb::RunState {
        pb::RunState::try_from(self.run.state).unwrap_or(pb::RunState::Unspecified)
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self.state(),
            pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
        )
    }

    pub fn task_state(&self, i: usize) -> pb::TaskState {
        pb::TaskState::try_from(self.run.tasks[i].state).unwrap_or(pb::TaskState::Unspecified)
    }

    /// The index of a task by its local name.
    pub fn task_index(&self, local: &str) -> Option<usize> {
        self.tasks.iter().position(|t| t.work.local_name() == local)
    }
}

/// `<run>/<local task name>`: task ids are unique across runs.
pub fn task_id(run: &str, local: &str) -> String {
    format!("{run}/{local}")
}

/// Splits a task id into run id and local name.
pub fn parse_task_id(id: &str) -> Option<(&str, &str)> {
    id.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(format: u32, noise: Option<f64>) -> RunRecord {
        let spec = pb::RunSpec {
            data: Some(pb::DataSpec {
                synthetic: Some(pb::SyntheticData {
                    noise,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        RunRecord {
            format,
            revision: 1,
            run: pb::Run {
                spec: Some(spec),
                ..Default::default()
            },
            tasks: Vec::new(),
            event_sequence: 0,
            member_keys: Vec::new(),
            fused: Vec::new(),
            finished_ms: None,
        }
    }

    fn noise(r: &RunRecord) -> Option<f64> {
        r.run
            .spec
            .as_ref()?
            .data
            .as_ref()?
            .synthetic
            .as_ref()?
            .noise
    }

    #[test]
    fn old_documents_keep_their_meaning_and_newer_ones_are_refused() {
        // Format 1 wrote 0 for "the default noise".
        let mut old = record(1, Some(0.0));
        upgrade(&mut old).unwrap();
        assert_eq!((old.format, noise(&old)), (FORMAT, None));
        // In the current format 0 means exact prototypes.
        let mut now = record(FORMAT, Some(0.0));
        upgrade(&mut now).unwrap();
        assert_eq!(noise(&now), Some(0.0));
        let mut newer = record(FORMAT + 1, None);
        assert!(upgrade(&mut newer)
            .unwrap_err()
            .contains("newer coordinator"));
    }
}
