//! The coordinator's configuration: every flag also reads an `NT_…` variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use nt_common::telemetry::LogFormat;
use nt_common::tls::ServerTlsArgs;
use nt_common::StorageArgs;
use nt_spec::Limits;

use crate::coordinator::transfer::TransferConfig;
use crate::coordinator::CoordinatorConfig;

/// Scheduler timings.
#[derive(Args, Clone, Debug)]
pub struct SchedulerArgs {
    /// A lease expires this long after its last heartbeat or progress report.
    #[arg(long, env = "NT_LEASE_TTL_MS", default_value_t = 30_000)]
    pub lease_ttl_ms: u64,
    /// How often workers heartbeat.
    #[arg(long, env = "NT_HEARTBEAT_INTERVAL_MS", default_value_t = 5_000)]
    pub heartbeat_interval_ms: u64,
    /// The store lease's time to live: one coordinator per store. A second
    /// one waits this long before taking over from a holder that stopped
    /// renewing (a crashed coordinator), and is refused if it renews.
    #[arg(long, env = "NT_STORE_LEASE_TTL_MS", default_value_t = 15_000)]
    pub store_lease_ttl_ms: u64,
    /// Device memory, in bytes, that a joint task may be estimated to take:
    /// with `members.joint: auto` (the default) a GPU run's members, and
    /// later its fine-tunings, train as one task when they fit it.
    #[arg(long, env = "NT_JOINT_MEMORY_BUDGET", default_value_t = CoordinatorConfig::default().joint_memory_budget)]
    pub joint_memory_budget: u64,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Ceilings on what one run may ask of the workers, checked at submission.
#[derive(Args, Clone, Debug)]
pub struct LimitArgs {
    /// Most trainable parameters of a run's architecture.
    #[arg(long, env = "NT_MAX_PARAMETERS", default_value_t = Limits::default().max_parameters)]
    pub max_parameters: u64,
    /// Most estimated activation memory of one training or evaluation batch, in bytes.
    #[arg(long, env = "NT_MAX_ACTIVATION_BYTES", default_value_t = Limits::default().max_activation_bytes)]
    pub max_activation_bytes: u64,
    /// Most members of a run.
    #[arg(long, env = "NT_MAX_MEMBERS", default_value_t = Limits::default().max_members)]
    pub max_members: usize,
    /// Most epochs of one training or fine-tuning.
    #[arg(long, env = "NT_MAX_EPOCHS", default_value_t = Limits::default().max_epochs)]
    pub max_epochs: usize,
    /// Most bytes of a generated data set (both splits).
    #[arg(long, env = "NT_MAX_DATA_BYTES", default_value_t = Limits::default().max_data_bytes)]
    pub max_data_bytes: u64,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_parameters: self.max_parameters,
            max_activation_bytes: self.max_activation_bytes,
            max_members: self.max_members,
            max_epochs: self.max_epochs,
            max_data_bytes: self.max_data_bytes,
        }
    }
}

impl SchedulerArgs {
    pub fn config(&self) -> CoordinatorConfig {
        CoordinatorConfig {
            lease_ttl: Duration::from_millis(self.lease_ttl_ms.max(100)),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms.max(50)),
            limits: self.limits.limits(),
            store_lease_ttl: Duration::from_millis(self.store_lease_ttl_ms.max(300)),
            joint_memory_budget: self.joint_memory_budget,
            ..CoordinatorConfig::default()
        }
    }
}

/// Checkpoints uploaded through the service (`UploadCheckpoint`).
#[derive(Args, Clone, Debug)]
pub struct TransferArgs {
    /// Largest checkpoint one upload may carry, in bytes.
    #[arg(long, env = "NT_MAX_UPLOAD_BYTES", default_value_t = TransferConfig::default().max_upload_bytes)]
    pub max_upload_bytes: u64,
    /// Folder for the temporary files of large uploads that declare no
    /// SHA-256 (removed when the upload ends); default: the system's
    /// temporary folder ($TMPDIR, else /tmp).
    #[arg(long, env = "NT_UPLOAD_DIR")]
    pub upload_dir: Option<PathBuf>,
    /// Uploads received at once; more wait their turn.
    #[arg(long, env = "NT_MAX_CONCURRENT_UPLOADS", default_value_t = TransferConfig::default().max_concurrent_uploads)]
    pub max_concurrent_uploads: usize,
}

impl TransferArgs {
    pub fn config(&self) -> TransferConfig {
        let default = TransferConfig::default();
        TransferConfig {
            max_upload_bytes: self.max_upload_bytes,
            upload_dir: self.upload_dir.clone().unwrap_or(default.upload_dir),
            max_concurrent_uploads: self.max_concurrent_uploads.max(1),
        }
    }
}

/// `nt-server`: the coordinator.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "nt-server",
    version,
    about = "nt coordinator: runs, scheduling, fusion"
)]
pub struct ServerArgs {
    /// gRPC address.
    #[arg(long, env = "NT_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: String,
    /// Prometheus /metrics address (empty: off).
    #[arg(long, env = "NT_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,
    /// Bearer token clients must send (empty: no authentication).
    #[arg(
        long,
        env = "NT_CLIENT_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub client_token: String,
    /// Bearer token workers must send (empty: no authentication).
    #[arg(
        long,
        env = "NT_WORKER_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub worker_token: String,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "NT_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    #[command(flatten)]
    pub transfer: TransferArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Log format.
    #[arg(long, env = "NT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}
