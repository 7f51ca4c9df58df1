//! Existing members in bf16, f16 and sharded: what submission refuses from
//! the headers alone, naming the member and shard, and what the fusion step
//! writes (the members' dtype, or the spec's).

use std::sync::Arc;

use bytes::Bytes;
use fusion::arch::{preset, Architecture};
use fusion::checkpoint::{self, Precision, SaveOptions};
use fusion::state::{HostTensor, StateDict};
use nt_common::{layout, Storage};
use nt_proto::tonic::Code;
use nt_spec::Plan;

use super::spec;
use crate::coordinator::checkpoints::check_members;
use crate::coordinator::fusion_step::fuse_members;
use crate::error::CoordinatorError;

const ARCH: &str = "mlp:hidden=8,depth=1";

fn arch() -> Architecture {
    Architecture::new(preset(ARCH).unwrap()).unwrap()
}

/// A member with seeded values in [-0.5, 0.5) that are not bf16 or f16
/// values, so rounding shows.
fn member(seed: u64) -> StateDict {
    let arch = arch();
    let mut state = StateDict::default();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for p in arch.params() {
        let n: usize = p.shape.iter().product();
        let values = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        state.insert(p.name, HostTensor::f32(p.shape, values));
    }
    state.set_arch(arch.spec());
    state
}

fn memory() -> Storage {
    Storage {
        store: Arc::new(object_store::memory::InMemory::new()),
        url: "memory://".into(),
        bucket: None,
        prefix: String::new(),
        conditional_updates: true,
    }
}

async fn put(storage: &Storage, key: &str, bytes: Vec<u8>) {
    storage.put(key, Bytes::from(bytes)).await.unwrap();
}

/// Stores `state` sharded (one shard per tensor: fc1.weight takes more than
/// the 1 KiB limit) under `folder/`; its index key and shard keys.
async fn put_sharded(
    storage: &Storage,
    folder: &str,
    state: &StateDict,
    precision: Precision,
) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let options = SaveOptions {
        precision,
        max_shard_bytes: 1024,
    };
    let saved = checkpoint::save_with(dir.path(), state, &options).unwrap();
    assert!(saved.shards.len() >= 2, "{saved:?}");
    let mut shards = Vec::new();
    for path in saved.shards.iter().chain([&saved.path]) {
        let name = path.file_name().unwrap().to_string_lossy();
        let key = format!("{folder}/{name}");
        put(storage, &key, std::fs::read(path).unwrap()).await;
        shards.push(key);
    }
    let index = shards.pop().unwrap();
    assert!(index.ends_with("/model.safetensors.index.json"), "{index}");
    (index, shards)
}

async fn check(storage: &Storage, keys: &[&str]) -> Result<Precision, CoordinatorError> {
    let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    check_members(storage, &keys, &arch()).await
}

fn refused(result: Result<Precision, CoordinatorError>) -> (Code, String) {
    let e = result.unwrap_err();
    (e.code(), e.to_string())
}

#[tokio::test]
async fn half_precision_and_sharded_members_pass_with_their_dtype() {
    let s = memory();
    for (i, precision) in Precision::ALL.into_iter().enumerate() {
        let file = format!("u{i}/m0.safetensors");
        put(
            &s,
            &file,
            checkpoint::to_bytes_as(&member(1), precision).unwrap(),
        )
        .await;
        let (index, _) = put_sharded(&s, &format!("u{i}/m1"), &member(2), precision).await;
        assert_eq!(check(&s, &[&file, &index]).await.unwrap(), precision);
    }
}

