//! `ntctl train`: train a member, or fine-tune a fused model, offline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use nt_spec::defaults;
use serde::Serialize;

use nt_runtime::data::{Augment, DataSpec};
use nt_runtime::job::{
    run_training, ArchOf, JobHooks, LocalFiles, ModelRef, Provenance, Start, Started, TrainJob,
};
use nt_runtime::train::{Distill, Evaluation, Progress, Schedule, TrainConfig, TrainOutcome};

use crate::output::{print_json, OutputFormat};

/// The evaluation batch size of the offline commands.
pub const EVAL_BATCH: usize = nt_spec::defaults::EVAL_BATCH;

/// Where the data comes from and how it is split (shared by train and eval).
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Data set as `name[:folder]`: fashion-mnist (default, from the Debian
    /// package), mnist, kmnist, emnist-<split>, cifar10, cifar100, synthetic;
    /// your own as `image-folder:DIR` or `arrays:DIR`.
    #[arg(long, default_value = defaults::DATASET, env = "NT_DATA")]
    pub data: String,
    /// Image folders: skip undecodable images (and list them) instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    /// Image folders and arrays without a test split: hold out this fraction
    /// of the training images as the test split.
    #[arg(long, default_value_t = 0.0)]
    pub test_split: f64,
    /// Arrays: nchw or nhwc (default: inferred from the architecture's input).
    #[arg(long)]
    pub layout: Option<String>,
    /// Fraction of the training set held out for validation.
    #[arg(long, default_value_t = 0.0)]
    pub validation: f64,
    /// Use a seeded random subset of this many training samples.
    #[arg(long)]
    pub train_subset: Option<usize>,
    /// Use a seeded random subset of this many test samples.
    #[arg(long)]
    pub test_subset: Option<usize>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", env = "NT_DEVICE")]
    pub device: String,
    /// libtorch CPU threads (default: all cores).
    #[arg(long, env = "NT_THREADS")]
    pub threads: Option<usize>,
}

impl DataArgs {
    pub fn spec(&self) -> Result<DataSpec> {
        let spec = DataSpec {
            validation: self.validation,
            train_subset: self.train_subset,
            test_subset: self.test_subset,
            skip_bad: self.skip_bad,
            test_split: self.test_split,
            layout: self
                .layout
                .as_deref()
                .map(nt_spec::data::ArrayLayout::parse)
                .transpose()?,
            ..DataSpec::parse_short(&self.data)?
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Applies the thread count and resolves the device (loading CUDA when asked).
    pub fn device(&self) -> Result<tch::Device> {
        if let Some(n) = self.threads {
            tch::set_num_threads(n as i32);
        }
        Ok(nt_runtime::device::parse_device(&self.device)?)
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Architecture preset or spec file (default: the one recorded in --init).
    #[arg(long)]
    pub(super) arch: Option<String>,
    /// Start from this checkpoint instead of a fresh initialisation (fine-tuning).
    #[arg(long)]
    pub(super) init: Option<PathBuf>,
    /// Distil from these teacher checkpoints' mean logits (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub(super) distill: Vec<PathBuf>,
    /// Distillation temperature.
    #[arg(long, default_value_t = defaults::DISTILL_TEMPERATURE)]
    pub(super) temperature: f64,
    /// Weight of the soft targets in the distillation loss.
    #[arg(long, default_value_t = defaults::DISTILL_WEIGHT)]
    pub(super) distill_weight: f64,
    #[command(flatten)]
    pub(super) data: DataArgs,
    #[arg(long, default_value_t = defaults::EPOCHS)]
    pub(super) epochs: usize,
    #[arg(long, default_value_t = defaults::BATCH_SIZE)]
    pub(super) batch_size: usize,
    #[arg(long, default_value_t = defaults::LR)]
    pub(super) lr: f64,
    #[arg(long, default_value_t = defaults::MOMENTUM)]
    pub(super) momentum: f64,
    #[arg(long, default_value_t = defaults::WEIGHT_DECAY)]
    pub(super) weight_decay: f64,
    #[arg(long)]
    pub(super) nesterov: bool,
    /// constant, step:EVERY:GAMMA, multistep:E1-E2-...:GAMMA or cosine[:MIN_LR].
    #[arg(long, default_value = "constant", value_parser = parse_schedule)]
    pub(super) schedule: Schedule,
    /// Seeds initialisation, data order, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// Compute linear and conv layers in bfloat16 (GPU only).
    #[arg(long)]
    pub(super) bf16: bool,
    /// Random-crop padding in pixels (0 = no crop augmentation).
    #[arg(long, default_value_t = 0)]
    pub(super) crop_padding: usize,
    /// Random horizontal flips.
    #[arg(long)]
    pub(super) hflip: bool,
    /// Write a resumable training state after every epoch into this folder.
    #[arg(long)]
    pub(super) checkpoint_dir: Option<PathBuf>,
    /// Continue from a training state written by --checkpoint-dir.
    #[arg(long)]
    pub(super) resume: Option<PathBuf>,
    /// Train this many members of a fresh ensemble (seeds --seed,
    /// --seed + 1, ...) instead of one model; -o is then a folder that gets
    /// member-0.safetensors, member-1.safetensors, ...
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=nt_spec::plan::MAX_MEMBERS as i64))]
    pub(super) members: Option<u32>,
    /// With --members: on trains them together, one step for all (one
    /// batched computation on CUDA), falling back to one after another (with
    /// the reason) when they cannot; off trains them one after another.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub(super) joint: String,
    /// Where to write the trained model (with --members: a folder).
    #[arg(short, long)]
    pub(super) output_file: PathBuf,
}

