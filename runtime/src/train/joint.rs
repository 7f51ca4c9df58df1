//! Joint training: K networks of one architecture trained together, one
//! step for all of them, each on its own batch: as one [`JointNetwork`] on
//! CUDA, or each member's own network stepped in turn on the CPU (see
//! `Engine`).
//!
//! Each member keeps its own seed, data order and augmentation draws (those
//! of [`super::train`] for its config), and the loss is the sum of the
//! members' own mean losses: member k's gradient is exactly the gradient of
//! its own loss, and SGD works elementwise, so a jointly trained member is
//! its separately trained twin up to the rounding of batched kernels.

use std::time::Instant;

use tch::{Kind, Reduction, Tensor};

use super::{
    epoch_order, member_loss, Control, Distill, EpochRecord, Evaluation, Progress, Sgd, SgdConfig,
    TrainConfig, TrainOutcome, TrainState,
};
use crate::data::{AugmentDraws, DeviceSet};
use crate::joint::{JointNetwork, Kernels};
use crate::model::{Network, Precision};
use crate::tensor::TchExt;
use crate::{Result, RuntimeError};
use fusion::state::{HostTensor, StateDict};

/// Callbacks of a joint training: per-member progress and joint epoch states.
pub trait JointHooks {
    /// Member `member`'s progress, every `log_every` steps and at each epoch's end.
    fn progress(&mut self, _member: usize, _progress: &Progress) -> Control {
        Control::Continue
    }

    /// Asked after every step: true ends the training at once.
    fn stop_requested(&self) -> bool {
        false
    }

    /// Called after each epoch with a way to take every member's state.
    fn epoch_end(
        &mut self,
        _epoch: usize,
        _states: &dyn Fn() -> Result<Vec<TrainState>>,
    ) -> Result<()> {
        Ok(())
    }
}

impl JointHooks for super::NoHooks {}

/// The result of a joint run.
#[derive(Clone, Debug)]
pub struct JointOutcome {
    /// One per member: its history and its own samples per second.
    pub members: Vec<TrainOutcome>,
    pub stopped: bool,
    /// Training samples per second of all members together.
    pub samples_per_second: f64,
}

/// A small device vector on the host (one synchronisation).
fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?,
    )?)
}

/// Why `configs` cannot train jointly on `nets`, as an error.
fn check(nets: &[Network], configs: &[TrainConfig]) -> Result<()> {
    if nets.len() != configs.len() {
        return Err(RuntimeError::spec(format!(
            "{} networks and {} training configs",
            nets.len(),
            configs.len()
        )));
    }
    let arch = nets
        .first()
        .ok_or_else(|| RuntimeError::NotJoint("no networks".into()))?
        .arch();
    match nt_spec::joint::refusal(arch, configs) {
        Some(why) => Err(RuntimeError::NotJoint(why)),
        None => Ok(()),
    }
}

