//! Several Lockstep nodes on one Apache Kafka and one PostgreSQL (issue 21, "any device on any
//! node"): real `lockstep` processes sharing the accounts database and the events topic.
//! - a device paired through one node authenticates on the others at once (their token caches
//!   fall back to the database);
//! - a device revoked through one node is refused by every node and its streams on every node
//!   end (every node follows the events topic's DeviceRevoked);
//! - a node that never hears of the revocation still refuses the token once its cached check is
//!   older than `accounts.token_recheck_interval`;
//! - a change pushed through one node reaches live streams on the others (LogAppended, the
//!   doorbell: they read it from the user's topic with their shared readers);
//! - a device's newest stream wins on whatever node (DeviceConnected's stream stamp): the older
//!   one ends with ABORTED, and lease renewals end nothing;
//! - revocation through one node ends the device's streams on the others (time measured);
//! - acks of one device through different nodes, a stale one among them, never move its
//!   committed offset backwards (read from Kafka after every step);
//! - the push worker and the dashboard see the devices connected to every node.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use lockstep_broker::kafka::group_offsets::{GroupOffsets, GroupOffsetsSettings};
use lockstep_e2e::{
    dashboard::Dashboard,
    device::{Device, Received, changes, receive_changes, receive_until, with_token},
    device_group,
    kafka::Kafka,
    push::{PushService, PushWorker, SERVER_ALLOWS_LOCAL_PUSH, Subscription, WORKER_ALLOWS_LOCAL_PUSH},
    server::Server,
    user_topic,
    wait::{eventually, not_yet, ready},
};
use lockstep_proto::v1::{
    PushTarget as ProtoTarget, RevokeDeviceRequest, SetPushTargetRequest, WebPushTarget, push_target::Target,
};
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

/// Three nodes on one Kafka, one PostgreSQL database and one events topic of their own, with
/// node ids `ids`.
struct Nodes {
    /// Bind it (`_database`, not `..`): the server stops when it is dropped.
    _database: Postgres,
    ids: [String; 3],
    nodes: [Server; 3],
}

/// An events topic name of its own.
fn events_topic() -> String {
    format!("lockstep.events.test-{}", uuid::Uuid::new_v4().simple())
}

async fn three_nodes(kafka: &Kafka, extra: &[(&str, &str)]) -> anyhow::Result<Nodes> {
    three_nodes_on(kafka, events_topic(), extra).await
}

/// [`three_nodes`] on the events topic `topic`.
async fn three_nodes_on(kafka: &Kafka, topic: String, extra: &[(&str, &str)]) -> anyhow::Result<Nodes> {
    let (database, url) = postgres().await?;
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let ids = ["a", "b", "c"].map(|name| format!("node-{name}-{run}"));
    let mut nodes = Vec::new();
    for id in &ids {
        let mut settings = vec![
            ("LOCKSTEP_DATABASE__URL", url.as_str()),
            ("LOCKSTEP_EVENTS__TOPIC", topic.as_str()),
            ("LOCKSTEP_EVENTS__NODE_ID", id.as_str()),
        ];
        settings.extend_from_slice(extra);
        nodes.push(Server::start_with(kafka, &settings).await?);
    }
    let nodes: [Server; 3] = nodes.try_into().map_err(|_| anyhow::anyhow!("three nodes"))?;
    Ok(Nodes { _database: database, ids, nodes })
}

/// `device` connected to `node`.
async fn on(device: &Device, node: &Server) -> anyhow::Result<Device> {
    let mut device = device.clone();
    device.reconnect(node).await?;
    Ok(device)
}

/// A stream of `device` that is live: it reached the end of the log (its first heartbeat).
async fn live_stream(device: &Device) -> anyhow::Result<(Streaming<lockstep_proto::v1::SubscribeResponse>, Received)> {
    let mut stream = device.subscribe(None).await?;
    let mut received = Received::default();
    receive_until(&mut stream, &mut received, WAIT, |received| !received.heartbeats.is_empty()).await?;
    Ok((stream, received))
}

