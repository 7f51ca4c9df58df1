//! A real cluster on 127.0.0.1 for end-to-end tests: a SeaweedFS S3 server
//! (from the project's virtualenv), the `nt-server` binary and `nt-worker`
//! processes. Everything is stopped on `Drop`; logs go to the test's temp
//! folder and are printed when a wait times out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nt_common::auth::BearerToken;
use nt_proto::tonic::codegen::InterceptedService;
use nt_proto::tonic::transport::Channel;
use nt_proto::v1 as pb;

pub const CLIENT_TOKEN: &str = "client-secret";
pub const WORKER_TOKEN: &str = "worker-secret";

pub type RunClient =
    pb::run_service_client::RunServiceClient<InterceptedService<Channel, BearerToken>>;
pub type WorkerClient =
    pb::worker_service_client::WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// The tests start processes and measure nothing: one at a time keeps two
/// cores from starving lease timings.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The folder of the workspace's binaries for the running profile: tests run
/// from target/<profile>/deps, benchmark binaries from target/<profile>.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn binary(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        p.display()
    );
    p
}

fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var("NT_TORCH_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/nt/torch-2.11.0",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let p = Path::new(&venv).join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&mut self) {
        send_signal(self.child.id(), "TERM");
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Freezes the process (SIGSTOP), as a stalled machine would.
    pub fn freeze(&mut self) {
        send_signal(self.child.id(), "STOP");
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn thaw(&mut self) {
        send_signal(self.child.id(), "CONT");
    }

    /// Waits up to `limit` for the process to exit; its status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    let file = std::fs::File::create(log).unwrap();
    let child = cmd
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    Proc {
        child,
        log: log.to_path_buf(),
    }
}

/// A plain HTTP GET on 127.0.0.1: the status code and the body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.get(9..12)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Some((code, body))
}

pub fn http_ok(port: u16, path: &str) -> bool {
    matches!(http_get(port, path), Some((200, _)))
}

/// A SeaweedFS `weed mini` with S3 on a free port and bucket `test`.
pub struct Seaweed {
    pub proc: Proc,
    pub s3_port: u16,
}

impl Seaweed {
    pub fn start(dir: &Path) -> Self {
        let data = dir.join("seaweed");
        std::fs::create_dir_all(&data).unwrap();
        let s3_port = free_port();
        let mut cmd = Command::new(venv_bin("weed"));
        cmd.env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "testsecret")
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-bucket=test",
                "-master.telemetry=false",
            ])
            .args([
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ]);
        for flag in [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ] {
            cmd.arg(format!("-{flag}={}", free_port()));
        }
        cmd.arg(format!("-s3.port={s3_port}"));
        let proc = spawn(&mut cmd, &dir.join("seaweed.log"));
        let start = Instant::now();
        while !http_ok(s3_port, "/healthz") {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "SeaweedFS did not become ready:\n{}",
                tail(&dir.join("seaweed.log"))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Seaweed { proc, s3_port }
    }
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Where the cluster keeps its objects.
pub enum StoreKind {
    /// A local folder.
    Local,
    /// SeaweedFS over S3.
    S3,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub seaweed: Option<Seaweed>,
    /// When set, the binaries reach the S3 server through this proxy.
    pub proxy: Option<std::sync::Arc<crate::proxy::StoreProxy>>,
    pub server: Option<Proc>,
    pub workers: HashMap<String, Proc>,
    pub port: u16,
    pub lease_ttl_ms: u64,
    pub heartbeat_ms: u64,
    /// The store lease's time to live: how long a restarted coordinator
    /// waits for a killed one's lease.
    pub store_lease_ttl_ms: u64,
    /// Serve /metrics on this port (none: off).
    pub metrics_port: Option<u16>,
    /// More flags for nt-server and nt-worker.
    pub server_args: Vec<String>,
    pub worker_args: Vec<String>,
    /// The token workers send (default [`WORKER_TOKEN`]).
    pub worker_token: String,
    /// The address workers dial (default `http://127.0.0.1:{port}`).
    pub coordinator_url: Option<String>,
}

