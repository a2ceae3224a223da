//! Device freshness: the out-of-sync dashboard. The last step of the data
//! flow's metadata side: the server's events topic (`lockstep.events`) and
//! Kafka's own bookkeeping → a status per device → HTML, JSON, Prometheus.
//!
//! It reads the events topic from the beginning (events state absolute
//! values, so a restart rebuilds the same state), and on a timer the log
//! watermarks and committed offsets straight from Kafka, so it also sees
//! devices that never connect and works with any number of server nodes. It
//! never writes to Kafka: it never joins a device's group nor commits anything.
//!
//! Layout:
//! - [`settings`]: typed settings (defaults → TOML → `LOCKSTEP_DASHBOARD_*`).
//! - [`status`]: the pure function that decides a device's status.
//! - [`fleet`]: the state folded from events and Kafka reads, and its views.
//! - [`kafka`]: the events reader and the periodic Kafka refresh.
//! - [`web`]: the page, the JSON API, `/metrics`, `/healthz` (axum).

pub mod fleet;
pub mod kafka;
pub mod settings;
pub mod status;
pub mod web;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{net::TcpListener, sync::mpsc};

pub use settings::Settings;

use lockstep_kafka::locks::lock;

use crate::{fleet::Fleet, status::Status};

/// What the HTTP handlers share.
pub struct App {
    pub settings: Settings,
    pub fleet: Mutex<Fleet>,
    pub metrics: PrometheusHandle,
}

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error(transparent)]
    Kafka(#[from] kafka::DashboardKafkaError),
    #[error("metrics exporter: {0}")]
    Metrics(String),
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The Prometheus recorder (installed once per process; later calls get a
/// handle on a recorder of their own, e.g. in tests).
fn metrics_handle() -> Result<PrometheusHandle, DashboardError> {
    let lag_changes = [0.0, 1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];
    let lag_seconds = [1.0, 10.0, 60.0, 600.0, 3_600.0, 86_400.0, 604_800.0];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("lockstep_dashboard_device_lag_changes".into()), &lag_changes)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("lockstep_dashboard_device_lag_seconds".into()), &lag_seconds)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("lockstep_dashboard_refresh_seconds".into()),
                &[0.01, 0.1, 1.0, 10.0, 60.0],
            )
        })
        .map_err(|error| DashboardError::Metrics(error.to_string()))?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was installed already; this dashboard's /metrics shows its own only");
    }
    metrics::describe_counter!("lockstep_dashboard_events_consumed_total", "Records read from the events topic.");
    metrics::describe_counter!(
        "lockstep_dashboard_events_undecodable_total",
        "Events topic records that did not decode."
    );
    metrics::describe_gauge!("lockstep_dashboard_devices", "Devices per status.");
    metrics::describe_gauge!("lockstep_dashboard_users", "Users seen in the events.");
    metrics::describe_histogram!(
        "lockstep_dashboard_device_lag_changes",
        "Changes behind per non-revoked device, observed once per device at every refresh."
    );
    metrics::describe_histogram!(
        "lockstep_dashboard_device_lag_seconds",
        "Age of the oldest unacked change per lagging device (when known), observed at every refresh."
    );
    metrics::describe_histogram!("lockstep_dashboard_refresh_seconds", "Duration of one Kafka refresh.");
    metrics::describe_counter!("lockstep_dashboard_refresh_errors_total", "Kafka reads that failed during refreshes.");
    Ok(handle)
}

/// Sets the gauges (devices per status, users) to the fleet as it is now;
/// `/metrics` calls it before it renders.
pub fn record_status_gauges(app: &App) -> Vec<fleet::DeviceView> {
    let now = now_ms();
    let fleet = lock(&app.fleet);
    let views = fleet.devices(now, &app.settings.status);
    let summary = fleet.summary(&views, now);
    drop(fleet);
    for status in Status::ALL {
        let count = summary.by_status.get(&status).copied().unwrap_or(0);
        metrics::gauge!("lockstep_dashboard_devices", "status" => status.as_str()).set(count as f64);
    }
    metrics::gauge!("lockstep_dashboard_users").set(summary.users as f64);
    views
}

/// The gauges, and one observation per device of the lag histograms.
fn record_fleet_metrics(app: &App) {
    let views = record_status_gauges(app);
    let lag_changes = metrics::histogram!("lockstep_dashboard_device_lag_changes");
    let lag_seconds = metrics::histogram!("lockstep_dashboard_device_lag_seconds");
    for view in views.iter().filter(|view| !view.revoked) {
        lag_changes.record(view.lag_changes as f64);
        if let Some(seconds) = view.lag_seconds {
            lag_seconds.record(seconds);
        }
    }
}

/// Runs the dashboard on `listener` until `shutdown` completes: the events
/// reader thread, the refresh loop and the HTTP server. Prints
/// `LOCKSTEP_DASHBOARD_LISTENING <addr>` on stdout once it serves.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DashboardError> {
    let metrics = metrics_handle()?;
    let refresher = kafka::Refresher::connect(&settings).await?;
    let app = Arc::new(App { settings: settings.clone(), fleet: Mutex::new(Fleet::default()), metrics });

    let stop = Arc::new(AtomicBool::new(false));
    let (events_tx, mut events_rx) = mpsc::channel(kafka::EVENT_QUEUE);
    let reader = {
        let (settings, stop) = (settings.clone(), stop.clone());
        std::thread::Builder::new().name("events-reader".into()).spawn(move || {
            if let Err(error) = kafka::read_events_blocking(&settings, events_tx, stop) {
                tracing::error!(%error, "the events reader stopped");
            }
        })?
    };
    let folder = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(256);
            while events_rx.recv_many(&mut batch, 256).await > 0 {
                let mut fleet = lock(&app.fleet);
                for event in batch.drain(..) {
                    fleet.apply_event(&event);
                }
            }
        })
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let refresh = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(app.settings.refresh.interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = stop_rx.changed() => return,
                }
                let started = std::time::Instant::now();
                let report = refresher.refresh(&app.fleet).await;
                metrics::histogram!("lockstep_dashboard_refresh_seconds").record(started.elapsed().as_secs_f64());
                metrics::counter!("lockstep_dashboard_refresh_errors_total").increment(report.errors as u64);
                tracing::debug!(?report, elapsed = ?started.elapsed(), "refreshed from kafka");
                record_fleet_metrics(&app);
                app.metrics.run_upkeep();
            }
        })
    };

    let local: Option<SocketAddr> = listener.local_addr().ok();
    if let Some(addr) = local {
        println!("LOCKSTEP_DASHBOARD_LISTENING {addr}");
        tracing::info!(%addr, "dashboard listening");
    }
    let served = axum::serve(listener, web::router(app.clone())).with_graceful_shutdown(shutdown).await;

    // Stop in order: the refresh, the reader thread (it sees the flag within a poll), the folder.
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), refresh).await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), folder).await;
    served?;
    Ok(())
}