#[tokio::test]
async fn members_of_different_dtypes_are_refused_naming_each() {
    let s = memory();
    let bf16 = checkpoint::to_bytes_as(&member(1), Precision::BF16).unwrap();
    put(&s, "uploads/a.safetensors", bf16).await;
    let (index, _) = put_sharded(&s, "uploads/b", &member(2), Precision::F16).await;
    let (code, message) = refused(check(&s, &["uploads/a.safetensors", &index]).await);
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(
        message.contains("members.checkpoints: members disagree on dtype")
            && message.contains("uploads/a.safetensors is bf16")
            && message.contains("uploads/b/model.safetensors.index.json is f16"),
        "{message}"
    );
}

#[tokio::test]
async fn a_sharded_member_is_checked_shard_by_shard_naming_the_shard() {
    let s = memory();
    let good = "uploads/m0.safetensors";
    put(
        &s,
        good,
        checkpoint::to_bytes_as(&member(1), Precision::BF16).unwrap(),
    )
    .await;
    let state = member(2);
    let (index, shards) = put_sharded(&s, "uploads/m1", &state, Precision::BF16).await;
    let shard_name = |key: &str| key.rsplit('/').next().unwrap().to_string();
    // The shard holding fc2.weight (the small one), and its bytes.
    let mut small = None;
    for key in &shards {
        let (bytes, _) = s.get(key).await.unwrap().unwrap();
        let loaded = checkpoint::read_bytes(key, bytes.to_vec()).unwrap();
        if loaded.state.get("fc2.weight").is_some() {
            small = Some((key.clone(), bytes));
        }
    }
    let (small_key, small_bytes) = small.unwrap();

    // A shard missing: FAILED_PRECONDITION naming it.
    object_store::ObjectStoreExt::delete(
        &s.store,
        &object_store::path::Path::from(small_key.as_str()),
    )
    .await
    .unwrap();
    let (code, message) = refused(check(&s, &[good, &index]).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(
        message.contains("members.checkpoints[1]")
            && message.contains(&format!("shard `{}`", shard_name(&small_key)))
            && message.contains("does not exist"),
        "{message}"
    );

    // Truncated, misshapen, or holding a tensor the index does not list:
    // INVALID_ARGUMENT naming the shard (and the tensor).
    let mut wrong_shape = StateDict::default();
    wrong_shape.insert("fc2.weight", HostTensor::zeros(vec![10, 9]));
    let mut only_fc2 = StateDict::default();
    only_fc2.insert("fc2.weight", state.get("fc2.weight").unwrap().clone());
    let mut extra = only_fc2.clone();
    extra.insert("fc9.weight", HostTensor::zeros(vec![2]));
    let cases = [
        (
            small_bytes[..small_bytes.len() - 2].to_vec(),
            vec![small_key.clone(), "truncated or padded".into()],
        ),
        (
            checkpoint::to_bytes_as(&wrong_shape, Precision::BF16).unwrap(),
            vec![
                format!("tensor `fc2.weight` in shard `{}`", shard_name(&small_key)),
                "has shape [10, 9], expected [10, 8]".into(),
            ],
        ),
        (
            checkpoint::to_bytes_as(&extra, Precision::BF16).unwrap(),
            vec![format!(
                "shard `{}` holds tensor `fc9.weight`, which the index does not list",
                shard_name(&small_key)
            )],
        ),
        (
            checkpoint::to_bytes_as(&only_fc2, Precision::F16).unwrap(),
            vec![format!("in shard `{}` is f16", shard_name(&small_key))],
        ),
    ];
    for (bytes, needles) in cases {
        put(&s, &small_key, bytes).await;
        let (code, message) = refused(check(&s, &[good, &index]).await);
        assert_eq!(code, Code::InvalidArgument, "{message}");
        assert!(message.contains("members.checkpoints[1]"), "{message}");
        for needle in needles {
            assert!(message.contains(&needle), "{needle}: {message}");
        }
    }
    put(&s, &small_key, small_bytes.to_vec()).await;
    check(&s, &[good, &index]).await.unwrap();

    // An index that is not one, and a checkpoint missing a tensor.
    put(
        &s,
        "uploads/bad/model.safetensors.index.json",
        b"{".to_vec(),
    )
    .await;
    let (code, message) =
        refused(check(&s, &[good, "uploads/bad/model.safetensors.index.json"]).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.contains("not a valid sharded checkpoint index"),
        "{message}"
    );
    let mut partial = member(3);
    partial.tensors.remove("fc2.weight");
    let mut big = partial.clone();
    big.insert("fc1.extra", HostTensor::zeros(vec![600]));
    let (index, _) = put_sharded(&s, "uploads/partial", &big, Precision::F32).await;
    let (code, message) = refused(check(&s, &[good, &index]).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.contains("missing `fc2.weight`") && message.contains("unexpected `fc1.extra`"),
        "{message}"
    );
    let (code, message) =
        refused(check(&s, &[good, "uploads/none/model.safetensors.index.json"]).await);
    assert_eq!(code, Code::NotFound, "{message}");
}

/// The fused model as the fusion step writes it, for offline comparison.
fn offline(members: &[&[u8]], precision: Precision) -> StateDict {
    let states: Vec<StateDict> = members
        .iter()
        .map(|b| checkpoint::read_bytes("m", b.to_vec()).unwrap().state)
        .collect();
    let refs: Vec<&StateDict> = states.iter().collect();
    let fused = nt_runtime::fuse(
        fusion::Method::Nt,
        &arch(),
        &refs,
        &nt_runtime::FuseOptions::default(),
    )
    .unwrap();
    let bytes = checkpoint::to_bytes_as(&fused.state, precision).unwrap();
    checkpoint::read_bytes("offline", bytes).unwrap().state
}

fn plan(extra: &str, keys: &[&str]) -> Plan {
    let yaml = format!("members: {{checkpoints: {keys:?}}}\nfusion: [nt]\n{extra}");
    Plan::from_wire(&spec(&yaml), &|r| Ok(r.to_string())).unwrap()
}

#[tokio::test]
async fn fusion_writes_the_members_dtype_unless_the_spec_names_one() {
    let s = memory();
    let m0 = checkpoint::to_bytes_as(&member(1), Precision::BF16).unwrap();
    put(&s, "uploads/m0.safetensors", m0.clone()).await;
    let m1 = checkpoint::to_bytes_as(&member(2), Precision::BF16).unwrap();
    let (index, _) = put_sharded(&s, "uploads/m1", &member(2), Precision::BF16).await;
    let keys = ["uploads/m0.safetensors", index.as_str()];
    let owned: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    for (extra, precision) in [
        ("", Precision::BF16),
        ("fused_dtype: f32\n", Precision::F32),
    ] {
        let records = fuse_members(&s, "run-x", &owned, &plan(extra, &keys))
            .await
            .unwrap();
        assert_eq!(records[0].key, layout::fused("run-x", "nt"));
        let (bytes, _) = s.get(&records[0].key).await.unwrap().unwrap();
        let stored = checkpoint::read_bytes("fused", bytes.to_vec()).unwrap();
        assert_eq!(stored.precision, precision, "{extra}");
        let expected = offline(&[&m0, &m1], precision);
        for (name, t) in &expected.tensors {
            assert_eq!(
                stored.state.get(name).unwrap().as_f32(),
                t.as_f32(),
                "{name} ({precision})"
            );
        }
        assert_eq!(stored.state.lineage().unwrap().members, keys);
    }
    // A member replaced by another dtype after submission: the run fails
    // with the members and their dtypes.
    let f16 = checkpoint::to_bytes_as(&member(1), Precision::F16).unwrap();
    put(&s, "uploads/m0.safetensors", f16).await;
    let e = fuse_members(&s, "run-y", &owned, &plan("", &keys))
        .await
        .unwrap_err();
    assert!(
        e.contains("members disagree on dtype: uploads/m0.safetensors is f16, uploads/m1/model.safetensors.index.json is bf16"),
        "{e}"
    );
}
