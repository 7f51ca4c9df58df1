//! Writes a loaded data set in the formats nt reads from users
//! (`ntctl data export`): an image folder of PNG files, or `.npy` arrays.
//! Class folders and file names are zero-padded numbers, so the folder's
//! sample order (class, then file name) is the label order and, within a
//! class, the set's order.

use std::path::Path;
use std::sync::Mutex;

use image::{ExtendedColorType, ImageFormat};

use super::arrays::{npy_bytes, Element};
use super::ImageSet;
use crate::{Result, RuntimeError};

fn digits(n: usize) -> usize {
    n.max(1).to_string().len()
}

/// The class folder of `label` among `classes`.
pub fn class_folder(label: i64, classes: usize) -> String {
    format!("{label:0width$}", width = digits(classes.saturating_sub(1)))
}

/// Writes `set` as `dir/<class>/<index>.png` (grey or RGB) on `threads` threads.
pub fn write_image_folder(
    set: &ImageSet,
    classes: usize,
    dir: &Path,
    threads: usize,
) -> Result<()> {
    let [c, h, w] = set.shape;
    let color = match c {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        other => {
            return Err(RuntimeError::Data(format!(
                "PNG export needs 1 or 3 channels, the set has {other}"
            )))
        }
    };
    for label in 0..classes {
        let folder = dir.join(class_folder(label as i64, classes));
        std::fs::create_dir_all(&folder).map_err(|e| RuntimeError::io(&folder, e))?;
    }
    let width = digits(set.len().saturating_sub(1));
    let plane = h * w;
    let next = Mutex::new(0..set.len());
    let failed: Mutex<Option<RuntimeError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut interleaved = vec![0u8; c * plane];
                loop {
                    let Some(i) = next.lock().unwrap_or_else(|p| p.into_inner()).next() else {
                        break;
                    };
                    let pixels = &set.images[i * c * plane..(i + 1) * c * plane];
                    for p in 0..plane {
                        for ch in 0..c {
                            interleaved[p * c + ch] = pixels[ch * plane + p];
                        }
                    }
                    let path = dir
                        .join(class_folder(set.labels[i], classes))
                        .join(format!("{i:0width$}.png"));
                    if let Err(e) = image::save_buffer_with_format(
                        &path,
                        &interleaved,
                        w as u32,
                        h as u32,
                        color,
                        ImageFormat::Png,
                    ) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(RuntimeError::Data(format!("{}: {e}", path.display())));
                        break;
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Writes `set` as `dir/x.npy` (`uint8`, `[n, c, h, w]`) and `dir/y.npy` (`int64`).
pub fn write_arrays(set: &ImageSet, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
    let [c, h, w] = set.shape;
    let labels: Vec<u8> = set.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    for (name, bytes) in [
        (
            "x.npy",
            npy_bytes(Element::U8, &[set.len(), c, h, w], &set.images),
        ),
        ("y.npy", npy_bytes(Element::I64, &[set.len()], &labels)),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| RuntimeError::io(&path, e))?;
    }
    Ok(())
}

/// The set in an image folder's sample order: by label, then by index.
pub fn in_folder_order(set: &ImageSet) -> ImageSet {
    let mut order: Vec<usize> = (0..set.len()).collect();
    order.sort_by_key(|&i| set.labels[i]);
    set.select(&order)
}
