//! `lockstep-push`: parses flags, loads settings, sets up logging, runs the
//! push worker until SIGINT or SIGTERM; `vapid-public-key` prints the key
//! browsers subscribe with (making the key pair on first use).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lockstep_push::Settings;

/// Lockstep's push worker: wakes offline devices from the metadata-only events topic.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Settings file (TOML). Values from `LOCKSTEP_PUSH_*` variables and flags win over it.
    #[arg(long, env = "LOCKSTEP_PUSH_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers, e.g. `kafka-1:9092,kafka-2:9092`.
    #[arg(long, env = "LOCKSTEP_PUSH_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Directory of the VAPID key pair.
    #[arg(long, env = "LOCKSTEP_PUSH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOCKSTEP_PUSH_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the worker (the default).
    Run,
    /// Prints the VAPID public key (base64url, uncompressed P-256 point), making the key
    /// pair in the data directory when missing; give it to the server as
    /// `LOCKSTEP_PUSH__VAPID_PUBLIC_KEY`.
    VapidPublicKey,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_json);
    let mut settings = Settings::load(args.config.as_deref())?;
    if let Some(brokers) = args.kafka_brokers {
        settings.kafka.bootstrap_servers = brokers;
    }
    if let Some(data_dir) = args.data_dir {
        settings.data_dir = data_dir;
    }
    match args.command.unwrap_or(Command::Run) {
        Command::VapidPublicKey => {
            println!("{}", lockstep_push::vapid_key(&settings)?.public_key());
        }
        Command::Run => {
            tracing::info!(?settings, "starting lockstep-push");
            lockstep_push::run(settings, shutdown_signal()).await?;
            tracing::info!("lockstep-push stopped");
        }
    }
    Ok(())
}

fn init_logging(json: bool) {
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = EnvFilter::try_from_env("LOCKSTEP_PUSH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the worker");
            let _ = interrupt.await;
            return;
        }
    };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
}
