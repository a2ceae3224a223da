//! Follows the events topic for what other processes decided that the server
//! must apply to its own state: today, a push worker's
//! `PushTargetRemoved { GONE | REJECTED }` (the push service said the
//! subscription is gone) deletes the stored target, so that `GetPushTarget`
//! tells the truth and the periodic announcement does not bring it back.
//!
//! Offsets of its group (`lockstep.server.targets`) are committed after the
//! database was changed; the first start begins at the topic's end (earlier
//! removals were about targets this server announced before it knew better,
//! and the worker forgot them anyway).

use std::{collections::HashMap, time::Duration};

use lockstep_schemas::{EventBody, TargetRemovedReason, decode_event};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
};

use crate::{
    kafka::{GroupOffsets, GroupOffsetsSettings, KafkaError, fetch_wait, fetch_wait_max_ms},
    push_targets::PushTargets,
    settings::{KafkaSettings, Settings},
    shutdown::ShutdownSource,
};

/// The group whose offsets record how far the server applied the events topic.
pub const FOLLOWER_GROUP: &str = "lockstep.server.targets";
const COMMIT_EVERY: Duration = Duration::from_secs(2);

/// Runs until shutdown begins; retries while the events cluster is away.
pub async fn run(settings: Settings, kafka: KafkaSettings, push_targets: PushTargets, shutdown: ShutdownSource) {
    let Some(mut running) = shutdown.handle() else { return };
    let mut backoff = Duration::from_millis(500);
    loop {
        let outcome = tokio::select! {
            outcome = follow(&settings, &kafka, &push_targets) => outcome,
            () = running.begun() => return,
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, "following the events topic failed; retrying");
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = running.begun() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn follow(settings: &Settings, kafka: &KafkaSettings, push_targets: &PushTargets) -> Result<(), KafkaError> {
    let topic = settings.events.topic.clone();
    let consumer: StreamConsumer = lockstep_kafka::consumer_config(kafka, "lockstep-events-follower")
        .set("group.id", FOLLOWER_GROUP)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", fetch_wait_max_ms(kafka, fetch_wait::EVENTS_FOLLOWER))
        .create()
        .map_err(KafkaError::client("events follower creation"))?;
    let offsets = GroupOffsets::connect(GroupOffsetsSettings {
        bootstrap_servers: kafka.bootstrap_servers.clone(),
        client_id: "lockstep-events-follower".into(),
        request_timeout: kafka.request_timeout,
        max_attempts: 3,
        security: crate::kafka::group_offsets::security::KafkaSecurity::from_client_config(&kafka.client_config)?,
    })
    .await?;
    let partitions = partitions_of(&consumer, &topic, kafka.request_timeout).await?;
    let mut assignment = TopicPartitionList::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    for partition in partitions {
        let start = match offsets.fetch(FOLLOWER_GROUP, &topic, partition).await? {
            Some(committed) => committed,
            None => high_watermark(&consumer, &topic, partition, kafka.request_timeout).await?,
        };
        next.insert(partition, start);
        assignment
            .add_partition_offset(&topic, partition, Offset::Offset(start))
            .map_err(KafkaError::client("events follower assignment"))?;
    }
    consumer.assign(&assignment).map_err(KafkaError::client("events follower assignment"))?;
    tracing::info!(topic, partitions = next.len(), "following the events topic");
    let mut committed = next.clone();
    let mut commit_tick = tokio::time::interval(COMMIT_EVERY);
    loop {
        tokio::select! {
            received = consumer.recv() => {
                let message = received.map_err(KafkaError::client("events follower read"))?;
                if let Some(payload) = message.payload() {
                    apply(payload, push_targets).await?;
                }
                next.insert(message.partition(), message.offset() + 1);
            }
            _ = commit_tick.tick() => {
                for (&partition, &offset) in &next {
                    if committed.get(&partition) != Some(&offset) {
                        offsets.commit(FOLLOWER_GROUP, &topic, partition, offset).await?;
                        committed.insert(partition, offset);
                    }
                }
            }
        }
    }
}

/// Acts on one event; a database failure stops the follower before its
/// offset moves (the event is applied again after the retry).
async fn apply(payload: &[u8], push_targets: &PushTargets) -> Result<(), KafkaError> {
    let Ok(event) = decode_event(payload) else {
        return Ok(()); // not ours to judge; the dashboard and workers report undecodable events
    };
    if let EventBody::PushTargetRemoved {
        device_id,
        reason: TargetRemovedReason::Gone | TargetRemovedReason::Rejected,
    } = &event.body
    {
        let removed = push_targets
            .forget_gone(&event.user_id, device_id, event.at_ms)
            .await
            .map_err(|error| KafkaError::Task(format!("cannot forget a gone push target: {error}")))?;
        if removed {
            tracing::info!(user_id = event.user_id, device_id, by = event.node_id, "push target gone: removed");
        }
    }
    Ok(())
}

async fn partitions_of(consumer: &StreamConsumer, topic: &str, timeout: Duration) -> Result<Vec<i32>, KafkaError> {
    let metadata = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), timeout))
        .map_err(KafkaError::client("events topic metadata"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(KafkaError::TopicMissing { topic: topic.to_owned() });
    }
    Ok(partitions)
}

async fn high_watermark(
    consumer: &StreamConsumer,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<i64, KafkaError> {
    tokio::task::block_in_place(|| consumer.fetch_watermarks(topic, partition, timeout))
        .map(|(_, high)| high)
        .map_err(KafkaError::client("events topic watermarks"))
}
