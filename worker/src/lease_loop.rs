//! The worker's life: register, lease tasks into free slots with a long
//! poll, heartbeat the running ones, stream their progress, report results.
//! On shutdown it stops leasing, lets running tasks finish within a grace
//! period, and releases the rest (retryable) so another worker resumes them
//! from their last epoch checkpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use nt_common::auth::BearerToken;
use nt_proto::tonic::codegen::InterceptedService;
use nt_proto::tonic::transport::{Channel, Endpoint};
use nt_proto::tonic::{Code, Status};
use nt_proto::v1 as pb;
use nt_proto::v1::worker_service_client::WorkerServiceClient;
use tch::Device;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::config::WorkerArgs;
use crate::executor::{self, Env, ProgressMessage, StopReason, TaskControl, TaskError};
use crate::metrics::WorkerMetrics;

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

/// Whether a failed call is worth repeating (the coordinator is away).
fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Cancelled
    )
}

struct Running {
    attempt: u32,
    control: Arc<TaskControl>,
}

pub struct Worker {
    args: WorkerArgs,
    client: Client,
    env_storage: nt_common::Storage,
    device: Device,
    worker_id: Mutex<String>,
    running: Mutex<HashMap<String, Running>>,
    heartbeat_every: Mutex<Duration>,
    /// Set once shutdown begins: reports then give up after `REPORT_LIMIT`.
    stopping: std::sync::atomic::AtomicBool,
    pub metrics: WorkerMetrics,
}

/// How long a stopping worker keeps retrying a task's last report. Past it
/// the lease expires at the coordinator and the task is retried from its
/// last epoch checkpoint, as for a killed worker.
const REPORT_LIMIT: Duration = Duration::from_secs(30);

impl Worker {
    pub fn new(args: WorkerArgs) -> Result<Arc<Self>> {
        let device = nt_runtime::device::parse_device(&args.device)?;
        let storage = nt_common::Storage::open(&args.storage)?;
        let client = connect(&args)?;
        Ok(Arc::new(Worker {
            args,
            client,
            env_storage: storage,
            device,
            worker_id: Mutex::new(String::new()),
            running: Mutex::new(HashMap::new()),
            heartbeat_every: Mutex::new(Duration::from_secs(5)),
            stopping: std::sync::atomic::AtomicBool::new(false),
            metrics: WorkerMetrics::new(),
        }))
    }

