//! The exactness guard. On a probe batch it checks that
//! (a) the concatenated model's logits equal the members' mean logits, and
//! (b) the fused model's logits equal those of the concatenated model in
//!     which every layer ignores the dropped channels (their input weights
//!     zeroed).
//! A mis-wired spec or a wrong coupling fails (a) or (b) instead of yielding a
//! silently wrong model. The guard builds the wide model, so by default it
//! runs only below a size limit and says when it skips.

use fusion::arch::Architecture;
use fusion::assemble::{all_channels, assemble, Selection};
use fusion::check::StepCheck;
pub use fusion::check::{GuardMode, GuardReport, GuardStep};
use fusion::coupling::{Coupling, GroupKind};
use fusion::state::{HostTensor, StateDict};
use fusion::{Fused, FusionError, Method};
use tch::{Device, Tensor};

use crate::model::Network;
use crate::{Result, RuntimeError};

/// How [`fuse`] checks its result.
#[derive(Clone, Copy, Debug)]
pub struct FuseOptions {
    pub guard: GuardMode,
    /// The guard's allowed logit difference, relative to max(1, max |logit|).
    pub tolerance: f64,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            guard: GuardMode::default(),
            tolerance: 1e-3,
        }
    }
}

/// Fuses `members` with `method`, every step checked by the exactness guard.
pub fn fuse(
    method: Method,
    arch: &Architecture,
    members: &[&StateDict],
    options: &FuseOptions,
) -> Result<Fused> {
    let mut guard = Guard::new(options.guard, options.tolerance);
    Ok(fusion::fuse(method, arch, members, &mut guard)?)
}

pub struct Guard {
    mode: GuardMode,
    /// Allowed difference relative to the logits' scale.
    tolerance: f64,
    probe_batch: usize,
    pub report: GuardReport,
}

/// A deterministic standard-normal probe batch (SplitMix64 and Box-Muller),
/// independent of libtorch's global generator.
pub fn probe(shape: &[usize], batch: usize, seed: u64) -> Tensor {
    let n = batch * shape.iter().product::<usize>();
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    let mut dims = vec![batch as i64];
    dims.extend(shape.iter().map(|&d| d as i64));
    Tensor::from_slice(&values).reshape(&dims)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(a.f_sub(b)?.f_abs()?.f_max()?.f_double_value(&[])?)
}

/// `diff <= allowed`, false for NaN.
fn within(diff: f64, allowed: f64) -> bool {
    diff <= allowed
}

fn max_abs(a: &Tensor) -> Result<f64> {
    Ok(a.f_abs()?.f_max()?.f_double_value(&[])?)
}

impl Guard {
    pub fn new(mode: GuardMode, tolerance: f64) -> Self {
        Guard {
            mode,
            tolerance,
            probe_batch: 8,
            report: GuardReport::default(),
        }
    }

    /// Whether a step over `k` members should run, recording why not.
    fn should_run(&mut self, arch: &Architecture, coupling: &Coupling, k: usize) -> Result<bool> {
        let limit = match self.mode {
            GuardMode::Off => {
                self.report.skipped = Some("switched off".into());
                return Ok(false);
            }
            GuardMode::Always => return Ok(true),
            GuardMode::Auto { max_wide_params } => max_wide_params,
        };
        let wide = Architecture::new(coupling.resized(arch, &coupling.wide_widths(k), "wide"))?;
        let params = wide.parameter_count();
        if params > limit {
            self.report.skipped = Some(format!(
                "the concatenated model of {k} members has {params} parameters, over the guard's limit of {limit}; \
                 raise the limit or force the guard to check it"
            ));
            return Ok(false);
        }
        Ok(true)
    }

