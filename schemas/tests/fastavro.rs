//! Cross-check against an independent Avro implementation (Python fastavro):
//! Rust-encoded envelopes must decode in fastavro with the header and
//! fingerprint fastavro computes itself, and fastavro-encoded envelopes must
//! decode in Rust (and be byte-identical to Rust's encoding).
//!
//! Needs `python3` with `fastavro` (`pip install fastavro`); fails, rather
//! than skips, without them.

use std::{fs, path::Path, process::Command};

use lockstep_schemas::{
    ChangeEnvelope, Op, change_envelope_canonical_form, change_envelope_fingerprint, decode_change, decode_change_with,
    encode_change,
};
use serde_json::{Value, json};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn envelopes() -> Vec<ChangeEnvelope> {
    let base = ChangeEnvelope {
        schema_version: 1,
        user_id: "018f6c1e-7b2a-7cc3-9f00-5b1d2e3f4a5b".into(),
        origin_device_id: "laptop-1".into(),
        change_id: "c-0001".into(),
        record_id: "r-0001".into(),
        collection: "notes".into(),
        op: Op::Upsert,
        hlc: (1_732_470_000_123 << 16) | 3,
        key_epoch: 7,
        nonce: (0..24).collect(),
        ciphertext: (0..1024u32).map(|i| (i * 31 % 251) as u8).collect(),
        received_at_ms: 1_732_470_000_456,
    };
    vec![
        base.clone(),
        ChangeEnvelope {
            schema_version: -1,
            user_id: String::new(),
            origin_device_id: "Gerät «Küche» 🔐 中文 \u{0} \"quoted\\\"".into(),
            change_id: "x".repeat(300),
            record_id: "/".into(),
            collection: "ñ".into(),
            op: Op::Delete,
            hlc: i64::MIN,
            key_epoch: u32::MAX,
            nonce: vec![],
            ciphertext: vec![],
            received_at_ms: -1,
        },
        ChangeEnvelope {
            schema_version: i32::MAX,
            hlc: i64::MAX,
            key_epoch: 0,
            nonce: vec![0xff; 12],
            ciphertext: vec![0; 70_000],
            // Latest instant fastavro's datetime conversion can represent.
            received_at_ms: 253_402_300_799_999,
            ..base.clone()
        },
        ChangeEnvelope {
            schema_version: i32::MIN,
            hlc: 0,
            key_epoch: 1 << 31,
            // Earliest instant fastavro's datetime conversion can represent.
            received_at_ms: -62_135_596_800_000,
            ..base
        },
    ]
}

fn to_json(e: &ChangeEnvelope) -> Value {
    json!({
        "schema_version": e.schema_version,
        "user_id": e.user_id,
        "origin_device_id": e.origin_device_id,
        "change_id": e.change_id,
        "record_id": e.record_id,
        "collection": e.collection,
        "op": match e.op { Op::Upsert => "UPSERT", Op::Delete => "DELETE" },
        "hlc": e.hlc,
        "key_epoch": e.key_epoch,
        "nonce": hex(&e.nonce),
        "ciphertext": hex(&e.ciphertext),
        "received_at": e.received_at_ms,
    })
}

fn from_json(v: &Value) -> ChangeEnvelope {
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} missing in {v}")).to_owned();
    let i = |k: &str| v[k].as_i64().unwrap_or_else(|| panic!("{k} missing in {v}"));
    ChangeEnvelope {
        schema_version: i32::try_from(i("schema_version")).unwrap(),
        user_id: s("user_id"),
        origin_device_id: s("origin_device_id"),
        change_id: s("change_id"),
        record_id: s("record_id"),
        collection: s("collection"),
        op: match s("op").as_str() {
            "UPSERT" => Op::Upsert,
            "DELETE" => Op::Delete,
            other => panic!("fastavro decoded op {other:?}"),
        },
        hlc: i("hlc"),
        key_epoch: u32::try_from(i("key_epoch")).unwrap(),
        nonce: unhex(&s("nonce")),
        ciphertext: unhex(&s("ciphertext")),
        received_at_ms: i("received_at"),
    }
}

