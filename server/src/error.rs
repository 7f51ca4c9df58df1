//! The coordinator's errors and their gRPC codes.

use nt_proto::tonic::{Code, Status};
use nt_spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The run spec is invalid (names the field).
    #[error("invalid run spec: {0}")]
    InvalidSpec(#[from] SpecError),
    /// Some other argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// A run, task or object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (a lost lease, a finished run).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The object store or the coordinator is not available right now.
    #[error("{0}")]
    Unavailable(String),
    /// A request over a configured ceiling (an upload over --max-upload-bytes).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A client's request stream broke (a message over --max-message-bytes,
    /// a reset: passed on with tonic's code) or stalled (`DEADLINE_EXCEEDED`).
    #[error("{1}")]
    RequestStream(Code, String),
    /// A bug or an unexpected state.
    #[error("{0}")]
    Internal(String),
}

impl CoordinatorError {
    pub fn code(&self) -> Code {
        match self {
            CoordinatorError::InvalidSpec(_) | CoordinatorError::InvalidArgument(_) => {
                Code::InvalidArgument
            }
            CoordinatorError::NotFound(_) => Code::NotFound,
            CoordinatorError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordinatorError::Unavailable(_) => Code::Unavailable,
            CoordinatorError::ResourceExhausted(_) => Code::ResourceExhausted,
            CoordinatorError::RequestStream(code, _) => *code,
            CoordinatorError::Internal(_) => Code::Internal,
        }
    }
}

impl From<object_store::Error> for CoordinatorError {
    fn from(e: object_store::Error) -> Self {
        CoordinatorError::Unavailable(format!("object store: {e}"))
    }
}

impl From<nt_common::storage::WriteError> for CoordinatorError {
    fn from(e: nt_common::storage::WriteError) -> Self {
        CoordinatorError::Unavailable(format!("object store: {e}"))
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
