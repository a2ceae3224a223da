//! End-to-end harness: the real `lockstep` binary against a real local Kafka
//! (Nisshi), driven through the public gRPC API like a device would.
//!
//! # Layout
//! - [`nisshi`]: one Nisshi broker per test, on a free port, sqlite storage.
//! - [`server`]: the `lockstep` binary on port 0; `kill -9`, restart.
//! - [`device`]: a device's view of the API (bearer token, push, subscribe, ack).
//! - [`cli`]: a device driven through the `lockstep-cli` binary, with its own store.
//! - [`proxy`]: a TCP proxy between the server and Kafka that tests cut or slow down.
//! - [`workload`]: simulated devices for the fault tests, recording into a [`history`].
//! - [`history`]: what the devices saw in a fault run, checked against the invariants.
//! - [`fault_run`]: one run of the fault suite: stack, devices, verdict and evidence.

pub mod cli;
pub mod device;
pub mod fault_run;
pub mod history;
pub mod nisshi;
pub mod proxy;
pub mod server;
pub mod workload;

use std::{net::TcpListener, path::Path};

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
