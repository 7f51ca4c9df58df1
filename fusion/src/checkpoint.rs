//! Checkpoints: safetensors files with PyTorch `state_dict` names, so members
//! trained in PyTorch can be fused and fused models load back into PyTorch.
//! The architecture spec and the lineage travel in the safetensors metadata.
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

/// Loads a checkpoint file. Float tensors borrow from a memory map of the
/// file when aligned, so loading copies nothing.
pub fn load(path: &Path) -> Result<StateDict> {
    let file = std::fs::File::open(path).map_err(|e| FusionError::io(path, e))?;
    // SAFETY: the map is read-only; like every safetensors reader we assume
    // the file is not truncated underneath us while it is in use.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| FusionError::io(path, e))?;
    parse(&path.display().to_string(), Arc::new(map))
}

/// Loads a checkpoint held in memory (for example, downloaded from object storage).
pub fn load_bytes(source_name: &str, bytes: Vec<u8>) -> Result<StateDict> {
    parse(source_name, Arc::new(bytes))
}

fn parse(source_name: &str, backing: Backing) -> Result<StateDict> {
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
    for (name, view) in tensors.iter() {
        let shape = view.shape().to_vec();
        let tensor = match view.dtype() {
            Dtype::F32 => {
                let offset = infos
                    .get(name)
                    .map(|i| data_start + i.data_offsets.0)
                    .unwrap_or(usize::MAX);
                match HostTensor::mapped(shape.clone(), backing.clone(), offset) {
                    Some(t) => t,
                    None => HostTensor::f32(shape, le_f32(view.data())),
                }
            }
            Dtype::I64 => HostTensor::i64(shape, le_i64(view.data())),
            other => {
                return Err(FusionError::checkpoint(
                    source_name,
                    format!(
                    "tensor `{name}` has dtype {other:?}; nt reads F32 weights and I64 counters"
                ),
                ))
            }
        };
        state.tensors.insert(name.to_string(), tensor);
    }
    Ok(state)
}

fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
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
/// `arch`, as [`validate`] does, and that the tensors' byte ranges (checked
/// contiguous by the header's parser) end exactly at the end of the file, so a truncated or padded file is caught without
/// reading its data. Damage inside the data is found when the file is loaded.
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
    let infos = meta.tensors();
    let mut entries = Vec::with_capacity(infos.len());
    let mut end = 0usize;
    for (name, info) in &infos {
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::I64 => DType::I64,
            other => {
                return Err(FusionError::checkpoint(
                    source_name,
                    format!(
                        "tensor `{name}` has dtype {other:?}; nt reads F32 weights and I64 counters"
                    ),
                ))
            }
        };
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

struct TensorRef<'a>(&'a HostTensor);

impl View for TensorRef<'_> {
    fn dtype(&self) -> Dtype {
        match self.0.dtype() {
            DType::F32 => Dtype::F32,
            DType::I64 => Dtype::I64,
        }
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.0.bytes())
    }
    fn data_len(&self) -> usize {
        self.0.bytes().len()
    }
}

type Views<'a> = (
    Vec<(&'a str, TensorRef<'a>)>,
    Option<HashMap<String, String>>,
);

fn views(state: &StateDict) -> Views<'_> {
    let views = state
        .tensors
        .iter()
        .map(|(k, v)| (k.as_str(), TensorRef(v)))
        .collect();
    let mut meta: HashMap<String, String> = state.metadata.clone().into_iter().collect();
    // PyTorch's safetensors helpers mark their files this way.
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    (views, Some(meta))
}

/// Serializes a state dict to safetensors bytes.
pub fn to_bytes(state: &StateDict) -> Result<Vec<u8>> {
    let (views, meta) = views(state);
    safetensors::tensor::serialize(views, meta)
        .map_err(|e| FusionError::checkpoint("(in memory)", e.to_string()))
}

/// Writes a checkpoint atomically: a temporary file in the same folder,
/// renamed over `path` once complete, so a crash never leaves half a file.
pub fn save(path: &Path, state: &StateDict) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let (views, meta) = views(state);
    let written = safetensors::tensor::serialize_to_file(views, meta, &tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(FusionError::checkpoint(
            path.display().to_string(),
            e.to_string(),
        ));
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