    /// Checks one fusion step: (a) always, (b) when the step selected channels.
    pub fn check_step(
        &mut self,
        arch: &Architecture,
        coupling: &Coupling,
        members: &[&StateDict],
        kept: Option<(&[Selection], &StateDict)>,
    ) -> Result<()> {
        let k = members.len();
        if !self.should_run(arch, coupling, k)? {
            return Ok(());
        }
        let _no_grad = tch::no_grad_guard();
        let x = probe(arch.input_shape(), self.probe_batch, 0x6e74);
        let mut mean: Option<Tensor> = None;
        for m in members {
            let y = Network::from_state(arch, m, Device::Cpu)?.predict(&x)?;
            mean = Some(match mean {
                None => y,
                Some(acc) => acc.f_add(&y)?,
            });
        }
        let mean = mean
            .ok_or_else(|| RuntimeError::Fusion(FusionError::Members("no members".into())))?
            .f_div_scalar(k as f64)?;
        let scale = max_abs(&mean)?.max(1.0);

        let wide_arch =
            Architecture::new(coupling.resized(arch, &coupling.wide_widths(k), "wide"))?;
        let wide = assemble(arch, coupling, members, &all_channels(coupling, k))?;
        let wide_logits = Network::from_state(&wide_arch, &wide, Device::Cpu)?.predict(&x)?;
        let concat_diff = max_abs_diff(&wide_logits, &mean)?;
        if !within(concat_diff, self.tolerance * scale) {
            return Err(RuntimeError::Fusion(FusionError::Guard(format!(
                "the concatenated model's logits differ from the members' mean logits by {concat_diff:.3e} \
                 (allowed {:.1e} at logit scale {scale:.3}); the architecture's coupling does not describe \
                 how these members compute, or a layer after the last Linear/conv is not linear",
                self.tolerance * scale
            ))));
        }
        let mut step = GuardStep {
            members: k,
            concat_max_diff: concat_diff,
            fused_max_diff: None,
            scale,
        };
        if let Some((selections, fused)) = kept {
            let masked = mask_dropped(arch, coupling, &wide, selections, k)?;
            let masked_logits =
                Network::from_state(&wide_arch, &masked, Device::Cpu)?.predict(&x)?;
            let fused_logits = Network::from_state(arch, fused, Device::Cpu)?.predict(&x)?;
            let diff = max_abs_diff(&fused_logits, &masked_logits)?;
            let scale = max_abs(&masked_logits)?.max(1.0);
            if !within(diff, self.tolerance * scale) {
                return Err(RuntimeError::Fusion(FusionError::Guard(format!(
                    "the fused model's logits differ from the concatenated model with the dropped channels \
                     ignored by {diff:.3e} (allowed {:.1e} at logit scale {scale:.3}): the kept weights were \
                     not gathered consistently with the coupling",
                    self.tolerance * scale
                ))));
            }
            step.fused_max_diff = Some(diff);
        }
        self.report.ran = true;
        self.report.steps.push(step);
        Ok(())
    }
}

impl StepCheck for Guard {
    fn check(
        &mut self,
        arch: &Architecture,
        coupling: &Coupling,
        members: &[&StateDict],
        kept: Option<(&[Selection], &StateDict)>,
    ) -> fusion::Result<()> {
        self.check_step(arch, coupling, members, kept)
            .map_err(|e| match e {
                RuntimeError::Fusion(e) => e,
                other => FusionError::Guard(format!("the guard could not run the models: {other}")),
            })
    }

    fn report(&self) -> GuardReport {
        self.report.clone()
    }
}

/// The wide state with the input weights of every dropped channel zeroed in
/// every layer that reads it.
fn mask_dropped(
    arch: &Architecture,
    coupling: &Coupling,
    wide: &StateDict,
    selections: &[Selection],
    k: usize,
) -> Result<StateDict> {
    let mut masked = wide.clone();
    for group in coupling.groups() {
        let Selection::Picked(picks) = &selections[group.id] else {
            continue;
        };
        if group.kind != GroupKind::Hidden {
            continue;
        }
        let mut keep = vec![false; k * group.width];
        for p in picks {
            keep[p.member as usize * group.width + p.channel as usize] = true;
        }
        for consumer in &group.consumers {
            let name = format!("{}.weight", arch.nodes()[consumer.node].name);
            let t = masked
                .get(&name)
                .ok_or_else(|| FusionError::Members(format!("wide model lacks `{name}`")))?;
            let shape = t.shape().to_vec();
            let mut data = t.as_f32().unwrap_or(&[]).to_vec();
            let row_len: usize = shape[1..].iter().product();
            let inner = row_len / (k * group.width);
            for row in data.chunks_mut(row_len) {
                for (c, kept) in keep.iter().enumerate() {
                    if !kept {
                        row[c * inner..(c + 1) * inner].fill(0.0);
                    }
                }
            }
            masked.insert(name, HostTensor::f32(shape, data));
        }
    }
    Ok(masked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn probe_is_deterministic_and_roughly_standard_normal() {
        let a = probe(&[1000], 10, 1);
        let b = probe(&[1000], 10, 1);
        assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.0);
        let mean = a.mean(Kind::Float).double_value(&[]);
        let std = a.std(true).double_value(&[]);
        assert!(
            mean.abs() < 0.05 && (std - 1.0).abs() < 0.05,
            "{mean} {std}"
        );
    }
}
