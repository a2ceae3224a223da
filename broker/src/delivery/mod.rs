//! Delivery: each user's topic → every subscribed device of that user, at
//! least once, from the device's committed consumer-group offset.
//!
//! Built for many devices per process: there is no Kafka client per device.
//! A device's stream is a task that reads, in order of preference, the
//! user's in-memory [`LiveLog`] (fed by the gateway as Kafka acknowledges
//! each change), or — when it is behind that tail — the shared reader pool.
//! Offsets move only when the device acks what it durably applied
//! ([`Delivery::ack`]), through one shared group-offset client.
//!
//! # Several nodes (issue 21)
//! - **A device's newest stream wins, on whatever node.** Each stream is named by the node that
//!   serves it and a start stamp ([`Delivery::subscribe`]), published in its `DeviceConnected`
//!   events; a node whose events follower sees a newer stream of a device it streams to ends
//!   its own with ABORTED ([`Delivery::connected_elsewhere`]). See [`StreamStamp`] for what
//!   "newer" means.
//! - **Committed offsets never move backwards, whichever node an ack arrives at.** With a
//!   shared database, an ack holds the device's advisory lock in PostgreSQL while it reads the
//!   group's committed offset from Kafka and commits only a greater one ([`Delivery::ack`]).

mod live_log;
pub mod log_guard;
mod session;
mod stream_channel;

use log_guard::LogGuard;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

use bytes::{Bytes, BytesMut};
use futures::TryFutureExt;
pub use live_log::{CacheBudget, LiveLog, LogRead};
use lockstep_proto::v1::{Change, DeliveredChange, Op, ResyncReason};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::{
    accounts::AuthedDevice,
    error::ApiError,
    events::Events,
    idle::LastUsed,
    kafka::{GroupOffsets, KafkaClients, KafkaError, ReaderPool, Retry, Topics, bounded, device_group, user_topic},
    settings::{CHANGE_OVERHEAD_BYTES, DeliverySettings, KafkaSettings, Settings},
    shutdown::ShutdownSource,
    slots::{KeyedSlots, Slot},
    store::Store,
};
use lockstep_kafka::locks::lock;

/// Why the server ends a device's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Superseded,
    /// A newer stream of the device started on another node.
    SupersededElsewhere,
    Revoked,
    ShuttingDown,
}

impl From<StopReason> for ApiError {
    fn from(reason: StopReason) -> Self {
        match reason {
            StopReason::Superseded => {
                ApiError::Aborted("a newer subscription of this device took over this stream".into())
            }
            StopReason::SupersededElsewhere => ApiError::Aborted(
                "a newer subscription of this device, on another server node, took over this stream".into(),
            ),
            StopReason::Revoked => ApiError::Unauthenticated("this device was revoked".into()),
            StopReason::ShuttingDown => ApiError::ShuttingDown,
        }
    }
}

pub use stream_channel::SubscribeStream;

/// A device's position, shared by its stream and its acks.
struct DeviceState {
    /// Serialises commits so that a late, lower ack never overwrites a higher one.
    ack_lock: tokio::sync::Mutex<()>,
    /// Next offset to deliver as committed in Kafka; `UNKNOWN` until read.
    committed: AtomicI64,
    used: LastUsed,
}

const UNKNOWN: i64 = i64::MIN;

/// The advisory-lock namespace of the device ack locks (see [`Delivery::ack`]); the schema
/// migration uses 7106.
const ACK_LOCK_NAMESPACE: i32 = 7107;

/// Which of two streams of one device is newer, across nodes: the one with the greater
/// `(started_ms, node_id)`.
///
/// `started_ms` comes from a hybrid logical clock per node ([`StreamClock`]): the node's wall
/// clock in ms, but always past every stream start the node has issued or seen in a
/// `DeviceConnected` event. So a stream that starts on a node after that node heard of another
/// stream of the device is newer than it whatever the clocks say; only two subscriptions that
/// start on different nodes within the events' propagation time (under a second) are ordered by
/// the nodes' wall clocks, and a skew between them can make the later one lose. Then the device's
/// newest stream ends with ABORTED once and its next subscribe, stamped past what its node has
/// seen by then, wins. The node id breaks ties, so every node decides alike and exactly one
/// stream of the device survives. A lease renewal repeats its stream's stamp: it names the same
/// stream, which is never newer than itself, so renewals end nothing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamStamp<'a> {
    pub started_ms: i64,
    pub node_id: &'a str,
}

/// The clock of [`StreamStamp::started_ms`].
#[derive(Default)]
struct StreamClock {
    latest: AtomicI64,
}

impl StreamClock {
    /// A stamp past every one issued or observed here, and not before the wall clock.
    fn next(&self) -> i64 {
        let mut latest = self.latest.load(Ordering::Acquire);
        loop {
            let next = crate::db::now_ms().max(latest + 1);
            match self.latest.compare_exchange_weak(latest, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return next,
                Err(actual) => latest = actual,
            }
        }
    }

    fn observe(&self, stamp: i64) {
        self.latest.fetch_max(stamp, Ordering::AcqRel);
    }
}

struct SessionEntry {
    id: u64,
    user_id: Arc<str>,
    /// This stream's [`StreamStamp::started_ms`] (its `DeviceConnected` events carry it).
    started_ms: i64,
    stop: Arc<StopSignal>,
}

