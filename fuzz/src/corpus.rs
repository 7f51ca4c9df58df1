//! The corpus on disk: `fuzz/corpus/<target>/<name>`, one input per file.
//! Seeds are named `seed-*`; inputs the driver found are named by kind
//! (`crash-`, `slow-`, `new-`) and a hash of their bytes, so a file is
//! never written twice.

use std::path::{Path, PathBuf};

use crate::Target;

/// The corpus folder in the source tree.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

pub fn dir(root: &Path, target: Target) -> PathBuf {
    root.join(target.name())
}

/// Every input of a target, sorted by file name.
pub fn load(root: &Path, target: Target) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let dir = dir(root, target);
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            out.push((name, std::fs::read(entry.path())?));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes an input as `<kind>-<hash>`; returns its path.
pub fn save(root: &Path, target: Target, kind: &str, data: &[u8]) -> std::io::Result<PathBuf> {
    let dir = dir(root, target);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{kind}-{:016x}", fnv1a(data)));
    std::fs::write(&path, data)?;
    Ok(path)
}

/// FNV-1a, 64 bits: a stable name for a file's bytes.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Encoded `SubmitRunRequest`s made from the run-spec seeds that convert
/// (architecture files are read from `examples/`), named after them.
pub fn request_seeds(root: &Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    use nt_proto::prost::Message;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out = Vec::new();
    for (name, text) in load(root, Target::RunSpec)? {
        let Some(stem) = name
            .strip_prefix("seed-")
            .and_then(|n| n.strip_suffix(".yaml"))
        else {
            continue;
        };
        let spec = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| nt_spec::RunSpecFile::from_yaml(t).ok())
            .and_then(|f| f.to_proto(&examples).ok());
        if let Some(spec) = spec {
            let request = nt_proto::v1::SubmitRunRequest {
                spec: Some(spec),
                request_id: format!("seed-{stem}"),
                spec_file: String::new(),
            };
            out.push((format!("seed-{stem}.pb"), request.encode_to_vec()));
        }
    }
    Ok(out)
}
