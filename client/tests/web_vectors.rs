//! The reverse of `examples/web_vectors.rs`: vectors written by the TypeScript client
//! (`clients/web`, `npm run vectors -- web.json`) must open, verify and merge here alike.
//! Ignored by default, since it needs that file: `scripts/test` writes it and runs
//! `LOCKSTEP_WEB_VECTORS=web.json cargo test -p lockstep-client --test web_vectors -- --ignored`.

use lockstep_client::{
    crypto::{AccountKey, Binding, CryptoError},
    epochs::{DeviceSecret, EpochKey, EpochKeys, Keyring, SealedFor, open_epoch_key, verify_device_key},
    ids::validate_record_id,
    pairing::PairingCode,
    record::{ChangePayload, RecordState},
};
use serde_json::Value;

fn text(value: &Value, name: &str) -> String {
    value[name].as_str().unwrap_or_else(|| panic!("{name} is not a string in {value}")).to_string()
}

fn bytes(value: &Value, name: &str) -> Vec<u8> {
    hex::decode(text(value, name)).unwrap_or_else(|error| panic!("{name}: {error}"))
}

fn number(value: &Value, name: &str) -> u32 {
    value[name].as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or_else(|| panic!("{name} in {value}"))
}

fn state(value: &Value, name: &str) -> RecordState {
    serde_json::from_str(&text(value, name)).unwrap_or_else(|error| panic!("{name}: {error}"))
}

#[test]
#[ignore = "needs LOCKSTEP_WEB_VECTORS, written by clients/web (scripts/test runs it)"]
fn typescript_vectors_open_verify_and_merge_alike() {
    let path = std::env::var("LOCKSTEP_WEB_VECTORS").expect("LOCKSTEP_WEB_VECTORS names the vectors of clients/web");
    let vectors: Value = serde_json::from_slice(&std::fs::read(&path).expect("the vectors file")).expect("JSON");
    assert_eq!(vectors["producer"], "typescript");

    let envelopes = vectors["envelopes"].as_array().expect("envelopes");
    assert!(envelopes.len() >= 10);
    for envelope in envelopes {
        let account = AccountKey::from_base64(&text(envelope, "account_key")).expect("account key");
        let mut epochs = EpochKeys::default();
        for (epoch, key) in envelope["epoch_keys"].as_object().expect("epoch keys") {
            epochs
                .insert(epoch.parse().expect("an epoch"), EpochKey::from_base64(key.as_str().expect("a key")).unwrap());
        }
        let bound = &envelope["binding"];
        let (user_id, record_id, collection) =
            (text(bound, "user_id"), text(bound, "record_id"), text(bound, "collection"));
        let binding = Binding {
            user_id: &user_id,
            record_id: &record_id,
            collection: &collection,
            op: number(bound, "op") as i32,
            key_epoch: number(bound, "key_epoch"),
        };
        assert_eq!(binding.associated_data(), bytes(envelope, "associated_data"));
        let keyring = Keyring { account: &account, epochs: &epochs };
        let (nonce, ciphertext) = (bytes(envelope, "nonce"), bytes(envelope, "ciphertext"));
        let plaintext = keyring.open(&binding, &nonce, &ciphertext).expect("a TypeScript envelope opens");
        assert_eq!(*plaintext, bytes(envelope, "plaintext"));
        let moved = Binding { record_id: "elsewhere", ..binding };
        assert_eq!(keyring.open(&moved, &nonce, &ciphertext), Err(CryptoError::Decrypt));
        if envelope["is_payload"] == true {
            let payload = ChangePayload::decode(&plaintext).expect("a TypeScript payload decodes");
            assert_eq!(payload.encode(), *plaintext, "the TypeScript client writes payloads as this crate does");
        }
    }

    for sealed in vectors["sealed_epoch_keys"].as_array().expect("sealed keys") {
        let account = AccountKey::from_base64(&text(sealed, "account_key")).unwrap();
        let secret = DeviceSecret::from_base64(&text(sealed, "device_secret")).unwrap();
        assert_eq!(secret.public_key().to_vec(), bytes(sealed, "device_public_key"));
        let (user_id, device_id) = (text(sealed, "user_id"), text(sealed, "device_id"));
        let sealed_for = SealedFor { user_id: &user_id, device_id: &device_id, epoch: number(sealed, "epoch") };
        let key = open_epoch_key(&account, &secret, &sealed_for, &bytes(sealed, "sealed")).expect("opens");
        assert_eq!(*key.to_base64(), text(sealed, "epoch_key"));
        let elsewhere = SealedFor { device_id: "another", ..sealed_for };
        assert!(open_epoch_key(&account, &secret, &elsewhere, &bytes(sealed, "sealed")).is_err());
        verify_device_key(
            &account,
            &user_id,
            &device_id,
            &bytes(sealed, "device_public_key"),
            &bytes(sealed, "device_key_proof"),
        )
        .expect("a TypeScript device key proof verifies");
    }

    let rotations = vectors["rotations"].as_array().expect("rotations");
    assert!(rotations.len() >= 3);
    for rotation in rotations {
        check_rotation(rotation);
    }

    let merges = vectors["merges"].as_array().expect("merges");
    assert!(merges.len() >= 200);
    for (index, case) in merges.iter().enumerate() {
        let (a, b) = (state(case, "a"), state(case, "b"));
        let mut merged = a.clone();
        assert_eq!(merged.merge(&b), case["changed"] == true, "case {index}: changed");
        assert_eq!(serde_json::to_string(&merged).unwrap(), text(case, "merged"), "case {index}: byte for byte");
        assert_eq!(merged.is_deleted(), case["deleted"] == true, "case {index}: deleted");
    }

    for code in vectors["pairing_codes"].as_array().expect("pairing codes") {
        let decoded = PairingCode::decode(&text(code, "text")).expect("a TypeScript pairing code decodes");
        assert_eq!((decoded.server, decoded.ticket), (text(code, "server"), text(code, "ticket")));
        assert_eq!(*decoded.key.to_base64(), text(code, "key"));
    }

    let ids: Vec<&str> = vectors["ids"].as_array().expect("ids").iter().filter_map(Value::as_str).collect();
    assert_eq!(ids.len(), 50);
    for id in &ids {
        validate_record_id(id).expect("a TypeScript id is a valid record id");
        let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 7, "{id}");
    }
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids of one generator strictly increase");
}

