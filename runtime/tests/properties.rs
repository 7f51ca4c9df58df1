//! Properties of the fusion methods over random architectures and K in 2..8.

#![allow(clippy::unwrap_used)]

use fusion::arch::presets::{mlp_spec, resnet_spec};
use fusion::arch::{ArchSpec, Architecture, Op, ParamRole, SpecBuilder};
use fusion::assemble::Selection;
use fusion::coupling::{Coupling, GroupKind};
use fusion::state::{DType, HostTensor, StateDict};
use fusion::transplant;
use fusion::Method;
use nt_runtime::guard::GuardMode;
use nt_runtime::model::Network;
use nt_runtime::{fuse, FuseOptions};
use proptest::prelude::*;
use tch::{Device, Tensor};

/// Deterministic pseudo-random members (SplitMix64), so a failing case replays.
fn member(arch: &Architecture, seed: u64) -> StateDict {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut state = StateDict::default();
    for p in arch.params() {
        let n: usize = p.shape.iter().product();
        let t = match p.role {
            ParamRole::BatchesTracked => HostTensor::i64(vec![], vec![(next() * 100.0) as i64]),
            ParamRole::RunningVar => {
                HostTensor::f32(p.shape, (0..n).map(|_| (0.5 + next()) as f32).collect())
            }
            _ => HostTensor::f32(
                p.shape,
                (0..n).map(|_| (2.0 * next() - 1.0) as f32).collect(),
            ),
        };
        state.insert(p.name, t);
    }
    state
}

#[derive(Debug, Clone)]
enum Shape {
    Mlp {
        features: usize,
        depth: usize,
        hidden: usize,
        classes: usize,
        bias: bool,
    },
    Conv {
        channels: usize,
        size: usize,
        widths: (usize, usize),
        kernel2: usize,
        norm: bool,
        pool: bool,
        hidden: usize,
        bias: bool,
    },
    Resnet {
        blocks: Vec<usize>,
        width: usize,
        channels: usize,
        size: usize,
    },
    /// MobileNetV2-like: expansion, depthwise conv, projection, a residual,
    /// an adaptive pool to any size, a BatchNorm1d between Linear layers,
    /// and one of the element-wise activations.
    Inverted {
        channels: usize,
        size: usize,
        expand: usize,
        width: usize,
        pool: usize,
        activation: usize,
    },
}

/// The element-wise activations, indexed by a drawn number.
fn activation(i: usize) -> Op {
    use fusion::arch::GeluApproximation;
    match i % 8 {
        0 => Op::Relu6 {},
        1 => Op::Hardtanh {
            min: -0.5,
            max: 2.0,
        },
        2 => Op::LeakyRelu { slope: 0.1 },
        3 => Op::Gelu {
            approximate: GeluApproximation::Tanh,
        },
        4 => Op::Silu {},
        5 => Op::Hardswish {},
        6 => Op::Sigmoid {},
        _ => Op::Tanh {},
    }
}

fn spec(shape: &Shape) -> ArchSpec {
    match shape.clone() {
        Shape::Mlp {
            features,
            depth,
            hidden,
            classes,
            bias,
        } => mlp_spec(&[features], hidden, depth, classes, bias),
        Shape::Conv {
            channels,
            size,
            widths: (w1, w2),
            kernel2,
            norm,
            pool,
            hidden,
            bias,
        } => {
            let mut b = SpecBuilder::new("convnet", vec![channels, size, size]);
            b.conv("c1", &[], channels, w1, 3, 1, 1, bias);
            if norm {
                b.batch_norm("n1", w1);
            }
            b.relu(None);
            let mut s = size;
            if pool {
                b.max_pool(2, 2, 0);
                s /= 2;
            }
            b.conv("c2", &[], w1, w2, kernel2, 1, kernel2 / 2, bias);
            if norm {
                b.batch_norm("n2", w2);
            }
            b.relu(None)
                .flatten()
                .linear("f1", w2 * s * s, hidden, bias)
                .relu(None)
                .node(Some("drop"), &[], Op::Dropout { p: 0.5 })
                .linear("f2", hidden, 3, true);
            b.build()
        }
        Shape::Resnet {
            blocks,
            width,
            channels,
            size,
        } => resnet_spec("resnet", &blocks, width, channels, 4, size, false),
        Shape::Inverted {
            channels,
            size,
            expand,
            width,
            pool,
            activation: a,
        } => {
            let hidden = width * expand;
            let mut b = SpecBuilder::new("inverted", vec![channels, size, size]);
            b.conv("stem", &[], channels, width, 3, 1, 1, false)
                .batch_norm("stem_bn", width)
                .node(Some("stem_act"), &[], activation(a))
                .conv("expand", &[], width, hidden, 1, 1, 0, false)
                .batch_norm("expand_bn", hidden)
                .node(None, &[], activation(a + 1))
                .node(
                    Some("dw"),
                    &[],
                    Op::Conv2d {
                        in_channels: hidden,
                        out_channels: hidden,
                        kernel: 3,
                        stride: 1,
                        padding: 1,
                        bias: a % 2 == 0,
                        groups: hidden,
                    },
                )
                .batch_norm("dw_bn", hidden)
                .node(None, &[], activation(a + 2))
                .conv("project", &[], hidden, width, 1, 1, 0, false)
                .batch_norm("project_bn", width)
                .node(Some("add"), &["stem_act", "project_bn"], Op::Add {})
                .node(
                    None,
                    &[],
                    Op::AdaptiveAvgPool2d {
                        output: fusion::arch::PoolSize::Rect([pool, pool + 1]),
                    },
                )
                .flatten()
                .linear("fc1", width * pool * (pool + 1), 6, true)
                .batch_norm("fc1_bn", 6)
                .node(None, &[], activation(a + 3))
                .linear("fc2", 6, 3, true);
            b.build()
        }
    }
}

