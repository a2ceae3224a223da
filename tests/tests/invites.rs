//! Invite codes end to end: the operator makes them with `lockstep invite`
//! while the server runs, `lockstep-cli init --invite` spends one per account,
//! and a used, expired, revoked or unknown code creates nothing (no account, no
//! topic) — also when two devices race for the same code. GetServerInfo tells
//! clients how registration works and the limits they must respect.

use std::time::Duration;

use lockstep_e2e::{cli::Cli, kafka::Kafka, server::Server};
use lockstep_proto::v1::{CreateAccountRequest, GetServerInfoRequest, RegistrationMode};
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};
use serde_json::Value;
use tonic::Code;

const REFUSED: &str = "the invite code is invalid, expired or already used";

fn user_topics(bootstrap: &str) -> anyhow::Result<usize> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(metadata.topics().iter().filter(|topic| topic.name().starts_with("lockstep.user.")).count())
}

/// `lockstep invite create --json …`: (id, code) of each new invite.
fn create_invites(server: &Server, args: &[&str]) -> anyhow::Result<Vec<(i64, String)>> {
    let mut command = vec!["create", "--json"];
    command.extend_from_slice(args);
    let created: Value = serde_json::from_str(&server.invite(&command)?)?;
    let created = created.as_array().cloned().unwrap_or_default();
    Ok(created
        .iter()
        .map(|invite| (invite["invite_id"].as_i64().unwrap_or(-1), invite["code"].as_str().unwrap_or("").to_string()))
        .collect())
}