#[test]
fn fastavro_reads_ours_and_we_read_fastavros() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = manifest.join("tests/fastavro_check.py");
    let avsc = manifest.join("avro/change_envelope.avsc");
    let dir = tempfile::tempdir().unwrap();
    let envelopes = envelopes();

    for (i, e) in envelopes.iter().enumerate() {
        let path = dir.path().join(format!("rust_{i}.bin"));
        fs::write(path, encode_change(e).unwrap()).unwrap();
    }
    let inputs: Vec<Value> = envelopes.iter().map(to_json).collect();
    fs::write(dir.path().join("python_inputs.json"), serde_json::to_vec(&inputs).unwrap()).unwrap();

    let output = Command::new("python3").arg(&script).arg(&avsc).arg(dir.path()).output().unwrap_or_else(|e| {
        panic!(
            "cannot run python3 ({e}): this cross-check needs python3 with fastavro \
                 (pip install fastavro)"
        )
    });
    assert!(
        output.status.success(),
        "{} failed ({}); it needs python3 with fastavro (pip install fastavro)\n\
         --- stderr ---\n{}\n--- stdout ---\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout),
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();

    // fastavro computed canonical form and fingerprint from the .avsc on its own.
    assert_eq!(report["canonical_form"].as_str().unwrap(), change_envelope_canonical_form());
    assert_eq!(
        report["fingerprint"].as_str().unwrap(),
        hex(&change_envelope_fingerprint()),
        "fingerprint differs from fastavro's; fastavro's canonical form: {}",
        report["canonical_form"]
    );

    // (a) Rust → fastavro: every field as fastavro decoded it.
    for (i, e) in envelopes.iter().enumerate() {
        let decoded = &report["decoded"][format!("rust_{i}.bin")];
        assert!(decoded.is_object(), "fastavro did not report rust_{i}.bin");
        assert_eq!(&from_json(decoded), e, "rust_{i}.bin as fastavro read it");
    }

    // (b) fastavro → Rust.
    for (i, e) in envelopes.iter().enumerate() {
        let bytes = fs::read(dir.path().join(format!("py_{i}.bin"))).unwrap();
        assert_eq!(&decode_change(&bytes).unwrap(), e, "py_{i}.bin");
        // The in-place reading catch-up uses reads the same envelope.
        assert_eq!(decode_change_with(&bytes, |view| view.to_envelope()).unwrap(), *e, "py_{i}.bin in place");
        // Avro binary is canonical for these types, so the bytes match too.
        assert!(bytes == encode_change(e).unwrap(), "py_{i}.bin differs from Rust's encoding");
    }
}

