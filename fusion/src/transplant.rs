//! Neuron Transplantation: concatenate K members, keep the largest neurons of
//! every group, exactly the original width.
//!
//! Importance of channel c of a group is the sum of squared weights that
//! belong to c in every coupled layer of the concatenated model: the writing
//! layers' output slices, the BatchNorm gammas, and the reading layers' input
//! slices (scaled by 1/K where they write the shared output). A depthwise
//! convolution's filters do not count: the reference (torch-pruning 1.3.7's
//! magnitude importance) scores only ordinary conv and Linear slices and
//! BatchNorm gammas, and it prunes a depthwise filter with its channel. Groups are
//! pruned from the output side toward the input, each on the weights as
//! already pruned by the groups after it. Because the concatenated model is
//! block-diagonal, every importance is a sum over one member's weights: it is
//! computed member by member, and the kept slices are gathered straight into
//! the output. The wide model is never built.

use crate::assemble::{all_channels, assemble, weight_view, Pick, Selection};
use crate::coupling::{Coupling, GroupId};
use crate::parallel::{map_ranges, sum_squares};
use crate::state::StateDict;
use crate::{FusionError, Result};

/// Called after every NT step with the step's members, the selections and
/// the fused result (the exactness guard hooks in here).
pub type StepHook<'a> = dyn FnMut(&[&StateDict], &[Selection], &StateDict) -> Result<()> + 'a;

/// A fused model and, for every group, which original member each of its
/// channels came from (`None` for the shared input and output groups).
pub struct Transplanted {
    pub state: StateDict,
    pub origins: Vec<Option<Vec<usize>>>,
}

fn tensor<'a>(member: &'a StateDict, m: usize, name: &str) -> Result<&'a [f32]> {
    member
        .get(name)
        .and_then(|t| t.as_f32())
        .ok_or_else(|| FusionError::Members(format!("member {m} has no float tensor `{name}`")))
}

/// Importance of every channel of group `g` in the concatenation of
/// `members`, given the selections made so far; index `m * width + c`.
pub fn importance(
    arch: &crate::arch::Architecture,
    coupling: &Coupling,
    members: &[&StateDict],
    selections: &[Selection],
    g: GroupId,
) -> Result<Vec<f64>> {
    let k = members.len();
    let group = coupling.group(g);
    let width = group.width;
    let nodes = arch.nodes();
    let mut imp = vec![0.0f64; k * width];
    for (m, member) in members.iter().enumerate() {
        let acc = &mut imp[m * width..(m + 1) * width];

        for &p in &group.producers {
            let ports = coupling.ports(p).expect("producers are layers");
            let view = weight_view(arch, coupling, p);
            let w = tensor(member, m, &format!("{}.weight", nodes[p].name))?;
            let inner = view.inner;
            let kept_inputs: Option<Vec<usize>> = match &selections[ports.input] {
                Selection::Shared(_) => None,
                sel => {
                    let mine: Vec<usize> = sel.by_member(k)[m].iter().map(|&(_, c)| c).collect();
                    (mine.len() < view.in_channels).then_some(mine)
                }
            };
            let row_len = view.row_len();
            let parts = map_ranges(width, row_len, |rows| {
                rows.map(|c| {
                    let row = &w[c * row_len..(c + 1) * row_len];
                    match &kept_inputs {
                        None => sum_squares(row),
                        Some(cols) => cols
                            .iter()
                            .map(|&cj| sum_squares(&row[cj * inner..(cj + 1) * inner]))
                            .sum(),
                    }
                })
                .collect::<Vec<f64>>()
            });
            for (a, v) in acc.iter_mut().zip(parts.into_iter().flatten()) {
                *a += v;
            }
        }

        for &n in &group.norms {
            let gamma = tensor(member, m, &format!("{}.weight", nodes[n].name))?;
            for (a, x) in acc.iter_mut().zip(gamma) {
                *a += (*x as f64) * (*x as f64);
            }
        }

        for consumer in &group.consumers {
            let q = consumer.node;
            let ports = coupling.ports(q).expect("consumers are layers");
            let view = weight_view(arch, coupling, q);
            let w = tensor(member, m, &format!("{}.weight", nodes[q].name))?;
            let (rows, scale): (Vec<usize>, f64) = match &selections[ports.output] {
                Selection::Shared(n) => ((0..*n).collect(), 1.0 / (k * k) as f64),
                sel => (sel.by_member(k)[m].iter().map(|&(_, c)| c).collect(), 1.0),
            };
            let (row_len, inner) = (view.row_len(), view.inner);
            let parts = map_ranges(rows.len(), row_len, |range| {
                let mut part = vec![0.0f64; width];
                for &r in &rows[range] {
                    let row = &w[r * row_len..(r + 1) * row_len];
                    if inner == 1 {
                        for (a, x) in part.iter_mut().zip(row) {
                            let x = f64::from(*x);
                            *a += x * x;
                        }
                    } else {
                        for (a, chunk) in part.iter_mut().zip(row.chunks_exact(inner)) {
                            *a += sum_squares(chunk);
                        }
                    }
                }
                part
            });
            for part in parts {
                for (a, v) in acc.iter_mut().zip(part) {
                    *a += v * scale;
                }
            }
        }
    }
    if let Some(bad) = imp.iter().position(|v| !v.is_finite()) {
        return Err(FusionError::Members(format!(
            "member {} has non-finite weights around layer `{}` (channel {})",
            bad / width,
            coupling.label(arch, g),
            bad % width
        )));
    }
    Ok(imp)
}

