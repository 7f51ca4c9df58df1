//! Sharded checkpoints in the Hugging Face layout: an index,
//! `model.safetensors.index.json`,
//!
//! ```json
//! {"metadata": {"total_size": 123, "nt.arch": "..."},
//!  "weight_map": {"fc1.weight": "model-00001-of-00002.safetensors", ...}}
//! ```
//!
//! and the safetensors shards it names, in its folder. Reading is sans-IO:
//! [`ShardIndex::parse`] reads an index, the caller fetches its
//! [`ShardIndex::shards`] (files, or objects of a store, [`shard_key`]) and
//! [`ShardIndex::assemble`] checks and joins them. [`save_with`] writes one
//! file, or shards above a size.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Precision;
use super::{file_metadata, parse, stored_len, write_atomic, write_file, Loaded, TensorRef};
use crate::state::{Backing, StateDict};
use crate::{FusionError, Result};

/// How an index's file name ends.
pub const INDEX_SUFFIX: &str = ".index.json";
/// The index a folder holding a sharded checkpoint is read from.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The checkpoint a folder holding a single-file checkpoint is read from.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The largest index read (as the largest safetensors header).
pub const MAX_INDEX_BYTES: u64 = super::MAX_HEADER_BYTES;
/// The most shards one checkpoint may have, read or written.
pub const MAX_SHARDS: usize = 10_000;
/// The size above which [`SaveOptions::default`] shards: 2 GiB of tensors.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 2 << 30;

/// Whether `name` (a path or a key) names a sharded checkpoint's index.
pub fn is_index(name: &str) -> bool {
    name.ends_with(INDEX_SUFFIX)
}

/// The key of `shard` next to the index `index_key` (keys separate folders
/// with `/`).
pub fn shard_key(index_key: &str, shard: &str) -> String {
    match index_key.rfind('/') {
        Some(i) => format!("{}/{shard}", &index_key[..i]),
        None => shard.to_string(),
    }
}

/// The checkpoint a folder holds (its index, else `model.safetensors`);
/// any other path as it is.
pub(super) fn resolve_folder(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    for name in [INDEX_FILE, SINGLE_FILE] {
        let candidate = path.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(FusionError::checkpoint(
        path.display().to_string(),
        format!("a folder with neither {INDEX_FILE} nor {SINGLE_FILE}"),
    ))
}

/// An index file's bytes, refused past [`MAX_INDEX_BYTES`].
pub(super) fn read_index_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| FusionError::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_INDEX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FusionError::io(path, e))?;
    Ok(bytes)
}

#[derive(Deserialize)]
struct IndexFile {
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    weight_map: BTreeMap<String, String>,
}

/// A parsed index: which shard holds each tensor, and the metadata the
/// checkpoint records.
#[derive(Clone, Debug)]
pub struct ShardIndex {
    source_name: String,
    /// The index's string metadata (`total_size` and other numbers aside).
    metadata: BTreeMap<String, String>,
    weight_map: BTreeMap<String, String>,
    /// The distinct shards, in name order.
    shards: Vec<String>,
}

