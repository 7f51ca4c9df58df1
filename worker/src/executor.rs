//! Runs one task attempt on a blocking thread with the fusion engine:
//! trains a member, fine-tunes a fused model, or evaluates models. Inputs
//! come from the object store, epoch checkpoints and the final model go back
//! to it under the attempt's own prefix.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use bytes::Bytes;
use fusion::arch::Architecture;
use fusion::checkpoint::{self, Lineage};
use fusion::state::StateDict;
use nt_common::{layout, Storage};
use nt_proto::v1 as pb;
use nt_runtime::data::{DataSpec, FileSource, LocalDir, Prepared};
use nt_runtime::model::Network;
use nt_runtime::train::{self, Control, Distill, EpochRecord, Progress, TrainHooks, TrainState};
use nt_spec::wire;
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
}

impl From<nt_runtime::RuntimeError> for TaskError {
    fn from(e: nt_runtime::RuntimeError) -> Self {
        if e.is_retryable() {
            TaskError::Retryable(e.to_string())
        } else {
            TaskError::Fatal(e.to_string())
        }
    }
}

impl From<fusion::FusionError> for TaskError {
    fn from(e: fusion::FusionError) -> Self {
        nt_runtime::RuntimeError::from(e).into()
    }
}

/// A progress message for the coordinator.
pub struct ProgressMessage {
    /// None for a message that only announces a checkpoint.
    pub progress: Option<pb::TaskProgress>,
    pub checkpoint: Option<(String, u32)>,
    pub epoch: Option<pb::CurvePoint>,
}

/// What an attempt needs from its worker.
pub struct Env {
    pub storage: Storage,
    pub runtime: Handle,
    pub device: Device,
    pub threads: Option<usize>,
}

impl Env {
    fn get(&self, key: &str) -> Result<Bytes, TaskError> {
        match self.runtime.block_on(self.storage.get(key)) {
            Ok(Some((b, _))) => Ok(b),
            Ok(None) => Err(TaskError::Fatal(format!("object `{key}` does not exist"))),
            Err(e) => Err(TaskError::Retryable(format!("reading `{key}`: {e}"))),
        }
    }

    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), TaskError> {
        self.runtime
            .block_on(self.storage.put(key, Bytes::from(bytes)))
            .map(|_| ())
            .map_err(|e| TaskError::Retryable(format!("writing `{key}`: {e}")))
    }

    fn load_state(&self, key: &str) -> Result<StateDict, TaskError> {
        let bytes = self.get(key)?;
        Ok(checkpoint::load_bytes(key, Vec::from(bytes))?)
    }
}

/// Data files under a key prefix of the object store.
struct StoreSource<'a> {
    env: &'a Env,
    prefix: String,
}

impl FileSource for StoreSource<'_> {
    fn read(&self, name: &str) -> nt_runtime::Result<Option<Vec<u8>>> {
        let key = format!("{}/{name}", self.prefix.trim_end_matches('/'));
        match self.env.runtime.block_on(self.env.storage.get(&key)) {
            Ok(found) => Ok(found.map(|(b, _)| Vec::from(b))),
            Err(e) => Err(nt_runtime::RuntimeError::Data(format!(
                "reading `{key}`: {e}"
            ))),
        }
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.env.storage.url, self.prefix)
    }
}

fn load_data(
    env: &Env,
    spec: &DataSpec,
    arch: &Architecture,
    device: Device,
    normalization: Option<nt_runtime::data::Normalization>,
) -> Result<Prepared, TaskError> {
    let splits = match spec.path.as_deref().and_then(|p| p.strip_prefix("store:")) {
        Some(prefix) => nt_runtime::data::load(
            spec,
            &StoreSource {
                env,
                prefix: prefix.to_string(),
            },
        )?,
        None => {
            let dir = spec.location().unwrap_or_default();
            nt_runtime::data::load(spec, &LocalDir(dir.into()))?
        }
    };
    splits.check_fits(arch)?;
    Ok(splits.to_device_with(device, normalization)?)
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

fn model_report(
    name: &str,
    arch: &Architecture,
    e: train::Evaluation,
    checkpoint: &str,
) -> pb::ModelReport {
    pb::ModelReport {
        name: name.to_string(),
        accuracy: e.accuracy,
        loss: e.loss,
        parameters: arch.parameter_count() as u64,
        checkpoint: checkpoint.to_string(),
    }
}

/// Training hooks: progress to the coordinator, epoch states to the store.
struct Hooks<'a> {
    env: &'a Env,
    task: &'a pb::Task,
    progress: &'a UnboundedSender<ProgressMessage>,
    control: &'a TaskControl,
}

