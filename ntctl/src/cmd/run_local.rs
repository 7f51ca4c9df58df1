//! `ntctl run`: submit a spec and follow it to its end. With `--local`, the
//! embedded default: a coordinator and a worker in this process, talking
//! gRPC over loopback, with the local filesystem as the object store, so
//! nothing needs to be installed or started.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};
use nt_client::{pb, ConnectArgs};
use tokio_util::sync::CancellationToken;

use super::remote::{load_spec, submit_spec, wait_and_report, Gates, SpecOverrides};
use crate::output::{Exit, OutputFormat};

#[derive(Args)]
pub struct RunArgs {
    /// The run spec (YAML).
    spec: PathBuf,
    #[command(flatten)]
    embedded: LocalArgs,
    #[command(flatten)]
    overrides: SpecOverrides,
    /// Idempotency key.
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    gates: Gates,
    /// Write the fine-tuning curves as a PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// The embedded service's settings (`run --local`, `experiment --local`).
#[derive(Args, Clone, Debug)]
pub struct LocalArgs {
    /// Run here: in-process coordinator and worker, local store.
    #[arg(long)]
    pub local: bool,
    /// With --local: the store folder (runs, checkpoints, reports).
    #[arg(long, default_value = "nt-data", env = "NT_LOCAL_STORE")]
    pub store: PathBuf,
    /// With --local: tasks at once.
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    /// With --local: the worker's device (auto, cpu, cuda or cuda:N).
    #[arg(long, default_value = "auto", env = "NT_DEVICE")]
    pub worker_device: String,
    /// With --local: libtorch CPU threads per task (default: all cores).
    #[arg(long, env = "NT_THREADS")]
    pub threads: Option<usize>,
    /// With --local: show the coordinator's and worker's logs.
    #[arg(long)]
    pub verbose: bool,
}

/// A coordinator and a worker in this process, serving gRPC on loopback
/// with a folder as the object store.
pub struct Embedded {
    /// How to reach its coordinator.
    pub connect: ConnectArgs,
    /// The store folder (absolute).
    pub store: PathBuf,
    shutdown: CancellationToken,
    worker_shutdown: CancellationToken,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    coordinator: std::sync::Arc<nt_server::coordinator::Coordinator>,
}

impl Embedded {
    pub async fn start(args: &LocalArgs) -> Result<Embedded> {
        if args.verbose {
            nt_common::telemetry::init(nt_common::telemetry::LogFormat::Text);
        }
        std::fs::create_dir_all(&args.store)
            .with_context(|| format!("creating {}", args.store.display()))?;
        let store = std::fs::canonicalize(&args.store)?;
        let store_url = format!("--store=file://{}", store.display());

        let shutdown = CancellationToken::new();
        let server_args = nt_server::ServerArgs::try_parse_from([
            "nt-server",
            store_url.as_str(),
            "--metrics-listen=",
        ])?;
        let coordinator = nt_server::start_coordinator(&server_args, shutdown.clone()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            let coordinator = coordinator.clone();
            async move { nt_server::serve(&server_args, coordinator, listener, None, shutdown).await }
        });
        let mut worker_flags = vec![
            "nt-worker".to_string(),
            format!("--coordinator=http://127.0.0.1:{port}"),
            store_url.clone(),
            format!("--device={}", args.worker_device),
            format!("--slots={}", args.slots),
            "--name=local".into(),
            "--shutdown-grace-secs=0".into(),
            // The embedded worker reads the user's own files for the user: any
            // folder. (A shared worker restricts data.path to its --data-dir.)
            "--data-dir=/".into(),
        ];
        if let Some(t) = args.threads {
            worker_flags.push(format!("--threads={t}"));
        }
        let worker = nt_worker::Worker::new(nt_worker::WorkerArgs::try_parse_from(worker_flags)?)?;
        // The worker stops first and reports to a coordinator still serving;
        // stopped together, it would retry its last report for minutes.
        let worker_shutdown = CancellationToken::new();
        let worker = tokio::spawn(worker.run(worker_shutdown.clone()));
        Ok(Embedded {
            connect: ConnectArgs {
                endpoint: format!("http://127.0.0.1:{port}"),
                ..ConnectArgs::default()
            },
            store,
            shutdown,
            worker_shutdown,
            worker,
            server,
            coordinator,
        })
    }

