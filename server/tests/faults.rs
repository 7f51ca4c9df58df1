//! Faults injected into real processes on 127.0.0.1 (nt-server, nt-worker,
//! SeaweedFS, and a proxy in front of it that can slow the store down and
//! shows which requests are under way). Each test ends with the run
//! finished, or failed with its reason, and nothing lost: every member the
//! run accepted is in the store and the report is written.

// Each test holds the serial lock across its awaits on purpose: tests run
// on separate runtimes and must not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use std::time::{Duration, Instant};

use nt_common::layout;
use nt_proto::v1 as pb;
use nt_testkit::cluster::{self, is_final, serial, small_spec, state, submit, Cluster, StoreKind};

const LONG: Duration = Duration::from_secs(420);

/// A store slowed to a second per request answers a lease renewal in one
/// to two seconds: the coordinator's store lease must live longer than that
/// (in production it lives 15 s), or the coordinator would rightly stop
/// writing for want of the store's confirmation.
fn slow_store_lease(c: &mut Cluster) {
    c.store_lease_ttl_ms = 6000;
}

/// The run succeeded, and everything it names is in the store.
async fn finished_with_nothing_lost(c: &Cluster, run_id: &str) -> pb::Run {
    let run = c.wait_for(run_id, LONG, is_final).await;
    assert_eq!(
        state(&run),
        pb::RunState::Succeeded,
        "{}: {}",
        run.message,
        c.logs()
    );
    let objects = c.objects().await;
    for i in 0..2 {
        let member = layout::member(run_id, i);
        assert!(objects.contains(&member), "{member} missing: {objects:?}");
    }
    assert!(objects.contains(&layout::report(run_id)));
    // Every member task finished exactly once.
    for t in run.tasks.iter().filter(|t| t.label.starts_with("member")) {
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    }
    run
}