impl ShardIndex {
    /// Reads an index; `source_name` names it in errors. Every shard must be
    /// a relative name inside the index's folder (no `..`, no absolute path).
    pub fn parse(source_name: &str, bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| FusionError::checkpoint(source_name, why);
        if bytes.len() as u64 > MAX_INDEX_BYTES {
            return Err(bad(format!(
                "an index of more than {MAX_INDEX_BYTES} bytes"
            )));
        }
        let file: IndexFile = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not a valid sharded checkpoint index: {e}")))?;
        if file.weight_map.is_empty() {
            return Err(bad("the index's weight_map lists no tensors".into()));
        }
        let mut shards = BTreeSet::new();
        for (tensor, shard) in &file.weight_map {
            if !shards.contains(shard.as_str()) {
                if !is_plain_relative(shard) {
                    return Err(bad(format!(
                        "tensor `{tensor}` is in shard `{shard}`, which is not a file inside the index's folder"
                    )));
                }
                if shards.len() == MAX_SHARDS {
                    return Err(bad(format!("more than {MAX_SHARDS} shards")));
                }
                shards.insert(shard.as_str());
            }
        }
        let shards = shards.into_iter().map(str::to_string).collect();
        let metadata = file
            .metadata
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(s) => Some((k, s)),
                _ => None,
            })
            .collect();
        Ok(ShardIndex {
            source_name: source_name.to_string(),
            metadata,
            weight_map: file.weight_map,
            shards,
        })
    }

    /// The shards to fetch, relative to the index's folder, in the order
    /// [`ShardIndex::assemble`] takes them.
    pub fn shards(&self) -> &[String] {
        &self.shards
    }

    /// Joins the shards (each with the name its errors give, in the order
    /// of [`ShardIndex::shards`]) into one checkpoint: every shard holds
    /// exactly the tensors the index places in it, their float tensors share
    /// one precision, and the `nt.*` metadata of the index and the shards
    /// agree.
    pub fn assemble(&self, shards: Vec<(String, Backing)>) -> Result<Loaded> {
        let bad = |why: String| FusionError::checkpoint(&self.source_name, why);
        if shards.len() != self.shards.len() {
            return Err(bad(format!(
                "the index names {} shards, {} were given",
                self.shards.len(),
                shards.len()
            )));
        }
        let mut state = StateDict {
            metadata: self.metadata.clone(),
            ..StateDict::default()
        };
        // Where each metadata entry was first seen, for errors.
        let mut seen_in: HashMap<String, String> = self
            .metadata
            .keys()
            .map(|k| (k.clone(), "the index".to_string()))
            .collect();
        let mut precision: Option<(Precision, String)> = None;
        for (shard, (source, backing)) in self.shards.iter().zip(shards) {
            let parsed = parse(&source, backing)?;
            if let Some((p, tensor)) = parsed.precision {
                if let Some((first, first_tensor)) = &precision {
                    if *first != p {
                        return Err(bad(format!(
                            "tensor `{tensor}` in shard `{shard}` is {p} but `{first_tensor}` is {first}: a checkpoint's float tensors share one dtype"
                        )));
                    }
                } else {
                    precision = Some((p, tensor));
                }
            }
            for (key, value) in parsed.state.metadata {
                match state.metadata.get(&key) {
                    None => {
                        seen_in.insert(key.clone(), format!("shard `{shard}`"));
                        state.metadata.insert(key, value);
                    }
                    Some(earlier) if *earlier != value && key.starts_with("nt.") => {
                        let first = seen_in.get(&key).map_or("", String::as_str);
                        return Err(bad(format!(
                            "shard `{shard}` records `{key}` differently from {first}"
                        )));
                    }
                    Some(_) => {}
                }
            }
            for (name, tensor) in parsed.state.tensors {
                match self.weight_map.get(&name) {
                    Some(listed) if listed == shard => state.insert(name, tensor),
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
            }
        }
        if let Some((name, shard)) = self
            .weight_map
            .iter()
            .find(|(name, _)| !state.tensors.contains_key(name.as_str()))
        {
            return Err(bad(format!(
                "tensor `{name}` is listed in shard `{shard}`, which does not hold it"
            )));
        }
        Ok(Loaded {
            state,
            precision: precision.map_or(Precision::F32, |(p, _)| p),
        })
    }
}

/// A relative path of plain names: no root, no `..`, `.` or empty parts.
fn is_plain_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(['\\', '\0', ':'])
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// How [`save_with`] writes a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaveOptions {
    /// The precision of the float tensors.
    pub precision: Precision,
    /// Above this many bytes of tensors, the checkpoint is written in shards
    /// of at most this size (a larger tensor gets a shard of its own).
    pub max_shard_bytes: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            precision: Precision::F32,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// What [`save_with`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    /// What to read back: the file, or the index of the shards.
    pub path: PathBuf,
    /// The shards, in order; empty for a single file.
    pub shards: Vec<PathBuf>,
    pub precision: Precision,
    /// The bytes of tensor data written.
    pub tensor_bytes: u64,
}

