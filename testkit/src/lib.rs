//! One test kit for the end-to-end tests (`tests/`) and the benchmarks
//! (`bench/`): the real processes of the data flow, started the same way
//! everywhere, killed when dropped.
//!
//! # Layout
//! - [`process`]: a child process killed on drop, with its log and its exit.
//! - [`kafka`]: Apache Kafka from the jars `scripts/lib.sh` caches: one broker on free
//!   ports (or one shared per test binary), a three-node cluster for replication faults.
//! - [`postgres`]: PostgreSQL from Debian's package in a temp directory, one database per test;
//!   `LOCKSTEP_TEST_DATABASE=postgres` gives every [`server`] its own (SQLite otherwise).
//! - [`records`]: what a plain Kafka client reads back (topic records, events, group offsets).
//! - [`server`]: the `lockstep` binary on port 0; `kill -9`, SIGTERM, restart.
//! - [`device`]: a device's view of the gRPC API (bearer token, push, subscribe, ack).
//! - [`haproxy`]: Debian's HAProxy in front of several servers (gRPC over h2c, health checks).
//! - [`dashboard`]: the `lockstep-dashboard` binary, a plain HTTP GET, headless Chromium.
//! - [`cli`]: a device driven through the `lockstep-cli` binary, with its own store.
//! - [`push`]: the `lockstep-push` worker, and a local push service (Python) that verifies and decrypts.
//! - [`stack`]: Kafka + server + first device in one line.
//! - [`tls`]: a CA made by the test, its certificates, a TLS-terminating proxy.
//! - [`wait`]: [`wait::eventually`], a test's one way to wait for something it can observe.
//! - [`user_topic`], [`device_group`]: Kafka names, from the server's own naming functions.

pub mod cli;
pub mod dashboard;
pub mod device;
pub mod haproxy;
pub mod kafka;
pub mod postgres;
pub mod process;
pub mod push;
pub mod records;
pub mod server;
pub mod stack;
pub mod tls;
mod tmpfs;
pub mod wait;

use std::{net::TcpListener, path::Path};

use lockstep_broker::settings::KafkaSettings;

/// A port that was free a moment ago (for processes that cannot take port 0).
///
/// Taken below the kernel's ephemeral range (32768–60999 on Linux): a port bound to 0 and
/// released comes from that range, where any outgoing connection of any process may take
/// it before the broker it is meant for binds it (Kafka then fails with "Address already
/// in use"). Within one test process the ports go in sequence from a random start, so two
/// tests never get the same one.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 15_000;
    const COUNT: u32 = 32_768 - FIRST;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(u32::MAX, rand::random::<u32>() % COUNT, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..COUNT {
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        let port = u16::try_from(port).expect("below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
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

/// `GET path` over plain HTTP/1.1 (`Connection: close`): the status and the body.
/// Enough for the admin endpoints and the dashboard; no redirects.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_with(addr, path, &[]).await
}

/// [`http_get`] with request headers.
pub async fn http_get_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let (status, _head, body) = http_request(addr, "GET", path, headers, "").await?;
    Ok((status, body))
}

/// One HTTP/1.1 request (`Connection: close`; `Host: <addr>` unless `headers` name
/// another): the status, the response head (status line and headers) and the body.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await??;
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(key, _)| key.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (key, value) in headers {
        request.push_str(&format!("{key}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), stream.read_to_end(&mut response)).await??;
    let response = String::from_utf8(response)?;
    let (head, body) =
        response.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no HTTP head in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, head.to_string(), body))
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or_else(|| anyhow::anyhow!("truncated chunk"))?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or_else(|| anyhow::anyhow!("short chunk"))?);
        body = rest.get(size + 2..).unwrap_or_default();
    }
}

/// `promtool check metrics` on a `/metrics` text (Debian's `prometheus`, which scripts/test installs).
pub fn promtool_check(text: &str) -> anyhow::Result<()> {
    use std::{
        io::Write,
        process::{Command, Stdio},
    };
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| anyhow::anyhow!("promtool (Debian package prometheus; scripts/test installs it): {error}"))?;
    child.stdin.take().ok_or_else(|| anyhow::anyhow!("promtool's stdin"))?.write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
