//! The declarative architecture spec (format `nt.arch/v1`): what a user writes
//! in a JSON file. Validation into a usable [`super::Architecture`] lives in
//! `graph.rs`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The format tag every spec carries; bumped on incompatible changes.
pub const FORMAT: &str = "nt.arch/v1";

/// A network as a list of nodes. Each node reads the previous node's output
/// unless it names its inputs; the last node (or `output`) is the logits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchSpec {
    /// Always `nt.arch/v1`.
    pub format: String,
    /// A short name recorded in checkpoints (`mlp`, `resnet18`, ...).
    pub name: String,
    /// Shape of one input sample: `[features]` or `[channels, height, width]`.
    pub input: Vec<usize>,
    /// Name of the node whose output is the model's output (default: the last node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    pub nodes: Vec<NodeSpec>,
}

/// One node: an operation, an optional name (required for layers with
/// parameters: it is their `state_dict` prefix) and optional inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSpec {
    pub name: Option<String>,
    /// Names of the nodes this one reads (`input` is the model input). Empty
    /// means "the previous node".
    pub input: Vec<String>,
    pub op: Op,
}

fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_eps() -> f64 {
    1e-5
}
fn default_momentum() -> f64 {
    0.1
}
fn default_minus_one() -> f64 {
    -1.0
}
fn default_one_f() -> f64 {
    1.0
}
fn default_slope() -> f64 {
    0.01
}
fn is_one(n: &usize) -> bool {
    *n == 1
}

/// `nn.GELU`'s `approximate` argument.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeluApproximation {
    #[default]
    None,
    Tanh,
}

impl GeluApproximation {
    /// The string libtorch and PyTorch take.
    pub fn as_str(self) -> &'static str {
        match self {
            GeluApproximation::None => "none",
            GeluApproximation::Tanh => "tanh",
        }
    }
}

/// An adaptive pool's output size: `n` (square) or `[height, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PoolSize {
    Square(usize),
    Rect([usize; 2]),
}

impl Default for PoolSize {
    fn default() -> Self {
        PoolSize::Square(1)
    }
}

impl PoolSize {
    /// `[height, width]`.
    pub fn hw(self) -> [usize; 2] {
        match self {
            PoolSize::Square(n) => [n, n],
            PoolSize::Rect(hw) => hw,
        }
    }
}

/// The operations a spec can use. Layers with parameters follow PyTorch's
/// parameter names and shapes (`weight`, `bias`, `running_mean`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// `nn.Linear(in, out, bias)` on a flat input.
    Linear {
        #[serde(rename = "in")]
        in_features: usize,
        #[serde(rename = "out")]
        out_features: usize,
        #[serde(default = "default_true")]
        bias: bool,
    },
    /// `nn.Conv2d(in, out, kernel, stride, padding, bias)` with a square kernel.
    Conv2d {
        #[serde(rename = "in")]
        in_channels: usize,
        #[serde(rename = "out")]
        out_channels: usize,
        kernel: usize,
        #[serde(default = "default_one")]
        stride: usize,
        #[serde(default)]
        padding: usize,
        #[serde(default = "default_true")]
        bias: bool,
        /// `groups=in=out` is a depthwise convolution; other values split the
        /// channels into that many independent blocks.
        #[serde(default = "default_one", skip_serializing_if = "is_one")]
        groups: usize,
    },
    /// `nn.BatchNorm1d` or `nn.BatchNorm2d` (chosen by the input's rank).
    BatchNorm {
        features: usize,
        #[serde(default = "default_eps")]
        eps: f64,
        #[serde(default = "default_momentum")]
        momentum: f64,
    },
    Relu {},
    /// `nn.ReLU6`: min(max(x, 0), 6).
    Relu6 {},
    /// `nn.Hardtanh(min, max)`.
    Hardtanh {
        #[serde(default = "default_minus_one")]
        min: f64,
        #[serde(default = "default_one_f")]
        max: f64,
    },
    /// `nn.LeakyReLU(slope)`.
    LeakyRelu {
        #[serde(default = "default_slope")]
        slope: f64,
    },
    /// `nn.GELU(approximate)`.
    Gelu {
        #[serde(default)]
        approximate: GeluApproximation,
    },
    Silu {},
    Hardswish {},
    Sigmoid {},
    Tanh {},
    MaxPool2d {
        kernel: usize,
        /// Defaults to `kernel`, as in PyTorch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stride: Option<usize>,
        #[serde(default)]
        padding: usize,
    },
    AvgPool2d {
        kernel: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stride: Option<usize>,
        #[serde(default)]
        padding: usize,
    },
    /// `nn.AdaptiveAvgPool2d(output)`: any size, larger than the input too.
    AdaptiveAvgPool2d {
        #[serde(default)]
        output: PoolSize,
    },
    /// Flattens `[C, H, W]` to `[C*H*W]` (channel-major, as `torch.flatten(x, 1)`).
    Flatten {},
    /// Element-wise sum of two or more inputs of one shape (residual connections).
    Add {},
    /// Dropout with probability `p` during training; identity in evaluation.
    Dropout {
        p: f64,
    },
}

