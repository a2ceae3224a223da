use proptest::prelude::*;

use super::*;

fn sealed_for(epoch: u32) -> SealedFor<'static> {
    SealedFor { user_id: "u1", device_id: "d2", epoch }
}

#[test]
fn a_sealed_epoch_key_opens_only_for_its_recipient_device_and_epoch() {
    let account = AccountKey::generate();
    let phone = DeviceSecret::generate();
    let key = EpochKey::generate();
    let sealed = seal_epoch_key(&account, &phone.public_key(), &sealed_for(2), &key).unwrap();
    assert_eq!(sealed.len(), SEALED_KEY_BYTES);
    assert_eq!(open_epoch_key(&account, &phone, &sealed_for(2), &sealed).unwrap(), key);

    // Another device's private key, another epoch, device or user: refused.
    let stolen = DeviceSecret::generate();
    assert_eq!(open_epoch_key(&account, &stolen, &sealed_for(2), &sealed), Err(CryptoError::SealedKey));
    for other in
        [sealed_for(3), SealedFor { device_id: "d3", ..sealed_for(2) }, SealedFor { user_id: "u2", ..sealed_for(2) }]
    {
        assert_eq!(open_epoch_key(&account, &phone, &other, &sealed), Err(CryptoError::SealedKey), "{other:?}");
    }
    // A key made by someone without the account key (the server) is refused
    // even though it is sealed to the right public key.
    let forged = seal_epoch_key(&AccountKey::generate(), &phone.public_key(), &sealed_for(2), &key).unwrap();
    assert_eq!(open_epoch_key(&account, &phone, &sealed_for(2), &forged), Err(CryptoError::SealedKey));
    assert_eq!(open_epoch_key(&account, &phone, &sealed_for(2), &sealed[1..]), Err(CryptoError::SealedKey));
    // A low-order public key would make the shared secret predictable.
    assert_eq!(seal_epoch_key(&account, &[0; 32], &sealed_for(2), &key), Err(CryptoError::PublicKey));
}

#[test]
fn device_keys_verify_only_with_their_proof() {
    let account = AccountKey::generate();
    let device = DeviceSecret::generate();
    let public = device.public_key();
    let proof = device_key_proof(&account, "u1", "d1", &public);
    assert_eq!(verify_device_key(&account, "u1", "d1", &public, &proof).unwrap(), public);
    let other = DeviceSecret::generate().public_key();
    assert_eq!(verify_device_key(&account, "u1", "d1", &other, &proof), Err(CryptoError::DeviceProof));
    assert_eq!(verify_device_key(&account, "u1", "d2", &public, &proof), Err(CryptoError::DeviceProof));
    assert_eq!(
        verify_device_key(&AccountKey::generate(), "u1", "d1", &public, &proof),
        Err(CryptoError::DeviceProof),
        "the server cannot make a proof without the account key"
    );
    assert_eq!(verify_device_key(&account, "u1", "d1", &public[1..], &proof), Err(CryptoError::PublicKey));
}

#[test]
fn a_new_epoch_is_not_derivable_from_the_account_key() {
    let account = AccountKey::generate();
    let mut epochs = EpochKeys::default();
    let keyring = Keyring { account: &account, epochs: &epochs };
    let binding = Binding { user_id: "u1", record_id: "r1", collection: "notes", op: 1, key_epoch: 2 };
    assert_eq!(keyring.seal(&binding, b"x").unwrap_err(), CryptoError::NoEpochKey(2));
    epochs.insert(2, EpochKey::generate());
    assert_eq!(epochs.newest(), 2);
    let keyring = Keyring { account: &account, epochs: &epochs };
    let (nonce, ciphertext) = keyring.seal(&binding, b"after the revocation").unwrap();
    assert_eq!(keyring.open(&binding, &nonce, &ciphertext).unwrap().as_slice(), b"after the revocation");
    // What a revoked device holding the account key could try: the old derivation.
    assert_eq!(account.open(&binding, &nonce, &ciphertext), Err(CryptoError::Decrypt));
    // Epoch 1 stays the account key's: old changes still open.
    let old = Binding { key_epoch: 1, ..binding };
    let (nonce, ciphertext) = account.seal(&old, b"before");
    assert_eq!(keyring.open(&old, &nonce, &ciphertext).unwrap().as_slice(), b"before");
}

#[test]
fn secrets_round_trip_as_text_and_stay_hidden() {
    let secret = DeviceSecret::generate();
    assert_eq!(DeviceSecret::from_base64(&secret.to_base64()).unwrap().public_key(), secret.public_key());
    assert_eq!(format!("{secret:?}"), "DeviceSecret(<hidden>)");
    let key = EpochKey::generate();
    assert_eq!(EpochKey::from_base64(&key.to_base64()).unwrap(), key);
    assert_eq!(format!("{key:?}"), "EpochKey(<hidden>)");
    assert_eq!(EpochKey::from_base64("short"), Err(CryptoError::KeyFormat));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sealing_round_trips_and_any_flipped_bit_is_refused(
        epoch in 2u32..1_000_000,
        device_id in "[a-z0-9-]{1,40}",
        flip in 0usize..SEALED_KEY_BYTES * 8,
    ) {
        let account = AccountKey::generate();
        let recipient = DeviceSecret::generate();
        let key = EpochKey::generate();
        let sealed_for = SealedFor { user_id: "u1", device_id: &device_id, epoch };
        let mut sealed = seal_epoch_key(&account, &recipient.public_key(), &sealed_for, &key).unwrap();
        prop_assert_eq!(sealed.len(), SEALED_KEY_BYTES);
        prop_assert_eq!(open_epoch_key(&account, &recipient, &sealed_for, &sealed).unwrap(), key);
        sealed[flip / 8] ^= 1 << (flip % 8);
        prop_assert_eq!(open_epoch_key(&account, &recipient, &sealed_for, &sealed), Err(CryptoError::SealedKey));
    }
}
