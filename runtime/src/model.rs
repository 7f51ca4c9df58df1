//! A libtorch network built from an [`Architecture`]: the forward pass in
//! training and evaluation mode, and conversion from and to state dicts.
//! Parameters keep their PyTorch names and order.

use tch::{Device, Kind, Tensor};

use crate::tensor::TchExt;
use crate::{Result, RuntimeError};
use fusion::arch::{Architecture, Op, ParamRole, ParamSpec, Source};
use fusion::checkpoint;
use fusion::state::{DType, HostTensor, StateDict};

/// The precision of Linear and conv layers. `Bf16` computes them in
/// bfloat16 from float32 master weights (what autocast does), BatchNorm and
/// the logits stay float32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

/// One parameter or buffer of the network.
pub struct Param {
    pub spec: ParamSpec,
    pub tensor: Tensor,
}

/// The network of an architecture with its tensors on one device.
pub struct Network {
    arch: Architecture,
    device: Device,
    params: Vec<Param>,
    /// Per node, per role: index into `params`.
    slots: Vec<[Option<usize>; 7]>,
    /// Per node: the position in the topological order after which its output is dead.
    pub(crate) last_use: Vec<usize>,
}

fn role_slot(role: ParamRole) -> usize {
    match role {
        ParamRole::Weight | ParamRole::NormWeight => 0,
        ParamRole::Bias | ParamRole::NormBias => 1,
        ParamRole::RunningMean => 2,
        ParamRole::RunningVar => 3,
        ParamRole::BatchesTracked => 4,
    }
}

impl Network {
    pub(crate) fn with_params(arch: &Architecture, device: Device, params: Vec<Param>) -> Self {
        let mut slots = vec![[None; 7]; arch.nodes().len()];
        for (i, p) in params.iter().enumerate() {
            slots[p.spec.node][role_slot(p.spec.role)] = Some(i);
        }
        let mut last_use = vec![usize::MAX; arch.nodes().len()];
        for (pos, &i) in arch.order().iter().enumerate() {
            for s in &arch.nodes()[i].inputs {
                if let Source::Node(j) = s {
                    last_use[*j] = pos;
                }
            }
        }
        Network {
            arch: arch.clone(),
            device,
            params,
            slots,
            last_use,
        }
    }

    /// Builds the network with the tensors of `state`, after checking them
    /// against the architecture.
    pub fn from_state(arch: &Architecture, state: &StateDict, device: Device) -> Result<Self> {
        checkpoint::validate(state, arch, "state")?;
        let mut params = Vec::new();
        for spec in arch.params() {
            let host = state.get(&spec.name).ok_or_else(|| {
                RuntimeError::checkpoint("state", format!("missing `{}`", spec.name))
            })?;
            let tensor = host.to_tch().f_to_device(device)?;
            let tensor = if spec.role.trainable() {
                tensor.set_requires_grad(true)
            } else {
                tensor
            };
            params.push(Param { spec, tensor });
        }
        Ok(Self::with_params(arch, device, params))
    }

