//! SGD with momentum, weight decay and Nesterov, as `torch.optim.SGD`
//! (dampening 0). The momentum buffers are ours, so an epoch checkpoint can
//! hold them and a resumed run continues exactly where it stopped.

use tch::Tensor;

use crate::state::{HostTensor, StateDict};
use crate::{FusionError, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

pub struct Sgd {
    config: SgdConfig,
    /// One buffer per parameter, created at the first step (as PyTorch does).
    buffers: Vec<Option<Tensor>>,
    /// 0-dim tensors on the parameters' device holding weight decay, momentum
    /// and -lr: `a.addcmul(b, s)` computes `a + s * b` in one kernel.
    scalars: Option<[Tensor; 3]>,
}

impl Sgd {
    pub fn new(parameters: usize, config: SgdConfig) -> Self {
        Sgd {
            config,
            buffers: (0..parameters).map(|_| None).collect(),
            scalars: None,
        }
    }

    /// Zeroes the gradients of `params`.
    pub fn zero_grad(params: &[&Tensor]) -> Result<()> {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// One update of `params` (in the same order every call) with rate `lr`.
    pub fn step(&mut self, params: &[&Tensor], lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let SgdConfig {
            momentum,
            weight_decay,
            nesterov,
        } = self.config;
        let Some(first) = params.first() else {
            return Ok(());
        };
        let device = first.device();
        if self
            .scalars
            .as_ref()
            .is_none_or(|s| s[0].device() != device)
        {
            let scalar = |v: f64| Tensor::from(v as f32).f_to_device(device);
            self.scalars = Some([scalar(weight_decay)?, scalar(momentum)?, scalar(-lr)?]);
        }
        let Some([wd, m, step]) = self.scalars.as_mut() else {
            return Ok(());
        };
        let _ = step.f_fill_(-lr)?;
        for (i, p) in params.iter().enumerate() {
            let grad = p.grad();
            if !grad.defined() {
                continue;
            }
            let mut d = if weight_decay != 0.0 {
                grad.f_addcmul(p, wd)?
            } else {
                grad
            };
            if momentum != 0.0 {
                let buf = match self.buffers[i].take() {
                    None => d.f_detach()?.copy(),
                    Some(mut b) => {
                        let _ = b.f_mul_scalar_(momentum)?;
                        let _ = b.f_add_(&d)?;
                        b
                    }
                };
                d = if nesterov {
                    d.f_addcmul(&buf, m)?
                } else {
                    buf.shallow_clone()
                };
                self.buffers[i] = Some(buf);
            }
            let mut p = p.shallow_clone();
            let _ = p.f_addcmul_(&d, step)?;
        }
        Ok(())
    }

    /// The momentum buffers under `names` (parameters without one are left out).
    pub fn state(&self, names: &[String]) -> Result<StateDict> {
        let mut out = StateDict::default();
        for (name, buf) in names.iter().zip(&self.buffers) {
            if let Some(b) = buf {
                out.insert(name.clone(), HostTensor::from_tch(b)?);
            }
        }
        Ok(out)
    }

    /// Restores buffers saved by [`Sgd::state`] onto the parameters' devices.
    pub fn load_state(
        &mut self,
        names: &[String],
        params: &[&Tensor],
        state: &StateDict,
    ) -> Result<()> {
        for (i, (name, p)) in names.iter().zip(params).enumerate() {
            self.buffers[i] = match state.get(name) {
                None => None,
                Some(t) => {
                    if t.shape().iter().map(|&d| d as i64).collect::<Vec<_>>() != p.size() {
                        return Err(FusionError::checkpoint(
                            "training state",
                            format!(
                                "momentum buffer `{name}` has shape {:?}, parameter {:?}",
                                t.shape(),
                                p.size()
                            ),
                        ));
                    }
                    Some(t.to_tch().f_to_device(p.device())?)
                }
            };
        }
        Ok(())
    }
}
