//! Everything that talks to Kafka: user topics (admin), the idempotent
//! producer, the shared catch-up readers and per-device group offsets.
//!
//! Layout:
//! - [`topics`]: creating a user's topic, reading its watermarks.
//! - [`producer`]: the one idempotent producer (acks=all) the gateway writes through.
//! - [`readers`]: a small pool of Kafka consumers that every catching-up device shares,
//!   so that the number of Kafka clients does not grow with the number of devices.
//! - [`group_offsets`]: commits and fetches one consumer group per device over shared
//!   connections (no rdkafka consumer per group).

pub mod group_offsets;
pub mod producer;
pub mod readers;
pub mod topics;

use rdkafka::{ClientConfig, error::RDKafkaErrorCode};

pub use group_offsets::{GroupOffsets, GroupOffsetsError, GroupOffsetsSettings};
pub use producer::Producer;
pub use readers::{ReadChunk, ReaderPool};
pub use topics::Topics;

use crate::settings::KafkaSettings;

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

/// The Kafka clients one server process shares between its parts.
#[derive(Clone)]
pub struct KafkaClients {
    pub producer: Producer,
    pub topics: Topics,
    pub readers: ReaderPool,
    pub offsets: GroupOffsets,
}

/// The base librdkafka configuration every Lockstep client starts from.
pub fn base_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("client.id", client_id)
        .set("socket.keepalive.enable", "true");
    for (key, value) in &settings.client_config {
        config.set(key, value);
    }
    config
}

/// Name of a user's topic.
pub fn user_topic(settings: &KafkaSettings, user_id: &str) -> String {
    format!("{}{}", settings.topic_prefix, user_id)
}

/// Name of a device's consumer group.
pub fn device_group(settings: &KafkaSettings, device_id: &str) -> String {
    format!("{}{}", settings.group_prefix, device_id)
}
