//! Optimal-transport fusion (OT), the paper's baseline: the weight mode of
//! Singh and Jaggi's otfusion as the NT paper's reference code runs it
//! (`fuse_optimal_transport`).
//!
//! Every member j > 0 is aligned to member 0, layer by layer from the input:
//!
//! 1. *past correction*: the layer's input channels are put in member 0's
//!    order by the previous layer's plan (for a Linear after a flatten a
//!    channel is its `H*W` consecutive columns, for a conv its filters);
//! 2. the ground metric is the Euclidean distance (not squared) between
//!    member j's corrected neurons (rows, flattened filters) and member 0's;
//! 3. with uniform marginals and equal widths the exact optimal transport
//!    plan is a permutation scaled by 1/n; the reference then scales it by
//!    1/(marginal + 1e-7), so every application multiplies by
//!    `(1/n) / (1/n + 1e-7)`, reproduced here in f32 as it computes it;
//! 4. the aligned layer is `Tᵀ W_j`: member j's neurons in member 0's order.
//!
//! The output layer is aligned like the others, as the reference does: its
//! neurons (the classes) are matched to member 0's too. For trained members
//! the match is the identity, since class `c` of every member answers the
//! same question; for unrelated random members it need not be, and the
//! reference's golden fixtures show it permuted. The fused model is the
//! mean of member 0 and the aligned members, summed in member order as the
//! reference does.
//!
//! The plan comes from an exact assignment solver ([`crate::assignment`]),
//! the distances from one matrix product per layer: memory is the members,
//! the output and one `n × n` f32 matrix, never the reference's `n × n × d`.
//!
//! Beyond the reference: biases are aligned with their neurons and take part
//! in the ground metric (a neuron is its weights and its bias). BatchNorm and
//! residual additions are refused: the reference does not define them.

use crate::arch::{Architecture, Op, ParamRole};
use crate::coupling::Coupling;
use crate::state::{DType, HostTensor, StateDict};
use crate::{assignment, FusionError, Result};

/// For each channel of member 0, the matched channel of member j.
type Plan = Vec<usize>;

/// How the reference scales a plan of `n` neurons: `T · diag(1/(1/n + 1e-7))`
/// on a permutation with entries `1/n`, all in f32.
fn plan_scale(n: usize) -> f32 {
    let entry = 1.0f32 / n as f32;
    let marginal = entry + 1e-7f32;
    entry * (1.0f32 / marginal)
}

/// Refuses what the reference does not define, naming the layer and why.
fn check_supported(arch: &Architecture, coupling: &Coupling) -> Result<()> {
    for g in coupling.groups() {
        if g.producers.len() > 1 {
            return Err(FusionError::Unsupported(format!(
                "OT fusion does not support residual additions ({} add their outputs): \
                 the reference aligns a chain of layers, one producer per layer",
                coupling.label(arch, g.id)
            )));
        }
    }
    for node in arch.nodes() {
        if matches!(node.op, Op::BatchNorm { .. }) {
            return Err(FusionError::Unsupported(format!(
                "OT fusion does not support BatchNorm (layer `{}`): the reference's \
                 otfusion aligns weights only, not normalisation statistics",
                node.name
            )));
        }
        if let Op::Conv2d { groups, .. } = node.op {
            if groups > 1 {
                return Err(FusionError::Unsupported(format!(
                    "OT fusion does not support grouped or depthwise convolutions (layer `{}`, \
                     groups={groups}): the reference aligns dense layers only",
                    node.name
                )));
            }
        }
    }
    Ok(())
}

fn f32_of<'a>(m: &'a StateDict, name: &str, who: usize) -> Result<&'a [f32]> {
    m.get(name)
        .and_then(HostTensor::as_f32)
        .ok_or_else(|| FusionError::Members(format!("member {who} lacks float tensor `{name}`")))
}

