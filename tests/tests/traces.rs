//! One push is one trace: the device's `traceparent` → `lockstep.push` →
//! `kafka.produce` (its context in the record's headers) → `lockstep.deliver`
//! for a live device and for a catching-up one → the device. Exported over
//! OTLP to an independent receiver (Python `grpcio` + `opentelemetry-proto`).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context;
use lockstep_e2e::{
    device::{Device, changes, receive_changes},
    kafka::Kafka,
    leaks::{content_in, traceable_changes},
    process::Process,
    server::Server,
    wait::{eventually, not_yet, ready},
};
use lockstep_proto::v1::PushRequest;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

struct Receiver {
    _process: Process,
    spans: std::path::PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

async fn start_receiver() -> anyhow::Result<Receiver> {
    let dir = tempfile::tempdir()?;
    let spans = dir.path().join("spans.jsonl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("otlp_receiver.py");
    let log_path = dir.path().join("receiver.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = Command::new("python3");
    command.arg(&script).arg(&spans).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let process = Process::spawn("otlp-receiver", &mut command, &log_path)?;
    let port_file = spans.with_extension("jsonl.port");
    let port = eventually(WAIT, "the OTLP receiver started (needs grpcio and opentelemetry-proto)", || async {
        match std::fs::read_to_string(&port_file).map(|port| port.trim().parse::<u16>()) {
            Ok(Ok(port)) => ready(port),
            _ => not_yet(std::fs::read_to_string(&log_path).unwrap_or_default()),
        }
    })
    .await?;
    Ok(Receiver { _process: process, spans, port, _dir: dir })
}

fn spans_of(path: &Path, trace_id: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|span| span["trace_id"] == trace_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_is_one_trace_from_the_device_through_kafka_to_the_devices() -> anyhow::Result<()> {
    let receiver = start_receiver().await?;
    let kafka = Kafka::start().await?;
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let server = Server::start_with(
        &kafka,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await?;
    let phone = Device::create_account(&server, "phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    let tablet = phone.pair(&server, "tablet").await?;
    let mut live = laptop.subscribe(None).await?;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    // Record ids long and unique enough that the scan below could find them.
    let pushed = traceable_changes(3, 64);
    let mut request = phone.request(PushRequest { changes: pushed.clone() });
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-{caller_span}-01").parse()?);
    phone.sync.clone().push(request).await?;

    // Live, and later from Kafka (the catch-up reader reads the record headers).
    let received = receive_changes(&mut live, 3, WAIT).await?;
    let mut catching_up = tablet.subscribe(None).await?;
    let caught_up = receive_changes(&mut catching_up, 3, WAIT).await?;
    for change in received.changes.iter().chain(&caught_up.changes) {
        assert!(change.traceparent.contains(trace_id), "the device gets the trace: {:?}", change.traceparent);
    }

    let spans = eventually(WAIT, "the trace completed", || async {
        let spans = spans_of(&receiver.spans, trace_id);
        let delivers = spans.iter().filter(|span| span["name"] == "lockstep.deliver").count();
        if delivers >= 2 && spans.iter().any(|span| span["name"] == "kafka.produce") {
            ready(spans)
        } else {
            not_yet(format!("{spans:#?}\n{}", server.log()))
        }
    })
    .await?;
    let by_name =
        |name: &str| spans.iter().find(|span| span["name"] == name).with_context(|| format!("no {name} span"));
    let push = by_name("lockstep.push")?;
    let produce = by_name("kafka.produce")?;
    assert_eq!(push["parent_span_id"], caller_span, "the push continues the device's trace");
    assert_eq!(push["service"], "lockstep");
    assert_eq!(produce["parent_span_id"], push["span_id"], "produce is a child of the push");
    assert_eq!(produce["attributes"]["messaging.batch.message_count"], "3");
    for deliver in spans.iter().filter(|span| span["name"] == "lockstep.deliver") {
        assert_eq!(deliver["parent_span_id"], produce["span_id"], "delivery continues from the produce span");
    }
    let produced_context = format!("00-{trace_id}-{}-01", produce["span_id"].as_str().unwrap_or_default());
    assert_eq!(received.changes[0].traceparent, produced_context);

    // Nothing secret in any attribute: no record id, no change id, no window of ciphertext or nonce.
    let all = serde_json::to_string(&spans)?;
    assert!(all.contains(trace_id), "the scan reads the spans themselves");
    for change in &pushed {
        let found = content_in(all.as_bytes(), change);
        assert!(found.is_empty(), "{found:?} of a pushed change in the spans: {all}");
    }
    assert!(!all.contains(&phone.token), "a token in an attribute");
    assert!(!all.contains("notes"), "a collection in an attribute");

    // A server without an OTLP endpoint sends no trace context at all.
    let plain = Server::start(&kafka).await?;
    let device = Device::create_account(&plain, "plain").await?;
    let other = device.pair(&plain, "other").await?;
    let mut stream = other.subscribe(None).await?;
    let mut request = device.request(PushRequest { changes: changes(1, 16) });
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-{caller_span}-01").parse()?);
    device.sync.clone().push(request).await?;
    let plain_changes = receive_changes(&mut stream, 1, WAIT).await?;
    assert_eq!(plain_changes.changes[0].traceparent, "", "tracing off: no context travels");
    Ok(())
}
