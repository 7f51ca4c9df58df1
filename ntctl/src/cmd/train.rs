//! `ntctl train`: train a member, or fine-tune a fused model, offline.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use fusion::arch::Architecture;
use fusion::checkpoint::{self, Lineage};
use nt_runtime::data::{Augment, DataSpec};
use nt_runtime::model::Network;
use nt_runtime::train::{
    init_network, Control, Distill, Evaluation, Progress, Schedule, TrainConfig, TrainHooks,
    TrainOutcome, TrainState,
};

use crate::output::{print_json, OutputFormat};

/// Where the data comes from and how it is split (shared by train and eval).
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Data set as `name[:folder]`: fashion-mnist (default, from the Debian
    /// package), mnist, kmnist, emnist-<split>, cifar10, cifar100, synthetic.
    #[arg(long, default_value = "fashion-mnist", env = "NT_DATA")]
    pub data: String,
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
        Ok(DataSpec {
            validation: self.validation,
            train_subset: self.train_subset,
            test_subset: self.test_subset,
            ..DataSpec::parse_short(&self.data)?
        })
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
    arch: Option<String>,
    /// Start from this checkpoint instead of a fresh initialisation (fine-tuning).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Distil from these teacher checkpoints' mean logits (comma-separated).
    #[arg(long, value_delimiter = ',')]
    distill: Vec<PathBuf>,
    /// Distillation temperature.
    #[arg(long, default_value_t = 2.0)]
    temperature: f64,
    /// Weight of the soft targets in the distillation loss.
    #[arg(long, default_value_t = 0.25)]
    distill_weight: f64,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long)]
    nesterov: bool,
    /// constant, step:EVERY:GAMMA, multistep:E1-E2-...:GAMMA or cosine[:MIN_LR].
    #[arg(long, default_value = "constant", value_parser = parse_schedule)]
    schedule: Schedule,
    /// Seeds initialisation, data order, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute linear and conv layers in bfloat16 (GPU only).
    #[arg(long)]
    bf16: bool,
    /// Random-crop padding in pixels (0 = no crop augmentation).
    #[arg(long, default_value_t = 0)]
    crop_padding: usize,
    /// Random horizontal flips.
    #[arg(long)]
    hflip: bool,
    /// Write a resumable training state after every epoch into this folder.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Continue from a training state written by --checkpoint-dir.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Where to write the trained model.
    #[arg(short, long)]
    output_file: PathBuf,
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

/// Loads a checkpoint with its architecture (given, or recorded in it).
pub fn load_model(
    path: &Path,
    arch: Option<&str>,
) -> Result<(Architecture, fusion::state::StateDict)> {
    let state = checkpoint::load(path)?;
    let arch = match arch {
        Some(a) => fusion::arch::resolve(a)?,
        None => match state.arch() {
            Some(spec) => Architecture::new(spec.with_context(|| path.display().to_string())?)?,
            None => bail!(
                "{} records no architecture; pass --arch with a preset (`ntctl arch list`) or a spec file",
                path.display()
            ),
        },
    };
    checkpoint::validate(&state, &arch, &path.display().to_string())?;
    Ok((arch, state))
}

struct CliHooks {
    output: OutputFormat,
    checkpoint_dir: Option<PathBuf>,
}

impl TrainHooks for CliHooks {
    fn progress(&mut self, p: &Progress) -> Control {
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
        Control::Continue
    }

    fn epoch_end(
        &mut self,
        epoch: usize,
        state: &dyn Fn() -> nt_runtime::Result<TrainState>,
    ) -> nt_runtime::Result<()> {
        let Some(dir) = &self.checkpoint_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(|e| nt_runtime::RuntimeError::Io {
            path: dir.clone(),
            source: e,
        })?;
        let bytes = nt_runtime::train::train_state_to_bytes(&state()?)?;
        let path = dir.join(format!("epoch-{epoch:04}.state.safetensors"));
        let tmp = dir.join(format!(".epoch-{epoch:04}.tmp"));
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| nt_runtime::RuntimeError::Io { path, source: e })
    }
}

