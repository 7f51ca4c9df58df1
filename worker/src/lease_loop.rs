//! The worker's life: register, lease tasks into free slots with a long
//! poll, heartbeat the running ones, stream their progress, report results.
//! On shutdown it stops leasing, lets running tasks finish within a grace
//! period, and releases the rest (retryable) so another worker resumes them
//! from their last epoch checkpoint. Every call to the coordinator goes
//! through the [`Link`]; every task through the executor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use nt_proto::tonic::Code;
use nt_proto::v1 as pb;
use tch::Device;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::config::WorkerArgs;
use crate::executor::{self, Env, ProgressMessage, StopReason, TaskControl, TaskError};
use crate::link::{self, Link, LinkError, Patience};
use crate::metrics::WorkerMetrics;

struct Running {
    attempt: u32,
    control: Arc<TaskControl>,
}

pub struct Worker {
    args: WorkerArgs,
    link: Link,
    storage: nt_common::Storage,
    device: Device,
    /// `--data-dir`, resolved.
    data_dirs: Arc<[std::path::PathBuf]>,
    running: Mutex<HashMap<String, Running>>,
    pub metrics: WorkerMetrics,
}

impl Worker {
    pub fn new(args: WorkerArgs) -> Result<Arc<Self>> {
        let device = nt_runtime::device::parse_device(&args.device)?;
        let storage = nt_common::Storage::open(&args.storage)?;
        let gpus = if device.is_cuda() {
            tch::Cuda::device_count() as u32
        } else {
            0
        };
        let registration = pb::RegisterWorkerRequest {
            name: args.name.clone(),
            capabilities: Some(pb::WorkerCapabilities {
                gpus,
                gpu_names: Vec::new(),
                slots: args.slots as u32,
                cpu_threads: args.threads.unwrap_or(0) as u32,
            }),
            version: env!("CARGO_PKG_VERSION").into(),
            worker_id: String::new(),
        };
        let link = Link::new(link::connect(&args)?, registration, Patience::default());
        // The default data set's folder, where the operator moved it.
        let mut dirs = args.data_dirs.clone();
        dirs.extend(std::env::var_os("NT_FASHION_MNIST").map(std::path::PathBuf::from));
        let data_dirs = executor::resolve_data_dirs(&dirs);
        Ok(Arc::new(Worker {
            args,
            link,
            storage,
            device,
            data_dirs,
            running: Mutex::new(HashMap::new()),
            metrics: WorkerMetrics::new(),
        }))
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs until `shutdown`; then drains as described in the module docs.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        if !self.link.register(&shutdown).await? {
            return Ok(()); // stopped before it could register: nothing to drain
        }
        info!(device = ?self.device, slots = self.args.slots, "worker ready");
        self.metrics.registered.set(1);
        let heartbeats = tokio::spawn(self.clone().heartbeat_loop(shutdown.clone()));
        let slots = Arc::new(Semaphore::new(self.args.slots.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => p?,
            };
            match self.link.lease(&shutdown).await {
                Ok(Some(task)) => {
                    let me = self.clone();
                    tasks.spawn(async move {
                        me.run_task(task).await;
                        drop(permit);
                    });
                }
                Ok(None) => {}
                Err(LinkError::Cancelled) => break,
                // Leasing retries everything but a refused registration.
                Err(e) => {
                    heartbeats.abort();
                    anyhow::bail!("registration refused: {e}");
                }
            }
            while tasks.try_join_next().is_some() {}
        }
        // Shutting down: no new leases; give running tasks the grace period.
        self.link.begin_stopping();
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
                for r in self.running().values() {
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
            tokio::time::sleep(self.link.heartbeat_every()).await;
            let leases: Vec<pb::TaskLease> = self
                .running()
                .iter()
                .map(|(id, r)| pb::TaskLease {
                    task_id: id.clone(),
                    attempt: r.attempt,
                })
                .collect();
            if leases.is_empty() && shutdown.is_cancelled() {
                return;
            }
            match self.link.heartbeat(leases).await {
                Ok(instructions) => self.apply(&instructions),
                Err(e) => warn!(error = %e, "heartbeat failed"),
            }
        }
    }

