//! What any Kafka tool would see in a broker: the records of a user topic or of
//! the events topic, and a group's committed offset, read by plain rdkafka
//! clients; and what retention does to a log, at once (DeleteRecords).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;

/// A plain rdkafka consumer that reads partitions it is assigned, in a group of its
/// own that never commits (so it moves no one's offsets), reporting each partition's end.
fn reader(bootstrap: &str) -> rdkafka::error::KafkaResult<rdkafka::consumer::BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("lockstep-test-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
}

/// Every record of partition 0 of `topic`, read by a plain rdkafka consumer
/// (what any Kafka tool would see), decoded as change envelopes.
pub async fn read_topic(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<(i64, lockstep_schemas::ChangeEnvelope)>> {
    use rdkafka::{Message, Offset, TopicPartitionList, consumer::Consumer};
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer = reader(&bootstrap)?;
        let (_, log_end) = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10))?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&topic, 0, Offset::Beginning)?;
        consumer.assign(&assignment)?;
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let payload = message.payload().context("record without a value")?;
                    records.push((message.offset(), lockstep_schemas::decode_change(payload)?));
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_)))
                    if records.last().is_none_or(|(offset, _)| offset + 1 >= log_end) =>
                {
                    break;
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
                Some(Err(error)) => return Err(error.into()),
                None => {}
            }
            if Instant::now() > deadline {
                bail!("reading {topic} did not finish: {} records of {log_end}", records.len());
            }
        }
        Ok(records)
    })
    .await?
}

/// One record of the events topic: partition, offset, raw value, decoded event.
pub type EventRecord = (i32, i64, Vec<u8>, lockstep_schemas::Event);

/// Every record of every partition of the events topic `topic`, read by a plain
/// rdkafka consumer, decoded as events (raw values kept, to scan them for bytes
/// that must never be there).
pub async fn read_events(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<EventRecord>> {
    use rdkafka::{Message, Offset, TopicPartitionList, consumer::Consumer};
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer = reader(&bootstrap)?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        let mut ends = std::collections::HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for &partition in &partitions {
            let (_, end) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))?;
            if end > 0 {
                ends.insert(partition, end);
                assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
            }
        }
        let mut records = Vec::new();
        if ends.is_empty() {
            return Ok(records);
        }
        consumer.assign(&assignment)?;
        let mut reached = std::collections::HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while reached.len() < ends.len() {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let payload = message.payload().context("event without a value")?.to_vec();
                    let event = lockstep_schemas::decode_event(&payload)?;
                    if message.offset() + 1 >= ends[&message.partition()] {
                        reached.insert(message.partition(), ());
                    }
                    records.push((message.partition(), message.offset(), payload, event));
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => {}
                Some(Err(error)) => return Err(error.into()),
            }
            if Instant::now() > deadline {
                bail!("reading {topic} did not finish: {} records", records.len());
            }
        }
        Ok(records)
    })
    .await?
}

/// The committed offset of `group` on partition 0 of `topic`, as rdkafka reads it
/// (`None` when the group has none).
pub async fn committed_offset(bootstrap: &str, group: &str, topic: &str) -> anyhow::Result<Option<i64>> {
    use rdkafka::{
        Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer},
    };
    let (bootstrap, group, topic) = (bootstrap.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&topic, 0);
        let committed = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
        let offset = committed.find_partition(&topic, 0).context("partition missing")?.offset();
        Ok(match offset {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        })
    })
    .await?
}

/// What retention does to a topic, at once: deletes the records of partition 0
/// of `topic` before `offset` (Kafka's DeleteRecords, as `kafka-delete-records`
/// does), so that the log starts there. Returns the new log start.
pub async fn delete_records_before(bootstrap: &str, topic: &str, offset: i64) -> anyhow::Result<i64> {
    use rdkafka::{
        Offset, TopicPartitionList,
        admin::{AdminClient, AdminOptions},
        client::DefaultClientContext,
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition_offset(topic, 0, Offset::Offset(offset))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let result = admin.delete_records(&partitions, &options).await?;
    let partition = result.find_partition(topic, 0).context("DeleteRecords answered without the partition")?;
    partition.error()?;
    match partition.offset() {
        Offset::Offset(log_start) => Ok(log_start),
        other => anyhow::bail!("DeleteRecords answered with no log start: {other:?}"),
    }
}