/// How a stream is told to stop, and why. (A `watch` channel did this with about
/// 340 bytes a stream, most of them the eight `Notify`s it keeps for many receivers;
/// a stream has one.)
#[derive(Default)]
pub(crate) struct StopSignal {
    reason: Mutex<Option<StopReason>>,
    notify: tokio::sync::Notify,
}

impl StopSignal {
    /// Stops the stream (a later reason replaces an earlier one).
    fn stop(&self, reason: StopReason) {
        *lock(&self.reason) = Some(reason);
        self.notify.notify_waiters();
    }

    pub(crate) fn reason(&self) -> Option<StopReason> {
        *lock(&self.reason)
    }

    /// Ends once the stream is stopped (at once if it is).
    pub(crate) async fn stopped(&self) {
        crate::wake::wait_until(&self.notify, || self.reason().is_some()).await;
    }
}

struct Inner {
    /// Subscription slots per user (`limits.max_subscriptions_per_user`).
    user_streams: KeyedSlots,
    live_logs: Mutex<HashMap<Arc<str>, Weak<LiveLog>>>,
    cache_budget: Arc<CacheBudget>,
    sessions: Mutex<HashMap<Arc<str>, SessionEntry>>,
    /// Devices revoked while this process runs: a Subscribe that authenticated
    /// before the revocation and registers its stream after it is ended too.
    /// Kept for `revoked_for`: longer than any Subscribe takes to start.
    revoked: Mutex<HashMap<Arc<str>, Instant>>,
    revoked_for: Duration,
    devices: Mutex<HashMap<Arc<str>, Arc<DeviceState>>>,
    subscriptions: Arc<Semaphore>,
    next_session_id: AtomicU64,
    stream_clock: StreamClock,
    /// The shared database when several nodes may serve one device (PostgreSQL): acks hold the
    /// device's lock in it. `None` with SQLite (one node), where `DeviceState::ack_lock` suffices.
    shared: Option<Store>,
    topics: Topics,
    readers: ReaderPool,
    offsets: GroupOffsets,
    guard: LogGuard,
    events: Events,
    shutdown: ShutdownSource,
    settings: DeliverySettings,
    kafka: KafkaSettings,
}

#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

