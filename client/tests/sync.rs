//! The sync loop against a scripted server: deadlines, dead streams, gaps,
//! undecodable offsets, DATA_LOSS and OUT_OF_RANGE repairs, a Resync loop,
//! the decode limit, and the exact bytes of a retried push.

mod common;

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{fields, seal, state, store_at};
use lockstep_client::{
    record::ChangePayload,
    store::{ResyncReason, Store, StoreError},
    sync::{Progress, Report, SyncError, Syncer, Until},
};
use lockstep_proto::v1::{
    AckRequest, AckResponse, Change, ChangeBatch, DeliveredChange, GetServerInfoRequest, GetServerInfoResponse,
    Heartbeat, PushRequest, PushResponse, PushResult, Resync, ResyncReason as WireReason, SubscribeRequest,
    SubscribeResponse, push_result,
    subscribe_response::Event,
    sync_server::{Sync, SyncServer},
};
use serde_json::json;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

type Events = Vec<SubscribeResponse>;

/// What the fake server answers and what it was asked.
#[derive(Default)]
struct Script {
    /// One answer per Subscribe, in order; the stream then stays open and silent.
    subscribes: VecDeque<Result<Events, Status>>,
    subscribe_requests: Vec<SubscribeRequest>,
    /// Pushes whose answer never comes (the first N).
    hang_pushes: usize,
    /// Answer every change with ALREADY_EXISTS (a change id used for other content).
    collide: bool,
    /// Acks answered with DATA_LOSS (the first N).
    ack_data_loss: usize,
    pushes: Vec<Change>,
    acks: Vec<i64>,
    max_batch_bytes: u32,
}

#[derive(Clone)]
struct Fake(Arc<Mutex<Script>>);

#[tonic::async_trait]
impl Sync for Fake {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let (hang, collide) = {
            let mut script = self.0.lock().unwrap();
            script.pushes.extend(request.get_ref().changes.iter().cloned());
            let hang = script.hang_pushes > 0;
            script.hang_pushes = script.hang_pushes.saturating_sub(1);
            (hang, script.collide)
        };
        if collide {
            let error = lockstep_proto::v1::PushError {
                code: tonic::Code::AlreadyExists as i32,
                message: "change_id was already used for a different change".into(),
                retryable: false,
            };
            let results = request
                .get_ref()
                .changes
                .iter()
                .map(|_| PushResult { result: Some(push_result::Result::Error(error.clone())), duplicate: false })
                .collect();
            return Ok(Response::new(PushResponse { results }));
        }
        if hang {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let results = (0..request.get_ref().changes.len())
            .map(|n| PushResult { result: Some(push_result::Result::Offset(n as i64)), duplicate: false })
            .collect();
        Ok(Response::new(PushResponse { results }))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let answer = {
            let mut script = self.0.lock().unwrap();
            script.subscribe_requests.push(request.into_inner());
            script.subscribes.pop_front().unwrap_or_else(|| Ok(Vec::new()))
        };
        let events = answer?;
        let stream = tokio_stream::iter(events.into_iter().map(Ok)).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let offset = request.get_ref().offset;
        {
            let mut script = self.0.lock().unwrap();
            if script.ack_data_loss > 0 {
                script.ack_data_loss -= 1;
                return Err(Status::data_loss("the log lost changes"));
            }
            script.acks.push(offset);
        }
        Ok(Response::new(AckResponse { committed_offset: offset + 1 }))
    }

    async fn get_server_info(
        &self,
        _: Request<GetServerInfoRequest>,
    ) -> Result<Response<GetServerInfoResponse>, Status> {
        Ok(Response::new(GetServerInfoResponse {
            server_version: "fake".into(),
            max_changes_per_push: 100,
            max_ciphertext_bytes: 4 * 1024 * 1024,
            max_request_bytes: 8 * 1024 * 1024,
            heartbeat_interval_ms: 100,
            max_change_id_chars: 64,
            max_record_id_chars: 128,
            max_batch_bytes: self.0.lock().unwrap().max_batch_bytes,
            ..Default::default()
        }))
    }
}

struct Harness {
    script: Arc<Mutex<Script>>,
    syncer: Syncer,
    key: lockstep_client::crypto::AccountKey,
    _dir: tempfile::TempDir,
}

