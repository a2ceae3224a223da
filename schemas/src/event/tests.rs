use proptest::prelude::*;

use super::*;
use crate::change_envelope_fingerprint;

pub(crate) fn one_of_each() -> Vec<Event> {
    let user = "018f6c1e-7b2a-7cc3-9f00-5b1d2e3f4a5b".to_owned();
    let device = "dev-1".to_owned();
    let bodies = vec![
        EventBody::LogAppended {
            log_generation: 0,
            first_offset: 10,
            log_end: 13,
            count: 3,
            origin_device_id: device.clone(),
            first_received_at_ms: 1_732_470_000_456,
        },
        EventBody::DeviceAcked { device_id: device.clone(), log_generation: 2, committed_offset: 13 },
        EventBody::DeviceConnected {
            device_id: device.clone(),
            lease_until_ms: 1_732_470_090_000,
            stream_started_ms: Some(1_732_470_000_123),
        },
        EventBody::DeviceConnected {
            device_id: device.clone(),
            lease_until_ms: 1_732_470_090_000,
            stream_started_ms: None,
        },
        EventBody::DeviceDisconnected { device_id: device.clone() },
        EventBody::DeviceAdded { device_id: device.clone() },
        EventBody::DeviceRevoked { device_id: device.clone() },
        EventBody::PushTargetSet {
            device_id: device.clone(),
            target: PushTarget::WebPush {
                endpoint: "https://push.example.net/wpush/v2/secret-token".into(),
                p256dh: vec![4; 65],
                auth: vec![7; 16],
            },
        },
        EventBody::PushTargetSet {
            device_id: device.clone(),
            target: PushTarget::Webhook {
                url: "https://gw.example.org/_matrix/push/v1/notify".into(),
                app_id: "org.example.app".into(),
                pushkey: "pk-secret".into(),
            },
        },
        EventBody::PushTargetRemoved { device_id: device.clone(), reason: TargetRemovedReason::Gone },
        EventBody::WakeUp { device_id: device, log_end: 13, outcome: WakeUpOutcome::Throttled, http_status: 429 },
    ];
    bodies
        .into_iter()
        .map(|body| Event { user_id: user.clone(), node_id: "node-a".into(), at_ms: 1_732_470_000_999, body })
        .collect()
}

#[test]
fn every_kind_round_trips() {
    let events = one_of_each();
    let kinds: std::collections::BTreeSet<&str> = events.iter().map(|e| e.body.kind()).collect();
    let in_schema: std::collections::BTreeSet<&str> = body_kinds().iter().map(String::as_str).collect();
    assert_eq!(kinds, in_schema, "the sample covers every kind of the schema, and no other");
    for event in events {
        let bytes = encode_event(&event).unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        assert_eq!(&bytes[2..10], &event_fingerprint());
        assert_eq!(decode_event(&bytes).unwrap(), event);
    }
}

#[test]
fn the_schema_parses_and_differs_from_the_envelope() {
    assert_ne!(event_fingerprint(), change_envelope_fingerprint());
    let envelope = crate::encode_change(&crate::ChangeEnvelope {
        schema_version: 1,
        user_id: "u".into(),
        origin_device_id: "d".into(),
        change_id: "c".into(),
        record_id: "r".into(),
        collection: "notes".into(),
        op: crate::Op::Upsert,
        hlc: 1,
        key_epoch: 1,
        nonce: vec![1; 24],
        ciphertext: vec![2; 16],
        received_at_ms: 1,
    })
    .unwrap();
    assert!(matches!(decode_event(&envelope), Err(SchemaError::UnknownEventFingerprint { .. })));
}

/// The contract: no field of the events schema can hold a change's content
/// or the cleartext routing metadata that names records.
#[test]
fn no_field_can_carry_content_or_record_metadata() {
    fn field_names(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let (Some(serde_json::Value::String(name)), Some(_)) = (map.get("name"), map.get("type")) {
                    out.push(name.clone());
                }
                map.values().for_each(|v| field_names(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| field_names(v, out)),
            _ => {}
        }
    }
    let json: serde_json::Value = serde_json::from_str(EVENT_AVSC).unwrap();
    let mut names = Vec::new();
    field_names(&json, &mut names);
    assert!(names.contains(&"log_end".to_owned()), "walked the fields: {names:?}");
    for forbidden in ["ciphertext", "nonce", "record_id", "collection", "change_id", "hlc", "key_epoch"] {
        assert!(!names.iter().any(|n| n == forbidden), "events schema has a `{forbidden}` field");
    }
}

