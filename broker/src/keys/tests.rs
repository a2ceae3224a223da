use std::time::Duration;

use super::*;
use crate::{accounts::Accounts, both_backends, store::testing::TestStore};

struct Fixture {
    accounts: Accounts,
    keys: KeyDirectory,
}

async fn fixture(store: &TestStore) -> Fixture {
    let accounts = Accounts::open(store.store.clone(), Duration::from_secs(60)).await.unwrap();
    let keys = KeyDirectory::open(store.store.clone()).await.unwrap();
    Fixture { accounts, keys }
}

impl Fixture {
    async fn pair(&self, issuer: &AuthedDevice, name: &str) -> AuthedDevice {
        let (ticket, _) = self.accounts.create_pairing_ticket(issuer).await.unwrap();
        let new = self.accounts.redeem_pairing_ticket(&ticket, name.into()).await.unwrap();
        self.accounts.authenticate(&new.token).unwrap()
    }
}

fn sealed(device: &AuthedDevice, epoch: u32) -> SealedKey {
    SealedKey {
        device_id: device.device_id.to_string(),
        epoch,
        sealed: vec![epoch as u8; SEALED_KEY_BYTES],
        sealed_by_device_id: String::new(),
    }
}

fn key(byte: u8) -> (Vec<u8>, Vec<u8>) {
    (vec![byte; PUBLIC_KEY_BYTES], vec![byte; PROOF_BYTES])
}

both_backends!(a_rotation_covers_exactly_the_active_devices_with_keys, |store: TestStore| async move {
    let f = fixture(&store).await;
    let created = f.accounts.create_account("u1".into(), "laptop".into()).await.unwrap();
    let laptop = f.accounts.authenticate(&created.token).unwrap();
    let phone = f.pair(&laptop, "phone").await;
    let stolen = f.pair(&laptop, "stolen").await;
    for (device, byte) in [(&laptop, 1), (&phone, 2), (&stolen, 3)] {
        let (public_key, proof) = key(byte);
        assert_eq!(f.keys.register(device, public_key, proof).await.unwrap(), 1);
    }
    // The same key again is fine; another key is refused.
    let (public_key, proof) = key(1);
    f.keys.register(&laptop, public_key, proof).await.unwrap();
    let (public_key, proof) = key(9);
    assert!(matches!(f.keys.register(&laptop, public_key, proof).await, Err(KeysError::Precondition(_))));
    assert!(matches!(f.keys.register(&laptop, vec![0; 31], vec![0; 32]).await, Err(KeysError::Invalid(_))));

    assert!(!f.keys.list("u1").await.unwrap().rotation_due);
    f.accounts.revoke_device("u1", &stolen.device_id).await.unwrap();
    let listed = f.keys.list("u1").await.unwrap();
    assert!(listed.rotation_due);
    assert_eq!(listed.current_epoch, 1);
    let ids: Vec<_> = listed.devices.iter().map(|device| device.device_id.as_str()).collect();
    assert_eq!(ids, [&*laptop.device_id, &*phone.device_id], "revoked devices are not listed");

    // Including the revoked device, skipping an epoch: refused.
    let refused = [
        (2, vec![sealed(&laptop, 2), sealed(&phone, 2), sealed(&stolen, 2)]),
        (3, vec![sealed(&laptop, 3), sealed(&phone, 3)]),
    ];
    for (epoch, keys) in refused {
        assert!(matches!(f.keys.start_epoch(&laptop, epoch, keys).await, Err(KeysError::Precondition(_))));
    }
    // Without a copy for the device that starts it: refused.
    assert!(matches!(f.keys.start_epoch(&laptop, 2, vec![sealed(&phone, 2)]).await, Err(KeysError::Invalid(_))));
    let wrong_size = SealedKey { sealed: vec![0; SEALED_KEY_BYTES + 1], ..sealed(&phone, 2) };
    assert!(matches!(
        f.keys.start_epoch(&laptop, 2, vec![sealed(&laptop, 2), wrong_size]).await,
        Err(KeysError::Invalid(_))
    ));
    assert_eq!(f.keys.current_epoch(&laptop.user_id).await.unwrap(), 1);

    assert_eq!(f.keys.start_epoch(&laptop, 2, vec![sealed(&laptop, 2), sealed(&phone, 2)]).await.unwrap(), 2);
    assert_eq!(f.keys.current_epoch(&laptop.user_id).await.unwrap(), 2);
    assert!(!f.keys.list("u1").await.unwrap().rotation_due, "the rotation covered the revocation");
    // The same epoch twice (two devices rotating at once): the second is refused.
    assert!(matches!(
        f.keys.start_epoch(&phone, 2, vec![sealed(&laptop, 2), sealed(&phone, 2)]).await,
        Err(KeysError::Precondition(_))
    ));

    let got = f.keys.get(&phone, 1, Vec::new()).await.unwrap();
    assert_eq!(got.current_epoch, 2);
    assert_eq!(got.sealed_keys.len(), 1);
    assert_eq!(got.sealed_keys[0].sealed, sealed(&phone, 2).sealed);
    assert_eq!(got.sealed_keys[0].sealed_by_device_id, &*laptop.device_id);
    assert!(f.keys.get(&phone, 2, Vec::new()).await.unwrap().sealed_keys.is_empty());

    // Pushes under epoch 1 are stale now.
    assert!(f.keys.check_push_epochs(&phone, [2, 2].into_iter()).await.is_ok());
    assert!(matches!(f.keys.check_push_epochs(&phone, [2, 1].into_iter()).await, Err(KeysError::Precondition(_))));
});

