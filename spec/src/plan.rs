//! The validated, resolved plan of a run: every default filled in, in the
//! fusion engine's and the trainer's types. [`Plan::from_wire`] is the one
//! way from a wire spec to a plan; everything downstream reads the plan.

use fusion::arch::Architecture;
use fusion::checkpoint::Precision;
use fusion::Method;
use nt_proto::v1 as pb;

use crate::data::DataSpec;
use crate::defaults;
pub use crate::device::Device;
use crate::joint::JointMode;
use crate::train::{Distill, TrainConfig};
use crate::wire;
use crate::SpecError;

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::new(field, message)
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
    pub compare: Compare,
    /// The float dtype the fused models are stored in; `None`: the
    /// members' (known once they are read). Fine-tuned models are f32.
    pub fused_precision: Option<Precision>,
    /// Whether the members and the fine-tunings train as one job each
    /// (`members.joint`; the coordinator resolves `auto`).
    pub joint: JointMode,
}

/// The extra models a run produces to put its fusion methods in context.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compare {
    /// Every fused model is also fine-tuned with this distillation (and
    /// [`Plan::fine_tune`] then has none).
    pub distill: Option<Distill>,
    /// Member 0 is trained on with [`Plan::fine_tune`] (without distillation).
    pub baseline: bool,
}

/// Most members a run may have.
pub const MAX_MEMBERS: usize = defaults::MAX_MEMBERS;

