//! Serving a run's objects. A model name (`runs.proto` lists them) is
//! parsed without looking at any run, then resolved against the run's
//! committed document: only a key that the document names (an accepted
//! member, a stored fusion, an accepted fine-tuning, the report of a
//! succeeded run) is ever read, so no name reaches an arbitrary key. The
//! object is read with one GET, regrouped into 1 MiB chunks and hashed on a
//! blocking thread on its way to the client.

use bytes::Bytes;
use fusion::checkpoint;
use fusion::Method;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use nt_common::layout;
use nt_spec::{MemberPlan, TaskWork};
use object_store::path::Path;
use object_store::{GetResultPayload, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::debug;

use super::{hex, CHUNK_BYTES};
use crate::coordinator::document::{RunState, TaskState};
use crate::coordinator::runbook::Runbook;
use crate::coordinator::service::{lock, Coordinator};
use crate::error::{CoordinatorError, Result};

/// The longest model name accepted.
const MAX_MODEL_BYTES: usize = 256;
/// Chunks queued ahead of the client.
const READ_AHEAD: usize = 4;

/// What a download sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadInfo {
    /// The canonical model name (`fine-tuned/nt`, `member/0`, `report`).
    pub model: String,
    pub key: String,
    pub size: u64,
    /// A single path component to save it under.
    pub file_name: String,
}

/// What follows the info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownloadPart {
    /// The next bytes, at most [`CHUNK_BYTES`] of them.
    Data(Vec<u8>),
    /// After the last data: the SHA-256 of every byte sent, in hex.
    End { sha256: String },
}

/// A download under way: its info, then its parts, ending with
/// [`DownloadPart::End`] or an error. Dropping `parts` stops the reading.
pub struct Download {
    pub info: DownloadInfo,
    pub parts: mpsc::Receiver<Result<DownloadPart>>,
}

/// A model name, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Model {
    /// The first fusion method's model after fine-tuning.
    Headline,
    FineTuned {
        method: Method,
        distilled: bool,
    },
    Fused(Method),
    Member(usize),
    Baseline,
    Report,
}

const FORMS: &str = "use \"\" (the first fusion method after fine-tuning), <method>, \
                     fine-tuned/<method>[-distilled], fused/<method>, member/<i>, baseline or report";

fn method(name: &str) -> std::result::Result<Method, String> {
    name.parse::<Method>().map_err(|e| e.to_string())
}

impl Model {
    fn parse(name: &str) -> std::result::Result<Model, String> {
        if name.len() > MAX_MODEL_BYTES {
            return Err(format!("at most {MAX_MODEL_BYTES} bytes"));
        }
        let model = match name {
            "" => Model::Headline,
            "report" | "report.json" => Model::Report,
            "baseline" => Model::Baseline,
            _ => {
                if let Some(i) = name
                    .strip_prefix("member/")
                    .or_else(|| name.strip_prefix("members/"))
                {
                    if i.is_empty() || i.len() > 4 || !i.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(format!(
                            "`{name}`: member/<i> takes a member index (0, 1, ...)"
                        ));
                    }
                    Model::Member(i.parse().map_err(|e| format!("`{name}`: {e}"))?)
                } else if let Some(m) = name.strip_prefix("fused/") {
                    Model::Fused(method(m)?)
                } else if let Some(rest) = name.strip_prefix("fine-tuned/") {
                    match rest.strip_suffix("-distilled") {
                        Some(m) => Model::FineTuned {
                            method: method(m)?,
                            distilled: true,
                        },
                        None => Model::FineTuned {
                            method: method(rest)?,
                            distilled: false,
                        },
                    }
                } else if let Ok(m) = name.parse::<Method>() {
                    Model::FineTuned {
                        method: m,
                        distilled: false,
                    }
                } else {
                    return Err(format!("`{name}` is not a model name; {FORMS}"));
                }
            }
        };
        Ok(model)
    }

    /// The canonical name (of a resolved model: not [`Model::Headline`]).
    fn name(self) -> String {
        match self {
            Model::Headline => String::new(),
            Model::FineTuned {
                method,
                distilled: false,
            } => format!("fine-tuned/{method}"),
            Model::FineTuned {
                method,
                distilled: true,
            } => format!("fine-tuned/{method}-distilled"),
            Model::Fused(method) => format!("fused/{method}"),
            Model::Member(i) => format!("member/{i}"),
            Model::Baseline => "baseline".into(),
            Model::Report => "report".into(),
        }
    }

    fn file_name(self) -> String {
        match self {
            Model::Report => "report.json".into(),
            other => format!("{}.safetensors", other.name().replace('/', "-")),
        }
    }
}

/// Whether the run's task doing `work` has an accepted result.
fn accepted(book: &Runbook, work: &TaskWork) -> bool {
    book.doc
        .tasks
        .iter()
        .any(|t| t.work == *work && t.state == TaskState::Succeeded)
}

