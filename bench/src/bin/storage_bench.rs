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
//! The second table is the path of a client that holds a token and no store
//! credentials: a checkpoint file uploaded through `nt-server`
//! (`UploadCheckpoint`, as `ntctl upload` and `nt_client::transfer` do it:
//! hashed, streamed in 1 MiB messages, checked and stored by the
//! coordinator) and downloaded back into a file (`DownloadCheckpoint` of a
//! run's member, written to a temporary file, its size and SHA-256 checked,
//! renamed). The baseline moves the same bytes directly: the file read and
//! put (by one PUT, and by the multipart upload the service uses; the
//! faster counts), the object got and written to a temporary file renamed.
//! Every service upload sends bytes the store has not seen (the store keeps
//! uploads by content).
//!
//! `cargo build --release -p nt-server -p nt-bench && target/release/storage-bench [--repeat 5]`

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use fusion::arch::{preset, Architecture};
use fusion::checkpoint;
use nt_client::transfer::{download, upload_file, UploadOptions};
use nt_proto::v1 as pb;
use nt_runtime::model::Network;
use nt_testkit::cluster::{state, Cluster, StoreKind, CLIENT_TOKEN};
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};

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

/// The two sides of one comparison: medians in MB/s and their ratio.
fn row(name: &str, mb: f64, times: [Vec<Duration>; 4]) -> String {
    let [du, su, dd, sd] = times.map(|t| mb / median(t).as_secs_f64());
    format!(
        "{name:<26} {mb:>8.1} {du:>12.0} {su:>12.0} {:>6.0}% {dd:>12.0} {sd:>12.0} {:>6.0}%",
        100.0 * su / du,
        100.0 * sd / dd
    )
}

/// Which side goes first in round `i`.
fn order(i: usize) -> [usize; 2] {
    match i % 2 {
        0 => [0, 1],
        _ => [1, 0],
    }
}