both_backends!(devices_that_come_later_get_shared_copies_within_their_account, |store: TestStore| async move {
    let f = fixture(&store).await;
    let created = f.accounts.create_account("u1".into(), "laptop".into()).await.unwrap();
    let laptop = f.accounts.authenticate(&created.token).unwrap();
    let (public_key, proof) = key(1);
    f.keys.register(&laptop, public_key, proof).await.unwrap();
    f.keys.start_epoch(&laptop, 2, vec![sealed(&laptop, 2)]).await.unwrap();
    f.keys.start_epoch(&laptop, 3, vec![sealed(&laptop, 3)]).await.unwrap();

    let tablet = f.pair(&laptop, "tablet").await;
    let (public_key, proof) = key(2);
    f.keys.register(&tablet, public_key, proof).await.unwrap();
    let listed = f.keys.list("u1").await.unwrap();
    let entry = listed.devices.iter().find(|device| device.device_id == *tablet.device_id).unwrap();
    assert_eq!(entry.missing_epochs, [2, 3]);
    assert_eq!(entry.public_key, vec![2; PUBLIC_KEY_BYTES]);

    // Another account's device is never a recipient.
    let other = f.accounts.create_account("u2".into(), "laptop".into()).await.unwrap();
    let other = f.accounts.authenticate(&other.token).unwrap();
    let (public_key, proof) = key(3);
    f.keys.register(&other, public_key, proof).await.unwrap();
    assert!(matches!(f.keys.share(&laptop, vec![sealed(&other, 2)]).await, Err(KeysError::Precondition(_))));
    assert!(matches!(f.keys.share(&laptop, vec![sealed(&tablet, 4)]).await, Err(KeysError::Precondition(_))));
    assert!(f.keys.get(&other, 0, Vec::new()).await.unwrap().sealed_keys.is_empty());

    assert_eq!(f.keys.share(&laptop, vec![sealed(&tablet, 2), sealed(&tablet, 3)]).await.unwrap(), 2);
    assert_eq!(f.keys.share(&laptop, vec![sealed(&tablet, 2)]).await.unwrap(), 0, "kept, not replaced");
    let got = f.keys.get(&tablet, 0, Vec::new()).await.unwrap();
    assert_eq!(got.sealed_keys.iter().map(|key| key.epoch).collect::<Vec<_>>(), [2, 3]);
    assert!(!got.more);
    let listed = f.keys.list("u1").await.unwrap();
    assert!(listed.devices.iter().all(|device| device.missing_epochs.is_empty()));
    assert!(matches!(f.keys.share(&laptop, Vec::new()).await, Err(KeysError::Invalid(_))));
});

