//! Which phases a run trains jointly (`members.joint` resolved per phase)
//! and what a joint run produces: the same models, keys, scores and curves
//! as the run with separate tasks.

use fusion::arch::{NodeSpec, Op};
use nt_proto::v1 as pb;
use nt_spec::task::Job;

use super::joint::{fused_two, joint_delivery, record, task_events, BUDGET, JOINT3};
use super::runbook::{delivery, new_run, plan, queued, released, run_task, task_state};
use super::spec;
use crate::coordinator::document::{Outcome, RunState, Score, TaskState};
use crate::coordinator::runbook::{Delivery, Effect, Runbook};
use crate::error::CoordinatorError;

/// Runs JOINT3 (`joint` on or off) to success; the models produce the same
/// deliveries either way.
fn finish(joint: &str) -> Runbook {
    let yaml = JOINT3.replace("joint: on", &format!("joint: {joint}"));
    let (mut book, _) = new_run(&yaml);
    let members = ["member-0", "member-1", "member-2"];
    if joint == "on" {
        book.lease("members-joint", "w", 2_000).unwrap();
        let e = book
            .complete("members-joint", 1, joint_delivery(&["m0", "m1"]), 2_500)
            .unwrap_err();
        assert!(
            matches!(&e, CoordinatorError::InvalidArgument(m) if m.starts_with("parts:")),
            "{e}"
        );
        assert_eq!(task_state(&book, "members-joint"), TaskState::Running);
        let fx = book
            .complete(
                "members-joint",
                1,
                joint_delivery(&["m0", "m1", "m2"]),
                3_000,
            )
            .unwrap();
        assert_eq!(released(&fx), ["run-1/members-joint"]);
        let done: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::TaskDone { kind, .. } => Some(*kind),
                _ => None,
            })
            .collect();
        assert_eq!(done, [pb::TaskKind::Train; 3]);
        assert_eq!(task_state(&book, "members-joint"), TaskState::Succeeded);
    } else {
        for (m, local) in members.iter().enumerate() {
            run_task(&mut book, local, 2_000, delivery(&format!("m{m}")));
        }
    }
    assert_eq!(book.state(), RunState::Fusing);
    let fx = book.fused(Ok(fused_two()), 4_000);
    let tunings = ["fine-tune-nt", "fine-tune-average", "baseline"];
    if joint == "on" {
        assert_eq!(queued(&fx), ["run-1/fine-tunings-joint"]);
        let (task, _) = book.lease("fine-tunings-joint", "w", 5_000).unwrap();
        let Job::Joint { parts } = &task.job else {
            panic!("{:?}", task.job)
        };
        let inits: Vec<_> = parts
            .iter()
            .map(|p| match &p.job {
                Job::FineTune { init, .. } => init.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            inits,
            [
                "runs/run-1/fused/nt.safetensors",
                "runs/run-1/fused/average.safetensors",
                "runs/run-1/members/0.safetensors"
            ]
        );
        book.complete("fine-tunings-joint", 1, joint_delivery(&tunings), 6_000)
            .unwrap();
    } else {
        assert_eq!(queued(&fx).len(), 3);
        for local in tunings {
            run_task(&mut book, local, 5_000, delivery(local));
        }
    }
    assert_eq!(book.state(), RunState::Evaluating);
    let (task, _) = book.lease("evaluate", "w", 7_000).unwrap();
    let Job::Evaluate { items } = &task.job else {
        panic!("{:?}", task.job)
    };
    let evaluations = items
        .iter()
        .enumerate()
        .map(|(i, item)| Score {
            name: item.name.clone(),
            accuracy: 0.5 + i as f64 / 100.0,
            ..Default::default()
        })
        .collect();
    let evaluation = Delivery {
        outcome: Outcome {
            evaluations,
            ..Default::default()
        },
        ..Default::default()
    };
    book.complete("evaluate", 1, evaluation, 8_000).unwrap();
    assert_eq!(book.state(), RunState::Succeeded);
    book
}

