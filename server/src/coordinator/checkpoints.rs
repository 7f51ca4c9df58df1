//! Existing member checkpoints in the object store: one safetensors file, or
//! a sharded checkpoint named by its Hugging Face index
//! (`.../model.safetensors.index.json`, the shards as keys next to it).
//! [`check_members`] vouches for them at submission from their headers
//! alone; [`fetch`] reads one whole for fusion. Float tensors may be stored
//! in f32, bf16 or f16; the members of one run must agree.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use fusion::arch::{ArchSpec, Architecture};
use fusion::checkpoint::{self, Loaded, Precision, ShardIndex, META_ARCH};
use fusion::state::{Backing, DType};
use futures_util::{StreamExt, TryStreamExt};
use nt_common::Storage;
use safetensors::tensor::{Dtype, Metadata};
use serde::Deserialize;

use crate::error::{CoordinatorError, Result};

/// Shards whose headers are read at once at submission.
const SHARD_READS: usize = 4;

fn invalid(field: &str, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::InvalidArgument(fusion::bounded(format!("{field}: {e}")))
}

/// Checks the existing members `keys` against `arch` and returns the float
/// precision they share. Each is read as far as its size and safetensors
/// header (two ranged reads per file; a sharded member's index is read
/// whole, bounded by [`checkpoint::MAX_INDEX_BYTES`]), not its data:
///
/// * a member that does not exist is `NOT_FOUND`; a shard its index lists
///   that does not exist is `FAILED_PRECONDITION`, naming the shard;
/// * a file that is not safetensors, is truncated or padded, has a tensor of
///   the wrong name, dtype or shape (for a sharded member: across the union
///   of its shards), an index that is not one, a shard holding other tensors
///   than the index places in it, and members of different dtypes are
///   `INVALID_ARGUMENT`, naming the member, shard and tensor.
///
/// Storage errors are `UNAVAILABLE`. Nothing is written.
pub async fn check_members(
    storage: &Storage,
    keys: &[String],
    arch: &Architecture,
) -> Result<Precision> {
    let mut precisions = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let field = format!("members.checkpoints[{i}]");
        let precision = if checkpoint::is_index(key) {
            check_sharded(storage, &field, key, arch).await?
        } else {
            check_file(storage, &field, key, arch).await?
        };
        precisions.push((key.as_str(), precision));
    }
    checkpoint::common_precision(&precisions).map_err(|e| match e {
        fusion::FusionError::Members(why) => invalid("members.checkpoints", why),
        other => invalid("members.checkpoints", other),
    })
}

/// The size of member `key`; `NOT_FOUND` without it.
async fn member_size(storage: &Storage, field: &str, key: &str) -> Result<u64> {
    storage.size(key).await?.ok_or_else(|| {
        CoordinatorError::NotFound(format!(
            "{field}: object `{key}` does not exist in {}",
            storage.url
        ))
    })
}

/// The JSON header of the safetensors object `key` of `size` bytes.
async fn read_header(storage: &Storage, field: &str, key: &str, size: u64) -> Result<Bytes> {
    let first = if size < 8 {
        Bytes::new()
    } else {
        storage.get_range(key, 0..8).await?
    };
    let n = checkpoint::header_len(key, &first, size).map_err(|e| invalid(field, e))?;
    Ok(storage.get_range(key, 8..8 + n).await?)
}

async fn check_file(
    storage: &Storage,
    field: &str,
    key: &str,
    arch: &Architecture,
) -> Result<Precision> {
    let size = member_size(storage, field, key).await?;
    let header = read_header(storage, field, key, size).await?;
    checkpoint::validate_header(key, &header, size, arch).map_err(|e| invalid(field, e))?;
    let parsed = parse_header(key, &header, size).map_err(|e| invalid(field, e))?;
    Ok(parsed.precision.map_or(Precision::F32, |(p, _)| p))
}

