//! One test kit for the end-to-end tests (`tests/`) and the benchmarks
//! (`bench/`): the real processes of the data flow, started the same way
//! everywhere, killed when dropped.
//!
//! # Layout
//! - [`process`]: a child process killed on drop, with its log and its exit.
//! - [`nisshi`]: one Nisshi broker (the local Kafka) on a free port, sqlite storage.
//! - [`server`]: the `lockstep` binary on port 0; `kill -9`, SIGTERM, restart.
//! - [`device`]: a device's view of the gRPC API (bearer token, push, subscribe, ack).
//! - [`dashboard`]: the `lockstep-dashboard` binary, a plain HTTP GET, headless Chromium.
//! - [`cli`]: a device driven through the `lockstep-cli` binary, with its own store.
//! - [`stack`]: Kafka + server + first device in one line.
//! - [`user_topic`], [`device_group`]: Kafka names, from the server's own naming functions.

pub mod cli;
pub mod dashboard;
pub mod device;
pub mod nisshi;
pub mod process;
pub mod server;
pub mod stack;

use std::{net::TcpListener, path::Path};

use lockstep_broker::settings::KafkaSettings;

/// A port that was free a moment ago (for processes that cannot take port 0).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The last lines of a log file, for failure messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The Kafka topic of a user, as a server with default settings names it.
pub fn user_topic(user_id: &str) -> String {
    lockstep_broker::kafka::user_topic(&KafkaSettings::default(), user_id)
}

/// The consumer group of a device, as a server with default settings names it.
pub fn device_group(device_id: &str) -> String {
    lockstep_broker::kafka::device_group(&KafkaSettings::default(), device_id)
}
