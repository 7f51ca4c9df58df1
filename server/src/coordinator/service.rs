//! The coordinator's driver: it holds every run's committed [`Runbook`] and
//! the [`Scheduler`], changes runs through one mutate-then-commit path
//! ([`Coordinator::commit`]) and performs the runbooks' effects. The
//! client- and worker-facing operations are in `run_api.rs` and
//! `worker_api.rs`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nt_common::{layout, now_ms, Storage};
use nt_proto::v1 as pb;
use nt_spec::Plan;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api::CoordinatorConfig;
use super::document::{parse_task_id, RunDocument};
use super::lease::StoreLease;
use super::runbook::{Effect, Runbook};
use super::scheduler::{Queued, Scheduler};
use super::store::RunStore;
use crate::error::{CoordinatorError, Result};
use crate::metrics::Metrics;

/// Events kept in memory per run for late watchers.
const EVENT_HISTORY: usize = 20_000;
/// Events a finished run keeps (its end among them): enough for a watcher
/// that reconnects, little for a coordinator holding thousands of runs.
const FINISHED_HISTORY: usize = 256;

/// Locks a std mutex, carrying on after a panic elsewhere (the data are
/// only ever replaced whole, never left half-changed).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One run in memory.
pub(super) struct RunSlot {
    /// Serializes this run's changes; held across the store write.
    write: tokio::sync::Mutex<()>,
    /// The committed state: replaced only after its write succeeded.
    pub(super) book: Mutex<Runbook>,
    /// Recent events, for watchers that join late.
    pub(super) events: Mutex<VecDeque<pb::RunEvent>>,
    /// Live events for watchers; dropped once the run is final (its
    /// preallocated buffer is most of a finished run's memory).
    pub(super) tx: Mutex<Option<broadcast::Sender<pb::RunEvent>>>,
}

impl RunSlot {
    fn new(book: Runbook) -> Arc<Self> {
        Arc::new(RunSlot {
            write: tokio::sync::Mutex::new(()),
            book: Mutex::new(book),
            events: Mutex::new(VecDeque::new()),
            tx: Mutex::new(Some(broadcast::channel(1024).0)),
        })
    }
}

/// Keeps `next` as the run's committed state (when given) and publishes
/// the change's events in the same critical section, so a watcher reading
/// the state and the history together sees both or neither. Returns the
/// other effects.
fn publish(slot: &RunSlot, next: Option<Runbook>, effects: Vec<Effect>) -> Vec<Effect> {
    let mut book = lock(&slot.book);
    if let Some(next) = next {
        *book = next;
    }
    let mut events = lock(&slot.events);
    let mut rest = Vec::with_capacity(effects.len());
    for effect in effects {
        match effect {
            Effect::Emit(event) => {
                if events.len() >= EVENT_HISTORY {
                    events.pop_front();
                }
                events.push_back(event.clone());
                if let Some(tx) = lock(&slot.tx).as_ref() {
                    let _ = tx.send(event);
                }
            }
            other => rest.push(other),
        }
    }
    if book.state().is_final() {
        // Watchers already subscribed drain what was sent, then see the end.
        lock(&slot.tx).take();
        let excess = events.len().saturating_sub(FINISHED_HISTORY);
        events.drain(..excess);
        events.shrink_to_fit();
    }
    rest
}

/// What a change to a run produced.
pub(super) struct Step<R> {
    pub value: R,
    pub effects: Vec<Effect>,
    /// Whether the change must be stored before it is kept. Progress without
    /// a new resumable state is kept in memory only.
    pub durable: bool,
}

impl<R> Step<R> {
    pub fn stored(value: R, effects: Vec<Effect>) -> Self {
        Step {
            value,
            effects,
            durable: true,
        }
    }
}