/// Euclidean distances between the rows of `a` (member j) and of `b`
/// (member 0), both `n × d`: `|a_i|² + |b_k|² - 2 a_i·b_k`, with the cross
/// term from one f32 matrix product (split over the cores), the rest in f64,
/// stored in place of the product (one `n × n` f32 matrix in all).
fn distances(n: usize, d: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    let norm = |x: &[f32]| -> Vec<f64> {
        x.chunks(d.max(1))
            .map(|r| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
            .collect()
    };
    let (na, nb) = (norm(a), norm(b));
    let mut dot = vec![0.0f32; n * n];
    crate::parallel::for_each_row_block(&mut dot, n, |first_row, block| {
        let rows = block.len() / n.max(1);
        // SAFETY: the slices hold `rows × d`, `n × d` and `rows × n`
        // elements laid out with the strides given.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                d,
                n,
                1.0,
                a[first_row * d..].as_ptr(),
                d as isize,
                1,
                b.as_ptr(),
                1,
                d as isize,
                0.0,
                block.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    });
    for (i, row) in dot.chunks_mut(n.max(1)).enumerate() {
        for (k, x) in row.iter_mut().enumerate() {
            let sq = na[i] + nb[k] - 2.0 * f64::from(*x);
            *x = sq.max(0.0).sqrt() as f32;
        }
    }
    dot
}

/// Member j's layer, its input channels put in member 0's order (each
/// channel a block of `inner` consecutive values of a row) and scaled as the
/// reference's plan does.
fn correct_inputs(w: &[f32], rows: usize, plan: &Plan, inner: usize, scale: f32) -> Vec<f32> {
    let row_len = plan.len() * inner;
    let mut out = vec![0.0f32; rows * row_len];
    for r in 0..rows {
        let src = &w[r * row_len..(r + 1) * row_len];
        let dst = &mut out[r * row_len..(r + 1) * row_len];
        for (c0, &cj) in plan.iter().enumerate() {
            for t in 0..inner {
                dst[c0 * inner + t] = src[cj * inner + t] * scale;
            }
        }
    }
    out
}

/// Rows in member 0's order: row `c0` is member j's row `plan[c0]`, scaled.
#[cfg(test)]
fn permute_rows(w: &[f32], row_len: usize, plan: &Plan, scale: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    for &cj in plan {
        out.extend(
            w[cj * row_len..(cj + 1) * row_len]
                .iter()
                .map(|x| x * scale),
        );
    }
    out
}

/// Adds member `j`, aligned to member 0, into `sums` (one running sum per
/// parameter of `params`, in that order), layer by layer: only one layer's
/// corrected copy is held at a time, never a whole aligned member.
fn add_aligned(
    arch: &Architecture,
    coupling: &Coupling,
    params: &[crate::arch::ParamSpec],
    reference: &StateDict,
    member: &StateDict,
    j: usize,
    sums: &mut [Vec<f32>],
) -> Result<()> {
    let mut plans: Vec<Option<Plan>> = vec![None; coupling.groups().len()];
    for &node in arch.order() {
        let Some(ports) = coupling.ports(node) else {
            continue;
        };
        let layer = &arch.nodes()[node].name;
        let find = |role: ParamRole| params.iter().position(|p| p.node == node && p.role == role);
        let wi = find(ParamRole::Weight)
            .ok_or_else(|| FusionError::Members(format!("layer `{layer}` has no weight")))?;
        let bi = find(ParamRole::Bias);
        let weight = &params[wi];
        let rows = weight.shape[0];
        let row_len = weight.shape[1..].iter().product::<usize>();
        let w = f32_of(member, &weight.name, j)?;
        let b = bi.map(|i| f32_of(member, &params[i].name, j)).transpose()?;
        if w.iter().chain(b.unwrap_or(&[])).any(|x| !x.is_finite()) {
            return Err(FusionError::Members(format!(
                "member {j}: layer `{layer}` has a non-finite weight; OT's ground metric \
                 needs finite weights"
            )));
        }

        // 1. Past correction by the input group's plan.
        let corrected: std::borrow::Cow<'_, [f32]> = match &plans[ports.input] {
            Some(plan) => {
                let inner = row_len / plan.len();
                correct_inputs(w, rows, plan, inner, plan_scale(plan.len())).into()
            }
            None => w.into(),
        };

        // 2-4. Neurons are matched to member 0's: a hidden layer's, and the
        // output layer's too, as the reference does (see the module docs).
        // Every producer writes a hidden or the output group.
        let w0 = f32_of(reference, &weight.name, 0)?;
        let b0 = bi
            .map(|i| f32_of(reference, &params[i].name, 0))
            .transpose()?;
        let plan = match_neurons(rows, row_len, &corrected, b, w0, b0);
        let scale = plan_scale(rows);
        // `Tᵀ W`: row c0 of the aligned layer is row plan[c0], scaled (one
        // f32 product, then the sum, as the reference rounds).
        for (c0, &cj) in plan.iter().enumerate() {
            let src = &corrected[cj * row_len..(cj + 1) * row_len];
            let dst = &mut sums[wi][c0 * row_len..(c0 + 1) * row_len];
            for (s, x) in dst.iter_mut().zip(src) {
                *s += x * scale;
            }
        }
        if let (Some(bi), Some(b)) = (bi, b) {
            for (c0, &cj) in plan.iter().enumerate() {
                sums[bi][c0] += b[cj];
            }
        }
        plans[ports.output] = Some(plan);
    }
    Ok(())
}

