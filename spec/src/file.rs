//! The run spec file a person writes (YAML), and its one conversion to the
//! wire message `nt.v1.RunSpec`. Unknown fields are errors that name the
//! field; unset fields stay unset on the wire (the plan fills defaults).

use std::collections::BTreeMap;

use fusion::Method;
use nt_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::data::{Augment, SyntheticSpec};
use crate::joint::JointMode;
use crate::train::Schedule;
use crate::wire::{
    augment_to_wire, joint_to_wire, method_to_wire, schedule_to_wire, synthetic_to_wire,
};
use crate::SpecError;

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::new(field, message)
}

/// A run spec file (YAML). See the README for every field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpecFile {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub data: DataFile,
    pub architecture: ArchitectureFile,
    pub members: MembersFile,
    /// nt (default), nt-iterative, nt-hierarchical, average.
    #[serde(default)]
    pub fusion: Vec<String>,
    #[serde(default)]
    pub fine_tuning: FineTuningFile,
    #[serde(default)]
    pub evaluation: EvaluationFile,
    /// any (default), gpu or cpu.
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub compare: CompareFile,
    /// The fused models' float dtype: f32, bf16 or f16 (default: the members').
    #[serde(default)]
    pub fused_dtype: Option<String>,
}

/// `compare:`: extra models for comparing the fusion methods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareFile {
    /// Fine-tune every fused model with and without distillation.
    #[serde(default)]
    pub distillation: bool,
    /// Train member 0 on for the fine-tuning epochs (compute-matched baseline).
    #[serde(default)]
    pub baseline: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    pub dataset: Option<String>,
    pub path: Option<String>,
    pub validation: Option<f64>,
    pub split_seed: Option<u64>,
    pub train_subset: Option<u64>,
    pub test_subset: Option<u64>,
    pub augment: Option<Augment>,
    pub synthetic: Option<SyntheticSpec>,
    /// `image-folder` or `arrays`: the user's own data in `path`.
    pub format: Option<String>,
    pub skip_bad: Option<bool>,
    /// `nchw` or `nhwc` (arrays).
    pub layout: Option<String>,
    pub test_split: Option<f64>,
}

/// `architecture: mlp`, or `{preset: ...}`, `{spec: {...nt.arch/v1...}}`, `{file: arch.json}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ArchitectureFile {
    Preset(String),
    Spec(serde_json::Value),
    /// A spec file, relative to the run spec's folder (read by the client).
    File(String),
}

impl Default for ArchitectureFile {
    fn default() -> Self {
        ArchitectureFile::Preset("mlp".into())
    }
}

impl<'de> Deserialize<'de> for ArchitectureFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(ArchitectureFile::Preset(s)),
            serde_json::Value::Object(mut m) if m.len() == 1 => {
                if let Some(v) = m.remove("preset") {
                    v.as_str()
                        .map(|s| ArchitectureFile::Preset(s.to_string()))
                        .ok_or_else(|| D::Error::custom("architecture.preset must be a string"))
                } else if let Some(v) = m.remove("spec") {
                    Ok(ArchitectureFile::Spec(v))
                } else if let Some(v) = m.remove("file") {
                    v.as_str()
                        .map(|s| ArchitectureFile::File(s.to_string()))
                        .ok_or_else(|| D::Error::custom("architecture.file must be a path"))
                } else {
                    let key = m.keys().next().cloned().unwrap_or_default();
                    Err(D::Error::custom(format!(
                        "unknown field `{key}` in architecture, expected `preset`, `spec` or `file`"
                    )))
                }
            }
            _ => Err(D::Error::custom(
                "architecture must be a preset name or one of {preset: ...}, {spec: {...}}, {file: ...}",
            )),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersFile {
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub training: TrainingFile,
    #[serde(default)]
    pub checkpoints: Vec<String>,
    /// auto (default), on or off: whether the members, and later the
    /// fine-tunings, train as one batched job (`true`/`false` read as on/off).
    #[serde(default, deserialize_with = "joint_text")]
    pub joint: Option<String>,
}

