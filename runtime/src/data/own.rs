//! The user's own data (`format: image-folder` and `format: arrays`): what
//! loading needs beyond the spec (the input shape, a memory limit, the
//! decoded cache), the memory check before anything is decoded, and the
//! report of how the data was loaded.

use std::time::Instant;

use super::cache::{self, Cached, DataCache};
use super::{arrays, folder, DataSpec, FileSource, ImageSet};
use crate::{Result, RuntimeError};

/// Host bytes a loaded data set needs per pixel: the decoded byte and the
/// float32 copy training makes of it.
pub const BYTES_PER_PIXEL: u64 = 5;

/// What loading needs beyond the spec.
#[derive(Clone, Copy)]
pub struct LoadOptions<'a> {
    /// The architecture's per-sample input shape: image folders are
    /// resized to it, arrays must have it.
    pub input_shape: &'a [usize],
    /// Host bytes the loaded set may need (see [`BYTES_PER_PIXEL`]).
    pub memory_limit: u64,
    /// Where decoded image folders are kept.
    pub cache: Option<&'a dyn DataCache>,
    /// Threads decoding images.
    pub threads: usize,
}

impl<'a> LoadOptions<'a> {
    /// The limit from [`memory_limit`], no cache, a thread per core (at
    /// least 8, so reads from an object store overlap).
    pub fn new(input_shape: &'a [usize]) -> Self {
        LoadOptions {
            input_shape,
            memory_limit: memory_limit(),
            cache: None,
            threads: std::thread::available_parallelism().map_or(8, |n| n.get().max(8)),
        }
    }

    /// The input as `[channels, height, width]`, or why images cannot feed it.
    fn image_shape(&self, spec: &DataSpec) -> Result<[usize; 3]> {
        match self.input_shape {
            &[c, h, w] if (c == 1 || c == 3) && h > 0 && w > 0 => Ok([c, h, w]),
            shape => Err(RuntimeError::Data(format!(
                "`{}` holds images, but the architecture's input is {shape:?}: it needs \
                 [channels, height, width] with 1 or 3 channels",
                spec.dataset
            ))),
        }
    }
}

/// The host memory a data set may take: `NT_DATA_MEMORY_LIMIT` (bytes, or
/// with a suffix K, M, G, T, KiB, MiB, GiB, TiB), else half of the memory
/// available now, else 8 GiB.
pub fn memory_limit() -> u64 {
    std::env::var("NT_DATA_MEMORY_LIMIT")
        .ok()
        .and_then(|v| parse_bytes(&v))
        .or_else(|| {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024 / 2)
        })
        .unwrap_or(8 << 30)
}

/// `123`, `4G`, `512MiB`, ... as bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// How a user's data set was loaded (also `ntctl`'s JSON).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LoadReport {
    /// Where the files came from.
    pub source: String,
    /// Images loaded (training and test splits, before any hold-out).
    pub images: usize,
    /// Files skipped as undecodable (`skip_bad`), with the reason.
    pub skipped: Vec<String>,
    /// Seconds spent listing and decoding, or reading the cache on a hit.
    pub seconds: f64,
    pub cache_hit: bool,
    /// The cache entry's key (empty: no cache).
    pub cache_key: String,
}

/// A user's data set as read: its splits (test absent when the source has
/// none), class names when the source names them, and the report.
pub struct Loaded {
    pub train: ImageSet,
    pub test: Option<ImageSet>,
    pub classes: Vec<String>,
    pub report: LoadReport,
}

