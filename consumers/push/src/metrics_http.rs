//! The worker's `/metrics` (Prometheus text format) and `/healthz`, on a
//! listener of its own. Labels are bounded (outcomes); never a device, user
//! or endpoint.

use std::sync::OnceLock;

use axum::{Router, routing::get};
use metrics::{describe_counter, describe_gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and describes the worker's metrics.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if let Err(error) = metrics::set_global_recorder(recorder) {
                tracing::warn!(%error, "a metrics recorder was installed already");
            }
            describe_counter!(
                "lockstep_push_wakeup_attempts_total",
                "Wake-up requests to push services and webhooks, by outcome (SENT, GONE, THROTTLED, RETRYING, FAILED)."
            );
            describe_counter!(
                "lockstep_push_events_consumed_total",
                "Records read from the events topic (replays included)."
            );
            describe_gauge!("lockstep_push_wakeups_in_flight", "Wake-ups being sent now.");
            describe_counter!(
                "lockstep_push_refused_addresses_total",
                "Addresses a push target's host resolved to that the address policy refused."
            );
            describe_counter!(
                "lockstep_push_refused_targets_total",
                "Wake-ups not sent because their target could not be made into a request."
            );
            handle
        })
        .clone()
}

pub async fn serve(listener: TcpListener) {
    let handle = install();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], handle.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "metrics server failed");
    }
}
