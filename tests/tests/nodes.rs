//! Several Lockstep nodes on one Apache Kafka and one PostgreSQL (issue 21, "any device on any
//! node"): real `lockstep` processes sharing the accounts database and the events topic.
//! - a device paired through one node authenticates on the others at once (their token caches
//!   fall back to the database);
//! - a device revoked through one node is refused by every node and its streams on every node
//!   end (every node follows the events topic's DeviceRevoked);
//! - a node that never hears of the revocation still refuses the token once its cached check is
//!   older than `accounts.token_recheck_interval`;
//! - a change pushed through one node reaches live streams on the others (LogAppended, the
//!   doorbell: they read it from the user's topic with their shared readers).

use std::time::Duration;

use lockstep_e2e::{
    device::{Device, Received, changes, receive_changes, receive_until},
    kafka::Kafka,
    server::Server,
    wait::eventually,
};
use lockstep_proto::v1::RevokeDeviceRequest;
use lockstep_testkit::postgres::Postgres;
use tonic::{Code, Status, Streaming};

const WAIT: Duration = Duration::from_secs(60);

/// A PostgreSQL server of this test and the URL of a new database in it.
async fn postgres() -> anyhow::Result<(Postgres, String)> {
    let server = tokio::task::spawn_blocking(Postgres::start).await??;
    let url = server.new_database()?;
    Ok((server, url))
}

/// Reads `stream` past heartbeats and changes until it ends; the status it ended with.
async fn ended(stream: &mut Streaming<lockstep_proto::v1::SubscribeResponse>) -> anyhow::Result<Status> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await? {
            Ok(Some(message)) => anyhow::ensure!(message.event.is_some(), "empty event"),
            Ok(None) => anyhow::bail!("the stream ended without a status"),
            Err(status) => return Ok(status),
        }
    }
}

