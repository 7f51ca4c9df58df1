//! The coordinator: runs and their state machine, the task scheduler with
//! leases, and the fusion step. It implements [`RunApi`] and [`WorkerApi`];
//! the gRPC adapters, the tests and the embedded mode call it through them.
//!
//! Run states: queued -> training -> fusing -> fine-tuning -> evaluating ->
//! succeeded, or failed / cancelled from any non-final state. Runs with
//! existing member checkpoints go from queued straight to fusing.
//!
//! Leases: a leased task attempt must heartbeat (or report progress) within
//! the lease TTL. A missed deadline re-queues the task as attempt + 1, which
//! resumes from the last epoch checkpoint any attempt reported; after
//! `max_attempts` the run fails. Results of an attempt whose lease was lost
//! are refused, and each attempt writes under its own prefix, so a late
//! worker can never overwrite the accepted result.

mod fuse_step;
pub mod metastore;
pub mod model;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nt_common::layout;
use nt_common::{now_ms, Storage};
use nt_proto::v1 as pb;
use nt_spec::{wire, Device, MemberPlan, Plan};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::error::{CoordinatorError, Result};
use crate::metrics::Metrics;
use metastore::{Metastore, Snapshot};
use model::{parse_task_id, task_id, RunRecord, TaskRecord, TaskWork};

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
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            max_lease_wait: Duration::from_secs(20),
            sweep_interval: Duration::from_millis(500),
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
    async fn register(
        &self,
        name: &str,
        capabilities: pb::WorkerCapabilities,
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
    /// Accepts a result, or refuses it (FailedPrecondition) when the lease was lost.
    async fn complete(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        result: pb::TaskResult,
    ) -> Result<()>;
    async fn fail(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        error: &str,
        retryable: bool,
    ) -> Result<()>;
}

struct Lease {
    attempt: u32,
    deadline: Instant,
}

struct RunEntry {
    record: RunRecord,
    /// The plan, validated at submission (or on load).
    plan: Arc<Plan>,
    events: VecDeque<pb::RunEvent>,
    tx: broadcast::Sender<pb::RunEvent>,
}

struct WorkerEntry {
    capabilities: pb::WorkerCapabilities,
    last_seen: Instant,
}

#[derive(Default)]
struct State {
    runs: BTreeMap<String, RunEntry>,
    workers: HashMap<String, WorkerEntry>,
    /// Task ids waiting for a worker, oldest first.
    pending: VecDeque<String>,
    /// Leases by task id.
    leases: HashMap<String, Lease>,
}

/// Events kept in memory per run for late watchers.
const EVENT_HISTORY: usize = 20_000;

pub struct Coordinator {
    me: std::sync::Weak<Coordinator>,
    storage: Storage,
    metastore: Metastore,
    config: CoordinatorConfig,
    state: Mutex<State>,
    task_ready: Notify,
    submit_lock: tokio::sync::Mutex<()>,
    metrics: Metrics,
    shutdown: CancellationToken,
}

fn invalid(msg: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument(msg.into())
}

