//! Run overhead: the wall time of a whole run against the compute of its
//! tasks and its fusion, with real processes (nt-server and one nt-worker
//! with one slot, so tasks run one after another) on the embedded default
//! (local store, Fashion-MNIST). Overhead = wall - (task compute + fusion):
//! scheduling, leasing, progress, persistence and waiting between phases.
//!
//! `cargo run --release -p nt-bench --bin run-overhead -- [--epochs 10]`

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use nt_proto::v1 as pb;
use nt_testkit::cluster::{is_final, state, submit, Cluster, StoreKind};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Epochs of each member and of each fine-tuning.
    #[arg(long, default_value_t = 5)]
    epochs: u32,
    /// local or s3.
    #[arg(long, default_value = "local")]
    store: String,
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
    cluster.heartbeat_ms = 5_000;
    cluster.worker_args = vec!["--device=cpu".into(), "--slots=1".into()];
    cluster.start_server();
    cluster.start_worker("w1");
    let yaml = format!(
        r#"
name: overhead
data: {{dataset: fashion-mnist}}
architecture: mlp
members:
  count: 2
  training: {{epochs: {e}}}
fusion: [nt, average]
fine_tuning:
  training: {{epochs: {e}}}
"#,
        e = args.epochs
    );
    let spec = nt_spec::RunSpecFile::from_yaml(&yaml)?.to_proto(std::path::Path::new("."))?;
    let run_id = submit(&cluster, spec, "")
        .await
        .run
        .unwrap_or_default()
        .run_id;
    let run = cluster
        .wait_for(&run_id, Duration::from_secs(3600), is_final)
        .await;
    anyhow::ensure!(
        state(&run) == pb::RunState::Succeeded,
        "run ended {:?}: {}",
        state(&run),
        run.message
    );
    let report = run.report.unwrap_or_default();
    let t = report.timings.unwrap_or_default();
    let overhead = t.wall_seconds - t.task_seconds - t.fusion_seconds;
    println!(
        "run of {} tasks ({} member epochs, {} fine-tuning epochs, store {}):",
        run.tasks.len(),
        2 * args.epochs,
        2 * args.epochs,
        args.store
    );
    println!(
        "wall {:.1} s, task compute {:.1} s, fusion {:.2} s, overhead {:.2} s = {:.2} % of the wall time",
        t.wall_seconds,
        t.task_seconds,
        t.fusion_seconds,
        overhead,
        100.0 * overhead / t.wall_seconds
    );
    if let Some(nt) = report
        .fused
        .first()
        .and_then(|f| f.after_fine_tuning.clone())
    {
        let best = report
            .members
            .iter()
            .map(|m| m.accuracy)
            .fold(0.0, f64::max);
        println!(
            "(NT after fine-tuning {:.2} %, best member {:.2} %)",
            100.0 * nt.accuracy,
            100.0 * best
        );
    }
    Ok(())
}
