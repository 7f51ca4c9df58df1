//! `nt-worker`: the worker binary.

use anyhow::Result;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use nt_worker::{Worker, WorkerArgs};

/// mimalloc also serves libtorch's allocations (see ntctl's main).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    let args = WorkerArgs::parse();
    nt_common::telemetry::init(args.log_format);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: no new tasks");
        signal.cancel();
    });
    let health = if args.health_listen.is_empty() {
        None
    } else {
        Some(tokio::net::TcpListener::bind(&args.health_listen).await?)
    };
    let worker = Worker::new(args)?;
    if let Some(l) = health {
        tokio::spawn(nt_worker::metrics::serve(
            worker.metrics.clone(),
            l,
            shutdown.clone(),
        ));
    }
    worker.run(shutdown).await
}