    /// Stops the running attempts the coordinator cancelled or gave away.
    fn apply(&self, instructions: &[pb::TaskInstruction]) {
        let running = self.running();
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

    #[instrument(skip_all, fields(worker_id = %self.link.id(), task_id = %task.task_id, attempt = task.attempt, run_id = %task.run_id))]
    async fn run_task(self: Arc<Self>, task: pb::Task) {
        info!(label = %task.label, "task started");
        self.metrics.running.inc();
        let control = Arc::new(TaskControl::default());
        self.running().insert(
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
            task.parts.len().max(1),
            rx,
            control.clone(),
        ));
        let env = Env {
            storage: self.storage.clone(),
            runtime: tokio::runtime::Handle::current(),
            device: self.device,
            threads: self.args.threads,
            data_dirs: self.data_dirs.clone(),
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
            Err(TaskError::NotJoint(_)) => "split",
        };
        self.metrics.tasks.with_label_values(&[outcome_label]).inc();
        self.metrics.running.dec();
        // Done computing: heartbeats no longer speak for this attempt.
        self.running().remove(&task.task_id);
        match outcome {
            Ok(result) => self.complete(&task, result).await,
            Err(TaskError::Stopped(StopReason::Shutdown)) => {
                let why = "released: the worker shut down before the task finished";
                self.fail(&task, why, Failure::Retryable).await
            }
            Err(TaskError::Stopped(reason)) => info!(?reason, "task stopped"),
            Err(TaskError::Retryable(e)) => self.fail(&task, &e, Failure::Retryable).await,
            Err(TaskError::Fatal(e)) => self.fail(&task, &e, Failure::Fatal).await,
            Err(TaskError::NotJoint(e)) => self.fail(&task, &e, Failure::Split).await,
        }
    }

    /// Sends progress in order; a directive other than continue stops the task.
    /// `parts`: the models a joint task trains (1 otherwise); each part
    /// reports its own share, so the worker's throughput is that times the parts.
    async fn report_progress(
        self: Arc<Self>,
        task_id: String,
        attempt: u32,
        parts: usize,
        mut rx: mpsc::UnboundedReceiver<ProgressMessage>,
        control: Arc<TaskControl>,
    ) {
        while let Some(first) = rx.recv().await {
            // Coalesce a backlog: keep every checkpoint and epoch, the
            // latest progress (of each part of a joint task).
            let mut batch = vec![first];
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
            }
            let plain = |m: &ProgressMessage| m.checkpoint.is_none() && m.epoch.is_none();
            let superseded = |i: usize, batch: &[ProgressMessage]| {
                plain(&batch[i])
                    && batch[i + 1..]
                        .iter()
                        .any(|later| plain(later) && later.part == batch[i].part)
            };
            let keep: Vec<bool> = (0..batch.len()).map(|i| !superseded(i, &batch)).collect();
            for (m, keep) in batch.into_iter().zip(keep) {
                if !keep {
                    continue;
                }
                if let Some(p) = m.progress.as_ref().filter(|p| p.samples_per_second > 0.0) {
                    self.metrics
                        .samples_per_second
                        .set(p.samples_per_second * parts as f64);
                }
                let (checkpoint, checkpoint_epoch) = m.checkpoint.unwrap_or_default();
                let req = pb::ReportProgressRequest {
                    worker_id: String::new(), // the link fills it in
                    task_id: task_id.clone(),
                    attempt,
                    progress: m.progress,
                    checkpoint,
                    checkpoint_epoch,
                    epoch: m.epoch,
                    part: m.part,
                };
                match self.link.progress(req).await {
                    Ok(r) => self.apply(&[pb::TaskInstruction {
                        task_id: task_id.clone(),
                        attempt,
                        directive: r.directive,
                    }]),
                    Err(e) => warn!(error = %e, "progress report failed"),
                }
                if control.stopped().is_some() {
                    break;
                }
            }
        }
    }

    async fn complete(&self, task: &pb::Task, result: pb::TaskResult) {
        let req = pb::CompleteTaskRequest {
            worker_id: String::new(), // the link fills it in
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            result: Some(result),
        };
        match self.link.complete(req).await {
            Ok(()) => info!("task completed"),
            Err(LinkError::Refused(s)) if s.code() == Code::FailedPrecondition => {
                warn!(reason = %s.message(), "result refused")
            }
            Err(LinkError::Refused(s)) => warn!(error = %s.message(), "completion rejected"),
            Err(e) => gave_up(&e),
        }
    }

    async fn fail(&self, task: &pb::Task, error: &str, failure: Failure) {
        warn!(error, ?failure, "task failed");
        let req = pb::FailTaskRequest {
            worker_id: String::new(), // the link fills it in
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            error: error.to_string(),
            retryable: failure == Failure::Retryable,
            split: failure == Failure::Split,
        };
        match self.link.fail(req).await {
            Ok(()) => {}
            Err(LinkError::Refused(s)) => warn!(error = %s.message(), "failure report rejected"),
            Err(e) => gave_up(&e),
        }
    }
}

/// How an attempt failed, as FailTask says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Another attempt may succeed.
    Retryable,
    /// No attempt will.
    Fatal,
    /// A joint task's models cannot train jointly here: train them apart.
    Split,
}

fn gave_up(e: &LinkError) {
    warn!(
        error = %e,
        "giving up the report; the lease will expire and the task be retried"
    );
}
