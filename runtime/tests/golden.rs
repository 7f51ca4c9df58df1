//! The golden fixtures of the paper's reference implementation
//! (`tests/golden/`, copied from the project's shared fixtures): our NT must
//! reproduce its fused tensors and logits, and our concatenation the
//! ensemble's logits.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use fusion::arch::resolve;
use fusion::checkpoint;
use fusion::state::{DType, StateDict};
use fusion::Method;
use nt_runtime::guard::GuardMode;
use nt_runtime::model::Network;
use nt_runtime::{fuse, FuseOptions, TchExt};
use tch::{Device, Tensor};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn spec_file(name: &str) -> String {
    root()
        .join("../examples/arch")
        .join(name)
        .display()
        .to_string()
}

fn load_case(case: &str) -> (Vec<StateDict>, StateDict, StateDict) {
    let dir = root().join("tests/golden").join(case);
    let count = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("member_")
        })
        .count();
    let members = (0..count)
        .map(|i| checkpoint::load(&dir.join(format!("member_{i}.safetensors"))).unwrap())
        .collect();
    let fused = checkpoint::load(&dir.join("fused.safetensors")).unwrap();
    let io = checkpoint::load(&dir.join("io.safetensors")).unwrap();
    (members, fused, io)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check(case: &str, spec: &str) {
    let arch = resolve(&spec_file(spec)).unwrap();
    let (members, golden, io) = load_case(case);
    let refs: Vec<&StateDict> = members.iter().collect();
    let options = FuseOptions {
        guard: GuardMode::Always,
        ..Default::default()
    };
    let fused = fuse(Method::Nt, &arch, &refs, &options).unwrap();
    assert!(fused.report.guard.ran, "{case}: the guard should have run");

    // Every tensor within 1e-5 of the reference's.
    assert_eq!(
        fused.state.tensors.keys().collect::<Vec<_>>(),
        golden.tensors.keys().collect::<Vec<_>>(),
        "{case}: tensor names"
    );
    for (name, want) in &golden.tensors {
        let got = fused.state.get(name).unwrap();
        assert_eq!(got.shape(), want.shape(), "{case}: {name} shape");
        match want.dtype() {
            DType::F32 => {
                let worst = got
                    .as_f32()
                    .unwrap()
                    .iter()
                    .zip(want.as_f32().unwrap())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst <= 1e-5, "{case}: {name} differs by {worst}");
            }
            DType::I64 => assert_eq!(got.as_i64(), want.as_i64(), "{case}: {name}"),
        }
    }

    // Fused logits within 1e-4 of the reference's.
    let input = io.get("input").unwrap().to_tch();
    let net = Network::from_state(&arch, &fused.state, Device::Cpu).unwrap();
    let logits = net.predict(&input).unwrap();
    let d = max_diff(&logits, &io.get("fused_logits").unwrap().to_tch());
    assert!(d <= 1e-4, "{case}: fused logits differ by {d}");

    // The concatenated model reproduces the ensemble's logits within 1e-5.
    let concat = fuse(Method::Concat, &arch, &refs, &options).unwrap();
    let wide = Network::from_state(&concat.arch, &concat.state, Device::Cpu).unwrap();
    let d = max_diff(
        &wide.predict(&input).unwrap(),
        &io.get("ensemble_logits").unwrap().to_tch(),
    );
    assert!(d <= 1e-5, "{case}: concatenated logits differ by {d}");
}

#[test]
fn mlp_k2() {
    check("mlp_k2", "golden-mlp.json");
}

#[test]
fn mlp_bias_k4() {
    check("mlp_bias_k4", "golden-mlp-bias.json");
}

#[test]
fn lenet_k2() {
    check("lenet_k2", "golden-lenet.json");
}

#[test]
fn vgg_bn_k2() {
    check("vgg_bn_k2", "golden-vgg-bn.json");
}

#[test]
fn resnet_mini_k2() {
    check("resnet_mini_k2", "golden-resnet-mini.json");
}

/// The preset with the same shape fuses the same way as the spec file.
#[test]
fn lenet_preset_matches_the_spec_file() {
    let preset = resolve("lenet").unwrap();
    let file = resolve(&spec_file("golden-lenet.json")).unwrap();
    assert_eq!(preset.spec().nodes, file.spec().nodes);
}
