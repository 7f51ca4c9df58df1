//! `ntctl experiment`: one run spec repeated over seeds and member counts,
//! aggregated into mean and standard deviation (the paper's comparison as a
//! command). Per seed, the largest member count trains its members; every
//! smaller count fuses the first K of them (nested ensembles on the same
//! members, so counts are compared on equal footing and no member is
//! trained twice). Each finished run is saved under `--out`; running the
//! same command again reuses the saved runs and continues where it stopped.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use nt_client::{experiment, pb, ConnectArgs, RunClient};
use nt_proto::prost::Message;

use super::progress::Display;
use super::remote::{load_spec, submit_spec, SpecOverrides};
use super::run_local::{Embedded, LocalArgs};
use crate::output::{Exit, OutputFormat};

/// Member `i` of seed `s` is initialised with seed `s * SEED_STRIDE + i`.
pub const SEED_STRIDE: u64 = 1000;

#[derive(Args)]
pub struct ExperimentArgs {
    /// The run spec (YAML); `compare: {distillation: true, baseline: true}`
    /// adds the distilled fine-tuning and the compute-matched baseline.
    spec: PathBuf,
    /// Repeat seeds, comma-separated.
    #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Member counts, comma-separated (default: the spec's count).
    #[arg(long, value_delimiter = ',')]
    members: Vec<u32>,
    /// Folder for the runs, the summary (Markdown, JSON) and the plot.
    #[arg(long, default_value = "nt-experiment")]
    out: PathBuf,
    #[command(flatten)]
    embedded: LocalArgs,
    /// Set any field of the spec: `--set members.training.epochs=3`
    /// (repeatable; YAML values).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    set: Vec<String>,
}

/// The spec of one run of the experiment: `count` members trained with the
/// seed's member seeds, or the first `count` of `trained`'s members fused.
fn spec_for(
    base: &pb::RunSpec,
    name: &str,
    seed: u64,
    count: usize,
    trained: Option<&pb::Run>,
) -> pb::RunSpec {
    let mut spec = base.clone();
    spec.name = format!("{name} K={count} seed={seed}");
    let members = spec.members.get_or_insert_with(Default::default);
    match trained {
        None => {
            members.count = count as u32;
            members.seeds = (0..count as u64).map(|i| seed * SEED_STRIDE + i).collect();
            members.checkpoints.clear();
        }
        Some(run) => {
            members.count = 0;
            members.seeds.clear();
            members.checkpoints = run
                .report
                .as_ref()
                .map(|r| {
                    r.members
                        .iter()
                        .take(count)
                        .map(|m| m.checkpoint.clone())
                        .collect()
                })
                .unwrap_or_default();
        }
    }
    let ft = spec.fine_tuning.get_or_insert_with(Default::default);
    ft.seed = Some(seed * SEED_STRIDE + SEED_STRIDE - 1);
    spec.labels.insert("experiment".into(), name.to_string());
    spec.labels.insert("seed".into(), seed.to_string());
    spec
}

/// A request id that names the experiment, the run and the exact spec, so
/// a rerun finds the run it started before and a changed spec starts anew.
fn request_id(spec: &pb::RunSpec) -> String {
    let bytes = spec.encode_to_vec();
    // FNV-1a: stable across versions and machines.
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!(
        "experiment/{}/{hash:016x}",
        spec.name.replace([' ', '='], "-")
    )
}

/// A finished run saved by an earlier `ntctl experiment`: proto3 JSON, or
/// the spelling ntctl wrote before (respelled, so reruns keep their runs).
fn saved(path: &Path) -> Option<pb::Run> {
    let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    nt_proto::legacy::respell(&mut value, "nt.v1.Run").ok()?;
    let run: pb::Run = serde_json::from_value(value).ok()?;
    (run.state == pb::RunState::Succeeded as i32).then_some(run)
}

