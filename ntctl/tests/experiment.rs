//! `ntctl experiment --local` as a user runs it: the real binary with its
//! embedded coordinator and worker, repeating a comparison spec over seeds
//! and member counts on a small synthetic data set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use nt_proto::v1 as pb;
use nt_testkit::cluster::serial;

const SPEC: &str = r#"
name: compare-synthetic
data: {dataset: synthetic, synthetic: {train: 256, test: 64, classes: 10, shape: [1, 8, 8], noise: 0.3}}
architecture: "mlp:input=1x8x8,hidden=32,depth=2"
members:
  count: 2
  training: {epochs: 2, batch_size: 32, lr: 0.05}
fusion: [nt, ot, average]
fine_tuning:
  training: {epochs: 2, batch_size: 32, lr: 0.05}
compare: {distillation: true, baseline: true}
"#;

fn ntctl(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ntctl"));
    c.current_dir(dir)
        .env_remove("NT_ENDPOINT")
        .env_remove("NT_TOKEN")
        .env_remove("NT_OUTPUT")
        .env_remove("NT_CONFIG")
        .env_remove("NT_DEVICE")
        .env("NT_THREADS", "1")
        .env("XDG_CONFIG_HOME", "/nonexistent");
    c
}

fn output(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

fn experiment(dir: &Path, extra: &[&str]) -> (Output, String, String) {
    output(
        ntctl(dir)
            .args([
                "experiment",
                "spec.yaml",
                "--local",
                "--store",
                "store",
                "--seeds",
                "1,2",
                "--members",
                "3,2",
                "--out",
                "out",
            ])
            .args(extra),
    )
}

/// A saved run: the proto3 JSON of the `Run` message.
fn saved_run(dir: &Path, name: &str) -> pb::Run {
    let text = std::fs::read_to_string(dir.join("out/runs").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn an_experiment_repeats_the_comparison_and_aggregates_it_over_seeds() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("spec.yaml"), SPEC).unwrap();

    let (out, stdout, stderr) = experiment(d, &[]);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for heading in ["K = 2, 2 seed(s)", "K = 3, 2 seed(s)"] {
        assert!(stdout.contains(heading), "{heading}:\n{stdout}");
    }
    for row in [
        "| best member |",
        "| ensemble (mean logits) |",
        "| nt |",
        "| nt (distilled) |",
        "| ot |",
        "| ot (distilled) |",
        "| average |",
        "| average (distilled) |",
        "| baseline |",
    ] {
        assert!(stdout.contains(row), "{row}:\n{stdout}");
    }
    let md = std::fs::read_to_string(d.join("out/summary.md")).unwrap();
    assert!(stdout.starts_with(&md), "{md}\n---\n{stdout}");
    let png = std::fs::read(d.join("out/curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 2 * 640, "one panel per member count");

    // The smaller count fuses the first members of the larger one.
    for seed in [1, 2] {
        let three = saved_run(d, &format!("K3-seed{seed}.json"));
        let two = saved_run(d, &format!("K2-seed{seed}.json"));
        let keys = |run: &pb::Run| -> Vec<String> {
            let report = run.report.as_ref().unwrap();
            report
                .members
                .iter()
                .map(|m| m.checkpoint.clone())
                .collect()
        };
        assert_eq!(keys(&three).len(), 3);
        assert_eq!(keys(&two), keys(&three)[..2]);
        let spec = three.spec.as_ref().unwrap();
        assert_eq!(spec.members.as_ref().unwrap().seeds[0], seed * 1000);
        // Each run measured its fusions' memory and fine-tuned every variant.
        let report = three.report.as_ref().unwrap();
        for f in &report.fused {
            assert!(f.fusion_peak_bytes > 0, "{f:?}");
            let distilled = f.after_distilled_fine_tuning.as_ref().unwrap();
            assert!(distilled.accuracy > 0.0, "{f:?}");
        }
        assert!(report.baseline.as_ref().unwrap().accuracy > 0.0);
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["groups"][0]["members"], 2);
    assert_eq!(summary["groups"][0]["seeds"], 2);
    let runs_in_store = || std::fs::read_dir(d.join("store/runs")).unwrap().count();
    assert_eq!(runs_in_store(), 4);

    // Again: every run is reused, nothing is submitted, the summary is the same.
    let (out, stdout_again, stderr) = experiment(d, &["--output", "json"]);
    assert!(out.status.success(), "{stdout_again}\n{stderr}");
    assert_eq!(runs_in_store(), 4, "no run was submitted again");
    let last: serde_json::Value =
        serde_json::from_str(stdout_again.lines().last().unwrap()).unwrap();
    assert_eq!(last, summary);

    // Bad input is refused before anything runs.
    let (out, _, stderr) = experiment(d, &["--members", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("between 2 and 64"), "{stderr}");
}
