//! The edge between the run document's types and the `nt.v1` wire messages:
//! what clients see of a run (`pb::Run`, its report) and what workers send
//! (progress, curves, results).

use nt_proto::v1 as pb;
use nt_spec::wire::method_to_wire;
use nt_spec::Plan;

use super::document::{
    CurvePoint, DataLoad, FusedRecord, GroupKept, Outcome, Progress, RunDocument, RunState, Score,
    TaskRecord, TaskState,
};
use nt_common::layout;

impl From<RunState> for pb::RunState {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Queued => pb::RunState::Queued,
            RunState::Training => pb::RunState::Training,
            RunState::Fusing => pb::RunState::Fusing,
            RunState::FineTuning => pb::RunState::FineTuning,
            RunState::Evaluating => pb::RunState::Evaluating,
            RunState::Succeeded => pb::RunState::Succeeded,
            RunState::Failed => pb::RunState::Failed,
            RunState::Cancelled => pb::RunState::Cancelled,
        }
    }
}

impl From<TaskState> for pb::TaskState {
    fn from(s: TaskState) -> Self {
        match s {
            TaskState::Pending => pb::TaskState::Pending,
            TaskState::Running => pb::TaskState::Running,
            TaskState::Succeeded => pb::TaskState::Succeeded,
            TaskState::Failed => pb::TaskState::Failed,
            TaskState::Cancelled => pb::TaskState::Cancelled,
        }
    }
}

impl From<&pb::TaskProgress> for Progress {
    fn from(p: &pb::TaskProgress) -> Self {
        Progress {
            epoch: p.epoch,
            epochs: p.epochs,
            step: p.step,
            steps: p.steps,
            loss: p.loss,
            accuracy: p.accuracy,
            samples_per_second: p.samples_per_second,
            lr: p.lr,
            eval_accuracy: p.eval_accuracy,
        }
    }
}

impl From<&Progress> for pb::TaskProgress {
    fn from(p: &Progress) -> Self {
        pb::TaskProgress {
            epoch: p.epoch,
            epochs: p.epochs,
            step: p.step,
            steps: p.steps,
            loss: p.loss,
            accuracy: p.accuracy,
            samples_per_second: p.samples_per_second,
            lr: p.lr,
            eval_accuracy: p.eval_accuracy,
        }
    }
}

impl From<&pb::CurvePoint> for CurvePoint {
    fn from(p: &pb::CurvePoint) -> Self {
        CurvePoint {
            epoch: p.epoch,
            train_loss: p.train_loss,
            train_accuracy: p.train_accuracy,
            eval_accuracy: p.eval_accuracy,
            eval_loss: p.eval_loss,
        }
    }
}

impl From<&CurvePoint> for pb::CurvePoint {
    fn from(p: &CurvePoint) -> Self {
        pb::CurvePoint {
            epoch: p.epoch,
            train_loss: p.train_loss,
            train_accuracy: p.train_accuracy,
            eval_accuracy: p.eval_accuracy,
            eval_loss: p.eval_loss,
        }
    }
}

impl From<&pb::ModelReport> for Score {
    fn from(m: &pb::ModelReport) -> Self {
        Score {
            name: m.name.clone(),
            accuracy: m.accuracy,
            loss: m.loss,
            parameters: m.parameters,
            checkpoint: m.checkpoint.clone(),
            data: m.data.as_ref().map(DataLoad::from),
        }
    }
}

impl From<&Score> for pb::ModelReport {
    fn from(s: &Score) -> Self {
        pb::ModelReport {
            name: s.name.clone(),
            accuracy: s.accuracy,
            loss: s.loss,
            parameters: s.parameters,
            checkpoint: s.checkpoint.clone(),
            data: s.data.as_ref().map(pb::DataLoad::from),
        }
    }
}

impl From<&pb::DataLoad> for DataLoad {
    fn from(d: &pb::DataLoad) -> Self {
        DataLoad {
            source: d.source.clone(),
            images: d.images,
            skipped: d.skipped,
            seconds: d.seconds,
            cache_hit: d.cache_hit,
            cache_key: d.cache_key.clone(),
        }
    }
}

impl From<&DataLoad> for pb::DataLoad {
    fn from(d: &DataLoad) -> Self {
        pb::DataLoad {
            source: d.source.clone(),
            images: d.images,
            skipped: d.skipped,
            seconds: d.seconds,
            cache_hit: d.cache_hit,
            cache_key: d.cache_key.clone(),
        }
    }
}

impl From<&pb::TaskResult> for Outcome {
    fn from(r: &pb::TaskResult) -> Self {
        Outcome {
            checkpoint: r.checkpoint.clone(),
            before: r.before.as_ref().map(Score::from),
            after: r.after.as_ref().map(Score::from),
            evaluations: r.evaluations.iter().map(Score::from).collect(),
            samples_per_second: r.samples_per_second,
        }
    }
}

impl From<&pb::GroupKept> for GroupKept {
    fn from(g: &pb::GroupKept) -> Self {
        GroupKept {
            layers: g.layers.clone(),
            width: g.width,
            per_member: g.per_member.clone(),
        }
    }
}

impl From<&GroupKept> for pb::GroupKept {
    fn from(g: &GroupKept) -> Self {
        pb::GroupKept {
            layers: g.layers.clone(),
            width: g.width,
            per_member: g.per_member.clone(),
        }
    }
}