/// Pushes through `device`'s current connection until the node refuses its token.
async fn refused_eventually(device: &Device, node: &str) -> anyhow::Result<()> {
    eventually(WAIT, format!("{node} refusing the revoked token"), || async {
        match device.push(changes(1, 8)).await {
            Err(status) if status.code() == Code::Unauthenticated => anyhow::Ok(true),
            Err(status) => anyhow::bail!("{node}: {status:?}"),
            Ok(_) => anyhow::Ok(false),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_paired_on_one_node_works_on_the_others_and_revoked_on_a_third_it_is_refused_everywhere()
-> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let (_database, url) = postgres().await?;
    let topic = format!("lockstep.events.test-{}", uuid::Uuid::new_v4());
    // Only the DeviceRevoked event can end the cached tokens within the test's wait.
    let settings = [
        ("LOCKSTEP_DATABASE__URL", url.as_str()),
        ("LOCKSTEP_EVENTS__TOPIC", topic.as_str()),
        ("LOCKSTEP_ACCOUNTS__TOKEN_RECHECK_INTERVAL", "1h"),
    ];
    let nodes = [
        Server::start_with(kafka, &settings).await?,
        Server::start_with(kafka, &settings).await?,
        Server::start_with(kafka, &settings).await?,
    ];
    let mut phone = Device::create_account(&nodes[0], "phone").await?;
    // Paired through node 1: node 1 caches the token, nodes 2 and 3 never saw it.
    let laptop = phone.pair(&nodes[0], "laptop").await?;
    let mut on_node = Vec::new();
    for node in &nodes {
        let mut device = laptop.clone();
        device.reconnect(node).await?;
        device.push_ok(changes(1, 8)).await?;
        on_node.push(device);
    }
    // A stream of the laptop on node 2.
    let mut laptop_stream = on_node[1].subscribe(None).await?;
    assert!(laptop_stream.message().await?.is_some());

    // Revoked through node 3.
    phone.reconnect(&nodes[2]).await?;
    phone
        .accounts
        .clone()
        .revoke_device(phone.request(RevokeDeviceRequest { device_id: laptop.device_id.clone() }))
        .await?;
    let status = ended(&mut laptop_stream).await?;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    for (index, device) in on_node.iter().enumerate() {
        refused_eventually(device, &format!("node {}", index + 1)).await?;
        let refused = device.subscribe(None).await.expect_err("a revoked device cannot subscribe");
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }
    // Node 1 learnt it from the event (its cached check is an hour long); the phone goes on.
    assert!(nodes[0].log().contains("device revoked on another node"), "node 1 applied the DeviceRevoked event");
    phone.reconnect(&nodes[0]).await?;
    assert_eq!(phone.push_ok(changes(1, 8)).await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_the_revocation_refuses_the_token_after_its_recheck_interval() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let (_database, url) = postgres().await?;
    let first = Server::start_with(kafka, &[("LOCKSTEP_DATABASE__URL", url.as_str())]).await?;
    // This node reads no events at all: only the database can tell it.
    let deaf = Server::start_with(
        kafka,
        &[
            ("LOCKSTEP_DATABASE__URL", url.as_str()),
            ("LOCKSTEP_EVENTS__ENABLED", "false"),
            ("LOCKSTEP_ACCOUNTS__TOKEN_RECHECK_INTERVAL", "1s"),
        ],
    )
    .await?;
    let phone = Device::create_account(&first, "phone").await?;
    let laptop = phone.pair(&first, "laptop").await?;
    let mut on_deaf = laptop.clone();
    on_deaf.reconnect(&deaf).await?;
    on_deaf.push_ok(changes(1, 8)).await?;
    phone
        .accounts
        .clone()
        .revoke_device(phone.request(RevokeDeviceRequest { device_id: laptop.device_id.clone() }))
        .await?;
    refused_eventually(&on_deaf, "the node without events").await?;
    let refused = on_deaf.subscribe(None).await.expect_err("a revoked device cannot subscribe");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    Ok(())
}

/// The doorbell: changes pushed through nodes 1 and 3 reach a device streaming from node 2,
/// live (the same stream, no reconnect), in offset order, and the pushers' own streams too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_pushed_through_other_nodes_reach_a_live_stream_in_offset_order() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let (_database, url) = postgres().await?;
    let topic = format!("lockstep.events.test-{}", uuid::Uuid::new_v4());
    let settings = [("LOCKSTEP_DATABASE__URL", url.as_str()), ("LOCKSTEP_EVENTS__TOPIC", topic.as_str())];
    let nodes = [
        Server::start_with(kafka, &settings).await?,
        Server::start_with(kafka, &settings).await?,
        Server::start_with(kafka, &settings).await?,
    ];
    let phone = Device::create_account(&nodes[0], "phone").await?;
    let mut laptop = phone.pair(&nodes[0], "laptop").await?;
    laptop.reconnect(&nodes[1]).await?;
    let mut tablet = phone.pair(&nodes[0], "tablet").await?;
    tablet.reconnect(&nodes[2]).await?;
    let mut laptop_stream = laptop.subscribe(None).await?;
    let mut phone_stream = phone.subscribe(None).await?;
    // Both streams are live (at the end of the empty log) before anything is pushed.
    let mut laptop_received = Received::default();
    receive_until(&mut laptop_stream, &mut laptop_received, WAIT, |received| !received.heartbeats.is_empty()).await?;

    let mut pushed = Vec::new();
    for round in 0..3 {
        pushed.extend(phone.push_ok(changes(2, 16 + round)).await?);
        pushed.extend(tablet.push_ok(changes(1, 16 + round)).await?);
    }
    assert_eq!(pushed, (0..9).collect::<Vec<_>>());
    receive_until(&mut laptop_stream, &mut laptop_received, WAIT, |received| received.changes.len() >= 9).await?;
    assert_eq!(laptop_received.offsets(), pushed, "node 2's stream got every change once, in order");
    assert!(laptop_received.resyncs.is_empty(), "{:?}", laptop_received.resyncs);
    // The phone's stream on node 1 gets the tablet's changes from node 3 too.
    let phone_received = receive_changes(&mut phone_stream, 9, WAIT).await?;
    assert_eq!(phone_received.offsets(), pushed);
    Ok(())
}
