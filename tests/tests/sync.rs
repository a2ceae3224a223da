//! Device → gateway → user's topic → delivery → device, through the real
//! `lockstep` binary and a real Nisshi.

use std::{collections::BTreeSet, time::Duration};

use lockstep_e2e::{
    device::{Device, Received, changes, receive_changes, receive_until},
    kafka::{committed_offset, read_topic},
    stack::Stack,
};
use lockstep_proto::v1::ListDevicesRequest;

const WAIT: Duration = Duration::from_secs(60);

fn topic_of(device: &Device) -> String {
    format!("lockstep.user.{}", device.user_id)
}

fn group_of(device: &Device) -> String {
    format!("lockstep.device.{}", device.device_id)
}

/// Each change arrives once, in offset order, byte for byte as pushed.
fn assert_same_changes(received: &Received, pushed: &[lockstep_proto::v1::Change], offsets: &[i64], origin: &str) {
    assert_eq!(received.offsets(), offsets, "offsets in order, none missing, none repeated");
    for ((delivered, pushed), offset) in received.changes.iter().zip(pushed).zip(offsets) {
        assert_eq!(delivered.offset, *offset);
        assert_eq!(delivered.change.as_ref(), Some(pushed), "change at offset {offset} differs");
        assert_eq!(delivered.origin_device_id, origin);
        assert!(delivered.received_at_ms > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_changes_reach_the_other_device_in_order_and_unchanged() -> anyhow::Result<()> {
    let Stack { kafka, server, device: phone } = Stack::start("phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    assert_eq!(laptop.user_id, phone.user_id);
    assert_ne!(laptop.device_id, phone.device_id);

    let mut stream = laptop.subscribe(None).await?;
    let pushed = changes(1000, 1024);
    let mut offsets = Vec::new();
    for batch in pushed.chunks(100) {
        offsets.extend(phone.push_ok(batch.to_vec()).await?);
    }
    assert_eq!(offsets, (0..1000).collect::<Vec<i64>>());
    let received = receive_changes(&mut stream, 1000, WAIT).await?;
    assert_same_changes(&received, &pushed, &offsets, &phone.device_id);

    // And the other way round, live.
    let mut phone_stream = phone.subscribe(Some(1000)).await?;
    let reply = changes(3, 10);
    let reply_offsets = laptop.push_ok(reply.clone()).await?;
    let received = receive_changes(&mut phone_stream, 3, WAIT).await?;
    assert_same_changes(&received, &reply, &reply_offsets, &laptop.device_id);

    // What Kafka holds is exactly what was pushed, readable by any Kafka client.
    let records = read_topic(kafka.bootstrap(), &topic_of(&phone)).await?;
    assert_eq!(records.len(), 1003);
    assert_eq!(records[17].1.ciphertext, pushed[17].ciphertext.to_vec());
    assert_eq!(records[17].1.user_id, phone.user_id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_resumes_after_its_last_ack() -> anyhow::Result<()> {
    let Stack { kafka, server, device: phone } = Stack::start("phone").await?;
    let tablet = phone.pair(&server, "tablet").await?;

    let first = changes(300, 512);
    phone.push_ok(first.clone()).await?;
    let mut stream = tablet.subscribe(None).await?;
    let received = receive_changes(&mut stream, 300, WAIT).await?;
    assert_eq!(received.offsets(), (0..300).collect::<Vec<i64>>());
    // The tablet durably applied up to 249 only, then goes offline.
    assert_eq!(tablet.ack(249).await?, 250);
    // A lower, late ack does not move the offset back.
    assert_eq!(tablet.ack(100).await?, 250);
    drop(stream);

    let more = changes(500, 512);
    for batch in more.chunks(250) {
        phone.push_ok(batch.to_vec()).await?;
    }
    // The group offset is a standard Kafka consumer-group offset.
    assert_eq!(committed_offset(kafka.bootstrap(), &group_of(&tablet), &topic_of(&tablet)).await?, Some(250));
    let devices = phone.accounts.clone().list_devices(phone.request(ListDevicesRequest {})).await?.into_inner().devices;
    let listed = devices.iter().find(|device| device.device_id == tablet.device_id).expect("tablet listed");
    assert_eq!(listed.committed_offset, 250);
    let listed_phone = devices.iter().find(|device| device.device_id == phone.device_id).expect("phone listed");
    assert_eq!(listed_phone.committed_offset, -1);

    let mut stream = tablet.subscribe(None).await?;
    let received = receive_changes(&mut stream, 550, WAIT).await?;
    // Everything after the ack, in order: the 50 unacked ones again, then the 500 new.
    assert_eq!(received.offsets(), (250..800).collect::<Vec<i64>>());
    assert_eq!(received.changes[50].change.as_ref(), Some(&more[0]));
    assert!(received.resyncs.is_empty());

    // Idle at the end: heartbeats report the log end and the committed offset.
    let mut idle = Received::default();
    receive_until(&mut stream, &mut idle, WAIT, |seen| !seen.heartbeats.is_empty()).await?;
    assert!(idle.changes.is_empty());
    assert_eq!(idle.heartbeats[0].log_end_offset, 800);
    assert_eq!(idle.heartbeats[0].committed_offset, 250);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_delivering_loses_nothing_that_was_acknowledged() -> anyhow::Result<()> {
    let Stack { kafka, mut server, device: mut phone } = Stack::start("phone").await?;
    let mut laptop = phone.pair(&server, "laptop").await?;

    let pushed = changes(2000, 1024);
    let mut acknowledged = Vec::new();
    for batch in pushed.chunks(200) {
        acknowledged.extend(phone.push_ok(batch.to_vec()).await?);
    }
    // The laptop applies and acks as it goes; the server dies mid-stream.
    let mut stream = laptop.subscribe(None).await?;
    let mut received = Received::default();
    receive_until(&mut stream, &mut received, WAIT, |seen| seen.changes.len() >= 700).await?;
    let applied = received.changes.last().expect("changes").offset;
    laptop.ack(applied).await?;
    server.kill9();
    // The stream breaks; whatever was in flight may or may not have arrived.
    let mut delivered: BTreeSet<i64> = received.offsets().into_iter().collect();
    while let Ok(Some(message)) = stream.message().await {
        if let Some(lockstep_proto::v1::subscribe_response::Event::Changes(batch)) = message.event {
            delivered.extend(batch.changes.iter().map(|change| change.offset));
        }
    }

    server.restart().await?;
    phone.reconnect(&server).await?;
    laptop.reconnect(&server).await?;
    // Pushing goes on after the restart, and a change retried across the restart is not appended twice.
    let retried = phone.push(pushed[5..7].to_vec()).await?;
    assert!(retried.iter().all(|result| result.duplicate));
    let after = changes(100, 1024);
    acknowledged.extend(phone.push_ok(after.clone()).await?);

    let mut stream = laptop.subscribe(None).await?;
    let rest = receive_changes(&mut stream, acknowledged.len() - (applied as usize + 1), WAIT).await?;
    assert_eq!(rest.offsets().first(), Some(&(applied + 1)), "resumes right after the last ack");
    delivered.extend(rest.offsets());
    let expected: BTreeSet<i64> = acknowledged.iter().copied().collect();
    assert_eq!(delivered, expected, "every acknowledged change was delivered");
    assert_eq!(rest.offsets(), ((applied + 1)..2100).collect::<Vec<i64>>());

    let records = read_topic(kafka.bootstrap(), &topic_of(&phone)).await?;
    assert_eq!(records.len(), 2100, "no change was appended twice");

    // A clean stop (SIGTERM) ends streams and exits successfully.
    assert!(server.terminate()?, "lockstep exits 0 on SIGTERM");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_of_one_user_are_ordered_once_and_retryable() -> anyhow::Result<()> {
    // The gateway pipelines a user's pushes (the next one enqueues while the
    // previous waits for Kafka): offsets stay contiguous, each change is written
    // once, live delivery stays in offset order, retries answer with first offsets.
    let Stack { kafka, server, device: phone } = Stack::start("phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    let watcher = phone.pair(&server, "watcher").await?;
    let mut stream = watcher.subscribe(None).await?;

    let mut pushers = Vec::new();
    for device in [phone.clone(), phone.clone(), laptop.clone(), laptop.clone()] {
        pushers.push(tokio::spawn(async move {
            let mut pushed = Vec::new();
            for _ in 0..25 {
                let batch = changes(20, 64);
                let offsets = device.push_ok(batch.clone()).await?;
                anyhow::ensure!(offsets.windows(2).all(|pair| pair[1] == pair[0] + 1), "a batch is contiguous");
                pushed.push((device.clone(), batch, offsets));
            }
            anyhow::Ok(pushed)
        }));
    }
    let mut all = Vec::new();
    for pusher in pushers {
        all.extend(pusher.await??);
    }
    let mut offsets: Vec<i64> = all.iter().flat_map(|(_, _, offsets)| offsets.clone()).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..2_000).collect::<Vec<i64>>(), "every offset once, no gaps");

    let received = receive_changes(&mut stream, 2_000, WAIT).await?;
    assert_eq!(received.offsets(), (0..2_000).collect::<Vec<i64>>(), "live delivery in offset order");
    let records = read_topic(kafka.bootstrap(), &topic_of(&phone)).await?;
    assert_eq!(records.len(), 2_000);

    // Retrying everything at once: all duplicates, same offsets, nothing appended.
    let mut retries = Vec::new();
    for (device, batch, offsets) in all {
        retries.push(tokio::spawn(async move {
            let results = device.push(batch).await?;
            anyhow::ensure!(results.iter().all(|result| result.duplicate), "retries are duplicates");
            let again: Vec<i64> = results
                .iter()
                .filter_map(|result| match result.result {
                    Some(lockstep_proto::v1::push_result::Result::Offset(offset)) => Some(offset),
                    _ => None,
                })
                .collect();
            anyhow::ensure!(again == offsets, "same offsets as the first time");
            anyhow::Ok(())
        }));
    }
    for retry in retries {
        retry.await??;
    }
    assert_eq!(read_topic(kafka.bootstrap(), &topic_of(&phone)).await?.len(), 2_000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_catch_up_delivers_each_offset_once_in_bounded_messages_past_a_stalled_device() -> anyhow::Result<()> {
    // One shared reader, small messages, a one-message stream buffer: the catch-up
    // crosses dozens of Kafka reads, and a device that reads nothing must not keep
    // the only reader from the device that does.
    const MAX_BYTES: usize = 64 * 1024;
    const MAX_CHANGES: usize = 50;
    let env = [
        ("LOCKSTEP_DELIVERY__CATCHUP_READERS", "1"),
        ("LOCKSTEP_DELIVERY__BATCH_MAX_BYTES", "65536"),
        ("LOCKSTEP_DELIVERY__BATCH_MAX_CHANGES", "50"),
        ("LOCKSTEP_DELIVERY__STREAM_BUFFER", "1"),
        ("LOCKSTEP_LIMITS__MAX_CIPHERTEXT_BYTES", "16384"),
    ];
    let Stack { server, device: phone, .. } = Stack::start_with("phone", &env).await?;
    let stalled = phone.pair(&server, "stalled").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    // Pushed before anyone subscribed: no live tail holds them, every one comes from Kafka.
    let pushed = changes(4000, 2048);
    let mut offsets = Vec::new();
    for batch in pushed.chunks(500) {
        offsets.extend(phone.push_ok(batch.to_vec()).await?);
    }
    assert_eq!(offsets, (0..4000).collect::<Vec<i64>>());

    // 8 MB behind: more than HTTP/2 flow control lets through to a device that reads nothing.
    let _stalled_stream = stalled.subscribe(None).await?;
    let mut stream = laptop.subscribe(None).await?;
    let mut received = Received::default();
    let deadline = tokio::time::Instant::now() + WAIT;
    while received.changes.len() < pushed.len() {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .map_err(|_| anyhow::anyhow!("timed out with {} changes", received.changes.len()))??
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        if let Some(lockstep_proto::v1::subscribe_response::Event::Changes(batch)) = message.event {
            let payload: usize = batch
                .changes
                .iter()
                .filter_map(|delivered| delivered.change.as_ref())
                .map(|change| change.ciphertext.len() + change.nonce.len())
                .sum();
            assert!(batch.changes.len() <= MAX_CHANGES, "{} changes in one message", batch.changes.len());
            assert!(payload <= MAX_BYTES, "{payload} bytes of ciphertext in one message");
            received.changes.extend(batch.changes);
        }
    }
    assert_same_changes(&received, &pushed, &offsets, &phone.device_id);
    Ok(())
}
