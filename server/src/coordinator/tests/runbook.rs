//! The run state machine, event by event, on a fake clock (`now` is a
//! number of milliseconds the test chooses).

use std::sync::Arc;

use fusion::Method;
use nt_proto::v1 as pb;
use nt_spec::task::Job;
use nt_spec::Plan;

use super::spec;
use crate::coordinator::document::{
    CurvePoint, FusedRecord, Outcome, Progress, RunState, Score, TaskState,
};
use crate::coordinator::runbook::{Delivery, Effect, Report, Runbook};
use crate::error::CoordinatorError;

pub(super) fn plan(spec: &pb::RunSpec) -> Arc<Plan> {
    Arc::new(Plan::from_wire(spec, &|r| Ok(r.to_string())).unwrap())
}

pub(super) fn new_run(extra: &str) -> (Runbook, Vec<Effect>) {
    let s = spec(extra);
    Runbook::submit("run-1", "", s.clone(), plan(&s), 16 << 30, 1_000)
}

pub(super) fn queued(fx: &[Effect]) -> Vec<String> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Queue { task, .. } => Some(task.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn released(fx: &[Effect]) -> Vec<String> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Release { task } => Some(task.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn states(fx: &[Effect]) -> Vec<pb::RunState> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Emit(pb::RunEvent {
                event: Some(pb::run_event::Event::StateChanged(s)),
                ..
            }) => pb::RunState::try_from(s.state).ok(),
            _ => None,
        })
        .collect()
}

pub(super) fn task_state(book: &Runbook, local: &str) -> TaskState {
    book.doc.tasks[book.doc.task_index(local).unwrap()].state
}

pub(super) fn delivery(name: &str) -> Delivery {
    Delivery {
        outcome: Outcome {
            checkpoint: format!("{name}/model.safetensors"),
            evaluations: Vec::new(),
            ..Default::default()
        },
        curve: vec![CurvePoint {
            epoch: 1,
            train_loss: 0.5,
            ..Default::default()
        }],
        compute_seconds: 2.0,
        parts: Vec::new(),
    }
}

/// Leases and completes a task; returns the effects of the completion.
pub(super) fn run_task(book: &mut Runbook, local: &str, now: i64, d: Delivery) -> Vec<Effect> {
    let (task, _) = book.lease(local, "w", now).expect("pending");
    book.complete(local, task.attempt, d, now + 1).unwrap()
}

pub(super) fn fused_nt() -> Vec<FusedRecord> {
    vec![FusedRecord {
        method: Method::Nt,
        key: "runs/run-1/fused/nt.safetensors".into(),
        seconds: 0.25,
        peak_bytes: 0,
        parameters: 6442,
        groups: Vec::new(),
    }]
}

