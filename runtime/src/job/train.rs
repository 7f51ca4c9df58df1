//! Training and fine-tuning through the driver.

use std::collections::BTreeMap;

use fusion::arch::Architecture;
use fusion::checkpoint::{self, Lineage};
use fusion::state::StateDict;
use nt_spec::{DataSpec, TrainConfig};
use tch::Device;

use super::{load_model, prepare, recorded_normalization, JobHooks, JobIo, ModelRef, Started};
use crate::data::LoadReport;
use crate::model::Network;
use crate::train::{self, Control, Evaluation, Progress, TrainHooks, TrainOutcome, TrainState};
use crate::{Result, RuntimeError};

/// Where a training starts.
#[derive(Clone, Debug)]
pub enum Start {
    /// A fresh network, initialised from `config.seed`.
    Fresh(Architecture),
    /// A checkpoint (fine-tuning): the data is normalised as it recorded.
    Checkpoint(ModelRef),
}

/// What the saved model's lineage records besides what every model
/// records: its method (`trained` or `fine-tuned`), the initial checkpoint
/// as its member, its `test_accuracy` and its seed.
#[derive(Clone, Debug)]
pub enum Provenance {
    /// A run's model: a lineage of its own, naming the run.
    Run { run: String },
    /// A model made offline: it carries on the initial checkpoint's lineage
    /// and adds its `test_loss` and these notes (the data set, the epochs).
    Offline { notes: BTreeMap<String, String> },
}

/// A training or fine-tuning.
#[derive(Clone, Debug)]
pub struct TrainJob {
    pub start: Start,
    /// Distil from these models' mean logits (with `config.distill`).
    pub teachers: Vec<ModelRef>,
    pub config: TrainConfig,
    pub data: DataSpec,
    pub device: Device,
    pub eval_batch: usize,
    /// An epoch state to continue from.
    pub resume: Option<String>,
    /// Store a resumable state after every epoch under this prefix
    /// ([`epoch_state_key`]).
    pub epoch_states: Option<String>,
    /// Where the trained model goes.
    pub output: String,
    pub provenance: Provenance,
}

/// A finished training; the model is stored under `key`.
#[derive(Clone, Debug)]
pub struct Trained {
    pub key: String,
    pub arch: Architecture,
    /// Fine-tuning: the initial model on the test set.
    pub before: Option<Evaluation>,
    /// The trained model on the test set.
    pub after: Evaluation,
    /// The history, whether it stopped (never: a stop is an error) and the
    /// training throughput.
    pub outcome: TrainOutcome,
    /// How the user's own data was loaded (image folders and arrays).
    pub data: Option<LoadReport>,
}

/// The key of epoch `epoch`'s state under `prefix`.
pub fn epoch_state_key(prefix: &str, epoch: usize) -> String {
    format!(
        "{}/epoch-{epoch:04}.state.safetensors",
        prefix.trim_end_matches('/')
    )
}

