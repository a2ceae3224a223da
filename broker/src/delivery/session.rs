//! One device's stream: catch up from Kafka, then follow the live tail.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use lockstep_proto::v1::{
    ChangeBatch, DeliveredChange, Heartbeat, Resync, ResyncReason, SubscribeResponse, subscribe_response::Event,
};
use tokio::sync::OwnedSemaphorePermit;

use super::{
    Delivery, DeviceState, LiveLog, LogRead, StopSignal, split_into_batches,
    stream_channel::{StreamMessage, StreamSender, TrySendError},
};
use crate::{
    accounts::AuthedDevice,
    db::now_ms,
    error::ApiError,
    kafka::{KafkaError, PendingRead, ReadChunk, ReaderLease, topics::Watermarks},
    shutdown::Shutdown,
};

/// Longest a reader waits for records it expects before re-checking the log.
const READ_WAIT: Duration = Duration::from_secs(2);
/// How long a read waits at most when Kafka answers slowly: each read that
/// times out without a record waits twice as long as the one before.
const MAX_READ_WAIT: Duration = Duration::from_secs(16);
/// Longest a stream waits for room to tell the device why it ends.
const FINAL_SEND_WAIT: Duration = Duration::from_secs(1);
/// Longest a catching-up session keeps a shared reader while its device keeps
/// up; then it queues again behind the other sessions.
const LEASE_SLICE: Duration = Duration::from_millis(250);
/// Most records in one catch-up read: reads are sized by bytes
/// (`delivery.batch_max_bytes`); this only bounds a chunk of tiny records.
const CHUNK_MAX_RECORDS: usize = 8192;

/// A shared reader this session holds, since when.
struct Lease {
    reader: ReaderLease,
    since: Instant,
}

/// The next chunk, read ahead.
enum Ahead {
    Pending(PendingRead),
    Ready(Result<ReadChunk, KafkaError>),
}

/// Where one catch-up chunk's time went (`lockstep_catchup_stage_seconds`).
#[derive(Default)]
struct ChunkStages {
    /// Waiting for a shared reader (zero while the session keeps one).
    lease: Duration,
    /// Waiting for the reader's chunk, less its decoding (what a read ahead did not hide).
    fetch: Duration,
    /// Decoding the records (in the reader) and making them changes (here).
    decode: Duration,
    /// Waiting for the device's stream to take the messages.
    send: Duration,
}

impl ChunkStages {
    fn record(&self) {
        for (stage, spent) in
            [("lease", self.lease), ("fetch", self.fetch), ("decode", self.decode), ("send", self.send)]
        {
            metrics::histogram!(crate::admin::CATCHUP_STAGE_SECONDS, "stage" => stage).record(spent.as_secs_f64());
        }
    }
}

pub(super) struct Start {
    pub from_offset: Option<i64>,
    pub committed: Option<i64>,
    pub watermarks: Watermarks,
    /// A Resync to send first (a repair), whatever the position.
    pub first_resync: Option<ResyncReason>,
}

pub(super) struct Session {
    pub delivery: Delivery,
    pub live_log: Arc<LiveLog>,
    pub topic: Arc<str>,
    pub device: AuthedDevice,
    pub session_id: u64,
    pub start: Start,
    pub device_state: Arc<DeviceState>,
    pub stream_tx: StreamSender,
    pub stop: Arc<StopSignal>,
    pub _permit: OwnedSemaphorePermit,
    pub _user_slot: crate::slots::Slot,
    /// Shutdown waits for this stream to end.
    pub _running: Shutdown,
}

/// How a stream ended without an error to report.
enum End {
    DeviceGone,
}

/// How a stream ended with one.
enum Ended {
    /// The device took no message within `delivery.send_timeout`.
    Stuck(ApiError),
    Error(ApiError),
}

impl From<ApiError> for Ended {
    fn from(error: ApiError) -> Self {
        Ended::Error(error)
    }
}

impl From<KafkaError> for Ended {
    fn from(error: KafkaError) -> Self {
        Ended::Error(error.into())
    }
}

