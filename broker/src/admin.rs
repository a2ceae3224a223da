//! The admin port: Prometheus `/metrics`, `/healthz` (the process runs) and
//! `/readyz` (Kafka answers), on a listener of its own (default
//! `127.0.0.1:50052`) so that it is never exposed with the gRPC port.
//!
//! Metrics are recorded where things happen with the `metrics` macros; this
//! module installs the Prometheus recorder and describes every metric (the
//! HELP and unit lines). Labels are bounded: gRPC codes, event kinds, delivery
//! sources — never a user, device or record id.

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::{delivery::Delivery, events::Events, kafka::Topics};

/// Buckets for latency histograms, in seconds: 0.5 ms … 30 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Buckets for the per-stage histograms, in seconds: 10 µs … 10 s (a stage of
/// a chunk or of a push often takes well under a millisecond).
const STAGE_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
];

/// Writes per dedup commit: 1 up to the writer's group limit (256).
const GROUP_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Stages of a catch-up chunk and of a push (see `docs/metrics.md`).
pub const CATCHUP_STAGE_SECONDS: &str = "lockstep_catchup_stage_seconds";
pub const PUSH_STAGE_SECONDS: &str = "lockstep_push_stage_seconds";
pub const DEDUP_GROUP_WRITES: &str = "lockstep_dedup_group_writes";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return
/// the same handle) and describes Lockstep's metrics.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("non-empty buckets")
                // Full names sort before suffixes: these win over the latency buckets.
                .set_buckets_for_metric(Matcher::Full(CATCHUP_STAGE_SECONDS.into()), STAGE_BUCKETS)
                .expect("non-empty buckets")
                .set_buckets_for_metric(Matcher::Full(PUSH_STAGE_SECONDS.into()), STAGE_BUCKETS)
                .expect("non-empty buckets")
                .set_buckets_for_metric(Matcher::Full(DEDUP_GROUP_WRITES.into()), GROUP_BUCKETS)
                .expect("non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            if let Err(error) = metrics::set_global_recorder(recorder) {
                tracing::warn!(%error, "a metrics recorder was installed already");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!("lockstep_pushes_total", "Push requests answered, by gRPC code.");
    describe_counter!(
        "lockstep_token_lookups_total",
        "Device tokens the cache could not answer, looked up in the shared database, by whether one was found."
    );
    describe_counter!("lockstep_doorbells_total", "Other nodes' LogAppended events that moved a live tail here.");
    describe_counter!(
        "lockstep_streams_superseded_elsewhere_total",
        "Streams ended because the same device subscribed on another node."
    );
    describe_counter!(
        "lockstep_connections_refused_total",
        "Connections closed at once because limits.max_connections were open."
    );
    describe_counter!(
        "lockstep_changes_pushed_total",
        "Changes Kafka acknowledged through pushes (duplicates excluded)."
    );
    describe_counter!("lockstep_pushed_bytes_total", Unit::Bytes, "Ciphertext bytes in changes Kafka acknowledged.");
    describe_histogram!("lockstep_push_duration_seconds", Unit::Seconds, "Push requests, received to answered.");
    describe_histogram!(
        "lockstep_kafka_produce_duration_seconds",
        Unit::Seconds,
        "One record, enqueued to acknowledged by Kafka (acks=all)."
    );
    describe_histogram!(
        CATCHUP_STAGE_SECONDS,
        Unit::Seconds,
        "Catch-up from Kafka, per chunk, by stage: lease (waiting for a shared reader), fetch (Kafka \
         reads), decode (records to changes), send (waiting for the device's stream to take the batch)."
    );
    describe_histogram!(
        PUSH_STAGE_SECONDS,
        Unit::Seconds,
        "Pushes, per push, by stage: enqueue (waiting for the user's earlier pushes to enqueue), dedup \
         (the dedup index, looked up and written), produce (encoding and handing records to the \
         producer), ack (waiting for Kafka's acks), finish (waiting for earlier pushes to settle, then \
         settling and publishing to live devices)."
    );
    describe_histogram!(
        DEDUP_GROUP_WRITES,
        "Pushes' dedup index writes committed together in one transaction (gateway/dedup.rs)."
    );
    describe_gauge!("lockstep_live_streams", "Subscribe streams open on this node.");
    describe_gauge!(
        "lockstep_state_entries",
        "Per-device and per-user entries this node holds in memory, by kind (forgotten when idle: limits.idle_state_after)."
    );
    describe_counter!(
        "lockstep_idle_state_forgotten_total",
        "Idle per-device and per-user entries forgotten, by kind."
    );
    describe_gauge!(
        "lockstep_live_cache_bytes",
        Unit::Bytes,
        "Bytes of recent changes cached for live devices, all users together (delivery.live_cache_total_bytes)."
    );
    describe_counter!(
        "lockstep_deliveries_total",
        "Changes sent to devices, by source (live tail or catch-up reader)."
    );
    describe_counter!("lockstep_acks_total", "Acks that moved a device's committed offset.");
    describe_counter!("lockstep_resyncs_total", "Resync instructions sent to devices, by reason.");
    describe_counter!("lockstep_errors_total", "Requests answered with an error, by gRPC code.");
    describe_counter!("lockstep_events_recorded_total", "Facts recorded for the events topic.");
    describe_counter!("lockstep_events_published_total", "Events Kafka acknowledged on the events topic.");
    describe_counter!("lockstep_events_dropped_total", "Facts dropped because the events buffer was full.");
    describe_gauge!("lockstep_events_pending", "Facts waiting for the events topic (coalesced per subject).");
    describe_gauge!("lockstep_kafka_reachable", "1 when the last readiness check reached Kafka, else 0.");
}

#[derive(Clone)]
struct AdminState {
    handle: PrometheusHandle,
    topics: Topics,
    delivery: Delivery,
    events: Events,
}

/// Binds the admin listener; `None` when `admin_listen_addr` is unset.
pub async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => TcpListener::bind(addr).await.map(Some),
        None => Ok(None),
    }
}

/// Serves the admin routes on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    topics: Topics,
    delivery: Delivery,
    events: Events,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let state = AdminState { handle: install(), topics, delivery, events };
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::error!(%error, "admin server failed");
    }
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let stats = state.events.stats();
    metrics::gauge!("lockstep_events_pending").set(stats.pending as f64);
    metrics::gauge!("lockstep_live_streams").set(state.delivery.active_streams() as f64);
    metrics::gauge!("lockstep_live_cache_bytes").set(state.delivery.cached_bytes() as f64);
    ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], state.handle.render())
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    let reachable = state.topics.wait_until_reachable(Duration::from_secs(2)).await.is_ok();
    metrics::gauge!("lockstep_kafka_reachable").set(if reachable { 1.0 } else { 0.0 });
    if reachable { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "kafka is not reachable\n") }
}
