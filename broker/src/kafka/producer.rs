//! The gateway's one producer: idempotent, acks=all. A push is answered only
//! after the delivery report for each of its records arrived.
//!
//! An idempotent producer can get stuck for good: after a fatal error (e.g. a
//! fenced producer or an out-of-order sequence librdkafka cannot recover), or
//! when the broker keeps refusing its producer id or epoch (a Kafka-compatible
//! broker used before, Nisshi 0.7, failed the epoch bump librdkafka makes after
//! timed-out requests and answered "Unknown broker error" to that producer
//! forever, while a new producer worked at once). Such a producer is replaced by
//! a fresh one, without a restart.

use std::{
    future::Future,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use lockstep_kafka::{DeliveryProducer, Record};
use rdkafka::{
    error::RDKafkaErrorCode,
    message::{Header, OwnedHeaders},
    producer::Producer as _,
};

use super::KafkaError;
use crate::settings::KafkaSettings;
use lockstep_kafka::locks::{read, write};

/// Failures in a row, of the kinds a stuck producer shows, before it is replaced.
const STUCK_AFTER_FAILURES: u32 = 2;
/// A new producer is left alone this long before it may be replaced again.
const MIN_PRODUCER_AGE: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    settings: KafkaSettings,
    current: RwLock<Arc<Instance>>,
}

/// One librdkafka producer and its recent failures.
struct Instance {
    producer: DeliveryProducer,
    number: u64,
    created: Instant,
    failures_in_a_row: AtomicU32,
}

fn create(settings: &KafkaSettings) -> Result<DeliveryProducer, KafkaError> {
    let config = lockstep_kafka::change_producer_config(settings, "lockstep-gateway");
    DeliveryProducer::create(&config, "gateway producer").map_err(KafkaError::client("producer creation"))
}

/// Errors after which this producer instance will not recover by itself:
/// `Some(failures in a row)` that make it stuck. The broker forgot or refuses
/// the producer's id, epoch or sequence (a recreated topic restarts its
/// sequences at 0): at once. "Unknown broker error": when it repeats.
fn stuck_after(code: RDKafkaErrorCode) -> Option<u32> {
    match code {
        RDKafkaErrorCode::Fatal
        | RDKafkaErrorCode::InvalidProducerEpoch
        | RDKafkaErrorCode::UnknownProducerId
        | RDKafkaErrorCode::OutOfOrderSequenceNumber
        | RDKafkaErrorCode::InvalidProducerIdMapping
        | RDKafkaErrorCode::ProducerFenced => Some(1),
        RDKafkaErrorCode::Unknown => Some(STUCK_AFTER_FAILURES),
        _ => None,
    }
}

impl Producer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let instance =
            Instance { producer: create(settings)?, number: 1, created: Instant::now(), failures_in_a_row: 0.into() };
        Ok(Self { inner: Arc::new(Inner { settings: settings.clone(), current: RwLock::new(Arc::new(instance)) }) })
    }

    fn current(&self) -> Arc<Instance> {
        read(&self.inner.current).clone()
    }

    /// How many producers this process has created (1 until one got stuck).
    pub fn instance_number(&self) -> u64 {
        self.current().number
    }

    /// Enqueues one record on partition 0 of `topic` now (so records enqueued
    /// one after the other keep their order) and returns a future of its offset.
    /// `traceparent` (W3C trace context) goes into the record's headers.
    pub fn enqueue(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        traceparent: Option<&str>,
    ) -> impl Future<Output = Result<i64, KafkaError>> + Send + 'static + use<> {
        let instance = self.current();
        let headers = traceparent
            .map(|traceparent| OwnedHeaders::new().insert(Header { key: "traceparent", value: Some(traceparent) }));
        let record = Record { topic, partition: Some(0), key, payload, headers };
        let enqueued =
            instance.producer.send_now(record).map_err(|source| KafkaError::Client { operation: "produce", source });
        let this = self.clone();
        let enqueued_at = Instant::now();
        async move {
            // A producer in a fatal state refuses records at once: that counts too.
            let outcome = match enqueued {
                Err(error) => Err(error),
                Ok(delivery) => match delivery.await {
                    Ok(delivered) => Ok(delivered.offset),
                    Err(rdkafka::error::KafkaError::Canceled) => Err(KafkaError::WorkerGone("producer")),
                    Err(source) => Err(KafkaError::Client { operation: "produce", source }),
                },
            };
            this.note_outcome(&instance, &outcome);
            if outcome.is_ok() {
                metrics::histogram!("lockstep_kafka_produce_duration_seconds")
                    .record(enqueued_at.elapsed().as_secs_f64());
            }
            outcome
        }
    }

    fn note_outcome(&self, instance: &Arc<Instance>, outcome: &Result<i64, KafkaError>) {
        let stuck_after = match outcome {
            Ok(_) => None,
            Err(KafkaError::Client { source, .. }) => source.rdkafka_error_code().and_then(stuck_after),
            Err(_) => None,
        };
        let fatal = match outcome {
            Ok(_) => None,
            Err(_) => instance.producer.inner().client().fatal_error(),
        };
        let stuck_after = if fatal.is_some() { Some(1) } else { stuck_after };
        let Some(stuck_after) = stuck_after else {
            instance.failures_in_a_row.store(0, Ordering::Relaxed);
            return;
        };
        let failures = instance.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= stuck_after && instance.created.elapsed() >= MIN_PRODUCER_AGE {
            self.replace(instance, fatal.map(|(_, reason)| reason));
        }
    }

    /// Swaps in a fresh producer unless someone already did.
    fn replace(&self, stuck: &Arc<Instance>, fatal: Option<String>) {
        let mut current = write(&self.inner.current);
        if current.number != stuck.number {
            return;
        }
        let producer = match create(&self.inner.settings) {
            Ok(producer) => producer,
            Err(error) => {
                tracing::error!(%error, "cannot create a new kafka producer to replace a stuck one");
                return;
            }
        };
        let number = stuck.number + 1;
        tracing::warn!(
            replaced = stuck.number,
            failures_in_a_row = stuck.failures_in_a_row.load(Ordering::Relaxed),
            fatal = fatal.as_deref().unwrap_or("none"),
            "kafka producer is stuck: replaced by a new one"
        );
        let old = std::mem::replace(
            &mut *current,
            Arc::new(Instance { producer, number, created: Instant::now(), failures_in_a_row: 0.into() }),
        );
        drop(current);
        // Records still queued in the old producer get their reports first;
        // dropping it purges and flushes, which blocks: not on the runtime.
        let grace = self.inner.settings.produce_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        });
    }

    /// Waits (on a blocking thread) until queued records are delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let instance = self.current();
        tokio::task::spawn_blocking(move || instance.producer.flush(timeout))
            .await
            .map_err(|error| KafkaError::Task(error.to_string()))?
            .map_err(KafkaError::client("flush"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_a_producer_does_not_recover_from_count_as_stuck() {
        assert_eq!(stuck_after(RDKafkaErrorCode::Unknown), Some(STUCK_AFTER_FAILURES));
        for code in [
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
        ] {
            assert_eq!(stuck_after(code), Some(1), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::MessageSizeTooLarge,
        ] {
            assert_eq!(stuck_after(code), None, "{code:?}");
        }
    }
}
