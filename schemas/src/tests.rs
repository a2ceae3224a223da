//! Unit tests: framing, errors, and an independent fingerprint check.

use apache_avro::{schema_compatibility::SchemaCompatibility, types::Value};
use proptest::prelude::*;

use super::*;

fn sample() -> ChangeEnvelope {
    ChangeEnvelope {
        schema_version: CHANGE_ENVELOPE_VERSION,
        user_id: "0190f3c2-user".into(),
        origin_device_id: "device-äöü-🔐".into(),
        change_id: "chg-1".into(),
        record_id: "rec/42".into(),
        collection: "notes".into(),
        op: Op::Delete,
        hlc: (1_732_470_000_123_i64 << 16) | 7,
        key_epoch: u32::MAX,
        nonce: (0..24).collect(),
        ciphertext: (0..=255).cycle().take(1024).collect(),
        received_at_ms: 1_732_470_000_456,
    }
}

/// Single-object bytes for an arbitrary record value under the current schema,
/// for crafting inputs `encode_change` would never produce.
fn encode_value(value: Value) -> Vec<u8> {
    let mut out = SINGLE_OBJECT_MAGIC.to_vec();
    out.extend_from_slice(&change_envelope_fingerprint());
    out.extend(apache_avro::to_avro_datum(change_envelope_schema(), value).unwrap());
    out
}

#[test]
fn round_trip() {
    for op in [Op::Upsert, Op::Delete] {
        let envelope = ChangeEnvelope { op, ..sample() };
        let bytes = encode_change(&envelope).unwrap();
        assert_eq!(bytes[..2], [0xC3, 0x01]);
        assert_eq!(bytes[2..10], change_envelope_fingerprint());
        assert_eq!(decode_change(&bytes).unwrap(), envelope);
    }
}

#[test]
fn empty_fields_round_trip() {
    let envelope = ChangeEnvelope {
        schema_version: 0,
        user_id: String::new(),
        origin_device_id: String::new(),
        change_id: String::new(),
        record_id: String::new(),
        collection: String::new(),
        op: Op::Upsert,
        hlc: i64::MIN,
        key_epoch: 0,
        nonce: vec![],
        ciphertext: vec![],
        received_at_ms: i64::MAX,
    };
    let bytes = encode_change(&envelope).unwrap();
    assert_eq!(decode_change(&bytes).unwrap(), envelope);
}

#[test]
fn bad_magic_is_rejected() {
    let good = encode_change(&sample()).unwrap();
    for (i, bad) in [0x00, 0xC3, 0x01, 0xFF].into_iter().enumerate() {
        let mut bytes = good.clone();
        bytes[i % 2] = if bytes[i % 2] == bad { bad ^ 0x80 } else { bad };
        let err = decode_change(&bytes).unwrap_err();
        assert!(matches!(err, SchemaError::BadMagic { .. }), "{err:?}");
        assert!(err.to_string().contains("single-object"), "{err}");
    }
    // JSON or a protobuf handed over by mistake, even shorter than a header.
    for bytes in [&b"{\"user_id\": 1}"[..], b"\x0a", b"\xC3\x02"] {
        let err = decode_change(bytes).unwrap_err();
        assert!(matches!(err, SchemaError::BadMagic { .. }), "{err:?}");
    }
    let err = decode_change(b"{}").unwrap_err();
    assert_eq!(err.to_string(), "not Avro single-object encoded: expected magic [C3, 01], found [7B, 7D]");
}

