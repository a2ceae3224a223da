//! Lockstep's device side. The server routes ciphertext; everything that makes
//! sync correct for a person happens here:
//!
//! - [`store`]: the local SQLite store (records, mirror, sealed outbox, deferred changes,
//!   problems, the resync marker, cursor),
//! - [`ids`]: ids generated offline (UUIDv7),
//! - [`crypto`]: XChaCha20-Poly1305 under per-epoch keys, bound to user, record, collection,
//! - [`epochs`]: device X25519 key pairs, random epoch keys sealed to each device, the keyring
//!   (key rotation after a revocation),
//! - [`record`]: per-field last-writer-wins merge on a hybrid logical clock ([`hlc`]),
//! - [`pairing`]: the code that moves the account key to a new device,
//! - [`sync`]: push the outbox, subscribe, apply, ack; repair from the log start when the
//!   server's log lost changes, never by deleting.
//!
//! The `lockstep-cli` binary ([`cli`]) drives all of it for people and scripts.

pub mod cli;
pub mod crypto;
pub mod epochs;
pub mod hlc;
pub mod ids;
pub mod pairing;
pub mod record;
pub mod store;
pub mod sync;