/// Each member's loss `[K]` from the joint logits `[K, N, classes]`: one
/// cross-entropy over all members (each member's mean), then distillation
/// where a member's config asks for it.
fn batched_losses(
    logits: &Tensor,
    y: &Tensor,
    x: &Tensor,
    teachers: &[Network],
    distills: &[Option<Distill>],
) -> Result<Tensor> {
    let size = logits.size();
    let (k, n, classes) = (size[0], size[1], size[2]);
    let ce = logits
        .f_reshape([-1, classes])?
        .f_cross_entropy_loss::<Tensor>(&y.f_reshape([-1])?, None, Reduction::None, -100, 0.0)?
        .f_reshape([k, n])?
        .f_mean_dim([1i64].as_slice(), false, Kind::Float)?;
    if distills.iter().all(Option::is_none) {
        return Ok(ce);
    }
    let (member_logits, member_ce) = (logits.f_unbind(0)?, ce.f_unbind(0)?);
    let per_member = (0..k as usize)
        .map(|m| {
            member_loss(
                &member_logits[m],
                &member_ce[m],
                &x.f_narrow(0, m as i64 * n, n)?,
                teachers,
                distills[m],
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_stack(&per_member, 0)?)
}

/// Each member's augmentation draws of an epoch as one `[K, len]` set.
fn stack_draws(draws: Vec<Option<AugmentDraws>>) -> Result<Option<AugmentDraws>> {
    let draws: Option<Vec<AugmentDraws>> = draws.into_iter().collect();
    let Some(draws) = draws else {
        return Ok(None);
    };
    let stack = |f: fn(&AugmentDraws) -> &Tensor| -> Result<Tensor> {
        Ok(Tensor::f_stack(
            &draws
                .iter()
                .map(|d| f(d).shallow_clone())
                .collect::<Vec<_>>(),
            0,
        )?)
    };
    Ok(Some(AugmentDraws {
        oy: stack(|d| &d.oy)?,
        ox: stack(|d| &d.ox)?,
        flip: stack(|d| &d.flip)?,
    }))
}

/// Stacks the members' momentum buffers (all present, or none).
fn stack_momentum(states: &[StateDict]) -> Result<StateDict> {
    let mut out = StateDict::default();
    let Some(first) = states.first() else {
        return Ok(out);
    };
    for name in first.tensors.keys() {
        let parts = states
            .iter()
            .enumerate()
            .map(|(k, s)| {
                s.get(name).map(|t| t.to_tch()).ok_or_else(|| {
                    RuntimeError::checkpoint(
                        "joint training state",
                        format!("member {k} lacks momentum buffer `{name}`"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.insert(
            name.clone(),
            HostTensor::from_tch(&Tensor::f_stack(&parts, 0)?)?,
        );
    }
    Ok(out)
}

/// How the K members take a step.
enum Engine {
    /// One stacked network and one optimiser over the stacks: one launch a
    /// layer for all members (the GPU's way).
    Stacked { joint: Box<JointNetwork>, sgd: Sgd },
    /// Each member its own network and optimiser, stepped in turn on its
    /// slice of the one gathered batch: exactly separate training's
    /// arithmetic and working set (the CPU's way, where launches cost
    /// nothing and K members' activations and optimiser state together
    /// outgrow the caches).
    Separate { nets: Vec<Network>, sgds: Vec<Sgd> },
}

impl Engine {
    fn new(
        nets: Vec<Network>,
        kernels: Kernels,
        config: SgdConfig,
        names: &[String],
        momentum: Option<&[StateDict]>,
    ) -> Result<Engine> {
        Ok(match kernels {
            Kernels::Batched => {
                let joint = JointNetwork::stack(&nets)?.with_kernels(kernels);
                drop(nets);
                let mut sgd = Sgd::new(&joint.trainable(), config)?;
                if let Some(m) = momentum {
                    sgd.load_state(names, &stack_momentum(m)?)?;
                }
                Engine::Stacked {
                    joint: Box::new(joint),
                    sgd,
                }
            }
            Kernels::PerMember => {
                let mut sgds = nets
                    .iter()
                    .map(|n| Sgd::new(&n.trainable(), config))
                    .collect::<Result<Vec<_>>>()?;
                if let Some(m) = momentum {
                    for (sgd, state) in sgds.iter_mut().zip(m) {
                        sgd.load_state(names, state)?;
                    }
                }
                Engine::Separate { nets, sgds }
            }
        })
    }

    /// One step on `x` (`[K*N, ...]`, member by member) and `y` (`[K, N]`):
    /// the logits `[K, N, classes]` and each member's loss `[K]`.
    fn step(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        lr: f64,
        precision: Precision,
        teachers: &[Network],
        distills: &[Option<Distill>],
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Engine::Stacked { joint, sgd } => {
                let logits = joint.forward_members(x, true, precision)?;
                let losses = batched_losses(&logits, y, x, teachers, distills)?;
                let total = losses.f_sum(Kind::Float)?;
                let grads = Tensor::f_run_backward(&[&total], &joint.trainable(), false, false)?;
                sgd.step(&grads, lr)?;
                Ok((logits, losses))
            }
            Engine::Separate { nets, sgds } => {
                let xs = x.f_chunk(nets.len() as i64, 0)?;
                let (mut logits, mut losses) = (Vec::new(), Vec::new());
                for (m, (net, sgd)) in nets.iter().zip(sgds.iter_mut()).enumerate() {
                    let out = net.forward_with(&xs[m], true, precision)?;
                    let target = y.f_get(m as i64)?;
                    let ce = out.f_cross_entropy_loss::<Tensor>(
                        &target,
                        None,
                        Reduction::Mean,
                        -100,
                        0.0,
                    )?;
                    let loss = member_loss(&out, &ce, &xs[m], teachers, distills[m])?;
                    let grads = Tensor::f_run_backward(&[&loss], &net.trainable(), false, false)?;
                    sgd.step(&grads, lr)?;
                    logits.push(out.f_detach()?);
                    losses.push(loss.f_detach()?);
                }
                Ok((Tensor::f_stack(&logits, 0)?, Tensor::f_stack(&losses, 0)?))
            }
        }
    }

    fn evaluate(&self, set: &DeviceSet, batch_size: usize) -> Result<Vec<Evaluation>> {
        match self {
            Engine::Stacked { joint, .. } => evaluate_joint(joint, set, batch_size),
            Engine::Separate { nets, .. } => nets
                .iter()
                .map(|n| super::evaluate(n, set, batch_size))
                .collect(),
        }
    }

    /// Every member's weights and momentum buffers.
    fn states(&self, names: &[String]) -> Result<(Vec<StateDict>, Vec<StateDict>)> {
        match self {
            Engine::Stacked { joint, sgd } => {
                let momentum = sgd.state(names)?;
                let mut models = Vec::new();
                let mut momenta = Vec::new();
                for m in 0..joint.members() {
                    let mut own = StateDict::default();
                    for (name, t) in &momentum.tensors {
                        own.insert(
                            name.clone(),
                            HostTensor::from_tch(&t.to_tch().f_get(m as i64)?)?,
                        );
                    }
                    models.push(joint.member_state(m)?);
                    momenta.push(own);
                }
                Ok((models, momenta))
            }
            Engine::Separate { nets, sgds } => Ok((
                nets.iter().map(Network::to_state).collect::<Result<_>>()?,
                sgds.iter().map(|s| s.state(names)).collect::<Result<_>>()?,
            )),
        }
    }

    fn into_members(self) -> Result<Vec<Network>> {
        match self {
            Engine::Stacked { joint, .. } => {
                (0..joint.members()).map(|m| joint.member(m)).collect()
            }
            Engine::Separate { nets, .. } => Ok(nets),
        }
    }
}

/// Trains `nets` jointly (each with its config: equal but for seeds and
/// distillation), evaluating every member on `eval` after each epoch. With
/// `teachers`, members whose config distils learn from the teachers' mean
/// logits on their own batches. With `resume` (one state per member, one
/// epoch), continues after that epoch. `kernels`: how layers with weights
/// run ([`Kernels::for_device`] unless measuring). Returns the trained
/// networks.
#[allow(clippy::too_many_arguments)]
pub fn train_joint(
    nets: Vec<Network>,
    kernels: Kernels,
    configs: &[TrainConfig],
    train: &DeviceSet,
    eval: Option<&DeviceSet>,
    teachers: &[Network],
    resume: Option<Vec<TrainState>>,
    hooks: &mut dyn JointHooks,
) -> Result<(Vec<Network>, JointOutcome)> {
    check(&nets, configs)?;
    for c in configs {
        c.validate()?;
    }
    let config = &configs[0];
    let k = nets.len();
    let device = train.device();
    let precision = if config.bf16 && device.is_cuda() {
        Precision::Bf16
    } else {
        Precision::F32
    };
    let arch = nets[0].arch().clone();
    let (start_epoch, mut histories, momentum, nets) = match resume {
        None => (0, vec![Vec::new(); k], None, nets),
        Some(states) => {
            if states.len() != k || states.iter().any(|s| s.epoch != states[0].epoch) {
                return Err(RuntimeError::checkpoint(
                    "joint training state",
                    format!(
                        "{} member states of differing epochs for {k} members",
                        states.len()
                    ),
                ));
            }
            let nets = states
                .iter()
                .map(|s| Network::from_state(&arch, &s.model, device))
                .collect::<Result<Vec<_>>>()?;
            let momentum: Vec<StateDict> = states.iter().map(|s| s.momentum.clone()).collect();
            let histories = states.iter().map(|s| s.history.clone()).collect();
            (states[0].epoch, histories, Some(momentum), nets)
        }
    };
    let names: Vec<String> = nets[0]
        .params()
        .iter()
        .filter(|p| p.spec.role.trainable())
        .map(|p| p.spec.name.clone())
        .collect();
    let sgd_config = SgdConfig {
        momentum: config.momentum,
        weight_decay: config.weight_decay,
        nesterov: config.nesterov,
    };
    let mut engine = Engine::new(nets, kernels, sgd_config, &names, momentum.as_deref())?;
    let distills: Vec<_> = configs
        .iter()
        .map(|c| if teachers.is_empty() { None } else { c.distill })
        .collect();
    let steps = train.len.div_ceil(config.batch_size);
    let log_every = if config.log_every == 0 {
        steps
    } else {
        config.log_every
    };
    let mut stopped = false;
    let (mut total_samples, mut total_seconds) = (0usize, 0.0f64);
    let zeros = || Tensor::f_zeros([k as i64], (Kind::Float, device));

    for epoch in start_epoch..config.epochs {
        let lr = config.schedule.lr(config.lr, epoch, config.epochs);
        // Every member's order and draws as [K, len]: one gather a step.
        let (orders, draws): (Vec<_>, Vec<_>) = configs
            .iter()
            .map(|c| epoch_order(c, train.len, epoch, device))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let order = Tensor::f_stack(&orders, 0)?;
        let draws = stack_draws(draws)?;
        let start = Instant::now();
        let mut window_start = Instant::now();
        let (mut loss_sum, mut correct) = (zeros()?, zeros()?);
        let (mut epoch_loss, mut epoch_correct) = (zeros()?, zeros()?);
        let (mut window_samples, mut epoch_samples) = (0usize, 0usize);

        for step in 0..steps {
            let from = step * config.batch_size;
            let n = (train.len - from).min(config.batch_size) as i64;
            let member_rows = |t: &Tensor| -> Result<Tensor> {
                Ok(t.f_narrow(1, from as i64, n)?.f_reshape([-1])?)
            };
            // [K*n, ...], member by member.
            let idx = member_rows(&order)?;
            let x = train.x.f_index_select(0, &idx)?;
            let y = train.y.f_index_select(0, &idx)?.f_reshape([k as i64, n])?;
            let x = match &draws {
                None => x,
                Some(d) => {
                    let mine = AugmentDraws {
                        oy: member_rows(&d.oy)?,
                        ox: member_rows(&d.ox)?,
                        flip: member_rows(&d.flip)?,
                    };
                    train.augment(&x, &config.augment, &mine)?
                }
            };
            let (logits, losses) = engine.step(&x, &y, lr, precision, teachers, &distills)?;
            {
                let _g = tch::no_grad_guard();
                let _ = loss_sum.f_add_(&losses.f_detach()?.f_mul_scalar(n as f64)?)?;
                let hits = logits
                    .f_argmax(-1, false)?
                    .f_eq_tensor(&y)?
                    .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?;
                let _ = correct.f_add_(&hits)?;
            }
            window_samples += n as usize;
            if hooks.stop_requested() {
                stopped = true;
                break;
            }
            let last = step + 1 == steps;
            if (step + 1) % log_every != 0 && !last {
                continue;
            }
            let l = host(&loss_sum)?;
            let c = host(&correct)?;
            let _ = epoch_loss.f_add_(&loss_sum)?;
            let _ = epoch_correct.f_add_(&correct)?;
            epoch_samples += window_samples;
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let records = if last {
                let train_seconds = start.elapsed().as_secs_f64();
                total_samples += epoch_samples;
                total_seconds += train_seconds;
                let evaluations = match eval {
                    Some(set) => Some(engine.evaluate(set, config.batch_size.max(1024))?),
                    None => None,
                };
                let el = host(&epoch_loss)?;
                let ec = host(&epoch_correct)?;
                let seconds = start.elapsed().as_secs_f64();
                let records: Vec<EpochRecord> = (0..k)
                    .map(|m| EpochRecord {
                        epoch: epoch + 1,
                        lr,
                        train_loss: el[m] / epoch_samples as f64,
                        train_accuracy: ec[m] / epoch_samples as f64,
                        eval: evaluations.as_ref().map(|e| e[m]),
                        seconds,
                        samples_per_second: epoch_samples as f64 / train_seconds.max(1e-9),
                    })
                    .collect();
                for (h, r) in histories.iter_mut().zip(&records) {
                    h.push(r.clone());
                }
                Some(records)
            } else {
                None
            };
            for m in 0..k {
                let progress = Progress {
                    epoch: epoch + 1,
                    epochs: config.epochs,
                    step: step + 1,
                    steps,
                    loss: l[m] / window_samples as f64,
                    accuracy: c[m] / window_samples as f64,
                    samples_per_second: window_samples as f64 / secs,
                    lr,
                    epoch_end: records.as_ref().map(|r| r[m].clone()),
                };
                if hooks.progress(m, &progress) == Control::Stop {
                    stopped = true;
                }
            }
            loss_sum = zeros()?;
            correct = zeros()?;
            window_samples = 0;
            window_start = Instant::now();
            if stopped {
                break;
            }
        }
        if stopped {
            break;
        }
        let snapshot = || -> Result<Vec<TrainState>> {
            let (models, momenta) = engine.states(&names)?;
            Ok(models
                .into_iter()
                .zip(momenta)
                .zip(&histories)
                .map(|((model, momentum), history)| TrainState {
                    epoch: epoch + 1,
                    model,
                    momentum,
                    history: history.clone(),
                })
                .collect())
        };
        hooks.epoch_end(epoch + 1, &snapshot)?;
    }
    let members = engine.into_members()?;
    let per_member = total_samples as f64 / total_seconds.max(1e-9);
    Ok((
        members,
        JointOutcome {
            members: histories
                .into_iter()
                .map(|history| TrainOutcome {
                    history,
                    stopped,
                    samples_per_second: per_member,
                })
                .collect(),
            stopped,
            samples_per_second: per_member * k as f64,
        },
    ))
}

/// Each member of `joint` on `set`, in evaluation mode.
pub fn evaluate_joint(
    joint: &JointNetwork,
    set: &DeviceSet,
    batch_size: usize,
) -> Result<Vec<Evaluation>> {
    let _guard = tch::no_grad_guard();
    let k = joint.members() as i64;
    let device = set.device();
    let mut loss_sum = Tensor::f_zeros([k], (Kind::Double, device))?;
    let mut correct = Tensor::f_zeros([k], (Kind::Double, device))?;
    for batch in set.batches(batch_size, None) {
        let (x, y) = batch?;
        let logits = joint.predict(&x)?;
        let (n, classes) = (y.size()[0], logits.size()[2]);
        let targets = y.f_unsqueeze(0)?.f_expand([k, n], false)?;
        let loss = logits
            .f_reshape([-1, classes])?
            .f_cross_entropy_loss::<Tensor>(
                &targets.f_reshape([-1])?,
                None,
                Reduction::None,
                -100,
                0.0,
            )?
            .f_reshape([k, n])?
            .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?;
        let _ = loss_sum.f_add_(&loss)?;
        let hits = logits
            .f_argmax(-1, false)?
            .f_eq_tensor(&targets)?
            .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?;
        let _ = correct.f_add_(&hits)?;
    }
    let n = set.len.max(1) as f64;
    let l = host(&loss_sum)?;
    let c = host(&correct)?;
    Ok(l.iter()
        .zip(&c)
        .map(|(l, c)| Evaluation {
            loss: l / n,
            accuracy: c / n,
            samples: set.len,
        })
        .collect())
}