impl Delivery {
    pub fn new(
        clients: &KafkaClients,
        store: &Store,
        guard: LogGuard,
        events: Events,
        shutdown: ShutdownSource,
        settings: &Settings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                user_streams: KeyedSlots::new(settings.limits.max_subscriptions_per_user),
                live_logs: Mutex::default(),
                cache_budget: CacheBudget::new(settings.delivery.live_cache_total_bytes),
                revoked: Mutex::default(),
                revoked_for: settings.limits.idle_state_after.max(settings.limits.request_timeout * 2),
                sessions: Mutex::default(),
                devices: Mutex::default(),
                subscriptions: Arc::new(Semaphore::new(settings.limits.max_subscriptions as usize)),
                next_session_id: AtomicU64::new(1),
                stream_clock: StreamClock::default(),
                shared: store.is_shared().then(|| store.clone()),
                topics: clients.topics.clone(),
                readers: clients.readers.clone(),
                offsets: clients.offsets.clone(),
                guard,
                events,
                shutdown,
                settings: settings.delivery.clone(),
                kafka: settings.kafka.clone(),
            }),
        }
    }

    /// Hands changes Kafka just acknowledged to the user's live subscribers.
    /// The cache keeps copies of their bytes: the pushed ones are slices of the
    /// whole request body, which a small cached change would otherwise keep
    /// alive (up to `limits.max_request_bytes` each).
    pub fn publish(&self, user_id: &str, changes: Vec<Arc<DeliveredChange>>) {
        let log = lock(&self.inner.live_logs).get(user_id).and_then(Weak::upgrade);
        if let Some(log) = log {
            log.append(changes.into_iter().map(unpinned));
        }
    }

    /// Another node appended to the user's log, which now ends at `log_end` (its LogAppended
    /// event, the doorbell). If this node streams to devices of the user, their live tail
    /// learns the new end: a session behind it reads the missing changes from the user's topic
    /// through the shared readers, in offset order, as for any gap in the tail. Nothing
    /// happens for a user without streams here, and an end the tail knows already is ignored.
    pub fn log_appended_elsewhere(&self, user_id: &str, log_end: i64) -> bool {
        let Some(log) = self.live_log_if_active(user_id) else { return false };
        if log.end().is_some_and(|end| end >= log_end) {
            return false;
        }
        metrics::counter!("lockstep_doorbells_total").increment(1);
        log.note_end(log_end);
        true
    }

    /// Bytes held by every user's live cache together.
    pub fn cached_bytes(&self) -> usize {
        self.inner.cache_budget.used()
    }

    /// Starts the device's stream. Fails before streaming if `from_offset` is
    /// negative or past the log end, or the server holds too many streams. A
    /// `from_offset` below the log start is history that is gone: the stream
    /// starts with a Resync, as for a committed offset below the log start.
    /// If the user's log lost acknowledged changes, only a `repair` stream is
    /// served (DATA_LOSS otherwise): it starts at the log start with a Resync
    /// (LOG_LOST), and the device's committed offset goes back there.
    pub async fn subscribe(
        &self,
        device: AuthedDevice,
        from_offset: Option<i64>,
        repair: bool,
    ) -> Result<SubscribeStream, ApiError> {
        let inner = &self.inner;
        let running = inner.shutdown.handle().ok_or(ApiError::ShuttingDown)?;
        let permit = inner.subscriptions.clone().try_acquire_owned().map_err(|_| {
            ApiError::ResourceExhausted("this server holds its maximum number of subscriptions; retry later".into())
        })?;
        let user_slot = self.user_slot(&device.user_id)?;
        let topic: Arc<str> = user_topic(&inner.kafka, &device.user_id).into();
        // The user's live tail first, then the watermarks: every change Kafka
        // acknowledges after this read reaches the tail, so the session may
        // start the tail at the log end read here (see `Session::stream`).
        // The committed offset before the log's bounds: an ack racing this
        // subscribe must not look like a commit past the end (see `log_guard`).
        let state = self.device_state(&device.device_id);
        // Another node may have moved the device's offset since this one cached it.
        if inner.shared.is_some() {
            state.committed.store(UNKNOWN, Ordering::Release);
        }
        let mut committed = self.committed(&device, &topic, &state).await?;
        let live_log = self.live_log(&device.user_id);
        // A lost log first: a device must hear DATA_LOSS, not an offset error.
        let guard = &inner.guard;
        let device_committed = committed.map(|committed| (&device.device_id, committed));
        let (watermarks, _) = guard.read_and_check(&inner.topics, &device.user_id, &topic, device_committed).await?;
        let mut first_resync = None;
        if repair {
            guard.mark_repaired(&device.user_id, &device.device_id).await?;
            let log_start = watermarks.log_start;
            self.commit(&device, &topic, &state, log_start).await?;
            committed = Some(log_start);
            first_resync = Some(ResyncReason::LogLost);
        } else {
            guard.ensure_repaired(&device.user_id, &device.device_id).await?;
            if let Some(from) = from_offset
                && (from < 0 || from > watermarks.log_end)
            {
                return Err(ApiError::OutOfRange(format!(
                    "from_offset {from} is outside the log [0, {}]",
                    watermarks.log_end
                )));
            }
        }

        let session_id = inner.next_session_id.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(StopSignal::default());
        // Stamped as it registers: past every stream of the device this node has heard of.
        let started_ms = inner.stream_clock.next();
        let entry = SessionEntry { id: session_id, user_id: device.user_id.clone(), started_ms, stop: stop.clone() };
        if let Some(previous) = lock(&inner.sessions).insert(device.device_id.clone(), entry) {
            previous.stop.stop(StopReason::Superseded);
        }
        inner.events.connected(&device.user_id, &device.device_id, started_ms);
        // After registering: either `shutdown` (which begins, then ends every
        // registered stream) sees this one, or this sees that it began.
        if lock(&inner.revoked).contains_key(&device.device_id) {
            self.end_session(&device.device_id, session_id);
            return Err(StopReason::Revoked.into());
        }
        if inner.shutdown.has_begun() {
            self.end_session(&device.device_id, session_id);
            return Err(ApiError::ShuttingDown);
        }
        let (stream_tx, stream) = stream_channel::channel(inner.settings.stream_buffer);
        let session = session::Session {
            delivery: self.clone(),
            live_log,
            topic,
            device,
            session_id,
            start: session::Start {
                from_offset: if repair { None } else { from_offset },
                committed,
                watermarks,
                first_resync,
            },
            device_state: state,
            stream_tx,
            stop,
            _permit: permit,
            _user_slot: user_slot,
            _running: running,
        };
        tokio::spawn(session.run());
        Ok(stream)
    }

    /// Commits `offset + 1` for the device once it durably applied `offset`.
    /// Returns the device's committed position.
    pub async fn ack(&self, device: &AuthedDevice, offset: i64) -> Result<i64, ApiError> {
        if offset < 0 {
            return Err(ApiError::OutOfRange(format!("offset {offset} is negative")));
        }
        self.inner.guard.ensure_repaired(&device.user_id, &device.device_id).await?;
        let topic = user_topic(&self.inner.kafka, &device.user_id);
        let log_end = match self.live_log_if_active(&device.user_id).and_then(|log| log.end()) {
            Some(end) if offset < end => end,
            _ => {
                // An ack past the end may be the first sign of a log that lost changes.
                let guard = &self.inner.guard;
                let (watermarks, _) = guard.read_and_check(&self.inner.topics, &device.user_id, &topic, None).await?;
                self.inner.guard.ensure_repaired(&device.user_id, &device.device_id).await?;
                watermarks.log_end
            }
        };
        if offset >= log_end {
            return Err(ApiError::OutOfRange(format!(
                "offset {offset} is beyond the end of the log (next offset {log_end})"
            )));
        }
        let state = self.device_state(&device.device_id);
        let _serialised = state.ack_lock.lock().await;
        self.across_nodes(device, async {
            if self.inner.shared.is_some() {
                // Another node may have committed since: the cached value may be behind.
                state.committed.store(UNKNOWN, Ordering::Release);
            }
            let committed = self.committed(device, &topic, &state).await?;
            if committed.is_some_and(|committed| offset < committed) {
                return Ok(committed.unwrap_or_default());
            }
            self.commit_locked(device, &topic, &state, offset + 1).await?;
            metrics::counter!("lockstep_acks_total").increment(1);
            Ok(offset + 1)
        })
        .await
    }

    /// Runs `work` (a read and a commit of the device's offset) as the only one for this device
    /// on any node. Kafka's OffsetCommit has no compare-and-set: two nodes that each read the
    /// committed offset and then commit a greater one could still land out of order (a stale ack
    /// delayed on one node overwriting a newer one committed through another). With a shared
    /// database the device's PostgreSQL advisory lock (transaction-scoped) is held around the
    /// read from Kafka and the commit, so the read is fresh and the commit is the last one. The
    /// cost, in multi-node mode only: per ack three database round trips (BEGIN, the lock,
    /// ROLLBACK), one more Kafka round trip (the fresh OffsetFetch: the cached position may be
    /// another node's past), and one pooled connection (`database.max_connections`) held for the
    /// two Kafka calls. With SQLite (one node) the caller's `DeviceState::ack_lock` is enough,
    /// the cached position is the truth, and `work` runs at once.
    async fn across_nodes<R>(
        &self,
        device: &AuthedDevice,
        work: impl std::future::Future<Output = Result<R, ApiError>>,
    ) -> Result<R, ApiError> {
        let Some(store) = &self.inner.shared else { return work.await };
        // Longer than a holder takes (its Kafka calls are bounded by the operation deadline).
        let wait = self.inner.kafka.operation_deadline * 2;
        store.serialised(ACK_LOCK_NAMESPACE, &device.device_id, wait, work).await
    }

    /// Sets the device's committed position to `next`, also backwards (a repair).
    async fn commit(&self, device: &AuthedDevice, topic: &str, state: &DeviceState, next: i64) -> Result<(), ApiError> {
        let _serialised = state.ack_lock.lock().await;
        self.across_nodes(device, self.commit_locked(device, topic, state, next)).await
    }

    async fn commit_locked(
        &self,
        device: &AuthedDevice,
        topic: &str,
        state: &DeviceState,
        next: i64,
    ) -> Result<(), ApiError> {
        let group = device_group(&self.inner.kafka, &device.device_id);
        // One attempt: a failed commit is retried by the caller (see `server::api`).
        bounded(self.inner.kafka.operation_deadline, "offset commit", Retry::Never, || {
            self.inner.offsets.commit(&group, topic, 0, next).map_err(KafkaError::from)
        })
        .await?;
        state.committed.store(next, Ordering::Release);
        let generation = self.inner.guard.cached_generation(&device.user_id).unwrap_or_default();
        self.inner.events.device_acked(&device.user_id, &device.device_id, generation, next);
        Ok(())
    }

    /// The device's committed position (next offset to deliver), if any.
    pub async fn committed_offset(&self, device: &AuthedDevice) -> Result<Option<i64>, ApiError> {
        let topic = user_topic(&self.inner.kafka, &device.user_id);
        let state = self.device_state(&device.device_id);
        self.committed(device, &topic, &state).await
    }

    /// Ends a revoked device's stream.
    pub fn revoke(&self, device_id: &str) {
        // First: a stream still starting checks this after it registered (see `subscribe`).
        lock(&self.inner.revoked).insert(device_id.into(), Instant::now());
        if let Some(entry) = lock(&self.inner.sessions).remove(device_id) {
            entry.stop.stop(StopReason::Revoked);
            self.inner.events.disconnected(&entry.user_id, device_id);
        }
    }

    /// Ends every stream (clients reconnect to another instance or later).
    pub fn shutdown(&self) {
        for (device_id, entry) in lock(&self.inner.sessions).drain() {
            entry.stop.stop(StopReason::ShuttingDown);
            self.inner.events.disconnected(&entry.user_id, &device_id);
        }
    }

    /// Renews the `DeviceConnected` lease of every live stream on this node (with the stream's
    /// own stamp: a renewal names the same stream, see [`StreamStamp`]).
    pub fn renew_leases(&self) {
        let live: Vec<(Arc<str>, Arc<str>, i64)> = lock(&self.inner.sessions)
            .iter()
            .map(|(device_id, entry)| (entry.user_id.clone(), device_id.clone(), entry.started_ms))
            .collect();
        for (user_id, device_id, started_ms) in live {
            self.inner.events.connected(&user_id, &device_id, started_ms);
        }
    }

    /// Another node published a `DeviceConnected` of `device_id` (its events, read by this
    /// node's events follower): a stream, or a renewal of one, named by `node_id` and
    /// `started_ms`. If this node streams to the device and that stream is newer than this
    /// node's ([`StreamStamp`]), this node's stream ends with ABORTED. An event of a server from
    /// before stream stamps (`None`) ends nothing. Returns whether a stream ended.
    pub fn connected_elsewhere(&self, device_id: &str, node_id: &str, started_ms: Option<i64>) -> bool {
        let Some(started_ms) = started_ms else { return false };
        let inner = &self.inner;
        // Streams that start here from now on are newer than the one just heard of.
        inner.stream_clock.observe(started_ms);
        let local_node = inner.events.node_id();
        let elsewhere = StreamStamp { started_ms, node_id };
        let mut sessions = lock(&inner.sessions);
        let superseded = sessions.get(device_id).is_some_and(|entry| {
            node_id != local_node && StreamStamp { started_ms: entry.started_ms, node_id: local_node } < elsewhere
        });
        if !superseded {
            return false;
        }
        let Some(entry) = sessions.remove(device_id) else { return false };
        drop(sessions);
        // Logged and counted first: by the time the device hears ABORTED, the log says why.
        metrics::counter!("lockstep_streams_superseded_elsewhere_total").increment(1);
        tracing::info!(
            device_id,
            by = node_id,
            started_ms,
            ours_started_ms = entry.started_ms,
            "stream ended: a newer stream of the device started on another node"
        );
        entry.stop.stop(StopReason::SupersededElsewhere);
        self.inner.events.disconnected(&entry.user_id, device_id);
        true
    }

    pub fn active_streams(&self) -> usize {
        lock(&self.inner.sessions).len()
    }

    async fn committed(
        &self,
        device: &AuthedDevice,
        topic: &str,
        state: &DeviceState,
    ) -> Result<Option<i64>, ApiError> {
        let known = state.committed.load(Ordering::Acquire);
        if known != UNKNOWN {
            return Ok((known >= 0).then_some(known));
        }
        let group = device_group(&self.inner.kafka, &device.device_id);
        let fetched = bounded(self.inner.kafka.operation_deadline, "offset fetch", Retry::Never, || {
            self.inner.offsets.fetch(&group, topic, 0).map_err(KafkaError::from)
        })
        .await?;
        // A concurrent ack may have stored a newer value meanwhile: keep it.
        let _ = state.committed.compare_exchange(UNKNOWN, fetched.unwrap_or(-1), Ordering::AcqRel, Ordering::Acquire);
        let now = state.committed.load(Ordering::Acquire);
        Ok((now >= 0).then_some(now))
    }

    fn device_state(&self, device_id: &Arc<str>) -> Arc<DeviceState> {
        let mut devices = lock(&self.inner.devices);
        let state = devices.entry(device_id.clone()).or_insert_with(|| {
            Arc::new(DeviceState {
                ack_lock: tokio::sync::Mutex::new(()),
                committed: AtomicI64::new(UNKNOWN),
                used: LastUsed::default(),
            })
        });
        state.used.touch();
        state.clone()
    }

    /// Forgets devices without a stream or a call in progress that were not
    /// used for `idle_after` (their committed offset is read from Kafka again),
    /// revocations older than any starting stream, and caches of users whose
    /// streams ended. Returns how many devices were forgotten.
    pub fn evict_idle(&self, idle_after: Duration) -> usize {
        let inner = &self.inner;
        let mut devices = lock(&inner.devices);
        let before = devices.len();
        // In use: the map's reference and another (a stream, an ack).
        devices.retain(|_, state| Arc::strong_count(state) > 1 || !state.used.idle(idle_after));
        let forgotten = before - devices.len();
        drop(devices);
        lock(&inner.revoked).retain(|_, revoked_at| revoked_at.elapsed() < inner.revoked_for);
        lock(&inner.live_logs).retain(|_, log| log.strong_count() > 0);
        forgotten
    }

    /// Entries of this node's per-device and per-user maps (the metrics' `lockstep_state_entries`).
    pub fn state_entries(&self) -> [(&'static str, usize); 3] {
        [
            ("device_offsets", lock(&self.inner.devices).len()),
            ("revocations", lock(&self.inner.revoked).len()),
            ("live_caches", lock(&self.inner.live_logs).len()),
        ]
    }

    fn live_log(&self, user_id: &Arc<str>) -> Arc<LiveLog> {
        let mut logs = lock(&self.inner.live_logs);
        if let Some(log) = logs.get(user_id).and_then(Weak::upgrade) {
            return log;
        }
        // Drop entries of users whose last stream ended.
        logs.retain(|_, log| log.strong_count() > 0);
        let settings = &self.inner.settings;
        let budget = self.inner.cache_budget.clone();
        let log = Arc::new(LiveLog::new(settings.live_cache_changes, settings.live_cache_bytes, budget));
        logs.insert(user_id.clone(), Arc::downgrade(&log));
        log
    }

    fn live_log_if_active(&self, user_id: &str) -> Option<Arc<LiveLog>> {
        lock(&self.inner.live_logs).get(user_id).and_then(Weak::upgrade)
    }

    /// Takes one of the user's subscription slots, unless all are taken.
    fn user_slot(&self, user_id: &Arc<str>) -> Result<Slot, ApiError> {
        self.inner.user_streams.take(user_id).map_err(|count| {
            ApiError::ResourceExhausted(format!(
                "this account's devices hold {count} streams, the most this server allows; retry later"
            ))
        })
    }

    fn end_session(&self, device_id: &str, session_id: u64) {
        let mut sessions = lock(&self.inner.sessions);
        if sessions.get(device_id).is_some_and(|entry| entry.id == session_id)
            && let Some(entry) = sessions.remove(device_id)
        {
            drop(sessions);
            self.inner.events.disconnected(&entry.user_id, device_id);
        }
    }
}

