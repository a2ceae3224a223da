//! A direct reader of the current envelope schema's Avro body: field by field
//! into a [`ChangeEnvelope`], without apache-avro's `Value` tree (a dozen
//! allocations a record, field names included). Catch-up reads every record
//! of a device's backlog through here.
//!
//! It accepts exactly what apache-avro accepts and reads it the same way
//! (the tests compare both on arbitrary envelopes and bytes); anything it
//! does not accept, [`crate::decode_change`] hands to apache-avro, which says
//! what is wrong. It knows one schema: when `avro/change_envelope.avsc`
//! changes, [`reads`] turns it off until it is updated (a test fails first).

use apache_avro::{Schema, schema::SchemaKind};

#[cfg(test)]
use crate::change::ChangeEnvelope;
use crate::change::{ChangeEnvelopeRef, Op};

/// The fields of the schema this reader knows, in order.
const FIELDS: [(&str, SchemaKind); 12] = [
    ("schema_version", SchemaKind::Int),
    ("user_id", SchemaKind::String),
    ("origin_device_id", SchemaKind::String),
    ("change_id", SchemaKind::String),
    ("record_id", SchemaKind::String),
    ("collection", SchemaKind::String),
    ("op", SchemaKind::Enum),
    ("hlc", SchemaKind::Long),
    ("key_epoch", SchemaKind::Long),
    ("nonce", SchemaKind::Bytes),
    ("ciphertext", SchemaKind::Bytes),
    ("received_at", SchemaKind::TimestampMillis),
];

/// Whether this reader reads `schema` (the current envelope schema).
pub(crate) fn reads(schema: &Schema) -> bool {
    let Schema::Record(record) = schema else { return false };
    record.fields.len() == FIELDS.len()
        && record.fields.iter().zip(FIELDS).all(|(field, (name, kind))| {
            field.name == name
                && SchemaKind::from(&field.schema) == kind
                && match &field.schema {
                    Schema::Enum(op) => op.symbols == ["UPSERT", "DELETE"],
                    _ => true,
                }
        })
}

/// The envelope in `body` (the datum after the single-object header), or
/// `None` for anything apache-avro would refuse or that is not one whole datum.
#[cfg(test)]
pub(crate) fn read(body: &[u8]) -> Option<ChangeEnvelope> {
    read_ref(body).map(|envelope| envelope.to_envelope())
}

/// [`read`] in place: the strings and bytes borrow `body`.
pub(crate) fn read_ref(body: &[u8]) -> Option<ChangeEnvelopeRef<'_>> {
    let mut rest = body;
    let rest = &mut rest;
    let envelope = ChangeEnvelopeRef {
        schema_version: int(rest)?,
        user_id: string(rest)?,
        origin_device_id: string(rest)?,
        change_id: string(rest)?,
        record_id: string(rest)?,
        collection: string(rest)?,
        op: match int(rest)? {
            0 => Op::Upsert,
            1 => Op::Delete,
            _ => return None,
        },
        hlc: long(rest)?,
        key_epoch: u32::try_from(long(rest)?).ok()?,
        nonce: bytes(rest)?,
        ciphertext: bytes(rest)?,
        received_at_ms: long(rest)?,
    };
    rest.is_empty().then_some(envelope)
}

/// Appends `envelope`'s Avro body in the current schema: byte for byte what
/// apache-avro writes (the tests compare both on arbitrary envelopes).
pub(crate) fn write(envelope: &ChangeEnvelopeRef<'_>, out: &mut Vec<u8>) {
    write_long(i64::from(envelope.schema_version), out);
    for field in
        [envelope.user_id, envelope.origin_device_id, envelope.change_id, envelope.record_id, envelope.collection]
    {
        write_bytes(field.as_bytes(), out);
    }
    write_long(envelope.op.symbol().0.into(), out);
    write_long(envelope.hlc, out);
    write_long(envelope.key_epoch.into(), out);
    write_bytes(envelope.nonce, out);
    write_bytes(envelope.ciphertext, out);
    write_long(envelope.received_at_ms, out);
}

/// A zigzag variable-length `long` (an `int`, an enum index and a length are written so too).
pub(crate) fn write_long(value: i64, out: &mut Vec<u8>) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

fn write_bytes(value: &[u8], out: &mut Vec<u8>) {
    write_long(value.len() as i64, out);
    out.extend_from_slice(value);
}

/// apache-avro's variable-length integer: at most 10 bytes, bits past 64 dropped.
fn varint(rest: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (index, &byte) in rest.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7F) << (index * 7);
        if byte & 0x80 == 0 {
            *rest = &rest[index + 1..];
            return Some(value);
        }
    }
    None
}

/// A zigzag variable-length `long`; `None` if truncated or longer than 10 bytes.
pub(crate) fn long(rest: &mut &[u8]) -> Option<i64> {
    let zigzag = varint(rest)?;
    Some(((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64))
}

fn int(rest: &mut &[u8]) -> Option<i32> {
    i32::try_from(long(rest)?).ok()
}

fn bytes<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(long(rest)?).ok()?;
    if len > rest.len() {
        return None;
    }
    let (value, after) = rest.split_at(len);
    *rest = after;
    Some(value)
}

fn string<'a>(rest: &mut &'a [u8]) -> Option<&'a str> {
    std::str::from_utf8(bytes(rest)?).ok()
}
