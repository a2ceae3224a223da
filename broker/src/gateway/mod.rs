//! Gateway: device → user's Kafka topic.
//!
//! A push is validated whole, deduplicated by (device, change id), wrapped in
//! the Avro change envelope and produced to the user's topic in request order.
//! Each change's result is its offset once Kafka acknowledged it (acks=all,
//! idempotent producer) — never earlier. Acknowledged changes go straight to
//! the user's live subscribers.

mod dedup;
mod pipeline;
pub mod reservation;
mod reserve;
pub mod validate;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use dedup::digest_of_change;
pub use dedup::{DedupIndex, IndexEntry};
use lockstep_proto::v1::{Change, PushResult, push_result};
use lockstep_schemas::{CHANGE_ENVELOPE_VERSION, ChangeEnvelopeRef, encode_change_ref};
use pipeline::{LockHold, Plan, PushStage, PushStages, Settled, UserPush, Written, failed, plan_batch, settle};
use tracing::Instrument;

use crate::{
    accounts::AuthedDevice,
    db::now_ms,
    delivery::{Delivery, log_guard::LogGuard},
    error::ApiError,
    events::Events,
    kafka::{KafkaClients, KafkaError, Producer, ReaderPool, Topics, user_topic},
    settings::{KafkaSettings, LimitsSettings, Settings},
    shutdown::{Shutdown, ShutdownSource},
};
use lockstep_kafka::locks::lock;

#[derive(Clone)]
pub struct Gateway {
    producer: Producer,
    topics: Topics,
    readers: ReaderPool,
    dedup: DedupIndex,
    delivery: Delivery,
    guard: LogGuard,
    events: Events,
    shutdown: ShutdownSource,
    kafka: KafkaSettings,
    limits: LimitsSettings,
    users: Arc<Mutex<HashMap<Arc<str>, Arc<UserPush>>>>,
}

impl Gateway {
    pub fn new(
        clients: &KafkaClients,
        dedup: DedupIndex,
        delivery: Delivery,
        guard: LogGuard,
        events: Events,
        shutdown: ShutdownSource,
        settings: &Settings,
    ) -> Self {
        Self {
            producer: clients.producer.clone(),
            topics: clients.topics.clone(),
            readers: clients.readers.clone(),
            dedup,
            delivery,
            guard,
            events,
            shutdown,
            kafka: settings.kafka.clone(),
            limits: settings.limits.clone(),
            users: Arc::default(),
        }
    }

    /// Appends a batch to the device's user's topic. The work runs in its own
    /// task, so a device that hangs up (a timeout, a lost connection) does not
    /// cancel it half-way: a change Kafka acknowledged but the dedup index never
    /// recorded would be appended again by the device's retry.
    ///
    /// The device gets an answer within `produce_timeout + operation_deadline`:
    /// past that it is told UNAVAILABLE while the push goes on; its retry then
    /// waits for it and gets the offsets it got.
    pub async fn push(&self, device: &AuthedDevice, changes: Vec<Change>) -> Result<Vec<PushResult>, ApiError> {
        validate::validate_batch(&changes, &self.limits)?;
        // Shutdown waits for a push that started (its dedup record must be
        // written); a push after shutdown began is not started.
        let running = self.shutdown.handle().filter(|running| !running.has_begun()).ok_or(ApiError::ShuttingDown)?;
        let (gateway, device) = (self.clone(), device.clone());
        let task = tokio::spawn(
            async move { gateway.push_to_the_end(&device, changes, running).await }
                .instrument(tracing::Span::current()),
        );
        let deadline = self.kafka.produce_timeout + self.kafka.operation_deadline;
        match tokio::time::timeout(deadline, task).await {
            Ok(joined) => joined.map_err(|error| ApiError::Internal(format!("push task failed: {error}")))?,
            Err(_) => Err(ApiError::Kafka(KafkaError::Timeout("produce (the push goes on; retry it unchanged)"))),
        }
    }

