//! Neuron groups derived from an architecture: which channels are coupled and
//! must be kept or dropped together.
//!
//! A group is one set of coupled channels: the output channels of the layers
//! that write them (several layers when a residual addition joins their
//! outputs), the BatchNorms over them, and the input channels of every layer
//! that reads them. A flatten maps channel `c` of a `[C, H, W]` activation to
//! the `H*W` consecutive input columns of the next Linear (its *fan*). The
//! group of the model input and the group of the model output are shared by
//! all members and never pruned; every other group is *hidden*.

use crate::arch::{ArchSpec, Architecture, Op, Source};
use crate::{FusionError, Result};

pub type GroupId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// The model input's channels (or features).
    Input,
    /// The model output's channels (the logits).
    Output,
    /// Channels between layers: what NT concatenates and prunes.
    Hidden,
}

/// A layer reading a group's channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Consumer {
    pub node: usize,
    /// Consecutive input columns per channel: `H*W` for a Linear after a
    /// flatten of `[C, H, W]`, 1 otherwise.
    pub fan: usize,
}

#[derive(Clone, Debug)]
pub struct Group {
    pub id: GroupId,
    pub kind: GroupKind,
    /// Channels per member.
    pub width: usize,
    /// Linear and conv layers writing these channels, in spec order.
    pub producers: Vec<usize>,
    /// BatchNorm layers over these channels, in spec order.
    pub norms: Vec<usize>,
    /// Depthwise convolutions over these channels (each filters channel c
    /// into channel c, so its input and output are this one group).
    pub depthwise: Vec<usize>,
    /// Layers reading these channels, in spec order.
    pub consumers: Vec<Consumer>,
}

/// The groups a Linear or conv layer reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub input: GroupId,
    pub in_fan: usize,
    pub output: GroupId,
}

#[derive(Clone, Debug)]
pub struct Coupling {
    groups: Vec<Group>,
    /// Per node: the groups of a Linear or conv layer.
    ports: Vec<Option<Ports>>,
    /// Per node: the group a BatchNorm or depthwise conv works on, channel
    /// by channel.
    channel_group: Vec<Option<GroupId>>,
    /// Hidden groups, output side first (see `prune_order`).
    prune_order: Vec<GroupId>,
}

/// Nodes in the order a depth-first walk with a stack discovers them,
/// starting at the output and following inputs in operand order (the walk
/// torch-pruning's dependency graph makes over autograd's graph).
fn discovery_order(arch: &Architecture) -> Vec<usize> {
    let nodes = arch.nodes();
    let mut discovered = vec![false; nodes.len()];
    let mut visited = vec![false; nodes.len()];
    let mut order = vec![arch.output()];
    discovered[arch.output()] = true;
    let mut stack = vec![arch.output()];
    while let Some(n) = stack.pop() {
        if std::mem::replace(&mut visited[n], true) {
            continue;
        }
        for s in &nodes[n].inputs {
            if let Source::Node(j) = *s {
                if !std::mem::replace(&mut discovered[j], true) {
                    order.push(j);
                }
                stack.push(j);
            }
        }
    }
    order
}

/// Disjoint sets over provisional group ids.
struct UnionFind(Vec<usize>);

impl UnionFind {
    fn add(&mut self) -> usize {
        self.0.push(self.0.len());
        self.0.len() - 1
    }
    fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }
    fn union(&mut self, a: usize, b: usize) -> usize {
        let (a, b) = (self.find(a), self.find(b));
        // Keep the smaller id as root so the input group stays 0.
        let (root, child) = if a < b { (a, b) } else { (b, a) };
        self.0[child] = root;
        root
    }
}