impl Coordinator {
    /// Loads every stored run and carries on where each was: running tasks
    /// get a fresh lease to be reclaimed by their workers' heartbeats,
    /// pending ones are queued, an interrupted fusion starts again.
    pub async fn start(
        storage: Storage,
        config: CoordinatorConfig,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let metastore = Metastore::new(storage.clone());
        // The store may still be starting (a fresh bucket, a pod scheduled
        // before its S3 endpoint): retry for a while before giving up.
        let mut waited = Duration::ZERO;
        let records = loop {
            match metastore.load_all().await {
                Ok(r) => break r,
                Err(e) if waited < Duration::from_secs(60) && !shutdown.is_cancelled() => {
                    warn!(error = %e, "the object store is not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    waited += Duration::from_millis(500);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let coordinator = Arc::new_cyclic(|me| Coordinator {
            me: me.clone(),
            storage,
            metastore,
            config,
            state: Mutex::new(State::default()),
            task_ready: Notify::new(),
            submit_lock: tokio::sync::Mutex::new(()),
            metrics,
            shutdown,
        });
        let mut fusing = Vec::new();
        {
            let mut st = coordinator.lock();
            for record in records {
                let run_id = record.run.run_id.clone();
                let plan = match Plan::from_wire(
                    &record.run.spec.clone().unwrap_or_default(),
                    &|r| coordinator.storage.key_of(r),
                ) {
                    Ok(p) => Arc::new(p),
                    Err(e) => {
                        warn!(run_id = %run_id, error = %e, "stored run no longer validates; leaving it as it is");
                        continue;
                    }
                };
                let (tx, _) = broadcast::channel(1024);
                let now = Instant::now();
                for (i, t) in record.run.tasks.iter().enumerate() {
                    let id = task_id(&run_id, &record.tasks[i].work.local_name());
                    match record.task_state(i) {
                        pb::TaskState::Pending if !record.is_final() => st.pending.push_back(id),
                        pb::TaskState::Running if !record.is_final() => {
                            st.leases.insert(
                                id,
                                Lease {
                                    attempt: t.attempt,
                                    deadline: now + coordinator.config.lease_ttl,
                                },
                            );
                        }
                        _ => {}
                    }
                }
                if record.state() == pb::RunState::Fusing {
                    fusing.push(run_id.clone());
                }
                info!(run_id = %run_id, state = ?record.state(), "loaded run");
                st.runs.insert(
                    run_id,
                    RunEntry {
                        record,
                        plan,
                        events: VecDeque::new(),
                        tx,
                    },
                );
            }
            coordinator.update_gauges(&st);
        }
        for run in fusing {
            coordinator.clone().spawn_fusion(run);
        }
        coordinator.clone().spawn_sweeper();
        Ok(coordinator)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    // ------------------------------------------------------------ bookkeeping

    fn update_gauges(&self, st: &State) {
        let mut runs: HashMap<&'static str, i64> = HashMap::new();
        let mut tasks: HashMap<&'static str, i64> = HashMap::new();
        for e in st.runs.values() {
            *runs.entry(run_state_name(e.record.state())).or_default() += 1;
            for i in 0..e.record.tasks.len() {
                *tasks
                    .entry(task_state_name(e.record.task_state(i)))
                    .or_default() += 1;
            }
        }
        self.metrics.set_runs(&runs);
        self.metrics.set_tasks(&tasks);
        self.metrics.queue_depth.set(st.pending.len() as i64);
        self.metrics.workers.set(st.workers.len() as i64);
    }

    /// Appends an event to a run and sends it to watchers.
    fn emit(entry: &mut RunEntry, event: pb::run_event::Event) {
        entry.record.event_sequence += 1;
        let ev = pb::RunEvent {
            run_id: entry.record.run.run_id.clone(),
            sequence: entry.record.event_sequence,
            time_unix_ms: now_ms(),
            event: Some(event),
        };
        if entry.events.len() >= EVENT_HISTORY {
            entry.events.pop_front();
        }
        entry.events.push_back(ev.clone());
        let _ = entry.tx.send(ev);
    }

    fn set_run_state(entry: &mut RunEntry, state: pb::RunState, message: &str) {
        if entry.record.state() == state {
            return;
        }
        entry.record.run.state = state as i32;
        entry.record.run.message = message.to_string();
        if entry.record.is_final() {
            entry.record.finished_ms = Some(now_ms());
            if let Some(report) = entry.record.run.report.as_mut() {
                let t = report.timings.get_or_insert_with(Default::default);
                t.wall_seconds = (now_ms() - entry.record.run.created_unix_ms) as f64 / 1000.0;
            }
        }
        Self::emit(
            entry,
            pb::run_event::Event::StateChanged(pb::RunStateChanged {
                state: state as i32,
                message: message.to_string(),
            }),
        );
    }

    fn set_task_state(entry: &mut RunEntry, i: usize, state: pb::TaskState, message: &str) {
        let status = &mut entry.record.run.tasks[i];
        status.state = state as i32;
        if matches!(state, pb::TaskState::Failed) || !message.is_empty() {
            status.error = message.to_string();
        }
        if state != pb::TaskState::Running {
            status.worker_id.clear();
        }
        let ev = pb::TaskStateChanged {
            task_id: status.task_id.clone(),
            label: status.label.clone(),
            state: state as i32,
            attempt: status.attempt,
            worker_id: status.worker_id.clone(),
            message: message.to_string(),
        };
        Self::emit(entry, pb::run_event::Event::TaskChanged(ev));
    }

    /// Bumps the revision and serializes the run for storage.
    fn snapshot(entry: &mut RunEntry) -> Result<Snapshot> {
        entry.record.revision += 1;
        entry.record.run.updated_unix_ms = now_ms();
        Snapshot::of(&entry.record)
    }

    async fn save(&self, snap: Snapshot) -> Result<()> {
        self.metastore.save(snap).await
    }

    /// Cancels every unfinished task of a run (pending ones leave the queue,
    /// running ones are told to stop at their next heartbeat).
    fn stop_tasks(st: &mut State, run_id: &str, state: pb::TaskState, message: &str) {
        let Some(entry) = st.runs.get_mut(run_id) else {
            return;
        };
        let mut stopped = Vec::new();
        for i in 0..entry.record.tasks.len() {
            if matches!(
                entry.record.task_state(i),
                pb::TaskState::Pending | pb::TaskState::Running
            ) {
                Self::set_task_state(entry, i, state, message);
                stopped.push(task_id(run_id, &entry.record.tasks[i].work.local_name()));
            }
        }
        st.pending.retain(|t| !stopped.contains(t));
        for t in &stopped {
            st.leases.remove(t);
        }
    }

    fn fail_run(&self, st: &mut State, run_id: &str, message: &str) {
        warn!(run_id, message, "run failed");
        Self::stop_tasks(st, run_id, pb::TaskState::Cancelled, "the run failed");
        if let Some(entry) = st.runs.get_mut(run_id) {
            Self::set_run_state(entry, pb::RunState::Failed, message);
        }
    }

    // ------------------------------------------------------------ tasks

    /// Adds a task to a run and queues it.
    fn add_task(st: &mut State, run_id: &str, work: TaskWork) {
        if let Some(id) = Self::add_task_unqueued(st, run_id, work) {
            st.pending.push_back(id);
        }
    }

    /// Adds a task to a run; the caller queues the returned id.
    fn add_task_unqueued(st: &mut State, run_id: &str, work: TaskWork) -> Option<String> {
        let entry = st.runs.get_mut(run_id)?;
        let local = work.local_name();
        let id = task_id(run_id, &local);
        entry.record.run.tasks.push(pb::TaskStatus {
            task_id: id.clone(),
            kind: work.kind() as i32,
            state: pb::TaskState::Pending as i32,
            attempt: 0,
            worker_id: String::new(),
            label: work.label(),
            progress: None,
            error: String::new(),
            checkpoint: String::new(),
        });
        entry.record.tasks.push(TaskRecord {
            work,
            checkpoint_epoch: 0,
            curve: Vec::new(),
            result: None,
            compute_seconds: 0.0,
        });
        let i = entry.record.tasks.len() - 1;
        Self::set_task_state(entry, i, pb::TaskState::Pending, "");
        Some(id)
    }

    /// The wire form of an attempt of task `i` of a run.
    fn task_message(&self, entry: &RunEntry, i: usize) -> pb::Task {
        let plan = &entry.plan;
        let run_id = &entry.record.run.run_id;
        let rec = &entry.record.tasks[i];
        let status = &entry.record.run.tasks[i];
        let local = rec.work.local_name();
        let mut task = pb::Task {
            task_id: status.task_id.clone(),
            run_id: run_id.clone(),
            attempt: status.attempt,
            kind: rec.work.kind() as i32,
            label: status.label.clone(),
            architecture_json: plan.arch.spec().to_json(),
            data: entry.record.run.spec.as_ref().and_then(|s| s.data.clone()),
            output_prefix: layout::attempt_prefix(run_id, &local, status.attempt),
            resume_state: status.checkpoint.clone(),
            device: match plan.device {
                Device::Any => pb::DeviceRequirement::Unspecified,
                Device::Gpu => pb::DeviceRequirement::Gpu,
                Device::Cpu => pb::DeviceRequirement::Cpu,
            } as i32,
            eval_batch_size: plan.eval_batch as u32,
            ..Default::default()
        };
        match &rec.work {
            TaskWork::Train { member } => {
                if let MemberPlan::Train(configs) = &plan.members {
                    let c = &configs[*member];
                    task.training = Some(wire::training_to_wire(c));
                    task.seed = c.seed;
                }
            }
            TaskWork::FineTune { method } => {
                let c = &plan.fine_tune;
                task.training = Some(wire::training_to_wire(c));
                task.seed = c.seed;
                task.init_checkpoint = layout::fused(run_id, method.as_str());
                if let Some(d) = c.distill {
                    task.teacher_checkpoints = entry.record.member_keys.clone();
                    task.distill = Some(pb::Distillation {
                        temperature: Some(d.temperature),
                        weight: Some(d.weight),
                    });
                }
            }
            TaskWork::Evaluate => {
                let keys = &entry.record.member_keys;
                for (m, k) in keys.iter().enumerate() {
                    task.evaluate.push(pb::EvaluationItem {
                        name: format!("member {m}"),
                        checkpoints: vec![k.clone()],
                    });
                }
                task.evaluate.push(pb::EvaluationItem {
                    name: "ensemble".into(),
                    checkpoints: keys.clone(),
                });
                for f in &entry.record.fused {
                    task.evaluate.push(pb::EvaluationItem {
                        name: f.method.to_string(),
                        checkpoints: vec![f.key.clone()],
                    });
                    task.evaluate.push(pb::EvaluationItem {
                        name: format!("{} after fine-tuning", f.method),
                        checkpoints: vec![layout::fine_tuned(run_id, f.method.as_str())],
                    });
                }
            }
        }
        task
    }

    /// Where an attempt's message says it is, relative to the run's current
    /// state: `Ok(index)` when it holds the lease, else the directive to send.
    fn check_lease(
        st: &State,
        task: &str,
        attempt: u32,
    ) -> std::result::Result<(String, usize), pb::TaskDirective> {
        let Some((run_id, local)) = parse_task_id(task) else {
            return Err(pb::TaskDirective::LeaseLost);
        };
        let Some(entry) = st.runs.get(run_id) else {
            return Err(pb::TaskDirective::LeaseLost);
        };
        let Some(i) = entry.record.task_index(local) else {
            return Err(pb::TaskDirective::LeaseLost);
        };
        if entry.record.state() == pb::RunState::Cancelled {
            return Err(pb::TaskDirective::Cancel);
        }
        let status = &entry.record.run.tasks[i];
        if entry.record.task_state(i) != pb::TaskState::Running || status.attempt != attempt {
            return Err(pb::TaskDirective::LeaseLost);
        }
        Ok((run_id.to_string(), i))
    }

    /// Re-queues a task whose attempt ended without a result, or fails the
    /// run when it has used its attempts.
    fn retry_or_fail(&self, st: &mut State, run_id: &str, i: usize, why: &str) {
        let Some(entry) = st.runs.get_mut(run_id) else {
            return;
        };
        let status = &entry.record.run.tasks[i];
        let id = status.task_id.clone();
        let label = status.label.clone();
        st.leases.remove(&id);
        let attempts = status.attempt;
        if attempts >= entry.plan.max_attempts {
            let msg = format!("task {label} failed after {attempts} attempt(s): {why}");
            Self::set_task_state(entry, i, pb::TaskState::Failed, why);
            self.fail_run(st, run_id, &msg);
        } else {
            Self::set_task_state(entry, i, pb::TaskState::Pending, why);
            st.pending.push_back(id);
            self.task_ready.notify_waiters();
        }
    }

    fn spawn_sweeper(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.config.sweep_interval);
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let snaps = {
                    let mut st = self.lock();
                    let now = Instant::now();
                    let expired: Vec<(String, u32)> = st
                        .leases
                        .iter()
                        .filter(|(_, l)| l.deadline < now)
                        .map(|(id, l)| (id.clone(), l.attempt))
                        .collect();
                    let mut touched = Vec::new();
                    for (id, attempt) in expired {
                        self.metrics.lease_expiries.inc();
                        if let Ok((run_id, i)) = Self::check_lease(&st, &id, attempt) {
                            warn!(task_id = %id, attempt, "lease expired; re-queuing");
                            self.retry_or_fail(&mut st, &run_id, i, "lease expired (worker lost)");
                            touched.push(run_id);
                        } else {
                            st.leases.remove(&id);
                        }
                    }
                    touched.dedup();
                    let silent = self.config.heartbeat_interval * 10 + self.config.lease_ttl;
                    st.workers.retain(|_, w| w.last_seen.elapsed() < silent);
                    let snaps: Vec<_> = touched
                        .iter()
                        .filter_map(|r| st.runs.get_mut(r).and_then(|e| Self::snapshot(e).ok()))
                        .collect();
                    self.update_gauges(&st);
                    snaps
                };
                for s in snaps {
                    if let Err(e) = self.save(s).await {
                        warn!(error = %e, "saving after lease expiry");
                    }
                }
            }
        });
    }

    /// Advances a run whose tasks of the current phase all succeeded.
    /// Returns true when the fusion step must be started.
    fn advance(&self, st: &mut State, run_id: &str) -> bool {
        let Some(entry) = st.runs.get_mut(run_id) else {
            return false;
        };
        if entry.record.is_final() {
            return false;
        }
        let all_done = |entry: &RunEntry, pred: &dyn Fn(&TaskWork) -> bool| {
            entry
                .record
                .tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| pred(&t.work))
                .all(|(i, _)| entry.record.task_state(i) == pb::TaskState::Succeeded)
        };
        match entry.record.state() {
            pb::RunState::Queued | pb::RunState::Training
                if all_done(entry, &|w| matches!(w, TaskWork::Train { .. })) =>
            {
                Self::set_run_state(entry, pb::RunState::Fusing, "");
                return true;
            }
            pb::RunState::FineTuning
                if all_done(entry, &|w| matches!(w, TaskWork::FineTune { .. })) =>
            {
                Self::set_run_state(entry, pb::RunState::Evaluating, "");
                Self::add_task(st, run_id, TaskWork::Evaluate);
                self.task_ready.notify_waiters();
            }
            pb::RunState::Evaluating if all_done(entry, &|w| matches!(w, TaskWork::Evaluate)) => {
                Self::finish_report(entry);
                Self::set_run_state(entry, pb::RunState::Succeeded, "");
                info!(run_id, "run succeeded");
            }
            _ => {}
        }
        false
    }

    /// Assembles the final report from the evaluation and the other tasks.
    fn finish_report(entry: &mut RunEntry) {
        let rec = &entry.record;
        let evals: HashMap<String, pb::ModelReport> = rec
            .tasks
            .iter()
            .filter(|t| t.work == TaskWork::Evaluate)
            .filter_map(|t| t.result.as_ref())
            .flat_map(|r| r.evaluations.iter().cloned())
            .map(|m| (m.name.clone(), m))
            .collect();
        let params = entry.plan.arch.parameter_count() as u64;
        let run_id = rec.run.run_id.clone();
        let mut report = rec.run.report.clone().unwrap_or_default();
        report.members = (0..rec.member_keys.len())
            .map(|m| {
                let mut r = evals
                    .get(&format!("member {m}"))
                    .cloned()
                    .unwrap_or_default();
                r.name = format!("member {m}");
                r.parameters = params;
                r.checkpoint = rec.member_keys[m].clone();
                r
            })
            .collect();
        let mut ensemble = evals.get("ensemble").cloned().unwrap_or_default();
        ensemble.name = "ensemble".into();
        ensemble.parameters = params * rec.member_keys.len() as u64;
        report.ensemble = Some(ensemble);
        report.fused = rec
            .fused
            .iter()
            .map(|f| {
                let name = f.method.to_string();
                let mut after_fusion = evals.get(&name).cloned().unwrap_or_default();
                after_fusion.parameters = f.parameters;
                after_fusion.checkpoint = f.key.clone();
                let tuned_name = format!("{name} after fine-tuning");
                let mut after = evals.get(&tuned_name).cloned().unwrap_or_default();
                after.parameters = f.parameters;
                after.checkpoint = layout::fine_tuned(&run_id, &name);
                pb::FusedReport {
                    method: wire::method_to_wire(f.method).map_or(0, |m| m as i32),
                    after_fusion: Some(after_fusion),
                    after_fine_tuning: Some(after),
                    fusion_seconds: f.seconds,
                    groups: f.groups.clone(),
                }
            })
            .collect();
        report.curves = rec
            .tasks
            .iter()
            .filter(|t| !t.curve.is_empty())
            .map(|t| pb::Curve {
                name: t.work.label(),
                points: t.curve.clone(),
            })
            .collect();
        let timings = report.timings.get_or_insert_with(Default::default);
        timings.task_seconds = rec.tasks.iter().map(|t| t.compute_seconds).sum();
        timings.fusion_seconds = rec.fused.iter().map(|f| f.seconds).sum();
        entry.record.run.report = Some(report);
    }

    /// Writes `report.json` next to the run document once the run succeeded.
    async fn write_report(&self, run_id: &str) {
        let report = {
            let st = self.lock();
            st.runs
                .get(run_id)
                .and_then(|e| e.record.run.report.clone())
        };
        if let Some(report) = report {
            match serde_json::to_vec_pretty(&report) {
                Ok(bytes) => {
                    if let Err(e) = self
                        .storage
                        .put(&layout::report(run_id), bytes.into())
                        .await
                    {
                        warn!(run_id, error = %e, "writing report.json");
                    }
                }
                Err(e) => warn!(run_id, error = %e, "serializing the report"),
            }
        }
    }

    /// Checks existing member checkpoints: each exists and fits the
    /// architecture. Reads only each file's size and header (two ranged
    /// reads), not its data: a truncated file shows in the size, a wrong
    /// architecture in the header.
    async fn check_existing_members(&self, plan: &Plan) -> Result<()> {
        let MemberPlan::Existing(keys) = &plan.members else {
            return Ok(());
        };
        for (i, key) in keys.iter().enumerate() {
            let field = format!("members.checkpoints[{i}]");
            let Some(size) = self.storage.size(key).await? else {
                return Err(CoordinatorError::NotFound(format!(
                    "{field}: object `{key}` does not exist in {}",
                    self.storage.url
                )));
            };
            let first = if size < 8 {
                bytes::Bytes::new()
            } else {
                self.storage.get_range(key, 0..8).await?
            };
            let n = fusion::checkpoint::header_len(key, &first, size)
                .map_err(|e| invalid(format!("{field}: {e}")))?;
            let header = self.storage.get_range(key, 8..8 + n).await?;
            fusion::checkpoint::validate_header(key, &header, size, &plan.arch)
                .map_err(|e| invalid(format!("{field}: {e}")))?;
        }
        Ok(())
    }
}

