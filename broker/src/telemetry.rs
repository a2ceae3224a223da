//! Logging set-up. Logs go to stderr as text or JSON; the filter comes from
//! `LOCKSTEP_LOG` (default `info`). An OpenTelemetry exporter plugs in here as
//! one more layer of the same registry.

use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_env("LOCKSTEP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).try_init()
    };
    if let Err(error) = result {
        eprintln!("logging was set up already: {error}");
    }
}