fn shapes() -> impl Strategy<Value = Shape> {
    prop_oneof![
        (2usize..10, 1usize..4, 1usize..9, 2usize..6, any::<bool>()).prop_map(
            |(features, depth, hidden, classes, bias)| Shape::Mlp {
                features,
                depth,
                hidden,
                classes,
                bias
            }
        ),
        (
            1usize..4,
            4usize..9,
            (1usize..6, 1usize..6),
            prop_oneof![Just(1usize), Just(3)],
            any::<bool>(),
            any::<bool>(),
            1usize..8,
            any::<bool>()
        )
            .prop_map(
                |(channels, size, widths, kernel2, norm, pool, hidden, bias)| Shape::Conv {
                    channels,
                    size,
                    widths,
                    kernel2,
                    norm,
                    pool,
                    hidden,
                    bias
                }
            ),
        (
            prop::collection::vec(1usize..3, 1..3),
            1usize..4,
            1usize..4,
            4usize..9
        )
            .prop_map(|(blocks, width, channels, size)| Shape::Resnet {
                blocks,
                width,
                channels,
                size
            }),
        (
            1usize..4,
            3usize..7,
            1usize..4,
            1usize..5,
            1usize..5,
            0usize..8
        )
            .prop_map(|(channels, size, expand, width, pool, activation)| {
                Shape::Inverted {
                    channels,
                    size,
                    expand,
                    width,
                    pool,
                    activation,
                }
            }),
    ]
}

fn guard_always() -> FuseOptions {
    FuseOptions {
        guard: GuardMode::Always,
        ..Default::default()
    }
}

