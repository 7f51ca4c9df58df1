//! ntctl as a user runs it: the real binary against a real coordinator and
//! worker (processes on 127.0.0.1), and the embedded quick start.

// Each test holds the serial lock across its awaits on purpose: tests run
// on separate runtimes and must not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nt_proto::v1 as pb;
use nt_testkit::cluster::{serial, Cluster, StoreKind, CLIENT_TOKEN};

fn ntctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ntctl"));
    c.env_remove("NT_ENDPOINT")
        .env_remove("NT_TOKEN")
        .env_remove("NT_OUTPUT")
        .env_remove("NT_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent");
    c
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn connected(c: &Cluster) -> Command {
    let mut cmd = ntctl();
    cmd.args([
        "--endpoint",
        &format!("http://127.0.0.1:{}", c.port),
        "--token",
        CLIENT_TOKEN,
    ]);
    cmd
}

const SPEC: &str = r#"
name: cli-test
data: {dataset: fashion-mnist, train_subset: 3000, test_subset: 1000}
architecture: "mlp:hidden=64,depth=2"
members:
  count: 2
  training: {epochs: 2, batch_size: 128, lr: 0.05}
fusion: [nt, average]
fine_tuning:
  training: {epochs: 2, batch_size: 128}
"#;

fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    (
        u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_get_list_events_and_report_like_a_user() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::Local);
    c.start_server();
    c.start_worker("w1");
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, SPEC).unwrap();
    let plot = dir.path().join("curves.png");

    // Submit and follow to the end; overrides change the spec.
    let out = ok(connected(&c)
        .args([
            "submit",
            spec.to_str().unwrap(),
            "--wait",
            "--request-id",
            "cli-1",
        ])
        .args([
            "--set",
            "fine_tuning.training.epochs=1",
            "--name",
            "from-the-cli",
        ])
        .args(["--plot", plot.to_str().unwrap()]));
    assert!(out.contains("(from-the-cli): succeeded"), "{out}");
    for row in [
        "member 0",
        "member 1",
        "ensemble of 2 (mean logits)",
        "nt right after fusion",
        "nt after fine-tuning",
        "average after fine-tuning",
    ] {
        assert!(out.contains(row), "missing `{row}` in:\n{out}");
    }
    assert!(out.contains("fusion time: nt"), "{out}");
    assert_eq!(png_size(&plot), (960, 600));

    // The same request id gives the same run.
    let again = ok(connected(&c).args([
        "--output",
        "json",
        "submit",
        spec.to_str().unwrap(),
        "--request-id",
        "cli-1",
    ]));
    // JSON output is the proto3 JSON of the response message.
    let again: pb::SubmitRunResponse = serde_json::from_str(&again).unwrap();
    assert!(!again.created);
    let run_id = again.run.unwrap().run_id;

    // get, as text and JSON.
    let got = ok(connected(&c).args(["get", &run_id]));
    assert!(got.contains("nt after fine-tuning"), "{got}");
    let got = ok(connected(&c).args(["--output", "json", "get", &run_id]));
    let json: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(json["state"], "RUN_STATE_SUCCEEDED");
    assert_eq!(json["spec"]["fineTuning"]["training"]["epochs"], 1);
    let got: pb::Run = serde_json::from_str(&got).unwrap();
    assert_eq!(got.run_id, run_id);
    assert_eq!(got.report.unwrap().fused.len(), 2);

    // list, events.
    let list: serde_json::Value =
        serde_json::from_str(&ok(connected(&c).args(["--output", "json", "list"]))).unwrap();
    assert_eq!(list["runs"][0]["runId"], run_id.as_str());
    assert_eq!(list["runs"][0]["state"], "RUN_STATE_SUCCEEDED");
    let _: pb::ListRunsResponse = serde_json::from_value(list).unwrap();
    let events = ok(connected(&c).args(["events", &run_id]));
    assert!(events.contains("RUN_STATE_SUCCEEDED"), "{events}");
    let json_events = ok(connected(&c).args(["--output", "json", "events", &run_id]));
    let parsed: Vec<pb::RunEvent> = json_events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(parsed.len() > 10);
    assert!(parsed.windows(2).all(|w| w[0].sequence < w[1].sequence));

    // report in every format, and a plot of a chosen size.
    let md = ok(connected(&c).args(["report", &run_id, "--format", "markdown"]));
    assert!(md.contains("| nt after fine-tuning |"), "{md}");
    let csv = ok(connected(&c).args(["report", &run_id, "--format", "csv"]));
    assert_eq!(
        csv.lines().next(),
        Some("model,accuracy,loss,parameters,checkpoint")
    );
    assert_eq!(csv.lines().count(), 8);
    // The RunReport message, as report.json in the store.
    let rep: pb::RunReport = serde_json::from_str(&ok(
        connected(&c).args(["report", &run_id, "--format", "json"])
    ))
    .unwrap();
    assert_eq!(rep.fused.len(), 2);
    let small = dir.path().join("small.png");
    ok(connected(&c).args([
        "report",
        &run_id,
        "--plot",
        small.to_str().unwrap(),
        "--plot-size",
        "800x500",
    ]));
    assert_eq!(png_size(&small), (800, 500));

    // watch on a finished run prints the report and returns.
    let watched = ok(connected(&c).args(["watch", &run_id]));
    assert!(watched.contains("succeeded"), "{watched}");

    // A quality gate that is missed exits 3.
    let out = run(connected(&c).args([
        "submit",
        spec.to_str().unwrap(),
        "--wait",
        "--min-accuracy",
        "99.9",
    ]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("quality gate missed"),
        "{}",
        text(&out.stderr)
    );

    // The config file supplies the endpoint and token.
    let config = dir.path().join("ntctl.yaml");
    std::fs::write(
        &config,
        format!(
            "endpoint: http://127.0.0.1:{}\ntoken: {CLIENT_TOKEN}\n",
            c.port
        ),
    )
    .unwrap();
    let listed = ok(ntctl().env("NT_CONFIG", &config).args(["list"]));
    assert!(listed.contains(&run_id), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_get_clear_messages_and_a_non_zero_exit() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::Local);
    c.start_server();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, SPEC).unwrap();

    let nobody = nt_testkit::cluster::free_port();
    let out = run(ntctl().args(["--endpoint", &format!("http://127.0.0.1:{nobody}"), "list"]));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot reach the coordinator") && err.contains("NT_ENDPOINT"),
        "{err}"
    );

    let out = run(ntctl().args([
        "--endpoint",
        &format!("http://127.0.0.1:{}", c.port),
        "--token",
        "wrong",
        "list",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("Unauthenticated") && err.contains("--token"),
        "{err}"
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, SPEC.replace("fusion:", "fusoin:")).unwrap();
    let out = run(connected(&c).args(["submit", bad.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unknown field `fusoin`"),
        "{}",
        text(&out.stderr)
    );

    let out =
        run(connected(&c).args(["submit", spec.to_str().unwrap(), "--set", "members.count=1"]));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("members.count"),
        "{err}"
    );

    let out = run(connected(&c).args(["get", "run-missing"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("NotFound"),
        "{}",
        text(&out.stderr)
    );

    let out = run(ntctl().args(["submit", "/nonexistent/spec.yaml"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/spec.yaml"),
        "{}",
        text(&out.stderr)
    );
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The README's Python snippet, extracted from the README itself.
fn readme_snippet() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let marker = "<!-- tested: load-into-pytorch -->";
    let after = &readme[readme
        .find(marker)
        .expect("the README marks its tested snippet")..];
    let start = after.find("```python\n").unwrap() + "```python\n".len();
    let end = after[start..].find("```").unwrap();
    after[start..start + end].to_string()
}

fn python() -> PathBuf {
    let venv = std::env::var("NT_TORCH_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/nt/torch-2.11.0",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    Path::new(&venv).join("bin/python3")
}

/// The quick start's demo, as the README runs it (`ntctl run
/// examples/fashion-mlp.yaml --local`), then the README's PyTorch snippet
/// on the fine-tuned NT model: same accuracy as nt's own evaluation.
#[test]
fn the_quick_start_demo_beats_the_best_member_and_loads_into_pytorch() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("demo.png");
    let out = run(ntctl()
        .current_dir(dir.path())
        .args([
            "run",
            repo().join("examples/fashion-mlp.yaml").to_str().unwrap(),
            "--local",
        ])
        .args(["--plot", plot.to_str().unwrap()]));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("nt after fine-tuning: ") && stdout.contains("at or above the best member"),
        "NT after fine-tuning should match or beat the best member:\n{stdout}"
    );
    assert_eq!(png_size(&plot), (960, 600));

    // The fine-tuned NT model, and its accuracy as nt evaluated it.
    let runs = dir.path().join("nt-data/runs");
    let run_dir = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // report.json is the proto3 JSON of the RunReport message.
    let report: pb::RunReport =
        serde_json::from_slice(&std::fs::read(run_dir.join("report.json")).unwrap()).unwrap();
    let nt_accuracy = report.fused[0].after_fine_tuning.as_ref().unwrap().accuracy;
    let checkpoint = run_dir.join("fine-tuned/nt.safetensors");
    let script = dir.path().join("snippet.py");
    std::fs::write(&script, readme_snippet()).unwrap();
    let py = run(Command::new(python()).arg(&script).arg(&checkpoint));
    let printed = text(&py.stdout);
    assert!(py.status.success(), "{printed}\n{}", text(&py.stderr));
    let accuracy: f64 = printed
        .trim()
        .strip_prefix("accuracy ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {printed}"));
    assert!(
        (accuracy - nt_accuracy).abs() < 5e-4,
        "PyTorch {accuracy} vs nt {nt_accuracy} on the same 10,000 test images"
    );
}

/// A run small enough to take about a second on one CPU thread: two MLPs on
/// 256 synthetic 8x8 images, which they learn in three epochs.
const SYNTHETIC_SPEC: &str = r#"
name: cli-synthetic
data: {dataset: synthetic, synthetic: {train: 256, test: 64, classes: 10, shape: [1, 8, 8], noise: 0.3}}
architecture: "mlp:input=1x8x8,hidden=32,depth=2"
members:
  count: 2
  training: {epochs: 3, batch_size: 32, lr: 0.05}
fusion: [nt, ot, average]
fine_tuning:
  training: {epochs: 2, batch_size: 32, lr: 0.05}
"#;

const SYNTHETIC_DATA: &str = "synthetic:shape=1x8x8,train=256,test=64,classes=10,noise=0.3";
const SMALL_MLP: &str = "mlp:input=1x8x8,hidden=32,depth=2";

/// ntctl for the offline verbs, in `dir`, on one CPU thread whatever the
/// environment says.
fn offline(dir: &Path) -> Command {
    let mut c = ntctl();
    c.current_dir(dir)
        .env_remove("NT_DATA")
        .env_remove("NT_DEVICE")
        .env("NT_THREADS", "1");
    c
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// A failing command's exit code and stderr.
fn fails(cmd: &mut Command) -> (Option<i32>, String) {
    let out = run(cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} should fail:\n{}",
        text(&out.stdout)
    );
    (out.status.code(), text(&out.stderr))
}

#[test]
fn offline_train_fuse_eval_and_arch_like_a_user() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Two members, different seeds.
    for (seed, file) in [("1", "m0.safetensors"), ("2", "m1.safetensors")] {
        let out = ok(offline(d)
            .args(["train", "--arch", SMALL_MLP, "--data", SYNTHETIC_DATA])
            .args(["--device", "cpu", "--epochs", "3", "--batch-size", "32"])
            .args(["--lr", "0.05", "--seed", seed, "-o", file]));
        assert!(
            out.contains("test accuracy") && out.contains(&format!("-> {file}")),
            "{out}"
        );
    }
    assert_ne!(
        std::fs::read(d.join("m0.safetensors")).unwrap(),
        std::fs::read(d.join("m1.safetensors")).unwrap(),
        "different seeds give different members"
    );

    // fuse: a table of the channels each layer kept from each member.
    let out = ok(offline(d).args([
        "fuse",
        "--method",
        "nt",
        "-o",
        "fused.safetensors",
        "m0.safetensors",
        "m1.safetensors",
    ]));
    assert!(d.join("fused.safetensors").is_file());
    assert!(
        out.contains("fused 2 members with nt") && out.contains("-> fused.safetensors"),
        "{out}"
    );
    assert!(out.contains("exactness guard: passed"), "{out}");
    let mut lines = out
        .lines()
        .skip_while(|l| *l != "channels each group kept from each member:")
        .skip(1);
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["group", "width", "m0.safetensors", "m1.safetensors"],
        "{out}"
    );
    let mut table = Vec::new();
    for line in lines {
        // `fc1  32  17 (53.1%)  15 (46.9%)`
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells.len(), 6, "{line}");
        let width: u64 = cells[1].parse().unwrap();
        let kept: Vec<u64> = [cells[2], cells[4]]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(width, 32, "{line}");
        assert_eq!(kept.iter().sum::<u64>(), width, "{line}");
        assert!(
            cells[3].ends_with("%)") && cells[5].ends_with("%)"),
            "{line}"
        );
        table.push((cells[0].to_string(), width, kept));
    }
    let groups: Vec<&str> = table.iter().map(|(g, _, _)| g.as_str()).collect();
    assert_eq!(groups, ["fc1", "fc2"], "{out}");

    // OT, the paper's baseline, fuses the same members.
    let out = ok(offline(d).args([
        "fuse",
        "--method",
        "ot",
        "-o",
        "ot.safetensors",
        "m0.safetensors",
        "m1.safetensors",
    ]));
    assert!(
        out.contains("fused 2 members with ot") && out.contains("-> ot.safetensors"),
        "{out}"
    );

    // The same fusion as JSON: the same channels.
    let fused = json(&ok(offline(d).args([
        "--output",
        "json",
        "fuse",
        "--method",
        "nt",
        "-o",
        "fused-again.safetensors",
        "m0.safetensors",
        "m1.safetensors",
    ])));
    assert_eq!(fused["output"], "fused-again.safetensors");
    assert_eq!(
        fused["member_files"],
        serde_json::json!(["m0.safetensors", "m1.safetensors"])
    );
    assert_eq!(fused["method"], "nt");
    assert_eq!(fused["members"], 2);
    assert_eq!(fused["guard"]["ran"], true);
    let json_table: Vec<(String, u64, Vec<u64>)> = fused["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["layers"].as_str().unwrap().to_string(),
                g["width"].as_u64().unwrap(),
                g["kept_per_member"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_u64().unwrap())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(json_table, table);

    // eval: each member, then their ensemble.
    let out = ok(offline(d)
        .args(["eval", "--data", SYNTHETIC_DATA, "--device", "cpu"])
        .args(["m0.safetensors", "m1.safetensors"]));
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["model", "accuracy", "loss", "parameters"],
        "{out}"
    );
    assert_eq!(rows[1][0], "m0.safetensors", "{out}");
    assert_eq!(rows[2][0], "m1.safetensors", "{out}");
    assert_eq!(rows[3][..3], ["ensemble", "(mean", "logits)"], "{out}");
    let params = |row: &[&str]| -> u64 { row.last().unwrap().parse().unwrap() };
    assert_eq!(
        params(&rows[3]),
        params(&rows[1]) + params(&rows[2]),
        "{out}"
    );
    assert!(out.contains("on 64 test images"), "{out}");

    let eval = json(&ok(offline(d)
        .args(["--output", "json", "eval"])
        .args(["--data", SYNTHETIC_DATA, "--device", "cpu"])
        .args(["m0.safetensors", "m1.safetensors", "fused.safetensors"])));
    let models = eval["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    assert_eq!(models[2]["model"], "fused.safetensors");
    for m in models {
        assert_eq!(m["arch"], "mlp");
        assert_eq!(m["samples"], 64);
        assert!(
            (0.0..=1.0).contains(&m["accuracy"].as_f64().unwrap()),
            "{m}"
        );
    }
    assert_eq!(eval["ensemble"]["samples"], 64);
    // One model: no ensemble.
    let single = json(&ok(offline(d)
        .args(["--output", "json", "eval"])
        .args(["--data", SYNTHETIC_DATA, "--device", "cpu"])
        .arg("fused.safetensors")));
    assert!(single.get("ensemble").is_none(), "{single}");

    // arch list and show.
    let list = ok(offline(d).args(["arch", "list"]));
    let names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for preset in ["mlp", "lenet", "resnet18"] {
        assert!(names.contains(&preset), "{preset} missing from:\n{list}");
    }
    let mlp = json(&ok(
        offline(d).args(["--output", "json", "arch", "show", "mlp"])
    ));
    assert_eq!(mlp["format"], "nt.arch/v1");
    assert_eq!(mlp["name"], "mlp");
    assert_eq!(mlp["input"], serde_json::json!([1, 28, 28]));
    assert!(!mlp["nodes"].as_array().unwrap().is_empty());

    // Mistakes: one member, an unknown preset, an unknown method.
    let (code, err) = fails(offline(d).args(["fuse", "-o", "one.safetensors", "m0.safetensors"]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("fusion needs at least 2 member checkpoints, got 1"),
        "{err}"
    );
    assert!(!d.join("one.safetensors").exists());
    let (code, err) = fails(offline(d).args([
        "fuse",
        "--arch",
        "nosuch",
        "-o",
        "bad.safetensors",
        "m0.safetensors",
        "m1.safetensors",
    ]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("unknown architecture preset `nosuch`") && err.contains("mlp, lenet"),
        "{err}"
    );
    assert!(!d.join("bad.safetensors").exists());
    let (code, err) = fails(offline(d).args([
        "fuse",
        "--arch",
        "mlp",
        "-o",
        "bad.safetensors",
        "m0.safetensors",
        "m1.safetensors",
    ]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("m0.safetensors") && err.contains("fc1.weight"),
        "{err}"
    );
    let (_, err) = fails(offline(d).args([
        "fuse",
        "--method",
        "bogus",
        "-o",
        "bad.safetensors",
        "m0.safetensors",
        "m1.safetensors",
    ]));
    assert!(err.contains("unknown fusion method `bogus`"), "{err}");
    let (code, err) = fails(offline(d).args([
        "train",
        "--arch",
        "nosuch",
        "--data",
        SYNTHETIC_DATA,
        "-o",
        "bad.safetensors",
    ]));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("unknown architecture preset `nosuch`"),
        "{err}"
    );
    assert!(!d.join("bad.safetensors").exists());
}

/// A cluster with one worker and the synthetic spec written to its folder.
fn synthetic_cluster() -> (Cluster, PathBuf) {
    let mut c = Cluster::new(StoreKind::Local);
    c.start_server();
    c.start_worker("w1");
    let spec = c.dir.path().join("synthetic.yaml");
    std::fs::write(&spec, SYNTHETIC_SPEC).unwrap();
    (c, spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_while_waiting_end_with_the_finished_run() {
    let _serial = serial();
    let (c, spec) = synthetic_cluster();
    let out = ok(connected(&c).args([
        "--output",
        "json",
        "submit",
        spec.to_str().unwrap(),
        "--wait",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() > 10, "{out}");
    let (last, events) = lines.split_last().unwrap();
    // Every line before the last is an event (a sequence number, which
    // proto3 JSON writes as a string), in order.
    assert!(
        events.iter().all(|e| json(e)["sequence"].is_string()),
        "{out}"
    );
    let events: Vec<pb::RunEvent> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(events.windows(2).all(|w| w[0].sequence < w[1].sequence));
    // The last is the finished run.
    let run: pb::Run = serde_json::from_str(last).unwrap();
    let run_id = run.run_id.as_str();
    assert!(run_id.starts_with("run-"), "{last}");
    assert_eq!(run.state(), pb::RunState::Succeeded, "{last}");
    assert_eq!(json(last)["state"], "RUN_STATE_SUCCEEDED");
    // NT, OT and averaging, in the spec's order.
    let fused: Vec<_> = run
        .report
        .as_ref()
        .unwrap()
        .fused
        .iter()
        .map(|f| f.method())
        .collect();
    assert_eq!(
        fused,
        [
            pb::FusionMethod::Nt,
            pb::FusionMethod::Ot,
            pb::FusionMethod::Average
        ],
        "{last}"
    );
    assert!(events.iter().all(|e| e.run_id == run_id), "{out}");
    // The same run as `get` shows it.
    let got = json(&ok(connected(&c).args(["--output", "json", "get", run_id])));
    assert_eq!(got, json(last));
}

/// A command running in the background, its output going to files (a
/// pipe nobody reads would block it).
struct Background {
    child: std::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

fn background(cmd: &mut Command, dir: &Path, name: &str) -> Background {
    let stdout = dir.join(format!("{name}.out"));
    let stderr = dir.join(format!("{name}.err"));
    let child = cmd
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    Background {
        child,
        stdout,
        stderr,
    }
}

impl Background {
    /// Waits for the exit, failing after `secs` seconds: the exit code, stdout and stderr.
    fn exit(mut self, secs: u64, c: &Cluster) -> (Option<i32>, String, String) {
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if start.elapsed() > std::time::Duration::from_secs(secs) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let (out, err) = (read(&self.stdout), read(&self.stderr));
        let Some(status) = status else {
            panic!(
                "{} did not exit in {secs} s:\n{out}\n{err}\n{}",
                self.stdout.display(),
                c.logs()
            );
        };
        (status.code(), out, err)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_run_ends_its_watchers_with_exit_2() {
    let _serial = serial();
    let (c, spec) = synthetic_cluster();
    let spec = spec.to_str().unwrap();
    // Far more epochs than the test waits for.
    let long = ["--epochs", "100000", "--request-id", "cli-cancel"];
    let submitted = json(&ok(connected(&c)
        .args(["--output", "json", "submit", spec])
        .args(long)));
    let run_id = submitted["run"]["runId"].as_str().unwrap().to_string();

    // Two followers: `watch`, and `submit --wait` of the same request id.
    let dir = tempfile::tempdir().unwrap();
    let watch = background(connected(&c).args(["watch", &run_id]), dir.path(), "watch");
    let waiter = background(
        connected(&c)
            .args(["--output", "json", "submit", spec, "--wait"])
            .args(long),
        dir.path(),
        "submit-wait",
    );

    // Wait until a member is training on the worker and has written an
    // epoch state: the run is really running.
    let start = std::time::Instant::now();
    loop {
        let got = json(&ok(connected(&c).args(["--output", "json", "get", &run_id])));
        let busy = got["tasks"].as_array().unwrap().iter().any(|t| {
            t["state"] == "TASK_STATE_RUNNING"
                && !t["checkpoint"].as_str().unwrap_or_default().is_empty()
        });
        if got["state"] == "RUN_STATE_TRAINING" && busy {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the run did not start training: {got}\n{}",
            c.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let out = ok(connected(&c).args(["cancel", &run_id, "--reason", "enough from the test"]));
    assert_eq!(out.trim(), format!("cancelled run {run_id}"));

    let (code, _, err) = watch.exit(60, &c);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("run {run_id} was cancelled"))
            && err.contains("enough from the test"),
        "{err}"
    );
    let (code, out, err) = waiter.exit(60, &c);
    assert_eq!(code, Some(2), "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(json).collect();
    let last = lines.last().unwrap();
    assert_eq!(last["runId"], run_id.as_str());
    assert_eq!(last["state"], "RUN_STATE_CANCELLED", "{last}");
    assert!(err.contains("was cancelled"), "{err}");

    // get and list show it cancelled; a second cancel is refused.
    let got = ok(connected(&c).args(["get", &run_id]));
    assert!(got.contains("cancelled"), "{got}");
    let got = json(&ok(connected(&c).args(["--output", "json", "get", &run_id])));
    assert_eq!(got["state"], "RUN_STATE_CANCELLED", "{got}");
    assert_eq!(got["message"], "enough from the test");
    let list = json(&ok(connected(&c).args([
        "--output",
        "json",
        "list",
        "--state",
        "cancelled",
    ])));
    assert_eq!(list["runs"][0]["runId"], run_id.as_str());
    assert_eq!(list["runs"][0]["state"], "RUN_STATE_CANCELLED");
    let (code, err) = fails(connected(&c).args(["cancel", &run_id]));
    assert_eq!(code, Some(1));
    assert!(err.contains("already cancelled"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_beat_members_gate_passes_and_misses() {
    let _serial = serial();
    let (c, spec) = synthetic_cluster();
    let spec = spec.to_str().unwrap();

    // NT fine-tuned for three epochs learns the synthetic classes perfectly:
    // at or above any member.
    let out = ok(connected(&c)
        .args(["submit", spec, "--wait", "--beat-members"])
        .args(["--fine-tune-epochs", "3"]));
    assert!(
        out.contains("nt after fine-tuning: 100.00 %, at or above the best member"),
        "{out}"
    );

    // Weight averaging of independently trained members, hardly fine-tuned
    // (lr 1e-9), stays far below the best member: the gate exits 3.
    let out = run(connected(&c)
        .args(["submit", spec, "--wait", "--beat-members"])
        .args(["--fusion", "average", "--fine-tune-epochs", "1"])
        .args(["--set", "fine_tuning.training.lr=1e-9"]));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("average after fine-tuning") && stdout.contains("below the best member"),
        "{stdout}"
    );
    assert!(
        stderr.contains("quality gate missed: accuracy after fine-tuning")
            && stderr.contains("< best member"),
        "{stderr}"
    );
}

/// Polls `cond` every 50 ms for up to `secs` seconds.
fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[test]
fn ctrl_c_cancels_a_local_run_and_exits_at_once() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("spec.yaml"), SYNTHETIC_SPEC).unwrap();
    let mut job = background(
        offline(d).args([
            "run",
            "spec.yaml",
            "--local",
            "--store",
            "store",
            "--epochs",
            "100000",
        ]),
        d,
        "local",
    );
    // Progress goes to stderr.
    let progress = d.join("local.err");
    assert!(
        eventually(120, || std::fs::read_to_string(&progress)
            .unwrap_or_default()
            .contains("epoch 2/")),
        "no training progress: {}",
        std::fs::read_to_string(&progress).unwrap_or_default()
    );
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(job.child.id() as i32, libc::SIGINT);
    }
    // It used to take minutes: the worker retried against the stopped coordinator.
    let exited = eventually(20, || job.child.try_wait().unwrap().is_some());
    if !exited {
        let _ = job.child.kill();
    }
    let err = std::fs::read_to_string(d.join("local.err")).unwrap();
    assert!(exited, "still running 20 s after Ctrl-C:\n{err}");
    assert_eq!(job.child.wait().unwrap().code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted") && err.contains("cancelled"),
        "{err}"
    );
    // Without a request id the run is cancelled, not left to resume beside the next one.
    let doc = std::fs::read_dir(d.join("store/runs"))
        .unwrap()
        .map(|e| e.unwrap().path().join("run.json"))
        .find(|p| p.exists())
        .expect("a run document");
    let doc = json(&std::fs::read_to_string(doc).unwrap());
    assert_eq!(doc["state"], "RUN_STATE_CANCELLED", "{doc}");
}
