//! Bad input gets a clear error naming the cause, never a panic.

#![allow(clippy::unwrap_used)]

use fusion::arch::{preset, resolve, Architecture};
use fusion::assemble::{all_channels, Selection};
use fusion::checkpoint;
use fusion::coupling::Coupling;
use fusion::state::{HostTensor, StateDict};
use fusion::{transplant, FusionError, Method};
use nt_runtime::guard::{Guard, GuardMode};
use nt_runtime::model::Network;
use nt_runtime::{fuse, FuseOptions, RuntimeError};
use tch::Device;

fn arch(p: &str) -> Architecture {
    Architecture::new(preset(p).unwrap()).unwrap()
}

fn member(arch: &Architecture, seed: i64) -> StateDict {
    Network::init(arch, Device::Cpu, seed as u64)
        .unwrap()
        .to_state()
        .unwrap()
}

/// A LeNet member whose metadata records another network (average instead
/// of max pooling): its tensors fit `lenet` exactly.
fn recorded_as_avgpool_lenet(lenet: &Architecture, seed: i64) -> StateDict {
    let mut other = member(lenet, seed);
    let mut spec = lenet.spec().clone();
    spec.name = "lenet-avgpool".into();
    spec.nodes[2].op = fusion::arch::Op::AvgPool2d {
        kernel: 2,
        stride: None,
        padding: 0,
    };
    other.set_arch(&spec);
    other
}

fn guarded() -> FuseOptions {
    FuseOptions {
        guard: GuardMode::Always,
        ..Default::default()
    }
}

#[test]
fn one_member_is_not_an_ensemble() {
    let a = arch("mlp:hidden=8,depth=1");
    let m = member(&a, 1);
    for method in Method::ALL {
        let err = fuse(method, &a, &[&m], &FuseOptions::default())
            .err()
            .unwrap();
        assert!(
            matches!(err, RuntimeError::Fusion(FusionError::Members(_))),
            "{method}: {err}"
        );
        assert!(
            err.to_string().contains("at least 2 members, got 1"),
            "{err}"
        );
    }
}

#[test]
fn members_of_other_shapes_or_architectures_are_refused() {
    let a = arch("mlp:hidden=8,depth=1");
    let b = arch("mlp:hidden=6,depth=1");
    let (m0, m1) = (member(&a, 1), member(&b, 2));
    let err = fuse(Method::Nt, &a, &[&m0, &m1], &FuseOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("member 1") && err.contains("fc1.weight") && err.contains("[6, 784]"),
        "{err}"
    );

    // Same parameter names and shapes as lenet but recorded as another architecture.
    let lenet = arch("lenet");
    let other = recorded_as_avgpool_lenet(&lenet, 3);
    let err = fuse(
        Method::Nt,
        &lenet,
        &[&member(&lenet, 4), &other],
        &FuseOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("member 1 records architecture `lenet-avgpool`"),
        "{err}"
    );

    // A tensor of the wrong shape is named.
    let mut bad = member(&a, 5);
    bad.insert("fc2.weight", HostTensor::zeros(vec![10, 9]));
    let err = fuse(Method::Average, &a, &[&m0, &bad], &FuseOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("member 1") && err.contains("fc2.weight") && err.contains("[10, 9]"),
        "{err}"
    );
}

