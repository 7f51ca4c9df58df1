//! Joint training through the driver: the parts of a [`JointJob`] (the
//! members of a run, or its fine-tunings) trained as one, each stored where
//! its own [`TrainJob`] would store it, with the lineage and evaluations it
//! would have.

use fusion::checkpoint;
use tch::Device;

use super::train::{lineage, Driver};
use super::{
    load_model, prepare, recorded_normalization, JobHooks, JobIo, Start, Started, TrainJob, Trained,
};
use crate::joint::Kernels;
use crate::model::Network;
use crate::train::{self, Control, JointHooks, Progress, TrainState};
use crate::{Result, RuntimeError};

/// Models trained as one.
#[derive(Clone, Debug)]
pub struct JointJob {
    /// One per model, in order, each as it would train alone. Their data,
    /// device and evaluation batch must be equal; their own `resume` and
    /// `epoch_states` are not read.
    pub parts: Vec<TrainJob>,
    /// A joint epoch state to continue from.
    pub resume: Option<String>,
    /// Store a joint resumable state after every epoch under this prefix
    /// ([`epoch_state_key`](super::epoch_state_key)).
    pub epoch_states: Option<String>,
}

fn not_joint(why: impl Into<String>) -> RuntimeError {
    RuntimeError::NotJoint(why.into())
}

/// Trains the parts of `job` as one, stores each part's model under its
/// `output` and says how each went. [`RuntimeError::NotJoint`] when they
/// cannot train as one (an op or settings joint training refuses, parts
/// that differ in data or architecture, a device without room for all).
pub fn run_joint_training(
    job: &JointJob,
    io: &dyn JobIo,
    hooks: &mut dyn JobHooks,
) -> Result<Vec<Trained>> {
    let device = job.parts.first().map_or(Device::Cpu, |p| p.device);
    // Out of memory anywhere (K initial models, teachers, evaluations,
    // training) is a reason to train the parts one by one.
    train_parts(job, io, hooks).map_err(|e| out_of_memory(e, device, job.parts.len()))
}

fn train_parts(job: &JointJob, io: &dyn JobIo, hooks: &mut dyn JobHooks) -> Result<Vec<Trained>> {
    let first = job
        .parts
        .first()
        .ok_or_else(|| not_joint("a joint job has no parts"))?;
    let device = first.device;
    for (k, part) in job.parts.iter().enumerate() {
        if part.data != first.data || part.device != device || part.eval_batch != first.eval_batch {
            return Err(not_joint(format!(
                "part {k} differs from part 0 in its data, device or evaluation batch"
            )));
        }
    }
    let stop_point = |hooks: &dyn JobHooks| {
        if hooks.should_stop() {
            Err(RuntimeError::Stopped)
        } else {
            Ok(())
        }
    };
    // Each part's architecture and initial state.
    let mut starts = Vec::with_capacity(job.parts.len());
    for part in &job.parts {
        starts.push(match &part.start {
            Start::Fresh(arch) => (arch.clone(), None),
            Start::Checkpoint(model) => {
                let (arch, state) = load_model(io, model)?;
                (arch, Some(state))
            }
        });
        stop_point(&*hooks)?;
    }
    let arch = starts[0].0.clone();
    if let Some(k) = starts.iter().position(|(a, _)| a.spec() != arch.spec()) {
        return Err(not_joint(format!(
            "part {k}'s architecture differs from part 0's"
        )));
    }
    // A part distils only from teachers it names, as it would alone.
    let configs: Vec<_> = job
        .parts
        .iter()
        .map(|p| nt_spec::TrainConfig {
            distill: p.config.distill.filter(|_| !p.teachers.is_empty()),
            ..p.config.clone()
        })
        .collect();
    if let Some(why) = nt_spec::joint::refusal(&arch, &configs) {
        return Err(not_joint(why));
    }
    let recorded: Vec<_> = starts
        .iter()
        .map(|(_, init)| init.as_ref().and_then(recorded_normalization))
        .collect();
    if recorded.iter().any(|r| *r != recorded[0]) {
        return Err(not_joint(
            "the parts' checkpoints record different input normalisations",
        ));
    }
    let data = prepare(io, &first.data, &arch, device, recorded[0].clone())?;
    stop_point(&*hooks)?;

    let mut nets = Vec::with_capacity(starts.len());
    let mut befores = Vec::with_capacity(starts.len());
    for ((_, init), part) in starts.iter().zip(&job.parts) {
        let (net, before) = match init {
            None => (train::init_network(&arch, device, part.config.seed)?, None),
            Some(state) => {
                let net = Network::from_state(&arch, state, device)?;
                let before = train::evaluate(&net, &data.test, first.eval_batch)?;
                (net, Some(before))
            }
        };
        nets.push(net);
        befores.push(before);
    }
    let teachers = joint_teachers(job, io, device)?;
    let resume = match &job.resume {
        Some(key) => Some(train::joint_state_from_bytes(key, io.read(key)?)?),
        None => None,
    };
    if let Some(states) = &resume {
        if states.len() != job.parts.len() {
            return Err(RuntimeError::checkpoint(
                job.resume.as_deref().unwrap_or_default(),
                format!(
                    "a joint state of {} members for {} parts",
                    states.len(),
                    job.parts.len()
                ),
            ));
        }
    }
    stop_point(&*hooks)?;
    hooks.started(&Started {
        arch: &arch,
        data: &data,
        device,
        resumed_after: resume.as_ref().and_then(|r| r.first()).map(|r| r.epoch),
    });
    let trained = train::train_joint(
        nets,
        Kernels::for_device(device),
        &configs,
        &data.train,
        Some(data.monitor()),
        &teachers,
        resume,
        &mut Driver {
            io,
            hooks: &mut *hooks,
            epoch_states: job.epoch_states.as_deref(),
        },
    );
    let (nets, outcome) = trained?;
    if outcome.stopped {
        return Err(RuntimeError::Stopped);
    }
    let mut done = Vec::with_capacity(nets.len());
    for (((net, part), (_, init)), (before, outcome)) in nets
        .iter()
        .zip(&job.parts)
        .zip(&starts)
        .zip(befores.into_iter().zip(outcome.members))
    {
        let after = train::evaluate(net, &data.test, first.eval_batch)?;
        let mut state = net.to_state()?;
        state.set_input(&data.input_spec());
        state.set_lineage(&lineage(part, init.as_ref(), &after));
        io.write(&part.output, checkpoint::to_bytes(&state)?)?;
        done.push(Trained {
            key: part.output.clone(),
            arch: arch.clone(),
            before,
            after,
            outcome,
            data: data.loaded.clone(),
        });
    }
    Ok(done)
}