/// What a safetensors header says: each tensor's stored dtype and shape,
/// the string metadata, and the precision of its float tensors with the
/// first such tensor's name.
pub(super) struct Header {
    pub(super) tensors: BTreeMap<String, (Dtype, Vec<usize>)>,
    pub(super) metadata: HashMap<String, String>,
    pub(super) precision: Option<(Precision, String)>,
}

/// Parses the header of a file of `size` bytes, checking what loading
/// would: byte ranges contiguous (the parser's check) and ending exactly at
/// the end of the file, only dtypes nt reads, one float precision.
pub(super) fn parse_header(source: &str, header: &[u8], size: u64) -> Result<Header, String> {
    let corrupt = |why: String| {
        format!("checkpoint {source}: not a valid safetensors file ({size} bytes): {why}")
    };
    let meta: Metadata =
        serde_json::from_slice(header).map_err(|e| corrupt(format!("header: {e}")))?;
    let tensors: BTreeMap<String, (Dtype, Vec<usize>)> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, (info.dtype, info.shape.clone())))
        .collect();
    let end = meta
        .tensors()
        .values()
        .map(|info| info.data_offsets.1)
        .max()
        .unwrap_or(0) as u64;
    let data_len = size.saturating_sub(8 + header.len() as u64);
    if end != data_len {
        return Err(corrupt(format!(
            "its tensors take {end} bytes but {data_len} follow the header (truncated or padded)"
        )));
    }
    let mut precision: Option<(Precision, String)> = None;
    for (name, (dtype, _)) in &tensors {
        let Some(p) = precision_of(*dtype) else {
            if *dtype == Dtype::I64 {
                continue;
            }
            return Err(format!(
                "checkpoint {source}: tensor `{name}` has dtype {dtype:?}; nt reads F32, BF16 or F16 weights and I64 counters"
            ));
        };
        match &precision {
            None => precision = Some((p, name.clone())),
            Some((first, _)) if *first == p => {}
            Some((first, first_name)) => {
                return Err(format!(
                    "checkpoint {source}: tensor `{name}` is {p} but `{first_name}` is {first}: a checkpoint's float tensors share one dtype"
                ))
            }
        }
    }
    Ok(Header {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
        precision,
    })
}

fn precision_of(dtype: Dtype) -> Option<Precision> {
    match dtype {
        Dtype::F32 => Some(Precision::F32),
        Dtype::BF16 => Some(Precision::BF16),
        Dtype::F16 => Some(Precision::F16),
        _ => None,
    }
}

/// The parts of an index the check reads beyond [`ShardIndex`]: which
/// shard holds each tensor, and the recorded architecture.
#[derive(Deserialize)]
struct IndexFile {
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    weight_map: BTreeMap<String, String>,
}

/// Refuses a checkpoint whose `nt.arch` metadata is another network.
fn check_recorded(
    metadata: Option<&String>,
    source: &str,
    arch: &Architecture,
) -> Result<(), String> {
    let Some(text) = metadata else {
        return Ok(());
    };
    let recorded = ArchSpec::from_json(text)
        .map_err(|e| format!("checkpoint {source}: its `{META_ARCH}` metadata: {e}"))?;
    checkpoint::check_recorded_arch(&recorded, arch, source).map_err(|e| e.to_string())
}

