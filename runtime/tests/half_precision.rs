//! Half-precision and sharded checkpoints against libtorch: nt rounds f32
//! to bf16 and f16 exactly as torch does, fuses half-precision members in
//! f32 and writes the result in their precision, and the job driver
//! evaluates bf16 and sharded checkpoints, from files and from a store.

#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use fusion::arch::{preset, Architecture};
use fusion::checkpoint::{self, Precision, SaveOptions};
use fusion::state::{HostTensor, StateDict};
use fusion::Method;
use nt_runtime::data::{self, DataSpec, FileSource, SyntheticSpec};
use nt_runtime::job::{run_evaluation, ArchOf, EvalJob, JobIo, LocalFiles, Normalize, Quiet};
use nt_runtime::model::Network;
use nt_runtime::{fuse, FuseOptions, Result, RuntimeError};
use nt_spec::EvalItem;
use tch::{Device, Kind, Tensor};

fn arch(text: &str) -> Architecture {
    Architecture::new(preset(text).unwrap()).unwrap()
}

fn member(arch: &Architecture, seed: u64) -> StateDict {
    let mut state = Network::init(arch, Device::Cpu, seed)
        .unwrap()
        .to_state()
        .unwrap();
    state.set_arch(arch.spec());
    state
}

/// `values` rounded to `kind` by libtorch and widened back to f32.
fn torch_round(values: &[f32], kind: Kind) -> Vec<f32> {
    let t = Tensor::from_slice(values)
        .to_kind(kind)
        .to_kind(Kind::Float);
    Vec::<f32>::try_from(&t).unwrap()
}

fn kind(precision: Precision) -> Kind {
    match precision {
        Precision::F32 => Kind::Float,
        Precision::BF16 => Kind::BFloat16,
        Precision::F16 => Kind::Half,
    }
}

/// Bit for bit, any NaN equal to any NaN.
fn assert_same(got: &[f32], expected: &[f32], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let same = g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan());
        assert!(
            same,
            "{what}[{i}]: nt {g:e} ({:#x}), torch {e:e} ({:#x})",
            g.to_bits(),
            e.to_bits()
        );
    }
}

/// A state dict with each float tensor rounded by libtorch.
fn torch_rounded(state: &StateDict, precision: Precision) -> StateDict {
    let mut out = state.clone();
    for (name, t) in &state.tensors {
        if let Some(values) = t.as_f32() {
            let rounded = torch_round(values, kind(precision));
            out.insert(name.clone(), HostTensor::f32(t.shape().to_vec(), rounded));
        }
    }
    out
}

/// Values that probe the rounding: ties, the subnormals of both formats,
/// the edges of their ranges, the specials, and random bit patterns.
fn probes() -> Vec<f32> {
    let mut values = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::EPSILON,
        65504.0,
        65519.0,
        65520.0,
        -65520.0,
        6.1e-5,
        5.96e-8,
        2.98e-8,
        1e-40,
    ];
    for e in -30..=20 {
        for m in 0..64u32 {
            // Near ties for both formats: low bits 0x8000 (bf16), 0x1000 (f16).
            let base = 2f32.powi(e).to_bits();
            for low in [0x8000u32, 0x7fff, 0x8001, 0x1000, 0x0fff, 0x1001, 0x18000] {
                values.push(f32::from_bits(base + (m << 17) + low));
            }
        }
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        values.push(f32::from_bits((x >> 32) as u32));
    }
    values
}

#[test]
fn rounding_to_bf16_and_f16_equals_torch() {
    let values = probes();
    for (precision, round) in [
        (
            Precision::BF16,
            (|v| checkpoint::bf16_to_f32(checkpoint::f32_to_bf16(v))) as fn(f32) -> f32,
        ),
        (Precision::F16, |v| {
            checkpoint::f16_to_f32(checkpoint::f32_to_f16(v))
        }),
    ] {
        let ours: Vec<f32> = values.iter().map(|&v| round(v)).collect();
        assert_same(
            &ours,
            &torch_round(&values, kind(precision)),
            precision.name(),
        );
    }
}