impl Op {
    /// The `op` tag as written in specs.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::Conv2d { .. } => "conv2d",
            Op::BatchNorm { .. } => "batch_norm",
            Op::Relu {} => "relu",
            Op::Relu6 {} => "relu6",
            Op::Hardtanh { .. } => "hardtanh",
            Op::LeakyRelu { .. } => "leaky_relu",
            Op::Gelu { .. } => "gelu",
            Op::Silu {} => "silu",
            Op::Hardswish {} => "hardswish",
            Op::Sigmoid {} => "sigmoid",
            Op::Tanh {} => "tanh",
            Op::MaxPool2d { .. } => "max_pool2d",
            Op::AvgPool2d { .. } => "avg_pool2d",
            Op::AdaptiveAvgPool2d { .. } => "adaptive_avg_pool2d",
            Op::Flatten {} => "flatten",
            Op::Add {} => "add",
            Op::Dropout { .. } => "dropout",
        }
    }

    /// Whether the op owns parameters (and so needs a name).
    pub fn has_params(&self) -> bool {
        matches!(
            self,
            Op::Linear { .. } | Op::Conv2d { .. } | Op::BatchNorm { .. }
        )
    }
}

impl Serialize for NodeSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = Map::new();
        if let Some(name) = &self.name {
            map.insert("name".into(), Value::String(name.clone()));
        }
        match self.input.as_slice() {
            [] => {}
            [one] => {
                map.insert("input".into(), Value::String(one.clone()));
            }
            many => {
                map.insert(
                    "input".into(),
                    Value::Array(many.iter().cloned().map(Value::String).collect()),
                );
            }
        }
        match serde_json::to_value(&self.op).map_err(serde::ser::Error::custom)? {
            Value::Object(fields) => map.extend(fields),
            _ => {
                return Err(serde::ser::Error::custom(
                    "op did not serialize to an object",
                ))
            }
        }
        Value::Object(map).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for NodeSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = match Value::deserialize(deserializer)? {
            Value::Object(map) => map,
            other => {
                return Err(D::Error::custom(format!(
                    "a node must be an object, got {other}"
                )))
            }
        };
        let name = match map.remove("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "node `name` must be a string, got {other}"
                )))
            }
        };
        let input = match map.remove("input") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!(
                        "node `input` entries must be node names, got {other}"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "node `input` must be a node name or a list of them, got {other}"
                )))
            }
        };
        let label = name.clone().unwrap_or_else(|| "(unnamed)".into());
        let op: Op = serde_json::from_value(Value::Object(map))
            .map_err(|e| D::Error::custom(format!("node `{label}`: {e}")))?;
        Ok(NodeSpec { name, input, op })
    }
}

impl ArchSpec {
    /// Parses a spec from JSON text. Unknown fields anywhere are errors.
    pub fn from_json(text: &str) -> crate::Result<Self> {
        serde_json::from_str(text).map_err(|e| crate::FusionError::spec(e.to_string()))
    }

    /// The spec as compact JSON (what checkpoints record in their metadata).
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The spec as indented JSON, for files people read.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_round_trips_through_json() {
        let node = NodeSpec {
            name: Some("fc1".into()),
            input: vec!["a".into(), "b".into()],
            op: Op::Linear {
                in_features: 3,
                out_features: 4,
                bias: false,
            },
        };
        let text = serde_json::to_string(&node).unwrap();
        assert!(text.contains(r#""in":3"#), "{text}");
        let back: NodeSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, node);
    }

    #[test]
    fn unknown_fields_are_errors_that_name_the_field() {
        let err = serde_json::from_str::<NodeSpec>(r#"{"name":"r","op":"relu","inplace":true}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("inplace") && err.contains("`r`"), "{err}");
        let err = serde_json::from_str::<NodeSpec>(
            r#"{"name":"fc","op":"linear","in":3,"out":4,"biass":true}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("biass"), "{err}");
        let err = serde_json::from_str::<NodeSpec>(r#"{"op":"transformer"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("transformer"), "{err}");
        let err = ArchSpec::from_json(
            r#"{"format":"nt.arch/v1","name":"x","input":[3],"nodes":[],"extra":1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("extra"), "{err}");
    }
}