    /// A freshly initialised network, with PyTorch's distributions: weights
    /// and biases uniform in ±1/sqrt(fan_in), BatchNorm gamma 1 and beta 0,
    /// running mean 0 and variance 1. Values are drawn on the host from
    /// `seed`, so they are the same on every device and do not depend on
    /// libtorch's global generator.
    pub fn init(arch: &Architecture, device: Device, seed: u64) -> Result<Self> {
        let mut rng = crate::data::SplitMix64::new(seed);
        let mut params = Vec::new();
        for spec in arch.params() {
            let dims: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
            let node = &arch.nodes()[spec.node];
            let fan_in = match node.op {
                Op::Linear { in_features, .. } => in_features,
                Op::Conv2d {
                    in_channels,
                    kernel,
                    groups,
                    ..
                } => in_channels / groups.max(1) * kernel * kernel,
                _ => 1,
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let opts = (Kind::Float, device);
            let tensor = match spec.role {
                ParamRole::Weight | ParamRole::Bias => {
                    let n: usize = spec.shape.iter().product();
                    let values: Vec<f32> = (0..n)
                        .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
                        .collect();
                    Tensor::from_slice(&values)
                        .f_reshape(&dims)?
                        .f_to_device(device)?
                }
                ParamRole::NormWeight | ParamRole::RunningVar => Tensor::f_ones(&dims, opts)?,
                ParamRole::NormBias | ParamRole::RunningMean => Tensor::f_zeros(&dims, opts)?,
                ParamRole::BatchesTracked => Tensor::f_zeros(&dims, (Kind::Int64, device))?,
            };
            let tensor = if spec.role.trainable() {
                tensor.set_requires_grad(true)
            } else {
                tensor
            };
            params.push(Param { spec, tensor });
        }
        Ok(Self::with_params(arch, device, params))
    }

    pub fn arch(&self) -> &Architecture {
        &self.arch
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// All parameters and buffers, in `state_dict` order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The tensors the optimizer updates.
    pub fn trainable(&self) -> Vec<&Tensor> {
        self.params
            .iter()
            .filter(|p| p.spec.role.trainable())
            .map(|p| &p.tensor)
            .collect()
    }

    pub(crate) fn slot(&self, node: usize, role: ParamRole) -> Option<&Tensor> {
        self.slots[node][role_slot(role)].map(|i| &self.params[i].tensor)
    }

    /// As [`Network::slot`], from `tensors` (one per parameter, in order).
    fn slot_in<'t>(
        &self,
        tensors: &[&'t Tensor],
        node: usize,
        role: ParamRole,
    ) -> Option<&'t Tensor> {
        self.slots[node][role_slot(role)].and_then(|i| tensors.get(i).copied())
    }

    fn need_in<'t>(
        &self,
        tensors: &[&'t Tensor],
        node: usize,
        role: ParamRole,
    ) -> Result<&'t Tensor> {
        self.slot_in(tensors, node, role).ok_or_else(|| {
            RuntimeError::spec(format!(
                "node `{}` lacks its {}",
                self.arch.nodes()[node].name,
                role.suffix()
            ))
        })
    }

    pub(crate) fn need(&self, node: usize, role: ParamRole) -> Result<&Tensor> {
        self.slot(node, role).ok_or_else(|| {
            RuntimeError::spec(format!(
                "node `{}` lacks its {}",
                self.arch.nodes()[node].name,
                role.suffix()
            ))
        })
    }

    /// Reshapes a batch to `[N, input...]` when it holds the right number of
    /// values per sample (so a `[N, 1, 28, 28]` batch feeds a `[784]` MLP).
    pub(crate) fn shape_input(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        let want: Vec<i64> = self.arch.input_shape().iter().map(|&d| d as i64).collect();
        if size.len() > 1 && size[1..] == want[..] {
            return Ok(x.shallow_clone());
        }
        let per_sample: i64 = want.iter().product();
        let have: i64 = size.iter().skip(1).product();
        if size.is_empty() || have != per_sample {
            return Err(RuntimeError::spec(format!(
                "architecture `{}` takes inputs of shape {:?} per sample, got a batch of shape {size:?}",
                self.arch.name(),
                want
            )));
        }
        let mut dims = vec![size[0]];
        dims.extend(want);
        Ok(x.f_reshape(&dims)?)
    }

