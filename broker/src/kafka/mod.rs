//! The server's Kafka clients: the shared Kafka contract of `lockstep-kafka`
//! (settings, naming, errors, user topics, group offsets), plus what only the
//! server runs.
//!
//! Layout:
//! - [`topics`] (from `lockstep-kafka`): creating a user's topic, reading its watermarks.
//! - [`producer`]: the one idempotent producer (acks=all) the gateway writes through.
//! - [`readers`]: a small pool of Kafka consumers that every catching-up device shares,
//!   so that the number of Kafka clients does not grow with the number of devices.
//! - [`group_offsets`] (from `lockstep-kafka`): commits and fetches one consumer group per
//!   device over shared connections (no rdkafka consumer per group).

pub mod producer;
pub mod readers;

pub use lockstep_kafka::{
    GroupOffsets, GroupOffsetsError, GroupOffsetsSettings, KafkaError, KafkaFailure, Retry, Topics, base_config,
    bounded, device_group, fetch_wait, fetch_wait_max_ms, group_offsets, topics, user_topic,
};
pub use producer::Producer;
pub use readers::{PendingRead, ReadChunk, ReaderLease, ReaderPool};

/// The Kafka clients one server process shares between its parts.
#[derive(Clone)]
pub struct KafkaClients {
    pub producer: Producer,
    pub topics: Topics,
    pub readers: ReaderPool,
    pub offsets: GroupOffsets,
}