/// The events topic's format, read by fastavro from `avro/event.avsc` alone.
#[test]
fn fastavro_reads_our_events_byte_for_byte() {
    use lockstep_schemas::{
        Event, EventBody, PushTarget, TargetRemovedReason, WakeUpOutcome, decode_event, encode_event,
        event_fingerprint, previous_event_fingerprints,
    };

    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = manifest.join("tests/fastavro_events.py");
    let avsc = manifest.join("avro/event.avsc");
    let dir = tempfile::tempdir().unwrap();
    let event = |body| Event { user_id: "user-1".into(), node_id: "node-a".into(), at_ms: 1_732_470_000_999, body };
    let events = [
        event(EventBody::LogAppended {
            log_generation: 1,
            first_offset: 5,
            log_end: 1005,
            count: 1000,
            origin_device_id: "laptop".into(),
            first_received_at_ms: 1_732_470_000_000,
        }),
        event(EventBody::DeviceAcked { device_id: "phone".into(), log_generation: 1, committed_offset: 1005 }),
        event(EventBody::DeviceConnected {
            device_id: "phone".into(),
            lease_until_ms: 1_732_470_090_000,
            stream_started_ms: Some(1_732_470_000_500),
        }),
        event(EventBody::PushTargetSet {
            device_id: "phone".into(),
            target: PushTarget::WebPush {
                endpoint: "https://push.example/x".into(),
                p256dh: vec![4; 65],
                auth: vec![9; 16],
            },
        }),
        event(EventBody::PushTargetSet {
            device_id: "phone".into(),
            target: PushTarget::Webhook {
                url: "https://gw.example/_matrix/push/v1/notify".into(),
                app_id: "a".into(),
                pushkey: "k".into(),
            },
        }),
        event(EventBody::PushTargetRemoved { device_id: "phone".into(), reason: TargetRemovedReason::DeviceRevoked }),
        event(EventBody::WakeUp {
            device_id: "phone".into(),
            log_end: 1005,
            outcome: WakeUpOutcome::Sent,
            http_status: 201,
        }),
    ];
    for (i, e) in events.iter().enumerate() {
        fs::write(dir.path().join(format!("rust_{i}.bin")), encode_event(e).unwrap()).unwrap();
    }
    let previous = manifest.join("avro/event.v1.avsc");
    let output = Command::new("python3")
        .arg(&script)
        .arg(&avsc)
        .arg(dir.path())
        .arg(&previous)
        .output()
        .expect("python3 with fastavro");
    assert!(output.status.success(), "{}: {}", script.display(), String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["fingerprint"].as_str().unwrap(), hex(&event_fingerprint()));

    let decoded = |i: usize| report["decoded"][format!("rust_{i}.bin")].clone();
    assert_eq!(decoded(0)["body"]["branch"], "lockstep.events.v1.LogAppended");
    assert_eq!(decoded(0)["body"]["record"]["log_end"], 1005);
    assert_eq!(decoded(0)["body"]["record"]["first_received_at"], 1_732_470_000_000_i64);
    assert_eq!(decoded(0)["at"], 1_732_470_000_999_i64);
    assert_eq!(decoded(1)["body"]["record"]["committed_offset"], 1005);
    assert_eq!(decoded(3)["body"]["record"]["target"]["branch"], "lockstep.events.v1.WebPushTarget");
    assert_eq!(decoded(3)["body"]["record"]["target"]["record"]["auth"], hex(&[9; 16]));
    assert_eq!(decoded(4)["body"]["record"]["target"]["branch"], "lockstep.events.v1.WebhookTarget");
    assert_eq!(decoded(5)["body"]["record"]["reason"], "DEVICE_REVOKED");
    assert_eq!(decoded(6)["body"]["record"]["outcome"], "SENT");
    assert_eq!(decoded(6)["body"]["record"]["http_status"], 201);
    assert_eq!(decoded(2)["body"]["record"]["stream_started_at"], 1_732_470_000_500_i64);

    // The superseded schema (before `stream_started_at`), in both directions, by fastavro.
    assert_eq!(report["previous_fingerprint"].as_str().unwrap(), hex(&previous_event_fingerprints()[0]));
    let old_reader = &report["decoded_v1"]["rust_2.bin"]["body"]["record"];
    assert_eq!(old_reader["lease_until"], 1_732_470_090_000_i64, "{old_reader}");
    assert!(old_reader.get("stream_started_at").is_none(), "an old reader skips the new field: {old_reader}");
    assert_eq!(report["decoded_v1"]["rust_0.bin"], decoded(0), "other kinds read the same with either schema");
    let old_writer = fs::read(dir.path().join("py_v1_connected.bin")).unwrap();
    assert_eq!(
        decode_event(&old_writer).unwrap(),
        Event {
            node_id: "node-old".into(),
            ..event(EventBody::DeviceConnected {
                device_id: "phone".into(),
                lease_until_ms: 1_732_470_090_000,
                stream_started_ms: None,
            })
        }
    );
}