    /// The forward pass. In training mode BatchNorm uses batch statistics and
    /// updates its running statistics and counter; dropout is active.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, train, Precision::F32)
    }

    /// The forward pass at a chosen precision.
    pub fn forward_with(&self, x: &Tensor, train: bool, precision: Precision) -> Result<Tensor> {
        let tensors: Vec<&Tensor> = self.params.iter().map(|p| &p.tensor).collect();
        self.forward_on(&tensors, x, train, precision)
    }

    /// The forward pass with `tensors` in place of the network's own (one
    /// per parameter and buffer, in order, of the same shapes): a joint
    /// network runs each member through this with views of its stacks.
    pub(crate) fn forward_on(
        &self,
        tensors: &[&Tensor],
        x: &Tensor,
        train: bool,
        precision: Precision,
    ) -> Result<Tensor> {
        let x = self.shape_input(x)?;
        let low = |t: &Tensor| -> Result<Tensor> {
            Ok(match precision {
                Precision::F32 => t.shallow_clone(),
                Precision::Bf16 => t.f_to_kind(Kind::BFloat16)?,
            })
        };
        let low_opt = |t: Option<&Tensor>| -> Result<Option<Tensor>> { t.map(low).transpose() };
        let full = |t: Tensor| -> Result<Tensor> {
            Ok(match precision {
                Precision::F32 => t,
                Precision::Bf16 => t.f_to_kind(Kind::Float)?,
            })
        };
        let nodes = self.arch.nodes();
        let mut outs: Vec<Option<Tensor>> = (0..nodes.len()).map(|_| None).collect();
        for (pos, &i) in self.arch.order().iter().enumerate() {
            let node = &nodes[i];
            let input = |s: &Source, outs: &Vec<Option<Tensor>>| -> Result<Tensor> {
                match s {
                    Source::Input => Ok(x.shallow_clone()),
                    Source::Node(j) => {
                        outs[*j].as_ref().map(Tensor::shallow_clone).ok_or_else(|| {
                            RuntimeError::spec(format!(
                                "node `{}` read before it was computed",
                                nodes[*j].name
                            ))
                        })
                    }
                }
            };
            let a = input(&node.inputs[0], &outs)?;
            let y = match node.op {
                Op::Linear { .. } => low(&a)?.f_linear(
                    &low(self.need_in(tensors, i, ParamRole::Weight)?)?,
                    low_opt(self.slot_in(tensors, i, ParamRole::Bias))?,
                )?,
                Op::Conv2d {
                    stride,
                    padding,
                    groups,
                    ..
                } => {
                    let (s, p) = (stride as i64, padding as i64);
                    low(&a)?.f_conv2d(
                        &low(self.need_in(tensors, i, ParamRole::Weight)?)?,
                        low_opt(self.slot_in(tensors, i, ParamRole::Bias))?,
                        [s, s],
                        [p, p],
                        [1, 1],
                        groups as i64,
                    )?
                }
                Op::BatchNorm { eps, momentum, .. } => {
                    let y = Tensor::f_batch_norm(
                        &full(a)?,
                        Some(self.need_in(tensors, i, ParamRole::NormWeight)?),
                        Some(self.need_in(tensors, i, ParamRole::NormBias)?),
                        Some(self.need_in(tensors, i, ParamRole::RunningMean)?),
                        Some(self.need_in(tensors, i, ParamRole::RunningVar)?),
                        train,
                        momentum,
                        eps,
                        true,
                    )?;
                    if train {
                        if let Some(t) = self.slot_in(tensors, i, ParamRole::BatchesTracked) {
                            let _guard = tch::no_grad_guard();
                            let mut t = t.shallow_clone();
                            let _ = t.f_add_scalar_(1)?;
                        }
                    }
                    y
                }
                Op::Flatten {} => a.f_flatten(1, -1)?,
                Op::Add {} => {
                    let mut sum = a;
                    for s in &node.inputs[1..] {
                        sum = sum.f_add(&input(s, &outs)?)?;
                    }
                    sum
                }
                ref op => same_on_every_channel(op, &a, train)?,
            };
            outs[i] = Some(y);
            for s in &node.inputs {
                if let Source::Node(j) = s {
                    if self.last_use[*j] == pos && *j != self.arch.output() {
                        outs[*j] = None;
                    }
                }
            }
        }
        full(
            outs[self.arch.output()]
                .take()
                .ok_or_else(|| RuntimeError::spec("the output node was not computed"))?,
        )
    }

    /// Evaluation-mode forward pass without gradients.
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.forward_t(x, false)
    }

    /// Copies every parameter and buffer to a host state dict, with the
    /// architecture recorded in its metadata.
    pub fn to_state(&self) -> Result<StateDict> {
        let mut state = StateDict::default();
        for p in &self.params {
            let host = HostTensor::from_tch(&p.tensor.detach())?;
            let host = match (p.spec.dtype, host.dtype()) {
                (DType::F32, DType::F32) | (DType::I64, DType::I64) => host,
                _ => {
                    return Err(RuntimeError::spec(format!(
                        "tensor `{}` changed dtype during training",
                        p.spec.name
                    )))
                }
            };
            state.insert(p.spec.name.clone(), host);
        }
        state.set_arch(self.arch.spec());
        Ok(state)
    }
}