    /// Stops the worker, then the coordinator, and releases the store, so
    /// the next `--local` command on it starts at once.
    pub async fn stop(self) {
        self.worker_shutdown.cancel();
        let _ = self.worker.await;
        self.shutdown.cancel();
        let _ = self.server.await;
        self.coordinator.close().await;
    }
}

/// Copies member checkpoints given as local files into the store (`uploads/`).
fn upload_local_members(spec: &mut pb::RunSpec, store: &Path) -> Result<()> {
    let Some(members) = spec.members.as_mut() else {
        return Ok(());
    };
    for c in &mut members.checkpoints {
        let path = Path::new(c.as_str());
        if c.starts_with("store:") || !path.is_file() {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("`{c}` has no file name"))?;
        let key = format!("uploads/{name}");
        let dest = store.join(&key);
        std::fs::create_dir_all(store.join("uploads"))?;
        std::fs::copy(path, &dest)
            .with_context(|| format!("copying {} into the store", path.display()))?;
        *c = key;
    }
    let keys: std::collections::HashSet<_> = members.checkpoints.iter().collect();
    if keys.len() != members.checkpoints.len() {
        bail!("two member checkpoints have the same file name; rename one");
    }
    Ok(())
}

pub async fn run(args: RunArgs, connect: &ConnectArgs, output: OutputFormat) -> Result<()> {
    let mut spec = load_spec(&args.spec, &args.overrides)?;
    if !args.embedded.local {
        let mut client = nt_client::connect(connect).await?;
        let run_id = submit_spec(&mut client, spec, args.request_id)
            .await?
            .run
            .unwrap_or_default()
            .run_id;
        return wait_and_report(
            &mut client,
            &run_id,
            output,
            &args.gates,
            args.plot.as_deref(),
        )
        .await;
    }

    upload_local_members(&mut spec, &args.embedded.store)?;
    let embedded = Embedded::start(&args.embedded).await?;
    let store = embedded.store.clone();
    let interrupted = CancellationToken::new();
    tokio::spawn({
        let interrupted = interrupted.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.cancel();
            }
        }
    });

    let outcome = async {
        let mut client = nt_client::connect(&embedded.connect).await?;
        // Not raced with Ctrl-C: a run stored while we stopped waiting would
        // resume unseen next time. An interrupt during it is handled below.
        let submitted = submit_spec(&mut client, spec, args.request_id.clone()).await?;
        let run_id = submitted.run.unwrap_or_default().run_id;
        if output == OutputFormat::Text {
            eprintln!("run {run_id} (store {})", store.display());
        }
        tokio::select! {
            r = wait_and_report(&mut client, &run_id, output, &args.gates, args.plot.as_deref()) => r,
            _ = interrupted.cancelled() => {
                // With a request id the same command finds this run again and
                // the coordinator carries on from its checkpoints; without
                // one it would start a new run beside this one, so stop it.
                match &args.request_id {
                    Some(id) => Err(Exit::interrupted(format!(
                        "interrupted: run {run_id} stays in {}; the same command \
                         (--request-id {id}) continues it",
                        store.display()
                    ))),
                    None => {
                        client
                            .cancel_run(pb::CancelRunRequest {
                                run_id: run_id.clone(),
                                reason: "interrupted (ctrl-c)".into(),
                            })
                            .await
                            .with_context(|| format!("cancelling run {run_id}"))?;
                        Err(Exit::interrupted(format!(
                            "interrupted: run {run_id} cancelled; give --request-id to \
                             be able to continue an interrupted run"
                        )))
                    }
                }
            }
        }
    }
    .await;
    embedded.stop().await;
    outcome
}
