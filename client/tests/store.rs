//! The local store on its own: clock bounds, deferred changes, problems, gaps,
//! the sealed outbox, crash-safe order. Resync and repair: `tests/resync.rs`.

mod common;

use std::time::Duration;

use common::{fields, now_hlc, remote, sealed_remote, store, store_with};
use lockstep_client::{
    hlc,
    record::{ChangePayload, PayloadError, RecordState},
    store::{Incoming, ProblemKind, Store, StoreError, open_change},
};
use serde_json::json;

#[test]
fn a_change_from_too_far_in_the_future_waits_and_applies_once_the_clock_catches_up() {
    // This device's clock runs two hours behind; the bound is a minute.
    let (mut store, _dir, key) = store_with(Duration::from_secs(60));
    store.set_clock_offset_ms(-2 * 3_600_000);
    let local = store.put("items", Some("r1"), &fields(json!({"x": "mine"}))).unwrap();
    let ahead = now_hlc();
    let applied = store.apply(&[sealed_remote(&key, 0, "r1", ahead, json!({"x": "from the future"}))]).unwrap();
    assert_eq!((applied.changes, applied.deferred, applied.problems), (1, 1, 0));
    assert_eq!(store.get("r1").unwrap().unwrap().state, local.state, "not applied yet");
    assert_eq!(store.cursor().unwrap(), Some(1), "the log moves on");
    let deferred = store.deferred().unwrap();
    assert_eq!((deferred.len(), deferred[0].kind.as_str(), deferred[0].offset), (1, "clock-ahead", 0));
    assert!(deferred[0].reason.contains("ahead"), "{}", deferred[0].reason);
    assert_eq!(store.status().unwrap().deferred, 1);
    assert!(store.problems().unwrap().is_empty(), "waiting is not a problem");

    // What follows is not blocked.
    store.apply(&[remote(1, "r2", hlc::from_physical_ms(1), json!({"y": 1}))]).unwrap();
    assert!(store.get("r2").unwrap().is_some());
    assert_eq!(store.retry_deferred().unwrap().from_deferred, 0, "still ahead");

    // The clock catches up: the next retry applies it, and it is gone from `deferred`.
    store.set_clock_offset_ms(0);
    let retried = store.retry_deferred().unwrap();
    assert_eq!((retried.from_deferred, retried.changed_records), (1, 1));
    assert_eq!(store.get("r1").unwrap().unwrap().state.visible().unwrap()["x"], "from the future");
    assert!(store.deferred().unwrap().is_empty());
    let edited = store.put("items", Some("r1"), &fields(json!({"x": "mine again"}))).unwrap();
    assert!(edited.state.fields["x"].stamp.hlc > ahead, "a local edit after it wins");
}

#[test]
fn every_apply_retries_what_waits() {
    let (mut store, _dir, key) = store_with(Duration::from_secs(60));
    store.set_clock_offset_ms(-3_600_000);
    store.apply(&[sealed_remote(&key, 0, "r1", now_hlc(), json!({"x": 1}))]).unwrap();
    store.set_clock_offset_ms(0);
    let applied = store.apply(&[remote(1, "r2", 5, json!({"y": 1}))]).unwrap();
    assert_eq!(applied.from_deferred, 1);
    assert!(store.get("r1").unwrap().is_some());
}

fn reads_version_2(bytes: &[u8]) -> Result<ChangePayload, PayloadError> {
    #[derive(serde::Deserialize)]
    struct Any {
        v: u32,
        state: RecordState,
    }
    let any: Any = serde_json::from_slice(bytes).map_err(|error| PayloadError::Malformed(error.to_string()))?;
    match any.v {
        1 | 2 => Ok(ChangePayload::new(any.state)),
        found => Err(PayloadError::UnknownVersion { found, supported: 2 }),
    }
}

#[test]
fn a_newer_payload_version_waits_until_the_client_reads_it() {
    let (mut store, _dir, key) = store();
    let mut change = sealed_remote(&key, 0, "r1", 5, json!({"x": "v2"}));
    // The same change as a newer client writes it.
    let state = change.content.clone().unwrap().state;
    let plaintext = serde_json::to_vec(&json!({"v": 2, "state": state})).unwrap();
    let sealed = common::seal(&key, "r1", &plaintext, 5);
    let account = store.account().unwrap();
    change.content = open_change(&account, "r1", "items", &sealed, store.payload_reader());
    change.sealed = Some(sealed);
    assert!(matches!(change.content, Err((ProblemKind::UnknownVersion, _))), "{:?}", change.content);

    let applied = store.apply(&[change]).unwrap();
    assert_eq!((applied.deferred, applied.problems), (1, 0));
    assert_eq!(store.cursor().unwrap(), Some(1));
    assert!(store.get("r1").unwrap().is_none());
    let deferred = store.deferred().unwrap();
    assert_eq!(deferred[0].kind, "unknown-version");
    assert!(deferred[0].reason.contains("version 2"), "{}", deferred[0].reason);
    assert_eq!(store.retry_deferred().unwrap().from_deferred, 0, "this client still reads only v1");

    // The client is upgraded: it reads v2 now.
    store.set_payload_reader(reads_version_2);
    assert_eq!(store.retry_deferred().unwrap().from_deferred, 1);
    assert_eq!(store.get("r1").unwrap().unwrap().state.visible().unwrap()["x"], "v2");
    assert_eq!(store.status().unwrap().deferred, 0);
}

