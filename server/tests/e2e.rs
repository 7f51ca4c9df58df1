//! End to end, with real processes on 127.0.0.1: a SeaweedFS S3 server, the
//! `nt-server` coordinator and two `nt-worker`s, on a Fashion-MNIST subset.

// Each test holds the serial lock across its awaits on purpose: tests run
// on separate runtimes and must not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nt_common::auth::BearerToken;
use nt_common::layout;
use nt_proto::tonic::Code;
use nt_proto::v1 as pb;
use nt_testkit::cluster::{
    self, cancel_then_run_another, is_final, serial, small_spec, state, submit, Cluster, StoreKind,
};

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
    // Both workers stop their tasks and take new work.
    let logs = cancel_then_run_another(&c, &run_id).await;
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
    // The longest request id the API allows works on S3 too, and stays one run.
    let longest = "r".repeat(256);
    let first = submit(&c, small_spec(1, 1000), &longest).await;
    let again = submit(&c, small_spec(1, 1000), &longest).await;
    assert!(first.created && !again.created);
    assert_eq!(first.run.unwrap().run_id, again.run.unwrap().run_id);
}

fn member_bytes(arch: &str, seed: u64) -> Vec<u8> {
    let a = fusion::arch::Architecture::new(fusion::arch::preset(arch).unwrap()).unwrap();
    let net = nt_runtime::model::Network::init(&a, tch::Device::Cpu, seed).unwrap();
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
    let a = cluster::register_worker(&mut wc, "slow", 0).await;
    let first = cluster::lease_task(&mut wc, &a, 1000).await.unwrap();
    assert_eq!((first.label.as_str(), first.attempt), ("member 0", 1));
    // No heartbeats: the lease expires and member 0 goes back to the queue.
    c.wait_for(&run_id, Duration::from_secs(30), |r| {
        r.tasks
            .iter()
            .any(|t| t.label == "member 0" && task_state(t) == pb::TaskState::Pending)
    })
    .await;
    let b = cluster::register_worker(&mut wc, "fast", 0).await;
    let second = loop {
        let t = cluster::lease_task(&mut wc, &b, 1000).await.unwrap();
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
    let whole = member_bytes("mlp:hidden=64,depth=2", 4);
    for (key, bytes) in [
        ("m0", member_bytes("mlp:hidden=64,depth=2", 1)),
        ("m1", member_bytes("mlp:hidden=64,depth=2", 2)),
        ("wide", member_bytes("mlp:hidden=80,depth=2", 3)),
        ("junk", b"not a checkpoint".to_vec()),
        ("cut", whole[..whole.len() - 64].to_vec()),
    ] {
        storage
            .put(&format!("uploads/{key}.safetensors"), bytes.into())
            .await
            .unwrap();
    }
    let before = c.objects().await;
    let mut client = c.client().await;
    let submit = |spec: pb::RunSpec| pb::SubmitRunRequest {
        spec: Some(spec),
        request_id: String::new(),
        spec_file: String::new(),
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

    // Existing members beside a good one: of another width, not safetensors,
    // truncated (seen from the size and the header, without reading the
    // data), or absent.
    for (second, code, needles) in [
        (
            "uploads/wide.safetensors",
            Code::InvalidArgument,
            &["members.checkpoints[1]", "fc1.weight"][..],
        ),
        (
            "uploads/junk.safetensors",
            Code::InvalidArgument,
            &["members.checkpoints[1]", "not a valid safetensors file"][..],
        ),
        (
            "uploads/cut.safetensors",
            Code::InvalidArgument,
            &["members.checkpoints[1]", "truncated or padded"][..],
        ),
        (
            "uploads/missing.safetensors",
            Code::NotFound,
            &["members.checkpoints[1]", "uploads/missing.safetensors"][..],
        ),
    ] {
        let e = client
            .submit_run(submit(existing(&["uploads/m0.safetensors", second])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{second}: {e:?}");
        assert!(needles.iter().all(|n| e.message().contains(n)), "{e:?}");
    }

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
    // tonic's code for a request over --max-message-bytes.
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(
        e.message().contains("message length too large")
            && e.message().contains("the limit is: 4194304 bytes"),
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

/// The value of one series (`name` or `name{label="value"}`) in a Prometheus
/// text exposition.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

/// Polls `GET path` on 127.0.0.1:`port` until `done` holds for the status and
/// body, failing with every log after a minute.
async fn poll_http(
    c: &Cluster,
    port: u16,
    path: &str,
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let start = Instant::now();
    loop {
        let got = cluster::http_get(port, path);
        if let Some((code, body)) = &got {
            if done(*code, body) {
                return (*code, body.clone());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "GET 127.0.0.1:{port}{path}: last answer {got:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn scrape(c: &Cluster, port: u16, path: &str) -> String {
    let (code, body) = cluster::http_get(port, path)
        .unwrap_or_else(|| panic!("GET 127.0.0.1:{port}{path}: no answer\n{}", c.logs()));
    assert_eq!(code, 200, "GET 127.0.0.1:{port}{path}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_worker_health_describe_a_completed_run() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    let metrics_port = cluster::free_port();
    let health_port = cluster::free_port();
    c.metrics_port = Some(metrics_port);
    c.worker_args
        .push(format!("--health-listen=127.0.0.1:{health_port}"));

    // The worker starts before the coordinator: until it has registered, its
    // /healthz says so.
    c.start_worker("w1");
    let (code, body) = poll_http(&c, health_port, "/healthz", |_, _| true).await;
    assert_eq!((code, body.as_str()), (503, "not registered yet"));
    let m = scrape(&c, health_port, "/metrics");
    assert_eq!(metric(&m, "nt_worker_registered"), Some(0.0), "{m}");
    c.start_server();
    let (_, body) = poll_http(&c, health_port, "/healthz", |code, _| code == 200).await;
    assert_eq!(body, "ok");
    let (code, body) = cluster::http_get(metrics_port, "/healthz").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok"));

    let run_id = submit(&c, small_spec(1, 2000), "")
        .await
        .run
        .unwrap()
        .run_id;
    let run = c.wait_for(&run_id, LONG, is_final).await;
    assert_eq!(
        state(&run),
        pb::RunState::Succeeded,
        "{}: {}",
        run.message,
        c.logs()
    );
    let tasks = run.tasks.len() as f64;
    assert!(
        run.tasks.iter().all(|t| t.attempt == 1),
        "one worker, no failures: {:?}",
        run.tasks
    );
    // Each training task's last progress is its last epoch: epoch
    // checkpoints, reported after it, do not reset it.
    for t in run.tasks.iter().filter(|t| t.label != "evaluation") {
        let p = t.progress.as_ref().unwrap();
        assert!(p.epochs > 0 && p.epoch == p.epochs, "{}: {p:?}", t.label);
    }

    // The coordinator. The last CompleteTask is timed when its handler
    // returns, just after the run turned Succeeded.
    let complete = r#"nt_rpc_duration_seconds_count{method="CompleteTask"}"#;
    let (_, m) = poll_http(&c, metrics_port, "/metrics", |code, body| {
        code == 200 && metric(body, complete) == Some(tasks)
    })
    .await;
    let expect = |series: &str, value: f64| {
        assert_eq!(metric(&m, series), Some(value), "{series} in\n{m}");
    };
    expect(r#"nt_runs{state="succeeded"}"#, 1.0);
    expect(r#"nt_tasks{state="succeeded"}"#, tasks);
    expect("nt_queue_depth_tasks", 0.0);
    expect("nt_workers", 1.0);
    expect("nt_runs_submitted_total", 1.0);
    expect("nt_leases_total", tasks);
    expect("nt_lease_expiries_total", 0.0);
    expect("nt_fusion_duration_seconds_count", 1.0);
    expect(r#"nt_rpc_duration_seconds_count{method="SubmitRun"}"#, 1.0);
    expect(
        r#"nt_rpc_duration_seconds_count{method="RegisterWorker"}"#,
        1.0,
    );
    for series in [
        r#"nt_rpc_duration_seconds_count{method="GetRun"}"#,
        r#"nt_rpc_duration_seconds_count{method="ReportProgress"}"#,
        "nt_fusion_duration_seconds_sum",
    ] {
        assert!(metric(&m, series).unwrap_or(0.0) > 0.0, "{series} in\n{m}");
    }
    for kind in [
        pb::TaskKind::Train,
        pb::TaskKind::FineTune,
        pb::TaskKind::Evaluate,
    ] {
        let n = run.tasks.iter().filter(|t| t.kind == kind as i32).count();
        assert!(n > 0, "no {kind:?} task in {:?}", run.tasks);
        let name = kind.as_str_name();
        expect(
            &format!(r#"nt_task_duration_seconds_count{{kind="{name}"}}"#),
            n as f64,
        );
        if kind != pb::TaskKind::Evaluate {
            let sum = metric(
                &m,
                &format!(r#"nt_task_duration_seconds_sum{{kind="{name}"}}"#),
            );
            assert!(sum.unwrap_or(0.0) > 0.0, "{name} took no time in\n{m}");
        }
    }
    // The worker's last reported training throughput, under its worker id.
    let sps: Vec<f64> = m
        .lines()
        .filter(|l| l.starts_with(r#"nt_samples_per_second{worker="w1-"#))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(sps.len(), 1, "{m}");
    assert!(sps[0] > 0.0, "{m}");
    // The worker ran every task and runs none now.
    let m = scrape(&c, health_port, "/metrics");
    let expect = |series: &str, value: f64| {
        assert_eq!(metric(&m, series), Some(value), "{series} in\n{m}");
    };
    expect("nt_worker_registered", 1.0);
    expect("nt_worker_running_tasks", 0.0);
    expect(r#"nt_worker_tasks_total{outcome="completed"}"#, tasks);
    assert!(
        metric(&m, "nt_worker_samples_per_second").unwrap_or(0.0) > 0.0,
        "{m}"
    );
    let (code, body) = cluster::http_get(health_port, "/healthz").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_worker_token_is_unauthenticated_and_changes_nothing() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    let metrics_port = cluster::free_port();
    c.metrics_port = Some(metrics_port);
    // No lease expires while the test looks.
    c.lease_ttl_ms = 120_000;
    c.start_server();
    let run_id = submit(&c, small_spec(1, 1000), "")
        .await
        .run
        .unwrap()
        .run_id;
    // An honest worker holds the lease of one task.
    let mut honest = c.worker_client().await;
    let worker_id = cluster::register_worker(&mut honest, "honest", 0).await;
    let leased = cluster::lease_task(&mut honest, &worker_id, 1000)
        .await
        .unwrap();
    let storage = c.storage();
    let key = layout::attempt_model(&leased.output_prefix);
    storage
        .put(&key, member_bytes("mlp:hidden=64,depth=2", 1).into())
        .await
        .unwrap();
    let summary = |r: &pb::Run| {
        (
            r.state,
            r.tasks
                .iter()
                .map(|t| {
                    (
                        t.label.clone(),
                        t.state,
                        t.attempt,
                        t.worker_id.clone(),
                        t.checkpoint.clone(),
                        t.error.clone(),
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    let run_before = summary(&get_run(&c, &run_id).await);
    let objects_before = c.objects().await;
    let (doc_before, _) = storage
        .get(&layout::run_doc(&run_id))
        .await
        .unwrap()
        .unwrap();

    // A wrong token, the client's token, and no token: every worker call is
    // refused, saying why.
    for (token, why) in [
        ("wrong", "invalid worker token"),
        (cluster::CLIENT_TOKEN, "invalid worker token"),
        (
            "",
            "missing bearer token: this service needs the worker token",
        ),
    ] {
        let mut bad = c.worker_client_with_token(token).await;
        let lease = || pb::TaskLease {
            task_id: leased.task_id.clone(),
            attempt: leased.attempt,
        };
        let errors = [
            bad.register_worker(cluster::register_request("intruder", 0))
                .await
                .map(drop),
            bad.lease_task(pb::LeaseTaskRequest {
                worker_id: worker_id.clone(),
                wait_ms: 100,
            })
            .await
            .map(drop),
            bad.heartbeat(pb::HeartbeatRequest {
                worker_id: worker_id.clone(),
                tasks: vec![lease()],
            })
            .await
            .map(drop),
            bad.report_progress(pb::ReportProgressRequest {
                worker_id: worker_id.clone(),
                task_id: leased.task_id.clone(),
                attempt: leased.attempt,
                checkpoint: key.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
            bad.complete_task(pb::CompleteTaskRequest {
                worker_id: worker_id.clone(),
                task_id: leased.task_id.clone(),
                attempt: leased.attempt,
                result: Some(pb::TaskResult {
                    checkpoint: key.clone(),
                    ..Default::default()
                }),
            })
            .await
            .map(drop),
            bad.fail_task(pb::FailTaskRequest {
                worker_id: worker_id.clone(),
                task_id: leased.task_id.clone(),
                attempt: leased.attempt,
                error: "intruder".into(),
                retryable: false,
                split: false,
            })
            .await
            .map(drop),
        ];
        for (i, r) in errors.into_iter().enumerate() {
            let e = r.expect_err("a call with a bad token succeeded");
            assert_eq!(
                e.code(),
                Code::Unauthenticated,
                "call {i}, token {token:?}: {e:?}"
            );
            assert_eq!(e.message(), why, "call {i}, token {token:?}");
        }
    }

    // A worker process with a wrong token stops at once and says why.
    c.worker_token = "wrong".into();
    c.start_worker("intruder");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = c
            .workers
            .get_mut("intruder")
            .unwrap()
            .child
            .try_wait()
            .unwrap()
        {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the worker with a wrong token kept running:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "{status:?}");
    let log = std::fs::read_to_string(&c.workers["intruder"].log).unwrap();
    assert!(
        log.contains("registration refused: invalid worker token"),
        "{log}"
    );

    // Nothing changed: the run, the store, the registered workers.
    assert_eq!(summary(&get_run(&c, &run_id).await), run_before);
    assert_eq!(c.objects().await, objects_before, "the store changed");
    let (doc_after, _) = storage
        .get(&layout::run_doc(&run_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc_after, doc_before, "the run document changed");
    let m = scrape(&c, metrics_port, "/metrics");
    assert_eq!(metric(&m, "nt_workers"), Some(1.0), "{m}");
    // And the honest worker still holds its lease.
    let hb = honest
        .heartbeat(pb::HeartbeatRequest {
            worker_id,
            tasks: vec![pb::TaskLease {
                task_id: leased.task_id.clone(),
                attempt: leased.attempt,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(hb.tasks[0].directive, pb::TaskDirective::LeaseLost as i32);
}

async fn get_run(c: &Cluster, run_id: &str) -> pb::Run {
    c.client()
        .await
        .get_run(pb::GetRunRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the TLS test needs the openssl command");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA, and a server certificate and key it signed for 127.0.0.1
/// and localhost: (CA, certificate, key).
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=nt e2e test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// The real ntctl, untouched by the environment and config files.
fn ntctl() -> Command {
    let mut c = Command::new(cluster::binary("ntctl"));
    c.env_remove("NT_ENDPOINT")
        .env_remove("NT_TOKEN")
        .env_remove("NT_OUTPUT")
        .env_remove("NT_CONFIG")
        .env_remove("NT_TLS_CA")
        .env_remove("NT_TLS_DOMAIN")
        .env("XDG_CONFIG_HOME", "/nonexistent");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_and_workers_that_trust_its_ca_and_refuses_plain_text() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::Local);
    let (ca, cert, key) = make_certs(&c.dir.path().join("certs"));
    c.server_args.push(format!("--tls-cert={}", cert.display()));
    c.server_args.push(format!("--tls-key={}", key.display()));
    c.start_server();
    tls_clients_and_workers(&mut c, &ca).await;
}

/// Against a TLS coordinator on `c.port` with a certificate `ca` signed: the
/// client library and ntctl with the CA work; without it, or in plain text,
/// they fail saying so; a worker with the CA registers and leases.
async fn tls_clients_and_workers(c: &mut Cluster, ca: &Path) {
    let https = format!("https://127.0.0.1:{}", c.port);

    // The client library's TLS settings, with the CA.
    let tls = nt_common::tls::ClientTlsArgs {
        tls_ca: Some(ca.to_path_buf()),
        tls_domain: None,
    }
    .config()
    .unwrap();
    let channel = nt_proto::tonic::transport::Endpoint::from_shared(https.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("TLS connect: {e:?}\n{}", c.logs()));
    let mut client = pb::run_service_client::RunServiceClient::with_interceptor(
        channel,
        BearerToken::new(Some(cluster::CLIENT_TOKEN)).unwrap(),
    );
    let run_id = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(small_spec(1, 1000)),
            request_id: String::new(),
            spec_file: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;

    // ntctl with the CA lists the run.
    let out = ntctl()
        .args(["--endpoint", &https, "--tls-ca"])
        .arg(ca)
        .args(["--token", cluster::CLIENT_TOKEN, "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains(&run_id), "{}", text(&out.stdout));

    // Without the CA, the certificate is not trusted.
    let out = ntctl()
        .args([
            "--endpoint",
            &https,
            "--token",
            cluster::CLIENT_TOKEN,
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot reach the coordinator") && err.contains("invalid peer certificate"),
        "{err}"
    );

    // Plain text to the TLS port fails, and the server goes on serving TLS.
    // The message is not checked yet: ntctl says `Internal: h2 protocol
    // error: http2 error`, the library `Unknown: transport error`; neither
    // mentions TLS.
    let out = ntctl()
        .args([
            "--endpoint",
            &format!("http://127.0.0.1:{}", c.port),
            "--token",
            cluster::CLIENT_TOKEN,
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).starts_with("error: "),
        "{}",
        text(&out.stderr)
    );
    c.client()
        .await
        .list_runs(pb::ListRunsRequest::default())
        .await
        .expect_err("a plain-text call to a TLS port succeeded");
    let listed = client
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 1);

    // A worker dials over TLS with the CA, registers and leases a task.
    let health_port = cluster::free_port();
    c.coordinator_url = Some(https);
    c.worker_args.push(format!("--tls-ca={}", ca.display()));
    c.worker_args
        .push(format!("--health-listen=127.0.0.1:{health_port}"));
    c.start_worker("tls");
    poll_http(c, health_port, "/healthz", |code, _| code == 200).await;
    let start = Instant::now();
    loop {
        let run = client
            .get_run(pb::GetRunRequest {
                run_id: run_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if run.tasks.iter().any(|t| t.worker_id.starts_with("tls")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the TLS worker leased nothing: {:?}\n{}",
            run.tasks,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_turns_not_serving_on_sigterm_then_exits() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::Local);
    c.start_server();
    let channel =
        nt_proto::tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", c.port))
            .unwrap()
            .connect_lazy();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let services = ["", "nt.v1.RunService", "nt.v1.WorkerService"];
    let mut watches = Vec::new();
    for service in services {
        let mut stream = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32, "{service:?}");
        watches.push(stream);
    }
    // And a client following a run that will not finish (no workers).
    let run_id = submit(&c, small_spec(1, 1000), "")
        .await
        .run
        .unwrap()
        .run_id;
    let mut follow = c
        .client()
        .await
        .watch_run(pb::WatchRunRequest {
            run_id,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    c.server.as_mut().unwrap().terminate();
    for (service, stream) in services.iter().zip(watches.iter_mut()) {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{service:?} still serving after SIGTERM\n{}", c.logs()))
            .unwrap()
            .unwrap();
        assert_eq!(next.status, ServingStatus::NotServing as i32, "{service:?}");
    }
    // The run's watcher is told to come back later.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match follow.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("WatchRun still open after SIGTERM\n{}", c.logs()));
    let e = ended.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{e:?}");
    // The health watches stay open, yet the coordinator exits cleanly within
    // its 10 s drain limit.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = c.server.as_mut().unwrap().child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the coordinator did not exit after SIGTERM:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}\n{}", c.logs());
    drop(watches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_run_document_is_skipped_and_never_overwritten() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::Local);
    c.start_server();
    let broken = submit(&c, small_spec(1, 1000), "req-broken")
        .await
        .run
        .unwrap()
        .run_id;
    let fine = submit(&c, small_spec(1, 1000), "")
        .await
        .run
        .unwrap()
        .run_id;
    c.kill_server();
    let storage = c.storage();
    let key = layout::run_doc(&broken);
    let garbage = bytes::Bytes::from_static(b"{\"run\": 42");
    storage.put(&key, garbage.clone()).await.unwrap();

    // The coordinator starts and serves the readable run.
    c.start_server();
    let mut client = c.client().await;
    let get = |run_id: &str| pb::GetRunRequest {
        run_id: run_id.into(),
    };
    client.get_run(get(&fine)).await.unwrap();
    let e = client.get_run(get(&broken)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // The broken run's request id cannot claim its document again.
    let e = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(small_spec(1, 1000)),
            request_id: "req-broken".into(),
            spec_file: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&broken), "{e:?}");
    let (bytes, _) = storage.get(&key).await.unwrap().unwrap();
    assert_eq!(bytes, garbage, "the document was left as it was");
    assert!(c.logs().contains("skipping a run document"), "{}", c.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_folder_in_the_bucket_trains_like_its_arrays_and_is_decoded_only_once() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    // Fashion-MNIST images as PNG files, and the same images as arrays in
    // the folder's sample order, uploaded the way the README says.
    let dir = tempfile::tempdir().unwrap();
    let (store_args, store_env) = c.store_args();
    for (format, prefix, files) in [("image-folder", "fm", 3500), ("arrays", "fm-arrays", 4)] {
        let folder = dir.path().join(prefix);
        let out = ntctl()
            .args([
                "data",
                "export",
                "--train-subset",
                "3000",
                "--test-subset",
                "500",
            ])
            .args(["--format", format, "--in-folder-order", "--out"])
            .arg(&folder)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = ntctl()
            .args(["data", "upload"])
            .arg(&folder)
            .arg(format!("datasets/{prefix}"))
            .args(&store_args)
            .envs(store_env.clone())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let said = text(&out.stdout);
        assert!(said.contains(&format!("uploaded {files} files")), "{said}");
    }
    let spec = |format: &str, prefix: &str| {
        let yaml = format!(
            r#"
name: own-data
data: {{format: {format}, path: "store:datasets/{prefix}"}}
architecture: "mlp:hidden=64,depth=2"
members: {{count: 2, training: {{epochs: 2, batch_size: 64, lr: 0.05}}}}
fusion: [nt]
fine_tuning: {{training: {{epochs: 1, batch_size: 64}}}}
"#
        );
        nt_spec::RunSpecFile::from_yaml(&yaml)
            .unwrap()
            .to_proto(Path::new("."))
            .unwrap()
    };
    let mut runs = Vec::new();
    for (format, prefix) in [("image-folder", "fm"), ("arrays", "fm-arrays")] {
        let run_id = submit(&c, spec(format, prefix), "")
            .await
            .run
            .unwrap()
            .run_id;
        let run = c.wait_for(&run_id, LONG, is_final).await;
        assert_eq!(
            state(&run),
            pb::RunState::Succeeded,
            "{}: {}",
            run.message,
            c.logs()
        );
        runs.push(run);
    }

    let report = runs[0].report.clone().unwrap();
    let first = report.members[0].data.clone().unwrap();
    assert!(!first.cache_hit, "the first task decodes: {first:?}");
    assert_eq!(first.images, 3500);
    assert!(first.seconds > 0.0);
    assert!(first.source.ends_with("datasets/fm"), "{first:?}");
    assert!(first.cache_key.starts_with("cache/data/"), "{first:?}");
    // Every later task reads the decoded set back instead.
    let second = report.members[1].data.clone().unwrap();
    assert!(
        second.cache_hit && second.cache_key == first.cache_key,
        "{second:?}"
    );
    let tuned = report.fused[0].after_fine_tuning.clone().unwrap();
    assert!(tuned.data.unwrap().cache_hit);
    assert!(
        report.members.iter().all(|m| m.accuracy > 0.6),
        "{report:?}"
    );
    assert!(c.objects().await.contains(&first.cache_key));
    let log = std::fs::read_to_string(c.dir.path().join("w1.log")).unwrap();
    // Without the terminal colours.
    let log: String = log
        .split('\x1b')
        .map(|part| match part.split_once('m') {
            Some((_, rest)) if part.starts_with('[') => rest,
            _ => part,
        })
        .collect();
    assert!(
        log.contains("data loaded") && log.contains("cache_hit=true"),
        "{log}"
    );

    // Through the store too, a member trained from the PNG files equals,
    // bit for bit, the member trained from the arrays.
    let storage = c.storage();
    for m in 0..2 {
        let mut states = Vec::new();
        for run in &runs {
            let key = layout::member(&run.run_id, m);
            let (bytes, _) = storage.get(&key).await.unwrap().unwrap();
            states.push(fusion::checkpoint::load_bytes(&key, bytes.to_vec()).unwrap());
        }
        assert!(!states[0].tensors.is_empty());
        for (name, t) in &states[0].tensors {
            assert_eq!(
                t.bytes(),
                states[1].get(name).unwrap().bytes(),
                "member {m}: {name}"
            );
        }
    }
    let arrays = runs[1].report.clone().unwrap();
    assert_eq!(arrays.members[0].accuracy, report.members[0].accuracy);
    let loaded = arrays.members[0].data.clone().unwrap();
    assert!(!loaded.cache_hit && loaded.cache_key.is_empty() && loaded.images == 3500);
}
