//! Validation of an [`ArchSpec`] into an [`Architecture`]: inputs resolved,
//! nodes in topological order, every activation shape inferred and every
//! parameter listed with its PyTorch name, shape and dtype.

use std::collections::HashMap;

use super::spec::{ArchSpec, NodeSpec, Op, FORMAT};
use crate::state::DType;
use crate::{FusionError, Result};

/// Where a node reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The model input.
    Input,
    /// The output of node `i` (index into the spec's node list).
    Node(usize),
}

/// A validated node.
#[derive(Clone, Debug)]
pub struct Node {
    /// The spec name, or `#<index>` for an unnamed node.
    pub name: String,
    pub op: Op,
    pub inputs: Vec<Source>,
    /// Shape of the (first) input, per sample.
    pub in_shape: Vec<usize>,
    /// Shape of the output, per sample.
    pub out_shape: Vec<usize>,
}

/// What a parameter is to its layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRole {
    Weight,
    Bias,
    NormWeight,
    NormBias,
    RunningMean,
    RunningVar,
    BatchesTracked,
}

impl ParamRole {
    /// The PyTorch attribute name.
    pub fn suffix(self) -> &'static str {
        match self {
            ParamRole::Weight | ParamRole::NormWeight => "weight",
            ParamRole::Bias | ParamRole::NormBias => "bias",
            ParamRole::RunningMean => "running_mean",
            ParamRole::RunningVar => "running_var",
            ParamRole::BatchesTracked => "num_batches_tracked",
        }
    }

    /// Whether the optimizer trains it (running statistics and counters are buffers).
    pub fn trainable(self) -> bool {
        matches!(
            self,
            ParamRole::Weight | ParamRole::Bias | ParamRole::NormWeight | ParamRole::NormBias
        )
    }
}

/// One entry of the model's `state_dict`.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub node: usize,
    pub role: ParamRole,
}

/// A validated architecture.
#[derive(Clone, Debug)]
pub struct Architecture {
    spec: ArchSpec,
    nodes: Vec<Node>,
    order: Vec<usize>,
    output: usize,
}

impl Architecture {
    /// Validates a spec: format, names, inputs, acyclicity, shapes.
    pub fn new(spec: ArchSpec) -> Result<Self> {
        if spec.format != FORMAT {
            return Err(FusionError::spec(format!(
                "unsupported format `{}` (this version reads `{FORMAT}`)",
                spec.format
            )));
        }
        if spec.input.is_empty() || spec.input.contains(&0) || ![1, 3].contains(&spec.input.len()) {
            return Err(FusionError::spec(format!(
                "`input` must be [features] or [channels, height, width] with non-zero sizes, got {:?}",
                spec.input
            )));
        }
        if spec.nodes.is_empty() {
            return Err(FusionError::spec("`nodes` is empty"));
        }
        let names = node_names(&spec.nodes)?;
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let inputs = resolve_inputs(&spec.nodes, &names, &index)?;
        let order = topological_order(&names, &inputs)?;
        let output = match &spec.output {
            None => spec.nodes.len() - 1,
            Some(name) => *index.get(name.as_str()).ok_or_else(|| {
                FusionError::spec(format!(
                    "`output` names node `{name}`, which does not exist"
                ))
            })?,
        };
        check_all_used(&names, &inputs, output)?;

        let mut shapes: Vec<Vec<usize>> = vec![Vec::new(); spec.nodes.len()];
        let mut nodes: Vec<Option<Node>> = vec![None; spec.nodes.len()];
        for &i in &order {
            let node = &spec.nodes[i];
            let in_shapes: Vec<&Vec<usize>> = inputs[i]
                .iter()
                .map(|s| match s {
                    Source::Input => &spec.input,
                    Source::Node(j) => &shapes[*j],
                })
                .collect();
            let out = infer_shape(&node.op, &in_shapes).map_err(|e| {
                FusionError::spec(format!("node `{}` ({}): {e}", names[i], node.op.kind()))
            })?;
            let in_shape = in_shapes[0].clone();
            shapes[i] = out.clone();
            nodes[i] = Some(Node {
                name: names[i].clone(),
                op: node.op.clone(),
                inputs: inputs[i].clone(),
                in_shape,
                out_shape: out,
            });
        }
        let nodes: Vec<Node> = nodes.into_iter().flatten().collect();
        if let Some(node) = nodes.iter().find(|n| numel(&n.out_shape).is_none()) {
            return Err(FusionError::spec(format!(
                "node `{}` outputs {:?}, more than {MAX_TENSOR_ELEMENTS} elements",
                node.name, node.out_shape
            )));
        }
        let arch = Architecture {
            spec,
            nodes,
            order,
            output,
        };
        if let Some(p) = arch.params().iter().find(|p| numel(&p.shape).is_none()) {
            return Err(FusionError::spec(format!(
                "parameter `{}` of shape {:?} has more than {MAX_TENSOR_ELEMENTS} elements",
                p.name, p.shape
            )));
        }
        Ok(arch)
    }

