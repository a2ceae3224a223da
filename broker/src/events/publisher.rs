//! Sends recorded facts to the events topic: batches of up to
//! [`MAX_BATCH`] records through an idempotent producer (acks=all, key = user
//! id, Java-compatible murmur2 partitioning so that any client finds a
//! user's partition). One batch at a time: a fact that failed is put back
//! before the next batch is taken, so a newer fact about the same subject is
//! never published before an older one.

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use lockstep_kafka::{DeliveryProducer, Record};
use lockstep_schemas::encode_event;
use tokio::{sync::watch, task::JoinHandle};

use super::{Events, Inner, RETRY_BACKOFF, node_id, pending::Pending};
use crate::{
    kafka::{KafkaError, Topics, base_config},
    settings::{KafkaSettings, Settings},
};
use lockstep_kafka::locks::lock;

/// Most records per batch.
const MAX_BATCH: usize = 5_000;
/// Failed batches in a row after which the producer is replaced (an
/// idempotent producer can get stuck for good; see `kafka::producer`).
const REPLACE_AFTER_FAILURES: u32 = 3;

/// The running publisher; [`Publisher::drain`] at shutdown.
pub struct Publisher {
    stop_tx: watch::Sender<Option<tokio::time::Instant>>,
    task: JoinHandle<()>,
}

/// The Kafka settings of the events cluster.
pub fn events_kafka(settings: &Settings) -> KafkaSettings {
    let mut kafka = settings.kafka.clone();
    if let Some(servers) = settings.events.bootstrap_servers.as_ref().filter(|s| !s.trim().is_empty()) {
        kafka.bootstrap_servers = servers.clone();
    }
    kafka
}

fn create_producer(settings: &Settings) -> Result<DeliveryProducer, KafkaError> {
    let config = base_config(&events_kafka(settings), "lockstep-events")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("partitioner", "murmur2_random")
        .set("compression.type", "none")
        .set("message.timeout.ms", settings.kafka.produce_timeout.as_millis().to_string())
        .set("queue.buffering.max.kbytes", "16384")
        .clone();
    DeliveryProducer::create(&config, "events producer").map_err(KafkaError::client("events producer creation"))
}

impl Publisher {
    /// Starts publishing (the task first creates the events topic when
    /// missing, retrying while its cluster is unreachable: the server serves
    /// meanwhile). With `events.enabled = false`, returns a disabled
    /// [`Events`] and no publisher.
    pub fn start(settings: &Settings) -> Result<(Events, Option<Publisher>), KafkaError> {
        let events_settings = &settings.events;
        if !events_settings.enabled {
            return Ok((Events::disabled(), None));
        }
        let topics = Topics::new(&events_kafka(settings))?;
        let node_id = node_id(events_settings, &settings.data_dir)
            .map_err(|error| KafkaError::Task(format!("cannot keep the node id in the data directory: {error}")))?;
        let events = Events::new(node_id, events_settings.clone());
        let producer = create_producer(settings)?;
        let (stop_tx, stop_rx) = watch::channel(None);
        let inner = events.inner.clone().expect("enabled");
        let task = tokio::spawn(run(inner, settings.clone(), topics, producer, stop_rx));
        tracing::info!(topic = events_settings.topic, node_id = events.node_id(), "publishing events");
        Ok((events, Some(Publisher { stop_tx, task })))
    }

    /// Publishes what is pending, for at most `deadline`, then stops.
    pub async fn drain(self, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        self.stop_tx.send_replace(Some(until));
        if tokio::time::timeout_at(until + Duration::from_millis(500), self.task).await.is_err() {
            tracing::warn!(?deadline, "events still pending at the drain deadline");
        }
    }
}

