//! The store's secrets at rest: sealed under a passphrase, gone from the
//! database file and its WAL, opened with the right passphrase only; a store
//! without one behaves as it always did.

mod common;

use std::{path::Path, time::Duration};

use common::fields;
use lockstep_client::{
    crypto::AccountKey,
    epochs::EpochKey,
    store::{Account, KdfParams, Store, StoreError},
};
use serde_json::json;
use zeroize::Zeroizing;

const SKEW: Duration = Duration::from_secs(3600);

fn account(key: &AccountKey, token: &str) -> Account {
    Account {
        server: "http://127.0.0.1:1".into(),
        user_id: "user".into(),
        device_id: "me".into(),
        device_name: "me".into(),
        token: Zeroizing::new(token.into()),
        key: key.clone(),
        key_epoch: 1,
        epoch_keys: Default::default(),
    }
}

/// Which of `needles` the store's files (database, WAL) hold, byte for byte.
fn found_in_files(path: &Path, needles: &[String]) -> Vec<String> {
    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        if let Ok(content) = std::fs::read(format!("{}{suffix}", path.display())) {
            bytes.extend(content);
        }
    }
    needles
        .iter()
        .filter(|needle| bytes.windows(needle.len()).any(|window| window == needle.as_bytes()))
        .cloned()
        .collect()
}

#[test]
fn a_passphrase_seals_every_secret_and_the_files_keep_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.db");
    let mut store = Store::open(&path, SKEW).unwrap();
    let key = AccountKey::generate();
    let token = format!("lsd_{}", &*AccountKey::generate().to_base64());
    store.save_account(&account(&key, &token)).unwrap();
    let epoch_two = EpochKey::generate();
    store.add_epoch_keys(&[(2, epoch_two.clone(), "other".into())]).unwrap();
    let device_public = store.device_secret().unwrap().public_key();
    let device_secret = store.device_secret().unwrap().to_base64().to_string();
    store.put("notes", Some("n1"), &fields(json!({"text": "kept"}))).unwrap();
    store.sealed_outbox_batch(10).unwrap();
    let secrets = [key.to_base64().to_string(), token.clone(), epoch_two.to_base64().to_string(), device_secret];
    assert_eq!(found_in_files(&path, &secrets), secrets, "the check sees plaintext where it is");

    assert!(store.protect(b"correct horse", KdfParams::TEST).unwrap(), "nothing else holds the store open");
    assert!(found_in_files(&path, &secrets).is_empty(), "plaintext left in the files");
    // This process stays unlocked: everything still works, and a new secret is sealed too.
    assert_eq!(store.account().unwrap().key, key);
    let epoch_three = EpochKey::generate();
    assert_eq!(store.add_epoch_keys(&[(3, epoch_three.clone(), "other".into())]).unwrap(), 3);
    store.put("notes", Some("n2"), &fields(json!({"text": "later"}))).unwrap();
    assert_eq!(store.sealed_outbox_batch(10).unwrap().len(), 2);
    drop(store);
    let all = [&secrets[..], &[epoch_three.to_base64().to_string()]].concat();
    assert!(found_in_files(&path, &all).is_empty(), "plaintext left in the files once closed");

    // Opened again: locked until the right passphrase; a wrong one changes nothing.
    let mut store = Store::open(&path, SKEW).unwrap();
    assert!(store.is_protected());
    assert!(matches!(store.account(), Err(StoreError::Locked)));
    assert!(matches!(store.device_secret(), Err(StoreError::Locked)));
    assert!(store.account().unwrap_err().to_string().contains("--passphrase-file"));
    assert!(matches!(store.unlock(b"correct horsf"), Err(StoreError::WrongPassphrase)));
    assert!(matches!(store.account(), Err(StoreError::Locked)));
    assert_eq!(store.list(None, false).unwrap().len(), 2, "the records are not sealed");
    store.unlock(b"correct horse").unwrap();
    let account = store.account().unwrap();
    assert_eq!((account.key, account.token.as_str(), account.key_epoch), (key.clone(), token.as_str(), 3));
    assert_eq!(account.epoch_keys.get(2), Some(&epoch_two));
    assert_eq!(account.epoch_keys.get(3), Some(&epoch_three));
    assert_eq!(store.device_secret().unwrap().public_key(), device_public);
    assert_eq!(store.kdf_params(), Some(KdfParams::TEST));

    // A new passphrase replaces the old one.
    store.protect(b"battery staple", KdfParams::TEST).unwrap();
    drop(store);
    let mut store = Store::open(&path, SKEW).unwrap();
    assert!(matches!(store.unlock(b"correct horse"), Err(StoreError::WrongPassphrase)));
    store.unlock(b"battery staple").unwrap();

    // Removed: the store is as one that never had a passphrase.
    store.remove_protection().unwrap();
    drop(store);
    let mut store = Store::open(&path, SKEW).unwrap();
    assert!(!store.is_protected());
    let account = store.account().unwrap();
    assert_eq!((account.key, account.epoch_keys.get(3)), (key, Some(&epoch_three)));
    assert_eq!(store.device_secret().unwrap().public_key(), device_public);
    assert_eq!(found_in_files(&path, &secrets[..1]), secrets[..1], "in the clear again");
}

#[test]
fn a_store_protected_before_its_account_never_writes_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.db");
    let mut store = Store::open(&path, SKEW).unwrap();
    store.protect(b"pw", KdfParams::TEST).unwrap();
    let key = AccountKey::generate();
    let token = format!("lsd_{}", &*AccountKey::generate().to_base64());
    store.save_account(&account(&key, &token)).unwrap();
    let device_secret = store.device_secret().unwrap().to_base64().to_string();
    assert!(found_in_files(&path, &[key.to_base64().to_string(), token, device_secret]).is_empty());
    drop(store);
    let mut store = Store::open(&path, SKEW).unwrap();
    assert!(matches!(store.save_account(&account(&key, "x")), Err(StoreError::Locked)));
    store.unlock(b"pw").unwrap();
    assert_eq!(store.account().unwrap().key, key);
}

#[test]
fn a_store_without_a_passphrase_opens_as_before() {
    let (mut store, dir, key) = common::store();
    assert!(!store.is_protected());
    store.unlock(b"anything").unwrap();
    assert_eq!(store.account().unwrap().key, key);
    assert_eq!(store.kdf_params(), None);
    assert!(!store.status().unwrap().protected);
    store.remove_protection().unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join("client.db")).unwrap();
    let stored: String =
        conn.query_row("SELECT value FROM meta WHERE key = 'account_key'", [], |row| row.get(0)).unwrap();
    assert_eq!(stored, *key.to_base64(), "kept where it always was");
}

#[test]
fn a_process_that_opened_the_store_before_its_passphrase_changed_writes_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.db");
    let mut first = Store::open(&path, SKEW).unwrap();
    first.save_account(&account(&AccountKey::generate(), "token")).unwrap();
    let mut second = Store::open(&path, SKEW).unwrap();
    second.protect(b"pw", KdfParams::TEST).unwrap();
    // Written in the clear, the device key would undo the protection.
    let error = first.device_secret().err().unwrap().to_string();
    assert!(error.contains("another process"), "{error}");
    assert!(first.add_epoch_keys(&[(2, EpochKey::generate(), "other".into())]).is_err());

    second.protect(b"new", KdfParams::TEST).unwrap();
    let mut third = Store::open(&path, SKEW).unwrap();
    third.unlock(b"new").unwrap();
    third.protect(b"newer", KdfParams::TEST).unwrap();
    assert!(second.device_secret().err().unwrap().to_string().contains("another process"));
    assert!(third.device_secret().is_ok());
}
