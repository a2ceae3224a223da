//! The Kafka contract the server and its consumers share. Data flow step:
//! every process that reads or writes Lockstep's Kafka topics (the server,
//! the push worker, the dashboard) names topics and groups, configures its
//! clients and reads group offsets through this crate, so that they agree
//! without depending on each other.
//!
//! # Layout
//! - [`settings`]: [`KafkaSettings`] (`[kafka]` in every binary's settings file) and
//!   [`layered`], the one way every binary loads its settings (defaults, file, env).
//! - [`client`]: the base librdkafka configuration of every client and the fetch tuning
//!   ([`fetch_wait`]), one named wait per reader.
//! - [`naming`]: user topics and device groups.
//! - [`error`]: [`KafkaError`] and which of it is retryable.
//! - [`deadline`]: [`bounded`], the one way a Kafka wait is bounded (and retried).
//! - [`topics`]: creating a user's topic, reading its watermarks.
//! - [`group_offsets`]: commits and fetches consumer-group offsets for any number of groups
//!   over shared connections (no rdkafka consumer per group).
//! - [`locks`]: the one way Lockstep's processes take a std lock.
//! - [`producer`]: [`DeliveryProducer`], the producer every process writes with (delivery
//!   reports as futures, polled without rust-rdkafka's idle spin).

pub mod client;
pub mod deadline;
pub mod error;
pub mod group_offsets;
pub mod locks;
pub mod naming;
pub mod producer;
pub mod settings;
pub mod topics;

pub use client::{base_config, change_producer_config, consumer_config, fetch_wait, fetch_wait_max_ms};
pub use deadline::{KafkaFailure, Retry, bounded};
pub use error::KafkaError;
pub use group_offsets::{GroupOffsets, GroupOffsetsError, GroupOffsetsSettings};
pub use naming::{device_group, user_topic};
pub use producer::{Delivered, DeliveryProducer, Record};
pub use settings::{KafkaSettings, SettingsError, layered, optional_addr};
pub use topics::Topics;
