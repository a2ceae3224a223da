//! `GroupOffsets` (member-less consumer-group offsets over one shared connection) against a real
//! Kafka broker, cross-checked with librdkafka.
use std::time::{Duration, Instant};

use lockstep_broker::kafka::group_offsets::{GroupOffsets, GroupOffsetsSettings};
use lockstep_e2e::kafka::Kafka;
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
    offsets.commit("lockstep.device.restart", "user.restart", 0, 77).await.unwrap();

    // Commits in flight when the broker dies fail (retryably) instead of hanging.
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..20 {
        let offsets = offsets.clone();
        writers.spawn(async move {
            let group = format!("lockstep.device.writer-{w}");
            for n in 0.. {
                if let Err(err) = offsets.commit(&group, "user.restart", 0, n).await {
                    return (n, err);
                }
            }
            unreachable!()
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    // Same port, same sqlite file: the committed offset survived, and the client reconnects.
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
