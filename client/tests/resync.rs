//! Rebuilding from the log start never destroys: records stay, the mirror is
//! rebuilt, and what the log lacks is queued again; a crash resumes it.

mod common;

use std::time::Duration;

use common::{fields, remote, state, store, store_at};
use lockstep_client::{
    record::ChangePayload,
    store::{Incoming, OP_DELETE, OP_UPSERT, ResyncReason, Store},
};
use serde_json::json;

fn delivered(offset: i64, record_id: &str, state: lockstep_client::record::RecordState) -> Incoming {
    Incoming {
        offset,
        record_id: record_id.into(),
        collection: "items".into(),
        origin_device_id: "other".into(),
        content: Ok(ChangePayload::new(state)),
        sealed: None,
    }
}

#[test]
fn a_resync_keeps_every_record_and_pushes_back_only_what_the_log_lacks() {
    let (mut store, _dir, _) = store();
    // Received from the log before it lost its history.
    store
        .apply(&[
            remote(0, "same", 5, json!({"x": 1})),
            remote(1, "newer-here", 6, json!({"y": 1})),
            remote(2, "gone", 7, json!({"z": 1})),
        ])
        .unwrap();
    // Local edits: pushed and acknowledged (then lost from the log), and one still queued.
    store.put("items", Some("newer-here"), &fields(json!({"y": 2}))).unwrap();
    store.put("items", Some("pushed"), &fields(json!({"p": 1}))).unwrap();
    store.delete("gone").unwrap();
    let acknowledged: Vec<i64> = store.outbox_batch(10).unwrap().iter().map(|entry| entry.seq).collect();
    store.outbox_done(&acknowledged).unwrap();
    let queued = store.put("items", Some("queued"), &fields(json!({"q": 1}))).unwrap();
    let before = store.list(None, true).unwrap();

    let started = store.begin_resync(ResyncReason::HistoryExpired, 40).unwrap();
    assert_eq!(started.log_start, Some(40));
    assert_eq!(store.cursor().unwrap(), Some(40));
    assert_eq!(store.list(None, true).unwrap(), before, "not one record deleted or changed");
    assert_eq!(store.status().unwrap().resync.unwrap().completed_at_ms, None, "pending");

    // The log from its start: "same" as this device has it, "newer-here" older
    // than this device's state; "gone" and "pushed" are not there any more.
    store
        .apply(&[
            delivered(40, "same", state(5, "other", json!({"x": 1}))),
            delivered(41, "newer-here", state(6, "other", json!({"y": 1}))),
        ])
        .unwrap();
    assert_eq!(store.list(None, true).unwrap(), before, "replay merges, changes nothing here");
    let done = store.finish_resync().unwrap().expect("a rebuild was under way");
    assert_eq!(done.repushed, Some(3), "newer-here, gone and pushed; not same, not queued (the outbox has it)");
    assert!(done.completed_at_ms.is_some());
    assert!(store.pending_resync().unwrap().is_none());
    assert!(store.finish_resync().unwrap().is_none(), "once");

    let outbox = store.outbox_batch(10).unwrap();
    let mut repushed: Vec<(&str, i32)> =
        outbox.iter().skip(1).map(|entry| (entry.record_id.as_str(), entry.op)).collect();
    repushed.sort();
    assert_eq!(repushed, [("gone", OP_DELETE), ("newer-here", OP_UPSERT), ("pushed", OP_UPSERT)]);
    assert_eq!(outbox[0].payload.state, queued.state, "the queued edit is still first");
    for entry in &outbox[1..] {
        let record = store.get(&entry.record_id).unwrap().unwrap();
        assert_eq!(entry.payload.state, record.state, "the device's whole state");
        assert_eq!(entry.hlc, record.state.max_hlc());
        assert!(outbox.iter().filter(|other| other.change_id == entry.change_id).count() == 1, "new change ids");
    }
    let status = store.status().unwrap();
    assert_eq!((status.resyncs, status.resync.unwrap().repushed), (1, Some(3)));
}

#[test]
fn an_interrupted_repair_resumes_at_the_next_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.db");
    {
        let (mut store, (), _) = store_at(&path, Duration::from_secs(60));
        for n in 0..4 {
            store.put("items", Some(&format!("r{n}")), &fields(json!({"n": n}))).unwrap();
        }
        let all: Vec<i64> = store.outbox_batch(10).unwrap().iter().map(|entry| entry.seq).collect();
        store.outbox_done(&all).unwrap();
        store.apply(&[remote(0, "r0", 1, json!({"old": true}))]).unwrap();
        // DATA_LOSS: the device asks to repair before the server said from where.
        let asked = store.request_repair(ResyncReason::LogLost).unwrap();
        assert_eq!(asked.log_start, None);
        assert!(store.finish_resync().unwrap().is_none(), "nothing to finish before the server's Resync");
    }
    let rows = |store: &Store| store.outbox_len().unwrap();
    {
        // The server's Resync arrives, part of the log is applied, then the device dies.
        let mut store = Store::open(&path, Duration::from_secs(60)).unwrap();
        assert_eq!(store.pending_resync().unwrap().map(|pending| pending.reason), Some(ResyncReason::LogLost));
        store.begin_resync(ResyncReason::LogLost, 0).unwrap();
        let r0 = store.get("r0").unwrap().unwrap().state;
        store.apply(&[delivered(0, "r0", r0)]).unwrap();
        assert_eq!(rows(&store), 0);
    }
    let mut store = Store::open(&path, Duration::from_secs(60)).unwrap();
    let pending = store.pending_resync().unwrap().expect("the marker survived the crash");
    assert_eq!((pending.reason, pending.log_start), (ResyncReason::LogLost, Some(0)));
    assert_eq!(store.cursor().unwrap(), Some(1), "it resumes where it stopped");
    let r1 = store.get("r1").unwrap().unwrap().state;
    store.apply(&[delivered(1, "r1", r1)]).unwrap();
    let done = store.finish_resync().unwrap().expect("resumed");
    assert_eq!(done.repushed, Some(2), "r2 and r3: the log had r0 and r1");
    assert_eq!(done.reason, ResyncReason::LogLost);
    let mut queued: Vec<String> = store.outbox_batch(10).unwrap().into_iter().map(|entry| entry.record_id).collect();
    queued.sort();
    assert_eq!(queued, ["r2", "r3"]);
    assert_eq!(store.list(None, false).unwrap().len(), 4);
}

#[test]
fn a_resync_without_a_reason_keeps_the_one_the_device_knew() {
    let (mut store, _dir, _) = store();
    store.request_repair(ResyncReason::CursorPastLogEnd).unwrap();
    let state = store.begin_resync(ResyncReason::Unspecified, 0).unwrap();
    assert_eq!(state.reason, ResyncReason::CursorPastLogEnd);
}
