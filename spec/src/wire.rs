//! The one conversion each way between the plain config types and the
//! `nt.v1` wire messages. Conversions from the wire fill unset fields from
//! [`crate::defaults`]; conversions to the wire set every field, so a
//! resolved value survives the trip unchanged.

use fusion::arch::Architecture;
use fusion::Method;
use nt_proto::v1 as pb;

use crate::data::{name_of_path, ArrayLayout, Augment, DataFormat, DataSpec, SyntheticSpec};
use crate::defaults;
use crate::device::Device;
use crate::joint::JointMode;
use crate::train::{Distill, Schedule, TrainConfig};
use crate::SpecError;

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::new(field, message)
}

/// The wire name of a method; `concat` cannot be fine-tuned in a run and has none.
pub fn method_to_wire(m: Method) -> Option<pb::FusionMethod> {
    match m {
        Method::Nt => Some(pb::FusionMethod::Nt),
        Method::NtIterative => Some(pb::FusionMethod::NtIterative),
        Method::NtHierarchical => Some(pb::FusionMethod::NtHierarchical),
        Method::Average => Some(pb::FusionMethod::Average),
        Method::Ot => Some(pb::FusionMethod::Ot),
        Method::Concat => None,
    }
}

pub fn method_from_wire(m: pb::FusionMethod) -> Option<Method> {
    match m {
        pb::FusionMethod::Nt => Some(Method::Nt),
        pb::FusionMethod::NtIterative => Some(Method::NtIterative),
        pb::FusionMethod::NtHierarchical => Some(Method::NtHierarchical),
        pb::FusionMethod::Average => Some(Method::Average),
        pb::FusionMethod::Ot => Some(Method::Ot),
        pb::FusionMethod::Unspecified => None,
    }
}

