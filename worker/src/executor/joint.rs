//! A joint task: its parts (the members of a run, or its fine-tunings)
//! trained as one by the job driver ([`job::run_joint_training`]). Each part
//! is the training job it would be alone, writing its model under its own
//! attempt's prefix; the joint epoch states go under the joint task's.

use nt_proto::v1 as pb;
use nt_runtime::job::{self, JointJob, TrainJob};
use nt_runtime::RuntimeError;
use nt_spec::TaskPlan;
use tch::Device;

use super::{train_job, trained_result, Hooks, StoreIo};

/// Trains `parts` as one; one result per part, in order.
pub(super) fn train(
    plan: &TaskPlan,
    parts: &[TaskPlan],
    device: Device,
    io: &StoreIo<'_>,
    hooks: &mut Hooks<'_>,
) -> nt_runtime::Result<pb::TaskResult> {
    let jobs = parts
        .iter()
        .map(|part| {
            let job = train_job(part, device).ok_or_else(|| {
                RuntimeError::Spec(format!("part `{}` trains nothing", part.task_id))
            })?;
            // The joint job resumes and saves for all of them.
            Ok(TrainJob {
                resume: None,
                epoch_states: None,
                ..job
            })
        })
        .collect::<nt_runtime::Result<Vec<_>>>()?;
    let job = JointJob {
        parts: jobs,
        resume: plan.resume_state.clone(),
        epoch_states: Some(plan.output_prefix.clone()),
    };
    let trained = job::run_joint_training(&job, io, hooks)?;
    if trained.len() != parts.len() {
        return Err(RuntimeError::Spec(format!(
            "joint training returned {} models for {} parts",
            trained.len(),
            parts.len()
        )));
    }
    let results: Vec<pb::TaskResult> = parts
        .iter()
        .zip(&job.parts)
        .zip(trained)
        .map(|((part, part_job), t)| trained_result(part, part_job, t))
        .collect();
    Ok(pb::TaskResult {
        samples_per_second: results.iter().map(|r| r.samples_per_second).sum(),
        parts: results,
        ..Default::default()
    })
}