#[test]
fn a_run_goes_through_every_state_to_success() {
    let (mut book, fx) = new_run("members: {count: 2}\nfusion: [nt]\n");
    assert_eq!(book.state(), RunState::Queued);
    assert_eq!(queued(&fx), ["run-1/member-0", "run-1/member-1"]);
    assert_eq!(states(&fx), [pb::RunState::Queued]);

    let (task, fx) = book.lease("member-0", "w", 2_000).unwrap();
    assert_eq!((task.attempt, task.task_id.as_str()), (1, "run-1/member-0"));
    assert!(matches!(&task.job, Job::Train { config } if config.seed == 1));
    assert_eq!(states(&fx), [pb::RunState::Training]);
    assert!(fx.contains(&Effect::Lease {
        task: "run-1/member-0".into(),
        attempt: 1
    }));
    assert_eq!(book.doc.tasks[0].worker_id, "w");

    let fx = book.complete("member-0", 1, delivery("m0"), 3_000).unwrap();
    assert_eq!(released(&fx), ["run-1/member-0"]);
    assert_eq!(book.doc.member_keys[0], "runs/run-1/members/0.safetensors");
    assert_eq!(book.state(), RunState::Training);
    let fx = run_task(&mut book, "member-1", 4_000, delivery("m1"));
    assert_eq!(book.state(), RunState::Fusing);
    assert!(fx.contains(&Effect::StartFusion));

    let fx = book.fused(Ok(fused_nt()), 5_000);
    assert_eq!(book.state(), RunState::FineTuning);
    assert_eq!(queued(&fx), ["run-1/fine-tune-nt"]);
    let (task, _) = book.lease("fine-tune-nt", "w", 6_000).unwrap();
    match &task.job {
        Job::FineTune {
            config,
            init,
            teachers,
        } => {
            assert_eq!(config.seed, 1000);
            assert_eq!(init, "runs/run-1/fused/nt.safetensors");
            assert!(teachers.is_empty(), "no distillation, no teachers");
        }
        other => panic!("{other:?}"),
    }
    let fx = book
        .complete("fine-tune-nt", 1, delivery("ft"), 7_000)
        .unwrap();
    assert_eq!(book.state(), RunState::Evaluating);
    assert_eq!(queued(&fx), ["run-1/evaluate"]);

    let (task, _) = book.lease("evaluate", "w", 8_000).unwrap();
    let Job::Evaluate { items } = &task.job else {
        panic!("{:?}", task.job)
    };
    let names: Vec<_> = items.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "member 0",
            "member 1",
            "ensemble",
            "nt",
            "nt after fine-tuning"
        ]
    );
    let score = |name: &str, accuracy| Score {
        name: name.into(),
        accuracy,
        ..Default::default()
    };
    let evaluation = Delivery {
        outcome: Outcome {
            evaluations: vec![score("member 0", 0.8), score("nt after fine-tuning", 0.9)],
            ..Default::default()
        },
        ..Default::default()
    };
    let fx = book.complete("evaluate", 1, evaluation, 9_000).unwrap();
    assert_eq!(book.state(), RunState::Succeeded);
    assert!(fx.contains(&Effect::WriteReport));
    assert_eq!(book.doc.finished_ms, Some(9_000));

    let report = crate::coordinator::wire::report(&book.doc, &book.plan);
    assert_eq!(report.members[0].accuracy, 0.8);
    let fused = &report.fused[0];
    assert_eq!(fused.after_fine_tuning.as_ref().unwrap().accuracy, 0.9);
    assert_eq!(fused.fusion_seconds, 0.25);
    let timings = report.timings.unwrap();
    assert_eq!((timings.wall_seconds, timings.task_seconds), (8.0, 6.0));
    assert_eq!(report.curves.len(), 3, "two members and one fine-tuning");
}

#[test]
fn events_are_numbered_one_after_another() {
    let (mut book, fx) = new_run("members: {count: 2}\n");
    let mut all = fx;
    let (_, fx) = book.lease("member-0", "w", 2_000).unwrap();
    all.extend(fx);
    let sequences: Vec<u64> = all
        .iter()
        .filter_map(|e| match e {
            Effect::Emit(ev) => Some(ev.sequence),
            _ => None,
        })
        .collect();
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    assert_eq!(book.doc.event_sequence, sequences.len() as u64);
}

#[test]
fn existing_members_go_straight_to_fusing() {
    let (book, fx) =
        new_run("members: {checkpoints: [uploads/a.safetensors, uploads/b.safetensors]}\n");
    assert_eq!(book.state(), RunState::Fusing);
    assert!(fx.contains(&Effect::StartFusion));
    assert!(queued(&fx).is_empty());
    assert_eq!(
        book.doc.member_keys,
        ["uploads/a.safetensors", "uploads/b.safetensors"]
    );
}

#[test]
fn expired_leases_requeue_until_the_attempts_are_used_then_the_run_fails() {
    let (mut book, _) = new_run("members: {count: 2}\nmax_attempts: 2\n");
    book.lease("member-0", "w", 2_000).unwrap();
    book.lease("member-1", "v", 2_000).unwrap();
    let fx = book.lease_expired("member-0", 1, 3_000);
    assert_eq!(queued(&fx), ["run-1/member-0"]);
    assert_eq!(task_state(&book, "member-0"), TaskState::Pending);
    assert_eq!(book.doc.tasks[0].error, "lease expired (worker lost)");
    let (task, _) = book.lease("member-0", "u", 4_000).unwrap();
    assert_eq!(task.attempt, 2);
    let fx = book.lease_expired("member-0", 2, 5_000);
    assert_eq!(book.state(), RunState::Failed);
    assert!(
        book.doc.message.contains("after 2 attempt(s)"),
        "{}",
        book.doc.message
    );
    assert_eq!(task_state(&book, "member-0"), TaskState::Failed);
    assert_eq!(task_state(&book, "member-1"), TaskState::Cancelled);
    assert_eq!(released(&fx), ["run-1/member-0", "run-1/member-1"]);
}