fn logits(arch: &Architecture, state: &StateDict, x: &Tensor) -> Tensor {
    Network::from_state(arch, state, Device::Cpu)
        .unwrap()
        .predict(x)
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn nt_keeps_the_architecture_and_transplants_whole_neurons(
        shape in shapes(),
        k in 2usize..8,
        seed in any::<u64>(),
    ) {
        let arch = Architecture::new(spec(&shape)).unwrap();
        let members: Vec<StateDict> = (0..k).map(|i| member(&arch, seed ^ (i as u64 * 7919))).collect();
        let refs: Vec<&StateDict> = members.iter().collect();

        // The guard runs on every case, so exactness (a) and (b) hold too.
        let fused = fuse(Method::Nt, &arch, &refs, &guard_always()).unwrap();
        prop_assert!(fused.report.guard.ran);

        // Exactly the member architecture, for every K.
        fusion::checkpoint::validate(&fused.state, &arch, "fused").unwrap();
        for g in &fused.report.groups {
            prop_assert_eq!(g.kept_per_member.iter().sum::<usize>(), g.width);
        }

        // Each fused hidden neuron's incoming weights are its member's,
        // restricted to the kept inputs (zero for inputs from other members).
        let coupling = Coupling::derive(&arch).unwrap();
        let selections = transplant::select(&arch, &coupling, &refs).unwrap();
        for (node_index, node) in arch.nodes().iter().enumerate() {
            let Some(ports) = coupling.ports(node_index) else { continue };
            let Selection::Picked(out_picks) = &selections[ports.output] else { continue };
            let name = format!("{}.weight", node.name);
            let fused_w = fused.state.get(&name).unwrap().as_f32().unwrap();
            let in_width = coupling.group(ports.input).width;
            let inner = fused.state.get(&name).unwrap().shape().iter().skip(1).product::<usize>()
                / selections[ports.input].len();
            let src_row = in_width * inner;
            let cols = selections[ports.input].len() * inner;
            for (i, pick) in out_picks.iter().enumerate() {
                let m = pick.member as usize;
                let src = members[m].get(&name).unwrap().as_f32().unwrap();
                let src = &src[pick.channel as usize * src_row..][..src_row];
                let row = &fused_w[i * cols..(i + 1) * cols];
                match &selections[ports.input] {
                    Selection::Shared(_) => prop_assert_eq!(row, src),
                    Selection::Picked(in_picks) => {
                        for (j, q) in in_picks.iter().enumerate() {
                            let got = &row[j * inner..(j + 1) * inner];
                            if q.member as usize == m {
                                let c = q.channel as usize;
                                prop_assert_eq!(got, &src[c * inner..(c + 1) * inner]);
                            } else {
                                prop_assert!(got.iter().all(|&x| x == 0.0));
                            }
                        }
                    }
                }
            }
        }

        // A depthwise filter moves with its channel.
        for (node_index, node) in arch.nodes().iter().enumerate() {
            let (Op::Conv2d { groups, .. }, Some(g)) = (&node.op, coupling.channel_group(node_index)) else {
                continue;
            };
            prop_assert!(*groups > 1);
            let Selection::Picked(picks) = &selections[g] else { continue };
            let name = format!("{}.weight", node.name);
            let fused_w = fused.state.get(&name).unwrap().as_f32().unwrap();
            let row = fused_w.len() / picks.len();
            for (i, pick) in picks.iter().enumerate() {
                let src = members[pick.member as usize].get(&name).unwrap().as_f32().unwrap();
                let c = pick.channel as usize;
                prop_assert_eq!(&fused_w[i * row..(i + 1) * row], &src[c * row..(c + 1) * row]);
            }
        }

        // The concatenated model reproduces the ensemble's mean logits.
        let x = nt_runtime::guard::probe(arch.input_shape(), 5, seed);
        let concat = fuse(Method::Concat, &arch, &refs, &guard_always()).unwrap();
        let mut mean = logits(&arch, &members[0], &x);
        for m in &members[1..] {
            mean += logits(&arch, m, &x);
        }
        mean /= k as f64;
        let wide = logits(&concat.arch, &concat.state, &x);
        let diff = (&wide - &mean).abs().max().double_value(&[]);
        let scale = mean.abs().max().double_value(&[]).max(1.0);
        prop_assert!(diff <= 1e-4 * scale, "concat differs from the ensemble by {}", diff);
        for g in coupling.groups().iter().filter(|g| g.kind == GroupKind::Hidden) {
            let wide_params = concat.arch.params();
            let writer = &arch.nodes()[g.producers[0]].name;
            let p = wide_params.iter().find(|p| p.name == format!("{writer}.weight")).unwrap();
            prop_assert_eq!(p.shape[0], k * g.width);
        }
    }

    #[test]
    fn nt_variants_and_averaging_keep_the_architecture(
        shape in shapes(),
        k in 2usize..8,
        seed in any::<u64>(),
    ) {
        let arch = Architecture::new(spec(&shape)).unwrap();
        let members: Vec<StateDict> = (0..k).map(|i| member(&arch, seed ^ (i as u64 * 104_729))).collect();
        let refs: Vec<&StateDict> = members.iter().collect();
        for method in [Method::NtIterative, Method::NtHierarchical, Method::Average] {
            let fused = fuse(method, &arch, &refs, &guard_always()).unwrap();
            fusion::checkpoint::validate(&fused.state, &arch, "fused").unwrap();
            for g in &fused.report.groups {
                prop_assert_eq!(g.kept_per_member.iter().sum::<usize>(), g.width);
                prop_assert_eq!(g.kept_per_member.len(), k);
            }
            if method != Method::Average {
                prop_assert_eq!(
                    fused.report.guard.steps.len(),
                    match method { Method::NtIterative => k - 1, _ => hierarchical_steps(k) }
                );
            }
        }
        // Averaging is the element-wise mean.
        let avg = fuse(Method::Average, &arch, &refs, &guard_always()).unwrap();
        for p in arch.params().iter().filter(|p| p.dtype == DType::F32) {
            let got = avg.state.get(&p.name).unwrap().as_f32().unwrap()[0];
            let want = members.iter().map(|m| m.get(&p.name).unwrap().as_f32().unwrap()[0]).sum::<f32>() / k as f32;
            prop_assert!((got - want).abs() <= 1e-6);
        }
    }
}

fn hierarchical_steps(k: usize) -> usize {
    if k < 4 {
        1
    } else {
        hierarchical_steps(k / 2) + hierarchical_steps(k - k / 2) + 1
    }
}
