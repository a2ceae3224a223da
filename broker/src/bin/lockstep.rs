//! `lockstep`: parses flags, loads settings, sets up logging, runs the server
//! until SIGINT or SIGTERM; `lockstep invite …` manages invite codes instead.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use lockstep_broker::{Settings, invite_command::InviteCommand};
use lockstep_telemetry as telemetry;

/// Lockstep: an end-to-end-encrypted sync broker on Kafka.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Settings file (TOML). Values from `LOCKSTEP_*` variables and flags win over it.
    #[arg(long, env = "LOCKSTEP_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "LOCKSTEP_LISTEN")]
    listen: Option<SocketAddr>,
    /// Kafka bootstrap servers, e.g. `kafka-1:9092,kafka-2:9092`.
    #[arg(long, env = "LOCKSTEP_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Directory of the accounts database.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOCKSTEP_LOG_JSON")]
    log_json: bool,
    /// Without a command: run the server.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Invite codes, each good for one new account (in the server's database; works while it runs).
    Invite {
        #[command(subcommand)]
        command: InviteCommand,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = telemetry::init(args.log_json);
    let mut settings = Settings::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        settings.listen_addr = listen;
    }
    if let Some(brokers) = args.kafka_brokers {
        settings.kafka.bootstrap_servers = brokers;
    }
    if let Some(data_dir) = args.data_dir {
        settings.data_dir = data_dir;
    }
    if let Some(Command::Invite { command }) = args.command {
        let done = lockstep_broker::invite_command::run(&settings, command).await;
        telemetry.shutdown();
        return done;
    }
    tracing::info!(?settings, "starting lockstep");
    let listener = tokio::net::TcpListener::bind(settings.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen_addr))?;
    let served = lockstep_broker::run(settings, listener, shutdown_signal()).await;
    telemetry.shutdown();
    Ok(served?)
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