fn check_memory(spec: &DataSpec, what: &str, bytes: u64, limit: u64) -> Result<()> {
    let need = bytes.saturating_mul(BYTES_PER_PIXEL);
    if need > limit {
        return Err(RuntimeError::Data(format!(
            "`{}`: {what} need {} of host memory ({BYTES_PER_PIXEL} bytes a pixel: the decoded \
             byte and training's float copy), more than the limit of {} \
             (NT_DATA_MEMORY_LIMIT, default half the available memory); use a train_subset, \
             a smaller input size or a larger machine",
            spec.dataset,
            mebibytes(need),
            mebibytes(limit)
        )));
    }
    Ok(())
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Lists an image folder, and reads its decoded pixels from the cache or
/// decodes them (then stores them in the cache).
pub fn image_folder(
    spec: &DataSpec,
    source: &dyn FileSource,
    options: &LoadOptions<'_>,
) -> Result<Loaded> {
    let started = Instant::now();
    let shape = options.image_shape(spec)?;
    let listing = folder::list(source)?;
    let files: Vec<&super::Listed> = listing
        .train
        .files
        .iter()
        .chain(listing.test.iter().flat_map(|t| &t.files))
        .map(|(entry, _)| entry)
        .collect();
    let transform = format!(
        "image-folder {}x{}x{} cover-crop {} skip_bad={}",
        shape[0],
        shape[1],
        shape[2],
        folder::RESIZE_FILTER,
        spec.skip_bad
    );
    let digest = cache::digest(&source.describe(), &transform, &files);
    let key = options.cache.map(|c| c.key(&digest)).unwrap_or_default();
    let report = |images: usize, skipped: Vec<String>, hit: bool| LoadReport {
        source: source.describe(),
        images,
        skipped,
        seconds: started.elapsed().as_secs_f64(),
        cache_hit: hit,
        cache_key: key.clone(),
    };
    // Checked before the cache too: a cached set takes the same memory.
    let pixels = (listing.images() as u64).saturating_mul(shape.iter().product::<usize>() as u64);
    check_memory(
        spec,
        &format!("{} images of {:?}", listing.images(), shape),
        pixels,
        options.memory_limit,
    )?;
    if let Some(cache) = options.cache {
        // A malformed entry is decoded again and replaced.
        if let Some(Ok(cached)) = cache.read(&key)?.map(|bytes| cache::decode(&key, &bytes)) {
            let images = cached.train.len() + cached.test.as_ref().map_or(0, ImageSet::len);
            return Ok(Loaded {
                report: report(images, cached.skipped, true),
                train: cached.train,
                test: cached.test,
                classes: cached.classes,
            });
        }
    }
    let decode = |split: &folder::SplitListing| -> Result<(ImageSet, Vec<String>)> {
        let d = folder::decode(source, &split.files, shape, spec.skip_bad, options.threads)?;
        let set = ImageSet {
            images: d.images,
            labels: d.labels,
            shape,
        };
        Ok((set, d.skipped))
    };
    let (train, mut skipped) = decode(&listing.train)?;
    let test = match &listing.test {
        Some(t) => {
            let (set, more) = decode(t)?;
            skipped.extend(more);
            Some(set)
        }
        None => None,
    };
    let cached = Cached {
        train,
        test,
        classes: listing.train.classes.clone(),
        skipped,
    };
    let mut key_kept = key.clone();
    if let Some(cache) = options.cache {
        // The data is decoded either way: a cache that cannot be written
        // costs the next task a decode, not this one its data.
        if cache::encode(&cached)
            .and_then(|bytes| cache.write(&key, bytes))
            .is_err()
        {
            key_kept.clear();
        }
    }
    let images = cached.train.len() + cached.test.as_ref().map_or(0, ImageSet::len);
    let mut report = report(images, cached.skipped, false);
    report.cache_key = key_kept;
    Ok(Loaded {
        train: cached.train,
        test: cached.test,
        classes: cached.classes,
        report,
    })
}

/// Reads array files: `train` (required) and `test` (optional).
pub fn arrays(
    spec: &DataSpec,
    source: &dyn FileSource,
    options: &LoadOptions<'_>,
) -> Result<Loaded> {
    let started = Instant::now();
    let shape = options.image_shape(spec)?;
    let listing = source.list("")?;
    if listing.is_empty() {
        return Err(RuntimeError::Data(format!(
            "{}: does not exist or is empty",
            source.describe()
        )));
    }
    let x_bytes: u64 = listing
        .iter()
        .filter(|e| {
            e.name.ends_with("/x.npy")
                || e.name == "train.safetensors"
                || e.name == "test.safetensors"
        })
        .map(|e| e.size)
        .sum();
    check_memory(spec, "the image arrays", x_bytes, options.memory_limit)?;
    let train =
        arrays::read_split(source, &listing, "train", spec.layout, shape)?.ok_or_else(|| {
            RuntimeError::Data(format!(
            "{}: no training arrays: expected train/x.npy and train/y.npy, or train.safetensors \
             holding tensors x and y",
            source.describe()
        ))
        })?;
    let test = arrays::read_split(source, &listing, "test", spec.layout, shape)?;
    let images = train.len() + test.as_ref().map_or(0, ImageSet::len);
    Ok(Loaded {
        train,
        test,
        classes: Vec::new(),
        report: LoadReport {
            source: source.describe(),
            images,
            skipped: Vec::new(),
            seconds: started.elapsed().as_secs_f64(),
            cache_hit: false,
            cache_key: String::new(),
        },
    })
}
