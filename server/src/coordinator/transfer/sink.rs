//! Where an upload's bytes go while they arrive, kept out of every name a
//! run can use until they are checked: held in memory (small files), a
//! multipart upload of the final key that appears only when completed (a
//! declared SHA-256), or a temporary file in `--upload-dir` (no declared
//! hash, so no key yet). [`Sink::finish`] makes checked bytes appear under
//! `uploads/sha256/<hex>.safetensors`; [`Sink::discard`] leaves nothing.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nt_common::{layout, Storage};
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::TransferConfig;
use crate::error::{CoordinatorError, Result};

/// The part size of multipart uploads, and the largest upload held in
/// memory. S3 wants parts of at least 5 MiB (but the last)...
const PART_BYTES: u64 = 8 << 20;
/// ... and at most 10,000 of them: larger files get larger parts.
const MAX_PARTS: u64 = 9_000;
/// Parts of one upload in flight at once: with the part being filled,
/// an upload holds at most `(PARTS_IN_FLIGHT + 1) * part size` in memory.
const PARTS_IN_FLIGHT: usize = 4;

/// Where the bytes go while they arrive.
pub(super) enum Sink {
    /// The declared bytes are in the store already: only checked.
    Stored,
    /// Small enough to hold: put in one request at the end.
    Memory(BytesMut),
    /// Into a multipart upload of the final key, which appears only when
    /// it is completed.
    Multipart(WriteMultipart),
    /// Into a temporary file (no declared hash, so no key yet), removed
    /// when `temp` drops.
    File {
        temp: tempfile::TempPath,
        file: tokio::fs::File,
    },
}

/// The part size for an upload of `size` bytes.
pub(super) fn part_size(size: u64) -> usize {
    PART_BYTES.max(size.div_ceil(MAX_PARTS)) as usize
}

/// Refuses to take `key` over when it holds another object.
fn same_size(key: &str, stored: u64, size: u64) -> Result<()> {
    if stored == size {
        return Ok(());
    }
    Err(CoordinatorError::FailedPrecondition(format!(
        "`{key}` already holds {stored} bytes, not the {size} bytes uploaded; it was left as it is"
    )))
}

impl Sink {
    /// The sink for `size` bytes with the declared hash `sha256`, if any:
    /// [`Sink::Stored`] when the store holds those bytes already (another
    /// object of that key and another size is `FAILED_PRECONDITION`).
    pub(super) async fn open(
        storage: &Storage,
        config: &TransferConfig,
        sha256: Option<&str>,
        size: u64,
    ) -> Result<Sink> {
        if let Some(sha) = sha256 {
            let key = layout::upload(sha);
            if let Some(stored) = storage.size(&key).await? {
                same_size(&key, stored, size)?;
                return Ok(Sink::Stored);
            }
            if size > PART_BYTES {
                let upload = storage.store.put_multipart(&Path::from(key)).await?;
                return Ok(Sink::Multipart(WriteMultipart::new_with_chunk_size(
                    upload,
                    part_size(size),
                )));
            }
        }
        if size <= PART_BYTES {
            return Ok(Sink::Memory(BytesMut::with_capacity(size as usize)));
        }
        let dir = &config.upload_dir;
        let disk = |e: std::io::Error| {
            CoordinatorError::Unavailable(format!(
                "a temporary file in {} (--upload-dir): {e}",
                dir.display()
            ))
        };
        let temp = tempfile::Builder::new()
            .prefix(".nt-upload-")
            .tempfile_in(dir)
            .map_err(disk)?;
        let (file, temp) = temp.into_parts();
        Ok(Sink::File {
            temp,
            file: tokio::fs::File::from_std(file),
        })
    }

    pub(super) async fn write(&mut self, chunk: Bytes) -> Result<()> {
        match self {
            Sink::Stored => Ok(()),
            Sink::Memory(buf) => {
                buf.extend_from_slice(&chunk);
                Ok(())
            }
            Sink::Multipart(w) => {
                w.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                w.put(chunk);
                Ok(())
            }
            Sink::File { file, .. } => file.write_all(&chunk).await.map_err(|e| {
                CoordinatorError::Unavailable(format!("writing the upload's temporary file: {e}"))
            }),
        }
    }