async fn run_id_of(c: &Cluster, spec: pb::RunSpec) -> String {
    submit(c, spec, "").await.run.unwrap().run_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_is_refused_and_a_frozen_one_is_fenced_by_its_successor() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    // A queued run (no workers yet).
    let run_id = run_id_of(&c, small_spec(1, 2000)).await;

    // A second coordinator on the same store while the first renews: refused.
    let mut second = c.spawn_server(cluster::free_port(), None);
    let status = second
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("a second coordinator kept running:\n{}", c.logs()));
    assert!(!status.success());
    let log = std::fs::read_to_string(&second.log).unwrap();
    assert!(
        log.contains("only one coordinator may use a store"),
        "{log}"
    );

    // The first freezes past its lease: a new one takes the store over.
    let mut first = c.server.take().unwrap();
    first.freeze();
    c.port = cluster::free_port();
    let began = Instant::now();
    c.start_server();
    let run = c.wait_for(&run_id, LONG, |_| true).await;
    assert!(
        began.elapsed() >= Duration::from_millis(c.store_lease_ttl_ms),
        "took over after {:?}",
        began.elapsed()
    );
    assert_eq!(state(&run), pb::RunState::Queued);

    // Woken up, the first finds its lease taken, stops writing and exits
    // with an error.
    first.thaw();
    let status = first
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the fenced coordinator kept running:\n{}", c.logs()));
    assert!(!status.success());
    let log = std::fs::read_to_string(&first.log).unwrap();
    assert!(log.contains("lost the store lease"), "{log}");

    // The successor owns the run: it finishes it.
    c.start_worker("w1");
    finished_with_nothing_lost(&c, &run_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_frozen_for_30_s_mid_training_is_waited_out_and_reported() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    let metrics_port = cluster::free_port();
    c.metrics_port = Some(metrics_port);
    c.start_server();
    c.start_worker("w1");
    let run_id = run_id_of(&c, small_spec(6, 6000)).await;
    c.wait_for(&run_id, LONG, |r| {
        r.tasks
            .iter()
            .any(|t| t.progress.is_some_and(|p| p.epoch >= 1))
    })
    .await;
    c.seaweed.as_mut().unwrap().proc.freeze();
    let frozen = Instant::now();
    // Meanwhile the coordinator stays up and says the store is down.
    let (code, body) = poll_http(
        metrics_port,
        "/healthz",
        Duration::from_secs(25),
        |code, _| code == 503,
    )
    .unwrap_or_else(|| panic!("/healthz never said the store is down:\n{}", c.logs()));
    assert!(body.contains("store unavailable"), "{code} {body}");
    let (_, metrics) = cluster::http_get(metrics_port, "/metrics").unwrap();
    assert!(metrics.contains("nt_store_up 0"), "{metrics}");
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(frozen.elapsed())).await;
    c.seaweed.as_mut().unwrap().proc.thaw();
    assert!(c.server.as_mut().unwrap().alive(), "{}", c.logs());
    poll_http(
        metrics_port,
        "/healthz",
        Duration::from_secs(60),
        |code, _| code == 200,
    )
    .unwrap_or_else(|| panic!("/healthz never recovered:\n{}", c.logs()));
    finished_with_nothing_lost(&c, &run_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_frozen_for_30_s_mid_fusion_is_waited_out() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    let proxy = c.proxy_store();
    slow_store_lease(&mut c);
    c.start_server();
    c.start_worker("w1");
    let run_id = run_id_of(&c, small_spec(1, 2000)).await;
    // Fusion reads the members: slow the store so it is still reading them
    // when the store freezes.
    c.wait_for(&run_id, LONG, |r| {
        r.tasks
            .iter()
            .filter(|t| t.label.starts_with("member"))
            .filter(|t| t.state == pb::TaskState::Succeeded as i32)
            .count()
            == 1
    })
    .await;
    proxy.set_latency(Duration::from_millis(1000));
    c.wait_for(&run_id, LONG, |r| state(r) == pb::RunState::Fusing)
        .await;
    c.seaweed.as_mut().unwrap().proc.freeze();
    tokio::time::sleep(Duration::from_secs(30)).await;
    c.seaweed.as_mut().unwrap().proc.thaw();
    proxy.set_latency(Duration::ZERO);
    assert!(c.server.as_mut().unwrap().alive(), "{}", c.logs());
    finished_with_nothing_lost(&c, &run_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_uploading_a_checkpoint_is_replaced() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    let proxy = c.proxy_store();
    slow_store_lease(&mut c);
    proxy.set_latency(Duration::from_millis(300));
    c.start_server();
    c.start_worker("w1");
    let run_id = run_id_of(&c, small_spec(3, 3000)).await;
    // An upload under way: a PUT of a checkpoint not yet answered.
    let upload = proxy
        .wait_for(LONG, |r| {
            r.method == "PUT" && r.path.ends_with(".safetensors") && r.status.is_none()
        })
        .unwrap_or_else(|| panic!("no checkpoint upload seen:\n{}", c.logs()));
    c.kill_worker("w1");
    proxy.set_latency(Duration::ZERO);
    c.start_worker("w2");
    let run = finished_with_nothing_lost(&c, &run_id).await;
    eprintln!("killed during {} {}", upload.method, upload.path);
    assert!(
        run.tasks.iter().any(|t| t.attempt >= 2),
        "the interrupted task ran again: {run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_its_model_upload_while_reporting_completion_is_replaced() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    let proxy = c.proxy_store();
    slow_store_lease(&mut c);
    c.start_server();
    c.start_worker("w1");
    let run_id = run_id_of(&c, small_spec(1, 2000)).await;
    // The attempt's final model is stored: the worker now reports completion.
    proxy
        .wait_for(LONG, |r| {
            r.method == "PUT" && r.path.ends_with("/model.safetensors") && r.status == Some(200)
        })
        .unwrap_or_else(|| panic!("no final model upload seen:\n{}", c.logs()));
    c.kill_worker("w1");
    c.start_worker("w2");
    finished_with_nothing_lost(&c, &run_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_killed_right_after_a_member_upload_and_during_fusion_recovers() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    let proxy = c.proxy_store();
    slow_store_lease(&mut c);
    c.start_server();
    c.start_worker("w1");
    let run_id = run_id_of(&c, small_spec(1, 2000)).await;
    proxy
        .wait_for(LONG, |r| {
            r.method == "PUT" && r.path.ends_with("/model.safetensors") && r.status == Some(200)
        })
        .unwrap_or_else(|| panic!("no member upload seen:\n{}", c.logs()));
    c.kill_server();
    c.start_server();
    // Then again while it fuses (the store slowed so fusion takes a while).
    proxy.set_latency(Duration::from_millis(1000));
    c.wait_for(&run_id, LONG, |r| state(r) == pb::RunState::Fusing)
        .await;
    c.kill_server();
    proxy.set_latency(Duration::ZERO);
    c.start_server();
    finished_with_nothing_lost(&c, &run_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_its_lease_is_refused_when_it_wakes_and_the_task_runs_once() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    // Long enough that the task cannot finish before the freeze.
    let run_id = run_id_of(&c, small_spec(20, 6000)).await;
    c.wait_for(&run_id, LONG, |r| {
        r.tasks
            .iter()
            .any(|t| t.progress.is_some_and(|p| p.epoch >= 1))
    })
    .await;
    c.workers.get_mut("w1").unwrap().freeze();
    // Its lease expires; the second worker takes the task over.
    c.start_worker("w2");
    c.wait_for(&run_id, LONG, |r| r.tasks.iter().any(|t| t.attempt >= 2))
        .await;
    c.workers.get_mut("w1").unwrap().thaw();
    let run = finished_with_nothing_lost(&c, &run_id).await;
    let w1 = std::fs::read_to_string(&c.workers["w1"].log)
        .unwrap()
        .to_lowercase();
    assert!(
        w1.contains("stopping task") && w1.contains("leaselost"),
        "the woken worker was not told its lease was gone:\n{w1}"
    );
    // The task ran on: its accepted attempt is the second worker's.
    assert!(run.tasks.iter().any(|t| t.attempt == 2), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_slows_a_run_down_without_failing_it() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    let proxy = c.proxy_store();
    slow_store_lease(&mut c);
    proxy.set_latency(Duration::from_millis(250));
    c.start_server();
    c.start_worker("w1");
    c.start_worker("w2");
    let run_id = run_id_of(&c, small_spec(2, 2000)).await;
    finished_with_nothing_lost(&c, &run_id).await;
    let slow = proxy.requests().len();
    assert!(slow > 20, "only {slow} requests went through the proxy");
}

/// Polls an HTTP endpoint until `done` holds; the last answer, or `None`.
fn poll_http(
    port: u16,
    path: &str,
    limit: Duration,
    done: impl Fn(u16, &str) -> bool,
) -> Option<(u16, String)> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some((code, body)) = cluster::http_get(port, path) {
            if done(code, &body) {
                return Some((code, body));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_path_outside_the_workers_data_folders_fails_the_run_unread() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    let secret = c.dir.path().join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("train-images-idx3-ubyte"), "TOP SECRET").unwrap();
    let yaml = format!(
        "data: {{dataset: fashion-mnist, path: {}}}\narchitecture: mlp:hidden=8,depth=1\n\
         members: {{count: 2, training: {{epochs: 1}}}}\nfusion: [nt]\n",
        secret.display()
    );
    let spec = nt_spec::RunSpecFile::from_yaml(&yaml)
        .unwrap()
        .to_proto(std::path::Path::new("."))
        .unwrap();
    let run_id = run_id_of(&c, spec).await;
    let run = c.wait_for(&run_id, LONG, is_final).await;
    assert_eq!(state(&run), pb::RunState::Failed, "{run:?}");
    let why = format!("{} {:?}", run.message, run.tasks);
    assert!(why.contains("data folders"), "{why}");
    assert!(!why.contains("TOP SECRET"), "{why}");
    // Refused, not retried: the first attempt was the last.
    assert!(run.tasks.iter().all(|t| t.attempt <= 1), "{run:?}");
}

/// A small tmpfs mounted for a test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts `bytes` of tmpfs at `dir` (needs root, as in CI); the reason
    /// when it cannot.
    fn mount(dir: &std::path::Path, bytes: u64) -> Result<Self, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l"])
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_store_fails_writes_cleanly_and_frees_up() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::Local);
    let store = c.dir.path().join("store");
    // A real full disk: a tmpfs of 16 MiB under the local store, nearly
    // filled. Mounting needs root; CI runs as root. Elsewhere the test says
    // why it cannot run and fails, rather than pass unseen.
    let _disk = Tmpfs::mount(&store, 16 << 20).unwrap_or_else(|e| {
        panic!("cannot mount a tmpfs for the full-disk test (run as root): {e}")
    });
    c.start_server();
    c.start_worker("w1");
    // Room for the run documents, not for the checkpoints.
    let filler = store.join("filler");
    let free = {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&store)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    std::fs::write(&filler, vec![0u8; (free - (96 << 10)) as usize]).unwrap();
    let run_id = run_id_of(&c, small_spec(1, 2000)).await;
    // The worker's uploads fail: out of space, said so.
    let run = c
        .wait_for(&run_id, LONG, |r| {
            is_final(r)
                || r.tasks
                    .iter()
                    .any(|t| t.error.to_lowercase().contains("no space left"))
        })
        .await;
    let said = format!("{} {:?}", run.message, run.tasks);
    assert!(said.to_lowercase().contains("no space left"), "{said}");
    assert!(c.server.as_mut().unwrap().alive(), "{}", c.logs());
    // Space again: the run finishes, or has failed naming the full disk.
    std::fs::remove_file(&filler).unwrap();
    let run = c.wait_for(&run_id, LONG, is_final).await;
    match state(&run) {
        pb::RunState::Succeeded => {}
        pb::RunState::Failed => {
            assert!(
                run.message.to_lowercase().contains("no space left"),
                "{}",
                run.message
            );
        }
        other => panic!("{other:?}: {}", run.message),
    }
    // Nothing half-written: every object is readable, every checkpoint
    // whole; and a new run goes through.
    let storage = c.storage();
    for key in c.objects().await {
        let (bytes, _) = storage.get(&key).await.unwrap().unwrap();
        if key.ends_with(".safetensors") {
            let len = fusion::checkpoint::header_len(&key, &bytes, bytes.len() as u64)
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            assert!(8 + len <= bytes.len() as u64, "{key} is truncated");
        } else if key.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }
    let again = run_id_of(&c, small_spec(1, 2000)).await;
    finished_with_nothing_lost(&c, &again).await;
}
