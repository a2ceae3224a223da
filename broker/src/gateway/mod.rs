//! Gateway: device → user's Kafka topic.
//!
//! A push is validated whole, deduplicated by (device, change id), wrapped in
//! the Avro change envelope and produced to the user's topic in request order.
//! Each change's result is its offset once Kafka acknowledged it (acks=all,
//! idempotent producer) — never earlier. Acknowledged changes go straight to
//! the user's live subscribers.

mod dedup;
pub mod validate;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

pub use dedup::{DedupIndex, IndexEntry};
use dedup::{digest_of_change, digest_of_envelope};
use lockstep_proto::v1::{Change, DeliveredChange, PushError, PushResult, push_result};
use lockstep_schemas::{CHANGE_ENVELOPE_VERSION, ChangeEnvelope, encode_change};

use crate::{
    accounts::AuthedDevice,
    db::now_ms,
    delivery::Delivery,
    error::ApiError,
    kafka::{KafkaError, Producer, ReaderPool, Topics, user_topic},
    log_guard::LogGuard,
    settings::{KafkaSettings, LimitsSettings, Settings},
};

/// Per-user push state. A user's pushes are pipelined: each one enqueues its
/// records under `enqueue` (which fixes their order in the partition) and
/// takes a ticket; it then waits for Kafka's acks without holding anything,
/// and finishes (dedup record, live publish) strictly in ticket order, which
/// is offset order.
#[derive(Default)]
struct UserPush {
    enqueue: tokio::sync::Mutex<EnqueueState>,
    index: Mutex<IndexState>,
    /// How many tickets have finished; ticket `n` finishes when this is `n`.
    finished: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct EnqueueState {
    next_ticket: u64,
}

#[derive(Default)]
struct IndexState {
    /// The dedup index is known to cover the topic up to `indexed_through`,
    /// in the user's log generation `generation` (see `log_guard`).
    ready: bool,
    indexed_through: i64,
    generation: i64,
    /// (device, change id) of changes enqueued but not yet recorded.
    in_flight: HashSet<(Arc<str>, String)>,
}

impl UserPush {
    fn index(&self) -> std::sync::MutexGuard<'_, IndexState> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn wait_finished(&self, count: u64) {
        let mut finished = self.finished.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = finished.wait_for(|finished| *finished >= count).await;
    }
}

/// Finishes a ticket even if its push fails or panics half-way, so that the
/// user's later pushes are never stuck behind it.
struct Ticket {
    user: Arc<UserPush>,
    number: u64,
    done: bool,
}

impl Ticket {
    fn finish(mut self) {
        self.done = true;
        self.user.finished.send_modify(|finished| *finished = self.number + 1);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (user, number) = (self.user.clone(), self.number);
        tokio::spawn(async move {
            user.wait_finished(number).await;
            user.index().ready = false;
            user.finished.send_modify(|finished| *finished = number + 1);
        });
    }
}

#[derive(Clone)]
pub struct Gateway {
    producer: Producer,
    topics: Topics,
    readers: ReaderPool,
    dedup: DedupIndex,
    delivery: Delivery,
    guard: LogGuard,
    kafka: KafkaSettings,
    limits: LimitsSettings,
    users: Arc<Mutex<HashMap<Arc<str>, SharedPushState>>>,
}

type SharedPushState = Arc<UserPush>;

impl Gateway {
    pub fn new(
        producer: Producer,
        topics: Topics,
        readers: ReaderPool,
        dedup: DedupIndex,
        delivery: Delivery,
        guard: LogGuard,
        settings: &Settings,
    ) -> Self {
        let (kafka, limits) = (settings.kafka.clone(), settings.limits.clone());
        Self { producer, topics, readers, dedup, delivery, guard, kafka, limits, users: Arc::default() }
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
        let (gateway, device) = (self.clone(), device.clone());
        let task = tokio::spawn(async move { gateway.push_to_the_end(&device, changes).await });
        let deadline = self.kafka.produce_timeout + self.kafka.operation_deadline;
        match tokio::time::timeout(deadline, task).await {
            Ok(joined) => joined.map_err(|error| ApiError::Internal(format!("push task failed: {error}")))?,
            Err(_) => Err(ApiError::Kafka(KafkaError::Timeout("produce (the push goes on; retry it unchanged)"))),
        }
    }

