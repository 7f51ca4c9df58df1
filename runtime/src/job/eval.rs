//! Evaluations of models and ensembles through the driver.

use std::collections::HashMap;
use std::rc::Rc;

use nt_spec::{DataSpec, EvalItem};
use tch::Device;

use super::{load_data, load_model, recorded_normalization, ArchOf, JobHooks, JobIo, ModelRef};
use crate::model::Network;
use crate::train::{self, Evaluation};
use crate::{Result, RuntimeError};

/// How an evaluation normalises the test set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalize {
    /// As the first item's first model recorded (the way it was trained);
    /// with the training split's statistics when it recorded none.
    Recorded,
    /// With the training split's statistics.
    TrainingSplit,
}

/// Evaluations of models and of output-averaging ensembles on a test set.
#[derive(Clone, Debug)]
pub struct EvalJob {
    /// Each item is one model, or the ensemble (mean logits) of several.
    pub items: Vec<EvalItem>,
    /// The architecture every checkpoint is read with.
    pub arch: ArchOf,
    pub data: DataSpec,
    pub device: Device,
    pub eval_batch: usize,
    pub normalize: Normalize,
}

/// One item's evaluation.
#[derive(Clone, Debug)]
pub struct Evaluated {
    pub name: String,
    /// The architecture of its first model.
    pub arch: String,
    /// The parameters of all its models together.
    pub parameters: usize,
    pub evaluation: Evaluation,
}

/// Evaluates every item of `job`, in order; a checkpoint several items
/// share is loaded once.
pub fn run_evaluation(
    job: &EvalJob,
    io: &dyn JobIo,
    hooks: &mut dyn JobHooks,
) -> Result<Vec<Evaluated>> {
    let mut loaded: HashMap<String, Rc<Network>> = HashMap::new();
    let mut recorded = None;
    // Image folders are decoded to the models' input size.
    let mut input_shape = match &job.arch {
        ArchOf::Given(arch) => Some(arch.input_shape().to_vec()),
        ArchOf::Recorded => None,
    };
    if job.normalize == Normalize::Recorded || input_shape.is_none() {
        if let Some(key) = job.items.first().and_then(|i| i.checkpoints.first()) {
            let (arch, state) = load_model(io, &model_ref(key, &job.arch))?;
            if job.normalize == Normalize::Recorded {
                recorded = recorded_normalization(&state);
            }
            input_shape = Some(arch.input_shape().to_vec());
            loaded.insert(
                key.clone(),
                Rc::new(Network::from_state(&arch, &state, job.device)?),
            );
        }
    }
    let splits = load_data(io, &job.data, input_shape.as_deref().unwrap_or(&[]))?;
    let data = splits.to_device_with(job.device, recorded)?;
    let mut out = Vec::with_capacity(job.items.len());
    for item in &job.items {
        let mut nets = Vec::with_capacity(item.checkpoints.len());
        for key in &item.checkpoints {
            if hooks.should_stop() {
                return Err(RuntimeError::Stopped);
            }
            let net = match loaded.get(key) {
                Some(net) => net.clone(),
                None => {
                    let (arch, state) = load_model(io, &model_ref(key, &job.arch))?;
                    let net = Rc::new(Network::from_state(&arch, &state, job.device)?);
                    loaded.insert(key.clone(), net.clone());
                    net
                }
            };
            splits.check_fits(net.arch())?;
            nets.push(net);
        }
        let refs: Vec<&Network> = nets.iter().map(|n| n.as_ref()).collect();
        let evaluation = train::evaluate_ensemble(&refs, &data.test, job.eval_batch)?;
        out.push(Evaluated {
            name: item.name.clone(),
            arch: refs
                .first()
                .map_or_else(String::new, |n| n.arch().name().to_string()),
            parameters: refs.iter().map(|n| n.arch().parameter_count()).sum(),
            evaluation,
        });
    }
    Ok(out)
}

fn model_ref(key: &str, arch: &ArchOf) -> ModelRef {
    ModelRef {
        key: key.to_string(),
        arch: arch.clone(),
    }
}