#[test]
fn a_checkpoint_round_trips_through_half_precision_as_torch_rounds() {
    let a = arch("resnet:blocks=1,width=4,size=8,classes=4");
    let state = member(&a, 3);
    let dir = tempfile::tempdir().unwrap();
    for precision in [Precision::BF16, Precision::F16] {
        let path = dir.path().join(format!("m-{precision}.safetensors"));
        let options = SaveOptions {
            precision,
            ..SaveOptions::default()
        };
        checkpoint::save_with(&path, &state, &options).unwrap();
        let loaded = checkpoint::read(&path).unwrap();
        assert_eq!(loaded.precision, precision);
        checkpoint::validate(&loaded.state, &a, "m").unwrap();
        let expected = torch_rounded(&state, precision);
        for (name, t) in &expected.tensors {
            let back = loaded.state.get(name).unwrap();
            match t.as_f32() {
                Some(values) => assert_same(back.as_f32().unwrap(), values, name),
                // num_batches_tracked stays i64.
                None => assert_eq!(back.as_i64(), t.as_i64(), "{name}"),
            }
        }
        // The file is what torch would have stored: the stored dtype per tensor.
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        for (name, info) in meta.tensors() {
            let expected = match state.get(&name).unwrap().as_f32() {
                Some(_) if precision == Precision::BF16 => safetensors::Dtype::BF16,
                Some(_) => safetensors::Dtype::F16,
                None => safetensors::Dtype::I64,
            };
            assert_eq!(info.dtype, expected, "{name}");
        }
    }
}

#[test]
fn bf16_members_fuse_to_the_rounded_fusion_of_their_f32_values() {
    let a = arch("resnet:blocks=1,width=4,size=8,classes=4");
    let dir = tempfile::tempdir().unwrap();
    let options = SaveOptions {
        precision: Precision::BF16,
        ..SaveOptions::default()
    };
    let mut read = Vec::new();
    let mut upcast = Vec::new();
    for seed in [1, 2] {
        let m = member(&a, seed);
        let path = dir.path().join(format!("m{seed}.safetensors"));
        checkpoint::save_with(&path, &m, &options).unwrap();
        read.push(checkpoint::read(&path).unwrap());
        // What torch holds after `m.to(torch.bfloat16).float()`.
        upcast.push(torch_rounded(&m, Precision::BF16));
    }
    let named: Vec<(String, Precision)> = read
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("m{i}"), l.precision))
        .collect();
    assert_eq!(
        checkpoint::common_precision(&named).unwrap(),
        Precision::BF16
    );

    let members: Vec<&StateDict> = read.iter().map(|l| &l.state).collect();
    let fused = fuse(Method::Nt, &a, &members, &FuseOptions::default()).unwrap();
    let out = dir.path().join("fused.safetensors");
    checkpoint::save_with(&out, &fused.state, &options).unwrap();
    let written = checkpoint::read(&out).unwrap();
    assert_eq!(written.precision, Precision::BF16);

    let refs: Vec<&StateDict> = upcast.iter().collect();
    let expected = fuse(Method::Nt, &a, &refs, &FuseOptions::default()).unwrap();
    let expected = torch_rounded(&expected.state, Precision::BF16);
    assert_eq!(written.state.tensors.len(), expected.tensors.len());
    for (name, t) in &expected.tensors {
        let got = written.state.get(name).unwrap();
        match t.as_f32() {
            Some(values) => assert_same(got.as_f32().unwrap(), values, name),
            None => assert_eq!(got.as_i64(), t.as_i64(), "{name}"),
        }
    }
}

fn data_spec() -> DataSpec {
    DataSpec {
        synthetic: Some(SyntheticSpec {
            train: 256,
            test: 200,
            classes: 4,
            shape: [1, 8, 8],
            seed: 5,
            noise: 0.8,
        }),
        ..DataSpec::named("synthetic")
    }
}

/// Objects in memory, as a store holds them.
#[derive(Default)]
struct Memory {
    objects: RefCell<HashMap<String, Vec<u8>>>,
}

impl JobIo for Memory {
    fn read(&self, key: &str) -> Result<Vec<u8>> {
        self.objects
            .borrow()
            .get(key)
            .cloned()
            .ok_or_else(|| RuntimeError::Missing(key.into()))
    }

    fn write(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.objects.borrow_mut().insert(key.into(), bytes);
        Ok(())
    }

