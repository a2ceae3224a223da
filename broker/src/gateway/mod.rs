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
    collections::HashMap,
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
    kafka::{Producer, ReaderPool, Topics, user_topic},
    settings::{KafkaSettings, LimitsSettings},
};

/// Per-user push state; its mutex serialises a user's pushes, which keeps
/// offsets contiguous with the deduplication mark.
#[derive(Default)]
struct UserPushState {
    /// The dedup index is known to cover the topic up to `indexed_through`.
    ready: bool,
    indexed_through: i64,
}

#[derive(Clone)]
pub struct Gateway {
    producer: Producer,
    topics: Topics,
    readers: ReaderPool,
    dedup: DedupIndex,
    delivery: Delivery,
    kafka: KafkaSettings,
    limits: LimitsSettings,
    users: Arc<Mutex<HashMap<Arc<str>, SharedPushState>>>,
}

type SharedPushState = Arc<tokio::sync::Mutex<UserPushState>>;

impl Gateway {
    pub fn new(
        producer: Producer,
        topics: Topics,
        readers: ReaderPool,
        dedup: DedupIndex,
        delivery: Delivery,
        kafka: KafkaSettings,
        limits: LimitsSettings,
    ) -> Self {
        Self { producer, topics, readers, dedup, delivery, kafka, limits, users: Arc::default() }
    }

    /// Appends a batch to the device's user's topic. The work runs in its own
    /// task, so a device that hangs up (a timeout, a lost connection) does not
    /// cancel it half-way: a change Kafka acknowledged but the dedup index never
    /// recorded would be appended again by the device's retry.
    pub async fn push(&self, device: &AuthedDevice, changes: Vec<Change>) -> Result<Vec<PushResult>, ApiError> {
        validate::validate_batch(&changes, &self.limits)?;
        let (gateway, device) = (self.clone(), device.clone());
        tokio::spawn(async move { gateway.push_to_the_end(&device, changes).await })
            .await
            .map_err(|error| ApiError::Internal(format!("push task failed: {error}")))?
    }

    async fn push_to_the_end(&self, device: &AuthedDevice, changes: Vec<Change>) -> Result<Vec<PushResult>, ApiError> {
        let topic = user_topic(&self.kafka, &device.user_id);
        let user_state = self.user_state(&device.user_id);
        let mut state = user_state.lock().await;
        if !state.ready {
            state.indexed_through = self.reindex(&device.user_id, &topic).await?;
            state.ready = true;
        }

        let ids = changes.iter().map(|change| change.change_id.clone()).collect();
        let known = self.dedup.lookup(&device.user_id, &device.device_id, ids).await?;
        let received_at_ms = now_ms();
        let mut results: Vec<Option<PushResult>> = vec![None; changes.len()];
        let mut in_flight = Vec::new();
        for (index, change) in changes.into_iter().enumerate() {
            let digest = digest_of_change(&change);
            if let Some((offset, stored)) = known.get(&change.change_id) {
                results[index] = Some(if *stored == digest {
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
            let envelope = envelope(device, &change, received_at_ms);
            let payload = encode_change(&envelope).map_err(|error| ApiError::Internal(error.to_string()))?;
            let delivery = self.producer.enqueue(&topic, change.record_id.as_bytes(), &payload);
            in_flight.push((index, digest, change, delivery));
        }

        let (indices, pending): (Vec<_>, Vec<_>) =
            in_flight.into_iter().map(|(index, digest, change, delivery)| ((index, digest, change), delivery)).unzip();
        let outcomes = futures::future::join_all(pending).await;

        let mut entries = Vec::new();
        let mut published = Vec::new();
        let mut next_expected = state.indexed_through;
        let mut contiguous = true;
        for ((index, digest, change), outcome) in indices.into_iter().zip(outcomes) {
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
                    }));
                    results[index] =
                        Some(PushResult { result: Some(push_result::Result::Offset(offset)), duplicate: false });
                }
                Err(error) => {
                    // A failed produce may still have landed (librdkafka cannot always
                    // tell): make the next push re-read the topic before trusting the index.
                    contiguous = false;
                    tracing::warn!(topic, %error, "produce failed");
                    let error = ApiError::from(error);
                    results[index] = Some(failed(error.code(), error.to_string(), error.is_retryable()));
                }
            }
        }

        let advance = contiguous.then_some((state.indexed_through, next_expected));
        match self.dedup.record(&device.user_id, entries, advance).await {
            Ok(()) if contiguous => state.indexed_through = next_expected,
            Ok(()) => state.ready = false,
            Err(error) => {
                // The changes are in Kafka: answer with their offsets anyway; the
                // next push rebuilds the index from the topic.
                tracing::error!(topic, %error, "failed to record pushed changes in the dedup index");
                state.ready = false;
            }
        }
        // Published while the user's push lock is held, so the live tail sees
        // this user's changes in offset order.
        self.delivery.publish(&device.user_id, published);
        drop(state);
        Ok(results.into_iter().map(|result| result.unwrap_or_default()).collect())
    }

    /// Brings the dedup index up to the end of the user's topic by reading
    /// what it is missing. Returns the new mark.
    async fn reindex(&self, user_id: &str, topic: &str) -> Result<i64, ApiError> {
        let from = self.dedup.indexed_through(user_id).await?;
        let watermarks = self.topics.watermarks(topic).await?;
        let mut cursor = from.max(watermarks.log_start);
        if cursor < watermarks.log_end {
            tracing::info!(topic, from = cursor, to = watermarks.log_end, "re-indexing pushed changes");
        }
        let topic: Arc<str> = topic.into();
        while cursor < watermarks.log_end {
            let chunk = {
                let lease = self.readers.lease().await?;
                lease.read(&topic, cursor, Some(watermarks.log_end), 1000, Duration::from_secs(5)).await?
            };
            if chunk.next_offset <= cursor {
                return Err(ApiError::Kafka(crate::kafka::KafkaError::Timeout("re-indexing the user's topic")));
            }
            let entries = chunk
                .records
                .iter()
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
        Ok(through)
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
