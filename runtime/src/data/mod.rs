//! Data sets, read from a local folder (or an object-store prefix through
//! the caller's [`FileSource`]), never downloaded: the MNIST family in IDX
//! format, CIFAR-10/100 binary batches, a seeded synthetic set for tests,
//! and the user's own data as image folders or array files.

pub mod arrays;
pub mod cache;
mod device;
pub mod export;
pub mod folder;
mod formats;
mod local;
mod own;
mod synthetic;

pub use cache::{DataCache, DirCache};
pub use device::{AugmentDraws, Batches, DeviceSet, Normalization};
pub use formats::{cifar_batch, idx_images, maybe_gunzip, parse_idx, ImageSet};
pub use local::LocalDir;
pub use nt_spec::data::{Augment, DataFiles, DataFormat, DataSpec, SyntheticSpec};
pub use own::{memory_limit, parse_bytes, LoadOptions, LoadReport, BYTES_PER_PIXEL};
pub use synthetic::generate_synthetic;

use crate::{Result, RuntimeError};

/// A file (or, from a local folder, a folder) under a [`FileSource`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Relative to the source, `/`-separated.
    pub name: String,
    pub size: u64,
    /// Changes when the content does: a modification time or an ETag.
    pub version: String,
    pub is_dir: bool,
}

/// Reads a data set's files by name: a local folder here, an object-store
/// prefix in the worker. `Ok(None)` means the file does not exist. Shared
/// by the threads that decode images.
pub trait FileSource: Sync {
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Everything under `dir` (`""`: the whole source), at any depth,
    /// sorted by name. An object store lists files only.
    fn list(&self, dir: &str) -> Result<Vec<Listed>>;
    /// Where the files come from, for messages.
    fn describe(&self) -> String;
}

/// A training set, an optional validation set and a test set, as pixels.
#[derive(Clone, Debug)]
pub struct Splits {
    pub name: String,
    pub train: ImageSet,
    pub valid: Option<ImageSet>,
    pub test: ImageSet,
    pub classes: usize,
    /// The class names, when the source names them (image folders).
    pub class_names: Vec<String>,
    /// How the user's own data was loaded (image folders and arrays).
    pub loaded: Option<LoadReport>,
}

fn read_file(source: &dyn FileSource, name: &str) -> Result<Vec<u8>> {
    let gz = format!("{name}.gz");
    for candidate in [gz.as_str(), name] {
        if let Some(bytes) = source.read(candidate)? {
            return maybe_gunzip(&format!("{}/{candidate}", source.describe()), bytes);
        }
    }
    Err(RuntimeError::Data(format!(
        "{}: neither {name} nor {name}.gz exists",
        source.describe()
    )))
}

/// A data set on its training device, normalised with the training split's statistics.
pub struct Prepared {
    pub name: String,
    pub train: DeviceSet,
    pub valid: Option<DeviceSet>,
    pub test: DeviceSet,
    pub classes: usize,
    pub shape: [usize; 3],
    pub normalization: Normalization,
    /// How the user's own data was loaded (image folders and arrays).
    pub loaded: Option<LoadReport>,
}

impl Prepared {
    /// What a model trained on this data records about its inputs.
    pub fn input_spec(&self) -> fusion::checkpoint::InputSpec {
        fusion::checkpoint::InputSpec {
            dataset: self.name.clone(),
            mean: self.normalization.mean.clone(),
            std: self.normalization.std.clone(),
        }
    }

    /// The set evaluated during training: validation when held out, else test.
    pub fn monitor(&self) -> &DeviceSet {
        self.valid.as_ref().unwrap_or(&self.test)
    }
}

impl Splits {
    /// Uploads every split to `device`, normalised with the training split's statistics.
    pub fn to_device(&self, device: tch::Device) -> Result<Prepared> {
        self.to_device_with(device, None)
    }

    /// Uploads every split, normalised with `normalization` when given (a
    /// model's recorded one), else with the training split's statistics.
    pub fn to_device_with(
        &self,
        device: tch::Device,
        given: Option<Normalization>,
    ) -> Result<Prepared> {
        let normalization = match given {
            Some(n)
                if n.mean.len() == self.train.shape[0] && n.std.len() == self.train.shape[0] =>
            {
                n
            }
            Some(n) => {
                return Err(RuntimeError::Data(format!(
                    "the model's normalisation has {} channels, `{}` has {}",
                    n.mean.len(),
                    self.name,
                    self.train.shape[0]
                )))
            }
            None => normalization(&self.train),
        };
        Ok(Prepared {
            name: self.name.clone(),
            train: DeviceSet::new(&self.train, &normalization, device)?,
            valid: match &self.valid {
                Some(v) => Some(DeviceSet::new(v, &normalization, device)?),
                None => None,
            },
            test: DeviceSet::new(&self.test, &normalization, device)?,
            classes: self.classes,
            shape: self.train.shape,
            normalization,
            loaded: self.loaded.clone(),
        })
    }

