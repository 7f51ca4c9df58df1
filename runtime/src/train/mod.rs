//! Training, fine-tuning (optionally distilling from the members' ensemble)
//! and evaluation of networks with libtorch, on CPU or CUDA.
//!
//! Determinism: initialisation, data order and augmentation are drawn on the
//! host from seeds derived from (seed, epoch), not from libtorch's global
//! generator, so a CPU run is reproducible bit for bit even while other
//! trainings run in the same process, and a run resumed from an epoch
//! checkpoint (which holds the weights and the momentum buffers) equals an
//! uninterrupted one. Dropout alone draws from libtorch's generator, which is
//! reseeded every epoch: with dropout, concurrent trainings in one process
//! are not bit-reproducible.

mod eval;
mod joint;
mod sgd;
mod state_file;

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

pub use eval::{evaluate, evaluate_ensemble, Evaluation};
pub use joint::{evaluate_joint, train_joint, JointHooks, JointOutcome};
pub use nt_spec::train::{Distill, Schedule, TrainConfig};
pub use sgd::{Sgd, SgdConfig};
pub use state_file::{
    joint_state_from_bytes, joint_state_to_bytes, train_state_from_bytes, train_state_to_bytes,
    META_JOINT_STATE, META_TRAIN_STATE,
};

use crate::data::{permutation, AugmentDraws, DeviceSet, SplitMix64};
use crate::model::{Network, Precision};
use crate::{Result, RuntimeError};
use fusion::arch::Architecture;
use fusion::state::StateDict;

/// What the trainer reports while it runs.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    /// 1-based epoch.
    pub epoch: usize,
    pub epochs: usize,
    /// Step within the epoch (1-based).
    pub step: usize,
    pub steps: usize,
    /// Mean training loss since the last report.
    pub loss: f64,
    /// Training accuracy since the last report.
    pub accuracy: f64,
    pub samples_per_second: f64,
    pub lr: f64,
    /// Set on the report that ends an epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch_end: Option<EpochRecord>,
}

/// One finished epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    /// On the evaluation set, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<Evaluation>,
    pub seconds: f64,
    /// Training samples per second (evaluation excluded).
    pub samples_per_second: f64,
}

/// Whether training goes on (cancellation answers `Stop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Everything needed to resume after `epoch` completed epochs.
#[derive(Clone, Debug)]
pub struct TrainState {
    pub epoch: usize,
    pub model: StateDict,
    pub momentum: StateDict,
    pub history: Vec<EpochRecord>,
}

/// Callbacks of a training run: progress reports and epoch checkpoints.
pub trait TrainHooks {
    /// Called every `log_every` steps and at each epoch's end.
    fn progress(&mut self, _progress: &Progress) -> Control {
        Control::Continue
    }

    /// Asked after every step: true ends the training at once (as
    /// `Control::Stop` from a report would), so a cancellation does not wait
    /// for the next progress report.
    fn stop_requested(&self) -> bool {
        false
    }

    /// Called after each epoch with a way to take the state to checkpoint.
    fn epoch_end(&mut self, _epoch: usize, _state: &dyn Fn() -> Result<TrainState>) -> Result<()> {
        Ok(())
    }
}

/// Hooks that do nothing.
pub struct NoHooks;
impl TrainHooks for NoHooks {}

/// The result of a run.
#[derive(Clone, Debug, Serialize)]
pub struct TrainOutcome {
    pub history: Vec<EpochRecord>,
    /// True when a hook stopped the run early.
    pub stopped: bool,
    /// Training samples per second over the whole run (evaluation excluded).
    pub samples_per_second: f64,
}

fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    let mut rng = SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    rng.next_u64()
}

/// Epoch `epoch`'s data order (a device permutation) and augmentation
/// draws for `config.seed`.
fn epoch_order(
    config: &TrainConfig,
    len: usize,
    epoch: usize,
    device: tch::Device,
) -> Result<(Tensor, Option<AugmentDraws>)> {
    let seed = epoch_seed(config.seed, epoch);
    let order: Vec<i64> = permutation(len, seed)
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let order = Tensor::from_slice(&order).f_to_device(device)?;
    let draws = if config.augment.is_off() {
        None
    } else {
        Some(AugmentDraws::new(
            len,
            &config.augment,
            seed ^ 0xa5a5,
            device,
        )?)
    };
    Ok((order, draws))
}

