//! The run state machine, without I/O: a [`Runbook`] holds one run's
//! document and plan, takes events (a lease, a progress report, a result, a
//! failure, an expired lease, the fusion's outcome, a cancellation) and
//! returns [`Effect`]s for its driver to perform once the new state is
//! stored: queue or release tasks, start the fusion, write the report, tell
//! watchers. No locks, clocks or storage inside: every time is an argument.
//!
//! Run states: queued -> training -> fusing -> fine-tuning -> evaluating ->
//! succeeded, or failed / cancelled from any unfinished state. Runs with
//! existing member checkpoints go from queued straight to fusing.
//!
//! Tasks: pending -> running (a lease, attempt + 1) -> succeeded, or back to
//! pending after a retryable failure or an expired lease until the plan's
//! `max_attempts` are used; then failed, which fails the run. A result or
//! report from an attempt that no longer holds its lease is refused.
//!
//! Joint training ([`joint`]): the models of a phase (the members, or the
//! fine-tunings) may be trained by one joint task. Their own records stay
//! (their checkpoints, curves and scores are theirs) but name the joint
//! task as their group: only the joint task is queued and leased, its
//! state, attempt and worker are mirrored onto them, and its result holds
//! one part per model, each accepted as that model's own task's would be.

use std::sync::Arc;

use nt_proto::v1 as pb;
use nt_spec::{Device, JointPhase, MemberPlan, Plan, TaskPlan, TaskWork};

use super::document::{
    task_id, CurvePoint, FusedRecord, Outcome, Progress, RunDocument, RunState, StoredSpec,
    TaskRecord, TaskState, FORMAT,
};
use crate::error::{CoordinatorError, Result};

mod events;
mod joint;

/// What the driver does after a transition was stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Queue a task (by task id) for a worker.
    Queue { task: String, gpu_only: bool },
    /// Hold a running task's lease for `attempt` (a new lease, or a fresh
    /// one after a restart).
    Lease { task: String, attempt: u32 },
    /// Take a task out of the queue and forget its lease.
    Release { task: String },
    /// Start fusing the accepted members.
    StartFusion,
    /// A task's result was accepted after this much compute.
    TaskDone {
        kind: pb::TaskKind,
        compute_seconds: f64,
    },
    /// The run succeeded: write its report next to the document.
    WriteReport,
    /// Tell the run's watchers.
    Emit(pb::RunEvent),
}

/// What a worker reported about a running attempt.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub progress: Option<Progress>,
    /// A resumable epoch state it wrote, and its epoch.
    pub checkpoint: Option<(String, u32)>,
    /// A finished epoch of the learning curve.
    pub epoch: Option<CurvePoint>,
    /// A joint task's part the progress and the epoch are about (the epoch
    /// state is the joint task's own). A part it does not have is dropped.
    pub part: Option<usize>,
}

/// A result a worker delivered.
#[derive(Clone, Debug, Default)]
pub struct Delivery {
    pub outcome: Outcome,
    pub curve: Vec<CurvePoint>,
    pub compute_seconds: f64,
    /// A joint task's result: one per part, in order. Each part's compute
    /// seconds are its share of the attempt's.
    pub parts: Vec<Delivery>,
}

/// One run: its stored document and its validated plan.
#[derive(Clone, Debug)]
pub struct Runbook {
    pub doc: RunDocument,
    pub plan: Arc<Plan>,
    /// The coordinator's `--joint-memory-budget`: `members.joint: auto`
    /// joins a phase's models when they are estimated to fit it.
    pub joint_budget: u64,
}

type Effects = Vec<Effect>;