    /// Checks that an architecture takes these images and has an output per class.
    pub fn check_fits(&self, arch: &fusion::arch::Architecture) -> Result<()> {
        let per_sample: usize = arch.input_shape().iter().product();
        let have: usize = self.train.shape.iter().product();
        if per_sample != have {
            return Err(RuntimeError::Data(format!(
                "architecture `{}` takes inputs of shape {:?} ({per_sample} values) but `{}` has images of shape {:?} ({have} values)",
                arch.name(),
                arch.input_shape(),
                self.name,
                self.train.shape
            )));
        }
        let outputs: usize = arch.output_shape().iter().product();
        if outputs < self.classes {
            return Err(RuntimeError::Data(format!(
                "architecture `{}` has {outputs} outputs but `{}` has {} classes",
                arch.name(),
                self.name,
                self.classes
            )));
        }
        Ok(())
    }
}

/// Per-channel mean and standard deviation of a (training) set.
pub fn normalization(set: &ImageSet) -> Normalization {
    Normalization::of(set)
}

/// A seeded permutation of `0..n` (SplitMix64 and Fisher-Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// A small, seedable generator for data order and synthetic data.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Loads a known data set from `source` (ignored for `synthetic`) and
/// splits it. The user's own data needs [`load_with`] and the input shape.
pub fn load(spec: &DataSpec, source: &dyn FileSource) -> Result<Splits> {
    load_with(spec, source, &LoadOptions::new(&[]))
}