/// A network initialised for `seed` with PyTorch's distributions.
pub fn init_network(arch: &Architecture, device: tch::Device, seed: u64) -> Result<Network> {
    Network::init(arch, device, seed)
}

/// Mean logits of the teachers on `x` (evaluation mode, no gradients).
fn teacher_logits(teachers: &[Network], x: &Tensor) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for t in teachers {
        let y = t.predict(x)?;
        sum = Some(match sum {
            None => y,
            Some(s) => s.f_add(&y)?,
        });
    }
    let sum = sum.ok_or_else(|| RuntimeError::spec("distillation needs at least one teacher"))?;
    Ok(sum.f_div_scalar(teachers.len() as f64)?)
}

/// A member's loss from its logits and cross-entropy on `x`: the
/// cross-entropy, or with `distill` its mix with the soft targets of the
/// teachers' mean logits.
fn member_loss(
    logits: &Tensor,
    ce: &Tensor,
    x: &Tensor,
    teachers: &[Network],
    distill: Option<Distill>,
) -> Result<Tensor> {
    let Some(d) = distill else {
        return Ok(ce.shallow_clone());
    };
    let n = logits.size()[0];
    let t = teacher_logits(teachers, x)?;
    let soft_targets = t.f_div_scalar(d.temperature)?.f_softmax(-1, Kind::Float)?;
    let log_probs = logits
        .f_div_scalar(d.temperature)?
        .f_log_softmax(-1, Kind::Float)?;
    let soft = soft_targets
        .f_mul(&log_probs)?
        .f_sum(Kind::Float)?
        .f_neg()?
        .f_div_scalar(n as f64)?
        .f_mul_scalar(d.temperature * d.temperature)?;
    Ok(soft
        .f_mul_scalar(d.weight)?
        .f_add(&ce.f_mul_scalar(1.0 - d.weight)?)?)
}

