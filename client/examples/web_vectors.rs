//! Writes the test vectors the TypeScript client (`clients/web`) checks itself against: made by
//! this crate's own code, so the browser client must agree with it byte for byte.
//!
//! `cargo run -p lockstep-client --example web_vectors -- <out.json>` (`scripts/test` runs it).
//! Merge cases come from a fixed seed; keys, nonces and ephemeral keys are fresh each run.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use lockstep_client::{
    crypto::{AccountKey, Binding},
    epochs::{DeviceSecret, EpochKey, EpochKeys, Keyring, SealedFor, device_key_proof, seal_epoch_key},
    hlc::{Clock, ClockError},
    ids::new_id,
    pairing::PairingCode,
    record::{ChangePayload, RecordState, Stamp},
    store::{Account, RevokedDevice, Store},
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::{Map, Value, json};

/// Device ids and field names whose UTF-8 order differs from their UTF-16 order (an astral
/// character against one above U+E000), so that string comparisons are checked too.
const DEVICES: &[&str] = &["a", "b", "phone", "laptop", "\u{FF21}", "\u{1F600}", "é"];
const FIELDS: &[&str] = &["title", "body", "tags", "parent", "done", "\u{FF21}", "\u{1F600}", "n"];

fn values() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(7),
        json!(-12),
        json!(9_007_199_254_740_993_u64),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1.5),
        json!(-0.25),
        json!(""),
        json!("hello"),
        json!("Hello"),
        json!("é"),
        json!("\u{1F600}"),
        json!("\u{FF21}"),
        json!("line\nbreak \"quoted\" \\ \u{1}"),
        json!(["work", "home"]),
        json!([]),
        json!({"z": 1, "a": [1, 2], "\u{FF21}": "x", "\u{1F600}": "y", "é": {"k": null}}),
        json!({}),
    ]
}

/// A state made of a few random edits and deletes, with small clocks so that equal stamps
/// with different values (ties) happen often.
fn random_state(rng: &mut StdRng, values: &[Value]) -> RecordState {
    let mut state = RecordState::default();
    for _ in 0..rng.random_range(0..6) {
        let stamp = Stamp {
            hlc: rng.random_range(1..8_u64) << (rng.random_range(0..2) * 60),
            device: DEVICES.choose(rng).copied().unwrap_or("a").into(),
        };
        if rng.random_bool(0.2) {
            state.delete(&stamp);
        } else {
            let mut edit = Map::new();
            for _ in 0..rng.random_range(1..4) {
                let name = FIELDS.choose(rng).copied().unwrap_or("title");
                edit.insert(name.into(), values.choose(rng).cloned().unwrap_or(Value::Null));
            }
            state.set(&edit, &stamp);
        }
    }
    state
}

fn state_json(state: &RecordState) -> Value {
    serde_json::to_value(state).expect("a record state serializes")
}

fn merges(rng: &mut StdRng) -> Vec<Value> {
    let values = values();
    (0..400)
        .map(|_| {
            let a = random_state(rng, &values);
            // Half of the cases start from a shared base, as two devices of one record do.
            let b = if rng.random_bool(0.5) {
                let mut b = a.clone();
                b.merge(&random_state(rng, &values));
                b
            } else {
                random_state(rng, &values)
            };
            let mut merged = a.clone();
            let changed = merged.merge(&b);
            let mut other_way = b.clone();
            other_way.merge(&a);
            assert_eq!(merged, other_way, "merge is commutative");
            json!({
                "a": state_json(&a),
                "b": state_json(&b),
                "merged": state_json(&merged),
                "changed": changed,
                "deleted": merged.is_deleted(),
                "live": merged.is_live(),
                "visible": merged.visible(),
                "max_hlc": merged.max_hlc(),
            })
        })
        .collect()
}

fn binding_json(binding: &Binding<'_>) -> Value {
    json!({
        "user_id": binding.user_id,
        "record_id": binding.record_id,
        "collection": binding.collection,
        "op": binding.op,
        "key_epoch": binding.key_epoch,
    })
}