async fn run_one(
    client: &mut RunClient,
    spec: pb::RunSpec,
    path: &Path,
    output: OutputFormat,
) -> Result<pb::Run> {
    if let Some(run) = saved(path) {
        if output == OutputFormat::Text {
            eprintln!("{}: reusing {}", spec.name, path.display());
        }
        return Ok(run);
    }
    let id = request_id(&spec);
    let name = spec.name.clone();
    let run_id = submit_spec(client, spec, Some(id))
        .await?
        .run
        .unwrap_or_default()
        .run_id;
    if output == OutputFormat::Text {
        eprintln!("{name}: run {run_id}");
    }
    let mut display = Display::new(output);
    let run = nt_client::follow::follow(client, &run_id, |ev| display.event(ev)).await;
    display.finish();
    let run = run?;
    if run.state != pb::RunState::Succeeded as i32 {
        return Err(Exit::run_failed(format!(
            "{name}: run {run_id} ended {}: {}",
            nt_proto::enum_names::run_state::name(run.state).unwrap_or_default(),
            run.message
        )));
    }
    std::fs::write(path, serde_json::to_vec_pretty(&run)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(run)
}

pub async fn run(args: ExperimentArgs, connect: &ConnectArgs, output: OutputFormat) -> Result<()> {
    let overrides = SpecOverrides {
        set: args.set.clone(),
        ..SpecOverrides::default()
    };
    let base = load_spec(&args.spec, &overrides)?;
    if base
        .members
        .as_ref()
        .is_some_and(|m| !m.checkpoints.is_empty())
    {
        bail!("an experiment trains its members: remove members.checkpoints from the spec");
    }
    let mut counts: Vec<usize> = if args.members.is_empty() {
        let count = base.members.as_ref().map_or(0, |m| m.count);
        vec![if count == 0 {
            nt_spec::defaults::MEMBERS
        } else {
            count as usize
        }]
    } else {
        args.members.iter().map(|&k| k as usize).collect()
    };
    counts.sort_unstable();
    counts.dedup();
    if counts[0] < 2 || counts[counts.len() - 1] > nt_spec::plan::MAX_MEMBERS {
        bail!(
            "--members: each count must be between 2 and {}",
            nt_spec::plan::MAX_MEMBERS
        );
    }
    if args.seeds.is_empty() {
        bail!("--seeds: at least one seed");
    }
    let largest = counts[counts.len() - 1];
    let name = if base.name.is_empty() {
        args.spec
            .file_stem()
            .map_or("experiment".into(), |s| s.to_string_lossy().into_owned())
    } else {
        base.name.clone()
    };
    let runs_dir = args.out.join("runs");
    std::fs::create_dir_all(&runs_dir)
        .with_context(|| format!("creating {}", runs_dir.display()))?;

    let embedded = if args.embedded.local {
        Some(Embedded::start(&args.embedded).await?)
    } else {
        None
    };
    let endpoint = embedded.as_ref().map_or(connect, |e| &e.connect);
    let outcome = async {
        let mut client = nt_client::connect(endpoint).await?;
        let mut runs = Vec::new();
        for &seed in &args.seeds {
            let path = |k: usize| runs_dir.join(format!("K{k}-seed{seed}.json"));
            let first = run_one(
                &mut client,
                spec_for(&base, &name, seed, largest, None),
                &path(largest),
                output,
            )
            .await?;
            for &k in counts.iter().filter(|&&k| k < largest) {
                let spec = spec_for(&base, &name, seed, k, Some(&first));
                runs.push(run_one(&mut client, spec, &path(k), output).await?);
            }
            runs.push(first);
        }
        Ok::<_, anyhow::Error>(runs)
    }
    .await;
    if let Some(e) = embedded {
        e.stop().await;
    }
    let runs = outcome?;

    let summary = experiment::summarize(&name, &runs)?;
    let markdown = summary.markdown();
    std::fs::write(args.out.join("summary.md"), &markdown)?;
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    let plot = args.out.join("curves.png");
    summary.plot(&plot, 640, 480)?;
    match output {
        // The last of the JSON lines the progress events began.
        OutputFormat::Json => println!("{}", serde_json::to_string(&summary)?),
        OutputFormat::Text => {
            print!("{markdown}");
            println!(
                "summary in {}, curves in {}",
                args.out.join("summary.md").display(),
                plot.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_saved_before_and_after_proto3_json_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        // What ntctl saved before it wrote proto3 JSON.
        let old = dir.path().join("old.json");
        std::fs::write(
            &old,
            include_str!("../../../proto/tests/fixtures/legacy/get-succeeded.json"),
        )
        .unwrap();
        let run = saved(&old).unwrap();
        assert_eq!(run.report.as_ref().unwrap().fused.len(), 2);
        let new = dir.path().join("new.json");
        std::fs::write(&new, serde_json::to_vec_pretty(&run).unwrap()).unwrap();
        assert_eq!(saved(&new), Some(run));
        // A failed run is not reused.
        let failed = dir.path().join("failed.json");
        std::fs::write(
            &failed,
            include_str!("../../../proto/tests/fixtures/legacy/get-failed.json"),
        )
        .unwrap();
        assert_eq!(saved(&failed), None);
    }

    #[test]
    fn smaller_counts_fuse_the_first_members_of_the_largest() {
        let base = pb::RunSpec {
            name: "mlp".into(),
            members: Some(pb::Members {
                count: 8,
                seeds: vec![1, 2],
                ..Default::default()
            }),
            ..Default::default()
        };
        let trained = spec_for(&base, "mlp", 2, 4, None);
        let m = trained.members.as_ref().unwrap();
        assert_eq!(m.count, 4);
        assert_eq!(m.seeds, [2000, 2001, 2002, 2003]);
        assert_eq!(trained.fine_tuning.unwrap().seed, Some(2999));
        let run = pb::Run {
            report: Some(pb::RunReport {
                members: (0..4)
                    .map(|i| pb::ModelReport {
                        checkpoint: format!("runs/r/members/{i}.safetensors"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let fused = spec_for(&base, "mlp", 2, 2, Some(&run));
        let m = fused.members.as_ref().unwrap();
        assert_eq!((m.count, m.seeds.len()), (0, 0));
        assert_eq!(
            m.checkpoints,
            [
                "runs/r/members/0.safetensors",
                "runs/r/members/1.safetensors"
            ]
        );
        assert_eq!(fused.name, "mlp K=2 seed=2");
        // Same spec, same request id; another seed, another.
        assert_eq!(request_id(&fused), request_id(&fused.clone()));
        assert_ne!(
            request_id(&fused),
            request_id(&spec_for(&base, "mlp", 3, 2, Some(&run)))
        );
    }
}
