//! The worker's link to the coordinator: the gRPC client, and one retry
//! helper that every call goes through. What a call may meet and how long
//! it is worth retrying is decided by [`Retry`] (in [`retry`]), a plain
//! state machine with no clock inside; [`Link::call`] performs its
//! decisions: it waits, times out, registers again when the coordinator
//! forgot the worker, and stops at shutdown.

mod retry;

pub use retry::{classify, Call, Failure, GiveUp, Next, Patience, Retry};

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nt_common::auth::BearerToken;
use nt_proto::tonic::codegen::InterceptedService;
use nt_proto::tonic::transport::{Channel, Endpoint};
use nt_proto::tonic::{Response, Status};
use nt_proto::v1 as pb;
use nt_proto::v1::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::WorkerArgs;

pub type Client = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// Connects to the coordinator (lazily: the first call dials).
pub fn connect(args: &WorkerArgs) -> Result<Client> {
    let mut endpoint = Endpoint::from_shared(args.coordinator.clone())
        .with_context(|| format!("coordinator address `{}`", args.coordinator))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30));
    if args.coordinator.starts_with("https://") {
        endpoint = endpoint.tls_config(args.tls.config()?)?;
    }
    let token = BearerToken::new(Some(&args.worker_token))?;
    Ok(
        WorkerServiceClient::with_interceptor(endpoint.connect_lazy(), token)
            .max_decoding_message_size(64 << 20),
    )
}

/// Why a call brought no answer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{}", .0.message())]
    Refused(Status),
    #[error("{} (gave up)", .0.message())]
    Exhausted(Status),
    #[error("shutting down: gave up the report after {0:?}")]
    ReportLimit(Duration),
    #[error("shutting down")]
    Cancelled,
}

/// The worker's side of its conversation with the coordinator.
pub struct Link {
    client: Client,
    registration: pb::RegisterWorkerRequest,
    patience: Patience,
    worker_id: Mutex<String>,
    heartbeat_every: Mutex<Duration>,
    /// Set once shutdown begins: last reports then give up after the limit.
    stopping: AtomicBool,
}

impl Link {
    pub fn new(
        client: Client,
        registration: pb::RegisterWorkerRequest,
        patience: Patience,
    ) -> Self {
        Link {
            client,
            registration,
            patience,
            worker_id: Mutex::new(String::new()),
            heartbeat_every: Mutex::new(Duration::from_secs(5)),
            stopping: AtomicBool::new(false),
        }
    }

