//! The log never silently shrinks, and nothing a person wrote is lost when it
//! does: restarts of the local Kafka, a recreated topic, junk in a user's log,
//! batches of the largest legal changes. Real `lockstep-cli` devices, the real
//! server, a real Apache Kafka.

use std::time::Duration;

use anyhow::Context;
use lockstep_e2e::{
    cli::Cli,
    device::{Device, changes, receive_changes},
    kafka::Kafka,
    stack::{CliStack, Stack},
    wait::{eventually, failed, not_yet, ready},
};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions},
    client::DefaultClientContext,
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};

fn user_topic(user_id: &str) -> String {
    format!("lockstep.user.{user_id}")
}

async fn user_id(device: &Cli) -> anyhow::Result<String> {
    Ok(device.json(&["status"]).await?["user_id"].as_str().context("user id")?.to_string())
}

/// Record ids and visible fields, as `list --json` prints them.
async fn visible(device: &Cli) -> anyhow::Result<Vec<(String, Value)>> {
    let listed = device.json(&["list"]).await?;
    let mut records: Vec<(String, Value)> = listed
        .as_array()
        .context("list prints an array")?
        .iter()
        .map(|record| (record["id"].as_str().unwrap_or_default().to_string(), record["fields"].clone()))
        .collect();
    records.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(records)
}

async fn put(device: &Cli, fields: Value) -> anyhow::Result<String> {
    let record = device.json(&["put", "-c", "notes", &fields.to_string()]).await?;
    Ok(record["id"].as_str().context("id")?.to_string())
}

/// Pushes the same changes until they are written, as a device retries
/// retryable errors, for at most 60 s.
async fn push_retrying(device: &Device, changes: Vec<lockstep_proto::v1::Change>) -> anyhow::Result<Vec<i64>> {
    use lockstep_proto::v1::push_result;
    eventually(Duration::from_secs(60), "the changes written", || async {
        let results = match device.push(changes.clone()).await {
            Ok(results) => results,
            Err(status) => return failed(status),
        };
        let offsets: Option<Vec<i64>> = results
            .iter()
            .map(|result| match result.result {
                Some(push_result::Result::Offset(offset)) => Some(offset),
                _ => None,
            })
            .collect();
        if let Some(offsets) = offsets {
            return ready(offsets);
        }
        let retryable = results.iter().all(|result| match &result.result {
            Some(push_result::Result::Error(error)) => error.retryable,
            _ => true,
        });
        if retryable {
            not_yet(format!("{results:?}"))
        } else {
            failed(anyhow::anyhow!("changes were not written: {results:?}"))
        }
    })
    .await
}

/// The scenario: two devices, three records, the local Kafka restarted
/// (SIGTERM, then kill -9). Every device still lists its three records and
/// syncs without a resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_the_local_kafka_keeps_every_record() -> anyhow::Result<()> {
    let CliStack { mut kafka, server: _server, device: laptop } = CliStack::start_own("laptop").await?;
    for title in ["one", "two", "three"] {
        put(&laptop, json!({ "title": title })).await?;
    }
    assert_eq!(laptop.sync().await?["pushed"], 3);
    let phone = laptop.pair("phone").await?;
    phone.sync().await?;
    assert_eq!(visible(&phone).await?.len(), 3);

    for (round, graceful) in [(1, true), (2, false)] {
        if graceful {
            kafka.restart_gracefully().await?;
        } else {
            kafka.restart().await?;
        }
        for device in [&phone, &laptop] {
            let report = device.sync().await.with_context(|| format!("round {round}: {}", device.name))?;
            assert_eq!(report["resyncs"], 0, "round {round}: {} was told to start over: {report}", device.name);
            assert_eq!(report["log_lost"], false, "{report}");
            assert_eq!(visible(device).await?.len(), 3, "round {round}: {} lost records", device.name);
        }
        assert_eq!(visible(&phone).await?, visible(&laptop).await?);
        // And the log still serves a brand-new device everything.
        let tablet = laptop.pair(&format!("tablet{round}")).await?;
        tablet.sync().await?;
        assert_eq!(visible(&tablet).await?.len(), 3, "round {round}: the log lost records");
    }
    Ok(())
}

