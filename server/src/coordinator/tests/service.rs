//! The driver's one mutate-then-commit path: for every operation that
//! writes, a failed store write leaves the coordinator's memory (the run as
//! clients see it, its events, the queue and the leases) as it was, and the
//! same operation succeeds once the store is back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nt_common::Storage;
use nt_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::failing_store::FailingStore;
use super::spec;
use crate::coordinator::service::lock;
use crate::coordinator::{Coordinator, CoordinatorConfig, RunApi, WorkerApi};
use crate::error::CoordinatorError;
use crate::metrics::Metrics;

pub(super) async fn coordinator() -> (Arc<Coordinator>, Arc<FailingStore>) {
    let store = FailingStore::new();
    let storage = Storage {
        store: store.clone(),
        url: "memory://".into(),
        bucket: None,
        prefix: String::new(),
        conditional_updates: true,
    };
    let config = CoordinatorConfig {
        lease_ttl: Duration::from_secs(4),
        heartbeat_interval: Duration::from_secs(1),
        max_lease_wait: Duration::from_millis(20),
        // Sweeps are called by the tests.
        sweep_interval: Duration::from_secs(3600),
        lease_retry_backoff: Duration::from_millis(50),
        limits: nt_spec::Limits::default(),
        store_lease_ttl: Duration::from_secs(2),
        joint_memory_budget: 16 << 30,
    };
    let c = Coordinator::start(storage, config, Metrics::new(), CancellationToken::new())
        .await
        .unwrap();
    (c, store)
}

