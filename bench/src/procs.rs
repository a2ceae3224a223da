//! The processes a benchmark round drives: Apache Kafka (one KRaft node) and
//! the `lockstep` server from the test kit (started as the tests start them),
//! `redis-server` and `nats-server`, each on a free port of 127.0.0.1 with its data in a
//! temporary directory. Killed when dropped. Also /proc readings.

use std::{path::Path, process::Command};

use anyhow::Context;

use lockstep_testkit::{free_port, process::Process};
pub use lockstep_testkit::{kafka::Kafka, server::Server as Lockstep};
use tempfile::TempDir;

/// A fresh Apache Kafka broker, as the tests start it (the test kit's launcher).
pub async fn start_kafka() -> anyhow::Result<Kafka> {
    Kafka::start().await
}

/// The server `binary` (a release build) with its default settings against `kafka`, less
/// the abuse limits (a benchmark creates thousands of devices from one address), and
/// allowing push targets on 127.0.0.1 (W6's local push service).
pub async fn start_lockstep(binary: &Path, kafka: &str) -> anyhow::Result<Lockstep> {
    let mut env = vec![lockstep_testkit::push::SERVER_ALLOWS_LOCAL_PUSH];
    env.extend_from_slice(lockstep_testkit::server::UNTHROTTLED);
    Lockstep::start_binary(binary.to_path_buf(), kafka, &env).await
}

/// A node of a cluster for W7: the accounts in the PostgreSQL database `database_url`, the events
/// on `events_topic`, both shared with the other nodes started so.
pub async fn start_cluster_node(
    binary: &Path,
    kafka: &str,
    database_url: &str,
    events_topic: &str,
) -> anyhow::Result<Lockstep> {
    let mut env = vec![("LOCKSTEP_DATABASE__URL", database_url), ("LOCKSTEP_EVENTS__TOPIC", events_topic)];
    env.extend_from_slice(lockstep_testkit::server::UNTHROTTLED);
    Lockstep::start_binary(binary.to_path_buf(), kafka, &env).await
}

/// The server for W3: its subscription and connection limits (20,000 and 10,000 by default)
/// raised to hold `streams` idle streams, so that W3 measures the machine, not the defaults.
pub async fn start_lockstep_for_idle(binary: &Path, kafka: &str, streams: usize) -> anyhow::Result<Lockstep> {
    let (subscriptions, connections) = ((streams + 1_000).to_string(), (streams / 10 + 10_000).to_string());
    let mut env = vec![
        lockstep_testkit::push::SERVER_ALLOWS_LOCAL_PUSH,
        ("LOCKSTEP_LIMITS__MAX_SUBSCRIPTIONS", subscriptions.as_str()),
        ("LOCKSTEP_LIMITS__MAX_CONNECTIONS", connections.as_str()),
    ];
    env.extend_from_slice(lockstep_testkit::server::UNTHROTTLED);
    Lockstep::start_binary(binary.to_path_buf(), kafka, &env).await
}

/// The same server exporting traces to `otlp_endpoint`, sampling 10 % of pushes.
pub async fn start_lockstep_tracing(binary: &Path, kafka: &str, otlp_endpoint: &str) -> anyhow::Result<Lockstep> {
    let mut env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint), ("OTEL_TRACES_SAMPLER_ARG", "0.1")];
    env.extend_from_slice(lockstep_testkit::server::UNTHROTTLED);
    Lockstep::start_binary(binary.to_path_buf(), kafka, &env).await
}

/// The tests' OTLP receiver (`tests/otlp_receiver.py`), so that traced runs export for real.
pub struct OtlpReceiver {
    _process: Process,
    pub endpoint: String,
    _dir: TempDir,
}

