//! [`ChangeEnvelope`] and its mapping to and from apache-avro values of the
//! `lockstep.v1.ChangeEnvelope` record.

use apache_avro::{schema::SchemaKind, types::Value};
use serde::ser::{Serialize, SerializeStruct, Serializer};

use crate::SchemaError;

/// The `schema_version` the gateway writes today (the version of
/// `avro/change_envelope.avsc`).
pub const CHANGE_ENVELOPE_VERSION: i32 = 1;

/// Whether the change creates/replaces a record or deletes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Upsert,
    Delete,
}

/// The gRPC contract's op, as the device wrote it.
impl From<Op> for lockstep_proto::v1::Op {
    fn from(op: Op) -> Self {
        match op {
            Op::Upsert => lockstep_proto::v1::Op::Upsert,
            Op::Delete => lockstep_proto::v1::Op::Delete,
        }
    }
}

/// A device's op in the envelope; `OP_UNSPECIFIED` has no envelope form.
impl TryFrom<lockstep_proto::v1::Op> for Op {
    type Error = SchemaError;

    fn try_from(op: lockstep_proto::v1::Op) -> Result<Self, SchemaError> {
        match op {
            lockstep_proto::v1::Op::Upsert => Ok(Op::Upsert),
            lockstep_proto::v1::Op::Delete => Ok(Op::Delete),
            lockstep_proto::v1::Op::Unspecified => {
                Err(SchemaError::FieldOutOfRange { field: "op", value: 0, range: "UPSERT or DELETE" })
            }
        }
    }
}

impl Op {
    /// The Avro enum symbol and its index in `lockstep.v1.Op`.
    pub(crate) fn symbol(&self) -> (u32, &'static str) {
        match self {
            Op::Upsert => (0, "UPSERT"),
            Op::Delete => (1, "DELETE"),
        }
    }
}

/// One change as Lockstep writes it to a user's Kafka topic: the device's
/// encrypted change plus what the gateway knew. Field docs live in
/// `avro/change_envelope.avsc`; `received_at_ms` is the Avro field
/// `received_at` (`timestamp-millis`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEnvelope {
    pub schema_version: i32,
    pub user_id: String,
    pub origin_device_id: String,
    pub change_id: String,
    pub record_id: String,
    pub collection: String,
    pub op: Op,
    pub hlc: i64,
    /// Stored as an Avro `long`; decoding a value outside `u32` is an error.
    pub key_epoch: u32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub received_at_ms: i64,
}

impl ChangeEnvelope {
    /// An upper bound on the encoded size including the single-object
    /// header: every varint is at most 10 bytes.
    #[cfg(test)]
    pub(crate) fn max_encoded_len(&self) -> usize {
        self.as_ref().max_encoded_len()
    }

    /// The Avro record value, fields in schema order: the generic (and
    /// slower) path, kept to check [`AvroView`] against.
    #[cfg(test)]
    pub(crate) fn to_avro_value(&self) -> Value {
        let (index, symbol) = self.op.symbol();
        let string = |s: &String| Value::String(s.clone());
        Value::Record(vec![
            ("schema_version".into(), Value::Int(self.schema_version)),
            ("user_id".into(), string(&self.user_id)),
            ("origin_device_id".into(), string(&self.origin_device_id)),
            ("change_id".into(), string(&self.change_id)),
            ("record_id".into(), string(&self.record_id)),
            ("collection".into(), string(&self.collection)),
            ("op".into(), Value::Enum(index, symbol.into())),
            ("hlc".into(), Value::Long(self.hlc)),
            ("key_epoch".into(), Value::Long(i64::from(self.key_epoch))),
            ("nonce".into(), Value::Bytes(self.nonce.clone())),
            ("ciphertext".into(), Value::Bytes(self.ciphertext.clone())),
            ("received_at".into(), Value::TimestampMillis(self.received_at_ms)),
        ])
    }

