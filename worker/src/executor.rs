//! Runs one task attempt on a blocking thread: reads the `pb::Task` into a
//! `TaskPlan`, hands it to the job driver (`nt_runtime::job`) with the
//! object store as its I/O, and turns what the driver returns into a
//! `pb::TaskResult`. Epoch states and the final model go under the
//! attempt's own prefix.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use nt_common::{layout, Storage};
use nt_proto::v1 as pb;
use nt_runtime::data::{DataCache, DataSpec, FileSource, Listed, LoadReport, LocalDir};
use nt_runtime::job::{
    self, ArchOf, EvalJob, JobHooks, JobIo, ModelRef, Normalize, Provenance, Start, Started,
    TrainJob, Trained,
};
use nt_runtime::train::{EpochRecord, Evaluation, Progress};
use nt_runtime::RuntimeError;
use nt_spec::{EvalItem, Job, TaskPlan};
use tch::Device;
use tokio::runtime::Handle;
use tokio::sync::mpsc::UnboundedSender;

/// Why an attempt stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The run was cancelled.
    Cancelled,
    /// The lease went to another attempt.
    LeaseLost,
    /// The worker is shutting down.
    Shutdown,
}

/// Shared between the executing thread and the worker's async side.
#[derive(Default)]
pub struct TaskControl {
    stop: AtomicU8,
}

impl TaskControl {
    /// Asks the attempt to stop; true the first time.
    pub fn stop(&self, reason: StopReason) -> bool {
        let code = match reason {
            StopReason::Cancelled => 1,
            StopReason::LeaseLost => 2,
            StopReason::Shutdown => 3,
        };
        self.stop
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    pub fn stopped(&self) -> Option<StopReason> {
        match self.stop.load(Ordering::SeqCst) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::LeaseLost),
            3 => Some(StopReason::Shutdown),
            _ => None,
        }
    }
}

/// How an attempt ended without a result.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("stopped: {0:?}")]
    Stopped(StopReason),
    /// Another attempt may succeed (storage outage, device trouble).
    #[error("{0}")]
    Retryable(String),
    /// The task itself is wrong (bad data, bad checkpoint); retrying cannot help.
    #[error("{0}")]
    Fatal(String),
    /// A joint task's models cannot train jointly here (refused, or the
    /// device has no room for them all): the coordinator trains them apart.
    #[error("{0}")]
    NotJoint(String),
}

impl From<RuntimeError> for TaskError {
    fn from(e: RuntimeError) -> Self {
        if let RuntimeError::NotJoint(why) = e {
            TaskError::NotJoint(why)
        } else if e.is_retryable() {
            TaskError::Retryable(e.to_string())
        } else {
            TaskError::Fatal(e.to_string())
        }
    }
}

/// A progress message for the coordinator.
pub struct ProgressMessage {
    /// None for a message that only announces a checkpoint.
    pub progress: Option<pb::TaskProgress>,
    pub checkpoint: Option<(String, u32)>,
    pub epoch: Option<pb::CurvePoint>,
    /// The part of a joint task the progress and the epoch are about.
    pub part: Option<u32>,
}

/// What an attempt needs from its worker.
pub struct Env {
    pub storage: Storage,
    pub runtime: Handle,
    /// The worker's device (a CPU run stays on the CPU, see [`task_device`]).
    pub device: Device,
    pub threads: Option<usize>,
    /// The folders local data may be read from, resolved.
    pub data_dirs: Arc<[PathBuf]>,
}

/// Resolves `--data-dir` (symlinks, `..`); folders that do not exist are
/// left out, with a warning.
pub fn resolve_data_dirs(dirs: &[PathBuf]) -> Arc<[PathBuf]> {
    dirs.iter()
        .filter_map(|d| match std::fs::canonicalize(d) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(dir = %d.display(), error = %e, "a --data-dir is not readable; leaving it out");
                None
            }
        })
        .collect()
}

/// The resolved folder of a local `data.path`, when it lies within one of
/// `allowed`. The same error for a folder outside them and one that does not
/// exist, so a client learns nothing about the worker's files.
pub fn allowed_data_dir(dir: &str, allowed: &[PathBuf]) -> nt_runtime::Result<PathBuf> {
    let refused = || {
        let list: Vec<_> = allowed.iter().map(|d| d.display().to_string()).collect();
        RuntimeError::Spec(format!(
            "data.path `{dir}` is not a folder within this worker's data folders ({}); \
             configure them with nt-worker --data-dir, or put the data in the store \
             (store:<prefix>)",
            if list.is_empty() {
                "none".into()
            } else {
                list.join(", ")
            }
        ))
    };
    let resolved = std::fs::canonicalize(dir).map_err(|_| refused())?;
    if allowed.iter().any(|a| resolved.starts_with(a)) && resolved.is_dir() {
        Ok(resolved)
    } else {
        Err(refused())
    }
}