    async fn push_to_the_end(&self, device: &AuthedDevice, changes: Vec<Change>) -> Result<Vec<PushResult>, ApiError> {
        let topic = user_topic(&self.kafka, &device.user_id);
        let user = self.user_state(&device.user_id);
        let received_at_ms = now_ms();
        let mut results: Vec<Option<PushResult>> = vec![None; changes.len()];

        // Enqueue, in request order, under the user's enqueue lock.
        let mut enqueue = user.enqueue.lock().await;
        let retrying_in_flight = {
            let index = user.index();
            changes.iter().any(|change| index.in_flight.contains(&(device.device_id.clone(), change.change_id.clone())))
        };
        if retrying_in_flight {
            // A retry of a push still being written (the device gave up on it):
            // let it finish, then answer from the index.
            user.wait_finished(enqueue.next_ticket).await;
        }
        // After that wait: a push that finished meanwhile may have found the index
        // behind, and the log may have been found to have lost changes.
        let current = {
            let index = user.index();
            index.ready && self.guard.cached_generation(&device.user_id) == Some(index.generation)
        };
        if !current {
            // Re-read the topic once every earlier push has finished.
            user.wait_finished(enqueue.next_ticket).await;
            let (through, generation) = self.reindex(&device.user_id, &topic).await?;
            let mut index = user.index();
            index.indexed_through = through;
            index.generation = generation;
            index.ready = true;
        }
        let ids = changes.iter().map(|change| change.change_id.clone()).collect();
        let known = self.dedup.lookup(&device.user_id, &device.device_id, ids).await?;
        let mut to_write = Vec::new();
        {
            let mut index = user.index();
            for (index_in_batch, change) in changes.into_iter().enumerate() {
                let digest = digest_of_change(&change);
                if let Some((offset, stored)) = known.get(&change.change_id) {
                    results[index_in_batch] = Some(if *stored == digest {
                        PushResult { result: Some(push_result::Result::Offset(*offset)), duplicate: true }
                    } else {
                        failed(
                            tonic::Code::AlreadyExists,
                            "change_id was already used for a different change".into(),
                            false,
                        )
                    });
                    continue;
                }
                let key = (device.device_id.clone(), change.change_id.clone());
                if !index.in_flight.insert(key) {
                    results[index_in_batch] = Some(failed(
                        tonic::Code::Unavailable,
                        "this change_id appears twice in the batch; the first one is being written".into(),
                        true,
                    ));
                    continue;
                }
                let envelope = envelope(device, &change, received_at_ms);
                match encode_change(&envelope) {
                    Ok(payload) => to_write.push((index_in_batch, digest, change, payload)),
                    Err(error) => {
                        index.in_flight.remove(&(device.device_id.clone(), change.change_id.clone()));
                        results[index_in_batch] = Some(failed(tonic::Code::Internal, error.to_string(), false));
                    }
                }
            }
        }
        let in_flight: Vec<_> = to_write
            .into_iter()
            .map(|(index_in_batch, digest, change, payload)| {
                let delivery = self.producer.enqueue(&topic, change.record_id.as_bytes(), &payload);
                ((index_in_batch, digest, change), delivery)
            })
            .collect();
        let ticket = Ticket { user: user.clone(), number: enqueue.next_ticket, done: false };
        enqueue.next_ticket += 1;
        drop(enqueue);

        // Kafka's acks, with nothing held: the user's next push enqueues meanwhile.
        let (written, pending): (Vec<_>, Vec<_>) = in_flight.into_iter().unzip();
        let outcomes = futures::future::join_all(pending).await;

        // Finish in ticket (= offset) order.
        user.wait_finished(ticket.number).await;
        let mut entries = Vec::new();
        let mut published = Vec::new();
        let mut ids = Vec::new();
        let mut next_expected = user.index().indexed_through;
        let first_expected = next_expected;
        let mut contiguous = true;
        for ((index_in_batch, digest, change), outcome) in written.into_iter().zip(outcomes) {
            ids.push(change.change_id.clone());
            match outcome {
                Ok(offset) => {
                    contiguous &= offset == next_expected;
                    next_expected = offset + 1;
                    entries.push(IndexEntry {
                        device_id: device.device_id.to_string(),
                        change_id: change.change_id.clone(),
                        offset,
                        digest,
                    });
                    published.push(Arc::new(DeliveredChange {
                        offset,
                        change: Some(change),
                        origin_device_id: device.device_id.to_string(),
                        received_at_ms,
                        undecodable: String::new(),
                    }));
                    results[index_in_batch] =
                        Some(PushResult { result: Some(push_result::Result::Offset(offset)), duplicate: false });
                }
                Err(error) => {
                    // A failed produce may still have landed (librdkafka cannot always
                    // tell): make the next push re-read the topic before trusting the index.
                    contiguous = false;
                    tracing::warn!(topic, %error, "produce failed");
                    let error = ApiError::from(error);
                    results[index_in_batch] = Some(failed(error.code(), error.to_string(), error.is_retryable()));
                }
            }
        }
        let advance = contiguous.then_some((first_expected, next_expected));
        if let Some(end) = entries.iter().map(|entry| entry.offset + 1).max() {
            self.guard.note_acknowledged(&device.user_id, end);
        }
        let recorded = self.dedup.record(&device.user_id, entries, advance).await;
        {
            let mut index = user.index();
            match recorded {
                Ok(()) if contiguous => index.indexed_through = next_expected,
                Ok(()) => index.ready = false,
                Err(error) => {
                    // The changes are in Kafka: answer with their offsets anyway; the
                    // next push rebuilds the index from the topic.
                    tracing::error!(topic, %error, "failed to record pushed changes in the dedup index");
                    index.ready = false;
                }
            }
            for change_id in ids {
                index.in_flight.remove(&(device.device_id.clone(), change_id));
            }
        }
        // Published in ticket order, so the live tail sees this user's changes in offset order.
        self.delivery.publish(&device.user_id, published);
        ticket.finish();
        Ok(results.into_iter().map(|result| result.unwrap_or_default()).collect())
    }