/// The `[channels, height, width]` of a data set's images, when known from its name.
fn dataset_shape(data: &DataSpec) -> Option<([usize; 3], Option<usize>)> {
    if data.format.is_some() {
        // The user's own data: known once its files are read.
        return None;
    }
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

/// The name and labels stay small: they are copied into every listing.
fn check_name_and_labels(spec: &pb::RunSpec) -> Result<(), SpecError> {
    if spec.name.len() > defaults::MAX_NAME_BYTES {
        return Err(err(
            "name",
            format!(
                "{} bytes, at most {}",
                spec.name.len(),
                defaults::MAX_NAME_BYTES
            ),
        ));
    }
    if spec.labels.len() > defaults::MAX_LABELS {
        return Err(err(
            "labels",
            format!(
                "{} labels, at most {}",
                spec.labels.len(),
                defaults::MAX_LABELS
            ),
        ));
    }
    for (key, value) in &spec.labels {
        let key_ok = !key.is_empty()
            && key.len() <= defaults::MAX_LABEL_KEY_BYTES
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if !key_ok {
            let shown: String = key.chars().take(40).collect();
            return Err(err(
                "labels",
                format!(
                    "key `{shown}` must be 1 to {} bytes of letters, digits, `.`, `_`, `-` or `/`",
                    defaults::MAX_LABEL_KEY_BYTES
                ),
            ));
        }
        if value.len() > defaults::MAX_LABEL_VALUE_BYTES {
            return Err(err(
                format!("labels.{key}"),
                format!(
                    "{} bytes, at most {}",
                    value.len(),
                    defaults::MAX_LABEL_VALUE_BYTES
                ),
            ));
        }
    }
    Ok(())
}

impl Plan {
    /// Validates a wire spec into a plan. `key_of` turns checkpoint references
    /// into object keys of the service's store (or says why it cannot).
    pub fn from_wire(
        spec: &pb::RunSpec,
        key_of: &dyn Fn(&str) -> Result<String, String>,
    ) -> Result<Plan, SpecError> {
        plan(spec, key_of)
    }
}

fn plan(
    spec: &pb::RunSpec,
    key_of: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Plan, SpecError> {
    check_name_and_labels(spec)?;
    let arch = wire::architecture_from_wire(spec.architecture.as_ref())?;
    let data = wire::data_from_wire(&spec.data.clone().unwrap_or_default())?;
    data.validate()?;
    if data.format.is_some() && arch.input_shape().len() != 3 {
        return Err(err(
            "architecture",
            format!(
                "`{}` takes inputs of shape {:?}; images from `format: {}` need an input of [channels, height, width]",
                arch.name(),
                arch.input_shape(),
                data.format.map_or("", |f| f.name())
            ),
        ));
    }
    if let Some((shape, classes)) = dataset_shape(&data) {
        let need: usize = arch.input_shape().iter().product();
        let images = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if images != Some(need) {
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
    let joint = wire::joint_from_wire(members_spec.joint)?;
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
            defaults::MEMBERS
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
            .map(|&s| wire::training_from_wire(members_spec.training.as_ref(), s, data.augment))
            .collect();
        configs[0]
            .validate()
            .map_err(|e| err("members.training", e.message))?;
        MemberPlan::Train(configs)
    };

    let mut methods = Vec::new();
    for (i, &m) in spec.fusion.iter().enumerate() {
        let method = pb::FusionMethod::try_from(m)
            .ok()
            .and_then(wire::method_from_wire)
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
        methods.push(
            defaults::METHOD
                .parse()
                .map_err(|e: fusion::FusionError| err("fusion", e.to_string()))?,
        );
    }

    let ft = spec.fine_tuning.clone().unwrap_or_default();
    let mut fine_tune = wire::training_from_wire(
        ft.training.as_ref(),
        ft.seed.unwrap_or(defaults::FINE_TUNE_SEED),
        data.augment,
    );
    fine_tune.distill = ft.distill.as_ref().map(wire::distill_from_wire);
    fine_tune
        .validate()
        .map_err(|e| err("fine_tuning", e.message))?;
    let compare_spec = spec.compare.unwrap_or_default();
    let compare = Compare {
        distill: compare_spec
            .distillation
            .then(|| fine_tune.distill.take().unwrap_or_default()),
        baseline: compare_spec.baseline,
    };

    let eval_batch = spec
        .evaluation
        .and_then(|e| e.batch_size)
        .map_or(defaults::EVAL_BATCH, |b| b as usize);
    if eval_batch == 0 {
        return Err(err("evaluation.batch_size", "must be at least 1"));
    }
    let device = wire::device_from_wire(spec.device)?;
    let max_attempts = spec.max_attempts.unwrap_or(defaults::MAX_ATTEMPTS);
    if !(1..=defaults::MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
        return Err(err(
            "max_attempts",
            format!(
                "must be between 1 and {}, got {max_attempts}",
                defaults::MAX_ATTEMPTS_LIMIT
            ),
        ));
    }
    let fused_precision = match spec.fused_dtype.as_str() {
        "" => None,
        dtype => Some(dtype.parse().map_err(|_: fusion::FusionError| {
            err("fused_dtype", format!("`{dtype}` is not f32, bf16 or f16"))
        })?),
    };
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
        compare,
        fused_precision,
        joint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Augment, SyntheticSpec};
    use crate::file::RunSpecFile;
    use crate::train::Schedule;
    use crate::wire::{data_from_wire, training_from_wire, training_to_wire};

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
    fn own_data_specs_are_checked_at_submission() {
        let plan_of = |data: &str, arch: &str| {
            let yaml = format!("data: {data}\narchitecture: \"{arch}\"\nmembers: {{count: 2}}\n");
            let wire = RunSpecFile::from_yaml(&yaml)?.to_proto(std::path::Path::new("."))?;
            plan(&wire, &keys)
        };
        let ok = plan_of(
            "{format: image-folder, path: \"store:datasets/flowers/\", skip_bad: true}",
            "lenet",
        )
        .unwrap();
        assert_eq!(ok.data.dataset, "flowers", "named after its folder");
        assert_eq!(ok.data.format, Some(crate::data::DataFormat::ImageFolder));
        assert!(ok.data.skip_bad);
        let wire = data_from_wire(&crate::wire::data_to_wire(&ok.data)).unwrap();
        assert_eq!(wire, ok.data, "the wire form round-trips");
        let example = format!(
            "{}/../examples/image-folder.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let file = RunSpecFile::from_yaml(&std::fs::read_to_string(example).unwrap()).unwrap();
        let example = plan(&file.to_proto(std::path::Path::new(".")).unwrap(), &keys).unwrap();
        assert_eq!(
            example.data.path.as_deref(),
            Some("store:datasets/fashion-png")
        );
        let refused = |data: &str, arch: &str, field: &str, words: &str| {
            let e = plan_of(data, arch).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(words), "{e}");
        };
        refused(
            "{format: images, path: x}",
            "lenet",
            "data.format",
            "unknown data format `images`",
        );
        refused("{format: arrays}", "lenet", "data.path", "needs a path");
        refused(
            "{format: arrays, path: \"store:/\"}",
            "lenet",
            "data.path",
            "key prefix",
        );
        refused(
            "{format: arrays, path: x, skip_bad: true}",
            "lenet",
            "data.skip_bad",
            "image-folder",
        );
        refused(
            "{format: image-folder, path: x, layout: nhwc}",
            "lenet",
            "data.layout",
            "arrays",
        );
        refused(
            "{format: arrays, path: x, layout: hwcn}",
            "lenet",
            "data.layout",
            "unknown array layout",
        );
        refused(
            "{format: arrays, path: x, test_split: 1.0}",
            "lenet",
            "data.test_split",
            "[0, 1)",
        );
        refused(
            "{dataset: mnist, test_split: 0.2}",
            "lenet",
            "data.test_split",
            "known sets",
        );
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
        // Numbers that are not finite never reach a run document.
        let e = bad("architecture: mlp\nmembers: {count: 2, training: \
                     {schedule: {kind: step, every: 1, gamma: .nan}}}\n");
        assert_eq!(e.field, "members.training");
        assert!(e.message.contains("schedule.gamma"), "{e}");
        let e = bad("architecture: mlp\nmembers: {count: 2}\n\
                     fine_tuning: {training: {schedule: {kind: cosine, min_lr: .inf}}}\n");
        assert_eq!(e.field, "fine_tuning");
        let e = bad(
            "architecture: mlp\ndata: {dataset: synthetic, synthetic: {noise: .nan}}\n\
                     members: {count: 2}\n",
        );
        assert_eq!(e.field, "data.synthetic");
        let e = bad("architecture: mlp\nmembers: {count: 2, training: {lr: -1}}\n");
        assert_eq!(
            e.to_string(),
            "members.training: lr must be positive, got -1"
        );
        // Names and labels are bounded in bytes.
        let huge = "x".repeat(300);
        let e = bad(&format!(
            "architecture: mlp\nmembers: {{count: 2}}\nname: {huge}\n"
        ));
        assert_eq!(e.field, "name");
        let e = bad(&format!(
            "architecture: mlp\nmembers: {{count: 2}}\nlabels: {{team: {huge}}}\n"
        ));
        assert_eq!(e.field, "labels.team");
        let e = bad("architecture: mlp\nmembers: {count: 2}\nlabels: {\"a b\": c}\n");
        assert_eq!(e.field, "labels");
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
        let back = training_from_wire(Some(&training_to_wire(&c)), 9, Augment::default());
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
        let data = data_from_wire(wire.data.as_ref().unwrap()).unwrap();
        let s = data.synthetic.unwrap();
        assert_eq!((s.noise, s.train), (0.0, 64));
        // A wire spec without the field gets the default.
        let mut d = wire.data.clone().unwrap();
        d.synthetic.as_mut().unwrap().noise = None;
        assert_eq!(
            data_from_wire(&d).unwrap().synthetic.unwrap().noise,
            SyntheticSpec::default().noise
        );
    }

    /// Found by fuzzing: the image size of a huge synthetic shape overflowed
    /// (a panic in debug builds, a wrapped number in release).
    #[test]
    fn a_synthetic_shape_too_large_to_count_is_refused() {
        let mut wire = RunSpecFile::from_yaml(SPEC)
            .unwrap()
            .to_proto(std::path::Path::new("."))
            .unwrap();
        let data = wire.data.as_mut().unwrap();
        data.dataset = "synthetic".into();
        data.synthetic = Some(pb::SyntheticData {
            train: 10,
            test: 10,
            classes: 10,
            shape: vec![u32::MAX; 3],
            ..Default::default()
        });
        let e = plan(&wire, &keys).unwrap_err();
        assert_eq!(e.field, "architecture", "{e}");
    }

    #[test]
    fn the_fused_dtype_is_the_members_unless_the_spec_names_one() {
        let plan_of = |extra: &str| {
            let yaml = format!("architecture: mlp\nmembers: {{count: 2}}\n{extra}");
            let wire = RunSpecFile::from_yaml(&yaml)?.to_proto(std::path::Path::new("."))?;
            plan(&wire, &keys)
        };
        assert_eq!(plan_of("").unwrap().fused_precision, None);
        for (dtype, precision) in [
            ("f32", Precision::F32),
            ("bf16", Precision::BF16),
            ("float16", Precision::F16),
        ] {
            let p = plan_of(&format!("fused_dtype: {dtype}\n")).unwrap();
            assert_eq!(p.fused_precision, Some(precision), "{dtype}");
        }
        let e = plan_of("fused_dtype: f64\n").unwrap_err();
        assert_eq!(e.field, "fused_dtype");
        assert!(e.message.contains("`f64` is not f32, bf16 or f16"), "{e}");
    }

    #[test]
    fn members_joint_is_auto_unless_the_spec_says_on_or_off() {
        let plan_of = |members: &str| {
            let yaml = format!("architecture: mlp\nmembers: {members}\n");
            let wire = RunSpecFile::from_yaml(&yaml)?.to_proto(std::path::Path::new("."))?;
            plan(&wire, &keys)
        };
        assert_eq!(plan_of("{count: 2}").unwrap().joint, JointMode::Auto);
        for (text, mode) in [
            ("auto", JointMode::Auto),
            ("on", JointMode::On),
            ("off", JointMode::Off),
            // As a YAML 1.1 or JSON writer would give on and off.
            ("true", JointMode::On),
            ("false", JointMode::Off),
        ] {
            let p = plan_of(&format!("{{count: 2, joint: {text}}}")).unwrap();
            assert_eq!(p.joint, mode, "{text}");
        }
        // Existing members keep the setting: it governs the fine-tunings.
        let p = plan_of("{checkpoints: [a, b], joint: on}").unwrap();
        assert_eq!(p.joint, JointMode::On);
        let e = plan_of("{count: 2, joint: always}").unwrap_err();
        assert_eq!(e.field, "members.joint");
        assert!(e.message.contains("`always` is not auto, on or off"), "{e}");
        let e = plan_of("{count: 2, joint: 3}").unwrap_err();
        assert!(e.to_string().contains("members.joint"), "{e}");
        // A wire value this version does not know names the field too.
        let mut wire = RunSpecFile::from_yaml("architecture: mlp\nmembers: {count: 2}\n")
            .unwrap()
            .to_proto(std::path::Path::new("."))
            .unwrap();
        wire.members.as_mut().unwrap().joint = 9;
        let e = plan(&wire, &keys).unwrap_err();
        assert_eq!(e.field, "members.joint", "{e}");
    }
}
