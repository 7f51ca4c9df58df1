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

/// The most bytes of an error message: past it, a message is cut in the
/// middle. Messages quote what they refuse (a field name, an option, a
/// preset), and a 1 MB name must not become a 1 MB gRPC status or log line.
pub const MAX_MESSAGE_BYTES: usize = 800;

/// `message` whole when short, otherwise its start and end with the number
/// of bytes cut between them (on character boundaries).
pub fn bounded(message: String) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut head = MAX_MESSAGE_BYTES / 2;
    while !message.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = message.len() - MAX_MESSAGE_BYTES / 4;
    while !message.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{} [... {} bytes cut ...] {}",
        &message[..head],
        tail - head,
        &message[tail..]
    )
}

impl FusionError {
    pub fn spec(msg: impl Into<String>) -> Self {
        FusionError::Spec(bounded(msg.into()))
    }

    pub fn checkpoint(source_name: impl Into<String>, reason: impl Into<String>) -> Self {
        FusionError::Checkpoint {
            source_name: bounded(source_name.into()),
            reason: bounded(reason.into()),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FusionError::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_keep_their_start_and_end() {
        let long = format!("option `{}` is not valid", "é".repeat(100_000));
        let e = FusionError::spec(long).to_string();
        assert!(e.len() < 1024, "{} bytes", e.len());
        assert!(e.starts_with("architecture spec: option `é"), "{e}");
        assert!(
            e.ends_with("` is not valid") && e.contains("bytes cut"),
            "{e}"
        );
        assert_eq!(bounded("short".into()), "short");
    }
}