/// The object store as the job's I/O, blocking on the worker's runtime.
struct StoreIo<'a>(&'a Env);

impl JobIo for StoreIo<'_> {
    fn read(&self, key: &str) -> nt_runtime::Result<Vec<u8>> {
        match self.0.runtime.block_on(self.0.storage.get(key)) {
            Ok(Some((bytes, _))) => Ok(Vec::from(bytes)),
            Ok(None) => Err(RuntimeError::Missing(key.to_string())),
            Err(e) => Err(RuntimeError::Storage(format!("reading `{key}`: {e}"))),
        }
    }

    fn write(&self, key: &str, bytes: Vec<u8>) -> nt_runtime::Result<()> {
        self.0
            .runtime
            .block_on(self.0.storage.put(key, Bytes::from(bytes)))
            .map(|_| ())
            .map_err(|e| RuntimeError::Storage(format!("writing `{key}`: {e}")))
    }

    /// Decoded image folders are kept in the store, for every worker.
    fn data_cache(&self) -> Option<Box<dyn DataCache + '_>> {
        Some(Box::new(StoreCache(self)))
    }

    /// `store:<prefix>` reads the data set's files from the store, anything
    /// else from the worker's own folders.
    fn data_source(&self, spec: &DataSpec) -> nt_runtime::Result<Box<dyn FileSource + '_>> {
        Ok(
            match spec.path.as_deref().and_then(|p| p.strip_prefix("store:")) {
                Some(prefix) => Box::new(StoreSource {
                    io: self,
                    prefix: prefix.to_string(),
                }),
                // A data set with files (a folder given, or the default
                // data set's) reads them only within the data folders; one
                // without (synthetic) reads none.
                None => Box::new(LocalDir(match spec.location().filter(|d| !d.is_empty()) {
                    Some(dir) => allowed_data_dir(&dir, &self.0.data_dirs)?,
                    None => std::path::PathBuf::new(),
                })),
            },
        )
    }
}

/// Decoded image folders under `cache/data/` in the store.
struct StoreCache<'a>(&'a StoreIo<'a>);

impl DataCache for StoreCache<'_> {
    fn key(&self, digest: &str) -> String {
        layout::data_cache(digest)
    }

    fn read(&self, key: &str) -> nt_runtime::Result<Option<Vec<u8>>> {
        match self.0.read(key) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(RuntimeError::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write(&self, key: &str, bytes: Vec<u8>) -> nt_runtime::Result<()> {
        self.0.write(key, bytes)
    }
}

/// Data files under a key prefix of the object store.
struct StoreSource<'a> {
    io: &'a StoreIo<'a>,
    prefix: String,
}

impl FileSource for StoreSource<'_> {
    fn read(&self, name: &str) -> nt_runtime::Result<Option<Vec<u8>>> {
        match self
            .io
            .read(&format!("{}/{name}", self.prefix.trim_end_matches('/')))
        {
            Ok(bytes) => Ok(Some(bytes)),
            Err(RuntimeError::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn list(&self, dir: &str) -> nt_runtime::Result<Vec<Listed>> {
        let root = self.prefix.trim_matches('/');
        let folder = [root, dir.trim_matches('/')]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("/");
        let objects = self
            .io
            .0
            .runtime
            .block_on(self.io.0.storage.list(&folder))
            .map_err(|e| RuntimeError::Storage(format!("listing `{folder}`: {e}")))?;
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let name = o
                    .key
                    .strip_prefix(root)?
                    .trim_start_matches('/')
                    .to_string();
                Some(Listed {
                    name,
                    size: o.size,
                    version: o.version,
                    is_dir: false,
                })
            })
            .collect())
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.io.0.storage.url, self.prefix)
    }
}

/// The driver's hooks: progress and epoch states to the coordinator,
/// directives from it back as stops.
struct Hooks<'a> {
    progress: &'a UnboundedSender<ProgressMessage>,
    control: &'a TaskControl,
}

