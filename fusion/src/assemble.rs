//! Builds a model's tensors from K members and a choice of channels per group.
//!
//! One mechanism serves the wide concatenated model (every channel of every
//! member kept) and NT (the important channels kept): a layer's weight at
//! (kept output channel from member a, kept input channel from member b) is
//! member a's weight when a = b and zero otherwise, which is the dense
//! block-diagonal concatenation restricted to the kept channels. Shared groups
//! (the model input and output) are read by every member: a layer writing the
//! shared output averages its members (weights scaled by 1/K, biases
//! averaged), so the concatenated logits are the ensemble's mean logits.
//! Nothing here materialises the block-diagonal model unless asked for every
//! channel.

use crate::arch::{Architecture, Op, ParamRole};
use crate::coupling::{Coupling, GroupId, GroupKind};
use crate::parallel::for_each_row;
use crate::state::{HostTensor, StateDict};
use crate::{FusionError, Result};

/// A channel of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pick {
    pub member: u32,
    pub channel: u32,
}

/// The channels a model keeps of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The group all members share (model input or output): its channels, once.
    Shared(usize),
    /// Channels taken from members, in concatenation order (member 0's first).
    Picked(Vec<Pick>),
}

impl Selection {
    /// Every channel of every one of `k` members.
    pub fn all(k: usize, width: usize) -> Self {
        Selection::Picked(
            (0..k as u32)
                .flat_map(|member| (0..width as u32).map(move |channel| Pick { member, channel }))
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        match self {
            Selection::Shared(n) => *n,
            Selection::Picked(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many channels come from each of `k` members.
    pub fn per_member(&self, k: usize) -> Vec<usize> {
        let mut counts = vec![0; k];
        if let Selection::Picked(p) = self {
            for pick in p {
                counts[pick.member as usize] += 1;
            }
        }
        counts
    }

    /// Per member: (position in the selection, member channel) of its picks.
    pub(crate) fn by_member(&self, k: usize) -> Vec<Vec<(usize, usize)>> {
        let mut out = vec![Vec::new(); k];
        if let Selection::Picked(p) = self {
            for (j, pick) in p.iter().enumerate() {
                out[pick.member as usize].push((j, pick.channel as usize));
            }
        }
        out
    }
}

/// Selections keeping every channel of `k` members: the wide concatenated model.
pub fn all_channels(coupling: &Coupling, k: usize) -> Vec<Selection> {
    coupling
        .groups()
        .iter()
        .map(|g| match g.kind {
            GroupKind::Hidden => Selection::all(k, g.width),
            _ => Selection::Shared(g.width),
        })
        .collect()
}

/// A member weight viewed as `[out, in_channels, inner]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WeightView {
    pub in_channels: usize,
    pub inner: usize,
}

impl WeightView {
    pub fn row_len(&self) -> usize {
        self.in_channels * self.inner
    }
}

/// The `[out, in_channels, inner]` view of a Linear or conv node's weight
/// (inner = kernel area, or the fan of a Linear after a flatten).
pub(crate) fn weight_view(arch: &Architecture, coupling: &Coupling, node: usize) -> WeightView {
    let ports = coupling.ports(node).expect("weight_view on a layer node");
    let in_width = coupling.group(ports.input).width;
    match arch.nodes()[node].op {
        Op::Linear { .. } => WeightView {
            in_channels: in_width,
            inner: ports.in_fan,
        },
        Op::Conv2d { kernel, .. } => WeightView {
            in_channels: in_width,
            inner: kernel * kernel,
        },
        _ => unreachable!("weight_view on a layer node"),
    }
}

fn member_f32<'a>(members: &[&'a StateDict], name: &str) -> Result<Vec<&'a [f32]>> {
    members
        .iter()
        .enumerate()
        .map(|(m, s)| {
            s.get(name).and_then(|t| t.as_f32()).ok_or_else(|| {
                FusionError::Members(format!("member {m} has no float tensor `{name}`"))
            })
        })
        .collect()
}

/// Gathers one layer weight for the chosen output and input channels.
pub(crate) fn gather_weight(
    ws: &[&[f32]],
    view: WeightView,
    out_sel: &Selection,
    in_sel: &Selection,
) -> Vec<f32> {
    let k = ws.len();
    let inner = view.inner;
    let src_row = view.row_len();
    let cols = in_sel.len() * inner;
    let mut out = vec![0.0f32; out_sel.len() * cols];
    let in_by_member = in_sel.by_member(k);
    let scale = 1.0 / k as f32;
    for_each_row(&mut out, cols, |i, row| match out_sel {
        Selection::Picked(picks) => {
            let pick = picks[i];
            let m = pick.member as usize;
            let c = pick.channel as usize;
            let src = &ws[m][c * src_row..(c + 1) * src_row];
            match in_sel {
                Selection::Shared(_) => row.copy_from_slice(src),
                Selection::Picked(_) => {
                    for &(j, cj) in &in_by_member[m] {
                        row[j * inner..(j + 1) * inner]
                            .copy_from_slice(&src[cj * inner..(cj + 1) * inner]);
                    }
                }
            }
        }
        Selection::Shared(_) => {
            for (m, w) in ws.iter().enumerate() {
                let src = &w[i * src_row..(i + 1) * src_row];
                match in_sel {
                    Selection::Shared(_) => {
                        for (o, x) in row.iter_mut().zip(src) {
                            *o += x * scale;
                        }
                    }
                    Selection::Picked(_) => {
                        for &(j, cj) in &in_by_member[m] {
                            for (o, x) in row[j * inner..(j + 1) * inner]
                                .iter_mut()
                                .zip(&src[cj * inner..(cj + 1) * inner])
                            {
                                *o = x * scale;
                            }
                        }
                    }
                }
            }
        }
    });
    out
}