impl OtlpReceiver {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("lockstep-bench-otlp-").tempdir()?;
        let spans = dir.path().join("spans.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/otlp_receiver.py");
        let log_path = dir.path().join("receiver.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new("python3");
        command.arg(&script).arg(&spans).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let process = Process::spawn("otlp-receiver", &mut command, &log_path)?;
        let port_file = dir.path().join("spans.jsonl.port");
        let started = std::time::Instant::now();
        loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse::<u16>().ok()) {
                return Ok(Self { _process: process, endpoint: format!("http://127.0.0.1:{port}"), _dir: dir });
            }
            if started.elapsed() > std::time::Duration::from_secs(30) {
                anyhow::bail!("the OTLP receiver did not start: {}", std::fs::read_to_string(&log_path)?);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// The same server with the events topic turned off (`events.enabled = false`).
pub async fn start_lockstep_without_events(binary: &Path, kafka: &str) -> anyhow::Result<Lockstep> {
    let mut env = vec![("LOCKSTEP_EVENTS__ENABLED", "false")];
    env.extend_from_slice(lockstep_testkit::server::UNTHROTTLED);
    Lockstep::start_binary(binary.to_path_buf(), kafka, &env).await
}

pub struct Redis {
    process: Process,
    pub url: String,
    _dir: TempDir,
}

impl Redis {
    /// `appendfsync`: `always` (fsync before each write is answered) or `everysec`.
    pub async fn start(binary: &Path, appendfsync: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("lockstep-bench-redis-").tempdir()?;
        let port = free_port()?;
        let log_path = dir.path().join("redis.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(binary);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
            .args(["--appendfsync", appendfsync])
            .args(["--protected-mode", "no", "--daemonize", "no", "--dir"])
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut process = Process::spawn("redis-server", &mut command, &log_path)?;
        process.wait_for_port(port, std::time::Duration::from_secs(30)).await?;
        Ok(Self { process, url: format!("redis://127.0.0.1:{port}/"), _dir: dir })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// `nats-server` with JetStream on, its file storage in a temporary directory.
pub struct Nats {
    process: Process,
    pub url: String,
    _dir: TempDir,
}

impl Nats {
    pub async fn start(binary: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("lockstep-bench-nats-").tempdir()?;
        let port = free_port()?;
        let log_path = dir.path().join("nats.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(binary);
        command
            .args(["--addr", "127.0.0.1", "--port", &port.to_string(), "--jetstream", "--store_dir"])
            .arg(dir.path().join("jetstream"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut process = Process::spawn("nats-server", &mut command, &log_path)?;
        process.wait_for_port(port, std::time::Duration::from_secs(30)).await?;
        Ok(Self { process, url: format!("nats://127.0.0.1:{port}"), _dir: dir })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// The machine's load averages over 1, 5 and 15 minutes (/proc/loadavg), as printed there.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|error| format!("(/proc/loadavg: {error})"))
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// This process's soft limit of open files (`Max open files` of /proc/self/limits).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `MemAvailable` of /proc/meminfo, KiB.
pub fn memory_available_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) a process used so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = &stat[stat.rfind(')').context("stat comm")? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); after the comm field, index 11 and 12.
    Ok(fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?)
}

pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// The first line a command prints, or why it could not run.
pub fn command_line(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(output) => {
            let text = if output.stdout.is_empty() { output.stderr } else { output.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
        }
        Err(error) => format!("({program}: {error})"),
    }
}

/// CPU ticks of several processes at one moment.
pub struct CpuSnapshot(Vec<(&'static str, u32, u64)>);

impl CpuSnapshot {
    pub fn take(processes: &[(&'static str, u32)]) -> Self {
        Self(
            processes
                .iter()
                .filter(|(_, pid)| *pid != 0)
                .filter_map(|&(name, pid)| cpu_ticks(pid).ok().map(|ticks| (name, pid, ticks)))
                .collect(),
        )
    }

    /// Records the CPU seconds each process used since the snapshot as `cpu.{what}.{process}_s`.
    pub fn record(&self, metrics: &mut crate::stats::Metrics, round: usize, what: &str) {
        for (process, seconds) in self.since() {
            metrics.add(round, &format!("cpu.{what}.{process}_s"), seconds);
        }
    }

    /// CPU seconds each process used since the snapshot.
    pub fn since(&self) -> Vec<(&'static str, f64)> {
        let per_second = clock_ticks_per_second() as f64;
        self.0
            .iter()
            .filter_map(|&(name, pid, before)| {
                cpu_ticks(pid).ok().map(|now| (name, now.saturating_sub(before) as f64 / per_second))
            })
            .collect()
    }
}
