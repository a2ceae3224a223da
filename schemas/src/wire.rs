//! Avro single-object framing: `C3 01`, then the writer schema's 8-byte
//! little-endian CRC-64-AVRO fingerprint, then the Avro binary body.

use apache_avro::Schema;

use crate::SchemaError;

/// The two magic bytes that open every single-object encoded datum.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];

/// Magic (2 bytes) + fingerprint (8 bytes).
pub const SINGLE_OBJECT_HEADER_LEN: usize = 10;

/// Appends the header for a writer schema with this fingerprint.
pub(crate) fn write_header(fingerprint: &[u8; 8], out: &mut Vec<u8>) {
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(fingerprint);
}

/// Checks the magic and splits `bytes` into (fingerprint, body).
pub(crate) fn split_header(bytes: &[u8]) -> Result<([u8; 8], &[u8]), SchemaError> {
    // Report a wrong magic even when the input is also too short for a header.
    let magic_len = bytes.len().min(SINGLE_OBJECT_MAGIC.len());
    if bytes[..magic_len] != SINGLE_OBJECT_MAGIC[..magic_len] {
        return Err(SchemaError::BadMagic { found: bytes[..magic_len].to_vec() });
    }
    match bytes.split_first_chunk::<SINGLE_OBJECT_HEADER_LEN>() {
        Some((header, body)) => {
            let mut fingerprint = [0u8; 8];
            fingerprint.copy_from_slice(&header[2..]);
            Ok((fingerprint, body))
        }
        None => Err(SchemaError::TruncatedHeader { len: bytes.len() }),
    }
}

/// Walks `body` as `schema` just far enough to check every `string`/`bytes`
/// length prefix against the bytes actually present.
///
/// apache-avro allocates (zeroed) whatever a length prefix claims, up to
/// 512 MiB, before it notices the input is shorter, and for a truncated
/// `string` it returns `null` instead of an error. Checking first turns both
/// into a clear error, and so does a union whose index is missing. Stops silently at anything it does not model (a
/// malformed varint, a schema type our envelopes do not use) and leaves
/// that to apache-avro.
pub(crate) fn check_lengths(schema: &Schema, body: &[u8]) -> Result<(), SchemaError> {
    let mut rest = body;
    walk(schema, "", &mut rest).map(|_| ())
}

/// `Ok(false)`: stopped early, nothing more to say.
fn walk(schema: &Schema, field: &str, rest: &mut &[u8]) -> Result<bool, SchemaError> {
    match schema {
        Schema::Int
        | Schema::Long
        | Schema::Date
        | Schema::TimeMillis
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos
        | Schema::Enum(_) => Ok(crate::direct::long(rest).is_some()),
        Schema::String | Schema::Bytes => {
            let Some(len) = crate::direct::long(rest) else {
                return Ok(false);
            };
            match usize::try_from(len) {
                Ok(len) if len <= rest.len() => {
                    *rest = &rest[len..];
                    Ok(true)
                }
                Ok(_) => {
                    Err(SchemaError::LengthBeyondInput { field: field.to_owned(), claimed: len, available: rest.len() })
                }
                Err(_) => Ok(false), // negative: apache-avro rejects it
            }
        }
        Schema::Null => Ok(true),
        Schema::Union(union) => {
            // apache-avro reads a union with a null branch from no input at all as null (an
            // optional field that a truncated record lost): refuse that here.
            if rest.is_empty() {
                return Err(SchemaError::TruncatedBody { field: field.to_owned() });
            }
            let Some(index) = crate::direct::long(rest) else {
                return Ok(false);
            };
            match usize::try_from(index).ok().and_then(|i| union.variants().get(i)) {
                Some(variant) => walk(variant, field, rest),
                None => Ok(false), // apache-avro reports the bad index
            }
        }
        Schema::Record(record) => {
            for f in &record.fields {
                if !walk(&f.schema, &f.name, rest)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Our single-object header (`C3 01` + a CRC-64-AVRO fingerprint of our own
/// Parsing Canonical Form), for apache-avro's single-object readers and writers,
/// which resolve a schema's named types once instead of on every datum.
pub(crate) struct Header(pub(crate) [u8; 8]);

impl apache_avro::headers::HeaderBuilder for Header {
    fn build_header(&self) -> Vec<u8> {
        let mut header = Vec::with_capacity(crate::SINGLE_OBJECT_HEADER_LEN);
        write_header(&self.0, &mut header);
        header
    }
}