async fn harness(script: Script) -> Harness {
    let script = Arc::new(Mutex::new(script));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = SyncServer::new(Fake(script.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let dir = tempfile::tempdir().unwrap();
    let (mut store, (), key) = store_at(&dir.path().join("client.db"), Duration::from_secs(60));
    store.set_server(&format!("http://{addr}")).unwrap();
    let syncer = Syncer::new(store).unwrap().with_rpc_timeout(Duration::from_millis(500));
    Harness { script, syncer, key, _dir: dir }
}

fn event(event: Event) -> SubscribeResponse {
    SubscribeResponse { event: Some(event) }
}

fn heartbeat(log_end_offset: i64) -> SubscribeResponse {
    event(Event::Heartbeat(Heartbeat { log_end_offset, committed_offset: -1, server_time_ms: 0 }))
}

fn resync(log_start_offset: i64, reason: WireReason) -> SubscribeResponse {
    event(Event::Resync(Resync { log_start_offset, previous_offset: 0, reason: reason as i32 }))
}

fn batch(changes: Vec<DeliveredChange>) -> SubscribeResponse {
    event(Event::Changes(ChangeBatch { changes }))
}

/// A change from device "other" that this account's key opens.
fn delivered(key: &lockstep_client::crypto::AccountKey, offset: i64, record_id: &str, hlc: u64) -> DeliveredChange {
    let payload = ChangePayload::new(state(hlc, "other", json!({"from": "log"})));
    let sealed = seal(key, record_id, &payload.encode(), hlc);
    DeliveredChange {
        offset,
        change: Some(Change {
            change_id: format!("c{offset}"),
            record_id: record_id.into(),
            collection: "items".into(),
            op: sealed.op,
            hlc,
            key_epoch: sealed.key_epoch,
            nonce: sealed.nonce.into(),
            ciphertext: sealed.ciphertext.into(),
        }),
        origin_device_id: "other".into(),
        received_at_ms: 0,
        undecodable: String::new(),
        traceparent: String::new(),
    }
}

async fn receive(syncer: &mut Syncer) -> (Result<(), SyncError>, Report) {
    let mut report = Report::default();
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        syncer.receive(Until::CaughtUp, &mut report, &mut |_: Progress| {}, &mut std::future::pending()),
    )
    .await
    .expect("receive ends by itself");
    (outcome, report)
}

fn store(harness: &mut Harness) -> &mut Store {
    &mut harness.syncer.store
}

#[tokio::test]
async fn a_stream_that_stays_silent_is_dead_and_worth_retrying() {
    let mut harness = harness(Script { subscribes: [Ok(Vec::new())].into(), ..Script::default() }).await;
    let started = Instant::now();
    let (outcome, _) = receive(&mut harness.syncer).await;
    let error = outcome.unwrap_err();
    assert!(matches!(error, SyncError::StreamIdle(_)), "{error}");
    assert!(error.is_transient());
    assert!(started.elapsed() < Duration::from_secs(5), "three 100 ms heartbeats, at least a second");
}

#[tokio::test]
async fn a_push_without_answer_hits_its_deadline_and_the_retry_sends_the_same_bytes() {
    let mut harness = harness(Script { hang_pushes: 1, ..Script::default() }).await;
    store(&mut harness).put("items", Some("r1"), &fields(json!({"x": 1}))).unwrap();
    let started = Instant::now();
    let mut report = Report::default();
    let error = harness.syncer.push(&mut report, &mut |_| {}).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "the deadline ended it: {error}");
    assert!(error.is_transient(), "{error}");
    assert_eq!(store(&mut harness).outbox_len().unwrap(), 1, "still queued");
    harness.syncer.disconnect();
    harness.syncer.push(&mut report, &mut |_| {}).await.unwrap();
    assert_eq!(report.pushed, 1);
    let pushes = harness.script.lock().unwrap().pushes.clone();
    assert_eq!(pushes.len(), 2);
    assert_eq!(pushes[0], pushes[1], "the retry is byte for byte the first attempt");
}

#[tokio::test]
async fn a_gap_fails_the_receive_and_moves_nothing() {
    let mut harness = harness(Script::default()).await;
    let key = harness.key.clone();
    let events = vec![
        batch(vec![delivered(&key, 0, "a", 5), delivered(&key, 1, "b", 6)]),
        batch(vec![delivered(&key, 3, "c", 7)]),
        heartbeat(4),
    ];
    harness.script.lock().unwrap().subscribes = [Ok(events)].into();
    let (outcome, _) = receive(&mut harness.syncer).await;
    let error = outcome.unwrap_err();
    assert!(matches!(error, SyncError::Store(StoreError::Gap { expected: 2, found: 3 })), "{error}");
    assert!(error.is_transient(), "watch retries");
    assert_eq!(store(&mut harness).cursor().unwrap(), Some(2));
    assert!(store(&mut harness).get("c").unwrap().is_none());
    assert_eq!(harness.script.lock().unwrap().acks, [1], "only what was applied is acked");
    assert_eq!(store(&mut harness).problems().unwrap()[0].kind, "gap");
}