    fn data_source(&self, spec: &DataSpec) -> Result<Box<dyn FileSource + '_>> {
        Ok(Box::new(data::local_source(spec)?))
    }
}

fn eval_job(keys: &[String]) -> EvalJob {
    EvalJob {
        items: keys
            .iter()
            .map(|k| EvalItem {
                name: k.clone(),
                checkpoints: vec![k.clone()],
            })
            .collect(),
        arch: ArchOf::Recorded,
        data: data_spec(),
        device: Device::Cpu,
        eval_batch: 64,
        normalize: Normalize::TrainingSplit,
    }
}

/// Every file of `dir` (not its folders) as an object under `prefix/`.
fn upload(io: &Memory, dir: &Path, prefix: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        io.write(&format!("{prefix}/{name}"), std::fs::read(&path).unwrap())
            .unwrap();
    }
}

#[test]
fn the_eval_job_reads_bf16_and_sharded_checkpoints_from_files_and_a_store() {
    let a = arch("mlp:input=1x8x8,hidden=32,depth=2,classes=4");
    let m = member(&a, 7);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    // The reference: the bf16-rounded weights, stored in f32.
    checkpoint::save(
        Path::new(&path("ref.safetensors")),
        &torch_rounded(&m, Precision::BF16),
    )
    .unwrap();
    let bf16 = SaveOptions {
        precision: Precision::BF16,
        ..SaveOptions::default()
    };
    checkpoint::save_with(Path::new(&path("bf16.safetensors")), &m, &bf16).unwrap();
    let shards = dir.path().join("sharded");
    std::fs::create_dir(&shards).unwrap();
    let tiny = SaveOptions {
        max_shard_bytes: 4096,
        ..bf16
    };
    let saved = checkpoint::save_with(&shards, &m, &tiny).unwrap();
    assert!(saved.shards.len() >= 2, "{saved:?}");

    let keys = [
        path("ref.safetensors"),
        path("bf16.safetensors"),
        path("sharded"),
        saved.path.display().to_string(),
    ];
    let got = run_evaluation(&eval_job(&keys), &LocalFiles, &mut Quiet).unwrap();
    for e in &got[1..] {
        assert_eq!(e.evaluation, got[0].evaluation, "{}", e.name);
        assert_eq!(e.parameters, a.parameter_count(), "{}", e.name);
    }

    // The same checkpoints as objects of a store, read through `JobIo::read`.
    let io = Memory::default();
    upload(&io, dir.path(), "runs/r1");
    upload(&io, &shards, "runs/r1/sharded");
    let index = format!("runs/r1/sharded/{}", checkpoint::INDEX_FILE);
    let keys = ["runs/r1/bf16.safetensors".to_string(), index.clone()];
    let from_store = run_evaluation(&eval_job(&keys), &io, &mut Quiet).unwrap();
    for e in &from_store {
        assert_eq!(e.evaluation, got[0].evaluation, "{}", e.name);
    }
    let loaded = io.checkpoint(&index).unwrap();
    assert_eq!(loaded.precision, Precision::BF16);

    // A shard missing from the store: an error naming it and the index.
    let gone = saved.shards[1]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    io.objects
        .borrow_mut()
        .remove(&format!("runs/r1/sharded/{gone}"));
    let err = run_evaluation(&eval_job(std::slice::from_ref(&index)), &io, &mut Quiet).unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    let err = err.to_string();
    assert!(
        err.contains(&index) && err.contains(&format!("shard `{gone}`")),
        "{err}"
    );
}

#[test]
fn members_of_mixed_precision_are_named() {
    let a = arch("mlp:input=1x8x8,hidden=8,depth=1,classes=4");
    let dir = tempfile::tempdir().unwrap();
    let mut named = Vec::new();
    for (name, precision) in [
        ("a.safetensors", Precision::BF16),
        ("b.safetensors", Precision::F16),
    ] {
        let path = dir.path().join(name);
        let options = SaveOptions {
            precision,
            ..SaveOptions::default()
        };
        checkpoint::save_with(&path, &member(&a, 1), &options).unwrap();
        named.push((name, checkpoint::read(&path).unwrap().precision));
    }
    let err = checkpoint::common_precision(&named)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("members disagree on dtype: a.safetensors is bf16, b.safetensors is f16"),
        "{err}"
    );
}
