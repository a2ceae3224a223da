//! The events topic, both ways: a consumer-group member that polls on its own
//! thread and hands events to the worker through a bounded channel, and the
//! producer of the worker's own `WakeUp` / `PushTargetRemoved` events.
//!
//! On assignment a partition is read from its beginning, whatever its
//! committed offset: the worker rebuilds its state (including "already woken
//! for log end N", from its own `WakeUp` events) before it acts, so a restart
//! or a rebalance causes no wake-up storm. Offsets are committed only up to
//! events whose wake-ups were acted on (see `worker`).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lockstep_kafka::{fetch_wait, fetch_wait_max_ms, locks::lock};
use lockstep_schemas::{Event, encode_event};
use rdkafka::{
    ClientContext, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext},
    types::RDKafkaRespErr,
};
use tokio::sync::mpsc;

use crate::{Error, settings::Settings};

/// What the poll thread tells the worker, in Kafka's order.
#[derive(Debug)]
pub enum Incoming {
    /// Partitions now ours, each read from its beginning.
    Assigned(Vec<Assignment>),
    /// Partitions no longer ours (their offsets were committed first).
    Revoked(Vec<i32>),
    Record {
        partition: i32,
        offset: i64,
        payload: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct Assignment {
    pub partition: i32,
    /// The group's committed offset when assigned (None: never committed).
    pub committed: Option<i64>,
    /// The log end when assigned: up to it the worker only rebuilds state.
    pub high_watermark: i64,
    /// The first offset still in the partition.
    pub low_watermark: i64,
}

/// partition → offset the worker may commit (all wake-ups before it acted on).
pub type CommitPoints = Arc<Mutex<HashMap<i32, i64>>>;

pub struct GroupContext {
    topic: String,
    timeout: Duration,
    incoming_tx: mpsc::Sender<Incoming>,
    commit_points: CommitPoints,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    // Runs on the poll thread (inside `poll`), where blocking calls are fine.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let committed = consumer.committed_offsets(tpl.clone(), self.timeout).unwrap_or_else(|error| {
                    tracing::warn!(%error, "cannot read the group's committed offsets");
                    TopicPartitionList::new()
                });
                let mut assignments = Vec::new();
                let mut from_start = TopicPartitionList::new();
                for partition in partitions {
                    let committed = committed.find_partition(&self.topic, partition).and_then(|e| match e.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
                    let (low_watermark, high_watermark) =
                        consumer.fetch_watermarks(&self.topic, partition, self.timeout).unwrap_or_else(|error| {
                            tracing::warn!(partition, %error, "cannot read watermarks; acting at once");
                            (0, 0)
                        });
                    let _ = from_start.add_partition_offset(&self.topic, partition, Offset::Beginning);
                    assignments.push(Assignment { partition, committed, high_watermark, low_watermark });
                }
                if let Err(error) = consumer.assign(&from_start) {
                    tracing::error!(%error, "cannot take the assigned partitions");
                }
                tracing::info!(?assignments, "partitions assigned");
                let _ = self.incoming_tx.blocking_send(Incoming::Assigned(assignments));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.commit_points_of(consumer, &partitions);
                if let Err(error) = consumer.unassign() {
                    tracing::warn!(%error, "cannot release partitions");
                }
                tracing::info!(?partitions, "partitions revoked");
                let _ = self.incoming_tx.blocking_send(Incoming::Revoked(partitions));
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                let _ = consumer.unassign();
                let _ = self.incoming_tx.blocking_send(Incoming::Revoked(partitions));
            }
        }
    }
}

impl GroupContext {
    fn commit_points_of(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let points = lock(&self.commit_points).clone();
        let mut offsets = TopicPartitionList::new();
        for partition in partitions {
            if let Some(offset) = points.get(partition) {
                let _ = offsets.add_partition_offset(&self.topic, *partition, Offset::Offset(*offset));
            }
        }
        if offsets.count() > 0
            && let Err(error) = consumer.commit(&offsets, CommitMode::Sync)
        {
            tracing::warn!(%error, "cannot commit offsets of revoked partitions");
        }
    }
}