#[test]
fn unknown_fingerprint_is_rejected_and_shown_in_hex() {
    let mut bytes = encode_change(&sample()).unwrap();
    bytes[2..10].copy_from_slice(&0x0123_4567_89ab_cdef_u64.to_le_bytes());
    let err = decode_change(&bytes).unwrap_err();
    match err {
        SchemaError::UnknownFingerprint { fingerprint } => {
            assert_eq!(fingerprint, 0x0123_4567_89ab_cdef_u64.to_le_bytes());
        }
        other => panic!("expected UnknownFingerprint, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("efcdab8967452301"), "{msg}");
    let known = Hex(&change_envelope_fingerprint()).to_string();
    assert!(msg.contains(&known), "{msg} should list {known}");
}

#[test]
fn every_truncation_errors() {
    let bytes = encode_change(&sample()).unwrap();
    for len in 0..bytes.len() {
        let err = decode_change(&bytes[..len]).expect_err("a strict prefix must not decode");
        if len < SINGLE_OBJECT_HEADER_LEN {
            assert!(matches!(err, SchemaError::TruncatedHeader { len: l } if l == len), "{len}: {err:?}");
        }
    }
    // The empty string as the last field: truncation right before it.
    let envelope = ChangeEnvelope { collection: String::new(), ..sample() };
    let bytes = encode_change(&envelope).unwrap();
    for len in 0..bytes.len() {
        assert!(decode_change(&bytes[..len]).is_err(), "prefix {len}");
    }
}

#[test]
fn length_prefix_beyond_input_is_rejected_before_allocating() {
    // schema_version = 1, then user_id claiming 400 MiB (zigzag varint).
    let claimed: i64 = 400 << 20;
    let mut bytes = SINGLE_OBJECT_MAGIC.to_vec();
    bytes.extend_from_slice(&change_envelope_fingerprint());
    bytes.push(2);
    crate::direct::write_long(claimed, &mut bytes);
    bytes.extend_from_slice(b"only a few bytes");
    match decode_change(&bytes) {
        Err(SchemaError::LengthBeyondInput { field, claimed: c, available }) => {
            assert_eq!((field.as_str(), c, available), ("user_id", claimed, 16))
        }
        other => panic!("expected LengthBeyondInput, got {other:?}"),
    }

    // A string cut short inside its content (apache-avro alone would
    // decode it as null).
    let good = encode_change(&sample()).unwrap();
    let cut = SINGLE_OBJECT_HEADER_LEN + 1 + 1 + 3;
    let err = decode_change(&good[..cut]).unwrap_err();
    assert!(matches!(&err, SchemaError::LengthBeyondInput { field, .. } if field == "user_id"), "{err:?}");
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = encode_change(&sample()).unwrap();
    bytes.extend_from_slice(&[0, 0, 0]);
    let err = decode_change(&bytes).unwrap_err();
    assert!(matches!(err, SchemaError::TrailingBytes { count: 3 }), "{err:?}");
}

#[test]
fn key_epoch_out_of_range_is_rejected() {
    let with_epoch = |epoch: i64| {
        let Value::Record(mut fields) = sample().to_avro_value() else { unreachable!() };
        let slot = fields.iter_mut().find(|(n, _)| n == "key_epoch").unwrap();
        slot.1 = Value::Long(epoch);
        decode_change(&encode_value(Value::Record(fields)))
    };
    for epoch in [-1, i64::from(u32::MAX) + 1, i64::MIN, i64::MAX] {
        match with_epoch(epoch) {
            Err(SchemaError::FieldOutOfRange { field, value, .. }) => {
                assert_eq!((field, value), ("key_epoch", epoch));
            }
            other => panic!("key_epoch {epoch}: expected FieldOutOfRange, got {other:?}"),
        }
    }
    for epoch in [0, 1, i64::from(u32::MAX)] {
        assert_eq!(with_epoch(epoch).unwrap().key_epoch, epoch as u32);
    }
}

#[test]
fn bad_enum_index_is_rejected() {
    // Short strings: every length prefix is one byte, so the op's index
    // sits right after schema_version (1 byte) and the five strings.
    let envelope = sample();
    let strings =
        [&envelope.user_id, &envelope.origin_device_id, &envelope.change_id, &envelope.record_id, &envelope.collection];
    assert!(strings.iter().all(|s| s.len() < 64));
    let op_at = SINGLE_OBJECT_HEADER_LEN + 1 + strings.iter().map(|s| 1 + s.len()).sum::<usize>();
    let mut bytes = encode_change(&envelope).unwrap();
    assert_eq!(bytes[op_at], 2, "zigzag(1) = DELETE");
    for bad in [4, 1, 0x7f] {
        // zigzag 2, -1, -64
        bytes[op_at] = bad;
        let err = decode_change(&bytes).unwrap_err();
        assert!(matches!(err, SchemaError::MalformedBody(_)), "{err:?}");
    }
}

#[test]
fn every_bit_flip_is_handled() {
    let envelope = ChangeEnvelope { ciphertext: vec![0xAB; 40], ..sample() };
    let bytes = encode_change(&envelope).unwrap();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[i] ^= 1 << bit;
            // Flips inside payload bytes may still decode (to a different
            // envelope); anything else must be a clean error.
            if let Ok(decoded) = decode_change(&flipped) {
                assert!(i >= SINGLE_OBJECT_HEADER_LEN);
                assert_ne!(decoded, envelope, "flip at {i}.{bit} went unnoticed");
            }
        }
    }
}

