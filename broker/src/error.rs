//! The one place that maps Lockstep's errors to gRPC status codes.
//!
//! Library modules return their own `thiserror` enums; handlers convert them
//! into [`ApiError`], and `From<ApiError> for Status` decides the code and
//! whether the client should retry (the `x-lockstep-retryable` metadata).

use tonic::{Code, Status, metadata::MetadataValue};

use crate::{accounts::AccountsError, db::DbError, kafka::KafkaError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: the request changed nothing.
    #[error("{0}")]
    InvalidArgument(String),
    /// An offset outside the log.
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A newer subscription of the same device took over.
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::OutOfRange(_) => Code::OutOfRange,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Aborted(_) => Code::Aborted,
            ApiError::Accounts(error) => match error {
                AccountsError::TicketInvalid => Code::Unauthenticated,
                AccountsError::DeviceNotFound => Code::NotFound,
                AccountsError::Db(_) => Code::Internal,
            },
            ApiError::Kafka(error) if error.is_retryable() => Code::Unavailable,
            ApiError::Kafka(_) => Code::Internal,
            ApiError::Db(_) => Code::Internal,
            ApiError::ShuttingDown => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// Whether the same request may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(self.code(), Code::Unavailable | Code::Aborted | Code::ResourceExhausted)
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let code = error.code();
        if code == Code::Internal {
            tracing::error!(error = %error, "request failed");
        }
        let retryable = error.is_retryable();
        let mut status = Status::new(code, error.to_string());
        status
            .metadata_mut()
            .insert("x-lockstep-retryable", MetadataValue::from_static(if retryable { "true" } else { "false" }));
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_retry_hints() {
        let status = Status::from(ApiError::InvalidArgument("changes[0].record_id: empty".into()));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "changes[0].record_id: empty");
        assert_eq!(status.metadata().get("x-lockstep-retryable").unwrap(), "false");
        let status = Status::from(ApiError::ShuttingDown);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.metadata().get("x-lockstep-retryable").unwrap(), "true");
        let status = Status::from(ApiError::Accounts(AccountsError::TicketInvalid));
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}
