//! A joint task through the coordinator's worker operations: heartbeats
//! and progress name the joint task, progress of a part reaches its model,
//! each part's checkpoint goes to its model's canonical key, and a split
//! queues the models as tasks of their own.

use std::time::Duration;

use bytes::Bytes;
use nt_common::layout;
use nt_proto::v1 as pb;

use super::service::{coordinator, memory};
use super::spec;
use crate::coordinator::service::lock;
use crate::coordinator::{Coordinator, RunApi, WorkerApi};
use crate::error::CoordinatorError;

async fn joint_run(c: &Coordinator) -> (String, String, pb::Task) {
    let worker = c
        .register("w", pb::WorkerCapabilities::default(), "")
        .await
        .unwrap()
        .worker_id;
    let (run, _) = c
        .submit(spec("members: {count: 2, joint: on}\n"), String::new())
        .await
        .unwrap();
    let task = c
        .lease(&worker, Duration::from_millis(10))
        .await
        .unwrap()
        .expect("the joint task");
    (run.run_id, worker, task)
}

fn task<'a>(run: &'a pb::Run, label: &str) -> &'a pb::TaskStatus {
    run.tasks.iter().find(|t| t.label == label).unwrap()
}

#[tokio::test]
async fn a_joint_result_puts_each_part_at_its_models_key() {
    let (c, _store) = coordinator().await;
    let (run_id, worker, joint) = joint_run(&c).await;
    assert_eq!(joint.kind(), pb::TaskKind::Joint);
    assert_eq!(joint.parts.len(), 2);
    let run = c.get(&run_id).await.unwrap();
    for label in ["members 0-1 (joint)", "member 0", "member 1"] {
        let t = task(&run, label);
        assert_eq!(
            (t.state(), t.worker_id.as_str()),
            (pb::TaskState::Running, worker.as_str())
        );
    }
    assert_eq!(task(&run, "member 1").kind(), pb::TaskKind::Train);

    // Heartbeats and progress name the joint task; a model's own id is lost.
    let lease = |task_id: &str| pb::TaskLease {
        task_id: task_id.into(),
        attempt: 1,
    };
    let part_id = joint.parts[0].task_id.clone();
    let reply = c
        .heartbeat(&worker, &[lease(&joint.task_id), lease(&part_id)])
        .await
        .unwrap();
    let directives: Vec<_> = reply.iter().map(|r| r.directive()).collect();
    assert_eq!(
        directives,
        [pb::TaskDirective::Continue, pb::TaskDirective::LeaseLost]
    );
    let report = |part: Option<u32>, checkpoint: String| pb::ReportProgressRequest {
        task_id: joint.task_id.clone(),
        attempt: 1,
        progress: Some(pb::TaskProgress {
            epoch: 1,
            epochs: 2,
            loss: 0.25,
            ..Default::default()
        }),
        checkpoint_epoch: u32::from(!checkpoint.is_empty()),
        checkpoint,
        part,
        ..Default::default()
    };
    let before = memory(&c, &run_id).await;
    let e = c
        .progress(&worker, report(Some(2), String::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CoordinatorError::InvalidArgument(m) if m.starts_with("part:")),
        "{e}"
    );
    // Epoch states are the joint task's: under a model's prefix they are refused.
    let elsewhere = format!(
        "{}/epoch-0001.state.safetensors",
        joint.parts[1].output_prefix
    );
    c.storage()
        .put(&elsewhere, Bytes::from_static(b"state"))
        .await
        .unwrap();
    let e = c
        .progress(&worker, report(Some(1), elsewhere))
        .await
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::InvalidArgument(_)), "{e}");
    assert_eq!(memory(&c, &run_id).await, before);
    let state = format!("{}/epoch-0001.state.safetensors", joint.output_prefix);
    c.storage()
        .put(&state, Bytes::from_static(b"state"))
        .await
        .unwrap();
    let directive = c
        .progress(&worker, report(Some(1), state.clone()))
        .await
        .unwrap();
    assert_eq!(directive, pb::TaskDirective::Continue);
    let run = c.get(&run_id).await.unwrap();
    assert_eq!(task(&run, "member 1").progress.map(|p| p.loss), Some(0.25));
    assert!(task(&run, "member 0").progress.is_none());
    assert_eq!(task(&run, "members 0-1 (joint)").checkpoint, state);

    // Each part's model lies under its own attempt's prefix.
    let mut parts = Vec::new();
    for (m, part) in joint.parts.iter().enumerate() {
        let key = layout::attempt_model(&part.output_prefix);
        c.storage()
            .put(&key, Bytes::from(format!("weights {m}")))
            .await
            .unwrap();
        parts.push(pb::TaskResult {
            checkpoint: key,
            compute_seconds: 1.5,
            ..Default::default()
        });
    }
    let result = |parts: Vec<pb::TaskResult>| pb::TaskResult {
        parts,
        compute_seconds: 3.0,
        ..Default::default()
    };
    let before = memory(&c, &run_id).await;
    let e = c
        .complete(&worker, &joint.task_id, 1, result(parts[..1].to_vec()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CoordinatorError::InvalidArgument(m) if m.starts_with("parts:")),
        "{e}"
    );
    let swapped = vec![parts[0].clone(), parts[0].clone()];
    let e = c
        .complete(&worker, &joint.task_id, 1, result(swapped))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("parts[1].checkpoint"), "{e}");
    assert_eq!(memory(&c, &run_id).await, before);
    let e = c
        .complete(&worker, &part_id, 1, parts[0].clone())
        .await
        .unwrap_err();
    assert!(matches!(e, CoordinatorError::FailedPrecondition(_)), "{e}");

    c.complete(&worker, &joint.task_id, 1, result(parts))
        .await
        .unwrap();
    for m in 0..2 {
        let (bytes, _) = c
            .storage()
            .get(&layout::member(&run_id, m))
            .await
            .unwrap()
            .expect("the member's canonical checkpoint");
        assert_eq!(bytes, Bytes::from(format!("weights {m}")));
    }
    let run = c.get(&run_id).await.unwrap();
    for label in ["members 0-1 (joint)", "member 0", "member 1"] {
        assert_eq!(
            task(&run, label).state(),
            pb::TaskState::Succeeded,
            "{label}"
        );
    }
    assert!(lock(&c.scheduler).queued().is_empty());
}