/// Writes a checkpoint with its float tensors rounded to
/// `options.precision`. Up to `options.max_shard_bytes` of tensors it is one
/// file, `path` (`path/model.safetensors` when `path` is a folder); above,
/// shards in the Hugging Face layout next to it: `STEM-00001-of-0000N.safetensors`
/// and the index `STEM.safetensors.index.json`, for `path` =
/// `STEM.safetensors`. The architecture and lineage are in every shard's
/// metadata and the index's.
///
/// Every file is written to a temporary file and renamed into place, the
/// index last; then the other form's files under the same name (a single
/// file replaced by shards, or an earlier index and its shards) are removed,
/// so `path` or its folder never reads back an older checkpoint.
pub fn save_with(path: &Path, state: &StateDict, options: &SaveOptions) -> Result<Saved> {
    let target = if path.is_dir() {
        path.join(SINGLE_FILE)
    } else {
        path.to_path_buf()
    };
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            FusionError::checkpoint(target.display().to_string(), "not a file name to write")
        })?;
    let dir = target.parent().unwrap_or(Path::new("")).to_path_buf();
    let index_path = dir.join(format!("{file_name}{INDEX_SUFFIX}"));
    let precision = options.precision;
    let sizes: Vec<(&str, u64)> = state
        .tensors
        .iter()
        .map(|(name, t)| (name.as_str(), stored_len(t, precision) as u64))
        .collect();
    let total: u64 = sizes.iter().map(|&(_, n)| n).sum();
    let earlier = earlier_shards(&index_path);
    if total <= options.max_shard_bytes {
        let views = state
            .tensors
            .iter()
            .map(|(k, v)| (k.as_str(), TensorRef::new(v, precision)))
            .collect();
        write_file(&target, views, file_metadata(state))?;
        remove_stale(Some(&index_path), &earlier, &[file_name], &dir);
        return Ok(Saved {
            path: target,
            shards: Vec::new(),
            precision,
            tensor_bytes: total,
        });
    }
    let groups = pack(&sizes, options.max_shard_bytes);
    if groups.len() > MAX_SHARDS {
        return Err(FusionError::checkpoint(
            target.display().to_string(),
            format!(
                "{total} bytes of tensors would take {} shards of at most {} bytes; the most is {MAX_SHARDS}",
                groups.len(),
                options.max_shard_bytes
            ),
        ));
    }
    let stem = file_name.strip_suffix(".safetensors").unwrap_or(&file_name);
    let n = groups.len();
    let names: Vec<String> = (1..=n)
        .map(|i| format!("{stem}-{i:05}-of-{n:05}.safetensors"))
        .collect();
    let mut weight_map = BTreeMap::new();
    let mut shards = Vec::with_capacity(n);
    for (group, name) in groups.iter().zip(&names) {
        let views = group
            .iter()
            .filter_map(|&tensor| {
                let t = state.tensors.get(tensor)?;
                weight_map.insert(tensor.to_string(), name.clone());
                Some((tensor, TensorRef::new(t, precision)))
            })
            .collect();
        let shard = dir.join(name);
        write_file(&shard, views, file_metadata(state))?;
        shards.push(shard);
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("total_size".into(), total.into());
    for (k, v) in &state.metadata {
        metadata.insert(k.clone(), v.clone().into());
    }
    let index = serde_json::json!({ "metadata": metadata, "weight_map": weight_map });
    let text = serde_json::to_vec_pretty(&index)
        .map_err(|e| FusionError::checkpoint(index_path.display().to_string(), e.to_string()))?;
    write_atomic(&index_path, |tmp| {
        std::fs::write(tmp, &text).map_err(|e| e.to_string())
    })?;
    if target.is_file() {
        let _ = std::fs::remove_file(&target);
    }
    remove_stale(None, &earlier, &names, &dir);
    Ok(Saved {
        path: index_path,
        shards,
        precision,
        tensor_bytes: total,
    })
}

