//! W0 raw: an rdkafka producer with Lockstep's producer settings → Kafka →
//! an rdkafka consumer with the settings of Lockstep's catch-up readers.
//! The baseline every ratio divides by.

use std::time::Duration;

use anyhow::{Context, bail};
use lockstep_kafka::{fetch_wait, locks::lock};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    error::{KafkaError, RDKafkaErrorCode},
    producer::{FutureProducer, FutureRecord},
};
use tokio::time::Instant;

use crate::{
    Config,
    stats::{self, Metrics, Schedule},
};

/// Lockstep's gateway producer with the server's default settings.
pub fn producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    let settings = lockstep_kafka::KafkaSettings { bootstrap_servers: bootstrap.into(), ..Default::default() };
    Ok(lockstep_kafka::change_producer_config(&settings, "bench-w0-producer").create()?)
}

/// Lockstep's catch-up readers (broker/src/kafka/readers.rs).
fn consumer(bootstrap: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "bench-w0-consumer")
        .set("group.id", "bench.w0")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait::CATCH_UP_READER.as_millis().to_string())
        .set("queued.max.messages.kbytes", "8192")
        .create()?)
}

pub async fn create_topic(bootstrap: &str, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().context("admin client")?;
    let results =
        admin.create_topics(&[NewTopic::new(topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new()).await?;
    for result in results {
        if let Err((name, code)) = result {
            bail!("creating topic {name}: {code}");
        }
    }
    Ok(())
}

fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut payload = vec![0x5a; size.max(8)];
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    payload
}

/// Enqueues one record, waiting while librdkafka's queue is full.
async fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    seq: u64,
    size: usize,
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    let key = format!("r{seq}");
    let body = payload(seq, size);
    loop {
        let record = FutureRecord::to(topic).partition(0).key(key.as_bytes()).payload(&body);
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((error, _)) => return Err(error.into()),
        }
    }
}

/// Enqueues the records `seqs` one after the other, then waits for every delivery report.
async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    seqs: std::ops::Range<u64>,
    size: usize,
) -> anyhow::Result<()> {
    let mut deliveries = Vec::with_capacity(seqs.end.saturating_sub(seqs.start) as usize);
    for seq in seqs {
        deliveries.push(enqueue(producer, topic, seq, size).await?);
    }
    for delivery in deliveries {
        delivery.await.context("producer dropped")?.map_err(|(error, _)| error)?;
    }
    Ok(())
}

/// Enqueues records one after the other for `duration`, then waits for every
/// delivery report. Returns how many it wrote.
async fn produce_for(producer: &FutureProducer, topic: &str, duration: Duration, size: usize) -> anyhow::Result<u64> {
    let deadline = Instant::now() + duration;
    let mut deliveries = Vec::new();
    while Instant::now() < deadline {
        deliveries.push(enqueue(producer, topic, deliveries.len() as u64, size).await?);
    }
    let produced = deliveries.len() as u64;
    for delivery in deliveries {
        delivery.await.context("producer dropped")?.map_err(|(error, _)| error)?;
    }
    Ok(produced)
}

/// Reads `count` records of `topic` from offset 0 on a blocking thread;
/// calls `on_record(seq)` as each arrives; returns the time from the
/// assignment (the consumer is connected already) to the last record.
fn consume(
    bootstrap: &str,
    topic: &str,
    count: u64,
    timeout: Duration,
    on_record: impl FnMut(u64),
) -> anyhow::Result<Duration> {
    consume_with(bootstrap, topic, count, timeout, on_record, || {})
}

/// [`consume`], calling `on_assigned` once the consumer is assigned.
fn consume_with(
    bootstrap: &str,
    topic: &str,
    count: u64,
    timeout: Duration,
    mut on_record: impl FnMut(u64),
    on_assigned: impl FnOnce(),
) -> anyhow::Result<Duration> {
    let consumer = consumer(bootstrap)?;
    // Connected and bootstrapped before the clock starts.
    consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Offset(0))?;
    consumer.assign(&assignment)?;
    on_assigned();
    let started = std::time::Instant::now();
    let mut received = 0;
    while received < count {
        if started.elapsed() > timeout {
            bail!("consumer got {received} of {count} records within {timeout:?}");
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let seq = message
                    .payload()
                    .and_then(|payload| payload.get(..8))
                    .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
                    .context("record without a sequence number")?;
                on_record(seq);
                received += 1;
            }
            Some(Err(error)) => bail!("consume: {error}"),
            None => {}
        }
    }
    Ok(started.elapsed())
}