#[test]
fn a_joint_result_is_accepted_part_by_part_as_the_separate_tasks_would_be() {
    let joint = finish("on");
    let apart = finish("off");
    assert_eq!(joint.doc.member_keys, apart.doc.member_keys);
    assert_eq!(
        joint.doc.member_keys,
        (0..3)
            .map(|m| format!("runs/run-1/members/{m}.safetensors"))
            .collect::<Vec<_>>()
    );
    let items = |book: &Runbook| match book.task_plan(book.doc.task_index("evaluate").unwrap()).job
    {
        Job::Evaluate { items } => items,
        other => panic!("{other:?}"),
    };
    assert_eq!(items(&joint), items(&apart));
    let report = |book: &Runbook| crate::coordinator::wire::report(&book.doc, &book.plan);
    let (mut a, mut b) = (report(&joint), report(&apart));
    // Only the wall time may differ; every model, score, curve and compute
    // second is the same.
    a.timings.as_mut().unwrap().wall_seconds = 0.0;
    b.timings.as_mut().unwrap().wall_seconds = 0.0;
    assert_eq!(a, b);
    assert_eq!(a.curves.len(), 6, "three members, three fine-tunings");
    assert_eq!(a.timings.unwrap().task_seconds, 12.0);
    // Each model's outcome is its own part's.
    let m2 = record(&joint, "member-2").outcome.clone().unwrap();
    assert_eq!(m2.checkpoint, "m2/model.safetensors");
    assert!(joint
        .doc
        .tasks
        .iter()
        .all(|t| t.state == TaskState::Succeeded));
}

#[test]
fn auto_joins_gpu_runs_within_the_budget_and_on_says_why_it_cannot() {
    let submit = |yaml: &str, budget: u64| {
        let s = spec(yaml);
        Runbook::submit("run-1", "", s.clone(), plan(&s), budget, 1_000)
    };
    for (yaml, budget, joint) in [
        ("members: {count: 2}\ndevice: gpu\n", BUDGET, true),
        ("members: {count: 2, joint: auto}\ndevice: gpu\n", 1, false),
        ("members: {count: 2}\n", BUDGET, false),
        ("members: {count: 2}\ndevice: cpu\n", BUDGET, false),
        (
            "members: {count: 2, joint: off}\ndevice: gpu\n",
            BUDGET,
            false,
        ),
        ("members: {count: 2, joint: on}\ndevice: cpu\n", 1, true),
    ] {
        let (_, fx) = submit(yaml, budget);
        let expected: &[&str] = if joint {
            &["run-1/members-joint"]
        } else {
            &["run-1/member-0", "run-1/member-1"]
        };
        assert_eq!(queued(&fx), expected, "{yaml} within {budget}");
    }
    // One fine-tuning has nothing to join, and says nothing.
    let (mut book, _) = submit("members: {count: 2, joint: on}\nfusion: [nt]\n", BUDGET);
    book.lease("members-joint", "w", 2_000).unwrap();
    book.complete("members-joint", 1, joint_delivery(&["m0", "m1"]), 3_000)
        .unwrap();
    let fx = book.fused(Ok(super::runbook::fused_nt()), 4_000);
    assert_eq!(queued(&fx), ["run-1/fine-tune-nt"]);
    assert!(task_events(&fx).iter().all(|e| e.message.is_empty()));

    // `on` with dropout: separate tasks, and the events say why.
    let mut s = spec("members: {count: 2, joint: on}\n");
    let mut arch = fusion::arch::preset("mlp:hidden=8,depth=1").unwrap();
    let last = arch.nodes.len() - 1;
    arch.nodes.insert(
        last,
        NodeSpec {
            name: Some("drop".into()),
            input: vec![],
            op: Op::Dropout { p: 0.5 },
        },
    );
    s.architecture = Some(pb::Architecture {
        kind: Some(pb::architecture::Kind::SpecJson(arch.to_json())),
    });
    let (_, fx) = Runbook::submit("run-1", "", s.clone(), plan(&s), BUDGET, 1_000);
    assert_eq!(queued(&fx), ["run-1/member-0", "run-1/member-1"]);
    let notes: Vec<_> = task_events(&fx).into_iter().map(|e| e.message).collect();
    assert_eq!(notes.len(), 2);
    assert!(
        notes
            .iter()
            .all(|m| m.starts_with("trained separately: node `drop` is dropout")),
        "{notes:?}"
    );
}
