//! The store layer: one JSON document per run in the object store, written
//! in revision order per run, with compare-and-swap where the store has it
//! (S3); idempotency records created atomically.
//!
//! Contract: `save` returns once the document of that revision is stored;
//! a document older than one already stored is skipped, never written over
//! it. A write whose outcome was unknown (a timeout: it may land later) is
//! reconciled at the next save: the conditional update then meets a changed
//! object, which is re-read; when this process wrote it (every document
//! names its writer), it is overwritten on its new version; so is one of a
//! lower epoch (a late write of a coordinator that held the store before,
//! see [`super::lease`]). A document of a later epoch means this process
//! lost the store: it stops writing. Nothing is written without holding the
//! store lease. `load_all` returns every readable run document under `runs/` and
//! leaves unreadable ones in place, untouched. Errors are the store's (an
//! outage is `Unavailable` to callers). The coordinator's one
//! mutate-then-commit path (`super::service`) is the only caller of `save`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use nt_common::layout;
use nt_common::storage::{Storage, Version, WriteError};
use object_store::ObjectStore;

use super::document::RunDocument;
use super::lease::StoreLease;
use crate::error::{CoordinatorError, Result};

#[derive(Default)]
struct Written {
    revision: u64,
    version: Option<Version>,
}

pub struct RunStore {
    storage: Storage,
    /// This process's hold on the store; it names the documents' writer and
    /// gives their epoch.
    lease: Arc<StoreLease>,
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Written>>>>,
}

impl RunStore {
    pub fn new(storage: Storage, lease: Arc<StoreLease>) -> Self {
        RunStore {
            storage,
            lease,
            writers: Mutex::new(HashMap::new()),
        }
    }

    pub fn lease(&self) -> &StoreLease {
        &self.lease
    }

    fn writer(&self, run: &str) -> Arc<tokio::sync::Mutex<Written>> {
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        writers.entry(run.to_string()).or_default().clone()
    }

    /// Stores a document unless a newer revision is already stored.
    pub async fn save(&self, doc: &RunDocument) -> Result<()> {
        let mut doc = doc.clone();
        doc.writer = self.lease.holder().to_string();
        doc.epoch = self.lease.check()?;
        let bytes = doc.to_json().map_err(CoordinatorError::Internal)?;
        // Never store what could not be read back: a run that cannot be
        // loaded after a restart is lost to its clients.
        super::upgrade::read(&bytes).map_err(|e| {
            CoordinatorError::Internal(format!(
                "run {} would be stored unreadable ({e}); not writing it",
                doc.run_id
            ))
        })?;
        let bytes = Bytes::from(bytes);
        let writer = self.writer(&doc.run_id);
        let mut w = writer.lock().await;
        if doc.revision <= w.revision && w.version.is_some() {
            return Ok(());
        }
        let key = layout::run_doc(&doc.run_id);
        let version = match &w.version {
            None => match self.storage.create(&key, bytes.clone()).await {
                Ok(v) => v,
                // Written before this process started: overwrite is ours to do.
                Err(WriteError::AlreadyExists(_)) => self.storage.put(&key, bytes).await?,
                Err(e) => return Err(e.into()),
            },
            Some(v) => match self.storage.update(&key, bytes.clone(), v).await {
                Ok(v) => v,
                Err(WriteError::Conflict(_)) => self.reconcile(&key, bytes).await?,
                Err(e) => return Err(e.into()),
            },
        };
        w.revision = doc.revision;
        w.version = Some(version);
        Ok(())
    }

    /// The stored document changed since this process last wrote it: an
    /// earlier write of ours that was reported failed landed after all, or
    /// another coordinator wrote. Ours is overwritten on its new version;
    /// another writer's is a conflict.
    async fn reconcile(&self, key: &str, bytes: Bytes) -> Result<Version> {
        let Some((stored, version)) = self.storage.get(key).await? else {
            return Ok(self.storage.put(key, bytes).await?);
        };
        // Read from the JSON itself, whatever the document's format (a newer
        // coordinator's too): a 64-bit epoch is a string in proto3 JSON, a
        // number before. A document that names neither is no writer's, at 0.
        struct Writer {
            writer: String,
            epoch: u64,
        }
        let json: serde_json::Value = serde_json::from_slice(&stored).unwrap_or_default();
        let stored = Writer {
            writer: json["writer"].as_str().unwrap_or_default().to_string(),
            epoch: match &json["epoch"] {
                serde_json::Value::String(s) => s.parse().unwrap_or(0),
                n => n.as_u64().unwrap_or(0),
            },
        };
        let epoch = self.lease.epoch();
        if stored.epoch > epoch {
            let why = format!(
                "{key} was written by {} at epoch {} after this coordinator's epoch {epoch}: \
                 another coordinator holds the store",
                stored.writer, stored.epoch
            );
            self.lease.fence(why.clone());
            return Err(CoordinatorError::Unavailable(why));
        }
        if stored.writer == self.lease.holder() {
            tracing::info!(key, "a write reported failed had landed; writing over it");
        } else if stored.epoch < epoch {
            tracing::warn!(key, writer = %stored.writer, epoch = stored.epoch,
                "a former coordinator's late write landed; writing over it");
        } else {
            return Err(CoordinatorError::Unavailable(format!(
                "{key} was changed by {} at this coordinator's own epoch {epoch}: \
                 is a second coordinator using this store?",
                if stored.writer.is_empty() {
                    "an unknown writer"
                } else {
                    &stored.writer
                }
            )));
        }
        match self.storage.update(key, bytes, &version).await {
            Ok(v) => Ok(v),
            Err(WriteError::Conflict(k)) => Err(CoordinatorError::Unavailable(format!(
                "{k} was changed by another writer: is a second coordinator using this store?"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Every stored run, with the version each was read at.
    pub async fn load_all(&self) -> Result<Vec<RunDocument>> {
        use futures_util::TryStreamExt;
        let prefix = object_store::path::Path::from("runs");
        let metas: Vec<_> = self.storage.store.list(Some(&prefix)).try_collect().await?;
        let mut runs = Vec::new();
        for meta in metas {
            let key = meta.location.to_string();
            if !key.ends_with("/run.json") {
                continue;
            }
            let Some((bytes, version)) = self.storage.get(&key).await? else {
                continue;
            };
            // One unreadable document must not keep every other run from
            // being served: it is left in place, untouched, and reported.
            let record = match super::upgrade::read(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "skipping a run document it cannot read");
                    continue;
                }
            };
            let writer = self.writer(&record.run_id);
            let mut w = writer.lock().await;
            w.revision = record.revision;
            w.version = Some(version);
            runs.push(record);
        }
        Ok(runs)
    }

    /// The run a request id created, if any.
    pub async fn request(&self, request_id: &str) -> Result<Option<String>> {
        Ok(self
            .storage
            .get(&layout::request(request_id))
            .await?
            .map(|(b, _)| String::from_utf8_lossy(&b).trim().to_string()))
    }

    /// Records that a request id created `run`; returns the run that owns the
    /// request id (ours, or one recorded before).
    pub async fn claim_request(&self, request_id: &str, run: &str) -> Result<String> {
        self.lease.check()?;
        let key = layout::request(request_id);
        match self
            .storage
            .create(&key, Bytes::from(run.to_string()))
            .await
        {
            Ok(_) => Ok(run.to_string()),
            Err(WriteError::AlreadyExists(_)) => Ok(self
                .request(request_id)
                .await?
                .unwrap_or_else(|| run.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.storage.store
    }
}