#[test]
fn a_local_edit_wins_over_a_stamp_far_ahead_of_the_local_clock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.db");
    let far = now_hlc() + hlc::from_physical_ms(5 * 3_600_000);
    {
        let (mut store, _, _) = common::store_at(&path, Duration::from_secs(7 * 86_400));
        store.apply(&[remote(0, "r1", far, json!({"x": "from a fast clock"}))]).unwrap();
    }
    // Later this device's clock state says otherwise (a smaller bound, a clock
    // reset): the record still holds the stamp five hours ahead.
    rusqlite::Connection::open(&path).unwrap().execute("UPDATE meta SET value = '0' WHERE key = 'hlc'", []).unwrap();
    let mut store = Store::open(&path, Duration::from_secs(60)).unwrap();
    let edited = store.put("items", Some("r1"), &fields(json!({"x": "mine"}))).unwrap();
    assert!(edited.state.fields["x"].stamp.hlc > far, "the user's own edit must not lose");
    assert_eq!(edited.state.visible().unwrap()["x"], "mine");
    let queued = store.outbox_batch(10).unwrap();
    assert!(queued[0].hlc > far);
}

#[test]
fn undecryptable_changes_are_kept_as_problems() {
    let (mut store, _dir, _) = store();
    let incoming = Incoming {
        offset: 7,
        record_id: "r9".into(),
        collection: "items".into(),
        origin_device_id: "other".into(),
        content: Err((ProblemKind::Undecryptable, "does not decrypt".into())),
        sealed: None,
    };
    store.apply(std::slice::from_ref(&incoming)).unwrap();
    store.apply(&[incoming]).unwrap();
    assert_eq!(store.problems().unwrap().len(), 1, "once per offset");
    assert!(store.get("r9").unwrap().is_none());
    assert_eq!(store.status().unwrap().problems, 1);
}

#[test]
fn an_undecodable_record_is_filed_and_passed() {
    let (mut store, _dir, _) = store();
    store.apply(&[remote(0, "a", 5, json!({"x": 1}))]).unwrap();
    let undecodable = Incoming {
        offset: 1,
        record_id: String::new(),
        collection: String::new(),
        origin_device_id: String::new(),
        content: Err((ProblemKind::Undecodable, "not a change envelope: unknown schema id 9".into())),
        sealed: None,
    };
    let applied = store.apply(&[undecodable, remote(2, "b", 6, json!({"y": 2}))]).unwrap();
    assert_eq!((applied.changes, applied.problems), (2, 1));
    assert_eq!(store.cursor().unwrap(), Some(3), "moved past it");
    let problems = store.problems().unwrap();
    assert_eq!((problems[0].offset, problems[0].kind.as_str()), (1, "undecodable"));
    assert!(problems[0].detail.contains("unknown schema id 9"));
    assert!(store.get("b").unwrap().is_some());
}

#[test]
fn a_gap_is_refused_whole_and_reported() {
    let (mut store, _dir, _) = store();
    store.apply(&[remote(0, "a", 5, json!({"x": 1})), remote(1, "b", 6, json!({"y": 1}))]).unwrap();
    // The server skips offset 2.
    let error = store.apply(&[remote(3, "c", 7, json!({"z": 1}))]).unwrap_err();
    assert!(matches!(error, StoreError::Gap { expected: 2, found: 3 }), "{error}");
    assert!(error.is_transient());
    assert_eq!(store.cursor().unwrap(), Some(2), "the cursor stays");
    assert!(store.get("c").unwrap().is_none(), "nothing applied");
    // A hole inside a batch: nothing of it applies either.
    let error = store.apply(&[remote(2, "d", 8, json!({"w": 1})), remote(4, "e", 9, json!({"v": 1}))]).unwrap_err();
    assert!(matches!(error, StoreError::Gap { expected: 3, found: 4 }), "{error}");
    assert!(store.get("d").unwrap().is_none());
    assert_eq!(store.cursor().unwrap(), Some(2));
    let problems = store.problems().unwrap();
    assert_eq!(problems.iter().filter(|problem| problem.kind == "gap").count(), 2, "{problems:?}");
    assert!(problems[0].detail.contains("expected offset 2"), "{}", problems[0].detail);
    // Redelivered offsets are merged again, harmlessly; the cursor never goes back.
    store.apply(&[remote(1, "b", 6, json!({"y": 1})), remote(2, "d", 8, json!({"w": 1}))]).unwrap();
    assert_eq!(store.cursor().unwrap(), Some(3));
}

