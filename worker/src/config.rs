//! The worker's configuration: every flag also reads an `NT_…` variable.

use clap::Parser;
use nt_common::telemetry::LogFormat;
use nt_common::tls::ClientTlsArgs;
use nt_common::StorageArgs;

/// `nt-worker`: leases and runs training, fine-tuning and evaluation tasks.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "nt-worker",
    version,
    about = "nt worker: trains, fine-tunes and evaluates on CPU or GPU"
)]
pub struct WorkerArgs {
    /// The coordinator's gRPC address (https:// for TLS).
    #[arg(long, env = "NT_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    /// Bearer token for the worker service.
    #[arg(
        long,
        env = "NT_WORKER_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub worker_token: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// A name for logs and worker ids.
    #[arg(long, env = "NT_WORKER_NAME", default_value = "worker")]
    pub name: String,
    /// Tasks run at once (several small members can share one GPU).
    #[arg(long, env = "NT_SLOTS", default_value_t = 1)]
    pub slots: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "NT_DEVICE", default_value = "auto")]
    pub device: String,
    /// libtorch CPU threads per task (default: all cores).
    #[arg(long, env = "NT_THREADS")]
    pub threads: Option<usize>,
    /// On SIGTERM, how long running tasks may take to finish before they are released.
    #[arg(long, env = "NT_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Serve /healthz and /metrics on this address (empty: off).
    #[arg(long, env = "NT_HEALTH_LISTEN", default_value = "")]
    pub health_listen: String,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// The only folders a run's local `data.path` may name (comma-separated;
    /// subfolders included, symlinks resolved). A client must not make a
    /// worker read arbitrary files. Data in the store (`store:<prefix>`) is
    /// always allowed.
    #[arg(
        long = "data-dir",
        env = "NT_DATA_DIRS",
        value_delimiter = ',',
        default_value = nt_spec::defaults::DATASETS_DIR
    )]
    pub data_dirs: Vec<std::path::PathBuf>,
    /// Log format.
    #[arg(long, env = "NT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}