/// (a) The same device subscribing on node 2 ends its stream on node 1 with ABORTED, and the
/// node-2 stream keeps receiving; subscribing on node 1 again ends node 2's, and the renewals of
/// node 2's lease that were still on their way end nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_newest_stream_wins_on_whatever_node_and_lease_renewals_end_nothing() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    // Leases renewed every second: several renewals pass during the test.
    let Nodes { nodes, _database, .. } = three_nodes(kafka, &[("LOCKSTEP_EVENTS__LEASE_INTERVAL", "1s")]).await?;
    let phone = Device::create_account(&nodes[2], "phone").await?;
    let laptop = phone.pair(&nodes[0], "laptop").await?;
    let (on_first, on_second) = (on(&laptop, &nodes[0]).await?, on(&laptop, &nodes[1]).await?);

    let (mut first_stream, _) = live_stream(&on_first).await?;
    let (mut second_stream, mut second_received) = live_stream(&on_second).await?;
    let status = ended(&mut first_stream).await?;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("newer subscription of this device, on another server node"), "{status:?}");
    assert!(nodes[0].log().contains("a newer stream of the device started on another node"));

    // Node 2's stream goes on: a change pushed through node 3 arrives on it.
    let pushed = phone.push_ok(changes(1, 8)).await?;
    receive_until(&mut second_stream, &mut second_received, WAIT, |received| !received.changes.is_empty()).await?;
    assert_eq!(second_received.offsets(), pushed);

    // Back on node 1: now node 2's stream is the older one.
    let (mut third_stream, mut third_received) = live_stream(&on_first).await?;
    let status = ended(&mut second_stream).await?;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    // Node 2 renewed its stream's lease every second until it ended; renewals still on their
    // way name that older stream and must not end node 1's. Waiting is the point: what is
    // checked is that nothing happens while three lease intervals pass.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pushed = phone.push_ok(changes(2, 8)).await?;
    receive_until(&mut third_stream, &mut third_received, WAIT, |received| received.changes.len() >= 3).await?;
    assert_eq!(third_received.offsets(), (0..3).collect::<Vec<_>>(), "catch-up, then the new changes");
    assert_eq!(&third_received.offsets()[1..], pushed.as_slice());
    Ok(())
}

/// (b) Revoking devices through node 3 ends their streams on nodes 1 and 2 (one device each:
/// a device's streams on two nodes at once do not last, the newest wins). How long it took is
/// printed; the bound asserted is the test's generous wait, not the 1 s target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_through_node_3_ends_the_streams_on_nodes_1_and_2() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let Nodes { nodes, _database, .. } =
        three_nodes(kafka, &[("LOCKSTEP_ACCOUNTS__TOKEN_RECHECK_INTERVAL", "1h")]).await?;
    let phone = Device::create_account(&nodes[2], "phone").await?;
    let laptop = on(&phone.pair(&nodes[2], "laptop").await?, &nodes[0]).await?;
    let tablet = on(&phone.pair(&nodes[2], "tablet").await?, &nodes[1]).await?;
    let (mut laptop_stream, _) = live_stream(&laptop).await?;
    let (mut tablet_stream, _) = live_stream(&tablet).await?;

    let revoke = |device: &Device| {
        let request = phone.request(RevokeDeviceRequest { device_id: device.device_id.clone() });
        let mut accounts = phone.accounts.clone();
        async move { accounts.revoke_device(request).await }
    };
    let started = Instant::now();
    let (laptop_revoked, tablet_revoked) = tokio::join!(revoke(&laptop), revoke(&tablet));
    let answered = started.elapsed();
    laptop_revoked?;
    tablet_revoked?;
    let (laptop_end, tablet_end) =
        tokio::join!(timed_end(&mut laptop_stream, started), timed_end(&mut tablet_stream, started));
    let ((laptop_status, laptop_after), (tablet_status, tablet_after)) = (laptop_end?, tablet_end?);
    assert_eq!(laptop_status.code(), Code::Unauthenticated, "{laptop_status:?}");
    assert_eq!(tablet_status.code(), Code::Unauthenticated, "{tablet_status:?}");
    eprintln!(
        "revocation through node 3 (answered after {} ms) ended the stream on node 1 after {} ms, on node 2 after {} ms",
        answered.as_millis(),
        laptop_after.as_millis(),
        tablet_after.as_millis()
    );
    for after in [laptop_after, tablet_after] {
        assert!(after < WAIT, "{after:?}");
    }
    for (index, device) in [(0, &laptop), (1, &tablet)] {
        refused_eventually(device, &format!("node {}", index + 1)).await?;
    }
    Ok(())
}

/// How `stream` ended, and when (since `started`).
async fn timed_end(
    stream: &mut Streaming<lockstep_proto::v1::SubscribeResponse>,
    started: Instant,
) -> anyhow::Result<(Status, Duration)> {
    let status = ended(stream).await?;
    Ok((status, started.elapsed()))
}