/// The change with its own copies of ciphertext and nonce (see [`Delivery::publish`]).
fn unpinned(change: Arc<DeliveredChange>) -> Arc<DeliveredChange> {
    let mut owned = Arc::unwrap_or_clone(change);
    if let Some(change) = owned.change.as_mut() {
        change.ciphertext = bytes::Bytes::copy_from_slice(&change.ciphertext);
        change.nonce = bytes::Bytes::copy_from_slice(&change.nonce);
    }
    Arc::new(owned)
}

/// What a device receives for a record of the log (`payload`, its value): the
/// change, or an explicit "undecodable" item (never a silent gap). The
/// envelope is read in place: its strings are copied once, into the change,
/// and its nonce and ciphertext into `buffer`, of which they are slices.
pub fn delivered_record(offset: i64, payload: Option<&[u8]>, buffer: &mut ChunkBuffer) -> DeliveredChange {
    let Some(payload) = payload else {
        return DeliveredChange { offset, undecodable: "a record without a value".to_string(), ..Default::default() };
    };
    let decoded = lockstep_schemas::decode_change_with(payload, |envelope| {
        let [nonce, ciphertext] = buffer.copy([envelope.nonce, envelope.ciphertext]);
        DeliveredChange {
            offset,
            change: Some(Change {
                change_id: envelope.change_id.to_owned(),
                record_id: envelope.record_id.to_owned(),
                collection: envelope.collection.to_owned(),
                op: Op::from(envelope.op) as i32,
                hlc: envelope.hlc as u64,
                key_epoch: envelope.key_epoch,
                nonce,
                ciphertext,
            }),
            origin_device_id: envelope.origin_device_id.to_owned(),
            received_at_ms: envelope.received_at_ms,
            undecodable: String::new(),
            traceparent: String::new(),
        }
    });
    decoded.unwrap_or_else(|error| DeliveredChange {
        offset,
        undecodable: format!("not a change envelope this server can read: {error}"),
        ..Default::default()
    })
}