#[test]
fn applying_the_same_changes_again_changes_nothing() {
    let (mut store, _dir, _) = store();
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
fn the_outbox_is_ordered_and_only_acknowledged_changes_leave_it() {
    let (mut store, _dir, _) = store();
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

#[test]
fn a_change_is_sealed_once_and_every_retry_sends_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.db");
    let (mut store, _, _) = common::store_at(&path, Duration::from_secs(60));
    let record = store.put("items", Some("r1"), &fields(json!({"x": 1}))).unwrap();
    assert!(store.outbox_batch(10).unwrap()[0].sealed.is_none(), "not sealed before its first push");
    let first = store.sealed_outbox_batch(10).unwrap();
    let again = store.sealed_outbox_batch(10).unwrap();
    assert_eq!(first[0].1, again[0].1, "same nonce and ciphertext on a retry");
    assert_eq!(first[0].0.change_id, again[0].0.change_id);
    drop(store);
    // After a crash (the answer to the first push lost), the same bytes again.
    let mut store = Store::open(&path, Duration::from_secs(60)).unwrap();
    let after_crash = store.sealed_outbox_batch(10).unwrap();
    assert_eq!(after_crash[0].1, first[0].1);
    assert_eq!(after_crash[0].0.change_id, first[0].0.change_id);
    // And they are the change.
    let (entry, sealed) = &after_crash[0];
    let account = store.account().unwrap();
    let payload = open_change(&account, &entry.record_id, &entry.collection, sealed, ChangePayload::decode).unwrap();
    assert_eq!(payload.state, record.state);
    assert_eq!((sealed.op, sealed.hlc, sealed.key_epoch), (entry.op, entry.hlc, 1));
}

#[test]
fn a_store_from_before_sealing_migrates_and_seals_on_its_next_push() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let key = lockstep_client::crypto::AccountKey::generate();
    {
        // The schema and an unsynced edit as the first release wrote them.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE records (record_id TEXT PRIMARY KEY, collection TEXT NOT NULL, state TEXT NOT NULL,
                                   updated_hlc INTEGER NOT NULL);
             CREATE TABLE mirror (record_id TEXT PRIMARY KEY, collection TEXT NOT NULL, state TEXT NOT NULL,
                                  offset INTEGER NOT NULL);
             CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, change_id TEXT NOT NULL UNIQUE,
                                  record_id TEXT NOT NULL, collection TEXT NOT NULL, op INTEGER NOT NULL,
                                  hlc INTEGER NOT NULL, state TEXT NOT NULL, rejected TEXT);
             CREATE TABLE problems (offset INTEGER PRIMARY KEY, record_id TEXT NOT NULL, collection TEXT NOT NULL,
                                    origin_device_id TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL,
                                    seen_at_ms INTEGER NOT NULL);",
        )
        .unwrap();
        for (name, value) in [
            ("user_id", "user"),
            ("server", "http://127.0.0.1:1"),
            ("device_id", "me"),
            ("device_name", "me"),
            ("device_token", "token"),
            ("account_key", &key.to_base64()),
            ("key_epoch", "1"),
            ("cursor", "4"),
        ] {
            conn.execute("INSERT INTO meta (key, value) VALUES (?1, ?2)", [name, value]).unwrap();
        }
        let state = r#"{"fields":{"x":{"value":1,"stamp":{"hlc":77,"device":"me"}}}}"#;
        conn.execute("INSERT INTO records VALUES ('r1', 'items', ?1, 77)", [state]).unwrap();
        conn.execute(
            "INSERT INTO outbox (change_id, record_id, collection, op, hlc, state) VALUES ('c1', 'r1', 'items', 1, 77, ?1)",
            [state],
        )
        .unwrap();
    }
    let mut store = Store::open(&path, Duration::from_secs(60)).unwrap();
    assert_eq!(store.cursor().unwrap(), Some(4));
    let old = store.outbox_batch(10).unwrap();
    assert_eq!((old.len(), old[0].change_id.as_str()), (1, "c1"));
    assert!(old[0].sealed.is_none());
    let sealed = store.sealed_outbox_batch(10).unwrap();
    drop(store);
    let mut store = Store::open(&path, Duration::from_secs(60)).unwrap();
    assert_eq!(store.outbox_batch(10).unwrap()[0].sealed.as_ref(), Some(&sealed[0].1), "stored sealed");
    assert_eq!(store.sealed_outbox_batch(10).unwrap()[0].1, sealed[0].1);
    let account = store.account().unwrap();
    let payload = open_change(&account, "r1", "items", &sealed[0].1, ChangePayload::decode).unwrap();
    assert_eq!(payload.state.visible().unwrap()["x"], 1);
    assert_eq!(store.status().unwrap().deferred, 0, "the new tables exist");
}
