//! Checkpoints through the service, with a token and no store credentials:
//! [`upload_file`] sends a local safetensors file with `UploadCheckpoint`
//! and returns the key a run spec's `members.checkpoints` can name;
//! [`download`] writes one of a run's models (or its `report.json`) into a
//! folder with `DownloadCheckpoint`, atomically (a temporary file renamed
//! once its size and SHA-256 matched).
//!
//! ```no_run
//! # async fn demo() -> Result<(), nt_client::transfer::TransferError> {
//! # let mut client = nt_client::connect(&Default::default()).await.unwrap();
//! use nt_client::transfer::{download, upload_file, UploadOptions};
//! let stored = upload_file(&mut client, "m0.safetensors".as_ref(), &UploadOptions::default(), |_, _| {}).await?;
//! println!("members.checkpoints: [{}, ...]", stored.key);
//! let got = download(&mut client, "run-0190c0ffee-1234abcd", "nt", "out".as_ref(), |_, _| {}).await?;
//! println!("wrote {}", got.path.display());
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nt_proto::tonic::{Code, Status};
use sha2::{Digest, Sha256};

use crate::{pb, RunClient};
use pb::download_checkpoint_response::Part as DownPart;
use pb::upload_checkpoint_request::Part as UpPart;

/// Bytes per upload message: well within any server's --max-message-bytes.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The service refused or failed the call (its code and message).
    #[error("{}", crate::explain(.0))]
    Status(#[from] Status),
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// What arrived is not what was announced (a size, a SHA-256), or the
    /// stream broke the protocol.
    #[error("{0}")]
    Corrupt(String),
}

impl TransferError {
    /// The service's gRPC code, when it refused the call.
    pub fn code(&self) -> Option<Code> {
        match self {
            TransferError::Status(s) => Some(s.code()),
            TransferError::Io { .. } | TransferError::Corrupt(_) => None,
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
        move |source| TransferError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How to upload.
#[derive(Clone, Debug, Default)]
pub struct UploadOptions {
    /// What the tensors must fit; `None`: the architecture the file
    /// records, if any (then it is checked against the run's at submission).
    pub architecture: Option<pb::Architecture>,
    /// Bytes per message (default [`CHUNK_BYTES`]).
    pub chunk_bytes: Option<usize>,
}

/// An architecture as a user types it for `--arch`: a spec file (an
/// existing file, or anything ending in `.json`) sent as its JSON, else a
/// preset name.
pub fn architecture(arch: &str) -> Result<pb::Architecture, TransferError> {
    let path = Path::new(arch);
    let kind = if path.is_file() || arch.ends_with(".json") {
        let text = std::fs::read_to_string(path).map_err(TransferError::io(path))?;
        pb::architecture::Kind::SpecJson(text)
    } else {
        pb::architecture::Kind::Preset(arch.to_string())
    };
    Ok(pb::Architecture { kind: Some(kind) })
}

/// The SHA-256 of a file, in hex, read on a blocking thread.
pub async fn sha256_file(path: &Path) -> Result<String, TransferError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::Read;
        let mut file = std::fs::File::open(&owned)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(hex(&h.finalize()));
            }
            h.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| TransferError::Corrupt(format!("hashing {}: {e}", path.display())))?
    .map_err(TransferError::io(path))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Uploads the safetensors file `path` and returns what the service
/// stored: its key (`uploads/sha256/<hex>.safetensors`), size, SHA-256,
/// dtype and tensor count. The file is hashed first, so the service can
/// refuse bytes damaged on the way; `progress(read, total)` is called as
/// chunks are read for the connection (a few ahead of it). The same bytes
/// uploaded again return the same key (`created` false).
pub async fn upload_file(
    client: &mut RunClient,
    path: &Path,
    options: &UploadOptions,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> Result<pb::UploadCheckpointResponse, TransferError> {
    let size = tokio::fs::metadata(path)
        .await
        .map_err(TransferError::io(path))?
        .len();
    let sha256 = sha256_file(path).await?;
    let file = std::fs::File::open(path).map_err(TransferError::io(path))?;
    let header = pb::UploadCheckpointRequest {
        part: Some(UpPart::Header(pb::UploadHeader {
            file_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size,
            architecture: options.architecture.clone(),
            sha256: sha256.clone(),
        })),
    };
    let chunk = options.chunk_bytes.unwrap_or(CHUNK_BYTES).max(1) as u64;
    // The file is read on a blocking thread, a few chunks ahead of the
    // connection. A read error ends the stream early; it is reported
    // instead of the service's refusal of the short upload.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = file;
        let mut read = 0u64;
        while read < size {
            let mut buf = vec![0u8; chunk.min(size - read) as usize];
            let result = file.read_exact(&mut buf).map(|()| buf);
            let failed = result.is_err();
            if let Ok(buf) = &result {
                read += buf.len() as u64;
                progress(read, size);
            }
            if tx.blocking_send(result).is_err() || failed {
                return;
            }
        }
    });
    let failure: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    let failed = failure.clone();
    let data = futures_util::stream::unfold(rx, move |mut rx| {
        let failed = failed.clone();
        async move {
            match rx.recv().await? {
                Ok(buf) => Some((
                    pb::UploadCheckpointRequest {
                        part: Some(UpPart::Data(buf)),
                    },
                    rx,
                )),
                Err(e) => {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    None
                }
            }
        }
    });
    let requests = futures_util::StreamExt::chain(futures_util::stream::iter([header]), data);
    let response = client.upload_checkpoint(requests).await;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(TransferError::io(path)(e));
    }
    let stored = response?.into_inner();
    if stored.sha256 != sha256 || stored.size != size {
        return Err(TransferError::Corrupt(format!(
            "the service stored {} bytes with SHA-256 {}, not the {size} bytes with {sha256} of {}",
            stored.size,
            stored.sha256,
            path.display()
        )));
    }
    Ok(stored)
}