impl Runbook {
    /// A new run, queued: its training tasks (or, with existing members, the
    /// fusion) start once the returned document is stored.
    pub fn submit(
        run_id: &str,
        request_id: &str,
        spec: pb::RunSpec,
        plan: Arc<Plan>,
        joint_budget: u64,
        now: i64,
    ) -> (Runbook, Effects) {
        let mut book = Runbook {
            doc: RunDocument {
                format: FORMAT,
                revision: 0,
                writer: String::new(),
                epoch: 0,
                run_id: run_id.to_string(),
                request_id: request_id.to_string(),
                spec: StoredSpec(spec),
                state: RunState::Queued,
                message: String::new(),
                created_ms: now,
                updated_ms: now,
                finished_ms: None,
                event_sequence: 0,
                tasks: Vec::new(),
                member_keys: Vec::new(),
                fused: Vec::new(),
            },
            plan,
            joint_budget,
        };
        let mut fx = Vec::new();
        book.emit_state(now, &mut fx);
        match &book.plan.members.clone() {
            MemberPlan::Train(configs) => {
                let members = (0..configs.len()).map(|member| TaskWork::Train { member });
                book.add_phase(JointPhase::Members, members.collect(), now, &mut fx);
            }
            MemberPlan::Existing(keys) => {
                book.doc.member_keys = keys.clone();
                book.advance(now, &mut fx);
            }
        }
        (book, fx)
    }

    /// A stored run taken back by a coordinator started at `now`. Progress
    /// events are numbered without being stored, so the stored counter may
    /// be behind what watchers saw: numbering goes on from `now` in
    /// microseconds when that is higher, which no earlier event reached
    /// (unless a run emitted more than a thousand events per millisecond).
    /// Sequence numbers thus stay unique and increasing across restarts, and
    /// a watcher that reconnects sees every later event, the final one too.
    pub fn restore(mut doc: RunDocument, plan: Arc<Plan>, joint_budget: u64, now: i64) -> Runbook {
        if !doc.state.is_final() {
            let floor = u64::try_from(now).unwrap_or(0).saturating_mul(1000);
            doc.event_sequence = doc.event_sequence.max(floor);
        }
        Runbook {
            doc,
            plan,
            joint_budget,
        }
    }

    /// What a restarted coordinator does to carry on: queue pending tasks,
    /// give running ones a fresh lease for their workers to reclaim, start
    /// an interrupted fusion again. Models trained by a joint task are its.
    pub fn recover(&self) -> Effects {
        let mut fx = Vec::new();
        if self.doc.state.is_final() {
            return fx;
        }
        for t in self.doc.tasks.iter().filter(|t| t.group.is_empty()) {
            let task = self.task_id(t);
            match t.state {
                TaskState::Pending => fx.push(Effect::Queue {
                    task,
                    gpu_only: self.gpu_only(),
                }),
                TaskState::Running => fx.push(Effect::Lease {
                    task,
                    attempt: t.attempt,
                }),
                _ => {}
            }
        }
        if self.doc.state == RunState::Fusing {
            fx.push(Effect::StartFusion);
        }
        fx
    }

    pub fn state(&self) -> RunState {
        self.doc.state
    }

    pub fn run_id(&self) -> &str {
        &self.doc.run_id
    }

    fn gpu_only(&self) -> bool {
        self.plan.device == Device::Gpu
    }

    pub(super) fn task_id(&self, t: &TaskRecord) -> String {
        task_id(&self.doc.run_id, &t.work.local_name())
    }

    /// The task an attempt's message is about, when that attempt holds its
    /// lease; otherwise what to tell the worker. A model trained by a joint
    /// task holds no lease of its own: messages naming it are refused.
    pub fn check(
        &self,
        local: &str,
        attempt: u32,
    ) -> std::result::Result<usize, pb::TaskDirective> {
        let i = self
            .doc
            .task_index(local)
            .filter(|&i| self.doc.tasks[i].group.is_empty())
            .ok_or(pb::TaskDirective::LeaseLost)?;
        if self.doc.state == RunState::Cancelled {
            return Err(pb::TaskDirective::Cancel);
        }
        let t = &self.doc.tasks[i];
        if t.state != TaskState::Running || t.attempt != attempt {
            return Err(pb::TaskDirective::LeaseLost);
        }
        Ok(i)
    }

    /// As [`Runbook::check`], and the attempt must be held by `worker`: a
    /// worker cannot heartbeat, report or deliver for another's lease.
    pub fn check_held_by(
        &self,
        local: &str,
        attempt: u32,
        worker: &str,
    ) -> std::result::Result<usize, pb::TaskDirective> {
        let i = self.check(local, attempt)?;
        if self.doc.tasks[i].worker_id != worker {
            return Err(pb::TaskDirective::LeaseLost);
        }
        Ok(i)
    }