impl Session {
    pub async fn run(mut self) {
        let device_id = self.device.device_id.clone();
        tracing::debug!(device_id = %device_id, topic = %self.topic, "stream started");
        match self.stream().await {
            Ok(End::DeviceGone) => {
                tracing::debug!(device_id = %device_id, "device closed its stream")
            }
            Err(Ended::Stuck(error)) => {
                tracing::info!(device_id = %device_id, %error, "stream ended: the device takes no data");
                // Its buffer is full: say why only if there is room, and free the slot now.
                let _ = self.stream_tx.try_send(Err(error.into()));
            }
            Err(Ended::Error(error)) => {
                tracing::debug!(device_id = %device_id, %error, "stream ended");
                // A device that stopped reading does not get to hold this task
                // (and its subscription slot, and shutdown) forever.
                let _ = tokio::time::timeout(FINAL_SEND_WAIT, self.stream_tx.send(Err(error.into()))).await;
            }
        }
        self.delivery.end_session(&device_id, self.session_id);
    }

    async fn stream(&mut self) -> Result<End, Ended> {
        let Watermarks { log_start, log_end } = self.start.watermarks;
        let mut cursor = self.start.from_offset.or(self.start.committed).unwrap_or(log_start);
        // The device learns that it is caught up from a heartbeat: one is owed the
        // moment the stream reaches the end of the log after it started or after it
        // sent anything, not a heartbeat interval later (`sync` waits for it).
        let mut caught_up_owed = true;
        if let Some(reason) = self.start.first_resync {
            self.send_resync(log_start, cursor, reason).await?;
            cursor = log_start;
        } else if cursor < log_start || cursor > log_end {
            // The device's history is gone (retention). (A position past the end
            // is a lost log, which `Delivery::subscribe` refused before.)
            self.send_resync(log_start, cursor, ResyncReason::HistoryExpired).await?;
            cursor = log_start;
        }
        // The tail existed before these watermarks were read, so it holds every
        // change from `log_end` on: a device at the end waits on the tail, and
        // one behind reads from Kafka only up to here, never waiting for more.
        self.live_log.note_end(log_end);
        let mut end_rx = self.live_log.watch_end();
        let mut heartbeat = tokio::time::interval(self.delivery.inner.settings.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let batch_max = self.delivery.inner.settings.batch_max_changes;
        loop {
            self.check_stop()?;
            match self.live_log.read(cursor, batch_max) {
                LogRead::Changes(changes) => {
                    cursor = changes.last().map_or(cursor, |change| change.offset + 1);
                    metrics::counter!("lockstep_deliveries_total", "source" => "live").increment(changes.len() as u64);
                    self.send_changes(changes).await?;
                    caught_up_owed = true;
                }
                LogRead::Behind { until } => {
                    // Boxed: an idle stream's task would otherwise carry the catch-up's
                    // state inline all its life (2,656 → 1,464 bytes a stream, debug build).
                    cursor = Box::pin(self.catch_up(cursor, until, &mut heartbeat)).await?;
                    caught_up_owed = true;
                }
                LogRead::AtEnd if std::mem::take(&mut caught_up_owed) => {
                    self.send_heartbeat(cursor).await?;
                    // The next one is due an interval after this one.
                    heartbeat.reset();
                }
                LogRead::AtEnd => {
                    tokio::select! {
                        changed = end_rx.changed() => if changed.is_err() { return Ok(End::DeviceGone) },
                        _ = heartbeat.tick() => self.send_heartbeat(cursor).await?,
                        () = self.stop.stopped() => {}
                        () = self.stream_tx.closed() => return Ok(End::DeviceGone),
                    }
                }
            }
        }
    }

    /// Reads from Kafka from `cursor` up to `until` (or the end of the log)
    /// and forwards the changes. Returns the new cursor. While it waits for a
    /// shared reader or for Kafka, the device still gets its heartbeats: a
    /// busy server or a slow Kafka must not look like a dead connection.
    ///
    /// The session keeps its reader from chunk to chunk while the device keeps
    /// up, and has it read the next chunk while this one goes to the device. It
    /// gives the reader back before any wait for the device (a slow device never
    /// holds a shared reader) and after `LEASE_SLICE` (then it queues behind the
    /// other sessions: the pool is fair). At most two chunks of
    /// `delivery.batch_max_bytes` are in memory per stream besides its buffer.
    async fn catch_up(
        &mut self,
        mut cursor: i64,
        until: Option<i64>,
        heartbeat: &mut tokio::time::Interval,
    ) -> Result<i64, Ended> {
        let settings = &self.delivery.inner.settings;
        let limits = (CHUNK_MAX_RECORDS.max(settings.batch_max_changes), settings.batch_max_bytes);
        let (readers, topic) = (self.delivery.inner.readers.clone(), self.topic.clone());
        let mut wait = READ_WAIT;
        let mut lease: Option<Lease> = None;
        // The chunk from `cursor` on, read while the previous one was sent.
        let mut ahead: Option<Ahead> = None;
        loop {
            self.check_stop()?;
            let mut stages = ChunkStages::default();
            let started = Instant::now();
            let chunk = match ahead.take() {
                Some(Ahead::Ready(chunk)) => chunk,
                Some(Ahead::Pending(pending)) => self.while_waiting(cursor, heartbeat, pending.chunk()).await?,
                None => {
                    let reader = match lease.take() {
                        Some(lease) => lease,
                        None => {
                            let reader = self.while_waiting(cursor, heartbeat, readers.lease()).await??;
                            stages.lease = started.elapsed();
                            Lease { reader, since: Instant::now() }
                        }
                    };
                    let pending = reader.reader.submit(&topic, cursor, until, limits, wait).await;
                    lease = Some(reader);
                    let pending = pending?;
                    self.while_waiting(cursor, heartbeat, pending.chunk()).await?
                }
            };
            let waited = started.elapsed().saturating_sub(stages.lease);
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(KafkaError::OffsetOutOfRange { .. }) => {
                    // The reader dropped its position: nothing to keep it for.
                    lease = None;
                    let watermarks = self.delivery.inner.topics.watermarks(&self.topic).await?;
                    if cursor >= watermarks.log_start && cursor <= watermarks.log_end {
                        continue;
                    }
                    self.send_resync(watermarks.log_start, cursor, ResyncReason::HistoryExpired).await?;
                    return Ok(watermarks.log_start);
                }
                Err(error) => return Err(error.into()),
            };
            // Offsets of a user topic are contiguous (no transactions, no
            // compaction), so a first record after the cursor means the records
            // at the cursor are gone. A read that was out of range may come back
            // from the log start instead of as OFFSET_OUT_OF_RANGE (a reset, or a
            // Kafka-compatible broker that serves so): never skip silently.
            if let Some(first) = chunk.records.first().map(|record| record.offset)
                && first > cursor
            {
                let watermarks = self.delivery.inner.topics.watermarks(&self.topic).await?;
                if cursor < watermarks.log_start {
                    self.send_resync(watermarks.log_start, cursor, ResyncReason::HistoryExpired).await?;
                    return Ok(watermarks.log_start);
                }
                // The device checks contiguity and refuses to move its cursor over a hole.
                tracing::error!(topic = %self.topic, cursor, first, "offsets of a user's log are not contiguous");
            }
            let next = cursor.max(chunk.next_offset);
            let done = chunk.end_of_log || until.is_some_and(|until| next >= until);
            // Read the next chunk while this one goes to the device.
            match lease.take() {
                Some(reader) if !done && chunk.filled && reader.since.elapsed() < LEASE_SLICE => {
                    ahead = Some(Ahead::Pending(reader.reader.submit(&topic, next, until, limits, READ_WAIT).await?));
                    lease = Some(reader);
                }
                Some(reader) if !done && reader.since.elapsed() < LEASE_SLICE => lease = Some(reader),
                _ => {}
            }
            let got_records = !chunk.records.is_empty();
            // The reader decodes while the session waits (or sends, reading ahead).
            stages.fetch = waited.saturating_sub(chunk.decode_time);
            stages.decode = chunk.decode_time;
            if got_records {
                let changes = chunk.records;
                metrics::counter!("lockstep_deliveries_total", "source" => "catchup").increment(changes.len() as u64);
                stages.send = self.send_chunk(changes, cursor, heartbeat, &mut lease, &mut ahead).await?;
            }
            stages.record();
            cursor = next;
            if chunk.end_of_log {
                self.live_log.note_end(cursor);
                return Ok(cursor);
            }
            if until.is_some_and(|until| cursor >= until) {
                return Ok(cursor);
            }
            if got_records {
                wait = READ_WAIT;
            } else if chunk.timed_out && wait < MAX_READ_WAIT {
                // Nothing yet, and no end of log either: Kafka is slow. The reader
                // keeps its fetch; read again at once, waiting longer.
                wait = (wait * 2).min(MAX_READ_WAIT);
            } else {
                // Nothing arrived: are we at the end after all?
                let watermarks = self.delivery.inner.topics.watermarks(&self.topic).await?;
                if cursor >= watermarks.log_end {
                    self.live_log.note_end(watermarks.log_end);
                    return Ok(cursor);
                }
            }
            // The live tail may have caught up with us; prefer it (a read ahead
            // is as good: it holds the same changes).
            if ahead.is_none() && !matches!(self.live_log.read(cursor, 1), LogRead::Behind { .. }) {
                return Ok(cursor);
            }
        }
    }