/// A finished download.
#[derive(Clone, Debug)]
pub struct Downloaded {
    /// The file written: the folder and the service's file name.
    pub path: PathBuf,
    /// What the service said it sends (model, key, size, file name).
    pub info: pb::DownloadInfo,
    /// The SHA-256 of the bytes written, as the service announced it.
    pub sha256: String,
}

/// A file name the service suggests, if it is one plain path component.
fn plain_file_name(name: &str) -> Result<&str, TransferError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0']);
    if ok {
        Ok(name)
    } else {
        Err(TransferError::Corrupt(format!(
            "the service named the download `{name}`, which is not a plain file name"
        )))
    }
}

/// Downloads `model` of run `run_id` (names as `DownloadCheckpointRequest`
/// documents them: "" for the first fusion method after fine-tuning, "nt",
/// "fused/nt", "member/0", "report", ...) into the folder `dir` (created if
/// needed) under the service's file name. The bytes go to a temporary file
/// in `dir`, renamed over the target only once their size and SHA-256 are
/// the announced ones; on any failure nothing is left.
/// `progress(received, total)` follows the data.
pub async fn download(
    client: &mut RunClient,
    run_id: &str,
    model: &str,
    dir: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<Downloaded, TransferError> {
    let mut stream = client
        .download_checkpoint(pb::DownloadCheckpointRequest {
            run_id: run_id.to_string(),
            model: model.to_string(),
        })
        .await?
        .into_inner();
    let info = match stream.message().await?.and_then(|m| m.part) {
        Some(DownPart::Info(info)) => info,
        _ => {
            return Err(TransferError::Corrupt(
                "the download did not start with its info".into(),
            ))
        }
    };
    let name = plain_file_name(&info.file_name)?;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(TransferError::io(dir))?;
    let target = dir.join(name);
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(TransferError::io(dir))?;
    let (file, temp) = temp.into_parts();
    // Hashed and written on a blocking thread while the next chunks arrive.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::Write;
        let mut file = std::io::BufWriter::with_capacity(CHUNK_BYTES, file);
        let mut hash = Sha256::new();
        while let Some(chunk) = rx.blocking_recv() {
            hash.update(&chunk);
            file.write_all(&chunk)?;
        }
        // Atomic for readers and against an interrupted download; not
        // synced to disk (as `curl -o` does not).
        file.flush()?;
        Ok(hex(&hash.finalize()))
    });
    let mut received = 0u64;
    progress(0, info.size);
    let announced = loop {
        match stream.message().await?.and_then(|m| m.part) {
            Some(DownPart::Data(bytes)) => {
                received += bytes.len() as u64;
                if received > info.size {
                    return Err(TransferError::Corrupt(format!(
                        "the service sent more than the {} bytes it announced for {}",
                        info.size, info.model
                    )));
                }
                if tx.send(bytes).await.is_err() {
                    // The writer failed: its error is below.
                    break None;
                }
                progress(received, info.size);
            }
            Some(DownPart::End(end)) => break Some(end.sha256),
            Some(DownPart::Info(_)) | None => {
                return Err(TransferError::Corrupt(format!(
                    "the download of {} ended after {received} of {} bytes without its end",
                    info.model, info.size
                )))
            }
        }
    };
    drop(tx);
    let sha256 = writer
        .await
        .map_err(|e| TransferError::Corrupt(format!("writing {}: {e}", temp.display())))?
        .map_err(TransferError::io(&temp))?;
    let announced = announced.unwrap_or_default();
    if received != info.size || sha256 != announced {
        return Err(TransferError::Corrupt(format!(
            "{}: received {received} bytes with SHA-256 {sha256}, announced {} bytes with {announced}",
            info.model, info.size
        )));
    }
    temp.persist(&target)
        .map_err(|e| TransferError::io(&target)(e.error))?;
    Ok(Downloaded {
        path: target,
        info,
        sha256,
    })
}