    fn id(&self) -> String {
        self.worker_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn register(&self, shutdown: &CancellationToken) -> Result<()> {
        let gpus = if self.device.is_cuda() {
            tch::Cuda::device_count() as u32
        } else {
            0
        };
        let req = pb::RegisterWorkerRequest {
            name: self.args.name.clone(),
            capabilities: Some(pb::WorkerCapabilities {
                gpus,
                gpu_names: Vec::new(),
                slots: self.args.slots as u32,
                cpu_threads: self.args.threads.unwrap_or(0) as u32,
            }),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.client.clone().register_worker(req.clone()).await {
                Ok(r) => {
                    let r = r.into_inner();
                    info!(worker_id = %r.worker_id, device = ?self.device, slots = self.args.slots, "registered");
                    *self.worker_id.lock().unwrap_or_else(|e| e.into_inner()) = r.worker_id;
                    *self
                        .heartbeat_every
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) =
                        Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50)));
                    return Ok(());
                }
                Err(s) if transient(&s) => {
                    warn!(error = %s.message(), "coordinator unavailable; retrying registration");
                }
                Err(s) => anyhow::bail!("registration refused: {}", s.message()),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Runs until `shutdown`; then drains as described in the module docs.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        self.register(&shutdown).await?;
        if shutdown.is_cancelled() {
            return Ok(()); // stopped before it could register: nothing to drain
        }
        self.metrics.registered.set(1);
        let heartbeats = tokio::spawn(self.clone().heartbeat_loop(shutdown.clone()));
        let slots = Arc::new(Semaphore::new(self.args.slots.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => p?,
            };
            let mut client = self.client.clone();
            let request = pb::LeaseTaskRequest {
                worker_id: self.id(),
                wait_ms: 20_000,
            };
            let leased = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = client.lease_task(request) => r,
            };
            match leased {
                Ok(r) => {
                    if let Some(task) = r.into_inner().task {
                        let me = self.clone();
                        tasks.spawn(async move {
                            me.run_task(task).await;
                            drop(permit);
                        });
                    }
                }
                Err(s) if s.code() == Code::NotFound => {
                    warn!(
                        "the coordinator does not know this worker (restarted?); registering again"
                    );
                    self.register(&shutdown).await?;
                }
                Err(s) => {
                    warn!(error = %s.message(), "leasing failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
            while tasks.try_join_next().is_some() {}
        }
        // Shutting down: no new leases; give running tasks the grace period.
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let grace = Duration::from_secs(self.args.shutdown_grace_secs);
        if !tasks.is_empty() {
            info!(
                running = tasks.len(),
                grace_secs = grace.as_secs(),
                "draining running tasks"
            );
            let drained =
                tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
                    .await;
            if drained.is_err() {
                info!("grace period over; releasing unfinished tasks");
                for r in self
                    .running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                {
                    let _ = r.control.stop(StopReason::Shutdown);
                }
                while tasks.join_next().await.is_some() {}
            }
        }
        heartbeats.abort();
        Ok(())
    }

    async fn heartbeat_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let every = *self
                .heartbeat_every
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            tokio::time::sleep(every).await;
            let leases: Vec<pb::TaskLease> = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(id, r)| pb::TaskLease {
                    task_id: id.clone(),
                    attempt: r.attempt,
                })
                .collect();
            if leases.is_empty() && shutdown.is_cancelled() {
                return;
            }
            match self
                .client
                .clone()
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: self.id(),
                    tasks: leases,
                })
                .await
            {
                Ok(r) => self.apply(&r.into_inner().tasks),
                Err(s) => warn!(error = %s.message(), "heartbeat failed"),
            }
        }
    }

    fn apply(&self, instructions: &[pb::TaskInstruction]) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for i in instructions {
            let reason = match pb::TaskDirective::try_from(i.directive) {
                Ok(pb::TaskDirective::Cancel) => StopReason::Cancelled,
                Ok(pb::TaskDirective::LeaseLost) => StopReason::LeaseLost,
                _ => continue,
            };
            if let Some(r) = running.get(&i.task_id).filter(|r| r.attempt == i.attempt) {
                if r.control.stop(reason) {
                    info!(task_id = %i.task_id, ?reason, "stopping task");
                }
            }
        }
    }

    #[instrument(skip_all, fields(worker_id = %self.id(), task_id = %task.task_id, attempt = task.attempt, run_id = %task.run_id))]
    async fn run_task(self: Arc<Self>, task: pb::Task) {
        info!(label = %task.label, "task started");
        self.metrics.running.inc();
        let control = Arc::new(TaskControl::default());
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                task.task_id.clone(),
                Running {
                    attempt: task.attempt,
                    control: control.clone(),
                },
            );
        let (tx, rx) = mpsc::unbounded_channel();
        let reporter = tokio::spawn(self.clone().report_progress(
            task.task_id.clone(),
            task.attempt,
            rx,
            control.clone(),
        ));
        let device = task_device(task.device(), self.device);
        let env = Env {
            storage: self.env_storage.clone(),
            runtime: tokio::runtime::Handle::current(),
            device,
            threads: self.args.threads,
        };
        let exec_task = task.clone();
        let exec_control = control.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            executor::execute(&exec_task, &env, &tx, &exec_control)
        })
        .await
        .unwrap_or_else(|e| {
            Err(TaskError::Retryable(format!(
                "the task thread panicked: {e}"
            )))
        });
        let _ = reporter.await;
        let outcome_label = match &outcome {
            Ok(_) => "completed",
            Err(TaskError::Stopped(StopReason::Shutdown)) => "released",
            Err(TaskError::Stopped(_)) => "stopped",
            Err(TaskError::Retryable(_) | TaskError::Fatal(_)) => "failed",
        };
        self.metrics.tasks.with_label_values(&[outcome_label]).inc();
        self.metrics.running.dec();
        // Done computing: heartbeats no longer speak for this attempt.
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&task.task_id);
        match outcome {
            Ok(result) => self.complete(&task, result).await,
            Err(TaskError::Stopped(StopReason::Shutdown)) => {
                self.fail(
                    &task,
                    "released: the worker shut down before the task finished",
                    true,
                )
                .await
            }
            Err(TaskError::Stopped(reason)) => info!(?reason, "task stopped"),
            Err(TaskError::Retryable(e)) => self.fail(&task, &e, true).await,
            Err(TaskError::Fatal(e)) => self.fail(&task, &e, false).await,
        }
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&task.task_id);
    }

    /// Sends progress in order; a directive other than continue stops the task.
    async fn report_progress(
        self: Arc<Self>,
        task_id: String,
        attempt: u32,
        mut rx: mpsc::UnboundedReceiver<ProgressMessage>,
        control: Arc<TaskControl>,
    ) {
        while let Some(first) = rx.recv().await {
            // Coalesce a backlog: keep every checkpoint and epoch, the latest progress.
            let mut batch = vec![first];
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
            }
            let last_plain = batch
                .iter()
                .rposition(|m| m.checkpoint.is_none() && m.epoch.is_none());
            for (i, m) in batch.into_iter().enumerate() {
                if m.checkpoint.is_none() && m.epoch.is_none() && Some(i) != last_plain {
                    continue;
                }
                if let Some(p) = m.progress.as_ref().filter(|p| p.samples_per_second > 0.0) {
                    self.metrics.samples_per_second.set(p.samples_per_second);
                }
                let (checkpoint, checkpoint_epoch) = m.checkpoint.unwrap_or_default();
                let req = pb::ReportProgressRequest {
                    worker_id: self.id(),
                    task_id: task_id.clone(),
                    attempt,
                    progress: m.progress,
                    checkpoint,
                    checkpoint_epoch,
                    epoch: m.epoch,
                };
                match self.client.clone().report_progress(req).await {
                    Ok(r) => self.apply(&[pb::TaskInstruction {
                        task_id: task_id.clone(),
                        attempt,
                        directive: r.into_inner().directive,
                    }]),
                    Err(s) => warn!(error = %s.message(), "progress report failed"),
                }
                if control.stopped().is_some() {
                    break;
                }
            }
        }
    }

    async fn complete(&self, task: &pb::Task, result: pb::TaskResult) {
        let req = pb::CompleteTaskRequest {
            worker_id: self.id(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            result: Some(result),
        };
        let mut backoff = Duration::from_millis(200);
        let started = std::time::Instant::now();
        for _ in 0..200 {
            if self.give_up_reporting(started) {
                return;
            }
            let mut client = self.client.clone();
            let call = client.complete_task(req.clone());
            let Some(answer) = self.bounded(started, call).await else {
                return;
            };
            match answer {
                Ok(_) => {
                    info!("task completed");
                    return;
                }
                Err(s) if s.code() == Code::FailedPrecondition => {
                    warn!(reason = %s.message(), "result refused");
                    return;
                }
                Err(s) if transient(&s) => {
                    warn!(error = %s.message(), "completing failed; retrying")
                }
                Err(s) => {
                    warn!(error = %s.message(), "completion rejected");
                    return;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One report attempt; while shutting down, cut short at `REPORT_LIMIT`
    /// after `started` (None: given up), so a coordinator that accepts the
    /// connection and never answers cannot hold the worker either.
    async fn bounded<T>(
        &self,
        started: std::time::Instant,
        call: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        if !self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Some(call.await);
        }
        let left = REPORT_LIMIT.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, call).await {
            Ok(answer) => Some(answer),
            Err(_) => {
                self.give_up_reporting(started);
                None
            }
        }
    }

    /// Whether a report retried since `started` should stop: only while the
    /// worker is shutting down, after `REPORT_LIMIT`.
    fn give_up_reporting(&self, started: std::time::Instant) -> bool {
        let stop = self.stopping.load(std::sync::atomic::Ordering::Relaxed)
            && started.elapsed() >= REPORT_LIMIT;
        if stop {
            warn!(
                limit_secs = REPORT_LIMIT.as_secs(),
                "shutting down: giving up the report; the lease will expire and the task be retried"
            );
        }
        stop
    }

    async fn fail(&self, task: &pb::Task, error: &str, retryable: bool) {
        warn!(error, retryable, "task failed");
        let req = pb::FailTaskRequest {
            worker_id: self.id(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            error: error.to_string(),
            retryable,
        };
        let mut backoff = Duration::from_millis(200);
        let started = std::time::Instant::now();
        for _ in 0..50 {
            if self.give_up_reporting(started) {
                return;
            }
            let mut client = self.client.clone();
            let call = client.fail_task(req.clone());
            let Some(answer) = self.bounded(started, call).await else {
                return;
            };
            match answer {
                Ok(_) => return,
                Err(s) if transient(&s) => {}
                Err(s) => {
                    warn!(error = %s.message(), "failure report rejected");
                    return;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Where a task runs on a worker whose own device is `worker`: a run that asked
/// for the CPU trains on the CPU even on a GPU worker; otherwise the worker's
/// device (the coordinator sends GPU tasks to GPU workers only).
fn task_device(requirement: pb::DeviceRequirement, worker: Device) -> Device {
    match requirement {
        pb::DeviceRequirement::Cpu => Device::Cpu,
        pb::DeviceRequirement::Gpu | pb::DeviceRequirement::Unspecified => worker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_run_stays_on_the_cpu_of_a_gpu_worker() {
        let gpu = Device::Cuda(0);
        assert_eq!(task_device(pb::DeviceRequirement::Cpu, gpu), Device::Cpu);
        assert_eq!(task_device(pb::DeviceRequirement::Gpu, gpu), gpu);
        assert_eq!(task_device(pb::DeviceRequirement::Unspecified, gpu), gpu);
        assert_eq!(
            task_device(pb::DeviceRequirement::Unspecified, Device::Cpu),
            Device::Cpu
        );
    }
}