pub async fn run(bootstrap: &str, config: &Config, round: usize, metrics: &mut Metrics) -> anyhow::Result<()> {
    let producer = producer(bootstrap)?;
    let size = config.payload_bytes;

    let count = config.w0_records;
    // Warm-up: each round starts a fresh Kafka, and its first produce at saturation ran at
    // half the speed of the same produce a minute later in the round (26,575 against 61,198
    // records/s in the run of 2026-12-06 22:27, JIT and page cache still cold), while W1 and
    // the rest run on the warm broker. So the same produce and consume run once first, on a
    // topic of their own; the cold figure is reported, not used as a divisor.
    let warm_up = format!("bench.w0.warm.{round}.{}", uuid::Uuid::new_v4().simple());
    create_topic(bootstrap, &warm_up).await?;
    let started = Instant::now();
    produce_all(&producer, &warm_up, 0..count, size).await?;
    metrics.add(round, "w0.cold_produce_rps", count as f64 / started.elapsed().as_secs_f64());
    let bootstrap_owned = bootstrap.to_string();
    tokio::task::spawn_blocking(move || consume(&bootstrap_owned, &warm_up, count, Duration::from_secs(120), |_| {}))
        .await??;

    // A burst: the warm-up's produce again, on the warm broker (about a third of a second).
    // Reported, not a divisor: W1 pushes for `saturation_time`, and a burst this short is
    // mostly librdkafka's queue and the page cache, and it swings between rounds.
    let topic = format!("bench.w0.burst.{round}.{}", uuid::Uuid::new_v4().simple());
    create_topic(bootstrap, &topic).await?;
    let started = Instant::now();
    produce_all(&producer, &topic, 0..count, size).await?;
    metrics.add(round, "w0.burst_produce_rps", count as f64 / started.elapsed().as_secs_f64());

    // Produce at saturation for as long as W1 pushes at saturation: enqueue until then
    // (librdkafka's queue full holds the producer back), then wait for every delivery report.
    let topic = format!("bench.w0.sat.{round}.{}", uuid::Uuid::new_v4().simple());
    create_topic(bootstrap, &topic).await?;
    let started = Instant::now();
    let produced = produce_for(&producer, &topic, config.saturation_time, size).await?;
    metrics.add(round, "w0.produce_rps", produced as f64 / started.elapsed().as_secs_f64());
    let count = produced;

    // One batch of 100 records at a time, waiting for every ack: the least a
    // push of 100 changes can take.
    let mut batch_times = Vec::new();
    for batch in 0..30u64 {
        let started = Instant::now();
        produce_all(&producer, &topic, count + batch * 100..count + (batch + 1) * 100, size).await?;
        batch_times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    if let Some(summary) = stats::Summary::of(batch_times) {
        metrics.add(round, "w0.batch100_ms", summary.median);
    }

    // Consume what was written, from offset 0: as many records as W4's device is behind.
    let to_read = config.resume_records.min(count);
    let (bootstrap_owned, topic_owned) = (bootstrap.to_string(), topic.clone());
    let consume_time = tokio::task::spawn_blocking(move || {
        consume(&bootstrap_owned, &topic_owned, to_read, Duration::from_secs(120), |_| {})
    })
    .await??;
    metrics.add(round, "w0.consume_rps", to_read as f64 / consume_time.as_secs_f64());

    let count = config.w0_records;

    // Live: produce at saturation while a consumer tails the topic, the raw-Kafka
    // twin of W2 with one device (whose deliveries cannot outrun what is pushed).
    // Records/s from the first enqueue to the last record consumed.
    let topic = format!("bench.w0.tail.{round}.{}", uuid::Uuid::new_v4().simple());
    create_topic(bootstrap, &topic).await?;
    let (bootstrap_owned, topic_owned) = (bootstrap.to_string(), topic.clone());
    let (assigned_tx, assigned_rx) = tokio::sync::oneshot::channel();
    let tail = tokio::task::spawn_blocking(move || {
        let assigned = move || {
            let _ = assigned_tx.send(());
        };
        consume_with(&bootstrap_owned, &topic_owned, count, Duration::from_secs(120), |_| {}, assigned)
    });
    assigned_rx.await.context("the tailing consumer did not start")?;
    let started = Instant::now();
    produce_all(&producer, &topic, 0..count, size).await?;
    tail.await??;
    metrics.add(round, "w0.tail_rps", count as f64 / started.elapsed().as_secs_f64());

    // produce→consume latency on an open-loop schedule at the latency rate.
    let topic = format!("bench.w0.lat.{round}.{}", uuid::Uuid::new_v4().simple());
    create_topic(bootstrap, &topic).await?;
    let count = config.latency_count();
    let schedule = Schedule::new(config.latency_rate);
    let (bootstrap_owned, topic_owned) = (bootstrap.to_string(), topic.clone());
    let consumer = tokio::task::spawn_blocking(move || {
        let mut histogram = stats::histogram();
        consume(&bootstrap_owned, &topic_owned, count, Duration::from_secs(120), |seq| {
            stats::record(&mut histogram, schedule.latency(seq, Instant::now()));
        })
        .map(|_| histogram)
    });
    let acks = std::sync::Arc::new(std::sync::Mutex::new(stats::histogram()));
    let mut deliveries = Vec::with_capacity(count as usize);
    for seq in 0..count {
        tokio::time::sleep_until(schedule.due(seq)).await;
        let delivery = enqueue(&producer, &topic, seq, size).await?;
        let acks = acks.clone();
        deliveries.push(tokio::spawn(async move {
            let outcome = delivery.await;
            stats::record(&mut lock(&acks), schedule.latency(seq, Instant::now()));
            outcome
        }));
    }
    for delivery in deliveries {
        delivery.await?.context("producer dropped")?.map_err(|(error, _)| error)?;
    }
    let histogram = consumer.await??;
    let acks = lock(&acks);
    metrics.add(round, "w0.ack_p50_ms", stats::quantile_ms(&acks, 0.5));
    metrics.add(round, "w0.ack_p99_ms", stats::quantile_ms(&acks, 0.99));
    metrics.add(round, "w0.p50_ms", stats::quantile_ms(&histogram, 0.5));
    metrics.add(round, "w0.p99_ms", stats::quantile_ms(&histogram, 0.99));
    Ok(())
}
