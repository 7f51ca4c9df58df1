//! Data settings: which data set, where, and how to split and augment it.
//! Plain config; the runtime (`nt_runtime::data`) reads the files.

use serde::{Deserialize, Serialize};

use crate::defaults;
use crate::SpecError;

/// Which data set, where, and how to split and augment it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `fashion-mnist`, `mnist`, `kmnist`, `emnist-<split>` (e.g. `emnist-balanced`),
    /// `cifar10`, `cifar100` or `synthetic`.
    pub dataset: String,
    /// Folder (or, for the worker, object-store prefix) holding the files.
    /// Defaults to the Debian package's folder for `fashion-mnist`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Fraction of the training set held out for validation (seeded split).
    #[serde(default)]
    pub validation: f64,
    /// Seed of the train/validation split and of the subsets.
    #[serde(default)]
    pub split_seed: u64,
    /// Use only this many training samples (a seeded random subset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_subset: Option<usize>,
    /// Use only this many test samples (a seeded random subset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_subset: Option<usize>,
    /// Augmentation of training batches.
    #[serde(default)]
    pub augment: Augment,
    /// Parameters of the synthetic set (only for `synthetic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticSpec>,
    /// The user's own data in `path`, laid out as this format (then
    /// `dataset` only names it); `None` for the known sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// Image folders: skip unreadable images (counted) instead of failing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_bad: bool,
    /// Arrays: how 4-dimensional images are laid out (`None`: inferred
    /// from the architecture's input shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<ArrayLayout>,
    /// Image folders and arrays: the fraction of the training split held out
    /// (seeded) as the test split when the source has none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub test_split: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// How the files of a user's data set are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// `train/<class>/*.png|jpg` and `test/<class>/...`, as torchvision's
    /// `ImageFolder`.
    ImageFolder,
    /// `train/x.npy` and `train/y.npy` (or `train.safetensors` holding `x`
    /// and `y`), and the same for `test`.
    Arrays,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::ImageFolder => "image-folder",
            DataFormat::Arrays => "arrays",
        }
    }

    pub fn parse(text: &str) -> Result<Self, SpecError> {
        match text {
            "image-folder" => Ok(DataFormat::ImageFolder),
            "arrays" => Ok(DataFormat::Arrays),
            other => Err(SpecError::new(
                "data.format",
                format!("unknown data format `{other}` (known: image-folder, arrays)"),
            )),
        }
    }
}

/// How array images of four dimensions are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArrayLayout {
    /// `[n, channels, height, width]` (PyTorch).
    Nchw,
    /// `[n, height, width, channels]` (NumPy, TensorFlow, PIL).
    Nhwc,
}

impl ArrayLayout {
    pub fn name(self) -> &'static str {
        match self {
            ArrayLayout::Nchw => "nchw",
            ArrayLayout::Nhwc => "nhwc",
        }
    }

    pub fn parse(text: &str) -> Result<Self, SpecError> {
        match text {
            "nchw" => Ok(ArrayLayout::Nchw),
            "nhwc" => Ok(ArrayLayout::Nhwc),
            other => Err(SpecError::new(
                "data.layout",
                format!("unknown array layout `{other}` (known: nchw, nhwc)"),
            )),
        }
    }
}

impl DataSpec {
    /// The embedded default: Fashion-MNIST from the Debian package.
    pub fn fashion_mnist() -> Self {
        DataSpec::named(defaults::DATASET)
    }

    pub fn named(dataset: &str) -> Self {
        DataSpec {
            dataset: dataset.to_string(),
            path: None,
            validation: 0.0,
            split_seed: 0,
            train_subset: None,
            test_subset: None,
            augment: Augment::default(),
            synthetic: None,
            format: None,
            skip_bad: false,
            layout: None,
            test_split: 0.0,
        }
    }

    /// The user's data in `path`, laid out as `format`, named after the
    /// folder (or prefix) that holds it.
    pub fn own(format: DataFormat, path: &str) -> Self {
        DataSpec {
            path: Some(path.to_string()),
            format: Some(format),
            ..DataSpec::named(&name_of_path(path))
        }
    }