/// The plan of one layer: the assignment of member j's neurons to member
/// 0's least in total Euclidean distance (a neuron is its row, and its bias
/// when the layer has one).
fn match_neurons(
    rows: usize,
    row_len: usize,
    w: &[f32],
    b: Option<&[f32]>,
    w0: &[f32],
    b0: Option<&[f32]>,
) -> Plan {
    let d = row_len + usize::from(b.is_some());
    let (a, r) = (
        with_bias(rows, row_len, w, b),
        with_bias(rows, row_len, w0, b0),
    );
    let cost = distances(rows, d, &a, &r);
    // Rows of the cost are member j's neurons, columns member 0's.
    let assignment = assignment::solve(rows, &cost);
    let mut plan = vec![0; rows];
    for (cj, &c0) in assignment.iter().enumerate() {
        plan[c0] = cj;
    }
    plan
}

/// A layer's neurons as ground-metric points: its rows, each followed by
/// its bias when it has one.
fn with_bias<'a>(
    rows: usize,
    row_len: usize,
    w: &'a [f32],
    b: Option<&[f32]>,
) -> std::borrow::Cow<'a, [f32]> {
    match b {
        None => std::borrow::Cow::Borrowed(w),
        Some(b) => (0..rows)
            .flat_map(|r| {
                w[r * row_len..(r + 1) * row_len]
                    .iter()
                    .copied()
                    .chain(std::iter::once(b[r]))
            })
            .collect(),
    }
}

