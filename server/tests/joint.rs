//! Joint training end to end, with real processes on 127.0.0.1: a SeaweedFS
//! S3 server, the `nt-server` coordinator and two `nt-worker`s, on a
//! Fashion-MNIST subset. A run with `members.joint: on` trains its members
//! (and its fine-tunings) as one task each and produces what the run with
//! separate tasks produces; its joint task survives a killed worker and a
//! cancellation; an architecture joint training refuses trains apart.

// Each test holds the serial lock across its awaits on purpose: tests run
// on separate runtimes and must not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use std::time::Duration;

use fusion::arch::{NodeSpec, Op};
use nt_common::layout;
use nt_proto::v1 as pb;
use nt_testkit::cluster::{
    cancel_then_run_another, is_final, serial, small_spec, state, submit, Cluster, StoreKind,
};

const LONG: Duration = Duration::from_secs(420);

const MEMBERS: &str = "members 0-1 (joint)";
const FINE_TUNINGS: &str = "2 fine-tunings (joint)";

fn task<'a>(run: &'a pb::Run, label: &str) -> &'a pb::TaskStatus {
    run.tasks
        .iter()
        .find(|t| t.label == label)
        .unwrap_or_else(|| panic!("no task `{label}` in {:?}", run.tasks))
}

/// `small_spec` with `members.joint` set.
fn spec(epochs: u32, train_subset: u64, joint: pb::JointTraining) -> pb::RunSpec {
    let mut spec = small_spec(epochs, train_subset);
    spec.members.as_mut().unwrap().joint = joint as i32;
    spec
}

async fn succeeded(c: &Cluster, run_id: &str) -> pb::Run {
    let run = c.wait_for(run_id, LONG, is_final).await;
    assert_eq!(
        state(&run),
        pb::RunState::Succeeded,
        "{}: {}",
        run.message,
        c.logs()
    );
    run
}