/// Creates the events topic, retrying until it exists or shutdown begins.
async fn ensure_topic(
    topics: &Topics,
    settings: &Settings,
    stop_rx: &mut watch::Receiver<Option<tokio::time::Instant>>,
) -> bool {
    let mut attempt = 0u32;
    loop {
        match topics.ensure_topic(&settings.events.topic, settings.events.partitions).await {
            Ok(()) => return true,
            Err(error) => tracing::warn!(%error, topic = settings.events.topic, "cannot create the events topic yet"),
        }
        attempt += 1;
        let backoff = RETRY_BACKOFF.0.saturating_mul(1 << attempt.min(5)).min(RETRY_BACKOFF.1);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop_rx.changed() => return false,
        }
    }
}

async fn run(
    inner: Arc<Inner>,
    settings: Settings,
    topics: Topics,
    mut producer: DeliveryProducer,
    mut stop_rx: watch::Receiver<Option<tokio::time::Instant>>,
) {
    let topic = settings.events.topic.clone();
    if !ensure_topic(&topics, &settings, &mut stop_rx).await {
        return;
    }
    let mut failures_in_a_row = 0u32;
    loop {
        let stopping = *stop_rx.borrow();
        let batch = lock(&inner.buffer).take(MAX_BATCH);
        if batch.is_empty() {
            if stopping.is_some() {
                break;
            }
            tokio::select! {
                () = inner.wake.notified() => {}
                _ = stop_rx.changed() => {}
            }
            continue;
        }
        if let Some(until) = stopping
            && tokio::time::Instant::now() >= until
        {
            lock(&inner.buffer).restore(batch);
            break;
        }
        let failed = send(&producer, &topic, batch).await;
        let published = failed.published;
        inner.published.fetch_add(published, Ordering::Relaxed);
        metrics::counter!("lockstep_events_published_total").increment(published);
        if failed.records.is_empty() {
            failures_in_a_row = 0;
            continue;
        }
        failures_in_a_row += 1;
        let count = failed.records.len();
        lock(&inner.buffer).restore(failed.records);
        tracing::warn!(failed = count, published, error = failed.error, "events not published; retrying");
        if failures_in_a_row >= REPLACE_AFTER_FAILURES {
            match create_producer(&settings) {
                Ok(fresh) => {
                    let old = std::mem::replace(&mut producer, fresh);
                    // Dropping a producer flushes, which blocks.
                    tokio::task::spawn_blocking(move || drop(old));
                    failures_in_a_row = 0;
                    tracing::warn!("events producer replaced after repeated failures");
                }
                Err(error) => tracing::error!(%error, "cannot create a new events producer"),
            }
        }
        let backoff = RETRY_BACKOFF.0.saturating_mul(1 << failures_in_a_row.min(5)).min(RETRY_BACKOFF.1);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop_rx.changed() => {}
        }
    }
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(2))).await;
}

struct Sent {
    published: u64,
    records: Vec<Pending>,
    error: String,
}

async fn send(producer: &DeliveryProducer, topic: &str, batch: Vec<Pending>) -> Sent {
    let mut waiting = Vec::with_capacity(batch.len());
    let mut failed = Vec::new();
    let mut error = String::new();
    for pending in batch {
        let payload = match encode_event(&pending.event) {
            Ok(payload) => payload,
            Err(encode_error) => {
                // Cannot happen for events the server builds; never retried.
                tracing::error!(error = %encode_error, kind = pending.event.body.kind(), "cannot encode an event: dropped");
                continue;
            }
        };
        let record =
            Record { topic, partition: None, key: pending.event.user_id.as_bytes(), payload: &payload, headers: None };
        match producer.send_now(record) {
            Ok(delivery) => waiting.push((pending, delivery)),
            Err(send_error) => {
                error = send_error.to_string();
                failed.push(pending);
            }
        }
    }
    let mut published = 0;
    for (pending, delivery) in waiting {
        match delivery.await {
            Ok(_) => published += 1,
            Err(delivery_error) => {
                error = delivery_error.to_string();
                failed.push(pending);
            }
        }
    }
    Sent { published, records: failed, error }
}