    /// Sends a chunk's changes in messages of at most `batch_max_changes` and
    /// `batch_max_bytes`. Before the first message that has to wait for the
    /// device, gives the reader back (once its read ahead came back, kept for
    /// later). Returns how long the sends waited for room.
    async fn send_chunk(
        &mut self,
        changes: Vec<DeliveredChange>,
        cursor: i64,
        heartbeat: &mut tokio::time::Interval,
        lease: &mut Option<Lease>,
        ahead: &mut Option<Ahead>,
    ) -> Result<Duration, Ended> {
        let settings = &self.delivery.inner.settings;
        let (max_changes, max_bytes) = (settings.batch_max_changes, settings.batch_max_bytes);
        let _spans = delivery_spans(&changes);
        let mut waited = Duration::ZERO;
        for changes in split_into_batches(changes, max_changes, max_bytes) {
            let message = Ok(SubscribeResponse { event: Some(Event::Changes(ChangeBatch { changes })) });
            let message = match self.stream_tx.try_send(message) {
                Ok(()) => continue,
                Err(TrySendError::Closed) => return Err(device_closed()),
                Err(TrySendError::Full(message)) => message,
            };
            if let Some(Ahead::Pending(pending)) = ahead.take() {
                *ahead = Some(Ahead::Ready(self.while_waiting(cursor, heartbeat, pending.chunk()).await?));
            }
            *lease = None;
            let waiting = Instant::now();
            self.send_message(message).await?;
            waited += waiting.elapsed();
        }
        Ok(waited)
    }