#[test]
fn unknown_presets_and_bad_spec_files_are_named() {
    let err = resolve("alexnet").unwrap_err().to_string();
    assert!(
        err.contains("unknown architecture preset `alexnet`"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let cyclic = dir.path().join("cycle.json");
    std::fs::write(
        &cyclic,
        r#"{"format":"nt.arch/v1","name":"c","input":[4],"nodes":[
            {"name":"a","op":"linear","in":4,"out":4,"input":"b"},
            {"name":"b","op":"linear","in":4,"out":4,"input":"a"},
            {"name":"out","op":"linear","in":4,"out":2}]}"#,
    )
    .unwrap();
    let err = resolve(cyclic.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("cycle.json") && err.contains("cycle"), "{err}");
    let unknown = dir.path().join("unknown.json");
    std::fs::write(
        &unknown,
        r#"{"format":"nt.arch/v1","name":"u","input":[4],"nodes":[
            {"name":"a","op":"linear","in":4,"out":2,"activation":"gelu"}]}"#,
    )
    .unwrap();
    let err = resolve(unknown.to_str().unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("unknown field `activation`") && err.contains("`a`"),
        "{err}"
    );
    let missing = dir.path().join("missing.json");
    let err = resolve(missing.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn a_corrupt_checkpoint_is_an_error_not_a_panic() {
    let a = arch("mlp:hidden=8,depth=1");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    checkpoint::save(&good, &member(&a, 1)).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let err = checkpoint::load(&truncated).unwrap_err().to_string();
    assert!(err.contains("truncated.safetensors"), "{err}");
    // A header that claims more data than there is.
    let mut lying = bytes.clone();
    let header_len = u64::from_le_bytes(lying[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(lying[8..8 + header_len].to_vec()).unwrap();
    let patched = header.replacen("[8,784]", "[9,784]", 1);
    assert_ne!(patched, header);
    lying.splice(8..8 + header_len, patched.bytes());
    let err = checkpoint::load_bytes("lying", lying)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lying"), "{err}");
    let err = checkpoint::load(&dir.path().join("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
}

/// What a submission checks without downloading the data: the header and
/// the file's size.
fn check_header(bytes: &[u8], arch: &Architecture) -> fusion::Result<()> {
    let len = bytes.len() as u64;
    let n = checkpoint::header_len("m.safetensors", bytes, len)? as usize;
    checkpoint::validate_header("m.safetensors", &bytes[8..8 + n], len, arch)
}

#[test]
fn a_checkpoint_header_alone_shows_truncation_and_mismatches() {
    let a = arch("mlp:hidden=8,depth=1");
    let bytes = checkpoint::to_bytes(&member(&a, 1)).unwrap();
    check_header(&bytes, &a).unwrap();
    // Truncated or padded data.
    for bad in [
        &bytes[..bytes.len() - 4],
        &[bytes.as_slice(), &[0u8; 4]].concat()[..],
    ] {
        let err = check_header(bad, &a).unwrap_err().to_string();
        assert!(
            err.contains("m.safetensors") && err.contains("truncated or padded"),
            "{err}"
        );
    }
    // The shapes of another architecture, named as `validate` names them.
    let other = arch("mlp:hidden=16,depth=1");
    let err = check_header(&bytes, &other).unwrap_err().to_string();
    let full = checkpoint::validate(&member(&a, 1), &other, "m.safetensors")
        .unwrap_err()
        .to_string();
    assert_eq!(err, full);
    // A header that claims a bigger tensor than its byte range.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let patched = header.replacen("[8,784]", "[9,784]", 1);
    let mut lying = bytes.clone();
    lying.splice(8..8 + n, patched.bytes());
    let err = check_header(&lying, &a).unwrap_err().to_string();
    assert!(
        err.contains("m.safetensors: not a valid safetensors file") && err.contains("shape"),
        "{err}"
    );
    // Tensors that fit, recorded as another network: refused from the header.
    let lenet = arch("lenet");
    let recorded = checkpoint::to_bytes(&recorded_as_avgpool_lenet(&lenet, 3)).unwrap();
    let err = check_header(&recorded, &lenet).unwrap_err().to_string();
    assert!(
        err.contains("m.safetensors") && err.contains("records architecture `lenet-avgpool`"),
        "{err}"
    );
    // Not a safetensors file at all; a header length beyond the file; a zero one.
    for junk in [
        &b"hello"[..],
        &b"\xff\xff\xff\xff\x00\x00\x00\x00{}"[..],
        &[0u8; 16][..],
    ] {
        let err = check_header(junk, &a).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors file"), "{err}");
    }
}

#[test]
fn non_finite_weights_are_named() {
    let a = arch("mlp:hidden=4,depth=2");
    let m0 = member(&a, 1);
    let mut m1 = member(&a, 2);
    let mut w = m1.get("fc2.weight").unwrap().as_f32().unwrap().to_vec();
    w[3] = f32::NAN;
    m1.insert("fc2.weight", HostTensor::f32(vec![4, 4], w));
    let err = fuse(Method::Nt, &a, &[&m0, &m1], &FuseOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("member 1") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn the_guard_refuses_a_nonlinear_output() {
    // A ReLU after the last Linear: the wide model's logits are not the
    // members' mean, so the concatenation does not represent the ensemble.
    let mut spec = preset("mlp:hidden=6,depth=1").unwrap();
    spec.nodes.push(fusion::arch::NodeSpec {
        name: None,
        input: vec![],
        op: fusion::arch::Op::Relu {},
    });
    let a = Architecture::new(spec).unwrap();
    let (m0, m1) = (member(&a, 1), member(&a, 2));
    let err = fuse(Method::Nt, &a, &[&m0, &m1], &guarded()).err().unwrap();
    assert!(
        matches!(err, RuntimeError::Fusion(FusionError::Guard(_))),
        "{err}"
    );
    assert!(err.to_string().contains("mean logits"), "{err}");
    // Switched off, the same fusion goes through and says the guard did not run.
    let options = FuseOptions {
        guard: GuardMode::Off,
        ..Default::default()
    };
    let fused = fuse(Method::Nt, &a, &[&m0, &m1], &options).unwrap();
    assert!(!fused.report.guard.ran);
    assert_eq!(fused.report.guard.skipped.as_deref(), Some("switched off"));
}

#[test]
fn the_guard_refuses_a_wrongly_gathered_model() {
    let a = arch("lenet");
    let (m0, m1) = (member(&a, 1), member(&a, 2));
    let coupling = Coupling::derive(&a).unwrap();
    let selections = transplant::select(&a, &coupling, &[&m0, &m1]).unwrap();
    let mut fused = fusion::assemble::assemble(&a, &coupling, &[&m0, &m1], &selections).unwrap();
    let mut guard = Guard::new(GuardMode::Always, 1e-3);
    guard
        .check_step(&a, &coupling, &[&m0, &m1], Some((&selections, &fused)))
        .unwrap();
    // Swap two kept rows of the first conv: a mis-wired gather.
    let t = fused.get("feature.0.weight").unwrap();
    let mut w = t.as_f32().unwrap().to_vec();
    let row = 25;
    let (first, second) = w.split_at_mut(row);
    first.swap_with_slice(&mut second[..row]);
    fused.insert("feature.0.weight", HostTensor::f32(t.shape().to_vec(), w));
    let err = guard
        .check_step(&a, &coupling, &[&m0, &m1], Some((&selections, &fused)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dropped channels ignored"), "{err}");
}

#[test]
fn the_guard_skips_large_models_and_says_so() {
    let a = arch("mlp:hidden=64,depth=2");
    let (m0, m1) = (member(&a, 1), member(&a, 2));
    let options = FuseOptions {
        guard: GuardMode::Auto {
            max_wide_params: 1000,
        },
        ..Default::default()
    };
    let fused = fuse(Method::Nt, &a, &[&m0, &m1], &options).unwrap();
    assert!(!fused.report.guard.ran);
    let why = fused.report.guard.skipped.unwrap();
    assert!(why.contains("over the guard's limit of 1000"), "{why}");
    assert!(matches!(
        all_channels(&Coupling::derive(&a).unwrap(), 2)[0],
        Selection::Shared(1)
    ));
}
