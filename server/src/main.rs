//! `nt-server`: the coordinator binary.

use anyhow::{Context, Result};
use clap::Parser;
use tokio_util::sync::CancellationToken;

use nt_server::ServerArgs;

/// Counted, so a run's report can state each fusion's peak memory.
#[global_allocator]
static ALLOCATOR: fusion::heap::Counting<mimalloc::MiMalloc> =
    fusion::heap::Counting(mimalloc::MiMalloc);

#[tokio::main]
async fn main() -> Result<()> {
    let args = ServerArgs::parse();
    nt_common::telemetry::init(args.log_format);
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    // The store first (its lease, the stored runs), then the ports: a port
    // that accepts connections belongs to a coordinator ready to serve.
    let coordinator = nt_server::start_coordinator(&args, shutdown.clone()).await?;
    let bound = async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let metrics_listener = if args.metrics_listen.is_empty() {
            None
        } else {
            Some(
                tokio::net::TcpListener::bind(&args.metrics_listen)
                    .await
                    .with_context(|| format!("binding {}", args.metrics_listen))?,
            )
        };
        anyhow::Ok((listener, metrics_listener))
    }
    .await;
    let (listener, metrics_listener) = match bound {
        Ok(b) => b,
        Err(e) => {
            // Released, so the next start does not wait for the lease.
            coordinator.close().await;
            return Err(e);
        }
    };
    let served = nt_server::serve(
        &args,
        coordinator.clone(),
        listener,
        metrics_listener,
        shutdown,
    )
    .await;
    coordinator.close().await;
    // A coordinator that lost the store to another exits with an error, so
    // an orchestrator sees it.
    if let Some(why) = coordinator.lease_lost() {
        anyhow::bail!("{why}");
    }
    served
}

/// SIGTERM or SIGINT start a graceful shutdown.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        shutdown.cancel();
    });
}