    /// Waits for `work`, sending the device its heartbeats meanwhile; a stop ends the wait.
    async fn while_waiting<T>(
        &mut self,
        cursor: i64,
        heartbeat: &mut tokio::time::Interval,
        work: impl Future<Output = T>,
    ) -> Result<T, Ended> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return Ok(done),
                _ = heartbeat.tick() => self.send_heartbeat(cursor).await?,
                () = self.stop.stopped() => self.check_stop()?,
            }
        }
    }

    /// Sends consecutive changes in messages of at most `batch_max_changes` and `batch_max_bytes`.
    async fn send_changes(&mut self, changes: Vec<DeliveredChange>) -> Result<(), Ended> {
        let settings = &self.delivery.inner.settings;
        let (max_changes, max_bytes) = (settings.batch_max_changes, settings.batch_max_bytes);
        let _spans = delivery_spans(&changes);
        for changes in split_into_batches(changes, max_changes, max_bytes) {
            self.send(Event::Changes(ChangeBatch { changes })).await?;
        }
        Ok(())
    }

    async fn send_resync(&mut self, log_start: i64, previous: i64, reason: ResyncReason) -> Result<(), Ended> {
        tracing::info!(device_id = %self.device.device_id, log_start, previous, ?reason, "resync");
        metrics::counter!("lockstep_resyncs_total", "reason" => reason.as_str_name()).increment(1);
        let resync = Resync { log_start_offset: log_start, previous_offset: previous, reason: reason as i32 };
        self.send(Event::Resync(resync)).await
    }

    async fn send_heartbeat(&mut self, cursor: i64) -> Result<(), Ended> {
        let committed = self.device_state.committed.load(Ordering::Acquire);
        let heartbeat = Heartbeat {
            log_end_offset: self.live_log.end().unwrap_or(cursor).max(cursor),
            committed_offset: committed.max(-1),
            server_time_ms: now_ms(),
        };
        self.send(Event::Heartbeat(heartbeat)).await
    }

    fn check_stop(&self) -> Result<(), ApiError> {
        match self.stop.reason() {
            Some(reason) => Err(reason.into()),
            None => Ok(()),
        }
    }

    /// Sends one message, waiting for room at most `delivery.send_timeout`; a stop or a
    /// vanished device ends the wait.
    async fn send(&mut self, event: Event) -> Result<(), Ended> {
        self.send_message(Ok(SubscribeResponse { event: Some(event) })).await
    }

    async fn send_message(&mut self, message: StreamMessage) -> Result<(), Ended> {
        // Room now (the common case): no wait to set up.
        let message = match self.stream_tx.try_send(message) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed) => return Err(device_closed()),
            Err(TrySendError::Full(message)) => message,
        };
        // Boxed: its wait (a timer, the channel's and the stop's) would otherwise be
        // part of every stream's task for all its life, idle or not.
        let waiting: Pin<Box<dyn Future<Output = Result<(), Ended>> + Send + '_>> =
            Box::pin(self.wait_to_send(message));
        waiting.await
    }

    async fn wait_to_send(&mut self, message: StreamMessage) -> Result<(), Ended> {
        let send_timeout = self.delivery.inner.settings.send_timeout;
        tokio::select! {
            sent = self.stream_tx.send(message) => sent.map_err(|_| device_closed()),
            () = self.stop.stopped() => Ok(self.check_stop()?),
            () = tokio::time::sleep(send_timeout) => Err(Ended::Stuck(ApiError::Unavailable(format!(
                "this device took no data for {} s: the stream ended; subscribe again",
                send_timeout.as_secs()
            )))),
        }
    }
}

