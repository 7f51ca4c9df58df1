//! What presets are built with: their `key=value` options and a builder
//! that appends nodes to a spec.

use std::collections::BTreeMap;

use super::spec::{ArchSpec, NodeSpec, Op, FORMAT};
use crate::{FusionError, Result};

/// The largest value of a preset's size option (width, hidden, classes, ...):
/// far past any service limit, small enough that no arithmetic on it overflows.
pub const MAX_OPTION: usize = 1 << 24;

/// Most layers (mlp depth, resnet blocks in all) and resnet stages of a preset.
pub const MAX_LAYERS: usize = 1024;
pub const MAX_STAGES: usize = 8;

/// `key=value` options of a preset; every option must be used.
pub(super) struct Options {
    preset: String,
    values: BTreeMap<String, String>,
}

impl Options {
    pub(super) fn parse(preset: &str, args: &str) -> Result<Self> {
        let mut values = BTreeMap::new();
        for part in args.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                FusionError::spec(format!(
                    "preset `{preset}`: option `{part}` is not of the form key=value"
                ))
            })?;
            values.insert(k.trim().to_string(), v.trim().to_string());
        }
        Ok(Options {
            preset: preset.to_string(),
            values,
        })
    }

    fn bad(&self, key: &str, value: &str, want: &str) -> FusionError {
        FusionError::spec(format!(
            "preset `{}`: option {key}={value} is not {want}",
            self.preset
        ))
    }

    pub(super) fn usize(&mut self, key: &str, default: usize) -> Result<usize> {
        match self.values.remove(key) {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_OPTION).contains(&n) => Ok(n),
                _ => Err(self.bad(key, &v, &format!("an integer from 1 to {MAX_OPTION}"))),
            },
        }
    }

    /// A number of layers, at most [`MAX_LAYERS`].
    pub(super) fn layers(&mut self, key: &str, default: usize) -> Result<usize> {
        let n = self.usize(key, default)?;
        if n > MAX_LAYERS {
            return Err(self.bad(key, &n.to_string(), &format!("at most {MAX_LAYERS} layers")));
        }
        Ok(n)
    }

    pub(super) fn bool(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.values.remove(key) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "true" | "yes" | "1" => Ok(true),
                "false" | "no" | "0" => Ok(false),
                _ => Err(self.bad(key, &v, "true or false")),
            },
        }
    }

    /// A list such as `2-2-2-2` or a shape such as `1x28x28`.
    pub(super) fn list(&mut self, key: &str, sep: char, default: Vec<usize>) -> Result<Vec<usize>> {
        match self.values.remove(key) {
            None => Ok(default),
            Some(v) => {
                let parsed: Option<Vec<usize>> = v
                    .split(sep)
                    .map(|p| {
                        p.trim()
                            .parse::<usize>()
                            .ok()
                            .filter(|n| (1..=MAX_OPTION).contains(n))
                    })
                    .collect();
                parsed.filter(|l| l.len() <= MAX_STAGES).ok_or_else(|| {
                    self.bad(
                        key,
                        &v,
                        &format!(
                            "a list of at most {MAX_STAGES} integers from 1 to {MAX_OPTION} separated by `{sep}`"
                        ),
                    )
                })
            }
        }
    }

    pub(super) fn choice(&mut self, key: &str, choices: &[&str]) -> Result<String> {
        match self.values.remove(key) {
            None => Ok(choices[0].to_string()),
            Some(v) if choices.contains(&v.as_str()) => Ok(v),
            Some(v) => Err(self.bad(key, &v, &format!("one of {}", choices.join(", ")))),
        }
    }

    /// A number in (0, `max`].
    pub(super) fn positive(&mut self, key: &str, default: f64, max: f64) -> Result<f64> {
        match self.values.remove(key) {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x > 0.0 && x <= max => Ok(x),
                _ => Err(self.bad(key, &v, &format!("a number above 0 and at most {max}"))),
            },
        }
    }

    /// A probability in [0, 1).
    pub(super) fn fraction(&mut self, key: &str, default: f64) -> Result<f64> {
        match self.values.remove(key) {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(x) if (0.0..1.0).contains(&x) => Ok(x),
                _ => Err(self.bad(key, &v, "a number in [0, 1)")),
            },
        }
    }

    pub(super) fn finish(self) -> Result<()> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(k) => Err(FusionError::spec(format!(
                "preset `{}` has no option `{k}`",
                self.preset
            ))),
        }
    }
}

/// Appends nodes to a spec; each node reads the previous one unless told otherwise.
pub struct SpecBuilder {
    name: String,
    input: Vec<usize>,
    nodes: Vec<NodeSpec>,
}

impl SpecBuilder {
    pub fn new(name: &str, input: Vec<usize>) -> Self {
        SpecBuilder {
            name: name.to_string(),
            input,
            nodes: Vec::new(),
        }
    }

    /// Adds a node reading `input` (empty: the previous node).
    pub fn node(&mut self, name: Option<&str>, input: &[&str], op: Op) -> &mut Self {
        self.nodes.push(NodeSpec {
            name: name.map(str::to_string),
            input: input.iter().map(|s| s.to_string()).collect(),
            op,
        });
        self
    }

    pub fn linear(&mut self, name: &str, i: usize, o: usize, bias: bool) -> &mut Self {
        self.node(
            Some(name),
            &[],
            Op::Linear {
                in_features: i,
                out_features: o,
                bias,
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        name: &str,
        input: &[&str],
        i: usize,
        o: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> &mut Self {
        self.node(
            Some(name),
            input,
            Op::Conv2d {
                in_channels: i,
                out_channels: o,
                kernel,
                stride,
                padding,
                bias,
                groups: 1,
            },
        )
    }

    pub fn batch_norm(&mut self, name: &str, features: usize) -> &mut Self {
        self.node(
            Some(name),
            &[],
            Op::BatchNorm {
                features,
                eps: 1e-5,
                momentum: 0.1,
            },
        )
    }

    pub fn relu(&mut self, name: Option<&str>) -> &mut Self {
        self.node(name, &[], Op::Relu {})
    }

    pub fn max_pool(&mut self, kernel: usize, stride: usize, padding: usize) -> &mut Self {
        self.node(
            None,
            &[],
            Op::MaxPool2d {
                kernel,
                // Written out only when it differs from PyTorch's default.
                stride: (stride != kernel).then_some(stride),
                padding,
            },
        )
    }

    pub fn flatten(&mut self) -> &mut Self {
        self.node(None, &[], Op::Flatten {})
    }

    pub fn build(&self) -> ArchSpec {
        ArchSpec {
            format: FORMAT.to_string(),
            name: self.name.clone(),
            input: self.input.clone(),
            output: None,
            nodes: self.nodes.clone(),
        }
    }
}