/// Size of a chunk's first [`ChunkBuffer`] allocation; each next one is twice
/// the last, up to [`CHUNK_BUFFER_MAX_BYTES`].
const CHUNK_BUFFER_FIRST_BYTES: usize = 16 * 1024;
const CHUNK_BUFFER_MAX_BYTES: usize = 1024 * 1024;

/// Where the nonces and ciphertexts of one chunk of records read from the log
/// are copied, one after another: the changes hold slices of a few shared
/// allocations instead of two of their own each (which the reader thread
/// allocated and a tokio worker freed). The allocations double from 16 KiB up
/// to 1 MiB, so a small chunk holds little memory, and one is freed when the
/// last change sliced from it is.
#[derive(Default)]
pub struct ChunkBuffer {
    free: BytesMut,
    next_bytes: usize,
}

impl ChunkBuffer {
    /// `parts`, copied next to each other.
    fn copy<const N: usize>(&mut self, parts: [&[u8]; N]) -> [Bytes; N] {
        let bytes: usize = parts.iter().map(|part| part.len()).sum();
        if self.free.capacity() < bytes {
            let size = self.next_bytes.max(CHUNK_BUFFER_FIRST_BYTES);
            self.next_bytes = (size * 2).min(CHUNK_BUFFER_MAX_BYTES);
            // A larger record than that gets an allocation of its own.
            self.free = BytesMut::with_capacity(size.max(bytes));
        }
        parts.map(|part| {
            if part.is_empty() {
                return Bytes::new();
            }
            self.free.extend_from_slice(part);
            self.free.split().freeze()
        })
    }
}

