//! The comparison's extra models: every fused model also fine-tuned with
//! distillation, and member 0 trained on as the compute-matched baseline.

use nt_spec::task::Job;

use super::runbook::{delivery, fused_nt, new_run, queued, run_task};
use crate::coordinator::document::{Outcome, RunState, Score};
use crate::coordinator::runbook::Delivery;

#[test]
fn a_comparison_fine_tunes_with_and_without_distillation_and_trains_a_baseline() {
    let (mut book, _) = new_run(
        "members: {count: 2}\nfusion: [nt]\n\
         fine_tuning: {training: {epochs: 3}, distill: {temperature: 4}}\n\
         compare: {distillation: true, baseline: true}\n",
    );
    run_task(&mut book, "member-0", 2_000, delivery("m0"));
    run_task(&mut book, "member-1", 3_000, delivery("m1"));
    let fx = book.fused(Ok(fused_nt()), 4_000);
    assert_eq!(
        queued(&fx),
        [
            "run-1/fine-tune-nt",
            "run-1/fine-tune-nt-distilled",
            "run-1/baseline"
        ]
    );
    let job = |book: &mut crate::coordinator::runbook::Runbook, local: &str| {
        let (task, _) = book.lease(local, "w", 5_000).unwrap();
        match task.job {
            Job::FineTune {
                config,
                init,
                teachers,
            } => (config, init, teachers),
            other => panic!("{other:?}"),
        }
    };
    // The plain variant has no distillation even though the spec sets one:
    // with compare.distillation the spec's settings go to the variant.
    let (config, init, teachers) = job(&mut book, "fine-tune-nt");
    assert_eq!(config.distill, None);
    assert_eq!(init, "runs/run-1/fused/nt.safetensors");
    assert!(teachers.is_empty());
    let (config, init, teachers) = job(&mut book, "fine-tune-nt-distilled");
    assert_eq!(config.distill.unwrap().temperature, 4.0);
    assert_eq!(config.epochs, 3);
    assert_eq!(init, "runs/run-1/fused/nt.safetensors");
    assert_eq!(teachers, book.doc.member_keys);
    let (config, init, teachers) = job(&mut book, "baseline");
    assert_eq!((config.epochs, config.distill), (3, None));
    assert_eq!(init, "runs/run-1/members/0.safetensors");
    assert!(teachers.is_empty());

    for (i, local) in ["fine-tune-nt", "fine-tune-nt-distilled", "baseline"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(book.state(), RunState::FineTuning, "before {local}");
        book.complete(local, 1, delivery(local), 6_000 + i as i64)
            .unwrap();
    }
    assert_eq!(book.state(), RunState::Evaluating);
    let (task, _) = book.lease("evaluate", "w", 7_000).unwrap();
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
            "nt after fine-tuning",
            "nt after distilled fine-tuning",
            "baseline"
        ]
    );
    assert_eq!(
        items[6].checkpoints,
        ["runs/run-1/fine-tuned/baseline.safetensors"]
    );
    assert_eq!(
        items[5].checkpoints,
        ["runs/run-1/fine-tuned/nt-distilled.safetensors"]
    );

    let score = |name: &str, accuracy| Score {
        name: name.into(),
        accuracy,
        ..Default::default()
    };
    let evaluation = Delivery {
        outcome: Outcome {
            evaluations: vec![
                score("member 0", 0.8),
                score("nt after fine-tuning", 0.9),
                score("nt after distilled fine-tuning", 0.91),
                score("baseline", 0.85),
            ],
            ..Default::default()
        },
        ..Default::default()
    };
    book.complete("evaluate", 1, evaluation, 8_000).unwrap();
    assert_eq!(book.state(), RunState::Succeeded);
    let report = crate::coordinator::wire::report(&book.doc, &book.plan);
    let fused = &report.fused[0];
    assert_eq!(fused.after_fine_tuning.as_ref().unwrap().accuracy, 0.9);
    let kd = fused.after_distilled_fine_tuning.as_ref().unwrap();
    assert_eq!(kd.accuracy, 0.91);
    assert_eq!(
        kd.checkpoint,
        "runs/run-1/fine-tuned/nt-distilled.safetensors"
    );
    let baseline = report.baseline.as_ref().unwrap();
    assert_eq!(baseline.accuracy, 0.85);
    let curves: Vec<_> = report.curves.iter().map(|c| c.name.as_str()).collect();
    assert!(
        curves.contains(&"nt fine-tuning (distilled)") && curves.contains(&"baseline"),
        "{curves:?}"
    );
}

#[test]
fn without_a_comparison_the_report_has_no_extra_models() {
    let (mut book, _) = new_run("members: {count: 2}\nfusion: [nt]\n");
    run_task(&mut book, "member-0", 2_000, delivery("m0"));
    run_task(&mut book, "member-1", 3_000, delivery("m1"));
    let fx = book.fused(Ok(fused_nt()), 4_000);
    assert_eq!(queued(&fx), ["run-1/fine-tune-nt"]);
    run_task(&mut book, "fine-tune-nt", 5_000, delivery("ft"));
    run_task(&mut book, "evaluate", 6_000, Delivery::default());
    assert_eq!(book.state(), RunState::Succeeded);
    let report = crate::coordinator::wire::report(&book.doc, &book.plan);
    assert!(report.baseline.is_none());
    assert!(report.fused[0].after_distilled_fine_tuning.is_none());
}
