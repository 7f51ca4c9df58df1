//! `ntctl train --members K`: a fresh ensemble of K members, trained as one
//! batched computation (falling back to one after another, with the
//! reason, when they cannot), each stored as `member-<k>.safetensors`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;

use nt_runtime::job::{
    run_joint_training, run_training, JobHooks, JointJob, LocalFiles, Provenance, Start, Started,
    TrainJob, Trained,
};
use nt_runtime::train::Progress;
use nt_runtime::RuntimeError;

use super::train::{key, train_config, CliHooks, TrainArgs, TrainReport, EVAL_BATCH};
use crate::output::{print_json, OutputFormat};

/// What `--output json` prints.
#[derive(Serialize)]
struct MembersReport<'a> {
    /// Whether the members were trained jointly.
    joint: bool,
    /// Why they were not, when joint training was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback: Option<String>,
    /// Training samples per second of all members together.
    samples_per_second: f64,
    members: Vec<TrainReport<'a>>,
}

/// Prints each member's epochs, prefixed with the member.
struct MemberHooks {
    inner: CliHooks,
    members: usize,
}

impl JobHooks for MemberHooks {
    fn started(&mut self, start: &Started<'_>) {
        self.inner.started(start);
        if self.inner.output == OutputFormat::Text {
            println!("{} members, trained jointly", self.members);
        }
    }

    fn part_progress(&mut self, part: usize, progress: &Progress) {
        if progress.epoch_end.is_some() && self.inner.output == OutputFormat::Text {
            print!("member {part}  ");
        }
        self.inner.progress(progress);
    }
}

pub fn run(args: TrainArgs, output: OutputFormat) -> Result<()> {
    let members = args.members.unwrap_or(2) as usize;
    if args.init.is_some() || !args.distill.is_empty() {
        bail!("--members trains a fresh ensemble: it takes --arch, not --init or --distill");
    }
    let Some(arch) = args.arch.as_deref() else {
        bail!("say what to train: --arch (a preset or spec file)");
    };
    let arch = fusion::arch::resolve(arch)?;
    let device = args.data.device()?;
    let data = args.data.spec()?;
    let dir = &args.output_file;
    if dir.is_file() {
        bail!(
            "with --members, -o names a folder for member-0.safetensors, ...; {} is a file",
            dir.display()
        );
    }
    let part = |k: usize| TrainJob {
        start: Start::Fresh(arch.clone()),
        teachers: Vec::new(),
        config: nt_spec::TrainConfig {
            seed: args.seed + k as u64,
            ..train_config(&args, false)
        },
        data: data.clone(),
        device,
        eval_batch: EVAL_BATCH,
        resume: None,
        epoch_states: None,
        output: key(&dir.join(format!("member-{k}.safetensors"))),
        provenance: Provenance::Offline {
            notes: BTreeMap::from([
                ("data".to_string(), args.data.data.clone()),
                ("epochs".to_string(), args.epochs.to_string()),
                ("member".to_string(), format!("{k} of {members}")),
            ]),
        },
    };
    let parts: Vec<TrainJob> = (0..members).map(part).collect();
    let mut hooks = MemberHooks {
        inner: CliHooks { output },
        members,
    };
    let started = std::time::Instant::now();
    let mut fallback = None;
    let trained: Vec<Trained> = if args.joint == "on" {
        let job = JointJob {
            parts: parts.clone(),
            resume: args.resume.as_deref().map(key),
            epoch_states: args.checkpoint_dir.as_deref().map(key),
        };
        match run_joint_training(&job, &LocalFiles, &mut hooks) {
            Ok(done) => done,
            Err(RuntimeError::NotJoint(why)) => {
                if output == OutputFormat::Text {
                    println!("training the members one after another: {why}");
                }
                fallback = Some(why);
                one_by_one(&parts, &args, &mut hooks.inner)?
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        one_by_one(&parts, &args, &mut hooks.inner)?
    };
    let seconds = started.elapsed().as_secs_f64();
    let joint = args.joint == "on" && fallback.is_none();
    let samples_per_second = aggregate(&trained, joint);
    match output {
        OutputFormat::Json => print_json(&MembersReport {
            joint,
            fallback,
            samples_per_second,
            members: trained
                .iter()
                .map(|t| TrainReport {
                    output: t.key.clone(),
                    arch: t.arch.name().to_string(),
                    parameters: t.arch.parameter_count(),
                    device: format!("{device:?}"),
                    test: t.after,
                    outcome: &t.outcome,
                    data: t.data.clone(),
                })
                .collect(),
        })?,
        OutputFormat::Text => {
            for (k, t) in trained.iter().enumerate() {
                println!(
                    "member {k}: test accuracy {:.2}%  loss {:.4} -> {}",
                    100.0 * t.after.accuracy,
                    t.after.loss,
                    t.key
                );
            }
            println!(
                "{members} members in {seconds:.1} s ({}; {samples_per_second:.0} training samples/s together)",
                if joint {
                    "jointly"
                } else {
                    "one after another"
                },
            );
        }
    }
    Ok(())
}

/// Training samples per second of all members together: jointly, the sum
/// of their shares; one after another, all samples over the summed times.
fn aggregate(trained: &[Trained], joint: bool) -> f64 {
    let rates = trained.iter().map(|t| t.outcome.samples_per_second);
    if joint {
        rates.sum()
    } else {
        trained.len() as f64 / rates.map(|r| 1.0 / r.max(1e-9)).sum::<f64>().max(1e-9)
    }
}

/// The members one after another; each resumable in its own folder.
fn one_by_one(parts: &[TrainJob], args: &TrainArgs, hooks: &mut CliHooks) -> Result<Vec<Trained>> {
    if args.resume.is_some() {
        bail!("--resume continues a joint training; one after another, train again without it");
    }
    parts
        .iter()
        .enumerate()
        .map(|(k, part)| {
            let part = TrainJob {
                epoch_states: args
                    .checkpoint_dir
                    .as_deref()
                    .map(|d| key(&d.join(format!("member-{k}")))),
                ..part.clone()
            };
            if hooks.output == OutputFormat::Text {
                println!("member {k}:");
            }
            Ok(run_training(&part, &LocalFiles, hooks)?)
        })
        .collect()
}
