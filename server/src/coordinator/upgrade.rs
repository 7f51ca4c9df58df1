//! Reading stored run documents of every format. Format 4, the current one,
//! is the proto3 JSON of `nt.store.v1.RunDocument`. Format 3 stored the same
//! content with serde's derives, in nt's former spelling (short enum names,
//! `"inf"`); its JSON is respelled by the store message's descriptor
//! ([`nt_proto::legacy`]), its tasks' work (serde's `{"kind": "train",
//! "member": 0}`) rewritten as the message's oneof, and then read as
//! format 4. Formats 1 and 2 stored the wire message `pb::Run` itself, in the
//! same former spelling, with a parallel array of task records; they are
//! respelled as `nt.v1` messages and converted. Format 1 stored 0 for "the
//! default synthetic noise"; format 2 made the field optional. A document
//! written by a newer coordinator is refused rather than misread.

use nt_proto::legacy::respell;
use nt_proto::store::v1 as st;
use nt_proto::v1 as pb;
use nt_spec::TaskWork;
use serde::Deserialize;
use serde_json::Value;

use fusion::Method;

use super::document::stored::{run_state, task_state, work_to_store};
use super::document::{
    CurvePoint, FusedRecord, GroupKept, Outcome, Progress, RunDocument, StoredSpec, TaskRecord,
    FORMAT,
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

/// Reads a stored document of any known format.
pub fn read(bytes: &[u8]) -> Result<RunDocument, String> {
    let mut value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let format = value
        .get("format")
        .and_then(Value::as_u64)
        .ok_or("no format number")?;
    match format {
        f if f > u64::from(FORMAT) => Err(format!(
            "written in format {f} by a newer coordinator (this one reads up to {FORMAT})"
        )),
        f if f == u64::from(FORMAT) => current(value),
        3 => {
            format_3(&mut value)?;
            current(value)
        }
        _ => upgrade(value),
    }
}

fn current(value: Value) -> Result<RunDocument, String> {
    let stored: st::RunDocument = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let mut doc = RunDocument::from_store(stored)?;
    doc.format = FORMAT;
    Ok(doc)
}

/// A format 3 document in format 4's spelling.
fn format_3(value: &mut Value) -> Result<(), String> {
    for task in tasks(value) {
        if let Some(work) = task.get_mut("work") {
            let w: TaskWork =
                serde_json::from_value(work.take()).map_err(|e| format!("a task's work: {e}"))?;
            *work = serde_json::to_value(work_to_store(&w)).map_err(|e| e.to_string())?;
        }
    }
    respell(value, "nt.store.v1.RunDocument")
}

fn tasks(value: &mut Value) -> impl Iterator<Item = &mut Value> {
    value
        .get_mut("tasks")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

/// Reads a format 1 or 2 document as the current one.
fn upgrade(mut value: Value) -> Result<RunDocument, String> {
    if let Some(run) = value.get_mut("run") {
        respell(run, "nt.v1.Run")?;
    }
    for task in tasks(&mut value) {
        for point in task
            .get_mut("curve")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            respell(point, "nt.v1.CurvePoint")?;
        }
        if let Some(result) = task.get_mut("result") {
            respell(result, "nt.v1.TaskResult")?;
        }
    }
    let old: OldRecord = serde_json::from_value(value).map_err(|e| e.to_string())?;
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
                // Joint training came after format 3.
                group: String::new(),
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
    use crate::coordinator::document::{RunState, TaskState};

    /// A format-`format` document as the first coordinators wrote it: the
    /// wire message `pb::Run` with serde's derives (short enum names, serde's
    /// oneofs, NaN as "NaN").
    fn old_document(format: u32, noise: Option<f64>) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "format": format,
            "revision": 7,
            "run": {
                "run_id": "run-1",
                "request_id": "",
                "spec": {
                    "architecture": {"kind": {"Preset": "mlp"}},
                    "data": {"synthetic": {"noise": noise}},
                    "fusion": ["nt"],
                },
                "state": "training",
                "tasks": [{
                    "task_id": "run-1/member-0",
                    "kind": "train",
                    "state": "running",
                    "attempt": 2,
                    "worker_id": "w",
                    "checkpoint": "runs/run-1/tasks/member-0/attempt-1/epoch-3.state.safetensors",
                    "progress": {"loss": "NaN", "eval_accuracy": null},
                }],
                "report": null,
            },
            "tasks": [{"work": {"kind": "train", "member": 0}, "checkpoint_epoch": 3,
                       "curve": [{"epoch": 1, "train_loss": "NaN", "eval_loss": "inf"}]}],
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
        assert_eq!(t.curve[0].eval_loss, f64::INFINITY);
        let again = read(&doc.to_json().unwrap()).unwrap();
        assert_eq!(again.tasks.len(), 1);
        assert_eq!(again.spec, doc.spec);
        assert!(again.tasks[0].curve[0].train_loss.is_nan());
    }
}