fn envelopes(rng: &mut StdRng) -> Vec<Value> {
    let values = values();
    let mut out = Vec::new();
    for index in 0..24_u32 {
        let account = AccountKey::generate();
        let mut epochs = EpochKeys::default();
        let key_epoch = 1 + index % 3;
        for epoch in 2..=key_epoch {
            epochs.insert(epoch, EpochKey::generate());
        }
        let record_id = new_id();
        let user_id = format!("user-{index}-é");
        let binding = Binding {
            user_id: &user_id,
            record_id: &record_id,
            collection: ["notes", "passwords", "a.b-c_d"][index as usize % 3],
            op: 1 + (index as i32 % 2),
            key_epoch,
        };
        let plaintext = match index {
            0 => Vec::new(),
            1 => (0..=255_u8).collect(),
            _ => ChangePayload::new(random_state(rng, &values)).encode(),
        };
        let (nonce, ciphertext) = Keyring { account: &account, epochs: &epochs }
            .seal(&binding, &plaintext)
            .expect("the keyring holds the epoch");
        let epoch_keys: Map<String, Value> =
            epochs.iter().map(|(epoch, key)| (epoch.to_string(), json!(*key.to_base64()))).collect();
        out.push(json!({
            "account_key": *account.to_base64(),
            "epoch_keys": epoch_keys,
            "binding": binding_json(&binding),
            "associated_data": hex::encode(binding.associated_data()),
            "nonce": hex::encode(&nonce),
            "plaintext": hex::encode(&plaintext),
            "is_payload": index >= 2,
            "ciphertext": hex::encode(&ciphertext),
        }));
    }
    out
}

fn sealed_epoch_keys() -> Vec<Value> {
    (0..12_u32)
        .map(|index| {
            let account = AccountKey::generate();
            let device = DeviceSecret::generate();
            let key = EpochKey::generate();
            let (user_id, device_id) = (format!("user-{index}"), new_id());
            let epoch = 2 + index;
            let sealed_for = SealedFor { user_id: &user_id, device_id: &device_id, epoch };
            let sealed = seal_epoch_key(&account, &device.public_key(), &sealed_for, &key).expect("a valid public key");
            json!({
                "account_key": *account.to_base64(),
                "device_secret": *device.to_base64(),
                "device_public_key": hex::encode(device.public_key()),
                "device_key_proof": hex::encode(device_key_proof(&account, &user_id, &device_id, &device.public_key())),
                "user_id": user_id,
                "device_id": device_id,
                "epoch": epoch,
                "epoch_key": *key.to_base64(),
                "sealed": hex::encode(&sealed),
            })
        })
        .collect()
}

/// Revocation control records as this crate's store writes them (`Store::record_revocation`),
/// for the TypeScript client to read as revocations (by device id and by public key).
fn revocation_records() -> anyhow::Result<Vec<Value>> {
    let dir = tempfile::tempdir()?;
    let mut store = Store::open(&dir.path().join("store.db"), Duration::from_secs(3600))?;
    store.save_account(&Account {
        server: "http://127.0.0.1:1".into(),
        user_id: "user-revocations".into(),
        device_id: "laptop".into(),
        device_name: "laptop".into(),
        token: String::from("token").into(),
        key: AccountKey::generate(),
        key_epoch: 1,
        epoch_keys: EpochKeys::default(),
    })?;
    let mut records = Vec::new();
    for (index, device_id) in ["phone", "old-tablet", &new_id()].into_iter().enumerate() {
        let public_key = if index == 1 { Vec::new() } else { DeviceSecret::generate().public_key().to_vec() };
        let revoked = RevokedDevice { device_id: device_id.into(), public_key, revoked_in_epoch: 1 + index as u32 * 3 };
        store.record_revocation(&revoked)?;
        let record =
            store.get(&format!("revoked:{device_id}"))?.ok_or_else(|| anyhow::anyhow!("the control record"))?;
        records.push(json!({
            "record_id": record.record_id,
            "collection": record.collection,
            "state": serde_json::to_string(&record.state)?,
            "device_id": revoked.device_id,
            "public_key": hex::encode(&revoked.public_key),
            "revoked_in_epoch": revoked.revoked_in_epoch,
        }));
    }
    Ok(records)
}

/// The wall clock the HLC scenarios read (a `fn` pointer cannot capture).
static WALL_MS: AtomicU64 = AtomicU64::new(0);

