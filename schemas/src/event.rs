//! [`Event`]: the metadata-only notifications on Lockstep's events topic, and
//! their mapping to and from the `lockstep.events.v1.Event` Avro record
//! (`avro/event.avsc`, single-object encoded like the change envelope).
//!
//! Every event states absolute state (a log end, a committed offset, a
//! lease), so a consumer that sees a duplicate, or a coalesced run instead of
//! each step, ends in the same state. Nothing here can carry a ciphertext, a
//! nonce, a record id or a collection.

use std::{cell::RefCell, fmt, sync::LazyLock};

use apache_avro::{GenericSingleObjectReader, GenericSingleObjectWriter, Schema, types::Value};

use crate::{Hex, SchemaError, canonical, wire};

/// The text of `avro/event.avsc`.
pub const EVENT_AVSC: &str = include_str!("../avro/event.avsc");

/// `(file, schema text)` of every superseded event schema that may still be on the events
/// topic, oldest first: events their writers published are read by resolving them to the
/// current schema (a field added since gets its default). Fields are only ever added with a
/// default, so a reader that has the new schema text resolves either way.
const PREVIOUS_EVENT_SCHEMAS: &[(&str, &str)] =
    // Before `DeviceConnected.stream_started_at` (issue 21: a device's newest stream wins).
    &[("avro/event.v1.avsc", include_str!("../avro/event.v1.avsc"))];

/// A superseded writer schema, and its fingerprint on the wire.
struct PreviousSchema {
    schema: Schema,
    fingerprint: [u8; 8],
}

static PREVIOUS: LazyLock<Vec<PreviousSchema>> = LazyLock::new(|| {
    PREVIOUS_EVENT_SCHEMAS
        .iter()
        .map(|&(file, text)| {
            let schema = Schema::parse_str(text).unwrap_or_else(|e| panic!("{file} does not parse: {e}"));
            let canonical_form = canonical::parsing_canonical_form(text).unwrap_or_else(|e| panic!("{file}: {e}"));
            let fingerprint = canonical::crc64_avro(canonical_form.as_bytes()).to_le_bytes();
            // Read by union index with the current schema's branch names (see `decode_event`).
            let kinds = record_names(union_of(&schema, "body"));
            assert!(EVENT_SCHEMA.body_kinds.starts_with(&kinds), "{file}: the body union's branches moved");
            PreviousSchema { schema, fingerprint }
        })
        .collect()
});

/// Fingerprints of the superseded event schemas this crate still reads, oldest first.
pub fn previous_event_fingerprints() -> Vec<[u8; 8]> {
    PREVIOUS.iter().map(|previous| previous.fingerprint).collect()
}

struct EventSchema {
    schema: Schema,
    canonical_form: String,
    fingerprint: [u8; 8],
    /// The record names of the `body` union's branches, in schema order: a
    /// branch's position is its union index on the wire.
    body_kinds: Vec<String>,
    /// The same for `PushTargetSet.target`.
    target_kinds: Vec<String>,
}

static EVENT_SCHEMA: LazyLock<EventSchema> = LazyLock::new(|| {
    // Compiled in; the crate's tests catch a schema that does not parse.
    let schema = Schema::parse_str(EVENT_AVSC).unwrap_or_else(|e| panic!("avro/event.avsc does not parse: {e}"));
    let canonical_form =
        canonical::parsing_canonical_form(EVENT_AVSC).unwrap_or_else(|e| panic!("avro/event.avsc: {e}"));
    let fingerprint = canonical::crc64_avro(canonical_form.as_bytes()).to_le_bytes();
    let body = union_of(&schema, "body");
    let body_kinds = record_names(body);
    let push_target_set = body
        .iter()
        .find(|branch| record_name(branch) == Some("PushTargetSet"))
        .unwrap_or_else(|| panic!("avro/event.avsc: no PushTargetSet in the body union"));
    let target_kinds = record_names(union_of(push_target_set, "target"));
    EventSchema { schema, canonical_form, fingerprint, body_kinds, target_kinds }
});

