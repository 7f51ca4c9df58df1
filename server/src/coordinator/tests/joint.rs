//! Joint training in the run state machine: one joint task per phase, its
//! lease mirrored onto the records of the models it trains, its result
//! accepted part by part, split back into tasks of their own, and fenced,
//! retried, cancelled and recovered as any task.

use fusion::Method;
use nt_proto::v1 as pb;
use nt_spec::task::Job;

use super::runbook::{delivery, new_run, plan, queued, released, run_task, states, task_state};
use crate::coordinator::document::{
    CurvePoint, FusedRecord, Progress, RunState, TaskRecord, TaskState,
};
use crate::coordinator::runbook::{Delivery, Effect, Report, Runbook};
use crate::error::CoordinatorError;

pub(super) const BUDGET: u64 = 16 << 30;

/// Three members trained jointly; two fusion methods and the baseline,
/// so the fine-tuning phase has three models too.
pub(super) const JOINT3: &str =
    "members: {count: 3, joint: on}\nfusion: [nt, average]\ncompare: {baseline: true}\n";

pub(super) fn record<'a>(book: &'a Runbook, local: &str) -> &'a TaskRecord {
    &book.doc.tasks[book.doc.task_index(local).unwrap()]
}

pub(super) fn task_events(fx: &[Effect]) -> Vec<pb::TaskStateChanged> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Emit(pb::RunEvent {
                event: Some(pb::run_event::Event::TaskChanged(t)),
                ..
            }) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn progress_events(fx: &[Effect]) -> Vec<pb::TaskProgressed> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Emit(pb::RunEvent {
                event: Some(pb::run_event::Event::TaskProgress(p)),
                ..
            }) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn joint_delivery(names: &[&str]) -> Delivery {
    Delivery {
        parts: names.iter().map(|n| delivery(n)).collect(),
        compute_seconds: 2.0 * names.len() as f64,
        ..Default::default()
    }
}

pub(super) fn fused_two() -> Vec<FusedRecord> {
    [Method::Nt, Method::Average]
        .into_iter()
        .map(|method| FusedRecord {
            method,
            key: format!("runs/run-1/fused/{method}.safetensors"),
            seconds: 0.25,
            peak_bytes: 0,
            parameters: 6442,
            groups: Vec::new(),
        })
        .collect()
}

pub(super) fn is_lost(e: &CoordinatorError) -> bool {
    matches!(e, CoordinatorError::FailedPrecondition(m) if m.contains("no longer holds its lease"))
}

#[test]
fn a_joint_task_trains_every_member_and_its_lease_is_mirrored_onto_them() {
    let (mut book, fx) = new_run(JOINT3);
    assert_eq!(queued(&fx), ["run-1/members-joint"]);
    let locals: Vec<String> = book.doc.tasks.iter().map(|t| t.work.local_name()).collect();
    assert_eq!(
        locals,
        ["members-joint", "member-0", "member-1", "member-2"]
    );
    assert_eq!(book.doc.tasks[0].work.label(), "members 0-2 (joint)");
    assert!(book.doc.tasks[1..]
        .iter()
        .all(|t| t.group == "members-joint" && t.state == TaskState::Pending));
    // The models themselves are never leased.
    assert!(book.lease("member-0", "w", 1_500).is_none());

    let (task, fx) = book.lease("members-joint", "w", 2_000).unwrap();
    assert_eq!(states(&fx), [pb::RunState::Training]);
    let leases: Vec<_> = fx
        .iter()
        .filter(|e| matches!(e, Effect::Lease { .. }))
        .collect();
    assert_eq!(
        leases,
        [&Effect::Lease {
            task: "run-1/members-joint".into(),
            attempt: 1
        }]
    );
    assert_eq!(
        task.output_prefix,
        "runs/run-1/tasks/members-joint/attempt-1"
    );
    let Job::Joint { parts } = &task.job else {
        panic!("{:?}", task.job)
    };
    let ids: Vec<_> = parts.iter().map(|p| p.task_id.as_str()).collect();
    assert_eq!(ids, ["run-1/member-0", "run-1/member-1", "run-1/member-2"]);
    for (m, p) in parts.iter().enumerate() {
        assert!(matches!(&p.job, Job::Train { config } if config.seed == m as u64 + 1));
        assert_eq!((p.attempt, p.label.clone()), (1, format!("member {m}")));
        assert_eq!(
            p.output_prefix,
            format!("runs/run-1/tasks/member-{m}/attempt-1")
        );
        assert!(p.resume_state.is_none());
    }
    assert_eq!(nt_spec::TaskPlan::from_wire(&task.to_wire()).unwrap(), task);
    for t in &book.doc.tasks {
        assert_eq!(
            (t.state, t.attempt, t.worker_id.as_str()),
            (TaskState::Running, 1, "w")
        );
    }
    let running: Vec<_> = task_events(&fx)
        .into_iter()
        .filter(|e| e.state == pb::TaskState::Running as i32)
        .map(|e| e.task_id)
        .collect();
    assert_eq!(
        running,
        [
            "run-1/members-joint",
            "run-1/member-0",
            "run-1/member-1",
            "run-1/member-2"
        ]
    );

    // Messages naming a model instead of its joint task are refused.
    assert_eq!(book.check_held_by("members-joint", 1, "w"), Ok(0));
    assert_eq!(book.check("member-1", 1), Err(pb::TaskDirective::LeaseLost));
    let e = book
        .complete("member-1", 1, delivery("m1"), 2_500)
        .unwrap_err();
    assert!(is_lost(&e), "{e}");
    let e = book
        .fail("member-1", 1, "oops", true, false, 2_500)
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::FailedPrecondition(_)), "{e}");
    let mut fx = Vec::new();
    let directive = book.progress("member-1", 1, Report::default(), 2_500, &mut fx);
    assert_eq!(directive, Err(pb::TaskDirective::LeaseLost));
    assert!(book.lease_expired("member-1", 1, 2_500).is_empty());
    assert!(fx.is_empty());
    assert_eq!(task_state(&book, "member-1"), TaskState::Running);
}