fn wall() -> u64 {
    WALL_MS.load(Ordering::Relaxed)
}

fn hlc_scenarios(rng: &mut StdRng) -> Vec<Value> {
    (0..20)
        .map(|_| {
            let start_ms = 1_700_000_000_000 + rng.random_range(0..1_000_000_u64);
            let max_ahead_ms = [1_000_u64, 60_000, 604_800_000][rng.random_range(0..3)];
            let last = if rng.random_bool(0.5) { 0 } else { (start_ms + rng.random_range(0..5_000)) << 16 };
            WALL_MS.store(start_ms, Ordering::Relaxed);
            let mut clock = Clock::with_wall_clock(last, Duration::from_millis(max_ahead_ms), wall);
            let mut steps = Vec::new();
            for _ in 0..30 {
                let wall_ms = match rng.random_range(0..4) {
                    0 => wall(),
                    1 => wall() + rng.random_range(1..3_000),
                    2 => wall().saturating_sub(rng.random_range(1..3_000)),
                    _ => wall() + 1,
                };
                WALL_MS.store(wall_ms, Ordering::Relaxed);
                let remote = ((wall_ms + rng.random_range(0..2 * max_ahead_ms)).saturating_sub(max_ahead_ms / 2)
                    << 16)
                    + rng.random_range(0..4);
                let step = match rng.random_range(0..4) {
                    0 | 1 => json!({ "wall_ms": wall_ms, "op": "tick", "result": clock.tick() }),
                    2 => {
                        let result = match clock.observe(remote) {
                            Ok(()) => json!("ok"),
                            Err(ClockError::TooFarAhead { ahead_ms, bound_ms }) => {
                                json!({ "ahead_ms": ahead_ms, "bound_ms": bound_ms })
                            }
                        };
                        json!({ "wall_ms": wall_ms, "op": "observe", "stamp": remote, "result": result, "last": clock.last() })
                    }
                    _ => {
                        clock.observe_held(remote);
                        json!({ "wall_ms": wall_ms, "op": "observe_held", "stamp": remote, "last": clock.last() })
                    }
                };
                steps.push(step);
            }
            json!({ "start_ms": start_ms, "max_ahead_ms": max_ahead_ms, "last": last, "steps": steps })
        })
        .collect()
}

fn pairing_codes() -> (Vec<Value>, Vec<Value>) {
    let good = [("http://127.0.0.1:50051", "lsp_abc"), ("https://sync.example:443", "lsp_é_\u{1F600}")]
        .into_iter()
        .map(|(server, ticket)| {
            let code = PairingCode { server: server.into(), ticket: ticket.into(), key: AccountKey::generate() };
            let text = code.encode();
            let shown = format!("{}\n{}\n\nOn the new device: lockstep-cli pair redeem …\n", code.qr(), &*text);
            json!({ "text": *text, "shown": shown, "server": server, "ticket": ticket, "key": *code.key.to_base64() })
        })
        .collect();
    let bad = [
        "hello",
        "LOCKSTEP1:!!!",
        "LOCKSTEP1:bm90IGpzb24",
        "LOCKSTEP1:eyJzZXJ2ZXIiOiJ4IiwidGlja2V0IjoieSIsImtleSI6InNob3J0In0",
    ]
    .into_iter()
    .map(|text| {
        let error = PairingCode::decode(text).expect_err("a bad code").to_string();
        json!({ "text": text, "error": error })
    })
    .collect();
    (good, bad)
}

fn main() -> anyhow::Result<()> {
    let out = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: web_vectors <out.json>"))?;
    let mut rng = StdRng::seed_from_u64(22);
    let (pairing, bad_pairing) = pairing_codes();
    let vectors = json!({
        "producer": "rust",
        "envelopes": envelopes(&mut rng),
        "sealed_epoch_keys": sealed_epoch_keys(),
        "revocation_records": revocation_records()?,
        "merges": merges(&mut rng),
        "hlc": hlc_scenarios(&mut rng),
        "pairing_codes": pairing,
        "bad_pairing_codes": bad_pairing,
        "ids": (0..50).map(|_| new_id()).collect::<Vec<_>>(),
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&vectors)?)?;
    println!("wrote {out}");
    Ok(())
}
