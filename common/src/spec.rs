//! Run specs: the YAML file a person writes, the `nt.v1.RunSpec` message on
//! the wire, and the validated [`Plan`] the coordinator executes. Unknown
//! fields are errors; every validation error names its field.

use std::collections::BTreeMap;

use nt_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use fusion::arch::Architecture;
use fusion::data::{Augment, DataSpec, SyntheticSpec};
use fusion::train::{Distill, Schedule, TrainConfig};
use fusion::Method;

/// A spec error: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

// ------------------------------------------------------------------ the YAML file

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
    pub fn from_yaml(text: &str) -> Result<Self, SpecError> {
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
                method_to_proto(method).ok_or_else(|| {
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
        let d = &self.data;
        Ok(pb::RunSpec {
            name: self.name.clone(),
            data: Some(pb::DataSpec {
                dataset: d.dataset.clone().unwrap_or_else(|| "fashion-mnist".into()),
                path: d.path.clone().unwrap_or_default(),
                validation: d.validation.unwrap_or(0.0),
                split_seed: d.split_seed.unwrap_or(0),
                train_subset: d.train_subset,
                test_subset: d.test_subset,
                augment: d.augment.map(|a| pb::Augmentation {
                    crop_padding: a.crop_padding as u32,
                    hflip: a.hflip,
                }),
                synthetic: d.synthetic.as_ref().map(synthetic_to_proto),
            }),
            architecture: Some(pb::Architecture {
                kind: Some(architecture),
            }),
            members: Some(pb::Members {
                count: self.members.count.unwrap_or(0),
                seeds: self.members.seeds.clone(),
                training: Some(training_file_to_proto(&self.members.training)),
                checkpoints: self.members.checkpoints.clone(),
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
        })
    }
}

fn synthetic_to_proto(s: &SyntheticSpec) -> pb::SyntheticData {
    pb::SyntheticData {
        train: s.train as u64,
        test: s.test as u64,
        classes: s.classes as u32,
        shape: s.shape.iter().map(|&d| d as u32).collect(),
        seed: s.seed,
        noise: Some(s.noise),
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
        schedule: t.schedule.as_ref().map(schedule_to_proto),
        bf16: t.bf16,
    }
}

// ------------------------------------------------------------------ conversions

pub fn method_to_proto(m: Method) -> Option<pb::FusionMethod> {
    match m {
        Method::Nt => Some(pb::FusionMethod::Nt),
        Method::NtIterative => Some(pb::FusionMethod::NtIterative),
        Method::NtHierarchical => Some(pb::FusionMethod::NtHierarchical),
        Method::Average => Some(pb::FusionMethod::Average),
        Method::Concat => None,
    }
}

pub fn method_from_proto(m: pb::FusionMethod) -> Option<Method> {
    match m {
        pb::FusionMethod::Nt => Some(Method::Nt),
        pb::FusionMethod::NtIterative => Some(Method::NtIterative),
        pb::FusionMethod::NtHierarchical => Some(Method::NtHierarchical),
        pb::FusionMethod::Average => Some(Method::Average),
        pb::FusionMethod::Unspecified => None,
    }
}

pub fn schedule_to_proto(s: &Schedule) -> pb::Schedule {
    use pb::schedule::Kind;
    pb::Schedule {
        kind: Some(match s {
            Schedule::Constant => Kind::Constant(pb::ConstantSchedule {}),
            Schedule::Step { every, gamma } => Kind::Step(pb::StepSchedule {
                every: *every as u32,
                gamma: *gamma,
            }),
            Schedule::MultiStep { milestones, gamma } => Kind::MultiStep(pb::MultiStepSchedule {
                milestones: milestones.iter().map(|&m| m as u32).collect(),
                gamma: *gamma,
            }),
            Schedule::Cosine { min_lr } => Kind::Cosine(pb::CosineSchedule { min_lr: *min_lr }),
        }),
    }
}

pub fn schedule_from_proto(s: &pb::Schedule) -> Schedule {
    use pb::schedule::Kind;
    match &s.kind {
        None | Some(Kind::Constant(_)) => Schedule::Constant,
        Some(Kind::Step(x)) => Schedule::Step {
            every: x.every as usize,
            gamma: x.gamma,
        },
        Some(Kind::MultiStep(x)) => Schedule::MultiStep {
            milestones: x.milestones.iter().map(|&m| m as usize).collect(),
            gamma: x.gamma,
        },
        Some(Kind::Cosine(x)) => Schedule::Cosine { min_lr: x.min_lr },
    }
}

/// Training settings from the wire, with the paper's defaults for unset fields.
pub fn train_config(t: Option<&pb::Training>, seed: u64, augment: Augment) -> TrainConfig {
    let d = TrainConfig::default();
    let t = t.cloned().unwrap_or_default();
    TrainConfig {
        epochs: t.epochs.map_or(d.epochs, |v| v as usize),
        batch_size: t.batch_size.map_or(d.batch_size, |v| v as usize),
        lr: t.lr.unwrap_or(d.lr),
        momentum: t.momentum.unwrap_or(d.momentum),
        weight_decay: t.weight_decay.unwrap_or(d.weight_decay),
        nesterov: t.nesterov.unwrap_or(d.nesterov),
        schedule: t.schedule.as_ref().map_or(d.schedule, schedule_from_proto),
        seed,
        bf16: t.bf16.unwrap_or(d.bf16),
        augment,
        distill: None,
        log_every: d.log_every,
    }
}

/// The wire form of resolved training settings (every field set).
pub fn training_to_proto(c: &TrainConfig) -> pb::Training {
    pb::Training {
        epochs: Some(c.epochs as u32),
        batch_size: Some(c.batch_size as u32),
        lr: Some(c.lr),
        momentum: Some(c.momentum),
        weight_decay: Some(c.weight_decay),
        nesterov: Some(c.nesterov),
        schedule: Some(schedule_to_proto(&c.schedule)),
        bf16: Some(c.bf16),
    }
}

/// The data spec from the wire.
pub fn data_spec(d: &pb::DataSpec) -> DataSpec {
    DataSpec {
        dataset: if d.dataset.is_empty() {
            "fashion-mnist".into()
        } else {
            d.dataset.clone()
        },
        path: (!d.path.is_empty()).then(|| d.path.clone()),
        validation: d.validation,
        split_seed: d.split_seed,
        train_subset: d.train_subset.map(|v| v as usize),
        test_subset: d.test_subset.map(|v| v as usize),
        augment: d
            .augment
            .map(|a| Augment {
                crop_padding: a.crop_padding as usize,
                hflip: a.hflip,
            })
            .unwrap_or_default(),
        synthetic: d.synthetic.as_ref().map(|s| {
            let def = SyntheticSpec::default();
            SyntheticSpec {
                train: if s.train == 0 {
                    def.train
                } else {
                    s.train as usize
                },
                test: if s.test == 0 {
                    def.test
                } else {
                    s.test as usize
                },
                classes: if s.classes == 0 {
                    def.classes
                } else {
                    s.classes as usize
                },
                shape: match s.shape.as_slice() {
                    [c, h, w] => [*c as usize, *h as usize, *w as usize],
                    _ => def.shape,
                },
                seed: s.seed,
                noise: s.noise.unwrap_or(def.noise),
            }
        }),
    }
}

/// The architecture from the wire.
pub fn architecture(a: Option<&pb::Architecture>) -> Result<Architecture, SpecError> {
    match a.and_then(|a| a.kind.as_ref()) {
        None => Err(err(
            "architecture",
            "missing: give a preset or an nt.arch/v1 spec",
        )),
        Some(pb::architecture::Kind::Preset(p)) => Architecture::new(
            fusion::arch::preset(p).map_err(|e| err("architecture", e.to_string()))?,
        )
        .map_err(|e| err("architecture", e.to_string())),
        Some(pb::architecture::Kind::SpecJson(j)) => {
            Architecture::from_json(j).map_err(|e| err("architecture", e.to_string()))
        }
    }
}

// ------------------------------------------------------------------ the validated plan

/// Where a run's tasks may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Any,
    Gpu,
    Cpu,
}

/// The members of a plan.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberPlan {
    /// Train one member per config.
    Train(Vec<TrainConfig>),
    /// Fuse these existing checkpoints (object keys).
    Existing(Vec<String>),
}

/// A validated run spec, in the fusion engine's types.
#[derive(Clone, Debug)]
pub struct Plan {
    pub name: String,
    pub arch: Architecture,
    pub data: DataSpec,
    pub members: MemberPlan,
    pub methods: Vec<Method>,
    pub fine_tune: TrainConfig,
    pub eval_batch: usize,
    pub device: Device,
    pub max_attempts: u32,
}

/// Most members a run may have.
pub const MAX_MEMBERS: usize = 64;

/// The `[channels, height, width]` of a data set's images, when known from its name.
fn dataset_shape(data: &DataSpec) -> Option<([usize; 3], Option<usize>)> {
    match data.dataset.as_str() {
        "fashion-mnist" | "mnist" | "kmnist" => Some(([1, 28, 28], Some(10))),
        n if n.starts_with("emnist-") => Some(([1, 28, 28], None)),
        "cifar10" => Some(([3, 32, 32], Some(10))),
        "cifar100" => Some(([3, 32, 32], Some(100))),
        "synthetic" => {
            let s = data.synthetic.clone().unwrap_or_default();
            Some((s.shape, Some(s.classes)))
        }
        _ => None,
    }
}

/// Validates a wire spec into a plan. `key_of` turns checkpoint references
/// into object keys of the service's store (or says why it cannot).
pub fn plan(
    spec: &pb::RunSpec,
    key_of: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Plan, SpecError> {
    let arch = architecture(spec.architecture.as_ref())?;
    let data = data_spec(&spec.data.clone().unwrap_or_default());
    data.files()
        .map_err(|e| err("data.dataset", e.to_string()))?;
    if !(0.0..1.0).contains(&data.validation) {
        return Err(err(
            "data.validation",
            format!("must be in [0, 1), got {}", data.validation),
        ));
    }
    if let Some((shape, classes)) = dataset_shape(&data) {
        let need: usize = arch.input_shape().iter().product();
        if need != shape.iter().product::<usize>() {
            return Err(err(
                "architecture",
                format!(
                    "`{}` takes inputs of shape {:?} but {} has images of shape {shape:?}",
                    arch.name(),
                    arch.input_shape(),
                    data.dataset
                ),
            ));
        }
        let outputs: usize = arch.output_shape().iter().product();
        if let Some(c) = classes {
            if outputs < c {
                return Err(err(
                    "architecture",
                    format!(
                        "`{}` has {outputs} outputs but {} has {c} classes",
                        arch.name(),
                        data.dataset
                    ),
                ));
            }
        }
    }
    fusion::coupling::Coupling::derive(&arch).map_err(|e| err("architecture", e.to_string()))?;

    let members_spec = spec.members.clone().unwrap_or_default();
    let members = if !members_spec.checkpoints.is_empty() {
        if members_spec.checkpoints.len() < 2 {
            return Err(err(
                "members.checkpoints",
                "fusion needs at least 2 members, got 1",
            ));
        }
        if members_spec.checkpoints.len() > MAX_MEMBERS {
            return Err(err(
                "members.checkpoints",
                format!("at most {MAX_MEMBERS} members"),
            ));
        }
        let keys = members_spec
            .checkpoints
            .iter()
            .enumerate()
            .map(|(i, c)| key_of(c).map_err(|m| err(format!("members.checkpoints[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        MemberPlan::Existing(keys)
    } else {
        let count = if members_spec.count == 0 {
            2
        } else {
            members_spec.count as usize
        };
        if count < 2 {
            return Err(err(
                "members.count",
                format!("fusion needs at least 2 members, got {count}"),
            ));
        }
        if count > MAX_MEMBERS {
            return Err(err(
                "members.count",
                format!("at most {MAX_MEMBERS} members, got {count}"),
            ));
        }
        let seeds: Vec<u64> = if members_spec.seeds.is_empty() {
            (1..=count as u64).collect()
        } else if members_spec.seeds.len() == count {
            members_spec.seeds.clone()
        } else {
            return Err(err(
                "members.seeds",
                format!("{} seeds for {count} members", members_spec.seeds.len()),
            ));
        };
        let configs: Vec<TrainConfig> = seeds
            .iter()
            .map(|&s| train_config(members_spec.training.as_ref(), s, data.augment))
            .collect();
        configs[0]
            .validate()
            .map_err(|e| err("members.training", e.to_string()))?;
        MemberPlan::Train(configs)
    };

    let mut methods = Vec::new();
    for (i, &m) in spec.fusion.iter().enumerate() {
        let method = pb::FusionMethod::try_from(m)
            .ok()
            .and_then(method_from_proto)
            .ok_or_else(|| err(format!("fusion[{i}]"), format!("unknown fusion method {m}")))?;
        if methods.contains(&method) {
            return Err(err(
                format!("fusion[{i}]"),
                format!("`{method}` is listed twice"),
            ));
        }
        methods.push(method);
    }
    if methods.is_empty() {
        methods.push(Method::Nt);
    }

    let ft = spec.fine_tuning.clone().unwrap_or_default();
    let mut fine_tune = train_config(ft.training.as_ref(), ft.seed.unwrap_or(1000), data.augment);
    fine_tune.distill = ft.distill.map(|d| Distill {
        temperature: d.temperature.unwrap_or(Distill::default().temperature),
        weight: d.weight.unwrap_or(Distill::default().weight),
    });
    fine_tune
        .validate()
        .map_err(|e| err("fine_tuning", e.to_string()))?;

    let eval_batch = spec.evaluation.and_then(|e| e.batch_size).unwrap_or(1024) as usize;
    if eval_batch == 0 {
        return Err(err("evaluation.batch_size", "must be at least 1"));
    }
    let device = match pb::DeviceRequirement::try_from(spec.device) {
        Ok(pb::DeviceRequirement::Unspecified) => Device::Any,
        Ok(pb::DeviceRequirement::Gpu) => Device::Gpu,
        Ok(pb::DeviceRequirement::Cpu) => Device::Cpu,
        Err(_) => {
            return Err(err(
                "device",
                format!("unknown device requirement {}", spec.device),
            ))
        }
    };
    let max_attempts = spec.max_attempts.unwrap_or(3);
    if !(1..=20).contains(&max_attempts) {
        return Err(err(
            "max_attempts",
            format!("must be between 1 and 20, got {max_attempts}"),
        ));
    }
    Ok(Plan {
        name: spec.name.clone(),
        arch,
        data,
        members,
        methods,
        fine_tune,
        eval_batch,
        device,
        max_attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name: demo
data: {dataset: fashion-mnist, train_subset: 1000}
architecture: mlp
members:
  count: 2
  training: {epochs: 3, lr: 0.05, schedule: {kind: step, every: 2, gamma: 0.5}}
fusion: [nt, average]
fine_tuning:
  training: {epochs: 2}
  distill: {temperature: 3}
device: any
"#;

    fn keys(r: &str) -> Result<String, String> {
        Ok(r.to_string())
    }

    #[test]
    fn a_yaml_spec_becomes_a_plan() {
        let file = RunSpecFile::from_yaml(SPEC).unwrap();
        let wire = file.to_proto(std::path::Path::new(".")).unwrap();
        let plan = plan(&wire, &keys).unwrap();
        assert_eq!(plan.methods, [Method::Nt, Method::Average]);
        let MemberPlan::Train(members) = &plan.members else {
            panic!("members should train")
        };
        assert_eq!(members.len(), 2);
        assert_eq!((members[0].seed, members[1].seed), (1, 2));
        assert_eq!(members[0].epochs, 3);
        assert_eq!(members[0].lr, 0.05);
        assert_eq!(members[0].momentum, 0.9);
        assert_eq!(
            members[0].schedule,
            Schedule::Step {
                every: 2,
                gamma: 0.5
            }
        );
        assert_eq!(plan.fine_tune.epochs, 2);
        assert_eq!(plan.fine_tune.distill.unwrap().temperature, 3.0);
        assert_eq!(plan.data.train_subset, Some(1000));
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let e = RunSpecFile::from_yaml("architecture: mlp\nmembers: {count: 2}\nfusoin: [nt]\n")
            .unwrap_err();
        assert!(e.to_string().contains("fusoin"), "{e}");
        let e = RunSpecFile::from_yaml(
            "architecture: mlp\nmembers: {count: 2, training: {epoch: 3}}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("epoch"), "{e}");
        let bad = |yaml: &str| {
            let f = RunSpecFile::from_yaml(yaml).unwrap();
            plan(&f.to_proto(std::path::Path::new(".")).unwrap(), &keys).unwrap_err()
        };
        let e = bad("architecture: alexnet\nmembers: {count: 2}\n");
        assert_eq!(e.field, "architecture");
        assert!(e.message.contains("alexnet"), "{e}");
        let e = bad("architecture: mlp\nmembers: {count: 1}\n");
        assert_eq!(e.field, "members.count");
        let e = bad("architecture: resnet18\nmembers: {count: 2}\n");
        assert!(
            e.message.contains("[3, 32, 32]") && e.message.contains("[1, 28, 28]"),
            "{e}"
        );
        let e = bad("architecture: mlp\nmembers: {count: 2, training: {lr: -1}}\n");
        assert_eq!(e.field, "members.training");
        let e = bad("architecture: mlp\ndata: {dataset: imagenet}\nmembers: {count: 2}\n");
        assert_eq!(e.field, "data.dataset");
        let e =
            RunSpecFile::from_yaml("architecture: mlp\nmembers: {count: 2}\nfusion: [concat]\n")
                .unwrap()
                .to_proto(std::path::Path::new("."))
                .unwrap_err();
        assert_eq!(e.field, "fusion[0]");
    }

    #[test]
    fn every_example_spec_is_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let file = RunSpecFile::from_yaml(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let wire = file.to_proto(&dir).unwrap();
                plan(&wire, &keys).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 5, "found {seen} example specs");
    }

    #[test]
    fn training_round_trips_through_the_wire() {
        let c = TrainConfig {
            epochs: 7,
            lr: 0.2,
            nesterov: true,
            schedule: Schedule::MultiStep {
                milestones: vec![2, 4],
                gamma: 0.1,
            },
            seed: 9,
            ..TrainConfig::default()
        };
        let back = train_config(Some(&training_to_proto(&c)), 9, Augment::default());
        assert_eq!(back, c);
    }

    #[test]
    fn synthetic_noise_zero_survives_the_wire() {
        let yaml = "data: {dataset: synthetic, synthetic: {noise: 0, train: 64}}\n\
                    architecture: mlp\nmembers: {count: 2}\n";
        let wire = RunSpecFile::from_yaml(yaml)
            .unwrap()
            .to_proto(std::path::Path::new("."))
            .unwrap();
        let data = data_spec(wire.data.as_ref().unwrap());
        let s = data.synthetic.unwrap();
        assert_eq!((s.noise, s.train), (0.0, 64));
        // A wire spec without the field gets the default.
        let mut d = wire.data.clone().unwrap();
        d.synthetic.as_mut().unwrap().noise = None;
        assert_eq!(
            data_spec(&d).synthetic.unwrap().noise,
            SyntheticSpec::default().noise
        );
    }
}