    /// Leases a pending task to a worker: the next attempt. `None` when the
    /// task is no longer pending (the run was cancelled meanwhile) or is
    /// trained by a joint task.
    pub fn lease(&mut self, local: &str, worker: &str, now: i64) -> Option<(TaskPlan, Effects)> {
        let i = self.doc.task_index(local)?;
        let t = &self.doc.tasks[i];
        if self.doc.state.is_final() || t.state != TaskState::Pending || !t.group.is_empty() {
            return None;
        }
        let mut fx = Vec::new();
        let t = &mut self.doc.tasks[i];
        t.attempt += 1;
        t.worker_id = worker.to_string();
        t.progress = None;
        t.curve.clear();
        self.set_task_state(i, TaskState::Running, "", now, &mut fx);
        self.mirror(i, TaskState::Running, "", now, &mut fx);
        if self.doc.state == RunState::Queued {
            self.set_run_state(RunState::Training, "", now, &mut fx);
        }
        let plan = self.task_plan(i);
        fx.push(Effect::Lease {
            task: plan.task_id.clone(),
            attempt: plan.attempt,
        });
        Some((plan, fx))
    }

    /// A progress report of a running attempt. `Ok(true)` when it changed
    /// something that must be stored (a newer epoch state to resume from).
    /// A joint task's part's progress and curve go to that model's record.
    pub fn progress(
        &mut self,
        local: &str,
        attempt: u32,
        report: Report,
        now: i64,
        fx: &mut Effects,
    ) -> std::result::Result<bool, pb::TaskDirective> {
        let i = self.check(local, attempt)?;
        let t = &mut self.doc.tasks[i];
        let mut durable = false;
        if let Some((key, epoch)) = report.checkpoint {
            if epoch >= t.resume_epoch {
                t.resume = Some(key);
                t.resume_epoch = epoch;
                durable = true;
            }
        }
        let i = match report.part {
            None => i,
            Some(part) => match self.parts(i).get(part) {
                Some(&j) => j,
                None => return Ok(durable),
            },
        };
        let t = &mut self.doc.tasks[i];
        if let Some(point) = report.epoch {
            t.curve.retain(|p| p.epoch < point.epoch);
            t.curve.push(point);
        }
        // A checkpoint-only report carries no progress: keep the last.
        if let Some(p) = report.progress {
            t.progress = Some(p.clone());
            let event = pb::run_event::Event::TaskProgress(pb::TaskProgressed {
                task_id: task_id(&self.doc.run_id, &t.work.local_name()),
                label: t.work.label(),
                progress: Some(pb::TaskProgress::from(&p)),
            });
            self.emit(event, now, fx);
        }
        Ok(durable)
    }

    /// Accepts an attempt's result; the run moves on when its phase is done.
    /// A joint task's result has one part per model it trains (a single
    /// task's none), each accepted as that model's own result.
    pub fn complete(
        &mut self,
        local: &str,
        attempt: u32,
        delivery: Delivery,
        now: i64,
    ) -> Result<Effects> {
        let id = task_id(&self.doc.run_id, local);
        let i = self
            .check(local, attempt)
            .map_err(|d| refusal(d, &id, attempt))?;
        let parts = self.parts(i);
        if delivery.parts.len() != parts.len() {
            return Err(CoordinatorError::InvalidArgument(format!(
                "parts: task `{id}` trains {} model(s) jointly, its result has {} part(s)",
                parts.len(),
                delivery.parts.len()
            )));
        }
        let mut fx = vec![Effect::Release { task: id }];
        if parts.is_empty() {
            self.accept(i, delivery, now, &mut fx);
        } else {
            for (j, part) in parts.into_iter().zip(delivery.parts) {
                self.accept(j, part, now, &mut fx);
            }
            self.set_task_state(i, TaskState::Succeeded, "", now, &mut fx);
        }
        self.advance(now, &mut fx);
        Ok(fx)
    }