/// A report with the run's id taken out of its keys, and its measurements
/// zeroed: what a run produces, not how well or how fast.
fn shape(run: &pb::Run) -> pb::RunReport {
    let mut report = run.report.clone().unwrap();
    let anonymous = |m: &mut pb::ModelReport| {
        m.checkpoint = m.checkpoint.replace(&run.run_id, "RUN");
        (m.accuracy, m.loss) = (0.0, 0.0);
    };
    report.members.iter_mut().for_each(anonymous);
    report.ensemble.iter_mut().for_each(anonymous);
    report.baseline.iter_mut().for_each(anonymous);
    for f in &mut report.fused {
        f.after_fusion.iter_mut().for_each(anonymous);
        f.after_fine_tuning.iter_mut().for_each(anonymous);
        f.after_distilled_fine_tuning.iter_mut().for_each(anonymous);
        (f.fusion_seconds, f.fusion_peak_bytes) = (0.0, 0);
        f.groups.clear();
    }
    for c in &mut report.curves {
        for p in &mut c.points {
            *p = pb::CurvePoint {
                epoch: p.epoch,
                ..Default::default()
            };
        }
    }
    report.timings = None;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joint_run_produces_the_models_of_a_run_with_separate_tasks() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    c.start_worker("w2");
    let joint = submit(&c, spec(2, 3000, pb::JointTraining::On), "")
        .await
        .run
        .unwrap();
    let apart = submit(&c, spec(2, 3000, pb::JointTraining::Off), "")
        .await
        .run
        .unwrap();
    let labels: Vec<_> = joint.tasks.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(labels, [MEMBERS, "member 0", "member 1"]);
    assert_eq!(joint.tasks[0].kind(), pb::TaskKind::Joint);
    assert!(apart.tasks.iter().all(|t| t.kind() == pb::TaskKind::Train));

    let joint = succeeded(&c, &joint.run_id).await;
    let apart = succeeded(&c, &apart.run_id).await;
    assert_eq!(shape(&joint), shape(&apart));
    for label in [MEMBERS, FINE_TUNINGS] {
        let t = task(&joint, label);
        assert_eq!(
            (t.state(), t.attempt),
            (pb::TaskState::Succeeded, 1),
            "{t:?}"
        );
    }
    let report = joint.report.clone().unwrap();
    for m in &report.members {
        assert!(m.accuracy > 0.5, "{m:?}");
    }
    assert!(
        report.curves.iter().all(|c| c.points.len() == 2),
        "{:?}",
        report.curves
    );
    // Every model is where a separate run puts it, and reads back.
    let storage = c.storage();
    let run = &joint.run_id;
    for key in [
        layout::member(run, 0),
        layout::member(run, 1),
        layout::fine_tuned(run, "nt"),
        layout::fine_tuned(run, "average"),
    ] {
        let (bytes, _) = storage.get(&key).await.unwrap().expect(&key);
        fusion::checkpoint::load_bytes(&key, bytes.to_vec()).unwrap();
    }
    // The joint tasks' own folders hold epoch states only; the models were
    // written under each model's attempt.
    let objects = c.objects().await;
    let joint_objects: Vec<_> = objects.iter().filter(|k| k.contains("-joint/")).collect();
    assert!(!joint_objects.is_empty(), "{objects:?}");
    assert!(
        joint_objects.iter().all(|k| k.contains("/epoch-")),
        "{joint_objects:?}"
    );
    assert!(
        objects.contains(&layout::attempt_model(&layout::attempt_prefix(
            run, "member-1", 1
        )))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_joint_task_resumes_on_the_other_worker_from_its_last_epoch_state() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    c.start_worker("w2");
    let run_id = submit(&c, spec(8, 20000, pb::JointTraining::On), "")
        .await
        .run
        .unwrap()
        .run_id;
    // Wait until the joint task has written an epoch state, then SIGKILL its worker.
    let run = c
        .wait_for(&run_id, LONG, |r| {
            r.tasks
                .iter()
                .any(|t| t.label == MEMBERS && !t.checkpoint.is_empty() && !t.worker_id.is_empty())
        })
        .await;
    let victim = task(&run, MEMBERS).worker_id.clone();
    assert_eq!(
        task(&run, "member 1").worker_id,
        victim,
        "the models mirror their joint task"
    );
    let name = if victim.starts_with("w1") { "w1" } else { "w2" };
    c.kill_worker(name);
    let run = succeeded(&c, &run_id).await;
    let t = task(&run, MEMBERS);
    assert!(
        t.attempt >= 2,
        "the joint task should have needed a second attempt: {t:?}"
    );
    assert_eq!(task(&run, "member 0").attempt, t.attempt);
    // The later attempt resumed: it wrote no state for the epochs before its checkpoint.
    let objects = c.objects().await;
    let prefix = format!("runs/{run_id}/tasks/members-joint/attempt-{}/", t.attempt);
    let epochs: Vec<&String> = objects
        .iter()
        .filter(|k| k.starts_with(&prefix) && k.contains("epoch-"))
        .collect();
    assert!(!epochs.is_empty(), "{objects:?}");
    assert!(
        !epochs
            .iter()
            .any(|k| k.ends_with("epoch-0001.state.safetensors")),
        "attempt {} started from scratch: {epochs:?}",
        t.attempt
    );
    // Each member's curve holds every epoch, the resumed ones too.
    let report = run.report.unwrap();
    for name in ["member 0", "member 1"] {
        let curve = report.curves.iter().find(|c| c.name == name).unwrap();
        let epochs: Vec<u32> = curve.points.iter().map(|p| p.epoch).collect();
        assert_eq!(epochs, (1..=8).collect::<Vec<_>>(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_stops_its_joint_task() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    c.start_worker("w2");
    let run_id = submit(&c, spec(40, 30000, pb::JointTraining::On), "")
        .await
        .run
        .unwrap()
        .run_id;
    // Both members report progress through their joint task.
    c.wait_for(&run_id, LONG, |r| {
        ["member 0", "member 1"].iter().all(|l| {
            r.tasks
                .iter()
                .any(|t| t.label == *l && t.progress.is_some())
        })
    })
    .await;
    // The joint task's worker stops it and takes new work.
    let logs = cancel_then_run_another(&c, &run_id).await;
    assert_eq!(logs.matches("stopping task").count(), 1, "{logs}");
    assert!(logs.contains("members-joint"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joint_on_with_dropout_trains_the_members_apart_and_says_why() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    c.start_worker("w2");
    let mut spec = spec(1, 2000, pb::JointTraining::On);
    let mut arch = fusion::arch::preset("mlp:hidden=64,depth=2").unwrap();
    let last = arch.nodes.len() - 1;
    arch.nodes.insert(
        last,
        NodeSpec {
            name: Some("drop".into()),
            input: vec![],
            op: Op::Dropout { p: 0.25 },
        },
    );
    spec.architecture = Some(pb::Architecture {
        kind: Some(pb::architecture::Kind::SpecJson(arch.to_json())),
    });
    let run = submit(&c, spec, "").await.run.unwrap();
    let labels: Vec<_> = run.tasks.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(labels, ["member 0", "member 1"]);
    // The run's events say why.
    let mut events = c
        .client()
        .await
        .watch_run(pb::WatchRunRequest {
            run_id: run.run_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut notes = Vec::new();
    while notes.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("the run's first events")
            .unwrap()
            .expect("a stream that goes on");
        if let Some(pb::run_event::Event::TaskChanged(t)) = event.event {
            if t.message.starts_with("trained separately: ") {
                notes.push(t.message);
            }
        }
    }
    assert!(notes[0].contains("node `drop` is dropout"), "{notes:?}");
    let run = succeeded(&c, &run.run_id).await;
    assert!(
        run.tasks.iter().all(|t| t.kind() != pb::TaskKind::Joint),
        "{:?}",
        run.tasks
    );
}