/// Gathers a per-channel vector (bias, BatchNorm parameter or statistic):
/// the picked members' entries, or the members' mean for a shared group.
fn gather_vector(vs: &[&[f32]], sel: &Selection) -> Vec<f32> {
    match sel {
        Selection::Picked(picks) => picks
            .iter()
            .map(|p| vs[p.member as usize][p.channel as usize])
            .collect(),
        Selection::Shared(n) => (0..*n)
            .map(|i| vs.iter().map(|v| v[i]).sum::<f32>() / vs.len() as f32)
            .collect(),
    }
}

/// Gathers rows of `row` values per channel (a depthwise filter per
/// channel): the picked members' rows. Per-channel layers never work on a
/// shared group (coupling refuses it), so a shared selection keeps member
/// 0's rows only to stay total.
fn gather_rows(ws: &[&[f32]], row: usize, sel: &Selection) -> Vec<f32> {
    match sel {
        Selection::Picked(picks) => picks
            .iter()
            .flat_map(|p| {
                let c = p.channel as usize;
                ws[p.member as usize][c * row..(c + 1) * row]
                    .iter()
                    .copied()
            })
            .collect(),
        Selection::Shared(n) => ws[0][..n * row].to_vec(),
    }
}

/// Builds every tensor of the model that keeps `selections[group]` of each
/// group. BatchNorm layers are new layers: `num_batches_tracked` starts at 0,
/// as in the reference.
pub fn assemble(
    arch: &Architecture,
    coupling: &Coupling,
    members: &[&StateDict],
    selections: &[Selection],
) -> Result<StateDict> {
    let mut state = StateDict::default();
    for p in arch.params() {
        let node = p.node;
        let group_of_vector: GroupId = match p.role {
            ParamRole::Bias => coupling
                .ports(node)
                .map(|x| x.output)
                .or_else(|| coupling.channel_group(node)),
            ParamRole::NormWeight
            | ParamRole::NormBias
            | ParamRole::RunningMean
            | ParamRole::RunningVar => coupling.channel_group(node),
            ParamRole::Weight | ParamRole::BatchesTracked => None,
        }
        .unwrap_or(0);
        let tensor = match p.role {
            ParamRole::Weight if coupling.ports(node).is_none() => {
                // A depthwise filter: one row of kernel values per channel.
                let g = coupling
                    .channel_group(node)
                    .expect("a weight without ports is a depthwise conv");
                let ws = member_f32(members, &p.name)?;
                let row: usize = p.shape[1..].iter().product();
                let data = gather_rows(&ws, row, &selections[g]);
                let mut shape = p.shape.clone();
                shape[0] = selections[g].len();
                HostTensor::f32(shape, data)
            }
            ParamRole::Weight => {
                let ports = coupling.ports(node).expect("weights belong to layers");
                let view = weight_view(arch, coupling, node);
                let ws = member_f32(members, &p.name)?;
                let out_sel = &selections[ports.output];
                let in_sel = &selections[ports.input];
                let data = gather_weight(&ws, view, out_sel, in_sel);
                let mut shape = p.shape.clone();
                shape[0] = out_sel.len();
                shape[1] = if shape.len() == 2 {
                    in_sel.len() * ports.in_fan
                } else {
                    in_sel.len()
                };
                HostTensor::f32(shape, data)
            }
            ParamRole::BatchesTracked => HostTensor::i64(vec![], vec![0]),
            _ => {
                let vs = member_f32(members, &p.name)?;
                let data = gather_vector(&vs, &selections[group_of_vector]);
                HostTensor::f32(vec![data.len()], data)
            }
        };
        state.insert(p.name, tensor);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_restricts_the_block_diagonal_to_kept_channels() {
        // Two members, 2x3 weights (out 2, in 3, inner 1).
        let w0 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w1 = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0];
        let view = WeightView {
            in_channels: 3,
            inner: 1,
        };
        let pick = |member, channel| Pick { member, channel };
        let out_sel = Selection::Picked(vec![pick(0, 1), pick(1, 0)]);
        let in_sel = Selection::Picked(vec![pick(0, 0), pick(0, 2), pick(1, 1)]);
        let got = gather_weight(&[&w0, &w1], view, &out_sel, &in_sel);
        assert_eq!(got, [4.0, 6.0, 0.0, 0.0, 0.0, 20.0]);
        // Shared output: members averaged over their own kept inputs.
        let got = gather_weight(&[&w0, &w1], view, &Selection::Shared(2), &in_sel);
        assert_eq!(got, [0.5, 1.5, 10.0, 2.0, 3.0, 25.0]);
        // Shared input and output: plain averaging.
        let got = gather_weight(
            &[&w0, &w1],
            view,
            &Selection::Shared(2),
            &Selection::Shared(3),
        );
        assert_eq!(got, [5.5, 11.0, 16.5, 22.0, 27.5, 33.0]);
    }
}
