//! `ntctl train --members K` as a user runs it: K members trained jointly
//! equal the same members trained one after another (bit for bit on the
//! CPU), resume from a joint state, and fall back with the reason when the
//! architecture cannot train jointly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use fusion::checkpoint;

const SYNTHETIC_DATA: &str = "synthetic:shape=1x8x8,train=256,test=64,classes=10,noise=0.3";
const SMALL_MLP: &str = "mlp:input=1x8x8,hidden=32,depth=2";

/// ntctl for the offline verbs, in `dir`, with no setting from the environment.
fn offline(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ntctl"));
    c.current_dir(dir)
        .env_remove("NT_OUTPUT")
        .env_remove("NT_CONFIG")
        .env_remove("NT_DATA")
        .env_remove("NT_DEVICE")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("NT_THREADS", "1");
    c
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn json(cmd: &mut Command) -> serde_json::Value {
    let out = output(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

fn train(dir: &Path, arch: &str, out: &str, extra: &[&str]) -> serde_json::Value {
    json(
        offline(dir)
            .args([
                "--output",
                "json",
                "train",
                "--members",
                "3",
                "--arch",
                arch,
            ])
            .args(["--data", SYNTHETIC_DATA, "--device", "cpu", "--epochs", "2"])
            .args([
                "--batch-size",
                "32",
                "--lr",
                "0.05",
                "--seed",
                "5",
                "-o",
                out,
            ])
            .args(extra),
    )
}

/// The tensors of a member file (its metadata records timings).
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let state = checkpoint::load(path).unwrap();
    state
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.bytes().to_vec()))
        .collect()
}

#[test]
fn members_trained_jointly_equal_members_trained_one_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let joint = train(d, SMALL_MLP, "joint", &[]);
    assert_eq!(joint["joint"], true, "{joint}");
    let apart = train(d, SMALL_MLP, "apart", &["--joint", "off"]);
    assert_eq!(apart["joint"], false, "{apart}");
    for k in 0..3 {
        let name = format!("member-{k}.safetensors");
        assert_eq!(
            tensors(&d.join("joint").join(&name)),
            tensors(&d.join("apart").join(&name)),
            "member {k}"
        );
        let lineage = checkpoint::load(&d.join("joint").join(&name))
            .unwrap()
            .lineage()
            .unwrap();
        assert_eq!(lineage.notes["seed"], (5 + k).to_string());
        assert_eq!(
            joint["members"][k]["test"], apart["members"][k]["test"],
            "member {k}"
        );
    }
    assert_ne!(
        tensors(&d.join("joint/member-0.safetensors")),
        tensors(&d.join("joint/member-1.safetensors"))
    );
}

#[test]
fn a_joint_training_resumes_from_its_checkpoint_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    train(d, SMALL_MLP, "whole", &["--checkpoint-dir", "states"]);
    let state = d.join("states/epoch-0001.state.safetensors");
    assert!(state.is_file());
    let resumed = train(
        d,
        SMALL_MLP,
        "resumed",
        &["--resume", state.to_str().unwrap()],
    );
    assert_eq!(resumed["joint"], true);
    for k in 0..3 {
        let name = format!("member-{k}.safetensors");
        assert_eq!(
            tensors(&d.join("whole").join(&name)),
            tensors(&d.join("resumed").join(&name))
        );
    }
}

#[test]
fn an_architecture_with_dropout_falls_back_to_one_after_another_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = serde_json::json!({
        "format": "nt.arch/v1",
        "name": "dropout-mlp",
        "input": [1, 8, 8],
        "nodes": [
            {"op": "flatten"},
            {"name": "fc1", "op": "linear", "in": 64, "out": 16},
            {"op": "relu"},
            {"name": "drop", "op": "dropout", "p": 0.25},
            {"name": "fc2", "op": "linear", "in": 16, "out": 10}
        ]
    });
    std::fs::write(d.join("dropout.json"), spec.to_string()).unwrap();
    let out = train(d, "dropout.json", "members", &[]);
    assert_eq!(out["joint"], false, "{out}");
    let why = out["fallback"].as_str().unwrap_or_default();
    assert!(why.contains("`drop`") && why.contains("dropout"), "{out}");
    for k in 0..3 {
        assert!(d.join(format!("members/member-{k}.safetensors")).is_file());
    }
}

#[test]
fn members_refuse_an_init_checkpoint_and_a_file_as_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("taken"), b"x").unwrap();
    for (args, needle) in [
        (vec!["--init", "m.safetensors"], "--init"),
        (vec!["-o", "taken"], "is a file"),
    ] {
        let mut cmd = offline(d);
        cmd.args([
            "train",
            "--members",
            "2",
            "--arch",
            SMALL_MLP,
            "--data",
            SYNTHETIC_DATA,
        ])
        .args(["--device", "cpu", "--epochs", "1"]);
        if !args.contains(&"-o") {
            cmd.args(["-o", "out"]);
        }
        let out = output(cmd.args(&args));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
    }
}