/// Trains `net` on `train`, evaluating on `eval` after every epoch. With
/// `teachers` and `config.distill`, distils from their mean logits. With
/// `resume`, continues after its epoch (its weights replace the network's).
pub fn train(
    net: &mut Network,
    config: &TrainConfig,
    train: &DeviceSet,
    eval: Option<&DeviceSet>,
    teachers: &[Network],
    resume: Option<TrainState>,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainOutcome> {
    config.validate()?;
    let device = train.device();
    let precision = if config.bf16 && device.is_cuda() {
        Precision::Bf16
    } else {
        Precision::F32
    };
    let names: Vec<String> = net
        .params()
        .iter()
        .filter(|p| p.spec.role.trainable())
        .map(|p| p.spec.name.clone())
        .collect();
    let (start_epoch, mut history, momentum) = match resume {
        None => (0, Vec::new(), None),
        Some(state) => {
            *net = Network::from_state(net.arch(), &state.model, device)?;
            (state.epoch, state.history, Some(state.momentum))
        }
    };
    let mut sgd = Sgd::new(
        &net.trainable(),
        SgdConfig {
            momentum: config.momentum,
            weight_decay: config.weight_decay,
            nesterov: config.nesterov,
        },
    )?;
    if let Some(momentum) = &momentum {
        sgd.load_state(&names, momentum)?;
    }
    let distill = if teachers.is_empty() {
        None
    } else {
        config.distill
    };
    let steps = train.len.div_ceil(config.batch_size);
    let log_every = if config.log_every == 0 {
        steps
    } else {
        config.log_every
    };
    let mut stopped = false;
    let mut total_samples = 0usize;
    let mut total_seconds = 0.0f64;

    for epoch in start_epoch..config.epochs {
        let lr = config.schedule.lr(config.lr, epoch, config.epochs);
        // Dropout is the one user of libtorch's global generator.
        tch::manual_seed(epoch_seed(config.seed, epoch) as i64);
        let (order, draws) = epoch_order(config, train.len, epoch, device)?;

        let start = Instant::now();
        let mut window_start = Instant::now();
        let zero = || Tensor::f_zeros([], (Kind::Float, device));
        let (mut loss_sum, mut correct) = (zero()?, zero()?);
        let (mut epoch_loss, mut epoch_correct) = (zero()?, zero()?);
        let (mut window_samples, mut epoch_samples) = (0usize, 0usize);

        for (step, batch) in train.batches(config.batch_size, Some(&order)).enumerate() {
            let (x, y) = batch?;
            let x = match &draws {
                None => x,
                Some(d) => {
                    let n = y.size()[0];
                    let start = (step * config.batch_size) as i64;
                    train.augment(&x, &config.augment, &d.slice(start, n)?)?
                }
            };
            let n = y.size()[0] as usize;
            let logits = net.forward_with(&x, true, precision)?;
            let ce = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0)?;
            let loss = member_loss(&logits, &ce, &x, teachers, distill)?;
            // Gradients come back as tensors rather than accumulating into
            // `.grad`, so nothing needs zeroing between steps.
            let grads = Tensor::f_run_backward(&[&loss], &net.trainable(), false, false)?;
            sgd.step(&grads, lr)?;
            {
                let _g = tch::no_grad_guard();
                let batch_loss = loss.f_detach()?.f_mul_scalar(n as f64)?;
                let batch_correct = logits
                    .f_argmax(-1, false)?
                    .f_eq_tensor(&y)?
                    .f_sum(Kind::Float)?;
                let _ = loss_sum.f_add_(&batch_loss)?;
                let _ = correct.f_add_(&batch_correct)?;
            }
            window_samples += n;
            if hooks.stop_requested() {
                stopped = true;
                break;
            }
            let last = step + 1 == steps;
            if (step + 1) % log_every == 0 || last {
                // The only host synchronisation: once per report.
                let l = loss_sum.f_double_value(&[])?;
                let c = correct.f_double_value(&[])?;
                let _ = epoch_loss.f_add_(&loss_sum)?;
                let _ = epoch_correct.f_add_(&correct)?;
                epoch_samples += window_samples;
                let secs = window_start.elapsed().as_secs_f64();
                let mut progress = Progress {
                    epoch: epoch + 1,
                    epochs: config.epochs,
                    step: step + 1,
                    steps,
                    loss: l / window_samples as f64,
                    accuracy: c / window_samples as f64,
                    samples_per_second: window_samples as f64 / secs.max(1e-9),
                    lr,
                    epoch_end: None,
                };
                if last {
                    let train_seconds = start.elapsed().as_secs_f64();
                    total_samples += epoch_samples;
                    total_seconds += train_seconds;
                    let evaluation = match eval {
                        Some(set) => Some(evaluate(net, set, config.batch_size.max(1024))?),
                        None => None,
                    };
                    let record = EpochRecord {
                        epoch: epoch + 1,
                        lr,
                        train_loss: epoch_loss.f_double_value(&[])? / epoch_samples as f64,
                        train_accuracy: epoch_correct.f_double_value(&[])? / epoch_samples as f64,
                        eval: evaluation,
                        seconds: start.elapsed().as_secs_f64(),
                        samples_per_second: epoch_samples as f64 / train_seconds.max(1e-9),
                    };
                    history.push(record.clone());
                    progress.epoch_end = Some(record);
                }
                if hooks.progress(&progress) == Control::Stop {
                    stopped = true;
                }
                loss_sum = zero()?;
                correct = zero()?;
                window_samples = 0;
                window_start = Instant::now();
                if stopped {
                    break;
                }
            }
        }
        if stopped {
            break;
        }
        let snapshot = || -> Result<TrainState> {
            Ok(TrainState {
                epoch: epoch + 1,
                model: net.to_state()?,
                momentum: sgd.state(&names)?,
                history: history.clone(),
            })
        };
        hooks.epoch_end(epoch + 1, &snapshot)?;
    }
    Ok(TrainOutcome {
        history,
        stopped,
        samples_per_second: total_samples as f64 / total_seconds.max(1e-9),
    })
}