    /// Parses and validates a JSON spec.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::new(ArchSpec::from_json(text)?)
    }

    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Per-sample input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.spec.input
    }

    /// Nodes in spec order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node indices in an order where every node comes after its inputs.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Index of the output node.
    pub fn output(&self) -> usize {
        self.output
    }

    /// Per-sample output shape (the logits).
    pub fn output_shape(&self) -> &[usize] {
        &self.nodes[self.output].out_shape
    }

    /// Every `state_dict` entry, in spec order.
    pub fn params(&self) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let mut push = |role: ParamRole, shape: Vec<usize>, dtype: DType| {
                out.push(ParamSpec {
                    name: format!("{}.{}", node.name, role.suffix()),
                    shape,
                    dtype,
                    node: i,
                    role,
                })
            };
            match node.op {
                Op::Linear {
                    in_features,
                    out_features,
                    bias,
                } => {
                    push(
                        ParamRole::Weight,
                        vec![out_features, in_features],
                        DType::F32,
                    );
                    if bias {
                        push(ParamRole::Bias, vec![out_features], DType::F32);
                    }
                }
                Op::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                    bias,
                    groups,
                    ..
                } => {
                    push(
                        ParamRole::Weight,
                        vec![out_channels, in_channels / groups.max(1), kernel, kernel],
                        DType::F32,
                    );
                    if bias {
                        push(ParamRole::Bias, vec![out_channels], DType::F32);
                    }
                }
                Op::BatchNorm { features, .. } => {
                    push(ParamRole::NormWeight, vec![features], DType::F32);
                    push(ParamRole::NormBias, vec![features], DType::F32);
                    push(ParamRole::RunningMean, vec![features], DType::F32);
                    push(ParamRole::RunningVar, vec![features], DType::F32);
                    push(ParamRole::BatchesTracked, vec![], DType::I64);
                }
                _ => {}
            }
        }
        out
    }

    /// Number of trainable parameters (saturating: [`Architecture::new`]
    /// bounds each tensor, not their sum).
    pub fn parameter_count(&self) -> usize {
        self.params()
            .iter()
            .filter(|p| p.role.trainable())
            .filter_map(|p| numel(&p.shape))
            .fold(0, usize::saturating_add)
    }
}

/// The most elements one tensor (an output or a parameter) may have: far past
/// any service limit, small enough that byte counts of it never overflow.
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 48;

/// The largest side an adaptive pool may produce.
const MAX_POOL_OUTPUT: usize = 1 << 16;

/// Elements of a shape, when at most [`MAX_TENSOR_ELEMENTS`].
fn numel(shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
}

fn node_names(nodes: &[NodeSpec]) -> Result<Vec<String>> {
    let mut seen = HashMap::new();
    let mut names = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let name = match &node.name {
            Some(n) => {
                if n.is_empty()
                    || n == "input"
                    || n.starts_with('#')
                    || n.contains(char::is_whitespace)
                {
                    return Err(FusionError::spec(format!(
                        "node {i}: `{n}` cannot be a node name (empty, `input`, leading `#` and spaces are reserved)"
                    )));
                }
                if let Some(j) = seen.insert(n.clone(), i) {
                    return Err(FusionError::spec(format!(
                        "nodes {j} and {i} are both named `{n}`"
                    )));
                }
                n.clone()
            }
            None if node.op.has_params() => {
                return Err(FusionError::spec(format!(
                    "node {i} ({}) has parameters and needs a `name` (its state_dict prefix)",
                    node.op.kind()
                )))
            }
            None => format!("#{i}"),
        };
        names.push(name);
    }
    Ok(names)
}

