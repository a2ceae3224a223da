//! The Lockstep server. Data flow step: *device → gateway → user's topic →
//! delivery → device*. The server routes ciphertext and never opens it.
//!
//! # Layout
//! - [`gateway`]: takes pushed changes, deduplicates them, produces them to
//!   the user's topic, answers with offsets once Kafka has them.
//! - [`delivery`]: streams each user's topic to the user's subscribed devices
//!   from their committed offsets; commits an offset when the device acks.
//! - [`accounts`]: users, devices, bearer tokens, pairing tickets, invite codes.
//! - [`kafka`]: topics, the producer, the shared readers, group offsets.
//! - [`events`]: metadata-only facts (log appended, device acked, connected,
//!   push target set, …) published to the events topic for push workers, the
//!   dashboard and other nodes; never content.
//! - [`erasure`]: deleting an account: its topic, groups and rows, resumable.
//! - [`keys`]: each device's X25519 public key and the account's key epochs
//!   (sealed epoch keys, rotation after a revocation); the stale-epoch check
//!   for pushes.
//! - [`push_targets`]: where each device can be woken (stored, validated, announced as events).
//! - [`log_guard`]: the log never silently shrinks: a log that lost acknowledged
//!   changes is refused (DATA_LOSS) until each device repairs.
//! - [`server`]: the gRPC services and the `run` entry point.
//! - [`admin`]: `/metrics` (Prometheus), `/healthz`, `/readyz` on a private port.
//! - [`invite_command`]: `lockstep invite create|list|revoke`, the operator's invite codes.
//! - [`settings`], [`error`] (the one gRPC status mapping), [`db`], [`locks`]
//!   (the one way to take a lock), [`shutdown`] (the one shutdown every task holds).

pub mod accounts;
pub mod admin;
pub mod db;
pub mod delivery;
pub mod erasure;
pub mod error;
pub mod events;
pub mod gateway;
pub mod idle;
pub mod invite_command;
pub mod kafka;
pub mod keys;
pub mod log_guard;
pub mod push_targets;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod slots;

pub use lockstep_kafka::locks;
pub use server::run;
pub use settings::Settings;