#[tokio::test]
async fn an_undecodable_offset_is_reported_and_passed() {
    let mut harness = harness(Script::default()).await;
    let key = harness.key.clone();
    let undecodable =
        DeliveredChange { offset: 0, undecodable: "unknown schema id 9".into(), ..DeliveredChange::default() };
    let events = vec![batch(vec![undecodable, delivered(&key, 1, "a", 5)]), heartbeat(2)];
    harness.script.lock().unwrap().subscribes = [Ok(events)].into();
    let (outcome, report) = receive(&mut harness.syncer).await;
    outcome.unwrap();
    assert_eq!((report.received, report.problems), (2, 1));
    let problems = store(&mut harness).problems().unwrap();
    assert_eq!((problems[0].offset, problems[0].kind.as_str()), (0, "undecodable"));
    assert!(problems[0].detail.contains("unknown schema id 9"), "{}", problems[0].detail);
    assert_eq!(store(&mut harness).cursor().unwrap(), Some(2));
    assert!(store(&mut harness).get("a").unwrap().is_some());
}

/// A device that holds "kept" and "lost" (both pushed, acknowledged).
fn holds_two_records(harness: &mut Harness) {
    let store = store(harness);
    store.put("items", Some("kept"), &fields(json!({"k": 1}))).unwrap();
    store.put("items", Some("lost"), &fields(json!({"l": 1}))).unwrap();
    let seqs: Vec<i64> = store.outbox_batch(10).unwrap().iter().map(|entry| entry.seq).collect();
    store.outbox_done(&seqs).unwrap();
}

#[tokio::test]
async fn data_loss_makes_the_device_repair_and_push_back_what_the_log_lacks() {
    let mut harness = harness(Script::default()).await;
    holds_two_records(&mut harness);
    let kept = store(&mut harness).get("kept").unwrap().unwrap().state;
    // The log still has "kept" as this device wrote it; "lost" is gone.
    let payload = ChangePayload::new(kept.clone());
    let sealed = seal(&harness.key, "kept", &payload.encode(), kept.max_hlc());
    let kept_change = DeliveredChange {
        offset: 0,
        change: Some(Change {
            change_id: "k".into(),
            record_id: "kept".into(),
            collection: "items".into(),
            op: 1,
            hlc: kept.max_hlc(),
            key_epoch: 1,
            nonce: sealed.nonce.into(),
            ciphertext: sealed.ciphertext.into(),
        }),
        origin_device_id: "me".into(),
        ..DeliveredChange::default()
    };
    harness.script.lock().unwrap().subscribes = [
        Err(Status::data_loss("the log lost changes")),
        Ok(vec![resync(0, WireReason::LogLost), batch(vec![kept_change]), heartbeat(1)]),
    ]
    .into();
    let report = harness.syncer.sync_once(&mut |_| {}).await.unwrap();
    let requests = harness.script.lock().unwrap().subscribe_requests.clone();
    assert_eq!((requests[0].repair, requests[1].repair), (false, true), "{requests:?}");
    assert!(report.log_lost);
    assert_eq!((report.repushed, report.pushed), (1, 1), "{report:?}");
    let pushes = harness.script.lock().unwrap().pushes.clone();
    assert_eq!(pushes.iter().map(|change| change.record_id.as_str()).collect::<Vec<_>>(), ["lost"]);
    assert_eq!(report.notice().unwrap(), "the server's log lost changes; this device pushed back 1 records it holds");
    assert_eq!(store(&mut harness).list(None, false).unwrap().len(), 2, "nothing deleted");
    let status = store(&mut harness).status().unwrap();
    let resync = status.resync.unwrap();
    assert_eq!((resync.reason, resync.repushed), (ResyncReason::LogLost, Some(1)));
}

#[tokio::test]
async fn a_cursor_past_the_log_end_is_repaired_not_wiped() {
    let mut harness = harness(Script::default()).await;
    holds_two_records(&mut harness);
    let key = harness.key.clone();
    // This device applied up to offset 50 of a log that now ends at 1.
    store(&mut harness).apply(&[common::sealed_remote(&key, 50, "remote", 9, json!({"r": 1}))]).unwrap();
    harness.script.lock().unwrap().subscribes = [
        Err(Status::out_of_range("from_offset 51 is past the log end 1")),
        Ok(vec![resync(0, WireReason::Unspecified), batch(vec![delivered(&key, 0, "kept", 1)]), heartbeat(1)]),
    ]
    .into();
    let report = harness.syncer.sync_once(&mut |_| {}).await.unwrap();
    let requests = harness.script.lock().unwrap().subscribe_requests.clone();
    assert!(requests[1].repair, "{requests:?}");
    assert_eq!(report.resync_reason, Some(ResyncReason::CursorPastLogEnd));
    assert_eq!(report.repushed, 3, "all three records: the log's 'kept' is older than this device's");
    assert_eq!(store(&mut harness).list(None, false).unwrap().len(), 3);
    assert_eq!(store(&mut harness).cursor().unwrap(), Some(1));
}

