//! The Kafka-facing contract of Lockstep.
//!
//! Data flows **gateway → Kafka topic → delivery**. This crate is the middle
//! step: the exact bytes the gateway writes as a Kafka record value and the
//! delivery side reads back. Every change a device pushes becomes one
//! [`ChangeEnvelope`], serialised with the Avro schema in
//! `avro/change_envelope.avsc` (the source of truth; other-language readers
//! can use [`CHANGE_ENVELOPE_AVSC`] directly) using Avro *single-object
//! encoding*:
//!
//! ```text
//! C3 01 | 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema | Avro binary body
//! ```
//!
//! The fingerprint is the Rabin fingerprint of the schema's Parsing Canonical
//! Form, so any Avro implementation can recompute it from the `.avsc`. It is
//! how a reader tells envelope versions apart: [`decode_change`] looks it up
//! in a registry of every envelope schema version this crate ships and
//! resolves older writer schemas to the current reader schema.
//!
//! # Layout
//!
//! - `avro/*.avsc` — the schemas, embedded with `include_str!`.
//! - `src/registry.rs` — parses the embedded schemas once, computes their
//!   fingerprints, looks writer schemas up by fingerprint.
//! - `src/canonical.rs` — Parsing Canonical Form and CRC-64-AVRO (done here
//!   because apache-avro's canonical form is off for logical types).
//! - `src/wire.rs` — the single-object framing (magic + fingerprint header).
//! - `src/change.rs` — [`ChangeEnvelope`] / [`Op`] and their mapping to and
//!   from Avro values; [`ChangeEnvelopeRef`], an envelope read in place
//!   ([`decode_change_with`]).
//! - `src/direct.rs` — the current envelope schema read field by field (the
//!   fast path of [`decode_change`]; apache-avro reads everything else).
//! - `src/event.rs` — [`Event`]: the metadata-only notifications on the
//!   events topic (`avro/event.avsc`), same framing.
//! - `src/target_policy.rs` — where a push target may point: the address policy
//!   the server and the push worker share.
//! - this file — the public API and [`SchemaError`].

mod canonical;
mod change;
mod direct;
mod event;
mod registry;
pub mod target_policy;
mod wire;

use std::fmt;

pub use change::{CHANGE_ENVELOPE_VERSION, ChangeEnvelope, ChangeEnvelopeRef, Op};
pub use event::{
    EVENT_AVSC, Event, EventBody, PushTarget, TargetRemovedReason, WakeUpOutcome, body_kinds, decode_event,
    encode_event, event_canonical_form, event_fingerprint, event_schema, previous_event_fingerprints,
};
pub use wire::{SINGLE_OBJECT_HEADER_LEN, SINGLE_OBJECT_MAGIC};

/// The text of `avro/change_envelope.avsc`, the current (writer) schema of
/// [`ChangeEnvelope`], e.g. for handing to readers written in other languages.
pub const CHANGE_ENVELOPE_AVSC: &str = include_str!("../avro/change_envelope.avsc");

/// Everything that can go wrong turning an envelope into bytes or back.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Fewer bytes than the 10-byte single-object header.
    #[error(
        "truncated input: {len} byte(s), but an Avro single-object header alone is \
         {SINGLE_OBJECT_HEADER_LEN} bytes (C3 01 + 8-byte fingerprint)"
    )]
    TruncatedHeader { len: usize },

    /// The first two bytes are not the single-object magic `C3 01`.
    #[error("not Avro single-object encoded: expected magic [C3, 01], found {found:02X?}")]
    BadMagic { found: Vec<u8> },

    /// The header names a writer schema this build does not know.
    #[error(
        "unknown writer schema fingerprint {} (CRC-64-AVRO, little-endian as on the wire); \
         known change-envelope schema fingerprints: {}",
        Hex(fingerprint),
        registry::known_fingerprints_hex()
    )]
    UnknownFingerprint { fingerprint: [u8; 8] },

    /// An events-topic record whose header names another schema.
    #[error(
        "unknown event schema fingerprint {} (CRC-64-AVRO, little-endian as on the wire); \
         this build reads events with fingerprints {known}",
        Hex(fingerprint)
    )]
    UnknownEventFingerprint { fingerprint: [u8; 8], known: String },

    /// The Avro body ends where a field of the schema should be.
    #[error("truncated Avro body: it ends before field `{field}`")]
    TruncatedBody { field: String },

    /// The Avro body could not be decoded with the writer schema (truncated or
    /// corrupt), or could not be resolved to the current reader schema.
    #[error("malformed or truncated Avro body: {0}")]
    MalformedBody(#[source] apache_avro::Error),

    /// A `string`/`bytes` length prefix claims more bytes than the input has.
    #[error(
        "malformed or truncated Avro body: field `{field}` claims {claimed} byte(s) \
         but only {available} remain"
    )]
    LengthBeyondInput { field: String, claimed: i64, available: usize },

    /// The body decoded but bytes were left over after the datum.
    #[error("{count} unexpected trailing byte(s) after the Avro body")]
    TrailingBytes { count: usize },

    /// The body decoded to a value of the wrong shape for a field (apache-avro
    /// yields `null` for some truncated fields instead of an error).
    #[error("malformed or truncated Avro body: field `{field}` decoded as {found}, expected {expected}")]
    UnexpectedValue { field: &'static str, expected: &'static str, found: String },

    /// A field decoded fine but its value does not fit the Rust type.
    #[error("field `{field}` = {value} is out of range ({range})")]
    FieldOutOfRange { field: &'static str, value: i64, range: &'static str },

    /// apache-avro refused to encode the value (should not happen for a
    /// well-formed [`ChangeEnvelope`]).
    #[error("cannot encode change envelope: {0}")]
    Encode(#[source] apache_avro::Error),
}

