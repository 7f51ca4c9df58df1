//! The runtime's error: the fusion math's errors, libtorch's, and those of
//! data and devices. Every variant names what is wrong in words a user can
//! act on; nothing reachable from input panics.

use std::path::PathBuf;

use fusion::FusionError;

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// An architecture, checkpoint or set of members the fusion math refuses.
    #[error(transparent)]
    Fusion(#[from] FusionError),

    /// A libtorch failure (shapes, devices, memory).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// A data set that cannot be read: missing, malformed or truncated files.
    #[error("data: {0}")]
    Data(String),

    /// A device or feature this machine cannot provide (CUDA, bf16 on a CPU).
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// Settings that cannot be used (training settings, a model's graph).
    #[error("{0}")]
    Spec(String),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An object a job needs is not in the store.
    #[error("object `{0}` does not exist")]
    Missing(String),

    /// The object store failed (an outage, a refused request): another
    /// attempt may not meet it.
    #[error("{0}")]
    Storage(String),

    /// These models cannot train as one joint computation (an op or settings
    /// joint training refuses, or a device without room for all of them):
    /// train them one by one instead.
    #[error("joint training refused: {0}")]
    NotJoint(String),

    /// The job's hooks asked it to stop before it finished.
    #[error("stopped before the end")]
    Stopped,
}

impl RuntimeError {
    pub fn spec(msg: impl Into<String>) -> Self {
        RuntimeError::Fusion(FusionError::spec(msg))
    }

    pub fn checkpoint(source_name: impl Into<String>, reason: impl Into<String>) -> Self {
        RuntimeError::Fusion(FusionError::checkpoint(source_name, reason))
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether another attempt, perhaps on another machine, may succeed:
    /// libtorch (device, memory), I/O and storage failures; not bad input,
    /// nor a job that was asked to stop.
    pub fn is_retryable(&self) -> bool {
        match self {
            RuntimeError::Torch(_) | RuntimeError::Io { .. } | RuntimeError::Storage(_) => true,
            RuntimeError::Fusion(FusionError::Io { .. }) => true,
            RuntimeError::Fusion(_)
            | RuntimeError::Data(_)
            | RuntimeError::Unsupported(_)
            | RuntimeError::NotJoint(_)
            | RuntimeError::Spec(_)
            | RuntimeError::Missing(_)
            | RuntimeError::Stopped => false,
        }
    }
}

impl From<nt_spec::SpecError> for RuntimeError {
    fn from(e: nt_spec::SpecError) -> Self {
        RuntimeError::Spec(e.to_string())
    }
}
