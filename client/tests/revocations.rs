//! Revocations and epochs as the log tells them (`store::revocations`): a
//! control record makes every device refuse the revoked device, by id and by
//! key, for good; a change under an epoch older than the one in force at its
//! offset is flagged and never applied.

mod common;

use common::{fields, sealed_remote, state, store};
use lockstep_client::{
    record::ChangePayload,
    store::{Incoming, REVOCATIONS_COLLECTION, RevokedDevice, Store},
};
use serde_json::json;

/// A change from device "other" under `key_epoch` (the store trusts the sync layer's decryption).
fn under_epoch(offset: i64, record_id: &str, key_epoch: u32, text: &str) -> Incoming {
    let key = lockstep_client::crypto::AccountKey::generate();
    let mut incoming = sealed_remote(&key, offset, record_id, 10 + offset as u64, json!({ "text": text }));
    incoming.sealed.as_mut().unwrap().key_epoch = key_epoch;
    incoming
}

fn control_record(store: &mut Store) -> Incoming {
    let phone = RevokedDevice { device_id: "phone".into(), public_key: vec![7; 32], revoked_in_epoch: 1 };
    store.record_revocation(&phone).unwrap();
    let record = store.get("revoked:phone").unwrap().expect("the control record is a record");
    assert_eq!(record.collection, REVOCATIONS_COLLECTION);
    Incoming {
        offset: 0,
        record_id: record.record_id,
        collection: record.collection,
        origin_device_id: "laptop".into(),
        content: Ok(ChangePayload::new(record.state)),
        sealed: None,
    }
}

#[test]
fn a_control_record_revokes_by_id_and_by_key_for_good() {
    let (mut laptop, _dir, _) = store();
    let incoming = control_record(&mut laptop);
    assert!(laptop.is_revoked("phone", &[]).unwrap(), "the revoking device refuses at once");
    assert_eq!(laptop.outbox_len().unwrap(), 1, "the record is queued for the other devices");

    let (mut tablet, _dir2, _) = store();
    assert!(!tablet.is_revoked("phone", &[7; 32]).unwrap());
    assert_eq!(tablet.revoked_in_epoch().unwrap(), None);
    tablet.apply(std::slice::from_ref(&incoming)).unwrap();
    assert!(tablet.is_revoked("phone", &[]).unwrap());
    assert!(tablet.is_revoked("phone-again", &[7; 32]).unwrap(), "its key under another id");
    assert!(!tablet.is_revoked("laptop", &[8; 32]).unwrap());
    assert_eq!(tablet.revoked_in_epoch().unwrap(), Some(1));

    // A later change to the record (a delete, other fields) takes nothing back.
    let mut emptied =
        state(u64::MAX / 2, "laptop", json!({"device_id": "phone", "public_key": "", "revoked_in_epoch": 0}));
    emptied.delete(&lockstep_client::record::Stamp { hlc: u64::MAX / 2 + 1, device: "laptop".into() });
    let later = Incoming { offset: 1, content: Ok(ChangePayload::new(emptied)), ..incoming };
    tablet.apply(&[later]).unwrap();
    assert!(tablet.is_revoked("phone-again", &[7; 32]).unwrap());
    assert_eq!(tablet.revoked_in_epoch().unwrap(), Some(1));

    // Users do not write or see the reserved collection.
    assert!(tablet.put(REVOCATIONS_COLLECTION, None, &fields(json!({"device_id": "laptop"}))).is_err());
    assert!(laptop.list(None, true).unwrap().is_empty());
    assert_eq!(laptop.list(Some(REVOCATIONS_COLLECTION), false).unwrap().len(), 1);
}

#[test]
fn a_change_under_an_older_epoch_after_a_newer_one_started_is_flagged_not_applied() {
    let (mut store, _dir, _) = store();
    store.apply(&[under_epoch(0, "r1", 1, "before"), under_epoch(1, "r2", 2, "rotated")]).unwrap();
    let applied = store.apply(&[under_epoch(2, "r3", 1, "injected"), under_epoch(3, "r4", 2, "fine")]).unwrap();
    assert_eq!((applied.changes, applied.problems), (2, 1));
    assert!(store.get("r3").unwrap().is_none(), "never applied");
    assert!(store.get("r4").unwrap().is_some());
    let problems = store.problems().unwrap();
    assert_eq!(problems.len(), 1);
    assert_eq!((problems[0].offset, problems[0].kind.as_str()), (2, "stale-epoch"));
    assert!(problems[0].detail.contains("epoch 1 after epoch 2"), "{}", problems[0].detail);
    assert_eq!(store.status().unwrap().problems, 1);

    // An injected change to a record held already changes nothing either.
    let applied = store.apply(&[under_epoch(4, "r1", 1, "overwritten")]).unwrap();
    assert_eq!(applied.problems, 1);
    assert_eq!(store.get("r1").unwrap().unwrap().state.visible().unwrap()["text"], "before");

    // Redelivered from the log start (a rebuild): the old change before the rotation still applies.
    let applied = store.apply(&[under_epoch(0, "r1", 1, "before")]).unwrap();
    assert_eq!(applied.problems, 0);
    // A change the sync layer could not open does not start an epoch.
    let (mut other, _dir2, _) = common::store();
    let mut forged = under_epoch(0, "f", 9, "forged");
    forged.content = Err((lockstep_client::store::ProblemKind::Undecryptable, "does not decrypt".into()));
    other.apply(&[forged, under_epoch(1, "ok", 1, "still epoch 1")]).unwrap();
    assert!(other.get("ok").unwrap().is_some());
}