/// The teachers of the parts that distil: one set, which every distilling
/// part must name alike (the members of a run).
fn joint_teachers(job: &JointJob, io: &dyn JobIo, device: Device) -> Result<Vec<Network>> {
    let keys = |p: &TrainJob| p.teachers.iter().map(|t| t.key.clone()).collect::<Vec<_>>();
    let distilling: Vec<&TrainJob> = job
        .parts
        .iter()
        .filter(|p| p.config.distill.is_some() && !p.teachers.is_empty())
        .collect();
    let Some(first) = distilling.first() else {
        return Ok(Vec::new());
    };
    if distilling.iter().any(|p| keys(p) != keys(first)) {
        return Err(not_joint("the distilling parts name different teachers"));
    }
    if job
        .parts
        .iter()
        .any(|p| p.config.distill.is_none() && !p.teachers.is_empty() && keys(p) != keys(first))
    {
        return Err(not_joint("the parts name different teachers"));
    }
    first
        .teachers
        .iter()
        .map(|t| {
            let (arch, state) = load_model(io, t)?;
            Network::from_state(&arch, &state, device)
        })
        .collect()
}

/// A CUDA allocation failure of a joint training is a reason to train the
/// parts one by one, not a failed task.
fn out_of_memory(error: RuntimeError, device: Device, parts: usize) -> RuntimeError {
    match &error {
        RuntimeError::Torch(e) if device.is_cuda() && e.to_string().contains("out of memory") => {
            not_joint(format!(
                "the device ran out of memory training {parts} models jointly: {}",
                e.to_string().lines().next().unwrap_or_default()
            ))
        }
        _ => error,
    }
}

/// The joint trainer's hooks: per-part progress, stops and joint epoch
/// states through the single trainer's [`Driver`].
impl JointHooks for Driver<'_> {
    fn stop_requested(&self) -> bool {
        self.hooks.should_stop()
    }

    fn progress(&mut self, member: usize, progress: &Progress) -> Control {
        self.hooks.part_progress(member, progress);
        self.control()
    }

    fn epoch_end(
        &mut self,
        epoch: usize,
        states: &dyn Fn() -> Result<Vec<TrainState>>,
    ) -> Result<()> {
        self.save_epoch(epoch, || train::joint_state_to_bytes(&states()?))
    }
}