/// The device's end of the stream is gone.
fn device_closed() -> Ended {
    ApiError::Aborted("device closed the stream".into()).into()
}

/// Most traces one message to a device continues (one span each).
const MAX_DELIVERY_SPANS: usize = 8;

/// A `lockstep.deliver` span, child of the producing push's `kafka.produce`
/// span, for each traced push among `changes` (when traces are on); they end
/// when the returned guard is dropped, after the send.
fn delivery_spans(changes: &[DeliveredChange]) -> Vec<tracing::Span> {
    if !lockstep_telemetry::tracing_on() {
        return Vec::new();
    }
    let mut traces: Vec<&str> = Vec::new();
    for change in changes {
        if !change.traceparent.is_empty() && !traces.contains(&change.traceparent.as_str()) {
            traces.push(&change.traceparent);
            if traces.len() == MAX_DELIVERY_SPANS {
                break;
            }
        }
    }
    traces
        .into_iter()
        .map(|traceparent| {
            let span = tracing::info_span!(
                target: lockstep_telemetry::TRACE_TARGET,
                "lockstep.deliver",
                otel.kind = "producer",
                messaging.batch.message_count = changes.len(),
            );
            lockstep_telemetry::set_parent_traceparent(&span, traceparent);
            span
        })
        .collect()
}
