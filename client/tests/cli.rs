//! ntctl as a user runs it: the real binary against a real coordinator and
//! worker (processes on 127.0.0.1), and the embedded quick start.

// Each test holds the serial lock across its awaits on purpose: tests run
// on separate runtimes and must not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["created"], false);
    let run_id = again["run"]["run_id"].as_str().unwrap().to_string();

    // get, as text and JSON.
    let got = ok(connected(&c).args(["get", &run_id]));
    assert!(got.contains("nt after fine-tuning"), "{got}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(connected(&c).args(["--output", "json", "get", &run_id])))
            .unwrap();
    assert_eq!(json["state"], 6, "RUN_STATE_SUCCEEDED");
    assert_eq!(json["report"]["fused"].as_array().unwrap().len(), 2);
    assert_eq!(json["spec"]["fine_tuning"]["training"]["epochs"], 1);

    // list, events.
    let list: serde_json::Value =
        serde_json::from_str(&ok(connected(&c).args(["--output", "json", "list"]))).unwrap();
    assert_eq!(list["runs"][0]["run_id"], run_id.as_str());
    assert_eq!(list["runs"][0]["state"], "succeeded");
    let events = ok(connected(&c).args(["events", &run_id]));
    assert!(events.contains("RUN_STATE_SUCCEEDED"), "{events}");
    let json_events = ok(connected(&c).args(["--output", "json", "events", &run_id]));
    let parsed: Vec<serde_json::Value> = json_events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(parsed.len() > 10);
    assert!(parsed
        .windows(2)
        .all(|w| w[0]["sequence"].as_u64() < w[1]["sequence"].as_u64()));

    // report in every format, and a plot of a chosen size.
    let md = ok(connected(&c).args(["report", &run_id, "--format", "markdown"]));
    assert!(md.contains("| nt after fine-tuning |"), "{md}");
    let csv = ok(connected(&c).args(["report", &run_id, "--format", "csv"]));
    assert_eq!(
        csv.lines().next(),
        Some("model,accuracy,loss,parameters,checkpoint")
    );
    assert_eq!(csv.lines().count(), 8);
    let rep: serde_json::Value = serde_json::from_str(&ok(
        connected(&c).args(["report", &run_id, "--format", "json"])
    ))
    .unwrap();
    assert_eq!(rep["rows"].as_array().unwrap().len(), 7);
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
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("report.json")).unwrap()).unwrap();
    let nt_accuracy = report["fused"][0]["after_fine_tuning"]["accuracy"]
        .as_f64()
        .unwrap();
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
