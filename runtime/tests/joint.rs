//! Joint training on the CPU: K members trained as one equal their
//! separately trained twins, a resumed joint run equals an uninterrupted
//! one, and what joint training refuses is refused by name.
//!
//! Two kinds of kernels ([`Kernels`]), both checked against separate
//! training of the same members (same seeds, initialisations, data order,
//! augmentation):
//! - per member (the CPU's default): equal bit for bit after an epoch;
//! - batched (the GPU's: bmm, one grouped convolution for K members, one
//!   cross-entropy over [K, N]): every parameter and the losses within 1e-4
//!   (absolute; weights are of order 0.1). These kernels differ from the
//!   single ones only in summation order, about 1e-7 relative per step; over
//!   an epoch of the MLP and LeNet that stays below 1e-6 (measured 7e-8 and
//!   3e-7), while a real bug (a wrong batch, seed or gradient) moves weights
//!   by 1e-2 or more. The ResNet's batched run is not compared (why: at its
//!   test).

#![allow(clippy::unwrap_used)]

use fusion::arch::{preset, Architecture};
use fusion::state::StateDict;
use nt_runtime::data::{self, normalization, Augment, DataSpec, DeviceSet};
use nt_runtime::joint::Kernels;
use nt_runtime::model::Network;
use nt_runtime::train::{
    init_network, train, train_joint, Distill, JointHooks, NoHooks, TrainConfig, TrainState,
};
use nt_runtime::{RuntimeError, TchExt};
use tch::Device;

const TOLERANCE: f64 = 1e-4;

fn fashion(train: usize) -> (DeviceSet, DeviceSet) {
    let spec = DataSpec {
        train_subset: Some(train),
        test_subset: Some(500),
        ..DataSpec::fashion_mnist()
    };
    let splits = data::load_local(&spec).unwrap();
    let norm = normalization(&splits.train);
    (
        DeviceSet::new(&splits.train, &norm, Device::Cpu).unwrap(),
        DeviceSet::new(&splits.test, &norm, Device::Cpu).unwrap(),
    )
}

fn arch(name: &str) -> Architecture {
    Architecture::new(preset(name).unwrap()).unwrap()
}

fn config(seed: u64) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch_size: 64,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        seed,
        ..TrainConfig::default()
    }
}