/// The ops that act on each channel (or each value) alone: activations,
/// dropout and pooling. They run unchanged on a joint network's
/// `[N, K*C, H, W]` activations, where the K members' channels sit side by
/// side. Layers with parameters, flatten and add are the caller's.
pub(crate) fn same_on_every_channel(op: &Op, a: &Tensor, train: bool) -> Result<Tensor> {
    Ok(match *op {
        Op::Relu {} => a.f_relu()?,
        // tch binds hardtanh and leaky_relu without their scalars:
        // clamp gives the same values (its gradient also passes at
        // exactly min and max), `where` the same values and gradients.
        Op::Relu6 {} => a.f_clamp(0.0, 6.0)?,
        Op::Hardtanh { min, max } => a.f_clamp(min, max)?,
        Op::LeakyRelu { slope } => {
            let negative = a.f_mul_scalar(slope)?;
            a.f_where_self(&a.f_gt(0.0)?, &negative)?
        }
        Op::Gelu { approximate } => a.f_gelu(approximate.as_str())?,
        Op::Silu {} => a.f_silu()?,
        Op::Hardswish {} => a.f_hardswish()?,
        Op::Sigmoid {} => a.f_sigmoid()?,
        Op::Tanh {} => a.f_tanh()?,
        Op::Dropout { p } => a.f_dropout(p, train)?,
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
        } => {
            let (k, s, p) = (
                kernel as i64,
                stride.unwrap_or(kernel) as i64,
                padding as i64,
            );
            a.f_max_pool2d([k, k], [s, s], [p, p], [1, 1], false)?
        }
        Op::AvgPool2d {
            kernel,
            stride,
            padding,
        } => {
            let (k, s, p) = (
                kernel as i64,
                stride.unwrap_or(kernel) as i64,
                padding as i64,
            );
            a.f_avg_pool2d([k, k], [s, s], [p, p], false, true, None::<i64>)?
        }
        Op::AdaptiveAvgPool2d { output } => {
            let [h, w] = output.hw();
            a.f_adaptive_avg_pool2d([h as i64, w as i64])?
        }
        Op::Linear { .. }
        | Op::Conv2d { .. }
        | Op::BatchNorm { .. }
        | Op::Flatten {}
        | Op::Add {} => {
            return Err(RuntimeError::spec(format!(
                "`{}` is not a per-channel op",
                op.kind()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusion::arch::preset;

    #[test]
    fn forward_matches_a_hand_computed_mlp() {
        let arch =
            Architecture::new(preset("mlp:input=2,hidden=2,depth=1,classes=1,bias=true").unwrap())
                .unwrap();
        let mut state = StateDict::default();
        state.insert(
            "fc1.weight",
            HostTensor::f32(vec![2, 2], vec![1.0, -1.0, 0.5, 0.5]),
        );
        state.insert("fc1.bias", HostTensor::f32(vec![2], vec![0.0, 1.0]));
        state.insert("fc2.weight", HostTensor::f32(vec![1, 2], vec![2.0, 3.0]));
        state.insert("fc2.bias", HostTensor::f32(vec![1], vec![-1.0]));
        let net = Network::from_state(&arch, &state, Device::Cpu).unwrap();
        let x = Tensor::from_slice(&[1.0f32, 3.0]).reshape([1, 2]);
        // fc1: [1-3, 0.5+1.5+1] = [-2, 3] -> relu [0, 3] -> 0*2 + 3*3 - 1 = 8
        let y = f32::try_from(net.predict(&x).unwrap().squeeze()).unwrap();
        assert_eq!(y, 8.0);
        let err = net
            .predict(&Tensor::zeros([1, 3], (Kind::Float, Device::Cpu)))
            .unwrap_err();
        assert!(err.to_string().contains("[2]"), "{err}");
    }

    #[test]
    fn batch_norm_statistics_update_in_training_only() {
        let arch = Architecture::new(preset("vgg11-bn:width=2").unwrap()).unwrap();
        let net = Network::init(&arch, Device::Cpu, 0).unwrap();
        let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let before = net.to_state().unwrap();
        let _ = net.predict(&x).unwrap();
        let same = net.to_state().unwrap();
        assert_eq!(
            same.get("features.1.running_mean").unwrap().as_f32(),
            before.get("features.1.running_mean").unwrap().as_f32()
        );
        let _ = net.forward_t(&x, true).unwrap();
        let after = net.to_state().unwrap();
        assert_ne!(
            after.get("features.1.running_mean").unwrap().as_f32(),
            before.get("features.1.running_mean").unwrap().as_f32()
        );
        assert_eq!(
            after
                .get("features.1.num_batches_tracked")
                .unwrap()
                .as_i64(),
            Some(&[1i64][..])
        );
    }
}
