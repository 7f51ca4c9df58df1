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
    /// The `models` models of one phase trained as one batched job; their
    /// own tasks name this one as their group.
    Joint {
        phase: JointPhase,
        models: usize,
    },
}

/// The phase a joint task trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JointPhase {
    /// The members.
    Members,
    /// The fine-tunings of the fused models, and the baseline.
    FineTunings,
}

impl JointPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            JointPhase::Members => "members",
            JointPhase::FineTunings => "fine-tunings",
        }
    }

    pub fn parse(text: &str) -> Option<JointPhase> {
        match text {
            "members" => Some(JointPhase::Members),
            "fine-tunings" => Some(JointPhase::FineTunings),
            _ => None,
        }
    }
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
            TaskWork::Joint { phase, .. } => format!("{}-joint", phase.as_str()),
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
            TaskWork::Joint {
                phase: JointPhase::Members,
                models,
            } => format!("members 0-{} (joint)", models.saturating_sub(1)),
            TaskWork::Joint {
                phase: JointPhase::FineTunings,
                models,
            } => format!("{models} fine-tunings (joint)"),
        }
    }

    pub fn kind(&self) -> pb::TaskKind {
        match self {
            TaskWork::Train { .. } => pb::TaskKind::Train,
            TaskWork::FineTune { .. } | TaskWork::Baseline => pb::TaskKind::FineTune,
            TaskWork::Evaluate => pb::TaskKind::Evaluate,
            TaskWork::Joint { .. } => pb::TaskKind::Joint,
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
            TaskWork::Evaluate | TaskWork::Joint { .. } => None,
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
    /// Train the parts as one batched job: each a `Train` or `FineTune`
    /// task of its own (id, label, output prefix), sharing this plan's
    /// architecture, data, device and evaluation batch. This plan's
    /// `resume_state` and `output_prefix` hold the joint epoch states.
    Joint { parts: Vec<TaskPlan> },
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

/// Equal when every field is, the architecture by its spec.
impl PartialEq for TaskPlan {
    fn eq(&self, other: &Self) -> bool {
        self.task_id == other.task_id
            && self.run_id == other.run_id
            && self.attempt == other.attempt
            && self.label == other.label
            && self.arch.spec() == other.arch.spec()
            && self.data == other.data
            && self.job == other.job
            && self.device == other.device
            && self.eval_batch == other.eval_batch
            && self.output_prefix == other.output_prefix
            && self.resume_state == other.resume_state
    }
}

impl TaskPlan {
    pub fn kind(&self) -> pb::TaskKind {
        match self.job {
            Job::Train { .. } => pb::TaskKind::Train,
            Job::FineTune { .. } => pb::TaskKind::FineTune,
            Job::Evaluate { .. } => pb::TaskKind::Evaluate,
            Job::Joint { .. } => pb::TaskKind::Joint,
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
            Job::Joint { parts } => task.parts = parts.iter().map(TaskPlan::to_wire).collect(),
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
            Ok(pb::TaskKind::Joint) => Job::Joint {
                parts: joint_parts(&task.parts)?,
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

/// The parts of a joint task: at least two, each a training or a
/// fine-tuning (never another joint task), read as tasks of their own.
fn joint_parts(parts: &[pb::Task]) -> Result<Vec<TaskPlan>, SpecError> {
    if parts.len() < 2 {
        return Err(SpecError::new(
            "parts",
            format!(
                "a joint task trains at least two models, got {}",
                parts.len()
            ),
        ));
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            match pb::TaskKind::try_from(part.kind) {
                Ok(pb::TaskKind::Train | pb::TaskKind::FineTune) => {}
                _ => {
                    return Err(SpecError::new(
                        format!("parts[{i}].kind"),
                        format!(
                            "a joint task's parts train or fine-tune, not {}",
                            pb::TaskKind::try_from(part.kind)
                                .map_or_else(|_| part.kind.to_string(), |k| k.as_str_name().into())
                        ),
                    ))
                }
            }
            TaskPlan::from_wire(part)
                .map_err(|e| SpecError::new(format!("parts[{i}].{}", e.field), e.message))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Distill;

    fn part(local: &str, job: Job) -> TaskPlan {
        TaskPlan {
            task_id: format!("run-1/{local}"),
            run_id: "run-1".into(),
            attempt: 2,
            label: local.into(),
            arch: Architecture::new(fusion::arch::preset("mlp").unwrap()).unwrap(),
            data: DataSpec::fashion_mnist(),
            job,
            device: Device::Gpu,
            eval_batch: 512,
            output_prefix: format!("runs/run-1/tasks/{local}/attempt-2"),
            resume_state: None,
        }
    }

    fn joint() -> TaskPlan {
        let config = |seed| TrainConfig {
            seed,
            ..TrainConfig::default()
        };
        let parts = vec![
            part("member-0", Job::Train { config: config(1) }),
            part(
                "fine-tune-nt-distilled",
                Job::FineTune {
                    config: TrainConfig {
                        distill: Some(Distill::default()),
                        ..config(1000)
                    },
                    init: "runs/run-1/fused/nt.safetensors".into(),
                    teachers: vec!["a".into(), "b".into()],
                },
            ),
        ];
        TaskPlan {
            resume_state: Some(
                "runs/run-1/tasks/members-joint/attempt-1/epoch-0002.state.safetensors".into(),
            ),
            ..part("members-joint", Job::Joint { parts })
        }
    }

    #[test]
    fn a_joint_task_round_trips_with_its_parts() {
        let plan = joint();
        let wire = plan.to_wire();
        assert_eq!(wire.kind(), pb::TaskKind::Joint);
        assert_eq!(wire.parts.len(), 2);
        assert_eq!(wire.parts[1].kind(), pb::TaskKind::FineTune);
        assert_eq!(wire.parts[1].teacher_checkpoints, ["a", "b"]);
        assert_eq!(TaskPlan::from_wire(&wire).unwrap(), plan);
    }

    #[test]
    fn a_joint_task_without_trainable_parts_is_refused_naming_the_field() {
        let refused = |change: &dyn Fn(&mut pb::Task)| {
            let mut wire = joint().to_wire();
            change(&mut wire);
            TaskPlan::from_wire(&wire).unwrap_err()
        };
        let e = refused(&|t| t.parts.clear());
        assert_eq!(e.field, "parts");
        assert!(e.message.contains("at least two"), "{e}");
        let e = refused(&|t| t.parts.truncate(1));
        assert_eq!(e.field, "parts");
        let e = refused(&|t| t.parts[1].kind = pb::TaskKind::Evaluate as i32);
        assert_eq!(e.field, "parts[1].kind");
        assert!(e.message.contains("TASK_KIND_EVALUATE"), "{e}");
        let nested = joint().to_wire();
        let e = refused(&|t| t.parts[0] = nested.clone());
        assert_eq!(e.field, "parts[0].kind");
        assert!(e.message.contains("TASK_KIND_JOINT"), "{e}");
        let e = refused(&|t| t.parts[1].init_checkpoint.clear());
        assert_eq!(e.field, "parts[1].init_checkpoint");
    }

    #[test]
    fn joint_tasks_are_named_after_their_phase() {
        let members = TaskWork::Joint {
            phase: JointPhase::Members,
            models: 4,
        };
        assert_eq!(members.local_name(), "members-joint");
        assert_eq!(members.label(), "members 0-3 (joint)");
        assert_eq!(members.kind(), pb::TaskKind::Joint);
        assert_eq!(members.model_name(), None);
        let fine = TaskWork::Joint {
            phase: JointPhase::FineTunings,
            models: 3,
        };
        assert_eq!(fine.local_name(), "fine-tunings-joint");
        assert_eq!(fine.label(), "3 fine-tunings (joint)");
        assert_eq!(
            JointPhase::parse("fine-tunings"),
            Some(JointPhase::FineTunings)
        );
    }
}
