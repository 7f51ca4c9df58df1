//! Existing members in half precision and sharded, against the real stack on
//! 127.0.0.1 (a SeaweedFS S3 server, `nt-server`, one `nt-worker`): a
//! fuse-existing run of bf16 members, one of them sharded, writes a bf16
//! fused model equal to fusing the f32-widened members offline and
//! rounding; members of mixed dtypes and a sharded member missing a shard
//! are refused at submission, by name, and change nothing.

// Each test holds the serial lock across its awaits on purpose: tests run
// on separate runtimes and must not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use std::path::Path;
use std::time::Duration;

use fusion::arch::{preset, Architecture};
use fusion::checkpoint::{self, Precision, SaveOptions};
use fusion::state::StateDict;
use nt_common::{layout, Storage};
use nt_proto::tonic::Code;
use nt_proto::v1 as pb;
use nt_testkit::cluster::{is_final, serial, state, submit, Cluster, StoreKind};

const ARCH: &str = "mlp:hidden=16,depth=1";

fn arch() -> Architecture {
    Architecture::new(preset(ARCH).unwrap()).unwrap()
}

/// A freshly initialised member, as PyTorch would save it.
fn member(seed: u64) -> StateDict {
    let net = nt_runtime::model::Network::init(&arch(), tch::Device::Cpu, seed).unwrap();
    net.to_state().unwrap()
}

/// Uploads `state` as a sharded checkpoint under `folder/` (fc1.weight and
/// fc2.weight in shards of their own: 4 KiB at most each), leaving out the
/// shards `skip` names; the index key and every shard's key.
async fn upload_sharded(
    storage: &Storage,
    folder: &str,
    state: &StateDict,
    precision: Precision,
    skip: &[usize],
) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let options = SaveOptions {
        precision,
        max_shard_bytes: 4096,
    };
    let saved = checkpoint::save_with(dir.path(), state, &options).unwrap();
    assert_eq!(saved.shards.len(), 2, "{saved:?}");
    let key_of = |p: &Path| format!("{folder}/{}", p.file_name().unwrap().to_string_lossy());
    let shards: Vec<String> = saved.shards.iter().map(|p| key_of(p)).collect();
    for (i, path) in saved.shards.iter().enumerate() {
        if !skip.contains(&i) {
            let bytes = std::fs::read(path).unwrap();
            storage.put(&shards[i], bytes.into()).await.unwrap();
        }
    }
    let index = key_of(&saved.path);
    let bytes = std::fs::read(&saved.path).unwrap();
    storage.put(&index, bytes.into()).await.unwrap();
    (index, shards)
}

async fn upload(storage: &Storage, key: &str, state: &StateDict, precision: Precision) -> Vec<u8> {
    let bytes = checkpoint::to_bytes_as(state, precision).unwrap();
    storage.put(key, bytes.clone().into()).await.unwrap();
    bytes
}

async fn read(storage: &Storage, key: &str) -> checkpoint::Loaded {
    let (bytes, _) = storage.get(key).await.unwrap().expect(key);
    checkpoint::read_bytes(key, bytes.to_vec()).unwrap()
}