/// Upload and download through `nt-server` against the direct transfer of
/// the same bytes, file to store and store to file.
async fn through_the_service(
    cluster: &Cluster,
    repeat: usize,
    models: &[(String, String, bytes::Bytes)],
) -> Result<()> {
    let storage = cluster.storage();
    let mut client = nt_client::connect(&nt_client::ConnectArgs {
        endpoint: format!("http://127.0.0.1:{}", cluster.port),
        token: CLIENT_TOKEN.into(),
        ..nt_client::ConnectArgs::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    println!(
        "\nthrough nt-server (UploadCheckpoint / DownloadCheckpoint) against direct S3 transfers of the same bytes,\n\
         file to store and store to file, median of {repeat} runs"
    );
    println!(
        "{:<26} {:>8} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}",
        "model", "MB", "direct up", "service up", "ratio", "direct dn", "service dn", "ratio"
    );
    for (m, (preset, label, raw)) in models.iter().enumerate() {
        let mb = raw.len() as f64 / 1e6;
        let options = UploadOptions {
            architecture: Some(pb::Architecture {
                kind: Some(pb::architecture::Kind::Preset(preset.clone())),
            }),
            ..UploadOptions::default()
        };
        let (mut du, mut dm, mut su) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dd, mut sd) = (Vec::new(), Vec::new());
        let mut keys = Vec::new();
        for i in 0..repeat.max(2) {
            // New bytes each round (the last value changes), as a new model would be.
            let mut bytes = raw.to_vec();
            let n = bytes.len();
            bytes[n - 4..].copy_from_slice(&((m * 1000 + i) as f32).to_le_bytes());
            let file = dir.path().join(format!("up-{m}-{i}.safetensors"));
            std::fs::write(&file, &bytes)?;
            let direct_key = object_store::path::Path::from(format!("bench/direct-{m}-{i}"));
            let multipart_key = object_store::path::Path::from(format!("bench/multi-{m}-{i}"));
            // Direct: one PUT, and the multipart upload the service itself
            // uses (8 MiB parts, 4 at once); the faster is the baseline.
            let sides: [usize; 3] = if i % 2 == 1 { [2, 1, 0] } else { [0, 1, 2] };
            for side in sides {
                let t = Instant::now();
                match side {
                    0 => {
                        let data = tokio::fs::read(&file).await?;
                        storage
                            .store
                            .put(&direct_key, PutPayload::from(data))
                            .await?;
                        du.push(t.elapsed());
                    }
                    1 => {
                        let data = bytes::Bytes::from(tokio::fs::read(&file).await?);
                        let upload = storage.store.put_multipart(&multipart_key).await?;
                        let mut w = WriteMultipart::new_with_chunk_size(upload, 8 << 20);
                        for start in (0..data.len()).step_by(8 << 20) {
                            w.wait_for_capacity(4).await?;
                            w.put(data.slice(start..data.len().min(start + (8 << 20))));
                        }
                        w.finish().await?;
                        dm.push(t.elapsed());
                    }
                    _ => {
                        let stored = upload_file(&mut client, &file, &options, |_, _| {}).await?;
                        su.push(t.elapsed());
                        anyhow::ensure!(stored.created, "upload {i} was not new");
                        keys.push(stored.key);
                    }
                }
            }
        }
        let (single, multi) = (median(du.clone()), median(dm.clone()));
        println!(
            "  ({label}: direct up by one PUT {:.0} MB/s, by multipart upload {:.0} MB/s)",
            mb / single.as_secs_f64(),
            mb / multi.as_secs_f64()
        );
        let du = if single <= multi { du } else { dm };
        // A run naming two uploads serves them as its members (no worker:
        // it fuses, then waits; the fusion is over before timing starts).
        let yaml = format!(
            "name: bench\narchitecture: \"{preset}\"\n\
             data: {{dataset: synthetic, synthetic: {{shape: [3, 32, 32], train: 64, test: 32}}}}\n\
             members: {{checkpoints: [{}, {}]}}\nfusion: [average]\n",
            keys[0], keys[1]
        );
        let spec = nt_spec::RunSpecFile::from_yaml(&yaml)?.to_proto(std::path::Path::new("."))?;
        let run_id = client
            .submit_run(pb::SubmitRunRequest {
                spec: Some(spec),
                request_id: String::new(),
                spec_file: String::new(),
            })
            .await?
            .into_inner()
            .run
            .unwrap_or_default()
            .run_id;
        cluster
            .wait_for(&run_id, Duration::from_secs(300), |r| {
                state(r) == pb::RunState::FineTuning
            })
            .await;
        let member = object_store::path::Path::from(keys[0].as_str());
        for i in 0..repeat {
            for side in order(i) {
                let t = Instant::now();
                if side == 0 {
                    // Saved as the service's client saves: a temporary file renamed.
                    let got = storage.store.get(&member).await?.bytes().await?;
                    let mut temp = tempfile::NamedTempFile::new_in(dir.path())?;
                    std::io::Write::write_all(&mut temp, &got)?;
                    temp.persist(dir.path().join("direct.safetensors"))?;
                    dd.push(t.elapsed());
                } else {
                    let got =
                        download(&mut client, &run_id, "member/0", dir.path(), |_, _| {}).await?;
                    sd.push(t.elapsed());
                    anyhow::ensure!(got.info.size as usize == raw.len());
                }
            }
        }
        println!("{}", row(label, mb, [du, su, dd, sd]));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut cluster = Cluster::new(StoreKind::S3);
    let storage = cluster.storage();
    println!(
        "checkpoint transfers against SeaweedFS (S3 on 127.0.0.1), median of {} runs",
        args.repeat
    );
    println!(
        "{:<26} {:>8} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}",
        "model", "MB", "raw up MB/s", "nt up MB/s", "ratio", "raw dn MB/s", "nt dn MB/s", "ratio"
    );
    let mut models = Vec::new();
    for name in ["resnet18", "mlp:input=3072,hidden=4096,depth=2"] {
        let arch = Architecture::new(preset(name)?)?;
        let state = Network::init(&arch, tch::Device::Cpu, 1)?.to_state()?;
        let raw = bytes::Bytes::from(checkpoint::to_bytes(&state)?);
        let label = arch.name().to_string()
            + if name.starts_with("mlp") {
                " 3072-4096-4096-10"
            } else {
                ""
            };
        models.push((name.to_string(), label, raw.clone()));
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
            models
                .last()
                .map_or("", |m: &(String, String, bytes::Bytes)| m.1.as_str()),
            mb,
            ru,
            nu,
            100.0 * nu / ru,
            rd,
            nd,
            100.0 * nd / rd
        );
    }
    cluster.start_server();
    through_the_service(&cluster, args.repeat, &models).await
}