async fn delete_and_recreate_topic(kafka: &Kafka, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.delete_topics(&[topic], &options).await? {
        result.map_err(|(topic, code)| anyhow::anyhow!("deleting {topic}: {code}"))?;
    }
    // Kafka finishes a deletion in the background: until then the name is taken. The
    // server may also create the vanished topic again itself (empty), which is as good.
    eventually(Duration::from_secs(30), format!("{topic} recreated"), || async {
        match kafka.create_topic(topic, 1).await {
            Ok(()) => ready(()),
            Err(error) if error.to_string().contains("already exists") => {
                if lockstep_e2e::kafka::read_topic(kafka.bootstrap(), topic)
                    .await
                    .is_ok_and(|records| records.is_empty())
                {
                    return ready(());
                }
                not_yet(format!("{error:#}"))
            }
            Err(error) => failed(error),
        }
    })
    .await
}

/// The topic is deleted and recreated behind Lockstep's back: the log lost
/// everything it had acknowledged. No device deletes anything; each is told
/// DATA_LOSS, repairs, pushes back what it holds, and the account converges
/// to the union of what the devices held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_is_repaired_from_the_devices() -> anyhow::Result<()> {
    let CliStack { kafka, server, device: laptop } = CliStack::start("laptop").await?;
    let shared = put(&laptop, json!({"title": "shared", "body": "v1"})).await?;
    laptop.sync().await?;
    let phone = laptop.pair("phone").await?;
    phone.sync().await?;
    // Each device also has something only it holds, pushed (laptop) or not yet (phone).
    let laptop_only = put(&laptop, json!({"title": "laptop only"})).await?;
    laptop.sync().await?;
    let phone_only = put(&phone, json!({"title": "phone only, not yet pushed"})).await?;

    let user = user_id(&laptop).await?;
    let other = Device::create_account(&server, "another account").await?;
    // Deleted and recreated under the running server (on Nisshi, librdkafka 2.12.1
    // crashed in its metadata cache then; on Apache Kafka the server must run on).
    delete_and_recreate_topic(&kafka, &user_topic(&user)).await?;
    if let Err(status) = other.subscribe(None).await {
        panic!("other accounts are served: {status:?}");
    }

    let report = laptop.sync().await?;
    assert_eq!(report["log_lost"], true, "{report}");
    assert!(report["repushed"].as_u64().unwrap_or(0) >= 2, "laptop pushes back what it holds: {report}");
    let report = phone.sync().await?;
    assert_eq!(report["log_lost"], true, "{report}");
    laptop.sync().await?;

    let expected: Vec<&String> = {
        let mut ids = vec![&shared, &laptop_only, &phone_only];
        ids.sort();
        ids
    };
    for device in [&laptop, &phone] {
        let records = visible(device).await?;
        let ids: Vec<&String> = records.iter().map(|(id, _)| id).collect();
        assert_eq!(ids, expected, "{} holds the union", device.name);
        let status = device.json(&["status"]).await?;
        assert_eq!(status["outbox"], 0, "{status}");
        assert!(status["resync"].to_string().contains("log"), "status says what happened: {status}");
    }
    assert_eq!(visible(&laptop).await?, visible(&phone).await?);
    // The log itself holds the union again: a new device gets everything.
    let tablet = laptop.pair("tablet").await?;
    tablet.sync().await?;
    assert_eq!(visible(&tablet).await?, visible(&laptop).await?);
    let log = server.log();
    assert!(log.contains("lost changes it had acknowledged"), "the server raised an alarm");
    Ok(())
}

