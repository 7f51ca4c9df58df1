//! nt's coordinator. [`serve`] runs it on a bound listener until a
//! cancellation token fires, so tests and the embedded mode can start it on
//! port 0 and stop it cleanly.

pub mod config;
pub mod coordinator;
pub mod error;
pub mod grpc;
pub mod metrics;

use std::sync::Arc;

use anyhow::Result;
use nt_common::Storage;
use nt_proto::tonic::transport::Server;
use nt_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

pub use config::ServerArgs;
use coordinator::transfer::Transfers;
use coordinator::Coordinator;
use metrics::Metrics;

/// Starts the coordinator (loading stored runs) without serving it.
pub async fn start_coordinator(
    args: &ServerArgs,
    shutdown: CancellationToken,
) -> Result<Arc<Coordinator>> {
    let storage = Storage::open(&args.storage)?;
    tracing::info!(store = %storage.url, "opening the store");
    Coordinator::start(storage, args.scheduler.config(), Metrics::new(), shutdown).await
}

/// Serves the gRPC API (and health and reflection) on `listener`, and the
/// metrics on `metrics_listener`, until `shutdown`.
pub async fn serve(
    args: &ServerArgs,
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<()> {
    // Each nt service sits behind one layer: timing, then the bearer token,
    // then tonic's decoding (OUT_OF_RANGE over --max-message-bytes).
    let rpc_duration = coordinator.metrics().rpc_duration.clone();
    let transfers = Arc::new(Transfers::new(coordinator.clone(), args.transfer.config())?);
    let run_service = grpc::layer::guard(
        pb::run_service_server::RunServiceServer::new(grpc::RunService {
            coordinator: coordinator.clone(),
            transfers,
            shutdown: shutdown.clone(),
        })
        .max_decoding_message_size(args.max_message_bytes),
        &args.client_token,
        "client",
        grpc::RUN_METHODS,
        rpc_duration.clone(),
    );
    let worker_service = grpc::layer::guard(
        pb::worker_service_server::WorkerServiceServer::new(grpc::WorkerService {
            coordinator: coordinator.clone(),
        })
        .max_decoding_message_size(args.max_message_bytes),
        &args.worker_token,
        "worker",
        grpc::WORKER_METHODS,
        rpc_duration,
    );
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::run_service_server::RunServiceServer<grpc::RunService>>()
        .await;
    health_reporter
        .set_serving::<pb::worker_service_server::WorkerServiceServer<grpc::WorkerService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    if let Some(l) = metrics_listener {
        let c = coordinator.clone();
        tokio::spawn(metrics::serve(
            coordinator.metrics().clone(),
            l,
            move || c.store_error(),
            shutdown.clone(),
        ));
    }
    // Checkpoints stream through UploadCheckpoint in 1 MiB messages: windows
    // of several messages keep a client from waiting for WINDOW_UPDATEs,
    // and frames of a whole message save framing (what a connection may
    // hold unread is bounded by the windows).
    let mut builder = Server::builder()
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(2 * HTTP2_STREAM_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME);
    if let Some(tls) = args.tls.config()? {
        builder = builder.tls_config(tls)?;
    }
    tracing::info!(addr = %listener.local_addr()?, "serving");
    // Replies of several segments (GetRun) must not wait for the client's
    // delayed ACK: Nagle off on every connection (a 40 ms floor otherwise).
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            let _ = stream.set_nodelay(true);
        }
        conn
    });
    let health_shutdown = health_reporter.clone();
    let drain_deadline = shutdown.clone();
    let serving = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(run_service)
        .add_service(worker_service)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.cancelled().await;
            // Draining: every service, and the server as a whole, stops serving.
            health_shutdown
                .set_not_serving::<pb::run_service_server::RunServiceServer<grpc::RunService>>()
                .await;
            health_shutdown
                .set_not_serving::<pb::worker_service_server::WorkerServiceServer<grpc::WorkerService>>()
                .await;
            health_shutdown
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        });
    // Graceful shutdown waits for every connection; a client holding a
    // stream open (a health watch, say) must not keep the process alive.
    // Past the limit `serve` returns; nt-server then exits, closing them.
    tokio::select! {
        r = serving => r?,
        _ = async {
            drain_deadline.cancelled().await;
            tokio::time::sleep(DRAIN_LIMIT).await;
        } => tracing::warn!(
            seconds = DRAIN_LIMIT.as_secs(),
            "connections still open after shutdown; no longer waiting for them"
        ),
    }
    Ok(())
}

/// HTTP/2 flow-control window of one call, in bytes (the connection's is twice it).
const HTTP2_STREAM_WINDOW: u32 = 8 << 20;
/// Largest HTTP/2 frame the server accepts: one upload message and its framing.
const HTTP2_MAX_FRAME: u32 = (1 << 20) + 1024;

/// How long a shutdown waits for open connections.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