fn run_state_name(s: pb::RunState) -> &'static str {
    match s {
        pb::RunState::Unspecified => "unspecified",
        pb::RunState::Queued => "queued",
        pb::RunState::Training => "training",
        pb::RunState::Fusing => "fusing",
        pb::RunState::FineTuning => "fine_tuning",
        pb::RunState::Evaluating => "evaluating",
        pb::RunState::Succeeded => "succeeded",
        pb::RunState::Failed => "failed",
        pb::RunState::Cancelled => "cancelled",
    }
}

fn task_state_name(s: pb::TaskState) -> &'static str {
    match s {
        pb::TaskState::Unspecified => "unspecified",
        pb::TaskState::Pending => "pending",
        pb::TaskState::Running => "running",
        pb::TaskState::Succeeded => "succeeded",
        pb::TaskState::Failed => "failed",
        pb::TaskState::Cancelled => "cancelled",
    }
}

impl RunApi for Coordinator {
    #[instrument(skip_all, fields(run_id, request_id = %request_id))]
    async fn submit(&self, spec: pb::RunSpec, request_id: String) -> Result<(pb::Run, bool)> {
        if request_id.len() > 256 {
            return Err(invalid("request_id: at most 256 bytes"));
        }
        let _serial = self.submit_lock.lock().await;
        // A request id seen before returns its run.
        let mut run_id = layout::new_run_id();
        if !request_id.is_empty() {
            if let Some(existing) = self.metastore.request(&request_id).await? {
                if let Some(e) = self.lock().runs.get(&existing) {
                    return Ok((e.record.run.clone(), false));
                }
                // A document there that start-up could not read: never overwrite it.
                if self
                    .storage
                    .size(&layout::run_doc(&existing))
                    .await?
                    .is_some()
                {
                    return Err(CoordinatorError::FailedPrecondition(format!(
                        "request_id `{request_id}` belongs to run {existing}, whose stored \
                         document could not be read at start-up (see the coordinator's log)"
                    )));
                }
                // Claimed by a submission that stopped before storing its run: finish it.
                run_id = existing;
            }
        }
        tracing::Span::current().record("run_id", run_id.as_str());
        let plan = Plan::from_wire(&spec, &|r| self.storage.key_of(r))?;
        self.check_existing_members(&plan).await?;
        if !request_id.is_empty() {
            run_id = self.metastore.claim_request(&request_id, &run_id).await?;
        }
        let now = now_ms();
        let record = RunRecord {
            format: model::FORMAT,
            revision: 0,
            run: pb::Run {
                run_id: run_id.clone(),
                request_id: request_id.clone(),
                spec: Some(spec),
                state: pb::RunState::Queued as i32,
                message: String::new(),
                created_unix_ms: now,
                updated_unix_ms: now,
                tasks: Vec::new(),
                report: Some(pb::RunReport::default()),
                storage_prefix: layout::run_prefix(&run_id),
            },
            tasks: Vec::new(),
            event_sequence: 0,
            member_keys: Vec::new(),
            fused: Vec::new(),
            finished_ms: None,
        };
        let (tx, _) = broadcast::channel(1024);
        let mut queue = Vec::new();
        let (snap, run, fuse_now) = {
            let mut st = self.lock();
            st.runs.insert(
                run_id.clone(),
                RunEntry {
                    record,
                    plan: Arc::new(plan.clone()),
                    events: VecDeque::new(),
                    tx,
                },
            );
            if let Some(entry) = st.runs.get_mut(&run_id) {
                Self::emit(
                    entry,
                    pb::run_event::Event::StateChanged(pb::RunStateChanged {
                        state: pb::RunState::Queued as i32,
                        message: String::new(),
                    }),
                );
            }
            let fuse_now = match &plan.members {
                MemberPlan::Train(configs) => {
                    for m in 0..configs.len() {
                        // Queued once the run is stored, so no lease precedes it.
                        queue.extend(Self::add_task_unqueued(
                            &mut st,
                            &run_id,
                            TaskWork::Train { member: m },
                        ));
                    }
                    false
                }
                MemberPlan::Existing(keys) => {
                    if let Some(e) = st.runs.get_mut(&run_id) {
                        e.record.member_keys = keys.clone();
                    }
                    self.advance(&mut st, &run_id)
                }
            };
            let entry = st
                .runs
                .get_mut(&run_id)
                .ok_or_else(|| CoordinatorError::Internal("run vanished".into()))?;
            let snap = Self::snapshot(entry)?;
            let run = entry.record.run.clone();
            self.update_gauges(&st);
            (snap, run, fuse_now)
        };
        if let Err(e) = self.save(snap).await {
            // Not stored: forget it, so nothing runs that a client was told failed.
            self.lock().runs.remove(&run_id);
            return Err(e);
        }
        {
            let mut st = self.lock();
            st.pending.extend(queue);
            self.update_gauges(&st);
        }
        info!(run_id = %run_id, "run submitted");
        self.metrics.runs_submitted.inc();
        self.task_ready.notify_waiters();
        if fuse_now {
            self.spawn_fusion_self(run_id);
        }
        Ok((run, true))
    }

