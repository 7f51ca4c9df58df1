//! End to end, with real processes on 127.0.0.1: a SeaweedFS S3 server, the
//! `nt-server` coordinator and two `nt-worker`s, on a Fashion-MNIST subset.

// Each test holds the serial lock across its awaits on purpose: tests run
// on separate runtimes and must not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use std::time::Duration;

use nt_common::layout;
use nt_proto::tonic::Code;
use nt_proto::v1 as pb;
use nt_testkit::cluster::{self, is_final, serial, small_spec, state, submit, Cluster, StoreKind};

const LONG: Duration = Duration::from_secs(420);

fn task<'a>(run: &'a pb::Run, label: &str) -> &'a pb::TaskStatus {
    run.tasks
        .iter()
        .find(|t| t.label == label)
        .unwrap_or_else(|| panic!("no task `{label}` in {:?}", run.tasks))
}

fn task_state(t: &pb::TaskStatus) -> pb::TaskState {
    pb::TaskState::try_from(t.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_completes_and_its_report_is_in_the_bucket() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    c.start_worker("w2");
    let created = submit(&c, small_spec(3, 6000), "").await;
    assert!(created.created);
    let run_id = created.run.unwrap().run_id;
    let run = c.wait_for(&run_id, LONG, is_final).await;
    assert_eq!(
        state(&run),
        pb::RunState::Succeeded,
        "{}: {}",
        run.message,
        c.logs()
    );

    // The report: members, ensemble, each method before and after fine-tuning.
    let report = run.report.clone().unwrap();
    assert_eq!(report.members.len(), 2);
    for m in &report.members {
        assert!(m.accuracy > 0.6, "{m:?}");
        assert_eq!(m.parameters, 784 * 64 + 64 * 64 + 64 * 10);
    }
    assert!(report.ensemble.as_ref().unwrap().accuracy > 0.6);
    assert_eq!(report.fused.len(), 2);
    for f in &report.fused {
        let after = f.after_fine_tuning.as_ref().unwrap();
        assert!(after.accuracy > 0.6, "{f:?}");
        assert!(f.after_fusion.is_some());
    }
    let nt = &report.fused[0];
    assert_eq!(nt.method, pb::FusionMethod::Nt as i32);
    assert!(nt
        .groups
        .iter()
        .all(|g| g.per_member.iter().sum::<u32>() == g.width));
    assert_eq!(report.curves.len(), 4, "two members and two fine-tunings");
    assert!(report.curves.iter().all(|c| !c.points.is_empty()));
    let timings = report.timings.unwrap();
    assert!(
        timings.wall_seconds > 0.0 && timings.task_seconds > 0.0 && timings.fusion_seconds > 0.0
    );

    // And in the bucket.
    let storage = c.storage();
    let (bytes, _) = storage
        .get(&layout::report(&run_id))
        .await
        .unwrap()
        .expect("report.json");
    let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(stored["members"].as_array().unwrap().len(), 2);
    for key in [
        layout::run_doc(&run_id),
        layout::member(&run_id, 0),
        layout::member(&run_id, 1),
        layout::fused(&run_id, "nt"),
        layout::fused(&run_id, "average"),
        layout::fine_tuned(&run_id, "nt"),
        layout::fine_tuned(&run_id, "average"),
    ] {
        assert!(storage.exists(&key).await.unwrap(), "{key} is missing");
    }
    // The fine-tuned NT model is a valid checkpoint of the members' architecture.
    let (bytes, _) = storage
        .get(&layout::fine_tuned(&run_id, "nt"))
        .await
        .unwrap()
        .unwrap();
    let state = fusion::checkpoint::load_bytes("nt", bytes.to_vec()).unwrap();
    let arch = fusion::arch::Architecture::new(state.arch().unwrap().unwrap()).unwrap();
    fusion::checkpoint::validate(&state, &arch, "nt").unwrap();
    assert_eq!(state.lineage().unwrap().method, "fine-tuned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_task_finishes_on_the_other_worker_from_its_last_checkpoint() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    c.start_worker("w2");
    let mut spec = small_spec(8, 20000);
    spec.members.as_mut().unwrap().count = 2;
    let run_id = submit(&c, spec, "").await.run.unwrap().run_id;
    // Wait until member 0 has written an epoch checkpoint, then SIGKILL its worker.
    let run = c
        .wait_for(&run_id, LONG, |r| {
            r.tasks.iter().any(|t| {
                t.label == "member 0" && !t.checkpoint.is_empty() && !t.worker_id.is_empty()
            })
        })
        .await;
    let victim = task(&run, "member 0").worker_id.clone();
    let name = if victim.starts_with("w1") { "w1" } else { "w2" };
    c.kill_worker(name);
    let run = c.wait_for(&run_id, LONG, is_final).await;
    assert_eq!(
        state(&run),
        pb::RunState::Succeeded,
        "{}: {}",
        run.message,
        c.logs()
    );
    let t = task(&run, "member 0");
    assert!(
        t.attempt >= 2,
        "member 0 should have needed a second attempt: {t:?}"
    );
    // The later attempt resumed: it wrote no state for the epochs before its checkpoint.
    let objects = c.objects().await;
    let prefix = format!("runs/{run_id}/tasks/member-0/attempt-{}/", t.attempt);
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
    let curve = &run.report.unwrap().curves[0];
    assert_eq!(curve.points.len(), 8, "the resumed curve holds every epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_killed_mid_run_and_restarted_finishes_the_run() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    c.start_worker("w2");
    let run_id = submit(&c, small_spec(6, 15000), "restart-me")
        .await
        .run
        .unwrap()
        .run_id;
    c.wait_for(&run_id, LONG, |r| {
        r.tasks
            .iter()
            .any(|t| t.progress.is_some_and(|p| p.epoch >= 2))
    })
    .await;
    c.kill_server();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.start_server();
    let run = c.wait_for(&run_id, LONG, is_final).await;
    assert_eq!(
        state(&run),
        pb::RunState::Succeeded,
        "{}: {}",
        run.message,
        c.logs()
    );
    // The request id still names the same run after the restart.
    let again = submit(&c, small_spec(6, 15000), "restart-me").await;
    assert!(!again.created);
    assert_eq!(again.run.unwrap().run_id, run_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_stops_its_tasks() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    c.start_worker("w2");
    let run_id = submit(&c, small_spec(40, 30000), "")
        .await
        .run
        .unwrap()
        .run_id;
    c.wait_for(&run_id, LONG, |r| {
        r.tasks.iter().filter(|t| t.progress.is_some()).count() == 2
    })
    .await;
    let cancelled = c
        .client()
        .await
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&cancelled), pb::RunState::Cancelled);
    assert!(cancelled
        .tasks
        .iter()
        .all(|t| task_state(t) == pb::TaskState::Cancelled));
    // Both workers stop their tasks and take new work: a short run completes.
    let short = submit(&c, small_spec(1, 2000), "")
        .await
        .run
        .unwrap()
        .run_id;
    let done = c.wait_for(&short, Duration::from_secs(180), is_final).await;
    assert_eq!(state(&done), pb::RunState::Succeeded, "{}", c.logs());
    let logs = c.logs();
    assert_eq!(logs.matches("stopping task").count(), 2, "{logs}");
    // Cancelling again is a state conflict.
    let err = c
        .client()
        .await
        .cancel_run(pb::CancelRunRequest {
            run_id,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_id_submitted_twice_gives_one_run() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    let first = submit(&c, small_spec(1, 1000), "nightly-2026-11-27").await;
    let second = submit(&c, small_spec(1, 1000), "nightly-2026-11-27").await;
    assert!(first.created && !second.created);
    assert_eq!(first.run.unwrap().run_id, second.run.unwrap().run_id);
    let listed = c
        .client()
        .await
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 1);
    let other = submit(&c, small_spec(1, 1000), "nightly-2026-11-28").await;
    assert!(other.created);
    // Pagination: one run per page, newest first.
    let page = c
        .client()
        .await
        .list_runs(pb::ListRunsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.runs[0].run_id, other.run.unwrap().run_id);
    let next = c
        .client()
        .await
        .list_runs(pb::ListRunsRequest {
            page_size: 1,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.runs.len(), 1);
    assert!(next.next_page_token.is_empty());
}

fn member_bytes(arch: &str, seed: u64) -> Vec<u8> {
    let a = fusion::arch::Architecture::new(fusion::arch::preset(arch).unwrap()).unwrap();
    let net = fusion::model::Network::init(&a, tch::Device::Cpu, seed).unwrap();
    fusion::checkpoint::to_bytes(&net.to_state().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_expired_cannot_overwrite_the_new_attempt() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    let run_id = submit(&c, small_spec(1, 1000), "")
        .await
        .run
        .unwrap()
        .run_id;
    let mut wc = c.worker_client().await;
    let register = |name: &str| pb::RegisterWorkerRequest {
        name: name.into(),
        capabilities: Some(pb::WorkerCapabilities {
            slots: 1,
            ..Default::default()
        }),
        version: "test".into(),
    };
    let a = wc
        .register_worker(register("slow"))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let first = wc
        .lease_task(pb::LeaseTaskRequest {
            worker_id: a.clone(),
            wait_ms: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!((first.label.as_str(), first.attempt), ("member 0", 1));
    // No heartbeats: the lease expires and member 0 goes back to the queue.
    c.wait_for(&run_id, Duration::from_secs(30), |r| {
        r.tasks
            .iter()
            .any(|t| t.label == "member 0" && task_state(t) == pb::TaskState::Pending)
    })
    .await;
    let b = wc
        .register_worker(register("fast"))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let second = loop {
        let t = wc
            .lease_task(pb::LeaseTaskRequest {
                worker_id: b.clone(),
                wait_ms: 1000,
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        if t.label == "member 0" {
            break t;
        }
    };
    assert_eq!(second.attempt, 2);
    assert_ne!(first.output_prefix, second.output_prefix);

    // Both attempts write a model under their own prefix.
    let storage = c.storage();
    let late = member_bytes("mlp:hidden=64,depth=2", 1);
    let good = member_bytes("mlp:hidden=64,depth=2", 2);
    let late_key = layout::attempt_model(&first.output_prefix);
    let good_key = layout::attempt_model(&second.output_prefix);
    storage.put(&late_key, late.clone().into()).await.unwrap();
    storage.put(&good_key, good.clone().into()).await.unwrap();
    let result = |key: &str| pb::TaskResult {
        checkpoint: key.to_string(),
        ..Default::default()
    };
    let refused = wc
        .complete_task(pb::CompleteTaskRequest {
            worker_id: a.clone(),
            task_id: first.task_id.clone(),
            attempt: 1,
            result: Some(result(&late_key)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("no longer holds its lease"),
        "{refused:?}"
    );
    // The heartbeat of the old attempt is told the lease is lost.
    let hb = wc
        .heartbeat(pb::HeartbeatRequest {
            worker_id: a,
            tasks: vec![pb::TaskLease {
                task_id: first.task_id.clone(),
                attempt: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.tasks[0].directive, pb::TaskDirective::LeaseLost as i32);
    wc.complete_task(pb::CompleteTaskRequest {
        worker_id: b,
        task_id: second.task_id.clone(),
        attempt: 2,
        result: Some(result(&good_key)),
    })
    .await
    .unwrap();
    let (accepted, _) = storage
        .get(&layout::member(&run_id, 0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        accepted.as_ref(),
        good.as_slice(),
        "the accepted member is the second attempt's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_the_wire_is_refused_with_a_clear_code_and_changes_nothing() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    let storage = c.storage();
    storage
        .put(
            "uploads/m0.safetensors",
            member_bytes("mlp:hidden=64,depth=2", 1).into(),
        )
        .await
        .unwrap();
    storage
        .put(
            "uploads/m1.safetensors",
            member_bytes("mlp:hidden=64,depth=2", 2).into(),
        )
        .await
        .unwrap();
    storage
        .put(
            "uploads/wide.safetensors",
            member_bytes("mlp:hidden=80,depth=2", 3).into(),
        )
        .await
        .unwrap();
    storage
        .put(
            "uploads/junk.safetensors",
            bytes::Bytes::from_static(b"not a checkpoint"),
        )
        .await
        .unwrap();
    let before = c.objects().await;
    let mut client = c.client().await;
    let submit = |spec: pb::RunSpec| pb::SubmitRunRequest {
        spec: Some(spec),
        request_id: String::new(),
    };
    let existing = |keys: &[&str]| {
        let mut s = small_spec(1, 1000);
        s.members.as_mut().unwrap().checkpoints = keys.iter().map(|k| k.to_string()).collect();
        s
    };

    let mut one = small_spec(1, 1000);
    one.members.as_mut().unwrap().count = 1;
    let e = client.submit_run(submit(one)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("members.count"), "{e:?}");

    let mut alexnet = small_spec(1, 1000);
    alexnet.architecture = Some(pb::Architecture {
        kind: Some(pb::architecture::Kind::Preset("alexnet".into())),
    });
    let e = client.submit_run(submit(alexnet)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("unknown architecture preset `alexnet`"),
        "{e:?}"
    );

    let e = client
        .submit_run(submit(existing(&[
            "uploads/m0.safetensors",
            "uploads/wide.safetensors",
        ])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("members.checkpoints[1]") && e.message().contains("fc1.weight"),
        "{e:?}"
    );

    let e = client
        .submit_run(submit(existing(&[
            "uploads/m0.safetensors",
            "uploads/junk.safetensors",
        ])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("not a valid safetensors file"),
        "{e:?}"
    );

    let e = client
        .submit_run(submit(existing(&[
            "uploads/m0.safetensors",
            "uploads/missing.safetensors",
        ])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("uploads/missing.safetensors"), "{e:?}");

    let e = client
        .get_run(pb::GetRunRequest {
            run_id: "run-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let mut wrong = c.client_with_token("wrong").await;
    let e = wrong
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("invalid client token"), "{e:?}");
    let mut as_worker = c.client_with_token(cluster::WORKER_TOKEN).await;
    let e = as_worker
        .submit_run(submit(small_spec(1, 1000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let mut huge = small_spec(1, 1000);
    huge.labels.insert("padding".into(), "x".repeat(5 << 20));
    let e = client.submit_run(submit(huge)).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{e:?}"
    );

    assert_eq!(
        c.objects().await,
        before,
        "a refused request changed the store"
    );
    let listed = client
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.runs.is_empty());

    // Existing checkpoints that fit make a run that skips training.
    let ok = client
        .submit_run(submit(existing(&[
            "uploads/m0.safetensors",
            "store:uploads/m1.safetensors",
        ])))
        .await
        .unwrap()
        .into_inner();
    let run = c
        .wait_for(&ok.run.unwrap().run_id, Duration::from_secs(60), |r| {
            state(r) == pb::RunState::FineTuning
        })
        .await;
    assert!(run
        .tasks
        .iter()
        .all(|t| t.kind != pb::TaskKind::Train as i32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_metrics_are_open_and_a_sigterm_worker_releases_its_task() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    let metrics_port = cluster::free_port();
    let worker_health = cluster::free_port();
    c.metrics_port = Some(metrics_port);
    c.worker_args
        .push(format!("--health-listen=127.0.0.1:{worker_health}"));
    c.start_server();
    let channel =
        nt_proto::tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", c.port))
            .unwrap()
            .connect_lazy();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "nt.v1.RunService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    c.start_worker("w1");
    let run_id = submit(&c, small_spec(30, 30000), "")
        .await
        .run
        .unwrap()
        .run_id;
    let run = c
        .wait_for(&run_id, LONG, |r| {
            r.tasks.iter().any(|t| !t.checkpoint.is_empty())
        })
        .await;
    let first = run
        .tasks
        .iter()
        .find(|t| !t.checkpoint.is_empty())
        .unwrap()
        .label
        .clone();
    c.workers.get_mut("w1").unwrap().terminate();
    // Released at once (retryable), not after a lease expiry.
    let released = c
        .wait_for(&run_id, Duration::from_secs(30), |r| {
            r.tasks.iter().any(|t| {
                t.label == first
                    && task_state(t) == pb::TaskState::Pending
                    && t.error.contains("released")
            })
        })
        .await;
    assert_eq!(state(&released), pb::RunState::Training);
    let start = std::time::Instant::now();
    while c.workers.get_mut("w1").unwrap().alive() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the worker did not exit:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
