//! Data files in a local folder. Listing walks the folder's sub-folders on
//! several threads: an image folder has tens of thousands of files, and
//! their metadata is most of a cached reload's time.

use std::sync::{Condvar, Mutex};

use super::{FileSource, Listed};
use crate::{Result, RuntimeError};

/// Files in a local folder.
pub struct LocalDir(pub std::path::PathBuf);

/// Threads listing a folder.
const LIST_THREADS: usize = 4;

impl FileSource for LocalDir {
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.0.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RuntimeError::io(path, e)),
        }
    }

    /// Walks the folder. Hidden entries (`.name`) and symbolic links are
    /// left out, so a listing never leaves the folder.
    fn list(&self, dir: &str) -> Result<Vec<Listed>> {
        // Folders waiting to be read, and how many are being read: the walk
        // is over when both are none.
        let queue = Mutex::new((vec![dir.trim_matches('/').to_string()], 0usize));
        let changed = Condvar::new();
        let found = Mutex::new(Vec::new());
        let failed: Mutex<Option<RuntimeError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..LIST_THREADS {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let next = {
                            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                            loop {
                                if let Some(rel) = q.0.pop() {
                                    q.1 += 1;
                                    break Some(rel);
                                }
                                if q.1 == 0 {
                                    break None;
                                }
                                q = changed.wait(q).unwrap_or_else(|p| p.into_inner());
                            }
                        };
                        let Some(rel) = next else {
                            break;
                        };
                        let read = self.read_dir(&rel);
                        let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                        q.1 -= 1;
                        match read {
                            Ok((entries, folders)) => {
                                mine.extend(entries);
                                q.0.extend(folders);
                            }
                            Err(e) => {
                                q.0.clear();
                                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            }
                        }
                        changed.notify_all();
                    }
                    found.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let mut out = found.into_inner().unwrap_or_else(|p| p.into_inner());
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

impl LocalDir {
    /// One folder's entries, and its sub-folders to read next. A folder
    /// that does not exist has none.
    fn read_dir(&self, rel: &str) -> Result<(Vec<Listed>, Vec<String>)> {
        let path = self.0.join(rel);
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(RuntimeError::io(path, e)),
        };
        let (mut out, mut folders) = (Vec::new(), Vec::new());
        for entry in entries {
            let entry = entry.map_err(|e| RuntimeError::io(&path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let meta = entry
                .metadata()
                .map_err(|e| RuntimeError::io(entry.path(), e))?;
            let name = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            if meta.is_dir() {
                folders.push(name.clone());
            } else if !meta.is_file() {
                continue;
            }
            out.push(Listed {
                name,
                size: meta.len(),
                version: modified.to_string(),
                is_dir: meta.is_dir(),
            });
        }
        Ok((out, folders))
    }
}
