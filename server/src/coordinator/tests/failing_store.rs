//! An in-memory object store whose writes of run documents can be made to
//! fail, for testing what a failed store write leaves behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

#[derive(Debug, Default)]
pub struct FailingStore {
    inner: InMemory,
    /// While set, every write of a `run.json` fails.
    pub fail_run_documents: AtomicBool,
    /// While set, every write of a `run.json` is stored but reported failed
    /// (as when a reply times out after the server wrote).
    pub lose_run_document_replies: AtomicBool,
}

impl FailingStore {
    pub fn new() -> Arc<Self> {
        Arc::new(FailingStore::default())
    }

    pub fn fail(&self, on: bool) {
        self.fail_run_documents.store(on, Ordering::SeqCst);
    }

    pub fn lose_replies(&self, on: bool) {
        self.lose_run_document_replies.store(on, Ordering::SeqCst);
    }
}

impl std::fmt::Display for FailingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FailingStore")
    }
}

#[async_trait::async_trait]
impl ObjectStore for FailingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let document = location.as_ref().ends_with("run.json");
        if document && self.fail_run_documents.load(Ordering::SeqCst) {
            return Err(object_store::Error::Generic {
                store: "FailingStore",
                source: "the store is down (injected)".into(),
            });
        }
        let result = self.inner.put_opts(location, payload, opts).await;
        if document && self.lose_run_document_replies.load(Ordering::SeqCst) {
            return Err(object_store::Error::Generic {
                store: "FailingStore",
                source: "the reply timed out (injected; the write landed)".into(),
            });
        }
        result
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
