//! The local store on its own: clock bounds, problems, resync, crash-safe order.

use std::time::Duration;

use lockstep_client::{
    crypto::AccountKey,
    hlc,
    record::{ChangePayload, RecordState, Stamp},
    store::{Account, Incoming, ProblemKind, Store},
};
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

fn store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("client.db"), Duration::from_secs(60)).unwrap();
    store
        .save_account(&Account {
            server: "http://127.0.0.1:1".into(),
            user_id: "user".into(),
            device_id: "me".into(),
            device_name: "me".into(),
            token: Zeroizing::new("token".into()),
            key: AccountKey::generate(),
            key_epoch: 1,
        })
        .unwrap();
    (store, dir)
}

fn fields(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

fn remote(offset: i64, record_id: &str, hlc: u64, value: Value) -> Incoming {
    let mut state = RecordState::default();
    state.set(&fields(value), &Stamp { hlc, device: "other".into() });
    Incoming {
        offset,
        record_id: record_id.into(),
        collection: "items".into(),
        origin_device_id: "other".into(),
        content: Ok(ChangePayload::new(state)),
    }
}

fn now_hlc() -> u64 {
    hlc::from_physical_ms(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64)
}

#[test]
fn a_change_from_too_far_in_the_future_is_a_problem_not_a_winner() {
    let (mut store, _dir) = store();
    let local = store.put("items", Some("r1"), &fields(json!({"x": "mine"}))).unwrap();
    let far = now_hlc() + hlc::from_physical_ms(3_600_000);
    let applied = store.apply(&[remote(0, "r1", far, json!({"x": "from the future"}))]).unwrap();
    assert_eq!((applied.changes, applied.problems), (1, 1));
    assert_eq!(store.get("r1").unwrap().unwrap().state, local.state, "not applied");
    assert_eq!(store.cursor().unwrap(), Some(1), "the log moves on");
    let problems = store.problems().unwrap();
    assert_eq!(problems[0].kind, "clock-ahead");
    assert!(problems[0].detail.contains("ahead"), "{}", problems[0].detail);

    // Within the bound it applies, and the local clock moves past it.
    let near = now_hlc() + hlc::from_physical_ms(30_000);
    store.apply(&[remote(1, "r1", near, json!({"x": "remote"}))]).unwrap();
    assert_eq!(store.get("r1").unwrap().unwrap().state.visible().unwrap()["x"], "remote");
    let edited = store.put("items", Some("r1"), &fields(json!({"x": "mine again"}))).unwrap();
    assert!(edited.state.fields["x"].stamp.hlc > near, "a local edit after it wins");
}

#[test]
fn undecryptable_changes_are_kept_as_problems() {
    let (mut store, _dir) = store();
    let incoming = Incoming {
        offset: 7,
        record_id: "r9".into(),
        collection: "items".into(),
        origin_device_id: "other".into(),
        content: Err((ProblemKind::Undecryptable, "does not decrypt".into())),
    };
    store.apply(&[incoming.clone(), incoming]).unwrap();
    assert_eq!(store.problems().unwrap().len(), 1, "once per offset");
    assert!(store.get("r9").unwrap().is_none());
    assert_eq!(store.status().unwrap().problems, 1);
}

#[test]
fn applying_the_same_changes_again_changes_nothing() {
    let (mut store, _dir) = store();
    let batch =
        [remote(0, "a", 5, json!({"x": 1})), remote(1, "b", 6, json!({"y": 2})), remote(2, "a", 7, json!({"z": 3}))];
    store.apply(&batch).unwrap();
    let digest = store.digest().unwrap();
    let again = store.apply(&batch).unwrap();
    assert_eq!(again.changed_records, 0);
    assert_eq!(store.digest().unwrap(), digest);
    assert_eq!(store.get("a").unwrap().unwrap().state.visible().unwrap(), fields(json!({"x": 1, "z": 3})));
}

#[test]
fn resync_rebuilds_from_the_log_start_and_keeps_unsynced_edits() {
    let (mut store, _dir) = store();
    store.apply(&[remote(0, "old", 5, json!({"x": 1})), remote(1, "kept", 6, json!({"y": 2}))]).unwrap();
    let pending = store.put("items", Some("kept"), &fields(json!({"mine": true}))).unwrap();
    store.put("items", Some("new"), &fields(json!({"n": 1}))).unwrap();
    store.resync(40).unwrap();
    assert_eq!(store.cursor().unwrap(), Some(40));
    assert!(store.get("old").unwrap().is_none(), "server-derived state is dropped");
    assert_eq!(store.get("kept").unwrap().unwrap().state, pending.state, "the unsynced edit stays, whole");
    assert!(store.get("new").unwrap().is_some());
    assert_eq!(store.outbox_len().unwrap(), 2, "and is still to be pushed");
    // The rebuilt log brings the rest back.
    store.apply(&[remote(40, "old", 8, json!({"x": 1}))]).unwrap();
    assert!(store.get("old").unwrap().unwrap().state.is_live());
}

#[test]
fn the_outbox_is_ordered_and_only_acknowledged_changes_leave_it() {
    let (mut store, _dir) = store();
    for n in 0..5 {
        store.put("items", None, &fields(json!({"n": n}))).unwrap();
    }
    let batch = store.outbox_batch(3).unwrap();
    assert_eq!(batch.len(), 3);
    assert!(batch.windows(2).all(|pair| pair[0].seq < pair[1].seq && pair[0].hlc < pair[1].hlc));
    store.outbox_done(&[batch[0].seq, batch[2].seq]).unwrap();
    let rest: Vec<i64> = store.outbox_batch(10).unwrap().iter().map(|entry| entry.seq).collect();
    assert_eq!(rest.len(), 3);
    assert_eq!(rest[0], batch[1].seq);
    store.outbox_reject(batch[1].seq, "refused").unwrap();
    assert_eq!(store.outbox_len().unwrap(), 2);
    assert_eq!(store.status().unwrap().outbox_rejected, 1);
}
