//! Joint training: whether K models of one architecture can train as one
//! batched computation (their parameters stacked, one step for all), and
//! how much device memory that takes. Pure functions of the architecture
//! and the training configs, so the coordinator decides at submission and
//! the runtime checks the same rules before it trains.

use fusion::arch::{Architecture, Op};
use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::train::TrainConfig;

/// The run spec's `members.joint`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JointMode {
    /// Joint on GPU runs whose members fit the joint memory budget;
    /// separate tasks otherwise.
    #[default]
    Auto,
    /// Joint whenever the architecture and configs allow it (CPU runs too);
    /// otherwise separate tasks, with the reason in the run's events.
    On,
    /// Always separate tasks, one per model.
    Off,
}

impl JointMode {
    pub fn as_str(self) -> &'static str {
        match self {
            JointMode::Auto => "auto",
            JointMode::On => "on",
            JointMode::Off => "off",
        }
    }

    pub fn parse(text: &str) -> Option<JointMode> {
        match text {
            "auto" => Some(JointMode::Auto),
            "on" => Some(JointMode::On),
            "off" => Some(JointMode::Off),
            _ => None,
        }
    }
}

/// Why `arch` cannot train jointly, or `None` when it can. Every op trains
/// jointly except dropout (and the output must be a vector of logits, as
/// training needs anyway): its masks come from libtorch's global generator,
/// in an order a joint step cannot reproduce per member, so a jointly
/// trained member would not equal its separately trained twin.
pub fn arch_refusal(arch: &Architecture) -> Option<String> {
    if arch.output_shape().len() != 1 {
        return Some(format!(
            "the output of `{}` is {:?} per sample, not a vector of logits",
            arch.name(),
            arch.output_shape()
        ));
    }
    arch.nodes()
        .iter()
        .find(|n| matches!(n.op, Op::Dropout { p } if p > 0.0))
        .map(|n| {
            format!(
                "node `{}` is dropout, whose masks come from libtorch's global generator: \
                 a joint step cannot draw each member's masks as its own training would",
                n.name
            )
        })
}

/// Why models with these configs cannot train jointly (`None`: they can).
/// They may differ in their seed and their distillation only: one step
/// takes one batch size, one learning rate and one number of epochs.
pub fn config_refusal(configs: &[TrainConfig]) -> Option<String> {
    let first = configs.first()?;
    let comparable = |c: &TrainConfig| TrainConfig {
        seed: first.seed,
        distill: first.distill,
        log_every: first.log_every,
        ..c.clone()
    };
    configs.iter().enumerate().skip(1).find_map(|(i, c)| {
        (comparable(c) != *first).then(|| {
            let field = differing_field(first, c);
            format!("model {i} differs from model 0 in `{field}`; only seeds and distillation may differ")
        })
    })
}

fn differing_field(a: &TrainConfig, b: &TrainConfig) -> &'static str {
    // Destructured, so a field added to TrainConfig must be named here.
    let TrainConfig {
        epochs,
        batch_size,
        lr,
        momentum,
        weight_decay,
        nesterov,
        schedule,
        seed: _,
        bf16,
        augment,
        distill: _,
        log_every: _,
    } = a;
    [
        (*epochs != b.epochs, "epochs"),
        (*batch_size != b.batch_size, "batch_size"),
        (*lr != b.lr, "lr"),
        (*momentum != b.momentum, "momentum"),
        (*weight_decay != b.weight_decay, "weight_decay"),
        (*nesterov != b.nesterov, "nesterov"),
        (*schedule != b.schedule, "schedule"),
        (*bf16 != b.bf16, "bf16"),
        (*augment != b.augment, "augment"),
    ]
    .into_iter()
    .find_map(|(differs, name)| differs.then_some(name))
    .unwrap_or("settings")
}

/// Why these models cannot train jointly, or `None`.
pub fn refusal(arch: &Architecture, configs: &[TrainConfig]) -> Option<String> {
    if configs.len() < 2 {
        return Some("joint training needs at least two models".into());
    }
    arch_refusal(arch).or_else(|| config_refusal(configs))
}

/// An estimate of the device memory `teachers` models take beside a joint
/// training with batches of `batch_size`: their weights, and one batch's
/// activations (no gradients), in float32.
pub fn teacher_bytes(arch: &Architecture, batch_size: usize, teachers: usize) -> u64 {
    let activations: u64 = arch
        .nodes()
        .iter()
        .map(|n| n.out_shape.iter().product::<usize>() as u64)
        .sum();
    (arch.parameter_count() as u64 + batch_size as u64 * activations)
        .saturating_mul(4)
        .saturating_mul(teachers as u64)
}

/// An estimate of the device memory `k` models take training jointly with
/// batches of `batch_size`: per model its parameters four times (weights,
/// gradients, momentum, the optimiser's flat copy of the gradients) and
/// every node's activations twice (forward and backward), in float32.
pub fn memory_bytes(arch: &Architecture, batch_size: usize, k: usize) -> u64 {
    let params = arch.parameter_count() as u64;
    let activations: u64 = arch
        .nodes()
        .iter()
        .map(|n| n.out_shape.iter().product::<usize>() as u64)
        .sum::<u64>()
        + arch.input_shape().iter().product::<usize>() as u64;
    let per_model = 4 * params + 2 * batch_size as u64 * activations;
    per_model.saturating_mul(4).saturating_mul(k as u64)
}

/// How the models of one phase (the members, or the fine-tunings) train.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// As one joint task.
    Joint,
    /// As one task each. `Some(reason)`: `on` asked for joint training and
    /// [`refusal`] said no; the run's events say so.
    Separate(Option<String>),
}

