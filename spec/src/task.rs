//! One task of a run, fully resolved: what the coordinator hands a worker
//! and what the job driver runs. [`TaskPlan::to_wire`] and
//! [`TaskPlan::from_wire`] are the one conversion each way to `pb::Task`.

use fusion::arch::Architecture;
use fusion::Method;
use nt_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::data::DataSpec;
use crate::device::Device;
use crate::train::TrainConfig;
use crate::wire;
use crate::SpecError;

/// What a task does, with its coordinates in the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TaskWork {
    Train {
        member: usize,
    },
    /// Fine-tuning of a fused model; `distilled`: the comparison's variant
    /// with distillation from the ensemble.
    FineTune {
        method: Method,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        distilled: bool,
    },
    /// Member 0 trained on for the fine-tuning epochs (the compute-matched baseline).
    Baseline,
    Evaluate,
}

impl TaskWork {
    /// The task's name within its run (also its folder in the store).
    pub fn local_name(&self) -> String {
        match self {
            TaskWork::Train { member } => format!("member-{member}"),
            TaskWork::FineTune {
                method,
                distilled: false,
            } => format!("fine-tune-{method}"),
            TaskWork::FineTune {
                method,
                distilled: true,
            } => format!("fine-tune-{method}-distilled"),
            TaskWork::Baseline => "baseline".into(),
            TaskWork::Evaluate => "evaluate".into(),
        }
    }

    pub fn label(&self) -> String {
        match self {
            TaskWork::Train { member } => format!("member {member}"),
            TaskWork::FineTune {
                method,
                distilled: false,
            } => format!("{method} fine-tuning"),
            TaskWork::FineTune {
                method,
                distilled: true,
            } => format!("{method} fine-tuning (distilled)"),
            TaskWork::Baseline => "baseline".into(),
            TaskWork::Evaluate => "evaluation".into(),
        }
    }

    pub fn kind(&self) -> pb::TaskKind {
        match self {
            TaskWork::Train { .. } => pb::TaskKind::Train,
            TaskWork::FineTune { .. } | TaskWork::Baseline => pb::TaskKind::FineTune,
            TaskWork::Evaluate => pb::TaskKind::Evaluate,
        }
    }

    /// The name of the model this task produces, as evaluations and the
    /// report call it (`None`: it produces no model).
    pub fn model_name(&self) -> Option<String> {
        match self {
            TaskWork::Train { member } => Some(format!("member {member}")),
            TaskWork::FineTune {
                method,
                distilled: false,
            } => Some(format!("{method} after fine-tuning")),
            TaskWork::FineTune {
                method,
                distilled: true,
            } => Some(format!("{method} after distilled fine-tuning")),
            TaskWork::Baseline => Some("baseline".into()),
            TaskWork::Evaluate => None,
        }
    }
}

/// A model (one checkpoint) or an ensemble (several) to evaluate.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalItem {
    pub name: String,
    pub checkpoints: Vec<String>,
}

/// What the job driver does.
#[derive(Clone, Debug, PartialEq)]
pub enum Job {
    /// Train a member from a fresh initialisation seeded by `config.seed`.
    Train { config: TrainConfig },
    /// Fine-tune `init`, distilling from `teachers` when `config.distill` is set.
    FineTune {
        config: TrainConfig,
        init: String,
        teachers: Vec<String>,
    },
    /// Evaluate each item on the test set.
    Evaluate { items: Vec<EvalItem> },
}

/// One attempt of one task.
#[derive(Clone, Debug)]
pub struct TaskPlan {
    pub task_id: String,
    pub run_id: String,
    /// 1-based.
    pub attempt: u32,
    pub label: String,
    pub arch: Architecture,
    pub data: DataSpec,
    pub job: Job,
    pub device: Device,
    pub eval_batch: usize,
    /// Where this attempt writes its objects.
    pub output_prefix: String,
    /// An earlier attempt's last epoch state to resume from.
    pub resume_state: Option<String>,
}