    /// An attempt that ended without a result: retried when `retryable` and
    /// attempts remain, else the run fails. `split` (a joint task whose
    /// models cannot train jointly on the worker): its models are queued as
    /// tasks of their own; for any other task it means nothing.
    pub fn fail(
        &mut self,
        local: &str,
        attempt: u32,
        error: &str,
        retryable: bool,
        split: bool,
        now: i64,
    ) -> Result<Effects> {
        let i = self.check(local, attempt).map_err(|_| {
            CoordinatorError::FailedPrecondition(format!(
                "task `{}` attempt {attempt} no longer holds its lease",
                task_id(&self.doc.run_id, local)
            ))
        })?;
        let mut fx = Vec::new();
        if split && !self.parts(i).is_empty() {
            self.split(i, error, now, &mut fx);
        } else if retryable {
            self.retry_or_fail(i, error, now, &mut fx);
        } else {
            let label = self.doc.tasks[i].work.label();
            self.set_task_state(i, TaskState::Failed, error, now, &mut fx);
            self.mirror(i, TaskState::Failed, error, now, &mut fx);
            self.fail_run(&format!("task {label} failed: {error}"), now, &mut fx);
        }
        Ok(fx)
    }

    /// A lease ran out without a heartbeat: the task goes back to the queue
    /// (or the run fails). Nothing happens for an attempt that already ended.
    pub fn lease_expired(&mut self, local: &str, attempt: u32, now: i64) -> Effects {
        let mut fx = Vec::new();
        if let Ok(i) = self.check(local, attempt) {
            self.retry_or_fail(i, "lease expired (worker lost)", now, &mut fx);
        }
        fx
    }

    /// The fusion's outcome: fine-tuning starts, or the run fails. Ignored
    /// when the run left the fusing state meanwhile (it was cancelled).
    pub fn fused(
        &mut self,
        outcome: std::result::Result<Vec<FusedRecord>, String>,
        now: i64,
    ) -> Effects {
        let mut fx = Vec::new();
        if self.doc.state != RunState::Fusing {
            return fx;
        }
        match outcome {
            Ok(records) => {
                let methods: Vec<_> = records.iter().map(|r| r.method).collect();
                self.doc.fused = records;
                self.set_run_state(RunState::FineTuning, "", now, &mut fx);
                let distilled = self.plan.compare.distill.is_some();
                let mut works = Vec::new();
                for method in methods {
                    for distilled in [false, true].into_iter().take(1 + distilled as usize) {
                        works.push(TaskWork::FineTune { method, distilled });
                    }
                }
                if self.plan.compare.baseline {
                    works.push(TaskWork::Baseline);
                }
                self.add_phase(JointPhase::FineTunings, works, now, &mut fx);
            }
            Err(e) => self.fail_run(&format!("fusion failed: {e}"), now, &mut fx),
        }
        fx
    }

