//! Registration and abuse, against the server's default limits: anonymous
//! account creation is throttled (and with it the Kafka topics it creates),
//! pairing-code guessing is throttled, pairing tickets per account are
//! throttled, and an account cannot grow past its device cap.

use std::time::Duration;

use lockstep_e2e::{
    device::Device,
    kafka::Kafka,
    server::Server,
    wait::{eventually, not_yet, ready},
};
use lockstep_proto::{
    retry,
    v1::{
        CreateAccountRequest, CreatePairingTicketRequest, ListDevicesRequest, RedeemPairingTicketRequest,
        RevokeDeviceRequest,
    },
};
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};
use tonic::Code;

fn user_topics(bootstrap: &str) -> anyhow::Result<usize> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(metadata.topics().iter().filter(|topic| topic.name().starts_with("lockstep.user.")).count())
}

/// Each refusal is a retryable RESOURCE_EXHAUSTED that says how long to wait.
fn assert_throttled(status: &tonic::Status) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(retry::is_retryable(status), "{status:?}");
    assert!(retry::retry_after(status).is_some_and(|wait| wait > Duration::ZERO), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_anonymous_accounts_are_throttled_and_so_are_their_topics() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let server = Server::start_with_default_limits(&kafka, &[]).await?;
    let mut accounts = server.accounts().await?;
    let (mut created, mut throttled) = (0, 0);
    for index in 0..1000 {
        match accounts
            .create_account(CreateAccountRequest { device_name: format!("bot-{index}"), ..Default::default() })
            .await
        {
            Ok(_) => created += 1,
            Err(status) => {
                assert_throttled(&status);
                throttled += 1;
            }
        }
    }
    eprintln!("measured: 1,000 CreateAccount calls: {created} created, {throttled} throttled");
    // The default bucket: a burst of 5, then 20 an hour (none more within this test).
    assert!((5..=6).contains(&created), "{created} accounts created");
    assert_eq!(created + throttled, 1000);
    // A broker's metadata follows a topic's creation a moment later (under load, seconds).
    let topics = eventually(Duration::from_secs(60), format!("{created} user topics"), || async {
        let topics = user_topics(kafka.bootstrap())?;
        anyhow::Ok(if topics >= created { ready(topics) } else { not_yet(format!("{topics} topics")) })
    })
    .await?;
    assert_eq!(topics, created, "one topic per created account, no more");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pairing_guesses_are_throttled() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let server = Server::start_with_default_limits(&kafka, &[]).await?;
    let owner = Device::create_account(&server, "owner").await?;
    let mut accounts = server.accounts().await?;
    let (mut wrong, mut throttled) = (0, 0);
    for guess in 0..10_000 {
        let request =
            RedeemPairingTicketRequest { ticket: format!("lpt_guess{guess:06}"), device_name: "thief".into() };
        match accounts.redeem_pairing_ticket(request).await {
            Ok(_) => anyhow::bail!("guess {guess} was redeemed"),
            Err(status) if status.code() == Code::Unauthenticated => wrong += 1,
            Err(status) => {
                assert_throttled(&status);
                throttled += 1;
            }
        }
    }
    eprintln!("measured: 10,000 redeem guesses: {wrong} checked, {throttled} throttled");
    assert!((10..=11).contains(&wrong), "{wrong} guesses were checked");
    // The owner's own calls are limited per account, not by the guesser's address.
    owner.accounts.clone().create_pairing_ticket(owner.request(CreatePairingTicketRequest {})).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_tickets_are_rate_limited_and_accounts_capped_at_their_devices() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let server =
        Server::start_with_default_limits(&kafka, &[("LOCKSTEP_ACCOUNTS__MAX_DEVICES_PER_ACCOUNT", "2")]).await?;
    let owner = Device::create_account(&server, "owner").await?;
    let second = owner.pair(&server, "second").await?;
    let ticket = |device: &Device| {
        let mut accounts = device.accounts.clone();
        let request = device.request(CreatePairingTicketRequest {});
        async move { accounts.create_pairing_ticket(request).await.map(|response| response.into_inner().ticket) }
    };
    // A third device is refused, and its ticket survives for after a revocation.
    let third_ticket = ticket(&owner).await?;
    let redeem = |ticket: String| {
        let request = RedeemPairingTicketRequest { ticket, device_name: "third".into() };
        async { server.accounts().await.unwrap().redeem_pairing_ticket(request).await }
    };
    let status = redeem(third_ticket.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("revoke one"), "{status:?}");
    owner
        .accounts
        .clone()
        .revoke_device(owner.request(RevokeDeviceRequest { device_id: second.device_id.clone() }))
        .await?;
    redeem(third_ticket).await?;

    // Pairing tickets: the default burst of 10 per account (2 used above), then throttled.
    let mut issued = 2;
    let status = loop {
        match ticket(&owner).await {
            Ok(_) => issued += 1,
            Err(status) => break status,
        }
        anyhow::ensure!(issued <= 20, "pairing tickets were never throttled");
    };
    assert_throttled(&status);
    assert_eq!(issued, 10);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_heavy_calls_are_rate_limited_per_account() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let server = Server::start_with_default_limits(
        &kafka,
        &[
            ("LOCKSTEP_RATE_LIMITS__DATABASE_CALLS_PER_ACCOUNT__BURST", "3"),
            ("LOCKSTEP_RATE_LIMITS__DATABASE_CALLS_PER_ACCOUNT__PER_HOUR", "1"),
        ],
    )
    .await?;
    let busy = Device::create_account(&server, "busy").await?;
    let other = Device::create_account(&server, "other").await?;
    for _ in 0..3 {
        busy.accounts.clone().list_devices(busy.request(ListDevicesRequest {})).await?;
    }
    let status = busy.accounts.clone().list_devices(busy.request(ListDevicesRequest {})).await.unwrap_err();
    assert_throttled(&status);
    // Per account: another account's calls still go through.
    other.accounts.clone().list_devices(other.request(ListDevicesRequest {})).await?;
    Ok(())
}
