//! A fixed pool of Kafka consumers shared by every device that is behind the
//! live cache (a device that was offline, a newly paired device, the
//! deduplication index catching up after a crash).
//!
//! Each reader is one librdkafka consumer on its own OS thread (its `poll`
//! blocks). A task leases a reader, sends it read jobs over a bounded channel
//! and gets the records back as the changes a device receives (decoded on the
//! reader's thread, see `delivery::delivered_record`); consecutive jobs that continue where the
//! last one stopped keep the assignment, so a long catch-up streams without
//! re-fetching. The pool size, not the number of devices, bounds the Kafka
//! clients this process creates.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lockstep_proto::v1::DeliveredChange;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::{KafkaError as RdKafkaError, RDKafkaErrorCode},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{KafkaError, fetch_wait, fetch_wait_max_ms};
use lockstep_kafka::locks::lock;

use crate::{
    delivery::{ChunkBuffer, delivered_record},
    settings::KafkaSettings,
};

/// What one read job returns.
#[derive(Debug, Default)]
pub struct ReadChunk {
    /// Records in offset order, none skipped, as a device receives them: a
    /// record that is not a Lockstep change envelope comes back with
    /// `undecodable` set (and is logged), so that no offset ever disappears
    /// unnoticed. A record's `traceparent` header, if it has a readable one,
    /// is its change's `traceparent`. The chunk's nonces and ciphertexts are
    /// slices of a few shared buffers (see [`ChunkBuffer`]).
    pub records: Vec<DeliveredChange>,
    /// The offset to continue from.
    pub next_offset: i64,
    /// True when the reader saw the end of the log.
    pub end_of_log: bool,
    /// True when the read stopped at its size limits (more may follow at once).
    pub filled: bool,
    /// True when `max_wait` passed before the end of the log, `until` or the
    /// limits: Kafka may just be slow. The reader keeps fetching, so that a
    /// read that continues where this one stopped gets what arrives meanwhile.
    pub timed_out: bool,
    /// Time the reader spent decoding the records (the rest of the read is Kafka's).
    pub decode_time: Duration,
}

/// A record's `traceparent` header (see `telemetry`), if it has a readable one.
fn traceparent_header(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|header| header.key == "traceparent")
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
        .filter(|value| value.len() <= 128)
        .map(str::to_owned)
}

struct ReadJob {
    topic: Arc<str>,
    from: i64,
    until: Option<i64>,
    max_records: usize,
    max_bytes: usize,
    max_wait: Duration,
    reply_tx: oneshot::Sender<Result<ReadChunk, KafkaError>>,
}

#[derive(Clone)]
pub struct ReaderPool {
    idle: Arc<Mutex<Vec<mpsc::Sender<ReadJob>>>>,
    permits: Arc<Semaphore>,
}

/// Exclusive use of one reader until dropped.
pub struct ReaderLease {
    job_tx: Option<mpsc::Sender<ReadJob>>,
    idle: Arc<Mutex<Vec<mpsc::Sender<ReadJob>>>>,
    _permit: OwnedSemaphorePermit,
}

impl ReaderPool {
    pub fn new(settings: &KafkaSettings, readers: usize) -> Result<Self, KafkaError> {
        let mut idle = Vec::with_capacity(readers);
        for index in 0..readers {
            let consumer = create_reader(settings, index)?;
            let (job_tx, job_rx) = mpsc::channel(1);
            std::thread::Builder::new()
                .name(format!("lockstep-reader-{index}"))
                .spawn(move || reader_thread(consumer, job_rx))
                .map_err(|error| KafkaError::Task(error.to_string()))?;
            idle.push(job_tx);
        }
        Ok(Self { idle: Arc::new(Mutex::new(idle)), permits: Arc::new(Semaphore::new(readers)) })
    }

    /// Waits for a free reader.
    pub async fn lease(&self) -> Result<ReaderLease, KafkaError> {
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| KafkaError::WorkerGone("reader pool"))?;
        let job_tx = lock(&self.idle).pop().ok_or(KafkaError::WorkerGone("reader pool"))?;
        Ok(ReaderLease { job_tx: Some(job_tx), idle: self.idle.clone(), _permit: permit })
    }
}