/// A fuse-existing run of `keys` with NT on a small synthetic set, fine-tuned
/// for one epoch.
fn spec(keys: &[&str]) -> pb::RunSpec {
    let yaml = format!(
        r#"
name: half-precision
data: {{dataset: synthetic, synthetic: {{train: 256, test: 128}}}}
architecture: "{ARCH}"
members: {{checkpoints: {keys:?}}}
fusion: [nt]
fine_tuning: {{training: {{epochs: 1, batch_size: 64}}}}
"#
    );
    nt_spec::RunSpecFile::from_yaml(&yaml)
        .unwrap()
        .to_proto(Path::new("."))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_members_one_of_them_sharded_fuse_into_the_offline_bf16_model() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    c.start_worker("w1");
    let storage = c.storage();
    let m0 = upload(
        &storage,
        "uploads/m0.safetensors",
        &member(1),
        Precision::BF16,
    )
    .await;
    let (index, _) = upload_sharded(&storage, "uploads/m1", &member(2), Precision::BF16, &[]).await;

    let created = submit(&c, spec(&["uploads/m0.safetensors", &index]), "").await;
    let run_id = created.run.unwrap().run_id;
    let run = c
        .wait_for(&run_id, Duration::from_secs(300), is_final)
        .await;
    assert_eq!(
        state(&run),
        pb::RunState::Succeeded,
        "{}: {}",
        run.message,
        c.logs()
    );

    // Offline: the members widened to f32 exactly, fused, rounded to bf16
    // (the sharded member holds the values of its one-file form).
    let m1 = checkpoint::to_bytes_as(&member(2), Precision::BF16).unwrap();
    let widened: Vec<StateDict> = [m0, m1]
        .into_iter()
        .map(|bytes| {
            let loaded = checkpoint::read_bytes("member", bytes).unwrap();
            assert_eq!(loaded.precision, Precision::BF16);
            loaded.state
        })
        .collect();
    let refs: Vec<&StateDict> = widened.iter().collect();
    let offline = nt_runtime::fuse(
        fusion::Method::Nt,
        &arch(),
        &refs,
        &nt_runtime::FuseOptions::default(),
    )
    .unwrap();
    let rounded = checkpoint::to_bytes_as(&offline.state, Precision::BF16).unwrap();
    let expected = checkpoint::read_bytes("offline", rounded).unwrap().state;

    let fused = read(&storage, &layout::fused(&run_id, "nt")).await;
    assert_eq!(
        fused.precision,
        Precision::BF16,
        "written in the members' dtype"
    );
    assert_eq!(fused.state.tensors.len(), expected.tensors.len());
    for (name, t) in &expected.tensors {
        assert_eq!(
            fused.state.get(name).unwrap().as_f32(),
            t.as_f32(),
            "{name}"
        );
    }
    assert_eq!(
        fused.state.lineage().unwrap().members,
        ["uploads/m0.safetensors", index.as_str()]
    );
    // Fine-tuned models are f32, as `ntctl train` writes them.
    let tuned = read(&storage, &layout::fine_tuned(&run_id, "nt")).await;
    assert_eq!(tuned.precision, Precision::F32);

    // The worker evaluated both members, the sharded one included.
    let report = run.report.unwrap();
    assert_eq!(report.members.len(), 2);
    for m in &report.members {
        assert_eq!(m.parameters, 784 * 16 + 16 * 10, "{m:?}");
    }
    assert!(report.fused[0].after_fine_tuning.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_dtypes_and_a_missing_shard_are_refused_at_submission_by_name() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::S3);
    c.start_server();
    let storage = c.storage();
    upload(
        &storage,
        "uploads/a.safetensors",
        &member(1),
        Precision::BF16,
    )
    .await;
    upload(
        &storage,
        "uploads/b.safetensors",
        &member(2),
        Precision::F16,
    )
    .await;
    let (index, shards) =
        upload_sharded(&storage, "uploads/c", &member(3), Precision::BF16, &[1]).await;
    let before = c.objects().await;
    let mut client = c.client().await;
    let request = |keys: &[&str]| pb::SubmitRunRequest {
        spec: Some(spec(keys)),
        request_id: String::new(),
        spec_file: String::new(),
    };

    let e = client
        .submit_run(request(&["uploads/a.safetensors", "uploads/b.safetensors"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(
            "members.checkpoints: members disagree on dtype: \
             uploads/a.safetensors is bf16, uploads/b.safetensors is f16"
        ),
        "{e:?}"
    );

    let e = client
        .submit_run(request(&["uploads/a.safetensors", &index]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let missing = shards[1].rsplit('/').next().unwrap();
    assert!(
        e.message().contains("members.checkpoints[1]")
            && e.message().contains(&format!("shard `{missing}`"))
            && e.message().contains(&shards[1])
            && e.message().contains("does not exist"),
        "{e:?}"
    );

    assert_eq!(c.objects().await, before, "a refused run changed the store");
    let listed = client
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.runs.is_empty());
}