fn max_diff(a: &StateDict, b: &StateDict) -> f64 {
    assert_eq!(a.tensors.len(), b.tensors.len());
    a.tensors
        .iter()
        .map(|(name, t)| {
            let u = b.get(name).unwrap();
            let (t, u) = (
                t.to_tch().to_kind(tch::Kind::Double),
                u.to_tch().to_kind(tch::Kind::Double),
            );
            (t - u).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// Trains members with `configs` one by one and jointly with each kind of
/// kernels (same seeds, same initialisations); returns, per kind, the
/// largest difference from the separately trained twins, in parameters,
/// and in training and test loss.
fn joint_against_separate(
    arch: &Architecture,
    configs: &[TrainConfig],
    teachers: &[Network],
    samples: usize,
) -> [(f64, f64); 2] {
    let (tr, te) = fashion(samples);
    let init = |c: &TrainConfig| init_network(arch, Device::Cpu, c.seed + 100).unwrap();
    let alone: Vec<_> = configs
        .iter()
        .map(|c| {
            let mut net = init(c);
            let out = train(&mut net, c, &tr, Some(&te), teachers, None, &mut NoHooks).unwrap();
            (net.to_state().unwrap(), out.history[0].clone())
        })
        .collect();
    [Kernels::PerMember, Kernels::Batched].map(|kernels| {
        let (joint, outcome) = train_joint(
            configs.iter().map(init).collect(),
            kernels,
            configs,
            &tr,
            Some(&te),
            teachers,
            None,
            &mut NoHooks,
        )
        .unwrap();
        assert!(!outcome.stopped);
        let mut worst = (0.0f64, 0.0f64);
        for (m, (state, own)) in alone.iter().enumerate() {
            let mine = &outcome.members[m].history[0];
            let (a, b) = (mine.eval.unwrap(), own.eval.unwrap());
            worst.0 = worst.0.max(max_diff(&joint[m].to_state().unwrap(), state));
            worst.1 = worst
                .1
                .max((mine.train_loss - own.train_loss).abs())
                .max((a.loss - b.loss).abs());
        }
        // The members differ from each other: each used its own seed.
        let between = max_diff(&joint[0].to_state().unwrap(), &joint[1].to_state().unwrap());
        assert!(between > 1e-2, "members 0 and 1 are alike: {between}");
        eprintln!(
            "{} {kernels:?}: max |joint - separate| = {:e} (weights), {:e} (losses)",
            arch.name(),
            worst.0,
            worst.1
        );
        worst
    })
}

/// Per member: the separate weights exactly (the reported losses are
/// reduced in another order). Batched: within the tolerance.
fn check([exact, batched]: [(f64, f64); 2]) {
    assert_eq!(
        exact.0, 0.0,
        "per-member kernels differ from separate training"
    );
    assert!(exact.1 < 1e-6, "per-member losses: {}", exact.1);
    assert!(
        batched.0 < TOLERANCE && batched.1 < TOLERANCE,
        "batched kernels: {batched:?}"
    );
}

#[test]
fn a_jointly_trained_mlp_equals_its_separately_trained_twins() {
    let configs: Vec<_> = (1..=3).map(config).collect();
    check(joint_against_separate(&arch("mlp"), &configs, &[], 2048));
}

#[test]
fn a_jointly_trained_lenet_with_augmentation_equals_its_twins() {
    let configs: Vec<_> = (1..=3)
        .map(|s| TrainConfig {
            augment: Augment {
                crop_padding: 2,
                hflip: true,
            },
            ..config(s)
        })
        .collect();
    check(joint_against_separate(&arch("lenet"), &configs, &[], 2048));
}

/// Per-member kernels equal separate training bit for bit over the epoch.
/// Batched kernels are not compared over an epoch here: this ResNet's
/// float32 training amplifies rounding. Its BatchNorm backward cancels
/// large terms, so a 1e-6 difference in one weight after the first step
/// changes some gradients by percents in the next (measured), and scaling
/// one separately trained twin's initial weights by 1 + 1e-7 moves its
/// epoch loss from 1.3994 to 1.3869. That the batched kernels compute the
/// same mathematics is shown in float64 instead, where their gradients
/// agree with the per-member ones to 1e-12
/// (`joint::tests::batched_kernels_compute_the_per_member_gradients`).
#[test]
fn a_jointly_trained_resnet_with_batch_norm_equals_its_twins() {
    let a = arch("resnet18:channels=1,size=28,width=8");
    let configs: Vec<_> = (1..=2).map(config).collect();
    let [(weights, losses), _] = joint_against_separate(&a, &configs, &[], 2048);
    assert_eq!(
        weights, 0.0,
        "per-member kernels differ from separate training"
    );
    assert!(losses < 1e-6, "per-member losses: {losses}");
}

#[test]
fn joint_fine_tunings_distil_only_where_their_config_says() {
    let a = arch("mlp");
    let teachers: Vec<Network> = (0..2)
        .map(|s| init_network(&a, Device::Cpu, 50 + s).unwrap())
        .collect();
    let configs = vec![
        config(4),
        TrainConfig {
            distill: Some(Distill::default()),
            ..config(4)
        },
    ];
    check(joint_against_separate(&a, &configs, &teachers, 2048));
}

/// Keeps every epoch's states.
#[derive(Default)]
struct Keep(Vec<Vec<TrainState>>);

impl JointHooks for Keep {
    fn epoch_end(
        &mut self,
        _epoch: usize,
        states: &dyn Fn() -> nt_runtime::Result<Vec<TrainState>>,
    ) -> nt_runtime::Result<()> {
        self.0.push(states()?);
        Ok(())
    }
}

#[test]
fn a_resumed_joint_run_equals_an_uninterrupted_one_bit_for_bit() {
    let (tr, te) = fashion(1024);
    let a = arch("lenet");
    let configs: Vec<_> = (1..=2)
        .map(|s| TrainConfig {
            epochs: 3,
            ..config(s)
        })
        .collect();
    let fresh = || {
        configs
            .iter()
            .map(|c| init_network(&a, Device::Cpu, c.seed).unwrap())
            .collect()
    };
    let mut keep = Keep::default();
    let (whole, whole_out) = train_joint(
        fresh(),
        Kernels::Batched,
        &configs,
        &tr,
        Some(&te),
        &[],
        None,
        &mut keep,
    )
    .unwrap();
    assert_eq!(keep.0.len(), 3);
    let after_one = keep.0[0].clone();
    let (resumed, resumed_out) = train_joint(
        fresh(),
        Kernels::Batched,
        &configs,
        &tr,
        Some(&te),
        &[],
        Some(after_one),
        &mut NoHooks,
    )
    .unwrap();
    for m in 0..2 {
        let (w, r) = (whole[m].to_state().unwrap(), resumed[m].to_state().unwrap());
        assert_eq!(max_diff(&w, &r), 0.0, "member {m}");
        assert_eq!(
            whole_out.members[m].history.len(),
            resumed_out.members[m].history.len()
        );
        assert_eq!(
            whole_out.members[m].history[2].train_loss,
            resumed_out.members[m].history[2].train_loss
        );
    }
}

#[test]
fn dropout_and_differing_configs_are_refused_by_name() {
    let (tr, _) = fashion(256);
    let mut spec = preset("mlp").unwrap();
    let last = spec.nodes.len() - 1;
    spec.nodes.insert(
        last,
        fusion::arch::NodeSpec {
            name: Some("drop".into()),
            input: vec![],
            op: fusion::arch::Op::Dropout { p: 0.2 },
        },
    );
    let dropout = Architecture::new(spec).unwrap();
    let nets = (0..2)
        .map(|s| init_network(&dropout, Device::Cpu, s).unwrap())
        .collect();
    let err = train_joint(
        nets,
        Kernels::PerMember,
        &[config(1), config(2)],
        &tr,
        None,
        &[],
        None,
        &mut NoHooks,
    )
    .err()
    .unwrap();
    assert!(matches!(err, RuntimeError::NotJoint(_)), "{err}");
    assert!(err.to_string().contains("`drop`"), "{err}");

    let a = arch("mlp");
    let nets = (0..2)
        .map(|s| init_network(&a, Device::Cpu, s).unwrap())
        .collect();
    let other = TrainConfig {
        batch_size: 32,
        ..config(2)
    };
    let err = train_joint(
        nets,
        Kernels::PerMember,
        &[config(1), other],
        &tr,
        None,
        &[],
        None,
        &mut NoHooks,
    )
    .err()
    .unwrap();
    assert!(matches!(err, RuntimeError::NotJoint(_)), "{err}");
    assert!(err.to_string().contains("batch_size"), "{err}");
}
