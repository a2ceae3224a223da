//! The API through an independent gRPC implementation (Python grpcio, with
//! stubs generated from our .proto files by grpcio-tools): what a non-Rust
//! device would see; and reflection as Python's grpcio-reflection (v1alpha
//! only) sees it. scripts/test installs both; without them these tests fail.
//! Beside them, reflection's v1 form through tonic's own client.

use std::{path::Path, process::Command};

use lockstep_e2e::{kafka::Kafka, server::Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_device_can_sync() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let server = Server::start(&kafka).await?;
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let address = server.addr().to_string();
    let output = tokio::task::spawn_blocking({
        let script = here.join("python/grpc_check.py");
        let protos = here.join("../proto/proto");
        move || Command::new("python3").arg(script).arg(address).arg(protos).output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "grpcio check failed ({}); install with `python3 -m pip install grpcio grpcio-tools`\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("grpcio client: ok"), "{stdout}");
    Ok(())
}

/// Python's grpcio-reflection speaks only v1alpha reflection (so do older grpcurl and GUI
/// clients): the server answers it as it answers v1, with every service and its descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_a_v1alpha_client() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let server = Server::start(&kafka).await?;
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let address = server.addr().to_string();
    let output = tokio::task::spawn_blocking({
        let script = here.join("python/reflection_check.py");
        move || Command::new("python3").arg(script).arg(address).output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "v1alpha reflection check failed ({}); install with `python3 -m pip install grpcio-reflection`\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("v1alpha reflection: ok"), "{stdout}");
    Ok(())
}

/// Reflection's v1 form, which grpcurl asks first (`grpcurl -plaintext localhost:50051 list`
/// in docs/api.md): the same lockstep services the v1alpha client above finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_a_v1_client() -> anyhow::Result<()> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let kafka = Kafka::shared().await?;
    let server = Server::start(kafka).await?;
    let mut client = ServerReflectionClient::new(server.channel().await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client.server_reflection_info(tokio_stream::iter([request])).await?.into_inner();
    let answer = answers.message().await?.ok_or_else(|| anyhow::anyhow!("v1 reflection: no answer"))?;
    let Some(MessageResponse::ListServicesResponse(listed)) = answer.message_response else {
        anyhow::bail!("v1 reflection: not a service list: {answer:?}");
    };
    let services: Vec<&str> = listed.service.iter().map(|service| service.name.as_str()).collect();
    for expected in ["lockstep.v1.Sync", "lockstep.v1.Accounts", "lockstep.v1.Keys", "lockstep.v1.PushTargets"] {
        assert!(services.contains(&expected), "v1 reflection lists {services:?}, not {expected}");
    }
    println!("v1 reflection: {services:?}");
    Ok(())
}