/// The group member: its consumer (shared with the worker for commits) and the
/// poll thread.
pub struct GroupMember {
    pub consumer: Arc<BaseConsumer<GroupContext>>,
    pub commit_points: CommitPoints,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GroupMember {
    pub fn start(settings: &Settings) -> Result<(Self, mpsc::Receiver<Incoming>), Error> {
        let (incoming_tx, incoming_rx) = mpsc::channel(settings.events.channel_capacity);
        let commit_points = CommitPoints::default();
        let context = GroupContext {
            topic: settings.events.topic.clone(),
            timeout: settings.kafka.request_timeout,
            incoming_tx: incoming_tx.clone(),
            commit_points: commit_points.clone(),
        };
        let mut config = lockstep_kafka::consumer_config(&settings.kafka, "lockstep-push");
        config
            .set("group.id", &settings.events.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("session.timeout.ms", settings.events.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", (settings.events.session_timeout.as_millis() / 4).max(100).to_string());
        config.set("fetch.wait.max.ms", fetch_wait_max_ms(&settings.kafka, fetch_wait::PUSH_WORKER));
        let consumer: BaseConsumer<GroupContext> =
            config.create_with_context(context).map_err(Error::kafka("create consumer"))?;
        consumer.subscribe(&[&settings.events.topic]).map_err(Error::kafka("subscribe"))?;
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let consumer = consumer.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("events-poll".into())
                .spawn(move || poll_loop(consumer, incoming_tx, stop))
                .map_err(|e| Error::Io { path: "events-poll thread".into(), source: e })?
        };
        Ok((Self { consumer, commit_points, stop, thread: Some(thread) }, incoming_rx))
    }

    /// Stops polling and leaves the group (committing the commit points on the way out).
    /// Call with the worker's channel receiver already dropped.
    pub async fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take();
        let consumer = self.consumer;
        // Leaving the group runs the revoke callback, which blocks: not on the runtime.
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(thread) = thread {
                let _ = thread.join();
            }
            drop(consumer);
        })
        .await;
    }
}

fn poll_loop(consumer: Arc<BaseConsumer<GroupContext>>, incoming_tx: mpsc::Sender<Incoming>, stop: Arc<AtomicBool>) {
    use rdkafka::Message;
    while !stop.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                let record = Incoming::Record {
                    partition: message.partition(),
                    offset: message.offset(),
                    payload: message.payload().unwrap_or_default().to_vec(),
                };
                if incoming_tx.blocking_send(record).is_err() {
                    break;
                }
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "events consumer error");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Waits until the events topic exists (the server creates it at start): a
/// consumer subscribed to a missing topic would only notice it at its next
/// metadata refresh, minutes later.
///
/// Dropping the future (a shutdown while it waits) ends the blocking loop too:
/// a runtime waits for its blocking threads, so a loop left running would keep
/// a stopped worker alive for good.
pub async fn wait_for_topic(settings: &Settings) -> Result<(), Error> {
    /// Sets the flag when dropped, with the future that owns it.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let config = lockstep_kafka::base_config(&settings.kafka, "lockstep-push");
    let (topic, timeout) = (settings.events.topic.clone(), settings.kafka.request_timeout);
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let stopped = stop.0.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().map_err(Error::kafka("create metadata client"))?;
        let mut logged = false;
        loop {
            if stopped.load(Ordering::Relaxed) {
                return Ok(());
            }
            let exists = consumer.fetch_metadata(Some(&topic), timeout).is_ok_and(|metadata| {
                metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            });
            if exists {
                return Ok(());
            }
            if !logged {
                tracing::info!(topic, "waiting for the events topic to exist");
                logged = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await
    .map_err(|e| Error::Encode(format!("metadata task: {e}")))?
}

/// Publishes the worker's own events (key = user id, like the server's).
#[derive(Clone)]
pub struct Publisher {
    /// None: events are dropped (tests and measurements without Kafka).
    producer: Option<lockstep_kafka::DeliveryProducer>,
    topic: String,
    timeout: Duration,
}

impl Publisher {
    pub fn new(settings: &Settings) -> Result<Self, Error> {
        let mut config = lockstep_kafka::base_config(&settings.kafka, "lockstep-push");
        config.set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "5");
        // The server's partitioner (Java clients' murmur2): a user's events, ours included,
        // must share one partition, or a replay would miss "already woken".
        config.set("partitioner", "murmur2_random");
        config.set("message.timeout.ms", settings.kafka.produce_timeout.as_millis().to_string());
        let producer = lockstep_kafka::DeliveryProducer::create(&config, "push events producer")
            .map_err(Error::kafka("create producer"))?;
        Ok(Self {
            producer: Some(producer),
            topic: settings.events.topic.clone(),
            timeout: settings.kafka.produce_timeout,
        })
    }

    /// A publisher that drops every event: for tests and measurements of wake-ups alone.
    pub fn disabled() -> Self {
        Self { producer: None, topic: String::new(), timeout: Duration::ZERO }
    }

    /// Returns once Kafka acknowledged the event.
    pub async fn publish(&self, event: &Event) -> Result<(), Error> {
        let payload = encode_event(event).map_err(|e| Error::Encode(e.to_string()))?;
        let Some(producer) = &self.producer else { return Ok(()) };
        let record = lockstep_kafka::Record {
            topic: &self.topic,
            partition: None,
            key: event.user_id.as_bytes(),
            payload: &payload,
            headers: None,
        };
        producer.send(record, self.timeout).await.map(|_| ()).map_err(Error::kafka("produce event"))
    }
}
