//! The durable run document (`runs/<run>/run.json`): the coordinator's own,
//! versioned types, converted to and from the wire at the edge
//! ([`super::wire`]) and stored as the proto3 JSON of the store's own message,
//! `nt.store.v1.RunDocument` ([`stored`]), which protobuf's parsers read too.
//! The spec is kept as the client sent it, in the wire encoding (protobuf,
//! base64): the plan is derived from it again at load.
//!
//! Format history: 1 and 2 stored `pb::Run` itself; 3 stored these types
//! with serde's derives (short enum names, `"inf"`); 4 is
//! `nt.store.v1.RunDocument`. [`super::upgrade::read`] reads every format.

use nt_proto::v1 as pb;
use nt_spec::TaskWork;

use fusion::Method;

pub(super) mod stored;

/// The format this coordinator writes.
pub const FORMAT: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub epoch: u32,
    pub epochs: u32,
    pub step: u32,
    pub steps: u32,
    pub loss: f64,
    pub accuracy: f64,
    pub samples_per_second: f64,
    pub lr: f64,
    pub eval_accuracy: Option<f64>,
}

/// One epoch of a learning curve.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CurvePoint {
    pub epoch: u32,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub eval_accuracy: f64,
    pub eval_loss: f64,
}

/// A model's (or an ensemble's) score on the test set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Score {
    pub name: String,
    pub accuracy: f64,
    pub loss: f64,
    pub parameters: u64,
    pub checkpoint: String,
    /// How the task that trained it loaded the user's data.
    pub data: Option<DataLoad>,
}

/// How a training task loaded the user's data (image folders and arrays).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataLoad {
    pub source: String,
    pub images: u64,
    pub skipped: u64,
    pub seconds: f64,
    pub cache_hit: bool,
    pub cache_key: String,
}

/// What an accepted attempt produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// The model it wrote (training and fine-tuning).
    pub checkpoint: String,
    pub before: Option<Score>,
    pub after: Option<Score>,
    /// Evaluation tasks: one score per model or ensemble.
    pub evaluations: Vec<Score>,
    pub samples_per_second: f64,
}

/// One task of a run: what it does and where it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRecord {
    pub work: TaskWork,
    pub state: TaskState,
    /// The current (or last) attempt, 1-based; 0 before the first lease.
    pub attempt: u32,
    /// The worker running it, while it runs.
    pub worker_id: String,
    /// Why it failed, or the last retryable failure.
    pub error: String,
    /// The last epoch state written by any attempt, to resume from.
    pub resume: Option<String>,
    pub resume_epoch: u32,
    pub progress: Option<Progress>,
    /// The learning curve of the current attempt.
    pub curve: Vec<CurvePoint>,
    /// The accepted result.
    pub outcome: Option<Outcome>,
    /// Compute seconds of every attempt that ended with a result.
    pub compute_seconds: f64,
    /// The local name of the joint task that trains this model: its lease,
    /// attempt and worker are mirrored here, and messages naming this task
    /// are refused. Empty: the task runs itself.
    pub group: String,
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
            group: String::new(),
        }
    }
}

/// What a fusion group kept.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupKept {
    pub layers: String,
    pub width: u32,
    pub per_member: Vec<u32>,
}

/// One fusion method's output.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedRecord {
    pub method: Method,
    pub key: String,
    pub seconds: f64,
    /// Peak heap the fusion allocated beyond the loaded members (0: not measured).
    pub peak_bytes: u64,
    pub parameters: u64,
    pub groups: Vec<GroupKept>,
}

/// The spec as the client sent it, protobuf-encoded: a wire message keeps
/// its meaning across versions by protobuf's own rules, with no JSON shims.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSpec(pub pb::RunSpec);

/// The persisted document of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunDocument {
    /// Format of this document ([`FORMAT`]).
    pub format: u32,
    /// Increases with every stored change.
    pub revision: u64,
    /// The coordinator process that stored this revision (set by the store).
    pub writer: String,
    /// The store lease's epoch of that writer: a fencing token (set by the store).
    pub epoch: u64,
    pub run_id: String,
    pub request_id: String,
    pub spec: StoredSpec,
    pub state: RunState,
    /// Why the run failed or was cancelled.
    pub message: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// When the run reached its final state.
    pub finished_ms: Option<i64>,
    /// The last event sequence number given out.
    pub event_sequence: u64,
    pub tasks: Vec<TaskRecord>,
    /// Accepted member checkpoints, in member order.
    pub member_keys: Vec<String>,
    /// Fused models, in the spec's method order.
    pub fused: Vec<FusedRecord>,
}

impl RunDocument {
    /// The index of a task by its local name.
    pub fn task_index(&self, local: &str) -> Option<usize> {
        self.tasks.iter().position(|t| t.work.local_name() == local)
    }

    /// The stored form: proto3 JSON of `nt.store.v1.RunDocument`.
    pub fn to_json(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec_pretty(&stored::to_store(self))
            .map_err(|e| format!("serializing run {}: {e}", self.run_id))
    }

    /// Reads a document of the current format ([`super::upgrade::read`]
    /// reads every format).
    pub fn from_store(doc: nt_proto::store::v1::RunDocument) -> Result<Self, String> {
        stored::from_store(doc)
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
