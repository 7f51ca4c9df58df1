//! `ntctl fuse`: fuse member checkpoints offline and say what was kept.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use fusion::arch::{ArchSpec, Architecture};
use fusion::checkpoint::{self, Lineage};
use fusion::{FuseReport, Method};
use nt_runtime::guard::GuardMode;
use nt_runtime::FuseOptions;

use crate::output::{print_json, OutputFormat};

#[derive(Args)]
pub struct FuseArgs {
    /// nt, nt-iterative, nt-hierarchical, concat (the wide ensemble model) or average.
    #[arg(long, default_value = "nt", value_parser = parse_method)]
    method: Method,
    /// Architecture preset (see `ntctl arch list`) or spec file; defaults to
    /// the one recorded in the first member.
    #[arg(long)]
    arch: Option<String>,
    /// Where to write the fused checkpoint.
    #[arg(short, long)]
    output_file: PathBuf,
    /// Exactness guard: auto (below --guard-limit parameters), always or off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "off"])]
    guard: String,
    /// Largest concatenated model, in parameters, the guard checks in auto mode.
    #[arg(long, default_value_t = 50_000_000)]
    guard_limit: usize,
    /// The guard's allowed logit difference, relative to max(1, max |logit|).
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f64,
    /// Member checkpoints (safetensors with PyTorch state_dict names), at least two.
    #[arg(required = true)]
    members: Vec<PathBuf>,
}

fn parse_method(s: &str) -> Result<Method, String> {
    s.parse().map_err(|e: fusion::FusionError| e.to_string())
}

#[derive(Serialize)]
struct FuseOutput<'a> {
    output: String,
    member_files: Vec<String>,
    #[serde(flatten)]
    report: &'a FuseReport,
}

fn architecture(args: &FuseArgs, first: &fusion::state::StateDict) -> Result<Architecture> {
    match &args.arch {
        Some(a) => Ok(fusion::arch::resolve(a)?),
        None => match first.arch() {
            Some(spec) => {
                let spec: ArchSpec = spec.with_context(|| format!("{}", args.members[0].display()))?;
                Ok(Architecture::new(spec)?)
            }
            None => bail!(
                "{} records no architecture; pass --arch with a preset (`ntctl arch list`) or a spec file",
                args.members[0].display()
            ),
        },
    }
}

pub fn run(args: FuseArgs, output: OutputFormat) -> Result<()> {
    if args.members.len() < 2 {
        bail!(
            "fusion needs at least 2 member checkpoints, got {}",
            args.members.len()
        );
    }
    let members = args
        .members
        .iter()
        .map(|p| checkpoint::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let arch = architecture(&args, &members[0])?;
    for (path, m) in args.members.iter().zip(&members) {
        checkpoint::validate(m, &arch, &path.display().to_string())?;
    }
    let guard = match args.guard.as_str() {
        "always" => GuardMode::Always,
        "off" => GuardMode::Off,
        _ => GuardMode::Auto {
            max_wide_params: args.guard_limit,
        },
    };
    let options = FuseOptions {
        guard,
        tolerance: args.tolerance,
    };
    let refs: Vec<_> = members.iter().collect();
    let mut fused = nt_runtime::fuse(args.method, &arch, &refs, &options)?;
    let member_files: Vec<String> = args
        .members
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut lineage = fused.state.lineage().unwrap_or_default();
    lineage.members = member_files.clone();
    lineage
        .metrics
        .insert("fusion_seconds".into(), fused.report.seconds);
    fused.state.set_lineage(&Lineage { ..lineage });
    checkpoint::save(&args.output_file, &fused.state)?;

    let report = &fused.report;
    match output {
        OutputFormat::Json => print_json(&FuseOutput {
            output: args.output_file.display().to_string(),
            member_files,
            report,
        })?,
        OutputFormat::Text => print_text(&args, report, &member_files),
    }
    Ok(())
}

fn print_text(args: &FuseArgs, report: &FuseReport, member_files: &[String]) {
    println!(
        "fused {} members with {} in {:.3} s -> {} ({}, {} parameters)",
        report.members,
        report.method,
        report.seconds,
        args.output_file.display(),
        report.arch,
        report.parameters
    );
    let guard = &report.guard;
    if guard.ran {
        let worst = |f: fn(&nt_runtime::guard::GuardStep) -> Option<f64>| {
            guard.steps.iter().filter_map(f).fold(0.0f64, f64::max)
        };
        let fused = worst(|s| s.fused_max_diff);
        println!(
            "exactness guard: passed on {} step(s); concatenated vs ensemble max |diff| {:.1e}{}",
            guard.steps.len(),
            worst(|s| Some(s.concat_max_diff)),
            if guard.steps.iter().any(|s| s.fused_max_diff.is_some()) {
                format!(", fused vs masked concatenation {fused:.1e}")
            } else {
                String::new()
            }
        );
    } else if let Some(why) = &guard.skipped {
        println!("exactness guard: skipped ({why})");
    }
    if report.groups.is_empty() {
        return;
    }
    let names: Vec<String> = member_files
        .iter()
        .map(|f| {
            std::path::Path::new(f)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| f.clone())
        })
        .collect();
    let col = names.iter().map(|n| n.len()).max().unwrap_or(0).max(14);
    let first = report
        .groups
        .iter()
        .map(|g| g.layers.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let verb = if report.method == Method::Concat {
        "holds"
    } else {
        "kept"
    };
    println!("channels each group {verb} from each member:");
    print!("{:<first$}  {:>6}", "group", "width");
    for n in &names {
        print!("  {n:>col$}");
    }
    println!();
    for g in &report.groups {
        print!("{:<first$}  {:>6}", g.layers, g.width);
        for &kept in &g.kept_per_member {
            let share = 100.0 * kept as f64 / g.width.max(1) as f64;
            print!("  {:>col$}", format!("{kept} ({share:.1}%)"));
        }
        println!();
    }
}