/// Raw API view of the same: DATA_LOSS until the device subscribes with
/// `repair`, which starts with a Resync (LOG_LOST) at the log start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_log_is_refused_until_each_device_repairs() -> anyhow::Result<()> {
    use lockstep_proto::v1::{ResyncReason, SubscribeRequest, subscribe_response::Event};
    let Stack { kafka, server, device: first } = Stack::start("first").await?;
    let second = first.pair(&server, "second").await?;
    let offsets = first.push_ok(changes(5, 100)).await?;
    assert_eq!(second.ack(*offsets.last().context("offsets")?).await?, 5);

    let mut server = server;
    assert!(server.terminate()?, "clean shutdown");
    delete_and_recreate_topic(&kafka, &user_topic(&first.user_id)).await?;
    server.restart().await?;
    let (mut first, mut second) = (first, second);
    first.reconnect(&server).await?;
    second.reconnect(&server).await?;
    for device in [&first, &second] {
        let refused = device.subscribe(None).await.expect_err("a lost log is not served");
        assert_eq!(refused.code(), tonic::Code::DataLoss, "{refused:?}");
        assert!(refused.message().contains("repair"), "{}", refused.message());
        assert_eq!(device.ack(0).await.expect_err("nor acked").code(), tonic::Code::DataLoss);
    }
    // Pushes still go in (they are new data), at offsets of the new log. (The
    // producer's sequence numbers belong to the old topic: the first attempt
    // may fail retryably while the server replaces its producer.)
    let pushed = push_retrying(&first, changes(2, 100)).await?;
    assert_eq!(pushed, vec![0, 1]);

    let mut stream = first
        .sync
        .clone()
        .subscribe(first.request(SubscribeRequest { from_offset: Some(5), repair: true }))
        .await?
        .into_inner();
    let message = tokio::time::timeout(Duration::from_secs(20), stream.message()).await??.context("stream ended")?;
    match message.event {
        Some(Event::Resync(resync)) => {
            assert_eq!(resync.reason, ResyncReason::LogLost as i32);
            assert_eq!(resync.log_start_offset, 0);
        }
        other => anyhow::bail!("expected a Resync first, got {other:?}"),
    }
    let received = receive_changes(&mut stream, 2, Duration::from_secs(20)).await?;
    assert_eq!(received.offsets(), vec![0, 1]);
    assert_eq!(first.ack(1).await?, 2, "the repaired device acks in the new log");
    // The other device is still refused until it repairs too.
    assert_eq!(second.subscribe(None).await.expect_err("not repaired").code(), tonic::Code::DataLoss);
    drop(stream);

    // A restarted server remembers all of it.
    server.restart().await?;
    second.reconnect(&server).await?;
    assert_eq!(second.subscribe(None).await.expect_err("still not repaired").code(), tonic::Code::DataLoss);
    Ok(())
}

/// Another Kafka client writes junk into a user's topic: every device is
/// told about that offset (a problem in `check`), and what follows arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_in_a_users_log_is_reported_never_skipped_silently() -> anyhow::Result<()> {
    let CliStack { kafka, server, device: laptop } = CliStack::start("laptop").await?;
    put(&laptop, json!({"title": "before"})).await?;
    laptop.sync().await?;
    let phone = laptop.pair("phone").await?;

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create()?;
    let topic = user_topic(&user_id(&laptop).await?);
    let junk_offset = producer
        .send(
            FutureRecord::to(&topic).partition(0).key("junk").payload("not an avro envelope"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(error, _)| error)?
        .offset;
    assert_eq!(junk_offset, 1);
    put(&laptop, json!({"title": "after"})).await?;
    laptop.sync().await?;

    phone.sync().await?;
    let titles: Vec<Value> = visible(&phone).await?.into_iter().map(|(_, fields)| fields["title"].clone()).collect();
    assert_eq!(titles.len(), 2, "the change after the junk arrived: {titles:?}");
    let check = phone.json(&["check"]).await?;
    let problems = check["problems"].as_array().context("problems")?;
    assert!(
        problems.iter().any(|problem| problem["offset"] == junk_offset && problem["kind"] == "undecodable"),
        "the junk offset is reported: {check}"
    );
    let status = phone.json(&["status"]).await?;
    assert_eq!(status["cursor"], 3, "the cursor moved past the reported offset: {status}");
    assert!(server.log().contains("undecodable record"), "the server raised it too");
    Ok(())
}

