//! The decoded-images cache: an image folder's pixels after decoding,
//! resizing and cropping, stored as one safetensors object under a key that
//! hashes the source's listing (names, sizes, versions) and the transform.
//! A changed, added or removed file, or another input size, gives another
//! key; the next task (and the next night) with the same inputs reads the
//! pixels back instead of decoding again.

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sha2::{Digest, Sha256};

use super::{ImageSet, Listed};
use crate::{Result, RuntimeError};

/// The format tag in a cache object's metadata (and in the key's hash).
pub const FORMAT: &str = "nt.data-cache/v1";

/// Where decoded data sets are kept: a folder, or the object store.
pub trait DataCache: Sync {
    /// The key (object key or path) of a cache entry.
    fn key(&self, digest: &str) -> String;
    /// The entry's bytes; `Ok(None)` when there is none.
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Stores an entry whole (a reader never sees half of one).
    fn write(&self, key: &str, bytes: Vec<u8>) -> Result<()>;
}

/// A cache in a local folder: `NT_DATA_CACHE`, else `$XDG_CACHE_HOME/nt/data`,
/// else `~/.cache/nt/data`.
pub struct DirCache(pub PathBuf);

impl DirCache {
    /// The default folder, or `None` when no variable names one.
    pub fn default_dir() -> Option<PathBuf> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        var("NT_DATA_CACHE").map(PathBuf::from).or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|d| d.join("nt").join("data"))
        })
    }
}

impl DataCache for DirCache {
    fn key(&self, digest: &str) -> String {
        self.0
            .join(format!("{digest}.safetensors"))
            .display()
            .to_string()
    }

    fn read(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match std::fs::read(key) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RuntimeError::io(key, e)),
        }
    }

    fn write(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        std::fs::create_dir_all(&self.0).map_err(|e| RuntimeError::io(&self.0, e))?;
        let tmp = format!("{key}.{}.tmp", std::process::id());
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, key))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                RuntimeError::io(key, e)
            })
    }
}

/// The hex SHA-256 naming a decoded set: the format tag, the source, the
/// transform and every listed file with its size and version.
pub fn digest(source: &str, transform: &str, listing: &[&Listed]) -> String {
    let mut hash = Sha256::new();
    for part in [FORMAT, source, transform] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    for entry in listing {
        hash.update(format!("{}\t{}\t{}\n", entry.name, entry.size, entry.version).as_bytes());
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What a cache entry holds.
#[derive(Clone, Debug, Default)]
pub struct Cached {
    pub train: ImageSet,
    pub test: Option<ImageSet>,
    pub classes: Vec<String>,
    /// The files skipped when decoding (`skip_bad`), with the reason.
    pub skipped: Vec<String>,
}

fn label_bytes(labels: &[i64]) -> Vec<u8> {
    labels.iter().flat_map(|l| l.to_le_bytes()).collect()
}

/// Serialises a decoded set.
pub fn encode(cached: &Cached) -> Result<Vec<u8>> {
    let failed = |e: safetensors::SafeTensorError| {
        RuntimeError::Data(format!("encoding the decoded-data cache: {e}"))
    };
    let splits: Vec<(&str, &ImageSet, Vec<u8>)> = std::iter::once(("train", &cached.train))
        .chain(cached.test.as_ref().map(|t| ("test", t)))
        .map(|(name, set)| (name, set, label_bytes(&set.labels)))
        .collect();
    let mut views = Vec::new();
    for (name, set, labels) in &splits {
        let [c, h, w] = set.shape;
        views.push((
            format!("{name}.images"),
            TensorView::new(Dtype::U8, vec![set.len(), c, h, w], &set.images).map_err(failed)?,
        ));
        views.push((
            format!("{name}.labels"),
            TensorView::new(Dtype::I64, vec![set.len()], labels).map_err(failed)?,
        ));
    }
    let json = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    let meta = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("classes".to_string(), json(&cached.classes)),
        ("skipped".to_string(), json(&cached.skipped)),
    ]);
    safetensors::tensor::serialize(views, Some(meta)).map_err(failed)
}

/// Reads a cache entry back; anything malformed is an error (the caller
/// decodes again).
pub fn decode(key: &str, bytes: &[u8]) -> Result<Cached> {
    let bad = |what: String| RuntimeError::Data(format!("{key}: {what}"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a cache entry ({e})")))?;
    let tensors = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a cache entry ({e})")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("not a {FORMAT} entry")));
    }
    let list = |name: &str| -> Result<Vec<String>> {
        serde_json::from_str(meta.get(name).map_or("[]", String::as_str))
            .map_err(|e| bad(format!("metadata `{name}` ({e})")))
    };
    let split = |name: &str| -> Result<Option<ImageSet>> {
        let Ok(images) = tensors.tensor(&format!("{name}.images")) else {
            return Ok(None);
        };
        let labels = tensors
            .tensor(&format!("{name}.labels"))
            .map_err(|_| bad(format!("{name}.images without {name}.labels")))?;
        match (
            images.dtype(),
            images.shape(),
            labels.dtype(),
            labels.shape(),
        ) {
            (Dtype::U8, &[n, c, h, w], Dtype::I64, &[m]) if n == m => Ok(Some(ImageSet {
                images: images.data().to_vec(),
                labels: labels
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .collect(),
                shape: [c, h, w],
            })),
            _ => Err(bad(format!(
                "tensors of split {name} have unexpected types or shapes"
            ))),
        }
    };
    Ok(Cached {
        train: split("train")?.ok_or_else(|| bad("no training split".into()))?,
        test: split("test")?,
        classes: list("classes")?,
        skipped: list("skipped")?,
    })
}