#[test]
fn registry_versions_resolve_to_current() {
    let current = change_envelope_schema();
    for known in registry::all() {
        SchemaCompatibility::can_read(&known.schema, current)
            .unwrap_or_else(|e| panic!("{} cannot be read as current: {e}", known.file));
        assert_eq!(known.fingerprint, crc64_avro(known.canonical_form.as_bytes()).to_le_bytes());
    }
    assert!(registry::current().is_current);
    assert_eq!(registry::lookup(&change_envelope_fingerprint()).map(|k| k.file), Some("avro/change_envelope.avsc"));
}

/// Every envelope schema shipped in avro/ is in the registry, so adding a
/// `change_envelope.v<N>.avsc` without registering it fails here.
#[test]
fn every_shipped_envelope_schema_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("avro");
    let mut shipped = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("change_envelope") && name.ends_with(".avsc")) {
            continue;
        }
        shipped += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let pcf = canonical::parsing_canonical_form(&text).unwrap();
        let fingerprint = crc64_avro(pcf.as_bytes()).to_le_bytes();
        assert!(registry::lookup(&fingerprint).is_some(), "{name} is not registered in src/registry.rs");
    }
    assert_eq!(shipped, registry::all().len());
}

// ---- Independent CRC-64-AVRO over an independently computed canonical form ----

/// The Avro spec's CRC-64-AVRO ("Rabin") fingerprint, table-driven.
fn crc64_avro(data: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    let mut table = [0u64; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let mut fp = i as u64;
        for _ in 0..8 {
            fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
        }
        *slot = fp;
    }
    data.iter().fold(EMPTY, |fp, &b| (fp >> 8) ^ table[((fp ^ u64::from(b)) & 0xff) as usize])
}