/// 3 pushes of 30 changes of the largest legal size reach a new device
/// (they used to make one response of 23 MB, over the server's own cap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_legal_changes_are_deliverable() -> anyhow::Result<()> {
    let Stack { kafka: _kafka, server, device: first } = Stack::start("first").await?;
    let info = first
        .sync
        .clone()
        .get_server_info(first.request(lockstep_proto::v1::GetServerInfoRequest {}))
        .await?
        .into_inner();
    let largest = info.max_ciphertext_bytes as usize;
    for _ in 0..3 {
        first.push_ok(changes(30, largest)).await?;
    }
    let fresh = first.pair(&server, "fresh").await?;
    let mut stream = fresh.subscribe(None).await?;
    let received = receive_changes(&mut stream, 90, Duration::from_secs(120)).await?;
    assert_eq!(received.offsets(), (0..90).collect::<Vec<i64>>());
    assert!(
        received.changes.iter().all(|change| change.change.as_ref().is_some_and(|c| c.ciphertext.len() == largest))
    );
    assert!(info.max_batch_bytes as usize >= largest, "one change of the largest size fits a batch");
    Ok(())
}

/// SIGTERM while devices push and stream: the server stops within its drain
/// deadline, exits cleanly, and every change it acknowledged is in the log once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_mid_push_keeps_every_acknowledged_change() -> anyhow::Result<()> {
    use lockstep_proto::v1::push_result;
    let Stack { kafka, mut server, device: phone } = Stack::start("phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    // A device that stopped reading its stream: the stop must not wait for it
    // for longer than the drain deadline.
    let _stream = laptop.subscribe(None).await?;
    let mut pushers = Vec::new();
    for _ in 0..3 {
        let phone = phone.clone();
        pushers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for _ in 0..200 {
                let batch = changes(20, 256);
                let Ok(results) = phone.push(batch.clone()).await else { break };
                for (change, result) in batch.into_iter().zip(results) {
                    if let Some(push_result::Result::Offset(_)) = result.result {
                        acknowledged.push(change.change_id);
                    }
                }
            }
            acknowledged
        }));
    }
    // Mid-push: the server has written some of the pushers' changes when SIGTERM comes.
    let admin = server.admin_addr().context("the server printed its admin address")?;
    eventually(Duration::from_secs(60), "pushes written before the stop", || async {
        let (_, metrics) = lockstep_e2e::http_get(admin, "/metrics").await?;
        let pushed = metrics
            .lines()
            .find_map(|line| line.strip_prefix("lockstep_changes_pushed_total "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or_default();
        anyhow::Ok(if pushed >= 60.0 { ready(()) } else { not_yet(format!("{pushed} changes pushed")) })
    })
    .await?;
    let started = std::time::Instant::now();
    assert!(server.terminate()?, "clean exit");
    assert!(started.elapsed() < Duration::from_secs(15), "stopped within the drain deadline");
    let mut acknowledged = std::collections::HashSet::new();
    for pusher in pushers {
        acknowledged.extend(pusher.await?);
    }
    assert!(!acknowledged.is_empty(), "pushes were acknowledged before the stop");
    let records = lockstep_e2e::kafka::read_topic(kafka.bootstrap(), &user_topic(&phone.user_id)).await?;
    let in_log: std::collections::HashSet<String> =
        records.iter().map(|(_, record)| record.change_id.clone()).collect();
    assert_eq!(in_log.len(), records.len(), "no change twice");
    let missing: Vec<_> = acknowledged.difference(&in_log).collect();
    assert!(missing.is_empty(), "acknowledged but not in the log: {missing:?}");
    Ok(())
}