/// A rotation the TypeScript client made when it revoked a device: every remaining device
/// opens its copy of the new epoch's key (made for it, with the account key's proof), the
/// revoked device has none, and the control record sealed under the new epoch reads as this
/// crate's store reads a revocation (`store::revocations`).
fn check_rotation(rotation: &Value) {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use lockstep_client::store::REVOCATIONS_COLLECTION;

    let account = AccountKey::from_base64(&text(rotation, "account_key")).expect("account key");
    let user_id = text(rotation, "user_id");
    let epoch = number(rotation, "epoch");
    let revoked_id = text(rotation, "revoked_device_id");
    let sealed_keys = rotation["sealed_keys"].as_array().expect("sealed keys");
    let devices = rotation["devices"].as_array().expect("devices");
    let mut epoch_key = None;
    for device in devices {
        let device_id = text(device, "device_id");
        let secret = DeviceSecret::from_base64(&text(device, "device_secret")).expect("device secret");
        assert_eq!(secret.public_key().to_vec(), bytes(device, "public_key"));
        verify_device_key(&account, &user_id, &device_id, &bytes(device, "public_key"), &bytes(device, "proof"))
            .expect("a device key proof verifies");
        let copies: Vec<&Value> =
            sealed_keys.iter().filter(|sealed| sealed["device_id"] == device_id.as_str()).collect();
        if device_id == revoked_id {
            assert!(copies.is_empty(), "no copy of the new epoch for the revoked device");
            continue;
        }
        assert_eq!(copies.len(), 1, "one copy for {device_id}");
        assert_eq!(number(copies[0], "epoch"), epoch);
        let sealed_for = SealedFor { user_id: &user_id, device_id: &device_id, epoch };
        let key = open_epoch_key(&account, &secret, &sealed_for, &bytes(copies[0], "sealed")).expect("the copy opens");
        assert_eq!(*key.to_base64(), text(rotation, "epoch_key"));
        epoch_key = Some(key);
    }
    assert_eq!(sealed_keys.len(), devices.len() - 1, "every remaining device got a copy");

    let mut epochs = EpochKeys::default();
    epochs.insert(epoch, epoch_key.expect("a remaining device"));
    let record = &rotation["control_record"];
    let (record_id, collection) = (text(record, "record_id"), text(record, "collection"));
    assert_eq!(collection, REVOCATIONS_COLLECTION);
    assert_eq!(record_id, format!("revoked:{revoked_id}"));
    validate_record_id(&record_id).expect("a valid record id");
    let binding = Binding {
        user_id: &user_id,
        record_id: &record_id,
        collection: &collection,
        op: number(record, "op") as i32,
        key_epoch: number(record, "key_epoch"),
    };
    assert_eq!(binding.key_epoch, epoch, "the control record goes up under the new epoch");
    let keyring = Keyring { account: &account, epochs: &epochs };
    let plaintext = keyring.open(&binding, &bytes(record, "nonce"), &bytes(record, "ciphertext")).expect("opens");
    assert_eq!(*plaintext, bytes(record, "plaintext"));
    let payload = ChangePayload::decode(&plaintext).expect("a payload");
    assert_eq!(payload.encode(), *plaintext);
    let field = |name: &str| payload.state.fields.get(name).map(|field| field.value.clone()).unwrap_or(Value::Null);
    assert_eq!(field("device_id"), Value::from(revoked_id.as_str()));
    let revoked = devices.iter().find(|device| device["device_id"] == revoked_id.as_str()).expect("the revoked device");
    let public_key = URL_SAFE_NO_PAD.decode(field("public_key").as_str().expect("a string")).expect("base64url");
    assert_eq!(public_key, bytes(revoked, "public_key"));
    assert_eq!(field("revoked_in_epoch").as_u64(), Some(u64::from(epoch - 1)));
}