/// Loads a data set from `source` and splits it; image folders are decoded
/// to `options.input_shape` (or read from `options.cache`).
pub fn load_with(
    spec: &DataSpec,
    source: &dyn FileSource,
    options: &LoadOptions<'_>,
) -> Result<Splits> {
    spec.validate()?;
    let mut class_names = Vec::new();
    let mut loaded = None;
    let (train, test) = match spec.files()? {
        DataFiles::Idx {
            train_images,
            train_labels,
            test_images,
            test_labels,
            transpose,
        } => {
            let describe = |n: &str| format!("{}/{n}", source.describe());
            let train = idx_images(
                &describe(&train_images),
                &read_file(source, &train_images)?,
                &describe(&train_labels),
                &read_file(source, &train_labels)?,
                transpose,
            )?;
            let test = idx_images(
                &describe(&test_images),
                &read_file(source, &test_images)?,
                &describe(&test_labels),
                &read_file(source, &test_labels)?,
                transpose,
            )?;
            (train, test)
        }
        DataFiles::Cifar {
            train,
            test,
            label_bytes,
        } => {
            let read_all = |names: &[String]| -> Result<ImageSet> {
                let sets = names
                    .iter()
                    .map(|n| {
                        cifar_batch(
                            &format!("{}/{n}", source.describe()),
                            &read_file(source, n)?,
                            label_bytes,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                formats::concat(&source.describe(), sets)
            };
            (read_all(&train)?, read_all(&test)?)
        }
        DataFiles::Synthetic => {
            let s = spec.synthetic.clone().unwrap_or_default();
            (
                generate_synthetic(&s, s.train, s.seed)?,
                generate_synthetic(&s, s.test, s.seed ^ 0x5eed)?,
            )
        }
        own @ (DataFiles::ImageFolder | DataFiles::Arrays) => {
            let read = match own {
                DataFiles::ImageFolder => own::image_folder(spec, source, options)?,
                _ => own::arrays(spec, source, options)?,
            };
            class_names = read.classes;
            loaded = Some(read.report);
            match read.test {
                Some(test) => (read.train, test),
                None => hold_out_test(spec, source, read.train)?,
            }
        }
    };
    let classes = if class_names.is_empty() {
        train
            .labels
            .iter()
            .chain(&test.labels)
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1)
    } else {
        class_names.len()
    };
    let subset = |set: ImageSet, n: Option<usize>, salt: u64| match n {
        Some(n) if n < set.len() => {
            let mut idx = permutation(set.len(), spec.split_seed ^ salt);
            idx.truncate(n);
            idx.sort_unstable();
            set.select(&idx)
        }
        _ => set,
    };
    let order = permutation(train.len(), spec.split_seed);
    let n_valid = (train.len() as f64 * spec.validation).round() as usize;
    let (valid, train) = if n_valid > 0 {
        let mut v: Vec<usize> = order[..n_valid].to_vec();
        let mut t: Vec<usize> = order[n_valid..].to_vec();
        v.sort_unstable();
        t.sort_unstable();
        (Some(train.select(&v)), train.select(&t))
    } else {
        (None, train)
    };
    let train = subset(train, spec.train_subset, 0x7261);
    let test = subset(test, spec.test_subset, 0x7465);
    if train.is_empty() || test.is_empty() {
        return Err(RuntimeError::Data(format!(
            "data set `{}` has an empty training or test split",
            spec.dataset
        )));
    }
    Ok(Splits {
        name: spec.dataset.clone(),
        train,
        valid,
        test,
        classes,
        class_names,
        loaded,
    })
}

/// Splits a seeded `test_split` fraction off a source without a test split.
fn hold_out_test(
    spec: &DataSpec,
    source: &dyn FileSource,
    train: ImageSet,
) -> Result<(ImageSet, ImageSet)> {
    let n_test = (train.len() as f64 * spec.test_split).round() as usize;
    if n_test == 0 {
        return Err(RuntimeError::Data(format!(
            "{}: no test split (a test/ folder, or test arrays); add one or set data.test_split \
             to hold out a fraction of the training images",
            source.describe()
        )));
    }
    let order = permutation(train.len(), spec.split_seed ^ 0x686f_6c64);
    let mut test: Vec<usize> = order[..n_test].to_vec();
    let mut rest: Vec<usize> = order[n_test..].to_vec();
    test.sort_unstable();
    rest.sort_unstable();
    Ok((train.select(&rest), train.select(&test)))
}

/// Loads a data set from its local folder (the Debian package's for Fashion-MNIST).
pub fn load_local(spec: &DataSpec) -> Result<Splits> {
    load(spec, &local_source(spec)?)
}

/// The local folder of a data set; an error when a set other than
/// `synthetic` has none.
pub fn local_source(spec: &DataSpec) -> Result<LocalDir> {
    let dir = spec.location().unwrap_or_default();
    if spec.dataset != "synthetic" && dir.is_empty() {
        return Err(RuntimeError::Data(format!(
            "data set `{}` needs a folder: give it as `{}:/path/to/files`",
            spec.dataset, spec.dataset
        )));
    }
    Ok(LocalDir(dir.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_set_too_large_for_memory_is_an_error_not_an_abort() {
        let spec = nt_spec::data::SyntheticSpec {
            train: 100_000_000_000,
            ..Default::default()
        };
        let e = generate_synthetic(&spec, spec.train, 1).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        assert!(!e.is_retryable());
        let spec = nt_spec::data::SyntheticSpec {
            shape: [usize::MAX, 2, 1],
            ..Default::default()
        };
        assert!(generate_synthetic(&spec, 1, 1).is_err(), "overflow");
    }

    #[test]
    fn fashion_mnist_loads_from_the_debian_package() {
        let mut spec = DataSpec::fashion_mnist();
        spec.validation = 0.1;
        spec.test_subset = Some(1000);
        let s = load_local(&spec).unwrap();
        assert_eq!(s.train.shape, [1, 28, 28]);
        assert_eq!(s.train.len(), 54_000);
        assert_eq!(s.valid.as_ref().unwrap().len(), 6_000);
        assert_eq!(s.test.len(), 1000);
        assert_eq!(s.classes, 10);
        // The split is seeded: the same seed gives the same validation set.
        let again = load_local(&spec).unwrap();
        assert_eq!(again.valid.unwrap().labels, s.valid.unwrap().labels);
    }

    #[test]
    fn missing_files_and_unknown_sets_are_named() {
        let err = load(
            &DataSpec::named("cifar10"),
            &LocalDir("/nonexistent".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/nonexistent") && err.contains("data_batch_1.bin"),
            "{err}"
        );
        let err = DataSpec::named("imagenet").files().unwrap_err().to_string();
        assert!(err.contains("imagenet"), "{err}");
    }

    #[test]
    fn a_truncated_idx_file_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::path::Path::new(nt_spec::defaults::FASHION_MNIST_DIR);
        for name in [
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ] {
            std::fs::copy(
                src.join(format!("{name}.gz")),
                dir.path().join(format!("{name}.gz")),
            )
            .unwrap();
        }
        let full = maybe_gunzip(
            "x",
            std::fs::read(src.join("train-images-idx3-ubyte.gz")).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), &full[..10_000]).unwrap();
        let spec = DataSpec {
            path: Some(dir.path().display().to_string()),
            ..DataSpec::fashion_mnist()
        };
        let err = load_local(&spec).unwrap_err().to_string();
        assert!(
            err.contains("train-images-idx3-ubyte: at byte 10000: truncated"),
            "{err}"
        );
    }
}