    /// Parses the CLI form `name[:folder]`, e.g. `fashion-mnist` or
    /// `cifar10:/data/cifar`; for the synthetic set, `synthetic[:key=value,...]`
    /// with keys train, test, classes, shape (e.g. 3x32x32), seed, noise.
    pub fn parse_short(text: &str) -> Result<Self, SpecError> {
        let (name, rest) = match text.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (text, None),
        };
        let mut spec = DataSpec::named(name);
        match (name, rest) {
            ("synthetic", options) => {
                spec.synthetic = Some(SyntheticSpec::parse(options.unwrap_or(""))?)
            }
            ("image-folder" | "arrays", Some(path)) => {
                spec = DataSpec::own(DataFormat::parse(name)?, path)
            }
            (_, Some(path)) => spec.path = Some(path.to_string()),
            (_, None) => {}
        }
        spec.files()?;
        Ok(spec)
    }

    /// The folder or prefix files are read from.
    pub fn location(&self) -> Option<String> {
        self.path.clone().or_else(|| {
            (self.dataset == defaults::DATASET).then(|| {
                std::env::var("NT_FASHION_MNIST")
                    .unwrap_or_else(|_| defaults::FASHION_MNIST_DIR.to_string())
            })
        })
    }

    /// Checks the settings that need no files: a known set or format with
    /// its path, fractions in range, and options only where they apply.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.files()?;
        if let Some(s) = &self.synthetic {
            s.validate()?;
        }
        for (field, value) in [
            ("data.validation", self.validation),
            ("data.test_split", self.test_split),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(SpecError::new(
                    field,
                    format!("must be in [0, 1), got {value}"),
                ));
            }
        }
        if self
            .path
            .as_deref()
            .and_then(|p| p.strip_prefix("store:"))
            .is_some_and(|prefix| prefix.trim_matches('/').is_empty())
        {
            return Err(SpecError::new(
                "data.path",
                "`store:` needs a key prefix (store:datasets/flowers), not the whole store",
            ));
        }
        if self.skip_bad && self.format != Some(DataFormat::ImageFolder) {
            return Err(SpecError::new(
                "data.skip_bad",
                "applies only to `format: image-folder`",
            ));
        }
        if self.layout.is_some() && self.format != Some(DataFormat::Arrays) {
            return Err(SpecError::new(
                "data.layout",
                "applies only to `format: arrays`",
            ));
        }
        if self.test_split > 0.0 && self.format.is_none() {
            return Err(SpecError::new(
                "data.test_split",
                "applies only to `format: image-folder` or `arrays` (the known sets have a test split)",
            ));
        }
        Ok(())
    }

    /// The files this data set reads, relative to its location (IDX files
    /// may also be stored gzipped, with a `.gz` suffix).
    pub fn files(&self) -> Result<DataFiles, SpecError> {
        if let Some(format) = self.format {
            if self.path.as_deref().is_none_or(|p| p.trim().is_empty()) {
                return Err(SpecError::new(
                    "data.path",
                    format!(
                        "`format: {}` needs a path: a folder or `store:<prefix>`",
                        format.name()
                    ),
                ));
            }
            return Ok(match format {
                DataFormat::ImageFolder => DataFiles::ImageFolder,
                DataFormat::Arrays => DataFiles::Arrays,
            });
        }
        let idx = |prefix: &str, transpose: bool| DataFiles::Idx {
            train_images: format!("{prefix}train-images-idx3-ubyte"),
            train_labels: format!("{prefix}train-labels-idx1-ubyte"),
            test_images: format!("{prefix}t10k-images-idx3-ubyte"),
            test_labels: format!("{prefix}t10k-labels-idx1-ubyte"),
            transpose,
        };
        Ok(match self.dataset.as_str() {
            "fashion-mnist" | "mnist" | "kmnist" => idx("", false),
            name if name.starts_with("emnist-") => {
                let split = &name["emnist-".len()..];
                let mut files = idx(&format!("emnist-{split}-"), true);
                if let DataFiles::Idx {
                    test_images,
                    test_labels,
                    ..
                } = &mut files
                {
                    *test_images = format!("emnist-{split}-test-images-idx3-ubyte");
                    *test_labels = format!("emnist-{split}-test-labels-idx1-ubyte");
                }
                files
            }
            "cifar10" => DataFiles::Cifar {
                train: (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
                test: vec!["test_batch.bin".into()],
                label_bytes: 1,
            },
            "cifar100" => DataFiles::Cifar {
                train: vec!["train.bin".into()],
                test: vec!["test.bin".into()],
                label_bytes: 2,
            },
            "synthetic" => DataFiles::Synthetic,
            other => {
                return Err(SpecError::new("data.dataset", format!(
                    "unknown data set `{other}` (known: fashion-mnist, mnist, kmnist, emnist-<split>, cifar10, cifar100, synthetic; \
                     for your own data give `format: image-folder` or `format: arrays` and a path)"
                )))
            }
        })
    }
}

