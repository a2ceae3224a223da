//! What goes wrong talking to Kafka, and which of it is worth trying again.

use rdkafka::error::RDKafkaErrorCode;

use crate::group_offsets::GroupOffsetsError;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka {operation} failed: {source}")]
    Client {
        operation: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("kafka {operation} for topic {topic} failed: {code}")]
    Topic { operation: &'static str, topic: String, code: RDKafkaErrorCode },
    #[error("topic {topic} does not exist")]
    TopicMissing { topic: String },
    #[error("offset {offset} is no longer in topic {topic}")]
    OffsetOutOfRange { topic: String, offset: i64 },
    #[error("kafka group offsets: {0}")]
    GroupOffsets(#[from] GroupOffsetsError),
    #[error("kafka {0} timed out")]
    Timeout(&'static str),
    #[error("kafka worker is gone: {0}")]
    WorkerGone(&'static str),
    #[error("kafka blocking task failed: {0}")]
    Task(String),
}

impl KafkaError {
    pub fn client(operation: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> Self {
        move |source| KafkaError::Client { operation, source }
    }

    /// Transient trouble (broker away, timeouts, full queues, a user topic
    /// that vanished and is created again) as opposed to a request Kafka will
    /// never accept.
    pub fn is_retryable(&self) -> bool {
        match self {
            KafkaError::Client { source, .. } => !matches!(
                source.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge
                        | RDKafkaErrorCode::InvalidMessageSize
                        | RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::InvalidConfig
                )
            ),
            KafkaError::Topic { code, .. } => !matches!(
                code,
                RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::InvalidReplicationFactor
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::PolicyViolation
            ),
            KafkaError::OffsetOutOfRange { .. } => false,
            KafkaError::TopicMissing { .. } => true,
            KafkaError::GroupOffsets(error) => error.is_retryable(),
            KafkaError::Timeout(_) | KafkaError::WorkerGone(_) | KafkaError::Task(_) => true,
        }
    }
}