/// Lower-case hex of a byte slice, for error messages.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Avro single-object encoding: 0xC3 0x01, the 8-byte little-endian
/// CRC-64-AVRO fingerprint of the writer schema, then the Avro binary datum.
///
/// Always written with the current schema ([`change_envelope_schema`]). The
/// envelope's fields are carried as-is; in particular `schema_version` is not
/// checked against [`CHANGE_ENVELOPE_VERSION`].
pub fn encode_change(envelope: &ChangeEnvelope) -> Result<Vec<u8>, SchemaError> {
    encode_change_ref(&envelope.as_ref())
}

/// [`encode_change`] from borrowed fields: the gateway encodes each pushed
/// change from the request's own strings and bytes, copying each once, into
/// the one buffer it returns.
pub fn encode_change_ref(envelope: &ChangeEnvelopeRef<'_>) -> Result<Vec<u8>, SchemaError> {
    let current = registry::current();
    let mut out = Vec::with_capacity(envelope.max_encoded_len());
    wire::write_header(&current.fingerprint, &mut out);
    if *DIRECT {
        direct::write(envelope, &mut out);
    } else {
        encode_with_apache_avro(envelope, &mut out)?;
    }
    Ok(out)
}

/// apache-avro's schema-aware serializer: what [`direct::write`] must match,
/// and the writer for a current schema that [`direct`] does not know.
fn encode_with_apache_avro(envelope: &ChangeEnvelopeRef<'_>, out: &mut Vec<u8>) -> Result<(), SchemaError> {
    apache_avro::write_avro_datum_ref(&registry::current().schema, &change::AvroView(envelope), out)
        .map(|_| ())
        .map_err(SchemaError::Encode)
}

/// Reads any known version of the envelope (looks the fingerprint up in a
/// registry of all envelope schema versions shipped in `avro/`; today only
/// v1) and resolves it to the current reader schema.
///
/// Never panics on arbitrary input; every failure is a [`SchemaError`].
/// The input must be exactly one datum: trailing bytes are an error.
pub fn decode_change(bytes: &[u8]) -> Result<ChangeEnvelope, SchemaError> {
    let (fingerprint, body) = wire::split_header(bytes)?;
    let writer = registry::lookup(&fingerprint).ok_or(SchemaError::UnknownFingerprint { fingerprint })?;
    if writer.is_current
        && *DIRECT
        && let Some(envelope) = direct::read_ref(body)
    {
        return Ok(envelope.to_envelope());
    }
    decode_generic(bytes, writer, body)
}

/// [`decode_change`] without copying the envelope's strings and bytes where it
/// can help it: `read` gets them borrowed from `bytes` (from a copy for an
/// envelope of an older schema, or one only apache-avro reads) and returns
/// what it keeps. Accepts and refuses exactly what [`decode_change`] does,
/// with the same errors.
pub fn decode_change_with<T>(bytes: &[u8], read: impl FnOnce(ChangeEnvelopeRef<'_>) -> T) -> Result<T, SchemaError> {
    let (fingerprint, body) = wire::split_header(bytes)?;
    let writer = registry::lookup(&fingerprint).ok_or(SchemaError::UnknownFingerprint { fingerprint })?;
    if writer.is_current
        && *DIRECT
        && let Some(envelope) = direct::read_ref(body)
    {
        return Ok(read(envelope));
    }
    decode_generic(bytes, writer, body).map(|envelope| read(envelope.as_ref()))
}

/// apache-avro's reading of `bytes` (`body` after its header) written with `writer`.
fn decode_generic(bytes: &[u8], writer: &registry::KnownSchema, body: &[u8]) -> Result<ChangeEnvelope, SchemaError> {
    wire::check_lengths(&writer.schema, body)?;
    // The reader checks the header again and reads the datum after it.
    let mut rest = bytes;
    let mut value = writer.reader.read_value(&mut rest).map_err(SchemaError::MalformedBody)?;
    if !rest.is_empty() {
        return Err(SchemaError::TrailingBytes { count: rest.len() });
    }
    // Resolution is the identity for the current schema, so skip it there.
    if !writer.is_current {
        value = value.resolve(&registry::current().schema).map_err(SchemaError::MalformedBody)?;
    }
    ChangeEnvelope::from_avro_value(value)
}

/// Whether [`direct`] reads and writes the current schema (it knows one version).
static DIRECT: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| direct::reads(&registry::current().schema));

/// The parsed current writer schema of [`ChangeEnvelope`], for tools and tests.
pub fn change_envelope_schema() -> &'static apache_avro::Schema {
    &registry::current().schema
}

/// The CRC-64-AVRO (Rabin) fingerprint of the current schema's Parsing
/// Canonical Form: the 8 little-endian bytes exactly as they appear on the
/// wire after `C3 01`.
pub fn change_envelope_fingerprint() -> [u8; 8] {
    registry::current().fingerprint
}

/// The Parsing Canonical Form of the current schema, the exact string
/// [`change_envelope_fingerprint`] is computed from (for tools and debugging).
pub fn change_envelope_canonical_form() -> &'static str {
    &registry::current().canonical_form
}

#[cfg(test)]
mod tests;