    /// Makes the checked bytes appear under their key; whether they were new.
    pub(super) async fn finish(self, storage: &Storage, sha: &str, size: u64) -> Result<bool> {
        let key = layout::upload(sha);
        match self {
            Sink::Stored => Ok(false),
            Sink::Memory(buf) => {
                if let Some(stored) = storage.size(&key).await? {
                    same_size(&key, stored, size)?;
                    return Ok(false);
                }
                storage.put(&key, buf.freeze()).await?;
                Ok(true)
            }
            // A failed completion aborts the upload itself.
            Sink::Multipart(w) => w.finish().await.map(|_| true).map_err(Into::into),
            Sink::File { temp, mut file } => {
                file.flush().await.map_err(|e| {
                    CoordinatorError::Unavailable(format!(
                        "writing the upload's temporary file: {e}"
                    ))
                })?;
                let file = Arc::new(file.into_std().await);
                let created = store_file(storage, &key, file, size).await;
                drop(temp);
                created
            }
        }
    }

    /// Leaves nothing behind: a temporary file is removed and held bytes
    /// dropped at once; a multipart upload is aborted on a task of its own,
    /// so that it completes even when the call that refused it is dropped.
    pub(super) fn discard(self) {
        if let (Sink::Multipart(w), Ok(runtime)) = (self, tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move {
                match w.abort().await {
                    Ok(()) => info!("multipart upload of a refused upload aborted"),
                    Err(e) => warn!(error = %e, "aborting a refused upload's multipart upload"),
                }
            });
        }
    }
}

/// An upload's sink while it receives. hyper drops the handler of a call
/// whose client reset its stream, so an upload can end in the middle of an
/// `await`: then the sink is discarded here.
pub(super) struct Pending {
    sink: Sink,
    released: bool,
}

impl Pending {
    pub(super) fn new(sink: Sink) -> Self {
        Pending {
            sink,
            released: false,
        }
    }

    pub(super) fn sink(&mut self) -> &mut Sink {
        &mut self.sink
    }

    /// The sink, to finish or discard: no longer discarded on drop.
    pub(super) fn release(mut self) -> Sink {
        self.released = true;
        std::mem::replace(&mut self.sink, Sink::Stored)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.released {
            info!("upload refused: the client went away");
            std::mem::replace(&mut self.sink, Sink::Stored).discard();
        }
    }
}

/// Stores a received temporary file under `key` (unless it is there
/// already), in parts read on blocking threads.
async fn store_file(
    storage: &Storage,
    key: &str,
    file: Arc<std::fs::File>,
    size: u64,
) -> Result<bool> {
    if let Some(stored) = storage.size(key).await? {
        same_size(key, stored, size)?;
        return Ok(false);
    }
    let part = part_size(size) as u64;
    let read = |offset: u64, len: u64| {
        let file = file.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset)
                    .map(|()| Bytes::from(buf))
            })
            .await
            .map_err(|e| CoordinatorError::Internal(format!("reading the upload back: {e}")))?
            .map_err(|e| {
                CoordinatorError::Unavailable(format!("reading the upload's temporary file: {e}"))
            })
        }
    };
    let upload = storage.store.put_multipart(&Path::from(key)).await?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, part as usize);
    let mut offset = 0;
    while offset < size {
        let len = part.min(size - offset);
        let step = async {
            let bytes = read(offset, len).await?;
            w.wait_for_capacity(PARTS_IN_FLIGHT).await?;
            Ok::<_, CoordinatorError>(bytes)
        }
        .await;
        match step {
            Ok(bytes) => w.put(bytes),
            Err(e) => {
                Sink::Multipart(w).discard();
                return Err(e);
            }
        }
        offset += len;
    }
    w.finish().await?;
    Ok(true)
}
