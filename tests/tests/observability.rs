//! What an operator sees of a running server: Prometheus metrics that count
//! what happened (checked by `promtool` and scraped by a real Prometheus),
//! `/healthz`, and a `/readyz` that follows Kafka's reachability.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context;
use lockstep_e2e::{
    device::{changes, receive_changes, with_token},
    free_port, http_get,
    process::Process,
    stack::Stack,
    wait::{eventually, not_yet, ready},
};
use lockstep_proto::v1::PushRequest;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

/// `name{labels}` → value, from the Prometheus text format.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_pass_promtool() -> anyhow::Result<()> {
    let Stack { mut kafka, server, device: phone } = Stack::start_own("phone").await?;
    let admin = server.admin_addr().context("the server printed its admin address")?;
    let laptop = phone.pair(&server, "laptop").await?;
    let mut stream = laptop.subscribe(None).await?;
    phone.push_ok(changes(10, 100)).await?;
    receive_changes(&mut stream, 10, WAIT).await?;
    laptop.ack(9).await?;
    let status =
        phone.sync.clone().push(with_token(PushRequest { changes: changes(1, 8) }, "lst_wrong")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let (text, found) = eventually(WAIT, "4 events published", || async {
        let (code, text) = http_get(admin, "/metrics").await?;
        assert_eq!(code, 200);
        let found = samples(&text);
        anyhow::Ok(if found.get("lockstep_events_published_total").copied().unwrap_or_default() >= 4.0 {
            ready((text, found))
        } else {
            not_yet(text)
        })
    })
    .await?;
    let value = |name: &str| found.get(name).copied().unwrap_or_else(|| panic!("{name} missing in:\n{text}"));
    assert_eq!(value("lockstep_changes_pushed_total"), 10.0);
    assert_eq!(value("lockstep_pushed_bytes_total"), 1000.0);
    assert_eq!(value(r#"lockstep_pushes_total{code="OK"}"#), 1.0);
    assert_eq!(value(r#"lockstep_pushes_total{code="UNAUTHENTICATED"}"#), 1.0);
    assert!(value(r#"lockstep_errors_total{code="UNAUTHENTICATED"}"#) >= 1.0);
    // The refused push never reached the handler (the token is checked before the body is read).
    assert_eq!(value("lockstep_push_duration_seconds_count"), 1.0);
    assert_eq!(value("lockstep_kafka_produce_duration_seconds_count"), 10.0);
    let delivered = found.get(r#"lockstep_deliveries_total{source="live"}"#).copied().unwrap_or_default()
        + found.get(r#"lockstep_deliveries_total{source="catchup"}"#).copied().unwrap_or_default();
    assert_eq!(delivered, 10.0, "{text}");
    assert_eq!(value("lockstep_acks_total"), 1.0);
    assert_eq!(value("lockstep_live_streams"), 1.0);
    assert!(text.contains("# HELP lockstep_push_duration_seconds"), "metrics are described");
    assert!(!text.contains(&phone.user_id) && !text.contains(&laptop.device_id), "no per-user or per-device labels");
    lockstep_e2e::promtool_check(&text)?;

    // Health is the process; readiness is Kafka.
    assert_eq!(http_get(admin, "/healthz").await?.0, 200);
    assert_eq!(http_get(admin, "/readyz").await?.0, 200);
    kafka.kill();
    eventually(WAIT, "/readyz noticing that Kafka is gone", || async {
        let (status, body) = http_get(admin, "/readyz").await?;
        anyhow::Ok(if status == 503 { ready(()) } else { not_yet(format!("{status} {body}")) })
    })
    .await?;
    assert_eq!(http_get(admin, "/healthz").await?.0, 200, "the process is still healthy");
    kafka.restart().await?;
    eventually(WAIT, "/readyz seeing Kafka come back", || async {
        let (status, body) = http_get(admin, "/readyz").await?;
        anyhow::Ok(if status == 200 { ready(()) } else { not_yet(format!("{status} {body}")) })
    })
    .await?;
    let (_, text) = http_get(admin, "/metrics").await?;
    assert_eq!(samples(&text).get("lockstep_kafka_reachable"), Some(&1.0));
    drop(stream);
    Ok(())
}

/// A real Prometheus (Debian's `prometheus`) scrapes the admin port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_server() -> anyhow::Result<()> {
    let Stack { kafka: _kafka, server, device: phone } = Stack::start("phone").await?;
    let admin = server.admin_addr().context("admin address")?;
    phone.push_ok(changes(7, 32)).await?;

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lockstep\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )?;
    let port = free_port()?;
    let log_path = dir.path().join("prometheus.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = Command::new("prometheus");
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut prometheus = Process::spawn("prometheus", &mut command, &log_path)?;
    prometheus.wait_for_port(port, WAIT).await?;
    let query_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    eventually(WAIT, "prometheus scraping the count", || async {
        let (_, body) = http_get(query_addr, "/api/v1/query?query=lockstep_changes_pushed_total").await?;
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let value = answer["data"]["result"][0]["value"][1].as_str().map(str::to_string);
        anyhow::Ok(if value.as_deref() == Some("7") {
            ready(())
        } else {
            not_yet(format!("{body}\n{}", std::fs::read_to_string(&log_path).unwrap_or_default()))
        })
    })
    .await?;
    let (_, body) = http_get(query_addr, "/api/v1/targets").await?;
    assert!(body.contains(r#""health":"up""#), "{body}");
    Ok(())
}

/// Reads `/metrics` until `until` holds for its samples, or `WAIT` passes.
async fn metrics_until(
    admin: std::net::SocketAddr,
    what: &str,
    until: impl Fn(&HashMap<String, f64>) -> bool,
) -> anyhow::Result<HashMap<String, f64>> {
    eventually(WAIT, what, || async {
        let (_, text) = http_get(admin, "/metrics").await?;
        let samples = samples(&text);
        anyhow::Ok(if until(&samples) { ready(samples) } else { not_yet(text) })
    })
    .await
}

fn entries(samples: &HashMap<String, f64>, kind: &str) -> f64 {
    samples.get(&format!("lockstep_state_entries{{kind=\"{kind}\"}}")).copied().unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_per_device_state_is_forgotten_and_devices_carry_on_where_they_were() -> anyhow::Result<()> {
    const USERS: usize = 8;
    const KINDS: [&str; 5] = ["device_offsets", "user_pushes", "log_marks", "device_generations", "live_caches"];
    let idle = [("LOCKSTEP_LIMITS__IDLE_STATE_AFTER", "1s")];
    let Stack { kafka: _kafka, server, device: first } = Stack::start_with("phone", &idle).await?;
    let admin = server.admin_addr().context("the server printed its admin address")?;
    let mut fleet = vec![(first.clone(), first.pair(&server, "laptop").await?)];
    for _ in 1..USERS {
        let phone = lockstep_e2e::device::Device::create_account(&server, "phone").await?;
        let laptop = phone.pair(&server, "laptop").await?;
        fleet.push((phone, laptop));
    }
    // Each user: the phone pushes 3, the laptop receives them live and acks 2 of them.
    let mut pushed = Vec::new();
    let mut streams = Vec::new();
    for (phone, laptop) in &fleet {
        let mut stream = laptop.subscribe(None).await?;
        let batch = changes(3, 100);
        assert_eq!(phone.push_ok(batch.clone()).await?, vec![0, 1, 2]);
        assert_eq!(receive_changes(&mut stream, 3, WAIT).await?.offsets(), vec![0, 1, 2]);
        laptop.ack(1).await?;
        pushed.push(batch);
        streams.push(stream);
    }
    let busy = metrics_until(admin, "state held while streams are open", |samples| {
        entries(samples, "device_offsets") >= USERS as f64 && entries(samples, "live_caches") >= USERS as f64
    })
    .await?;
    assert!(busy.get("lockstep_live_cache_bytes").copied().unwrap_or(0.0) > 0.0, "the live caches hold the changes");
    // Streams open: their devices' state stays however long they are quiet. Waiting is the
    // point: three times the 1 s idle_state_after pass, and nothing may be forgotten.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, text) = http_get(admin, "/metrics").await?;
    assert!(entries(&samples(&text), "device_offsets") >= USERS as f64, "a live stream's device is never forgotten");

    drop(streams);
    let quiet =
        metrics_until(admin, "idle state forgotten", |samples| KINDS.iter().all(|kind| entries(samples, kind) == 0.0))
            .await?;
    assert_eq!(quiet.get("lockstep_live_cache_bytes").copied(), Some(0.0));
    assert!(quiet.get("lockstep_idle_state_forgotten_total{kind=\"device_offsets\"}").copied().unwrap_or(0.0) >= 1.0);

    // Forgotten is not lost: each laptop resumes after what it acked, a retried push is
    // still answered as the duplicate it is, and new changes flow on.
    for ((phone, laptop), batch) in fleet.iter().zip(&pushed) {
        let retried = phone.push(batch.clone()).await?;
        let duplicates: Vec<bool> = retried.iter().map(|result| result.duplicate).collect();
        assert_eq!(duplicates, vec![true; 3], "{retried:?}");
        let mut stream = laptop.subscribe(None).await?;
        assert_eq!(receive_changes(&mut stream, 1, WAIT).await?.offsets(), vec![2], "from the committed offset");
        assert_eq!(phone.push_ok(changes(1, 100)).await?, vec![3]);
        assert_eq!(receive_changes(&mut stream, 1, WAIT).await?.offsets(), vec![3]);
    }
    Ok(())
}
