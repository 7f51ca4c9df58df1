//! The golden OT fixtures of the paper's reference code (`tests/golden_ot/`,
//! copied from the project's shared fixtures): our `ot` must reproduce its
//! fused tensors within 1e-5 and its fused logits within 1e-4.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use fusion::arch::Architecture;
use fusion::checkpoint;
use fusion::state::StateDict;
use fusion::Method;
use nt_runtime::model::Network;
use nt_runtime::{fuse, FuseOptions, TchExt};
use tch::Device;

fn dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden_ot")
        .join(case)
}

/// The case's MLP (no biases, ReLU between layers) as an `nt.arch/v1` spec.
fn arch(case: &str) -> Architecture {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir(case).join("case.json")).unwrap())
            .unwrap();
    let mlp = &meta["mlp"];
    let (input, hidden, depth, out) = (
        mlp["in"].as_u64().unwrap(),
        mlp["hidden"].as_u64().unwrap(),
        mlp["depth"].as_u64().unwrap(),
        mlp["out"].as_u64().unwrap(),
    );
    let mut nodes = vec![serde_json::json!({"op": "flatten"})];
    let mut width = input;
    for i in 1..=depth + 1 {
        let next = if i == depth + 1 { out } else { hidden };
        nodes.push(serde_json::json!({
            "name": format!("fc{i}"), "op": "linear", "in": width, "out": next, "bias": false
        }));
        if i <= depth {
            nodes.push(serde_json::json!({"op": "relu"}));
        }
        width = next;
    }
    let spec = serde_json::json!({
        "format": "nt.arch/v1", "name": case, "input": [input], "nodes": nodes
    });
    Architecture::from_json(&spec.to_string()).unwrap()
}

fn load(case: &str) -> (Vec<StateDict>, StateDict, StateDict) {
    let d = dir(case);
    let mut members = Vec::new();
    while d
        .join(format!("member_{}.safetensors", members.len()))
        .exists()
    {
        let path = d.join(format!("member_{}.safetensors", members.len()));
        members.push(checkpoint::load(&path).unwrap());
    }
    let fused = checkpoint::load(&d.join("fused.safetensors")).unwrap();
    let io = checkpoint::load(&d.join("io.safetensors")).unwrap();
    (members, fused, io)
}

/// The largest difference between two float tensors.
fn max_diff(a: &fusion::state::HostTensor, b: &fusion::state::HostTensor) -> f32 {
    a.as_f32()
        .unwrap()
        .iter()
        .zip(b.as_f32().unwrap())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

fn check(case: &str) -> StateDict {
    let arch = arch(case);
    let (members, golden, io) = load(case);
    let refs: Vec<&StateDict> = members.iter().collect();
    let fused = fuse(Method::Ot, &arch, &refs, &FuseOptions::default()).unwrap();
    for (name, want) in &golden.tensors {
        let got = fused.state.get(name).unwrap();
        assert_eq!(got.shape(), want.shape(), "{case}: {name} shape");
        let worst = max_diff(got, want);
        assert!(worst <= 1e-5, "{case}: {name} differs by {worst}");
    }
    let input = io.get("input").unwrap().to_tch();
    let net = Network::from_state(&arch, &fused.state, Device::Cpu).unwrap();
    let logits = net.predict(&input).unwrap();
    let d = (logits - io.get("fused_logits").unwrap().to_tch())
        .abs()
        .max()
        .double_value(&[]);
    assert!(d <= 1e-4, "{case}: fused logits differ by {d}");
    fused.state
}

#[test]
fn ot_mlp_k2() {
    check("ot_mlp_k2");
}

#[test]
fn ot_mlp_k3() {
    check("ot_mlp_k3");
}

#[test]
fn ot_of_a_permuted_copy_recovers_member_0() {
    let fused = check("ot_mlp_permuted_copy");
    let (members, _, _) = load("ot_mlp_permuted_copy");
    for (name, want) in &members[0].tensors {
        let worst = max_diff(fused.get(name).unwrap(), want);
        assert!(worst <= 1e-5, "{name} differs from member 0's by {worst}");
    }
}
