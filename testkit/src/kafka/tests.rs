use std::time::{Duration, Instant};

use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
    producer::{FutureProducer, FutureRecord},
};

use super::*;

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

/// The kit, `scripts/lib.sh`, the POM and docker-compose.yml name one Kafka version;
/// `scripts/run` builds its node from the same files the kit reads.
#[test]
fn one_kafka_version_and_one_config() {
    assert!(repo_file("scripts/kafka/pom.xml").contains(&format!("<kafka.version>{KAFKA_VERSION}</kafka.version>")));
    assert!(repo_file("scripts/lib.sh").contains(&format!("KAFKA_VERSION=\"{KAFKA_VERSION}\"")));
    assert!(repo_file("docker-compose.yml").contains(&format!("image: apache/kafka:{KAFKA_VERSION}")));
    let lib = repo_file("scripts/lib.sh");
    for file in ["kafka/server.properties", "kafka/jvm.options", "kafka/log4j2.properties"] {
        assert!(lib.contains(&format!("$LOCKSTEP_SCRIPTS/{file}")), "scripts/lib.sh does not read {file}");
    }
    // scripts/run and scripts/cluster start their nodes with lib.sh's one way (no second copy).
    for script in ["scripts/run", "scripts/cluster"] {
        let text = repo_file(script);
        assert!(text.contains("kafka_prepare_node") && text.contains("kafka_start_node"), "{script}");
        assert!(!text.contains("kafka.Kafka"), "{script} starts Kafka itself instead of kafka_start_node");
    }
    let start = lib.split("kafka_start_node() {").nth(1).expect("kafka_start_node in scripts/lib.sh");
    assert!(start.split("\n}\n").next().is_some_and(|body| body.contains("kafka_jvm_options")));
    assert!(node::option_lines(JVM_OPTIONS).any(|line| line.starts_with("-Xmx")));
    assert!(SERVER_PROPERTIES.contains("offsets.retention.minutes=576000"));
}

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "6000")
        .create()
        .unwrap()
}

async fn produce(producer: &FutureProducer, topic: &str, count: usize) -> anyhow::Result<()> {
    for i in 0..count {
        let key = format!("k{i}");
        producer
            .send(FutureRecord::to(topic).key(&key).payload("value"), Duration::from_secs(10))
            .await
            .map_err(|(error, _)| anyhow::anyhow!("produce: {error}"))?;
    }
    Ok(())
}

async fn log_end(bootstrap: &str, topic: &str) -> anyhow::Result<i64> {
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create()?;
        Ok(consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10))?.1)
    })
    .await?
}

#[tokio::test]
async fn records_survive_kill_and_graceful_restart() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut kafka = Kafka::start().await?;
    eprintln!("one broker: format and start in {:?}", started.elapsed());
    kafka.create_topic("t", 1).await?;
    produce(&producer(kafka.bootstrap()), "t", 10).await?;

    let pid = kafka.pid();
    kafka.kill();
    assert_eq!(kafka.pid(), 0);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the JVM outlived kill()");
    let started = Instant::now();
    kafka.restart().await?;
    eprintln!("one broker: restart after kill -9 in {:?}", started.elapsed());
    assert_eq!(log_end(kafka.bootstrap(), "t").await?, 10);

    let started = Instant::now();
    kafka.restart_gracefully().await?;
    eprintln!("one broker: SIGTERM and start in {:?}", started.elapsed());
    assert_eq!(log_end(kafka.bootstrap(), "t").await?, 10);
    produce(&producer(kafka.bootstrap()), "t", 5).await?;
    assert_eq!(log_end(kafka.bootstrap(), "t").await?, 15);

    let dir = kafka.data_dir().to_path_buf();
    drop(kafka);
    assert!(!dir.exists(), "the broker's directory outlived it");
    Ok(())
}

#[tokio::test]
async fn shared_is_one_broker() -> anyhow::Result<()> {
    let first = Kafka::shared().await?;
    let second = Kafka::shared().await?;
    assert!(std::ptr::eq(first, second));
    assert_ne!(first.pid(), 0);
    first.create_topic("shared-t", 1).await?;
    produce(&producer(second.bootstrap()), "shared-t", 1).await?;
    Ok(())
}

fn metadata_with(bootstrap: &str, credentials: Option<(&str, &str)>) -> anyhow::Result<usize> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    if let Some((user, password)) = credentials {
        config
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "SCRAM-SHA-256")
            .set("sasl.username", user)
            .set("sasl.password", password);
    }
    let consumer: BaseConsumer = config.create()?;
    Ok(consumer.fetch_metadata(None, Duration::from_secs(3))?.brokers().len())
}

#[tokio::test]
async fn scram_authentication() -> anyhow::Result<()> {
    let mut kafka = Kafka::start().await?;
    kafka.create_scram_user("lockstep", "hunter2").await?;
    kafka.set_authentication(true);
    kafka.restart_gracefully().await?;
    let bootstrap = kafka.bootstrap().to_string();
    tokio::task::spawn_blocking(move || {
        assert!(metadata_with(&bootstrap, None).is_err(), "a client without credentials got metadata");
        assert!(metadata_with(&bootstrap, Some(("lockstep", "wrong"))).is_err(), "a wrong password got metadata");
        assert_eq!(metadata_with(&bootstrap, Some(("lockstep", "hunter2"))).unwrap(), 1);
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn tmpfs_storage() -> anyhow::Result<()> {
    let kafka = match Kafka::start_with(KafkaOptions { storage_tmpfs_mib: Some(32), ..Default::default() }).await {
        Err(error) if error.is::<TmpfsRefused>() => {
            eprintln!("skipped: {error}");
            return Ok(());
        }
        other => other?,
    };
    kafka.create_topic("t", 1).await?;
    produce(&producer(kafka.bootstrap()), "t", 3).await?;
    assert!(kafka.storage_dir().join("t-0").is_dir(), "the log is not on the tmpfs");
    Ok(())
}

#[tokio::test]
async fn cluster_fails_over_and_refuses_without_quorum() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut cluster = KafkaCluster::start(3).await?;
    eprintln!("three nodes: format and start in {:?}", started.elapsed());
    cluster.create_topic("t", 1).await?;
    let producer = producer(cluster.bootstrap());
    produce(&producer, "t", 5).await?;
    assert_eq!(cluster.isr_of("t", 0).await?.len(), 3);
    let coordinator = cluster.group_coordinator("lockstep.device.X").await?;
    assert!(coordinator.is_some());

    let leader = cluster.leader_of("t", 0).await?.expect("a leader");
    cluster.kill(leader);
    let started = Instant::now();
    let new_leader = loop {
        if let Some(node) = cluster.leader_of("t", 0).await?.filter(|&node| node != leader) {
            break node;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("new leader {new_leader} after {:?}", started.elapsed());
    produce(&producer, "t", 5).await?;

    // Two nodes down: acks=all with min.insync.replicas=2 cannot succeed.
    let third = (0..3).find(|&node| node != leader && node != new_leader).unwrap();
    cluster.kill(third);
    let refused = produce(&producer, "t", 1).await;
    eprintln!("with two nodes down: {refused:?}");
    assert!(refused.is_err(), "a record was acknowledged without two in-sync replicas");

    let started = Instant::now();
    cluster.restart(third).await?;
    eprintln!("node restart in {:?}", started.elapsed());
    cluster.wait_in_isr("t", 0, third, Duration::from_secs(30)).await?;
    produce(&producer, "t", 1).await?;
    Ok(())
}