impl TrainHooks for Hooks<'_> {
    fn progress(&mut self, p: &Progress) -> Control {
        let msg = ProgressMessage {
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
        };
        let _ = self.progress.send(msg);
        if self.control.stopped().is_some() {
            Control::Stop
        } else {
            Control::Continue
        }
    }

    fn epoch_end(
        &mut self,
        epoch: usize,
        state: &dyn Fn() -> nt_runtime::Result<TrainState>,
    ) -> nt_runtime::Result<()> {
        let key = layout::epoch_state(&self.task.output_prefix, epoch);
        let bytes = nt_runtime::train::train_state_to_bytes(&state()?)?;
        if let Err(e) = self.env.put(&key, bytes) {
            // Training can go on; a retry would resume from an older state.
            tracing::warn!(error = %e, "writing an epoch checkpoint");
            return Ok(());
        }
        let _ = self.progress.send(ProgressMessage {
            progress: None,
            checkpoint: Some((key, epoch as u32)),
            epoch: None,
        });
        Ok(())
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
    let arch = Architecture::from_json(&task.architecture_json)?;
    let data_spec = wire::data_from_wire(&task.data.clone().unwrap_or_default());
    let device = env.device;
    let kind = pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Unspecified);
    // Models are evaluated and fine-tuned with the normalisation they were trained with.
    let first_model = match kind {
        pb::TaskKind::FineTune => Some(env.load_state(&task.init_checkpoint)?),
        pb::TaskKind::Evaluate => match task.evaluate.first().and_then(|i| i.checkpoints.first()) {
            Some(k) => Some(env.load_state(k)?),
            None => None,
        },
        _ => None,
    };
    let normalization = first_model
        .as_ref()
        .and_then(|s| s.input())
        .map(|i| nt_runtime::data::Normalization::from(&i));
    let data = load_data(env, &data_spec, &arch, device, normalization)?;
    let mut result = match kind {
        pb::TaskKind::Train | pb::TaskKind::FineTune => {
            let mut config =
                wire::training_from_wire(task.training.as_ref(), task.seed, data_spec.augment);
            let (mut net, before, teachers) = if kind == pb::TaskKind::Train {
                (
                    train::init_network(&arch, device, task.seed)?,
                    None,
                    Vec::new(),
                )
            } else {
                let init = first_model
                    .as_ref()
                    .ok_or_else(|| TaskError::Fatal("fine-tuning without a checkpoint".into()))?;
                let net = Network::from_state(&arch, init, device)?;
                let before =
                    train::evaluate(&net, &data.test, task.eval_batch_size.max(1) as usize)?;
                let teachers = task
                    .teacher_checkpoints
                    .iter()
                    .map(|k| Ok(Network::from_state(&arch, &env.load_state(k)?, device)?))
                    .collect::<Result<Vec<_>, TaskError>>()?;
                config.distill = task.distill.map(|d| Distill {
                    temperature: d.temperature.unwrap_or(2.0),
                    weight: d.weight.unwrap_or(0.25),
                });
                (net, Some(before), teachers)
            };
            let resume = if task.resume_state.is_empty() {
                None
            } else {
                let bytes = env.get(&task.resume_state)?;
                Some(nt_runtime::train::train_state_from_bytes(
                    &task.resume_state,
                    Vec::from(bytes),
                )?)
            };
            if let Some(r) = &resume {
                tracing::info!(epoch = r.epoch, "resuming from an epoch checkpoint");
            }
            let mut hooks = Hooks {
                env,
                task,
                progress,
                control,
            };
            let outcome = train::train(
                &mut net,
                &config,
                &data.train,
                Some(data.monitor()),
                &teachers,
                resume,
                &mut hooks,
            )?;
            if outcome.stopped {
                return Err(TaskError::Stopped(
                    control.stopped().unwrap_or(StopReason::Shutdown),
                ));
            }
            let after = train::evaluate(&net, &data.test, task.eval_batch_size.max(1) as usize)?;
            let mut state = net.to_state()?;
            state.set_input(&data.input_spec());
            let mut lineage = Lineage {
                method: if kind == pb::TaskKind::Train {
                    "trained"
                } else {
                    "fine-tuned"
                }
                .into(),
                run: Some(task.run_id.clone()),
                ..Default::default()
            };
            if kind == pb::TaskKind::FineTune {
                lineage.members = vec![task.init_checkpoint.clone()];
            }
            lineage
                .metrics
                .insert("test_accuracy".into(), after.accuracy);
            lineage.notes.insert("seed".into(), task.seed.to_string());
            state.set_lineage(&lineage);
            let key = layout::attempt_model(&task.output_prefix);
            env.put(&key, checkpoint::to_bytes(&state)?)?;
            pb::TaskResult {
                checkpoint: key.clone(),
                curve: outcome.history.iter().map(curve_point).collect(),
                before: before.map(|b| model_report(&task.label, &arch, b, &task.init_checkpoint)),
                after: Some(model_report(&task.label, &arch, after, &key)),
                evaluations: Vec::new(),
                compute_seconds: 0.0,
                samples_per_second: outcome.samples_per_second,
            }
        }
        pb::TaskKind::Evaluate => {
            let mut cache: HashMap<String, Rc<Network>> = HashMap::new();
            let mut evaluations = Vec::new();
            for item in &task.evaluate {
                let mut nets = Vec::new();
                for key in &item.checkpoints {
                    if control.stopped().is_some() {
                        return Err(TaskError::Stopped(
                            control.stopped().unwrap_or(StopReason::Shutdown),
                        ));
                    }
                    let net = match cache.get(key) {
                        Some(n) => n.clone(),
                        None => {
                            let n =
                                Rc::new(Network::from_state(&arch, &env.load_state(key)?, device)?);
                            cache.insert(key.clone(), n.clone());
                            n
                        }
                    };
                    nets.push(net);
                }
                let refs: Vec<&Network> = nets.iter().map(|n| n.as_ref()).collect();
                let e = train::evaluate_ensemble(
                    &refs,
                    &data.test,
                    task.eval_batch_size.max(1) as usize,
                )?;
                let mut report = model_report(
                    &item.name,
                    &arch,
                    e,
                    item.checkpoints.first().map_or("", |s| s),
                );
                report.parameters *= item.checkpoints.len() as u64;
                evaluations.push(report);
            }
            pb::TaskResult {
                evaluations,
                ..Default::default()
            }
        }
        pb::TaskKind::Unspecified => {
            return Err(TaskError::Fatal(format!(
                "task kind {} is unknown",
                task.kind
            )))
        }
    };
    result.compute_seconds = start.elapsed().as_secs_f64();
    Ok(result)
}