    async fn push_to_the_end(
        &self,
        device: &AuthedDevice,
        changes: Vec<Change>,
        running: Shutdown,
    ) -> Result<Vec<PushResult>, ApiError> {
        let topic = user_topic(&self.kafka, &device.user_id);
        let user = self.user_state(&device.user_id);
        let received_at_ms = now_ms();
        let mut results: Vec<Option<PushResult>> = vec![None; changes.len()];
        let mut stages = PushStages::start();

        // Several nodes: what nobody holds is reserved before the lock (`reserve`).
        let early = self.claim_early(&user, device, &changes).await;
        // Plan and enqueue, in request order, under the user's enqueue lock.
        let mut enqueue = user.enqueue.lock().await;
        let mut held = LockHold::start();
        if self.dedup.reservations().is_none() && user.retries_in_flight(&device.device_id, &changes) {
            // A retry of a push still being written (the device gave up on it):
            // let it finish and its dedup record commit, then answer from the index.
            // Bounded: a push that died half-way leaves its changes in flight.
            user.wait_finished(enqueue.next_ticket).await;
            user.wait_released(&device.device_id, &changes, self.kafka.produce_timeout).await;
        }
        stages.lap(PushStage::Enqueue);
        held.part("waiting for a retried push");
        user.index().settle_doubts(&device.device_id, &changes, Instant::now());
        held.part("doubts");
        if let Err(error) = self.ensure_index_current(&user, enqueue.next_ticket, &device.user_id, &topic).await {
            if let Some(early) = &early {
                early.abandon(&user, device);
            }
            return Err(error);
        }
        held.part("index current");
        // The span of Kafka's part; its context travels in each record's headers.
        let produce_span = if lockstep_telemetry::tracing_on() {
            tracing::info_span!(target: lockstep_telemetry::TRACE_TARGET, "kafka.produce", otel.kind = "producer", messaging.system = "kafka", messaging.batch.message_count = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        let traceparent = lockstep_telemetry::traceparent_of(&produce_span);
        // With reservations, the claim reads the index for what it reserves (one statement for
        // the whole push): a lookup first would only add a round trip under the lock.
        let known = match (&early, self.dedup.reservations()) {
            (Some(early), _) => early.known.clone(),
            (None, Some(_)) => HashMap::new(),
            (None, None) => {
                let ids = changes.iter().map(|change| change.change_id.clone()).collect();
                self.dedup.lookup(&device.user_id, &device.device_id, ids).await?
            }
        };
        held.part("dedup lookup");
        let mut plans = {
            let mut index = user.index();
            if let Some(early) = &early {
                early.hand_over(&mut index, device);
            }
            plan_batch(&device.device_id, changes, &known, &mut index)
        };
        held.part("plan");
        self.reserve_writes(&user, enqueue.next_ticket, device, &topic, &mut plans, early.as_ref()).await;
        held.part("reserve");
        stages.lap(PushStage::Dedup);
        let mut written = Vec::new();
        let mut pending = Vec::new();
        for (index_in_batch, plan) in plans.into_iter().enumerate() {
            match plan {
                Plan::Answer(result) => results[index_in_batch] = Some(result),
                Plan::Write { digest, change } => match envelope(device, &change, received_at_ms) {
                    Ok(payload) => {
                        let key = change.record_id.as_bytes();
                        pending.push(self.producer.enqueue(&topic, key, &payload, traceparent.as_deref()));
                        written.push(Written { index_in_batch, digest, change });
                    }
                    Err(error) => {
                        user.index().in_flight.remove(&(device.device_id.clone(), change.change_id.clone()));
                        results[index_in_batch] = Some(failed(&error));
                    }
                },
            }
        }
        held.part("encode and hand to the producer");
        let ticket = user.ticket(&mut enqueue, running);
        drop(enqueue);
        held.released(&topic, written.len());
        stages.lap(PushStage::Produce);

        // Kafka's acks, with nothing held: the user's next push enqueues meanwhile.
        produce_span.record("messaging.batch.message_count", pending.len());
        let outcomes = futures::future::join_all(pending).instrument(produce_span).await;
        stages.lap(PushStage::Ack);

        // Settle in ticket (= offset) order.
        user.wait_finished(ticket.number).await;
        let indexed_through = user.index().indexed_through;
        let mut settled = settle(device, received_at_ms, indexed_through, written, outcomes, &traceparent);
        stages.lap(PushStage::Finish);
        let committed = if settled.contiguous {
            Some(self.record(&user, device, indexed_through, &mut settled).await)
        } else {
            // A failure, a gap, or an offset out of sequence (librdkafka reports
            // -1, or another change's offset, after a DuplicateSequenceNumber):
            // Kafka's answers are not to be trusted as they are. Read the log.
            self.verify(&user, device, &topic, &mut settled).await;
            None
        };
        stages.lap(PushStage::Dedup);
        if let (Some(first), Some(last)) = (settled.published.first(), settled.published.last()) {
            let generation = self.guard.cached_generation(&device.user_id).unwrap_or_default();
            let appended = (first.offset, last.offset + 1, settled.published.len() as i64);
            let bytes: usize =
                settled.published.iter().filter_map(|d| d.change.as_ref()).map(|c| c.ciphertext.len()).sum();
            metrics::counter!("lockstep_changes_pushed_total").increment(settled.published.len() as u64);
            metrics::counter!("lockstep_pushed_bytes_total").increment(bytes as u64);
            self.events.log_appended(&device.user_id, generation, appended, &device.device_id, received_at_ms);
        }
        // Published in ticket order, so the live tail sees this user's changes in offset order.
        self.delivery.publish(&device.user_id, std::mem::take(&mut settled.published));
        // The user's next push may settle now: its dedup record is queued behind this one's.
        let running = ticket.finish();
        stages.lap(PushStage::Finish);
        if let Some(committed) = committed
            && let Err(error) = committed.await
        {
            // The changes are in Kafka: answer with their offsets anyway; the
            // next push rebuilds the index from the topic.
            tracing::error!(topic, %error, "failed to record pushed changes in the dedup index");
            user.index().ready = false;
        }
        stages.lap(PushStage::Dedup);
        {
            let mut index = user.index();
            // Only now: a retry arriving before would not find them in the index.
            for change_id in &settled.change_ids {
                index.in_flight.remove(&(device.device_id.clone(), change_id.clone()));
            }
            // A failed produce may still commit until the leader gives up on a stalled
            // follower (kafka.in_doubt_window): a retry let through before appends twice.
            let until = Instant::now() + self.kafka.in_doubt_window;
            for change_id in &settled.failed_ids {
                index.in_doubt.insert((device.device_id.clone(), change_id.clone()), until);
            }
        }
        user.released();
        // Shutdown waited for the dedup record.
        drop(running);
        stages.record();
        for (index_in_batch, result) in settled.results {
            results[index_in_batch] = Some(result);
        }
        Ok(results.into_iter().map(|result| result.unwrap_or_default()).collect())
    }

    /// Queues the dedup record of contiguous, trusted offsets, moving the
    /// index's mark (the mark in memory at once: the user's next push queues its
    /// record behind this one). The returned future ends with the commit.
    async fn record(
        &self,
        user: &UserPush,
        device: &AuthedDevice,
        indexed_through: i64,
        settled: &mut Settled,
    ) -> impl std::future::Future<Output = Result<(), dedup::WriteFailed>> + Send + 'static {
        if let Some(end) = settled.entries.iter().map(|entry| entry.offset + 1).max() {
            self.guard.note_acknowledged(&device.user_id, end);
        }
        let advance = Some((indexed_through, settled.next_expected));
        let committed = self.dedup.submit(&device.user_id, std::mem::take(&mut settled.entries), advance).await;
        user.index().indexed_through = settled.next_expected;
        committed
    }

    /// Re-reads the log and answers each written change with the offset the
    /// log holds it at; a change Kafka acknowledged that the log does not
    /// show is answered UNAVAILABLE (its retry finds it or writes it).
    async fn verify(&self, user: &UserPush, device: &AuthedDevice, topic: &str, settled: &mut Settled) {
        user.index().ready = false;
        let found = match self.reindex(user, &device.user_id, topic).await {
            Ok(()) => {
                let ids = settled.change_ids.clone();
                match self.dedup.lookup(&device.user_id, &device.device_id, ids).await {
                    Ok(found) => found,
                    Err(error) => {
                        tracing::warn!(topic, %error, "cannot look a push's changes up in the dedup index");
                        HashMap::new()
                    }
                }
            }
            Err(error) => {
                tracing::warn!(topic, %error, "cannot re-read the log to check a push's offsets");
                HashMap::new()
            }
        };
        let mut offsets = HashMap::new();
        for ((_, result), change_id) in settled.results.iter_mut().zip(&settled.change_ids) {
            match found.get(change_id) {
                Some((offset, _)) => {
                    *result = PushResult { result: Some(push_result::Result::Offset(*offset)), duplicate: false };
                    offsets.insert(change_id.clone(), *offset);
                }
                None if matches!(result.result, Some(push_result::Result::Offset(_))) => {
                    *result = failed(&ApiError::Unavailable(format!(
                        "kafka acknowledged change_id {change_id} but the log does not show it; retry"
                    )));
                }
                None => {}
            }
        }
        // A change found in the log waits for no late copy of itself.
        settled.failed_ids.retain(|change_id| !offsets.contains_key(change_id));
        settled.entries.clear();
        let mut published: Vec<_> = std::mem::take(&mut settled.published)
            .into_iter()
            .filter_map(|change| {
                let change_id = change.change.as_ref().map(|change| change.change_id.clone())?;
                let offset = *offsets.get(&change_id)?;
                let mut change = Arc::unwrap_or_clone(change);
                change.offset = offset;
                Some(Arc::new(change))
            })
            .collect();
        published.sort_by_key(|change| change.offset);
        settled.published = published;
    }

    /// Re-reads the topic into the dedup index if the index is behind or
    /// belongs to a log generation before the last loss, once every earlier
    /// push (the first `tickets_before`) has finished.
    async fn ensure_index_current(
        &self,
        user: &UserPush,
        tickets_before: u64,
        user_id: &Arc<str>,
        topic: &str,
    ) -> Result<(), ApiError> {
        let current = {
            let index = user.index();
            index.ready && self.guard.cached_generation(user_id) == Some(index.generation)
        };
        if current {
            return Ok(());
        }
        user.wait_finished(tickets_before).await;
        self.reindex(user, user_id, topic).await
    }

    /// Brings the dedup index up to the end of the user's topic by reading
    /// what it is missing, after checking that the log did not lose changes
    /// (which drops the index); then marks `user`'s index current.
    async fn reindex(&self, user: &UserPush, user_id: &Arc<str>, topic: &str) -> Result<(), ApiError> {
        // Reservations that expired before the log end is read are settled by this read.
        let swept_before = match self.dedup.reservations() {
            Some(reservations) => Some(reservations.database_now_ms().await?),
            None => None,
        };
        let (watermarks, generation) = self.guard.read_and_check(&self.topics, user_id, topic, None).await?;
        let (mut from, index_generation) = self.dedup.mark(user_id).await?;
        if index_generation < generation {
            // The log lost changes since the index was written (on whichever node saw it).
            self.dedup.reset_for_generation(user_id, generation, watermarks.log_start).await?;
            from = self.dedup.indexed_through(user_id).await?;
        }
        let mut cursor = from.max(watermarks.log_start);
        if cursor < watermarks.log_end {
            tracing::info!(topic, from = cursor, to = watermarks.log_end, "re-indexing pushed changes");
        }
        let topic: Arc<str> = topic.into();
        while cursor < watermarks.log_end {
            let chunk = {
                let lease = self.readers.lease().await?;
                lease.read(&topic, cursor, Some(watermarks.log_end), (1000, 8 << 20), Duration::from_secs(5)).await?
            };
            if chunk.next_offset <= cursor {
                return Err(ApiError::Kafka(crate::kafka::KafkaError::Timeout("re-indexing the user's topic")));
            }
            // Records that are not envelopes were written by no device: nothing to index.
            let entries = chunk
                .records
                .iter()
                .filter_map(|record| record.change.as_ref().map(|change| (record, change)))
                .map(|(record, change)| IndexEntry {
                    device_id: record.origin_device_id.clone(),
                    change_id: change.change_id.clone(),
                    offset: record.offset,
                    digest: digest_of_change(change),
                })
                .collect();
            self.dedup.record(user_id, entries, None).await.map_err(|error| ApiError::Internal(error.to_string()))?;
            cursor = chunk.next_offset;
            if chunk.end_of_log {
                break;
            }
        }
        let through = cursor.max(from);
        self.dedup.set_indexed_through(user_id, through).await?;
        if let (Some(reservations), Some(before)) = (self.dedup.reservations(), swept_before)
            && let Err(error) = reservations.sweep(user_id, before).await
        {
            tracing::warn!(topic = %topic, %error, "cannot drop settled push reservations");
        }
        let mut index = user.index();
        index.indexed_through = through;
        index.generation = generation;
        index.ready = true;
        Ok(())
    }

    fn user_state(&self, user_id: &Arc<str>) -> Arc<UserPush> {
        let mut users = lock(&self.users);
        let user = users.entry(user_id.clone()).or_default();
        user.used.touch();
        user.clone()
    }

    /// Forgets the push state of users with no push in progress, nothing in
    /// doubt, and no push for `idle_after`. Returns how many were forgotten.
    pub fn evict_idle(&self, idle_after: Duration) -> usize {
        let now = Instant::now();
        let mut users = lock(&self.users);
        let before = users.len();
        // A push in progress holds a reference (its ticket), besides the map's.
        users.retain(|_, user| Arc::strong_count(user) > 1 || !user.used.idle(idle_after) || !user.is_settled(now));
        before - users.len()
    }

    /// Users whose push state this node holds.
    pub fn state_entries(&self) -> usize {
        lock(&self.users).len()
    }
}

/// The Avro envelope of a validated change, encoded from the request's own
/// fields (each copied once, into the returned buffer).
fn envelope(device: &AuthedDevice, change: &Change, received_at_ms: i64) -> Result<Vec<u8>, ApiError> {
    let op = lockstep_schemas::Op::try_from(change.op()).map_err(|error| ApiError::Internal(error.to_string()))?;
    let envelope = ChangeEnvelopeRef {
        schema_version: CHANGE_ENVELOPE_VERSION,
        user_id: &device.user_id,
        origin_device_id: &device.device_id,
        change_id: &change.change_id,
        record_id: &change.record_id,
        collection: &change.collection,
        op,
        hlc: change.hlc as i64,
        key_epoch: change.key_epoch,
        nonce: &change.nonce,
        ciphertext: &change.ciphertext,
        received_at_ms,
    };
    encode_change_ref(&envelope).map_err(|error| ApiError::Internal(error.to_string()))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use lockstep_proto::v1::Op;

    use super::*;

    #[test]
    fn a_change_and_its_envelope_read_back_from_kafka_have_one_digest() {
        let device = AuthedDevice { user_id: "u".into(), device_id: "d".into() };
        for op in [Op::Upsert, Op::Delete] {
            let change = Change {
                change_id: "c1".into(),
                record_id: "r1".into(),
                collection: "notes".into(),
                op: op as i32,
                hlc: (1_700_000_000_000 << 16) | 3,
                key_epoch: 2,
                nonce: Bytes::from_static(&[9; 24]),
                ciphertext: Bytes::from_static(b"sealed"),
            };
            let payload = envelope(&device, &change, 42).unwrap();
            // As re-indexing reads it: a reader's record.
            let mut buffer = crate::delivery::ChunkBuffer::default();
            let read_back = crate::delivery::delivered_record(42, Some(&payload), &mut buffer);
            assert_eq!(read_back.change.as_ref(), Some(&change), "{op:?}");
            assert_eq!(digest_of_change(read_back.change.as_ref().unwrap()), digest_of_change(&change), "{op:?}");
            // Any other content is another digest (a reused id, not a retry).
            let mut other = change.clone();
            other.nonce = Bytes::from_static(&[8; 24]);
            assert_ne!(digest_of_change(&other), digest_of_change(&change));
        }
    }
}
