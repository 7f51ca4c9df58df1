//! Receiving an upload. The header is checked first (size within
//! `--max-upload-bytes`, a well-formed SHA-256, a known architecture); the
//! bytes then go, as they arrive, to a hash on a blocking thread and to a
//! sink that keeps them out of every name a run can use:
//!
//! * a declared SHA-256 names the key up front: a small file is held in
//!   memory and put at the end, a large one streams into a multipart upload
//!   of that key, which appears only when completed (S3 and the local
//!   store alike) and is aborted otherwise;
//! * without one, a small file is held in memory and a large one written
//!   to a temporary file in `--upload-dir`, removed whatever happens.
//!
//! The safetensors header is checked as soon as all of it has arrived, so a
//! wrong shape is refused after the first chunk, not the last; the size and
//! the hash once the stream ends. Only then is the object put or the
//! multipart upload completed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fusion::arch::{ArchSpec, Architecture};
use fusion::checkpoint::{self, Precision, META_ARCH};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use nt_common::layout;
use nt_proto::tonic::Code;
use nt_proto::v1 as pb;
use tracing::{info, instrument};

use super::sink::{Pending, Sink};
use super::{BackgroundHash, Transfers};
use crate::coordinator::checkpoints;
use crate::error::{CoordinatorError, Result};

/// The longest file name a header may carry.
const MAX_FILE_NAME_BYTES: usize = 1024;
/// The smallest safetensors file: 8 bytes of length and a `{}` header.
const MIN_FILE_BYTES: u64 = 10;
/// An upload whose client sends nothing for this long is abandoned.
const IDLE: Duration = Duration::from_secs(60);

/// What an upload announces before its bytes.
#[derive(Clone, Debug, Default)]
pub struct UploadHeader {
    /// The client's file name, for messages only.
    pub file_name: String,
    /// The exact number of bytes that follow.
    pub size: u64,
    /// What the tensors must fit; `None`: what the file records, if anything.
    pub architecture: Option<pb::Architecture>,
    /// The SHA-256 the client computed, in hex; empty: none.
    pub sha256: String,
}

/// A stored upload.
#[derive(Clone, Debug, PartialEq)]
pub struct Uploaded {
    /// `uploads/sha256/<hex>.safetensors`.
    pub key: String,
    pub size: u64,
    /// 64 lowercase hex digits.
    pub sha256: String,
    /// The dtype of its float tensors.
    pub precision: Precision,
    pub tensors: usize,
    /// False when the store held these bytes already.
    pub created: bool,
    /// The architecture it was checked against (empty: its form only).
    pub architecture: String,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::InvalidArgument(fusion::bounded(format!("{field}: {why}")))
}

/// A refusal of the file itself: the message names the file.
fn bad_file(why: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::InvalidArgument(fusion::bounded(why.to_string()))
}

/// The header, checked: what the stream must deliver.
struct Expected {
    /// How messages name the file.
    source: String,
    size: u64,
    sha256: Option<String>,
    arch: Option<Arc<Architecture>>,
}

impl Expected {
    fn of(header: UploadHeader, max_upload_bytes: u64) -> Result<Self> {
        if header.file_name.len() > MAX_FILE_NAME_BYTES {
            return Err(invalid(
                "header.file_name",
                format!("at most {MAX_FILE_NAME_BYTES} bytes"),
            ));
        }
        if header.size > max_upload_bytes {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "header.size: {} bytes is more than this server accepts (--max-upload-bytes {max_upload_bytes})",
                header.size
            )));
        }
        if header.size < MIN_FILE_BYTES {
            return Err(invalid(
                "header.size",
                format!(
                    "{} bytes cannot hold a safetensors file (at least {MIN_FILE_BYTES})",
                    header.size
                ),
            ));
        }
        let sha256 = match header.sha256.as_str() {
            "" => None,
            s if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(s.to_ascii_lowercase())
            }
            s => {
                return Err(invalid(
                    "header.sha256",
                    format!("`{s}` is not 64 hex digits"),
                ))
            }
        };
        let arch = match header.architecture.as_ref().and_then(|a| a.kind.as_ref()) {
            None => None,
            Some(_) => Some(Arc::new(
                nt_spec::wire::architecture_from_wire(header.architecture.as_ref())
                    .map_err(|e| invalid("header.architecture", e.message))?,
            )),
        };
        let source = if header.file_name.is_empty() {
            "the upload".to_string()
        } else {
            header.file_name
        };
        Ok(Expected {
            source,
            size: header.size,
            sha256,
            arch,
        })
    }
}

/// What the file's safetensors header says, checked.
struct Checked {
    precision: Precision,
    tensors: usize,
    /// The architecture's name (empty: none was known).
    architecture: String,
}

