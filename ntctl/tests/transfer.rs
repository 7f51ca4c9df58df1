//! Checkpoints through the service as a user moves them: `ntctl upload`,
//! `ntctl submit` of a spec whose members are local files (uploaded first),
//! and `ntctl download` of the models and the report, with the real binary
//! against a real coordinator and worker on 127.0.0.1.

// The test holds the serial lock across its awaits on purpose: tests run
// on separate runtimes and must not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use std::path::Path;
use std::process::{Command, Output};

use fusion::arch::{preset, Architecture};
use fusion::checkpoint;
use nt_common::layout;
use nt_proto::v1 as pb;
use nt_testkit::cluster::{serial, Cluster, StoreKind, CLIENT_TOKEN};

const ARCH: &str = "mlp:hidden=16,depth=1";

fn ntctl(c: &Cluster, dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ntctl"));
    cmd.current_dir(dir)
        .env_remove("NT_ENDPOINT")
        .env_remove("NT_TOKEN")
        .env_remove("NT_OUTPUT")
        .env_remove("NT_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .args(["--endpoint", &format!("http://127.0.0.1:{}", c.port)])
        .args(["--token", CLIENT_TOKEN]);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// stdout and stderr of a command that must succeed.
fn ok(cmd: &mut Command) -> (String, String) {
    let out = run(cmd);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

fn member(seed: u64) -> Vec<u8> {
    let arch = Architecture::new(preset(ARCH).unwrap()).unwrap();
    let net = nt_runtime::model::Network::init(&arch, tch::Device::Cpu, seed).unwrap();
    checkpoint::to_bytes(&net.to_state().unwrap()).unwrap()
}

const SPEC: &str = r#"
name: local-members
data: {dataset: synthetic, synthetic: {train: 256, test: 128}}
architecture: "mlp:hidden=16,depth=1"
members: {checkpoints: [m0.safetensors, m1.safetensors]}
fusion: [nt]
fine_tuning: {training: {epochs: 1, batch_size: 64}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_uploads_local_members_and_download_writes_the_stored_bytes() {
    let _serial = serial();
    let mut c = Cluster::new(StoreKind::Local);
    c.start_server();
    c.start_worker("w1");
    let storage = c.storage();
    let dir = tempfile::tempdir().unwrap();
    let members = [member(1), member(2)];
    for (i, bytes) in members.iter().enumerate() {
        std::fs::write(dir.path().join(format!("m{i}.safetensors")), bytes).unwrap();
    }
    std::fs::write(dir.path().join("spec.yaml"), SPEC).unwrap();

    // `upload` prints each key beside its file.
    let (out, err) = ok(ntctl(&c, dir.path()).args(["upload", "m0.safetensors", "--arch", ARCH]));
    let key0 = out.split_whitespace().next().unwrap().to_string();
    assert!(key0.starts_with("uploads/sha256/"), "{out}");
    assert!(out.trim_end().ends_with("m0.safetensors"), "{out}");
    assert!(
        err.contains(&format!("uploaded m0.safetensors as {key0}")),
        "{err}"
    );
    let (held, _) = storage.get(&key0).await.unwrap().unwrap();
    assert_eq!(held.as_ref(), members[0].as_slice());

    // `submit` uploads the local members (m0 again: the same key) and runs
    // the spec with their keys.
    let (out, err) = ok(ntctl(&c, dir.path()).args(["submit", "spec.yaml", "--wait"]));
    assert!(out.contains("succeeded"), "{out}\n{err}");
    assert!(err.contains("the store held these bytes already"), "{err}");
    let run_id = err
        .split_whitespace()
        .find(|w| w.starts_with("run-"))
        .unwrap_or_else(|| panic!("no run id in:\n{err}"))
        .to_string();
    let stored_run = c
        .client()
        .await
        .get_run(pb::GetRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let keys = stored_run.spec.unwrap().members.unwrap().checkpoints;
    assert_eq!(keys[0], key0);
    assert!(keys[1].starts_with("uploads/sha256/"), "{keys:?}");

    // `download`: the first method after fine-tuning into ./<run id>, the
    // report into -o, and --model all.
    let (out, _) = ok(ntctl(&c, dir.path()).args(["download", &run_id]));
    let tuned = dir.path().join(&run_id).join("fine-tuned-nt.safetensors");
    assert!(
        out.contains(&tuned.file_name().unwrap().to_string_lossy().to_string()),
        "{out}"
    );
    let (held, _) = storage
        .get(&layout::fine_tuned(&run_id, "nt"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(std::fs::read(&tuned).unwrap(), held.as_ref());
    ok(ntctl(&c, dir.path()).args(["download", &run_id, "--model", "report", "-o", "out"]));
    let (held, _) = storage
        .get(&layout::report(&run_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("out/report.json")).unwrap(),
        held.as_ref()
    );
    ok(ntctl(&c, dir.path()).args(["download", &run_id, "--model", "all", "-o", "all"]));
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("all"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "fine-tuned-nt.safetensors",
            "fused-nt.safetensors",
            "member-0.safetensors",
            "member-1.safetensors",
            "report.json"
        ]
    );
    assert_eq!(
        std::fs::read(dir.path().join("all/member-1.safetensors")).unwrap(),
        members[1]
    );

    // Mistakes exit 1 with the service's reason.
    let out = run(ntctl(&c, dir.path()).args(["download", "run-nope"]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NotFound") && err.contains("run-nope"),
        "{err}"
    );
    let out = run(ntctl(&c, dir.path()).args(["upload", "spec.yaml"]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("spec.yaml"),
        "{err}"
    );
}
