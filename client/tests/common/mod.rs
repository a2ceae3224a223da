//! Helpers shared by the store tests: a store with an account, remote changes.

#![allow(dead_code)]

use std::{path::Path, time::Duration};

use lockstep_client::{
    crypto::{AccountKey, Binding},
    hlc,
    record::{ChangePayload, RecordState, Stamp},
    store::{Account, Incoming, Sealed, Store},
};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

pub fn store_at(path: &Path, max_clock_ahead: Duration) -> (Store, (), AccountKey) {
    let mut store = Store::open(path, max_clock_ahead).unwrap();
    let key = AccountKey::generate();
    store
        .save_account(&Account {
            server: "http://127.0.0.1:1".into(),
            user_id: "user".into(),
            device_id: "me".into(),
            device_name: "me".into(),
            token: Zeroizing::new("token".into()),
            key: key.clone(),
            key_epoch: 1,
            epoch_keys: Default::default(),
        })
        .unwrap();
    (store, (), key)
}

pub fn store_with(max_clock_ahead: Duration) -> (Store, tempfile::TempDir, AccountKey) {
    let dir = tempfile::tempdir().unwrap();
    let (store, (), key) = store_at(&dir.path().join("client.db"), max_clock_ahead);
    (store, dir, key)
}

pub fn store() -> (Store, tempfile::TempDir, AccountKey) {
    store_with(Duration::from_secs(60))
}

pub fn fields(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

pub fn state(hlc: u64, device: &str, value: Value) -> RecordState {
    let mut state = RecordState::default();
    state.set(&fields(value), &Stamp { hlc, device: device.into() });
    state
}

/// A change from device "other", as decrypted by the sync layer (no sealed form).
pub fn remote(offset: i64, record_id: &str, hlc: u64, value: Value) -> Incoming {
    Incoming {
        offset,
        record_id: record_id.into(),
        collection: "items".into(),
        origin_device_id: "other".into(),
        content: Ok(ChangePayload::new(state(hlc, "other", value))),
        sealed: None,
    }
}

/// Seals `plaintext` as an upsert of `record_id` in "items" for user "user".
pub fn seal(key: &AccountKey, record_id: &str, plaintext: &[u8], hlc: u64) -> Sealed {
    let binding = Binding { user_id: "user", record_id, collection: "items", op: 1, key_epoch: 1 };
    let (nonce, ciphertext) = key.seal(&binding, plaintext);
    Sealed { op: 1, hlc, key_epoch: 1, nonce, ciphertext }
}

/// A change from device "other" as delivered: decrypted, with its sealed form.
pub fn sealed_remote(key: &AccountKey, offset: i64, record_id: &str, hlc: u64, value: Value) -> Incoming {
    let mut incoming = remote(offset, record_id, hlc, value);
    let plaintext = incoming.content.as_ref().unwrap().encode();
    incoming.sealed = Some(seal(key, record_id, &plaintext, hlc));
    incoming
}

pub fn now_hlc() -> u64 {
    hlc::from_physical_ms(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64)
}