/// The committed offset of `device`'s group, read from Kafka (not through any node).
async fn committed_in_kafka(offsets: &GroupOffsets, device: &Device) -> anyhow::Result<i64> {
    let committed = offsets.fetch(&device_group(&device.device_id), &user_topic(&device.user_id), 0).await?;
    Ok(committed.unwrap_or(-1))
}

/// (c) Acks of one device alternate between the nodes; after each fresh one, the ack the device
/// sent before it (held back, as if delayed on its way) arrives at a node that last committed
/// an older position. The group's committed offset, read from Kafka after every step, never
/// decreases; concurrent pairs of a fresh and a stale ack on two nodes end at the fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_alternating_between_nodes_with_stale_ones_never_move_the_committed_offset_back() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let Nodes { nodes, _database, .. } = three_nodes(kafka, &[]).await?;
    let phone = Device::create_account(&nodes[0], "phone").await?;
    let laptop = phone.pair(&nodes[0], "laptop").await?;
    assert_eq!(phone.push_ok(changes(40, 8)).await?.len(), 40);
    let mut laptop_on = Vec::new();
    for node in &nodes {
        laptop_on.push(on(&laptop, node).await?);
    }
    let offsets = GroupOffsets::connect(GroupOffsetsSettings {
        bootstrap_servers: kafka.bootstrap().to_owned(),
        client_id: "lockstep-test-nodes".into(),
        request_timeout: Duration::from_secs(10),
        max_attempts: 3,
        security: Default::default(),
    })
    .await?;

    // Each node commits once, so that every node has a position of its own to be stale from.
    let mut highest = -1;
    let mut history = Vec::new();
    for (node, offset) in [(0, 0), (1, 1), (2, 2)] {
        laptop_on[node].ack(offset).await?;
        highest = committed_in_kafka(&offsets, &laptop).await?;
        history.push((node, offset, highest));
    }
    // Rounds of: a fresh ack through one node, then the one before it through the node that
    // committed longest ago.
    let mut next = 3;
    for round in 0..9 {
        let (fresh_node, stale_node) = (round % 3, (round + 1) % 3);
        for (node, offset) in [(fresh_node, next + 1), (stale_node, next)] {
            let answered = laptop_on[node].ack(offset).await?;
            let committed = committed_in_kafka(&offsets, &laptop).await?;
            history.push((node, offset, committed));
            assert!(committed >= highest, "the committed offset moved back (node, acked, committed): {history:?}");
            assert_eq!(answered, committed, "the ack answers the committed position: {history:?}");
            highest = committed;
        }
        next += 2;
    }
    assert_eq!(highest, next, "{history:?}");
    // A fresh and a stale ack at once, through two nodes.
    for round in 0..6 {
        let (fresh_node, stale_node) = (round % 3, (round + 2) % 3);
        let (fresh, stale) = tokio::join!(laptop_on[fresh_node].ack(next + 1), laptop_on[stale_node].ack(next));
        assert_eq!(fresh?, next + 2, "the fresh ack's answer");
        assert!(stale? > next, "the stale ack's answer is never below its own commit");
        let committed = committed_in_kafka(&offsets, &laptop).await?;
        history.push((fresh_node, next + 1, committed));
        assert_eq!(committed, next + 2, "the fresh ack's position wins: {history:?}");
        next += 2;
    }
    Ok(())
}

async fn set_web_push(node: &Server, device: &Device, subscription: &Subscription) -> anyhow::Result<()> {
    let unb64 = |text: &str| URL_SAFE_NO_PAD.decode(text);
    let target = Target::WebPush(WebPushTarget {
        endpoint: subscription.endpoint.clone(),
        p256dh: Bytes::from(unb64(&subscription.p256dh)?),
        auth: Bytes::from(unb64(&subscription.auth)?),
    });
    let request = SetPushTargetRequest { target: Some(ProtoTarget { target: Some(target), updated_at_ms: 0 }) };
    node.push_targets().await?.set_push_target(with_token(request, &device.token)).await?;
    Ok(())
}

/// Keeps `device`'s stream open and read, acking nothing.
fn hold_stream(device: &Device) -> tokio::task::JoinHandle<()> {
    let device = device.clone();
    tokio::spawn(async move {
        let Ok(mut stream) = device.subscribe(None).await else { return };
        while let Ok(Some(_)) = stream.message().await {}
    })
}