/// The schema's named types resolved once: `to_avro_datum` and
/// `from_avro_datum` resolve them on every call, which was most of the CPU an
/// idle server spent on its events (profile of W3, issue 20).
static EVENT_READER: LazyLock<GenericSingleObjectReader> = LazyLock::new(|| {
    GenericSingleObjectReader::new_with_header_builder(
        EVENT_SCHEMA.schema.clone(),
        wire::Header(EVENT_SCHEMA.fingerprint),
    )
    .unwrap_or_else(|e| panic!("avro/event.avsc does not resolve: {e}"))
});

thread_local! {
    /// The writer keeps a buffer, so each thread has its own.
    static EVENT_WRITER: RefCell<GenericSingleObjectWriter> = RefCell::new(
        GenericSingleObjectWriter::new_with_capacity_and_header_builder(
            &EVENT_SCHEMA.schema,
            256,
            wire::Header(EVENT_SCHEMA.fingerprint),
        )
        .unwrap_or_else(|e| panic!("avro/event.avsc does not resolve: {e}")),
    );
}

/// The branches of the union-typed field `field` of `record`.
fn union_of<'a>(record: &'a Schema, field: &str) -> &'a [Schema] {
    let Schema::Record(record) = record else { panic!("avro/event.avsc: {field}'s parent is not a record") };
    match record.fields.iter().find(|f| f.name == field).map(|f| &f.schema) {
        Some(Schema::Union(union)) => union.variants(),
        _ => panic!("avro/event.avsc: {}.{field} is not a union", record.name.name),
    }
}

fn record_name(schema: &Schema) -> Option<&str> {
    match schema {
        Schema::Record(record) => Some(&record.name.name),
        _ => None,
    }
}

fn record_names(branches: &[Schema]) -> Vec<String> {
    let name = |branch| record_name(branch).unwrap_or_else(|| panic!("avro/event.avsc: a union branch is no record"));
    branches.iter().map(|branch| name(branch).to_owned()).collect()
}

/// The union index of the branch named `kind` (one of `kinds`, from the schema).
fn branch_index(kinds: &[String], kind: &str) -> Result<u32, SchemaError> {
    let index = kinds.iter().position(|known| known == kind).ok_or(SchemaError::UnexpectedValue {
        field: "body",
        expected: "a record name of the union in avro/event.avsc",
        found: kind.to_owned(),
    })?;
    Ok(u32::try_from(index).unwrap_or(u32::MAX))
}

/// The parsed event schema, for tools and tests.
pub fn event_schema() -> &'static Schema {
    &EVENT_SCHEMA.schema
}

/// CRC-64-AVRO of the event schema's Parsing Canonical Form, as on the wire.
pub fn event_fingerprint() -> [u8; 8] {
    EVENT_SCHEMA.fingerprint
}

/// The Parsing Canonical Form [`event_fingerprint`] is computed from.
pub fn event_canonical_form() -> &'static str {
    &EVENT_SCHEMA.canonical_form
}

/// One event. The Kafka record key is `user_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub user_id: String,
    /// The server node or push worker that published it.
    pub node_id: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub body: EventBody,
}

/// What happened. Field docs live in `avro/event.avsc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    LogAppended {
        log_generation: i64,
        first_offset: i64,
        log_end: i64,
        count: i64,
        origin_device_id: String,
        first_received_at_ms: i64,
    },
    DeviceAcked {
        device_id: String,
        log_generation: i64,
        committed_offset: i64,
    },
    DeviceConnected {
        device_id: String,
        lease_until_ms: i64,
        /// With the event's `node_id`, which stream this is; `None` from older servers.
        stream_started_ms: Option<i64>,
    },
    DeviceDisconnected {
        device_id: String,
    },
    DeviceAdded {
        device_id: String,
    },
    DeviceRevoked {
        device_id: String,
    },
    PushTargetSet {
        device_id: String,
        target: PushTarget,
    },
    PushTargetRemoved {
        device_id: String,
        reason: TargetRemovedReason,
    },
    WakeUp {
        device_id: String,
        log_end: i64,
        outcome: WakeUpOutcome,
        http_status: i32,
    },
}