/// A task as clients see it.
pub fn task_status(run_id: &str, t: &TaskRecord) -> pb::TaskStatus {
    pb::TaskStatus {
        task_id: super::document::task_id(run_id, &t.work.local_name()),
        kind: t.work.kind() as i32,
        state: pb::TaskState::from(t.state) as i32,
        attempt: t.attempt,
        worker_id: t.worker_id.clone(),
        label: t.work.label(),
        progress: t.progress.as_ref().map(pb::TaskProgress::from),
        error: t.error.clone(),
        checkpoint: t.resume.clone().unwrap_or_default(),
    }
}

/// A run as clients see it.
pub fn run(doc: &RunDocument, plan: &Plan) -> pb::Run {
    pb::Run {
        run_id: doc.run_id.clone(),
        request_id: doc.request_id.clone(),
        spec: Some(doc.spec.0.clone()),
        state: pb::RunState::from(doc.state) as i32,
        message: doc.message.clone(),
        created_unix_ms: doc.created_ms,
        updated_unix_ms: doc.updated_ms,
        tasks: doc
            .tasks
            .iter()
            .map(|t| task_status(&doc.run_id, t))
            .collect(),
        report: Some(report(doc, plan)),
        storage_prefix: layout::run_prefix(&doc.run_id),
    }
}

/// The run's report: every score, curve and timing once it succeeded; the
/// wall time once it ended in any way.
pub fn report(doc: &RunDocument, plan: &Plan) -> pb::RunReport {
    let mut report = pb::RunReport::default();
    if doc.state == RunState::Succeeded {
        fill_report(&mut report, doc, plan);
    }
    if let Some(finished) = doc.finished_ms.filter(|_| doc.state.is_final()) {
        report
            .timings
            .get_or_insert_with(Default::default)
            .wall_seconds = (finished - doc.created_ms) as f64 / 1000.0;
    }
    report
}

fn fill_report(report: &mut pb::RunReport, doc: &RunDocument, plan: &Plan) {
    let evals: std::collections::HashMap<&str, &Score> = doc
        .tasks
        .iter()
        .filter_map(|t| t.outcome.as_ref())
        .flat_map(|o| o.evaluations.iter())
        .map(|s| (s.name.as_str(), s))
        .collect();
    // How the task that trained each model loaded its data.
    let loads: std::collections::HashMap<String, &DataLoad> = doc
        .tasks
        .iter()
        .filter_map(|t| {
            let data = t.outcome.as_ref()?.after.as_ref()?.data.as_ref()?;
            Some((t.work.model_name()?, data))
        })
        .collect();
    let score = |name: &str| -> pb::ModelReport {
        let mut report = evals
            .get(name)
            .map(|s| pb::ModelReport::from(*s))
            .unwrap_or_default();
        if let Some(data) = loads.get(name) {
            report.data = Some(pb::DataLoad::from(*data));
        }
        report
    };
    let params = plan.arch.parameter_count() as u64;
    report.members = doc
        .member_keys
        .iter()
        .enumerate()
        .map(|(m, key)| {
            let name = format!("member {m}");
            let mut r = score(&name);
            r.name = name;
            r.parameters = params;
            r.checkpoint = key.clone();
            r
        })
        .collect();
    let mut ensemble = score("ensemble");
    ensemble.name = "ensemble".into();
    ensemble.parameters = params * doc.member_keys.len() as u64;
    report.ensemble = Some(ensemble);
    report.fused = doc
        .fused
        .iter()
        .map(|f| fused_report(doc, plan, f, &score))
        .collect();
    if plan.compare.baseline {
        let mut baseline = score("baseline");
        baseline.name = "baseline".into();
        baseline.parameters = params;
        baseline.checkpoint = layout::baseline(&doc.run_id);
        report.baseline = Some(baseline);
    }
    report.curves = doc
        .tasks
        .iter()
        .filter(|t| !t.curve.is_empty())
        .map(|t| pb::Curve {
            name: t.work.label(),
            points: t.curve.iter().map(pb::CurvePoint::from).collect(),
        })
        .collect();
    let timings = report.timings.get_or_insert_with(Default::default);
    timings.task_seconds = doc.tasks.iter().map(|t| t.compute_seconds).sum();
    timings.fusion_seconds = doc.fused.iter().map(|f| f.seconds).sum();
}

fn fused_report(
    doc: &RunDocument,
    plan: &Plan,
    f: &FusedRecord,
    score: &dyn Fn(&str) -> pb::ModelReport,
) -> pb::FusedReport {
    let name = f.method.to_string();
    let model = |model: &str, checkpoint: String| {
        let mut m = score(model);
        m.parameters = f.parameters;
        m.checkpoint = checkpoint;
        m
    };
    pb::FusedReport {
        method: method_to_wire(f.method).map_or(0, |m| m as i32),
        after_fusion: Some(model(&name, f.key.clone())),
        after_fine_tuning: Some(model(
            &format!("{name} after fine-tuning"),
            layout::fine_tuned(&doc.run_id, &name),
        )),
        after_distilled_fine_tuning: plan.compare.distill.is_some().then(|| {
            model(
                &format!("{name} after distilled fine-tuning"),
                layout::fine_tuned_distilled(&doc.run_id, &name),
            )
        }),
        fusion_seconds: f.seconds,
        fusion_peak_bytes: f.peak_bytes,
        groups: f.groups.iter().map(pb::GroupKept::from).collect(),
    }
}
