//! `ntctl eval`: accuracy of models and of their output-averaging ensemble,
//! or one model's logits on given inputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use nt_runtime::data::arrays::{npy_bytes, parse_npy, Element};
use nt_runtime::job::{
    load_model, run_evaluation, ArchOf, EvalJob, LocalFiles, ModelRef, Normalize, Quiet,
};
use nt_runtime::model::Network;
use nt_runtime::train::Evaluation;
use nt_spec::EvalItem;
use tch::{Kind, Tensor};

use super::train::{key, DataArgs, EVAL_BATCH};
use crate::output::{print_json, OutputFormat};

const ENSEMBLE: &str = "ensemble (mean logits)";

#[derive(Args)]
pub struct EvalArgs {
    /// Architecture preset or spec file (default: the one recorded in each checkpoint).
    #[arg(long)]
    arch: Option<String>,
    #[command(flatten)]
    data: DataArgs,
    /// Checkpoints to evaluate; with several, their ensemble is evaluated too.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// Instead of a data set: run the model on these inputs (a float32 .npy
    /// of shape [N, ...input], used as they are, without normalisation)...
    #[arg(long, requires = "logits")]
    inputs: Option<PathBuf>,
    /// ...and write its logits here (float32 .npy of shape [N, classes]).
    #[arg(long, requires = "inputs")]
    logits: Option<PathBuf>,
}

#[derive(Serialize)]
struct LogitsReport {
    model: String,
    arch: String,
    inputs: usize,
    shape: Vec<usize>,
    logits: String,
}