    /// Brings the dedup index up to the end of the user's topic by reading
    /// what it is missing, after checking that the log did not lose changes
    /// (which drops the index). Returns the new mark and the log generation.
    async fn reindex(&self, user_id: &Arc<str>, topic: &str) -> Result<(i64, i64), ApiError> {
        let watermarks = self.topics.user_log_watermarks(topic).await?;
        let generation = self.guard.check(user_id, watermarks, None).await?;
        let from = self.dedup.indexed_through(user_id).await?;
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
                .filter_map(|(offset, record)| record.as_ref().ok().map(|envelope| (offset, envelope)))
                .map(|(offset, envelope)| IndexEntry {
                    device_id: envelope.origin_device_id.clone(),
                    change_id: envelope.change_id.clone(),
                    offset: *offset,
                    digest: digest_of_envelope(envelope),
                })
                .collect();
            self.dedup.record(user_id, entries, None).await?;
            cursor = chunk.next_offset;
            if chunk.end_of_log {
                break;
            }
        }
        let through = cursor.max(from);
        self.dedup.set_indexed_through(user_id, through).await?;
        Ok((through, generation))
    }

    fn user_state(&self, user_id: &Arc<str>) -> SharedPushState {
        let mut users = self.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        users.entry(user_id.clone()).or_default().clone()
    }
}

fn failed(code: tonic::Code, message: String, retryable: bool) -> PushResult {
    PushResult {
        result: Some(push_result::Result::Error(PushError { code: code as i32, message, retryable })),
        duplicate: false,
    }
}

fn envelope(device: &AuthedDevice, change: &Change, received_at_ms: i64) -> ChangeEnvelope {
    let op = if change.op == lockstep_proto::v1::Op::Delete as i32 {
        lockstep_schemas::Op::Delete
    } else {
        lockstep_schemas::Op::Upsert
    };
    ChangeEnvelope {
        schema_version: CHANGE_ENVELOPE_VERSION,
        user_id: device.user_id.to_string(),
        origin_device_id: device.device_id.to_string(),
        change_id: change.change_id.clone(),
        record_id: change.record_id.clone(),
        collection: change.collection.clone(),
        op,
        hlc: change.hlc as i64,
        key_epoch: change.key_epoch,
        nonce: change.nonce.to_vec(),
        ciphertext: change.ciphertext.to_vec(),
        received_at_ms,
    }
}
