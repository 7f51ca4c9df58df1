//! Accuracy and loss of a model, or of the output-averaging ensemble of
//! several (their mean logits), in evaluation mode.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use crate::data::DeviceSet;
use crate::model::Network;
use crate::{Result, RuntimeError};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    pub samples: usize,
}

/// Evaluates the mean logits of `nets` (one net: the net itself).
pub fn evaluate_ensemble(
    nets: &[&Network],
    set: &DeviceSet,
    batch_size: usize,
) -> Result<Evaluation> {
    if nets.is_empty() {
        return Err(RuntimeError::spec("evaluation needs at least one model"));
    }
    let _guard = tch::no_grad_guard();
    let device = set.device();
    let mut loss_sum = Tensor::f_zeros([], (Kind::Float, device))?;
    let mut correct = Tensor::f_zeros([], (Kind::Float, device))?;
    for batch in set.batches(batch_size, None) {
        let (x, y) = batch?;
        let mut logits = nets[0].predict(&x)?;
        for net in &nets[1..] {
            logits = logits.f_add(&net.predict(&x)?)?;
        }
        let logits = logits.f_div_scalar(nets.len() as f64)?;
        let loss = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)?;
        let _ = loss_sum.f_add_(&loss)?;
        let hits = logits
            .f_argmax(-1, false)?
            .f_eq_tensor(&y)?
            .f_sum(Kind::Float)?;
        let _ = correct.f_add_(&hits)?;
    }
    let n = set.len.max(1) as f64;
    Ok(Evaluation {
        loss: loss_sum.f_double_value(&[])? / n,
        accuracy: correct.f_double_value(&[])? / n,
        samples: set.len,
    })
}

/// Evaluates one model.
pub fn evaluate(net: &Network, set: &DeviceSet, batch_size: usize) -> Result<Evaluation> {
    evaluate_ensemble(&[net], set, batch_size)
}