/// Tensors in name order, a new shard whenever the next would take the
/// current one past `max` bytes.
fn pack<'a>(sizes: &[(&'a str, u64)], max: u64) -> Vec<Vec<&'a str>> {
    let mut groups = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut bytes = 0u64;
    for &(name, size) in sizes {
        if !current.is_empty() && bytes.saturating_add(size) > max {
            groups.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(name);
        bytes = bytes.saturating_add(size);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// The shards an existing index at `index_path` names (none when there is
/// none or it cannot be read).
fn earlier_shards(index_path: &Path) -> Vec<String> {
    let Ok(bytes) = read_index_file(index_path) else {
        return Vec::new();
    };
    ShardIndex::parse(&index_path.display().to_string(), &bytes)
        .map(|index| index.shards)
        .unwrap_or_default()
}

/// Removes, best effort, an index that no longer applies and the earlier
/// shards that are not among the ones just written.
fn remove_stale(index: Option<&Path>, earlier: &[String], written: &[String], dir: &Path) {
    if let Some(index) = index.filter(|p| p.is_file()) {
        let _ = std::fs::remove_file(index);
    }
    for shard in earlier.iter().filter(|s| !written.contains(s)) {
        let _ = std::fs::remove_file(dir.join(shard));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{preset, Architecture};
    use crate::checkpoint::{load, read, validate, Lineage};
    use crate::state::HostTensor;

    fn small() -> (Architecture, StateDict) {
        let arch =
            Architecture::new(preset("mlp:input=4,hidden=3,depth=2,classes=2,bias=true").unwrap())
                .unwrap();
        let mut state = StateDict::default();
        for (k, p) in arch.params().into_iter().enumerate() {
            let n = p.shape.iter().product::<usize>();
            let values = (0..n).map(|i| (i + k) as f32 * 0.25 - 1.0).collect();
            state.insert(p.name, HostTensor::f32(p.shape, values));
        }
        state.set_arch(arch.spec());
        state.set_lineage(&Lineage {
            method: "nt".into(),
            ..Lineage::default()
        });
        (arch, state)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn sharded(dir: &Path, precision: Precision) -> (Architecture, StateDict, Saved) {
        let (arch, state) = small();
        let options = SaveOptions {
            precision,
            max_shard_bytes: 24,
        };
        let saved = save_with(&dir.join("model.safetensors"), &state, &options).unwrap();
        (arch, state, saved)
    }

    #[test]
    fn sharded_write_and_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (arch, state, saved) = sharded(dir.path(), Precision::BF16);
        assert_eq!(saved.path, dir.path().join(INDEX_FILE));
        let n = saved.shards.len();
        assert!(n >= 3, "{n} shards");
        let mut expected: Vec<String> = (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect();
        expected.push(INDEX_FILE.into());
        expected.sort();
        assert_eq!(names(dir.path()), expected);
        // The tensors' bytes (bf16: 2 each) are the index's total_size.
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&saved.path).unwrap()).unwrap();
        let elements = state.float_numel() as u64;
        assert_eq!(index["metadata"]["total_size"], elements * 2);
        assert_eq!(saved.tensor_bytes, elements * 2);
        assert!(index["metadata"]["nt.arch"].is_string());
        // The folder, the index and each form of path read the same.
        for path in [dir.path().to_path_buf(), saved.path.clone()] {
            let loaded = read(&path).unwrap();
            assert_eq!(loaded.precision, Precision::BF16);
            validate(&loaded.state, &arch, "sharded").unwrap();
            assert_eq!(loaded.state.arch().unwrap().unwrap(), *arch.spec());
            assert_eq!(loaded.state.lineage().unwrap().method, "nt");
            for (name, t) in &state.tensors {
                // Quarter steps below 8 are bf16 values: exact.
                assert_eq!(
                    loaded.state.get(name).unwrap().as_f32(),
                    t.as_f32(),
                    "{name}"
                );
            }
        }
        // Every shard carries the architecture on its own.
        let shard = crate::checkpoint::load(&saved.shards[0]).unwrap();
        assert_eq!(shard.arch().unwrap().unwrap(), *arch.spec());
    }

    #[test]
    fn one_form_replaces_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let (_, state, _) = sharded(dir.path(), Precision::F32);
        // A single file under the same name replaces the index and its shards.
        let saved = save_with(dir.path(), &state, &SaveOptions::default()).unwrap();
        assert_eq!(saved.path, dir.path().join(SINGLE_FILE));
        assert!(saved.shards.is_empty());
        assert_eq!(names(dir.path()), [SINGLE_FILE]);
        // And shards replace the single file.
        let (_, _, saved) = sharded(dir.path(), Precision::F16);
        assert!(!dir.path().join(SINGLE_FILE).exists());
        assert_eq!(names(dir.path()).len(), saved.shards.len() + 1);
        assert_eq!(read(dir.path()).unwrap().precision, Precision::F16);
        // Fewer, larger shards leave none of the earlier ones behind.
        let options = SaveOptions {
            precision: Precision::F16,
            max_shard_bytes: 50,
        };
        let fewer = save_with(&dir.path().join(SINGLE_FILE), &state, &options).unwrap();
        assert!(fewer.shards.len() < saved.shards.len());
        assert_eq!(names(dir.path()).len(), fewer.shards.len() + 1);
        assert_eq!(load(dir.path()).unwrap().tensors.len(), state.tensors.len());
    }

    #[test]
    fn a_missing_shard_is_named_with_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, saved) = sharded(dir.path(), Precision::BF16);
        let gone = saved.shards[1]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        std::fs::remove_file(&saved.shards[1]).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(INDEX_FILE) && err.contains(&format!("shard `{gone}`")),
            "{err}"
        );
    }

    fn with_index(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let path = dir.join(INDEX_FILE);
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut index);
        std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
        read(&path).unwrap_err().to_string()
    }

    #[test]
    fn an_index_that_lies_about_its_shards_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, saved) = sharded(dir.path(), Precision::BF16);
        let first = saved.shards[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // A tensor listed in a shard that does not hold it.
        let err = with_index(dir.path(), |i| {
            i["weight_map"]["fc9.weight"] = first.clone().into();
        });
        assert!(
            err.contains("tensor `fc9.weight` is listed in shard") && err.contains(&first),
            "{err}"
        );
        // A tensor the index places in another shard: `fc2.bias` is in the
        // third shard (with `fc2.weight`), not the fourth.
        let shard = |i: usize| {
            saved.shards[i]
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        let err = with_index(dir.path(), |i| {
            let map = i["weight_map"].as_object_mut().unwrap();
            map.remove("fc9.weight");
            assert_eq!(map["fc2.bias"], shard(2));
            map.insert("fc2.bias".into(), shard(3).into());
        });
        assert!(
            err.contains(&format!(
                "shard `{}` holds tensor `fc2.bias`, which the index places in `{}`",
                shard(2),
                shard(3)
            )),
            "{err}"
        );
        // Shards outside the folder.
        for escape in ["../x.safetensors", "/etc/passwd", "a/../../b", "", "C:\\x"] {
            let err = with_index(dir.path(), |i| {
                i["weight_map"]["fc1.weight"] = escape.into();
            });
            assert!(
                err.contains(&format!("shard `{escape}`"))
                    && err.contains("not a file inside the index's folder"),
                "{escape}: {err}"
            );
        }
    }

    #[test]
    fn malformed_indexes_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors.index.json");
        for text in [
            "",
            "{",
            "[]",
            "{\"weight_map\": []}",
            "{\"weight_map\": {}}",
            "{\"metadata\": 3, \"weight_map\": {\"a\": \"b\"}}",
            "{\"weight_map\": {\"a\": 7}}",
        ] {
            std::fs::write(&path, text).unwrap();
            let err = read(&path).unwrap_err().to_string();
            assert!(err.contains("m.safetensors.index.json"), "{text}: {err}");
        }
        // Many shards: refused past the limit before any is opened.
        let map: serde_json::Map<String, serde_json::Value> = (0..=MAX_SHARDS)
            .map(|i| (format!("t{i}"), format!("s{i}.safetensors").into()))
            .collect();
        let text = serde_json::json!({ "weight_map": map }).to_string();
        let err = ShardIndex::parse("big", text.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 10000 shards"), "{err}");
        // A folder with no checkpoint.
        let empty = tempfile::tempdir().unwrap();
        let err = read(empty.path()).unwrap_err().to_string();
        assert!(
            err.contains(INDEX_FILE) && err.contains(SINGLE_FILE),
            "{err}"
        );
    }

    #[test]
    fn shards_disagreeing_on_dtype_or_architecture_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, state, saved) = sharded(dir.path(), Precision::BF16);
        let index = ShardIndex::parse("idx", &std::fs::read(&saved.path).unwrap()).unwrap();
        let shard_state = |i: usize| {
            let mut s = StateDict::default();
            for (t, shard) in &index.weight_map {
                if *shard == index.shards()[i] {
                    s.insert(t.clone(), state.get(t).unwrap().clone());
                }
            }
            s.metadata = state.metadata.clone();
            s
        };
        let bytes = |i: usize, p: Precision, s: &StateDict| -> (String, Backing) {
            let b = crate::checkpoint::to_bytes_as(s, p).unwrap();
            (format!("shard{i}"), std::sync::Arc::new(b))
        };
        let mut shards: Vec<_> = (0..index.shards().len())
            .map(|i| bytes(i, Precision::BF16, &shard_state(i)))
            .collect();
        assert_eq!(
            index.assemble(shards.clone()).unwrap().precision,
            Precision::BF16
        );
        shards[1] = bytes(1, Precision::F16, &shard_state(1));
        let err = index.assemble(shards.clone()).unwrap_err().to_string();
        assert!(
            err.contains("is f16 but") && err.contains("is bf16"),
            "{err}"
        );
        let mut renamed = shard_state(1);
        let mut spec = renamed.arch().unwrap().unwrap();
        spec.name = "other".into();
        renamed.set_arch(&spec);
        shards[1] = bytes(1, Precision::BF16, &renamed);
        let err = index.assemble(shards).unwrap_err().to_string();
        assert!(
            err.contains("records `nt.arch` differently from the index"),
            "{err}"
        );
    }

    #[test]
    fn keys_of_shards_sit_next_to_their_index() {
        assert_eq!(
            shard_key(
                "runs/r1/m.safetensors.index.json",
                "m-00001-of-00002.safetensors"
            ),
            "runs/r1/m-00001-of-00002.safetensors"
        );
        assert_eq!(shard_key("m.safetensors.index.json", "a"), "a");
        assert!(is_index("x/model.safetensors.index.json"));
        assert!(!is_index("x/model.safetensors"));
    }
}