/// `--inputs X --logits Y`: one model's logits on given inputs.
fn write_logits(args: &EvalArgs, inputs: &Path, out: &Path, output: OutputFormat) -> Result<()> {
    let [model] = args.models.as_slice() else {
        bail!(
            "--inputs takes exactly one model, got {}",
            args.models.len()
        );
    };
    let arch = match &args.arch {
        Some(a) => ArchOf::Given(fusion::arch::resolve(a)?),
        None => ArchOf::Recorded,
    };
    let device = args.data.device()?;
    let (arch, state) = load_model(
        &LocalFiles,
        &ModelRef {
            key: key(model),
            arch,
        },
    )?;
    let name = inputs.display().to_string();
    let bytes = std::fs::read(inputs).with_context(|| format!("reading {name}"))?;
    let array = parse_npy(&name, &bytes)?;
    if array.element != Element::F32 {
        bail!(
            "{name}: inputs must be float32, got {:?} (convert with x.astype(numpy.float32))",
            array.element
        );
    }
    let Some((&n, sample)) = array.shape.split_first() else {
        bail!("{name}: inputs must have a batch dimension, got a scalar");
    };
    let want = arch.input_shape();
    if sample.iter().product::<usize>() != want.iter().product::<usize>() {
        bail!(
            "{name}: inputs of shape {:?} do not fit architecture `{}`, which takes [N, {}]",
            array.shape,
            arch.name(),
            want.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let values: Vec<f32> = array
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let dims: Vec<i64> = array.shape.iter().map(|&d| d as i64).collect();
    let x = Tensor::from_slice(&values).f_reshape(&dims)?;
    let net = Network::from_state(&arch, &state, device)?;
    let mut parts = Vec::new();
    for start in (0..n).step_by(EVAL_BATCH) {
        let len = EVAL_BATCH.min(n - start);
        let batch = x
            .f_narrow(0, start as i64, len as i64)?
            .f_to_device(device)?;
        parts.push(net.predict(&batch)?.f_to_device(tch::Device::Cpu)?);
    }
    let logits = if parts.is_empty() {
        Tensor::f_zeros(
            [0, arch.output_shape()[0] as i64],
            (Kind::Float, tch::Device::Cpu),
        )?
    } else {
        Tensor::f_cat(&parts, 0)?
    };
    let shape: Vec<usize> = logits.size().iter().map(|&d| d as usize).collect();
    let flat: Vec<f32> = Vec::<f32>::try_from(logits.f_flatten(0, -1)?)?;
    let data: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, npy_bytes(Element::F32, &shape, &data))
        .with_context(|| format!("writing {}", out.display()))?;
    let report = LogitsReport {
        model: key(model),
        arch: arch.name().to_string(),
        inputs: n,
        shape,
        logits: out.display().to_string(),
    };
    match output {
        OutputFormat::Json => print_json(&report)?,
        OutputFormat::Text => println!(
            "{}: logits {:?} of {} inputs written to {}",
            report.model, report.shape, report.inputs, report.logits
        ),
    }
    Ok(())
}

#[derive(Serialize)]
struct ModelResult {
    model: String,
    arch: String,
    parameters: usize,
    #[serde(flatten)]
    evaluation: Evaluation,
}

#[derive(Serialize)]
struct EvalReport {
    data: String,
    models: Vec<ModelResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ensemble: Option<Evaluation>,
}

pub fn run(args: EvalArgs, output: OutputFormat) -> Result<()> {
    if let (Some(inputs), Some(out)) = (&args.inputs, &args.logits) {
        return write_logits(&args, inputs, out, output);
    }
    let device = args.data.device()?;
    let arch = match &args.arch {
        Some(a) => ArchOf::Given(fusion::arch::resolve(a)?),
        None => ArchOf::Recorded,
    };
    let names: Vec<String> = args.models.iter().map(|p| key(p)).collect();
    if names.is_empty() {
        bail!("give at least one model checkpoint");
    }
    // Each model, then (for several) their ensemble.
    let mut items: Vec<EvalItem> = names
        .iter()
        .map(|name| EvalItem {
            name: name.clone(),
            checkpoints: vec![name.clone()],
        })
        .collect();
    if names.len() > 1 {
        items.push(EvalItem {
            name: ENSEMBLE.into(),
            checkpoints: names.clone(),
        });
    }
    let job = EvalJob {
        items,
        arch,
        data: args.data.spec()?,
        device,
        eval_batch: EVAL_BATCH,
        normalize: Normalize::TrainingSplit,
    };
    let mut evaluated = run_evaluation(&job, &LocalFiles, &mut Quiet)?;
    let ensemble = if names.len() > 1 {
        evaluated.pop().map(|e| e.evaluation)
    } else {
        None
    };
    let models: Vec<ModelResult> = evaluated
        .into_iter()
        .map(|e| ModelResult {
            model: e.name,
            arch: e.arch,
            parameters: e.parameters,
            evaluation: e.evaluation,
        })
        .collect();
    let test_images = models.first().map_or(0, |m| m.evaluation.samples);
    let report = EvalReport {
        data: args.data.data.clone(),
        models,
        ensemble,
    };
    match output {
        OutputFormat::Json => print_json(&report)?,
        OutputFormat::Text => {
            let width = report
                .models
                .iter()
                .map(|m| m.model.len())
                .chain(report.ensemble.map(|_| ENSEMBLE.len()))
                .max()
                .unwrap_or(5);
            println!(
                "{:<width$}  {:>9}  {:>8}  {:>11}",
                "model", "accuracy", "loss", "parameters"
            );
            for m in &report.models {
                println!(
                    "{:<width$}  {:>8.2}%  {:>8.4}  {:>11}",
                    m.model,
                    100.0 * m.evaluation.accuracy,
                    m.evaluation.loss,
                    m.parameters
                );
            }
            if let Some(e) = &report.ensemble {
                println!(
                    "{:<width$}  {:>8.2}%  {:>8.4}  {:>11}",
                    ENSEMBLE,
                    100.0 * e.accuracy,
                    e.loss,
                    report.models.iter().map(|m| m.parameters).sum::<usize>()
                );
            }
            println!("on {test_images} test images of {}", report.data);
        }
    }
    Ok(())
}
