//! The one place that maps Lockstep's errors to gRPC status codes.
//!
//! Library modules return their own `thiserror` enums; handlers convert them
//! into [`ApiError`], and `From<ApiError> for Status` decides the code and
//! whether the client should retry (the `x-lockstep-retryable` metadata,
//! whose meaning `lockstep_proto::retry` owns for both sides).

use lockstep_proto::retry;
use tonic::{Code, Status};

use crate::{
    accounts::AccountsError,
    db::DbError,
    kafka::{KafkaError, KafkaFailure},
    keys::KeysError,
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
                AccountsError::Db(error) if error.is_retryable() => Code::Unavailable,
                AccountsError::Db(_) => Code::Internal,
            },
            ApiError::Kafka(error) if error.is_retryable() => Code::Unavailable,
            ApiError::Kafka(_) => Code::Internal,
            ApiError::Db(error) if error.is_retryable() => Code::Unavailable,
            ApiError::Db(_) => Code::Internal,
            ApiError::PushTarget(error) => match error {
                TargetError::Invalid(_) => Code::InvalidArgument,
                TargetError::NotFound => Code::NotFound,
                TargetError::Db(error) if error.is_retryable() => Code::Unavailable,
                TargetError::Db(_) => Code::Internal,
            },
            ApiError::Keys(error) => match error {
                KeysError::Invalid(_) => Code::InvalidArgument,
                KeysError::Precondition(_) => Code::FailedPrecondition,
                KeysError::Db(error) if error.is_retryable() => Code::Unavailable,
                KeysError::Db(_) => Code::Internal,
            },
            ApiError::ShuttingDown => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// Whether the same request may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(self.code(), Code::Unavailable | Code::Aborted | Code::ResourceExhausted)
    }

    /// Whether the error's own text describes the server's insides (broker
    /// addresses, topic names, SQL, task panics) rather than the request.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            ApiError::Kafka(_)
                | ApiError::Db(_)
                | ApiError::Internal(_)
                | ApiError::Accounts(AccountsError::Db(_))
                | ApiError::PushTarget(TargetError::Db(_))
                | ApiError::Keys(KeysError::Db(_))
        )
    }

    /// What the client is told. Its own mistakes and the account's state are
    /// explained as they are; the server's trouble is named by what a client
    /// can act on (retry, or report it), never by internal addresses, topic
    /// names or SQL: those go to the server's log (see `From<ApiError> for Status`).
    pub fn client_message(&self) -> String {
        if !self.is_internal() {
            return self.to_string();
        }
        match self {
            ApiError::Kafka(KafkaError::Timeout(operation)) => {
                format!("the server's log store (Kafka) did not answer in time ({operation}); retry later")
            }
            ApiError::Kafka(error) if error.is_retryable() => {
                "the server's log store (Kafka) is unavailable; retry later".to_string()
            }
            ApiError::Kafka(_) => {
                "the server's log store (Kafka) refused the request; the operator can find why in the server's log"
                    .to_string()
            }
            _ => "internal server error; the operator can find why in the server's log".to_string(),
        }
    }
}

/// What `kafka::bounded` looks into (to try transient Kafka trouble again) and times out with.
impl KafkaFailure for ApiError {
    fn as_kafka(&self) -> Option<&KafkaError> {
        match self {
            ApiError::Kafka(error) => Some(error),
            _ => None,
        }
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
        let mut message = error.client_message();
        if error.is_internal() {
            // The client's message and the log line share a reference, so that an
            // operator handed the client's error finds the whole story.
            let reference = error_reference();
            if code == Code::Internal {
                tracing::error!(error = %error, reference, "request failed");
            } else {
                tracing::warn!(error = %error, reference, "request failed");
            }
            message = format!("{message} (ref {reference})");
        }
        let retryable = error.is_retryable();
        let mut status = Status::new(code, message);
        retry::mark(&mut status, retryable);
        status
    }
}

/// A short random reference for one error: in the client's message and in the log.
fn error_reference() -> String {
    let bytes: [u8; 4] = rand::random();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
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
    fn a_busy_or_unreachable_database_is_retryable_a_broken_statement_is_not() {
        let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(5), Some("database is locked".into()));
        let syntax = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(1), Some("syntax error".into()));
        for (error, code) in [
            (ApiError::Db(DbError::Sqlite(busy)), Code::Unavailable),
            (ApiError::Db(DbError::Connect("no database connection: timed out".into())), Code::Unavailable),
            (ApiError::Accounts(AccountsError::Db(DbError::Connect("refused".into()))), Code::Unavailable),
            (ApiError::Db(DbError::Sqlite(syntax)), Code::Internal),
            (ApiError::Db(DbError::Column("devices.token_hash is not a blob".into())), Code::Internal),
        ] {
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{status:?}");
            assert_eq!(retry::is_retryable(&status), code == Code::Unavailable, "{status:?}");
            assert!(!status.message().contains("database is locked") && !status.message().contains("syntax"));
        }
    }

    #[test]
    fn clients_never_read_internal_addresses_topics_or_sql() {
        use rdkafka::{error::KafkaError as RdKafkaError, types::RDKafkaErrorCode};
        let sql = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(1),
            Some("near \"SELEC\": syntax error in SELECT token_hash FROM devices".into()),
        );
        let errors = [
            ApiError::Kafka(KafkaError::Client {
                operation: "produce",
                source: RdKafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure),
            }),
            ApiError::Kafka(KafkaError::Topic {
                operation: "create",
                topic: "lockstep.user.0190".into(),
                code: RDKafkaErrorCode::TopicAuthorizationFailed,
            }),
            ApiError::Kafka(KafkaError::Task("kafka-1.internal:9092/1: Connection refused".into())),
            ApiError::Db(DbError::Sqlite(sql)),
            ApiError::Accounts(AccountsError::Db(DbError::Task("panicked at src/db.rs:12".into()))),
            ApiError::Internal("push task failed: JoinError::Panic".into()),
        ];
        for error in errors {
            let inside = error.to_string();
            let status = Status::from(error);
            let message = status.message();
            for secret in ["lockstep.user", "SELECT", "internal:9092", "db.rs", "Panic", "Connection refused"] {
                assert!(!message.contains(secret), "{message:?} (from {inside:?}) shows {secret:?}");
            }
            assert!(message.contains("(ref "), "{message:?}: a reference to the log line");
        }
        let timeout = Status::from(ApiError::Kafka(KafkaError::Timeout("produce")));
        assert_eq!(timeout.code(), Code::Unavailable);
        assert!(timeout.message().starts_with("the server's log store (Kafka) did not answer in time (produce)"));
        // The client's own mistakes are explained as they are.
        let status = Status::from(ApiError::InvalidArgument("changes[3].nonce: 40 bytes, at most 32".into()));
        assert_eq!(status.message(), "changes[3].nonce: 40 bytes, at most 32");
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
