//! The Lockstep server. Data flow step: *device → gateway → user's topic →
//! delivery → device*. The server routes ciphertext and never opens it.
//!
//! # Layout
//! Each module imports only modules listed below it (no import circle).
//! - [`server`]: the gRPC services, the `run` entry point, and [`server::erasure`] (deleting
//!   an account: its topic, groups and rows, resumable).
//! - [`admin`]: `/metrics` (Prometheus), `/healthz`, `/readyz` on a private port.
//! - [`invite_command`]: `lockstep invite create|list|revoke`, the operator's invite codes.
//! - [`gateway`]: takes pushed changes, deduplicates them, produces them to
//!   the user's topic, answers with offsets once Kafka has them.
//! - [`delivery`]: streams each user's topic to the user's subscribed devices
//!   from their committed offsets; commits an offset when the device acks.
//!   [`delivery::log_guard`]: the log never silently shrinks: a log that lost
//!   acknowledged changes is refused (DATA_LOSS) until each device repairs.
//! - [`error`]: the one place that maps errors to gRPC status codes.
//! - [`push_targets`]: where each device can be woken (stored, validated, announced as
//!   events), and the follower that applies a push worker's removals from the events topic.
//! - [`keys`]: each device's X25519 public key and the account's key epochs
//!   (sealed epoch keys, rotation after a revocation); the stale-epoch check
//!   for pushes.
//! - [`accounts`]: users, devices, bearer tokens, pairing tickets, invite codes.
//! - [`events`]: metadata-only facts (log appended, device acked, connected,
//!   push target set, …) published to the events topic for push workers, the
//!   dashboard and other nodes; never content.
//! - [`kafka`]: the shared Kafka contract of `lockstep-kafka` (settings, naming, errors,
//!   user topics, group offsets, the bounded wait) and the server's own producer and readers.
//! - [`store`]: the shared state's database behind one interface: SQLite (one node, default)
//!   or PostgreSQL (several nodes); both schemas side by side.
//! - [`settings`] (imports no module of this crate), [`db`] (the node-local SQLite), [`slots`], [`idle`],
//!   [`shutdown`] (the one shutdown every task holds), [`wake`] (waiting on a `Notify` for a condition).
//!
//! Shared with the consumers: `lockstep-kafka` (Kafka settings, naming, group offsets, the one
//! lock helper `lockstep_kafka::locks`) and `lockstep-telemetry` (logs and traces).

pub mod accounts;
pub mod admin;
pub mod db;
pub mod delivery;
pub mod error;
pub mod events;
pub mod gateway;
pub mod idle;
pub mod invite_command;
pub mod kafka;
pub mod keys;
pub mod push_targets;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod slots;
pub mod store;
pub mod wake;

pub use server::run;
pub use settings::Settings;
