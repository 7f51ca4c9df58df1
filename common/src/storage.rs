//! The object store, built once from configuration and handed down: the
//! local filesystem for the embedded default, any S3-compatible endpoint in a
//! deployment, memory for tests.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

/// Where objects live. Every flag has an environment variable.
///
/// For S3 the client starts from AWS's standard environment
/// ([`AmazonS3Builder::from_env`]) and these flags override it: static keys
/// with an optional `AWS_SESSION_TOKEN`, EKS IAM roles for service accounts
/// (`AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN`), EKS Pod Identity
/// (`AWS_CONTAINER_CREDENTIALS_FULL_URI`), `AWS_REGION`, `AWS_ENDPOINT`...
/// With no keys and no token file it asks the instance metadata service.
#[derive(Args, Clone, Debug)]
pub struct StorageArgs {
    /// Object store URL: `file:///abs/dir` (or a plain directory), `s3://bucket[/prefix]`, `memory://`.
    #[arg(long = "store", env = "NT_STORE", default_value = "file://./nt-data")]
    pub url: String,
    /// S3 endpoint for S3-compatible servers (e.g. http://127.0.0.1:8333); AWS_ENDPOINT, else AWS.
    #[arg(long, env = "NT_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region; AWS_REGION or AWS_DEFAULT_REGION, else us-east-1.
    #[arg(long, env = "NT_S3_REGION")]
    pub s3_region: Option<String>,
    /// S3 access key id (or AWS_ACCESS_KEY_ID); unset for role credentials.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key (or AWS_SECRET_ACCESS_KEY); unset for role credentials.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// Allow plain-HTTP endpoints (or AWS_ALLOW_HTTP=true).
    #[arg(long, env = "NT_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
    /// Use virtual-hosted-style requests (bucket in the host name) instead of path style.
    #[arg(long, env = "NT_S3_VIRTUAL_HOSTED")]
    pub s3_virtual_hosted: bool,
}

impl StorageArgs {
    /// A local-filesystem store rooted at `dir`.
    pub fn local(dir: &std::path::Path) -> Self {
        StorageArgs {
            url: format!("file://{}", dir.display()),
            s3_endpoint: None,
            s3_region: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_allow_http: false,
            s3_virtual_hosted: false,
        }
    }

    /// The S3 client for `bucket`: the standard AWS environment, then these
    /// flags over it. Builds without network; credentials are fetched (from
    /// STS, the Pod Identity agent or the metadata service) at the first
    /// request.
    pub fn s3_builder(&self, bucket: &str) -> AmazonS3Builder {
        self.s3_over(AmazonS3Builder::from_env(), bucket)
    }

    /// `base` with the flags that are set applied over it. A flag that is
    /// off (`--s3-allow-http`, `--s3-virtual-hosted`) leaves the environment's
    /// setting alone.
    fn s3_over(&self, base: AmazonS3Builder, bucket: &str) -> AmazonS3Builder {
        let mut builder = base.with_bucket_name(bucket);
        if let Some(r) = &self.s3_region {
            builder = builder.with_region(r);
        }
        if let Some(e) = &self.s3_endpoint {
            builder = builder.with_endpoint(e);
        }
        if let Some(k) = &self.s3_access_key_id {
            builder = builder.with_access_key_id(k);
        }
        if let Some(s) = &self.s3_secret_access_key {
            builder = builder.with_secret_access_key(s);
        }
        if self.s3_allow_http {
            builder = builder.with_allow_http(true);
        }
        if self.s3_virtual_hosted {
            builder = builder.with_virtual_hosted_style_request(true);
        }
        builder
    }
}

/// Refuses an empty access key or secret: a Secret with blank
/// `aws-access-key-id` would otherwise be sent as static credentials and
/// hide the role credentials the operator meant to use.
fn check_keys(builder: &AmazonS3Builder) -> Result<()> {
    for (key, name) in [
        (AmazonS3ConfigKey::AccessKeyId, "AWS_ACCESS_KEY_ID"),
        (AmazonS3ConfigKey::SecretAccessKey, "AWS_SECRET_ACCESS_KEY"),
    ] {
        if builder.get_config_value(&key).is_some_and(|v| v.is_empty()) {
            bail!("{name} is set but empty: unset it to use role credentials (IRSA, Pod Identity)");
        }
    }
    Ok(())
}

