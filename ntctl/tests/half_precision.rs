//! `ntctl fuse`, `eval` and `train --init` on bf16, f16 and sharded
//! checkpoints, as a user runs them: the real binary on real files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use fusion::arch::{preset, Architecture};
use fusion::checkpoint::{self, Precision, SaveOptions};
use nt_runtime::model::Network;
use tch::Device;

const SYNTHETIC_DATA: &str = "synthetic:shape=1x8x8,train=256,test=64,classes=10,noise=0.3";
const SMALL_MLP: &str = "mlp:input=1x8x8,hidden=32,depth=2";

/// ntctl for the offline verbs, in `dir`, on one CPU thread, with no
/// setting from the environment.
fn offline(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ntctl"));
    c.current_dir(dir)
        .env_remove("NT_OUTPUT")
        .env_remove("NT_CONFIG")
        .env_remove("NT_DATA")
        .env_remove("NT_DEVICE")
        .env_remove("NT_FUSE_DTYPE")
        .env_remove("NT_MAX_SHARD_SIZE")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("NT_THREADS", "1");
    c
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> serde_json::Value {
    let out = run(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn member(dir: &Path, name: &str, seed: u64, precision: Precision) {
    let arch = Architecture::new(preset(SMALL_MLP).unwrap()).unwrap();
    let mut state = Network::init(&arch, Device::Cpu, seed)
        .unwrap()
        .to_state()
        .unwrap();
    state.set_arch(arch.spec());
    let options = SaveOptions {
        precision,
        ..SaveOptions::default()
    };
    checkpoint::save_with(&dir.join(name), &state, &options).unwrap();
}

/// Each model's test accuracy and loss, by `ntctl eval`.
fn eval(dir: &Path, models: &[&str]) -> Vec<(f64, f64)> {
    let report = ok(offline(dir)
        .args(["--output", "json", "eval", "--data", SYNTHETIC_DATA])
        .args(["--device", "cpu"])
        .args(models));
    report["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["accuracy"].as_f64().unwrap(), m["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn bf16_members_fuse_to_bf16_and_everything_reads_it_one_file_or_sharded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    member(d, "m0.safetensors", 1, Precision::BF16);
    member(d, "m1.safetensors", 2, Precision::BF16);
    let fuse = |extra: &[&str], output: &str| {
        ok(offline(d)
            .args(["--output", "json", "fuse", "-o", output])
            .args(extra)
            .args(["m0.safetensors", "m1.safetensors"]))
    };

    // The members' dtype by default; f32 when asked.
    let bf16 = fuse(&[], "fused.safetensors");
    assert_eq!(bf16["dtype"], "bf16");
    assert_eq!(bf16["output"], "fused.safetensors");
    assert_eq!(bf16["shards"], serde_json::json!([]));
    let f32 = fuse(&["--dtype", "f32"], "fused-f32.safetensors");
    assert_eq!(f32["dtype"], "f32");
    let as_bf16 = checkpoint::read(&d.join("fused.safetensors")).unwrap();
    let as_f32 = checkpoint::read(&d.join("fused-f32.safetensors")).unwrap();
    assert_eq!(as_bf16.precision, Precision::BF16);
    assert_eq!(as_f32.precision, Precision::F32);
    // The bf16 checkpoint is the f32 fusion rounded.
    for (name, t) in &as_f32.state.tensors {
        let rounded: Vec<f32> = t
            .as_f32()
            .unwrap()
            .iter()
            .map(|&v| checkpoint::bf16_to_f32(checkpoint::f32_to_bf16(v)))
            .collect();
        assert_eq!(
            as_bf16.state.get(name).unwrap().as_f32().unwrap(),
            rounded,
            "{name}"
        );
    }

    // Above --max-shard-size, shards in the Hugging Face layout in a folder.
    std::fs::create_dir(d.join("sharded")).unwrap();
    let sharded = fuse(&["--max-shard-size", "2KiB"], "sharded");
    let index = format!("sharded/{}", checkpoint::INDEX_FILE);
    assert_eq!(sharded["output"], index.as_str());
    let shards = sharded["shards"].as_array().unwrap();
    assert!(shards.len() >= 2, "{sharded}");
    assert_eq!(
        shards[0],
        format!("sharded/model-00001-of-{:05}.safetensors", shards.len()).as_str()
    );

    // eval reads the file, the folder and the index alike.
    let got = eval(d, &["fused.safetensors", "sharded", &index]);
    assert_eq!(got[0], got[1]);
    assert_eq!(got[0], got[2]);

    // train --init fine-tunes a sharded bf16 checkpoint (and writes f32).
    let out = run(offline(d)
        .args(["train", "--init", &index, "--data", SYNTHETIC_DATA])
        .args(["--device", "cpu", "--epochs", "1", "--batch-size", "32"])
        .args(["-o", "tuned.safetensors"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tuned = checkpoint::read(&d.join("tuned.safetensors")).unwrap();
    assert_eq!(tuned.precision, Precision::F32);
    assert_eq!(tuned.state.lineage().unwrap().members, [index.as_str()]);
}

#[test]
fn members_of_different_dtypes_and_bad_options_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    member(d, "a.safetensors", 1, Precision::BF16);
    member(d, "b.safetensors", 2, Precision::F16);
    member(d, "c.safetensors", 3, Precision::BF16);
    let err = fails(offline(d).args([
        "fuse",
        "-o",
        "x.safetensors",
        "a.safetensors",
        "b.safetensors",
    ]));
    assert!(
        err.contains("members disagree on dtype: a.safetensors is bf16, b.safetensors is f16"),
        "{err}"
    );
    assert!(!d.join("x.safetensors").exists());
    let err = fails(
        offline(d)
            .args(["fuse", "--dtype", "f64", "-o", "x.safetensors"])
            .args(["a.safetensors", "c.safetensors"]),
    );
    assert!(err.contains("dtype `f64`"), "{err}");
    for size in ["0", "lots", "3 parsecs"] {
        let err = fails(
            offline(d)
                .args(["fuse", "--max-shard-size", size, "-o", "x.safetensors"])
                .args(["a.safetensors", "c.safetensors"]),
        );
        assert!(err.contains(&format!("`{size}`")), "{err}");
    }
    // A shard missing from its index.
    std::fs::create_dir(d.join("s")).unwrap();
    let sharded = ok(offline(d)
        .args([
            "--output",
            "json",
            "fuse",
            "--max-shard-size",
            "1KiB",
            "-o",
            "s",
        ])
        .args(["a.safetensors", "c.safetensors"]));
    let second = sharded["shards"][1].as_str().unwrap();
    std::fs::remove_file(d.join(second)).unwrap();
    let gone = Path::new(second).file_name().unwrap().to_string_lossy();
    let err = fails(offline(d).args(["eval", "--data", SYNTHETIC_DATA, "--device", "cpu", "s"]));
    assert!(
        err.contains("s/model.safetensors.index.json") && err.contains(&format!("shard `{gone}`")),
        "{err}"
    );
}