/// A read handed to a leased reader, whose chunk is still to come.
pub struct PendingRead {
    reply_rx: oneshot::Receiver<Result<ReadChunk, KafkaError>>,
}

impl PendingRead {
    pub async fn chunk(self) -> Result<ReadChunk, KafkaError> {
        self.reply_rx.await.map_err(|_| KafkaError::WorkerGone("reader"))?
    }
}

impl ReaderLease {
    /// Reads records of `topic` from `from`, stopping before `until` (if
    /// given), at the end of the log, after `max_records` or `max_bytes` of
    /// values (at least one record), or after `max_wait` without data.
    pub async fn read(
        &self,
        topic: &Arc<str>,
        from: i64,
        until: Option<i64>,
        limits: (usize, usize),
        max_wait: Duration,
    ) -> Result<ReadChunk, KafkaError> {
        self.submit(topic, from, until, limits, max_wait).await?.chunk().await
    }

    /// Hands the reader the read [`Self::read`] does and returns at once, so
    /// that the caller can work meanwhile (send the previous chunk). The
    /// reader works on it even if the lease is dropped before its chunk came:
    /// the next holder's first read then waits for it.
    pub async fn submit(
        &self,
        topic: &Arc<str>,
        from: i64,
        until: Option<i64>,
        limits: (usize, usize),
        max_wait: Duration,
    ) -> Result<PendingRead, KafkaError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let (max_records, max_bytes) = limits;
        let job = ReadJob { topic: topic.clone(), from, until, max_records, max_bytes, max_wait, reply_tx };
        let job_tx = self.job_tx.as_ref().ok_or(KafkaError::WorkerGone("reader"))?;
        job_tx.send(job).await.map_err(|_| KafkaError::WorkerGone("reader"))?;
        Ok(PendingRead { reply_rx })
    }
}

impl Drop for ReaderLease {
    fn drop(&mut self) {
        if let Some(job_tx) = self.job_tx.take() {
            lock(&self.idle).push(job_tx);
        }
    }
}

/// Most records a chunk's buffer is sized for up front (it grows past that if need be).
const RECORDS_PRESIZE: usize = 8192;

/// A reader with no job for this long gives up its assignment.
const IDLE_UNASSIGN: Duration = Duration::from_secs(1);

fn create_reader(settings: &KafkaSettings, index: usize) -> Result<BaseConsumer, KafkaError> {
    // `consumer_config`: a reader's queue fills whenever a catch-up reads faster than its
    // device takes the data; librdkafka's default 1 s fetch back-off stalled it each time.
    lockstep_kafka::consumer_config(settings, &format!("lockstep-reader-{index}"))
        .set("group.id", "lockstep.readers")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", fetch_wait_max_ms(settings, fetch_wait::CATCH_UP_READER))
        .set("queued.max.messages.kbytes", "8192")
        .create()
        .map_err(KafkaError::client("reader creation"))
}

fn reader_thread(consumer: BaseConsumer, mut job_rx: mpsc::Receiver<ReadJob>) {
    // Only to wait for the next job with a timeout on this thread.
    let waiter = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start a kafka reader");
            return;
        }
    };
    // Where the current assignment will deliver next, to avoid re-assigning
    // (and dropping prefetched data) when a job continues the previous one.
    let mut position: Option<(Arc<str>, i64)> = None;
    loop {
        let next = waiter.block_on(async { tokio::time::timeout(IDLE_UNASSIGN, job_rx.recv()).await });
        let job = match next {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(_idle) => {
                // An idle reader stops fetching its last topic: an idle fetch
                // serves no one and costs the broker a request per fetch wait.
                if position.take().is_some()
                    && let Err(error) = consumer.unassign()
                {
                    tracing::warn!(%error, "kafka reader could not drop its assignment");
                }
                continue;
            }
        };
        let result = run_job(&consumer, &mut position, &job);
        // Unless the read stopped at its size limits or its wait (a slow Kafka: the
        // fetch in flight serves the next job), no next job continues it (the
        // requester goes on from the live tail): stop fetching (see IDLE_UNASSIGN).
        if result.as_ref().is_ok_and(|chunk| !chunk.filled && !chunk.timed_out) && position.is_some() {
            if let Err(error) = consumer.unassign() {
                tracing::warn!(%error, "kafka reader could not drop its assignment");
            }
            position = None;
        }
        if result.is_err() {
            position = None;
        }
        // The requester may have gone away (device disconnected): fine.
        let _ = job.reply_tx.send(result);
    }
}