impl EventBody {
    /// The device the event is about, if any (`LogAppended` is about the user).
    pub fn device_id(&self) -> Option<&str> {
        match self {
            EventBody::LogAppended { .. } => None,
            EventBody::DeviceAcked { device_id, .. }
            | EventBody::DeviceConnected { device_id, .. }
            | EventBody::DeviceDisconnected { device_id }
            | EventBody::DeviceAdded { device_id }
            | EventBody::DeviceRevoked { device_id }
            | EventBody::PushTargetSet { device_id, .. }
            | EventBody::PushTargetRemoved { device_id, .. }
            | EventBody::WakeUp { device_id, .. } => Some(device_id),
        }
    }

    /// The Avro record name of this kind, e.g. `"LogAppended"`: the one place that
    /// ties a variant to its branch of the `body` union (the branch's index on the
    /// wire comes from `avro/event.avsc`).
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::LogAppended { .. } => "LogAppended",
            EventBody::DeviceAcked { .. } => "DeviceAcked",
            EventBody::DeviceConnected { .. } => "DeviceConnected",
            EventBody::DeviceDisconnected { .. } => "DeviceDisconnected",
            EventBody::DeviceAdded { .. } => "DeviceAdded",
            EventBody::DeviceRevoked { .. } => "DeviceRevoked",
            EventBody::PushTargetSet { .. } => "PushTargetSet",
            EventBody::PushTargetRemoved { .. } => "PushTargetRemoved",
            EventBody::WakeUp { .. } => "WakeUp",
        }
    }
}

/// The body union's branches (record names), in schema order, as `avro/event.avsc`
/// has them. The Python checkers in `tests/python` must know each of them
/// (`tests/python/test_events_schema.py` fails when one lags behind).
pub fn body_kinds() -> &'static [String] {
    &EVENT_SCHEMA.body_kinds
}

/// Where a device can be woken. The endpoint / url is a secret: `Debug`
/// shows only its origin.
#[derive(Clone, PartialEq, Eq)]
pub enum PushTarget {
    /// An RFC 8030 push subscription (Web Push, UnifiedPush).
    WebPush { endpoint: String, p256dh: Vec<u8>, auth: Vec<u8> },
    /// A Matrix-push-gateway-shaped webhook.
    Webhook { url: String, app_id: String, pushkey: String },
}

impl PushTarget {
    /// The Avro record name of this kind, its branch of `PushTargetSet.target`.
    fn record_name(&self) -> &'static str {
        match self {
            PushTarget::WebPush { .. } => "WebPushTarget",
            PushTarget::Webhook { .. } => "WebhookTarget",
        }
    }

    /// `scheme://host[:port]` of the endpoint, safe to log.
    pub fn origin(&self) -> &str {
        let url = match self {
            PushTarget::WebPush { endpoint, .. } => endpoint,
            PushTarget::Webhook { url, .. } => url,
        };
        let after_scheme = url.find("://").map_or(0, |i| i + 3);
        let end = url[after_scheme..].find(['/', '?', '#']).map_or(url.len(), |i| after_scheme + i);
        &url[..end]
    }
}