// A client that knows a device is revoked (whatever the server's list says)
// leaves it out of a new epoch: the epoch starts, and the device is listed as
// missing it.
both_backends!(a_new_epoch_may_leave_out_an_active_device, |store: TestStore| async move {
    let f = fixture(&store).await;
    let created = f.accounts.create_account("u1".into(), "laptop".into()).await.unwrap();
    let laptop = f.accounts.authenticate(&created.token).unwrap();
    let phone = f.pair(&laptop, "phone").await;
    for (device, byte) in [(&laptop, 1), (&phone, 2)] {
        let (public_key, proof) = key(byte);
        f.keys.register(device, public_key, proof).await.unwrap();
    }
    assert_eq!(f.keys.start_epoch(&laptop, 2, vec![sealed(&laptop, 2)]).await.unwrap(), 2);
    let listed = f.keys.list("u1").await.unwrap();
    let entry = listed.devices.iter().find(|device| device.device_id == *phone.device_id).unwrap();
    assert_eq!(entry.missing_epochs, [2]);
    assert!(f.keys.get(&phone, 0, Vec::new()).await.unwrap().sealed_keys.is_empty());
});

// One bad copy does not block an epoch for its recipient: once it reports
// the copy unopened, the epoch is missing again and a later share replaces it.
both_backends!(a_copy_the_recipient_cannot_open_is_replaced_by_a_later_share, |store: TestStore| async move {
    let f = fixture(&store).await;
    let created = f.accounts.create_account("u1".into(), "laptop".into()).await.unwrap();
    let laptop = f.accounts.authenticate(&created.token).unwrap();
    let phone = f.pair(&laptop, "phone").await;
    let tablet = f.pair(&laptop, "tablet").await;
    for (device, byte) in [(&laptop, 1), (&phone, 2), (&tablet, 3)] {
        let (public_key, proof) = key(byte);
        f.keys.register(device, public_key, proof).await.unwrap();
    }
    let bad = SealedKey { sealed: vec![0xBA; SEALED_KEY_BYTES], ..sealed(&phone, 2) };
    f.keys.start_epoch(&laptop, 2, vec![sealed(&laptop, 2), bad.clone()]).await.unwrap();
    assert_eq!(f.keys.share(&tablet, vec![sealed(&phone, 2)]).await.unwrap(), 0, "a copy is there already");
    assert_eq!(f.keys.get(&phone, 0, Vec::new()).await.unwrap().sealed_keys[0].sealed, bad.sealed);

    // Only the recipient's report forgets its copy; another device's is untouched.
    let reported = f.keys.get(&phone, 0, vec![2]).await.unwrap();
    assert!(reported.sealed_keys.is_empty(), "the reported copy is gone");
    assert_eq!(f.keys.get(&laptop, 0, Vec::new()).await.unwrap().sealed_keys.len(), 1);
    let listed = f.keys.list("u1").await.unwrap();
    let entry = listed.devices.iter().find(|device| device.device_id == *phone.device_id).unwrap();
    assert_eq!(entry.missing_epochs, [2]);

    assert_eq!(f.keys.share(&tablet, vec![sealed(&phone, 2)]).await.unwrap(), 1);
    let got = f.keys.get(&phone, 0, Vec::new()).await.unwrap();
    assert_eq!(got.sealed_keys[0].sealed, sealed(&phone, 2).sealed);
    assert_eq!(got.sealed_keys[0].sealed_by_device_id, &*tablet.device_id);
    assert!(matches!(f.keys.get(&phone, 0, vec![2; MAX_EPOCHS_PER_REQUEST + 1]).await, Err(KeysError::Invalid(_))));
});