fn resolve_inputs(
    nodes: &[NodeSpec],
    names: &[String],
    index: &HashMap<&str, usize>,
) -> Result<Vec<Vec<Source>>> {
    let mut all = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let sources: Vec<Source> = if node.input.is_empty() {
            vec![if i == 0 {
                Source::Input
            } else {
                Source::Node(i - 1)
            }]
        } else {
            node.input
                .iter()
                .map(|n| {
                    if n == "input" {
                        Ok(Source::Input)
                    } else {
                        index
                            .get(n.as_str())
                            .map(|&j| Source::Node(j))
                            .ok_or_else(|| {
                                FusionError::spec(format!(
                                    "node `{}` reads `{n}`, which is not a node name",
                                    names[i]
                                ))
                            })
                    }
                })
                .collect::<Result<_>>()?
        };
        let arity_ok = match node.op {
            Op::Add {} => sources.len() >= 2,
            _ => sources.len() == 1,
        };
        if !arity_ok {
            return Err(FusionError::spec(format!(
                "node `{}` ({}) takes {} but has {} input(s)",
                names[i],
                node.op.kind(),
                if matches!(node.op, Op::Add {}) {
                    "two or more inputs"
                } else {
                    "one input"
                },
                sources.len()
            )));
        }
        all.push(sources);
    }
    Ok(all)
}

/// Kahn's algorithm, taking ready nodes in spec order; a leftover means a cycle.
fn topological_order(names: &[String], inputs: &[Vec<Source>]) -> Result<Vec<usize>> {
    let n = names.len();
    let mut pending: Vec<usize> = inputs
        .iter()
        .map(|s| s.iter().filter(|s| matches!(s, Source::Node(_))).count())
        .collect();
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, sources) in inputs.iter().enumerate() {
        for s in sources {
            if let Source::Node(j) = s {
                readers[*j].push(i);
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &r in &readers[i] {
            pending[r] -= 1;
            if pending[r] == 0 {
                ready.insert(r);
            }
        }
    }
    if order.len() < n {
        let stuck: Vec<&str> = (0..n)
            .filter(|&i| pending[i] > 0)
            .map(|i| names[i].as_str())
            .collect();
        return Err(FusionError::spec(format!(
            "the nodes form a cycle: {}",
            stuck.join(" -> ")
        )));
    }
    Ok(order)
}

fn check_all_used(names: &[String], inputs: &[Vec<Source>], output: usize) -> Result<()> {
    let mut used = vec![false; names.len()];
    let mut stack = vec![output];
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut used[i], true) {
            continue;
        }
        for s in &inputs[i] {
            if let Source::Node(j) = s {
                stack.push(*j);
            }
        }
    }
    let unused: Vec<&str> = (0..names.len())
        .filter(|&i| !used[i])
        .map(|i| names[i].as_str())
        .collect();
    if unused.is_empty() {
        Ok(())
    } else {
        Err(FusionError::spec(format!(
            "nodes that do not lead to the output `{}`: {}",
            names[output],
            unused.join(", ")
        )))
    }
}

fn pooled(size: usize, kernel: usize, stride: usize, padding: usize) -> Result<usize, String> {
    if kernel == 0 || stride == 0 {
        return Err("kernel and stride must be at least 1".into());
    }
    let padded = padding
        .checked_mul(2)
        .and_then(|p| p.checked_add(size))
        .ok_or_else(|| format!("padding {padding} is too large"))?;
    if padded < kernel {
        return Err(format!(
            "kernel {kernel} is larger than the padded input size {padded}"
        ));
    }
    Ok((padded - kernel) / stride + 1)
}

