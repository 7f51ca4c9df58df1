//! The run document's types to and from `nt.store.v1.RunDocument`, the
//! message whose proto3 JSON is stored. The one place that knows both; what
//! cannot be read back (an unknown state or fusion method, a spec that does
//! not decode) is an error naming it.

use nt_proto::prost::Message;
use nt_proto::store::v1 as st;
use nt_proto::v1 as pb;
use nt_spec::{JointPhase, TaskWork};

use super::{
    CurvePoint, DataLoad, FusedRecord, GroupKept, Outcome, Progress, RunDocument, RunState, Score,
    StoredSpec, TaskRecord, TaskState,
};
use fusion::Method;

pub fn to_store(d: &RunDocument) -> st::RunDocument {
    st::RunDocument {
        format: d.format,
        revision: d.revision,
        writer: d.writer.clone(),
        epoch: d.epoch,
        run_id: d.run_id.clone(),
        request_id: d.request_id.clone(),
        spec: d.spec.0.encode_to_vec(),
        state: pb::RunState::from(d.state) as i32,
        message: d.message.clone(),
        created_ms: d.created_ms,
        updated_ms: d.updated_ms,
        finished_ms: d.finished_ms,
        event_sequence: d.event_sequence,
        tasks: d.tasks.iter().map(task_to_store).collect(),
        member_keys: d.member_keys.clone(),
        fused: d
            .fused
            .iter()
            .map(|f| st::FusedRecord {
                method: f.method.to_string(),
                key: f.key.clone(),
                seconds: f.seconds,
                peak_bytes: f.peak_bytes,
                parameters: f.parameters,
                groups: f
                    .groups
                    .iter()
                    .map(|g| st::GroupKept {
                        layers: g.layers.clone(),
                        width: g.width,
                        per_member: g.per_member.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub fn from_store(d: st::RunDocument) -> Result<RunDocument, String> {
    let spec =
        pb::RunSpec::decode(d.spec.as_slice()).map_err(|e| format!("spec: not a RunSpec: {e}"))?;
    Ok(RunDocument {
        format: d.format,
        revision: d.revision,
        writer: d.writer,
        epoch: d.epoch,
        state: run_state(d.state)?,
        run_id: d.run_id,
        request_id: d.request_id,
        spec: StoredSpec(spec),
        message: d.message,
        created_ms: d.created_ms,
        updated_ms: d.updated_ms,
        finished_ms: d.finished_ms,
        event_sequence: d.event_sequence,
        tasks: d
            .tasks
            .into_iter()
            .map(task_from_store)
            .collect::<Result<_, _>>()?,
        member_keys: d.member_keys,
        fused: d
            .fused
            .into_iter()
            .map(|f| {
                Ok(FusedRecord {
                    method: method(&f.method)?,
                    key: f.key,
                    seconds: f.seconds,
                    peak_bytes: f.peak_bytes,
                    parameters: f.parameters,
                    groups: f
                        .groups
                        .into_iter()
                        .map(|g| GroupKept {
                            layers: g.layers,
                            width: g.width,
                            per_member: g.per_member,
                        })
                        .collect(),
                })
            })
            .collect::<Result<_, String>>()?,
    })
}

pub fn run_state(s: i32) -> Result<RunState, String> {
    Ok(match pb::RunState::try_from(s) {
        Ok(pb::RunState::Queued) => RunState::Queued,
        Ok(pb::RunState::Training) => RunState::Training,
        Ok(pb::RunState::Fusing) => RunState::Fusing,
        Ok(pb::RunState::FineTuning) => RunState::FineTuning,
        Ok(pb::RunState::Evaluating) => RunState::Evaluating,
        Ok(pb::RunState::Succeeded) => RunState::Succeeded,
        Ok(pb::RunState::Failed) => RunState::Failed,
        Ok(pb::RunState::Cancelled) => RunState::Cancelled,
        Ok(pb::RunState::Unspecified) | Err(_) => return Err(format!("run state {s} is unknown")),
    })
}

pub fn task_state(s: i32) -> Result<TaskState, String> {
    Ok(match pb::TaskState::try_from(s) {
        Ok(pb::TaskState::Pending) => TaskState::Pending,
        Ok(pb::TaskState::Running) => TaskState::Running,
        Ok(pb::TaskState::Succeeded) => TaskState::Succeeded,
        Ok(pb::TaskState::Failed) => TaskState::Failed,
        Ok(pb::TaskState::Cancelled) => TaskState::Cancelled,
        Ok(pb::TaskState::Unspecified) | Err(_) => {
            return Err(format!("task state {s} is unknown"))
        }
    })
}

fn method(name: &str) -> Result<Method, String> {
    name.parse().map_err(|e| format!("{e}"))
}

pub fn work_to_store(w: &TaskWork) -> st::TaskWork {
    use st::task_work::{Baseline, Evaluate, FineTune, Joint, Kind, Train};
    let kind = match w {
        TaskWork::Train { member } => Kind::Train(Train {
            // Member counts are small (the spec caps them far below u32::MAX).
            member: u32::try_from(*member).unwrap_or(u32::MAX),
        }),
        TaskWork::FineTune { method, distilled } => Kind::FineTune(FineTune {
            method: method.to_string(),
            distilled: *distilled,
        }),
        TaskWork::Baseline => Kind::Baseline(Baseline {}),
        TaskWork::Evaluate => Kind::Evaluate(Evaluate {}),
        TaskWork::Joint { phase, models } => Kind::Joint(Joint {
            phase: phase.as_str().into(),
            models: u32::try_from(*models).unwrap_or(u32::MAX),
        }),
    };
    st::TaskWork { kind: Some(kind) }
}

fn work_from_store(w: Option<st::TaskWork>) -> Result<TaskWork, String> {
    use st::task_work::Kind;
    Ok(match w.and_then(|w| w.kind) {
        Some(Kind::Train(t)) => TaskWork::Train {
            member: t.member as usize,
        },
        Some(Kind::FineTune(f)) => TaskWork::FineTune {
            method: method(&f.method)?,
            distilled: f.distilled,
        },
        Some(Kind::Baseline(_)) => TaskWork::Baseline,
        Some(Kind::Evaluate(_)) => TaskWork::Evaluate,
        Some(Kind::Joint(j)) => TaskWork::Joint {
            phase: JointPhase::parse(&j.phase)
                .ok_or_else(|| format!("joint task phase `{}` is unknown", j.phase))?,
            models: j.models as usize,
        },
        None => return Err("a task without its work".into()),
    })
}

fn task_to_store(t: &TaskRecord) -> st::TaskRecord {
    st::TaskRecord {
        work: Some(work_to_store(&t.work)),
        state: pb::TaskState::from(t.state) as i32,
        attempt: t.attempt,
        worker_id: t.worker_id.clone(),
        error: t.error.clone(),
        resume: t.resume.clone(),
        resume_epoch: t.resume_epoch,
        progress: t.progress.as_ref().map(|p| st::Progress {
            epoch: p.epoch,
            epochs: p.epochs,
            step: p.step,
            steps: p.steps,
            loss: p.loss,
            accuracy: p.accuracy,
            samples_per_second: p.samples_per_second,
            lr: p.lr,
            eval_accuracy: p.eval_accuracy,
        }),
        curve: t.curve.iter().map(curve_point_to_store).collect(),
        outcome: t.outcome.as_ref().map(|o| st::Outcome {
            checkpoint: o.checkpoint.clone(),
            before: o.before.as_ref().map(score_to_store),
            after: o.after.as_ref().map(score_to_store),
            evaluations: o.evaluations.iter().map(score_to_store).collect(),
            samples_per_second: o.samples_per_second,
        }),
        compute_seconds: t.compute_seconds,
        group: t.group.clone(),
    }
}

fn task_from_store(t: st::TaskRecord) -> Result<TaskRecord, String> {
    Ok(TaskRecord {
        work: work_from_store(t.work)?,
        state: task_state(t.state)?,
        attempt: t.attempt,
        worker_id: t.worker_id,
        error: t.error,
        resume: t.resume,
        resume_epoch: t.resume_epoch,
        progress: t.progress.map(|p| Progress {
            epoch: p.epoch,
            epochs: p.epochs,
            step: p.step,
            steps: p.steps,
            loss: p.loss,
            accuracy: p.accuracy,
            samples_per_second: p.samples_per_second,
            lr: p.lr,
            eval_accuracy: p.eval_accuracy,
        }),
        curve: t
            .curve
            .into_iter()
            .map(|c| CurvePoint {
                epoch: c.epoch,
                train_loss: c.train_loss,
                train_accuracy: c.train_accuracy,
                eval_accuracy: c.eval_accuracy,
                eval_loss: c.eval_loss,
            })
            .collect(),
        outcome: t.outcome.map(|o| Outcome {
            checkpoint: o.checkpoint,
            before: o.before.map(score_from_store),
            after: o.after.map(score_from_store),
            evaluations: o.evaluations.into_iter().map(score_from_store).collect(),
            samples_per_second: o.samples_per_second,
        }),
        compute_seconds: t.compute_seconds,
        group: t.group,
    })
}

fn curve_point_to_store(c: &CurvePoint) -> st::CurvePoint {
    st::CurvePoint {
        epoch: c.epoch,
        train_loss: c.train_loss,
        train_accuracy: c.train_accuracy,
        eval_accuracy: c.eval_accuracy,
        eval_loss: c.eval_loss,
    }
}

fn score_to_store(s: &Score) -> st::Score {
    st::Score {
        name: s.name.clone(),
        accuracy: s.accuracy,
        loss: s.loss,
        parameters: s.parameters,
        checkpoint: s.checkpoint.clone(),
        data: s.data.as_ref().map(|d| st::DataLoad {
            source: d.source.clone(),
            images: d.images,
            skipped: d.skipped,
            seconds: d.seconds,
            cache_hit: d.cache_hit,
            cache_key: d.cache_key.clone(),
        }),
    }
}

fn score_from_store(s: st::Score) -> Score {
    Score {
        name: s.name,
        accuracy: s.accuracy,
        loss: s.loss,
        parameters: s.parameters,
        checkpoint: s.checkpoint,
        data: s.data.map(|d| DataLoad {
            source: d.source,
            images: d.images,
            skipped: d.skipped,
            seconds: d.seconds,
            cache_hit: d.cache_hit,
            cache_key: d.cache_key,
        }),
    }
}