/// What [`delivered_record`] made of a record before it read the envelope in
/// place: decoded into a [`ChangeEnvelope`], then moved into the change.
#[cfg(test)]
fn delivered_record_through_envelope(offset: i64, payload: Option<&[u8]>) -> DeliveredChange {
    match payload.map(lockstep_schemas::decode_change) {
        Some(Ok(envelope)) => delivered_change(offset, envelope),
        Some(Err(error)) => DeliveredChange {
            offset,
            undecodable: format!("not a change envelope this server can read: {error}"),
            ..Default::default()
        },
        None => DeliveredChange { offset, undecodable: "a record without a value".to_string(), ..Default::default() },
    }
}

#[cfg(test)]
fn delivered_change(offset: i64, envelope: lockstep_schemas::ChangeEnvelope) -> DeliveredChange {
    let op = Op::from(envelope.op);
    DeliveredChange {
        offset,
        change: Some(Change {
            change_id: envelope.change_id,
            record_id: envelope.record_id,
            collection: envelope.collection,
            op: op as i32,
            hlc: envelope.hlc as u64,
            key_epoch: envelope.key_epoch,
            nonce: envelope.nonce.into(),
            ciphertext: envelope.ciphertext.into(),
        }),
        origin_device_id: envelope.origin_device_id,
        received_at_ms: envelope.received_at_ms,
        undecodable: String::new(),
        traceparent: String::new(),
    }
}