fn infer_shape(op: &Op, inputs: &[&Vec<usize>]) -> Result<Vec<usize>, String> {
    let x = inputs[0];
    let spatial = |what: &str| -> Result<(usize, usize, usize), String> {
        match x.as_slice() {
            [c, h, w] => Ok((*c, *h, *w)),
            _ => Err(format!(
                "{what} needs a [channels, height, width] input, got {x:?}"
            )),
        }
    };
    match *op {
        Op::Linear {
            in_features,
            out_features,
            ..
        } => {
            if in_features == 0 || out_features == 0 {
                return Err("`in` and `out` must be at least 1".into());
            }
            if x.as_slice() != [in_features] {
                return Err(format!(
                    "expects [{in_features}] input features but receives {x:?}{}",
                    if x.len() > 1 {
                        " (add a flatten node)"
                    } else {
                        ""
                    }
                ));
            }
            Ok(vec![out_features])
        }
        Op::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            groups,
            ..
        } => {
            let (c, h, w) = spatial("conv2d")?;
            if out_channels == 0 {
                return Err("`out` must be at least 1".into());
            }
            if groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 {
                return Err(format!(
                    "groups {groups} must be at least 1 and divide `in` {in_channels} and `out` {out_channels}"
                ));
            }
            if c != in_channels {
                return Err(format!(
                    "expects {in_channels} input channels but receives {c} (input {x:?})"
                ));
            }
            Ok(vec![
                out_channels,
                pooled(h, kernel, stride, padding)?,
                pooled(w, kernel, stride, padding)?,
            ])
        }
        Op::BatchNorm {
            features,
            eps,
            momentum,
        } => {
            if eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
                || !(0.0..=1.0).contains(&momentum)
            {
                return Err(format!(
                    "eps must be positive and momentum in [0, 1], got eps {eps}, momentum {momentum}"
                ));
            }
            if x.first() != Some(&features) || !(x.len() == 1 || x.len() == 3) {
                return Err(format!("expects {features} channels but receives {x:?}"));
            }
            Ok(x.clone())
        }
        Op::Relu {}
        | Op::Relu6 {}
        | Op::Gelu { .. }
        | Op::Silu {}
        | Op::Hardswish {}
        | Op::Sigmoid {}
        | Op::Tanh {} => Ok(x.clone()),
        Op::Hardtanh { min, max } => {
            if !(min.is_finite() && max.is_finite() && min < max) {
                return Err(format!(
                    "min must be below max, both finite, got {min} and {max}"
                ));
            }
            Ok(x.clone())
        }
        Op::LeakyRelu { slope } => {
            if !slope.is_finite() {
                return Err(format!("slope must be finite, got {slope}"));
            }
            Ok(x.clone())
        }
        Op::Dropout { p } => {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("p must be in [0, 1), got {p}"));
            }
            Ok(x.clone())
        }
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
        }
        | Op::AvgPool2d {
            kernel,
            stride,
            padding,
        } => {
            let (c, h, w) = spatial(op.kind())?;
            if padding > kernel / 2 {
                return Err(format!(
                    "padding {padding} is more than half the kernel {kernel}"
                ));
            }
            let s = stride.unwrap_or(kernel);
            Ok(vec![
                c,
                pooled(h, kernel, s, padding)?,
                pooled(w, kernel, s, padding)?,
            ])
        }
        Op::AdaptiveAvgPool2d { output } => {
            let (c, _, _) = spatial("adaptive_avg_pool2d")?;
            let [oh, ow] = output.hw();
            // Larger than the input is allowed (windows overlap, as in
            // PyTorch); the bound only keeps outputs countable.
            if oh == 0 || ow == 0 || oh > MAX_POOL_OUTPUT || ow > MAX_POOL_OUTPUT {
                return Err(format!(
                    "output size {oh}x{ow} must be between 1 and {MAX_POOL_OUTPUT} on each side"
                ));
            }
            Ok(vec![c, oh, ow])
        }
        Op::Flatten {} => Ok(vec![
            numel(x).ok_or_else(|| format!("{x:?} has too many elements"))?
        ]),
        Op::Add {} => {
            if let Some(other) = inputs.iter().find(|s| **s != x) {
                return Err(format!("inputs have different shapes: {x:?} and {other:?}"));
            }
            Ok(x.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(text: &str) -> Result<Architecture> {
        Architecture::from_json(text)
    }

    #[test]
    fn infers_shapes_and_lists_params() {
        let a = arch(
            r#"{"format":"nt.arch/v1","name":"t","input":[1,8,8],"nodes":[
                {"name":"c","op":"conv2d","in":1,"out":4,"kernel":3,"padding":1,"bias":false},
                {"name":"bn","op":"batch_norm","features":4},
                {"op":"relu"},{"op":"max_pool2d","kernel":2},{"op":"flatten"},
                {"name":"fc","op":"linear","in":64,"out":3}]}"#,
        )
        .unwrap();
        assert_eq!(a.output_shape(), &[3]);
        let names: Vec<String> = a.params().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "c.weight",
                "bn.weight",
                "bn.bias",
                "bn.running_mean",
                "bn.running_var",
                "bn.num_batches_tracked",
                "fc.weight",
                "fc.bias"
            ]
        );
        assert_eq!(a.parameter_count(), 4 * 9 + 8 + 64 * 3 + 3);
    }

    #[test]
    fn a_cycle_is_an_error_naming_its_nodes() {
        let err = arch(
            r#"{"format":"nt.arch/v1","name":"t","input":[4],"nodes":[
                {"name":"a","op":"linear","in":4,"out":4,"input":"b"},
                {"name":"b","op":"linear","in":4,"out":4,"input":"a"},
                {"name":"c","op":"linear","in":4,"out":2,"input":"b"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cycle") && err.contains('a') && err.contains('b'),
            "{err}"
        );
    }

    #[test]
    fn shape_errors_name_the_node() {
        let err = arch(
            r#"{"format":"nt.arch/v1","name":"t","input":[4],"nodes":[
                {"name":"fc1","op":"linear","in":4,"out":8},
                {"name":"fc2","op":"linear","in":7,"out":2}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("fc2") && err.contains("[7]"), "{err}");
        let err = arch(r#"{"format":"nt.arch/v2","name":"t","input":[4],"nodes":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nt.arch/v2"), "{err}");
    }

    #[test]
    fn unknown_inputs_and_unused_nodes_are_errors() {
        let err = arch(
            r#"{"format":"nt.arch/v1","name":"t","input":[4],"nodes":[
                {"name":"fc1","op":"linear","in":4,"out":2,"input":"nope"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nope"), "{err}");
        let err = arch(
            r#"{"format":"nt.arch/v1","name":"t","input":[4],"output":"fc1","nodes":[
                {"name":"fc1","op":"linear","in":4,"out":2},
                {"name":"fc2","op":"linear","in":2,"out":2}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("fc2"), "{err}");
    }

    /// Found by fuzzing: element counts and padded sizes of a JSON spec
    /// overflowed (a panic in debug builds, a wrapped shape in release).
    #[test]
    fn shapes_too_large_to_count_are_errors() {
        let big = usize::MAX / 2;
        let flatten = format!(
            r#"{{"format":"nt.arch/v1","name":"x","input":[{big},{big},3],"nodes":[{{"op":"flatten"}}]}}"#
        );
        let err = Architecture::from_json(&flatten).unwrap_err().to_string();
        assert!(err.contains("too many elements"), "{err}");
        let padding = format!(
            r#"{{"format":"nt.arch/v1","name":"x","input":[1,4,4],"nodes":[{{"name":"c","op":"conv2d","in":1,"out":1,"kernel":3,"padding":{big}}}]}}"#
        );
        let err = Architecture::from_json(&padding).unwrap_err().to_string();
        assert!(err.contains("too large"), "{err}");
        let weight = format!(
            r#"{{"format":"nt.arch/v1","name":"x","input":[{big}],"nodes":[{{"name":"fc","op":"linear","in":{big},"out":{big}}}]}}"#
        );
        let err = Architecture::from_json(&weight).unwrap_err().to_string();
        assert!(err.contains("elements"), "{err}");
    }
}
