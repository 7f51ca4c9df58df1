//! K networks of one architecture as one: every parameter stacked to
//! `[K, ...]`, one forward pass for all K members, each on its own batch.
//!
//! Layouts: an image activation is `[N, K*C, H, W]`, member k's channels in
//! block k, so a convolution is one grouped convolution (`groups * K`), and
//! BatchNorm, activations and pooling work per channel unchanged. A flat
//! activation is `[K, N, F]`, so a linear layer is one batched matrix
//! product. Flatten moves from the first layout to the second. Nothing
//! mixes two members: each member's output, and so its gradient, is its own.

use tch::{Device, Kind, Tensor};

use crate::model::{same_on_every_channel, Network, Param, Precision};
use crate::tensor::TchExt;
use crate::{Result, RuntimeError};
use fusion::arch::{Architecture, Op, ParamRole, Source};
use fusion::state::{HostTensor, StateDict};

/// How the layers with weights run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// One batched matrix product per linear layer, one grouped convolution
    /// per conv layer: K members for the launches of one (the GPU's way).
    Batched,
    /// Each member through a single network's own forward pass, on views of
    /// the stacks: the arithmetic of separate training exactly (the CPU's
    /// way, where launches cost nothing and libtorch's grouped convolutions
    /// are slower than K plain ones). `train_joint` goes further on the CPU
    /// and keeps each member's own network and optimiser.
    PerMember,
}

impl Kernels {
    /// Batched on CUDA, per member on the CPU.
    pub fn for_device(device: Device) -> Kernels {
        if device.is_cuda() {
            Kernels::Batched
        } else {
            Kernels::PerMember
        }
    }
}

/// K networks of one architecture, stacked.
pub struct JointNetwork {
    /// The architecture with `[K, ...]` tensors in place of each parameter.
    stacked: Network,
    members: usize,
    kernels: Kernels,
}

fn unsupported(why: String) -> RuntimeError {
    RuntimeError::NotJoint(why)
}

