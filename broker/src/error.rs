//! The one place that maps Lockstep's errors to gRPC status codes.
//!
//! Library modules return their own `thiserror` enums; handlers convert them
//! into [`ApiError`], and `From<ApiError> for Status` decides the code and
//! whether the client should retry (the `x-lockstep-retryable` metadata,
//! whose meaning `lockstep_proto::retry` owns for both sides).

use lockstep_proto::retry;
use tonic::{Code, Status};

use crate::{
    accounts::AccountsError, db::DbError, erasure::ErasureError, kafka::KafkaError, keys::KeysError,
    push_targets::TargetError,
};

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
    /// A change id already used for a change with other content.
    #[error("{0}")]
    ChangeIdReused(String),
    /// Not now; the same request may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// The user's log lost changes Kafka had acknowledged; the device must repair (see `log_guard`).
    #[error("{0}")]
    LogLost(String),
    /// A newer subscription of the same device took over.
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    PushTarget(#[from] TargetError),
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error(transparent)]
    Erasure(#[from] ErasureError),
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
            ApiError::LogLost(_) => Code::DataLoss,
            ApiError::ChangeIdReused(_) => Code::AlreadyExists,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Accounts(error) => match error {
                AccountsError::TicketInvalid => Code::Unauthenticated,
                AccountsError::DeviceNotFound => Code::NotFound,
                AccountsError::TooManyDevices(_) => Code::FailedPrecondition,
                AccountsError::Db(_) => Code::Internal,
            },
            ApiError::Kafka(error) if error.is_retryable() => Code::Unavailable,
            ApiError::Kafka(_) => Code::Internal,
            ApiError::Db(_) => Code::Internal,
            ApiError::PushTarget(error) => match error {
                TargetError::Invalid(_) => Code::InvalidArgument,
                TargetError::NotFound => Code::NotFound,
                TargetError::Db(_) => Code::Internal,
            },
            ApiError::Keys(error) => match error {
                KeysError::Invalid(_) => Code::InvalidArgument,
                KeysError::Precondition(_) => Code::FailedPrecondition,
                KeysError::Db(_) => Code::Internal,
            },
            ApiError::Erasure(ErasureError::Kafka(error)) if error.is_retryable() => Code::Unavailable,
            ApiError::Erasure(_) => Code::Internal,
            ApiError::ShuttingDown => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// Whether the same request may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(self.code(), Code::Unavailable | Code::Aborted | Code::ResourceExhausted)
    }
}

/// The gRPC code's canonical name, e.g. `UNAVAILABLE` (a bounded metric label).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let code = error.code();
        metrics::counter!("lockstep_errors_total", "code" => code_name(code)).increment(1);
        if code == Code::Internal {
            tracing::error!(error = %error, "request failed");
        }
        let retryable = error.is_retryable();
        let mut status = Status::new(code, error.to_string());
        retry::mark(&mut status, retryable);
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
        let status = Status::from(ApiError::LogLost("lost".into()));
        assert_eq!(status.code(), Code::DataLoss);
        assert!(!retry::is_retryable(&status), "a lost log needs a repair, not a retry");
        let status = Status::from(ApiError::Keys(KeysError::Precondition("stale key epoch".into())));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(!retry::is_retryable(&status), "a stale epoch needs new keys, not the same request again");
    }

    #[test]
    fn the_client_reads_every_verdict_the_server_gives() {
        let errors = [
            ApiError::InvalidArgument("x".into()),
            ApiError::OutOfRange("x".into()),
            ApiError::Unauthenticated("x".into()),
            ApiError::ResourceExhausted("x".into()),
            ApiError::Aborted("x".into()),
            ApiError::LogLost("x".into()),
            ApiError::ChangeIdReused("x".into()),
            ApiError::Unavailable("x".into()),
            ApiError::ShuttingDown,
            ApiError::Internal("x".into()),
            ApiError::Kafka(KafkaError::Timeout("produce")),
        ];
        for error in errors {
            let retryable = error.is_retryable();
            let shown = error.to_string();
            assert_eq!(retry::is_retryable(&Status::from(error)), retryable, "{shown}");
        }
    }
}
