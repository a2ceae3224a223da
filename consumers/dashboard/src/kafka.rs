//! What the dashboard reads from Kafka, and nothing it writes: the events
//! topic (all partitions, from the beginning, on a thread of its own), and on
//! a timer each user log's watermarks, each device's committed offset (an
//! OffsetFetch over a shared connection: the device's group is never joined
//! and nothing is ever committed for it) and the `received_at` of the change
//! each lagging device lacks first.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use lockstep_kafka::{
    GroupOffsets, GroupOffsetsSettings, KafkaError, KafkaSettings, Topics, base_config, device_group, fetch_wait,
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
    let consumer: BaseConsumer = base_config(&settings.events_kafka(), "lockstep-dashboard-events")
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
    /// Reads single records from user topics (one at a time).
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
        let record_reader: BaseConsumer = base_config(&kafka, "lockstep-dashboard-records")
            .set("group.id", format!("{}.records", settings.events.group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", fetch_wait_max_ms(&kafka, fetch_wait::DASHBOARD_RECORDS))
            // One record is wanted at a time: no deep prefetch.
            .set("queued.max.messages.kbytes", "1024")
            .set("fetch.max.bytes", "1048576")
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
        for record in wanted {
            match self.received_at(&record).await {
                Ok(Some(received_at_ms)) => {
                    report.records += 1;
                    locked(fleet).apply_received_at(&record.user_id, record.offset, received_at_ms);
                }
                Ok(None) => {}
                Err(error) => {
                    report.errors += 1;
                    tracing::warn!(%error, user_id = record.user_id, offset = record.offset, "cannot read a change's time");
                }
            }
        }
        report.records_ms = phase.elapsed().as_millis();
        report
    }

    /// The envelope `received_at` of the first change at or after the record's
    /// offset (the oldest one the device lacks), if the log holds one.
    async fn received_at(&self, record: &WantedRecord) -> Result<Option<i64>, DashboardKafkaError> {
        let reader = self.record_reader.clone();
        let topic = user_topic(&self.kafka, &record.user_id);
        let offset = record.offset;
        let timeout = self.kafka.request_timeout;
        tokio::task::spawn_blocking(move || -> Result<Option<i64>, DashboardKafkaError> {
            let reader = locked(&reader);
            let mut assignment = TopicPartitionList::new();
            assignment.add_partition_offset(&topic, 0, Offset::Offset(offset))?;
            reader.assign(&assignment)?;
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                match reader.poll(Duration::from_millis(100)) {
                    Some(Ok(message)) if message.offset() >= offset => {
                        // A record that is not a change envelope has no time: none known.
                        return Ok(message.payload().and_then(|p| decode_change(p).ok()).map(|c| c.received_at_ms));
                    }
                    Some(Ok(_)) | None => {}
                    Some(Err(error)) => return Err(error.into()),
                }
            }
            Ok(None)
        })
        .await
        .map_err(|error| DashboardKafkaError::Task(error.to_string()))?
    }
}
