//! Rough timing of encode/decode for a typical envelope (1 KiB ciphertext).
//!
//! `cargo run --release -p lockstep-schemas --example bench_envelope [iterations]`

use std::{hint::black_box, time::Instant};

use lockstep_schemas::{CHANGE_ENVELOPE_VERSION, ChangeEnvelope, Op, decode_change, encode_change};

fn main() {
    let iterations: u32 = std::env::args().nth(1).map_or(100_000, |s| s.parse().expect("iterations must be a number"));
    let envelope = ChangeEnvelope {
        schema_version: CHANGE_ENVELOPE_VERSION,
        user_id: "018f6c1e-7b2a-7cc3-9f00-5b1d2e3f4a5b".into(),
        origin_device_id: "018f6c1e-7b2a-7cc3-9f00-000000000001".into(),
        change_id: "018f6c1e-7b2a-7cc3-9f00-000000000002".into(),
        record_id: "018f6c1e-7b2a-7cc3-9f00-000000000003".into(),
        collection: "notes".into(),
        op: Op::Upsert,
        hlc: (1_732_470_000_123 << 16) | 3,
        key_epoch: 7,
        nonce: vec![7; 24],
        ciphertext: vec![0xA5; 1024],
        received_at_ms: 1_732_470_000_456,
    };
    let bytes = encode_change(&envelope).unwrap();
    assert_eq!(decode_change(&bytes).unwrap(), envelope);

    let start = Instant::now();
    for _ in 0..iterations {
        black_box(encode_change(black_box(&envelope)).unwrap());
    }
    let encode = start.elapsed() / iterations;

    let start = Instant::now();
    for _ in 0..iterations {
        black_box(decode_change(black_box(&bytes)).unwrap());
    }
    let decode = start.elapsed() / iterations;

    println!("{} bytes on the wire, {iterations} iterations: encode {encode:?}/op, decode {decode:?}/op", bytes.len());
}
