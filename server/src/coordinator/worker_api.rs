//! The worker-facing operations of the coordinator ([`WorkerApi`]).

use std::time::{Duration, Instant};

use nt_common::{layout, now_ms};
use nt_proto::v1 as pb;
use tracing::{info, instrument, warn};

use super::api::WorkerApi;
use super::document::{parse_task_id, CurvePoint, Outcome, Progress};
use super::runbook::{Delivery, Report};
use super::service::Coordinator;
use super::service::{lock, Step};
use crate::error::{CoordinatorError, Result};

/// The run part of a task id, for log spans.
fn run_of(task_id: &str) -> &str {
    parse_task_id(task_id).map_or("", |(run, _)| run)
}

/// A worker id this coordinator could have given out: short, printable.
fn valid_worker_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn lease_lost(task_id: &str, attempt: u32) -> CoordinatorError {
    CoordinatorError::FailedPrecondition(format!(
        "task `{task_id}` attempt {attempt} no longer holds its lease"
    ))
}

impl WorkerApi for Coordinator {
    async fn register(
        &self,
        name: &str,
        capabilities: pb::WorkerCapabilities,
        previous: &str,
    ) -> Result<pb::RegisterWorkerResponse> {
        let mut sched = lock(&self.scheduler);
        let reclaim = valid_worker_id(previous) && !sched.is_registered(previous);
        let id = if reclaim {
            previous.to_string()
        } else {
            format!(
                "{}-{}",
                if name.is_empty() { "worker" } else { name },
                &layout::new_run_id()[17..]
            )
        };
        info!(worker_id = %id, gpus = capabilities.gpus, slots = capabilities.slots, again = reclaim, "worker registered");
        sched.register(&id, capabilities, Instant::now());
        drop(sched);
        self.update_gauges();
        Ok(pb::RegisterWorkerResponse {
            worker_id: id,
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u32,
            lease_ttl_ms: self.config.lease_ttl.as_millis() as u32,
        })
    }