impl TaskPlan {
    pub fn kind(&self) -> pb::TaskKind {
        match self.job {
            Job::Train { .. } => pb::TaskKind::Train,
            Job::FineTune { .. } => pb::TaskKind::FineTune,
            Job::Evaluate { .. } => pb::TaskKind::Evaluate,
        }
    }

    /// The wire form: every field set.
    pub fn to_wire(&self) -> pb::Task {
        let mut task = pb::Task {
            task_id: self.task_id.clone(),
            run_id: self.run_id.clone(),
            attempt: self.attempt,
            kind: self.kind() as i32,
            label: self.label.clone(),
            architecture_json: self.arch.spec().to_json(),
            data: Some(wire::data_to_wire(&self.data)),
            output_prefix: self.output_prefix.clone(),
            resume_state: self.resume_state.clone().unwrap_or_default(),
            device: wire::device_to_wire(self.device) as i32,
            eval_batch_size: self.eval_batch as u32,
            ..Default::default()
        };
        match &self.job {
            Job::Train { config } => {
                task.training = Some(wire::training_to_wire(config));
                task.seed = config.seed;
            }
            Job::FineTune {
                config,
                init,
                teachers,
            } => {
                task.training = Some(wire::training_to_wire(config));
                task.seed = config.seed;
                task.init_checkpoint = init.clone();
                task.teacher_checkpoints = teachers.clone();
                task.distill = config.distill.as_ref().map(wire::distill_to_wire);
            }
            Job::Evaluate { items } => {
                task.evaluate = items
                    .iter()
                    .map(|i| pb::EvaluationItem {
                        name: i.name.clone(),
                        checkpoints: i.checkpoints.clone(),
                    })
                    .collect();
            }
        }
        task
    }

    /// Reads a task message; unset fields get their defaults, a message that
    /// cannot describe a task is an error naming the field.
    pub fn from_wire(task: &pb::Task) -> Result<TaskPlan, SpecError> {
        let arch = Architecture::from_json(&task.architecture_json)
            .map_err(|e| SpecError::new("architecture_json", e.to_string()))?;
        let data = wire::data_from_wire(&task.data.clone().unwrap_or_default())?;
        let config = || wire::training_from_wire(task.training.as_ref(), task.seed, data.augment);
        let job = match pb::TaskKind::try_from(task.kind) {
            Ok(pb::TaskKind::Train) => Job::Train { config: config() },
            Ok(pb::TaskKind::FineTune) => {
                if task.init_checkpoint.is_empty() {
                    return Err(SpecError::new(
                        "init_checkpoint",
                        "fine-tuning needs a checkpoint to start from",
                    ));
                }
                let mut config = config();
                config.distill = task.distill.as_ref().map(wire::distill_from_wire);
                Job::FineTune {
                    config,
                    init: task.init_checkpoint.clone(),
                    teachers: task.teacher_checkpoints.clone(),
                }
            }
            Ok(pb::TaskKind::Evaluate) => Job::Evaluate {
                items: task
                    .evaluate
                    .iter()
                    .map(|i| EvalItem {
                        name: i.name.clone(),
                        checkpoints: i.checkpoints.clone(),
                    })
                    .collect(),
            },
            Ok(pb::TaskKind::Unspecified) | Err(_) => {
                return Err(SpecError::new(
                    "kind",
                    format!("task kind {} is unknown", task.kind),
                ))
            }
        };
        Ok(TaskPlan {
            task_id: task.task_id.clone(),
            run_id: task.run_id.clone(),
            attempt: task.attempt,
            label: task.label.clone(),
            arch,
            data,
            job,
            device: wire::device_from_wire(task.device)?,
            eval_batch: (task.eval_batch_size as usize).max(1),
            output_prefix: task.output_prefix.clone(),
            resume_state: (!task.resume_state.is_empty()).then(|| task.resume_state.clone()),
        })
    }
}
