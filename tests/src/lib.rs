//! End-to-end tests: the real `lockstep` binary against a real local Apache
//! Kafka, driven through the public gRPC API like a device would. The
//! processes, devices and stacks come from the one test kit
//! (`lockstep-testkit`, shared with `bench/`); this crate adds the fault suite.
//!
//! # Layout
//! - [`server`], [`device`], [`cli`], [`stack`], [`tls`], [`wait`], [`haproxy`]: re-exported from the test kit.
//! - [`proxy`]: a TCP proxy between the server and Kafka that tests cut or slow down.
//! - [`workload`]: simulated devices for the fault tests, recording into a [`history`].
//! - [`history`]: what the devices saw in a fault run, checked against the invariants.
//! - [`outcome`]: what a fault run must show besides: work happened, each fault hit.
//! - [`fault_run`]: one run of the fault suite: stack, devices, faults, verdict and evidence.
//! - [`fault_stack`]: the stack a fault run stands on (one Kafka broker, or a cluster) and its logs.
//! - [`cluster_faults`]: the faults of a cluster's brokers (replication faults) and recovery times.
//! - [`leaks`]: whether spans or event records hold anything of a pushed change.
//! - [`markdown`], [`doc_commands`]: the commands the docs show, and whether the binaries'
//!   `--help` lists their subcommands and flags (for `tests/tests/docs.rs`).

pub mod cluster_faults;
pub mod doc_commands;
pub mod fault_run;
pub mod fault_stack;
pub mod history;
pub mod leaks;
pub mod markdown;
pub mod outcome;
pub mod proxy;
pub mod workload;

pub use lockstep_testkit::{
    cli, dashboard, device, device_group, free_port, haproxy, http_get, http_get_with, http_request, kafka, log_tail,
    process, promtool_check, push, server, stack, tls, user_topic, wait,
};