    #[instrument(skip_all, fields(worker_id = %worker_id, task_id))]
    async fn lease(&self, worker_id: &str, wait: Duration) -> Result<Option<pb::Task>> {
        let deadline = Instant::now() + wait.min(self.config.max_lease_wait);
        loop {
            let notified = self.task_ready.notified();
            let picked = lock(&self.scheduler)
                .pick(worker_id, Instant::now())
                .map_err(|_| {
                    CoordinatorError::NotFound(format!(
                        "worker `{worker_id}` is not registered (register again)"
                    ))
                })?;
            if let Some(queued) = picked {
                let Some((run_id, local)) = parse_task_id(&queued.task) else {
                    continue;
                };
                let leased = self
                    .commit(run_id, |book| {
                        Ok(match book.lease(local, worker_id, now_ms()) {
                            Some((plan, effects)) => Step::stored(Some(plan), effects),
                            // No longer pending (cancelled meanwhile): drop it.
                            None => Step {
                                value: None,
                                effects: Vec::new(),
                                durable: false,
                            },
                        })
                    })
                    .await;
                match leased {
                    Ok(Some(plan)) => {
                        tracing::Span::current().record("task_id", plan.task_id.as_str());
                        self.metrics.leases.inc();
                        info!(attempt = plan.attempt, "task leased");
                        return Ok(Some(plan.to_wire()));
                    }
                    Ok(None) | Err(CoordinatorError::NotFound(_)) => continue,
                    Err(e) => {
                        // Not stored: give the task back rather than risk two
                        // attempts with one number. It waits out a backoff,
                        // so other runs' tasks are not held up behind it.
                        lock(&self.scheduler).put_back(queued, Instant::now());
                        self.update_gauges();
                        return Err(e);
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline || self.shutdown.is_cancelled() {
                return Ok(None);
            }
            // Wake for new work, or when a task waiting out a backoff is due.
            let offer = lock(&self.scheduler).next_offer(now);
            let wake = offer.map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(wake - now) => {}
                _ = self.shutdown.cancelled() => return Ok(None),
            }
        }
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        tasks: &[pb::TaskLease],
    ) -> Result<Vec<pb::TaskInstruction>> {
        let now = Instant::now();
        lock(&self.scheduler).touch(worker_id, now);
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            let held = parse_task_id(&t.task_id)
                .and_then(|(run, local)| Some((self.slot(run)?, local)))
                .map_or(Err(pb::TaskDirective::LeaseLost), |(slot, local)| {
                    lock(&slot.book)
                        .check_held_by(local, t.attempt, worker_id)
                        .map(|_| ())
                });
            let directive = match held {
                Ok(()) => {
                    lock(&self.scheduler).renew(&t.task_id, t.attempt, now);
                    pb::TaskDirective::Continue
                }
                Err(d) => d,
            };
            out.push(pb::TaskInstruction {
                task_id: t.task_id.clone(),
                attempt: t.attempt,
                directive: directive as i32,
            });
        }
        Ok(out)
    }

    #[instrument(skip_all, fields(worker_id = %worker_id, task_id = %req.task_id, run_id = run_of(&req.task_id)))]
    async fn progress(
        &self,
        worker_id: &str,
        req: pb::ReportProgressRequest,
    ) -> Result<pb::TaskDirective> {
        let Some((run_id, local, slot)) = parse_task_id(&req.task_id)
            .and_then(|(run, local)| Some((run, local, self.slot(run)?)))
        else {
            return Ok(pb::TaskDirective::LeaseLost);
        };
        let (prefix, models) = {
            let book = lock(&slot.book);
            let i = match book.check_held_by(local, req.attempt, worker_id) {
                Ok(i) => i,
                Err(directive) => return Ok(directive),
            };
            let models = book.parts(i).len();
            if let Some(part) = req.part.filter(|&p| p as usize >= models) {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "part: task `{}` trains {models} model(s) jointly; it has no part {part}",
                    req.task_id
                )));
            }
            (format!("{}/", book.attempt_prefix(i, req.attempt)), models)
        };
        // The last training throughput (evaluations report none); a joint
        // task's parts each report their share.
        if let Some(p) = req.progress.as_ref().filter(|p| p.samples_per_second > 0.0) {
            let shares = if req.part.is_some() { models.max(1) } else { 1 };
            self.metrics
                .set_samples_per_second(worker_id, p.samples_per_second * shares as f64);
        }
        if !req.checkpoint.is_empty() {
            self.check_output(&req.checkpoint, &prefix, "checkpoint")
                .await?;
        }
        let report = Report {
            progress: req.progress.as_ref().map(Progress::from),
            checkpoint: (!req.checkpoint.is_empty())
                .then(|| (req.checkpoint.clone(), req.checkpoint_epoch)),
            epoch: req.epoch.as_ref().map(CurvePoint::from),
            part: req.part.map(|p| p as usize),
        };
        let directive = self
            .commit(run_id, |book| {
                let mut effects = Vec::new();
                if let Err(directive) = book.check_held_by(local, req.attempt, worker_id) {
                    return Ok(Step {
                        value: directive,
                        effects,
                        durable: false,
                    });
                }
                Ok(
                    match book.progress(local, req.attempt, report, now_ms(), &mut effects) {
                        Ok(durable) => Step {
                            value: pb::TaskDirective::Continue,
                            effects,
                            durable,
                        },
                        Err(directive) => Step {
                            value: directive,
                            effects: Vec::new(),
                            durable: false,
                        },
                    },
                )
            })
            .await?;
        if directive == pb::TaskDirective::Continue {
            lock(&self.scheduler).renew(&req.task_id, req.attempt, Instant::now());
        }
        Ok(directive)
    }

    #[instrument(skip_all, fields(worker_id = %worker_id, task_id = %task_id, run_id = run_of(task_id), attempt))]
    async fn complete(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        result: pb::TaskResult,
    ) -> Result<()> {
        let (run_id, local) = parse_task_id(task_id).ok_or_else(|| lease_lost(task_id, attempt))?;
        let slot = self
            .slot(run_id)
            .ok_or_else(|| lease_lost(task_id, attempt))?;
        // Validate first, copy the attempt's outputs to their canonical
        // keys (a joint task's, each part's), then accept.
        let outputs = {
            let book = lock(&slot.book);
            let i = book.check_held_by(local, attempt, worker_id).map_err(|d| match d {
                pb::TaskDirective::Cancel => CoordinatorError::FailedPrecondition(format!(
                    "task `{task_id}`: the run was cancelled"
                )),
                _ => CoordinatorError::FailedPrecondition(format!(
                    "task `{task_id}` attempt {attempt} no longer holds its lease; its result is refused"
                )),
            })?;
            let parts = book.parts(i);
            if result.parts.len() != parts.len() {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "parts: task `{task_id}` trains {} model(s) jointly, its result has {} part(s)",
                    parts.len(),
                    result.parts.len()
                )));
            }
            let output = |j: usize, r: &pb::TaskResult, what: String| {
                let prefix = format!("{}/", book.attempt_prefix(j, attempt));
                (book.canonical_key(j), r.checkpoint.clone(), prefix, what)
            };
            if parts.is_empty() {
                vec![output(i, &result, "result checkpoint".into())]
            } else {
                (parts.into_iter().zip(&result.parts).enumerate())
                    .map(|(n, (j, r))| output(j, r, format!("parts[{n}].checkpoint")))
                    .collect::<Vec<_>>()
            }
        };
        // Every part is checked before any is copied: a refused result
        // leaves no canonical key written.
        for (canonical, checkpoint, prefix, what) in &outputs {
            if canonical.is_some() {
                self.check_output(checkpoint, prefix, what).await?;
            }
        }
        for (canonical, checkpoint, _, _) in &outputs {
            if let Some(dest) = canonical {
                self.storage.copy(checkpoint, dest).await?;
            }
        }
        let delivery = Delivery {
            parts: result.parts.iter().map(delivery).collect(),
            ..delivery(&result)
        };
        self.commit(run_id, |book| {
            // The lease may have been lost while copying: then this refuses.
            book.check_held_by(local, attempt, worker_id)
                .map_err(|_| lease_lost(task_id, attempt))?;
            let effects = book.complete(local, attempt, delivery, now_ms())?;
            Ok(Step::stored((), effects))
        })
        .await?;
        info!("task completed");
        Ok(())
    }

    #[instrument(skip_all, fields(worker_id = %worker_id, task_id = %task_id, run_id = run_of(task_id), attempt))]
    async fn fail(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        error: &str,
        retryable: bool,
        split: bool,
    ) -> Result<()> {
        let (run_id, local) = parse_task_id(task_id).ok_or_else(|| lease_lost(task_id, attempt))?;
        if self.slot(run_id).is_none() {
            return Err(lease_lost(task_id, attempt));
        }
        warn!(error, retryable, split, "task attempt failed");
        self.commit(run_id, |book| {
            book.check_held_by(local, attempt, worker_id)
                .map_err(|_| lease_lost(task_id, attempt))?;
            let effects = book.fail(local, attempt, error, retryable, split, now_ms())?;
            Ok(Step::stored((), effects))
        })
        .await
    }
}

/// What a result delivers for one model (a joint result's parts aside).
fn delivery(result: &pb::TaskResult) -> Delivery {
    Delivery {
        outcome: Outcome::from(result),
        curve: result.curve.iter().map(CurvePoint::from).collect(),
        compute_seconds: result.compute_seconds,
        parts: Vec::new(),
    }
}

impl Coordinator {
    /// An object a worker names as its output must lie under its attempt's
    /// own prefix and exist: a worker cannot make the run adopt another
    /// attempt's or another run's objects.
    async fn check_output(&self, key: &str, prefix: &str, what: &str) -> Result<()> {
        if !key.starts_with(prefix) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "{what} `{key}` is not under this attempt's prefix `{prefix}`"
            )));
        }
        if !self.storage.exists(key).await? {
            return Err(CoordinatorError::NotFound(format!(
                "{what} `{key}` does not exist"
            )));
        }
        Ok(())
    }
}
