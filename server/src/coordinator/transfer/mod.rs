//! Checkpoints through the service, for clients that hold a token but no
//! store credentials: uploads into the store and downloads of a run's
//! objects. [`Transfers`] implements [`TransferApi`], the
//! `UploadCheckpoint` and `DownloadCheckpoint` half of the run service. It
//! changes no run: it reads the coordinator's committed run documents and
//! writes only under `uploads/`, and it holds what transfers need beyond
//! the coordinator (the upload ceiling, the temporary folder, the bound on
//! concurrent uploads).
//!
//! * [`upload`]: a stream of bytes checked (its safetensors header as
//!   submission checks a member), hashed and stored under
//!   `uploads/sha256/<hex>.safetensors`, atomically: nothing appears under
//!   a name a run can use until every check passed ([`sink`] holds the
//!   bytes meanwhile);
//! * [`download`]: a run's model names resolved to keys from its committed
//!   document, and the object streamed in 1 MiB chunks with its SHA-256.

mod download;
mod sink;
mod upload;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};

pub use download::{Download, DownloadInfo, DownloadPart};
pub use upload::{UploadHeader, Uploaded};

use super::service::Coordinator;
use crate::error::{CoordinatorError, Result};

/// The bytes of one download message (and what clients send per upload message).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Limits and places of transfers.
#[derive(Clone, Debug)]
pub struct TransferConfig {
    /// The largest checkpoint an upload may carry, in bytes.
    pub max_upload_bytes: u64,
    /// Where uploads without a declared SHA-256 wait, as temporary files,
    /// until their hash (and so their key) is known.
    pub upload_dir: PathBuf,
    /// Uploads received at once; more wait their turn.
    pub max_concurrent_uploads: usize,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            max_upload_bytes: 16 << 30,
            upload_dir: std::env::temp_dir(),
            max_concurrent_uploads: 4,
        }
    }
}

/// The transfer operations (`UploadCheckpoint`, `DownloadCheckpoint`).
#[allow(async_fn_in_trait)]
pub trait TransferApi {
    /// Receives a checkpoint of `header.size` bytes from `data` and stores
    /// it under `uploads/sha256/<hex>.safetensors`, once its size, SHA-256
    /// and safetensors header (against `header.architecture`, or the
    /// architecture recorded in it) were checked. A refusal, an error of
    /// `data` or a dropped future leaves nothing under that key (a multipart
    /// upload is aborted, a temporary file removed). The same bytes
    /// uploaded again return the same key (`created` false); a different
    /// object already under the key is never overwritten
    /// (`FAILED_PRECONDITION`). Over [`TransferConfig::max_upload_bytes`]:
    /// `RESOURCE_EXHAUSTED`; a malformed stream or file: `INVALID_ARGUMENT`.
    async fn upload(
        &self,
        header: UploadHeader,
        data: BoxStream<'static, Result<Bytes>>,
    ) -> Result<Uploaded>;

    /// Resolves `model` of run `run_id` (the names in `runs.proto`) to its
    /// object and streams it: an unknown run, or a model the run has not
    /// produced (yet), is `NOT_FOUND`; a malformed name `INVALID_ARGUMENT`.
    /// Only keys the run's document names are ever read.
    async fn download(&self, run_id: &str, model: &str) -> Result<Download>;
}

/// Uploads and downloads beside a coordinator.
pub struct Transfers {
    pub(super) coordinator: Arc<Coordinator>,
    pub(super) config: TransferConfig,
    /// One permit per upload being received.
    pub(super) uploads: Semaphore,
}

impl Transfers {
    /// Creates the upload folder if needed.
    pub fn new(coordinator: Arc<Coordinator>, config: TransferConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.upload_dir).map_err(|e| {
            anyhow::anyhow!(
                "creating the upload folder {} (--upload-dir): {e}",
                config.upload_dir.display()
            )
        })?;
        Ok(Transfers {
            coordinator,
            uploads: Semaphore::new(config.max_concurrent_uploads.max(1)),
            config,
        })
    }
}

impl TransferApi for Transfers {
    async fn upload(
        &self,
        header: UploadHeader,
        data: BoxStream<'static, Result<Bytes>>,
    ) -> Result<Uploaded> {
        upload::receive(self, header, data).await
    }

    async fn download(&self, run_id: &str, model: &str) -> Result<Download> {
        download::start(&self.coordinator, run_id, model).await
    }
}

/// Lowercase hex digits of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Chunks hashed with SHA-256 on a blocking thread while the caller moves
/// on: an upload or download hashes at the speed of its transfer without
/// holding an executor thread.
struct BackgroundHash {
    tx: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<[u8; 32]>,
}

impl BackgroundHash {
    fn start() -> Self {
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let task = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            while let Some(chunk) = rx.blocking_recv() {
                h.update(&chunk);
            }
            h.finalize().into()
        });
        BackgroundHash { tx, task }
    }

    async fn update(&self, chunk: Bytes) -> Result<()> {
        self.tx
            .send(chunk)
            .await
            .map_err(|_| CoordinatorError::Internal("the hashing thread stopped".into()))
    }

    /// The hash of every chunk given, in hex.
    async fn finish(self) -> Result<String> {
        drop(self.tx);
        let digest = self
            .task
            .await
            .map_err(|e| CoordinatorError::Internal(format!("the hashing thread: {e}")))?;
        Ok(hex(&digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_background_hash_is_sha256_of_the_chunks_in_order() {
        let h = BackgroundHash::start();
        for part in [&b"hello "[..], b"", b"world"] {
            h.update(Bytes::copy_from_slice(part)).await.unwrap();
        }
        assert_eq!(
            h.finish().await.unwrap(),
            hex(&Sha256::digest(b"hello world"))
        );
        assert_eq!(
            hex(&Sha256::digest(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
