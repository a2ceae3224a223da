//! Every change-envelope schema version this crate ships, parsed once and
//! indexed by the CRC-64-AVRO fingerprint of its Parsing Canonical Form.
//!
//! When the envelope evolves, the old `.avsc` is kept under
//! `avro/change_envelope.v<N>.avsc` and listed in [`PREVIOUS_VERSIONS`] so
//! records already in Kafka stay readable; `avro/change_envelope.avsc` is
//! always the current writer and reader schema.

use std::sync::LazyLock;

use apache_avro::{GenericSingleObjectReader, Schema};

use crate::{CHANGE_ENVELOPE_AVSC, Hex, canonical, wire};

/// `(file, schema text)` of every superseded envelope schema that may still
/// be found in Kafka, oldest first. Empty while v1 is the only version.
const PREVIOUS_VERSIONS: &[(&str, &str)] = &[];

/// One known writer schema.
pub(crate) struct KnownSchema {
    pub(crate) file: &'static str,
    pub(crate) schema: Schema,
    /// Parsing Canonical Form, computed from the `.avsc` text.
    pub(crate) canonical_form: String,
    /// CRC-64-AVRO of `canonical_form`, little-endian as on the wire.
    pub(crate) fingerprint: [u8; 8],
    pub(crate) is_current: bool,
    /// Reads a single-object datum of this schema with its names resolved once
    /// (`from_avro_datum` resolves them for every record a catch-up reads).
    pub(crate) reader: GenericSingleObjectReader,
}

struct Registry {
    /// Index 0 is the current schema; then previous versions, newest first.
    schemas: Vec<KnownSchema>,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let sources = std::iter::once(("avro/change_envelope.avsc", CHANGE_ENVELOPE_AVSC, true))
        .chain(PREVIOUS_VERSIONS.iter().rev().map(|&(f, t)| (f, t, false)));
    let mut schemas: Vec<KnownSchema> = Vec::with_capacity(1 + PREVIOUS_VERSIONS.len());
    for (file, text, is_current) in sources {
        // The schemas are compiled in; a failure here is a build defect that
        // the crate's own tests catch, so panicking is the right response.
        let schema =
            Schema::parse_str(text).unwrap_or_else(|e| panic!("embedded Avro schema {file} does not parse: {e}"));
        let canonical_form =
            canonical::parsing_canonical_form(text).unwrap_or_else(|e| panic!("embedded Avro schema {file}: {e}"));
        let fingerprint = canonical::crc64_avro(canonical_form.as_bytes()).to_le_bytes();
        if let Some(other) = schemas.iter().find(|s| s.fingerprint == fingerprint) {
            panic!("embedded Avro schemas {} and {file} have the same fingerprint {}", other.file, Hex(&fingerprint));
        }
        let reader = GenericSingleObjectReader::new_with_header_builder(schema.clone(), wire::Header(fingerprint))
            .unwrap_or_else(|e| panic!("embedded Avro schema {file} does not resolve: {e}"));
        schemas.push(KnownSchema { file, schema, canonical_form, fingerprint, is_current, reader });
    }
    Registry { schemas }
});

/// The current (writer and reader) envelope schema.
pub(crate) fn current() -> &'static KnownSchema {
    &REGISTRY.schemas[0]
}

/// All known envelope schemas, current first.
pub(crate) fn all() -> &'static [KnownSchema] {
    &REGISTRY.schemas
}

/// The known writer schema with this fingerprint, if any.
pub(crate) fn lookup(fingerprint: &[u8; 8]) -> Option<&'static KnownSchema> {
    REGISTRY.schemas.iter().find(|s| &s.fingerprint == fingerprint)
}

/// `"<hex> (file), ..."` for error messages.
pub(crate) fn known_fingerprints_hex() -> String {
    all().iter().map(|s| format!("{} ({})", Hex(&s.fingerprint), s.file)).collect::<Vec<_>>().join(", ")
}
