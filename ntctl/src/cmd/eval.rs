//! `ntctl eval`: accuracy of models and of their output-averaging ensemble.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;

use nt_runtime::job::{run_evaluation, ArchOf, EvalJob, LocalFiles, Normalize, Quiet};
use nt_runtime::train::Evaluation;
use nt_spec::EvalItem;

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