/// Splits consecutive changes into messages of at most `max_bytes` encoded
/// (a change larger than that on its own still goes, alone).
pub fn split_by_bytes(changes: Vec<DeliveredChange>, max_bytes: usize) -> Vec<Vec<DeliveredChange>> {
    use prost::Message as _;
    // Most messages are far below the cap: an upper bound of their size
    // (ciphertext, nonce and validated ids) spares encoding-length work per change.
    let upper_bound: usize = changes
        .iter()
        .map(|change| {
            change.change.as_ref().map_or(0, |change| change.ciphertext.len() + change.nonce.len())
                + change.undecodable.len()
                + CHANGE_OVERHEAD_BYTES
        })
        .sum();
    if changes.is_empty() {
        return Vec::new();
    }
    if upper_bound <= max_bytes {
        return vec![changes];
    }
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for change in changes {
        // Field tag and length prefix of the change inside the batch.
        let size = change.encoded_len() + 8;
        if !batch.is_empty() && bytes + size > max_bytes {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += size;
        batch.push(change);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Splits consecutive changes into messages of at most `max_changes` changes
/// and `max_bytes` encoded (see [`split_by_bytes`]).
pub fn split_into_batches(
    changes: Vec<DeliveredChange>,
    max_changes: usize,
    max_bytes: usize,
) -> Vec<Vec<DeliveredChange>> {
    let max_changes = max_changes.max(1);
    let mut batches = Vec::new();
    for batch in split_by_bytes(changes, max_bytes) {
        if batch.len() <= max_changes {
            batches.push(batch);
            continue;
        }
        // Each change moves once (splitting off the rest again and again would not).
        let mut changes = batch.into_iter();
        loop {
            let part: Vec<DeliveredChange> = changes.by_ref().take(max_changes).collect();
            if part.is_empty() {
                break;
            }
            batches.push(part);
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn change(offset: i64, ciphertext_bytes: usize) -> DeliveredChange {
        DeliveredChange {
            offset,
            change: Some(Change { ciphertext: Bytes::from(vec![7u8; ciphertext_bytes]), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn the_newer_stream_is_the_later_stamp_then_the_greater_node_id_and_never_itself() {
        let stamp = |started_ms, node_id| StreamStamp { started_ms, node_id };
        assert!(stamp(100, "node-a") < stamp(101, "node-a"));
        assert!(stamp(100, "node-z") < stamp(101, "node-a"), "time first, whatever the node");
        assert!(stamp(100, "node-a") < stamp(100, "node-b"), "the node id breaks a tie");
        // A renewal names the same stream: not newer than itself, so it ends nothing.
        assert!(stamp(100, "node-a").cmp(&stamp(100, "node-a")).is_eq());
    }

    #[test]
    fn stream_stamps_pass_every_stamp_seen_even_from_a_clock_ahead() {
        let clock = StreamClock::default();
        let first = clock.next();
        let second = clock.next();
        assert!(second > first, "strictly increasing on one node");
        // Another node, its clock an hour ahead, started a stream of a device we serve.
        let ahead = crate::db::now_ms() + 3_600_000;
        clock.observe(ahead);
        assert!(clock.next() > ahead, "a stream started after hearing of it is newer");
        clock.observe(first);
        assert!(clock.next() > ahead + 1, "an old stamp moves nothing back");
    }

    #[test]
    fn cached_changes_own_their_bytes_instead_of_pinning_the_request_body() {
        // A request body of 8 MiB whose changes are slices of it.
        let body = Bytes::from(vec![9u8; 8 * 1024 * 1024]);
        let sliced = DeliveredChange {
            offset: 1,
            change: Some(Change { ciphertext: body.slice(0..100), nonce: body.slice(100..124), ..Default::default() }),
            ..Default::default()
        };
        let owned = unpinned(Arc::new(sliced.clone()));
        assert_eq!(*owned, sliced, "the same change");
        let (ciphertext, nonce) = owned.change.as_ref().map(|change| (&change.ciphertext, &change.nonce)).unwrap();
        let range = body.as_ptr_range();
        assert!(!range.contains(&ciphertext.as_ptr()) && !range.contains(&nonce.as_ptr()), "copies, not slices");
    }

    fn envelope(index: usize, ciphertext_bytes: usize) -> lockstep_schemas::ChangeEnvelope {
        lockstep_schemas::ChangeEnvelope {
            schema_version: 1,
            user_id: "018f6c1e-7b2a-7cc3-9f00-5b1d2e3f4a5b".into(),
            origin_device_id: format!("laptop-{index}"),
            change_id: format!("c-{index:04}"),
            record_id: format!("r-{index}"),
            collection: "notes".into(),
            op: if index % 3 == 0 { lockstep_schemas::Op::Delete } else { lockstep_schemas::Op::Upsert },
            hlc: (1_732_470_000_123 << 16) | index as i64,
            key_epoch: 7,
            nonce: (0..24).map(|byte| byte ^ index as u8).collect(),
            ciphertext: (0..ciphertext_bytes).map(|byte| (byte * 31 % 251) as u8 ^ index as u8).collect(),
            received_at_ms: 1_732_470_000_456,
        }
    }

    /// Envelopes at the edges: empty and non-ASCII strings, no nonce or
    /// ciphertext, extreme numbers, ciphertexts past a chunk buffer's sizes.
    fn edge_envelopes() -> Vec<lockstep_schemas::ChangeEnvelope> {
        let base = envelope(1, 1024);
        vec![
            base.clone(),
            lockstep_schemas::ChangeEnvelope {
                schema_version: -1,
                user_id: String::new(),
                origin_device_id: "Gerät «Küche» 🔐 中文 \u{0} \"quoted\\\"".into(),
                change_id: "x".repeat(300),
                record_id: "/".into(),
                collection: "ñ".into(),
                op: lockstep_schemas::Op::Delete,
                hlc: i64::MIN,
                key_epoch: u32::MAX,
                nonce: vec![],
                ciphertext: vec![],
                received_at_ms: -1,
            },
            lockstep_schemas::ChangeEnvelope {
                hlc: i64::MAX,
                key_epoch: 0,
                nonce: vec![0xff; 12],
                ciphertext: vec![0; 70_000],
                ..base.clone()
            },
            lockstep_schemas::ChangeEnvelope { ciphertext: vec![3; 3 << 20], ..base.clone() },
            lockstep_schemas::ChangeEnvelope { nonce: vec![], ..base.clone() },
            lockstep_schemas::ChangeEnvelope { ciphertext: vec![], ..base },
        ]
    }

    /// The in-place reading gives what decoding into an envelope gave, to the byte on the wire.
    fn assert_same_as_through_envelope(payloads: &[Option<Vec<u8>>]) {
        use prost::Message as _;
        let mut buffer = ChunkBuffer::default();
        let changes: Vec<DeliveredChange> = payloads
            .iter()
            .enumerate()
            .map(|(offset, payload)| delivered_record(offset as i64, payload.as_deref(), &mut buffer))
            .collect();
        let before: Vec<DeliveredChange> = payloads
            .iter()
            .enumerate()
            .map(|(offset, payload)| delivered_record_through_envelope(offset as i64, payload.as_deref()))
            .collect();
        assert_eq!(changes, before);
        let batch = |changes| lockstep_proto::v1::ChangeBatch { changes }.encode_to_vec();
        assert!(batch(changes) == batch(before), "the same bytes on the wire");
    }

    #[test]
    fn records_read_in_place_are_the_changes_an_envelope_made() {
        let mut payloads: Vec<Option<Vec<u8>>> =
            edge_envelopes().iter().map(|envelope| Some(lockstep_schemas::encode_change(envelope).unwrap())).collect();
        let good = payloads[0].clone().unwrap();
        // Undecodable records between them: no value, not Avro, cut short, trailing bytes.
        payloads.extend([None, Some(b"{}".to_vec()), Some(good[..good.len() - 1].to_vec()), Some(vec![])]);
        payloads.push(Some([good.as_slice(), &[0]].concat()));
        payloads.push(Some(good));
        assert_same_as_through_envelope(&payloads);
        for payload in &payloads {
            assert_same_as_through_envelope(std::slice::from_ref(payload));
        }
    }

    #[test]
    fn a_chunk_of_records_shares_a_few_buffers_and_a_small_one_holds_little() {
        // 4 MiB of records of 1 KiB: a buffer per many records.
        let mut buffer = ChunkBuffer::default();
        let changes: Vec<DeliveredChange> = (0..4096)
            .map(|index| {
                let payload = lockstep_schemas::encode_change(&envelope(index, 1000)).unwrap();
                delivered_record(index as i64, Some(&payload), &mut buffer)
            })
            .collect();
        let mut buffers: Vec<*const u8> = Vec::new();
        let mut last_end = std::ptr::null::<u8>();
        for (index, change) in changes.iter().enumerate() {
            let change = change.change.as_ref().unwrap();
            let expected = envelope(index, 1000);
            assert_eq!((&change.nonce[..], &change.ciphertext[..]), (&expected.nonce[..], &expected.ciphertext[..]));
            // Copied one after another: a change starts where the last one ended, or a new buffer.
            if change.nonce.as_ptr() != last_end {
                buffers.push(change.nonce.as_ptr());
            }
            assert_eq!(change.ciphertext.as_ptr(), change.nonce.as_ptr().wrapping_add(change.nonce.len()));
            last_end = change.ciphertext.as_ptr().wrapping_add(change.ciphertext.len());
        }
        assert!(buffers.len() <= 10, "{} buffers for 4096 records", buffers.len());
        // A chunk of one small record holds its first buffer only.
        let mut small = ChunkBuffer::default();
        let payload = lockstep_schemas::encode_change(&envelope(1, 100)).unwrap();
        let _change = delivered_record(1, Some(&payload), &mut small);
        assert!(small.free.capacity() < CHUNK_BUFFER_FIRST_BYTES, "{}", small.free.capacity());
    }

    proptest::proptest! {
        // Chunks of up to 12 records of up to 40 KB: fewer cases than the default 256 keep it quick.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn arbitrary_records_read_in_place_are_the_changes_an_envelope_made(
            records in proptest::collection::vec(
                (
                    proptest::array::uniform5(proptest::prelude::any::<String>()),
                    proptest::prelude::any::<(i32, bool, i64, u32, i64)>(),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40_000),
                    proptest::option::of((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>())),
                ),
                1..12,
            ),
        ) {
            let payloads: Vec<Option<Vec<u8>>> = records
                .into_iter()
                .map(|(strings, (schema_version, delete, hlc, key_epoch, received_at_ms), nonce, ciphertext, edit)| {
                    let [user_id, origin_device_id, change_id, record_id, collection] = strings;
                    let op = if delete { lockstep_schemas::Op::Delete } else { lockstep_schemas::Op::Upsert };
                    let envelope = lockstep_schemas::ChangeEnvelope {
                        schema_version, user_id, origin_device_id, change_id, record_id, collection,
                        op, hlc, key_epoch, nonce, ciphertext, received_at_ms,
                    };
                    let mut payload = lockstep_schemas::encode_change(&envelope).unwrap();
                    // Now and then a byte changed: an envelope that no longer reads, or reads otherwise.
                    if let Some((at, byte)) = edit {
                        let at = at.index(payload.len());
                        payload[at] = byte;
                    }
                    Some(payload)
                })
                .collect();
            assert_same_as_through_envelope(&payloads);
        }
    }

    #[test]
    fn batches_stay_under_the_byte_cap_keep_order_and_never_drop_a_change() {
        use prost::Message as _;
        let max_bytes = 1_000_000;
        let changes: Vec<_> = (0..90).map(|offset| change(offset, 256 * 1024)).collect();
        let batches = split_by_bytes(changes, max_bytes);
        let offsets: Vec<i64> = batches.iter().flatten().map(|change| change.offset).collect();
        assert_eq!(offsets, (0..90).collect::<Vec<_>>());
        for batch in &batches {
            let encoded = lockstep_proto::v1::SubscribeResponse {
                event: Some(lockstep_proto::v1::subscribe_response::Event::Changes(lockstep_proto::v1::ChangeBatch {
                    changes: batch.clone(),
                })),
            }
            .encoded_len();
            assert!(encoded <= max_bytes, "{encoded} bytes in one message");
        }
        assert_eq!(batches.len(), 30, "three changes of 256 KiB per MB");
        // A change larger than the cap still goes, alone.
        let big = split_by_bytes(vec![change(0, 10), change(1, 2_000_000), change(2, 10)], max_bytes);
        assert_eq!(big.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1]);
    }
}