/// Resolves `model` against the run: the model it is and its key.
fn locate(book: &Runbook, model: Model) -> Result<(Model, String)> {
    let (doc, plan) = (&book.doc, &book.plan);
    let run = doc.run_id.as_str();
    let model = match model {
        Model::Headline => Model::FineTuned {
            method: *plan.methods.first().ok_or_else(|| {
                CoordinatorError::NotFound(format!("run {run} has no fusion method"))
            })?,
            distilled: false,
        },
        m => m,
    };
    let not_found = |why: String| CoordinatorError::NotFound(format!("{}: {why}", model.name()));
    let not_yet = || {
        let when = if doc.state.is_final() {
            format!("run {run} {} without it", doc.state.name())
        } else {
            format!("run {run} is {}", doc.state.name().replace('_', "-"))
        };
        not_found(format!("not produced (yet): {when}"))
    };
    let has_method = |m: Method| {
        if plan.methods.contains(&m) {
            return Ok(());
        }
        let methods: Vec<&str> = plan.methods.iter().map(|m| m.as_str()).collect();
        Err(not_found(format!(
            "run {run} does not fuse with {m} (its methods: {})",
            methods.join(", ")
        )))
    };
    let key = match model {
        Model::Headline => unreachable!("resolved above"),
        Model::FineTuned { method, distilled } => {
            has_method(method)?;
            if distilled && plan.compare.distill.is_none() {
                return Err(not_found(format!(
                    "run {run} compares no distilled fine-tuning (compare.distillation)"
                )));
            }
            if !accepted(book, &TaskWork::FineTune { method, distilled }) {
                return Err(not_yet());
            }
            if distilled {
                layout::fine_tuned_distilled(run, method.as_str())
            } else {
                layout::fine_tuned(run, method.as_str())
            }
        }
        Model::Fused(method) => {
            has_method(method)?;
            match doc.fused.iter().find(|f| f.method == method) {
                Some(f) => f.key.clone(),
                None => return Err(not_yet()),
            }
        }
        Model::Member(i) => {
            let count = match &plan.members {
                MemberPlan::Train(configs) => configs.len(),
                MemberPlan::Existing(keys) => keys.len(),
            };
            if i >= count {
                return Err(not_found(format!(
                    "run {run} has {count} members (member/0 to member/{})",
                    count.saturating_sub(1)
                )));
            }
            let key = match doc.member_keys.get(i).filter(|k| !k.is_empty()) {
                Some(k) => k.clone(),
                None => return Err(not_yet()),
            };
            if checkpoint::is_index(&key) {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "{}: a sharded checkpoint (its index is `{key}`); download serves single files",
                    model.name()
                )));
            }
            key
        }
        Model::Baseline => {
            if !plan.compare.baseline {
                return Err(not_found(format!(
                    "run {run} has no baseline (compare.baseline)"
                )));
            }
            if !accepted(book, &TaskWork::Baseline) {
                return Err(not_yet());
            }
            layout::baseline(run)
        }
        Model::Report => {
            if doc.state != RunState::Succeeded {
                return Err(not_yet());
            }
            layout::report(run)
        }
    };
    Ok((model, key))
}

