//! TLS end to end: the CLI against a TLS server whose CA the test made (and a
//! wrong one refused, a renewed certificate picked up on SIGHUP), and the
//! server's Kafka connections (rdkafka and the group-offsets client) over TLS
//! with SASL SCRAM-SHA-256, through a TLS-terminating proxy in front of Kafka
//! (the kit's brokers listen in plaintext; the proxy is their TLS listener).
//! PLAIN and SCRAM-SHA-512 are unit-tested.

use std::time::Duration;

use lockstep_broker::kafka::{GroupOffsets, GroupOffsetsSettings, group_offsets::security::KafkaSecurity};
use lockstep_e2e::{
    cli::Cli,
    device::{Device, changes, receive_changes},
    free_port,
    kafka::{Kafka, KafkaOptions},
    server::Server,
    tls::{TestCa, TlsTerminator},
    wait::eventually,
};

const WAIT: Duration = Duration::from_secs(60);

/// Whether the CLI's `error` says the connection itself failed (it could not
/// connect, or the transport broke), not that a server answered the call.
fn is_dead_connection(error: &str) -> bool {
    let transport = error.contains("cannot reach the server at")
        || error.contains("transport error")
        // A plaintext HTTP/2 preface answered with a TLS alert: the connection's framing breaks.
        || error.contains("h2 protocol error")
        || error.contains("connection closed")
        || error.contains("connection reset")
        || error.contains("broken pipe");
    // A status a Lockstep handler sends carries a log reference or one of these codes.
    let answered = ["(InvalidArgument)", "(PermissionDenied)", "(Unauthenticated)", "(FailedPrecondition)", "(ref "]
        .iter()
        .any(|answer| error.contains(answer));
    transport && !answered && !error.to_lowercase().contains("certificate")
}

