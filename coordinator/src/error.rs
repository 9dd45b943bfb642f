//! The coordinator's one error type, and its mapping to `tonic::Status` (the only place that does it).

use tonic::{Code, Status};

use crate::artifacts::BlobError;
use crate::logs::LogError;
use crate::store::StoreError;

/// Every failure the coordinator's domain core reports; each variant maps to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The request itself was wrong (bad pipeline, bad field).
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but does not apply to the current state (stale attempt, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller did not prove who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A size or count limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The coordinator is shutting down or a peer's stream is gone.
    #[error("{0}")]
    Unavailable(String),
    /// The durable store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The log store failed.
    #[error("logs: {0}")]
    Log(#[from] LogError),
    /// The blob store failed.
    #[error("blobs: {0}")]
    Blob(#[from] BlobError),
    /// Anything else that should not happen.
    #[error("internal: {0}")]
    Internal(String),
}

impl CoordError {
    /// The gRPC code this error travels as.
    pub fn code(&self) -> Code {
        match self {
            CoordError::InvalidArgument(_) => Code::InvalidArgument,
            CoordError::NotFound(_) => Code::NotFound,
            CoordError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordError::Unauthenticated(_) => Code::Unauthenticated,
            CoordError::PermissionDenied(_) => Code::PermissionDenied,
            CoordError::ResourceExhausted(_) => Code::ResourceExhausted,
            CoordError::Unavailable(_) => Code::Unavailable,
            CoordError::Store(_) | CoordError::Internal(_) => Code::Internal,
            CoordError::Log(e) => match e {
                LogError::Gap { .. } | LogError::Complete => Code::FailedPrecondition,
                LogError::Invalid(_) => Code::InvalidArgument,
                _ => Code::Internal,
            },
            CoordError::Blob(e) => match e {
                BlobError::DigestMismatch { .. } | BlobError::Invalid(_) => Code::InvalidArgument,
                BlobError::NotFound(_) => Code::NotFound,
                BlobError::TooLarge { .. } => Code::ResourceExhausted,
                BlobError::Busy(_) | BlobError::Storage { .. } => Code::Unavailable,
                _ => Code::Internal,
            },
        }
    }
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// Result alias of the domain core.
pub type CoordResult<T> = Result<T, CoordError>;