async fn check_sharded(
    storage: &Storage,
    field: &str,
    key: &str,
    arch: &Architecture,
) -> Result<Precision> {
    let size = member_size(storage, field, key).await?;
    if size > checkpoint::MAX_INDEX_BYTES {
        return Err(invalid(
            field,
            format!(
                "checkpoint {key}: an index of {size} bytes, more than {}",
                checkpoint::MAX_INDEX_BYTES
            ),
        ));
    }
    let bytes = if size == 0 {
        Bytes::new()
    } else {
        storage.get_range(key, 0..size).await?
    };
    let index = ShardIndex::parse(key, &bytes).map_err(|e| invalid(field, e))?;
    let file: IndexFile = serde_json::from_slice(&bytes).map_err(|e| invalid(field, e))?;
    let index_arch = file.metadata.as_ref().and_then(|m| match m.get(META_ARCH) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        _ => None,
    });
    check_recorded(index_arch.as_ref(), key, arch).map_err(|e| invalid(field, e))?;

    let headers: Vec<(String, String, Header)> =
        futures_util::stream::iter(index.shards().iter().cloned())
            .map(|shard| async move {
                let shard_key = checkpoint::shard_key(key, &shard);
                let Some(size) = storage.size(&shard_key).await? else {
                    return Err(CoordinatorError::FailedPrecondition(format!(
                        "{field}: shard `{shard}` listed in the index `{key}` does not exist (`{shard_key}`)"
                    )));
                };
                let header = read_header(storage, field, &shard_key, size).await?;
                let parsed =
                    parse_header(&shard_key, &header, size).map_err(|e| invalid(field, e))?;
                Ok((shard, shard_key, parsed))
            })
            .buffered(SHARD_READS)
            .try_collect()
            .await?;
    let precision =
        check_union(key, &file.weight_map, &headers, arch).map_err(|e| invalid(field, e))?;
    Ok(precision)
}

/// Checks the shards' headers together, as one checkpoint: each holds
/// exactly the tensors the index places in it, their float tensors share
/// one precision, recorded architectures are `arch`, and the union of their
/// tensors has the names, dtypes and shapes of `arch`'s parameters.
fn check_union(
    key: &str,
    weight_map: &BTreeMap<String, String>,
    shards: &[(String, String, Header)],
    arch: &Architecture,
) -> Result<Precision, String> {
    let bad = |why: String| format!("checkpoint {key}: {why}");
    // Each tensor with the shard that holds it.
    let mut union: BTreeMap<&str, (&str, DType, &[usize])> = BTreeMap::new();
    let mut precision: Option<(Precision, &str, &str)> = None;
    for (shard, shard_key, header) in shards {
        check_recorded(header.metadata.get(META_ARCH), shard_key, arch)?;
        if let Some((p, tensor)) = &header.precision {
            match precision {
                None => precision = Some((*p, tensor, shard)),
                Some((first, _, _)) if first == *p => {}
                Some((first, first_tensor, first_shard)) => {
                    return Err(bad(format!(
                        "tensor `{tensor}` in shard `{shard}` is {p} but `{first_tensor}` in shard `{first_shard}` is {first}: a checkpoint's float tensors share one dtype"
                    )))
                }
            }
        }
        for (name, (dtype, shape)) in &header.tensors {
            match weight_map.get(name) {
                Some(listed) if listed == shard => {}
                Some(listed) => {
                    return Err(bad(format!(
                    "shard `{shard}` holds tensor `{name}`, which the index places in `{listed}`"
                )))
                }
                None => {
                    return Err(bad(format!(
                        "shard `{shard}` holds tensor `{name}`, which the index does not list"
                    )))
                }
            }
            let dtype = if *dtype == Dtype::I64 {
                DType::I64
            } else {
                DType::F32
            };
            union.insert(name, (shard, dtype, shape));
        }
    }
    if let Some((name, shard)) = weight_map
        .iter()
        .find(|(name, _)| !union.contains_key(name.as_str()))
    {
        return Err(bad(format!(
            "tensor `{name}` is listed in shard `{shard}`, which does not hold it"
        )));
    }
    let params = arch.params();
    let mut missing = Vec::new();
    for p in &params {
        let Some(&(shard, dtype, shape)) = union.get(p.name.as_str()) else {
            missing.push(format!("`{}`", p.name));
            continue;
        };
        let (what, found, expected) = if dtype != p.dtype {
            ("dtype", dtype.to_string(), p.dtype.to_string())
        } else if shape != p.shape.as_slice() {
            ("shape", format!("{shape:?}"), format!("{:?}", p.shape))
        } else {
            continue;
        };
        return Err(bad(format!(
            "tensor `{}` in shard `{shard}` has {what} {found}, expected {expected} for architecture `{}`",
            p.name,
            arch.name()
        )));
    }
    let known: std::collections::HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
    let unexpected: Vec<String> = union
        .iter()
        .filter(|(name, _)| !known.contains(*name))
        .map(|(name, (shard, _, _))| format!("`{name}` (shard `{shard}`)"))
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        let mut reason = format!("does not match architecture `{}`:", arch.name());
        if !missing.is_empty() {
            reason += &format!(" missing {}", list(&missing));
        }
        if !unexpected.is_empty() {
            if !missing.is_empty() {
                reason += ";";
            }
            reason += &format!(" unexpected {}", list(&unexpected));
        }
        return Err(bad(reason));
    }
    Ok(precision.map_or(Precision::F32, |(p, _, _)| p))
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut out: Vec<String> = names.iter().take(SHOWN).cloned().collect();
    if names.len() > SHOWN {
        out.push(format!("and {} more", names.len() - SHOWN));
    }
    out.join(", ")
}