#[test]
fn results_and_reports_of_a_stale_attempt_are_refused() {
    let (mut book, _) = new_run("members: {count: 2}\n");
    book.lease("member-0", "w", 2_000).unwrap();
    book.lease_expired("member-0", 1, 3_000);
    book.lease("member-0", "v", 4_000).unwrap();
    let e = book
        .complete("member-0", 1, delivery("late"), 5_000)
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains("attempt 1"), "{e}");
    let e = book
        .fail("member-0", 1, "oops", true, false, 5_000)
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::FailedPrecondition(_)), "{e}");
    let mut fx = Vec::new();
    let directive = book.progress("member-0", 1, Report::default(), 5_000, &mut fx);
    assert_eq!(directive, Err(pb::TaskDirective::LeaseLost));
    assert!(book.lease_expired("member-0", 1, 5_000).is_empty());
    assert!(fx.is_empty());
    // The current attempt is untouched and can finish.
    assert_eq!(book.doc.tasks[0].attempt, 2);
    book.complete("member-0", 2, delivery("m0"), 6_000).unwrap();
    assert_eq!(task_state(&book, "member-0"), TaskState::Succeeded);
    // A task that does not exist is a lost lease too.
    assert_eq!(book.check("member-9", 1), Err(pb::TaskDirective::LeaseLost));
    // An attempt is held by the worker that leased it, and by no other.
    book.lease("member-1", "w", 7_000).unwrap();
    assert_eq!(book.check_held_by("member-1", 1, "w"), Ok(1));
    assert_eq!(
        book.check_held_by("member-1", 1, "x"),
        Err(pb::TaskDirective::LeaseLost)
    );
}

#[test]
fn failures_retry_when_retryable_and_fail_the_run_when_not() {
    let (mut book, _) = new_run("members: {count: 2}\n");
    book.lease("member-0", "w", 2_000).unwrap();
    let fx = book
        .fail("member-0", 1, "storage blip", true, false, 3_000)
        .unwrap();
    assert_eq!(queued(&fx), ["run-1/member-0"]);
    assert_eq!(book.state(), RunState::Training);
    book.lease("member-0", "w", 4_000).unwrap();
    book.fail("member-0", 2, "corrupt data file", false, false, 5_000)
        .unwrap();
    assert_eq!(book.state(), RunState::Failed);
    assert_eq!(book.doc.message, "task member 0 failed: corrupt data file");
    assert_eq!(task_state(&book, "member-1"), TaskState::Cancelled);
}

#[test]
fn a_failed_fusion_fails_the_run() {
    let (mut book, _) = new_run("members: {checkpoints: [a, b]}\n");
    book.fused(Err("member 1: NaN weight in fc1".into()), 2_000);
    assert_eq!(book.state(), RunState::Failed);
    assert_eq!(
        book.doc.message,
        "fusion failed: member 1: NaN weight in fc1"
    );
}

#[test]
fn progress_keeps_the_newest_resumable_state_and_one_curve_point_per_epoch() {
    let (mut book, _) = new_run("members: {count: 2}\n");
    book.lease("member-0", "w", 2_000).unwrap();
    let mut fx = Vec::new();
    let report = |epoch: u32, key: &str| Report {
        progress: Some(Progress {
            epoch,
            ..Default::default()
        }),
        checkpoint: Some((key.into(), epoch)),
        epoch: Some(CurvePoint {
            epoch,
            ..Default::default()
        }),
        part: None,
    };
    assert_eq!(
        book.progress("member-0", 1, report(2, "e2"), 3_000, &mut fx),
        Ok(true)
    );
    assert_eq!(
        book.progress("member-0", 1, report(1, "e1"), 3_000, &mut fx),
        Ok(false)
    );
    let t = &book.doc.tasks[0];
    assert_eq!((t.resume.as_deref(), t.resume_epoch), (Some("e2"), 2));
    let epochs: Vec<u32> = t.curve.iter().map(|p| p.epoch).collect();
    assert_eq!(epochs, [1], "a repeated epoch replaces the points after it");
    // Without progress there is no event; with it, one per report.
    let before = fx.len();
    let only_checkpoint = Report {
        checkpoint: Some(("e3".into(), 3)),
        ..Default::default()
    };
    assert_eq!(
        book.progress("member-0", 1, only_checkpoint, 4_000, &mut fx),
        Ok(true)
    );
    assert_eq!(fx.len(), before);
    // The next attempt resumes from the newest state.
    book.lease_expired("member-0", 1, 5_000);
    let (task, _) = book.lease("member-0", "v", 6_000).unwrap();
    assert_eq!(task.resume_state.as_deref(), Some("e3"));
}