/// Resolves `mode` for models with these configs on a run asking for
/// `device`: `off` never joins them; `on` joins them unless [`refusal`]
/// says no; `auto` joins them only on GPU runs whose estimated memory
/// ([`memory_bytes`]) is within `budget` bytes, and never says why not.
/// `teachers`: the models the distilling configs learn from (held on the
/// device beside the K models, and run on each batch without gradients).
pub fn decide(
    mode: JointMode,
    device: Device,
    arch: &Architecture,
    configs: &[TrainConfig],
    teachers: usize,
    budget: u64,
) -> Decision {
    let refused = || refusal(arch, configs);
    match mode {
        JointMode::Off => Decision::Separate(None),
        JointMode::On => match refused() {
            None => Decision::Joint,
            Some(why) => Decision::Separate(Some(why)),
        },
        JointMode::Auto => {
            let batch = configs.first().map_or(0, |c| c.batch_size);
            let distils = configs.iter().any(|c| c.distill.is_some());
            let teachers = if distils { teachers } else { 0 };
            let fits = || {
                memory_bytes(arch, batch, configs.len())
                    .saturating_add(teacher_bytes(arch, batch, teachers))
                    <= budget
            };
            if device == Device::Gpu && fits() && refused().is_none() {
                Decision::Joint
            } else {
                Decision::Separate(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusion::arch::preset;

    fn arch(name: &str) -> Architecture {
        Architecture::new(preset(name).unwrap()).unwrap()
    }

    #[test]
    fn dropout_is_refused_by_node_name() {
        assert_eq!(arch_refusal(&arch("lenet")), None);
        assert_eq!(arch_refusal(&arch("resnet18")), None);
        let mut spec = preset("mlp").unwrap();
        let n = spec.nodes.len();
        spec.nodes.insert(
            n - 1,
            fusion::arch::NodeSpec {
                name: Some("drop".into()),
                input: vec![],
                op: Op::Dropout { p: 0.5 },
            },
        );
        let refused = Architecture::new(spec)
            .ok()
            .and_then(|a| arch_refusal(&a))
            .unwrap_or_default();
        assert!(refused.contains("`drop`"), "{refused}");
    }

    #[test]
    fn configs_may_differ_in_seed_and_distillation_only() {
        let a = TrainConfig::default();
        let b = TrainConfig {
            seed: 7,
            distill: Some(crate::Distill::default()),
            ..a.clone()
        };
        assert_eq!(config_refusal(&[a.clone(), b]), None);
        let c = TrainConfig {
            lr: 0.5,
            ..a.clone()
        };
        let why = config_refusal(&[a.clone(), a.clone(), c]).unwrap();
        assert!(why.contains("model 2") && why.contains("`lr`"), "{why}");
        assert!(refusal(&arch("mlp"), &[a]).unwrap().contains("two"));
    }

    #[test]
    fn memory_grows_with_members_and_batch() {
        let a = arch("lenet");
        let one = memory_bytes(&a, 256, 1);
        assert!(one > 4 * 4 * a.parameter_count() as u64);
        assert_eq!(memory_bytes(&a, 256, 8), 8 * one);
        assert!(memory_bytes(&a, 512, 1) > one);
    }

    #[test]
    fn distilling_models_count_their_teachers_against_the_budget() {
        let a = arch("lenet");
        let plain = TrainConfig::default();
        let distilled = TrainConfig {
            distill: Some(crate::Distill::default()),
            ..plain.clone()
        };
        let need = memory_bytes(&a, plain.batch_size, 2);
        let teachers = teacher_bytes(&a, plain.batch_size, 4);
        assert!(teachers > 4 * 4 * a.parameter_count() as u64);
        let auto = |configs: &[TrainConfig], budget| {
            decide(JointMode::Auto, Device::Gpu, &a, configs, 4, budget)
        };
        let both_plain = [plain.clone(), plain.clone()];
        let one_distils = [plain, distilled];
        assert_eq!(auto(&both_plain, need), Decision::Joint);
        assert_eq!(auto(&one_distils, need), Decision::Separate(None));
        assert_eq!(auto(&one_distils, need + teachers), Decision::Joint);
    }

    #[test]
    fn auto_joins_gpu_runs_within_the_budget_and_on_says_why_not() {
        let a = arch("lenet");
        let configs: Vec<TrainConfig> = (1..=3)
            .map(|seed| TrainConfig {
                seed,
                ..TrainConfig::default()
            })
            .collect();
        let need = memory_bytes(&a, configs[0].batch_size, 3);
        let decide = |mode, device, budget| decide(mode, device, &a, &configs, 2, budget);
        assert_eq!(decide(JointMode::Auto, Device::Gpu, need), Decision::Joint);
        for (device, budget) in [
            (Device::Gpu, need - 1),
            (Device::Any, need),
            (Device::Cpu, need),
        ] {
            assert_eq!(
                decide(JointMode::Auto, device, budget),
                Decision::Separate(None),
                "{device:?} {budget}"
            );
        }
        assert_eq!(decide(JointMode::On, Device::Cpu, 0), Decision::Joint);
        assert_eq!(
            decide(JointMode::Off, Device::Gpu, u64::MAX),
            Decision::Separate(None)
        );
        let mut differing = configs.clone();
        differing[1].epochs += 1;
        match super::decide(JointMode::On, Device::Gpu, &a, &differing, 0, u64::MAX) {
            Decision::Separate(Some(why)) => assert!(why.contains("`epochs`"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            super::decide(JointMode::Auto, Device::Gpu, &a, &differing, 0, u64::MAX),
            Decision::Separate(None)
        );
    }
}
