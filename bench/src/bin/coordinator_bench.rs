//! The coordinator under load, over real gRPC against the `nt-server` binary:
//!
//! 1. submit-to-first-lease latency: one worker long-polls LeaseTask while
//!    runs are submitted one at a time (p50, p99);
//! 2. 1,000 queued tasks and 64 simulated workers, each holding a lease and
//!    heartbeating every second, while a client lists runs: RPC latencies
//!    (p50, p99), the coordinator's CPU and memory.
//!
//! `cargo run --release -p nt-bench --bin coordinator-bench -- [--store s3]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use nt_bench::{cpu_seconds, memory_mib, ms, percentile};
use nt_proto::v1 as pb;
use nt_testkit::cluster::{small_spec, Cluster, StoreKind};
use tokio::sync::Mutex;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// local (the embedded default) or s3 (SeaweedFS on 127.0.0.1).
    #[arg(long, default_value = "local")]
    store: String,
    /// Runs submitted for the latency measurement.
    #[arg(long, default_value_t = 200)]
    latency_runs: usize,
    /// Tasks queued for the load measurement.
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// Simulated workers.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Seconds of heartbeating.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

fn register(name: &str) -> pb::RegisterWorkerRequest {
    pb::RegisterWorkerRequest {
        name: name.into(),
        capabilities: Some(pb::WorkerCapabilities {
            slots: 1,
            ..Default::default()
        }),
        version: "bench".into(),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut cluster = Cluster::new(if args.store == "s3" {
        StoreKind::S3
    } else {
        StoreKind::Local
    });
    cluster.lease_ttl_ms = 30_000;
    cluster.heartbeat_ms = 1_000;
    cluster.start_server();
    let pid = cluster.server.as_ref().map(|p| p.child.id()).unwrap_or(0);
    let mut client = cluster.client().await;
    let mut wc = cluster.worker_client().await;
    println!(
        "coordinator benchmark: store {}, nt-server pid {pid}",
        args.store
    );

    // 1. Submit-to-first-lease latency.
    let worker = wc
        .register_worker(register("latency"))
        .await?
        .into_inner()
        .worker_id;
    let mut latencies = Vec::with_capacity(args.latency_runs);
    for _ in 0..args.latency_runs {
        let mut lease_client = wc.clone();
        let w = worker.clone();
        let waiting = tokio::spawn(async move {
            let r = lease_client
                .lease_task(pb::LeaseTaskRequest {
                    worker_id: w,
                    wait_ms: 20_000,
                })
                .await;
            (Instant::now(), r)
        });
        // Let the long poll reach the coordinator and park.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        let run = client
            .submit_run(pb::SubmitRunRequest {
                spec: Some(small_spec(1, 1000)),
                request_id: String::new(),
                spec_file: String::new(),
            })
            .await?
            .into_inner()
            .run
            .unwrap_or_default();
        let (leased_at, task) = waiting.await?;
        let task = task?.into_inner().task;
        anyhow::ensure!(
            task.is_some_and(|t| t.run_id == run.run_id),
            "the lease returned another run's task"
        );
        latencies.push(leased_at - start);
        client
            .cancel_run(pb::CancelRunRequest {
                run_id: run.run_id,
                reason: "bench".into(),
            })
            .await?;
    }
    println!(
        "submit-to-first-lease over {} runs: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        ms(percentile(&mut latencies, 50.0)),
        ms(percentile(&mut latencies, 99.0)),
        ms(percentile(&mut latencies, 100.0))
    );

    // 2. Load: queue the tasks (runs of up to 64 members).
    let mut queued = 0;
    while queued < args.tasks {
        let count = (args.tasks - queued).min(64) as u32;
        let mut spec = small_spec(1, 1000);
        if let Some(m) = spec.members.as_mut() {
            m.count = count.max(2);
        }
        client
            .submit_run(pb::SubmitRunRequest {
                spec: Some(spec),
                request_id: String::new(),
                spec_file: String::new(),
            })
            .await?;
        queued += count.max(2) as usize;
    }
    // Each simulated worker registers and leases one task.
    let mut leases = Vec::new();
    for i in 0..args.workers {
        let id = wc
            .register_worker(register(&format!("sim{i}")))
            .await?
            .into_inner()
            .worker_id;
        let task = wc
            .lease_task(pb::LeaseTaskRequest {
                worker_id: id.clone(),
                wait_ms: 1000,
            })
            .await?
            .into_inner()
            .task
            .ok_or_else(|| anyhow::anyhow!("no task to lease"))?;
        leases.push((id, task));
    }
    println!(
        "load: {queued} tasks queued, {} simulated workers holding a lease each, heartbeating every second for {} s",
        args.workers, args.seconds
    );
    let heartbeat_latencies = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let cpu_start = cpu_seconds(pid).unwrap_or(0.0);
    let wall_start = Instant::now();
    let mut handles = Vec::new();
    for (i, (id, task)) in leases.into_iter().enumerate() {
        let mut c = wc.clone();
        let lat = heartbeat_latencies.clone();
        handles.push(tokio::spawn(async move {
            // Spread the workers over the second, as real ones drift apart.
            tokio::time::sleep(Duration::from_millis((i as u64 * 1000) / 64)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while Instant::now() < deadline {
                tick.tick().await;
                let t = Instant::now();
                let r = c
                    .heartbeat(pb::HeartbeatRequest {
                        worker_id: id.clone(),
                        tasks: vec![pb::TaskLease {
                            task_id: task.task_id.clone(),
                            attempt: task.attempt,
                        }],
                    })
                    .await;
                let elapsed = t.elapsed();
                if let Ok(r) = r {
                    if r.into_inner().tasks.first().map(|i| i.directive)
                        == Some(pb::TaskDirective::Continue as i32)
                    {
                        lat.lock().await.push(elapsed);
                    }
                }
            }
        }));
    }
    // A client listing and reading runs meanwhile.
    let mut list_latencies = Vec::new();
    while Instant::now() < deadline {
        let t = Instant::now();
        let page = client
            .list_runs(pb::ListRunsRequest {
                page_size: 50,
                ..Default::default()
            })
            .await?
            .into_inner();
        list_latencies.push(t.elapsed());
        if let Some(r) = page.runs.first() {
            client
                .get_run(pb::GetRunRequest {
                    run_id: r.run_id.clone(),
                })
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for h in handles {
        h.await?;
    }
    let wall = wall_start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu_start;
    let mut hb = heartbeat_latencies.lock().await.clone();
    println!(
        "heartbeats: {} ok, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        hb.len(),
        ms(percentile(&mut hb, 50.0)),
        ms(percentile(&mut hb, 99.0)),
        ms(percentile(&mut hb, 100.0))
    );
    println!(
        "ListRuns (50 per page): {} calls, p50 {:.2} ms, p99 {:.2} ms",
        list_latencies.len(),
        ms(percentile(&mut list_latencies, 50.0)),
        ms(percentile(&mut list_latencies, 99.0))
    );
    println!(
        "coordinator: {:.1} % of one core over {wall:.0} s, RSS {:.0} MiB (peak {:.0} MiB)",
        100.0 * cpu / wall,
        memory_mib(pid, "VmRSS").unwrap_or(0.0),
        memory_mib(pid, "VmHWM").unwrap_or(0.0)
    );
    Ok(())
}