/// (d) The real push worker and dashboard, on the three nodes' events topic: a device streaming
/// from each node counts as connected (its node's lease), so a burst wakes only the device that
/// streams nowhere, and the dashboard lists each device with the node it is connected to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_worker_and_the_dashboard_see_the_devices_of_every_node() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let topic = events_topic();
    let group = format!("lockstep.push.test-{}", uuid::Uuid::new_v4().simple());
    let service = PushService::start().await?;
    // The worker on the nodes' events topic, in a group of its own; it starts once the nodes
    // created the topic and advertise its key.
    let worker_env = [
        WORKER_ALLOWS_LOCAL_PUSH,
        ("LOCKSTEP_PUSH_EVENTS__TOPIC", topic.as_str()),
        ("LOCKSTEP_PUSH_EVENTS__GROUP", group.as_str()),
    ];
    let mut worker = PushWorker::prepare(kafka.bootstrap(), &worker_env)?;
    let key = worker.vapid_public_key().to_string();
    let Nodes { nodes, ids, _database } = three_nodes_on(
        kafka,
        topic.clone(),
        &[
            ("LOCKSTEP_EVENTS__LEASE_INTERVAL", "1s"),
            ("LOCKSTEP_PUSH__VAPID_PUBLIC_KEY", key.as_str()),
            SERVER_ALLOWS_LOCAL_PUSH,
        ],
    )
    .await?;
    worker.restart()?;
    worker.wait_until_acting(1).await?;
    let dashboard = Dashboard::start(
        kafka.bootstrap(),
        &[("LOCKSTEP_DASHBOARD_EVENTS__TOPIC", topic.as_str()), ("LOCKSTEP_DASHBOARD_REFRESH__INTERVAL", "500ms")],
    )
    .await?;

    let pusher = Device::create_account(&nodes[0], "pusher").await?;
    let mut streaming = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        let device = on(&pusher.pair(node, &format!("on-node-{}", index + 1)).await?, node).await?;
        let subscription = service.subscribe().await?;
        set_web_push(node, &device, &subscription).await?;
        streaming.push((device, subscription));
    }
    let asleep = pusher.pair(&nodes[1], "asleep").await?;
    let asleep_subscription = service.subscribe().await?;
    set_web_push(&nodes[1], &asleep, &asleep_subscription).await?;
    let _held: Vec<_> = streaming.iter().map(|(device, _)| hold_stream(device)).collect();

    // The dashboard: each streaming device connected through its own node, the other one not.
    let mut expected: BTreeMap<String, Vec<String>> =
        streaming.iter().zip(&ids).map(|((device, _), id)| (device.device_id.clone(), vec![id.clone()])).collect();
    expected.insert(asleep.device_id.clone(), Vec::new());
    expected.insert(pusher.device_id.clone(), Vec::new());
    eventually(WAIT, "the dashboard listing the devices of every node", || async {
        let listed = dashboard.json("/api/v1/devices").await?;
        let shown: BTreeMap<String, Vec<String>> = listed["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|device| {
                let nodes = device["nodes"].as_array().into_iter().flatten();
                let nodes = nodes.filter_map(|node| node.as_str().map(str::to_owned)).collect();
                (device["device_id"].as_str().unwrap_or_default().to_owned(), nodes)
            })
            .collect();
        anyhow::Ok(if shown == expected { ready(()) } else { not_yet(format!("shown {shown:?}")) })
    })
    .await?;
    let overview = dashboard.json("/api/v1/devices").await?;
    for id in &ids {
        assert!(overview.to_string().contains(id.as_str()), "node {id} in {overview}");
    }

    // A burst: the worker wakes the device that streams nowhere, and none of those connected.
    let log_end = 1 + *pusher.push_ok(changes(50, 16)).await?.last().unwrap_or(&0);
    let seen = service.wait_for(&asleep_subscription.id, 1, WAIT).await?;
    assert_eq!(seen[0].payload().and_then(|payload| payload["log_end"].as_i64()), Some(log_end));
    // Past the 3 s lease a stale "connected" would have expired, and past the worker's reaction
    // time: nothing for the connected devices. Waiting is the point (a lease expires in time).
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (device, subscription) in &streaming {
        let woken = service.requests_to(&subscription.id).await?;
        assert!(woken.is_empty(), "{} is connected, yet woken: {woken:?}", device.device_id);
    }
    assert_eq!(service.requests_to(&asleep_subscription.id).await?.len(), 1, "one wake-up for the burst");
    Ok(())
}
