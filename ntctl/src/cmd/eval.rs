//! `ntctl eval`: accuracy of models and of their output-averaging ensemble.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;

use nt_runtime::model::Network;
use nt_runtime::train::{evaluate, evaluate_ensemble, Evaluation};

use super::train::{load_model, DataArgs};
use crate::output::{print_json, OutputFormat};

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
    let splits = nt_runtime::data::load_local(&args.data.spec()?)?;
    let mut nets = Vec::new();
    for path in &args.models {
        let (arch, state) = load_model(path, args.arch.as_deref())?;
        splits.check_fits(&arch)?;
        nets.push((
            path.display().to_string(),
            Network::from_state(&arch, &state, device)?,
        ));
    }
    if nets.is_empty() {
        bail!("give at least one model checkpoint");
    }
    let data = splits.to_device(device)?;
    let mut models = Vec::new();
    for (name, net) in &nets {
        models.push(ModelResult {
            model: name.clone(),
            arch: net.arch().name().to_string(),
            parameters: net.arch().parameter_count(),
            evaluation: evaluate(net, &data.test, 1024)?,
        });
    }
    let ensemble = if nets.len() > 1 {
        let refs: Vec<&Network> = nets.iter().map(|(_, n)| n).collect();
        Some(evaluate_ensemble(&refs, &data.test, 1024)?)
    } else {
        None
    };
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
                .chain(report.ensemble.map(|_| "ensemble (mean logits)".len()))
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
                    "ensemble (mean logits)",
                    100.0 * e.accuracy,
                    e.loss,
                    report.models.iter().map(|m| m.parameters).sum::<usize>()
                );
            }
            println!("on {} test images of {}", data.test.len, report.data);
        }
    }
    Ok(())
}