#[test]
fn debug_never_shows_the_push_endpoint() {
    for event in one_of_each() {
        let text = format!("{event:?}");
        assert!(!text.contains("secret"), "{text}");
    }
    let target =
        PushTarget::WebPush { endpoint: "https://push.example.net:8443/a/b?c".into(), p256dh: vec![], auth: vec![] };
    assert_eq!(target.origin(), "https://push.example.net:8443");
}

#[test]
fn every_truncation_errors() {
    for event in one_of_each() {
        let bytes = encode_event(&event).unwrap();
        for len in 0..bytes.len() {
            assert!(decode_event(&bytes[..len]).is_err(), "{} truncated to {len}", event.body.kind());
        }
    }
}

#[test]
fn union_indexes_are_the_schemas_branch_positions() {
    // Read apart from apache-avro: the JSON of avro/event.avsc, in order.
    let avsc: serde_json::Value = serde_json::from_str(EVENT_AVSC).unwrap();
    let branches = |record: &serde_json::Value, field: &str| -> Vec<serde_json::Value> {
        let fields = record["fields"].as_array().unwrap();
        let field = fields.iter().find(|f| f["name"] == field).unwrap();
        field["type"].as_array().unwrap().clone()
    };
    let body = branches(&avsc, "body");
    let names: Vec<&str> = body.iter().map(|branch| branch["name"].as_str().unwrap()).collect();
    assert_eq!(body_kinds(), names.as_slice());
    let push_target_set = body.iter().find(|branch| branch["name"] == "PushTargetSet").unwrap();
    let targets: Vec<String> =
        branches(push_target_set, "target").iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(EVENT_SCHEMA.target_kinds, targets);
    // Each event is written with the index of its kind's branch, and read back by it.
    for event in one_of_each() {
        let Value::Record(fields) = event_to_value(&event).unwrap() else { panic!("not a record") };
        let Some((_, Value::Union(index, _))) = fields.iter().find(|(name, _)| name == "body") else {
            panic!("no body union")
        };
        assert_eq!(names[*index as usize], event.body.kind());
        if let EventBody::PushTargetSet { target, .. } = &event.body {
            assert_eq!(
                branch_index(&targets, target.record_name()).unwrap() as usize,
                match target {
                    PushTarget::WebPush { .. } => targets.iter().position(|t| t == "WebPushTarget").unwrap(),
                    PushTarget::Webhook { .. } => targets.iter().position(|t| t == "WebhookTarget").unwrap(),
                }
            );
        }
    }
    assert!(branch_index(&targets, "NoSuchTarget").is_err(), "a kind the schema lacks is an error, not index 0");
}

#[test]
fn a_bad_union_index_is_an_error() {
    let mut bytes = encode_event(&one_of_each()[0]).unwrap();
    // The body union index follows user_id, node_id and at; find it by
    // re-encoding with a known layout: user_id (1 + 36), node_id (1 + 6), at (6 bytes varint).
    let index_pos = 10 + 37 + 7 + 6;
    assert_eq!(bytes[index_pos], 0, "union index 0 (LogAppended) where expected");
    bytes[index_pos] = 2 * 40; // zigzag 40: no such branch
    assert!(decode_event(&bytes).is_err());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_event(&bytes);
    }

    #[test]
    fn mutated_events_never_panic(which in 0usize..11, pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = encode_event(&one_of_each()[which]).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let _ = decode_event(&bytes);
    }

    #[test]
    fn acks_round_trip(device in "\\PC{0,40}", generation in any::<i64>(), offset in any::<i64>(), at in any::<i64>()) {
        let event = Event {
            user_id: "u".into(),
            node_id: "n".into(),
            at_ms: at,
            body: EventBody::DeviceAcked { device_id: device, log_generation: generation, committed_offset: offset },
        };
        prop_assert_eq!(decode_event(&encode_event(&event).unwrap()).unwrap(), event);
    }
}