pub fn parse_schedule(text: &str) -> Result<Schedule, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let num = |s: &str| {
        s.parse::<f64>()
            .map_err(|_| format!("`{s}` is not a number in schedule `{text}`"))
    };
    match parts.as_slice() {
        ["constant"] => Ok(Schedule::Constant),
        ["step", every, gamma] => Ok(Schedule::Step {
            every: every.parse().map_err(|_| format!("`{every}` is not an epoch count"))?,
            gamma: num(gamma)?,
        }),
        ["multistep", ms, gamma] => Ok(Schedule::MultiStep {
            milestones: ms
                .split('-')
                .map(|m| m.parse().map_err(|_| format!("`{m}` is not an epoch")))
                .collect::<Result<_, _>>()?,
            gamma: num(gamma)?,
        }),
        ["cosine"] => Ok(Schedule::Cosine { min_lr: 0.0 }),
        ["cosine", min] => Ok(Schedule::Cosine { min_lr: num(min)? }),
        _ => Err(format!(
            "unknown schedule `{text}` (constant, step:EVERY:GAMMA, multistep:E1-E2:GAMMA, cosine[:MIN_LR])"
        )),
    }
}

/// A path as the job driver's key (`LocalFiles` reads keys as paths).
pub fn key(path: &Path) -> String {
    path.display().to_string()
}

/// Prints the start and each epoch in text mode.
pub(super) struct CliHooks {
    pub(super) output: OutputFormat,
}

impl JobHooks for CliHooks {
    fn started(&mut self, start: &Started<'_>) {
        if self.output == OutputFormat::Text {
            println!(
                "training {} ({} parameters) on {} ({} train / {} test images) on {:?}",
                start.arch.name(),
                start.arch.parameter_count(),
                start.data.name,
                start.data.train.len,
                start.data.test.len,
                start.device
            );
            if let Some(loaded) = &start.data.loaded {
                println!("{}", crate::output::describe_load(loaded));
            }
        }
    }

