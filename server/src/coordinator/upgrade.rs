//! Reading stored run documents of every format: the current one as it is,
//! formats 1 and 2 (which stored the wire message `pb::Run` itself with a
//! parallel array of task records) upgraded to the current [`RunDocument`].
//! Format 1 stored 0 for "the default synthetic noise"; format 2 made the
//! field optional. A document written by a newer coordinator is refused
//! rather than misread.

use nt_proto::v1 as pb;
use nt_spec::TaskWork;
use serde::Deserialize;

use fusion::Method;

use super::document::{
    CurvePoint, FusedRecord, GroupKept, Outcome, Progress, RunDocument, RunState, StoredSpec,
    TaskRecord, TaskState, FORMAT,
};

#[derive(Deserialize)]
struct OldTask {
    work: TaskWork,
    #[serde(default)]
    checkpoint_epoch: u32,
    #[serde(default)]
    curve: Vec<pb::CurvePoint>,
    #[serde(default)]
    result: Option<pb::TaskResult>,
    #[serde(default)]
    compute_seconds: f64,
}

#[derive(Deserialize)]
struct OldFused {
    method: Method,
    key: String,
    seconds: f64,
    parameters: u64,
    groups: Vec<pb::GroupKept>,
}

#[derive(Deserialize)]
struct OldRecord {
    format: u32,
    revision: u64,
    run: pb::Run,
    tasks: Vec<OldTask>,
    event_sequence: u64,
    #[serde(default)]
    member_keys: Vec<String>,
    #[serde(default)]
    fused: Vec<OldFused>,
    #[serde(default)]
    finished_ms: Option<i64>,
}

fn run_state(s: i32) -> Result<RunState, String> {
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

fn task_state(s: i32) -> Result<TaskState, String> {
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

/// Reads a stored document of any known format.
pub fn read(bytes: &[u8]) -> Result<RunDocument, String> {
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match head.format {
        f if f > FORMAT => Err(format!(
            "written in format {f} by a newer coordinator (this one reads up to {FORMAT})"
        )),
        FORMAT => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        _ => upgrade(bytes),
    }
}

/// Reads a format 1 or 2 document as the current one.
fn upgrade(bytes: &[u8]) -> Result<RunDocument, String> {
    let old: OldRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if old.tasks.len() != old.run.tasks.len() {
        return Err(format!(
            "{} task records for {} tasks",
            old.tasks.len(),
            old.run.tasks.len()
        ));
    }
    let mut spec = old.run.spec.unwrap_or_default();
    if old.format < 2 {
        if let Some(s) = spec.data.as_mut().and_then(|d| d.synthetic.as_mut()) {
            if s.noise == Some(0.0) {
                s.noise = None;
            }
        }
    }
    let tasks = old
        .tasks
        .into_iter()
        .zip(old.run.tasks)
        .map(|(t, status)| {
            Ok(TaskRecord {
                work: t.work,
                state: task_state(status.state)?,
                attempt: status.attempt,
                worker_id: status.worker_id,
                error: status.error,
                resume: (!status.checkpoint.is_empty()).then_some(status.checkpoint),
                resume_epoch: t.checkpoint_epoch,
                progress: status.progress.as_ref().map(Progress::from),
                curve: t.curve.iter().map(CurvePoint::from).collect(),
                outcome: t.result.as_ref().map(Outcome::from),
                compute_seconds: t.compute_seconds,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(RunDocument {
        format: FORMAT,
        revision: old.revision,
        writer: String::new(),
        epoch: 0,
        run_id: old.run.run_id,
        request_id: old.run.request_id,
        spec: StoredSpec(spec),
        state: run_state(old.run.state)?,
        message: old.run.message,
        created_ms: old.run.created_unix_ms,
        updated_ms: old.run.updated_unix_ms,
        finished_ms: old.finished_ms,
        event_sequence: old.event_sequence,
        tasks,
        member_keys: old.member_keys,
        fused: old
            .fused
            .into_iter()
            .map(|f| FusedRecord {
                method: f.method,
                key: f.key,
                seconds: f.seconds,
                peak_bytes: 0,
                parameters: f.parameters,
                groups: f.groups.iter().map(GroupKept::from).collect(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A format-`format` document as the first coordinator wrote it.
    fn old_document(format: u32, noise: Option<f64>) -> Vec<u8> {
        let spec = pb::RunSpec {
            architecture: Some(pb::Architecture {
                kind: Some(pb::architecture::Kind::Preset("mlp".into())),
            }),
            data: Some(pb::DataSpec {
                synthetic: Some(pb::SyntheticData {
                    noise,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let run = pb::Run {
            run_id: "run-1".into(),
            spec: Some(spec),
            state: pb::RunState::Training as i32,
            tasks: vec![pb::TaskStatus {
                task_id: "run-1/member-0".into(),
                state: pb::TaskState::Running as i32,
                attempt: 2,
                worker_id: "w".into(),
                checkpoint: "runs/run-1/tasks/member-0/attempt-1/epoch-3.state.safetensors".into(),
                progress: Some(pb::TaskProgress {
                    loss: f64::NAN,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        serde_json::to_vec(&serde_json::json!({
            "format": format,
            "revision": 7,
            "run": run,
            "tasks": [{"work": {"kind": "train", "member": 0}, "checkpoint_epoch": 3,
                       "curve": [{"epoch": 1, "train_loss": "NaN"}]}],
            "event_sequence": 12,
        }))
        .unwrap()
    }

    fn noise(d: &RunDocument) -> Option<f64> {
        d.spec.0.data.as_ref()?.synthetic.as_ref()?.noise
    }

    #[test]
    fn old_documents_keep_their_meaning_and_newer_ones_are_refused() {
        // Format 1 wrote 0 for "the default noise".
        let old = read(&old_document(1, Some(0.0))).unwrap();
        assert_eq!((old.format, noise(&old)), (FORMAT, None));
        // In format 2, 0 means exact prototypes.
        let two = read(&old_document(2, Some(0.0))).unwrap();
        assert_eq!(noise(&two), Some(0.0));
        let mut newer: serde_json::Value = serde_json::from_slice(&two.to_json().unwrap()).unwrap();
        newer["format"] = (FORMAT + 1).into();
        let e = read(&serde_json::to_vec(&newer).unwrap()).unwrap_err();
        assert!(e.contains("newer coordinator"), "{e}");
    }

    #[test]
    fn an_upgraded_document_keeps_every_task_field_and_round_trips() {
        let doc = read(&old_document(2, None)).unwrap();
        assert_eq!((doc.revision, doc.event_sequence), (7, 12));
        assert_eq!(doc.state, RunState::Training);
        let t = &doc.tasks[0];
        assert_eq!(
            (t.state, t.attempt, t.resume_epoch),
            (TaskState::Running, 2, 3)
        );
        assert_eq!(t.worker_id, "w");
        assert!(t
            .resume
            .as_deref()
            .unwrap()
            .ends_with("epoch-3.state.safetensors"));
        assert!(t.progress.as_ref().unwrap().loss.is_nan());
        assert!(t.curve[0].train_loss.is_nan());
        let again = read(&doc.to_json().unwrap()).unwrap();
        assert_eq!(again.tasks.len(), 1);
        assert_eq!(again.spec, doc.spec);
        assert!(again.tasks[0].curve[0].train_loss.is_nan());
    }
}