#[test]
fn progress_of_a_part_goes_to_its_model_and_epoch_states_to_the_joint_task() {
    let (mut book, _) = new_run(JOINT3);
    book.lease("members-joint", "w", 2_000).unwrap();
    let state = "runs/run-1/tasks/members-joint/attempt-1/epoch-0001.state.safetensors";
    let report = Report {
        progress: Some(Progress {
            epoch: 1,
            loss: 0.7,
            ..Default::default()
        }),
        checkpoint: Some((state.into(), 1)),
        epoch: Some(CurvePoint {
            epoch: 1,
            train_loss: 0.7,
            ..Default::default()
        }),
        part: Some(1),
    };
    let mut fx = Vec::new();
    assert_eq!(
        book.progress("members-joint", 1, report, 3_000, &mut fx),
        Ok(true)
    );
    let joint = &book.doc.tasks[0];
    assert_eq!(
        (joint.resume.as_deref(), joint.resume_epoch),
        (Some(state), 1)
    );
    assert!(joint.curve.is_empty() && joint.progress.is_none());
    let m1 = record(&book, "member-1");
    assert_eq!(m1.progress.as_ref().map(|p| p.loss), Some(0.7));
    assert_eq!(m1.curve.len(), 1);
    assert!(m1.resume.is_none());
    assert!(record(&book, "member-0").curve.is_empty());
    let events = progress_events(&fx);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].task_id.as_str(), events[0].label.as_str()),
        ("run-1/member-1", "member 1")
    );
    // A part the task does not have changes nothing.
    let mut fx = Vec::new();
    let beyond = Report {
        progress: Some(Progress::default()),
        part: Some(3),
        ..Default::default()
    };
    assert_eq!(
        book.progress("members-joint", 1, beyond, 3_000, &mut fx),
        Ok(false)
    );
    assert!(fx.is_empty());

    // The next attempt resumes from the joint state; its models start afresh.
    book.lease_expired("members-joint", 1, 4_000);
    let (task, _) = book.lease("members-joint", "v", 5_000).unwrap();
    assert_eq!(
        (task.attempt, task.resume_state.as_deref()),
        (2, Some(state))
    );
    let Job::Joint { parts } = &task.job else {
        panic!("{:?}", task.job)
    };
    assert!(parts.iter().all(|p| p.attempt == 2
        && p.resume_state.is_none()
        && p.output_prefix.ends_with("/attempt-2")));
    assert!(record(&book, "member-1").curve.is_empty());
    assert_eq!(record(&book, "member-1").worker_id, "v");
}