/// `members.joint` as written: a word, or a boolean from a YAML 1.1 or JSON
/// writer that read `on`/`off` as one. Checked by [`RunSpecFile::to_proto`].
fn joint_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s)),
        serde_json::Value::Bool(b) => Ok(Some(if b { "on" } else { "off" }.into())),
        other => Err(D::Error::custom(format!(
            "members.joint must be auto, on or off, not {other}"
        ))),
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingFile {
    pub epochs: Option<u32>,
    pub batch_size: Option<u32>,
    pub lr: Option<f64>,
    pub momentum: Option<f64>,
    pub weight_decay: Option<f64>,
    pub nesterov: Option<bool>,
    pub schedule: Option<Schedule>,
    pub bf16: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FineTuningFile {
    #[serde(default)]
    pub training: TrainingFile,
    pub seed: Option<u64>,
    pub distill: Option<DistillFile>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillFile {
    pub temperature: Option<f64>,
    pub weight: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationFile {
    pub batch_size: Option<u32>,
}

impl RunSpecFile {
    /// Parses YAML; unknown fields are errors that name the field and line.
    /// Deep nesting is refused before parsing ([`crate::nesting`]).
    pub fn from_yaml(text: &str) -> Result<Self, SpecError> {
        crate::nesting::check_yaml(text)?;
        serde_yaml::from_str(text).map_err(|e| err("spec", e.to_string()))
    }

    /// The wire message. `base` resolves `architecture: {file: ...}` paths.
    pub fn to_proto(&self, base: &std::path::Path) -> Result<pb::RunSpec, SpecError> {
        let architecture = match &self.architecture {
            ArchitectureFile::Preset(p) => pb::architecture::Kind::Preset(p.clone()),
            ArchitectureFile::Spec(v) => pb::architecture::Kind::SpecJson(v.to_string()),
            ArchitectureFile::File(f) => {
                let path = base.join(f);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| err("architecture.file", format!("{}: {e}", path.display())))?;
                pb::architecture::Kind::SpecJson(text)
            }
        };
        let fusion = self
            .fusion
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let method: Method = m.parse().map_err(|e: fusion::FusionError| err(format!("fusion[{i}]"), e.to_string()))?;
                method_to_wire(method).ok_or_else(|| {
                    err(format!("fusion[{i}]"), format!("`{m}` cannot be fine-tuned in a run (use nt, nt-iterative, nt-hierarchical or average)"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let device = match self.device.as_deref() {
            None | Some("any") => pb::DeviceRequirement::Unspecified,
            Some("gpu") => pb::DeviceRequirement::Gpu,
            Some("cpu") => pb::DeviceRequirement::Cpu,
            Some(other) => return Err(err("device", format!("`{other}` is not any, gpu or cpu"))),
        };
        let joint =
            match self.members.joint.as_deref() {
                None => pb::JointTraining::Unspecified,
                Some(text) => joint_to_wire(JointMode::parse(text).ok_or_else(|| {
                    err("members.joint", format!("`{text}` is not auto, on or off"))
                })?),
            };
        let d = &self.data;
        Ok(pb::RunSpec {
            name: self.name.clone(),
            data: Some(pb::DataSpec {
                dataset: d.dataset.clone().unwrap_or_default(),
                path: d.path.clone().unwrap_or_default(),
                validation: d.validation.unwrap_or(0.0),
                split_seed: d.split_seed.unwrap_or(0),
                train_subset: d.train_subset,
                test_subset: d.test_subset,
                augment: d.augment.as_ref().map(augment_to_wire),
                synthetic: d.synthetic.as_ref().map(synthetic_to_wire),
                format: d.format.clone().unwrap_or_default(),
                skip_bad: d.skip_bad.unwrap_or(false),
                layout: d.layout.clone().unwrap_or_default(),
                test_split: d.test_split.unwrap_or(0.0),
            }),
            architecture: Some(pb::Architecture {
                kind: Some(architecture),
            }),
            members: Some(pb::Members {
                count: self.members.count.unwrap_or(0),
                seeds: self.members.seeds.clone(),
                training: Some(training_file_to_proto(&self.members.training)),
                checkpoints: self.members.checkpoints.clone(),
                joint: joint as i32,
            }),
            fusion: fusion.into_iter().map(|m| m as i32).collect(),
            fine_tuning: Some(pb::FineTuning {
                training: Some(training_file_to_proto(&self.fine_tuning.training)),
                seed: self.fine_tuning.seed,
                distill: self.fine_tuning.distill.as_ref().map(|d| pb::Distillation {
                    temperature: d.temperature,
                    weight: d.weight,
                }),
            }),
            evaluation: Some(pb::Evaluation {
                batch_size: self.evaluation.batch_size,
            }),
            device: device as i32,
            max_attempts: self.max_attempts,
            labels: self.labels.clone().into_iter().collect(),
            compare: (self.compare != CompareFile::default()).then_some(pb::Comparison {
                distillation: self.compare.distillation,
                baseline: self.compare.baseline,
            }),
            fused_dtype: self.fused_dtype.clone().unwrap_or_default(),
        })
    }
}

fn training_file_to_proto(t: &TrainingFile) -> pb::Training {
    pb::Training {
        epochs: t.epochs,
        batch_size: t.batch_size,
        lr: t.lr,
        momentum: t.momentum,
        weight_decay: t.weight_decay,
        nesterov: t.nesterov,
        schedule: t.schedule.as_ref().map(schedule_to_wire),
        bf16: t.bf16,
    }
}