    /// The id the coordinator gave this worker (empty before registering).
    pub fn id(&self) -> String {
        self.worker_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How often to heartbeat, as the coordinator asked.
    pub fn heartbeat_every(&self) -> Duration {
        *self
            .heartbeat_every
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, a task's last report gives up after the report limit.
    pub fn begin_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Registers, retrying while the coordinator is away. `Ok(false)`:
    /// shutdown came first. A refusal (a wrong token) is an error.
    pub async fn register(&self, shutdown: &CancellationToken) -> Result<bool> {
        match self.try_register(shutdown).await {
            Ok(()) => Ok(true),
            Err(LinkError::Cancelled) => Ok(false),
            Err(e) => anyhow::bail!("registration refused: {e}"),
        }
    }

    async fn try_register(&self, shutdown: &CancellationToken) -> Result<(), LinkError> {
        let r = self
            .call(Call::Register, Some(shutdown), |mut c, previous| {
                // Registering again, it asks for its old id: its leases stay its own.
                let req = pb::RegisterWorkerRequest {
                    worker_id: previous,
                    ..self.registration.clone()
                };
                async move { c.register_worker(req).await }
            })
            .await?;
        let capabilities = self.registration.capabilities.clone().unwrap_or_default();
        info!(
            worker_id = %r.worker_id,
            gpus = capabilities.gpus,
            slots = capabilities.slots,
            "registered"
        );
        *self.worker_id.lock().unwrap_or_else(|e| e.into_inner()) = r.worker_id;
        *self
            .heartbeat_every
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50)));
        Ok(())
    }

    /// Leases a task with a long poll; `None` when none came in time.
    /// Cancelled by shutdown.
    pub async fn lease(&self, shutdown: &CancellationToken) -> Result<Option<pb::Task>, LinkError> {
        self.call(Call::Lease, Some(shutdown), |mut c, worker_id| async move {
            c.lease_task(pb::LeaseTaskRequest {
                worker_id,
                wait_ms: 20_000,
            })
            .await
        })
        .await
        .map(|r| r.task)
    }

    pub async fn heartbeat(
        &self,
        tasks: Vec<pb::TaskLease>,
    ) -> Result<Vec<pb::TaskInstruction>, LinkError> {
        self.call(Call::Heartbeat, None, |mut c, worker_id| {
            let tasks = tasks.clone();
            async move { c.heartbeat(pb::HeartbeatRequest { worker_id, tasks }).await }
        })
        .await
        .map(|r| r.tasks)
    }

    pub async fn progress(
        &self,
        req: pb::ReportProgressRequest,
    ) -> Result<pb::ReportProgressResponse, LinkError> {
        self.call(Call::Progress, None, |mut c, worker_id| {
            let req = pb::ReportProgressRequest {
                worker_id,
                ..req.clone()
            };
            async move { c.report_progress(req).await }
        })
        .await
    }

    pub async fn complete(&self, req: pb::CompleteTaskRequest) -> Result<(), LinkError> {
        self.call(Call::Complete, None, |mut c, worker_id| {
            let req = pb::CompleteTaskRequest {
                worker_id,
                ..req.clone()
            };
            async move { c.complete_task(req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn fail(&self, req: pb::FailTaskRequest) -> Result<(), LinkError> {
        self.call(Call::Fail, None, |mut c, worker_id| {
            let req = pb::FailTaskRequest {
                worker_id,
                ..req.clone()
            };
            async move { c.fail_task(req).await }
        })
        .await
        .map(|_| ())
    }

    /// The one retry helper: makes `attempt` (given a client and the
    /// current worker id) until it answers or [`Retry`] gives up. With
    /// `shutdown`, cancelling it ends the call at once.
    pub async fn call<T, F, Fut>(
        &self,
        call: Call,
        shutdown: Option<&CancellationToken>,
        mut attempt: F,
    ) -> Result<T, LinkError>
    where
        F: FnMut(Client, String) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut retry = Retry::new(call, self.patience);
        let started = Instant::now();
        let never = CancellationToken::new();
        let shutdown = shutdown.unwrap_or(&never);
        loop {
            let stopping = self.stopping.load(Ordering::Relaxed);
            let limit = retry
                .before_attempt(started.elapsed(), stopping)
                .map_err(|_| LinkError::ReportLimit(self.patience.report_limit))?;
            let answer = attempt(self.client.clone(), self.id());
            let answer = tokio::select! {
                _ = shutdown.cancelled() => return Err(LinkError::Cancelled),
                a = bounded(limit, answer) => a,
            };
            let status = match answer {
                Some(Ok(r)) => return Ok(r.into_inner()),
                Some(Err(status)) => status,
                None => return Err(LinkError::ReportLimit(self.patience.report_limit)),
            };
            match retry.after_failure(status.code()) {
                Next::RetryAfter(pause) => {
                    warn!(?call, error = %status.message(), "coordinator call failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(LinkError::Cancelled),
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                Next::Reregister => {
                    warn!(
                        "the coordinator does not know this worker (restarted?); registering again"
                    );
                    // Boxed: registering is itself a call.
                    Box::pin(self.try_register(shutdown)).await?;
                }
                Next::GiveUp(GiveUp::Refused) => return Err(LinkError::Refused(status)),
                Next::GiveUp(GiveUp::Exhausted) => return Err(LinkError::Exhausted(status)),
                Next::GiveUp(GiveUp::ReportLimit) => {
                    return Err(LinkError::ReportLimit(self.patience.report_limit))
                }
            }
        }
    }
}

/// `call` cut short after `limit` (None: it timed out).
async fn bounded<T>(limit: Option<Duration>, call: impl Future<Output = T>) -> Option<T> {
    match limit {
        None => Some(call.await),
        Some(limit) => tokio::time::timeout(limit, call).await.ok(),
    }
}

#[cfg(test)]
mod tests;