impl JobHooks for Hooks<'_> {
    fn started(&mut self, start: &Started<'_>) {
        if let Some(epoch) = start.resumed_after {
            tracing::info!(epoch, "resuming from an epoch checkpoint");
        }
    }

    fn progress(&mut self, p: &Progress) {
        self.send(None, p);
    }

    fn part_progress(&mut self, part: usize, p: &Progress) {
        self.send(Some(part as u32), p);
    }

    fn epoch_saved(&mut self, epoch: usize, key: &str) {
        let _ = self.progress.send(ProgressMessage {
            progress: None,
            checkpoint: Some((key.to_string(), epoch as u32)),
            epoch: None,
            part: None,
        });
    }

    fn epoch_save_failed(&mut self, _epoch: usize, error: RuntimeError) -> nt_runtime::Result<()> {
        // Training can go on; a retry would resume from an older state.
        tracing::warn!(error = %error, "writing an epoch checkpoint");
        Ok(())
    }

    fn should_stop(&self) -> bool {
        self.control.stopped().is_some()
    }
}

impl Hooks<'_> {
    /// Progress (of a joint task's `part`) to the coordinator.
    fn send(&mut self, part: Option<u32>, p: &Progress) {
        let _ = self.progress.send(ProgressMessage {
            progress: Some(pb::TaskProgress {
                epoch: p.epoch as u32,
                epochs: p.epochs as u32,
                step: p.step as u32,
                steps: p.steps as u32,
                loss: p.loss,
                accuracy: p.accuracy,
                samples_per_second: p.samples_per_second,
                lr: p.lr,
                eval_accuracy: p
                    .epoch_end
                    .as_ref()
                    .and_then(|e| e.eval.map(|v| v.accuracy)),
            }),
            checkpoint: None,
            epoch: p.epoch_end.as_ref().map(curve_point),
            part,
        });
    }
}

/// Executes one attempt; blocking.
pub fn execute(
    task: &pb::Task,
    env: &Env,
    progress: &UnboundedSender<ProgressMessage>,
    control: &TaskControl,
) -> Result<pb::TaskResult, TaskError> {
    let start = Instant::now();
    if let Some(n) = env.threads {
        tch::set_num_threads(n as i32);
    }
    let plan = TaskPlan::from_wire(task).map_err(|e| TaskError::Fatal(e.to_string()))?;
    let device = task_device(plan.device, env.device);
    let io = StoreIo(env);
    let mut hooks = Hooks { progress, control };
    let done = match &plan.job {
        Job::Train { .. } | Job::FineTune { .. } => train(&plan, device, &io, &mut hooks),
        Job::Evaluate { items } => evaluate(&plan, device, items, &io, &mut hooks),
        Job::Joint { parts } => joint::train(&plan, parts, device, &io, &mut hooks),
    };
    let mut result = done.map_err(|e| match e {
        RuntimeError::Stopped => {
            TaskError::Stopped(control.stopped().unwrap_or(StopReason::Shutdown))
        }
        e => e.into(),
    })?;
    result.compute_seconds = start.elapsed().as_secs_f64();
    // A joint task's parts share its compute evenly.
    let share = result.compute_seconds / result.parts.len().max(1) as f64;
    for part in &mut result.parts {
        part.compute_seconds = share;
    }
    Ok(result)
}

/// The training job of a training or fine-tuning task (`None` for any
/// other): from a fresh initialisation or its init checkpoint, distilling
/// from its teachers, its epoch states and model under its own prefix.
fn train_job(plan: &TaskPlan, device: Device) -> Option<TrainJob> {
    let given = |key: &String| ModelRef {
        key: key.clone(),
        arch: ArchOf::Given(plan.arch.clone()),
    };
    let (config, start, teachers) = match &plan.job {
        Job::Train { config } => (config, Start::Fresh(plan.arch.clone()), Vec::new()),
        Job::FineTune {
            config,
            init,
            teachers,
        } => (
            config,
            Start::Checkpoint(given(init)),
            teachers.iter().map(given).collect(),
        ),
        Job::Evaluate { .. } | Job::Joint { .. } => return None,
    };
    Some(TrainJob {
        start,
        teachers,
        config: config.clone(),
        data: plan.data.clone(),
        device,
        eval_batch: plan.eval_batch,
        resume: plan.resume_state.clone(),
        epoch_states: Some(plan.output_prefix.clone()),
        output: layout::attempt_model(&plan.output_prefix),
        provenance: Provenance::Run {
            run: plan.run_id.clone(),
        },
    })
}