#[test]
fn a_dead_connection_is_told_from_an_answer() {
    // What lockstep-cli printed for `init --server http://…` against `openssl s_server` (TLS only).
    assert!(is_dead_connection("error: CreateAccount: transport error (Unknown)"));
    assert!(is_dead_connection("error: cannot reach the server at http://127.0.0.1:1: transport error"));
    assert!(is_dead_connection("error: CreateAccount: transport error: connection closed (Unavailable)"));
    // What it printed against the server's own TLS port (tls.rs, 2026-12-06).
    assert!(is_dead_connection("error: CreateAccount: h2 protocol error: http2 error (Unknown)"));
    // Failures of another kind, which the old check (any failure) let pass.
    assert!(!is_dead_connection("error: CreateAccount: invite required (PermissionDenied) (a new account …)"));
    assert!(!is_dead_connection("error: invalid certificate: UnknownIssuer: transport error"));
    assert!(!is_dead_connection("error: unexpected argument '--name' found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_syncs_over_tls_refuses_a_wrong_certificate_and_follows_a_renewal() -> anyhow::Result<()> {
    let ca = TestCa::new("lockstep test ca")?;
    let impostor = TestCa::new("some other ca")?;
    let certs = tempfile::tempdir()?;
    let served = ca.issue(&["localhost", "127.0.0.1"], certs.path(), "server")?;
    let kafka = Kafka::start().await?;
    let cert_file = served.cert.to_string_lossy().to_string();
    let key_file = served.key.to_string_lossy().to_string();
    let server =
        Server::start_with(&kafka, &[("LOCKSTEP_TLS__CERT_FILE", &cert_file), ("LOCKSTEP_TLS__KEY_FILE", &key_file)])
            .await?;
    let url = server.https_endpoint();
    let pinned = ca.ca_file().to_string_lossy().to_string();
    let wrong = impostor.ca_file().to_string_lossy().to_string();

    // A pinned CA: account, a record, a paired device that receives it.
    let laptop = Cli::new("laptop")?;
    laptop.json(&["--ca-file", &pinned, "init", "--server", &url, "--name", "laptop"]).await?;
    laptop.json(&["put", "-c", "notes", r#"{"title":"over tls"}"#]).await?;
    laptop.json(&["--ca-file", &pinned, "sync"]).await?;
    let code = laptop.json(&["--ca-file", &pinned, "pair", "show"]).await?["code"].as_str().unwrap().to_string();
    let phone = Cli::new("phone")?;
    phone.json_with_input(&["--ca-file", &pinned, "pair", "redeem", "--name", "phone"], &code).await?;
    phone.json(&["--ca-file", &pinned, "sync"]).await?;
    let records = phone.records().await?;
    assert_eq!(records.as_array().map(Vec::len), Some(1), "{records}");
    assert_eq!(records[0]["fields"]["title"], "over tls", "{records}");

    // Refused: another CA, the system's roots, and plaintext to the TLS port.
    let stranger = Cli::new("stranger")?;
    let error = stranger.fail(&["--ca-file", &wrong, "init", "--server", &url, "--name", "x"]).await?;
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    let error = stranger.fail(&["init", "--server", &url, "--name", "x"]).await?;
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    // Plaintext HTTP/2 to the TLS port: the handshake fails, so the device never gets an answer
    // from a Lockstep handler, only a dead connection (not an application error, which would
    // mean the port served plaintext gRPC).
    let error = stranger.fail(&["init", "--server", &server.endpoint(), "--name", "x"]).await?;
    println!("plaintext to the TLS port: {error}");
    assert!(is_dead_connection(&error), "plaintext to the TLS port: {error}");
    assert!(error.contains("use https://") || error.contains("starts with https://"), "told what to do: {error}");
    // With a CA file the client refuses before connecting.
    let error = stranger.fail(&["--ca-file", &pinned, "init", "--server", &server.endpoint(), "--name", "x"]).await?;
    assert!(error.contains("a CA file was given but the server address is not https://"), "{error}");

    // A renewed certificate from another CA, picked up on SIGHUP without a restart.
    impostor.issue(&["127.0.0.1"], certs.path(), "server")?;
    server.hangup()?;
    eventually(WAIT, "the renewed certificate served", || async {
        laptop.json(&["--ca-file", &wrong, "sync"]).await.map(|_| true)
    })
    .await?;
    let error = laptop.fail(&["--ca-file", &pinned, "sync"]).await?;
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert!(server.log().contains("tls certificate reloaded"));
    Ok(())
}

/// The server talks to Kafka only through TLS with SASL SCRAM-SHA-256 (the
/// proxy speaks nothing but TLS, Kafka refuses every request before SASL):
/// pushes, delivery and offset commits all work; the group-offsets client
/// alone without TLS, without SASL or with a wrong password is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_with_sasl_scram_through_a_terminating_proxy() -> anyhow::Result<()> {
    let ca = TestCa::new("kafka test ca")?;
    let dir = tempfile::tempdir()?;
    let kafka_cert = ca.issue(&["localhost", "127.0.0.1"], dir.path(), "kafka")?;
    let kafka_port = free_port()?;
    let proxy = TlsTerminator::start(0, ([127, 0, 0, 1], kafka_port).into(), &kafka_cert).await?;
    let options =
        KafkaOptions { port: Some(kafka_port), advertised_port: Some(proxy.addr().port()), ..Default::default() };
    let mut kafka = Kafka::start_with(options).await?;
    kafka.create_scram_user("lockstep", "hunter2").await?;
    kafka.set_authentication(true);
    kafka.restart_gracefully().await?;

    let config = dir.path().join("lockstep.toml");
    let ca_file = ca.ca_file().to_string_lossy().to_string();
    std::fs::write(
        &config,
        format!(
            "[kafka.client_config]\n\"security.protocol\" = \"SASL_SSL\"\n\"ssl.ca.location\" = {ca_file:?}\n\
             \"sasl.mechanism\" = \"SCRAM-SHA-256\"\n\"sasl.username\" = \"lockstep\"\n\"sasl.password\" = \"hunter2\"\n"
        ),
    )?;
    let bootstrap = proxy.addr().to_string();
    let server = Server::start_with_kafka(&bootstrap, &[("LOCKSTEP_CONFIG", &config.to_string_lossy())]).await?;

    let phone = Device::create_account(&server, "phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    let mut stream = laptop.subscribe(None).await?;
    let offsets = phone.push_ok(changes(5, 100)).await?;
    assert_eq!(offsets, vec![0, 1, 2, 3, 4]);
    let received = receive_changes(&mut stream, 5, WAIT).await?;
    assert_eq!(received.offsets(), offsets);
    assert_eq!(laptop.ack(4).await?, 5, "the offset commit went through the group-offsets client");
    assert!(proxy.handshakes() >= 2, "rdkafka and the group-offsets client both came through tls");
    assert!(!server.log().contains("hunter2"), "the sasl password is never logged");

    // The group-offsets client alone: it needs TLS and the right SCRAM password here.
    let secure = |pairs: &[(&str, &str)]| {
        let config = pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
        KafkaSecurity::from_client_config(&config)
    };
    let sasl = |password: &'static str| {
        [("sasl.mechanism", "SCRAM-SHA-256"), ("sasl.username", "lockstep"), ("sasl.password", password)]
    };
    let settings = |security: KafkaSecurity| GroupOffsetsSettings {
        bootstrap_servers: bootstrap.clone(),
        client_id: "lockstep-test".into(),
        request_timeout: Duration::from_secs(3),
        max_attempts: 1,
        security,
    };
    let topic = format!("lockstep.user.{}", phone.user_id);
    let group = format!("lockstep-tls-test-{}", uuid::Uuid::new_v4());
    let tls = [("ssl.ca.location", ca_file.as_str())];
    let refused = [
        ("tls without sasl", secure(&[&[("security.protocol", "SSL")][..], &tls].concat())?),
        ("sasl without tls", secure(&[&[("security.protocol", "SASL_PLAINTEXT")][..], &sasl("hunter2")].concat())?),
        ("a wrong password", secure(&[&[("security.protocol", "SASL_SSL")][..], &tls, &sasl("hunter3")].concat())?),
    ];
    for (name, security) in refused {
        let got_through = match GroupOffsets::connect(settings(security)).await {
            Ok(offsets) => offsets.commit(&group, &topic, 0, 1).await.is_ok(),
            Err(_) => false,
        };
        assert!(!got_through, "{name} must not get through");
    }
    let both = secure(&[&[("security.protocol", "SASL_SSL")][..], &tls, &sasl("hunter2")].concat())?;
    let offsets = GroupOffsets::connect(settings(both)).await?;
    offsets.commit(&group, &topic, 0, 3).await?;
    assert_eq!(offsets.fetch(&group, &topic, 0).await?, Some(3));
    Ok(())
}

/// Listening beyond loopback without a certificate, the server refuses to start (before it
/// touches Kafka) and names the setting that would allow it.
#[test]
fn a_server_beyond_loopback_without_tls_refuses_to_start() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let output = std::process::Command::new(lockstep_e2e::server::lockstep_binary()?)
        .args(["--listen", "0.0.0.0:0", "--kafka-brokers", "127.0.0.1:1"])
        .env("LOCKSTEP_DATA_DIR", data.path())
        .env_remove("LOCKSTEP_TLS__ALLOW_PLAINTEXT")
        .stdin(std::process::Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started: {stderr}");
    assert!(stderr.contains("tls.allow_plaintext") && stderr.contains("without TLS"), "{stderr}");
    Ok(())
}