    fn progress(&mut self, p: &Progress) {
        if let (OutputFormat::Text, Some(e)) = (self.output, &p.epoch_end) {
            let eval = e
                .eval
                .map(|v| format!("  eval loss {:.4} acc {:.2}%", v.loss, 100.0 * v.accuracy))
                .unwrap_or_default();
            println!(
                "epoch {:>3}/{}  lr {:.4}  loss {:.4}  acc {:.2}%{eval}  {:.0} samples/s  {:.1} s",
                e.epoch,
                p.epochs,
                e.lr,
                e.train_loss,
                100.0 * e.train_accuracy,
                e.samples_per_second,
                e.seconds
            );
        }
    }
}

#[derive(Serialize)]
pub(super) struct TrainReport<'a> {
    pub(super) output: String,
    pub(super) arch: String,
    pub(super) parameters: usize,
    pub(super) device: String,
    pub(super) test: Evaluation,
    #[serde(flatten)]
    pub(super) outcome: &'a TrainOutcome,
    /// How the user's own data was loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) data: Option<nt_runtime::data::LoadReport>,
}

/// The training settings the flags give (with distillation when there are teachers).
pub(super) fn train_config(args: &TrainArgs, teachers: bool) -> TrainConfig {
    TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        nesterov: args.nesterov,
        schedule: args.schedule.clone(),
        seed: args.seed,
        bf16: args.bf16,
        augment: Augment {
            crop_padding: args.crop_padding,
            hflip: args.hflip,
        },
        distill: teachers.then_some(Distill {
            temperature: args.temperature,
            weight: args.distill_weight,
        }),
        log_every: 0,
    }
}

impl TrainArgs {
    /// Whether these flags train an ensemble (`--members`).
    pub fn trains_members(&self) -> bool {
        self.members.is_some()
    }
}

/// Trains or fine-tunes one model (for `--members`, see `train_members`).
pub fn run(args: TrainArgs, output: OutputFormat) -> Result<()> {
    let device = args.data.device()?;
    let arch = args
        .arch
        .as_deref()
        .map(fusion::arch::resolve)
        .transpose()?;
    let start = match (&args.init, arch) {
        (Some(path), arch) => Start::Checkpoint(ModelRef {
            key: key(path),
            arch: arch.map_or(ArchOf::Recorded, ArchOf::Given),
        }),
        (None, Some(arch)) => Start::Fresh(arch),
        (None, None) => {
            bail!("say what to train: --arch (a preset or spec file) or --init (a checkpoint)")
        }
    };
    // Teachers are read with the architecture each one records.
    let teachers: Vec<ModelRef> = args
        .distill
        .iter()
        .map(|p| ModelRef {
            key: key(p),
            arch: ArchOf::Recorded,
        })
        .collect();
    let config = train_config(&args, !teachers.is_empty());
    let job = TrainJob {
        start,
        teachers,
        config,
        data: args.data.spec()?,
        device,
        eval_batch: EVAL_BATCH,
        resume: args.resume.as_deref().map(key),
        epoch_states: args.checkpoint_dir.as_deref().map(key),
        output: key(&args.output_file),
        provenance: Provenance::Offline {
            notes: BTreeMap::from([
                ("data".to_string(), args.data.data.clone()),
                ("epochs".to_string(), args.epochs.to_string()),
            ]),
        },
    };
    let trained = run_training(&job, &LocalFiles, &mut CliHooks { output })?;
    match output {
        OutputFormat::Json => print_json(&TrainReport {
            output: args.output_file.display().to_string(),
            arch: trained.arch.name().to_string(),
            parameters: trained.arch.parameter_count(),
            device: format!("{device:?}"),
            test: trained.after,
            outcome: &trained.outcome,
            data: trained.data.clone(),
        })?,
        OutputFormat::Text => println!(
            "test accuracy {:.2}%  loss {:.4}  ({:.0} training samples/s) -> {}",
            100.0 * trained.after.accuracy,
            trained.after.loss,
            trained.outcome.samples_per_second,
            args.output_file.display()
        ),
    }
    Ok(())
}