/// Checks a header as submission checks a member: well-formed, tensors
/// ending exactly at the end of the file, dtypes nt reads with one float
/// precision, and names, shapes and dtypes against `given` or the
/// architecture the file records (both, when they differ, refuse it).
fn check(source: &str, header: &[u8], size: u64, given: Option<&Architecture>) -> Result<Checked> {
    let parsed = checkpoints::parse_header(source, header, size).map_err(bad_file)?;
    if parsed.tensors.is_empty() {
        return Err(bad_file(format!("checkpoint {source} holds no tensors")));
    }
    let recorded = match parsed.metadata.get(META_ARCH) {
        None => None,
        Some(text) => Some(
            ArchSpec::from_json(text)
                .and_then(Architecture::new)
                .map_err(|e| {
                    bad_file(format!(
                        "checkpoint {source}: its `{META_ARCH}` metadata: {e}"
                    ))
                })?,
        ),
    };
    let arch = given.or(recorded.as_ref());
    if let Some(arch) = arch {
        checkpoint::validate_header(source, header, size, arch).map_err(bad_file)?;
    }
    Ok(Checked {
        precision: parsed.precision.map_or(Precision::F32, |(p, _)| p),
        tensors: parsed.tensors.len(),
        architecture: arch.map(|a| a.name().to_string()).unwrap_or_default(),
    })
}

/// Collects a file's first bytes until its whole safetensors header is there.
#[derive(Default)]
struct HeaderProbe {
    first: Vec<u8>,
    /// 8 + the header's length, once its first 8 bytes arrived.
    need: Option<usize>,
    done: bool,
}

impl HeaderProbe {
    /// Takes the file's next bytes; the header's JSON once all of it is there.
    fn feed(&mut self, exp: &Expected, mut chunk: &[u8]) -> Result<Option<Vec<u8>>> {
        while !self.done {
            let want = self.need.unwrap_or(8);
            let take = (want - self.first.len()).min(chunk.len());
            self.first.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.first.len() < want {
                return Ok(None);
            }
            if self.need.is_none() {
                // At most MAX_HEADER_BYTES and within the declared size.
                let n =
                    checkpoint::header_len(&exp.source, &self.first, exp.size).map_err(bad_file)?;
                self.need = Some(8 + n as usize);
            } else {
                self.done = true;
                return Ok(Some(std::mem::take(&mut self.first).split_off(8)));
            }
        }
        Ok(None)
    }
}

