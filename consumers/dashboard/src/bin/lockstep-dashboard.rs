//! `lockstep-dashboard`: parses flags, loads settings, sets up logging, runs
//! the dashboard until SIGINT or SIGTERM.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::Parser;
use lockstep_dashboard::Settings;

/// Lockstep's out-of-sync dashboard: device freshness from the events topic and Kafka.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Settings file (TOML). `LOCKSTEP_DASHBOARD_*` variables and flags win over it.
    #[arg(long, env = "LOCKSTEP_DASHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port). Default 127.0.0.1:8090.
    #[arg(long, env = "LOCKSTEP_DASHBOARD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Kafka bootstrap servers, e.g. `kafka-1:9092,kafka-2:9092`.
    #[arg(long, env = "LOCKSTEP_DASHBOARD_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOCKSTEP_DASHBOARD_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = lockstep_telemetry::init_service("lockstep-dashboard", args.log_json);
    let mut settings = Settings::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        settings.listen_addr = listen;
    }
    if let Some(brokers) = args.kafka_brokers {
        settings.kafka.bootstrap_servers = brokers;
    }
    settings.validate()?;
    tracing::info!(?settings, "starting lockstep-dashboard");
    let listener = tokio::net::TcpListener::bind(settings.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen_addr))?;
    let result = lockstep_dashboard::run(settings, listener, shutdown_signal()).await;
    telemetry.shutdown();
    Ok(result?)
}

async fn shutdown_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the dashboard");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
