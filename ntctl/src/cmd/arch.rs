//! `ntctl arch`: the presets, and any architecture as a spec file.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::output::{print_json, OutputFormat};

#[derive(Args)]
pub struct ArchArgs {
    #[command(subcommand)]
    command: ArchCommand,
}

#[derive(Subcommand)]
enum ArchCommand {
    /// List the built-in presets and their options.
    List,
    /// Print an architecture (preset such as `resnet18:classes=100`, or spec
    /// file) as an nt.arch/v1 spec, with its parameter count.
    Show {
        /// Preset or spec file.
        arch: String,
    },
}

#[derive(Serialize)]
struct PresetInfo {
    name: &'static str,
    description: &'static str,
}

pub fn run(args: ArchArgs, output: OutputFormat) -> Result<()> {
    match args.command {
        ArchCommand::List => {
            let presets: Vec<PresetInfo> = fusion::arch::PRESETS
                .iter()
                .map(|(name, description)| PresetInfo { name, description })
                .collect();
            match output {
                OutputFormat::Json => print_json(&presets)?,
                OutputFormat::Text => {
                    for p in presets {
                        println!("{:<12} {}", p.name, p.description);
                    }
                }
            }
        }
        ArchCommand::Show { arch } => {
            let arch = fusion::arch::resolve(&arch)?;
            match output {
                OutputFormat::Json => print_json(arch.spec())?,
                OutputFormat::Text => {
                    println!("{}", arch.spec().to_json_pretty());
                    eprintln!(
                        "{}: {} parameters, input {:?}, output {:?}",
                        arch.name(),
                        arch.parameter_count(),
                        arch.input_shape(),
                        arch.output_shape()
                    );
                }
            }
        }
    }
    Ok(())
}