fn train(
    plan: &TaskPlan,
    device: Device,
    io: &StoreIo<'_>,
    hooks: &mut Hooks<'_>,
) -> nt_runtime::Result<pb::TaskResult> {
    let job = train_job(plan, device)
        .ok_or_else(|| RuntimeError::Spec(format!("task `{}` trains nothing", plan.task_id)))?;
    let trained = job::run_training(&job, io, hooks)?;
    Ok(trained_result(plan, &job, trained))
}

/// The result of a training job: its model, curve and scores (before, for
/// a fine-tuning, and after), named by the task's label.
fn trained_result(plan: &TaskPlan, job: &TrainJob, trained: Trained) -> pb::TaskResult {
    let init = match &job.start {
        Start::Checkpoint(m) => m.key.clone(),
        Start::Fresh(_) => String::new(),
    };
    if let Some(loaded) = &trained.data {
        tracing::info!(
            source = %loaded.source,
            images = loaded.images,
            skipped = loaded.skipped.len(),
            seconds = loaded.seconds,
            cache_hit = loaded.cache_hit,
            cache_key = %loaded.cache_key,
            "data loaded"
        );
        for file in loaded.skipped.iter().take(20) {
            tracing::warn!(file = %file, "skipped an undecodable image");
        }
    }
    let parameters = plan.arch.parameter_count();
    pb::TaskResult {
        checkpoint: trained.key.clone(),
        curve: trained.outcome.history.iter().map(curve_point).collect(),
        before: trained
            .before
            .map(|b| model_report(&plan.label, parameters, b, &init)),
        after: Some(pb::ModelReport {
            data: trained.data.as_ref().map(data_load),
            ..model_report(&plan.label, parameters, trained.after, &trained.key)
        }),
        samples_per_second: trained.outcome.samples_per_second,
        ..Default::default()
    }
}

fn evaluate(
    plan: &TaskPlan,
    device: Device,
    items: &[EvalItem],
    io: &StoreIo<'_>,
    hooks: &mut Hooks<'_>,
) -> nt_runtime::Result<pb::TaskResult> {
    let job = EvalJob {
        items: items.to_vec(),
        arch: ArchOf::Given(plan.arch.clone()),
        data: plan.data.clone(),
        device,
        eval_batch: plan.eval_batch,
        normalize: Normalize::Recorded,
    };
    let evaluated = job::run_evaluation(&job, io, hooks)?;
    Ok(pb::TaskResult {
        evaluations: evaluated
            .iter()
            .zip(items)
            .map(|(e, item)| {
                let first = item.checkpoints.first().map_or("", |s| s);
                model_report(&e.name, e.parameters, e.evaluation, first)
            })
            .collect(),
        ..Default::default()
    })
}

fn curve_point(e: &EpochRecord) -> pb::CurvePoint {
    pb::CurvePoint {
        epoch: e.epoch as u32,
        train_loss: e.train_loss,
        train_accuracy: e.train_accuracy,
        eval_accuracy: e.eval.map_or(0.0, |v| v.accuracy),
        eval_loss: e.eval.map_or(0.0, |v| v.loss),
    }
}

fn model_report(name: &str, parameters: usize, e: Evaluation, checkpoint: &str) -> pb::ModelReport {
    pb::ModelReport {
        name: name.to_string(),
        accuracy: e.accuracy,
        loss: e.loss,
        parameters: parameters as u64,
        checkpoint: checkpoint.to_string(),
        data: None,
    }
}

fn data_load(l: &LoadReport) -> pb::DataLoad {
    pb::DataLoad {
        source: l.source.clone(),
        images: l.images as u64,
        skipped: l.skipped.len() as u64,
        seconds: l.seconds,
        cache_hit: l.cache_hit,
        cache_key: l.cache_key.clone(),
    }
}

/// Where a task runs on a worker whose own device is `worker`: a run that
/// asked for the CPU trains on the CPU even on a GPU worker; otherwise the
/// worker's device (the coordinator sends GPU tasks to GPU workers only).
pub fn task_device(requirement: nt_spec::Device, worker: Device) -> Device {
    match requirement {
        nt_spec::Device::Cpu => Device::Cpu,
        nt_spec::Device::Gpu | nt_spec::Device::Any => worker,
    }
}

mod joint;
#[cfg(test)]
mod tests;
