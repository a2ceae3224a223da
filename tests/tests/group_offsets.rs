//! `GroupOffsets` (member-less consumer-group offsets over one shared connection) against a real
//! Kafka broker, cross-checked with librdkafka.
use std::time::{Duration, Instant};

use anyhow::Context;

use lockstep_broker::kafka::group_offsets::{GroupOffsets, GroupOffsetsSettings};
use lockstep_e2e::{
    kafka::Kafka,
    wait::{eventually, failed, not_yet, ready},
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

fn settings(bootstrap: &str) -> GroupOffsetsSettings {
    GroupOffsetsSettings {
        bootstrap_servers: bootstrap.to_owned(),
        client_id: "lockstep-test".to_owned(),
        request_timeout: Duration::from_secs(5),
        max_attempts: 4,
        security: Default::default(),
    }
}

fn consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("rdkafka consumer")
}

/// The offset rdkafka reads back for `group` on (topic, 0).
async fn rdkafka_committed(bootstrap: &str, group: &str, topic: &str) -> Offset {
    let (bootstrap, group, topic) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        let got =
            consumer(&bootstrap, &group).committed_offsets(tpl, Duration::from_secs(10)).expect("committed_offsets");
        got.find_partition(&topic, 0).expect("partition").offset()
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_fetch_many_groups_concurrently() {
    let kafka = Kafka::start().await.unwrap();
    kafka.create_topic("user.many", 1).await.unwrap();
    let offsets = GroupOffsets::connect(settings(kafka.bootstrap())).await.unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50i64 {
        let offsets = offsets.clone();
        tasks.spawn(async move {
            let group = format!("lockstep.device.many-{i}");
            offsets.commit(&group, "user.many", 0, 10 * i + 1).await?;
            offsets.fetch(&group, "user.many", 0).await.map(|got| (i, got))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (i, got) = joined.unwrap().unwrap();
        assert_eq!(got, Some(10 * i + 1), "group many-{i}");
    }
    // A later commit overwrites, and moving backwards is allowed (a device may rewind).
    offsets.commit("lockstep.device.many-7", "user.many", 0, 500).await.unwrap();
    offsets.commit("lockstep.device.many-7", "user.many", 0, 3).await.unwrap();
    assert_eq!(offsets.fetch("lockstep.device.many-7", "user.many", 0).await.unwrap(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_group_has_no_offset() {
    let kafka = Kafka::start().await.unwrap();
    kafka.create_topic("user.unknown", 1).await.unwrap();
    let offsets = GroupOffsets::connect(settings(kafka.bootstrap())).await.unwrap();
    assert_eq!(offsets.fetch("lockstep.device.nobody", "user.unknown", 0).await.unwrap(), None);
    // Another group's commit does not leak into it.
    offsets.commit("lockstep.device.somebody", "user.unknown", 0, 9).await.unwrap();
    assert_eq!(offsets.fetch("lockstep.device.nobody", "user.unknown", 0).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdkafka_reads_our_commit_and_we_read_its() {
    let kafka = Kafka::start().await.unwrap();
    kafka.create_topic("user.cross", 1).await.unwrap();
    let offsets = GroupOffsets::connect(settings(kafka.bootstrap())).await.unwrap();

    offsets.commit("lockstep.device.ours", "user.cross", 0, 42).await.unwrap();
    let seen = rdkafka_committed(kafka.bootstrap(), "lockstep.device.ours", "user.cross").await;
    assert_eq!(seen, Offset::Offset(42));

    // rdkafka commits for an assigned (not subscribed) partition, as a member-less group.
    let bootstrap = kafka.bootstrap().to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer = consumer(&bootstrap, "lockstep.device.theirs");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("user.cross", 0, Offset::Offset(0)).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut commit = TopicPartitionList::new();
        commit.add_partition_offset("user.cross", 0, Offset::Offset(17)).unwrap();
        consumer.commit(&commit, CommitMode::Sync).unwrap();
    })
    .await
    .unwrap();
    assert_eq!(offsets.fetch("lockstep.device.theirs", "user.cross", 0).await.unwrap(), Some(17));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_group_forgets_offsets() {
    let kafka = Kafka::start().await.unwrap();
    kafka.create_topic("user.revoke", 1).await.unwrap();
    let offsets = GroupOffsets::connect(settings(kafka.bootstrap())).await.unwrap();
    offsets.commit("lockstep.device.revoked", "user.revoke", 0, 5).await.unwrap();
    offsets.commit("lockstep.device.kept", "user.revoke", 0, 6).await.unwrap();
    offsets.delete_group("lockstep.device.revoked").await.unwrap();
    assert_eq!(offsets.fetch("lockstep.device.revoked", "user.revoke", 0).await.unwrap(), None);
    assert_eq!(offsets.fetch("lockstep.device.kept", "user.revoke", 0).await.unwrap(), Some(6));
    // Deleting again (or a group that never existed) is not an error.
    offsets.delete_group("lockstep.device.revoked").await.unwrap();
    // The group can commit again afterwards.
    offsets.commit("lockstep.device.revoked", "user.revoke", 0, 8).await.unwrap();
    assert_eq!(offsets.fetch("lockstep.device.revoked", "user.revoke", 0).await.unwrap(), Some(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_loss_is_retryable_and_reconnects() {
    let mut kafka = Kafka::start().await.unwrap();
    kafka.create_topic("user.restart", 1).await.unwrap();
    let offsets = GroupOffsets::connect(settings(kafka.bootstrap())).await.unwrap();
    // A fresh broker creates its offsets topic at the first group request and answers
    // COORDINATOR_NOT_AVAILABLE until it is loaded: longer than this client's own retries.
    eventually(Duration::from_secs(60), "the first commit on a fresh broker", || async {
        match offsets.commit("lockstep.device.restart", "user.restart", 0, 77).await {
            Ok(()) => ready(()),
            Err(error) if error.is_retryable() => not_yet(error),
            Err(error) => failed(error),
        }
    })
    .await
    .unwrap();

    // Commits in flight when the broker dies fail (retryably) instead of hanging.
    const WRITERS: usize = 20;
    let committed_once = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (offsets, committed_once) = (offsets.clone(), committed_once.clone());
        writers.spawn(async move {
            let group = format!("lockstep.device.writer-{w}");
            for n in 0.. {
                if let Err(err) = offsets.commit(&group, "user.restart", 0, n).await {
                    return (n, err);
                }
                if n == 0 {
                    committed_once.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            unreachable!()
        });
    }
    // Every writer is committing (a group's first commit takes Kafka about a second), then the kill.
    eventually(Duration::from_secs(60), "every writer committing", || async {
        let committed = committed_once.load(std::sync::atomic::Ordering::Relaxed);
        if committed >= WRITERS { ready(()) } else { not_yet(format!("{committed} of {WRITERS} committed once")) }
    })
    .await
    .unwrap();
    kafka.kill();
    let started = Instant::now();
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(20), writers.join_next())
        .await
        .expect("writers hang after the broker died")
    {
        let (n, err) = joined.unwrap();
        assert!(n > 0, "no commit before the kill");
        assert!(err.is_retryable(), "not retryable: {err}");
    }
    println!("writers stopped {:?} after the kill", started.elapsed());
    let started = Instant::now();
    let err = offsets.fetch("lockstep.device.restart", "user.restart", 0).await.unwrap_err();
    assert!(err.is_retryable(), "not retryable: {err}");
    println!("after kill: {err} ({:?})", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let err = offsets.commit("lockstep.device.restart", "user.restart", 0, 78).await.unwrap_err();
    assert!(err.is_retryable(), "not retryable: {err}");

    kafka.restart().await.unwrap();
    // Same port, same data: the committed offset survived, and the client reconnects.
    assert_eq!(offsets.fetch("lockstep.device.restart", "user.restart", 0).await.unwrap(), Some(77));
    offsets.commit("lockstep.device.restart", "user.restart", 0, 79).await.unwrap();
    assert_eq!(offsets.fetch("lockstep.device.restart", "user.restart", 0).await.unwrap(), Some(79));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_bootstrap_fails_fast() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = Instant::now();
    let err = GroupOffsets::connect(settings(&format!("127.0.0.1:{port}"))).await.err().expect("error");
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Commits per second for 100 groups sharing one connection (printed; asserts only progress).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_100_groups_one_connection() {
    let kafka = Kafka::start().await.unwrap();
    kafka.create_topic("user.bench", 1).await.unwrap();
    let offsets = GroupOffsets::connect(settings(kafka.bootstrap())).await.unwrap();
    let rounds: i64 = std::env::var("GROUP_OFFSETS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    for g in 0..100 {
        offsets.commit(&format!("lockstep.device.bench-{g}"), "user.bench", 0, 0).await.unwrap();
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for g in 0..100 {
        let offsets = offsets.clone();
        tasks.spawn(async move {
            let group = format!("lockstep.device.bench-{g}");
            for n in 1..=rounds {
                offsets.commit(&group, "user.bench", 0, n).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let elapsed = started.elapsed();
    let commits = 100 * rounds;
    println!("{commits} commits in {elapsed:?}: {:.0} commits/s", commits as f64 / elapsed.as_secs_f64());
    assert_eq!(offsets.fetch("lockstep.device.bench-99", "user.bench", 0).await.unwrap(), Some(rounds));
}

/// A device's position as Kafka's own tool shows it (`scripts/kafka-tool consumer-groups
/// --describe`, the jars' ConsumerGroupCommand): the committed offset, the log end and the lag
/// equal what the server tells the device and what the dashboard reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafkas_own_tool_shows_the_offset_and_lag_the_server_and_the_dashboard_report() -> anyhow::Result<()> {
    use lockstep_e2e::{dashboard::Dashboard, device::changes, stack::Stack};
    let events_topic = format!("lockstep.events.test-{}", uuid::Uuid::new_v4());
    let Stack { kafka, server, device: phone } =
        Stack::start_with("phone", &[("LOCKSTEP_EVENTS__TOPIC", events_topic.as_str())]).await?;
    let laptop = phone.pair(&server, "laptop").await?;
    phone.push_ok(changes(5, 16)).await?;
    // The laptop applied offsets 0..=2: its committed position is 3, two behind.
    assert_eq!(laptop.ack(2).await?, 3);
    let group = format!("lockstep.device.{}", laptop.device_id);
    let topic = format!("lockstep.user.{}", laptop.user_id);

    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka-tool");
    let output = tokio::process::Command::new(tool)
        .args(["consumer-groups", "--describe", "--group", &group, "--bootstrap-server", kafka.bootstrap()])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "kafka-tool failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID
    let row: Vec<&str> = stdout
        .lines()
        .find(|line| line.starts_with(&group))
        .with_context(|| format!("no row for {group}:\n{stdout}"))?
        .split_whitespace()
        .collect();
    assert_eq!(row[1..6], [topic.as_str(), "0", "3", "5", "2"], "{stdout}");

    // The server's view, in the device's first heartbeat.
    let mut stream = laptop.subscribe(None).await?;
    let mut received = lockstep_e2e::device::Received::default();
    lockstep_e2e::device::receive_until(&mut stream, &mut received, Duration::from_secs(60), |seen| {
        !seen.heartbeats.is_empty()
    })
    .await?;
    let heartbeat = &received.heartbeats[0];
    assert_eq!((heartbeat.committed_offset, heartbeat.log_end_offset), (3, 5));
    drop(stream);

    // The dashboard's view.
    let dashboard_env = [
        ("LOCKSTEP_DASHBOARD_EVENTS__TOPIC", events_topic.as_str()),
        ("LOCKSTEP_DASHBOARD_REFRESH__INTERVAL", "500ms"),
    ];
    let dashboard = Dashboard::start(kafka.bootstrap(), &dashboard_env).await?;
    eventually(Duration::from_secs(60), "the dashboard showing the laptop committed 3, 2 behind", || async {
        let devices = dashboard.json("/api/v1/devices").await?;
        let shown = devices["devices"]
            .as_array()
            .and_then(|devices| devices.iter().find(|device| device["device_id"] == laptop.device_id.as_str()))
            .map(|device| (device["committed"].as_i64(), device["lag_changes"].as_i64()));
        anyhow::Ok(if shown == Some((Some(3), Some(2))) {
            ready(())
        } else {
            not_yet(format!("it shows {shown:?} for the laptop:\n{devices:#}"))
        })
    })
    .await?;
    Ok(())
}
