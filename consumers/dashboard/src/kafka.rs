//! What the dashboard reads from Kafka, and nothing it writes: the events
//! topic (all partitions, from the beginning, on a thread of its own), and on
//! a timer each user log's watermarks, each device's committed offset (an
//! OffsetFetch over a shared connection: the device's group is never joined
//! and nothing is ever committed for it) and the `received_at` of the change
//! each lagging device lacks first.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use lockstep_kafka::{
    GroupOffsets, GroupOffsetsSettings, KafkaError, KafkaSettings, Topics, consumer_config, device_group, fetch_wait,
    fetch_wait_max_ms, locks::lock as locked, user_topic,
};
use lockstep_schemas::{Event, decode_change, decode_event};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use tokio::sync::mpsc;

use crate::{fleet::WantedRecord, now_ms, settings::Settings};

/// Events read but not yet folded in before the reader thread waits.
pub const EVENT_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DashboardKafkaError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("kafka group offsets: {0}")]
    GroupOffsets(#[from] lockstep_kafka::GroupOffsetsError),
    #[error("kafka blocking task failed: {0}")]
    Task(String),
}

/// Reads every partition of the events topic from the beginning and sends
/// each decoded event to `events_tx`, until `stop` is set or the receiver is
/// gone. Blocking: run it on a thread of its own.
pub fn read_events_blocking(
    settings: &Settings,
    events_tx: mpsc::Sender<Event>,
    stop: Arc<AtomicBool>,
) -> Result<(), DashboardKafkaError> {
    let topic = settings.events.topic.clone();
    let consumer: BaseConsumer = consumer_config(&settings.events_kafka(), "lockstep-dashboard-events")
        .set("group.id", &settings.events.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait_max_ms(&settings.events_kafka(), fetch_wait::DASHBOARD_EVENTS))
        // librdkafka prefetches up to 64 MiB by default; events are tiny and folded at once.
        .set("queued.max.messages.kbytes", "4096")
        .create()?;
    let partitions = loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
            Ok(metadata) => {
                let count = metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len());
                if count > 0 {
                    break count;
                }
                tracing::info!(topic, "events topic not there yet, waiting");
            }
            Err(error) => tracing::warn!(%error, topic, "cannot read the events topic's metadata, retrying"),
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    tracing::info!(topic, partitions, "reading the events topic from the beginning");
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(error)) => {
                tracing::warn!(%error, "events topic read failed");
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(Ok(message)) => {
                metrics::counter!("lockstep_dashboard_events_consumed_total").increment(1);
                match message.payload().map(decode_event) {
                    Some(Ok(event)) => {
                        if events_tx.blocking_send(event).is_err() {
                            return Ok(());
                        }
                    }
                    Some(Err(error)) => {
                        metrics::counter!("lockstep_dashboard_events_undecodable_total").increment(1);
                        tracing::warn!(%error, partition = message.partition(), offset = message.offset(), "undecodable event");
                    }
                    None => {
                        metrics::counter!("lockstep_dashboard_events_undecodable_total").increment(1);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The Kafka clients of the periodic refresh.
pub struct Refresher {
    kafka: KafkaSettings,
    topics: Topics,
    offsets: GroupOffsets,
    /// Reads the records whose time the refresh wants, from many user logs at once.
    record_reader: Arc<Mutex<BaseConsumer>>,
    concurrency: usize,
    max_record_reads: usize,
}

/// What one refresh read.
#[derive(Debug, Default, Clone, Copy)]
pub struct RefreshReport {
    pub users: usize,
    pub devices: usize,
    pub records: usize,
    pub errors: usize,
    pub watermarks_ms: u128,
    pub offsets_ms: u128,
    pub records_ms: u128,
}

impl Refresher {
    pub async fn connect(settings: &Settings) -> Result<Self, DashboardKafkaError> {
        let kafka = settings.server_kafka();
        let topics = Topics::new(&kafka)?;
        let offsets = GroupOffsets::connect(GroupOffsetsSettings {
            bootstrap_servers: kafka.bootstrap_servers.clone(),
            client_id: "lockstep-dashboard".into(),
            request_timeout: kafka.request_timeout,
            max_attempts: 3,
            security: lockstep_kafka::group_offsets::security::KafkaSecurity::from_client_config(&kafka.client_config)?,
        })
        .await?;
        let record_reader: BaseConsumer = consumer_config(&kafka, "lockstep-dashboard-records")
            .set("group.id", format!("{}.records", settings.events.group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", fetch_wait_max_ms(&kafka, fetch_wait::DASHBOARD_RECORDS))
            // One record of each log is wanted: a small batch per log, no deep prefetch.
            .set("max.partition.fetch.bytes", "65536")
            .set("queued.max.messages.kbytes", "8192")
            .set("fetch.max.bytes", "8388608")
            .create()?;
        Ok(Self {
            kafka,
            topics,
            offsets,
            record_reader: Arc::new(Mutex::new(record_reader)),
            concurrency: settings.refresh.concurrency,
            max_record_reads: settings.refresh.max_record_reads,
        })
    }

    /// Reads watermarks and committed offsets of everything `fleet` knows and
    /// folds them in, then the `received_at` of records it lacks.
    pub async fn refresh(&self, fleet: &Mutex<crate::fleet::Fleet>) -> RefreshReport {
        let (users, devices) = locked(fleet).refresh_targets();
        let mut report = RefreshReport { users: users.len(), devices: devices.len(), ..RefreshReport::default() };
        let at_ms = now_ms();
        let phase = Instant::now();
        let watermarks: Vec<_> = stream::iter(users)
            .map(|user_id| async move {
                let topic = user_topic(&self.kafka, &user_id);
                (user_id, self.topics.watermarks(&topic).await)
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for (user_id, result) in watermarks {
            match result {
                Ok(marks) => locked(fleet).apply_watermarks(&user_id, marks.log_start, marks.log_end, at_ms),
                // The log is gone: it holds nothing (the server creates it again, empty).
                Err(KafkaError::TopicMissing { .. }) => locked(fleet).apply_watermarks(&user_id, 0, 0, at_ms),
                Err(error) => {
                    report.errors += 1;
                    tracing::warn!(%error, user_id, "cannot read a user log's watermarks");
                }
            }
        }
        report.watermarks_ms = phase.elapsed().as_millis();
        let at_ms = now_ms();
        let phase = Instant::now();
        let committed: Vec<_> = stream::iter(devices)
            .map(|(device_id, user_id)| async move {
                let group = device_group(&self.kafka, &device_id);
                let topic = user_topic(&self.kafka, &user_id);
                (device_id, self.offsets.fetch(&group, &topic, 0).await)
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for (device_id, result) in committed {
            match result {
                Ok(offset) => locked(fleet).apply_committed(&device_id, offset, at_ms),
                Err(error) => {
                    report.errors += 1;
                    tracing::warn!(%error, device_id, "cannot read a device's committed offset");
                }
            }
        }
        report.offsets_ms = phase.elapsed().as_millis();
        let phase = Instant::now();
        let wanted = locked(fleet).wanted_records(self.max_record_reads);
        for (record, received_at_ms) in self.received_at(wanted, &mut report).await {
            report.records += 1;
            locked(fleet).apply_received_at(&record.user_id, record.offset, received_at_ms);
        }
        report.records_ms = phase.elapsed().as_millis();
        report
    }

    /// The envelope `received_at` of the first change at or after each wanted
    /// record's offset (the oldest one its device lacks), for those the log holds.
    /// One consumer reads every wanted log at once, in waves: each wave assigns
    /// every user log at its lowest offset still wanted and takes one record of each,
    /// so a refresh costs a few fetch round trips, not one per record.
    async fn received_at(&self, wanted: Vec<WantedRecord>, report: &mut RefreshReport) -> Vec<(WantedRecord, i64)> {
        let reader = self.record_reader.clone();
        let kafka = self.kafka.clone();
        let result = tokio::task::spawn_blocking(move || read_received_at(&locked(&reader), &kafka, wanted)).await;
        match result {
            Ok(Ok((found, errors))) => {
                report.errors += errors;
                found
            }
            Ok(Err(error)) => {
                report.errors += 1;
                tracing::warn!(%error, "cannot read the changes' times");
                Vec::new()
            }
            Err(error) => {
                report.errors += 1;
                tracing::warn!(%error, "the change-time reader failed");
                Vec::new()
            }
        }
    }
}

/// See [`Refresher::received_at`]. Returns what was found and how many reads failed.
fn read_received_at(
    reader: &BaseConsumer,
    kafka: &KafkaSettings,
    wanted: Vec<WantedRecord>,
) -> Result<(Vec<(WantedRecord, i64)>, usize), DashboardKafkaError> {
    // Per user log, the offsets still wanted, lowest first.
    let mut pending: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for record in wanted {
        pending.entry(record.user_id).or_default().insert(record.offset);
    }
    let mut found = Vec::new();
    let mut errors = 0;
    while !pending.is_empty() {
        // This wave: each log at its lowest wanted offset.
        let mut waiting: HashMap<String, (String, i64)> = HashMap::with_capacity(pending.len());
        let mut assignment = TopicPartitionList::new();
        for (user_id, offsets) in &pending {
            let Some(&offset) = offsets.first() else { continue };
            let topic = user_topic(kafka, user_id);
            assignment.add_partition_offset(&topic, 0, Offset::Offset(offset))?;
            waiting.insert(topic, (user_id.clone(), offset));
        }
        reader.assign(&assignment)?;
        // librdkafka keeps a partition paused across assignments: the last wave paused them.
        reader.resume(&assignment)?;
        let deadline = Instant::now() + kafka.request_timeout;
        while !waiting.is_empty() && Instant::now() < deadline {
            match reader.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(error)) => {
                    errors += 1;
                    tracing::warn!(%error, "reading a change's time");
                }
                Some(Ok(message)) => {
                    let Some((user_id, offset)) = waiting.get(message.topic()).cloned() else { continue };
                    if message.offset() < offset {
                        continue;
                    }
                    waiting.remove(message.topic());
                    let mut done = TopicPartitionList::new();
                    done.add_partition(message.topic(), 0);
                    reader.pause(&done)?;
                    // A record that is not a change envelope has no time: none known.
                    let received_at = message.payload().and_then(|p| decode_change(p).ok()).map(|c| c.received_at_ms);
                    // It is the first change at or after every wanted offset up to its own.
                    let offsets = pending.get_mut(&user_id).expect("a pending log");
                    let answered: Vec<i64> = offsets.range(..=message.offset()).copied().collect();
                    for wanted in answered {
                        offsets.remove(&wanted);
                        if let Some(received_at) = received_at {
                            found.push((WantedRecord { user_id: user_id.clone(), offset: wanted }, received_at));
                        }
                    }
                }
            }
        }
        // Logs that gave nothing within the deadline are left for the next refresh.
        for (user_id, _) in waiting.into_values() {
            pending.remove(&user_id);
        }
        pending.retain(|_, offsets| !offsets.is_empty());
    }
    reader.unassign()?;
    Ok((found, errors))
}