/// Keeps the `width` most important of `k * width` channels, in
/// concatenation order; ties go to the earlier channel.
pub fn keep_top(imp: &[f64], width: usize) -> Selection {
    let mut order: Vec<usize> = (0..imp.len()).collect();
    order.sort_by(|&a, &b| imp[b].total_cmp(&imp[a]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order.into_iter().take(width).collect();
    kept.sort_unstable();
    Selection::Picked(
        kept.into_iter()
            .map(|i| Pick {
                member: (i / width) as u32,
                channel: (i % width) as u32,
            })
            .collect(),
    )
}

/// The NT selection for `members`: every hidden group pruned to its width.
pub fn select(
    arch: &crate::arch::Architecture,
    coupling: &Coupling,
    members: &[&StateDict],
) -> Result<Vec<Selection>> {
    let mut selections = all_channels(coupling, members.len());
    for g in coupling.prune_order() {
        let imp = importance(arch, coupling, members, &selections, g)?;
        selections[g] = keep_top(&imp, coupling.group(g).width);
    }
    Ok(selections)
}

/// One NT step over `members` whose channels came from `origins[i]`.
fn step(
    arch: &crate::arch::Architecture,
    coupling: &Coupling,
    members: &[&StateDict],
    origins: &[Vec<Option<Vec<usize>>>],
    hook: &mut StepHook<'_>,
) -> Result<Transplanted> {
    let selections = select(arch, coupling, members)?;
    let state = assemble(arch, coupling, members, &selections)?;
    hook(members, &selections, &state)?;
    let origins = selections
        .iter()
        .enumerate()
        .map(|(g, sel)| match sel {
            Selection::Shared(_) => None,
            Selection::Picked(picks) => Some(
                picks
                    .iter()
                    .map(|p| match &origins[p.member as usize][g] {
                        Some(o) => o[p.channel as usize],
                        None => p.member as usize,
                    })
                    .collect(),
            ),
        })
        .collect();
    Ok(Transplanted { state, origins })
}

/// The provenance of an original member: every channel its own.
fn own_origins(coupling: &Coupling, member: usize) -> Vec<Option<Vec<usize>>> {
    coupling
        .groups()
        .iter()
        .map(|g| match g.kind {
            crate::coupling::GroupKind::Hidden => Some(vec![member; g.width]),
            _ => None,
        })
        .collect()
}

/// NT of all members at once.
pub fn nt(
    arch: &crate::arch::Architecture,
    coupling: &Coupling,
    members: &[&StateDict],
    hook: &mut StepHook<'_>,
) -> Result<Transplanted> {
    let origins: Vec<_> = (0..members.len())
        .map(|m| own_origins(coupling, m))
        .collect();
    step(arch, coupling, members, &origins, hook)
}

/// Iterative NT: fuse member 0 with member 1, the result with member 2, ...
pub fn nt_iterative(
    arch: &crate::arch::Architecture,
    coupling: &Coupling,
    members: &[&StateDict],
    hook: &mut StepHook<'_>,
) -> Result<Transplanted> {
    let mut current = Transplanted {
        state: members[0].clone(),
        origins: own_origins(coupling, 0),
    };
    for (i, next) in members.iter().enumerate().skip(1) {
        let origins = [current.origins.clone(), own_origins(coupling, i)];
        current = step(arch, coupling, &[&current.state, next], &origins, hook)?;
    }
    Ok(current)
}

/// Hierarchical NT: split the members in halves recursively, fuse each half,
/// then fuse the two results; two or three members are fused at once.
pub fn nt_hierarchical(
    arch: &crate::arch::Architecture,
    coupling: &Coupling,
    members: &[&StateDict],
    hook: &mut StepHook<'_>,
) -> Result<Transplanted> {
    fn recurse(
        arch: &crate::arch::Architecture,
        coupling: &Coupling,
        members: &[&StateDict],
        offset: usize,
        hook: &mut StepHook<'_>,
    ) -> Result<Transplanted> {
        if members.len() < 4 {
            let origins: Vec<_> = (0..members.len())
                .map(|m| own_origins(coupling, offset + m))
                .collect();
            return step(arch, coupling, members, &origins, hook);
        }
        let mid = members.len() / 2;
        let left = recurse(arch, coupling, &members[..mid], offset, hook)?;
        let right = recurse(arch, coupling, &members[mid..], offset + mid, hook)?;
        let origins = [left.origins.clone(), right.origins.clone()];
        step(arch, coupling, &[&left.state, &right.state], &origins, hook)
    }
    recurse(arch, coupling, members, 0, hook)
}