/// Trains `job`, stores the model under `job.output` and says how it went.
pub fn run_training(job: &TrainJob, io: &dyn JobIo, hooks: &mut dyn JobHooks) -> Result<Trained> {
    let device = job.device;
    let (arch, init) = match &job.start {
        Start::Fresh(arch) => (arch.clone(), None),
        Start::Checkpoint(model) => {
            let (arch, state) = load_model(io, model)?;
            (arch, Some(state))
        }
    };
    let recorded = init.as_ref().and_then(recorded_normalization);
    // A stop is honoured between the steps of a long set-up, too.
    let stop_point = |hooks: &dyn JobHooks| {
        if hooks.should_stop() {
            Err(RuntimeError::Stopped)
        } else {
            Ok(())
        }
    };
    stop_point(&*hooks)?;
    let data = prepare(io, &job.data, &arch, device, recorded)?;
    stop_point(&*hooks)?;
    let (mut net, before) = match &init {
        None => (train::init_network(&arch, device, job.config.seed)?, None),
        Some(state) => {
            let net = Network::from_state(&arch, state, device)?;
            let before = train::evaluate(&net, &data.test, job.eval_batch)?;
            (net, Some(before))
        }
    };
    let teachers = job
        .teachers
        .iter()
        .map(|t| {
            let (arch, state) = load_model(io, t)?;
            Network::from_state(&arch, &state, device)
        })
        .collect::<Result<Vec<_>>>()?;
    let resume = match &job.resume {
        Some(key) => Some(train::train_state_from_bytes(key, io.read(key)?)?),
        None => None,
    };
    stop_point(&*hooks)?;
    hooks.started(&Started {
        arch: &arch,
        data: &data,
        device,
        resumed_after: resume.as_ref().map(|r| r.epoch),
    });
    let outcome = train::train(
        &mut net,
        &job.config,
        &data.train,
        Some(data.monitor()),
        &teachers,
        resume,
        &mut Driver {
            io,
            hooks: &mut *hooks,
            epoch_states: job.epoch_states.as_deref(),
        },
    )?;
    if outcome.stopped {
        return Err(RuntimeError::Stopped);
    }
    let after = train::evaluate(&net, &data.test, job.eval_batch)?;
    let mut state = net.to_state()?;
    state.set_input(&data.input_spec());
    state.set_lineage(&lineage(job, init.as_ref(), &after));
    io.write(&job.output, checkpoint::to_bytes(&state)?)?;
    Ok(Trained {
        key: job.output.clone(),
        arch,
        before,
        after,
        outcome,
        data: data.loaded.clone(),
    })
}

pub(super) fn lineage(job: &TrainJob, init: Option<&StateDict>, after: &Evaluation) -> Lineage {
    let mut lineage = match &job.provenance {
        Provenance::Run { run } => Lineage {
            run: Some(run.clone()),
            ..Lineage::default()
        },
        Provenance::Offline { notes } => {
            let mut lineage = init.and_then(|s| s.lineage()).unwrap_or_default();
            lineage.metrics.insert("test_loss".into(), after.loss);
            lineage.notes.extend(notes.clone());
            lineage
        }
    };
    lineage.method = match &job.start {
        Start::Fresh(_) => "trained".into(),
        Start::Checkpoint(model) => {
            lineage.members = vec![model.key.clone()];
            "fine-tuned".into()
        }
    };
    lineage
        .metrics
        .insert("test_accuracy".into(), after.accuracy);
    lineage
        .notes
        .insert("seed".into(), job.config.seed.to_string());
    lineage
}

/// The trainer's hooks: progress and stops go to the job's hooks, epoch
/// states to the store. Joint trainings use it too (`job/joint.rs`).
pub(super) struct Driver<'a> {
    pub(super) io: &'a dyn JobIo,
    pub(super) hooks: &'a mut dyn JobHooks,
    pub(super) epoch_states: Option<&'a str>,
}

impl Driver<'_> {
    /// Whether the job's hooks let training go on.
    pub(super) fn control(&self) -> Control {
        if self.hooks.should_stop() {
            Control::Stop
        } else {
            Control::Continue
        }
    }

    /// Stores epoch `epoch`'s state (`bytes`) when the job keeps them.
    pub(super) fn save_epoch(
        &mut self,
        epoch: usize,
        bytes: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<()> {
        let Some(prefix) = self.epoch_states else {
            return Ok(());
        };
        let key = epoch_state_key(prefix, epoch);
        match self.io.write(&key, bytes()?) {
            Ok(()) => {
                self.hooks.epoch_saved(epoch, &key);
                Ok(())
            }
            Err(e) => self.hooks.epoch_save_failed(epoch, e),
        }
    }
}

impl TrainHooks for Driver<'_> {
    fn stop_requested(&self) -> bool {
        self.hooks.should_stop()
    }

    fn progress(&mut self, progress: &Progress) -> Control {
        self.hooks.progress(progress);
        self.control()
    }

    fn epoch_end(&mut self, epoch: usize, state: &dyn Fn() -> Result<TrainState>) -> Result<()> {
        self.save_epoch(epoch, || train::train_state_to_bytes(&state()?))
    }
}