/// Receives the bytes into `sink`, checking the header as soon as it is
/// there, then the size and the hash; the header's verdict and the hash.
async fn receive_into(
    sink: &mut Sink,
    exp: &Expected,
    data: &mut BoxStream<'static, Result<Bytes>>,
) -> Result<(Checked, String)> {
    let hash = BackgroundHash::start();
    let mut probe = HeaderProbe::default();
    let mut checked = None;
    let mut received = 0u64;
    loop {
        let next = tokio::time::timeout(IDLE, data.next())
            .await
            .map_err(|_| {
                CoordinatorError::RequestStream(
                    Code::DeadlineExceeded,
                    format!(
                        "data: nothing arrived for {} s after {received} of {} bytes; the upload was abandoned",
                        IDLE.as_secs(),
                        exp.size
                    ),
                )
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk?;
        received += chunk.len() as u64;
        if received > exp.size {
            return Err(invalid(
                "data",
                format!(
                    "the stream carries more than the {} bytes header.size declares",
                    exp.size
                ),
            ));
        }
        if checked.is_none() {
            if let Some(header) = probe.feed(exp, &chunk)? {
                let (source, size, arch) = (exp.source.clone(), exp.size, exp.arch.clone());
                checked = Some(
                    tokio::task::spawn_blocking(move || {
                        check(&source, &header, size, arch.as_deref())
                    })
                    .await
                    .map_err(|e| {
                        CoordinatorError::Internal(format!("checking the header: {e}"))
                    })??,
                );
            }
        }
        hash.update(chunk.clone()).await?;
        sink.write(chunk).await?;
    }
    if received < exp.size {
        return Err(invalid(
            "data",
            format!(
                "the stream ended after {received} of the {} bytes header.size declares (interrupted?)",
                exp.size
            ),
        ));
    }
    // The declared size holds the header (`header_len` checked), so it arrived.
    let checked = checked.ok_or_else(|| {
        bad_file(format!(
            "checkpoint {}: not a valid safetensors file: no complete header",
            exp.source
        ))
    })?;
    let sha = hash.finish().await?;
    if let Some(declared) = &exp.sha256 {
        if *declared != sha {
            return Err(invalid(
                "header.sha256",
                format!(
                    "the {} bytes received hash to {sha}, not {declared}",
                    exp.size
                ),
            ));
        }
    }
    Ok((checked, sha))
}

/// An upload from its header to its stored object (see [`super::TransferApi::upload`]).
#[instrument(skip_all, fields(file = %header.file_name, size = header.size))]
pub(super) async fn receive(
    t: &Transfers,
    header: UploadHeader,
    mut data: BoxStream<'static, Result<Bytes>>,
) -> Result<Uploaded> {
    let exp = Expected::of(header, t.config.max_upload_bytes)?;
    // Waits its turn: the stream is not read meanwhile.
    let _permit =
        t.uploads.acquire().await.map_err(|_| {
            CoordinatorError::Unavailable("the coordinator is shutting down".into())
        })?;
    let started = Instant::now();
    let storage = t.coordinator.storage();
    let mut pending =
        Pending::new(Sink::open(storage, &t.config, exp.sha256.as_deref(), exp.size).await?);
    let received = receive_into(pending.sink(), &exp, &mut data).await;
    let sink = pending.release();
    let (checked, sha256) = match received {
        Ok(r) => r,
        Err(e) => {
            info!(error = %e, "upload refused");
            sink.discard();
            return Err(e);
        }
    };
    // Checked: stored even if the client leaves now (its retry finds it).
    let finishing = {
        let (storage, sha256) = (storage.clone(), sha256.clone());
        tokio::spawn(async move { sink.finish(&storage, &sha256, exp.size).await })
    };
    let created = finishing
        .await
        .map_err(|e| CoordinatorError::Internal(format!("storing the upload: {e}")))??;
    let key = layout::upload(&sha256);
    let seconds = started.elapsed().as_secs_f64();
    info!(
        key,
        created,
        seconds,
        mb_per_second = exp.size as f64 / 1e6 / seconds.max(1e-9),
        "checkpoint uploaded"
    );
    Ok(Uploaded {
        key,
        size: exp.size,
        sha256,
        precision: checked.precision,
        tensors: checked.tensors,
        created,
        architecture: checked.architecture,
    })
}

#[cfg(test)]
mod tests {
    use super::super::sink::part_size;
    use super::*;

    fn expected(size: u64) -> Expected {
        Expected {
            source: "m.safetensors".into(),
            size,
            sha256: None,
            arch: None,
        }
    }

    /// A safetensors file of one f32 tensor of `n` values.
    fn file(n: usize) -> Vec<u8> {
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
            4 * n
        );
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + 4 * n, 0);
        out
    }

    #[test]
    fn the_header_is_found_whatever_the_chunking() {
        let bytes = file(4);
        let n = bytes.len() - 8 - 16;
        for split in [1, 3, 8, 9, n, bytes.len()] {
            let exp = expected(bytes.len() as u64);
            let mut probe = HeaderProbe::default();
            let mut found = None;
            for chunk in bytes.chunks(split) {
                if let Some(h) = probe.feed(&exp, chunk).unwrap() {
                    assert!(found.is_none(), "found twice");
                    found = Some(h);
                }
            }
            let header = found.unwrap_or_else(|| panic!("not found with chunks of {split}"));
            assert_eq!(header, bytes[8..n + 8], "chunks of {split}");
            let checked = check("m", &header, bytes.len() as u64, None).unwrap();
            assert_eq!((checked.tensors, checked.precision), (1, Precision::F32));
        }
    }

    #[test]
    fn a_header_longer_than_the_declared_size_is_refused_at_once() {
        let bytes = file(4);
        let mut probe = HeaderProbe::default();
        let e = probe.feed(&expected(20), &bytes[..8]).err().unwrap();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }

    #[test]
    fn truncated_padded_and_empty_files_are_refused_from_their_header() {
        let bytes = file(4);
        let header = &bytes[8..bytes.len() - 16];
        for size in [bytes.len() - 1, bytes.len() + 4] {
            let e = check("m", header, size as u64, None).err().unwrap();
            assert!(e.to_string().contains("truncated or padded"), "{e}");
        }
        let e = check("m", b"{}", 10, None).err().unwrap();
        assert!(e.to_string().contains("holds no tensors"), "{e}");
    }

    #[test]
    fn headers_are_checked_before_anything_is_received() {
        let header = |size, sha: &str, preset: Option<&str>| UploadHeader {
            file_name: "m.safetensors".into(),
            size,
            sha256: sha.into(),
            architecture: preset.map(|p| pb::Architecture {
                kind: Some(pb::architecture::Kind::Preset(p.into())),
            }),
        };
        let e = Expected::of(header(1001, "", None), 1000).err().unwrap();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.to_string().contains("--max-upload-bytes 1000"), "{e}");
        let e = Expected::of(header(9, "", None), 1000).err().unwrap();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = Expected::of(header(100, "abc", None), 1000).err().unwrap();
        assert!(e.to_string().starts_with("header.sha256:"), "{e}");
        let e = Expected::of(header(100, "", Some("alexnet")), 1000)
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("header.architecture:"), "{e}");
        let ok = Expected::of(header(100, &"AB".repeat(32), Some("mlp")), 1000).unwrap();
        assert_eq!(ok.sha256.unwrap(), "ab".repeat(32));
        assert_eq!(ok.arch.unwrap().name(), "mlp");
        assert_eq!(part_size(100), 8 << 20);
        assert_eq!(part_size(200 << 30) as u64, (200u64 << 30).div_ceil(9000));
    }
}