/// OT fusion of `members` (at least two, of architecture `arch`).
pub fn fuse(arch: &Architecture, coupling: &Coupling, members: &[&StateDict]) -> Result<StateDict> {
    check_supported(arch, coupling)?;
    let k = members.len();
    let params = arch.params();
    // The running sum starts from member 0, as the reference's copy does.
    let mut sums: Vec<Vec<f32>> = params
        .iter()
        .map(|p| f32_of(members[0], &p.name, 0).map(<[f32]>::to_vec))
        .collect::<Result<_>>()?;
    for (j, member) in members.iter().enumerate().skip(1) {
        add_aligned(arch, coupling, &params, members[0], member, j, &mut sums)?;
    }
    let mut state = StateDict::default();
    for (p, mut sum) in params.into_iter().zip(sums) {
        debug_assert_eq!(p.dtype, DType::F32);
        sum.iter_mut().for_each(|s| *s /= k as f32);
        state.insert(p.name, HostTensor::f32(p.shape, sum));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::resolve;
    use crate::check::NoCheck;
    use crate::coupling::GroupKind;
    use crate::methods::{fuse as fuse_with, Method};

    fn random_member(arch: &Architecture, seed: u64) -> StateDict {
        let mut state = StateDict::default();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for p in arch.params() {
            let n: usize = p.shape.iter().product();
            let data = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 10_000) as f32 / 10_000.0 - 0.5
                })
                .collect();
            state.insert(p.name, HostTensor::f32(p.shape, data));
        }
        state
    }

    /// `member` with every hidden group's channels shuffled: the same
    /// function, other neuron order.
    fn shuffled(arch: &Architecture, member: &StateDict, seed: u64) -> StateDict {
        let coupling = Coupling::derive(arch).unwrap();
        let mut x = seed | 1;
        let perms: Vec<Option<Vec<usize>>> = coupling
            .groups()
            .iter()
            .map(|g| {
                (g.kind == GroupKind::Hidden).then(|| {
                    let mut p: Vec<usize> = (0..g.width).collect();
                    for i in (1..p.len()).rev() {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        p.swap(i, (x >> 33) as usize % (i + 1));
                    }
                    p
                })
            })
            .collect();
        let mut out = member.clone();
        for p in arch.params() {
            let ports = coupling.ports(p.node).unwrap();
            let mut t = member.get(&p.name).unwrap().as_f32().unwrap().to_vec();
            let rows = p.shape[0];
            let row_len = t.len() / rows;
            if let (ParamRole::Weight, Some(perm)) = (p.role, &perms[ports.input]) {
                t = correct_inputs(&t, rows, perm, row_len / perm.len(), 1.0);
            }
            if let Some(perm) = &perms[ports.output] {
                t = permute_rows(&t, row_len, perm, 1.0);
            }
            out.insert(p.name.clone(), HostTensor::f32(p.shape.clone(), t));
        }
        out
    }

    fn max_diff(a: &StateDict, b: &StateDict) -> f32 {
        a.tensors
            .iter()
            .map(|(name, t)| {
                t.as_f32()
                    .unwrap()
                    .iter()
                    .zip(b.get(name).unwrap().as_f32().unwrap())
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max)
            })
            .fold(0.0, f32::max)
    }

    #[test]
    fn a_shuffled_copy_of_a_conv_net_with_biases_is_put_back_in_order() {
        for arch in ["lenet:bias=true", "lenet", "mlp:hidden=40,depth=3"] {
            let arch = resolve(arch).unwrap();
            let m0 = random_member(&arch, 1);
            let m1 = shuffled(&arch, &m0, 9);
            assert!(max_diff(&m0, &m1) > 0.1, "the shuffle changed nothing");
            let fused = fuse_with(Method::Ot, &arch, &[&m0, &m1], &mut NoCheck).unwrap();
            let d = max_diff(&m0, &fused.state);
            assert!(d <= 1e-5, "{}: {d}", arch.name());
        }
    }

    #[test]
    fn three_members_are_each_aligned_to_member_0() {
        let arch = resolve("mlp:hidden=30,depth=2").unwrap();
        let m0 = random_member(&arch, 4);
        let (m1, m2) = (shuffled(&arch, &m0, 5), shuffled(&arch, &m0, 6));
        let fused = fuse_with(Method::Ot, &arch, &[&m0, &m1, &m2], &mut NoCheck).unwrap();
        assert!(max_diff(&m0, &fused.state) <= 1e-5);
    }

    #[test]
    fn what_the_reference_does_not_define_is_refused_naming_the_layer() {
        let bn = resolve("vgg11-bn:width=4").unwrap();
        let members = [random_member(&bn, 1), random_member(&bn, 2)];
        let refs: Vec<&StateDict> = members.iter().collect();
        let e = crate::ot::fuse(&bn, &Coupling::derive(&bn).unwrap(), &refs).unwrap_err();
        assert!(e.to_string().contains("BatchNorm (layer `"), "{e}");

        let res = resolve("resnet:blocks=1-1,width=4,size=8").unwrap();
        let e = crate::ot::fuse(&res, &Coupling::derive(&res).unwrap(), &refs).unwrap_err();
        assert!(e.to_string().contains("residual"), "{e}");
    }

    #[test]
    fn a_non_finite_weight_and_a_single_member_are_refused() {
        let arch = resolve("mlp:hidden=8,depth=1").unwrap();
        let m0 = random_member(&arch, 1);
        let mut m1 = random_member(&arch, 2);
        let name = arch.params()[0].name.clone();
        let mut w = m1.get(&name).unwrap().as_f32().unwrap().to_vec();
        w[3] = f32::NAN;
        m1.insert(
            name.clone(),
            HostTensor::f32(arch.params()[0].shape.clone(), w),
        );
        let e = fuse_with(Method::Ot, &arch, &[&m0, &m1], &mut NoCheck)
            .err()
            .unwrap();
        assert!(e.to_string().contains("non-finite"), "{e}");
        let e = fuse_with(Method::Ot, &arch, &[&m0], &mut NoCheck)
            .err()
            .unwrap();
        assert!(e.to_string().contains("at least 2 members"), "{e}");
    }
}
