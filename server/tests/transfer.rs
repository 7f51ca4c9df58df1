//! Checkpoints through the service, against the real stack on 127.0.0.1 (a
//! SeaweedFS S3 server, `nt-server`, one `nt-worker`): members uploaded
//! with `UploadCheckpoint` are fused by a run that names the returned keys,
//! and its models and report download byte for byte; bad uploads (a
//! truncated file, a wrong shape, too many bytes, an oversized message, a
//! stream cut off) are refused with a clear code and leave nothing under
//! `uploads/` and no temporary file; downloads of unknown runs, unproduced
//! models and malformed names are refused; a wrong token is refused by both.

// Each test holds the serial lock across its awaits on purpose: tests run
// on separate runtimes and must not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::await_holding_lock)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fusion::arch::{preset, Architecture};
use fusion::checkpoint;
use nt_client::transfer::{download, upload_file, UploadOptions};
use nt_common::layout;
use nt_proto::tonic::{Code, Status};
use nt_proto::v1 as pb;
use nt_testkit::cluster::{is_final, serial, state, submit, Cluster, RunClient, StoreKind};
use pb::upload_checkpoint_request::Part;
use sha2::{Digest, Sha256};

const ARCH: &str = "mlp:hidden=16,depth=1";

fn architecture(name: &str) -> pb::Architecture {
    pb::Architecture {
        kind: Some(pb::architecture::Kind::Preset(name.into())),
    }
}

/// A freshly initialised member of `arch`, as safetensors bytes.
fn member(arch: &str, seed: u64) -> Vec<u8> {
    let arch = Architecture::new(preset(arch).unwrap()).unwrap();
    let net = nt_runtime::model::Network::init(&arch, tch::Device::Cpu, seed).unwrap();
    checkpoint::to_bytes(&net.to_state().unwrap()).unwrap()
}