#[derive(Serialize)]
struct TrainReport<'a> {
    output: String,
    arch: String,
    parameters: usize,
    device: String,
    test: Evaluation,
    #[serde(flatten)]
    outcome: &'a TrainOutcome,
}

pub fn run(args: TrainArgs, output: OutputFormat) -> Result<()> {
    let device = args.data.device()?;
    let (arch, init_state) = match (&args.init, &args.arch) {
        (Some(path), arch) => {
            let (a, s) = load_model(path, arch.as_deref())?;
            (a, Some(s))
        }
        (None, Some(a)) => (fusion::arch::resolve(a)?, None),
        (None, None) => {
            bail!("say what to train: --arch (a preset or spec file) or --init (a checkpoint)")
        }
    };
    let splits = nt_runtime::data::load_local(&args.data.spec()?)?;
    splits.check_fits(&arch)?;
    // A fine-tuned model keeps the normalisation its members were trained with.
    let recorded = init_state
        .as_ref()
        .and_then(|s| s.input())
        .map(|i| nt_runtime::data::Normalization::from(&i));
    let data = splits.to_device_with(device, recorded)?;

    let mut net = match &init_state {
        Some(state) => Network::from_state(&arch, state, device)?,
        None => init_network(&arch, device, args.seed)?,
    };
    let teachers = args
        .distill
        .iter()
        .map(|p| {
            let (a, s) = load_model(p, None)?;
            Ok(Network::from_state(&a, &s, device)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let resume = match &args.resume {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| p.display().to_string())?;
            Some(nt_runtime::train::train_state_from_bytes(
                &p.display().to_string(),
                bytes,
            )?)
        }
        None => None,
    };
    let config = TrainConfig {
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
        distill: (!teachers.is_empty()).then_some(Distill {
            temperature: args.temperature,
            weight: args.distill_weight,
        }),
        log_every: 0,
    };
    if output == OutputFormat::Text {
        println!(
            "training {} ({} parameters) on {} ({} train / {} test images) on {:?}",
            arch.name(),
            arch.parameter_count(),
            data.name,
            data.train.len,
            data.test.len,
            device
        );
    }
    let mut hooks = CliHooks {
        output,
        checkpoint_dir: args.checkpoint_dir.clone(),
    };
    let outcome = nt_runtime::train::train(
        &mut net,
        &config,
        &data.train,
        Some(data.monitor()),
        &teachers,
        resume,
        &mut hooks,
    )?;
    let test = nt_runtime::train::evaluate(&net, &data.test, 1024)?;

    let mut state = net.to_state()?;
    state.set_input(&data.input_spec());
    let mut lineage = init_state
        .as_ref()
        .and_then(|s| s.lineage())
        .unwrap_or_default();
    lineage.method = if init_state.is_some() {
        "fine-tuned".into()
    } else {
        "trained".into()
    };
    if let Some(init) = &args.init {
        lineage.members = vec![init.display().to_string()];
    }
    lineage
        .metrics
        .insert("test_accuracy".into(), test.accuracy);
    lineage.metrics.insert("test_loss".into(), test.loss);
    lineage.notes.insert("data".into(), args.data.data.clone());
    lineage.notes.insert("seed".into(), args.seed.to_string());
    lineage
        .notes
        .insert("epochs".into(), args.epochs.to_string());
    state.set_lineage(&Lineage { ..lineage });
    checkpoint::save(&args.output_file, &state)?;

    match output {
        OutputFormat::Json => print_json(&TrainReport {
            output: args.output_file.display().to_string(),
            arch: arch.name().to_string(),
            parameters: arch.parameter_count(),
            device: format!("{device:?}"),
            test,
            outcome: &outcome,
        })?,
        OutputFormat::Text => println!(
            "test accuracy {:.2}%  loss {:.4}  ({:.0} training samples/s) -> {}",
            100.0 * test.accuracy,
            test.loss,
            outcome.samples_per_second,
            args.output_file.display()
        ),
    }
    Ok(())
}