pub struct Coordinator {
    pub(super) me: Weak<Coordinator>,
    pub(super) storage: Storage,
    pub(super) store: RunStore,
    pub(super) config: CoordinatorConfig,
    pub(super) runs: Mutex<BTreeMap<String, Arc<RunSlot>>>,
    pub(super) scheduler: Mutex<Scheduler>,
    pub(super) task_ready: Notify,
    pub(super) submit_lock: tokio::sync::Mutex<()>,
    pub(super) metrics: Metrics,
    pub(super) shutdown: CancellationToken,
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
        // The store may still be starting (a fresh bucket, a pod scheduled
        // before its S3 endpoint): retry for a while before giving up. A
        // store another coordinator holds is refused at once.
        let holder = format!("coordinator-{}", &layout::new_run_id()[4..]);
        let mut waited = Duration::ZERO;
        let (store, docs) = loop {
            let attempt = async {
                let lease = StoreLease::acquire(
                    storage.clone(),
                    holder.clone(),
                    config.store_lease_ttl,
                    shutdown.clone(),
                )
                .await?;
                let store = RunStore::new(storage.clone(), lease);
                let docs = store.load_all().await;
                match docs {
                    Ok(docs) => Ok((store, docs)),
                    Err(e) => {
                        store.lease().release().await;
                        Err(e)
                    }
                }
            };
            match attempt.await {
                Ok(r) => break r,
                Err(CoordinatorError::Unavailable(e))
                    if waited < Duration::from_secs(60) && !shutdown.is_cancelled() =>
                {
                    warn!(error = %e, "the object store is not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    waited += Duration::from_millis(500);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let silence = config.heartbeat_interval * 10 + config.lease_ttl;
        let coordinator = Arc::new_cyclic(|me| Coordinator {
            me: me.clone(),
            store,
            scheduler: Mutex::new(Scheduler::new(
                config.lease_ttl,
                silence,
                config.lease_retry_backoff,
            )),
            config,
            storage,
            runs: Mutex::new(BTreeMap::new()),
            task_ready: Notify::new(),
            submit_lock: tokio::sync::Mutex::new(()),
            metrics,
            shutdown,
        });
        for doc in docs {
            coordinator.restore(doc).await;
        }
        coordinator.update_gauges();
        coordinator.clone().spawn_sweeper();
        Ok(coordinator)
    }

    /// Takes a stored run back: its plan is derived again from its spec.
    async fn restore(&self, doc: RunDocument) {
        let run_id = doc.run_id.clone();
        let plan = match Plan::from_wire(&doc.spec.0, &|r| self.storage.key_of(r)) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                warn!(run_id = %run_id, error = %e, "stored run no longer validates; leaving it as it is");
                return;
            }
        };
        let book = Runbook::restore(doc, plan, self.config.joint_memory_budget, now_ms());
        let effects = book.recover();
        info!(run_id = %run_id, state = book.state().name(), "loaded run");
        let slot = RunSlot::new(book);
        let effects = publish(&slot, None, effects);
        lock(&self.runs).insert(run_id, slot.clone());
        self.perform(&slot, effects).await;
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The store's error while it does not answer (for `/healthz`).
    pub fn store_error(&self) -> Option<String> {
        let lease = self.store.lease();
        lease.lost().or_else(|| lease.store_error())
    }

    /// Why this coordinator lost the store to another, if it did.
    pub fn lease_lost(&self) -> Option<String> {
        self.store.lease().lost()
    }

    /// Ends this coordinator's hold on the store: it stops writing and
    /// releases the store lease, so the next coordinator starts at once.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.store.lease().release().await;
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub(super) fn slot(&self, run_id: &str) -> Option<Arc<RunSlot>> {
        lock(&self.runs).get(run_id).cloned()
    }

    /// Adds a new run once its first document is stored.
    pub(super) async fn insert(&self, book: Runbook, effects: Vec<Effect>) -> Result<pb::Run> {
        let mut book = book;
        book.doc.revision += 1;
        self.store.save(&book.doc).await?;
        let run = super::wire::run(&book.doc, &book.plan);
        let slot = RunSlot::new(book);
        let effects = publish(&slot, None, effects);
        lock(&self.runs).insert(run.run_id.clone(), slot.clone());
        self.perform(&slot, effects).await;
        Ok(run)
    }

    /// The one way a run changes: `change` is applied to a copy of the
    /// committed runbook; a durable change is stored; only then is the copy
    /// kept and are its effects performed. Any error (from `change` or from
    /// the store) leaves the coordinator's memory as it was. Changes to one
    /// run are serialized; different runs do not wait for each other.
    pub(super) async fn commit<R>(
        &self,
        run_id: &str,
        change: impl FnOnce(&mut Runbook) -> Result<Step<R>>,
    ) -> Result<R> {
        let slot = self
            .slot(run_id)
            .ok_or_else(|| CoordinatorError::NotFound(format!("run `{run_id}` does not exist")))?;
        let _serial = slot.write.lock().await;
        let mut next = lock(&slot.book).clone();
        let was_final = next.doc.state.is_final();
        let step = change(&mut next)?;
        if step.durable {
            next.doc.revision += 1;
            next.doc.updated_ms = now_ms();
            self.store.save(&next.doc).await?;
        }
        if !was_final && next.doc.state.is_final() {
            self.metrics.run_finished(next.doc.state.name());
        }
        let effects = publish(&slot, Some(next), step.effects);
        self.perform(&slot, effects).await;
        Ok(step.value)
    }

    /// Performs a committed change's effects (its events are published).
    async fn perform(&self, slot: &Arc<RunSlot>, effects: Vec<Effect>) {
        let now = Instant::now();
        let mut ready = false;
        let run_id = lock(&slot.book).doc.run_id.clone();
        for effect in effects {
            match effect {
                Effect::Queue { task, gpu_only } => {
                    lock(&self.scheduler).queue(Queued { task, gpu_only });
                    ready = true;
                }
                Effect::Lease { task, attempt } => lock(&self.scheduler).lease(&task, attempt, now),
                Effect::Release { task } => lock(&self.scheduler).release(&task),
                Effect::StartFusion => self.spawn_fusion(run_id.clone()),
                Effect::TaskDone {
                    kind,
                    compute_seconds,
                } => self
                    .metrics
                    .task_duration
                    .with_label_values(&[kind.as_str_name()])
                    .observe(compute_seconds),
                Effect::WriteReport => self.write_report(slot).await,
                // Published with the commit (see `publish`).
                Effect::Emit(_) => {}
            }
        }
        self.update_gauges();
        if ready {
            self.task_ready.notify_waiters();
        }
    }

    /// Writes `report.json` next to the run document.
    async fn write_report(&self, slot: &RunSlot) {
        let (run_id, report) = {
            let book = lock(&slot.book);
            (
                book.doc.run_id.clone(),
                super::wire::report(&book.doc, &book.plan),
            )
        };
        match serde_json::to_vec_pretty(&report) {
            Ok(bytes) => {
                if let Err(e) = self
                    .storage
                    .put(&layout::report(&run_id), bytes.into())
                    .await
                {
                    warn!(run_id, error = %e, "writing report.json");
                }
            }
            Err(e) => warn!(run_id, error = %e, "serializing the report"),
        }
    }

    pub(super) fn update_gauges(&self) {
        let mut runs: HashMap<&'static str, i64> = HashMap::new();
        let mut tasks: HashMap<&'static str, i64> = HashMap::new();
        for slot in lock(&self.runs).values() {
            let book = lock(&slot.book);
            *runs.entry(book.state().name()).or_default() += 1;
            for t in &book.doc.tasks {
                *tasks.entry(t.state.name()).or_default() += 1;
            }
        }
        self.metrics.set_runs(&runs);
        self.metrics.set_tasks(&tasks);
        let sched = lock(&self.scheduler);
        self.metrics.queue_depth.set(sched.queue_depth() as i64);
        self.metrics.workers.set(sched.workers() as i64);
    }

    /// Fuses a run's members and records the outcome. The outcome must
    /// reach the run document: a failed write is retried until it lands or
    /// the coordinator stops (a restart then fuses again).
    fn spawn_fusion(&self, run_id: String) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let Some(slot) = me.slot(&run_id) else {
                return;
            };
            let (keys, plan) = {
                let book = lock(&slot.book);
                (book.doc.member_keys.clone(), book.plan.clone())
            };
            let start = Instant::now();
            let outcome =
                super::fusion_step::fuse_members(&me.storage, &run_id, &keys, &plan).await;
            me.metrics
                .fusion_duration
                .observe(start.elapsed().as_secs_f64());
            loop {
                let outcome = outcome.clone();
                let committed = me
                    .commit(&run_id, |book| {
                        let effects = book.fused(outcome, now_ms());
                        Ok(Step::stored((), effects))
                    })
                    .await;
                match committed {
                    Ok(()) => return,
                    Err(e) => {
                        warn!(run_id, error = %e, "saving the fusion's outcome; retrying");
                        tokio::select! {
                            _ = me.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
    }

    /// Re-queues the tasks of expired leases and forgets silent workers.
    fn spawn_sweeper(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.config.sweep_interval);
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                self.sweep(Instant::now()).await;
            }
        });
    }

    pub(super) async fn sweep(&self, now: Instant) {
        let expired = lock(&self.scheduler).expired(now);
        for (task, attempt) in expired {
            let Some((run_id, local)) = parse_task_id(&task) else {
                lock(&self.scheduler).release(&task);
                continue;
            };
            if self.slot(run_id).is_none() {
                lock(&self.scheduler).release(&task);
                continue;
            }
            let expired = self
                .commit(run_id, |book| {
                    let effects = book.lease_expired(local, attempt, now_ms());
                    if effects.is_empty() {
                        // The attempt had already ended: only the lease goes.
                        let release = vec![Effect::Release { task: task.clone() }];
                        return Ok(Step {
                            value: false,
                            effects: release,
                            durable: false,
                        });
                    }
                    Ok(Step::stored(true, effects))
                })
                .await;
            match expired {
                Ok(true) => {
                    self.metrics.lease_expiries.inc();
                    warn!(task_id = %task, attempt, "lease expired; re-queued");
                }
                Ok(false) => {}
                Err(e) => warn!(task_id = %task, error = %e, "saving after lease expiry"),
            }
        }
        lock(&self.scheduler).forget_silent_workers(now);
        self.update_gauges();
    }
}