#[tokio::test]
async fn a_resync_asked_again_with_nothing_delivered_is_refused() {
    let mut harness = harness(Script::default()).await;
    harness.script.lock().unwrap().subscribes = [
        Ok(vec![resync(10, WireReason::HistoryExpired), heartbeat(10)]),
        Ok(vec![resync(10, WireReason::HistoryExpired)]),
    ]
    .into();
    let (outcome, report) = receive(&mut harness.syncer).await;
    outcome.unwrap();
    assert_eq!(report.resyncs, 1);
    let (outcome, _) = receive(&mut harness.syncer).await;
    let error = outcome.unwrap_err();
    assert!(matches!(error, SyncError::ResyncLoop { log_start: 10 }), "{error}");
    assert!(!error.is_transient());
    let status = store(&mut harness).status().unwrap();
    assert!(status.server_problem.is_some_and(|problem| problem.contains("offset 10")));
    assert_eq!(status.resyncs, 1, "not obeyed again");
}

#[tokio::test]
async fn the_decode_limit_follows_the_servers_largest_batch() {
    let big = |key: &lockstep_client::crypto::AccountKey| {
        let mut change = delivered(key, 0, "big", 5);
        if let Some(change) = change.change.as_mut() {
            change.ciphertext = vec![0u8; 3 * 1024 * 1024].into();
        }
        vec![batch(vec![change]), heartbeat(1)]
    };
    // A server that sends batches of at most 1 MiB: a 3 MiB one is refused.
    let mut harness = harness(Script { max_batch_bytes: 1024 * 1024, ..Script::default() }).await;
    let key = harness.key.clone();
    harness.script.lock().unwrap().subscribes = [Ok(big(&key))].into();
    let (outcome, _) = receive(&mut harness.syncer).await;
    let error = outcome.unwrap_err();
    assert!(error.to_string().contains("message length too large"), "{error}");
    // An older server that does not say: the 64 MiB default takes it.
    let mut harness = harness_with_default(big).await;
    let (outcome, report) = receive(&mut harness.syncer).await;
    outcome.unwrap();
    assert_eq!(report.problems, 1, "received (and reported: the ciphertext is zeros)");
}

async fn harness_with_default(events: impl Fn(&lockstep_client::crypto::AccountKey) -> Events) -> Harness {
    let harness = harness(Script::default()).await;
    let key = harness.key.clone();
    harness.script.lock().unwrap().subscribes = [Ok(events(&key))].into();
    harness
}

#[tokio::test]
async fn a_change_id_collision_is_reported_as_such() {
    let mut harness = harness(Script { collide: true, ..Script::default() }).await;
    store(&mut harness).put("items", Some("r1"), &fields(json!({"x": 1}))).unwrap();
    let change_id = store(&mut harness).outbox_batch(1).unwrap()[0].change_id.clone();
    let mut report = Report::default();
    harness.syncer.push(&mut report, &mut |_| {}).await.unwrap();
    assert_eq!(report.rejected, 1);
    let rejected = store(&mut harness).rejected().unwrap();
    assert_eq!(rejected[0].0, "r1");
    assert!(
        rejected[0].1.starts_with(&format!(
            "change id {change_id} of record r1 collides with a different change already in the log"
        )),
        "{}",
        rejected[0].1
    );
}

#[tokio::test]
async fn data_loss_on_ack_makes_the_device_repair_too() {
    let mut harness = harness(Script { ack_data_loss: 1, ..Script::default() }).await;
    holds_two_records(&mut harness);
    let key = harness.key.clone();
    harness.script.lock().unwrap().subscribes = [
        Ok(vec![batch(vec![delivered(&key, 0, "remote", 5)])]),
        Ok(vec![resync(0, WireReason::LogLost), batch(vec![delivered(&key, 0, "remote", 5)]), heartbeat(1)]),
    ]
    .into();
    let report = harness.syncer.sync_once(&mut |_| {}).await.unwrap();
    let requests = harness.script.lock().unwrap().subscribe_requests.clone();
    assert_eq!(requests.iter().map(|request| request.repair).collect::<Vec<_>>(), [false, true]);
    assert!(report.log_lost, "{report:?}");
    assert_eq!(report.repushed, 2, "the two records the log lacks");
    assert_eq!(store(&mut harness).list(None, false).unwrap().len(), 3);
}