impl JointNetwork {
    /// Stacks `nets` (at least two, one architecture, one device).
    pub fn stack(nets: &[Network]) -> Result<Self> {
        let first = nets
            .first()
            .ok_or_else(|| unsupported("joint training needs at least two networks".into()))?;
        let arch = first.arch();
        if let Some(why) = nt_spec::joint::arch_refusal(arch) {
            return Err(unsupported(why));
        }
        for (k, net) in nets.iter().enumerate() {
            if net.arch().spec() != arch.spec() || net.device() != first.device() {
                return Err(unsupported(format!(
                    "network {k} differs from network 0 in its architecture or device"
                )));
            }
        }
        let params = first
            .params()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let _guard = tch::no_grad_guard();
                let parts: Vec<Tensor> =
                    nets.iter().map(|n| n.params()[i].tensor.detach()).collect();
                let tensor = Tensor::f_stack(&parts, 0)?;
                let tensor = if p.spec.role.trainable() {
                    tensor.set_requires_grad(true)
                } else {
                    tensor
                };
                Ok(Param {
                    spec: p.spec.clone(),
                    tensor,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(JointNetwork {
            stacked: Network::with_params(arch, first.device(), params),
            members: nets.len(),
            kernels: Kernels::for_device(first.device()),
        })
    }

    /// Runs the layers with weights with `kernels`.
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn members(&self) -> usize {
        self.members
    }

    pub fn arch(&self) -> &Architecture {
        self.stacked.arch()
    }

    pub fn device(&self) -> Device {
        self.stacked.device()
    }

    /// The stacked tensors the optimizer updates, in `state_dict` order.
    pub fn trainable(&self) -> Vec<&Tensor> {
        self.stacked.trainable()
    }

    /// Member `k`'s parameters and buffers as a state dict, with the
    /// architecture in its metadata.
    pub fn member_state(&self, k: usize) -> Result<StateDict> {
        let mut state = StateDict::default();
        for p in self.stacked.params() {
            let t = p.tensor.f_detach()?.f_get(k as i64)?;
            state.insert(p.spec.name.clone(), HostTensor::from_tch(&t)?);
        }
        state.set_arch(self.arch().spec());
        Ok(state)
    }

    /// Member `k` as a network of its own (a copy).
    pub fn member(&self, k: usize) -> Result<Network> {
        Network::from_state(self.arch(), &self.member_state(k)?, self.device())
    }

    /// Stacks per-member batches (`[N, input...]` each, one N) into the
    /// joint input layout.
    pub fn stack_inputs(&self, xs: &[Tensor]) -> Result<Tensor> {
        if xs.len() != self.members {
            return Err(RuntimeError::spec(format!(
                "a joint network of {} members got {} batches",
                self.members,
                xs.len()
            )));
        }
        self.member_major_input(&Tensor::f_cat(xs, 0)?)
    }

    /// The joint input layout of `[K*N, input...]`: member 0's N samples,
    /// then member 1's, and so on.
    pub fn member_major_input(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.stacked.shape_input(x)?;
        let k = self.members as i64;
        let rows = x.size()[0];
        if rows % k != 0 {
            return Err(RuntimeError::spec(format!(
                "{rows} samples do not split among {k} members"
            )));
        }
        let n = rows / k;
        let input: Vec<i64> = self
            .arch()
            .input_shape()
            .iter()
            .map(|&d| d as i64)
            .collect();
        Ok(if let [c, h, w] = input[..] {
            x.f_reshape([k, n, c, h, w])?
                .f_transpose(0, 1)?
                .f_reshape([n, k * c, h, w])?
        } else {
            x.f_reshape([k, n, input.iter().product()])?
        })
    }

    /// The same batch for every member, in the joint input layout.
    pub fn repeat_input(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.stacked.shape_input(x)?;
        let k = self.members as i64;
        Ok(if self.arch().input_shape().len() == 3 {
            x.f_repeat([1, k, 1, 1])?
        } else {
            x.f_unsqueeze(0)?.f_expand([k, -1, -1], false)?
        })
    }

    /// The forward pass of all members on their joint input
    /// ([`JointNetwork::stack_inputs`]): logits `[K, N, classes]`.
    pub fn forward_with(&self, x: &Tensor, train: bool, precision: Precision) -> Result<Tensor> {
        match self.kernels {
            Kernels::Batched => self.batched_forward(x, train, precision),
            Kernels::PerMember => self.forward_members(&self.member_major(x)?, train, precision),
        }
    }

    /// The forward pass of all members on `[K*N, input...]`, member 0's N
    /// samples first: logits `[K, N, classes]`.
    pub fn forward_members(&self, x: &Tensor, train: bool, precision: Precision) -> Result<Tensor> {
        match self.kernels {
            Kernels::Batched => {
                self.batched_forward(&self.member_major_input(x)?, train, precision)
            }
            Kernels::PerMember => {
                let k = self.members as i64;
                let rows = x.size().first().copied().unwrap_or(0);
                if rows % k != 0 {
                    return Err(RuntimeError::spec(format!(
                        "{rows} samples do not split among {k} members"
                    )));
                }
                let xs = x.f_chunk(k, 0)?;
                self.each_member(|m, tensors| {
                    self.stacked.forward_on(tensors, &xs[m], train, precision)
                })
            }
        }
    }

    /// `f` on each member's views of the stacks, its results stacked. The
    /// stacks are unbound once: the backward of unbind is one stack per
    /// parameter, where selecting member by member would build a zero
    /// tensor of the whole stack for each.
    fn each_member(&self, f: impl Fn(usize, &[&Tensor]) -> Result<Tensor>) -> Result<Tensor> {
        let stacks = self
            .stacked
            .params()
            .iter()
            .map(|p| p.tensor.f_unbind(0))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let outs = (0..self.members)
            .map(|m| {
                let tensors: Vec<&Tensor> = stacks.iter().map(|s| &s[m]).collect();
                f(m, &tensors)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::f_stack(&outs, 0)?)
    }

    /// The joint input layout back to `[K*N, input...]`.
    fn member_major(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.members as i64;
        let size = x.size();
        Ok(if let [n, kc, h, w] = size[..] {
            x.f_reshape([n, k, kc / k, h, w])?
                .f_transpose(0, 1)?
                .f_reshape([k * n, kc / k, h, w])?
        } else {
            x.f_reshape([-1, *size.last().unwrap_or(&1)])?
        })
    }

    /// One grouped convolution per conv layer, one batched matrix product
    /// per linear layer.
    fn batched_forward(&self, x: &Tensor, train: bool, precision: Precision) -> Result<Tensor> {
        let net = &self.stacked;
        let arch = net.arch();
        let k = self.members as i64;
        let low = |t: &Tensor| -> Result<Tensor> {
            Ok(match precision {
                Precision::F32 => t.shallow_clone(),
                Precision::Bf16 => t.f_to_kind(Kind::BFloat16)?,
            })
        };
        let full = |t: Tensor| -> Result<Tensor> {
            Ok(match precision {
                Precision::F32 => t,
                Precision::Bf16 => t.f_to_kind(Kind::Float)?,
            })
        };
        // Stacked `[K, a, b...]` as `[K*a, b...]`: a view.
        let merged = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.size();
            let first = dims.remove(0) * dims.first().copied().unwrap_or(1);
            if !dims.is_empty() {
                dims[0] = first;
            } else {
                dims.push(first);
            }
            Ok(t.f_reshape(dims.as_slice())?)
        };
        let nodes = arch.nodes();
        let mut outs: Vec<Option<Tensor>> = (0..nodes.len()).map(|_| None).collect();
        for (pos, &i) in arch.order().iter().enumerate() {
            let node = &nodes[i];
            let input = |s: &Source, outs: &Vec<Option<Tensor>>| -> Result<Tensor> {
                match s {
                    Source::Input => Ok(x.shallow_clone()),
                    Source::Node(j) => {
                        outs[*j].as_ref().map(Tensor::shallow_clone).ok_or_else(|| {
                            RuntimeError::spec(format!("node `{}` read early", nodes[*j].name))
                        })
                    }
                }
            };
            let a = input(&node.inputs[0], &outs)?;
            let image = node.in_shape.len() == 3;
            let y = match node.op {
                Op::Linear { .. } => {
                    let w = low(net.need(i, ParamRole::Weight)?)?;
                    let b = net.slot(i, ParamRole::Bias).map(low).transpose()?;
                    let a = low(&a)?;
                    // [K, N, F] x [K, F, O] (+ [K, 1, O]).
                    match &b {
                        Some(b) => b
                            .f_unsqueeze(1)?
                            .f_baddbmm(&a, &w.f_transpose(1, 2)?, 1, 1)?,
                        None => a.f_bmm(&w.f_transpose(1, 2)?)?,
                    }
                }
                Op::Conv2d {
                    stride,
                    padding,
                    groups,
                    ..
                } => {
                    let (s, p, g) = (stride as i64, padding as i64, groups as i64);
                    let w = low(net.need(i, ParamRole::Weight)?)?;
                    let b = net.slot(i, ParamRole::Bias).map(low).transpose()?;
                    let a = low(&a)?;
                    a.f_conv2d(
                        &merged(&w)?,
                        b.as_ref().map(merged).transpose()?,
                        [s, s],
                        [p, p],
                        [1, 1],
                        g * k,
                    )?
                }
                Op::BatchNorm { eps, momentum, .. } => {
                    // Flat [K, N, F] goes through [N, K*F] and back.
                    let a = full(a)?;
                    let (input, flat) = if image {
                        (a, None)
                    } else {
                        let s = a.size();
                        let t = a.f_permute([1, 0, 2])?.f_reshape([s[1], s[0] * s[2]])?;
                        (t, Some(s))
                    };
                    let y = Tensor::f_batch_norm(
                        &input,
                        Some(&merged(net.need(i, ParamRole::NormWeight)?)?),
                        Some(&merged(net.need(i, ParamRole::NormBias)?)?),
                        Some(&merged(net.need(i, ParamRole::RunningMean)?)?),
                        Some(&merged(net.need(i, ParamRole::RunningVar)?)?),
                        train,
                        momentum,
                        eps,
                        true,
                    )?;
                    if train {
                        if let Some(t) = net.slot(i, ParamRole::BatchesTracked) {
                            let _guard = tch::no_grad_guard();
                            let mut t = t.shallow_clone();
                            let _ = t.f_add_scalar_(1)?;
                        }
                    }
                    match flat {
                        None => y,
                        Some(s) => y.f_reshape([s[1], s[0], s[2]])?.f_permute([1, 0, 2])?,
                    }
                }
                Op::Flatten {} if image => {
                    // [N, K*C, H, W] -> [K, N, C*H*W].
                    let n = a.size()[0];
                    a.f_reshape([n, k, -1])?.f_transpose(0, 1)?
                }
                Op::Flatten {} => a,
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
                    if net.last_use[*j] == pos && *j != arch.output() {
                        outs[*j] = None;
                    }
                }
            }
        }
        full(
            outs[arch.output()]
                .take()
                .ok_or_else(|| RuntimeError::spec("the output node was not computed"))?,
        )
    }

    /// Evaluation-mode logits of every member on the same batch, `[K, N, classes]`.
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        match self.kernels {
            Kernels::Batched => self.batched_forward(&self.repeat_input(x)?, false, Precision::F32),
            Kernels::PerMember => self.each_member(|_, tensors| {
                self.stacked.forward_on(tensors, x, false, Precision::F32)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusion::arch::preset;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Every layer kind, both layouts: the joint forward equals each
    /// member's own forward, in training mode (BatchNorm's batch statistics
    /// and running statistics included) and in evaluation mode.
    #[test]
    fn joint_forward_equals_each_members_forward() {
        let mut flat_bn = fusion::arch::SpecBuilder::new("flat-bn", vec![6]);
        flat_bn
            .linear("fc1", 6, 5, true)
            .batch_norm("bn1", 5)
            .relu(None)
            .linear("fc2", 5, 3, false);
        let specs = [
            preset("mlp:input=12,hidden=8,depth=2,classes=3").unwrap(),
            preset("lenet:classes=4").unwrap(),
            preset("resnet18:width=4,classes=5").unwrap(),
            flat_bn.build(),
        ];
        for spec in specs {
            let arch = Architecture::new(spec).unwrap();
            let name = arch.name().to_string();
            let nets: Vec<Network> = (0..3)
                .map(|s| Network::init(&arch, Device::Cpu, 10 + s).unwrap())
                .collect();
            for kernels in [Kernels::Batched, Kernels::PerMember] {
                let joint = JointNetwork::stack(&nets).unwrap().with_kernels(kernels);
                let mut shape = vec![4i64];
                shape.extend(arch.input_shape().iter().map(|&d| d as i64));
                let xs: Vec<Tensor> = (0..3)
                    .map(|_| Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)))
                    .collect();
                let y = joint
                    .forward_with(&joint.stack_inputs(&xs).unwrap(), true, Precision::F32)
                    .unwrap();
                for (k, net) in nets.iter().enumerate() {
                    let own = net.forward_t(&xs[k], true).unwrap();
                    let d = max_diff(&y.get(k as i64), &own);
                    assert!(d < 1e-5, "{name} member {k}: {d}");
                    let state = joint.member_state(k).unwrap();
                    for (pname, t) in &net.to_state().unwrap().tensors {
                        let mine = state.get(pname).unwrap().to_tch();
                        assert!(
                            max_diff(
                                &mine.to_kind(Kind::Double),
                                &t.to_tch().to_kind(Kind::Double)
                            ) < 1e-6,
                            "{name} {pname}"
                        );
                    }
                }
                let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
                let p = joint.predict(&x).unwrap();
                for (k, net) in nets.iter().enumerate() {
                    assert!(max_diff(&p.get(k as i64), &net.predict(&x).unwrap()) < 1e-5);
                }
            }
        }
    }

    /// A float64 copy of `net` (the trainer's networks are float32).
    fn double(net: &Network) -> Network {
        let params = net
            .params()
            .iter()
            .map(|p| {
                let t = p.tensor.detach();
                let t = if t.kind() == Kind::Float {
                    t.to_kind(Kind::Double)
                } else {
                    t
                };
                Param {
                    spec: p.spec.clone(),
                    tensor: if p.spec.role.trainable() {
                        t.set_requires_grad(true)
                    } else {
                        t
                    },
                }
            })
            .collect();
        Network::with_params(net.arch(), net.device(), params)
    }

    /// Batched and per-member kernels are the same mathematics as each
    /// member alone: in float64 their gradients agree with the member's own
    /// to rounding (1e-12 of the largest), for every layer kind and both
    /// layouts. (In float32 they agree to rounding too, which BatchNorm
    /// nets then amplify over steps: see `tests/joint.rs`.)
    #[test]
    fn batched_kernels_compute_the_per_member_gradients() {
        let mut flat_bn = fusion::arch::SpecBuilder::new("flat-bn", vec![6]);
        flat_bn
            .linear("fc1", 6, 5, true)
            .batch_norm("bn1", 5)
            .relu(None)
            .linear("fc2", 5, 3, false);
        for spec in [
            preset("mlp:input=12,hidden=8,depth=2,classes=3").unwrap(),
            preset("lenet:classes=4").unwrap(),
            preset("resnet18:channels=1,size=28,width=8").unwrap(),
            flat_bn.build(),
        ] {
            let arch = Architecture::new(spec).unwrap();
            let nets: Vec<Network> = (0..3)
                .map(|s| double(&Network::init(&arch, Device::Cpu, 20 + s).unwrap()))
                .collect();
            let mut shape = vec![16i64];
            shape.extend(arch.input_shape().iter().map(|&d| d as i64));
            let xs: Vec<Tensor> = (0..3)
                .map(|_| Tensor::randn(shape.as_slice(), (Kind::Double, Device::Cpu)))
                .collect();
            let grads: Vec<Vec<Tensor>> = [Kernels::Batched, Kernels::PerMember]
                .iter()
                .map(|&kernels| {
                    let joint = JointNetwork::stack(&nets).unwrap().with_kernels(kernels);
                    let x = joint.stack_inputs(&xs).unwrap();
                    let y = joint.forward_with(&x, true, Precision::F32).unwrap();
                    let loss = y
                        .log_softmax(-1, Kind::Double)
                        .select(2, 0)
                        .mean(Kind::Double);
                    Tensor::run_backward(&[&loss], &joint.trainable(), false, false)
                })
                .collect();
            // Each member's own network: the gradients of its own loss (a
            // bias right before BatchNorm has a gradient of rounding noise,
            // so differences are measured against the largest gradient).
            let scale = grads[1]
                .iter()
                .map(|g| g.abs().max().double_value(&[]))
                .fold(1e-30, f64::max);
            for (m, net) in nets.iter().enumerate() {
                let y = net.forward_t(&xs[m], true).unwrap();
                let loss = y
                    .log_softmax(-1, Kind::Double)
                    .select(1, 0)
                    .mean(Kind::Double)
                    / 3.0;
                let own = Tensor::run_backward(&[&loss], &net.trainable(), false, false);
                for (n, o) in own.iter().enumerate() {
                    for (kernels, g) in ["batched", "per-member"].iter().zip(&grads) {
                        let d = max_diff(&g[n].get(m as i64), o) / scale;
                        assert!(
                            d < 1e-12,
                            "{} {kernels}, member {m}, parameter {n}: {d:e}",
                            arch.name()
                        );
                    }
                }
            }
        }
    }
}