impl Coupling {
    /// Derives the groups of an architecture from its graph.
    pub fn derive(arch: &Architecture) -> Result<Self> {
        let nodes = arch.nodes();
        let mut uf = UnionFind(Vec::new());
        let input_group = uf.add();
        // Per node output: (provisional group, fan).
        let mut act: Vec<(usize, usize)> = vec![(0, 1); nodes.len()];
        let mut ports_raw: Vec<Option<(usize, usize, usize)>> = vec![None; nodes.len()];
        // Per-channel layers (BatchNorm, depthwise conv): the group they work on.
        let mut per_channel_raw: Vec<Option<usize>> = vec![None; nodes.len()];
        let source = |act: &Vec<(usize, usize)>, s: Source| match s {
            Source::Input => (input_group, 1),
            Source::Node(j) => act[j],
        };
        for &i in arch.order() {
            let node = &nodes[i];
            let (g_in, fan_in) = source(&act, node.inputs[0]);
            act[i] = match node.op {
                Op::Conv2d {
                    in_channels,
                    out_channels,
                    groups,
                    ..
                } if groups > 1 => {
                    if groups != in_channels || groups != out_channels {
                        return Err(FusionError::Unsupported(format!(
                            "conv `{}` has groups={groups} with {in_channels} input and \
                             {out_channels} output channels; NT fuses groups=1 and depthwise \
                             convolutions (groups = in = out): pruning a grouped convolution \
                             would have to keep its groups equal in size",
                            node.name
                        )));
                    }
                    per_channel_raw[i] = Some(g_in);
                    (g_in, fan_in)
                }
                Op::Linear { .. } | Op::Conv2d { .. } => {
                    let g = uf.add();
                    ports_raw[i] = Some((g_in, fan_in, g));
                    (g, 1)
                }
                Op::BatchNorm { .. } => {
                    per_channel_raw[i] = Some(g_in);
                    (g_in, fan_in)
                }
                Op::Flatten {} => match node.in_shape.as_slice() {
                    [_, h, w] => (g_in, h * w),
                    _ => (g_in, fan_in),
                },
                Op::Add {} => {
                    let mut g = g_in;
                    for &s in &node.inputs[1..] {
                        let (other, other_fan) = source(&act, s);
                        if other_fan != fan_in {
                            return Err(FusionError::Unsupported(format!(
                                "node `{}` adds flattened activations with different channel layouts",
                                node.name
                            )));
                        }
                        g = uf.union(g, other);
                    }
                    (g, fan_in)
                }
                // Element-wise ops and pooling keep each channel apart.
                Op::Relu {}
                | Op::Relu6 {}
                | Op::Hardtanh { .. }
                | Op::LeakyRelu { .. }
                | Op::Gelu { .. }
                | Op::Silu {}
                | Op::Hardswish {}
                | Op::Sigmoid {}
                | Op::Tanh {}
                | Op::Dropout { .. }
                | Op::MaxPool2d { .. }
                | Op::AvgPool2d { .. }
                | Op::AdaptiveAvgPool2d { .. } => (g_in, fan_in),
            };
        }

        // Compact the provisional ids to the roots, in order of first appearance.
        let mut root_to_id = std::collections::HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        let input_root = uf.find(input_group);
        let output_root = uf.find(act[arch.output()].0);
        if output_root == input_root {
            return Err(FusionError::Unsupported(
                "the model output is not written by any Linear or conv layer".into(),
            ));
        }
        let mut id_of = |uf: &mut UnionFind, raw: usize, width: usize, groups: &mut Vec<Group>| {
            let root = uf.find(raw);
            *root_to_id.entry(root).or_insert_with(|| {
                groups.push(Group {
                    id: groups.len(),
                    kind: if root == input_root {
                        GroupKind::Input
                    } else if root == output_root {
                        GroupKind::Output
                    } else {
                        GroupKind::Hidden
                    },
                    width,
                    producers: Vec::new(),
                    norms: Vec::new(),
                    depthwise: Vec::new(),
                    consumers: Vec::new(),
                });
                groups.len() - 1
            })
        };
        let input_width = arch.input_shape()[0];
        id_of(&mut uf, input_group, input_width, &mut groups);

        let mut ports = vec![None; nodes.len()];
        let mut channel_group = vec![None; nodes.len()];
        for (i, node) in nodes.iter().enumerate() {
            if let Some((g_in, fan, g_out)) = ports_raw[i] {
                let (in_width, out_width) = match node.op {
                    Op::Linear {
                        in_features,
                        out_features,
                        ..
                    } => (in_features / fan, out_features),
                    Op::Conv2d {
                        in_channels,
                        out_channels,
                        ..
                    } => (in_channels, out_channels),
                    _ => unreachable!("only layers have ports"),
                };
                let input = id_of(&mut uf, g_in, in_width, &mut groups);
                let output = id_of(&mut uf, g_out, out_width, &mut groups);
                groups[input].consumers.push(Consumer { node: i, fan });
                groups[output].producers.push(i);
                ports[i] = Some(Ports {
                    input,
                    in_fan: fan,
                    output,
                });
            }
            if let Some(g) = per_channel_raw[i] {
                let width = node.in_shape[0];
                let id = id_of(&mut uf, g, width, &mut groups);
                let what = if matches!(node.op, Op::BatchNorm { .. }) {
                    "batch norm"
                } else {
                    "depthwise conv"
                };
                if groups[id].kind != GroupKind::Hidden {
                    return Err(FusionError::Unsupported(format!(
                        "{what} `{}` works on the model {}, which all members share; \
                         concatenation cannot keep one copy per member",
                        node.name,
                        if groups[id].kind == GroupKind::Input {
                            "input"
                        } else {
                            "output"
                        }
                    )));
                }
                if matches!(node.op, Op::BatchNorm { .. }) {
                    groups[id].norms.push(i);
                } else {
                    groups[id].depthwise.push(i);
                }
                channel_group[i] = Some(id);
            }
        }
        let mut prune_order = Vec::new();
        for n in discovery_order(arch) {
            // The reference roots a group at any conv or Linear, a depthwise
            // conv included.
            let written = match (ports[n], &nodes[n].op) {
                (Some(p), _) => Some(p.output),
                (None, Op::Conv2d { .. }) => channel_group[n],
                _ => None,
            };
            if let Some(g) = written {
                if groups[g].kind == GroupKind::Hidden && !prune_order.contains(&g) {
                    prune_order.push(g);
                }
            }
        }
        Ok(Coupling {
            groups,
            ports,
            channel_group,
            prune_order,
        })
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn group(&self, id: GroupId) -> &Group {
        &self.groups[id]
    }

    /// The groups of a Linear or conv node.
    pub fn ports(&self, node: usize) -> Option<Ports> {
        self.ports[node]
    }

    /// The group a BatchNorm or depthwise conv node works on.
    pub fn channel_group(&self, node: usize) -> Option<GroupId> {
        self.channel_group[node]
    }

    /// Hidden groups in pruning order: from the output side toward the input,
    /// in the order the reference pruner meets them. It walks the autograd
    /// graph depth-first from the output with a stack, discovering a node's
    /// inputs in operand order and descending into the last one first, and
    /// prunes each group when it first discovers one of its writing layers.
    pub fn prune_order(&self) -> Vec<GroupId> {
        self.prune_order.clone()
    }

    /// A short label for a group: the layers that write it.
    pub fn label(&self, arch: &Architecture, id: GroupId) -> String {
        let names: Vec<&str> = self.groups[id]
            .producers
            .iter()
            .map(|&n| arch.nodes()[n].name.as_str())
            .collect();
        names.join("+")
    }

    /// The spec with every group resized to `widths[group]` channels (the wide
    /// concatenated model uses `K * width` for hidden groups).
    pub fn resized(&self, arch: &Architecture, widths: &[usize], name: &str) -> ArchSpec {
        let mut spec = arch.spec().clone();
        spec.name = name.to_string();
        for (i, node) in spec.nodes.iter_mut().enumerate() {
            match &mut node.op {
                Op::Linear {
                    in_features,
                    out_features,
                    ..
                } => {
                    if let Some(p) = self.ports[i] {
                        *in_features = widths[p.input] * p.in_fan;
                        *out_features = widths[p.output];
                    }
                }
                Op::Conv2d {
                    in_channels,
                    out_channels,
                    groups,
                    ..
                } => {
                    if let Some(p) = self.ports[i] {
                        *in_channels = widths[p.input];
                        *out_channels = widths[p.output];
                    } else if let Some(g) = self.channel_group[i] {
                        (*in_channels, *out_channels, *groups) = (widths[g], widths[g], widths[g]);
                    }
                }
                Op::BatchNorm { features, .. } => {
                    if let Some(g) = self.channel_group[i] {
                        *features = widths[g];
                    }
                }
                _ => {}
            }
        }
        spec
    }

    /// Group widths of the wide model that concatenates `k` members.
    pub fn wide_widths(&self, k: usize) -> Vec<usize> {
        self.groups
            .iter()
            .map(|g| match g.kind {
                GroupKind::Hidden => g.width * k,
                _ => g.width,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::preset;

    fn coupling(p: &str) -> (Architecture, Coupling) {
        let a = Architecture::new(preset(p).unwrap()).unwrap();
        let c = Coupling::derive(&a).unwrap();
        (a, c)
    }

    fn labels(a: &Architecture, c: &Coupling) -> Vec<String> {
        c.prune_order().into_iter().map(|g| c.label(a, g)).collect()
    }

    #[test]
    fn mlp_groups_are_the_hidden_layers_output_side_first() {
        let (a, c) = coupling("mlp");
        assert_eq!(labels(&a, &c), ["fc3", "fc2", "fc1"]);
        let fc1 = c.ports(1).unwrap();
        assert_eq!(c.group(fc1.input).kind, GroupKind::Input);
        assert_eq!(fc1.in_fan, 784);
    }

    #[test]
    fn lenet_flatten_couples_conv_channels_to_linear_columns() {
        let (a, c) = coupling("lenet");
        let g = c
            .groups()
            .iter()
            .find(|g| c.label(&a, g.id) == "feature.3")
            .unwrap();
        assert_eq!(g.width, 16);
        assert_eq!(g.consumers, [Consumer { node: 7, fan: 25 }]);
    }

    #[test]
    fn resnet_residual_streams_are_one_group_each() {
        let (a, c) = coupling("resnet:blocks=1-1,width=8,size=8");
        // Depth-first from the output, the identity/downsample branch of each
        // addition is walked first: both streams, then the inner channels.
        assert_eq!(
            labels(&a, &c),
            [
                "layer2.0.conv2+layer2.0.downsample.0",
                "conv1+layer1.0.conv2",
                "layer1.0.conv1",
                "layer2.0.conv1"
            ]
        );
        let (_, c18) = coupling("resnet18");
        // 4 residual streams and 8 inner block groups.
        assert_eq!(c18.prune_order().len(), 12);
        let stream = c18
            .groups()
            .iter()
            .find(|g| g.producers.len() == 3)
            .expect("a stream written by three layers");
        assert_eq!(stream.norms.len(), 3);
    }

    #[test]
    fn batch_norm_on_the_input_is_refused() {
        let a = Architecture::from_json(
            r#"{"format":"nt.arch/v1","name":"t","input":[3,4,4],"nodes":[
                {"name":"bn","op":"batch_norm","features":3},
                {"name":"c","op":"conv2d","in":3,"out":2,"kernel":4}]}"#,
        )
        .unwrap();
        let err = Coupling::derive(&a).unwrap_err().to_string();
        assert!(err.contains("`bn`") && err.contains("input"), "{err}");
    }
}