fn run_job(
    consumer: &BaseConsumer,
    position: &mut Option<(Arc<str>, i64)>,
    job: &ReadJob,
) -> Result<ReadChunk, KafkaError> {
    let continues = matches!(position, Some((topic, next)) if *topic == job.topic && *next == job.from);
    if !continues {
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&job.topic, 0, Offset::Offset(job.from))
            .map_err(KafkaError::client("assign"))?;
        consumer.assign(&assignment).map_err(KafkaError::client("assign"))?;
        *position = Some((job.topic.clone(), job.from));
    }
    let mut chunk = ReadChunk {
        // Sized once for a typical full chunk (records of about a KiB), not grown record by record.
        records: Vec::with_capacity(job.max_records.min(job.max_bytes / 1024 + 1).min(RECORDS_PRESIZE)),
        next_offset: job.from,
        end_of_log: false,
        filled: false,
        timed_out: false,
        decode_time: Duration::ZERO,
    };
    if job.until.is_some_and(|until| until <= job.from) {
        return Ok(chunk);
    }
    // The clock is read twice per record (around its decoding, the later reading
    // also serving the deadline check), and again after a poll that brought none.
    let mut now = Instant::now();
    let deadline = now + job.max_wait;
    let mut bytes = 0;
    let mut buffer = ChunkBuffer::default();
    loop {
        if chunk.records.len() >= job.max_records || bytes >= job.max_bytes {
            chunk.filled = true;
            break;
        }
        let remaining = deadline.saturating_duration_since(now);
        if remaining.is_zero() {
            chunk.timed_out = true;
            break;
        }
        match consumer.poll(remaining.min(Duration::from_millis(100))) {
            None => {
                now = Instant::now();
                continue;
            }
            Some(Ok(message)) => {
                let offset = message.offset();
                if offset < chunk.next_offset {
                    now = Instant::now();
                    continue;
                }
                chunk.next_offset = offset + 1;
                bytes += message.payload_len();
                let decoding = Instant::now();
                let mut record = delivered_record(offset, message.payload(), &mut buffer);
                now = Instant::now();
                chunk.decode_time += now.saturating_duration_since(decoding);
                if !record.undecodable.is_empty() {
                    let reason = &record.undecodable;
                    tracing::error!(topic = %job.topic, offset, reason, "undecodable record in a user's log");
                }
                if let Some(traceparent) = traceparent_header(&message) {
                    record.traceparent = traceparent;
                }
                chunk.records.push(record);
                if job.until.is_some_and(|until| chunk.next_offset >= until) {
                    break;
                }
            }
            Some(Err(RdKafkaError::PartitionEOF(_))) => {
                chunk.end_of_log = true;
                break;
            }
            Some(Err(error)) => {
                if matches!(
                    error.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange)
                ) {
                    return Err(KafkaError::OffsetOutOfRange {
                        topic: job.topic.to_string(),
                        offset: chunk.next_offset,
                    });
                }
                if is_transient(&error) {
                    // librdkafka reconnects by itself (e.g. the broker restarted):
                    // keep polling until the job's deadline.
                    tracing::debug!(topic = %job.topic, %error, "transient kafka error while reading");
                    now = Instant::now();
                    continue;
                }
                return Err(KafkaError::Client { operation: "read", source: error });
            }
        }
    }
    // Where the assignment delivers next (an error instead makes the caller drop
    // the position, so only a read that ends well gets here).
    *position = Some((job.topic.clone(), chunk.next_offset));
    Ok(chunk)
}

/// Errors librdkafka reports while it recovers on its own.
fn is_transient(error: &RdKafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::UnknownTopicOrPartition
        )
    )
}