    async fn get(&self, run_id: &str) -> Result<pb::Run> {
        let st = self.lock();
        st.runs
            .get(run_id)
            .map(|e| e.record.run.clone())
            .ok_or_else(|| CoordinatorError::NotFound(format!("run `{run_id}` does not exist")))
    }

    async fn list(
        &self,
        page_size: usize,
        page_token: &str,
        state: pb::RunState,
    ) -> Result<(Vec<pb::Run>, String)> {
        let size = if page_size == 0 {
            50
        } else {
            page_size.min(500)
        };
        let st = self.lock();
        let iter = st
            .runs
            .iter()
            .rev()
            .filter(|(id, _)| page_token.is_empty() || id.as_str() < page_token);
        let mut runs = Vec::new();
        let mut last = String::new();
        for (id, e) in iter {
            if state != pb::RunState::Unspecified && e.record.state() != state {
                continue;
            }
            if runs.len() == size {
                return Ok((runs, last));
            }
            last = id.clone();
            runs.push(e.record.run.clone());
        }
        Ok((runs, String::new()))
    }

    async fn watch(
        &self,
        run_id: &str,
        after: u64,
    ) -> Result<(Vec<pb::RunEvent>, Option<broadcast::Receiver<pb::RunEvent>>)> {
        let st = self.lock();
        let e = st
            .runs
            .get(run_id)
            .ok_or_else(|| CoordinatorError::NotFound(format!("run `{run_id}` does not exist")))?;
        let mut past: Vec<pb::RunEvent> = e
            .events
            .iter()
            .filter(|ev| ev.sequence > after)
            .cloned()
            .collect();
        if past.is_empty() && e.events.is_empty() && e.record.event_sequence > after {
            // Events from before a coordinator restart are gone: say where the run is.
            past.push(pb::RunEvent {
                run_id: run_id.to_string(),
                sequence: e.record.event_sequence,
                time_unix_ms: now_ms(),
                event: Some(pb::run_event::Event::StateChanged(pb::RunStateChanged {
                    state: e.record.run.state,
                    message: e.record.run.message.clone(),
                })),
            });
        }
        let live = (!e.record.is_final()).then(|| e.tx.subscribe());
        Ok((past, live))
    }

