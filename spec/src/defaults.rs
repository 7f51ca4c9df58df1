//! Every default of a run spec and of the offline commands, in one place.
//! Nothing downstream fills a default of its own: the YAML file leaves
//! unset fields unset, the plan fills them from here, and the task messages
//! carry resolved values.

/// The embedded default data set.
pub const DATASET: &str = "fashion-mnist";
/// Where Debian's `dataset-fashion-mnist` package puts Fashion-MNIST
/// (`NT_FASHION_MNIST` overrides it).
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Where Debian's dataset packages install: the folder workers read local
/// data from unless configured otherwise (`nt-worker --data-dir`).
pub const DATASETS_DIR: &str = "/usr/share/datasets";

/// Members trained when a spec gives no count.
pub const MEMBERS: usize = 2;
/// Most members a run may have.
pub const MAX_MEMBERS: usize = 64;
/// The fusion method when a spec lists none.
pub const METHOD: &str = "nt";

/// Training: the paper's protocol for the MLP and LeNet (SGD, lr 0.01,
/// momentum 0.9, batch 256, constant rate, no weight decay, 10 epochs).
pub const EPOCHS: usize = 10;
pub const BATCH_SIZE: usize = 256;
pub const LR: f64 = 0.01;
pub const MOMENTUM: f64 = 0.9;
pub const WEIGHT_DECAY: f64 = 0.0;
/// Progress reports every this many steps (and at every epoch's end).
pub const LOG_EVERY: usize = 50;

/// The fine-tuning seed when a spec gives none.
pub const FINE_TUNE_SEED: u64 = 1000;
/// Distillation: temperature and weight of the soft targets.
pub const DISTILL_TEMPERATURE: f64 = 2.0;
pub const DISTILL_WEIGHT: f64 = 0.25;

/// Evaluation batch size.
pub const EVAL_BATCH: usize = 1024;
/// Attempts per task before the run fails.
pub const MAX_ATTEMPTS: u32 = 3;
/// The most attempts a spec may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;

/// The synthetic data set: sizes, classes, image shape and noise.
pub const SYNTHETIC_TRAIN: usize = 2048;
pub const SYNTHETIC_TEST: usize = 512;
pub const SYNTHETIC_CLASSES: usize = 10;
pub const SYNTHETIC_SHAPE: [usize; 3] = [1, 28, 28];
pub const SYNTHETIC_NOISE: f64 = 0.6;

/// Limits on what a run may carry, so one client cannot make every listing
/// huge: the name, and the labels (count, key and value sizes in bytes).
pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_BYTES: usize = 63;
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