/// The files of a data set.
#[derive(Clone, Debug)]
pub enum DataFiles {
    Idx {
        train_images: String,
        train_labels: String,
        test_images: String,
        test_labels: String,
        transpose: bool,
    },
    Cifar {
        train: Vec<String>,
        test: Vec<String>,
        label_bytes: usize,
    },
    Synthetic,
    /// Listed and decoded by the runtime (`nt_runtime::data::folder`).
    ImageFolder,
    /// Read by the runtime (`nt_runtime::data::arrays`).
    Arrays,
}

/// A data set's name from its folder or prefix: the last path component.
pub fn name_of_path(path: &str) -> String {
    let path = path.strip_prefix("store:").unwrap_or(path);
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("data")
        .to_string()
}

/// Training-time augmentation, as torchvision's `RandomCrop(size, padding)`
/// and `RandomHorizontalFlip()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Zero-pad each side by this many pixels, then crop back at a random offset (0 = off).
    pub crop_padding: usize,
    /// Flip half of the images left to right.
    pub hflip: bool,
}

impl Augment {
    pub fn is_off(&self) -> bool {
        self.crop_padding == 0 && !self.hflip
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSpec {
    /// Training samples.
    pub train: usize,
    /// Test samples.
    pub test: usize,
    pub classes: usize,
    /// `[channels, height, width]`
    pub shape: [usize; 3],
    pub seed: u64,
    /// Noise amplitude relative to the pixel range (0 = exact prototypes).
    pub noise: f64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            train: defaults::SYNTHETIC_TRAIN,
            test: defaults::SYNTHETIC_TEST,
            classes: defaults::SYNTHETIC_CLASSES,
            shape: defaults::SYNTHETIC_SHAPE,
            seed: 0,
            noise: defaults::SYNTHETIC_NOISE,
        }
    }
}

impl SyntheticSpec {
    /// Sizes of at least 1 and a finite, non-negative noise.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::new("data.synthetic", m));
        if self.train == 0 || self.test == 0 || self.classes == 0 {
            return bad("train, test and classes must be at least 1".into());
        }
        if self.shape.contains(&0) {
            return bad(format!(
                "shape must have no zero dimension, got {:?}",
                self.shape
            ));
        }
        if !(self.noise >= 0.0 && self.noise.is_finite()) {
            return bad(format!(
                "noise must be finite and at least 0, got {}",
                self.noise
            ));
        }
        Ok(())
    }

    /// Parses `key=value,...` (keys: train, test, classes, shape, seed, noise).
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let mut spec = SyntheticSpec::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || {
                SpecError::new(
                    "data.synthetic",
                    format!("synthetic data option `{part}` is not valid"),
                )
            };
            let (key, value) = part.split_once('=').ok_or_else(bad)?;
            match key {
                "train" => spec.train = value.parse().map_err(|_| bad())?,
                "test" => spec.test = value.parse().map_err(|_| bad())?,
                "classes" => spec.classes = value.parse().map_err(|_| bad())?,
                "seed" => spec.seed = value.parse().map_err(|_| bad())?,
                "noise" => spec.noise = value.parse().map_err(|_| bad())?,
                "shape" => {
                    let dims: Vec<usize> = value
                        .split('x')
                        .map(|d| d.parse().map_err(|_| bad()))
                        .collect::<Result<_, SpecError>>()?;
                    spec.shape = dims.try_into().map_err(|_| bad())?;
                }
                _ => return Err(bad()),
            }
        }
        Ok(spec)
    }
}