#[tokio::test]
async fn a_split_queues_the_models_as_tasks_of_their_own() {
    let (c, _store) = coordinator().await;
    let (run_id, worker, joint) = joint_run(&c).await;
    c.fail(
        &worker,
        &joint.task_id,
        1,
        "CUDA out of memory",
        false,
        true,
    )
    .await
    .unwrap();
    let run = c.get(&run_id).await.unwrap();
    let t = task(&run, "members 0-1 (joint)");
    assert_eq!(t.state(), pb::TaskState::Cancelled);
    assert_eq!(t.error, "split: CUDA out of memory");
    let queued: Vec<String> = lock(&c.scheduler)
        .queued()
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(
        queued,
        [
            joint.parts[0].task_id.clone(),
            joint.parts[1].task_id.clone()
        ]
    );
    let (events, _) = c.watch(&run_id, 0).await.unwrap();
    let notes = events
        .iter()
        .filter(|e| {
            matches!(&e.event, Some(pb::run_event::Event::TaskChanged(t))
                if t.message == "trained separately: CUDA out of memory")
        })
        .count();
    assert_eq!(notes, 2);
    // The worker's next lease is a model of its own, in a new attempt.
    let next = c
        .lease(&worker, Duration::from_millis(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.kind(), pb::TaskKind::Train);
    assert_eq!(
        (next.task_id.as_str(), next.attempt),
        (joint.parts[0].task_id.as_str(), 2)
    );
    assert!(next.resume_state.is_empty());
}
