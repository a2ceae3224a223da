//! Follows the events topic for what other processes decided that the server
//! must apply to its own state:
//! - a push worker's `PushTargetRemoved { GONE | REJECTED }` (the push service
//!   said the subscription is gone) deletes the stored target, so that
//!   `GetPushTarget` tells the truth and the periodic announcement does not
//!   bring it back;
//! - another node's `DeviceRevoked` (several nodes on one PostgreSQL): the
//!   device's token leaves this node's cache and its streams on this node end;
//! - another node's `DeviceConnected` of a device this node streams to: if that stream is newer
//!   (see `delivery::StreamStamp`), this node's stream of the device ends with ABORTED;
//! - another node's `LogAppended` (the doorbell): if this node streams to
//!   devices of that user, their live tail learns the log's new end and the
//!   sessions read the missing changes from the user's topic with the shared
//!   readers (see `Delivery::log_appended_elsewhere`).
//!
//! Every node reads every partition of the topic: the partitions are assigned
//! (not subscribed, so nodes never split them), and each node has its own group
//! for its position, `lockstep.server.targets.<node id>` (the node id is kept
//! in the data directory, so a restarted node resumes where it stopped). A
//! shared group would let one node resume from another's position and skip
//! what it never applied. Offsets are committed after the change was applied;
//! a node's first start begins at the first event written since the process
//! started (earlier removals were about targets this server announced before it
//! knew better, and the worker forgot them anyway; earlier revocations are in
//! the database, which the token cache was loaded from). By time, not at the
//! topic's end when the follower gets there: the follower may position itself
//! seconds later (the topic is still being created), and must not skip what
//! other nodes revoked meanwhile.

use std::{collections::HashMap, time::Duration};

use lockstep_schemas::{EventBody, TargetRemovedReason, decode_event};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
};

use crate::{
    accounts::Accounts,
    delivery::Delivery,
    kafka::{GroupOffsets, GroupOffsetsSettings, KafkaError, fetch_wait, fetch_wait_max_ms},
    push_targets::PushTargets,
    settings::{KafkaSettings, Settings},
    shutdown::ShutdownSource,
};

/// The prefix of the group (one per node: `<prefix>.<node id>`) whose offsets record how
/// far the node applied the events topic.
pub const FOLLOWER_GROUP: &str = "lockstep.server.targets";

/// This node's follower group.
pub fn follower_group(node_id: &str) -> String {
    format!("{FOLLOWER_GROUP}.{node_id}")
}

/// What the follower changes on this node.
#[derive(Clone)]
pub struct Followed {
    pub push_targets: PushTargets,
    pub accounts: Accounts,
    pub delivery: Delivery,
    /// This node's id: its own events were applied when they were recorded.
    pub node_id: String,
}
const COMMIT_EVERY: Duration = Duration::from_secs(2);

/// Runs until shutdown begins; retries while the events cluster is away.
pub async fn run(settings: Settings, kafka: KafkaSettings, followed: Followed, shutdown: ShutdownSource) {
    let Some(mut running) = shutdown.handle() else { return };
    let started_at_ms = crate::db::now_ms();
    let mut backoff = Duration::from_millis(500);
    loop {
        let outcome = tokio::select! {
            outcome = follow(&settings, &kafka, &followed, started_at_ms) => outcome,
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

async fn follow(
    settings: &Settings,
    kafka: &KafkaSettings,
    followed: &Followed,
    started_at_ms: i64,
) -> Result<(), KafkaError> {
    let topic = settings.events.topic.clone();
    let group = follower_group(&followed.node_id);
    let consumer: StreamConsumer = lockstep_kafka::consumer_config(kafka, "lockstep-events-follower")
        .set("group.id", &group)
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
        let start = match offsets.fetch(&group, &topic, partition).await? {
            Some(committed) => committed,
            None => first_since(&consumer, &topic, partition, started_at_ms, kafka.request_timeout).await?,
        };
        next.insert(partition, start);
        assignment
            .add_partition_offset(&topic, partition, Offset::Offset(start))
            .map_err(KafkaError::client("events follower assignment"))?;
    }
    consumer.assign(&assignment).map_err(KafkaError::client("events follower assignment"))?;
    tracing::info!(topic, group, partitions = next.len(), "following the events topic");
    let mut committed = next.clone();
    let mut commit_tick = tokio::time::interval(COMMIT_EVERY);
    loop {
        tokio::select! {
            received = consumer.recv() => {
                let message = received.map_err(KafkaError::client("events follower read"))?;
                if let Some(payload) = message.payload() {
                    apply(payload, followed).await?;
                }
                next.insert(message.partition(), message.offset() + 1);
            }
            _ = commit_tick.tick() => {
                for (&partition, &offset) in &next {
                    if committed.get(&partition) != Some(&offset) {
                        offsets.commit(&group, &topic, partition, offset).await?;
                        committed.insert(partition, offset);
                    }
                }
            }
        }
    }
}

/// Acts on one event; a database failure stops the follower before its
/// offset moves (the event is applied again after the retry).
async fn apply(payload: &[u8], followed: &Followed) -> Result<(), KafkaError> {
    let Ok(event) = decode_event(payload) else {
        return Ok(()); // not ours to judge; the dashboard and workers report undecodable events
    };
    // This node's own facts were applied when they were recorded.
    let elsewhere = event.node_id != followed.node_id;
    match &event.body {
        EventBody::LogAppended { log_end, .. } if elsewhere => {
            followed.delivery.log_appended_elsewhere(&event.user_id, *log_end);
        }
        EventBody::DeviceConnected { device_id, stream_started_ms, .. } if elsewhere => {
            // A newer stream of a device this node streams to ends this node's (ABORTED).
            followed.delivery.connected_elsewhere(device_id, &event.node_id, *stream_started_ms);
        }
        EventBody::DeviceRevoked { device_id } if elsewhere => {
            // The row is revoked already (the event follows the commit): a later use of the
            // token asks the database, and the device's streams here end now.
            followed.accounts.forget_device(device_id);
            followed.delivery.revoke(device_id);
            tracing::info!(user_id = event.user_id, device_id, by = event.node_id, "device revoked on another node");
        }
        _ => {}
    }
    if let EventBody::PushTargetRemoved {
        device_id,
        reason: TargetRemovedReason::Gone | TargetRemovedReason::Rejected,
    } = &event.body
    {
        let removed = followed
            .push_targets
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

/// The offset of the first event of `partition` written at or after `since_ms`, or the
/// partition's end if there is none.
async fn first_since(
    consumer: &StreamConsumer,
    topic: &str,
    partition: i32,
    since_ms: i64,
    timeout: Duration,
) -> Result<i64, KafkaError> {
    let mut query = TopicPartitionList::new();
    query
        .add_partition_offset(topic, partition, Offset::Offset(since_ms))
        .map_err(KafkaError::client("events topic offsets by time"))?;
    let found = tokio::task::block_in_place(|| consumer.offsets_for_times(query, timeout))
        .map_err(KafkaError::client("events topic offsets by time"))?;
    match found.find_partition(topic, partition).map(|element| element.offset()) {
        Some(Offset::Offset(offset)) => Ok(offset),
        _ => high_watermark(consumer, topic, partition, timeout).await,
    }
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
