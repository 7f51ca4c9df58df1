//! The coordinator's contracts: the client-facing [`RunApi`], the
//! worker-facing [`WorkerApi`] and the scheduler's timings. The gRPC
//! adapters, the tests and the embedded mode call the coordinator through
//! these traits.

use std::time::Duration;

use nt_proto::v1 as pb;
use tokio::sync::broadcast;

use crate::error::Result;

/// Timings of the scheduler.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// A lease expires this long after its last heartbeat or progress report.
    pub lease_ttl: Duration,
    /// How often workers are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// The longest a LeaseTask call waits for work.
    pub max_lease_wait: Duration,
    /// How often expired leases are looked for.
    pub sweep_interval: Duration,
    /// How long a task whose lease could not be stored waits before it is
    /// offered again (doubling with each failure, up to 30 s).
    pub lease_retry_backoff: Duration,
    /// What one run may ask of the workers.
    pub limits: nt_spec::Limits,
    /// How long the store lease lives without a renewal: a second
    /// coordinator waits this long before taking over from a silent one.
    pub store_lease_ttl: Duration,
    /// The device memory, in bytes, a joint task may be estimated to take
    /// ([`nt_spec::joint::memory_bytes`]): with `members.joint: auto`, a GPU
    /// run's members (and its fine-tunings) train as one task when they fit.
    pub joint_memory_budget: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            max_lease_wait: Duration::from_secs(20),
            sweep_interval: Duration::from_millis(500),
            lease_retry_backoff: Duration::from_secs(1),
            limits: nt_spec::Limits::default(),
            store_lease_ttl: Duration::from_secs(15),
            joint_memory_budget: 16 << 30,
        }
    }
}

/// The client-facing operations (the `RunService` contract).
#[allow(async_fn_in_trait)]
pub trait RunApi {
    /// Validates and stores a run. A request id used before returns that run
    /// (`created` false) without validating again.
    async fn submit(&self, spec: pb::RunSpec, request_id: String) -> Result<(pb::Run, bool)>;
    async fn get(&self, run_id: &str) -> Result<pb::Run>;
    /// Newest first; `page_token` is the last run id of the previous page.
    async fn list(
        &self,
        page_size: usize,
        page_token: &str,
        state: pb::RunState,
    ) -> Result<(Vec<pb::Run>, String)>;
    /// Past events after `after_sequence`, and a receiver of the live ones
    /// (none once the run is final).
    async fn watch(
        &self,
        run_id: &str,
        after_sequence: u64,
    ) -> Result<(Vec<pb::RunEvent>, Option<broadcast::Receiver<pb::RunEvent>>)>;
    async fn cancel(&self, run_id: &str, reason: &str) -> Result<pb::Run>;
}

/// The worker-facing operations (the `WorkerService` contract).
#[allow(async_fn_in_trait)]
pub trait WorkerApi {
    /// Registers a worker. `previous` is the id it had before this
    /// coordinator forgot it (empty for a new worker): it keeps that id, and
    /// with it the leases it holds, unless another registered worker has it.
    async fn register(
        &self,
        name: &str,
        capabilities: pb::WorkerCapabilities,
        previous: &str,
    ) -> Result<pb::RegisterWorkerResponse>;
    /// Waits up to `wait` for a task this worker can run.
    async fn lease(&self, worker_id: &str, wait: Duration) -> Result<Option<pb::Task>>;
    async fn heartbeat(
        &self,
        worker_id: &str,
        tasks: &[pb::TaskLease],
    ) -> Result<Vec<pb::TaskInstruction>>;
    async fn progress(
        &self,
        worker_id: &str,
        req: pb::ReportProgressRequest,
    ) -> Result<pb::TaskDirective>;
    /// Accepts a result, or refuses it (FailedPrecondition) when the lease
    /// was lost. A joint task's result has one part per model it trains
    /// (InvalidArgument otherwise), each accepted as that model's own.
    async fn complete(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        result: pb::TaskResult,
    ) -> Result<()>;
    /// A failed attempt. `split`: a joint task's models cannot train
    /// jointly on the worker; they are queued as tasks of their own.
    async fn fail(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        error: &str,
        retryable: bool,
        split: bool,
    ) -> Result<()>;
}