    /// Cancels an unfinished run: its tasks stop at their next heartbeat.
    pub fn cancel(&mut self, reason: &str, now: i64) -> Result<Effects> {
        if self.doc.state.is_final() {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "run `{}` already {}",
                self.doc.run_id,
                self.doc.state.name()
            )));
        }
        let reason = if reason.is_empty() {
            "cancelled by a client"
        } else {
            reason
        };
        let mut fx = Vec::new();
        self.stop_tasks(TaskState::Cancelled, reason, now, &mut fx);
        self.set_run_state(RunState::Cancelled, reason, now, &mut fx);
        Ok(fx)
    }

    // ------------------------------------------------------------ internals

    /// Adds a pending task (`note`: what its event says) and queues it,
    /// unless the joint task `group` trains it.
    fn add_task(&mut self, work: TaskWork, group: &str, note: &str, now: i64, fx: &mut Effects) {
        let mut record = TaskRecord::new(work);
        record.group = group.to_string();
        self.doc.tasks.push(record);
        let i = self.doc.tasks.len() - 1;
        self.task_event(i, note, now, fx);
        if group.is_empty() {
            fx.push(Effect::Queue {
                task: self.task_id(&self.doc.tasks[i]),
                gpu_only: self.gpu_only(),
            });
        }
    }

    /// Ends every unfinished task: pending ones leave the queue, running
    /// ones are told to stop at their next heartbeat (models trained by a
    /// joint task hold no place in the queue, and stop with it).
    fn stop_tasks(&mut self, state: TaskState, message: &str, now: i64, fx: &mut Effects) {
        for i in 0..self.doc.tasks.len() {
            if self.doc.tasks[i].state.is_unfinished() {
                self.set_task_state(i, state, message, now, fx);
                if self.doc.tasks[i].group.is_empty() {
                    fx.push(Effect::Release {
                        task: self.task_id(&self.doc.tasks[i]),
                    });
                }
            }
        }
    }

    /// Takes a model's result: its outcome and curve, its checkpoint as a
    /// member's, and the task succeeds.
    fn accept(&mut self, i: usize, delivery: Delivery, now: i64, fx: &mut Effects) {
        let canonical = self.canonical_key(i);
        let t = &mut self.doc.tasks[i];
        t.compute_seconds += delivery.compute_seconds;
        if !delivery.curve.is_empty() {
            t.curve = delivery.curve;
        }
        t.outcome = Some(delivery.outcome);
        fx.push(Effect::TaskDone {
            kind: t.work.kind(),
            compute_seconds: t.compute_seconds,
        });
        if let TaskWork::Train { member } = t.work {
            let keys = &mut self.doc.member_keys;
            if keys.len() <= member {
                keys.resize(member + 1, String::new());
            }
            keys[member] = canonical.unwrap_or_default();
        }
        self.set_task_state(i, TaskState::Succeeded, "", now, fx);
    }

    fn fail_run(&mut self, message: &str, now: i64, fx: &mut Effects) {
        self.stop_tasks(TaskState::Cancelled, "the run failed", now, fx);
        self.set_run_state(RunState::Failed, message, now, fx);
    }

    fn retry_or_fail(&mut self, i: usize, why: &str, now: i64, fx: &mut Effects) {
        let task = self.task_id(&self.doc.tasks[i]);
        fx.push(Effect::Release { task: task.clone() });
        let attempts = self.own_attempts(i);
        if attempts >= self.plan.max_attempts {
            let label = self.doc.tasks[i].work.label();
            self.set_task_state(i, TaskState::Failed, why, now, fx);
            self.mirror(i, TaskState::Failed, why, now, fx);
            let message = format!("task {label} failed after {attempts} attempt(s): {why}");
            self.fail_run(&message, now, fx);
        } else {
            self.set_task_state(i, TaskState::Pending, why, now, fx);
            self.mirror(i, TaskState::Pending, why, now, fx);
            fx.push(Effect::Queue {
                task,
                gpu_only: self.gpu_only(),
            });
        }
    }

    /// Moves the run on when every task of its phase succeeded.
    fn advance(&mut self, now: i64, fx: &mut Effects) {
        let all_done = |book: &Runbook, phase: fn(&TaskWork) -> bool| {
            book.doc
                .tasks
                .iter()
                .filter(|t| phase(&t.work))
                .all(|t| t.state == TaskState::Succeeded)
        };
        match self.doc.state {
            RunState::Queued | RunState::Training
                if all_done(self, |w| matches!(w, TaskWork::Train { .. })) =>
            {
                self.set_run_state(RunState::Fusing, "", now, fx);
                fx.push(Effect::StartFusion);
            }
            RunState::FineTuning
                if all_done(self, |w| {
                    matches!(w, TaskWork::FineTune { .. } | TaskWork::Baseline)
                }) =>
            {
                self.set_run_state(RunState::Evaluating, "", now, fx);
                self.add_task(TaskWork::Evaluate, "", "", now, fx);
            }
            RunState::Evaluating if all_done(self, |w| *w == TaskWork::Evaluate) => {
                self.set_run_state(RunState::Succeeded, "", now, fx);
                fx.push(Effect::WriteReport);
            }
            _ => {}
        }
    }
}

/// Why a result is refused.
fn refusal(directive: pb::TaskDirective, task: &str, attempt: u32) -> CoordinatorError {
    CoordinatorError::FailedPrecondition(match directive {
        pb::TaskDirective::Cancel => format!("task `{task}`: the run was cancelled"),
        _ => format!(
            "task `{task}` attempt {attempt} no longer holds its lease; its result is refused"
        ),
    })
}
