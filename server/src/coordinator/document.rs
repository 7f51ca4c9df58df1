//! The durable run document (`runs/<run>/run.json`): the coordinator's own,
//! versioned types, converted to and from the wire at the edge
//! ([`super::wire`]). The spec is kept as the client sent it, in the wire
//! encoding (protobuf, base64): the plan is derived from it again at load.
//!
//! Format history: 1 and 2 stored `pb::Run` itself; 3 is this document.
//! [`super::upgrade::read`] reads every format.

use nt_proto::floats;
use nt_proto::prost::Message;
use nt_proto::v1 as pb;
use nt_spec::TaskWork;
use serde::{Deserialize, Serialize};

use fusion::Method;

/// The format this coordinator writes.
pub const FORMAT: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Queued,
    Training,
    Fusing,
    FineTuning,
    Evaluating,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }

    /// The name used in messages and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Training => "training",
            RunState::Fusing => "fusing",
            RunState::FineTuning => "fine_tuning",
            RunState::Evaluating => "evaluating",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn is_unfinished(self) -> bool {
        matches!(self, TaskState::Pending | TaskState::Running)
    }

    pub fn name(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

/// A running task's last progress report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub epoch: u32,
    pub epochs: u32,
    pub step: u32,
    pub steps: u32,
    #[serde(with = "floats")]
    pub loss: f64,
    #[serde(with = "floats")]
    pub accuracy: f64,
    #[serde(with = "floats")]
    pub samples_per_second: f64,
    #[serde(with = "floats")]
    pub lr: f64,
    #[serde(default, with = "floats::optional")]
    pub eval_accuracy: Option<f64>,
}

/// One epoch of a learning curve.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub epoch: u32,
    #[serde(with = "floats")]
    pub train_loss: f64,
    #[serde(with = "floats")]
    pub train_accuracy: f64,
    #[serde(with = "floats")]
    pub eval_accuracy: f64,
    #[serde(with = "floats")]
    pub eval_loss: f64,
}

/// A model's (or an ensemble's) score on the test set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub name: String,
    #[serde(with = "floats")]
    pub accuracy: f64,
    #[serde(with = "floats")]
    pub loss: f64,
    pub parameters: u64,
    pub checkpoint: String,
    /// How the task that trained it loaded the user's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataLoad>,
}

/// How a training task loaded the user's data (image folders and arrays).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataLoad {
    pub source: String,
    pub images: u64,
    pub skipped: u64,
    #[serde(with = "floats")]
    pub seconds: f64,
    pub cache_hit: bool,
    pub cache_key: String,
}

/// What an accepted attempt produced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The model it wrote (training and fine-tuning).
    #[serde(default)]
    pub checkpoint: String,
    #[serde(default)]
    pub before: Option<Score>,
    #[serde(default)]
    pub after: Option<Score>,
    /// Evaluation tasks: one score per model or ensemble.
    #[serde(default)]
    pub evaluations: Vec<Score>,
    #[serde(with = "floats")]
    pub samples_per_second: f64,
}

/// One task of a run: what it does and where it stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub work: TaskWork,
    pub state: TaskState,
    /// The current (or last) attempt, 1-based; 0 before the first lease.
    pub attempt: u32,
    /// The worker running it, while it runs.
    #[serde(default)]
    pub worker_id: String,
    /// Why it failed, or the last retryable failure.
    #[serde(default)]
    pub error: String,
    /// The last epoch state written by any attempt, to resume from.
    #[serde(default)]
    pub resume: Option<String>,
    #[serde(default)]
    pub resume_epoch: u32,
    #[serde(default)]
    pub progress: Option<Progress>,
    /// The learning curve of the current attempt.
    #[serde(default)]
    pub curve: Vec<CurvePoint>,
    /// The accepted result.
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// Compute seconds of every attempt that ended with a result.
    #[serde(default, with = "floats")]
    pub compute_seconds: f64,
}

impl TaskRecord {
    pub fn new(work: TaskWork) -> Self {
        TaskRecord {
            work,
            state: TaskState::Pending,
            attempt: 0,
            worker_id: String::new(),
            error: String::new(),
            resume: None,
            resume_epoch: 0,
            progress: None,
            curve: Vec::new(),
            outcome: None,
            compute_seconds: 0.0,
        }
    }
}

/// What a fusion group kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupKept {
    pub layers: String,
    pub width: u32,
    pub per_member: Vec<u32>,
}

/// One fusion method's output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedRecord {
    pub method: Method,
    pub key: String,
    #[serde(with = "floats")]
    pub seconds: f64,
    /// Peak heap the fusion allocated beyond the loaded members (0: not measured).
    #[serde(default)]
    pub peak_bytes: u64,
    pub parameters: u64,
    pub groups: Vec<GroupKept>,
}

/// The spec as the client sent it, protobuf-encoded: a wire message keeps
/// its meaning across versions by protobuf's own rules, with no JSON shims.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSpec(pub pb::RunSpec);

impl Serialize for StoredSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.0.encode_to_vec()))
    }
}

impl<'de> Deserialize<'de> for StoredSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        use serde::de::Error;
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| D::Error::custom(format!("spec: not base64: {e}")))?;
        pb::RunSpec::decode(bytes.as_slice())
            .map(StoredSpec)
            .map_err(|e| D::Error::custom(format!("spec: not a RunSpec: {e}")))
    }
}

/// The persisted document of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunDocument {
    /// Format of this document ([`FORMAT`]).
    pub format: u32,
    /// Increases with every stored change.
    pub revision: u64,
    /// The coordinator process that stored this revision (set by the store).
    #[serde(default)]
    pub writer: String,
    /// The store lease's epoch of that writer: a fencing token (set by the store).
    #[serde(default)]
    pub epoch: u64,
    pub run_id: String,
    #[serde(default)]
    pub request_id: String,
    pub spec: StoredSpec,
    pub state: RunState,
    /// Why the run failed or was cancelled.
    #[serde(default)]
    pub message: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// When the run reached its final state.
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// The last event sequence number given out.
    pub event_sequence: u64,
    pub tasks: Vec<TaskRecord>,
    /// Accepted member checkpoints, in member order.
    #[serde(default)]
    pub member_keys: Vec<String>,
    /// Fused models, in the spec's method order.
    #[serde(default)]
    pub fused: Vec<FusedRecord>,
}

impl RunDocument {
    /// The index of a task by its local name.
    pub fn task_index(&self, local: &str) -> Option<usize> {
        self.tasks.iter().position(|t| t.work.local_name() == local)
    }

    pub fn to_json(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec_pretty(self).map_err(|e| format!("serializing run {}: {e}", self.run_id))
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