async fn create_account(server: &Server, name: &str, invite_code: &str) -> Result<String, tonic::Status> {
    let mut accounts = server.accounts().await.expect("connected");
    let request = CreateAccountRequest { device_name: name.into(), invite_code: invite_code.into() };
    accounts.create_account(request).await.map(|response| response.into_inner().user_id)
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn assert_refused(result: Result<String, tonic::Status>) {
    let status = result.expect_err("an invalid invite made an account");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), REFUSED, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invite_makes_exactly_one_account() -> anyhow::Result<()> {
    let mut kafka = Kafka::start().await?;
    let mut server = Server::start_with(
        &kafka,
        &[
            ("LOCKSTEP_KAFKA__REQUEST_TIMEOUT", "3s"),
            // The server listens on loopback: invite-only must be said.
            ("LOCKSTEP_ACCOUNTS__INVITE_ONLY", "true"),
            ("LOCKSTEP_ACCOUNTS__MAX_DEVICES_PER_ACCOUNT", "7"),
            ("LOCKSTEP_RATE_LIMITS__PUSH_PER_ACCOUNT__BURST", "123"),
            ("LOCKSTEP_RATE_LIMITS__PUSH_PER_ACCOUNT__PER_HOUR", "4567"),
            ("LOCKSTEP_LIMITS__MAX_SUBSCRIPTIONS_PER_USER", "9"),
            ("LOCKSTEP_LIMITS__REQUEST_TIMEOUT", "41s"),
            ("LOCKSTEP_DELIVERY__SEND_TIMEOUT", "17s"),
            ("LOCKSTEP_LIMITS__MAX_CONCURRENT_REQUESTS_PER_DEVICE", "5"),
        ],
    )
    .await?;

    // GetServerInfo (no token) says what the settings say.
    let info = server.sync().await?.get_server_info(GetServerInfoRequest {}).await?.into_inner();
    assert_eq!(info.registration(), RegistrationMode::Invite);
    assert_eq!(info.max_devices_per_account, 7);
    let push_rate = info.push_rate_limit.unwrap_or_default();
    assert_eq!((push_rate.burst, push_rate.per_hour), (123, 4567));
    assert_eq!(info.max_subscriptions_per_user, 9);
    assert_eq!(info.request_timeout_ms, 41_000);
    assert_eq!(info.stream_send_timeout_ms, 17_000);
    assert_eq!(info.max_concurrent_requests_per_device, 5);
    assert_eq!(info.heartbeat_interval_ms, 1_000);

    // Without a code: the CLI stops before asking, the API refuses; no topic either way.
    let nobody = Cli::new("nobody")?;
    let endpoint = server.endpoint();
    let init = |cli: &Cli, extra: &[&str]| -> Vec<String> {
        ["init", "--server", &endpoint, "--name", &cli.name].iter().chain(extra).map(|arg| arg.to_string()).collect()
    };
    let refused = nobody.fail(&strs(&init(&nobody, &[]))).await?;
    assert!(refused.contains("invite only") && refused.contains("--invite"), "{refused}");
    let status = create_account(&server, "nobody", "").await.expect_err("no code, no account");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(user_topics(kafka.bootstrap())?, 0);

    // Three codes, made while the server runs; each works once: flag, file, environment.
    let invites = create_invites(&server, &["--count", "3", "--note", "e2e"])?;
    assert_eq!(invites.len(), 3);
    let listed = server.invite(&["list"])?;
    assert!(invites.iter().all(|(_, code)| !listed.contains(code.as_str())), "list shows codes:\n{listed}");
    let (alice, bob, carol) = (Cli::new("alice")?, Cli::new("bob")?, Cli::new("carol")?);
    alice.json(&strs(&init(&alice, &["--invite", &invites[0].1]))).await?;
    let file = bob.store.with_extension("invite");
    std::fs::write(&file, format!("{}\n", invites[1].1))?;
    bob.json(&strs(&init(&bob, &["--invite-file", &file.display().to_string()]))).await?;
    let output = carol.command(&strs(&init(&carol, &[])), true).env("LOCKSTEP_INVITE", &invites[2].1).output().await?;
    anyhow::ensure!(output.status.success(), "init with LOCKSTEP_INVITE: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(user_topics(kafka.bootstrap())?, 3);

    // A used code, through the CLI and the API: refused, and no topic.
    let again = Cli::new("again")?;
    let refused = again.fail(&strs(&init(&again, &["--invite", &invites[0].1]))).await?;
    assert!(refused.contains(REFUSED) && refused.contains("PermissionDenied"), "{refused}");
    assert_refused(create_account(&server, "again", &invites[1].1).await);
    assert_eq!(user_topics(kafka.bootstrap())?, 3, "a refused code created a topic");

    // Expired, revoked and unknown codes: the same refusal.
    let expired = create_invites(&server, &["--expires-in", "1s"])?.remove(0);
    let revoked = create_invites(&server, &[])?.remove(0);
    server.invite(&["revoke", &revoked.0.to_string()])?;
    // Time must pass for a code to expire: past its 1 s (a try before would use it up).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for code in [expired.1.as_str(), revoked.1.as_str(), "lsi_AAAAAAAAAAAAAAAAAAAAAAAAAAA"] {
        assert_refused(create_account(&server, "late", code).await);
    }
    assert_eq!(user_topics(kafka.bootstrap())?, 3);

    // Two devices race for one code: one account, one topic.
    let raced = create_invites(&server, &[])?.remove(0).1;
    let (first, second) =
        tokio::join!(create_account(&server, "racer-1", &raced), create_account(&server, "racer-2", &raced));
    let winners = [&first, &second].iter().filter(|result| result.is_ok()).count();
    assert_eq!(winners, 1, "{first:?} / {second:?}");
    assert_refused(if first.is_ok() { second } else { first });
    assert_eq!(user_topics(kafka.bootstrap())?, 4);

    // Kafka down while the account is made: the claimed code is not spent. And an unused
    // code survives a restart of the server.
    let kept = create_invites(&server, &["--note", "kept"])?.remove(0);
    kafka.kill();
    let status = create_account(&server, "kafka-down", &kept.1).await.expect_err("kafka is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    kafka.restart().await?;
    server.restart().await?;
    let kept_user = create_account(&server, "after-restart", &kept.1).await?;
    assert_eq!(user_topics(kafka.bootstrap())?, 5);

    let listed: Value = serde_json::from_str(&server.invite(&["list", "--json"])?)?;
    let states: Vec<&str> =
        listed.as_array().into_iter().flatten().filter_map(|invite| invite["state"].as_str()).collect();
    assert_eq!(states, ["used", "used", "used", "expired", "revoked", "used", "used"], "{listed}");
    let last = listed.as_array().and_then(|all| all.last()).cloned().unwrap_or_default();
    assert_eq!(last["used_by_user"].as_str(), Some(kept_user.as_str()));
    assert_eq!(last["note"].as_str(), Some("kept"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_guesses_are_rate_limited_and_a_closed_server_says_so() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let server = Server::start_with_default_limits(&kafka, &[("LOCKSTEP_ACCOUNTS__INVITE_ONLY", "true")]).await?;
    // The default CreateAccount bucket: a burst of 5 per address; every guess takes a token.
    let mut outcomes = Vec::new();
    for guess in 0..6 {
        let status = create_account(&server, "guesser", &format!("lsi_guess{guess:023}")).await.unwrap_err();
        outcomes.push(status.code());
    }
    assert_eq!(&outcomes[..5], [Code::PermissionDenied; 5], "{outcomes:?}");
    assert_eq!(outcomes[5], Code::ResourceExhausted, "{outcomes:?}");

    let closed = Server::start_with(&kafka, &[("LOCKSTEP_ACCOUNTS__ALLOW_REGISTRATION", "false")]).await?;
    let info = closed.sync().await?.get_server_info(GetServerInfoRequest {}).await?.into_inner();
    assert_eq!(info.registration(), RegistrationMode::Closed);
    let cli = Cli::new("closed")?;
    let shown = cli.json(&["server-info", "--server", &closed.endpoint()]).await?;
    assert_eq!(shown["registration"], "REGISTRATION_MODE_CLOSED", "{shown}");
    assert_eq!(shown["max_devices_per_account"], 1_000_000, "{shown}");
    let refused = cli.fail(&["init", "--server", &closed.endpoint(), "--name", "closed", "--invite", "lsi_x"]).await?;
    assert!(refused.contains("does not accept new accounts"), "{refused}");
    assert_eq!(user_topics(kafka.bootstrap())?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_invite_codes_do_not_use_up_the_server_wide_account_budget() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let server = Server::start_with_default_limits(
        &kafka,
        &[
            ("LOCKSTEP_ACCOUNTS__INVITE_ONLY", "true"),
            // Only the buckets under test can refuse here.
            ("LOCKSTEP_RATE_LIMITS__CREATE_ACCOUNT_PER_ADDRESS__BURST", "1000"),
            ("LOCKSTEP_RATE_LIMITS__CREATE_ACCOUNT_TOTAL__BURST", "2"),
            ("LOCKSTEP_RATE_LIMITS__CREATE_ACCOUNT_TOTAL__PER_HOUR", "1"),
            ("LOCKSTEP_RATE_LIMITS__FAILED_REGISTRATION_PER_ADDRESS__BURST", "10"),
            ("LOCKSTEP_RATE_LIMITS__FAILED_REGISTRATION_PER_ADDRESS__PER_HOUR", "1"),
        ],
    )
    .await?;
    let guess = |index: usize| format!("lsi_guess{index:023}");
    for index in 0..5 {
        assert_refused(create_account(&server, "guesser", &guess(index)).await);
    }
    // The server-wide budget of 2 is still whole: two real sign-ups get through, a third does not.
    let invites = create_invites(&server, &["--count", "3"])?;
    create_account(&server, "first", &invites[0].1).await.expect("first sign-up");
    create_account(&server, "second", &invites[1].1).await.expect("second sign-up");
    let status = create_account(&server, "third", &invites[2].1).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("new accounts"), "{status:?}");
    // The guesser's own bucket: five more guesses are checked, then it is empty.
    for index in 5..10 {
        assert_refused(create_account(&server, "guesser", &guess(index)).await);
    }
    let status = create_account(&server, "guesser", &guess(10)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("refused invite codes"), "{status:?}");
    assert!(lockstep_proto::retry::retry_after(&status).is_some(), "{status:?}");
    Ok(())
}