    /// Converts a record decoded with (or resolved to) the current schema,
    /// moving strings and bytes out of the value without copying.
    pub(crate) fn from_avro_value(value: Value) -> Result<Self, SchemaError> {
        let fields = match value {
            Value::Record(fields) => fields,
            other => return Err(unexpected("ChangeEnvelope", "a record", &other)),
        };
        let mut f = Fields(fields.into_iter());
        // Struct expressions evaluate their fields in the order written,
        // which is the schema's field order.
        Ok(ChangeEnvelope {
            schema_version: f.int("schema_version")?,
            user_id: f.string("user_id")?,
            origin_device_id: f.string("origin_device_id")?,
            change_id: f.string("change_id")?,
            record_id: f.string("record_id")?,
            collection: f.string("collection")?,
            op: f.op("op")?,
            hlc: f.long("hlc")?,
            key_epoch: f.u32_long("key_epoch")?,
            nonce: f.bytes("nonce")?,
            ciphertext: f.bytes("ciphertext")?,
            received_at_ms: f.long("received_at")?,
        })
    }
}

/// A [`ChangeEnvelope`] read in place: its strings and bytes borrow the
/// encoded record (see [`crate::decode_change_with`]), so that a reader that
/// keeps only some fields, or copies them where it wants them, allocates
/// nothing for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeEnvelopeRef<'a> {
    pub schema_version: i32,
    pub user_id: &'a str,
    pub origin_device_id: &'a str,
    pub change_id: &'a str,
    pub record_id: &'a str,
    pub collection: &'a str,
    pub op: Op,
    pub hlc: i64,
    pub key_epoch: u32,
    pub nonce: &'a [u8],
    pub ciphertext: &'a [u8],
    pub received_at_ms: i64,
}

impl ChangeEnvelopeRef<'_> {
    /// An upper bound on the encoded size including the single-object
    /// header: every varint is at most 10 bytes.
    pub(crate) fn max_encoded_len(&self) -> usize {
        const MAX_VARINT: usize = 10;
        crate::SINGLE_OBJECT_HEADER_LEN
            + 12 * MAX_VARINT
            + self.user_id.len()
            + self.origin_device_id.len()
            + self.change_id.len()
            + self.record_id.len()
            + self.collection.len()
            + self.nonce.len()
            + self.ciphertext.len()
    }

    /// The envelope with its own copies of every string and byte field.
    pub fn to_envelope(&self) -> ChangeEnvelope {
        ChangeEnvelope {
            schema_version: self.schema_version,
            user_id: self.user_id.to_owned(),
            origin_device_id: self.origin_device_id.to_owned(),
            change_id: self.change_id.to_owned(),
            record_id: self.record_id.to_owned(),
            collection: self.collection.to_owned(),
            op: self.op,
            hlc: self.hlc,
            key_epoch: self.key_epoch,
            nonce: self.nonce.to_vec(),
            ciphertext: self.ciphertext.to_vec(),
            received_at_ms: self.received_at_ms,
        }
    }
}

impl ChangeEnvelope {
    /// The envelope's fields, borrowed.
    pub fn as_ref(&self) -> ChangeEnvelopeRef<'_> {
        ChangeEnvelopeRef {
            schema_version: self.schema_version,
            user_id: &self.user_id,
            origin_device_id: &self.origin_device_id,
            change_id: &self.change_id,
            record_id: &self.record_id,
            collection: &self.collection,
            op: self.op,
            hlc: self.hlc,
            key_epoch: self.key_epoch,
            nonce: &self.nonce,
            ciphertext: &self.ciphertext,
            received_at_ms: self.received_at_ms,
        }
    }
}

/// Serialises a [`ChangeEnvelope`] straight into Avro binary through
/// apache-avro's schema-aware serializer, without building a `Value` or
/// copying any string or byte field.
///
/// apache-avro writes struct fields in the order they are serialised (it
/// does not reorder to the schema), so this must list them in schema order;
/// the tests compare it with the validated `Value` path.
pub(crate) struct AvroView<'a>(pub(crate) &'a ChangeEnvelopeRef<'a>);

