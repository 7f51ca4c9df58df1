//! `ntctl fuse`: fuse member checkpoints offline and say what was kept.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use fusion::arch::{ArchSpec, Architecture};
use fusion::checkpoint::{self, Lineage, Precision, SaveOptions, Saved};
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
    /// Where to write the fused checkpoint (a folder: its `model.safetensors`).
    /// Above --max-shard-size it is sharded: `STEM-00001-of-0000N.safetensors`
    /// and the index `STEM.safetensors.index.json` next to it.
    #[arg(short, long)]
    output_file: PathBuf,
    /// The fused checkpoint's float dtype: f32, bf16 or f16 (default: the
    /// members', which must agree).
    #[arg(long, env = "NT_FUSE_DTYPE", value_parser = parse_dtype)]
    dtype: Option<Precision>,
    /// The largest fused checkpoint written as one file, and the largest
    /// shard above it: bytes, or with a unit (`500MB`, `2GiB`).
    #[arg(long, default_value = "2GiB", env = "NT_MAX_SHARD_SIZE", value_parser = parse_size)]
    max_shard_size: u64,
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

fn parse_dtype(s: &str) -> Result<Precision, String> {
    s.parse().map_err(|e: fusion::FusionError| e.to_string())
}

/// A size in bytes: a number with an optional unit, `B`, `KB`/`MB`/`GB`/`TB`
/// (powers of 1000) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024); at least 1.
fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit (B, KB, MB, GB, KiB, MiB, GiB, ...)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size (a number of bytes, or with a unit: 2GiB)"))?;
    let bytes = value * scale as f64;
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("`{s}`: a shard size is at least 1 byte"));
    }
    Ok(bytes as u64)
}

#[derive(Serialize)]
struct FuseOutput<'a> {
    /// What to read back: the file, or the index of a sharded checkpoint.
    output: String,
    /// The fused checkpoint's float dtype.
    dtype: Precision,
    /// The shards of a sharded checkpoint (none for one file).
    shards: Vec<String>,
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

/// Writing the output replaces what is at its path, and in a folder the
/// shards an older index names: refuse when that would be a member.
fn refuse_overwriting_a_member(out: &std::path::Path, members: &[PathBuf]) -> Result<()> {
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).ok();
    let out_real = canonical(out);
    let out_folder = if out.is_dir() {
        out_real.clone()
    } else {
        out.parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    std::path::Path::new(".")
                } else {
                    p
                }
            })
            .and_then(canonical)
    };
    for m in members {
        let Some(real) = canonical(m) else { continue };
        let member_folder = if real.is_dir() {
            Some(real.clone())
        } else {
            real.parent().map(std::path::Path::to_path_buf)
        };
        let index = real.to_string_lossy().ends_with(".index.json") || real.is_dir();
        // Writing `x.safetensors` also removes an older `x.safetensors.index.json`.
        let same_name_index = out_folder.as_ref().zip(out.file_name()).map(|(f, n)| {
            let mut name = n.to_os_string();
            name.push(".index.json");
            f.join(name)
        });
        if out_real.as_ref() == Some(&real)
            || (index && out.is_dir() && out_folder == member_folder)
            || same_name_index.as_ref() == Some(&real)
        {
            bail!(
                "-o {} would overwrite member {}: write the fused model elsewhere",
                out.display(),
                m.display()
            );
        }
    }
    Ok(())
}

pub fn run(args: FuseArgs, output: OutputFormat) -> Result<()> {
    if args.members.len() < 2 {
        bail!(
            "fusion needs at least 2 member checkpoints, got {}",
            args.members.len()
        );
    }
    refuse_overwriting_a_member(&args.output_file, &args.members)?;
    let loaded = args
        .members
        .iter()
        .map(|p| checkpoint::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    let stored: Vec<(String, Precision)> = args
        .members
        .iter()
        .zip(&loaded)
        .map(|(p, l)| (p.display().to_string(), l.precision))
        .collect();
    let precision = checkpoint::common_precision(&stored)?;
    let members: Vec<_> = loaded.into_iter().map(|l| l.state).collect();
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
    // Fused in f32; written in the members' precision unless told otherwise.
    let options = SaveOptions {
        precision: args.dtype.unwrap_or(precision),
        max_shard_bytes: args.max_shard_size,
    };
    let saved = checkpoint::save_with(&args.output_file, &fused.state, &options)?;

    let report = &fused.report;
    match output {
        OutputFormat::Json => print_json(&FuseOutput {
            output: saved.path.display().to_string(),
            dtype: saved.precision,
            shards: saved
                .shards
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            member_files,
            report,
        })?,
        OutputFormat::Text => print_text(&saved, report, &member_files),
    }
    Ok(())
}

fn print_text(saved: &Saved, report: &FuseReport, member_files: &[String]) {
    let shards = match saved.shards.len() {
        0 => String::new(),
        n => format!(", {n} shards"),
    };
    println!(
        "fused {} members with {} in {:.3} s -> {} ({}, {} parameters, {}{shards})",
        report.members,
        report.method,
        report.seconds,
        saved.path.display(),
        report.arch,
        report.parameters,
        saved.precision,
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5 MB"), Ok(1_500_000));
        assert_eq!(parse_size("4kib"), Ok(4096));
        for bad in ["", "0", "GiB", "-1", "1e99TB", "2 parsecs", "1.2.3"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