/// (input, canonical form, CRC-64-AVRO as i64) from the Avro project's
/// shared test data, share/test/data/schema-tests.txt.
const SPEC_VECTORS: &[(&str, &str, i64)] = &[
    (r#""null""#, r#""null""#, 7195948357588979594),
    (r#"{"type":"int"}"#, r#""int""#, 8247732601305521295),
    (r#""string""#, r#""string""#, -8142146995180207161),
    (
        r#"{"fields":[], "type":"record", "name":"foo", "namespace":"x.y"}"#,
        r#"{"name":"x.y.foo","type":"record","fields":[]}"#,
        5916914534497305771,
    ),
    (
        r#"{"fields":[], "type":"record", "name":"a.b.foo", "namespace":"x.y"}"#,
        r#"{"name":"a.b.foo","type":"record","fields":[]}"#,
        -4616218487480524110,
    ),
    (
        r#"{ "fields":[{"type":"boolean", "aliases":[], "name":"f1", "default":true},
            {"order":"descending","name":"f2","doc":"Hello","type":"int"}],
            "type":"record", "name":"foo"}"#,
        r#"{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"},{"name":"f2","type":"int"}]}"#,
        -4860222112080293046,
    ),
    (
        r#"{"namespace":"x.y.z", "type":"enum", "name":"foo", "doc":"foo bar", "symbols":["A1", "A2"]}"#,
        r#"{"name":"x.y.z.foo","type":"enum","symbols":["A1","A2"]}"#,
        -4448647247586288245,
    ),
    (r#"{"name":"foo","type":"fixed","size":15}"#, r#"{"name":"foo","type":"fixed","size":15}"#, 1756455273707447556),
    (
        r#"{"name":"PigValue","type":"record",
            "fields":[{"name":"value", "type":["null", "int", "long", "PigValue"]}]}"#,
        r#"{"name":"PigValue","type":"record","fields":[{"name":"value","type":["null","int","long","PigValue"]}]}"#,
        -1759257747318642341,
    ),
    (r#"{ "items":{"type":"null"}, "type":"array"}"#, r#"{"type":"array","items":"null"}"#, -589620603366471059),
    (r#"{ "values":"string", "type":"map"}"#, r#"{"type":"map","values":"string"}"#, -8732877298790414990),
];

#[test]
fn crc64_avro_and_canonical_form_match_spec_vectors() {
    use apache_avro::{Schema, rabin::Rabin};
    assert_eq!(crc64_avro(b""), 0xc15d_213a_a4d7_a795);
    for &(input, canonical_form, fingerprint) in SPEC_VECTORS {
        let expected = fingerprint.to_le_bytes();
        assert_eq!(crc64_avro(canonical_form.as_bytes()).to_le_bytes(), expected);
        assert_eq!(canonical::parsing_canonical_form(input).unwrap(), canonical_form);
        assert_eq!(canonical::crc64_avro(canonical_form.as_bytes()), fingerprint as u64);
        // apache-avro agrees on the same vectors.
        let schema = Schema::parse_str(input).unwrap();
        assert_eq!(schema.canonical_form(), canonical_form);
        assert_eq!(schema.fingerprint::<Rabin>().bytes, expected);
    }
}

#[test]
fn fingerprint_is_crc64_avro_of_canonical_form() {
    let mine = &registry::current().canonical_form;
    assert!(mine.starts_with(r#"{"name":"lockstep.v1.ChangeEnvelope","type":"record""#));
    assert!(!mine.contains("doc") && !mine.contains("logicalType"), "{mine}");
    assert!(mine.ends_with(r#"{"name":"received_at","type":"long"}]}"#), "{mine}");
    assert_eq!(change_envelope_fingerprint(), crc64_avro(mine.as_bytes()).to_le_bytes());
}

/// apache-avro's canonical form leaves `{"type":"long"}` where a logical type
/// was stripped (see src/canonical.rs); apart from that it must agree with
/// ours. If apache-avro gets fixed, the replace becomes a no-op.
#[test]
fn canonical_form_agrees_with_apache_avro_modulo_logical_types() {
    use apache_avro::rabin::Rabin;
    let theirs = change_envelope_schema().canonical_form();
    let fixed = canonical::PRIMITIVE_NAMES
        .iter()
        .fold(theirs.clone(), |pcf, p| pcf.replace(&format!(r#"{{"type":"{p}"}}"#), &format!(r#""{p}""#)));
    assert_eq!(fixed, registry::current().canonical_form);
    if theirs != fixed {
        // Documented divergence: their fingerprint is not the wire one.
        let their_fp = change_envelope_schema().fingerprint::<Rabin>().bytes;
        assert_ne!(their_fp, change_envelope_fingerprint());
    }
}

// ---- proptest: public API on arbitrary envelopes and arbitrary bytes ----

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![Just(Op::Upsert), Just(Op::Delete)]
}

prop_compose! {
    fn any_envelope()(
        schema_version in any::<i32>(),
        strings in proptest::array::uniform5(any::<String>()),
        op in any_op(),
        hlc in any::<i64>(),
        key_epoch in any::<u32>(),
        nonce in proptest::collection::vec(any::<u8>(), 0..64),
        ciphertext in proptest::collection::vec(any::<u8>(), 0..4096),
        received_at_ms in any::<i64>(),
    ) -> ChangeEnvelope {
        let [user_id, origin_device_id, change_id, record_id, collection] = strings;
        ChangeEnvelope {
            schema_version, user_id, origin_device_id, change_id, record_id, collection,
            op, hlc, key_epoch, nonce, ciphertext, received_at_ms,
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_envelopes_round_trip(envelope in any_envelope()) {
        let bytes = encode_change(&envelope).unwrap();
        prop_assert_eq!(&bytes[..2], &SINGLE_OBJECT_MAGIC[..]);
        prop_assert_eq!(decode_change(&bytes).unwrap(), envelope);
    }

    /// `encode_change` writes exactly what apache-avro's validating `Value`
    /// encoder writes, and never needs to grow its buffer.
    #[test]
    fn fast_encoder_matches_value_encoder(envelope in any_envelope()) {
        let bytes = encode_change(&envelope).unwrap();
        let body = apache_avro::to_avro_datum(change_envelope_schema(), envelope.to_avro_value())
            .unwrap();
        prop_assert_eq!(&bytes[SINGLE_OBJECT_HEADER_LEN..], &body[..]);
        prop_assert!(bytes.len() <= envelope.max_encoded_len());
    }

    /// The direct writer and apache-avro's serializer (its fallback) write the same bytes.
    #[test]
    fn direct_writer_matches_apache_avro_serializer(envelope in any_envelope()) {
        let mut direct = Vec::new();
        crate::direct::write(&envelope.as_ref(), &mut direct);
        let mut serde = Vec::new();
        crate::encode_with_apache_avro(&envelope.as_ref(), &mut serde).unwrap();
        prop_assert_eq!(direct, serde);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_change(&bytes);
    }

    /// The direct reader reads every envelope as apache-avro does.
    #[test]
    fn direct_reader_reads_envelopes_as_apache_avro(envelope in any_envelope()) {
        let bytes = encode_change(&envelope).unwrap();
        let body = &bytes[SINGLE_OBJECT_HEADER_LEN..];
        prop_assert_eq!(crate::direct::read(body), Some(envelope));
        prop_assert_eq!(crate::direct::read(body), Some(generic_decode(body).unwrap()));
    }

    /// Whatever the direct reader accepts, apache-avro accepts as the same envelope.
    #[test]
    fn direct_reader_accepts_nothing_apache_avro_refuses(
        envelope in any_envelope(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        noise in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = encode_change(&envelope).unwrap();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let body = &bytes[SINGLE_OBJECT_HEADER_LEN.min(bytes.len())..];
        for body in [body, &body[..cut.index(body.len().max(1)).min(body.len())], &noise[..]] {
            if let Some(direct) = crate::direct::read(body) {
                prop_assert_eq!(Some(direct), generic_decode(body).ok());
            }
        }
    }

    #[test]
    fn arbitrary_body_after_valid_header_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = SINGLE_OBJECT_MAGIC.to_vec();
        bytes.extend_from_slice(&change_envelope_fingerprint());
        bytes.extend_from_slice(&body);
        let _ = decode_change(&bytes);
    }

    #[test]
    fn mutated_encodings_never_panic(
        envelope in any_envelope(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode_change(&envelope).unwrap();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let _ = decode_change(&bytes);
        let _ = decode_change(&bytes[..cut.index(bytes.len())]);
    }
}

/// `decode_change_with` (the in-place reading catch-up uses) against `decode_change`:
/// the same envelope, or the same error.
fn same_as_decode_change(bytes: &[u8]) -> Result<(), TestCaseError> {
    let owned = decode_change(bytes).map_err(|error| error.to_string());
    let in_place = decode_change_with(bytes, |envelope| envelope.to_envelope()).map_err(|error| error.to_string());
    prop_assert_eq!(in_place, owned);
    // The borrowed view is the owned envelope's own view.
    if let Ok(envelope) = decode_change(bytes) {
        let view = decode_change_with(bytes, |view| {
            // Borrowed from the input, not from a copy (the direct reader reads every valid envelope).
            let within = |field: &[u8]| bytes.as_ptr_range().contains(&field.as_ptr()) || field.is_empty();
            (
                within(view.ciphertext) && within(view.nonce) && within(view.change_id.as_bytes()),
                view == envelope.as_ref(),
            )
        });
        prop_assert_eq!(view.ok(), Some((true, true)));
    }
    Ok(())
}

#[test]
fn decode_change_with_reads_the_sample_and_refuses_what_decode_change_refuses() {
    let bytes = encode_change(&sample()).unwrap();
    assert_eq!(decode_change_with(&bytes, |envelope| envelope.to_envelope()).unwrap(), sample());
    for len in 0..bytes.len() {
        same_as_decode_change(&bytes[..len]).unwrap();
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    same_as_decode_change(&trailing).unwrap();
}

proptest! {
    #[test]
    fn decode_change_with_reads_envelopes_as_decode_change(envelope in any_envelope()) {
        let bytes = encode_change(&envelope).unwrap();
        prop_assert_eq!(decode_change_with(&bytes, |view| view.to_envelope()).unwrap(), envelope);
        same_as_decode_change(&bytes)?;
    }

    #[test]
    fn decode_change_with_reads_mutated_encodings_and_bytes_as_decode_change(
        envelope in any_envelope(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        noise in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = encode_change(&envelope).unwrap();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        same_as_decode_change(&bytes)?;
        same_as_decode_change(&bytes[..cut.index(bytes.len())])?;
        let mut headed = SINGLE_OBJECT_MAGIC.to_vec();
        headed.extend_from_slice(&change_envelope_fingerprint());
        headed.extend_from_slice(&noise);
        same_as_decode_change(&headed)?;
        same_as_decode_change(&noise)?;
    }
}

/// apache-avro's reading of a current-schema body, as `decode_change` did before the direct reader.
fn generic_decode(mut body: &[u8]) -> Result<ChangeEnvelope, SchemaError> {
    let value =
        apache_avro::from_avro_datum(change_envelope_schema(), &mut body, None).map_err(SchemaError::MalformedBody)?;
    if !body.is_empty() {
        return Err(SchemaError::TrailingBytes { count: body.len() });
    }
    ChangeEnvelope::from_avro_value(value)
}

#[test]
fn the_direct_reader_knows_the_current_schema() {
    assert!(
        crate::direct::reads(change_envelope_schema()),
        "avro/change_envelope.avsc changed: update src/direct.rs (until then, every record takes the slow path)"
    );
}

#[test]
fn a_non_canonical_varint_reads_as_apache_avro_reads_it() {
    // schema_version 1 written in two bytes (0x82 0x00), then a minimal envelope.
    let envelope = ChangeEnvelope {
        schema_version: 1,
        user_id: "u".into(),
        origin_device_id: "d".into(),
        change_id: "c".into(),
        record_id: "r".into(),
        collection: "n".into(),
        op: Op::Delete,
        hlc: -5,
        key_epoch: 7,
        nonce: vec![1, 2],
        ciphertext: vec![3],
        received_at_ms: 9,
    };
    let bytes = encode_change(&envelope).unwrap();
    let mut body = vec![0x82, 0x00];
    body.extend_from_slice(&bytes[SINGLE_OBJECT_HEADER_LEN + 1..]);
    assert_eq!(crate::direct::read(&body), Some(envelope.clone()));
    assert_eq!(generic_decode(&body).unwrap(), envelope);
}