/// The writer and reader that resolve the schema once produce and read exactly
/// the bytes of apache-avro's per-call `to_avro_datum` / `from_avro_datum`.
#[test]
fn the_cached_writer_and_reader_match_the_per_call_functions_byte_for_byte() {
    for event in one_of_each() {
        let mut expected = Vec::new();
        wire::write_header(&EVENT_SCHEMA.fingerprint, &mut expected);
        expected.extend(apache_avro::to_avro_datum(&EVENT_SCHEMA.schema, event_to_value(&event).unwrap()).unwrap());
        let bytes = encode_event(&event).unwrap();
        assert_eq!(bytes, expected, "{event:?}");
        let mut body = &bytes[crate::SINGLE_OBJECT_HEADER_LEN..];
        let value = apache_avro::from_avro_datum(&EVENT_SCHEMA.schema, &mut body, None).unwrap();
        assert_eq!(event_from_value(value).unwrap(), decode_event(&bytes).unwrap());
    }
}

/// The body of `event` in the superseded schema `avro/event.v1.avsc`, with its header, as a
/// server from before `DeviceConnected.stream_started_at` wrote it.
fn encoded_as_v1(event: &Event) -> Vec<u8> {
    let previous = &PREVIOUS[0];
    let Value::Record(mut fields) = event_to_value(event).unwrap() else { panic!("not a record") };
    // v1's DeviceConnected has no stream_started_at: drop it from the body's record.
    if let Some((_, Value::Union(_, body))) = fields.iter_mut().find(|(name, _)| name == "body")
        && let Value::Record(body_fields) = body.as_mut()
    {
        body_fields.retain(|(name, _)| name != "stream_started_at");
    }
    let mut bytes = Vec::new();
    wire::write_header(&previous.fingerprint, &mut bytes);
    bytes.extend(apache_avro::to_avro_datum(&previous.schema, Value::Record(fields)).unwrap());
    bytes
}

#[test]
fn events_of_the_previous_schema_resolve_to_the_current_one() {
    assert_eq!(previous_event_fingerprints().len(), 1);
    assert_ne!(previous_event_fingerprints()[0], event_fingerprint(), "the field changed the fingerprint");
    for event in one_of_each() {
        let bytes = encoded_as_v1(&event);
        assert_eq!(&bytes[2..10], &previous_event_fingerprints()[0]);
        let expected = match event.body.clone() {
            // An old writer has no stream: the default, null.
            EventBody::DeviceConnected { device_id, lease_until_ms, .. } => Event {
                body: EventBody::DeviceConnected { device_id, lease_until_ms, stream_started_ms: None },
                ..event
            },
            _ => event,
        };
        assert_eq!(decode_event(&bytes).unwrap(), expected);
        for len in 0..bytes.len() {
            assert!(decode_event(&bytes[..len]).is_err(), "{} truncated to {len}", expected.body.kind());
        }
    }
}

/// A reader of the old schema that is given the new writer schema (Avro resolution) reads
/// the new events: the added field is skipped. (apache-avro picks a union branch by shape, so
/// only DeviceConnected's branch is checked here; fastavro resolves by name, tests/fastavro.rs.)
#[test]
fn the_previous_schema_reads_current_events_by_resolution() {
    for event in one_of_each() {
        let bytes = encode_event(&event).unwrap();
        let mut body = &bytes[crate::SINGLE_OBJECT_HEADER_LEN..];
        let old = apache_avro::from_avro_datum(&EVENT_SCHEMA.schema, &mut body, Some(&PREVIOUS[0].schema)).unwrap();
        let Value::Record(fields) = old else { panic!("not a record") };
        let Some((_, Value::Union(index, body))) = fields.iter().find(|(name, _)| name == "body") else { panic!() };
        let Value::Record(body) = body.as_ref() else { panic!("body is no record") };
        assert!(body.iter().all(|(name, _)| name != "stream_started_at"), "{body:?}");
        if let EventBody::DeviceConnected { lease_until_ms, .. } = event.body {
            assert_eq!(body_kinds()[*index as usize], "DeviceConnected");
            assert!(
                body.iter()
                    .any(|(name, value)| name == "lease_until" && *value == Value::TimestampMillis(lease_until_ms))
            );
        }
    }
}
