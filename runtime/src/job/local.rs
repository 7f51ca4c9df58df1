//! Jobs over local files: keys are paths (`ntctl train`, `ntctl eval`).

use std::path::Path;

use fusion::checkpoint::{self, Loaded};

use super::JobIo;
use crate::data::{self, FileSource};
use crate::{Result, RuntimeError};

/// Keys are file paths; data sets come from their local folders.
pub struct LocalFiles;

impl JobIo for LocalFiles {
    fn read(&self, key: &str) -> Result<Vec<u8>> {
        std::fs::read(key).map_err(|e| RuntimeError::io(key, e))
    }

    /// Writes a temporary file next to `key` and renames it over `key`,
    /// creating the folder when needed.
    fn write(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let path = Path::new(key);
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
        let name = path
            .file_name()
            .map_or_else(|| "object".into(), |n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                RuntimeError::io(path, e)
            })
    }

    /// Memory-maps the file; also reads a folder holding
    /// `model.safetensors.index.json` or `model.safetensors`.
    fn checkpoint(&self, key: &str) -> Result<Loaded> {
        Ok(checkpoint::read(Path::new(key))?)
    }

    fn data_source(&self, spec: &data::DataSpec) -> Result<Box<dyn FileSource + '_>> {
        Ok(Box::new(data::local_source(spec)?))
    }

    /// Decoded image folders go to the user's cache folder (`NT_DATA_CACHE`,
    /// else `~/.cache/nt/data`).
    fn data_cache(&self) -> Option<Box<dyn data::DataCache + '_>> {
        data::DirCache::default_dir()
            .map(|d| Box::new(data::DirCache(d)) as Box<dyn data::DataCache>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_whole_and_creates_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("states/epoch-0001.state.safetensors");
        let key = key.to_str().unwrap();
        LocalFiles.write(key, b"first".to_vec()).unwrap();
        LocalFiles.write(key, b"second".to_vec()).unwrap();
        assert_eq!(LocalFiles.read(key).unwrap(), b"second");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("states"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["epoch-0001.state.safetensors"]);
        let missing = dir.path().join("nope.safetensors");
        let err = LocalFiles.read(missing.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, RuntimeError::Io { .. }), "{err}");
        assert!(err.to_string().contains("nope.safetensors"), "{err}");
    }
}