#[test]
fn a_split_joint_task_queues_its_models_as_tasks_of_their_own() {
    let (mut book, _) = new_run(JOINT3);
    book.lease("members-joint", "w", 2_000).unwrap();
    let fx = book
        .fail("members-joint", 1, "CUDA out of memory", false, true, 3_000)
        .unwrap();
    let joint = record(&book, "members-joint");
    assert_eq!(joint.state, TaskState::Cancelled);
    assert_eq!(joint.error, "split: CUDA out of memory");
    assert_eq!(released(&fx), ["run-1/members-joint"]);
    assert_eq!(
        queued(&fx),
        ["run-1/member-0", "run-1/member-1", "run-1/member-2"]
    );
    let notes: Vec<_> = task_events(&fx)
        .into_iter()
        .filter(|e| e.message == "trained separately: CUDA out of memory")
        .map(|e| (e.task_id, e.state))
        .collect();
    assert_eq!(notes.len(), 3, "{notes:?}");
    assert!(notes
        .iter()
        .all(|(_, s)| *s == pb::TaskState::Pending as i32));
    for m in 0..3 {
        let t = record(&book, &format!("member-{m}"));
        assert_eq!(
            (t.state, t.group.as_str(), t.worker_id.as_str()),
            (TaskState::Pending, "", "")
        );
    }
    assert_eq!(book.state(), RunState::Training);
    assert_eq!(
        book.check("members-joint", 1),
        Err(pb::TaskDirective::LeaseLost)
    );
    // Each model now trains alone, in an attempt of its own.
    let (task, _) = book.lease("member-0", "w", 4_000).unwrap();
    assert_eq!(task.attempt, 2);
    assert!(matches!(task.job, Job::Train { .. }));
    assert!(task.resume_state.is_none());
    assert_eq!(task.output_prefix, "runs/run-1/tasks/member-0/attempt-2");
    book.complete("member-0", 2, delivery("m0"), 5_000).unwrap();
    run_task(&mut book, "member-1", 5_000, delivery("m1"));
    run_task(&mut book, "member-2", 5_000, delivery("m2"));
    assert_eq!(book.state(), RunState::Fusing);
    // The next phase is decided afresh: joint again.
    let fx = book.fused(Ok(fused_two()), 6_000);
    assert_eq!(queued(&fx), ["run-1/fine-tunings-joint"]);

    // For a task that trains alone, `split` means nothing.
    let (mut book, _) = new_run("members: {count: 2, joint: off}\n");
    book.lease("member-0", "w", 2_000).unwrap();
    let fx = book
        .fail("member-0", 1, "storage blip", true, true, 3_000)
        .unwrap();
    assert_eq!(queued(&fx), ["run-1/member-0"]);
    assert_eq!(task_state(&book, "member-0"), TaskState::Pending);
}

#[test]
fn a_joint_task_is_retried_as_one_and_fails_the_run_with_its_models() {
    let (mut book, _) = new_run("members: {count: 2, joint: on}\nmax_attempts: 2\n");
    book.lease("members-joint", "w", 2_000).unwrap();
    let fx = book
        .fail("members-joint", 1, "storage blip", true, false, 3_000)
        .unwrap();
    assert_eq!(queued(&fx), ["run-1/members-joint"]);
    for local in ["member-0", "member-1"] {
        let t = record(&book, local);
        assert_eq!(
            (t.state, t.attempt, t.worker_id.as_str(), t.error.as_str()),
            (TaskState::Pending, 1, "", "storage blip")
        );
    }
    let (task, _) = book.lease("members-joint", "v", 4_000).unwrap();
    assert_eq!(task.attempt, 2);
    assert_eq!(
        (
            record(&book, "member-1").attempt,
            record(&book, "member-1").worker_id.as_str()
        ),
        (2, "v")
    );
    // The first attempt is fenced off.
    let e = book
        .complete("members-joint", 1, joint_delivery(&["m0", "m1"]), 4_500)
        .unwrap_err();
    assert!(is_lost(&e) && e.to_string().contains("attempt 1"), "{e}");
    assert!(book.lease_expired("members-joint", 1, 4_500).is_empty());
    let e = book
        .fail("members-joint", 1, "late", true, true, 4_500)
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::FailedPrecondition(_)), "{e}");

    let fx = book.lease_expired("members-joint", 2, 5_000);
    assert_eq!(book.state(), RunState::Failed);
    assert!(
        book.doc
            .message
            .contains("task members 0-1 (joint) failed after 2 attempt(s)"),
        "{}",
        book.doc.message
    );
    assert_eq!(released(&fx), ["run-1/members-joint"]);
    for local in ["members-joint", "member-0", "member-1"] {
        let t = record(&book, local);
        assert_eq!(
            (t.state, t.error.as_str()),
            (TaskState::Failed, "lease expired (worker lost)")
        );
    }

    let (mut book, _) = new_run("members: {count: 2, joint: on}\n");
    book.lease("members-joint", "w", 2_000).unwrap();
    book.fail("members-joint", 1, "corrupt data file", false, false, 3_000)
        .unwrap();
    assert_eq!(book.state(), RunState::Failed);
    assert_eq!(
        book.doc.message,
        "task members 0-1 (joint) failed: corrupt data file"
    );
    assert_eq!(task_state(&book, "member-0"), TaskState::Failed);
}

