//! The gateway's one producer: idempotent, acks=all. A push is answered only
//! after the delivery report for each of its records arrived.

use std::{future::Future, time::Duration};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use super::{KafkaError, base_config};
use crate::settings::KafkaSettings;

#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let inner = base_config(settings, "lockstep-gateway")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", settings.linger_ms.to_string())
            // Ciphertext does not compress.
            .set("compression.type", "none")
            .set("message.timeout.ms", settings.produce_timeout.as_millis().to_string())
            .set("queue.buffering.max.kbytes", "65536")
            .create()
            .map_err(KafkaError::client("producer creation"))?;
        Ok(Self { inner })
    }

    /// Enqueues one record on partition 0 of `topic` now (so records enqueued
    /// one after the other keep their order) and returns a future of its offset.
    pub fn enqueue(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> impl Future<Output = Result<i64, KafkaError>> + Send + 'static + use<> {
        let record = FutureRecord::to(topic).partition(0).key(key).payload(payload);
        let enqueued =
            self.inner.send_result(record).map_err(|(source, _)| KafkaError::Client { operation: "produce", source });
        async move {
            match enqueued?.await {
                Ok(Ok(delivery)) => Ok(delivery.offset),
                Ok(Err((source, _))) => Err(KafkaError::Client { operation: "produce", source }),
                Err(_canceled) => Err(KafkaError::WorkerGone("producer")),
            }
        }
    }

    /// Waits (on a blocking thread) until queued records are delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.flush(timeout))
            .await
            .map_err(|error| KafkaError::Task(error.to_string()))?
            .map_err(KafkaError::client("flush"))
    }
}
