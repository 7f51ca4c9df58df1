//! Checkpoint transfer throughput: nt's checkpoint path against the raw
//! object store, in the same run, against SeaweedFS on 127.0.0.1.
//!
//! Workers and the coordinator move checkpoints straight between themselves
//! and the object store (the gRPC API carries only keys). nt's path is what
//! they do: serialize the state dict to safetensors and put it (upload);
//! get it, parse it and validate every tensor against the architecture
//! (download). The baseline puts and gets the same bytes with `object_store`
//! directly. Throughput is checkpoint megabytes per second, the median of
//! runs that alternate which side goes first.
//!
//! `cargo run --release -p nt-bench --bin storage-bench -- [--repeat 5]`

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use fusion::arch::{preset, Architecture};
use fusion::checkpoint;
use nt_runtime::model::Network;
use nt_testkit::cluster::{Cluster, StoreKind};
use object_store::{ObjectStoreExt, PutPayload};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Transfers per side and direction (alternating which side goes first).
    #[arg(long, default_value_t = 8)]
    repeat: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = Cluster::new(StoreKind::S3);
    let storage = cluster.storage();
    println!(
        "checkpoint transfers against SeaweedFS (S3 on 127.0.0.1), median of {} runs",
        args.repeat
    );
    println!(
        "{:<26} {:>8} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}",
        "model", "MB", "raw up MB/s", "nt up MB/s", "ratio", "raw dn MB/s", "nt dn MB/s", "ratio"
    );
    for name in ["resnet18", "mlp:input=3072,hidden=4096,depth=2"] {
        let arch = Architecture::new(preset(name)?)?;
        let state = Network::init(&arch, tch::Device::Cpu, 1)?.to_state()?;
        let raw = bytes::Bytes::from(checkpoint::to_bytes(&state)?);
        let mb = raw.len() as f64 / 1e6;
        let (mut ru, mut nu, mut rd, mut nd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..args.repeat {
            let raw_key = object_store::path::Path::from(format!("bench/raw-{i}.safetensors"));
            let nt_key = format!("bench/nt-{i}.safetensors");
            // Alternate which side goes first: the store is slower right after a big transfer.
            for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
                let t = Instant::now();
                if side == 0 {
                    storage
                        .store
                        .put(&raw_key, PutPayload::from(raw.clone()))
                        .await?;
                    ru.push(t.elapsed());
                } else {
                    storage
                        .put(&nt_key, checkpoint::to_bytes(&state)?.into())
                        .await?;
                    nu.push(t.elapsed());
                }
            }
            for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
                let t = Instant::now();
                if side == 0 {
                    let got = storage.store.get(&raw_key).await?.bytes().await?;
                    rd.push(t.elapsed());
                    anyhow::ensure!(got.len() == raw.len());
                } else {
                    let (bytes, _) = storage
                        .get(&nt_key)
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("missing"))?;
                    let loaded = checkpoint::load_bytes(&nt_key, Vec::from(bytes))?;
                    checkpoint::validate(&loaded, &arch, &nt_key)?;
                    nd.push(t.elapsed());
                }
            }
        }
        let rate = |d: Duration| mb / d.as_secs_f64();
        let (ru, nu, rd, nd) = (
            rate(median(ru)),
            rate(median(nu)),
            rate(median(rd)),
            rate(median(nd)),
        );
        println!(
            "{:<26} {:>8.1} {:>12.0} {:>12.0} {:>6.0}% {:>12.0} {:>12.0} {:>6.0}%",
            arch.name().to_string()
                + if name.starts_with("mlp") {
                    " 3072-4096-4096-10"
                } else {
                    ""
                },
            mb,
            ru,
            nu,
            100.0 * nu / ru,
            rd,
            nd,
            100.0 * nd / rd
        );
    }
    Ok(())
}