/// A safetensors file of one f32 tensor of `n` values (no architecture).
fn big_file(n: usize) -> Vec<u8> {
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
        4 * n
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend((0..4 * n).map(|i| (i % 251) as u8));
    out
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A cluster whose coordinator keeps upload temporary files in its own folder.
fn cluster(extra: &[&str]) -> (Cluster, PathBuf) {
    let mut c = Cluster::new(StoreKind::S3);
    let uploads = c.dir.path().join("upload-tmp");
    c.server_args
        .push(format!("--upload-dir={}", uploads.display()));
    c.server_args.extend(extra.iter().map(|s| s.to_string()));
    c.start_server();
    (c, uploads)
}

/// A fuse-existing run of `keys` with NT on a small synthetic set,
/// fine-tuned for one epoch.
fn spec(keys: &[&str]) -> pb::RunSpec {
    let yaml = format!(
        r#"
name: transfer
data: {{dataset: synthetic, synthetic: {{train: 256, test: 128}}}}
architecture: "{ARCH}"
members: {{checkpoints: {keys:?}}}
fusion: [nt]
fine_tuning: {{training: {{epochs: 1, batch_size: 64}}}}
"#
    );
    nt_spec::RunSpecFile::from_yaml(&yaml)
        .unwrap()
        .to_proto(Path::new("."))
        .unwrap()
}

/// Sends an upload message by message: the header, then `data` in `chunk`s.
async fn raw_upload(
    client: &mut RunClient,
    header: pb::UploadHeader,
    data: &[u8],
    chunk: usize,
) -> Result<pb::UploadCheckpointResponse, Status> {
    let mut messages = vec![pb::UploadCheckpointRequest {
        part: Some(Part::Header(header)),
    }];
    messages.extend(data.chunks(chunk).map(|c| pb::UploadCheckpointRequest {
        part: Some(Part::Data(c.to_vec())),
    }));
    client
        .upload_checkpoint(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

fn header(size: usize, sha: &str, arch: Option<&str>) -> pb::UploadHeader {
    pb::UploadHeader {
        file_name: "m.safetensors".into(),
        size: size as u64,
        architecture: arch.map(architecture),
        sha256: sha.into(),
    }
}

/// Keys under `uploads/`.
async fn uploads(c: &Cluster) -> Vec<String> {
    c.objects()
        .await
        .into_iter()
        .filter(|k| k.starts_with("uploads/"))
        .collect()
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The coordinator's log.
fn server_log(c: &Cluster) -> PathBuf {
    temp_files(c.dir.path())
        .into_iter()
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("server-") && name.ends_with(".log")
        })
        .expect("the coordinator's log")
}

/// Uploads the coordinator's log says it refused.
fn refusals(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.matches("upload refused").count()
}

/// Multipart uploads the coordinator's log says it aborted.
fn aborts(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.matches("multipart upload of a refused upload aborted")
        .count()
}

async fn eventually(secs: u64, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_members_fuse_and_the_models_download_byte_for_byte() {
    let _serial = serial();
    let (mut c, temp) = cluster(&[]);
    c.start_worker("w1");
    let storage = c.storage();
    let files = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = files.path().join(format!("m{i}.safetensors"));
            std::fs::write(&p, member(ARCH, i + 1)).unwrap();
            p
        })
        .collect();
    let mut client = c.client().await;
    let options = UploadOptions {
        architecture: Some(architecture(ARCH)),
        ..UploadOptions::default()
    };
    let mut keys = Vec::new();
    for p in &paths {
        let bytes = std::fs::read(p).unwrap();
        let stored = upload_file(&mut client, p, &options, |_, _| {})
            .await
            .unwrap_or_else(|e| panic!("uploading {}: {e}\n{}", p.display(), c.logs()));
        assert_eq!(stored.key, layout::upload(&sha256(&bytes)));
        assert_eq!(
            stored.key,
            format!("uploads/sha256/{}.safetensors", stored.sha256)
        );
        assert_eq!(
            (
                stored.size,
                stored.dtype.as_str(),
                stored.tensors,
                stored.created
            ),
            (bytes.len() as u64, "f32", 2, true)
        );
        assert!(!stored.architecture.is_empty(), "{stored:?}");
        let (held, _) = storage.get(&stored.key).await.unwrap().unwrap();
        assert_eq!(held.as_ref(), bytes.as_slice(), "stored as sent");
        keys.push(stored.key);
    }
    // The same bytes again: the same key, nothing new.
    let again = upload_file(&mut client, &paths[0], &options, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        (again.key.as_str(), again.created),
        (keys[0].as_str(), false)
    );
    assert_eq!(uploads(&c).await, {
        let mut k = keys.clone();
        k.sort();
        k
    });

    let run_id = submit(&c, spec(&[&keys[0], &keys[1]]), "")
        .await
        .run
        .unwrap()
        .run_id;
    let run = c
        .wait_for(&run_id, Duration::from_secs(300), is_final)
        .await;
    assert_eq!(
        state(&run),
        pb::RunState::Succeeded,
        "{}: {}",
        run.message,
        c.logs()
    );

    let out = tempfile::tempdir().unwrap();
    for (model, canonical, key, file) in [
        (
            "",
            "fine-tuned/nt",
            layout::fine_tuned(&run_id, "nt"),
            "fine-tuned-nt.safetensors",
        ),
        ("report", "report", layout::report(&run_id), "report.json"),
        (
            "member/1",
            "member/1",
            keys[1].clone(),
            "member-1.safetensors",
        ),
        (
            "fused/nt",
            "fused/nt",
            layout::fused(&run_id, "nt"),
            "fused-nt.safetensors",
        ),
    ] {
        let mut sizes = Vec::new();
        let got = download(&mut client, &run_id, model, out.path(), |done, total| {
            sizes.push((done, total))
        })
        .await
        .unwrap_or_else(|e| panic!("downloading {model:?}: {e}"));
        assert_eq!(
            (got.info.model.as_str(), got.info.key.as_str()),
            (canonical, key.as_str())
        );
        assert_eq!(got.path, out.path().join(file));
        let (held, _) = storage.get(&key).await.unwrap().unwrap();
        let written = std::fs::read(&got.path).unwrap();
        assert_eq!(written, held.as_ref(), "{model:?}: the bytes in the store");
        assert_eq!(got.sha256, sha256(&written));
        assert_eq!(sizes.last(), Some(&(held.len() as u64, held.len() as u64)));
    }
    // report.json is the run's report.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert!(report.get("members").is_some(), "{report}");
    // Only the downloaded files: no temporary file left beside them.
    assert_eq!(
        temp_files(out.path()).len(),
        4,
        "{:?}",
        temp_files(out.path())
    );
    assert!(temp_files(&temp).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_by_code_and_leave_nothing_a_run_could_name() {
    let _serial = serial();
    let (c, temp) = cluster(&["--max-upload-bytes=33554432", "--max-message-bytes=2097152"]);
    let mut client = c.client().await;
    let good = member(ARCH, 1);
    let big = big_file(5_000_000); // 20 MB: streamed into parts, or a temporary file
    let refused = |r: Result<pb::UploadCheckpointResponse, Status>, code: Code, words: &[&str]| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), code, "{e:?}");
        for w in words {
            assert!(e.message().contains(w), "`{w}` not in {e:?}");
        }
    };

    // A truncated file: its header says more bytes than follow.
    let cut = &good[..good.len() - 100];
    let r = raw_upload(
        &mut client,
        header(cut.len(), &sha256(cut), Some(ARCH)),
        cut,
        1 << 20,
    )
    .await;
    refused(
        r,
        Code::InvalidArgument,
        &["m.safetensors", "truncated or padded"],
    );

    // A member of another width, against the given architecture.
    let wide = member("mlp:hidden=32,depth=1", 1);
    let r = raw_upload(
        &mut client,
        header(wide.len(), "", Some(ARCH)),
        &wide,
        1 << 20,
    )
    .await;
    refused(
        r,
        Code::InvalidArgument,
        &["m.safetensors", "shape", "expected"],
    );

    // Declared over --max-upload-bytes: refused before any byte is read.
    let r = raw_upload(&mut client, header(40 << 20, "", None), &[], 1).await;
    refused(r, Code::ResourceExhausted, &["--max-upload-bytes 33554432"]);

    // More bytes than declared, into a multipart upload (hash declared).
    let mut longer = big.clone();
    longer.extend_from_slice(&[0; 1 << 20]);
    let r = raw_upload(
        &mut client,
        header(big.len(), &sha256(&big), None),
        &longer,
        1 << 20,
    )
    .await;
    refused(r, Code::InvalidArgument, &["more than the 20000"]);
    let log = server_log(&c);
    assert!(
        eventually(20, async || aborts(&log) == 1).await,
        "the multipart upload was not aborted"
    );

    // A message over --max-message-bytes.
    let r = raw_upload(&mut client, header(big.len(), "", None), &big, 3 << 20).await;
    refused(r, Code::OutOfRange, &["2097152"]);

    // A stream that ends half-way (no hash: into a temporary file).
    let r = raw_upload(
        &mut client,
        header(big.len(), "", None),
        &big[..10 << 20],
        1 << 20,
    )
    .await;
    refused(
        r,
        Code::InvalidArgument,
        &["ended after 10485760 of the 20000"],
    );

    // Bytes that are not the declared ones.
    let r = raw_upload(
        &mut client,
        header(good.len(), &"0".repeat(64), None),
        &good,
        4096,
    )
    .await;
    refused(r, Code::InvalidArgument, &["header.sha256", &sha256(&good)]);

    // Data before the header.
    let r = client
        .upload_checkpoint(tokio_stream::iter([pb::UploadCheckpointRequest {
            part: Some(Part::Data(good.clone())),
        }]))
        .await;
    refused(
        r.map(|r| r.into_inner()),
        Code::InvalidArgument,
        &["header"],
    );

    assert!(uploads(&c).await.is_empty(), "{:?}", uploads(&c).await);
    assert!(temp_files(&temp).is_empty(), "{:?}", temp_files(&temp));

    // A client that goes away half-way, into a temporary file and into a
    // multipart upload: the server notices, removes and aborts.
    for sha in ["", &sha256(&big)] {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(pb::UploadCheckpointRequest {
            part: Some(Part::Header(header(big.len(), sha, None))),
        })
        .await
        .unwrap();
        for chunk in big[..12 << 20].chunks(1 << 20) {
            tx.send(pb::UploadCheckpointRequest {
                part: Some(Part::Data(chunk.to_vec())),
            })
            .await
            .unwrap();
        }
        let mut cut_client = c.client().await;
        let call = tokio::spawn(async move {
            cut_client
                .upload_checkpoint(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        if sha.is_empty() {
            assert!(
                eventually(20, async || !temp_files(&temp).is_empty()).await,
                "no temporary file while uploading"
            );
        } else {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let before = (refusals(&log), aborts(&log));
        call.abort();
        drop(tx);
        // A multipart upload is aborted in the store (its parts never showed).
        let aborted = before.1 + usize::from(!sha.is_empty());
        assert!(
            eventually(20, async || {
                refusals(&log) == before.0 + 1
                    && aborts(&log) == aborted
                    && temp_files(&temp).is_empty()
            })
            .await,
            "the cut-off upload was not cleaned up: {:?}\n{}",
            temp_files(&temp),
            c.logs()
        );
    }
    assert!(uploads(&c).await.is_empty(), "{:?}", uploads(&c).await);

    // And a whole large file without a hash goes through the temporary file.
    let stored = raw_upload(&mut client, header(big.len(), "", None), &big, 1 << 20)
        .await
        .unwrap();
    assert_eq!(stored.key, layout::upload(&sha256(&big)));
    assert_eq!((stored.tensors, stored.architecture.as_str()), (1, ""));
    let (held, _) = c.storage().get(&stored.key).await.unwrap().unwrap();
    assert!(held.as_ref() == big.as_slice());
    assert!(temp_files(&temp).is_empty(), "{:?}", temp_files(&temp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_name_only_what_a_run_produced_and_both_rpcs_need_the_token() {
    let _serial = serial();
    // No worker: the run fuses on the coordinator, then waits to fine-tune.
    let (c, _temp) = cluster(&[]);
    let mut client = c.client().await;
    let mut keys = Vec::new();
    let members: Vec<Vec<u8>> = [1, 2].map(|seed| member(ARCH, seed)).into();
    for bytes in &members {
        let stored = raw_upload(
            &mut client,
            header(bytes.len(), "", Some(ARCH)),
            bytes,
            1 << 20,
        )
        .await
        .unwrap();
        keys.push(stored.key);
    }
    let run_id = submit(&c, spec(&[&keys[0], &keys[1]]), "")
        .await
        .run
        .unwrap()
        .run_id;
    c.wait_for(&run_id, Duration::from_secs(60), |r| {
        state(r) == pb::RunState::FineTuning
    })
    .await;

    let out = tempfile::tempdir().unwrap();
    let got = |model: &str| {
        let mut client = client.clone();
        let (run_id, dir) = (run_id.clone(), out.path().to_path_buf());
        let model = model.to_string();
        async move { download(&mut client, &run_id, &model, &dir, |_, _| {}).await }
    };
    let m0 = got("member/0").await.unwrap();
    assert_eq!(m0.info.key, keys[0]);
    assert_eq!(std::fs::read(&m0.path).unwrap(), members[0]);
    assert_eq!(
        got("fused/nt").await.unwrap().info.key,
        layout::fused(&run_id, "nt")
    );

    for (model, words) in [
        ("", "not produced (yet)"),
        ("nt", "is fine-tuning"),
        ("report", "not produced"),
        ("fused/average", "does not fuse with average"),
        ("member/2", "has 2 members"),
        ("baseline", "no baseline"),
        ("fine-tuned/nt-distilled", "distilled"),
    ] {
        let e = got(model).await.expect_err(model);
        assert_eq!(e.code(), Some(Code::NotFound), "{model}: {e}");
        assert!(e.to_string().contains(words), "{model}: {e}");
    }
    for model in [
        "../report.json",
        "/etc/passwd",
        "runs/x/run.json",
        &format!("runs/{run_id}/run.json"),
        "uploads/sha256/x.safetensors",
        "member/x",
        "fused/",
        "fine-tuned/../../x",
    ] {
        let e = got(model).await.expect_err(model);
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{model}: {e}");
    }
    let e = download(&mut client, "run-nope", "", out.path(), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    assert!(
        e.to_string().contains("run `run-nope` does not exist"),
        "{e}"
    );
    let e = download(&mut client, "", "", out.path(), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");

    // A wrong token: refused before anything is read or sent.
    let mut wrong = c.client_with_token("wrong").await;
    let bytes = member(ARCH, 3);
    let e = raw_upload(&mut wrong, header(bytes.len(), "", None), &bytes, 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = download(&mut wrong, &run_id, "member/0", out.path(), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
    assert_eq!(uploads(&c).await.len(), 2, "only the two members");
    // Two members and a fused model; nothing from refusals.
    assert_eq!(temp_files(out.path()).len(), 2);
}
