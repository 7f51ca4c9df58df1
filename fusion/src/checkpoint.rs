//! Checkpoints: safetensors files with PyTorch `state_dict` names, so members
//! trained in PyTorch can be fused and fused models load back into PyTorch.
//! The architecture spec and the lineage travel in the safetensors metadata.
//!
//! Float tensors are stored in f32, bf16 or f16 and always read into f32
//! ([`Precision`]; [`read`] says which it was); [`save_with`] rounds them
//! back and shards large checkpoints in the Hugging Face layout
//! ([`ShardIndex`]).
//!
//! Loading never panics on bad input: a truncated or corrupt file, a tensor of
//! the wrong dtype or shape, a missing or unexpected name are errors that name
//! the file and the tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::arch::{ArchSpec, Architecture};
use crate::state::{Backing, DType, HostTensor, StateDict};
use crate::{FusionError, Result};

mod precision;
mod sharded;

pub use precision::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Precision};
pub use sharded::{
    is_index, save_with, shard_key, SaveOptions, Saved, ShardIndex, DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE, MAX_INDEX_BYTES, MAX_SHARDS, SINGLE_FILE,
};

/// Metadata key holding the architecture spec as JSON.
pub const META_ARCH: &str = "nt.arch";
/// Metadata key holding the [`Lineage`] as JSON.
pub const META_LINEAGE: &str = "nt.lineage";

/// Metadata key holding the [`InputSpec`] as JSON.
pub const META_INPUT: &str = "nt.input";

/// How a model's inputs are prepared: its data set and the per-channel
/// normalisation (`(pixel / 255 - mean) / std`) it was trained with. Fused
/// and fine-tuned models keep their members'; evaluation uses it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub dataset: String,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Where a model came from: recorded in its checkpoint's metadata.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// `trained`, `nt`, `nt-iterative`, `nt-hierarchical`, `concat`, `average`, `fine-tuned`, ...
    pub method: String,
    /// The checkpoints (paths or URIs) this model was made from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// The run that made it, when a run did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Measured figures (accuracy, loss, seconds, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Free-form settings worth keeping (seed, epochs, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub notes: BTreeMap<String, String>,
}

impl StateDict {
    /// Records the architecture in the metadata.
    pub fn set_arch(&mut self, spec: &ArchSpec) {
        self.metadata.insert(META_ARCH.into(), spec.to_json());
    }

    /// The architecture recorded in the metadata, if any.
    pub fn arch(&self) -> Option<Result<ArchSpec>> {
        self.metadata.get(META_ARCH).map(|text| {
            ArchSpec::from_json(text)
                .map_err(|e| FusionError::spec(format!("recorded in the checkpoint metadata: {e}")))
        })
    }

    pub fn set_lineage(&mut self, lineage: &Lineage) {
        if let Ok(text) = serde_json::to_string(lineage) {
            self.metadata.insert(META_LINEAGE.into(), text);
        }
    }

    pub fn set_input(&mut self, input: &InputSpec) {
        if let Ok(text) = serde_json::to_string(input) {
            self.metadata.insert(META_INPUT.into(), text);
        }
    }

    /// The input preparation recorded in the metadata, if any and readable.
    pub fn input(&self) -> Option<InputSpec> {
        self.metadata
            .get(META_INPUT)
            .and_then(|text| serde_json::from_str(text).ok())
    }

    /// The lineage recorded in the metadata, if any and readable.
    pub fn lineage(&self) -> Option<Lineage> {
        self.metadata
            .get(META_LINEAGE)
            .and_then(|text| serde_json::from_str(text).ok())
    }
}

/// A checkpoint as read: its float tensors in f32 (integer buffers in i64),
/// whatever precision they were stored in, and that precision.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub state: StateDict,
    /// How the float tensors were stored (`F32` when there are none).
    pub precision: Precision,
}

