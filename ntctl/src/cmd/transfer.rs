//! The verbs that move checkpoints through a coordinator, with a token and
//! no store credentials: `upload` (and the uploads `submit` makes for
//! member checkpoints that are local files) and `download`. The transfers
//! themselves are `nt_client::transfer`'s; this adds progress bars on
//! stderr and the output.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nt_client::transfer::{self, UploadOptions};
use nt_client::{pb, ConnectArgs, RunClient};
use serde::Serialize;

use crate::output::{print_json, OutputFormat};

/// A byte progress bar on stderr, drawn only on a terminal.
fn bar(label: String, total: u64) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label);
    bar
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Uploads one file, with a progress bar and a closing line on stderr.
pub async fn upload_one(
    client: &mut RunClient,
    path: &Path,
    options: &UploadOptions,
) -> Result<pb::UploadCheckpointResponse> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let progress = bar(format!("uploading {}", path.display()), size);
    let started = Instant::now();
    let shown = progress.clone();
    let stored = transfer::upload_file(client, path, options, move |sent, _| {
        shown.set_position(sent)
    })
    .await;
    progress.finish_and_clear();
    let stored = stored.with_context(|| format!("uploading {}", path.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "uploaded {} as {} ({}, {:.0} MB/s{})",
        path.display(),
        stored.key,
        megabytes(stored.size),
        stored.size as f64 / 1e6 / seconds.max(1e-9),
        if stored.created {
            ""
        } else {
            "; the store held these bytes already"
        }
    );
    Ok(stored)
}

/// Uploads the member checkpoints of `spec` that are local files (checked
/// against the spec's architecture on the way) and names their keys
/// instead, so a spec written for `run --local` can be submitted as it is.
pub async fn upload_local_members(client: &mut RunClient, spec: &mut pb::RunSpec) -> Result<()> {
    let architecture = spec.architecture.clone();
    let Some(members) = spec.members.as_mut() else {
        return Ok(());
    };
    let options = UploadOptions {
        architecture,
        ..UploadOptions::default()
    };
    for (i, c) in members.checkpoints.iter_mut().enumerate() {
        let path = Path::new(c.as_str());
        if c.starts_with("store:") || c.contains("://") || !path.is_file() {
            continue;
        }
        if fusion::checkpoint::is_index(c) {
            bail!(
                "member checkpoint `{c}` is a sharded checkpoint: uploads take single files; \
                 put its index and shards into the service's store and name the index's key, \
                 or run the spec with `ntctl run --local`"
            );
        }
        let stored = upload_one(client, path, &options)
            .await
            .with_context(|| format!("members.checkpoints[{i}]"))?;
        *c = stored.key;
    }
    Ok(())
}

#[derive(Args)]
pub struct UploadArgs {
    /// Safetensors checkpoints to upload.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Check the tensors against this architecture: a preset (`ntctl arch
    /// list`) or a spec file (default: the one a file records, if any).
    #[arg(long)]
    arch: Option<String>,
}

#[derive(Serialize)]
struct UploadLine {
    file: String,
    #[serde(flatten)]
    stored: pb::UploadCheckpointResponse,
}

pub async fn upload(
    args: UploadArgs,
    connect_args: &ConnectArgs,
    output: OutputFormat,
) -> Result<()> {
    let options = UploadOptions {
        architecture: args
            .arch
            .as_deref()
            .map(transfer::architecture)
            .transpose()?,
        ..UploadOptions::default()
    };
    let mut client = nt_client::connect(connect_args).await?;
    let mut lines = Vec::with_capacity(args.files.len());
    for file in &args.files {
        let stored = upload_one(&mut client, file, &options).await?;
        if output == OutputFormat::Text {
            println!("{}  {}", stored.key, file.display());
        }
        lines.push(UploadLine {
            file: file.display().to_string(),
            stored,
        });
    }
    if output == OutputFormat::Json {
        print_json(&lines)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct DownloadArgs {
    /// The run id.
    run: String,
    /// What to download, comma-separated: a fusion method (`nt`: its model
    /// after fine-tuning), fine-tuned/<method>[-distilled], fused/<method>,
    /// member/<i>, baseline, report, or all (every one of a succeeded run).
    /// Default: the first fusion method's model after fine-tuning.
    #[arg(long, value_delimiter = ',')]
    model: Vec<String>,
    /// The folder to write into (default: ./<run id>).
    #[arg(short = 'o', long = "out", value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct DownloadLine {
    model: String,
    key: String,
    path: String,
    size: u64,
    sha256: String,
}

pub async fn download(
    args: DownloadArgs,
    connect_args: &ConnectArgs,
    output: OutputFormat,
) -> Result<()> {
    let mut client = nt_client::connect(connect_args).await?;
    let mut models = if args.model.is_empty() {
        vec![String::new()]
    } else {
        args.model.clone()
    };
    if models.iter().any(|m| m == "all") {
        let run = client
            .get_run(pb::GetRunRequest {
                run_id: args.run.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("reading run {}: {}", args.run, nt_client::explain(&s)))?
            .into_inner();
        models = transfer::models_of(&run);
        if models.is_empty() {
            bail!(
                "run {} has not succeeded: --model all lists a finished run's models; name the ones to download",
                args.run
            );
        }
    }
    let dir = args.out.unwrap_or_else(|| PathBuf::from(&args.run));
    let mut lines = Vec::with_capacity(models.len());
    for model in &models {
        let label = if model.is_empty() { "the model" } else { model };
        let progress = bar(format!("downloading {label}"), 0);
        let shown = progress.clone();
        let got = transfer::download(&mut client, &args.run, model, &dir, |done, total| {
            shown.set_length(total);
            shown.set_position(done);
        })
        .await;
        progress.finish_and_clear();
        let got = got.with_context(|| format!("downloading {label} of run {}", args.run))?;
        if output == OutputFormat::Text {
            println!(
                "wrote {} ({}, {}, sha256 {})",
                got.path.display(),
                got.info.model,
                megabytes(got.info.size),
                got.sha256
            );
        }
        lines.push(DownloadLine {
            model: got.info.model,
            key: got.info.key,
            path: got.path.display().to_string(),
            size: got.info.size,
            sha256: got.sha256,
        });
    }
    if output == OutputFormat::Json {
        print_json(&lines)?;
    }
    Ok(())
}
