//! The metadata-only events topic: the doorbell that push workers, the
//! dashboard and other server nodes consume (`schemas/avro/event.avsc`).
//!
//! Data flow: the gateway, delivery and accounts record *facts* after they
//! are durable (Kafka acknowledged the changes, the offset commit returned,
//! the row is written) through [`Events`]; a background [`publisher`] sends
//! them to the events topic in batches. Recording a fact is a hash-map insert
//! under a mutex: it never waits for Kafka, so neither a slow nor an
//! unreachable events topic slows or fails a push.
//!
//! Delivery is at least once. While the topic is unreachable, facts are kept
//! in a coalescing buffer ([`pending`]): a newer fact about the same thing
//! replaces the older one, so memory grows with the fleet, not with traffic.
//! If even that bound (`events.max_pending` subjects) is hit, the fact is
//! dropped and counted; every fact can be re-derived from Kafka itself (log
//! ends from the user topics' watermarks, committed offsets from the device
//! groups), which is how a consumer resyncs. Presence is a lease that each
//! node renews every `events.lease_interval`, so a crashed node's devices stop
//! counting as connected after three intervals.

mod pending;
mod publisher;

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lockstep_schemas::{Event, EventBody, PushTarget, TargetRemovedReason};
use tokio::sync::Notify;

use lockstep_kafka::locks::lock;

use crate::{db::now_ms, settings::EventsSettings};

pub use publisher::{Publisher, events_kafka};

/// Records facts for the events topic. Cheap to clone; a disabled instance
/// ignores everything.
#[derive(Clone)]
pub struct Events {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    node_id: String,
    settings: EventsSettings,
    buffer: Mutex<pending::Buffer>,
    wake: Notify,
    recorded: AtomicU64,
    published: AtomicU64,
}

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventsStats {
    pub recorded: u64,
    pub pending: usize,
    pub dropped: u64,
    pub published: u64,
}

impl Events {
    /// An instance that publishes nothing (`events.enabled = false`).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    fn new(node_id: String, settings: EventsSettings) -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                node_id,
                settings,
                buffer: Mutex::default(),
                wake: Notify::new(),
                recorded: AtomicU64::new(0),
                published: AtomicU64::new(0),
            })),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// This node's id in the events it publishes.
    pub fn node_id(&self) -> &str {
        self.inner.as_ref().map_or("", |inner| &inner.node_id)
    }

    /// Kafka acknowledged `count` changes of `user_id`'s log from `first_offset`;
    /// the log now ends at `log_end`.
    pub fn log_appended(
        &self,
        user_id: &str,
        log_generation: i64,
        (first_offset, log_end, count): (i64, i64, i64),
        origin_device_id: &str,
        first_received_at_ms: i64,
    ) {
        self.record(user_id, || EventBody::LogAppended {
            log_generation,
            first_offset,
            log_end,
            count,
            origin_device_id: origin_device_id.to_owned(),
            first_received_at_ms,
        });
    }

    /// A device's committed offset is now `committed_offset` (after the commit returned).
    pub fn device_acked(&self, user_id: &str, device_id: &str, log_generation: i64, committed_offset: i64) {
        self.record(user_id, || EventBody::DeviceAcked {
            device_id: device_id.to_owned(),
            log_generation,
            committed_offset,
        });
    }

    /// The device has a live stream on this node (also the periodic lease renewal), the one
    /// that started at `stream_started_ms` (see `delivery::StreamStamp`).
    pub fn connected(&self, user_id: &str, device_id: &str, stream_started_ms: i64) {
        let Some(inner) = &self.inner else { return };
        let lease_until_ms = now_ms() + 3 * inner.settings.lease_interval.as_millis() as i64;
        self.record(user_id, || EventBody::DeviceConnected {
            device_id: device_id.to_owned(),
            lease_until_ms,
            stream_started_ms: Some(stream_started_ms),
        });
    }

    pub fn disconnected(&self, user_id: &str, device_id: &str) {
        self.record(user_id, || EventBody::DeviceDisconnected { device_id: device_id.to_owned() });
    }

    pub fn device_added(&self, user_id: &str, device_id: &str) {
        self.record(user_id, || EventBody::DeviceAdded { device_id: device_id.to_owned() });
    }

    pub fn device_revoked(&self, user_id: &str, device_id: &str) {
        self.record(user_id, || EventBody::DeviceRevoked { device_id: device_id.to_owned() });
    }

    pub fn target_set(&self, user_id: &str, device_id: &str, target: PushTarget) {
        self.record(user_id, || EventBody::PushTargetSet { device_id: device_id.to_owned(), target });
    }

    pub fn target_removed(&self, user_id: &str, device_id: &str, reason: TargetRemovedReason) {
        self.record(user_id, || EventBody::PushTargetRemoved { device_id: device_id.to_owned(), reason });
    }

    fn record(&self, user_id: &str, body: impl FnOnce() -> EventBody) {
        let Some(inner) = &self.inner else { return };
        let event =
            Event { user_id: user_id.to_owned(), node_id: inner.node_id.clone(), at_ms: now_ms(), body: body() };
        inner.recorded.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("lockstep_events_recorded_total").increment(1);
        let kept = lock(&inner.buffer).insert(event, inner.settings.max_pending);
        if !kept {
            metrics::counter!("lockstep_events_dropped_total").increment(1);
            tracing::warn!(
                max_pending = inner.settings.max_pending,
                "events buffer is full (events topic unreachable?): an event was dropped; consumers resync from kafka offsets"
            );
        }
        inner.wake.notify_one();
    }

    pub fn stats(&self) -> EventsStats {
        let Some(inner) = &self.inner else { return EventsStats::default() };
        let buffer = lock(&inner.buffer);
        EventsStats {
            recorded: inner.recorded.load(Ordering::Relaxed),
            pending: buffer.len(),
            dropped: buffer.dropped,
            published: inner.published.load(Ordering::Relaxed),
        }
    }
}

/// This node's id: `events.node_id`, or a random id kept in `<data_dir>/node_id`
/// so that a restarted node keeps its identity.
pub fn node_id(settings: &EventsSettings, data_dir: &Path) -> std::io::Result<String> {
    if let Some(id) = settings.node_id.as_ref().filter(|id| !id.trim().is_empty()) {
        return Ok(id.trim().to_owned());
    }
    let path = data_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        Ok(_) | Err(_) => {
            std::fs::create_dir_all(data_dir)?;
            let id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            std::fs::write(&path, format!("{id}\n"))?;
            Ok(id)
        }
    }
}

/// How long the publisher waits between retries while the topic is unreachable.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));