/// Every object of a succeeded run that [`download`] serves, by name:
/// `report`, each member, each method's fused and fine-tuned models (and
/// distilled ones), the baseline. From the run's report, so empty for a
/// run that has not succeeded.
pub fn models_of(run: &pb::Run) -> Vec<String> {
    let Some(report) = run
        .report
        .as_ref()
        .filter(|_| pb::RunState::try_from(run.state).is_ok_and(|s| s == pb::RunState::Succeeded))
    else {
        return Vec::new();
    };
    let mut names = vec!["report".to_string()];
    // A sharded member (its checkpoint an index) is several files: the
    // service does not serve it, so "every model" leaves it out.
    names.extend(
        report
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.checkpoint.ends_with(".index.json"))
            .map(|(i, _)| format!("member/{i}")),
    );
    for f in &report.fused {
        let Some(method) = pb::FusionMethod::try_from(f.method)
            .ok()
            .and_then(nt_spec::wire::method_from_wire)
        else {
            continue;
        };
        names.push(format!("fused/{method}"));
        names.push(format!("fine-tuned/{method}"));
        if f.after_distilled_fine_tuning.is_some() {
            names.push(format!("fine-tuned/{method}-distilled"));
        }
    }
    if report.baseline.is_some() {
        names.push("baseline".into());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_file_names_are_written() {
        for bad in ["", "../x", "/etc/passwd", "a/b", ".hidden", "a\\b"] {
            assert!(plain_file_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            plain_file_name("fine-tuned-nt.safetensors").unwrap(),
            "fine-tuned-nt.safetensors"
        );
    }

    #[test]
    fn every_model_of_a_succeeded_run_is_listed() {
        let model = pb::ModelReport::default;
        let mut run = pb::Run {
            state: pb::RunState::Succeeded as i32,
            report: Some(pb::RunReport {
                members: vec![model(), model()],
                fused: vec![pb::FusedReport {
                    method: pb::FusionMethod::Nt as i32,
                    after_distilled_fine_tuning: Some(model()),
                    ..Default::default()
                }],
                baseline: Some(model()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            models_of(&run),
            [
                "report",
                "member/0",
                "member/1",
                "fused/nt",
                "fine-tuned/nt",
                "fine-tuned/nt-distilled",
                "baseline"
            ]
        );
        run.state = pb::RunState::FineTuning as i32;
        assert!(models_of(&run).is_empty());
    }
}
