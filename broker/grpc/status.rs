//! The one mapping of [`BrokerError`] to gRPC: its status code, and `tonic::Status`.

use tonic::{Code, Status};

use crate::broker::domain::error::BrokerError;

/// The gRPC code of `err`. Streams that report a refusal inside a response (a refused
/// request on a produce stream) use this, without building a whole [`Status`].
pub(crate) fn code(err: &BrokerError) -> Code {
    match err {
        BrokerError::InvalidArgument { .. } | BrokerError::SchemaViolation { .. } => {
            Code::InvalidArgument
        }
        BrokerError::NotFound(_) => Code::NotFound,
        BrokerError::AlreadyExists(_) => Code::AlreadyExists,
        BrokerError::FailedPrecondition(_) => Code::FailedPrecondition,
        BrokerError::ResourceExhausted(_) => Code::ResourceExhausted,
        BrokerError::DataLoss(_) => Code::DataLoss,
        BrokerError::Unauthenticated(_) => Code::Unauthenticated,
        BrokerError::PermissionDenied(_) => Code::PermissionDenied,
        BrokerError::Unavailable(_)
        | BrokerError::ShuttingDown
        | BrokerError::StorageFailed(_)
        | BrokerError::SchemaStale { .. } => Code::Unavailable,
    }
}

impl From<BrokerError> for Status {
    fn from(err: BrokerError) -> Self {
        Status::new(code(&err), err.to_string())
    }
}