/// A member's stored bytes, as [`fetch`] read them.
pub struct Fetched {
    key: String,
    /// The index of a sharded member, and its shards' keys and bytes in
    /// the order of [`ShardIndex::shards`].
    sharded: Option<(ShardIndex, Vec<(String, Bytes)>)>,
    /// A single-file member's bytes.
    bytes: Bytes,
}

/// Reads member `key` whole: one file, or its index and every shard. The
/// error names the member and, for a shard, the shard.
pub async fn fetch(storage: &Storage, key: &str) -> Result<Fetched, String> {
    let get = |key: String| async move {
        match storage.get(&key).await {
            Ok(Some((bytes, _))) => Ok(Some(bytes)),
            Ok(None) => Ok(None),
            Err(e) => Err(format!("reading `{key}`: {e}")),
        }
    };
    let missing = || format!("member checkpoint `{key}` does not exist");
    if !checkpoint::is_index(key) {
        let bytes = get(key.to_string()).await?.ok_or_else(missing)?;
        return Ok(Fetched {
            key: key.to_string(),
            sharded: None,
            bytes,
        });
    }
    let size = storage
        .size(key)
        .await
        .map_err(|e| format!("reading `{key}`: {e}"))?
        .ok_or_else(missing)?;
    if size > checkpoint::MAX_INDEX_BYTES {
        return Err(format!(
            "checkpoint {key}: an index of {size} bytes, more than {}",
            checkpoint::MAX_INDEX_BYTES
        ));
    }
    let bytes = get(key.to_string()).await?.ok_or_else(missing)?;
    let index = ShardIndex::parse(key, &bytes).map_err(|e| e.to_string())?;
    let mut shards = Vec::with_capacity(index.shards().len());
    for shard in index.shards() {
        let shard_key = checkpoint::shard_key(key, shard);
        let bytes = get(shard_key.clone()).await?.ok_or_else(|| {
            format!("checkpoint {key}: shard `{shard}` listed in the index does not exist (`{shard_key}`)")
        })?;
        shards.push((shard_key, bytes));
    }
    Ok(Fetched {
        key: key.to_string(),
        sharded: Some((index, shards)),
        bytes: Bytes::new(),
    })
}

impl Fetched {
    /// Parses the bytes into f32 tensors and says how they were stored
    /// (CPU work: call it on a blocking thread).
    pub fn load(self) -> fusion::Result<Loaded> {
        match self.sharded {
            None => checkpoint::read_bytes(&self.key, Vec::from(self.bytes)),
            Some((index, shards)) => index.assemble(
                shards
                    .into_iter()
                    .map(|(key, bytes)| (key, Arc::new(bytes) as Backing))
                    .collect(),
            ),
        }
    }
}
