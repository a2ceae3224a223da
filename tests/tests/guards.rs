//! What the server refuses: other users' data, bad credentials, retried
//! changes, malformed input — each with the right status and nothing changed.

use std::time::Duration;

use bytes::Bytes;
use lockstep_e2e::{
    device::{Device, Received, change, changes, receive_changes, receive_until, with_token},
    kafka::{delete_records_before, read_topic},
    server::Server,
    stack::Stack,
};
use lockstep_proto::v1::{
    AckRequest, Change, CreatePairingTicketRequest, GetServerInfoRequest, ListDevicesRequest, PushRequest,
    RedeemPairingTicketRequest, RevokeDeviceRequest, SubscribeRequest, push_result, sync_client::SyncClient,
};
use tonic::{Code, Request};

const WAIT: Duration = Duration::from_secs(60);

fn topic_of(device: &Device) -> String {
    format!("lockstep.user.{}", device.user_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_isolated_and_credentials_are_checked() -> anyhow::Result<()> {
    let Stack { kafka: _kafka, server, device: alice } = Stack::start("alice-phone").await?;
    let alice_laptop = alice.pair(&server, "alice-laptop").await?;
    let mallory = Device::create_account(&server, "mallory-phone").await?;
    assert_ne!(alice.user_id, mallory.user_id);

    let mut mallory_stream = mallory.subscribe(None).await?;
    let mut alice_stream = alice_laptop.subscribe(None).await?;
    alice.push_ok(changes(20, 64)).await?;
    receive_changes(&mut alice_stream, 20, WAIT).await?;
    // Mallory's stream carries heartbeats of her own (empty) log, nothing of Alice's.
    let mut seen = Received::default();
    receive_until(&mut mallory_stream, &mut seen, WAIT, |seen| seen.heartbeats.len() >= 2).await?;
    assert!(seen.changes.is_empty(), "another user's changes leaked: {:?}", seen.offsets());
    assert_eq!(seen.heartbeats[1].log_end_offset, 0);
    // Her token names her topic only: acking an offset of Alice's log is out of range of hers.
    let status = mallory.ack(5).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let status = mallory.subscribe(Some(5)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // She cannot revoke Alice's devices either, nor learn whether they exist.
    let status = mallory
        .accounts
        .clone()
        .revoke_device(mallory.request(RevokeDeviceRequest { device_id: alice_laptop.device_id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let listed = mallory.accounts.clone().list_devices(mallory.request(ListDevicesRequest {})).await?.into_inner();
    assert_eq!(listed.devices.len(), 1);

    // Missing, malformed and wrong tokens.
    let mut sync = server.sync().await?;
    let push = || PushRequest { changes: vec![change("r1", 8)] };
    let status = sync.push(Request::new(push())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("authorization"), "{}", status.message());
    let mut basic = Request::new(push());
    basic.metadata_mut().insert("authorization", "Basic abc".parse()?);
    assert_eq!(sync.push(basic).await.unwrap_err().code(), Code::Unauthenticated);
    let wrong = format!("{}x", alice.token);
    assert_eq!(sync.push(with_token(push(), &wrong)).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(
        sync.subscribe(with_token(SubscribeRequest::default(), &wrong)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(sync.ack(with_token(AckRequest { offset: 0 }, &wrong)).await.unwrap_err().code(), Code::Unauthenticated);

    // A pairing ticket works once.
    let ticket = alice
        .accounts
        .clone()
        .create_pairing_ticket(alice.request(CreatePairingTicketRequest {}))
        .await?
        .into_inner()
        .ticket;
    let mut accounts = server.accounts().await?;
    let redeem = |ticket: &str| RedeemPairingTicketRequest { ticket: ticket.into(), device_name: "tablet".into() };
    accounts.redeem_pairing_ticket(redeem(&ticket)).await?;
    assert_eq!(accounts.redeem_pairing_ticket(redeem(&ticket)).await.unwrap_err().code(), Code::Unauthenticated);

    // Revoking a device stops its token at once and closes its live stream.
    alice
        .accounts
        .clone()
        .revoke_device(alice.request(RevokeDeviceRequest { device_id: alice_laptop.device_id.clone() }))
        .await?;
    let closed = loop {
        match tokio::time::timeout(WAIT, alice_stream.message()).await? {
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(closed.code(), Code::Unauthenticated, "{closed:?}");
    assert_eq!(alice_laptop.push(changes(1, 8)).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(alice_laptop.subscribe(None).await.unwrap_err().code(), Code::Unauthenticated);
    let devices = alice.accounts.clone().list_devices(alice.request(ListDevicesRequest {})).await?.into_inner().devices;
    let revoked = devices.iter().find(|device| device.device_id == alice_laptop.device_id).expect("listed");
    assert!(revoked.revoked_at_ms > 0);

    // A newer Subscribe of the same device takes over the older stream.
    let mut older = alice.subscribe(None).await?;
    let _newer = alice.subscribe(None).await?;
    let superseded = loop {
        match tokio::time::timeout(WAIT, older.message()).await? {
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(superseded.code(), Code::Aborted, "{superseded:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_change_is_appended_once() -> anyhow::Result<()> {
    let Stack { kafka, mut server, device: mut phone } = Stack::start("phone").await?;
    let batch = changes(50, 128);
    let first = phone.push_ok(batch.clone()).await?;

    // The same batch again (a device that never saw the answer): same offsets, marked duplicate.
    let again = phone.push(batch.clone()).await?;
    for (result, offset) in again.iter().zip(&first) {
        assert!(result.duplicate);
        assert_eq!(result.result, Some(push_result::Result::Offset(*offset)));
    }
    // A batch mixing retried and new changes: only the new ones are appended, in order.
    let mut mixed = vec![batch[10].clone()];
    mixed.extend(changes(2, 128));
    let results = phone.push(mixed).await?;
    assert!(results[0].duplicate);
    assert_eq!(results[1].result, Some(push_result::Result::Offset(50)));
    assert_eq!(results[2].result, Some(push_result::Result::Offset(51)));
    // A change id reused for different content is refused for that change only.
    let mut forged = batch[3].clone();
    forged.ciphertext = Bytes::from_static(b"different");
    let results = phone.push(vec![forged, change("r-new", 16)]).await?;
    match &results[0].result {
        Some(push_result::Result::Error(error)) => {
            assert_eq!(error.code, Code::AlreadyExists as i32);
            assert!(!error.retryable);
        }
        other => anyhow::bail!("expected an error, got {other:?}"),
    }
    assert_eq!(results[1].result, Some(push_result::Result::Offset(52)));

    // Across a crash of the server the change ids are still known.
    server.kill9();
    server.restart().await?;
    phone.reconnect(&server).await?;
    let after_restart = phone.push(batch.clone()).await?;
    assert!(after_restart.iter().all(|result| result.duplicate));
    // Another device of the user may push a change with the same id: ids are per device.
    let laptop = phone.pair(&server, "laptop").await?;
    let results = laptop.push(vec![batch[0].clone()]).await?;
    assert!(!results[0].duplicate);

    let records = read_topic(kafka.bootstrap(), &topic_of(&phone)).await?;
    assert_eq!(records.len(), 54);
    let phone_ids: std::collections::HashSet<_> = records
        .iter()
        .filter(|(_, record)| record.origin_device_id == phone.device_id)
        .map(|(_, record)| record.change_id.clone())
        .collect();
    assert_eq!(phone_ids.len(), 53, "each of the phone's change ids appears once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_dedup_index_is_rebuilt_from_the_topic() -> anyhow::Result<()> {
    // The server's table of pushed change ids is a cache of the topic: when it
    // is lost (or behind, after a crash between Kafka's ack and the table
    // write), the server re-reads the topic before it trusts it.
    let Stack { kafka, mut server, device: mut phone } = Stack::start("phone").await?;
    let batch = changes(30, 64);
    let offsets = phone.push_ok(batch.clone()).await?;
    server.kill9();
    let database = rusqlite::Connection::open(server.data_dir().join("lockstep.db"))?;
    database.execute_batch("DELETE FROM pushed_changes; UPDATE users SET dedup_indexed_through = 0;")?;
    drop(database);
    server.restart().await?;
    phone.reconnect(&server).await?;
    let results = phone.push(batch[20..].to_vec()).await?;
    for (result, offset) in results.iter().zip(&offsets[20..]) {
        assert!(result.duplicate, "{result:?}");
        assert_eq!(result.result, Some(push_result::Result::Offset(*offset)));
    }
    assert_eq!(phone.push_ok(changes(1, 8)).await?, vec![30]);
    assert_eq!(read_topic(kafka.bootstrap(), &topic_of(&phone)).await?.len(), 31);
    Ok(())
}

fn bad(mut change: Change, edit: impl FnOnce(&mut Change)) -> Change {
    edit(&mut change);
    change
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_changes_nothing() -> anyhow::Result<()> {
    let limits = [("LOCKSTEP_LIMITS__MAX_CHANGES_PER_PUSH", "20"), ("LOCKSTEP_LIMITS__MAX_CIPHERTEXT_BYTES", "4096")];
    let Stack { kafka, server, device: phone } = Stack::start_with("phone", &limits).await?;
    phone.push_ok(changes(3, 16)).await?;
    let info = phone.sync.clone().get_server_info(GetServerInfoRequest {}).await?.into_inner();
    assert_eq!(info.max_changes_per_push, 20);
    assert_eq!(info.max_ciphertext_bytes, 4096);

    let good = change("r1", 16);
    let cases: Vec<(&str, Vec<Change>, &str)> = vec![
        ("empty batch", vec![], "at least one change"),
        ("too many changes", changes(21, 8), "20"),
        ("empty ciphertext", vec![bad(good.clone(), |c| c.ciphertext = Bytes::new())], "ciphertext"),
        ("oversized ciphertext", vec![bad(good.clone(), |c| c.ciphertext = Bytes::from(vec![1; 4097]))], "ciphertext"),
        ("missing record id", vec![bad(good.clone(), |c| c.record_id.clear())], "record_id"),
        ("missing change id", vec![bad(good.clone(), |c| c.change_id.clear())], "change_id"),
        ("over-long change id", vec![bad(good.clone(), |c| c.change_id = "c".repeat(65))], "change_id"),
        ("over-long record id", vec![bad(good.clone(), |c| c.record_id = "r".repeat(129))], "record_id"),
        ("malformed record id", vec![bad(good.clone(), |c| c.record_id = "a/b".into())], "record_id"),
        ("malformed collection", vec![bad(good.clone(), |c| c.collection = "Notes!".into())], "collection"),
        ("missing op", vec![bad(good.clone(), |c| c.op = 0)], "op"),
        ("unknown op", vec![bad(good.clone(), |c| c.op = 9)], "op"),
        ("missing hlc", vec![bad(good.clone(), |c| c.hlc = 0)], "hlc"),
        ("short nonce", vec![bad(good.clone(), |c| c.nonce = Bytes::from_static(b"short"))], "nonce"),
        // One bad change rejects the whole batch, and the message says which.
        ("one bad change among good ones", vec![good.clone(), bad(good.clone(), |c| c.hlc = 0)], "changes[1]"),
    ];
    for (case, batch, mentions) in cases {
        let status = phone.push(batch).await.expect_err(case);
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        assert!(
            status.message().contains(mentions),
            "{case}: message {:?} should mention {mentions:?}",
            status.message()
        );
    }
    // A request larger than the server takes is refused before it is read.
    let huge: Vec<Change> =
        (0..20).map(|index| bad(change(&format!("h{index}"), 8), |c| c.nonce = Bytes::from(vec![0; 32]))).collect();
    let mut oversized = huge.clone();
    for change in &mut oversized {
        change.ciphertext = Bytes::from(vec![7; 4096]);
    }
    let small_server = Server::start_with(
        &kafka,
        &[("LOCKSTEP_LIMITS__MAX_REQUEST_BYTES", "65536"), ("LOCKSTEP_LIMITS__MAX_CIPHERTEXT_BYTES", "4096")],
    )
    .await?;
    let small = Device::create_account(&small_server, "small").await?;
    let status = small.push(oversized).await.expect_err("request too large");
    assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted), "{status:?}");
    assert!(small.push_ok(huge[..2].to_vec()).await.is_ok());

    // Offsets out of range.
    for offset in [-1, 3, 1000] {
        let status = phone.ack(offset).await.expect_err("ack out of range");
        assert_eq!(status.code(), Code::OutOfRange, "ack {offset}: {status:?}");
    }
    for from in [-1, 4, 1000] {
        let status = phone.subscribe(Some(from)).await.expect_err("subscribe out of range");
        assert_eq!(status.code(), Code::OutOfRange, "from {from}: {status:?}");
        assert!(status.message().contains("outside the log"), "{}", status.message());
    }
    // Account input.
    let mut accounts = server.accounts().await?;
    for name in ["", "   ", &"n".repeat(65), "tab\tname"] {
        let status = accounts
            .create_account(lockstep_proto::v1::CreateAccountRequest { device_name: name.into(), ..Default::default() })
            .await
            .expect_err("bad device name");
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
    }
    let status = accounts
        .redeem_pairing_ticket(RedeemPairingTicketRequest { ticket: "nope".into(), device_name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = phone
        .accounts
        .clone()
        .revoke_device(phone.request(RevokeDeviceRequest { device_id: String::new() }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Nothing was written, nothing was committed.
    let records = read_topic(kafka.bootstrap(), &topic_of(&phone)).await?;
    assert_eq!(records.len(), 3);
    let mut sync = SyncClient::new(server.channel().await?);
    let committed = sync.ack(with_token(AckRequest { offset: 0 }, &phone.token)).await?.into_inner().committed_offset;
    assert_eq!(committed, 1, "the first valid ack commits");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_history_expired_gets_a_resync() -> anyhow::Result<()> {
    let Stack { kafka, server, device: phone } = Stack::start("phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    phone.push_ok(changes(10, 32)).await?;
    let mut stream = laptop.subscribe(None).await?;
    receive_changes(&mut stream, 10, WAIT).await?;
    laptop.ack(2).await?;
    drop(stream);

    let recent = changes(5, 32);
    phone.push_ok(recent.clone()).await?;
    // Retention removes the records the laptop has not applied (what Kafka's
    // retention does to old segments, at once: DeleteRecords moves the log start).
    let log_start = delete_records_before(kafka.bootstrap(), &topic_of(&phone), 8).await?;
    assert_eq!(log_start, 8);
    let records = read_topic(kafka.bootstrap(), &topic_of(&phone)).await?;
    assert_eq!(records.first().map(|(offset, _)| *offset), Some(log_start), "any Kafka client sees the new start");

    let mut stream = laptop.subscribe(None).await?;
    let mut received = Received::default();
    receive_until(&mut stream, &mut received, WAIT, |seen| seen.changes.len() >= records.len()).await?;
    assert_eq!(received.resyncs.len(), 1, "one explicit resync, never a silent gap");
    assert_eq!(received.resyncs[0].log_start_offset, log_start);
    assert_eq!(received.resyncs[0].previous_offset, 3);
    let expired = lockstep_proto::v1::ResyncReason::HistoryExpired as i32;
    assert_eq!(received.resyncs[0].reason, expired, "history expired, not a lost log");
    assert_eq!(received.offsets(), records.iter().map(|(offset, _)| *offset).collect::<Vec<_>>());
    assert_eq!(received.changes.last().and_then(|change| change.change.as_ref()), recent.last());
    drop(stream);

    // A device's own cursor below the log start gets the same explicit Resync.
    let mut stream = laptop.subscribe(Some(0)).await?;
    let mut received = Received::default();
    receive_until(&mut stream, &mut received, WAIT, |seen| seen.changes.len() >= records.len()).await?;
    assert_eq!(received.resyncs.len(), 1, "{:?}", received.resyncs);
    assert_eq!((received.resyncs[0].log_start_offset, received.resyncs[0].previous_offset), (log_start, 0));
    assert_eq!(received.offsets().first(), Some(&log_start));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_the_device_gave_up_on_is_still_appended_once() -> anyhow::Result<()> {
    // A device whose push times out hangs up and pushes the same batch again.
    // The server must finish what it started (Kafka ack, then the dedup record),
    // or the retry appends the changes a second time.
    let Stack { kafka, server: _server, device: phone } = Stack::start("phone").await?;
    for attempt in 0..40u64 {
        let batch = changes(100, 512);
        let mut request = phone.request(PushRequest { changes: batch.clone() });
        // From 0.5 ms up: some attempts end before the server starts, some mid-way.
        request.set_timeout(Duration::from_micros(500 + attempt * 250));
        let _ = phone.sync.clone().push(request).await;
        // The retry comes right away, as a device's would.
        let results = phone.push_ok(batch.clone()).await?;
        assert_eq!(results.len(), batch.len());
    }
    let records = read_topic(kafka.bootstrap(), &topic_of(&phone)).await?;
    let ids: std::collections::HashSet<_> = records.iter().map(|(_, record)| record.change_id.clone()).collect();
    assert_eq!(ids.len(), 4_000, "every change is on the topic");
    assert_eq!(records.len(), 4_000, "and none twice");
    Ok(())
}

/// A Subscribe that authenticated, then waited on Kafka while its device was
/// revoked, must not start streaming when Kafka answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_ends_a_subscribe_that_is_still_starting() -> anyhow::Result<()> {
    let Stack { kafka, server, device: phone } = Stack::start("phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    phone.push_ok(changes(2, 16)).await?;

    // Kafka frozen (SIGSTOP: connections hang, nothing is refused): the laptop's
    // Subscribe authenticates, then waits for its offsets.
    let freeze = |signal: &str| std::process::Command::new("kill").args([signal, &kafka.pid().to_string()]).status();
    freeze("-STOP")?;
    let starting = {
        let laptop = laptop.clone();
        tokio::spawn(async move { laptop.subscribe(None).await })
    };
    // Time passes to show that nothing happens: the subscribe stays stuck on the frozen
    // Kafka (and has reached that wait when the revocation comes).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!starting.is_finished(), "the subscribe is waiting on Kafka");
    let revoked = phone
        .accounts
        .clone()
        .revoke_device(phone.request(RevokeDeviceRequest { device_id: laptop.device_id.clone() }))
        .await;
    freeze("-CONT")?;
    revoked?;

    match starting.await? {
        Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
        Ok(mut stream) => {
            // Only an error may come, never a change.
            let first = tokio::time::timeout(Duration::from_secs(30), stream.message()).await?;
            match first {
                Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
                Ok(Some(message)) => panic!("a revoked device was streamed {message:?}"),
                Ok(None) => {}
            }
        }
    }
    Ok(())
}