/// A second coordinator on `c`'s store, as after a restart (sweeps are left
/// to the tests): `c` stops and gives the store up first.
async fn restarted(c: &Coordinator) -> Arc<Coordinator> {
    c.close().await;
    let config = CoordinatorConfig {
        sweep_interval: Duration::from_secs(3600),
        ..CoordinatorConfig::default()
    };
    Coordinator::start(
        c.storage().clone(),
        config,
        Metrics::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

/// Everything a failed write must leave as it was.
#[derive(Debug, PartialEq)]
pub(super) struct Memory {
    run: pb::Run,
    events: usize,
    queued: Vec<String>,
    leases: Vec<(String, u32)>,
}

pub(super) async fn memory(c: &Coordinator, run_id: &str) -> Memory {
    let (events, _) = c.watch(run_id, 0).await.unwrap();
    let run = c.get(run_id).await.unwrap();
    let sched = lock(&c.scheduler);
    Memory {
        run,
        events: events.len(),
        queued: sched.queued().into_iter().map(String::from).collect(),
        leases: sched.expired(Instant::now() + Duration::from_secs(86_400)),
    }
}

fn is_outage(e: &CoordinatorError) -> bool {
    matches!(e, CoordinatorError::Unavailable(_))
}

/// A coordinator with a registered worker and one submitted two-member run.
pub(super) async fn with_run() -> (Arc<Coordinator>, Arc<FailingStore>, String, String) {
    let (c, store) = coordinator().await;
    let worker = c
        .register("w", pb::WorkerCapabilities::default(), "")
        .await
        .unwrap()
        .worker_id;
    let (run, _) = c
        .submit(spec("members: {count: 2}\n"), String::new())
        .await
        .unwrap();
    (c, store, run.run_id, worker)
}

#[tokio::test]
async fn a_run_whose_first_write_fails_is_not_kept() {
    let (c, store) = coordinator().await;
    store.fail(true);
    let e = c
        .submit(spec("members: {count: 2}\n"), "req-1".into())
        .await
        .unwrap_err();
    assert!(is_outage(&e), "{e}");
    let (runs, _) = c.list(0, "", pb::RunState::Unspecified).await.unwrap();
    assert!(runs.is_empty());
    assert_eq!(lock(&c.scheduler).queue_depth(), 0);
    store.fail(false);
    // The same request id then creates the run.
    let (run, created) = c
        .submit(spec("members: {count: 2}\n"), "req-1".into())
        .await
        .unwrap();
    assert!(created);
    assert_eq!(run.tasks.len(), 2);
}

#[tokio::test]
async fn a_lease_whose_write_fails_changes_nothing_and_the_task_waits_at_the_head() {
    let (c, store, run_id, worker) = with_run().await;
    let before = memory(&c, &run_id).await;
    store.fail(true);
    let e = c
        .lease(&worker, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(is_outage(&e), "{e}");
    assert_eq!(memory(&c, &run_id).await, before);
    store.fail(false);
    // The task waits out a backoff; the queue behind it is not held up.
    assert_eq!(leased(&c, &worker).await.label, "member 1");
    tokio::time::sleep(Duration::from_millis(60)).await;
    let task = leased(&c, &worker).await;
    assert_eq!((task.label.as_str(), task.attempt), ("member 0", 1));
}

#[tokio::test]
async fn a_write_reported_failed_that_landed_is_reconciled_not_taken_for_another_writer() {
    let (c, store, run_id, worker) = with_run().await;
    let before = memory(&c, &run_id).await;
    // The lease's document is stored, but its reply is lost (a timeout).
    store.lose_replies(true);
    let e = c
        .lease(&worker, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(is_outage(&e), "{e}");
    store.lose_replies(false);
    assert_eq!(memory(&c, &run_id).await, before);
    // The next write meets the changed document, sees it is its own, and
    // goes on; the run's writes do not fail from then on.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let task = leased(&c, &worker).await;
    let other = leased(&c, &worker).await;
    assert_eq!((task.attempt, other.attempt), (1, 1));
    c.cancel(&run_id, "done").await.unwrap();
    assert_eq!(
        c.get(&run_id).await.unwrap().state,
        pb::RunState::Cancelled as i32
    );
}

#[tokio::test]
async fn a_document_written_by_another_coordinator_is_a_conflict() {
    let (c, _store, run_id, _worker) = with_run().await;
    let key = nt_common::layout::run_doc(&run_id);
    let (bytes, _) = c.storage().get(&key).await.unwrap().unwrap();
    let mut doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    doc["writer"] = "coordinator-elsewhere".into();
    doc["revision"] = 99.into();
    c.storage()
        .put(&key, Bytes::from(serde_json::to_vec(&doc).unwrap()))
        .await
        .unwrap();
    let e = c.cancel(&run_id, "stop").await.unwrap_err();
    assert!(
        e.to_string().contains("coordinator-elsewhere")
            && e.to_string().contains("second coordinator"),
        "{e}"
    );
    assert_eq!(
        c.get(&run_id).await.unwrap().state,
        pb::RunState::Queued as i32,
        "nothing changed"
    );
}

/// Stores an epoch state under the attempt's prefix, as a worker would,
/// and returns its key.
async fn epoch_state(c: &Coordinator, task: &pb::Task) -> String {
    let key = format!("{}/epoch-0001.state.safetensors", task.output_prefix);
    c.storage()
        .put(&key, Bytes::from_static(b"state"))
        .await
        .unwrap();
    key
}

/// Leases member 0 and returns its task.
pub(super) async fn leased(c: &Coordinator, worker: &str) -> pb::Task {
    c.lease(worker, Duration::from_millis(10))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_progress_report_whose_write_fails_changes_nothing() {
    let (c, store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    let before = memory(&c, &run_id).await;
    store.fail(true);
    let report = pb::ReportProgressRequest {
        task_id: task.task_id.clone(),
        attempt: 1,
        checkpoint: epoch_state(&c, &task).await,
        checkpoint_epoch: 1,
        progress: Some(pb::TaskProgress {
            epoch: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = c.progress(&worker, report.clone()).await.unwrap_err();
    assert!(is_outage(&e), "{e}");
    assert_eq!(memory(&c, &run_id).await, before);
    store.fail(false);
    c.progress(&worker, report).await.unwrap();
    let run = c.get(&run_id).await.unwrap();
    assert!(run.tasks[0]
        .checkpoint
        .ends_with("epoch-0001.state.safetensors"));
}

#[tokio::test]
async fn a_result_whose_write_fails_is_not_accepted() {
    let (c, store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    let model = format!("{}/model.safetensors", task.output_prefix);
    c.storage()
        .put(&model, Bytes::from_static(b"weights"))
        .await
        .unwrap();
    let result = pb::TaskResult {
        checkpoint: model,
        compute_seconds: 1.0,
        ..Default::default()
    };
    let before = memory(&c, &run_id).await;
    store.fail(true);
    let e = c
        .complete(&worker, &task.task_id, 1, result.clone())
        .await
        .unwrap_err();
    assert!(is_outage(&e), "{e}");
    assert_eq!(memory(&c, &run_id).await, before);
    store.fail(false);
    c.complete(&worker, &task.task_id, 1, result).await.unwrap();
    let run = c.get(&run_id).await.unwrap();
    assert_eq!(run.tasks[0].state, pb::TaskState::Succeeded as i32);
}

#[tokio::test]
async fn a_failure_report_whose_write_fails_changes_nothing() {
    let (c, store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    let before = memory(&c, &run_id).await;
    store.fail(true);
    let e = c
        .fail(&worker, &task.task_id, 1, "disk full", true, false)
        .await
        .unwrap_err();
    assert!(is_outage(&e), "{e}");
    assert_eq!(memory(&c, &run_id).await, before);
    store.fail(false);
    c.fail(&worker, &task.task_id, 1, "disk full", true, false)
        .await
        .unwrap();
    let after = memory(&c, &run_id).await;
    assert_eq!(after.queued.len(), 2, "the task is queued again");
    assert!(after.leases.is_empty());
}

#[tokio::test]
async fn a_cancellation_whose_write_fails_changes_nothing() {
    let (c, store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    let before = memory(&c, &run_id).await;
    store.fail(true);
    let e = c.cancel(&run_id, "no longer needed").await.unwrap_err();
    assert!(is_outage(&e), "{e}");
    assert_eq!(memory(&c, &run_id).await, before);
    // The running attempt still holds its lease.
    let lease = pb::TaskLease {
        task_id: task.task_id.clone(),
        attempt: 1,
    };
    let reply = c
        .heartbeat(&worker, std::slice::from_ref(&lease))
        .await
        .unwrap();
    assert_eq!(reply[0].directive, pb::TaskDirective::Continue as i32);
    store.fail(false);
    c.cancel(&run_id, "no longer needed").await.unwrap();
    let reply = c.heartbeat(&worker, &[lease]).await.unwrap();
    assert_eq!(reply[0].directive, pb::TaskDirective::Cancel as i32);
    assert_eq!(memory(&c, &run_id).await.queued, Vec::<String>::new());
}

#[tokio::test]
async fn an_expiry_whose_write_fails_is_found_again_by_the_next_sweep() {
    let (c, store, run_id, worker) = with_run().await;
    leased(&c, &worker).await;
    let before = memory(&c, &run_id).await;
    let later = Instant::now() + Duration::from_secs(10);
    store.fail(true);
    c.sweep(later).await;
    assert_eq!(memory(&c, &run_id).await, before);
    store.fail(false);
    c.sweep(later).await;
    let after = memory(&c, &run_id).await;
    assert_eq!(after.run.tasks[0].state, pb::TaskState::Pending as i32);
    assert_eq!(after.queued.len(), 2);
    assert!(after.leases.is_empty());
    // Re-queued at the back: member 1 goes first, then member 0's second attempt.
    assert_eq!(leased(&c, &worker).await.label, "member 1");
    let task = leased(&c, &worker).await;
    assert_eq!((task.label.as_str(), task.attempt), ("member 0", 2));
}

#[tokio::test]
async fn a_restarted_coordinator_carries_on_from_the_stored_documents() {
    let (c, store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    let again = restarted(&c).await;
    let m = memory(&again, &run_id).await;
    assert_eq!(
        m.leases,
        [(task.task_id.clone(), 1)],
        "a fresh lease for the running task"
    );
    assert_eq!(m.queued.len(), 1, "the pending task is queued");
    assert_eq!(m.run.state, pb::RunState::Training as i32);
    drop(store);
}

#[tokio::test]
async fn a_diverged_run_is_stored_readably_and_survives_a_restart() {
    let (c, _store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    let report = pb::ReportProgressRequest {
        task_id: task.task_id.clone(),
        attempt: 1,
        checkpoint: epoch_state(&c, &task).await,
        checkpoint_epoch: 1,
        progress: Some(pb::TaskProgress {
            loss: f64::NAN,
            accuracy: f64::INFINITY,
            lr: f64::NEG_INFINITY,
            eval_accuracy: Some(f64::NAN),
            ..Default::default()
        }),
        epoch: Some(pb::CurvePoint {
            epoch: 1,
            train_loss: f64::NAN,
            ..Default::default()
        }),
        ..Default::default()
    };
    c.progress(&worker, report).await.unwrap();
    let again = restarted(&c).await;
    let run = again.get(&run_id).await.unwrap();
    let progress = run.tasks[0].progress.unwrap();
    assert!(progress.loss.is_nan() && progress.eval_accuracy.unwrap().is_nan());
    assert_eq!(
        (progress.accuracy, progress.lr),
        (f64::INFINITY, f64::NEG_INFINITY)
    );
}

#[tokio::test]
async fn a_watcher_gets_the_final_event_after_a_restart_with_a_higher_number() {
    let (c, _store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    // Progress events are numbered but not stored.
    for step in 0..20 {
        let report = pb::ReportProgressRequest {
            task_id: task.task_id.clone(),
            attempt: 1,
            progress: Some(pb::TaskProgress {
                step,
                ..Default::default()
            }),
            ..Default::default()
        };
        c.progress(&worker, report).await.unwrap();
    }
    let (seen, _) = c.watch(&run_id, 0).await.unwrap();
    let last = seen.last().unwrap().sequence;
    let again = restarted(&c).await;
    // The watcher reconnects after what it saw and follows the run to its end.
    let (past, live) = again.watch(&run_id, last).await.unwrap();
    assert_eq!(past.len(), 1, "where the run is now");
    assert!(past[0].sequence > last);
    let mut live = live.expect("the run is not finished");
    again.cancel(&run_id, "done watching").await.unwrap();
    let mut events = Vec::new();
    while let Ok(ev) = live.try_recv() {
        events.push(ev);
    }
    let end = events.last().unwrap();
    assert!(end.sequence > past[0].sequence);
    assert!(matches!(
        &end.event,
        Some(pb::run_event::Event::StateChanged(s)) if s.state == pb::RunState::Cancelled as i32
    ));
}

#[tokio::test]
async fn list_pages_are_bounded_in_bytes_and_lose_no_run() {
    let (c, _store) = coordinator().await;
    // An architecture spec padded to 3 MB: valid JSON, a large run.
    let mut spec = spec("members: {count: 2}\n");
    let json = small_arch_json();
    let padded = format!("{json}{}", " ".repeat(3_000_000));
    spec.architecture = Some(pb::Architecture {
        kind: Some(pb::architecture::Kind::SpecJson(padded)),
    });
    for _ in 0..3 {
        c.submit(spec.clone(), String::new()).await.unwrap();
    }
    let mut seen = 0;
    let mut token = String::new();
    loop {
        let (runs, next) = c.list(50, &token, pb::RunState::Unspecified).await.unwrap();
        assert_eq!(runs.len(), 1, "one 3 MB run per 4 MiB page");
        seen += runs.len();
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(seen, 3);
}

/// The small test architecture as an nt.arch/v1 document.
fn small_arch_json() -> String {
    let spec = fusion::arch::preset("mlp:hidden=8,depth=1").unwrap();
    fusion::arch::Architecture::new(spec)
        .unwrap()
        .spec()
        .to_json()
}

#[tokio::test]
async fn a_run_over_a_limit_is_refused_at_submission_and_nothing_is_stored() {
    let (c, _store) = coordinator().await;
    let e = c
        .submit(
            spec("members: {count: 2, training: {epochs: 2000000}}\n"),
            String::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CoordinatorError::InvalidSpec(s) if s.field == "members.training.epochs"),
        "{e}"
    );
    assert_eq!(e.code(), nt_proto::tonic::Code::InvalidArgument);
    let (runs, _) = c.list(0, "", pb::RunState::Unspecified).await.unwrap();
    assert!(runs.is_empty());
}

#[tokio::test]
async fn a_lease_is_bound_to_its_worker_and_outputs_to_its_attempts_prefix() {
    let (c, _store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    let intruder = c
        .register("x", pb::WorkerCapabilities::default(), "")
        .await
        .unwrap()
        .worker_id;
    let before = memory(&c, &run_id).await;
    // Another worker cannot deliver, report or fail for this attempt ...
    let model = format!("{}/model.safetensors", task.output_prefix);
    c.storage()
        .put(&model, Bytes::from_static(b"weights"))
        .await
        .unwrap();
    let result = pb::TaskResult {
        checkpoint: model.clone(),
        ..Default::default()
    };
    let e = c
        .complete(&intruder, &task.task_id, 1, result.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::FailedPrecondition(_)), "{e}");
    let e = c
        .fail(&intruder, &task.task_id, 1, "nope", false, false)
        .await
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::FailedPrecondition(_)), "{e}");
    let report = |checkpoint: String| pb::ReportProgressRequest {
        task_id: task.task_id.clone(),
        attempt: 1,
        checkpoint,
        checkpoint_epoch: 1,
        ..Default::default()
    };
    let directive = c.progress(&intruder, report(model.clone())).await.unwrap();
    assert_eq!(directive, pb::TaskDirective::LeaseLost);
    let lease = pb::TaskLease {
        task_id: task.task_id.clone(),
        attempt: 1,
    };
    let reply = c
        .heartbeat(&intruder, std::slice::from_ref(&lease))
        .await
        .unwrap();
    assert_eq!(reply[0].directive, pb::TaskDirective::LeaseLost as i32);
    assert_eq!(memory(&c, &run_id).await, before);
    // ... and its own worker cannot name objects outside its attempt's prefix.
    let foreign = "runs/other/members/0.safetensors".to_string();
    let e = c.progress(&worker, report(foreign)).await.unwrap_err();
    assert!(matches!(e, CoordinatorError::InvalidArgument(_)), "{e}");
    let missing = format!("{}/epoch-0009.state.safetensors", task.output_prefix);
    let e = c.progress(&worker, report(missing)).await.unwrap_err();
    assert!(matches!(e, CoordinatorError::NotFound(_)), "{e}");
    assert_eq!(memory(&c, &run_id).await, before);
    c.complete(&worker, &task.task_id, 1, result).await.unwrap();
}

#[tokio::test]
async fn a_worker_registering_again_keeps_its_id_unless_another_has_it() {
    let (c, _store, run_id, worker) = with_run().await;
    let task = leased(&c, &worker).await;
    let again = restarted(&c).await;
    let caps = pb::WorkerCapabilities::default;
    let back = again
        .register("w", caps(), &worker)
        .await
        .unwrap()
        .worker_id;
    assert_eq!(back, worker, "the restarted coordinator gives the id back");
    let other = again
        .register("w", caps(), &worker)
        .await
        .unwrap()
        .worker_id;
    assert_ne!(other, worker, "a live id is never given twice");
    let lease = pb::TaskLease {
        task_id: task.task_id.clone(),
        attempt: 1,
    };
    let reply = again.heartbeat(&back, &[lease]).await.unwrap();
    assert_eq!(reply[0].directive, pb::TaskDirective::Continue as i32);
    assert!(!again.get(&run_id).await.unwrap().tasks.is_empty());
}