    #[instrument(skip_all, fields(run_id = %run_id))]
    async fn cancel(&self, run_id: &str, reason: &str) -> Result<pb::Run> {
        let (snap, run) = {
            let mut st = self.lock();
            let entry = st.runs.get(run_id).ok_or_else(|| {
                CoordinatorError::NotFound(format!("run `{run_id}` does not exist"))
            })?;
            if entry.record.is_final() {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "run `{run_id}` already {}",
                    run_state_name(entry.record.state())
                )));
            }
            let reason = if reason.is_empty() {
                "cancelled by a client"
            } else {
                reason
            };
            Self::stop_tasks(&mut st, run_id, pb::TaskState::Cancelled, reason);
            let entry = st
                .runs
                .get_mut(run_id)
                .ok_or_else(|| CoordinatorError::Internal("run vanished".into()))?;
            Self::set_run_state(entry, pb::RunState::Cancelled, reason);
            let snap = Self::snapshot(entry)?;
            let run = entry.record.run.clone();
            self.update_gauges(&st);
            (snap, run)
        };
        self.save(snap).await?;
        info!("run cancelled");
        Ok(run)
    }
}

impl WorkerApi for Coordinator {
    async fn register(
        &self,
        name: &str,
        capabilities: pb::WorkerCapabilities,
    ) -> Result<pb::RegisterWorkerResponse> {
        let id = format!(
            "{}-{}",
            if name.is_empty() { "worker" } else { name },
            &layout::new_run_id()[17..]
        );
        info!(worker_id = %id, gpus = capabilities.gpus, slots = capabilities.slots, "worker registered");
        let mut st = self.lock();
        st.workers.insert(
            id.clone(),
            WorkerEntry {
                capabilities,
                last_seen: Instant::now(),
            },
        );
        self.update_gauges(&st);
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
            let leased = {
                let mut st = self.lock();
                let gpus = match st.workers.get_mut(worker_id) {
                    Some(w) => {
                        w.last_seen = Instant::now();
                        w.capabilities.gpus
                    }
                    None => {
                        return Err(CoordinatorError::NotFound(format!(
                            "worker `{worker_id}` is not registered (register again)"
                        )))
                    }
                };
                self.pick(&mut st, worker_id, gpus)?
            };
            if let Some((task, snap)) = leased {
                tracing::Span::current().record("task_id", task.task_id.as_str());
                if let Err(e) = self.save(snap).await {
                    // Not durable: give the task back rather than risk two attempts with one number.
                    let mut st = self.lock();
                    if let Ok((run_id, i)) = Self::check_lease(&st, &task.task_id, task.attempt) {
                        if let Some(entry) = st.runs.get_mut(&run_id) {
                            entry.record.run.tasks[i].attempt -= 1;
                            Self::set_task_state(entry, i, pb::TaskState::Pending, "");
                        }
                        st.leases.remove(&task.task_id);
                        st.pending.push_front(task.task_id.clone());
                    }
                    return Err(e);
                }
                self.metrics.leases.inc();
                info!(attempt = task.attempt, "task leased");
                return Ok(Some(task));
            }
            let now = Instant::now();
            if now >= deadline || self.shutdown.is_cancelled() {
                return Ok(None);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(deadline - now) => return Ok(None),
                _ = self.shutdown.cancelled() => return Ok(None),
            }
        }
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        tasks: &[pb::TaskLease],
    ) -> Result<Vec<pb::TaskInstruction>> {
        let mut st = self.lock();
        if let Some(w) = st.workers.get_mut(worker_id) {
            w.last_seen = Instant::now();
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            let directive = match Self::check_lease(&st, &t.task_id, t.attempt) {
                Ok(_) => {
                    if let Some(l) = st.leases.get_mut(&t.task_id) {
                        l.deadline = Instant::now() + self.config.lease_ttl;
                    }
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
        let snap = {
            let mut st = self.lock();
            let (run_id, i) = match Self::check_lease(&st, &req.task_id, req.attempt) {
                Ok(x) => x,
                Err(d) => return Ok(d),
            };
            if let Some(l) = st.leases.get_mut(&req.task_id) {
                l.deadline = Instant::now() + self.config.lease_ttl;
            }
            // The last training throughput (evaluations report none).
            if let Some(p) = req.progress.as_ref().filter(|p| p.samples_per_second > 0.0) {
                self.metrics
                    .set_samples_per_second(worker_id, p.samples_per_second);
            }
            let Some(entry) = st.runs.get_mut(&run_id) else {
                return Ok(pb::TaskDirective::LeaseLost);
            };
            let status = &mut entry.record.run.tasks[i];
            // A checkpoint-only report carries no progress: keep the last.
            if req.progress.is_some() {
                status.progress = req.progress;
            }
            let label = status.label.clone();
            let mut durable = false;
            if !req.checkpoint.is_empty()
                && req.checkpoint_epoch >= entry.record.tasks[i].checkpoint_epoch
            {
                status.checkpoint = req.checkpoint.clone();
                entry.record.tasks[i].checkpoint_epoch = req.checkpoint_epoch;
                durable = true;
            }
            if let Some(point) = req.epoch {
                let curve = &mut entry.record.tasks[i].curve;
                curve.retain(|p| p.epoch < point.epoch);
                curve.push(point);
            }
            if req.progress.is_some() {
                Self::emit(
                    entry,
                    pb::run_event::Event::TaskProgress(pb::TaskProgressed {
                        task_id: req.task_id.clone(),
                        label,
                        progress: req.progress,
                    }),
                );
            }
            if durable {
                Some(Self::snapshot(entry)?)
            } else {
                None
            }
        };
        if let Some(s) = snap {
            self.save(s).await?;
        }
        Ok(pb::TaskDirective::Continue)
    }

    #[instrument(skip_all, fields(worker_id = %worker_id, task_id = %task_id, run_id = run_of(task_id), attempt))]
    async fn complete(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        result: pb::TaskResult,
    ) -> Result<()> {
        // Validate first, copy the attempt's outputs to their canonical keys, then accept.
        let (run_id, i, work) = {
            let st = self.lock();
            let (run_id, i) = Self::check_lease(&st, task_id, attempt).map_err(|d| {
                CoordinatorError::FailedPrecondition(match d {
                    pb::TaskDirective::Cancel => format!("task `{task_id}`: the run was cancelled"),
                    _ => format!(
                        "task `{task_id}` attempt {attempt} no longer holds its lease; its result is refused"
                    ),
                })
            })?;
            let work = st.runs[&run_id].record.tasks[i].work.clone();
            (run_id, i, work)
        };
        let canonical = match &work {
            TaskWork::Train { member } => Some(layout::member(&run_id, *member)),
            TaskWork::FineTune { method } => Some(layout::fine_tuned(&run_id, method.as_str())),
            TaskWork::Evaluate => None,
        };
        if let Some(dest) = &canonical {
            let expected_prefix = format!(
                "{}/",
                layout::attempt_prefix(&run_id, &work.local_name(), attempt)
            );
            if !result.checkpoint.starts_with(&expected_prefix) {
                return Err(invalid(format!(
                    "result checkpoint `{}` is not under this attempt's prefix `{expected_prefix}`",
                    result.checkpoint
                )));
            }
            if !self.storage.exists(&result.checkpoint).await? {
                return Err(CoordinatorError::NotFound(format!(
                    "result checkpoint `{}` does not exist",
                    result.checkpoint
                )));
            }
            self.storage.copy(&result.checkpoint, dest).await?;
        }
        let (snap, fuse, finished) = {
            let mut st = self.lock();
            // The lease may have been lost while copying.
            let (run_id, i2) = Self::check_lease(&st, task_id, attempt).map_err(|_| {
                CoordinatorError::FailedPrecondition(format!(
                    "task `{task_id}` attempt {attempt} lost its lease while completing; its result is refused"
                ))
            })?;
            debug_assert_eq!(i, i2);
            st.leases.remove(task_id);
            let entry = st
                .runs
                .get_mut(&run_id)
                .ok_or_else(|| CoordinatorError::Internal("run vanished".into()))?;
            let rec = &mut entry.record.tasks[i];
            rec.compute_seconds += result.compute_seconds;
            if !result.curve.is_empty() {
                rec.curve = result.curve.clone();
            }
            rec.result = Some(result);
            self.metrics
                .task_duration
                .with_label_values(&[work.kind().as_str_name()])
                .observe(rec.compute_seconds);
            if let TaskWork::Train { member } = work {
                let keys = &mut entry.record.member_keys;
                if keys.len() <= member {
                    keys.resize(member + 1, String::new());
                }
                keys[member] = canonical.clone().unwrap_or_default();
            }
            Self::set_task_state(entry, i, pb::TaskState::Succeeded, "");
            let fuse = self.advance(&mut st, &run_id);
            let entry = st
                .runs
                .get_mut(&run_id)
                .ok_or_else(|| CoordinatorError::Internal("run vanished".into()))?;
            let finished = entry.record.state() == pb::RunState::Succeeded;
            let snap = Self::snapshot(entry)?;
            self.update_gauges(&st);
            (snap, fuse, finished)
        };
        self.save(snap).await?;
        info!("task completed");
        if finished {
            self.write_report(&run_id).await;
        }
        if fuse {
            self.spawn_fusion_self(run_id);
        }
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
    ) -> Result<()> {
        let snap = {
            let mut st = self.lock();
            let (run_id, i) = Self::check_lease(&st, task_id, attempt).map_err(|_| {
                CoordinatorError::FailedPrecondition(format!(
                    "task `{task_id}` attempt {attempt} no longer holds its lease"
                ))
            })?;
            warn!(error, retryable, "task attempt failed");
            if retryable {
                self.retry_or_fail(&mut st, &run_id, i, error);
            } else {
                st.leases.remove(task_id);
                if let Some(entry) = st.runs.get_mut(&run_id) {
                    let label = entry.record.run.tasks[i].label.clone();
                    Self::set_task_state(entry, i, pb::TaskState::Failed, error);
                    self.fail_run(&mut st, &run_id, &format!("task {label} failed: {error}"));
                }
            }
            let entry = st
                .runs
                .get_mut(&run_id)
                .ok_or_else(|| CoordinatorError::Internal("run vanished".into()))?;
            let snap = Self::snapshot(entry)?;
            self.update_gauges(&st);
            snap
        };
        self.save(snap).await
    }
}

impl Coordinator {
    /// Picks and leases the oldest pending task this worker can run.
    fn pick(
        &self,
        st: &mut State,
        worker_id: &str,
        gpus: u32,
    ) -> Result<Option<(pb::Task, Snapshot)>> {
        let mut chosen = None;
        for (pos, id) in st.pending.iter().enumerate() {
            let Some((run_id, local)) = parse_task_id(id) else {
                continue;
            };
            let Some(entry) = st.runs.get(run_id) else {
                continue;
            };
            if entry.plan.device == Device::Gpu && gpus == 0 {
                continue;
            }
            if let Some(i) = entry.record.task_index(local) {
                chosen = Some((pos, run_id.to_string(), i));
                break;
            }
        }
        let Some((pos, run_id, i)) = chosen else {
            return Ok(None);
        };
        st.pending.remove(pos);
        let entry = st
            .runs
            .get_mut(&run_id)
            .ok_or_else(|| CoordinatorError::Internal("run vanished".into()))?;
        entry.record.run.tasks[i].attempt += 1;
        entry.record.run.tasks[i].worker_id = worker_id.to_string();
        entry.record.run.tasks[i].progress = None;
        entry.record.tasks[i].curve.clear();
        Self::set_task_state(entry, i, pb::TaskState::Running, "");
        if entry.record.state() == pb::RunState::Queued {
            Self::set_run_state(entry, pb::RunState::Training, "");
        }
        let task = self.task_message(entry, i);
        let snap = Self::snapshot(entry)?;
        st.leases.insert(
            task.task_id.clone(),
            Lease {
                attempt: task.attempt,
                deadline: Instant::now() + self.config.lease_ttl,
            },
        );
        self.update_gauges(st);
        Ok(Some((task, snap)))
    }

    fn spawn_fusion_self(&self, run_id: String) {
        if let Some(me) = self.me.upgrade() {
            me.spawn_fusion(run_id);
        }
    }
}

/// The run part of a task id, for log spans.
fn run_of(task_id: &str) -> &str {
    parse_task_id(task_id).map_or("", |(run, _)| run)
}
