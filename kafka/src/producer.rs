//! A producer whose delivery reports arrive as futures, polled by a thread of ours.
//!
//! rust-rdkafka's `FutureProducer` polls its queue in 100 ms windows
//! (`BaseProducer::poll`), and every call inside a window passes librdkafka the
//! time left truncated to whole milliseconds: once less than a millisecond is
//! left it polls with 0 ms in a loop until the window ends. An idle server spent
//! 1.4–1.9 % of a core in that spin (`perf`, issue 20's W3). This producer's
//! thread polls in windows of whole seconds plus a few microseconds, so that the
//! truncated wait librdkafka gets ends just past the window and nothing spins
//! when nothing happens (at most the tail of one millisecond per window in which
//! a report arrived). Reports are handled as they arrive whatever the window.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rdkafka::{
    ClientConfig, ClientContext,
    error::{KafkaError as RdKafkaError, RDKafkaErrorCode},
    message::{Message, OwnedHeaders},
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext},
};
use tokio::sync::oneshot;

/// One poll window: whole milliseconds (what librdkafka waits) plus a margin
/// below the kernel's timer slack (50 µs), so the wait ends past the window.
const POLL_WINDOW: Duration = Duration::from_micros(1_000_000 + 20);
/// How long an enqueue waits, in steps, for room in a full local queue ([`DeliveryProducer::send`]).
const QUEUE_FULL_STEP: Duration = Duration::from_millis(5);

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// The context that turns librdkafka's delivery reports into the futures' outcomes.
pub struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<oneshot::Sender<Result<Delivered, RdKafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiting: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(message) => Ok(Delivered { partition: message.partition(), offset: message.offset() }),
            Err((error, _)) => Err(error.clone()),
        };
        // Whoever enqueued the record may have stopped waiting: nothing to tell.
        let _ = waiting.send(outcome);
    }
}

/// A record to enqueue (borrowed, as librdkafka copies it at once).
pub struct Record<'a> {
    pub topic: &'a str,
    /// `None`: librdkafka's partitioner picks by key.
    pub partition: Option<i32>,
    pub key: &'a [u8],
    pub payload: &'a [u8],
    pub headers: Option<OwnedHeaders>,
}

/// An idempotent-or-not librdkafka producer (as configured) with futures of
/// its delivery reports. Cloning shares it; the last clone dropped stops the
/// poll thread, which then purges what is left (each waiting future learns it
/// failed) and closes the producer off the caller's thread.
#[derive(Clone)]
pub struct DeliveryProducer {
    shared: Arc<Shared>,
}

struct Shared {
    producer: Arc<BaseProducer<Reports>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl DeliveryProducer {
    /// Creates the producer from `config` and starts its poll thread, named `thread_name`.
    pub fn create(config: &ClientConfig, thread_name: &str) -> Result<Self, RdKafkaError> {
        let producer: Arc<BaseProducer<Reports>> = Arc::new(config.create_with_context(Reports)?);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (producer, stop) = (producer.clone(), stop.clone());
            std::thread::Builder::new()
                .name(thread_name.to_string())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        producer.poll(POLL_WINDOW);
                    }
                    // The last reference: dropping purges and flushes here, not on a runtime.
                    drop(producer);
                })
                .map_err(|error| {
                    RdKafkaError::ClientCreation(format!("cannot start the producer's poll thread: {error}"))
                })?;
        }
        Ok(Self { shared: Arc::new(Shared { producer, stop }) })
    }

    /// The librdkafka producer (fatal errors, flush, in-flight count).
    pub fn inner(&self) -> &BaseProducer<Reports> {
        &self.shared.producer
    }

    /// Enqueues `record` now (records enqueued one after the other keep their
    /// order) and returns the future of its delivery report (`Canceled` if the
    /// producer went away without one, which cannot happen while it lives). A
    /// full local queue or a fatal producer refuses at once.
    pub fn send_now(
        &self,
        record: Record<'_>,
    ) -> Result<impl Future<Output = Result<Delivered, RdKafkaError>> + Send + 'static + use<>, RdKafkaError> {
        let (report, outcome) = oneshot::channel();
        let mut base =
            BaseRecord::with_opaque_to(record.topic, Box::new(report)).key(record.key).payload(record.payload);
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        if let Some(headers) = record.headers {
            base = base.headers(headers);
        }
        self.shared.producer.send(base).map_err(|(error, _)| error)?;
        Ok(async move { outcome.await.unwrap_or(Err(RdKafkaError::Canceled)) })
    }

    /// [`Self::send_now`], waiting up to `queue_timeout` for room in a full
    /// local queue, then for the delivery report.
    pub async fn send(&self, record: Record<'_>, queue_timeout: Duration) -> Result<Delivered, RdKafkaError> {
        let started = tokio::time::Instant::now();
        let Record { topic, partition, key, payload, headers } = record;
        loop {
            let record = Record { topic, partition, key, payload, headers: headers.clone() };
            match self.send_now(record) {
                Ok(delivery) => return delivery.await,
                Err(error)
                    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
                        && started.elapsed() < queue_timeout =>
                {
                    tokio::time::sleep(QUEUE_FULL_STEP).await
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Waits (on the calling thread: use a blocking one) until queued records are delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), RdKafkaError> {
        self.shared.producer.flush(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_record_no_broker_takes_fails_through_its_future_and_dropping_the_producer_ends_every_wait() {
        let mut config = ClientConfig::new();
        // Nothing listens there: the record times out in librdkafka's queue.
        config.set("bootstrap.servers", "127.0.0.1:9").set("message.timeout.ms", "200");
        let producer = DeliveryProducer::create(&config, "test producer").unwrap();
        let record = Record { topic: "t", partition: Some(0), key: b"k", payload: b"v", headers: None };
        let outcome = tokio::time::timeout(Duration::from_secs(10), producer.send_now(record).unwrap()).await.unwrap();
        assert_eq!(outcome.unwrap_err().rdkafka_error_code(), Some(RDKafkaErrorCode::MessageTimedOut));

        config.set("message.timeout.ms", "600000");
        let producer = DeliveryProducer::create(&config, "test producer").unwrap();
        let record = Record { topic: "t", partition: Some(0), key: b"k", payload: b"v", headers: None };
        let waiting = producer.send_now(record).unwrap();
        drop(producer);
        let outcome = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("the purge reports it");
        assert!(outcome.is_err());
    }
}
