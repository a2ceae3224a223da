//! Cross-check against an independent Avro implementation (Python fastavro):
//! Rust-encoded envelopes must decode in fastavro with the header and
//! fingerprint fastavro computes itself, and fastavro-encoded envelopes must
//! decode in Rust (and be byte-identical to Rust's encoding).
//!
//! Needs `python3` with `fastavro` (`pip install fastavro`); fails, rather
//! than skips, without them.

use std::{fs, path::Path, process::Command};

use lockstep_schemas::{
    ChangeEnvelope, Op, change_envelope_canonical_form, change_envelope_fingerprint, decode_change, encode_change,
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
        // Avro binary is canonical for these types, so the bytes match too.
        assert!(bytes == encode_change(e).unwrap(), "py_{i}.bin differs from Rust's encoding");
    }
}
