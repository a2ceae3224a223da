//! The push worker: the last step of the data flow for devices that are not
//! connected. It reads Lockstep's metadata-only events topic as a consumer
//! group, keeps per device its committed offset, presence, push target and
//! last wake-up, and wakes a device that is behind its user's log end with a
//! content-free push (`{"v":1,"log_end":N}`), at most one in flight and one
//! per `wake.min_interval`. It needs only Kafka: targets come from the events.
//!
//! # Layout
//! - [`settings`]: typed settings (defaults, TOML file, `LOCKSTEP_PUSH_*`).
//! - [`state`]: what is known per user and device, and the wake-up rule (pure).
//! - [`events`]: the group member's poll thread, and the worker's own event producer.
//! - [`worker`]: the loop tying them together; offsets committed behind wake-ups.
//! - [`dispatch`]: which wake-up attempt runs next: slots per origin, slow
//!   origins apart, retries waiting without a slot.
//! - [`wake`]: one wake-up attempt's HTTP request and `WakeUp` event.
//! - [`resolve`]: DNS that drops addresses push targets may not reach.
//! - [`vapid`]: the VAPID key pair and JWT.

pub mod dispatch;
pub mod events;
pub mod metrics_http;
pub mod resolve;
pub mod settings;
pub mod state;
pub mod vapid;
pub mod wake;
pub mod worker;

use std::sync::Arc;

pub use settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka {operation} failed: {source}")]
    Kafka {
        operation: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("kafka group offsets: {0}")]
    GroupOffsets(#[from] lockstep_kafka::GroupOffsetsError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vapid key: {0}")]
    Vapid(String),
    #[error("http client: {0}")]
    Http(String),
    #[error("bad push target: {0}")]
    Target(&'static str),
    #[error("refused push target: {0}")]
    RefusedTarget(String),
    #[error("cannot encode event: {0}")]
    Encode(String),
    #[error("the events consumer stopped")]
    ConsumerGone,
}

impl Error {
    pub fn kafka(operation: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> Self {
        move |source| Error::Kafka { operation, source }
    }
}

/// The VAPID key the worker signs with: `vapid.private_key`, else the one in
/// `data_dir` (made on first run).
pub fn vapid_key(settings: &Settings) -> Result<vapid::VapidKey, Error> {
    match &settings.vapid.private_key {
        Some(private_key) => vapid::VapidKey::from_base64(private_key),
        None => vapid::VapidKey::load_or_create(&settings.data_dir),
    }
}

/// Runs the worker until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    let mut shutdown = std::pin::pin!(shutdown);
    let vapid = vapid_key(&settings)?;
    let worker_id = settings
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("push-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
    tracing::info!(%worker_id, vapid_public_key = vapid.public_key(), "starting push worker");
    let publisher = events::Publisher::new(&settings)?;
    let offsets = lockstep_kafka::GroupOffsets::connect(lockstep_kafka::GroupOffsetsSettings {
        bootstrap_servers: settings.kafka.bootstrap_servers.clone(),
        client_id: format!("lockstep-push-{worker_id}"),
        request_timeout: settings.kafka.request_timeout,
        max_attempts: 3,
        security: lockstep_kafka::group_offsets::security::KafkaSecurity::from_client_config(
            &settings.kafka.client_config,
        )?,
    })
    .await?;
    let waker = Arc::new(wake::Waker::new(settings.clone(), vapid, worker_id, publisher)?);
    if let Some(addr) = settings.metrics_listen_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Io { path: std::path::PathBuf::from(addr.to_string()), source })?;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics (/metrics, /healthz) listening");
            println!("LOCKSTEP_PUSH_METRICS_LISTENING {addr}");
        }
        tokio::spawn(metrics_http::serve(listener));
    }
    tokio::select! {
        waited = events::wait_for_topic(&settings) => waited?,
        () = &mut shutdown => return Ok(()),
    }
    let (member, incoming_rx) = events::GroupMember::start(&settings)?;
    worker::Worker::new(settings, member, waker, offsets).run(incoming_rx, shutdown).await
}