impl Cluster {
    pub fn new(store: StoreKind) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let seaweed = match store {
            StoreKind::Local => None,
            StoreKind::S3 => Some(Seaweed::start(dir.path())),
        };
        Cluster {
            dir,
            seaweed,
            proxy: None,
            server: None,
            workers: HashMap::new(),
            port: free_port(),
            lease_ttl_ms: 2500,
            heartbeat_ms: 300,
            store_lease_ttl_ms: 1500,
            metrics_port: None,
            server_args: Vec::new(),
            worker_args: vec![
                "--device=cpu".into(),
                "--threads=1".into(),
                "--shutdown-grace-secs=2".into(),
            ],
            worker_token: WORKER_TOKEN.into(),
            coordinator_url: None,
        }
    }

    /// Flags and environment selecting the store, for both binaries.
    pub fn store_args(&self) -> (Vec<String>, Vec<(String, String)>) {
        match &self.seaweed {
            None => (
                vec![format!(
                    "--store=file://{}",
                    self.dir.path().join("store").display()
                )],
                vec![],
            ),
            Some(s) => (
                vec![
                    "--store=s3://test".into(),
                    format!(
                        "--s3-endpoint=http://127.0.0.1:{}",
                        self.proxy.as_ref().map_or(s.s3_port, |p| p.port)
                    ),
                    "--s3-allow-http".into(),
                ],
                vec![
                    ("AWS_ACCESS_KEY_ID".into(), "test".into()),
                    ("AWS_SECRET_ACCESS_KEY".into(), "testsecret".into()),
                ],
            ),
        }
    }

    /// Puts a [`crate::proxy::StoreProxy`] between the S3 server and the
    /// processes started from now on.
    pub fn proxy_store(&mut self) -> std::sync::Arc<crate::proxy::StoreProxy> {
        let s3_port = self.seaweed.as_ref().expect("an S3 cluster").s3_port;
        let proxy = std::sync::Arc::new(crate::proxy::StoreProxy::start(s3_port));
        self.proxy = Some(proxy.clone());
        proxy
    }

    pub fn start_server(&mut self) {
        let proc = self.spawn_server(self.port, self.metrics_port);
        self.server = Some(proc);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nt-server did not start:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts an nt-server on this cluster's store, listening on `port`,
    /// without waiting for it (a second coordinator, say).
    pub fn spawn_server(&self, port: u16, metrics_port: Option<u16>) -> Proc {
        let (args, env) = self.store_args();
        let n = std::fs::read_dir(self.dir.path()).map_or(0, |d| d.count());
        let mut cmd = Command::new(binary("nt-server"));
        cmd.args(&args)
            .envs(env)
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!(
                "--metrics-listen={}",
                metrics_port
                    .map(|p| format!("127.0.0.1:{p}"))
                    .unwrap_or_default()
            ))
            .arg(format!("--client-token={CLIENT_TOKEN}"))
            .arg(format!("--worker-token={WORKER_TOKEN}"))
            .arg(format!("--lease-ttl-ms={}", self.lease_ttl_ms))
            .arg(format!("--heartbeat-interval-ms={}", self.heartbeat_ms))
            .arg(format!("--store-lease-ttl-ms={}", self.store_lease_ttl_ms))
            .args(&self.server_args)
            .env("RUST_LOG", "info");
        spawn(&mut cmd, &self.dir.path().join(format!("server-{n}.log")))
    }

    pub fn kill_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
    }

    pub fn start_worker(&mut self, name: &str) {
        let (args, env) = self.store_args();
        let mut cmd = Command::new(binary("nt-worker"));
        cmd.args(&args)
            .envs(env)
            .arg(format!(
                "--coordinator={}",
                self.coordinator_url
                    .clone()
                    .unwrap_or_else(|| format!("http://127.0.0.1:{}", self.port))
            ))
            .arg(format!("--worker-token={}", self.worker_token))
            .arg(format!("--name={name}"))
            .args(&self.worker_args)
            .env("RUST_LOG", "info");
        let proc = spawn(&mut cmd, &self.dir.path().join(format!("{name}.log")));
        self.workers.insert(name.to_string(), proc);
    }

    pub fn kill_worker(&mut self, name: &str) {
        if let Some(mut w) = self.workers.remove(name) {
            w.kill();
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_else(|_| Vec::new());
        names.sort();
        for p in names
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            out += &format!("\n===== {} =====\n{}\n", p.display(), tail(&p));
        }
        out
    }

    pub async fn client(&self) -> RunClient {
        self.client_with_token(CLIENT_TOKEN).await
    }

    pub async fn client_with_token(&self, token: &str) -> RunClient {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect_lazy();
        pb::run_service_client::RunServiceClient::with_interceptor(
            channel,
            BearerToken::new(Some(token)).unwrap(),
        )
    }

    pub async fn worker_client(&self) -> WorkerClient {
        self.worker_client_with_token(WORKER_TOKEN).await
    }

    /// A worker-service client sending `token` (empty: no token at all).
    pub async fn worker_client_with_token(&self, token: &str) -> WorkerClient {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect_lazy();
        pb::worker_service_client::WorkerServiceClient::with_interceptor(
            channel,
            BearerToken::new(Some(token)).unwrap(),
        )
    }

    /// Polls a run until `done` holds, failing with every log after `timeout`.
    pub async fn wait_for(
        &self,
        run_id: &str,
        timeout: Duration,
        done: impl Fn(&pb::Run) -> bool,
    ) -> pb::Run {
        let start = Instant::now();
        let mut last = None;
        loop {
            if let Ok(r) = self
                .client()
                .await
                .get_run(pb::GetRunRequest {
                    run_id: run_id.into(),
                })
                .await
            {
                let run = r.into_inner();
                if done(&run) {
                    return run;
                }
                last = Some(run);
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out waiting on run {run_id}; last seen: {:#?}\n{}",
                    last.map(|r| (r.state, r.message, r.tasks)),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Every object key in the store.
    pub async fn objects(&self) -> Vec<String> {
        use futures_util::TryStreamExt;
        let storage = self.storage();
        let mut keys: Vec<String> = storage
            .store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    pub fn storage(&self) -> nt_common::Storage {
        let (args, env) = self.store_args();
        for (k, v) in env {
            // SAFETY: the tests run one at a time (see `serial`).
            unsafe { std::env::set_var(k, v) };
        }
        let parsed =
            <StoreOnly as clap::Parser>::parse_from(std::iter::once("x".to_string()).chain(args));
        nt_common::Storage::open(&parsed.storage).unwrap()
    }
}

#[derive(clap::Parser)]
struct StoreOnly {
    #[command(flatten)]
    storage: nt_common::StorageArgs,
}

pub fn state(run: &pb::Run) -> pb::RunState {
    pb::RunState::try_from(run.state).unwrap()
}

pub fn is_final(run: &pb::Run) -> bool {
    matches!(
        state(run),
        pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
    )
}

/// A small real run on Fashion-MNIST: an MLP trained for `epochs` epochs on
/// a subset, fused with NT and averaging, fine-tuned for 2 epochs.
pub fn small_spec(epochs: u32, train_subset: u64) -> pb::RunSpec {
    let yaml = format!(
        r#"
name: e2e
data: {{dataset: fashion-mnist, train_subset: {train_subset}, test_subset: 1000}}
architecture: "mlp:hidden=64,depth=2"
members:
  count: 2
  training: {{epochs: {epochs}, batch_size: 128, lr: 0.05}}
fusion: [nt, average]
fine_tuning:
  training: {{epochs: 2, batch_size: 128}}
max_attempts: 3
"#
    );
    nt_spec::RunSpecFile::from_yaml(&yaml)
        .unwrap()
        .to_proto(Path::new("."))
        .unwrap()
}

/// What a raw test worker registers with: one slot and `gpus` GPUs.
pub fn register_request(name: &str, gpus: u32) -> pb::RegisterWorkerRequest {
    pb::RegisterWorkerRequest {
        name: name.into(),
        capabilities: Some(pb::WorkerCapabilities {
            slots: 1,
            gpus,
            ..Default::default()
        }),
        version: "test".into(),
        ..Default::default()
    }
}

/// Registers a raw test worker (the test plays the worker); its id.
pub async fn register_worker(wc: &mut WorkerClient, name: &str, gpus: u32) -> String {
    wc.register_worker(register_request(name, gpus))
        .await
        .unwrap_or_else(|s| panic!("registering {name}: {s:?}"))
        .into_inner()
        .worker_id
}

/// Leases a task for `worker_id`, long-polling up to `wait_ms`.
pub async fn lease_task(wc: &mut WorkerClient, worker_id: &str, wait_ms: u32) -> Option<pb::Task> {
    wc.lease_task(pb::LeaseTaskRequest {
        worker_id: worker_id.into(),
        wait_ms,
    })
    .await
    .unwrap_or_else(|s| panic!("leasing for {worker_id}: {s:?}"))
    .into_inner()
    .task
}

pub async fn submit(
    cluster: &Cluster,
    spec: pb::RunSpec,
    request_id: &str,
) -> pb::SubmitRunResponse {
    cluster
        .client()
        .await
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec),
            request_id: request_id.into(),
            spec_file: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("submit failed: {s:?}\n{}", cluster.logs()))
        .into_inner()
}

/// Cancels `run_id` and checks that the run and every task of it end
/// cancelled, then that the workers stopped their tasks and take new work:
/// a short run completes. The cluster's logs afterwards, for the caller's
/// own checks.
pub async fn cancel_then_run_another(cluster: &Cluster, run_id: &str) -> String {
    let cancelled = cluster
        .client()
        .await
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.into(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&cancelled), pb::RunState::Cancelled);
    assert!(cancelled
        .tasks
        .iter()
        .all(|t| t.state() == pb::TaskState::Cancelled));
    let short = submit(cluster, small_spec(1, 2000), "")
        .await
        .run
        .unwrap()
        .run_id;
    let done = cluster
        .wait_for(&short, Duration::from_secs(180), is_final)
        .await;
    assert_eq!(state(&done), pb::RunState::Succeeded, "{}", cluster.logs());
    cluster.logs()
}