impl fmt::Debug for PushTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushTarget::WebPush { .. } => write!(f, "WebPush({}/…)", self.origin()),
            PushTarget::Webhook { app_id, .. } => write!(f, "Webhook({}/…, app_id={app_id})", self.origin()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetRemovedReason {
    RemovedByDevice,
    DeviceRevoked,
    /// The push service answered 404 or 410.
    Gone,
    /// A webhook listed the pushkey as rejected.
    Rejected,
}

const REMOVED_REASONS: [(TargetRemovedReason, &str); 4] = [
    (TargetRemovedReason::RemovedByDevice, "REMOVED_BY_DEVICE"),
    (TargetRemovedReason::DeviceRevoked, "DEVICE_REVOKED"),
    (TargetRemovedReason::Gone, "GONE"),
    (TargetRemovedReason::Rejected, "REJECTED"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WakeUpOutcome {
    Sent,
    Gone,
    Throttled,
    Retrying,
    Failed,
}

const OUTCOMES: [(WakeUpOutcome, &str); 5] = [
    (WakeUpOutcome::Sent, "SENT"),
    (WakeUpOutcome::Gone, "GONE"),
    (WakeUpOutcome::Throttled, "THROTTLED"),
    (WakeUpOutcome::Retrying, "RETRYING"),
    (WakeUpOutcome::Failed, "FAILED"),
];

impl WakeUpOutcome {
    pub fn as_str(self) -> &'static str {
        symbol_of(&OUTCOMES, self).1
    }
}

impl TargetRemovedReason {
    pub fn as_str(self) -> &'static str {
        symbol_of(&REMOVED_REASONS, self).1
    }
}

fn symbol_of<T: PartialEq + Copy>(table: &[(T, &'static str)], value: T) -> (u32, &'static str) {
    let index = table.iter().position(|(v, _)| *v == value).unwrap_or(0);
    (index as u32, table[index].1)
}

/// Single-object encodes an event with the current schema.
pub fn encode_event(event: &Event) -> Result<Vec<u8>, SchemaError> {
    let value = event_to_value(event)?;
    let mut out = Vec::with_capacity(128);
    EVENT_WRITER.with(|writer| writer.borrow_mut().write_value_ref(&value, &mut out)).map_err(SchemaError::Encode)?;
    Ok(out)
}

/// Decodes one single-object encoded event; never panics on arbitrary input.
pub fn decode_event(bytes: &[u8]) -> Result<Event, SchemaError> {
    let (fingerprint, body) = wire::split_header(bytes)?;
    if fingerprint != EVENT_SCHEMA.fingerprint {
        let Some(previous) = PREVIOUS.iter().find(|previous| previous.fingerprint == fingerprint) else {
            let known = std::iter::once(EVENT_SCHEMA.fingerprint).chain(previous_event_fingerprints());
            return Err(SchemaError::UnknownEventFingerprint {
                fingerprint,
                known: known.map(|known| Hex(&known).to_string()).collect::<Vec<_>>().join(", "),
            });
        };
        // An older writer (rare: a node not yet upgraded). Read with its own schema, then
        // mapped like a current one: its branches are the current ones' first (checked when
        // loaded) and a field added since is missing, which reads as its default (null).
        // Not `from_avro_datum` with a reader schema: apache-avro resolves a union branch to
        // the first reader branch of the same shape, not the same name (DeviceDisconnected,
        // DeviceAdded and DeviceRevoked are all `{device_id}`).
        wire::check_lengths(&previous.schema, body)?;
        let mut rest = body;
        let value =
            apache_avro::from_avro_datum(&previous.schema, &mut rest, None).map_err(SchemaError::MalformedBody)?;
        if !rest.is_empty() {
            return Err(SchemaError::TrailingBytes { count: rest.len() });
        }
        return event_from_value(value);
    }
    wire::check_lengths(&EVENT_SCHEMA.schema, body)?;
    // The reader checks the header again and reads the datum after it.
    let mut rest = bytes;
    let value = EVENT_READER.read_value(&mut rest).map_err(SchemaError::MalformedBody)?;
    if !rest.is_empty() {
        return Err(SchemaError::TrailingBytes { count: rest.len() });
    }
    event_from_value(value)
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn event_to_value(event: &Event) -> Result<Value, SchemaError> {
    let body = match &event.body {
        EventBody::LogAppended {
            log_generation,
            first_offset,
            log_end,
            count,
            origin_device_id,
            first_received_at_ms,
        } => record(vec![
            ("log_generation", Value::Long(*log_generation)),
            ("first_offset", Value::Long(*first_offset)),
            ("log_end", Value::Long(*log_end)),
            ("count", Value::Long(*count)),
            ("origin_device_id", s(origin_device_id)),
            ("first_received_at", Value::TimestampMillis(*first_received_at_ms)),
        ]),
        EventBody::DeviceAcked { device_id, log_generation, committed_offset } => record(vec![
            ("device_id", s(device_id)),
            ("log_generation", Value::Long(*log_generation)),
            ("committed_offset", Value::Long(*committed_offset)),
        ]),
        EventBody::DeviceConnected { device_id, lease_until_ms, stream_started_ms } => record(vec![
            ("device_id", s(device_id)),
            ("lease_until", Value::TimestampMillis(*lease_until_ms)),
            (
                "stream_started_at",
                match stream_started_ms {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(ms) => Value::Union(1, Box::new(Value::TimestampMillis(*ms))),
                },
            ),
        ]),
        EventBody::DeviceDisconnected { device_id }
        | EventBody::DeviceAdded { device_id }
        | EventBody::DeviceRevoked { device_id } => record(vec![("device_id", s(device_id))]),
        EventBody::PushTargetSet { device_id, target } => {
            let index = branch_index(&EVENT_SCHEMA.target_kinds, target.record_name())?;
            let value = match target {
                PushTarget::WebPush { endpoint, p256dh, auth } => record(vec![
                    ("endpoint", s(endpoint)),
                    ("p256dh", Value::Bytes(p256dh.clone())),
                    ("auth", Value::Bytes(auth.clone())),
                ]),
                PushTarget::Webhook { url, app_id, pushkey } => {
                    record(vec![("url", s(url)), ("app_id", s(app_id)), ("pushkey", s(pushkey))])
                }
            };
            record(vec![("device_id", s(device_id)), ("target", Value::Union(index, Box::new(value)))])
        }
        EventBody::PushTargetRemoved { device_id, reason } => {
            let (index, symbol) = symbol_of(&REMOVED_REASONS, *reason);
            record(vec![("device_id", s(device_id)), ("reason", Value::Enum(index, symbol.into()))])
        }
        EventBody::WakeUp { device_id, log_end, outcome, http_status } => {
            let (index, symbol) = symbol_of(&OUTCOMES, *outcome);
            record(vec![
                ("device_id", s(device_id)),
                ("log_end", Value::Long(*log_end)),
                ("outcome", Value::Enum(index, symbol.into())),
                ("http_status", Value::Int(*http_status)),
            ])
        }
    };
    let index = branch_index(&EVENT_SCHEMA.body_kinds, event.body.kind())?;
    Ok(record(vec![
        ("user_id", s(&event.user_id)),
        ("node_id", s(&event.node_id)),
        ("at", Value::TimestampMillis(event.at_ms)),
        ("body", Value::Union(index, Box::new(body))),
    ]))
}

/// A decoded record's fields by name (the schema fixes their order, but
/// looking them up by name keeps the mapping obvious).
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn of(value: Value, what: &'static str) -> Result<Self, SchemaError> {
        match value {
            Value::Record(fields) => Ok(Fields(fields)),
            other => Err(unexpected(what, "a record", &other)),
        }
    }

    fn take(&mut self, field: &'static str) -> Result<Value, SchemaError> {
        let index = self.0.iter().position(|(name, _)| name == field).ok_or(SchemaError::UnexpectedValue {
            field,
            expected: "this field in the record",
            found: "no such field".into(),
        })?;
        Ok(self.0.swap_remove(index).1)
    }

    fn string(&mut self, field: &'static str) -> Result<String, SchemaError> {
        match self.take(field)? {
            Value::String(s) => Ok(s),
            other => Err(unexpected(field, "a string", &other)),
        }
    }

    fn bytes(&mut self, field: &'static str) -> Result<Vec<u8>, SchemaError> {
        match self.take(field)? {
            Value::Bytes(b) => Ok(b),
            other => Err(unexpected(field, "bytes", &other)),
        }
    }

    fn long(&mut self, field: &'static str) -> Result<i64, SchemaError> {
        match self.take(field)? {
            Value::Long(l) | Value::TimestampMillis(l) => Ok(l),
            other => Err(unexpected(field, "a long", &other)),
        }
    }

    /// A `["null", long]` union; missing (an older writer's record), its default: null.
    fn optional_long(&mut self, field: &'static str) -> Result<Option<i64>, SchemaError> {
        if !self.0.iter().any(|(name, _)| name == field) {
            return Ok(None);
        }
        let value = match self.take(field)? {
            Value::Union(_, value) => *value,
            other => other,
        };
        match value {
            Value::Null => Ok(None),
            Value::Long(l) | Value::TimestampMillis(l) => Ok(Some(l)),
            other => Err(unexpected(field, "null or a long", &other)),
        }
    }

    fn int(&mut self, field: &'static str) -> Result<i32, SchemaError> {
        match self.take(field)? {
            Value::Int(i) => Ok(i),
            other => Err(unexpected(field, "an int", &other)),
        }
    }

    fn symbol<T: Copy>(&mut self, field: &'static str, table: &[(T, &'static str)]) -> Result<T, SchemaError> {
        match self.take(field)? {
            Value::Enum(_, symbol) => table
                .iter()
                .find(|(_, name)| *name == symbol)
                .map(|(v, _)| *v)
                .ok_or_else(|| unexpected(field, "a known enum symbol", &Value::Enum(0, symbol))),
            other => Err(unexpected(field, "an enum symbol", &other)),
        }
    }
}

fn event_from_value(value: Value) -> Result<Event, SchemaError> {
    let mut f = Fields::of(value, "Event")?;
    let user_id = f.string("user_id")?;
    let node_id = f.string("node_id")?;
    let at_ms = f.long("at")?;
    let (index, body) = match f.take("body")? {
        Value::Union(index, body) => (index, *body),
        other => return Err(unexpected("body", "a union branch", &other)),
    };
    let mut b = Fields::of(body, "body")?;
    let kind = EVENT_SCHEMA.body_kinds.get(index as usize).map_or("", String::as_str);
    let body = match kind {
        "LogAppended" => EventBody::LogAppended {
            log_generation: b.long("log_generation")?,
            first_offset: b.long("first_offset")?,
            log_end: b.long("log_end")?,
            count: b.long("count")?,
            origin_device_id: b.string("origin_device_id")?,
            first_received_at_ms: b.long("first_received_at")?,
        },
        "DeviceAcked" => EventBody::DeviceAcked {
            device_id: b.string("device_id")?,
            log_generation: b.long("log_generation")?,
            committed_offset: b.long("committed_offset")?,
        },
        "DeviceConnected" => EventBody::DeviceConnected {
            device_id: b.string("device_id")?,
            lease_until_ms: b.long("lease_until")?,
            stream_started_ms: b.optional_long("stream_started_at")?,
        },
        "DeviceDisconnected" => EventBody::DeviceDisconnected { device_id: b.string("device_id")? },
        "DeviceAdded" => EventBody::DeviceAdded { device_id: b.string("device_id")? },
        "DeviceRevoked" => EventBody::DeviceRevoked { device_id: b.string("device_id")? },
        "PushTargetSet" => {
            let device_id = b.string("device_id")?;
            let (index, target) = match b.take("target")? {
                Value::Union(index, target) => (index, *target),
                other => return Err(unexpected("target", "WebPushTarget or WebhookTarget", &other)),
            };
            let target = match EVENT_SCHEMA.target_kinds.get(index as usize).map_or("", String::as_str) {
                "WebPushTarget" => {
                    let mut t = Fields::of(target, "target")?;
                    PushTarget::WebPush {
                        endpoint: t.string("endpoint")?,
                        p256dh: t.bytes("p256dh")?,
                        auth: t.bytes("auth")?,
                    }
                }
                "WebhookTarget" => {
                    let mut t = Fields::of(target, "target")?;
                    PushTarget::Webhook {
                        url: t.string("url")?,
                        app_id: t.string("app_id")?,
                        pushkey: t.string("pushkey")?,
                    }
                }
                _ => {
                    return Err(SchemaError::FieldOutOfRange {
                        field: "target",
                        value: i64::from(index),
                        range: "a known push target kind",
                    });
                }
            };
            EventBody::PushTargetSet { device_id, target }
        }
        "PushTargetRemoved" => EventBody::PushTargetRemoved {
            device_id: b.string("device_id")?,
            reason: b.symbol("reason", &REMOVED_REASONS)?,
        },
        "WakeUp" => EventBody::WakeUp {
            device_id: b.string("device_id")?,
            log_end: b.long("log_end")?,
            outcome: b.symbol("outcome", &OUTCOMES)?,
            http_status: b.int("http_status")?,
        },
        _ => {
            return Err(SchemaError::FieldOutOfRange {
                field: "body",
                value: i64::from(index),
                range: "a known event kind",
            });
        }
    };
    Ok(Event { user_id, node_id, at_ms, body })
}

fn unexpected(field: &'static str, expected: &'static str, found: &Value) -> SchemaError {
    SchemaError::UnexpectedValue {
        field,
        expected,
        found: format!("{:?}", apache_avro::schema::SchemaKind::from(found)),
    }
}

#[cfg(test)]
mod tests;
