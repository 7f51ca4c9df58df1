//! The one error type of the fusion engine. Every variant names what is wrong
//! in words a user can act on; nothing reachable from input panics.

use std::path::PathBuf;

pub type Result<T, E = FusionError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum FusionError {
    /// An architecture spec that cannot be parsed or does not describe a valid network.
    #[error("architecture spec: {0}")]
    Spec(String),

    /// A preset name that is not built in.
    #[error("unknown architecture preset `{name}` (known presets: {known})")]
    UnknownPreset { name: String, known: String },

    /// A checkpoint that cannot be read, is corrupt, or does not match its architecture.
    #[error("checkpoint {source_name}: {reason}")]
    Checkpoint { source_name: String, reason: String },

    /// A data set that cannot be read: missing, malformed or truncated files.
    #[error("data: {0}")]
    Data(String),

    /// Members that cannot be fused together.
    #[error("members: {0}")]
    Members(String),

    /// An architecture the fusion method cannot handle.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The exactness guard found a concatenated or fused model that is not what it must be.
    #[error("exactness guard: {0}")]
    Guard(String),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FusionError {
    pub fn spec(msg: impl Into<String>) -> Self {
        FusionError::Spec(msg.into())
    }

    pub fn checkpoint(source_name: impl Into<String>, reason: impl Into<String>) -> Self {
        FusionError::Checkpoint {
            source_name: source_name.into(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FusionError::Io {
            path: path.into(),
            source,
        }
    }
}