impl Serialize for AvroView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let (op_index, op_symbol) = e.op.symbol();
        let mut s = serializer.serialize_struct("ChangeEnvelope", 12)?;
        s.serialize_field("schema_version", &e.schema_version)?;
        s.serialize_field("user_id", &e.user_id)?;
        s.serialize_field("origin_device_id", &e.origin_device_id)?;
        s.serialize_field("change_id", &e.change_id)?;
        s.serialize_field("record_id", &e.record_id)?;
        s.serialize_field("collection", &e.collection)?;
        s.serialize_field("op", &EnumSymbol(op_index, op_symbol))?;
        s.serialize_field("hlc", &e.hlc)?;
        s.serialize_field("key_epoch", &i64::from(e.key_epoch))?;
        s.serialize_field("nonce", &Bytes(e.nonce))?;
        s.serialize_field("ciphertext", &Bytes(e.ciphertext))?;
        s.serialize_field("received_at", &e.received_at_ms)?;
        s.end()
    }
}

/// An Avro `bytes` value (serde would otherwise write a `&[u8]` as a sequence).
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// An Avro enum symbol; apache-avro writes the variant index.
struct EnumSymbol(u32, &'static str);

impl Serialize for EnumSymbol {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_unit_variant("Op", self.0, self.1)
    }
}

/// The record's fields, consumed in schema order.
struct Fields(std::vec::IntoIter<(String, Value)>);

impl Fields {
    fn next(&mut self, field: &'static str) -> Result<Value, SchemaError> {
        match self.0.next() {
            Some((name, value)) if name == field => Ok(value),
            Some((name, _)) => Err(SchemaError::UnexpectedValue {
                field,
                expected: "this field next in the record",
                found: format!("field `{name}`"),
            }),
            None => Err(SchemaError::UnexpectedValue {
                field,
                expected: "this field next in the record",
                found: "the end of the record".into(),
            }),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, SchemaError> {
        match self.next(field)? {
            Value::String(s) => Ok(s),
            other => Err(unexpected(field, "a string", &other)),
        }
    }

    fn bytes(&mut self, field: &'static str) -> Result<Vec<u8>, SchemaError> {
        match self.next(field)? {
            Value::Bytes(b) => Ok(b),
            other => Err(unexpected(field, "bytes", &other)),
        }
    }

    fn int(&mut self, field: &'static str) -> Result<i32, SchemaError> {
        match self.next(field)? {
            Value::Int(i) => Ok(i),
            other => Err(unexpected(field, "an int", &other)),
        }
    }

    /// A `long`, with or without a `timestamp-millis` logical type.
    fn long(&mut self, field: &'static str) -> Result<i64, SchemaError> {
        match self.next(field)? {
            Value::Long(l) | Value::TimestampMillis(l) => Ok(l),
            other => Err(unexpected(field, "a long", &other)),
        }
    }

    fn u32_long(&mut self, field: &'static str) -> Result<u32, SchemaError> {
        let value = self.long(field)?;
        u32::try_from(value).map_err(|_| SchemaError::FieldOutOfRange {
            field,
            value,
            range: "an unsigned 32-bit value, 0..=4294967295",
        })
    }

    fn op(&mut self, field: &'static str) -> Result<Op, SchemaError> {
        match self.next(field)? {
            Value::Enum(_, symbol) if symbol == "UPSERT" => Ok(Op::Upsert),
            Value::Enum(_, symbol) if symbol == "DELETE" => Ok(Op::Delete),
            other => Err(unexpected(field, "enum symbol UPSERT or DELETE", &other)),
        }
    }
}

fn unexpected(field: &'static str, expected: &'static str, found: &Value) -> SchemaError {
    let found = match found {
        Value::Null => "null".to_owned(),
        Value::Int(i) => format!("int {i}"),
        Value::Long(l) => format!("long {l}"),
        Value::Enum(_, symbol) => format!("enum symbol {symbol:?}"),
        other => format!("{:?}", SchemaKind::from(other)),
    };
    SchemaError::UnexpectedValue { field, expected, found }
}