/// Starts a download (see [`super::TransferApi::download`]).
pub(super) async fn start(
    coordinator: &Coordinator,
    run_id: &str,
    model: &str,
) -> Result<Download> {
    if run_id.is_empty() {
        return Err(CoordinatorError::InvalidArgument("run_id: missing".into()));
    }
    let parsed = Model::parse(model)
        .map_err(|e| CoordinatorError::InvalidArgument(fusion::bounded(format!("model: {e}"))))?;
    let slot = coordinator
        .slot(run_id)
        .ok_or_else(|| CoordinatorError::NotFound(format!("run `{run_id}` does not exist")))?;
    let (model, key) = {
        let book = lock(&slot.book);
        locate(&book, parsed)?
    };
    let got = match coordinator
        .storage()
        .store
        .get(&Path::from(key.as_str()))
        .await
    {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(CoordinatorError::NotFound(format!(
                "{} of run {run_id}: `{key}` is missing from the store",
                model.name()
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let size = got.meta.size;
    let (tx, parts) = mpsc::channel(READ_AHEAD);
    let chunks = forward(tx, size, key.clone());
    match got.payload {
        GetResultPayload::File(file, _) => read_file(file, got.range, chunks),
        GetResultPayload::Stream(s) => {
            tokio::spawn(rechunk(s, chunks));
        }
    }
    debug!(run_id, key, size, "download started");
    Ok(Download {
        info: DownloadInfo {
            model: model.name(),
            key,
            size,
            file_name: model.file_name(),
        },
        parts,
    })
}

/// Chunks on their way to the client.
type Chunks = mpsc::Sender<Result<Vec<u8>>>;

/// Hashes each chunk and passes it on to the client's channel, on a
/// blocking thread, then the hash (or an error, or nothing once the client
/// went away); the sender to feed it.
fn forward(tx: mpsc::Sender<Result<DownloadPart>>, size: u64, key: String) -> Chunks {
    let (chunks, mut rx) = mpsc::channel::<Result<Vec<u8>>>(2);
    tokio::task::spawn_blocking(move || {
        let mut hash = Sha256::new();
        let mut sent = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            let part = chunk.map(|c| {
                hash.update(&c);
                sent += c.len() as u64;
                DownloadPart::Data(c)
            });
            let failed = part.is_err();
            if tx.blocking_send(part).is_err() || failed {
                return;
            }
        }
        let end = if sent == size {
            Ok(DownloadPart::End {
                sha256: hex(&hash.finalize()),
            })
        } else {
            Err(CoordinatorError::Unavailable(format!(
                "object store: `{key}` ended after {sent} of its {size} bytes"
            )))
        };
        let _ = tx.blocking_send(end);
    });
    chunks
}

/// A local file's `range` in chunks of [`CHUNK_BYTES`], read on a blocking thread.
fn read_file(mut file: std::fs::File, range: std::ops::Range<u64>, out: Chunks) {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        let failed =
            |e: std::io::Error| CoordinatorError::Unavailable(format!("object store: {e}"));
        if let Err(e) = file.seek(SeekFrom::Start(range.start)) {
            let _ = out.blocking_send(Err(failed(e)));
            return;
        }
        let mut left = range.end - range.start;
        while left > 0 {
            let mut buf = vec![0u8; (CHUNK_BYTES as u64).min(left) as usize];
            if let Err(e) = file.read_exact(&mut buf) {
                let _ = out.blocking_send(Err(failed(e)));
                return;
            }
            left -= buf.len() as u64;
            if out.blocking_send(Ok(buf)).is_err() {
                return;
            }
        }
    });
}

/// A store's response stream regrouped into chunks of [`CHUNK_BYTES`]
/// (the last may be shorter); stops when the client goes away.
async fn rechunk(mut stream: BoxStream<'static, object_store::Result<Bytes>>, out: Chunks) {
    let mut pending = Vec::with_capacity(CHUNK_BYTES);
    while let Some(next) = stream.next().await {
        let bytes = match next {
            Ok(b) => b,
            Err(e) => {
                let _ = out.send(Err(e.into())).await;
                return;
            }
        };
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let take = (CHUNK_BYTES - pending.len()).min(rest.len());
            pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if pending.len() == CHUNK_BYTES {
                let full = std::mem::replace(&mut pending, Vec::with_capacity(CHUNK_BYTES));
                if out.send(Ok(full)).await.is_err() {
                    return;
                }
            }
        }
    }
    if !pending.is_empty() {
        let _ = out.send(Ok(pending)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_parse_to_one_canonical_form() {
        let nt = Method::Nt;
        for (name, model, canonical, file) in [
            ("", Model::Headline, "", ".safetensors"),
            (
                "nt",
                Model::FineTuned {
                    method: nt,
                    distilled: false,
                },
                "fine-tuned/nt",
                "fine-tuned-nt.safetensors",
            ),
            (
                "fine-tuned/nt-iterative-distilled",
                Model::FineTuned {
                    method: Method::NtIterative,
                    distilled: true,
                },
                "fine-tuned/nt-iterative-distilled",
                "fine-tuned-nt-iterative-distilled.safetensors",
            ),
            (
                "fused/average",
                Model::Fused(Method::Average),
                "fused/average",
                "fused-average.safetensors",
            ),
            (
                "members/12",
                Model::Member(12),
                "member/12",
                "member-12.safetensors",
            ),
            (
                "baseline",
                Model::Baseline,
                "baseline",
                "baseline.safetensors",
            ),
            ("report.json", Model::Report, "report", "report.json"),
        ] {
            let parsed = Model::parse(name).unwrap();
            assert_eq!(parsed, model, "{name}");
            assert_eq!(parsed.name(), canonical, "{name}");
            assert_eq!(parsed.file_name(), file, "{name}");
        }
    }

    #[test]
    fn names_that_could_reach_other_keys_are_malformed() {
        for name in [
            "../runs/x/report.json",
            "/etc/passwd",
            "runs/x/fused/nt.safetensors",
            "fused/",
            "fused/../nt",
            "fine-tuned/",
            "member/",
            "member/-1",
            "member/1/../../x",
            "member/99999",
            "member/x",
            "uploads/sha256/00.safetensors",
            "NT",
            &"x".repeat(300),
        ] {
            let e = Model::parse(name).err().unwrap_or_else(|| panic!("{name}"));
            assert!(!e.is_empty(), "{name}");
        }
    }
}