#[test]
fn cancelling_a_run_stops_its_joint_task_and_its_models() {
    for leased in [false, true] {
        let (mut book, _) = new_run(JOINT3);
        if leased {
            book.lease("members-joint", "w", 2_000).unwrap();
        }
        let fx = book.cancel("", 3_000).unwrap();
        assert_eq!(released(&fx), ["run-1/members-joint"], "leased: {leased}");
        assert!(book
            .doc
            .tasks
            .iter()
            .all(|t| t.state == TaskState::Cancelled));
        assert_eq!(
            book.check("members-joint", 1),
            Err(pb::TaskDirective::Cancel)
        );
        assert_eq!(book.check("member-0", 1), Err(pb::TaskDirective::LeaseLost));
        assert!(book.recover().is_empty());
    }
}

#[test]
fn a_restarted_coordinator_leases_the_joint_task_and_queues_none_of_its_models() {
    let (mut book, fx) = new_run(JOINT3);
    assert_eq!(
        book.recover(),
        [Effect::Queue {
            task: "run-1/members-joint".into(),
            gpu_only: false
        }]
    );
    assert_eq!(
        book.recover(),
        fx.into_iter()
            .filter(|e| matches!(e, Effect::Queue { .. }))
            .collect::<Vec<_>>()
    );
    book.lease("members-joint", "w", 2_000).unwrap();
    let stored = book.doc.to_json().unwrap();
    let doc = crate::coordinator::upgrade::read(&stored).unwrap();
    assert_eq!(doc, book.doc, "the groups and the joint task round-trip");
    let restored = Runbook::restore(doc, plan(&book.doc.spec.0), BUDGET, 5_000);
    assert_eq!(
        restored.recover(),
        [Effect::Lease {
            task: "run-1/members-joint".into(),
            attempt: 1
        }]
    );
    // The restored run goes on: the lease holder delivers.
    let mut restored = restored;
    restored
        .complete(
            "members-joint",
            1,
            joint_delivery(&["m0", "m1", "m2"]),
            6_000,
        )
        .unwrap();
    assert_eq!(restored.state(), RunState::Fusing);
}

#[test]
fn a_split_on_the_joint_tasks_last_attempt_leaves_each_model_its_own_attempts() {
    let (mut book, _) = new_run("members: {count: 2, joint: on}\nmax_attempts: 2\n");
    book.lease("members-joint", "w", 2_000).unwrap();
    book.lease_expired("members-joint", 1, 3_000);
    book.lease("members-joint", "w", 4_000).unwrap();
    book.fail("members-joint", 2, "CUDA out of memory", false, true, 5_000)
        .unwrap();
    // Member 0 alone: attempts 3 and 4 are its two; a retryable failure
    // of the first does not fail the run.
    let (task, _) = book.lease("member-0", "w", 6_000).unwrap();
    assert_eq!(task.attempt, 3);
    book.fail("member-0", 3, "storage blip", true, false, 7_000)
        .unwrap();
    assert_eq!(task_state(&book, "member-0"), TaskState::Pending);
    assert_eq!(book.state(), RunState::Training);
    book.lease("member-0", "w", 8_000).unwrap();
    book.fail("member-0", 4, "storage blip", true, false, 9_000)
        .unwrap();
    assert_eq!(task_state(&book, "member-0"), TaskState::Failed);
    assert_eq!(book.state(), RunState::Failed);
    assert!(
        book.doc.message.contains("after 2 attempt(s)"),
        "{}",
        book.doc.message
    );
}