/// The configured store and what it supports.
#[derive(Clone)]
pub struct Storage {
    pub store: Arc<dyn ObjectStore>,
    /// For messages: `file:///…`, `s3://bucket/prefix`, `memory://`.
    pub url: String,
    /// The S3 bucket, when the store is S3 (for `s3://bucket/key` references).
    pub bucket: Option<String>,
    /// The key prefix within the bucket every key of this store lies under
    /// (`s3://bucket/prefix`), without slashes at either end; empty for none.
    pub prefix: String,
    /// Whether conditional updates (compare-and-swap on ETag) are available.
    pub conditional_updates: bool,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.url)
    }
}

/// A listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// Its ETag (or version, or modification time): changes with its content.
    pub version: String,
}

/// A version of an object for a conditional update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Version {
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// Why a conditional write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} changed since it was read")]
    Conflict(String),
    #[error(transparent)]
    Other(#[from] object_store::Error),
}

impl Storage {
    pub fn open(args: &StorageArgs) -> Result<Self> {
        let url = args.url.trim();
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("store URL `{url}` names no bucket (s3://bucket[/prefix])");
            }
            let builder = args.s3_builder(bucket);
            check_keys(&builder)?;
            let s3: Arc<dyn ObjectStore> =
                Arc::new(builder.build().context("configuring the S3 store")?);
            let store: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
                s3
            } else {
                Arc::new(PrefixStore::new(s3, prefix.trim_matches('/')))
            };
            return Ok(Storage {
                store,
                url: url.to_string(),
                bucket: Some(bucket.to_string()),
                prefix: prefix.trim_matches('/').to_string(),
                conditional_updates: true,
            });
        }
        if url == "memory://" || url == "memory:" {
            return Ok(Storage {
                store: Arc::new(InMemory::new()),
                url: "memory://".into(),
                bucket: None,
                prefix: String::new(),
                conditional_updates: true,
            });
        }
        let dir = url.strip_prefix("file://").unwrap_or(url);
        if dir.contains("://") {
            bail!("unsupported store URL `{url}` (use file://, s3:// or memory://)");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating the store folder {dir}"))?;
        let dir = std::fs::canonicalize(dir).with_context(|| format!("resolving {dir}"))?;
        let fs = LocalFileSystem::new_with_prefix(&dir)
            .with_context(|| format!("opening {}", dir.display()))?
            .with_automatic_cleanup(true);
        Ok(Storage {
            store: Arc::new(fs),
            url: format!("file://{}", dir.display()),
            bucket: None,
            prefix: String::new(),
            // The local filesystem cannot compare-and-swap: one coordinator
            // owns a local store.
            conditional_updates: false,
        })
    }

    /// Reads an object; `Ok(None)` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<(Bytes, Version)>, object_store::Error> {
        match self.store.get(&Path::from(key)).await {
            Ok(result) => {
                let version = Version {
                    e_tag: result.meta.e_tag.clone(),
                    version: result.meta.version.clone(),
                };
                Ok(Some((result.bytes().await?, version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every object under the folder `prefix` (`a/b` lists `a/b/...`), at
    /// any depth, sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, object_store::Error> {
        use futures_util::TryStreamExt;
        let prefix = Path::from(prefix);
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .map(|m| ObjectInfo {
                key: m.location.to_string(),
                size: m.size,
                version: m.e_tag.or(m.version).unwrap_or_else(|| {
                    m.last_modified
                        .timestamp_nanos_opt()
                        .unwrap_or(0)
                        .to_string()
                }),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// An object's size in bytes; `Ok(None)` when it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, object_store::Error> {
        match self.store.head(&Path::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads `range` of an object's bytes (a ranged GET on S3).
    pub async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, object_store::Error> {
        self.store.get_range(&Path::from(key), range).await
    }

    /// Writes an object, replacing any.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<Version, object_store::Error> {
        let r = self
            .store
            .put(&Path::from(key), PutPayload::from(bytes))
            .await?;
        Ok(Version {
            e_tag: r.e_tag,
            version: r.version,
        })
    }

    /// Creates an object only if none exists (atomic on S3 and the local filesystem).
    pub async fn create(&self, key: &str, bytes: Bytes) -> Result<Version, WriteError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&Path::from(key), PutPayload::from(bytes), opts)
            .await
        {
            Ok(r) => Ok(Version {
                e_tag: r.e_tag,
                version: r.version,
            }),
            Err(object_store::Error::AlreadyExists { .. }) => {
                Err(WriteError::AlreadyExists(key.into()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces an object if it is still at `version` (compare-and-swap where
    /// the store supports it; a plain overwrite on the local filesystem).
    pub async fn update(
        &self,
        key: &str,
        bytes: Bytes,
        version: &Version,
    ) -> Result<Version, WriteError> {
        if !self.conditional_updates || (version.e_tag.is_none() && version.version.is_none()) {
            return Ok(self.put(key, bytes).await?);
        }
        let opts = PutOptions {
            mode: PutMode::Update(UpdateVersion {
                e_tag: version.e_tag.clone(),
                version: version.version.clone(),
            }),
            ..Default::default()
        };
        match self
            .store
            .put_opts(&Path::from(key), PutPayload::from(bytes), opts)
            .await
        {
            Ok(r) => Ok(Version {
                e_tag: r.e_tag,
                version: r.version,
            }),
            Err(object_store::Error::Precondition { .. }) => Err(WriteError::Conflict(key.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Copies an object within the store.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), object_store::Error> {
        self.store.copy(&Path::from(from), &Path::from(to)).await
    }

    /// Whether an object exists.
    pub async fn exists(&self, key: &str) -> Result<bool, object_store::Error> {
        match self.store.head(&Path::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Turns a reference from a spec into a key of this store: a plain key
    /// or `store:<key>` (relative to the store's prefix), or
    /// `s3://<bucket>/<prefix>/<key>`: a full URI of an object under this
    /// store's bucket and prefix. A URI outside them is refused, never
    /// silently read from somewhere else.
    pub fn key_of(&self, reference: &str) -> Result<String, String> {
        let key = if let Some(k) = reference.strip_prefix("store:") {
            k
        } else if let Some(rest) = reference.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            match &self.bucket {
                Some(b) if b == bucket && self.prefix.is_empty() => key,
                Some(b) if b == bucket => {
                    match key
                        .trim_start_matches('/')
                        .strip_prefix(&format!("{}/", self.prefix))
                    {
                        Some(k) => k,
                        None => {
                            return Err(format!(
                                "`{reference}` is outside the service's prefix `s3://{b}/{}/`",
                                self.prefix
                            ))
                        }
                    }
                }
                Some(b) => {
                    return Err(format!(
                        "`{reference}` is in bucket `{bucket}`, the service's bucket is `{b}`"
                    ))
                }
                None => {
                    return Err(format!(
                        "`{reference}` is an S3 URI but the service stores objects in {}",
                        self.url
                    ))
                }
            }
        } else if reference.contains("://") {
            return Err(format!(
                "`{reference}`: use an object key, store:<key> or s3://<bucket>/<key>"
            ));
        } else {
            reference
        };
        let key = key.trim_start_matches('/');
        if key.is_empty()
            || key
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(format!("`{reference}` is not a valid object key"));
        }
        Ok(key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(url: &str) -> Storage {
        let args = StorageArgs {
            url: url.into(),
            s3_endpoint: Some("http://127.0.0.1:1".into()),
            s3_allow_http: true,
            ..StorageArgs::local(std::path::Path::new("."))
        };
        Storage::open(&args).unwrap()
    }

    #[test]
    fn s3_flags_override_the_environment_and_keep_its_session_token() {
        // What `AmazonS3Builder::from_env` makes of temporary credentials
        // and an AWS_REGION / AWS_ENDPOINT (the environment itself is tested
        // in tests/s3_environment.rs, in a process of its own).
        let env = AmazonS3Builder::new()
            .with_config(AmazonS3ConfigKey::AccessKeyId, "env-key")
            .with_config(AmazonS3ConfigKey::SecretAccessKey, "env-secret")
            .with_config(AmazonS3ConfigKey::Token, "env-session-token")
            .with_config(AmazonS3ConfigKey::Region, "eu-west-1")
            .with_config(AmazonS3ConfigKey::Endpoint, "https://s3.env.example");
        let value = |b: &AmazonS3Builder, k| b.get_config_value(&k);

        let unset = StorageArgs::local(std::path::Path::new("."));
        let b = unset.s3_over(env.clone(), "bucket");
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Bucket).as_deref(),
            Some("bucket")
        );
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Region).as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Endpoint).as_deref(),
            Some("https://s3.env.example")
        );
        assert_eq!(
            value(&b, AmazonS3ConfigKey::AccessKeyId).as_deref(),
            Some("env-key")
        );

        let flags = StorageArgs {
            s3_region: Some("us-west-2".into()),
            s3_endpoint: Some("http://127.0.0.1:8333".into()),
            s3_access_key_id: Some("flag-key".into()),
            s3_secret_access_key: Some("flag-secret".into()),
            s3_allow_http: true,
            ..unset
        };
        let b = flags.s3_over(env, "bucket");
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Region).as_deref(),
            Some("us-west-2")
        );
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Endpoint).as_deref(),
            Some("http://127.0.0.1:8333")
        );
        assert_eq!(
            value(&b, AmazonS3ConfigKey::AccessKeyId).as_deref(),
            Some("flag-key")
        );
        assert_eq!(
            value(&b, AmazonS3ConfigKey::SecretAccessKey).as_deref(),
            Some("flag-secret")
        );
        // No flag for the session token: the environment's stays.
        assert_eq!(
            value(&b, AmazonS3ConfigKey::Token).as_deref(),
            Some("env-session-token")
        );
        assert!(b.build().is_ok(), "building contacts no server");
    }

    #[test]
    fn empty_s3_keys_are_refused_rather_than_sent() {
        let b = AmazonS3Builder::new()
            .with_config(AmazonS3ConfigKey::AccessKeyId, "")
            .with_config(AmazonS3ConfigKey::SecretAccessKey, "");
        let e = check_keys(&b).unwrap_err().to_string();
        assert!(e.contains("AWS_ACCESS_KEY_ID is set but empty"), "{e}");
        assert!(check_keys(&AmazonS3Builder::new()).is_ok());
    }

    #[test]
    fn s3_references_resolve_inside_the_stores_prefix_only() {
        let s = s3("s3://test/pfx");
        // Keys are relative to the prefix; a full URI names the object itself.
        assert_eq!(
            s.key_of("uploads/m0.safetensors").unwrap(),
            "uploads/m0.safetensors"
        );
        assert_eq!(
            s.key_of("s3://test/pfx/uploads/m0.safetensors").unwrap(),
            "uploads/m0.safetensors"
        );
        let e = s.key_of("s3://test/uploads/x.safetensors").unwrap_err();
        assert!(e.contains("outside the service's prefix"), "{e}");
        assert!(s.key_of("s3://other/pfx/x").unwrap_err().contains("bucket"));
        let plain = s3("s3://test");
        assert_eq!(plain.key_of("s3://test/a/b").unwrap(), "a/b");
    }

    #[tokio::test]
    async fn local_store_creates_once_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(&StorageArgs::local(dir.path())).unwrap();
        assert!(s.get("a/b.json").await.unwrap().is_none());
        s.create("a/b.json", Bytes::from_static(b"one"))
            .await
            .unwrap();
        let err = s
            .create("a/b.json", Bytes::from_static(b"two"))
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::AlreadyExists(_)));
        let (bytes, _) = s.get("a/b.json").await.unwrap().unwrap();
        assert_eq!(&bytes[..], b"one");
        assert!(dir.path().join("a/b.json").exists());
    }

    #[tokio::test]
    async fn memory_store_compares_and_swaps() {
        let s = Storage::open(&StorageArgs {
            url: "memory://".into(),
            ..StorageArgs::local(std::path::Path::new("/unused"))
        })
        .unwrap();
        let v1 = s.create("doc", Bytes::from_static(b"1")).await.unwrap();
        let v2 = s
            .update("doc", Bytes::from_static(b"2"), &v1)
            .await
            .unwrap();
        let stale = s
            .update("doc", Bytes::from_static(b"3"), &v1)
            .await
            .unwrap_err();
        assert!(matches!(stale, WriteError::Conflict(_)), "{stale}");
        s.update("doc", Bytes::from_static(b"3"), &v2)
            .await
            .unwrap();
    }

    #[test]
    fn references_become_keys_of_this_store() {
        let dir = tempfile::tempdir().unwrap();
        let local = Storage::open(&StorageArgs::local(dir.path())).unwrap();
        assert_eq!(
            local.key_of("members/m0.safetensors").unwrap(),
            "members/m0.safetensors"
        );
        assert_eq!(
            local.key_of("store:members/m0.safetensors").unwrap(),
            "members/m0.safetensors"
        );
        assert!(local.key_of("s3://b/k").unwrap_err().contains("S3 URI"));
        assert!(local
            .key_of("../etc/passwd")
            .unwrap_err()
            .contains("not a valid"));
        assert!(local.key_of("http://x/y").is_err());
    }
}