pub fn schedule_to_wire(s: &Schedule) -> pb::Schedule {
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

pub fn schedule_from_wire(s: &pb::Schedule) -> Schedule {
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
pub fn training_from_wire(t: Option<&pb::Training>, seed: u64, augment: Augment) -> TrainConfig {
    let d = TrainConfig::default();
    let t = t.cloned().unwrap_or_default();
    TrainConfig {
        epochs: t.epochs.map_or(d.epochs, |v| v as usize),
        batch_size: t.batch_size.map_or(d.batch_size, |v| v as usize),
        lr: t.lr.unwrap_or(d.lr),
        momentum: t.momentum.unwrap_or(d.momentum),
        weight_decay: t.weight_decay.unwrap_or(d.weight_decay),
        nesterov: t.nesterov.unwrap_or(d.nesterov),
        schedule: t.schedule.as_ref().map_or(d.schedule, schedule_from_wire),
        seed,
        bf16: t.bf16.unwrap_or(d.bf16),
        augment,
        distill: None,
        log_every: d.log_every,
    }
}

/// The wire form of resolved training settings (every field set).
pub fn training_to_wire(c: &TrainConfig) -> pb::Training {
    pb::Training {
        epochs: Some(c.epochs as u32),
        batch_size: Some(c.batch_size as u32),
        lr: Some(c.lr),
        momentum: Some(c.momentum),
        weight_decay: Some(c.weight_decay),
        nesterov: Some(c.nesterov),
        schedule: Some(schedule_to_wire(&c.schedule)),
        bf16: Some(c.bf16),
    }
}

pub fn distill_from_wire(d: &pb::Distillation) -> Distill {
    Distill {
        temperature: d.temperature.unwrap_or(defaults::DISTILL_TEMPERATURE),
        weight: d.weight.unwrap_or(defaults::DISTILL_WEIGHT),
    }
}

pub fn distill_to_wire(d: &Distill) -> pb::Distillation {
    pb::Distillation {
        temperature: Some(d.temperature),
        weight: Some(d.weight),
    }
}

pub fn augment_to_wire(a: &Augment) -> pb::Augmentation {
    pb::Augmentation {
        crop_padding: a.crop_padding as u32,
        hflip: a.hflip,
    }
}

pub fn synthetic_to_wire(s: &SyntheticSpec) -> pb::SyntheticData {
    pb::SyntheticData {
        train: s.train as u64,
        test: s.test as u64,
        classes: s.classes as u32,
        shape: s.shape.iter().map(|&d| d as u32).collect(),
        seed: s.seed,
        noise: Some(s.noise),
    }
}

fn synthetic_from_wire(s: &pb::SyntheticData) -> SyntheticSpec {
    let def = SyntheticSpec::default();
    let or_default = |v: usize, d: usize| if v == 0 { d } else { v };
    SyntheticSpec {
        train: or_default(s.train as usize, def.train),
        test: or_default(s.test as usize, def.test),
        classes: or_default(s.classes as usize, def.classes),
        shape: match s.shape.as_slice() {
            [c, h, w] => [*c as usize, *h as usize, *w as usize],
            _ => def.shape,
        },
        seed: s.seed,
        noise: s.noise.unwrap_or(def.noise),
    }
}

/// The data spec from the wire, with defaults for unset fields.
pub fn data_from_wire(d: &pb::DataSpec) -> Result<DataSpec, SpecError> {
    let format = (!d.format.is_empty())
        .then(|| DataFormat::parse(&d.format))
        .transpose()?;
    let path = (!d.path.is_empty()).then(|| d.path.clone());
    Ok(DataSpec {
        dataset: match (d.dataset.is_empty(), format, &path) {
            (false, _, _) => d.dataset.clone(),
            (true, Some(_), Some(path)) => name_of_path(path),
            (true, _, _) => defaults::DATASET.into(),
        },
        path,
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
        synthetic: d.synthetic.as_ref().map(synthetic_from_wire),
        format,
        skip_bad: d.skip_bad,
        layout: (!d.layout.is_empty())
            .then(|| ArrayLayout::parse(&d.layout))
            .transpose()?,
        test_split: d.test_split,
    })
}

/// The wire form of a resolved data spec (every field set).
pub fn data_to_wire(d: &DataSpec) -> pb::DataSpec {
    pb::DataSpec {
        dataset: d.dataset.clone(),
        path: d.path.clone().unwrap_or_default(),
        validation: d.validation,
        split_seed: d.split_seed,
        train_subset: d.train_subset.map(|v| v as u64),
        test_subset: d.test_subset.map(|v| v as u64),
        augment: Some(augment_to_wire(&d.augment)),
        synthetic: d.synthetic.as_ref().map(synthetic_to_wire),
        format: d.format.map_or("", DataFormat::name).to_string(),
        skip_bad: d.skip_bad,
        layout: d.layout.map_or("", ArrayLayout::name).to_string(),
        test_split: d.test_split,
    }
}

pub fn device_to_wire(d: Device) -> pb::DeviceRequirement {
    match d {
        Device::Any => pb::DeviceRequirement::Unspecified,
        Device::Gpu => pb::DeviceRequirement::Gpu,
        Device::Cpu => pb::DeviceRequirement::Cpu,
    }
}

pub fn device_from_wire(d: i32) -> Result<Device, SpecError> {
    match pb::DeviceRequirement::try_from(d) {
        Ok(pb::DeviceRequirement::Unspecified) => Ok(Device::Any),
        Ok(pb::DeviceRequirement::Gpu) => Ok(Device::Gpu),
        Ok(pb::DeviceRequirement::Cpu) => Ok(Device::Cpu),
        Err(_) => Err(err("device", format!("unknown device requirement {d}"))),
    }
}

pub fn joint_to_wire(m: JointMode) -> pb::JointTraining {
    match m {
        JointMode::Auto => pb::JointTraining::Auto,
        JointMode::On => pb::JointTraining::On,
        JointMode::Off => pb::JointTraining::Off,
    }
}

/// `members.joint` from the wire; unset is auto.
pub fn joint_from_wire(j: i32) -> Result<JointMode, SpecError> {
    match pb::JointTraining::try_from(j) {
        Ok(pb::JointTraining::Unspecified | pb::JointTraining::Auto) => Ok(JointMode::Auto),
        Ok(pb::JointTraining::On) => Ok(JointMode::On),
        Ok(pb::JointTraining::Off) => Ok(JointMode::Off),
        Err(_) => Err(err(
            "members.joint",
            format!("unknown joint training mode {j} (auto, on or off)"),
        )),
    }
}

/// The architecture from the wire.
pub fn architecture_from_wire(a: Option<&pb::Architecture>) -> Result<Architecture, SpecError> {
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