/// Reads a checkpoint: a safetensors file, the index of a sharded one
/// (`*.safetensors.index.json`, its shards next to it), or a folder holding
/// `model.safetensors.index.json` or `model.safetensors`. Float tensors
/// stored in bf16 or f16 are widened to f32 (exactly); f32 tensors borrow
/// from a memory map of their file when aligned, so loading copies nothing.
pub fn read(path: &Path) -> Result<Loaded> {
    let path = sharded::resolve_folder(path)?;
    let name = path.display().to_string();
    if !sharded::is_index(&name) {
        return parse(&name, map_file(&path)?).map(Parsed::into_loaded);
    }
    let index = ShardIndex::parse(&name, &sharded::read_index_file(&path)?)?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let shards = index
        .shards()
        .iter()
        .map(|shard| {
            let file = dir.join(shard);
            match map_file(&file) {
                Ok(map) => Ok((file.display().to_string(), map)),
                Err(FusionError::Io { source, .. }) => Err(FusionError::checkpoint(
                    &name,
                    format!(
                        "shard `{shard}` listed in the index cannot be read ({}): {source}",
                        file.display()
                    ),
                )),
                Err(e) => Err(e),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    index.assemble(shards)
}

/// Loads a checkpoint as [`read`] does, without saying its precision.
pub fn load(path: &Path) -> Result<StateDict> {
    read(path).map(|loaded| loaded.state)
}

fn map_file(path: &Path) -> Result<Backing> {
    let file = std::fs::File::open(path).map_err(|e| FusionError::io(path, e))?;
    // SAFETY: the map is read-only; like every safetensors reader we assume
    // the file is not truncated underneath us while it is in use.
    // Populated: every tensor is read anyway, and faulting the pages in here
    // makes loading, not the fusion after it, pay for reading the file.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
        .map_err(|e| FusionError::io(path, e))?;
    Ok(Arc::new(map))
}

/// Reads a single-file checkpoint held in memory (for example, downloaded
/// from object storage); a sharded one is read with [`ShardIndex`].
pub fn read_bytes(source_name: &str, bytes: Vec<u8>) -> Result<Loaded> {
    parse(source_name, Arc::new(bytes)).map(Parsed::into_loaded)
}

/// Loads a checkpoint held in memory, as [`read_bytes`] does, without
/// saying its precision.
pub fn load_bytes(source_name: &str, bytes: Vec<u8>) -> Result<StateDict> {
    read_bytes(source_name, bytes).map(|loaded| loaded.state)
}

/// The one precision the members of a fusion share; when they differ, an
/// error naming each member and its precision.
pub fn common_precision<S: AsRef<str>>(members: &[(S, Precision)]) -> Result<Precision> {
    let Some(&(_, first)) = members.first() else {
        return Ok(Precision::F32);
    };
    if members.iter().all(|&(_, p)| p == first) {
        return Ok(first);
    }
    let each: Vec<String> = members
        .iter()
        .map(|(name, p)| format!("{} is {p}", name.as_ref()))
        .collect();
    Err(FusionError::Members(crate::bounded(format!(
        "members disagree on dtype: {}; convert them to one dtype first",
        each.join(", ")
    ))))
}

/// One file's tensors, and the precision of its float tensors with the
/// name of the first one (none without float tensors).
pub(crate) struct Parsed {
    pub(crate) state: StateDict,
    pub(crate) precision: Option<(Precision, String)>,
}

impl Parsed {
    fn into_loaded(self) -> Loaded {
        Loaded {
            state: self.state,
            precision: self.precision.map_or(Precision::F32, |(p, _)| p),
        }
    }
}

/// The dtype nt keeps a stored tensor in: floats of any precision nt reads
/// become f32, counters stay i64; anything else is an error naming it.
fn stored_dtype(source_name: &str, name: &str, dtype: Dtype) -> Result<(DType, Option<Precision>)> {
    match (dtype, Precision::of(dtype)) {
        (Dtype::I64, _) => Ok((DType::I64, None)),
        (_, Some(p)) => Ok((DType::F32, Some(p))),
        (other, None) => Err(FusionError::checkpoint(
            source_name,
            format!(
                "tensor `{name}` has dtype {other:?}; nt reads F32, BF16 or F16 weights and I64 counters"
            ),
        )),
    }
}

/// Records the precision of float tensor `name`; an error when an earlier
/// float tensor has another.
pub(crate) fn agree(
    seen: &mut Option<(Precision, String)>,
    precision: Precision,
    name: &str,
    source_name: &str,
) -> Result<()> {
    match seen {
        None => {
            *seen = Some((precision, name.to_string()));
            Ok(())
        }
        Some((first, _)) if *first == precision => Ok(()),
        Some((first, first_name)) => Err(FusionError::checkpoint(
            source_name,
            format!(
                "tensor `{name}` is {precision} but `{first_name}` is {first}: a checkpoint's float tensors share one dtype"
            ),
        )),
    }
}

pub(crate) fn parse(source_name: &str, backing: Backing) -> Result<Parsed> {
    let bytes: &[u8] = (*backing).as_ref();
    let corrupt = |e: safetensors::SafeTensorError| {
        FusionError::checkpoint(
            source_name,
            format!("not a valid safetensors file ({} bytes): {e}", bytes.len()),
        )
    };
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(corrupt)?;
    let tensors = SafeTensors::deserialize(bytes).map_err(corrupt)?;
    let data_start = 8 + header_len;
    let infos = meta.tensors();
    let mut state = StateDict::default();
    if let Some(m) = meta.metadata() {
        state.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    // In name order, so an error names the same tensor every time.
    let mut views = tensors.tensors();
    views.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut precision = None;
    for (name, view) in views {
        let shape = view.shape().to_vec();
        let tensor = match stored_dtype(source_name, &name, view.dtype())? {
            (DType::I64, _) => HostTensor::i64(shape, le_i64(view.data())),
            (DType::F32, stored) => {
                let stored = stored.unwrap_or(Precision::F32);
                agree(&mut precision, stored, &name, source_name)?;
                if stored == Precision::F32 {
                    let offset = infos
                        .get(&name)
                        .map(|i| data_start + i.data_offsets.0)
                        .unwrap_or(usize::MAX);
                    match HostTensor::mapped(shape.clone(), backing.clone(), offset) {
                        Some(t) => t,
                        None => HostTensor::f32(shape, stored.widen(view.data())),
                    }
                } else {
                    HostTensor::f32(shape, stored.widen(view.data()))
                }
            }
        };
        state.tensors.insert(name, tensor);
    }
    Ok(Parsed { state, precision })
}

fn le_i64(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// The largest header accepted, as the safetensors crate's limit.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The header length announced by a safetensors file's first 8 bytes,
/// checked against the file's size.
pub fn header_len(source_name: &str, first: &[u8], file_len: u64) -> Result<u64> {
    let corrupt = |why: String| {
        FusionError::checkpoint(
            source_name,
            format!("not a valid safetensors file ({file_len} bytes): {why}"),
        )
    };
    let Some(bytes) = first.get(..8) else {
        return Err(corrupt("shorter than its 8-byte header length".into()));
    };
    let mut le = [0u8; 8];
    le.copy_from_slice(bytes);
    let n = u64::from_le_bytes(le);
    // The shortest header is `{}`.
    if !(2..=MAX_HEADER_BYTES).contains(&n) || n.saturating_add(8) > file_len {
        return Err(corrupt(format!("header length {n} does not fit")));
    }
    Ok(n)
}

/// Checks a checkpoint from its JSON header alone (the `header_len` bytes
/// after the first 8) and the file's size: names, dtypes and shapes against
/// `arch`, as [`validate`] does after loading (float tensors of one
/// precision, f32, bf16 or f16, stand for the architecture's f32 ones), and
/// that the tensors' byte ranges (checked contiguous by the header's parser)
/// end exactly at the end of the file, so a truncated or padded file is
/// caught without reading its data. Damage inside the data is found when the
/// file is loaded.
pub fn validate_header(
    source_name: &str,
    header: &[u8],
    file_len: u64,
    arch: &Architecture,
) -> Result<()> {
    let corrupt = |why: String| {
        FusionError::checkpoint(
            source_name,
            format!("not a valid safetensors file ({file_len} bytes): {why}"),
        )
    };
    let text = std::str::from_utf8(header).map_err(|e| corrupt(format!("header: {e}")))?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_str(text).map_err(|e| corrupt(format!("header: {e}")))?;
    // In name order, so an error names the same tensor every time.
    let infos: BTreeMap<String, &safetensors::tensor::TensorInfo> =
        meta.tensors().into_iter().collect();
    let mut entries = Vec::with_capacity(infos.len());
    let mut end = 0usize;
    let mut precision = None;
    for (name, info) in &infos {
        // Loading widens bf16 and f16 to the f32 the architecture expects.
        let (dtype, stored) = stored_dtype(source_name, name, info.dtype)?;
        if let Some(stored) = stored {
            agree(&mut precision, stored, name, source_name)?;
        }
        // Parsing the header already checked that the byte ranges are
        // contiguous from 0 and match each shape and dtype.
        end = end.max(info.data_offsets.1);
        entries.push((name.as_str(), dtype, info.shape.as_slice()));
    }
    let data_len = file_len
        .checked_sub(8 + header.len() as u64)
        .ok_or_else(|| corrupt("the header is longer than the file".into()))?;
    if end as u64 != data_len {
        return Err(corrupt(format!(
            "its tensors take {end} bytes but {data_len} follow the header (truncated or padded)"
        )));
    }
    check_entries(entries, arch, source_name)?;
    if let Some(text) = meta.metadata().as_ref().and_then(|m| m.get(META_ARCH)) {
        let recorded = ArchSpec::from_json(text).map_err(|e| {
            FusionError::checkpoint(source_name, format!("its `{META_ARCH}` metadata: {e}"))
        })?;
        check_recorded_arch(&recorded, arch, source_name)?;
    }
    Ok(())
}

/// Whether an architecture recorded in a checkpoint describes the same
/// network as `arch` (its name aside).
pub fn same_network(recorded: &ArchSpec, arch: &Architecture) -> bool {
    recorded.input == arch.spec().input
        && recorded.nodes == arch.spec().nodes
        && recorded.output == arch.spec().output
}

/// Refuses a checkpoint whose recorded architecture is another network than
/// the one it is read as, even when the tensors happen to fit.
pub fn check_recorded_arch(
    recorded: &ArchSpec,
    arch: &Architecture,
    source_name: &str,
) -> Result<()> {
    if same_network(recorded, arch) {
        return Ok(());
    }
    Err(FusionError::checkpoint(
        source_name,
        format!(
            "records architecture `{}`, which differs from `{}` it is read as",
            recorded.name,
            arch.name()
        ),
    ))
}

/// Checks names, shapes and dtypes against an architecture; the error names
/// the first wrong tensor, or lists the missing and unexpected ones.
pub fn validate(state: &StateDict, arch: &Architecture, source_name: &str) -> Result<()> {
    let entries = state
        .tensors
        .iter()
        .map(|(name, t)| (name.as_str(), t.dtype(), t.shape()))
        .collect();
    check_entries(entries, arch, source_name)
}

fn check_entries(
    entries: Vec<(&str, DType, &[usize])>,
    arch: &Architecture,
    source_name: &str,
) -> Result<()> {
    let by_name: HashMap<&str, (DType, &[usize])> = entries
        .iter()
        .map(|&(name, dtype, shape)| (name, (dtype, shape)))
        .collect();
    let params = arch.params();
    let mut missing = Vec::new();
    for p in &params {
        match by_name.get(p.name.as_str()) {
            None => missing.push(p.name.clone()),
            Some(&(dtype, shape)) => {
                if dtype != p.dtype {
                    return Err(FusionError::checkpoint(
                        source_name,
                        format!(
                            "tensor `{}` has dtype {}, expected {} for architecture `{}`",
                            p.name,
                            dtype,
                            p.dtype,
                            arch.name()
                        ),
                    ));
                }
                if shape != p.shape.as_slice() {
                    return Err(FusionError::checkpoint(
                        source_name,
                        format!(
                            "tensor `{}` has shape {:?}, expected {:?} for architecture `{}`",
                            p.name,
                            shape,
                            p.shape,
                            arch.name()
                        ),
                    ));
                }
            }
        }
    }
    let known: std::collections::HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
    let mut unexpected: Vec<&str> = entries
        .iter()
        .map(|&(name, _, _)| name)
        .filter(|n| !known.contains(n))
        .collect();
    unexpected.sort_unstable();
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
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
    Err(FusionError::checkpoint(source_name, reason))
}

fn list<S: AsRef<str>>(names: &[S]) -> String {
    const SHOWN: usize = 6;
    let mut out: Vec<String> = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{}`", n.as_ref()))
        .collect();
    if names.len() > SHOWN {
        out.push(format!("and {} more", names.len() - SHOWN));
    }
    out.join(", ")
}

/// A tensor as written: float tensors in the chosen precision, rounded one
/// tensor at a time while the file is written, counters as they are.
pub(crate) struct TensorRef<'a> {
    tensor: &'a HostTensor,
    precision: Precision,
}

impl<'a> TensorRef<'a> {
    pub(crate) fn new(tensor: &'a HostTensor, precision: Precision) -> Self {
        TensorRef { tensor, precision }
    }
}

impl View for TensorRef<'_> {
    fn dtype(&self) -> Dtype {
        match self.tensor.dtype() {
            DType::F32 => self.precision.dtype(),
            DType::I64 => Dtype::I64,
        }
    }
    fn shape(&self) -> &[usize] {
        self.tensor.shape()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match (self.tensor.as_f32(), self.precision) {
            (Some(values), Precision::BF16 | Precision::F16) => {
                std::borrow::Cow::Owned(self.precision.narrow(values))
            }
            _ => std::borrow::Cow::Borrowed(self.tensor.bytes()),
        }
    }
    fn data_len(&self) -> usize {
        stored_len(self.tensor, self.precision)
    }
}

/// The bytes `tensor` takes when its floats are stored in `precision`.
pub(crate) fn stored_len(tensor: &HostTensor, precision: Precision) -> usize {
    match tensor.dtype() {
        DType::F32 => tensor.numel() * precision.size(),
        DType::I64 => tensor.numel() * 8,
    }
}

/// A file's metadata: the state dict's, marked as PyTorch's safetensors
/// helpers mark their files.
pub(crate) fn file_metadata(state: &StateDict) -> Option<HashMap<String, String>> {
    let mut meta: HashMap<String, String> = state.metadata.clone().into_iter().collect();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    Some(meta)
}

fn views(state: &StateDict, precision: Precision) -> Vec<(&str, TensorRef<'_>)> {
    state
        .tensors
        .iter()
        .map(|(k, v)| (k.as_str(), TensorRef::new(v, precision)))
        .collect()
}

/// Serializes a state dict to safetensors bytes, in f32.
pub fn to_bytes(state: &StateDict) -> Result<Vec<u8>> {
    to_bytes_as(state, Precision::F32)
}

/// Serializes a state dict to safetensors bytes, its float tensors rounded
/// to `precision`.
pub fn to_bytes_as(state: &StateDict, precision: Precision) -> Result<Vec<u8>> {
    safetensors::tensor::serialize(views(state, precision), file_metadata(state))
        .map_err(|e| FusionError::checkpoint("(in memory)", e.to_string()))
}

/// Writes a checkpoint atomically, in f32 and as one file: a temporary file
/// in the same folder, renamed over `path` once complete, so a crash never
/// leaves half a file. [`save_with`] chooses the precision and shards.
pub fn save(path: &Path, state: &StateDict) -> Result<()> {
    write_file(path, views(state, Precision::F32), file_metadata(state))
}

/// Writes tensors as one safetensors file, atomically.
pub(crate) fn write_file(
    path: &Path,
    views: Vec<(&str, TensorRef<'_>)>,
    meta: Option<HashMap<String, String>>,
) -> Result<()> {
    write_atomic(path, |tmp| {
        safetensors::tensor::serialize_to_file(views, meta, tmp).map_err(|e| e.to_string())
    })
}

/// Writes `path` through `write` into a temporary file in the same folder,
/// renamed over `path` once complete, so a reader never sees half a file.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(FusionError::checkpoint(path.display().to_string(), e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        FusionError::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::preset;

    fn small() -> (Architecture, StateDict) {
        let arch =
            Architecture::new(preset("mlp:input=4,hidden=3,depth=1,classes=2,bias=true").unwrap())
                .unwrap();
        let mut state = StateDict::default();
        for p in arch.params() {
            let n = p.shape.iter().product::<usize>();
            state.insert(
                p.name,
                HostTensor::f32(p.shape, (0..n).map(|i| i as f32 * 0.5).collect()),
            );
        }
        state.set_arch(arch.spec());
        (arch, state)
    }

    #[test]
    fn save_and_load_round_trip_with_metadata() {
        let (arch, mut state) = small();
        state.set_lineage(&Lineage {
            method: "nt".into(),
            members: vec!["a".into(), "b".into()],
            ..Default::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        save(&path, &state).unwrap();
        let back = load(&path).unwrap();
        validate(&back, &arch, "m").unwrap();
        assert_eq!(back.lineage().unwrap().members, ["a", "b"]);
        assert_eq!(back.arch().unwrap().unwrap(), *arch.spec());
        for (name, t) in &state.tensors {
            assert_eq!(back.get(name).unwrap().as_f32(), t.as_f32(), "{name}");
        }
        let from_bytes = load_bytes("mem", to_bytes(&state).unwrap()).unwrap();
        assert_eq!(from_bytes.tensors.len(), state.tensors.len());
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let (_, state) = small();
        let bytes = to_bytes(&state).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            let err = load_bytes("cut.safetensors", bytes[..cut].to_vec())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("cut.safetensors") && err.contains("not a valid"),
                "{err}"
            );
        }
        let err = load_bytes("junk", b"hello world, not a checkpoint".to_vec())
            .unwrap_err()
            .to_string();
        assert!(err.contains("junk"), "{err}");
    }

    /// A safetensors file of raw tensors, dtypes as given.
    pub(super) fn raw_file(tensors: &[(&str, Dtype, Vec<usize>)]) -> Vec<u8> {
        let data: Vec<(String, Vec<u8>)> = tensors
            .iter()
            .map(|(name, dtype, shape)| {
                let n: usize = shape.iter().product();
                (name.to_string(), vec![0u8; n * dtype.bitsize() / 8])
            })
            .collect();
        let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .zip(&data)
            .map(|((name, dtype, shape), (_, bytes))| {
                let view =
                    safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap();
                (*name, view)
            })
            .collect();
        safetensors::tensor::serialize(views, None).unwrap()
    }

    #[test]
    fn half_precision_files_read_into_f32_and_say_their_precision() {
        let (arch, mut state) = small();
        // 0.1 is not a bf16 value: it is rounded on the way out.
        state.insert("fc1.bias", HostTensor::f32(vec![3], vec![0.1, -2.0, 1e-3]));
        state.insert("extra.count", HostTensor::i64(vec![1], vec![7]));
        for precision in [Precision::BF16, Precision::F16] {
            let bytes = to_bytes_as(&state, precision).unwrap();
            let loaded = read_bytes("h.safetensors", bytes.clone()).unwrap();
            assert_eq!(loaded.precision, precision);
            let back = &loaded.state;
            assert_eq!(back.get("extra.count").unwrap().as_i64(), Some(&[7i64][..]));
            let round: fn(f32) -> f32 = match precision {
                Precision::BF16 => |v| bf16_to_f32(f32_to_bf16(v)),
                _ => |v| f16_to_f32(f32_to_f16(v)),
            };
            for (name, t) in &state.tensors {
                let Some(values) = t.as_f32() else { continue };
                let expected: Vec<f32> = values.iter().map(|&v| round(v)).collect();
                assert_eq!(
                    back.get(name).unwrap().as_f32().unwrap(),
                    expected,
                    "{name}"
                );
            }
            assert_ne!(back.get("fc1.bias").unwrap().as_f32().unwrap()[0], 0.1);
            assert_eq!(back.arch().unwrap().unwrap(), *arch.spec());
            // The header check sees the same file as the f32 architecture's.
            state.tensors.remove("extra.count");
            let bytes = to_bytes_as(&state, precision).unwrap();
            let n = header_len("h", &bytes, bytes.len() as u64).unwrap() as usize;
            validate_header("h", &bytes[8..8 + n], bytes.len() as u64, &arch).unwrap();
            validate(&load_bytes("h", bytes).unwrap(), &arch, "h").unwrap();
            state.insert("extra.count", HostTensor::i64(vec![1], vec![7]));
        }
        let f32_file = read_bytes("f", to_bytes(&state).unwrap()).unwrap();
        assert_eq!(f32_file.precision, Precision::F32);
    }

    #[test]
    fn mixed_and_unsupported_dtypes_name_the_tensor() {
        let mixed = raw_file(&[
            ("a.weight", Dtype::BF16, vec![2, 2]),
            ("b.weight", Dtype::F16, vec![2]),
            ("c.num_batches_tracked", Dtype::I64, vec![]),
        ]);
        let err = load_bytes("mixed.safetensors", mixed.clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mixed.safetensors")
                && err.contains("`b.weight` is f16 but `a.weight` is bf16"),
            "{err}"
        );
        let n = header_len("m", &mixed, mixed.len() as u64).unwrap() as usize;
        let (arch, _) = small();
        let err = validate_header("m", &mixed[8..8 + n], mixed.len() as u64, &arch)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`b.weight` is f16"), "{err}");
        for dtype in [Dtype::F64, Dtype::U8, Dtype::I32] {
            let file = raw_file(&[("a.weight", Dtype::F32, vec![2]), ("w", dtype, vec![2])]);
            let err = load_bytes("odd.safetensors", file).unwrap_err().to_string();
            assert!(
                err.contains("odd.safetensors")
                    && err.contains(&format!("tensor `w` has dtype {dtype:?}")),
                "{err}"
            );
        }
    }

    #[test]
    fn members_must_agree_on_precision() {
        let agreed = common_precision(&[("a", Precision::BF16), ("b", Precision::BF16)]);
        assert_eq!(agreed.unwrap(), Precision::BF16);
        let err = common_precision(&[
            ("a.safetensors", Precision::BF16),
            ("b.safetensors", Precision::F16),
        ])
        .unwrap_err();
        assert!(matches!(err, FusionError::Members(_)), "{err}");
        let err = err.to_string();
        assert!(
            err.contains("members disagree on dtype: a.safetensors is bf16, b.safetensors is f16"),
            "{err}"
        );
    }

    #[test]
    fn validation_names_the_wrong_tensor() {
        let (arch, mut state) = small();
        state.insert("fc1.weight", HostTensor::zeros(vec![4, 4]));
        let err = validate(&state, &arch, "m0").unwrap_err().to_string();
        assert!(
            err.contains("fc1.weight") && err.contains("[4, 4]") && err.contains("[3, 4]"),
            "{err}"
        );
        let (arch, mut state) = small();
        state.tensors.remove("fc2.bias");
        state.insert("fc9.weight", HostTensor::zeros(vec![1]));
        let err = validate(&state, &arch, "m0").unwrap_err().to_string();
        assert!(
            err.contains("missing `fc2.bias`") && err.contains("unexpected `fc9.weight`"),
            "{err}"
        );
        let (arch, mut state) = small();
        state.insert("fc1.bias", HostTensor::i64(vec![3], vec![1, 2, 3]));
        let err = validate(&state, &arch, "m0").unwrap_err().to_string();
        assert!(err.contains("fc1.bias") && err.contains("I64"), "{err}");
    }
}