/// A run brought to each unfinished state.
fn run_in(state: RunState) -> Runbook {
    let (mut book, _) = new_run("members: {count: 2}\nfusion: [nt]\n");
    if state == RunState::Queued {
        return book;
    }
    book.lease("member-0", "w", 2_000).unwrap();
    if state == RunState::Training {
        return book;
    }
    book.complete("member-0", 1, delivery("m0"), 3_000).unwrap();
    run_task(&mut book, "member-1", 3_000, delivery("m1"));
    if state == RunState::Fusing {
        return book;
    }
    book.fused(Ok(fused_nt()), 4_000);
    book.lease("fine-tune-nt", "w", 5_000).unwrap();
    if state == RunState::FineTuning {
        return book;
    }
    book.complete("fine-tune-nt", 1, delivery("ft"), 6_000)
        .unwrap();
    assert_eq!(book.state(), RunState::Evaluating);
    book
}

#[test]
fn a_run_can_be_cancelled_in_every_unfinished_state_and_not_after() {
    for state in [
        RunState::Queued,
        RunState::Training,
        RunState::Fusing,
        RunState::FineTuning,
        RunState::Evaluating,
    ] {
        let mut book = run_in(state);
        assert_eq!(book.state(), state);
        let unfinished: Vec<String> = book
            .doc
            .tasks
            .iter()
            .filter(|t| t.state.is_unfinished())
            .map(|t| format!("run-1/{}", t.work.local_name()))
            .collect();
        let fx = book.cancel("", 10_000).unwrap();
        assert_eq!(book.state(), RunState::Cancelled, "from {state:?}");
        assert_eq!(book.doc.message, "cancelled by a client");
        assert_eq!(released(&fx), unfinished, "from {state:?}");
        assert!(book.doc.tasks.iter().all(|t| !t.state.is_unfinished()));
        // Running attempts are told to stop; a late fusion changes nothing.
        assert_eq!(book.check("member-0", 1), Err(pb::TaskDirective::Cancel));
        assert!(book.fused(Ok(fused_nt()), 11_000).is_empty());
        assert_eq!(book.state(), RunState::Cancelled);
        let e = book.cancel("again", 12_000).unwrap_err();
        assert!(e.to_string().contains("already cancelled"), "{e}");
    }
}

#[test]
fn a_restarted_coordinator_recovers_a_run_from_its_stored_document() {
    let (mut book, _) = new_run("members: {count: 3}\n");
    book.lease("member-0", "w", 2_000).unwrap();
    book.lease("member-1", "w", 2_000).unwrap();
    book.complete("member-1", 1, delivery("m1"), 3_000).unwrap();
    let stored = book.doc.to_json().unwrap();

    let doc = crate::coordinator::upgrade::read(&stored).unwrap();
    assert_eq!(doc, book.doc, "the document round-trips");
    let restored = Runbook::restore(doc, plan(&book.doc.spec.0), 16 << 30, 5_000);
    assert_eq!(restored.doc.event_sequence, 5_000_000);
    assert_eq!(
        restored.recover(),
        [
            Effect::Lease {
                task: "run-1/member-0".into(),
                attempt: 1
            },
            Effect::Queue {
                task: "run-1/member-2".into(),
                gpu_only: false
            },
        ]
    );
    // A run stored while fusing fuses again; a finished one does nothing.
    assert!(run_in(RunState::Fusing)
        .recover()
        .contains(&Effect::StartFusion));
    let mut done = run_in(RunState::Training);
    done.cancel("stop", 4_000).unwrap();
    assert!(done.recover().is_empty());
}

#[test]
fn gpu_runs_queue_gpu_only_tasks_and_distillation_names_the_teachers() {
    let (mut book, fx) = new_run(
        "members: {count: 2, joint: off}\ndevice: gpu\nfine_tuning: {distill: {temperature: 3}}\n",
    );
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::Queue { gpu_only: true, .. })));
    book.complete("member-0", 1, delivery("m0"), 0).unwrap_err();
    run_task(&mut book, "member-0", 2_000, delivery("m0"));
    run_task(&mut book, "member-1", 2_000, delivery("m1"));
    book.fused(Ok(fused_nt()), 3_000);
    let (task, _) = book.lease("fine-tune-nt", "w", 4_000).unwrap();
    let Job::FineTune {
        config, teachers, ..
    } = &task.job
    else {
        panic!()
    };
    assert_eq!(config.distill.unwrap().temperature, 3.0);
    assert_eq!(teachers, &book.doc.member_keys);
    // The task's wire form reads back as the same plan.
    let back = nt_spec::TaskPlan::from_wire(&task.to_wire()).unwrap();
    assert_eq!(back.job, task.job);
    assert_eq!(back.data, task.data);
}
